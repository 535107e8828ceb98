//! The fault suite: publishers and acking consumers with checksummed, unique payloads run
//! against the real binary while faults are injected, and afterwards every message is
//! classified: lost (confirmed, never delivered), duplicated (delivered again after its ack was
//! confirmed), unexpected (delivered, never sent) or corrupted (its checksum fails). It prints
//! one table row per fault and fails on anything but zeros (a damaged file's lost messages
//! must equal what the broker reports as damaged).
//!
//! One run exercises the error flows: its consumer nacks every odd message terminally, so that
//! it is dead-lettered, while a redriver keeps moving dead letters back, and the consumer acks
//! them the second time round; there a message also counts as duplicated if it comes back in
//! its first form after its dead-lettering was confirmed, and as lost if it never comes back
//! redriven.
//!
//! The form that runs with the suite is short; `FERRY_FAULT_CYCLES=1000 cargo test --test faults
//! -- --nocapture` runs the long one (that many random kills, and a tenth as many at each fail
//! point).

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Daemon, Options, Rng, connect, message, segment_files, with_config};
use ferry_proto::pb::{
    self, subscribe_request::Request as Req, subscribe_response::Response as Resp,
};
use tokio_stream::wrappers::ReceiverStream;

const CHANNEL: &str = "faults";

/// What the clients saw, by message id (the payload's first 8 bytes).
#[derive(Default)]
struct Ledger {
    /// Ids handed to the broker, confirmed or not.
    sent: HashSet<u64>,
    confirmed: HashSet<u64>,
    /// Ids whose ack the broker confirmed.
    acked: HashSet<u64>,
    /// Ids whose terminal nack (dead-lettering) the broker confirmed.
    dead_lettered: HashSet<u64>,
    /// Ids delivered in their redriven form.
    redriven: HashSet<u64>,
    delivered: HashMap<u64, u32>,
    deliveries: u64,
    duplicated: u64,
    unexpected: u64,
    corrupted: u64,
    /// The next id to give out.
    next_id: u64,
}

type Shared = Arc<Mutex<Ledger>>;

/// A payload: its id, filler that depends on the id, and a 64-bit FNV-1a hash of both.
fn payload(id: u64) -> Vec<u8> {
    let mut bytes = id.to_le_bytes().to_vec();
    let filler = 32 + (id % 480) as usize;
    bytes.extend((0..filler).map(|i| (id as usize).wrapping_add(i * 31) as u8));
    let hash = fnv(&bytes);
    bytes.extend(hash.to_le_bytes());
    bytes
}

