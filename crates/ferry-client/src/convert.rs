//! Conversions between the client's types and the wire's.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A duration as the wire carries it.
pub(crate) fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// A wire duration (absent or negative: zero).
pub(crate) fn from_duration(d: Option<prost_types::Duration>) -> Duration {
    d.map_or(Duration::ZERO, |d| {
        let seconds = u64::try_from(d.seconds).unwrap_or(0);
        Duration::new(seconds, u32::try_from(d.nanos).unwrap_or(0))
    })
}

/// A time as the wire carries it.
pub(crate) fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: since.subsec_nanos() as i32,
    }
}

/// A wire time (absent: the Unix epoch).
pub(crate) fn time(t: Option<prost_types::Timestamp>) -> SystemTime {
    let since = t.map_or(Duration::ZERO, |t| {
        Duration::new(
            u64::try_from(t.seconds).unwrap_or(0),
            u32::try_from(t.nanos).unwrap_or(0),
        )
    });
    // Absurd times from a peer saturate instead of panicking.
    UNIX_EPOCH.checked_add(since).unwrap_or(UNIX_EPOCH)
}
