//! Derived channels: a task per derived channel reads its source channel like a subscription
//! does, keeps the messages that pass its filter, reshapes them and appends them to its target
//! channel, exactly once.
//!
//! A derived channel is stored as a hidden subscription of its source (named
//! `~derived.TARGET`, which no client name can be) whose dead-letter channel is the target:
//! each batch is saved as that subscription's ack state together with the reshaped messages,
//! through the same store path as dead letters, so the append to the target and the progress
//! on the source commit together, and a message whose original an earlier state acked is
//! never appended twice. A `kill -9` at any point neither loses nor duplicates a derived
//! message; the source keeps what the derived channel has not processed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut};
use ferry_store::{
    AckUpdate, Attributes, ChannelId, ChannelLog, Message, NewMessage, Store, StoreError,
    SubscriptionId,
};
use tokio::sync::watch;

use crate::acks::AckSet;
use crate::dead_letter::{self, Addressee};
use crate::filter::Filter;

/// The prefix of a derived channel's hidden subscription.
pub(crate) const PREFIX: &str = "~derived.";
/// The source channel a derived message came from.
pub const ORIGIN_CHANNEL: &str = "ferry.derived.channel";
/// Its sequence there.
pub const ORIGIN_SEQUENCE: &str = "ferry.derived.sequence";
/// At most this many source messages, or bytes, go into one commit.
const BATCH_MESSAGES: usize = 1024;
const BATCH_BYTES: usize = 4 << 20;

/// How a derived channel reshapes what it keeps, in this order: keep, drop, rename, set,
/// key from an attribute. The payload is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reshape {
    /// Keep only these attributes (empty: all).
    pub keep: Vec<String>,
    /// Then drop these.
    pub drop: Vec<String>,
    /// Then rename these (from, to).
    pub rename: BTreeMap<String, String>,
    /// Then set these to constants.
    pub set: BTreeMap<String, String>,
    /// Then take the key from this attribute, if the message has it.
    pub key_from: Option<String>,
}

/// A derived channel as declared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DerivedSpec {
    /// The channel it reads.
    pub source: String,
    /// The channel it appends to (created if missing).
    pub target: String,
    /// Only messages that pass it are derived.
    pub filter: Option<String>,
    /// How they are reshaped.
    pub reshape: Reshape,
}

/// A derived channel and its figures.
#[derive(Debug, Clone)]
pub struct DerivedInfo {
    /// What it is.
    pub spec: DerivedSpec,
    /// Source messages it has not processed yet.
    pub lag: u64,
    /// Source messages it processed since the broker started.
    pub processed: u64,
    /// Messages it appended to its target since the broker started.
    pub derived: u64,
}

/// What a running derived channel shares with the broker.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub processed: AtomicU64,
    pub derived: AtomicU64,
    /// Every source sequence below this is processed.
    pub floor: AtomicU64,
}

impl Reshape {
    /// Refuses a reshaping that would write attributes only the broker may set: a derived
    /// copy could otherwise forge a dead letter's origin.
    pub fn check(&self) -> Result<(), crate::CoreError> {
        let written = (self.rename.values()).chain(self.set.keys());
        match written
            .into_iter()
            .find(|name| dead_letter::is_reserved(name))
        {
            Some(name) => Err(crate::CoreError::InvalidArgument(format!(
                "the derived channel would set the attribute {name:?}, which only the broker \
                 may set (ferry.dead_letter.* and ferry.redrive.for)"
            ))),
            None => Ok(()),
        }
    }

