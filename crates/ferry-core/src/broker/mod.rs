//! The broker: the registry of channels and subscriptions, publishing, attaching consumers, and
//! administration. It owns the store handle and one dispatcher task per subscription.

mod derived;
mod derived_wildcard;
mod plan;
mod redrive;
mod wildcard;

pub use plan::{Action, Step};
pub use redrive::{RedriveOutcome, RedriveSelection};

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ferry_store::{
    Appended, ChannelId, ChannelLog, Confirmation, NewMessage, RecoveredSubscription, Store,
    StoreCounters, StoreError, SubscriptionId,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::acks::AckSet;
use crate::dispatcher::{Command, Dispatcher, Start};
use crate::error::{CoreError, Result};
use crate::filter::Filter;
use crate::latency::Latencies;
use crate::outbox::{ConsumerEvents, RequestGate, answer_bytes};
use crate::pattern::Pattern;
use crate::{
    Attached, BrokerOptions, ChannelDecl, ChannelInfo, ChannelSettings, ConsumerLimits,
    DamagePolicy, Limits, MAX_NACK_DELAY, Point, Position, Settlement, SpaceReport,
    SubscriptionSettings, SubscriptionStats, Window, names,
};

/// The longest a channel may keep acked messages by age (100 years: "forever" is 0 with a
/// size bound, or a very long age).
const MAX_RETENTION_AGE_MS: u64 = 100 * 365 * 86_400_000;

/// Checks a retention; the error names the field.
fn check_channel(settings: &ChannelSettings) -> Result<()> {
    if settings.retention.max_age_ms > MAX_RETENTION_AGE_MS {
        return Err(CoreError::InvalidArgument(format!(
            "retention.max_age is {} ms: at most 100 years",
            settings.retention.max_age_ms
        )));
    }
    if settings.dedup_window_ms > MAX_DEDUP_WINDOW_MS {
        return Err(CoreError::InvalidArgument(format!(
            "dedup_window is {} ms: at most 7 days (0 turns de-duplication off)",
            settings.dedup_window_ms
        )));
    }
    Ok(())
}

/// The longest de-duplication window.
const MAX_DEDUP_WINDOW_MS: u64 = 7 * 86_400_000;

/// How many commands may wait for a dispatcher before senders wait.
const COMMAND_QUEUE: usize = 1024;

/// The broker core; cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    limits: Limits,
    consumer_limits: ConsumerLimits,
    on_damage: DamagePolicy,
    channels: RwLock<BTreeMap<String, Arc<ChannelShared>>>,
    /// Serialises creations and deletions so that the registry and the store always agree.
    admin: tokio::sync::Mutex<()>,
    dispatchers: Mutex<Vec<JoinHandle<()>>>,
    /// Latency histograms, for the metrics endpoint.
    latencies: Arc<Latencies>,
    /// Running derived channels, by (source, target).
    derived: Mutex<BTreeMap<(String, String), derived::DerivedHandle>>,
    /// Derived channels from patterns, by (pattern, target); their members are in `derived`.
    derived_patterns: Mutex<BTreeMap<(String, String), Arc<derived_wildcard::PatternDerived>>>,
    /// Wildcard subscriptions, by (pattern, name).
    wildcards: RwLock<BTreeMap<(String, String), Arc<wildcard::Wildcard>>>,
    closing: AtomicBool,
}

/// What the broker knows of one channel.
struct ChannelShared {
    id: ChannelId,
    name: String,
    settings: Mutex<ChannelSettings>,
    log: Arc<ChannelLog>,
    subscriptions: RwLock<BTreeMap<String, Arc<SubscriptionHandle>>>,
}

struct SubscriptionHandle {
    id: SubscriptionId,
    commands: mpsc::Sender<Command>,
    settings: Mutex<ferry_store::SubscriptionSettings>,
    /// Its filter's text ("": none); it never changes.
    filter: String,
}

impl ChannelShared {
    /// Whether its retention keeps acked messages (what it keeps is counted from sled's index).
    fn retains(&self) -> bool {
        self.settings
            .lock()
            .expect("settings lock")
            .retention
            .keeps()
    }

    fn subscription(&self, name: &str) -> Result<Arc<SubscriptionHandle>> {
        self.subscriptions
            .read()
            .expect("subscriptions lock")
            .get(name)
            .cloned()
            .ok_or_else(|| CoreError::SubscriptionNotFound {
                channel: self.name.clone(),
                name: name.to_owned(),
            })
    }

    /// The subscriptions now, so that no lock is held while talking to them.
    fn handles(&self) -> Vec<Arc<SubscriptionHandle>> {
        let subscriptions = self.subscriptions.read().expect("subscriptions lock");
        subscriptions.values().cloned().collect()
    }
}

/// A batch checked for its channel and ready to be queued ([`Broker::submit_publishes`]).
pub struct PreparedPublish {
    channel: Arc<ChannelShared>,
    messages: Vec<NewMessage>,
    traced: Vec<(usize, String)>,
    /// Its messages' size, as the limits and the store's queue count them.
    bytes: usize,
}

