//! The checkpoint thread: makes sled's copy of the index durable in the background.
//!
//! A commit is durable once its segment frames are synced, so sled's own flush (which costs
//! two or three device syncs of its own) stays off the commit path: the writer applies each
//! commit's batch to sled in memory, with the log position it reaches (`P`), and this thread
//! flushes sled at most every [`INTERVAL`] (sooner once [`MAX_LOG_BYTES`] were written since
//! the last checkpoint, which bounds how much a restart replays). Only then may a segment file
//! that no index entry names any more be deleted: before, a crash would bring back the index
//! of an older `P`, whose replay needs that file.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::segment::Segments;
use crate::writer::fail;
use crate::{Counters, FsyncMode, Result, Shared, StoreError, failpoint, io_error};

/// The longest sled's durable copy lags the log...
const INTERVAL: Duration = Duration::from_millis(200);
/// ...or this many bytes of log, whichever comes first.
const MAX_LOG_BYTES: u64 = 32 << 20;

/// The writer's handle on the checkpoint thread.
pub(crate) struct Checkpointer {
    pending: Arc<(Mutex<Pending>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

/// What the writer applied since the last checkpoint.
#[derive(Default)]
struct Pending {
    /// When the oldest commit not yet checkpointed was applied.
    dirty_since: Option<Instant>,
    /// Log bytes written since the last checkpoint.
    bytes: u64,
    /// Segment files the applied commits emptied.
    emptied: Vec<u32>,
    stop: bool,
}

impl Checkpointer {
    /// Starts the thread.
    pub(crate) fn start(
        db: sled::Db,
        files: DurableFiles,
        segments: Arc<Segments>,
        fsync: FsyncMode,
        shared: Arc<Shared>,
    ) -> Result<Checkpointer> {
        let pending = Arc::new((Mutex::new(Pending::default()), Condvar::new()));
        let thread = {
            let pending = pending.clone();
            std::thread::Builder::new()
                .name("ferry-store-checkpoint".into())
                .spawn(move || {
                    let mut run = Run {
                        db,
                        files,
                        segments,
                        fsync,
                    };
                    run.loop_until_stopped(&pending, &shared)
                })
                .map_err(|e| {
                    StoreError::Failed(format!("cannot start the checkpoint thread: {e}"))
                })?
        };
        Ok(Checkpointer {
            pending,
            thread: Some(thread),
        })
    }

    /// Records a commit applied to sled: `bytes` of log, and the segment files it emptied.
    pub(crate) fn applied(&self, bytes: u64, emptied: Vec<u32>) {
        let (lock, wake) = &*self.pending;
        let mut pending = lock.lock().expect("checkpoint lock");
        pending.dirty_since.get_or_insert_with(Instant::now);
        pending.bytes += bytes;
        pending.emptied.extend(emptied);
        if pending.bytes >= MAX_LOG_BYTES {
            wake.notify_one();
        }
    }

    /// Takes a last checkpoint of everything applied and stops the thread.
    pub(crate) fn stop(self) {
        drop(self);
    }
}

impl Drop for Checkpointer {
    /// Also when the writer stops early (a failure, a panic): the thread must not outlive it
    /// holding sled open.
    fn drop(&mut self) {
        {
            let (lock, wake) = &*self.pending;
            lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
            wake.notify_one();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Run {
    db: sled::Db,
    files: DurableFiles,
    segments: Arc<Segments>,
    fsync: FsyncMode,
}

impl Run {
    fn loop_until_stopped(&mut self, pending: &(Mutex<Pending>, Condvar), shared: &Shared) {
        let (lock, wake) = pending;
        loop {
            let (emptied, stop) = {
                let mut pending = lock.lock().expect("checkpoint lock");
                loop {
                    let due = pending.dirty_since.map(|since| since + INTERVAL);
                    if pending.stop
                        || pending.bytes >= MAX_LOG_BYTES
                        || due.is_some_and(|due| Instant::now() >= due)
                    {
                        break;
                    }
                    let wait = due.map_or(INTERVAL, |due| due - Instant::now());
                    pending = wake.wait_timeout(pending, wait).expect("checkpoint lock").0;
                }
                pending.dirty_since = None;
                pending.bytes = 0;
                (std::mem::take(&mut pending.emptied), pending.stop)
            };
            if shared.failure.lock().expect("failure lock").is_some() {
                return;
            }
            if let Err(e) = self.checkpoint(&emptied, shared) {
                fail(shared, &e);
                return;
            }
            if stop {
                return;
            }
        }
    }

    /// Makes sled's copy durable up to the last commit applied, then deletes the files it no
    /// longer names.
    fn checkpoint(&mut self, emptied: &[u32], shared: &Shared) -> Result<()> {
        self.db.flush()?;
        shared.counters.synced(1);
        if self.fsync != FsyncMode::Never {
            self.files.sync()?;
        }
        shared
            .counters
            .checkpoints
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        failpoint::hit("checkpointed");
        if !emptied.is_empty() {
            shared.counters.synced(1);
            if let Err(e) = self.segments.remove(emptied) {
                tracing::warn!(error = %e, "cannot delete an emptied segment file; it goes at the next start");
            }
        }
        Ok(())
    }
}

/// The files sled writes that its own `flush()` does not make durable: its log file (flushed
/// with `sync_file_range` only) and blob files (never synced, nor their directory).
pub(crate) struct DurableFiles {
    dir: PathBuf,
    counters: Arc<Counters>,
    log: File,
    blobs: PathBuf,
    synced_blobs: HashSet<OsString>,
}

impl DurableFiles {
    pub(crate) fn open(dir: &Path, counters: Arc<Counters>) -> Result<Self> {
        let path = dir.join("db");
        let log = File::options()
            .read(true)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        Ok(Self {
            dir: dir.to_owned(),
            counters,
            log,
            blobs: dir.join("blobs"),
            synced_blobs: HashSet::new(),
        })
    }

    /// Makes the files' existence durable (sled does not fsync its directories).
    pub(crate) fn sync_directories(&self) -> Result<()> {
        for dir in [&self.dir, &self.blobs] {
            if dir.exists() {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io_error(dir, e))?;
            }
        }
        Ok(())
    }

    /// Makes what sled flushed durable: its log file, and any new blob file with its directory.
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.log
            .sync_data()
            .map_err(|e| io_error(&self.dir.join("db"), e))?;
        self.counters.synced(1);
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error(&self.blobs, e)),
        };
        let mut present = HashSet::new();
        let mut new_blobs = false;
        for entry in entries {
            let entry = entry.map_err(|e| io_error(&self.blobs, e))?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                match File::open(entry.path()).and_then(|f| f.sync_data()) {
                    Ok(()) => {
                        self.counters.synced(1);
                        new_blobs = true;
                    }
                    // sled removes blobs it no longer needs; one gone is one we need not sync.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error(&entry.path(), e)),
                }
            }
            present.insert(name);
        }
        self.synced_blobs = present;
        if new_blobs {
            File::open(&self.blobs)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_error(&self.blobs, e))?;
            self.counters.synced(1);
        }
        Ok(())
    }
}
