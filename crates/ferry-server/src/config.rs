//! The daemon's configuration: the TOML file, its defaults and its validation.
//!
//! The documented default file, `config/ferry.toml`, is embedded in the binary and is what the
//! daemon runs on without `--config`; a test keeps it equal to the defaults written here. Every
//! error names the file, the key and what is wrong; unknown keys are errors, so a typo is never
//! silently ignored.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_core::derive::{DerivedSpec, Reshape};
use ferry_core::pattern::Pattern;
use ferry_core::{
    BrokerOptions, ChannelDecl, ChannelLimits, ChannelSettings, ConsumerLimits,
    DEFAULT_ACK_DEADLINE_MS, DEFAULT_DEDUP_WINDOW_MS, DamagePolicy, FsyncMode, LimitPolicy, Limits,
    Retention, RetryPolicy, SpaceOptions, StoreOptions, SubscriptionDecl, SubscriptionSettings,
    Verify,
};
use serde::Deserialize;

/// The default configuration file, as shipped in `config/ferry.toml`.
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/ferry.toml");

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct ConfigError {
    /// The file (or "built-in default").
    pub source_name: String,
    /// What is wrong, with the key and, for syntax errors, the line.
    pub message: String,
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Network and data directory.
    pub server: ServerConfig,
    /// Durability and caches.
    pub storage: StorageConfig,
    /// Size limits on publishing.
    pub limits: LimitsConfig,
    /// Channels (and their subscriptions) created at start-up.
    pub channels: Vec<ChannelConfig>,
    /// `[[derived]]`: derived channels created at start-up.
    pub derived: Vec<DerivedConfig>,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// `[auth]`: what is served without credentials once principals are declared.
    pub auth: AuthConfig,
    /// `[[principals]]`: who may call, how each proves it, and what each may do.
    pub principals: Vec<PrincipalConfig>,
    /// The principal `admin` that FERRY_ADMIN_TOKEN_HASH declares beside the file's (kept
    /// across reloads, which read only the file).
    #[serde(skip)]
    pub admin_from_environment: Option<PrincipalConfig>,
    /// The file it was read from (None: the built-in default), read again on SIGHUP.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served (absent: nowhere).
    pub listen: Option<SocketAddr>,
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The standard health service answers callers without credentials (for probes).
    pub open_health: bool,
    /// The reflection service (the API's schema) answers callers without credentials.
    pub open_reflection: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            open_health: true,
            open_reflection: true,
        }
    }
}

/// `[[principals]]`: one identity that may call the broker, and its rights.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    /// Its name, in logs and refusals.
    pub name: String,
    /// SHA-256 hashes of its bearer tokens (`ferry token hash`), several to rotate them.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Client certificate names (subject common name, or a DNS, URI or email SAN) that
    /// authenticate as it under mutual TLS.
    #[serde(default)]
    pub certificates: Vec<String>,
    /// Channels (names or patterns) it may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Channels, or `CHANNEL/SUBSCRIPTION`, whose subscriptions it may consume and read.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Channels, or `CHANNEL/SUBSCRIPTION`, it may create, change and delete.
    #[serde(default)]
    pub admin: Vec<String>,
}

/// `[[derived]]`: a channel derived from another (see `Admin.CreateDerived`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DerivedConfig {
    /// The channel it reads, or a channel pattern (`orders.*`): every channel it matches.
    pub source: String,
    /// The channel it appends to (created if missing).
    pub target: String,
    /// Only messages that pass it are derived.
    #[serde(default)]
    pub filter: Option<String>,
    /// Keep only these attributes.
    #[serde(default)]
    pub keep: Vec<String>,
    /// Then drop these.
    #[serde(default)]
    pub drop: Vec<String>,
    /// Then rename these (old = "new").
    #[serde(default)]
    pub rename: std::collections::BTreeMap<String, String>,
    /// Then set these (name = "value").
    #[serde(default)]
    pub set: std::collections::BTreeMap<String, String>,
    /// Then take the key from this attribute.
    #[serde(default)]
    pub key_from: Option<String>,
}