    /// The message to append for `message` of `source`.
    pub(crate) fn apply(&self, message: &Message, source: &str) -> NewMessage {
        let mut attributes: Vec<(String, String)> = message
            .attributes
            .iter()
            .filter(|(name, _)| self.keep.is_empty() || self.keep.iter().any(|k| k == name))
            .filter(|(name, _)| !self.drop.iter().any(|d| d == name))
            .filter(|(name, _)| *name != ORIGIN_CHANNEL && *name != ORIGIN_SEQUENCE)
            .map(|(name, value)| {
                let name = self.rename.get(name).map_or(name, String::as_str);
                (name.to_owned(), value.to_owned())
            })
            .collect();
        for (name, value) in &self.set {
            attributes.retain(|(n, _)| n != name);
            attributes.push((name.clone(), value.clone()));
        }
        // A derived channel stored before reserved names were checked at creation may still
        // rename or set one: what it writes there is dropped, never a forged origin.
        let written = |name: &str| {
            self.rename
                .values()
                .chain(self.set.keys())
                .any(|w| w == name)
        };
        attributes.retain(|(n, _)| !(dead_letter::is_reserved(n) && written(n)));
        let key = (self.key_from.as_ref())
            .and_then(|from| attributes.iter().find(|(n, _)| n == from))
            .map_or_else(|| message.key.clone(), |(_, v)| v.clone());
        attributes.push((ORIGIN_CHANNEL.to_owned(), source.to_owned()));
        attributes.push((ORIGIN_SEQUENCE.to_owned(), message.sequence.to_string()));
        NewMessage {
            payload: message.payload.clone(),
            attributes: Attributes::from_pairs(attributes),
            key,
            id: message.id.clone(),
        }
    }

    /// The bytes kept with the hidden subscription.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![1u8];
        let put = |out: &mut Vec<u8>, s: &str| {
            out.put_u32_le(s.len() as u32);
            out.put_slice(s.as_bytes());
        };
        for list in [&self.keep, &self.drop] {
            out.put_u32_le(list.len() as u32);
            list.iter().for_each(|s| put(&mut out, s));
        }
        for map in [&self.rename, &self.set] {
            out.put_u32_le(map.len() as u32);
            for (k, v) in map {
                put(&mut out, k);
                put(&mut out, v);
            }
        }
        put(&mut out, self.key_from.as_deref().unwrap_or_default());
        out
    }

    /// Reads what [`Reshape::encode`] wrote.
    pub(crate) fn decode(mut raw: &[u8]) -> Option<Reshape> {
        fn get(raw: &mut &[u8]) -> Option<String> {
            if raw.remaining() < 4 {
                return None;
            }
            let len = raw.get_u32_le() as usize;
            let text = std::str::from_utf8(raw.get(..len)?).ok()?.to_owned();
            raw.advance(len);
            Some(text)
        }
        fn count(raw: &mut &[u8]) -> Option<usize> {
            (raw.remaining() >= 4).then(|| raw.get_u32_le() as usize)
        }
        if raw.first() != Some(&1) {
            return None;
        }
        raw.advance(1);
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            for _ in 0..count(&mut raw)? {
                list.push(get(&mut raw)?);
            }
        }
        let mut maps = [BTreeMap::new(), BTreeMap::new()];
        for map in &mut maps {
            for _ in 0..count(&mut raw)? {
                map.insert(get(&mut raw)?, get(&mut raw)?);
            }
        }
        let key_from = Some(get(&mut raw)?).filter(|k| !k.is_empty());
        let [keep, drop] = lists;
        let [rename, set] = maps;
        Some(Reshape {
            keep,
            drop,
            rename,
            set,
            key_from,
        })
    }
}

/// One derived channel's task.
pub(crate) struct Deriver {
    pub id: SubscriptionId,
    /// Its hidden subscription's name.
    pub name: String,
    pub source: String,
    pub target: ChannelId,
    pub log: Arc<ChannelLog>,
    pub store: Store,
    pub acks: AckSet,
    pub filter: Option<Filter>,
    pub reshape: Reshape,
    pub progress: Arc<Progress>,
}

