//! The writer thread: every change to the store goes through it, in groups.
//!
//! It takes whatever requests are queued (up to a size bound), appends the group's message
//! records to the current segment file and syncs it, turns everything else (the records' index,
//! channel bounds, ack state, metadata) into one sled batch and applies it atomically. In
//! `fsync = "always"` mode the sync thread then makes the batch durable (`fdatasync` of sled's
//! log file and fsync of any new blob file, see the crate docs) while the writer goes on with the
//! next group; only then are the readers' view updated and the callers answered. Concurrent
//! publishers and ackers therefore share each fsync, and confirmation order equals commit
//! order. Sequences are assigned here, so a channel's order is exactly the order of its commits.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

use crate::Verify;
use crate::codec::{
    self, ChannelRecord, KEY_NEXT_ID, KEY_VERSION, RecordLocation, SegmentUsage,
    SubscriptionRecord, ack_key, channel_key, record_key, segment_key, subscription_key,
};
use crate::log::MessageCache;
use crate::segment::{Appender, Segments};
use crate::space::Space;
use crate::{
    AckState, ChannelId, ChannelLog, ChannelStats, Counters, FsyncMode, Message, NewMessage,
    Recovered, RecoveredChannel, RecoveredSubscription, Result, Shared, StoreError, StoreOptions,
    SubscriptionId, SubscriptionSettings, io_error,
};
use crate::{failpoint, recovery};

/// How many flushed groups may wait for the syncer before the writer waits for it.
const SYNC_QUEUE: usize = 4;
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
        reply: Reply<Range<u64>>,
    },
    SaveAcks {
        subscription: SubscriptionId,
        state: AckState,
        reply: Reply<()>,
    },
    CreateChannel {
        name: String,
        reply: Reply<ChannelId>,
    },
    DeleteChannel {
        channel: ChannelId,
        reply: Reply<()>,
    },
    CreateSubscription {
        channel: ChannelId,
        name: String,
        settings: SubscriptionSettings,
        reply: Reply<(SubscriptionId, AckState)>,
    },
    UpdateSubscription {
        subscription: SubscriptionId,
        settings: SubscriptionSettings,
        reply: Reply<()>,
    },
    DeleteSubscription {
        subscription: SubscriptionId,
        reply: Reply<()>,
    },
    Close {
        reply: Reply<()>,
    },
}

impl Op {
    fn bytes(&self) -> usize {
        match self {
            Op::Append { messages, .. } => messages.iter().map(NewMessage::size).sum(),
            _ => 64,
        }
    }
}

struct WriterChannel {
    record: ChannelRecord,
    log: Arc<ChannelLog>,
    /// The bound of the last collection: most acks move no record out, and this keeps them
    /// from looking.
    collected_below: u64,
}

impl WriterChannel {
    fn new(record: ChannelRecord, log: Arc<ChannelLog>) -> Self {
        Self {
            record,
            log,
            collected_below: 0,
        }
    }
}

