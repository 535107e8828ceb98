//! The integration-test harness: starts the real `ferry` binary on an ephemeral loopback port
//! with a temporary data directory, and offers small gRPC helpers on top of the generated
//! clients. Every wait is bounded, so a broken broker fails a test instead of hanging it.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use ferry_proto::pb::{
    self, admin_client::AdminClient, publisher_client::PublisherClient,
    subscribe_request::Request as Req, subscribe_response::Response as Resp,
    subscriber_client::SubscriberClient,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// How long any single expected event may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A running `ferry serve` child process.
pub struct Daemon {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The data directory it runs on.
    pub data_dir: PathBuf,
    /// Where its log goes.
    pub log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// Extra arguments for a daemon.
#[derive(Default, Clone)]
pub struct Options {
    /// `--config FILE`
    pub config: Option<PathBuf>,
    /// `--data-dir` (default: `DIR/data`).
    pub data_dir: Option<PathBuf>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// `--listen` (default: `127.0.0.1:0`, a free port).
    pub listen: Option<String>,
}

impl Daemon {
    /// Starts a daemon on a fresh data directory.
    pub async fn start() -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut daemon = Daemon::start_in(dir.path(), Options::default()).await;
        daemon._dir = Some(dir);
        daemon
    }

    /// Starts a daemon on `dir` (its data in `dir/data`, its log in `dir/ferry.log`).
    pub async fn start_in(dir: &Path, options: Options) -> Daemon {
        match Daemon::try_start_in(dir, options).await {
            Ok(daemon) => daemon,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like `start_in`, but returns the exit status and log if the daemon does not come up.
    pub async fn try_start_in(dir: &Path, options: Options) -> Result<Daemon, String> {
        let data_dir = options.data_dir.clone().unwrap_or_else(|| dir.join("data"));
        let log = dir.join("ferry.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
        command
            .arg("serve")
            .arg("--listen")
            .arg(options.listen.as_deref().unwrap_or("127.0.0.1:0"))
            .arg("--data-dir")
            .arg(&data_dir);
        if let Some(config) = &options.config {
            command.arg("--config").arg(config);
        }
        // The options' environment comes last, so that it may set RUST_LOG too.
        command.env("RUST_LOG", "ferry=info,warn");
        command.envs(options.env.iter().map(|(k, v)| (k, v)));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn ferry");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(PATIENCE, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(address) = line.strip_prefix("ferry listening on ") {
                    return Some(address.to_owned());
                }
            }
            None
        })
        .await;
        match ready {
            Ok(Some(address)) => {
                // Keep draining stdout so the child never blocks on a full pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                Ok(Daemon {
                    child,
                    url: format!("http://{address}"),
                    data_dir,
                    log,
                    _dir: None,
                })
            }
            _ => {
                let status = tokio::time::timeout(PATIENCE, child.wait()).await;
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                Err(format!(
                    "ferry did not come up (exit: {status:?}); its log:\n{log}"
                ))
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Sends SIGTERM and waits for a clean exit (status 0).
    pub async fn stop(mut self) {
        signal(self.pid(), "TERM");
        let waited = tokio::time::timeout(PATIENCE, self.child.wait()).await;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let Ok(status) = waited else {
            // Its threads' stacks say where it hangs; then it goes.
            let stacks = std::process::Command::new("gdb")
                .args([
                    "-p",
                    &self.pid().to_string(),
                    "-batch",
                    "-ex",
                    "thread apply all bt 8",
                ])
                .output()
                .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                .unwrap_or_default();
            signal(self.pid(), "KILL");
            panic!("ferry did not exit within the patience after SIGTERM; log:\n{log}\n{stacks}");
        };
        let status = status.expect("wait");
        assert!(
            status.success(),
            "ferry exited with {status} after SIGTERM; log:\n{log}"
        );
    }

    /// Kills the process with SIGKILL: no chance to flush anything.
    pub async fn kill(mut self) {
        signal(self.pid(), "KILL");
        let _ = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("ferry dies after SIGKILL");
    }

    /// Waits until the daemon's log holds `needle` at least `count` times.
    pub async fn wait_for_log(&self, needle: &str, count: usize) {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.matches(needle).count() >= count {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the log never said {needle:?} {count} time(s):\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A connected channel.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .expect("url")
            .connect()
            .await
            .expect("connect to ferry")
    }

    /// A publisher client.
    pub async fn publisher(&self) -> PublisherClient<Channel> {
        PublisherClient::new(self.channel().await)
    }

    /// An admin client.
    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }

    /// Creates a channel with subscriptions (ack deadline in ms).
    pub async fn create(&self, channel: &str, subscriptions: &[(&str, u64)]) {
        let mut admin = self.admin().await;
        admin
            .create_channel(pb::CreateChannelRequest {
                name: channel.into(),
                ..Default::default()
            })
            .await
            .expect("create channel");
        for (name, deadline_ms) in subscriptions {
            admin
                .create_subscription(pb::CreateSubscriptionRequest {
                    channel: channel.into(),
                    name: (*name).into(),
                    ack_deadline: Some(prost_types::Duration {
                        seconds: (*deadline_ms / 1000) as i64,
                        nanos: ((*deadline_ms % 1000) * 1_000_000) as i32,
                    }),
                    ..Default::default()
                })
                .await
                .expect("create subscription");
        }
    }

    /// Publishes payloads as one batch; returns their sequences.
    pub async fn publish(
        &self,
        channel: &str,
        payloads: impl IntoIterator<Item = Vec<u8>>,
    ) -> Vec<u64> {
        let request = batch(channel, payloads);
        self.publisher()
            .await
            .publish(request)
            .await
            .expect("publish")
            .into_inner()
            .sequences
    }

    /// Sends all `requests` on one PublishStream (pipelined: none waits for a confirmation) and
    /// closes its request side; returns the confirmations.
    pub async fn publish_stream(
        &self,
        requests: Vec<pb::PublishRequest>,
    ) -> Streaming<pb::PublishResponse> {
        let stream = tokio_stream::iter(requests);
        self.publisher()
            .await
            .publish_stream(stream)
            .await
            .expect("publish stream")
            .into_inner()
    }

    /// The figures of one subscription.
    pub async fn subscription(&self, channel: &str, name: &str) -> pb::SubscriptionInfo {
        let request = pb::GetSubscriptionRequest {
            channel: channel.into(),
            name: name.into(),
        };
        self.admin()
            .await
            .get_subscription(request)
            .await
            .expect("get subscription")
            .into_inner()
    }
}