impl DerivedConfig {
    /// The derived channel this declares.
    pub fn spec(&self) -> DerivedSpec {
        DerivedSpec {
            source: self.source.clone(),
            target: self.target.clone(),
            filter: self.filter.clone().filter(|f| !f.is_empty()),
            reshape: Reshape {
                keep: self.keep.clone(),
                drop: self.drop.clone(),
                rename: self.rename.clone(),
                set: self.set.clone(),
                key_from: self.key_from.clone().filter(|k| !k.is_empty()),
            },
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where the gRPC server listens.
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    /// Where the store keeps its files.
    pub data_dir: PathBuf,
    /// Serve on an address other than loopback although nothing authenticates clients: every
    /// client that reaches the port may publish, read and delete.
    pub allow_unauthenticated: bool,
    /// `[server.tls]`: serve gRPC over TLS (absent: plaintext).
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The PEM certificate chain the server presents.
    pub cert_file: PathBuf,
    /// Its PEM private key.
    pub key_file: PathBuf,
    /// PEM CA certificates: when set, every client must present a certificate one of them
    /// signed (mutual TLS), which authenticates it.
    pub client_ca_file: Option<PathBuf>,
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// "always", "interval" or "never".
    pub fsync: FsyncSetting,
    /// With `fsync = "interval"`: how often.
    pub fsync_interval: HumanDuration,
    /// sled's page cache.
    pub cache_capacity: ByteSize,
    /// Broker-wide: newest messages of all channels kept decoded in memory.
    pub message_cache: ByteSize,
    /// Per channel: the most of `message_cache` one channel may hold.
    pub tail_cache: ByteSize,
    /// Message records go to segment files of about this size, each deleted once all is acked.
    pub segment_size: ByteSize,
    /// Segment files are written full of zeros in the background before they are used.
    pub preallocate_segments: bool,
    /// Publishing is refused while free space is below the larger of this...
    pub min_free_bytes: ByteSize,
    /// ...and this percentage of the filesystem.
    pub min_free_percent: u8,
    /// Space kept back for acks in case the disk fills up anyway.
    pub reserve: ByteSize,
    /// Which message records are checked when the store opens.
    pub verify_on_start: VerifySetting,
    /// What a subscription does at a damaged record.
    pub on_damage: DamageSetting,
}

/// The `verify_on_start` setting.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum VerifySetting {
    /// The last record of every segment file.
    #[default]
    Tail,
    /// Every record.
    Full,
    /// None.
    Off,
}

/// The `on_damage` setting.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DamageSetting {
    /// Count the record's messages as lost and go on.
    #[default]
    Skip,
    /// Deliver nothing past it.
    Stop,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// The largest message (payload, key, id and attributes).
    pub max_message_bytes: ByteSize,
    /// The most messages in one publish request.
    pub max_batch_messages: usize,
    /// The most bytes in one publish request.
    pub max_batch_bytes: ByteSize,
    /// The most bytes of deliveries waiting for one consumer's stream.
    pub consumer_queue: ByteSize,
    /// How long a consumer may leave its stream unread before it is detached.
    pub consumer_stall_timeout: HumanDuration,
    /// The most consumers attached to one subscription at once.
    pub max_consumers_per_subscription: u32,
    /// The most client connections at once.
    pub max_connections: u32,
    /// The most calls (streams) one connection may have open at once.
    pub max_streams_per_connection: u32,
    /// The most bytes of a request's headers (metadata).
    pub max_header_bytes: ByteSize,
}

/// `[[channels]]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// The channel's name; or a channel pattern (`orders.*`, `orders.>`), which declares
    /// wildcard subscriptions only.
    pub name: String,
    /// `retention = { max_age = "7d", max_bytes = "10GiB" }`: how long it keeps acked
    /// messages (absent: not at all).
    #[serde(default)]
    pub retention: Option<RetentionConfig>,
    /// `dedup_window = "2m"`: a published id stored this recently is a duplicate ("0s": off).
    #[serde(default)]
    pub dedup_window: Option<HumanDuration>,
    /// `ttl = "1h"`: the time to live of a message published without its own.
    #[serde(default)]
    pub ttl: Option<HumanDuration>,
    /// `limits = { max_messages = 100000, max_bytes = "1GiB", policy = "drop_oldest" }`: how
    /// much it may store (absent: no limit).
    #[serde(default)]
    pub limits: Option<ChannelLimitsConfig>,
    /// `[[channels.subscriptions]]`
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionConfig>,
}

/// A channel's `retention`: keep acked messages until they are older than `max_age`, or until
/// the channel stores more than `max_bytes`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Keep acked messages this long.
    #[serde(default)]
    pub max_age: Option<HumanDuration>,
    /// Keep acked messages while the channel stores at most this much.
    #[serde(default)]
    pub max_bytes: Option<ByteSize>,
}

/// A channel's `limits`: what it may store, and what a publish past them does.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChannelLimitsConfig {
    /// The most messages stored.
    #[serde(default)]
    pub max_messages: Option<u64>,
    /// The most bytes stored.
    #[serde(default)]
    pub max_bytes: Option<ByteSize>,
    /// `"reject"` (the default) or `"drop_oldest"`.
    #[serde(default)]
    pub policy: PolicyConfig,
}

