//! Operating the broker through the real binary: administration and its figures, declared
//! configuration, bad input and bad configuration, health, reflection and graceful shutdown.

mod common;

use std::time::{Duration, Instant};

use common::{Consumer, Daemon, Options, ack_ids, message};
use ferry_proto::pb::{self, subscribe_request::Request as Req};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

#[tokio::test]
async fn admin_manages_channels_and_subscriptions_that_persist_and_shows_their_figures() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_in(dir.path(), Options::default()).await;
    let mut admin = daemon.admin().await;
    let created = admin
        .create_channel(pb::CreateChannelRequest {
            name: "orders.created".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (created.get_ref().messages, created.get_ref().next_sequence),
        (0, 1)
    );
    daemon.create("zeta", &[]).await;
    let sub = admin
        .create_subscription(pb::CreateSubscriptionRequest {
            channel: "orders.created".into(),
            name: "billing".into(),
            ack_deadline: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        sub.ack_deadline.unwrap().seconds,
        30,
        "the default ack deadline"
    );
    let again = admin
        .create_channel(pb::CreateChannelRequest {
            name: "orders.created".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(again.unwrap_err().code(), Code::AlreadyExists);
    let again = admin
        .create_subscription(pb::CreateSubscriptionRequest {
            channel: "orders.created".into(),
            name: "billing".into(),
            ack_deadline: None,
            ..Default::default()
        })
        .await;
    assert_eq!(again.unwrap_err().code(), Code::AlreadyExists);

    daemon
        .publish("orders.created", (0..10u8).map(|i| vec![i; 100]))
        .await;
    let mut consumer = Consumer::attach(&daemon, "orders.created", "billing", 4).await;
    let four = consumer.take(4).await;
    consumer.ack(ack_ids(&four[..1])).await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let channel = admin
        .get_channel(pb::GetChannelRequest {
            name: "orders.created".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((channel.messages, channel.next_sequence), (10, 11));
    assert!(channel.bytes >= 1000, "{channel:?}");
    let billing = &channel.subscriptions[0];
    assert_eq!(billing.name, "billing");
    // One acked, so a fifth fits the window of four.
    assert_eq!(
        (
            billing.backlog,
            billing.in_flight,
            billing.acked,
            billing.unacked
        ),
        (5, 4, 1, 9)
    );
    assert_eq!((billing.consumers, billing.ack_floor), (1, 2));
    assert!(billing.oldest_unacked_age.is_some() && billing.oldest_unacked_publish_time.is_some());

    let listed = admin
        .list_channels(pb::ListChannelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = listed.channels.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["orders.created", "zeta"]);
    drop(consumer);
    daemon.stop().await;

    // What the Admin API created is still there after a restart.
    let daemon = Daemon::start_in(dir.path(), Options::default()).await;
    let mut admin = daemon.admin().await;
    let subs = admin
        .list_subscriptions(pb::ListSubscriptionsRequest {
            channel: "orders.created".into(),
        })
        .await
        .unwrap();
    let billing = &subs.get_ref().subscriptions[0];
    assert_eq!(
        (billing.name.as_str(), billing.acked, billing.unacked),
        ("billing", 1, 9)
    );

    admin
        .delete_subscription(pb::DeleteSubscriptionRequest {
            channel: "orders.created".into(),
            name: "billing".into(),
        })
        .await
        .unwrap();
    let gone = admin
        .get_subscription(pb::GetSubscriptionRequest {
            channel: "orders.created".into(),
            name: "billing".into(),
        })
        .await;
    assert_eq!(gone.unwrap_err().code(), Code::NotFound);
    admin
        .delete_channel(pb::DeleteChannelRequest {
            name: "zeta".into(),
        })
        .await
        .unwrap();
    daemon.stop().await;

    let daemon = Daemon::start_in(dir.path(), Options::default()).await;
    let listed = daemon
        .admin()
        .await
        .list_channels(pb::ListChannelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.channels.len(), 1);
    assert!(listed.channels[0].subscriptions.is_empty());
    daemon.stop().await;
}

#[tokio::test]
async fn a_deleted_subscription_disconnects_its_consumers_and_frees_its_messages() {
    let daemon = Daemon::start().await;
    daemon.create("c", &[("s", 30_000)]).await;
    let mut consumer = Consumer::attach(&daemon, "c", "s", 10).await;
    daemon.publish("c", (0..3u8).map(|i| vec![i; 100])).await;
    let mut admin = daemon.admin().await;
    let stored = || async {
        let request = pb::GetChannelRequest { name: "c".into() };
        let info = daemon
            .admin()
            .await
            .get_channel(request)
            .await
            .unwrap()
            .into_inner();
        (info.messages, info.bytes)
    };
    assert_eq!(stored().await.0, 3);
    admin
        .delete_subscription(pb::DeleteSubscriptionRequest {
            channel: "c".into(),
            name: "s".into(),
        })
        .await
        .unwrap();
    assert_eq!(consumer.closed().await.code(), Code::NotFound);
    // With no subscription left, nothing needs the messages: those stored go, new ones are
    // not kept, and sequences go on.
    assert_eq!(stored().await, (0, 0));
    assert_eq!(daemon.publish("c", [vec![1u8; 10]]).await, vec![4]);
    assert_eq!(stored().await, (0, 0));
}

#[tokio::test]
async fn bad_input_gets_a_precise_status_and_changes_nothing() {
    let daemon = Daemon::start().await;
    daemon.create("ok", &[("s", 30_000)]).await;
    let mut admin = daemon.admin().await;
    let mut publisher = daemon.publisher().await;

    let bad_name = admin
        .create_channel(pb::CreateChannelRequest {
            name: "no spaces!".into(),
            ..Default::default()
        })
        .await;
    refused(
        bad_name,
        Code::InvalidArgument,
        &["letters, digits, '_' and '-'"],
    );
    // Subscriptions refused for their name, their deadline (too long, or overflowing), or a
    // missing channel.
    let subscription =
        |channel: &str, name: &str, seconds: Option<i64>| pb::CreateSubscriptionRequest {
            channel: channel.into(),
            name: name.into(),
            ack_deadline: seconds.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
            ..Default::default()
        };
    let bad_sub = admin
        .create_subscription(subscription("ok", "a..b", None))
        .await;
    refused(bad_sub, Code::InvalidArgument, &["a..b"]);
    let bad_deadline = admin
        .create_subscription(subscription("ok", "late", Some(7200)))
        .await;
    refused(bad_deadline, Code::InvalidArgument, &["1 h"]);
    let overflowing = admin
        .create_subscription(subscription("ok", "late", Some(i64::MAX)))
        .await;
    refused(overflowing, Code::InvalidArgument, &["ack_deadline"]);
    let no_channel = admin
        .create_subscription(subscription("nope", "s", None))
        .await;
    refused(no_channel, Code::NotFound, &["\"nope\""]);

    let publish = |channel: &str, messages: Vec<pb::OutgoingMessage>| pb::PublishRequest {
        channel: channel.into(),
        messages,
    };
    let one = || vec![message(vec![1], &[], "")];
    refused(
        publisher.publish(publish("nope", one())).await,
        Code::NotFound,
        &["\"nope\""],
    );
    refused(
        publisher.publish(publish("ok", vec![])).await,
        Code::InvalidArgument,
        &["at least one"],
    );
    let too_big = vec![message(vec![0; (1 << 20) + 1], &[], "")];
    refused(
        publisher.publish(publish("ok", too_big)).await,
        Code::InvalidArgument,
        &["1048576", "max_message_bytes"],
    );
    let too_many = (0..1001).flat_map(|_| one()).collect();
    refused(
        publisher.publish(publish("ok", too_many)).await,
        Code::InvalidArgument,
        &["1000"],
    );
    let too_heavy = (0..5).map(|_| message(vec![0; 1 << 20], &[], "")).collect();
    refused(
        publisher.publish(publish("ok", too_heavy)).await,
        Code::InvalidArgument,
        &["max_batch_bytes"],
    );
    let info = admin
        .get_channel(pb::GetChannelRequest { name: "ok".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.messages, info.next_sequence),
        (0, 1),
        "refused batches changed nothing"
    );

    // A Subscribe stream must start with an attach, to something that exists.
    let not_attach = Consumer::open(&daemon, Req::Ack(pb::AckIds { ack_ids: vec![] })).await;
    refused(not_attach, Code::InvalidArgument, &["attach"]);
    let window = pb::FlowControl::default();
    let missing = Consumer::try_attach(&daemon, "ok", "nobody", window).await;
    refused(missing, Code::NotFound, &["\"nobody\""]);
    let huge = pb::FlowControl {
        max_messages: 1_000_000,
        max_bytes: 0,
    };
    refused(
        Consumer::try_attach(&daemon, "ok", "s", huge).await,
        Code::InvalidArgument,
        &["100000"],
    );

    // Unknown ack ids are answered one by one, and the stream carries on.
    let mut consumer = Consumer::attach(&daemon, "ok", "s", 10).await;
    let results = consumer.ack(vec!["garbage".into(), "999-1-1".into()]).await;
    assert_eq!(
        results,
        vec![pb::AckStatus::Unknown, pb::AckStatus::Unknown]
    );
    daemon.publish("ok", [b"still works".to_vec()]).await;
    let delivered = consumer.take(1).await;
    // A well-formed id of this subscription that was never issued is UNKNOWN, not STALE.
    let real = &delivered[0].ack_id;
    let (head, _check) = real.rsplit_once('-').unwrap();
    let (prefix, delivery) = head.rsplit_once('-').unwrap();
    let never_issued = format!("{prefix}-{}-00000000", delivery.parse::<u64>().unwrap() - 1);
    assert_eq!(
        consumer.ack(vec![never_issued]).await,
        vec![pb::AckStatus::Unknown]
    );
    assert_eq!(
        consumer.ack(ack_ids(&delivered)).await,
        vec![pb::AckStatus::Ok]
    );

    // A second attach on the same stream ends it.
    consumer
        .send(Req::Attach(pb::Attach {
            channel: "ok".into(),
            subscription: "s".into(),
            window: None,
        }))
        .await;
    assert_eq!(consumer.closed().await.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn declared_channels_are_created_and_a_bad_config_stops_start_up_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        r#"
[storage]
fsync = "always"

[[channels]]
name = "user.signed_up"

[[channels.subscriptions]]
name = "welcome-email"
ack_deadline = "5s"
"#,
    )
    .unwrap();
    let daemon = Daemon::start_in(
        dir.path(),
        Options {
            config: Some(config.clone()),
            ..Options::default()
        },
    )
    .await;
    let info = daemon.subscription("user.signed_up", "welcome-email").await;
    assert_eq!(info.ack_deadline.unwrap().seconds, 5);
    daemon.stop().await;

    // A changed setting is applied on the next start.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("\"5s\"", "\"7s\""),
    )
    .unwrap();
    let daemon = Daemon::start_in(
        dir.path(),
        Options {
            config: Some(config.clone()),
            ..Options::default()
        },
    )
    .await;
    assert_eq!(
        daemon
            .subscription("user.signed_up", "welcome-email")
            .await
            .ack_deadline
            .unwrap()
            .seconds,
        7
    );
    daemon.stop().await;

    for (text, expected) in [
        ("[storage]\nfsync = \"sometimes\"\n", "line 2"),
        ("[server]\nlisten_on = \"x\"\n", "unknown field `listen_on`"),
        (
            "[[channels]]\nname = \"a\"\n[[channels]]\nname = \"a\"\n",
            "channels[1].name",
        ),
        ("[[channels]]\nname = \"bad name\"\n", "channels[0].name"),
    ] {
        std::fs::write(&config, text).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("never"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&config.display().to_string()),
            "names the file: {stderr}"
        );
        assert!(stderr.contains(expected), "{expected:?} in {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test]
async fn health_and_reflection_serve_generic_grpc_tools() {
    let daemon = Daemon::start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(daemon.channel().await);
    for service in [
        "",
        "ferry.v1.Publisher",
        "ferry.v1.Subscriber",
        "ferry.v1.Admin",
    ] {
        let response = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(
            response.into_inner().status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving
        );
    }

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(daemon.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "ferry.v1.Publisher",
        "ferry.v1.Subscriber",
        "ferry.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
}

#[tokio::test]
async fn sigterm_ends_open_streams_and_exits_cleanly() {
    let daemon = Daemon::start().await;
    daemon.create("c", &[("s", 30_000)]).await;
    let mut consumer = Consumer::attach(&daemon, "c", "s", 10).await;
    let (requests, rx) = tokio::sync::mpsc::channel(4);
    requests
        .send(pb::PublishRequest {
            channel: "c".into(),
            messages: vec![message(vec![1], &[], "")],
        })
        .await
        .unwrap();
    let mut publishing = daemon
        .publisher()
        .await
        .publish_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        publishing.message().await.unwrap().unwrap().sequences,
        vec![1]
    );
    assert_eq!(consumer.take(1).await.len(), 1);

    let started = Instant::now();
    daemon.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped promptly: {:?}",
        started.elapsed()
    );
    assert_eq!(consumer.closed().await.code(), Code::Unavailable);
    assert_eq!(
        publishing.message().await.unwrap_err().code(),
        Code::Unavailable
    );
    drop(requests);
}

#[test]
fn serve_help_documents_every_flag() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--config",
        "--listen",
        "--data-dir",
        "--verbose",
        "SIGTERM",
        "ferry listening on",
    ] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("config")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("fsync = \"always\""));
}

/// Asserts that a call was refused with `code` and a message naming each of `needles`.
#[track_caller]
fn refused<T>(outcome: Result<T, tonic::Status>, code: Code, needles: &[&str]) {
    let Err(status) = outcome else {
        panic!("expected {code:?}, the call succeeded")
    };
    assert_eq!(status.code(), code, "{status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{needle:?} not in {:?}",
            status.message()
        );
    }
}

#[tokio::test]
async fn get_broker_reports_commits_syncs_and_disk_space() {
    let daemon = Daemon::start().await;
    daemon.create("counted", &[("s", 30_000)]).await;
    let mut admin = daemon.admin().await;
    let before = admin
        .get_broker(pb::GetBrokerRequest {})
        .await
        .unwrap()
        .into_inner();
    // Sequential single publishes and single acks: a commit each.
    for i in 0..10u8 {
        daemon.publish("counted", [vec![i; 100]]).await;
    }
    let mut consumer = Consumer::attach(&daemon, "counted", "s", 100).await;
    let delivered = consumer.take(10).await;
    for id in ack_ids(&delivered) {
        consumer.ack(vec![id]).await;
    }
    let after = admin
        .get_broker(pb::GetBrokerRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(after.channels, 1);
    assert_eq!(after.messages_written - before.messages_written, 10);
    assert!(after.ack_states_written > before.ack_states_written);
    let commits = after.commits - before.commits;
    assert!(commits >= 20, "{after:?}");
    // With fsync = "always" every commit syncs the segment log, once; sled is made durable
    // by checkpoints (a flush and a sync of its log, and of the directory when files go).
    let syncs = after.device_syncs - before.device_syncs;
    let checkpoints = after.checkpoints - before.checkpoints;
    assert!(syncs >= commits, "{after:?}");
    assert!(syncs <= commits + 3 * checkpoints + 1, "{after:?}");
    assert!(after.disk_free_bytes > 0 && after.disk_free_needed_bytes > 0);
    assert!(!after.publishing_refused);
    daemon.stop().await;
}

#[tokio::test]
async fn logs_are_plain_text_off_a_terminal_or_one_json_object_a_line() {
    for (format, json) in [("text", false), ("json", true)] {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            env: vec![("FERRY_LOG_FORMAT".into(), format.into())],
            ..Options::default()
        };
        let daemon = Daemon::start_in(dir.path(), options).await;
        daemon.create("orders", &[]).await;
        daemon.stop().await;
        let log = std::fs::read_to_string(dir.path().join("ferry.log")).unwrap();
        assert!(log.contains("channel created"), "{log}");
        assert!(!log.contains('\u{1b}'), "no colour codes in a file: {log}");
        for line in log.lines().filter(|l| !l.is_empty()) {
            let object = line.starts_with('{') && line.ends_with('}');
            assert_eq!(object, json, "{format}: {line}");
            if json {
                assert!(line.contains(r#""level":"#), "{line}");
            }
        }
    }
}

#[tokio::test]
async fn it_refuses_to_serve_beyond_loopback_unless_told_that_nothing_authenticates() {
    let dir = tempfile::tempdir().unwrap();
    // Refused before it binds anything: no address but loopback is ever used.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not a loopback address") && stderr.contains("allow_unauthenticated"),
        "{stderr}"
    );
    assert!(!dir.path().join("data").exists(), "nothing was created");
}

/// Runs the `ferry` binary with `args`: its exit code, standard output and standard error.
fn ferry(args: &[&str]) -> (Option<i32>, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn config_check_says_what_start_up_would_and_health_has_an_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[[channels]]\nname = \"orders\"\n").unwrap();
    let (code, out, _) = ferry(&["config", "check", good.to_str().unwrap()]);
    assert_eq!((code, out.contains("good")), (Some(0), true), "{out}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[channels]]\nname = \"orders\"\n[[channels.subscriptions]]\nname = \"a\"\nfilter = \"attributes.x = 1\"\n",
    )
    .unwrap();
    let (code, _, err) = ferry(&["config", "check", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("bad.toml")
            && err.contains("channels[0].subscriptions[0]")
            && err.contains("column 16"),
        "{err}"
    );
    let open = dir.path().join("open.toml");
    std::fs::write(&open, "[server]\nlisten = \"0.0.0.0:50051\"\n").unwrap();
    let (code, _, err) = ferry(&["config", "check", open.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("allow_unauthenticated"), "{err}");

    let daemon = Daemon::start().await;
    let url = daemon.url.clone();
    let (code, out, _) = ferry(&["health", "--server", &url]);
    assert_eq!(
        (code, out.trim_end()),
        (Some(0), format!("{url}: serving").as_str())
    );
    daemon.stop().await;
    let (code, _, err) = ferry(&["health", "--server", &url]);
    assert_eq!(code, Some(3));
    assert!(err.contains("cannot connect to"), "{err}");
}

#[tokio::test]
async fn a_message_with_a_traceparent_is_logged_as_it_is_published_delivered_and_settled() {
    let dir = tempfile::tempdir().unwrap();
    let options = common::Options {
        env: vec![("RUST_LOG".into(), "ferry=info,ferry::trace=debug".into())],
        ..common::Options::default()
    };
    let daemon = Daemon::start_in(dir.path(), options).await;
    daemon.create("orders", &[("billing", 30_000)]).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let request = pb::PublishRequest {
        channel: "orders".into(),
        messages: vec![
            common::message(b"untraced".to_vec(), &[], ""),
            common::message(b"traced".to_vec(), &[("traceparent", traceparent)], ""),
        ],
    };
    daemon.publisher().await.publish(request).await.unwrap();
    let mut consumer = common::Consumer::attach(&daemon, "orders", "billing", 10).await;
    let got = consumer.take(2).await;
    let traced = got
        .iter()
        .find(|d| d.message.as_ref().unwrap().sequence == 2)
        .unwrap();
    assert_eq!(
        traced.message.as_ref().unwrap().attributes["traceparent"],
        traceparent,
        "kept as it is"
    );
    consumer.nack(vec![traced.ack_id.clone()]).await;
    let again = consumer.take(1).await;
    consumer.ack(common::ack_ids(&again)).await;
    let untraced = got
        .iter()
        .find(|d| d.message.as_ref().unwrap().sequence == 1)
        .unwrap();
    consumer.ack(vec![untraced.ack_id.clone()]).await;
    daemon.stop().await;

    let log = std::fs::read_to_string(dir.path().join("ferry.log")).unwrap();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(traceparent)).collect();
    let said = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
    assert_eq!(said("published"), 1, "{log}");
    assert_eq!(said("delivered"), 2, "{log}");
    assert_eq!(said("outcome=\"nack\""), 1, "{log}");
    assert_eq!(said("outcome=\"acked\""), 1, "{log}");
    assert!(lines.iter().all(|l| l.contains("sequence=2")), "{log}");
    assert!(
        lines
            .iter()
            .filter(|l| l.contains("delivered"))
            .all(|l| l.contains("subscription=billing")),
        "{log}"
    );
    assert_eq!(
        log.matches("sequence=1").count(),
        0,
        "untraced messages are not logged"
    );
}

#[tokio::test]
async fn the_server_keys_come_from_the_environment_too() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("from-env");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("serve")
        .env("FERRY_LISTEN", "127.0.0.1:0")
        .env("FERRY_DATA_DIR", &data)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let ready = tokio::time::timeout(common::PATIENCE, lines.next_line()).await;
    let line = ready.unwrap().unwrap().unwrap();
    assert!(line.starts_with("ferry listening on 127.0.0.1:"), "{line}");
    assert!(
        data.join("db").exists(),
        "the store is where FERRY_DATA_DIR says"
    );
    child.kill().await.unwrap();
}

#[tokio::test]
async fn limits_on_consumers_and_headers_refuse_only_the_excess() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
[limits]
max_consumers_per_subscription = 2
max_header_bytes = "4KiB"

[[channels]]
name = "orders"
[[channels.subscriptions]]
name = "work"
"#;
    let daemon = Daemon::start_in(dir.path(), common::with_config(dir.path(), config)).await;
    let window = pb::FlowControl {
        max_messages: 10,
        max_bytes: 0,
    };
    // Consumers: the third is refused with what to do; the first two go on.
    let mut first = Consumer::try_attach(&daemon, "orders", "work", window)
        .await
        .unwrap();
    let mut second = Consumer::try_attach(&daemon, "orders", "work", window)
        .await
        .unwrap();
    let refused = Consumer::try_attach(&daemon, "orders", "work", window)
        .await
        .err()
        .expect("a third consumer is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("max_consumers_per_subscription"),
        "{refused:?}"
    );
    daemon
        .publish("orders", (0..4).map(|i| vec![i as u8]))
        .await;
    let mut delivered = first.take_for(Duration::from_millis(300)).await.len();
    delivered += second.take_for(Duration::from_millis(300)).await.len();
    assert_eq!(delivered, 4, "the attached consumers are not affected");

    // Headers: a call with 8 KiB of metadata is refused, a normal one is not.
    let mut admin = daemon.admin().await;
    let mut big = tonic::Request::new(pb::ListChannelsRequest {});
    big.metadata_mut()
        .insert("x-padding", "p".repeat(8 << 10).parse().unwrap());
    assert!(admin.list_channels(big).await.is_err());
    let mut admin = daemon.admin().await;
    admin
        .list_channels(pb::ListChannelsRequest {})
        .await
        .unwrap();
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        log.contains("limits.max_consumers_per_subscription reached"),
        "{log}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_connection_past_max_connections_is_closed_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[limits]\nmax_connections = 2\n";
    let daemon = Daemon::start_in(dir.path(), common::with_config(dir.path(), config)).await;
    let list = |channel: tonic::transport::Channel| async move {
        pb::admin_client::AdminClient::new(channel)
            .list_channels(pb::ListChannelsRequest {})
            .await
    };
    let one = common::connect(&daemon.url).await.unwrap();
    let two = common::connect(&daemon.url).await.unwrap();
    list(one.clone()).await.unwrap();
    list(two.clone()).await.unwrap();
    let refused = match common::connect(&daemon.url).await {
        None => true,
        Some(three) => list(three).await.is_err(),
    };
    assert!(refused, "a third connection is refused");
    list(one.clone()).await.unwrap();
    // Once one closes, a new one is served.
    drop(two);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(four) = common::connect(&daemon.url).await
            && list(four).await.is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "no room came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(log.contains("limits.max_connections reached"), "{log}");
    drop(one);
    daemon.stop().await;
}

