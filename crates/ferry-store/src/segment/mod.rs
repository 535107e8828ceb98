//! Segment files: the store's write-ahead log, appended once and deleted whole.
//!
//! Every commit is appended to the current segment file (`segments/NNNNNNNNNN.seg`): its
//! message records, then a commit frame with everything else it changed (see `change.rs`).
//! A commit never spans two files; once a file passes the segment size the next commit
//! starts a new one. The index in sled says where each record is and how many indexed records
//! each segment still holds; when that falls to zero, and the index's durable position has
//! moved past the file, the file is deleted, which is how disk space comes back after a
//! backlog drains.
//!
//! A commit is durable once its frames are `fdatasync`'d (with `fsync = "always"`); sled learns
//! of it right after, in memory, and makes it durable in the background. After a restart,
//! writing resumes in a new file, so a torn tail of the old current file is never appended to.
//!
//! Segment files can be preallocated: a background thread keeps the next file ready, written
//! full of zeros (straight to the device where the filesystem allows direct I/O, then read
//! back into the page cache, clean) and synced (`*.spare`), and a roll renames it into place.
//! Writing over blocks that already exist changes no file size and no extent, so an
//! `fdatasync` flushes the data alone, without a journal commit. The first file after a start
//! is a plain one. A scan takes zeros where a frame would start as the end of the log, and a
//! frame that a crash cut short over zeros as a torn write; a finished file is cut to its
//! length when the next one starts.

mod ahead;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::codec::{FrameKind, RECORD_HEADER_LEN, RecordHeader, RecordLocation};
use crate::{Counters, Result, StoreError, io_error};

/// The segment files of one store.
pub(crate) struct Segments {
    dir: PathBuf,
    /// Open handles for reading, by segment id.
    readers: Mutex<HashMap<u32, Arc<File>>>,
}

/// How the preallocated files being prepared are named: `PID-N.spare`, unique to each, so that
/// a preparation outliving its store (stopped, and opened again in the same process) can never
/// write into a file a later one took.
const SPARE_SUFFIX: &str = ".spare";
/// The zeros of a spare are written this much at a time...
const ZERO_CHUNK: usize = 1 << 20;
/// ...from a buffer aligned to this, as direct I/O wants.
const DIRECT_ALIGN: usize = 4096;
/// A spare is prepared only while the disk has this many times its size free.
const SPARE_HEADROOM: u64 = 8;
/// Numbers the spares of this process.
static SPARES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A preallocated file being prepared.
struct Spare {
    path: PathBuf,
    /// Set when the appender goes: the preparation stops and removes its file.
    cancel: Arc<std::sync::atomic::AtomicBool>,
    handle: JoinHandle<std::io::Result<File>>,
}
/// How many bytes after a zero frame header must be zeros too for the zeros to be the end of
/// the log rather than damage.
const ZERO_WINDOW: u64 = 4096;

/// The segment being appended to; owned by the writer thread.
pub(crate) struct Appender {
    segments: Arc<Segments>,
    id: u32,
    file: File,
    len: u64,
    limit: u64,
    /// The current file was preallocated: it is cut to its length when the next one starts.
    preallocated: bool,
    /// Files are preallocated.
    preallocate: bool,
    /// Whether the disk has room for a spare now (the writer says, from the space monitor).
    spares_allowed: bool,
    /// The next preallocated file, being prepared or ready.
    spare: Option<Spare>,
    /// Bytes of the current group, written in one call.
    pending: Vec<u8>,
    /// Files finished since the last sync, kept open to be synced (only when something will
    /// sync them: in `fsync = "never"` mode they are closed at once).
    unsynced: Vec<Arc<File>>,
    keep_finished: bool,
    /// Segments finished since the writer last asked: their usage must be looked at again,
    /// since one emptied while it was current can only be deleted now.
    finished: Vec<u32>,
    /// A file was created since the last sync: the directory must be synced too.
    created: bool,
    /// Where the current group began (segment, length): a group that fails goes back there.
    group_start: (u32, u64),
    /// Counts the device syncs.
    counters: Arc<Counters>,
    /// Zeros kept just ahead of the log while it grows slowly.
    ahead: ahead::ZeroAhead,
}

/// How an appender writes: what [`Segments::start`] is told.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AppendMode {
    /// Finished files are kept open to be synced (not in `fsync = "never"` mode).
    pub keep_finished: bool,
    /// Each next file is preallocated whole (`preallocate_segments`).
    pub preallocate: bool,
    /// Zeros are kept ahead of a slow log (`fsync = "always"`, where every commit syncs, and
    /// without `preallocate`).
    pub zero_ahead: bool,
}

