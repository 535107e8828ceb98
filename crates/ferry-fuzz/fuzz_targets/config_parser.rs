//! The configuration parser and its checks, on arbitrary text: an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    if let Ok(text) = std::str::from_utf8(bytes)
        && let Ok(config) = ferry_server::Config::parse(text, "fuzz")
    {
        let _ = config.broker_options();
        let _ = config.declarations();
    }
});
