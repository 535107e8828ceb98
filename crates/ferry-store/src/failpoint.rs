//! Crash points for the fault suite, in debug builds only: release builds compile them out.
//!
//! `FERRY_FAILPOINT=NAME:N` makes the process abort the N-th time it reaches the point `NAME`
//! (`NAME` alone: the first time), as if it were killed with SIGKILL at that instant: nothing
//! is flushed or synced on the way out. The points sit between the steps a commit's durability
//! rests on: `segment-written`, `segment-synced`, `synced` (just before the callers are
//! answered) and `index-applied` (after they are, once sled holds the group in memory); and
//! `checkpointed`, after sled's copy is made durable and before the segment files it no longer
//! names are deleted.

/// Aborts here if the fault suite asked for it.
#[cfg(debug_assertions)]
pub(crate) fn hit(name: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static CHOSEN: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let chosen = CHOSEN.get_or_init(|| {
        let spec = std::env::var("FERRY_FAILPOINT").ok()?;
        let (point, nth) = spec.split_once(':').unwrap_or((&spec, "1"));
        Some((point.to_owned(), nth.parse().unwrap_or(1)))
    });
    let Some((point, nth)) = chosen else { return };
    if point == name && HITS.fetch_add(1, Ordering::AcqRel) + 1 == *nth {
        eprintln!("ferry: fail point {name} reached: aborting");
        std::process::abort();
    }
}

/// Release builds: nothing.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub(crate) fn hit(_name: &str) {}
