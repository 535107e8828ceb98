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

const DERIVED: &str = r#"
[[channels]]
name = "orders"
[[channels.subscriptions]]
name = "audit"

[[derived]]
source = "orders"
target = "orders.eu"
filter = 'attributes.region = "eu"'
keep = ["region", "kind", "customer"]
rename = { kind = "type" }
set = { public = "yes" }
key_from = "customer"

[[derived]]
source = "orders.eu"
target = "orders.eu.gold"
filter = 'attributes.tier = "gold" OR hasPrefix(key, "vip-")'

[[channels]]
name = "orders.eu"
[[channels.subscriptions]]
name = "all"

[[channels]]
name = "orders.eu.gold"
[[channels.subscriptions]]
name = "all"
"#;

#[tokio::test]
async fn derived_channels_filter_reshape_chain_and_refuse_what_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_in(dir.path(), with_config(dir.path(), DERIVED)).await;
    let published = [
        (
            &[
                ("region", "eu"),
                ("kind", "order"),
                ("customer", "vip-1"),
                ("secret", "s"),
            ][..],
            "",
        ),
        (&[("region", "us"), ("kind", "order")][..], ""),
        (
            &[("region", "eu"), ("kind", "refund"), ("customer", "c-2")][..],
            "",
        ),
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

    let mut eu = Consumer::attach(&daemon, "orders.eu", "all", 10).await;
    let got = eu.take(2).await;
    let first = got[0].message.as_ref().unwrap();
    assert_eq!(
        first.key, "vip-1",
        "the key comes from the customer attribute"
    );
    let mut attributes: Vec<(&str, &str)> = first
        .attributes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    attributes.sort();
    assert_eq!(
        attributes,
        [
            ("customer", "vip-1"),
            ("ferry.derived.channel", "orders"),
            ("ferry.derived.sequence", "1"),
            ("public", "yes"),
            ("region", "eu"),
            ("type", "order"),
        ]
    );
    assert_eq!(
        got[1].message.as_ref().unwrap().attributes["ferry.derived.sequence"],
        "3"
    );
    eu.ack(ack_ids(&got)).await;
    // A derived channel of a derived channel: its origin is its immediate source.
    let mut gold = Consumer::attach(&daemon, "orders.eu.gold", "all", 10).await;
    let got = gold.take(1).await;
    let attributes = &got[0].message.as_ref().unwrap().attributes;
    assert_eq!(
        (
            attributes["ferry.derived.channel"].as_str(),
            attributes["ferry.derived.sequence"].as_str()
        ),
        ("orders.eu", "1")
    );
    assert!(gold.take_for(Duration::from_millis(300)).await.is_empty());

    let mut admin = daemon.admin().await;
    let listed = admin
        .list_derived(pb::ListDerivedRequest {})
        .await
        .unwrap()
        .into_inner()
        .derived;
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|d| d.lag == 0), "{listed:?}");
    assert_eq!((listed[0].processed, listed[0].derived), (3, 2));

    let refuse = |source: &str, target: &str, filter: &str| pb::DerivedChannel {
        source: source.into(),
        target: target.into(),
        filter: filter.into(),
        ..Default::default()
    };
    for (request, code, words) in [
        (refuse("nowhere", "x", ""), Code::NotFound, "nowhere"),
        (refuse("orders", "orders", ""), Code::InvalidArgument, "its"),
        (
            refuse("orders.eu.gold", "orders", ""),
            Code::InvalidArgument,
            "cycle",
        ),
        (
            refuse("orders", "orders.eu", ""),
            Code::InvalidArgument,
            "already",
        ),
        (
            refuse("orders", "y", "attributes.a ="),
            Code::InvalidArgument,
            "column 15",
        ),
    ] {
        let refused = admin.create_derived(request).await.unwrap_err();
        assert_eq!(refused.code(), code, "{refused:?}");
        assert!(refused.message().contains(words), "{refused:?}");
    }
    // The target of a derived channel cannot go while it is one.
    let refused = admin
        .delete_channel(pb::DeleteChannelRequest {
            name: "orders.eu.gold".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    admin
        .delete_derived(pb::DeleteDerivedRequest {
            source: "orders.eu".into(),
            target: "orders.eu.gold".into(),
        })
        .await
        .unwrap();
    daemon.stop().await;

    // Declared with an unknown source: start-up stops and says which entry.
    let bad = "[[derived]]\nsource = \"missing\"\ntarget = \"t\"\n";
    let refused = Daemon::try_start_in(dir.path(), with_config(dir.path(), bad))
        .await
        .err()
        .expect("an unknown source stops start-up");
    assert!(
        refused.contains("derived[0]") && refused.contains("missing"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_derived_channel_derives_each_message_exactly_once_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
[[channels]]
name = "events"
[[derived]]
source = "events"
target = "events.even"
filter = 'attributes.even = "yes"'
[[channels]]
name = "events.even"
[[channels.subscriptions]]
name = "check"
"#;
    let options = with_config(dir.path(), config);
    const ROUNDS: u64 = 4;
    const PER_ROUND: u64 = 400;
    let mut published = 0u64;
    for _ in 0..ROUNDS {
        let daemon = Daemon::start_in(dir.path(), options.clone()).await;
        let mut publisher = daemon.publisher().await;
        for _ in 0..PER_ROUND / 20 {
            let messages = (0..20)
                .map(|_| {
                    published += 1;
                    let even = if published.is_multiple_of(2) {
                        "yes"
                    } else {
                        "no"
                    };
                    message(published.to_be_bytes().to_vec(), &[("even", even)], "")
                })
                .collect();
            let request = pb::PublishRequest {
                channel: "events".into(),
                messages,
            };
            publisher.publish(request).await.unwrap();
        }
        // Killed while the derived channel is catching up.
        daemon.kill().await;
    }
    let daemon = Daemon::start_in(dir.path(), options).await;
    let mut check = Consumer::attach(&daemon, "events.even", "check", 1000).await;
    let expected = ROUNDS * PER_ROUND / 2;
    let got = check.take(expected as usize).await;
    let mut origins: Vec<u64> = got
        .iter()
        .map(|d| {
            d.message.as_ref().unwrap().attributes["ferry.derived.sequence"]
                .parse()
                .unwrap()
        })
        .collect();
    origins.sort_unstable();
    let all_even: Vec<u64> = (1..=ROUNDS * PER_ROUND)
        .filter(|s| s.is_multiple_of(2))
        .collect();
    assert_eq!(origins, all_even, "each even message derived exactly once");
    check.ack(ack_ids(&got)).await;
    assert!(
        check.take_for(Duration::from_millis(500)).await.is_empty(),
        "no duplicates"
    );
    daemon.stop().await;
}

const WILDCARD: &str = r#"
[[channels]]
name = "orders.created"
[[channels]]
name = "orders.paid"
[[channels]]
name = "orders.eu.created"
[[channels]]
name = "payments.done"
[[channels]]
name = "audit.dead"

[[channels]]
name = "orders.*"
[[channels.subscriptions]]
name = "audit"
max_delivery_attempts = 3
dead_letter_channel = "audit.dead"
"#;

/// Publishes one message with payload `text` to `channel`.
async fn publish_one(daemon: &Daemon, channel: &str, text: &str) {
    daemon.publish(channel, [text.as_bytes().to_vec()]).await;
}

/// (channel, sequence, payload) of each delivery, sorted.
fn origins(deliveries: &[pb::Delivery]) -> Vec<(String, u64, String)> {
    let mut out: Vec<_> = deliveries
        .iter()
        .map(|d| {
            let m = d.message.as_ref().expect("message");
            let payload = String::from_utf8_lossy(&m.payload).into_owned();
            (d.channel.clone(), m.sequence, payload)
        })
        .collect();
    out.sort();
    out
}

async fn member_names(daemon: &Daemon, channel: &str) -> Vec<String> {
    let request = pb::GetChannelRequest {
        name: channel.into(),
    };
    let info = daemon.admin().await.get_channel(request).await.unwrap();
    let subscriptions = info.into_inner().subscriptions;
    subscriptions.into_iter().map(|s| s.name).collect()
}

#[tokio::test]
async fn a_wildcard_subscription_reads_every_matching_channel_even_ones_created_later() {
    let dir = tempfile::tempdir().unwrap();
    let options = || with_config(dir.path(), WILDCARD);
    let daemon = Daemon::start_in(dir.path(), options()).await;

    // One window over all its channels: 3 messages at most, whichever channels they are from.
    let mut consumer = Consumer::attach(&daemon, "orders.*", "audit", 3).await;
    for (channel, text) in [
        ("orders.created", "c1"),
        ("orders.created", "c2"),
        ("orders.paid", "p1"),
        ("orders.paid", "p2"),
        ("orders.eu.created", "not one word"),
        ("payments.done", "not orders"),
    ] {
        publish_one(&daemon, channel, text).await;
    }
    let first = consumer.take(3).await;
    assert!(
        consumer
            .take_for(Duration::from_millis(300))
            .await
            .is_empty(),
        "the window holds across channels"
    );
    let results = consumer.ack_each(ack_ids(&first)).await;
    assert!(
        results.values().all(|s| *s == pb::AckStatus::Ok),
        "{results:?}"
    );
    let mut got = first;
    got.extend(consumer.take(1).await);
    assert_eq!(
        origins(&got),
        [
            ("orders.created".to_owned(), 1, "c1".to_owned()),
            ("orders.created".to_owned(), 2, "c2".to_owned()),
            ("orders.paid".to_owned(), 1, "p1".to_owned()),
            ("orders.paid".to_owned(), 2, "p2".to_owned()),
        ]
    );
    let last = got.last().unwrap().ack_id.clone();
    let answers = consumer
        .ack_each(vec![last.clone(), "7-1-1-00000000".into()])
        .await;
    assert_eq!(answers[&last], pb::AckStatus::Ok);
    assert_eq!(answers["7-1-1-00000000"], pb::AckStatus::Unknown);

    // A channel created later is read from its first message, by the attached consumer too.
    let mut admin = daemon.admin().await;
    let create = |name: &str| pb::CreateChannelRequest {
        name: name.into(),
        ..Default::default()
    };
    admin
        .create_channel(create("orders.refunded"))
        .await
        .unwrap();
    publish_one(&daemon, "orders.refunded", "r1").await;
    let refunded = consumer.take(1).await;
    assert_eq!(
        origins(&refunded),
        [("orders.refunded".into(), 1, "r1".into())]
    );

    // Its share of each channel is visible there, and changed only through the pattern.
    let members = member_names(&daemon, "orders.refunded").await;
    assert_eq!(members, ["orders.*/audit"]);
    assert!(member_names(&daemon, "payments.done").await.is_empty());
    let refused = Consumer::try_attach(
        &daemon,
        "orders.created",
        "orders.*/audit",
        pb::FlowControl::default(),
    )
    .await
    .err()
    .expect("a member is attached to through its pattern");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("channel \"orders.*\""),
        "{refused:?}"
    );
    let info = daemon.subscription("orders.*", "audit").await;
    assert_eq!(
        info.channels,
        ["orders.created", "orders.paid", "orders.refunded"]
    );
    assert_eq!((info.acked, info.in_flight, info.consumers), (4, 1, 1));
    assert_eq!(info.dead_letter_channel, "audit.dead");

    // What cannot work is refused, saying why.
    let wildcard = |channel: &str, name: &str, dead_letter: &str| pb::CreateSubscriptionRequest {
        channel: channel.into(),
        name: name.into(),
        max_delivery_attempts: if dead_letter.is_empty() { 0 } else { 3 },
        dead_letter_channel: dead_letter.into(),
        ..Default::default()
    };
    for (request, code, says) in [
        (
            wildcard("orders.>.x", "a", ""),
            Code::InvalidArgument,
            "`>` may only be its last word",
        ),
        (
            wildcard("audit.*", "a", "audit.dead"),
            Code::FailedPrecondition,
            "matches the subscription's pattern",
        ),
        (
            wildcard("orders.*", "audit", ""),
            Code::AlreadyExists,
            "audit",
        ),
    ] {
        let status = admin.create_subscription(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(says), "{status:?}");
    }
    let seek = pb::SeekRequest {
        channel: "orders.*".into(),
        subscription: "audit".into(),
        to: Some(pb::Position {
            at: Some(pb::position::At::Sequence(1)),
        }),
    };
    let status = admin.seek(seek).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = admin
        .delete_channel(pb::DeleteChannelRequest {
            name: "audit.dead".into(),
        })
        .await
        .unwrap_err();
    assert!(
        status
            .message()
            .contains("wildcard subscription \"audit\" of \"orders.*\""),
        "{status:?}"
    );
    // Given another dead-letter channel, the first one can go.
    admin.create_channel(create("audit.dead2")).await.unwrap();
    admin
        .update_subscription(wildcard("orders.*", "audit", "audit.dead2"))
        .await
        .unwrap();
    let info = daemon.subscription("orders.*", "audit").await;
    assert_eq!(info.dead_letter_channel, "audit.dead2");
    admin
        .delete_channel(pb::DeleteChannelRequest {
            name: "audit.dead".into(),
        })
        .await
        .unwrap();

    // Deleting one of its channels leaves the consumer reading the others, even with a
    // delivery of that channel in hand (its ack is answered, not the stream ended).
    publish_one(&daemon, "orders.paid", "p3").await;
    let p3 = consumer.take(1).await;
    admin
        .delete_channel(pb::DeleteChannelRequest {
            name: "orders.paid".into(),
        })
        .await
        .unwrap();
    let answer = consumer.ack_each(ack_ids(&p3)).await;
    assert_ne!(answer[&p3[0].ack_id], pb::AckStatus::Ok);
    publish_one(&daemon, "orders.created", "c3").await;
    let c3 = consumer.take(1).await;
    assert_eq!(origins(&c3), [("orders.created".into(), 3, "c3".into())]);
    drop(consumer);

    // kill -9: what was acked stays acked, the rest comes again; channels created after the
    // restart are read too.
    daemon.kill().await;
    let daemon = Daemon::start_in(dir.path(), options()).await;
    let mut consumer = Consumer::attach(&daemon, "orders.*", "audit", 10).await;
    let again = consumer.take(2).await;
    assert_eq!(
        origins(&again),
        [
            ("orders.created".into(), 3, "c3".into()),
            ("orders.refunded".into(), 1, "r1".into()),
        ]
    );
    consumer.ack_each(ack_ids(&again)).await;
    let mut admin = daemon.admin().await;
    admin
        .create_channel(create("orders.shipped"))
        .await
        .unwrap();
    publish_one(&daemon, "orders.shipped", "s1").await;
    let shipped = consumer.take(1).await;
    assert_eq!(
        origins(&shipped),
        [("orders.shipped".into(), 1, "s1".into())]
    );
    assert!(
        consumer
            .take_for(Duration::from_millis(200))
            .await
            .is_empty()
    );

    // Deleting it ends its consumers' streams and removes its share of every channel.
    admin
        .delete_subscription(pb::DeleteSubscriptionRequest {
            channel: "orders.*".into(),
            name: "audit".into(),
        })
        .await
        .unwrap();
    assert_eq!(consumer.closed().await.code(), Code::NotFound);
    assert!(member_names(&daemon, "orders.created").await.is_empty());
    daemon.stop().await;

    // Declared again (the TOML still names it), it comes back new, reading from now on.
    let daemon = Daemon::start_in(dir.path(), options()).await;
    let info = daemon.subscription("orders.*", "audit").await;
    assert_eq!((info.acked, info.backlog), (0, 0));
    let channels = [
        "orders.created",
        "orders.paid",
        "orders.refunded",
        "orders.shipped",
    ];
    assert_eq!(info.channels, channels, "orders.paid is declared again too");
    daemon.stop().await;
}

#[tokio::test]
async fn a_derived_channel_from_a_pattern_derives_every_matching_channel_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
[[channels]]
name = "orders.a"
[[derived]]
source = "orders.>"
target = "audit.orders"
filter = 'attributes:keep'
[[channels]]
name = "audit.orders"
[[channels.subscriptions]]
name = "check"
"#;
    let options = || with_config(dir.path(), config);
    let mut channels = vec!["orders.a".to_owned()];
    let mut kept = Vec::new();
    for round in 0..3 {
        let daemon = Daemon::start_in(dir.path(), options()).await;
        // A channel created later is read from its first message.
        let created = format!("orders.r{round}.x");
        let request = pb::CreateChannelRequest {
            name: created.clone(),
            ..Default::default()
        };
        daemon.admin().await.create_channel(request).await.unwrap();
        channels.push(created);
        let mut publisher = daemon.publisher().await;
        for (i, channel) in channels.iter().enumerate() {
            let messages = (0..60u64)
                .map(|n| match n % 3 {
                    0 => message(vec![], &[], ""),
                    _ => message(vec![], &[("keep", "1")], ""),
                })
                .collect();
            let request = pb::PublishRequest {
                channel: channel.clone(),
                messages,
            };
            let sequences = publisher.publish(request).await.unwrap().into_inner();
            let sequences = sequences.sequences.into_iter();
            kept.extend(
                sequences
                    .enumerate()
                    .filter(|(n, _)| n % 3 != 0)
                    .map(|(_, seq)| (channels[i].clone(), seq)),
            );
        }
        // Killed while the derived channels are catching up.
        daemon.kill().await;
    }
    let daemon = Daemon::start_in(dir.path(), options()).await;
    let mut check = Consumer::attach(&daemon, "audit.orders", "check", 5000).await;
    let got = check.take(kept.len()).await;
    let mut derived: Vec<(String, u64)> = got
        .iter()
        .map(|d| {
            let attributes = &d.message.as_ref().unwrap().attributes;
            let sequence = attributes["ferry.derived.sequence"].parse().unwrap();
            (attributes["ferry.derived.channel"].clone(), sequence)
        })
        .collect();
    derived.sort();
    kept.sort();
    assert_eq!(
        derived, kept,
        "each kept message of each channel derived exactly once"
    );
    check.ack(ack_ids(&got)).await;
    assert!(
        check.take_for(Duration::from_millis(300)).await.is_empty(),
        "no duplicates"
    );

    let mut admin = daemon.admin().await;
    let listed = admin
        .list_derived(pb::ListDerivedRequest {})
        .await
        .unwrap()
        .into_inner()
        .derived;
    let sources: Vec<&str> = listed
        .iter()
        .map(|d| d.channel.as_ref().unwrap().source.as_str())
        .collect();
    assert_eq!(sources, ["orders.>"], "listed once, by its pattern");
    assert_eq!(listed[0].lag, 0);

    // What cannot work is refused, saying why.
    let derive = |source: &str, target: &str| pb::DerivedChannel {
        source: source.into(),
        target: target.into(),
        ..Default::default()
    };
    for (request, says) in [
        (derive("audit.*", "orders.loop"), "cycle"),
        (derive("orders.*", "orders.x"), "would read itself"),
        (derive("orders.>", "audit.orders"), "already derived"),
        (derive("orders.a", "audit.orders"), "already derived"),
        (derive("orders.*.x", "audit.orders"), "already derived"),
        (
            derive("orders.>.x", "elsewhere"),
            "`>` may only be its last word",
        ),
    ] {
        let status = admin.create_derived(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(says), "{says}: {status:?}");
    }
    let status = admin
        .delete_channel(pb::DeleteChannelRequest {
            name: "audit.orders".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let member = pb::DeleteDerivedRequest {
        source: "orders.a".into(),
        target: "audit.orders".into(),
    };
    let status = admin.delete_derived(member).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("\"orders.>\""), "{status:?}");

    // Deleted, it derives nothing more.
    let whole = pb::DeleteDerivedRequest {
        source: "orders.>".into(),
        target: "audit.orders".into(),
    };
    admin.delete_derived(whole).await.unwrap();
    daemon
        .publisher()
        .await
        .publish(pb::PublishRequest {
            channel: "orders.a".into(),
            messages: vec![message(vec![], &[("keep", "1")], "")],
        })
        .await
        .unwrap();
    assert!(check.take_for(Duration::from_millis(300)).await.is_empty());
    daemon.stop().await;
}

#[tokio::test]
async fn a_wildcard_subscription_bounds_its_consumers_and_seeks_on_every_channel() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
[limits]
max_consumers_per_subscription = 2

[[channels]]
name = "orders.*"
[[channels.subscriptions]]
name = "audit"
"#;
    let daemon = Daemon::start_in(dir.path(), with_config(dir.path(), config)).await;
    // Bounded even while no channel matches (no member counts them then).
    let window = pb::FlowControl::default();
    let first = Consumer::try_attach(&daemon, "orders.*", "audit", window).await;
    let second = Consumer::try_attach(&daemon, "orders.*", "audit", window).await;
    assert!(first.is_ok() && second.is_ok());
    let third = Consumer::try_attach(&daemon, "orders.*", "audit", window).await;
    let refused = third.err().expect("a third consumer is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // One that leaves makes room (again and again: those gone are not counted).
    drop(first);
    for _ in 0..5 {
        let deadline = std::time::Instant::now() + common::PATIENCE;
        let again = loop {
            match Consumer::try_attach(&daemon, "orders.*", "audit", window).await {
                Ok(consumer) => break consumer,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(status) => panic!("no room after a consumer left: {status:?}"),
            }
        };
        drop(again);
    }
    drop(second);

    // Seek moves it on every channel it reads.
    let mut admin = daemon.admin().await;
    for channel in ["orders.a", "orders.b"] {
        let request = pb::CreateChannelRequest {
            name: channel.into(),
            ..Default::default()
        };
        admin.create_channel(request).await.unwrap();
        publish_one(&daemon, channel, "x").await;
        publish_one(&daemon, channel, "y").await;
    }
    assert_eq!(daemon.subscription("orders.*", "audit").await.unacked, 4);
    let seek = pb::SeekRequest {
        channel: "orders.*".into(),
        subscription: "audit".into(),
        to: Some(pb::Position {
            at: Some(pb::position::At::Edge(pb::Edge::Latest as i32)),
        }),
    };
    let moved = admin.seek(seek).await.unwrap().into_inner();
    assert_eq!((moved.unacked, moved.backlog), (0, 0));
    let mut consumer = Consumer::attach(&daemon, "orders.*", "audit", 10).await;
    assert!(
        consumer
            .take_for(Duration::from_millis(300))
            .await
            .is_empty()
    );
    daemon.stop().await;
}
