//! Recovery of the index from the segment log: the segment files are the ground truth.
//!
//! Every group that appends records also stores, in the same sled batch, where the log ended
//! (`P`). On open, every record after that point is read back and indexed if the index lacks
//! it: records a crash left written but unindexed, or, when sled lost recent writes (a damaged
//! file, see storage-notes), every record written since the state sled came back with. So a
//! sequence is never given out twice and no confirmed message is dropped because sled forgot
//! it. Then the segment files the index does not name are looked at: one whose every record is
//! accounted for (collected, or of a deleted channel) is deleted; any other is moved to
//! `segments/quarantine/` and reported, never deleted.
//!
//! Whose a record is can be told from the record alone (version 3 records carry their channel
//! and first sequence), and whether a channel the index does not know was deleted or lost can
//! be told from its id: ids are never reused, so an id below the index's next id that names no
//! channel was deleted, while one at or above it was created after the state sled came back
//! with. A lost channel's id is then remembered (`O` keys) and its records pin their segment
//! files (they count in the files' usage), so nothing of it is deleted until `ferry repair`
//! brings it back.

use std::collections::{HashMap, HashSet};

use crate::codec::{
    ChannelRecord, KEY_LOG_END, KEY_NEXT_ID, LogPosition, RecordHeader, RecordLocation,
    SegmentUsage, channel_key, orphan_key, record_key, segment_key,
};
use crate::segment::Segments;
use crate::writer::{id_of, read_next_id, read_usage};
use crate::{ChannelId, Result};

/// The index's view once it agrees with the segment log.
pub(crate) struct Reconciled {
    /// Every channel's record, with the log's records indexed.
    pub channels: HashMap<ChannelId, ChannelRecord>,
    /// Indexed records per segment file (none at zero).
    pub usage: HashMap<u32, SegmentUsage>,
    /// The next id to give out: never one seen before.
    pub next_id: u32,
    /// The highest segment id in use, on disk, in the index or in quarantine: a new segment
    /// goes after it.
    pub highest: u32,
}

/// Brings the index in line with the segment log on open: replays what it lacks, drops the
/// usage of emptied segments, and deletes or quarantines the files it does not name.
pub(crate) fn reconcile(db: &sled::Db, segments: &Segments, on_disk: &[u32]) -> Result<Reconciled> {
    let next_id = read_next_id(db)?;
    let mut usage = read_usage(db)?;
    let mut channels = HashMap::new();
    for entry in db.scan_prefix(b"C") {
        let (key, value) = entry?;
        channels.insert(ChannelId(id_of(&key)?), ChannelRecord::decode(&value)?);
    }
    let mut orphans = HashSet::new();
    for entry in db.scan_prefix(b"O") {
        orphans.insert(ChannelId(id_of(&entry?.0)?));
    }
    let replayed = replay(
        db,
        segments,
        on_disk,
        &mut channels,
        &mut usage,
        next_id,
        &mut orphans,
    )?;
    let highest = usage
        .keys()
        .chain(on_disk)
        .chain(&segments.quarantined())
        .copied()
        .max()
        .unwrap_or(0);
    // A segment emptied while it was being appended to keeps a zero entry; its file goes now.
    for (id, _) in usage.iter().filter(|(_, u)| u.records == 0) {
        db.remove(segment_key(*id))?;
    }
    usage.retain(|_, u| u.records > 0);
    let tidy = plan_tidy(
        segments,
        on_disk,
        |id| usage.contains_key(&id),
        &channels,
        Known {
            next_id,
            orphans: &orphans,
            log_end: replayed.end,
        },
    )?;
    let mut next_id = replayed.next_id;
    // Lost channels are remembered, and their ids never given out again, before any file is
    // moved: a crash in between must not forget them.
    for channel in &tidy.lost {
        db.insert(orphan_key(*channel), &[])?;
        next_id = next_id.max(channel.0.saturating_add(1));
    }
    db.insert(KEY_NEXT_ID, &next_id.to_le_bytes())?;
    db.flush()?;
    apply_tidy(segments, &tidy)?;
    Ok(Reconciled {
        channels,
        usage,
        next_id,
        highest,
    })
}