impl Deriver {
    /// Runs until `stop` changes or is dropped.
    pub(crate) async fn run(mut self, mut stop: watch::Receiver<()>) {
        let mut end = self.log.watch_end();
        let mut withdrawn = self.log.watch_withdrawn();
        loop {
            // Checked before each batch: a shutdown must not wait for a backlog to be derived.
            if stop.has_changed().unwrap_or(true) {
                return;
            }
            self.fold_withdrawn(&mut withdrawn);
            self.progress
                .floor
                .store(self.acks.floor(), Ordering::Relaxed);
            let from = self.acks.next_unacked(self.acks.floor());
            let messages = match self.log.read(from, BATCH_MESSAGES, BATCH_BYTES) {
                Ok(messages) => messages,
                Err(StoreError::Damaged {
                    first_seq, end_seq, ..
                }) => {
                    // Lost to damage: nothing to derive from them.
                    self.acks.insert_range(first_seq..end_seq);
                    continue;
                }
                Err(e) => {
                    tracing::error!(source = %self.source, error = %e, "a derived channel cannot read its source; trying again");
                    if pause(&mut stop, Duration::from_secs(1)).await {
                        return;
                    }
                    continue;
                }
            };
            if messages.is_empty() {
                tokio::select! {
                    changed = end.changed() => if changed.is_err() { return },
                    _ = withdrawn.changed() => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
            let before = self.acks.clone();
            let mut letters = Vec::new();
            for message in &messages {
                if !self.acks.insert(message.sequence) {
                    continue;
                }
                // A redriven message is for one subscription only.
                if !matches!(
                    dead_letter::addressee(message, &self.name),
                    Addressee::Everyone
                ) {
                    continue;
                }
                if self.filter.as_ref().is_none_or(|f| f.matches(message)) {
                    let derived = self.reshape.apply(message, &self.source);
                    letters.push((message.sequence, self.target, derived));
                }
            }
            let appended = letters.len() as u64;
            let update = AckUpdate {
                state: self.acks.to_state(),
                failures: Vec::new(),
                dead_letters: letters,
            };
            let saved = match self.store.submit_acks(self.id, update).await {
                Ok(confirmation) => confirmation.confirmed().await,
                Err(e) => Err(e),
            };
            match saved {
                Ok(()) => {
                    let processed = self.acks.total() - before.total();
                    self.progress
                        .processed
                        .fetch_add(processed, Ordering::Relaxed);
                    self.progress.derived.fetch_add(appended, Ordering::Relaxed);
                }
                Err(StoreError::SubscriptionNotFound | StoreError::Closed) => return,
                Err(e) => {
                    // Nothing of it committed: the same batch is tried again.
                    self.acks = before;
                    tracing::warn!(source = %self.source, error = %e, "a derived channel's commit failed; trying again");
                    if pause(&mut stop, Duration::from_secs(1)).await {
                        return;
                    }
                }
            }
        }
    }

    /// Counts what was withdrawn from the source (redriven elsewhere, dropped) as processed.
    fn fold_withdrawn(&mut self, withdrawn: &mut watch::Receiver<Arc<[(u64, u64)]>>) {
        let ranges = withdrawn.borrow_and_update().clone();
        let floor = self.acks.floor();
        for &(start, end) in ranges.iter().filter(|(_, end)| *end > floor) {
            self.acks.insert_range(start.max(floor)..end);
        }
    }
}

/// Waits `wait` unless stopped first; true if stopped.
async fn pause(stop: &mut watch::Receiver<()>, wait: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = stop.changed() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshaping_keeps_drops_renames_sets_and_keys_in_that_order() {
        let reshape = Reshape {
            keep: vec![
                "region".into(),
                "kind".into(),
                "customer".into(),
                "secret".into(),
            ],
            drop: vec!["secret".into()],
            rename: [("kind".to_owned(), "type".to_owned())].into(),
            set: [("origin".to_owned(), "ferry".to_owned())].into(),
            key_from: Some("customer".into()),
        };
        let message = Message {
            sequence: 7,
            publish_time_ms: 0,
            key: "old".into(),
            id: "id-1".into(),
            attributes: Attributes::from_pairs([
                ("region", "eu"),
                ("kind", "order"),
                ("customer", "c-9"),
                ("secret", "x"),
                ("noise", "y"),
            ]),
            payload: bytes::Bytes::from_static(b"body"),
        };
        let derived = reshape.apply(&message, "orders");
        let attributes: Vec<(&str, &str)> = derived.attributes.iter().collect();
        assert_eq!(
            attributes,
            [
                ("region", "eu"),
                ("type", "order"),
                ("customer", "c-9"),
                ("origin", "ferry"),
                (ORIGIN_CHANNEL, "orders"),
                (ORIGIN_SEQUENCE, "7"),
            ]
        );
        assert_eq!(
            (derived.key.as_str(), &derived.payload[..]),
            ("c-9", &b"body"[..])
        );
        assert_eq!(Reshape::decode(&reshape.encode()), Some(reshape));
        assert_eq!(Reshape::decode(&[]), None);
    }
}
