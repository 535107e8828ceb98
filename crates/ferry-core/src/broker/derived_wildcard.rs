//! Derived channels whose source is a channel pattern (`orders.*`): every channel the pattern
//! matches, including channels created later, feeds the target.
//!
//! Like a wildcard subscription, it is an entry of the store's catalog (filter, reshaping and
//! start) plus, on each matching channel, an ordinary derived channel of that one source:
//! its hidden subscription `~derived.TARGET/PATTERN` carries the progress, and each batch
//! commits together with what it appends, so every source channel is derived exactly once as
//! before. The entry is written before the members and removed before them, and start-up
//! completes what a crash interrupted (see [`Broker::recover_derived_patterns`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::{Buf, BufMut};
use ferry_store::{Position, RecoveredSubscription, StoreError};

use super::{Broker, ChannelShared};
use crate::derive::{DerivedInfo, DerivedSpec, PREFIX, Reshape};
use crate::dispatcher::now_ms;
use crate::error::{CoreError, Result};
use crate::filter::Filter;
use crate::pattern::Pattern;
use crate::{ChannelSettings, names};

/// Catalog keys of derived channels from patterns start with this; `PATTERN TARGET` follows.
const CATALOG_PREFIX: &str = "derived:";
/// The version byte of a catalog entry.
const RECORD_V1: u8 = 1;

/// The hidden subscription of the member of (pattern → target) on one source channel.
pub(super) fn member_name(target: &str, pattern: &str) -> String {
    format!("{PREFIX}{target}/{pattern}")
}

/// The target and pattern of the derived channel a hidden subscription is a member of, if it
/// is one.
pub(super) fn member_of(subscription: &str) -> Option<(&str, &str)> {
    subscription.strip_prefix(PREFIX)?.split_once('/')
}

fn catalog_key(pattern: &str, target: &str) -> String {
    format!("{CATALOG_PREFIX}{pattern} {target}")
}

/// A derived channel from a pattern, as the broker runs it.
pub(super) struct PatternDerived {
    pub(super) pattern: Pattern,
    pub(super) spec: DerivedSpec,
    filter: Option<Filter>,
    /// Where members on channels that existed before it start: messages published from this
    /// time on (ms since the Unix epoch).
    start_ms: u64,
}

impl PatternDerived {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![RECORD_V1];
        out.put_u64_le(self.start_ms);
        let filter = self.spec.filter.as_deref().unwrap_or_default();
        out.put_u32_le(filter.len() as u32);
        out.put_slice(filter.as_bytes());
        out.extend_from_slice(&self.spec.reshape.encode());
        out
    }

    fn decode(pattern: Pattern, target: &str, mut raw: &[u8]) -> Option<PatternDerived> {
        if raw.remaining() < 13 || raw.get_u8() != RECORD_V1 {
            return None;
        }
        let start_ms = raw.get_u64_le();
        let len = raw.get_u32_le() as usize;
        let filter = std::str::from_utf8(raw.get(..len)?).ok()?.to_owned();
        raw.advance(len);
        let reshape = Reshape::decode(raw)?;
        let filter = Some(filter).filter(|f| !f.is_empty());
        let parsed = filter.as_deref().map(Filter::parse).transpose().ok()?;
        Some(PatternDerived {
            spec: DerivedSpec {
                source: pattern.to_string(),
                target: target.to_owned(),
                filter,
                reshape,
            },
            pattern,
            filter: parsed,
            start_ms,
        })
    }
}

impl Broker {
    /// Creates a derived channel from every channel `spec.source` (a pattern) matches: from
    /// now on on those that exist, from their first message on those created later.
    pub(super) async fn create_pattern_derived(&self, spec: DerivedSpec) -> Result<DerivedInfo> {
        let pattern = Pattern::parse(&spec.source)?;
        names::validate("channel", &spec.target)?;
        let filter = super::derived::parse_filter(&spec)?;
        spec.reshape.check()?;
        if pattern.matches(&spec.target) {
            return Err(CoreError::InvalidArgument(format!(
                "derived channel {:?} matches its source pattern {:?}: it would read itself; \
                 give it a target the pattern does not match",
                spec.target, spec.source
            )));
        }
        self.check_new_derived(&spec)?;
        match (self.create_channel(&spec.target, ChannelSettings::default())).await {
            Ok(_) | Err(CoreError::ChannelExists(_)) => {}
            Err(e) => return Err(e),
        }
        let _admin = self.inner.admin.lock().await;
        self.check_new_derived(&spec)?;
        // Deleted between its creation above and now?
        self.channel(&spec.target)?;
        let derived = Arc::new(PatternDerived {
            pattern,
            spec,
            filter,
            start_ms: now_ms(),
        });
        let key = catalog_key(&derived.spec.source, &derived.spec.target);
        (self.inner.store)
            .put_catalog(key, Some(derived.encode()))
            .await?;
        self.register_pattern_derived(derived.clone());
        for channel in self.channels_matching(&derived.pattern) {
            self.add_derived_member(&derived, &channel, Position::Latest)
                .await?;
        }
        let (source, target) = (&derived.spec.source, &derived.spec.target);
        tracing::info!(%source, %target, "derived channel from a pattern created");
        Ok(self.pattern_derived_info(&derived))
    }

