//! Administration: channels, subscriptions and the broker's own figures, in the client's types.

use std::time::{Duration, SystemTime};

use ferry_proto::pb;

use crate::Client;
use crate::convert::{duration, from_duration, timestamp};
use crate::error::Result;

/// Where a subscription starts, or is moved to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Start {
    /// After the last message published (the default).
    #[default]
    Latest,
    /// At the first message the channel still holds.
    Earliest,
    /// At this sequence.
    Sequence(u64),
    /// At the first message published at or after this time.
    Time(SystemTime),
    /// Where this other subscription of the same channel is (a fork of its ack state).
    Subscription(String),
}

impl Start {
    fn into_proto(self) -> pb::Position {
        use pb::position::At;
        let at = match self {
            Start::Latest => At::Edge(pb::Edge::Latest as i32),
            Start::Earliest => At::Edge(pb::Edge::Earliest as i32),
            Start::Sequence(seq) => At::Sequence(seq),
            Start::Time(t) => At::Time(timestamp(t)),
            Start::Subscription(name) => At::Subscription(name),
        };
        pb::Position { at: Some(at) }
    }
}

/// A new subscription's settings; what is left at its default is the broker's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscriptionOptions {
    /// How long a delivery may stay unacked (None: 30 s).
    pub ack_deadline: Option<Duration>,
    /// After this many failed deliveries a message is dead-lettered (0: never).
    pub max_delivery_attempts: u32,
    /// Where messages go after their last attempt ("" for none).
    pub dead_letter_channel: String,
    /// Only messages that pass this filter (Pub/Sub's syntax) are delivered ("" for all).
    pub filter: String,
    /// Deliver messages with the same key without waiting for one another.
    pub disable_ordering: bool,
    /// Where it starts.
    pub start: Start,
    /// The wait between a failed delivery and the next (None: at once).
    pub retry: Option<RetryPolicy>,
}

/// The wait before a failed message is delivered again: the n-th retry waits
/// `min(maximum, initial × multiplier^(n-1))`, moved by up to `jitter` (a fraction) of itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// The first wait.
    pub initial: Duration,
    /// The longest wait.
    pub maximum: Duration,
    /// How much each wait grows over the one before.
    pub multiplier: f64,
    /// The random share of each wait (0 to 1).
    pub jitter: f64,
}

impl RetryPolicy {
    fn into_proto(self) -> pb::RetryPolicy {
        pb::RetryPolicy {
            initial: Some(duration(self.initial)),
            maximum: Some(duration(self.maximum)),
            multiplier: self.multiplier,
            jitter: self.jitter,
        }
    }
}

/// A derived channel: the messages of `source` (a channel or a pattern) that pass `filter`,
/// reshaped, appended to `target`, exactly once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DerivedChannel {
    /// The channel it reads, or a pattern like `orders.*`.
    pub source: String,
    /// The channel it appends to (created if missing).
    pub target: String,
    /// Only messages that pass this filter ("" for all).
    pub filter: String,
    /// Keep only these attributes (empty: all).
    pub keep: Vec<String>,
    /// Then drop these.
    pub drop: Vec<String>,
    /// Then rename these (from, to).
    pub rename: std::collections::HashMap<String, String>,
    /// Then set these to constants.
    pub set: std::collections::HashMap<String, String>,
    /// Then take the key from this attribute ("" for none).
    pub key_from: String,
}

impl DerivedChannel {
    fn into_proto(self) -> pb::DerivedChannel {
        pb::DerivedChannel {
            source: self.source,
            target: self.target,
            filter: self.filter,
            keep: self.keep,
            drop: self.drop,
            rename: self.rename,
            set: self.set,
            key_from: self.key_from,
        }
    }
}

/// A channel's settings; what is left at its default is the broker's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelOptions {
    /// Keep acked messages this long (None: not by age), so that subscriptions can replay them.
    pub retention_max_age: Option<Duration>,
    /// Keep acked messages while the channel stores at most this many bytes (0: not by size).
    pub retention_max_bytes: u64,
    /// De-duplicate published ids within this window (None: 2 minutes; zero: off).
    pub dedup_window: Option<Duration>,
    /// The time to live of a message published without its own (None: none).
    pub default_ttl: Option<Duration>,
    /// The most messages it may store (0: no limit).
    pub max_messages: u64,
    /// The most bytes it may store (0: no limit).
    pub max_bytes: u64,
    /// Past a limit, drop the oldest messages instead of refusing the publish.
    pub drop_oldest: bool,
}

