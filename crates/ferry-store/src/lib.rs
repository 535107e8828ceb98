//! Ferry's durable store: the only crate that names sled.
//!
//! It owns the on-disk layout (`codec`): the segment log (`segment`), which is the
//! write-ahead log of every commit (message records, then a commit frame with the commit's
//! other changes, `change`), and its index in sled next to the metadata and ack state; the
//! group-commit writer thread (`writer`) through which every change goes; recovery, which
//! replays the log past sled's durable point (`recovery`); and the read side, a per-channel
//! [`ChannelLog`] that keeps the newest messages in memory for live subscribers and reads older
//! ones from their segment files.
//!
//! What it promises (with the default [`FsyncMode::Always`]): a write is acknowledged only after
//! its commit is written to the segment log and `fdatasync`'d: one device sync per commit,
//! shared by everything the commit carries. sled is brought up to date in memory at once and
//! made durable in the background (its flush, the `fdatasync` of its log file that its own
//! `flush()` leaves out on Linux, spacejam/sled#1452, and of any blob file with its directory);
//! a crash before that loses nothing, since recovery replays the log from sled's durable
//! point. Messages are stored once, however many subscriptions a channel has, in records of many
//! messages; a record is dropped from the index once every subscription's ack floor has passed
//! it, and a segment file is deleted once no record in it is indexed and sled's durable point
//! has passed it.

mod batch;
mod change;
mod codec;
mod failpoint;
mod ids;
pub mod inspect;
mod log;
mod message;
mod recovery;
mod segment;
mod space;
mod writer;

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot, watch};

pub use log::ChannelLog;
use log::MessageCache;
pub use message::{Attributes, Message, NewMessage};
use space::Space;
pub use space::{SpaceOptions, SpaceReport};
use writer::{Op, Queued, Writer};

/// Identifies a channel inside the store (names live in the channel's record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(pub u32);

/// Identifies a subscription inside the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(pub u32);

/// A subscription's durable acknowledgement state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckState {
    /// Every sequence below this is acked.
    pub floor: u64,
    /// Messages acked since the subscription was created.
    pub acked_total: u64,
    /// Acked ranges `[start, end)` above the floor, sorted and disjoint, none touching the floor.
    pub acked_above_floor: Vec<(u64, u64)>,
}

/// A subscription's settings, as stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubscriptionSettings {
    /// How long a delivery may stay unacked before it is redelivered.
    pub ack_deadline_ms: u64,
    /// How long a failed delivery waits before the message is delivered again.
    pub retry: RetryPolicy,
    /// After this many failed deliveries a message is dead-lettered (0: no limit).
    pub max_delivery_attempts: u32,
    /// Where messages go after their last attempt or a terminal nack.
    pub dead_letter: Option<ChannelId>,
    /// Whether messages with the same key are delivered one at a time, in order.
    pub ordering: bool,
}

impl SubscriptionSettings {
    /// The settings as the store encodes them, for the broker's catalog entries.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48);
        codec::encode_settings(self, &mut out);
        out
    }

    /// Reads what [`SubscriptionSettings::encode`] wrote from the front of `raw`, which is
    /// left after them.
    pub fn decode(raw: &mut &[u8]) -> Option<Self> {
        codec::decode_settings(raw)
    }
}

impl Default for SubscriptionSettings {
    fn default() -> Self {
        Self {
            ack_deadline_ms: 30_000,
            retry: RetryPolicy::default(),
            max_delivery_attempts: 0,
            dead_letter: None,
            ordering: true,
        }
    }
}

/// The backoff between a failed delivery and the next: the n-th retry waits
/// `min(maximum, initial × multiplier^(n-1))`, then ± `jitter` × that. All zeros (the default)
/// retry at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// The wait before the first retry.
    pub initial_ms: u64,
    /// The longest wait.
    pub maximum_ms: u64,
    /// Each retry waits this many times longer than the one before (at least 1).
    pub multiplier: f64,
    /// The fraction (0 to 1) by which a wait is randomly shortened or lengthened.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_ms: 0,
            maximum_ms: 0,
            multiplier: 1.0,
            jitter: 0.0,
        }
    }
}

/// What a subscription durably remembers of a message's failed deliveries, so that attempt
/// counts and backoff survive a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Failed deliveries so far: the next delivery is attempt `count + 1`.
    pub count: u32,
    /// Not to be delivered again before this time (ms since the Unix epoch).
    pub retry_at_ms: u64,
    /// The last failure's cause (`deadline`, `nack`, `released`).
    pub cause: String,
    /// The consumer's reason text of the last nack ("" if none).
    pub reason: String,
}

