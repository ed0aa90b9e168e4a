//! Deleting a namespace through the server's own topology: after `Topology::delete_all`, the
//! management API lists no queue and no exchange under the namespace's prefix (retry levels,
//! the dead-letter intake and its last-resort queue included), and what was still queued is
//! reported.

use base64::Engine as _;
use lapin::{
    BasicProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use orderflow_server::{bus::Topology, service::Service};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::helpers::{WAIT, amqp_url, management_url, raw_connection, unique_namespace};

/// Every queue and exchange of the broker's vhost whose name starts with `<namespace>.`, as
/// the management API lists them.
async fn listed(namespace: &str) -> Vec<String> {
    let amqp: lapin::uri::AMQPUri = amqp_url().parse().expect("AMQP_URL parses");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        amqp.authority.userinfo.username, amqp.authority.userinfo.password
    ));
    let url = management_url();
    let host = url.trim_start_matches("http://").trim_end_matches('/');
    let vhost = amqp.vhost.replace('/', "%2F");
    let mut names = Vec::new();
    for kind in ["queues", "exchanges"] {
        let mut stream = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(host))
            .await
            .expect("management API answers in time")
            .unwrap_or_else(|e| panic!("management API at {url}: {e}"));
        let request = format!(
            "GET /api/{kind}/{vhost}?columns=name HTTP/1.0\r\nHost: {host}\r\n\
             Authorization: Basic {auth}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
            .await
            .expect("management API answers in time")
            .unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let listed: Vec<serde_json::Value> = serde_json::from_str(body).expect("JSON list");
        names.extend(
            listed
                .iter()
                .filter_map(|item| item["name"].as_str())
                .filter(|name| name.starts_with(&format!("{namespace}.")))
                .map(str::to_owned),
        );
    }
    names.sort();
    names
}

#[tokio::test]
async fn delete_all_leaves_nothing_of_the_namespace() {
    let namespace = unique_namespace();
    // The services' defaults: 5 attempts, so 4 retry levels.
    let declared = Topology::new(namespace.clone(), 4, 20);
    let conn = raw_connection().await;
    let channel = conn.create_channel().await.unwrap();
    declared.declare(&channel).await.unwrap();
    let spec = declared.spec();
    assert_eq!(
        listed(&namespace).await.len(),
        spec.queues.len() + spec.exchanges.len(),
        "the whole topology is declared"
    );
    // One message waits in a work queue and one in the last resort: both are reported.
    let work = declared.queues_of(Service::Payment)[0].work.clone();
    let last_resort = declared
        .queues_of(Service::Order)
        .into_iter()
        .find(|q| q.subscription.name == "dead-letters")
        .expect("the dead-letter intake")
        .dlq;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for queue in [&work, &last_resort] {
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"left behind",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let left = Topology::for_teardown(namespace.as_str())
        .delete_all(&channel)
        .await
        .expect("the namespace is deleted");
    conn.close(200, "done".into()).await.ok();

    assert_eq!(left.get(&work), Some(&1), "{left:?}");
    assert_eq!(left.get(&last_resort), Some(&1), "{left:?}");
    assert_eq!(listed(&namespace).await, Vec::<String>::new());
}
