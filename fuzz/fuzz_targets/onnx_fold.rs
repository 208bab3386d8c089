//! ONNX files through the graph rewrite that runs before ONNX Runtime loads a model.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_server::fuzzing::target("onnx_fold")(data));
