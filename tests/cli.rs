//! The typed client (`ferry-client`) and the command line built on it, through the real
//! binary: publishing pipelined with a confirmation per message, consuming with acks, nacks and
//! deadline extension, reconnecting across `kill -9`, and the CLI's output, JSON and exit codes.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Daemon, Options};
use ferry_client::{Client, Code, Error, Message, Nack, SubscribeOptions, SubscriptionOptions};

async fn client(daemon: &Daemon) -> Client {
    Client::connect(daemon.url.clone()).await.expect("connect")
}

async fn next(deliveries: &mut ferry_client::Subscription) -> ferry_client::Delivery {
    let next = tokio::time::timeout(common::PATIENCE, deliveries.next()).await;
    next.expect("a delivery in time")
        .expect("stream open")
        .expect("no error")
}

#[tokio::test]
async fn the_client_publishes_pipelined_and_settles_what_it_receives() {
    let daemon = Daemon::start().await;
    let client = client(&daemon).await;
    client.create_channel("orders").await.unwrap();
    let options = SubscriptionOptions {
        ack_deadline: Some(Duration::from_millis(400)),
        ..SubscriptionOptions::default()
    };
    client
        .create_subscription("orders", "billing", options)
        .await
        .unwrap();

    // Pipelined: every message confirmed, in order.
    let publisher = client.publisher("orders");
    let mut confirmations = Vec::new();
    for n in 0..1000u32 {
        let message = Message::new(n.to_string()).attribute("n", n.to_string());
        confirmations.push(publisher.send(message).await.unwrap());
    }
    let mut sequences = Vec::new();
    for confirmation in confirmations {
        sequences.push(confirmation.await.unwrap().sequence);
    }
    assert_eq!(sequences, (1..=1000).collect::<Vec<u64>>());
    let duplicate = publisher
        .publish(Message::new("x").id("once"))
        .await
        .unwrap();
    let again = publisher
        .publish(Message::new("x").id("once"))
        .await
        .unwrap();
    assert!(!duplicate.duplicate && again.duplicate && again.sequence == duplicate.sequence);

    let window = SubscribeOptions {
        max_messages: 100,
        ..SubscribeOptions::default()
    };
    let mut deliveries = client.subscribe_with("orders", "billing", window);
    let (mut kept, mut first, mut redelivered) = (None, Vec::new(), BTreeSet::new());
    while first.len() < 1001 || redelivered.len() < 2 {
        let delivery = next(&mut deliveries).await;
        assert_eq!(delivery.channel, "orders");
        if delivery.attempt > 1 {
            redelivered.insert((delivery.sequence, delivery.attempt));
            delivery.ack().await.unwrap();
            continue;
        }
        first.push(delivery.sequence);
        match delivery.sequence {
            // Held past its 400 ms deadline: the client extends it, so the ack still counts.
            1 => kept = Some(delivery),
            // A nack brings it back (attempt 2); one dropped unsettled too.
            2 => {
                let nack = Nack {
                    reason: "try again".into(),
                    ..Nack::default()
                };
                delivery.nack_with(nack).await.unwrap();
            }
            3 => drop(delivery),
            _ => delivery.ack().await.unwrap(),
        }
    }
    assert_eq!(
        first,
        (1..=1001).collect::<Vec<u64>>(),
        "in order, each once"
    );
    assert_eq!(redelivered, BTreeSet::from([(2, 2), (3, 2)]));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    kept.unwrap()
        .ack()
        .await
        .expect("extended past its deadline");
    let info = client.subscription("orders", "billing").await.unwrap();
    assert_eq!((info.acked, info.unacked, info.consumers), (1001, 0, 1));

    // A subscription that does not exist is the stream's first item.
    let mut missing = client.subscribe("orders", "nobody");
    let error = missing.next().await.expect("an item").expect_err("refused");
    assert_eq!(error.code(), Some(Code::NotFound), "{error}");
    assert!(missing.next().await.is_none(), "then the stream ends");
    let refused = client.create_channel("orders").await.unwrap_err();
    assert!(
        matches!(
            refused,
            Error::Refused {
                code: Code::AlreadyExists,
                ..
            }
        ),
        "{refused}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_subscriber_reconnects_across_kill_9_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_in(dir.path(), Options::default()).await;
    let address = daemon.url.trim_start_matches("http://").to_owned();
    let client = client(&daemon).await;
    client.create_channel("events").await.unwrap();
    let options = SubscriptionOptions {
        ack_deadline: Some(Duration::from_secs(2)),
        ..SubscriptionOptions::default()
    };
    client
        .create_subscription("events", "all", options)
        .await
        .unwrap();
    let batch = |range: std::ops::Range<u32>| range.map(|n| Message::new(n.to_string())).collect();
    client.publish("events", batch(0..300)).await.unwrap();

    let mut deliveries = client.subscribe("events", "all");
    let mut acked = BTreeSet::new();
    while acked.len() < 100 {
        let delivery = next(&mut deliveries).await;
        let sequence = delivery.sequence;
        if delivery.ack().await.is_ok() {
            acked.insert(sequence);
        }
    }
    daemon.kill().await;
    let restarted = Options {
        listen: Some(address),
        ..Options::default()
    };
    let daemon = Daemon::start_in(dir.path(), restarted).await;
    client.publish("events", batch(300..500)).await.unwrap();
    while acked.len() < 500 {
        let delivery = next(&mut deliveries).await;
        let sequence = delivery.sequence;
        // An ack of a delivery from before the restart is stale: it comes again.
        match delivery.ack().await {
            Ok(()) => {
                acked.insert(sequence);
            }
            Err(Error::Stale | Error::Disconnected(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(acked, (1..=500).collect::<BTreeSet<u64>>(), "nothing lost");
    let info = client.subscription("events", "all").await.unwrap();
    assert_eq!(info.unacked, 0);
    daemon.stop().await;
}

/// Runs the `ferry` binary against `daemon`: its exit code, standard output and error.
fn ferry(daemon: &Daemon, args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    common::run_ferry(args, &[("FERRY_SERVER", &daemon.url)], stdin)
}

#[tokio::test]
async fn the_command_line_publishes_subscribes_and_administers() {
    let daemon = Daemon::start().await;
    let run = |args: &[&str], stdin: &str| ferry(&daemon, args, stdin);
    assert_eq!(run(&["channels", "create", "orders"], "").0, Some(0));
    let (code, out, _) = run(
        &[
            "subscriptions",
            "create",
            "orders",
            "billing",
            "--start",
            "earliest",
        ],
        "",
    );
    assert_eq!(
        (code, out.trim()),
        (Some(0), "created subscription billing of orders")
    );

    let (code, out, _) = run(
        &[
            "publish",
            "orders",
            "hello",
            "--attr",
            "region=eu",
            "--key",
            "k",
        ],
        "",
    );
    assert_eq!((code, out.trim()), (Some(0), "orders: sequence 1"));
    let (code, out, _) = run(
        &["publish", "orders", "--lines", "--json"],
        "a\nb\n\u{e9}\n",
    );
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(code, Some(0));
    assert_eq!(
        (
            summary["published"].as_u64(),
            summary["last_sequence"].as_u64()
        ),
        (Some(3), Some(4))
    );
    let file = daemon.data_dir.with_file_name("payload.bin");
    std::fs::write(&file, [0xffu8, 0x00, 0x01]).unwrap();
    assert_eq!(
        run(&["publish", "orders", "--file", file.to_str().unwrap()], "").0,
        Some(0)
    );

    let (code, out, _) = run(
        &["subscribe", "orders", "billing", "--count", "5", "--json"],
        "",
    );
    assert_eq!(code, Some(0));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let payloads: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["payload"].as_str().unwrap(),
                l["payload_encoding"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        payloads,
        [
            ("hello", "utf8"),
            ("a", "utf8"),
            ("b", "utf8"),
            ("\u{e9}", "utf8"),
            ("/wAB", "base64")
        ]
    );
    assert_eq!(
        (
            lines[0]["attributes"]["region"].as_str(),
            lines[0]["key"].as_str()
        ),
        (Some("eu"), Some("k"))
    );
    // Acked: nothing is left.
    let (code, out, _) = run(&["subscribe", "orders", "billing", "--idle", "300ms"], "");
    assert_eq!((code, out.as_str()), (Some(0), ""));

    let (code, out, _) = run(&["status"], "");
    assert_eq!(code, Some(0));
    assert!(
        out.contains("1 channel(s)")
            && out
                .lines()
                .any(|l| l.starts_with("orders") && l.contains("billing")),
        "{out}"
    );
    let (_, out, _) = run(&["channels", "get", "orders", "--json"], "");
    let channel: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(channel["subscriptions"][0]["acked"].as_u64(), Some(5));

    // Exit codes: 1 refused (with the status), 2 usage, 3 unreachable (naming the address).
    let (code, _, err) = run(&["subscribe", "orders", "nobody", "--count", "1"], "");
    assert_eq!(code, Some(1));
    assert!(err.contains("NOT_FOUND") && err.contains("nobody"), "{err}");
    assert_eq!(run(&["publish"], "").0, Some(2));
    let (code, _, err) = run(&["status", "--server", "http://127.0.0.1:1"], "");
    assert_eq!(code, Some(3));
    assert!(
        err.contains("cannot connect to http://127.0.0.1:1"),
        "{err}"
    );

    // Dead letters go back with redrive; seek moves a subscription.
    assert_eq!(run(&["channels", "create", "jobs.dead"], "").0, Some(0));
    assert_eq!(run(&["channels", "create", "jobs"], "").0, Some(0));
    let create = [
        "subscriptions",
        "create",
        "jobs",
        "work",
        "--max-attempts",
        "1",
        "--dead-letter",
        "jobs.dead",
    ];
    assert_eq!(run(&create, "").0, Some(0));
    assert_eq!(run(&["publish", "jobs", "job-1"], "").0, Some(0));
    let client = client(&daemon).await;
    let mut deliveries = client.subscribe("jobs", "work");
    next(&mut deliveries).await.nack().await.unwrap();
    drop(deliveries);
    // Detached before the commands below run (they block this test's runtime).
    while client.subscription("jobs", "work").await.unwrap().consumers > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (code, out, _) = run(&["redrive", "jobs.dead", "--subscription", "work"], "");
    assert_eq!(
        (code, out.trim()),
        (Some(0), "redrove 1 message(s) from jobs.dead")
    );
    let (code, out, _) = run(&["subscribe", "jobs", "work", "--count", "1"], "");
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("jobs #1") && out.trim_end().ends_with(": job-1"),
        "{out}"
    );
    let (code, out, _) = run(
        &["subscriptions", "seek", "jobs", "work", "--to", "latest"],
        "",
    );
    assert_eq!(
        (code, out.trim()),
        (
            Some(0),
            "moved subscription work of jobs: 0 unacked, 0 waiting"
        )
    );

    assert_eq!(run(&["channels", "delete", "orders"], "").0, Some(0));
    assert_eq!(run(&["channels", "get", "orders"], "").0, Some(1));
    daemon.stop().await;
}

#[tokio::test]
async fn a_dropped_subscription_leaves_instead_of_nacking_what_keeps_coming() {
    let daemon = Daemon::start().await;
    let client = client(&daemon).await;
    client.create_channel("jobs").await.unwrap();
    let options = SubscriptionOptions::default();
    client
        .create_subscription("jobs", "work", options)
        .await
        .unwrap();
    let messages = (0..20).map(|n| Message::new(format!("{n}"))).collect();
    client.publish("jobs", messages).await.unwrap();

    let window = SubscribeOptions {
        max_messages: 2,
        ..SubscribeOptions::default()
    };
    let mut first = client.subscribe_with("jobs", "work", window);
    let held = next(&mut first).await;
    // Dropped while the application still holds a delivery: the consumer leaves at once, and
    // what it held comes again (once) to the next consumer instead of each new delivery
    // being nacked while the old one is held.
    drop(first);
    let mut again = client.subscribe("jobs", "work");
    let mut attempts = std::collections::BTreeMap::new();
    while attempts.len() < 20 {
        let delivery = next(&mut again).await;
        attempts.insert(delivery.sequence, delivery.attempt);
        delivery.ack().await.unwrap();
    }
    let retried = attempts.values().filter(|&&a| a > 1).count();
    assert!(
        retried <= 2,
        "only what the first consumer held came again: {attempts:?}"
    );
    assert!(held.ack().await.is_err(), "its consumer left");
    daemon.stop().await;
}
