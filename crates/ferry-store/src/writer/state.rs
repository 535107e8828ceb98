//! The store's authoritative state as the writer keeps it, and the one place where a change
//! or a message record becomes sled writes: live commits and replay at start-up both go
//! through [`State::apply`] and [`State::index_record`], so a replayed commit leaves the
//! index exactly as the live one did.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::batch::{Batch, Read};
use crate::change::Change;
use crate::codec::{
    self, ChannelRecord, KEY_NEXT_ID, RecordLocation, SegmentUsage, SubscriptionRecord, ack_key,
    channel_key, record_key, segment_key, subscription_key,
};
use crate::{AckState, ChannelId, Result, StoreError, SubscriptionId};

/// Channels, subscriptions, ack floors and segment usage, as committed.
#[derive(Default)]
pub(crate) struct State {
    pub channels: HashMap<ChannelId, ChannelRecord>,
    pub names: HashMap<String, ChannelId>,
    pub subscriptions: HashMap<SubscriptionId, SubscriptionRecord>,
    /// Each subscription's ack floor: a channel's records below the lowest are collected.
    pub floors: HashMap<SubscriptionId, u64>,
    /// Each subscription's ack state as last committed or planned.
    pub acks: HashMap<SubscriptionId, AckState>,
    /// Indexed records per segment file.
    pub usage: HashMap<u32, SegmentUsage>,
    /// The next channel or subscription id: ids are never given out twice.
    pub next_id: u32,
    /// Channels whose records the log holds but the index lost (see `recovery.rs`).
    pub orphans: HashSet<ChannelId>,
    /// Whether some channel keeps messages by age (kept up to date by `apply`: the writer asks
    /// after every commit).
    pub aging: bool,
    /// Sequences withdrawn from each channel (redriven dead letters), as sorted, disjoint,
    /// non-adjacent ranges `[start, end)`: every subscription counts them as acked.
    pub withdrawn: HashMap<ChannelId, Vec<(u64, u64)>>,
    /// When each channel with delayed messages has the next one due (ms since the Unix
    /// epoch): an early bound, never later than the soonest key in sled.
    pub due: HashMap<ChannelId, u64>,
    /// Deleted channels whose ids and delayed messages are still being swept.
    pub deleted: std::collections::BTreeSet<ChannelId>,
    /// sled holds `D` keys, the per-id index of stores written before the id index had files
    /// of its own: swept like a deleted channel's keys.
    pub legacy_ids: bool,
    /// The broker's catalog (see [`crate::Store::put_catalog`]).
    pub catalog: BTreeMap<String, Vec<u8>>,
}

/// What applying a commit touched: written out by [`State::finish`].
#[derive(Default)]
pub(crate) struct Touched {
    /// Channels whose record must be rewritten.
    pub channels: HashSet<ChannelId>,
    /// Segment files whose usage changed.
    pub segments: HashSet<u32>,
    /// Channels whose lowest ack floor may have moved.
    pub collects: HashSet<ChannelId>,
}

