//! Damaged files: a segment file with flipped bytes and another cut short. The damage is found
//! on start-up and on read, reported once with where it is, counted in Admin, and contained:
//! every intact message, and every new one, is still delivered (or, with the stop policy,
//! nothing past the damage is).

mod common;

use std::collections::BTreeSet;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;
use std::time::Duration;

use common::{Consumer, Daemon, Options, PATIENCE, ack_ids, segment_files, sequences, with_config};

fn options(dir: &Path, storage: &str) -> Options {
    with_config(
        dir,
        &format!("[storage]\nsegment_size = \"1MiB\"\n{storage}"),
    )
}

/// Flips 8 bytes in the middle of `path`.
fn flip_bytes(path: &Path) {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let middle = file.metadata().unwrap().len() / 2;
    let mut bytes = [0u8; 8];
    file.seek(SeekFrom::Start(middle)).unwrap();
    file.read_exact(&mut bytes).unwrap();
    for b in &mut bytes {
        *b ^= 0xA5;
    }
    file.seek(SeekFrom::Start(middle)).unwrap();
    file.write_all(&bytes).unwrap();
}

/// Cuts the last 100 bytes off `path`.
fn truncate(path: &Path) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len - 100).unwrap();
}

/// Publishes 60 commits of 50 messages of 1 KiB: about 3 MB, so several segment files.
async fn fill(daemon: &Daemon) -> Vec<u64> {
    daemon.create("orders", &[("s", 60_000)]).await;
    let mut published = Vec::new();
    for round in 0..60u8 {
        let payloads = (0..50).map(|i| vec![round.wrapping_add(i); 1024]);
        published.extend(daemon.publish("orders", payloads).await);
    }
    published
}

/// Damages the first segment file and cuts the second one short.
fn damage(data_dir: &Path) {
    let files = segment_files(data_dir);
    assert!(files.len() >= 3, "several segment files: {files:?}");
    flip_bytes(&files[0]);
    truncate(&files[1]);
}

/// Delivers and acks until nothing comes for a while; returns what came.
async fn consume_all(daemon: &Daemon, channel: &str, subscription: &str) -> BTreeSet<u64> {
    let mut consumer = Consumer::attach(daemon, channel, subscription, 1000).await;
    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let deliveries = consumer.take_for(Duration::from_millis(500)).await;
        if deliveries.is_empty() {
            break;
        }
        seen.extend(sequences(&deliveries));
        consumer.ack(ack_ids(&deliveries)).await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries never stopped"
        );
    }
    seen
}

