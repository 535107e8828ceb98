//! The Prometheus endpoint (`[metrics] listen`): `GET /metrics` answers the OpenMetrics text
//! format, built at each scrape from the broker's own figures (the same ones Admin shows), so
//! nothing on the message path pays for it.
//!
//! Names follow Prometheus conventions (`ferry_` prefix, base units, `_total` for counters).
//! Series: a handful per channel, per subscription and per derived channel, so their number
//! grows with the channels and subscriptions an operator creates, never with traffic (no
//! label carries a message, key, consumer or client).

use std::time::{SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use ferry_core::Broker;

use crate::activity::{Activity, Open};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

type Labels = Vec<(String, String)>;

/// At most this many scrapes are answered at once; a connection past them is closed.
const SCRAPES: usize = 16;

/// Serves scrapes until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    activity: Arc<Activity>,
    stop: CancellationToken,
) {
    let scrapes = std::sync::Arc::new(tokio::sync::Semaphore::new(SCRAPES));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => match scrapes.clone().try_acquire_owned() {
                Ok(permit) => {
                    let (broker, activity) = (broker.clone(), activity.clone());
                    tokio::spawn(async move {
                        answer(stream, broker, activity).await;
                        drop(permit);
                    });
                }
                Err(_) => tracing::warn!(
                    "metrics endpoint: {SCRAPES} scrapes at once already; connection closed"
                ),
            },
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: cannot accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Answers one HTTP/1.1 request and closes the connection.
async fn answer(mut stream: TcpStream, broker: Broker, activity: Arc<Activity>) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    // The request head only (a scrape has no body); at most 8 KiB of it, within 5 s.
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    if !matches!(read, Ok(true)) {
        return;
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let (status, kind, body) = if line.starts_with(b"GET /metrics ") {
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(&broker, &activity).await,
        )
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "ferry serves its metrics at GET /metrics\n".to_owned(),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A family of gauges or counters registered under `name`.
fn family<
    M: prometheus_client::metrics::TypedMetric
        + Default
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
>(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> Family<Labels, M>
where
    Family<Labels, M>: prometheus_client::registry::Metric,
{
    let family = Family::<Labels, M>::default();
    registry.register(name, help, family.clone());
    family
}

fn set(family: &Family<Labels, Gauge>, labels: &Labels, value: u64) {
    family
        .get_or_create(labels)
        .set(i64::try_from(value).unwrap_or(i64::MAX));
}

fn count(family: &Family<Labels, Counter>, labels: &Labels, value: u64) {
    family.get_or_create(labels).inc_by(value);
}

/// The whole exposition, from the broker's figures now.
pub async fn render(broker: &Broker, activity: &Activity) -> String {
    let mut registry = Registry::default();
    channels(&mut registry, broker).await;
    derived(&mut registry, broker);
    latencies(&mut registry, broker);
    calls(&mut registry, activity);
    store(&mut registry, broker);
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &registry) {
        tracing::warn!(error = %e, "cannot encode the metrics");
    }
    out
}

/// Each channel's figures, and each of its subscriptions'.
async fn channels(reg: &mut Registry, broker: &Broker) {
    let messages = family::<Gauge>(reg, "ferry_channel_messages", "Messages a channel stores");
    let bytes = family::<Gauge>(reg, "ferry_channel_bytes", "Bytes a channel's records take");
    let published = family::<Counter>(
        reg,
        "ferry_channel_published",
        "Messages appended to a channel (its last sequence)",
    );
    let delayed = family::<Gauge>(
        reg,
        "ferry_channel_delayed_messages",
        "Delayed messages kept aside until due",
    );
    let dropped = family::<Counter>(
        reg,
        "ferry_channel_dropped",
        "Messages dropped to keep a channel within its limits",
    );
    let subscriptions = SubscriptionFamilies::new(reg);
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for channel in broker.list_channels().await {
        let labels = vec![("channel".to_owned(), channel.name.clone())];
        set(&messages, &labels, channel.messages);
        set(&bytes, &labels, channel.bytes);
        count(&published, &labels, channel.next_sequence.saturating_sub(1));
        set(&delayed, &labels, channel.delayed);
        count(&dropped, &labels, channel.dropped);
        for s in &channel.subscriptions {
            subscriptions.record(&channel.name, s, now_ms);
        }
    }
}

/// The per-subscription families.
struct SubscriptionFamilies {
    backlog: Family<Labels, Gauge>,
    in_flight: Family<Labels, Gauge>,
    unacked: Family<Labels, Gauge>,
    acked: Family<Labels, Counter>,
    delivered: Family<Labels, Counter>,
    redelivered: Family<Labels, Counter>,
    nacked: Family<Labels, Counter>,
    dead: Family<Labels, Counter>,
    expired: Family<Labels, Counter>,
    filtered: Family<Labels, Counter>,
    consumers: Family<Labels, Gauge>,
    oldest: Family<Labels, Gauge>,
}

impl SubscriptionFamilies {
    fn new(reg: &mut Registry) -> Self {
        SubscriptionFamilies {
            backlog: family::<Gauge>(
                reg,
                "ferry_subscription_backlog_messages",
                "Messages waiting to be delivered",
            ),
            in_flight: family::<Gauge>(
                reg,
                "ferry_subscription_in_flight_messages",
                "Deliveries not acked yet",
            ),
            unacked: family::<Gauge>(
                reg,
                "ferry_subscription_unacked_messages",
                "Messages not acked yet",
            ),
            acked: family::<Counter>(reg, "ferry_subscription_acked", "Messages acked"),
            delivered: family::<Counter>(
                reg,
                "ferry_subscription_delivered",
                "Deliveries made, first or not, since start",
            ),
            redelivered: family::<Counter>(
                reg,
                "ferry_subscription_redelivered",
                "Deliveries after the first, since start",
            ),
            nacked: family::<Counter>(reg, "ferry_subscription_nacked", "Nacks, since start"),
            dead: family::<Counter>(
                reg,
                "ferry_subscription_dead_lettered",
                "Messages dead-lettered, since start",
            ),
            expired: family::<Counter>(
                reg,
                "ferry_subscription_expired",
                "Messages expired before delivery, since start",
            ),
            filtered: family::<Counter>(
                reg,
                "ferry_subscription_filtered",
                "Messages a filter kept from the subscription, since start",
            ),
            consumers: family::<Gauge>(reg, "ferry_subscription_consumers", "Consumers attached"),
            oldest: family::<Gauge>(
                reg,
                "ferry_subscription_oldest_unacked_age_seconds",
                "Age of the oldest unacked message",
            ),
        }
    }

    /// One subscription of `channel`; `now_ms` dates its oldest unacked message.
    fn record(&self, channel: &str, s: &ferry_core::SubscriptionStats, now_ms: u64) {
        let labels = vec![
            ("channel".to_owned(), channel.to_owned()),
            ("subscription".to_owned(), s.name.clone()),
        ];
        set(&self.backlog, &labels, s.backlog);
        set(&self.in_flight, &labels, s.in_flight);
        set(&self.unacked, &labels, s.unacked);
        count(&self.acked, &labels, s.acked);
        count(&self.delivered, &labels, s.delivered);
        count(&self.redelivered, &labels, s.redelivered);
        count(&self.nacked, &labels, s.nacked);
        count(&self.dead, &labels, s.dead_lettered);
        count(&self.expired, &labels, s.expired);
        count(&self.filtered, &labels, s.filtered);
        set(&self.consumers, &labels, u64::from(s.consumers));
        let age = s
            .oldest_unacked_publish_time_ms
            .map_or(0, |t| now_ms.saturating_sub(t) / 1000);
        set(&self.oldest, &labels, age);
    }
}

/// How far each derived channel lags its source.
fn derived(reg: &mut Registry, broker: &Broker) {
    let lag = family::<Gauge>(
        reg,
        "ferry_derived_lag_messages",
        "Source messages a derived channel has not processed",
    );
    for d in broker.list_derived() {
        let labels = vec![
            ("source".to_owned(), d.spec.source.clone()),
            ("target".to_owned(), d.spec.target.clone()),
        ];
        set(&lag, &labels, d.lag);
    }
}

/// The latency histograms of publishing, delivery and the store's commits.
fn latencies(reg: &mut Registry, broker: &Broker) {
    let latencies = broker.latencies();
    reg.register(
        "ferry_publish_latency_seconds",
        "From a publish request being queued to its batch being durable",
        latencies.publish.clone(),
    );
    reg.register(
        "ferry_delivery_latency_seconds",
        "From a message's publish time to its first delivery",
        latencies.delivery.clone(),
    );
    reg.register(
        "ferry_commit_latency_seconds",
        "From the store's writer taking a group commit to it being durable (its answers go out then)",
        latencies.commit.clone(),
    );
    reg.register(
        "ferry_sync_latency_seconds",
        "The device sync (fdatasync) of the segment log in each commit",
        latencies.sync.clone(),
    );
    reg.register(
        "ferry_commit_messages",
        "Messages per group commit",
        latencies.group_messages.clone(),
    );
}

/// Connections and streaming calls open now.
fn calls(reg: &mut Registry, activity: &Activity) {
    let connections = Gauge::<i64>::default();
    reg.register(
        "ferry_connections",
        "Client connections open now",
        connections.clone(),
    );
    connections.set(i64::try_from(activity.now(Open::Connection)).unwrap_or(i64::MAX));
    let streams = family::<Gauge>(reg, "ferry_streams", "Streaming calls open now, by kind");
    for (kind, what) in [
        ("publish", Open::PublishStream),
        ("subscribe", Open::SubscribeStream),
    ] {
        set(
            &streams,
            &vec![("kind".to_owned(), kind.to_owned())],
            activity.now(what),
        );
    }
}

/// What the store has done since start.
fn store(reg: &mut Registry, broker: &Broker) {
    let store = family::<Counter>(
        reg,
        "ferry_store_operations",
        "What the store has done since start, by kind",
    );
    let counters = broker.store_counters();
    for (kind, value) in [
        ("commit", counters.commits),
        ("device_sync", counters.device_syncs),
        ("message", counters.messages),
        ("ack_state", counters.ack_states),
        ("checkpoint", counters.checkpoints),
    ] {
        count(&store, &vec![("kind".to_owned(), kind.to_owned())], value);
    }
}