/// What replaying the log found, for the start-up report.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    /// Records indexed from the log.
    pub records: u64,
    /// Messages in them.
    pub messages: u64,
    /// Records of channels the index does not know and that were not deleted.
    pub orphans: u64,
    /// The id after the highest channel id seen in the log: ids are never given out twice.
    pub next_id: u32,
    /// Where the log ends now.
    pub end: LogPosition,
}

/// The index's log end, or (for a store written before it was kept) the end of the last
/// indexed record.
pub(crate) fn log_end(db: &sled::Db) -> Result<LogPosition> {
    if let Some(raw) = db.get(KEY_LOG_END)? {
        return LogPosition::decode(&raw);
    }
    let mut end = LogPosition::default();
    for entry in db.scan_prefix(b"M") {
        let (_, value) = entry?;
        let at = RecordLocation::decode(&value)?;
        end = end.max(LogPosition {
            segment: at.segment,
            offset: at.offset + u64::from(at.len),
        });
    }
    Ok(end)
}

/// Indexes every intact record after the log end that the index lacks, updating `channels`
/// and `usage`, and commits that to sled with the new log end.
pub(crate) fn replay(
    db: &sled::Db,
    segments: &Segments,
    on_disk: &[u32],
    channels: &mut HashMap<ChannelId, ChannelRecord>,
    usage: &mut HashMap<u32, SegmentUsage>,
    next_id: u32,
    orphans: &mut HashSet<ChannelId>,
) -> Result<Replayed> {
    let start = log_end(db)?;
    let mut replayed = Replayed {
        next_id,
        ..Replayed::default()
    };
    let mut batch = sled::Batch::default();
    let mut end = start;
    for &segment in on_disk.iter().filter(|&&id| id >= start.segment) {
        let from = if segment == start.segment {
            start.offset
        } else {
            0
        };
        let mut damaged = None;
        let (stopped, len) = segments.scan(segment, from, |offset, record, intact| {
            if !intact {
                damaged = Some(offset);
                return;
            }
            end = LogPosition {
                segment,
                offset: offset + record.len,
            };
            let Some(channel) = channels.get_mut(&record.channel) else {
                if record.channel.0 >= next_id || orphans.contains(&record.channel) {
                    replayed.orphans += 1;
                    replayed.next_id = replayed.next_id.max(record.channel.0.saturating_add(1));
                    if orphans.insert(record.channel) {
                        batch.insert(&orphan_key(record.channel), &[]);
                    }
                    // Pinned: the file must outlive everything else in it.
                    let use_ = usage.entry(segment).or_default();
                    use_.records += 1;
                    use_.bytes += record.len;
                }
                return;
            };
            if record.first_seq < channel.next_seq {
                return;
            }
            if record.first_seq > channel.next_seq {
                tracing::error!(
                    channel = %channel.name,
                    missing_from = channel.next_seq,
                    missing_to = record.first_seq - 1,
                    segment,
                    "sequences are missing from the segment log: lost"
                );
            }
            index(&mut batch, usage, channel, segment, offset, record);
            replayed.records += 1;
            replayed.messages += u64::from(record.count);
        })?;
        let last = Some(&segment) == on_disk.last();
        if let Some(offset) = damaged.or((stopped < len).then_some(stopped))
            && !last
        {
            tracing::error!(
                segment,
                offset,
                "a segment file ends in a frame that cannot be read"
            );
        }
    }
    if replayed.records > 0 || end != start {
        for (id, channel) in channels.iter() {
            batch.insert(&channel_key(*id), channel.encode());
        }
        for (segment, use_) in usage.iter() {
            batch.insert(&segment_key(*segment), &use_.encode());
        }
        batch.insert(KEY_LOG_END, &end.encode());
        batch.insert(KEY_NEXT_ID, &replayed.next_id.to_le_bytes());
        db.apply_batch(batch)?;
        db.flush()?;
    }
    if replayed.records > 0 {
        tracing::warn!(
            records = replayed.records,
            messages = replayed.messages,
            "indexed records the index lacked from the segment log (written just before a crash, or forgotten by a damaged index)"
        );
    }
    if replayed.orphans > 0 {
        tracing::error!(
            records = replayed.orphans,
            "the segment log holds records of channels the index does not know (a damaged index): their files are kept; run `ferry repair`"
        );
    }
    replayed.end = end;
    Ok(replayed)
}

