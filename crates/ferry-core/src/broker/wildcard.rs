//! Wildcard subscriptions: a subscription on a channel pattern (`orders.*`, `orders.>`) that
//! receives the messages of every matching channel, including channels created after it.
//!
//! A wildcard subscription is one entry of the store's catalog (its settings, filter and start)
//! and, on each matching channel, a member subscription named `PATTERN/NAME` that keeps its
//! ack state there like any subscription: deliveries, deadlines, retries, dead letters and
//! redrive all work per channel as they always do, and order holds per channel. A consumer
//! attaches to every member with one outbox, which holds its one window: the members'
//! dispatchers deliver into it and share the window exactly. Ack ids name their member, so an
//! ack goes straight to the dispatcher that issued it.
//!
//! Creation writes the entry before the members, deletion removes it before them, so that a
//! crash in between leaves what [`Broker::recover_wildcards`] completes on the next start: a
//! missing member is created (reading from the subscription's start), a member without an
//! entry is deleted, a member with other settings gets the entry's.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{Buf, BufMut};
use ferry_store::{ChannelId, Position, RecoveredSubscription, StoreError};
use tokio::sync::{mpsc, oneshot};

use super::{Broker, ChannelShared, ConsumerHandle, Link, SubscriptionHandle, stats_of};
use crate::dispatcher::{Command, now_ms, subscription_of};
use crate::error::{CoreError, Result};
use crate::outbox::{ConsumerEvents, Outbox, answer_bytes, outbox};
use crate::pattern::Pattern;
use crate::{
    AckOutcome, AckResult, Attached, ConsumerEvent, Point, Settlement, SubscriptionSettings,
    SubscriptionStats, Window, names,
};

/// Catalog keys of wildcard subscriptions start with this; `PATTERN/NAME` follows.
const CATALOG_PREFIX: &str = "wildcard:";
/// The version byte of a catalog entry.
const RECORD_V1: u8 = 1;

/// The name of a wildcard subscription's member on each channel: neither a pattern nor a
/// subscription name can hold `/`, so it names one wildcard subscription unambiguously.
pub(super) fn member_name(pattern: &str, name: &str) -> String {
    format!("{pattern}/{name}")
}

/// The pattern and name of the wildcard subscription `subscription` is a member of, if it is
/// one.
pub(super) fn member_of(subscription: &str) -> Option<(&str, &str)> {
    subscription
        .split_once('/')
        .filter(|(pattern, _)| Pattern::is_pattern(pattern))
}

/// What the catalog keeps of a wildcard subscription besides its pattern and name.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    settings: ferry_store::SubscriptionSettings,
    filter: String,
    /// Where members on channels that existed before it start: messages published from this
    /// time on (ms since the Unix epoch; 0: every message still stored).
    start_ms: u64,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![RECORD_V1];
        out.put_u64_le(self.start_ms);
        out.put_u32_le(self.filter.len() as u32);
        out.put_slice(self.filter.as_bytes());
        let settings = self.settings.encode();
        out.put_u32_le(settings.len() as u32);
        out.put_slice(&settings);
        out
    }

    fn decode(mut raw: &[u8]) -> Option<Record> {
        if raw.remaining() < 13 || raw.get_u8() != RECORD_V1 {
            return None;
        }
        let start_ms = raw.get_u64_le();
        let len = raw.get_u32_le() as usize;
        let filter = std::str::from_utf8(raw.get(..len)?).ok()?.to_owned();
        raw.advance(len);
        if raw.remaining() < 4 {
            return None;
        }
        let len = raw.get_u32_le() as usize;
        let mut encoded = raw.get(..len).filter(|_| raw.len() == len)?;
        let settings = ferry_store::SubscriptionSettings::decode(&mut encoded)?;
        if !encoded.is_empty() {
            return None;
        }
        Some(Record {
            settings,
            filter,
            start_ms,
        })
    }
}

/// A wildcard subscription as the broker runs it.
pub(super) struct Wildcard {
    pattern: Pattern,
    name: String,
    /// Its filter's text ("": none); it never changes.
    filter: String,
    start_ms: u64,
    settings: Mutex<ferry_store::SubscriptionSettings>,
    /// Its member on each matching channel, by channel name.
    members: Mutex<BTreeMap<String, Member>>,
    /// The consumers attached to it; each is attached to every member.
    consumers: Mutex<Vec<Weak<Joined>>>,
    next_consumer: AtomicU64,
}