/// Writes `toml` as `dir/ferry.toml`; returns options that start a daemon on it.
/// Runs the `ferry` binary as a command-line client: `stdin` written to it, `env` set (and
/// FERRY_TOKEN only if given there); its exit code, standard output and standard error.
pub fn run_ferry(
    args: &[&str],
    env: &[(&str, &str)],
    stdin: &str,
) -> (Option<i32>, String, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env_remove("FERRY_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    let output = child.wait_with_output().unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

pub fn with_config(dir: &Path, toml: &str) -> Options {
    let config = dir.join("ferry.toml");
    std::fs::write(&config, toml).expect("write the config");
    Options {
        config: Some(config),
        ..Options::default()
    }
}

/// The segment files of a data directory (not those in quarantine), oldest first.
pub fn segment_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir.join("segments"))
        .map(|dir| dir.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "seg"));
    files.sort();
    files
}

/// Sends a signal with the system's `kill` (the tests use no FFI).
pub fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "kill -{name} {pid} failed"
    );
}

/// A publish request of one message per payload.
pub fn batch(channel: &str, payloads: impl IntoIterator<Item = Vec<u8>>) -> pb::PublishRequest {
    pb::PublishRequest {
        channel: channel.into(),
        messages: payloads.into_iter().map(|p| message(p, &[], "")).collect(),
    }
}

/// Connects to a daemon's URL; None when nothing listens there (any more).
pub async fn connect(url: &str) -> Option<Channel> {
    Channel::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .ok()
}

/// An outgoing message.
pub fn message(payload: Vec<u8>, attributes: &[(&str, &str)], key: &str) -> pb::OutgoingMessage {
    pb::OutgoingMessage {
        payload: Bytes::from(payload),
        attributes: attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        key: key.into(),
        ..Default::default()
    }
}

