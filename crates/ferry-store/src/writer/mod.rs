//! The writer thread: every change to the store goes through it, in groups.
//!
//! It takes whatever requests are queued (up to a size bound) and commits them as one group:
//! the group's message records, then one commit frame holding every other change it makes
//! (ack states, channels, subscriptions; see `change.rs`), are appended to the segment log,
//! which is the store's write-ahead log, and synced with **one** `fdatasync` (in
//! `fsync = "always"` mode). Then readers see the new state and the callers are answered, and
//! only then does the group's sled batch (the records' index, channel bounds, ack state,
//! metadata, and the log position it reaches) go to sled, in memory and merged with those of
//! the next commits for up to 10 ms ([`index`]): the commit is durable without it, and a
//! channel's tail cache keeps its messages until sled indexes them, so no reader needs it
//! sooner. sled is made durable in the background
//! ([`checkpoint`]); after a crash, recovery replays the commits after sled's durable log
//! position through the same [`State`] functions the live commits used. Concurrent publishers
//! and ackers share each sync, and confirmation order equals commit order. Sequences are
//! assigned here, so a channel's order is exactly the order of its commits.

mod checkpoint;
mod index;
mod limits;
mod plan;
mod state;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::Verify;
use crate::batch::Batch;
use crate::change::{self, Change};
use crate::codec::{self, KEY_VERSION, RecordLocation};
use crate::ids::IdIndex;
use crate::log::MessageCache;
use crate::segment::{AppendMode, Appender, Segments};
use crate::space::Space;
use crate::{
    AckState, AckUpdate, Appended, ChannelId, ChannelLog, ChannelSettings, ChannelStats, Counters,
    FsyncMode, Message, NewMessage, Position, Recovered, RecoveredChannel, RecoveredSubscription,
    Result, Shared, StoreError, StoreOptions, SubscriptionId, SubscriptionSettings,
};
use crate::{failpoint, recovery};
use checkpoint::Checkpointer;
pub(crate) use checkpoint::DurableFiles;
use index::Index;
pub(crate) use state::{State, Touched, id_of};

/// The most keys of deleted channels removed at one check (one sled batch: sled holds a big
/// batch's every node in memory while it applies it).
const SWEPT_PER_CHECK: usize = 50_000;
/// How soon the next check comes while ids or keys are left to remove.
const CATCH_UP_CHECK: std::time::Duration = std::time::Duration::from_millis(50);
/// How often channels that keep messages by age are looked at for what aged out.
const RETENTION_CHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// How often the writer looks at free space itself while it writes into preallocated blocks.
const LOOK_EVERY: std::time::Duration = std::time::Duration::from_millis(5);
/// A group takes at most this many requests...
const MAX_GROUP_OPS: usize = 4096;
/// ...or this many payload bytes, whichever comes first.
const MAX_GROUP_BYTES: usize = 32 << 20;

type Reply<T> = oneshot::Sender<Result<T>>;

/// A request to the writer.
pub(crate) enum Op {
    Append {
        channel: ChannelId,
        messages: Vec<NewMessage>,
        reply: Reply<Appended>,
    },
    SaveAcks {
        subscription: SubscriptionId,
        update: AckUpdate,
        reply: Reply<()>,
    },
    Redrive {
        from: ChannelId,
        to: ChannelId,
        moves: Vec<(u64, NewMessage)>,
        reply: Reply<Vec<(u64, u64)>>,
    },
    CreateChannel {
        name: String,
        settings: ChannelSettings,
        reply: Reply<ChannelId>,
    },
    UpdateChannel {
        channel: ChannelId,
        settings: ChannelSettings,
        reply: Reply<()>,
    },
    DeleteChannel {
        channel: ChannelId,
        reply: Reply<()>,
    },
    CreateSubscription {
        channel: ChannelId,
        name: String,
        settings: SubscriptionSettings,
        start: Position,
        filter: String,
        transform: Vec<u8>,
        reply: Reply<(SubscriptionId, AckState)>,
    },
    UpdateSubscription {
        subscription: SubscriptionId,
        settings: SubscriptionSettings,
        reply: Reply<()>,
    },
    Seek {
        subscription: SubscriptionId,
        position: Position,
        reply: Reply<AckState>,
    },
    DeleteSubscription {
        subscription: SubscriptionId,
        reply: Reply<()>,
    },
    Catalog {
        key: String,
        value: Option<Vec<u8>>,
        reply: Reply<()>,
    },
    /// Brings sled up to date with every commit so far, for a read that goes to sled alone.
    CatchUp {
        reply: Reply<()>,
    },
    Close {
        reply: Reply<()>,
    },
}

/// Requests as queued together (one, or several a caller had ready at once, which then reach
/// the writer together and so share a commit), holding their share of the queue's bytes until
/// the writer takes them.
pub(crate) struct Queued {
    pub(crate) op: Op,
    /// Requests queued with `op`, in order after it.
    pub(crate) more: Vec<Op>,
    /// [`Op::bytes`] of them all, counted once.
    pub(crate) bytes: usize,
    pub(crate) permit: tokio::sync::OwnedSemaphorePermit,
}