impl State {
    /// Reads the state sled holds (never the messages).
    pub(crate) fn load(db: &sled::Db) -> Result<State> {
        let mut state = State {
            next_id: read_next_id(db)?,
            usage: read_usage(db)?,
            ..State::default()
        };
        for entry in db.scan_prefix(b"C") {
            let (key, value) = entry?;
            let record = ChannelRecord::decode(&value)?;
            let id = ChannelId(id_of(&key)?);
            state.names.insert(record.name.clone(), id);
            state.channels.insert(id, record);
        }
        for entry in db.scan_prefix(b"S") {
            let (key, value) = entry?;
            let id = SubscriptionId(id_of(&key)?);
            let record = SubscriptionRecord::decode(&value)?;
            if !state.channels.contains_key(&record.channel) {
                return Err(StoreError::Corrupt(format!(
                    "subscription {:?} names a missing channel",
                    record.name
                )));
            }
            let Some(raw) = db.get(ack_key(id))? else {
                return Err(StoreError::Corrupt(format!(
                    "subscription {:?} has no ack state",
                    record.name
                )));
            };
            let acks = codec::decode_ack_state(&raw)?;
            state.floors.insert(id, acks.floor);
            state.acks.insert(id, acks);
            state.subscriptions.insert(id, record);
        }
        for entry in db.scan_prefix(b"O") {
            state.orphans.insert(ChannelId(id_of(&entry?.0)?));
        }
        state.legacy_ids = db.scan_prefix(b"D").next().is_some();
        for entry in db.scan_prefix(b"X") {
            state.deleted.insert(ChannelId(id_of(&entry?.0)?));
        }
        for entry in db.scan_prefix(b"K") {
            let (key, value) = entry?;
            let name = codec::parse_catalog_key(&key)?;
            state.catalog.insert(name, value.to_vec());
        }
        for entry in db.scan_prefix(b"W") {
            let (key, value) = entry?;
            let ranges = codec::decode_ranges(&mut value.as_ref())?;
            state.withdrawn.insert(ChannelId(id_of(&key)?), ranges);
        }
        for (&id, record) in &state.channels {
            if record.delayed > 0
                && let Some(entry) = db.scan_prefix(codec::delayed_prefix(id)).next()
            {
                let (due, _) = codec::parse_delayed_key(&entry?.0)?;
                state.due.insert(id, due);
            }
        }
        state.refresh_aging();
        Ok(state)
    }

    /// When the soonest delayed message of any channel is due.
    pub(crate) fn next_due(&self) -> Option<u64> {
        self.due.values().copied().min()
    }

    fn refresh_aging(&mut self) {
        self.aging = self
            .channels
            .values()
            .any(|c| c.settings.retention.max_age_ms > 0);
    }

    /// Whether `channel` stores what it is sent even with no subscription: it keeps acked
    /// messages, or it is a dead-letter channel.
    pub(crate) fn keeps(&self, channel: ChannelId) -> bool {
        self.channels
            .get(&channel)
            .is_some_and(|c| c.settings.retention.keeps())
            || self.dead_letter_user(channel).is_some()
    }

    /// Whether any subscription reads `channel`.
    pub(crate) fn subscribed(&self, channel: ChannelId) -> bool {
        self.subscriptions.values().any(|s| s.channel == channel)
    }

    /// The subscription whose dead-letter channel `channel` is, if any: such a channel keeps
    /// what it receives even while nobody subscribes to it.
    pub(crate) fn dead_letter_user(&self, channel: ChannelId) -> Option<&SubscriptionRecord> {
        self.subscriptions
            .values()
            .find(|s| s.settings.dead_letter == Some(channel))
    }

    /// Whether `subscription`'s ack state as last committed or planned acks `seq`.
    pub(crate) fn acked(&self, subscription: SubscriptionId, seq: u64) -> bool {
        self.acks
            .get(&subscription)
            .is_some_and(|a| a.contains(seq))
    }

    /// The sequence below which `channel`'s messages are acked by every subscription (and
    /// may be collected): the lowest ack floor, past what was withdrawn. Without subscriptions,
    /// everything written, but a dead-letter channel keeps all it was not withdrawn of.
    pub(crate) fn collect_floor(&self, channel: ChannelId) -> u64 {
        let lowest = (self.subscriptions.iter())
            .filter(|(_, s)| s.channel == channel)
            .filter_map(|(sub, _)| self.floors.get(sub))
            .map(|&floor| self.skip_withdrawn(channel, floor))
            .min();
        let Some(record) = self.channels.get(&channel) else {
            return 0;
        };
        match lowest {
            Some(floor) => floor,
            None if self.dead_letter_user(channel).is_some() => {
                self.skip_withdrawn(channel, record.first_seq)
            }
            None => record.next_seq,
        }
    }

    /// How many of `channel`'s sequences in `[from, to)` were not withdrawn.
    pub(crate) fn live(&self, channel: ChannelId, from: u64, to: u64) -> u64 {
        let ranges = self.withdrawn.get(&channel).map_or(&[][..], Vec::as_slice);
        let withdrawn: u64 = ranges
            .iter()
            .map(|&(start, end)| end.min(to).saturating_sub(start.max(from)))
            .sum();
        to.saturating_sub(from).saturating_sub(withdrawn)
    }

