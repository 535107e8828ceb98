//! The de-duplication index: which ids each channel stored within its window, and under which
//! sequence.
//!
//! An id is known by the 128-bit xxh3 hash of its text (two different ids share one with a
//! probability of about 10⁻³² per lookup against ten million: never in practice), with the
//! sequence and publish time of the message that carried it. A channel's ids since its last
//! *seal* are in memory (at most `MAX_OPEN_IDS` over all channels) and, durably, in sled's `E` keys, one per commit,
//! written with the commit. A seal writes them to a file of their own (`ids/CHANNEL-N.ids`),
//! sorted by hash and fsync'd, then drops their `E` keys; each sealed file keeps in memory
//! only a blocked Bloom filter (about 12 bits an id) and every 64th hash, so that a lookup
//! costs one filter probe per file and, only when a filter says "maybe", one read of at most
//! 64 entries. A file goes once its newest id has left the window. So a window of ten million
//! ids costs about 20 MiB of memory and 320 MB of disk, and no sled write per id.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut};

use crate::codec;
use crate::{ChannelId, Result, StoreError, io_error};

/// All channels together hold at most this many ids in memory (about 48 MiB): past it, the
/// channel holding the most is sealed into a file...
const MAX_OPEN_IDS: usize = 1 << 20;
/// ...or once the oldest is this old (a window is at least four files, so that a file's ids
/// leave it close together).
const SEAL_MIN_AGE_MS: u64 = 1000;
/// How long after a failed seal the next is tried.
const SEAL_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
/// Every this many entries of a file, its hash is kept in memory.
const SPARSE: usize = 64;
/// An entry of a file: hash (16), sequence (8), publish time (8).
const ENTRY: usize = 32;
/// A file's header: magic (4), channel (4), count (8), oldest and newest publish time (16),
/// the last `E` key it covers (publish time and first sequence, 16).
const HEADER: usize = 48;
const MAGIC: &[u8; 4] = b"FID1";
/// Bits of Bloom filter an id (a blocked filter of 512-bit blocks, six bits an id).
const BITS_PER_ID: usize = 12;
const PROBES: usize = 6;

/// The hash an id is known by.
pub(crate) fn hash(id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes())
}

/// A message's id as the index holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    seq: u64,
    publish_ms: u64,
}

/// Every channel's ids.
pub(crate) struct IdIndex {
    dir: PathBuf,
    channels: HashMap<ChannelId, ChannelIds>,
    /// Ids in memory, over all channels.
    open_total: usize,
    /// When a seal last failed: the next is tried a second later, not at every commit.
    failed_at: Option<std::time::Instant>,
}

#[derive(Default)]
struct ChannelIds {
    /// Ids since the last seal.
    open: HashMap<u128, Entry>,
    /// When the oldest of them was published.
    open_since_ms: Option<u64>,
    /// The last `E` key they came from (publish time, first sequence).
    open_until: (u64, u64),
    /// Sealed files, oldest first.
    sealed: Vec<Sealed>,
    next_file: u64,
}

/// A sealed file.
struct Sealed {
    path: PathBuf,
    count: u64,
    newest_ms: u64,
    bloom: Bloom,
    /// The hash of every `SPARSE`-th entry.
    sparse: Vec<u128>,
}

