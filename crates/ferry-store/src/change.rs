//! What a commit changes besides its messages, as written in its commit frame.
//!
//! The segment log is the store's write-ahead log: a commit is durable once its frames are
//! synced, and sled is brought up to date afterwards. So every change a commit makes to the
//! metadata and ack state is written to the log too, fully resolved (ids allocated, ack
//! floors computed): replaying a change after a crash needs nothing but the state sled held
//! at the log position it recorded, and gives exactly what the commit gave.

use bytes::{Buf, BufMut};

use crate::codec::{self, SubscriptionRecord};
use crate::{
    AckState, ChannelId, ChannelSettings, Failure, Retention, StoreError, SubscriptionId,
    SubscriptionSettings,
};

/// One change a commit makes to channels, subscriptions or ack state.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    /// A channel was created with this id.
    CreateChannel { id: ChannelId, name: String },
    /// A channel was deleted, with its messages and subscriptions.
    DeleteChannel { id: ChannelId },
    /// A subscription was created with this id and starting ack state.
    CreateSubscription {
        id: SubscriptionId,
        record: SubscriptionRecord,
        acks: AckState,
    },
    /// A subscription's settings changed.
    UpdateSubscription {
        id: SubscriptionId,
        settings: SubscriptionSettings,
    },
    /// A subscription was deleted.
    DeleteSubscription { id: SubscriptionId },
    /// A subscription's ack state is now this, and these failure records are written
    /// (`Some`) or dropped (`None`).
    SaveAcks {
        id: SubscriptionId,
        acks: AckState,
        failures: Vec<(u64, Option<Failure>)>,
    },
    /// Published ids the channel de-duplicates against, with their sequences.
    Ids {
        channel: ChannelId,
        publish_ms: u64,
        entries: Vec<(u64, String)>,
    },
    /// A subscription's failure records are all dropped (it was moved by a seek).
    ClearFailures { id: SubscriptionId },
    /// A channel's retention changed (or was set as it was created).
    UpdateChannel {
        id: ChannelId,
        settings: ChannelSettings,
    },
    /// Messages left a channel for good (they were redriven): every subscription counts them
    /// as acked.
    Withdraw {
        channel: ChannelId,
        ranges: Vec<(u64, u64)>,
    },
    /// Messages of a channel nobody subscribes to got their sequences without being stored:
    /// the channel's log is empty and continues at `next_seq`.
    Skipped { channel: ChannelId, next_seq: u64 },
    /// A message is kept aside until `due_ms` (its body is one message as a record holds it).
    Delay {
        channel: ChannelId,
        due_ms: u64,
        number: u64,
        body: Vec<u8>,
    },
    /// The oldest messages of a full channel were dropped: withdrawn like redriven ones,
    /// and counted.
    Drop {
        channel: ChannelId,
        range: (u64, u64),
        count: u64,
    },
    /// Delayed messages (due, number, body length) entered the channel in this commit.
    Undelay {
        channel: ChannelId,
        entries: Vec<(u64, u64, u32)>,
    },
    /// An entry of the broker's catalog was written (`Some`) or removed (`None`).
    Catalog { key: String, value: Option<Vec<u8>> },
}

const CREATE_CHANNEL: u8 = 1;
const DELETE_CHANNEL: u8 = 2;
const CREATE_SUBSCRIPTION: u8 = 3;
const UPDATE_SUBSCRIPTION: u8 = 4;
const DELETE_SUBSCRIPTION: u8 = 5;
const SAVE_ACKS: u8 = 6;
const SKIPPED: u8 = 7;
/// Since the retry policy: the whole settings.
const UPDATE_SUBSCRIPTION_2: u8 = 8;
/// Since failure records: the ack state and failure records.
const SAVE_ACKS_2: u8 = 9;
const WITHDRAW: u8 = 10;
const UPDATE_CHANNEL: u8 = 11;
const CLEAR_FAILURES: u8 = 12;
const IDS: u8 = 13;
/// Since channel limits: the whole settings.
const UPDATE_CHANNEL_2: u8 = 14;
const DELAY: u8 = 15;
const UNDELAY: u8 = 16;
const DROP: u8 = 17;
const CATALOG: u8 = 18;