impl Queued {
    /// Adds the requests to `batch`, in order, and returns their bytes; the queue's share goes
    /// back.
    fn take_into(self, batch: &mut Vec<Op>) -> usize {
        drop(self.permit);
        batch.push(self.op);
        batch.extend(self.more);
        self.bytes
    }
}

impl Op {
    /// What the request weighs in the queue and in a group: its encoded size, roughly.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Op::Append { messages, .. } => messages.iter().map(NewMessage::size).sum(),
            // Its encoded size: a group's commit frame stays bounded too.
            Op::SaveAcks { update, .. } => {
                20 + 16 * update.state.acked_above_floor.len()
                    + update
                        .failures
                        .iter()
                        .map(|(_, f)| {
                            16 + f
                                .as_ref()
                                .map_or(0, |f| 20 + f.cause.len() + f.reason.len())
                        })
                        .sum::<usize>()
                    + update
                        .dead_letters
                        .iter()
                        .map(|(_, _, m)| m.size())
                        .sum::<usize>()
            }
            Op::Redrive { moves, .. } => moves.iter().map(|(_, m)| 16 + m.size()).sum(),
            Op::Catalog { key, value, .. } => 16 + key.len() + value.as_ref().map_or(0, Vec::len),
            _ => 64,
        }
    }
}

/// A channel's log as the writer tracks it.
struct WriterLog {
    log: Arc<ChannelLog>,
    /// The bound of the last collection: most acks move no record out, and this keeps them
    /// from looking.
    collected_below: u64,
}

impl WriterLog {
    fn new(log: Arc<ChannelLog>) -> Self {
        Self {
            log,
            collected_below: 0,
        }
    }
}

/// The writer's state: the authoritative view of channels and subscriptions.
pub(crate) struct Writer {
    /// sled, with the index writes of the last commits that it does not hold yet.
    index: Index,
    fsync: FsyncMode,
    cache: Arc<MessageCache>,
    /// Told when a write finds the disk full.
    space: Arc<Space>,
    /// Commits and device syncs so far.
    counters: Arc<Counters>,
    /// Where every commit goes first; sled indexes it.
    segments: Arc<Segments>,
    appender: Appender,
    state: State,
    logs: HashMap<ChannelId, WriterLog>,
    /// Channels whose collection could not go as far as their floors allow yet (the records
    /// were not announced yet): the next group tries again.
    pending_collects: HashSet<ChannelId>,
    /// sled's files to sync at each checkpoint; handed to the checkpoint thread when it starts.
    files: Option<DurableFiles>,
    /// Commits written but not yet fsync'd (`interval` mode).
    unsynced_since: Option<Instant>,
    /// When channels that keep messages by age are next looked at for collection, and ids
    /// that left their de-duplication window are forgotten.
    next_retention_check: Instant,
    /// Which ids each channel stored within its de-duplication window.
    ids: IdIndex,
    /// How a message dropped from a full channel becomes a dead letter.
    dead_letter: Option<crate::DeadLetterFn>,
    /// Told of every durable commit.
    observer: Option<Arc<dyn crate::CommitObserver>>,
    /// The de-duplication tables of the last group, emptied, for the next.
    spare_ids: HashMap<ChannelId, HashMap<String, u64>>,
    /// Per channel, when drops were last logged and how many came since.
    drops_logged: HashMap<ChannelId, (Option<Instant>, u64)>,
    /// When the writer last looked at the disk's free space itself.
    last_look: Instant,
}

/// A group built into frames and a batch, and what to announce once it is committed.
struct Built {
    collected: Vec<ChannelId>,
    appended: Vec<(ChannelId, Vec<Message>)>,
    /// Bytes of log the group writes (0: nothing to write, e.g. it only collects).
    log_bytes: u64,
    /// Segment files the group empties: deleted once a checkpoint covers it.
    emptied: Vec<u32>,
}

/// A reply to send once the group's fate is known.
type Pending = Box<dyn FnOnce(Option<&StoreError>) + Send>;

fn pending<T: Send + 'static>(reply: Reply<T>, value: T) -> Pending {
    Box::new(move |failure| {
        let _ = reply.send(match failure {
            None => Ok(value),
            Some(e) => Err(e.clone()),
        });
    })
}

