//! Delivery semantics through the real binary over gRPC: publish, subscribe, ack, fan-out,
//! competing consumers, redelivery, flow control and pipelined publishing.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Consumer, Daemon, ack_ids, batch, message, sequences};
use ferry_proto::pb::{self, subscribe_request::Request as Req};

#[tokio::test]
async fn published_messages_arrive_intact_in_order_and_acks_are_confirmed() {
    let daemon = Daemon::start().await;
    daemon
        .create("orders.created", &[("billing", 30_000)])
        .await;

    let messages = vec![
        message(
            b"first".to_vec(),
            &[("type", "order"), ("region", "eu")],
            "customer-7",
        ),
        message(vec![0, 159, 146, 150, 255], &[], ""),
        pb::OutgoingMessage {
            id: "publisher-id-3".into(),
            ..message(b"third".to_vec(), &[("a", "")], "k")
        },
    ];
    let request = pb::PublishRequest {
        channel: "orders.created".into(),
        messages: messages.clone(),
    };
    let confirmed = daemon
        .publisher()
        .await
        .publish(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(confirmed.sequences, vec![1, 2, 3]);

    let mut consumer = Consumer::attach(&daemon, "orders.created", "billing", 10).await;
    assert_eq!(consumer.attached.ack_deadline_ms, 30_000);
    let deliveries = consumer.take(3).await;
    for (i, (delivery, sent)) in deliveries.iter().zip(&messages).enumerate() {
        let got = delivery.message.as_ref().unwrap();
        assert_eq!(got.sequence, i as u64 + 1);
        assert_eq!(got.payload, sent.payload);
        assert_eq!(got.attributes, sent.attributes);
        assert_eq!((&got.key, &got.id), (&sent.key, &sent.id));
        assert!(got.publish_time.is_some());
        assert_eq!(delivery.attempt, 1);
    }
    let ids = ack_ids(&deliveries);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        3,
        "ack ids are distinct"
    );
    assert_eq!(consumer.ack(ids.clone()).await, vec![pb::AckStatus::Ok; 3]);
    assert_eq!(
        consumer.ack(ids).await,
        vec![pb::AckStatus::Stale; 3],
        "an ack id is valid once"
    );

    let info = daemon.subscription("orders.created", "billing").await;
    assert_eq!(
        (info.acked, info.unacked, info.in_flight, info.backlog),
        (3, 0, 0, 0)
    );
    assert_eq!(info.ack_floor, 4);
    assert!(
        consumer
            .take_for(Duration::from_millis(300))
            .await
            .is_empty(),
        "nothing is redelivered after acks"
    );
}

#[tokio::test]
async fn every_subscription_gets_every_message_and_consumers_of_one_share_them() {
    let daemon = Daemon::start().await;
    daemon
        .create("events", &[("audit", 30_000), ("work", 30_000)])
        .await;
    // Attach first, so that both workers are there when the messages come.
    let mut audit = Consumer::attach(&daemon, "events", "audit", 1000).await;
    let mut worker_a = Consumer::attach(&daemon, "events", "work", 20).await;
    let mut worker_b = Consumer::attach(&daemon, "events", "work", 20).await;

    for chunk in 0..10u64 {
        daemon
            .publish(
                "events",
                (0..20u64).map(|i| (chunk * 20 + i).to_le_bytes().to_vec()),
            )
            .await;
    }
    let all: Vec<u64> = (1..=200).collect();
    let audited = audit.take(200).await;
    assert_eq!(
        sequences(&audited),
        all,
        "the audit subscription gets everything, in order"
    );

    // Each worker acks what it gets, so that both keep pulling until all 200 are done.
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    let deadline = Instant::now() + common::PATIENCE;
    while got_a.len() + got_b.len() < 200 && Instant::now() < deadline {
        for (worker, got) in [(&mut worker_a, &mut got_a), (&mut worker_b, &mut got_b)] {
            let batch = worker.take_for(Duration::from_millis(50)).await;
            if !batch.is_empty() {
                assert!(
                    worker
                        .ack(ack_ids(&batch))
                        .await
                        .iter()
                        .all(|s| *s == pb::AckStatus::Ok)
                );
                got.extend(sequences(&batch));
            }
        }
    }
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "both workers got work: {} / {}",
        got_a.len(),
        got_b.len()
    );
    let union: HashSet<u64> = got_a.iter().chain(&got_b).copied().collect();
    assert_eq!(
        got_a.len() + got_b.len(),
        200,
        "no message went to both workers"
    );
    assert_eq!(
        union,
        all.iter().copied().collect(),
        "together they got every message"
    );
}

