//! Misbehaving clients against the real binary: a consumer that stops reading its stream is
//! detached with a clear status and a log line, and what it held goes to the other consumers.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Consumer, Daemon, Options, PATIENCE, ack_ids, batch, sequences};
use ferry_proto::pb;
use tonic::Code;

/// Starts a daemon whose config is `toml`, in a temp dir it keeps alive with the daemon.
async fn daemon_with(toml: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, toml).unwrap();
    let daemon = Daemon::start_in(
        dir.path(),
        Options {
            config: Some(config),
        },
    )
    .await;
    (daemon, dir)
}

#[tokio::test]
async fn a_consumer_that_stops_reading_is_detached_and_its_deliveries_go_to_others() {
    let (daemon, _dir) = daemon_with(
        r#"
[limits]
consumer_queue = "256KiB"
consumer_stall_timeout = "1s"
"#,
    )
    .await;
    daemon.create("jobs", &[("work", 60_000)]).await;

    // The stuck consumer attaches first with a huge window and then never reads again.
    let mut stuck = Consumer::try_attach(
        &daemon,
        "jobs",
        "work",
        pb::FlowControl {
            max_messages: 100_000,
            max_bytes: 1 << 30,
        },
    )
    .await
    .unwrap();
    let mut worker = Consumer::attach(&daemon, "jobs", "work", 16).await;

    // 16 MiB: far more than HTTP/2 buffers between the two ends plus the consumer queue.
    let count = 1024;
    let mut published = BTreeSet::new();
    for chunk in 0..16 {
        let payloads = (0..count / 16).map(|i| vec![(chunk * 64 + i) as u8; 16 << 10]);
        published.extend(daemon.publish("jobs", payloads).await);
    }

    // The worker gets everything, including what the stuck consumer held, long before the
    // 60 s ack deadline would have released it.
    let mut done = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
    while done.len() < count && tokio::time::Instant::now() < deadline {
        let deliveries = worker.take_for(Duration::from_millis(200)).await;
        if deliveries.is_empty() {
            continue;
        }
        done.extend(sequences(&deliveries));
        worker.ack(ack_ids(&deliveries)).await;
    }
    assert_eq!(done, published, "every message reaches the worker");

    let info = daemon.subscription("jobs", "work").await;
    assert_eq!(
        info.consumers, 1,
        "the stuck consumer is detached: {info:?}"
    );
    assert_eq!((info.unacked, info.in_flight), (0, 0), "{info:?}");

    // When it finally reads, it learns why it was let go.
    let status = stuck.closed().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    for needle in [
        "took nothing from its stream",
        "\"work\"",
        "read the stream",
    ] {
        assert!(
            status.message().contains(needle),
            "{needle:?} in {status:?}"
        );
    }
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        log.contains("consumer read nothing from its stream: detached") && log.contains("work"),
        "the log names the detached consumer:\n{log}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_slow_reader_is_given_less_but_keeps_its_stream() {
    let (daemon, _dir) = daemon_with(
        r#"
[limits]
consumer_queue = "64KiB"
consumer_stall_timeout = "2s"
"#,
    )
    .await;
    daemon.create("slow", &[("s", 60_000)]).await;
    let mut consumer = Consumer::attach(&daemon, "slow", "s", 10_000).await;
    let request = batch("slow", (0..200).map(|i| vec![i as u8; 8 << 10]));
    daemon
        .publisher()
        .await
        .publish(request)
        .await
        .expect("publish");

    // Reading with pauses shorter than the stall timeout never gets it detached.
    let mut got = Vec::new();
    while got.len() < 200 {
        let deliveries = consumer.take_for(Duration::from_millis(300)).await;
        assert!(
            consumer.ended.is_none(),
            "stream ended: {:?}",
            consumer.ended
        );
        got.extend(sequences(&deliveries));
        if !deliveries.is_empty() {
            consumer.ack(ack_ids(&deliveries)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(got, (1..=200).collect::<Vec<_>>());
    daemon.stop().await;
}
