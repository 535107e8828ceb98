//! The `ferry` command: the broker daemon (`ferry serve`), the default configuration
//! (`ferry config`), client commands that publish, subscribe and administer (`cli`), and a load
//! generator that measures a broker over gRPC (`ferry bench`).

mod bench;
mod cli;
mod token;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry_server::Config;
use tracing_subscriber::EnvFilter;

/// The allocator. glibc's spent half of the store writer's time in `malloc` under load (sled
/// allocates and frees tree nodes on every insert, and its free lists fragment); mimalloc's
/// thread-local free lists do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ferry: a durable message broker in one small binary.
///
/// The client commands (publish, subscribe, channels, subscriptions, status, health) talk to
/// the broker at --server (or FERRY_SERVER; default http://127.0.0.1:50051) and exit with 0
/// when done, 1 when the broker refused (its status is printed), 2 on a usage error, 3 when the
/// broker cannot be reached. --json prints JSON for scripts: one document, or one object per
/// line for a stream of deliveries (payloads as UTF-8 text, or base64 with
/// "payload_encoding": "base64").
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker daemon until SIGINT or SIGTERM.
    ///
    /// Without --config it runs on the built-in default (the one `ferry config` prints): listen on
    /// 127.0.0.1:50051, data in ./data, every publish fsync'd before it is confirmed. When ready it
    /// prints `ferry listening on ADDRESS` on standard output; logs go to standard error.
    Serve(ServeArgs),
    /// Print the default configuration file, every key documented; `ferry config check FILE`
    /// checks one.
    Config(ConfigArgs),
    /// Publish a message (DATA, --file) or one per line (--lines, of --file or stdin).
    Publish(cli::PublishArgs),
    /// Print a subscription's deliveries as they arrive, acking each (unless --no-ack).
    Subscribe(cli::SubscribeArgs),
    /// List, create, show or delete channels.
    Channels(cli::ChannelsArgs),
    /// List, create, show, move (seek) or delete subscriptions.
    Subscriptions(cli::SubscriptionsArgs),
    /// Move dead letters back to the subscriptions they came from, for another round.
    Redrive(cli::RedriveArgs),
    /// The broker's version, uptime and storage, and every subscription's backlog.
    Status(cli::StatusArgs),
    /// Ask a running broker whether it serves. Exit status 0: serving; 1: it answered that it
    /// is not (e.g. its store failed, or it is shutting down); 3: it could not be asked.
    Health(HealthArgs),
    /// Make bearer tokens for principals, and the hashes the configuration keeps of them.
    Token {
        #[command(subcommand)]
        action: token::TokenAction,
    },
    /// Measure a broker: publish and consume rates, end-to-end latency, the broker's memory.
    Bench(bench::BenchArgs),
    /// Verify a data directory offline: read every record of every segment file and compare
    /// the index with them. Changes nothing. Exit status 0: no problems; 1: problems found
    /// (listed); 2: the check could not run (e.g. a broker is running on the directory).
    Check(DataDirArgs),
    /// Rebuild a data directory's index from its segment files, offline: every intact record
    /// is indexed again; channel names, subscriptions and ack states are kept where the old
    /// index can still be read; channels only the segment files know come back as
    /// `recovered.channel-ID`. The old index is kept in `index.old-TIME/`. Exit status 0 when
    /// done, 2 when it could not run.
    Repair(DataDirArgs),
}

#[derive(clap::Args)]
struct ConfigArgs {
    #[command(subcommand)]
    action: Option<ConfigAction>,
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Check a configuration file as `ferry serve` would at start-up. Exit status 0: good;
    /// 2: bad, with the file, the key and the reason on standard error.
    Check {
        /// The file to check.
        file: PathBuf,
    },
    /// What applying a file's channels, subscriptions and derived channels to a running
    /// broker would create, change, keep or refuse (what SIGHUP would do), changing nothing.
    /// Exit status 0: all of it can be applied; 1: something would be refused (listed); 2: the
    /// file is bad; 3: the broker cannot be reached.
    Diff(cli::DiffArgs),
}

#[derive(clap::Args)]
struct HealthArgs {
    /// The broker's address.
    #[arg(
        long,
        value_name = "URL",
        env = "FERRY_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    #[command(flatten)]
    credentials: cli::CredentialsArgs,
}

#[derive(clap::Args)]
struct DataDirArgs {
    /// The broker's configuration file, for its data directory.
    #[arg(short, long, value_name = "FILE", env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// The data directory (instead of the configured one).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// A TOML configuration file (see `ferry config`); without it the built-in default is used.
    #[arg(short, long, value_name = "FILE", env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// Listen on this address instead of the configured one (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", env = "FERRY_LISTEN",
          value_parser = ferry_server::config::parse_listen)]
    listen: Option<SocketAddr>,
    /// Serve Prometheus metrics here instead of where `[metrics]` says.
    #[arg(long, value_name = "ADDR", env = "FERRY_METRICS_LISTEN",
          value_parser = ferry_server::config::parse_listen)]
    metrics_listen: Option<SocketAddr>,
    /// Keep the store here instead of the configured data directory.
    #[arg(long, value_name = "DIR", env = "FERRY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Serve beyond loopback although nothing authenticates clients (see `[server]`
    /// allow_unauthenticated in `ferry config`).
    #[arg(long, env = "FERRY_ALLOW_UNAUTHENTICATED", value_name = "BOOL", num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    allow_unauthenticated: Option<bool>,
    /// Also declare the principal `admin`, with every right, authenticated by the token whose
    /// hash (`ferry token hash`) this is: secures a container from its environment alone.
    #[arg(long, value_name = "HASH", env = "FERRY_ADMIN_TOKEN_HASH")]
    admin_token_hash: Option<String>,
    /// More logging: -v for debug, -vv for trace. RUST_LOG, when set, decides instead.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// How log lines are written to standard error: `text` for people (coloured only on a
    /// terminal), `json` for log collectors (one object a line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "FERRY_LOG_FORMAT")]
    log_format: LogFormat,
}

