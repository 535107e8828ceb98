//! `ferry bench`: the load generator. It owns everything a benchmark run needs: starting a
//! private broker (this same executable running `ferry serve` on a throw-away data directory)
//! or checking that an existing one is on loopback, the scenarios (publish throughput, draining
//! a backlog with acks, publishing and consuming at once, end-to-end latency at a fixed rate, on
//! request a big backlog kept on disk across a broker restart, and the broker's peak memory), the
//! publisher and consumer loops those scenarios share, and the report printed on standard output.
//! It measures through the public gRPC API only, exactly as any other client would see the broker.
//! The memory scenario, which measures the broker against its memory budget, is in [`memory`].

mod backlog;
mod commits;
mod memory;

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

/// Checks that `addr` names a broker on this machine and returns it as an `http://` URL. The
/// bench generates heavy load, so it must never be pointed at another host by mistake.
fn loopback_url(addr: &str) -> Result<String> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("--addr {addr:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("--addr {addr}: only http:// is supported").into());
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("--addr {addr:?} names no host"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(format!(
            "--addr {addr}: the bench only targets this machine (127.0.0.0/8, ::1 or localhost), \
             not {host}"
        )
        .into());
    }
    Ok(url)
}

/// The private broker: this executable running `ferry serve` on a fresh temporary directory.
/// It can be restarted on the same directory. `stop` is the orderly way out; dropping it kills
/// the process, then removes the directory, so no error path leaves a broker or its files behind.
struct BrokerChild {
    // Declared before `home` so that it is dropped first: the process dies before its directory
    // is removed from under it.
    process: BrokerProcess,
    home: BrokerHome,
    /// The process running now replaced the first one (the backlog scenario's restart).
    restarted: bool,
}

impl BrokerChild {
    /// Starts a broker on a new temporary directory, on a free loopback port.
    async fn start(config: Option<&Path>) -> Result<Self> {
        let home = BrokerHome::create(config)?;
        let process = home.spawn("127.0.0.1:0").await?;
        Ok(Self {
            process,
            home,
            restarted: false,
        })
    }

    /// Stops the broker with SIGTERM and starts it again on the same data directory and
    /// configuration, as an operator's restart would. It listens where it did before, so that
    /// clients find it again at the same URL. Returns how long the new process took from being
    /// spawned to listening.
    async fn restart(&mut self) -> Result<Duration> {
        self.process.stop().await?;
        let address = self.process.address.clone();
        self.process = self.home.spawn(&address).await?;
        self.restarted = true;
        Ok(self.process.startup)
    }

    /// What the store's files take on disk, in bytes.
    fn data_size(&self) -> std::io::Result<u64> {
        disk_usage(&self.home.data_dir())
    }

    /// The memory of the process running now (a restart starts its peak afresh).
    fn memory(&self) -> Result<Memory, String> {
        self.process.memory()
    }

    /// Stops the broker (see [`BrokerProcess::stop`]); the directory goes when `self` does.
    async fn stop(mut self) -> Result<()> {
        self.process.stop().await
    }
}

/// Where the private broker lives and how it is started: a temporary directory holding its data
/// and its log, which outlives the processes run on it and is removed when this is dropped.
struct BrokerHome {
    /// Holds `data/` and `broker.log`.
    dir: tempfile::TempDir,
    /// This executable, which also serves.
    exe: PathBuf,
    /// The `--config` file given to the bench, passed on to every process.
    config: Option<PathBuf>,
}

impl BrokerHome {
    /// A new, empty home whose broker runs on `config` (the built-in default if none).
    fn create(config: Option<&Path>) -> Result<Self> {
        let exe = std::env::current_exe()
            .map_err(|e| BenchError::caused("cannot find the ferry executable", &e))?;
        let dir = tempfile::Builder::new()
            .prefix("ferry-bench-")
            .tempdir()
            .map_err(|e| BenchError::caused("cannot create a temporary directory", &e))?;
        Ok(Self {
            dir,
            exe,
            config: config.map(Path::to_path_buf),
        })
    }

