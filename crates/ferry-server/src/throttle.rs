//! Log lines that clients can cause at will (refused credentials, failed TLS handshakes) are
//! written at most once a second per kind, each saying how many were left out since: a flood
//! of bad clients must not become a flood of log.

use std::sync::atomic::{AtomicU64, Ordering};

/// One kind of log line, throttled.
pub(crate) struct Throttle {
    /// The second (since the Unix epoch) of the last line written.
    last: AtomicU64,
    left_out: AtomicU64,
}

impl Throttle {
    /// A throttle that has written nothing yet.
    pub(crate) const fn new() -> Throttle {
        Throttle {
            last: AtomicU64::new(0),
            left_out: AtomicU64::new(0),
        }
    }

    /// Some(lines left out since the last one) if a line may be written now; None if not (it
    /// is counted).
    pub(crate) fn pass(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last.load(Ordering::Relaxed);
        let first_this_second = last != now
            && (self.last)
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if first_this_second {
            Some(self.left_out.swap(0, Ordering::Relaxed))
        } else {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Throttle;

    #[test]
    fn one_line_a_second_and_the_count_of_the_rest() {
        let throttle = Throttle::new();
        assert_eq!(throttle.pass(), Some(0));
        assert_eq!(throttle.pass(), None);
        assert_eq!(throttle.pass(), None);
        // A second later (pretended), the next line says two were left out.
        throttle.last.store(0, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(throttle.pass(), Some(2));
    }
}
