//! A publisher of one channel: it batches what its callers hand it, pipelines the batches over
//! one `PublishStream`, and confirms each message once the broker says it is durable.
//!
//! One task owns the stream. Callers queue messages (the queue is bounded: a caller waits while
//! it is full) and get a [`Confirmation`] each; the task sends whatever is queued as one batch,
//! keeps at most [`PublisherOptions::in_flight`] batches unconfirmed, and answers each
//! message's confirmation in order as the broker confirms its batch. A failed batch fails its
//! messages with the broker's error and every batch sent after it with
//! [`Error::Disconnected`] (the broker applied none of them); the next message opens a new
//! stream.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::Connection;
use ferry_proto::pb;
use ferry_proto::pb::publisher_client::PublisherClient;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::message::{Message, Published};

/// How a [`Publisher`] batches and pipelines.
#[derive(Debug, Clone, Copy)]
pub struct PublisherOptions {
    /// The most messages in one batch (the broker's `max_batch_messages` is 1,000 by default).
    pub max_batch_messages: usize,
    /// The most bytes in one batch (the broker's `max_batch_bytes` is 4 MiB by default).
    pub max_batch_bytes: usize,
    /// The most batches sent and not yet confirmed.
    pub in_flight: usize,
    /// The most messages queued and not yet sent; a caller waits while it is full.
    pub queue: usize,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        Self {
            max_batch_messages: 500,
            max_batch_bytes: 1 << 20,
            in_flight: 16,
            queue: 4096,
        }
    }
}

/// Publishes to one channel; cheap to clone (clones share the stream). Dropping every clone
/// lets the queued messages go out and then closes the stream.
#[derive(Clone)]
pub struct Publisher {
    queue: mpsc::Sender<Queued>,
}

struct Queued {
    message: Message,
    confirm: oneshot::Sender<Result<Published>>,
}

/// A message's confirmation: resolves once the broker has made it durable (or refused it).
pub struct Confirmation {
    answer: oneshot::Receiver<Result<Published>>,
}

impl Future for Confirmation {
    type Output = Result<Published>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.answer).poll(cx).map(|answer| {
            answer.unwrap_or_else(|_| Err(Error::Disconnected("the publisher stopped".into())))
        })
    }
}

impl Publisher {
    pub(crate) fn new(connection: Connection, channel: String, options: PublisherOptions) -> Self {
        let (queue, queued) = mpsc::channel(options.queue.max(1));
        let task = Task {
            client: PublisherClient::new(connection).max_decoding_message_size(crate::MAX_RESPONSE),
            channel,
            options,
            queued,
            stream: None,
            unconfirmed: VecDeque::new(),
            held_over: None,
        };
        tokio::spawn(task.run());
        Publisher { queue }
    }

    /// Queues a message (waiting while the queue is full); the confirmation resolves once it
    /// is durable. Messages queued one after another from one task get increasing sequences.
    pub async fn send(&self, message: Message) -> Result<Confirmation> {
        let (confirm, answer) = oneshot::channel();
        let queued = Queued { message, confirm };
        (self.queue.send(queued).await)
            .map_err(|_| Error::Disconnected("the publisher stopped".into()))?;
        Ok(Confirmation { answer })
    }

    /// Publishes a message and waits until it is durable.
    pub async fn publish(&self, message: Message) -> Result<Published> {
        self.send(message).await?.await
    }
}

/// The task that owns the stream.
struct Task {
    client: PublisherClient<Connection>,
    channel: String,
    options: PublisherOptions,
    queued: mpsc::Receiver<Queued>,
    stream: Option<Stream>,
    /// The confirmations of each batch sent, oldest first.
    unconfirmed: VecDeque<Vec<oneshot::Sender<Result<Published>>>>,
    /// A message that would have taken its batch past the byte limit: the next batch's first.
    held_over: Option<Queued>,
}

struct Stream {
    requests: mpsc::Sender<pb::PublishRequest>,
    responses: tonic::Streaming<pb::PublishResponse>,
}

