//! The `Publisher` service: unary batches and pipelined publish streams.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use ferry_core::{Appended, Broker, PreparedPublish, PublishConfirmation};
use ferry_proto::pb::{self, publisher_server::Publisher};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::activity::{Activity, Held, Open};
use crate::auth::{Caller, Gate, Resource, Right};
use crate::convert;
use crate::status::{to_status, transport_status};

/// How many batches one publish stream may have queued but not yet confirmed; past that the
/// broker stops reading the stream, which pushes back on the client through HTTP/2 flow control.
const PIPELINE_DEPTH: usize = 1024;
/// What a publish stream reads at most before queuing it, of what the client has already
/// sent: batches...
const READY_BATCHES: usize = 64;
/// ...and bytes of messages.
const READY_BYTES: usize = 1 << 20;

/// Serves `ferry.v1.Publisher`.
pub struct PublisherService {
    broker: Broker,
    shutdown: CancellationToken,
    /// The server's decoding limit, named when a stream's request is refused for its size.
    max_request: usize,
    /// Where its open streams are counted.
    activity: Arc<Activity>,
    /// The principals in force, against which a stream's caller is judged again after a
    /// reload.
    gate: Gate,
}

impl PublisherService {
    /// A service over `broker`; its streams end when `shutdown` is cancelled, are counted in
    /// `activity` and judged by the principals `gate` holds.
    pub fn new(
        broker: Broker,
        shutdown: CancellationToken,
        max_request: usize,
        activity: Arc<Activity>,
        gate: Gate,
    ) -> Self {
        Self {
            broker,
            shutdown,
            max_request,
            activity,
            gate,
        }
    }
}

/// A publish stream's responses: the queued batches' confirmations, in order, each once it is
/// durable; it ends after the first refusal. Polled by the response body itself, so that a
/// confirmation reaches gRPC without passing through a task and a queue of its own.
struct Confirmations {
    queued: mpsc::Receiver<Result<PublishConfirmation, Status>>,
    /// The confirmation being awaited.
    waiting: Option<Pin<Box<dyn Future<Output = ferry_core::Result<Appended>> + Send>>>,
    ended: bool,
    /// The stream counts as open until its responses are dropped.
    _open: Held,
}

impl Stream for Confirmations {
    type Item = Result<pb::PublishResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let waiting = match self.waiting.as_mut() {
            Some(waiting) => waiting,
            None => match ready!(self.queued.poll_recv(cx)) {
                Some(Ok(confirmation)) => self.waiting.insert(Box::pin(confirmation.confirmed())),
                Some(Err(status)) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(status)));
                }
                None => return Poll::Ready(None),
            },
        };
        let answer = ready!(waiting.as_mut().poll(cx))
            .map(|appended| convert::published(&appended))
            .map_err(to_status);
        self.waiting = None;
        self.ended = answer.is_err();
        Poll::Ready(Some(answer))
    }
}

/// Checks a request (the caller's right, each message, the channel's limits) and gets it ready
/// to be queued.
fn prepare(
    broker: &Broker,
    caller: &Caller,
    request: pb::PublishRequest,
) -> Result<PreparedPublish, Status> {
    caller.require(Right::Publish, Resource::Channel(&request.channel))?;
    let messages = request
        .messages
        .into_iter()
        .map(convert::new_message)
        .collect::<Result<_, _>>()?;
    broker
        .prepare_publish(&request.channel, messages)
        .map_err(to_status)
}

/// Polls `future` once: its output if it is ready now.
async fn ready_now<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        Poll::Ready(match future.as_mut().poll(cx) {
            Poll::Ready(output) => Some(output),
            Poll::Pending => None,
        })
    })
    .await
}

/// A publish stream's request side: reads batches, checks them and queues them in order,
/// handing their confirmations to the response side; it stops at the first one refused.
struct StreamReader {
    inbound: Streaming<pb::PublishRequest>,
    caller: Caller,
    /// Reloads of the principals, after which the caller is judged again.
    reloads: tokio::sync::watch::Receiver<Arc<crate::auth::Access>>,
    gate: Gate,
    broker: Broker,
    /// The server's decoding limit, named when a request is refused for its size.
    max_request: usize,
    pipeline: mpsc::Sender<Result<PublishConfirmation, Status>>,
}

