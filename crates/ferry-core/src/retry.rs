//! Retry policies: how long a failed delivery waits before its message is delivered again,
//! and what a subscription's retry settings may be.

use std::time::Duration;

use ferry_store::RetryPolicy;

/// The wait before the first retry when a policy is given without one.
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// The longest wait when a policy is given without one.
pub const DEFAULT_RETRY_MAXIMUM: Duration = Duration::from_secs(600);
/// The growth per retry when a policy is given without one.
pub const DEFAULT_RETRY_MULTIPLIER: f64 = 2.0;
/// The longest wait a policy may ask for.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(24 * 3600);
/// The most delivery attempts a subscription may allow before dead-lettering.
pub const MAX_DELIVERY_ATTEMPTS: u32 = 1_000_000;

/// The wait before retry number `retry` (1 for the first): `min(maximum, initial ×
/// multiplier^(retry-1))`, then moved by up to ± `jitter` of itself, as `random` (uniform in
/// 0..1) says.
pub(crate) fn backoff(policy: &RetryPolicy, retry: u32, random: f64) -> Duration {
    if policy.initial_ms == 0 {
        return Duration::ZERO;
    }
    let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
    let grown = policy.initial_ms as f64 * policy.multiplier.powi(exponent);
    let base = grown.min(policy.maximum_ms as f64);
    let jittered = base * (1.0 + policy.jitter * (2.0 * random - 1.0));
    Duration::from_millis(jittered.max(0.0).round() as u64)
}

/// Why a retry policy cannot be used, naming the field; `None` if it can.
pub(crate) fn check(policy: &RetryPolicy) -> Option<String> {
    let max = MAX_RETRY_WAIT.as_millis() as u64;
    if !(policy.multiplier.is_finite() && policy.multiplier >= 1.0) {
        return Some(format!(
            "retry.multiplier is {}: it must be at least 1 (each wait is at least as long as \
             the one before)",
            policy.multiplier
        ));
    }
    if !(0.0..=1.0).contains(&policy.jitter) {
        return Some(format!(
            "retry.jitter is {}: it must be a fraction from 0 to 1",
            policy.jitter
        ));
    }
    if policy.maximum_ms > max {
        return Some(format!(
            "retry.maximum is {} ms: it may be at most {max} ms (24 h)",
            policy.maximum_ms
        ));
    }
    if policy.initial_ms > policy.maximum_ms {
        return Some(format!(
            "retry.initial ({} ms) is longer than retry.maximum ({} ms)",
            policy.initial_ms, policy.maximum_ms
        ));
    }
    None
}

/// A small, fast pseudo-random source for jitter (xorshift64*): not for anything secret.
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// Uniform in 0..1.
    pub(crate) fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        bits as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(initial_ms: u64, maximum_ms: u64, multiplier: f64, jitter: f64) -> RetryPolicy {
        RetryPolicy {
            initial_ms,
            maximum_ms,
            multiplier,
            jitter,
        }
    }

    #[test]
    fn waits_grow_by_the_multiplier_up_to_the_maximum() {
        let p = policy(100, 1000, 3.0, 0.0);
        let waits: Vec<u64> = (1..=5)
            .map(|n| backoff(&p, n, 0.5).as_millis() as u64)
            .collect();
        assert_eq!(waits, [100, 300, 900, 1000, 1000]);
        assert_eq!(backoff(&RetryPolicy::default(), 7, 0.9), Duration::ZERO);
        assert_eq!(backoff(&p, u32::MAX, 0.5), Duration::from_secs(1));
    }

    #[test]
    fn jitter_moves_a_wait_by_at_most_its_fraction() {
        let p = policy(1000, 1000, 1.0, 0.2);
        assert_eq!(backoff(&p, 1, 0.0), Duration::from_millis(800));
        assert_eq!(backoff(&p, 1, 0.5), Duration::from_millis(1000));
        let mut random = Jitter::new(42);
        for _ in 0..1000 {
            let r = random.next();
            assert!((0.0..1.0).contains(&r));
            let wait = backoff(&p, 1, r).as_millis();
            assert!((800..=1200).contains(&wait), "{wait}");
        }
    }

    #[test]
    fn bad_policies_name_their_field() {
        assert!(check(&policy(0, 0, 1.0, 0.0)).is_none());
        assert!(
            check(&policy(10, 5, 2.0, 0.0))
                .unwrap()
                .contains("retry.initial")
        );
        assert!(
            check(&policy(1, 5, 0.5, 0.0))
                .unwrap()
                .contains("retry.multiplier")
        );
        assert!(
            check(&policy(1, 5, f64::NAN, 0.0))
                .unwrap()
                .contains("retry.multiplier")
        );
        assert!(
            check(&policy(1, 5, 2.0, 1.5))
                .unwrap()
                .contains("retry.jitter")
        );
        assert!(
            check(&policy(1, u64::MAX, 2.0, 0.0))
                .unwrap()
                .contains("retry.maximum")
        );
    }
}
