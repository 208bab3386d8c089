//! Protobuf ModelInferRequest messages, decoded and turned into engine requests.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_server::fuzzing::target("grpc_infer")(data));
