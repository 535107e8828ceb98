//! The store's on-disk formats: key layout, message records, and metadata values.
//!
//! Metadata, ack state and the index of message records live in one sled tree, so that a
//! publish and its bookkeeping, or an ack and the deletions it allows, change together in one
//! atomic batch. Keys start with a one-byte kind:
//!
//! | key | value |
//! | --- | --- |
//! | `V` | format version |
//! | `I` | next channel / subscription id (u32) |
//! | `C` channel(u32) | [`ChannelRecord`]: name and log bounds |
//! | `S` subscription(u32) | [`SubscriptionRecord`]: channel, name, settings |
//! | `A` subscription(u32) | [`AckState`]: the ack floor and acked ranges above it |
//! | `M` channel(u32) first_seq(u64) | [`RecordLocation`]: where a message record is |
//! | `G` segment(u32) | [`SegmentUsage`]: how many indexed records a segment file still holds |
//! | `P` | [`LogPosition`]: where the index's view of the segment log ends |
//! | `O` channel(u32) | (empty) a channel the log holds records of but the index lost |
//! | `F` subscription(u32) seq(u64) | [`Failure`]: a message's failed deliveries so far |
//! | `W` channel(u32) | sequences withdrawn from the channel (redriven dead letters) |
//! | `E` channel(u32) time(u64) seq(u64) | a commit's published ids, until they are sealed into the id index (`ids.rs`) |
//! | `T` channel(u32) due(u64) number(u64) | a delayed message (a one-message record body) |
//! | `X` channel(u32) | (empty) a deleted channel whose `D`, `E` and `T` keys are being swept |
//!
//! The message records themselves are appended to segment files (see `segment.rs`), not to
//! sled: sled stores large values by rewriting whole tree pages, which costs CPU, memory and
//! disk space that it never gives back, while a segment file is written once and deleted whole.
//! A record holds consecutive messages of one channel (those of one group commit, up to
//! [`RECORD_TARGET_BYTES`]), so many messages share one index entry. It starts with a header
//! carrying the message count, the body length and a CRC32 of the body, so a torn or damaged
//! record is detected on read. Integers are big-endian in keys (so that byte order is numeric
//! order) and little-endian in values.

use bytes::{Buf, BufMut, Bytes};

use crate::message::AttributesBuilder;
use crate::{
    AckState, Attributes, ChannelId, ChannelLimits, ChannelSettings, Failure, LimitPolicy, Message,
    NewMessage, Retention, RetryPolicy, StoreError, SubscriptionId, SubscriptionSettings,
};

/// The version of this layout, stored under `V`. Older stores open too and are upgraded in
/// place: version 3 records are read as before (each its own commit), version 2 records are
/// read but cannot be found by a scan of the segment files.
pub(crate) const FORMAT_VERSION: u32 = 4;
/// Versions upgraded in place on open.
pub(crate) const FORMAT_VERSION_3: u32 = 3;
pub(crate) const FORMAT_VERSION_2: u32 = 2;
/// A group's messages for one channel are cut into records of about this many body bytes.
pub(crate) const RECORD_TARGET_BYTES: usize = 256 * 1024;
/// Version 2 records: magic, count, body length, CRC.
const RECORD_MAGIC_V2: u8 = 0xF1;
const RECORD_HEADER_LEN_V2: usize = 1 + 4 + 4 + 4;
/// Version 3 records also say whose they are (channel, first sequence), so that the segment
/// files alone are enough to find every record and rebuild the index. Each stands alone: it
/// counts as committed once it is intact.
const RECORD_MAGIC_V3: u8 = 0xF2;
/// Version 4: a commit's message records (same header as version 3)...
const RECORD_MAGIC: u8 = 0xF4;
/// ...followed by its commit frame, which carries everything else the commit changed (see
/// `change.rs`) and how many message records precede it: a commit counts only once its
/// commit frame is intact, so a commit torn by a crash is ignored whole.
const COMMIT_MAGIC: u8 = 0xF3;
pub(crate) const RECORD_HEADER_LEN: usize = 1 + 4 + 8 + 4 + 4 + 4;

/// What a frame in a segment file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameKind {
    /// A version 3 message record: a commit of its own.
    Standalone,
    /// A message record of the commit whose commit frame follows.
    Member,
    /// The end of a commit: its changes; `count` says how many member records precede it.
    Commit,
}

pub(crate) const KEY_VERSION: &[u8] = b"V";
pub(crate) const KEY_NEXT_ID: &[u8] = b"I";
/// Where the index's view of the segment log ends: records after it are replayed on open.
pub(crate) const KEY_LOG_END: &[u8] = b"P";

/// A position in the segment log: a segment file and an offset in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct LogPosition {
    pub segment: u32,
    pub offset: u64,
}

impl LogPosition {
    pub fn encode(&self) -> [u8; 12] {
        let mut out = [0; 12];
        out[..4].copy_from_slice(&self.segment.to_le_bytes());
        out[4..].copy_from_slice(&self.offset.to_le_bytes());
        out
    }

