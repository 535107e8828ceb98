//! `ferry bench`: the load generator. It measures a broker through the public gRPC API only,
//! exactly as any other client would see it, and prints figures on standard output.
//!
//! This module owns the command line, the run as a whole (which scenarios, in which order, the
//! disk's own figures around them) and what every scenario shares ([`Bench`]). The rest, by
//! concern: [`broker`] starts a private broker (or checks that an existing one is on loopback),
//! [`scenarios`] holds publish, consume, mixed and latency, built from the publisher and
//! consumer loops of [`load`] and printed through [`report`]; [`backlog`] is the big backlog
//! kept across a restart, [`memory`] the broker against its memory budget, and [`commits`] the
//! disk's `fdatasync` and what each group commit cost.

mod backlog;
mod broker;
mod commits;
mod load;
mod memory;
mod report;
mod scenarios;

use broker::*;
use load::*;
use report::*;
use scenarios::*;

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use clap::ValueEnum;
use ferry_proto::pb::{
    self, publisher_client::PublisherClient, subscribe_request::Request as SubscribeReq,
    subscribe_response::Response as SubscribeResp, subscriber_client::SubscriberClient,
};
use ferry_server::Config;
use ferry_server::config::{FsyncSetting, LimitsConfig};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::{self, Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Status, Streaming};

/// Message sizes of the publish and consume scenarios, largest first.
const SIZES: [usize; 2] = [1024, 128];
/// Concurrent publishers of the publish scenario.
const PUBLISHERS: [u32; 3] = [1, 4, 16];
/// The size used by the mixed and latency scenarios.
const KIB: usize = 1024;
/// Filling a backlog is preparation, not measurement, so it uses big pipelined batches.
const FILL_BATCH: u32 = 100;
const FILL_IN_FLIGHT: u32 = 16 * FILL_BATCH;
/// The latency consumer's window: large enough that flow control never holds back a delivery.
const LATENCY_WINDOW: u32 = 1000;
/// The latency publisher's pacing step: fine enough to look like a steady stream.
const PACING_TICK: Duration = Duration::from_millis(1);
/// The send time stamped at the start of each latency payload (u64 little-endian nanoseconds).
const STAMP_BYTES: usize = 8;
/// Every bench channel gets one subscription of this name.
const SUBSCRIPTION: &str = "bench";
/// Requests queued between a loop and its gRPC stream; the in-flight limit bounds the rest.
const REQUEST_QUEUE: usize = 64;
/// The line `ferry serve` prints once it accepts connections.
const READY_PREFIX: &str = "ferry listening on ";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long confirmations and acks may still arrive after a scenario's time limit before the
/// broker is declared stuck: the limit stops sending, not the wait for what was already sent.
const CONFIRM_GRACE: Duration = Duration::from_secs(10);
/// How long the latency consumer may lag behind the end of publishing.
const LATENCY_DRAIN_GRACE: Duration = Duration::from_secs(5);
/// How long the backlog scenario waits after its drain before reading what is left: the broker
/// deletes acked messages in the background, once their acks are durable.
const DELETION_SETTLE: Duration = Duration::from_secs(2);