    /// The sequence `count` sequences of `channel` past `from` that were not withdrawn
    /// (withdrawn ones are stepped over).
    pub(crate) fn advance_live(&self, channel: ChannelId, from: u64, count: u64) -> u64 {
        let ranges = self.withdrawn.get(&channel).map_or(&[][..], Vec::as_slice);
        let (mut at, mut left) = (from, count);
        while left > 0 {
            at = self.skip_withdrawn(channel, at);
            let next = ranges.iter().map(|&(start, _)| start).find(|&s| s > at);
            let step = left.min(next.map_or(u64::MAX, |next| next - at));
            at += step;
            left -= step;
        }
        at
    }

    /// Whether `seq` was withdrawn from `channel`.
    pub(crate) fn is_withdrawn(&self, channel: ChannelId, seq: u64) -> bool {
        self.skip_withdrawn(channel, seq) != seq
    }

    /// The first sequence at or after `seq` that was not withdrawn from `channel`.
    pub(crate) fn skip_withdrawn(&self, channel: ChannelId, seq: u64) -> u64 {
        let ranges = self.withdrawn.get(&channel).map_or(&[][..], Vec::as_slice);
        // The ranges are sorted and disjoint: the one that may hold `seq` is the last that
        // starts at or before it.
        let at = ranges.partition_point(|&(start, _)| start <= seq);
        match at.checked_sub(1).map(|i| ranges[i]) {
            Some((_, end)) if seq < end => end,
            _ => seq,
        }
    }

    /// Forgets withdrawn ranges below `first_seq` (their records are collected).
    pub(crate) fn trim_withdrawn(&mut self, channel: ChannelId, first_seq: u64, batch: &mut Batch) {
        let Some(ranges) = self.withdrawn.get_mut(&channel) else {
            return;
        };
        let before = ranges.len();
        ranges.retain(|&(_, end)| end > first_seq);
        if ranges.len() != before {
            write_withdrawn(channel, ranges, batch);
        }
    }

