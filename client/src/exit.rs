//! Turns a failed run into the one line on stderr and the process exit status.
//!
//! Scripts branch on the status, so failures are grouped by what the caller can do about
//! them: fix the request (2), check the server or retry (3), or anything else (1).

use std::{io, process::ExitCode};

use tonic::{Code, Status};

use crate::api::ConnectError;

/// Bad arguments, or the server refused the request as such; retrying the same won't help.
/// Also what clap uses for usage errors.
const BAD_REQUEST: u8 = 2;
/// No answer: the server is down, unreachable or too slow; a retry may succeed.
const UNREACHABLE: u8 = 3;
const OTHER: u8 = 1;

/// Prints `err` to stderr and returns the exit status for it.
pub(crate) fn report(err: &anyhow::Error) -> ExitCode {
    // The reader of a pipe went away (`orderflow list --all | head`): that is how such
    // pipelines end, not a failure worth a message.
    if err.chain().any(|e| {
        e.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    }) {
        return ExitCode::SUCCESS;
    }
    let (message, code) = describe(err);
    eprintln!("error: {message}");
    ExitCode::from(code)
}

/// The message (without the `error: ` prefix) and exit status for `err`.
fn describe(err: &anyhow::Error) -> (String, u8) {
    if let Some(status) = err.chain().find_map(|e| e.downcast_ref::<Status>()) {
        let name = orderflow_proto::grpc_code_name(status.code());
        let message = if status.message().is_empty() {
            format!("{name}: {}", status.code().description())
        } else {
            format!("{name}: {}", status.message())
        };
        return (message, status_exit_code(status.code()));
    }
    if let Some(connect) = err.chain().find_map(|e| e.downcast_ref::<ConnectError>()) {
        return (connect.to_string(), UNREACHABLE);
    }
    (format!("{err:#}"), OTHER)
}

fn status_exit_code(code: Code) -> u8 {
    match code {
        Code::InvalidArgument | Code::NotFound | Code::AlreadyExists | Code::OutOfRange => {
            BAD_REQUEST
        }
        Code::Unavailable | Code::DeadlineExceeded => UNREACHABLE,
        _ => OTHER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_errors_show_the_canonical_code_and_message() {
        let err = anyhow::Error::new(Status::not_found("order o-1 not found"));
        assert_eq!(
            describe(&err),
            ("NOT_FOUND: order o-1 not found".to_owned(), BAD_REQUEST)
        );
        let err = anyhow::Error::new(Status::internal("boom")).context("getting order o-1");
        assert_eq!(describe(&err), ("INTERNAL: boom".to_owned(), OTHER));
        let err = anyhow::Error::new(Status::unavailable(""));
        assert_eq!(describe(&err).1, UNREACHABLE);
        assert!(describe(&err).0.starts_with("UNAVAILABLE: "));
    }

    #[test]
    fn other_errors_keep_their_context() {
        let err = anyhow::anyhow!("disk full").context("writing to stdout");
        assert_eq!(
            describe(&err),
            ("writing to stdout: disk full".to_owned(), OTHER)
        );
    }
}