    fn register_pattern_derived(&self, derived: Arc<PatternDerived>) {
        let key = (derived.spec.source.clone(), derived.spec.target.clone());
        let mut patterns = self.inner.derived_patterns.lock().expect("patterns lock");
        patterns.insert(key, derived);
    }

    /// The derived channels from patterns, by (pattern, target).
    pub(super) fn pattern_derived(&self) -> Vec<Arc<PatternDerived>> {
        let patterns = self.inner.derived_patterns.lock().expect("patterns lock");
        patterns.values().cloned().collect()
    }

    /// Starts deriving from one more matching channel. Runs under the admin lock.
    async fn add_derived_member(
        &self,
        derived: &PatternDerived,
        channel: &Arc<ChannelShared>,
        start: Position,
    ) -> Result<()> {
        let spec = &derived.spec;
        let target = self.channel(&spec.target)?;
        let settings = ferry_store::SubscriptionSettings {
            dead_letter: Some(target.id),
            ..ferry_store::SubscriptionSettings::default()
        };
        let member = RecoveredSubscription {
            settings,
            filter: spec.filter.clone().unwrap_or_default(),
            transform: spec.reshape.encode(),
            ..self.member_of_channel(channel, member_name(&spec.target, &spec.source))
        };
        let sub = self.create_member(member, start).await?;
        let member = DerivedSpec {
            source: channel.name.clone(),
            ..spec.clone()
        };
        self.run_derived(channel, target.id, member, derived.filter.clone(), sub);
        Ok(())
    }

    /// Gives a channel being created the members of the derived channels whose pattern
    /// matches it, reading from its first message. Runs under the admin lock, before the
    /// channel is published to.
    pub(super) async fn add_derived_members(&self, channel: &Arc<ChannelShared>) -> Result<()> {
        for derived in self.pattern_derived() {
            if derived.pattern.matches(&channel.name) {
                self.add_derived_member(&derived, channel, Position::Earliest)
                    .await?;
            }
        }
        Ok(())
    }

    /// Deletes a derived channel from a pattern, and its members.
    pub(super) async fn delete_pattern_derived(&self, pattern: &str, target: &str) -> Result<()> {
        let _admin = self.inner.admin.lock().await;
        let key = (pattern.to_owned(), target.to_owned());
        if !(self.inner.derived_patterns.lock().expect("patterns lock")).contains_key(&key) {
            return Err(CoreError::FailedPrecondition(format!(
                "no channel is derived from {} into {}",
                names::quote(pattern),
                names::quote(target)
            )));
        }
        let catalog = catalog_key(pattern, target);
        self.inner.store.put_catalog(catalog, None).await?;
        (self.inner.derived_patterns.lock().expect("patterns lock")).remove(&key);
        for (source, id) in self.derived_members(pattern, target) {
            self.inner.store.delete_subscription(id).await?;
            self.stop_derived(&source, target);
        }
        tracing::info!(
            source = pattern,
            target,
            "derived channel from a pattern deleted"
        );
        Ok(())
    }

    /// The derived channel from a pattern that appends to `target`, if any.
    pub(super) fn pattern_derived_into(&self, target: &str) -> Option<String> {
        (self.pattern_derived().into_iter())
            .find(|d| d.spec.target == target)
            .map(|d| d.spec.source.clone())
    }

