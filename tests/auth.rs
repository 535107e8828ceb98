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
"#,
        hash(ROOT),
        hash(OWNER),
        hash(OUTSIDER),
        hash(READER)
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
    }
    // The refused calls changed nothing: the owner's creations all succeeded (they would
    // have found ALREADY_EXISTS), and only the owner's two messages were published.
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
    let subscriptions = reader.subscriptions("orders.eu").await.unwrap();
    let listed: Vec<&str> = subscriptions.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(listed, ["billing"]);
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
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            channel.clone(),
        );
    let ask = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let answers = reflection
        .server_reflection_info(tokio_stream::iter([ask]))
        .await;
    assert!(answers.is_ok(), "{answers:?}");
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
