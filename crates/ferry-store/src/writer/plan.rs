//! Planning a group: each request becomes resolved [`Change`]s applied to the writer's state
//! (or is refused at once), collection follows the ack floors, and new messages are framed
//! into records.

use std::ops::Range;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Group, Op, Reply, Writer, WriterLog, pending, state, stats_of};
use crate::batch::Read;
use crate::change::Change;
use crate::codec::{self, RecordLocation, SubscriptionRecord, record_key};
use crate::{
    AckState, AckUpdate, Appended, ChannelId, ChannelLog, ChannelSettings, LimitPolicy, Message,
    NewMessage, Position, Result, StoreError, SubscriptionId, SubscriptionSettings,
};

impl Writer {
    /// Adds one request to the group, or refuses it at once.
    pub(super) fn plan(&mut self, op: Op, group: &mut Group) {
        match op {
            Op::Append {
                channel,
                messages,
                reply,
            } => {
                let planned = self
                    .space
                    .check()
                    .and_then(|()| self.plan_publish(channel, messages, group));
                answer(group, reply, planned);
            }
            Op::SaveAcks {
                subscription,
                update,
                reply,
            } => {
                let planned = self.plan_acks(subscription, update, group);
                answer(group, reply, planned);
            }
            Op::Redrive {
                from,
                to,
                moves,
                reply,
            } => {
                let planned = self.plan_redrive(from, to, moves, group);
                answer(group, reply, planned);
            }
            Op::CreateChannel {
                name,
                settings,
                reply,
            } => {
                let planned = self.plan_create_channel(name, settings, group);
                answer(group, reply, planned);
            }
            Op::UpdateChannel {
                channel,
                settings,
                reply,
            } => {
                let planned = match self.state.channels.contains_key(&channel) {
                    true => self
                        .change(
                            Change::UpdateChannel {
                                id: channel,
                                settings,
                            },
                            group,
                            None,
                        )
                        .map(drop),
                    false => Err(StoreError::ChannelNotFound),
                };
                answer(group, reply, planned);
            }
            Op::DeleteChannel { channel, reply } => {
                let planned = self.plan_delete_channel(channel, group);
                answer(group, reply, planned);
            }
            Op::CreateSubscription {
                channel,
                name,
                settings,
                start,
                filter,
                transform,
                reply,
            } => {
                let record = SubscriptionRecord {
                    channel,
                    name,
                    settings,
                    filter,
                    transform,
                };
                let planned = self.plan_create_subscription(record, start, group);
                answer(group, reply, planned);
            }
            Op::UpdateSubscription {
                subscription,
                settings,
                reply,
            } => {
                let change = Change::UpdateSubscription {
                    id: subscription,
                    settings,
                };
                let planned = self
                    .check_dead_letter(&settings)
                    .and_then(|()| self.plan_subscription_change(subscription, change, group));
                answer(group, reply, planned);
            }
            Op::Seek {
                subscription,
                position,
                reply,
            } => {
                let planned = self.plan_seek(subscription, position, group);
                answer(group, reply, planned);
            }
            Op::DeleteSubscription {
                subscription,
                reply,
            } => {
                let change = Change::DeleteSubscription { id: subscription };
                let planned = self.plan_subscription_change(subscription, change, group);
                answer(group, reply, planned);
            }
            Op::Catalog { key, value, reply } => {
                let planned = self.change(Change::Catalog { key, value }, group, None);
                answer(group, reply, planned.map(drop));
            }
            Op::CatchUp { reply } => group.catch_ups.push(reply),
            Op::Close { reply } => {
                group.close = true;
                answer(group, reply, Ok(()));
            }
        }
    }