/// What a full channel does with a publish.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum PolicyConfig {
    /// Refuse it (RESOURCE_EXHAUSTED).
    #[default]
    Reject,
    /// Drop the oldest unacked messages to make room.
    DropOldest,
}

/// `[[channels.subscriptions]]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// The subscription's name.
    pub name: String,
    /// How long a delivery may stay unacked.
    #[serde(default = "default_ack_deadline")]
    pub ack_deadline: HumanDuration,
    /// Failed deliveries before a message is dead-lettered (0: no limit).
    #[serde(default)]
    pub max_delivery_attempts: u32,
    /// Where messages go after their last attempt or a terminal nack.
    #[serde(default)]
    pub dead_letter_channel: Option<String>,
    /// Whether messages with the same key go one at a time, in order.
    #[serde(default = "default_ordering")]
    pub ordering: bool,
    /// Only messages that pass this filter (Pub/Sub's syntax) are delivered; it cannot change.
    #[serde(default)]
    pub filter: Option<String>,
    /// `[channels.subscriptions.retry]`: the wait between failed deliveries (absent: none).
    #[serde(default)]
    pub retry: Option<RetryConfig>,
}

/// `[channels.subscriptions.retry]`: the n-th retry waits `min(maximum, initial ×
/// multiplier^(n-1))`, ± `jitter` × that.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// The first wait.
    #[serde(default = "default_retry_initial")]
    pub initial: HumanDuration,
    /// The longest wait.
    #[serde(default = "default_retry_maximum")]
    pub maximum: HumanDuration,
    /// Growth per retry (at least 1).
    #[serde(default = "default_retry_multiplier")]
    pub multiplier: f64,
    /// Random spread of each wait, a fraction from 0 to 1.
    #[serde(default)]
    pub jitter: f64,
}

fn default_ack_deadline() -> HumanDuration {
    HumanDuration(Duration::from_millis(DEFAULT_ACK_DEADLINE_MS))
}

fn default_ordering() -> bool {
    true
}

fn default_retry_initial() -> HumanDuration {
    HumanDuration(ferry_core::retry::DEFAULT_RETRY_INITIAL)
}

fn default_retry_maximum() -> HumanDuration {
    HumanDuration(ferry_core::retry::DEFAULT_RETRY_MAXIMUM)
}

fn default_retry_multiplier() -> f64 {
    ferry_core::retry::DEFAULT_RETRY_MULTIPLIER
}

/// The `fsync` setting.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncSetting {
    /// Confirm after fsync.
    #[default]
    Always,
    /// Confirm after the OS has the data; fsync every `fsync_interval`.
    Interval,
    /// Confirm after the OS has the data; never fsync.
    Never,
}

/// A duration written like "30s", "250ms", "5m" or "1h".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// A size written as a number of bytes or like "64KiB", "128MiB", "1GiB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("data"),
            allow_unauthenticated: false,
            tls: None,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            fsync: FsyncSetting::Always,
            fsync_interval: HumanDuration(Duration::from_millis(100)),
            cache_capacity: ByteSize(128 << 20),
            message_cache: ByteSize(StoreOptions::default().message_cache_bytes as u64),
            tail_cache: ByteSize(StoreOptions::default().tail_cache_bytes as u64),
            segment_size: ByteSize(64 << 20),
            preallocate_segments: false,
            min_free_bytes: ByteSize(SpaceOptions::default().min_free_bytes),
            min_free_percent: SpaceOptions::default().min_free_percent,
            reserve: ByteSize(SpaceOptions::default().reserve_bytes),
            verify_on_start: VerifySetting::Tail,
            on_damage: DamageSetting::Skip,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let limits = Limits::default();
        let consumers = ConsumerLimits::default();
        Self {
            max_message_bytes: ByteSize(limits.max_message_bytes as u64),
            max_batch_messages: limits.max_batch_messages,
            max_batch_bytes: ByteSize(limits.max_batch_bytes as u64),
            consumer_queue: ByteSize(consumers.queue_bytes as u64),
            consumer_stall_timeout: HumanDuration(consumers.stall_timeout),
            max_consumers_per_subscription: consumers.max_per_subscription,
            max_connections: 1024,
            max_streams_per_connection: 256,
            max_header_bytes: ByteSize(16 << 10),
        }
    }
}

