//! A three-node RabbitMQ cluster on this machine, started with the repository's script: stop
//! the node that leads the namespace's quorum queues in the middle of a stream of orders, and
//! every order still finishes; start it again and it rejoins.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use orderflow_lab::{
    deployment::Deployment,
    driver::{self, Plan},
};

use crate::harness::{self, Item};

const CATALOG: &[Item] = &[
    ("C-A", 500, 1_000_000),
    ("C-B", 900, 1_000_000),
    ("C-SCARCE", 300, 50),
];

/// How to reach this test's cluster with the script: its directory, node names and ports.
#[derive(Clone)]
struct Script {
    dir: PathBuf,
    name: String,
    port: u16,
}

impl Script {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rabbitmq-cluster.sh"),
        );
        command
            .args(args)
            .env("CLUSTER_DIR", &self.dir)
            .env("CLUSTER_NAME", &self.name)
            .env("CLUSTER_PORT", self.port.to_string());
        command
    }

    /// Runs the script; its output, or a failed test saying what went wrong.
    fn run(&self, args: &[&str]) -> String {
        let output = self
            .command(args)
            .output()
            .expect("scripts/rabbitmq-cluster.sh runs");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "rabbitmq-cluster.sh {args:?} failed ({}):\n{text}\n{}\nThis test needs RabbitMQ installed \
             (rabbitmq-server and rabbitmqctl, as for the other tests); it starts its own nodes.",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        text
    }

    /// Runs the script off the async runtime (node stops and starts take seconds).
    async fn run_blocking(&self, args: &[&str]) -> String {
        let (script, args) = (
            self.clone(),
            args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        );
        tokio::task::spawn_blocking(move || {
            script.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .expect("script task")
    }
}

/// The local cluster of this test: its own node names, ports and directory. Deleted on drop.
struct Cluster {
    script: Script,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let script = Script {
            dir: dir.path().to_owned(),
            name: format!("oftest{}", &uuid::Uuid::new_v4().simple().to_string()[..6]),
            port: free_base_port(),
        };
        let cluster = Cluster { script, _dir: dir };
        // Started only once `cluster` exists, so that a node that fails to start does not
        // leave the ones that did running: dropping `cluster` deletes them all.
        cluster.script.run(&["start"]);
        cluster
    }

    fn node(&self, n: usize) -> String {
        format!("{}-{n}@localhost", self.script.name)
    }

    /// Which node (1-3) leads most of `namespace`'s queues, as node `via` sees it.
    fn leader_of(&self, namespace: &str, via: usize) -> usize {
        let listing = self.script.run(&[
            "ctl",
            &via.to_string(),
            "list_queues",
            "name",
            "leader",
            "--quiet",
            "--no-table-headers",
        ]);
        let mut leads = [0usize; 3];
        for line in listing
            .lines()
            .filter(|l| l.starts_with(&format!("{namespace}.")))
        {
            for n in 1..=3 {
                if line.split_whitespace().nth(1) == Some(self.node(n).as_str()) {
                    leads[n - 1] += 1;
                }
            }
        }
        assert!(
            leads.iter().sum::<usize>() > 0,
            "no queue of {namespace} in:\n{listing}"
        );
        1 + (0..3).max_by_key(|&i| leads[i]).unwrap()
    }

    /// Queues of `namespace` that do not list node `n` among their members.
    fn queues_without(&self, namespace: &str, n: usize) -> Vec<String> {
        let listing = self.script.run(&[
            "ctl",
            &n.to_string(),
            "list_queues",
            "name",
            "members",
            "--quiet",
            "--no-table-headers",
        ]);
        listing
            .lines()
            .filter(|l| l.starts_with(&format!("{namespace}.")) && !l.contains(&self.node(n)))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.script.command(&["delete"]).output();
    }
}

/// A base port whose three AMQP, management and distribution ports are all free. They are
/// taken from below the kernel's ephemeral range: a port found free there can be handed to
/// another test's outgoing connection before the node binds it, and the node then fails to boot.
fn free_base_port() -> u16 {
    use rand::Rng as _;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let highest = ephemeral_low.saturating_sub(20_003);
    assert!(
        highest > 10_000,
        "the ephemeral port range starts at {ephemeral_low}: no room below it for the cluster"
    );
    for _ in 0..100 {
        let base = rand::rng().random_range(10_000..highest);
        let free = (0..3).all(|n| {
            [base, base + 10_000, base + 20_000]
                .iter()
                .all(|p| std::net::TcpListener::bind(("127.0.0.1", p + n)).is_ok())
        });
        if free {
            return base;
        }
    }
    panic!("no free ports for the cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_queue_leader_node_loses_no_order_and_it_rejoins() {
    let cluster = Cluster::start();
    let amqp_url = cluster.script.run(&["url"]).trim().to_owned();
    assert_eq!(amqp_url.split(',').count(), 3, "{amqp_url}");
    let dir = tempfile::tempdir().unwrap();
    let namespace = harness::namespace("cluster");
    let settings = harness::settings(dir.path(), &namespace, amqp_url.clone(), None, 1, CATALOG);
    let mut deployment = Deployment::start(settings)
        .await
        .expect("services start on the cluster");

    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let plan = Plan {
            skus: CATALOG
                .iter()
                .map(|(sku, _, _)| (*sku).to_owned())
                .collect(),
            rate: 30.0,
            in_flight: 16,
            max_orders: 100_000,
            give_up_after: Duration::from_secs(120),
        };
        let (addrs, namespace, stop) = (deployment.order_addrs(), namespace.clone(), stop.clone());
        tokio::spawn(async move { driver::run(&addrs, plan, &namespace, stop).await })
    };
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Every queue is replicated on all three nodes; stop the one leading most of them.
    for n in 1..=3 {
        assert!(
            cluster.queues_without(&namespace, n).is_empty(),
            "node {n} is not a member of every queue"
        );
    }
    let leader = cluster.leader_of(&namespace, 1);
    let survivor = leader % 3 + 1;
    println!("stopping node {leader}, which leads most of {namespace}'s queues");
    cluster
        .script
        .run_blocking(&["stop-node", &leader.to_string()])
        .await;
    // Orders keep coming while the node is down.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_ne!(
        cluster.leader_of(&namespace, survivor),
        leader,
        "the queues elected new leaders"
    );

    cluster
        .script
        .run_blocking(&["start-node", &leader.to_string()])
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let placed = load.await.unwrap().expect("load runs");
    println!(
        "placed {} orders across the node stop",
        placed.accepted.len()
    );
    assert!(
        placed.abandoned.is_empty(),
        "abandoned: {:?}",
        placed.abandoned
    );
    assert!(
        placed.accepted.len() > 200,
        "orders kept coming: {}",
        placed.accepted.len()
    );

    let report = harness::audit_settled(&deployment.state(), &placed.accepted, CATALOG).await;
    assert_eq!(report.placed, placed.accepted.len());

    // The node is back in the cluster and a member of every queue again.
    let status = cluster.script.run(&[
        "ctl",
        &survivor.to_string(),
        "cluster_status",
        "--formatter",
        "json",
    ]);
    let status: serde_json::Value = serde_json::from_str(&status).expect("cluster_status JSON");
    let running: Vec<&str> = status["running_nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    assert!(
        running.contains(&cluster.node(leader).as_str()),
        "running nodes: {running:?}"
    );
    assert_eq!(running.len(), 3, "{running:?}");
    assert!(cluster.queues_without(&namespace, leader).is_empty());
    deployment.stop().await.unwrap();
}