/// The writer's state: the authoritative view of channels and subscriptions.
pub(crate) struct Writer {
    db: sled::Db,
    fsync: FsyncMode,
    cache: Arc<MessageCache>,
    /// Told when a write finds the disk full.
    space: Arc<Space>,
    /// Commits and device syncs so far.
    counters: Arc<Counters>,
    /// Shared with the syncer thread, which fsyncs them in `Always` mode.
    files: Arc<Mutex<DurableFiles>>,
    /// Where message records go; their index goes to sled.
    segments: Arc<Segments>,
    appender: Appender,
    /// Indexed records per segment file, as last written.
    usage: HashMap<u32, SegmentUsage>,
    channels: HashMap<ChannelId, WriterChannel>,
    names: HashMap<String, ChannelId>,
    subscriptions: HashMap<SubscriptionId, SubscriptionRecord>,
    /// Each subscription's ack floor as last written: a channel's records below the lowest are
    /// collected.
    floors: HashMap<SubscriptionId, u64>,
    /// Channels whose collection could not go as far as their floors allow yet (the records
    /// were not announced yet): the next group tries again.
    pending_collects: HashSet<ChannelId>,
    next_id: u32,
    /// Writes applied but not yet fsync'd (modes other than `Always`).
    unsynced_since: Option<Instant>,
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

/// What one group changes, collected before it is applied.
#[derive(Default)]
struct Group {
    batch: sled::Batch,
    /// New messages per channel, with the sequence of the first.
    appends: BTreeMap<ChannelId, (u64, Vec<NewMessage>)>,
    /// The highest collection bound asked per channel.
    /// Channels whose lowest ack floor may have moved.
    collects: HashSet<ChannelId>,
    /// Channels whose record must be rewritten.
    touched: HashSet<ChannelId>,
    /// Logs to publish or withdraw once committed.
    new_logs: Vec<Arc<ChannelLog>>,
    dropped_logs: Vec<ChannelId>,
    replies: Vec<Pending>,
    /// Segment files whose usage changed.
    segments: HashSet<u32>,
    /// Segment files no record is left in: deleted once the group is durable.
    emptied: Vec<u32>,
    /// Ack states the group saves.
    ack_states: u64,
    close: bool,
}

impl Writer {
    /// Reads the metadata and ack state (never the messages) and prepares the writer.
    pub(crate) fn recover(
        db: sled::Db,
        dir: &Path,
        options: &StoreOptions,
        cache: Arc<MessageCache>,
        space: Arc<Space>,
        counters: Arc<Counters>,
    ) -> Result<(Writer, Recovered, HashMap<ChannelId, Arc<ChannelLog>>)> {
        check_version(&db, dir)?;
        // The segment log first: the index may lack what was written after its end.
        let (segments, on_disk) = Segments::open(dir)?;
        let recovery::Reconciled {
            channels: records,
            usage,
            next_id,
            highest,
        } = recovery::reconcile(&db, &segments, &on_disk)?;
        let keep_finished = options.fsync != FsyncMode::Never;
        let appender = segments.start(
            highest,
            options.segment_bytes,
            keep_finished,
            counters.clone(),
        )?;

        let mut recovered = Recovered::default();
        let mut channels = HashMap::new();
        let mut names = HashMap::new();
        let mut logs = HashMap::new();
        for (id, record) in records {
            let stats = ChannelStats {
                next_seq: record.next_seq,
                first_seq: record.first_seq,
                bytes: record.bytes,
            };
            let log = Arc::new(ChannelLog::new(
                id,
                db.clone(),
                segments.clone(),
                stats,
                cache.clone(),
            ));
            recovered.channels.push(RecoveredChannel {
                id,
                name: record.name.clone(),
            });
            names.insert(record.name.clone(), id);
            logs.insert(id, log.clone());
            channels.insert(id, WriterChannel::new(record, log));
        }
        let (subscriptions, floors) = load_subscriptions(&db, &channels, &mut recovered)?;

        verify_records(&db, &segments, &channels, options.verify)?;
        let files = DurableFiles::open(dir, counters.clone())?;
        files.sync_directories()?;
        let files = Arc::new(Mutex::new(files));
        let writer = Writer {
            db,
            fsync: options.fsync,
            cache,
            space,
            counters,
            files,
            segments,
            appender,
            usage,
            channels,
            names,
            subscriptions,
            floors,
            pending_collects: HashSet::new(),
            next_id,
            unsynced_since: None,
        };
        Ok((writer, recovered, logs))
    }

