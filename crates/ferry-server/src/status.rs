//! The one place where errors become gRPC status codes: the broker's errors, and the transport's
//! refusals of requests it could not decode.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use ferry_core::{CoreError, StoreError};
use tonic::codegen::http;
use tonic::{Code, Status};

/// The gRPC status for a broker error.
pub fn to_status(error: CoreError) -> Status {
    let message = error.to_string();
    match error {
        CoreError::InvalidArgument(_) => Status::invalid_argument(message),
        CoreError::ChannelNotFound(_)
        | CoreError::SubscriptionNotFound { .. }
        | CoreError::DeadLetterChannelNotFound(_) => Status::not_found(message),
        CoreError::FailedPrecondition(_) => Status::failed_precondition(message),
        CoreError::ChannelExists(_) | CoreError::SubscriptionExists { .. } => {
            Status::already_exists(message)
        }
        CoreError::ShuttingDown => Status::unavailable(message),
        CoreError::ConsumerStalled { .. } | CoreError::TooManyConsumers { .. } => {
            Status::resource_exhausted(message)
        }
        CoreError::ConsumerDetached => Status::failed_precondition(message),
        CoreError::Storage(StoreError::Corrupt(_) | StoreError::Damaged { .. }) => {
            Status::data_loss(message)
        }
        CoreError::Storage(StoreError::ChannelNotFound | StoreError::SubscriptionNotFound) => {
            Status::not_found(message)
        }
        CoreError::Storage(StoreError::ChannelExists(_) | StoreError::SubscriptionExists(_)) => {
            Status::already_exists(message)
        }
        CoreError::Storage(StoreError::ChannelInUse(_)) => Status::failed_precondition(message),
        CoreError::Storage(StoreError::OutOfRange { .. }) => Status::out_of_range(message),
        CoreError::Storage(StoreError::Closed) => Status::unavailable(message),
        // Retrying helps once subscriptions have acked; the message names the limit.
        CoreError::Storage(StoreError::ChannelFull { .. }) => Status::resource_exhausted(message),
        // The client may try again once space is freed; the message says how much there is.
        CoreError::Storage(StoreError::NoSpace { .. } | StoreError::DiskFull { .. }) => {
            Status::resource_exhausted(message)
        }
        // Nothing was confirmed; the broker needs an operator (disk full, I/O error).
        CoreError::Storage(
            StoreError::Backend(_) | StoreError::Io { .. } | StoreError::Failed(_),
        ) => Status::unavailable(message),
    }
}

/// The start of tonic's refusal of a request over the decoding limit (`OUT_OF_RANGE`).
const TOO_LARGE: &str = "Error, decoded message length too large";
/// The start of prost's refusal of bytes that are not the method's message (`INTERNAL`).
const UNDECODABLE: &str = "failed to decode Protobuf message";

/// The status for a request that tonic refused before any of Ferry's code saw it, restated in
/// the API's terms: a request over the size limit or one that is not valid protobuf is the
/// client's error, `INVALID_ARGUMENT`, and the message names Ferry's own limit. Any other status
/// is returned unchanged.
pub fn transport_status(status: Status, max_request: usize) -> Status {
    let message = status.message();
    match status.code() {
        Code::OutOfRange if message.starts_with(TOO_LARGE) => {
            let found = message
                .split("found ")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .unwrap_or("more");
            Status::invalid_argument(format!(
                "the request is {found} bytes; a request may be at most {max_request} bytes \
                 (twice limits.max_batch_bytes, plus 1 MiB for protobuf framing): send fewer or \
                 smaller messages per request"
            ))
        }
        Code::Internal if message.starts_with(UNDECODABLE) => Status::invalid_argument(format!(
            "the request is not a valid protobuf message of this method's type ({message})"
        )),
        _ => status,
    }
}

/// Applies [`transport_status`] to every response that carries its status in its headers
/// (tonic's refusals of a unary request come that way); streaming calls apply it themselves to
/// the errors their request streams yield.
#[derive(Debug, Clone, Copy)]
pub struct TransportStatusLayer {
    /// The decoding limit the server was built with.
    pub max_request: usize,
}

impl<S> tower_layer::Layer<S> for TransportStatusLayer {
    type Service = TransportStatusService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TransportStatusService {
            inner,
            max_request: self.max_request,
        }
    }
}

/// The service [`TransportStatusLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct TransportStatusService<S> {
    inner: S,
    max_request: usize,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for TransportStatusService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let max_request = self.max_request;
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            if let Some(status) = Status::from_header_map(response.headers()) {
                let code = status.code();
                let restated = transport_status(status, max_request);
                if restated.code() != code {
                    let headers = response.headers_mut();
                    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                        headers.remove(name);
                    }
                    // Only fails for a message that cannot be a header, which ours never are.
                    let _ = restated.add_header(headers);
                }
            }
            Ok(response)
        })
    }
}
