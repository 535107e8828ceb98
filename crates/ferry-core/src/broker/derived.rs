//! Derived channels as the broker manages them: declared or created through Admin, checked
//! (the source exists, the target is not the source, no cycle, a filter that parses), stored
//! as a hidden subscription of the source, and run by a [`Deriver`] task each.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ferry_store::{ChannelId, ChannelLog, Position, RecoveredSubscription, SubscriptionId};
use tokio::sync::watch;

use super::{Broker, ChannelShared};
use crate::acks::AckSet;
use crate::derive::{DerivedInfo, DerivedSpec, Deriver, PREFIX, Progress, Reshape};
use crate::error::{CoreError, Result};
use crate::filter::Filter;
use crate::pattern::Pattern;
use crate::{ChannelSettings, names};

/// A running derived channel.
pub(super) struct DerivedHandle {
    /// Its hidden subscription.
    id: SubscriptionId,
    /// The pattern of the derived channel it is the member of on this source, if it is one.
    pattern: Option<String>,
    spec: DerivedSpec,
    source_log: Arc<ChannelLog>,
    progress: Arc<Progress>,
    /// Sent to (or dropped) to stop its task; `None` if it could not be started.
    stop: Option<watch::Sender<()>>,
}

impl Broker {
    /// Creates a derived channel: from now on, every message published to `spec.source` that
    /// passes its filter is reshaped and appended to `spec.target` (created if missing),
    /// exactly once.
    ///
    /// The source may be a channel pattern (`orders.*`): every channel it matches feeds the
    /// target, including channels created later (from their first message).
    pub async fn create_derived(&self, spec: DerivedSpec) -> Result<DerivedInfo> {
        self.check_open()?;
        if Pattern::is_pattern(&spec.source) {
            return self.create_pattern_derived(spec).await;
        }
        names::validate("channel", &spec.target)?;
        let filter = parse_filter(&spec)?;
        spec.reshape.check()?;
        if spec.source == spec.target {
            return Err(CoreError::InvalidArgument(format!(
                "derived channel {:?} would read itself: give it another source",
                spec.target
            )));
        }
        let key = (spec.source.clone(), spec.target.clone());
        // Checked before the target is created, and again under the admin lock, where two
        // concurrent creations cannot both pass.
        self.check_new_derived(&spec)?;
        let source = self.channel(&spec.source)?;
        match self
            .create_channel(&spec.target, ChannelSettings::default())
            .await
        {
            Ok(_) | Err(CoreError::ChannelExists(_)) => {}
            Err(e) => return Err(e),
        }
        let _admin = self.inner.admin.lock().await;
        self.check_new_derived(&spec)?;
        let target = self.channel(&spec.target)?;
        let settings = ferry_store::SubscriptionSettings {
            dead_letter: Some(target.id),
            ..ferry_store::SubscriptionSettings::default()
        };
        let name = format!("{PREFIX}{}", spec.target);
        let transform = spec.reshape.encode();
        let filter_text = spec.filter.clone().unwrap_or_default();
        let (id, acks) = self
            .inner
            .store
            .create_filtered_subscription(
                source.id,
                name.clone(),
                settings,
                Position::Latest,
                filter_text.clone(),
                transform.clone(),
            )
            .await?;
        let sub = RecoveredSubscription {
            id,
            channel: source.id,
            name,
            settings,
            filter: filter_text,
            transform,
            acks,
            failures: Vec::new(),
        };
        self.run_derived(&source, target.id, spec.clone(), filter, sub);
        tracing::info!(source = %spec.source, target = %spec.target, "derived channel created");
        self.derived_info(&key).ok_or(CoreError::ShuttingDown)
    }

