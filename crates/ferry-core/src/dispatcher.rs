//! One subscription's dispatcher: a task that owns all of the subscription's delivery state.
//!
//! It hands messages to the attached consumers within their flow-control windows (redeliveries
//! first, then new messages in sequence order), tracks every delivery until it is acked, nacked,
//! released or its deadline passes, and saves the ack state through the store before it confirms
//! an ack. Being one task, it needs no locks; everything reaches it as a [`Command`] over a
//! bounded channel, or as a change of the channel's durable end.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_store::{ChannelLog, Message, Store, StoreError, SubscriptionId, SubscriptionSettings};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use crate::acks::AckSet;
use crate::error::CoreError;
use crate::outbox::{ConsumerEvents, Outbox, RequestGate, outbox};
use crate::{
    AckOperation, AckOutcome, AckResult, Attached, ConsumerEvent, ConsumerLimits, DamagePolicy,
    Delivery, SubscriptionStats, Window,
};

/// How many new messages the dispatcher reads ahead of its consumers at most.
const PREFETCH_MESSAGES: usize = 512;
const PREFETCH_BYTES: usize = 4 << 20;
/// The most payload bytes in one deliveries event (a larger single message goes alone).
const EVENT_BYTES: usize = 1 << 20;

/// A request to a dispatcher.
pub(crate) enum Command {
    Attach {
        window: Window,
        reply: oneshot::Sender<(Attached, ConsumerEvents, RequestGate)>,
    },
    Detach {
        consumer: u64,
    },
    Settle {
        consumer: u64,
        operation: AckOperation,
        ack_ids: Vec<String>,
        extension: Duration,
        /// The answer's bytes, reserved in the consumer's outbox when the request was read.
        reserved: usize,
    },
    SetWindow {
        consumer: u64,
        window: Window,
    },
    Stats {
        reply: oneshot::Sender<SubscriptionStats>,
    },
    Reconfigure {
        settings: SubscriptionSettings,
    },
    AcksDurable {
        floor: u64,
    },
    Stop {
        reason: CoreError,
    },
}

struct InFlight {
    consumer: u64,
    delivery: u64,
    attempt: u32,
    deadline: Instant,
    bytes: u64,
}

struct Consumer {
    outbox: Outbox,
    window: Window,
    /// Unsettled deliveries and their bytes, against the window.
    messages: u32,
    bytes: u64,
    /// Deliveries made this round, sent together, and their heap bytes.
    batch: Vec<Delivery>,
    batch_bytes: usize,
}

impl Consumer {
    /// Whether a message of this size (against the window) and heap size (against the
    /// outbox) may go to this consumer now.
    fn fits(&self, size: u64, heap: usize) -> bool {
        self.messages < self.window.max_messages
            && (self.messages == 0 || self.bytes + size <= self.window.max_bytes)
            && self.outbox.has_room(self.batch_bytes, heap)
    }
}

/// The bytes a delivery holds while it waits in an outbox.
fn delivery_bytes(delivery: &Delivery) -> usize {
    delivery.message.heap_size() + delivery.ack_id.len() + 48
}

/// The bytes a results event holds while it waits in an outbox.
/// The dispatcher's state.
pub(crate) struct Dispatcher {
    id: SubscriptionId,
    name: String,
    log: Arc<ChannelLog>,
    store: Store,
    settings: SubscriptionSettings,
    commands: mpsc::Sender<Command>,
    limits: ConsumerLimits,
    on_damage: DamagePolicy,
    /// Messages skipped at damaged records.
    damaged_skipped: u64,
    /// Skips made acks that are not queued for the store yet.
    skips_unsaved: bool,
    /// Notified by the consumers' outboxes when their streams take events (room appears).
    wake: Arc<Notify>,
    acks: AckSet,
    /// The floor the store has confirmed (what a crash would come back to).
    durable_floor: u64,
    /// New messages read ahead, all unacked and never delivered, from `cursor` on.
    prefetch: VecDeque<Arc<Message>>,
    /// The next sequence to read into `prefetch`.
    cursor: u64,
    in_flight: HashMap<u64, InFlight>,
    /// Delivered before and to be delivered again, lowest first.
    redeliver: BTreeSet<u64>,
    /// Attempts so far of the messages in `redeliver`.
    attempts: HashMap<u64, u32>,
    /// The deadline of every in-flight delivery, soonest first: exactly one entry per entry of
    /// `in_flight`, so that it holds no more than the windows allow (a lazily cleaned heap
    /// held every acked delivery until its deadline: at 300k acks/s and 30 s, 300 MiB).
    deadlines: BTreeSet<(Instant, u64)>,
    consumers: BTreeMap<u64, Consumer>,
    next_consumer: u64,
    /// Delivery ids start from the clock, so an ack id from before a restart never matches a
    /// delivery made after it.
    next_delivery: u64,
    round_robin: u64,
}