#[derive(Clone)]
struct Member {
    channel: Arc<ChannelShared>,
    handle: Arc<SubscriptionHandle>,
}

impl Wildcard {
    fn members(&self) -> Vec<Member> {
        let members = self.members.lock().expect("members lock");
        members.values().cloned().collect()
    }

    /// The consumers still attached (forgetting those that left).
    fn consumers(&self) -> Vec<Arc<Joined>> {
        let mut consumers = self.consumers.lock().expect("consumers lock");
        consumers.retain(|c| c.strong_count() > 0);
        consumers.iter().filter_map(Weak::upgrade).collect()
    }

    fn record(&self) -> Record {
        Record {
            settings: *self.settings.lock().expect("settings lock"),
            filter: self.filter.clone(),
            start_ms: self.start_ms,
        }
    }
}

/// One consumer of a wildcard subscription: its outbox, and its attachment to each member.
pub(super) struct Joined {
    outbox: Outbox,
    /// By member subscription id: that dispatcher's commands and the consumer's id there.
    attachments: Mutex<HashMap<u32, (mpsc::Sender<Command>, u64)>>,
}

impl Drop for Joined {
    fn drop(&mut self) {
        let attachments = std::mem::take(&mut *self.attachments.lock().expect("attachments"));
        for (commands, consumer) in attachments.into_values() {
            super::detach(&commands, consumer);
        }
    }
}

impl Joined {
    /// Sends acks, nacks or extensions to the members whose ack ids they are. A request that
    /// names deliveries of several channels is answered by one result event per channel; an
    /// id no member issued is answered `UNKNOWN`.
    pub(super) async fn settle(&self, ack_ids: Vec<String>, settlement: Settlement) -> Result<()> {
        let gate = self.outbox.gate();
        if !gate.room_for_requests().await {
            return Err(CoreError::ConsumerDetached);
        }
        let mut groups: HashMap<Option<u32>, Vec<String>> = HashMap::new();
        for id in ack_ids {
            groups.entry(subscription_of(&id)).or_default().push(id);
        }
        for (subscription, ack_ids) in groups {
            let target = {
                let attachments = self.attachments.lock().expect("attachments");
                subscription.and_then(|s| attachments.get(&s).cloned())
            };
            let reserved = answer_bytes(&ack_ids);
            gate.reserve(reserved);
            let Some((commands, consumer)) = target else {
                self.answer_unknown(ack_ids, &settlement, reserved);
                continue;
            };
            let command = Command::Settle {
                consumer,
                ack_ids,
                settlement: settlement.clone(),
                reserved,
            };
            // Its channel was deleted meanwhile.
            if let Err(mpsc::error::SendError(Command::Settle { ack_ids, .. })) =
                commands.send(command).await
            {
                self.answer_unknown(ack_ids, &settlement, reserved);
            }
        }
        Ok(())
    }

    fn answer_unknown(&self, ack_ids: Vec<String>, settlement: &Settlement, reserved: usize) {
        let results = ack_ids
            .into_iter()
            .map(|ack_id| AckOutcome {
                ack_id,
                result: AckResult::Unknown,
            })
            .collect();
        let event = ConsumerEvent::Results {
            operation: settlement.operation(),
            results,
        };
        self.outbox.push_reserved(reserved, event);
    }

    /// Changes the window the members share.
    pub(super) fn set_window(&self, window: Window) {
        self.outbox.set_window(window);
    }
}

impl Broker {
    fn wildcard(&self, pattern: &str, name: &str) -> Result<Arc<Wildcard>> {
        let wildcards = self.inner.wildcards.read().expect("wildcards lock");
        wildcards
            .get(&(pattern.to_owned(), name.to_owned()))
            .cloned()
            .ok_or_else(|| CoreError::SubscriptionNotFound {
                channel: pattern.to_owned(),
                name: name.to_owned(),
            })
    }

    fn wildcards(&self) -> Vec<Arc<Wildcard>> {
        let wildcards = self.inner.wildcards.read().expect("wildcards lock");
        wildcards.values().cloned().collect()
    }