    pub fn decode(mut raw: &[u8]) -> Result<Self, StoreError> {
        if raw.len() != 12 {
            return Err(StoreError::Corrupt("bad log position".into()));
        }
        Ok(Self {
            segment: raw.get_u32_le(),
            offset: raw.get_u64_le(),
        })
    }
}

pub(crate) fn channel_key(id: ChannelId) -> [u8; 5] {
    prefixed(b'C', id.0)
}

pub(crate) fn subscription_key(id: SubscriptionId) -> [u8; 5] {
    prefixed(b'S', id.0)
}

pub(crate) fn ack_key(id: SubscriptionId) -> [u8; 5] {
    prefixed(b'A', id.0)
}

fn prefixed(kind: u8, id: u32) -> [u8; 5] {
    let mut key = [kind; 5];
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

/// The index key of the record that starts at `first_seq`.
pub(crate) fn record_key(channel: ChannelId, first_seq: u64) -> [u8; 13] {
    let mut key = [b'M'; 13];
    key[1..5].copy_from_slice(&channel.0.to_be_bytes());
    key[5..].copy_from_slice(&first_seq.to_be_bytes());
    key
}

/// Every record key of a channel starts with this.
pub(crate) fn channel_log_prefix(channel: ChannelId) -> [u8; 5] {
    prefixed(b'M', channel.0)
}

/// The first sequence of the record an index key names.
pub(crate) fn parse_record_key(key: &[u8]) -> Result<u64, StoreError> {
    parse_sequence_key(b'M', key)
}

/// The sequence in a key of `kind` (an id, then a sequence).
fn parse_sequence_key(kind: u8, key: &[u8]) -> Result<u64, StoreError> {
    match key {
        [k, _, _, _, _, seq @ ..] if *k == kind && seq.len() == 8 => {
            Ok(u64::from_be_bytes(seq.try_into().expect("8 bytes")))
        }
        _ => Err(StoreError::Corrupt(format!(
            "bad {} key {key:?}",
            char::from(kind)
        ))),
    }
}

/// The index key of the catalog entry `name`.
pub(crate) fn catalog_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(b'K');
    key.extend_from_slice(name.as_bytes());
    key
}

/// The name in a catalog entry's index key.
pub(crate) fn parse_catalog_key(key: &[u8]) -> Result<String, StoreError> {
    let bad = || {
        let text = String::from_utf8_lossy(key);
        StoreError::Corrupt(format!("bad catalog key {text:?}"))
    };
    match key.split_first() {
        Some((b'K', name)) => std::str::from_utf8(name)
            .map(str::to_owned)
            .map_err(|_| bad()),
        _ => Err(bad()),
    }
}

/// Marks a channel id whose records the segment log holds but the index lost: its records are
/// kept (their segment files pinned) until `ferry repair` brings the channel back.
pub(crate) fn orphan_key(channel: ChannelId) -> [u8; 5] {
    prefixed(b'O', channel.0)
}

pub(crate) fn segment_key(segment: u32) -> [u8; 5] {
    prefixed(b'G', segment)
}

/// Where a record is: its segment file, offset and length (header included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordLocation {
    pub segment: u32,
    pub offset: u64,
    pub len: u32,
    /// When its messages were published (one group's messages share it), in ms since the
    /// Unix epoch: what retention by age and seeking by time go by. 0 for an entry written
    /// before the index kept it.
    pub publish_ms: u64,
}

impl RecordLocation {
    pub fn encode(&self) -> [u8; 24] {
        let mut out = [0; 24];
        out[..4].copy_from_slice(&self.segment.to_le_bytes());
        out[4..12].copy_from_slice(&self.offset.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..].copy_from_slice(&self.publish_ms.to_le_bytes());
        out
    }

    pub fn decode(mut raw: &[u8]) -> Result<Self, StoreError> {
        if raw.len() != 16 && raw.len() != 24 {
            return Err(StoreError::Corrupt("bad record location".into()));
        }
        Ok(Self {
            segment: raw.get_u32_le(),
            offset: raw.get_u64_le(),
            len: raw.get_u32_le(),
            publish_ms: if raw.len() == 8 { raw.get_u64_le() } else { 0 },
        })
    }
}

/// How much of a segment file is still indexed; at zero records the file can go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SegmentUsage {
    pub records: u64,
    pub bytes: u64,
}

impl SegmentUsage {
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.records.to_le_bytes());
        out[8..].copy_from_slice(&self.bytes.to_le_bytes());
        out
    }

    pub fn decode(mut raw: &[u8]) -> Result<Self, StoreError> {
        if raw.len() != 16 {
            return Err(StoreError::Corrupt("bad segment usage".into()));
        }
        Ok(Self {
            records: raw.get_u64_le(),
            bytes: raw.get_u64_le(),
        })
    }
}

