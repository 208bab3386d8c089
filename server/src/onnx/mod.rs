//! ONNX files without a runtime: reading a model's signature (inputs, outputs,
//! metadata) from its protobuf, and the exact graph rewrites applied before ONNX Runtime
//! loads it. Leaves: nothing else of the server is imported here.

pub mod fold;
pub mod signature;
