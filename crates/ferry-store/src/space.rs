//! Free space on the data directory's filesystem: the watermark below which publishing is
//! refused, and the reserve that keeps acks writable when the disk fills up anyway.
//!
//! A monitor thread looks at the filesystem's free space a few times a second. Below the
//! watermark (the larger of `min_free_bytes` and `min_free_percent` of the filesystem), new
//! publishes are refused before they reach the writer, while acks, nacks and deletes go on:
//! they are what frees space. Publishing resumes by itself once free space is back above the
//! watermark.
//!
//! The watermark is not enough when another program fills the disk. For that case the store
//! keeps a reserve file (`data/reserve`, blocks allocated but never written): when the disk is
//! all but full, or a segment write fails with ENOSPC, the reserve is deleted so that sled can
//! still write the ack states and index changes that drain the backlog. Publishing needs the
//! reserve in place, so the space it gave back goes to acks, not to new messages; it is made
//! again (and publishing resumes) once there is room for it above the watermark.
//!
//! When the other program is still writing, the space the reserve gives back may go to it, and
//! the disk ends up full to the last block. sled cannot open then (it writes the rest of its
//! log segment when it opens), so a second, small file (`data/reserve.start`) is kept for a
//! start on a full disk: never released while the store runs, released when it opens on a disk
//! with almost nothing free, and made again once there is room.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::{Result, StoreError, io_error};

/// How often the monitor looks at the filesystem.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// After a write failed with ENOSPC, publishing stays refused at least this long, even if the
/// free bytes look fine (inodes or a quota may be what ran out), so that the groups in between
/// carry acks only and succeed.
const FULL_HOLD: Duration = Duration::from_secs(5);
/// A look that finds the disk all but full looks again this much later, and releases the
/// reserve only if free space did not fall meanwhile by more than this...
const SETTLE: Duration = Duration::from_millis(20);
const SETTLE_TOLERANCE: u64 = 64 << 10;
/// ...or once it has waited this long.
const SETTLE_LIMIT: Duration = Duration::from_millis(250);
/// sled's log file, in the data directory...
const SLED_LOG_FILE: &str = "db";
/// ...and the room kept allocated ahead of its end, while a reserve is kept at all.
const SLED_HEADROOM: u64 = 4 << 20;
/// The reserve kept for opening the store on a full disk (when a reserve is kept at all).
const START_RESERVE: u64 = 1 << 20;
const START_RESERVE_FILE: &str = "reserve.start";
/// With less free space than this (or than half the reserve) a disk counts as full.
const NEARLY_FULL: u64 = 1 << 20;
/// Fewer free inodes than this count as a full disk: a new segment file could not be created.
const MIN_FREE_INODES: u64 = 64;

/// The free-space settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceOptions {
    /// Publishing is refused while free space is below the larger of this...
    pub min_free_bytes: u64,
    /// ...and this percentage of the filesystem's size.
    pub min_free_percent: u8,
    /// The reserve kept for acks and index changes when the disk fills up anyway (0: none).
    pub reserve_bytes: u64,
}

impl Default for SpaceOptions {
    fn default() -> Self {
        Self {
            min_free_bytes: 1 << 30,
            min_free_percent: 5,
            reserve_bytes: 64 << 20,
        }
    }
}

/// What the monitor last saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceReport {
    /// Free bytes on the data directory's filesystem (for unprivileged users).
    pub free: u64,
    /// The watermark in force: the configured one, plus the reserve while it is released.
    pub watermark: u64,
    /// True while publishing is refused.
    pub low: bool,
}