/// Encodes a commit's changes as the body of its commit frame.
pub(crate) fn encode(changes: &[Change], out: &mut Vec<u8>) {
    out.put_u32_le(changes.len() as u32);
    for change in changes {
        match change {
            Change::CreateChannel { id, name } => {
                out.put_u8(CREATE_CHANNEL);
                out.put_u32_le(id.0);
                put_bytes(out, name.as_bytes());
            }
            Change::DeleteChannel { id } => {
                out.put_u8(DELETE_CHANNEL);
                out.put_u32_le(id.0);
            }
            Change::CreateSubscription { id, record, acks } => {
                out.put_u8(CREATE_SUBSCRIPTION);
                out.put_u32_le(id.0);
                put_bytes(out, &record.encode());
                put_bytes(out, &codec::encode_ack_state(acks));
            }
            Change::UpdateSubscription { id, settings } => {
                out.put_u8(UPDATE_SUBSCRIPTION_2);
                out.put_u32_le(id.0);
                let mut encoded = Vec::new();
                codec::encode_settings(settings, &mut encoded);
                put_bytes(out, &encoded);
            }
            Change::DeleteSubscription { id } => {
                out.put_u8(DELETE_SUBSCRIPTION);
                out.put_u32_le(id.0);
            }
            Change::SaveAcks { id, acks, failures } => {
                out.put_u8(SAVE_ACKS_2);
                out.put_u32_le(id.0);
                put_bytes(out, &codec::encode_ack_state(acks));
                out.put_u32_le(failures.len() as u32);
                let mut encoded = Vec::new();
                for (seq, failure) in failures {
                    out.put_u64_le(*seq);
                    encoded.clear();
                    if let Some(failure) = failure {
                        codec::encode_failure(failure, &mut encoded);
                    }
                    put_bytes(out, &encoded);
                }
            }
            Change::ClearFailures { id } => {
                out.put_u8(CLEAR_FAILURES);
                out.put_u32_le(id.0);
            }
            Change::Ids {
                channel,
                publish_ms,
                entries,
            } => {
                out.put_u8(IDS);
                out.put_u32_le(channel.0);
                out.put_u64_le(*publish_ms);
                out.put_u32_le(entries.len() as u32);
                for (seq, id) in entries {
                    out.put_u64_le(*seq);
                    put_bytes(out, id.as_bytes());
                }
            }
            Change::UpdateChannel { id, settings } => {
                out.put_u8(UPDATE_CHANNEL_2);
                out.put_u32_le(id.0);
                codec::encode_channel_settings(settings, out);
            }
            Change::Delay {
                channel,
                due_ms,
                number,
                body,
            } => {
                out.put_u8(DELAY);
                out.put_u32_le(channel.0);
                out.put_u64_le(*due_ms);
                out.put_u64_le(*number);
                put_bytes(out, body);
            }
            Change::Drop {
                channel,
                range,
                count,
            } => {
                out.put_u8(DROP);
                out.put_u32_le(channel.0);
                out.put_u64_le(range.0);
                out.put_u64_le(range.1);
                out.put_u64_le(*count);
            }
            Change::Undelay { channel, entries } => {
                out.put_u8(UNDELAY);
                out.put_u32_le(channel.0);
                out.put_u32_le(entries.len() as u32);
                for (due, number, len) in entries {
                    out.put_u64_le(*due);
                    out.put_u64_le(*number);
                    out.put_u32_le(*len);
                }
            }
            Change::Withdraw { channel, ranges } => {
                out.put_u8(WITHDRAW);
                out.put_u32_le(channel.0);
                out.put_slice(&codec::encode_ranges(ranges));
            }
            Change::Skipped { channel, next_seq } => {
                out.put_u8(SKIPPED);
                out.put_u32_le(channel.0);
                out.put_u64_le(*next_seq);
            }
            Change::Catalog { key, value } => {
                out.put_u8(CATALOG);
                // Every change has its u32 after the tag: here whether a value follows.
                out.put_u32_le(u32::from(value.is_some()));
                put_bytes(out, key.as_bytes());
                if let Some(value) = value {
                    put_bytes(out, value);
                }
            }
        }
    }
}

