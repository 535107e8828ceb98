//! A consumer of one subscription, as a [`Stream`] of [`Delivery`]s that are acked or nacked
//! through themselves.
//!
//! One task owns the `Subscribe` call. It puts deliveries in the subscription's inbox (bounded
//! by the consumer's window: the broker never sends more than the window holds unsettled),
//! sends acks and nacks in batches and answers each from the broker's results (an ack is
//! answered once it is durable), pushes the deadline of every delivery the application still
//! holds out before it passes (up to [`SubscribeOptions::max_extension`]), and when the
//! connection is lost attaches again with backoff: the deliveries the broker held for the lost
//! consumer come again, and acks of deliveries from before answer [`Error::Stale`].

use std::collections::{HashMap, VecDeque};
use std::ops::Deref;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::Connection;
use ferry_proto::pb;
use ferry_proto::pb::subscribe_request::Request as Req;
use ferry_proto::pb::subscribe_response::Response as Resp;
use ferry_proto::pb::subscriber_client::SubscriberClient;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::Stream;

use crate::error::{Error, Result};
use crate::message::Received;

/// How a consumer attaches and what the client does for it.
#[derive(Debug, Clone, Copy)]
pub struct SubscribeOptions {
    /// The most deliveries it holds unsettled at once (0: the broker's default, 1,000).
    pub max_messages: u32,
    /// The most payload bytes it holds unsettled at once (0: the broker's default, 10 MiB).
    pub max_bytes: u64,
    /// Push the deadline of each delivery the application holds out before it passes.
    pub extend_deadlines: bool,
    /// Stop extending a delivery held this long (it is then delivered again, maybe elsewhere).
    pub max_extension: Duration,
    /// Attach again, with backoff, when the connection is lost or the broker is not serving.
    pub reconnect: bool,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            max_messages: 0,
            max_bytes: 0,
            extend_deadlines: true,
            max_extension: Duration::from_secs(3600),
            reconnect: true,
        }
    }
}

/// How a nack wants its delivery retried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nack {
    /// Retry after this long instead of the subscription's retry policy (at most 24 h).
    pub delay: Option<Duration>,
    /// Why it failed, kept with the message's failure record and its dead letter.
    pub reason: String,
    /// Never retry: dead-letter it now (or discard it without a dead-letter channel).
    pub terminal: bool,
}

/// The deliveries of one consumer, as a [`Stream`]; it ends (after an error item, if any)
/// when the subscription is deleted, the broker refuses the consumer for good, or the
/// connection is lost and reconnecting is off. Dropping it detaches the consumer: what it
/// held goes to other consumers, and settling one of its deliveries afterwards fails.
pub struct Subscription {
    inbox: Arc<Inbox>,
}

impl Subscription {
    pub(crate) fn start(
        connection: Connection,
        channel: String,
        subscription: String,
        options: SubscribeOptions,
    ) -> Subscription {
        let inbox = Arc::new(Inbox::default());
        let (settles, settled) = mpsc::channel(SETTLE_QUEUE);
        let task = Task {
            client: SubscriberClient::new(connection)
                .max_decoding_message_size(crate::MAX_RESPONSE),
            channel,
            subscription,
            options,
            inbox: inbox.clone(),
            settles: settles.downgrade(),
            settled,
            held: HashMap::new(),
            owed: HashMap::new(),
            ack_deadline: Duration::from_secs(30),
        };
        // The subscription's own sender keeps the task alive until it is dropped.
        inbox.lock().settles = Some(settles);
        tokio::spawn(task.run());
        Subscription { inbox }
    }

