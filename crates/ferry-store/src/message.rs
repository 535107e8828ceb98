//! Messages as the store takes them in and hands them out, and what they cost in memory.
//!
//! Two sizes matter and are kept apart: [`Message::size`] is what a message counts for against
//! the limits and windows clients see (payload, key, id and attribute text), while
//! [`Message::heap_size`] is what it really occupies in memory, allocation overheads included,
//! which is what the broker's memory budgets count. Attributes are stored compactly (all their
//! text in one allocation) so that a message with thousands of attributes costs what it holds,
//! not a pair of allocations per attribute.

use std::fmt;

use bytes::Bytes;

/// A message's string headers, in the order given: all the text in one allocation and the
/// boundaries in another, whatever the number of attributes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// Names and values back to back: name 0, value 0, name 1, value 1, ...
    text: Box<str>,
    /// The end offset in `text` of each name and value, two per attribute.
    ends: Box<[u32]>,
}

impl Attributes {
    /// Attributes from (name, value) pairs, in order.
    pub fn from_pairs<K: AsRef<str>, V: AsRef<str>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut builder = AttributesBuilder::default();
        for (name, value) in pairs {
            builder.push(name.as_ref(), value.as_ref());
        }
        builder.build()
    }

    /// How many attributes there are.
    pub fn len(&self) -> usize {
        self.ends.len() / 2
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The (name, value) pairs, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        (0..self.len()).map(move |i| {
            let start = if i == 0 {
                0
            } else {
                self.ends[2 * i - 1] as usize
            };
            let (name_end, value_end) = (self.ends[2 * i] as usize, self.ends[2 * i + 1] as usize);
            (&self.text[start..name_end], &self.text[name_end..value_end])
        })
    }

    /// The value of the first attribute with this name.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Bytes of names and values together.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    /// Heap bytes held, allocation overheads included.
    fn heap_size(&self) -> usize {
        if self.is_empty() {
            return 0;
        }
        self.text.len() + self.ends.len() * 4 + 2 * ALLOCATION_OVERHEAD
    }
}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Attributes {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        Self::from_pairs(pairs)
    }
}

/// Builds [`Attributes`] one pair at a time (the decoder reads them this way).
#[derive(Default)]
pub(crate) struct AttributesBuilder {
    text: String,
    ends: Vec<u32>,
}

impl AttributesBuilder {
    pub(crate) fn with_capacity(pairs: usize, text: usize) -> Self {
        Self {
            text: String::with_capacity(text),
            ends: Vec::with_capacity(pairs * 2),
        }
    }

    pub(crate) fn push(&mut self, name: &str, value: &str) {
        self.text.push_str(name);
        self.ends.push(self.text.len() as u32);
        self.text.push_str(value);
        self.ends.push(self.text.len() as u32);
    }

    pub(crate) fn build(self) -> Attributes {
        Attributes {
            text: self.text.into_boxed_str(),
            ends: self.ends.into_boxed_slice(),
        }
    }
}

/// A message as handed in by a publisher, before the store numbers it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewMessage {
    /// The opaque body. It should own its bytes: a slice of a larger buffer keeps all of that
    /// buffer alive for as long as the message is cached.
    pub payload: Bytes,
    /// String headers, in the order given.
    pub attributes: Attributes,
    /// Ordering key ("" = none).
    pub key: String,
    /// Publisher-chosen id ("" = none).
    pub id: String,
}

impl NewMessage {
    /// The bytes this message counts for against size limits and flow-control windows.
    pub fn size(&self) -> usize {
        message_size(&self.payload, &self.attributes, &self.key, &self.id)
    }
}

/// A stored message: immutable once written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Strictly increasing within its channel, from 1.
    pub sequence: u64,
    /// When the store accepted it, in milliseconds since the Unix epoch.
    pub publish_time_ms: u64,
    /// Ordering key ("" = none).
    pub key: String,
    /// Publisher-chosen id ("" = none).
    pub id: String,
    /// String headers.
    pub attributes: Attributes,
    /// The opaque body; it owns exactly its own bytes.
    pub payload: Bytes,
}

impl Message {
    /// The bytes this message counts for against size limits and flow-control windows.
    pub fn size(&self) -> usize {
        message_size(&self.payload, &self.attributes, &self.key, &self.id)
    }

    /// What this message occupies in memory when held as an `Arc<Message>`, allocation
    /// overheads included: what memory budgets count it as.
    pub fn heap_size(&self) -> usize {
        let strings = [&self.key, &self.id]
            .iter()
            .filter(|s| s.capacity() > 0)
            .map(|s| s.capacity() + ALLOCATION_OVERHEAD)
            .sum::<usize>();
        let payload = if self.payload.is_empty() {
            0
        } else {
            // The bytes, and the shared header `Bytes` allocates for an owned buffer.
            self.payload.len() + 2 * ALLOCATION_OVERHEAD + 16
        };
        ARC_MESSAGE_SIZE + strings + payload + self.attributes.heap_size()
    }
}

/// What the allocator adds to each allocation (glibc: a 16-byte header and rounding).
const ALLOCATION_OVERHEAD: usize = 16;
/// An `Arc<Message>`'s own allocation: two counters and the struct.
const ARC_MESSAGE_SIZE: usize = 16 + size_of::<Message>() + ALLOCATION_OVERHEAD;

fn message_size(payload: &Bytes, attributes: &Attributes, key: &str, id: &str) -> usize {
    payload.len() + key.len() + id.len() + attributes.text_len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_keep_their_pairs_in_order() {
        let attributes = Attributes::from_pairs([("b", "2"), ("a", ""), ("", "x"), ("é", "ü")]);
        let pairs: Vec<_> = attributes.iter().collect();
        assert_eq!(pairs, [("b", "2"), ("a", ""), ("", "x"), ("é", "ü")]);
        assert_eq!(attributes.len(), 4);
        assert_eq!(attributes.get("a"), Some(""));
        assert_eq!(attributes.get("c"), None);
        assert_eq!(attributes.text_len(), 2 + 1 + 1 + 4);
        assert_eq!(
            format!("{attributes:?}"),
            r#"{"b": "2", "a": "", "": "x", "é": "ü"}"#
        );
        assert!(Attributes::default().is_empty());
    }

    #[test]
    fn heap_size_counts_what_a_message_holds() {
        let small = Message {
            sequence: 1,
            publish_time_ms: 0,
            key: String::new(),
            id: String::new(),
            attributes: Attributes::default(),
            payload: Bytes::new(),
        };
        assert_eq!(small.heap_size(), ARC_MESSAGE_SIZE);
        let many = Message {
            attributes: (0..10_000).map(|i| (format!("a{i}"), "v")).collect(),
            ..small.clone()
        };
        // Each attribute costs its text and 8 bytes of boundaries: no allocation of its own.
        let text: usize = (0..10_000).map(|i| format!("a{i}").len() + 1).sum();
        assert_eq!(
            many.heap_size(),
            ARC_MESSAGE_SIZE + text + 80_000 + 2 * ALLOCATION_OVERHEAD
        );
    }
}
