//! Ferry's broker core: channels, subscriptions, dispatch, acknowledgements and ack deadlines.
//!
//! It knows nothing of gRPC or sled: the server crate drives it through [`Broker`], and all
//! persistence goes through `ferry-store`. Modules:
//!
//! - [`broker`]: the registry of channels and subscriptions, publishing, attaching consumers and
//!   administration;
//! - `dispatcher`: one task per subscription that owns its delivery state (windows, in-flight
//!   deliveries, deadlines, redeliveries) and saves acks before confirming them;
//! - [`outbox`]: what waits for one consumer's stream, bounded in bytes;
//! - `acks`: the ack floor and the acked ranges above it;
//! - [`retry`]: retry policies and their backoff;
//! - [`dead_letter`]: what a dead letter says about itself, and how redrive reads it back;
//! - [`names`]: what a channel or subscription name may be;
//! - [`pattern`]: channel patterns (`orders.*`, `orders.>`), which wildcard subscriptions read;
//! - [`error`]: the errors the server maps to gRPC status codes.

pub mod broker;
pub mod dead_letter;
pub mod derive;
pub mod error;
pub mod filter;
pub mod latency;
pub mod names;
pub mod outbox;
pub mod pattern;
pub mod retry;

mod acks;
mod dispatcher;

use std::sync::Arc;
use std::time::Duration;

pub use broker::{Broker, ConsumerHandle, PreparedPublish, PublishConfirmation};
pub use error::{CoreError, Result};
pub use ferry_store::{
    Appended, Attributes, ChannelLimits, ChannelSettings, DEFAULT_DEDUP_WINDOW_MS, FsyncMode,
    LimitPolicy, Message, NewMessage, Position, Retention, RetryPolicy, SpaceOptions, SpaceReport,
    StoreError, StoreOptions, Verify,
};
pub use outbox::ConsumerEvents;

#[cfg(fuzzing)]
pub use dispatcher::fuzz_ack_id;

/// The attribute of the W3C Trace Context (`00-TRACEID-SPANID-FLAGS`): a message that carries
/// it is logged as it is published, delivered and settled, with the `ferry::trace` target at
/// debug level (`RUST_LOG=ferry::trace=debug`), so that one message can be followed across
/// services. The attribute itself is kept as it is, like every other.
pub const TRACEPARENT: &str = "traceparent";

/// The log target of the lines that follow traced messages.
pub const TRACE_TARGET: &str = "ferry::trace";

/// Whether traced messages are logged now (a cached check: nearly free when they are not).
pub(crate) fn tracing_messages() -> bool {
    tracing::enabled!(target: TRACE_TARGET, tracing::Level::DEBUG)
}

/// The default ack deadline of a subscription.
pub const DEFAULT_ACK_DEADLINE_MS: u64 = 30_000;
/// The longest ack deadline (and deadline extension) accepted.
pub const MAX_ACK_DEADLINE_MS: u64 = 3_600_000;
/// The default window of a consumer: messages, then bytes.
pub const DEFAULT_WINDOW: Window = Window {
    max_messages: 1000,
    max_bytes: 10 << 20,
};
/// The longest message id (the channel's de-duplication index is keyed by it).
pub const MAX_ID_BYTES: usize = 256;
/// The largest window a consumer may ask for, in messages.
pub const MAX_WINDOW_MESSAGES: u32 = 100_000;

/// How the broker is opened.
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    /// The store's options.
    pub store: StoreOptions,
    /// Size limits on what publishers send.
    pub limits: Limits,
    /// What one consumer may hold of the broker's memory and time.
    pub consumers: ConsumerLimits,
    /// What a subscription does at a damaged message record.
    pub on_damage: DamagePolicy,
}

/// What a subscription does when it meets a message record that cannot be read back (the
/// record is reported and counted either way).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DamagePolicy {
    /// Count its messages as lost, ack them for the subscription, and go on past it.
    #[default]
    Skip,
    /// Deliver nothing past it until an operator repairs the store.
    Stop,
}

/// Bounds on what one consumer can make the broker hold.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerLimits {
    /// The most bytes of deliveries waiting in one consumer's outbox for its stream to send
    /// them (messages counted at their size in memory).
    pub queue_bytes: usize,
    /// A consumer whose stream takes nothing from a non-empty outbox for this long is detached
    /// and its deliveries released.
    pub stall_timeout: Duration,
    /// The most consumers one subscription has attached at once.
    pub max_per_subscription: u32,
}

