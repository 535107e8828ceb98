//! Conversions between the proto types and the broker core's types, at the edge. Requests that
//! do not convert are refused here with INVALID_ARGUMENT.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use ferry_core::{
    AckOutcome, AckResult, Attributes, ChannelInfo, DEFAULT_ACK_DEADLINE_MS, Delivery, Message,
    NewMessage, SubscriptionStats, Window,
};
use ferry_proto::pb;
use tonic::Status;

pub fn new_message(m: pb::OutgoingMessage) -> NewMessage {
    NewMessage {
        // The decoded payload is a slice of the request's receive buffer; a cached message must
        // not keep that whole buffer alive, so it gets its own copy.
        payload: Bytes::copy_from_slice(&m.payload),
        attributes: Attributes::from_pairs(m.attributes),
        key: m.key,
        id: m.id,
    }
}

pub fn message(m: &Message) -> pb::Message {
    pb::Message {
        payload: m.payload.clone(),
        attributes: m
            .attributes
            .iter()
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect(),
        key: m.key.clone(),
        id: m.id.clone(),
        sequence: m.sequence,
        publish_time: Some(timestamp(m.publish_time_ms)),
    }
}

pub fn delivery(d: Delivery) -> pb::Delivery {
    pb::Delivery {
        message: Some(message(&d.message)),
        ack_id: d.ack_id,
        attempt: d.attempt,
    }
}

pub fn ack_result(outcome: AckOutcome) -> pb::AckResult {
    let status = match outcome.result {
        AckResult::Ok => pb::AckStatus::Ok,
        AckResult::Unknown => pb::AckStatus::Unknown,
        AckResult::Stale => pb::AckStatus::Stale,
    };
    pb::AckResult {
        ack_id: outcome.ack_id,
        status: status as i32,
    }
}

pub fn window(w: Option<pb::FlowControl>) -> Window {
    let w = w.unwrap_or_default();
    Window {
        max_messages: w.max_messages,
        max_bytes: w.max_bytes,
    }
}

pub fn flow_control(w: Window) -> pb::FlowControl {
    pb::FlowControl {
        max_messages: w.max_messages,
        max_bytes: w.max_bytes,
    }
}

pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// An ack deadline from a request: absent means the default.
pub fn ack_deadline_ms(d: Option<prost_types::Duration>) -> Result<u64, Status> {
    let Some(d) = d else {
        return Ok(DEFAULT_ACK_DEADLINE_MS);
    };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(Status::invalid_argument(
            "ack_deadline must not be negative",
        ));
    }
    (d.seconds as u64)
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(d.nanos as u64 / 1_000_000))
        .ok_or_else(|| Status::invalid_argument("ack_deadline is out of range: at most 1 h"))
}

pub fn subscription_info(channel: &str, s: SubscriptionStats) -> pb::SubscriptionInfo {
    let oldest = s.oldest_unacked_publish_time_ms;
    let now_ms = UNIX_EPOCH.elapsed().map_or(0, |d| d.as_millis() as u64);
    pb::SubscriptionInfo {
        channel: channel.to_owned(),
        name: s.name,
        ack_deadline: Some(duration(Duration::from_millis(s.settings.ack_deadline_ms))),
        backlog: s.backlog,
        in_flight: s.in_flight,
        acked: s.acked,
        unacked: s.unacked,
        oldest_unacked_age: oldest
            .map(|t| duration(Duration::from_millis(now_ms.saturating_sub(t)))),
        oldest_unacked_publish_time: oldest.map(timestamp),
        consumers: s.consumers,
        ack_floor: s.ack_floor,
        damaged_skipped: s.damaged_skipped,
    }
}

pub fn channel_info(c: ChannelInfo) -> pb::ChannelInfo {
    let name = c.name;
    pb::ChannelInfo {
        messages: c.messages,
        bytes: c.bytes,
        next_sequence: c.next_sequence,
        first_sequence: c.first_sequence,
        damaged_records: c.damaged_records,
        damaged_messages: c.damaged_messages,
        subscriptions: c
            .subscriptions
            .into_iter()
            .map(|s| subscription_info(&name, s))
            .collect(),
        name,
    }
}