/// The data directory's free space, shared by the monitor thread, the writer and the broker.
pub(crate) struct Space {
    dir: PathBuf,
    reserve: PathBuf,
    options: SpaceOptions,
    free: AtomicU64,
    watermark: AtomicU64,
    low: AtomicBool,
    /// Bytes the writer wrote since the last probe: between probes, free space is taken to be
    /// what was probed less this, so a fast publisher cannot overshoot the watermark by a
    /// probe interval's worth.
    written: AtomicU64,
    reserved: AtomicBool,
    /// The start-up reserve is in place.
    start_reserved: AtomicBool,
    /// Since when the monitor has held the reserve back while free space fell.
    settling_since: Mutex<Option<std::time::Instant>>,
    /// The monitor runs (before it does, the store is opening: the reserve goes at once).
    monitoring: AtomicBool,
    /// When a write last failed with ENOSPC.
    failed_at: Mutex<Option<std::time::Instant>>,
    /// Set (and the condvar below notified) when a publish was refused on the estimate alone:
    /// the monitor looks at the disk at once. A wake-up lost to a race waits one round.
    probe_now: AtomicBool,
    /// Set (and the condvar notified) to stop the monitor.
    stop: (Mutex<bool>, Condvar),
    /// sled's log file, once it exists, held open for [`Space::keep_sled_headroom`].
    sled_log: Mutex<Option<std::fs::File>>,
}