/// The id of an intact payload; None when its checksum fails.
fn check(payload: &[u8]) -> Option<u64> {
    let (body, hash) = payload.split_at_checked(payload.len().checked_sub(8)?)?;
    if body.len() < 8 || fnv(body).to_le_bytes() != hash {
        return None;
    }
    Some(u64::from_le_bytes(body[..8].try_into().ok()?))
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Publishes paced batches over one stream until the broker goes away or refuses.
async fn publish(url: String, ledger: Shared) {
    publish_batches(url, ledger, 2000).await
}

/// Publishes up to `batches` batches of 10 (see `publish`).
async fn publish_batches(url: String, ledger: Shared, batches_to_send: u32) {
    let Some(channel) = connect(&url).await else {
        return;
    };
    let mut client = pb::publisher_client::PublisherClient::new(channel);
    let (requests, rx) = tokio::sync::mpsc::channel(64);
    let Ok(response) = client.publish_stream(ReceiverStream::new(rx)).await else {
        return;
    };
    let mut responses = response.into_inner();
    let batches: Arc<Mutex<VecDeque<Vec<u64>>>> = Arc::default();
    let feeder = {
        let (ledger, batches) = (ledger.clone(), batches.clone());
        tokio::spawn(async move {
            for _ in 0..batches_to_send {
                let ids: Vec<u64> = {
                    let mut ledger = ledger.lock().unwrap();
                    let ids: Vec<u64> = (0..10).map(|i| ledger.next_id + i).collect();
                    ledger.next_id += 10;
                    ledger.sent.extend(&ids);
                    ids
                };
                let messages = ids
                    .iter()
                    .map(|&id| message(payload(id), &[], ""))
                    .collect();
                batches.lock().unwrap().push_back(ids);
                let request = pb::PublishRequest {
                    channel: CHANNEL.into(),
                    messages,
                };
                if requests.send(request).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    while let Ok(Some(_)) = responses.message().await {
        if let Some(ids) = batches.lock().unwrap().pop_front() {
            ledger.lock().unwrap().confirmed.extend(ids);
        }
    }
    feeder.abort();
}

/// What the consumer does with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Acks it.
    Ack,
    /// Nacks odd ids terminally (they are dead-lettered) unless redriven; acks the rest.
    DeadLetterOdd,
}

/// The attribute a redriven message carries.
const REDRIVEN: &str = "ferry.redrive.count";

/// Consumes and acks until the broker goes away (or, with `idle`, nothing comes for that long).
async fn consume(url: String, ledger: Shared, idle: Option<Duration>) {
    consume_with(url, ledger, idle, Mode::Ack).await
}

/// Like `consume`, doing with each delivery what `mode` says.
async fn consume_with(url: String, ledger: Shared, idle: Option<Duration>, mode: Mode) {
    let Some(channel) = connect(&url).await else {
        return;
    };
    let mut client = pb::subscriber_client::SubscriberClient::new(channel);
    let (requests, rx) = tokio::sync::mpsc::channel(64);
    let attach = pb::Attach {
        channel: CHANNEL.into(),
        subscription: "s".into(),
        window: Some(pb::FlowControl {
            max_messages: 500,
            max_bytes: 0,
        }),
    };
    let first = pb::SubscribeRequest {
        request: Some(Req::Attach(attach)),
    };
    if requests.send(first).await.is_err() {
        return;
    }
    let Ok(response) = client.subscribe(ReceiverStream::new(rx)).await else {
        return;
    };
    let mut responses = response.into_inner();
    let mut pending: HashMap<String, Option<u64>> = HashMap::new();
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
                let (mut ack_ids, mut nack_ids) = (Vec::new(), Vec::new());
                {
                    let mut ledger = ledger.lock().unwrap();
                    for delivery in batch.deliveries {
                        ledger.deliveries += 1;
                        let message = delivery.message.as_ref().unwrap();
                        let redriven = message.attributes.contains_key(REDRIVEN);
                        let id = check(&message.payload);
                        match id {
                            None => ledger.corrupted += 1,
                            Some(id) if !ledger.sent.contains(&id) => ledger.unexpected += 1,
                            Some(id) => {
                                if redriven {
                                    ledger.redriven.insert(id);
                                }
                                let back = !redriven && ledger.dead_lettered.contains(&id);
                                if ledger.acked.contains(&id) || back {
                                    ledger.duplicated += 1;
                                }
                                *ledger.delivered.entry(id).or_default() += 1;
                            }
                        }
                        pending.insert(delivery.ack_id.clone(), id);
                        let dead_letter = mode == Mode::DeadLetterOdd
                            && !redriven
                            && id.is_some_and(|id| id % 2 == 1);
                        match dead_letter {
                            true => nack_ids.push(delivery.ack_id),
                            false => ack_ids.push(delivery.ack_id),
                        }
                    }
                }
                let nack = pb::Nack {
                    ack_ids: nack_ids,
                    reason: "odd".into(),
                    terminal: true,
                    ..Default::default()
                };
                let requests_out = [
                    (!ack_ids.is_empty()).then_some(Req::Ack(pb::AckIds { ack_ids })),
                    (!nack.ack_ids.is_empty()).then_some(Req::Nack(nack)),
                ];
                for request in requests_out.into_iter().flatten() {
                    let request = pb::SubscribeRequest {
                        request: Some(request),
                    };
                    if requests.send(request).await.is_err() {
                        return;
                    }
                }
            }
            Some(Resp::Results(results)) => {
                let nacks = results.operation() == pb::AckOperation::Nack;
                let mut ledger = ledger.lock().unwrap();
                for result in results.results {
                    if let (pb::AckStatus::Ok, Some(Some(id))) =
                        (result.status(), pending.remove(&result.ack_id))
                    {
                        match nacks {
                            true => ledger.dead_lettered.insert(id),
                            false => ledger.acked.insert(id),
                        };
                    }
                }
            }
            _ => {}
        }
    }
}

/// One fault's figures.
struct Row {
    fault: &'static str,
    cycles: u64,
    confirmed: usize,
    deliveries: u64,
    lost: usize,
    duplicated: u64,
    unexpected: u64,
    corrupted: u64,
    /// Messages the broker reported lost to damage (only the damaged-file fault has any).
    damaged: u64,
    /// Segment files left once everything was acked: space must come back.
    segments_left: usize,
}

fn print_table(rows: &[Row]) {
    println!(
        "\n{:<34} {:>6} {:>9} {:>10} {:>5} {:>10} {:>10} {:>9} {:>8} {:>9}",
        "fault",
        "cycles",
        "confirmed",
        "deliveries",
        "lost",
        "duplicated",
        "unexpected",
        "corrupted",
        "damaged",
        "files left"
    );
    for r in rows {
        println!(
            "{:<34} {:>6} {:>9} {:>10} {:>5} {:>10} {:>10} {:>9} {:>8} {:>9}",
            r.fault,
            r.cycles,
            r.confirmed,
            r.deliveries,
            r.lost,
            r.duplicated,
            r.unexpected,
            r.corrupted,
            r.damaged,
            r.segments_left
        );
    }
}

/// The config every fault runs with: small, preallocated segments, so that faults also land
/// while segment files are started, taken from their spares and deleted, and while frames are
/// written over zeros.
fn write_config(dir: &Path, extra: &str) -> Options {
    write_config_with(dir, extra, "")
}

/// Like `write_config`, with more keys for the subscription (and what may follow them).
fn write_config_with(dir: &Path, extra: &str, subscription: &str) -> Options {
    with_config(
        dir,
        &format!(
            "[storage]\nsegment_size = \"1MiB\"\npreallocate_segments = true\nmin_free_bytes = \"16MiB\"\nmin_free_percent = 0\n{extra}\n\
             [[channels]]\nname = \"{CHANNEL}\"\n[[channels.subscriptions]]\nname = \"s\"\nack_deadline = \"2s\"\n\
             {subscription}"
        ),
    )
}

/// The subscription of the error-flow run: a dead-letter channel no one subscribes to.
const DEAD_LETTERS: &str = "max_delivery_attempts = 3\ndead_letter_channel = \"faults.dead\"\n\
                            [[channels]]\nname = \"faults.dead\"\n";

/// Redrives every dead letter every 50 to 300 ms until the broker goes away.
async fn redrive_loop(url: String, seed: u64) {
    let Some(channel) = connect(&url).await else {
        return;
    };
    let mut admin = pb::admin_client::AdminClient::new(channel);
    let mut rng = Rng::seeded(seed);
    loop {
        tokio::time::sleep(Duration::from_millis(rng.range(50..300))).await;
        let request = pb::RedriveRequest {
            channel: "faults.dead".into(),
            ..Default::default()
        };
        if admin.redrive(request).await.is_err() {
            return;
        }
    }
}

/// Runs publishers and a consumer against `daemon` until `fault` returns (it must end the
/// daemon one way or another), then waits for the clients, which stop once it is gone.
async fn load_until(
    daemon: &Daemon,
    ledger: &Shared,
    fault: impl std::future::Future<Output = ()>,
) {
    load_until_with(daemon, ledger, Mode::Ack, fault).await
}

/// Like `load_until`, with the consumer in `mode` (and, for the error flows, a redriver).
async fn load_until_with(
    daemon: &Daemon,
    ledger: &Shared,
    mode: Mode,
    fault: impl std::future::Future<Output = ()>,
) {
    let mut tasks: Vec<_> = (0..2)
        .map(|_| tokio::spawn(publish(daemon.url.clone(), ledger.clone())))
        .collect();
    let url = daemon.url.clone();
    tasks.push(tokio::spawn(consume_with(url, ledger.clone(), None, mode)));
    if mode == Mode::DeadLetterOdd {
        let seed = u64::from(daemon.pid());
        tasks.push(tokio::spawn(redrive_loop(daemon.url.clone(), seed)));
    }
    fault.await;
    for task in tasks {
        let _ = tokio::time::timeout(common::PATIENCE, task).await;
    }
}

/// Drains on a clean start until every confirmed message was delivered (or a minute passed),
/// and classifies.
async fn settle(
    fault: &'static str,
    cycles: u64,
    dir: &Path,
    options: Options,
    ledger: Shared,
) -> Row {
    settle_with(fault, cycles, dir, options, ledger, Mode::Ack).await
}

/// Like `settle`, with the consumer in `mode`; for the error flows it also redrives what is
/// left in the dead-letter channel, and a dead-lettered message counts as lost unless it was
/// delivered redriven.
async fn settle_with(
    fault: &'static str,
    cycles: u64,
    dir: &Path,
    options: Options,
    ledger: Shared,
    mode: Mode,
) -> Row {
    let data_dir = options.data_dir.clone().unwrap_or_else(|| dir.join("data"));
    let daemon = Daemon::start_in(dir, options).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // Delivered in its last form: an odd id in the error flows only once redriven.
    let arrived = |ledger: &Ledger, id: &u64| match mode {
        Mode::DeadLetterOdd if id % 2 == 1 => ledger.redriven.contains(id),
        _ => ledger.delivered.contains_key(id),
    };
    loop {
        if mode == Mode::DeadLetterOdd {
            let request = pb::RedriveRequest {
                channel: "faults.dead".into(),
                ..Default::default()
            };
            daemon.admin().await.redrive(request).await.unwrap();
        }
        let idle = Some(Duration::from_secs(1));
        consume_with(daemon.url.clone(), ledger.clone(), idle, mode).await;
        let done = {
            let ledger = ledger.lock().unwrap();
            ledger.confirmed.iter().all(|id| arrived(&ledger, id))
        };
        if done || tokio::time::Instant::now() > deadline {
            break;
        }
    }
    let info = daemon
        .admin()
        .await
        .get_channel(pb::GetChannelRequest {
            name: CHANNEL.into(),
        })
        .await
        .unwrap()
        .into_inner();
    {
        // Beyond what damage explains: show where things stand, for whoever debugs it.
        let ledger = ledger.lock().unwrap();
        let mut lost: Vec<u64> = ledger
            .confirmed
            .iter()
            .filter(|id| !arrived(&ledger, id))
            .copied()
            .collect();
        if lost.len() as u64 > info.damaged_messages {
            lost.sort();
            let first: Vec<_> = lost
                .iter()
                .take(20)
                .map(|id| {
                    (
                        id,
                        ledger.delivered.get(id),
                        ledger.dead_lettered.contains(id),
                    )
                })
                .collect();
            eprintln!(
                "{fault}: {} lost; the first (id, deliveries, dead-lettering confirmed): \
                 {first:?}\n{info:?}",
                lost.len()
            );
        }
    }
    // Acked records are collected, and their files deleted, once the acks are durable: all but
    // the file being appended to and one a crash may have left for the next start.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while segment_files(&data_dir).len() > 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let segments_left = segment_files(&data_dir).len();
    daemon.stop().await;
    let ledger = ledger.lock().unwrap();
    Row {
        fault,
        cycles,
        confirmed: ledger.confirmed.len(),
        deliveries: ledger.deliveries,
        lost: ledger
            .confirmed
            .iter()
            .filter(|id| !arrived(&ledger, id))
            .count(),
        duplicated: ledger.duplicated,
        unexpected: ledger.unexpected,
        corrupted: ledger.corrupted,
        damaged: info.damaged_messages,
        segments_left,
    }
}

async fn random_kills(cycles: u64, rng: &mut Rng) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let options = write_config(dir.path(), "");
    let ledger = Shared::default();
    for _ in 0..cycles {
        let daemon = Daemon::start_in(dir.path(), options.clone()).await;
        let wait = Duration::from_millis(rng.range(100..600));
        load_until(&daemon, &ledger, async {
            tokio::time::sleep(wait).await;
            common::signal(daemon.pid(), "KILL");
        })
        .await;
        daemon.kill().await;
    }
    settle(
        "kill -9 at random moments",
        cycles,
        dir.path(),
        options,
        ledger,
    )
    .await
}