    /// The store's directory, given to every process as `--data-dir`.
    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts `ferry serve` on this home's data directory, listening on `listen`, and waits
    /// until it says it is ready.
    async fn spawn(&self, listen: &str) -> Result<BrokerProcess> {
        // The broker logs on stderr; in a file they stay out of the report yet can explain a
        // failure. Appended to, so that a restart keeps the previous process's lines.
        let log_path = self.dir.path().join("broker.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| BenchError::caused("cannot open the broker's log file", &e))?;
        let mut command = tokio::process::Command::new(&self.exe);
        command
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(self.data_dir());
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        // `ferry serve` would pick up FERRY_CONFIG, making the fsync mode in the header a lie.
        command
            .env_remove("FERRY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        let spawned = Instant::now();
        let mut process = command
            .spawn()
            .map_err(|e| BenchError::caused("cannot start the broker", &e))?;
        let pid = process
            .id()
            .ok_or("the broker exited as soon as it started")?;
        let stdout = process
            .stdout
            .take()
            .ok_or("the broker's standard output is not captured")?;

        let mut lines = BufReader::new(stdout).lines();
        let ready = time::timeout(STARTUP_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(address) = line.strip_prefix(READY_PREFIX) {
                    return Ok(Some(address.trim().to_owned()));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let startup = spawned.elapsed();
        let address = match ready {
            Ok(Ok(Some(address))) => address,
            Ok(Ok(None)) => {
                let exit = match time::timeout(Duration::from_secs(2), process.wait()).await {
                    Ok(Ok(status)) => status.to_string(),
                    _ => "still running".to_owned(),
                };
                return Err(format!(
                    "the broker stopped before it was ready ({exit}){}",
                    log_tail(&log_path)
                )
                .into());
            }
            Ok(Err(e)) => {
                return Err(BenchError::caused("cannot read the broker's output", &e));
            }
            Err(_) => {
                return Err(format!(
                    "the broker was not ready within {} s{}",
                    STARTUP_TIMEOUT.as_secs(),
                    log_tail(&log_path)
                )
                .into());
            }
        };
        // Nothing more is expected on stdout, but a full pipe would block the broker.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(BrokerProcess {
            process,
            pid,
            address,
            log: log_path,
            startup,
        })
    }
}

/// One `ferry serve` process of the private broker. Dropping it kills the process
/// (`kill_on_drop`), so no error path leaves a broker behind; `stop` is the orderly way out.
struct BrokerProcess {
    process: tokio::process::Child,
    pid: u32,
    /// Where it listens, as it printed it.
    address: String,
    /// Its log file, quoted when it fails.
    log: PathBuf,
    /// From spawning the process to its `ferry listening on` line.
    startup: Duration,
}

impl BrokerProcess {
    /// The broker's resident memory now and at its peak, from `/proc/PID/status`.
    fn memory(&self) -> Result<Memory, String> {
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .ok_or_else(|| format!("{path} has no {name} line"))
        };
        Ok(Memory {
            peak_kib: field("VmHWM:")?,
            now_kib: field("VmRSS:")?,
        })
    }

    /// Stops the broker with SIGTERM, as an operator would, and checks that it exits cleanly.
    async fn stop(&mut self) -> Result<()> {
        // A process already waited for must not be signalled: its pid may be another's by now.
        // That happens when a restart stopped it and then could not start the next one.
        if let Ok(Some(status)) = self.process.try_wait() {
            return if status.success() {
                Ok(())
            } else {
                Err(format!("the broker had exited with {status}{}", log_tail(&self.log)).into())
            };
        }
        // libc is not a dependency; the `kill` command sends the signal.
        let signalled = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        if !matches!(&signalled, Ok(status) if status.success()) {
            let _ = self.process.start_kill();
            return Err(format!(
                "cannot send SIGTERM to the broker (kill: {signalled:?}); killed it instead"
            )
            .into());
        }
        match time::timeout(STOP_TIMEOUT, self.process.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!(
                "the broker exited with {status} after SIGTERM{}",
                log_tail(&self.log)
            )
            .into()),
            Ok(Err(e)) => Err(BenchError::caused("cannot wait for the broker", &e)),
            Err(_) => {
                let _ = self.process.kill().await;
                Err(format!(
                    "the broker did not stop within {} s of SIGTERM; it was killed",
                    STOP_TIMEOUT.as_secs()
                )
                .into())
            }
        }
    }
}

/// The last lines of the private broker's log, to append to an error message.
fn log_tail(path: &Path) -> String {
    const LINES: usize = 20;
    let Ok(log) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = log.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(LINES)..];
    format!("\nbroker log (last lines):\n  {}", tail.join("\n  "))
}

