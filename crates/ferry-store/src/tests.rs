//! The store on its own: appends, reads across records and the tail cache, collection, reopen.

use super::*;
use bytes::Bytes;
use std::time::SystemTime;

fn messages(n: usize, size: usize) -> Vec<NewMessage> {
    (0..n)
        .map(|i| NewMessage {
            payload: Bytes::from(vec![i as u8; size]),
            key: format!("k{i}"),
            ..Default::default()
        })
        .collect()
}

/// Saves `floor` as a subscription's ack floor; the records below every floor of the channel
/// are collected in the same commit.
async fn ack(store: &Store, sub: SubscriptionId, floor: u64) {
    let state = AckState {
        floor,
        acked_total: floor - 1,
        acked_above_floor: vec![],
    };
    store.save_acks(sub, state).await.unwrap();
}

/// Creates a subscription named `name` on `channel`.
async fn subscribe(store: &Store, channel: ChannelId, name: &str) -> SubscriptionId {
    let settings = SubscriptionSettings {
        ack_deadline_ms: 1000,
        ..SubscriptionSettings::default()
    };
    store
        .create_subscription(channel, name.into(), settings, Position::Latest)
        .await
        .unwrap()
        .0
}

fn options(tail_cache_bytes: usize) -> StoreOptions {
    StoreOptions {
        tail_cache_bytes,
        // Index writes wait until something needs sled to hold them: the writer's reads all
        // go through the writes waiting.
        index_lag: Duration::from_secs(3600),
        ..StoreOptions::default()
    }
}

#[tokio::test]
async fn appends_survive_reopen_and_collection_frees_records() {
    let dir = tempfile::tempdir().unwrap();
    let (store, recovered) = Store::open(dir.path(), options(0)).unwrap();
    assert!(recovered.channels.is_empty());
    let channel = store
        .create_channel("orders".into(), ChannelSettings::default())
        .await
        .unwrap();
    let settings = SubscriptionSettings {
        ack_deadline_ms: 1000,
        ..SubscriptionSettings::default()
    };
    let (sub, acks) = store
        .create_subscription(channel, "audit".into(), settings, Position::Latest)
        .await
        .unwrap();
    assert_eq!(acks.floor, 1);

    // Large messages make large records; many small ones span several records.
    assert_eq!(
        store
            .append(channel, messages(3, 200_000))
            .await
            .unwrap()
            .stored,
        1..4
    );
    assert_eq!(
        store
            .append(channel, messages(1000, 1000))
            .await
            .unwrap()
            .stored,
        4..1004
    );
    let log = store.log(channel).unwrap();
    let all = log.read(1, usize::MAX, usize::MAX).unwrap();
    assert_eq!(all.len(), 1003);
    assert!(
        all.iter()
            .enumerate()
            .all(|(i, m)| m.sequence == i as u64 + 1)
    );
    assert_eq!(all[0].payload.len(), 200_000);
    assert_eq!(log.get(500).unwrap().unwrap().key, "k496");

    let state = AckState {
        floor: 600,
        acked_total: 599,
        acked_above_floor: vec![(700, 710)],
    };
    store.save_acks(sub, state.clone()).await.unwrap();
    let stats = log.stats();
    assert!(stats.first_seq > 1 && stats.first_seq <= 600, "{stats:?}");
    assert!(log.get(600).unwrap().is_some());
    store.close().await.unwrap();
    drop((store, log));

    let (store, recovered) = Store::open(dir.path(), options(1 << 20)).unwrap();
    assert_eq!(recovered.channels.len(), 1);
    assert_eq!(recovered.subscriptions[0].acks, state);
    let log = store.log(channel).unwrap();
    assert_eq!(log.stats(), stats);
    let rest = log.read(600, usize::MAX, usize::MAX).unwrap();
    assert_eq!(rest.len(), 404);
    assert_eq!(
        store.append(channel, messages(1, 10)).await.unwrap().stored,
        1004..1005
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn names_are_unique_and_deletes_remove_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let channel = store
        .create_channel("a".into(), ChannelSettings::default())
        .await
        .unwrap();
    assert!(matches!(
        store
            .create_channel("a".into(), ChannelSettings::default())
            .await,
        Err(StoreError::ChannelExists(_))
    ));
    let settings = SubscriptionSettings {
        ack_deadline_ms: 1000,
        ..SubscriptionSettings::default()
    };
    store
        .create_subscription(channel, "s".into(), settings, Position::Latest)
        .await
        .unwrap();
    assert!(matches!(
        store
            .create_subscription(channel, "s".into(), settings, Position::Latest)
            .await,
        Err(StoreError::SubscriptionExists(_))
    ));
    store.append(channel, messages(10, 10)).await.unwrap();
    store.delete_channel(channel).await.unwrap();
    assert!(matches!(
        store.append(channel, messages(1, 1)).await,
        Err(StoreError::ChannelNotFound)
    ));
    assert!(store.log(channel).is_err());
    shut(store).await;
    let (_store, recovered) = Store::open(dir.path(), StoreOptions::default()).unwrap();
    assert!(recovered.channels.is_empty() && recovered.subscriptions.is_empty());
}

#[tokio::test]
async fn weaker_fsync_modes_confirm_and_keep_what_was_confirmed_across_a_clean_close() {
    for fsync in [
        FsyncMode::Interval(Duration::from_millis(5)),
        FsyncMode::Never,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            fsync,
            ..StoreOptions::default()
        };
        let (store, _) = Store::open(dir.path(), options.clone()).unwrap();
        let channel = store
            .create_channel("c".into(), ChannelSettings::default())
            .await
            .unwrap();
        // Messages are only stored for a channel that has a subscription.
        subscribe(&store, channel, "s").await;
        for _ in 0..10 {
            store.append(channel, messages(10, 100)).await.unwrap();
            // Let the interval's timer fire between some writes.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        store.close().await.unwrap();
        drop(store);
        let (store, _) = Store::open(dir.path(), options).unwrap();
        let log = store.log(channel).unwrap();
        assert_eq!(
            log.read(1, usize::MAX, usize::MAX).unwrap().len(),
            100,
            "{fsync:?}"
        );
    }
}

#[tokio::test]
async fn collection_never_passes_the_lowest_subscription_floor() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let channel = store
        .create_channel("c".into(), ChannelSettings::default())
        .await
        .unwrap();
    let slow = subscribe(&store, channel, "slow").await;
    let fast = subscribe(&store, channel, "fast").await;
    for _ in 0..5 {
        store.append(channel, messages(10, 100)).await.unwrap();
    }
    // The fast one's floor alone moves nothing: the slow one still needs everything.
    ack(&store, fast, 51).await;
    let log = store.log(channel).unwrap();
    assert_eq!(log.stats().first_seq, 1);
    assert_eq!(log.read(1, usize::MAX, usize::MAX).unwrap().len(), 50);

    // Once the slow one moves, records wholly below both floors go.
    ack(&store, slow, 31).await;
    let first = log.stats().first_seq;
    assert!(first > 1 && first <= 31, "{first}");
    store.close().await.unwrap();
}

