//! The backlog scenario: a big backlog stored, weighed on disk and in memory, the broker
//! restarted on it, drained from disk by one acking consumer and, with `--replay`, replayed
//! from the earliest message by a new subscription.

use std::time::Duration;

use tokio::time::{self, Instant};

use super::{
    Bench, BenchError, BrokerChild, Consumer, DELETION_SETTLE, DrainPlan, Figure, Result,
    fixed_goal, mib, print_rate, size_label, size_word, thousands,
};

/// The subscription that replays the backlog from its earliest message.
const REPLAY: &str = "replay";

/// Scenario 5: a big backlog on disk. It is stored, weighed on disk and in memory, the broker is
/// restarted on it (emptying its in-memory tail cache, so that the drain reads from disk), one
/// acking consumer drains it (and, with `--replay`, a new subscription replays it from the
/// earliest message), and what the deletions leave behind is weighed again.
pub(super) async fn backlog_scenario(
    bench: &Bench<'_>,
    mut broker: Option<&mut BrokerChild>,
) -> Result<()> {
    let args = bench.args;
    let size = args.backlog_size;
    let channel = bench
        .fresh_channel(&format!("backlog.{}", size_word(size)))
        .await?;
    keep_for_replay(bench, &channel).await?;
    let limited = |figure: Figure| Figure {
        limit: "--backlog-seconds",
        ..figure
    };

    let fill_started = Instant::now();
    let filled = bench
        .fill(
            &channel,
            args.backlog,
            size,
            fill_started + args.backlog_seconds,
        )
        .await?;
    print_rate(
        &format!("backlog  {:<5} publish", size_label(size)),
        size,
        &limited(filled.figure(fill_started, args.backlog)),
    );

    if args.delay.is_some() {
        print_delayed(bench, &channel).await?;
    }

    // Kept for the end: the first process's peak is gone once the restart stops it.
    let peak_before_restart = match broker.as_deref_mut() {
        Some(broker) => weigh_and_restart(broker).await?,
        None => {
            println!(
                "{:<32}: skipped: the broker was not started by the bench",
                "backlog  disk, memory, restart"
            );
            None
        }
    };

    let connection = bench.connect().await?;
    let started = Instant::now();
    let consumer = Consumer::attach(connection, &channel, args.window).await?;
    let drained = consumer
        .drain(DrainPlan {
            goal: fixed_goal(filled.confirmed),
            deadline: started + args.backlog_seconds,
            stamps: None,
        })
        .await?;
    print_rate(
        &format!("backlog  {:<5} drain", size_label(size)),
        size,
        &limited(drained.figure(started, filled.confirmed)),
    );

    if args.replay {
        replay(bench, &channel, filled.confirmed).await?;
    }
    time::sleep(DELETION_SETTLE).await;
    // The admin connection predates the restart; the broker came back at the same address, so
    // tonic reconnects it.
    let left = (bench.client.channel(&channel).await)
        .map_err(|e| BenchError::caused(format!("cannot describe channel {channel}"), &e))?;
    println!(
        "{:<32}: {} msgs, {} bytes  (GetChannel {} s after the drain)",
        "backlog  left in the channel",
        thousands(left.messages),
        thousands(left.bytes),
        DELETION_SETTLE.as_secs()
    );
    if let Some(broker) = broker {
        weigh_after_drain(broker, peak_before_restart);
    }
    bench.remove_channel(&channel).await;
    Ok(())
}

/// Weighs the backlog on disk and in memory, then restarts the broker on it; returns its peak
/// RSS before the restart (KiB), when it could be read.
async fn weigh_and_restart(broker: &mut BrokerChild) -> Result<Option<u64>> {
    print_data_size("backlog  data dir on disk", broker);
    let peak = match broker.memory() {
        Ok(memory) => {
            println!(
                "{:<32}: {}  (peak so far {})",
                "backlog  broker RSS (VmRSS)",
                mib(memory.now_kib * 1024),
                mib(memory.peak_kib * 1024)
            );
            Some(memory.peak_kib)
        }
        Err(e) => {
            println!("{:<32}: unavailable ({e})", "backlog  broker RSS (VmRSS)");
            None
        }
    };
    let startup = broker.restart().await?;
    let rss = match broker.memory() {
        Ok(memory) => mib(memory.now_kib * 1024),
        Err(e) => format!("unavailable ({e})"),
    };
    println!(
        "{:<32}: {:.2} s  (new pid {}, RSS when ready {rss})",
        "backlog  restart to ready",
        startup.as_secs_f64(),
        broker.process.pid
    );
    Ok(peak)
}

