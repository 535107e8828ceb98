//! sled as the writer sees it: each commit's index writes wait, and are applied to sled
//! several commits at a time.
//!
//! A commit is durable once its frames in the segment log are synced; its sled batch only
//! indexes it. Applying a batch costs sled a fixed ~0.25 ms whatever it holds (it rolls its
//! log buffer twice and wakes each of its seven I/O threads in turn), which was a fifth of
//! the writer's time per commit with one 1 KiB publisher. So batches wait up to a lag (10 ms by
//! default, or [`WAITING_LOG_BYTES`] of log) and go to sled merged into one. Until then:
//! - every read the writer makes goes through [`Index`], which reads sled under the waiting
//!   writes ([`Overlay`]), so planning sees exactly what one batch per commit would show it;
//! - the channels' tail caches keep the messages not yet indexed (readers below the tail go to
//!   sled, which indexes everything below it);
//! - a crash loses nothing: recovery replays the log from sled's durable position, which only
//!   moves with what sled holds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sled::IVec;

use crate::ChannelLog;
use crate::batch::{Batch, Entries, Overlay, Read};

/// Index writes wait at most `StoreOptions::index_lag` (10 ms by default), or until the
/// commits waiting wrote this many bytes of log, whichever comes first. Their
/// messages stay in the tail caches until then, so it bounds what the caches may hold past
/// their budget.
const WAITING_LOG_BYTES: u64 = 8 << 20;

/// sled, and the writes of the commits it does not hold yet.
pub(super) struct Index {
    db: sled::Db,
    lag: Duration,
    waiting: Option<Waiting>,
}

/// The index writes of commits made since sled was last brought up to date, and what to do
/// once it is.
pub(super) struct Waiting {
    /// Their writes, merged: a later commit's write of a key replaces an earlier one's.
    pub(super) batch: Batch,
    /// When the first of them committed.
    since: Instant,
    /// Their bytes of log, for the checkpoint thread.
    pub(super) log_bytes: u64,
    /// Segment files they emptied: deleted once a checkpoint covers them.
    pub(super) emptied: Vec<u32>,
    /// The logs they appended to, with their new ends: the tails may let go below those.
    pub(super) ends: Vec<(Arc<ChannelLog>, u64)>,
}

impl Index {
    /// sled, with nothing waiting; writes wait up to `lag`.
    pub(super) fn new(db: sled::Db, lag: Duration) -> Self {
        Self {
            db,
            lag,
            waiting: None,
        }
    }

    /// sled itself: for what reads it on its own (channel logs, below their tails), and for
    /// writes made once [`Index::take`] left nothing waiting.
    pub(super) fn sled(&self) -> &sled::Db {
        &self.db
    }

    /// Adds a committed group's writes to those waiting.
    pub(super) fn defer(
        &mut self,
        batch: Batch,
        log_bytes: u64,
        emptied: Vec<u32>,
        ends: Vec<(Arc<ChannelLog>, u64)>,
    ) {
        if batch.is_empty() && emptied.is_empty() && ends.is_empty() {
            return;
        }
        let waiting = self.waiting.get_or_insert_with(|| Waiting {
            batch: Batch::default(),
            since: Instant::now(),
            log_bytes: 0,
            emptied: Vec::new(),
            ends: Vec::new(),
        });
        waiting.batch.append(batch);
        waiting.log_bytes += log_bytes;
        waiting.emptied.extend(emptied);
        waiting.ends.extend(ends);
    }

    /// When what waits must be applied, if anything waits.
    pub(super) fn due(&self) -> Option<Instant> {
        let waiting = self.waiting.as_ref()?;
        if waiting.log_bytes >= WAITING_LOG_BYTES {
            return Some(waiting.since);
        }
        Some(waiting.since + self.lag)
    }

    /// The writes waiting, to apply now; none wait afterwards.
    pub(super) fn take(&mut self) -> Option<Waiting> {
        self.waiting.take()
    }

    fn overlay(&self) -> Option<Overlay<'_>> {
        let waiting = self.waiting.as_ref()?;
        Some(Overlay {
            db: &self.db,
            waiting: &waiting.batch,
        })
    }
}

impl Read for Index {
    fn get(&self, key: &[u8]) -> sled::Result<Option<IVec>> {
        match self.overlay() {
            Some(overlay) => overlay.get(key),
            None => self.db.get(key),
        }
    }

    fn range(&self, from: &[u8], to: &[u8]) -> Entries<'_> {
        match self.overlay() {
            Some(overlay) => overlay.range(from, to),
            None => Read::range(&*self.db, from, to),
        }
    }

    fn last_below(&self, from: &[u8], to: &[u8]) -> sled::Result<Option<(IVec, IVec)>> {
        match self.overlay() {
            Some(overlay) => overlay.last_below(from, to),
            None => self.db.last_below(from, to),
        }
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Entries<'_> {
        match self.overlay() {
            Some(overlay) => overlay.scan_prefix(prefix),
            None => Read::scan_prefix(&*self.db, prefix),
        }
    }
}