/// Checks that `body` is OpenMetrics text: metadata lines, samples `name{labels} value` whose
/// names were declared, and `# EOF` last.
fn check_exposition(body: &str) {
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "{body}");
    let mut declared = std::collections::HashSet::new();
    for line in &lines[..lines.len() - 1] {
        if let Some(meta) = line.strip_prefix("# ") {
            let mut words = meta.split(' ');
            let kind = words.next().unwrap();
            assert!(["TYPE", "HELP", "UNIT"].contains(&kind), "{line}");
            declared.insert(words.next().unwrap().to_owned());
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert!(value.parse::<f64>().is_ok(), "not a number: {line}");
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name: {line}"
        );
        let family = ["_total", "_bucket", "_count", "_sum", "_created"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| declared.contains(*base))
            .unwrap_or(name);
        assert!(declared.contains(family), "undeclared: {line}");
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "{line}"
            );
        }
    }
}

/// The value of the sample whose series is exactly `series`.
fn sample(body: &str, series: &str) -> f64 {
    let line = body
        .lines()
        .find(|l| l.rsplit_once(' ').is_some_and(|(s, _)| s == series))
        .unwrap_or_else(|| panic!("no {series} in {body}"));
    line.rsplit_once(' ').unwrap().1.parse().unwrap()
}

