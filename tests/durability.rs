//! Durability through the real binary: graceful restarts and `kill -9` crashes on the same data
//! directory. What a publish or an ack confirmation promises must hold across both. (Repeated
//! kills under load, at random moments and at chosen points, are the fault suite's:
//! `faults.rs`.)

mod common;

use std::time::Duration;

use common::{Consumer, Daemon, Options, ack_ids, sequences};
use ferry_proto::pb;

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

#[tokio::test]
async fn the_weaker_fsync_modes_lose_nothing_confirmed_when_the_broker_is_killed() {
    // A commit is written to the OS before it is confirmed, in every mode: a crash of the
    // process (not of the machine) loses no confirmed publish and undoes no confirmed ack.
    for mode in ["interval", "never"] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ferry.toml");
        let text = format!(
            "[storage]\nfsync = \"{mode}\"\nfsync_interval = \"10s\"\n\n\
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
        }
        let mut consumer = Consumer::attach(&daemon, "c", "s", 10).await;
        let first = consumer.take(10).await;
        assert_eq!(sequences(&first), (1..=10).collect::<Vec<_>>(), "{mode}");
        consumer.ack(ack_ids(&first)).await;
        drop(consumer);
        daemon.kill().await;

        let daemon = Daemon::start_in(dir.path(), options).await;
        let mut consumer = Consumer::attach(&daemon, "c", "s", 100).await;
        assert_eq!(
            sequences(&consumer.take(10).await),
            (11..=20).collect::<Vec<_>>(),
            "{mode}: the confirmed acks hold and every confirmed publish is there"
        );
        assert!(
            consumer
                .take_for(Duration::from_millis(300))
                .await
                .is_empty(),
            "{mode}: nothing acked comes back"
        );
        drop(consumer);
        daemon.stop().await;
    }
}

/// A slow log writes its commits over zeros kept ahead of it (so that a commit's sync writes
/// its data alone); a crash then leaves a segment file that ends in zeros past the log, and
/// every confirmed message comes back, in order, with publishing going on after it.
#[tokio::test]
async fn a_crash_over_the_zeros_kept_ahead_of_a_slow_log_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_in(dir.path(), Options::default()).await;
    daemon.create("slow", &[("s", 60_000)]).await;
    let payloads: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i + 1; 20_000]).collect();
    for payload in &payloads {
        // Slower than the rate below which zeros are kept ahead.
        tokio::time::sleep(Duration::from_millis(120)).await;
        daemon.publish("slow", [payload.clone()]).await;
    }
    let newest = std::fs::read_dir(daemon.data_dir.join("segments"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .max()
        .expect("a segment file");
    let written: usize = payloads.iter().map(Vec::len).sum();
    let file = std::fs::read(&newest).unwrap();
    assert!(
        file.len() > written + 64 * 1024,
        "zeros ahead of the log: {} bytes for {written} of payloads",
        file.len()
    );
    assert!(file[file.len() - 4096..].iter().all(|&b| b == 0));
    daemon.kill().await;

    let daemon = Daemon::start_in(dir.path(), Options::default()).await;
    daemon.publish("slow", [b"after".to_vec()]).await;
    let mut consumer = Consumer::attach(&daemon, "slow", "s", 20).await;
    let got = consumer.take(payloads.len() + 1).await;
    let bodies: Vec<&[u8]> = got
        .iter()
        .map(|d| d.message.as_ref().unwrap().payload.as_ref())
        .collect();
    let mut expected: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    expected.push(b"after");
    assert_eq!(bodies, expected);
    drop(consumer);
    daemon.stop().await;
}
