//! The gRPC edge's error type and its one mapping to `tonic::Status`. Unexpected errors are
//! logged here, once, and reach the caller only as an opaque INTERNAL.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};
use tracing::error;

/// A field and what is wrong with it, e.g. `("items[1].quantity", "must be at least 1")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Path of the field in the request.
    pub field: String,
    /// What is wrong.
    pub description: String,
}

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; every violation is listed.
    #[error("{}", describe(.0))]
    Invalid(Vec<Violation>),
    /// No such order.
    #[error("order {0} not found")]
    NotFound(String),
    /// The idempotency key names another order.
    #[error("idempotency key already used for a different order ({existing}); use a new key")]
    KeyReused {
        /// The order the key belongs to.
        existing: String,
    },
    /// The caller's token does not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// A limit on concurrent work was reached.
    #[error("{0}")]
    Exhausted(String),
    /// The server is going away or a dependency is down; retry elsewhere or later.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else: a bug or an infrastructure failure.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl Error {
    /// A single-field validation error.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::Invalid(vec![Violation {
            field: field.into(),
            description: description.into(),
        }])
    }
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        Error::Unexpected(anyhow::Error::new(error).context("database"))
    }
}

fn describe(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::Invalid(violations) => {
                let mut details = ErrorDetails::new();
                for v in &violations {
                    details.add_bad_request_violation(v.field.clone(), v.description.clone());
                }
                Status::with_error_details(Code::InvalidArgument, describe(&violations), details)
            }
            Error::NotFound(_) => Status::not_found(error.to_string()),
            Error::KeyReused { .. } => Status::already_exists(error.to_string()),
            Error::Exhausted(_) => Status::resource_exhausted(error.to_string()),
            Error::Forbidden(_) => Status::permission_denied(error.to_string()),
            Error::Unavailable(_) => Status::unavailable(error.to_string()),
            Error::Unexpected(error) => {
                error!(error.message = %error, error.cause_chain = ?error, "Request failed unexpectedly.");
                Status::internal("internal error; see the server log")
            }
        }
    }
}

/// Ends a call: records its gRPC status code on the request span (marking the span failed for
/// server-side errors only, as the RPC conventions ask) and turns an error into a `Status`.
pub(super) fn finish<T>(result: Result<T, Error>) -> Result<tonic::Response<T>, Status> {
    let span = tracing::Span::current();
    match result {
        Ok(value) => {
            span.record("rpc.grpc.status_code", 0);
            Ok(tonic::Response::new(value))
        }
        Err(error) => {
            let status = Status::from(error);
            span.record("rpc.grpc.status_code", status.code() as i32);
            let server_fault = matches!(
                status.code(),
                Code::Unknown
                    | Code::DeadlineExceeded
                    | Code::Unimplemented
                    | Code::Internal
                    | Code::Unavailable
                    | Code::DataLoss
            );
            if server_fault {
                crate::telemetry::record_error(
                    &span,
                    &format!("{:?}", status.code()),
                    &status.message(),
                );
            }
            Err(status)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_each_variant_to_its_code() {
        let cases = [
            (
                Error::invalid("customer_id", "must not be empty"),
                Code::InvalidArgument,
            ),
            (Error::NotFound("x".into()), Code::NotFound),
            (
                Error::KeyReused {
                    existing: "x".into(),
                },
                Code::AlreadyExists,
            ),
            (Error::Exhausted("too many".into()), Code::ResourceExhausted),
            (
                Error::Unavailable("shutting down".into()),
                Code::Unavailable,
            ),
            (
                Error::Unexpected(anyhow::anyhow!("disk on fire")),
                Code::Internal,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(Status::from(error).code(), code);
        }
    }

    #[test]
    fn invalid_names_every_field_and_carries_bad_request_details() {
        let status = Status::from(Error::Invalid(vec![
            Violation {
                field: "customer_id".into(),
                description: "must not be empty".into(),
            },
            Violation {
                field: "items[0].quantity".into(),
                description: "must be at least 1".into(),
            },
        ]));
        assert_eq!(
            status.message(),
            "customer_id: must not be empty; items[0].quantity: must be at least 1"
        );
        let details = status.get_error_details();
        assert_eq!(details.bad_request().unwrap().field_violations.len(), 2);
    }

    #[test]
    fn internal_errors_do_not_leak_details() {
        let status = Status::from(Error::Unexpected(anyhow::anyhow!("password=hunter2")));
        assert!(!status.message().contains("hunter2"));
    }
}