#[tokio::test]
async fn a_delivery_not_acked_in_time_is_redelivered_under_a_new_ack_id() {
    let daemon = Daemon::start().await;
    daemon.create("jobs", &[("runner", 400)]).await;
    daemon.publish("jobs", [b"slow".to_vec()]).await;
    let mut consumer = Consumer::attach(&daemon, "jobs", "runner", 10).await;

    let first = consumer.take(1).await;
    let started = Instant::now();
    let again = consumer.take(1).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "redelivered only after the deadline"
    );
    assert_eq!(sequences(&again), sequences(&first));
    assert_eq!(again[0].attempt, 2);
    assert_ne!(again[0].ack_id, first[0].ack_id);

    assert_eq!(
        consumer.ack(ack_ids(&first)).await,
        vec![pb::AckStatus::Stale],
        "the expired delivery's id"
    );
    assert_eq!(consumer.ack(ack_ids(&again)).await, vec![pb::AckStatus::Ok]);
    assert!(
        consumer
            .take_for(Duration::from_millis(700))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_nack_redelivers_at_once_and_an_extension_holds_the_delivery() {
    let daemon = Daemon::start().await;
    daemon.create("jobs", &[("runner", 500)]).await;
    daemon.publish("jobs", [b"a".to_vec(), b"b".to_vec()]).await;
    let mut consumer = Consumer::attach(&daemon, "jobs", "runner", 10).await;
    let first = consumer.take(2).await;

    let started = Instant::now();
    assert_eq!(
        consumer.nack(vec![first[0].ack_id.clone()]).await,
        vec![pb::AckStatus::Ok]
    );
    assert_eq!(
        consumer.extend(vec![first[1].ack_id.clone()], 3_000).await,
        vec![pb::AckStatus::Ok]
    );
    let again = consumer.take(1).await;
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "a nack does not wait for the deadline"
    );
    assert_eq!((sequences(&again), again[0].attempt), (vec![1], 2));

    // The extended delivery outlives the 500 ms deadline.
    assert_eq!(consumer.ack(ack_ids(&again)).await, vec![pb::AckStatus::Ok]);
    assert!(
        consumer
            .take_for(Duration::from_millis(1200))
            .await
            .is_empty(),
        "the extension held"
    );
    assert_eq!(
        consumer.ack(vec![first[1].ack_id.clone()]).await,
        vec![pb::AckStatus::Ok]
    );
}

#[tokio::test]
async fn a_consumer_that_leaves_releases_its_deliveries_at_once() {
    let daemon = Daemon::start().await;
    daemon.create("jobs", &[("runner", 60_000)]).await;
    daemon.publish("jobs", (0..5u8).map(|i| vec![i])).await;

    let mut leaving = Consumer::attach(&daemon, "jobs", "runner", 100).await;
    assert_eq!(sequences(&leaving.take(5).await), vec![1, 2, 3, 4, 5]);
    let mut staying = Consumer::attach(&daemon, "jobs", "runner", 100).await;
    assert!(
        staying
            .take_for(Duration::from_millis(200))
            .await
            .is_empty(),
        "all five are held by the first"
    );

    let started = Instant::now();
    drop(leaving);
    let released = staying.take(5).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "released long before the 60 s deadline"
    );
    assert_eq!(sequences(&released), vec![1, 2, 3, 4, 5]);
    assert!(released.iter().all(|d| d.attempt == 2));
}

#[tokio::test]
async fn the_flow_control_window_is_never_exceeded() {
    let daemon = Daemon::start().await;
    daemon.create("stream", &[("s", 60_000)]).await;
    daemon
        .publish("stream", (0..20u8).map(|i| vec![i; 1000]))
        .await;

    let mut consumer = Consumer::attach(&daemon, "stream", "s", 5).await;
    assert_eq!(consumer.attached.window.unwrap().max_messages, 5);
    let first = consumer.take(5).await;
    assert!(
        consumer
            .take_for(Duration::from_millis(300))
            .await
            .is_empty(),
        "at most 5 outstanding"
    );
    consumer.ack(ack_ids(&first[..2])).await;
    let more = consumer.take(2).await;
    assert_eq!(sequences(&more), vec![6, 7]);
    assert!(
        consumer
            .take_for(Duration::from_millis(300))
            .await
            .is_empty()
    );

    // Widen the window over the stream.
    consumer
        .send(Req::Flow(pb::FlowControl {
            max_messages: 8,
            max_bytes: 0,
        }))
        .await;
    assert_eq!(sequences(&consumer.take(3).await), vec![8, 9, 10]);
    assert!(
        consumer
            .take_for(Duration::from_millis(300))
            .await
            .is_empty()
    );

    // A byte window: 1,000-byte payloads, 2,500 bytes allowed.
    daemon.create("bytes", &[("s", 60_000)]).await;
    daemon
        .publish("bytes", (0..5u8).map(|i| vec![i; 1000]))
        .await;
    let window = pb::FlowControl {
        max_messages: 100,
        max_bytes: 2_500,
    };
    let mut narrow = Consumer::try_attach(&daemon, "bytes", "s", window)
        .await
        .unwrap();
    let two = narrow.take(2).await;
    assert!(
        narrow.take_for(Duration::from_millis(300)).await.is_empty(),
        "a third would pass 2,500 bytes"
    );
    narrow.ack(ack_ids(&two)).await;
    assert_eq!(narrow.take(2).await.len(), 2);
}

