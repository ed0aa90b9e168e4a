//! The Grafana dashboard and the Prometheus that feeds it, checked against the real thing: every
//! query of `deploy/grafana/dashboards/orderflow.json`, parsed as PromQL, reads only metrics and
//! labels a real app exports after a real order; Prometheus scrapes exactly the compose services
//! that serve metrics, on their port; Grafana's data source is the compose Prometheus. And
//! `orderflow_consumer_paused` follows a real consumer through a database outage.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use orderflow_proto::orderflow::v1::{self as pb, OrderStatus};
use promql_parser::{
    parser::{self, Expr},
    util::{ExprVisitor, walk_expr},
};
use prost::Message as _;
use yaml_rust2::{Yaml, YamlLoader};

use crate::{
    helpers::{eventually, publish_raw, raw_connection, scrape, series, spawn_app_with},
    pg_database::PgDatabase,
};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}"))
        .unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn yaml(path: &str) -> Yaml {
    YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
        .remove(0)
}

/// Every sample name in a scrape, with the label names seen on it.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..end].to_owned()).or_default();
        let Some(mut rest) = line[end..].strip_prefix('{') else {
            continue;
        };
        // name="value",... with `\"` and `\\` escaped inside values.
        while let Some((name, after)) = rest.split_once("=\"") {
            labels.insert(name.trim_start_matches(',').to_owned());
            let mut chars = after.char_indices();
            let mut close = after.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => {
                        close = i;
                        break;
                    }
                    _ => {}
                }
            }
            rest = &after[(close + 1).min(after.len())..];
            if rest.starts_with('}') {
                break;
            }
        }
    }
    out
}

/// What one query reads: metric names with the label names it matches on, and the labels it
/// groups by with the metrics they must come from.
#[derive(Debug, Default)]
struct Reads {
    selectors: Vec<(String, Vec<String>)>,
    groupings: Vec<(Vec<String>, BTreeSet<String>)>,
}

impl ExprVisitor for Reads {
    type Error = String;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        let selector = match expr {
            Expr::VectorSelector(vs) => Some(vs),
            Expr::MatrixSelector(ms) => Some(&ms.vs),
            Expr::Aggregate(aggregate) => {
                if let Some(modifier) = &aggregate.modifier {
                    let mut inner = Reads::default();
                    walk_expr(&mut inner, &aggregate.expr)?;
                    let metrics = inner.selectors.into_iter().map(|(name, _)| name).collect();
                    self.groupings
                        .push((modifier.labels().labels.clone(), metrics));
                }
                None
            }
            _ => None,
        };
        if let Some(vs) = selector {
            let name = vs
                .name
                .clone()
                .ok_or_else(|| format!("a selector without a metric name: {vs}"))?;
            let labels = vs
                .matchers
                .matchers
                .iter()
                .chain(vs.matchers.or_matchers.iter().flatten())
                .map(|m| m.name.clone())
                .filter(|n| n != "__name__")
                .collect();
            self.selectors.push((name, labels));
        }
        Ok(true)
    }
}