    /// The thread's body: commit groups until closed or every handle is gone.
    pub(crate) fn run(mut self, mut ops: mpsc::Receiver<Op>, shared: Arc<Shared>) {
        let (syncer, syncer_thread) = match self.fsync {
            FsyncMode::Always => {
                let (sender, receiver) = sync_channel(SYNC_QUEUE);
                let (files, sync_shared) = (self.files.clone(), shared.clone());
                let thread = std::thread::Builder::new()
                    .name("ferry-store-sync".into())
                    .spawn(move || sync_loop(receiver, files, sync_shared));
                match thread {
                    Ok(thread) => (Some(sender), Some(thread)),
                    Err(e) => {
                        fail(
                            &shared,
                            &StoreError::Failed(format!("cannot start the sync thread: {e}")),
                        );
                        (None, None)
                    }
                }
            }
            _ => (None, None),
        };
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(error = %e, "store writer could not start its timer");
                return;
            }
        };
        loop {
            let first = match self.sync_deadline() {
                Some(deadline) => {
                    // The timer must be created inside the runtime, hence the async block.
                    let next = runtime.block_on(async {
                        tokio::time::timeout_at(deadline.into(), ops.recv()).await
                    });
                    match next {
                        Ok(op) => op,
                        Err(_) => {
                            if let Err(e) = self.sync_now() {
                                fail(&shared, &e);
                            }
                            continue;
                        }
                    }
                }
                None => runtime.block_on(ops.recv()),
            };
            let Some(first) = first else { break };
            let mut bytes = first.bytes();
            let mut batch = vec![first];
            while batch.len() < MAX_GROUP_OPS && bytes < MAX_GROUP_BYTES {
                match ops.try_recv() {
                    Ok(op) => {
                        bytes += op.bytes();
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
            if self.commit(batch, &shared, syncer.as_ref()) {
                break;
            }
            // Under a steady stream of writes the idle timeout above never fires: keep the
            // interval's promise here too.
            if self
                .sync_deadline()
                .is_some_and(|deadline| Instant::now() >= deadline)
                && let Err(e) = self.sync_now()
            {
                fail(&shared, &e);
            }
        }
        // Let the syncer answer every group it holds before the final sync.
        drop(syncer);
        if let Some(thread) = syncer_thread {
            let _ = thread.join();
        }
        ops.close();
        // Whatever was already queued behind a close is refused rather than left hanging.
        while let Ok(op) = ops.try_recv() {
            refuse(op, &StoreError::Closed);
        }
        let failed = shared.failure.lock().expect("failure lock").is_some();
        if !failed
            && let Err(e) = self
                .db
                .flush()
                .map_err(StoreError::from)
                .and_then(|_| self.appender.sync())
                .and_then(|_| self.files.lock().expect("files lock").sync())
        {
            tracing::error!(error = %e, "final store sync failed");
        }
    }

    /// Commits one group; true if it asked the writer to stop.
    fn commit(
        &mut self,
        ops: Vec<Op>,
        shared: &Shared,
        syncer: Option<&SyncSender<Committed>>,
    ) -> bool {
        if let Some(failure) = shared.failure.lock().expect("failure lock").clone() {
            let close = ops.iter().any(|op| matches!(op, Op::Close { .. }));
            for op in ops {
                refuse(op, &StoreError::Failed(failure.clone()));
            }
            return close;
        }
        let mut group = Group {
            collects: std::mem::take(&mut self.pending_collects),
            ..Group::default()
        };
        for op in ops {
            if let Err((reply, e)) = self.plan(op, &mut group) {
                reply(Some(&e));
            }
        }
        self.appender.begin_group();
        let collected = match self.plan_collects(&mut group) {
            Ok(collected) => collected,
            Err(e) => return self.fail_group(group, e, shared),
        };
        let appended = match self.encode_appends(&mut group) {
            Ok(appended) => appended,
            Err(e) => return self.fail_group(group, e, shared),
        };
        // The index's view of the log ends after this group's records: recovery replays from
        // there.
        if !appended.is_empty() {
            let end = codec::LogPosition {
                segment: self.appender.current(),
                offset: self.appender.end(),
            };
            group.batch.insert(codec::KEY_LOG_END, &end.encode());
        }
        // A segment finished in this group may have been emptied while it was current.
        group.segments.extend(self.appender.take_finished());
        self.plan_segments(&mut group);
        // The records must be on disk before the index that points at them.
        self.space.wrote(self.appender.pending_len());
        let written = self.appender.write().and_then(|()| {
            failpoint::hit("segment-written");
            match self.fsync {
                FsyncMode::Always => self.appender.sync(),
                _ => Ok(()),
            }
        });
        failpoint::hit("segment-synced");
        if let Err(e) = written {
            return self.fail_group(group, e, shared);
        }
        for id in &group.touched {
            if let Some(channel) = self.channels.get(id) {
                group
                    .batch
                    .insert(&channel_key(*id), channel.record.encode());
            }
        }
        let outcome = self
            .db
            .apply_batch(std::mem::take(&mut group.batch))
            .map_err(StoreError::from)
            .and_then(|_| self.write_out());
        if let Err(e) = outcome {
            return self.fail_group(group, e, shared);
        }
        failpoint::hit("index-applied");
        {
            use std::sync::atomic::Ordering::Relaxed;
            let messages: usize = appended.iter().map(|(_, m)| m.len()).sum();
            self.counters.commits.fetch_add(1, Relaxed);
            self.counters.messages.fetch_add(messages as u64, Relaxed);
            self.counters
                .ack_states
                .fetch_add(group.ack_states, Relaxed);
        }

        // Without the sync thread, files are deleted right after this; the index change that
        // empties them must reach the log file first, or a crash could bring back entries that
        // name a deleted file. (`interval` flushed already.)
        if self.fsync == FsyncMode::Never
            && !group.emptied.is_empty()
            && let Err(e) = self.db.flush()
        {
            return self.fail_group(group, e.into(), shared);
        }

        let stats = |id: &ChannelId| {
            self.channels
                .get(id)
                .map(|c| (c.log.clone(), stats_of(&c.record)))
        };
        let committed = Committed {
            new_logs: std::mem::take(&mut group.new_logs),
            dropped_logs: std::mem::take(&mut group.dropped_logs),
            appended: appended
                .into_iter()
                .filter_map(|(id, messages)| stats(&id).map(|(log, stats)| (log, messages, stats)))
                .collect(),
            collected: collected.iter().filter_map(stats).collect(),
            emptied: std::mem::take(&mut group.emptied),
            segments: self.segments.clone(),
            replies: std::mem::take(&mut group.replies),
        };
        match syncer {
            // The syncer fsyncs and answers while this thread already writes the next group.
            Some(syncer) => {
                if let Err(std::sync::mpsc::SendError(committed)) = syncer.send(committed) {
                    let e = StoreError::Failed("the store's sync thread is gone".into());
                    fail(shared, &e);
                    committed.refuse(&e);
                }
            }
            None => committed.announce(shared),
        }
        group.close
    }

    /// Refuses a group that could not be committed. A full disk is survivable: nothing of the
    /// group reached sled, so the writer forgets what planning it changed and goes on (the
    /// next groups' acks free space). Any other failure stops all writes.
    fn fail_group(&mut self, group: Group, e: StoreError, shared: &Shared) -> bool {
        let survivable = matches!(e, StoreError::DiskFull { .. });
        if survivable {
            self.space.disk_full();
            if let Err(reload) = self.forget_group(shared) {
                fail(shared, &reload);
            }
        } else {
            fail(shared, &e);
        }
        for reply in group.replies {
            reply(Some(&e));
        }
        group.close
    }

    /// Undoes a group that failed before sled saw it: its records are cut from the segment
    /// file, and the writer's view is read back from sled, which holds exactly what was
    /// committed.
    fn forget_group(&mut self, shared: &Shared) -> Result<()> {
        self.appender.discard()?;
        self.next_id = read_next_id(&self.db)?;
        self.usage = read_usage(&self.db)?;
        let logs = shared.logs.read().expect("logs lock").clone();
        let mut channels = HashMap::new();
        for entry in self.db.scan_prefix(b"C") {
            let (key, value) = entry?;
            let id = ChannelId(id_of(&key)?);
            let record = ChannelRecord::decode(&value)?;
            // A channel created by the failed group has no record; one it deleted still has its
            // log among the announced ones.
            let log = match self.channels.remove(&id) {
                Some(channel) => channel.log,
                None => logs.get(&id).cloned().ok_or_else(|| {
                    StoreError::Corrupt(format!("channel {:?} has no log", record.name))
                })?,
            };
            channels.insert(id, WriterChannel::new(record, log));
        }
        self.names = channels
            .iter()
            .map(|(id, c)| (c.record.name.clone(), *id))
            .collect();
        self.pending_collects = channels.keys().copied().collect();
        self.channels = channels;
        self.subscriptions.clear();
        self.floors.clear();
        for entry in self.db.scan_prefix(b"S") {
            let (key, value) = entry?;
            let id = SubscriptionId(id_of(&key)?);
            let record = SubscriptionRecord::decode(&value)?;
            if let Some(raw) = self.db.get(ack_key(id))? {
                self.floors.insert(id, codec::decode_ack_state(&raw)?.floor);
            }
            self.subscriptions.insert(id, record);
        }
        tracing::warn!(
            "a group was refused for lack of disk space; the writer goes on with what is committed"
        );
        Ok(())
    }

    /// Adds one request to the group, or refuses it at once.
    fn plan(&mut self, op: Op, group: &mut Group) -> Result<(), (Pending, StoreError)> {
        match op {
            Op::Append {
                channel,
                messages,
                reply,
            } => {
                let Some(state) = self.channels.get_mut(&channel) else {
                    return Err((pending(reply, 0..0), StoreError::ChannelNotFound));
                };
                // Checked again here: appends queued before the watermark was crossed must not
                // take the disk past it.
                if let Err(e) = self.space.check() {
                    return Err((pending(reply, 0..0), e));
                }
                let first = state.record.next_seq;
                let range = first..first + messages.len() as u64;
                state.record.next_seq = range.end;
                group.touched.insert(channel);
                group
                    .appends
                    .entry(channel)
                    .or_insert_with(|| (first, Vec::new()))
                    .1
                    .extend(messages);
                group.replies.push(pending(reply, range));
            }
            Op::SaveAcks {
                subscription,
                state,
                reply,
            } => {
                if !self.subscriptions.contains_key(&subscription) {
                    return Err((pending(reply, ()), StoreError::SubscriptionNotFound));
                }
                group
                    .batch
                    .insert(&ack_key(subscription), codec::encode_ack_state(&state));
                self.floors.insert(subscription, state.floor);
                if let Some(record) = self.subscriptions.get(&subscription) {
                    group.collects.insert(record.channel);
                }
                group.ack_states += 1;
                group.replies.push(pending(reply, ()));
            }
            Op::CreateChannel { name, reply } => {
                if self.names.contains_key(&name) {
                    return Err((
                        pending(reply, ChannelId(0)),
                        StoreError::ChannelExists(name),
                    ));
                }
                let id = ChannelId(self.allocate_id(group));
                let record = ChannelRecord {
                    name: name.clone(),
                    next_seq: 1,
                    first_seq: 1,
                    bytes: 0,
                };
                let log = Arc::new(ChannelLog::new(
                    id,
                    self.db.clone(),
                    self.segments.clone(),
                    stats_of(&record),
                    self.cache.clone(),
                ));
                group.new_logs.push(log.clone());
                group.touched.insert(id);
                self.names.insert(name, id);
                self.channels.insert(id, WriterChannel::new(record, log));
                group.replies.push(pending(reply, id));
            }
            Op::DeleteChannel { channel, reply } => {
                if !self.channels.contains_key(&channel) {
                    return Err((pending(reply, ()), StoreError::ChannelNotFound));
                }
                // Read everything to delete before changing anything, so that a failed read
                // leaves the channel whole.
                let prefix = codec::channel_log_prefix(channel);
                let records: Result<Vec<_>> = self
                    .db
                    .scan_prefix(prefix)
                    .map(|entry| {
                        let (key, value) = entry?;
                        Ok((key, RecordLocation::decode(&value)?))
                    })
                    .collect();
                let records = match records {
                    Ok(records) => records,
                    Err(e) => return Err((pending(reply, ()), e)),
                };
                let state = self.channels.remove(&channel).expect("checked above");
                self.names.remove(&state.record.name);
                group.batch.remove(&channel_key(channel));
                group.touched.remove(&channel);
                group.appends.remove(&channel);
                group.collects.remove(&channel);
                for (key, at) in records {
                    group.batch.remove(key);
                    self.release(at, group);
                }
                let doomed: Vec<_> = self
                    .subscriptions
                    .iter()
                    .filter(|(_, s)| s.channel == channel)
                    .map(|(id, _)| *id)
                    .collect();
                for id in doomed {
                    self.subscriptions.remove(&id);
                    self.floors.remove(&id);
                    group.batch.remove(&subscription_key(id));
                    group.batch.remove(&ack_key(id));
                }
                group.dropped_logs.push(channel);
                group.replies.push(pending(reply, ()));
            }
            Op::CreateSubscription {
                channel,
                name,
                settings,
                reply,
            } => {
                let Some(state) = self.channels.get(&channel) else {
                    return Err((
                        pending(reply, (SubscriptionId(0), AckState::default())),
                        StoreError::ChannelNotFound,
                    ));
                };
                if self
                    .subscriptions
                    .values()
                    .any(|s| s.channel == channel && s.name == name)
                {
                    return Err((
                        pending(reply, (SubscriptionId(0), AckState::default())),
                        StoreError::SubscriptionExists(name),
                    ));
                }
                let acks = AckState {
                    floor: state.record.next_seq,
                    acked_total: 0,
                    acked_above_floor: Vec::new(),
                };
                let id = SubscriptionId(self.allocate_id(group));
                let record = SubscriptionRecord {
                    channel,
                    name,
                    settings,
                };
                group.batch.insert(&subscription_key(id), record.encode());
                group
                    .batch
                    .insert(&ack_key(id), codec::encode_ack_state(&acks));
                self.subscriptions.insert(id, record);
                self.floors.insert(id, acks.floor);
                group.replies.push(pending(reply, (id, acks)));
            }
            Op::UpdateSubscription {
                subscription,
                settings,
                reply,
            } => {
                let Some(record) = self.subscriptions.get_mut(&subscription) else {
                    return Err((pending(reply, ()), StoreError::SubscriptionNotFound));
                };
                record.settings = settings;
                group
                    .batch
                    .insert(&subscription_key(subscription), record.encode());
                group.replies.push(pending(reply, ()));
            }
            Op::DeleteSubscription {
                subscription,
                reply,
            } => {
                let Some(record) = self.subscriptions.remove(&subscription) else {
                    return Err((pending(reply, ()), StoreError::SubscriptionNotFound));
                };
                self.floors.remove(&subscription);
                group.collects.insert(record.channel);
                group.batch.remove(&subscription_key(subscription));
                group.batch.remove(&ack_key(subscription));
                group.replies.push(pending(reply, ()));
            }
            Op::Close { reply } => {
                group.close = true;
                group.replies.push(pending(reply, ()));
            }
        }
        Ok(())
    }

    fn allocate_id(&mut self, group: &mut Group) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        group.batch.insert(KEY_NEXT_ID, &self.next_id.to_le_bytes());
        id
    }

    /// Deletes the records wholly below the lowest ack floor of each channel whose floors may
    /// have moved (all of them once no subscription is left); returns the channels changed. As
    /// this happens in the same batch as the ack state that allows it, a crash never leaves
    /// collection half done.
    ///
    /// A record's last sequence is one before the next record's first, or the channel's last
    /// committed sequence when it is the newest record, so no record needs to be read.
    fn plan_collects(&mut self, group: &mut Group) -> Result<Vec<ChannelId>> {
        let mut changed = Vec::new();
        let mut releases = Vec::new();
        for &id in &group.collects {
            let lowest_floor = self
                .subscriptions
                .iter()
                .filter(|(_, s)| s.channel == id)
                .filter_map(|(sub, _)| self.floors.get(sub))
                .min()
                .copied();
            let Some(channel) = self.channels.get_mut(&id) else {
                continue;
            };
            let committed_end = channel.log.stats().next_seq;
            // Without subscriptions everything written goes, including what is not announced yet.
            let wanted = lowest_floor.unwrap_or(channel.record.next_seq);
            if wanted > committed_end {
                self.pending_collects.insert(id);
            }
            let below = wanted.min(committed_end);
            if below <= channel.record.first_seq || below <= channel.collected_below {
                continue;
            }
            channel.collected_below = below;
            let mut doomed: Vec<(u64, sled::IVec, RecordLocation)> = Vec::new();
            for entry in self.db.range(record_key(id, 0)..record_key(id, below)) {
                let (key, value) = entry?;
                doomed.push((
                    codec::parse_record_key(&key)?,
                    key,
                    RecordLocation::decode(&value)?,
                ));
            }
            let next_record = match self
                .db
                .range(record_key(id, below)..=record_key(id, u64::MAX))
                .next()
            {
                Some(entry) => Some(codec::parse_record_key(&entry?.0)?),
                None => None,
            };
            // The newest record found may reach past `below`: keep it then.
            let last_ends_below = match next_record {
                Some(next) => next <= below,
                None => committed_end <= below,
            };
            let mut new_first = next_record.unwrap_or(committed_end);
            if !last_ends_below && let Some(&(last_first, _, _)) = doomed.last() {
                doomed.retain(|(first, _, _)| *first != last_first);
                new_first = last_first;
            }
            if doomed.is_empty() {
                continue;
            }
            let mut freed = 0;
            for (_, key, at) in doomed {
                group.batch.remove(key);
                freed += u64::from(at.len);
                releases.push(at);
            }
            channel.record.bytes = channel.record.bytes.saturating_sub(freed);
            channel.record.first_seq = new_first;
            group.touched.insert(id);
            changed.push(id);
        }
        for at in releases {
            self.release(at, group);
        }
        Ok(changed)
    }

    /// Counts a record out of its segment file.
    fn release(&mut self, at: RecordLocation, group: &mut Group) {
        let usage = self.usage.entry(at.segment).or_default();
        usage.records = usage.records.saturating_sub(1);
        usage.bytes = usage.bytes.saturating_sub(u64::from(at.len));
        group.segments.insert(at.segment);
    }

    /// Writes the usage of the segments the group touched; a segment no record is left in (and
    /// that is no longer appended to) loses its entry, and its file goes once that is durable.
    fn plan_segments(&mut self, group: &mut Group) {
        for segment in std::mem::take(&mut group.segments) {
            let usage = self.usage.get(&segment).copied().unwrap_or_default();
            if usage.records == 0 && segment != self.appender.current() {
                self.usage.remove(&segment);
                group.batch.remove(&segment_key(segment));
                group.emptied.push(segment);
            } else {
                group.batch.insert(&segment_key(segment), &usage.encode());
            }
        }
    }

    /// Encodes each channel's new messages into records; returns the messages as stored.
    fn encode_appends(&mut self, group: &mut Group) -> Result<Vec<(ChannelId, Vec<Message>)>> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut stored = Vec::with_capacity(group.appends.len());
        for (id, (first, messages)) in std::mem::take(&mut group.appends) {
            let subscribed = self.subscriptions.values().any(|s| s.channel == id);
            let Some(channel) = self.channels.get_mut(&id) else {
                continue;
            };
            if !subscribed {
                if channel.record.first_seq == first {
                    // Nobody will ever want these: they get their sequences, and are not stored.
                    channel.record.first_seq = channel.record.next_seq;
                    stored.push((id, Vec::new()));
                    continue;
                }
                // Older records are still being collected: store these too, collect all later.
                self.pending_collects.insert(id);
            }
            let mut body = Vec::new();
            let mut start = 0;
            for end in 1..=messages.len() {
                let last = end == messages.len();
                codec::encode_body(&messages[end - 1..end], now, &mut body);
                if body.len() >= codec::RECORD_TARGET_BYTES || last {
                    let count = (end - start) as u32;
                    let record_first = first + start as u64;
                    let at = self
                        .appender
                        .append(|out| codec::frame_record(id, record_first, count, &body, out))?;
                    group
                        .batch
                        .insert(&record_key(id, record_first), &at.encode());
                    channel.record.bytes += u64::from(at.len);
                    let usage = self.usage.entry(at.segment).or_default();
                    usage.records += 1;
                    usage.bytes += u64::from(at.len);
                    group.segments.insert(at.segment);
                    body.clear();
                    start = end;
                }
            }
            let messages = messages
                .into_iter()
                .enumerate()
                .map(|(i, m)| Message {
                    sequence: first + i as u64,
                    publish_time_ms: now,
                    key: m.key,
                    id: m.id,
                    attributes: m.attributes,
                    payload: m.payload,
                })
                .collect();
            stored.push((id, messages));
        }
        Ok(stored)
    }

