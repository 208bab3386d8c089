//! Encoded images as clients send them, through decode_image.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_server::fuzzing::target("decode_image")(data));