    /// Applies one change to the state and to `batch`. A change that names what no longer
    /// exists changes nothing (on replay, a later commit may already be in the index).
    pub(crate) fn apply(
        &mut self,
        db: &impl Read,
        change: &Change,
        batch: &mut Batch,
        touched: &mut Touched,
    ) -> Result<()> {
        match change {
            // Replay may meet what an index it started from already holds: a no-op then.
            Change::CreateChannel { id, .. } if self.channels.contains_key(id) => {
                self.saw_id(id.0, batch);
            }
            Change::CreateChannel { id, name } => {
                let record = ChannelRecord::new(name.clone(), 1);
                self.names.insert(name.clone(), *id);
                self.channels.insert(*id, record);
                self.saw_id(id.0, batch);
                touched.channels.insert(*id);
            }
            Change::DeleteChannel { id } => {
                self.delete_channel(db, *id, batch, touched)?;
                self.refresh_aging();
            }
            Change::CreateSubscription { id, record, .. }
                if self.subscriptions.contains_key(id)
                    || !self.channels.contains_key(&record.channel) =>
            {
                // Ignored, but its id is never given out again.
                self.saw_id(id.0, batch);
            }
            Change::CreateSubscription { id, record, acks } => {
                batch.insert(&subscription_key(*id), record.encode());
                batch.insert(&ack_key(*id), codec::encode_ack_state(acks));
                self.floors.insert(*id, acks.floor);
                self.acks.insert(*id, acks.clone());
                self.subscriptions.insert(*id, record.clone());
                self.saw_id(id.0, batch);
            }
            Change::UpdateSubscription { id, settings } => {
                if let Some(record) = self.subscriptions.get_mut(id) {
                    record.settings = *settings;
                    batch.insert(&subscription_key(*id), record.encode());
                }
            }
            Change::DeleteSubscription { id } => {
                if let Some(record) = self.subscriptions.remove(id) {
                    self.floors.remove(id);
                    self.acks.remove(id);
                    touched.collects.insert(record.channel);
                    batch.remove(&subscription_key(*id));
                    batch.remove(&ack_key(*id));
                    remove_failures(db, *id, batch)?;
                }
            }
            Change::SaveAcks { id, acks, failures } => {
                if let Some(record) = self.subscriptions.get(id) {
                    batch.insert(&ack_key(*id), codec::encode_ack_state(acks));
                    self.floors.insert(*id, acks.floor);
                    self.acks.insert(*id, acks.clone());
                    touched.collects.insert(record.channel);
                    let mut encoded = Vec::new();
                    for (seq, failure) in failures {
                        let key = codec::failure_key(*id, *seq);
                        match failure {
                            Some(failure) => {
                                encoded.clear();
                                codec::encode_failure(failure, &mut encoded);
                                batch.insert(&key, encoded.as_slice());
                            }
                            None => batch.remove(&key),
                        }
                    }
                }
            }
            Change::Ids {
                channel,
                publish_ms,
                entries,
            } => {
                if self.channels.contains_key(channel) && !entries.is_empty() {
                    let first = codec::ids_discriminator(entries);
                    let key = codec::id_time_key(*channel, *publish_ms, first);
                    batch.insert(&key, codec::encode_ids(entries));
                }
            }
            Change::ClearFailures { id } => {
                if self.subscriptions.contains_key(id) {
                    remove_failures(db, *id, batch)?;
                }
            }
            Change::UpdateChannel { id, settings } => {
                if let Some(record) = self.channels.get_mut(id) {
                    record.settings = *settings;
                    touched.channels.insert(*id);
                    touched.collects.insert(*id);
                }
                self.refresh_aging();
            }
            Change::Withdraw { channel, ranges } => {
                self.withdraw(*channel, ranges, batch, touched);
            }
            Change::Drop {
                channel,
                range,
                count,
            } => {
                self.withdraw(*channel, &[*range], batch, touched);
                if let Some(record) = self.channels.get_mut(channel) {
                    record.dropped += count;
                    touched.channels.insert(*channel);
                }
            }
            Change::Delay {
                channel,
                due_ms,
                number,
                body,
            } => {
                if let Some(record) = self.channels.get_mut(channel) {
                    batch.insert(
                        &codec::delayed_key(*channel, *due_ms, *number),
                        body.as_slice(),
                    );
                    record.delayed += 1;
                    record.delayed_bytes += body.len() as u64;
                    record.next_delayed = record.next_delayed.max(number + 1);
                    touched.channels.insert(*channel);
                    let due = self.due.entry(*channel).or_insert(*due_ms);
                    *due = (*due).min(*due_ms);
                }
            }
            Change::Undelay { channel, entries } => {
                if let Some(record) = self.channels.get_mut(channel) {
                    for &(due, number, len) in entries {
                        batch.remove(&codec::delayed_key(*channel, due, number));
                        record.delayed = record.delayed.saturating_sub(1);
                        record.delayed_bytes = record.delayed_bytes.saturating_sub(u64::from(len));
                    }
                    touched.channels.insert(*channel);
                    if record.delayed == 0 {
                        self.due.remove(channel);
                    }
                }
            }
            Change::Skipped { channel, next_seq } => {
                if let Some(record) = self.channels.get_mut(channel) {
                    record.next_seq = *next_seq;
                    record.first_seq = *next_seq;
                    touched.channels.insert(*channel);
                }
            }
            Change::Catalog { key, value } => match value {
                Some(value) => {
                    batch.insert(codec::catalog_key(key), value.as_slice());
                    self.catalog.insert(key.clone(), value.clone());
                }
                None => {
                    batch.remove(codec::catalog_key(key));
                    self.catalog.remove(key);
                }
            },
        }
        Ok(())
    }

