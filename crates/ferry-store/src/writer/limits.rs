//! Channel limits: whether a publish fits its channel, and what makes room when it does not.
//!
//! A channel's messages are those some subscription has not acked, its delayed ones, and
//! those it keeps only for retention (acked by every subscription); its bytes are what its
//! records and delayed messages take. When a publish would take it past a limit,
//! the retained records (acked by every subscription, kept only by retention) go first,
//! oldest first, in the publish's own commit. If the unacked messages alone still reach the
//! limit, the channel's policy decides: `Reject` refuses the publish; `DropOldest` drops the
//! oldest unacked messages in the publish's commit: withdrawn from every subscription (as a
//! redrive withdraws), dead-lettered with reason `dropped` for each subscription with a
//! dead-letter channel that had not acked them, counted and logged. A byte limit frees whole
//! records (one group commit's messages of the channel, at most 256 KiB), so drop-oldest may
//! drop up to a record's worth more than the publish needed. Delayed messages are never
//! dropped.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::plan::now_ms;
use super::{Group, Writer};
use crate::batch::Read;
use crate::change::Change;
use crate::codec::{self, RecordLocation, record_key};
use crate::{
    ChannelId, ChannelLimits, Dropped, LimitPolicy, NewMessage, Result, StoreError, SubscriptionId,
};

/// At most this many messages, or bytes of records, are dropped for one publish: after a
/// limit is lowered, a drop-oldest channel comes down to it over the following publishes.
const MAX_DROPPED: u64 = 10_000;
const MAX_DROPPED_BYTES: u64 = 32 << 20;
/// A channel's drops are logged at most this often (with how many there were since).
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// What a channel holds, and what a publish would add, against its limits.
#[derive(Clone, Copy)]
struct Fill {
    limits: ChannelLimits,
    messages: u64,
    bytes: u64,
}

impl Fill {
    fn over_messages(&self) -> u64 {
        match self.limits.max_messages {
            0 => 0,
            max => self.messages.saturating_sub(max),
        }
    }

    fn over_bytes(&self) -> bool {
        self.limits.max_bytes > 0 && self.bytes > self.limits.max_bytes
    }

    fn full(&self) -> bool {
        self.over_messages() > 0 || self.over_bytes()
    }

    /// The limit passed, in words, for the error.
    fn describe(&self, adding: u64) -> String {
        match self.over_messages() > 0 {
            true => format!(
                "{} messages would be stored with the {adding} published, and max_messages is {}",
                self.messages, self.limits.max_messages
            ),
            false => format!(
                "{} bytes would be stored with the {adding} messages published, and max_bytes is {}",
                self.bytes, self.limits.max_bytes
            ),
        }
    }
}

/// What making room in a channel decided.
struct Room {
    /// The channel's fill once it is made.
    fill: Fill,
    /// Unacked messages from the floor up to this sequence are dropped.
    dropped_to: u64,
    /// Records only retention keeps, below this sequence, go (0: none).
    retained_to: u64,
}

impl Writer {
    /// Makes room in `channel` for `incoming` messages of `incoming_bytes` (encoded), or
    /// refuses them, as its limits and policy say.
    pub(super) fn plan_limits(
        &mut self,
        channel: ChannelId,
        incoming: u64,
        incoming_bytes: u64,
        group: &mut Group,
    ) -> Result<()> {
        let record = (self.state.channels.get(&channel)).ok_or(StoreError::ChannelNotFound)?;
        let limits = record.settings.limits;
        let alone = Fill {
            limits,
            messages: incoming,
            bytes: incoming_bytes,
        };
        if alone.full() {
            return Err(StoreError::ChannelFull {
                channel: record.name.clone(),
                limit: format!(
                    "the batch alone is {incoming} messages of {incoming_bytes} bytes, more than \
                     max_messages {} or max_bytes {} allow",
                    limits.max_messages, limits.max_bytes
                ),
            });
        }
        let floor = self.state.collect_floor(channel);
        let fill = self.fill_with(channel, record, floor, alone, group)?;
        if !fill.full() {
            return Ok(());
        }
        let room = self.room_for(channel, floor, fill, incoming)?;
        // What is left is planned in this group, or delayed: neither can make room.
        if room.fill.full() && limits.policy == LimitPolicy::Reject {
            return Err(self.full(channel, room.fill, incoming));
        }
        if room.retained_to > 0 {
            group.collect_below.insert(channel, room.retained_to);
            group.touched.collects.insert(channel);
        }
        if room.dropped_to > floor {
            self.plan_drop(channel, floor..room.dropped_to, group)?;
        }
        Ok(())
    }