    /// The next delivery (`None` once the stream has ended).
    pub async fn next(&mut self) -> Option<Result<Delivery>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for Subscription {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut inbox = self.inbox.lock();
        match inbox.items.pop_front() {
            Some(item) => Poll::Ready(Some(item)),
            None if inbox.ended => Poll::Ready(None),
            None => {
                inbox.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // The consumer leaves: the broker gives what it held, read or not, to other
        // consumers (one attempt each, as for any consumer that leaves); settling a delivery
        // of it afterwards fails.
        let unread = {
            let mut inbox = self.inbox.lock();
            inbox.closed = true;
            inbox.settles = None;
            std::mem::take(&mut inbox.items)
        };
        for delivery in unread.into_iter().flatten() {
            delivery.forget();
        }
        self.inbox.left.notify_one();
    }
}

/// One delivery of a message: settle it with [`Delivery::ack`] or [`Delivery::nack`]. Dropped
/// unsettled, it is nacked (delivered again after the subscription's retry wait).
pub struct Delivery {
    message: Received,
    ack_id: String,
    settles: mpsc::Sender<Settle>,
    settled: bool,
}

impl Deref for Delivery {
    type Target = Received;

    fn deref(&self) -> &Received {
        &self.message
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (f.debug_struct("Delivery"))
            .field("message", &self.message)
            .field("ack_id", &self.ack_id)
            .finish()
    }
}

impl Delivery {
    /// The message.
    pub fn message(&self) -> &Received {
        &self.message
    }

    /// Names this delivery to the broker.
    pub fn ack_id(&self) -> &str {
        &self.ack_id
    }

    /// Done: the message is never delivered to this subscription again. Returns once the ack
    /// is durable.
    pub async fn ack(mut self) -> Result<()> {
        self.settle(Settlement::Ack).await
    }

    /// Failed: deliver it again after the subscription's retry wait, or dead-letter it after
    /// its last attempt.
    pub async fn nack(self) -> Result<()> {
        self.nack_with(Nack::default()).await
    }

    /// Failed, with a delay, a reason or as terminal.
    pub async fn nack_with(mut self, nack: Nack) -> Result<()> {
        self.settle(Settlement::Nack(nack)).await
    }

    async fn settle(&mut self, settlement: Settlement) -> Result<()> {
        self.settled = true;
        let (reply, answer) = oneshot::channel();
        let settle = Settle {
            ack_id: std::mem::take(&mut self.ack_id),
            settlement,
            reply: Some(reply),
        };
        (self.settles.send(settle).await).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl Delivery {
    /// Drops it without settling it (the broker already released it).
    fn forget(mut self) {
        self.settled = true;
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let settle = Settle {
            ack_id: std::mem::take(&mut self.ack_id),
            settlement: Settlement::Nack(Nack::default()),
            reply: None,
        };
        if let Err(mpsc::error::TrySendError::Full(settle)) = self.settles.try_send(settle) {
            let settles = self.settles.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { settles.send(settle).await });
            }
        }
    }
}

fn stopped() -> Error {
    Error::Disconnected("the subscription stopped".into())
}

/// How many settlements may wait for the task before settling waits.
const SETTLE_QUEUE: usize = 1024;
/// The most ack ids in one request.
const SETTLE_BATCH: usize = 1000;
/// The waits between attempts to attach again: from the first to the last, doubling.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_LAST: Duration = Duration::from_secs(5);

enum Settlement {
    Ack,
    Nack(Nack),
}

struct Settle {
    ack_id: String,
    settlement: Settlement,
    /// Where the outcome goes (none for a delivery dropped unsettled).
    reply: Option<oneshot::Sender<Result<()>>>,
}

/// What the task hands the application: bounded by the window, since the broker sends no
/// more than the consumer may hold.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    /// Notified when the application drops the subscription: the consumer leaves.
    left: tokio::sync::Notify,
}

#[derive(Default)]
struct InboxState {
    items: VecDeque<Result<Delivery>>,
    waker: Option<Waker>,
    /// The stream has ended: nothing more comes.
    ended: bool,
    /// The application dropped the subscription.
    closed: bool,
    /// The subscription's sender of settlements (deliveries hold clones).
    settles: Option<mpsc::Sender<Settle>>,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state.lock().expect("inbox lock")
    }

