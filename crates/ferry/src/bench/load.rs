//! The load loops every scenario shares: publishers (paced or flat out, each message stamped
//! for latency when asked) and consumers (draining to a goal, acking what they receive), each a
//! task that is aborted when the other half of its scenario fails.

use super::*;

/// A spawned half of a scenario. Dropping it aborts the task, so that when one half fails the
/// other does not go on loading the broker.
pub(super) struct Worker<T>(JoinHandle<Result<T>>);

impl<T: Send + 'static> Worker<T> {
    pub(super) fn spawn(work: impl Future<Output = Result<T>> + Send + 'static) -> Self {
        Self(tokio::spawn(work))
    }

    pub(super) async fn join(&mut self) -> Result<T> {
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
pub(super) enum Payload {
    /// The same bytes every time: cloning `Bytes` shares them, so the bench itself stays cheap.
    Fixed(Bytes),
    /// `size` bytes starting with the send time, in nanoseconds since `base`.
    Stamped { size: usize, base: Instant },
}

impl Payload {
    pub(super) fn next(&self) -> Bytes {
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

pub(super) fn nanos_since(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

pub(super) fn read_stamp(payload: &[u8]) -> Option<u64> {
    let stamp = payload.get(..STAMP_BYTES)?;
    Some(u64::from_le_bytes(stamp.try_into().ok()?))
}

/// What one publisher sends and when it stops.
pub(super) struct PublishPlan {
    pub(super) channel: String,
    /// Stop after this many messages…
    pub(super) limit: u64,
    /// …or at this time, whichever comes first.
    pub(super) deadline: Instant,
    /// Messages per request.
    pub(super) batch: u32,
    /// Messages sent and not yet confirmed, at most.
    pub(super) in_flight: u32,
    /// Messages per second; `None` publishes as fast as confirmations allow.
    pub(super) rate: Option<u64>,
    pub(super) payload: Payload,
    /// Ordering keys given in turn (0: none).
    pub(super) keys: u32,
    /// Give every message a unique id (what de-duplication costs).
    pub(super) ids: bool,
    /// Delay every message by this long (delayed delivery).
    pub(super) delay: Option<Duration>,
    /// Give the messages an attribute `n` of 0 to 9 in turn (what `--filter` keeps one of).
    pub(super) tag: bool,
}

/// What one publisher got confirmed.
pub(super) struct Published {
    pub(super) confirmed: u64,
    /// When the last confirmation arrived.
    pub(super) finished: Instant,
    /// Sending stopped at the deadline rather than the message limit.
    pub(super) timed_out: bool,
}

impl Published {
    pub(super) fn figure(&self, started: Instant, target: u64) -> Figure {
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
pub(super) async fn publish(connection: Channel, plan: PublishPlan) -> Result<Published> {
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
                let request = request(&plan, publisher, sent, count);
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

/// The request carrying messages `sent` to `sent + count` of `publisher`, as `plan` shapes
/// them.
fn request(plan: &PublishPlan, publisher: u64, sent: u64, count: u32) -> pb::PublishRequest {
    pb::PublishRequest {
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
    }
}

/// How many messages a paced publisher should have sent `elapsed` after it started.
pub(super) fn due_by(rate: u64, elapsed: Duration) -> u64 {
    u64::try_from(u128::from(rate) * elapsed.as_nanos() / 1_000_000_000).unwrap_or(u64::MAX)
}

/// Publisher `index`'s part of `total` messages split over `parts` publishers.
pub(super) fn share(total: u64, parts: u32, index: u32) -> u64 {
    let parts = u64::from(parts);
    total / parts + u64::from(u64::from(index) < total % parts)
}

/// A consumer attached to the bench subscription of a channel, before it starts draining.
pub(super) struct Consumer {
    pub(super) requests: mpsc::Sender<pb::SubscribeRequest>,
    pub(super) responses: Streaming<pb::SubscribeResponse>,
}

/// When a consumer stops and what it measures.
pub(super) struct DrainPlan {
    /// Stop once this many acks were confirmed; the value may drop while draining.
    pub(super) goal: watch::Receiver<u64>,
    /// Or at this time.
    pub(super) deadline: Instant,
    /// Payloads are stamped against this base: record each first delivery's latency.
    pub(super) stamps: Option<Instant>,
}

/// What a consumer got done.
pub(super) struct Consumed {
    /// Acks the broker confirmed OK.
    pub(super) acked: u64,
    /// Acks it refused as stale or unknown (none are expected).
    pub(super) refused: u64,
    /// When the last OK ack arrived, or the deadline.
    pub(super) finished: Instant,
    /// Stopped at the deadline before reaching the goal.
    pub(super) timed_out: bool,
    /// Publish-to-receive times of first deliveries, in nanoseconds, when measured.
    pub(super) latencies: Vec<u64>,
}

impl Consumed {
    pub(super) fn figure(&self, started: Instant, target: u64) -> Figure {
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
    pub(super) fn count(&mut self, results: &pb::AckResults) -> bool {
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
    pub(super) async fn attach(connection: Channel, channel: &str, window: u32) -> Result<Self> {
        Self::attach_to(connection, channel, SUBSCRIPTION, window).await
    }

    /// Attaches to `subscription` of `channel`.
    pub(super) async fn attach_to(
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
    pub(super) async fn drain(mut self, mut plan: DrainPlan) -> Result<Consumed> {
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

    pub(super) async fn ack(
        &self,
        batch: pb::Deliveries,
        stamps: Option<Instant>,
        latencies: &mut Vec<u64>,
    ) {
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
pub(super) fn fixed_goal(goal: u64) -> watch::Receiver<u64> {
    watch::channel(goal).1
}