    /// What `channel` (whose figures `record` holds) would hold with `incoming` added: its
    /// retained and unacked messages, delayed ones, and what the group planned already. Acked
    /// messages that share a record with unacked ones go with it: they do not count.
    fn fill_with(
        &self,
        channel: ChannelId,
        record: &codec::ChannelRecord,
        floor: u64,
        incoming: Fill,
        group: &Group,
    ) -> Result<Fill> {
        let planned = group.planned_bytes.get(&channel).copied().unwrap_or(0);
        let retained = match floor > record.first_seq {
            true => self
                .state
                .live(channel, record.first_seq, self.record_at(channel, floor)?),
            false => 0,
        };
        let unacked = self
            .state
            .live(channel, floor.max(record.first_seq), record.next_seq);
        Ok(Fill {
            limits: incoming.limits,
            messages: retained + unacked + record.delayed + incoming.messages,
            bytes: record.bytes + record.delayed_bytes + planned + incoming.bytes,
        })
    }

    /// Walks `channel`'s records from the oldest until `fill` is within its limits: records
    /// only retention keeps go first, then (policy `drop_oldest`) unacked messages, up to the
    /// bounds of one group; policy `reject` refuses instead.
    fn room_for(
        &self,
        channel: ChannelId,
        floor: u64,
        mut fill: Fill,
        incoming: u64,
    ) -> Result<Room> {
        let end = (self.logs.get(&channel)).map_or(floor, |l| l.log.stats().next_seq);
        // Messages in [floor, dropped_to) are dropped; retained records below `retained_to` go.
        let mut dropped_to = floor;
        let mut retained_to = 0;
        let mut dropped_bytes = 0;
        let mut records = (self.index)
            .range(&record_key(channel, 0), &record_key(channel, end))
            .peekable();
        while fill.full() {
            let Some(entry) = records.next() else { break };
            let (key, value) = entry?;
            let first = codec::parse_record_key(&key)?;
            let len = u64::from(RecordLocation::decode(&value)?.len);
            let record_end = match records.peek() {
                Some(Ok((next, _))) => codec::parse_record_key(next)?,
                Some(Err(e)) => return Err(e.clone().into()),
                None => end,
            };
            if record_end <= floor {
                // Acked by every subscription, kept only by retention: it goes first.
                retained_to = record_end;
                fill.messages -= self
                    .state
                    .live(channel, first, record_end)
                    .min(fill.messages);
                fill.bytes -= len.min(fill.bytes);
                continue;
            }
            if fill.limits.policy == LimitPolicy::Reject {
                return Err(self.full(channel, fill, incoming));
            }
            if dropped_to - floor >= MAX_DROPPED || dropped_bytes >= MAX_DROPPED_BYTES {
                break;
            }
            let from = dropped_to.max(first);
            let need = fill.over_messages();
            let left = self.state.live(channel, from, record_end);
            if fill.over_bytes() || need >= left {
                dropped_to = record_end;
                fill.messages -= left.min(fill.messages);
                fill.bytes -= len.min(fill.bytes);
                dropped_bytes += len;
            } else {
                dropped_to = self.state.advance_live(channel, from, need);
                fill.messages -= need;
            }
        }
        Ok(Room {
            fill,
            dropped_to,
            retained_to,
        })
    }

    /// The refusal of `incoming` messages to `channel`, as full as `fill` says.
    fn full(&self, channel: ChannelId, fill: Fill, incoming: u64) -> StoreError {
        let name = (self.state.channels.get(&channel)).map_or_else(String::new, |r| r.name.clone());
        StoreError::ChannelFull {
            channel: name,
            limit: fill.describe(incoming),
        }
    }

    /// The first sequence of the record of `channel` that holds `seq` (or `seq` if none does:
    /// every record before it ends at or before it).
    fn record_at(&self, channel: ChannelId, seq: u64) -> Result<u64> {
        let last = (self.index).last_below(
            &record_key(channel, 0),
            &record_key(channel, seq.saturating_add(1)),
        )?;
        let Some(entry) = last else {
            return Ok(seq);
        };
        let first = codec::parse_record_key(&entry.0)?;
        let next = (self.index)
            .range(
                &record_key(channel, first + 1),
                &record_key(channel, u64::MAX),
            )
            .next();
        let end = match next {
            Some(entry) => codec::parse_record_key(&entry?.0)?,
            None => (self.logs.get(&channel)).map_or(seq, |l| l.log.stats().next_seq),
        };
        Ok(if seq < end { first } else { seq })
    }

