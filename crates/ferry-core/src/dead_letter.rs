//! What a dead letter says about itself, and how a redriven message finds its way back.
//!
//! A dead-lettered copy keeps the message's payload, attributes, key and id, and gains
//! `ferry.dead_letter.*` attributes naming where it came from, why, after how many attempts and
//! when. Redrive reads them back: the copy is appended to its origin channel without them, with
//! `ferry.redrive.count` raised by one and `ferry.redrive.for` saying which subscription it is
//! for and what its original sequence and publish time were. The origin's other subscriptions
//! count it as acked without delivering it; the one it is for delivers it under its original
//! sequence and publish time, with `ferry.redrive.for` removed.

use std::sync::Arc;

use ferry_store::{Attributes, Dropped, Message, NewMessage};

/// The channel a dead letter came from.
pub const CHANNEL: &str = "ferry.dead_letter.channel";
/// The subscription that gave up on it.
pub const SUBSCRIPTION: &str = "ferry.dead_letter.subscription";
/// Its sequence in that channel.
pub const SEQUENCE: &str = "ferry.dead_letter.sequence";
/// Its original publish time (RFC 3339, UTC).
pub const PUBLISH_TIME: &str = "ferry.dead_letter.publish_time";
/// Why: `deadline`, `nack`, `terminal`, `released`, `expired` or `dropped`.
pub const REASON: &str = "ferry.dead_letter.reason";
/// How many deliveries were attempted.
pub const ATTEMPTS: &str = "ferry.dead_letter.attempts";
/// The consumer's reason text of its last nack, if it gave one.
pub const ERROR: &str = "ferry.dead_letter.error";
/// When it was dead-lettered (RFC 3339, UTC).
pub const TIME: &str = "ferry.dead_letter.time";
/// Every provenance attribute starts with this.
const PREFIX: &str = "ferry.dead_letter.";
/// How many times a message was redriven.
pub const REDRIVE_COUNT: &str = "ferry.redrive.count";
/// Whom a redriven message is for: `SUBSCRIPTION SEQUENCE PUBLISH_TIME_MS`. Reserved:
/// publishers may not set it.
pub const REDRIVE_FOR: &str = "ferry.redrive.for";
/// When a message expires, in ms since the Unix epoch: set from its time to live (or its
/// channel's default) when it is published. An expired message is not delivered.
pub const EXPIRE_AT: &str = "ferry.expire_at";

pub use ferry_store::DELIVER_AT;

/// Whether only the broker may set an attribute of this name: the provenance a redrive trusts
/// to find a dead letter's origin, and whom a redriven message is for. A publisher forging them
/// could otherwise get a message redriven into a subscription it has no rights on.
pub fn is_reserved(name: &str) -> bool {
    name.starts_with(PREFIX) || name == REDRIVE_FOR
}

/// When a message to publish is due (0: at once).
pub fn due(message: &NewMessage) -> u64 {
    match message.attributes.is_empty() {
        true => 0,
        false => (message.attributes.get(DELIVER_AT))
            .and_then(|t| t.parse().ok())
            .unwrap_or(0),
    }
}

/// When `message` expires, if it does.
pub(crate) fn expire_at(message: &Message) -> Option<u64> {
    if message.attributes.is_empty() {
        return None;
    }
    message.attributes.get(EXPIRE_AT)?.parse().ok()
}

/// Where and why a message is dead-lettered.
pub(crate) struct Provenance<'a> {
    pub channel: &'a str,
    pub subscription: &'a str,
    pub reason: &'a str,
    pub attempts: u32,
    pub error: &'a str,
    pub now_ms: u64,
}

