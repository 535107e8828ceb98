//! The memory scenario: what misbehaving clients and idle channels make the broker hold, against
//! the memory budget its configuration sets.
//!
//! Each of its three phases runs on a freshly restarted broker process (same data directory and
//! configuration), so that the peak it reports, the kernel's VmHWM, is that phase's alone:
//!
//! 1. a consumer attaches with the largest window (100,000 messages, 1 GiB) and never reads its
//!    stream, while 10,000 msgs/s of 1 KiB are published with a 2 s ack deadline, so that every
//!    delivery it holds expires and is offered again and again;
//! 2. 48 channels are each filled with 20 MiB that nobody reads;
//! 3. 800 messages with 10,000 attributes each are published, then consumed and acked.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use ferry_proto::pb::{
    self, publisher_client::PublisherClient, subscribe_request::Request as SubscribeReq,
    subscriber_client::SubscriberClient,
};
use tokio::sync::mpsc;
use tokio::time::{self, Instant};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    Bench, BenchError, BrokerChild, Consumer, DrainPlan, KIB, Payload, PublishPlan, Result,
    SUBSCRIPTION, fixed_goal, mib, publish, thousands,
};

/// Phase 1: the publish rate, the stuck consumer's window and the subscription's ack deadline.
const STUCK_RATE: u64 = 10_000;
const STUCK_WINDOW: u32 = 100_000;
const STUCK_DEADLINE: Duration = Duration::from_secs(2);
/// Phase 2: channels and what each holds.
const LAGGING_CHANNELS: usize = 48;
const LAGGING_BYTES: u64 = 20 << 20;
/// Phase 3: messages and attributes per message.
const WIDE_MESSAGES: usize = 800;
const WIDE_ATTRIBUTES: usize = 10_000;
/// What the broker may hold beyond its message cache (the target).
const HEADROOM: u64 = 64 << 20;

/// Runs the scenario on the bench's own broker; with `--addr` it cannot see the broker's memory
/// and says so.
pub(super) async fn memory_scenario(
    bench: &Bench<'_>,
    broker: Option<&mut BrokerChild>,
) -> Result<()> {
    let (Some(broker), Some(config)) = (broker, bench.config) else {
        println!("memory: skipped: it needs the bench's own broker (not --addr)");
        return Ok(());
    };
    let budget = config.storage.message_cache.0;
    println!(
        "{:<32}: message_cache {}, consumer_queue {}, consumer_stall_timeout {:?}",
        "memory   budget",
        mib(budget),
        mib(config.limits.consumer_queue.0),
        config.limits.consumer_stall_timeout.0,
    );
    let target = budget + HEADROOM;
    let mut worst = 0;

    let ((published, left), peak) = {
        let broker = &mut *broker;
        broker.restart().await?;
        let outcome = stuck_consumer(bench, broker).await?;
        (outcome, peak_bytes(broker)?)
    };
    worst = worst.max(peak);
    println!(
        "{:<32}: {}  ({} msgs published at {} msgs/s, window {}, ack deadline {} s; RSS {} once it left)",
        "memory   stuck consumer",
        mib(peak),
        thousands(published),
        thousands(STUCK_RATE),
        thousands(u64::from(STUCK_WINDOW)),
        STUCK_DEADLINE.as_secs(),
        mib(left)
    );

    let (stored, peak) = on_fresh_broker(broker, lagging_channels(bench)).await?;
    worst = worst.max(peak);
    println!(
        "{:<32}: {}  ({LAGGING_CHANNELS} channels, {} stored, nobody reading)",
        "memory   lagging channels",
        mib(peak),
        mib(stored)
    );

    let (after, peak) = {
        let broker = &mut *broker;
        broker.restart().await?;
        let after = wide_messages(bench, broker).await?;
        (after, peak_bytes(broker)?)
    };
    worst = worst.max(peak);
    println!(
        "{:<32}: {}  ({WIDE_MESSAGES} msgs of {} attributes; RSS {} once consumed and acked)",
        "memory   wide messages",
        mib(peak),
        thousands(WIDE_ATTRIBUTES as u64),
        mib(after)
    );
    println!(
        "{:<32}: {}  (target: at most message_cache + {} = {}: {})",
        "memory   worst peak RSS",
        mib(worst),
        mib(HEADROOM),
        mib(target),
        if worst <= target { "met" } else { "NOT met" }
    );
    Ok(())
}

/// Restarts the broker, runs `work` and returns its outcome with the new process's peak RSS
/// (bytes).
async fn on_fresh_broker<T>(
    broker: &mut BrokerChild,
    work: impl Future<Output = Result<T>>,
) -> Result<(T, u64)> {
    broker.restart().await?;
    let outcome = work.await?;
    Ok((outcome, peak_bytes(broker)?))
}

