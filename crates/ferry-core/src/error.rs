//! The broker core's errors. The server maps each variant to one gRPC status code, in one place.

use ferry_store::StoreError;

use crate::names::quote;

/// Everything the broker core can refuse or fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoreError {
    /// A request is malformed or outside a limit; the message says what to fix.
    #[error("{0}")]
    InvalidArgument(String),
    /// No channel of that name.
    #[error("channel {} does not exist", quote(.0))]
    ChannelNotFound(String),
    /// No subscription of that name on that channel.
    #[error(
        "subscription {} of channel {} does not exist",
        quote(name),
        quote(channel)
    )]
    SubscriptionNotFound {
        /// The channel.
        channel: String,
        /// The subscription.
        name: String,
    },
    /// A channel of that name exists already.
    #[error("channel {} already exists", quote(.0))]
    ChannelExists(String),
    /// The channel has a subscription of that name already.
    #[error(
        "subscription {} of channel {} already exists",
        quote(name),
        quote(channel)
    )]
    SubscriptionExists {
        /// The channel.
        channel: String,
        /// The subscription.
        name: String,
    },
    /// A subscription names a dead-letter channel that does not exist.
    #[error("dead-letter channel {} does not exist: create it first", quote(.0))]
    DeadLetterChannelNotFound(String),
    /// The request cannot be done in the current state; the message says what to change first.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A consumer read nothing from its stream for too long while deliveries waited for it: it
    /// was detached and its deliveries released to other consumers.
    #[error(
        "consumer {consumer} of subscription {subscription:?} took nothing from its stream for \
         {stalled:?} while {queued_bytes} bytes waited for it: detached, its deliveries go to \
         other consumers; read the stream continuously (or ask for a smaller window)"
    )]
    ConsumerStalled {
        /// The subscription.
        subscription: String,
        /// The consumer's id.
        consumer: u64,
        /// How long nothing was taken.
        stalled: std::time::Duration,
        /// What was waiting.
        queued_bytes: usize,
    },
    /// A subscription has as many consumers attached as the limit allows.
    #[error(
        "subscription {subscription:?} has {most} consumers attached, the most allowed \
         (limits.max_consumers_per_subscription): share the subscription's load among fewer \
         consumers, or raise the limit"
    )]
    TooManyConsumers {
        /// The subscription.
        subscription: String,
        /// The limit.
        most: usize,
    },
    /// The consumer was detached (it stalled, or its subscription went): its stream takes no
    /// more requests.
    #[error("this consumer was detached: attach again on a new stream")]
    ConsumerDetached,
    /// The broker is shutting down; try another instance or later.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// The store failed: nothing more is confirmed until the broker is restarted.
    #[error(transparent)]
    Storage(#[from] StoreError),
}

/// Results of the broker core.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;
