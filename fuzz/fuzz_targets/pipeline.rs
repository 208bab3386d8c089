//! Pipeline files, compiled.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        sluice_server::fuzzing::pipeline(text);
    }
});