    /// Deletes a channel with its records and subscriptions. Everything to delete is read
    /// before anything changes, so that a failed read leaves the channel whole.
    fn delete_channel(
        &mut self,
        db: &impl Read,
        id: ChannelId,
        batch: &mut Batch,
        touched: &mut Touched,
    ) -> Result<()> {
        let mut records = Vec::new();
        for entry in db.scan_prefix(&codec::channel_log_prefix(id)) {
            let (key, value) = entry?;
            records.push((key, RecordLocation::decode(&value)?));
        }
        let Some(record) = self.channels.remove(&id) else {
            return Ok(());
        };
        self.names.remove(&record.name);
        batch.remove(&channel_key(id));
        touched.channels.remove(&id);
        touched.collects.remove(&id);
        for (key, at) in records {
            batch.remove(key);
            self.release(at, touched);
        }
        let doomed: Vec<_> = self
            .subscriptions
            .iter()
            .filter(|(_, s)| s.channel == id)
            .map(|(sub, _)| *sub)
            .collect();
        for sub in doomed {
            self.subscriptions.remove(&sub);
            self.floors.remove(&sub);
            self.acks.remove(&sub);
            batch.remove(&subscription_key(sub));
            batch.remove(&ack_key(sub));
            remove_failures(db, sub, batch)?;
        }
        if self.withdrawn.remove(&id).is_some() {
            batch.remove(&codec::withdrawn_key(id));
        }
        self.due.remove(&id);
        // Its published ids and delayed messages may be millions of keys: one batch removing
        // them all held hundreds of MiB. They are swept after the commit, a bounded batch at a
        // time (`sweep_deleted`), and the tombstone says so across restarts.
        batch.insert(&codec::tombstone_key(id), &[]);
        self.deleted.insert(id);
        Ok(())
    }

    /// Removes up to `most` keys of channels deleted with keys left behind (their ids,
    /// delayed messages); true while some remain. Not logged: the tombstone written with the
    /// delete brings the sweep back after a restart.
    pub(crate) fn sweep_deleted(&mut self, db: &sled::Db, most: usize) -> Result<bool> {
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        let mut swept = Vec::new();
        if self.legacy_ids {
            for key in db.scan_prefix(b"D").keys().take(most) {
                batch.remove(key?);
                removed += 1;
            }
            self.legacy_ids = removed == most;
        }
        for &id in &self.deleted {
            for kind in [b'D', b'E', b'T'] {
                let mut prefix = vec![kind];
                prefix.extend_from_slice(&id.0.to_be_bytes());
                for entry in db.scan_prefix(prefix).keys() {
                    if removed == most {
                        break;
                    }
                    batch.remove(entry?);
                    removed += 1;
                }
            }
            if removed == most {
                break;
            }
            batch.remove(&codec::tombstone_key(id));
            swept.push(id);
        }
        db.apply_batch(batch)?;
        for id in swept {
            self.deleted.remove(&id);
        }
        Ok(!self.deleted.is_empty() || self.legacy_ids)
    }

    /// Adds sequences withdrawn from `channel`: every subscription counts them as acked.
    fn withdraw(
        &mut self,
        channel: ChannelId,
        ranges: &[(u64, u64)],
        batch: &mut Batch,
        touched: &mut Touched,
    ) {
        if self.channels.contains_key(&channel) {
            let all = self.withdrawn.entry(channel).or_default();
            merge_ranges(all, ranges);
            write_withdrawn(channel, all, batch);
            touched.collects.insert(channel);
        }
    }

    fn saw_id(&mut self, id: u32, batch: &mut Batch) {
        if id >= self.next_id {
            self.next_id = id.saturating_add(1);
            batch.insert(KEY_NEXT_ID, &self.next_id.to_le_bytes());
        }
    }

