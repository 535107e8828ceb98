//! Recovery of the index from the segment log: the segment log is the write-ahead log.
//!
//! Every commit stores, in the same sled batch as everything else it changes, where the log
//! ended (`P`); sled makes its batches durable in the background, so after a crash it comes
//! back with the state of some earlier commit and that commit's `P`. On open, every whole
//! commit after that point is read back and applied through the same [`State`] functions the
//! live commit used: its changes (channels, subscriptions, ack states), then its message
//! records. A commit torn by the crash (no intact commit frame) was never confirmed and is
//! ignored whole. The result is made durable before anything else happens. Then the segment
//! files the index does not name are looked at: one whose every record is accounted for
//! (collected, of a deleted channel, or of a torn commit) is deleted; any other is moved to
//! `segments/quarantine/` and reported, never deleted.
//!
//! Whose a record is can be told from the record alone (records carry their channel and
//! first sequence), and whether a channel the index does not know was deleted or lost can be
//! told from its id: ids are never reused, so an id below the index's next id that names no
//! channel was deleted, while one at or above it was created after the state sled came back
//! with. A lost channel's id is then remembered (`O` keys) and its records pin their segment
//! files (they count in the files' usage), so nothing of it is deleted until `ferry repair`
//! brings it back.

use std::collections::HashSet;

use crate::batch::Batch;
use crate::change;
use crate::codec::{
    KEY_LOG_END, KEY_NEXT_ID, LogPosition, RecordHeader, RecordLocation, orphan_key, record_key,
    segment_key,
};
use crate::segment::{FoundCommit, Segments};
use crate::writer::{DurableFiles, State, Touched};
use crate::{ChannelId, Result};

/// The index's state once it agrees with the segment log.
pub(crate) struct Reconciled {
    /// Channels, subscriptions and usage, with the log's commits applied.
    pub state: State,
    /// The highest segment id in use, on disk, in the index or in quarantine: a new segment
    /// goes after it.
    pub highest: u32,
}

/// Brings the index in line with the segment log on open: replays what it lacks, makes that
/// durable, drops the usage of emptied segments, and deletes or quarantines the files it does
/// not name.
pub(crate) fn reconcile(
    db: &sled::Db,
    segments: &Segments,
    on_disk: &[u32],
    files: &mut DurableFiles,
) -> Result<Reconciled> {
    let mut state = State::load(db)?;
    let start = log_end(db)?;
    let replayed = replay(db, segments, on_disk, &mut state)?;
    drop_collected(db, &mut state)?;
    // The log end counts too: its file may be gone (emptied), and a new file must never take
    // an id at or below where replay starts.
    let highest = state
        .usage
        .keys()
        .chain(on_disk)
        .chain(&segments.quarantined())
        .chain([&start.segment, &replayed.end.segment])
        .copied()
        .max()
        .unwrap_or(0);
    // A segment emptied while it was being appended to keeps a zero entry; its file goes now.
    for (id, _) in state.usage.iter().filter(|(_, u)| u.records == 0) {
        db.remove(segment_key(*id))?;
    }
    state.usage.retain(|_, u| u.records > 0);
    let tidy = plan_tidy(
        segments,
        on_disk,
        |id| state.usage.contains_key(&id),
        &state,
        Known {
            next_id: state.next_id,
            orphans: &state.orphans,
            log_end: replayed.end,
        },
    )?;
    // Lost channels are remembered, and their ids never given out again, before any file is
    // moved: a crash in between must not forget them.
    for channel in &tidy.lost {
        db.insert(orphan_key(*channel), &[])?;
        state.orphans.insert(*channel);
        state.next_id = state.next_id.max(channel.0.saturating_add(1));
    }
    db.insert(KEY_NEXT_ID, &state.next_id.to_le_bytes())?;
    // Durable before any file changes: a file cut or deleted now may hold commits the old
    // state needed.
    db.flush()?;
    files.sync()?;
    if let Some(at) = replayed.torn_tail {
        segments.truncate(at.segment, at.offset)?;
        tracing::info!(
            segment = at.segment,
            offset = at.offset,
            "cut a torn tail after the last whole commit"
        );
    }
    apply_tidy(segments, &tidy)?;
    Ok(Reconciled { state, highest })
}