/// Every query of the dashboard, with its panel's title. Grafana's interval variables are not
/// PromQL; they stand for a range.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/orderflow.json"))
            .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries = Vec::new();
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL target");
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$__range", "1h");
            queries.push((panel["title"].as_str().unwrap_or("?").to_owned(), expr));
        }
    }
    queries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_reads_what_the_services_export() {
    let app = spawn_app_with(|c| c.metrics_addr = Some("127.0.0.1:0".parse().unwrap())).await;
    let addr = app.metrics_addr.expect("metrics served");
    let placed = app.place("dash", &[("KB-001", 1)]).await;
    assert_eq!(
        app.terminal(&placed.order_id).await.status(),
        OrderStatus::Completed
    );
    // The order service counts the finish after its commit, and the relays publish after
    // theirs: wait for the last of them.
    eventually("the finished order and its last event in the metrics", || async {
        let rows = series(&scrape(addr).await);
        rows.get("orderflow_orders_finished_total{status=\"completed\"}") == Some(&1.0)
            && rows.keys().any(|k| {
                k.starts_with("orderflow_events_handled_total{service=\"order-service\",type=\"orderflow.v1.PaymentProcessed\"")
            })
    })
    .await;
    // An error, answered trailers-only: its code is in the response headers.
    let missing = app
        .client
        .clone()
        .get_order(pb::GetOrderRequest {
            order_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .expect_err("no such order");
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    let handled = |kind: &str, method: &str, code: &str| {
        format!(
            "orderflow_grpc_server_handled_total{{grpc_type=\"{kind}\",grpc_service=\"orderflow.v1.OrderService\",grpc_method=\"{method}\",grpc_code=\"{code}\"}}"
        )
    };
    // Such a call ends when the server drops its empty body, which may be just after the
    // client has its answer.
    let not_found = handled("unary", "GetOrder", "NOT_FOUND");
    eventually("the failed GetOrder counted", || async {
        series(&scrape(addr).await).contains_key(&not_found)
    })
    .await;
    // Counters only grow: what the last checks saw is all there still.
    let text = scrape(addr).await;
    let rows = series(&text);
    let rpc = |kind: &str, method: &str, code: &str| {
        let key = handled(kind, method, code);
        rows.get(&key)
            .copied()
            .unwrap_or_else(|| panic!("{key} missing:\n{text}"))
    };
    assert_eq!(rpc("unary", "PlaceOrder", "OK"), 1.0);
    assert_eq!(rpc("unary", "GetOrder", "NOT_FOUND"), 1.0);
    assert!(rpc("unary", "GetOrder", "OK") >= 1.0);
    // The watch ended with the order: its status came in the trailers.
    assert!(rpc("server_stream", "WatchOrder", "OK") >= 1.0);
    let exported = exported(&text);

    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "{queries:#?}");
    let mut problems = Vec::new();
    for (panel, query) in &queries {
        let expr = match parser::parse(query) {
            Ok(expr) => expr,
            Err(error) => {
                problems.push(format!("{panel}: `{query}` is no PromQL: {error}"));
                continue;
            }
        };
        let mut reads = Reads::default();
        if let Err(error) = walk_expr(&mut reads, &expr) {
            problems.push(format!("{panel}: {error}"));
        }
        assert!(
            !reads.selectors.is_empty(),
            "{panel}: `{query}` reads no metric"
        );
        for (metric, labels) in &reads.selectors {
            let Some(has) = exported.get(metric) else {
                problems.push(format!("{panel}: `{metric}` is not exported"));
                continue;
            };
            for label in labels.iter().filter(|l| !has.contains(*l)) {
                problems.push(format!("{panel}: `{metric}` has no label `{label}`"));
            }
        }
        for (labels, metrics) in &reads.groupings {
            for label in labels {
                let found = metrics
                    .iter()
                    .any(|m| exported.get(m).is_some_and(|has| has.contains(label)));
                if !found {
                    problems.push(format!(
                        "{panel}: groups by `{label}`, which none of {metrics:?} has"
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The `host:port` targets `deploy/prometheus/prometheus.yml` scrapes, static or by DNS name.
fn scrape_targets() -> BTreeSet<String> {
    let config = yaml("deploy/prometheus/prometheus.yml");
    let mut targets = BTreeSet::new();
    for job in config["scrape_configs"].as_vec().expect("scrape_configs") {
        for dns in job["dns_sd_configs"].as_vec().into_iter().flatten() {
            let port = dns["port"].as_i64().expect("a DNS scrape names its port");
            for name in dns["names"].as_vec().expect("names") {
                targets.insert(format!("{}:{port}", name.as_str().unwrap()));
            }
        }
        for group in job["static_configs"].as_vec().into_iter().flatten() {
            for target in group["targets"].as_vec().expect("targets") {
                targets.insert(target.as_str().unwrap().to_owned());
            }
        }
    }
    targets
}

/// A compose service's environment variable, set directly or merged in (`<<: *anchor`).
fn env<'a>(service: &'a Yaml, name: &str) -> Option<&'a str> {
    let environment = &service["environment"];
    environment[name]
        .as_str()
        .or_else(|| environment["<<"][name].as_str())
}

#[test]
fn prometheus_scrapes_every_compose_service_that_serves_metrics() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_hash().expect("services");
    let serving: BTreeSet<String> = services
        .iter()
        .filter_map(|(name, service)| {
            let addr = env(service, "ORDERFLOW_METRICS_ADDR")?;
            let port = addr.rsplit_once(':').expect("host:port").1;
            Some(format!("{}:{port}", name.as_str().unwrap()))
        })
        .collect();
    assert_eq!(
        serving,
        BTreeSet::from(["order:9464", "inventory:9464", "payment:9464"].map(str::to_owned)),
        "the services that serve metrics"
    );
    assert_eq!(scrape_targets(), serving);

    // Prometheus and Grafana run in compose with these files, and Grafana reads this
    // Prometheus under the uid the dashboard names.
    let mounts = |service: &str| -> Vec<String> {
        compose["services"][service]["volumes"]
            .as_vec()
            .unwrap_or_else(|| panic!("no {service} service with volumes"))
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    assert!(mounts("prometheus").iter().any(|m| {
        m.starts_with("./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml")
    }));
    let grafana = mounts("grafana");
    for dir in [
        "./deploy/grafana/provisioning:",
        "./deploy/grafana/dashboards:",
    ] {
        assert!(grafana.iter().any(|m| m.starts_with(dir)), "{grafana:?}");
    }
    let datasources = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    let source = &datasources["datasources"][0];
    assert_eq!(source["url"].as_str(), Some("http://prometheus:9090"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/orderflow.json")).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"].as_str(),
                source["uid"].as_str(),
                "{}",
                panel["title"]
            );
        }
    }
}

/// A TCP relay to PostgreSQL that can be cut: from then on every connection through it is
/// closed at once, those open and those that come, as a database that went away looks to the
/// client (an immediate error, not a refused connection the pool would wait out).
struct CuttableProxy {
    addr: std::net::SocketAddr,
    cut: Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    async fn start(upstream: String) -> CuttableProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(tokio::sync::watch::Sender::new(false));
        let watch = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if *watch.borrow() {
                    drop(client);
                    continue;
                }
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let mut cut = watch.subscribe();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        CuttableProxy { addr, cut, task }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_reads_paused_while_it_holds_a_batch_through_a_database_outage() {
    let database = PgDatabase::create().await;
    let url: url::Url = database.url.parse().expect("database URL");
    let upstream = format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port_or_known_default().unwrap()
    );
    let proxy = CuttableProxy::start(upstream).await;
    let mut proxied = url.clone();
    proxied.set_host(Some("127.0.0.1")).unwrap();
    proxied.set_port(Some(proxy.addr.port())).unwrap();
    let app = spawn_app_with(|c| {
        c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        c.database_url = Some(proxied.as_str().parse().unwrap());
    })
    .await;
    let addr = app.metrics_addr.expect("metrics served");
    let queue = format!("{}.inventory.order-created", app.namespace);
    let paused =
        format!("orderflow_consumer_paused{{service=\"inventory-service\",queue=\"{queue}\"}}");
    let consumers = |rows: &std::collections::HashMap<String, f64>| -> Vec<f64> {
        rows.iter()
            .filter(|(k, _)| k.starts_with("orderflow_consumer_paused{"))
            .map(|(_, v)| *v)
            .collect()
    };

    // Consuming: every consumer subscribed, none paused.
    eventually("every consumer consuming", || async {
        let values = consumers(&series(&scrape(addr).await));
        !values.is_empty() && values.iter().all(|v| *v == 0.0)
    })
    .await;

    proxy.set_cut(true);
    // The same OrderCreated twice: held together through the outage, then handled once.
    let created = pb::OrderCreated {
        order_id: uuid::Uuid::now_v7().to_string(),
        customer_id: "held".to_owned(),
        items: vec![pb::OrderLine {
            sku: "KB-001".to_owned(),
            quantity: 1,
        }],
        created_at: None,
    };
    let properties = lapin::BasicProperties::default()
        .with_message_id(uuid::Uuid::now_v7().to_string().as_str().into())
        .with_type("orderflow.v1.OrderCreated".into())
        .with_correlation_id(created.order_id.as_str().into());
    let conn = raw_connection().await;
    for _ in 0..2 {
        publish_raw(
            &conn,
            "",
            &queue,
            &created.encode_to_vec(),
            properties.clone(),
        )
        .await;
    }
    eventually("the inventory consumer paused by the outage", || async {
        series(&scrape(addr).await).get(&paused) == Some(&1.0)
    })
    .await;

    proxy.set_cut(false);
    let handled = |outcome: &str| {
        format!(
            "orderflow_events_handled_total{{service=\"inventory-service\",type=\"orderflow.v1.OrderCreated\",outcome=\"{outcome}\"}}"
        )
    };
    eventually(
        "the held batch handled once the database answers",
        || async {
            let rows = series(&scrape(addr).await);
            rows.get(&paused) == Some(&0.0)
                && rows.get(&handled("ok")) == Some(&1.0)
                && rows.get(&handled("duplicate")) == Some(&1.0)
        },
    )
    .await;
    let rows = series(&scrape(addr).await);
    assert_eq!(
        rows.get(&handled("retried")),
        None,
        "an outage spends no attempts"
    );
    conn.close(200, "ok".into()).await.ok();
}