impl Default for ConsumerLimits {
    fn default() -> Self {
        Self {
            queue_bytes: 8 << 20,
            stall_timeout: Duration::from_secs(30),
            max_per_subscription: 256,
        }
    }
}

/// Size limits on publishing.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest message: payload, key, id and attributes together.
    pub max_message_bytes: usize,
    /// The most messages in one publish request.
    pub max_batch_messages: usize,
    /// The most bytes in one publish request.
    pub max_batch_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1 << 20,
            max_batch_messages: 1000,
            max_batch_bytes: 4 << 20,
        }
    }
}

impl Limits {
    /// Checks one publish batch and returns its size in bytes (payload, key, id and
    /// attributes); the error names the limit broken.
    pub fn check_batch(&self, messages: &[NewMessage]) -> Result<usize> {
        let invalid = |m: String| Err(CoreError::InvalidArgument(m));
        if messages.is_empty() {
            return invalid("a publish request needs at least one message".into());
        }
        if messages.len() > self.max_batch_messages {
            return invalid(format!(
                "the batch has {} messages; the limit is {} (max_batch_messages): split it",
                messages.len(),
                self.max_batch_messages
            ));
        }
        let mut total = 0;
        for (i, message) in messages.iter().enumerate() {
            let size = message.size();
            if size > self.max_message_bytes {
                return invalid(format!(
                    "message {i} is {size} bytes (payload, key, id and attributes); the limit is {} \
                     (max_message_bytes)",
                    self.max_message_bytes
                ));
            }
            if message.attributes.iter().any(|(name, _)| name.is_empty()) {
                return invalid(format!("message {i} has an attribute with an empty name"));
            }
            if message.id.len() > MAX_ID_BYTES {
                return invalid(format!(
                    "message {i} has an id of {} bytes; an id may be at most {MAX_ID_BYTES} bytes",
                    message.id.len()
                ));
            }
            if let Some((name, _)) =
                (message.attributes.iter()).find(|(name, _)| dead_letter::is_reserved(name))
            {
                return invalid(format!(
                    "message {i} has the attribute {name:?}, which only the broker may set \
                     (ferry.dead_letter.* and ferry.redrive.for): to pass a dead letter on, \
                     rename or drop them"
                ));
            }
            total += size;
        }
        if total > self.max_batch_bytes {
            return invalid(format!(
                "the batch is {total} bytes; the limit is {} (max_batch_bytes): split it",
                self.max_batch_bytes
            ));
        }
        Ok(total)
    }
}

/// Where a subscription starts, or is moved to by a seek, as clients name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Point {
    /// After the last message published.
    #[default]
    Latest,
    /// At the first message still stored.
    Earliest,
    /// At this sequence.
    Sequence(u64),
    /// At the first message published at or after this time (ms since the Unix epoch).
    Time(u64),
    /// Where this other subscription of the same channel is: a copy of its ack state.
    Subscription(String),
}

/// A subscription's settings, as clients give and see them.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionSettings {
    /// How long a delivery may stay unacked before it counts as failed.
    pub ack_deadline_ms: u64,
    /// The wait between a failed delivery and the next (all zeros: at once).
    pub retry: RetryPolicy,
    /// After this many failed deliveries a message is dead-lettered (0: no limit). Needs a
    /// dead-letter channel.
    pub max_delivery_attempts: u32,
    /// The channel messages go to after their last attempt or a terminal nack.
    pub dead_letter_channel: Option<String>,
    /// Messages with the same key go out one at a time, in order (the default).
    pub ordering: bool,
    /// Only messages that pass this filter are delivered; the others are acked at once (see
    /// [`filter`]). Set when the subscription is created; it never changes.
    pub filter: Option<String>,
}

impl Default for SubscriptionSettings {
    fn default() -> Self {
        Self {
            ack_deadline_ms: DEFAULT_ACK_DEADLINE_MS,
            retry: RetryPolicy::default(),
            max_delivery_attempts: 0,
            dead_letter_channel: None,
            ordering: true,
            filter: None,
        }
    }
}

