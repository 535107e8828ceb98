//! What consumers say of their deliveries, and what becomes of a message that fails.
//!
//! Every failure (a nack, a deadline that passed, a delivery released by a consumer that left)
//! goes through [`Dispatcher::fail`]: the failure is counted in the message's durable failure
//! record, and the message comes back after the retry policy's wait (or a nack's own delay)
//! once that record is durable; after its last allowed attempt, or on a terminal nack, it is
//! dead-lettered instead: its copy is appended to the dead-letter channel in the same commit
//! as the ack state that takes it off this subscription.
//!
//! Each round's acks, failure records and dead letters go to the store as one save, whose
//! answers wait for it. A save carries the whole ack state, so a dead letter must reach the
//! store no later than the first state that acks its message: every save carries every dead
//! letter not yet confirmed, and the store appends one only with the first state that acks
//! its message. So a failed save (a full disk) loses no dead letter, and a save whose outcome
//! is still unknown duplicates none.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use ferry_store::{AckUpdate, ChannelId, Failure, NewMessage, Position, StoreError};
use tokio::time::Instant;

use super::ack_id::parse_ack_id;
use super::{Command, Dispatcher, now_ms};
use crate::dead_letter::{self, Addressee, Provenance};
use crate::outbox::Outbox;
use crate::{AckOutcome, AckResult, ConsumerEvent, Nack, Settlement, retry};

/// The longest reason text a nack's failure record and dead letter keep (longer text is cut).
pub(crate) const MAX_REASON_BYTES: usize = 1024;
/// The most failure records one save carries (the rest go with the next ones), so that a
/// commit frame stays small however many deliveries fail at once.
const RECORDS_PER_SAVE: usize = 10_000;
/// The most dead letters, and their bytes, waiting to be confirmed: more messages to give up
/// wait until these are.
const DEAD_LETTERS_UNCONFIRMED: usize = 1_000;
const DEAD_LETTER_BYTES_UNCONFIRMED: usize = 16 << 20;
/// How long after a failed save the dispatcher tries again.
const SAVE_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// The answer to a request whose deliveries are gone: every id `STALE`.
pub(super) fn all_stale(operation: crate::AckOperation, ack_ids: Vec<String>) -> ConsumerEvent {
    let results = (ack_ids.into_iter())
        .map(|ack_id| AckOutcome {
            ack_id,
            result: AckResult::Stale,
        })
        .collect();
    ConsumerEvent::Results { operation, results }
}

/// An answer made `STALE` throughout: what it said was never made durable.
pub(super) fn stale(event: ConsumerEvent) -> ConsumerEvent {
    match event {
        ConsumerEvent::Results { operation, results } => {
            all_stale(operation, results.into_iter().map(|r| r.ack_id).collect())
        }
        other => other,
    }
}

/// Why a delivery failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    Deadline,
    Nack,
    Released,
}

impl Cause {
    fn name(self) -> &'static str {
        match self {
            Cause::Deadline => "deadline",
            Cause::Nack => "nack",
            Cause::Released => "released",
        }
    }
}

/// A failure record to write (`Some`) or drop (`None`), and the retry that waits for it.
struct Record {
    failure: Option<Failure>,
    retry: Option<Instant>,
    /// The save that carries it, once sent.
    sent_in: Option<u64>,
}

/// A message to take off the subscription for good, waiting for room in a save.
pub(super) struct GiveUp {
    seq: u64,
    why: &'static str,
    attempts: u32,
    reason: String,
}

