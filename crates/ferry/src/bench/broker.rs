//! The broker a benchmark runs against: a private one (this executable running `ferry serve`
//! on a throw-away directory, restartable, killed and cleaned up on every way out) or an
//! existing one on loopback, and what the bench reads of its process (disk use, memory).

use super::*;

/// Checks that `addr` names a broker on this machine and returns it as an `http://` URL. The
/// bench generates heavy load, so it must never be pointed at another host by mistake.
pub(super) fn loopback_url(addr: &str) -> Result<String> {
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
pub(super) struct BrokerChild {
    // Declared before `home` so that it is dropped first: the process dies before its directory
    // is removed from under it.
    pub(super) process: BrokerProcess,
    pub(super) home: BrokerHome,
    /// The process running now replaced the first one (the backlog scenario's restart).
    pub(super) restarted: bool,
}

impl BrokerChild {
    /// Starts a broker on a new temporary directory, on a free loopback port.
    pub(super) async fn start(config: Option<&Path>) -> Result<Self> {
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
    pub(super) async fn restart(&mut self) -> Result<Duration> {
        self.process.stop().await?;
        let address = self.process.address.clone();
        self.process = self.home.spawn(&address).await?;
        self.restarted = true;
        Ok(self.process.startup)
    }

    /// What the store's files take on disk, in bytes.
    pub(super) fn data_size(&self) -> std::io::Result<u64> {
        disk_usage(&self.home.data_dir())
    }

    /// The memory of the process running now (a restart starts its peak afresh).
    pub(super) fn memory(&self) -> Result<Memory, String> {
        self.process.memory()
    }

    /// Stops the broker (see [`BrokerProcess::stop`]); the directory goes when `self` does.
    pub(super) async fn stop(mut self) -> Result<()> {
        self.process.stop().await
    }
}

/// Where the private broker lives and how it is started: a temporary directory holding its data
/// and its log, which outlives the processes run on it and is removed when this is dropped.
pub(super) struct BrokerHome {
    /// Holds `data/` and `broker.log`.
    pub(super) dir: tempfile::TempDir,
    /// This executable, which also serves.
    pub(super) exe: PathBuf,
    /// The `--config` file given to the bench, passed on to every process.
    pub(super) config: Option<PathBuf>,
    /// Where every process serves its metrics, read for the device syncs of each scenario.
    pub(super) metrics: std::net::SocketAddr,
}

impl BrokerHome {
    /// A new, empty home whose broker runs on `config` (the built-in default if none).
    pub(super) fn create(config: Option<&Path>) -> Result<Self> {
        let exe = std::env::current_exe()
            .map_err(|e| BenchError::caused("cannot find the ferry executable", &e))?;
        let dir = tempfile::Builder::new()
            .prefix("ferry-bench-")
            .tempdir()
            .map_err(|e| BenchError::caused("cannot create a temporary directory", &e))?;
        // A free loopback port now; the broker binds it a moment later.
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|probe| probe.local_addr())
            .map_err(|e| BenchError::caused("cannot find a free port for metrics", &e))?;
        Ok(Self {
            dir,
            exe,
            config: config.map(Path::to_path_buf),
            metrics,
        })
    }

    /// The store's directory, given to every process as `--data-dir`.
    pub(super) fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts `ferry serve` on this home's data directory, listening on `listen`, and waits
    /// until it says it is ready.
    pub(super) async fn spawn(&self, listen: &str) -> Result<BrokerProcess> {
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
            .arg(self.data_dir())
            .arg("--metrics-listen")
            .arg(self.metrics.to_string());
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
pub(super) struct BrokerProcess {
    pub(super) process: tokio::process::Child,
    pub(super) pid: u32,
    /// Where it listens, as it printed it.
    pub(super) address: String,
    /// Its log file, quoted when it fails.
    pub(super) log: PathBuf,
    /// From spawning the process to its `ferry listening on` line.
    pub(super) startup: Duration,
}

impl BrokerProcess {
    /// The broker's resident memory now and at its peak, from `/proc/PID/status`.
    pub(super) fn memory(&self) -> Result<Memory, String> {
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
    pub(super) async fn stop(&mut self) -> Result<()> {
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
pub(super) fn log_tail(path: &Path) -> String {
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
pub(super) fn disk_usage(dir: &Path) -> std::io::Result<u64> {
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
pub(super) struct Memory {
    pub(super) peak_kib: u64,
    pub(super) now_kib: u64,
}

/// The final memory report. `restarted` says the process measured is the one the backlog
/// scenario started, whose peak does not cover the scenarios before it.
pub(super) fn print_memory(memory: Result<Memory, String>, restarted: bool) {
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
