//! The client commands of the `ferry` binary: publish, subscribe, administer and look at a
//! running broker, through `ferry-client`.
//!
//! Every command takes `--server` (or `FERRY_SERVER`) and prints human tables by default,
//! `--json` for scripts. Exit codes scripts can trust: 0 done, 1 the broker refused (its status
//! is printed), 2 a usage error, 3 the broker could not be reached.

mod admin;
mod config;
mod json;
mod publish;
mod subscribe;

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferry_client::{Client, Error};

pub use admin::{ChannelsArgs, RedriveArgs, StatusArgs, SubscriptionsArgs};
pub use config::DiffArgs;
pub use publish::PublishArgs;
pub use subscribe::SubscribeArgs;

/// What every client command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// The broker's address (beats FERRY_SERVER).
    #[arg(
        long,
        value_name = "URL",
        env = "FERRY_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    /// Print JSON for scripts: one document, or one object per line for a stream.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub credentials: CredentialsArgs,
}

/// How to reach a broker that serves TLS, and what to prove to one that declares principals.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CredentialsArgs {
    /// Present this bearer token (for a broker that declares principals). Prefer FERRY_TOKEN:
    /// a command line can be read by other users of the machine.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "FERRY_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// Connect over TLS, checking the broker's certificate against these PEM CA certificates.
    #[arg(long, value_name = "FILE", env = "FERRY_TLS_CA", global = true)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// For a broker that requires client certificates: this PEM certificate...
    #[arg(
        long,
        value_name = "FILE",
        env = "FERRY_TLS_CERT",
        global = true,
        requires_all = ["tls_key", "tls_ca"]
    )]
    pub tls_cert: Option<std::path::PathBuf>,
    /// ...and its PEM key.
    #[arg(
        long,
        value_name = "FILE",
        env = "FERRY_TLS_KEY",
        global = true,
        requires = "tls_cert"
    )]
    pub tls_key: Option<std::path::PathBuf>,
}

impl CredentialsArgs {
    /// The TLS settings, if a CA was given.
    pub fn load(&self) -> Result<Option<ferry_client::Tls>, Error> {
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| Error::Invalid(format!("cannot read {}: {e}", path.display())))
        };
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        Ok(Some(ferry_client::Tls {
            ca_pem: read(ca)?,
            identity,
            domain: None,
        }))
    }
}

/// The broker refused: its status was printed.
const REFUSED: u8 = 1;
/// The broker could not be reached.
pub const UNREACHABLE: u8 = 3;

/// Runs a client command on a runtime of its own and turns its outcome into the exit code.
pub fn run<F>(common: &Common, command: impl FnOnce(Client) -> F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), Error>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ferry: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let credentials = &common.credentials;
        let client = match credentials.load()? {
            Some(tls) => Client::connect_tls(common.server.clone(), tls).await?,
            None => Client::connect(common.server.clone()).await?,
        };
        let client = match &credentials.token {
            Some(token) => client.with_token(token)?,
            None => client,
        };
        command(client).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferry: {error}");
            exit_code(&error)
        }
    }
}

/// `ferry health`: 0 while the broker serves, 1 when it answers that it does not, 3 when it
/// cannot be asked (within 5 s).
pub fn health(common: &Common) -> ExitCode {
    let server = common.server.clone();
    let mut answer = None;
    let answered = &mut answer;
    let code = run(common, |client| async move {
        let asked = tokio::time::timeout(Duration::from_secs(5), client.health()).await;
        *answered = Some(asked.map_err(|_| Error::Disconnected("no answer within 5 s".into()))??);
        Ok(())
    });
    match answer.as_deref() {
        Some("SERVING") => {
            println!("{server}: serving");
            code
        }
        Some(status) => {
            println!("{server}: {}", status.to_lowercase());
            ExitCode::from(REFUSED)
        }
        None => code,
    }
}

/// The exit code for a failure.
pub fn exit_code(error: &Error) -> ExitCode {
    match error {
        Error::Connect { .. } | Error::Disconnected(_) => ExitCode::from(UNREACHABLE),
        // Reached, but not serving (shutting down, its store failed): no use to a script
        // either way.
        Error::Refused {
            code: ferry_client::Code::Unavailable,
            ..
        } => ExitCode::from(UNREACHABLE),
        Error::Invalid(_) => ExitCode::from(2),
        _ => ExitCode::from(REFUSED),
    }
}

/// Prints a line to standard output; false once nobody reads it (a closed pipe).
fn print(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

/// Prints rows as a table with aligned columns, the first row being the header.
fn table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let last = c + 1 == row.len();
            match last {
                true => line.push_str(cell),
                false => line.push_str(&format!("{cell:<width$}  ", width = widths[c])),
            }
        }
        println!("{}", line.trim_end());
    }
}

/// A duration for people: `850ms`, `12.3s`, `4m05s`, `3h02m`.
fn human_duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", d.as_secs_f64()),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// A byte count for people: `512 B`, `1.5 KiB`, `3.2 GiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}

/// A count on standard error while a terminal shows it; nothing when it is piped.
pub struct Progress {
    what: &'static str,
    terminal: bool,
    shown: Option<Instant>,
}

impl Progress {
    /// A count of what was `what` ("published", "received").
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            terminal: std::io::stderr().is_terminal(),
            shown: None,
        }
    }

    /// Shows the count, at most five times a second.
    pub fn show(&mut self, count: u64) {
        let due = self
            .shown
            .is_none_or(|at| at.elapsed() >= Duration::from_millis(200));
        if self.terminal && due {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{} {count} message(s)...", self.what);
            let _ = err.flush();
            self.shown = Some(Instant::now());
        }
    }

    /// Takes the count off the terminal.
    pub fn clear(&self) {
        if self.terminal && self.shown.is_some() {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn durations_and_sizes_read_well() {
        assert_eq!(super::human_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(
            super::human_duration(Duration::from_millis(12_345)),
            "12.3s"
        );
        assert_eq!(super::human_duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(
            super::human_duration(Duration::from_secs(3 * 3600 + 120)),
            "3h02m"
        );
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
    }
}
