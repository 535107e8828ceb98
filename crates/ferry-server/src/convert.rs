//! Conversions between the proto types and the broker core's types, at the edge. Requests that
//! do not convert are refused here with INVALID_ARGUMENT.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use ferry_core::dead_letter::{DELIVER_AT, EXPIRE_AT};
use ferry_core::derive::{DerivedInfo, DerivedSpec, Reshape};
use ferry_core::retry::{DEFAULT_RETRY_INITIAL, DEFAULT_RETRY_MAXIMUM, DEFAULT_RETRY_MULTIPLIER};
use ferry_core::{
    AckOutcome, AckResult, Appended, Attributes, ChannelInfo, ChannelLimits, ChannelSettings,
    DEFAULT_ACK_DEADLINE_MS, DEFAULT_DEDUP_WINDOW_MS, Delivery, LimitPolicy, Message, Nack,
    NewMessage, Point, Retention, RetryPolicy, SubscriptionSettings, SubscriptionStats, Window,
};
use ferry_proto::pb;
use tonic::Status;

/// The longest time to live a message may have.
const MAX_TTL_MS: u64 = 100 * 365 * 86_400_000;

/// A message to publish as the core takes it: its times become the reserved attributes, and
/// its payload gets a buffer of its own.
pub fn new_message(m: pb::OutgoingMessage) -> Result<NewMessage, Status> {
    if let Some(name) = (m.attributes.keys()).find(|name| *name == EXPIRE_AT || *name == DELIVER_AT)
    {
        return Err(Status::invalid_argument(format!(
            "the attribute {name:?} is reserved: set the message's ttl, deliver_time or delay instead"
        )));
    }
    // Most messages are neither delayed nor expire: they cost no read of the clock.
    let timed = m.deliver_time.is_some() || m.delay.is_some() || m.ttl.is_some();
    let now = match timed {
        true => UNIX_EPOCH.elapsed().map_or(0, |d| d.as_millis() as u64),
        false => 0,
    };
    let due = deliver_at(m.deliver_time, m.delay, now)?;
    let expire = match millis("ttl", m.ttl)? {
        Some(ttl) if !(1..=MAX_TTL_MS).contains(&ttl) => {
            return Err(Status::invalid_argument(format!(
                "ttl is {ttl} ms: it must be from 1 ms to 100 years"
            )));
        }
        // A delayed message's time to live starts when it is due.
        Some(ttl) => Some(due.unwrap_or(now).max(now) + ttl),
        None => None,
    };
    let (due, expire) = (
        due.map(|at| at.to_string()),
        expire.map(|at| at.to_string()),
    );
    let attributes = (m.attributes.iter())
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .chain(due.as_deref().map(|at| (DELIVER_AT, at)))
        .chain(expire.as_deref().map(|at| (EXPIRE_AT, at)));
    Ok(NewMessage {
        // The decoded payload is a slice of the request's receive buffer; a cached message must
        // not keep that whole buffer alive, so it gets its own copy.
        payload: Bytes::copy_from_slice(&m.payload),
        attributes: Attributes::from_pairs(attributes),
        key: m.key,
        id: m.id,
    })
}

/// When a message to publish is due, from its `deliver_time` or `delay` (`None`: at once).
fn deliver_at(
    at: Option<prost_types::Timestamp>,
    delay: Option<prost_types::Duration>,
    now: u64,
) -> Result<Option<u64>, Status> {
    let due = match (at, millis("delay", delay)?) {
        (Some(_), Some(_)) => {
            return Err(Status::invalid_argument(
                "a message may set deliver_time or delay, not both",
            ));
        }
        (Some(at), None) => {
            if at.seconds < 0 || !(0..1_000_000_000).contains(&at.nanos) {
                return Err(Status::invalid_argument(
                    "deliver_time must be a valid time after 1970",
                ));
            }
            at.seconds as u64 * 1000 + at.nanos as u64 / 1_000_000
        }
        (None, Some(delay)) => now.saturating_add(delay),
        (None, None) => return Ok(None),
    };
    if due > now.saturating_add(MAX_TTL_MS) {
        return Err(Status::invalid_argument(format!(
            "the message is due {} ms from now: at most 100 years ahead",
            due - now
        )));
    }
    Ok((due > now).then_some(due))
}

