//! The `Subscriber` service: one bidirectional stream per consumer.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ferry_core::{
    AckOperation, Broker, ConsumerEvent, ConsumerEvents, ConsumerHandle, CoreError,
    MAX_ACK_DEADLINE_MS, Settlement,
};
use ferry_proto::pb::subscriber_server::Subscriber;
use ferry_proto::pb::{
    self, subscribe_request::Request as Req, subscribe_response::Response as Resp,
};
use tokio::sync::{oneshot, watch};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::activity::{Activity, Held, Open};
use crate::auth::{Access, Caller, Gate, Resource, Right};
use crate::convert;
use crate::status::{to_status, transport_status};

/// Serves `ferry.v1.Subscriber`.
pub struct SubscriberService {
    broker: Broker,
    /// The server's decoding limit, named when a request is refused for its size.
    max_request: usize,
    /// Where its open streams are counted.
    activity: Arc<Activity>,
    /// The principals in force: a stream is judged again at every reload.
    gate: Gate,
}

impl SubscriberService {
    /// A service over `broker`, its streams counted in `activity` and judged by the principals
    /// `gate` holds.
    pub fn new(broker: Broker, max_request: usize, activity: Arc<Activity>, gate: Gate) -> Self {
        Self {
            broker,
            max_request,
            activity,
            gate,
        }
    }
}

#[tonic::async_trait]
impl Subscriber for SubscriberService {
    type SubscribeStream = ConsumerStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        // Watched from before the caller is judged: a reload at any later moment, even while
        // the attach is awaited, wakes the judge.
        let changes = self.gate.changes();
        let caller = Caller::of(&request, &self.gate)?;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await
            .map_err(|status| transport_status(status, self.max_request))?;
        let attach = match first {
            Some(pb::SubscribeRequest {
                request: Some(Req::Attach(attach)),
            }) => attach,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first request on a Subscribe stream must be an attach naming the channel and subscription",
                ));
            }
            None => {
                return Err(Status::invalid_argument(
                    "the Subscribe stream ended before its attach request",
                ));
            }
        };
        // Acks, nacks and extensions travel on this stream, so its check covers them too. The
        // attach may come long after the headers: judged by the principals in force now.
        let caller = caller.current(&self.gate)?;
        caller.require(
            Right::Subscribe,
            Resource::Subscription {
                channel: &attach.channel,
                name: &attach.subscription,
            },
        )?;
        let window = convert::window(attach.window);
        let (consumer, events, attached) = self
            .broker
            .attach(&attach.channel, &attach.subscription, window)
            .await
            .map_err(to_status)?;
        tracing::debug!(channel = %attach.channel, subscription = %attach.subscription, consumer = attached.consumer_id, "consumer attached");

        let (revoke, revoked) = oneshot::channel();
        let withdrawn = CancellationToken::new();
        let judge = Judge {
            caller,
            gate: self.gate.clone(),
            changes,
            withdrawn: withdrawn.clone(),
        };
        let names = (attach.channel.clone(), attach.subscription.clone());
        tokio::spawn(judge.again(names, revoke));
        let (abort, aborted) = oneshot::channel();
        tokio::spawn(read_requests(
            inbound,
            consumer.clone(),
            (abort, withdrawn),
            self.max_request,
        ));
        let first = pb::SubscribeResponse {
            response: Some(Resp::Attached(pb::Attached {
                consumer_id: attached.consumer_id,
                ack_deadline_ms: attached.ack_deadline_ms,
                window: Some(convert::flow_control(attached.window)),
            })),
        };
        Ok(Response::new(ConsumerStream {
            first: Some(first),
            events,
            aborted: Some(aborted),
            revoked: Some(revoked),
            _consumer: consumer,
            _open: self.activity.open(Open::SubscribeStream),
            done: false,
        }))
    }
}

/// What judges a Subscribe stream's caller again at each reload of the principals.
struct Judge {
    caller: Caller,
    gate: Gate,
    /// Subscribed before the caller was judged at attach.
    changes: watch::Receiver<Arc<Access>>,
    /// Cancelled when the rights are withdrawn: the stream's requests stop being applied at
    /// once, even if the client does not read the status that ends its stream (a consumer
    /// that reads nothing is detached by the stall timeout).
    withdrawn: CancellationToken,
}

impl Judge {
    /// Judges the caller again at every reload, until the stream ends; ends it (through
    /// `revoke`) once its credential no longer counts or its right is gone.
    async fn again(
        mut self,
        (channel, name): (String, String),
        mut revoke: oneshot::Sender<Status>,
    ) {
        loop {
            tokio::select! {
                _ = revoke.closed() => return,
                changed = self.changes.changed() => if changed.is_err() { return },
            }
            let resource = Resource::Subscription {
                channel: &channel,
                name: &name,
            };
            let verdict = (self.caller.current(&self.gate))
                .and_then(|now| now.require(Right::Subscribe, resource));
            if let Err(status) = verdict {
                tracing::info!(%channel, subscription = %name, reason = %status.message(), "consumer detached: its rights were withdrawn by a reload");
                self.withdrawn.cancel();
                let _ = revoke.send(status);
                return;
            }
        }
    }
}