    /// Plans a publish: messages whose `id` the channel stored within its de-duplication
    /// window (or that an earlier message of the group carries) are answered with their
    /// original's sequence and not stored; messages whose delivery time is ahead are stored
    /// aside until then; the rest are appended. The ids of what is kept are remembered.
    fn plan_publish(
        &mut self,
        channel: ChannelId,
        messages: Vec<NewMessage>,
        group: &mut Group,
    ) -> Result<Appended> {
        let window = self
            .state
            .channels
            .get(&channel)
            .ok_or(StoreError::ChannelNotFound)?
            .settings
            .dedup_window_ms;
        let now = now_ms();
        let delays = messages.iter().any(|m| due_of(m, now).is_some());
        if !delays && (window == 0 || messages.iter().all(|m| m.id.is_empty())) {
            if self.state.channels[&channel].settings.limits.any() {
                let bytes = messages.iter().map(codec::encoded_len).sum();
                self.plan_limits(channel, messages.len() as u64, bytes, group)?;
            }
            let stored = self.plan_append(channel, messages, group)?;
            return Ok(Appended {
                stored,
                ..Appended::default()
            });
        }
        let first = self.state.channels[&channel].next_seq;
        let mut kept = Vec::with_capacity(messages.len());
        let mut later = Vec::new();
        let mut appended = Appended::default();
        // The batch's ids go into the group as they are met (so a second copy within the
        // batch is a duplicate of the first), and out again if the batch is refused.
        let mut remembered = Vec::new();
        for (at, message) in messages.into_iter().enumerate() {
            let due = due_of(&message, now);
            if window > 0 && !message.id.is_empty() {
                let known = group.ids.get(&channel).and_then(|ids| ids.get(&message.id));
                let earlier = match known {
                    Some(&seq) => Ok(Some(seq)),
                    None => self.ids.find(channel, &message.id, now, window),
                };
                let earlier = earlier.inspect_err(|_| forget_ids(group, channel, &remembered))?;
                if let Some(original) = earlier {
                    appended.duplicates.push((at, original));
                    continue;
                }
                // A delayed message has no sequence yet: its duplicates are answered with 0.
                let seq = match due {
                    Some(_) => 0,
                    None => first + kept.len() as u64,
                };
                let ids = group.ids.entry(channel).or_default();
                ids.insert(message.id.clone(), seq);
                remembered.push((seq, message.id.clone()));
            }
            match due {
                Some(due) => {
                    appended.delayed.push(at);
                    later.push((due, message));
                }
                None => kept.push(message),
            }
        }
        appended.stored = self
            .plan_kept(channel, kept, later, now, group)
            .inspect_err(|_| forget_ids(group, channel, &remembered))?;
        group
            .remember
            .entry(channel)
            .or_default()
            .extend(remembered);
        Ok(appended)
    }

    /// Plans what a publish keeps: within the channel's limits, appended, or stored aside
    /// until due.
    fn plan_kept(
        &mut self,
        channel: ChannelId,
        kept: Vec<NewMessage>,
        later: Vec<(u64, NewMessage)>,
        now: u64,
        group: &mut Group,
    ) -> Result<Range<u64>> {
        let bytes = kept.iter().chain(later.iter().map(|(_, m)| m));
        let bytes = bytes.map(codec::encoded_len).sum();
        self.plan_limits(channel, (kept.len() + later.len()) as u64, bytes, group)?;
        let stored = self.plan_append(channel, kept, group)?;
        for (due, message) in later {
            self.plan_delay(channel, due, &message, now, group)?;
        }
        Ok(stored)
    }

    /// Stores a message aside until it is due.
    fn plan_delay(
        &mut self,
        channel: ChannelId,
        due_ms: u64,
        message: &NewMessage,
        now: u64,
        group: &mut Group,
    ) -> Result<()> {
        let number = self.state.channels[&channel].next_delayed;
        let mut body = Vec::with_capacity(message.size() + 32);
        codec::encode_body(std::slice::from_ref(message), now, &mut body);
        let change = Change::Delay {
            channel,
            due_ms,
            number,
            body,
        };
        group.restated.insert(channel);
        self.change(change, group, None).map(drop)
    }

