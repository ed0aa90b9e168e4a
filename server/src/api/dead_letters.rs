//! `orderflow.v1.DeadLetters`: dead letters as a product. Lists every source of dead letters
//! (each work queue, each service's outbox) with its depth; shows dead letters decoded to JSON
//! through the proto descriptors (so an operator can read them without tools); replays or
//! purges some or all of them. It reads Order's dead-letter store, never a queue, so browsing
//! costs nothing on any RabbitMQ version.

use orderflow_proto::orderflow::v1::{self as pb, dead_letters_server::DeadLetters};
use prost_reflect::{DescriptorPool, DynamicMessage};
use tonic::{Request, Response, Status};
use tracing::info;

use super::error::{Error, finish};
use crate::{
    bus::Topology,
    order::dead_letters::{DeadLetterStore, Selection, Stored, sources},
};

/// Default and largest number of dead letters one `ListDeadLetters` returns.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;

/// Suffix of a source's name as the API shows it: its dead-letter queue.
const DLQ: &str = ".dlq";

/// State behind `DeadLetters`.
#[derive(Debug, Clone)]
pub struct DeadLetterApi {
    store: DeadLetterStore,
    topology: Topology,
    descriptors: DescriptorPool,
}

impl DeadLetterApi {
    /// The API over `store`, for `topology`'s namespace.
    pub fn new(store: DeadLetterStore, topology: Topology) -> Self {
        let descriptors = DescriptorPool::decode(orderflow_proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set compiled into the binary is valid");
        DeadLetterApi {
            store,
            topology,
            descriptors,
        }
    }

    /// The source `queue` names: its dead-letter queue's name (`<source>.dlq`), the source
    /// itself, or the short form `<service>.<name>` such as `payment.inventory-reserved`.
    fn resolve(&self, queue: &str) -> Result<String, Error> {
        if queue.is_empty() {
            return Err(Error::invalid("queue", "must not be empty"));
        }
        let name = queue.strip_suffix(DLQ).unwrap_or(queue);
        let namespaced = format!("{}.{name}", self.topology.namespace());
        sources(&self.topology)
            .into_iter()
            .find(|s| s.name == name || s.name == namespaced)
            .map(|s| s.name)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "dead-letter queue `{queue}` (ListQueues shows them)"
                ))
            })
    }

    fn view(&self, stored: Stored) -> pb::DeadLetter {
        let parked = stored.parked;
        let (payload_json, decode_error) = decode(&self.descriptors, &parked.kind, &parked.body);
        let replay_queue = if parked.replay_exchange.is_empty() {
            parked.replay_routing_key.clone()
        } else {
            format!("{} ({})", parked.replay_exchange, parked.replay_routing_key)
        };
        pb::DeadLetter {
            queue: format!("{}{DLQ}", parked.source),
            message_id: parked.message_id,
            r#type: parked.kind,
            order_id: parked.correlation_id,
            payload_json,
            decode_error,
            payload: parked.body,
            headers: parked.headers.into_iter().collect(),
            reason: parked.reason,
            last_error: parked.last_error,
            attempts: parked.attempts,
            failing_service: parked.failing_service,
            original_exchange: parked.original_exchange,
            original_routing_key: parked.original_routing_key,
            first_failure_at: parked.first_failure_at.map(crate::time::timestamp),
            last_failure_at: parked.last_failure_at.map(crate::time::timestamp),
            replay_queue,
        }
    }
}

