//! Offline tools over a data directory the broker is not running on: [`check`] verifies the
//! index against the segment files and changes nothing; [`repair`] rebuilds the index from the
//! segment files, keeping what can still be read of the old one (channel names, subscriptions,
//! ack states), and puts the old one aside.
//!
//! Both read the whole segment log, every record's header and checksum. `check` works on a copy
//! of sled's files, since opening sled may itself write (it recovers its log on open).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::change::{self, Change};
use crate::codec::{
    self, ChannelRecord, KEY_LOG_END, KEY_NEXT_ID, KEY_VERSION, LogPosition, RecordLocation,
    SegmentUsage, SubscriptionRecord,
};
use crate::segment::Segments;
use crate::{
    AckState, ChannelId, Result, StoreError, SubscriptionId, SubscriptionSettings, io_error,
};

/// What a check or a repair found and did, in words for an operator.
#[derive(Debug, Default)]
pub struct Report {
    /// What the data directory holds.
    pub facts: Vec<String>,
    /// What is wrong (empty: nothing).
    pub problems: Vec<String>,
    /// What a repair changed.
    pub actions: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for fact in &self.facts {
            writeln!(f, "  {fact}")?;
        }
        for action in &self.actions {
            writeln!(f, "  done: {action}")?;
        }
        if self.problems.is_empty() {
            writeln!(f, "  no problems found")?;
        }
        for problem in &self.problems {
            writeln!(f, "  PROBLEM: {problem}")?;
        }
        Ok(())
    }
}

/// The index as far as it can be read.
#[derive(Default)]
struct Index {
    next_id: u32,
    log_end: Option<LogPosition>,
    channels: BTreeMap<ChannelId, ChannelRecord>,
    subscriptions: BTreeMap<SubscriptionId, (SubscriptionRecord, Option<AckState>)>,
    records: BTreeMap<(ChannelId, u64), RecordLocation>,
    usage: BTreeMap<u32, SegmentUsage>,
    /// Channels the index lost while the log kept their records.
    orphans: BTreeSet<ChannelId>,
    /// Delayed messages: (channel, due, number) and the message.
    delayed: BTreeMap<(ChannelId, u64, u64), Vec<u8>>,
    /// The broker's catalog.
    catalog: BTreeMap<String, Vec<u8>>,
    /// Entries that could not be decoded.
    unreadable: Vec<String>,
}

/// One record of a whole commit found in a segment file.
#[derive(Debug, Clone, Copy)]
struct Found {
    segment: u32,
    offset: u64,
    len: u64,
    channel: ChannelId,
    first: u64,
    count: u32,
    publish_ms: u64,
}

/// What the segment log holds.
#[derive(Default)]
struct Log {
    /// The records of whole commits.
    found: Vec<Found>,
    /// Each whole commit's changes, with where the commit ends, in log order.
    changes: Vec<(LogPosition, Vec<Change>)>,
    /// Where a damaged frame starts.
    damaged: BTreeSet<(u32, u64)>,
    /// Where the last whole commit ends: a rebuilt index's log position.
    end: LogPosition,
    /// The ids of the quarantined files.
    quarantined: Vec<u32>,
}

impl Found {
    fn end(&self) -> u64 {
        self.first.saturating_add(u64::from(self.count))
    }
}

/// Verifies `dir` without changing it.
pub fn check(dir: &Path) -> Result<Report> {
    let _lock = lock(dir)?;
    let mut report = Report::default();
    let mut index = read_or_report(dir, &mut report, "run `ferry repair`");
    let mut log = scan_all(dir, &mut report)?;
    let extra = readable_unscanned(dir, &index, &log.found)?;
    log.found.extend(extra);
    let replayable = replay_changes(&mut index, &log);
    describe(&index, &log.found, &mut report);
    if replayable > 0 {
        report.facts.push(format!(
            "{replayable} commit(s) after the index's durable point will be replayed when the broker starts"
        ));
    }
    if !log.quarantined.is_empty() {
        report.problems.push(format!(
            "{} segment file(s) in segments/quarantine hold records the index does not account for: run `ferry repair`",
            log.quarantined.len()
        ));
    }
    compare(&index, &log, &mut report);
    Ok(report)
}