/// What one group changes, collected before it is committed.
#[derive(Default)]
struct Group {
    batch: Batch,
    /// The changes to write in the commit frame, in the order they were applied.
    changes: Vec<Change>,
    /// Where each subscription's ack state is in `changes`: a later state of the same group
    /// replaces it, so the frame holds one per subscription.
    acks_at: HashMap<SubscriptionId, usize>,
    /// Segments finished before this group, to look at again if it fails.
    finished: Vec<u32>,
    /// New messages per channel, with the sequence of the first.
    appends: BTreeMap<ChannelId, (u64, Vec<NewMessage>)>,
    /// The ids the group's publishes carry, per channel, with their sequences: for
    /// de-duplication within the group (its planning only).
    ids: HashMap<ChannelId, HashMap<String, u64>>,
    remember: BTreeMap<ChannelId, Vec<(u64, String)>>,
    touched: Touched,
    /// Message records written.
    records: u32,
    /// Logs to publish or withdraw once committed.
    new_logs: Vec<Arc<ChannelLog>>,
    /// Channels whose withdrawn sequences changed.
    withdrawals: HashSet<ChannelId>,
    /// Channels whose figures changed with no record appended or collected (delayed
    /// messages stored aside).
    restated: HashSet<ChannelId>,
    /// Encoded bytes of the messages planned for each channel (not in its record yet).
    planned_bytes: HashMap<ChannelId, u64>,
    /// Full channels' retained records below this sequence go whatever their retention.
    collect_below: HashMap<ChannelId, u64>,
    dropped_logs: Vec<ChannelId>,
    replies: Vec<Pending>,
    /// Answered once sled holds the group ([`Op::CatchUp`]).
    catch_ups: Vec<Reply<()>>,
    /// Ack states the group saves.
    ack_states: u64,
    /// How long its device sync took, if it had one.
    synced_in: Option<std::time::Duration>,
    close: bool,
}

impl Writer {
    /// Brings the index up to date with the segment log (replaying what sled lacks), reads the
    /// metadata and ack state (never the messages), and prepares the writer.
    pub(crate) fn recover(
        db: sled::Db,
        dir: &Path,
        options: &StoreOptions,
        cache: Arc<MessageCache>,
        space: Arc<Space>,
        counters: Arc<Counters>,
    ) -> Result<(Writer, Recovered, HashMap<ChannelId, Arc<ChannelLog>>)> {
        check_version(&db, dir)?;
        let mut files = DurableFiles::open(dir, counters.clone())?;
        files.sync_directories()?;
        let (segments, on_disk) = Segments::open(dir)?;
        let recovery::Reconciled { state, highest } =
            recovery::reconcile(&db, &segments, &on_disk, &mut files)?;
        let keep_finished = options.fsync != FsyncMode::Never;
        let appender = segments.start(
            highest,
            options.segment_bytes,
            AppendMode {
                keep_finished,
                preallocate: options.preallocate,
                // Preallocated files are zeros already.
                zero_ahead: options.fsync == FsyncMode::Always && !options.preallocate,
            },
            counters.clone(),
        )?;

        let mut recovered = Recovered::default();
        let mut logs = HashMap::new();
        let mut writer_logs = HashMap::new();
        for (&id, record) in &state.channels {
            let log = Arc::new(ChannelLog::new(
                id,
                db.clone(),
                segments.clone(),
                stats_of(record),
                cache.clone(),
            ));
            log.set_withdrawn(state.withdrawn.get(&id).cloned().unwrap_or_default());
            recovered.channels.push(RecoveredChannel {
                id,
                name: record.name.clone(),
                settings: record.settings,
            });
            logs.insert(id, log.clone());
            writer_logs.insert(id, WriterLog::new(log));
        }
        for (&id, record) in &state.subscriptions {
            let Some(raw) = db.get(codec::ack_key(id))? else {
                return Err(StoreError::Corrupt(format!(
                    "subscription {:?} has no ack state",
                    record.name
                )));
            };
            let acks = codec::decode_ack_state(&raw)?;
            let mut failures = Vec::new();
            for entry in db.scan_prefix(codec::failure_prefix(id)) {
                let (key, value) = entry?;
                failures.push((
                    codec::parse_failure_key(&key)?,
                    codec::decode_failure(&mut value.as_ref())?,
                ));
            }
            recovered.subscriptions.push(RecoveredSubscription {
                id,
                channel: record.channel,
                name: record.name.clone(),
                settings: record.settings,
                filter: record.filter.clone(),
                transform: record.transform.clone(),
                acks,
                failures,
            });
        }
        recovered.catalog = state.catalog.clone();
        verify_records(&db, &segments, &state, &writer_logs, options.verify)?;
        // After the replay: the ids since the last seal are in sled's `E` keys.
        let ids = IdIndex::open(dir, &db)?;
        let writer = Writer {
            index: Index::new(db, options.index_lag),
            fsync: options.fsync,
            cache,
            space,
            counters,
            segments,
            appender,
            // Replay does not collect: the group the writer runs at start does.
            pending_collects: state.channels.keys().copied().collect(),
            state,
            logs: writer_logs,
            files: Some(files),
            unsynced_since: None,
            next_retention_check: Instant::now(),
            ids,
            dead_letter: options.dead_letter,
            observer: options.observer.clone(),
            spare_ids: HashMap::new(),
            drops_logged: HashMap::new(),
            last_look: Instant::now(),
        };
        Ok((writer, recovered, logs))
    }

    /// The thread's body: commit groups until closed or every handle is gone.
    pub(crate) fn run(mut self, mut ops: mpsc::Receiver<Queued>, shared: Arc<Shared>) {
        let Some((checkpoints, runtime)) = self.start(&shared) else {
            return;
        };
        // Replay does not collect (collection is not in the log): what the replayed acks allow
        // goes now, in a group of its own, not at the first request after the restart, which
        // may never come (all acked, nothing published), leaving the records and their segment
        // files pinned until the next start.
        if !self.pending_collects.is_empty() {
            self.commit(Vec::new(), &shared, &checkpoints);
        }
        while let Some(group) = self.next_group(&runtime, &mut ops, &shared, &checkpoints) {
            if self.commit(group, &shared, &checkpoints) {
                break;
            }
            self.keep_deadlines(&shared, &checkpoints);
        }
        self.stop(ops, &shared, checkpoints);
    }