impl PreparedPublish {
    /// Its messages' size, as the limits and the store's queue count them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// A publish the store has queued; resolves once it is durable.
pub struct PublishConfirmation {
    confirmation: Confirmation<Appended>,
    channel: Arc<ChannelShared>,
    submitted: std::time::Instant,
    latencies: Arc<Latencies>,
    /// The messages that carry a `traceparent` (their index in the batch and its value), when
    /// traced messages are logged.
    traced: Vec<(usize, String)>,
}

impl PublishConfirmation {
    /// Waits until the batch is durable; returns the sequences it got (a duplicate's is its
    /// original's).
    pub async fn confirmed(self) -> Result<Appended> {
        let span = tracing::debug_span!(target: crate::TRACE_TARGET, "publish", channel = %self.channel.name);
        tracing::Instrument::instrument(self.confirm(), span).await
    }

    async fn confirm(self) -> Result<Appended> {
        let appended = self.confirmation.confirmed().await.map_err(|e| match e {
            StoreError::ChannelNotFound => CoreError::ChannelNotFound(self.channel.name.clone()),
            e => e.into(),
        })?;
        (self.latencies.publish).observe(self.submitted.elapsed().as_secs_f64());
        if !self.traced.is_empty() {
            let sequences = appended.sequences();
            for (index, traceparent) in &self.traced {
                let sequence = sequences.get(*index).copied().unwrap_or(0);
                tracing::debug!(target: crate::TRACE_TARGET, channel = %self.channel.name, sequence, traceparent, "published");
            }
        }
        Ok(appended)
    }
}

/// A consumer's side of its attachment: acks, nacks, extensions and window changes go through
/// it. Clones share the attachment; when the last one is dropped the consumer is detached, which
/// releases its unacked deliveries at once.
#[derive(Clone)]
pub struct ConsumerHandle {
    link: Link,
}

#[derive(Clone)]
enum Link {
    /// To a subscription's dispatcher.
    One(Arc<Attachment>),
    /// To every member of a wildcard subscription.
    Wildcard(Arc<wildcard::Joined>),
}

struct Attachment {
    consumer: u64,
    commands: mpsc::Sender<Command>,
    gate: RequestGate,
}

impl ConsumerHandle {
    /// Acks, nacks or extends deliveries; the outcome comes back as
    /// [`ConsumerEvent::Results`](crate::ConsumerEvent::Results). Waits first while the
    /// consumer's outbox is full of answers it has not read (see [`crate::outbox`]).
    pub async fn settle(&self, ack_ids: Vec<String>, settlement: Settlement) -> Result<()> {
        if let Settlement::Nack(nack) = &settlement
            && nack.delay.is_some_and(|d| d > MAX_NACK_DELAY)
        {
            return Err(CoreError::InvalidArgument(format!(
                "a nack's delay may be at most {} s",
                MAX_NACK_DELAY.as_secs()
            )));
        }
        let attachment = match &self.link {
            Link::One(attachment) => attachment,
            Link::Wildcard(joined) => return joined.settle(ack_ids, settlement).await,
        };
        let gate = &attachment.gate;
        if !gate.room_for_requests().await {
            return Err(CoreError::ConsumerDetached);
        }
        // The answer (one result per id) counts against the consumer's outbox from the moment
        // the request is read, so that neither the dispatcher's queue nor answers waiting for
        // their commit grow with what a client sends.
        let reserved = answer_bytes(&ack_ids);
        gate.reserve(reserved);
        let command = Command::Settle {
            consumer: attachment.consumer,
            ack_ids,
            settlement,
            reserved,
        };
        attachment.commands.send(command).await.map_err(|_| {
            gate.release(reserved);
            CoreError::ShuttingDown
        })
    }

    /// Changes the consumer's window (zeros take the defaults).
    pub async fn set_window(&self, window: Window) -> Result<()> {
        let window = window.with_defaults()?;
        let attachment = match &self.link {
            Link::One(attachment) => attachment,
            Link::Wildcard(joined) => {
                joined.set_window(window);
                return Ok(());
            }
        };
        let command = Command::SetWindow {
            consumer: attachment.consumer,
            window,
        };
        attachment
            .commands
            .send(command)
            .await
            .map_err(|_| CoreError::ShuttingDown)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        detach(&self.commands, self.consumer);
    }
}

/// Tells a dispatcher a consumer left, from a `Drop`: it cannot wait for room in the queue.
fn detach(commands: &mpsc::Sender<Command>, consumer: u64) {
    let detach = Command::Detach { consumer };
    if let Err(mpsc::error::TrySendError::Full(detach)) = commands.try_send(detach) {
        // The detach must not be lost, or the deliveries would wait for their deadlines.
        let commands = commands.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = commands.send(detach).await;
            });
        }
    }
}