#[tokio::test]
async fn reads_are_contiguous_across_disk_and_a_tiny_tail_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(2_000)).unwrap();
    let channel = store
        .create_channel("c".into(), ChannelSettings::default())
        .await
        .unwrap();
    // Messages are only stored for a channel that has a subscription.
    subscribe(&store, channel, "s").await;
    for _ in 0..50 {
        store.append(channel, messages(20, 300)).await.unwrap();
    }
    let log = store.log(channel).unwrap();
    let mut next = 1;
    while next <= 1000 {
        let batch = log.read(next, 37, 5_000).unwrap();
        assert!(!batch.is_empty());
        for m in batch {
            assert_eq!(m.sequence, next, "no gap, no repeat");
            next += 1;
        }
    }
    assert!(log.read(1001, 10, 10_000).unwrap().is_empty());
    store.close().await.unwrap();
}

fn segment_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .count()
}

/// The number of segment files once the next checkpoint has deleted what it may (a file goes
/// only once sled's durable copy no longer names it).
async fn segment_files_after_checkpoint(dir: &std::path::Path, expected: usize) -> usize {
    // Checkpoints come every 200 ms; a loaded machine may take much longer.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while segment_files(dir) > expected && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    segment_files(dir)
}

#[tokio::test]
async fn segment_files_are_deleted_once_everything_in_them_is_acked() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        segment_bytes: 64 * 1024,
        tail_cache_bytes: 0,
        ..StoreOptions::default()
    };
    let (store, _) = Store::open(dir.path(), options.clone()).unwrap();
    let channel = store
        .create_channel("c".into(), ChannelSettings::default())
        .await
        .unwrap();
    let sub = subscribe(&store, channel, "s").await;
    for _ in 0..40 {
        store.append(channel, messages(10, 1000)).await.unwrap();
    }
    assert!(
        segment_files(dir.path()) > 5,
        "400 KB of records span several 64 KiB segments"
    );

    // Ack the first 300 of 400: the segments holding only those go, the rest stay readable.
    ack(&store, sub, 301).await;
    let log = store.log(channel).unwrap();
    assert!(log.stats().first_seq > 250, "{:?}", log.stats());
    let left = segment_files_after_checkpoint(dir.path(), 3).await;
    assert!(left <= 3, "{left} segment files left");
    assert_eq!(log.read(301, usize::MAX, usize::MAX).unwrap().len(), 100);
    store.close().await.unwrap();
    drop((store, log));

    // A restart keeps what is indexed and starts a new segment.
    let (store, _) = Store::open(dir.path(), options).unwrap();
    let log = store.log(channel).unwrap();
    let rest = log.read(301, usize::MAX, usize::MAX).unwrap();
    assert_eq!(
        rest.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        (301..=400).collect::<Vec<_>>()
    );
    store.append(channel, messages(1, 10)).await.unwrap();
    assert_eq!(log.get(401).unwrap().unwrap().payload.len(), 10);
    ack(&store, sub, 402).await;
    assert_eq!(log.stats().bytes, 0);
    assert_eq!(
        segment_files_after_checkpoint(dir.path(), 1).await,
        1,
        "only the segment being appended to is left"
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_segment_emptied_while_current_is_deleted_once_finished() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        segment_bytes: 16 * 1024,
        tail_cache_bytes: 0,
        // Plain files, so that which commit goes to which file depends on sizes alone, not
        // on when a preallocated file is ready.
        preallocate: false,
        ..StoreOptions::default()
    };
    let (store, _) = Store::open(dir.path(), options).unwrap();
    let channel = store
        .create_channel("c".into(), ChannelSettings::default())
        .await
        .unwrap();
    let sub = subscribe(&store, channel, "s").await;
    // One record of about 15 KB, under the segment size: its ack's commit goes to the same
    // file, and empties it while it is still current.
    store.append(channel, messages(15, 1000)).await.unwrap();
    ack(&store, sub, 16).await;
    assert_eq!(segment_files(dir.path()), 1);
    // More commits with no records take the file past the segment size; the next commit
    // starts a new file, and only then can the emptied one go.
    for _ in 0..40 {
        ack(&store, sub, 16).await;
    }
    assert_eq!(segment_files_after_checkpoint(dir.path(), 1).await, 1);
    let name = std::fs::read_dir(dir.path().join("segments"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".seg"))
        .unwrap();
    assert_ne!(
        name, "0000000001.seg",
        "the emptied file went, the new one stays"
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_torn_tail_after_the_last_whole_commit_is_cut_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let channel = store
        .create_channel("c".into(), ChannelSettings::default())
        .await
        .unwrap();
    subscribe(&store, channel, "s").await;
    store.append(channel, messages(10, 100)).await.unwrap();
    shut(store).await;
    let path = dir.path().join("segments/0000000001.seg");
    let whole = std::fs::metadata(&path).unwrap().len();
    // A frame a crash cut short: a header that promises more than the file holds.
    {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let mut torn = vec![0xF4u8];
        torn.extend(1u32.to_le_bytes()); // channel
        torn.extend(11u64.to_le_bytes()); // first sequence
        torn.extend(5u32.to_le_bytes()); // count
        torn.extend(1000u32.to_le_bytes()); // body length: more than follows
        torn.extend(0u32.to_le_bytes()); // checksum
        torn.extend([7u8; 10]);
        file.write_all(&torn).unwrap();
    }
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
    assert!(!dir.path().join("segments/quarantine").exists());
    assert_eq!(
        store
            .log(channel)
            .unwrap()
            .read(1, 100, usize::MAX)
            .unwrap()
            .len(),
        10
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn records_of_a_channel_the_index_lost_are_quarantined_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let kept = store
        .create_channel("kept".into(), ChannelSettings::default())
        .await
        .unwrap();
    subscribe(&store, kept, "s").await;
    store.append(kept, messages(10, 100)).await.unwrap();
    shut(store).await;

    // sled comes back as it was before "lost" existed; the segment files still hold its
    // records (as after a damaged index).
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let lost = store
        .create_channel("lost".into(), ChannelSettings::default())
        .await
        .unwrap();
    subscribe(&store, lost, "s").await;
    store.append(lost, messages(5, 100)).await.unwrap();
    shut(store).await;
    {
        let db = sled::open(dir.path()).unwrap();
        db.remove(codec::channel_key(lost)).unwrap();
        for entry in db.scan_prefix(b"S") {
            let (key, value) = entry.unwrap();
            if codec::SubscriptionRecord::decode(&value).unwrap().channel == lost {
                db.remove(&key).unwrap();
                db.remove([&b"A"[..], &key[1..]].concat()).unwrap();
            }
        }
        for entry in db.scan_prefix(codec::channel_log_prefix(lost)) {
            db.remove(entry.unwrap().0).unwrap();
        }
        db.insert(codec::KEY_NEXT_ID, &lost.0.to_le_bytes())
            .unwrap();
        // The lost channel's records went to the segment file started by the second open;
        // the log end still says the index saw them (a hole, not a lost tail).
        db.remove(codec::segment_key(2)).unwrap();
        db.flush().unwrap();
    }

    let (store, recovered) = Store::open(dir.path(), options(0)).unwrap();
    assert_eq!(recovered.channels.len(), 1);
    let log = store.log(kept).unwrap();
    assert_eq!(log.read(1, 100, usize::MAX).unwrap().len(), 10);
    let quarantined: Vec<_> = std::fs::read_dir(dir.path().join("segments/quarantine"))
        .unwrap()
        .collect();
    assert_eq!(
        quarantined.len(),
        1,
        "the lost channel's segment file is kept aside"
    );
    // Neither an id nor a sequence is given out twice.
    assert!(
        store
            .create_channel("new".into(), ChannelSettings::default())
            .await
            .unwrap()
            .0
            > lost.0
    );
    assert_eq!(
        store.append(kept, messages(1, 10)).await.unwrap().stored,
        11..12
    );
    store.close().await.unwrap();
}

/// Closes the store and lets go of it, as a stopped broker does.
async fn shut(store: Store) {
    store.close().await.unwrap();
}

/// Copies sled's own files (not the segment log) from `from` to `to`, replacing those there.
/// A store in `dir` with a channel, a subscription to it and 10 messages, closed, its index
/// copied to `saved`: to be put back later, as sled's durable copy lagging the log would.
async fn ten_stored_and_saved(
    dir: &std::path::Path,
    saved: &std::path::Path,
    channel: &str,
    subscription: &str,
) -> (ChannelId, SubscriptionId) {
    let (store, _) = Store::open(dir, options(0)).unwrap();
    let channel = store
        .create_channel(channel.into(), ChannelSettings::default())
        .await
        .unwrap();
    let subscription = subscribe(&store, channel, subscription).await;
    store.append(channel, messages(10, 100)).await.unwrap();
    shut(store).await;
    copy_index(dir, saved);
    (channel, subscription)
}

fn copy_index(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(to).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "db" || name == "conf" || name.starts_with("snap.") {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "db" || name == "conf" || name.starts_with("snap.") {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

/// What a reopened store holds, in a form two stores can be compared by.
fn contents(store: &Store, recovered: &Recovered) -> Vec<String> {
    let mut out = Vec::new();
    for c in &recovered.channels {
        let log = store.log(c.id).unwrap();
        let stats = log.stats();
        let seqs: Vec<u64> = log
            .read(stats.first_seq, usize::MAX, usize::MAX)
            .unwrap()
            .iter()
            .map(|m| m.sequence)
            .collect();
        let withdrawn = log.watch_withdrawn().borrow().clone();
        out.push(format!(
            "channel {} {:?} {stats:?} {seqs:?} withdrawn {withdrawn:?}",
            c.id.0, c.name
        ));
    }
    for s in &recovered.subscriptions {
        out.push(format!(
            "subscription {} {:?} on {} {:?} {:?} {:?}",
            s.id.0, s.name, s.channel.0, s.settings, s.acks, s.failures
        ));
    }
    out.sort();
    out
}

#[tokio::test]
async fn replaying_the_log_from_an_older_index_gives_exactly_what_was_committed() {
    // sled's durable copy lags the log (it is flushed in the background): after a crash it
    // comes back older. Here it is made older by hand: every commit after the saved copy must
    // be replayed from the segment log to the very same state.
    let dir = tempfile::tempdir().unwrap();
    let saved = tempfile::tempdir().unwrap();
    let (orders, audit) = ten_stored_and_saved(dir.path(), saved.path(), "orders", "audit").await;

    // Every kind of change after the copy.
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    store.append(orders, messages(20, 100)).await.unwrap();
    ack(&store, audit, 6).await;
    let billing = subscribe(&store, orders, "billing").await;
    store.append(orders, messages(5, 100)).await.unwrap();
    let settings = SubscriptionSettings {
        ack_deadline_ms: 7_000,
        ..SubscriptionSettings::default()
    };
    store.update_subscription(billing, settings).await.unwrap();
    let gone = store
        .create_channel("gone".into(), ChannelSettings::default())
        .await
        .unwrap();
    subscribe(&store, gone, "s").await;
    store.append(gone, messages(3, 100)).await.unwrap();
    store.delete_channel(gone).await.unwrap();
    let quiet = store
        .create_channel("quiet".into(), ChannelSettings::default())
        .await
        .unwrap();
    store.append(quiet, messages(4, 100)).await.unwrap();
    let temp = subscribe(&store, orders, "temp").await;
    store.delete_subscription(temp).await.unwrap();
    // A failure record, a dead letter with its ack, and a redrive.
    let dead = store
        .create_channel("dead".into(), ChannelSettings::default())
        .await
        .unwrap();
    // Its subscriber acks nothing, so that nothing is collected (replay leaves collection to
    // the first commit after it).
    subscribe(&store, dead, "inspect").await;
    let settings = SubscriptionSettings {
        dead_letter: Some(dead),
        max_delivery_attempts: 2,
        ..SubscriptionSettings::default()
    };
    store.update_subscription(billing, settings).await.unwrap();
    let update = AckUpdate {
        state: AckState {
            floor: 31,
            acked_total: 1,
            acked_above_floor: vec![(32, 33)],
        },
        failures: vec![(33, Some(failure(1))), (32, None)],
        dead_letters: (32..34)
            .zip(messages(2, 10))
            .map(|(s, m)| (s, dead, m))
            .collect(),
    };
    store
        .submit_acks(billing, update)
        .await
        .unwrap()
        .confirmed()
        .await
        .unwrap();
    let moved = store.redrive(
        dead,
        orders,
        messages(1, 10).into_iter().map(|m| (2, m)).collect(),
    );
    assert_eq!(moved.await.unwrap(), vec![(2, 36)]);
    // Not so far that the copy's records are collected: a file is deleted only once sled's
    // durable copy no longer names it, which a real crash never takes back.
    ack(&store, audit, 8).await;
    // A seek back, which also drops billing's failure records.
    store.seek(billing, Position::Sequence(20)).await.unwrap();
    shut(store).await;

    let (store, recovered) = Store::open(dir.path(), options(0)).unwrap();
    let expected = contents(&store, &recovered);
    assert!(
        expected.iter().any(|line| line.contains("floor: 20")),
        "{expected:?}"
    );
    shut(store).await;

    copy_index(saved.path(), dir.path());
    let (store, recovered) = Store::open(dir.path(), options(0)).unwrap();
    assert_eq!(contents(&store, &recovered), expected);
    // Ids and sequences go on from where the log ends.
    assert!(
        store
            .create_channel("next".into(), ChannelSettings::default())
            .await
            .unwrap()
            .0
            > temp.0
    );
    assert_eq!(
        store.append(quiet, messages(1, 1)).await.unwrap().stored,
        5..6
    );
    assert_eq!(
        store.append(orders, messages(1, 1)).await.unwrap().stored,
        37..38
    );
    store.close().await.unwrap();
}

fn failure(count: u32) -> Failure {
    Failure {
        count,
        retry_at_ms: 1_700_000_000_000,
        cause: "nack".into(),
        reason: "the bank said no".into(),
    }
}

#[tokio::test]
async fn dead_letters_commit_with_their_acks_and_redrives_move_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let orders = store
        .create_channel("orders".into(), ChannelSettings::default())
        .await
        .unwrap();
    let dead = store
        .create_channel("orders.dead".into(), ChannelSettings::default())
        .await
        .unwrap();
    let settings = SubscriptionSettings {
        dead_letter: Some(dead),
        max_delivery_attempts: 3,
        ..SubscriptionSettings::default()
    };
    let (work, _) = store
        .create_subscription(orders, "work".into(), settings, Position::Latest)
        .await
        .unwrap();
    store.append(orders, messages(5, 100)).await.unwrap();
    let update = AckUpdate {
        state: AckState {
            floor: 1,
            acked_total: 2,
            acked_above_floor: vec![(2, 4)],
        },
        failures: vec![(1, Some(failure(2))), (3, None)],
        dead_letters: [2, 4]
            .into_iter()
            .zip(messages(2, 50))
            .map(|(s, m)| (s, dead, m))
            .collect(),
    };
    store
        .submit_acks(work, update)
        .await
        .unwrap()
        .confirmed()
        .await
        .unwrap();
    // A dead letter sent again with a later save (its first save's outcome was unknown) is
    // not appended again: the state it committed with acks its original.
    let again = AckUpdate {
        state: AckState {
            floor: 1,
            acked_total: 3,
            acked_above_floor: vec![(2, 5)],
        },
        dead_letters: vec![(2, dead, messages(1, 50).remove(0))],
        ..AckUpdate::default()
    };
    store
        .submit_acks(work, again)
        .await
        .unwrap()
        .confirmed()
        .await
        .unwrap();
    // Nobody subscribes to the dead-letter channel, and still it keeps what it receives.
    let dead_log = store.log(dead).unwrap();
    assert_eq!(dead_log.read(1, 10, usize::MAX).unwrap().len(), 2);
    assert!(matches!(
        store.delete_channel(dead).await,
        Err(StoreError::ChannelInUse(name)) if name == "work"
    ));

    let moves = |seqs: &[u64]| {
        seqs.iter()
            .map(|&seq| (seq, messages(1, 10).remove(0)))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        store
            .redrive(dead, orders, moves(&[2, 2, 9]))
            .await
            .unwrap(),
        vec![(2, 6)]
    );
    assert_eq!(
        store.redrive(dead, orders, moves(&[2])).await.unwrap(),
        vec![]
    );
    assert_eq!(dead_log.watch_withdrawn().borrow()[..], [(2, 3)]);
    drop(dead_log);
    shut(store).await;

    let (store, recovered) = Store::open(dir.path(), options(0)).unwrap();
    assert_eq!(recovered.subscriptions[0].failures, vec![(1, failure(2))]);
    assert_eq!(
        store.log(dead).unwrap().watch_withdrawn().borrow()[..],
        [(2, 3)]
    );
    // A subscription of a dead-letter channel starts at the first message it holds.
    let (_, acks) = store
        .create_subscription(
            dead,
            "inspect".into(),
            SubscriptionSettings::default(),
            Position::Latest,
        )
        .await
        .unwrap();
    assert_eq!(acks.floor, 1);
    shut(store).await;
}

#[tokio::test]
async fn replay_leaves_no_index_entry_behind_a_channel_it_empties() {
    // Collected live, then emptied by a publish nobody subscribes to: replay does not collect,
    // so without care the old entries would stay and pin their segment file for good.
    let dir = tempfile::tempdir().unwrap();
    let saved = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let channel = store
        .create_channel("c".into(), ChannelSettings::default())
        .await
        .unwrap();
    let sub = subscribe(&store, channel, "s").await;
    store.append(channel, messages(10, 100)).await.unwrap();
    // Another channel keeps the first segment file alive, as a crash would find it.
    let kept = store
        .create_channel("kept".into(), ChannelSettings::default())
        .await
        .unwrap();
    subscribe(&store, kept, "s").await;
    store.append(kept, messages(3, 100)).await.unwrap();
    shut(store).await;
    copy_index(dir.path(), saved.path());

    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    ack(&store, sub, 11).await;
    store.delete_subscription(sub).await.unwrap();
    assert_eq!(
        store
            .append(channel, messages(5, 100))
            .await
            .unwrap()
            .stored,
        11..16
    );
    shut(store).await;

    copy_index(saved.path(), dir.path());
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let stats = store.log(channel).unwrap().stats();
    assert_eq!((stats.first_seq, stats.next_seq, stats.bytes), (16, 16, 0));
    assert_eq!(
        store
            .log(kept)
            .unwrap()
            .read(1, 100, usize::MAX)
            .unwrap()
            .len(),
        3
    );
    shut(store).await;
    // Nothing of the emptied channel is left in the index.
    let db = sled::open(dir.path()).unwrap();
    assert_eq!(
        db.scan_prefix(codec::channel_log_prefix(channel)).count(),
        0
    );
}

#[tokio::test]
async fn a_channel_created_and_deleted_after_the_index_copy_is_not_lost_on_replay() {
    let dir = tempfile::tempdir().unwrap();
    let saved = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    store
        .create_channel("kept".into(), ChannelSettings::default())
        .await
        .unwrap();
    shut(store).await;
    copy_index(dir.path(), saved.path());

    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let gone = store
        .create_channel("gone".into(), ChannelSettings::default())
        .await
        .unwrap();
    subscribe(&store, gone, "s").await;
    store.append(gone, messages(5, 100)).await.unwrap();
    store.delete_channel(gone).await.unwrap();
    shut(store).await;

    copy_index(saved.path(), dir.path());
    let (store, recovered) = Store::open(dir.path(), options(0)).unwrap();
    assert_eq!(recovered.channels.len(), 1);
    assert!(
        !dir.path().join("segments/quarantine").exists(),
        "a deleted channel's records are not taken for lost ones"
    );
    assert!(
        store
            .create_channel("next".into(), ChannelSettings::default())
            .await
            .unwrap()
            .0
            > gone.0
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn ack_states_queued_together_replay_to_the_last_one() {
    // States queued back to back share groups, where the latest of each subscription replaces
    // the earlier ones in the commit frame: live and replayed, the last state wins.
    let dir = tempfile::tempdir().unwrap();
    let saved = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let channel = store
        .create_channel("c".into(), ChannelSettings::default())
        .await
        .unwrap();
    let a = subscribe(&store, channel, "a").await;
    let b = subscribe(&store, channel, "b").await;
    store.append(channel, messages(200, 10)).await.unwrap();
    shut(store).await;
    copy_index(dir.path(), saved.path());

    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let mut confirmations = Vec::new();
    for floor in 2..=150u64 {
        for (sub, floor) in [(a, floor), (b, floor / 2 + 1)] {
            let state = AckState {
                floor,
                acked_total: floor - 1,
                acked_above_floor: vec![(floor + 1, floor + 2)],
            };
            let update = crate::AckUpdate {
                state,
                ..Default::default()
            };
            confirmations.push(store.submit_acks(sub, update).await.unwrap());
        }
    }
    for confirmation in confirmations {
        confirmation.confirmed().await.unwrap();
    }
    let commits = store.counters().commits;
    shut(store).await;
    assert!(
        commits < 298,
        "some states shared a commit ({commits} commits)"
    );

    copy_index(saved.path(), dir.path());
    let (store, recovered) = Store::open(dir.path(), options(0)).unwrap();
    let floors: HashMap<_, _> = recovered
        .subscriptions
        .iter()
        .map(|s| (s.id, (s.acks.floor, s.acks.acked_above_floor.clone())))
        .collect();
    assert_eq!(floors[&a], (150, vec![(151, 152)]));
    assert_eq!(floors[&b], (76, vec![(77, 78)]));
    store.close().await.unwrap();
}

#[tokio::test]
async fn retention_keeps_acked_messages_until_they_age_out_and_positions_find_them() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let keep = ChannelSettings {
        retention: Retention {
            max_age_ms: 1500,
            max_bytes: 0,
        },
        ..ChannelSettings::default()
    };
    let events = store.create_channel("events".into(), keep).await.unwrap();
    // No subscription, and still stored.
    store.append(events, messages(10, 100)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.append(events, messages(10, 100)).await.unwrap();
    let log = store.log(events).unwrap();
    assert_eq!(log.stats().first_seq, 1);
    // A subscription acks everything: retention still keeps it.
    let sub = subscribe(&store, events, "all").await;
    ack(&store, sub, 21).await;
    assert_eq!(log.stats().first_seq, 1);
    store.catch_up().await;
    assert!(store.retained_bytes(events, 21).unwrap() > 2000);

    let start = |position| {
        let store = store.clone();
        async move {
            store
                .create_subscription(
                    events,
                    format!("{position:?}"),
                    SubscriptionSettings::default(),
                    position,
                )
                .await
                .map(|(_, acks)| acks.floor)
        }
    };
    assert_eq!(start(Position::Earliest).await.unwrap(), 1);
    assert_eq!(start(Position::Latest).await.unwrap(), 21);
    assert_eq!(start(Position::Sequence(7)).await.unwrap(), 7);
    assert_eq!(start(Position::Time(before)).await.unwrap(), 11);
    assert_eq!(start(Position::Time(u64::MAX)).await.unwrap(), 21);
    assert!(matches!(
        start(Position::Sequence(99)).await,
        Err(StoreError::OutOfRange {
            first_seq: 1,
            next_seq: 21,
            ..
        })
    ));
    store.catch_up().await;
    let retained = store.retained_bytes(events, 21).unwrap();
    store.close().await.unwrap();
    // The writer cannot catch sled up any more: the figure is what sled holds, not an error.
    store.catch_up().await;
    assert_eq!(store.retained_bytes(events, 21).unwrap(), retained);
    drop((log, store));

    // Age out, through the writer's timer, with every subscription's floor at the end.
    let (store, recovered) = Store::open(dir.path(), options(0)).unwrap();
    for s in &recovered.subscriptions {
        ack(&store, s.id, 21).await;
    }
    let log = store.log(events).unwrap();
    assert_eq!(log.stats().first_seq, 1, "not yet old enough");
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_eq!(log.stats().first_seq, 21);
    assert!(matches!(
        store
            .create_subscription(
                events,
                "late".into(),
                SubscriptionSettings::default(),
                Position::Sequence(3)
            )
            .await,
        Err(StoreError::OutOfRange { first_seq: 21, .. })
    ));
    drop(log);
    shut(store).await;
}

#[tokio::test]
async fn retention_by_size_drops_the_oldest_acked_records_first() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let keep = ChannelSettings {
        retention: Retention {
            max_age_ms: 0,
            max_bytes: 3000,
        },
        ..ChannelSettings::default()
    };
    let events = store.create_channel("events".into(), keep).await.unwrap();
    let sub = subscribe(&store, events, "all").await;
    for _ in 0..10 {
        store.append(events, messages(1, 1000)).await.unwrap();
    }
    let log = store.log(events).unwrap();
    assert_eq!(log.stats().first_seq, 1, "nothing acked: all kept");
    ack(&store, sub, 11).await;
    let stats = log.stats();
    // Records of about 1,050 bytes: two fit in 3,000, a third would not.
    assert!(stats.bytes <= 3000 && stats.bytes > 2000, "{stats:?}");
    assert_eq!(stats.first_seq, 9);
    drop(log);
    shut(store).await;
}

fn with_ids(ids: &[&str]) -> Vec<NewMessage> {
    ids.iter()
        .map(|id| NewMessage {
            payload: Bytes::from_static(b"x"),
            id: (*id).into(),
            ..Default::default()
        })
        .collect()
}

#[tokio::test]
async fn published_ids_are_stored_once_within_the_window_even_after_a_replay() {
    let dir = tempfile::tempdir().unwrap();
    let saved = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let orders = store
        .create_channel("orders".into(), ChannelSettings::default())
        .await
        .unwrap();
    let short = ChannelSettings {
        dedup_window_ms: 300,
        ..ChannelSettings::default()
    };
    let quick = store.create_channel("quick".into(), short).await.unwrap();
    shut(store).await;
    copy_index(dir.path(), saved.path());

    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    // A second copy within one batch is a duplicate of the first.
    let first = store
        .append(orders, with_ids(&["a", "b", "a", ""]))
        .await
        .unwrap();
    assert_eq!(first.stored, 1..4);
    assert_eq!(first.duplicates, vec![(2, 1)]);
    assert_eq!(first.sequences(), vec![1, 2, 1, 3]);
    let again = store.append(orders, with_ids(&["b", "c"])).await.unwrap();
    assert_eq!((again.stored, again.duplicates), (4..5, vec![(0, 2)]));
    store.append(quick, with_ids(&["q"])).await.unwrap();
    shut(store).await;

    // The index made older by hand: the ids come back from the log.
    copy_index(saved.path(), dir.path());
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let replayed = store
        .append(orders, with_ids(&["a", "c", "d"]))
        .await
        .unwrap();
    assert_eq!(replayed.sequences(), vec![1, 4, 5]);
    // Past its window an id is new again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = store.append(quick, with_ids(&["q"])).await.unwrap();
    assert!(later.duplicates.is_empty(), "{later:?}");
    shut(store).await;
}

fn delayed(payload: &'static str, due_ms: u64, id: &str) -> NewMessage {
    NewMessage {
        payload: Bytes::from_static(payload.as_bytes()),
        attributes: Attributes::from_pairs([(DELIVER_AT, due_ms.to_string())]),
        id: id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn delayed_messages_enter_their_channel_when_due_even_after_a_replay() {
    let dir = tempfile::tempdir().unwrap();
    let saved = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let orders = store
        .create_channel("orders".into(), ChannelSettings::default())
        .await
        .unwrap();
    subscribe(&store, orders, "all").await;
    shut(store).await;
    copy_index(dir.path(), saved.path());

    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let batch = vec![
        delayed("late", now + 1500, "l"),
        delayed("now", now - 10, ""),
        delayed("soon", now + 700, ""),
    ];
    let appended = store.append(orders, batch).await.unwrap();
    assert_eq!(appended.sequences(), vec![0, 1, 0]);
    // A retried publish of a delayed message is its duplicate.
    let again = store
        .append(orders, vec![delayed("late", now + 1500, "l")])
        .await
        .unwrap();
    assert_eq!(again.duplicates, vec![(0, 0)]);
    let log = store.log(orders).unwrap();
    assert_eq!((log.stats().next_seq, log.stats().delayed), (2, 2));
    shut(store).await;

    // The index made older by hand: the delayed messages come back from the log.
    copy_index(saved.path(), dir.path());
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let log = store.log(orders).unwrap();
    assert_eq!(log.stats().delayed, 2);
    let mut end = log.watch_end();
    while *end.borrow() < 4 {
        tokio::time::timeout(Duration::from_secs(5), end.changed())
            .await
            .expect("due messages arrive")
            .unwrap();
    }
    let arrived = log.read(2, 10, 1 << 20).unwrap();
    let payloads: Vec<&[u8]> = arrived.iter().map(|m| m.payload.as_ref()).collect();
    assert_eq!(payloads, [b"soon".as_ref(), b"late".as_ref()]);
    let late = &arrived[1];
    assert!(late.publish_time_ms >= now + 1500, "not before it was due");
    assert_eq!(late.id, "l");
    assert_eq!(
        late.attributes.get(DELIVER_AT),
        Some((now + 1500).to_string().as_str())
    );
    let stats = log.stats();
    assert_eq!((stats.delayed, stats.delayed_bytes), (0, 0));
    drop(log);
    shut(store).await;
    // Nothing moves twice.
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    assert_eq!(store.log(orders).unwrap().stats().next_seq, 4);
    shut(store).await;
}

fn limited(max_messages: u64, policy: LimitPolicy, retention: Retention) -> ChannelSettings {
    ChannelSettings {
        retention,
        limits: ChannelLimits {
            max_messages,
            max_bytes: 0,
            policy,
        },
        ..ChannelSettings::default()
    }
}

#[tokio::test]
async fn a_full_channel_refuses_publishes_after_its_retained_messages_went() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let keep = Retention {
        max_age_ms: 3_600_000,
        max_bytes: 0,
    };
    let capped = store
        .create_channel("capped".into(), limited(10, LimitPolicy::Reject, keep))
        .await
        .unwrap();
    let sub = subscribe(&store, capped, "all").await;
    for _ in 0..10 {
        store.append(capped, messages(1, 100)).await.unwrap();
    }
    let refused = store.append(capped, messages(1, 100)).await.unwrap_err();
    assert!(
        matches!(&refused, StoreError::ChannelFull { channel, limit }
            if channel == "capped" && limit.contains("max_messages is 10")),
        "{refused}"
    );
    let too_big = store.append(capped, messages(11, 1)).await.unwrap_err();
    assert!(too_big.to_string().contains("the batch alone"), "{too_big}");
    // Acked by the only subscription, 1 to 4 are kept only by retention: they go first.
    ack(&store, sub, 5).await;
    let log = store.log(capped).unwrap();
    assert_eq!(log.stats().first_seq, 1, "retention keeps what fits");
    store.append(capped, messages(4, 100)).await.unwrap();
    assert_eq!(log.stats().first_seq, 5, "{:?}", log.stats());
    let refused = store.append(capped, messages(1, 100)).await.unwrap_err();
    assert!(matches!(refused, StoreError::ChannelFull { .. }));
    drop(log);
    shut(store).await;
}

fn letter(message: &Message, why: &Dropped<'_>) -> Option<NewMessage> {
    Some(NewMessage {
        payload: message.payload.clone(),
        attributes: Attributes::from_pairs([
            ("for", why.subscription.to_owned()),
            ("sequence", message.sequence.to_string()),
        ]),
        ..Default::default()
    })
}

#[tokio::test]
async fn a_full_channel_drops_its_oldest_messages_and_dead_letters_them() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        dead_letter: Some(letter),
        ..options(0)
    };
    let (store, _) = Store::open(dir.path(), options.clone()).unwrap();
    let dlq = store
        .create_channel("dlq".into(), ChannelSettings::default())
        .await
        .unwrap();
    let settings = limited(5, LimitPolicy::DropOldest, Retention::default());
    let orders = store
        .create_channel("orders".into(), settings)
        .await
        .unwrap();
    let with_dlq = SubscriptionSettings {
        dead_letter: Some(dlq),
        ..SubscriptionSettings::default()
    };
    let (careful, _) = store
        .create_subscription(orders, "careful".into(), with_dlq, Position::Latest)
        .await
        .unwrap();
    let plain = subscribe(&store, orders, "plain").await;
    for _ in 0..5 {
        store.append(orders, messages(1, 10)).await.unwrap();
    }
    // `careful` has acked 1 already: only 2 is dead-lettered for it.
    let state = AckState {
        floor: 1,
        acked_total: 1,
        acked_above_floor: vec![(1, 2)],
    };
    store.save_acks(careful, state).await.unwrap();
    ack(&store, plain, 1).await;
    assert_eq!(
        store.append(orders, messages(2, 10)).await.unwrap().stored,
        6..8
    );
    let log = store.log(orders).unwrap();
    assert_eq!(log.stats().dropped, 2);
    let withdrawn = log.watch_withdrawn().borrow().clone();
    assert_eq!(&withdrawn[..], &[(1, 3)]);
    let letters = store.log(dlq).unwrap().read(1, 10, 1 << 20).unwrap();
    let which: Vec<(&str, &str)> = letters
        .iter()
        .map(|m| {
            (
                m.attributes.get("for").unwrap(),
                m.attributes.get("sequence").unwrap(),
            )
        })
        .collect();
    assert_eq!(which, [("careful", "2")]);
    drop(log);
    shut(store).await;
    // The count and the withdrawal survive a restart.
    let (store, _) = Store::open(dir.path(), options).unwrap();
    let log = store.log(orders).unwrap();
    assert_eq!(log.stats().dropped, 2);
    assert_eq!(&log.watch_withdrawn().borrow()[..], &[(1, 3)]);
    drop(log);
    shut(store).await;
}

#[tokio::test]
async fn a_deleted_channels_ids_and_delayed_messages_are_swept_in_bounded_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let orders = store
        .create_channel("orders".into(), ChannelSettings::default())
        .await
        .unwrap();
    subscribe(&store, orders, "all").await;
    let ids: Vec<String> = (0..3000).map(|i| format!("id-{i}")).collect();
    for chunk in ids.chunks(500) {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        store.append(orders, with_ids(&chunk)).await.unwrap();
    }
    store
        .append(orders, vec![delayed("later", u64::MAX / 2, "")])
        .await
        .unwrap();
    store.delete_channel(orders).await.unwrap();
    // Swept by the writer's next checks (the first within a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    shut(store).await;
    let db = sled::open(dir.path()).unwrap();
    for kind in [b'D', b'E', b'T', b'X'] {
        let left = db.scan_prefix([kind]).count();
        assert_eq!(left, 0, "{} keys left", kind as char);
    }
}

#[tokio::test]
async fn a_request_larger_than_the_write_queue_goes_through_and_gives_its_share_back() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let channel = store
        .create_channel("big".into(), ChannelSettings::default())
        .await
        .unwrap();
    // More than the queue's whole budget in one request, with smaller ones queued around it.
    let big = messages(WRITE_QUEUE_BYTES / (1 << 20) + 6, 1 << 20);
    let stored = |appended: Appended| appended.stored.end - appended.stored.start;
    let confirmed = tokio::time::timeout(Duration::from_secs(30), async {
        let before = store.submit_append(channel, messages(4, 1 << 20)).await?;
        let huge = store.submit_append(channel, big).await?;
        let after = store.submit_append(channel, messages(4, 1 << 20)).await?;
        Ok::<_, StoreError>((
            before.confirmed().await.map(stored),
            huge.confirmed().await.map(stored),
            after.confirmed().await.map(stored),
        ))
    })
    .await
    .expect("no request waits for good")
    .unwrap();
    assert_eq!(confirmed.0.unwrap(), 4);
    assert_eq!(
        confirmed.1.unwrap(),
        WRITE_QUEUE_BYTES as u64 / (1 << 20) + 6
    );
    assert_eq!(confirmed.2.unwrap(), 4);
    assert_eq!(store.queued_bytes(), 0, "every request gave its share back");
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_directory_open_elsewhere_is_refused_with_what_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let second = Store::open(dir.path(), options(0));
    let why = match second {
        Err(StoreError::Failed(why)) => why,
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a second store opened on a directory in use"),
    };
    assert!(why.contains("in use by another process"), "{why}");
    shut(store).await;
    // Closed, the directory opens again at once (sled's pool may hold it a moment longer).
    for _ in 0..5 {
        let (store, _) = Store::open(dir.path(), options(0)).unwrap();
        shut(store).await;
    }
}

#[tokio::test]
async fn appends_queued_together_share_a_commit_and_keep_their_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let create = |name: &str| store.create_channel(name.into(), ChannelSettings::default());
    let a = create("a").await.unwrap();
    let b = create("b").await.unwrap();
    let gone = create("gone").await.unwrap();
    store.delete_channel(gone).await.unwrap();
    let commits = store.counters().commits;

    let appends = vec![
        (a, messages(3, 10)),
        (b, messages(2, 10)),
        (gone, messages(1, 10)),
        (a, messages(1, 10)),
    ];
    let mut answers = Vec::new();
    for confirmation in store.submit_appends(appends).await.unwrap() {
        answers.push(
            confirmation
                .confirmed()
                .await
                .map(|appended| appended.stored),
        );
    }
    assert_eq!(answers[0].as_ref().unwrap(), &(1..4));
    assert_eq!(answers[1].as_ref().unwrap(), &(1..3));
    assert!(matches!(answers[2], Err(StoreError::ChannelNotFound)));
    assert_eq!(
        answers[3].as_ref().unwrap(),
        &(4..5),
        "after the first, in order"
    );
    assert_eq!(store.counters().commits, commits + 1, "one commit for all");
    assert!(store.submit_appends(Vec::new()).await.unwrap().is_empty());
    shut(store).await;
}

#[tokio::test]
async fn acks_replayed_after_a_crash_collect_at_start_without_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let saved = tempfile::tempdir().unwrap();
    let (channel, sub) = ten_stored_and_saved(dir.path(), saved.path(), "c", "s").await;

    let (store, _) = Store::open(dir.path(), options(0)).unwrap();
    let all_acked = AckState {
        floor: 11,
        acked_total: 10,
        acked_above_floor: Vec::new(),
    };
    store.save_acks(sub, all_acked).await.unwrap();
    assert_eq!(store.log(channel).unwrap().stats().first_seq, 11);
    shut(store).await;
    // sled comes back as it was before the acks: the log holds them, and replay restores
    // them, but collection is not in the log.
    copy_index(saved.path(), dir.path());

    let (store, recovered) = Store::open(dir.path(), options(0)).unwrap();
    assert_eq!(recovered.subscriptions[0].acks.floor, 11);
    let log = store.log(channel).unwrap();
    // No request comes: the writer collects on its own.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while log.stats().first_seq != 11 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(log.stats().first_seq, 11, "{:?}", log.stats());
    shut(store).await;
}