    /// The checkpoint thread and the writer's timer; `None`, said, if either cannot start.
    fn start(&mut self, shared: &Arc<Shared>) -> Option<(Checkpointer, tokio::runtime::Runtime)> {
        let files = self.files.take().expect("files are handed over once");
        let checkpoints = Checkpointer::start(
            self.index.sled().clone(),
            files,
            self.segments.clone(),
            self.fsync,
            shared.clone(),
        )
        .inspect_err(|e| fail(shared, e))
        .ok()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .inspect_err(|e| tracing::error!(error = %e, "store writer could not start its timer"))
            .ok()?;
        Some((checkpoints, runtime))
    }

    /// The requests of the next group: the first to arrive and whatever is queued behind it,
    /// up to a group's bounds. What falls due while none arrives is done meanwhile. `None`
    /// once every handle is gone.
    fn next_group(
        &mut self,
        runtime: &tokio::runtime::Runtime,
        ops: &mut mpsc::Receiver<Queued>,
        shared: &Shared,
        checkpoints: &Checkpointer,
    ) -> Option<Vec<Op>> {
        let first = loop {
            let wake = [
                self.sync_deadline(),
                self.retention_deadline(),
                self.delay_deadline(),
                self.index.due(),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(deadline) = wake else {
                break runtime.block_on(ops.recv())?;
            };
            // The timer must be created inside the runtime, hence the async block.
            let next = runtime
                .block_on(async { tokio::time::timeout_at(deadline.into(), ops.recv()).await });
            match next {
                Ok(first) => break first?,
                Err(_) => self.on_timer(shared, checkpoints),
            }
        };
        let mut batch = Vec::new();
        let mut bytes = first.take_into(&mut batch);
        while batch.len() < MAX_GROUP_OPS && bytes < MAX_GROUP_BYTES {
            match ops.try_recv() {
                Ok(queued) => bytes += queued.take_into(&mut batch),
                Err(_) => break,
            }
        }
        Some(batch)
    }

    /// What is due after a group: under a steady stream of writes the idle timeout of
    /// [`Writer::next_group`] never fires, and collection by age, the expiry of ids and the
    /// interval's sync must still happen.
    fn keep_deadlines(&mut self, shared: &Shared, checkpoints: &Checkpointer) {
        let due = |deadline: Option<Instant>| deadline.is_some_and(|at| Instant::now() >= at);
        if due(self.retention_deadline()) {
            self.on_timer(shared, checkpoints);
        }
        if due(self.sync_deadline())
            && let Err(e) = self.sync_now()
        {
            fail(shared, &e);
        }
    }

    /// Refuses what was queued behind the stop, syncs the log and leaves sled checkpointed
    /// with everything: a clean stop leaves nothing to replay.
    fn stop(mut self, mut ops: mpsc::Receiver<Queued>, shared: &Shared, checkpoints: Checkpointer) {
        ops.close();
        // Whatever was already queued behind a close is refused rather than left hanging.
        while let Ok(queued) = ops.try_recv() {
            let mut left = Vec::new();
            queued.take_into(&mut left);
            for op in left {
                refuse(op, &StoreError::Closed);
            }
        }
        let failed = shared.failure.lock().expect("failure lock").is_some();
        if !failed && let Err(e) = self.appender.sync() {
            // No checkpoint may then make the index durable past the log.
            fail(shared, &e);
        }
        // Refused after a failure (the next start replays it from the log).
        let _ = self.apply_index(shared, &checkpoints);
        checkpoints.stop();
    }

    /// Commits one group; true if it asked the writer to stop.
    fn commit(&mut self, ops: Vec<Op>, shared: &Shared, checkpoints: &Checkpointer) -> bool {
        let started = Instant::now();
        if let Err(e) = self.admit(shared) {
            let close = ops.iter().any(|op| matches!(op, Op::Close { .. }));
            for op in ops {
                refuse(op, &e);
            }
            return close;
        }
        let mut group = Group {
            // Its tables keep their capacity from group to group.
            ids: std::mem::take(&mut self.spare_ids),
            ..Group::default()
        };
        group.touched.collects = std::mem::take(&mut self.pending_collects);
        // Before the requests: it reads sled, which does not hold what they plan.
        self.plan_due(&mut group);
        for op in ops {
            self.plan(op, &mut group);
        }
        self.spare_ids = std::mem::take(&mut group.ids);
        self.spare_ids.values_mut().for_each(HashMap::clear);
        let built = match self.build(&mut group) {
            Ok(built) => built,
            Err(e) => return self.fail_group(group, e, shared, checkpoints),
        };
        if let Err(e) = self.make_durable(&mut group, built.log_bytes) {
            return self.fail_group(group, e, shared, checkpoints);
        }
        {
            use std::sync::atomic::Ordering::Relaxed;
            let messages: usize = built.appended.iter().map(|(_, m)| m.len()).sum();
            if built.log_bytes > 0 {
                self.counters.commits.fetch_add(1, Relaxed);
            }
            self.counters.messages.fetch_add(messages as u64, Relaxed);
            self.counters
                .ack_states
                .fetch_add(group.ack_states, Relaxed);
            if let Some(observer) = &self.observer
                && built.log_bytes > 0
            {
                observer.committed(&crate::Commit {
                    took: started.elapsed(),
                    sync: group.synced_in,
                    messages,
                    ack_states: group.ack_states,
                });
            }
        }
        let batch = std::mem::take(&mut group.batch);
        let changes = std::mem::take(&mut group.changes);
        let catch_ups = std::mem::take(&mut group.catch_ups);
        let (close, appended) = self.announce(group, built.appended, built.collected, shared);
        // After the answers: the commit is durable in the log already, and its readers find
        // its messages in the tail cache, which keeps them until sled indexes them.
        (self.index).defer(batch, built.log_bytes, built.emptied, appended);
        let due = self.index.due().is_some_and(|due| Instant::now() >= due);
        if due || !catch_ups.is_empty() {
            let applied = self.apply_index(shared, checkpoints);
            for reply in catch_ups {
                let _ = reply.send(applied.clone());
            }
            if applied.is_err() {
                return close;
            }
        }
        self.index_ids(&changes, shared, checkpoints);
        close
    }

    /// Applies the index writes of the commits sled does not hold yet, as one sled batch.
    /// A failure stops all writes: replay brings the index back from the log at the next
    /// start.
    fn apply_index(&mut self, shared: &Shared, checkpoints: &Checkpointer) -> Result<()> {
        let Some(waiting) = self.index.take() else {
            return Ok(());
        };
        // After a failure sled must not move past what the log surely holds: the writes go,
        // and the next start replays them from the log.
        if let Some(failure) = shared.failure.lock().expect("failure lock").clone() {
            return Err(StoreError::Failed(failure));
        }
        if let Err(e) = self.index.sled().apply_batch(waiting.batch.into_sled()) {
            // What was answered is made durable first (in `interval` mode it may not be yet).
            if let Err(sync) = self.appender.sync() {
                tracing::error!(error = %sync, "cannot sync the segment log after a failed index update");
            }
            let e = StoreError::from(e);
            fail(shared, &e);
            return Err(e);
        }
        failpoint::hit("index-applied");
        for (log, end) in waiting.ends {
            log.indexed(end);
        }
        // What the tail kept past the budget for want of an index can go now.
        shared.cache.enforce(&shared.logs);
        checkpoints.applied(waiting.log_bytes, waiting.emptied);
        Ok(())
    }

    /// sled, holding every commit's index writes: for what writes to it outside a commit
    /// (which must come after them) or reads it whole.
    fn caught_up(&mut self, shared: &Shared, checkpoints: &Checkpointer) -> Result<&sled::Db> {
        self.apply_index(shared, checkpoints)?;
        Ok(self.index.sled())
    }

    /// Adds a committed group's published ids to the id index, and seals the channels holding
    /// the most while the ids in memory are past their bound.
    fn index_ids(&mut self, changes: &[Change], shared: &Shared, checkpoints: &Checkpointer) {
        for change in changes {
            if let Change::Ids {
                channel,
                publish_ms,
                entries,
            } = change
            {
                self.ids.insert(*channel, *publish_ms, entries);
            }
        }
        while let Some(channel) = self.ids.fullest() {
            // A sealed file must not hold ids of commits a crash could still take back.
            let sealed = self
                .sync_if_unsynced()
                .and_then(|()| self.apply_index(shared, checkpoints))
                .and_then(|()| self.ids.seal(self.index.sled(), channel));
            if let Err(e) = sealed {
                tracing::warn!(error = %e, "cannot seal de-duplication ids; trying again later");
                break;
            }
        }
    }

    /// Whether a group may be committed at all: not after a failure, and not if the segment
    /// file it would start cannot be created (which changes nothing committed).
    fn admit(&mut self, shared: &Shared) -> Result<()> {
        if let Some(failure) = shared.failure.lock().expect("failure lock").clone() {
            return Err(StoreError::Failed(failure));
        }
        let space = self.space.report();
        (self.appender).space_is(space.free, space.watermark, space.low);
        // Where a write takes no new blocks, a disk another program fills fails none of them:
        // the writer looks at the disk itself, as often as a write would have told it.
        // It then holds publishing back (the group's publishes are refused in planning) and
        // releases the reserve for sled; acks, nacks and deletes go on, as they free space.
        if self.appender.in_preallocated() && self.last_look.elapsed() >= LOOK_EVERY {
            self.last_look = Instant::now();
            if self.space.nearly_full() {
                self.space.disk_full();
            }
        }
        self.appender.begin_group().inspect_err(|e| match e {
            StoreError::DiskFull { .. } => self.space.disk_full(),
            _ => fail(shared, e),
        })
    }

    /// Turns the planned group into frames and a sled batch: collection, message records,
    /// the commit frame, channel records and segment usage.
    fn build(&mut self, group: &mut Group) -> Result<Built> {
        let collected = self.plan_collects(group)?;
        let appended = self.encode_appends(group)?;
        let log_bytes = self.frame_commit(group)?;
        // A segment finished at the start of this group may have been emptied while current.
        group.finished = self.appender.take_finished();
        group
            .touched
            .segments
            .extend(group.finished.iter().copied());
        let emptied = self.state.finish(
            &mut group.batch,
            &mut group.touched,
            Some(self.appender.current()),
        );
        Ok(Built {
            collected,
            appended,
            log_bytes,
            emptied,
        })
    }

    /// Writes the group's frames and syncs them: the commit is durable then (this is the only
    /// sync it waits for). Its sled batch is applied once its callers have been answered.
    fn make_durable(&mut self, group: &mut Group, log_bytes: u64) -> Result<()> {
        self.space.wrote(self.appender.disk_taken());
        self.appender.write()?;
        failpoint::hit("segment-written");
        match self.fsync {
            FsyncMode::Always if log_bytes > 0 => {
                let syncing = Instant::now();
                self.appender.sync()?;
                group.synced_in = Some(syncing.elapsed());
            }
            FsyncMode::Interval(_) if log_bytes > 0 => {
                self.unsynced_since.get_or_insert_with(Instant::now);
            }
            _ => {}
        }
        failpoint::hit("segment-synced");
        Ok(())
    }

    /// Ends the group's log entry with its commit frame (when it changes anything at all) and
    /// records in the batch where the log now ends; returns the group's bytes of log.
    fn frame_commit(&mut self, group: &mut Group) -> Result<u64> {
        if group.changes.is_empty() && group.records == 0 {
            return Ok(0);
        }
        let mut body = Vec::new();
        change::encode(&group.changes, &mut body);
        if !Appender::frame_fits(body.len() + codec::RECORD_HEADER_LEN) {
            return Err(StoreError::Failed(format!(
                "a commit frame of {} bytes is larger than a scan reads back",
                body.len()
            )));
        }
        self.appender
            .append(|out| codec::frame_commit(group.records, &body, out))?;
        let end = codec::LogPosition {
            segment: self.appender.current(),
            offset: self.appender.end(),
        };
        group.batch.insert(codec::KEY_LOG_END, &end.encode());
        Ok(self.appender.pending_len())
    }

    /// Shows the committed group to readers, then answers its callers: readers see the new
    /// state before any caller hears of it. Returns whether the group asked the writer to
    /// stop, and the logs it appended to with their new ends, to mark as indexed once sled
    /// holds the group.
    fn announce(
        &mut self,
        mut group: Group,
        appended: Vec<(ChannelId, Vec<Message>)>,
        collected: Vec<ChannelId>,
        shared: &Shared,
    ) -> (bool, Vec<(Arc<ChannelLog>, u64)>) {
        {
            let mut logs = shared.logs.write().expect("logs lock");
            for log in group.new_logs.drain(..) {
                logs.insert(log.id(), log);
            }
            for id in group.dropped_logs.drain(..) {
                logs.remove(&id);
            }
        }
        let stats = |id: &ChannelId| {
            let record = self.state.channels.get(id)?;
            Some((self.logs.get(id)?.log.clone(), stats_of(record)))
        };
        let mut ends = Vec::with_capacity(appended.len());
        for (id, messages) in appended {
            if let Some((log, stats)) = stats(&id) {
                log.appended(messages, stats);
                ends.push((log, stats.next_seq));
            }
        }
        let restated = group.restated.drain().filter(|id| !collected.contains(id));
        for id in collected.iter().copied().chain(restated) {
            if let Some((log, stats)) = stats(&id) {
                log.collected(stats);
            }
        }
        for id in group.withdrawals.drain() {
            if let (Some(log), Some(ranges)) = (self.logs.get(&id), self.state.withdrawn.get(&id)) {
                log.log.set_withdrawn(ranges.clone());
            }
        }
        shared.cache.enforce(&shared.logs);
        failpoint::hit("synced");
        for reply in group.replies.drain(..) {
            reply(None);
        }
        (group.close, ends)
    }

    /// Refuses a group that could not be committed. A full disk is survivable: nothing of the
    /// group reached sled, so the writer forgets what planning it changed and goes on (the
    /// next groups' acks free space). Any other failure stops all writes.
    fn fail_group(
        &mut self,
        mut group: Group,
        e: StoreError,
        shared: &Shared,
        checkpoints: &Checkpointer,
    ) -> bool {
        self.appender
            .restore_finished(std::mem::take(&mut group.finished));
        let survivable = matches!(e, StoreError::DiskFull { .. });
        if survivable {
            self.space.disk_full();
            if let Err(reload) = self.forget_group(shared, checkpoints) {
                fail(shared, &reload);
            }
        } else {
            // The callers are told it failed: its frames must not come back on replay.
            if let Err(undo) = self.appender.discard() {
                tracing::error!(error = %undo, "cannot cut a failed commit from the segment log: a restart may apply it");
            }
            fail(shared, &e);
        }
        for reply in group.replies {
            reply(Some(&e));
        }
        for reply in group.catch_ups {
            let _ = reply.send(Err(e.clone()));
        }
        group.close
    }

    /// Undoes a group that failed before sled saw it: its frames are cut from the segment
    /// file, and the writer's state is read back from sled, which holds exactly what was
    /// committed.
    fn forget_group(&mut self, shared: &Shared, checkpoints: &Checkpointer) -> Result<()> {
        self.appender.discard()?;
        self.state = State::load(self.caught_up(shared, checkpoints)?)?;
        // A channel created by the failed group has no record; one it deleted still has its
        // log among the announced ones.
        let announced = shared.logs.read().expect("logs lock").clone();
        let mut logs = HashMap::new();
        for (id, record) in &self.state.channels {
            let log = match self.logs.remove(id) {
                Some(log) => log,
                None => WriterLog::new(announced.get(id).cloned().ok_or_else(|| {
                    StoreError::Corrupt(format!("channel {:?} has no log", record.name))
                })?),
            };
            logs.insert(*id, log);
        }
        // The failed group's collection bounds were never committed.
        for log in logs.values_mut() {
            log.collected_below = 0;
        }
        self.logs = logs;
        self.pending_collects = self.state.channels.keys().copied().collect();
        tracing::warn!(
            "a group was refused for lack of disk space; the writer goes on with what is committed"
        );
        Ok(())
    }

    /// What the writer does when nothing came before its timer: the interval's fsync,
    /// delayed messages that are due, and collection of what channels keep by age only (time
    /// passes with no commit to notice).
    fn on_timer(&mut self, shared: &Shared, checkpoints: &Checkpointer) {
        if self.index.due().is_some_and(|at| Instant::now() >= at)
            && self.apply_index(shared, checkpoints).is_err()
        {
            return;
        }
        if self.sync_deadline().is_some_and(|at| Instant::now() >= at)
            && let Err(e) = self.sync_now()
        {
            fail(shared, &e);
        }
        if self.delay_deadline().is_some_and(|at| Instant::now() >= at) {
            // A group of its own: it moves what is due.
            self.commit(Vec::new(), shared, checkpoints);
        }
        if self
            .retention_deadline()
            .is_some_and(|at| Instant::now() >= at)
        {
            self.next_retention_check = Instant::now() + RETENTION_CHECK;
            let now = plan::now_ms();
            // Only where the oldest stored record has aged out: an idle broker commits (and
            // syncs) nothing.
            let aging: Vec<ChannelId> =
                self.state
                    .channels
                    .iter()
                    .filter(|(_, c)| c.settings.retention.max_age_ms > 0)
                    .filter(|(id, c)| {
                        self.first_time(**id).ok().flatten().is_some_and(|t| {
                            t.saturating_add(c.settings.retention.max_age_ms) <= now
                        })
                    })
                    .map(|(id, _)| *id)
                    .collect();
            // A group of its own only where something may have aged out.
            if !aging.is_empty() {
                self.pending_collects.extend(aging);
                self.commit(Vec::new(), shared, checkpoints);
            }
            if let Err(e) = self.sync_if_unsynced() {
                fail(shared, &e);
            }
            // Both write to sled outside a commit: after every commit's own writes.
            if self.apply_index(shared, checkpoints).is_err() {
                return;
            }
            let channels = &self.state.channels;
            let windows = |id: ChannelId| channels.get(&id).map(|c| c.settings.dedup_window_ms);
            if let Err(e) = self.ids.maintain(self.index.sled(), now, windows) {
                tracing::warn!(error = %e, "cannot seal or expire de-duplication ids; trying again later");
            }
            let swept_all = (self.state.sweep_deleted(self.index.sled(), SWEPT_PER_CHECK))
                .map(|left| !left)
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot sweep a deleted channel's keys; trying again later");
                    true
                });
            // Bounded batches keep sled's memory small; more of them keep up with the load.
            if !swept_all {
                self.next_retention_check = Instant::now() + CATCH_UP_CHECK;
            }
        }
    }

    /// When channels that keep messages by age must next be collected, ids expired, or
    /// deleted channels swept.
    fn retention_deadline(&self) -> Option<Instant> {
        let due = self.state.aging
            || self.ids.holds_any()
            || self.state.legacy_ids
            || !self.state.deleted.is_empty();
        due.then_some(self.next_retention_check)
    }

    /// When the soonest delayed message is due, if any is waiting.
    fn delay_deadline(&self) -> Option<Instant> {
        let due = self.state.next_due()?;
        let wait = due.saturating_sub(plan::now_ms());
        Some(Instant::now() + std::time::Duration::from_millis(wait))
    }

    /// When the writer must wake to fsync what it has written, if ever.
    fn sync_deadline(&self) -> Option<Instant> {
        match self.fsync {
            FsyncMode::Interval(every) => self.unsynced_since.map(|since| since + every),
            _ => None,
        }
    }

    /// Syncs what `fsync = "interval"` has written but not synced yet.
    fn sync_if_unsynced(&mut self) -> Result<()> {
        match self.unsynced_since {
            Some(_) => self.sync_now(),
            None => Ok(()),
        }
    }

    fn sync_now(&mut self) -> Result<()> {
        self.unsynced_since = None;
        self.appender.sync()
    }
}