impl IdIndex {
    /// Opens the index in `dir/ids`: loads every sealed file's filter, and the ids since the
    /// last seal from sled's `E` keys (dropping those a seal covered before a crash).
    pub(crate) fn open(dir: &Path, db: &sled::Db) -> Result<IdIndex> {
        let dir = dir.join("ids");
        fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        let mut index = IdIndex {
            dir: dir.clone(),
            channels: HashMap::new(),
            open_total: 0,
            failed_at: None,
        };
        let mut files = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| io_error(&dir, e))? {
            let path = entry.map_err(|e| io_error(&dir, e))?.path();
            if let Some((channel, number)) = parse_name(&path) {
                files.push((channel, number, path));
            } else if path.extension().is_some_and(|e| e == "tmp") {
                // A seal a crash cut short: its ids are still in sled.
                let _ = fs::remove_file(&path);
            }
        }
        files.sort();
        for (channel, number, path) in files {
            let (sealed, covers) = Sealed::load(&path)?;
            let ids = index.channels.entry(channel).or_default();
            ids.next_file = number + 1;
            ids.open_until = ids.open_until.max(covers);
            ids.sealed.push(sealed);
        }
        // Every E key left is loaded, even one a sealed file covers (a crash between the seal
        // and the removal of its keys): an id found twice is harmless, one skipped is not (a
        // key may sort below a file's mark when the clock stepped back).
        for entry in db.scan_prefix(b"E") {
            let (key, value) = entry?;
            let (channel, publish_ms, first) = codec::parse_id_time_key_full(&key)?;
            let ids = index.channels.entry(channel).or_default();
            for (seq, id) in codec::decode_ids(&value)? {
                ids.insert(hash(&id), seq, publish_ms);
            }
            ids.open_until = ids.open_until.max((publish_ms, first));
        }
        index.open_total = index.channels.values().map(|c| c.open.len()).sum();
        Ok(index)
    }

    /// The sequence `channel` stored `id` under, if it did within `window_ms` of `now_ms`.
    pub(crate) fn find(
        &self,
        channel: ChannelId,
        id: &str,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<Option<u64>> {
        let Some(ids) = self.channels.get(&channel) else {
            return Ok(None);
        };
        let h = hash(id);
        let fresh = |e: &Entry| e.publish_ms.saturating_add(window_ms) > now_ms;
        if let Some(entry) = ids.open.get(&h).filter(|e| fresh(e)) {
            return Ok(Some(entry.seq));
        }
        for sealed in ids.sealed.iter().rev() {
            if sealed.newest_ms.saturating_add(window_ms) <= now_ms {
                break;
            }
            if sealed.bloom.contains(h)
                && let Some(entry) = sealed.find(h)?.filter(|e| fresh(e))
            {
                return Ok(Some(entry.seq));
            }
        }
        Ok(None)
    }

    /// Adds the ids of a commit (already durable in its `E` key).
    pub(crate) fn insert(
        &mut self,
        channel: ChannelId,
        publish_ms: u64,
        entries: &[(u64, String)],
    ) {
        if entries.is_empty() {
            return;
        }
        let first = codec::ids_discriminator(entries);
        let ids = self.channels.entry(channel).or_default();
        let before = ids.open.len();
        for (seq, id) in entries {
            ids.insert(hash(id), *seq, publish_ms);
        }
        ids.open_until = ids.open_until.max((publish_ms, first));
        self.open_total += ids.open.len() - before;
    }

    /// The channel to seal now, if the ids in memory reached their bound: the one holding
    /// the most.
    pub(crate) fn fullest(&self) -> Option<ChannelId> {
        let resting = (self.failed_at).is_some_and(|at| at.elapsed() < SEAL_RETRY);
        (self.open_total >= MAX_OPEN_IDS && !resting)
            .then(|| self.channels.iter().max_by_key(|(_, c)| c.open.len()))
            .flatten()
            .map(|(id, _)| *id)
    }

    /// Whether some channel holds ids (the writer then looks at them once a second).
    pub(crate) fn holds_any(&self) -> bool {
        !self.channels.is_empty()
    }

    /// Seals each channel's ids that are many or old enough, and deletes the files whose ids
    /// all left their channel's window (`window_ms` gives each channel's; `None`: the channel
    /// is gone). The `E` keys a seal covers are removed from sled.
    pub(crate) fn maintain(
        &mut self,
        db: &sled::Db,
        now_ms: u64,
        window_ms: impl Fn(ChannelId) -> Option<u64>,
    ) -> Result<()> {
        let channels: Vec<ChannelId> = self.channels.keys().copied().collect();
        for channel in channels {
            let Some(window) = window_ms(channel) else {
                self.forget(channel);
                continue;
            };
            let ids = self.channels.get_mut(&channel).expect("listed");
            let old = ids.open_since_ms.is_some_and(|since| {
                since.saturating_add(SEAL_MIN_AGE_MS.max(window / 4)) <= now_ms
            });
            if old && !ids.open.is_empty() {
                self.seal(db, channel)?;
            }
            let ids = self.channels.get_mut(&channel).expect("listed");
            while let Some(oldest) = ids.sealed.first() {
                if oldest.newest_ms.saturating_add(window) > now_ms {
                    break;
                }
                let gone = ids.sealed.remove(0);
                let _ = fs::remove_file(&gone.path);
            }
        }
        // A channel whose ids all left their window is forgotten (no file of it is left).
        self.channels
            .retain(|_, c| !c.open.is_empty() || !c.sealed.is_empty());
        Ok(())
    }

    /// Writes `channel`'s in-memory ids to a sealed file, then drops their `E` keys.
    pub(crate) fn seal(&mut self, db: &sled::Db, channel: ChannelId) -> Result<()> {
        let sealed = self.write_sealed(db, channel);
        self.failed_at = sealed.is_err().then(std::time::Instant::now);
        sealed
    }

    fn write_sealed(&mut self, db: &sled::Db, channel: ChannelId) -> Result<()> {
        let dir = self.dir.clone();
        let ids = self.channels.get_mut(&channel).expect("sealed channel");
        // Copied, not drained: if the seal fails, the ids stay in memory for the next try.
        let mut entries: Vec<(u128, Entry)> = ids.open.iter().map(|(h, e)| (*h, *e)).collect();
        entries.sort_unstable_by_key(|(h, _)| *h);
        let oldest = entries.iter().map(|(_, e)| e.publish_ms).min().unwrap_or(0);
        let newest = entries.iter().map(|(_, e)| e.publish_ms).max().unwrap_or(0);
        let number = ids.next_file;
        let path = dir.join(format!("{:010}-{number:010}.ids", channel.0));
        let tmp = path.with_extension("tmp");
        {
            let file = File::create(&tmp).map_err(|e| io_error(&tmp, e))?;
            let mut out = BufWriter::with_capacity(1 << 20, file);
            let mut header = Vec::with_capacity(HEADER);
            header.put_slice(MAGIC);
            header.put_u32_le(channel.0);
            header.put_u64_le(entries.len() as u64);
            header.put_u64_le(oldest);
            header.put_u64_le(newest);
            header.put_u64_le(ids.open_until.0);
            header.put_u64_le(ids.open_until.1);
            out.write_all(&header).map_err(|e| io_error(&tmp, e))?;
            for (h, entry) in &entries {
                let mut raw = [0; ENTRY];
                raw[..16].copy_from_slice(&h.to_le_bytes());
                raw[16..24].copy_from_slice(&entry.seq.to_le_bytes());
                raw[24..].copy_from_slice(&entry.publish_ms.to_le_bytes());
                out.write_all(&raw).map_err(|e| io_error(&tmp, e))?;
            }
            let file = out
                .into_inner()
                .map_err(|e| io_error(&tmp, e.into_error()))?;
            file.sync_data().map_err(|e| io_error(&tmp, e))?;
        }
        fs::rename(&tmp, &path).map_err(|e| io_error(&path, e))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error(&dir, e))?;
        ids.sealed
            .push(Sealed::from_entries(path, &entries, newest));
        ids.next_file = number + 1;
        self.open_total -= ids.open.len();
        ids.open.clear();
        ids.open_since_ms = None;
        // The file is durable: the commits' keys it covers can go.
        let mut batch = sled::Batch::default();
        let to = codec::id_time_key(channel, ids.open_until.0, ids.open_until.1);
        let from = codec::id_time_key(channel, 0, 0);
        for key in db.range(from..=to).keys() {
            batch.remove(key?);
        }
        db.apply_batch(batch)?;
        Ok(())
    }

    /// Drops a deleted channel's ids (its `E` keys are swept with its other keys).
    pub(crate) fn forget(&mut self, channel: ChannelId) {
        if let Some(ids) = self.channels.remove(&channel) {
            self.open_total -= ids.open.len();
            for sealed in ids.sealed {
                let _ = fs::remove_file(&sealed.path);
            }
        }
    }
}

