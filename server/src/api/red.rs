//! Rate, errors and duration of every gRPC call, as a tower layer around the whole server:
//! `orderflow_grpc_server_started_total`, `orderflow_grpc_server_handled_total` (by
//! `grpc_code`) and `orderflow_grpc_server_handling_seconds`, named and labelled as
//! go-grpc-prometheus names them, so the usual dashboards and alerts read them as they are.
//!
//! A call ends when its status is known: in the response headers of a trailers-only response
//! (most errors), otherwise in the trailers after the last message, which the wrapped response
//! body sees go by. A server stream (`WatchOrder`) therefore lasts as long as the stream, and
//! its `handling_seconds` are its lifetime: dashboards look at latency with
//! `grpc_type="unary"`. A call whose response is dropped before its status went out (the client
//! cancelled, the connection dropped) counts as `CANCELLED`, as gRPC reports it to the client.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::LazyLock,
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body, Frame, SizeHint};
use prost::Message as _;
use tonic::{
    Code,
    codegen::{
        Service,
        http::{HeaderMap, Request, Response},
    },
};

use crate::metrics::{Metrics, Rpc};

/// Adds RED metrics to every call of the service it wraps.
#[derive(Debug, Clone)]
pub(super) struct RedLayer {
    metrics: Metrics,
}

impl RedLayer {
    /// Records into `metrics`.
    pub(super) fn new(metrics: Metrics) -> Self {
        RedLayer { metrics }
    }
}

impl<S> tower_layer::Layer<S> for RedLayer {
    type Service = Red<S>;

    fn layer(&self, inner: S) -> Red<S> {
        Red {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`RedLayer`] makes.
#[derive(Debug, Clone)]
pub(super) struct Red<S> {
    inner: S,
    metrics: Metrics,
}

type Pending<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, ResBody> Service<Request<B>> for Red<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<Timed<ResBody>>;
    type Error = S::Error;
    type Future = Pending<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let mut call = Call::start(self.metrics.clone(), request.uri().path());
        let response = self.inner.call(request);
        Box::pin(async move {
            match response.await {
                Ok(response) => {
                    // Trailers-only: the status is already here, and the body is empty.
                    call.code = status(response.headers());
                    Ok(response.map(|inner| Timed {
                        inner,
                        call: Some(call),
                    }))
                }
                Err(error) => {
                    call.finish("UNKNOWN");
                    Err(error)
                }
            }
        })
    }
}

/// A response body that ends its call when its trailers go by, or when it is dropped.
#[derive(Debug)]
pub(super) struct Timed<B> {
    inner: B,
    call: Option<Call>,
}

impl<B: Body + Unpin> Body for Timed<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(|t| status(t)),
            Poll::Ready(Some(Err(_))) => Some(Some("UNKNOWN")),
            Poll::Ready(None) => Some(None),
            Poll::Pending => None,
        };
        if let Some(code) = ended
            && let Some(mut call) = this.call.take()
        {
            // A body that ends without a status in its trailers or headers is no gRPC answer.
            let code = code.or(call.code).unwrap_or("UNKNOWN");
            call.finish(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One call in flight; counted as ended exactly once.
#[derive(Debug)]
struct Call {
    metrics: Metrics,
    rpc: Rpc,
    started: Instant,
    /// The status from the response headers, once they are sent.
    code: Option<&'static str>,
    done: bool,
}

impl Call {
    fn start(metrics: Metrics, path: &str) -> Call {
        let rpc = METHODS.get(path).cloned().unwrap_or_else(|| Rpc {
            grpc_type: "unknown",
            grpc_service: "unknown".to_owned(),
            grpc_method: "unknown".to_owned(),
        });
        metrics.rpc_started(&rpc);
        Call {
            metrics,
            rpc,
            started: Instant::now(),
            code: None,
            done: false,
        }
    }

    fn finish(&mut self, code: &'static str) {
        if !self.done {
            self.done = true;
            self.metrics
                .rpc_handled(&self.rpc, code, self.started.elapsed());
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // An empty trailers-only body may never be polled; its status came in the headers.
        // Without one, the response went away before its status: the caller is gone.
        let code = self.code.unwrap_or("CANCELLED");
        self.finish(code);
    }
}

/// The `grpc-status` in `headers`, by its canonical name.
fn status(headers: &HeaderMap) -> Option<&'static str> {
    headers
        .get("grpc-status")
        .map(|value| orderflow_proto::grpc_code_name(Code::from_bytes(value.as_bytes())))
}

/// Every method this server can serve, by path (`/package.Service/Method`), read from the
/// descriptors it serves reflection from. Only these get labels of their own: a client calling
/// made-up paths must not grow the label sets without bound.
static METHODS: LazyLock<HashMap<String, Rpc>> = LazyLock::new(|| {
    let sets = [
        orderflow_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut methods = HashMap::new();
    for set in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                let service_name = if package.is_empty() {
                    service.name().to_owned()
                } else {
                    format!("{package}.{}", service.name())
                };
                for method in &service.method {
                    let grpc_type = match (method.client_streaming(), method.server_streaming()) {
                        (false, false) => "unary",
                        (false, true) => "server_stream",
                        (true, false) => "client_stream",
                        (true, true) => "bidi_stream",
                    };
                    methods.insert(
                        format!("/{service_name}/{}", method.name()),
                        Rpc {
                            grpc_type,
                            grpc_service: service_name.clone(),
                            grpc_method: method.name().to_owned(),
                        },
                    );
                }
            }
        }
    }
    methods
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_methods_get_their_streaming_type() {
        let place = &METHODS["/orderflow.v1.OrderService/PlaceOrder"];
        assert_eq!(place.grpc_type, "unary");
        assert_eq!(place.grpc_service, "orderflow.v1.OrderService");
        assert_eq!(place.grpc_method, "PlaceOrder");
        assert_eq!(
            METHODS["/orderflow.v1.OrderService/WatchOrder"].grpc_type,
            "server_stream"
        );
        assert_eq!(METHODS["/grpc.health.v1.Health/Check"].grpc_type, "unary");
        assert_eq!(
            METHODS["/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"].grpc_type,
            "bidi_stream"
        );
    }

    #[test]
    fn statuses_read_by_their_canonical_names() {
        let mut headers = HeaderMap::new();
        assert_eq!(status(&headers), None);
        headers.insert("grpc-status", "3".parse().unwrap());
        assert_eq!(status(&headers), Some("INVALID_ARGUMENT"));
        headers.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(status(&headers), Some("OK"));
    }
}