    /// Indexes a message record of `channel` (which must exist) stored at `at`.
    pub(crate) fn index_record(
        &mut self,
        channel: ChannelId,
        first_seq: u64,
        count: u32,
        at: RecordLocation,
        batch: &mut Batch,
        touched: &mut Touched,
    ) {
        let Some(record) = self.channels.get_mut(&channel) else {
            return;
        };
        batch.insert(&record_key(channel, first_seq), &at.encode());
        if record.first_seq == record.next_seq {
            record.first_seq = first_seq;
        }
        record.next_seq = record
            .next_seq
            .max(first_seq.saturating_add(u64::from(count)));
        record.bytes += u64::from(at.len);
        touched.channels.insert(channel);
        let usage = self.usage.entry(at.segment).or_default();
        usage.records += 1;
        usage.bytes += u64::from(at.len);
        touched.segments.insert(at.segment);
    }

    /// Counts a record out of its segment file.
    pub(crate) fn release(&mut self, at: RecordLocation, touched: &mut Touched) {
        let usage = self.usage.entry(at.segment).or_default();
        usage.records = usage.records.saturating_sub(1);
        usage.bytes = usage.bytes.saturating_sub(u64::from(at.len));
        touched.segments.insert(at.segment);
    }

    /// Writes what a commit touched: channel records and segment usage. A segment no record is
    /// left in, and that is no longer appended to (`current`), loses its entry: returns those,
    /// to be deleted once that is durable.
    pub(crate) fn finish(
        &mut self,
        batch: &mut Batch,
        touched: &mut Touched,
        current: Option<u32>,
    ) -> Vec<u32> {
        for id in touched.channels.drain() {
            if let Some(record) = self.channels.get(&id) {
                batch.insert(&channel_key(id), record.encode());
            }
        }
        let mut emptied = Vec::new();
        for segment in touched.segments.drain() {
            let usage = self.usage.get(&segment).copied().unwrap_or_default();
            if usage.records == 0 && Some(segment) != current {
                self.usage.remove(&segment);
                batch.remove(&segment_key(segment));
                emptied.push(segment);
            } else {
                batch.insert(&segment_key(segment), &usage.encode());
            }
        }
        emptied
    }
}

/// Drops every failure record of a subscription.
fn remove_failures(db: &impl Read, id: SubscriptionId, batch: &mut Batch) -> Result<()> {
    for entry in db.scan_prefix(&codec::failure_prefix(id)) {
        batch.remove(entry?.0);
    }
    Ok(())
}

fn write_withdrawn(channel: ChannelId, ranges: &[(u64, u64)], batch: &mut Batch) {
    let key = codec::withdrawn_key(channel);
    match ranges.is_empty() {
        true => batch.remove(&key),
        false => batch.insert(&key, codec::encode_ranges(ranges)),
    }
}

/// Adds `new` to the sorted, disjoint, non-adjacent ranges `all`, keeping them so.
pub(crate) fn merge_ranges(all: &mut Vec<(u64, u64)>, new: &[(u64, u64)]) {
    all.extend(new.iter().copied().filter(|(s, e)| s < e));
    all.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for &(start, end) in all.iter() {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    *all = merged;
}

/// Sorted sequences as ranges `[start, end)`.
pub(crate) fn ranges_of(seqs: &[u64]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &seq in seqs {
        match ranges.last_mut() {
            Some(last) if last.1 == seq => last.1 += 1,
            _ => ranges.push((seq, seq + 1)),
        }
    }
    ranges
}

pub(crate) fn read_next_id(db: &sled::Db) -> Result<u32> {
    match db.get(KEY_NEXT_ID)? {
        Some(raw) => {
            Ok(u32::from_le_bytes(raw.as_ref().try_into().map_err(
                |_| StoreError::Corrupt("bad id counter".into()),
            )?))
        }
        None => Ok(1),
    }
}

pub(crate) fn read_usage(db: &sled::Db) -> Result<HashMap<u32, SegmentUsage>> {
    let mut usage = HashMap::new();
    for entry in db.scan_prefix(b"G") {
        let (key, value) = entry?;
        usage.insert(id_of(&key)?, SegmentUsage::decode(&value)?);
    }
    Ok(usage)
}

pub(crate) fn id_of(key: &[u8]) -> Result<u32> {
    key.get(1..5)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt(format!("bad key {key:?}")))
}