fn peak_bytes(broker: &BrokerChild) -> Result<u64> {
    broker
        .memory()
        .map(|memory| memory.peak_kib * 1024)
        .map_err(|e| format!("cannot read the broker's memory: {e}").into())
}

fn rss_bytes(broker: &BrokerChild) -> Result<u64> {
    broker
        .memory()
        .map(|memory| memory.now_kib * 1024)
        .map_err(|e| format!("cannot read the broker's memory: {e}").into())
}

/// Phase 1; returns how many messages were published while the consumer did not read, and the
/// broker's RSS (bytes) a second after it left.
async fn stuck_consumer(bench: &Bench<'_>, broker: &BrokerChild) -> Result<(u64, u64)> {
    let args = bench.args;
    let channel = bench
        .fresh_channel_with("mem.stuck", Some(STUCK_DEADLINE))
        .await?;
    let (requests, outbound) = mpsc::channel(1);
    let attach = pb::SubscribeRequest {
        request: Some(SubscribeReq::Attach(pb::Attach {
            channel: channel.clone(),
            subscription: SUBSCRIPTION.to_owned(),
            window: Some(pb::FlowControl {
                max_messages: STUCK_WINDOW,
                max_bytes: 1 << 30,
            }),
        })),
    };
    requests
        .send(attach)
        .await
        .map_err(|_| "cannot queue the attach request")?;
    // Held, never read, until the phase ends.
    let mut stuck = SubscriberClient::new(bench.connect().await?)
        .subscribe(ReceiverStream::new(outbound))
        .await
        .map_err(|s| BenchError::status("cannot attach the stuck consumer", &s))?
        .into_inner();
    stuck
        .message()
        .await
        .map_err(|s| BenchError::status("the stuck consumer's attach failed", &s))?;

    let published = publish(
        bench.connect().await?,
        PublishPlan {
            channel: channel.clone(),
            limit: args.messages,
            deadline: bench.deadline(Instant::now()),
            batch: 1,
            in_flight: 256,
            rate: Some(STUCK_RATE),
            payload: Payload::Fixed(Bytes::from(vec![b's'; KIB])),
            keys: 0,
            ids: false,
            delay: None,
            tag: false,
        },
    )
    .await?;
    drop((stuck, requests));
    time::sleep(Duration::from_secs(1)).await;
    let left = rss_bytes(broker)?;
    bench.remove_channel(&channel).await;
    Ok((published.confirmed, left))
}

/// Phase 2; returns the bytes stored.
async fn lagging_channels(bench: &Bench<'_>) -> Result<u64> {
    let deadline = bench.deadline(Instant::now());
    let mut channels = Vec::with_capacity(LAGGING_CHANNELS);
    let mut stored = 0;
    for i in 0..LAGGING_CHANNELS {
        let channel = bench.fresh_channel(&format!("mem.lag{i}")).await?;
        let filled = bench
            .fill(&channel, LAGGING_BYTES / KIB as u64, KIB, deadline)
            .await?;
        stored += filled.confirmed * KIB as u64;
        channels.push(channel);
        if Instant::now() >= deadline {
            break;
        }
    }
    for channel in &channels {
        bench.remove_channel(channel).await;
    }
    Ok(stored)
}

/// Phase 3; returns the broker's RSS (bytes) once everything was consumed and acked.
async fn wide_messages(bench: &Bench<'_>, broker: &BrokerChild) -> Result<u64> {
    let channel = bench.fresh_channel("mem.wide").await?;
    let attributes: std::collections::HashMap<String, String> = (0..WIDE_ATTRIBUTES)
        .map(|i| (format!("a{i}"), "v".to_owned()))
        .collect();
    let message = pb::OutgoingMessage {
        payload: Bytes::from_static(b"wide"),
        attributes,
        ..Default::default()
    };
    let mut publisher = PublisherClient::new(bench.connect().await?);
    // 40 messages of ~90 KiB stay under the default 4 MiB batch limit.
    for _ in 0..WIDE_MESSAGES / 40 {
        let request = pb::PublishRequest {
            channel: channel.clone(),
            messages: vec![message.clone(); 40],
        };
        publisher
            .publish(request)
            .await
            .map_err(|s| BenchError::status("cannot publish wide messages", &s))?;
    }
    let consumer = Consumer::attach(bench.connect().await?, &channel, 64).await?;
    let consumed = consumer
        .drain(DrainPlan {
            goal: fixed_goal(WIDE_MESSAGES as u64),
            deadline: bench.deadline(Instant::now()),
            stamps: None,
        })
        .await?;
    if consumed.acked < WIDE_MESSAGES as u64 {
        return Err(format!(
            "only {} of {WIDE_MESSAGES} wide messages were consumed",
            consumed.acked
        )
        .into());
    }
    // Collection follows the acks' commit.
    time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes(broker)?;
    bench.remove_channel(&channel).await;
    Ok(after)
}