    /// Hands a delivery over; gives it back once the application dropped the subscription.
    fn push(&self, delivery: Delivery) -> Option<Delivery> {
        let waker = {
            let mut inbox = self.lock();
            if inbox.closed {
                return Some(delivery);
            }
            inbox.items.push_back(Ok(delivery));
            inbox.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        None
    }

    /// Drops the deliveries not read yet, without settling them: the broker released them
    /// with the consumer that received them.
    fn forget_unread(&self) {
        let unread = std::mem::take(&mut self.lock().items);
        for delivery in unread.into_iter().flatten() {
            delivery.forget();
        }
    }

    /// Ends the stream, after `error` if there is one.
    fn end(&self, error: Option<Error>) {
        let waker = {
            let mut inbox = self.lock();
            if let Some(error) = error {
                inbox.items.push_back(Err(error));
            }
            inbox.ended = true;
            inbox.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The task that owns the call.
struct Task {
    client: SubscriberClient<Connection>,
    channel: String,
    subscription: String,
    options: SubscribeOptions,
    inbox: Arc<Inbox>,
    /// For the deliveries it makes: weak, so that once the application has dropped the
    /// subscription and every delivery, `settled` ends and so does the task.
    settles: mpsc::WeakSender<Settle>,
    settled: mpsc::Receiver<Settle>,
    /// Deliveries the application holds, and when each arrived (for deadline extension).
    held: HashMap<String, Instant>,
    /// Answers owed, by ack id.
    owed: HashMap<String, oneshot::Sender<Result<()>>>,
    ack_deadline: Duration,
}

/// Why a call ended.
enum Ended {
    /// The application let go of everything.
    Done,
    Failed(Error),
}

type Call = (
    mpsc::Sender<pb::SubscribeRequest>,
    tonic::Streaming<pb::SubscribeResponse>,
);

impl Task {
    async fn run(mut self) {
        let mut backoff = BACKOFF_FIRST;
        loop {
            let error = match self.attach().await {
                Ok(call) => {
                    backoff = BACKOFF_FIRST;
                    match self.serve(call).await {
                        Ended::Done => return,
                        Ended::Failed(error) => error,
                    }
                }
                Err(error) => error,
            };
            self.lost(&error);
            if !(self.options.reconnect && error.is_transient()) {
                self.inbox.end(Some(error));
                return;
            }
            // Settlements that arrive while disconnected are answered at once: their
            // deliveries were released with the consumer.
            let wait = tokio::time::sleep(backoff);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    () = self.inbox.left.notified() => return,
                    settle = self.settled.recv() => match settle {
                        Some(settle) => answer(settle.reply, Err(Error::Stale)),
                        None => return,
                    },
                }
            }
            backoff = (backoff * 2).min(BACKOFF_LAST);
        }
    }

    async fn attach(&mut self) -> Result<Call> {
        let (requests, outbound) = mpsc::channel(16);
        let attach = pb::SubscribeRequest {
            request: Some(Req::Attach(pb::Attach {
                channel: self.channel.clone(),
                subscription: self.subscription.clone(),
                window: Some(pb::FlowControl {
                    max_messages: self.options.max_messages,
                    max_bytes: self.options.max_bytes,
                }),
            })),
        };
        // The broker reads the attach before it answers the call.
        let _ = requests.send(attach).await;
        let outbound = tokio_stream::wrappers::ReceiverStream::new(outbound);
        let mut responses = self.client.subscribe(outbound).await?.into_inner();
        match responses.message().await? {
            Some(pb::SubscribeResponse {
                response: Some(Resp::Attached(attached)),
            }) => {
                self.ack_deadline = Duration::from_millis(attached.ack_deadline_ms.max(1));
                Ok((requests, responses))
            }
            _ => Err(Error::Disconnected(
                "the broker ended the call before attaching".into(),
            )),
        }
    }

    /// Serves one call until it ends.
    async fn serve(&mut self, (requests, mut responses): Call) -> Ended {
        let period =
            (self.ack_deadline / 4).clamp(Duration::from_millis(20), Duration::from_secs(10));
        let mut extend = tokio::time::interval(period);
        extend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.inbox.left.notified() => return Ended::Done,
                response = responses.message() => match response {
                    Ok(Some(response)) => {
                        if !self.received(response) {
                            return Ended::Done;
                        }
                    }
                    Ok(None) => return Ended::Failed(Error::Disconnected("the broker ended the call".into())),
                    Err(status) => return Ended::Failed(status.into()),
                },
                settle = self.settled.recv() => {
                    let Some(settle) = settle else { return Ended::Done };
                    if let Err(error) = self.settle(settle, &requests).await {
                        return Ended::Failed(error);
                    }
                }
                _ = extend.tick(), if self.options.extend_deadlines && !self.held.is_empty() => {
                    if let Err(error) = self.extend(&requests).await {
                        return Ended::Failed(error);
                    }
                }
            }
        }
    }