impl ChannelIds {
    fn insert(&mut self, h: u128, seq: u64, publish_ms: u64) {
        self.open.insert(h, Entry { seq, publish_ms });
        self.open_since_ms.get_or_insert(publish_ms);
    }
}

impl Sealed {
    /// Reads a sealed file: its header, and every hash into its filter.
    fn load(path: &Path) -> Result<(Sealed, (u64, u64))> {
        let bad = |what: &str| StoreError::Corrupt(format!("{}: {what}", path.display()));
        let raw = fs::read(path).map_err(|e| io_error(path, e))?;
        if raw.len() < HEADER || &raw[..4] != MAGIC {
            return Err(bad("not a de-duplication id file"));
        }
        let mut header = &raw[4..HEADER];
        let _channel = header.get_u32_le();
        let count = header.get_u64_le();
        let _oldest = header.get_u64_le();
        let newest = header.get_u64_le();
        let covers = (header.get_u64_le(), header.get_u64_le());
        let body = &raw[HEADER..];
        if body.len() as u64 != count * ENTRY as u64 {
            return Err(bad("truncated"));
        }
        let entries: Vec<(u128, Entry)> = body
            .chunks_exact(ENTRY)
            .map(|e| {
                let h = u128::from_le_bytes(e[..16].try_into().expect("16 bytes"));
                let seq = u64::from_le_bytes(e[16..24].try_into().expect("8 bytes"));
                let publish_ms = u64::from_le_bytes(e[24..].try_into().expect("8 bytes"));
                (h, Entry { seq, publish_ms })
            })
            .collect();
        let sealed = Sealed::from_entries(path.to_owned(), &entries, newest);
        Ok((sealed, covers))
    }