/// The bytes a message takes in a record's body.
pub(crate) fn encoded_len(m: &NewMessage) -> u64 {
    let attributes: usize = m
        .attributes
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len())
        .sum();
    (8 + 4 + m.key.len() + 4 + m.id.len() + 4 + attributes + 4 + m.payload.len()) as u64
}

/// Encodes messages as the body of one record.
pub(crate) fn encode_body(messages: &[NewMessage], publish_time_ms: u64, body: &mut Vec<u8>) {
    for m in messages {
        body.put_u64_le(publish_time_ms);
        put_str(body, &m.key);
        put_str(body, &m.id);
        body.put_u32_le(m.attributes.len() as u32);
        for (k, v) in m.attributes.iter() {
            put_str(body, k);
            put_str(body, v);
        }
        body.put_u32_le(m.payload.len() as u32);
        body.put_slice(&m.payload);
    }
}

/// The checksum of a record: it covers where the record belongs (channel, first sequence) and
/// its count as well as its body, so that neither a damaged header nor an index entry pointing
/// at the wrong bytes goes unnoticed.
fn record_crc(channel: ChannelId, first_seq: u64, count: u32, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&channel.0.to_le_bytes());
    hasher.update(&first_seq.to_le_bytes());
    hasher.update(&count.to_le_bytes());
    hasher.update(body);
    hasher.finalize()
}

/// Appends a framed message record (header, then the body) to `out`.
#[cfg(test)]
pub(crate) fn frame_record(
    channel: ChannelId,
    first_seq: u64,
    count: u32,
    body: &[u8],
    out: &mut Vec<u8>,
) {
    write_record(channel, first_seq, out, |out| {
        out.extend_from_slice(body);
        count
    });
}

/// Appends a message record to `out` whose body `body` encodes in place (returning how many
/// messages it wrote), so that no message is copied twice on its way to the log.
pub(crate) fn write_record(
    channel: ChannelId,
    first_seq: u64,
    out: &mut Vec<u8>,
    body: impl FnOnce(&mut Vec<u8>) -> u32,
) {
    let start = out.len();
    out.resize(start + RECORD_HEADER_LEN, 0);
    let count = body(out);
    let body = &out[start + RECORD_HEADER_LEN..];
    let (len, crc) = (
        body.len() as u32,
        record_crc(channel, first_seq, count, body),
    );
    let mut header = &mut out[start..start + RECORD_HEADER_LEN];
    header.put_u8(RECORD_MAGIC);
    header.put_u32_le(channel.0);
    header.put_u64_le(first_seq);
    header.put_u32_le(count);
    header.put_u32_le(len);
    header.put_u32_le(crc);
}

/// Appends the commit frame that ends a commit of `records` message records, carrying the
/// commit's encoded changes.
pub(crate) fn frame_commit(records: u32, changes: &[u8], out: &mut Vec<u8>) {
    frame(COMMIT_MAGIC, ChannelId(0), 0, records, changes, out);
}

fn frame(
    magic: u8,
    channel: ChannelId,
    first_seq: u64,
    count: u32,
    body: &[u8],
    out: &mut Vec<u8>,
) {
    out.put_u8(magic);
    out.put_u32_le(channel.0);
    out.put_u64_le(first_seq);
    out.put_u32_le(count);
    out.put_u32_le(body.len() as u32);
    out.put_u32_le(record_crc(channel, first_seq, count, body));
    out.extend_from_slice(body);
}

/// What a record's header says, read without knowing whose record it is (a segment scan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub kind: FrameKind,
    pub channel: ChannelId,
    pub first_seq: u64,
    pub count: u32,
    /// Header and body.
    pub len: u64,
    crc: u32,
    /// A message record's publish time, read from its body by a scan (0 until then).
    pub publish_ms: u64,
}

impl RecordHeader {
    /// Parses the header at the start of `bytes`; None if it is not a version 3 or 4 header (a
    /// torn or damaged frame, zeros, or a version 2 record, which says nothing of whose it is).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < RECORD_HEADER_LEN {
            return None;
        }
        let kind = match bytes[0] {
            RECORD_MAGIC_V3 => FrameKind::Standalone,
            RECORD_MAGIC => FrameKind::Member,
            COMMIT_MAGIC => FrameKind::Commit,
            _ => return None,
        };
        let mut header = &bytes[1..RECORD_HEADER_LEN];
        let channel = ChannelId(header.get_u32_le());
        let first_seq = header.get_u64_le();
        let count = header.get_u32_le();
        let body_len = header.get_u32_le();
        let crc = header.get_u32_le();
        Some(Self {
            kind,
            channel,
            first_seq,
            count,
            len: RECORD_HEADER_LEN as u64 + u64::from(body_len),
            crc,
            publish_ms: 0,
        })
    }

    /// Whether `body` is this record's body.
    pub fn matches(&self, body: &[u8]) -> bool {
        record_crc(self.channel, self.first_seq, self.count, body) == self.crc
    }
}