    /// Checks settings for a wildcard subscription and resolves its dead-letter channel, which
    /// must exist and must not match the pattern (its dead letters would come back to it).
    fn resolve_wildcard(
        &self,
        pattern: &Pattern,
        settings: &SubscriptionSettings,
    ) -> Result<ferry_store::SubscriptionSettings> {
        self.resolve_for(settings, |name| {
            pattern.matches(name).then(|| {
                format!(
                    "dead_letter_channel {name:?} matches the subscription's pattern \
                     {:?}: a message that keeps failing would come back to it; name a \
                     channel the pattern does not match",
                    pattern.as_str()
                )
            })
        })
    }

    /// Creates a wildcard subscription on `pattern`: it reads every channel the pattern
    /// matches, from `start` on those that exist now (`Latest`, `Earliest` or a time) and from
    /// their first message on those created later.
    pub(super) async fn create_wildcard(
        &self,
        pattern: &str,
        name: &str,
        settings: SubscriptionSettings,
        start: Point,
    ) -> Result<SubscriptionStats> {
        self.check_open()?;
        let pattern = Pattern::parse(pattern)?;
        names::validate("subscription", name)?;
        let (start_ms, start) = match start {
            Point::Latest => (now_ms(), Position::Latest),
            Point::Earliest => (0, Position::Earliest),
            Point::Time(ms) => (ms, Position::Time(ms)),
            Point::Sequence(_) | Point::Subscription(_) => {
                return Err(CoreError::InvalidArgument(format!(
                    "a wildcard subscription reads several channels, whose sequences differ: \
                     start {:?} at the latest or earliest message, or at a time",
                    pattern.as_str()
                )));
            }
        };
        let filter = settings.filter.clone().unwrap_or_default();
        let _admin = self.inner.admin.lock().await;
        let resolved = self.resolve_wildcard(&pattern, &settings)?;
        let key = (pattern.to_string(), name.to_owned());
        if self
            .inner
            .wildcards
            .read()
            .expect("wildcards lock")
            .contains_key(&key)
        {
            return Err(CoreError::SubscriptionExists {
                channel: key.0,
                name: key.1,
            });
        }
        let record = Record {
            settings: resolved,
            filter,
            start_ms,
        };
        let catalog_key = format!("{CATALOG_PREFIX}{}", member_name(&key.0, name));
        (self.inner.store)
            .put_catalog(catalog_key, Some(record.encode()))
            .await?;
        let wildcard = self.register_wildcard(pattern, name.to_owned(), record);
        for channel in self.channels_matching(&wildcard.pattern) {
            self.add_member(&wildcard, &channel, start).await?;
        }
        tracing::info!(pattern = %wildcard.pattern, subscription = name, "wildcard subscription created");
        self.wildcard_stats(&wildcard).await
    }

    fn register_wildcard(&self, pattern: Pattern, name: String, record: Record) -> Arc<Wildcard> {
        let key = (pattern.to_string(), name.clone());
        let wildcard = Arc::new(Wildcard {
            pattern,
            name,
            filter: record.filter,
            start_ms: record.start_ms,
            settings: Mutex::new(record.settings),
            members: Mutex::new(BTreeMap::new()),
            consumers: Mutex::new(Vec::new()),
            next_consumer: AtomicU64::new(1),
        });
        let mut wildcards = self.inner.wildcards.write().expect("wildcards lock");
        wildcards.insert(key, wildcard.clone());
        wildcard
    }

    /// The channels now, matching `pattern`.
    pub(super) fn channels_matching(&self, pattern: &Pattern) -> Vec<Arc<ChannelShared>> {
        let channels = self.inner.channels.read().expect("channels lock");
        (channels.values())
            .filter(|c| pattern.matches(&c.name))
            .cloned()
            .collect()
    }

    /// Creates the member of `wildcard` on `channel`, starts its dispatcher, and attaches the
    /// wildcard's consumers to it. Runs under the admin lock.
    async fn add_member(
        &self,
        wildcard: &Arc<Wildcard>,
        channel: &Arc<ChannelShared>,
        start: Position,
    ) -> Result<()> {
        let record = wildcard.record();
        let name = member_name(wildcard.pattern.as_str(), &wildcard.name);
        let member = RecoveredSubscription {
            settings: record.settings,
            filter: record.filter,
            ..self.member_of_channel(channel, name)
        };
        let sub = self.create_member(member, start).await?;
        self.start_member(wildcard, channel, sub).await;
        Ok(())
    }

