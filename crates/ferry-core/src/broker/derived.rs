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
use crate::{ChannelSettings, names};

/// A running derived channel.
pub(super) struct DerivedHandle {
    /// Its hidden subscription.
    id: SubscriptionId,
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
    pub async fn create_derived(&self, spec: DerivedSpec) -> Result<DerivedInfo> {
        self.check_open()?;
        names::validate("channel", &spec.target)?;
        let filter = match &spec.filter {
            Some(text) => Some(
                Filter::parse(text)
                    .map_err(|e| CoreError::InvalidArgument(format!("filter {text:?}: {e}")))?,
            ),
            None => None,
        };
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
        let _admin = self.inner.admin.lock().await;
        let key = (source.to_owned(), target.to_owned());
        let id = self
            .inner
            .derived
            .lock()
            .expect("derived lock")
            .get(&key)
            .map(|h| h.id);
        let Some(id) = id else {
            self.channel(source)?;
            return Err(CoreError::FailedPrecondition(format!(
                "no channel is derived from {source:?} into {target:?}"
            )));
        };
        self.inner.store.delete_subscription(id).await?;
        let removed = self
            .inner
            .derived
            .lock()
            .expect("derived lock")
            .remove(&key);
        if let Some(stop) = removed.and_then(|h| h.stop) {
            let _ = stop.send(());
        }
        tracing::info!(source, target, "derived channel deleted");
        Ok(())
    }

    /// Every derived channel, by source and target.
    pub fn list_derived(&self) -> Vec<DerivedInfo> {
        let keys: Vec<(String, String)> = (self.inner.derived.lock().expect("derived lock"))
            .keys()
            .cloned()
            .collect();
        keys.iter()
            .filter_map(|key| self.derived_info(key))
            .collect()
    }

    /// Makes the declared derived channels exist: a new one is created; one that exists with
    /// another filter or reshaping is refused (they cannot change: delete and create it).
    pub async fn declare_derived(&self, specs: &[DerivedSpec]) -> Result<()> {
        for spec in specs {
            let key = (spec.source.clone(), spec.target.clone());
            let existing = (self.inner.derived.lock().expect("derived lock"))
                .get(&key)
                .map(|h| h.spec.clone());
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

    fn derived_info(&self, key: &(String, String)) -> Option<DerivedInfo> {
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

    /// Refuses a derived channel that exists already or would close a loop of derived
    /// channels.
    fn check_new_derived(&self, spec: &DerivedSpec) -> Result<()> {
        let derived = self.inner.derived.lock().expect("derived lock");
        if derived.contains_key(&(spec.source.clone(), spec.target.clone())) {
            return Err(CoreError::InvalidArgument(format!(
                "channel {:?} is already derived from {:?}",
                spec.target, spec.source
            )));
        }
        let mut next: HashMap<&str, Vec<&str>> = HashMap::new();
        for (source, target) in derived.keys() {
            next.entry(source.as_str())
                .or_default()
                .push(target.as_str());
        }
        // Does the new target reach the new source?
        let mut seen = std::collections::HashSet::new();
        let mut todo = vec![spec.target.as_str()];
        while let Some(channel) = todo.pop() {
            if channel == spec.source {
                return Err(CoreError::InvalidArgument(format!(
                    "deriving {:?} from {:?} would close a cycle of derived channels",
                    spec.target, spec.source
                )));
            }
            if seen.insert(channel) {
                todo.extend(next.get(channel).into_iter().flatten());
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
                self.register_derived(source, spec, sub.id, Arc::new(Progress::default()), None);
            }
        }
    }

    fn run_derived(
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
        self.register_derived(source, spec, sub.id, progress, Some(stop));
        let mut dispatchers = self.inner.dispatchers.lock().expect("dispatchers lock");
        dispatchers.push(task);
    }

    fn register_derived(
        &self,
        source: &Arc<ChannelShared>,
        spec: DerivedSpec,
        id: SubscriptionId,
        progress: Arc<Progress>,
        stop: Option<watch::Sender<()>>,
    ) {
        let key = (spec.source.clone(), spec.target.clone());
        let handle = DerivedHandle {
            id,
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