    /// Deletes a derived channel (its target channel and what it holds stay).
    pub async fn delete_derived(&self, source: &str, target: &str) -> Result<()> {
        self.check_open()?;
        if Pattern::is_pattern(source) {
            return self.delete_pattern_derived(source, target).await;
        }
        let _admin = self.inner.admin.lock().await;
        let key = (source.to_owned(), target.to_owned());
        let found = (self.inner.derived.lock().expect("derived lock"))
            .get(&key)
            .map(|h| (h.id, h.pattern.clone()));
        if let Some((_, Some(pattern))) = &found {
            return Err(CoreError::FailedPrecondition(format!(
                "{target:?} is derived from {source:?} as one of the channels of pattern \
                 {pattern:?}: delete the derived channel from {pattern:?}"
            )));
        }
        let Some(id) = found.map(|(id, _)| id) else {
            self.channel(source)?;
            return Err(CoreError::FailedPrecondition(format!(
                "no channel is derived from {source:?} into {target:?}"
            )));
        };
        self.inner.store.delete_subscription(id).await?;
        self.stop_derived(source, target);
        tracing::info!(source, target, "derived channel deleted");
        Ok(())
    }

    /// Forgets a running derived channel and stops its task.
    pub(super) fn stop_derived(&self, source: &str, target: &str) {
        let key = (source.to_owned(), target.to_owned());
        let removed = (self.inner.derived.lock().expect("derived lock")).remove(&key);
        if let Some(stop) = removed.and_then(|h| h.stop) {
            let _ = stop.send(());
        }
    }

    /// The members of the derived channel from `pattern` into `target`: each source and its
    /// hidden subscription.
    pub(super) fn derived_members(
        &self,
        pattern: &str,
        target: &str,
    ) -> Vec<(String, SubscriptionId)> {
        let derived = self.inner.derived.lock().expect("derived lock");
        (derived.iter())
            .filter(|((_, t), h)| t == target && h.pattern.as_deref() == Some(pattern))
            .map(|((source, _), h)| (source.clone(), h.id))
            .collect()
    }

    /// Every derived channel, by source (channel or pattern) and target; a pattern's figures
    /// are the sums over the channels it matches.
    pub fn list_derived(&self) -> Vec<DerivedInfo> {
        let keys: Vec<(String, String)> = (self.inner.derived.lock().expect("derived lock"))
            .iter()
            .filter(|(_, h)| h.pattern.is_none())
            .map(|(key, _)| key.clone())
            .collect();
        let mut out: Vec<DerivedInfo> = keys
            .iter()
            .filter_map(|key| self.derived_info(key))
            .collect();
        for derived in self.pattern_derived() {
            out.push(self.pattern_derived_info(&derived));
        }
        out.sort_by(|a, b| (&a.spec.source, &a.spec.target).cmp(&(&b.spec.source, &b.spec.target)));
        out
    }