/// Reads back the records `verify` asks for (the last of each segment file, or all) and marks
/// the damaged ones in their channel's log, which reports them and makes readers skip them.
fn verify_records(
    db: &sled::Db,
    segments: &Segments,
    state: &State,
    logs: &HashMap<ChannelId, WriterLog>,
    verify: Verify,
) -> Result<()> {
    if verify == Verify::Off {
        return Ok(());
    }
    // A record ends where the next one of its channel starts, or at the channel's end.
    let mut records = Vec::new();
    let mut previous: Option<(ChannelId, u64, RecordLocation)> = None;
    let end_of = |channel: &ChannelId| state.channels.get(channel).map_or(0, |c| c.next_seq);
    for entry in db.scan_prefix(b"M") {
        let (key, value) = entry?;
        let channel = ChannelId(id_of(&key)?);
        let first = codec::parse_record_key(&key)?;
        let at = RecordLocation::decode(&value)?;
        if let Some((p_channel, p_first, p_at)) = previous.replace((channel, first, at)) {
            let end = if p_channel == channel {
                first
            } else {
                end_of(&p_channel)
            };
            records.push((p_channel, p_first, end, p_at));
        }
    }
    if let Some((channel, first, at)) = previous {
        records.push((channel, first, end_of(&channel), at));
    }
    if verify == Verify::Tail {
        let mut last: HashMap<u32, (ChannelId, u64, u64, RecordLocation)> = HashMap::new();
        for record in records {
            let slot = last.entry(record.3.segment).or_insert(record);
            if record.3.offset > slot.3.offset {
                *slot = record;
            }
        }
        records = last.into_values().collect();
    }
    let mut damaged = 0;
    for (channel, first, end, at) in records {
        let checked = segments
            .read(at)
            .and_then(|framed| codec::check_record(channel, first, &framed).map(drop));
        let (Err(e), Some(owner)) = (checked, logs.get(&channel)) else {
            continue;
        };
        damaged += 1;
        owner.log.mark_damaged(StoreError::Damaged {
            segment: at.segment,
            offset: at.offset,
            first_seq: first,
            end_seq: end.max(first + 1),
            reason: e.to_string(),
        });
    }
    if damaged > 0 {
        tracing::error!(
            damaged,
            "damaged message records found on start-up; see the lines above"
        );
    }
    Ok(())
}