impl Config {
    /// Refuses to serve where strangers could reach an unauthenticated broker: an address
    /// other than loopback needs principals, mutual TLS or `allow_unauthenticated = true`.
    /// Refuses too certificate names that no client could present (no mutual TLS): checked
    /// here, against the TLS in force, rather than in the file alone, since turning TLS on or
    /// off takes a restart.
    pub fn check_exposure(&self) -> Result<(), String> {
        if let Some(metrics) = self.metrics.listen
            && !metrics.ip().is_loopback()
            && !self.server.allow_unauthenticated
        {
            return Err(format!(
                "[metrics] listen = \"{metrics}\" is not a loopback address, and nothing \
                 authenticates scrapes: listen on 127.0.0.1 or [::1], or set \
                 allow_unauthenticated = true under [server]"
            ));
        }
        let listen = self.server.listen;
        // Declared principals, or mutual TLS, authenticate every client.
        let mutual_tls = (self.server.tls.as_ref()).is_some_and(|t| t.client_ca_file.is_some());
        if let Some(i) = (self.principals.iter()).position(|p| !p.certificates.is_empty())
            && !mutual_tls
        {
            return Err(format!(
                "principals[{i}].certificates: no client is asked for a certificate unless \
                 [server.tls] client_ca_file is set, so these names could never match: set it, \
                 or give the principal tokens"
            ));
        }
        let authenticated = mutual_tls || !self.all_principals().is_empty();
        if listen.ip().is_loopback() || self.server.allow_unauthenticated || authenticated {
            return Ok(());
        }
        Err(format!(
            "[server] listen = \"{listen}\" is not a loopback address, and nothing authenticates \
             clients: anyone who can reach it could publish, read and delete. Listen on \
             127.0.0.1 or [::1], declare [[principals]] (tokens or client certificates), \
             require client certificates ([server.tls] client_ca_file), or set \
             allow_unauthenticated = true under [server] to accept that (for instance on a \
             private network, or in a container behind one)"
        ))
    }

    /// Declares the principal `admin`, with every right on every channel, authenticated by
    /// the token whose hash (`ferry token hash`) is given: how a container is secured from its
    /// environment alone.
    pub fn add_admin_token(&mut self, hash: &str) -> Result<(), String> {
        crate::auth::token::parse_hash(hash).map_err(|e| format!("FERRY_ADMIN_TOKEN_HASH: {e}"))?;
        let every = vec![">".to_owned()];
        self.admin_from_environment = Some(PrincipalConfig {
            name: "admin".to_owned(),
            tokens: vec![hash.to_owned()],
            certificates: Vec::new(),
            publish: every.clone(),
            subscribe: every.clone(),
            admin: every,
        });
        crate::auth::Access::of(self)
            .map(drop)
            .map_err(|e| format!("FERRY_ADMIN_TOKEN_HASH declares principal \"admin\": {e}"))
    }

    /// Every declared principal: the file's, then the environment's.
    pub fn all_principals(&self) -> Vec<PrincipalConfig> {
        let mut all = self.principals.clone();
        all.extend(self.admin_from_environment.clone());
        all
    }