/// Weighs the data directory again once the backlog is drained (sled keeps the space deletions
/// free for its own reuse rather than giving it back: this is what a drained broker still
/// occupies), and prints the peak RSS before and after the restart.
fn weigh_after_drain(broker: &BrokerChild, peak_before_restart: Option<u64>) {
    print_data_size("backlog  data dir after drain", broker);
    let before =
        peak_before_restart.map_or_else(|| "unavailable".to_owned(), |kib| mib(kib * 1024));
    let after = broker.memory().map_or_else(
        |e| format!("unavailable ({e})"),
        |memory| mib(memory.peak_kib * 1024),
    );
    println!(
        "{:<32}: {before} before the restart, {after} after it",
        "backlog  broker peak RSS (VmHWM)"
    );
}

/// Prints what the private broker's data directory takes on disk.
fn print_data_size(label: &str, broker: &BrokerChild) {
    match broker.data_size() {
        Ok(bytes) => println!("{label:<32}: {}  ({} bytes)", mib(bytes), thousands(bytes)),
        Err(e) => println!("{label:<32}: unavailable ({e})"),
    }
}

/// With `--replay` the channel keeps what it was sent for a day (retention), so that a new
/// subscription can replay it; with `--ids` its de-duplication window is an hour, so that
/// every id of the backlog stays in it while it is filled and drained.
async fn keep_for_replay(bench: &Bench<'_>, channel: &str) -> Result<()> {
    let args = bench.args;
    if !(args.replay || args.ids) {
        return Ok(());
    }
    let hours = |h: u64| Duration::from_secs(h * 3600);
    let settings = ferry_client::ChannelOptions {
        retention_max_age: args.replay.then(|| hours(24)),
        dedup_window: Some(hours(if args.ids { 1 } else { 0 })),
        ..ferry_client::ChannelOptions::default()
    };
    (bench.client.update_channel(channel, settings).await)
        .map_err(|e| BenchError::caused(format!("cannot set up channel {channel}"), &e))?;
    Ok(())
}

/// Replays the drained backlog: a new subscription starting at the earliest message stored
/// reads all of it again, from disk, acking as it goes.
async fn replay(bench: &Bench<'_>, channel: &str, stored: u64) -> Result<()> {
    let args = bench.args;
    let options = ferry_client::SubscriptionOptions {
        start: ferry_client::Start::Earliest,
        ..ferry_client::SubscriptionOptions::default()
    };
    (bench
        .client
        .create_subscription(channel, REPLAY, options)
        .await)
        .map_err(|e| BenchError::caused(format!("cannot create {REPLAY} on {channel}"), &e))?;
    let started = Instant::now();
    let consumer =
        Consumer::attach_to(bench.connect().await?, channel, REPLAY, args.window).await?;
    let replayed = consumer
        .drain(DrainPlan {
            goal: fixed_goal(stored),
            deadline: started + args.backlog_seconds,
            stamps: None,
        })
        .await?;
    print_rate(
        &format!("backlog  {:<5} replay", size_label(args.backlog_size)),
        args.backlog_size,
        &Figure {
            limit: "--backlog-seconds",
            ..replayed.figure(started, stored)
        },
    );
    Ok(())
}

/// How many of the backlog's messages wait aside for their delivery time.
async fn print_delayed(bench: &Bench<'_>, channel: &str) -> Result<()> {
    let info = (bench.client.channel(channel).await)
        .map_err(|e| BenchError::caused(format!("cannot describe channel {channel}"), &e))?;
    println!(
        "{:<32}: {} msgs, {}  (stored aside until due; {} msgs in the channel)",
        "backlog  delayed",
        thousands(info.delayed),
        mib(info.delayed_bytes),
        thousands(info.messages)
    );
    Ok(())
}