/// Checks a subscription's settings on their own (the dead-letter channel's existence is
/// checked where it is resolved); the error names the field.
pub fn check_settings(settings: &SubscriptionSettings) -> Result<()> {
    let invalid = |m: String| Err(CoreError::InvalidArgument(m));
    if let Some(text) = &settings.filter
        && let Err(e) = filter::Filter::parse(text)
    {
        return invalid(format!("filter {text:?}: {e}"));
    }
    if !(1..=MAX_ACK_DEADLINE_MS).contains(&settings.ack_deadline_ms) {
        return invalid(format!(
            "ack_deadline is {} ms: it must be from 1 ms to {MAX_ACK_DEADLINE_MS} ms (1 h)",
            settings.ack_deadline_ms
        ));
    }
    if let Some(problem) = retry::check(&settings.retry) {
        return invalid(problem);
    }
    if settings.max_delivery_attempts > retry::MAX_DELIVERY_ATTEMPTS {
        return invalid(format!(
            "max_delivery_attempts is {}: at most {}",
            settings.max_delivery_attempts,
            retry::MAX_DELIVERY_ATTEMPTS
        ));
    }
    match (
        settings.max_delivery_attempts,
        &settings.dead_letter_channel,
    ) {
        (0, Some(channel)) => invalid(format!(
            "dead_letter_channel {channel:?} is set but max_delivery_attempts is not: set both \
             (how many attempts before a message goes to the dead-letter channel) or neither"
        )),
        (n, None) if n > 0 => invalid(format!(
            "max_delivery_attempts is {n} but no dead_letter_channel is set: after its last \
             attempt a message goes to the dead-letter channel, so name one (or set neither)"
        )),
        _ => Ok(()),
    }
}

/// A channel declared in the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelDecl {
    /// Its name.
    pub name: String,
    /// Its settings (retention, de-duplication window).
    pub settings: ChannelSettings,
    /// Its subscriptions.
    pub subscriptions: Vec<SubscriptionDecl>,
}

/// A subscription declared in the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionDecl {
    /// Its name.
    pub name: String,
    /// Its settings.
    pub settings: SubscriptionSettings,
}

/// A consumer's flow-control window: how much it may hold unacknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Unacked deliveries at most (0 = the default).
    pub max_messages: u32,
    /// Unacked payload bytes at most (0 = the default); one message is always allowed when none
    /// is outstanding.
    pub max_bytes: u64,
}

impl Window {
    /// Fills in defaults for zeros and checks the bounds.
    pub fn with_defaults(self) -> Result<Window> {
        if self.max_messages > MAX_WINDOW_MESSAGES {
            return Err(CoreError::InvalidArgument(format!(
                "window of {} messages is too large: at most {MAX_WINDOW_MESSAGES} (0 for the default {})",
                self.max_messages, DEFAULT_WINDOW.max_messages
            )));
        }
        Ok(Window {
            max_messages: if self.max_messages == 0 {
                DEFAULT_WINDOW.max_messages
            } else {
                self.max_messages
            },
            max_bytes: if self.max_bytes == 0 {
                DEFAULT_WINDOW.max_bytes
            } else {
                self.max_bytes
            },
        })
    }
}

/// The answer to an attach.
#[derive(Debug, Clone, Copy)]
pub struct Attached {
    /// The consumer's id within its subscription.
    pub consumer_id: u64,
    /// The subscription's ack deadline.
    pub ack_deadline_ms: u64,
    /// The window in force.
    pub window: Window,
}

/// What a consumer is told.
#[derive(Debug)]
pub enum ConsumerEvent {
    /// Messages to process.
    Deliveries(Vec<Delivery>),
    /// The outcome of one ack, nack or extend request.
    Results {
        /// Which kind of request.
        operation: AckOperation,
        /// One per ack id, in order.
        results: Vec<AckOutcome>,
    },
    /// The consumer was detached (subscription or channel deleted, broker shutting down, store
    /// failure); nothing follows.
    Closed(CoreError),
}

/// One delivery of one message.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub message: Arc<Message>,
    /// Names this delivery for acks.
    pub ack_id: String,
    /// The channel the message is from (for a wildcard subscription, one of several).
    pub channel: Arc<str>,
    /// 1 for the first delivery to this subscription, then 2, ...
    pub attempt: u32,
}

/// What a consumer says of some of its deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Done: never deliver again.
    Ack,
    /// Failed: deliver again after the retry policy's wait, or as the nack says.
    Nack(Nack),
    /// Still working: the deadline is now this far from now.
    Extend(Duration),
}

impl Settlement {
    /// The kind of request, as results name it.
    pub fn operation(&self) -> AckOperation {
        match self {
            Settlement::Ack => AckOperation::Ack,
            Settlement::Nack(_) => AckOperation::Nack,
            Settlement::Extend(_) => AckOperation::Extend,
        }
    }
}