impl Space {
    /// Looks at the filesystem once (releasing the reserves if the disk is full, so that opening
    /// the store can write) and returns the shared state; [`Space::monitor`] keeps it current.
    pub(crate) fn open(dir: &Path, options: SpaceOptions) -> Result<Arc<Space>> {
        let start_reserve = dir.join(START_RESERVE_FILE);
        // A reserve cut short by a crash while it was made does not count: it goes, and is made
        // again whole.
        let reserve = dir.join("reserve");
        for (path, size) in [
            (&start_reserve, START_RESERVE),
            (&reserve, options.reserve_bytes),
        ] {
            if std::fs::metadata(path).is_ok_and(|m| m.len() < size) {
                let _ = std::fs::remove_file(path);
            }
        }
        if start_reserve.exists() && probe(dir).is_ok_and(|(free, ..)| free < NEARLY_FULL) {
            match std::fs::remove_file(&start_reserve) {
                Ok(()) => tracing::warn!(
                    "the disk is full: released the start-up reserve so that the store can open"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot delete the start-up reserve file"),
            }
        }
        let space = Arc::new(Space {
            dir: dir.to_owned(),
            reserve: reserve.clone(),
            options,
            free: AtomicU64::new(u64::MAX),
            watermark: AtomicU64::new(0),
            low: AtomicBool::new(false),
            written: AtomicU64::new(0),
            reserved: AtomicBool::new(reserve.exists()),
            start_reserved: AtomicBool::new(start_reserve.exists()),
            settling_since: Mutex::new(None),
            monitoring: AtomicBool::new(false),
            failed_at: Mutex::new(None),
            probe_now: AtomicBool::new(false),
            stop: (Mutex::new(false), Condvar::new()),
            sled_log: Mutex::new(None),
        });
        space.refresh()?;
        Ok(space)
    }

    /// Starts the monitor thread; it runs until [`Space::stop`].
    pub(crate) fn monitor(self: &Arc<Self>) -> Result<()> {
        self.monitoring.store(true, Ordering::Release);
        let space = self.clone();
        std::thread::Builder::new()
            .name("ferry-store-space".into())
            .spawn(move || {
                loop {
                    if let Err(e) = space.refresh() {
                        tracing::warn!(error = %e, "cannot read the data directory's free space");
                    }
                    let (stopped, wake) = &space.stop;
                    let guard = stopped.lock().expect("space stop lock");
                    let (guard, _) = wake
                        .wait_timeout_while(guard, PROBE_EVERY, |stopped| {
                            !*stopped && !space.probe_now.swap(false, Ordering::AcqRel)
                        })
                        .expect("space stop lock");
                    if *guard {
                        return;
                    }
                }
            })
            .map(drop)
            .map_err(|e| io_error(&self.dir, e))
    }

    /// Stops the monitor thread.
    pub(crate) fn stop(&self) {
        let (stopped, wake) = &self.stop;
        *stopped.lock().expect("space stop lock") = true;
        wake.notify_all();
    }

    /// What was seen last, less what was written since.
    pub(crate) fn report(&self) -> SpaceReport {
        let free = self
            .free
            .load(Ordering::Acquire)
            .saturating_sub(self.written.load(Ordering::Acquire));
        let watermark = self.watermark.load(Ordering::Acquire);
        SpaceReport {
            free,
            watermark,
            low: self.low.load(Ordering::Acquire) || free < watermark,
        }
    }

    /// Counts bytes the writer put on disk since the last probe.
    pub(crate) fn wrote(&self, bytes: u64) {
        self.written.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Refuses a publish while free space is below the watermark (raised by the reserve's size
    /// while the reserve is released).
    pub(crate) fn check(&self) -> Result<()> {
        let report = self.report();
        // The estimate between two looks only falls: when it alone refuses, the monitor looks
        // at the disk at once rather than at its next round, so that a refusal the disk does
        // not bear out is lifted within moments. (The look stays the monitor's: it may make or
        // release the reserve, which is no work for a publish.)
        if report.low && !self.low.load(Ordering::Acquire) {
            self.probe_now.store(true, Ordering::Release);
            self.stop.1.notify_all();
        }
        if !report.low {
            return Ok(());
        }
        if report.free < report.watermark {
            return Err(StoreError::NoSpace {
                free: report.free,
                watermark: report.watermark,
            });
        }
        // Bytes are there, but a write just failed or inodes ran out.
        Err(StoreError::DiskFull {
            path: self.dir.clone(),
        })
    }

    /// A write failed with ENOSPC, or the writer found the disk all but full while its writes
    /// could not tell (see [`Space::nearly_full`]): the disk filled faster than the monitor
    /// looked. Publishing stops at once and the reserve goes, so that acks can still be written.
    pub(crate) fn disk_full(&self) {
        *self.failed_at.lock().expect("failed_at lock") = Some(std::time::Instant::now());
        if !self.low.swap(true, Ordering::AcqRel) {
            tracing::warn!(dir = %self.dir.display(), "the disk is full: refusing publishes; acks, nacks and deletes go on");
        }
        self.release_reserve();
        let _ = self.refresh();
    }

    /// Whether the filesystem is all but full, by a fresh look: what the writer asks while it
    /// writes into preallocated blocks, where no write fails with ENOSPC to tell it. sled
    /// still needs new blocks, and must find the reserve released before it does.
    pub(crate) fn nearly_full(&self) -> bool {
        let margin = (self.options.reserve_bytes / 2).max(NEARLY_FULL);
        probe(&self.dir).is_ok_and(|(free, _, inodes_out)| free < margin || inodes_out)
    }

    /// Whether a recent ENOSPC still holds publishing back.
    fn failed_recently(&self) -> bool {
        let mut failed_at = self.failed_at.lock().expect("failed_at lock");
        match *failed_at {
            Some(at) if at.elapsed() < FULL_HOLD => true,
            Some(_) => {
                *failed_at = None;
                false
            }
            None => false,
        }
    }

    /// Whether the reserve may go now, with free space as last seen. While another program is
    /// still filling the disk, what the reserve gives back would go to it, so the monitor looks
    /// again [`SETTLE`] later and releases it once free space stopped falling (by more than the
    /// store's own writes could take), or once it has waited [`SETTLE_LIMIT`]: sled must find
    /// room before it needs it. At open it goes at once. (A failed write of the store's own
    /// releases it at once too: see `disk_full`.)
    fn settled(&self, free: u64) -> Result<(bool, u64)> {
        if !self.monitoring.load(Ordering::Acquire) {
            return Ok((true, free));
        }
        let waited = (self.settling_since.lock().expect("settling lock"))
            .get_or_insert_with(std::time::Instant::now)
            .elapsed();
        std::thread::sleep(SETTLE);
        let again = probe(&self.dir)?.0;
        let falling = free.saturating_sub(again) > SETTLE_TOLERANCE;
        Ok((!falling || waited >= SETTLE_LIMIT, again))
    }

    /// Looks at the filesystem and applies what it shows.
    fn refresh(&self) -> Result<()> {
        let options = &self.options;
        // Reset first: bytes written during the probe are then counted twice, never missed.
        self.written.store(0, Ordering::Release);
        let (mut free, total, inodes_out) = probe(&self.dir)?;
        let mut watermark = options
            .min_free_bytes
            .max(total / 100 * u64::from(options.min_free_percent));
        let reserve = options.reserve_bytes;
        if reserve > 0 {
            let reserved = self.reserved.load(Ordering::Acquire);
            if reserved && free < reserve / 2 {
                let (settled, now_free) = self.settled(free)?;
                free = now_free;
                if settled {
                    self.release_reserve();
                    free = probe(&self.dir)?.0;
                } else {
                    self.probe_now.store(true, Ordering::Release);
                }
            // Made again only with half a reserve to spare beyond it: just after a release, free
            // space is what was left plus the reserve, and where the watermark is under half
            // the reserve, making it again at once would take it straight back and release it
            // at the next look, over and over.
            } else if !reserved
                && free >= watermark.saturating_add(reserve + reserve / 2)
                && !inodes_out
            {
                self.make_reserve();
                free = probe(&self.dir)?.0;
            }
            if !self.reserved.load(Ordering::Acquire) {
                watermark = watermark.saturating_add(reserve);
            } else if !self.start_reserved.load(Ordering::Acquire)
                && free >= watermark.saturating_add(reserve / 2 + START_RESERVE)
                && !inodes_out
            {
                self.make_start_reserve();
                free = probe(&self.dir)?.0;
            }
        }
        if reserve > 0 && free >= watermark.saturating_add(SLED_HEADROOM) {
            self.keep_sled_headroom();
        }
        self.free.store(free, Ordering::Release);
        self.watermark.store(watermark, Ordering::Release);
        let low = free < watermark || inodes_out || self.failed_recently();
        let was_low = self.low.swap(low, Ordering::AcqRel);
        let mib = |bytes: u64| bytes >> 20;
        if low && !was_low {
            tracing::warn!(
                dir = %self.dir.display(),
                free_mib = mib(free),
                watermark_mib = mib(watermark),
                "free space is below the watermark (storage.min_free_bytes, storage.min_free_percent): \
                 refusing publishes; acks, nacks and deletes go on and free space"
            );
        } else if !low && was_low {
            tracing::info!(
                free_mib = mib(free),
                watermark_mib = mib(watermark),
                "free space is above the watermark again: accepting publishes"
            );
        }
        Ok(())
    }

    /// Keeps blocks allocated (past its end, its size unchanged) for the next [`SLED_HEADROOM`]
    /// of sled's log file. sled writes its log from its I/O threads whenever a buffer fills,
    /// and an `ENOSPC` there is sticky: the store would stop. A program that fills the disk
    /// between two looks would win that race against the reserve's release; over blocks
    /// already its own, sled's writes cannot fail for space.
    fn keep_sled_headroom(&self) {
        use std::os::unix::fs::MetadataExt as _;
        let mut held = self.sled_log.lock().expect("sled log lock");
        if held.is_none() {
            // Before the store's first start it does not exist yet.
            let path = self.dir.join(SLED_LOG_FILE);
            *held = std::fs::OpenOptions::new().write(true).open(&path).ok();
        }
        let Some(file) = held.as_ref() else {
            return;
        };
        let Ok(metadata) = file.metadata() else {
            return;
        };
        let allocated = metadata.blocks() * 512;
        if allocated >= metadata.len() + SLED_HEADROOM / 2 {
            return;
        }
        let keep = rustix::fs::FallocateFlags::KEEP_SIZE;
        if let Err(e) = rustix::fs::fallocate(file, keep, 0, metadata.len() + SLED_HEADROOM) {
            tracing::debug!(error = %e, "cannot allocate room ahead of sled's log");
        }
    }

    fn release_reserve(&self) {
        self.reserved.store(false, Ordering::Release);
        *self.settling_since.lock().expect("settling lock") = None;
        match std::fs::remove_file(&self.reserve) {
            Ok(()) => tracing::warn!(
                reserve_mib = self.options.reserve_bytes >> 20,
                "the disk is nearly full: released the reserve so that acks can still be written"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "cannot delete the reserve file"),
        }
    }

    /// Allocates the start-up reserve (see the module's doc).
    fn make_start_reserve(&self) {
        let path = self.dir.join(START_RESERVE_FILE);
        match allocate(&path, START_RESERVE) {
            Ok(()) => self.start_reserved.store(true, Ordering::Release),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                tracing::debug!(error = %e, "cannot allocate the start-up reserve; trying again later");
            }
        }
    }

    /// Allocates the reserve's blocks.
    fn make_reserve(&self) {
        let made = allocate(&self.reserve, self.options.reserve_bytes);
        match made {
            Ok(()) => {
                self.reserved.store(true, Ordering::Release);
                tracing::debug!(
                    reserve_mib = self.options.reserve_bytes >> 20,
                    "reserve file allocated"
                );
            }
            Err(e) => {
                let _ = std::fs::remove_file(&self.reserve);
                tracing::warn!(error = %e, "cannot allocate the reserve file; trying again later");
            }
        }
    }
}

/// Creates `path` with `bytes` allocated (written as zeros where the filesystem cannot allocate
/// without writing).
fn allocate(path: &Path, bytes: u64) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, bytes) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => {
            let zeros = vec![0; 1 << 20];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                std::io::Write::write_all(&mut file, &zeros[..n])?;
                left -= n as u64;
            }
            file.sync_all()
        }
        Err(e) => Err(e.into()),
    }
}

