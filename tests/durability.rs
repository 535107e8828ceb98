//! Durability through the real binary: graceful restarts and `kill -9` crashes on the same data
//! directory. What a publish or an ack confirmation promises must hold across both.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Consumer, Daemon, Options, Rng, ack_ids, connect, message, sequences};
use ferry_proto::pb::{
    self, subscribe_request::Request as Req, subscribe_response::Response as Resp,
};
use tokio_stream::wrappers::ReceiverStream;

#[tokio::test]
async fn after_a_restart_exactly_the_unacked_half_comes_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_in(dir.path(), Options::default()).await;
    daemon.create("ledger", &[("reader", 60_000)]).await;
    for batch in 0..100u64 {
        daemon
            .publish(
                "ledger",
                (0..100u64).map(|i| (batch * 100 + i).to_le_bytes().to_vec()),
            )
            .await;
    }

    let mut consumer = Consumer::attach(&daemon, "ledger", "reader", 10_000).await;
    let deliveries = consumer.take(10_000).await;
    assert_eq!(sequences(&deliveries), (1..=10_000).collect::<Vec<_>>());
    let (even, _odd): (Vec<_>, Vec<_>) = deliveries
        .into_iter()
        .partition(|d| d.message.as_ref().unwrap().sequence % 2 == 0);
    for chunk in even.chunks(500) {
        assert!(
            consumer
                .ack(ack_ids(chunk))
                .await
                .iter()
                .all(|s| *s == pb::AckStatus::Ok)
        );
    }
    drop(consumer);
    daemon.stop().await;

    let daemon = Daemon::start_in(dir.path(), Options::default()).await;
    let info = daemon.subscription("ledger", "reader").await;
    assert_eq!((info.acked, info.unacked), (5_000, 5_000));
    let mut consumer = Consumer::attach(&daemon, "ledger", "reader", 10_000).await;
    let again = consumer.take(5_000).await;
    assert_eq!(
        sequences(&again),
        (1..=10_000).step_by(2).collect::<Vec<_>>(),
        "exactly the odd half, in order"
    );
    for d in &again {
        let seq = d.message.as_ref().unwrap().sequence;
        assert_eq!(
            d.message.as_ref().unwrap().payload.as_ref(),
            (seq - 1).to_le_bytes(),
            "payload of {seq}"
        );
    }
    assert!(
        consumer
            .take_for(Duration::from_millis(300))
            .await
            .is_empty()
    );
    consumer.ack(ack_ids(&again)).await;
    drop(consumer);
    daemon.stop().await;
}

#[tokio::test]
async fn large_messages_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_in(dir.path(), Options::default()).await;
    daemon.create("blobs", &[("s", 60_000)]).await;
    // Up to the default 1 MiB limit (payload, key, id and attributes together).
    let sizes = [1 << 20, 700_000, 200_000, 64 * 1024, 1];
    let payloads: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| vec![i as u8 + 1; *n])
        .collect();
    for payload in &payloads {
        daemon.publish("blobs", [payload.clone()]).await;
    }
    daemon.kill().await;

    let daemon = Daemon::start_in(dir.path(), Options::default()).await;
    let mut consumer = Consumer::attach(&daemon, "blobs", "s", 10).await;
    let got = consumer.take(payloads.len()).await;
    for (delivery, payload) in got.iter().zip(&payloads) {
        assert_eq!(
            delivery.message.as_ref().unwrap().payload.as_ref(),
            payload.as_slice()
        );
    }
    drop(consumer);
    daemon.stop().await;
}

/// What the crash test's clients observed, across all cycles.
#[derive(Default)]
struct Ledger {
    /// Sequences whose publish was confirmed.
    confirmed: BTreeSet<u64>,
    /// Sequences whose ack was confirmed OK (to the client: some acks become durable with their
    /// confirmation lost in a kill).
    acked: BTreeSet<u64>,
    /// Deliveries of a sequence whose ack had been confirmed before.
    violations: Vec<u64>,
    /// Every sequence ever delivered.
    seen: BTreeSet<u64>,
    deliveries: u64,
    redeliveries: u64,
}

