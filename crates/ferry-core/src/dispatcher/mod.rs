//! One subscription's dispatcher: a task that owns all of the subscription's delivery state.
//!
//! It hands messages to the attached consumers within their flow-control windows (messages due
//! again first, then new ones in sequence order), tracks every delivery until it is acked,
//! nacked, released or its deadline passes, and saves the ack state, failure records and dead
//! letters through the store before it confirms what they change. Being one task, it needs no
//! locks; everything reaches it as a [`Command`] over a bounded channel, or as a change of the
//! channel's durable end or withdrawn sequences.
//!
//! - `queue`: what waits besides new messages (retries, backoffs, messages parked behind
//!   their ordering key);
//! - `settle`: acks, nacks, extensions, failures, dead letters and saving them;
//! - `ack_id`: the ack id format.

mod ack_id;
mod queue;
mod settle;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_store::{
    ChannelLog, Failure, Message, Position, Store, StoreError, SubscriptionId, SubscriptionSettings,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::acks::AckSet;
use crate::dead_letter::{self, Addressee};
use crate::error::CoreError;
use crate::filter::Filter;
use crate::latency::Latencies;
use crate::outbox::{ConsumerEvents, Outbox, RequestGate, outbox};
use crate::retry::Jitter;
use crate::{
    Attached, ConsumerEvent, ConsumerLimits, DamagePolicy, Delivery, Settlement, SubscriptionStats,
    Window,
};
use ack_id::format_ack_id;
#[cfg(fuzzing)]
pub use ack_id::fuzz_ack_id;
pub(crate) use ack_id::subscription_of;
use queue::Queue;

/// How many new messages the dispatcher reads ahead of its consumers at most.
const PREFETCH_MESSAGES: usize = 512;
const PREFETCH_BYTES: usize = 4 << 20;
/// The most payload bytes in one deliveries event (a larger single message goes alone).
const EVENT_BYTES: usize = 1 << 20;
/// The most bytes of messages parked behind their ordering keys that a dispatcher keeps
/// (at their size in memory); it reads no further ahead until some are released.
const PARKED_BYTES: usize = 16 << 20;
/// The most failed messages a dispatcher tracks (each record holds at most 1 KiB of reason
/// text: about 11 MiB); it reads no further ahead until some are acked or dead-lettered, so a
/// consumer that fails everything cannot make it hold the whole backlog's failures.
const MAX_FAILED: usize = 10_000;

/// A request to a dispatcher.
pub(crate) enum Command {
    Attach {
        window: Window,
        reply: oneshot::Sender<Result<(Attached, ConsumerEvents, RequestGate), CoreError>>,
    },
    /// A consumer of a wildcard subscription: delivered into `outbox`, which other
    /// dispatchers share; answered with its id here.
    Join {
        outbox: Outbox,
        reply: oneshot::Sender<Result<u64, CoreError>>,
    },
    Detach {
        consumer: u64,
    },
    Settle {
        consumer: u64,
        ack_ids: Vec<String>,
        settlement: Settlement,
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
    /// New settings; `done` is answered once they are in force.
    Reconfigure {
        settings: SubscriptionSettings,
        done: oneshot::Sender<()>,
    },
    /// Save number `save` is durable, with this ack floor.
    Durable {
        floor: u64,
        save: u64,
    },
    /// Save number `save` failed: what it carried must be sent again.
    SaveFailed {
        save: u64,
    },
    /// Move the subscription; answered with its new ack floor.
    Seek {
        position: Position,
        reply: oneshot::Sender<Result<u64, StoreError>>,
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
    /// The message's `traceparent`, kept only while traced messages are logged.
    traceparent: Option<Box<str>>,
}

struct Consumer {
    /// Its outbox, which also holds its window and what it holds of it.
    outbox: Outbox,
    /// The outbox is shared with the dispatchers of the other channels of a wildcard
    /// subscription: this channel's deletion leaves the consumer attached to the others.
    shared: bool,
    /// Deliveries made this round, sent together, and their heap bytes.
    batch: Vec<Delivery>,
    batch_bytes: usize,
}

impl Consumer {
    fn new(outbox: Outbox, shared: bool) -> Self {
        Self {
            outbox,
            shared,
            batch: Vec::new(),
            batch_bytes: 0,
        }
    }

    /// Takes a message of this size (against the window) and heap size (against the outbox)
    /// for this consumer, if it may have it now.
    fn take(&self, size: u64, heap: usize) -> bool {
        self.outbox.has_room(self.batch_bytes, heap) && self.outbox.try_take(size)
    }
}

/// The bytes a delivery holds while it waits in an outbox.
fn delivery_bytes(delivery: &Delivery) -> usize {
    delivery.message.heap_size() + delivery.ack_id.len() + 48
}

/// What the subscription has done since the broker started, for its figures.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    delivered: u64,
    damaged_skipped: u64,
    redelivered: u64,
    nacked: u64,
    dead_lettered: u64,
    discarded: u64,
    expired: u64,
    filtered: u64,
}

/// A message chosen to go out next.
struct Next {
    /// As stored (what goes back if nobody has room for it).
    stored: Arc<Message>,
    /// As delivered: a redriven message shows its original sequence and publish time.
    view: Arc<Message>,
    attempt: u32,
    /// It came from the queue rather than from the read-ahead.
    from_queue: bool,
    /// It takes its ordering key once handed out.
    ordered: bool,
}

/// The dispatcher's state.
pub(crate) struct Dispatcher {
    id: SubscriptionId,
    name: String,
    /// The channel's name, for deliveries and dead letters' provenance.
    channel: Arc<str>,
    /// Only messages that pass it are delivered.
    filter: Option<(String, Filter)>,
    latencies: Arc<Latencies>,
    log: Arc<ChannelLog>,
    store: Store,
    settings: SubscriptionSettings,
    commands: mpsc::Sender<Command>,
    limits: ConsumerLimits,
    on_damage: DamagePolicy,
    counts: Counts,
    /// Notified by the consumers' outboxes when their streams take events (room appears).
    wake: Arc<Notify>,
    acks: AckSet,
    /// The floor the store has confirmed (what a crash would come back to).
    durable_floor: u64,
    /// New messages read ahead, all unacked and never handed out, from `cursor` on.
    prefetch: VecDeque<Arc<Message>>,
    /// The next sequence to read into `prefetch`.
    cursor: u64,
    in_flight: HashMap<u64, InFlight>,
    /// The deadline of every in-flight delivery, soonest first: exactly one entry per entry of
    /// `in_flight`, so that it holds no more than the windows allow (a lazily cleaned heap
    /// held every acked delivery until its deadline: at 300k acks/s and 30 s, 300 MiB).
    deadlines: BTreeSet<(Instant, u64)>,
    /// Retries, backoffs and messages parked behind their keys.
    queue: Queue,
    /// The messages parked behind their keys, kept so that releasing them reads nothing, and
    /// their bytes in memory.
    parked: HashMap<u64, Arc<Message>>,
    parked_bytes: usize,
    /// The durable failure record of every unacked message that failed before.
    failures: HashMap<u64, Failure>,
    /// What is not known to be durable yet, and the answers that wait for it.
    unsaved: settle::Unsaved,
    withdrawn: watch::Receiver<Arc<[(u64, u64)]>>,
    jitter: Jitter,
    consumers: BTreeMap<u64, Consumer>,
    next_consumer: u64,
    /// Delivery ids start from the clock, so an ack id from before a restart never matches a
    /// delivery made after it.
    next_delivery: u64,
    round_robin: u64,
}

/// What a dispatcher starts from.
pub(crate) struct Start {
    pub id: SubscriptionId,
    pub name: String,
    pub channel: String,
    pub log: Arc<ChannelLog>,
    pub settings: SubscriptionSettings,
    pub acks: AckSet,
    pub failures: Vec<(u64, Failure)>,
    /// Its filter, as given and as parsed.
    pub filter: Option<(String, Filter)>,
    /// Where first deliveries' waits are observed.
    pub latencies: Arc<Latencies>,
}

/// Milliseconds since the Unix epoch now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Dispatcher {
    pub(crate) fn new(
        start: Start,
        store: Store,
        commands: mpsc::Sender<Command>,
        limits: ConsumerLimits,
        on_damage: DamagePolicy,
    ) -> Self {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        let acks = start.acks;
        let withdrawn = start.log.watch_withdrawn();
        let mut dispatcher = Self {
            id: start.id,
            name: start.name,
            channel: start.channel.into(),
            filter: start.filter,
            latencies: start.latencies,
            log: start.log,
            store,
            settings: start.settings,
            commands,
            limits,
            on_damage,
            counts: Counts::default(),
            wake: Arc::new(Notify::new()),
            durable_floor: acks.floor(),
            cursor: acks.floor(),
            acks,
            prefetch: VecDeque::new(),
            in_flight: HashMap::new(),
            deadlines: BTreeSet::new(),
            queue: Queue::default(),
            parked: HashMap::new(),
            parked_bytes: 0,
            failures: HashMap::new(),
            unsaved: settle::Unsaved::default(),
            withdrawn,
            jitter: Jitter::new(epoch ^ u64::from(start.id.0) << 32),
            consumers: BTreeMap::new(),
            next_consumer: 1,
            next_delivery: epoch,
            round_robin: 0,
        };
        for (seq, failure) in start.failures {
            match dispatcher.acks.contains(seq) {
                // Left by a delete that shared a commit with the ack.
                true => dispatcher.unsaved.drop_record(seq),
                false => {
                    dispatcher.failures.insert(seq, failure);
                }
            }
        }
        // What was withdrawn while the broker was down counts as acked.
        dispatcher.fold_withdrawn();
        dispatcher
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
            let wake_at = [
                self.deadlines.first().map(|(at, _)| *at),
                self.queue.next_due(),
                self.unsaved.wake_at(),
            ]
            .into_iter()
            .flatten()
            .min();
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    if let Some(reason) = self.handle(command).await {
                        self.finish(&mut commands, reason);
                        return;
                    }
                    // Take what else is queued before dispatching once for all of it.
                    for _ in 0..64 {
                        match commands.try_recv() {
                            Ok(command) => if let Some(reason) = self.handle(command).await {
                                self.finish(&mut commands, reason);
                                return;
                            },
                            Err(_) => break,
                        }
                    }
                }
                changed = end.changed(), if !self.consumers.is_empty() => {
                    if changed.is_err() {
                        break;
                    }
                }
                Ok(()) = self.withdrawn.changed() => self.fold_withdrawn(),
                _ = tokio::time::sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => {
                    self.expire();
                    self.queue.promote_due(Instant::now());
                }
                _ = self.wake.notified(), if !self.consumers.is_empty() => {}
                _ = stall_check.tick(), if !self.consumers.is_empty() => self.detach_stalled(),
            }
            self.give_up_deferred();
            self.dispatch();
            self.save().await;
        }
        self.stop(CoreError::ShuttingDown);
    }

    /// Handles one command; the reason when the dispatcher must stop.
    async fn handle(&mut self, command: Command) -> Option<CoreError> {
        match command {
            Command::Attach { window, reply } => self.attach(window, reply),
            Command::Join { outbox, reply } => {
                let _ = reply.send(self.join(outbox));
            }
            Command::Detach { consumer } => {
                self.detach(consumer);
            }
            Command::Settle {
                consumer,
                ack_ids,
                settlement,
                reserved,
            } => {
                // A withdrawal (a redrive, a full channel's drop) committed before this ack was
                // sent voids the deliveries it took, even if its news has not been read yet.
                if self.withdrawn.has_changed().unwrap_or(false) {
                    self.fold_withdrawn();
                }
                self.settle(consumer, ack_ids, settlement, reserved)
            }
            Command::SetWindow { consumer, window } => {
                if let Some(c) = self.consumers.get(&consumer) {
                    c.outbox.set_window(window);
                }
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            Command::Reconfigure { settings, done } => {
                self.reconfigure(settings);
                let _ = done.send(());
            }
            Command::Durable { floor, save } => self.durable(floor, save),
            Command::SaveFailed { save } => self.save_failed(save),
            Command::Seek { position, reply } => {
                let _ = reply.send(self.seek(position).await);
            }
            Command::Stop { reason } => return Some(reason),
        }
        None
    }

    /// Stops: what consumers asked that can no longer be done is answered `STALE` (the
    /// deliveries are gone with the subscription), so that no answer stays owed, then every
    /// consumer is let go of.
    fn finish(&mut self, commands: &mut mpsc::Receiver<Command>, reason: CoreError) {
        // Closed first: a request sent from now on fails at its sender, who answers it.
        commands.close();
        while let Ok(command) = commands.try_recv() {
            if let Command::Settle {
                consumer,
                ack_ids,
                settlement,
                reserved,
            } = command
                && let Some(c) = self.consumers.get(&consumer)
            {
                let event = settle::all_stale(settlement.operation(), ack_ids);
                c.outbox.push_reserved(reserved, event);
            }
        }
        for (outbox, reserved, event) in self.unsaved.take_answers() {
            outbox.push_reserved(reserved, settle::stale(event));
        }
        self.stop(reason);
    }

    fn attach(
        &mut self,
        window: Window,
        reply: oneshot::Sender<Result<(Attached, ConsumerEvents, RequestGate), CoreError>>,
    ) {
        if let Err(e) = self.room_for_consumer() {
            let _ = reply.send(Err(e));
            return;
        }
        let (outbox, events) = outbox(self.limits.queue_bytes, window);
        let gate = outbox.gate();
        let id = self.add_consumer(outbox, false);
        let attached = Attached {
            consumer_id: id,
            ack_deadline_ms: self.settings.ack_deadline_ms,
            window,
        };
        let _ = reply.send(Ok((attached, events, gate)));
        tracing::debug!(subscription = %self.name, consumer = id, "consumer attached");
    }

    /// Attaches a wildcard subscription's consumer, whose outbox other dispatchers share.
    fn join(&mut self, outbox: Outbox) -> Result<u64, CoreError> {
        self.room_for_consumer()?;
        let id = self.add_consumer(outbox, true);
        tracing::debug!(subscription = %self.name, consumer = id, "wildcard consumer attached");
        Ok(id)
    }

    fn room_for_consumer(&self) -> Result<(), CoreError> {
        let most = self.limits.max_per_subscription as usize;
        if self.consumers.len() < most {
            return Ok(());
        }
        tracing::warn!(subscription = %self.name, consumers = most, "a consumer was refused: limits.max_consumers_per_subscription reached");
        Err(CoreError::TooManyConsumers {
            subscription: self.name.clone(),
            most,
        })
    }

    fn add_consumer(&mut self, outbox: Outbox, shared: bool) -> u64 {
        let id = self.next_consumer;
        self.next_consumer += 1;
        outbox.join(self.wake.clone());
        self.consumers.insert(id, Consumer::new(outbox, shared));
        id
    }

    /// Lets go of every consumer. A wildcard subscription's consumer outlives the deletion of
    /// one of its channels: it only gets back the window this channel's deliveries held.
    fn stop(&mut self, reason: CoreError) {
        let channel_gone = matches!(reason, CoreError::ChannelNotFound(_));
        for (id, consumer) in std::mem::take(&mut self.consumers) {
            let outbox = consumer.outbox;
            outbox.leave(&self.wake);
            if !(consumer.shared && channel_gone) {
                outbox.close(reason.clone());
                continue;
            }
            let held = self.in_flight.values().filter(|f| f.consumer == id);
            let (messages, bytes) = held.fold((0, 0), |(n, b), f| (n + 1, b + f.bytes));
            outbox.give_back(messages, bytes, &self.wake);
        }
    }

    /// Lets go of a consumer; its deliveries count as failed (`released`) and come back after
    /// the retry policy's wait. Returns its outbox.
    fn detach(&mut self, consumer: u64) -> Option<Outbox> {
        let outbox = self.consumers.remove(&consumer)?.outbox;
        outbox.leave(&self.wake);
        let released: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.consumer == consumer)
            .map(|(&seq, _)| seq)
            .collect();
        for seq in &released {
            self.fail(*seq, settle::Cause::Released, None);
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
            let in_flight = self.consumers[&consumer].outbox.held_messages();
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

    /// Ends a delivery: out of `in_flight`, its deadline and its consumer's window.
    fn take_back(&mut self, seq: u64) -> Option<InFlight> {
        let flight = self.in_flight.remove(&seq)?;
        self.deadlines.remove(&(flight.deadline, seq));
        if let Some(c) = self.consumers.get(&flight.consumer) {
            c.outbox.give_back(1, flight.bytes, &self.wake);
        }
        Some(flight)
    }

    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(&(at, seq)) = self.deadlines.first()
            && at <= now
        {
            self.deadlines.pop_first();
            self.fail(seq, settle::Cause::Deadline, None);
        }
    }

    /// Hands out as many messages as the consumers' windows allow.
    fn dispatch(&mut self) {
        let room = |c: &Consumer| c.outbox.window_fits(0) && c.outbox.has_room(c.batch_bytes, 0);
        if !self.consumers.values().any(room) {
            return;
        }
        while let Some(next) = self.next_message() {
            let seq = next.stored.sequence;
            let size = next.view.size() as u64;
            let Some(consumer) = self.pick_consumer(size, next.view.heap_size()) else {
                // Nobody has room for it now: put it back where it came from.
                match next.from_queue {
                    true => self.queue.ready(seq),
                    false => self.prefetch.push_front(next.stored),
                }
                break;
            };
            if next.ordered {
                self.queue.hold(seq, &next.view.key);
            }
            let delivery = self.next_delivery;
            self.next_delivery += 1;
            let deadline = Instant::now() + Duration::from_millis(self.settings.ack_deadline_ms);
            let traceparent = self.traced(&next.view, consumer, next.attempt);
            self.in_flight.insert(
                seq,
                InFlight {
                    consumer,
                    delivery,
                    attempt: next.attempt,
                    deadline,
                    bytes: size,
                    traceparent,
                },
            );
            self.deadlines.insert((deadline, seq));
            self.counts.delivered += 1;
            if next.attempt > 1 {
                self.counts.redelivered += 1;
            } else {
                let waited_ms = now_ms().saturating_sub(next.view.publish_time_ms);
                self.latencies.delivery.observe(waited_ms as f64 / 1000.0);
            }
            let c = self.consumers.get_mut(&consumer).expect("picked");
            let delivery = Delivery {
                ack_id: format_ack_id(self.id.0, seq, delivery),
                channel: self.channel.clone(),
                message: next.view,
                attempt: next.attempt,
            };
            c.batch_bytes += delivery_bytes(&delivery);
            c.batch.push(delivery);
        }
        self.flush_batches();
    }

    /// Logs the delivery of a message that carries a `traceparent`, when traced messages are
    /// logged; returns the traceparent, for the log line of its settlement.
    fn traced(&self, message: &Message, consumer: u64, attempt: u32) -> Option<Box<str>> {
        if !crate::tracing_messages() {
            return None;
        }
        let traceparent = message.attributes.get(crate::TRACEPARENT)?;
        tracing::debug!(
            target: crate::TRACE_TARGET,
            channel = %self.channel,
            subscription = %self.name,
            sequence = message.sequence,
            attempt,
            consumer,
            traceparent,
            "delivered"
        );
        Some(traceparent.into())
    }

    /// The next message to hand out: those due again first, then new ones.
    fn next_message(&mut self) -> Option<Next> {
        while let Some(seq) = self.queue.pop_ready() {
            if self.acks.contains(seq) {
                self.forget(seq);
                continue;
            }
            let kept = self.unpark(seq);
            let stored = match kept.map_or_else(|| self.read_one(seq), |m| Ok(Some(m))) {
                Ok(Some(stored)) => stored,
                Ok(None) => continue,
                Err(()) => {
                    self.queue.ready(seq);
                    return None;
                }
            };
            if let Some(next) = self.admit(stored, true) {
                return Some(next);
            }
        }
        loop {
            let holding = self.queue.parked_full()
                || self.parked_bytes >= PARKED_BYTES
                || self.failures.len() >= MAX_FAILED;
            if holding {
                return None;
            }
            let Some(stored) = self.prefetch.pop_front() else {
                if !self.read_ahead() {
                    return None;
                }
                continue;
            };
            if self.acks.contains(stored.sequence) {
                continue;
            }
            if let Some(next) = self.admit(stored, false) {
                return Some(next);
            }
        }
    }

    /// Decides whether a message goes out now: a message redriven to another subscription
    /// counts as acked, one whose key is held waits parked behind it, and one whose backoff
    /// (recorded before a restart) has not ended waits for it.
    fn admit(&mut self, stored: Arc<Message>, from_queue: bool) -> Option<Next> {
        let seq = stored.sequence;
        let view = match dead_letter::addressee(&stored, &self.name) {
            Addressee::Everyone => stored.clone(),
            Addressee::Redriven(view) => view,
            Addressee::Other => {
                self.acks.insert(seq);
                self.forget(seq);
                self.unsaved.dirty = true;
                return None;
            }
        };
        if let Some((_, filter)) = &self.filter
            && !filter.matches(&view)
        {
            // Not for this subscription: acked at once, never delivered.
            self.acks.insert(seq);
            self.forget(seq);
            self.counts.filtered += 1;
            self.unsaved.dirty = true;
            return None;
        }
        if dead_letter::expire_at(&view).is_some_and(|at| at <= now_ms()) {
            self.expired(seq);
            return None;
        }
        // Redriven messages skip ordering: their key's later messages went on without them.
        let ordered = self.settings.ordering && !view.key.is_empty() && Arc::ptr_eq(&view, &stored);
        if ordered && self.queue.park_if_held(seq, &view.key) {
            self.parked_bytes += stored.heap_size();
            self.parked.insert(seq, stored);
            return None;
        }
        let failure = self.failures.get(&seq);
        if let Some(failure) = failure {
            let now = now_ms();
            if failure.retry_at_ms > now + 5 {
                let wait = Duration::from_millis(failure.retry_at_ms - now);
                self.queue.retry_at(seq, Instant::now() + wait);
                return None;
            }
        }
        let attempt = failure.map_or(0, |f| f.count).saturating_add(1);
        Some(Next {
            stored,
            view,
            attempt,
            from_queue,
            ordered,
        })
    }

    /// Takes back a parked message's copy, if it was kept.
    fn unpark(&mut self, seq: u64) -> Option<Arc<Message>> {
        let message = self.parked.remove(&seq)?;
        self.parked_bytes -= message.heap_size();
        Some(message)
    }

    /// Reads one message to deliver again: `Ok(None)` if it is gone (lost to damage, or no
    /// longer stored), `Err` if it cannot be read now.
    fn read_one(&mut self, seq: u64) -> Result<Option<Arc<Message>>, ()> {
        match self.log.get(seq) {
            Ok(Some(message)) => Ok(Some(message)),
            Ok(None) => {
                tracing::warn!(subscription = %self.name, seq, "unacked message is no longer stored");
                self.forget(seq);
                Ok(None)
            }
            Err(StoreError::Damaged {
                first_seq, end_seq, ..
            }) if self.on_damage == DamagePolicy::Skip => {
                self.skip_damaged(first_seq..end_seq);
                Ok(None)
            }
            Err(e) => {
                tracing::error!(subscription = %self.name, seq, error = %e, "cannot read message");
                Err(())
            }
        }
    }

    /// Reads more new messages; false if there are none (or they cannot be read now).
    fn read_ahead(&mut self) -> bool {
        self.cursor = self.acks.next_unacked(self.cursor);
        match self
            .log
            .read(self.cursor, PREFETCH_MESSAGES, PREFETCH_BYTES)
        {
            Ok(messages) if messages.is_empty() => false,
            Ok(messages) => {
                self.cursor = messages.last().map_or(self.cursor, |m| m.sequence + 1);
                self.prefetch.extend(messages);
                true
            }
            Err(StoreError::Damaged {
                first_seq, end_seq, ..
            }) if self.on_damage == DamagePolicy::Skip => {
                self.skip_damaged(first_seq..end_seq);
                true
            }
            // The log reported the damage; with the stop policy nothing goes past it.
            Err(StoreError::Damaged { .. }) => false,
            Err(e) => {
                tracing::error!(subscription = %self.name, error = %e, "cannot read messages");
                false
            }
        }
    }

    /// Goes past a damaged record: its messages are lost, so they count as acked for this
    /// subscription (else its ack floor, and collection, would stop there for good).
    fn skip_damaged(&mut self, range: std::ops::Range<u64>) {
        let skipped = self.acks.insert_range(range.clone());
        self.counts.damaged_skipped += skipped;
        self.forget_where(|seq| range.contains(&seq));
        self.cursor = self.cursor.max(range.end);
        tracing::warn!(
            subscription = %self.name,
            first = range.start,
            last = range.end - 1,
            skipped,
            "skipped the messages of a damaged record"
        );
        self.unsaved.dirty = true;
    }

    /// The next consumer, in turn, with room for a message of this size; it takes the room.
    fn pick_consumer(&mut self, size: u64, heap: usize) -> Option<u64> {
        let start = self.round_robin;
        let found = self
            .consumers
            .range(start..)
            .chain(self.consumers.range(..start))
            .find(|(_, c)| c.take(size, heap))
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
        let (keys_blocked, parked) = self.queue.blocked();
        let unsaved = self.unsaved.retries_waiting();
        SubscriptionStats {
            name: self.name.clone(),
            filter: self
                .filter
                .as_ref()
                .map(|(text, _)| text.clone())
                .unwrap_or_default(),
            filtered: self.counts.filtered,
            channels: Vec::new(),
            settings: self.settings,
            dead_letter_channel: None,
            backlog: end.saturating_sub(undelivered_from)
                + (self.queue.ready_len() + parked) as u64,
            in_flight: self.in_flight.len() as u64,
            acked: self.acks.total(),
            unacked: end
                .saturating_sub(floor)
                .saturating_sub(self.acks.acked_above_floor()),
            oldest_unacked_publish_time_ms: oldest,
            consumers: self.consumers.len() as u32,
            damaged_skipped: self.counts.damaged_skipped,
            ack_floor: self.durable_floor,
            delivered: self.counts.delivered,
            redelivered: self.counts.redelivered,
            nacked: self.counts.nacked,
            dead_lettered: self.counts.dead_lettered,
            discarded: self.counts.discarded,
            expired: self.counts.expired,
            waiting_retry: (self.queue.backoff_len() + unsaved) as u64,
            keys_blocked: keys_blocked as u64,
        }
    }
}
