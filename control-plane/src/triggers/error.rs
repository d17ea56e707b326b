//! Errors of trigger operations. Their gRPC status codes are decided in `grpc/errors.rs`.

use kt_common::crypto::CryptoError;
use kt_common::db::{classify, constraint, DbErrorKind};
use kt_proto::status::FieldViolation;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("invalid trigger")]
    Invalid(Vec<FieldViolation>),
    #[error("trigger {0} not found")]
    NotFound(Uuid),
    #[error("a trigger named `{0}` already exists")]
    NameTaken(String),
    #[error(
        "trigger {0} has stored messages: disable it and let them drain (or discard their sets), \
         then change the ordering"
    )]
    OrderingChangeRefused(Uuid),
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
