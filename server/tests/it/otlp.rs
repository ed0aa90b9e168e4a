//! An in-process OTLP/gRPC trace collector: stands in for Jaeger's port 4317 so tests can check
//! the spans orderflow-server really exports, over the real exporter and wire format.
//!
//! Received spans are flattened out of `resource_spans/scope_spans` into [`ReceivedSpan`]s with
//! hex ids and stringified attribute values, so assertions stay short.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
    trace::v1::{span, status::StatusCode},
};
use tokio::{net::TcpListener, task::JoinHandle, time::Instant};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// How often [`Collector::wait_for_trace`] looks again.
const POLL: Duration = Duration::from_millis(50);

/// A running collector. Clones share the same server and the same received spans; the server
/// stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Collector {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    server: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Aborting (rather than a graceful shutdown) is enough: nothing is in flight that a test
        // still cares about once it has dropped its last handle.
        self.server.abort();
    }
}

/// What the server has received so far.
#[derive(Debug, Default)]
struct Store {
    spans: Vec<ReceivedSpan>,
    export_calls: usize,
}

/// The OTLP `TraceService` the exporter talks to.
#[derive(Debug)]
struct Receiver {
    store: Arc<Mutex<Store>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        // Convert before locking so the lock is held only for the append.
        let spans = flatten(request.into_inner());
        let mut store = lock(&self.store);
        store.export_calls += 1;
        store.spans.extend(spans);
        drop(store);
        // No `partial_success`: everything was accepted.
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Binds 127.0.0.1:0 and serves OTLP `TraceService` until dropped (or the process ends).
    ///
    /// The listener is bound before this returns, so an exporter may connect right away: early
    /// connections wait in the accept backlog until the server task picks them up.
    pub(crate) async fn start() -> Collector {
        // A test cannot do anything useful without its collector, so failing to bind a loopback
        // port is a setup failure of the test itself.
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0 for the test OTLP collector");
        let addr = listener
            .local_addr()
            .expect("local address of the test OTLP collector");
        let store = Arc::new(Mutex::new(Store::default()));
        let service = TraceServiceServer::new(Receiver {
            store: Arc::clone(&store),
        });
        let server = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
            // Nobody awaits this task; say why spans stop arriving instead of failing silently.
            if let Err(error) = served {
                eprintln!("test OTLP collector on {addr} stopped: {error}");
            }
        });
        Collector {
            inner: Arc::new(Inner {
                addr,
                store,
                server,
            }),
        }
    }

    /// The URL an OTLP/gRPC exporter should use, e.g. `http://127.0.0.1:41234` (what
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` would be set to).
    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// All spans received so far, in arrival order.
    pub(crate) fn spans(&self) -> Vec<ReceivedSpan> {
        lock(&self.inner.store).spans.clone()
    }

    /// The spans received so far of one trace (32 hex chars, either case).
    pub(crate) fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        lock(&self.inner.store)
            .spans
            .iter()
            .filter(|span| span.trace_id.eq_ignore_ascii_case(trace_id))
            .cloned()
            .collect()
    }

    /// Polls every 50ms until `done(&spans_of_trace)` holds or `timeout` passes, then returns
    /// the spans of that trace either way, so the caller's assertions report what did arrive.
    pub(crate) async fn wait_for_trace(
        &self,
        trace_id: &str,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.trace(trace_id);
            let now = Instant::now();
            if done(&spans) || now >= deadline {
                return spans;
            }
            tokio::time::sleep(POLL.min(deadline - now)).await;
        }
    }

    /// How many export requests arrived (a batching exporter sends many spans per request).
    pub(crate) fn export_calls(&self) -> usize {
        lock(&self.inner.store).export_calls
    }
}

/// Locks the store; a panic elsewhere while holding the lock leaves the data usable, so a
/// poisoned lock is not a reason to fail another test.
fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One received span, flattened and stringified for easy assertions.
#[derive(Debug, Clone)]
pub(crate) struct ReceivedSpan {
    /// The resource attribute `service.name` ("" if absent).
    pub(crate) service_name: String,
    /// All resource attributes, values stringified like [`ReceivedSpan::attributes`].
    pub(crate) resource: HashMap<String, String>,
    pub(crate) name: String,
    pub(crate) kind: SpanKind,
    /// 32 lowercase hex chars.
    pub(crate) trace_id: String,
    /// 16 lowercase hex chars.
    pub(crate) span_id: String,
    /// 16 lowercase hex chars, "" for a root span.
    pub(crate) parent_span_id: String,
    /// Strings as is; ints, doubles, bools, arrays and maps as JSON (`3`, `0.5`, `true`,
    /// `["a","b"]`); bytes as hex; an absent value as "".
    pub(crate) attributes: HashMap<String, String>,
    /// Status code is ERROR.
    pub(crate) status_error: bool,
    pub(crate) status_message: String,
    /// (name, attributes), e.g. `("exception", {"exception.message": ...})`.
    pub(crate) events: Vec<(String, HashMap<String, String>)>,
    /// (trace id, span id) in hex.
    pub(crate) links: Vec<(String, String)>,
}

/// A span's kind (the OTLP enum, without the generated crate leaking into tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpanKind {
    Unspecified,
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

impl From<span::SpanKind> for SpanKind {
    fn from(kind: span::SpanKind) -> Self {
        match kind {
            span::SpanKind::Unspecified => SpanKind::Unspecified,
            span::SpanKind::Internal => SpanKind::Internal,
            span::SpanKind::Server => SpanKind::Server,
            span::SpanKind::Client => SpanKind::Client,
            span::SpanKind::Producer => SpanKind::Producer,
            span::SpanKind::Consumer => SpanKind::Consumer,
        }
    }
}

/// Lowercase hex of `bytes` (how trace and span ids are written everywhere else).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
            // Writing to a String cannot fail.
            let _ = write!(out, "{byte:02x}");
            out
        })
}

/// Flattens one export request into its spans, each carrying its resource.
fn flatten(request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let resource = attributes(
            resource_spans
                .resource
                .map(|resource| resource.attributes)
                .unwrap_or_default(),
        );
        let service_name = resource.get("service.name").cloned().unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                let kind = span.kind().into();
                let (status_error, status_message) = match span.status {
                    Some(status) => (status.code() == StatusCode::Error, status.message),
                    None => (false, String::new()),
                };
                out.push(ReceivedSpan {
                    service_name: service_name.clone(),
                    resource: resource.clone(),
                    name: span.name,
                    kind,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: attributes(span.attributes),
                    status_error,
                    status_message,
                    events: span
                        .events
                        .into_iter()
                        .map(|event| (event.name, attributes(event.attributes)))
                        .collect(),
                    links: span
                        .links
                        .into_iter()
                        .map(|link| (hex(&link.trace_id), hex(&link.span_id)))
                        .collect(),
                });
            }
        }
    }
    out
}

fn attributes(key_values: Vec<KeyValue>) -> HashMap<String, String> {
    key_values
        .into_iter()
        .map(|kv| (kv.key, stringify(kv.value.as_ref())))
        .collect()
}

/// A top-level attribute value as a string: strings (and hex bytes) bare, the rest as JSON.
fn stringify(value: Option<&AnyValue>) -> String {
    match to_json(value) {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(string) => string,
        other => other.to_string(),
    }
}

fn to_json(value: Option<&AnyValue>) -> serde_json::Value {
    use serde_json::Value as J;
    let Some(value) = value.and_then(|value| value.value.as_ref()) else {
        return J::Null;
    };
    match value {
        any_value::Value::StringValue(string) => J::String(string.clone()),
        any_value::Value::BoolValue(bool) => J::Bool(*bool),
        any_value::Value::IntValue(int) => J::from(*int),
        // NaN and infinities have no JSON form and come out as null.
        any_value::Value::DoubleValue(double) => J::from(*double),
        any_value::Value::ArrayValue(array) => {
            J::Array(array.values.iter().map(|v| to_json(Some(v))).collect())
        }
        any_value::Value::KvlistValue(list) => J::Object(
            list.values
                .iter()
                .map(|kv| (kv.key.clone(), to_json(kv.value.as_ref())))
                .collect(),
        ),
        any_value::Value::BytesValue(bytes) => J::String(hex(bytes)),
        // Only meaningful for profiles (an index into a string table); traces never use it.
        any_value::Value::StringValueStrindex(_) => J::Null,
    }
}

// The collector's own tests. They use a private tracer provider and never touch the globals,
// which other tests in this binary own.

/// The real OTLP exporter + batch processor deliver a parent and a child span, with resource,
/// kind, attributes, event, link and status intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporter_round_trip() {
    use opentelemetry::{
        Array, Context, KeyValue, StringValue, Value,
        trace::{
            Link, Span as _, SpanContext, SpanId, SpanKind as OtelKind, Status as OtelStatus,
            TraceContextExt as _, TraceFlags, TraceId, TraceState, Tracer as _,
            TracerProvider as _,
        },
    };
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};

    let collector = Collector::start().await;
    // Must be built inside the runtime: tonic's lazy channel spawns its worker on it.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(collector.endpoint())
        .build()
        .expect("OTLP exporter builds");
    // `builder_empty` keeps OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES out of the resource.
    let resource = Resource::builder_empty()
        .with_service_name("otlp-selftest")
        .with_attribute(KeyValue::new("deployment.environment", "selftest"))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("otlp-selftest");

    let mut parent = tracer.start_with_context("parent", &Context::new());
    parent.set_status(OtelStatus::error("parent failed"));
    let parent_cx = Context::new().with_span(parent);
    let linked = SpanContext::new(
        TraceId::from_bytes([0xab; 16]),
        SpanId::from_bytes([0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let mut child = tracer
        .span_builder("child publish")
        .with_kind(OtelKind::Producer)
        .with_attributes([
            KeyValue::new("messaging.system", "rabbitmq"),
            KeyValue::new("messaging.batch.message_count", 3_i64),
            KeyValue::new("retry", true),
            KeyValue::new("ratio", 0.5),
            KeyValue::new(
                "tags",
                Value::Array(Array::from(vec![
                    StringValue::from("a"),
                    StringValue::from("b"),
                ])),
            ),
        ])
        .with_links(vec![Link::with_context(linked)])
        .start_with_context(&tracer, &parent_cx);
    child.add_event(
        "exception",
        vec![KeyValue::new("exception.message", "broker went away")],
    );
    child.end();
    parent_cx.span().end();
    let trace_id = hex(&parent_cx.span().span_context().trace_id().to_bytes());
    let parent_id = hex(&parent_cx.span().span_context().span_id().to_bytes());

    // force_flush blocks until the batch thread's export finished; the export itself needs the
    // runtime's workers (tonic), so block a blocking-pool thread, not a worker.
    let flusher = provider.clone();
    tokio::task::spawn_blocking(move || flusher.force_flush())
        .await
        .expect("flush task")
        .expect("force_flush succeeds");

    // The flush returned after the collector answered, so everything is already stored.
    let spans = collector.trace(&trace_id);
    assert_eq!(
        spans.len(),
        2,
        "both spans of the trace arrived: {spans:#?}"
    );
    assert_eq!(
        collector.export_calls(),
        1,
        "the batch processor sent both spans in one request"
    );
    assert_eq!(collector.spans().len(), 2, "nothing else arrived");

    let parent = spans
        .iter()
        .find(|span| span.name == "parent")
        .expect("parent span");
    let child = spans
        .iter()
        .find(|span| span.name == "child publish")
        .expect("child span");

    for span in [parent, child] {
        assert_eq!(span.service_name, "otlp-selftest");
        assert_eq!(
            span.resource
                .get("deployment.environment")
                .map(String::as_str),
            Some("selftest")
        );
        assert_eq!(span.trace_id, trace_id);
        assert_eq!(span.trace_id.len(), 32);
        assert_eq!(span.span_id.len(), 16);
    }

    assert_eq!(parent.span_id, parent_id);
    assert_eq!(parent.parent_span_id, "", "parent is a root");
    assert_eq!(parent.kind, SpanKind::Internal);
    assert!(parent.status_error);
    assert_eq!(parent.status_message, "parent failed");
    assert!(parent.events.is_empty() && parent.links.is_empty());

    assert_eq!(child.parent_span_id, parent.span_id);
    assert_eq!(child.kind, SpanKind::Producer);
    assert!(!child.status_error);
    assert_eq!(child.status_message, "");
    let attribute = |key: &str| child.attributes.get(key).map(String::as_str);
    assert_eq!(attribute("messaging.system"), Some("rabbitmq"));
    assert_eq!(attribute("messaging.batch.message_count"), Some("3"));
    assert_eq!(attribute("retry"), Some("true"));
    assert_eq!(attribute("ratio"), Some("0.5"));
    assert_eq!(attribute("tags"), Some(r#"["a","b"]"#));
    assert_eq!(child.events.len(), 1);
    let (event_name, event_attributes) = &child.events[0];
    assert_eq!(event_name, "exception");
    assert_eq!(
        event_attributes
            .get("exception.message")
            .map(String::as_str),
        Some("broker went away")
    );
    assert_eq!(
        child.links,
        vec![("ab".repeat(16), "0123456789abcdef".to_owned())]
    );

    // Shutdown has nothing left to send, so it must not produce another request.
    tokio::task::spawn_blocking(move || provider.shutdown())
        .await
        .expect("shutdown task")
        .expect("provider shuts down");
    assert_eq!(collector.export_calls(), 1);
}

/// `wait_for_trace` returns as soon as its condition holds, and after the timeout with whatever
/// arrived otherwise. Spans are sent with the raw OTLP client, so this does not depend on the SDK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_trace_returns_on_condition_or_timeout() {
    use opentelemetry_proto::tonic::{
        collector::trace::v1::trace_service_client::TraceServiceClient,
        common::v1::{ArrayValue, KeyValueList},
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span},
    };

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(value) }),
            ..KeyValue::default()
        }
    }

    let collector = Collector::start().await;
    let trace_id = [0x5a_u8; 16];
    let trace_hex = hex(&trace_id);
    assert_eq!(trace_hex, "5a".repeat(16));
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv(
                    "service.name",
                    any_value::Value::StringValue("raw".to_owned()),
                )],
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: trace_id.to_vec(),
                    span_id: vec![0, 1, 2, 3, 4, 5, 6, 0xff],
                    name: "raw span".to_owned(),
                    kind: span::SpanKind::Consumer as i32,
                    attributes: vec![
                        kv("bytes", any_value::Value::BytesValue(vec![0xde, 0xad])),
                        kv(
                            "map",
                            any_value::Value::KvlistValue(KeyValueList {
                                values: vec![kv("n", any_value::Value::IntValue(-1))],
                            }),
                        ),
                        kv(
                            "mixed",
                            any_value::Value::ArrayValue(ArrayValue {
                                values: vec![
                                    AnyValue {
                                        value: Some(any_value::Value::DoubleValue(1.5)),
                                    },
                                    AnyValue {
                                        value: Some(any_value::Value::StringValue("x".to_owned())),
                                    },
                                ],
                            }),
                        ),
                        KeyValue {
                            key: "empty".to_owned(),
                            ..KeyValue::default()
                        },
                    ],
                    ..Span::default()
                }],
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    };

    // Send after a delay, so the first wait really has to poll.
    let endpoint = collector.endpoint();
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut client = TraceServiceClient::connect(endpoint)
            .await
            .expect("connect to the collector");
        client.export(request).await.expect("export accepted");
    });

    let started = std::time::Instant::now();
    let spans = collector
        .wait_for_trace(&trace_hex, Duration::from_secs(10), |spans| {
            !spans.is_empty()
        })
        .await;
    let waited = started.elapsed();
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert!(
        waited < Duration::from_secs(3),
        "returned soon after the span arrived, not at the timeout ({waited:?})"
    );
    sender.await.expect("sender task");

    let span = &spans[0];
    assert_eq!(span.service_name, "raw");
    assert_eq!(span.name, "raw span");
    assert_eq!(span.kind, SpanKind::Consumer);
    assert_eq!(span.span_id, "00010203040506ff");
    assert_eq!(span.parent_span_id, "");
    assert!(!span.status_error, "no status means not an error");
    let attribute = |key: &str| span.attributes.get(key).map(String::as_str);
    assert_eq!(attribute("bytes"), Some("dead"));
    assert_eq!(attribute("map"), Some(r#"{"n":-1}"#));
    assert_eq!(attribute("mixed"), Some(r#"[1.5,"x"]"#));
    assert_eq!(attribute("empty"), Some(""));
    // Case of the asked-for id does not matter.
    assert_eq!(collector.trace(&trace_hex.to_uppercase()).len(), 1);

    // A condition that never holds: back after the timeout, with what is there.
    let started = std::time::Instant::now();
    let spans = collector
        .wait_for_trace(&trace_hex, Duration::from_millis(300), |spans| {
            spans.len() >= 2
        })
        .await;
    let waited = started.elapsed();
    assert_eq!(spans.len(), 1);
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "returned at the timeout ({waited:?})"
    );

    // An unknown trace is simply empty.
    let unknown = collector
        .wait_for_trace(&"0".repeat(32), Duration::from_millis(100), |spans| {
            !spans.is_empty()
        })
        .await;
    assert!(unknown.is_empty());
    assert_eq!(collector.export_calls(), 1);
}
