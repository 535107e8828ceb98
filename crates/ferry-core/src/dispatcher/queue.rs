//! Which already-read messages a subscription delivers next: failed ones due again or waiting
//! out their backoff, and, with ordering keys, messages held back behind an earlier unacked
//! message of their key.
//!
//! A key is *held* by its oldest unacked message from the moment that message is first handed
//! out until it leaves the subscription (acked, dead-lettered, withdrawn); while held, later
//! messages of the key are *parked* here in sequence order, and the next one is released when
//! the holder leaves. So a retry of a keyed message holds back the rest of its key, and other
//! keys, and unkeyed messages, flow past it.

use std::collections::{BTreeSet, HashMap, VecDeque};

use tokio::time::Instant;

/// At most this many messages wait parked behind their keys; then the subscription reads no
/// further ahead until some are released (a bound on memory, whatever the backlog).
pub(crate) const MAX_PARKED: usize = 50_000;

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
    /// Messages behind a held key, in sequence order.
    parked: HashMap<Box<str>, VecDeque<u64>>,
    parked_count: usize,
}

impl Queue {
    /// Claims `key` for `seq` as it is about to be handed out: true if it may go (the key is
    /// free, or already its own), false if it was parked behind the key's holder.
    pub(crate) fn claim(&mut self, seq: u64, key: &str) -> bool {
        match self.holders.get(key) {
            Some(&holder) if holder == seq => true,
            Some(_) => {
                self.parked.entry(key.into()).or_default().push_back(seq);
                self.parked_count += 1;
                false
            }
            None => {
                self.holders.insert(key.into(), seq);
                self.held.insert(seq, key.into());
                true
            }
        }
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

    /// `seq` left the subscription (acked, dead-lettered, withdrawn, skipped): it is forgotten
    /// wherever it waits, and a key it held goes to the next message parked behind it, which
    /// becomes ready.
    pub(crate) fn remove(&mut self, seq: u64) {
        self.ready.remove(&seq);
        if let Some(at) = self.due.remove(&seq) {
            self.backoff.remove(&(at, seq));
        }
        let Some(key) = self.held.remove(&seq) else {
            return;
        };
        self.holders.remove(&key);
        let Some(waiting) = self.parked.get_mut(&key) else {
            return;
        };
        if let Some(next) = waiting.pop_front() {
            self.parked_count -= 1;
            if waiting.is_empty() {
                self.parked.remove(&key);
            }
            self.holders.insert(key.clone(), next);
            self.held.insert(next, key);
            self.ready.insert(next);
        }
    }

    /// Forgets a parked message (withdrawn or skipped while it waited for its key).
    pub(crate) fn unpark(&mut self, seq: u64, key: &str) {
        if let Some(waiting) = self.parked.get_mut(key)
            && let Some(at) = waiting.iter().position(|&s| s == seq)
        {
            waiting.remove(at);
            self.parked_count -= 1;
            if waiting.is_empty() {
                self.parked.remove(key);
            }
        }
    }

    /// Whether as many messages are parked as memory allows.
    pub(crate) fn parked_full(&self) -> bool {
        self.parked_count >= MAX_PARKED
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
        (self.parked.len(), self.parked_count)
    }

    /// Every sequence waiting here (ready, backing off or parked), for a sweep.
    pub(crate) fn waiting(&self) -> Vec<(u64, Option<Box<str>>)> {
        let mut all: Vec<(u64, Option<Box<str>>)> = self
            .ready
            .iter()
            .chain(self.due.keys())
            .map(|&s| (s, None))
            .collect();
        for (key, seqs) in &self.parked {
            all.extend(seqs.iter().map(|&s| (s, Some(key.clone()))));
        }
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
        assert!(q.claim(1, "a"));
        assert!(q.claim(2, "b"));
        assert!(!q.claim(3, "a"));
        assert!(!q.claim(4, "a"));
        assert!(q.claim(1, "a"), "a holder may go again (a retry)");
        assert_eq!(q.blocked(), (1, 2));
        assert_eq!(q.pop_ready(), None);
        q.remove(1);
        assert_eq!(q.pop_ready(), Some(3));
        assert!(q.claim(3, "a"));
        assert!(!q.claim(5, "a"));
        q.remove(3);
        assert_eq!(q.pop_ready(), Some(4));
        q.unpark(5, "a");
        q.remove(4);
        assert_eq!(q.pop_ready(), None);
        assert_eq!(q.blocked(), (0, 0));
        assert!(q.claim(6, "a"), "the key is free again");
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