async fn dead_letters_and_redrives(cycles: u64, rng: &mut Rng) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let options = write_config_with(dir.path(), "", DEAD_LETTERS);
    let ledger = Shared::default();
    for _ in 0..cycles {
        let daemon = Daemon::start_in(dir.path(), options.clone()).await;
        let wait = Duration::from_millis(rng.range(100..600));
        load_until_with(&daemon, &ledger, Mode::DeadLetterOdd, async {
            tokio::time::sleep(wait).await;
            common::signal(daemon.pid(), "KILL");
        })
        .await;
        daemon.kill().await;
    }
    let fault = "kill -9 amid dead letters, redrives";
    settle_with(
        fault,
        cycles,
        dir.path(),
        options,
        ledger,
        Mode::DeadLetterOdd,
    )
    .await
}

async fn fail_point(
    (point, fault, hits): (&'static str, &'static str, std::ops::Range<u64>),
    cycles: u64,
    rng: &mut Rng,
) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let options = write_config(dir.path(), "");
    let ledger = Shared::default();
    for _ in 0..cycles {
        let mut armed = options.clone();
        let nth = rng.range(hits.clone());
        armed
            .env
            .push(("FERRY_FAILPOINT".into(), format!("{point}:{nth}")));
        let daemon = Daemon::start_in(dir.path(), armed).await;
        let url = daemon.url.clone();
        load_until(&daemon, &ledger, async {
            // The daemon aborts itself at the point; it is gone once nothing answers.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while connect(&url).await.is_some() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        daemon.kill().await;
    }
    settle(fault, cycles, dir.path(), options, ledger).await
}

async fn stuck_consumer() -> Row {
    let dir = tempfile::tempdir().unwrap();
    let options = write_config(
        dir.path(),
        "[limits]\nconsumer_queue = \"256KiB\"\nconsumer_stall_timeout = \"1s\"\n",
    );
    let ledger = Shared::default();
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    let stuck = common::Consumer::try_attach(
        &daemon,
        CHANNEL,
        "s",
        pb::FlowControl {
            max_messages: 100_000,
            max_bytes: 1 << 30,
        },
    )
    .await
    .unwrap();
    load_until(&daemon, &ledger, async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        common::signal(daemon.pid(), "TERM");
    })
    .await;
    drop(stuck);
    daemon.stop().await;
    settle(
        "a consumer that stops reading",
        1,
        dir.path(),
        options,
        ledger,
    )
    .await
}