/// A new ack state and what goes with it, committed as one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AckUpdate {
    /// The subscription's ack state.
    pub state: AckState,
    /// Failure records to write (`Some`) or drop (`None`), by sequence.
    pub failures: Vec<(u64, Option<Failure>)>,
    /// Messages to append to a dead-letter channel in the same commit (the state acks their
    /// originals): each with its original's sequence and the channel it goes to. One whose
    /// original an earlier committed state acks already was appended then, and is left out:
    /// so a subscription may send every dead letter it has not seen confirmed with each save,
    /// and a dead letter always commits with the first state that acks its original.
    pub dead_letters: Vec<(u64, ChannelId, NewMessage)>,
}

impl AckState {
    /// Whether `seq` is acked in this state.
    pub fn contains(&self, seq: u64) -> bool {
        if seq < self.floor {
            return true;
        }
        let at = self
            .acked_above_floor
            .partition_point(|&(start, _)| start <= seq);
        at > 0 && seq < self.acked_above_floor[at - 1].1
    }
}

/// How long a channel keeps messages every subscription has acked (zeros: not at all, the
/// default). A message goes once it is older than `max_age_ms`, or once the channel's stored
/// bytes exceed `max_bytes` (oldest first), whichever comes first; messages some subscription
/// has not acked always stay. Space comes back a record, and a segment file, at a time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep acked messages this long (0: not by age).
    pub max_age_ms: u64,
    /// Keep acked messages while the channel stores at most this many bytes (0: not by size).
    pub max_bytes: u64,
}

impl Retention {
    /// Whether the channel keeps acked messages at all.
    pub fn keeps(&self) -> bool {
        self.max_age_ms > 0 || self.max_bytes > 0
    }
}

/// A channel's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelSettings {
    /// How long it keeps acked messages.
    pub retention: Retention,
    /// A published message whose non-empty `id` the channel stored this recently is a
    /// duplicate: not stored again (0: no de-duplication).
    pub dedup_window_ms: u64,
    /// A message published without its own time to live gets this one (0: none).
    pub default_ttl_ms: u64,
    /// How much the channel may hold, and what happens when it is full.
    pub limits: ChannelLimits,
}

/// The most a channel may store (zeros: no limit). Messages kept only by retention count and
/// are the first to go; the policy applies once unacked (and delayed) messages alone reach a
/// limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelLimits {
    /// Messages stored (0: no limit).
    pub max_messages: u64,
    /// Bytes stored, as the messages count against size limits (0: no limit).
    pub max_bytes: u64,
    /// What a publish that would go past a limit does.
    pub policy: LimitPolicy,
}

impl ChannelLimits {
    /// Whether the channel has a limit at all.
    pub fn any(&self) -> bool {
        self.max_messages > 0 || self.max_bytes > 0
    }
}

/// What a full channel does with a new message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LimitPolicy {
    /// The publish is refused.
    #[default]
    Reject,
    /// The oldest unacked messages are dropped to make room.
    DropOldest,
}

/// What an append did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Appended {
    /// The sequences the stored messages got, in the order given.
    pub stored: Range<u64>,
    /// The messages not stored because the channel stored their `id` within its
    /// de-duplication window: their index in the batch, and the original's sequence (0 for a
    /// delayed original).
    pub duplicates: Vec<(usize, u64)>,
    /// The messages kept aside until their delivery time (see [`DELIVER_AT`]): their index in
    /// the batch. They get their sequences when they enter the channel.
    pub delayed: Vec<usize>,
}

impl Appended {
    /// Each message's sequence, in the order given (a duplicate's is its original's; a
    /// delayed message's is 0).
    pub fn sequences(&self) -> Vec<u64> {
        let total = self.stored.end - self.stored.start
            + self.duplicates.len() as u64
            + self.delayed.len() as u64;
        let mut next = self.stored.start;
        let mut duplicates = self.duplicates.iter().peekable();
        let mut delayed = self.delayed.iter().peekable();
        (0..total as usize)
            .map(|i| {
                if let Some((_, original)) = duplicates.next_if(|(at, _)| *at == i) {
                    *original
                } else if delayed.next_if(|&&at| at == i).is_some() {
                    0
                } else {
                    next += 1;
                    next - 1
                }
            })
            .collect()
    }
}

/// The attribute that delays a message: the time (ms since the Unix epoch) before which it
/// must not be delivered. A published message whose time is still ahead is stored aside, at
/// once and durably, and enters its channel (getting its sequence and publish time) when the
/// time comes; it keeps the attribute, so consumers see when it was due.
pub const DELIVER_AT: &str = "ferry.deliver_at";

