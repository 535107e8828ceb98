//! Planning a group: each request becomes resolved [`Change`]s applied to the writer's state
//! (or is refused at once), collection follows the ack floors, and new messages are framed
//! into records.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Group, Op, Pending, Writer, WriterLog, pending, stats_of};
use crate::change::Change;
use crate::codec::{self, RecordLocation, SubscriptionRecord, record_key};
use crate::{AckState, ChannelId, ChannelLog, Message, Result, StoreError, SubscriptionId};

impl Writer {
    /// Adds one request to the group, or refuses it at once.
    pub(super) fn plan(&mut self, op: Op, group: &mut Group) -> Result<(), (Pending, StoreError)> {
        match op {
            Op::Append {
                channel,
                messages,
                reply,
            } => {
                let Some(record) = self.state.channels.get_mut(&channel) else {
                    return Err((pending(reply, 0..0), StoreError::ChannelNotFound));
                };
                // Checked again here: appends queued before the watermark was crossed must not
                // take the disk past it.
                if let Err(e) = self.space.check() {
                    return Err((pending(reply, 0..0), e));
                }
                let first = record.next_seq;
                let range = first..first + messages.len() as u64;
                record.next_seq = range.end;
                group.touched.channels.insert(channel);
                group
                    .appends
                    .entry(channel)
                    .or_insert_with(|| (first, Vec::new()))
                    .1
                    .extend(messages);
                group.replies.push(pending(reply, range));
            }
            Op::SaveAcks {
                subscription,
                state,
                reply,
            } => {
                if !self.state.subscriptions.contains_key(&subscription) {
                    return Err((pending(reply, ()), StoreError::SubscriptionNotFound));
                }
                if let Some(&at) = group.acks_at.get(&subscription) {
                    // A later state of the same subscription replaces the earlier one.
                    let change = Change::SaveAcks {
                        id: subscription,
                        acks: state,
                    };
                    if let Err(e) =
                        self.state
                            .apply(&self.db, &change, &mut group.batch, &mut group.touched)
                    {
                        return Err((pending(reply, ()), e));
                    }
                    group.changes[at] = change;
                    group.ack_states += 1;
                    group.replies.push(pending(reply, ()));
                    return Ok(());
                }
                let at = group.changes.len();
                let change = Change::SaveAcks {
                    id: subscription,
                    acks: state,
                };
                if let Err(e) = self.change(change, group) {
                    return Err((pending(reply, ()), e));
                }
                group.acks_at.insert(subscription, at);
                group.ack_states += 1;
                group.replies.push(pending(reply, ()));
            }
            Op::CreateChannel { name, reply } => {
                let refused = |reply| pending(reply, ChannelId(0));
                if self.state.names.contains_key(&name) {
                    return Err((refused(reply), StoreError::ChannelExists(name)));
                }
                let id = ChannelId(self.state.allocate_id());
                if let Err(e) = self.change(Change::CreateChannel { id, name }, group) {
                    return Err((refused(reply), e));
                }
                let record = &self.state.channels[&id];
                let log = Arc::new(ChannelLog::new(
                    id,
                    self.db.clone(),
                    self.segments.clone(),
                    stats_of(record),
                    self.cache.clone(),
                ));
                group.new_logs.push(log.clone());
                self.logs.insert(id, WriterLog::new(log));
                group.replies.push(pending(reply, id));
            }
            Op::DeleteChannel { channel, reply } => {
                if !self.state.channels.contains_key(&channel) {
                    return Err((pending(reply, ()), StoreError::ChannelNotFound));
                }
                if let Err(e) = self.change(Change::DeleteChannel { id: channel }, group) {
                    return Err((pending(reply, ()), e));
                }
                group.appends.remove(&channel);
                self.logs.remove(&channel);
                group.dropped_logs.push(channel);
                group.replies.push(pending(reply, ()));
            }
            Op::CreateSubscription {
                channel,
                name,
                settings,
                reply,
            } => {
                let refused = |reply| pending(reply, (SubscriptionId(0), AckState::default()));
                let Some(record) = self.state.channels.get(&channel) else {
                    return Err((refused(reply), StoreError::ChannelNotFound));
                };
                if self
                    .state
                    .subscriptions
                    .values()
                    .any(|s| s.channel == channel && s.name == name)
                {
                    return Err((refused(reply), StoreError::SubscriptionExists(name)));
                }
                let acks = AckState {
                    floor: record.next_seq,
                    acked_total: 0,
                    acked_above_floor: Vec::new(),
                };
                let id = SubscriptionId(self.state.allocate_id());
                let change = Change::CreateSubscription {
                    id,
                    record: SubscriptionRecord {
                        channel,
                        name,
                        settings,
                    },
                    acks: acks.clone(),
                };
                if let Err(e) = self.change(change, group) {
                    return Err((refused(reply), e));
                }
                group.replies.push(pending(reply, (id, acks)));
            }
            Op::UpdateSubscription {
                subscription,
                settings,
                reply,
            } => {
                if !self.state.subscriptions.contains_key(&subscription) {
                    return Err((pending(reply, ()), StoreError::SubscriptionNotFound));
                }
                let change = Change::UpdateSubscription {
                    id: subscription,
                    settings,
                };
                if let Err(e) = self.change(change, group) {
                    return Err((pending(reply, ()), e));
                }
                group.replies.push(pending(reply, ()));
            }
            Op::DeleteSubscription {
                subscription,
                reply,
            } => {
                if !self.state.subscriptions.contains_key(&subscription) {
                    return Err((pending(reply, ()), StoreError::SubscriptionNotFound));
                }
                let change = Change::DeleteSubscription { id: subscription };
                if let Err(e) = self.change(change, group) {
                    return Err((pending(reply, ()), e));
                }
                group.replies.push(pending(reply, ()));
            }
            Op::Close { reply } => {
                group.close = true;
                group.replies.push(pending(reply, ()));
            }
        }
        Ok(())
    }