/// Publishing onto a 48 MiB tmpfs until the watermark refuses it, while the consumer drains,
/// then publishing again once acks have freed space. None where no tmpfs can be mounted.
async fn disk_full() -> Option<Row> {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("disk");
    std::fs::create_dir(&mount).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&mount)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        return None;
    }
    let mut options = write_config(dir.path(), "reserve = \"2MiB\"\n");
    options.data_dir = Some(mount.join("data"));
    let ledger = Shared::default();
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    // Fill until the watermark refuses publishing, with no one consuming...
    let publishers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(publish_batches(daemon.url.clone(), ledger.clone(), 50_000)))
        .collect();
    for task in publishers {
        let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
    }
    // A stream ends at its first refusal, which may be the free-space estimate's alone: the
    // monitor then looks at the disk and lifts it within moments. Filling goes on until a
    // refusal holds.
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    loop {
        // The probe is a message of the ledger like any other, should it be stored.
        let id = {
            let mut ledger = ledger.lock().unwrap();
            let id = ledger.next_id;
            ledger.next_id += 1;
            ledger.sent.extend([id]);
            id
        };
        let probe = daemon
            .publisher()
            .await
            .publish(pb::PublishRequest {
                channel: CHANNEL.into(),
                messages: vec![message(payload(id), &[], "")],
            })
            .await;
        match probe {
            Err(status) if status.code() == tonic::Code::ResourceExhausted => break,
            Err(status) => panic!("a publish on a filling disk failed otherwise: {status:?}"),
            Ok(_) => {
                ledger.lock().unwrap().confirmed.extend([id]);
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the disk never filled up to the watermark"
                );
                publish_batches(daemon.url.clone(), ledger.clone(), 1_000).await;
            }
        }
    }
    let filled = ledger.lock().unwrap().confirmed.len();
    // ...drain, which frees the space, and publish again.
    consume(
        daemon.url.clone(),
        ledger.clone(),
        Some(Duration::from_secs(1)),
    )
    .await;
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while ledger.lock().unwrap().confirmed.len() == filled && tokio::time::Instant::now() < deadline
    {
        publish_batches(daemon.url.clone(), ledger.clone(), 100).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ledger.lock().unwrap().confirmed.len() > filled,
        "publishing resumed once acks freed space"
    );
    daemon.stop().await;
    let row = settle(
        "a full disk, drained, refilled",
        1,
        dir.path(),
        options,
        ledger,
    )
    .await;
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&mount)
        .status();
    Some(row)
}

