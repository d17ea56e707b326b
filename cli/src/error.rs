//! What can go wrong in `kt`, how it is printed (the server's field
//! violations one per line) and the exit code each kind maps to.

use tonic::Code;
use tonic_types::StatusExt as _;

pub const EXIT_ERROR: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_UNAUTHENTICATED: u8 = 4;
pub const EXIT_UNAVAILABLE: u8 = 5;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line or an input file is wrong.
    #[error("{0}")]
    Usage(String),
    /// Something named does not exist (found out without asking the server
    /// for it by id, e.g. a trigger name).
    #[error("{0}")]
    NotFound(String),
    /// The server answered with an error.
    #[error("{}", .status.message())]
    Status { status: tonic::Status, server: String },
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;

impl CliError {
    pub fn usage(msg: impl Into<String>) -> Self {
        CliError::Usage(msg.into())
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::NotFound(_) => EXIT_NOT_FOUND,
            CliError::Status { status, .. } => match status.code() {
                Code::InvalidArgument => EXIT_USAGE,
                Code::NotFound => EXIT_NOT_FOUND,
                Code::Unauthenticated | Code::PermissionDenied => EXIT_UNAUTHENTICATED,
                Code::Unavailable | Code::DeadlineExceeded => EXIT_UNAVAILABLE,
                _ => EXIT_ERROR,
            },
            CliError::Other(_) => EXIT_ERROR,
        }
    }

    /// The lines printed on standard error.
    pub fn render(&self) -> String {
        match self {
            CliError::Usage(msg) => format!("error: {msg}"),
            CliError::NotFound(msg) => format!("error: not found: {msg}"),
            CliError::Other(e) => format!("error: {e:#}"),
            CliError::Status { status, server } => render_status(status, server),
        }
    }

    pub fn print(&self) {
        eprintln!("{}", self.render());
    }
}

fn render_status(status: &tonic::Status, server: &str) -> String {
    let message = status.message();
    match status.code() {
        Code::InvalidArgument => {
            let violations = status.get_details_bad_request().map(|b| b.field_violations).unwrap_or_default();
            if violations.is_empty() {
                format!("error: invalid argument: {message}")
            } else {
                let mut out = String::from("error: invalid argument: the server refused these fields:");
                for v in violations {
                    out.push_str(&format!("\n  {}: {}", v.field, v.description));
                }
                out
            }
        }
        Code::NotFound => format!("error: not found: {message}"),
        Code::Unauthenticated => {
            format!("error: unauthenticated: {message} (pass --token or set KT_API_TOKEN)")
        }
        Code::PermissionDenied => format!("error: permission denied: {message}"),
        Code::Unavailable => format!("error: unavailable: {server}: {message}"),
        Code::DeadlineExceeded => format!("error: deadline exceeded: {server}: {message} (see --timeout)"),
        code => format!("error: {}: {message}", code_name(code)),
    }
}

/// `FailedPrecondition` → `failed precondition`.
fn code_name(code: Code) -> String {
    let name = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kt_proto::status::{invalid_argument, FieldViolation};

    fn status_error(status: tonic::Status) -> CliError {
        CliError::Status { status, server: "http://127.0.0.1:1".into() }
    }

    #[test]
    fn test_field_violations_are_printed_one_per_line() {
        let e = status_error(invalid_argument(&[
            FieldViolation::new("trigger.name", "must not be empty"),
            FieldViolation::new("trigger.kafka.hosts[0]", "port must be 1-65535"),
        ]));
        assert_eq!(
            e.render(),
            "error: invalid argument: the server refused these fields:\n  trigger.name: must not be empty\n  \
             trigger.kafka.hosts[0]: port must be 1-65535"
        );
        assert_eq!(e.exit_code(), EXIT_USAGE);
    }

    #[test]
    fn test_exit_codes_follow_the_status_code() {
        let cases = [
            (Code::NotFound, EXIT_NOT_FOUND),
            (Code::Unauthenticated, EXIT_UNAUTHENTICATED),
            (Code::Unavailable, EXIT_UNAVAILABLE),
            (Code::AlreadyExists, EXIT_ERROR),
            (Code::FailedPrecondition, EXIT_ERROR),
            (Code::Internal, EXIT_ERROR),
        ];
        for (code, exit) in cases {
            assert_eq!(status_error(tonic::Status::new(code, "x")).exit_code(), exit, "{code:?}");
        }
        assert_eq!(CliError::usage("x").exit_code(), EXIT_USAGE);
        assert_eq!(CliError::NotFound("x".into()).exit_code(), EXIT_NOT_FOUND);
        assert_eq!(code_name(Code::FailedPrecondition), "failed precondition");
    }
}
