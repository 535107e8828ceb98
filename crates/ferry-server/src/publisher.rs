//! The `Publisher` service: unary batches and pipelined publish streams.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use ferry_core::{Broker, PreparedPublish, PublishConfirmation};
use ferry_proto::pb::{self, publisher_server::Publisher};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::activity::{Activity, Open};
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

/// Judges `caller` again by the principals in force if a reload came since it was last judged.
fn rejudge(
    caller: &mut Caller,
    reloads: &mut tokio::sync::watch::Receiver<Arc<crate::auth::Access>>,
    gate: &Gate,
) -> Result<(), Status> {
    if reloads.has_changed().unwrap_or(false) {
        reloads.mark_unchanged();
        *caller = caller.current(gate)?;
    }
    Ok(())
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
        let mut reloads = self.gate.changes();
        let mut caller = Caller::of(&request, &self.gate)?;
        let gate = self.gate.clone();
        let mut inbound = request.into_inner();
        let (pipeline, mut queued) =
            mpsc::channel::<Result<PublishConfirmation, Status>>(PIPELINE_DEPTH);
        let (responses, outbound) = mpsc::channel(PIPELINE_DEPTH);
        let broker = self.broker.clone();
        let shutdown = self.shutdown.clone();
        let max_request = self.max_request;

        // Reads and queues batches in order; stops at the first one that is refused.
        tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = pipeline.send(Err(Status::unavailable("the broker is shutting down"))).await;
                        return;
                    }
                    request = inbound.message() => request,
                };
                // The requests that arrived with it are read now too and queued with it, so
                // that one commit makes them all durable.
                let mut ready = Vec::new();
                let mut bytes = 0;
                let mut next = Some(first);
                let mut end = None;
                while let Some(request) = next.take() {
                    match request {
                        // A reload may have taken the stream's rights away since its last
                        // batch: the caller is judged again then, and only then (one atomic
                        // load a batch).
                        Ok(Some(request)) => {
                            match rejudge(&mut caller, &mut reloads, &gate)
                                .and_then(|()| prepare(&broker, &caller, request))
                            {
                                Ok(publish) => {
                                    bytes += publish.bytes();
                                    ready.push(publish);
                                }
                                Err(status) => end = Some(Err(status)),
                            }
                        }
                        Ok(None) => end = Some(Ok(())),
                        // A request that cannot be decoded ends the stream with its status,
                        // after the batches before it are confirmed (if the client is gone
                        // instead, no one reads it).
                        Err(status) => end = Some(Err(transport_status(status, max_request))),
                    }
                    if end.is_none() && ready.len() < READY_BATCHES && bytes < READY_BYTES {
                        next = ready_now(inbound.message()).await;
                    }
                }
                let queued = match ready.is_empty() {
                    true => Vec::new(),
                    false => match broker.submit_publishes(ready).await {
                        Ok(confirmations) => confirmations.into_iter().map(Ok).collect(),
                        Err(e) => vec![Err(to_status(e))],
                    },
                };
                for item in queued {
                    let refused = item.is_err();
                    if pipeline.send(item).await.is_err() || refused {
                        return;
                    }
                }
                match end {
                    None => {}
                    Some(Ok(())) => return,
                    Some(Err(status)) => {
                        let _ = pipeline.send(Err(status)).await;
                        return;
                    }
                }
            }
        });

        // Confirms queued batches in order, each once it is durable; the stream is open until
        // this ends.
        let open = self.activity.open(Open::PublishStream);
        tokio::spawn(async move {
            let _open = open;
            while let Some(item) = queued.recv().await {
                let answer = match item {
                    Ok(confirmation) => confirmation
                        .confirmed()
                        .await
                        .map(|appended| convert::published(&appended))
                        .map_err(to_status),
                    Err(status) => Err(status),
                };
                let failed = answer.is_err();
                if responses.send(answer).await.is_err() || failed {
                    return;
                }
            }
        });

        Ok(Response::new(Box::pin(ReceiverStream::new(outbound))))
    }
}
