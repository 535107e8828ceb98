//! The Docker image, for real: a Debian bookworm base made locally (debootstrap from Debian's
//! packages, then `docker import`: no registry is needed), the runtime image built from the
//! `ferry` binary cargo built (`docker/Dockerfile.prebuilt`), a container that is healthy as
//! seen from the host and from Docker's own HEALTHCHECK, publishing and consuming through the
//! published port, the data surviving a restart on its volume, `docker stop` ending it cleanly
//! within the grace period, and the compose file brought up.
//!
//! Without a Docker engine (or without root for debootstrap) the test says it was skipped and
//! passes: it cannot run there, and nothing it checks is checked elsewhere less for it.

use std::process::Command;
use std::time::{Duration, Instant};

use ferry_client::{Client, Message, Start, SubscriptionOptions};

/// The locally made base image.
const BASE: &str = "ferry-base:bookworm";
/// The image under test.
const IMAGE: &str = "ferry:test-docker";

/// Runs a command; its standard output, or what went wrong.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    match output.status.success() {
        true => Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned()),
        false => Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )),
    }
}

fn docker(args: &[&str]) -> String {
    run("docker", args).unwrap_or_else(|e| panic!("{e}"))
}

/// Why the test cannot run here, if it cannot.
fn cannot_run() -> Option<String> {
    if let Err(e) = run("docker", &["info", "--format", "{{.ServerVersion}}"]) {
        return Some(format!("no Docker engine ({e})"));
    }
    let has_base = run("docker", &["image", "inspect", BASE]).is_ok();
    let root = run("id", &["-u"]).is_ok_and(|uid| uid == "0");
    if !has_base && !root {
        return Some(format!("no {BASE} image and not root to debootstrap one"));
    }
    None
}

/// Makes the base image from Debian's packages, unless the engine has it already.
fn make_base() {
    if run("docker", &["image", "inspect", BASE]).is_ok() {
        return;
    }
    if run("which", &["debootstrap"]).is_err() {
        let installed = run(
            "apt-get",
            &["install", "-y", "--no-install-recommends", "debootstrap"],
        );
        installed.unwrap_or_else(|e| panic!("cannot install debootstrap: {e}"));
    }
    let mirror = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .ok()
        .and_then(|sources| {
            let line = sources.lines().find(|l| l.starts_with("URIs:"))?;
            Some(line.trim_start_matches("URIs:").trim().to_owned())
        })
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned());
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("rootfs");
    let dir = dir.to_str().unwrap();
    run(
        "debootstrap",
        &["--variant=minbase", "bookworm", dir, &mirror],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // What a slim image leaves out.
    for path in [
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "var/cache/apt",
        "var/lib/apt/lists",
    ] {
        let _ = std::fs::remove_dir_all(format!("{dir}/{path}"));
    }
    let import = format!("tar -C {dir} -c . | docker import - {BASE}");
    run("sh", &["-c", &import]).unwrap_or_else(|e| panic!("{e}"));
}

/// Builds the runtime image from the binary cargo built for the tests.
fn build_image() {
    let context = tempfile::tempdir().unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_ferry"), context.path().join("ferry")).unwrap();
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let config = format!("{repo}/docker/ferry.toml");
    std::fs::copy(config, context.path().join("ferry.toml")).unwrap();
    let dockerfile = format!("{repo}/docker/Dockerfile.prebuilt");
    let base = format!("BASE={BASE}");
    let context = context.path().to_str().unwrap();
    docker(&[
        "build",
        "-q",
        "-f",
        &dockerfile,
        "--build-arg",
        &base,
        "-t",
        IMAGE,
        context,
    ]);
}

/// Removes what the test made, however it ends.
struct Cleanup {
    container: String,
    volume: String,
    compose: Option<Vec<String>>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = run("docker", &["rm", "-f", &self.container]);
        let _ = run("docker", &["volume", "rm", "-f", &self.volume]);
        if let Some(args) = &self.compose {
            let mut down: Vec<&str> = args.iter().map(String::as_str).collect();
            down.extend(["down", "-v"]);
            let _ = run("docker-compose", &down);
        }
    }
}

/// Waits until `ferry health` from the host says the broker at `url` serves.
fn await_health(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["health", "--server", url])
            .output()
            .unwrap()
            .status;
        if status.success() {
            return;
        }
        assert!(Instant::now() < deadline, "{url} never became healthy");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until Docker's own HEALTHCHECK (`ferry health` inside) says `healthy`.