/// The bytes of the files under `dir`, counted recursively: what a store takes on disk.
fn disk_usage(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        // The broker runs while this walks: a file it removed meanwhile takes no space.
        let metadata = match entry.metadata() {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if metadata.is_dir() {
            total += disk_usage(&entry.path())?;
        } else {
            total += metadata.len();
        }
    }
    Ok(total)
}

/// The broker's resident set size, in KiB as the kernel reports it.
struct Memory {
    peak_kib: u64,
    now_kib: u64,
}

/// The final memory report. `restarted` says the process measured is the one the backlog
/// scenario started, whose peak does not cover the scenarios before it.
fn print_memory(memory: Result<Memory, String>, restarted: bool) {
    println!("\n== memory: the bench's broker process");
    match memory {
        Ok(memory) => println!(
            "{:<32}: {}  (RSS at the end {})",
            "broker peak RSS (VmHWM)",
            mib(memory.peak_kib * 1024),
            mib(memory.now_kib * 1024)
        ),
        Err(e) => println!("{:<32}: unavailable ({e})", "broker peak RSS (VmHWM)"),
    }
    if restarted {
        println!(
            "{:<32}  (of the process the backlog scenario restarted: earlier peaks are not in it)",
            ""
        );
    }
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

/// Scenario 1: `publishers` concurrent publishers fill a channel nobody consumes.
async fn publish_scenario(bench: &Bench<'_>, size: usize, publishers: u32) -> Result<()> {
    let args = bench.args;
    let channel = bench
        .fresh_channel(&format!(
            "pub.{}.c{publishers}.b{}",
            size_word(size),
            args.batch
        ))
        .await?;
    let mut connections = Vec::new();
    for _ in 0..publishers {
        connections.push(bench.connect().await?);
    }
    let payload = Payload::Fixed(Bytes::from(vec![b'x'; size]));
    let before = commits::snapshot(&bench.client).await;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (index, connection) in (0..).zip(connections) {
        let limit = share(args.messages, publishers, index);
        if limit == 0 {
            continue;
        }
        tasks.spawn(publish(
            connection,
            PublishPlan {
                channel: channel.clone(),
                limit,
                batch: args.batch,
                in_flight: args.in_flight,
                deadline: bench.deadline(started),
                rate: None,
                payload: payload.clone(),
                keys: args.keys,
                ids: args.ids,
                delay: None,
                tag: false,
            },
        ));
    }
    let mut total = Published {
        confirmed: 0,
        finished: started,
        timed_out: false,
    };
    // In completion order, so that the first failure ends the scenario (and, by dropping the
    // set, aborts the other publishers) without waiting for the rest.
    while let Some(joined) = tasks.join_next().await {
        let one = joined.map_err(BenchError::join)??;
        total.confirmed += one.confirmed;
        total.finished = total.finished.max(one.finished);
        total.timed_out |= one.timed_out;
    }
    let label = format!(
        "publish  {:<5} c={publishers:<3} batch={}",
        size_label(size),
        args.batch
    );
    print_rate(&label, size, &total.figure(started, args.messages));
    commits::print_commits(&bench.client, before).await;
    bench.remove_channel(&channel).await;
    Ok(())
}

/// Scenario 2: a backlog, published untimed, drained by one consumer acking every batch.
async fn consume_scenario(bench: &Bench<'_>, size: usize) -> Result<()> {
    let args = bench.args;
    let channel = bench
        .fresh_channel(&format!("consume.{}", size_word(size)))
        .await?;
    let filled = bench
        .fill(
            &channel,
            args.messages,
            size,
            bench.deadline(Instant::now()),
        )
        .await?;

    let connection = bench.connect().await?;
    let pattern = match args.wildcard {
        true => Some(bench.wildcard_of(&channel).await?),
        false => None,
    };
    let before = commits::snapshot(&bench.client).await;
    let started = Instant::now();
    let consumer = match &pattern {
        Some(pattern) => {
            Consumer::attach_to(connection, pattern, SUBSCRIPTION, args.window).await?
        }
        None => Consumer::attach(connection, &channel, args.window).await?,
    };
    // With --filter, one in ten passes (the one publisher numbered them from 0).
    let passing = match args.filter {
        true => filled.confirmed.div_ceil(10),
        false => filled.confirmed,
    };
    let consumed = consumer
        .drain(DrainPlan {
            goal: fixed_goal(passing),
            deadline: bench.deadline(started),
            stamps: None,
        })
        .await?;
    let through = if args.wildcard { " wild" } else { "" };
    let label = format!(
        "consume  {:<5} window={}{through}",
        size_label(size),
        args.window
    );
    print_rate(&label, size, &consumed.figure(started, passing));
    if args.filter {
        let elapsed = consumed.finished.saturating_duration_since(started);
        println!(
            "{:<32}  (a filter kept {} of {}: the channel's messages went through at {} msgs/s)",
            "",
            thousands(consumed.acked),
            thousands(filled.confirmed),
            thousands((filled.confirmed as f64 / elapsed.as_secs_f64().max(1e-9)) as u64)
        );
    }
    commits::print_commits(&bench.client, before).await;
    if filled.timed_out {
        println!(
            "{:<32}  (the backlog was only {} msgs: filling it hit --max-seconds)",
            "",
            thousands(filled.confirmed)
        );
    }
    if let Some(pattern) = pattern {
        bench.remove_wildcard(&pattern).await;
    }
    bench.remove_channel(&channel).await;
    Ok(())
}

/// Scenario 3: one publisher and one acking consumer on the same subscription at once.
async fn mixed_scenario(bench: &Bench<'_>) -> Result<()> {
    let args = bench.args;
    let channel = bench.fresh_channel("mixed.1k").await?;
    let publisher_connection = bench.connect().await?;
    let consumer = Consumer::attach(bench.connect().await?, &channel, args.window).await?;
    let before = commits::snapshot(&bench.client).await;
    let started = Instant::now();
    let plan = PublishPlan {
        channel: channel.clone(),
        limit: args.messages,
        batch: args.batch,
        in_flight: args.in_flight,
        deadline: bench.deadline(started),
        rate: None,
        payload: Payload::Fixed(Bytes::from(vec![b'x'; KIB])),
        keys: args.keys,
        ids: args.ids,
        delay: None,
        tag: false,
    };
    let (published, consumed) = publish_and_consume(
        publisher_connection,
        plan,
        consumer,
        args.messages,
        bench.deadline(started),
        None,
    )
    .await?;
    print_rate(
        "mixed    1KiB  publish",
        KIB,
        &published.figure(started, args.messages),
    );
    print_rate(
        "mixed    1KiB  consume",
        KIB,
        &consumed.figure(started, published.confirmed),
    );
    commits::print_commits(&bench.client, before).await;
    bench.remove_channel(&channel).await;
    Ok(())
}

/// Scenario 4: end-to-end latency of 1 KiB messages published at a steady rate.
async fn latency_scenario(bench: &Bench<'_>) -> Result<()> {
    let args = bench.args;
    let channel = bench.fresh_channel("latency.1k").await?;
    let publisher_connection = bench.connect().await?;
    // Attached before publishing starts, so that no message waits for the consumer to arrive.
    let consumer = Consumer::attach(bench.connect().await?, &channel, LATENCY_WINDOW).await?;
    let limit = ((args.rate as f64 * args.latency_seconds.as_secs_f64()).ceil() as u64).max(1);
    let before = commits::snapshot(&bench.client).await;
    // Publisher and consumer stamp and read times against one base, so their clocks agree.
    let base = Instant::now();
    let deadline = base + args.latency_seconds;
    let plan = PublishPlan {
        channel: channel.clone(),
        limit,
        // One message per request: a latency figure for batches would measure the batching.
        batch: 1,
        in_flight: args.in_flight,
        deadline,
        rate: Some(args.rate),
        payload: Payload::Stamped { size: KIB, base },
        keys: args.keys,
        ids: args.ids,
        delay: None,
        tag: false,
    };
    let (published, consumed) = publish_and_consume(
        publisher_connection,
        plan,
        consumer,
        limit,
        deadline + LATENCY_DRAIN_GRACE,
        Some(base),
    )
    .await?;

    let publishing = published.finished.saturating_duration_since(base);
    let achieved = published.confirmed as f64 / publishing.as_secs_f64().max(1e-9);
    let mut latencies = consumed.latencies;
    latencies.sort_unstable();
    let label = format!("latency  1KiB  rate={}/s", thousands(args.rate));
    match (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        latencies.last(),
    ) {
        (Some(p50), Some(p99), Some(p999), Some(&max)) => println!(
            "{label:<32}: p50 {}  p99 {}  p99.9 {}  max {}  (achieved {} msgs/s, {} msgs)",
            millis(p50),
            millis(p99),
            millis(p999),
            millis(max),
            thousands(achieved.round() as u64),
            thousands(published.confirmed)
        ),
        _ => println!("{label:<32}: no message was received"),
    }
    if consumed.timed_out {
        println!(
            "{:<32}  (the consumer received {} of {} msgs before giving up)",
            "",
            thousands(consumed.acked),
            thousands(published.confirmed)
        );
    }
    commits::print_commits(&bench.client, before).await;
    bench.remove_channel(&channel).await;
    Ok(())
}

/// Runs a publisher and an attached consumer concurrently, on their own tasks. The consumer's
/// goal starts at `expected` and becomes what the publisher got confirmed once it is done, so
/// that a publisher stopped by its time limit does not leave the consumer waiting for more.
async fn publish_and_consume(
    connection: Channel,
    plan: PublishPlan,
    consumer: Consumer,
    expected: u64,
    consumer_deadline: Instant,
    stamps: Option<Instant>,
) -> Result<(Published, Consumed)> {
    let (goal_sender, goal) = watch::channel(expected);
    let mut publisher = Worker::spawn(async move {
        let published = publish(connection, plan).await?;
        goal_sender.send_replace(published.confirmed);
        Ok(published)
    });
    let mut consumer = Worker::spawn(consumer.drain(DrainPlan {
        goal,
        deadline: consumer_deadline,
        stamps,
    }));
    tokio::try_join!(publisher.join(), consumer.join())
}

/// A spawned half of a scenario. Dropping it aborts the task, so that when one half fails the
/// other does not go on loading the broker.
struct Worker<T>(JoinHandle<Result<T>>);

impl<T: Send + 'static> Worker<T> {
    fn spawn(work: impl Future<Output = Result<T>> + Send + 'static) -> Self {
        Self(tokio::spawn(work))
    }

    async fn join(&mut self) -> Result<T> {
        (&mut self.0).await.map_err(BenchError::join)?
    }
}

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What each message carries.
#[derive(Clone)]
enum Payload {
    /// The same bytes every time: cloning `Bytes` shares them, so the bench itself stays cheap.
    Fixed(Bytes),
    /// `size` bytes starting with the send time, in nanoseconds since `base`.
    Stamped { size: usize, base: Instant },
}