/// What is not known to be durable yet.
#[derive(Default)]
pub(super) struct Unsaved {
    /// The ack state changed since the last save.
    pub dirty: bool,
    records: BTreeMap<u64, Record>,
    /// Dead letters not yet confirmed, by their message's sequence, with their channel and
    /// the first save that carried them.
    dead_letters: BTreeMap<u64, (ChannelId, NewMessage, Option<u64>)>,
    /// Bytes of those dead letters.
    dead_letter_bytes: usize,
    /// Messages to dead-letter once fewer dead letters wait to be confirmed.
    deferred: VecDeque<GiveUp>,
    /// Results to send once the next save is durable, with their reserved bytes.
    answers: Vec<(Outbox, usize, ConsumerEvent)>,
    /// Saves submitted so far.
    saves: u64,
    /// A save failed: the next waits until then.
    hold_until: Option<Instant>,
    /// The saves made before the last seek: their floors no longer count.
    moved_after: u64,
}

impl Unsaved {
    /// The answers waiting for a save that will not come.
    pub(super) fn take_answers(&mut self) -> Vec<(Outbox, usize, ConsumerEvent)> {
        std::mem::take(&mut self.answers)
    }

    /// Drops a failure record.
    pub(super) fn drop_record(&mut self, seq: u64) {
        let record = Record {
            failure: None,
            retry: None,
            sent_in: None,
        };
        self.records.insert(seq, record);
        self.dirty = true;
    }

    /// When the dispatcher must wake for a save, if something waits for one.
    pub(super) fn wake_at(&self) -> Option<Instant> {
        let waiting = self.dirty
            || !self.deferred.is_empty()
            || self.records.values().any(|r| r.sent_in.is_none());
        match self.hold_until {
            Some(at) if waiting => Some(at),
            None if waiting => Some(Instant::now()),
            _ => None,
        }
    }

    /// Failed messages whose retry waits for their failure record to be durable.
    pub(super) fn retries_waiting(&self) -> usize {
        self.records.values().filter(|r| r.retry.is_some()).count()
    }

    /// Whether another dead letter may wait to be confirmed.
    fn room_for_dead_letters(&self) -> bool {
        self.dead_letters.len() < DEAD_LETTERS_UNCONFIRMED
            && self.dead_letter_bytes < DEAD_LETTER_BYTES_UNCONFIRMED
    }
}

impl Dispatcher {
    pub(super) fn settle(
        &mut self,
        consumer: u64,
        ack_ids: Vec<String>,
        settlement: Settlement,
        reserved: usize,
    ) {
        let mut outcomes = Vec::with_capacity(ack_ids.len());
        let mut changed = false;
        for ack_id in ack_ids {
            let result = match self.lookup(consumer, &ack_id) {
                Err(result) => result,
                Ok(seq) => {
                    match &settlement {
                        Settlement::Ack => {
                            if let Some(flight) = self.take_back(seq) {
                                self.trace_settled(seq, &flight, "acked");
                            }
                            self.acked(seq);
                            changed = true;
                        }
                        Settlement::Nack(nack) => {
                            self.counts.nacked += 1;
                            self.fail(seq, Cause::Nack, Some(nack));
                            changed = true;
                        }
                        Settlement::Extend(extension) => {
                            let flight = self.in_flight.get_mut(&seq).expect("looked up");
                            self.deadlines.remove(&(flight.deadline, seq));
                            flight.deadline = Instant::now() + *extension;
                            self.deadlines.insert((flight.deadline, seq));
                        }
                    }
                    AckResult::Ok
                }
            };
            outcomes.push(AckOutcome { ack_id, result });
        }
        let Some(outbox) = self.consumers.get(&consumer).map(|c| c.outbox.clone()) else {
            return;
        };
        let event = ConsumerEvent::Results {
            operation: settlement.operation(),
            results: outcomes,
        };
        if changed {
            // The answer waits for the save; its bytes stay reserved meanwhile.
            self.unsaved.answers.push((outbox, reserved, event));
            self.unsaved.dirty = true;
        } else {
            outbox.push_reserved(reserved, event);
        }
    }

