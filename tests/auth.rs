//! Principals through the real binary: bearer tokens, per-principal rights on channel and
//! subscription patterns, filtered listings, open health and reflection, tokens on the command
//! line, and principals swapped on SIGHUP.

mod common;

use common::{Daemon, with_config};
use ferry_proto::pb::{
    self, admin_client::AdminClient, publisher_client::PublisherClient,
    subscriber_client::SubscriberClient,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Tokens of the principals the tests declare (long enough for `ferry token hash`).
const ROOT: &str = "ferry_root_token_0123456789abcdef";
const OWNER: &str = "ferry_owner_token_0123456789abcdef";
const OUTSIDER: &str = "ferry_outsider_token_0123456789abcdef";
const READER: &str = "ferry_reader_token_0123456789abcdef";
const NARROW: &str = "ferry_narrow_token_0123456789abcdef";

/// Runs the `ferry` binary with `stdin`: its exit code, standard output and standard error.
fn ferry(args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    common::run_ferry(args, &[], stdin)
}

/// The hash `ferry token hash` prints for `token`.
fn hash(token: &str) -> String {
    let (code, out, err) = ferry(&["token", "hash"], &format!("{token}\n"));
    assert_eq!(code, Some(0), "{err}");
    out.trim().to_owned()
}

fn principals() -> String {
    format!(
        r#"
[[principals]]
name = "root"
tokens = ["{}"]
publish = [">"]
subscribe = [">"]
admin = [">"]

[[principals]]
name = "owner"
tokens = ["{}"]
publish = ["orders.>"]
subscribe = ["orders.>"]
admin = ["orders.>"]

[[principals]]
name = "outsider"
tokens = ["{}"]
publish = ["other.>"]
subscribe = ["other.>"]
admin = ["other.>"]

[[principals]]
name = "reader"
tokens = ["{}"]
subscribe = ["orders.*/billing"]

[[principals]]
name = "narrow"
tokens = ["{}"]
subscribe = ["orders.eu/mine"]
admin = ["orders.eu/mine"]
"#,
        hash(ROOT),
        hash(OWNER),
        hash(OUTSIDER),
        hash(READER),
        hash(NARROW)
    )
}

/// A request carrying `authorization` metadata, if given.
fn request<T>(message: T, authorization: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    request
}

/// Every RPC of Ferry's three services, in an order in which each succeeds for a caller with
/// the right (each later one needs what an earlier one made).
#[derive(Debug, Clone, Copy)]
enum Rpc {
    CreateChannel,
    UpdateChannel,
    GetChannel,
    ListChannels,
    CreateSubscription,
    UpdateSubscription,
    GetSubscription,
    ListSubscriptions,
    Publish,
    PublishStream,
    Subscribe,
    Seek,
    CreateDerived,
    ListDerived,
    DeleteDerived,
    Redrive,
    DeleteSubscription,
    DeleteChannel,
    GetBroker,
    DiffConfig,
}

const EVERY_RPC: [Rpc; 20] = [
    Rpc::CreateChannel,
    Rpc::UpdateChannel,
    Rpc::GetChannel,
    Rpc::ListChannels,
    Rpc::CreateSubscription,
    Rpc::UpdateSubscription,
    Rpc::GetSubscription,
    Rpc::ListSubscriptions,
    Rpc::Publish,
    Rpc::PublishStream,
    Rpc::Subscribe,
    Rpc::Seek,
    Rpc::CreateDerived,
    Rpc::ListDerived,
    Rpc::DeleteDerived,
    Rpc::Redrive,
    Rpc::DeleteSubscription,
    Rpc::DeleteChannel,
    Rpc::GetBroker,
    Rpc::DiffConfig,
];

/// Calls `rpc` on `orders.new` (and its subscription `billing`) as `authorization` says.
async fn call(channel: &Channel, rpc: Rpc, authorization: Option<&str>) -> Result<(), Status> {
    let mut admin = AdminClient::new(channel.clone());
    let mut publisher = PublisherClient::new(channel.clone());
    macro_rules! r {
        ($message:expr) => {
            request($message, authorization)
        };
    }
    let name = || "orders.new".to_owned();
    let subscription = || pb::CreateSubscriptionRequest {
        channel: name(),
        name: "billing".into(),
        ..Default::default()
    };
    let batch = || common::batch("orders.new", [b"m".to_vec()]);
    match rpc {
        Rpc::CreateChannel | Rpc::UpdateChannel => {
            let create = pb::CreateChannelRequest {
                name: name(),
                ..Default::default()
            };
            match rpc {
                Rpc::CreateChannel => admin.create_channel(r!(create)).await.map(drop),
                _ => admin.update_channel(r!(create)).await.map(drop),
            }
        }
        Rpc::GetChannel => {
            let get = pb::GetChannelRequest { name: name() };
            admin.get_channel(r!(get)).await.map(drop)
        }
        Rpc::ListChannels => admin.list_channels(r!(Default::default())).await.map(drop),
        Rpc::CreateSubscription => admin
            .create_subscription(r!(subscription()))
            .await
            .map(drop),
        Rpc::UpdateSubscription => admin
            .update_subscription(r!(subscription()))
            .await
            .map(drop),
        Rpc::GetSubscription => {
            let get = pb::GetSubscriptionRequest {
                channel: name(),
                name: "billing".into(),
            };
            admin.get_subscription(r!(get)).await.map(drop)
        }
        Rpc::ListSubscriptions => {
            let list = pb::ListSubscriptionsRequest { channel: name() };
            admin.list_subscriptions(r!(list)).await.map(drop)
        }
        Rpc::Publish => publisher.publish(r!(batch())).await.map(drop),
        Rpc::PublishStream => {
            let stream = tokio_stream::iter([batch()]);
            let mut answers = publisher.publish_stream(r!(stream)).await?.into_inner();
            match answers.message().await? {
                Some(_) => Ok(()),
                None => Err(Status::internal("the stream ended without an answer")),
            }
        }
        Rpc::Subscribe => {
            let attach = pb::SubscribeRequest {
                request: Some(pb::subscribe_request::Request::Attach(pb::Attach {
                    channel: name(),
                    subscription: "billing".into(),
                    ..Default::default()
                })),
            };
            let (sender, requests) = tokio::sync::mpsc::channel(1);
            sender.send(attach).await.unwrap();
            let requests = tokio_stream::wrappers::ReceiverStream::new(requests);
            let mut subscriber = SubscriberClient::new(channel.clone());
            let mut responses = subscriber.subscribe(r!(requests)).await?.into_inner();
            let first = responses.message().await?;
            assert!(matches!(
                first.and_then(|f| f.response),
                Some(pb::subscribe_response::Response::Attached(_))
            ));
            Ok(())
        }
        Rpc::Seek => {
            let seek = pb::SeekRequest {
                channel: name(),
                subscription: "billing".into(),
                to: None,
            };
            admin.seek(r!(seek)).await.map(drop)
        }
        Rpc::CreateDerived => {
            let derived = pb::DerivedChannel {
                source: name(),
                target: "orders.derived".into(),
                ..Default::default()
            };
            admin.create_derived(r!(derived)).await.map(drop)
        }
        Rpc::ListDerived => admin.list_derived(r!(Default::default())).await.map(drop),
        Rpc::DeleteDerived => {
            let delete = pb::DeleteDerivedRequest {
                source: name(),
                target: "orders.derived".into(),
            };
            admin.delete_derived(r!(delete)).await.map(drop)
        }
        Rpc::Redrive => {
            let redrive = pb::RedriveRequest {
                channel: name(),
                ..Default::default()
            };
            admin.redrive(r!(redrive)).await.map(drop)
        }
        Rpc::DeleteSubscription => {
            let delete = pb::DeleteSubscriptionRequest {
                channel: name(),
                name: "billing".into(),
            };
            admin.delete_subscription(r!(delete)).await.map(drop)
        }
        Rpc::DeleteChannel => {
            let delete = pb::DeleteChannelRequest { name: name() };
            admin.delete_channel(r!(delete)).await.map(drop)
        }
        Rpc::GetBroker => admin.get_broker(r!(Default::default())).await.map(drop),
        Rpc::DiffConfig => {
            let diff = pb::DiffConfigRequest {
                toml: "[[channels]]\nname = \"orders.new\"\n".into(),
                source_name: "test".into(),
            };
            admin.diff_config(r!(diff)).await.map(drop)
        }
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn every_call_needs_a_valid_token_and_the_right() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_in(dir.path(), with_config(dir.path(), &principals())).await;
    let channel = daemon.channel().await;
    let bad = bearer("ferry_no_such_token_0123456789abcdef");
    let (owner, outsider, root) = (bearer(OWNER), bearer(OUTSIDER), bearer(ROOT));
    for rpc in EVERY_RPC {
        // No credentials, a malformed header, a token nobody has: refused before anything
        // is looked at, and the message says what to send.
        for (authorization, what) in [
            (None, "credentials"),
            (Some("Basic Zm9vOmJhcg=="), "Bearer <token>"),
            (Some(bad.as_str()), "not valid"),
        ] {
            let status = call(&channel, rpc, authorization).await.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{rpc:?}: {status:?}");
            assert!(status.message().contains(what), "{rpc:?}: {status:?}");
        }
        // A principal without the right: refused, naming the right it lacks. Broker-wide
        // figures and listings (filtered) are open to every principal.
        let answer = call(&channel, rpc, Some(&outsider)).await;
        match rpc {
            Rpc::GetBroker | Rpc::ListChannels | Rpc::ListDerived => {
                assert!(answer.is_ok(), "{rpc:?}: {answer:?}")
            }
            _ => {
                let status = answer.unwrap_err();
                assert_eq!(status.code(), Code::PermissionDenied, "{rpc:?}: {status:?}");
                assert!(
                    status.message().contains("principal \"outsider\" lacks"),
                    "{rpc:?}: {status:?}"
                );
            }
        }
        // A principal with it: done. Planning a whole configuration takes admin on ">".
        let with_right = match rpc {
            Rpc::DiffConfig => {
                let status = call(&channel, rpc, Some(&owner)).await.unwrap_err();
                assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
                assert!(status.message().contains("admin right"), "{status:?}");
                &root
            }
            _ => &owner,
        };
        if let Err(status) = call(&channel, rpc, Some(with_right)).await {
            panic!("{rpc:?} with the right: {status:?}");
        }
        if let Rpc::PublishStream = rpc {
            let mut admin = AdminClient::new(channel.clone());
            let get = pb::GetChannelRequest {
                name: "orders.new".into(),
            };
            let info = admin.get_channel(request(get, Some(&root))).await.unwrap();
            assert_eq!(
                info.into_inner().next_sequence,
                3,
                "only the owner's two messages"
            );
        }
    }
    // The refused calls changed nothing: each of the owner's calls succeeded after them (a
    // refused CreateChannel that took effect would have made the owner's ALREADY_EXISTS, a
    // refused delete its NOT_FOUND, and so on), and the channel's sequence counted only the
    // owner's two messages (checked in the loop).
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        !log.contains(OWNER) && !log.contains(ROOT),
        "a token reached the log"
    );
    assert!(log.contains("call refused: not authenticated"), "{log}");
    daemon.stop().await;
}

#[tokio::test]
async fn rules_reach_what_their_patterns_name_and_listings_show_only_that() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_in(dir.path(), with_config(dir.path(), &principals())).await;
    let root = ferry_client::Client::connect(daemon.url.clone())
        .await
        .unwrap()
        .with_token(ROOT)
        .unwrap();
    for channel in ["orders.eu", "orders.eu.late", "payments"] {
        root.create_channel(channel).await.unwrap();
        for name in ["billing", "audit"] {
            let options = ferry_client::SubscriptionOptions::default();
            root.create_subscription(channel, name, options)
                .await
                .unwrap();
        }
    }
    root.publish("orders.eu", vec![ferry_client::Message::new("one")])
        .await
        .unwrap();

    // "orders.*/billing": the billing subscription of one-word orders channels, nothing else.
    let reader = ferry_client::Client::connect(daemon.url.clone())
        .await
        .unwrap()
        .with_token(READER)
        .unwrap();
    let mut deliveries = reader.subscribe("orders.eu", "billing");
    let delivery = deliveries.next().await.unwrap().unwrap();
    assert_eq!(&delivery.payload[..], b"one");
    delivery.ack().await.unwrap();
    for (channel, name) in [
        ("orders.eu", "audit"),
        ("orders.eu.late", "billing"),
        ("payments", "billing"),
    ] {
        let refused = reader.subscribe(channel, name).next().await.unwrap();
        let error = refused.err().unwrap();
        assert_eq!(
            error.code(),
            Some(ferry_client::Code::PermissionDenied),
            "{channel}/{name}: {error}"
        );
        assert!(error.to_string().contains("subscribe right"), "{error}");
    }
    // A wildcard subscription is reached by a rule that covers its whole pattern.
    for pattern in ["orders.*", "orders.>"] {
        let options = ferry_client::SubscriptionOptions::default();
        root.create_subscription(pattern, "billing", options)
            .await
            .unwrap();
    }
    root.publish("orders.eu", vec![ferry_client::Message::new("two")])
        .await
        .unwrap();
    let mut wildcard = reader.subscribe("orders.*", "billing");
    let delivery = wildcard.next().await.unwrap().unwrap();
    assert_eq!(
        (&delivery.payload[..], delivery.channel.as_str()),
        (&b"two"[..], "orders.eu")
    );
    delivery.ack().await.unwrap();
    let refused = reader
        .subscribe("orders.>", "billing")
        .next()
        .await
        .unwrap();
    assert_eq!(
        refused.err().unwrap().code(),
        Some(ferry_client::Code::PermissionDenied)
    );

    // It may publish nowhere and administer nothing.
    let refused = reader
        .publish("orders.eu", vec![ferry_client::Message::new("x")])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ferry_client::Code::PermissionDenied));
    assert!(refused.to_string().contains("publish right"), "{refused}");

    // Listings: only what some rule of the principal concerns.
    let names = |channels: Vec<ferry_client::ChannelInfo>| {
        let mut names: Vec<String> = channels.into_iter().map(|c| c.name).collect();
        names.sort();
        names
    };
    assert_eq!(names(reader.channels().await.unwrap()), ["orders.eu"]);
    // The wildcard's member on the channel, orders.*/billing, is the reader's; orders.>/billing
    // is not.
    let subscriptions = reader.subscriptions("orders.eu").await.unwrap();
    let mut listed: Vec<&str> = subscriptions.iter().map(|s| s.name.as_str()).collect();
    listed.sort();
    assert_eq!(listed, ["billing", "orders.*/billing"]);
    let owner = ferry_client::Client::connect(daemon.url.clone())
        .await
        .unwrap()
        .with_token(OWNER)
        .unwrap();
    assert_eq!(
        names(owner.channels().await.unwrap()),
        ["orders.eu", "orders.eu.late"]
    );
    assert_eq!(names(root.channels().await.unwrap()).len(), 3);
    let hidden = reader.subscriptions("payments").await.unwrap_err();
    assert_eq!(hidden.code(), Some(ferry_client::Code::PermissionDenied));
    daemon.stop().await;
}