/// Free and total bytes of the filesystem holding `dir`.
/// Free and total bytes of the filesystem holding `dir`, and whether it is out of inodes
/// (filesystems that do not count inodes report none at all, which is not "out").
fn probe(dir: &Path) -> Result<(u64, u64, bool)> {
    #[cfg(debug_assertions)]
    if let Some((free, total)) = test_probe() {
        return Ok((free, total, false));
    }
    let stats = rustix::fs::statvfs(dir).map_err(|e| io_error(dir, e.into()))?;
    Ok((
        stats.f_bavail.saturating_mul(stats.f_frsize),
        stats.f_blocks.saturating_mul(stats.f_frsize),
        stats.f_files > 0 && stats.f_favail < MIN_FREE_INODES,
    ))
}

/// Debug builds only (the integration tests use it where no small filesystem can be mounted):
/// `FERRY_TEST_FREE_SPACE` names a file holding "FREE TOTAL" in bytes, read instead of the
/// filesystem's own figures.
#[cfg(debug_assertions)]
fn test_probe() -> Option<(u64, u64)> {
    let path = std::env::var_os("FERRY_TEST_FREE_SPACE")?;
    let text = std::fs::read_to_string(path).ok()?;
    let mut numbers = text.split_whitespace().map(str::parse::<u64>);
    Some((numbers.next()?.ok()?, numbers.next()?.ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_cut_short_by_a_crash_are_made_again_whole() {
        let dir = tempfile::tempdir().unwrap();
        let options = SpaceOptions {
            min_free_bytes: 1 << 20,
            min_free_percent: 0,
            reserve_bytes: 4 << 20,
        };
        // A crash between creating the files and allocating their blocks.
        std::fs::File::create(dir.path().join("reserve")).unwrap();
        std::fs::File::create(dir.path().join(START_RESERVE_FILE)).unwrap();
        let space = Space::open(dir.path(), options).unwrap();
        let size = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().len();
        assert_eq!(size("reserve"), 4 << 20);
        assert_eq!(size(START_RESERVE_FILE), START_RESERVE);
        assert!(space.reserved.load(Ordering::Acquire));
        assert!(space.start_reserved.load(Ordering::Acquire));
    }
}
