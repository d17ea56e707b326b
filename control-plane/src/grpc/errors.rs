//! The one mapping from domain errors to gRPC status codes. Domain modules
//! return their own error types, which say what went wrong in their terms;
//! which code a client sees for each is decided here, and only here.

use kt_common::crypto::CryptoError;
use kt_common::db::{classify, DbErrorKind};
use kt_proto::status::{self, invalid_argument, ErrorCode, FieldViolation};
use tonic::Status;

use crate::dead_letters::DeadLetterError;
use crate::events::follow::StreamEnd;
use crate::nodes::{ConnectionTestError, Refused};
use crate::sets::SetError;
use crate::triggers::TriggerError;
use crate::work_orders::WorkOrderError;

/// A database error an API call cannot recover from: `UNAVAILABLE` when
/// retrying may help, `INTERNAL` otherwise. Logged here, once; the client
/// sees no SQL detail.
pub fn database(err: &sqlx::Error) -> Status {
    match classify(err) {
        DbErrorKind::Unavailable | DbErrorKind::Retryable => {
            tracing::warn!(error = %err, "database unavailable");
            status::status(ErrorCode::Unavailable, "database unavailable, try again")
        }
        _ => {
            tracing::error!(error = %err, "database error");
            status::status(ErrorCode::Internal, "internal database error")
        }
    }
}

impl From<TriggerError> for Status {
    fn from(err: TriggerError) -> Self {
        match &err {
            TriggerError::Invalid(violations) => status::invalid_argument(violations),
            TriggerError::NotFound(_) => status::status(ErrorCode::NotFound, err.to_string()),
            TriggerError::NameTaken(_) => status::status(ErrorCode::AlreadyExists, err.to_string()),
            TriggerError::OrderingChangeRefused(_) => status::status(ErrorCode::FailedPrecondition, err.to_string()),
            // The stored data or the configured keys need an operator, and
            // the message says which key id to look at.
            TriggerError::Crypto(CryptoError::NoKey | CryptoError::UnknownKey(_) | CryptoError::Decrypt(_)) => {
                status::status(ErrorCode::FailedPrecondition, err.to_string())
            }
            TriggerError::Crypto(_) => {
                tracing::error!(error = %err, "credential encryption failed");
                status::status(ErrorCode::Internal, "credential encryption failed")
            }
            TriggerError::Database(db) => database(db),
        }
    }
}

impl From<ConnectionTestError> for Status {
    fn from(err: ConnectionTestError) -> Self {
        let code = match err {
            ConnectionTestError::NoNode | ConnectionTestError::NodeLeft(_) => ErrorCode::Unavailable,
            ConnectionTestError::NoAnswer { .. } => ErrorCode::DeadlineExceeded,
        };
        status::status(code, err.to_string())
    }
}

impl From<SetError> for Status {
    fn from(err: SetError) -> Self {
        match &err {
            SetError::Invalid(violations) => status::invalid_argument(violations),
            SetError::NotFound(_) => status::status(ErrorCode::NotFound, err.to_string()),
            SetError::NotBlocked { .. }
            | SetError::NotSkippable { .. }
            | SetError::NothingToSkip { .. }
            | SetError::Claimed { .. } => status::status(ErrorCode::FailedPrecondition, err.to_string()),
            SetError::Database(db) => database(db),
        }
    }
}

impl From<WorkOrderError> for Status {
    fn from(err: WorkOrderError) -> Self {
        match &err {
            WorkOrderError::Invalid(violations) => status::invalid_argument(violations),
            WorkOrderError::NotFound(_) => status::status(ErrorCode::NotFound, err.to_string()),
            WorkOrderError::NotRunning { .. } => status::status(ErrorCode::FailedPrecondition, err.to_string()),
            WorkOrderError::InDelivery { .. } => status::status(ErrorCode::Unavailable, err.to_string()),
            WorkOrderError::Database(db) => database(db),
        }
    }
}

impl From<DeadLetterError> for Status {
    fn from(err: DeadLetterError) -> Self {
        match &err {
            DeadLetterError::Invalid(violations) => status::invalid_argument(violations),
            DeadLetterError::NotFound(_) => status::status(ErrorCode::NotFound, err.to_string()),
            DeadLetterError::Claimed { .. } => status::status(ErrorCode::Aborted, err.to_string()),
            DeadLetterError::Busy { .. } => status::status(ErrorCode::FailedPrecondition, err.to_string()),
            DeadLetterError::Database(db) => database(db),
        }
    }
}

impl From<Refused> for Status {
    fn from(err: Refused) -> Self {
        match &err {
            Refused::NoHello => invalid_argument(&[FieldViolation::new("msg", err.to_string())]),
            Refused::BadNodeId => invalid_argument(&[FieldViolation::new("hello.node_id", err.to_string())]),
            Refused::SchemaVersion { .. } => status::status(ErrorCode::FailedPrecondition, err.to_string()),
        }
    }
}

impl From<StreamEnd> for Status {
    fn from(end: StreamEnd) -> Self {
        match end {
            StreamEnd::TooSlow { .. } => Status::resource_exhausted(end.to_string()),
            StreamEnd::ReplayFailed | StreamEnd::Stopped { .. } | StreamEnd::Closed => {
                status::status(ErrorCode::Unavailable, end.to_string())
            }
        }
    }
}