/// Options of `ferry bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Measure the broker already listening at this URL (e.g. http://127.0.0.1:50051) instead of
    /// starting a private one. Only loopback addresses are accepted; the broker's memory is then
    /// not reported.
    #[arg(long, value_name = "URL")]
    addr: Option<String>,
    /// Start the private broker with this configuration file, e.g. to compare fsync modes.
    #[arg(short, long, value_name = "FILE", conflicts_with = "addr")]
    config: Option<PathBuf>,
    /// Messages per scenario; each scenario also stops at --max-seconds. (The latency scenario
    /// sends --rate × --latency-seconds instead.)
    #[arg(long, value_name = "N", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    messages: u64,
    /// Time limit of each scenario, in seconds: it stops sending then and reports what was done.
    #[arg(long, value_name = "S", default_value = "20", value_parser = parse_seconds)]
    max_seconds: Duration,
    /// Messages each publisher may have sent and not yet had confirmed.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    in_flight: u32,
    /// Messages per publish request. With 1 the figures compare with other brokers' per-message
    /// publishing; larger batches show what the broker does with batching clients.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// The consumers' flow-control window, in messages (the latency consumer always uses 1000).
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    window: u32,
    /// Publish rate of the latency scenario, in messages per second.
    #[arg(long, value_name = "MSGS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    rate: u64,
    /// How long the latency scenario publishes, in seconds.
    #[arg(long, value_name = "S", default_value = "10", value_parser = parse_seconds)]
    latency_seconds: Duration,
    /// Run only these scenarios, comma-separated (default: all but backlog, which is heavy and
    /// runs only when named here). The broker's memory is reported whenever the bench started the
    /// broker.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "SCENARIOS")]
    only: Vec<Scenario>,
    /// Messages the backlog scenario stores before restarting the broker and draining them.
    #[arg(long, value_name = "N", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    backlog: u64,
    /// Payload size of the backlog scenario's messages, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = KIB,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    backlog_size: usize,
    /// Time limit of each phase of the backlog scenario (filling, draining), in seconds. It is
    /// separate from --max-seconds because a backlog worth measuring takes minutes to build.
    #[arg(long, value_name = "S", default_value = "600", value_parser = parse_seconds)]
    backlog_seconds: Duration,
    /// Give every scenario's subscription a retry policy (1 s backoff, 5 attempts) and a
    /// dead-letter channel: what the error flows cost when nothing fails.
    #[arg(long)]
    retry_policy: bool,
    /// Give the messages ordering keys, N of them in turn (0: none). A key has one unacked
    /// delivery at a time, so a consumer's window can hold at most N keyed messages.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keys: u32,
    /// Give every published message a unique id, which the channel de-duplicates on (its
    /// window is 2 minutes by default): what exactly-once publishing costs.
    #[arg(long)]
    ids: bool,
    /// In the backlog scenario, keep the backlog after the drain (retention) and replay it from
    /// the earliest message with a new subscription: the time machine's throughput.
    #[arg(long)]
    replay: bool,
    /// Give the consume scenario's subscription a filter that keeps one message in ten
    /// (`attributes.n = "0"`; the messages carry n = 0 to 9 in turn): the cost of filtering.
    #[arg(long)]
    filter: bool,
    /// Attach a derived channel to each scenario's channel (no filter: every message is
    /// appended to CHANNEL.derived as well): what deriving costs.
    #[arg(long)]
    derived: bool,
    /// In the backlog scenario, publish every message delayed by this many seconds: the drain
    /// then measures delayed messages entering their channel as they come due.
    #[arg(long, value_name = "S")]
    delay: Option<u64>,
    /// Drain the consume scenario's backlog through a wildcard subscription (on the pattern
    /// that replaces the channel's last word with `*`, from the earliest message) instead of
    /// the channel's own: what the shared window and the routing of acks cost.
    #[arg(long)]
    wildcard: bool,
}

/// The scenarios `--only` can pick; they always run in this order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Scenario {
    /// Publish throughput: 1 KiB and 128 B messages, 1, 4 and 16 publishers.
    Publish,
    /// Draining a backlog with one acking consumer.
    Consume,
    /// One publisher and one acking consumer at once.
    Mixed,
    /// End-to-end latency at a fixed publish rate.
    Latency,
    /// A big backlog on disk: its footprint, a broker restart on it, draining it from disk.
    /// Last but one, because it restarts the broker; not in the default set, because it is heavy.
    Backlog,
    /// Peak memory against the configured budget: a consumer that never reads, many channels
    /// nobody reads, messages with thousands of attributes. It restarts the broker so that the
    /// peak is its own; not in the default set.
    Memory,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Publish => "publish",
            Scenario::Consume => "consume",
            Scenario::Mixed => "mixed",
            Scenario::Latency => "latency",
            Scenario::Backlog => "backlog",
            Scenario::Memory => "memory",
        }
    }
}

