//! A tap on the bus, shared by the test binaries (`#[path]`-included by each).

/// A private queue bound to `exchange` with `key`, consumed: sees a copy of every matching
/// message without taking any from the app.
pub(crate) async fn tap(conn: &lapin::Connection, exchange: &str, key: &str) -> lapin::Consumer {
    use lapin::{
        options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
        types::FieldTable,
    };
    let channel = conn.create_channel().await.expect("channel");
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("tap queue");
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("tap binding");
    channel
        .basic_consume(
            queue.name().clone(),
            "tap".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("tap consumer")
}