impl ChannelOptions {
    fn request(self, name: &str) -> pb::CreateChannelRequest {
        let retention =
            (self.retention_max_age.is_some() || self.retention_max_bytes > 0).then(|| {
                pb::Retention {
                    max_age: self.retention_max_age.map(duration),
                    max_bytes: self.retention_max_bytes,
                }
            });
        pb::CreateChannelRequest {
            name: name.to_owned(),
            retention,
            dedup_window: self.dedup_window.map(duration),
            default_ttl: self.default_ttl.map(duration),
            limits: (self.max_messages > 0 || self.max_bytes > 0).then_some(pb::Limits {
                max_messages: self.max_messages,
                max_bytes: self.max_bytes,
                policy: match self.drop_oldest {
                    true => pb::LimitPolicy::DropOldest,
                    false => pb::LimitPolicy::Reject,
                } as i32,
            }),
        }
    }
}

/// A channel and its figures.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelInfo {
    /// Its name.
    pub name: String,
    /// Messages stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// The sequence the next message will get.
    pub next_sequence: u64,
    /// The lowest sequence still stored.
    pub first_sequence: u64,
    /// Delayed messages stored aside until due.
    pub delayed: u64,
    /// Their bytes.
    pub delayed_bytes: u64,
    /// Its subscriptions, by name.
    pub subscriptions: Vec<SubscriptionInfo>,
}

impl From<pb::ChannelInfo> for ChannelInfo {
    fn from(c: pb::ChannelInfo) -> Self {
        ChannelInfo {
            name: c.name,
            messages: c.messages,
            bytes: c.bytes,
            next_sequence: c.next_sequence,
            first_sequence: c.first_sequence,
            delayed: c.delayed,
            delayed_bytes: c.delayed_bytes,
            subscriptions: c.subscriptions.into_iter().map(Into::into).collect(),
        }
    }
}

/// A subscription and its figures.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionInfo {
    /// Its channel (or pattern).
    pub channel: String,
    /// Its name.
    pub name: String,
    /// Messages waiting to be delivered.
    pub backlog: u64,
    /// Deliveries not yet settled.
    pub in_flight: u64,
    /// Messages acked since it was created.
    pub acked: u64,
    /// Deliveries made since the broker started.
    pub delivered: u64,
    /// Messages not yet acked.
    pub unacked: u64,
    /// How long the oldest unacked message has waited.
    pub oldest_unacked_age: Option<Duration>,
    /// Consumers attached now.
    pub consumers: u32,
    /// Its ack deadline.
    pub ack_deadline: Duration,
    /// Its dead-letter channel ("" for none).
    pub dead_letter_channel: String,
    /// Its filter ("" for none).
    pub filter: String,
    /// Messages dead-lettered since the broker started.
    pub dead_lettered: u64,
    /// For a wildcard subscription: the channels it reads.
    pub channels: Vec<String>,
}

impl From<pb::SubscriptionInfo> for SubscriptionInfo {
    fn from(s: pb::SubscriptionInfo) -> Self {
        SubscriptionInfo {
            channel: s.channel,
            name: s.name,
            backlog: s.backlog,
            in_flight: s.in_flight,
            acked: s.acked,
            delivered: s.delivered,
            unacked: s.unacked,
            oldest_unacked_age: s.oldest_unacked_age.map(|d| from_duration(Some(d))),
            consumers: s.consumers,
            ack_deadline: from_duration(s.ack_deadline),
            dead_letter_channel: s.dead_letter_channel,
            filter: s.filter,
            dead_lettered: s.dead_lettered,
            channels: s.channels,
        }
    }
}

/// Which dead letters a redrive moves back (every field left at its default: all of them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveSelection {
    /// The first sequence of the dead-letter channel to look at (0: the first stored).
    pub first_sequence: u64,
    /// The last one (0: the last stored when the redrive starts).
    pub last_sequence: u64,
    /// Only messages with each of these attributes, with exactly this value.
    pub attributes: std::collections::HashMap<String, String>,
    /// Move at most this many (0: no limit).
    pub limit: u64,
}