    /// Moves the delayed messages that are due into their channels, in due order (at most
    /// `MAX_DUE_MESSAGES` or `MAX_DUE_BYTES` a group: the rest go with the next one). Their
    /// keys go in the same commit as their records, so each enters its channel exactly once.
    pub(super) fn plan_due(&mut self, group: &mut Group) {
        let now = now_ms();
        if self.state.next_due().is_none_or(|due| due > now) {
            return;
        }
        let channels: Vec<ChannelId> = (self.state.due.iter())
            .filter(|(_, due)| **due <= now)
            .map(|(id, _)| *id)
            .collect();
        let (mut count, mut bytes) = (0, 0);
        for channel in channels {
            let mut messages = Vec::new();
            let mut entries = Vec::new();
            let mut next = None;
            for entry in self.index.scan_prefix(&codec::delayed_prefix(channel)) {
                let read = entry
                    .map_err(StoreError::from)
                    .and_then(|(key, value)| Ok((codec::parse_delayed_key(&key)?, value)));
                let ((due, number), value) = match read {
                    Ok(read) => read,
                    Err(e) => {
                        // Tried again in a second.
                        tracing::error!(error = %e, "cannot read delayed messages");
                        next = Some(now + 1000);
                        break;
                    }
                };
                if due > now || count >= MAX_DUE_MESSAGES || bytes >= MAX_DUE_BYTES {
                    next = Some(due);
                    break;
                }
                match codec::decode_delayed(&value) {
                    Ok(message) => messages.push(message),
                    Err(e) => {
                        tracing::error!(due, error = %e, "dropped a damaged delayed message")
                    }
                }
                entries.push((due, number, value.len() as u32));
                count += 1;
                bytes += value.len();
            }
            match next {
                Some(due) => self.state.due.insert(channel, due),
                None => self.state.due.remove(&channel),
            };
            if entries.is_empty() {
                continue;
            }
            group.restated.insert(channel);
            let planned = self
                .plan_append(channel, messages, group)
                .and_then(|_| self.change(Change::Undelay { channel, entries }, group, None));
            if let Err(e) = planned {
                tracing::error!(error = %e, "cannot move due delayed messages");
            }
        }
    }

    /// Gives messages their sequences in the group. Publishes check free space first (again
    /// here: appends queued before the watermark was crossed must not take the disk past it);
    /// dead letters do not, as they come with the acks that free space.
    pub(super) fn plan_append(
        &mut self,
        channel: ChannelId,
        messages: Vec<NewMessage>,
        group: &mut Group,
    ) -> Result<Range<u64>> {
        let record = self
            .state
            .channels
            .get_mut(&channel)
            .ok_or(StoreError::ChannelNotFound)?;
        let first = record.next_seq;
        let range = first..first + messages.len() as u64;
        record.next_seq = range.end;
        if record.settings.limits.any() {
            let bytes: u64 = messages.iter().map(codec::encoded_len).sum();
            *group.planned_bytes.entry(channel).or_default() += bytes;
        }
        group.touched.channels.insert(channel);
        group
            .appends
            .entry(channel)
            .or_insert_with(|| (first, Vec::new()))
            .1
            .extend(messages);
        Ok(range)
    }

    /// Saves an ack state with its failure records, and appends its dead letters to the
    /// subscription's dead-letter channel in the same commit: a dead-lettered message is
    /// acked exactly when its copy is stored.
    fn plan_acks(
        &mut self,
        subscription: SubscriptionId,
        update: AckUpdate,
        group: &mut Group,
    ) -> Result<()> {
        self.subscription_exists(subscription)?;
        let mut letters = Vec::with_capacity(update.dead_letters.len());
        for (seq, channel, message) in update.dead_letters {
            // Appended with the state that first acked its original.
            if self.state.acked(subscription, seq) {
                continue;
            }
            letters.push((self.dead_letter_target(subscription, channel)?, message));
        }
        for (target, message) in letters {
            // A dead letter is never refused (that would hold up the ack), but a dead-letter
            // channel that drops its oldest makes room for it.
            let drops = self.state.channels.get(&target).is_some_and(|c| {
                c.settings.limits.any() && c.settings.limits.policy == LimitPolicy::DropOldest
            });
            if drops
                && let Err(e) = self.plan_limits(target, 1, codec::encoded_len(&message), group)
            {
                tracing::warn!(error = %e, "cannot make room for a dead letter: stored past the limit");
            }
            self.plan_append(target, vec![message], group)?;
        }
        // A later state of the same subscription takes the earlier one's place in the frame;
        // the failure records of both are kept, the later last.
        let slot = group.acks_at.get(&subscription).copied();
        let mut failures = match slot.map(|at| &mut group.changes[at]) {
            Some(Change::SaveAcks { failures, .. }) => std::mem::take(failures),
            _ => Vec::new(),
        };
        failures.extend(update.failures);
        let change = Change::SaveAcks {
            id: subscription,
            acks: update.state,
            failures,
        };
        let at = self.change(change, group, slot)?;
        group.acks_at.insert(subscription, at);
        group.ack_states += 1;
        Ok(())
    }

