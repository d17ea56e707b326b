//! Errors of trigger operations, and their one mapping to gRPC status.

use kt_common::crypto::CryptoError;
use kt_common::db::{classify, constraint, DbErrorKind};
use kt_proto::status::{self, ErrorCode, FieldViolation};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("invalid trigger")]
    Invalid(Vec<FieldViolation>),
    #[error("trigger {0} not found")]
    NotFound(Uuid),
    #[error("a trigger named `{0}` already exists")]
    NameTaken(String),
    #[error("credentials cannot be stored: {0}")]
    Crypto(#[from] CryptoError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl TriggerError {
    pub fn invalid(field: &str, description: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, description)])
    }

    /// A unique violation on the name constraint means the name is taken;
    /// anything else stays a database error.
    pub fn from_write(err: sqlx::Error, name: &str) -> Self {
        if classify(&err) == DbErrorKind::UniqueViolation && constraint(&err) == Some("triggers_name_key") {
            Self::NameTaken(name.to_owned())
        } else {
            Self::Database(err)
        }
    }
}

impl From<TriggerError> for tonic::Status {
    fn from(err: TriggerError) -> Self {
        match &err {
            TriggerError::Invalid(violations) => status::invalid_argument(violations),
            TriggerError::NotFound(_) => status::status(ErrorCode::NotFound, err.to_string()),
            TriggerError::NameTaken(_) => status::status(ErrorCode::AlreadyExists, err.to_string()),
            // The stored data or the configured keys need an operator, and
            // the message says which key id to look at.
            TriggerError::Crypto(CryptoError::NoKey | CryptoError::UnknownKey(_) | CryptoError::Decrypt(_)) => {
                status::status(ErrorCode::FailedPrecondition, err.to_string())
            }
            TriggerError::Crypto(_) => {
                tracing::error!(error = %err, "credential encryption failed");
                status::status(ErrorCode::Internal, "credential encryption failed")
            }
            TriggerError::Database(db) => kt_common::db::status(db),
        }
    }
}