/// Runs the benchmark and prints its report; the exit code says whether every scenario ran.
pub fn run(args: BenchArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ferry bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(seconds > 0.0 && seconds <= 86_400.0) {
        return Err(format!(
            "{text} is out of range: give more than 0 and at most 86400"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Why a bench run stopped, worded for the user.
#[derive(Debug)]
struct BenchError(String);

impl BenchError {
    /// `what` failed because of `cause`; the cause's sources are kept because the useful part of
    /// a transport error ("Connection refused") is usually several levels down.
    fn caused(what: impl fmt::Display, cause: &dyn StdError) -> Self {
        Self(format!("{what}: {cause}{}", sources(cause.source())))
    }

    /// `what` failed with a gRPC status. `Status`'s own `Display` dumps metadata and details;
    /// the message and code are what a user can act on.
    fn status(what: impl fmt::Display, status: &Status) -> Self {
        Self(format!(
            "{what}: {} ({:?}){}",
            status.message(),
            status.code(),
            sources(status.source())
        ))
    }

    fn join(e: JoinError) -> Self {
        Self(format!("a bench task failed: {e}"))
    }
}

fn sources(mut source: Option<&(dyn StdError + 'static)>) -> String {
    let mut text = String::new();
    let mut previous = String::new();
    while let Some(cause) = source {
        // Wrappers often repeat their cause's text; once is enough.
        let line = cause.to_string();
        if line != previous {
            text.push_str(": ");
            text.push_str(&line);
        }
        previous = line;
        source = cause.source();
    }
    text
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for BenchError {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for BenchError {
    fn from(message: &str) -> Self {
        Self(message.to_owned())
    }
}

type Result<T, E = BenchError> = std::result::Result<T, E>;

/// The whole run: header, broker, scenarios, memory, broker shutdown.
async fn bench(args: BenchArgs) -> Result<()> {
    let scenarios = selected(&args.only);
    let external = args.addr.as_deref().map(loopback_url).transpose()?;
    // The private broker's configuration is known, so bad settings are caught before it starts.
    let config = match (&external, &args.config) {
        (Some(_), _) => None,
        (None, Some(path)) => {
            Some(Config::load(path).map_err(|e| format!("bad broker configuration: {e}"))?)
        }
        (None, None) => Some(Config::builtin()),
    };
    if let Some(config) = &config {
        let limit = config.limits.max_batch_messages;
        if args.batch as usize > limit {
            return Err(format!(
                "--batch {} is more than the broker's max_batch_messages ({limit})",
                args.batch
            )
            .into());
        }
        let limit = config.limits.max_message_bytes.0;
        if scenarios.contains(&Scenario::Backlog) && args.backlog_size as u64 > limit {
            return Err(format!(
                "--backlog-size {} is more than the broker's max_message_bytes ({limit})",
                args.backlog_size
            )
            .into());
        }
    }
    print_header(&args, config.as_ref(), &scenarios);

    let (mut broker, url) = match external {
        Some(url) => {
            println!("  broker    : {url} (already running)");
            (None, url)
        }
        None => {
            let broker = BrokerChild::start(args.config.as_deref()).await?;
            println!(
                "  broker    : started, pid {}, listening on {}",
                broker.process.pid, broker.process.address
            );
            let url = format!("http://{}", broker.process.address);
            (Some(broker), url)
        }
    };

    // Ctrl-C still goes through the orderly stop below, so the temporary directory is removed.
    let outcome = tokio::select! {
        outcome = run_scenarios(&args, &scenarios, &url, config.as_ref(), broker.as_mut()) => {
            outcome
        }
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    };
    // Read before stopping: the figures vanish with the process.
    let memory = broker
        .as_ref()
        .map(|broker| (broker.memory(), broker.restarted));
    let stopped = match broker {
        Some(broker) => broker.stop().await,
        None => Ok(()),
    };
    outcome?;
    if let Some((memory, restarted)) = memory {
        print_memory(memory, restarted);
    }
    stopped
}

/// The scenarios to run: each once and in the fixed order, however `--only` listed them.
fn selected(only: &[Scenario]) -> Vec<Scenario> {
    let mut scenarios = if only.is_empty() {
        let mut all = Scenario::value_variants().to_vec();
        all.retain(|&s| s != Scenario::Backlog && s != Scenario::Memory);
        all
    } else {
        only.to_vec()
    };
    scenarios.sort();
    scenarios.dedup();
    scenarios
}

fn print_header(args: &BenchArgs, config: Option<&Config>, scenarios: &[Scenario]) {
    let fsync = match (config, &args.config) {
        (None, _) => "unknown (broker not started by the bench)".to_owned(),
        (Some(_), None) => "always (default)".to_owned(),
        (Some(config), Some(path)) => {
            let mode = match config.storage.fsync {
                FsyncSetting::Always => "always".to_owned(),
                FsyncSetting::Interval => {
                    format!("interval, every {:?}", config.storage.fsync_interval.0)
                }
                FsyncSetting::Never => "never".to_owned(),
            };
            format!("{mode} (from {})", path.display())
        }
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "unknown".to_owned());
    let names: Vec<&str> = scenarios.iter().map(|s| s.name()).collect();
    println!("ferry bench");
    println!("  fsync     : {fsync}");
    println!("  cpus      : {cpus}");
    println!(
        "  options   : --messages {} --max-seconds {} --in-flight {} --batch {} --window {} \
         --rate {} --latency-seconds {}",
        args.messages,
        args.max_seconds.as_secs_f64(),
        args.in_flight,
        args.batch,
        args.window,
        args.rate,
        args.latency_seconds.as_secs_f64(),
    );
    if scenarios.contains(&Scenario::Backlog) {
        println!(
            "  backlog   : --backlog {} --backlog-size {} --backlog-seconds {}",
            args.backlog,
            args.backlog_size,
            args.backlog_seconds.as_secs_f64()
        );
    }
    println!("  scenarios : {}", names.join(", "));
}

/// What every scenario needs: where the broker is, the options, and a tag that keeps this run's
/// channel names apart from earlier runs' on a broker that is not the bench's own.
struct Bench<'a> {
    args: &'a BenchArgs,
    endpoint: Endpoint,
    /// For administration: the scenarios' channels and subscriptions, the broker's figures.
    client: ferry_client::Client,
    tag: String,
    /// The broker's publishing limits, when the bench knows its configuration.
    limits: Option<&'a LimitsConfig>,
    /// The broker's configuration, when the bench knows it.
    config: Option<&'a Config>,
    /// Where the broker serves its metrics, when it is the bench's own.
    metrics: Option<std::net::SocketAddr>,
}

impl Bench<'_> {
    /// A new connection. Each publisher and consumer gets its own, as separate client processes
    /// would, so that one HTTP/2 connection is not what is being measured.
    async fn connect(&self) -> Result<Channel> {
        self.endpoint.connect().await.map_err(|e| {
            BenchError::caused(format!("cannot connect to {}", self.endpoint.uri()), &e)
        })
    }

    /// Creates the channel `bench.TAG.WHAT` with one subscription.
    async fn fresh_channel(&self, what: &str) -> Result<String> {
        self.fresh_channel_with(what, None).await
    }

    /// Like `fresh_channel`, with the subscription's ack deadline (None: the broker's default).
    async fn fresh_channel_with(
        &self,
        what: &str,
        ack_deadline: Option<Duration>,
    ) -> Result<String> {
        let name = format!("bench.{}.{what}", self.tag);
        let client = &self.client;
        let dead = format!("{name}.dead");
        for channel in [&name, &dead] {
            if *channel == dead && !self.args.retry_policy {
                break;
            }
            (client.create_channel(channel).await)
                .map_err(|e| BenchError::caused(format!("cannot create channel {channel}"), &e))?;
        }
        let policy = self.args.retry_policy.then_some(ferry_client::RetryPolicy {
            initial: Duration::from_secs(1),
            maximum: Duration::from_secs(1),
            multiplier: 1.0,
            jitter: 0.0,
        });
        let options = ferry_client::SubscriptionOptions {
            ack_deadline,
            max_delivery_attempts: if policy.is_some() { 5 } else { 0 },
            dead_letter_channel: if policy.is_some() {
                dead
            } else {
                String::new()
            },
            retry: policy,
            filter: match self.args.filter {
                true => r#"attributes.n = "0""#.to_owned(),
                false => String::new(),
            },
            ..ferry_client::SubscriptionOptions::default()
        };
        (client
            .create_subscription(&name, SUBSCRIPTION, options)
            .await)
            .map_err(|e| {
                BenchError::caused(format!("cannot create a subscription of {name}"), &e)
            })?;
        if self.args.derived {
            let derived = ferry_client::DerivedChannel {
                source: name.clone(),
                target: format!("{name}.derived"),
                ..ferry_client::DerivedChannel::default()
            };
            (client.create_derived(derived).await)
                .map_err(|e| BenchError::caused(format!("cannot derive from {name}"), &e))?;
        }
        Ok(name)
    }

    /// Creates a wildcard subscription (named like the scenarios' own) on the pattern that
    /// replaces `channel`'s last word with `*`, reading from the earliest message; returns the
    /// pattern. Only `channel` matches it while the scenario runs: scenarios run one at a time.
    async fn wildcard_of(&self, channel: &str) -> Result<String> {
        let prefix = channel
            .rsplit_once('.')
            .map_or(channel, |(prefix, _)| prefix);
        let pattern = format!("{prefix}.*");
        let options = ferry_client::SubscriptionOptions {
            start: ferry_client::Start::Earliest,
            ..ferry_client::SubscriptionOptions::default()
        };
        (self
            .client
            .create_subscription(&pattern, SUBSCRIPTION, options)
            .await)
            .map_err(|e| {
                BenchError::caused(format!("cannot create a subscription of {pattern}"), &e)
            })?;
        Ok(pattern)
    }

    /// Deletes the wildcard subscription [`Bench::wildcard_of`] made; a failure only warrants a
    /// warning.
    async fn remove_wildcard(&self, pattern: &str) {
        if let Err(e) = self.client.delete_subscription(pattern, SUBSCRIPTION).await {
            eprintln!(
                "ferry bench: warning: {}",
                BenchError::caused(format!("cannot delete subscription of {pattern}"), &e)
            );
        }
    }

    /// Deletes a scenario's channel, so that what it retained neither fills a shared broker's
    /// disk nor weighs on the next scenario. A failure only warrants a warning.
    async fn remove_channel(&self, name: &str) {
        let dead = format!("{name}.dead");
        let derived = format!("{name}.derived");
        // The dead-letter channel and the derived one last: neither can go while its
        // subscription (or derived channel) on the channel exists.
        for channel in [name, dead.as_str(), derived.as_str()] {
            if (channel == dead && !self.args.retry_policy)
                || (channel == derived && !self.args.derived)
            {
                continue;
            }
            if let Err(e) = self.client.delete_channel(channel).await {
                eprintln!(
                    "ferry bench: warning: {}",
                    BenchError::caused(format!("cannot delete channel {channel}"), &e)
                );
            }
        }
    }

    fn deadline(&self, started: Instant) -> Instant {
        started + self.args.max_seconds
    }

    /// What a measured publisher sends by default: `limit` messages of `payload` to `channel`
    /// until `deadline`, batched, pipelined, keyed and identified as the options say, as fast
    /// as confirmations allow. Scenarios change what they measure differently.
    fn publish_plan(
        &self,
        channel: &str,
        limit: u64,
        deadline: Instant,
        payload: Payload,
    ) -> PublishPlan {
        PublishPlan {
            channel: channel.to_owned(),
            limit,
            batch: self.args.batch,
            in_flight: self.args.in_flight,
            deadline,
            rate: None,
            payload,
            keys: self.args.keys,
            ids: self.args.ids,
            delay: None,
            tag: false,
        }
    }

    /// Fills `channel` with up to `limit` messages of `size` bytes before `deadline`, on a
    /// connection of its own. Filling is preparation, not measurement, so it uses big pipelined
    /// batches, as big as the broker's limits allow.
    async fn fill(
        &self,
        channel: &str,
        limit: u64,
        size: usize,
        deadline: Instant,
    ) -> Result<Published> {
        let batch = self.limits.map_or(FILL_BATCH, |limits| {
            let by_bytes = usize::try_from(limits.max_batch_bytes.0).unwrap_or(usize::MAX) / size;
            let most = limits.max_batch_messages.min(by_bytes).max(1);
            FILL_BATCH.min(u32::try_from(most).unwrap_or(FILL_BATCH))
        });
        publish(
            self.connect().await?,
            PublishPlan {
                channel: channel.to_owned(),
                limit,
                batch,
                in_flight: FILL_IN_FLIGHT,
                deadline,
                rate: None,
                payload: Payload::Fixed(Bytes::from(vec![b'x'; size])),
                keys: self.args.keys,
                ids: self.args.ids,
                delay: self.args.delay.map(Duration::from_secs),
                tag: self.args.filter,
            },
        )
        .await
    }
}

/// Runs the chosen scenarios one after the other, so that none measures another's load.
/// `broker` is the bench's own broker, which the backlog scenario measures and restarts.
async fn run_scenarios(
    args: &BenchArgs,
    scenarios: &[Scenario],
    url: &str,
    config: Option<&Config>,
    mut broker: Option<&mut BrokerChild>,
) -> Result<()> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| BenchError::caused(format!("bad broker address {url}"), &e))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let client = ferry_client::Client::connect(url)
        .await
        .map_err(|e| BenchError::caused(format!("cannot connect to {url}"), &e))?;
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|t| t.as_secs())
        .unwrap_or_default();
    let bench = Bench {
        args,
        endpoint,
        client,
        tag: format!("r{started}-{}", std::process::id()),
        limits: config.map(|c| &c.limits),
        config,
        metrics: broker.as_deref().map(|b| b.home.metrics),
    };
    let data_dir = broker.as_deref().map(|b| b.home.data_dir());
    println!();
    commits::print_disk("disk     fdatasync at the start", data_dir.as_deref());
    for scenario in scenarios {
        match scenario {
            Scenario::Publish => {
                println!(
                    "\n== publish: one idle subscription; one PublishStream per publisher, \
                     {} in flight; MB = 10^6 payload bytes",
                    args.in_flight
                );
                for size in SIZES {
                    for publishers in PUBLISHERS {
                        publish_scenario(&bench, size, publishers).await?;
                    }
                }
            }
            Scenario::Consume => {
                println!(
                    "\n== consume: drain a backlog with one consumer, window {}, acking each \
                     delivery batch",
                    args.window
                );
                for size in SIZES {
                    consume_scenario(&bench, size).await?;
                }
            }
            Scenario::Mixed => {
                println!(
                    "\n== mixed: one publisher (batch {}) and one acking consumer (window {}) at once",
                    args.batch, args.window
                );
                mixed_scenario(&bench).await?;
            }
            Scenario::Latency => {
                println!(
                    "\n== latency: publish to receive, {} msgs/s for {} s, window {LATENCY_WINDOW}",
                    args.rate,
                    args.latency_seconds.as_secs_f64()
                );
                latency_scenario(&bench).await?;
            }
            Scenario::Backlog => {
                println!(
                    "\n== backlog: store {} msgs of {}, restart the broker on them, drain them \
                     with one acking consumer (window {}); each phase stops at --backlog-seconds",
                    thousands(args.backlog),
                    size_label(args.backlog_size),
                    args.window
                );
                backlog::backlog_scenario(&bench, broker.as_deref_mut()).await?;
            }
            Scenario::Memory => {
                println!(
                    "\n== memory: peak RSS of a fresh broker process against its memory budget"
                );
                memory::memory_scenario(&bench, broker.as_deref_mut()).await?;
            }
        }
    }
    println!();
    commits::print_disk("disk     fdatasync at the end", data_dir.as_deref());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses_are_accepted() {
        for ok in [
            "http://127.0.0.1:50051",
            "127.0.0.1:50051",
            "http://127.3.2.1:1",
            "http://[::1]:50051",
            "http://localhost:50051",
            "http://LOCALHOST:50051",
        ] {
            assert!(loopback_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:50051",
            "http://example.com:50051",
            "http://[::2]:50051",
            "https://127.0.0.1:50051",
            "http://0.0.0.0:50051",
        ] {
            assert!(loopback_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn helpers_format_and_split() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(
            (0..4).map(|i| share(10, 4, i)).collect::<Vec<_>>(),
            [3, 3, 2, 2]
        );
        assert_eq!(percentile(&[], 0.5), None);
        let samples: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&samples, 0.5), Some(500));
        assert_eq!(percentile(&samples, 0.999), Some(999));
        assert_eq!(due_by(5000, Duration::from_millis(3)), 15);
        assert_eq!(read_stamp(&7u64.to_le_bytes()), Some(7));
        assert_eq!(mib(3 << 19), "1.5 MiB");
    }

    #[test]
    fn backlog_runs_only_when_asked_for() {
        assert!(!selected(&[]).contains(&Scenario::Backlog));
        assert!(
            selected(&[Scenario::Backlog, Scenario::Publish])
                == [Scenario::Publish, Scenario::Backlog]
        );
    }

    #[test]
    fn disk_usage_counts_nested_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), [0; 10]).unwrap();
        std::fs::create_dir_all(dir.path().join("b/c")).unwrap();
        std::fs::write(dir.path().join("b/c/d"), [0; 32]).unwrap();
        assert_eq!(disk_usage(dir.path()).unwrap(), 42);
    }
}