/// Asks the reflection service which services there are.
async fn reflect_on(channel: &Channel, authorization: Option<String>) -> Result<(), Status> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let asked = request(tokio_stream::iter([ask]), authorization.as_deref());
    let mut answers = reflection.server_reflection_info(asked).await?.into_inner();
    answers.message().await.map(drop)
}

#[tokio::test]
async fn health_and_reflection_stay_open_unless_closed() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_in(dir.path(), with_config(dir.path(), &principals())).await;
    let channel = daemon.channel().await;
    let check = |authorization: Option<String>| {
        let channel = channel.clone();
        async move {
            let mut health = HealthClient::new(channel);
            let ask = request(HealthCheckRequest::default(), authorization.as_deref());
            health.check(ask).await.map(drop)
        }
    };
    assert!(check(None).await.is_ok(), "health is open by default");
    let list = pb::ListChannelsRequest {};
    let mut admin = AdminClient::new(channel.clone());
    let status = admin.list_channels(request(list, None)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let (code, _, err) = ferry(&["health", "--server", &daemon.url], "");
    assert_eq!(code, Some(0), "{err}");
    // Reflection answers anyone by default too.
    assert!(reflect_on(&channel, None).await.is_ok());
    daemon.stop().await;

    // Closed: the health check needs a token, which `ferry health` takes.
    let closed = format!(
        "[auth]\nopen_health = false\nopen_reflection = false\n{}",
        principals()
    );
    let daemon = Daemon::start_in(dir.path(), with_config(dir.path(), &closed)).await;
    let channel = daemon.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(request(HealthCheckRequest::default(), None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let ask = request(HealthCheckRequest::default(), Some(&bearer(READER)));
    assert!(health.check(ask).await.is_ok());
    let (code, _, _) = ferry(&["health", "--server", &daemon.url], "");
    assert_eq!(code, Some(1), "refused without a token");
    let (code, _, err) = ferry(&["health", "--server", &daemon.url, "--token", READER], "");
    assert_eq!(code, Some(0), "{err}");
    let channel = daemon.channel().await;
    let refused = reflect_on(&channel, None).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(reflect_on(&channel, Some(bearer(READER))).await.is_ok());
    daemon.stop().await;
}

#[tokio::test]
async fn the_command_line_makes_tokens_and_presents_them() {
    let (code, out, err) = ferry(&["token", "new"], "");
    assert_eq!(code, Some(0), "{err}");
    let field = |name: &str| {
        out.lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_owned())
            .unwrap()
    };
    let (token, stored) = (field("token:"), field("hash:"));
    assert_eq!(
        hash(&token),
        stored,
        "ferry token hash agrees with ferry token new"
    );
    let (code, _, err) = ferry(&["token", "hash"], "short\n");
    assert_eq!(code, Some(2));
    assert!(err.contains("at least 20"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let config =
        format!("[[principals]]\nname = \"ops\"\ntokens = [\"{stored}\"]\nadmin = [\">\"]\n");
    let daemon = Daemon::start_in(dir.path(), with_config(dir.path(), &config)).await;
    let url = daemon.url.clone();
    let (code, out, err) = ferry(
        &[
            "channels", "create", "jobs", "--server", &url, "--token", &token,
        ],
        "",
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) = ferry(&["channels", "list", "--server", &url], "");
    assert_eq!(code, Some(1), "refused without a token");
    assert!(err.contains("UNAUTHENTICATED"), "{err}");
    // The token may come from the environment instead, out of sight of `ps`.
    let args = ["channels", "list", "--server", &url];
    let (code, out, err) = common::run_ferry(&args, &[("FERRY_TOKEN", &token)], "");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("jobs"), "{out}");
    daemon.stop().await;
}

#[tokio::test]
async fn principals_change_on_sighup_and_a_bad_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let options = with_config(dir.path(), &principals());
    let path = options.config.clone().unwrap();
    let daemon = Daemon::start_in(dir.path(), options).await;
    let connect = |token: &'static str| {
        let url = daemon.url.clone();
        async move {
            ferry_client::Client::connect(url)
                .await
                .unwrap()
                .with_token(token)
                .unwrap()
        }
    };
    const LATE: &str = "ferry_late_token_0123456789abcdef";
    let late = connect(LATE).await;
    let refused = late.channels().await.unwrap_err();
    assert_eq!(refused.code(), Some(ferry_client::Code::Unauthenticated));

    // A principal added and one removed, on SIGHUP; the connection that was refused is used
    // again as it is.
    let changed = principals().replace(&hash(OUTSIDER), &hash(LATE));
    std::fs::write(&path, &changed).unwrap();
    common::signal(daemon.pid(), "HUP");
    daemon.wait_for_log("configuration reloaded", 1).await;
    assert!(late.channels().await.is_ok(), "the new token works");
    let outsider = connect(OUTSIDER).await;
    let refused = outsider.channels().await.unwrap_err();
    assert_eq!(refused.code(), Some(ferry_client::Code::Unauthenticated));

    // A bad principals section is refused whole, and the ones in force stay.
    std::fs::write(
        &path,
        format!("{changed}\n[[principals]]\nname = \"broken\"\n"),
    )
    .unwrap();
    common::signal(daemon.pid(), "HUP");
    daemon.wait_for_log("reload refused", 1).await;
    assert!(
        late.channels().await.is_ok(),
        "the principals in force stayed"
    );
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(log.contains("has no way to authenticate"), "{log}");
    daemon.stop().await;
}

