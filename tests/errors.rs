//! Error flows through the real binary: retry policies on every failure path, dead-letter
//! channels with exact provenance, redrive, ordering keys, attempt counts that survive a crash,
//! and the statuses bad policies get.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Consumer, Daemon, Rng, ack_ids, message, sequences, with_config};
use ferry_proto::pb;
use tonic::Code;

/// Starts a daemon whose config is `toml`, in a temp dir it keeps alive with the daemon.
async fn daemon_with(toml: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_in(dir.path(), with_config(dir.path(), toml)).await;
    (daemon, dir)
}

fn attributes(delivery: &pb::Delivery) -> &HashMap<String, String> {
    &delivery.message.as_ref().unwrap().attributes
}

fn nack(delivery: &pb::Delivery, reason: &str, terminal: bool) -> pb::Nack {
    pb::Nack {
        ack_ids: vec![delivery.ack_id.clone()],
        reason: reason.into(),
        terminal,
        ..Default::default()
    }
}

/// Waits for the next delivery and returns it with how long it took.
async fn next_after(consumer: &mut Consumer, since: Instant) -> (pb::Delivery, Duration) {
    let delivery = consumer.take(1).await.remove(0);
    (delivery, since.elapsed())
}

/// The wait must be at least what the policy says (less a little for timer rounding) and not
/// much longer (generous: CI machines are slow).
fn assert_waited(what: &str, waited: Duration, policy: Duration) {
    let floor = policy.mul_f64(0.9);
    let ceiling = policy + Duration::from_millis(1500);
    assert!(
        waited >= floor && waited <= ceiling,
        "{what}: waited {waited:?}, the policy says {policy:?}"
    );
}

#[tokio::test]
async fn every_failure_path_waits_out_the_same_retry_policy() {
    let (daemon, _dir) = daemon_with(
        r#"
[[channels]]
name = "jobs"
[[channels.subscriptions]]
name = "work"
ack_deadline = "400ms"
[channels.subscriptions.retry]
initial = "300ms"
multiplier = 2.0
maximum = "1s"
"#,
    )
    .await;
    let ms = Duration::from_millis;
    daemon.publish("jobs", [b"nacked".to_vec()]).await;
    let mut consumer = Consumer::attach(&daemon, "jobs", "work", 1).await;

    // A nack: the first retry waits `initial`, the second twice that, the third is capped.
    let mut delivery = consumer.take(1).await.remove(0);
    for (attempt, wait) in [(2, ms(300)), (3, ms(600)), (4, ms(1000))] {
        let nacked = Instant::now();
        consumer.nack(vec![delivery.ack_id.clone()]).await;
        let waited;
        (delivery, waited) = next_after(&mut consumer, nacked).await;
        assert_eq!(delivery.attempt, attempt);
        assert_waited("nack", waited, wait);
    }
    // A nack's own delay wins over the policy.
    let nacked = Instant::now();
    let mut own = nack(&delivery, "", false);
    own.delay = Some(prost_types::Duration {
        seconds: 0,
        nanos: 100_000_000,
    });
    consumer.nack_with(own).await;
    let (delivery, waited) = next_after(&mut consumer, nacked).await;
    assert_waited("nack with its own delay", waited, ms(100));
    consumer.ack(vec![delivery.ack_id]).await;

    // A deadline that passes: the ack deadline, then the backoff.
    daemon.publish("jobs", [b"expired".to_vec()]).await;
    let delivered = Instant::now();
    let first = consumer.take(1).await.remove(0);
    let (again, waited) = next_after(&mut consumer, delivered).await;
    assert_eq!((first.attempt, again.attempt), (1, 2));
    assert_waited("deadline", waited, ms(400 + 300));
    consumer.ack(vec![again.ack_id]).await;
    drop(consumer);
    // Gone before the next message, or it could be handed to this consumer as it leaves
    // (and released once more than the test counts).
    while daemon.subscription("jobs", "work").await.consumers > 0 {
        tokio::time::sleep(ms(5)).await;
    }

    // A consumer that leaves: its delivery waits out the backoff too.
    daemon.publish("jobs", [b"released".to_vec()]).await;
    let mut leaving = Consumer::attach(&daemon, "jobs", "work", 10).await;
    assert_eq!(sequences(&leaving.take(1).await), [3]);
    let left = Instant::now();
    drop(leaving);
    let mut next = Consumer::attach(&daemon, "jobs", "work", 10).await;
    let (back, waited) = next_after(&mut next, left).await;
    assert_eq!(
        (back.message.as_ref().unwrap().sequence, back.attempt),
        (3, 2)
    );
    assert_waited("release", waited, ms(300));
    next.ack(vec![back.ack_id]).await;

    let info = daemon.subscription("jobs", "work").await;
    assert_eq!(info.nacked, 4);
    assert_eq!(info.redelivered, 6);
    assert_eq!(info.unacked, 0);
    daemon.stop().await;
}