/// The shape of the daemon's log lines.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line: timestamp, level, target, the event's fields and its spans.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config(ConfigArgs { action: None }) => {
            print!("{}", ferry_server::config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Config(ConfigArgs {
            action: Some(ConfigAction::Check { file }),
        }) => check_config(&file),
        Command::Config(ConfigArgs {
            action: Some(ConfigAction::Diff(args)),
        }) => args.run(),
        Command::Health(args) => health(args),
        Command::Publish(args) => args.run(),
        Command::Subscribe(args) => args.run(),
        Command::Channels(args) => args.run(),
        Command::Subscriptions(args) => args.run(),
        Command::Redrive(args) => args.run(),
        Command::Status(args) => args.run(),
        Command::Serve(args) => serve(args),
        Command::Bench(args) => bench::run(args),
        Command::Token { action } => token::run(action),
        Command::Check(args) => inspect(args, false),
        Command::Repair(args) => inspect(args, true),
    }
}

/// `ferry config check FILE`: what start-up would say of the file, before any data is read.
fn check_config(file: &std::path::Path) -> ExitCode {
    let error = |message: String| ferry_server::config::ConfigError {
        source_name: file.display().to_string(),
        message,
    };
    let checked = Config::load(file).and_then(|config| {
        config.check_exposure().map_err(error)?;
        // The TLS files it names must be there and usable together, as start-up needs them.
        if let Some(tls) = &config.server.tls {
            ferry_server::tls::Tls::load(tls).map_err(error)?;
        }
        Ok(config)
    });
    match checked {
        Ok(config) => {
            println!(
                "{}: good ({} channel(s) declared, listening on {})",
                file.display(),
                config.channels.len(),
                config.server.listen
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry: bad configuration: {e}");
            ExitCode::from(2)
        }
    }
}

/// `ferry health`: the standard gRPC health check of the whole server.
fn health(args: HealthArgs) -> ExitCode {
    let common = cli::Common {
        server: args.server,
        json: false,
        credentials: args.credentials,
    };
    cli::health(&common)
}

/// `ferry check` and `ferry repair`.
fn inspect(args: DataDirArgs, repair: bool) -> ExitCode {
    let dir = match (args.data_dir, &args.config) {
        (Some(dir), _) => dir,
        (None, Some(path)) => match Config::load(path) {
            Ok(config) => config.server.data_dir,
            Err(e) => {
                eprintln!("ferry: bad configuration: {e}");
                return ExitCode::from(2);
            }
        },
        (None, None) => Config::builtin().server.data_dir,
    };
    let (verb, outcome) = if repair {
        ("repair", ferry_store::inspect::repair(&dir))
    } else {
        ("check", ferry_store::inspect::check(&dir))
    };
    match outcome {
        Ok(report) => {
            println!("ferry {verb} {}:", dir.display());
            print!("{report}");
            if repair || report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("ferry {verb}: {}: {e}", dir.display());
            ExitCode::from(2)
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let level = match args.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        // Colours only on a terminal: a log file or a log collector gets plain text.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }

    let mut config = match &args.config {
        Some(path) => match Config::load(path) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("ferry: bad configuration: {e}");
                return ExitCode::from(2);
            }
        },
        None => Config::builtin(),
    };
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.server.data_dir = dir;
    }
    if let Some(address) = args.metrics_listen {
        config.metrics.listen = Some(address);
    }
    if let Some(allow) = args.allow_unauthenticated {
        config.server.allow_unauthenticated = allow;
    }
    // Empty counts as unset, as compose files pass an unset variable on.
    if let Some(hash) = args.admin_token_hash.as_deref().filter(|h| !h.is_empty())
        && let Err(e) = config.add_admin_token(hash)
    {
        eprintln!("ferry: bad configuration: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = config.check_exposure() {
        eprintln!("ferry: refusing to start: {e}");
        return ExitCode::from(2);
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ferry: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .map_err(|e| {
                ferry_server::ServeError::Io(std::io::Error::new(
                    e.kind(),
                    format!("cannot listen on {}: {e}", config.server.listen),
                ))
            })?;
        let shutdown = shutdown_signal().map_err(ferry_server::ServeError::Io)?;
        ferry_server::serve(config, listener, shutdown, |address| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "ferry listening on {address}");
            let _ = out.flush();
        })
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A future that resolves on SIGINT or SIGTERM. The handlers are installed when this is called,
/// not when the future is first polled, so a signal sent right after the ready line still stops
/// the broker cleanly instead of killing it.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

#[cfg(test)]
mod tests {
    /// Every subcommand's arguments are well formed (unique names among them the global
    /// ones): clap checks this only when a command is parsed, so a clash would otherwise panic
    /// at run time.
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