    /// Finds the in-flight delivery an ack id names, for `consumer`: `UNKNOWN` for an id this
    /// subscription never issued (malformed, another subscription's, a wrong check, or a
    /// delivery number not yet reached) or issued to another consumer's stream (an ack id is
    /// bound to the stream that received it), `STALE` for one no longer in flight.
    fn lookup(&self, consumer: u64, ack_id: &str) -> Result<u64, AckResult> {
        let (subscription, seq, delivery) = parse_ack_id(ack_id).ok_or(AckResult::Unknown)?;
        if subscription != self.id.0 || delivery >= self.next_delivery {
            return Err(AckResult::Unknown);
        }
        match self.in_flight.get(&seq) {
            Some(flight) if flight.delivery == delivery && flight.consumer == consumer => Ok(seq),
            Some(flight) if flight.delivery == delivery => Err(AckResult::Unknown),
            _ => Err(AckResult::Stale),
        }
    }

    /// Logs how the delivery of a traced message ended (`acked`, or the cause of a failure).
    fn trace_settled(&self, seq: u64, flight: &super::InFlight, outcome: &str) {
        if let Some(traceparent) = &flight.traceparent {
            tracing::debug!(
                target: crate::TRACE_TARGET,
                channel = %self.channel,
                subscription = %self.name,
                sequence = seq,
                attempt = flight.attempt,
                traceparent = &**traceparent,
                outcome,
                "settled"
            );
        }
    }

    /// A message is done for this subscription (acked, dead-lettered, discarded).
    fn acked(&mut self, seq: u64) {
        self.acks.insert(seq);
        self.queue.remove(seq);
        if self.failures.remove(&seq).is_some() {
            self.unsaved.drop_record(seq);
        }
        self.unsaved.dirty = true;
    }

    /// A delivery failed: the message is retried after its wait, or dead-lettered after its
    /// last attempt or a terminal nack.
    pub(super) fn fail(&mut self, seq: u64, cause: Cause, nack: Option<&Nack>) {
        let Some(flight) = self.take_back(seq) else {
            return;
        };
        self.trace_settled(seq, &flight, cause.name());
        let attempts = flight.attempt;
        let reason = match nack {
            Some(nack) if !nack.reason.is_empty() => cut(&nack.reason).to_owned(),
            // The last reason a consumer gave stays the last one.
            _ => self
                .failures
                .get(&seq)
                .map(|f| f.reason.clone())
                .unwrap_or_default(),
        };
        let limit = self.settings.max_delivery_attempts;
        let why = match nack {
            Some(nack) if nack.terminal => "terminal",
            _ if limit > 0 && attempts >= limit => cause.name(),
            _ => {
                let wait = match nack.and_then(|n| n.delay) {
                    Some(delay) => delay,
                    None => retry::backoff(&self.settings.retry, attempts, self.jitter.next()),
                };
                return self.retry_after(seq, attempts, wait, cause.name(), reason);
            }
        };
        self.unsaved.deferred.push_back(GiveUp {
            seq,
            why,
            attempts,
            reason,
        });
    }

    /// A message expired before it could be delivered: dead-lettered (reason `expired`) where
    /// the subscription has a dead-letter channel, otherwise counted and dropped.
    pub(super) fn expired(&mut self, seq: u64) {
        self.counts.expired += 1;
        if self.settings.dead_letter.is_none() {
            return self.acked(seq);
        }
        let failure = self.failures.get(&seq);
        let give_up = GiveUp {
            seq,
            why: "expired",
            attempts: failure.map_or(0, |f| f.count),
            reason: failure.map(|f| f.reason.clone()).unwrap_or_default(),
        };
        self.unsaved.deferred.push_back(give_up);
    }

    /// Records a failure and schedules the retry for when the record is durable.
    fn retry_after(&mut self, seq: u64, count: u32, wait: Duration, cause: &str, reason: String) {
        let failure = Failure {
            count,
            retry_at_ms: now_ms() + wait.as_millis() as u64,
            cause: cause.to_owned(),
            reason,
        };
        self.failures.insert(seq, failure.clone());
        let record = Record {
            failure: Some(failure),
            retry: Some(Instant::now() + wait),
            sent_in: None,
        };
        self.unsaved.records.insert(seq, record);
        self.unsaved.dirty = true;
    }