impl Payload {
    fn next(&self) -> Bytes {
        match self {
            Payload::Fixed(bytes) => bytes.clone(),
            Payload::Stamped { size, base } => {
                let mut bytes = BytesMut::zeroed((*size).max(STAMP_BYTES));
                bytes[..STAMP_BYTES].copy_from_slice(&nanos_since(*base).to_le_bytes());
                bytes.freeze()
            }
        }
    }
}

fn nanos_since(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn read_stamp(payload: &[u8]) -> Option<u64> {
    let stamp = payload.get(..STAMP_BYTES)?;
    Some(u64::from_le_bytes(stamp.try_into().ok()?))
}

/// What one publisher sends and when it stops.
struct PublishPlan {
    channel: String,
    /// Stop after this many messages…
    limit: u64,
    /// …or at this time, whichever comes first.
    deadline: Instant,
    /// Messages per request.
    batch: u32,
    /// Messages sent and not yet confirmed, at most.
    in_flight: u32,
    /// Messages per second; `None` publishes as fast as confirmations allow.
    rate: Option<u64>,
    payload: Payload,
    /// Ordering keys given in turn (0: none).
    keys: u32,
    /// Give every message a unique id (what de-duplication costs).
    ids: bool,
    /// Delay every message by this long (delayed delivery).
    delay: Option<Duration>,
    /// Give the messages an attribute `n` of 0 to 9 in turn (what `--filter` keeps one of).
    tag: bool,
}

/// What one publisher got confirmed.
struct Published {
    confirmed: u64,
    /// When the last confirmation arrived.
    finished: Instant,
    /// Sending stopped at the deadline rather than the message limit.
    timed_out: bool,
}

impl Published {
    fn figure(&self, started: Instant, target: u64) -> Figure {
        Figure {
            done: self.confirmed,
            target,
            elapsed: self.finished.saturating_duration_since(started),
            timed_out: self.timed_out,
            limit: "--max-seconds",
        }
    }
}

/// The shared publisher loop: one `PublishStream`, requests pipelined up to the plan's in-flight
/// limit, each confirmation checked against the batch it answers. Sending and confirming run
/// side by side; the confirming side finishes once everything sent is confirmed.
async fn publish(connection: Channel, plan: PublishPlan) -> Result<Published> {
    let started = Instant::now();
    let (requests, outbound) = mpsc::channel(REQUEST_QUEUE);
    let mut responses = PublisherClient::new(connection)
        .publish_stream(ReceiverStream::new(outbound))
        .await
        .map_err(|s| BenchError::status("cannot open a publish stream", &s))?
        .into_inner();
    // A batch larger than the in-flight limit still has to go, alone.
    let permits = Semaphore::new(plan.in_flight.max(plan.batch) as usize);
    // Tells the confirming side the size of every batch sent, in order; its end means "done".
    let (sizes, mut expected) = mpsc::unbounded_channel::<u32>();

    // Ids unique across the bench's publishers (and its runs).
    static PUBLISHERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let publisher = (u64::from(std::process::id()) << 20)
        | PUBLISHERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let send = async {
        let mut sent = 0u64;
        let mut timed_out = false;
        let mut ticker = time::interval(PACING_TICK);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        'sending: while sent < plan.limit {
            let due = match plan.rate {
                None => plan.limit,
                Some(rate) => {
                    ticker.tick().await;
                    due_by(rate, started.elapsed()).min(plan.limit)
                }
            };
            if Instant::now() >= plan.deadline {
                timed_out = true;
                break;
            }
            while sent < due {
                let count = (due - sent).min(u64::from(plan.batch)) as u32;
                let Ok(Ok(permit)) =
                    time::timeout_at(plan.deadline, permits.acquire_many(count)).await
                else {
                    timed_out = true;
                    break 'sending;
                };
                permit.forget();
                let request = pb::PublishRequest {
                    channel: plan.channel.clone(),
                    messages: (0..u64::from(count))
                        .map(|i| pb::OutgoingMessage {
                            payload: plan.payload.next(),
                            id: match plan.ids {
                                true => format!("{publisher:x}-{}", sent + i),
                                false => String::new(),
                            },
                            key: match plan.keys {
                                0 => String::new(),
                                keys => format!("k{}", (sent + i) % u64::from(keys)),
                            },
                            delay: plan.delay.map(|d| prost_types::Duration {
                                seconds: d.as_secs() as i64,
                                nanos: d.subsec_nanos() as i32,
                            }),
                            attributes: match plan.tag {
                                true => [("n".to_owned(), ((sent + i) % 10).to_string())].into(),
                                false => Default::default(),
                            },
                            ..Default::default()
                        })
                        .collect(),
                };
                // A closed stream is reported by the confirming side, which has the status.
                if requests.send(request).await.is_err() || sizes.send(count).is_err() {
                    break 'sending;
                }
                sent += u64::from(count);
                if Instant::now() >= plan.deadline {
                    timed_out = sent < plan.limit;
                    break 'sending;
                }
            }
        }
        // Half-closes the stream, so the broker sees a clean end, and ends `expected`.
        drop(requests);
        drop(sizes);
        Ok::<_, BenchError>(timed_out)
    };

    let confirm = async {
        let mut confirmed = 0u64;
        let mut finished = started;
        let give_up = plan.deadline + CONFIRM_GRACE;
        while let Some(count) = expected.recv().await {
            let response = match time::timeout_at(give_up, responses.message()).await {
                Ok(Ok(Some(response))) => response,
                Ok(Ok(None)) => return Err("the broker ended a publish stream early".into()),
                Ok(Err(status)) => return Err(BenchError::status("publishing failed", &status)),
                Err(_) => {
                    return Err(format!(
                        "the broker stopped confirming publishes ({} still unconfirmed {} s \
                         after the time limit)",
                        count,
                        CONFIRM_GRACE.as_secs()
                    )
                    .into());
                }
            };
            if response.sequences.len() != count as usize {
                return Err(format!(
                    "the broker confirmed {} sequences for a batch of {count}",
                    response.sequences.len()
                )
                .into());
            }
            confirmed += u64::from(count);
            finished = Instant::now();
            permits.add_permits(count as usize);
        }
        Ok::<_, BenchError>((confirmed, finished))
    };

    let (timed_out, (confirmed, finished)) = tokio::try_join!(send, confirm)?;
    Ok(Published {
        confirmed,
        finished,
        timed_out,
    })
}