impl Segments {
    /// Opens the segment directory; returns it with the ids of the segment files in it, lowest
    /// first. Nothing is deleted or started yet: recovery first replays what the index lacks.
    pub(crate) fn open(dir: &Path) -> Result<(Arc<Segments>, Vec<u32>)> {
        Self::open_at(&dir.join("segments"))
    }

    /// Like [`Segments::open`], for segment files directly in `dir`.
    pub(crate) fn open_at(dir: &Path) -> Result<(Arc<Segments>, Vec<u32>)> {
        let dir = dir.to_owned();
        std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| io_error(&dir, e))? {
            let entry = entry.map_err(|e| io_error(&dir, e))?;
            if let Some(id) = parse_name(&entry.file_name().to_string_lossy()) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        // Spares left by an earlier process are made anew.
        for entry in std::fs::read_dir(&dir)
            .map_err(|e| io_error(&dir, e))?
            .flatten()
        {
            if entry.file_name().to_string_lossy().ends_with(SPARE_SUFFIX) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let segments = Arc::new(Segments {
            dir,
            readers: Mutex::new(HashMap::new()),
        });
        Ok((segments, ids))
    }

    /// Starts a new segment file after `highest` (the highest id on disk or in the index), so
    /// that an id is never used twice. `keep_finished` says whether finished files will be
    /// synced; with `preallocate`, a preallocated file is prepared in the background for the
    /// next roll. The first file is a plain one: start-up does not wait for zeros, and it is
    /// filled before it is left, so that the commits a start makes (a channel created, say)
    /// stay in a file with messages rather than in a small one soon deleted.
    pub(crate) fn start(
        self: &Arc<Self>,
        highest: u32,
        limit: u64,
        mode: AppendMode,
        counters: Arc<Counters>,
    ) -> Result<Appender> {
        let AppendMode {
            keep_finished,
            preallocate,
            zero_ahead,
        } = mode;
        let segments = self.clone();
        let (id, file) = segments.create(next_id(highest)?)?;
        sync_dir(&segments.dir)?;
        let appender = Appender {
            segments: segments.clone(),
            id,
            file,
            len: 0,
            limit,
            preallocated: false,
            preallocate,
            spares_allowed: true,
            spare: preallocate.then(|| segments.prepare_spare(limit)),
            pending: Vec::new(),
            unsynced: Vec::new(),
            keep_finished,
            finished: Vec::new(),
            created: false,
            group_start: (id, 0),
            ahead: ahead::ZeroAhead::new(zero_ahead, counters.clone()),
            counters,
        };
        Ok(appender)
    }

    /// Deletes a segment file that holds nothing anyone needs.
    pub(crate) fn delete(&self, id: u32) -> Result<()> {
        let path = self.path(id);
        std::fs::remove_file(&path).map_err(|e| io_error(&path, e))
    }

    /// Cuts segment file `id` to `len` bytes, durably: what follows was never confirmed.
    pub(crate) fn truncate(&self, id: u32, len: u64) -> Result<()> {
        let path = self.path(id);
        File::options()
            .write(true)
            .open(&path)
            .and_then(|file| {
                file.set_len(len)?;
                file.sync_all()
            })
            .map_err(|e| io_error(&path, e))
    }

    /// Makes the directory's entries durable (after files were deleted).
    pub(crate) fn sync(&self) -> Result<()> {
        sync_dir(&self.dir)
    }

    /// The ids of the files in quarantine: never to be given to a new segment.
    pub(crate) fn quarantined(&self) -> Vec<u32> {
        std::fs::read_dir(self.dir.join("quarantine"))
            .map(|dir| {
                dir.flatten()
                    .filter_map(|e| parse_name(&e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Moves a segment file the index does not account for to `segments/quarantine/`, where
    /// it is kept for `ferry repair` or an operator; returns where it went.
    pub(crate) fn quarantine(&self, id: u32) -> Result<PathBuf> {
        let dir = self.dir.join("quarantine");
        std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        let to = dir.join(format!("{id:010}.seg"));
        std::fs::rename(self.path(id), &to).map_err(|e| io_error(&to, e))?;
        sync_dir(&self.dir)?;
        Ok(to)
    }

    /// Reads the commits of segment file `id` from `from` (a commit boundary) on: hands each
    /// whole, intact commit to `found`, and stops at the first frame that cannot be read (the
    /// end of the file, a torn tail, a damaged frame, or a record of version 2). Member records
    /// after the last commit frame belong to a commit a crash cut short: never confirmed, they
    /// are reported in [`ScanEnd::uncommitted`] and nothing else.
    pub(crate) fn scan_commits(
        &self,
        id: u32,
        from: u64,
        mut found: impl FnMut(FoundCommit),
    ) -> Result<ScanEnd> {
        let mut members = Vec::new();
        let mut damaged = None;
        let (stopped, len) = self.scan(id, from, |offset, header, body| {
            let Some(body) = body else {
                damaged = Some(offset);
                return false;
            };
            match header.kind {
                FrameKind::Member => {
                    members.push((offset, *header));
                    return true;
                }
                FrameKind::Standalone if members.is_empty() => found(FoundCommit {
                    records: vec![(offset, *header)],
                    changes: None,
                    end: offset + header.len,
                }),
                FrameKind::Commit if header.count as usize == members.len() => found(FoundCommit {
                    records: std::mem::take(&mut members),
                    changes: Some(body.to_vec()),
                    end: offset + header.len,
                }),
                // A commit frame that does not close what precedes it: damage.
                _ => {
                    damaged = Some(offset);
                    return false;
                }
            }
            true
        })?;
        Ok(ScanEnd {
            stopped,
            len,
            damaged,
            uncommitted: members,
        })
    }

    /// Reads the frames of segment file `id` from `from` on, handing each whose header can be
    /// read to `found` with its body if that matches its checksum (None if not); stops where
    /// `found` says so or at the first frame that cannot be read: the end of the file, a torn
    /// tail, or a record of the old format. Returns where it stopped and the file's length.
    ///
    /// In a preallocated file, zeros from where a frame would start to the end of the file are
    /// the end of the log (the length returned is then where they start), and a frame that
    /// fails its checksum with zeros at its end and after it is a write a crash cut short: it is not handed to `found`,
    /// and the length returned is its end, as for a frame cut short at the end of a plain file.
    pub(crate) fn scan(
        &self,
        id: u32,
        from: u64,
        mut found: impl FnMut(u64, &RecordHeader, Option<&[u8]>) -> bool,
    ) -> Result<(u64, u64)> {
        let path = self.path(id);
        let file = File::open(&path).map_err(|e| io_error(&path, e))?;
        let len = file.metadata().map_err(|e| io_error(&path, e))?.len();
        let mut offset = from;
        let mut header = [0u8; RECORD_HEADER_LEN];
        let mut body = Vec::new();
        let zeros_from = |at: u64| zeros_follow(&file, at, len).map_err(|e| io_error(&path, e));
        // Zeros end the log only if nothing follows them: a zeroed hole inside a file is
        // damage. Read at most once per scan, at the end of the current file.
        let zeros_to_end = |at: u64| zeros_until(&file, at, len).map_err(|e| io_error(&path, e));
        while offset.saturating_add(RECORD_HEADER_LEN as u64) <= len {
            file.read_exact_at(&mut header, offset)
                .map_err(|e| io_error(&path, e))?;
            if header.iter().all(|&b| b == 0) && zeros_to_end(offset)? {
                return Ok((offset, offset));
            }
            let Some(mut record) = RecordHeader::parse(&header) else {
                break;
            };
            if record.len > u64::from(MAX_RECORD_BYTES) || offset.saturating_add(record.len) > len {
                break;
            }
            body.resize((record.len - RECORD_HEADER_LEN as u64) as usize, 0);
            file.read_exact_at(&mut body, offset + RECORD_HEADER_LEN as u64)
                .map_err(|e| io_error(&path, e))?;
            let intact = record.matches(&body);
            let end = offset + record.len;
            // Only with zeros after it: the last frame of a file that fails its checksum is
            // damage, as it always was.
            if !intact && end < len && ends_in_zeros(&body) && zeros_from(end)? {
                return Ok((offset, end));
            }
            // A message record's body starts with its (shared) publish time.
            if intact && record.kind != FrameKind::Commit && body.len() >= 8 {
                record.publish_ms = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
            }
            if !found(offset, &record, intact.then_some(&body[..])) || !intact {
                break;
            }
            offset += record.len;
        }
        Ok((offset, len))
    }

    /// Where segment file `id` is.
    pub(crate) fn path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("{id:010}.seg"))
    }

    fn create(&self, id: u32) -> Result<(u32, File)> {
        let path = self.path(id);
        let file = File::options()
            .create_new(true)
            .write(true)
            .read(true)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        Ok((id, file))
    }

    /// Starts writing `len` bytes of zeros to a new spare file, synced, on a thread of its own.
    fn prepare_spare(&self, len: u64) -> Spare {
        use std::sync::atomic::Ordering::Relaxed;
        let n = SPARES.fetch_add(1, Relaxed);
        let path = (self.dir).join(format!("{}-{n}{SPARE_SUFFIX}", std::process::id()));
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (at, stop) = (path.clone(), cancel.clone());
        let dir = self.dir.clone();
        let prepare = move || {
            // A spare takes its whole size at once: never from a disk that is nearly full,
            // where the space must stay for acks and the index.
            let stat = rustix::fs::statvfs(&dir).map_err(std::io::Error::from)?;
            let free = stat.f_bavail.saturating_mul(stat.f_frsize);
            if free < len.saturating_mul(SPARE_HEADROOM) {
                return Err(std::io::Error::other(format!(
                    "{free} bytes free: too little to preallocate a segment file"
                )));
            }
            let zeroed = || {
                let file = File::options()
                    .create_new(true)
                    .write(true)
                    .read(true)
                    .open(&at)?;
                // The zeros go straight to the device where the filesystem allows it: through
                // the page cache they would cost a copy, and their writeback would stand in
                // front of the live segment's syncs.
                let direct = {
                    use std::os::unix::fs::OpenOptionsExt;
                    let flags = rustix::fs::OFlags::DIRECT.bits() as i32;
                    File::options()
                        .write(true)
                        .custom_flags(flags)
                        .open(&at)
                        .ok()
                };
                // O_DIRECT wants its buffer aligned to the block size.
                let buffer = vec![0u8; ZERO_CHUNK + DIRECT_ALIGN];
                let aligned = buffer.as_ptr().align_offset(DIRECT_ALIGN);
                let zeros = &buffer[aligned..aligned + ZERO_CHUNK];
                let (target, rounded) = match &direct {
                    Some(direct) => (direct, len.next_multiple_of(DIRECT_ALIGN as u64)),
                    None => (&file, len),
                };
                let mut written = 0;
                while written < rounded {
                    if stop.load(Relaxed) {
                        return Err(std::io::Error::other("the store stopped"));
                    }
                    let n = (rounded - written).min(ZERO_CHUNK as u64) as usize;
                    target.write_all_at(&zeros[..n], written)?;
                    written += n as u64;
                }
                target.sync_all()?;
                if stop.load(Relaxed) {
                    return Err(std::io::Error::other("the store stopped"));
                }
                if direct.is_some() {
                    // Read back through the page cache, clean: the frames written over them
                    // then fill cached pages, instead of waiting on a read of each block.
                    let mut chunk = vec![0u8; ZERO_CHUNK];
                    let mut read = 0;
                    while read < len {
                        let n = (len - read).min(ZERO_CHUNK as u64) as usize;
                        file.read_exact_at(&mut chunk[..n], read)?;
                        read += n as u64;
                    }
                }
                // Abandoned meanwhile: nobody will take it, so it removes itself (below).
                if stop.load(Relaxed) {
                    return Err(std::io::Error::other("the store stopped"));
                }
                Ok(file)
            };
            // A spare that could not be finished (a full disk, a stop) gives its space back.
            zeroed().inspect_err(|_| {
                let _ = std::fs::remove_file(&at);
            })
        };
        let spawned = std::thread::Builder::new()
            .name("ferry-store-spare".into())
            .spawn(prepare);
        let handle = match spawned {
            Ok(handle) => handle,
            // No thread: the spare is simply never ready, and plain files are used.
            Err(e) => std::thread::spawn(move || Err(e)),
        };
        Spare {
            path,
            cancel,
            handle,
        }
    }

    /// The spare at `path`, renamed to be segment `id`.
    fn take_spare(&self, (path, file): (PathBuf, File), id: u32) -> std::io::Result<(u32, File)> {
        std::fs::rename(&path, self.path(id))?;
        Ok((id, file))
    }

    /// Reads one record's bytes.
    pub(crate) fn read(&self, at: RecordLocation) -> Result<Vec<u8>> {
        // An index entry is not trusted to size an allocation.
        if at.len > MAX_RECORD_BYTES {
            return Err(StoreError::Corrupt(format!(
                "record of {} bytes in segment {}: larger than any record written",
                at.len, at.segment
            )));
        }
        let file = self.reader(at.segment)?;
        let mut buf = vec![0; at.len as usize];
        file.read_exact_at(&mut buf, at.offset).map_err(|e| {
            StoreError::Corrupt(format!(
                "cannot read {} bytes at {} of segment {}: {e}",
                at.len, at.offset, at.segment
            ))
        })?;
        Ok(buf)
    }

    fn reader(&self, id: u32) -> Result<Arc<File>> {
        let mut readers = self.readers.lock().expect("readers lock");
        if let Some(file) = readers.get(&id) {
            return Ok(file.clone());
        }
        let path = self.path(id);
        let file = Arc::new(File::open(&path).map_err(|e| io_error(&path, e))?);
        readers.insert(id, file.clone());
        Ok(file)
    }

    /// Deletes segment files once no index entry names them any more.
    pub(crate) fn remove(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        // One file that cannot be deleted does not keep the others: each is tried.
        let mut first_error = None;
        let mut readers = self.readers.lock().expect("readers lock");
        for id in ids {
            readers.remove(id);
            let path = self.path(*id);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    first_error.get_or_insert(io_error(&path, e));
                }
            }
        }
        drop(readers);
        sync_dir(&self.dir)?;
        first_error.map_or(Ok(()), Err)
    }
}

/// One whole, intact commit found by [`Segments::scan_commits`].
pub(crate) struct FoundCommit {
    /// Its message records: where each starts, and its header.
    pub records: Vec<(u64, RecordHeader)>,
    /// The body of its commit frame (None for a version 3 record, a commit of its own).
    pub changes: Option<Vec<u8>>,
    /// Where it ends.
    pub end: u64,
}

/// Where [`Segments::scan_commits`] stopped, and why.
#[derive(Debug)]
pub(crate) struct ScanEnd {
    /// Where the frames stopped.
    pub stopped: u64,
    /// The file's length.
    pub len: u64,
    /// A frame whose checksum does not match, or a commit frame that does not close the
    /// records before it, at this offset.
    pub damaged: Option<u64>,
    /// Member records after the last commit frame: a commit a crash cut short.
    pub uncommitted: Vec<(u64, RecordHeader)>,
}

impl Appender {
    /// Adds a framed record to the current group; it is written by [`Appender::write`].
    pub(crate) fn append(&mut self, framed: impl FnOnce(&mut Vec<u8>)) -> Result<RecordLocation> {
        let offset = self.len + self.pending.len() as u64;
        let start = self.pending.len();
        framed(&mut self.pending);
        let len = (self.pending.len() - start) as u32;
        Ok(RecordLocation {
            segment: self.id,
            offset,
            len,
            publish_ms: 0,
        })
    }

    /// The disk space the current group's frames take, and the zeros started ahead of the log
    /// since the last call: none for frames written over zeros (their space was counted when
    /// they were written, or seen by the monitor when a spare was made), so that the estimate
    /// between two looks at the disk is not lowered for blocks already taken.
    pub(crate) fn disk_taken(&mut self) -> u64 {
        let pending = self.pending.len() as u64;
        let frames = match self.preallocated {
            true => (self.len + pending).saturating_sub(self.len.max(self.limit)),
            false => self.ahead.new_blocks(self.len, pending),
        };
        frames + self.ahead.take_started()
    }

    /// Bytes of the current group not yet written.
    pub(crate) fn pending_len(&self) -> u64 {
        self.pending.len() as u64
    }

    /// Where the next record will start in the current segment.
    pub(crate) fn end(&self) -> u64 {
        self.len + self.pending.len() as u64
    }

    /// The segment records are appended to now.
    pub(crate) fn current(&self) -> u32 {
        self.id
    }

    /// The segments finished since the last call.
    pub(crate) fn take_finished(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.finished)
    }

    /// Gives back segments taken by a group that failed: the next group looks at them again.
    pub(crate) fn restore_finished(&mut self, finished: Vec<u32>) {
        self.finished.extend(finished);
    }

    /// Whether the current group's frames fit the largest frame a scan accepts.
    pub(crate) fn frame_fits(len: usize) -> bool {
        len as u64 <= u64::from(MAX_RECORD_BYTES)
    }

    fn roll(&mut self) -> Result<()> {
        self.write()?;
        let id = next_id(self.id)?;
        self.ahead.finish();
        if self.preallocated || self.ahead.zeroed() > self.len {
            // The zeros past the last frame go: a finished file ends where its log does. Not
            // vital (a scan ends at zeros), so a failure is said and the roll goes on, with
            // nothing of it changed yet.
            if let Err(e) = self.file.set_len(self.len) {
                tracing::warn!(segment = self.id, error = %e, "cannot cut the zeros off a finished segment file");
            }
        }
        let taken = self.ready_spare();
        if self.preallocate && self.spare.is_none() && self.spares_allowed {
            self.spare = Some(self.segments.prepare_spare(self.limit));
        }
        let (spare, preallocated) = match taken {
            Some((path, file)) => match self.segments.take_spare((path.clone(), file), id) {
                Ok(taken) => (taken, true),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take the preallocated segment file; creating a plain one");
                    let _ = std::fs::remove_file(&path);
                    (self.segments.create(id)?, false)
                }
            },
            None => (self.segments.create(id)?, false),
        };
        let (id, file) = spare;
        self.preallocated = preallocated;
        let finished = std::mem::replace(&mut self.file, file);
        if self.keep_finished {
            self.unsynced.push(Arc::new(finished));
        }
        self.finished.push(self.id);
        self.id = id;
        self.len = 0;
        self.created = true;
        self.ahead.reset(0);
        Ok(())
    }

