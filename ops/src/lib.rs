//! The values that flow through sluice and the CPU operations on them. This crate knows
//! nothing of the wire protocol, the async runtime or the backends.
#![forbid(unsafe_code)]

pub mod detect;
pub mod filter;
pub mod image_ops;
pub mod memory;
pub mod ocr;
pub mod op;
pub mod tensor;
pub mod tensor_ops;
pub mod value;

// The byte buffer of `Value::Bytes` and `Tensor::data`: ops of users' own crates need
// no `bytes` dependency of a matching version.
pub use bytes::Bytes;
pub use op::{BuildContext, Op, OpError, OpRegistry, OpSpec, Port};
pub use tensor::{DataType, Tensor, TensorError};
pub use value::{Image, Value, ValueType};
