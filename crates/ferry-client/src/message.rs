//! Messages as a publisher hands them in and as the broker confirms them.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ferry_proto::pb;

/// A message to publish: a payload, string attributes, an optional ordering key and id, and
/// when to deliver it or let it expire.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    /// The opaque body.
    pub payload: Bytes,
    /// String headers (what subscription filters look at).
    pub attributes: HashMap<String, String>,
    /// Messages with the same non-empty key are delivered one at a time, in publish order.
    pub key: String,
    /// A non-empty id makes a retried publish safe: the channel stores it once within its
    /// de-duplication window.
    pub id: String,
    /// How long it may wait to be delivered (None: the channel's default).
    pub ttl: Option<Duration>,
    /// Deliver no earlier than this long after publishing.
    pub delay: Option<Duration>,
}

impl Message {
    /// A message with this payload.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            ..Self::default()
        }
    }

    /// Sets an attribute.
    pub fn attribute(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(name.into(), value.into());
        self
    }

    /// Sets the ordering key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = key.into();
        self
    }

    /// Sets the id the channel de-duplicates on.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the time to live.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Delays delivery by this long.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Its encoded size, as it counts against a batch.
    pub(crate) fn size(&self) -> usize {
        let attributes: usize = (self.attributes.iter())
            .map(|(k, v)| k.len() + v.len())
            .sum();
        self.payload.len() + attributes + self.key.len() + self.id.len() + 16
    }

    pub(crate) fn into_proto(self) -> pb::OutgoingMessage {
        pb::OutgoingMessage {
            payload: self.payload,
            attributes: self.attributes,
            key: self.key,
            id: self.id,
            ttl: self.ttl.map(crate::convert::duration),
            delay: self.delay.map(crate::convert::duration),
            ..Default::default()
        }
    }
}

/// The broker's confirmation of one published message: it is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Its sequence in the channel (its original's, for a duplicate; 0 while delayed).
    pub sequence: u64,
    /// The channel already held a message with this id: this one was not stored again.
    pub duplicate: bool,
    /// It is stored aside until it is due, when it gets its sequence.
    pub delayed: bool,
}

impl Published {
    /// The confirmations of a batch, in its order.
    pub(crate) fn of(response: pb::PublishResponse) -> Vec<Published> {
        let flag = |flags: &[bool], i: usize| flags.get(i).copied().unwrap_or(false);
        (response.sequences.iter().enumerate())
            .map(|(i, &sequence)| Published {
                sequence,
                duplicate: flag(&response.duplicate, i),
                delayed: flag(&response.delayed, i),
            })
            .collect()
    }
}

/// A message as the broker delivers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// The channel it is from.
    pub channel: String,
    /// Its sequence in that channel.
    pub sequence: u64,
    /// The opaque body.
    pub payload: Bytes,
    /// String headers.
    pub attributes: HashMap<String, String>,
    /// Its ordering key ("" for none).
    pub key: String,
    /// Its publisher-chosen id ("" for none).
    pub id: String,
    /// When the broker accepted it.
    pub publish_time: SystemTime,
    /// 1 for its first delivery to this subscription, then 2, ...
    pub attempt: u32,
}

impl Received {
    pub(crate) fn of(delivery: &mut pb::Delivery) -> Received {
        let message = delivery.message.take().unwrap_or_default();
        Received {
            channel: std::mem::take(&mut delivery.channel),
            sequence: message.sequence,
            payload: message.payload,
            attributes: message.attributes,
            key: message.key,
            id: message.id,
            publish_time: crate::convert::time(message.publish_time),
            attempt: delivery.attempt,
        }
    }
}
