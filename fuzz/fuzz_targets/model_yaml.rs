//! model.yaml files, parsed and checked.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_server::fuzzing::target("model_yaml")(data));
