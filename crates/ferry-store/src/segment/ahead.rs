//! Zeros written just ahead of the log in the current segment file, while the log grows slowly.
//!
//! On ext4 (and most filesystems), an `fdatasync` after an append also writes the inode, whose
//! size and block map the append changed: a second I/O in series behind the data. Over blocks
//! that already hold synced zeros, the same sync writes the data alone. So while the log takes
//! less than [`SLOW_RATE`], a helper thread keeps up to [`WINDOW`] of synced zeros ahead of it,
//! off the commit path, and a commit of a few messages written over them costs one device
//! write instead of two. (Where the log has outrun the zeros, the next ones start a little
//! ahead of it, and the log fills the gap by appending, as before.)
//! Under heavy load the zeros would double what reaches the disk for nothing (a group's data
//! write then outweighs the inode's), so none are written and the log appends as before.
//!
//! The log never writes where zeros are being written: a write that would reach them waits for
//! them first. A scan already ends the log at zeros, and a discarded group cuts them with it.
//! No zeros are written with less than [`ROOM`] free above the publishing watermark: the space
//! near a full disk is for acks and the index. If the disk fills anyway, the zeros fail to be
//! written, and past the at most [`WINDOW`] already there the log's own appends meet `ENOSPC`,
//! as without them.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use crate::Counters;

/// Below this rate of log writes, zeros are kept ahead.
pub(super) const SLOW_RATE: u64 = 16 << 20;
/// How far ahead the zeros reach...
pub(super) const WINDOW: u64 = 256 << 10;
/// ...and how close the log may come to their end before more are written.
const LOW_WATER: u64 = 64 << 10;
/// Where the log outran the zeros (or none were written yet), the next ones start this far
/// ahead of it, so that the log's next groups do not wait for them.
const SLACK: u64 = 64 << 10;
/// Zeros are written only with this much free space above the publishing watermark.
pub(super) const ROOM: u64 = 16 << 20;
/// How long the rate is measured over.
pub(super) const RATE_WINDOW: Duration = Duration::from_millis(100);
const PAGE: u64 = 4096;

/// Zeros to write into a file, and where to say how it went.
struct Job {
    /// The file is opened again for the zeros: a failed write-back is then reported to the
    /// log's own sync too (Linux reports it once per open file, and the zeros' sync flushes the
    /// log's pages as well).
    path: PathBuf,
    range: Range<u64>,
    done: Sender<std::io::Result<()>>,
}

/// The zeros ahead of the log in the current file; owned by the appender.
pub(super) struct ZeroAhead {
    enabled: bool,
    /// The disk has room for zeros (see [`ROOM`]).
    allowed: bool,
    /// Offsets of the current file below this hold the log or synced zeros (but for a gap of
    /// at most [`SLACK`] where zeros started ahead of a log that had outrun them: the log fills
    /// it by appending).
    zeroed: u64,
    /// Zeros being written now, and the helper's answer.
    job: Option<(Range<u64>, Receiver<std::io::Result<()>>)>,
    /// Writing zeros into the current file failed (a full disk, say): none are tried again
    /// until the next file.
    failed: bool,
    /// The log's bytes since `since`, and whether the last measure found the log slow.
    bytes: u64,
    since: Instant,
    slow: bool,
    /// Bytes of zeros started since the space estimate last asked.
    started: u64,
    helper: Option<Sender<Job>>,
    counters: Arc<Counters>,
}

impl ZeroAhead {
    /// Zeros ahead or not (they serve only where every commit is synced).
    pub(super) fn new(enabled: bool, counters: Arc<Counters>) -> Self {
        Self {
            enabled,
            allowed: true,
            zeroed: 0,
            job: None,
            failed: false,
            bytes: 0,
            since: Instant::now(),
            slow: false,
            started: 0,
            helper: None,
            counters,
        }
    }

    /// Where the current file holds the log or synced zeros up to.
    pub(super) fn zeroed(&self) -> u64 {
        self.zeroed
    }