    /// The spare (its path and file), if it is ready. One that could not be made (a full disk,
    /// say) is logged, and another is tried for the roll after.
    fn ready_spare(&mut self) -> Option<(PathBuf, File)> {
        if !self.spare.as_ref()?.handle.is_finished() {
            return None;
        }
        let spare = self.spare.take()?;
        match spare.handle.join() {
            Ok(Ok(file)) => Some((spare.path, file)),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot preallocate a segment file; using a plain one");
                None
            }
            Err(_) => None,
        }
    }

    /// Writes the group's records to the file (not yet synced), where the log ends: over the
    /// zeros of a preallocated file, or past the end of a plain one.
    pub(crate) fn write(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let written = self.pending.len() as u64;
        self.ahead.before_write(self.len, written);
        self.file
            .write_all_at(&self.pending, self.len)
            .map_err(|e| io_error(&self.segments.path(self.id), e))?;
        self.len += written;
        self.pending.clear();
        if !self.preallocated {
            let (segments, id) = (&self.segments, self.id);
            (self.ahead).after_write(|| segments.path(id), self.len, written, self.limit);
        }
        Ok(())
    }

    /// Marks where a group begins, for [`Appender::discard`]; first starts a new segment
    /// file if the current one is full. A commit never spans two files, so that each file
    /// can be replayed on its own.
    pub(crate) fn begin_group(&mut self) -> Result<()> {
        if self.len > 0 && self.len >= self.limit {
            self.roll()?;
        }
        self.group_start = (self.id, self.len);
        Ok(())
    }

    /// Forgets the current group's records after a failed write or sync: the file is cut back
    /// to where the group began, so nothing of it stays on disk and the next group appends
    /// where the last committed one ended.
    pub(crate) fn discard(&mut self) -> Result<()> {
        self.pending.clear();
        let (id, len) = self.group_start;
        debug_assert_eq!(id, self.id, "a group never spans two files");
        let path = self.segments.path(id);
        // Zeros being written ahead must not extend the file again after the cut.
        self.ahead.finish();
        self.file.set_len(len).map_err(|e| io_error(&path, e))?;
        self.ahead.reset(len);
        // Cut back, the file no longer has zeros ahead of its log.
        self.preallocated = false;
        // The undo is made durable at once: a torn commit is ignored on replay anyway, but a
        // whole one whose callers were told it was refused must not come back.
        self.file.sync_data().map_err(|e| io_error(&path, e))?;
        self.counters.synced(1);
        self.len = len;
        Ok(())
    }

    /// Makes everything written so far durable.
    pub(crate) fn sync(&mut self) -> Result<()> {
        // A file leaves the list only once synced: after a failure, the next sync tries again.
        while let Some(file) = self.unsynced.first() {
            file.sync_data()
                .map_err(|e| io_error(&self.segments.dir, e))?;
            self.counters.synced(1);
            self.unsynced.remove(0);
        }
        self.file
            .sync_data()
            .map_err(|e| io_error(&self.segments.path(self.id), e))?;
        self.counters.synced(1);
        if std::mem::take(&mut self.created) {
            sync_dir(&self.segments.dir)?;
            self.counters.synced(1);
        }
        Ok(())
    }
}