/// How many messages a paced publisher should have sent `elapsed` after it started.
fn due_by(rate: u64, elapsed: Duration) -> u64 {
    u64::try_from(u128::from(rate) * elapsed.as_nanos() / 1_000_000_000).unwrap_or(u64::MAX)
}

/// Publisher `index`'s part of `total` messages split over `parts` publishers.
fn share(total: u64, parts: u32, index: u32) -> u64 {
    let parts = u64::from(parts);
    total / parts + u64::from(u64::from(index) < total % parts)
}

/// A consumer attached to the bench subscription of a channel, before it starts draining.
struct Consumer {
    requests: mpsc::Sender<pb::SubscribeRequest>,
    responses: Streaming<pb::SubscribeResponse>,
}

/// When a consumer stops and what it measures.
struct DrainPlan {
    /// Stop once this many acks were confirmed; the value may drop while draining.
    goal: watch::Receiver<u64>,
    /// Or at this time.
    deadline: Instant,
    /// Payloads are stamped against this base: record each first delivery's latency.
    stamps: Option<Instant>,
}

/// What a consumer got done.
struct Consumed {
    /// Acks the broker confirmed OK.
    acked: u64,
    /// Acks it refused as stale or unknown (none are expected).
    refused: u64,
    /// When the last OK ack arrived, or the deadline.
    finished: Instant,
    /// Stopped at the deadline before reaching the goal.
    timed_out: bool,
    /// Publish-to-receive times of first deliveries, in nanoseconds, when measured.
    latencies: Vec<u64>,
}