/// Drops the index entries below each channel's first sequence. Replay does not collect, so a
/// replayed commit that emptied a channel (`Skipped`, after a collection that was not yet
/// checkpointed) can leave entries of records that are gone from the channel's bounds: they
/// would pin their segment files for good.
fn drop_collected(db: &sled::Db, state: &mut State) -> Result<()> {
    let mut batch = Batch::default();
    let mut touched = Touched::default();
    let firsts: Vec<(ChannelId, u64)> = state
        .channels
        .iter()
        .map(|(id, c)| (*id, c.first_seq))
        .collect();
    for (channel, first_seq) in firsts {
        for entry in db.range(record_key(channel, 0)..record_key(channel, first_seq)) {
            let (key, value) = entry?;
            let at = RecordLocation::decode(&value)?;
            batch.remove(key);
            state.release(at, &mut touched);
            if let Some(record) = state.channels.get_mut(&channel) {
                record.bytes = record.bytes.saturating_sub(u64::from(at.len));
                touched.channels.insert(channel);
            }
        }
    }
    if !touched.segments.is_empty() {
        state.finish(&mut batch, &mut touched, None);
        db.apply_batch(batch.into_sled())?;
    }
    Ok(())
}

/// What replaying the log found, for the start-up report.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    /// Commits applied from the log.
    pub commits: u64,
    /// Records indexed from the log.
    pub records: u64,
    /// Messages in them.
    pub messages: u64,
    /// Records of channels the index does not know and that were not deleted.
    pub orphans: u64,
    /// Where the log ends now.
    pub end: LogPosition,
    /// Where the last file's whole commits end, when a torn tail follows them.
    pub torn_tail: Option<LogPosition>,
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
            offset: at.offset.saturating_add(u64::from(at.len)),
        });
    }
    Ok(end)
}