/// How a nack wants its deliveries retried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nack {
    /// Retry after this long instead of the policy's wait.
    pub delay: Option<Duration>,
    /// Why it failed (kept up to 1 KiB; the dead letter carries the last one).
    pub reason: String,
    /// Never retry: dead-letter at once (discard if there is no dead-letter channel).
    pub terminal: bool,
}

/// The longest delay a nack may ask for.
pub const MAX_NACK_DELAY: Duration = retry::MAX_RETRY_WAIT;

/// What a consumer asks of its deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOperation {
    /// Done: never deliver again.
    Ack,
    /// Failed: deliver again later, or dead-letter.
    Nack,
    /// Still working: push the deadline out.
    Extend,
}

/// The outcome for one ack id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckOutcome {
    /// The ack id as given.
    pub ack_id: String,
    /// What happened.
    pub result: AckResult,
}

/// What happened to one ack id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckResult {
    /// Done (an ack: durably).
    Ok,
    /// Never issued by this subscription, or issued to another consumer's stream.
    Unknown,
    /// Issued but no longer valid (already settled, or expired).
    Stale,
}

/// A subscription's figures.
#[derive(Debug, Clone)]
pub struct SubscriptionStats {
    /// Its name.
    pub name: String,
    /// Its filter ("": none).
    pub filter: String,
    /// Messages its filter kept from it (acked without delivery) since the broker started.
    pub filtered: u64,
    /// For a wildcard subscription: the channels it reads now (its figures are their sums).
    pub channels: Vec<String>,
    /// Its settings as stored (the dead-letter channel by id).
    pub settings: ferry_store::SubscriptionSettings,
    /// The name of its dead-letter channel, if it has one.
    pub dead_letter_channel: Option<String>,
    /// Messages waiting to be delivered (redeliveries included).
    pub backlog: u64,
    /// Deliveries not yet settled.
    pub in_flight: u64,
    /// Messages acked since creation.
    pub acked: u64,
    /// Messages not yet acked.
    pub unacked: u64,
    /// Publish time of the oldest unacked message, in ms since the Unix epoch.
    pub oldest_unacked_publish_time_ms: Option<u64>,
    /// Consumers attached.
    pub consumers: u32,
    /// Messages skipped because their record was damaged (since the broker started).
    pub damaged_skipped: u64,
    /// The durable ack floor.
    pub ack_floor: u64,
    /// Deliveries made, first or not (since the broker started).
    pub delivered: u64,
    /// Deliveries that were not a message's first (since the broker started).
    pub redelivered: u64,
    /// Deliveries nacked (since the broker started).
    pub nacked: u64,
    /// Messages dead-lettered (since the broker started).
    pub dead_lettered: u64,
    /// Messages discarded by a terminal nack without a dead-letter channel (since the broker
    /// started).
    pub discarded: u64,
    /// Messages that expired before they were delivered (since the broker started).
    pub expired: u64,
    /// Failed messages waiting out their retry wait now.
    pub waiting_retry: u64,
    /// Ordering keys with messages held back behind an unacked one now.
    pub keys_blocked: u64,
}

impl SubscriptionStats {
    /// The settings as clients see them.
    pub fn client_settings(&self) -> SubscriptionSettings {
        SubscriptionSettings {
            ack_deadline_ms: self.settings.ack_deadline_ms,
            retry: self.settings.retry,
            max_delivery_attempts: self.settings.max_delivery_attempts,
            dead_letter_channel: self.dead_letter_channel.clone(),
            ordering: self.settings.ordering,
            filter: Some(self.filter.clone()).filter(|f| !f.is_empty()),
        }
    }
}

/// A channel's figures.
#[derive(Debug, Clone)]
pub struct ChannelInfo {
    /// Its name.
    pub name: String,
    /// Messages stored.
    pub messages: u64,
    /// Bytes stored (encoded records).
    pub bytes: u64,
    /// The next sequence.
    pub next_sequence: u64,
    /// The first sequence stored.
    pub first_sequence: u64,
    /// Damaged records found since the broker started, and the messages they held.
    pub damaged_records: u64,
    /// See `damaged_records`.
    pub damaged_messages: u64,
    /// Its settings (retention, de-duplication window).
    pub settings: ChannelSettings,
    /// Bytes of messages every subscription has acked, kept only by retention.
    pub retained_bytes: u64,
    /// Messages dropped to keep the channel within its limits, ever.
    pub dropped: u64,
    /// Delayed messages stored aside until they are due.
    pub delayed: u64,
    /// Their bytes.
    pub delayed_bytes: u64,
    /// Its subscriptions, by name.
    pub subscriptions: Vec<SubscriptionStats>,
}
