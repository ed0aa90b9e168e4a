//! `orderflow.v1.DeadLetters`: dead letters as a product. Lists each dead-letter queue with
//! its depth; shows messages decoded to JSON through the proto descriptors (so an operator can
//! read them without tools); replays or purges some or all of them.

use std::collections::HashSet;

use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::trace::TraceContextExt as _;
use orderflow_proto::orderflow::v1::{self as pb, dead_letters_server::DeadLetters};
use prost_reflect::{DescriptorPool, DynamicMessage};
use tonic::{Request, Response, Status};
use tracing::info;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::error::{Error, finish};
use crate::bus::{
    Topology,
    dead_letters::{self, DeadLetterQueues, Selection, Stored},
    message::{as_u64, header_str},
    topology::{QueueNames, header},
};

/// Default and largest number of dead letters one `ListDeadLetters` returns.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;

/// State behind `DeadLetters`.
#[derive(Debug, Clone)]
pub struct DeadLetterApi {
    queues: DeadLetterQueues,
    topology: Topology,
    descriptors: DescriptorPool,
}

impl DeadLetterApi {
    /// The API over `queues` of `topology`'s namespace.
    pub fn new(queues: DeadLetterQueues, topology: Topology) -> Self {
        let descriptors = DescriptorPool::decode(orderflow_proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set compiled into the binary is valid");
        DeadLetterApi {
            queues,
            topology,
            descriptors,
        }
    }

    /// The queue names for `queue`: a DLQ name, a work queue name, or `<service>.<name>`.
    fn resolve(&self, queue: &str) -> Result<QueueNames, Error> {
        if queue.is_empty() {
            return Err(Error::invalid("queue", "must not be empty"));
        }
        self.topology
            .all_queues()
            .into_iter()
            .find(|q| {
                q.dlq == queue
                    || q.work == queue
                    || format!(
                        "{}.{}",
                        q.subscription.service.as_str(),
                        q.subscription.name
                    ) == queue
            })
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "dead-letter queue `{queue}` (ListQueues shows them)"
                ))
            })
    }

    fn view(&self, queue: &QueueNames, stored: Stored) -> pb::DeadLetter {
        let headers = &stored.headers;
        let text = |key: &str| header_str(headers, key).unwrap_or_default().to_owned();
        let first_death = |key: &str| {
            header_str(headers, &format!("x-first-death-{key}"))
                .unwrap_or_default()
                .to_owned()
        };
        let (payload_json, decode_error) = self.decode(stored.kind.as_deref(), &stored.body);
        let reason = Some(text(header::DEAD_LETTER_REASON))
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| first_death("reason"));
        let attempts = headers
            .inner()
            .get(header::ATTEMPT)
            .or_else(|| headers.inner().get("x-delivery-count"))
            .and_then(as_u64)
            .unwrap_or(1);
        let death_time = death_time(headers);
        pb::DeadLetter {
            queue: queue.dlq.clone(),
            message_id: stored.message_id.unwrap_or_default(),
            r#type: stored.kind.unwrap_or_default(),
            order_id: stored.correlation_id.unwrap_or_default(),
            payload_json,
            decode_error,
            payload: stored.body,
            headers: headers
                .inner()
                .iter()
                .map(|(k, v)| (k.to_string(), display(v)))
                .collect(),
            reason,
            last_error: text(header::LAST_ERROR),
            attempts: attempts.min(u64::from(u32::MAX)) as u32,
            failing_service: text(header::FAILING_SERVICE),
            original_exchange: Some(text(header::ORIGINAL_EXCHANGE))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| first_death("exchange")),
            original_routing_key: Some(text(header::ORIGINAL_ROUTING_KEY))
                .filter(|s| !s.is_empty())
                .unwrap_or_default(),
            first_failure_at: crate::time::parse_rfc3339(&text(header::FIRST_FAILURE_AT))
                .or(death_time),
            last_failure_at: crate::time::parse_rfc3339(&text(header::LAST_FAILURE_AT))
                .or(death_time),
            replay_queue: queue.work.clone(),
        }
    }

    /// The body as proto JSON, or why it is not decodable.
    fn decode(&self, kind: Option<&str>, body: &[u8]) -> (String, String) {
        let Some(kind) = kind else {
            return (String::new(), "no `type` property".to_owned());
        };
        let Some(descriptor) = self.descriptors.get_message_by_name(kind) else {
            return (String::new(), format!("unknown message type `{kind}`"));
        };
        match DynamicMessage::decode(descriptor, body) {
            Ok(message) => match serde_json::to_string(&message) {
                Ok(json) => (json, String::new()),
                Err(e) => (String::new(), format!("not representable as JSON: {e}")),
            },
            Err(e) => (
                String::new(),
                format!("body does not decode as `{kind}`: {e}"),
            ),
        }
    }
}