    /// A member subscription of `channel` to be created, with default settings.
    pub(super) fn member_of_channel(
        &self,
        channel: &ChannelShared,
        name: String,
    ) -> RecoveredSubscription {
        RecoveredSubscription {
            id: ferry_store::SubscriptionId(0),
            channel: channel.id,
            name,
            settings: ferry_store::SubscriptionSettings::default(),
            filter: String::new(),
            transform: Vec::new(),
            acks: ferry_store::AckState::default(),
            failures: Vec::new(),
        }
    }

    /// Creates a pattern's member subscription in the store at `start` (a channel that no
    /// longer holds messages that old starts at its earliest); returns it with its id and
    /// ack state.
    pub(super) async fn create_member(
        &self,
        member: RecoveredSubscription,
        start: Position,
    ) -> Result<RecoveredSubscription> {
        let create = |start| {
            (self.inner.store).create_filtered_subscription(
                member.channel,
                member.name.clone(),
                member.settings,
                start,
                member.filter.clone(),
                member.transform.clone(),
            )
        };
        let (id, acks) = match create(start).await {
            Err(StoreError::OutOfRange { .. }) => create(Position::Earliest).await?,
            created => created?,
        };
        Ok(RecoveredSubscription { id, acks, ..member })
    }

    /// Starts a member's dispatcher and attaches the wildcard's consumers to it.
    async fn start_member(
        &self,
        wildcard: &Arc<Wildcard>,
        channel: &Arc<ChannelShared>,
        sub: RecoveredSubscription,
    ) {
        let name = sub.name.clone();
        self.start_subscription(channel, sub);
        let Ok(handle) = channel.subscription(&name) else {
            return;
        };
        let member = Member {
            channel: channel.clone(),
            handle,
        };
        (wildcard.members.lock().expect("members lock")).insert(channel.name.clone(), member);
        for joined in wildcard.consumers() {
            // A member past its consumer limit leaves this consumer without that channel; the
            // limit is logged by the member.
            let _ = join(&joined, &channel.subscription(&name).expect("started")).await;
        }
    }

    /// Gives a channel being created the members of the wildcard subscriptions that match it,
    /// reading from its first message. Runs under the admin lock, before the channel is
    /// published to.
    pub(super) async fn add_members(&self, channel: &Arc<ChannelShared>) -> Result<()> {
        for wildcard in self.wildcards() {
            if wildcard.pattern.matches(&channel.name) {
                self.add_member(&wildcard, channel, Position::Earliest)
                    .await?;
            }
        }
        Ok(())
    }

    /// Forgets the members on a deleted channel (the store deleted them with it).
    pub(super) fn forget_members(&self, channel: &str) {
        for wildcard in self.wildcards() {
            let removed = (wildcard.members.lock().expect("members lock")).remove(channel);
            if let Some(member) = removed {
                for joined in wildcard.consumers() {
                    let mut attachments = joined.attachments.lock().expect("attachments");
                    attachments.remove(&member.handle.id.0);
                }
            }
        }
    }

    /// The wildcard subscription (pattern, name) whose dead-letter channel `channel` is, if
    /// any.
    pub(super) fn wildcard_dead_letter_user(&self, channel: ChannelId) -> Option<(String, String)> {
        self.wildcards()
            .into_iter()
            .find(|w| w.settings.lock().expect("settings lock").dead_letter == Some(channel))
            .map(|w| (w.pattern.to_string(), w.name.clone()))
    }

    /// Attaches a consumer to a wildcard subscription: to each of its members now, and to
    /// each member created while it stays attached.
    pub(super) async fn attach_wildcard(
        &self,
        pattern: &str,
        name: &str,
        window: Window,
    ) -> Result<(ConsumerHandle, ConsumerEvents, Attached)> {
        // Under the admin lock no member is created or deleted meanwhile: the consumer is
        // attached to each exactly once, here or as the member starts, and the subscription
        // is not deleted under it.
        let _admin = self.inner.admin.lock().await;
        self.check_open()?;
        let wildcard = self.wildcard(pattern, name)?;
        // The same bound as a subscription of one channel, also while no channel matches
        // (when no member would count the consumers).
        let most = self.inner.consumer_limits.max_per_subscription as usize;
        if wildcard.consumers().len() >= most {
            tracing::warn!(
                pattern,
                subscription = name,
                consumers = most,
                "a consumer was refused: limits.max_consumers_per_subscription reached"
            );
            return Err(CoreError::TooManyConsumers {
                subscription: member_name(pattern, name),
                most,
            });
        }
        let (outbox, events) = outbox(self.inner.consumer_limits.queue_bytes, window);
        let joined = Arc::new(Joined {
            outbox,
            attachments: Mutex::new(HashMap::new()),
        });
        for member in wildcard.members() {
            join(&joined, &member.handle).await?;
        }
        (wildcard.consumers.lock().expect("consumers lock")).push(Arc::downgrade(&joined));
        let attached = Attached {
            consumer_id: wildcard.next_consumer.fetch_add(1, Ordering::Relaxed),
            ack_deadline_ms: wildcard
                .settings
                .lock()
                .expect("settings lock")
                .ack_deadline_ms,
            window,
        };
        let handle = ConsumerHandle {
            link: Link::Wildcard(joined),
        };
        Ok((handle, events, attached))
    }

