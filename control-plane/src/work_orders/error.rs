//! Errors of work-order operations, and their one mapping to gRPC status.

use kt_proto::status::{self, ErrorCode, FieldViolation};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum WorkOrderError {
    #[error("invalid request")]
    Invalid(Vec<FieldViolation>),
    #[error("work order {0} not found")]
    NotFound(Uuid),
    #[error(
        "work order {id} is {state}; only a running work order (accepted by the target with 202) can be completed"
    )]
    NotRunning { id: Uuid, state: String },
    /// Pending while a worker holds its set: the delivery is under way and
    /// the target may have answered 202 before the worker recorded it.
    #[error("work order {id} is being delivered right now; report its outcome again shortly")]
    InDelivery { id: Uuid },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl WorkOrderError {
    pub fn invalid(field: &str, description: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, description)])
    }
}

impl From<WorkOrderError> for tonic::Status {
    fn from(err: WorkOrderError) -> Self {
        match &err {
            WorkOrderError::Invalid(violations) => status::invalid_argument(violations),
            WorkOrderError::NotFound(_) => status::status(ErrorCode::NotFound, err.to_string()),
            WorkOrderError::NotRunning { .. } => status::status(ErrorCode::FailedPrecondition, err.to_string()),
            WorkOrderError::InDelivery { .. } => status::status(ErrorCode::Unavailable, err.to_string()),
            WorkOrderError::Database(db) => kt_common::db::status(db),
        }
    }
}
