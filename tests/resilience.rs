//! Misbehaving clients against the real binary: a consumer that stops reading its stream is
//! detached with a clear status and a log line, and what it held goes to the other consumers;
//! requests that cannot be decoded or are too large get the status the API promises.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use common::{Consumer, Daemon, PATIENCE, ack_ids, batch, sequences, with_config};
use ferry_proto::pb::{self, subscribe_request::Request as Req};
use tonic::Code;
use tonic::codegen::http;

/// Starts a daemon whose config is `toml`, in a temp dir it keeps alive with the daemon.
async fn daemon_with(toml: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_in(dir.path(), with_config(dir.path(), toml)).await;
    (daemon, dir)
}

#[tokio::test]
async fn a_consumer_that_stops_reading_is_detached_and_its_deliveries_go_to_others() {
    let (daemon, _dir) = daemon_with(
        r#"
[limits]
consumer_queue = "256KiB"
consumer_stall_timeout = "1s"
"#,
    )
    .await;
    daemon.create("jobs", &[("work", 60_000)]).await;

    // The stuck consumer attaches first with a huge window and then never reads again.
    let mut stuck = Consumer::try_attach(
        &daemon,
        "jobs",
        "work",
        pb::FlowControl {
            max_messages: 100_000,
            max_bytes: 1 << 30,
        },
    )
    .await
    .unwrap();
    let mut worker = Consumer::attach(&daemon, "jobs", "work", 16).await;

    // 16 MiB: far more than HTTP/2 buffers between the two ends plus the consumer queue.
    let count = 1024;
    let mut published = BTreeSet::new();
    for chunk in 0..16 {
        let payloads = (0..count / 16).map(|i| vec![(chunk * 64 + i) as u8; 16 << 10]);
        published.extend(daemon.publish("jobs", payloads).await);
    }

    // The worker gets everything, including what the stuck consumer held, long before the
    // 60 s ack deadline would have released it.
    let mut done = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
    while done.len() < count && tokio::time::Instant::now() < deadline {
        let deliveries = worker.take_for(Duration::from_millis(200)).await;
        if deliveries.is_empty() {
            continue;
        }
        done.extend(sequences(&deliveries));
        worker.ack(ack_ids(&deliveries)).await;
    }
    assert_eq!(done, published, "every message reaches the worker");

    let info = daemon.subscription("jobs", "work").await;
    assert_eq!(
        info.consumers, 1,
        "the stuck consumer is detached: {info:?}"
    );
    assert_eq!((info.unacked, info.in_flight), (0, 0), "{info:?}");

    // When it finally reads, it learns why it was let go.
    let status = stuck.closed().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    for needle in [
        "took nothing from its stream",
        "\"work\"",
        "read the stream",
    ] {
        assert!(
            status.message().contains(needle),
            "{needle:?} in {status:?}"
        );
    }
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        log.contains("consumer read nothing from its stream: detached") && log.contains("work"),
        "the log names the detached consumer:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "a log file gets no terminal colour codes"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_slow_reader_is_given_less_but_keeps_its_stream() {
    let (daemon, _dir) = daemon_with(
        r#"
[limits]
consumer_queue = "64KiB"
consumer_stall_timeout = "2s"
"#,
    )
    .await;
    daemon.create("slow", &[("s", 60_000)]).await;
    let mut consumer = Consumer::attach(&daemon, "slow", "s", 10_000).await;
    let request = batch("slow", (0..200).map(|i| vec![i as u8; 8 << 10]));
    daemon
        .publisher()
        .await
        .publish(request)
        .await
        .expect("publish");

    // Reading with pauses shorter than the stall timeout never gets it detached.
    let mut got = Vec::new();
    while got.len() < 200 {
        let deliveries = consumer.take_for(Duration::from_millis(300)).await;
        assert!(
            consumer.ended.is_none(),
            "stream ended: {:?}",
            consumer.ended
        );
        got.extend(sequences(&deliveries));
        if !deliveries.is_empty() {
            consumer.ack(ack_ids(&deliveries)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(got, (1..=200).collect::<Vec<_>>());
    daemon.stop().await;
}

/// Sends and receives raw bytes as gRPC messages, so that a test can send what no generated
/// client would: garbage, or a frame larger than any limit.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        use bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, Self::Error> {
        use bytes::Buf as _;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// A gRPC client that speaks raw bytes to `daemon`.
async fn raw_client(daemon: &Daemon) -> tonic::client::Grpc<tonic::transport::Channel> {
    let mut grpc = tonic::client::Grpc::new(daemon.channel().await);
    grpc.ready().await.expect("ready");
    grpc
}

fn encoded(request: &pb::PublishRequest) -> Bytes {
    Bytes::from(prost::Message::encode_to_vec(request))
}

const PUBLISH: &str = "/ferry.v1.Publisher/Publish";
const PUBLISH_STREAM: &str = "/ferry.v1.Publisher/PublishStream";
/// The default decoding limit: twice the default max_batch_bytes (4 MiB) plus 1 MiB.
const MAX_REQUEST: usize = 9 << 20;

#[tokio::test]
async fn every_bad_request_gets_the_status_the_api_promises() {
    let daemon = Daemon::start().await;
    daemon.create("ok", &[("s", 30_000)]).await;
    let path = |p: &'static str| http::uri::PathAndQuery::from_static(p);

    // Garbage and oversized unary requests: INVALID_ARGUMENT, naming the configured limit.
    let garbage = Bytes::from_static(&[0xff; 16]);
    let outcome = raw_client(&daemon)
        .await
        .unary(
            tonic::Request::new(garbage.clone()),
            path(PUBLISH),
            RawCodec,
        )
        .await;
    let status = outcome.expect_err("garbage is refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("not a valid protobuf"),
        "{status:?}"
    );
    let oversized = Bytes::from(vec![0u8; MAX_REQUEST + 1]);
    let outcome = raw_client(&daemon)
        .await
        .unary(
            tonic::Request::new(oversized.clone()),
            path(PUBLISH),
            RawCodec,
        )
        .await;
    let status = outcome.expect_err("an oversized request is refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    for needle in [&MAX_REQUEST.to_string()[..], "max_batch_bytes"] {
        assert!(status.message().contains(needle), "{needle} in {status:?}");
    }

    // On a publish stream, the batches before a bad frame are confirmed, the bad frame ends
    // the stream with INVALID_ARGUMENT, and nothing after it is stored.
    for bad in [garbage, oversized] {
        let frames = vec![
            encoded(&batch("ok", [b"before".to_vec()])),
            bad,
            encoded(&batch("ok", [b"after".to_vec()])),
        ];
        let mut responses = raw_client(&daemon)
            .await
            .streaming(
                tonic::Request::new(tokio_stream::iter(frames)),
                path(PUBLISH_STREAM),
                RawCodec,
            )
            .await
            .expect("stream opens")
            .into_inner();
        let first = responses.message().await.expect("first batch confirmed");
        let confirmed: pb::PublishResponse =
            prost::Message::decode(first.expect("a response")).unwrap();
        assert_eq!(confirmed.sequences.len(), 1);
        let status = responses
            .message()
            .await
            .expect_err("the bad frame ends it");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    let info = daemon.subscription("ok", "s").await;
    assert_eq!(
        info.unacked, 2,
        "only the two batches before the bad frames: {info:?}"
    );

    // An error never echoes more than a short prefix of what the client sent.
    let huge_name = "x".repeat(100_000);
    let status = daemon
        .admin()
        .await
        .get_channel(pb::GetChannelRequest { name: huge_name })
        .await
        .expect_err("no such channel");
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().len() < 300, "{}", status.message().len());
    assert!(status.message().contains("100000 bytes"), "{status:?}");
    daemon.stop().await;
}

#[tokio::test]
async fn a_message_larger_than_the_consumer_queue_is_still_delivered() {
    let (daemon, _dir) = daemon_with("[limits]\nconsumer_queue = \"64KiB\"\n").await;
    daemon.create("big", &[("s", 60_000)]).await;
    let mut consumer = Consumer::attach(&daemon, "big", "s", 10).await;
    daemon
        .publish("big", [vec![7u8; 512 << 10], b"after".to_vec()])
        .await;
    let deliveries = consumer.take(2).await;
    assert_eq!(sequences(&deliveries), vec![1, 2]);
    assert_eq!(
        deliveries[0].message.as_ref().unwrap().payload.len(),
        512 << 10
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_client_that_floods_acks_without_reading_answers_is_held_back_and_detached() {
    let (daemon, _dir) =
        daemon_with("[limits]\nconsumer_queue = \"64KiB\"\nconsumer_stall_timeout = \"1s\"\n")
            .await;
    daemon.create("flood", &[("s", 60_000)]).await;
    let attach = Req::Attach(pb::Attach {
        channel: "flood".into(),
        subscription: "s".into(),
        window: None,
    });
    let (requests, mut responses) = Consumer::open(&daemon, attach).await.unwrap();
    // Each request is answered with 1,000 results echoing 1 KiB ids: 1 MB per answer. The
    // client never reads them.
    let ids: Vec<String> = (0..1000).map(|i| format!("{i:0>1024}")).collect();
    let mut sent = 0;
    let flood = async {
        loop {
            let request = pb::SubscribeRequest {
                request: Some(Req::Ack(pb::AckIds {
                    ack_ids: ids.clone(),
                })),
            };
            if requests.send(request).await.is_err() {
                return;
            }
            sent += 1;
        }
    };
    // Past the queue and its 1 MiB slack the broker stops reading the requests, so the
    // client's sends block on HTTP/2 flow control instead of the broker's memory growing...
    let _ = tokio::time::timeout(Duration::from_secs(3), flood).await;
    assert!(sent < 200, "{sent} MB of answers were not held back");
    // ...and the consumer, which reads nothing, is detached.
    let status = loop {
        match tokio::time::timeout(PATIENCE, responses.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the stream never ended"),
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    daemon.stop().await;
}

#[tokio::test]
async fn all_channels_share_one_message_cache_budget() {
    let (daemon, _dir) =
        daemon_with("[storage]\nmessage_cache = \"4MiB\"\ntail_cache = \"2MiB\"\n").await;
    // Ten channels of 2 MB each that nobody reads: 20 MB stored, far more than the budget.
    for i in 0..10 {
        let channel = format!("cold.{i}");
        daemon.create(&channel, &[("s", 60_000)]).await;
        for _ in 0..4 {
            daemon
                .publish(&channel, (0..50).map(|j| vec![j as u8; 10_000]))
                .await;
        }
    }
    let info = daemon
        .admin()
        .await
        .get_broker(pb::GetBrokerRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.message_cache_bytes > 0, "{info:?}");
    assert!(
        info.message_cache_bytes <= 4 << 20,
        "the cache holds {} bytes, over its 4 MiB budget",
        info.message_cache_bytes
    );
    // Everything is still there, read from disk.
    let mut consumer = Consumer::attach(&daemon, "cold.0", "s", 1000).await;
    assert_eq!(consumer.take(200).await.len(), 200);
    daemon.stop().await;
}
