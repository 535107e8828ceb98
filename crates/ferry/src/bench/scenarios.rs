//! The scenarios: publish throughput, draining a backlog with acks, publishing and consuming
//! at once, and end-to-end latency at a fixed rate, each built from the load loops in
//! [`load`] and reported through [`report`].

use super::*;

/// Scenario 1: `publishers` concurrent publishers fill a channel nobody consumes.
pub(super) async fn publish_scenario(
    bench: &Bench<'_>,
    size: usize,
    publishers: u32,
) -> Result<()> {
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
    let before = commits::snapshot(bench).await;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (index, connection) in (0..).zip(connections) {
        let limit = share(args.messages, publishers, index);
        if limit == 0 {
            continue;
        }
        tasks.spawn(publish(
            connection,
            bench.publish_plan(&channel, limit, bench.deadline(started), payload.clone()),
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
    commits::print_commits(bench, before).await;
    bench.remove_channel(&channel).await;
    Ok(())
}

/// Scenario 2: a backlog, published untimed, drained by one consumer acking every batch.
pub(super) async fn consume_scenario(bench: &Bench<'_>, size: usize) -> Result<()> {
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
    let before = commits::snapshot(bench).await;
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
    commits::print_commits(bench, before).await;
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
pub(super) async fn mixed_scenario(bench: &Bench<'_>) -> Result<()> {
    let args = bench.args;
    let channel = bench.fresh_channel("mixed.1k").await?;
    let publisher_connection = bench.connect().await?;
    let consumer = Consumer::attach(bench.connect().await?, &channel, args.window).await?;
    let before = commits::snapshot(bench).await;
    let started = Instant::now();
    let payload = Payload::Fixed(Bytes::from(vec![b'x'; KIB]));
    let plan = bench.publish_plan(&channel, args.messages, bench.deadline(started), payload);
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
    commits::print_commits(bench, before).await;
    bench.remove_channel(&channel).await;
    Ok(())
}

/// Scenario 4: end-to-end latency of 1 KiB messages published at a steady rate.
pub(super) async fn latency_scenario(bench: &Bench<'_>) -> Result<()> {
    let args = bench.args;
    let channel = bench.fresh_channel("latency.1k").await?;
    let publisher_connection = bench.connect().await?;
    // Attached before publishing starts, so that no message waits for the consumer to arrive.
    let consumer = Consumer::attach(bench.connect().await?, &channel, LATENCY_WINDOW).await?;
    let limit = ((args.rate as f64 * args.latency_seconds.as_secs_f64()).ceil() as u64).max(1);
    let before = commits::snapshot(bench).await;
    // Publisher and consumer stamp and read times against one base, so their clocks agree.
    let base = Instant::now();
    let deadline = base + args.latency_seconds;
    let plan = PublishPlan {
        // One message per request: a latency figure for batches would measure the batching.
        batch: 1,
        rate: Some(args.rate),
        ..bench.publish_plan(
            &channel,
            limit,
            deadline,
            Payload::Stamped { size: KIB, base },
        )
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
    commits::print_commits(bench, before).await;
    bench.remove_channel(&channel).await;
    Ok(())
}

/// Runs a publisher and an attached consumer concurrently, on their own tasks. The consumer's
/// goal starts at `expected` and becomes what the publisher got confirmed once it is done, so
/// that a publisher stopped by its time limit does not leave the consumer waiting for more.
pub(super) async fn publish_and_consume(
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