#[tokio::test]
async fn a_publish_stream_confirms_pipelined_batches_in_order() {
    let daemon = Daemon::start().await;
    daemon.create("pipe", &[("s", 30_000)]).await;
    let batches = (0..100u32)
        .map(|b| {
            batch(
                "pipe",
                (0..3u32).map(|i| (b * 3 + i).to_le_bytes().to_vec()),
            )
        })
        .collect();
    let mut responses = daemon.publish_stream(batches).await;
    let mut expected = 1;
    while let Some(response) = responses.message().await.unwrap() {
        assert_eq!(
            response.sequences,
            vec![expected, expected + 1, expected + 2]
        );
        expected += 3;
    }
    assert_eq!(expected, 301, "one confirmation per batch");

    // A bad batch ends the stream with its error; the batches before it stand.
    let batches = vec![batch("pipe", [vec![1]]), batch("nowhere", [vec![2]])];
    let mut responses = daemon.publish_stream(batches).await;
    assert_eq!(
        responses.message().await.unwrap().unwrap().sequences,
        vec![301]
    );
    let status = responses.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().contains("nowhere"));
}

#[tokio::test]
async fn batches_a_publish_stream_sent_at_once_share_a_commit() {
    let daemon = Daemon::start().await;
    daemon.create("together", &[("s", 30_000)]).await;
    let mut admin = daemon.admin().await;
    let mut figures = async || {
        let info = admin.get_broker(pb::GetBrokerRequest {}).await.unwrap();
        (info.get_ref().commits, info.get_ref().messages_written)
    };
    let before = figures().await;
    // Each round's 20 batches reach the broker together, so they are queued together and one
    // sync makes them all durable; queued one by one, the first would start a commit alone.
    const ROUNDS: u64 = 5;
    for round in 0..ROUNDS as u32 {
        let batches = (0..20u32)
            .map(|b| batch("together", [(round * 20 + b).to_le_bytes().to_vec()]))
            .collect();
        let mut responses = daemon.publish_stream(batches).await;
        let mut expected = u64::from(round) * 20 + 1;
        while let Some(response) = responses.message().await.unwrap() {
            assert_eq!(response.sequences, vec![expected], "in order, one each");
            expected += 1;
        }
        assert_eq!(expected, u64::from(round + 1) * 20 + 1);
    }
    let after = figures().await;
    assert_eq!(after.1 - before.1, ROUNDS * 20);
    let commits = after.0 - before.0;
    assert!(
        (1..=ROUNDS + 1).contains(&commits),
        "{commits} commits for {ROUNDS} rounds of batches sent at once"
    );
}

#[tokio::test]
async fn a_consumer_that_half_closes_its_requests_keeps_receiving() {
    let daemon = Daemon::start().await;
    daemon.create("feed", &[("reader", 30_000)]).await;
    let attach = Req::Attach(pb::Attach {
        channel: "feed".into(),
        subscription: "reader".into(),
        window: None,
    });
    // The request side ends right after the attach, as with `grpcurl -d '{"attach": ...}'`.
    let (requests, mut responses) = Consumer::open(&daemon, attach).await.unwrap();
    drop(requests);
    let first = responses.message().await.unwrap().unwrap();
    assert!(matches!(
        first.response,
        Some(pb::subscribe_response::Response::Attached(_))
    ));
    for round in 0..3u8 {
        daemon.publish("feed", [vec![round]]).await;
        let next = tokio::time::timeout(common::PATIENCE, responses.message())
            .await
            .unwrap();
        let Some(pb::subscribe_response::Response::Deliveries(batch)) =
            next.unwrap().unwrap().response
        else {
            panic!("expected deliveries");
        };
        assert_eq!(
            batch.deliveries[0]
                .message
                .as_ref()
                .unwrap()
                .payload
                .as_ref(),
            [round]
        );
    }
}