impl Appender {
    /// Whether the current file was preallocated: writes into it take no new blocks, so a
    /// full disk does not fail them.
    pub(crate) fn in_preallocated(&self) -> bool {
        self.preallocated
    }

    /// Tells how much room the disk has (`free` bytes, publishing refused below `watermark`,
    /// or refused now: `low`). A spare is started only with room for several segments; without,
    /// one being made is abandoned (its file goes). One already made stays: its space is the
    /// next segment's.
    pub(crate) fn space_is(&mut self, free: u64, watermark: u64, low: bool) {
        let room = watermark.saturating_add(self.limit.saturating_mul(SPARE_HEADROOM));
        let allowed = !low && free >= room;
        self.spares_allowed = allowed;
        // Zeros ahead take little, but never from the room acks and the index need.
        let zeros_room = watermark.saturating_add(ahead::ROOM);
        self.ahead.allow(!low && free >= zeros_room);
        if !allowed && self.spare.as_ref().is_some_and(|s| !s.handle.is_finished()) {
            self.drop_spare();
        }
    }

    fn drop_spare(&mut self) {
        if let Some(spare) = self.spare.take() {
            spare
                .cancel
                .store(true, std::sync::atomic::Ordering::Relaxed);
            // One already made: its file goes (one still being made removes its own).
            if spare.handle.is_finished() {
                let _ = std::fs::remove_file(&spare.path);
            }
        }
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        self.drop_spare();
        // No zeros may land in a file once the store is gone (a store opened again in this
        // process recovers it).
        self.ahead.finish();
    }
}