/// `GET path` on a loopback HTTP endpoint: the whole response.
async fn http_get(address: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn prometheus_scrapes_per_channel_and_per_subscription_figures() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n[[channels]]\nname = \"orders\"\n\
         [[channels.subscriptions]]\nname = \"work\"\n"
    );
    let daemon = Daemon::start_in(dir.path(), common::with_config(dir.path(), &config)).await;
    daemon
        .publish("orders", (0..3).map(|i| vec![i as u8; 10]))
        .await;
    let address = format!("127.0.0.1:{port}");
    let response = http_get(&address, "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    for line in [
        "ferry_channel_messages{channel=\"orders\"} 3",
        "ferry_channel_published_total{channel=\"orders\"} 3",
        "ferry_subscription_backlog_messages{channel=\"orders\",subscription=\"work\"} 3",
        "ferry_subscription_consumers{channel=\"orders\",subscription=\"work\"} 0",
        "# TYPE ferry_store_operations counter",
        "# TYPE ferry_publish_latency_seconds histogram",
        "ferry_publish_latency_seconds_count 1",
        "# TYPE ferry_delivery_latency_seconds histogram",
        // One commit carried the three messages; the channel's creation carried none.
        "ferry_commit_messages_sum 3.0",
        "# TYPE ferry_commit_latency_seconds histogram",
        "ferry_streams{kind=\"subscribe\"} 0",
    ] {
        assert!(response.contains(line), "{line} missing from {response}");
    }
    let body = response.split("\r\n\r\n").nth(1).unwrap();
    check_exposition(body);
    let syncs = sample(body, "ferry_sync_latency_seconds_count");
    assert!(
        syncs >= 2.0,
        "every commit synced (fsync = always): {syncs}"
    );

    // A consumer that takes and acks them: one stream open while it is attached.
    let mut consumer = common::Consumer::attach(&daemon, "orders", "work", 10).await;
    let got = consumer.take(3).await;
    consumer.ack(common::ack_ids(&got)).await;
    let body = http_get(&address, "/metrics").await;
    for line in [
        "ferry_streams{kind=\"subscribe\"} 1",
        "ferry_subscription_acked_total{channel=\"orders\",subscription=\"work\"} 3",
        "ferry_subscription_delivered_total{channel=\"orders\",subscription=\"work\"} 3",
        "ferry_subscription_in_flight_messages{channel=\"orders\",subscription=\"work\"} 0",
        "ferry_delivery_latency_seconds_count 3",
    ] {
        assert!(body.contains(line), "{line} missing from {body}");
    }
    assert!(sample(&body, "ferry_connections") >= 1.0);
    assert!(http_get(&address, "/").await.starts_with("HTTP/1.1 404"));
    daemon.stop().await;
}