/// What a redrive did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redriven {
    /// Messages moved back to their subscriptions.
    pub redriven: u64,
    /// Selected messages left where they are (their origin is gone, for one).
    pub skipped: u64,
    /// Why the first of those was left.
    pub first_skip_reason: String,
}

/// The broker's own figures.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerInfo {
    /// Its version.
    pub version: String,
    /// How long it has run.
    pub uptime: Duration,
    /// How many channels it holds.
    pub channels: u32,
    /// Group commits since it started, and the device syncs they took.
    pub commits: u64,
    /// Device syncs since it started.
    pub device_syncs: u64,
    /// Free bytes on its data directory's disk.
    pub disk_free_bytes: u64,
    /// Whether it refuses publishing for lack of disk space.
    pub publishing_refused: bool,
    /// Bytes of messages it keeps decoded in memory.
    pub message_cache_bytes: u64,
    /// Messages its store wrote since it started.
    pub messages_written: u64,
    /// Ack states its store wrote since it started.
    pub ack_states_written: u64,
}

/// What a configuration file's declaration would come to on a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigAction {
    /// It would be created.
    Create,
    /// Its settings would change.
    Change,
    /// It exists as declared.
    Keep,
    /// It cannot be applied.
    Refuse,
}

/// One declaration and what it would come to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigStep {
    /// What would be done.
    pub action: ConfigAction,
    /// What it is about (`channel orders`, `subscription billing of orders`, ...).
    pub object: String,
    /// What changes, or why it is refused.
    pub detail: String,
}

impl Client {
    /// What applying a configuration file's declarations would do on this broker, changing
    /// nothing; `source_name` names the file in errors.
    pub async fn diff_config(&self, toml: &str, source_name: &str) -> Result<Vec<ConfigStep>> {
        let request = pb::DiffConfigRequest {
            toml: toml.to_owned(),
            source_name: source_name.to_owned(),
        };
        let response = self.admin().diff_config(request).await?.into_inner();
        let steps = response.steps.into_iter().map(|step| ConfigStep {
            action: match step.action() {
                pb::ConfigAction::Create => ConfigAction::Create,
                pb::ConfigAction::Change => ConfigAction::Change,
                pb::ConfigAction::Keep => ConfigAction::Keep,
                pb::ConfigAction::Refuse | pb::ConfigAction::Unspecified => ConfigAction::Refuse,
            },
            object: step.object,
            detail: step.detail,
        });
        Ok(steps.collect())
    }

    /// Creates a channel with default settings.
    pub async fn create_channel(&self, name: &str) -> Result<ChannelInfo> {
        let request = pb::CreateChannelRequest {
            name: name.to_owned(),
            ..Default::default()
        };
        Ok(self
            .admin()
            .create_channel(request)
            .await?
            .into_inner()
            .into())
    }

    /// Creates a channel with these settings.
    pub async fn create_channel_with(
        &self,
        name: &str,
        options: ChannelOptions,
    ) -> Result<ChannelInfo> {
        let request = options.request(name);
        Ok(self
            .admin()
            .create_channel(request)
            .await?
            .into_inner()
            .into())
    }

    /// Replaces a channel's settings: what `options` leaves at its default takes the default
    /// (so restate what should stay).
    pub async fn update_channel(&self, name: &str, options: ChannelOptions) -> Result<ChannelInfo> {
        let request = options.request(name);
        Ok(self
            .admin()
            .update_channel(request)
            .await?
            .into_inner()
            .into())
    }

    /// Describes a channel and its subscriptions.
    pub async fn channel(&self, name: &str) -> Result<ChannelInfo> {
        let request = pb::GetChannelRequest {
            name: name.to_owned(),
        };
        Ok(self.admin().get_channel(request).await?.into_inner().into())
    }