/// A stored message as clients see it: its reserved attributes become its times.
pub fn message(m: &Message) -> pb::Message {
    let time = |name: &str| {
        (m.attributes.get(name))
            .and_then(|t| t.parse().ok())
            .map(timestamp)
    };
    pb::Message {
        expire_time: time(EXPIRE_AT),
        deliver_time: time(DELIVER_AT),
        payload: m.payload.clone(),
        attributes: m
            .attributes
            .iter()
            .filter(|(name, _)| *name != EXPIRE_AT && *name != DELIVER_AT)
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect(),
        key: m.key.clone(),
        id: m.id.clone(),
        sequence: m.sequence,
        publish_time: Some(timestamp(m.publish_time_ms)),
    }
}

/// A delivery as a subscribe stream sends it.
pub fn delivery(d: Delivery) -> pb::Delivery {
    pb::Delivery {
        message: Some(message(&d.message)),
        ack_id: d.ack_id,
        attempt: d.attempt,
        channel: d.channel.to_string(),
    }
}

/// What became of one ack id, as the consumer is told.
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

/// A consumer's window as its request gives it (none given: all zero).
pub fn window(w: Option<pb::FlowControl>) -> Window {
    let w = w.unwrap_or_default();
    Window {
        max_messages: w.max_messages,
        max_bytes: w.max_bytes,
    }
}

/// A window as the wire carries it.
pub fn flow_control(w: Window) -> pb::FlowControl {
    pb::FlowControl {
        max_messages: w.max_messages,
        max_bytes: w.max_bytes,
    }
}

/// Milliseconds since the epoch as a protobuf timestamp.
pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// A duration as protobuf carries it.
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A duration field of a request in milliseconds (absent: `None`); `field` names it in the
/// error.
fn millis(field: &str, d: Option<prost_types::Duration>) -> Result<Option<u64>, Status> {
    let Some(d) = d else {
        return Ok(None);
    };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(Status::invalid_argument(format!(
            "{field} must not be negative"
        )));
    }
    (d.seconds as u64)
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(d.nanos as u64 / 1_000_000))
        .map(Some)
        .ok_or_else(|| Status::invalid_argument(format!("{field} is out of range")))
}

/// A subscription's settings from a create or update request. The broker checks them.
pub fn subscription_settings(
    request: &pb::CreateSubscriptionRequest,
) -> Result<SubscriptionSettings, Status> {
    let retry = match &request.retry {
        None => RetryPolicy::default(),
        Some(policy) => RetryPolicy {
            initial_ms: millis("retry.initial", policy.initial)?
                .unwrap_or(DEFAULT_RETRY_INITIAL.as_millis() as u64),
            maximum_ms: millis("retry.maximum", policy.maximum)?
                .unwrap_or(DEFAULT_RETRY_MAXIMUM.as_millis() as u64),
            multiplier: match policy.multiplier {
                0.0 => DEFAULT_RETRY_MULTIPLIER,
                m => m,
            },
            jitter: policy.jitter,
        },
    };
    Ok(SubscriptionSettings {
        ack_deadline_ms: millis("ack_deadline", request.ack_deadline)?
            .unwrap_or(DEFAULT_ACK_DEADLINE_MS),
        retry,
        max_delivery_attempts: request.max_delivery_attempts,
        dead_letter_channel: Some(request.dead_letter_channel.clone()).filter(|c| !c.is_empty()),
        ordering: !request.disable_ordering,
        filter: Some(request.filter.clone()).filter(|f| !f.is_empty()),
    })
}