/// The body as proto JSON, or why it is not decodable.
fn decode(descriptors: &DescriptorPool, kind: &str, body: &[u8]) -> (String, String) {
    if kind.is_empty() {
        return (String::new(), "no `type` property".to_owned());
    }
    let Some(descriptor) = descriptors.get_message_by_name(kind) else {
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

fn selection(ids: Vec<String>, all: bool) -> Result<Selection, Error> {
    match (all, ids.is_empty()) {
        (true, true) => Ok(Selection::All),
        (false, false) => Ok(Selection::Ids(ids)),
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

impl DeadLetterApi {
    async fn queues(&self) -> Result<pb::ListDeadLetterQueuesResponse, Error> {
        let mut depths = self.store.depths().await?;
        let mut queues: Vec<pb::DeadLetterQueue> = sources(&self.topology)
            .into_iter()
            .map(|source| pb::DeadLetterQueue {
                depth: depths.remove(&source.name).unwrap_or(0),
                name: format!("{}{DLQ}", source.name),
                work_queue: source.name,
                service: source.service.service_name().to_owned(),
            })
            .collect();
        // Dead letters from outside the known topology (another namespace's, a hand-made
        // message) are kept too, and must not be invisible.
        queues.extend(depths.into_iter().map(|(name, depth)| pb::DeadLetterQueue {
            name: format!("{name}{DLQ}"),
            work_queue: name,
            service: String::new(),
            depth,
        }));
        Ok(pb::ListDeadLetterQueuesResponse { queues })
    }

    async fn list(
        &self,
        request: pb::ListDeadLettersRequest,
    ) -> Result<pb::ListDeadLettersResponse, Error> {
        let source = self.resolve(&request.queue)?;
        let limit = match request.limit {
            0 => DEFAULT_LIMIT,
            n => n.min(MAX_LIMIT),
        };
        let (stored, depth) = self.store.list(&source, limit).await?;
        Ok(pb::ListDeadLettersResponse {
            dead_letters: stored.into_iter().map(|s| self.view(s)).collect(),
            depth,
        })
    }

    async fn get(&self, request: pb::GetDeadLetterRequest) -> Result<pb::DeadLetter, Error> {
        let source = self.resolve(&request.queue)?;
        if request.message_id.is_empty() {
            return Err(Error::invalid("message_id", "must not be empty"));
        }
        let stored = self
            .store
            .get(&source, &request.message_id)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "dead letter `{}` in {source}{DLQ}",
                    request.message_id
                ))
            })?;
        Ok(self.view(stored))
    }

    async fn replay_selected(
        &self,
        request: pb::ReplayRequest,
    ) -> Result<pb::ReplayResponse, Error> {
        let source = self.resolve(&request.queue)?;
        let selection = selection(request.message_ids, request.all)?;
        let (replayed, not_found) = self.store.replay(&source, &selection).await?;
        // A message dead-lettered twice is replayed twice (the inbox keeps one), named once.
        let mut seen = std::collections::HashSet::new();
        let ids: Vec<String> = replayed
            .into_iter()
            .map(|s| s.parked.message_id)
            .filter(|id| seen.insert(id.clone()))
            .collect();
        info!(queue = %source, replayed = ids.len(), "Replayed dead letters.");
        Ok(pb::ReplayResponse {
            replayed: ids,
            not_found,
        })
    }

    async fn purge_selected(&self, request: pb::PurgeRequest) -> Result<pb::PurgeResponse, Error> {
        let source = self.resolve(&request.queue)?;
        let selection = selection(request.message_ids, request.all)?;
        let (purged, not_found) = self.store.purge(&source, &selection).await?;
        info!(queue = %source, purged, "Purged dead letters.");
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

    fn descriptors() -> DescriptorPool {
        DescriptorPool::decode(orderflow_proto::FILE_DESCRIPTOR_SET).unwrap()
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
        let pool = descriptors();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let kinds = [
            "orderflow.v1.OrderCreated",
            "orderflow.v1.PaymentFailed",
            "x",
            "",
        ];
        for i in 0..5_000 {
            let len = rng.random_range(0..200);
            let body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let _ = decode(&pool, kinds[i % kinds.len()], &body);
        }
        let (json, error) = decode(
            &pool,
            "orderflow.v1.OrderCreated",
            &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        );
        assert!(json.is_empty() && !error.is_empty());
    }

    #[test]
    fn decodes_events_to_proto_json() {
        let pool = descriptors();
        let body = prost::Message::encode_to_vec(&pb::OrderCreated {
            order_id: "o-1".into(),
            customer_id: "alice".into(),
            items: vec![pb::OrderLine {
                sku: "KB-001".into(),
                quantity: 2,
            }],
            created_at: None,
        });
        let (json, error) = decode(&pool, "orderflow.v1.OrderCreated", &body);
        assert_eq!(error, "");
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["orderId"], "o-1");
        assert_eq!(value["items"][0]["sku"], "KB-001");
        let (json, error) = decode(&pool, "orderflow.v1.OrderCreated", b"\xff\xff\xff");
        assert!(
            json.is_empty() && error.contains("does not decode"),
            "{error}"
        );
        assert!(decode(&pool, "", &body).1.contains("no `type`"));
        assert!(
            decode(&pool, "x.Y", &body)
                .1
                .contains("unknown message type")
        );
    }
}