    /// Handles what the broker sent; false once the application let go of everything.
    fn received(&mut self, response: pb::SubscribeResponse) -> bool {
        match response.response {
            Some(Resp::Deliveries(batch)) => {
                let Some(settles) = self.settles.upgrade() else {
                    return false;
                };
                let now = Instant::now();
                for mut delivery in batch.deliveries {
                    let message = Received::of(&mut delivery);
                    let delivery = Delivery {
                        message,
                        ack_id: delivery.ack_id,
                        settles: settles.clone(),
                        settled: false,
                    };
                    let ack_id = delivery.ack_id.clone();
                    if let Some(delivery) = self.inbox.push(delivery) {
                        // The application dropped the subscription: the consumer leaves, and
                        // the broker gives what it held to others (one attempt each, as for
                        // any consumer that leaves) instead of each new delivery being nacked.
                        delivery.forget();
                        return false;
                    }
                    self.held.insert(ack_id, now);
                }
            }
            Some(Resp::Results(results)) => {
                // An extension is answered at once; an ack only once durable: only the
                // answers to acks and nacks settle what the application waits for.
                let settles = results.operation() != pb::AckOperation::Extend;
                for result in results.results {
                    let outcome = match result.status() {
                        pb::AckStatus::Ok => Ok(()),
                        pb::AckStatus::Stale => Err(Error::Stale),
                        _ => Err(Error::UnknownAckId),
                    };
                    if outcome.is_err() {
                        // An extension that came too late: no use extending it again.
                        self.held.remove(&result.ack_id);
                    }
                    if settles && let Some(reply) = self.owed.remove(&result.ack_id) {
                        let _ = reply.send(outcome);
                    }
                }
            }
            Some(Resp::Attached(_)) | None => {}
        }
        true
    }

    /// Sends `first` and whatever other settlements wait, acks in one request and nacks
    /// grouped by how they want to be retried.
    async fn settle(
        &mut self,
        first: Settle,
        requests: &mpsc::Sender<pb::SubscribeRequest>,
    ) -> Result<()> {
        let mut acks = Vec::new();
        let mut nacks: Vec<(Nack, Vec<String>)> = Vec::new();
        let mut next = Some(first);
        while let Some(settle) = next.take() {
            self.held.remove(&settle.ack_id);
            if let Some(reply) = settle.reply {
                self.owed.insert(settle.ack_id.clone(), reply);
            }
            match settle.settlement {
                Settlement::Ack => acks.push(settle.ack_id),
                Settlement::Nack(nack) => match nacks.iter_mut().find(|(n, _)| *n == nack) {
                    Some((_, ids)) => ids.push(settle.ack_id),
                    None => nacks.push((nack, vec![settle.ack_id])),
                },
            }
            if acks.len() + nacks.len() < SETTLE_BATCH {
                next = self.settled.try_recv().ok();
            }
        }
        let mut out = Vec::new();
        if !acks.is_empty() {
            out.push(Req::Ack(pb::AckIds { ack_ids: acks }));
        }
        for (nack, ack_ids) in nacks {
            out.push(Req::Nack(pb::Nack {
                ack_ids,
                delay: nack.delay.map(crate::convert::duration),
                reason: nack.reason,
                terminal: nack.terminal,
            }));
        }
        for request in out {
            let request = pb::SubscribeRequest {
                request: Some(request),
            };
            (requests.send(request).await)
                .map_err(|_| Error::Disconnected("the call ended".into()))?;
        }
        Ok(())
    }

    /// Pushes out the deadlines of deliveries held past half their deadline.
    async fn extend(&mut self, requests: &mpsc::Sender<pb::SubscribeRequest>) -> Result<()> {
        let now = Instant::now();
        let half = self.ack_deadline / 2;
        let most = self.options.max_extension;
        let due: Vec<String> = (self.held.iter())
            .filter(|(_, at)| now.duration_since(**at) >= half && now.duration_since(**at) < most)
            .map(|(id, _)| id.clone())
            .collect();
        // Held past the longest extension: let the deadline pass.
        self.held.retain(|_, at| now.duration_since(*at) < most);
        let extension_ms = u32::try_from(self.ack_deadline.as_millis())
            .unwrap_or(u32::MAX)
            .min(3_600_000);
        for ack_ids in due.chunks(SETTLE_BATCH) {
            let request = Req::Extend(pb::ExtendDeadline {
                ack_ids: ack_ids.to_vec(),
                extension_ms,
            });
            let request = pb::SubscribeRequest {
                request: Some(request),
            };
            (requests.send(request).await)
                .map_err(|_| Error::Disconnected("the call ended".into()))?;
        }
        Ok(())
    }

    /// The call is gone: the broker released what it had delivered on it.
    fn lost(&mut self, error: &Error) {
        self.held.clear();
        self.inbox.forget_unread();
        for (_, reply) in self.owed.drain() {
            let _ = reply.send(Err(Error::Disconnected(error.to_string())));
        }
    }
}

fn answer(reply: Option<oneshot::Sender<Result<()>>>, outcome: Result<()>) {
    if let Some(reply) = reply {
        let _ = reply.send(outcome);
    }
}