    /// Loads and checks a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: source_name.clone(),
            message: format!("cannot read it: {e}"),
        })?;
        let mut config = Self::parse(&text, &source_name)?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// The built-in default configuration.
    pub fn builtin() -> Config {
        Self::parse(DEFAULT_CONFIG, "built-in default")
            .expect("the embedded default config is valid")
    }

    /// Parses and checks TOML text; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        let error = |message: String| ConfigError {
            source_name: source_name.to_owned(),
            message,
        };
        let config: Config =
            toml::from_str(text).map_err(|e| error(e.to_string().trim_end().to_owned()))?;
        config.validate().map_err(error)?;
        Ok(config)
    }

    /// Every section's checks; the error names the key and what it must be.
    fn validate(&self) -> Result<(), String> {
        self.validate_storage()?;
        self.validate_limits()?;
        crate::auth::Access::of(self)?;
        self.validate_channels()?;
        self.validate_derived()
    }

    fn validate_storage(&self) -> Result<(), String> {
        let storage = &self.storage;
        let interval = storage.fsync_interval.0;
        if interval.is_zero() || interval > Duration::from_secs(3600) {
            return Err(format!(
                "storage.fsync_interval is {interval:?}; it must be from 1ms to 1h"
            ));
        }
        if storage.cache_capacity.0 < 1 << 20 {
            return Err(format!(
                "storage.cache_capacity is {} bytes; it must be at least 1MiB",
                storage.cache_capacity.0
            ));
        }
        if storage.message_cache.0 > 1 << 40 || storage.tail_cache.0 > 1 << 40 {
            return Err(format!(
                "storage.message_cache ({}) and storage.tail_cache ({}) must each be at most 1TiB",
                storage.message_cache.0, storage.tail_cache.0
            ));
        }
        if !(1 << 20..=1 << 30).contains(&storage.segment_size.0) {
            return Err(format!(
                "storage.segment_size is {} bytes; it must be from 1MiB to 1GiB",
                storage.segment_size.0
            ));
        }
        if storage.min_free_percent > 50 {
            return Err(format!(
                "storage.min_free_percent is {}; it must be from 0 to 50",
                storage.min_free_percent
            ));
        }
        if storage.reserve.0 > 1 << 30 {
            return Err(format!(
                "storage.reserve is {} bytes; it must be at most 1GiB (0 for none)",
                storage.reserve.0
            ));
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), String> {
        let limits = &self.limits;
        if !(1..=64 << 20).contains(&limits.max_message_bytes.0) {
            return Err(format!(
                "limits.max_message_bytes is {}; it must be from 1 to 64MiB",
                limits.max_message_bytes.0
            ));
        }
        if !(1..=100_000).contains(&limits.max_batch_messages) {
            return Err(format!(
                "limits.max_batch_messages is {}; it must be from 1 to 100000",
                limits.max_batch_messages
            ));
        }
        if limits.max_batch_bytes.0 < limits.max_message_bytes.0
            || limits.max_batch_bytes.0 > 256 << 20
        {
            return Err(format!(
                "limits.max_batch_bytes is {}; it must be at least limits.max_message_bytes ({}) and at most 256MiB",
                limits.max_batch_bytes.0, limits.max_message_bytes.0
            ));
        }
        if !(64 << 10..=1 << 30).contains(&limits.consumer_queue.0) {
            return Err(format!(
                "limits.consumer_queue is {} bytes; it must be from 64KiB to 1GiB",
                limits.consumer_queue.0
            ));
        }
        for (key, value, most) in [
            (
                "max_consumers_per_subscription",
                limits.max_consumers_per_subscription,
                100_000,
            ),
            ("max_connections", limits.max_connections, 1_000_000),
            (
                "max_streams_per_connection",
                limits.max_streams_per_connection,
                100_000,
            ),
        ] {
            if !(1..=most).contains(&value) {
                return Err(format!(
                    "limits.{key} is {value}; it must be from 1 to {most}"
                ));
            }
        }
        if !(1024..=1 << 20).contains(&limits.max_header_bytes.0) {
            return Err(format!(
                "limits.max_header_bytes is {}; it must be from 1KiB to 1MiB",
                limits.max_header_bytes.0
            ));
        }
        let stall = limits.consumer_stall_timeout.0;
        if stall < Duration::from_millis(100) || stall > Duration::from_secs(3600) {
            return Err(format!(
                "limits.consumer_stall_timeout is {stall:?}; it must be from 100ms to 1h"
            ));
        }
        Ok(())
    }

    /// Channel names (or patterns) and their subscriptions, each declared once.
    fn validate_channels(&self) -> Result<(), String> {
        let mut channels = HashSet::new();
        for (i, channel) in self.channels.iter().enumerate() {
            let key = format!("channels[{i}]");
            if Pattern::is_pattern(&channel.name) {
                Pattern::parse(&channel.name).map_err(|e| format!("{key}.name: {e}"))?;
                let settings = [
                    ("retention", channel.retention.is_some()),
                    ("dedup_window", channel.dedup_window.is_some()),
                    ("ttl", channel.ttl.is_some()),
                    ("limits", channel.limits.is_some()),
                ];
                if let Some((setting, _)) = settings.iter().find(|(_, set)| *set) {
                    return Err(format!(
                        "{key}.{setting}: {:?} is a pattern: it declares wildcard subscriptions \
                         only; channel settings go on the channels it matches",
                        channel.name
                    ));
                }
            } else {
                ferry_core::names::validate("channel", &channel.name)
                    .map_err(|e| format!("{key}.name: {e}"))?;
            }
            if !channels.insert(&channel.name) {
                return Err(format!(
                    "{key}.name: channel {:?} is declared twice",
                    channel.name
                ));
            }
            let mut subscriptions = HashSet::new();
            for (j, sub) in channel.subscriptions.iter().enumerate() {
                let key = format!("{key}.subscriptions[{j}]");
                ferry_core::names::validate("subscription", &sub.name)
                    .map_err(|e| format!("{key}.name: {e}"))?;
                if !subscriptions.insert(&sub.name) {
                    return Err(format!(
                        "{key}.name: subscription {:?} is declared twice in channel {:?}",
                        sub.name, channel.name
                    ));
                }
                ferry_core::check_settings(&sub.settings()).map_err(|e| format!("{key}: {e}"))?;
            }
        }
        Ok(())
    }

    /// Derived channels: valid names, never their own source, each pair once.
    fn validate_derived(&self) -> Result<(), String> {
        let mut derived = HashSet::new();
        for (i, d) in self.derived.iter().enumerate() {
            let key = format!("derived[{i}]");
            let source = match Pattern::is_pattern(&d.source) {
                true => Some(Pattern::parse(&d.source).map_err(|e| format!("{key}.source: {e}"))?),
                false => {
                    ferry_core::names::validate("channel", &d.source)
                        .map_err(|e| format!("{key}.source: {e}"))?;
                    None
                }
            };
            ferry_core::names::validate("channel", &d.target)
                .map_err(|e| format!("{key}.target: {e}"))?;
            let reads_itself = match &source {
                Some(pattern) => pattern.matches(&d.target),
                None => d.source == d.target,
            };
            if reads_itself {
                return Err(format!(
                    "{key}.target: {:?} is (or matches) its own source {:?}: give it another",
                    d.target, d.source
                ));
            }
            if !derived.insert((&d.source, &d.target)) {
                return Err(format!(
                    "{key}: {:?} is derived from {:?} twice",
                    d.target, d.source
                ));
            }
            if let Some(filter) = &d.filter
                && let Err(e) = ferry_core::filter::Filter::parse(filter)
            {
                return Err(format!("{key}.filter: {e}"));
            }
            d.spec()
                .reshape
                .check()
                .map_err(|e| format!("{key}: {e}"))?;
        }
        Ok(())
    }

    /// The broker options this configuration gives.
    pub fn broker_options(&self) -> BrokerOptions {
        let storage = &self.storage;
        BrokerOptions {
            store: StoreOptions {
                fsync: match storage.fsync {
                    FsyncSetting::Always => FsyncMode::Always,
                    FsyncSetting::Interval => FsyncMode::Interval(storage.fsync_interval.0),
                    FsyncSetting::Never => FsyncMode::Never,
                },
                cache_capacity_bytes: storage.cache_capacity.0,
                message_cache_bytes: storage.message_cache.0 as usize,
                tail_cache_bytes: storage.tail_cache.0 as usize,
                segment_bytes: storage.segment_size.0,
                preallocate: storage.preallocate_segments,
                space: SpaceOptions {
                    min_free_bytes: storage.min_free_bytes.0,
                    min_free_percent: storage.min_free_percent,
                    reserve_bytes: storage.reserve.0,
                },
                verify: match storage.verify_on_start {
                    VerifySetting::Tail => Verify::Tail,
                    VerifySetting::Full => Verify::Full,
                    VerifySetting::Off => Verify::Off,
                },
                // The broker supplies its dead-letter format.
                dead_letter: None,
                observer: None,
                ..StoreOptions::default()
            },
            on_damage: match storage.on_damage {
                DamageSetting::Skip => DamagePolicy::Skip,
                DamageSetting::Stop => DamagePolicy::Stop,
            },
            limits: Limits {
                max_message_bytes: self.limits.max_message_bytes.0 as usize,
                max_batch_messages: self.limits.max_batch_messages,
                max_batch_bytes: self.limits.max_batch_bytes.0 as usize,
            },
            consumers: ConsumerLimits {
                queue_bytes: self.limits.consumer_queue.0 as usize,
                stall_timeout: self.limits.consumer_stall_timeout.0,
                max_per_subscription: self.limits.max_consumers_per_subscription,
            },
        }
    }

    /// The declared derived channels.
    pub fn derived_specs(&self) -> Vec<DerivedSpec> {
        self.derived.iter().map(DerivedConfig::spec).collect()
    }

    /// The declared channels, for [`ferry_core::Broker::declare`].
    pub fn declarations(&self) -> Vec<ChannelDecl> {
        self.channels
            .iter()
            .map(|c| ChannelDecl {
                name: c.name.clone(),
                settings: ChannelSettings {
                    retention: c.retention.map_or_else(Retention::default, |r| Retention {
                        max_age_ms: r.max_age.map_or(0, |d| d.0.as_millis() as u64),
                        max_bytes: r.max_bytes.map_or(0, |b| b.0),
                    }),
                    dedup_window_ms: c
                        .dedup_window
                        .map_or(DEFAULT_DEDUP_WINDOW_MS, |d| d.0.as_millis() as u64),
                    default_ttl_ms: c.ttl.map_or(0, |d| d.0.as_millis() as u64),
                    limits: c
                        .limits
                        .map_or_else(ChannelLimits::default, |l| ChannelLimits {
                            max_messages: l.max_messages.unwrap_or(0),
                            max_bytes: l.max_bytes.map_or(0, |b| b.0),
                            policy: match l.policy {
                                PolicyConfig::Reject => LimitPolicy::Reject,
                                PolicyConfig::DropOldest => LimitPolicy::DropOldest,
                            },
                        }),
                },
                subscriptions: c
                    .subscriptions
                    .iter()
                    .map(|s| SubscriptionDecl {
                        name: s.name.clone(),
                        settings: s.settings(),
                    })
                    .collect(),
            })
            .collect()
    }
}