#[tokio::test]
async fn dead_letters_carry_their_provenance_and_redrive_brings_them_back() {
    let (daemon, _dir) = daemon_with(
        r#"
[[channels]]
name = "orders"
[[channels.subscriptions]]
name = "billing"
max_delivery_attempts = 2
dead_letter_channel = "orders.dead"
[[channels.subscriptions]]
name = "audit"

[[channels]]
name = "orders.dead"
"#,
    )
    .await;
    let mut publisher = daemon.publisher().await;
    let mut card = message(b"card".to_vec(), &[("region", "eu")], "customer-7");
    card.id = "order-1".into();
    let wire = message(b"wire".to_vec(), &[], "");
    publisher
        .publish(pb::PublishRequest {
            channel: "orders".into(),
            messages: vec![card, wire],
        })
        .await
        .unwrap();
    let mut audit = Consumer::attach(&daemon, "orders", "audit", 10).await;
    let originals = audit.take(2).await;
    audit.ack(ack_ids(&originals)).await;

    // The card fails twice, the second time for good; the wire transfer is refused outright.
    let mut billing = Consumer::attach(&daemon, "orders", "billing", 10).await;
    let first = billing.take(2).await;
    let published = first[0].message.as_ref().unwrap().publish_time;
    billing
        .nack_with(nack(&first[0], "card declined", false))
        .await;
    billing
        .nack_with(nack(&first[1], "no such account", true))
        .await;
    let retry = billing.take(1).await.remove(0);
    assert_eq!(
        (retry.message.as_ref().unwrap().sequence, retry.attempt),
        (1, 2)
    );
    billing.nack_with(nack(&retry, "", false)).await;

    // Nobody subscribed to the dead-letter channel, and still it kept them: a new subscription
    // starts at the first message it holds.
    let mut admin = daemon.admin().await;
    admin
        .create_subscription(pb::CreateSubscriptionRequest {
            channel: "orders.dead".into(),
            name: "inspect".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut inspect = Consumer::attach(&daemon, "orders.dead", "inspect", 10).await;
    let dead = inspect.take(2).await;
    let by_origin: HashMap<&str, &pb::Delivery> = dead
        .iter()
        .map(|d| (attributes(d)["ferry.dead_letter.sequence"].as_str(), d))
        .collect();
    let wire = attributes(by_origin["2"]);
    assert_eq!(wire["ferry.dead_letter.reason"], "terminal");
    assert_eq!(wire["ferry.dead_letter.attempts"], "1");
    assert_eq!(wire["ferry.dead_letter.error"], "no such account");
    let card = by_origin["1"].message.as_ref().unwrap();
    assert_eq!(
        (card.payload.as_ref(), card.key.as_str(), card.id.as_str()),
        (&b"card"[..], "customer-7", "order-1")
    );
    let mut provenance: Vec<(&str, &str)> = card
        .attributes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .filter(|(k, _)| *k != "ferry.dead_letter.time" && *k != "ferry.dead_letter.publish_time")
        .collect();
    provenance.sort();
    assert_eq!(
        provenance,
        [
            ("ferry.dead_letter.attempts", "2"),
            ("ferry.dead_letter.channel", "orders"),
            ("ferry.dead_letter.error", "card declined"),
            ("ferry.dead_letter.reason", "nack"),
            ("ferry.dead_letter.sequence", "1"),
            ("ferry.dead_letter.subscription", "billing"),
            ("region", "eu"),
        ]
    );
    let published = published.unwrap();
    let published_ms = published.seconds as u64 * 1000 + published.nanos as u64 / 1_000_000;
    assert_eq!(
        card.attributes["ferry.dead_letter.publish_time"],
        rfc3339(published_ms)
    );
    assert!(card.attributes["ferry.dead_letter.time"] >= rfc3339(published_ms));
    let info = daemon.subscription("orders", "billing").await;
    assert_eq!((info.dead_lettered, info.nacked, info.unacked), (2, 3, 0));

    // Redrive: back to billing only, under their original sequences, attempts from 1.
    let redriven = admin
        .redrive(pb::RedriveRequest {
            channel: "orders.dead".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((redriven.redriven, redriven.skipped), (2, 0));
    let mut back = billing.take(2).await;
    back.sort_by_key(|d| d.message.as_ref().unwrap().sequence);
    assert_eq!(sequences(&back), [1, 2]);
    assert!(back.iter().all(|d| d.attempt == 1));
    let card = back[0].message.as_ref().unwrap();
    let mut attributes: Vec<_> = card.attributes.iter().collect();
    attributes.sort();
    assert_eq!(
        attributes,
        [
            (&"ferry.redrive.count".to_owned(), &"1".to_owned()),
            (&"region".to_owned(), &"eu".to_owned())
        ]
    );
    assert_eq!(card.publish_time, Some(published));
    billing.ack(ack_ids(&back)).await;
    assert!(audit.take_for(Duration::from_millis(500)).await.is_empty());
    // They left the dead-letter channel: the deliveries inspect holds are stale.
    assert_eq!(
        inspect.ack(ack_ids(&dead)).await,
        [pb::AckStatus::Stale, pb::AckStatus::Stale]
    );
    let inspected = daemon.subscription("orders.dead", "inspect").await;
    assert_eq!(inspected.unacked, 0);
    let again = admin
        .redrive(pb::RedriveRequest {
            channel: "orders.dead".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.redriven, 0);
    // The dead-letter channel cannot go while billing names it.
    let refused = admin
        .delete_channel(pb::DeleteChannelRequest {
            name: "orders.dead".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("billing"), "{refused:?}");
    daemon.stop().await;
}

/// RFC 3339 in UTC to the millisecond, as the broker writes it.
fn rfc3339(ms: u64) -> String {
    let output = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{}.{:03}", ms / 1000, ms % 1000)])
        .arg("+%Y-%m-%dT%H:%M:%S.%3NZ")
        .output()
        .expect("date");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn attempts_and_backoff_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
[[channels]]
name = "jobs"
[[channels.subscriptions]]
name = "work"
max_delivery_attempts = 5
dead_letter_channel = "jobs.dead"
[[channels.subscriptions]]
name = "slow"
[channels.subscriptions.retry]
initial = "3s"

[[channels]]
name = "jobs.dead"
"#;
    let options = with_config(dir.path(), config);
    let daemon = Daemon::start_in(dir.path(), options.clone()).await;
    daemon.publish("jobs", [b"flaky".to_vec()]).await;
    let mut work = Consumer::attach(&daemon, "jobs", "work", 1).await;
    for attempt in 1..=3 {
        let delivery = work.take(1).await.remove(0);
        assert_eq!(delivery.attempt, attempt);
        work.nack(vec![delivery.ack_id]).await;
    }
    let mut slow = Consumer::attach(&daemon, "jobs", "slow", 1).await;
    let delivery = slow.take(1).await.remove(0);
    slow.nack(vec![delivery.ack_id]).await;
    let nacked = Instant::now();
    daemon.kill().await;

    let daemon = Daemon::start_in(dir.path(), options).await;
    let mut work = Consumer::attach(&daemon, "jobs", "work", 1).await;
    let delivery = work.take(1).await.remove(0);
    // Three failures were recorded; only the fourth delivery, in flight at the crash, is
    // forgotten.
    assert_eq!(delivery.attempt, 4);
    let mut slow = Consumer::attach(&daemon, "jobs", "slow", 1).await;
    let retry = slow.take(1).await.remove(0);
    assert_eq!(retry.attempt, 2);
    assert!(
        nacked.elapsed() >= Duration::from_millis(2700),
        "the backoff was forgotten: {:?}",
        nacked.elapsed()
    );
    slow.ack(vec![retry.ack_id]).await;

    // The attempt limit counts across the crash.
    let mut delivery = delivery;
    while delivery.attempt < 5 {
        work.nack(vec![delivery.ack_id]).await;
        delivery = work.take(1).await.remove(0);
    }
    work.nack(vec![delivery.ack_id]).await;
    let info = daemon.subscription("jobs", "work").await;
    assert_eq!((info.dead_lettered, info.unacked), (1, 0));
    daemon.stop().await;
}

#[tokio::test]
async fn ordering_keys_hold_with_four_consumers_and_random_failures() {
    let (daemon, _dir) = daemon_with(
        r#"
[[channels]]
name = "accounts"
[[channels.subscriptions]]
name = "ledger"
ack_deadline = "300ms"
"#,
    )
    .await;
    const KEYS: u64 = 6;
    const MESSAGES: u64 = 240;
    let mut publisher = daemon.publisher().await;
    let mut key_of = HashMap::new();
    let mut published = HashMap::<String, Vec<u64>>::new();
    for chunk in 0..MESSAGES / 40 {
        let messages = (0..40)
            .map(|i| {
                let n = chunk * 40 + i;
                // Every fifth message is unkeyed: it must not wait for anyone.
                let key = if n % 5 == 4 {
                    String::new()
                } else {
                    format!("account-{}", n % KEYS)
                };
                message(n.to_be_bytes().to_vec(), &[], &key)
            })
            .collect::<Vec<_>>();
        let keys: Vec<String> = messages.iter().map(|m| m.key.clone()).collect();
        let sequences = publisher
            .publish(pb::PublishRequest {
                channel: "accounts".into(),
                messages,
            })
            .await
            .unwrap()
            .into_inner()
            .sequences;
        for (seq, key) in sequences.into_iter().zip(keys) {
            if !key.is_empty() {
                published.entry(key.clone()).or_default().push(seq);
            }
            key_of.insert(seq, key);
        }
    }
    let mut consumers = Vec::new();
    for _ in 0..4 {
        consumers.push(Consumer::attach(&daemon, "accounts", "ledger", 8).await);
    }
    let mut rng = Rng::from_env("ordering");
    // Per key: the message that holds it now, and whether it was acked.
    let mut holder: HashMap<String, (u64, bool)> = HashMap::new();
    let mut acked_order: HashMap<String, Vec<u64>> = HashMap::new();
    let mut acked = std::collections::HashSet::new();
    let started = Instant::now();
    while acked.len() < MESSAGES as usize {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "only {} of {MESSAGES} acked",
            acked.len()
        );
        for consumer in &mut consumers {
            let deliveries = consumer.take_for(Duration::from_millis(20)).await;
            let (mut acks, mut acking, mut nacks) = (Vec::new(), Vec::new(), Vec::new());
            for delivery in deliveries {
                let seq = delivery.message.as_ref().unwrap().sequence;
                let key = &key_of[&seq];
                if acked.contains(&seq) {
                    // A delivery that waited in this consumer's stream while its deadline
                    // passed and a later delivery of the message was acked: stale, and no
                    // longer holding its key.
                    continue;
                }
                if !key.is_empty() {
                    match holder.get(key) {
                        Some(&(held, _)) if held == seq => {}
                        Some(&(held, done)) => assert!(
                            done && seq > held,
                            "key {key}: {seq} delivered while {held} held it (acked: {done})"
                        ),
                        None => {}
                    }
                    holder.insert(key.clone(), (seq, false));
                }
                match rng.range(0..10) {
                    0 => nacks.push(delivery.ack_id),
                    // Left to its deadline.
                    1 => {}
                    _ => {
                        if !key.is_empty() {
                            holder.insert(key.clone(), (seq, true));
                            acked_order.entry(key.clone()).or_default().push(seq);
                        }
                        acked.insert(seq);
                        acks.push(delivery.ack_id);
                        acking.push((seq, key.clone()));
                    }
                }
            }
            if !nacks.is_empty() {
                consumer.nack(nacks).await;
            }
            if acks.is_empty() {
                continue;
            }
            let results = consumer.ack(acks).await;
            for (result, (seq, key)) in results.into_iter().zip(acking) {
                // Its deadline passed first (the test is slow): it comes back, still holding.
                if result == pb::AckStatus::Stale {
                    acked.remove(&seq);
                    if !key.is_empty() {
                        holder.insert(key.clone(), (seq, false));
                        acked_order.get_mut(&key).unwrap().pop();
                    }
                } else {
                    assert_eq!(result, pb::AckStatus::Ok);
                }
            }
        }
    }
    assert_eq!(
        acked_order, published,
        "each key's messages were acked in order"
    );
    let info = daemon.subscription("accounts", "ledger").await;
    assert_eq!(info.unacked, 0);
    daemon.stop().await;
}

#[tokio::test]
async fn bad_policies_and_dead_letter_channels_get_precise_statuses() {
    let daemon = Daemon::start().await;
    daemon.create("orders", &[]).await;
    let mut admin = daemon.admin().await;
    type Fill = fn(&mut pb::CreateSubscriptionRequest);
    let create = |fill: Fill| {
        let mut request = pb::CreateSubscriptionRequest {
            channel: "orders".into(),
            name: "billing".into(),
            ..Default::default()
        };
        fill(&mut request);
        request
    };
    let cases: [(Fill, Code, &str); 6] = [
        (
            |r| r.max_delivery_attempts = 3,
            Code::InvalidArgument,
            "dead_letter_channel",
        ),
        (
            |r| r.dead_letter_channel = "orders.dead".into(),
            Code::InvalidArgument,
            "max_delivery_attempts",
        ),
        (
            |r| {
                r.retry = Some(pb::RetryPolicy {
                    multiplier: 0.5,
                    ..Default::default()
                })
            },
            Code::InvalidArgument,
            "retry.multiplier",
        ),
        (
            |r| {
                r.retry = Some(pb::RetryPolicy {
                    initial: Some(prost_types::Duration {
                        seconds: 700,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
            },
            Code::InvalidArgument,
            "retry.initial",
        ),
        (
            |r| {
                r.max_delivery_attempts = 3;
                r.dead_letter_channel = "nowhere".into();
            },
            Code::NotFound,
            "nowhere",
        ),
        (
            |r| {
                r.max_delivery_attempts = 3;
                r.dead_letter_channel = "orders".into();
            },
            Code::FailedPrecondition,
            "own channel",
        ),
    ];
    for (fill, code, names) in cases {
        let status = admin.create_subscription(create(fill)).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(names), "{status:?}");
    }
    let listed = admin
        .list_subscriptions(pb::ListSubscriptionsRequest {
            channel: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.subscriptions.is_empty(),
        "a refused request changed something"
    );

    // The routing attribute of redriven messages is the broker's own.
    let forged = message(b"x".to_vec(), &[("ferry.redrive.for", "billing 1 0")], "");
    let status = daemon
        .publisher()
        .await
        .publish(pb::PublishRequest {
            channel: "orders".into(),
            messages: vec![forged],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("ferry.redrive.for"), "{status:?}");
    daemon.stop().await;

    // A bad policy in the config file stops the start with the key that is wrong.
    let dir = tempfile::tempdir().unwrap();
    let options = with_config(
        dir.path(),
        r#"
[[channels]]
name = "jobs"
[[channels.subscriptions]]
name = "work"
[channels.subscriptions.retry]
jitter = 2.0
"#,
    );
    let error = Daemon::try_start_in(dir.path(), options)
        .await
        .err()
        .unwrap();
    assert!(
        error.contains("channels[0].subscriptions[0]") && error.contains("retry.jitter"),
        "{error}"
    );
}

#[tokio::test]
async fn many_dead_letters_are_each_stored_once_and_all_come_back() {
    let (daemon, _dir) = daemon_with(
        r#"
[[channels]]
name = "jobs"
[[channels.subscriptions]]
name = "work"
max_delivery_attempts = 3
dead_letter_channel = "jobs.dead"

[[channels]]
name = "jobs.dead"
"#,
    )
    .await;
    const MESSAGES: u64 = 2000;
    for chunk in 0..MESSAGES / 100 {
        daemon
            .publish(
                "jobs",
                (0..100).map(|i| (chunk * 100 + i).to_be_bytes().to_vec()),
            )
            .await;
    }
    let mut consumer = Consumer::attach(&daemon, "jobs", "work", 500).await;
    let mut first_round = 0;
    while first_round < MESSAGES {
        let deliveries = consumer.take_for(Duration::from_millis(200)).await;
        assert!(!deliveries.is_empty(), "only {first_round} delivered");
        first_round += deliveries.len() as u64;
        let (odd, even): (Vec<_>, Vec<_>) = deliveries
            .iter()
            .partition(|d| d.message.as_ref().unwrap().sequence % 2 == 1);
        consumer
            .ack(ack_ids(&even.into_iter().cloned().collect::<Vec<_>>()))
            .await;
        let odd_ids = ack_ids(&odd.into_iter().cloned().collect::<Vec<_>>());
        consumer
            .nack_with(pb::Nack {
                ack_ids: odd_ids,
                terminal: true,
                ..Default::default()
            })
            .await;
    }
    let mut admin = daemon.admin().await;
    let dead = admin
        .get_channel(pb::GetChannelRequest {
            name: "jobs.dead".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (dead.messages, dead.next_sequence),
        (MESSAGES / 2, MESSAGES / 2 + 1)
    );
    let redriven = admin
        .redrive(pb::RedriveRequest {
            channel: "jobs.dead".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(redriven.redriven, MESSAGES / 2);
    let mut back = Vec::new();
    while (back.len() as u64) < MESSAGES / 2 {
        let deliveries = consumer.take_for(Duration::from_millis(500)).await;
        assert!(!deliveries.is_empty(), "only {} came back", back.len());
        consumer.ack(ack_ids(&deliveries)).await;
        back.extend(sequences(&deliveries));
    }
    back.sort();
    assert_eq!(back, (1..=MESSAGES).step_by(2).collect::<Vec<_>>());
    let info = daemon.subscription("jobs", "work").await;
    assert_eq!((info.unacked, info.dead_lettered), (0, MESSAGES / 2));
    let dead = admin
        .get_channel(pb::GetChannelRequest {
            name: "jobs.dead".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dead.messages, 0);
    daemon.stop().await;
}

#[tokio::test]
async fn redrive_selects_by_attribute_and_limit_and_bad_requests_are_refused() {
    let (daemon, _dir) = daemon_with(
        r#"
[[channels]]
name = "orders"
[[channels.subscriptions]]
name = "billing"
max_delivery_attempts = 2
dead_letter_channel = "orders.dead"

[[channels]]
name = "orders.dead"
"#,
    )
    .await;
    let regions = ["eu", "us", "eu", "eu"];
    let messages = regions
        .iter()
        .map(|r| message(r.as_bytes().to_vec(), &[("region", r)], ""))
        .collect();
    let mut publisher = daemon.publisher().await;
    publisher
        .publish(pb::PublishRequest {
            channel: "orders".into(),
            messages,
        })
        .await
        .unwrap();
    let mut billing = Consumer::attach(&daemon, "orders", "billing", 10).await;
    let first = billing.take(4).await;
    for delivery in &first {
        billing.nack_with(nack(delivery, "no", true)).await;
    }
    let mut admin = daemon.admin().await;
    let redrive = |attributes: &[(&str, &str)], limit| pb::RedriveRequest {
        channel: "orders.dead".into(),
        attributes: attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        limit,
        ..Default::default()
    };
    let one = admin
        .redrive(redrive(&[("region", "eu")], 1))
        .await
        .unwrap();
    assert_eq!(one.into_inner().redriven, 1);
    let back = billing.take(1).await;
    assert_eq!(attributes(&back[0])["region"], "eu");
    let rest = admin
        .redrive(redrive(&[("region", "eu")], 0))
        .await
        .unwrap();
    assert_eq!(rest.into_inner().redriven, 2);
    let back = billing.take(2).await;
    assert!(back.iter().all(|d| attributes(d)["region"] == "eu"));
    let us = admin.redrive(redrive(&[], 0)).await.unwrap().into_inner();
    assert_eq!(us.redriven, 1, "only the us message was left");

    // An id longer than the index takes, and a nack delay past 24 h, are refused.
    let long = pb::OutgoingMessage {
        id: "x".repeat(257),
        ..message(b"x".to_vec(), &[], "")
    };
    let status = publisher
        .publish(pb::PublishRequest {
            channel: "orders".into(),
            messages: vec![long],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("256 bytes"), "{status:?}");
    let held = billing.take(1).await;
    billing
        .send(pb::subscribe_request::Request::Nack(pb::Nack {
            ack_ids: vec![held[0].ack_id.clone()],
            delay: Some(prost_types::Duration {
                seconds: 25 * 3600,
                nanos: 0,
            }),
            ..Default::default()
        }))
        .await;
    let closed = billing.closed().await;
    assert_eq!(closed.code(), Code::InvalidArgument, "{closed:?}");
    daemon.stop().await;
}