/// Checks the frame and checksum of the record of `channel` that starts at `first_seq`;
/// returns its message count and body.
pub(crate) fn check_record(
    channel: ChannelId,
    first_seq: u64,
    framed: &[u8],
) -> Result<(u32, &[u8]), StoreError> {
    let corrupt =
        |what: &str| StoreError::Corrupt(format!("record at sequence {first_seq}: {what}"));
    let (count, body_len, crc, body) = match framed.first() {
        Some(&(RECORD_MAGIC | RECORD_MAGIC_V3)) if framed.len() >= RECORD_HEADER_LEN => {
            let mut header = &framed[1..RECORD_HEADER_LEN];
            let (owner, first) = (header.get_u32_le(), header.get_u64_le());
            if owner != channel.0 || first != first_seq {
                return Err(corrupt(&format!(
                    "the index names channel {} sequence {first_seq}, the record is channel {owner} sequence {first}",
                    channel.0
                )));
            }
            let (count, body_len, crc) = (
                header.get_u32_le(),
                header.get_u32_le(),
                header.get_u32_le(),
            );
            (count, body_len as usize, crc, &framed[RECORD_HEADER_LEN..])
        }
        Some(&RECORD_MAGIC_V2) if framed.len() >= RECORD_HEADER_LEN_V2 => {
            let mut header = &framed[1..RECORD_HEADER_LEN_V2];
            let (count, body_len, crc) = (
                header.get_u32_le(),
                header.get_u32_le(),
                header.get_u32_le(),
            );
            (
                count,
                body_len as usize,
                crc,
                &framed[RECORD_HEADER_LEN_V2..],
            )
        }
        _ => return Err(corrupt("bad header")),
    };
    if body.len() != body_len {
        return Err(corrupt(&format!(
            "body is {} bytes, header says {body_len}",
            body.len()
        )));
    }
    if record_crc(channel, first_seq, count, body) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    Ok((count, body))
}

/// Decodes the framed record of `channel` that starts at `first_seq`.
pub(crate) fn decode_record(
    channel: ChannelId,
    first_seq: u64,
    framed: &[u8],
) -> Result<Vec<Message>, StoreError> {
    let corrupt =
        |what: &str| StoreError::Corrupt(format!("record at sequence {first_seq}: {what}"));
    let (count, body) = check_record(channel, first_seq, framed)?;
    // Each message gets its own copies of its bytes: a message handed out must never keep the
    // whole record (up to 256 KiB) alive.
    let mut cursor = body;
    let mut messages = Vec::with_capacity((count as usize).min(body.len() / 24 + 1));
    for i in 0..u64::from(count) {
        let (publish_time_ms, m) =
            decode_message(&mut cursor).ok_or_else(|| corrupt("truncated message"))?;
        messages.push(Message {
            sequence: first_seq + i,
            publish_time_ms,
            key: m.key,
            id: m.id,
            attributes: m.attributes,
            payload: m.payload,
        });
    }
    if cursor.has_remaining() {
        return Err(corrupt("bytes left after the last message"));
    }
    Ok(messages)
}

/// The persisted part of a channel: its name and the bounds of its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChannelRecord {
    pub name: String,
    /// The sequence the next message gets.
    pub next_seq: u64,
    /// The first sequence still stored (== next_seq when the log is empty).
    pub first_seq: u64,
    /// Encoded bytes of the records still stored.
    pub bytes: u64,
    /// Its settings.
    pub settings: ChannelSettings,
    /// Messages stored aside until their delivery time.
    pub delayed: u64,
    /// Their encoded bytes.
    pub delayed_bytes: u64,
    /// The number the next delayed message's key gets (unique within the channel).
    pub next_delayed: u64,
    /// Messages dropped to keep the channel within its limits, ever.
    pub dropped: u64,
}

/// A channel record's settings follow this tag (older records end before it: the defaults).
const CHANNEL_V3: u8 = 3;
/// Since delayed messages and limits: the whole settings, then the delayed messages' figures.
const CHANNEL_V4: u8 = 4;
const CHANNEL_SETTINGS_LEN: usize = 8 * 6 + 1;