/// The de-duplication window of a channel that does not set one.
pub const DEFAULT_DEDUP_WINDOW_MS: u64 = 120_000;

impl Default for ChannelSettings {
    fn default() -> Self {
        Self {
            retention: Retention::default(),
            dedup_window_ms: DEFAULT_DEDUP_WINDOW_MS,
            default_ttl_ms: 0,
            limits: ChannelLimits::default(),
        }
    }
}

/// Where a new subscription starts, or a seek goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Position {
    /// After the last message published (the default for a new subscription).
    #[default]
    Latest,
    /// At the first message still stored.
    Earliest,
    /// At this sequence.
    Sequence(u64),
    /// At the first message published at or after this time (ms since the Unix epoch).
    Time(u64),
    /// Where another subscription of the same channel is: a copy of its ack state, as last
    /// saved.
    AckStateOf(SubscriptionId),
}

/// When a write counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncMode {
    /// After it is written and fsync'd: survives a crash of the process and of the machine.
    Always,
    /// After it is written to the OS (survives a crash of the process); fsync'd at most this long
    /// later, so a power loss can lose that window.
    Interval(Duration),
    /// After it is written to the OS (survives a crash of the process), never fsync'd by the
    /// store: a power loss can lose whatever the OS had not written back.
    Never,
}

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// When writes are confirmed.
    pub fsync: FsyncMode,
    /// sled's page cache size.
    pub cache_capacity_bytes: u64,
    /// How many bytes of the newest messages all channels together keep decoded in memory for
    /// live subscribers (at their real size in memory); older ones are read from disk. The
    /// channels read least recently give up their cached messages first.
    pub message_cache_bytes: usize,
    /// The most of `message_cache_bytes` that one channel may hold.
    pub tail_cache_bytes: usize,
    /// The size at which a segment file is finished and a new one started. Disk space comes
    /// back a whole segment file at a time, once every record in it is acked.
    pub segment_bytes: u64,
    /// Segment files are preallocated (written full of zeros in the background before they
    /// are used): each sync then flushes data alone, with no journal commit, for twice the
    /// bytes written.
    pub preallocate: bool,
    /// The free-space watermark and reserve.
    pub space: SpaceOptions,
    /// Which message records are checked when the store opens.
    pub verify: Verify,
    /// How a message dropped from a full channel becomes a dead letter for a subscription with
    /// a dead-letter channel (the broker's format; `None`: dropped messages are not
    /// dead-lettered).
    pub dead_letter: Option<DeadLetterFn>,
    /// Told of every durable commit (`None`: nobody listens).
    pub observer: Option<Arc<dyn CommitObserver>>,
    /// The longest a commit's index writes wait to be applied to sled together with the next
    /// commits' (sled charges a fixed cost per batch; the commit is durable without them).
    pub index_lag: Duration,
}

/// Listens to the store's commits, for metrics: called on the writer's thread after each group
/// is durable, so it must be quick (a few atomic additions).
pub trait CommitObserver: Send + Sync + std::fmt::Debug {
    /// A group was committed.
    fn committed(&self, commit: &Commit);
}

/// What one group commit took and carried.
#[derive(Debug, Clone, Copy)]
pub struct Commit {
    /// From the writer taking the group to the group being durable (when its callers are
    /// answered; sled indexes it after).
    pub took: Duration,
    /// The device sync of the segment log within it (`None` when the fsync mode did not sync).
    pub sync: Option<Duration>,
    /// Messages appended.
    pub messages: usize,
    /// Ack states saved.
    pub ack_states: u64,
}

/// Makes the dead-letter copy of a message the store drops for a subscription (`None`: the
/// message is not the subscription's to dead-letter).
pub type DeadLetterFn = fn(&Message, &Dropped<'_>) -> Option<NewMessage>;

/// Why and for whom a dropped message is dead-lettered.
#[derive(Debug, Clone, Copy)]
pub struct Dropped<'a> {
    /// The channel it was dropped from.
    pub channel: &'a str,
    /// The subscription whose dead-letter channel receives it.
    pub subscription: &'a str,
    /// Its failed deliveries to that subscription so far.
    pub attempts: u32,
    /// When it was dropped (ms since the Unix epoch).
    pub now_ms: u64,
}