    /// Gets the group's writes out of sled's buffers into its log file, as the mode requires;
    /// in `Always` mode the syncer thread then fsyncs them.
    fn write_out(&mut self) -> Result<()> {
        match self.fsync {
            FsyncMode::Always => {
                self.db.flush()?;
                self.counters.synced(1);
                Ok(())
            }
            FsyncMode::Interval(_) => {
                self.db.flush()?;
                self.counters.synced(1);
                self.unsynced_since.get_or_insert_with(Instant::now);
                Ok(())
            }
            FsyncMode::Never => {
                self.unsynced_since.get_or_insert_with(Instant::now);
                Ok(())
            }
        }
    }

    /// When the writer must wake to fsync what it has written, if ever.
    fn sync_deadline(&self) -> Option<Instant> {
        match self.fsync {
            FsyncMode::Interval(every) => self.unsynced_since.map(|since| since + every),
            _ => None,
        }
    }

    fn sync_now(&mut self) -> Result<()> {
        self.unsynced_since = None;
        self.appender.sync()?;
        self.db.flush()?;
        self.counters.synced(1);
        self.files.lock().expect("files lock").sync()
    }
}

/// A group applied to sled, waiting to be fsync'd (in `Always` mode) and then announced.
struct Committed {
    new_logs: Vec<Arc<ChannelLog>>,
    dropped_logs: Vec<ChannelId>,
    appended: Vec<(Arc<ChannelLog>, Vec<Message>, ChannelStats)>,
    collected: Vec<(Arc<ChannelLog>, ChannelStats)>,
    emptied: Vec<u32>,
    segments: Arc<Segments>,
    replies: Vec<Pending>,
}