impl Consumed {
    fn figure(&self, started: Instant, target: u64) -> Figure {
        Figure {
            done: self.acked,
            target,
            elapsed: self.finished.saturating_duration_since(started),
            // A consumer that acked everything published was not cut short, even if the time
            // limit came before the publisher's last confirmation told it so.
            timed_out: self.timed_out && self.acked < target,
            limit: "--max-seconds",
        }
    }

    /// Counts the outcome of one ack request; true if some ack was confirmed.
    fn count(&mut self, results: &pb::AckResults) -> bool {
        if results.operation() != pb::AckOperation::Ack {
            return false;
        }
        let ok = results
            .results
            .iter()
            .filter(|r| r.status() == pb::AckStatus::Ok)
            .count() as u64;
        self.acked += ok;
        self.refused += results.results.len() as u64 - ok;
        ok > 0
    }
}

impl Consumer {
    async fn attach(connection: Channel, channel: &str, window: u32) -> Result<Self> {
        Self::attach_to(connection, channel, SUBSCRIPTION, window).await
    }

    /// Attaches to `subscription` of `channel`.
    async fn attach_to(
        connection: Channel,
        channel: &str,
        subscription: &str,
        window: u32,
    ) -> Result<Self> {
        let (requests, outbound) = mpsc::channel(REQUEST_QUEUE);
        let attach = pb::SubscribeRequest {
            request: Some(SubscribeReq::Attach(pb::Attach {
                channel: channel.to_owned(),
                subscription: subscription.to_owned(),
                window: Some(pb::FlowControl {
                    max_messages: window,
                    max_bytes: 0,
                }),
            })),
        };
        // The broker reads the attach before it answers the call, so it must be queued first.
        requests
            .send(attach)
            .await
            .map_err(|_| "cannot queue the attach request")?;
        let mut responses = SubscriberClient::new(connection)
            .subscribe(ReceiverStream::new(outbound))
            .await
            .map_err(|s| BenchError::status(format!("cannot subscribe to {channel}"), &s))?
            .into_inner();
        match time::timeout(CONNECT_TIMEOUT, responses.message()).await {
            Ok(Ok(Some(pb::SubscribeResponse {
                response: Some(SubscribeResp::Attached(_)),
            }))) => Ok(Self {
                requests,
                responses,
            }),
            Ok(Ok(_)) => Err(format!("the broker did not answer the attach to {channel}").into()),
            Ok(Err(status)) => Err(BenchError::status(
                format!("cannot attach to {channel}"),
                &status,
            )),
            Err(_) => Err(format!("no answer to the attach to {channel}").into()),
        }
    }

