//! Ack id parsing on arbitrary text, and the round trip of every id the broker issues.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: (&str, u32, u64, u64)| {
    let (text, subscription, seq, delivery) = input;
    ferry_core::fuzz_ack_id(text, subscription, seq, delivery);
});