    /// Takes the messages waiting to be given up off the subscription, as far as there is
    /// room for their dead letters.
    pub(super) fn give_up_deferred(&mut self) {
        while self.unsaved.room_for_dead_letters() {
            let Some(give_up) = self.unsaved.deferred.pop_front() else {
                return;
            };
            self.give_up(give_up);
        }
    }

    /// Takes a message off the subscription for good: into the dead-letter channel, or, for a
    /// terminal nack without one, discarded (the consumer said never to retry it).
    fn give_up(&mut self, give_up: GiveUp) {
        let GiveUp {
            seq,
            why,
            attempts,
            reason,
        } = give_up;
        let Some(channel) = self.settings.dead_letter else {
            tracing::warn!(
                subscription = %self.name,
                seq,
                reason,
                "terminal nack and no dead-letter channel: message discarded"
            );
            self.counts.discarded += 1;
            return self.acked(seq);
        };
        let stored = match self.log.get(seq) {
            Ok(Some(stored)) => stored,
            Ok(None) => return self.forget(seq),
            Err(StoreError::Damaged {
                first_seq, end_seq, ..
            }) => return self.skip_damaged(first_seq..end_seq),
            Err(e) => {
                // Not lost: it is given up again once it can be read.
                tracing::error!(subscription = %self.name, seq, error = %e, "cannot read a message to dead-letter it");
                let count = attempts.saturating_sub(1);
                return self.retry_after(seq, count, Duration::from_secs(1), why, reason);
            }
        };
        let view = match dead_letter::addressee(&stored, &self.name) {
            Addressee::Redriven(view) => view,
            _ => stored,
        };
        let provenance = Provenance {
            channel: &self.channel,
            subscription: &self.name,
            reason: why,
            attempts,
            error: &reason,
            now_ms: now_ms(),
        };
        let letter = dead_letter::dead_letter(&view, &provenance);
        self.unsaved.dead_letter_bytes += letter.size();
        self.unsaved
            .dead_letters
            .insert(seq, (channel, letter, None));
        self.counts.dead_lettered += 1;
        tracing::info!(subscription = %self.name, seq, why, attempts, "message dead-lettered");
        self.acked(seq);
    }

    /// Puts new settings in force. Dead letters not yet confirmed go to the new dead-letter
    /// channel, if there is one: the old one may be deleted once this returns.
    pub(super) fn reconfigure(&mut self, settings: ferry_store::SubscriptionSettings) {
        if let Some(channel) = settings.dead_letter {
            for (target, _, _) in self.unsaved.dead_letters.values_mut() {
                *target = channel;
            }
        }
        self.settings = settings;
    }

    /// Forgets a message that is gone for this subscription, wherever it waits.
    pub(super) fn forget(&mut self, seq: u64) {
        self.take_back(seq);
        self.queue.remove(seq);
        self.unpark(seq);
        if self.failures.remove(&seq).is_some() {
            self.unsaved.drop_record(seq);
        }
        self.unsaved.deferred.retain(|g| g.seq != seq);
        if let Some(at) = self.prefetch.iter().position(|m| m.sequence == seq) {
            self.prefetch.remove(at);
        }
    }