impl Dispatcher {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: SubscriptionId,
        name: String,
        log: Arc<ChannelLog>,
        store: Store,
        settings: SubscriptionSettings,
        acks: AckSet,
        commands: mpsc::Sender<Command>,
        limits: ConsumerLimits,
        on_damage: DamagePolicy,
    ) -> Self {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        Self {
            id,
            name,
            log,
            store,
            settings,
            commands,
            limits,
            on_damage,
            damaged_skipped: 0,
            skips_unsaved: false,
            wake: Arc::new(Notify::new()),
            durable_floor: acks.floor(),
            cursor: acks.floor(),
            acks,
            prefetch: VecDeque::new(),
            in_flight: HashMap::new(),
            redeliver: BTreeSet::new(),
            attempts: HashMap::new(),
            deadlines: BTreeSet::new(),
            consumers: BTreeMap::new(),
            next_consumer: 1,
            next_delivery: epoch,
            round_robin: 0,
        }
    }

    /// Runs until stopped or until every handle to it is gone.
    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut end = self.log.watch_end();
        let mut stall_check = tokio::time::interval(
            (self.limits.stall_timeout / 4)
                .clamp(Duration::from_millis(10), Duration::from_secs(1)),
        );
        stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.deadlines.first().map(|(at, _)| *at);
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    if !self.handle(command).await {
                        return;
                    }
                    // Take what else is queued before dispatching once for all of it.
                    for _ in 0..64 {
                        match commands.try_recv() {
                            Ok(command) => if !self.handle(command).await { return },
                            Err(_) => break,
                        }
                    }
                }
                changed = end.changed(), if !self.consumers.is_empty() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.expire();
                }
                _ = self.wake.notified(), if !self.consumers.is_empty() => {}
                _ = stall_check.tick(), if !self.consumers.is_empty() => self.detach_stalled(),
            }
            self.dispatch();
            if self.skips_unsaved {
                self.save_skips().await;
            }
        }
        self.stop(CoreError::ShuttingDown);
    }

    /// Handles one command; false when the dispatcher must stop.
    async fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Attach { window, reply } => {
                let id = self.next_consumer;
                self.next_consumer += 1;
                let (outbox, events) = outbox(self.limits.queue_bytes, self.wake.clone());
                let gate = outbox.gate();
                let consumer = Consumer {
                    outbox,
                    window,
                    messages: 0,
                    bytes: 0,
                    batch: Vec::new(),
                    batch_bytes: 0,
                };
                self.consumers.insert(id, consumer);
                let attached = Attached {
                    consumer_id: id,
                    ack_deadline_ms: self.settings.ack_deadline_ms,
                    window,
                };
                let _ = reply.send((attached, events, gate));
                tracing::debug!(subscription = %self.name, consumer = id, "consumer attached");
            }
            Command::Detach { consumer } => {
                self.detach(consumer);
            }
            Command::Settle {
                consumer,
                operation,
                ack_ids,
                extension,
                reserved,
            } => {
                self.settle(consumer, operation, ack_ids, extension, reserved)
                    .await
            }
            Command::SetWindow { consumer, window } => {
                if let Some(c) = self.consumers.get_mut(&consumer) {
                    c.window = window;
                }
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            Command::Reconfigure { settings } => self.settings = settings,
            Command::AcksDurable { floor } => self.durable_floor = self.durable_floor.max(floor),
            Command::Stop { reason } => {
                self.stop(reason);
                return false;
            }
        }
        true
    }

    fn stop(&mut self, reason: CoreError) {
        for (_, consumer) in std::mem::take(&mut self.consumers) {
            consumer.outbox.close(reason.clone());
        }
    }

    /// Lets go of a consumer and releases its deliveries; returns its outbox.
    fn detach(&mut self, consumer: u64) -> Option<Outbox> {
        let outbox = self.consumers.remove(&consumer)?.outbox;
        let released: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.consumer == consumer)
            .map(|(&seq, _)| seq)
            .collect();
        for seq in &released {
            self.requeue(*seq);
        }
        tracing::debug!(subscription = %self.name, consumer, released = released.len(), "consumer detached");
        Some(outbox)
    }

    /// Detaches every consumer whose stream has taken nothing from a non-empty outbox for the
    /// stall timeout: it holds deliveries others could process, and memory while it holds them.
    fn detach_stalled(&mut self) {
        let timeout = self.limits.stall_timeout;
        let stalled: Vec<(u64, Duration, usize)> = self
            .consumers
            .iter()
            .map(|(&id, c)| (id, c.outbox.stalled_for(), c.outbox.queued()))
            .filter(|(_, stalled, _)| *stalled >= timeout)
            .collect();
        for (consumer, stalled, queued) in stalled {
            let in_flight = self.consumers[&consumer].messages;
            tracing::warn!(
                subscription = %self.name,
                consumer,
                stalled_ms = stalled.as_millis() as u64,
                queued_bytes = queued,
                released = in_flight,
                "consumer read nothing from its stream: detached"
            );
            if let Some(outbox) = self.detach(consumer) {
                outbox.close(CoreError::ConsumerStalled {
                    subscription: self.name.clone(),
                    consumer,
                    stalled,
                    queued_bytes: queued,
                });
            }
        }
    }

    /// Takes a delivery back (nack, expiry, release) so that it is delivered again.
    fn requeue(&mut self, seq: u64) -> Option<InFlight> {
        let flight = self.take_back(seq)?;
        self.attempts.insert(seq, flight.attempt);
        self.redeliver.insert(seq);
        Some(flight)
    }

    /// Ends a delivery: out of `in_flight`, its deadline and its consumer's window.
    fn take_back(&mut self, seq: u64) -> Option<InFlight> {
        let flight = self.in_flight.remove(&seq)?;
        self.deadlines.remove(&(flight.deadline, seq));
        if let Some(c) = self.consumers.get_mut(&flight.consumer) {
            c.messages -= 1;
            c.bytes -= flight.bytes;
        }
        Some(flight)
    }

    async fn settle(
        &mut self,
        consumer: u64,
        operation: AckOperation,
        ack_ids: Vec<String>,
        extension: Duration,
        reserved: usize,
    ) {
        let mut outcomes = Vec::with_capacity(ack_ids.len());
        let mut acked = false;
        for ack_id in ack_ids {
            let result = match self.lookup(&ack_id) {
                Err(result) => result,
                Ok(seq) => {
                    match operation {
                        AckOperation::Ack => {
                            self.take_back(seq);
                            self.acks.insert(seq);
                            acked = true;
                        }
                        AckOperation::Nack => {
                            self.requeue(seq);
                        }
                        AckOperation::Extend => {
                            let flight = self.in_flight.get_mut(&seq).expect("looked up");
                            self.deadlines.remove(&(flight.deadline, seq));
                            flight.deadline = Instant::now() + extension;
                            self.deadlines.insert((flight.deadline, seq));
                        }
                    }
                    AckResult::Ok
                }
            };
            outcomes.push(AckOutcome { ack_id, result });
        }
        let outbox = self.consumers.get(&consumer).map(|c| c.outbox.clone());
        let bytes = reserved;
        let event = ConsumerEvent::Results {
            operation,
            results: outcomes,
        };
        if !acked {
            // Nothing to make durable: answer now.
            if let Some(outbox) = outbox {
                outbox.push_reserved(bytes, event);
            }
            return;
        }
        // The answer waits for the commit; its bytes stay reserved meanwhile.
        self.save_acks(move |outcome| {
            let Some(outbox) = outbox else { return };
            match outcome {
                Ok(()) => {
                    outbox.push_reserved(bytes, event);
                }
                Err(e) => {
                    outbox.release(bytes);
                    outbox.close(e.into());
                }
            }
        })
        .await;
    }

    /// Queues the ack state for the store from this task, so that states reach it in the order
    /// they were made (a later one never loses to an earlier one); then, in a task of its own
    /// so that dispatching goes on, waits for it to be durable, tells the dispatcher the new
    /// durable floor, and hands the outcome to `after`.
    async fn save_acks(&mut self, after: impl FnOnce(Result<(), StoreError>) + Send + 'static) {
        let floor = self.acks.floor();
        let submitted = self.store.submit_acks(self.id, self.acks.to_state()).await;
        let commands = self.commands.clone();
        tokio::spawn(async move {
            let outcome = match submitted {
                Ok(confirmation) => confirmation.confirmed().await,
                Err(e) => Err(e),
            };
            if outcome.is_ok() {
                // The floor first: collection must not wait on a consumer that reads slowly.
                let _ = commands.send(Command::AcksDurable { floor }).await;
            }
            after(outcome);
        });
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

    fn expire(&mut self) {
        let now = Instant::now();
        while self.deadlines.first().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, seq)) = self.deadlines.pop_first() {
                self.requeue(seq);
            }
        }
    }

    /// Hands out as many messages as the consumers' windows allow.
    fn dispatch(&mut self) {
        if !self.consumers.values().any(|c| c.fits(0, 0)) {
            return;
        }
        loop {
            let Some((message, attempt)) = self.next_message() else {
                break;
            };
            let Some(consumer) = self.pick_consumer(message.size() as u64, message.heap_size())
            else {
                // Nobody has room for it now: put it back where it came from.
                if attempt > 1 {
                    self.attempts.insert(message.sequence, attempt - 1);
                    self.redeliver.insert(message.sequence);
                } else {
                    self.prefetch.push_front(message);
                }
                break;
            };
            let delivery = self.next_delivery;
            self.next_delivery += 1;
            let deadline = Instant::now() + Duration::from_millis(self.settings.ack_deadline_ms);
            let bytes = message.size() as u64;
            let seq = message.sequence;
            self.in_flight.insert(
                seq,
                InFlight {
                    consumer,
                    delivery,
                    attempt,
                    deadline,
                    bytes,
                },
            );
            self.deadlines.insert((deadline, seq));
            let c = self.consumers.get_mut(&consumer).expect("picked");
            c.messages += 1;
            c.bytes += bytes;
            let delivery = Delivery {
                ack_id: format_ack_id(self.id.0, seq, delivery),
                message,
                attempt,
            };
            c.batch_bytes += delivery_bytes(&delivery);
            c.batch.push(delivery);
        }
        self.flush_batches();
    }

    /// The next message to deliver with its attempt number: redeliveries first.
    fn next_message(&mut self) -> Option<(Arc<Message>, u32)> {
        while let Some(seq) = self.redeliver.pop_first() {
            let attempt = self.attempts.remove(&seq).unwrap_or(0) + 1;
            match self.log.get(seq) {
                Ok(Some(message)) => return Some((message, attempt)),
                Ok(None) => {
                    tracing::warn!(subscription = %self.name, seq, "unacked message is no longer stored")
                }
                Err(StoreError::Damaged {
                    first_seq, end_seq, ..
                }) if self.on_damage == DamagePolicy::Skip => {
                    self.skip_damaged(first_seq..end_seq);
                }
                Err(e) => {
                    tracing::error!(subscription = %self.name, seq, error = %e, "cannot read message");
                    self.attempts.insert(seq, attempt - 1);
                    self.redeliver.insert(seq);
                    return None;
                }
            }
        }
        loop {
            if let Some(message) = self.prefetch.pop_front() {
                if self.acks.contains(message.sequence) {
                    continue;
                }
                return Some((message, 1));
            }
            self.cursor = self.acks.next_unacked(self.cursor);
            match self
                .log
                .read(self.cursor, PREFETCH_MESSAGES, PREFETCH_BYTES)
            {
                Ok(messages) if messages.is_empty() => return None,
                Ok(messages) => {
                    self.cursor = messages.last().map_or(self.cursor, |m| m.sequence + 1);
                    self.prefetch.extend(messages);
                }
                Err(StoreError::Damaged {
                    first_seq, end_seq, ..
                }) if self.on_damage == DamagePolicy::Skip => {
                    self.skip_damaged(first_seq..end_seq);
                }
                // The log reported the damage; with the stop policy nothing goes past it.
                Err(StoreError::Damaged { .. }) => return None,
                Err(e) => {
                    tracing::error!(subscription = %self.name, error = %e, "cannot read messages");
                    return None;
                }
            }
        }
    }

    /// Goes past a damaged record: its messages are lost, so they count as acked for this
    /// subscription (else its ack floor, and collection, would stop there for good).
    fn skip_damaged(&mut self, range: std::ops::Range<u64>) {
        let skipped = self.acks.insert_range(range.clone());
        self.damaged_skipped += skipped;
        for seq in range.clone() {
            if self.redeliver.remove(&seq) {
                self.attempts.remove(&seq);
            }
        }
        self.prefetch.retain(|m| !range.contains(&m.sequence));
        self.cursor = self.cursor.max(range.end);
        tracing::warn!(
            subscription = %self.name,
            first = range.start,
            last = range.end - 1,
            skipped,
            "skipped the messages of a damaged record"
        );
        self.skips_unsaved = true;
    }

    /// Saves the ack state after damaged records were skipped. Queued from this task, like
    /// every ack state, so that a later state never loses to an earlier one.
    async fn save_skips(&mut self) {
        self.skips_unsaved = false;
        self.save_acks(drop).await;
    }

    /// The next consumer, in turn, with room for a message of this size.
    fn pick_consumer(&mut self, size: u64, heap: usize) -> Option<u64> {
        let start = self.round_robin;
        let found = self
            .consumers
            .range(start..)
            .chain(self.consumers.range(..start))
            .find(|(_, c)| c.fits(size, heap))
            .map(|(&id, _)| id)?;
        self.round_robin = found + 1;
        Some(found)
    }

    fn flush_batches(&mut self) {
        let mut gone = Vec::new();
        for (&id, consumer) in &mut self.consumers {
            consumer.batch_bytes = 0;
            let mut batch = std::mem::take(&mut consumer.batch).into_iter().peekable();
            while batch.peek().is_some() {
                // Each event stays well below gRPC clients' default 4 MiB message limit.
                let (mut size, mut bytes) = (0, 0);
                let mut event = Vec::new();
                while let Some(delivery) =
                    batch.next_if(|d| event.is_empty() || size + d.message.size() <= EVENT_BYTES)
                {
                    size += delivery.message.size();
                    bytes += delivery_bytes(&delivery);
                    event.push(delivery);
                }
                if !consumer
                    .outbox
                    .push(bytes, ConsumerEvent::Deliveries(event))
                {
                    gone.push(id);
                    break;
                }
            }
        }
        for id in gone {
            self.detach(id);
        }
    }

    fn stats(&self) -> SubscriptionStats {
        let end = self.log.stats().next_seq;
        let undelivered_from = self.prefetch.front().map_or(self.cursor, |m| m.sequence);
        let floor = self.acks.floor();
        let oldest = if floor < end {
            self.log
                .get(floor)
                .ok()
                .flatten()
                .map(|m| m.publish_time_ms)
        } else {
            None
        };
        SubscriptionStats {
            name: self.name.clone(),
            settings: self.settings,
            backlog: end.saturating_sub(undelivered_from) + self.redeliver.len() as u64,
            in_flight: self.in_flight.len() as u64,
            acked: self.acks.total(),
            unacked: end
                .saturating_sub(floor)
                .saturating_sub(self.acks.acked_above_floor()),
            oldest_unacked_publish_time_ms: oldest,
            consumers: self.consumers.len() as u32,
            damaged_skipped: self.damaged_skipped,
            ack_floor: self.durable_floor,
        }
    }
}