/// One consumer on a Subscribe stream, buffering what arrives until the test asks for it.
pub struct Consumer {
    requests: mpsc::Sender<pb::SubscribeRequest>,
    responses: Streaming<pb::SubscribeResponse>,
    deliveries: VecDeque<pb::Delivery>,
    results: VecDeque<pb::AckResults>,
    /// The broker's answer to the attach.
    pub attached: pb::Attached,
    /// How the stream ended, once it has.
    pub ended: Option<Status>,
}

impl Consumer {
    /// Attaches with a window of `max_messages` (0 = default).
    pub async fn attach(
        daemon: &Daemon,
        channel: &str,
        subscription: &str,
        max_messages: u32,
    ) -> Consumer {
        Consumer::try_attach(
            daemon,
            channel,
            subscription,
            pb::FlowControl {
                max_messages,
                max_bytes: 0,
            },
        )
        .await
        .expect("attach")
    }

    /// Attaches with a full window; returns the status if the broker refuses.
    pub async fn try_attach(
        daemon: &Daemon,
        channel: &str,
        subscription: &str,
        window: pb::FlowControl,
    ) -> Result<Consumer, Status> {
        let attach = Req::Attach(pb::Attach {
            channel: channel.into(),
            subscription: subscription.into(),
            window: Some(window),
        });
        let (requests, responses) = Consumer::open(daemon, attach).await?;
        let mut consumer = Consumer {
            requests,
            responses,
            deliveries: VecDeque::new(),
            results: VecDeque::new(),
            attached: pb::Attached::default(),
            ended: None,
        };
        match consumer.next().await {
            Some(Resp::Attached(attached)) => consumer.attached = attached,
            other => panic!(
                "expected Attached first, got {other:?} / {:?}",
                consumer.ended
            ),
        }
        Ok(consumer)
    }

