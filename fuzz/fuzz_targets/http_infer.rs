//! HTTP infer bodies (JSON, or JSON plus binary tensors); the first byte says whether an
//! Inference-Header-Content-Length header is sent and the next four its value.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (header, body) = match data.split_first() {
        Some((&flag, rest)) if flag & 1 == 1 && rest.len() >= 4 => {
            let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) % (rest.len() as u32 + 8);
            (Some(n.to_string()), &rest[4..])
        }
        Some((_, rest)) => (None, rest),
        None => (None, data),
    };
    sluice_server::fuzzing::http_infer(header.as_deref().map(str::as_bytes), body);
});
