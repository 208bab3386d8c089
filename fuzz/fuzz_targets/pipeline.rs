//! Pipeline files, compiled.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_server::fuzzing::target("pipeline")(data));