fn await_docker_health(container: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = docker(&["inspect", "-f", "{{.State.Health.Status}}", container]);
        if status == "healthy" {
            return;
        }
        assert!(Instant::now() < deadline, "HEALTHCHECK says {status}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs a docker command on a blocking thread.
async fn in_background(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args)
    })
    .await
    .unwrap()
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn the_image_serves_keeps_its_data_stops_cleanly_and_composes() {
    if let Some(why) = cannot_run() {
        eprintln!("SKIPPED: the Docker image test cannot run here: {why}");
        return;
    }
    make_base();
    build_image();
    let name = format!("ferry-test-{}", std::process::id());
    let mut cleanup = Cleanup {
        container: name.clone(),
        volume: name.clone(),
        compose: None,
    };
    let volume = format!("{name}:/var/lib/ferry");
    // Secured from the environment alone: a principal with every right, by its token's hash.
    let token = ferry_server::auth::token::generate().unwrap();
    let secured = format!(
        "FERRY_ADMIN_TOKEN_HASH={}",
        ferry_server::auth::token::hash(&token)
    );
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "-e",
        &secured,
        "-p",
        "127.0.0.1::50051",
        "-v",
        &volume,
        IMAGE,
    ]);
    let published = docker(&["port", &name, "50051/tcp"]);
    let address = published.lines().next().unwrap().to_owned();
    assert!(address.starts_with("127.0.0.1:"), "{address}");
    let url = format!("http://{address}");
    await_health(&url);

    // Without the token nothing gets in (health stays open for probes, as above).
    let stranger = Client::connect(url.clone()).await.unwrap();
    let refused = stranger.channels().await.unwrap_err();
    assert_eq!(refused.code(), Some(ferry_client::Code::Unauthenticated));

    // Publish and consume through the published port; one message stays unacked.
    let client = Client::connect(url.clone()).await.unwrap();
    let client = client.with_token(&token).unwrap();
    client.create_channel("orders").await.unwrap();
    let options = SubscriptionOptions {
        start: Start::Earliest,
        ..SubscriptionOptions::default()
    };
    client
        .create_subscription("orders", "billing", options)
        .await
        .unwrap();
    let messages = vec![Message::new("first"), Message::new("second")];
    client.publish("orders", messages).await.unwrap();
    let mut deliveries = client.subscribe("orders", "billing");
    let first = deliveries.next().await.unwrap().unwrap();
    assert_eq!(&first.payload[..], b"first");
    first.ack().await.unwrap();
    drop(deliveries);
    await_docker_health(&name);

    // Restarted, it finds its data on the volume: the unacked message comes again. (Docker
    // commands that stop the broker run off the runtime, so that the test's own client can
    // answer the broker's goodbye meanwhile, as a client process would.)
    in_background(&["restart", "-t", "10", &name]).await;
    let published = docker(&["port", &name, "50051/tcp"]);
    let url = format!("http://{}", published.lines().next().unwrap());
    await_health(&url);
    let client = Client::connect(url.clone()).await.unwrap();
    let client = client.with_token(&token).unwrap();
    let mut deliveries = client.subscribe("orders", "billing");
    let again = tokio::time::timeout(Duration::from_secs(10), deliveries.next()).await;
    let again = again.unwrap().unwrap().unwrap();
    assert_eq!((&again.payload[..], again.sequence), (&b"second"[..], 2));
    again.ack().await.unwrap();
    drop(deliveries);

    // docker stop: SIGTERM, a clean exit well within the grace period.
    let stopping = Instant::now();
    in_background(&["stop", "-t", "10", &name]).await;
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(8), "docker stop took {took:?}");
    let code = docker(&["inspect", "-f", "{{.State.ExitCode}}", &name]);
    assert_eq!(code, "0", "ferry exits 0 on SIGTERM");

    // The compose file, with the image built above and a free loopback port.
    let port = free_port().to_string();
    let project = name.replace('-', "");
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docker/compose.yaml");
    let args: Vec<String> = ["-p", &project, "-f", file].map(str::to_owned).into();
    cleanup.compose = Some(args.clone());
    let mut up: Vec<&str> = args.iter().map(String::as_str).collect();
    up.extend(["up", "-d", "--no-build"]);
    let compose = Command::new("docker-compose")
        .args(&up)
        .env("FERRY_IMAGE", IMAGE)
        .env("FERRY_PORT", &port)
        .output()
        .unwrap();
    assert!(
        compose.status.success(),
        "{}",
        String::from_utf8_lossy(&compose.stderr)
    );
    await_health(&format!("http://127.0.0.1:{port}"));
    drop(cleanup);
}