    /// How many of `len` bytes written at `at` take new blocks: none over zeros written or
    /// being written (their space was counted when they were started).
    pub(super) fn new_blocks(&self, at: u64, len: u64) -> u64 {
        let overlap = |r: &Range<u64>| (at + len).min(r.end).saturating_sub(at.max(r.start));
        let mut over_zeros = overlap(&(0..self.zeroed));
        if let Some((range, _)) = &self.job {
            over_zeros += overlap(range);
        }
        len - over_zeros.min(len)
    }

    /// Whether the disk has room for zeros now.
    pub(super) fn allow(&mut self, allowed: bool) {
        self.allowed = allowed;
    }

    /// Bytes of zeros started since the last call: disk space they take.
    pub(super) fn take_started(&mut self) -> u64 {
        std::mem::take(&mut self.started)
    }

    /// Before the log writes `len` bytes at `at`: waits for zeros being written there.
    pub(super) fn before_write(&mut self, at: u64, len: u64) {
        if self
            .job
            .as_ref()
            .is_some_and(|(range, _)| at + len > range.start)
        {
            self.finish();
        }
    }

    /// After the log reached `end` in `file` (of at most `limit` bytes): measures the rate,
    /// and starts more zeros when the log is slow and near their end.
    pub(super) fn after_write(
        &mut self,
        path: impl FnOnce() -> PathBuf,
        end: u64,
        written: u64,
        limit: u64,
    ) {
        if !self.enabled {
            return;
        }
        self.bytes += written;
        let elapsed = self.since.elapsed();
        if elapsed >= RATE_WINDOW {
            self.slow = self.bytes as f64 / elapsed.as_secs_f64() < SLOW_RATE as f64;
            self.bytes = 0;
            self.since = Instant::now();
        }
        if !self.slow || !self.allowed || self.failed || self.job.is_some() {
            return;
        }
        if self.zeroed >= end && self.zeroed - end >= LOW_WATER {
            return;
        }
        let from = match self.zeroed >= end {
            true => self.zeroed,
            false => (end + SLACK).next_multiple_of(PAGE),
        };
        let to = (from + WINDOW).min(limit);
        if from >= to {
            return;
        }
        let (done, answer) = std::sync::mpsc::channel();
        let job = Job {
            path: path(),
            range: from..to,
            done,
        };
        if self.helper().send(job).is_err() {
            self.failed = true;
            return;
        }
        self.started += to - from;
        self.job = Some((from..to, answer));
    }

    /// Waits for zeros being written; the file then holds them (or, if they failed, holds
    /// what it held).
    pub(super) fn finish(&mut self) {
        let Some((range, answer)) = self.job.take() else {
            return;
        };
        match answer.recv() {
            Ok(Ok(())) => self.zeroed = self.zeroed.max(range.end),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot write zeros ahead of the log; appending");
                self.failed = true;
            }
            Err(_) => self.failed = true,
        }
    }

    /// The log moved to a new file, or its file was cut back to `len`.
    pub(super) fn reset(&mut self, len: u64) {
        self.finish();
        self.zeroed = self.zeroed.min(len);
        self.failed = false;
    }

    fn helper(&mut self) -> &Sender<Job> {
        self.helper.get_or_insert_with(|| {
            let (jobs, queue) = std::sync::mpsc::channel::<Job>();
            let counters = self.counters.clone();
            let spawned = std::thread::Builder::new()
                .name("ferry-store-zeros".into())
                .spawn(move || {
                    let zeros = vec![0u8; 256 << 10];
                    for job in queue {
                        let zeroed = File::options()
                            .write(true)
                            .open(&job.path)
                            .and_then(|file| write_zeros(&file, job.range, &zeros, &counters));
                        let _ = job.done.send(zeroed);
                    }
                });
            // Without the thread the queue is gone with it: sending fails, and the log appends.
            drop(spawned);
            jobs
        })
    }
}

/// Writes zeros over `range` of `file` and syncs them.
fn write_zeros(
    file: &File,
    range: Range<u64>,
    zeros: &[u8],
    counters: &Counters,
) -> std::io::Result<()> {
    let mut at = range.start;
    while at < range.end {
        let n = (range.end - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_data()?;
    counters.synced(1);
    Ok(())
}
