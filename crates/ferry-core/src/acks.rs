//! A subscription's acknowledgements: a floor below which everything is acked, and the acked
//! ranges above it. Consumers ack out of order, so the ranges absorb the gaps; their number is
//! bounded by the unacked deliveries between them, not by the backlog.

use std::collections::BTreeMap;

use ferry_store::AckState;

/// The acked sequences of one subscription.
#[derive(Debug, Clone, Default)]
pub(crate) struct AckSet {
    floor: u64,
    /// start -> end (exclusive); disjoint, non-adjacent, all above `floor`.
    above: BTreeMap<u64, u64>,
    total: u64,
}

impl AckSet {
    pub fn from_state(state: &AckState) -> Self {
        Self {
            floor: state.floor,
            above: state.acked_above_floor.iter().copied().collect(),
            total: state.acked_total,
        }
    }

    pub fn to_state(&self) -> AckState {
        AckState {
            floor: self.floor,
            acked_total: self.total,
            acked_above_floor: self.above.iter().map(|(&s, &e)| (s, e)).collect(),
        }
    }

    /// Every sequence below this is acked.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Messages acked since the subscription was created.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// How many sequences at or above the floor are acked.
    pub fn acked_above_floor(&self) -> u64 {
        self.above.iter().map(|(s, e)| e - s).sum()
    }

    pub fn contains(&self, seq: u64) -> bool {
        seq < self.floor
            || self
                .above
                .range(..=seq)
                .next_back()
                .is_some_and(|(_, &end)| seq < end)
    }

    /// The first sequence at or after `seq` that is not acked.
    pub fn next_unacked(&self, seq: u64) -> u64 {
        if seq < self.floor {
            return self.floor;
        }
        match self.above.range(..=seq).next_back() {
            Some((_, &end)) if seq < end => end,
            _ => seq,
        }
    }

    /// Marks every sequence of `range` acked; returns how many were not already.
    pub fn insert_range(&mut self, range: std::ops::Range<u64>) -> u64 {
        let mut added = 0;
        let mut seq = self.next_unacked(range.start);
        while seq < range.end {
            added += u64::from(self.insert(seq));
            seq = self.next_unacked(seq + 1);
        }
        added
    }

    /// Marks `seq` acked; false if it was already.
    pub fn insert(&mut self, seq: u64) -> bool {
        if self.contains(seq) {
            return false;
        }
        self.total += 1;
        let mut start = seq;
        let mut end = seq + 1;
        if let Some((&prev_start, &prev_end)) = self.above.range(..seq).next_back()
            && prev_end == seq
        {
            start = prev_start;
        }
        if let Some(next_end) = self.above.remove(&end) {
            end = next_end;
        }
        if start == self.floor {
            self.above.remove(&start);
            self.floor = end;
        } else {
            self.above.insert(start, end);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_acks_merge_into_the_floor() {
        let mut acks = AckSet::from_state(&AckState {
            floor: 1,
            ..Default::default()
        });
        for seq in [3, 5, 4, 7] {
            assert!(acks.insert(seq));
        }
        assert!(!acks.insert(4));
        assert_eq!(acks.floor(), 1);
        assert_eq!(acks.to_state().acked_above_floor, vec![(3, 6), (7, 8)]);
        assert_eq!(acks.next_unacked(3), 6);
        assert_eq!(acks.next_unacked(6), 6);
        assert!(acks.insert(1));
        assert!(acks.insert(2));
        assert_eq!(acks.floor(), 6);
        assert!(acks.insert(6));
        assert_eq!(acks.floor(), 8);
        assert_eq!(acks.total(), 7);
        assert!(acks.to_state().acked_above_floor.is_empty());
        assert!(acks.contains(7) && !acks.contains(8));
        assert_eq!(acks.insert_range(5..12), 4);
        assert_eq!(acks.floor(), 12);
        assert_eq!(acks.insert_range(20..22), 2);
        assert_eq!(acks.insert_range(18..23), 3);
        assert_eq!(acks.to_state().acked_above_floor, vec![(18, 23)]);
    }
}