    /// The shared consumer loop: acks every delivery batch as one request and counts the acks
    /// the broker confirms, until the goal or the deadline.
    async fn drain(mut self, mut plan: DrainPlan) -> Result<Consumed> {
        let mut consumed = Consumed {
            acked: 0,
            refused: 0,
            finished: Instant::now(),
            timed_out: false,
            latencies: Vec::new(),
        };
        // A fixed goal's sender is gone from the start; `changed` would then fail at once forever.
        let mut goal_may_change = true;
        let deadline = time::sleep_until(plan.deadline);
        tokio::pin!(deadline);
        while consumed.acked < *plan.goal.borrow() {
            tokio::select! {
                () = &mut deadline => {
                    consumed.timed_out = true;
                    consumed.finished = Instant::now();
                    break;
                }
                changed = plan.goal.changed(), if goal_may_change => {
                    goal_may_change = changed.is_ok();
                }
                response = self.responses.message() => {
                    let response = response
                        .map_err(|s| BenchError::status("consuming failed", &s))?
                        .ok_or("the broker ended a subscribe stream")?;
                    match response.response {
                        Some(SubscribeResp::Deliveries(batch)) => {
                            self.ack(batch, plan.stamps, &mut consumed.latencies).await;
                        }
                        Some(SubscribeResp::Results(results)) => {
                            if consumed.count(&results) {
                                consumed.finished = Instant::now();
                            }
                        }
                        // Nothing else is expected after the attach, and nothing else counts.
                        Some(SubscribeResp::Attached(_)) | None => {}
                    }
                }
            }
        }
        if consumed.refused > 0 {
            eprintln!(
                "ferry bench: warning: the broker refused {} acks as stale or unknown",
                consumed.refused
            );
        }
        Ok(consumed)
    }

