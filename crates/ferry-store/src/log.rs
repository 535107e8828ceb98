//! The read side of a channel: its newest messages decoded in memory, older ones read from disk.
//!
//! Live subscribers read from the tail cache, so fan-out to many subscriptions decodes nothing
//! and copies no payload; a subscriber that has fallen behind finds records through the sled
//! index and reads them from their segment files, and the broker's memory stays bounded by the
//! cache budget, not by the backlog.
//!
//! The budget is broker-wide ([`MessageCache`]): every channel's tail counts against it, at the
//! messages' real size in memory, and when it is exceeded the channels read least recently give
//! up their oldest cached messages first. A channel nobody reads (its subscribers are far
//! behind, or it has none) so holds no memory that a live channel could use, and a thousand
//! channels need no more memory than one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::watch;

use crate::codec::{RecordLocation, decode_record, parse_record_key, record_key};
use crate::segment::Segments;
use crate::{ChannelId, ChannelStats, Message, Result, StoreError};

/// The broker-wide budget of decoded messages, shared by every channel's tail.
pub(crate) struct MessageCache {
    /// All tails together hold at most this many bytes (after each commit's eviction)...
    limit: usize,
    /// ...and one channel's tail at most this many.
    per_channel: usize,
    used: AtomicUsize,
    /// Read times are kept in milliseconds since this.
    epoch: Instant,
}

