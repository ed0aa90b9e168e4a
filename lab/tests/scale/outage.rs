//! PostgreSQL stopped under load, for 45 s with every service on it and for 160 s with Order on
//! SQLite (still accepting and publishing) while Inventory and Payment lose their database.
//! Orders are delayed, none lost, none FAILED; health and `/metrics` show the pause while it
//! lasts.
//!
//! Each test starts a throwaway PostgreSQL server of its own (initdb into a temporary
//! directory, on a free port) and stops that one: the machine's shared PostgreSQL is never
//! touched. The two run in parallel with each other and the other scale tests.

use std::{path::Path, process::Command, time::Duration};

use orderflow_lab::{
    deployment::{Deployment, Instance},
    driver::{self, Plan},
};
use orderflow_server::service::Service;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::{self, Item};

const BIN: &str = "/usr/lib/postgresql/15/bin";

const CATALOG: &[Item] = &[
    ("O-A", 500, 1_000_000),
    ("O-B", 1_250, 1_000_000),
    ("O-SCARCE", 300, 200),
    ("O-PRICEY", 80_000, 1_000_000),
];

/// A PostgreSQL server of this test's own, stopped and deleted on drop.
struct ThrowawayPostgres {
    dir: tempfile::TempDir,
    port: u16,
}

impl ThrowawayPostgres {
    /// initdb and start, as the `postgres` OS user when run as root (the server refuses root).
    fn start() -> ThrowawayPostgres {
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown runs");
            assert!(status.success(), "chown the data directory to postgres");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = ThrowawayPostgres { dir, port };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        pg.resume();
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = Path::new(BIN).join(tool);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let output = command.args(args).output().unwrap_or_else(|e| {
            panic!(
                "{} runs ({e}): these tests need PostgreSQL 15's server binaries (Debian: \
                 apt-get install postgresql-15)",
                program.display()
            )
        });
        assert!(
            output.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts (again) and waits until it accepts connections.
    fn resume(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("postgres.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "start",
            ],
        );
    }

    /// Stops it the way a crash or a failover looks to clients: connections are cut.
    fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        let _ = Command::new(if is_root() { "runuser" } else { "true" })
            .args(if is_root() {
                vec!["-u", "postgres", "--"]
            } else {
                vec![]
            })
            .arg(Path::new(BIN).join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// One gauge's value for `service` on an instance's `/metrics` page.
async fn assert_gauge(deployment: &Deployment, instance: Instance, name: &str, want: f64) {
    let value = deployment
        .gauge(instance, name)
        .await
        .expect("/metrics answers");
    assert_eq!(value, Some(want), "{name} of {}", instance.0);
}

/// Places orders at `rate` while PostgreSQL is stopped for `outage`; checks health and metrics
/// during and after, then audits. `on_postgres` are the services whose database goes away.
async fn outage(outage: Duration, rate: f64, order_on_sqlite: bool) {
    let pg = ThrowawayPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let namespace = harness::namespace("outage");
    let mut settings = harness::settings(
        dir.path(),
        &namespace,
        harness::amqp_url(),
        Some(pg.url()),
        1,
        CATALOG,
    );
    // The production retry schedule (0.2 s doubling to 30 s, 5 attempts): a database outage
    // must not burn through it.
    if let Some(at) = settings
        .args
        .iter()
        .position(|a| a == "--retry-initial-delay")
    {
        settings.args.drain(at..at + 2);
    }
    if order_on_sqlite {
        settings.sqlite_services = vec![Service::Order];
    }
    let on_postgres: Vec<Service> = Service::ALL
        .into_iter()
        .filter(|s| !settings.sqlite_services.contains(s))
        .collect();
    let mut deployment = Deployment::start(settings).await.expect("services start");
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let plan = Plan {
            skus: CATALOG.iter().map(|(s, _, _)| (*s).to_owned()).collect(),
            rate,
            in_flight: 32,
            max_orders: 100_000,
            // Longer than the outage: while Order's own database is down, PlaceOrder fails
            // and the client keeps retrying the same idempotency key.
            give_up_after: outage + Duration::from_secs(120),
        };
        let (addrs, namespace, stop) = (deployment.order_addrs(), namespace.clone(), stop.clone());
        tokio::spawn(async move { driver::run(&addrs, plan, &namespace, stop).await })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;

    tokio::task::block_in_place(|| pg.stop());
    let stopped = tokio::time::Instant::now();
    println!("PostgreSQL stopped for {outage:?} ({on_postgres:?} lose their database)");
    for service in Service::ALL {
        let instance = (service, 0);
        if on_postgres.contains(&service) {
            deployment
                .wait_health(instance, ServingStatus::NotServing, Duration::from_secs(30))
                .await
                .expect("NOT_SERVING while its database is down");
            assert_gauge(&deployment, instance, "orderflow_database_up", 0.0).await;
        } else {
            assert_eq!(
                deployment.health(instance).await,
                Some(ServingStatus::Serving),
                "{service} keeps serving: its database is up"
            );
            assert_gauge(&deployment, instance, "orderflow_database_up", 1.0).await;
        }
    }
    tokio::time::sleep(outage.saturating_sub(stopped.elapsed())).await;
    tokio::task::block_in_place(|| pg.resume());
    println!("PostgreSQL back after {:?}", stopped.elapsed());
    deployment
        .wait_health_all(ServingStatus::Serving, Duration::from_secs(30))
        .await
        .expect("SERVING again once the database is back");
    for instance in deployment.instances() {
        assert_gauge(&deployment, instance, "orderflow_database_up", 1.0).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();
    let placed = load.await.unwrap().expect("load runs");
    println!(
        "placed {} orders across a {outage:?} database outage",
        placed.accepted.len()
    );
    assert!(
        placed.abandoned.is_empty(),
        "abandoned: {:?}",
        placed.abandoned
    );
    let report = harness::audit_settled(&deployment.state(), &placed.accepted, CATALOG).await;
    println!(
        "outage {outage:?}: placed {}, completed {}, rejected {}, payment failed {}, FAILED {}",
        report.placed, report.completed, report.rejected, report.payment_failed, report.failed
    );
    assert_eq!(report.placed, placed.accepted.len());
    assert!(report.completed > 0, "{report:?}");
    // Nothing was dead-lettered on the way.
    for instance in deployment.instances() {
        let page = deployment
            .metrics(instance)
            .await
            .expect("/metrics answers");
        assert!(
            !page.contains("orderflow_events_dead_lettered_total{"),
            "{}: dead letters:\n{page}",
            instance.0
        );
    }
    deployment.stop().await.unwrap();
    harness::teardown(&namespace).await;
}

/// Every service on PostgreSQL: while it is down PlaceOrder fails (clients retry) and every
/// consumer waits. 20 orders/s for 55 s: about 200 before the stop, the rest retried through
/// the 45 s outage (32 in flight) and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_45s_under_load_delays_orders_but_loses_and_fails_none() {
    outage(Duration::from_secs(45), 20.0, false).await;
}

/// Order on SQLite keeps accepting and publishing while Inventory and Payment lose PostgreSQL
/// for 160 s: 10 orders/s for 170 s is about 1,700 orders, most of them waiting in the queues
/// through the outage (the by-hand run that found this was ~1,680).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_160s_while_order_keeps_publishing_on_sqlite_fails_no_order() {
    outage(Duration::from_secs(160), 10.0, true).await;
}