    async fn ack(&self, batch: pb::Deliveries, stamps: Option<Instant>, latencies: &mut Vec<u64>) {
        // One clock reading for the whole batch: its messages arrived together.
        let now = stamps.map(nanos_since);
        let mut ack_ids = Vec::with_capacity(batch.deliveries.len());
        for delivery in batch.deliveries {
            if let (Some(now), Some(message), 1) = (now, &delivery.message, delivery.attempt)
                && let Some(stamp) = read_stamp(&message.payload)
            {
                latencies.push(now.saturating_sub(stamp));
            }
            ack_ids.push(delivery.ack_id);
        }
        let request = pb::SubscribeRequest {
            request: Some(SubscribeReq::Ack(pb::AckIds { ack_ids })),
        };
        // If the stream is gone, the next response says why; that is where it is reported.
        let _ = self.requests.send(request).await;
    }
}

/// A goal that never changes.
fn fixed_goal(goal: u64) -> watch::Receiver<u64> {
    watch::channel(goal).1
}

/// A throughput measurement, ready to print.
struct Figure {
    done: u64,
    target: u64,
    elapsed: Duration,
    timed_out: bool,
    /// The option whose time limit applied, named in the report when it cut the work short.
    limit: &'static str,
}

fn print_rate(label: &str, message_size: usize, figure: &Figure) {
    let seconds = figure.elapsed.as_secs_f64().max(1e-9);
    let rate = figure.done as f64 / seconds;
    let megabytes = rate * message_size as f64 / 1e6;
    let done = if figure.done < figure.target {
        format!("{} of {}", thousands(figure.done), thousands(figure.target))
    } else {
        thousands(figure.done)
    };
    let stopped = if figure.timed_out {
        format!(", stopped by {}", figure.limit)
    } else {
        String::new()
    };
    println!(
        "{label:<32}: {:>9} msgs/s {megabytes:>7.1} MB/s  ({done} msgs in {seconds:.2} s{stopped})",
        thousands(rate.round() as u64)
    );
}

/// The value below which a fraction `p` of the sorted samples lie (nearest rank).
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

fn millis(nanos: u64) -> String {
    format!("{:.2} ms", nanos as f64 / 1e6)
}

/// Bytes as MiB, the unit the kernel's memory figures and most disk tools use.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut text = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            text.push(',');
        }
        text.push(digit);
    }
    text
}

/// "1KiB" or "128B", for the report.
fn size_label(size: usize) -> String {
    if size.is_multiple_of(KIB) {
        format!("{}KiB", size / KIB)
    } else {
        format!("{size}B")
    }
}

/// "1k" or "128b", for channel names.
fn size_word(size: usize) -> String {
    if size.is_multiple_of(KIB) {
        format!("{}k", size / KIB)
    } else {
        format!("{size}b")
    }
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
