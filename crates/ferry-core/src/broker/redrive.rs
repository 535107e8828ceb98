//! Redrive: dead letters go back to the subscription they came from, for another round.
//!
//! Each dead letter selected is appended to its origin channel, addressed to its origin
//! subscription only, and withdrawn from the dead-letter channel (for all its subscriptions)
//! in the same store commit, a batch at a time; the store leaves out what another redrive
//! moved first, so no message is moved twice. See [`crate::dead_letter`] for what the
//! redriven copy carries.

use std::collections::BTreeMap;

use ferry_store::{Message, NewMessage, StoreError};

use super::Broker;
use crate::dead_letter::{self, Origin};
use crate::error::{CoreError, Result};

/// Dead letters read per batch (each batch is one commit per origin channel).
const BATCH_MESSAGES: usize = 256;
const BATCH_BYTES: usize = 4 << 20;

/// Which dead letters a redrive moves: all those in the sequence range that carry every
/// attribute given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveSelection {
    /// The first sequence of the dead-letter channel to look at (0: the first stored).
    pub first_sequence: u64,
    /// The last sequence to look at (0: the last stored when the redrive starts).
    pub last_sequence: u64,
    /// Only dead letters with each of these attributes, with exactly this value.
    pub attributes: Vec<(String, String)>,
    /// Move at most this many (0: no limit).
    pub limit: u64,
}

/// What a redrive did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveOutcome {
    /// Messages moved back to their origin subscription.
    pub redriven: u64,
    /// Messages selected but left where they are (not a dead letter, or their origin
    /// subscription no longer exists).
    pub skipped: u64,
    /// Why the first skipped message was skipped.
    pub first_skip_reason: Option<String>,
}

impl RedriveOutcome {
    fn skip(&mut self, reason: impl FnOnce() -> String) {
        self.skipped += 1;
        if self.first_skip_reason.is_none() {
            self.first_skip_reason = Some(reason());
        }
    }
}

impl Broker {
    /// Moves the selected dead letters of `channel` back to their origin subscriptions.
    ///
    /// `may_redrive_to(channel, subscription)` says whether the caller may send a message back
    /// to that origin; one it may not is skipped, saying so.
    pub async fn redrive(
        &self,
        channel: &str,
        selection: &RedriveSelection,
        may_redrive_to: &(dyn Fn(&str, &str) -> bool + Sync),
    ) -> Result<RedriveOutcome> {
        self.check_open()?;
        let dead = self.channel(channel)?;
        let stats = dead.log.stats();
        let last = match selection.last_sequence {
            0 => stats.next_seq.saturating_sub(1),
            n => n.min(stats.next_seq.saturating_sub(1)),
        };
        let mut outcome = RedriveOutcome::default();
        let mut seq = selection.first_sequence.max(stats.first_seq);
        let room =
            |outcome: &RedriveOutcome| selection.limit == 0 || outcome.redriven < selection.limit;
        while seq <= last && room(&outcome) {
            let batch = match dead.log.read(seq, BATCH_MESSAGES, BATCH_BYTES) {
                Ok(batch) => batch,
                Err(StoreError::Damaged { end_seq, .. }) => {
                    seq = end_seq;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let Some(newest) = batch.last() else { break };
            seq = newest.sequence + 1;
            let withdrawn = dead.log.watch_withdrawn().borrow().clone();
            let mut moves: BTreeMap<String, Vec<(u64, NewMessage)>> = BTreeMap::new();
            for message in batch.iter().filter(|m| m.sequence <= last) {
                let gone = withdrawn
                    .iter()
                    .any(|&(s, e)| (s..e).contains(&message.sequence));
                if gone || !selected(message, selection) {
                    continue;
                }
                if !room(&outcome) {
                    break;
                }
                // The right first: a caller without it learns nothing of whether the origin
                // still exists.
                let origin = origin_of(message)
                    .and_then(|origin| {
                        match may_redrive_to(&origin.channel, &origin.subscription) {
                            true => Ok(origin),
                            false => Err(format!(
                                "message {}: the caller may not redrive into subscription {:?} \
                                 of channel {:?} (it needs the admin right on it)",
                                message.sequence, origin.subscription, origin.channel
                            )),
                        }
                    })
                    .and_then(|origin| self.still_there(origin, message.sequence));
                match origin {
                    Ok(origin) => {
                        let copy = dead_letter::redriven(message, &origin);
                        moves
                            .entry(origin.channel)
                            .or_default()
                            .push((message.sequence, copy));
                        outcome.redriven += 1;
                    }
                    Err(reason) => outcome.skip(|| reason),
                }
            }
            for (origin, moves) in moves {
                let wanted = moves.len() as u64;
                let to = self.channel(&origin)?.id;
                let moved = self.inner.store.redrive(dead.id, to, moves).await?;
                // Another redrive moved the rest first.
                outcome.redriven -= wanted - moved.len() as u64;
            }
        }
        tracing::info!(
            channel,
            redriven = outcome.redriven,
            skipped = outcome.skipped,
            "dead letters redriven"
        );
        Ok(outcome)
    }

    /// The origin of dead letter `sequence`, if that subscription still exists.
    fn still_there(&self, origin: Origin, sequence: u64) -> std::result::Result<Origin, String> {
        let exists = self
            .channel(&origin.channel)
            .and_then(|c| c.subscription(&origin.subscription));
        match exists {
            Ok(_) => Ok(origin),
            Err(CoreError::ChannelNotFound(_)) => Err(format!(
                "message {sequence}: its origin channel {:?} no longer exists",
                origin.channel
            )),
            Err(_) => Err(format!(
                "message {sequence}: its origin subscription {:?} of channel {:?} no longer exists",
                origin.subscription, origin.channel
            )),
        }
    }
}

/// Where a dead letter came from, as its attributes say.
fn origin_of(message: &Message) -> std::result::Result<Origin, String> {
    dead_letter::origin(message).ok_or_else(|| {
        format!(
            "message {} has no ferry.dead_letter.* attributes: it was not dead-lettered by the \
             broker",
            message.sequence
        )
    })
}

/// Whether a message carries every attribute the selection asks for.
fn selected(message: &Message, selection: &RedriveSelection) -> bool {
    selection
        .attributes
        .iter()
        .all(|(name, value)| message.attributes.get(name) == Some(value.as_str()))
}