/// Which message records are read back and checked when the store opens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Verify {
    /// The last record of every segment file: where a crash or a truncation shows.
    #[default]
    Tail,
    /// Every record (start-up then reads the whole backlog).
    Full,
    /// None (records are still checked on every read).
    Off,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            fsync: FsyncMode::Always,
            cache_capacity_bytes: 128 << 20,
            message_cache_bytes: 256 << 20,
            tail_cache_bytes: 64 << 20,
            segment_bytes: 64 << 20,
            preallocate: false,
            space: SpaceOptions::default(),
            verify: Verify::default(),
            dead_letter: None,
            observer: None,
            index_lag: Duration::from_millis(10),
        }
    }
}

/// Everything that can go wrong in the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database itself failed (I/O error, disk full, ...).
    #[error("storage failure: {0}")]
    Backend(String),
    /// A file the store must sync could not be.
    #[error("storage I/O failure on {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
    /// Free space is below the watermark: publishing is refused until space is freed.
    #[error(
        "free space on the data directory's filesystem is {} MiB, below the {} MiB that \
         publishing needs (storage.min_free_bytes or min_free_percent, plus storage.reserve \
         while the reserve is released): publishing is refused until space is freed; acking \
         messages and deleting channels frees it",
        .free >> 20,
        .watermark >> 20
    )]
    NoSpace {
        /// Free bytes.
        free: u64,
        /// The watermark.
        watermark: u64,
    },
    /// A write failed because the disk is full; nothing of it was kept.
    #[error(
        "the disk is full (writing {path}): the write was refused; publishing resumes once space \
         is freed, acks go on"
    )]
    DiskFull {
        /// The file being written.
        path: PathBuf,
    },
    /// A message record cannot be read back (a damaged or truncated segment file): the
    /// messages it held are lost.
    #[error(
        "damaged record in segment {segment} at offset {offset} (sequences {first_seq} to {}): {reason}",
        .end_seq - 1
    )]
    Damaged {
        /// The segment file's id.
        segment: u32,
        /// Where the record starts in it.
        offset: u64,
        /// The first sequence the record holds.
        first_seq: u64,
        /// One past the last sequence it holds.
        end_seq: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// Data read back does not match what was written.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// An earlier write failed; the store refuses writes until it is reopened.
    #[error("the store stopped accepting writes after an earlier failure: {0}")]
    Failed(String),
    /// The store was closed.
    #[error("the store is closed")]
    Closed,
    /// No channel with that id (it may have been deleted).
    #[error("channel does not exist")]
    ChannelNotFound,
    /// A channel with that name exists.
    #[error("channel {0:?} already exists")]
    ChannelExists(String),
    /// No subscription with that id (it may have been deleted).
    #[error("subscription does not exist")]
    SubscriptionNotFound,
    /// The channel has a subscription of that name.
    #[error("subscription {0:?} already exists")]
    SubscriptionExists(String),
    /// The channel is the dead-letter channel of a subscription.
    #[error("channel is the dead-letter channel of subscription {0:?}")]
    ChannelInUse(String),
    /// A publish would take a channel past a limit, and its policy is to refuse it.
    #[error(
        "channel {channel:?} is full: {limit}; its policy refuses publishes until subscriptions \
         ack messages (or the limit is raised)"
    )]
    ChannelFull {
        /// The channel's name.
        channel: String,
        /// Which limit, in words, with what is stored.
        limit: String,
    },
    /// A position before the first message still stored (or after the last).
    #[error(
        "{wanted} is out of range: the first message still stored is {first_seq}{}, the next to \
         be published {next_seq}",
        .first_time_ms.map(|t| format!(" (published at {t} ms since the Unix epoch)")).unwrap_or_default()
    )]
    OutOfRange {
        /// What was asked, in words.
        wanted: String,
        /// The first sequence still stored.
        first_seq: u64,
        /// When it was published, if it is known.
        first_time_ms: Option<u64>,
        /// The next sequence.
        next_seq: u64,
    },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// Results of the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A channel as found when the store is opened.
#[derive(Debug, Clone)]
pub struct RecoveredChannel {
    /// Its id.
    pub id: ChannelId,
    /// Its name.
    pub name: String,
    /// Its settings.
    pub settings: ChannelSettings,
}

/// A subscription as found when the store is opened.
#[derive(Debug, Clone)]
pub struct RecoveredSubscription {
    /// Its id.
    pub id: SubscriptionId,
    /// Its channel.
    pub channel: ChannelId,
    /// Its name.
    pub name: String,
    /// Its settings.
    pub settings: SubscriptionSettings,
    /// Its filter's text ("": none).
    pub filter: String,
    /// What the broker keeps with it besides (opaque to the store).
    pub transform: Vec<u8>,
    /// Its durable ack state.
    pub acks: AckState,
    /// Failure records of its unacked messages, by sequence.
    pub failures: Vec<(u64, Failure)>,
}