    /// Forgets every message `gone` says is gone: in flight, in the queue (keys it held are
    /// released), waiting to be given up, read ahead, and its failure record.
    pub(super) fn forget_where(&mut self, gone: impl Fn(u64) -> bool) {
        let mut seqs: Vec<u64> = self
            .in_flight
            .keys()
            .copied()
            .filter(|&s| gone(s))
            .collect();
        seqs.extend(self.queue.all().into_iter().filter(|&s| gone(s)));
        seqs.extend(self.failures.keys().copied().filter(|&s| gone(s)));
        seqs.extend(
            self.unsaved
                .deferred
                .iter()
                .map(|g| g.seq)
                .filter(|&s| gone(s)),
        );
        for seq in seqs {
            self.take_back(seq);
            self.queue.remove(seq);
            self.unpark(seq);
            if self.failures.remove(&seq).is_some() {
                self.unsaved.drop_record(seq);
            }
        }
        self.unsaved.deferred.retain(|g| !gone(g.seq));
        self.prefetch.retain(|m| !gone(m.sequence));
    }

    /// Counts as acked what was withdrawn from the channel (redriven elsewhere).
    pub(super) fn fold_withdrawn(&mut self) {
        let ranges = self.withdrawn.borrow_and_update().clone();
        if ranges.is_empty() {
            return;
        }
        let floor = self.acks.floor();
        let mut added = 0;
        for &(start, end) in ranges.iter().filter(|(_, end)| *end > floor) {
            added += self.acks.insert_range(start.max(floor)..end);
        }
        if added == 0 {
            return;
        }
        self.forget_where(|seq| {
            let at = ranges.partition_point(|&(start, _)| start <= seq);
            at > 0 && seq < ranges[at - 1].1
        });
        self.unsaved.dirty = true;
    }

    /// Queues what changed for the store from this task, so that saves reach it in the order
    /// they were made (a later ack state never loses to an earlier one); then, in a task of its
    /// own so that dispatching goes on, waits for it to be durable and tells the dispatcher,
    /// and sends the answers that waited for it.
    pub(super) async fn save(&mut self) {
        if self
            .unsaved
            .hold_until
            .is_some_and(|at| Instant::now() < at)
        {
            return;
        }
        let unsent_records = self.unsaved.records.values().any(|r| r.sent_in.is_none());
        if !(self.unsaved.dirty || unsent_records) {
            return;
        }
        self.unsaved.hold_until = None;
        self.unsaved.saves += 1;
        let save = self.unsaved.saves;
        let failures = self
            .unsaved
            .records
            .iter_mut()
            .filter(|(_, r)| r.sent_in.is_none())
            .take(RECORDS_PER_SAVE)
            .map(|(&seq, r)| {
                r.sent_in = Some(save);
                (seq, r.failure.clone())
            })
            .collect();
        // Every dead letter not confirmed goes with every state that acks its message.
        let dead_letters = self
            .unsaved
            .dead_letters
            .iter_mut()
            .map(|(&seq, (channel, message, sent))| {
                sent.get_or_insert(save);
                (seq, *channel, message.clone())
            })
            .collect();
        self.unsaved.dirty = false;
        let floor = self.acks.floor();
        let update = AckUpdate {
            state: self.acks.to_state(),
            failures,
            dead_letters,
        };
        let submitted = self.store.submit_acks(self.id, update).await;
        let commands = self.commands.clone();
        let answers = std::mem::take(&mut self.unsaved.answers);
        tokio::spawn(async move {
            let outcome = match submitted {
                Ok(confirmation) => confirmation.confirmed().await,
                Err(e) => Err(e),
            };
            // First: collection and retries must not wait on a consumer that reads slowly.
            let told = match outcome {
                Ok(()) => Command::Durable { floor, save },
                Err(_) => Command::SaveFailed { save },
            };
            let _ = commands.send(told).await;
            for (outbox, bytes, event) in answers {
                match &outcome {
                    Ok(()) => {
                        outbox.push_reserved(bytes, event);
                    }
                    // Deleted (with its channel, maybe): its deliveries are gone. A wildcard
                    // consumer reads the other channels on.
                    Err(StoreError::SubscriptionNotFound | StoreError::ChannelNotFound) => {
                        outbox.push_reserved(bytes, stale(event));
                    }
                    Err(e) => {
                        outbox.release(bytes);
                        outbox.close(e.clone().into());
                    }
                }
            }
        });
    }