/// A client presenting `token`.
async fn client_as(daemon: &Daemon, token: &str) -> ferry_client::Client {
    ferry_client::Client::connect(daemon.url.clone())
        .await
        .unwrap()
        .with_token(token)
        .unwrap()
}

fn denied(error: &ferry_client::Error, right: &str) {
    assert_eq!(
        error.code(),
        Some(ferry_client::Code::PermissionDenied),
        "{error}"
    );
    assert!(error.to_string().contains(right), "{error}");
}

#[tokio::test]
async fn rights_reach_every_channel_a_call_writes_into_or_reads() {
    use ferry_client::{Message, Nack, RedriveSelection, Start, SubscriptionOptions};
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_in(dir.path(), with_config(dir.path(), &principals())).await;
    let root = client_as(&daemon, ROOT).await;
    let owner = client_as(&daemon, OWNER).await;
    for channel in ["orders.eu", "other.dlq"] {
        root.create_channel(channel).await.unwrap();
    }
    // A subscription's dead letters are written to its dead-letter channel: the owner of
    // orders.> may not point them at a channel it has no right on.
    let into = |channel: &str| SubscriptionOptions {
        max_delivery_attempts: 1,
        dead_letter_channel: channel.into(),
        ..SubscriptionOptions::default()
    };
    let refused = owner
        .create_subscription("orders.eu", "billing", into("other.dlq"))
        .await
        .unwrap_err();
    denied(&refused, "publish");
    root.create_subscription("orders.eu", "billing", into("other.dlq"))
        .await
        .unwrap();
    root.create_subscription("orders.eu", "theirs", SubscriptionOptions::default())
        .await
        .unwrap();
    // Changing a subscription: keeping the dead-letter channel an operator set needs no right
    // on it; naming one anew does.
    let mut admin = AdminClient::new(daemon.channel().await);
    let update = |name: &str| pb::CreateSubscriptionRequest {
        channel: "orders.eu".into(),
        name: name.into(),
        max_delivery_attempts: 2,
        dead_letter_channel: "other.dlq".into(),
        ..Default::default()
    };
    let kept = admin
        .update_subscription(request(update("billing"), Some(&bearer(OWNER))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.dead_letter_channel, "other.dlq");
    let refused = admin
        .update_subscription(request(update("theirs"), Some(&bearer(OWNER))))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("publish"), "{refused:?}");
    let unchanged = root.subscription("orders.eu", "theirs").await.unwrap();
    assert!(unchanged.dead_letter_channel.is_empty(), "{unchanged:?}");

    // A dead letter goes back only where the one redriving it has the admin right.
    root.publish("orders.eu", vec![Message::new("declined")])
        .await
        .unwrap();
    let mut deliveries = root.subscribe("orders.eu", "billing");
    let failed = deliveries.next().await.unwrap().unwrap();
    let terminal = Nack {
        terminal: true,
        ..Nack::default()
    };
    failed.nack_with(terminal).await.unwrap();
    drop(deliveries);
    let outsider = client_as(&daemon, OUTSIDER).await;
    let deadline = std::time::Instant::now() + common::PATIENCE;
    while root.channel("other.dlq").await.unwrap().messages == 0 {
        assert!(std::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let skipped = outsider
        .redrive("other.dlq", RedriveSelection::default())
        .await
        .unwrap();
    assert_eq!((skipped.redriven, skipped.skipped), (0, 1));
    assert!(
        skipped.first_skip_reason.contains("may not redrive"),
        "{}",
        skipped.first_skip_reason
    );
    let done = root
        .redrive("other.dlq", RedriveSelection::default())
        .await
        .unwrap();
    assert_eq!(done.redriven, 1);
    // Nor can a publisher forge a dead letter's origin.
    let forged = Message::new("x").attribute("ferry.dead_letter.channel", "orders.eu");
    let refused = outsider
        .publish("other.dlq", vec![forged])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ferry_client::Code::InvalidArgument));
    assert!(
        refused.to_string().contains("only the broker may set"),
        "{refused}"
    );

    // A fork copies another subscription's progress: it takes the right to read that one.
    let narrow = client_as(&daemon, NARROW).await;
    let fork = SubscriptionOptions {
        start: Start::Subscription("theirs".into()),
        ..SubscriptionOptions::default()
    };
    let refused = narrow
        .create_subscription("orders.eu", "mine", fork)
        .await
        .unwrap_err();
    denied(&refused, "subscription \"theirs\"");
    let mine = SubscriptionOptions::default();
    narrow
        .create_subscription("orders.eu", "mine", mine)
        .await
        .unwrap();
    let refused = narrow
        .seek("orders.eu", "mine", Start::Subscription("billing".into()))
        .await
        .unwrap_err();
    denied(&refused, "subscription \"billing\"");
    narrow
        .seek("orders.eu", "mine", Start::Earliest)
        .await
        .unwrap();

    // A channel's figures show only the subscriptions the caller may read.
    let shown = narrow.channel("orders.eu").await.unwrap();
    let names: Vec<&str> = shown
        .subscriptions
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["mine"]);
    let listed = narrow.channels().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].subscriptions.len(), 1);
    assert_eq!(
        root.channel("orders.eu").await.unwrap().subscriptions.len(),
        3
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_reload_that_withdraws_a_right_ends_the_streams_that_relied_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let options = with_config(dir.path(), &principals());
    let path = options.config.clone().unwrap();
    let daemon = Daemon::start_in(dir.path(), options).await;
    let root = client_as(&daemon, ROOT).await;
    root.create_channel("orders.eu").await.unwrap();
    let options = ferry_client::SubscriptionOptions::default();
    root.create_subscription("orders.eu", "billing", options)
        .await
        .unwrap();

    // A consumer as the reader, and a publish stream as the owner, both open.
    let channel = daemon.channel().await;
    let mut consumer = SubscriberClient::new(channel.clone());
    let (requests, inbound) = tokio::sync::mpsc::channel(4);
    let attach = pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Attach(pb::Attach {
            channel: "orders.eu".into(),
            subscription: "billing".into(),
            ..Default::default()
        })),
    };
    requests.send(attach.clone()).await.unwrap();
    let inbound = tokio_stream::wrappers::ReceiverStream::new(inbound);
    let reading = request(inbound, Some(&bearer(READER)));
    let mut deliveries = consumer.subscribe(reading).await.unwrap().into_inner();
    assert!(deliveries.message().await.unwrap().is_some(), "attached");
    // A second stream whose headers come before the reload and its attach after it.
    let (late_requests, late_inbound) = tokio::sync::mpsc::channel(4);
    let late_inbound = tokio_stream::wrappers::ReceiverStream::new(late_inbound);
    let late = request(late_inbound, Some(&bearer(READER)));
    let mut late_consumer = SubscriberClient::new(channel.clone());
    let late_call = tokio::spawn(async move { late_consumer.subscribe(late).await });
    let mut publisher = PublisherClient::new(channel.clone());
    let (batches, outbound) = tokio::sync::mpsc::channel(4);
    batches
        .send(common::batch("orders.eu", [b"one".to_vec()]))
        .await
        .unwrap();
    let outbound = tokio_stream::wrappers::ReceiverStream::new(outbound);
    let publishing = request(outbound, Some(&bearer(OWNER)));
    let mut confirmations = publisher
        .publish_stream(publishing)
        .await
        .unwrap()
        .into_inner();
    assert!(
        confirmations.message().await.unwrap().is_some(),
        "published"
    );

    // The reader loses its right, the owner's token is removed: both streams end.
    let changed = principals()
        .replace(
            "subscribe = [\"orders.*/billing\"]",
            "subscribe = [\"orders.*/audit\"]",
        )
        .replace(&hash(OWNER), &hash("ferry_rotated_token_0123456789abcdef"));
    std::fs::write(&path, changed).unwrap();
    common::signal(daemon.pid(), "HUP");
    daemon.wait_for_log("configuration reloaded", 1).await;
    let ended = loop {
        match tokio::time::timeout(common::PATIENCE, deliveries.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(outcome) => break outcome,
            Err(_) => panic!("the consumer's stream went on after its right was withdrawn"),
        }
    };
    let status = ended.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    late_requests.send(attach).await.unwrap();
    let refused = late_call.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    batches
        .send(common::batch("orders.eu", [b"two".to_vec()]))
        .await
        .unwrap();
    let status = confirmations.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("reloaded"), "{status:?}");
    daemon.stop().await;
}