    /// Applies a change to the state and the group's batch, and keeps it for the commit frame.
    fn change(&mut self, change: Change, group: &mut Group) -> Result<()> {
        self.state
            .apply(&self.db, &change, &mut group.batch, &mut group.touched)?;
        group.changes.push(change);
        Ok(())
    }

    /// Deletes the records wholly below the lowest ack floor of each channel whose floors may
    /// have moved (all of them once no subscription is left); returns the channels changed. As
    /// this happens in the same batch as the ack state that allows it, a crash never leaves
    /// collection half done. Collection is not written to the log: replay leaves it to the
    /// first group after a restart.
    ///
    /// A record's last sequence is one before the next record's first, or the channel's last
    /// committed sequence when it is the newest record, so no record needs to be read.
    pub(super) fn plan_collects(&mut self, group: &mut Group) -> Result<Vec<ChannelId>> {
        let mut changed = Vec::new();
        let mut releases = Vec::new();
        for &id in &group.touched.collects {
            let lowest_floor = self
                .state
                .subscriptions
                .iter()
                .filter(|(_, s)| s.channel == id)
                .filter_map(|(sub, _)| self.state.floors.get(sub))
                .min()
                .copied();
            let (Some(record), Some(log)) =
                (self.state.channels.get_mut(&id), self.logs.get_mut(&id))
            else {
                continue;
            };
            let committed_end = log.log.stats().next_seq;
            // Without subscriptions everything written goes, including what is not announced yet.
            let wanted = lowest_floor.unwrap_or(record.next_seq);
            if wanted > committed_end {
                self.pending_collects.insert(id);
            }
            let below = wanted.min(committed_end);
            if below <= record.first_seq || below <= log.collected_below {
                continue;
            }
            log.collected_below = below;
            let mut doomed: Vec<(u64, sled::IVec, RecordLocation)> = Vec::new();
            for entry in self.db.range(record_key(id, 0)..record_key(id, below)) {
                let (key, value) = entry?;
                doomed.push((
                    codec::parse_record_key(&key)?,
                    key,
                    RecordLocation::decode(&value)?,
                ));
            }
            let next_record = match self
                .db
                .range(record_key(id, below)..=record_key(id, u64::MAX))
                .next()
            {
                Some(entry) => Some(codec::parse_record_key(&entry?.0)?),
                None => None,
            };
            // The newest record found may reach past `below`: keep it then.
            let last_ends_below = match next_record {
                Some(next) => next <= below,
                None => committed_end <= below,
            };
            let mut new_first = next_record.unwrap_or(committed_end);
            if !last_ends_below && let Some(&(last_first, _, _)) = doomed.last() {
                doomed.retain(|(first, _, _)| *first != last_first);
                new_first = last_first;
            }
            if doomed.is_empty() {
                continue;
            }
            let mut freed = 0;
            for (_, key, at) in doomed {
                group.batch.remove(key);
                freed += u64::from(at.len);
                releases.push(at);
            }
            record.bytes = record.bytes.saturating_sub(freed);
            record.first_seq = new_first;
            group.touched.channels.insert(id);
            changed.push(id);
        }
        for at in releases {
            self.state.release(at, &mut group.touched);
        }
        Ok(changed)
    }

    /// Frames each channel's new messages into records and indexes them; returns the messages
    /// as stored.
    pub(super) fn encode_appends(
        &mut self,
        group: &mut Group,
    ) -> Result<Vec<(ChannelId, Vec<Message>)>> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut stored = Vec::with_capacity(group.appends.len());
        for (id, (first, messages)) in std::mem::take(&mut group.appends) {
            let subscribed = self.state.subscribed(id);
            let Some(record) = self.state.channels.get(&id) else {
                continue;
            };
            if !subscribed {
                if record.first_seq == first {
                    // Nobody will ever want these: they get their sequences, and are not stored.
                    let change = Change::Skipped {
                        channel: id,
                        next_seq: record.next_seq,
                    };
                    self.change(change, group)?;
                    stored.push((id, Vec::new()));
                    continue;
                }
                // Older records are still being collected: store these too, collect all later.
                self.pending_collects.insert(id);
            }
            let mut body = Vec::new();
            let mut start = 0;
            for end in 1..=messages.len() {
                let last = end == messages.len();
                codec::encode_body(&messages[end - 1..end], now, &mut body);
                if body.len() >= codec::RECORD_TARGET_BYTES || last {
                    let count = (end - start) as u32;
                    let record_first = first + start as u64;
                    let at = self
                        .appender
                        .append(|out| codec::frame_record(id, record_first, count, &body, out))?;
                    self.state.index_record(
                        id,
                        record_first,
                        count,
                        at,
                        &mut group.batch,
                        &mut group.touched,
                    );
                    group.records += 1;
                    body.clear();
                    start = end;
                }
            }
            let messages = messages
                .into_iter()
                .enumerate()
                .map(|(i, m)| Message {
                    sequence: first + i as u64,
                    publish_time_ms: now,
                    key: m.key,
                    id: m.id,
                    attributes: m.attributes,
                    payload: m.payload,
                })
                .collect();
            stored.push((id, messages));
        }
        Ok(stored)
    }
}