/// Rebuilds the index of `dir` from its segment files.
pub fn repair(dir: &Path) -> Result<Report> {
    let _lock = lock(dir)?;
    let mut report = Report::default();
    let mut index = read_or_report(
        dir,
        &mut report,
        "channel names, subscriptions and ack states are lost",
    );
    // Quarantined files go back: their records are indexed like the others.
    let quarantine = dir.join("segments").join("quarantine");
    if let Ok(entries) = std::fs::read_dir(&quarantine) {
        for entry in entries.flatten() {
            let to = dir.join("segments").join(entry.file_name());
            if to.exists() {
                report.problems.push(format!(
                    "{} is in quarantine and in segments/ too: left in quarantine, not indexed",
                    entry.file_name().to_string_lossy()
                ));
                continue;
            }
            std::fs::rename(entry.path(), &to).map_err(|e| io_error(&to, e))?;
            report.actions.push(format!(
                "moved {} back from quarantine",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    let mut log = scan_all(dir, &mut report)?;
    let extra = readable_unscanned(dir, &index, &log.found)?;
    log.found.extend(extra);
    replay_changes(&mut index, &log);
    describe(&index, &log.found, &mut report);
    let rebuilt = dir.join("index.repair");
    if rebuilt.exists() {
        std::fs::remove_dir_all(&rebuilt).map_err(|e| io_error(&rebuilt, e))?;
    }
    {
        let db = sled::Config::new().path(&rebuilt).open()?;
        rebuild(&db, index, &log, &mut report)?;
        db.flush()?;
    }
    swap_in(dir, &rebuilt, &mut report)?;
    Ok(report)
}

/// The index as far as it can be read; when it cannot be opened at all, an empty one, and a
/// problem saying so and what follows.
fn read_or_report(dir: &Path, report: &mut Report, consequence: &str) -> Index {
    read_copy(dir).unwrap_or_else(|e| {
        report
            .problems
            .push(format!("the index cannot be opened ({e}): {consequence}"));
        Index::default()
    })
}

/// Holds sled's lock on the db file, so that neither tool runs beside a broker.
fn lock(dir: &Path) -> Result<Option<std::fs::File>> {
    let path = dir.join("db");
    if !dir.exists() {
        return Err(io_error(dir, std::io::ErrorKind::NotFound.into()));
    }
    let Ok(file) = std::fs::File::options().read(true).write(true).open(&path) else {
        return Ok(None);
    };
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |_| {
            StoreError::Failed(format!(
                "{} is in use: stop the broker first",
                dir.display()
            ))
        },
    )?;
    Ok(Some(file))
}

/// Opens a copy of sled's files and reads the index from it.
fn read_copy(dir: &Path) -> Result<Index> {
    let copy = tempfile_dir(dir)?;
    let result = (|| {
        for entry in std::fs::read_dir(dir)
            .map_err(|e| io_error(dir, e))?
            .flatten()
        {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let from = entry.path();
            if name == "db" || name == "conf" || name.starts_with("snap.") {
                std::fs::copy(&from, copy.join(&*name)).map_err(|e| io_error(&from, e))?;
            } else if name == "blobs" {
                let to = copy.join("blobs");
                std::fs::create_dir_all(&to).map_err(|e| io_error(&to, e))?;
                for blob in std::fs::read_dir(&from)
                    .map_err(|e| io_error(&from, e))?
                    .flatten()
                {
                    std::fs::copy(blob.path(), to.join(blob.file_name()))
                        .map_err(|e| io_error(&blob.path(), e))?;
                }
            }
        }
        if !copy.join("db").exists() {
            return Err(StoreError::Corrupt("there is no index (no db file)".into()));
        }
        let db = sled::Config::new().path(&copy).open()?;
        read_index(&db)
    })();
    let _ = std::fs::remove_dir_all(&copy);
    result
}

fn tempfile_dir(dir: &Path) -> Result<PathBuf> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let path = std::env::temp_dir().join(format!("ferry-check-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&path).map_err(|e| io_error(dir, e))?;
    Ok(path)
}

fn read_index(db: &sled::Db) -> Result<Index> {
    let mut index = Index {
        next_id: 1,
        ..Index::default()
    };
    if let Some(raw) = db.get(KEY_VERSION)?
        && raw.as_ref() != codec::FORMAT_VERSION.to_le_bytes()
        && raw.as_ref() != codec::FORMAT_VERSION_3.to_le_bytes()
        && raw.as_ref() != codec::FORMAT_VERSION_2.to_le_bytes()
    {
        return Err(StoreError::Corrupt(format!("unknown store format {raw:?}")));
    }
    if let Some(raw) = db.get(KEY_NEXT_ID)? {
        index.next_id = raw.as_ref().try_into().map(u32::from_le_bytes).unwrap_or(1);
    }
    index.log_end = db
        .get(KEY_LOG_END)?
        .and_then(|raw| LogPosition::decode(&raw).ok());
    let key_id = |key: &[u8]| {
        key.get(1..5)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    };
    for entry in db.iter() {
        let (key, value) = entry?;
        let Some(&kind) = key.first() else { continue };
        let id = key_id(&key);
        let ok = match (kind, id) {
            (b'C', Some(id)) => ChannelRecord::decode(&value)
                .map(|c| index.channels.insert(ChannelId(id), c))
                .is_ok(),
            (b'S', Some(id)) => SubscriptionRecord::decode(&value)
                .map(|s| {
                    let acks = index
                        .subscriptions
                        .remove(&SubscriptionId(id))
                        .and_then(|(_, a)| a);
                    index.subscriptions.insert(SubscriptionId(id), (s, acks))
                })
                .is_ok(),
            (b'A', Some(id)) => codec::decode_ack_state(&value)
                .map(|acks| {
                    if let Some(entry) = index.subscriptions.get_mut(&SubscriptionId(id)) {
                        entry.1 = Some(acks);
                    } else {
                        // The subscription comes later in key order ('A' < 'S').
                        index
                            .subscriptions
                            .insert(SubscriptionId(id), (placeholder_subscription(), Some(acks)));
                    }
                })
                .is_ok(),
            (b'M', Some(id)) => match (
                codec::parse_record_key(&key),
                RecordLocation::decode(&value),
            ) {
                (Ok(first), Ok(at)) => {
                    index.records.insert((ChannelId(id), first), at);
                    true
                }
                _ => false,
            },
            (b'G', Some(id)) => SegmentUsage::decode(&value)
                .map(|u| index.usage.insert(id, u))
                .is_ok(),
            (b'O', Some(id)) => {
                index.orphans.insert(ChannelId(id));
                true
            }
            (b'T', Some(id)) => codec::parse_delayed_key(&key)
                .map(|(due, number)| {
                    (index.delayed).insert((ChannelId(id), due, number), value.to_vec())
                })
                .is_ok(),
            (b'K', _) => codec::parse_catalog_key(&key)
                .map(|name| index.catalog.insert(name, value.to_vec()))
                .is_ok(),
            // Derived or checked elsewhere: failure records, withdrawn sequences, published ids.
            (b'V' | b'I' | b'P' | b'F' | b'W' | b'D' | b'E' | b'X', _) => true,
            _ => false,
        };
        if !ok {
            index.unreadable.push(format!("{key:?}"));
        }
    }
    // An index written before the log end was kept: as the broker does, its end is the end
    // of the last record it indexes.
    if index.log_end.is_none() {
        index.log_end = index
            .records
            .values()
            .map(|at| LogPosition {
                segment: at.segment,
                offset: at.offset.saturating_add(u64::from(at.len)),
            })
            .max();
    }
    // Ack states without a subscription record are of no use.
    index
        .subscriptions
        .retain(|_, (s, _)| s.name != PLACEHOLDER);
    Ok(index)
}

const PLACEHOLDER: &str = "\u{0}";

fn placeholder_subscription() -> SubscriptionRecord {
    SubscriptionRecord {
        channel: ChannelId(0),
        name: PLACEHOLDER.into(),
        settings: SubscriptionSettings::default(),
        filter: String::new(),
        transform: Vec::new(),
    }
}

/// Reads every commit of every segment file (quarantined ones too).
fn scan_all(dir: &Path, report: &mut Report) -> Result<Log> {
    let mut log = Log::default();
    for (place, is_quarantine) in [
        (dir.join("segments"), false),
        (dir.join("segments/quarantine"), true),
    ] {
        if !place.exists() {
            continue;
        }
        let (segments, ids) = Segments::open_at(&place)?;
        for id in ids {
            if is_quarantine {
                log.quarantined.push(id);
            }
            let mut undecodable = 0;
            let scan = segments.scan_commits(id, 0, |commit| {
                for (offset, record) in &commit.records {
                    log.found.push(Found {
                        segment: id,
                        offset: *offset,
                        len: record.len,
                        channel: record.channel,
                        first: record.first_seq,
                        count: record.count,
                        publish_ms: record.publish_ms,
                    });
                }
                let at = LogPosition {
                    segment: id,
                    offset: commit.end,
                };
                log.end = log.end.max(at);
                match commit.changes.as_deref().map(change::decode) {
                    Some(Ok(changes)) => log.changes.push((at, changes)),
                    Some(Err(_)) => undecodable += 1,
                    None => {}
                }
            })?;
            if undecodable > 0 {
                report.problems.push(format!(
                    "segment {id}: {undecodable} commit frame(s) cannot be decoded"
                ));
            }
            if let Some(offset) = scan.damaged {
                log.damaged.insert((id, offset));
                report.problems.push(format!(
                    "segment {id}: damaged frame at offset {offset} (checksum mismatch); the file is not read past it"
                ));
            } else if scan.stopped < scan.len {
                report.facts.push(format!(
                    "segment {id}: {} bytes at offset {} are not a record (a torn write at a crash, or an old-format record)",
                    scan.len - scan.stopped,
                    scan.stopped
                ));
            }
            if !scan.uncommitted.is_empty() {
                report.facts.push(format!(
                    "segment {id}: {} record(s) of a commit a crash cut short (never confirmed; ignored)",
                    scan.uncommitted.len()
                ));
            }
        }
    }
    // Quarantined files are read after the others, but their commits are older or newer by
    // their ids: changes are replayed in log order.
    log.changes.sort_by_key(|(at, _)| *at);
    Ok(log)
}

/// Applies the changes of the commits after the index's durable point to the index, as a
/// start of the broker would; returns how many commits that was.
fn replay_changes(index: &mut Index, log: &Log) -> usize {
    let end = index.log_end.unwrap_or_default();
    let mut replayed = 0;
    for (_, changes) in log.changes.iter().filter(|(at, _)| *at > end) {
        replayed += 1;
        for change in changes {
            apply_change(index, change);
        }
    }
    replayed
}

fn apply_change(index: &mut Index, change: &Change) {
    match change {
        Change::CreateChannel { id, .. } if index.channels.contains_key(id) => {}
        Change::CreateChannel { id, name } => {
            index
                .channels
                .insert(*id, ChannelRecord::new(name.clone(), 1));
            index.next_id = index.next_id.max(id.0.saturating_add(1));
        }
        Change::DeleteChannel { id } => {
            index.channels.remove(id);
            index.subscriptions.retain(|_, (s, _)| s.channel != *id);
            index.records.retain(|(channel, _), _| channel != id);
            index.delayed.retain(|(channel, _, _), _| channel != id);
        }
        Change::UpdateChannel { id, settings } => {
            if let Some(record) = index.channels.get_mut(id) {
                record.settings = *settings;
            }
        }
        Change::Delay {
            channel,
            due_ms,
            number,
            body,
        } => {
            if index.channels.contains_key(channel) {
                (index.delayed).insert((*channel, *due_ms, *number), body.clone());
            }
        }
        Change::Undelay { channel, entries } => {
            for (due, number, _) in entries {
                index.delayed.remove(&(*channel, *due, *number));
            }
        }
        Change::CreateSubscription { id, record, acks } => {
            index
                .subscriptions
                .insert(*id, (record.clone(), Some(acks.clone())));
            index.next_id = index.next_id.max(id.0.saturating_add(1));
        }
        Change::UpdateSubscription { id, settings } => {
            if let Some((record, _)) = index.subscriptions.get_mut(id) {
                record.settings = *settings;
            }
        }
        Change::DeleteSubscription { id } => {
            index.subscriptions.remove(id);
        }
        // What a check compares does not depend on failure records, withdrawn sequences or
        // published ids.
        Change::Withdraw { .. }
        | Change::Drop { .. }
        | Change::ClearFailures { .. }
        | Change::Ids { .. } => {}
        Change::SaveAcks { id, acks, .. } => {
            if let Some((_, state)) = index.subscriptions.get_mut(id) {
                *state = Some(acks.clone());
            }
        }
        Change::Skipped { channel, next_seq } => {
            if let Some(record) = index.channels.get_mut(channel) {
                record.next_seq = *next_seq;
                record.first_seq = *next_seq;
            }
        }
        Change::Catalog { key, value } => match value {
            Some(value) => {
                index.catalog.insert(key.clone(), value.clone());
            }
            None => {
                index.catalog.remove(key);
            }
        },
    }
}

/// The records the index names that no scan reached (old-format records, which do not say
/// whose they are, and records past a frame a scan could not read) but that read back intact
/// where the index says: they count as found.
fn readable_unscanned(dir: &Path, index: &Index, found: &[Found]) -> Result<Vec<Found>> {
    let place = dir.join("segments");
    if !place.exists() {
        return Ok(Vec::new());
    }
    let (segments, _) = Segments::open_at(&place)?;
    let scanned: BTreeSet<(u32, u64)> = found.iter().map(|f| (f.segment, f.offset)).collect();
    let mut extra = Vec::new();
    for (&(channel, first), at) in &index.records {
        if scanned.contains(&(at.segment, at.offset)) {
            continue;
        }
        let Ok(framed) = segments.read(*at) else {
            continue;
        };
        if let Ok((count, _)) = codec::check_record(channel, first, &framed) {
            extra.push(Found {
                segment: at.segment,
                offset: at.offset,
                len: u64::from(at.len),
                channel,
                first,
                count,
                publish_ms: at.publish_ms,
            });
        }
    }
    Ok(extra)
}

fn describe(index: &Index, found: &[Found], report: &mut Report) {
    let files: BTreeSet<u32> = found.iter().map(|f| f.segment).collect();
    let messages: u64 = found.iter().map(|f| u64::from(f.count)).sum();
    report.facts.push(format!(
        "index: {} channel(s), {} subscription(s), {} record(s) indexed",
        index.channels.len(),
        index.subscriptions.len(),
        index.records.len()
    ));
    report.facts.push(format!(
        "segment log: {} file(s) with records, {} record(s), {} message(s) (collected ones included)",
        files.len(),
        found.len(),
        messages
    ));
    if !index.unreadable.is_empty() {
        report.problems.push(format!(
            "{} index entries cannot be decoded",
            index.unreadable.len()
        ));
    }
}

/// Finds what the index and the segment log disagree on.
fn compare(index: &Index, log: &Log, report: &mut Report) {
    let found = &log.found;
    let by_place: BTreeMap<(u32, u64), &Found> =
        found.iter().map(|f| ((f.segment, f.offset), f)).collect();
    for (&(channel, first), at) in &index.records {
        match by_place.get(&(at.segment, at.offset)) {
            Some(f) if f.channel == channel && f.first == first => {}
            None if log.damaged.contains(&(at.segment, at.offset)) => report.problems.push(format!(
                "channel {}: the record of sequences {first}.. (segment {}, offset {}) is damaged: its messages are lost",
                channel.0, at.segment, at.offset
            )),
            _ => report.problems.push(format!(
                "channel {}: the index names a record of sequence {first} at segment {} offset {} that is not there",
                channel.0, at.segment, at.offset
            )),
        }
    }
    let log_end = index.log_end.unwrap_or_default();
    let mut lost = 0;
    let mut replayable = 0;
    let mut orphans = BTreeSet::new();
    for f in found {
        if index.records.contains_key(&(f.channel, f.first)) {
            continue;
        }
        match index.channels.get(&f.channel) {
            Some(c) if f.end() <= c.first_seq => {}
            Some(_)
                if (LogPosition {
                    segment: f.segment,
                    offset: f.offset,
                }) >= log_end =>
            {
                replayable += 1
            }
            Some(_) => lost += 1,
            None if f.channel.0 < index.next_id && !index.orphans.contains(&f.channel) => {}
            None => {
                orphans.insert(f.channel.0);
            }
        }
    }
    if replayable > 0 {
        report.facts.push(format!(
            "{replayable} record(s) after the index's durable point will be indexed when the broker starts"
        ));
    }
    if lost > 0 {
        report.problems.push(format!(
            "{lost} stored record(s) are missing from the index: run `ferry repair`"
        ));
    }
    if !orphans.is_empty() {
        report.problems.push(format!(
            "records of {} channel(s) the index does not know (ids {orphans:?}): run `ferry repair`",
            orphans.len()
        ));
    }
    for (id, (sub, acks)) in &index.subscriptions {
        if !index.channels.contains_key(&sub.channel) {
            report.problems.push(format!(
                "subscription {:?} (id {}) names a missing channel",
                sub.name, id.0
            ));
        }
        if acks.is_none() {
            report
                .problems
                .push(format!("subscription {:?} has no ack state", sub.name));
        }
    }
}

/// Writes the rebuilt index into `db`.
fn rebuild(db: &sled::Db, mut index: Index, log: &Log, report: &mut Report) -> Result<()> {
    let found = &log.found;
    let mut batch = sled::Batch::default();
    let mut next_id = recreate_unknown(&mut index, found, report);
    let (usage, indexed) = index_records(&mut index, found, &mut batch);
    index_delayed(&mut index, &mut batch);
    for (id, channel) in &index.channels {
        batch.insert(&codec::channel_key(*id), channel.encode());
        next_id = next_id.max(id.0.saturating_add(1));
    }
    for (id, (sub, acks)) in &index.subscriptions {
        let Some(channel) = index.channels.get(&sub.channel) else {
            report.actions.push(format!(
                "dropped subscription {:?}: its channel is gone",
                sub.name
            ));
            continue;
        };
        let acks = acks.clone().unwrap_or_else(|| {
            report.actions.push(format!(
                "subscription {:?} had no readable ack state: it starts again at sequence {} (redelivery, never loss)",
                sub.name, channel.first_seq
            ));
            AckState {
                floor: channel.first_seq,
                ..AckState::default()
            }
        });
        batch.insert(&codec::subscription_key(*id), sub.encode());
        batch.insert(&codec::ack_key(*id), codec::encode_ack_state(&acks));
        next_id = next_id.max(id.0.saturating_add(1));
    }
    for (segment, use_) in &usage {
        batch.insert(&codec::segment_key(*segment), &use_.encode());
    }
    for (name, value) in &index.catalog {
        batch.insert(codec::catalog_key(name), value.as_slice());
    }
    batch.insert(KEY_VERSION, &codec::FORMAT_VERSION.to_le_bytes());
    batch.insert(KEY_NEXT_ID, &next_id.to_le_bytes());
    // Replay starts after the last whole commit: nothing the rebuilt index holds is replayed
    // again.
    batch.insert(KEY_LOG_END, &log.end.encode());
    db.apply_batch(batch)?;
    report.actions.push(format!(
        "rebuilt the index: {} channel(s), {} subscription(s), {indexed} record(s)",
        index.channels.len(),
        index.subscriptions.len()
    ));
    Ok(())
}

/// Channels the old index does not know, and did not delete, come back under a name that
/// says so, with a subscription that keeps their messages. Returns the next free id.
fn recreate_unknown(index: &mut Index, found: &[Found], report: &mut Report) -> u32 {
    let mut next_id = index.next_id.max(1);
    let mut ends: BTreeMap<ChannelId, (u64, u64)> = BTreeMap::new();
    for f in found {
        let span = ends.entry(f.channel).or_insert((f.first, f.end()));
        span.0 = span.0.min(f.first);
        span.1 = span.1.max(f.end());
    }
    let unknown: Vec<(ChannelId, u64)> = ends
        .iter()
        .filter(|(channel, _)| {
            !index.channels.contains_key(channel)
                && (channel.0 >= index.next_id || index.orphans.contains(channel))
        })
        .map(|(&channel, &(first, _))| (channel, first))
        .collect();
    if let Some(highest) = unknown.iter().map(|(c, _)| c.0).max() {
        next_id = next_id.max(highest.saturating_add(1));
    }
    for (channel, first) in unknown {
        let name = format!("recovered.channel-{}", channel.0);
        index
            .channels
            .insert(channel, ChannelRecord::new(name.clone(), first));
        let sub = SubscriptionId(next_id);
        next_id += 1;
        index.subscriptions.insert(
            sub,
            (
                SubscriptionRecord {
                    channel,
                    name: "recovered".into(),
                    settings: SubscriptionSettings::default(),
                    filter: String::new(),
                    transform: Vec::new(),
                },
                Some(AckState {
                    floor: first,
                    ..AckState::default()
                }),
            ),
        );
        report.actions.push(format!(
            "channel id {} was unknown: recreated as {name:?} with a subscription \"recovered\" from sequence {first}",
            channel.0
        ));
    }
    next_id
}

/// Indexes every intact record of a known channel that is not collected; returns each
/// segment's usage and how many records were indexed.
fn index_records(
    index: &mut Index,
    found: &[Found],
    batch: &mut sled::Batch,
) -> (BTreeMap<u32, SegmentUsage>, u64) {
    let mut usage: BTreeMap<u32, SegmentUsage> = BTreeMap::new();
    let mut indexed = 0u64;
    for channel in index.channels.values_mut() {
        channel.bytes = 0;
    }
    for f in found {
        let Some(channel) = index.channels.get_mut(&f.channel) else {
            continue;
        };
        if f.end() <= channel.first_seq {
            continue;
        }
        let at = RecordLocation {
            segment: f.segment,
            offset: f.offset,
            len: f.len as u32,
            publish_ms: f.publish_ms,
        };
        batch.insert(&codec::record_key(f.channel, f.first), &at.encode());
        channel.next_seq = channel.next_seq.max(f.end());
        channel.bytes += f.len;
        let use_ = usage.entry(f.segment).or_default();
        use_.records += 1;
        use_.bytes += f.len;
        indexed += 1;
    }
    (usage, indexed)
}

/// Indexes the delayed messages of known channels, and counts them in their channels.
fn index_delayed(index: &mut Index, batch: &mut sled::Batch) {
    for channel in index.channels.values_mut() {
        (channel.delayed, channel.delayed_bytes) = (0, 0);
    }
    for (&(id, due, number), body) in &index.delayed {
        let Some(channel) = index.channels.get_mut(&id) else {
            continue;
        };
        batch.insert(&codec::delayed_key(id, due, number), body.as_slice());
        channel.delayed += 1;
        channel.delayed_bytes += body.len() as u64;
        channel.next_delayed = channel.next_delayed.max(number + 1);
    }
}

/// Puts the old index aside in `index.old-TIME/` and the rebuilt one in its place.
fn swap_in(dir: &Path, rebuilt: &Path, report: &mut Report) -> Result<()> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let old = dir.join(format!("index.old-{stamp}"));
    std::fs::create_dir_all(&old).map_err(|e| io_error(&old, e))?;
    let is_sled =
        |name: &str| name == "db" || name == "conf" || name == "blobs" || name.starts_with("snap.");
    for entry in std::fs::read_dir(dir)
        .map_err(|e| io_error(dir, e))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_sled(&name) {
            let to = old.join(&name);
            std::fs::rename(entry.path(), &to).map_err(|e| io_error(&to, e))?;
        }
    }
    for entry in std::fs::read_dir(rebuilt)
        .map_err(|e| io_error(rebuilt, e))?
        .flatten()
    {
        let to = dir.join(entry.file_name());
        std::fs::rename(entry.path(), &to).map_err(|e| io_error(&to, e))?;
    }
    std::fs::remove_dir_all(rebuilt).map_err(|e| io_error(rebuilt, e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))?;
    report
        .actions
        .push(format!("the old index is kept in {}", old.display()));
    Ok(())
}