impl MessageCache {
    pub(crate) fn new(limit: usize, per_channel: usize) -> Self {
        Self {
            limit,
            per_channel: per_channel.min(limit),
            used: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    /// Bytes cached now, all channels together.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Brings the cache back under its budget: the channels read least recently give up their
    /// oldest messages first. Evicts down to 7/8 of the budget, so that the next commits do not
    /// each pay for a pass over all channels.
    pub(crate) fn enforce(&self, logs: &RwLock<HashMap<ChannelId, Arc<ChannelLog>>>) {
        if self.used() <= self.limit {
            return;
        }
        let target = self.limit - self.limit / 8;
        let mut coldest: Vec<(u64, Arc<ChannelLog>)> = logs
            .read()
            .expect("logs lock")
            .values()
            .map(|log| (log.last_read.load(Ordering::Acquire), log.clone()))
            .collect();
        coldest.sort_unstable_by_key(|(read, log)| (*read, log.id()));
        for (_, log) in coldest {
            let used = self.used();
            if used <= target {
                break;
            }
            log.shed(used - target);
        }
    }
}

/// One channel's log as readers see it. The writer thread updates it after each commit, so
/// everything readable here is durable.
pub struct ChannelLog {
    id: ChannelId,
    db: sled::Db,
    segments: Arc<Segments>,
    /// The durable end (next sequence); readers wait on it for new messages.
    end: watch::Sender<u64>,
    /// Sequences withdrawn from the channel (redriven dead letters), as sorted ranges: every
    /// subscription counts them as acked.
    withdrawn: watch::Sender<Arc<[(u64, u64)]>>,
    state: Mutex<LogState>,
    cache: Arc<MessageCache>,
    /// When a reader last asked for messages (ms since the cache's epoch): the coldest channels
    /// are evicted first.
    last_read: AtomicU64,
}

struct LogState {
    /// Damaged records found so far (by first sequence), each reported once.
    damaged: BTreeMap<u64, StoreError>,
    /// Consecutive messages ending at `stats.next_seq - 1`.
    tail: VecDeque<Arc<Message>>,
    /// Their heap size, counted in the cache's budget.
    tail_bytes: usize,
    /// sled indexes every message below this sequence. The writer answers a commit before it
    /// applies the commit's index, so the tail keeps the messages from here on whatever its
    /// bounds: a reader that misses the tail must find what it missed in sled.
    indexed: u64,
    stats: ChannelStats,
}

impl ChannelLog {
    pub(crate) fn new(
        id: ChannelId,
        db: sled::Db,
        segments: Arc<Segments>,
        stats: ChannelStats,
        cache: Arc<MessageCache>,
    ) -> Self {
        let (end, _) = watch::channel(stats.next_seq);
        let state = LogState {
            damaged: BTreeMap::new(),
            tail: VecDeque::new(),
            tail_bytes: 0,
            indexed: stats.next_seq,
            stats,
        };
        Self {
            id,
            db,
            segments,
            end,
            withdrawn: watch::channel(Arc::from(Vec::new())).0,
            state: Mutex::new(state),
            last_read: AtomicU64::new(cache.now_ms()),
            cache,
        }
    }

    /// The channel this log belongs to.
    pub fn id(&self) -> ChannelId {
        self.id
    }

    /// A watch on the sequences withdrawn from the channel (durably), as sorted ranges
    /// `[start, end)`.
    pub fn watch_withdrawn(&self) -> watch::Receiver<Arc<[(u64, u64)]>> {
        self.withdrawn.subscribe()
    }

    pub(crate) fn set_withdrawn(&self, ranges: Vec<(u64, u64)>) {
        self.withdrawn.send_replace(Arc::from(ranges));
    }

    /// Bytes of the records that end at or below `floor` (sequence): what the channel keeps
    /// only for retention when `floor` is its lowest subscription floor.
    pub(crate) fn bytes_below(&self, floor: u64) -> Result<u64> {
        let mut bytes = 0;
        let mut previous: Option<u32> = None;
        for entry in self
            .db
            .range(record_key(self.id, 0)..=record_key(self.id, floor))
        {
            let (key, value) = entry?;
            // A record counts once the next one starts at or below the floor.
            if parse_record_key(&key)? <= floor
                && let Some(len) = previous.replace(RecordLocation::decode(&value)?.len)
            {
                bytes += u64::from(len);
            }
        }
        // The last record below the floor ends there if the floor is at or past the end of what
        // sled indexes (read after the scan: the scan saw no record past it).
        if let Some(len) = previous
            && floor >= self.lock().indexed
        {
            bytes += u64::from(len);
        }
        Ok(bytes)
    }

    /// The log's figures now.
    pub fn stats(&self) -> ChannelStats {
        self.lock().stats
    }

    /// Watches the durable end: it changes whenever messages are appended.
    pub fn watch_end(&self) -> watch::Receiver<u64> {
        self.end.subscribe()
    }

    /// Up to `max_messages` consecutive messages from `from` (or from the first one stored after
    /// it), stopping once `max_bytes` is reached; the first message is returned whatever its size.
    pub fn read(
        &self,
        from: u64,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<Arc<Message>>> {
        self.last_read.store(self.cache.now_ms(), Ordering::Release);
        let mut out = Vec::new();
        let mut from = from;
        loop {
            let cached_from = {
                let state = self.lock();
                let cached_from = tail_start(&state);
                if from >= cached_from {
                    take_from_tail(&state, from, max_messages, max_bytes, &mut out);
                    return Ok(out);
                }
                cached_from
            };
            let whole = self.read_stored(from, cached_from, max_messages, max_bytes, &mut out)?;
            if !whole || out.len() >= max_messages || bytes_of(&out) >= max_bytes {
                return Ok(out);
            }
            // The tail may have moved on past `cached_from` while sled was read: what lies
            // between is in sled by now, so the next round reads it there.
            from = out
                .last()
                .map_or(cached_from, |m| m.sequence + 1)
                .max(cached_from);
        }
    }

    /// The message with this sequence, if it is still stored.
    pub fn get(&self, sequence: u64) -> Result<Option<Arc<Message>>> {
        let found = self.read(sequence, 1, 0)?;
        Ok(found.into_iter().next().filter(|m| m.sequence == sequence))
    }

    /// Reads whole records from sled, keeping the messages in `[from, until)`; false if it
    /// stopped short at a record it could not read (after handing back what came before it).
    fn read_stored(
        &self,
        from: u64,
        until: u64,
        max_messages: usize,
        max_bytes: usize,
        out: &mut Vec<Arc<Message>>,
    ) -> Result<bool> {
        let id = self.id;
        // The record holding `from` is the last one starting at or before it.
        let start = match self
            .db
            .range(record_key(id, 0)..=record_key(id, from))
            .next_back()
        {
            Some(entry) => parse_record_key(&entry?.0)?,
            None => from,
        };
        // What earlier rounds of the read handed over counts too.
        let mut bytes = bytes_of(out);
        for entry in self.db.range(record_key(id, start)..record_key(id, until)) {
            let (key, value) = entry?;
            let first = parse_record_key(&key)?;
            let at = RecordLocation::decode(&value)?;
            let decoded = self
                .segments
                .read(at)
                .and_then(|framed| decode_record(id, first, &framed));
            let messages = match decoded {
                Ok(messages) => messages,
                // What was read before it goes out first; the caller then asks from here.
                Err(_) if !out.is_empty() => return Ok(false),
                Err(e) => return Err(self.damaged(first, at, e)),
            };
            for message in messages {
                if message.sequence < from || message.sequence >= until {
                    continue;
                }
                bytes += message.size();
                out.push(Arc::new(message));
                if out.len() >= max_messages || bytes >= max_bytes {
                    return Ok(true);
                }
            }
        }
        Ok(true)
    }

    /// Records (and reports, the first time) a record that cannot be read; returns the error
    /// that tells readers which sequences it held.
    fn damaged(&self, first: u64, at: RecordLocation, cause: StoreError) -> StoreError {
        // Read before sled is: with no record after it there, the damaged one ends where sled's
        // index did then, not at the log's end, whose newest messages sled may not index yet.
        let indexed = self.lock().indexed;
        let end = self
            .db
            .range(record_key(self.id, first + 1)..=record_key(self.id, u64::MAX))
            .next()
            .and_then(|entry| entry.ok())
            .and_then(|(key, _)| parse_record_key(&key).ok())
            .unwrap_or(indexed);
        let reason = match cause {
            StoreError::Corrupt(reason) => reason,
            other => other.to_string(),
        };
        let error = StoreError::Damaged {
            segment: at.segment,
            offset: at.offset,
            first_seq: first,
            end_seq: end.max(first + 1),
            reason,
        };
        self.mark_damaged(error.clone());
        error
    }

    /// Counts a damaged record (found on read or by the start-up check), reporting it once.
    pub(crate) fn mark_damaged(&self, error: StoreError) {
        let StoreError::Damaged { first_seq, .. } = &error else {
            return;
        };
        let mut state = self.lock();
        if !state.damaged.contains_key(first_seq) {
            tracing::error!(channel = self.id.0, error = %error, "damaged message record: its messages are lost");
            state.damaged.insert(*first_seq, error);
        }
    }

    /// Damaged records found since the store was opened, and the messages they held.
    pub fn damage(&self) -> (u64, u64) {
        let state = self.lock();
        let messages = state
            .damaged
            .values()
            .map(|e| match e {
                StoreError::Damaged {
                    first_seq, end_seq, ..
                } => end_seq - first_seq,
                _ => 0,
            })
            .sum();
        (state.damaged.len() as u64, messages)
    }

    /// Called by the writer after a commit made these messages durable.
    /// The caller then runs [`MessageCache::enforce`].
    pub(crate) fn appended(&self, messages: Vec<Message>, stats: ChannelStats) {
        let mut state = self.lock();
        let mut added = 0;
        for message in messages {
            added += message.heap_size() + TAIL_ENTRY;
            state.tail.push_back(Arc::new(message));
        }
        state.tail_bytes += added;
        self.cache.used.fetch_add(added, Ordering::AcqRel);
        state.stats = stats;
        self.trim(&mut state);
        drop(state);
        self.end.send_replace(stats.next_seq);
    }

    /// Called by the writer once sled holds the index of every message below `end`: the tail
    /// may let go of them.
    pub(crate) fn indexed(&self, end: u64) {
        let mut state = self.lock();
        if end > state.indexed {
            state.indexed = end;
            self.trim(&mut state);
        }
    }

    /// Called by the writer after records were deleted.
    pub(crate) fn collected(&self, stats: ChannelStats) {
        let mut state = self.lock();
        state.stats = stats;
        self.trim(&mut state);
    }

    /// Drops what is no longer stored, and the oldest messages past the per-channel bound.
    fn trim(&self, state: &mut LogState) {
        let mut freed = 0;
        while let Some(front) = state.tail.front() {
            let within = state.tail_bytes - freed <= self.cache.per_channel;
            if front.sequence >= state.indexed
                || (within && front.sequence >= state.stats.first_seq)
            {
                break;
            }
            freed += front.heap_size() + TAIL_ENTRY;
            state.tail.pop_front();
        }
        self.release(state, freed);
    }

    /// Drops the oldest cached messages until about `bytes` are freed.
    fn shed(&self, bytes: usize) {
        let mut state = self.lock();
        let mut freed = 0;
        while freed < bytes {
            match state.tail.front() {
                Some(front) if front.sequence < state.indexed => {}
                _ => break,
            }
            let front = state.tail.pop_front().expect("looked at");
            freed += front.heap_size() + TAIL_ENTRY;
        }
        self.release(&mut state, freed);
    }

    fn release(&self, state: &mut LogState, freed: usize) {
        state.tail_bytes -= freed;
        self.cache.used.fetch_sub(freed, Ordering::AcqRel);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().expect("channel log lock")
    }
}

impl Drop for ChannelLog {
    fn drop(&mut self) {
        let state = self.state.get_mut().expect("channel log lock");
        self.cache
            .used
            .fetch_sub(state.tail_bytes, Ordering::AcqRel);
    }
}

/// What a cached message costs beyond its own heap size: its slot in the tail.
const TAIL_ENTRY: usize = size_of::<Arc<Message>>();

fn bytes_of(out: &[Arc<Message>]) -> usize {
    out.iter().map(|m| m.size()).sum()
}

/// The first sequence held in the tail cache (the end of the log when it is empty).
fn tail_start(state: &LogState) -> u64 {
    state
        .tail
        .front()
        .map_or(state.stats.next_seq, |m| m.sequence)
}

/// Appends cached messages from `from` to `out` until `out` holds `max_messages` or
/// `max_bytes` (counting what it held already; a first message always fits).
fn take_from_tail(
    state: &LogState,
    from: u64,
    max_messages: usize,
    max_bytes: usize,
    out: &mut Vec<Arc<Message>>,
) {
    let Some(front) = state.tail.front() else {
        return;
    };
    // Messages before the cache's front are not here: returning later ones would skip them.
    if front.sequence > from {
        return;
    }
    let skip = (from - front.sequence) as usize;
    let mut bytes = bytes_of(out);
    for message in state.tail.iter().skip(skip) {
        if out.len() >= max_messages || (bytes >= max_bytes && !out.is_empty()) {
            break;
        }
        bytes += message.size();
        out.push(message.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(sequence: u64) -> Message {
        Message {
            sequence,
            publish_time_ms: 0,
            key: String::new(),
            id: String::new(),
            attributes: Default::default(),
            payload: bytes::Bytes::from(vec![7u8; 100]),
        }
    }

    /// The writer answers a commit before sled indexes it: until then the tail must hold its
    /// messages whatever its bounds, or a reader would find them nowhere.
    #[test]
    fn the_tail_keeps_what_sled_does_not_index_yet() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        // No room for any message in the tail, in its channel or in all.
        let cache = Arc::new(MessageCache::new(0, 0));
        let stats = |next_seq| ChannelStats {
            next_seq,
            first_seq: 1,
            ..ChannelStats::default()
        };
        let log = Arc::new(ChannelLog::new(
            ChannelId(1),
            db,
            segments,
            stats(1),
            cache.clone(),
        ));
        let logs = RwLock::new(HashMap::from([(ChannelId(1), log.clone())]));
        log.appended(vec![message(1), message(2)], stats(3));
        cache.enforce(&logs);
        log.shed(usize::MAX);
        let read = log.read(1, 10, 1 << 20).unwrap();
        let sequences: Vec<u64> = read.iter().map(|m| m.sequence).collect();
        assert_eq!(sequences, [1, 2]);
        assert!(cache.used() > 0);

        log.indexed(3);
        assert_eq!(cache.used(), 0, "indexed, the messages leave the tail");
    }

    /// A damaged record that is the last one sled indexes ends where sled's index does, not at
    /// the log's end: the messages after it may be answered but not indexed yet, and are good.
    #[test]
    fn damage_does_not_reach_past_what_sled_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        std::fs::write(segments.path(1), vec![0xAB; 64]).unwrap();
        let at = RecordLocation {
            segment: 1,
            offset: 0,
            len: 64,
            publish_ms: 0,
        };
        db.insert(record_key(ChannelId(1), 1), &at.encode())
            .unwrap();
        let cache = Arc::new(MessageCache::new(0, 0));
        let stats = |next_seq| ChannelStats {
            next_seq,
            first_seq: 1,
            ..ChannelStats::default()
        };
        // Sequences 1 and 2 are in the damaged record; 3 and 4 are answered, not indexed.
        let log = ChannelLog::new(ChannelId(1), db, segments, stats(3), cache);
        log.appended(vec![message(3), message(4)], stats(5));
        match log.read(1, 10, 1 << 20) {
            Err(StoreError::Damaged {
                first_seq, end_seq, ..
            }) => assert_eq!((first_seq, end_seq), (1, 3)),
            other => panic!("{other:?}"),
        }
        let read = log.read(3, 10, 1 << 20).unwrap();
        let sequences: Vec<u64> = read.iter().map(|m| m.sequence).collect();
        assert_eq!(sequences, [3, 4]);
    }
}
