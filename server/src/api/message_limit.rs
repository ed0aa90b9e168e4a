//! The request message size limit, checked on the wire before tonic decodes anything.
//!
//! The gRPC status code spec (and grpc-go and grpc-java) answer `RESOURCE_EXHAUSTED` to a
//! message over the configured limit, and clients branch on that code; tonic's own check answers
//! `OUT_OF_RANGE`. So every request body passes through [`Limited`], which reads each message's
//! length prefix as it streams by and fails the body with `RESOURCE_EXHAUSTED`, naming the limit,
//! as soon as a prefix announces too much. tonic hands a `Status` it finds in a body error on to
//! the caller unchanged, and the message itself is never buffered. It covers every service on
//! the server (health and reflection included) and every kind of call, streaming ones too.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http_body::{Frame, SizeHint};
use tonic::{
    Status,
    body::Body,
    codegen::{Bytes, http},
};

/// Applies the limit to every call of the services it wraps.
#[derive(Debug, Clone, Copy)]
pub(super) struct MessageLimitLayer {
    limit: usize,
}

impl MessageLimitLayer {
    /// Refuses request messages larger than `limit` bytes.
    pub(super) fn new(limit: usize) -> Self {
        MessageLimitLayer { limit }
    }
}

impl<S> tower_layer::Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MessageLimit {
            inner,
            limit: self.limit,
        }
    }
}

/// A service whose request bodies are [`Limited`].
#[derive(Debug, Clone)]
pub(super) struct MessageLimit<S> {
    inner: S,
    limit: usize,
}

impl<S> tonic::codegen::Service<http::Request<Body>> for MessageLimit<S>
where
    S: tonic::codegen::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let limit = self.limit;
        self.inner
            .call(request.map(|body| Body::new(Limited::new(body, limit))))
    }
}

/// A request body that fails once a message's length prefix is over the limit.
struct Limited {
    inner: Body,
    prefixes: Prefixes,
    failed: bool,
}

impl Limited {
    fn new(inner: Body, limit: usize) -> Self {
        Limited {
            inner,
            prefixes: Prefixes::new(limit),
            failed: false,
        }
    }
}

impl http_body::Body for Limited {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let limit = self.prefixes.limit;
        if let Some(data) = frame.data_ref()
            && let Err(length) = self.prefixes.feed(data)
        {
            self.failed = true;
            return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                "request message of {length} bytes is larger than the limit of {limit} bytes \
                 (ORDERFLOW_MAX_REQUEST_BYTES)"
            )))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Follows the gRPC length-prefixed framing (1 byte compression flag, 4 bytes big-endian
/// length, then the message) across however the transport happened to split it.
#[derive(Debug)]
struct Prefixes {
    limit: usize,
    prefix: [u8; 5],
    filled: usize,
    /// Bytes of the current message still to pass.
    skip: usize,
}

impl Prefixes {
    fn new(limit: usize) -> Self {
        Prefixes {
            limit,
            prefix: [0; 5],
            filled: 0,
            skip: 0,
        }
    }

    /// Reads the next bytes of the stream; the announced length of a message over the limit
    /// is the error.
    fn feed(&mut self, mut data: &[u8]) -> Result<(), usize> {
        while !data.is_empty() {
            if self.skip > 0 {
                let passed = self.skip.min(data.len());
                self.skip -= passed;
                data = &data[passed..];
                continue;
            }
            let taken = (self.prefix.len() - self.filled).min(data.len());
            self.prefix[self.filled..self.filled + taken].copy_from_slice(&data[..taken]);
            self.filled += taken;
            data = &data[taken..];
            if self.filled == self.prefix.len() {
                self.filled = 0;
                let [_, a, b, c, d] = self.prefix;
                let length = u32::from_be_bytes([a, b, c, d]) as usize;
                if length > self.limit {
                    return Err(length);
                }
                self.skip = length;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(length: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend(length.to_be_bytes());
        bytes.extend(std::iter::repeat_n(7, length as usize));
        bytes
    }

    #[test]
    fn messages_up_to_the_limit_pass_however_they_are_split() {
        let stream: Vec<u8> = [message(10), message(0), message(10)].concat();
        for chunk in 1..stream.len() {
            let mut prefixes = Prefixes::new(10);
            for piece in stream.chunks(chunk) {
                assert_eq!(prefixes.feed(piece), Ok(()), "chunks of {chunk}");
            }
        }
    }

    #[test]
    fn a_message_over_the_limit_is_caught_at_its_prefix() {
        let stream: Vec<u8> = [message(3), message(11)].concat();
        for chunk in 1..=9 {
            let mut prefixes = Prefixes::new(10);
            let caught = stream
                .chunks(chunk)
                .map(|piece| prefixes.feed(piece))
                .find(Result::is_err);
            assert_eq!(caught, Some(Err(11)), "chunks of {chunk}");
        }
        // The length is read as four big-endian bytes, not one.
        let mut prefixes = Prefixes::new(1 << 20);
        assert_eq!(prefixes.feed(&[0, 1, 0, 0, 1]), Err((1 << 24) + 1));
    }
}