/// What the store holds at start-up: metadata and ack state only, never the backlog itself, so
/// recovery time and memory grow with the number of channels and subscriptions.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// All channels.
    pub channels: Vec<RecoveredChannel>,
    /// All subscriptions.
    pub subscriptions: Vec<RecoveredSubscription>,
    /// The broker's catalog (see [`Store::put_catalog`]).
    pub catalog: std::collections::BTreeMap<String, Vec<u8>>,
}

/// What the store has done since it opened: the figures that say how well group commit works
/// (messages and device syncs per commit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Groups committed.
    pub commits: u64,
    /// Device syncs: fdatasync and fsync of files and directories, and sled's own flushes
    /// (`sync_file_range`).
    pub device_syncs: u64,
    /// Messages appended.
    pub messages: u64,
    /// Ack states saved.
    pub ack_states: u64,
    /// Checkpoints of the index (sled made durable in the background).
    pub checkpoints: u64,
}

/// The live counters behind [`StoreCounters`], shared by everything in the store that commits
/// or syncs.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub commits: std::sync::atomic::AtomicU64,
    pub device_syncs: std::sync::atomic::AtomicU64,
    pub messages: std::sync::atomic::AtomicU64,
    pub ack_states: std::sync::atomic::AtomicU64,
    pub checkpoints: std::sync::atomic::AtomicU64,
}

impl Counters {
    /// Counts `n` device syncs.
    pub(crate) fn synced(&self, n: u64) {
        self.device_syncs
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn snapshot(&self) -> StoreCounters {
        use std::sync::atomic::Ordering::Relaxed;
        StoreCounters {
            commits: self.commits.load(Relaxed),
            device_syncs: self.device_syncs.load(Relaxed),
            messages: self.messages.load(Relaxed),
            ack_states: self.ack_states.load(Relaxed),
            checkpoints: self.checkpoints.load(Relaxed),
        }
    }
}

/// A channel's log figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// The sequence the next message gets (the durable end of the log).
    pub next_seq: u64,
    /// The first sequence still stored.
    pub first_seq: u64,
    /// Encoded bytes of the records still stored.
    pub bytes: u64,
    /// Messages stored aside until their delivery time.
    pub delayed: u64,
    /// Their encoded bytes.
    pub delayed_bytes: u64,
    /// Messages dropped to keep the channel within its limits, ever.
    pub dropped: u64,
}

/// How many write requests may wait for the writer before callers wait to enqueue...
const WRITE_QUEUE: usize = 1024;
/// ...and how many bytes of them (their messages, acks and dead letters): clients decide how
/// big a request is, so the count alone would let 1,024 of the largest publishes queue. A
/// request larger than this takes all of it, and waits for the queue to be empty.
const WRITE_QUEUE_BYTES: usize = 64 << 20;

/// A handle to the open store; cheap to clone. Writes go to one writer thread that commits them in
/// groups (one sled batch and one fsync for many callers); reads run on the caller's thread.
#[derive(Clone)]
pub struct Store {
    ops: mpsc::Sender<Queued>,
    /// The bytes the queue may still take: a request holds its share until the writer takes it.
    queue_bytes: Arc<Semaphore>,
    shared: Arc<Shared>,
}

