//! `orderflow dlq` and `orderflow health`: the operator's commands. Dead letters are shown with
//! the failure's context first (reason, attempts, error) and their decoded payload, as the
//! server's `DeadLetters` API returns them.

use anyhow::{Result, bail};
use orderflow_proto::orderflow::v1 as pb;
use serde_json::{Value, json};

use crate::{
    api::Api,
    cli::{DlqCommand, DlqSelectArgs},
    output::{timestamp_json, timestamp_text},
};

/// Writes one rendering per result: JSON or text.
pub(crate) trait Print {
    /// Prints one result; only the chosen rendering is built.
    fn print(&mut self, json: impl FnOnce() -> Value, text: impl FnOnce() -> String) -> Result<()>;
}

/// Runs a `dlq` subcommand.
pub(crate) async fn run(api: &mut Api, out: &mut impl Print, command: DlqCommand) -> Result<()> {
    match command {
        DlqCommand::List(args) => match args.queue {
            None => {
                let queues = api.dead_letter_queues().await?.queues;
                out.print(
                    || json!({"queues": queues.iter().map(queue_json).collect::<Vec<_>>()}),
                    || queues_text(&queues),
                )
            }
            Some(queue) => {
                let page = api.dead_letters(queue, args.limit).await?;
                out.print(
                    || json!({"depth": page.depth, "deadLetters": page.dead_letters.iter().map(dead_letter_json).collect::<Vec<_>>()}),
                    || dead_letters_text(&page),
                )
            }
        },
        DlqCommand::Show(args) => {
            let letters = match args.message_id {
                Some(id) => vec![api.dead_letter(args.queue, id).await?],
                None => api.dead_letters(args.queue, 5).await?.dead_letters,
            };
            for letter in &letters {
                out.print(|| dead_letter_json(letter), || dead_letter_text(letter))?;
            }
            Ok(())
        }
        DlqCommand::Replay(args) => {
            let DlqSelectArgs {
                queue,
                message_ids,
                all,
            } = args;
            let done = api
                .replay(pb::ReplayRequest {
                    queue,
                    message_ids,
                    all,
                })
                .await?;
            out.print(
                || json!({"replayed": done.replayed, "notFound": done.not_found}),
                || selection_text("replayed", done.replayed.len() as u64, &done.not_found),
            )
        }
        DlqCommand::Purge(args) => {
            let DlqSelectArgs {
                queue,
                message_ids,
                all,
            } = args;
            let done = api
                .purge(pb::PurgeRequest {
                    queue,
                    message_ids,
                    all,
                })
                .await?;
            out.print(
                || json!({"purged": done.purged, "notFound": done.not_found}),
                || selection_text("purged", done.purged, &done.not_found),
            )
        }
    }
}

/// `orderflow health`: prints the status; fails unless SERVING.
pub(crate) async fn health(api: &mut Api, out: &mut impl Print, service: String) -> Result<()> {
    let status = api.health(service.clone()).await?;
    let name = tonic_health::pb::health_check_response::ServingStatus::try_from(status)
        .map_or_else(|_| status.to_string(), |s| s.as_str_name().to_owned());
    out.print(
        || json!({"service": service, "status": name}),
        || name.clone(),
    )?;
    if name != "SERVING" {
        bail!("the server reports {name}");
    }
    Ok(())
}

fn queue_json(queue: &pb::DeadLetterQueue) -> Value {
    json!({"name": queue.name, "workQueue": queue.work_queue, "service": queue.service, "depth": queue.depth})
}