#[tokio::test]
async fn damaged_records_are_reported_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let options = options(dir.path(), "");
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    let published = fill(&daemon).await;
    daemon.stop().await;
    damage(&dir.path().join("data"));

    let daemon = Daemon::start_in(dir.path(), options).await;
    // The start-up check finds the cut-short file at once.
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        log.contains("damaged message record") && log.contains("segment"),
        "the start-up check reports the damage:\n{log}"
    );
    let later = daemon
        .publish("orders", [b"after the damage".to_vec()])
        .await;

    let seen = consume_all(&daemon, "orders", "s").await;
    let info = daemon
        .admin()
        .await
        .get_channel(ferry_proto::pb::GetChannelRequest {
            name: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(info.damaged_records >= 2, "{info:?}");
    let lost = info.damaged_messages;
    assert!(lost > 0 && lost < published.len() as u64 / 2, "{info:?}");
    let expected: BTreeSet<u64> = published.iter().chain(&later).copied().collect();
    assert!(seen.is_subset(&expected), "nothing unexpected");
    assert_eq!(
        seen.len() as u64 + lost,
        expected.len() as u64,
        "every intact message and the new one are delivered"
    );
    assert!(
        seen.contains(&later[0]),
        "a publish after the damage is delivered"
    );
    let sub = &info.subscriptions[0];
    assert_eq!(sub.damaged_skipped, lost, "{sub:?}");
    assert_eq!(
        sub.unacked, 0,
        "the damaged messages count as acked: {sub:?}"
    );
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    let reports = log
        .lines()
        .filter(|l| l.contains("damaged message record: its messages are lost"))
        .count();
    assert_eq!(
        reports as u64, info.damaged_records,
        "each damage reported once:\n{log}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn with_the_stop_policy_nothing_past_the_damage_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let options = options(dir.path(), "on_damage = \"stop\"\n");
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    let published = fill(&daemon).await;
    daemon.stop().await;
    damage(&dir.path().join("data"));

    let daemon = Daemon::start_in(dir.path(), options).await;
    daemon
        .publish("orders", [b"after the damage".to_vec()])
        .await;
    let seen = consume_all(&daemon, "orders", "s").await;
    let first_lost = (1..=published.len() as u64)
        .find(|s| !seen.contains(s))
        .expect("something is held back");
    assert_eq!(
        seen,
        (1..first_lost).collect::<BTreeSet<_>>(),
        "exactly the messages before the first damaged record"
    );
    let sub = daemon.subscription("orders", "s").await;
    assert_eq!(sub.damaged_skipped, 0);
    daemon.stop().await;
}

/// Flips 256 bytes at `at` (a fraction of the file's length) of `path`.
fn flip_256_bytes(path: &Path, at: f64) {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let offset = (file.metadata().unwrap().len() as f64 * at) as u64;
    let mut bytes = [0u8; 256];
    file.seek(SeekFrom::Start(offset)).unwrap();
    let n = file.read(&mut bytes).unwrap();
    for b in &mut bytes[..n] {
        *b ^= 0x5A;
    }
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(&bytes[..n]).unwrap();
}

#[tokio::test]
async fn a_damaged_index_is_rebuilt_from_the_segment_log() {
    // sled comes back from a damaged file with an older state: the records written since are
    // indexed again from the segment log.
    let mut replays = 0;
    for (damage, at) in [("flip", 0.5), ("flip", 0.8), ("truncate", 0.5)] {
        let dir = tempfile::tempdir().unwrap();
        let options = options(dir.path(), "");
        let daemon = Daemon::start_in(dir.path(), options.clone()).await;
        daemon.create("orders", &[("s", 60_000)]).await;
        let mut published = BTreeSet::new();
        for round in 0..100u8 {
            let payloads = (0..100).map(|i| vec![round.wrapping_add(i); 100]);
            published.extend(daemon.publish("orders", payloads).await);
        }
        daemon.stop().await;
        let db = dir.path().join("data/db");
        match damage {
            "flip" => flip_256_bytes(&db, at),
            _ => {
                let file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
                let len = file.metadata().unwrap().len();
                file.set_len((len as f64 * at) as u64).unwrap();
            }
        }

        let daemon = match Daemon::try_start_in(dir.path(), options.clone()).await {
            Ok(daemon) => daemon,
            Err(e) => panic!("{damage} at {at}: {e}"),
        };
        let log = std::fs::read_to_string(&daemon.log).unwrap();
        replays += usize::from(log.contains("replayed the segment log"));
        let later = daemon.publish("orders", [b"after".to_vec()]).await;
        assert!(
            later[0] > *published.last().unwrap(),
            "{damage} at {at}: sequence {} given out again",
            later[0]
        );
        let seen = consume_all(&daemon, "orders", "s").await;
        let missing: Vec<_> = published.difference(&seen).take(10).collect();
        assert!(
            missing.is_empty(),
            "{damage} at {at}: confirmed messages lost: {missing:?}"
        );
        daemon.stop().await;
    }
    assert!(
        replays > 0,
        "the damage never made sled forget anything: the test tests nothing"
    );
}

/// Runs `ferry VERB --data-dir DIR`; returns its exit code and standard output.
fn ferry_tool(verb: &str, data_dir: &Path) -> (i32, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg(verb)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

/// Removes sled's files: the index is lost altogether.
fn lose_index(data: &Path) {
    for name in ["db", "conf", "blobs"] {
        let path = data.join(name);
        if path.is_dir() {
            std::fs::remove_dir_all(path).unwrap();
        } else if path.exists() {
            std::fs::remove_file(path).unwrap();
        }
    }
}

#[tokio::test]
async fn a_lost_index_is_rebuilt_from_the_log_on_start() {
    // The segment log holds every commit since the channel was created: a start replays it
    // all, and the channel, its subscription and every message are back.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let options = options(dir.path(), "");
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    let published: BTreeSet<u64> = fill(&daemon).await.into_iter().collect();
    let acked = consume_some(&daemon, 500).await;
    daemon.stop().await;
    lose_index(&data);

    let daemon = Daemon::start_in(dir.path(), options).await;
    let info = daemon.subscription("orders", "s").await;
    assert_eq!(info.unacked, (published.len() - acked) as u64, "{info:?}");
    let seen = consume_all(&daemon, "orders", "s").await;
    let expected: BTreeSet<u64> = published.iter().skip(acked).copied().collect();
    assert_eq!(seen, expected, "exactly what was not acked, nothing lost");
    daemon.stop().await;
    let (code, text) = ferry_tool("check", &data);
    assert_eq!(code, 0, "{text}");
}

/// Acks the first `n` messages of orders/s (in order: the window is larger than `n`).
async fn consume_some(daemon: &Daemon, n: usize) -> usize {
    let mut consumer = Consumer::attach(daemon, "orders", "s", 1000).await;
    let deliveries = consumer.take(n).await;
    assert_eq!(sequences(&deliveries)[0], 1);
    consumer.ack(ack_ids(&deliveries)).await;
    n
}

#[tokio::test]
async fn check_finds_and_repair_rebuilds_a_lost_index() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let options = options(dir.path(), "");
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    // The commit that created orders goes to a segment file that is deleted before orders
    // publishes anything (everything in it is deleted): the log no longer says orders exists.
    daemon.create("orders", &[("s", 60_000)]).await;
    daemon.create("warmup", &[("w", 60_000)]).await;
    for round in 0..25u8 {
        daemon
            .publish("warmup", (0..50).map(|i| vec![round.wrapping_add(i); 1024]))
            .await;
    }
    daemon
        .admin()
        .await
        .delete_channel(ferry_proto::pb::DeleteChannelRequest {
            name: "warmup".into(),
        })
        .await
        .unwrap();
    let mut published = BTreeSet::new();
    for round in 0..60u8 {
        let payloads = (0..50).map(|i| vec![round.wrapping_add(i); 1024]);
        published.extend(daemon.publish("orders", payloads).await);
    }
    // Ids too: their de-duplication entries are index entries a check must know.
    let with_ids = ferry_proto::pb::PublishRequest {
        channel: "orders".into(),
        messages: (0..5)
            .map(|i| ferry_proto::pb::OutgoingMessage {
                payload: vec![i; 16].into(),
                id: format!("id-{i}"),
                ..Default::default()
            })
            .collect(),
    };
    let confirmed = daemon.publisher().await.publish(with_ids).await.unwrap();
    published.extend(confirmed.into_inner().sequences);
    let (code, text) = ferry_tool("check", &data);
    assert_eq!(
        code, 2,
        "a running broker's directory is not checked: {text}"
    );
    assert!(text.contains("in use"), "{text}");
    daemon.stop().await;
    let (code, text) = ferry_tool("check", &data);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("no problems found"), "{text}");
    assert!(
        !segment_files(&data)[0].ends_with("0000000001.seg"),
        "the first segment file is gone"
    );

    // The index is lost altogether. The broker starts without the channel, but deletes no
    // segment file: the records it cannot place keep their files.
    lose_index(&data);
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    daemon.stop().await;
    assert!(
        segment_files(&data).len() >= 3,
        "no segment file was deleted"
    );
    let (code, text) = ferry_tool("check", &data);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("the index does not know") && text.contains("ferry repair"),
        "{text}"
    );

    let (code, text) = ferry_tool("repair", &data);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("recovered.channel-1"), "{text}");
    let (code, text) = ferry_tool("check", &data);
    assert_eq!(code, 0, "after the repair: {text}");

    // Every message is back, under the recovered channel.
    let daemon = Daemon::start_in(dir.path(), options).await;
    let info = daemon
        .subscription("recovered.channel-1", "recovered")
        .await;
    assert_eq!(info.unacked, published.len() as u64, "{info:?}");
    let seen = consume_all(&daemon, "recovered.channel-1", "recovered").await;
    assert_eq!(seen, published);
    daemon.stop().await;
}

