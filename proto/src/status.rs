//! Our error codes and the one table mapping them to `tonic::Code`. Domain
//! errors on both planes pick an [`ErrorCode`]; the gRPC layer turns it into a
//! `Status` here and nowhere else.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// What kind of failure an error is, from the caller's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request is malformed or a field is invalid.
    InvalidArgument,
    /// The named object does not exist.
    NotFound,
    /// An object with the same unique attribute exists.
    AlreadyExists,
    /// The object is not in a state that allows the operation.
    FailedPrecondition,
    /// A concurrent operation holds the object; retrying shortly may succeed.
    Aborted,
    /// No or wrong credentials.
    Unauthenticated,
    /// A dependency (database, broker) is unavailable; retrying may help.
    Unavailable,
    /// A dependency did not answer in time.
    DeadlineExceeded,
    /// A bug or an unexpected failure.
    Internal,
}

impl From<ErrorCode> for Code {
    fn from(code: ErrorCode) -> Self {
        match code {
            ErrorCode::InvalidArgument => Code::InvalidArgument,
            ErrorCode::NotFound => Code::NotFound,
            ErrorCode::AlreadyExists => Code::AlreadyExists,
            ErrorCode::FailedPrecondition => Code::FailedPrecondition,
            ErrorCode::Aborted => Code::Aborted,
            ErrorCode::Unauthenticated => Code::Unauthenticated,
            ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorCode::Internal => Code::Internal,
        }
    }
}

/// One invalid field: its path in the request (`trigger.kafka.hosts[1]`) and
/// why it is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into() }
    }
}

/// A status for `code` with `message`.
pub fn status(code: ErrorCode, message: impl Into<String>) -> Status {
    Status::new(code.into(), message)
}

/// `INVALID_ARGUMENT` carrying a `google.rpc.BadRequest` with one violation per
/// bad field; the message lists them too, for clients that ignore details.
pub fn invalid_argument(violations: &[FieldViolation]) -> Status {
    let summary = violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; ");
    let mut details = ErrorDetails::new();
    for v in violations {
        details.add_bad_request_violation(v.field.clone(), v.description.clone());
    }
    Status::with_error_details(Code::InvalidArgument, format!("invalid request: {summary}"), details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_invalid_argument_carries_one_violation_per_field() {
        let status = invalid_argument(&[
            FieldViolation::new("trigger.name", "must not be empty"),
            FieldViolation::new("trigger.kafka.hosts[0]", "port must be 1-65535"),
        ]);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("trigger.kafka.hosts[0]: port must be 1-65535"));
        let bad = status.get_details_bad_request().expect("bad request details");
        let fields: Vec<_> = bad.field_violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["trigger.name", "trigger.kafka.hosts[0]"]);
    }
}