/// A channel's settings from a create or update request.
pub fn channel_settings(request: &pb::CreateChannelRequest) -> Result<ChannelSettings, Status> {
    let retention = match request.retention {
        None => Retention::default(),
        Some(r) => Retention {
            max_age_ms: millis("retention.max_age", r.max_age)?.unwrap_or(0),
            max_bytes: r.max_bytes,
        },
    };
    Ok(ChannelSettings {
        retention,
        dedup_window_ms: millis("dedup_window", request.dedup_window)?
            .unwrap_or(DEFAULT_DEDUP_WINDOW_MS),
        default_ttl_ms: millis("default_ttl", request.default_ttl)?.unwrap_or(0),
        limits: request
            .limits
            .map_or_else(ChannelLimits::default, |l| ChannelLimits {
                max_messages: l.max_messages,
                max_bytes: l.max_bytes,
                policy: match l.policy() {
                    pb::LimitPolicy::Reject => LimitPolicy::Reject,
                    pb::LimitPolicy::DropOldest => LimitPolicy::DropOldest,
                },
            }),
    })
}

/// A publish confirmation.
pub fn published(appended: &Appended) -> pb::PublishResponse {
    let sequences = appended.sequences();
    let mut duplicate = Vec::new();
    if !appended.duplicates.is_empty() {
        duplicate = vec![false; sequences.len()];
        for &(at, _) in &appended.duplicates {
            duplicate[at] = true;
        }
    }
    let mut delayed = Vec::new();
    if !appended.delayed.is_empty() {
        delayed = vec![false; sequences.len()];
        for &at in &appended.delayed {
            delayed[at] = true;
        }
    }
    pb::PublishResponse {
        sequences,
        duplicate,
        delayed,
    }
}

fn retention_info(r: Retention) -> Option<pb::Retention> {
    r.keeps().then(|| pb::Retention {
        max_age: (r.max_age_ms > 0).then(|| duration(Duration::from_millis(r.max_age_ms))),
        max_bytes: r.max_bytes,
    })
}

/// A position from a request (absent: the latest end).
pub fn position(p: Option<pb::Position>) -> Result<Point, Status> {
    use pb::position::At;
    Ok(match p.and_then(|p| p.at) {
        None => Point::Latest,
        Some(At::Edge(edge)) => match pb::Edge::try_from(edge) {
            Ok(pb::Edge::Latest) => Point::Latest,
            Ok(pb::Edge::Earliest) => Point::Earliest,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "position.edge {edge} is not EDGE_LATEST (0) or EDGE_EARLIEST (1)"
                )));
            }
        },
        Some(At::Sequence(seq)) => Point::Sequence(seq),
        Some(At::Subscription(name)) => Point::Subscription(name),
        Some(At::Time(t)) => {
            if t.seconds < 0 || !(0..1_000_000_000).contains(&t.nanos) {
                return Err(Status::invalid_argument(
                    "position.time must be a valid time after 1970",
                ));
            }
            let ms = (t.seconds as u64)
                .checked_mul(1000)
                .ok_or_else(|| Status::invalid_argument("position.time is too far away"))?;
            Point::Time(ms + t.nanos as u64 / 1_000_000)
        }
    })
}

/// A nack request's options.
pub fn nack(request: &pb::Nack) -> Result<Nack, Status> {
    Ok(Nack {
        delay: millis("delay", request.delay)?.map(Duration::from_millis),
        reason: request.reason.clone(),
        terminal: request.terminal,
    })
}

fn retry_policy(policy: &RetryPolicy) -> Option<pb::RetryPolicy> {
    (policy.initial_ms > 0).then(|| pb::RetryPolicy {
        initial: Some(duration(Duration::from_millis(policy.initial_ms))),
        maximum: Some(duration(Duration::from_millis(policy.maximum_ms))),
        multiplier: policy.multiplier,
        jitter: policy.jitter,
    })
}