#[tokio::test]
async fn a_full_check_on_start_finds_damage_before_anyone_reads() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_in(dir.path(), options(dir.path(), "")).await;
    fill(&daemon).await;
    daemon.stop().await;
    // The middle of the first segment file: not the last record of any file, which is all the
    // default check reads.
    flip_bytes(&segment_files(&dir.path().join("data"))[0]);
    let damaged_records = |daemon: &Daemon| {
        let url = daemon.url.clone();
        async move {
            let channel = common::connect(&url).await.unwrap();
            ferry_proto::pb::admin_client::AdminClient::new(channel)
                .get_channel(ferry_proto::pb::GetChannelRequest {
                    name: "orders".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .damaged_records
        }
    };

    let daemon = Daemon::start_in(dir.path(), options(dir.path(), "")).await;
    assert_eq!(
        damaged_records(&daemon).await,
        0,
        "the tail check does not read it"
    );
    daemon.stop().await;
    let full = options(dir.path(), "verify_on_start = \"full\"\n");
    let daemon = Daemon::start_in(dir.path(), full).await;
    assert_eq!(
        damaged_records(&daemon).await,
        1,
        "the full check finds it at start-up"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn check_and_repair_keep_wildcard_subscriptions_and_derived_patterns() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_in(dir.path(), Options::default()).await;
    let mut admin = daemon.admin().await;
    let create = |name: &str| ferry_proto::pb::CreateChannelRequest {
        name: name.into(),
        ..Default::default()
    };
    admin.create_channel(create("orders.a")).await.unwrap();
    let wildcard = ferry_proto::pb::CreateSubscriptionRequest {
        channel: "orders.*".into(),
        name: "audit".into(),
        ..Default::default()
    };
    admin.create_subscription(wildcard).await.unwrap();
    let derived = ferry_proto::pb::DerivedChannel {
        source: "orders.*".into(),
        target: "all.orders".into(),
        ..Default::default()
    };
    admin.create_derived(derived).await.unwrap();
    let data = daemon.data_dir.clone();
    daemon.stop().await;

    // The catalog that holds them is part of the index: checked, and rebuilt by repair.
    let (code, text) = ferry_tool("check", &data);
    assert_eq!(code, 0, "{text}");
    let (code, text) = ferry_tool("repair", &data);
    assert_eq!(code, 0, "{text}");
    let daemon = Daemon::start_in(dir.path(), Options::default()).await;
    let info = daemon.subscription("orders.*", "audit").await;
    assert_eq!(info.channels, ["orders.a"]);
    let mut admin = daemon.admin().await;
    let listed = admin
        .list_derived(ferry_proto::pb::ListDerivedRequest {})
        .await
        .unwrap()
        .into_inner()
        .derived;
    let sources: Vec<_> = listed
        .iter()
        .map(|d| d.channel.clone().unwrap().source)
        .collect();
    assert_eq!(sources, ["orders.*"]);
    // And both still read channels created after the repair.
    admin.create_channel(create("orders.b")).await.unwrap();
    daemon.publish("orders.b", [b"x".to_vec()]).await;
    let info = daemon.subscription("orders.*", "audit").await;
    assert_eq!((info.channels.len(), info.unacked), (2, 1));
    daemon.stop().await;
}