/// Checks (or, for a new store, writes) the format version; an older store is upgraded in
/// place (its records are still read; new ones are written in the current version).
fn check_version(db: &sled::Db, dir: &Path) -> Result<()> {
    let current = codec::FORMAT_VERSION.to_le_bytes();
    match db.get(KEY_VERSION)? {
        Some(v) if v.as_ref() == current => {}
        Some(v)
            if v.as_ref() == codec::FORMAT_VERSION_3.to_le_bytes()
                || v.as_ref() == codec::FORMAT_VERSION_2.to_le_bytes() =>
        {
            db.insert(KEY_VERSION, &current)?;
        }
        Some(v) => {
            return Err(StoreError::Corrupt(format!(
                "unsupported store format {v:?} in {}",
                dir.display()
            )));
        }
        None if db.is_empty() => {
            db.insert(KEY_VERSION, &current)?;
        }
        None => {
            return Err(StoreError::Corrupt(format!(
                "{} holds data that is not a Ferry store",
                dir.display()
            )));
        }
    }
    Ok(())
}

fn stats_of(record: &codec::ChannelRecord) -> ChannelStats {
    ChannelStats {
        next_seq: record.next_seq,
        first_seq: record.first_seq,
        bytes: record.bytes,
        delayed: record.delayed,
        delayed_bytes: record.delayed_bytes,
        dropped: record.dropped,
    }
}

pub(crate) fn fail(shared: &Shared, e: &StoreError) {
    tracing::error!(error = %e, "store write failed; refusing further writes");
    shared
        .failure
        .lock()
        .expect("failure lock")
        .get_or_insert_with(|| e.to_string());
}

fn refuse(op: Op, e: &StoreError) {
    let send = |reply: Pending| reply(Some(e));
    match op {
        Op::Append { reply, .. } => send(pending(reply, Appended::default())),
        Op::SaveAcks { reply, .. }
        | Op::DeleteChannel { reply, .. }
        | Op::UpdateChannel { reply, .. }
        | Op::UpdateSubscription { reply, .. }
        | Op::DeleteSubscription { reply, .. }
        | Op::Catalog { reply, .. }
        | Op::CatchUp { reply }
        | Op::Close { reply } => send(pending(reply, ())),
        Op::CreateChannel { reply, .. } => send(pending(reply, ChannelId(0))),
        Op::Redrive { reply, .. } => send(pending(reply, Vec::new())),
        Op::Seek { reply, .. } => send(pending(reply, AckState::default())),
        Op::CreateSubscription { reply, .. } => {
            send(pending(reply, (SubscriptionId(0), AckState::default())))
        }
    }
}