    /// Where a dead letter meant for `channel` goes: there, or, if that channel was deleted
    /// since (the subscription was given another), to the subscription's dead-letter channel.
    fn dead_letter_target(
        &self,
        subscription: SubscriptionId,
        channel: ChannelId,
    ) -> Result<ChannelId> {
        if self.state.channels.contains_key(&channel) {
            return Ok(channel);
        }
        self.state
            .subscriptions
            .get(&subscription)
            .and_then(|s| s.settings.dead_letter)
            .filter(|c| self.state.channels.contains_key(c))
            .ok_or(StoreError::ChannelNotFound)
    }

    /// Moves dead letters back to their origin channel: each message is appended to `to` and
    /// its sequence withdrawn from `from` in the same commit. A sequence already withdrawn,
    /// or no longer stored, is left out (so two redrives never move one message twice);
    /// returns each moved (`from` sequence, `to` sequence).
    fn plan_redrive(
        &mut self,
        from: ChannelId,
        to: ChannelId,
        moves: Vec<(u64, NewMessage)>,
        group: &mut Group,
    ) -> Result<Vec<(u64, u64)>> {
        let source = self
            .state
            .channels
            .get(&from)
            .ok_or(StoreError::ChannelNotFound)?;
        let stored = source.first_seq..source.next_seq;
        self.space.check()?;
        let mut seen = std::collections::HashSet::new();
        let (seqs, messages): (Vec<u64>, Vec<NewMessage>) = moves
            .into_iter()
            .filter(|(seq, _)| {
                stored.contains(seq) && !self.state.is_withdrawn(from, *seq) && seen.insert(*seq)
            })
            .unzip();
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let range = self.plan_append(to, messages, group)?;
        // Broker-made publishes bypass de-duplication.
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        let ranges = state::ranges_of(&sorted);
        self.change(
            Change::Withdraw {
                channel: from,
                ranges,
            },
            group,
            None,
        )?;
        group.withdrawals.insert(from);
        Ok(seqs.into_iter().zip(range).collect())
    }

    fn plan_create_channel(
        &mut self,
        name: String,
        settings: ChannelSettings,
        group: &mut Group,
    ) -> Result<ChannelId> {
        if self.state.names.contains_key(&name) {
            return Err(StoreError::ChannelExists(name));
        }
        let id = ChannelId(self.state.next_id);
        self.change(Change::CreateChannel { id, name }, group, None)?;
        if settings != ChannelSettings::default() {
            self.change(Change::UpdateChannel { id, settings }, group, None)?;
        }
        let log = Arc::new(ChannelLog::new(
            id,
            self.index.sled().clone(),
            self.segments.clone(),
            stats_of(&self.state.channels[&id]),
            self.cache.clone(),
        ));
        group.new_logs.push(log.clone());
        self.logs.insert(id, WriterLog::new(log));
        Ok(id)
    }

    fn plan_delete_channel(&mut self, channel: ChannelId, group: &mut Group) -> Result<()> {
        if !self.state.channels.contains_key(&channel) {
            return Err(StoreError::ChannelNotFound);
        }
        if let Some(user) = self.state.dead_letter_user(channel)
            && user.channel != channel
        {
            return Err(StoreError::ChannelInUse(user.name.clone()));
        }
        self.change(Change::DeleteChannel { id: channel }, group, None)?;
        group.appends.remove(&channel);
        self.logs.remove(&channel);
        group.dropped_logs.push(channel);
        Ok(())
    }