    fn from_entries(path: PathBuf, entries: &[(u128, Entry)], newest: u64) -> Sealed {
        let mut bloom = Bloom::new(entries.len());
        for (h, _) in entries {
            bloom.insert(*h);
        }
        Sealed {
            path,
            count: entries.len() as u64,
            newest_ms: newest,
            bloom,
            sparse: entries.iter().step_by(SPARSE).map(|(h, _)| *h).collect(),
        }
    }

    /// Looks `h` up in the file: one read of the run of entries the sparse hashes point at.
    fn find(&self, h: u128) -> Result<Option<Entry>> {
        let run = self.sparse.partition_point(|&s| s <= h);
        let Some(run) = run.checked_sub(1) else {
            return Ok(None);
        };
        let first = (run * SPARSE) as u64;
        let len = (self.count - first).min(SPARSE as u64) as usize;
        let mut raw = vec![0; len * ENTRY];
        // Opened for the lookup only: a file a lookup reads is rare (a filter said "maybe"),
        // and many channels' files must not hold as many descriptors.
        File::open(&self.path)
            .and_then(|file| file.read_exact_at(&mut raw, HEADER as u64 + first * ENTRY as u64))
            .map_err(|e| io_error(&self.path, e))?;
        Ok(raw
            .chunks_exact(ENTRY)
            .find(|e| u128::from_le_bytes(e[..16].try_into().expect("16 bytes")) == h)
            .map(|e| Entry {
                seq: u64::from_le_bytes(e[16..24].try_into().expect("8 bytes")),
                publish_ms: u64::from_le_bytes(e[24..].try_into().expect("8 bytes")),
            }))
    }
}