#[tokio::test]
async fn config_diff_says_what_sighup_then_applies_and_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let first = r#"
[[channels]]
name = "orders"
[[channels.subscriptions]]
name = "billing"
ack_deadline = "30s"
[[channels.subscriptions]]
name = "eu"
filter = 'attributes.region = "eu"'
"#;
    let daemon = Daemon::start_in(dir.path(), common::with_config(dir.path(), first)).await;
    let second = r#"
[[channels]]
name = "orders"
[[channels.subscriptions]]
name = "billing"
ack_deadline = "10s"
[[channels.subscriptions]]
name = "eu"
filter = 'attributes.region = "us"'

[[channels]]
name = "payments"
[[channels.subscriptions]]
name = "audit"
"#;
    let file = dir.path().join("ferry.toml");
    std::fs::write(&file, second).unwrap();
    let path = file.to_str().unwrap();

    // The diff names each step; a refusal makes it exit 1.
    let (code, out, _) = ferry(&["config", "diff", path, "--server", &daemon.url]);
    assert_eq!(code, Some(1), "{out}");
    for (action, what) in [
        ("keep", "channel orders"),
        ("change", "subscription billing of orders"),
        ("REFUSE", "subscription eu of orders"),
        ("create", "channel payments"),
        ("create", "subscription audit of payments"),
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(action) && l.contains(what)),
            "{action} {what} missing from\n{out}"
        );
    }
    assert!(out.contains("ack_deadline: 30000ms -> 10000ms"), "{out}");
    assert!(out.contains("cannot change"), "{out}");
    let (_, json, _) = ferry(&["config", "diff", path, "--server", &daemon.url, "--json"]);
    let steps: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(steps.as_array().unwrap().len(), 5);

    // SIGHUP applies the safe part and refuses the rest, saying why; the log says when it
    // is done.
    common::signal(daemon.pid(), "HUP");
    daemon.wait_for_log("configuration reloaded", 1).await;
    let mut admin = daemon.admin().await;
    let request = || pb::GetChannelRequest {
        name: "payments".into(),
    };
    assert!(
        admin.get_channel(request()).await.is_ok(),
        "payments was created"
    );
    let billing = daemon.subscription("orders", "billing").await;
    assert_eq!(billing.ack_deadline.unwrap().seconds, 10);
    let eu = daemon.subscription("orders", "eu").await;
    assert_eq!(
        eu.filter, r#"attributes.region = "eu""#,
        "a filter never changes"
    );
    let (code, _, _) = ferry(&["config", "diff", path, "--server", &daemon.url]);
    assert_eq!(code, Some(1), "the filter change is still refused");

    // A bad file is refused whole: the broker goes on as it was.
    std::fs::write(&file, "[[channels]]\nname = \"a b\"\n").unwrap();
    common::signal(daemon.pid(), "HUP");
    daemon
        .wait_for_log("reload refused: the file is bad", 1)
        .await;
    let log_says = |what: &str| std::fs::read_to_string(&daemon.log).unwrap().contains(what);
    assert!(log_says("reload: refused") && log_says("cannot change"));
    assert!(daemon.admin().await.get_channel(request()).await.is_ok());
    daemon.stop().await;
}