    /// Moves the subscription (see [`ferry_store::Store::seek`]): once the store has made the
    /// new state durable, every delivery in flight is void (its ack is `STALE`), and the
    /// dispatcher starts over from the new floor, attempts reset.
    pub(super) async fn seek(&mut self, position: Position) -> Result<u64, StoreError> {
        // Queued behind every save made so far, so that none of them lands after it.
        let state = self.store.seek(self.id, position).await?;
        let flying: Vec<u64> = self.in_flight.keys().copied().collect();
        for seq in flying {
            self.take_back(seq);
        }
        self.queue = super::queue::Queue::default();
        self.parked.clear();
        self.parked_bytes = 0;
        self.failures.clear();
        self.unsaved.records.clear();
        self.unsaved.dead_letters.clear();
        self.unsaved.dead_letter_bytes = 0;
        self.unsaved.deferred.clear();
        self.prefetch.clear();
        self.acks = crate::acks::AckSet::from_state(&state);
        self.cursor = state.floor;
        self.durable_floor = state.floor;
        // Floors that earlier saves report are from before the move.
        self.unsaved.moved_after = self.unsaved.saves;
        // What was withdrawn still counts as acked.
        self.fold_withdrawn();
        tracing::info!(subscription = %self.name, floor = state.floor, ?position, "subscription moved");
        Ok(state.floor)
    }

    /// Save number `save` is durable: its floor is what a crash comes back to, and the
    /// messages whose failures it recorded may be retried.
    pub(super) fn durable(&mut self, floor: u64, save: u64) {
        if save > self.unsaved.moved_after {
            self.durable_floor = self.durable_floor.max(floor);
        }
        let confirmed = |sent: &Option<u64>| sent.is_some_and(|s| s <= save);
        let records = std::mem::take(&mut self.unsaved.records);
        for (seq, record) in records {
            if !confirmed(&record.sent_in) {
                self.unsaved.records.insert(seq, record);
                continue;
            }
            let still_failed = self.failures.contains_key(&seq)
                && !self.acks.contains(seq)
                && !self.in_flight.contains_key(&seq);
            if let Some(at) = record.retry
                && still_failed
            {
                self.queue.retry_at(seq, at);
            }
        }
        let mut freed = 0;
        self.unsaved.dead_letters.retain(|_, (_, message, sent)| {
            let keep = !confirmed(sent);
            if !keep {
                freed += message.size();
            }
            keep
        });
        self.unsaved.dead_letter_bytes -= freed;
        self.queue.promote_due(Instant::now());
    }

    /// Save number `save` failed: its failure records are sent again, a little later, with the
    /// ack state and every dead letter not yet confirmed.
    pub(super) fn save_failed(&mut self, save: u64) {
        tracing::warn!(
            subscription = %self.name,
            "saving acks failed; what it carried is sent again in {SAVE_AGAIN_AFTER:?}"
        );
        for record in self.unsaved.records.values_mut() {
            if record.sent_in == Some(save) {
                record.sent_in = None;
            }
        }
        // Dead letters go with every save until one is confirmed; the ack state too.
        self.unsaved.dirty = true;
        self.unsaved.hold_until = Some(Instant::now() + SAVE_AGAIN_AFTER);
    }
}

/// `text` cut to at most [`MAX_REASON_BYTES`], at a character boundary.
fn cut(text: &str) -> &str {
    let mut end = text.len().min(MAX_REASON_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    #[test]
    fn reasons_are_cut_at_a_character_boundary() {
        let long = "é".repeat(1000);
        let cut = super::cut(&long);
        assert!(cut.len() <= super::MAX_REASON_BYTES && cut.len() >= super::MAX_REASON_BYTES - 1);
        assert!(long.starts_with(cut));
        assert_eq!(super::cut("short"), "short");
    }
}