fn index(
    batch: &mut sled::Batch,
    usage: &mut HashMap<u32, SegmentUsage>,
    channel: &mut ChannelRecord,
    segment: u32,
    offset: u64,
    record: &RecordHeader,
) {
    let at = RecordLocation {
        segment,
        offset,
        len: record.len as u32,
    };
    batch.insert(&record_key(record.channel, record.first_seq), &at.encode());
    if channel.first_seq == channel.next_seq {
        channel.first_seq = record.first_seq;
    }
    channel.next_seq = record.first_seq + u64::from(record.count);
    channel.bytes += record.len;
    let use_ = usage.entry(segment).or_default();
    use_.records += 1;
    use_.bytes += record.len;
}

/// What to do with the segment files no index entry names.
#[derive(Debug, Default)]
pub(crate) struct Tidy {
    /// Every record in them is accounted for (or unreadable only past the log end: a write
    /// torn by a crash, never confirmed).
    pub delete: Vec<u32>,
    /// They hold records the index does not account for, or bytes that cannot be read before
    /// the log end: kept aside, never deleted.
    pub quarantine: Vec<u32>,
    /// Channels the index does not know whose records were found (to be remembered as lost
    /// before any file is moved).
    pub lost: HashSet<ChannelId>,
}

/// Decides what becomes of each segment file no index entry names (`live` names the ones the
/// index uses); nothing is changed yet: the caller makes the lost channels durable first.
pub(crate) fn plan_tidy(
    segments: &Segments,
    on_disk: &[u32],
    live: impl Fn(u32) -> bool,
    channels: &HashMap<ChannelId, ChannelRecord>,
    known: Known,
) -> Result<Tidy> {
    let mut tidy = Tidy::default();
    for &segment in on_disk.iter().filter(|&&id| !live(id)) {
        let mut unaccounted = 0u64;
        let mut damaged = false;
        let (stopped, len) = segments.scan(segment, 0, |_, record, intact| {
            if !intact {
                damaged = true;
                return;
            }
            let accounted = match channels.get(&record.channel) {
                // Collected: every subscription acked it.
                Some(channel) => record.first_seq + u64::from(record.count) <= channel.first_seq,
                // Deleted with its channel (ids are never reused), or lost with the index.
                None => {
                    record.channel.0 < known.next_id && !known.orphans.contains(&record.channel)
                }
            };
            if !accounted {
                unaccounted += 1;
                if !channels.contains_key(&record.channel) {
                    tidy.lost.insert(record.channel);
                }
            }
        })?;
        // Bytes that cannot be read are harmless only past the log end (never confirmed).
        let unreadable_at = (damaged || stopped < len).then_some(LogPosition {
            segment,
            offset: stopped,
        });
        let unreadable_before_end = unreadable_at.is_some_and(|at| at < known.log_end);
        if unaccounted == 0 && !unreadable_before_end {
            tidy.delete.push(segment);
        } else {
            tracing::error!(
                segment,
                records = unaccounted,
                unreadable_from = unreadable_at.map(|at| at.offset),
                "a segment file holds records the index does not account for, or bytes that cannot be read: moved to quarantine, not deleted; run `ferry check`"
            );
            tidy.quarantine.push(segment);
        }
    }
    Ok(tidy)
}

/// What recovery knows of ids and the log when it tidies.
#[derive(Clone, Copy)]
pub(crate) struct Known<'a> {
    /// The index's next id: a channel id below it that names no channel was deleted.
    pub next_id: u32,
    /// Channels remembered as lost.
    pub orphans: &'a HashSet<ChannelId>,
    /// Where the log ended after replay.
    pub log_end: LogPosition,
}

/// Carries out a [`Tidy`].
pub(crate) fn apply_tidy(segments: &Segments, tidy: &Tidy) -> Result<()> {
    for &segment in &tidy.delete {
        segments.delete(segment)?;
    }
    for &segment in &tidy.quarantine {
        let to = segments.quarantine(segment)?;
        tracing::warn!(segment, to = %to.display(), "segment file quarantined");
    }
    Ok(())
}
