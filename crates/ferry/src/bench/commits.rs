//! The context a durable figure needs: how fast the disk itself syncs, and what each of the
//! broker's group commits cost and carried.
//!
//! The disk under a 2-core VM is shared and its speed changes from hour to hour, so a
//! throughput figure alone says little. The bench therefore measures the disk's own
//! `fdatasync` latency on the broker's data directory, in the same run, and reads the broker's
//! commit counters (`Admin.GetBroker`) around each scenario to report device syncs and
//! messages per commit beside its figure.

use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use ferry_client::{BrokerInfo, Client};

use super::{millis, percentile};

/// How many 4 KiB writes, each followed by `fdatasync`, the disk probe makes.
const PROBE_SYNCS: usize = 200;

/// The disk's own `fdatasync` latency on `dir`: p50 and p99 in nanoseconds, over 4 KiB
/// appends each followed by `fdatasync`, in a file removed afterwards.
pub(super) fn disk_sync_latency(dir: &Path) -> std::io::Result<(u64, u64)> {
    let path = dir.join(format!("bench-sync-probe-{}", std::process::id()));
    let outcome = (|| {
        let mut file = std::fs::File::create(&path)?;
        let block = [0x5Au8; 4096];
        let mut samples = Vec::with_capacity(PROBE_SYNCS);
        for _ in 0..PROBE_SYNCS {
            let started = Instant::now();
            file.write_all(&block)?;
            file.sync_data()?;
            samples.push(started.elapsed().as_nanos() as u64);
        }
        samples.sort_unstable();
        Ok((
            percentile(&samples, 0.5).unwrap_or(0),
            percentile(&samples, 0.99).unwrap_or(0),
        ))
    })();
    let _ = std::fs::remove_file(&path);
    outcome
}

/// Prints the disk's sync latency, or why it was not measured.
pub(super) fn print_disk(label: &str, dir: Option<&Path>) {
    let line = match dir.map(disk_sync_latency) {
        Some(Ok((p50, p99))) => format!(
            "p50 {}  p99 {}  (4 KiB write + fdatasync on the data directory, {PROBE_SYNCS} times)",
            millis(p50),
            millis(p99)
        ),
        Some(Err(e)) => format!("not measured: {e}"),
        None => "not measured: the broker is not the bench's own".to_owned(),
    };
    println!("{label:<32}: {line}");
}

/// The broker's counters, if it answers.
pub(super) async fn snapshot(client: &Client) -> Option<BrokerInfo> {
    client.broker().await.ok()
}

/// Prints what the commits since `before` cost and carried.
pub(super) async fn print_commits(client: &Client, before: Option<BrokerInfo>) {
    let (Some(before), Some(after)) = (before, snapshot(client).await) else {
        return;
    };
    let commits = after.commits.saturating_sub(before.commits);
    if commits == 0 {
        return;
    }
    let per = |n: u64| n as f64 / commits as f64;
    println!(
        "{:<32}  {commits} commits: {:.2} device syncs, {:.1} messages and {:.1} ack states each",
        "",
        per(after.device_syncs.saturating_sub(before.device_syncs)),
        per(after
            .messages_written
            .saturating_sub(before.messages_written)),
        per(after
            .ack_states_written
            .saturating_sub(before.ack_states_written)),
    );
}
