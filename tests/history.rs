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