impl Task {
    async fn run(mut self) {
        loop {
            let room = self.unconfirmed.len() < self.options.in_flight.max(1);
            // Read whenever a stream is open: one that ends while idle is noticed then, not by
            // the next batch.
            let open = self.stream.is_some();
            if room && let Some(first) = self.held_over.take() {
                self.send_batch(first).await;
                continue;
            }
            tokio::select! {
                first = self.queued.recv(), if room => match first {
                    Some(first) => self.send_batch(first).await,
                    // Every publisher is gone: confirm what is in flight, then stop.
                    None => {
                        while !self.unconfirmed.is_empty() {
                            self.read_confirmation().await;
                        }
                        return;
                    }
                },
                response = next_response(&mut self.stream), if open => {
                    self.confirm(response);
                }
            }
        }
    }

    /// Sends `first` and whatever else is queued, up to the batch limits (a message that
    /// would pass them waits for the next batch).
    async fn send_batch(&mut self, first: Queued) {
        let mut bytes = first.message.size();
        let mut batch = vec![first];
        while batch.len() < self.options.max_batch_messages {
            let Ok(next) = self.queued.try_recv() else {
                break;
            };
            let size = next.message.size();
            if bytes + size > self.options.max_batch_bytes {
                self.held_over = Some(next);
                break;
            }
            bytes += size;
            batch.push(next);
        }
        let (messages, confirms): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|q| (q.message.into_proto(), q.confirm))
            .unzip();
        let request = pb::PublishRequest {
            channel: self.channel.clone(),
            messages,
        };
        if let Err(e) = self.open().await {
            fail(confirms, &e);
            return;
        }
        let stream = self.stream.as_ref().expect("opened");
        if stream.requests.send(request).await.is_err() {
            // The call ended: what it had not confirmed was not applied.
            self.reset(Error::Disconnected("the publish stream ended".into()));
            fail(
                confirms,
                &Error::Disconnected("the publish stream ended".into()),
            );
            return;
        }
        self.unconfirmed.push_back(confirms);
    }

    async fn open(&mut self) -> Result<()> {
        if self.stream.is_some() {
            return Ok(());
        }
        let (requests, outbound) = mpsc::channel(self.options.in_flight.max(1));
        let outbound = tokio_stream::wrappers::ReceiverStream::new(outbound);
        let responses = self.client.publish_stream(outbound).await?.into_inner();
        self.stream = Some(Stream {
            requests,
            responses,
        });
        Ok(())
    }

    async fn read_confirmation(&mut self) {
        let response = next_response(&mut self.stream).await;
        self.confirm(response);
    }

    fn confirm(&mut self, response: Result<Option<pb::PublishResponse>, tonic::Status>) {
        match response {
            Ok(Some(response)) => {
                let Some(confirms) = self.unconfirmed.pop_front() else {
                    return;
                };
                let published = Published::of(response);
                for (confirm, published) in confirms.into_iter().zip(published) {
                    let _ = confirm.send(Ok(published));
                }
            }
            // Ended while idle too: the next batch opens a new stream.
            Ok(None) => self.reset(Error::Disconnected("the publish stream ended".into())),
            Err(status) => {
                // The first unconfirmed batch is the one that failed.
                let error = Error::from(status);
                if let Some(confirms) = self.unconfirmed.pop_front() {
                    fail(confirms, &error);
                }
                self.reset(Error::Disconnected(format!(
                    "an earlier batch failed ({error}); this one may not have been applied"
                )));
            }
        }
    }

    /// Drops the stream, failing every batch still unconfirmed with `error`.
    fn reset(&mut self, error: Error) {
        self.stream = None;
        for confirms in self.unconfirmed.drain(..) {
            fail(confirms, &error);
        }
    }
}

async fn next_response(
    stream: &mut Option<Stream>,
) -> Result<Option<pb::PublishResponse>, tonic::Status> {
    match stream {
        Some(stream) => stream.responses.message().await,
        None => std::future::pending().await,
    }
}

fn fail(confirms: Vec<oneshot::Sender<Result<Published>>>, error: &Error) {
    for confirm in confirms {
        let _ = confirm.send(Err(error.clone()));
    }
}
