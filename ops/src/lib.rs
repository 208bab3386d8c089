//! The values that flow through sluice and the CPU operations on them. This crate knows
//! nothing of the wire protocol, the async runtime or the backends.

pub mod tensor;

pub use tensor::{DataType, Tensor, TensorError};
