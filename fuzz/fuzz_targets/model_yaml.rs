//! model.yaml files, parsed and checked.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        sluice_server::fuzzing::model_yaml(text);
    }
});