    /// Makes the declared derived channels exist: a new one is created; one that exists with
    /// another filter or reshaping is refused (they cannot change: delete and create it).
    pub async fn declare_derived(&self, specs: &[DerivedSpec]) -> Result<()> {
        for spec in specs {
            let key = (spec.source.clone(), spec.target.clone());
            let existing = match Pattern::is_pattern(&spec.source) {
                true => self.declared_pattern_derived(spec),
                false => (self.inner.derived.lock().expect("derived lock"))
                    .get(&key)
                    .map(|h| h.spec.clone()),
            };
            match existing {
                Some(existing) if existing == *spec => {}
                Some(_) => {
                    return Err(CoreError::InvalidArgument(format!(
                        "the channel derived from {:?} into {:?} exists with another filter or \
                         reshaping; a derived channel cannot change: delete it (Admin.DeleteDerived) \
                         to declare it anew",
                        spec.source, spec.target
                    )));
                }
                None => {
                    self.create_derived(spec.clone()).await?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn derived_info(&self, key: &(String, String)) -> Option<DerivedInfo> {
        let derived = self.inner.derived.lock().expect("derived lock");
        let handle = derived.get(key)?;
        let end = handle.source_log.stats().next_seq;
        let floor = handle.progress.floor.load(Ordering::Relaxed);
        Some(DerivedInfo {
            spec: handle.spec.clone(),
            lag: end.saturating_sub(floor),
            processed: handle.progress.processed.load(Ordering::Relaxed),
            derived: handle.progress.derived.load(Ordering::Relaxed),
        })
    }

    /// Refuses a derived channel that exists already, that a channel its pattern matches
    /// already derives into its target, or that would close a loop of derived channels.
    pub(super) fn check_new_derived(&self, spec: &DerivedSpec) -> Result<()> {
        let source = Pattern::parse(&spec.source).ok();
        let mut edges: Vec<(Option<Pattern>, String, String)> = Vec::new();
        for derived in self.pattern_derived() {
            let (pattern, target) = (&derived.spec.source, &derived.spec.target);
            edges.push((
                Some(derived.pattern.clone()),
                pattern.clone(),
                target.clone(),
            ));
        }
        for ((from, target), handle) in self.inner.derived.lock().expect("derived lock").iter() {
            if handle.pattern.is_none() {
                edges.push((None, from.clone(), target.clone()));
            }
        }
        // The same source, or (for a channel) a pattern that matches it.
        let covered = |(p, s, t): &(Option<Pattern>, String, String)| {
            *t == spec.target
                && (*s == spec.source
                    || source.is_none() && p.as_ref().is_some_and(|p| p.matches(&spec.source)))
        };
        if let Some((_, from, _)) = edges.iter().find(|edge| covered(edge)) {
            return Err(CoreError::InvalidArgument(format!(
                "channel {:?} is already derived from {from:?}",
                spec.target
            )));
        }
        if let Some(pattern) = &source
            && let Some((_, other, _)) = (edges.iter()).find(|(p, _, t)| {
                *t == spec.target && p.as_ref().is_some_and(|p| p.overlaps(pattern))
            })
        {
            return Err(CoreError::InvalidArgument(format!(
                "channel {:?} is already derived from {other:?}, which some channel names match \
                 together with {:?}: such a channel would be derived into it twice",
                spec.target, spec.source
            )));
        }
        if let Some(pattern) = &source
            && let Some((_, channel, _)) = edges
                .iter()
                .find(|(p, s, t)| p.is_none() && *t == spec.target && pattern.matches(s))
        {
            return Err(CoreError::InvalidArgument(format!(
                "channel {channel:?}, which {:?} matches, is already derived into {:?}: \
                 delete that derived channel first, or derive into another target",
                spec.source, spec.target
            )));
        }
        let reads =
            |edge_source: &Option<Pattern>, edge_from: &str, channel: &str| match edge_source {
                Some(pattern) => pattern.matches(channel),
                None => edge_from == channel,
            };
        // Does the new target reach the new source (a channel the new pattern matches)?
        let mut seen = std::collections::HashSet::new();
        let mut todo = vec![spec.target.clone()];
        while let Some(channel) = todo.pop() {
            let closes = match &source {
                Some(pattern) => pattern.matches(&channel),
                None => channel == spec.source,
            };
            if closes {
                return Err(CoreError::InvalidArgument(format!(
                    "deriving {:?} from {:?} would close a cycle of derived channels",
                    spec.target, spec.source
                )));
            }
            if seen.insert(channel.clone()) {
                let next = edges.iter().filter(|(p, s, _)| reads(p, s, &channel));
                todo.extend(next.map(|(_, _, t)| t.clone()));
            }
        }
        Ok(())
    }

    /// Starts a derived channel found in the store.
    pub(super) fn start_derived(
        &self,
        source: &Arc<ChannelShared>,
        sub: RecoveredSubscription,
        channels: &HashMap<ChannelId, Arc<ChannelShared>>,
    ) {
        let Some(target) = sub.settings.dead_letter.and_then(|id| channels.get(&id)) else {
            tracing::error!(subscription = %sub.name, "a derived channel's target is gone: not started");
            return;
        };
        let filter = Some(sub.filter.clone()).filter(|f| !f.is_empty());
        let parsed = filter.as_deref().map(Filter::parse).transpose();
        let reshape = Reshape::decode(&sub.transform);
        let spec = DerivedSpec {
            source: source.name.clone(),
            target: target.name.clone(),
            filter,
            reshape: reshape.clone().unwrap_or_default(),
        };
        match (parsed, reshape) {
            (Ok(parsed), Some(_)) => self.run_derived(source, target.id, spec, parsed, sub),
            // Not run (deriving otherwise than declared would be worse), but listed, so that it
            // can be deleted and declared anew.
            _ => {
                tracing::error!(source = %spec.source, target = %spec.target, "a derived channel's filter or reshaping cannot be read by this broker: not started; delete it and create it again");
                let pattern = pattern_of(&sub.name);
                let progress = Arc::new(Progress::default());
                self.register_derived(source, spec, sub.id, pattern, progress, None);
            }
        }
    }

    pub(super) fn run_derived(
        &self,
        source: &Arc<ChannelShared>,
        target: ChannelId,
        spec: DerivedSpec,
        filter: Option<Filter>,
        sub: RecoveredSubscription,
    ) {
        let progress = Arc::new(Progress::default());
        let (stop, stopped) = watch::channel(());
        let acks = AckSet::from_state(&sub.acks);
        let pattern = pattern_of(&sub.name);
        progress.floor.store(acks.floor(), Ordering::Relaxed);
        let deriver = Deriver {
            id: sub.id,
            name: sub.name,
            source: spec.source.clone(),
            target,
            log: source.log.clone(),
            store: self.inner.store.clone(),
            acks,
            filter,
            reshape: spec.reshape.clone(),
            progress: progress.clone(),
        };
        let task = tokio::spawn(deriver.run(stopped));
        self.register_derived(source, spec, sub.id, pattern, progress, Some(stop));
        let mut dispatchers = self.inner.dispatchers.lock().expect("dispatchers lock");
        dispatchers.push(task);
    }

    fn register_derived(
        &self,
        source: &Arc<ChannelShared>,
        spec: DerivedSpec,
        id: SubscriptionId,
        pattern: Option<String>,
        progress: Arc<Progress>,
        stop: Option<watch::Sender<()>>,
    ) {
        let key = (spec.source.clone(), spec.target.clone());
        let handle = DerivedHandle {
            id,
            pattern,
            spec,
            source_log: source.log.clone(),
            progress,
            stop,
        };
        self.inner
            .derived
            .lock()
            .expect("derived lock")
            .insert(key, handle);
    }

    /// Stops the derived channels reading a deleted channel.
    pub(super) fn stop_derived_from(&self, source: &str) {
        let mut derived = self.inner.derived.lock().expect("derived lock");
        let gone: Vec<(String, String)> = derived
            .keys()
            .filter(|(s, _)| s == source)
            .cloned()
            .collect();
        for key in gone {
            if let Some(stop) = derived.remove(&key).and_then(|h| h.stop) {
                let _ = stop.send(());
            }
        }
    }

    /// Stops every derived channel (at shutdown).
    pub(super) fn stop_all_derived(&self) {
        let derived = std::mem::take(&mut *self.inner.derived.lock().expect("derived lock"));
        for handle in derived.into_values() {
            if let Some(stop) = &handle.stop {
                let _ = stop.send(());
            }
        }
    }
}

/// Parses a derived channel's filter; the error names it.
pub(super) fn parse_filter(spec: &DerivedSpec) -> Result<Option<Filter>> {
    let Some(text) = &spec.filter else {
        return Ok(None);
    };
    let filter = Filter::parse(text);
    Ok(Some(filter.map_err(|e| {
        CoreError::InvalidArgument(format!("filter {text:?}: {e}"))
    })?))
}

/// The pattern of the derived channel a hidden subscription is a member of, if any.
fn pattern_of(subscription: &str) -> Option<String> {
    super::derived_wildcard::member_of(subscription).map(|(_, pattern)| pattern.to_owned())
}