/// Processor time (user and system, in clock ticks) the process `pid` has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Sets the soft limit of open files of the process `pid` (the hard one stays as it was).
fn set_open_files_limit(pid: u32, limit: u64) -> bool {
    std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:"))
        .status()
        .is_ok_and(|status| status.success())
}

/// The soft limit of open files of the process `pid`.
fn open_files_limit(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// Out of file descriptors, every accept fails while the connection stays queued, and the
/// server asks again at once: without a pause that loop takes a whole core.
#[tokio::test]
async fn out_of_file_descriptors_accepting_pauses_instead_of_spinning() {
    let daemon = Daemon::start().await;
    let pid = daemon.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let limit = open_files_limit(pid);
    if !set_open_files_limit(pid, open + 2) {
        eprintln!("skipped: prlimit cannot lower the daemon's open files limit here");
        daemon.stop().await;
        return;
    }
    let address = daemon.url.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tokio::net::TcpStream::connect(&address).await.unwrap());
    }
    daemon.wait_for_log("cannot accept a connection", 1).await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 30,
        "{used} ticks of CPU in a second while out of file descriptors"
    );

    // With room again, the broker serves new clients.
    assert!(set_open_files_limit(pid, limit));
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(channel) = common::connect(&daemon.url).await
            && pb::admin_client::AdminClient::new(channel)
                .list_channels(pb::ListChannelsRequest {})
                .await
                .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.stop().await;
}