/// The channel and number a sealed file's name says.
fn parse_name(path: &Path) -> Option<(ChannelId, u64)> {
    if path.extension()? != "ids" {
        return None;
    }
    let (channel, number) = path.file_stem()?.to_str()?.split_once('-')?;
    Some((ChannelId(channel.parse().ok()?), number.parse().ok()?))
}

/// A blocked Bloom filter: an id's bits all lie in one 512-bit block (one cache line).
struct Bloom {
    blocks: Vec<[u64; 8]>,
}

impl Bloom {
    fn new(ids: usize) -> Bloom {
        let blocks = (ids * BITS_PER_ID).div_ceil(512).max(1);
        Bloom {
            blocks: vec![[0; 8]; blocks],
        }
    }

    /// The block and the bits of `h` (the hash is already uniform: its parts are used).
    fn bits(&self, h: u128) -> (usize, [(usize, u64); PROBES]) {
        let block = ((h >> 64) as u64 % self.blocks.len() as u64) as usize;
        let low = h as u64;
        let bits = std::array::from_fn(|i| {
            let bit = (low >> (i * 9)) & 511;
            ((bit / 64) as usize, 1u64 << (bit % 64))
        });
        (block, bits)
    }

    fn insert(&mut self, h: u128) {
        let (block, bits) = self.bits(h);
        let block = &mut self.blocks[block];
        for (word, mask) in bits {
            block[word] |= mask;
        }
    }

    fn contains(&self, h: u128) -> bool {
        let (block, bits) = self.bits(h);
        let block = &self.blocks[block];
        bits.iter().all(|&(word, mask)| block[word] & mask != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_found_in_memory_and_in_sealed_files_until_they_leave_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let mut index = IdIndex::open(dir.path(), &db).unwrap();
        let orders = ChannelId(3);
        let entries: Vec<(u64, String)> = (1..=5000).map(|i| (i, format!("order-{i}"))).collect();
        index.insert(orders, 1_000, &entries[..2500]);
        index.seal(&db, orders).unwrap();
        index.insert(orders, 2_000, &entries[2500..]);
        for (seq, id) in entries.iter().step_by(97) {
            assert_eq!(index.find(orders, id, 2_500, 60_000).unwrap(), Some(*seq));
        }
        assert_eq!(index.find(orders, "order-0", 2_500, 60_000).unwrap(), None);
        assert_eq!(
            index.find(ChannelId(4), "order-1", 2_500, 60_000).unwrap(),
            None
        );
        // Out of the window: not found, and the sealed file goes.
        assert_eq!(index.find(orders, "order-7", 70_000, 60_000).unwrap(), None);
        assert_eq!(
            index.find(orders, "order-4000", 61_500, 60_000).unwrap(),
            Some(4000)
        );
        index.maintain(&db, 61_500, |_| Some(60_000)).unwrap();
        let files = || fs::read_dir(dir.path().join("ids")).unwrap().count();
        assert_eq!(
            files(),
            1,
            "the in-memory ids were sealed, the old file deleted"
        );
        // Reopened: the sealed files come back.
        drop(index);
        let index = IdIndex::open(dir.path(), &db).unwrap();
        assert_eq!(
            index.find(orders, "order-4000", 61_500, 60_000).unwrap(),
            Some(4000)
        );
    }

    #[test]
    fn a_bloom_filter_knows_what_it_holds_and_rarely_more() {
        let mut bloom = Bloom::new(100_000);
        for i in 0..100_000u32 {
            bloom.insert(hash(&i.to_string()));
        }
        assert!((0..100_000u32).all(|i| bloom.contains(hash(&i.to_string()))));
        let false_positives = (100_000..200_000u32)
            .filter(|i| bloom.contains(hash(&i.to_string())))
            .count();
        assert!(false_positives < 2_000, "{false_positives} of 100,000");
    }
}