    /// Changes a wildcard subscription's settings, on every member.
    pub(super) async fn update_wildcard(
        &self,
        pattern: &str,
        name: &str,
        settings: SubscriptionSettings,
    ) -> Result<()> {
        self.check_open()?;
        let _admin = self.inner.admin.lock().await;
        let wildcard = self.wildcard(pattern, name)?;
        let filter = settings.filter.as_deref().unwrap_or_default();
        if filter != wildcard.filter {
            return Err(CoreError::InvalidArgument(format!(
                "subscription {name:?} of {pattern:?} has the filter {:?}; a filter cannot \
                 change (as in Pub/Sub): create a new subscription with the new filter",
                wildcard.filter
            )));
        }
        let resolved = self.resolve_wildcard(&wildcard.pattern, &settings)?;
        if *wildcard.settings.lock().expect("settings lock") == resolved {
            return Ok(());
        }
        let record = Record {
            settings: resolved,
            ..wildcard.record()
        };
        let key = format!("{CATALOG_PREFIX}{}", member_name(pattern, name));
        (self.inner.store)
            .put_catalog(key, Some(record.encode()))
            .await?;
        *wildcard.settings.lock().expect("settings lock") = resolved;
        for member in wildcard.members() {
            // A crash before the last of these leaves members that start-up brings in line.
            (self.inner.store)
                .update_subscription(member.handle.id, resolved)
                .await?;
            self.reconfigure(&member.handle, resolved).await?;
        }
        tracing::info!(pattern, subscription = name, settings = ?resolved, "wildcard subscription updated");
        Ok(())
    }