#[tokio::test]
async fn a_second_broker_on_a_data_directory_in_use_stops_saying_so() {
    let daemon = Daemon::start().await;
    daemon.create("orders", &[("all", 30_000)]).await;
    let data_dir = daemon.data_dir.to_string_lossy().into_owned();
    let (code, _, stderr) = tokio::task::spawn_blocking(move || {
        common::run_ferry(
            &["serve", "--listen", "127.0.0.1:0", "--data-dir", &data_dir],
            &[],
            "",
        )
    })
    .await
    .unwrap();
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("in use by another process"), "{stderr}");
    // The first one goes on as if nothing happened.
    let confirmed = daemon.publish("orders", [b"after".to_vec()]).await;
    assert_eq!(confirmed, vec![1]);
    daemon.stop().await;
}

#[tokio::test]
async fn sleds_log_file_keeps_room_allocated_ahead_of_its_end() {
    use std::os::unix::fs::MetadataExt as _;
    let daemon = Daemon::start().await;
    daemon.create("orders", &[("all", 30_000)]).await;
    daemon.publish("orders", [vec![1u8; 1000]]).await;
    // Its writes then cannot fail for space when another program fills the disk: the broker's
    // space monitor keeps blocks allocated past the file's end (its size unchanged).
    let db = daemon.data_dir.join("db");
    let room = || {
        let m = std::fs::metadata(&db).unwrap();
        (m.blocks() * 512).saturating_sub(m.len())
    };
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while room() < 2 << 20 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(room() >= 2 << 20, "{} bytes allocated past the end", room());
    daemon.stop().await;
}
