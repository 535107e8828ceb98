//! What can go wrong talking to a broker, in the client's own terms: a caller matches on
//! [`Error`] and [`Code`] without naming the gRPC library underneath.

use std::fmt;

/// Results of the client.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The broker could not be reached at all.
    #[error("cannot connect to {address}: {reason}")]
    Connect {
        /// The address tried.
        address: String,
        /// What the transport said.
        reason: String,
    },
    /// The broker answered with an error: `code` says what kind, `message` what to fix.
    #[error("{code}: {message}")]
    Refused {
        /// The kind of refusal.
        code: Code,
        /// The broker's explanation.
        message: String,
    },
    /// The connection was lost before the call's answer came (the call may or may not have
    /// taken effect: a publish with an id can be retried safely, it is de-duplicated).
    #[error("the connection to the broker was lost: {0}")]
    Disconnected(String),
    /// An ack or nack named a delivery the broker no longer holds for this consumer: it was
    /// settled already, its deadline passed, or the connection was lost since (it will be, or
    /// was, delivered again).
    #[error("the delivery is no longer held (settled already, deadline passed, or reconnected)")]
    Stale,
    /// An ack or nack named a delivery the broker never issued.
    #[error("the broker never issued this ack id")]
    UnknownAckId,
    /// What the caller asked for cannot be sent (e.g. a malformed address).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// The kind of refusal, for [`Error::Refused`]; `Unavailable` for a lost connection.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Refused { code, .. } => Some(*code),
            Error::Connect { .. } | Error::Disconnected(_) => Some(Code::Unavailable),
            _ => None,
        }
    }
}

/// The kinds of refusal a broker answers with (gRPC's status codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// The request is malformed: the message says what to fix.
    InvalidArgument,
    /// The channel or subscription does not exist.
    NotFound,
    /// It exists already.
    AlreadyExists,
    /// The broker's state does not allow it now (e.g. a channel still in use).
    FailedPrecondition,
    /// A limit was reached (a full channel, a full disk, too many consumers).
    ResourceExhausted,
    /// A position outside what the channel holds.
    OutOfRange,
    /// Not allowed for these credentials.
    PermissionDenied,
    /// No valid credentials.
    Unauthenticated,
    /// The broker is not serving now (shutting down, its store failed); retry later.
    Unavailable,
    /// The call took too long.
    DeadlineExceeded,
    /// Something the broker did not expect.
    Internal,
    /// Stored data could not be read back.
    DataLoss,
    /// Any other code.
    Other,
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::Unauthenticated => "UNAUTHENTICATED",
            Code::Unavailable => "UNAVAILABLE",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::Internal => "INTERNAL",
            Code::DataLoss => "DATA_LOSS",
            Code::Other => "ERROR",
        };
        f.write_str(name)
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code as C;
        let code = match status.code() {
            C::InvalidArgument => Code::InvalidArgument,
            C::NotFound => Code::NotFound,
            C::AlreadyExists => Code::AlreadyExists,
            C::FailedPrecondition => Code::FailedPrecondition,
            C::ResourceExhausted => Code::ResourceExhausted,
            C::OutOfRange => Code::OutOfRange,
            C::PermissionDenied => Code::PermissionDenied,
            C::Unauthenticated => Code::Unauthenticated,
            C::DeadlineExceeded => Code::DeadlineExceeded,
            // A transport failure (a reset, a refused connection, a broken HTTP/2 stream) is
            // a status the client library made, with the transport's error as its source; the
            // broker's own statuses have none.
            _ if std::error::Error::source(&status).is_some() => {
                return Error::Disconnected(status.message().to_owned());
            }
            C::Unknown | C::Cancelled => {
                return Error::Disconnected(status.message().to_owned());
            }
            C::Internal => Code::Internal,
            C::Unavailable => Code::Unavailable,
            C::DataLoss => Code::DataLoss,
            _ => Code::Other,
        };
        Error::Refused {
            code,
            message: status.message().to_owned(),
        }
    }
}

impl Error {
    /// Whether trying again later may succeed: the broker was unreachable or not serving.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. }
                | Error::Disconnected(_)
                | Error::Refused {
                    code: Code::Unavailable | Code::ResourceExhausted | Code::Internal,
                    ..
                }
        )
    }
}
