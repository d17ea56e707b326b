//! Errors of work-order operations. Their gRPC status codes are decided in `grpc/errors.rs`.

use kt_proto::status::FieldViolation;
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