/// How a stream's request side ends: cleanly, or with a status for the client.
type End = Result<(), Status>;

impl StreamReader {
    async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => {
                    let shutting_down = Status::unavailable("the broker is shutting down");
                    let _ = self.pipeline.send(Err(shutting_down)).await;
                    return;
                }
                request = self.inbound.message() => request,
            };
            let (ready, end) = self.read_ready(first).await;
            if !self.queue(ready).await {
                return;
            }
            if let Some(end) = end {
                if let Err(status) = end {
                    let _ = self.pipeline.send(Err(status)).await;
                }
                return;
            }
        }
    }

    /// Checks `first` and whatever else the client has already sent (up to [`READY_BATCHES`]
    /// or [`READY_BYTES`]), so that they are queued together and one commit makes them all
    /// durable; returns them, and the end of the stream if one of them ended it.
    async fn read_ready(
        &mut self,
        first: Result<Option<pb::PublishRequest>, Status>,
    ) -> (Vec<PreparedPublish>, Option<End>) {
        let mut ready = Vec::new();
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(request) = next.take() {
            let publish = match request {
                Ok(Some(request)) => self.check(request),
                Ok(None) => return (ready, Some(Ok(()))),
                // A request that cannot be decoded ends the stream with its status, after the
                // batches before it are confirmed (if the client is gone instead, no one reads
                // it).
                Err(status) => Err(transport_status(status, self.max_request)),
            };
            match publish {
                Ok(publish) => {
                    bytes += publish.bytes();
                    ready.push(publish);
                }
                Err(status) => return (ready, Some(Err(status))),
            }
            if ready.len() < READY_BATCHES && bytes < READY_BYTES {
                next = ready_now(self.inbound.message()).await;
            }
        }
        (ready, None)
    }

    /// Checks one request. A reload may have taken the stream's rights away since its last
    /// batch: the caller is judged again then, and only then (one atomic load a batch).
    fn check(&mut self, request: pb::PublishRequest) -> Result<PreparedPublish, Status> {
        if self.reloads.has_changed().unwrap_or(false) {
            self.reloads.mark_unchanged();
            self.caller = self.caller.current(&self.gate)?;
        }
        prepare(&self.broker, &self.caller, request)
    }

    /// Queues `ready` and hands their confirmations on; false once the stream must stop (a
    /// refusal was handed on, or nobody reads the responses any more).
    async fn queue(&self, ready: Vec<PreparedPublish>) -> bool {
        if ready.is_empty() {
            return true;
        }
        match self.broker.submit_publishes(ready).await {
            Ok(confirmations) => {
                for confirmation in confirmations {
                    if self.pipeline.send(Ok(confirmation)).await.is_err() {
                        return false;
                    }
                }
                true
            }
            Err(e) => {
                let _ = self.pipeline.send(Err(to_status(e))).await;
                false
            }
        }
    }
}

#[tonic::async_trait]
impl Publisher for PublisherService {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let caller = Caller::of(&request, &self.gate)?;
        let publish = prepare(&self.broker, &caller, request.into_inner())?;
        let confirmation = (self.broker.submit_prepared(publish).await).map_err(to_status)?;
        let appended = confirmation.confirmed().await.map_err(to_status)?;
        Ok(Response::new(convert::published(&appended)))
    }

    type PublishStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::PublishResponse, Status>> + Send>>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        // Watched from before the caller is judged, so that no reload slips between the two.
        let reloads = self.gate.changes();
        let caller = Caller::of(&request, &self.gate)?;
        let (pipeline, queued) =
            mpsc::channel::<Result<PublishConfirmation, Status>>(PIPELINE_DEPTH);
        let reader = StreamReader {
            inbound: request.into_inner(),
            caller,
            reloads,
            gate: self.gate.clone(),
            broker: self.broker.clone(),
            max_request: self.max_request,
            pipeline,
        };
        tokio::spawn(reader.run(self.shutdown.clone()));

        // The responses: each queued batch's confirmation, in order, once it is durable,
        // made only as gRPC asks for the next, so unread ones wait as confirmations (bounded by
        // the pipeline) and HTTP/2 flow control bounds what is sent and not read.
        Ok(Response::new(Box::pin(Confirmations {
            queued,
            waiting: None,
            ended: false,
            _open: self.activity.open(Open::PublishStream),
        })))
    }
}