impl ChannelRecord {
    /// A new channel's record, its log starting at `first_seq`.
    pub fn new(name: String, first_seq: u64) -> Self {
        Self {
            name,
            next_seq: first_seq,
            first_seq,
            bytes: 0,
            settings: ChannelSettings::default(),
            delayed: 0,
            delayed_bytes: 0,
            next_delayed: 0,
            dropped: 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(56 + self.name.len());
        put_str(&mut out, &self.name);
        out.put_u64_le(self.next_seq);
        out.put_u64_le(self.first_seq);
        out.put_u64_le(self.bytes);
        out.put_u8(CHANNEL_V4);
        encode_channel_settings(&self.settings, &mut out);
        out.put_u64_le(self.delayed);
        out.put_u64_le(self.delayed_bytes);
        out.put_u64_le(self.next_delayed);
        out.put_u64_le(self.dropped);
        out
    }

    pub fn decode(mut raw: &[u8]) -> Result<Self, StoreError> {
        let bad = || StoreError::Corrupt("bad channel record".into());
        let name = get_str_slice(&mut raw).ok_or_else(bad)?;
        if raw.remaining() < 24 {
            return Err(bad());
        }
        let (next_seq, first_seq, bytes) = (raw.get_u64_le(), raw.get_u64_le(), raw.get_u64_le());
        let mut record = Self {
            next_seq,
            bytes,
            ..Self::new(name, first_seq)
        };
        match raw.remaining() {
            0 => {}
            33 if raw.get_u8() == CHANNEL_V3 => {
                record.settings = ChannelSettings {
                    retention: Retention {
                        max_age_ms: raw.get_u64_le(),
                        max_bytes: raw.get_u64_le(),
                    },
                    dedup_window_ms: raw.get_u64_le(),
                    default_ttl_ms: raw.get_u64_le(),
                    ..ChannelSettings::default()
                };
            }
            n if n == 1 + CHANNEL_SETTINGS_LEN + 32 && raw.get_u8() == CHANNEL_V4 => {
                record.settings = decode_channel_settings(&mut raw).ok_or_else(bad)?;
                record.delayed = raw.get_u64_le();
                record.delayed_bytes = raw.get_u64_le();
                record.next_delayed = raw.get_u64_le();
                record.dropped = raw.get_u64_le();
            }
            _ => return Err(bad()),
        }
        Ok(record)
    }
}

/// Appends a channel's settings (`CHANNEL_SETTINGS_LEN` bytes).
pub(crate) fn encode_channel_settings(settings: &ChannelSettings, out: &mut Vec<u8>) {
    out.put_u64_le(settings.retention.max_age_ms);
    out.put_u64_le(settings.retention.max_bytes);
    out.put_u64_le(settings.dedup_window_ms);
    out.put_u64_le(settings.default_ttl_ms);
    out.put_u64_le(settings.limits.max_messages);
    out.put_u64_le(settings.limits.max_bytes);
    out.put_u8(match settings.limits.policy {
        LimitPolicy::Reject => 0,
        LimitPolicy::DropOldest => 1,
    });
}

/// Reads what [`encode_channel_settings`] wrote.
pub(crate) fn decode_channel_settings(raw: &mut &[u8]) -> Option<ChannelSettings> {
    if raw.remaining() < CHANNEL_SETTINGS_LEN {
        return None;
    }
    Some(ChannelSettings {
        retention: Retention {
            max_age_ms: raw.get_u64_le(),
            max_bytes: raw.get_u64_le(),
        },
        dedup_window_ms: raw.get_u64_le(),
        default_ttl_ms: raw.get_u64_le(),
        limits: ChannelLimits {
            max_messages: raw.get_u64_le(),
            max_bytes: raw.get_u64_le(),
            policy: match raw.get_u8() {
                0 => LimitPolicy::Reject,
                1 => LimitPolicy::DropOldest,
                _ => return None,
            },
        },
    })
}

/// The tombstone of a deleted channel whose keys are still being swept.
pub(crate) fn tombstone_key(channel: ChannelId) -> [u8; 5] {
    let mut key = [b'X'; 5];
    key[1..].copy_from_slice(&channel.0.to_be_bytes());
    key
}

/// The key of a delayed message of `channel`, due at `due_ms`.
pub(crate) fn delayed_key(channel: ChannelId, due_ms: u64, number: u64) -> [u8; 21] {
    let mut key = [0; 21];
    key[0] = b'T';
    key[1..5].copy_from_slice(&channel.0.to_be_bytes());
    key[5..13].copy_from_slice(&due_ms.to_be_bytes());
    key[13..].copy_from_slice(&number.to_be_bytes());
    key
}

/// Where a delayed message's key says it is due, and its number.
pub(crate) fn parse_delayed_key(key: &[u8]) -> Result<(u64, u64), StoreError> {
    match key {
        [b'T', _, _, _, _, due @ ..] if due.len() == 16 => Ok((
            u64::from_be_bytes(due[..8].try_into().expect("8 bytes")),
            u64::from_be_bytes(due[8..].try_into().expect("8 bytes")),
        )),
        _ => Err(StoreError::Corrupt(format!(
            "bad delayed message key {key:?}"
        ))),
    }
}

/// The delayed messages of `channel`, soonest due first.
pub(crate) fn delayed_prefix(channel: ChannelId) -> [u8; 5] {
    let mut key = [0; 5];
    key[0] = b'T';
    key[1..].copy_from_slice(&channel.0.to_be_bytes());
    key
}

/// Decodes a delayed message's value (a record body of one message) back into what was
/// published.
pub(crate) fn decode_delayed(mut body: &[u8]) -> Result<NewMessage, StoreError> {
    match decode_message(&mut body) {
        Some((_, message)) if body.is_empty() => Ok(message),
        _ => Err(StoreError::Corrupt("bad delayed message".into())),
    }
}

/// Reads one message of a record body (as [`encode_body`] wrote it): its publish time and the
/// message, which owns its bytes.
fn decode_message(cursor: &mut &[u8]) -> Option<(u64, NewMessage)> {
    if cursor.remaining() < 8 {
        return None;
    }
    let publish_time_ms = cursor.get_u64_le();
    let key = get_str(cursor)?.to_owned();
    let id = get_str(cursor)?.to_owned();
    let attributes = get_attributes(cursor)?;
    let payload = Bytes::copy_from_slice(get_slice(cursor)?);
    Some((
        publish_time_ms,
        NewMessage {
            payload,
            attributes,
            key,
            id,
        },
    ))
}

/// The persisted part of a subscription.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SubscriptionRecord {
    pub channel: ChannelId,
    pub name: String,
    pub settings: SubscriptionSettings,
    /// Its filter's text ("": none). It never changes.
    pub filter: String,
    /// What the broker keeps with it besides (a derived channel's reshaping), opaque here.
    pub transform: Vec<u8>,
}