/// State shared by the writer thread and readers.
struct Shared {
    /// The open channels' logs; the writer adds and removes entries.
    logs: RwLock<HashMap<ChannelId, Arc<ChannelLog>>>,
    /// The budget all channels' cached messages share.
    cache: Arc<MessageCache>,
    /// The data directory's free space.
    space: Arc<Space>,
    /// Commits and device syncs so far.
    counters: Arc<Counters>,
    /// Set when a write failed: from then on the store refuses writes (sled's I/O errors are
    /// sticky, and confirming anything after one would be a lie).
    failure: Mutex<Option<String>>,
    /// The writer thread, joined on close.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Store {
    /// Opens (or creates) the store in `dir` and starts its writer thread. Returns what it holds.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<(Store, Recovered)> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        // First, so that on a full disk the reserve is released before sled needs to write.
        let space = Space::open(dir, options.space)?;
        let db = open_sled(dir, &options)?;
        let cache = Arc::new(MessageCache::new(
            options.message_cache_bytes,
            options.tail_cache_bytes,
        ));
        let counters = Arc::new(Counters::default());
        let (writer, recovered, logs) = Writer::recover(
            db,
            dir,
            &options,
            cache.clone(),
            space.clone(),
            counters.clone(),
        )?;
        let (ops, rx) = mpsc::channel(WRITE_QUEUE);
        let shared = Arc::new(Shared {
            logs: RwLock::new(logs),
            cache,
            space: space.clone(),
            counters,
            failure: Mutex::new(None),
            writer: Mutex::new(None),
        });
        let handle = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("ferry-store-writer".into())
                .spawn(move || writer.run(rx, shared))
                .map_err(|e| io_error(dir, e))?
        };
        *shared.writer.lock().expect("writer lock") = Some(handle);
        space.monitor()?;
        let queue_bytes = Arc::new(Semaphore::new(WRITE_QUEUE_BYTES));
        let store = Store {
            ops,
            queue_bytes,
            shared,
        };
        Ok((store, recovered))
    }

    /// Appends messages to a channel; resolves once they are durable, with their sequences.
    pub async fn append(&self, channel: ChannelId, messages: Vec<NewMessage>) -> Result<Appended> {
        self.submit_append(channel, messages)
            .await?
            .confirmed()
            .await
    }

    /// Queues an append and returns once it is queued: appends queued one after another from one
    /// task get increasing sequences in that order. The confirmation resolves once it is durable.
    pub async fn submit_append(
        &self,
        channel: ChannelId,
        messages: Vec<NewMessage>,
    ) -> Result<Confirmation<Appended>> {
        self.shared.space.check()?;
        self.submit(|reply| Op::Append {
            channel,
            messages,
            reply,
        })
        .await
    }

    /// Queues several appends at once, in order, as [`Store::submit_append`] would one after
    /// another, except that the writer takes them together, so that they share a commit: what a
    /// publisher sent at once is made durable by one sync, not by as many as were ready before
    /// the writer woke. Each keeps its own confirmation (and is refused or not on its own).
    pub async fn submit_appends(
        &self,
        appends: Vec<(ChannelId, Vec<NewMessage>)>,
    ) -> Result<Vec<Confirmation<Appended>>> {
        let mut confirmations = Vec::with_capacity(appends.len());
        let mut ops = appends.into_iter().map(|(channel, messages)| {
            let (reply, answer) = oneshot::channel();
            confirmations.push(Confirmation { answer });
            Op::Append {
                channel,
                messages,
                reply,
            }
        });
        let Some(op) = ops.next() else {
            return Ok(Vec::new());
        };
        self.shared.space.check()?;
        let more: Vec<Op> = ops.collect();
        self.enqueue(op, more).await?;
        Ok(confirmations)
    }

    /// Replaces a subscription's ack state; resolves once it is durable.
    pub async fn save_acks(&self, subscription: SubscriptionId, state: AckState) -> Result<()> {
        let update = AckUpdate {
            state,
            ..AckUpdate::default()
        };
        self.submit_acks(subscription, update)
            .await?
            .confirmed()
            .await
    }

    /// Queues a new ack state with its failure records and dead letters, committed as one;
    /// states queued one after another are committed in that order, so a later state never
    /// loses to an earlier one.
    pub async fn submit_acks(
        &self,
        subscription: SubscriptionId,
        update: AckUpdate,
    ) -> Result<Confirmation<()>> {
        self.submit(|reply| Op::SaveAcks {
            subscription,
            update,
            reply,
        })
        .await
    }

    /// Moves dead letters back to their origin: appends each message to channel `to` and
    /// withdraws its sequence from channel `from`, in one commit. Sequences already withdrawn
    /// or no longer stored are left out; returns each moved (`from` sequence, `to` sequence).
    pub async fn redrive(
        &self,
        from: ChannelId,
        to: ChannelId,
        moves: Vec<(u64, NewMessage)>,
    ) -> Result<Vec<(u64, u64)>> {
        self.shared.space.check()?;
        self.call(|reply| Op::Redrive {
            from,
            to,
            moves,
            reply,
        })
        .await
    }

    /// Creates a channel.
    pub async fn create_channel(
        &self,
        name: String,
        settings: ChannelSettings,
    ) -> Result<ChannelId> {
        self.call(|reply| Op::CreateChannel {
            name,
            settings,
            reply,
        })
        .await
    }

    /// Changes a channel's settings.
    pub async fn update_channel(
        &self,
        channel: ChannelId,
        settings: ChannelSettings,
    ) -> Result<()> {
        self.call(|reply| Op::UpdateChannel {
            channel,
            settings,
            reply,
        })
        .await
    }

    /// Bytes of the records of `channel` below `floor`: what retention alone keeps when
    /// `floor` is the lowest ack floor of its subscriptions. Counted from sled's index of the
    /// records, which lags the last commits by up to `index_lag`: [`Store::catch_up`] first
    /// counts them too.
    pub fn retained_bytes(&self, channel: ChannelId, floor: u64) -> Result<u64> {
        self.log(channel)?.bytes_below(floor)
    }

    /// Brings sled up to date with every commit so far, for reads that go to sled alone
    /// ([`Store::retained_bytes`]). Where the writer cannot (a failed store, a group refused for
    /// a full disk), sled stays as it is: such reads then give a figure a little behind.
    pub async fn catch_up(&self) {
        if let Err(e) = self.call(|reply| Op::CatchUp { reply }).await {
            tracing::debug!(error = %e, "sled's index not brought up to date; reads of it lag");
        }
    }

    /// Deletes a channel with its messages and subscriptions.
    pub async fn delete_channel(&self, channel: ChannelId) -> Result<()> {
        self.call(|reply| Op::DeleteChannel { channel, reply })
            .await
    }

    /// Creates a subscription that starts at `start`; returns its id and ack state.
    pub async fn create_subscription(
        &self,
        channel: ChannelId,
        name: String,
        settings: SubscriptionSettings,
        start: Position,
    ) -> Result<(SubscriptionId, AckState)> {
        self.create_filtered_subscription(channel, name, settings, start, String::new(), Vec::new())
            .await
    }

    /// Creates a subscription with a filter (its text, kept as given: the broker parses it)
    /// and a transform (bytes only the broker reads).
    pub async fn create_filtered_subscription(
        &self,
        channel: ChannelId,
        name: String,
        settings: SubscriptionSettings,
        start: Position,
        filter: String,
        transform: Vec<u8>,
    ) -> Result<(SubscriptionId, AckState)> {
        self.call(|reply| Op::CreateSubscription {
            channel,
            name,
            settings,
            start,
            filter,
            transform,
            reply,
        })
        .await
    }

    /// Writes (`Some`) or removes (`None`) an entry of the broker's catalog: small named
    /// entries the broker keeps with the store (its wildcard subscriptions, for one), committed
    /// like every other change and handed back by [`Store::open`]. Their bytes mean nothing to
    /// the store.
    pub async fn put_catalog(&self, key: String, value: Option<Vec<u8>>) -> Result<()> {
        self.call(|reply| Op::Catalog { key, value, reply }).await
    }

    /// Moves a subscription to `position`: its ack state is replaced (everything before the
    /// position acked, everything after not) and its failure records dropped, in one commit;
    /// returns the new state.
    pub async fn seek(&self, subscription: SubscriptionId, position: Position) -> Result<AckState> {
        self.call(|reply| Op::Seek {
            subscription,
            position,
            reply,
        })
        .await
    }

    /// Changes a subscription's settings.
    pub async fn update_subscription(
        &self,
        subscription: SubscriptionId,
        settings: SubscriptionSettings,
    ) -> Result<()> {
        self.call(|reply| Op::UpdateSubscription {
            subscription,
            settings,
            reply,
        })
        .await
    }

    /// Deletes a subscription and its ack state.
    pub async fn delete_subscription(&self, subscription: SubscriptionId) -> Result<()> {
        self.call(|reply| Op::DeleteSubscription {
            subscription,
            reply,
        })
        .await
    }

    /// The log of a channel, for reading and for waiting on new messages.
    pub fn log(&self, channel: ChannelId) -> Result<Arc<ChannelLog>> {
        self.shared
            .logs
            .read()
            .expect("logs lock")
            .get(&channel)
            .cloned()
            .ok_or(StoreError::ChannelNotFound)
    }

    /// Commits, device syncs, messages and ack states since the store opened.
    pub fn counters(&self) -> StoreCounters {
        self.shared.counters.snapshot()
    }

    /// Bytes of messages cached in memory now, all channels together.
    pub fn cached_bytes(&self) -> usize {
        self.shared.cache.used()
    }

    /// The data directory's free space as last seen, and whether publishing is refused.
    pub fn space(&self) -> SpaceReport {
        self.shared.space.report()
    }

    /// Why the store stopped accepting writes, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().expect("failure lock").clone()
    }

    /// Commits what is queued, syncs everything to disk and stops the writer. Later writes fail
    /// with [`StoreError::Closed`].
    pub async fn close(&self) -> Result<()> {
        self.shared.space.stop();
        let result = self.call(|reply| Op::Close { reply }).await;
        let handle = self.shared.writer.lock().expect("writer lock").take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        match result {
            Err(StoreError::Closed) => Ok(()),
            other => other,
        }
    }

    async fn call<T>(&self, op: impl FnOnce(oneshot::Sender<Result<T>>) -> Op) -> Result<T> {
        self.submit(op).await?.confirmed().await
    }

    async fn submit<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T>>) -> Op,
    ) -> Result<Confirmation<T>> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(op(reply), Vec::new()).await?;
        Ok(Confirmation { answer })
    }

    /// Queues `op` and `more` after it for the writer, once the queue has room for their bytes.
    async fn enqueue(&self, op: Op, more: Vec<Op>) -> Result<()> {
        let bytes = op.bytes() + more.iter().map(Op::bytes).sum::<usize>();
        let share = bytes.min(WRITE_QUEUE_BYTES) as u32;
        let permit = (self.queue_bytes.clone())
            .acquire_many_owned(share)
            .await
            .map_err(|_| StoreError::Closed)?;
        let queued = Queued {
            op,
            more,
            bytes,
            permit,
        };
        self.ops.send(queued).await.map_err(|_| StoreError::Closed)
    }

    /// Bytes of requests queued for the writer now.
    #[cfg(test)]
    fn queued_bytes(&self) -> usize {
        WRITE_QUEUE_BYTES - self.queue_bytes.available_permits()
    }
}