/// Applies every whole commit after the index's log end to `state` and to sled (not yet
/// durable: the caller makes it so), with the new log end.
pub(crate) fn replay(
    db: &sled::Db,
    segments: &Segments,
    on_disk: &[u32],
    state: &mut State,
) -> Result<Replayed> {
    let start = log_end(db)?;
    let mut replayed = Replayed {
        end: start,
        ..Replayed::default()
    };
    let next_id = state.next_id;
    for &segment in on_disk.iter().filter(|&&id| id >= start.segment) {
        let from = if segment == start.segment {
            start.offset
        } else {
            0
        };
        let mut failed = None;
        let scan = segments.scan_commits(segment, from, |commit| {
            if failed.is_none()
                && let Err(e) = apply_commit(db, segment, commit, state, next_id, &mut replayed)
            {
                failed = Some(e);
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        let last = Some(&segment) == on_disk.last();
        // The file written at the crash may end in a torn frame or in the records of a commit
        // that never got its commit frame: never confirmed, cut once replay is durable (a
        // checksum mismatch is left alone: it may be damage, not a tear).
        let torn = scan.stopped < scan.len || !scan.uncommitted.is_empty();
        if last && torn && scan.damaged.is_none() {
            let whole = if replayed.end.segment == segment {
                replayed.end.offset
            } else {
                from
            };
            replayed.torn_tail = Some(LogPosition {
                segment,
                offset: whole,
            });
        }
        if let Some(offset) = scan
            .damaged
            .or((scan.stopped < scan.len).then_some(scan.stopped))
            && !last
        {
            tracing::error!(
                segment,
                offset,
                "a segment file ends in a frame that cannot be read"
            );
        }
        if !scan.uncommitted.is_empty() {
            tracing::warn!(
                segment,
                records = scan.uncommitted.len(),
                "ignored the records of a commit a crash cut short (never confirmed)"
            );
        }
    }
    if replayed.commits > 0 {
        tracing::info!(
            commits = replayed.commits,
            records = replayed.records,
            messages = replayed.messages,
            "replayed the segment log past the index's durable point"
        );
    }
    if replayed.orphans > 0 {
        tracing::error!(
            records = replayed.orphans,
            "the segment log holds records of channels the index does not know (a damaged index): their files are kept; run `ferry repair`"
        );
    }
    Ok(replayed)
}

/// Applies one commit found in the log: its changes, then its records, as one sled batch.
fn apply_commit(
    db: &sled::Db,
    segment: u32,
    commit: FoundCommit,
    state: &mut State,
    next_id: u32,
    replayed: &mut Replayed,
) -> Result<()> {
    let mut batch = Batch::default();
    let mut touched = Touched::default();
    if let Some(body) = &commit.changes {
        for change in change::decode(body)? {
            state.apply(&**db, &change, &mut batch, &mut touched)?;
        }
    }
    for (offset, record) in &commit.records {
        index(
            &mut batch,
            &mut touched,
            state,
            next_id,
            segment,
            *offset,
            record,
            replayed,
        );
    }
    replayed.end = LogPosition {
        segment,
        offset: commit.end,
    };
    state.finish(&mut batch, &mut touched, None);
    batch.insert(KEY_LOG_END, &replayed.end.encode());
    db.apply_batch(batch.into_sled())?;
    replayed.commits += 1;
    Ok(())
}

/// Indexes one replayed record, or pins it when its channel is unknown and was not deleted.
#[allow(clippy::too_many_arguments)]
fn index(
    batch: &mut Batch,
    touched: &mut Touched,
    state: &mut State,
    next_id: u32,
    segment: u32,
    offset: u64,
    record: &RecordHeader,
    replayed: &mut Replayed,
) {
    let Some(channel) = state.channels.get(&record.channel) else {
        if record.channel.0 >= next_id || state.orphans.contains(&record.channel) {
            replayed.orphans += 1;
            if state.orphans.insert(record.channel) {
                batch.insert(&orphan_key(record.channel), &[]);
            }
            if record.channel.0 >= state.next_id {
                state.next_id = record.channel.0.saturating_add(1);
                batch.insert(KEY_NEXT_ID, &state.next_id.to_le_bytes());
            }
            // Pinned: the file must outlive everything else in it.
            let usage = state.usage.entry(segment).or_default();
            usage.records += 1;
            usage.bytes += record.len;
            touched.segments.insert(segment);
        }
        return;
    };
    // Already indexed (a store written before commits were framed replays from an older end).
    if record.first_seq < channel.next_seq
        || record
            .first_seq
            .checked_add(u64::from(record.count))
            .is_none()
    {
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
    let at = RecordLocation {
        segment,
        offset,
        len: record.len as u32,
        publish_ms: record.publish_ms,
    };
    state.index_record(
        record.channel,
        record.first_seq,
        record.count,
        at,
        batch,
        touched,
    );
    replayed.records += 1;
    replayed.messages += u64::from(record.count);
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
    state: &State,
    known: Known,
) -> Result<Tidy> {
    let mut tidy = Tidy::default();
    for &segment in on_disk.iter().filter(|&&id| !live(id)) {
        let mut unaccounted = 0u64;
        // The records of a torn commit (after the last commit frame) were never confirmed:
        // accounted for.
        let scan = segments.scan_commits(segment, 0, |commit| {
            for (_, record) in &commit.records {
                let accounted = match state.channels.get(&record.channel) {
                    // Collected: every subscription acked it.
                    Some(channel) => {
                        record.first_seq.saturating_add(u64::from(record.count))
                            <= channel.first_seq
                    }
                    // Deleted with its channel (ids are never reused), or lost with the index.
                    None => {
                        record.channel.0 < known.next_id && !known.orphans.contains(&record.channel)
                    }
                };
                if !accounted {
                    unaccounted += 1;
                    if !state.channels.contains_key(&record.channel) {
                        tidy.lost.insert(record.channel);
                    }
                }
            }
        })?;
        // Bytes that cannot be read are harmless only past the log end (never confirmed).
        let unreadable_at = scan
            .damaged
            .or((scan.stopped < scan.len).then_some(scan.stopped))
            .map(|offset| LogPosition { segment, offset });
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
    if !tidy.delete.is_empty() {
        segments.sync()?;
    }
    for &segment in &tidy.quarantine {
        let to = segments.quarantine(segment)?;
        tracing::warn!(segment, to = %to.display(), "segment file quarantined");
    }
    Ok(())
}
