//! The log as a time machine, through the real binary: retention keeps acked messages for new
//! subscriptions, which may start at the earliest message, a sequence or a time, and gives
//! the space back once they age out.

mod common;

use std::time::{Duration, Instant};

use common::{Consumer, Daemon, ack_ids, segment_files, sequences, with_config};
use ferry_proto::pb;
use tonic::Code;

fn subscription(name: &str, at: Option<pb::position::At>) -> pb::CreateSubscriptionRequest {
    pb::CreateSubscriptionRequest {
        channel: "events".into(),
        name: name.into(),
        start: at.map(|at| pb::Position { at: Some(at) }),
        ..Default::default()
    }
}

#[tokio::test]
async fn retention_keeps_acked_messages_for_new_subscriptions_until_they_age_out() {
    let dir = tempfile::tempdir().unwrap();
    let options = with_config(
        dir.path(),
        r#"
[storage]
segment_size = "1MiB"

[[channels]]
name = "events"
retention = { max_age = "4s" }
[[channels.subscriptions]]
name = "live"
"#,
    );
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    // 3 MiB in 1 KiB messages: several segment files.
    let mut published = 0;
    let mut last_batch = Instant::now();
    for _ in 0..6 {
        last_batch = Instant::now();
        let sequences = daemon
            .publish("events", (0..512).map(|_| vec![7u8; 1024]))
            .await;
        published += sequences.len() as u64;
    }
    let mut live = Consumer::attach(&daemon, "events", "live", 1000).await;
    let mut acked = 0;
    while acked < published {
        let deliveries = live.take_for(Duration::from_millis(300)).await;
        assert!(
            !deliveries.is_empty(),
            "only {acked} of {published} delivered"
        );
        acked += deliveries.len() as u64;
        live.ack(ack_ids(&deliveries)).await;
    }
    let mut admin = daemon.admin().await;
    let info = admin
        .get_channel(pb::GetChannelRequest {
            name: "events".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.first_sequence, 1, "acked, and kept");
    assert!(info.retained_bytes > 3 << 20, "{info:?}");
    let listed = admin
        .list_channels(pb::ListChannelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .channels;
    let events = listed.iter().find(|c| c.name == "events").unwrap();
    assert_eq!(
        events.retained_bytes, info.retained_bytes,
        "listed as described"
    );
    assert_eq!(info.retention.unwrap().max_age.unwrap().seconds, 4);

    // It survives a crash, and so does the retention setting.
    daemon.kill().await;
    let daemon = Daemon::start_in(dir.path(), options).await;
    let mut admin = daemon.admin().await;

    // New subscriptions start where they are told.
    use pb::position::At;
    let edge = |e: pb::Edge| Some(At::Edge(e as i32));
    admin
        .create_subscription(subscription("replay", edge(pb::Edge::Earliest)))
        .await
        .unwrap();
    let mut replay = Consumer::attach(&daemon, "events", "replay", 100).await;
    assert_eq!(
        sequences(&replay.take(100).await),
        (1..=100).collect::<Vec<_>>()
    );
    admin
        .create_subscription(subscription("middle", Some(At::Sequence(3000))))
        .await
        .unwrap();
    let mut middle = Consumer::attach(&daemon, "events", "middle", 10).await;
    assert_eq!(
        middle.take(1).await[0].message.as_ref().unwrap().sequence,
        3000
    );
    admin
        .create_subscription(subscription("fresh", edge(pb::Edge::Latest)))
        .await
        .unwrap();
    let mut fresh = Consumer::attach(&daemon, "events", "fresh", 10).await;
    assert!(fresh.take_for(Duration::from_millis(300)).await.is_empty());
    let refused = admin
        .create_subscription(subscription("future", Some(At::Sequence(published + 5))))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    drop((replay, middle, fresh));
    for name in ["replay", "middle"] {
        admin
            .delete_subscription(pb::DeleteSubscriptionRequest {
                channel: "events".into(),
                name: name.into(),
            })
            .await
            .unwrap();
    }

    // Once they are older than max_age, they go, and their segment files with them.
    let deadline = last_batch + Duration::from_secs(20);
    let info = loop {
        let info = admin
            .get_channel(pb::GetChannelRequest {
                name: "events".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if info.first_sequence == info.next_sequence || Instant::now() > deadline {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Not before the newest of them was 4 s old.
    assert!(last_batch.elapsed() >= Duration::from_secs(4));
    assert_eq!(info.first_sequence, published + 1, "{info:?}");
    let files_deadline = Instant::now() + Duration::from_secs(5);
    while segment_files(&daemon.data_dir).len() > 2 && Instant::now() < files_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(segment_files(&daemon.data_dir).len() <= 2);
    let gone = admin
        .create_subscription(subscription("late", Some(At::Sequence(10))))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::OutOfRange);
    assert!(
        gone.message().contains(&format!("{}", published + 1)),
        "{gone:?}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn seek_moves_a_subscription_and_a_fork_replays_without_touching_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let options = with_config(
        dir.path(),
        r#"
[[channels]]
name = "events"
retention = { max_bytes = "1GiB" }
[[channels.subscriptions]]
name = "live"
"#,
    );
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    daemon
        .publish("events", (0..100).map(|i| vec![i as u8]))
        .await;
    let mut live = Consumer::attach(&daemon, "events", "live", 1000).await;
    let first = live.take(100).await;
    live.ack(ack_ids(&first[..60])).await;
    live.nack(ack_ids(&first[60..61])).await;
    let retried = live.take(1).await;
    assert_eq!(retried[0].attempt, 2);

    // A fork of live: what live has not acked, for another consumer; live goes on untouched.
    use pb::position::At;
    let mut admin = daemon.admin().await;
    admin
        .create_subscription(subscription("copy", Some(At::Subscription("live".into()))))
        .await
        .unwrap();
    let mut copy = Consumer::attach(&daemon, "events", "copy", 1000).await;
    assert_eq!(
        sequences(&copy.take(40).await),
        (61..=100).collect::<Vec<_>>()
    );
    assert_eq!(daemon.subscription("events", "live").await.unacked, 40);

    // Seek back: what live holds is void, and it starts again at 30, attempts reset.
    let seek = |to: At| pb::SeekRequest {
        channel: "events".into(),
        subscription: "live".into(),
        to: Some(pb::Position { at: Some(to) }),
    };
    let moved = admin
        .seek(seek(At::Sequence(30)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((moved.ack_floor, moved.unacked), (30, 71));
    let stale = live.ack(ack_ids(&first[61..])).await;
    assert!(
        stale.iter().all(|s| *s == pb::AckStatus::Stale),
        "{stale:?}"
    );
    let again = live.take(71).await;
    assert_eq!(sequences(&again), (30..=100).collect::<Vec<_>>());
    assert!(again.iter().all(|d| d.attempt == 1));

    // Seek by time: to the first message published at or after a moment. (A new consumer
    // each time, so that what the old one was sent before the move is out of the way.)
    drop(live);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let moment = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    daemon
        .publish("events", (0..10).map(|i| vec![i as u8]))
        .await;
    let time = prost_types::Timestamp {
        seconds: moment.as_secs() as i64,
        nanos: moment.subsec_nanos() as i32,
    };
    admin.seek(seek(At::Time(time))).await.unwrap();
    let mut live = Consumer::attach(&daemon, "events", "live", 1000).await;
    assert_eq!(
        live.take(10).await[0].message.as_ref().unwrap().sequence,
        101
    );
    drop(live);

    // Out of range names where the stored messages begin.
    let refused = admin.seek(seek(At::Sequence(0))).await.unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("first message still stored is 1"),
        "{refused:?}"
    );

    // To the earliest end, and the move survives a crash.
    admin
        .seek(seek(At::Edge(pb::Edge::Earliest as i32)))
        .await
        .unwrap();
    let mut live = Consumer::attach(&daemon, "events", "live", 1000).await;
    assert_eq!(live.take(1).await[0].message.as_ref().unwrap().sequence, 1);
    drop((live, copy));
    daemon.kill().await;
    let daemon = Daemon::start_in(dir.path(), options).await;
    let mut live = Consumer::attach(&daemon, "events", "live", 1000).await;
    assert_eq!(
        live.take(110).await[0].message.as_ref().unwrap().sequence,
        1
    );
    let info = daemon.subscription("events", "copy").await;
    assert_eq!(info.ack_floor, 61);
    daemon.stop().await;
}

#[tokio::test]
async fn a_published_id_is_stored_once_within_the_window_across_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let options = with_config(
        dir.path(),
        r#"
[[channels]]
name = "orders"
dedup_window = "2s"
[[channels.subscriptions]]
name = "billing"

[[channels]]
name = "raw"
dedup_window = "0s"
"#,
    );
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    let first = publish_ids(&daemon, "orders", &["a", "b", "a"]).await;
    assert_eq!(first.sequences, [1, 2, 1]);
    assert_eq!(first.duplicate, [false, false, true]);
    let raw = publish_ids(&daemon, "raw", &["a", "a"]).await;
    assert_eq!((raw.sequences, raw.duplicate), (vec![1, 2], vec![]));
    daemon.kill().await;

    // A publisher that saw no confirmation retries after the crash: stored once.
    let daemon = Daemon::start_in(dir.path(), options).await;
    let retried = publish_ids(&daemon, "orders", &["b", "c"]).await;
    assert_eq!(retried.sequences, [2, 3]);
    assert_eq!(retried.duplicate, [true, false]);
    // Past the window an id is new again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later = publish_ids(&daemon, "orders", &["a"]).await;
    assert_eq!((later.sequences, later.duplicate), (vec![4], vec![]));
    let mut billing = Consumer::attach(&daemon, "orders", "billing", 10).await;
    let got = billing.take(4).await;
    let payloads: Vec<_> = got
        .iter()
        .map(|d| String::from_utf8(d.message.as_ref().unwrap().payload.to_vec()).unwrap())
        .collect();
    assert_eq!(payloads, ["a", "b", "c", "a"]);
    assert!(
        billing
            .take_for(Duration::from_millis(300))
            .await
            .is_empty()
    );
    daemon.stop().await;
}

#[tokio::test]
async fn ids_sealed_into_their_files_are_still_duplicates_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let options = with_config(
        dir.path(),
        "[[channels]]\nname = \"orders\"\ndedup_window = \"8s\"\n",
    );
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    publish_ids(&daemon, "orders", &["a", "b"]).await;
    // Ids are sealed into a file once a quarter of the window (at least a second) old.
    let ids = dir.path().join("data").join("ids");
    let sealed = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "ids"))
                    .count()
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while sealed(&ids) == 0 {
        assert!(Instant::now() < deadline, "the ids were never sealed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    publish_ids(&daemon, "orders", &["c"]).await;
    daemon.kill().await;

    // Found in the sealed file (a, b) and in what the log and index kept (c).
    let daemon = Daemon::start_in(dir.path(), options).await;
    let retried = publish_ids(&daemon, "orders", &["a", "c", "d", "b"]).await;
    assert_eq!(retried.sequences, [1, 3, 4, 2]);
    assert_eq!(retried.duplicate, [true, true, false, true]);
    daemon.stop().await;
}

/// Publishes one message per id (its payload the id) as one batch.
async fn publish_ids(daemon: &Daemon, channel: &str, ids: &[&str]) -> pb::PublishResponse {
    let request = pb::PublishRequest {
        channel: channel.into(),
        messages: ids
            .iter()
            .map(|id| pb::OutgoingMessage {
                payload: id.as_bytes().to_vec().into(),
                id: (*id).into(),
                ..Default::default()
            })
            .collect(),
    };
    daemon
        .publisher()
        .await
        .publish(request)
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn expired_messages_are_not_delivered_and_are_dead_lettered_where_they_can_be() {
    let dir = tempfile::tempdir().unwrap();
    let options = with_config(
        dir.path(),
        r#"
[[channels]]
name = "quotes"
ttl = "300ms"
[[channels.subscriptions]]
name = "drop"
[[channels.subscriptions]]
name = "keep"
max_delivery_attempts = 3
dead_letter_channel = "quotes.dead"

[[channels]]
name = "quotes.dead"
"#,
    );
    let daemon = Daemon::start_in(dir.path(), options).await;
    let mut long = common::message(b"long".to_vec(), &[], "");
    long.ttl = Some(prost_types::Duration {
        seconds: 60,
        nanos: 0,
    });
    let request = pb::PublishRequest {
        channel: "quotes".into(),
        messages: vec![common::message(b"short".to_vec(), &[], ""), long],
    };
    daemon.publisher().await.publish(request).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;

    for name in ["drop", "keep"] {
        let mut consumer = Consumer::attach(&daemon, "quotes", name, 10).await;
        let got = consumer.take(1).await;
        let message = got[0].message.as_ref().unwrap();
        assert_eq!(message.payload.as_ref(), b"long");
        assert!(message.expire_time.is_some() && message.attributes.is_empty());
        consumer.ack(ack_ids(&got)).await;
        assert!(
            consumer
                .take_for(Duration::from_millis(200))
                .await
                .is_empty()
        );
        assert_eq!(daemon.subscription("quotes", name).await.expired, 1);
    }
    let mut admin = daemon.admin().await;
    admin
        .create_subscription(pb::CreateSubscriptionRequest {
            channel: "quotes.dead".into(),
            name: "inspect".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut inspect = Consumer::attach(&daemon, "quotes.dead", "inspect", 10).await;
    let dead = inspect.take(1).await;
    let dead = dead[0].message.as_ref().unwrap();
    assert_eq!(dead.payload.as_ref(), b"short");
    assert_eq!(dead.attributes["ferry.dead_letter.reason"], "expired");
    assert!(dead.expire_time.is_none(), "a dead letter does not expire");
    daemon.stop().await;
}

#[tokio::test]
async fn channel_settings_change_through_admin() {
    let daemon = Daemon::start().await;
    daemon.create("events", &[]).await;
    let mut admin = daemon.admin().await;
    let update = |window_s: i64, retention: Option<pb::Retention>| pb::CreateChannelRequest {
        name: "events".into(),
        retention,
        dedup_window: Some(prost_types::Duration {
            seconds: window_s,
            nanos: 0,
        }),
        ..Default::default()
    };
    let keep = pb::Retention {
        max_bytes: 1 << 20,
        ..Default::default()
    };
    let info = admin
        .update_channel(update(30, Some(keep)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.dedup_window.unwrap().seconds, 30);
    assert_eq!(info.retention.unwrap().max_bytes, 1 << 20);
    let too_long = admin
        .update_channel(update(8 * 86_400, None))
        .await
        .unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument);
    assert!(too_long.message().contains("dedup_window"), "{too_long:?}");
    daemon.stop().await;
}

fn delayed(payload: &str, delay_ms: u64, id: &str) -> pb::OutgoingMessage {
    pb::OutgoingMessage {
        payload: payload.as_bytes().to_vec().into(),
        id: id.into(),
        delay: Some(prost_types::Duration {
            seconds: (delay_ms / 1000) as i64,
            nanos: (delay_ms % 1000 * 1_000_000) as i32,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn delayed_messages_wait_without_holding_others_up_and_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let options = with_config(dir.path(), "");
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    daemon.create("events", &[("all", 30_000)]).await;
    let mut publisher = daemon.publisher().await;
    let published_at = std::time::SystemTime::now();
    let request = pb::PublishRequest {
        channel: "events".into(),
        messages: vec![
            delayed("in 1.5 s", 1500, ""),
            common::message(b"now".to_vec(), &[], ""),
            delayed("in 6 s", 6000, "late"),
        ],
    };
    let response = publisher.publish(request).await.unwrap().into_inner();
    assert_eq!(response.sequences, [0, 1, 0]);
    assert_eq!(response.delayed, [true, false, true]);
    // A retried publish of a delayed message is its duplicate, not a second copy.
    let retried = pb::PublishRequest {
        channel: "events".into(),
        messages: vec![delayed("in 6 s", 6000, "late")],
    };
    let again = publisher.publish(retried).await.unwrap().into_inner();
    assert_eq!((again.sequences, again.duplicate), (vec![0], vec![true]));

    let mut consumer = Consumer::attach(&daemon, "events", "all", 100).await;
    let first = consumer.take_for(Duration::from_millis(800)).await;
    assert_eq!(
        sequences(&first),
        [1],
        "the undelayed message does not wait"
    );
    consumer.ack(ack_ids(&first)).await;
    let soon = consumer.take(1).await;
    let waited = published_at.elapsed().unwrap();
    assert_eq!(&soon[0].message.as_ref().unwrap().payload[..], b"in 1.5 s");
    assert!(waited >= Duration::from_millis(1500), "early: {waited:?}");
    let message = soon[0].message.as_ref().unwrap();
    assert_eq!(message.sequence, 2);
    let (due, entered) = (message.deliver_time.unwrap(), message.publish_time.unwrap());
    let late_ms =
        (entered.seconds - due.seconds) * 1000 + i64::from(entered.nanos - due.nanos) / 1_000_000;
    assert!(
        (0..1000).contains(&late_ms),
        "entered {late_ms} ms after it was due"
    );
    consumer.ack(ack_ids(&soon)).await;
    let mut admin = daemon.admin().await;
    let info = admin
        .get_channel(pb::GetChannelRequest {
            name: "events".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.delayed, info.next_sequence), (1, 3));
    assert!(info.delayed_bytes > 0);
    drop(consumer);
    daemon.kill().await;

    // Still kept aside after the crash, and delivered when due.
    let daemon = Daemon::start_in(dir.path(), options).await;
    let mut consumer = Consumer::attach(&daemon, "events", "all", 100).await;
    let late = consumer.take(1).await;
    let waited = published_at.elapsed().unwrap();
    assert!(waited >= Duration::from_secs(6), "early: {waited:?}");
    let message = late[0].message.as_ref().unwrap();
    assert_eq!(
        (&message.payload[..], message.id.as_str()),
        (&b"in 6 s"[..], "late")
    );
    assert_eq!(message.sequence, 3);
    consumer.ack(ack_ids(&late)).await;
    assert!(
        consumer
            .take_for(Duration::from_millis(500))
            .await
            .is_empty()
    );

    // Bad input is refused with what to fix.
    let mut publisher = daemon.publisher().await;
    let mut both = delayed("x", 1000, "");
    both.deliver_time = Some(prost_types::Timestamp::default());
    let mut reserved = common::message(b"x".to_vec(), &[("ferry.deliver_at", "1")], "");
    reserved.key.clear();
    for (message, expected) in [(both, "not both"), (reserved, "reserved")] {
        let refused = publisher
            .publish(pb::PublishRequest {
                channel: "events".into(),
                messages: vec![message],
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(refused.message().contains(expected), "{refused:?}");
    }
    daemon.stop().await;
}

async fn channel_info(daemon: &Daemon, name: &str) -> pb::ChannelInfo {
    let request = pb::GetChannelRequest { name: name.into() };
    let mut admin = daemon.admin().await;
    admin.get_channel(request).await.unwrap().into_inner()
}

#[tokio::test]
async fn a_full_channel_refuses_or_drops_the_oldest_as_its_policy_says() {
    let dir = tempfile::tempdir().unwrap();
    let options = with_config(
        dir.path(),
        r#"
[[channels]]
name = "capped"
limits = { max_messages = 5 }
[[channels.subscriptions]]
name = "all"
"#,
    );
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    let payloads = |n: usize| (0..n).map(|i| vec![i as u8; 100]);

    // Reject: the publish past the limit is refused whole, naming the channel and the limit.
    daemon.publish("capped", payloads(5)).await;
    let mut publisher = daemon.publisher().await;
    let refused = publisher
        .publish(common::batch("capped", payloads(2)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("\"capped\"") && refused.message().contains("max_messages"),
        "{refused:?}"
    );
    let mut consumer = Consumer::attach(&daemon, "capped", "all", 2).await;
    let first = consumer.take(2).await;
    consumer.ack(ack_ids(&first)).await;
    assert_eq!(daemon.publish("capped", payloads(2)).await, [6, 7]);
    drop(consumer);

    // Drop-oldest, through Admin: the oldest unacked go, a delivery of one is void, and a
    // subscription with a dead-letter channel gets them as dead letters.
    let mut admin = daemon.admin().await;
    let limits = pb::Limits {
        max_messages: 5,
        policy: pb::LimitPolicy::DropOldest as i32,
        ..Default::default()
    };
    admin
        .create_channel(pb::CreateChannelRequest {
            name: "rolling".into(),
            limits: Some(limits),
            ..Default::default()
        })
        .await
        .unwrap();
    daemon.create("rolling.dead", &[("dead", 30_000)]).await;
    admin
        .create_subscription(pb::CreateSubscriptionRequest {
            channel: "rolling".into(),
            name: "careful".into(),
            dead_letter_channel: "rolling.dead".into(),
            max_delivery_attempts: 5,
            ..Default::default()
        })
        .await
        .unwrap();
    daemon.publish("rolling", payloads(5)).await;
    let mut careful = Consumer::attach(&daemon, "rolling", "careful", 1).await;
    let held = careful.take(1).await;
    assert_eq!(sequences(&held), [1]);
    assert_eq!(daemon.publish("rolling", payloads(2)).await, [6, 7]);
    assert_eq!(careful.ack(ack_ids(&held)).await, [pb::AckStatus::Stale]);
    let next = careful.take(1).await;
    assert_eq!(sequences(&next), [3], "1 and 2 were dropped");
    let info = channel_info(&daemon, "rolling").await;
    assert_eq!(info.dropped, 2);
    assert_eq!(info.limits.unwrap().max_messages, 5);
    let mut dead = Consumer::attach(&daemon, "rolling.dead", "dead", 10).await;
    let letters = dead.take(2).await;
    for (letter, original) in letters.iter().zip([1, 2]) {
        let attributes = &letter.message.as_ref().unwrap().attributes;
        assert_eq!(attributes["ferry.dead_letter.reason"], "dropped");
        assert_eq!(
            attributes["ferry.dead_letter.sequence"],
            original.to_string()
        );
    }
    drop((careful, dead));
    daemon.kill().await;

    // What was dropped stays dropped, and counted, after a crash.
    let daemon = Daemon::start_in(dir.path(), options).await;
    assert_eq!(channel_info(&daemon, "rolling").await.dropped, 2);
    let mut careful = Consumer::attach(&daemon, "rolling", "careful", 10).await;
    let rest = careful.take(5).await;
    assert_eq!(sequences(&rest), [3, 4, 5, 6, 7]);
    let capped = channel_info(&daemon, "capped").await;
    assert_eq!(
        capped.limits.unwrap().policy,
        pb::LimitPolicy::Reject as i32
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_byte_limit_refuses_what_would_pass_it_and_retention_gives_way_first() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
[[channels]]
name = "small"
retention = { max_age = "1h" }
limits = { max_bytes = "8KiB" }
[[channels.subscriptions]]
name = "all"
"#;
    let daemon = Daemon::start_in(dir.path(), with_config(dir.path(), config)).await;
    let kib = |n: usize| (0..n).map(|_| vec![1u8; 1024]);
    // One record per publish: about 1.1 KiB each with its framing.
    for _ in 0..6 {
        daemon.publish("small", kib(1)).await;
    }
    let mut publisher = daemon.publisher().await;
    let refused = publisher
        .publish(common::batch("small", kib(3)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("max_bytes"), "{refused:?}");
    // Acked, the messages are kept only by retention: they make room for new ones.
    let mut all = Consumer::attach(&daemon, "small", "all", 10).await;
    let got = all.take(6).await;
    all.ack(ack_ids(&got)).await;
    daemon.publish("small", kib(3)).await;
    let info = channel_info(&daemon, "small").await;
    assert!(info.bytes <= 8 << 10, "{info:?}");
    assert!(
        info.first_sequence > 1,
        "the oldest retained records went: {info:?}"
    );
    daemon.stop().await;
}