/// An ack id: `SUBSCRIPTION-SEQUENCE-DELIVERY-CHECK`. The check (a hash of the other three)
/// tells an id the broker issued, however long ago, from one a client made up or mangled:
/// the first is `STALE` once settled, the second `UNKNOWN`.
/// For the fuzz target: parses arbitrary text as an ack id, and checks that every id the
/// broker issues parses back to itself.
#[cfg(fuzzing)]
pub fn fuzz_ack_id(text: &str, subscription: u32, seq: u64, delivery: u64) {
    let _ = parse_ack_id(text);
    let issued = format_ack_id(subscription, seq, delivery);
    assert_eq!(parse_ack_id(&issued), Some((subscription, seq, delivery)));
}

fn format_ack_id(subscription: u32, seq: u64, delivery: u64) -> String {
    let check = ack_check(subscription, seq, delivery);
    format!("{subscription}-{seq}-{delivery}-{check:08x}")
}

fn parse_ack_id(ack_id: &str) -> Option<(u32, u64, u64)> {
    let mut parts = ack_id.splitn(4, '-');
    let subscription = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let delivery = parts.next()?.parse().ok()?;
    let check = parts.next()?;
    (check.len() == 8
        && u32::from_str_radix(check, 16).ok()? == ack_check(subscription, seq, delivery))
    .then_some((subscription, seq, delivery))
}

/// 32 bits of a SplitMix64-style mix of the id's parts: not a secret (ack ids are not
/// credentials), only a check that the id was made by this code.
fn ack_check(subscription: u32, seq: u64, delivery: u64) -> u32 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    (mix(mix(mix(u64::from(subscription)) ^ seq) ^ delivery) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_ids_round_trip_and_made_up_ones_are_refused() {
        let id = format_ack_id(7, 42, 1_700_000_000_000_123);
        assert_eq!(parse_ack_id(&id), Some((7, 42, 1_700_000_000_000_123)));
        for bad in [
            "7-42-1700000000000123",
            "7-42-1700000000000123-00000000",
            "8-42-1700000000000123-".to_owned().as_str(),
            "",
            "x-y-z-w",
        ] {
            assert_eq!(parse_ack_id(bad), None, "{bad}");
        }
        let forged = id.replacen("7-42", "7-43", 1);
        assert_eq!(parse_ack_id(&forged), None);
    }
}
