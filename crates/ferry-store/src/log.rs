//! The read side of a channel: its newest messages decoded in memory, older ones read from disk.
//!
//! Live subscribers read from the tail cache, so fan-out to many subscriptions decodes nothing
//! and copies no payload; a subscriber that has fallen behind finds records through the sled
//! index and reads them from their segment files, and the broker's memory stays bounded by the
//! cache budget, not by the backlog.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::codec::{RecordLocation, decode_record, parse_record_key, record_key};
use crate::segment::Segments;
use crate::{ChannelId, ChannelStats, Message, Result};

/// One channel's log as readers see it. The writer thread updates it after each commit, so
/// everything readable here is durable.
pub struct ChannelLog {
    id: ChannelId,
    db: sled::Db,
    segments: Arc<Segments>,
    /// The durable end (next sequence); readers wait on it for new messages.
    end: watch::Sender<u64>,
    state: Mutex<LogState>,
    tail_budget: usize,
}

struct LogState {
    /// Consecutive messages ending at `stats.next_seq - 1`.
    tail: VecDeque<Arc<Message>>,
    tail_bytes: usize,
    stats: ChannelStats,
}

impl ChannelLog {
    pub(crate) fn new(
        id: ChannelId,
        db: sled::Db,
        segments: Arc<Segments>,
        stats: ChannelStats,
        tail_budget: usize,
    ) -> Self {
        let (end, _) = watch::channel(stats.next_seq);
        let state = LogState {
            tail: VecDeque::new(),
            tail_bytes: 0,
            stats,
        };
        Self {
            id,
            db,
            segments,
            end,
            state: Mutex::new(state),
            tail_budget,
        }
    }

    /// The channel this log belongs to.
    pub fn id(&self) -> ChannelId {
        self.id
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
        let mut out = Vec::new();
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
            self.read_stored(from, cached_from, max_messages, max_bytes, &mut out)?;
            if out.len() >= max_messages || bytes_of(&out) >= max_bytes {
                return Ok(out);
            }
            let next = out.last().map_or(cached_from, |m| m.sequence + 1);
            let state = self.lock();
            if next >= tail_start(&state) {
                take_from_tail(&state, next, max_messages, max_bytes, &mut out);
                return Ok(out);
            }
            // While sled was read the tail moved on past `next`: what lies between is in sled
            // by now. Hand back what was read (the caller asks again from its end), or, with
            // nothing read, read again rather than skip those messages.
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    /// The message with this sequence, if it is still stored.
    pub fn get(&self, sequence: u64) -> Result<Option<Arc<Message>>> {
        let found = self.read(sequence, 1, 0)?;
        Ok(found.into_iter().next().filter(|m| m.sequence == sequence))
    }

    /// Reads whole records from sled, keeping the messages in `[from, until)`.
    fn read_stored(
        &self,
        from: u64,
        until: u64,
        max_messages: usize,
        max_bytes: usize,
        out: &mut Vec<Arc<Message>>,
    ) -> Result<()> {
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
        let mut bytes = 0;
        for entry in self.db.range(record_key(id, start)..record_key(id, until)) {
            let (key, value) = entry?;
            let first = parse_record_key(&key)?;
            let framed = self.segments.read(RecordLocation::decode(&value)?)?;
            for message in decode_record(id, first, &framed)? {
                if message.sequence < from || message.sequence >= until {
                    continue;
                }
                bytes += message.size();
                out.push(Arc::new(message));
                if out.len() >= max_messages || bytes >= max_bytes {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Called by the writer after a commit made these messages durable.
    pub(crate) fn appended(&self, messages: Vec<Message>, stats: ChannelStats) {
        let mut state = self.lock();
        for message in messages {
            state.tail_bytes += message.size() + TAIL_OVERHEAD;
            state.tail.push_back(Arc::new(message));
        }
        state.stats = stats;
        self.trim(&mut state);
        drop(state);
        self.end.send_replace(stats.next_seq);
    }

    /// Called by the writer after records were deleted.
    pub(crate) fn collected(&self, stats: ChannelStats) {
        let mut state = self.lock();
        state.stats = stats;
        self.trim(&mut state);
    }

    fn trim(&self, state: &mut LogState) {
        while let Some(front) = state.tail.front() {
            if state.tail_bytes <= self.tail_budget && front.sequence >= state.stats.first_seq {
                break;
            }
            state.tail_bytes -= front.size() + TAIL_OVERHEAD;
            state.tail.pop_front();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().expect("channel log lock")
    }
}

/// What a cached message costs beyond its bytes (the Arc, the struct, the strings' headers).
const TAIL_OVERHEAD: usize = 160;

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