/// Decodes the body of a commit frame (whose checksum has been checked).
pub(crate) fn decode(mut raw: &[u8]) -> Result<Vec<Change>, StoreError> {
    let bad = |what: &str| StoreError::Corrupt(format!("bad commit frame: {what}"));
    let n = get_u32(&mut raw).ok_or_else(|| bad("no change count"))? as usize;
    // Every change takes at least five bytes: a damaged count cannot size the allocation.
    let mut changes = Vec::with_capacity(n.min(raw.len() / 5));
    for _ in 0..n {
        if raw.remaining() < 5 {
            return Err(bad("truncated change"));
        }
        let tag = raw.get_u8();
        let id = raw.get_u32_le();
        let change = match tag {
            CREATE_CHANNEL => Change::CreateChannel {
                id: ChannelId(id),
                name: get_bytes(&mut raw)
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .ok_or_else(|| bad("channel name"))?
                    .to_owned(),
            },
            DELETE_CHANNEL => Change::DeleteChannel { id: ChannelId(id) },
            CREATE_SUBSCRIPTION => {
                let record = get_bytes(&mut raw).ok_or_else(|| bad("subscription"))?;
                let acks = get_bytes(&mut raw).ok_or_else(|| bad("ack state"))?;
                Change::CreateSubscription {
                    id: SubscriptionId(id),
                    record: SubscriptionRecord::decode(record)?,
                    acks: codec::decode_ack_state(acks)?,
                }
            }
            UPDATE_SUBSCRIPTION => Change::UpdateSubscription {
                id: SubscriptionId(id),
                settings: SubscriptionSettings {
                    ack_deadline_ms: get_u64(&mut raw).ok_or_else(|| bad("settings"))?,
                    ..SubscriptionSettings::default()
                },
            },
            UPDATE_SUBSCRIPTION_2 => {
                let mut encoded = get_bytes(&mut raw).ok_or_else(|| bad("settings"))?;
                let settings = codec::decode_settings(&mut encoded)
                    .filter(|_| encoded.is_empty())
                    .ok_or_else(|| bad("settings"))?;
                Change::UpdateSubscription {
                    id: SubscriptionId(id),
                    settings,
                }
            }
            DELETE_SUBSCRIPTION => Change::DeleteSubscription {
                id: SubscriptionId(id),
            },
            SAVE_ACKS => Change::SaveAcks {
                id: SubscriptionId(id),
                acks: codec::decode_ack_state(
                    get_bytes(&mut raw).ok_or_else(|| bad("ack state"))?,
                )?,
                failures: Vec::new(),
            },
            SAVE_ACKS_2 => Change::SaveAcks {
                id: SubscriptionId(id),
                acks: codec::decode_ack_state(
                    get_bytes(&mut raw).ok_or_else(|| bad("ack state"))?,
                )?,
                failures: get_failures(&mut raw).ok_or_else(|| bad("failure records"))?,
            },
            CLEAR_FAILURES => Change::ClearFailures {
                id: SubscriptionId(id),
            },
            IDS => {
                let publish_ms = get_u64(&mut raw).ok_or_else(|| bad("publish time"))?;
                let n = get_u32(&mut raw).ok_or_else(|| bad("id count"))? as usize;
                // Every entry takes at least twelve bytes.
                let mut entries = Vec::with_capacity(n.min(raw.len() / 12));
                for _ in 0..n {
                    let seq = get_u64(&mut raw).ok_or_else(|| bad("id sequence"))?;
                    let text = get_bytes(&mut raw)
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .ok_or_else(|| bad("id"))?;
                    entries.push((seq, text.to_owned()));
                }
                Change::Ids {
                    channel: ChannelId(id),
                    publish_ms,
                    entries,
                }
            }
            UPDATE_CHANNEL => Change::UpdateChannel {
                id: ChannelId(id),
                settings: ChannelSettings {
                    retention: Retention {
                        max_age_ms: get_u64(&mut raw).ok_or_else(|| bad("retention"))?,
                        max_bytes: get_u64(&mut raw).ok_or_else(|| bad("retention"))?,
                    },
                    dedup_window_ms: get_u64(&mut raw).ok_or_else(|| bad("window"))?,
                    default_ttl_ms: get_u64(&mut raw).ok_or_else(|| bad("ttl"))?,
                    ..ChannelSettings::default()
                },
            },
            UPDATE_CHANNEL_2 => Change::UpdateChannel {
                id: ChannelId(id),
                settings: codec::decode_channel_settings(&mut raw)
                    .ok_or_else(|| bad("channel settings"))?,
            },
            DELAY => Change::Delay {
                channel: ChannelId(id),
                due_ms: get_u64(&mut raw).ok_or_else(|| bad("due time"))?,
                number: get_u64(&mut raw).ok_or_else(|| bad("delayed number"))?,
                body: get_bytes(&mut raw)
                    .ok_or_else(|| bad("delayed message"))?
                    .to_vec(),
            },
            DROP => Change::Drop {
                channel: ChannelId(id),
                range: (
                    get_u64(&mut raw).ok_or_else(|| bad("dropped range"))?,
                    get_u64(&mut raw).ok_or_else(|| bad("dropped range"))?,
                ),
                count: get_u64(&mut raw).ok_or_else(|| bad("dropped count"))?,
            },
            UNDELAY => {
                let n = get_u32(&mut raw).ok_or_else(|| bad("delayed count"))? as usize;
                // Every entry takes twenty bytes.
                let mut entries = Vec::with_capacity(n.min(raw.len() / 20));
                for _ in 0..n {
                    let due = get_u64(&mut raw).ok_or_else(|| bad("due time"))?;
                    let number = get_u64(&mut raw).ok_or_else(|| bad("delayed number"))?;
                    let len = get_u32(&mut raw).ok_or_else(|| bad("delayed length"))?;
                    entries.push((due, number, len));
                }
                Change::Undelay {
                    channel: ChannelId(id),
                    entries,
                }
            }
            WITHDRAW => Change::Withdraw {
                channel: ChannelId(id),
                ranges: codec::decode_ranges(&mut raw)?,
            },
            SKIPPED => Change::Skipped {
                channel: ChannelId(id),
                next_seq: get_u64(&mut raw).ok_or_else(|| bad("sequence"))?,
            },
            CATALOG => {
                let key = get_bytes(&mut raw)
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .ok_or_else(|| bad("catalog key"))?
                    .to_owned();
                let value = match id {
                    0 => None,
                    _ => Some(
                        get_bytes(&mut raw)
                            .ok_or_else(|| bad("catalog entry"))?
                            .to_vec(),
                    ),
                };
                Change::Catalog { key, value }
            }
            other => return Err(bad(&format!("unknown change kind {other}"))),
        };
        changes.push(change);
    }
    if raw.has_remaining() {
        return Err(bad("bytes after the last change"));
    }
    Ok(changes)
}

