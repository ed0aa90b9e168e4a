//! The spans of recoverability: sending a failed message to be retried, parking it as a dead
//! letter, and replaying a dead letter. Without them a trace shows a failed attempt and then,
//! seconds later, another one, with nothing in between saying why or when.
//!
//! - Each is an INFO span of this crate, so it reaches the exporter at the default level.
//! - The log line about it is written inside it, so the line carries the trace id.
//! - The copy it publishes carries its context, so the next attempt (or the dead-letter intake)
//!   continues the trace from it.
//! - A replay is an operator's act: its span belongs to the trace of the request that asked for
//!   it, and links to the trace the message failed in.

use std::time::Duration;

use opentelemetry::{Context, trace::TraceContextExt as _};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::{service::Service, telemetry};

/// A message being sent again, and where it goes.
#[derive(Debug, Clone, Copy)]
pub struct Resend<'a> {
    /// The service sending it.
    pub service: Service,
    /// The queue it failed on (or, for a replay, the one it failed on back then).
    pub queue: &'a str,
    /// The exchange the copy is published to.
    pub exchange: &'a str,
    /// The routing key the copy is published with.
    pub routing_key: &'a str,
    /// Its message id.
    pub message_id: &'a str,
    /// The order it is about.
    pub order_id: &'a str,
    /// Its event type.
    pub event_type: &'a str,
}

/// The span of sending a message that failed its `attempt`-th try to be tried again after
/// `delay`, as a child of `parent` (the context the message carried). It records `error` as an
/// exception event but is not itself failed: retrying is the system working as designed.
pub fn retry_span(
    resend: &Resend<'_>,
    attempt: u32,
    delay: Duration,
    error_kind: &str,
    error: &dyn std::fmt::Display,
    parent: Context,
) -> Span {
    let span = tracing::info_span!(
        "retry",
        otel.name = %format!("retry {}", resend.queue),
        otel.kind = "producer",
        service.name = resend.service.service_name(),
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.operation.name = "retry",
        messaging.destination.name = %resend.exchange,
        messaging.rabbitmq.destination.routing_key = %resend.routing_key,
        messaging.message.id = %resend.message_id,
        messaging.message.conversation_id = %resend.order_id,
        event.type = %resend.event_type,
        order.id = %resend.order_id,
        retry.attempt = attempt,
        retry.delay_ms = delay.as_millis() as u64,
        error.type = %error_kind,
    );
    let _ = span.set_parent(parent);
    telemetry::record_exception(&span, error_kind, error);
    span
}

/// The span of parking a message as a dead letter after `attempts` tries, for `reason`, as a
/// child of `parent`. It is failed with `error`: the message did not get through.
pub fn dead_letter_span(
    resend: &Resend<'_>,
    reason: &str,
    attempts: u32,
    error: &dyn std::fmt::Display,
    parent: Context,
) -> Span {
    let span = tracing::info_span!(
        "dead-letter",
        otel.name = %format!("dead-letter {}", resend.queue),
        otel.kind = "producer",
        service.name = resend.service.service_name(),
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.operation.name = "dead-letter",
        messaging.destination.name = %resend.exchange,
        messaging.rabbitmq.destination.routing_key = %resend.routing_key,
        messaging.message.id = %resend.message_id,
        messaging.message.conversation_id = %resend.order_id,
        event.type = %resend.event_type,
        order.id = %resend.order_id,
        dead_letter.reason = %reason,
        dead_letter.attempts = attempts,
        error.type = %reason,
    );
    let _ = span.set_parent(parent);
    telemetry::record_error(&span, reason, error);
    span
}

/// The span of replaying a dead letter, a child of the current span (the operator's request),
/// linked to `original`, the context the message failed in.
pub fn replay_span(resend: &Resend<'_>, original: &Context) -> Span {
    let span = tracing::info_span!(
        "replay",
        otel.name = %format!("replay {}", resend.queue),
        otel.kind = "producer",
        service.name = resend.service.service_name(),
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.operation.name = "replay",
        messaging.destination.name = %resend.exchange,
        messaging.rabbitmq.destination.routing_key = %resend.routing_key,
        messaging.message.id = %resend.message_id,
        messaging.message.conversation_id = %resend.order_id,
        event.type = %resend.event_type,
        order.id = %resend.order_id,
    );
    span.add_link(original.span().span_context().clone());
    span
}