impl SubscriptionRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(80 + self.name.len() + self.filter.len());
        out.put_u32_le(self.channel.0);
        put_str(&mut out, &self.name);
        encode_settings(&self.settings, &mut out);
        // Older records end after the settings: no filter, no transform.
        if !self.filter.is_empty() || !self.transform.is_empty() {
            put_str(&mut out, &self.filter);
        }
        if !self.transform.is_empty() {
            out.put_u32_le(self.transform.len() as u32);
            out.put_slice(&self.transform);
        }
        out
    }

    pub fn decode(mut raw: &[u8]) -> Result<Self, StoreError> {
        let bad = || StoreError::Corrupt("bad subscription record".into());
        if raw.remaining() < 4 {
            return Err(bad());
        }
        let channel = ChannelId(raw.get_u32_le());
        let name = get_str_slice(&mut raw).ok_or_else(bad)?;
        let settings = decode_settings(&mut raw).ok_or_else(bad)?;
        let filter = match raw.has_remaining() {
            true => get_str_slice(&mut raw).ok_or_else(bad)?,
            false => String::new(),
        };
        let transform = match raw.has_remaining() {
            true => get_slice(&mut raw).ok_or_else(bad)?.to_vec(),
            false => Vec::new(),
        };
        Ok(Self {
            channel,
            name,
            settings,
            filter,
            transform,
        })
    }
}

/// The settings' encoding after this tag (older records end after the ack deadline).
const SETTINGS_V2: u8 = 2;
/// Flag bit: messages with the same key are not held back for one another.
const UNORDERED: u8 = 1;

/// Appends a subscription's settings: the ack deadline, then (tagged) the retry policy,
/// attempt limit, dead-letter channel and flags.
pub(crate) fn encode_settings(settings: &SubscriptionSettings, out: &mut Vec<u8>) {
    out.put_u64_le(settings.ack_deadline_ms);
    out.put_u8(SETTINGS_V2);
    out.put_u64_le(settings.retry.initial_ms);
    out.put_u64_le(settings.retry.maximum_ms);
    out.put_f64_le(settings.retry.multiplier);
    out.put_f64_le(settings.retry.jitter);
    out.put_u32_le(settings.max_delivery_attempts);
    out.put_u32_le(settings.dead_letter.map_or(0, |c| c.0));
    out.put_u8(if settings.ordering { 0 } else { UNORDERED });
}

/// Reads what [`encode_settings`] wrote (or an older record's ack deadline alone).
pub(crate) fn decode_settings(raw: &mut &[u8]) -> Option<SubscriptionSettings> {
    if raw.remaining() < 8 {
        return None;
    }
    let mut settings = SubscriptionSettings {
        ack_deadline_ms: raw.get_u64_le(),
        ..SubscriptionSettings::default()
    };
    if raw.remaining() == 0 {
        return Some(settings);
    }
    if raw.get_u8() != SETTINGS_V2 || raw.remaining() < 8 * 4 + 4 + 4 + 1 {
        return None;
    }
    settings.retry = RetryPolicy {
        initial_ms: raw.get_u64_le(),
        maximum_ms: raw.get_u64_le(),
        multiplier: raw.get_f64_le(),
        jitter: raw.get_f64_le(),
    };
    settings.max_delivery_attempts = raw.get_u32_le();
    settings.dead_letter = Some(raw.get_u32_le()).filter(|&id| id != 0).map(ChannelId);
    settings.ordering = raw.get_u8() & UNORDERED == 0;
    Some(settings)
}