    fn plan_create_subscription(
        &mut self,
        record: SubscriptionRecord,
        start: Position,
        group: &mut Group,
    ) -> Result<(SubscriptionId, AckState)> {
        let (channel, name, settings) = (record.channel, &record.name, record.settings);
        if !self.state.channels.contains_key(&channel) {
            return Err(StoreError::ChannelNotFound);
        }
        if self
            .state
            .subscriptions
            .values()
            .any(|s| s.channel == channel && s.name == *name)
        {
            return Err(StoreError::SubscriptionExists(name.clone()));
        }
        // A dead-letter channel keeps what it received while nobody subscribed: a new
        // subscription starts at the first message it still holds unless told otherwise.
        let start = match start {
            Position::Latest if self.state.dead_letter_user(channel).is_some() => {
                Position::Earliest
            }
            start => start,
        };
        let acks = AckState {
            acked_total: 0,
            ..self.starting_state(channel, start)?
        };
        self.check_dead_letter(&settings)?;
        let id = SubscriptionId(self.state.next_id);
        let change = Change::CreateSubscription {
            id,
            record,
            acks: acks.clone(),
        };
        self.change(change, group, None)?;
        Ok((id, acks))
    }

    /// Updates or deletes an existing subscription.
    fn plan_subscription_change(
        &mut self,
        subscription: SubscriptionId,
        change: Change,
        group: &mut Group,
    ) -> Result<()> {
        self.subscription_exists(subscription)?;
        self.change(change, group, None).map(drop)
    }

    /// Moves a subscription: its new ack state, and the end of its failure records, in one
    /// commit. Messages acked since its creation still count as acked in its figures.
    fn plan_seek(
        &mut self,
        subscription: SubscriptionId,
        position: Position,
        group: &mut Group,
    ) -> Result<AckState> {
        let record = self
            .state
            .subscriptions
            .get(&subscription)
            .ok_or(StoreError::SubscriptionNotFound)?;
        let acks = AckState {
            acked_total: self
                .state
                .acks
                .get(&subscription)
                .map_or(0, |a| a.acked_total),
            ..self.starting_state(record.channel, position)?
        };
        // Failure records an earlier save of this group wrote are in its batch, where
        // ClearFailures (which reads sled) cannot see them: they are dropped here.
        let slot = group.acks_at.get(&subscription).copied();
        let failures = match slot.map(|at| &group.changes[at]) {
            Some(Change::SaveAcks { failures, .. }) => {
                failures.iter().map(|(seq, _)| (*seq, None)).collect()
            }
            _ => Vec::new(),
        };
        let change = Change::SaveAcks {
            id: subscription,
            acks: acks.clone(),
            failures,
        };
        let at = self.change(change, group, slot)?;
        group.acks_at.insert(subscription, at);
        let clear = Change::ClearFailures { id: subscription };
        self.change(clear, group, None)?;
        Ok(acks)
    }

    /// The ack state a subscription of `channel` starting at (or seeking to) `position` has:
    /// everything before it acked; or a copy of another subscription's.
    fn starting_state(&self, channel: ChannelId, position: Position) -> Result<AckState> {
        if let Position::AckStateOf(source) = position {
            let same_channel = self.state.subscriptions.get(&source).map(|s| s.channel);
            if same_channel != Some(channel) {
                return Err(StoreError::SubscriptionNotFound);
            }
            return Ok(self.state.acks.get(&source).cloned().unwrap_or_default());
        }
        Ok(AckState {
            floor: self.resolve(channel, position)?,
            ..AckState::default()
        })
    }