    /// Opens a Subscribe stream whose first request is `first`.
    pub async fn open(
        daemon: &Daemon,
        first: Req,
    ) -> Result<
        (
            mpsc::Sender<pb::SubscribeRequest>,
            Streaming<pb::SubscribeResponse>,
        ),
        Status,
    > {
        let (requests, rx) = mpsc::channel(64);
        requests
            .send(pb::SubscribeRequest {
                request: Some(first),
            })
            .await
            .expect("queue first request");
        let mut client = SubscriberClient::new(daemon.channel().await);
        let responses = client
            .subscribe(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok((requests, responses))
    }

    /// The next response, or None when the stream ended (see `ended`) or nothing came in time.
    async fn next(&mut self) -> Option<Resp> {
        self.next_within(PATIENCE).await
    }

    async fn next_within(&mut self, wait: Duration) -> Option<Resp> {
        if self.ended.is_some() {
            return None;
        }
        match tokio::time::timeout(wait, self.responses.message()).await {
            Err(_) => None,
            Ok(Ok(Some(response))) => response.response,
            Ok(Ok(None)) => {
                self.ended = Some(Status::ok("stream ended"));
                None
            }
            Ok(Err(status)) => {
                self.ended = Some(status);
                None
            }
        }
    }

    /// Reads one response into the buffers; false if nothing came within `wait`.
    async fn pump(&mut self, wait: Duration) -> bool {
        match self.next_within(wait).await {
            Some(Resp::Deliveries(batch)) => self.deliveries.extend(batch.deliveries),
            Some(Resp::Results(results)) => self.results.push_back(results),
            Some(Resp::Attached(_)) => panic!("a second Attached"),
            None => return false,
        }
        true
    }

    /// Exactly the next `n` deliveries (fails the test if they do not come in time).
    pub async fn take(&mut self, n: usize) -> Vec<pb::Delivery> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.deliveries.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !self.pump(left).await {
                panic!(
                    "expected {n} deliveries, got {} (stream end: {:?})",
                    self.deliveries.len(),
                    self.ended
                );
            }
        }
        self.deliveries.drain(..n).collect()
    }

    /// Whatever deliveries arrive within `wait`.
    pub async fn take_for(&mut self, wait: Duration) -> Vec<pb::Delivery> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || !self.pump(left).await {
                break;
            }
        }
        self.deliveries.drain(..).collect()
    }

    /// Sends a request without waiting for an answer.
    pub async fn send(&mut self, request: Req) {
        self.requests
            .send(pb::SubscribeRequest {
                request: Some(request),
            })
            .await
            .expect("stream open");
    }

    /// Acks and waits for the (durable) results, in order of the ids given.
    pub async fn ack(&mut self, ack_ids: Vec<String>) -> Vec<pb::AckStatus> {
        self.send(Req::Ack(pb::AckIds { ack_ids })).await;
        self.results_of(pb::AckOperation::Ack).await
    }

    /// Nacks and waits for the results.
    pub async fn nack(&mut self, ack_ids: Vec<String>) -> Vec<pb::AckStatus> {
        self.nack_with(pb::Nack {
            ack_ids,
            ..Default::default()
        })
        .await
    }

    /// Sends a nack with its options and waits for the results.
    pub async fn nack_with(&mut self, nack: pb::Nack) -> Vec<pb::AckStatus> {
        self.send(Req::Nack(nack)).await;
        self.results_of(pb::AckOperation::Nack).await
    }

    /// Extends deadlines and waits for the results.
    pub async fn extend(&mut self, ack_ids: Vec<String>, extension_ms: u32) -> Vec<pb::AckStatus> {
        self.send(Req::Extend(pb::ExtendDeadline {
            ack_ids,
            extension_ms,
        }))
        .await;
        self.results_of(pb::AckOperation::Extend).await
    }

    /// Acks and waits for a result for every id, however many result events carry them (a
    /// wildcard subscription answers once per channel); by ack id.
    pub async fn ack_each(&mut self, ack_ids: Vec<String>) -> HashMap<String, pb::AckStatus> {
        let mut wanted: std::collections::HashSet<String> = ack_ids.iter().cloned().collect();
        self.send(Req::Ack(pb::AckIds { ack_ids })).await;
        let mut got = HashMap::new();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !wanted.is_empty() {
            while let Some(results) = self.results.pop_front() {
                for result in results.results {
                    if wanted.remove(&result.ack_id) {
                        got.insert(result.ack_id.clone(), result.status());
                    }
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !wanted.is_empty() && !self.pump(left).await {
                panic!("no result for {wanted:?} (stream end: {:?})", self.ended);
            }
        }
        got
    }

    async fn results_of(&mut self, operation: pb::AckOperation) -> Vec<pb::AckStatus> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(i) = self.results.iter().position(|r| r.operation() == operation) {
                let results = self.results.remove(i).expect("found");
                return results.results.iter().map(|r| r.status()).collect();
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !self.pump(left).await {
                panic!("no {operation:?} results (stream end: {:?})", self.ended);
            }
        }
    }

    /// Waits for the stream to end and returns its final status.
    pub async fn closed(&mut self) -> Status {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.ended.is_none() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                panic!("the stream did not end");
            }
            self.pump(left).await;
        }
        self.ended.clone().expect("ended")
    }
}

/// The sequences of deliveries.
pub fn sequences(deliveries: &[pb::Delivery]) -> Vec<u64> {
    deliveries
        .iter()
        .map(|d| d.message.as_ref().expect("message").sequence)
        .collect()
}

/// The ack ids of deliveries.
pub fn ack_ids(deliveries: &[pb::Delivery]) -> Vec<String> {
    deliveries.iter().map(|d| d.ack_id.clone()).collect()
}

/// A small deterministic random source (xorshift), seeded and printed by the tests that use it.
pub struct Rng(u64);

impl Rng {
    /// Seeds from the clock unless FERRY_TEST_SEED is set; prints the seed.
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("FERRY_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        println!("{test}: seed {seed} (set FERRY_TEST_SEED to repeat)");
        Rng(seed | 1)
    }

    /// A source with this seed (for a task of a test that printed its own seed).
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// A number in `range`.
    pub fn range(&mut self, range: std::ops::Range<u64>) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        range.start + self.0 % (range.end - range.start)
    }
}

/// Counts per key, for the fan-out checks.
pub fn counts<K: std::hash::Hash + Eq>(items: impl IntoIterator<Item = K>) -> HashMap<K, usize> {
    let mut map = HashMap::new();
    for item in items {
        *map.entry(item).or_default() += 1;
    }
    map
}
