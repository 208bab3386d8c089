//! HTTP infer bodies (JSON, or JSON plus binary tensors); the first byte says whether an
//! Inference-Header-Content-Length header is sent and the next four its value.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_server::fuzzing::target("http_infer")(data));
