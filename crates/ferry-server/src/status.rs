//! The one place where broker errors become gRPC status codes.

use ferry_core::{CoreError, StoreError};
use tonic::Status;

/// The gRPC status for a broker error.
pub fn to_status(error: CoreError) -> Status {
    let message = error.to_string();
    match error {
        CoreError::InvalidArgument(_) => Status::invalid_argument(message),
        CoreError::ChannelNotFound(_) | CoreError::SubscriptionNotFound { .. } => {
            Status::not_found(message)
        }
        CoreError::ChannelExists(_) | CoreError::SubscriptionExists { .. } => {
            Status::already_exists(message)
        }
        CoreError::ShuttingDown => Status::unavailable(message),
        CoreError::ConsumerStalled { .. } => Status::resource_exhausted(message),
        CoreError::Storage(StoreError::Corrupt(_)) => Status::data_loss(message),
        CoreError::Storage(StoreError::ChannelNotFound | StoreError::SubscriptionNotFound) => {
            Status::not_found(message)
        }
        CoreError::Storage(StoreError::ChannelExists(_) | StoreError::SubscriptionExists(_)) => {
            Status::already_exists(message)
        }
        CoreError::Storage(StoreError::Closed) => Status::unavailable(message),
        // Nothing was confirmed; the broker needs an operator (disk full, I/O error).
        CoreError::Storage(
            StoreError::Backend(_) | StoreError::Io { .. } | StoreError::Failed(_),
        ) => Status::unavailable(message),
    }
}