/// Applies a consumer's requests until either side of the call ends. A malformed request ends the whole
/// stream with INVALID_ARGUMENT (through `abort`).
async fn read_requests(
    mut inbound: Streaming<pb::SubscribeRequest>,
    consumer: ConsumerHandle,
    (mut abort, withdrawn): (oneshot::Sender<Status>, CancellationToken),
    max_request: usize,
) {
    loop {
        let next = tokio::select! {
            // Once the response stream is over (the consumer was closed, or the client left),
            // the requests are of no use; dropping them lets the call end even while the client
            // still holds its side open.
            _ = abort.closed() => return,
            // Rights withdrawn by a reload: nothing more of this stream is applied.
            _ = withdrawn.cancelled() => return,
            next = inbound.message() => next,
        };
        let request = match next {
            Ok(Some(request)) => request,
            // A clean half-close leaves the consumer attached for as long as it keeps reading.
            Ok(None) => return,
            Err(status) => {
                let _ = abort.send(transport_status(status, max_request));
                return;
            }
        };
        let outcome = match request.request {
            Some(Req::Ack(ids)) => consumer.settle(ids.ack_ids, Settlement::Ack).await,
            Some(Req::Nack(request)) => match convert::nack(&request) {
                Ok(nack) => {
                    consumer
                        .settle(request.ack_ids, Settlement::Nack(nack))
                        .await
                }
                Err(status) => {
                    let _ = abort.send(status);
                    return;
                }
            },
            Some(Req::Extend(extend)) => {
                let ms = u64::from(extend.extension_ms);
                if !(1..=MAX_ACK_DEADLINE_MS).contains(&ms) {
                    let _ = abort.send(Status::invalid_argument(format!(
                        "extension_ms is {ms}; it must be from 1 to {MAX_ACK_DEADLINE_MS}"
                    )));
                    return;
                }
                let extension = Settlement::Extend(Duration::from_millis(ms));
                consumer.settle(extend.ack_ids, extension).await
            }
            Some(Req::Flow(window)) => consumer.set_window(convert::window(Some(window))).await,
            Some(Req::Attach(_)) => {
                let _ = abort.send(Status::invalid_argument(
                    "this stream is attached already: attach only once, first",
                ));
                return;
            }
            None => {
                let _ = abort.send(Status::invalid_argument(
                    "empty request: set one of attach, ack, nack, extend, flow",
                ));
                return;
            }
        };
        match outcome {
            Ok(()) => {}
            // The stream ends with the reason the consumer was closed; its requests are of no
            // use any more, and reading them stops so that HTTP/2 pushes back on the client.
            Err(CoreError::ConsumerDetached) => return,
            Err(e) => {
                let _ = abort.send(to_status(e));
                return;
            }
        }
    }
}

/// The server side of a Subscribe stream: the attach answer, then the consumer's events. It
/// holds a handle to the consumer, so that when the client goes away and the stream is dropped
/// the consumer is detached and its deliveries released.
pub struct ConsumerStream {
    first: Option<pb::SubscribeResponse>,
    events: ConsumerEvents,
    /// Where the request reader reports a malformed request; None once it has answered (a
    /// oneshot must not be polled again after it completes).
    aborted: Option<oneshot::Receiver<Status>>,
    /// Where a reload that withdrew the caller's rights is reported; None once answered.
    revoked: Option<oneshot::Receiver<Status>>,
    _consumer: ConsumerHandle,
    _open: Held,
    done: bool,
}

impl Stream for ConsumerStream {
    type Item = Result<pb::SubscribeResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        let this = &mut *self;
        let end = ended(&mut this.aborted, cx).or_else(|| ended(&mut this.revoked, cx));
        if let Some(status) = end {
            self.done = true;
            return Poll::Ready(Some(Err(status)));
        }
        let item = match self.events.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => Err(Status::unavailable("the consumer was detached")),
            Poll::Ready(Some(ConsumerEvent::Closed(e))) => Err(to_status(e)),
            Poll::Ready(Some(ConsumerEvent::Deliveries(deliveries))) => {
                Ok(Resp::Deliveries(pb::Deliveries {
                    deliveries: deliveries.into_iter().map(convert::delivery).collect(),
                }))
            }
            Poll::Ready(Some(ConsumerEvent::Results { operation, results })) => {
                Ok(Resp::Results(pb::AckResults {
                    operation: match operation {
                        AckOperation::Ack => pb::AckOperation::Ack,
                        AckOperation::Nack => pb::AckOperation::Nack,
                        AckOperation::Extend => pb::AckOperation::Extend,
                    } as i32,
                    results: results.into_iter().map(convert::ack_result).collect(),
                }))
            }
        };
        if item.is_err() {
            self.done = true;
        }
        Poll::Ready(Some(item.map(|response| pb::SubscribeResponse {
            response: Some(response),
        })))
    }
}

/// The status that ends the stream, if `slot`'s sender sent one; the slot is emptied once its
/// sender has answered or gone.
fn ended(slot: &mut Option<oneshot::Receiver<Status>>, cx: &mut Context<'_>) -> Option<Status> {
    let receiver = slot.as_mut()?;
    let Poll::Ready(outcome) = Pin::new(receiver).poll(cx) else {
        return None;
    };
    *slot = None;
    outcome.ok()
}

use std::future::Future as _;