impl Committed {
    /// Shows the group to readers, then answers its callers: readers see the new state before
    /// any caller hears of it.
    fn announce(self, shared: &Shared) {
        {
            let mut logs = shared.logs.write().expect("logs lock");
            for log in self.new_logs {
                logs.insert(log.id(), log);
            }
            for id in self.dropped_logs {
                logs.remove(&id);
            }
        }
        for (log, messages, stats) in self.appended {
            log.appended(messages, stats);
        }
        for (log, stats) in self.collected {
            log.collected(stats);
        }
        shared.cache.enforce(&shared.logs);
        // Only now is it durable that no index entry names these files.
        if !self.emptied.is_empty() {
            shared.counters.synced(1);
        }
        if let Err(e) = self.segments.remove(&self.emptied) {
            tracing::warn!(error = %e, "cannot delete an emptied segment file; it goes at the next start");
        }
        for reply in self.replies {
            reply(None);
        }
    }

    fn refuse(self, e: &StoreError) {
        for reply in self.replies {
            reply(Some(e));
        }
    }
}

/// The syncer thread of `Always` mode: one fsync for every group the writer has flushed since
/// the last one, then their announcements, in order. Because the writer goes on applying and
/// flushing the next group meanwhile, a commit's two waits on the disk (sled's flush, our fsync)
/// overlap with the next group's instead of adding up.
fn sync_loop(groups: Receiver<Committed>, files: Arc<Mutex<DurableFiles>>, shared: Arc<Shared>) {
    while let Ok(first) = groups.recv() {
        let mut ready = vec![first];
        ready.extend(groups.try_iter());
        let failure = shared.failure.lock().expect("failure lock").clone();
        let synced = match failure {
            Some(failure) => Err(StoreError::Failed(failure)),
            None => files.lock().expect("files lock").sync(),
        };
        match synced {
            Ok(()) => {
                failpoint::hit("synced");
                ready.into_iter().for_each(|group| group.announce(&shared));
            }
            Err(e) => {
                fail(&shared, &e);
                ready.into_iter().for_each(|group| group.refuse(&e));
            }
        }
    }
}