/// Where a subscription's failure record of one message is.
pub(crate) fn failure_key(subscription: SubscriptionId, seq: u64) -> [u8; 13] {
    let mut key = [b'F'; 13];
    key[1..5].copy_from_slice(&subscription.0.to_be_bytes());
    key[5..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Every failure key of a subscription starts with this.
pub(crate) fn failure_prefix(subscription: SubscriptionId) -> [u8; 5] {
    prefixed(b'F', subscription.0)
}

/// The sequence a failure key names.
pub(crate) fn parse_failure_key(key: &[u8]) -> Result<u64, StoreError> {
    parse_sequence_key(b'F', key)
}

pub(crate) fn encode_failure(failure: &Failure, out: &mut Vec<u8>) {
    out.put_u32_le(failure.count);
    out.put_u64_le(failure.retry_at_ms);
    put_str(out, &failure.cause);
    put_str(out, &failure.reason);
}

pub(crate) fn decode_failure(raw: &mut &[u8]) -> Result<Failure, StoreError> {
    let bad = || StoreError::Corrupt("bad failure record".into());
    if raw.remaining() < 12 {
        return Err(bad());
    }
    let count = raw.get_u32_le();
    let retry_at_ms = raw.get_u64_le();
    let cause = get_str_slice(raw).ok_or_else(bad)?;
    let reason = get_str_slice(raw).ok_or_else(bad)?;
    Ok(Failure {
        count,
        retry_at_ms,
        cause,
        reason,
    })
}

/// A commit's published ids of a channel, in publish-time order, until the id index seals
/// them into a file: `E` channel, publish time, first sequence; the value lists the ids with
/// their sequences (see [`encode_ids`]).
pub(crate) fn id_time_key(channel: ChannelId, publish_ms: u64, seq: u64) -> [u8; 21] {
    let mut key = [b'E'; 21];
    key[1..5].copy_from_slice(&channel.0.to_be_bytes());
    key[5..13].copy_from_slice(&publish_ms.to_be_bytes());
    key[13..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// What tells a commit's `E` key from another's of the same channel and millisecond: its
/// first sequence (sequences are unique within a channel) or, for a commit whose ids are all
/// of delayed messages (sequence 0), a hash of its first id.
pub(crate) fn ids_discriminator(entries: &[(u64, String)]) -> u64 {
    match entries.iter().map(|(seq, _)| *seq).find(|&seq| seq > 0) {
        Some(first) => first,
        None => {
            let first_id = entries.first().map_or("", |(_, id)| id.as_str());
            1 << 63 | u64::from(crc32fast::hash(first_id.as_bytes()))
        }
    }
}

/// The channel, publish time and first sequence an `E` key names.
pub(crate) fn parse_id_time_key_full(key: &[u8]) -> Result<(ChannelId, u64, u64), StoreError> {
    let bad = || StoreError::Corrupt(format!("bad de-duplication time key {key:?}"));
    if key.len() != 21 || key[0] != b'E' {
        return Err(bad());
    }
    let int = |range: std::ops::Range<usize>| u64::from_be_bytes(key[range].try_into().expect("8"));
    let channel = u32::from_be_bytes(key[1..5].try_into().expect("4 bytes"));
    Ok((ChannelId(channel), int(5..13), int(13..21)))
}

/// A commit's (sequence, id) pairs, as an `E` value holds them.
pub(crate) fn encode_ids(entries: &[(u64, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(|(_, id)| 12 + id.len()).sum());
    for (seq, id) in entries {
        out.put_u64_le(*seq);
        put_str(&mut out, id);
    }
    out
}

/// Reads what [`encode_ids`] wrote.
pub(crate) fn decode_ids(mut raw: &[u8]) -> Result<Vec<(u64, String)>, StoreError> {
    let mut entries = Vec::new();
    while raw.has_remaining() {
        let bad = || StoreError::Corrupt("bad de-duplication ids".into());
        if raw.remaining() < 8 {
            return Err(bad());
        }
        let seq = raw.get_u64_le();
        entries.push((seq, get_str_slice(&mut raw).ok_or_else(bad)?));
    }
    Ok(entries)
}

/// Where a channel's withdrawn sequences are.
pub(crate) fn withdrawn_key(channel: ChannelId) -> [u8; 5] {
    prefixed(b'W', channel.0)
}

/// Sorted, disjoint ranges `[start, end)`.
pub(crate) fn encode_ranges(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 16 * ranges.len());
    out.put_u32_le(ranges.len() as u32);
    for &(start, end) in ranges {
        out.put_u64_le(start);
        out.put_u64_le(end);
    }
    out
}

pub(crate) fn decode_ranges(raw: &mut &[u8]) -> Result<Vec<(u64, u64)>, StoreError> {
    let bad = || StoreError::Corrupt("bad sequence ranges".into());
    if raw.remaining() < 4 {
        return Err(bad());
    }
    let n = raw.get_u32_le() as usize;
    if raw.remaining() < n.saturating_mul(16) {
        return Err(bad());
    }
    Ok((0..n)
        .map(|_| (raw.get_u64_le(), raw.get_u64_le()))
        .collect())
}

pub(crate) fn encode_ack_state(state: &AckState) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + 16 * state.acked_above_floor.len());
    out.put_u64_le(state.floor);
    out.put_u64_le(state.acked_total);
    out.put_u32_le(state.acked_above_floor.len() as u32);
    for &(start, end) in &state.acked_above_floor {
        out.put_u64_le(start);
        out.put_u64_le(end);
    }
    out
}

pub(crate) fn decode_ack_state(mut raw: &[u8]) -> Result<AckState, StoreError> {
    let bad = || StoreError::Corrupt("bad ack state".into());
    if raw.remaining() < 20 {
        return Err(bad());
    }
    let floor = raw.get_u64_le();
    let acked_total = raw.get_u64_le();
    let n = raw.get_u32_le() as usize;
    if raw.remaining() != n * 16 {
        return Err(bad());
    }
    let acked_above_floor = (0..n)
        .map(|_| (raw.get_u64_le(), raw.get_u64_le()))
        .collect();
    Ok(AckState {
        floor,
        acked_total,
        acked_above_floor,
    })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.put_u32_le(s.len() as u32);
    out.put_slice(s.as_bytes());
}

fn get_slice<'a>(cursor: &mut &'a [u8]) -> Option<&'a [u8]> {
    if cursor.remaining() < 4 {
        return None;
    }
    let len = cursor.get_u32_le() as usize;
    if cursor.remaining() < len {
        return None;
    }
    let (slice, rest) = cursor.split_at(len);
    *cursor = rest;
    Some(slice)
}

