//! Routing inside the broker, through the real binary: filtered subscriptions get only the
//! messages that pass their filter (Pub/Sub's syntax), the rest are acked for them at once.

mod common;

use std::time::Duration;

use common::{Consumer, Daemon, ack_ids, message, with_config};
use ferry_proto::pb;
use tonic::Code;

const DECLARED: &str = r#"
[[channels]]
name = "orders"
[[channels.subscriptions]]
name = "eu"
filter = 'attributes.region = "eu" AND NOT attributes:test'
[[channels.subscriptions]]
name = "all"
"#;

#[tokio::test]
async fn a_filtered_subscription_gets_only_what_passes_and_acks_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_in(dir.path(), with_config(dir.path(), DECLARED)).await;
    let mut admin = daemon.admin().await;
    admin
        .create_subscription(pb::CreateSubscriptionRequest {
            channel: "orders".into(),
            name: "vip".into(),
            filter: r#"hasPrefix(key, "vip-") OR attributes.tier = 'gold'"#.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let published = [
        (&[("region", "eu")][..], "vip-1"),
        (&[("region", "us")][..], ""),
        (&[("region", "eu"), ("test", "1")][..], ""),
        (&[("tier", "gold")][..], ""),
        (&[][..], "k"),
        (&[("region", "eu"), ("tier", "silver")][..], "vip-2"),
    ];
    let messages = published
        .iter()
        .map(|(attributes, key)| message(b"x".to_vec(), attributes, key))
        .collect();
    let request = pb::PublishRequest {
        channel: "orders".into(),
        messages,
    };
    daemon.publisher().await.publish(request).await.unwrap();

    for (subscription, expected) in [
        ("eu", vec![1, 6]),
        ("vip", vec![1, 4, 6]),
        ("all", (1..=6).collect()),
    ] {
        let mut consumer = Consumer::attach(&daemon, "orders", subscription, 100).await;
        let got = consumer.take(expected.len()).await;
        assert_eq!(common::sequences(&got), expected, "{subscription}");
        consumer.ack(ack_ids(&got)).await;
        assert!(
            consumer
                .take_for(Duration::from_millis(200))
                .await
                .is_empty()
        );
        let info = daemon.subscription("orders", subscription).await;
        assert_eq!(
            info.unacked, 0,
            "{subscription}: the filtered-out ones count as acked"
        );
        assert_eq!(info.filtered, 6 - expected.len() as u64, "{subscription}");
    }
    let info = daemon.subscription("orders", "eu").await;
    assert_eq!(
        info.filter,
        r#"attributes.region = "eu" AND NOT attributes:test"#
    );

    // A bad filter is refused with where and what; a filter never changes.
    let refused = admin
        .create_subscription(pb::CreateSubscriptionRequest {
            channel: "orders".into(),
            name: "bad".into(),
            filter: r#"attributes.region = "eu" OR attributes.a = "1" AND attributes:b"#.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("column 48"), "{refused:?}");
    let changed = admin
        .update_subscription(pb::CreateSubscriptionRequest {
            channel: "orders".into(),
            name: "vip".into(),
            filter: "attributes:tier".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(changed.code(), Code::InvalidArgument);
    assert!(changed.message().contains("cannot change"), "{changed:?}");
    daemon.stop().await;

    // Declared with another filter: start-up stops and says why.
    let changed = DECLARED.replace(r#"region = "eu""#, r#"region = "us""#);
    let refused = Daemon::try_start_in(dir.path(), with_config(dir.path(), &changed))
        .await
        .err()
        .expect("a changed filter stops start-up");
    assert!(refused.contains("cannot change"), "{refused}");
}