/// A write the writer has queued; [`Confirmation::confirmed`] resolves once it is committed.
#[must_use = "a write is only known to be durable once its confirmation resolves"]
pub struct Confirmation<T> {
    answer: oneshot::Receiver<Result<T>>,
}

impl<T> Confirmation<T> {
    /// Waits until the write is durable (or failed).
    pub async fn confirmed(self) -> Result<T> {
        self.answer.await.map_err(|_| StoreError::Closed)?
    }
}

fn io_error(path: &Path, e: std::io::Error) -> StoreError {
    if e.kind() == std::io::ErrorKind::StorageFull {
        return StoreError::DiskFull {
            path: path.to_owned(),
        };
    }
    StoreError::Io {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// A watch on a channel's durable end, so readers can wait for new messages.
pub type EndWatch = watch::Receiver<u64>;

/// How long opening waits for sled's lock on its files to be let go.
const SLED_LOCK_WAIT: Duration = Duration::from_secs(2);

/// Opens sled in `dir`. Its lock on its files goes only once its last handle does, and its I/O
/// pool may still hold one for a moment after a store in this process closed: opening waits for
/// it a little, then says who holds the directory.
fn open_sled(dir: &Path, options: &StoreOptions) -> Result<sled::Db> {
    // sled's own background flusher is off: the checkpoint thread flushes it, and syncs what
    // sled's flush leaves out.
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(options.cache_capacity_bytes)
        .flush_every_ms(None);
    let deadline = std::time::Instant::now() + SLED_LOCK_WAIT;
    loop {
        match config.open() {
            // sled reports its lock taken as an `Other` error with this text.
            Err(sled::Error::Io(e)) if e.to_string().starts_with("could not acquire lock") => {
                if std::time::Instant::now() >= deadline {
                    return Err(StoreError::Failed(format!(
                        "{} is in use by another process (is another broker running on it?)",
                        dir.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            opened => return Ok(opened?),
        }
    }
}

#[cfg(test)]
mod tests;

/// Entry points for the fuzz targets (`cargo fuzz`, which builds with `--cfg fuzzing`).
#[cfg(fuzzing)]
pub mod fuzzing {
    use crate::codec;

    /// Feeds arbitrary bytes to every decoder of what the store reads back from disk: none
    /// may panic, whatever the bytes.
    pub fn decode_stored(bytes: &[u8]) {
        let _ = codec::decode_record(crate::ChannelId(1), 1, bytes);
        let _ = codec::check_record(crate::ChannelId(1), 1, bytes);
        if let Some(header) = codec::RecordHeader::parse(bytes) {
            let body = bytes.get(codec::RECORD_HEADER_LEN..).unwrap_or_default();
            let _ = header.matches(body);
        }
        let _ = codec::decode_ack_state(bytes);
        let _ = crate::change::decode(bytes);
        let _ = codec::ChannelRecord::decode(bytes);
        let _ = codec::SubscriptionRecord::decode(bytes);
        let _ = codec::RecordLocation::decode(bytes);
        let _ = codec::SegmentUsage::decode(bytes);
        let _ = codec::LogPosition::decode(bytes);
    }
}