    /// Deletes a wildcard subscription and its members; its consumers are disconnected.
    pub(super) async fn delete_wildcard(&self, pattern: &str, name: &str) -> Result<()> {
        self.check_open()?;
        let _admin = self.inner.admin.lock().await;
        let wildcard = self.wildcard(pattern, name)?;
        let key = format!("{CATALOG_PREFIX}{}", member_name(pattern, name));
        self.inner.store.put_catalog(key, None).await?;
        (self.inner.wildcards.write().expect("wildcards lock"))
            .remove(&(pattern.to_owned(), name.to_owned()));
        let reason = CoreError::SubscriptionNotFound {
            channel: pattern.to_owned(),
            name: name.to_owned(),
        };
        for joined in wildcard.consumers() {
            joined.outbox.close(reason.clone());
        }
        // Gone from the catalog: a member left behind by a failure here is deleted at the
        // next start.
        let members = std::mem::take(&mut *wildcard.members.lock().expect("members lock"));
        let mut failed = None;
        for member in members.into_values() {
            if let Err(e) = self.inner.store.delete_subscription(member.handle.id).await {
                tracing::error!(channel = %member.channel.name, pattern, subscription = name, error = %e, "cannot delete a member of a deleted wildcard subscription: it goes at the next start");
                failed.get_or_insert(e);
                continue;
            }
            self.remove_subscription(&member.channel, &member_name(pattern, name), reason.clone())
                .await;
        }
        tracing::info!(
            pattern,
            subscription = name,
            "wildcard subscription deleted"
        );
        failed.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Moves every member of a wildcard subscription to `to` (the latest or earliest message,
    /// or a time: sequences differ from channel to channel). A channel that no longer holds
    /// messages as old as the time goes to its earliest.
    pub(super) async fn seek_wildcard(
        &self,
        pattern: &str,
        name: &str,
        to: Point,
    ) -> Result<SubscriptionStats> {
        self.check_open()?;
        let wildcard = self.wildcard(pattern, name)?;
        let position = match to {
            Point::Latest => Position::Latest,
            Point::Earliest => Position::Earliest,
            Point::Time(ms) => Position::Time(ms),
            Point::Sequence(_) | Point::Subscription(_) => {
                return Err(CoreError::InvalidArgument(format!(
                    "{pattern:?} is a wildcard subscription over channels whose sequences \
                     differ: seek to the latest or earliest message, or to a time"
                )));
            }
        };
        for member in wildcard.members() {
            let commands = &member.handle.commands;
            // None: the member's channel was deleted meanwhile.
            let seek = |position| async move {
                let (reply, floor) = oneshot::channel();
                let command = Command::Seek { position, reply };
                commands.send(command).await.ok()?;
                floor.await.ok()
            };
            match seek(position).await {
                // A channel that no longer holds messages that old goes to its earliest.
                Some(Err(StoreError::OutOfRange { .. })) => {
                    if let Some(moved) = seek(Position::Earliest).await {
                        moved?;
                    }
                }
                Some(Err(StoreError::SubscriptionNotFound)) | None => {}
                Some(moved) => {
                    moved?;
                }
            }
        }
        self.wildcard_stats(&wildcard).await
    }

    /// Describes a wildcard subscription: its figures are the sums over its members.
    pub(super) async fn wildcard_info(
        &self,
        pattern: &str,
        name: &str,
    ) -> Result<SubscriptionStats> {
        let wildcard = self.wildcard(pattern, name)?;
        self.wildcard_stats(&wildcard).await
    }

    /// Describes the wildcard subscriptions on `pattern`, by name.
    pub(super) async fn list_wildcards(&self, pattern: &str) -> Result<Vec<SubscriptionStats>> {
        Pattern::parse(pattern)?;
        let mut out = Vec::new();
        for wildcard in self.wildcards() {
            if wildcard.pattern.as_str() == pattern {
                out.push(self.wildcard_stats(&wildcard).await?);
            }
        }
        Ok(out)
    }

    async fn wildcard_stats(&self, wildcard: &Wildcard) -> Result<SubscriptionStats> {
        let settings = *wildcard.settings.lock().expect("settings lock");
        let mut total = SubscriptionStats {
            name: wildcard.name.clone(),
            filter: wildcard.filter.clone(),
            filtered: 0,
            channels: Vec::new(),
            settings,
            dead_letter_channel: settings.dead_letter.and_then(|id| self.channel_name(id)),
            backlog: 0,
            in_flight: 0,
            acked: 0,
            unacked: 0,
            oldest_unacked_publish_time_ms: None,
            consumers: wildcard.consumers().len() as u32,
            damaged_skipped: 0,
            ack_floor: 0,
            delivered: 0,
            redelivered: 0,
            nacked: 0,
            dead_lettered: 0,
            discarded: 0,
            expired: 0,
            waiting_retry: 0,
            keys_blocked: 0,
        };
        for member in wildcard.members() {
            let Ok(s) = stats_of(&member.handle).await else {
                continue;
            };
            total.channels.push(member.channel.name.clone());
            total.filtered += s.filtered;
            total.backlog += s.backlog;
            total.in_flight += s.in_flight;
            total.acked += s.acked;
            total.unacked += s.unacked;
            total.oldest_unacked_publish_time_ms = [
                total.oldest_unacked_publish_time_ms,
                s.oldest_unacked_publish_time_ms,
            ]
            .into_iter()
            .flatten()
            .min();
            total.damaged_skipped += s.damaged_skipped;
            total.delivered += s.delivered;
            total.redelivered += s.redelivered;
            total.nacked += s.nacked;
            total.dead_lettered += s.dead_lettered;
            total.discarded += s.discarded;
            total.expired += s.expired;
            total.waiting_retry += s.waiting_retry;
            total.keys_blocked += s.keys_blocked;
        }
        Ok(total)
    }

    /// Brings back the wildcard subscriptions at start-up: runs their members' dispatchers and
    /// completes what a crash left half done (see the module docs).
    pub(super) async fn recover_wildcards(
        &self,
        catalog: &BTreeMap<String, Vec<u8>>,
        members: Vec<(Arc<ChannelShared>, RecoveredSubscription)>,
    ) -> Result<()> {
        for (key, value) in catalog {
            let Some(subject) = key.strip_prefix(CATALOG_PREFIX) else {
                continue;
            };
            let parsed = member_of(subject).and_then(|(pattern, name)| {
                Some((Pattern::parse(pattern).ok()?, name, Record::decode(value)?))
            });
            let Some((pattern, name, record)) = parsed else {
                return Err(StoreError::Corrupt(format!("bad catalog entry {key:?}")).into());
            };
            self.register_wildcard(pattern, name.to_owned(), record);
        }
        for (channel, sub) in members {
            let wildcard = member_of(&sub.name).and_then(|(p, n)| self.wildcard(p, n).ok());
            let Some(wildcard) = wildcard else {
                tracing::info!(channel = %channel.name, subscription = %sub.name, "deleting the member of a deleted wildcard subscription");
                // A store that refuses writes now (a full disk) must not keep the broker from
                // starting: what is not completed here is completed at the next start.
                if let Err(e) = self.inner.store.delete_subscription(sub.id).await {
                    tracing::error!(channel = %channel.name, subscription = %sub.name, error = %e, "cannot delete it now: at the next start");
                }
                continue;
            };
            let settings = *wildcard.settings.lock().expect("settings lock");
            let stale = sub.settings != settings;
            let id = sub.id;
            self.start_member(&wildcard, &channel, sub).await;
            if stale
                && let Ok(handle) =
                    channel.subscription(&member_name(wildcard.pattern.as_str(), &wildcard.name))
            {
                match self.inner.store.update_subscription(id, settings).await {
                    Ok(()) => self.reconfigure(&handle, settings).await?,
                    Err(e) => {
                        tracing::error!(channel = %channel.name, pattern = %wildcard.pattern, error = %e, "cannot bring a member's settings in line now: at the next start");
                    }
                }
            }
        }
        for wildcard in self.wildcards() {
            for channel in self.channels_matching(&wildcard.pattern) {
                let present =
                    (wildcard.members.lock().expect("members lock")).contains_key(&channel.name);
                if !present {
                    tracing::info!(channel = %channel.name, pattern = %wildcard.pattern, subscription = %wildcard.name, "creating a missing member of a wildcard subscription");
                    let start = match wildcard.start_ms {
                        0 => Position::Earliest,
                        ms => Position::Time(ms),
                    };
                    if let Err(e) = self.add_member(&wildcard, &channel, start).await {
                        tracing::error!(channel = %channel.name, pattern = %wildcard.pattern, error = %e, "cannot create it now: at the next start");
                    }
                }
            }
        }
        Ok(())
    }

    /// Ends the streams of every wildcard consumer (the broker is stopping).
    pub(super) fn close_wildcard_consumers(&self) {
        for wildcard in self.wildcards() {
            for joined in wildcard.consumers() {
                joined.outbox.close(CoreError::ShuttingDown);
            }
        }
    }
}

/// Attaches a wildcard consumer to one member.
async fn join(joined: &Arc<Joined>, member: &SubscriptionHandle) -> Result<()> {
    let (reply, id) = oneshot::channel();
    let command = Command::Join {
        outbox: joined.outbox.clone(),
        reply,
    };
    (member.commands.send(command).await).map_err(|_| CoreError::ShuttingDown)?;
    let consumer = id.await.map_err(|_| CoreError::ShuttingDown)??;
    let mut attachments = joined.attachments.lock().expect("attachments");
    attachments.insert(member.id.0, (member.commands.clone(), consumer));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let record = Record {
            settings: ferry_store::SubscriptionSettings {
                ack_deadline_ms: 12_000,
                max_delivery_attempts: 4,
                dead_letter: Some(ChannelId(7)),
                ordering: false,
                ..Default::default()
            },
            filter: "attributes.region = \"eu\"".into(),
            start_ms: 1_795_833_296_789,
        };
        assert_eq!(Record::decode(&record.encode()), Some(record.clone()));
        let encoded = record.encode();
        for cut in 0..encoded.len() {
            assert_eq!(Record::decode(&encoded[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn member_names_name_their_wildcard_subscription() {
        assert_eq!(member_name("orders.*", "audit"), "orders.*/audit");
        assert_eq!(member_of("orders.*/audit"), Some(("orders.*", "audit")));
        assert_eq!(member_of("orders.>/a.b"), Some(("orders.>", "a.b")));
        assert_eq!(member_of("audit"), None);
        assert_eq!(member_of("~derived.x"), None);
    }
}
