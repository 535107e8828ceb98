//! A publish request as the server decodes it from the wire, through the conversion and every
//! check the broker makes before it stores a batch.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    ferry_server::fuzz_publish_request(bytes);
});
