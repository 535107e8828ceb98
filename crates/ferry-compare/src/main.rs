//! `ferry-compare`: the workloads of `ferry bench` run against NATS JetStream, so that figures
//! for both brokers come from one machine in one session.
//!
//! It starts `nats-server -js` itself (from PATH, e.g. Debian's `nats-server` package) on a
//! free loopback port with a file store in a temporary directory, and measures, like
//! `ferry bench`: one publisher of 1 KiB messages with 256 awaiting confirmation; draining a
//! backlog with one consumer whose window (max ack pending) is 256, acking every message; and
//! publish-to-receive latency at a steady 5,000 msgs/s. The disk's own `fdatasync` latency on
//! the store's directory is printed beside them, as `ferry bench` does.
//!
//! Usage: `ferry-compare [MESSAGES] [LATENCY_SECONDS]` (default 500000 and 10).

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// 1 KiB payloads, as in `ferry bench`.
const PAYLOAD: usize = 1024;
/// Publishes awaiting confirmation.
const IN_FLIGHT: usize = 256;
/// The consumer's window.
const WINDOW: i64 = 256;
/// The paced rate of the latency run.
const RATE: u64 = 5_000;
/// No run goes on longer than this.
const MAX_RUN: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let messages: usize = args.next().map_or(Ok(500_000), |a| a.parse())?;
    let latency_seconds: u64 = args.next().map_or(Ok(10), |a| a.parse())?;
    let store = tempfile::tempdir()?;
    let port = free_port()?;
    let mut server = tokio::process::Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start nats-server (install Debian's nats-server): {e}"))?;
    let url = format!("nats://127.0.0.1:{port}");
    let client = connect(&url).await?;
    let js = jetstream::new(client.clone());
    println!("ferry-compare: NATS JetStream (nats-server on {url}, file store)");
    print_disk("disk     fdatasync at the start", store.path());

    let rate = publish(&js, "PUB", messages).await?;
    println!("publish  1KiB  c=1   batch=1    : {rate:>9.0} msgs/s");
    publish(&js, "DRAIN", messages).await?;
    let rate = consume(&js, "DRAIN", messages).await?;
    println!("consume  1KiB  window=256       : {rate:>9.0} msgs/s");
    let (p50, p99) = latency(&js, latency_seconds).await?;
    println!(
        "latency  1KiB  rate=5,000/s     : p50 {:.2} ms  p99 {:.2} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    print_disk("disk     fdatasync at the end  ", store.path());
    server.kill().await?;
    Ok(())
}

async fn connect(url: &str) -> Result<async_nats::Client, Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match async_nats::connect(url).await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn create_stream(js: &jetstream::Context, name: &str) -> Result<stream::Stream, Error> {
    Ok(js
        .create_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec![format!("{name}.msgs")],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?)
}

/// One publisher, `IN_FLIGHT` awaiting confirmation; returns msgs/s.
async fn publish(js: &jetstream::Context, name: &str, messages: usize) -> Result<f64, Error> {
    create_stream(js, name).await?;
    let subject = format!("{name}.msgs");
    let payload = Bytes::from(vec![0x5Au8; PAYLOAD]);
    let started = Instant::now();
    let mut waiting = VecDeque::with_capacity(IN_FLIGHT);
    for _ in 0..messages {
        if waiting.len() == IN_FLIGHT {
            let ack: jetstream::context::PublishAckFuture = waiting.pop_front().expect("not empty");
            ack.await?;
        }
        waiting.push_back(js.publish(subject.clone(), payload.clone()).await?);
        if started.elapsed() > MAX_RUN {
            return Err("publishing took longer than a minute".into());
        }
    }
    for ack in waiting {
        ack.await?;
    }
    Ok(messages as f64 / started.elapsed().as_secs_f64())
}

/// Drains `messages` with one durable pull consumer, window `WINDOW`, acking each message;
/// returns msgs/s.
async fn consume(js: &jetstream::Context, name: &str, messages: usize) -> Result<f64, Error> {
    let stream = js.get_stream(name).await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("drain".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: WINDOW,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut deliveries = consumer.messages().await?;
    let mut seen = 0;
    while seen < messages {
        let Some(message) = deliveries.next().await else {
            return Err("the consumer stopped".into());
        };
        message?.ack().await?;
        seen += 1;
        if started.elapsed() > MAX_RUN {
            return Err("draining took longer than a minute".into());
        }
    }
    Ok(messages as f64 / started.elapsed().as_secs_f64())
}

/// Publishes at `RATE` for `seconds` while one consumer receives and acks; returns the p50 and
/// p99 of publish-to-receive.
async fn latency(js: &jetstream::Context, seconds: u64) -> Result<(Duration, Duration), Error> {
    let stream = create_stream(js, "LATENCY").await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("latency".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 1000,
            ..Default::default()
        })
        .await?;
    let epoch = Instant::now();
    let total = RATE * seconds;
    let receiver = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(total as usize);
        let mut deliveries = consumer.messages().await?;
        while (samples.len() as u64) < total {
            let Ok(Some(message)) =
                tokio::time::timeout(Duration::from_secs(5), deliveries.next()).await
            else {
                break;
            };
            let message = message?;
            let sent = u64::from_le_bytes(message.payload[..8].try_into()?);
            samples.push(epoch.elapsed().as_nanos() as u64 - sent);
            message.ack().await?;
        }
        Ok::<_, Error>(samples)
    });
    let mut ticks = tokio::time::interval(Duration::from_nanos(1_000_000_000 / RATE));
    let mut acks = VecDeque::new();
    for _ in 0..total {
        ticks.tick().await;
        let mut payload = vec![0u8; PAYLOAD];
        payload[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
        acks.push_back(js.publish("LATENCY.msgs", payload.into()).await?);
        while acks.len() > IN_FLIGHT {
            let ack: jetstream::context::PublishAckFuture = acks.pop_front().expect("not empty");
            ack.await?;
        }
    }
    for ack in acks {
        ack.await?;
    }
    let mut samples = receiver.await??;
    samples.sort_unstable();
    let at = |q: f64| {
        Duration::from_nanos(samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)])
    };
    Ok((at(0.5), at(0.99)))
}

/// Prints the disk's own `fdatasync` latency on `dir` (200 appends of 4 KiB, each synced).
fn print_disk(label: &str, dir: &Path) {
    let path = dir.join("sync-probe");
    let probe = || -> std::io::Result<(Duration, Duration)> {
        let mut file = std::fs::File::create(&path)?;
        let mut samples = Vec::with_capacity(200);
        for _ in 0..200 {
            let started = Instant::now();
            file.write_all(&[0x5A; 4096])?;
            file.sync_data()?;
            samples.push(started.elapsed());
        }
        samples.sort_unstable();
        Ok((samples[100], samples[198]))
    };
    match probe() {
        Ok((p50, p99)) => println!(
            "{label} : p50 {:.2} ms  p99 {:.2} ms  (4 KiB write + fdatasync, 200 times)",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        ),
        Err(e) => println!("{label} : not measured: {e}"),
    }
    let _ = std::fs::remove_file(&path);
}
