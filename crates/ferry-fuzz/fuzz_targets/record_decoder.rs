//! Every decoder of what the store reads back from disk (message records, record headers,
//! ack states, channel and subscription records, index values), on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    ferry_store::fuzzing::decode_stored(bytes);
});
