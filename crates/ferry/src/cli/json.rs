//! JSON output: messages as one object each, payloads as UTF-8 text when they are, base64
//! otherwise, with a field saying which.

use base64::Engine as _;
use ferry_client::{ChannelInfo, Received, SubscriptionInfo};
use serde_json::{Value, json};

/// A received message (and its delivery's attempt number).
pub fn message(m: &Received) -> Value {
    let (payload, encoding) = match std::str::from_utf8(&m.payload) {
        Ok(text) => (text.to_owned(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&m.payload),
            "base64",
        ),
    };
    let publish_time_ms = m
        .publish_time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    json!({
        "channel": m.channel,
        "sequence": m.sequence,
        "attempt": m.attempt,
        "publish_time_ms": publish_time_ms,
        "key": m.key,
        "id": m.id,
        "attributes": m.attributes,
        "payload": payload,
        "payload_encoding": encoding,
    })
}

/// A subscription's figures.
pub fn subscription(s: &SubscriptionInfo) -> Value {
    json!({
        "channel": s.channel,
        "name": s.name,
        "backlog": s.backlog,
        "in_flight": s.in_flight,
        "acked": s.acked,
        "delivered": s.delivered,
        "unacked": s.unacked,
        "oldest_unacked_age_ms": s.oldest_unacked_age.map(|d| d.as_millis() as u64),
        "consumers": s.consumers,
        "ack_deadline_ms": s.ack_deadline.as_millis() as u64,
        "dead_letter_channel": s.dead_letter_channel,
        "filter": s.filter,
        "dead_lettered": s.dead_lettered,
        "channels": s.channels,
    })
}

/// A channel's figures, with its subscriptions'.
pub fn channel(c: &ChannelInfo) -> Value {
    json!({
        "name": c.name,
        "messages": c.messages,
        "bytes": c.bytes,
        "next_sequence": c.next_sequence,
        "first_sequence": c.first_sequence,
        "delayed": c.delayed,
        "delayed_bytes": c.delayed_bytes,
        "subscriptions": c.subscriptions.iter().map(subscription).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::UNIX_EPOCH;

    use bytes::Bytes;
    use ferry_client::Received;

    #[test]
    fn payloads_are_text_when_they_can_be() {
        let mut m = Received {
            channel: "orders".into(),
            sequence: 7,
            payload: Bytes::from_static(b"hello"),
            attributes: HashMap::from([("region".into(), "eu".into())]),
            key: String::new(),
            id: String::new(),
            publish_time: UNIX_EPOCH,
            attempt: 1,
        };
        let text = super::message(&m);
        assert_eq!(
            (text["payload"].as_str(), text["payload_encoding"].as_str()),
            (Some("hello"), Some("utf8"))
        );
        assert_eq!(text["attributes"]["region"], "eu");
        m.payload = Bytes::from_static(&[0xff, 0x00]);
        let binary = super::message(&m);
        assert_eq!(
            (
                binary["payload"].as_str(),
                binary["payload_encoding"].as_str()
            ),
            (Some("/wA="), Some("base64"))
        );
    }
}