    /// The sequence a position names in `channel`: where a subscription starting (or
    /// seeking) there has its ack floor. Before the first message still stored is out of
    /// range, and so is after the end.
    pub(super) fn resolve(&self, channel: ChannelId, position: Position) -> Result<u64> {
        let record = self
            .state
            .channels
            .get(&channel)
            .ok_or(StoreError::ChannelNotFound)?;
        let first = self.state.skip_withdrawn(channel, record.first_seq);
        let out_of_range = |wanted: String| -> Result<u64> {
            Err(StoreError::OutOfRange {
                wanted,
                first_seq: first,
                first_time_ms: self.first_time(channel).ok().flatten(),
                next_seq: record.next_seq,
            })
        };
        match position {
            Position::Latest | Position::AckStateOf(_) => Ok(record.next_seq),
            Position::Earliest => Ok(first.min(record.next_seq)),
            Position::Sequence(seq) if seq < record.first_seq => {
                out_of_range(format!("sequence {seq}"))
            }
            Position::Sequence(seq) if seq > record.next_seq => {
                out_of_range(format!("sequence {seq}"))
            }
            Position::Sequence(seq) => Ok(seq),
            Position::Time(ms) => {
                // The records' publish times grow with their sequences: bisect the sequences
                // for the first record published at or after `ms` (a few index lookups, however
                // long the channel).
                let record_from = |seq: u64| -> Result<Option<(u64, u64)>> {
                    match (self.index)
                        .range(&record_key(channel, seq), &record_key(channel, u64::MAX))
                        .next()
                    {
                        Some(entry) => {
                            let (key, value) = entry?;
                            let at = RecordLocation::decode(&value)?;
                            Ok(Some((codec::parse_record_key(&key)?, at.publish_ms)))
                        }
                        None => Ok(None),
                    }
                };
                let (mut lo, mut hi) = (0, record.next_seq);
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    match record_from(mid)? {
                        Some((_, published)) if published < ms => lo = mid + 1,
                        _ => hi = mid,
                    }
                }
                match record_from(lo)? {
                    // Older messages were collected: they may have been after `ms`.
                    Some((first_seq, published))
                        if first_seq == record.first_seq
                            && record.first_seq > 1
                            && published > ms =>
                    {
                        out_of_range(format!("time {ms} ms since the Unix epoch"))
                    }
                    Some((first_seq, _)) => Ok(first_seq.max(first)),
                    None => Ok(record.next_seq),
                }
            }
        }
    }

    /// The publish time of the first record still stored in `channel`.
    pub(super) fn first_time(&self, channel: ChannelId) -> Result<Option<u64>> {
        match self
            .index
            .range(&record_key(channel, 0), &record_key(channel, u64::MAX))
            .next()
        {
            Some(entry) => Ok(Some(RecordLocation::decode(&entry?.1)?.publish_ms)),
            None => Ok(None),
        }
    }

    /// A subscription's dead-letter channel must exist.
    fn check_dead_letter(&self, settings: &SubscriptionSettings) -> Result<()> {
        match settings.dead_letter {
            Some(id) if !self.state.channels.contains_key(&id) => Err(StoreError::ChannelNotFound),
            _ => Ok(()),
        }
    }

    fn subscription_exists(&self, subscription: SubscriptionId) -> Result<()> {
        match self.state.subscriptions.contains_key(&subscription) {
            true => Ok(()),
            false => Err(StoreError::SubscriptionNotFound),
        }
    }

    /// Applies a change to the state and the group's batch, and keeps it for the commit frame
    /// (in place of the change at `slot`, if given); returns where it is in the frame.
    pub(super) fn change(
        &mut self,
        change: Change,
        group: &mut Group,
        slot: Option<usize>,
    ) -> Result<usize> {
        self.state
            .apply(&self.index, &change, &mut group.batch, &mut group.touched)?;
        match slot {
            Some(at) => {
                group.changes[at] = change;
                Ok(at)
            }
            None => {
                group.changes.push(change);
                Ok(group.changes.len() - 1)
            }
        }
    }

    /// Deletes the records wholly below the lowest ack floor of each channel whose floors may
    /// have moved (all of them once no subscription is left); returns the channels changed. As
    /// this happens in the same batch as the ack state that allows it, a crash never leaves
    /// collection half done. Collection is not written to the log: replay leaves it to the
    /// group the writer runs first after a restart.
    ///
    /// A record's last sequence is one before the next record's first, or the channel's last
    /// committed sequence when it is the newest record, so no record needs to be read.
    pub(super) fn plan_collects(&mut self, group: &mut Group) -> Result<Vec<ChannelId>> {
        let mut changed = Vec::new();
        let mut releases = Vec::new();
        let mut trims = Vec::new();
        for &id in &group.touched.collects {
            // Until every subscription's own floor has passed them, its dispatcher may still
            // need to learn of withdrawn sequences.
            let own_floors = (self.state.subscriptions.iter())
                .filter(|(_, s)| s.channel == id)
                .filter_map(|(sub, _)| self.state.floors.get(sub).copied())
                .min();
            trims.push((id, own_floors));
            let Some(record) = self.state.channels.get(&id) else {
                continue;
            };
            let retention = record.settings.retention;
            // Retained records a full channel gives up (see `plan_limits`).
            let forced_below = group.collect_below.get(&id).copied().unwrap_or(0);
            let wanted = self.state.collect_floor(id);
            let (Some(record), Some(log)) =
                (self.state.channels.get_mut(&id), self.logs.get_mut(&id))
            else {
                continue;
            };
            let committed_end = log.log.stats().next_seq;
            if wanted > committed_end {
                self.pending_collects.insert(id);
            }
            let below = wanted.min(committed_end);
            if below <= record.first_seq || below <= log.collected_below {
                continue;
            }
            log.collected_below = below;
            let retained = Retained {
                retention,
                bytes: record.bytes,
                forced_below,
            };
            let (mut doomed, kept_from) = doomed_below(&self.index, id, below, retained)?;
            let new_first = match kept_from {
                Some(kept) => {
                    // Not collected as far as the floors allow: look again next time.
                    log.collected_below = 0;
                    kept
                }
                None => first_after(&self.index, id, below, committed_end, &mut doomed)?,
            };
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
        // Withdrawn sequences below what is stored and below every floor matter to no one.
        for (id, lowest_floor) in trims {
            if let Some(record) = self.state.channels.get(&id) {
                let below = lowest_floor.map_or(record.first_seq, |f| f.min(record.first_seq));
                self.state.trim_withdrawn(id, below, &mut group.batch);
            }
        }
        Ok(changed)
    }

    /// Writes the ids the group's publishes are to be de-duplicated against, with the
    /// group's publish time, into its commit.
    pub(super) fn plan_ids(&mut self, group: &mut Group, publish_ms: u64) -> Result<()> {
        for (channel, entries) in std::mem::take(&mut group.remember) {
            if entries.is_empty() || !self.state.channels.contains_key(&channel) {
                continue;
            }
            let change = Change::Ids {
                channel,
                publish_ms,
                entries,
            };
            self.change(change, group, None)?;
        }
        Ok(())
    }

    /// Frames each channel's new messages into records and indexes them; returns the messages
    /// as stored.
    pub(super) fn encode_appends(
        &mut self,
        group: &mut Group,
    ) -> Result<Vec<(ChannelId, Vec<Message>)>> {
        let now = now_ms();
        self.plan_ids(group, now)?;
        let mut stored = Vec::with_capacity(group.appends.len());
        for (id, (first, messages)) in std::mem::take(&mut group.appends) {
            let subscribed = self.state.subscribed(id) || self.state.keeps(id);
            // What it keeps by size may now be over its bound.
            if self.state.channels[&id].settings.retention.max_bytes > 0 {
                self.pending_collects.insert(id);
            }
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
                    self.change(change, group, None)?;
                    stored.push((id, Vec::new()));
                    continue;
                }
                // Older records are still being collected: store these too, collect all later.
                self.pending_collects.insert(id);
            }
            // Records of about RECORD_TARGET_BYTES, encoded straight into the log's buffer.
            let mut start = 0;
            while start < messages.len() {
                let record_first = first + start as u64;
                let mut count = 0;
                let mut at = self.appender.append(|out| {
                    codec::write_record(id, record_first, out, |body| {
                        let from = body.len();
                        for message in &messages[start..] {
                            codec::encode_body(std::slice::from_ref(message), now, body);
                            count += 1;
                            if body.len() - from >= codec::RECORD_TARGET_BYTES {
                                break;
                            }
                        }
                        count
                    })
                })?;
                at.publish_ms = now;
                self.state.index_record(
                    id,
                    record_first,
                    count,
                    at,
                    &mut group.batch,
                    &mut group.touched,
                );
                group.records += 1;
                start += count as usize;
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

/// Takes a refused batch's ids out of the group again.
fn forget_ids(group: &mut Group, channel: ChannelId, remembered: &[(u64, String)]) {
    if let Some(ids) = group.ids.get_mut(&channel) {
        for (_, id) in remembered {
            ids.remove(id);
        }
    }
}

/// At most this many delayed messages, or bytes of them, enter their channels in one group.
const MAX_DUE_MESSAGES: usize = 4096;
const MAX_DUE_BYTES: usize = 16 << 20;

/// When a message is due, if that is still ahead (a time in the past, or one that does not
/// parse, delays nothing).
fn due_of(message: &NewMessage, now: u64) -> Option<u64> {
    if message.attributes.is_empty() {
        return None;
    }
    let due: u64 = message.attributes.get(crate::DELIVER_AT)?.parse().ok()?;
    (due > now).then_some(due)
}

/// Milliseconds since the Unix epoch now.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Answers a request once its group is committed, or at once if it was refused.
fn answer<T: Send + 'static>(group: &mut Group, reply: Reply<T>, planned: Result<T>) {
    match planned {
        Ok(value) => group.replies.push(pending(reply, value)),
        Err(e) => {
            let _ = reply.send(Err(e));
        }
    }
}

/// A record to collect: its first sequence, its index key and where it is.
type Doomed = (u64, sled::IVec, RecordLocation);

/// What decides which of a channel's records its retention keeps.
#[derive(Clone, Copy)]
struct Retained {
    retention: crate::Retention,
    /// The channel's stored bytes.
    bytes: u64,
    /// Retained records below this sequence go anyway (a full channel gives them up).
    forced_below: u64,
}

/// The records of channel `id` wholly below `below` that go, oldest first, and the first
/// sequence retention keeps, if it keeps any. With retention, only what has aged out, or what
/// takes the channel past its size, goes: the scan stops at the first record kept (ages and
/// sizes only grow from the oldest), so it costs what it collects, not what is retained.
fn doomed_below(
    index: &impl Read,
    id: ChannelId,
    below: u64,
    retained: Retained,
) -> Result<(Vec<Doomed>, Option<u64>)> {
    let Retained {
        retention,
        mut bytes,
        forced_below,
    } = retained;
    let now = now_ms();
    let mut doomed = Vec::new();
    for entry in index.range(&record_key(id, 0), &record_key(id, below)) {
        let (key, value) = entry?;
        let first = codec::parse_record_key(&key)?;
        let at = RecordLocation::decode(&value)?;
        if retention.keeps() {
            let aged = retention.max_age_ms > 0
                && at.publish_ms.saturating_add(retention.max_age_ms) <= now;
            let over = retention.max_bytes > 0 && bytes > retention.max_bytes;
            if !(aged || over || first < forced_below) {
                return Ok((doomed, Some(first)));
            }
            bytes = bytes.saturating_sub(u64::from(at.len));
        }
        doomed.push((first, key, at));
    }
    Ok((doomed, None))
}

/// The channel's first sequence once all of `doomed` goes, where no record below `below` is
/// kept; the newest of `doomed` stays (and leaves the list) when it reaches past `below`.
fn first_after(
    index: &impl Read,
    id: ChannelId,
    below: u64,
    committed_end: u64,
    doomed: &mut Vec<Doomed>,
) -> Result<u64> {
    let next_record = match index
        .range(&record_key(id, below), &record_key(id, u64::MAX))
        .next()
    {
        Some(entry) => Some(codec::parse_record_key(&entry?.0)?),
        None => None,
    };
    let last_ends_below = match next_record {
        Some(next) => next <= below,
        None => committed_end <= below,
    };
    if !last_ends_below && let Some(&(last_first, _, _)) = doomed.last() {
        doomed.retain(|(first, _, _)| *first != last_first);
        return Ok(last_first);
    }
    Ok(next_record.unwrap_or(committed_end))
}