/// A record is at most a group's cut (256 KiB) plus one message (at most 64 MiB).
const MAX_RECORD_BYTES: u32 = 128 << 20;

/// Whether the bytes of `file` from `at` (at most [`ZERO_WINDOW`] of them, up to `len`) are
/// all zeros: what follows the log in a preallocated file.
fn zeros_follow(file: &File, at: u64, len: u64) -> std::io::Result<bool> {
    let mut window = vec![0u8; ZERO_WINDOW.min(len.saturating_sub(at)) as usize];
    file.read_exact_at(&mut window, at)?;
    Ok(window.iter().all(|&b| b == 0))
}

/// Whether every byte of `file` from `at` to `len` is zero.
fn zeros_until(file: &File, mut at: u64, len: u64) -> std::io::Result<bool> {
    let mut chunk = vec![0u8; ZERO_CHUNK];
    while at < len {
        let n = (len - at).min(ZERO_CHUNK as u64) as usize;
        file.read_exact_at(&mut chunk[..n], at)?;
        if chunk[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// Whether a frame's body ends in zeros, as one does whose write a crash cut short over the
/// zeros of a preallocated file (writes reach the disk a page at a time, from the start).
fn ends_in_zeros(body: &[u8]) -> bool {
    let tail = &body[body.len().saturating_sub(16)..];
    !tail.is_empty() && tail.iter().all(|&b| b == 0)
}

fn next_id(id: u32) -> Result<u32> {
    id.checked_add(1)
        .ok_or_else(|| StoreError::Corrupt("segment ids are exhausted".into()))
}

fn parse_name(name: &str) -> Option<u32> {
    name.strip_suffix(".seg")?.parse().ok()
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    /// Waits (bounded) until the appender's spare is ready.
    fn spare_ready(appender: &Appender) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !appender
            .spare
            .as_ref()
            .is_some_and(|s| s.handle.is_finished())
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the spare was never ready"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Appends one commit (a commit frame of its own) as its own group, written.
    fn commit(appender: &mut Appender, body: &[u8]) -> RecordLocation {
        appender.begin_group().unwrap();
        let at = appender
            .append(|out| codec::frame_commit(0, body, out))
            .unwrap();
        appender.write().unwrap();
        at
    }

    /// How the tests' appenders write: finished files kept for syncing, as in `always` mode.
    fn mode(preallocate: bool, zero_ahead: bool) -> AppendMode {
        AppendMode {
            keep_finished: true,
            preallocate,
            zero_ahead,
        }
    }

    /// Overwrites the last 100 bytes of the frame at `at` with zeros; returns its file.
    fn zero_frame_end(segments: &Segments, at: RecordLocation) -> File {
        let file = File::options()
            .write(true)
            .open(segments.path(at.segment))
            .unwrap();
        file.write_all_at(&[0u8; 100], at.offset + u64::from(at.len) - 100)
            .unwrap();
        file
    }

    fn commits_in(segments: &Segments, id: u32) -> (Vec<u64>, ScanEnd) {
        let mut found = Vec::new();
        let end = segments
            .scan_commits(id, 0, |commit| found.push(commit.end))
            .unwrap();
        (found, end)
    }

    #[test]
    fn preallocated_files_end_where_their_log_does() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        let mut appender = segments
            .start(0, 4096, mode(true, false), Arc::default())
            .unwrap();
        // The first file is plain, and filled before it is left.
        commit(&mut appender, &[1u8; 5000]);
        assert_eq!(appender.current(), 1);
        spare_ready(&appender);
        commit(&mut appender, b"second");
        assert_eq!(appender.current(), 2);
        let path = |id: u32| dir.path().join(format!("segments/{id:010}.seg"));
        let size = |id| std::fs::metadata(path(id)).unwrap().len();
        assert_eq!(size(2), 4096, "preallocated");
        let (found, end) = commits_in(&segments, 2);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (end.stopped, end.len, end.damaged),
            (found[0], found[0], None)
        );

        // Filled past its size, it is cut to its log when the next file starts.
        let big = vec![7u8; 5000];
        commit(&mut appender, &big);
        let written = appender.end();
        spare_ready(&appender);
        commit(&mut appender, b"in the third file");
        assert_eq!(appender.current(), 3);
        assert_eq!(size(2), written);
        let (found, end) = commits_in(&segments, 2);
        assert_eq!((found.len(), end.stopped, end.len), (2, written, written));
        drop(appender);
        let spares = std::fs::read_dir(dir.path().join("segments"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(SPARE_SUFFIX))
            .count();
        assert!(
            spares <= 1,
            "at most one spare, removed soon after the store goes"
        );
    }

    #[test]
    fn a_slow_log_writes_over_zeros_kept_ahead_and_a_scan_ends_where_the_log_does() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        let mut appender = segments
            .start(0, 1 << 20, mode(false, true), Arc::default())
            .unwrap();
        let path = dir.path().join("segments/0000000001.seg");
        let size = || std::fs::metadata(&path).unwrap().len();
        let mut ends = Vec::new();
        // A commit now and then: the log is slow.
        for _ in 0..6 {
            std::thread::sleep(ahead::RATE_WINDOW + std::time::Duration::from_millis(10));
            let at = commit(&mut appender, &[5u8; 30_000]);
            ends.push(at.offset + u64::from(at.len));
        }
        appender.ahead.finish();
        let log_end = appender.end();
        assert!(log_end > 64 << 10, "the log reached the first zeros");
        assert!(appender.ahead.zeroed() > log_end, "zeros are kept ahead");
        assert!(size() > log_end, "the zeros are in the file");
        let (found, end) = commits_in(&segments, 1);
        assert_eq!(found, ends, "every commit, over zeros or not, is found");
        assert_eq!(
            (end.stopped, end.len, end.damaged),
            (log_end, log_end, None)
        );

        // A discarded group leaves nothing: the file ends where the log does, zeros and all.
        appender.begin_group().unwrap();
        appender.append(|out| out.extend([3u8; 500])).unwrap();
        appender.write().unwrap();
        appender.discard().unwrap();
        assert_eq!(size(), log_end);
        let (found, end) = commits_in(&segments, 1);
        assert_eq!(found, ends);
        assert_eq!(
            (end.stopped, end.len, end.damaged),
            (log_end, log_end, None)
        );
    }

    #[test]
    fn the_last_frame_of_a_file_failing_its_checksum_is_damage_even_ending_in_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        let mut appender = segments
            .start(0, 1 << 20, mode(false, false), Arc::default())
            .unwrap();
        commit(&mut appender, b"whole");
        let last = commit(&mut appender, &[9u8; 300]);
        // Its end damaged to zeros, but nothing after it: the file ends with the frame.
        zero_frame_end(&segments, last);
        let (_, end) = commits_in(&segments, 1);
        assert_eq!(end.damaged, Some(last.offset));
    }

    #[test]
    fn a_write_cut_short_over_zeros_is_a_torn_tail_not_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        let mut appender = segments
            .start(0, 1 << 20, mode(true, false), Arc::default())
            .unwrap();
        commit(&mut appender, &vec![1u8; 1 << 20]);
        spare_ready(&appender);
        let whole = commit(&mut appender, b"whole");
        let torn = commit(&mut appender, &[9u8; 300]);
        assert_eq!((whole.segment, torn.segment), (2, 2));
        // The crash wrote the torn frame's start only: its end is still zeros.
        let file = zero_frame_end(&segments, torn);
        let (found, end) = commits_in(&segments, 2);
        assert_eq!(found, [u64::from(whole.len)]);
        assert_eq!(end.damaged, None, "a tear, not damage");
        assert_eq!(end.stopped, torn.offset);
        assert!(end.len > end.stopped, "reported as a torn tail");

        // Zeros followed by something else are not the end of the log.
        file.write_all_at(&[0u8; 300], torn.offset).unwrap();
        file.write_all_at(b"not zeros", torn.offset + 400).unwrap();
        let (_, end) = commits_in(&segments, 2);
        assert_eq!(end.stopped, torn.offset);
        assert!(end.len > end.stopped);
    }

    #[test]
    fn a_group_never_spans_two_files_and_a_discarded_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        let mut appender = segments
            .start(0, 1000, mode(false, false), Arc::default())
            .unwrap();
        appender.begin_group().unwrap();
        appender.append(|out| out.extend([1u8; 600])).unwrap();
        appender.append(|out| out.extend([2u8; 600])).unwrap();
        appender.write().unwrap();
        assert_eq!(appender.current(), 1, "the group stays in its file");

        // The next group starts a new file, and then fails.
        appender.begin_group().unwrap();
        assert_eq!(appender.current(), 2);
        appender.append(|out| out.extend([3u8; 600])).unwrap();
        appender.write().unwrap();
        appender.discard().unwrap();
        assert_eq!((appender.current(), appender.end()), (2, 0));
        let len = std::fs::metadata(dir.path().join("segments/0000000002.seg"))
            .unwrap()
            .len();
        assert_eq!(len, 0, "the failed group's bytes are cut off");
        // The next group appends where the committed one ended.
        appender.begin_group().unwrap();
        let at = appender.append(|out| out.extend([4u8; 10])).unwrap();
        appender.write().unwrap();
        assert_eq!((at.segment, at.offset), (2, 0));
    }
}