fn get_failures(raw: &mut &[u8]) -> Option<Vec<(u64, Option<Failure>)>> {
    let n = get_u32(raw)? as usize;
    // Every entry takes at least twelve bytes: a damaged count cannot size the allocation.
    let mut failures = Vec::with_capacity(n.min(raw.len() / 12));
    for _ in 0..n {
        let seq = get_u64(raw)?;
        let mut encoded = get_bytes(raw)?;
        let failure = match encoded.is_empty() {
            true => None,
            false => Some(codec::decode_failure(&mut encoded).ok()?),
        };
        failures.push((seq, failure));
    }
    Some(failures)
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.put_u32_le(bytes.len() as u32);
    out.put_slice(bytes);
}

fn get_bytes<'a>(raw: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = get_u32(raw)? as usize;
    if raw.remaining() < len {
        return None;
    }
    let (bytes, rest) = raw.split_at(len);
    *raw = rest;
    Some(bytes)
}

fn get_u32(raw: &mut &[u8]) -> Option<u32> {
    (raw.remaining() >= 4).then(|| raw.get_u32_le())
}

fn get_u64(raw: &mut &[u8]) -> Option<u64> {
    (raw.remaining() >= 8).then(|| raw.get_u64_le())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChannelLimits, LimitPolicy};

    #[test]
    fn changes_round_trip() {
        let acks = AckState {
            floor: 7,
            acked_total: 12,
            acked_above_floor: vec![(9, 11)],
        };
        let settings = SubscriptionSettings {
            ack_deadline_ms: 5000,
            retry: crate::RetryPolicy {
                initial_ms: 100,
                maximum_ms: 60_000,
                multiplier: 2.5,
                jitter: 0.2,
            },
            max_delivery_attempts: 5,
            dead_letter: Some(ChannelId(9)),
            ordering: false,
        };
        let changes = vec![
            Change::CreateChannel {
                id: ChannelId(3),
                name: "orders".into(),
            },
            Change::CreateSubscription {
                id: SubscriptionId(4),
                record: SubscriptionRecord {
                    channel: ChannelId(3),
                    name: "audit".into(),
                    settings,
                    filter: "attributes:trace".into(),
                    transform: vec![1, 2, 3],
                },
                acks: acks.clone(),
            },
            Change::UpdateSubscription {
                id: SubscriptionId(4),
                settings,
            },
            Change::SaveAcks {
                id: SubscriptionId(4),
                acks,
                failures: vec![
                    (
                        8,
                        Some(Failure {
                            count: 3,
                            retry_at_ms: 1_700_000_000_000,
                            cause: "nack".into(),
                            reason: "timeout talking to the bank".into(),
                        }),
                    ),
                    (9, None),
                ],
            },
            Change::Withdraw {
                channel: ChannelId(9),
                ranges: vec![(3, 5), (8, 9)],
            },
            Change::ClearFailures {
                id: SubscriptionId(4),
            },
            Change::Ids {
                channel: ChannelId(3),
                publish_ms: 1_795_833_296_789,
                entries: vec![(12, "order-1".into()), (13, "é".into())],
            },
            Change::UpdateChannel {
                id: ChannelId(3),
                settings: ChannelSettings {
                    retention: Retention {
                        max_age_ms: 7 * 86_400_000,
                        max_bytes: 10 << 30,
                    },
                    dedup_window_ms: 60_000,
                    default_ttl_ms: 3_600_000,
                    limits: ChannelLimits {
                        max_messages: 1000,
                        max_bytes: 1 << 20,
                        policy: LimitPolicy::DropOldest,
                    },
                },
            },
            Change::Delay {
                channel: ChannelId(3),
                due_ms: 1_795_833_296_789,
                number: 7,
                body: b"one message".to_vec(),
            },
            Change::Undelay {
                channel: ChannelId(3),
                entries: vec![(1_795_833_296_789, 7, 11), (1_795_833_296_790, 8, 40)],
            },
            Change::Drop {
                channel: ChannelId(3),
                range: (10, 15),
                count: 4,
            },
            Change::Skipped {
                channel: ChannelId(3),
                next_seq: 99,
            },
            Change::Catalog {
                key: "wildcard orders.* audit".into(),
                value: Some(vec![1, 2, 3]),
            },
            Change::Catalog {
                key: "wildcard orders.* audit".into(),
                value: None,
            },
            Change::DeleteSubscription {
                id: SubscriptionId(4),
            },
            Change::DeleteChannel { id: ChannelId(3) },
        ];
        let mut out = Vec::new();
        encode(&changes, &mut out);
        assert_eq!(decode(&out).unwrap(), changes);
        for cut in 0..out.len() {
            assert!(decode(&out[..cut]).is_err(), "cut at {cut}");
        }
    }
}