#[tokio::test]
async fn confirmed_messages_and_acks_survive_repeated_kill_9() {
    let cycles: u64 = std::env::var("FERRY_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut rng = Rng::from_env("crash");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        // Small segments, so that kills also land while segment files are started and deleted.
        "[storage]\nsegment_size = \"1MiB\"\n\n\
         [[channels]]\nname = \"crash\"\n[[channels.subscriptions]]\nname = \"s\"\nack_deadline = \"2s\"\n",
    )
    .unwrap();
    let options = Options {
        config: Some(config),
        ..Options::default()
    };
    let ledger = Arc::new(Mutex::new(Ledger::default()));

    for _ in 0..cycles {
        let daemon = Daemon::start_in(dir.path(), options.clone()).await;
        let publishers: Vec<_> = (0..2)
            .map(|_| tokio::spawn(publish_until_refused(daemon.url.clone(), ledger.clone())))
            .collect();
        let consumer = tokio::spawn(consume_until_refused(daemon.url.clone(), ledger.clone()));
        tokio::time::sleep(Duration::from_millis(rng.range(150..700))).await;
        daemon.kill().await;
        for task in publishers {
            task.await.unwrap();
        }
        consumer.await.unwrap();
    }

    // Last start: no more publishing; drain until everything confirmed has been acked.
    let daemon = Daemon::start_in(dir.path(), options).await;
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        // Consume until idle at least once: batches that were durable but never confirmed
        // before a kill are delivered too, and must be acked like the rest.
        loop {
            consume_until_refused_or_idle(daemon.url.clone(), ledger.clone()).await;
            let done = {
                let ledger = ledger.lock().unwrap();
                ledger.confirmed.is_subset(&ledger.seen)
            };
            if done {
                break;
            }
        }
    })
    .await;
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    println!(
        "crash: {cycles} kills, {} confirmed publishes, {} confirmed acks, {} deliveries, {} redeliveries",
        ledger.confirmed.len(),
        ledger.acked.len(),
        ledger.deliveries,
        ledger.redeliveries
    );
    assert!(
        ledger.confirmed.len() > 100,
        "the test published too little to mean anything"
    );
    assert!(
        ledger.violations.is_empty(),
        "messages delivered again after a confirmed ack: {:?}",
        ledger.violations
    );
    // An ack can become durable with its confirmation lost in the kill, so "acked" is judged by
    // the broker's final state; "not lost" is judged by every confirmed message having been
    // delivered at least once.
    let missing: Vec<_> = ledger.confirmed.difference(&ledger.seen).take(20).collect();
    let channel = daemon
        .admin()
        .await
        .get_channel(pb::GetChannelRequest {
            name: "crash".into(),
        })
        .await;
    let channel = channel.unwrap().into_inner();
    let sub = &channel.subscriptions[0];
    let last_confirmed = ledger.confirmed.last().copied().unwrap_or(0);
    if drained.is_err()
        || !missing.is_empty()
        || sub.unacked != 0
        || sub.ack_floor <= last_confirmed
    {
        let kept = dir.keep();
        panic!(
            "confirmed messages never delivered: {missing:?}; drained in time: {}; channel: {channel:?}; \
             data kept in {}; log:\n{}",
            drained.is_ok(),
            kept.display(),
            std::fs::read_to_string(&daemon.log).unwrap_or_default()
        );
    }
    // Everything is acked, so the segment files (1 MiB each, dozens written) are deleted but for
    // the one being appended to and one that a crash may have left for the next start.
    let segments = dir.path().join("data/segments");
    let files = || std::fs::read_dir(&segments).map_or(usize::MAX, |d| d.count());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while files() > 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        files() <= 2,
        "{} segment files left after everything was acked",
        files()
    );
    daemon.stop().await;
}

