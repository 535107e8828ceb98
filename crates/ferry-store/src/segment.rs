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

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::codec::{FrameKind, RECORD_HEADER_LEN, RecordHeader, RecordLocation};
use crate::{Counters, Result, StoreError, io_error};

/// The segment files of one store.
pub(crate) struct Segments {
    dir: PathBuf,
    /// Open handles for reading, by segment id.
    readers: Mutex<HashMap<u32, Arc<File>>>,
}

/// The segment being appended to; owned by the writer thread.
pub(crate) struct Appender {
    segments: Arc<Segments>,
    id: u32,
    file: File,
    len: u64,
    limit: u64,
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
        let segments = Arc::new(Segments {
            dir,
            readers: Mutex::new(HashMap::new()),
        });
        Ok((segments, ids))
    }

    /// Starts a new segment file after `highest` (the highest id on disk or in the index), so
    /// that an id is never used twice. `keep_finished` says whether finished files will be
    /// synced.
    pub(crate) fn start(
        self: &Arc<Self>,
        highest: u32,
        limit: u64,
        keep_finished: bool,
        counters: Arc<Counters>,
    ) -> Result<Appender> {
        let segments = self.clone();
        let (id, file) = segments.create(next_id(highest)?)?;
        sync_dir(&segments.dir)?;
        let appender = Appender {
            segments: segments.clone(),
            id,
            file,
            len: 0,
            limit,
            pending: Vec::new(),
            unsynced: Vec::new(),
            keep_finished,
            finished: Vec::new(),
            created: false,
            group_start: (id, 0),
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
        while offset.saturating_add(RECORD_HEADER_LEN as u64) <= len {
            file.read_exact_at(&mut header, offset)
                .map_err(|e| io_error(&path, e))?;
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

    fn path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("{id:010}.seg"))
    }

    fn create(&self, id: u32) -> Result<(u32, File)> {
        let path = self.path(id);
        let file = File::options()
            .create_new(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
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
        let (id, file) = self.segments.create(next_id(self.id)?)?;
        let finished = std::mem::replace(&mut self.file, file);
        if self.keep_finished {
            self.unsynced.push(Arc::new(finished));
        }
        self.finished.push(self.id);
        self.id = id;
        self.len = 0;
        self.created = true;
        Ok(())
    }

    /// Writes the group's records to the file (not yet synced).
    pub(crate) fn write(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&self.pending)
            .map_err(|e| io_error(&self.segments.path(self.id), e))?;
        self.len += self.pending.len() as u64;
        self.pending.clear();
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
        self.file.set_len(len).map_err(|e| io_error(&path, e))?;
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

/// A record is at most a group's cut (256 KiB) plus one message (at most 64 MiB).
const MAX_RECORD_BYTES: u32 = 128 << 20;

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

    #[test]
    fn a_group_never_spans_two_files_and_a_discarded_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        let mut appender = segments.start(0, 1000, true, Arc::default()).unwrap();
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
