//! A full disk, on a real small filesystem the test mounts itself (a tmpfs; the tests run as
//! root in CI). Publishing is refused before the disk is full and resumes by itself once space
//! is freed; acks go on throughout; a disk that another program fills is survived, including a
//! restart on it. Where no filesystem can be mounted, the watermark test runs on the daemon's
//! debug-build free-space probe instead, and the ENOSPC test says it was skipped.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Consumer, Daemon, Options, PATIENCE, ack_ids, batch, sequences, with_config};
use ferry_proto::pb;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A tmpfs of a given size, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `mib` MiB, or None where mounting is not allowed (or
    /// `FERRY_TEST_NO_MOUNT` is set, to exercise the fallback).
    fn mount(mib: u64) -> Option<SmallDisk> {
        if std::env::var_os("FERRY_TEST_NO_MOUNT").is_some() {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).ok()?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(SmallDisk { path, _dir: dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Writes a config with these storage settings; returns the options to start a daemon with
/// its data in `data_dir`.
fn options(dir: &Path, data_dir: PathBuf, storage: &str) -> Options {
    Options {
        data_dir: Some(data_dir),
        ..with_config(
            dir,
            &format!("[storage]\nsegment_size = \"1MiB\"\n{storage}"),
        )
    }
}

async fn publisher_health(daemon: &Daemon) -> ServingStatus {
    let mut client = HealthClient::new(daemon.channel().await);
    let request = HealthCheckRequest {
        service: "ferry.v1.Publisher".into(),
    };
    client.check(request).await.unwrap().into_inner().status()
}

/// Waits until the Publisher service reports `wanted`.
async fn await_health(daemon: &Daemon, wanted: ServingStatus) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while publisher_health(daemon).await != wanted {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Publisher service never reported {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes 1 MB batches until one is refused; returns the sequences confirmed and the
/// refusal.
async fn publish_until_refused(daemon: &Daemon, channel: &str) -> (Vec<u64>, tonic::Status) {
    let mut publisher = daemon.publisher().await;
    let mut confirmed = Vec::new();
    for round in 0..1000u32 {
        let payloads = (0..100).map(|i| vec![(round + i) as u8; 10_000]);
        match publisher.publish(batch(channel, payloads)).await {
            Ok(response) => confirmed.extend(response.into_inner().sequences),
            Err(status) => return (confirmed, status),
        }
    }
    panic!("1 GB was accepted on a small disk");
}

/// Consumes and acks until `expected` were all seen; returns what was seen.
async fn drain(daemon: &Daemon, channel: &str, expected: usize) -> BTreeSet<u64> {
    let mut consumer = Consumer::attach(daemon, channel, "s", 500).await;
    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
    while seen.len() < expected && tokio::time::Instant::now() < deadline {
        let deliveries = consumer.take_for(Duration::from_millis(200)).await;
        if deliveries.is_empty() {
            continue;
        }
        seen.extend(sequences(&deliveries));
        let results = consumer.ack(ack_ids(&deliveries)).await;
        assert!(
            results.iter().all(|r| *r == pb::AckStatus::Ok),
            "acks are confirmed on a full disk: {results:?}"
        );
    }
    seen
}

/// Publishing until refused, then draining, then publishing again.
async fn watermark_round(daemon: &Daemon) {
    daemon.create("fill", &[("s", 60_000)]).await;
    await_health(daemon, ServingStatus::Serving).await;
    let (confirmed, refusal) = publish_until_refused(daemon, "fill").await;
    assert!(!confirmed.is_empty());
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    for needle in ["free space", "min_free_bytes", "MiB"] {
        assert!(
            refusal.message().contains(needle),
            "{needle:?} in {refusal:?}"
        );
    }
    await_health(daemon, ServingStatus::NotServing).await;

    // Acks go on and free the space; publishing comes back by itself.
    let seen = drain(daemon, "fill", confirmed.len()).await;
    assert_eq!(seen, confirmed.iter().copied().collect::<BTreeSet<_>>());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match daemon
            .publisher()
            .await
            .publish(batch("fill", [b"again".to_vec()]))
            .await
        {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "publishing never resumed"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    await_health(daemon, ServingStatus::Serving).await;
}

#[tokio::test]
async fn publishing_stops_at_the_watermark_and_resumes_once_acks_free_space() {
    watermark_test("").await;
}

/// What the test with preallocated segments adds to the storage settings. (The watermark
/// test is not run with them: there the estimate between two looks at the disk does not know
/// what a spare's zeros took, and a refusal can be lifted by the next look.)
const PREALLOCATED: &str = "preallocate_segments = true\n";

async fn watermark_test(storage: &str) {
    let dir = tempfile::tempdir().unwrap();
    if let Some(disk) = SmallDisk::mount(64) {
        let options = options(
            dir.path(),
            disk.path.join("data"),
            &format!(
                "min_free_bytes = \"24MiB\"\nmin_free_percent = 0\nreserve = \"4MiB\"\n{storage}"
            ),
        );
        let daemon = Daemon::start_in(dir.path(), options).await;
        watermark_round(&daemon).await;
        daemon.stop().await;
        return;
    }
    // No mount here: the daemon reads its free space from a file this test writes, lowered
    // as the data directory grows.
    eprintln!("cannot mount a tmpfs here: using the daemon's free-space probe");
    let probe = dir.path().join("free");
    let mut options = options(
        dir.path(),
        dir.path().join("data"),
        &format!("min_free_bytes = \"24MiB\"\nmin_free_percent = 0\nreserve = \"0\"\n{storage}"),
    );
    options
        .env
        .push(("FERRY_TEST_FREE_SPACE".into(), probe.display().to_string()));
    let data = dir.path().join("data");
    let total: u64 = 64 << 20;
    std::fs::write(&probe, format!("{total} {total}")).unwrap();
    let daemon = Daemon::start_in(dir.path(), options).await;
    let feeding = tokio::spawn(async move {
        loop {
            let used = disk_usage(&data);
            let _ = std::fs::write(&probe, format!("{} {total}", total.saturating_sub(used)));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    watermark_round(&daemon).await;
    feeding.abort();
    daemon.stop().await;
}

/// Bytes of the files under `dir`.
fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&entry.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Fills the filesystem holding `dir` with a file of its own, as another program would.
fn fill_up(path: &Path) {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![7u8; 1 << 20];
    while file.write_all(&chunk).is_ok() {}
    let small = vec![7u8; 4096];
    while file.write_all(&small).is_ok() {}
    let _ = file.flush();
}

#[tokio::test]
async fn a_disk_another_program_fills_is_survived_across_a_restart() {
    filled_disk_test("").await;
}

/// Writes into preallocated blocks fail no write when the disk fills: the writer must notice
/// by itself, before sled needs a block and finds none. It looks every 5 ms, which narrows the
/// race; what closes it is the room the store keeps allocated ahead of sled's log, so that
/// sled's writes never need a block the other program could take.
#[tokio::test]
async fn a_disk_filled_under_preallocated_segments_is_survived() {
    filled_disk_test(PREALLOCATED).await;
}

async fn filled_disk_test(storage: &str) {
    let Some(disk) = SmallDisk::mount(64) else {
        eprintln!("skipped: cannot mount a tmpfs here (the test needs a real full disk)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let options = options(
        dir.path(),
        disk.path.join("data"),
        &format!("min_free_bytes = \"1MiB\"\nmin_free_percent = 0\nreserve = \"8MiB\"\n{storage}"),
    );
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    daemon.create("fill", &[("s", 60_000)]).await;

    // A publisher keeps going while another program fills the disk under it.
    let url = daemon.url.clone();
    let publishing = tokio::spawn(async move {
        let mut publisher = pb::publisher_client::PublisherClient::new(
            common::connect(&url).await.expect("connect"),
        );
        let mut confirmed = Vec::new();
        let mut refused = 0;
        for round in 0..2000u32 {
            let payloads = (0..20).map(|i| vec![(round + i) as u8; 10_000]);
            match publisher.publish(batch("fill", payloads)).await {
                Ok(response) => {
                    confirmed.extend(response.into_inner().sequences);
                    refused = 0;
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    refused += 1;
                    if refused == 20 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        confirmed
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let filler = disk.path.join("filler");
    fill_up(&filler);
    let confirmed = publishing.await.unwrap();
    assert!(!confirmed.is_empty());

    // A restart on the full disk comes up and serves deliveries and acks. A clean stop
    // deletes a preallocated spare (a segment's worth, here as much as `min_free_bytes`),
    // which would leave free space exactly on the watermark, not below it: the other program
    // takes that too.
    daemon.stop().await;
    let refiller = disk.path.join("refiller");
    fill_up(&refiller);
    let daemon = Daemon::start_in(dir.path(), options).await;
    assert_refused_for_space(&daemon, "fill").await;
    let seen = drain(&daemon, "fill", confirmed.len()).await;
    assert_eq!(
        seen,
        confirmed.iter().copied().collect::<BTreeSet<_>>(),
        "exactly the confirmed messages, each once"
    );

    // Once the other program's files go, publishing resumes without a restart.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&refiller).unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while daemon
        .publisher()
        .await
        .publish(batch("fill", [b"room again".to_vec()]))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing never resumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    await_health(&daemon, ServingStatus::Serving).await;
    daemon.stop().await;
}

/// The run-time reserve can go to another program that is still filling the disk; the broker
/// must still come up on a disk full to its last block, and deliver what it holds. Here the
/// reserve is gone and the disk is filled while the broker is down, so the start depends on
/// the start-up reserve alone (without it sled cannot open: it writes when it opens).
#[tokio::test]
async fn a_start_on_a_disk_full_to_the_last_block_comes_up() {
    let Some(disk) = SmallDisk::mount(64) else {
        eprintln!("skipped: cannot mount a tmpfs here (the test needs a real full disk)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = disk.path.join("data");
    let options = options(
        dir.path(),
        data.clone(),
        "min_free_bytes = \"1MiB\"\nmin_free_percent = 0\nreserve = \"8MiB\"\n",
    );
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    daemon.create("kept", &[("s", 60_000)]).await;
    let confirmed = daemon
        .publisher()
        .await
        .publish(batch("kept", (0..50u8).map(|i| vec![i; 1000])))
        .await
        .unwrap()
        .into_inner()
        .sequences;
    daemon.stop().await;
    assert!(
        data.join("reserve.start").exists(),
        "the start-up reserve is made"
    );

    // The run-time reserve went to another program, which then filled the disk.
    std::fs::remove_file(data.join("reserve")).unwrap();
    let filler = disk.path.join("filler");
    fill_up(&filler);

    let daemon = Daemon::start_in(dir.path(), options).await;
    daemon
        .wait_for_log("released the start-up reserve", 1)
        .await;
    let seen = drain(&daemon, "kept", confirmed.len()).await;
    assert_eq!(seen, confirmed.iter().copied().collect::<BTreeSet<_>>());
    assert_refused_for_space(&daemon, "kept").await;

    // Once there is room, the start-up reserve is made again.
    std::fs::remove_file(&filler).unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    while !data.join("reserve.start").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the start-up reserve never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.stop().await;
}

/// A publish to `channel` is refused with RESOURCE_EXHAUSTED: the disk has no room.
async fn assert_refused_for_space(daemon: &Daemon, channel: &str) {
    let published = daemon
        .publisher()
        .await
        .publish(batch(channel, [b"no room".to_vec()]))
        .await;
    let Err(refused) = published else {
        let on_data_dir = |command: &[&str]| {
            std::process::Command::new(command[0])
                .args(&command[1..])
                .arg(&daemon.data_dir)
                .output()
                .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                .unwrap_or_default()
        };
        let (df, listing) = (on_data_dir(&["df", "-B1"]), on_data_dir(&["ls", "-ls"]));
        let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
        panic!("a publish was accepted on a full disk\n{df}\n{listing}\nlog:\n{log}");
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
}
