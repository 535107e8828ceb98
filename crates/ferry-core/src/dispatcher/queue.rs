//! Which already-read messages a subscription delivers next: failed ones due again or waiting
//! out their backoff, and, with ordering keys, messages held back behind an earlier unacked
//! message of their key.
//!
//! A key is *held* by its oldest unacked message from the moment that message is first handed
//! to a consumer until it leaves the subscription (acked, dead-lettered, withdrawn); while held,
//! later messages of the key are *parked* here in sequence order, and the next one takes the
//! key over (and is due at once) when the holder leaves. So a retry of a keyed message holds
//! back the rest of its key, while other keys, and unkeyed messages, flow past it.

use std::collections::{BTreeSet, HashMap, VecDeque};

use tokio::time::Instant;

/// At most this many messages wait parked behind their keys; then the subscription reads no
/// further ahead until some are released (a bound on memory, whatever the backlog).
pub(crate) const MAX_PARKED: usize = 100_000;

#[derive(Default)]
pub(crate) struct Queue {
    /// Due now, lowest sequence first: delivered before new messages.
    ready: BTreeSet<u64>,
    /// Waiting out a backoff, soonest first, with the time each is due.
    backoff: BTreeSet<(Instant, u64)>,
    due: HashMap<u64, Instant>,
    /// Each held key's holder, and each holder's key.
    holders: HashMap<Box<str>, u64>,
    held: HashMap<u64, Box<str>>,
    /// Messages behind a held key, in sequence order, and each parked message's key.
    parked: HashMap<Box<str>, VecDeque<u64>>,
    parked_key: HashMap<u64, Box<str>>,
}

impl Queue {
    /// Parks `seq` behind its key if another message holds it; true if it was parked.
    pub(crate) fn park_if_held(&mut self, seq: u64, key: &str) -> bool {
        match self.holders.get(key) {
            Some(&holder) if holder != seq => {
                self.parked.entry(key.into()).or_default().push_back(seq);
                self.parked_key.insert(seq, key.into());
                true
            }
            _ => false,
        }
    }

    /// `seq` was handed to a consumer: it holds its key (which was free, or its own).
    pub(crate) fn hold(&mut self, seq: u64, key: &str) {
        let holder = *self.holders.entry(key.into()).or_insert(seq);
        debug_assert_eq!(holder, seq, "key {key:?} held by another message");
        self.held.insert(seq, key.into());
    }

    /// `seq` is to be delivered again as soon as possible.
    pub(crate) fn ready(&mut self, seq: u64) {
        self.ready.insert(seq);
    }

    /// `seq` is to be delivered again at `at`.
    pub(crate) fn retry_at(&mut self, seq: u64, at: Instant) {
        if let Some(previous) = self.due.insert(seq, at) {
            self.backoff.remove(&(previous, seq));
        }
        self.backoff.insert((at, seq));
    }

    /// The next message due, lowest sequence first.
    pub(crate) fn pop_ready(&mut self) -> Option<u64> {
        self.ready.pop_first()
    }

    /// When the next backoff ends.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.backoff.first().map(|(at, _)| *at)
    }

    /// Moves every message whose backoff has ended to the ready ones.
    pub(crate) fn promote_due(&mut self, now: Instant) {
        while let Some(&(at, seq)) = self.backoff.first()
            && at <= now
        {
            self.backoff.pop_first();
            self.due.remove(&seq);
            self.ready.insert(seq);
        }
    }

    /// `seq` left the subscription (acked, dead-lettered, withdrawn, skipped, gone): it is
    /// forgotten wherever it waits, and a key it held goes to the next message parked behind
    /// it, which becomes ready.
    pub(crate) fn remove(&mut self, seq: u64) {
        self.ready.remove(&seq);
        if let Some(at) = self.due.remove(&seq) {
            self.backoff.remove(&(at, seq));
        }
        if let Some(key) = self.parked_key.remove(&seq)
            && let Some(waiting) = self.parked.get_mut(&key)
        {
            waiting.retain(|&s| s != seq);
            if waiting.is_empty() {
                self.parked.remove(&key);
            }
        }
        let Some(key) = self.held.remove(&seq) else {
            return;
        };
        self.holders.remove(&key);
        let Some(waiting) = self.parked.get_mut(&key) else {
            return;
        };
        if let Some(next) = waiting.pop_front() {
            if waiting.is_empty() {
                self.parked.remove(&key);
            }
            self.parked_key.remove(&next);
            // The next one holds the key from now on, though it waits to be handed out: no
            // later message may pass it.
            self.holders.insert(key.clone(), next);
            self.held.insert(next, key);
            self.ready.insert(next);
        }
    }

    /// Whether as many messages are parked as memory allows.
    pub(crate) fn parked_full(&self) -> bool {
        self.parked_key.len() >= MAX_PARKED
    }

    /// Messages due now.
    pub(crate) fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Messages waiting out a backoff.
    pub(crate) fn backoff_len(&self) -> usize {
        self.backoff.len()
    }

    /// Keys with messages parked behind them, and those messages.
    pub(crate) fn blocked(&self) -> (usize, usize) {
        (self.parked.len(), self.parked_key.len())
    }

    /// Every sequence known here (ready, backing off, holding a key or parked), for a sweep.
    pub(crate) fn all(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self.ready.iter().copied().collect();
        all.extend(self.due.keys());
        all.extend(self.held.keys());
        all.extend(self.parked_key.keys());
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_key_goes_to_its_next_message_only_when_its_holder_leaves() {
        let mut q = Queue::default();
        // Not handed out yet: nothing holds the key.
        assert!(!q.park_if_held(1, "a"));
        q.hold(1, "a");
        q.hold(2, "b");
        assert!(q.park_if_held(3, "a"));
        assert!(q.park_if_held(4, "a"));
        assert!(!q.park_if_held(1, "a"), "a holder may go again (a retry)");
        assert_eq!(q.blocked(), (1, 2));
        assert_eq!(q.pop_ready(), None);
        q.remove(1);
        assert_eq!(q.pop_ready(), Some(3));
        assert!(!q.park_if_held(3, "a"), "the next one holds the key");
        assert!(q.park_if_held(5, "a"));
        q.remove(5);
        q.remove(3);
        assert_eq!(q.pop_ready(), Some(4));
        // Gone before it was handed out: it still lets go of the key.
        q.remove(4);
        assert_eq!(q.pop_ready(), None);
        assert_eq!(q.blocked(), (0, 0));
        assert!(!q.park_if_held(6, "a"), "the key is free again");
        assert_eq!(q.all(), [2]);
    }

    #[test]
    fn backoffs_end_in_order_and_removal_forgets_them() {
        let mut q = Queue::default();
        let now = Instant::now();
        q.retry_at(7, now + Duration::from_millis(20));
        q.retry_at(5, now + Duration::from_millis(10));
        q.retry_at(9, now + Duration::from_millis(30));
        q.remove(9);
        assert_eq!(q.next_due(), Some(now + Duration::from_millis(10)));
        q.promote_due(now + Duration::from_millis(25));
        assert_eq!(
            (q.pop_ready(), q.pop_ready(), q.pop_ready()),
            (Some(5), Some(7), None)
        );
        assert_eq!(q.backoff_len(), 0);
        assert_eq!(q.next_due(), None);
    }
}
