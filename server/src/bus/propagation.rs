//! W3C trace context (`traceparent`, `tracestate`, `baggage`) carried in AMQP headers, so a
//! consumer's processing span continues the trace of the publish that produced the message.

use std::collections::HashMap;

use lapin::types::FieldTable;
use opentelemetry::{
    Context, global,
    propagation::{Extractor, Injector},
};

use super::message::{Outgoing, header_str, text};

struct HeaderInjector<'a>(&'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Propagator keys are short ASCII names; headers are long strings by RabbitMQ convention.
        self.0.insert(key.into(), text(value));
    }
}

struct HeaderExtractor<'a>(&'a FieldTable);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        header_str(self.0, key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

/// Writes `cx` into AMQP headers.
pub fn inject(cx: &Context, headers: &mut FieldTable) {
    global::get_text_map_propagator(|p| p.inject_context(cx, &mut HeaderInjector(headers)));
}

impl Outgoing {
    /// Carries `context` (W3C trace context and baggage) in its headers, so the consumer's
    /// span continues the trace.
    pub fn with_trace_context(mut self, context: &Context) -> Self {
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        inject(context, &mut headers);
        self.properties = self.properties.with_headers(headers);
        self
    }
}

/// Reads the trace context from AMQP headers; an empty context when there is none.
pub fn extract(headers: Option<&FieldTable>) -> Context {
    match headers {
        Some(headers) => global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers))),
        None => Context::new(),
    }
}

/// The trace context as plain key/value pairs, for storing next to an outbox row.
pub fn to_map(cx: &Context) -> HashMap<String, String> {
    let mut map = HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(cx, &mut map));
    map
}

/// The trace context stored by [`to_map`].
pub fn from_map(map: &HashMap<String, String>) -> Context {
    global::get_text_map_propagator(|p| p.extract(map))
}