async fn damaged_segment() -> Row {
    let dir = tempfile::tempdir().unwrap();
    let options = write_config(dir.path(), "");
    let ledger = Shared::default();
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    // Published, not consumed: the damage must hit messages still stored.
    let publishers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(publish(daemon.url.clone(), ledger.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    daemon.stop().await;
    for task in publishers {
        let _ = tokio::time::timeout(common::PATIENCE, task).await;
    }
    let files = segment_files(&dir.path().join("data"));
    let target = &files[0];
    let mut bytes = std::fs::read(target).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 8] {
        *b ^= 0xA5;
    }
    std::fs::write(target, bytes).unwrap();
    settle(
        "a flipped byte in a segment file",
        1,
        dir.path(),
        options,
        ledger,
    )
    .await
}

#[tokio::test]
async fn the_fault_suite_loses_duplicates_and_corrupts_nothing() {
    let cycles: u64 = std::env::var("FERRY_FAULT_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let per_point = (cycles / 10).max(2);
    let mut rng = Rng::from_env("faults");
    let mut rows = vec![
        random_kills(cycles, &mut rng).await,
        dead_letters_and_redrives(cycles, &mut rng).await,
    ];
    // Commit points: past the two commits of the first start (the declared channel and
    // subscription). Between the segment sync and the checkpoint, sled's durable copy lags
    // the log: those kills test the replay.
    for point in [
        ("segment-written", "kill after the log write", 3..40),
        ("segment-synced", "kill after the log sync", 3..40),
        ("index-applied", "kill after the index update", 3..40),
        ("synced", "kill before the confirmation", 3..40),
        ("checkpointed", "kill after a checkpoint", 2..12),
    ] {
        rows.push(fail_point(point, per_point, &mut rng).await);
    }
    rows.push(stuck_consumer().await);
    match disk_full().await {
        Some(row) => rows.push(row),
        None => println!("a full disk: skipped (no tmpfs can be mounted here)"),
    }
    rows.push(damaged_segment().await);
    print_table(&rows);
    for row in &rows {
        assert!(row.confirmed > 0, "{}: nothing was confirmed", row.fault);
        assert_eq!(
            (row.duplicated, row.unexpected, row.corrupted),
            (0, 0, 0),
            "{}",
            row.fault
        );
        assert!(
            row.segments_left <= 2,
            "{}: {} segment files left after everything was acked",
            row.fault,
            row.segments_left
        );
        assert!(
            row.lost as u64 <= row.damaged,
            "{}: {} confirmed messages lost, {} reported damaged",
            row.fault,
            row.lost,
            row.damaged
        );
    }
    let damaged = rows.last().unwrap();
    assert!(
        damaged.damaged > 0,
        "the flipped bytes hit no stored message"
    );
}