fn queues_text(queues: &[pb::DeadLetterQueue]) -> String {
    let width = queues
        .iter()
        .map(|q| q.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut text = format!("{:<width$}  {:<18}  DEPTH", "DEAD-LETTER QUEUE", "SERVICE");
    for q in queues {
        text.push_str(&format!(
            "\n{:<width$}  {:<18}  {}",
            q.name, q.service, q.depth
        ));
    }
    text
}

fn dead_letter_json(letter: &pb::DeadLetter) -> Value {
    let payload: Value = serde_json::from_str(&letter.payload_json).unwrap_or(Value::Null);
    json!({
        "queue": letter.queue,
        "messageId": letter.message_id,
        "type": letter.r#type,
        "orderId": letter.order_id,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "lastError": letter.last_error,
        "failingService": letter.failing_service,
        "originalExchange": letter.original_exchange,
        "originalRoutingKey": letter.original_routing_key,
        "firstFailureAt": timestamp_json(letter.first_failure_at.as_ref()),
        "lastFailureAt": timestamp_json(letter.last_failure_at.as_ref()),
        "replayQueue": letter.replay_queue,
        "payload": payload,
        "decodeError": (!letter.decode_error.is_empty()).then_some(&letter.decode_error),
        "payloadBytes": letter.payload.len(),
        "headers": letter.headers,
    })
}

fn dead_letters_text(page: &pb::ListDeadLettersResponse) -> String {
    let mut text = format!("{} dead letter(s)", page.depth);
    for letter in &page.dead_letters {
        text.push_str(&format!(
            "\n{}  {}  order {}  {} after {} attempt(s): {}",
            letter.message_id,
            letter.r#type,
            letter.order_id,
            letter.reason,
            letter.attempts,
            letter.last_error
        ));
    }
    text
}

fn dead_letter_text(letter: &pb::DeadLetter) -> String {
    let payload = serde_json::from_str::<Value>(&letter.payload_json)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| {
            format!(
                "({} bytes that do not decode: {})",
                letter.payload.len(),
                letter.decode_error
            )
        });
    let mut headers: Vec<_> = letter.headers.iter().collect();
    headers.sort();
    let headers: Vec<String> = headers
        .into_iter()
        .map(|(k, v)| format!("  {k}: {v}"))
        .collect();
    format!(
        "message   {}\ntype      {}\norder     {}\nqueue     {} (replays to {})\nreason    {} after {} attempt(s) in {}\nerror     {}\nroute     {} / {}\nfailed    {} .. {}\npayload   {}\nheaders\n{}",
        letter.message_id,
        letter.r#type,
        letter.order_id,
        letter.queue,
        letter.replay_queue,
        letter.reason,
        letter.attempts,
        letter.failing_service,
        letter.last_error,
        letter.original_exchange,
        letter.original_routing_key,
        timestamp_text(letter.first_failure_at.as_ref()),
        timestamp_text(letter.last_failure_at.as_ref()),
        payload,
        headers.join("\n"),
    )
}

fn selection_text(verb: &str, count: u64, not_found: &[String]) -> String {
    let mut text = format!("{verb} {count}");
    if !not_found.is_empty() {
        text.push_str(&format!("; not found: {}", not_found.join(", ")));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter() -> pb::DeadLetter {
        pb::DeadLetter {
            queue: "of.payment.inventory-reserved.dlq".into(),
            message_id: "m-1".into(),
            r#type: "orderflow.v1.InventoryReserved".into(),
            order_id: "o-1".into(),
            payload_json: r#"{"orderId":"o-1"}"#.into(),
            payload: vec![1, 2, 3],
            reason: "max-attempts".into(),
            attempts: 5,
            last_error: "boom".into(),
            failing_service: "payment-service".into(),
            replay_queue: "of.payment.inventory-reserved".into(),
            headers: [("x-orderflow-attempt".to_owned(), "5".to_owned())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn dead_letter_json_embeds_the_decoded_payload() {
        let json = dead_letter_json(&letter());
        assert_eq!(json["payload"]["orderId"], "o-1");
        assert_eq!(json["attempts"], 5);
        assert_eq!(json["decodeError"], Value::Null);
        assert_eq!(json["headers"]["x-orderflow-attempt"], "5");
    }

    #[test]
    fn text_leads_with_the_failure() {
        let text = dead_letter_text(&letter());
        assert!(
            text.contains("reason    max-attempts after 5 attempt(s) in payment-service"),
            "{text}"
        );
        assert!(text.contains("\"orderId\": \"o-1\""), "{text}");
        let undecodable = pb::DeadLetter {
            payload_json: String::new(),
            decode_error: "bad".into(),
            ..letter()
        };
        assert!(dead_letter_text(&undecodable).contains("3 bytes that do not decode: bad"));
    }

    #[test]
    fn selections_report_what_was_missing() {
        assert_eq!(selection_text("replayed", 2, &[]), "replayed 2");
        assert_eq!(
            selection_text("purged", 0, &["x".into()]),
            "purged 0; not found: x"
        );
    }
}
