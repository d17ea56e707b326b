//! Errors of message-set operations. Their gRPC status codes are decided in `grpc/errors.rs`.

use chrono::{DateTime, SecondsFormat, Utc};
use kt_proto::status::FieldViolation;

use super::SetState;

#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("invalid request")]
    Invalid(Vec<FieldViolation>),
    #[error("message set {0} not found")]
    NotFound(i64),
    #[error("message set {id} is {state}; only a blocked set can be retried")]
    NotBlocked { id: i64, state: SetState },
    #[error("message set {id} is {state}; only the head message of a blocked or waiting set can be skipped")]
    NotSkippable { id: i64, state: SetState },
    #[error("message set {id} has no stored messages to skip")]
    NothingToSkip { id: i64 },
    #[error("message set {id} is being processed by a worker (claim held until {}); try again later", .until.to_rfc3339_opts(SecondsFormat::Millis, true))]
    Claimed { id: i64, until: DateTime<Utc> },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl SetError {
    pub fn invalid(field: &str, description: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, description)])
    }
}