/// Reads back the records `verify` asks for (the last of each segment file, or all) and marks
/// the damaged ones in their channel's log, which reports them and makes readers skip them.
fn verify_records(
    db: &sled::Db,
    segments: &Segments,
    channels: &HashMap<ChannelId, WriterChannel>,
    verify: Verify,
) -> Result<()> {
    if verify == Verify::Off {
        return Ok(());
    }
    // A record ends where the next one of its channel starts, or at the channel's end.
    let mut records = Vec::new();
    let mut previous: Option<(ChannelId, u64, RecordLocation)> = None;
    let end_of = |channel: &ChannelId| channels.get(channel).map_or(0, |c| c.record.next_seq);
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
        let (Err(e), Some(owner)) = (checked, channels.get(&channel)) else {
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

/// Checks (or, for a new store, writes) the format version; a version 2 store is upgraded in
/// place (its records are still read; new ones are written in version 3).
fn check_version(db: &sled::Db, dir: &Path) -> Result<()> {
    match db.get(KEY_VERSION)? {
        Some(v) if v.as_ref() == codec::FORMAT_VERSION.to_le_bytes() => {}
        Some(v) if v.as_ref() == codec::FORMAT_VERSION_2.to_le_bytes() => {
            db.insert(KEY_VERSION, &codec::FORMAT_VERSION.to_le_bytes())?;
        }
        Some(v) => {
            return Err(StoreError::Corrupt(format!(
                "unsupported store format {v:?} in {}",
                dir.display()
            )));
        }
        None if db.is_empty() => {
            db.insert(KEY_VERSION, &codec::FORMAT_VERSION.to_le_bytes())?;
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

/// Reads every subscription with its ack state, adding each to `recovered`; returns them with
/// their ack floors.
#[allow(clippy::type_complexity)]
fn load_subscriptions(
    db: &sled::Db,
    channels: &HashMap<ChannelId, WriterChannel>,
    recovered: &mut Recovered,
) -> Result<(
    HashMap<SubscriptionId, SubscriptionRecord>,
    HashMap<SubscriptionId, u64>,
)> {
    let mut subscriptions = HashMap::new();
    let mut floors = HashMap::new();
    for entry in db.scan_prefix(b"S") {
        let (key, value) = entry?;
        let id = SubscriptionId(id_of(&key)?);
        let record = SubscriptionRecord::decode(&value)?;
        if !channels.contains_key(&record.channel) {
            return Err(StoreError::Corrupt(format!(
                "subscription {:?} names a missing channel",
                record.name
            )));
        }
        let Some(raw) = db.get(ack_key(id))? else {
            return Err(StoreError::Corrupt(format!(
                "subscription {:?} has no ack state",
                record.name
            )));
        };
        let acks = codec::decode_ack_state(&raw)?;
        floors.insert(id, acks.floor);
        recovered.subscriptions.push(RecoveredSubscription {
            id,
            channel: record.channel,
            name: record.name.clone(),
            settings: record.settings,
            acks,
        });
        subscriptions.insert(id, record);
    }
    Ok((subscriptions, floors))
}

pub(crate) fn read_next_id(db: &sled::Db) -> Result<u32> {
    match db.get(KEY_NEXT_ID)? {
        Some(raw) => {
            Ok(u32::from_le_bytes(raw.as_ref().try_into().map_err(
                |_| StoreError::Corrupt("bad id counter".into()),
            )?))
        }
        None => Ok(1),
    }
}

pub(crate) fn read_usage(db: &sled::Db) -> Result<HashMap<u32, SegmentUsage>> {
    let mut usage = HashMap::new();
    for entry in db.scan_prefix(b"G") {
        let (key, value) = entry?;
        usage.insert(id_of(&key)?, SegmentUsage::decode(&value)?);
    }
    Ok(usage)
}

fn stats_of(record: &ChannelRecord) -> ChannelStats {
    ChannelStats {
        next_seq: record.next_seq,
        first_seq: record.first_seq,
        bytes: record.bytes,
    }
}

pub(crate) fn id_of(key: &[u8]) -> Result<u32> {
    key.get(1..5)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt(format!("bad key {key:?}")))
}

fn fail(shared: &Shared, e: &StoreError) {
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
        Op::Append { reply, .. } => send(pending(reply, 0..0)),
        Op::SaveAcks { reply, .. }
        | Op::DeleteChannel { reply, .. }
        | Op::UpdateSubscription { reply, .. }
        | Op::DeleteSubscription { reply, .. }
        | Op::Close { reply } => send(pending(reply, ())),
        Op::CreateChannel { reply, .. } => send(pending(reply, ChannelId(0))),
        Op::CreateSubscription { reply, .. } => {
            send(pending(reply, (SubscriptionId(0), AckState::default())))
        }
    }
}

/// The files sled writes that its own `flush()` does not make durable: its log file (flushed
/// with `sync_file_range` only) and blob files (never synced, nor their directory).
struct DurableFiles {
    dir: PathBuf,
    counters: Arc<Counters>,
    log: File,
    blobs: PathBuf,
    synced_blobs: HashSet<OsString>,
}

impl DurableFiles {
    fn open(dir: &Path, counters: Arc<Counters>) -> Result<Self> {
        let path = dir.join("db");
        let log = File::options()
            .read(true)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        Ok(Self {
            dir: dir.to_owned(),
            counters,
            log,
            blobs: dir.join("blobs"),
            synced_blobs: HashSet::new(),
        })
    }

    /// Makes the files' existence durable (sled does not fsync its directories).
    fn sync_directories(&self) -> Result<()> {
        for dir in [&self.dir, &self.blobs] {
            if dir.exists() {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io_error(dir, e))?;
            }
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.log
            .sync_data()
            .map_err(|e| io_error(&self.dir.join("db"), e))?;
        self.counters.synced(1);
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error(&self.blobs, e)),
        };
        let mut present = HashSet::new();
        let mut new_blobs = false;
        for entry in entries {
            let entry = entry.map_err(|e| io_error(&self.blobs, e))?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                match File::open(entry.path()).and_then(|f| f.sync_data()) {
                    Ok(()) => {
                        self.counters.synced(1);
                        new_blobs = true;
                    }
                    // sled removes blobs it no longer needs; one gone is one we need not sync.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error(&entry.path(), e)),
                }
            }
            present.insert(name);
        }
        self.synced_blobs = present;
        if new_blobs {
            File::open(&self.blobs)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_error(&self.blobs, e))?;
            self.counters.synced(1);
        }
        Ok(())
    }
}