    /// Drops `channel`'s messages in `range` (its oldest unacked ones), dead-lettering them for
    /// each subscription with a dead-letter channel that had not acked them.
    fn plan_drop(
        &mut self,
        channel: ChannelId,
        range: std::ops::Range<u64>,
        group: &mut Group,
    ) -> Result<()> {
        let count = self.state.live(channel, range.start, range.end);
        let letters = self.dropped_letters(channel, range.clone());
        for (target, copies) in letters {
            self.plan_append(target, copies, group)?;
        }
        let change = Change::Drop {
            channel,
            range: (range.start, range.end),
            count,
        };
        self.change(change, group, None)?;
        group.withdrawals.insert(channel);
        self.log_drops(channel, count);
        Ok(())
    }

    /// The dead letters of the messages dropped from `channel`, per dead-letter channel.
    fn dropped_letters(
        &self,
        channel: ChannelId,
        range: std::ops::Range<u64>,
    ) -> HashMap<ChannelId, Vec<NewMessage>> {
        let mut letters: HashMap<ChannelId, Vec<NewMessage>> = HashMap::new();
        let (Some(make), Some(log), Some(record)) = (
            self.dead_letter,
            self.logs.get(&channel),
            self.state.channels.get(&channel),
        ) else {
            return letters;
        };
        // A subscription with a transform is a derived channel's progress: its "dead-letter
        // channel" is where it derives to, not where drops go.
        let readers: Vec<(SubscriptionId, &str, ChannelId)> = (self.state.subscriptions.iter())
            .filter(|(_, s)| s.channel == channel && s.transform.is_empty())
            .filter_map(|(id, s)| Some((*id, s.name.as_str(), s.settings.dead_letter?)))
            .filter(|(_, _, target)| self.state.channels.contains_key(target))
            .collect();
        if readers.is_empty() {
            return letters;
        }
        let now = now_ms();
        let mut next = range.start;
        while next < range.end {
            let messages = match log.log.read(next, 1024, 8 << 20) {
                Ok(messages) if !messages.is_empty() => messages,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(channel = %record.name, error = %e, "cannot read messages dropped from a full channel: not dead-lettered");
                    break;
                }
            };
            next = messages.last().map_or(range.end, |m| m.sequence + 1);
            for message in messages.iter().filter(|m| range.contains(&m.sequence)) {
                if self.state.is_withdrawn(channel, message.sequence) {
                    continue;
                }
                for &(subscription, name, target) in &readers {
                    if self.state.acked(subscription, message.sequence) {
                        continue;
                    }
                    let attempts = self.failed_attempts(subscription, message.sequence);
                    let why = Dropped {
                        channel: &record.name,
                        subscription: name,
                        attempts,
                        now_ms: now,
                    };
                    if let Some(letter) = make(message, &why) {
                        letters.entry(target).or_default().push(letter);
                    }
                }
            }
        }
        letters
    }

    /// How many deliveries of `seq` to `subscription` failed, as its failure record says.
    fn failed_attempts(&self, subscription: SubscriptionId, seq: u64) -> u32 {
        let raw = self.index.get(&codec::failure_key(subscription, seq));
        raw.ok()
            .flatten()
            .and_then(|raw| codec::decode_failure(&mut raw.as_ref()).ok())
            .map_or(0, |f| f.count)
    }

    /// Logs a channel's drops, at most once every `DROP_LOG_EVERY`.
    fn log_drops(&mut self, channel: ChannelId, count: u64) {
        let now = Instant::now();
        let (logged, since) = self.drops_logged.entry(channel).or_insert((None, 0));
        *since += count;
        if logged.is_none_or(|at| now.duration_since(at) >= DROP_LOG_EVERY) {
            let name = self.state.channels.get(&channel).map(|c| c.name.as_str());
            tracing::warn!(
                channel = name.unwrap_or_default(),
                dropped = *since,
                "channel full: dropped its oldest unacked messages (policy drop_oldest)"
            );
            *logged = Some(now);
            *since = 0;
        }
    }
}