/// The dead-lettered copy of `message` (as it was delivered).
pub(crate) fn dead_letter(message: &Message, from: &Provenance<'_>) -> NewMessage {
    // A dead letter does not expire, nor wait again: it waits for an operator.
    let mut attributes: Vec<(String, String)> = message
        .attributes
        .iter()
        .filter(|(name, _)| !name.starts_with(PREFIX) && ![EXPIRE_AT, DELIVER_AT].contains(name))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    attributes.extend([
        (CHANNEL.into(), from.channel.into()),
        (SUBSCRIPTION.into(), from.subscription.into()),
        (SEQUENCE.into(), message.sequence.to_string()),
        (PUBLISH_TIME.into(), rfc3339(message.publish_time_ms)),
        (REASON.into(), from.reason.into()),
        (ATTEMPTS.into(), from.attempts.to_string()),
        (TIME.into(), rfc3339(from.now_ms)),
    ]);
    if !from.error.is_empty() {
        attributes.push((ERROR.into(), from.error.into()));
    }
    NewMessage {
        payload: message.payload.clone(),
        attributes: Attributes::from_pairs(attributes),
        key: message.key.clone(),
        id: message.id.clone(),
    }
}

/// The dead letter of a message dropped from a full channel, for a subscription that had not
/// acked it (`None` if it was redriven to another subscription).
pub(crate) fn dropped(message: &Message, why: &Dropped<'_>) -> Option<NewMessage> {
    let view = match addressee(message, why.subscription) {
        Addressee::Everyone => None,
        Addressee::Redriven(view) => Some(view),
        Addressee::Other => return None,
    };
    let from = Provenance {
        channel: why.channel,
        subscription: why.subscription,
        reason: "dropped",
        attempts: why.attempts,
        error: "",
        now_ms: why.now_ms,
    };
    Some(dead_letter(view.as_deref().unwrap_or(message), &from))
}

/// Where a dead letter came from, as its attributes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    pub channel: String,
    pub subscription: String,
    pub sequence: u64,
    pub publish_time_ms: u64,
}

/// Reads a dead letter's origin; `None` if the message is not one (or was tampered with).
pub(crate) fn origin(message: &Message) -> Option<Origin> {
    let get = |name| message.attributes.get(name);
    Some(Origin {
        channel: get(CHANNEL)?.to_owned(),
        subscription: get(SUBSCRIPTION)?.to_owned(),
        sequence: get(SEQUENCE)?.parse().ok()?,
        publish_time_ms: parse_rfc3339(get(PUBLISH_TIME)?)?,
    })
}

/// The message to append to the origin channel for a redrive of `dead` from `origin`.
pub(crate) fn redriven(dead: &Message, origin: &Origin) -> NewMessage {
    let count = dead
        .attributes
        .get(REDRIVE_COUNT)
        .and_then(|c| c.parse::<u64>().ok())
        .unwrap_or(0);
    let mut attributes: Vec<(&str, String)> = dead
        .attributes
        .iter()
        .filter(|(name, _)| !name.starts_with(PREFIX) && *name != REDRIVE_COUNT)
        .map(|(n, v)| (n, v.to_owned()))
        .collect();
    attributes.push((REDRIVE_COUNT, (count + 1).to_string()));
    attributes.push((
        REDRIVE_FOR,
        format!(
            "{} {} {}",
            origin.subscription, origin.sequence, origin.publish_time_ms
        ),
    ));
    NewMessage {
        payload: dead.payload.clone(),
        attributes: Attributes::from_pairs(attributes),
        key: dead.key.clone(),
        id: dead.id.clone(),
    }
}

/// Whom a message of a channel is for.
pub(crate) enum Addressee {
    /// Every subscription: an ordinary message.
    Everyone,
    /// This subscription only, redriven: deliver this view of it (original sequence and
    /// publish time, without the routing attribute).
    Redriven(Arc<Message>),
    /// Another subscription (redriven to it): count it as acked.
    Other,
}