fn get_str<'a>(cursor: &mut &'a [u8]) -> Option<&'a str> {
    get_slice(cursor).and_then(|b| std::str::from_utf8(b).ok())
}

fn get_attributes(cursor: &mut &[u8]) -> Option<Attributes> {
    if cursor.remaining() < 4 {
        return None;
    }
    let n = cursor.get_u32_le() as usize;
    // Every pair takes at least its two length prefixes: a damaged count cannot make us reserve
    // more than the record holds.
    if n > cursor.remaining() / 8 {
        return None;
    }
    let mut attributes = AttributesBuilder::with_capacity(n, cursor.remaining().min(n * 32));
    for _ in 0..n {
        let name = get_str(cursor)?;
        let value = get_str(cursor)?;
        attributes.push(name, value);
    }
    Some(attributes.build())
}

fn get_str_slice(raw: &mut &[u8]) -> Option<String> {
    if raw.remaining() < 4 {
        return None;
    }
    let len = raw.get_u32_le() as usize;
    if raw.remaining() < len {
        return None;
    }
    let s = std::str::from_utf8(&raw[..len]).ok()?.to_owned();
    raw.advance(len);
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &[u8]) -> NewMessage {
        NewMessage {
            payload: Bytes::copy_from_slice(payload),
            attributes: Attributes::from_pairs([("a", "1")]),
            key: "k".into(),
            id: "id-1".into(),
        }
    }

    #[test]
    fn records_round_trip() {
        let messages: Vec<_> = [&b"small"[..], &vec![7u8; 300_000][..], b""]
            .map(message)
            .into();
        let mut body = Vec::new();
        encode_body(&messages, 42, &mut body);
        let mut framed = Vec::new();
        frame_record(ChannelId(4), 10, 3, &body, &mut framed);
        let decoded = decode_record(ChannelId(4), 10, &framed).unwrap();
        assert!(
            decode_record(ChannelId(5), 10, &framed).is_err(),
            "another channel's record"
        );
        assert!(
            decode_record(ChannelId(4), 11, &framed).is_err(),
            "another place in the log"
        );
        assert_eq!(decoded.len(), 3);
        for (i, (d, m)) in decoded.iter().zip(&messages).enumerate() {
            assert_eq!(d.sequence, 10 + i as u64);
            assert_eq!(d.publish_time_ms, 42);
            assert_eq!(
                (&d.payload, &d.key, &d.id, &d.attributes),
                (&m.payload, &m.key, &m.id, &m.attributes)
            );
        }
        let location = RecordLocation {
            segment: 3,
            offset: 1 << 40,
            len: 77,
            publish_ms: 1_795_833_296_789,
        };
        assert_eq!(
            RecordLocation::decode(&location.encode()).unwrap(),
            location
        );
        assert_eq!(
            parse_record_key(&record_key(ChannelId(9), 1234)).unwrap(),
            1234
        );
    }

    #[test]
    fn corruption_is_detected() {
        let mut body = Vec::new();
        encode_body(&[message(b"hello")], 1, &mut body);
        let mut framed = Vec::new();
        frame_record(ChannelId(1), 1, 1, &body, &mut framed);
        let last = framed.len() - 1;
        framed[last] ^= 1;
        let err = decode_record(ChannelId(1), 1, &framed).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        assert!(
            decode_record(ChannelId(1), 1, &framed[..5]).is_err(),
            "a torn record"
        );
    }

    #[test]
    fn ack_state_round_trips() {
        let state = AckState {
            floor: 5,
            acked_total: 9,
            acked_above_floor: vec![(7, 9), (12, 20)],
        };
        assert_eq!(decode_ack_state(&encode_ack_state(&state)).unwrap(), state);
    }
}