/// When the broker dead-lettered it (`x-death[0].time`), for messages it dead-lettered itself.
fn death_time(headers: &FieldTable) -> Option<prost_types::Timestamp> {
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    let secs = first.inner().get("time").and_then(as_u64)?;
    Some(prost_types::Timestamp {
        seconds: secs as i64,
        nanos: 0,
    })
}

/// A header value as text.
fn display(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::FieldArray(items) => {
            format!(
                "[{}]",
                items
                    .as_slice()
                    .iter()
                    .map(display)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        AMQPValue::FieldTable(table) => format!(
            "{{{}}}",
            table
                .inner()
                .iter()
                .map(|(k, v)| format!("{k}: {}", display(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => as_u64(other).map_or_else(|| format!("{other:?}"), |n| n.to_string()),
    }
}

fn selection(ids: Vec<String>, all: bool) -> Result<Selection, Error> {
    match (all, ids.is_empty()) {
        (true, true) => Ok(Selection::All),
        (false, false) => Ok(Selection::Ids(ids.into_iter().collect::<HashSet<_>>())),
        (true, false) => Err(Error::invalid(
            "message_ids",
            "give message ids or all=true, not both",
        )),
        (false, true) => Err(Error::invalid(
            "message_ids",
            "give at least one message id, or all=true",
        )),
    }
}

impl From<dead_letters::Error> for Error {
    fn from(error: dead_letters::Error) -> Self {
        match error {
            dead_letters::Error::Disconnected => {
                Error::Unavailable("not connected to RabbitMQ; retry shortly".into())
            }
            dead_letters::Error::Publish(e) => Error::Unavailable(format!(
                "replay stopped, nothing lost (unreplayed messages stay in the queue): {e}"
            )),
            dead_letters::Error::Amqp(e) => {
                Error::Unexpected(anyhow::Error::new(e).context("dead-letter queue operation"))
            }
        }
    }
}

impl DeadLetterApi {
    async fn queues(&self) -> Result<pb::ListDeadLetterQueuesResponse, Error> {
        let mut queues = Vec::new();
        for names in self.topology.all_queues() {
            queues.push(pb::DeadLetterQueue {
                depth: self.queues.depth(&names.dlq).await?,
                name: names.dlq,
                work_queue: names.work,
                service: names.subscription.service.service_name().to_owned(),
            });
        }
        Ok(pb::ListDeadLetterQueuesResponse { queues })
    }

    async fn list(
        &self,
        request: pb::ListDeadLettersRequest,
    ) -> Result<pb::ListDeadLettersResponse, Error> {
        let names = self.resolve(&request.queue)?;
        let limit = match request.limit {
            0 => DEFAULT_LIMIT,
            n => n.min(MAX_LIMIT),
        };
        // Counted before peeking: messages the peek holds (until its channel closes and they
        // return) are not counted as ready.
        let depth = self.queues.depth(&names.dlq).await?;
        let stored = self.queues.peek(&names.dlq, u64::from(limit)).await?;
        let dead_letters = stored.into_iter().map(|s| self.view(&names, s)).collect();
        Ok(pb::ListDeadLettersResponse {
            dead_letters,
            depth,
        })
    }

    async fn get(&self, request: pb::GetDeadLetterRequest) -> Result<pb::DeadLetter, Error> {
        let names = self.resolve(&request.queue)?;
        if request.message_id.is_empty() {
            return Err(Error::invalid("message_id", "must not be empty"));
        }
        let stored = self.queues.peek(&names.dlq, dead_letters::MAX_SCAN).await?;
        let found = stored
            .into_iter()
            .find(|s| s.message_id.as_deref() == Some(request.message_id.as_str()))
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "dead letter `{}` in {}",
                    request.message_id, names.dlq
                ))
            })?;
        Ok(self.view(&names, found))
    }

    async fn replay_selected(
        &self,
        request: pb::ReplayRequest,
    ) -> Result<pb::ReplayResponse, Error> {
        let names = self.resolve(&request.queue)?;
        let selection = selection(request.message_ids, request.all)?;
        let (replayed, not_found) = self
            .queues
            .replay(&names.dlq, &names.work, &selection)
            .await?;
        // The replay is not part of the replayed messages' traces (they keep their own), but
        // related to them: link this call's span to each.
        let span = tracing::Span::current();
        for message in &replayed {
            let cx = crate::bus::propagation::extract(Some(&message.headers));
            let linked = cx.span().span_context().clone();
            if linked.is_valid() {
                span.add_link(linked);
            }
        }
        let replayed: Vec<String> = replayed.into_iter().filter_map(|m| m.message_id).collect();
        info!(queue = %names.dlq, target = %names.work, replayed = replayed.len(), "Replayed dead letters.");
        Ok(pb::ReplayResponse {
            replayed,
            not_found,
        })
    }

    async fn purge_selected(&self, request: pb::PurgeRequest) -> Result<pb::PurgeResponse, Error> {
        let names = self.resolve(&request.queue)?;
        let selection = selection(request.message_ids, request.all)?;
        let (purged, not_found) = self.queues.purge(&names.dlq, &selection).await?;
        info!(queue = %names.dlq, purged, "Purged dead letters.");
        Ok(pb::PurgeResponse { purged, not_found })
    }
}

#[tonic::async_trait]
impl DeadLetters for DeadLetterApi {
    async fn list_queues(
        &self,
        _req: Request<pb::ListDeadLetterQueuesRequest>,
    ) -> Result<Response<pb::ListDeadLetterQueuesResponse>, Status> {
        finish(self.queues().await)
    }

    async fn list_dead_letters(
        &self,
        req: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        finish(self.list(req.into_inner()).await)
    }

    async fn get_dead_letter(
        &self,
        req: Request<pb::GetDeadLetterRequest>,
    ) -> Result<Response<pb::DeadLetter>, Status> {
        finish(self.get(req.into_inner()).await)
    }

    async fn replay(
        &self,
        req: Request<pb::ReplayRequest>,
    ) -> Result<Response<pb::ReplayResponse>, Status> {
        finish(self.replay_selected(req.into_inner()).await)
    }

    async fn purge(
        &self,
        req: Request<pb::PurgeRequest>,
    ) -> Result<Response<pb::PurgeResponse>, Status> {
        finish(self.purge_selected(req.into_inner()).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_display_as_text() {
        assert_eq!(display(&crate::bus::message::text("boom")), "boom");
        assert_eq!(display(&AMQPValue::LongLongInt(3)), "3");
        assert_eq!(display(&AMQPValue::Boolean(true)), "true");
    }

    #[test]
    fn selection_needs_ids_or_all() {
        assert!(matches!(selection(vec![], true), Ok(Selection::All)));
        assert!(matches!(
            selection(vec!["a".into()], false),
            Ok(Selection::Ids(_))
        ));
        assert!(selection(vec![], false).is_err());
        assert!(selection(vec!["a".into()], true).is_err());
    }

    #[test]
    fn showing_hostile_dead_letters_never_panics() {
        use rand::{Rng as _, SeedableRng as _};
        let api = api();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let kinds = [
            Some("orderflow.v1.OrderCreated"),
            Some("orderflow.v1.PaymentFailed"),
            Some("x"),
            None,
        ];
        for i in 0..5_000 {
            let len = rng.random_range(0..200);
            let body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let _ = api.decode(kinds[i % kinds.len()], &body);
        }
        let (json, error) = api.decode(
            Some("orderflow.v1.OrderCreated"),
            &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        );
        assert!(json.is_empty() && !error.is_empty());
    }

    fn api() -> DeadLetterApi {
        DeadLetterApi {
            queues: DeadLetterQueues::new(crate::bus::Broker::new(
                "amqp://localhost".parse().unwrap(),
                "test",
                Topology::new("ns", 1, 1),
                crate::bus::topology::Declare::All,
            )),
            topology: Topology::new("ns", 1, 1),
            descriptors: DescriptorPool::decode(orderflow_proto::FILE_DESCRIPTOR_SET).unwrap(),
        }
    }

    #[test]
    fn decodes_events_to_proto_json() {
        let api = api();
        let body = prost::Message::encode_to_vec(&pb::OrderCreated {
            order_id: "o-1".into(),
            customer_id: "alice".into(),
            items: vec![pb::OrderLine {
                sku: "KB-001".into(),
                quantity: 2,
            }],
            created_at: None,
        });
        let (json, error) = api.decode(Some("orderflow.v1.OrderCreated"), &body);
        assert_eq!(error, "");
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["orderId"], "o-1");
        assert_eq!(value["items"][0]["sku"], "KB-001");
        let (json, error) = api.decode(Some("orderflow.v1.OrderCreated"), b"\xff\xff\xff");
        assert!(
            json.is_empty() && error.contains("does not decode"),
            "{error}"
        );
        assert!(api.decode(None, &body).1.contains("no `type`"));
        assert!(
            api.decode(Some("x.Y"), &body)
                .1
                .contains("unknown message type")
        );
    }
}