impl SubscriptionConfig {
    fn settings(&self) -> SubscriptionSettings {
        let retry = match &self.retry {
            None => RetryPolicy::default(),
            Some(retry) => RetryPolicy {
                initial_ms: retry.initial.0.as_millis() as u64,
                maximum_ms: retry.maximum.0.as_millis() as u64,
                multiplier: retry.multiplier,
                jitter: retry.jitter,
            },
        };
        SubscriptionSettings {
            ack_deadline_ms: self.ack_deadline.0.as_millis() as u64,
            retry,
            max_delivery_attempts: self.max_delivery_attempts,
            dead_letter_channel: self.dead_letter_channel.clone(),
            ordering: self.ordering,
            filter: self.filter.clone().filter(|f| !f.is_empty()),
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(HumanDuration)
            .map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Number(n)) => Ok(ByteSize(n)),
            Ok(Raw::Text(text)) => parse_size(&text)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
            Err(_) => Err(serde::de::Error::custom(
                "expected a size: a number of bytes or a string like \"64MiB\"",
            )),
        }
    }
}

/// A listening address: an IP address and port, or `localhost:PORT` (which is 127.0.0.1, the
/// loopback address every system has, rather than whatever a resolver says).
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Some(port) = text.strip_prefix("localhost:") {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{text:?}: the port must be a number from 0 to 65535"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|_| {
        format!(
            "{text:?} is not an address to listen on: write IP:PORT (\"127.0.0.1:50051\", \
             \"[::1]:50051\", \"0.0.0.0:50051\") or localhost:PORT"
        )
    })
}