/// A subscription's settings and figures, as Admin reports them.
pub fn subscription_info(channel: &str, s: SubscriptionStats) -> pb::SubscriptionInfo {
    let oldest = s.oldest_unacked_publish_time_ms;
    let now_ms = UNIX_EPOCH.elapsed().map_or(0, |d| d.as_millis() as u64);
    pb::SubscriptionInfo {
        channel: channel.to_owned(),
        ack_deadline: Some(duration(Duration::from_millis(s.settings.ack_deadline_ms))),
        retry: retry_policy(&s.settings.retry),
        max_delivery_attempts: s.settings.max_delivery_attempts,
        dead_letter_channel: s.dead_letter_channel.unwrap_or_default(),
        ordering: s.settings.ordering,
        filter: s.filter,
        filtered: s.filtered,
        channels: s.channels,
        delivered: s.delivered,
        redelivered: s.redelivered,
        nacked: s.nacked,
        dead_lettered: s.dead_lettered,
        discarded: s.discarded,
        waiting_retry: s.waiting_retry,
        keys_blocked: s.keys_blocked,
        expired: s.expired,
        name: s.name,
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

/// A channel's settings and figures, as Admin reports them.
pub fn channel_info(c: ChannelInfo) -> pb::ChannelInfo {
    let name = c.name;
    pb::ChannelInfo {
        retention: retention_info(c.settings.retention),
        dedup_window: Some(duration(Duration::from_millis(c.settings.dedup_window_ms))),
        default_ttl: (c.settings.default_ttl_ms > 0)
            .then(|| duration(Duration::from_millis(c.settings.default_ttl_ms))),
        retained_bytes: c.retained_bytes,
        delayed: c.delayed,
        delayed_bytes: c.delayed_bytes,
        dropped: c.dropped,
        limits: c.settings.limits.any().then_some(pb::Limits {
            max_messages: c.settings.limits.max_messages,
            max_bytes: c.settings.limits.max_bytes,
            policy: match c.settings.limits.policy {
                LimitPolicy::Reject => pb::LimitPolicy::Reject,
                LimitPolicy::DropOldest => pb::LimitPolicy::DropOldest,
            } as i32,
        }),
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

/// A derived channel as a client declares it.
pub fn derived_spec(d: pb::DerivedChannel) -> DerivedSpec {
    DerivedSpec {
        source: d.source,
        target: d.target,
        filter: Some(d.filter).filter(|f| !f.is_empty()),
        reshape: Reshape {
            keep: d.keep,
            drop: d.drop,
            rename: d.rename.into_iter().collect(),
            set: d.set.into_iter().collect(),
            key_from: Some(d.key_from).filter(|k| !k.is_empty()),
        },
    }
}

/// A derived channel's definition and state, as Admin reports them.
pub fn derived_info(info: DerivedInfo) -> pb::DerivedInfo {
    let spec = info.spec;
    pb::DerivedInfo {
        channel: Some(pb::DerivedChannel {
            source: spec.source,
            target: spec.target,
            filter: spec.filter.unwrap_or_default(),
            keep: spec.reshape.keep,
            drop: spec.reshape.drop,
            rename: spec.reshape.rename.into_iter().collect(),
            set: spec.reshape.set.into_iter().collect(),
            key_from: spec.reshape.key_from.unwrap_or_default(),
        }),
        lag: info.lag,
        processed: info.processed,
        derived: info.derived,
    }
}

/// One step of a configuration plan, as Admin reports it.
pub fn config_step(step: ferry_core::broker::Step) -> pb::ConfigStep {
    use ferry_core::broker::Action;
    let action = match step.action {
        Action::Create => pb::ConfigAction::Create,
        Action::Change => pb::ConfigAction::Change,
        Action::Keep => pb::ConfigAction::Keep,
        Action::Refuse => pb::ConfigAction::Refuse,
    };
    pb::ConfigStep {
        action: action as i32,
        object: step.object,
        detail: step.detail,
    }
}
