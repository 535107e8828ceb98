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

use ferry_client::BrokerInfo;

use super::{Bench, millis, percentile};

/// How many 4 KiB writes, each followed by `fdatasync`, the disk probe makes: enough that
/// its p99 is the tenth slowest, not the second (this disk's tail shows in 1-3 % of syncs,
/// which 200 often missed), for a quarter to half a second of probing.
const PROBE_SYNCS: usize = 1000;

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

/// What the broker had done before a scenario: its commit counters and its device syncs'
/// latency histogram (cumulative counts per bucket bound, in seconds).
pub(super) struct Snapshot {
    info: Option<BrokerInfo>,
    syncs: Option<Vec<(f64, u64)>>,
}

/// The broker's counters and sync histogram, as far as it answers.
pub(super) async fn snapshot(bench: &Bench<'_>) -> Snapshot {
    let syncs = match bench.metrics {
        Some(address) => sync_histogram(address).await,
        None => None,
    };
    Snapshot {
        info: bench.client.broker().await.ok(),
        syncs,
    }
}

/// Prints what the commits since `before` cost and carried, and how long their device syncs
/// took: a latency tail is most often the disk's.
pub(super) async fn print_commits(bench: &Bench<'_>, before: Snapshot) {
    let after = snapshot(bench).await;
    let (Some(was), Some(now)) = (&before.info, &after.info) else {
        return;
    };
    let commits = now.commits.saturating_sub(was.commits);
    if commits == 0 {
        return;
    }
    let per = |n: u64| n as f64 / commits as f64;
    println!(
        "{:<32}  {commits} commits: {:.2} device syncs, {:.1} messages and {:.1} ack states each",
        "",
        per(now.device_syncs.saturating_sub(was.device_syncs)),
        per(now.messages_written.saturating_sub(was.messages_written)),
        per(now
            .ack_states_written
            .saturating_sub(was.ack_states_written)),
    );
    if let (Some(was), Some(now)) = (&before.syncs, &after.syncs)
        && let Some(line) = sync_line(was, now)
    {
        println!("{:<32}  {line}", "");
    }
}

/// The syncs between two histograms: their p50 and p99 bucket bounds and the slowest's bucket.
fn sync_line(was: &[(f64, u64)], now: &[(f64, u64)]) -> Option<String> {
    let delta: Vec<(f64, u64)> = now
        .iter()
        .map(|&(bound, count)| {
            let earlier = was.iter().find(|(b, _)| *b == bound).map_or(0, |&(_, c)| c);
            (bound, count.saturating_sub(earlier))
        })
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let at = |q: f64| {
        let wanted = (q * total as f64).ceil() as u64;
        delta.iter().find(|&&(_, n)| n >= wanted).map(|&(b, _)| b)
    };
    let ms = |seconds: f64| match seconds.is_finite() {
        true => format!("{:.1} ms", seconds * 1000.0),
        false => "more".to_owned(),
    };
    let slowest = delta.iter().position(|&(_, n)| n == total)?;
    let above = match slowest {
        0 => "0 ms".to_owned(),
        i => ms(delta[i - 1].0),
    };
    // Stalls: syncs past the first bound from 10 ms on.
    let (stall, within) = *delta.iter().find(|(b, _)| *b >= 0.01)?;
    Some(format!(
        "their fdatasyncs: p50 <= {}, p99 <= {}, slowest {above} to {} ({} over {})",
        ms(at(0.5)?),
        ms(at(0.99)?),
        ms(delta[slowest].0),
        total - within,
        ms(stall),
    ))
}

/// The broker's `ferry_sync_latency_seconds` buckets, read from its metrics endpoint.
async fn sync_histogram(address: std::net::SocketAddr) -> Option<Vec<(f64, u64)>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request =
            format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await.ok()?;
        Some(text)
    };
    let text = tokio::time::timeout(std::time::Duration::from_secs(5), read)
        .await
        .ok()??;
    let buckets: Vec<(f64, u64)> = text
        .lines()
        .filter_map(|line| line.strip_prefix("ferry_sync_latency_seconds_bucket{le=\""))
        .filter_map(|rest| {
            let (bound, count) = rest.split_once("\"} ")?;
            let bound = match bound {
                "+Inf" => f64::INFINITY,
                b => b.parse().ok()?,
            };
            Some((bound, count.trim().parse().ok()?))
        })
        .collect();
    (!buckets.is_empty()).then_some(buckets)
}

#[cfg(test)]
mod tests {
    use super::sync_line;

    #[test]
    fn the_syncs_of_a_scenario_are_read_between_two_histograms() {
        let was = [
            (0.0002, 10),
            (0.0004, 10),
            (0.0128, 10),
            (0.2048, 10),
            (f64::INFINITY, 10),
        ];
        let now = [
            (0.0002, 60),
            (0.0004, 108),
            (0.0128, 109),
            (0.2048, 110),
            (f64::INFINITY, 110),
        ];
        let line = sync_line(&was, &now).unwrap();
        assert_eq!(
            line,
            "their fdatasyncs: p50 <= 0.2 ms, p99 <= 12.8 ms, slowest 12.8 ms to 204.8 ms (1 over 12.8 ms)"
        );
        assert_eq!(sync_line(&now, &now), None);
    }
}