    /// Every channel, by name.
    pub async fn channels(&self) -> Result<Vec<ChannelInfo>> {
        let response = self
            .admin()
            .list_channels(pb::ListChannelsRequest {})
            .await?;
        Ok(response
            .into_inner()
            .channels
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Deletes a channel with its messages and subscriptions.
    pub async fn delete_channel(&self, name: &str) -> Result<()> {
        let request = pb::DeleteChannelRequest {
            name: name.to_owned(),
        };
        self.admin().delete_channel(request).await?;
        Ok(())
    }

    /// Creates a subscription of `channel` (or, for a pattern like `orders.*`, a wildcard
    /// subscription).
    pub async fn create_subscription(
        &self,
        channel: &str,
        name: &str,
        options: SubscriptionOptions,
    ) -> Result<SubscriptionInfo> {
        let request = pb::CreateSubscriptionRequest {
            channel: channel.to_owned(),
            name: name.to_owned(),
            ack_deadline: options.ack_deadline.map(duration),
            max_delivery_attempts: options.max_delivery_attempts,
            dead_letter_channel: options.dead_letter_channel,
            disable_ordering: options.disable_ordering,
            filter: options.filter,
            start: Some(options.start.into_proto()),
            retry: options.retry.map(RetryPolicy::into_proto),
        };
        let info = self.admin().create_subscription(request).await?;
        Ok(info.into_inner().into())
    }

    /// Describes a subscription.
    pub async fn subscription(&self, channel: &str, name: &str) -> Result<SubscriptionInfo> {
        let request = pb::GetSubscriptionRequest {
            channel: channel.to_owned(),
            name: name.to_owned(),
        };
        Ok(self
            .admin()
            .get_subscription(request)
            .await?
            .into_inner()
            .into())
    }

    /// The subscriptions of a channel (or a pattern's wildcard subscriptions), by name.
    pub async fn subscriptions(&self, channel: &str) -> Result<Vec<SubscriptionInfo>> {
        let request = pb::ListSubscriptionsRequest {
            channel: channel.to_owned(),
        };
        let response = self.admin().list_subscriptions(request).await?;
        Ok(response
            .into_inner()
            .subscriptions
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Moves a subscription: messages before `to` count as acked, those after as not.
    pub async fn seek(&self, channel: &str, name: &str, to: Start) -> Result<SubscriptionInfo> {
        let request = pb::SeekRequest {
            channel: channel.to_owned(),
            subscription: name.to_owned(),
            to: Some(to.into_proto()),
        };
        Ok(self.admin().seek(request).await?.into_inner().into())
    }

    /// Deletes a subscription; its consumers are disconnected.
    pub async fn delete_subscription(&self, channel: &str, name: &str) -> Result<()> {
        let request = pb::DeleteSubscriptionRequest {
            channel: channel.to_owned(),
            name: name.to_owned(),
        };
        self.admin().delete_subscription(request).await?;
        Ok(())
    }

    /// Moves dead letters of `channel` back to the subscriptions they came from, for another
    /// round (see the broker's `Redrive`).
    pub async fn redrive(&self, channel: &str, selection: RedriveSelection) -> Result<Redriven> {
        let request = pb::RedriveRequest {
            channel: channel.to_owned(),
            first_sequence: selection.first_sequence,
            last_sequence: selection.last_sequence,
            attributes: selection.attributes,
            limit: selection.limit,
        };
        let r = self.admin().redrive(request).await?.into_inner();
        Ok(Redriven {
            redriven: r.redriven,
            skipped: r.skipped,
            first_skip_reason: r.first_skip_reason,
        })
    }

    /// Creates a derived channel.
    pub async fn create_derived(&self, derived: DerivedChannel) -> Result<()> {
        self.admin().create_derived(derived.into_proto()).await?;
        Ok(())
    }

    /// Deletes a derived channel (its target and what it holds stay).
    pub async fn delete_derived(&self, source: &str, target: &str) -> Result<()> {
        let request = pb::DeleteDerivedRequest {
            source: source.to_owned(),
            target: target.to_owned(),
        };
        self.admin().delete_derived(request).await?;
        Ok(())
    }

    /// The broker's version and figures.
    pub async fn broker(&self) -> Result<BrokerInfo> {
        let b = self
            .admin()
            .get_broker(pb::GetBrokerRequest {})
            .await?
            .into_inner();
        Ok(BrokerInfo {
            version: b.version,
            uptime: from_duration(b.uptime),
            channels: b.channels,
            commits: b.commits,
            device_syncs: b.device_syncs,
            disk_free_bytes: b.disk_free_bytes,
            publishing_refused: b.publishing_refused,
            message_cache_bytes: b.message_cache_bytes,
            messages_written: b.messages_written,
            ack_states_written: b.ack_states_written,
        })
    }
}