/// Publishes batches over a stream until the broker goes away, recording confirmations.
async fn publish_until_refused(url: String, ledger: Arc<Mutex<Ledger>>) {
    let Some(channel) = connect(&url).await else {
        return;
    };
    let mut client = pb::publisher_client::PublisherClient::new(channel);
    let (requests, rx) = tokio::sync::mpsc::channel(64);
    let Ok(response) = client.publish_stream(ReceiverStream::new(rx)).await else {
        return;
    };
    let mut responses = response.into_inner();
    // Paced, so that the consumer keeps up and kills land while batches are in flight.
    let feeder = tokio::spawn(async move {
        for i in 0u64..1000 {
            let messages = (0..10)
                .map(|j| {
                    let mut payload = (i * 10 + j).to_le_bytes().to_vec();
                    payload.resize(512, 0xAB);
                    message(payload, &[], "")
                })
                .collect();
            if requests
                .send(pb::PublishRequest {
                    channel: "crash".into(),
                    messages,
                })
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    while let Ok(Some(response)) = responses.message().await {
        ledger.lock().unwrap().confirmed.extend(response.sequences);
    }
    feeder.abort();
}

async fn consume_until_refused(url: String, ledger: Arc<Mutex<Ledger>>) {
    consume(url, ledger, None).await
}

async fn consume_until_refused_or_idle(url: String, ledger: Arc<Mutex<Ledger>>) {
    consume(url, ledger, Some(Duration::from_secs(1))).await
}

/// Consumes and acks everything, checking each delivery against the confirmed acks.
async fn consume(url: String, ledger: Arc<Mutex<Ledger>>, idle: Option<Duration>) {
    let Some(channel) = connect(&url).await else {
        return;
    };
    let mut client = pb::subscriber_client::SubscriberClient::new(channel);
    let (requests, rx) = tokio::sync::mpsc::channel(64);
    let attach = pb::Attach {
        channel: "crash".into(),
        subscription: "s".into(),
        window: Some(pb::FlowControl {
            max_messages: 500,
            max_bytes: 0,
        }),
    };
    requests
        .send(pb::SubscribeRequest {
            request: Some(Req::Attach(attach)),
        })
        .await
        .unwrap();
    let Ok(response) = client.subscribe(ReceiverStream::new(rx)).await else {
        return;
    };
    let mut responses = response.into_inner();
    let mut pending: HashMap<String, u64> = HashMap::new();
    loop {
        let next = match idle {
            Some(idle) => match tokio::time::timeout(idle, responses.message()).await {
                Ok(next) => next,
                Err(_) => return,
            },
            None => responses.message().await,
        };
        let Ok(Some(response)) = next else { return };
        match response.response {
            Some(Resp::Deliveries(batch)) => {
                let mut ids = Vec::new();
                {
                    let mut ledger = ledger.lock().unwrap();
                    for delivery in batch.deliveries {
                        let seq = delivery.message.as_ref().unwrap().sequence;
                        ledger.deliveries += 1;
                        if !ledger.seen.insert(seq) {
                            ledger.redeliveries += 1;
                        }
                        if ledger.acked.contains(&seq) {
                            ledger.violations.push(seq);
                        }
                        pending.insert(delivery.ack_id.clone(), seq);
                        ids.push(delivery.ack_id);
                    }
                }
                if requests
                    .send(pb::SubscribeRequest {
                        request: Some(Req::Ack(pb::AckIds { ack_ids: ids })),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Some(Resp::Results(results)) => {
                let mut ledger = ledger.lock().unwrap();
                for result in results.results {
                    let seq = pending.remove(&result.ack_id);
                    if let (pb::AckStatus::Ok, Some(seq)) = (result.status(), seq) {
                        ledger.acked.insert(seq);
                    }
                }
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn the_weaker_fsync_modes_confirm_and_keep_messages_across_a_clean_restart() {
    for mode in ["interval", "never"] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ferry.toml");
        let text = format!(
            "[storage]\nfsync = \"{mode}\"\nfsync_interval = \"20ms\"\n\n\
             [[channels]]\nname = \"c\"\n[[channels.subscriptions]]\nname = \"s\"\n"
        );
        std::fs::write(&config, text).unwrap();
        let options = Options {
            config: Some(config),
            ..Options::default()
        };
        let daemon = Daemon::start_in(dir.path(), options.clone()).await;
        for i in 0..20u8 {
            daemon.publish("c", [vec![i; 10]]).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        daemon.stop().await;

        let daemon = Daemon::start_in(dir.path(), options).await;
        let mut consumer = Consumer::attach(&daemon, "c", "s", 100).await;
        assert_eq!(
            sequences(&consumer.take(20).await),
            (1..=20).collect::<Vec<_>>(),
            "{mode}"
        );
        drop(consumer);
        daemon.stop().await;
    }
}