fn listen_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_listen(&text).map_err(serde::de::Error::custom)
}

/// A duration as people write it (humantime's forms: "30s", "250ms", "5m", "1h 30m", "7d").
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| {
        format!(
            "invalid duration {text:?} ({e}): write a number and a unit, like \"30s\", \"250ms\", \"5m\", \"1h 30m\" or \"7d\""
        )
    })
}

/// A size as people write it (bytesize's forms: "64MiB", "1GiB", "512KB", "1000").
fn parse_size(text: &str) -> Result<u64, String> {
    let bad = |why: &str| {
        format!(
            "invalid size {text:?} ({why}): write a number of bytes, or a number and a unit like \"64MiB\", \"1GiB\" or \"500MB\""
        )
    };
    let size: bytesize::ByteSize = text.trim().parse().map_err(|e: String| bad(&e))?;
    // The parser saturates what is too big to count.
    match size.as_u64() {
        u64::MAX => Err(bad("too large")),
        bytes => Ok(bytes),
    }
}

impl fmt::Display for FsyncSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsyncSetting::Always => "always",
            FsyncSetting::Interval => "interval",
            FsyncSetting::Never => "never",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        Config::parse(toml, "t.toml").unwrap()
    }

    #[test]
    fn the_shipped_default_file_is_the_default() {
        assert_eq!(Config::builtin(), Config::default());
    }

    #[test]
    fn declarations_parse() {
        let config = Config::parse(
            r#"
            [storage]
            fsync = "interval"
            fsync_interval = "50ms"
            cache_capacity = "64MiB"

            [[channels]]
            name = "orders.created"
            [[channels.subscriptions]]
            name = "billing"
            ack_deadline = "5s"
            "#,
            "test.toml",
        )
        .unwrap();
        assert_eq!(
            config.broker_options().store.fsync,
            FsyncMode::Interval(Duration::from_millis(50))
        );
        assert_eq!(config.storage.cache_capacity, ByteSize(64 << 20));
        let decls = config.declarations();
        assert_eq!(decls[0].subscriptions[0].settings.ack_deadline_ms, 5000);
    }

    #[test]
    fn only_loopback_is_served_without_allow_unauthenticated() {
        assert!(Config::builtin().check_exposure().is_ok());
        let v6 = config("[server]\nlisten = \"[::1]:50051\"\n");
        assert!(v6.check_exposure().is_ok());
        let open = config("[server]\nlisten = \"0.0.0.0:50051\"\n");
        let refused = open.check_exposure().unwrap_err();
        assert!(
            refused.contains("allow_unauthenticated = true"),
            "{refused}"
        );
        let allowed =
            config("[server]\nlisten = \"0.0.0.0:50051\"\nallow_unauthenticated = true\n");
        assert!(allowed.check_exposure().is_ok());
        let docker = config(include_str!("../../../docker/ferry.toml"));
        assert!(
            docker.check_exposure().is_ok(),
            "the image's config says so"
        );
    }

    #[test]
    fn localhost_is_loopback() {
        let local = config("[server]\nlisten = \"localhost:7000\"\n");
        assert_eq!(local.server.listen, "127.0.0.1:7000".parse().unwrap());
        assert!(local.check_exposure().is_ok());
        let bad = Config::parse("[server]\nlisten = \"somewhere\"\n", "f").unwrap_err();
        assert!(bad.to_string().contains("IP:PORT"), "{bad}");
    }

    #[test]
    fn principals_authenticate_clients_beyond_loopback() {
        let exposed = "[server]\nlisten = \"0.0.0.0:50051\"\n";
        assert!(config(exposed).check_exposure().is_err());
        let hash = crate::auth::token::hash("a token long enough to be used");
        let with = format!("{exposed}[[principals]]\nname = \"app\"\ntokens = [\"{hash}\"]\n");
        assert!(config(&with).check_exposure().is_ok());
        let mut from_environment = config(exposed);
        from_environment.add_admin_token(&hash).unwrap();
        assert!(from_environment.check_exposure().is_ok());
        let mut twice = config(&with.replace("\"app\"", "\"admin\""));
        let clash = twice.add_admin_token(&hash).unwrap_err();
        assert!(clash.contains("FERRY_ADMIN_TOKEN_HASH"), "{clash}");
        for (bad, why) in [
            ("tokens = [\"hunter2\"]", "ferry token hash"),
            ("tokens = []", "no way to authenticate"),
            (
                "certificates = [\"x\"]\npublish = [\"orders.*/billing\"]",
                "names subscriptions",
            ),
            (
                "certificates = [\"x\"]\nadmin = [\"orders.>.x\"]",
                "principals[0].admin[0]",
            ),
        ] {
            let text = format!("[[principals]]\nname = \"app\"\n{bad}\n");
            let message = Config::parse(&text, "f").unwrap_err().to_string();
            assert!(message.contains(why), "{bad}: {message}");
        }
    }

    #[test]
    fn a_derived_channel_may_not_forge_a_dead_letter() {
        let forged = "[[derived]]\nsource = \"a\"\ntarget = \"b\"\n\
                      set = { \"ferry.dead_letter.channel\" = \"payments\" }\n";
        let message = Config::parse(forged, "f").unwrap_err().to_string();
        assert!(
            message.contains("derived[0]") && message.contains("only the broker"),
            "{message}"
        );
    }

    #[test]
    fn durations_and_sizes_take_the_forms_people_write() {
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_duration("soon").unwrap_err().contains("\"30s\""));
        assert!(parse_size("lots").unwrap_err().contains("\"64MiB\""));
    }

    #[test]
    fn errors_name_the_file_the_key_and_the_problem() {
        let cases = [
            ("[server]\nlisten = \"nowhere\"\n", "listen"),
            ("[storage]\nfsync = \"sometimes\"\n", "fsync"),
            ("[storage]\nfsink = \"always\"\n", "unknown field `fsink`"),
            (
                "[[channels]]\nname = \"a\"\n[[channels]]\nname = \"a\"\n",
                "channels[1].name: channel \"a\" is declared twice",
            ),
            ("[[channels]]\nname = \"a b\"\n", "channels[0].name"),
            (
                "[[channels]]\nname = \"a\"\n[[channels.subscriptions]]\nname = \"s\"\nack_deadline = \"soon\"\n",
                "invalid duration \"soon\"",
            ),
            (
                "[[channels]]\nname = \"orders.*\"\nttl = \"1h\"\n",
                "channels[0].ttl: \"orders.*\" is a pattern",
            ),
            (
                "[[channels]]\nname = \"orders.>.x\"\n",
                "channels[0].name: invalid channel pattern",
            ),
            ("[limits]\nmax_batch_bytes = 10\n", "limits.max_batch_bytes"),
            (
                "[storage]\nfsync_interval = \"99999999999999999h\"\n",
                "invalid duration",
            ),
            (
                "[storage]\ntail_cache = \"99999999999999GiB\"\n",
                "invalid size",
            ),
        ];
        for (text, expected) in cases {
            let message = Config::parse(text, "bad.toml").unwrap_err().to_string();
            assert!(message.starts_with("bad.toml: "), "{message}");
            assert!(message.contains(expected), "{expected:?} not in {message}");
        }
        let message = Config::parse("[storage]\nfsync = \"sometimes\"\n", "bad.toml")
            .unwrap_err()
            .to_string();
        assert!(message.contains("line 2"), "{message}");
    }
}