/// Whom `message` is for, seen from subscription `subscription`.
pub(crate) fn addressee(message: &Message, subscription: &str) -> Addressee {
    if message.attributes.is_empty() {
        return Addressee::Everyone;
    }
    let Some(target) = message.attributes.get(REDRIVE_FOR) else {
        return Addressee::Everyone;
    };
    let mut parts = target.split(' ');
    let (Some(name), Some(sequence), Some(published)) = (parts.next(), parts.next(), parts.next())
    else {
        return Addressee::Other;
    };
    if name != subscription {
        return Addressee::Other;
    }
    Addressee::Redriven(Arc::new(Message {
        sequence: sequence.parse().unwrap_or(message.sequence),
        publish_time_ms: published.parse().unwrap_or(message.publish_time_ms),
        attributes: message
            .attributes
            .iter()
            .filter(|(n, _)| *n != REDRIVE_FOR)
            .collect(),
        ..message.clone()
    }))
}

/// Milliseconds since the Unix epoch as RFC 3339 in UTC, to the millisecond.
pub(crate) fn rfc3339(ms: u64) -> String {
    let (days, rest) = ((ms / 86_400_000) as i64, ms % 86_400_000);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000
    )
}

/// Reads what [`rfc3339`] writes.
pub(crate) fn parse_rfc3339(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() != 24 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[23] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| text.get(range)?.parse::<u64>().ok();
    let days = days_from_civil(num(0..4)? as i64, num(5..7)?, num(8..10)?)?;
    let time = num(11..13)? * 3_600_000 + num(14..16)? * 60_000 + num(17..19)? * 1000;
    Some(u64::try_from(days).ok()? * 86_400_000 + time + num(20..23)?)
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The inverse of [`civil_from_days`]; `None` for a month or day out of range.
fn days_from_civil(year: i64, month: u64, day: u64) -> Option<i64> {
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (month as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn times_are_rfc3339_and_read_back() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_833_296_789), "2026-11-28T02:34:56.789Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        for ms in [0, 1, 951_782_400_000, 1_795_833_296_789, 4_102_444_800_000] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
        }
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00.000Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn a_dead_letter_round_trips_to_a_redrive_for_its_subscription_only() {
        let original = Message {
            sequence: 42,
            publish_time_ms: 1_795_833_296_789,
            key: "customer-7".into(),
            id: "order-1".into(),
            attributes: Attributes::from_pairs([("region", "eu")]),
            payload: Bytes::from_static(b"{}"),
        };
        let provenance = Provenance {
            channel: "orders",
            subscription: "billing",
            reason: "nack",
            attempts: 5,
            error: "card declined",
            now_ms: 1_795_833_300_000,
        };
        let dead = dead_letter(&original, &provenance);
        assert_eq!(dead.attributes.get(ERROR), Some("card declined"));
        assert_eq!(dead.attributes.get(ATTEMPTS), Some("5"));
        let stored = Message {
            sequence: 3,
            publish_time_ms: provenance.now_ms,
            key: dead.key.clone(),
            id: dead.id.clone(),
            attributes: dead.attributes.clone(),
            payload: dead.payload.clone(),
        };
        let from = origin(&stored).unwrap();
        assert_eq!(
            (
                from.channel.as_str(),
                from.subscription.as_str(),
                from.sequence
            ),
            ("orders", "billing", 42)
        );
        let back = redriven(&stored, &from);
        let appended = Message {
            sequence: 900,
            publish_time_ms: 1_795_833_400_000,
            key: back.key.clone(),
            id: back.id.clone(),
            attributes: back.attributes.clone(),
            payload: back.payload.clone(),
        };
        assert!(matches!(addressee(&appended, "audit"), Addressee::Other));
        assert!(matches!(addressee(&original, "audit"), Addressee::Everyone));
        let Addressee::Redriven(view) = addressee(&appended, "billing") else {
            panic!("not for billing");
        };
        assert_eq!(view.sequence, 42);
        assert_eq!(view.publish_time_ms, original.publish_time_ms);
        let attributes: Vec<_> = view.attributes.iter().collect();
        assert_eq!(attributes, [("region", "eu"), (REDRIVE_COUNT, "1")]);
        assert_eq!(
            (view.key.as_str(), view.id.as_str()),
            ("customer-7", "order-1")
        );
    }
}