impl Broker {
    /// Opens the store in `dir`, recovers every channel and subscription, and starts their
    /// dispatchers. Must run inside a tokio runtime.
    pub async fn open(dir: &Path, options: BrokerOptions) -> Result<Broker> {
        let dir = dir.to_owned();
        let latencies = Arc::new(Latencies::default());
        let store_options = ferry_store::StoreOptions {
            // Messages dropped from full channels are dead-lettered in the broker's format.
            dead_letter: Some(crate::dead_letter::dropped),
            observer: Some(latencies.clone()),
            ..options.store.clone()
        };
        let (store, recovered) =
            tokio::task::spawn_blocking(move || ferry_store::Store::open(&dir, store_options))
                .await
                .map_err(|e| CoreError::Storage(StoreError::Backend(e.to_string())))??;
        let broker = Broker {
            inner: Arc::new(Inner {
                store,
                limits: options.limits,
                consumer_limits: options.consumers,
                on_damage: options.on_damage,
                channels: RwLock::new(BTreeMap::new()),
                admin: tokio::sync::Mutex::new(()),
                dispatchers: Mutex::new(Vec::new()),
                latencies,
                derived: Mutex::new(BTreeMap::new()),
                derived_patterns: Mutex::new(BTreeMap::new()),
                wildcards: RwLock::new(BTreeMap::new()),
                closing: AtomicBool::new(false),
            }),
        };
        let mut by_id = HashMap::new();
        for channel in recovered.channels {
            let shared = broker.register_channel(channel.id, channel.name, channel.settings)?;
            by_id.insert(channel.id, shared);
        }
        let (mut members, mut derived_members) = (Vec::new(), Vec::new());
        for sub in recovered.subscriptions {
            let channel = by_id.get(&sub.channel).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "subscription {:?} names a missing channel",
                    sub.name
                ))
            })?;
            if derived_wildcard::member_of(&sub.name).is_some() {
                derived_members.push((channel.clone(), sub));
            } else if sub.name.starts_with(crate::derive::PREFIX) {
                broker.start_derived(channel, sub, &by_id);
            } else if wildcard::member_of(&sub.name).is_some() {
                members.push((channel.clone(), sub));
            } else {
                broker.start_subscription(channel, sub);
            }
        }
        broker
            .recover_wildcards(&recovered.catalog, members)
            .await?;
        broker
            .recover_derived_patterns(&recovered.catalog, derived_members, &by_id)
            .await?;
        Ok(broker)
    }

    /// A channel as the broker keeps it, not yet findable by name.
    fn channel_shared(
        &self,
        id: ChannelId,
        name: String,
        settings: ChannelSettings,
    ) -> Result<Arc<ChannelShared>> {
        let log = self.inner.store.log(id)?;
        Ok(Arc::new(ChannelShared {
            id,
            name,
            settings: Mutex::new(settings),
            log,
            subscriptions: RwLock::new(BTreeMap::new()),
        }))
    }

    fn register_channel(
        &self,
        id: ChannelId,
        name: String,
        settings: ChannelSettings,
    ) -> Result<Arc<ChannelShared>> {
        let shared = self.channel_shared(id, name, settings)?;
        self.publish_channel(&shared);
        Ok(shared)
    }

    /// Makes a channel findable by name: from now on it may be published to.
    fn publish_channel(&self, shared: &Arc<ChannelShared>) {
        let mut channels = self.inner.channels.write().expect("channels lock");
        channels.insert(shared.name.clone(), shared.clone());
    }

    /// Starts the dispatcher of a subscription, as the store holds it.
    fn start_subscription(&self, channel: &Arc<ChannelShared>, sub: RecoveredSubscription) {
        let (id, name, settings) = (sub.id, sub.name, sub.settings);
        // Checked when the subscription was created; a stored filter that no longer parses
        // (a newer broker's syntax) stops nothing: it is logged and the subscription unfiltered.
        let filter = match sub.filter.as_str() {
            "" => None,
            text => Filter::parse(text)
                .inspect_err(|e| {
                    tracing::error!(subscription = %name, filter = text, error = %e, "stored filter does not parse: delivering everything");
                })
                .ok(),
        };
        let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
        let start = Start {
            id,
            name: name.clone(),
            channel: channel.name.clone(),
            log: channel.log.clone(),
            settings,
            acks: AckSet::from_state(&sub.acks),
            failures: sub.failures,
            filter: filter.map(|f| (sub.filter.clone(), f)),
            latencies: self.inner.latencies.clone(),
        };
        let dispatcher = Dispatcher::new(
            start,
            self.inner.store.clone(),
            commands.clone(),
            self.inner.consumer_limits,
            self.inner.on_damage,
        );
        // Its log lines (a traced message's delivery and settlement among them) carry it.
        let span = tracing::debug_span!(target: crate::TRACE_TARGET, "subscription", channel = %channel.name, subscription = %name);
        let task = tokio::spawn(tracing::Instrument::instrument(dispatcher.run(rx), span));
        let handle = Arc::new(SubscriptionHandle {
            id,
            commands,
            settings: Mutex::new(settings),
            filter: sub.filter,
        });
        channel
            .subscriptions
            .write()
            .expect("subscriptions lock")
            .insert(name, handle);
        let mut dispatchers = self.inner.dispatchers.lock().expect("dispatchers lock");
        dispatchers.retain(|task| !task.is_finished());
        dispatchers.push(task);
    }

    fn channel(&self, name: &str) -> Result<Arc<ChannelShared>> {
        self.inner
            .channels
            .read()
            .expect("channels lock")
            .get(name)
            .cloned()
            .ok_or_else(|| CoreError::ChannelNotFound(name.to_owned()))
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closing.load(Ordering::Acquire) {
            return Err(CoreError::ShuttingDown);
        }
        Ok(())
    }

    /// Creates the declared channels and subscriptions that do not exist, and applies changed
    /// settings to those that do. Nothing is deleted: what the config no longer names stays.
    /// Channels come first, so that a subscription may name a dead-letter channel declared
    /// after it.
    pub async fn declare(&self, channels: &[ChannelDecl]) -> Result<()> {
        for decl in channels {
            if crate::pattern::Pattern::is_pattern(&decl.name) {
                // Declares wildcard subscriptions only (below).
                continue;
            }
            match self.create_channel(&decl.name, decl.settings).await {
                Ok(_) => {}
                Err(CoreError::ChannelExists(_)) => {
                    self.update_channel(&decl.name, decl.settings).await?;
                }
                Err(e) => return Err(e),
            }
        }
        for decl in channels {
            for sub in &decl.subscriptions {
                match self
                    .create_subscription(&decl.name, &sub.name, sub.settings.clone(), Point::Latest)
                    .await
                {
                    Ok(_) => {}
                    Err(CoreError::SubscriptionExists { .. }) => {
                        self.update_subscription(&decl.name, &sub.name, sub.settings.clone())
                            .await?
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Turns settings as clients give them into settings as stored: checks them and resolves
    /// the dead-letter channel, which must exist and be another channel.
    fn resolve(
        &self,
        channel: &ChannelShared,
        settings: &SubscriptionSettings,
    ) -> Result<ferry_store::SubscriptionSettings> {
        self.resolve_for(settings, |name| {
            (name == channel.name).then(|| {
                format!(
                    "dead_letter_channel {name:?} is the subscription's own channel: a message \
                     that keeps failing would come back to it; name another channel"
                )
            })
        })
    }

    /// Checks settings and resolves their dead-letter channel, which must exist and which
    /// `refuse` has no objection to (it says what the objection is).
    fn resolve_for(
        &self,
        settings: &SubscriptionSettings,
        refuse: impl Fn(&str) -> Option<String>,
    ) -> Result<ferry_store::SubscriptionSettings> {
        crate::check_settings(settings)?;
        let dead_letter = match &settings.dead_letter_channel {
            None => None,
            Some(name) => {
                if let Some(objection) = refuse(name) {
                    return Err(CoreError::FailedPrecondition(objection));
                }
                let channel = self.channel(name);
                Some(
                    channel
                        .map_err(|_| CoreError::DeadLetterChannelNotFound(name.clone()))?
                        .id,
                )
            }
        };
        Ok(ferry_store::SubscriptionSettings {
            ack_deadline_ms: settings.ack_deadline_ms,
            retry: settings.retry,
            max_delivery_attempts: settings.max_delivery_attempts,
            dead_letter,
            ordering: settings.ordering,
        })
    }

    /// The name of the channel with this id.
    fn channel_name(&self, id: ChannelId) -> Option<String> {
        let channels = self.inner.channels.read().expect("channels lock");
        channels
            .values()
            .find(|c| c.id == id)
            .map(|c| c.name.clone())
    }

    /// Checks a batch for `channel` and gets it ready to be queued: what
    /// [`Broker::submit_publish`] refuses, this refuses.
    pub fn prepare_publish(
        &self,
        channel: &str,
        messages: Vec<NewMessage>,
    ) -> Result<PreparedPublish> {
        self.check_open()?;
        let shared = self.channel(channel)?;
        let bytes = self.inner.limits.check_batch(&messages)?;
        let ttl = shared
            .settings
            .lock()
            .expect("settings lock")
            .default_ttl_ms;
        let messages = match ttl {
            0 => messages,
            ttl => with_default_ttl(messages, ttl),
        };
        let traced = match crate::tracing_messages() {
            true => (messages.iter().enumerate())
                .filter_map(|(i, m)| Some((i, m.attributes.get(crate::TRACEPARENT)?.to_owned())))
                .collect(),
            false => Vec::new(),
        };
        Ok(PreparedPublish {
            channel: shared,
            messages,
            traced,
            bytes,
        })
    }

    /// Queues a batch for `channel`; the confirmation resolves once it is durable. Batches
    /// queued one after another from one task get increasing sequences in that order.
    pub async fn submit_publish(
        &self,
        channel: &str,
        messages: Vec<NewMessage>,
    ) -> Result<PublishConfirmation> {
        self.submit_prepared(self.prepare_publish(channel, messages)?)
            .await
    }

    /// Queues a prepared batch; the confirmation resolves once it is durable.
    pub async fn submit_prepared(&self, publish: PreparedPublish) -> Result<PublishConfirmation> {
        let submitted = std::time::Instant::now();
        let confirmation = (self.inner.store)
            .submit_append(publish.channel.id, publish.messages)
            .await?;
        Ok(self.confirmation(publish.channel, publish.traced, confirmation, submitted))
    }

    /// Queues prepared batches together, in order: they reach the store's writer at once and
    /// share a commit (one device sync), where queued one by one the writer could start a
    /// commit with the first alone. Each keeps its own confirmation.
    pub async fn submit_publishes(
        &self,
        publishes: Vec<PreparedPublish>,
    ) -> Result<Vec<PublishConfirmation>> {
        self.check_open()?;
        let submitted = std::time::Instant::now();
        let mut owners = Vec::with_capacity(publishes.len());
        let appends = (publishes.into_iter())
            .map(|publish| {
                let id = publish.channel.id;
                owners.push((publish.channel, publish.traced));
                (id, publish.messages)
            })
            .collect();
        let confirmations = self.inner.store.submit_appends(appends).await?;
        Ok((owners.into_iter().zip(confirmations))
            .map(|((channel, traced), confirmation)| {
                self.confirmation(channel, traced, confirmation, submitted)
            })
            .collect())
    }

    fn confirmation(
        &self,
        channel: Arc<ChannelShared>,
        traced: Vec<(usize, String)>,
        confirmation: ferry_store::Confirmation<Appended>,
        submitted: std::time::Instant,
    ) -> PublishConfirmation {
        PublishConfirmation {
            confirmation,
            channel,
            submitted,
            latencies: self.inner.latencies.clone(),
            traced,
        }
    }

    /// Publishes a batch and waits until it is durable; returns the sequences assigned.
    pub async fn publish(&self, channel: &str, messages: Vec<NewMessage>) -> Result<Appended> {
        self.submit_publish(channel, messages)
            .await?
            .confirmed()
            .await
    }

    /// Attaches a consumer to a subscription. Events (deliveries, ack results, the end) come on
    /// the receiver; the handle sends acks. The window's zeros are replaced by defaults.
    pub async fn attach(
        &self,
        channel: &str,
        subscription: &str,
        window: Window,
    ) -> Result<(ConsumerHandle, ConsumerEvents, Attached)> {
        self.check_open()?;
        let window = window.with_defaults()?;
        if Pattern::is_pattern(channel) {
            return self.attach_wildcard(channel, subscription, window).await;
        }
        own(channel, subscription)?;
        let handle = self.channel(channel)?.subscription(subscription)?;
        let (reply, attached) = oneshot::channel();
        handle
            .commands
            .send(Command::Attach { window, reply })
            .await
            .map_err(|_| CoreError::ShuttingDown)?;
        let (attached, events, gate) = attached.await.map_err(|_| CoreError::ShuttingDown)??;
        let attachment = Attachment {
            consumer: attached.consumer_id,
            commands: handle.commands.clone(),
            gate,
        };
        let consumer = ConsumerHandle {
            link: Link::One(Arc::new(attachment)),
        };
        Ok((consumer, events, attached))
    }

    /// Creates a channel.
    pub async fn create_channel(
        &self,
        name: &str,
        settings: ChannelSettings,
    ) -> Result<ChannelInfo> {
        self.check_open()?;
        names::validate("channel", name)?;
        check_channel(&settings)?;
        let _admin = self.inner.admin.lock().await;
        if self.channel(name).is_ok() {
            return Err(CoreError::ChannelExists(name.to_owned()));
        }
        let id = self
            .inner
            .store
            .create_channel(name.to_owned(), settings)
            .await
            .map_err(|e| match e {
                StoreError::ChannelExists(name) => CoreError::ChannelExists(name),
                e => e.into(),
            })?;
        let shared = self.channel_shared(id, name.to_owned(), settings)?;
        // Before anything can be published to it: the wildcard subscriptions and derived
        // channels that match it get its every message.
        let members = match self.add_members(&shared).await {
            Ok(()) => self.add_derived_members(&shared).await,
            failed => failed,
        };
        if let Err(e) = members {
            // A channel some pattern does not read would lose it messages for good: it is
            // not created (the client may try again). Only if even that cannot be undone does
            // it stay, its missing members made at the next start.
            match self.inner.store.delete_channel(id).await {
                Ok(()) => {
                    self.forget_channel(&shared).await;
                    tracing::warn!(channel = name, error = %e, "channel not created: a pattern's member on it could not be made");
                    return Err(e);
                }
                Err(undo) => {
                    tracing::error!(channel = name, error = %e, undo = %undo, "a pattern's member on a new channel could not be made, nor the channel undone: the member is made at the next start");
                }
            }
        }
        self.publish_channel(&shared);
        tracing::info!(channel = name, ?settings, "channel created");
        self.channel_info(name).await
    }

    /// Changes a channel's settings (retention, de-duplication window).
    pub async fn update_channel(
        &self,
        name: &str,
        settings: ChannelSettings,
    ) -> Result<ChannelInfo> {
        self.check_open()?;
        check_channel(&settings)?;
        let _admin = self.inner.admin.lock().await;
        let shared = self.channel(name)?;
        if *shared.settings.lock().expect("settings lock") != settings {
            self.inner.store.update_channel(shared.id, settings).await?;
            *shared.settings.lock().expect("settings lock") = settings;
            tracing::info!(channel = name, ?settings, "channel updated");
        }
        drop(_admin);
        self.channel_info(name).await
    }

    /// Deletes a channel with its messages and subscriptions; their consumers are disconnected.
    pub async fn delete_channel(&self, name: &str) -> Result<()> {
        self.check_open()?;
        let _admin = self.inner.admin.lock().await;
        let shared = self.channel(name)?;
        if let Some(source) = self.pattern_derived_into(name) {
            return Err(CoreError::FailedPrecondition(format!(
                "channel {name:?} is the target of the channel derived from {source:?}: delete \
                 that derived channel (ListDerived shows it) first"
            )));
        }
        if let Some((pattern, subscription)) = self.wildcard_dead_letter_user(shared.id) {
            return Err(in_use_by_wildcard(name, &pattern, &subscription));
        }
        self.inner
            .store
            .delete_channel(shared.id)
            .await
            .map_err(|e| match e {
                StoreError::ChannelInUse(subscription)
                    if subscription.starts_with(crate::derive::PREFIX) =>
                {
                    CoreError::FailedPrecondition(format!(
                        "channel {name:?} is the target of a derived channel: delete the derived \
                         channel (ListDerived shows it) first"
                    ))
                }
                StoreError::ChannelInUse(member) if wildcard::member_of(&member).is_some() => {
                    let (pattern, subscription) = wildcard::member_of(&member).expect("checked");
                    in_use_by_wildcard(name, pattern, subscription)
                }
                StoreError::ChannelInUse(subscription) => CoreError::FailedPrecondition(format!(
                    "channel {name:?} is the dead-letter channel of subscription \
                     {subscription:?}: give that subscription another dead-letter channel, or \
                     delete it, first"
                )),
                e => e.into(),
            })?;
        self.forget_channel(&shared).await;
        tracing::info!(channel = name, "channel deleted");
        Ok(())
    }

    /// Forgets a channel the store deleted: its derived channels and pattern members stop,
    /// and its subscriptions' consumers are disconnected.
    async fn forget_channel(&self, shared: &ChannelShared) {
        let name = shared.name.as_str();
        self.stop_derived_from(name);
        self.forget_members(name);
        (self.inner.channels.write().expect("channels lock")).remove(name);
        let subscriptions =
            std::mem::take(&mut *shared.subscriptions.write().expect("subscriptions lock"));
        for handle in subscriptions.values() {
            let reason = CoreError::ChannelNotFound(name.to_owned());
            let _ = handle.commands.send(Command::Stop { reason }).await;
        }
    }

    /// Describes a channel and its subscriptions.
    pub async fn channel_info(&self, name: &str) -> Result<ChannelInfo> {
        let shared = self.channel(name)?;
        if shared.retains() {
            self.inner.store.catch_up().await;
        }
        self.describe(&shared).await
    }

    /// Describes every channel, by name.
    pub async fn list_channels(&self) -> Vec<ChannelInfo> {
        let channels: Vec<Arc<ChannelShared>> = (self.inner.channels.read())
            .expect("channels lock")
            .values()
            .cloned()
            .collect();
        // Once for all: what retention keeps is counted from sled's index.
        if channels.iter().any(|c| c.retains()) {
            self.inner.store.catch_up().await;
        }
        let mut out = Vec::with_capacity(channels.len());
        for shared in channels {
            // A channel deleted meanwhile is simply left out.
            if let Ok(info) = self.describe(&shared).await {
                out.push(info);
            }
        }
        out
    }

    /// Describes a channel and its subscriptions, what retention keeps counted from sled's index
    /// as it stands.
    async fn describe(&self, shared: &ChannelShared) -> Result<ChannelInfo> {
        let stats = shared.log.stats();
        let subscriptions = self.subscription_stats(shared).await;
        let (damaged_records, damaged_messages) = shared.log.damage();
        let settings = *shared.settings.lock().expect("settings lock");
        let lowest_floor = subscriptions
            .iter()
            .map(|s| s.ack_floor)
            .min()
            .unwrap_or(stats.next_seq);
        let retained_bytes = match settings.retention.keeps() {
            true => (self.inner.store).retained_bytes(shared.id, lowest_floor)?,
            false => 0,
        };
        Ok(ChannelInfo {
            damaged_records,
            damaged_messages,
            settings,
            retained_bytes,
            dropped: stats.dropped,
            delayed: stats.delayed,
            delayed_bytes: stats.delayed_bytes,
            name: shared.name.clone(),
            messages: stats.next_seq - stats.first_seq,
            bytes: stats.bytes,
            next_sequence: stats.next_seq,
            first_sequence: stats.first_seq,
            subscriptions,
        })
    }

    async fn subscription_stats(&self, channel: &ChannelShared) -> Vec<SubscriptionStats> {
        let handles = channel.handles();
        let mut out = Vec::with_capacity(handles.len());
        for handle in handles {
            if let Ok(stats) = self.stats_of(&handle).await {
                out.push(stats);
            }
        }
        out
    }

    async fn stats_of(&self, handle: &SubscriptionHandle) -> Result<SubscriptionStats> {
        let mut stats = stats_of(handle).await?;
        stats.dead_letter_channel = stats
            .settings
            .dead_letter
            .and_then(|id| self.channel_name(id));
        Ok(stats)
    }

    /// Creates a subscription starting at `start`: `Latest` receives the messages published
    /// from now on (on a dead-letter channel: every message the channel still holds).
    pub async fn create_subscription(
        &self,
        channel: &str,
        name: &str,
        settings: SubscriptionSettings,
        start: Point,
    ) -> Result<SubscriptionStats> {
        if Pattern::is_pattern(channel) {
            return self.create_wildcard(channel, name, settings, start).await;
        }
        self.check_open()?;
        names::validate("subscription", name)?;
        crate::check_settings(&settings)?;
        let _admin = self.inner.admin.lock().await;
        let shared = self.channel(channel)?;
        let client_settings = settings;
        let settings = self.resolve(&shared, &client_settings)?;
        let start = position(&shared, start)?;
        let exists = || CoreError::SubscriptionExists {
            channel: channel.to_owned(),
            name: name.to_owned(),
        };
        if shared.subscription(name).is_ok() {
            return Err(exists());
        }
        let filter = client_settings.filter.clone().unwrap_or_default();
        let (id, acks) = self
            .inner
            .store
            .create_filtered_subscription(
                shared.id,
                name.to_owned(),
                settings,
                start,
                filter.clone(),
                Vec::new(),
            )
            .await
            .map_err(|e| match e {
                StoreError::SubscriptionExists(_) => exists(),
                StoreError::ChannelNotFound => CoreError::ChannelNotFound(channel.to_owned()),
                e => e.into(),
            })?;
        let sub = RecoveredSubscription {
            id,
            channel: shared.id,
            name: name.to_owned(),
            settings,
            filter,
            transform: Vec::new(),
            acks,
            failures: Vec::new(),
        };
        self.start_subscription(&shared, sub);
        tracing::info!(channel, subscription = name, "subscription created");
        let handle = shared.subscription(name)?;
        self.stats_of(&handle).await
    }

    /// Changes a subscription's settings; deliveries in flight keep their deadlines.
    pub async fn update_subscription(
        &self,
        channel: &str,
        name: &str,
        settings: SubscriptionSettings,
    ) -> Result<()> {
        if Pattern::is_pattern(channel) {
            return self.update_wildcard(channel, name, settings).await;
        }
        self.check_open()?;
        own(channel, name)?;
        let _admin = self.inner.admin.lock().await;
        let shared = self.channel(channel)?;
        let handle = shared.subscription(name)?;
        let filter = settings.filter.as_deref().unwrap_or_default();
        if filter != handle.filter {
            return Err(CoreError::InvalidArgument(format!(
                "subscription {name:?} of channel {channel:?} has the filter {:?}; a filter \
                 cannot change (as in Pub/Sub): create a new subscription with the new filter",
                handle.filter
            )));
        }
        let settings = self.resolve(&shared, &settings)?;
        if *handle.settings.lock().expect("settings lock") == settings {
            return Ok(());
        }
        self.inner
            .store
            .update_subscription(handle.id, settings)
            .await?;
        self.reconfigure(&handle, settings).await?;
        tracing::info!(
            channel,
            subscription = name,
            ?settings,
            "subscription updated"
        );
        Ok(())
    }

    /// Puts stored settings in force in a subscription's dispatcher. Runs under the admin
    /// lock, and returns once they are in force, so that no channel the dispatcher might still
    /// send dead letters to is deleted meanwhile.
    async fn reconfigure(
        &self,
        handle: &SubscriptionHandle,
        settings: ferry_store::SubscriptionSettings,
    ) -> Result<()> {
        *handle.settings.lock().expect("settings lock") = settings;
        let (done, in_force) = oneshot::channel();
        let command = Command::Reconfigure { settings, done };
        (handle.commands.send(command).await).map_err(|_| CoreError::ShuttingDown)?;
        in_force.await.map_err(|_| CoreError::ShuttingDown)
    }

    /// Moves a subscription to `to`: messages before the point count as acked, those after
    /// as unacked (delivered again, attempts reset), atomically; deliveries in flight are void
    /// (their acks are answered `STALE`).
    pub async fn seek(&self, channel: &str, name: &str, to: Point) -> Result<SubscriptionStats> {
        if Pattern::is_pattern(channel) {
            return self.seek_wildcard(channel, name, to).await;
        }
        self.check_open()?;
        own(channel, name)?;
        let shared = self.channel(channel)?;
        let handle = shared.subscription(name)?;
        let position = position(&shared, to)?;
        let (reply, floor) = oneshot::channel();
        handle
            .commands
            .send(Command::Seek { position, reply })
            .await
            .map_err(|_| CoreError::ShuttingDown)?;
        floor.await.map_err(|_| CoreError::ShuttingDown)??;
        self.stats_of(&handle).await
    }

    /// Describes a subscription.
    pub async fn subscription_info(&self, channel: &str, name: &str) -> Result<SubscriptionStats> {
        if Pattern::is_pattern(channel) {
            return self.wildcard_info(channel, name).await;
        }
        let handle = self.channel(channel)?.subscription(name)?;
        self.stats_of(&handle).await
    }

    /// Describes the subscriptions of a channel, by name.
    pub async fn list_subscriptions(&self, channel: &str) -> Result<Vec<SubscriptionStats>> {
        if Pattern::is_pattern(channel) {
            return self.list_wildcards(channel).await;
        }
        let shared = self.channel(channel)?;
        Ok(self.subscription_stats(&shared).await)
    }

    /// Deletes a subscription; its consumers are disconnected and its unacked messages dropped.
    pub async fn delete_subscription(&self, channel: &str, name: &str) -> Result<()> {
        if Pattern::is_pattern(channel) {
            return self.delete_wildcard(channel, name).await;
        }
        self.check_open()?;
        own(channel, name)?;
        let _admin = self.inner.admin.lock().await;
        let shared = self.channel(channel)?;
        let handle = shared.subscription(name)?;
        self.inner.store.delete_subscription(handle.id).await?;
        let reason = CoreError::SubscriptionNotFound {
            channel: channel.to_owned(),
            name: name.to_owned(),
        };
        self.remove_subscription(&shared, name, reason).await;
        tracing::info!(channel, subscription = name, "subscription deleted");
        Ok(())
    }

    /// Forgets a subscription the store deleted, and stops its dispatcher, which ends its
    /// consumers' streams with `reason`.
    async fn remove_subscription(&self, channel: &ChannelShared, name: &str, reason: CoreError) {
        let removed = (channel.subscriptions.write().expect("subscriptions lock")).remove(name);
        if let Some(handle) = removed {
            let _ = handle.commands.send(Command::Stop { reason }).await;
        }
    }

    /// The broker's latency histograms.
    pub fn latencies(&self) -> &Latencies {
        &self.inner.latencies
    }

    /// What the store has done since it opened (commits, device syncs, messages, ack states).
    pub fn store_counters(&self) -> StoreCounters {
        self.inner.store.counters()
    }

    /// Bytes of messages cached in memory now.
    pub fn cached_bytes(&self) -> usize {
        self.inner.store.cached_bytes()
    }

    /// How many channels there are.
    pub fn channel_count(&self) -> usize {
        self.inner.channels.read().expect("channels lock").len()
    }

    /// The data directory's free space, and whether publishing is refused for lack of it.
    pub fn space(&self) -> SpaceReport {
        self.inner.store.space()
    }

    /// Why the broker cannot confirm writes, if it cannot.
    pub fn failure(&self) -> Option<String> {
        self.inner.store.failure()
    }

    /// Refuses new work, disconnects every consumer, commits what is queued and closes the store.
    pub async fn shutdown(&self) -> Result<()> {
        if self.inner.closing.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Creations under way finish first (their dispatchers and tasks are then stopped
        // below); those that wait for the lock find the broker closing.
        let _admin = self.inner.admin.lock().await;
        let channels: Vec<_> = self
            .inner
            .channels
            .read()
            .expect("channels lock")
            .values()
            .cloned()
            .collect();
        for channel in channels {
            for handle in channel.handles() {
                let _ = handle
                    .commands
                    .send(Command::Stop {
                        reason: CoreError::ShuttingDown,
                    })
                    .await;
            }
        }
        self.stop_all_derived();
        self.close_wildcard_consumers();
        let tasks = std::mem::take(&mut *self.inner.dispatchers.lock().expect("dispatchers lock"));
        for task in tasks {
            let _ = task.await;
        }
        self.inner.store.close().await?;
        Ok(())
    }
}

/// Gives every message without an expiry time its channel's default time to live, counted
/// from when it is due.
fn with_default_ttl(messages: Vec<NewMessage>, ttl_ms: u64) -> Vec<NewMessage> {
    let now = crate::dispatcher::now_ms();
    messages
        .into_iter()
        .map(|mut m| {
            if m.attributes.get(crate::dead_letter::EXPIRE_AT).is_none() {
                let expire_at = (crate::dead_letter::due(&m).max(now) + ttl_ms).to_string();
                let mut pairs: Vec<(&str, &str)> = m.attributes.iter().collect();
                pairs.push((crate::dead_letter::EXPIRE_AT, &expire_at));
                m.attributes = ferry_store::Attributes::from_pairs(pairs);
            }
            m
        })
        .collect()
}

/// The refusal to delete the dead-letter channel of a wildcard subscription.
fn in_use_by_wildcard(channel: &str, pattern: &str, subscription: &str) -> CoreError {
    CoreError::FailedPrecondition(format!(
        "channel {channel:?} is the dead-letter channel of wildcard subscription \
         {subscription:?} of {pattern:?}: give that subscription another dead-letter channel, \
         or delete it, first"
    ))
}

/// Refuses to change a wildcard subscription's member through its channel: it belongs to the
/// wildcard subscription (which reading it is fine).
fn own(channel: &str, subscription: &str) -> Result<()> {
    match wildcard::member_of(subscription) {
        None => Ok(()),
        Some((pattern, name)) => Err(CoreError::FailedPrecondition(format!(
            "{} is the share of channel {} of wildcard subscription {}: attach to, change, \
             seek or delete it as subscription {} of channel {}",
            names::quote(subscription),
            names::quote(channel),
            names::quote(name),
            names::quote(name),
            names::quote(pattern)
        ))),
    }
}

/// The store's position for a point of `channel`.
fn position(channel: &ChannelShared, point: Point) -> Result<Position> {
    Ok(match point {
        Point::Latest => Position::Latest,
        Point::Earliest => Position::Earliest,
        Point::Sequence(seq) => Position::Sequence(seq),
        Point::Time(ms) => Position::Time(ms),
        Point::Subscription(name) => Position::AckStateOf(channel.subscription(&name)?.id),
    })
}

async fn stats_of(handle: &SubscriptionHandle) -> Result<SubscriptionStats> {
    let (reply, stats) = oneshot::channel();
    handle
        .commands
        .send(Command::Stats { reply })
        .await
        .map_err(|_| CoreError::ShuttingDown)?;
    stats.await.map_err(|_| CoreError::ShuttingDown)
}
