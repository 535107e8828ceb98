//! What consumers say of their deliveries, and what becomes of a message that fails.
//!
//! Every failure (a nack, a deadline that passed, a delivery released by a consumer that left)
//! goes through [`Dispatcher::fail`]: the failure is counted in the message's durable failure
//! record, and the message comes back after the retry policy's wait (or a nack's own delay)
//! once that record is durable; after its last allowed attempt, or on a terminal nack, it is
//! dead-lettered instead: its copy is appended to the dead-letter channel in the same commit
//! as the ack that takes it off this subscription. Acks, nacks, failure records and dead
//! letters made in one round go to the store as one save; their answers wait for it.

use std::time::Duration;

use ferry_store::{AckUpdate, Failure, StoreError};
use tokio::time::Instant;

use super::ack_id::parse_ack_id;
use super::{Command, Dispatcher, now_ms};
use crate::dead_letter::{self, Addressee, Provenance};
use crate::{AckOutcome, AckResult, ConsumerEvent, Nack, Settlement, retry};

/// The longest reason text a nack's failure record and dead letter keep (longer text is cut).
pub(crate) const MAX_REASON_BYTES: usize = 1024;

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
            let result = match self.lookup(&ack_id) {
                Err(result) => result,
                Ok(seq) => {
                    match &settlement {
                        Settlement::Ack => {
                            self.take_back(seq);
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
            self.pending.answers.push((outbox, reserved, event));
        } else {
            outbox.push_reserved(reserved, event);
        }
    }

    /// Finds the in-flight delivery an ack id names: `UNKNOWN` for an id this subscription
    /// never issued (malformed, another subscription's, a wrong check, or a delivery number not
    /// yet reached), `STALE` for one it issued that is no longer in flight.
    fn lookup(&self, ack_id: &str) -> Result<u64, AckResult> {
        let (subscription, seq, delivery) = parse_ack_id(ack_id).ok_or(AckResult::Unknown)?;
        if subscription != self.id.0 || delivery >= self.next_delivery {
            return Err(AckResult::Unknown);
        }
        match self.in_flight.get(&seq) {
            Some(flight) if flight.delivery == delivery => Ok(seq),
            _ => Err(AckResult::Stale),
        }
    }

    /// A message is done for this subscription (acked, dead-lettered, discarded).
    fn acked(&mut self, seq: u64) {
        self.acks.insert(seq);
        self.queue.remove(seq);
        if self.failures.remove(&seq).is_some() {
            self.pending.records.push((seq, None));
        }
        self.pending.dirty = true;
    }

    /// A delivery failed: the message is retried after its wait, or dead-lettered after its
    /// last attempt or a terminal nack.
    pub(super) fn fail(&mut self, seq: u64, cause: Cause, nack: Option<&Nack>) {
        let Some(flight) = self.take_back(seq) else {
            return;
        };
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
        if nack.is_some_and(|n| n.terminal) {
            return self.give_up(seq, "terminal", attempts, &reason);
        }
        if limit > 0 && attempts >= limit {
            return self.give_up(seq, cause.name(), attempts, &reason);
        }
        let wait = match nack.and_then(|n| n.delay) {
            Some(delay) => delay,
            None => retry::backoff(&self.settings.retry, attempts, self.jitter.next()),
        };
        self.retry_after(seq, attempts, wait, cause.name(), reason);
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
        self.pending.records.push((seq, Some(failure)));
        self.pending.retries.push((seq, Instant::now() + wait));
        self.pending.dirty = true;
    }

    /// Takes a message off the subscription for good: into the dead-letter channel, or, for a
    /// terminal nack without one, discarded (the consumer said never to retry it).
    fn give_up(&mut self, seq: u64, why: &str, attempts: u32, reason: &str) {
        if self.settings.dead_letter.is_none() {
            tracing::warn!(
                subscription = %self.name,
                seq,
                reason,
                "terminal nack and no dead-letter channel: message discarded"
            );
            self.counts.discarded += 1;
            return self.acked(seq);
        }
        let stored = match self.log.get(seq) {
            Ok(Some(stored)) => stored,
            Ok(None) => return self.acked(seq),
            Err(StoreError::Damaged {
                first_seq, end_seq, ..
            }) => return self.skip_damaged(first_seq..end_seq),
            Err(e) => {
                // Not lost: it is tried again once it can be read.
                tracing::error!(subscription = %self.name, seq, error = %e, "cannot read a message to dead-letter it");
                let count = attempts.saturating_sub(1);
                return self.retry_after(seq, count, Duration::from_secs(1), why, reason.into());
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
            error: reason,
            now_ms: now_ms(),
        };
        self.pending
            .dead_letters
            .push(dead_letter::dead_letter(&view, &provenance));
        self.counts.dead_lettered += 1;
        tracing::info!(subscription = %self.name, seq, why, attempts, "message dead-lettered");
        self.acked(seq);
    }

    /// Forgets a message that is gone for this subscription, wherever it waits.
    pub(super) fn forget(&mut self, seq: u64) {
        self.forget_where(|s| s == seq);
    }

    /// Takes every message `gone` says is gone out of flight, the queue and the read-ahead,
    /// and drops its failure record.
    pub(super) fn forget_where(&mut self, gone: impl Fn(u64) -> bool) {
        let flying: Vec<u64> = self
            .in_flight
            .keys()
            .copied()
            .filter(|&s| gone(s))
            .collect();
        for seq in flying {
            self.take_back(seq);
            self.queue.remove(seq);
        }
        for (seq, key) in self.queue.waiting() {
            if gone(seq) {
                match key {
                    Some(key) => self.queue.unpark(seq, &key),
                    None => self.queue.remove(seq),
                }
            }
        }
        let failed: Vec<u64> = self.failures.keys().copied().filter(|&s| gone(s)).collect();
        for seq in failed {
            self.failures.remove(&seq);
            self.queue.remove(seq);
            self.pending.records.push((seq, None));
        }
        self.prefetch.retain(|m| !gone(m.sequence));
    }

    /// Counts as acked what was withdrawn from the channel (redriven elsewhere).
    pub(super) fn fold_withdrawn(&mut self) {
        let ranges = self.withdrawn.borrow_and_update().clone();
        let floor = self.acks.floor();
        let mut added = 0;
        for &(start, end) in ranges.iter().filter(|(_, end)| *end > floor) {
            added += self.acks.insert_range(start.max(floor)..end);
        }
        if added == 0 {
            return;
        }
        self.forget_where(|seq| ranges.iter().any(|&(s, e)| (s..e).contains(&seq)));
        self.pending.dirty = true;
    }

    /// Queues everything pending for the store from this task, so that saves reach it in the
    /// order they were made (a later ack state never loses to an earlier one); then, in a task
    /// of its own so that dispatching goes on, waits for it to be durable, tells the
    /// dispatcher, and sends the answers that waited for it.
    pub(super) async fn save(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        self.saves += 1;
        let save = self.saves;
        if !pending.retries.is_empty() {
            self.saving.push_back((save, pending.retries));
        }
        let floor = self.acks.floor();
        let update = AckUpdate {
            state: self.acks.to_state(),
            failures: pending.records,
            dead_letters: pending.dead_letters,
        };
        let submitted = self.store.submit_acks(self.id, update).await;
        let commands = self.commands.clone();
        let answers = pending.answers;
        tokio::spawn(async move {
            let outcome = match submitted {
                Ok(confirmation) => confirmation.confirmed().await,
                Err(e) => Err(e),
            };
            if outcome.is_ok() {
                // First: collection and retries must not wait on a consumer that reads slowly.
                let _ = commands.send(Command::Durable { floor, save }).await;
            }
            for (outbox, bytes, event) in answers {
                match &outcome {
                    Ok(()) => {
                        outbox.push_reserved(bytes, event);
                    }
                    Err(e) => {
                        outbox.release(bytes);
                        outbox.close(e.clone().into());
                    }
                }
            }
        });
    }

    /// Save number `save` is durable: its floor is what a crash comes back to, and the
    /// messages whose failures it recorded may be retried.
    pub(super) fn durable(&mut self, floor: u64, save: u64) {
        self.durable_floor = self.durable_floor.max(floor);
        while self.saving.front().is_some_and(|(s, _)| *s <= save) {
            let (_, retries) = self.saving.pop_front().expect("checked");
            for (seq, at) in retries {
                let still_failed = self.failures.contains_key(&seq)
                    && !self.acks.contains(seq)
                    && !self.in_flight.contains_key(&seq);
                if still_failed {
                    self.queue.retry_at(seq, at);
                }
            }
        }
        self.queue.promote_due(Instant::now());
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