    /// Its figures: the sums over its members.
    pub(super) fn pattern_derived_info(&self, derived: &PatternDerived) -> DerivedInfo {
        let (pattern, target) = (&derived.spec.source, &derived.spec.target);
        let mut total = DerivedInfo {
            spec: derived.spec.clone(),
            lag: 0,
            processed: 0,
            derived: 0,
        };
        for (source, _) in self.derived_members(pattern, target) {
            if let Some(info) = self.derived_info(&(source, target.clone())) {
                total.lag += info.lag;
                total.processed += info.processed;
                total.derived += info.derived;
            }
        }
        total
    }

    /// Declared: exists already with this very filter and reshaping, or is created.
    pub(super) fn declared_pattern_derived(&self, spec: &DerivedSpec) -> Option<DerivedSpec> {
        let key = (spec.source.clone(), spec.target.clone());
        let patterns = self.inner.derived_patterns.lock().expect("patterns lock");
        patterns.get(&key).map(|d| d.spec.clone())
    }

    /// Brings back the derived channels from patterns at start-up, runs their members, and
    /// completes what a crash left half done: a member of a deleted one is deleted, a matching
    /// channel without a member gets one (from the derived channel's start).
    pub(super) async fn recover_derived_patterns(
        &self,
        catalog: &BTreeMap<String, Vec<u8>>,
        members: Vec<(Arc<ChannelShared>, RecoveredSubscription)>,
        channels: &HashMap<ferry_store::ChannelId, Arc<ChannelShared>>,
    ) -> Result<()> {
        for (key, value) in catalog {
            let Some(subject) = key.strip_prefix(CATALOG_PREFIX) else {
                continue;
            };
            let parsed = subject.split_once(' ').and_then(|(pattern, target)| {
                PatternDerived::decode(Pattern::parse(pattern).ok()?, target, value)
            });
            let Some(derived) = parsed else {
                return Err(StoreError::Corrupt(format!("bad catalog entry {key:?}")).into());
            };
            self.register_pattern_derived(Arc::new(derived));
        }
        for (channel, sub) in members {
            let known = member_of(&sub.name).is_some_and(|(target, pattern)| {
                let key = (pattern.to_owned(), target.to_owned());
                (self.inner.derived_patterns.lock().expect("patterns lock")).contains_key(&key)
            });
            match known {
                true => self.start_derived(&channel, sub, channels),
                false => {
                    tracing::info!(channel = %channel.name, subscription = %sub.name, "deleting the member of a deleted derived channel");
                    if let Err(e) = self.inner.store.delete_subscription(sub.id).await {
                        tracing::error!(channel = %channel.name, subscription = %sub.name, error = %e, "cannot delete it now: at the next start");
                    }
                }
            }
        }
        for derived in self.pattern_derived() {
            let (pattern, target) = (&derived.spec.source, &derived.spec.target);
            let present: Vec<String> = (self.derived_members(pattern, target).into_iter())
                .map(|(source, _)| source)
                .collect();
            for channel in self.channels_matching(&derived.pattern) {
                if !present.contains(&channel.name) {
                    tracing::info!(source = %channel.name, %target, "creating a missing member of a derived channel");
                    let start = Position::Time(derived.start_ms);
                    // Its target gone (only a damaged store could say so) stops this derived
                    // channel, not the broker.
                    if let Err(e) = self.add_derived_member(&derived, &channel, start).await {
                        tracing::error!(source = %channel.name, %target, error = %e, "cannot derive from this channel");
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_members_name_their_derived_channel() {
        let derived = PatternDerived {
            pattern: Pattern::parse("orders.*").unwrap(),
            spec: DerivedSpec {
                source: "orders.*".into(),
                target: "audit".into(),
                filter: Some("attributes:region".into()),
                reshape: Reshape {
                    keep: vec!["region".into()],
                    key_from: Some("region".into()),
                    ..Reshape::default()
                },
            },
            filter: None,
            start_ms: 1_795_833_296_789,
        };
        let encoded = derived.encode();
        let decoded = PatternDerived::decode(derived.pattern.clone(), "audit", &encoded).unwrap();
        assert_eq!(
            (decoded.spec, decoded.start_ms),
            (derived.spec, derived.start_ms)
        );
        assert!(decoded.filter.is_some());
        for cut in 0..encoded.len() {
            let pattern = derived.pattern.clone();
            assert!(PatternDerived::decode(pattern, "audit", &encoded[..cut]).is_none());
        }
        assert_eq!(member_name("audit", "orders.*"), "~derived.audit/orders.*");
        assert_eq!(
            member_of("~derived.audit/orders.*"),
            Some(("audit", "orders.*"))
        );
        assert_eq!(member_of("~derived.audit"), None);
    }
}
