//! `grpc.health.v1.Health` in step with the process's readiness (see `crate::health`): the
//! server-wide status, and `orderflow.v1.OrderService`'s where this process serves orders.

use tokio::sync::watch;
use tonic_health::{
    ServingStatus,
    pb::health_server::{Health, HealthServer},
    server::HealthReporter,
};

/// The health service, NOT_SERVING until [`report`] says otherwise.
pub(super) async fn service() -> (HealthReporter, HealthServer<impl Health>) {
    let (reporter, service) = tonic_health::server::health_reporter();
    // tonic-health starts the server-wide status at SERVING.
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    (reporter, service)
}

/// Reports every change of `ready` until its sender is gone, then NOT_SERVING.
pub(super) async fn report(
    reporter: HealthReporter,
    mut ready: watch::Receiver<bool>,
    serves_orders: bool,
) {
    loop {
        let status = if *ready.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        if serves_orders {
            reporter
                .set_service_status("orderflow.v1.OrderService", status)
                .await;
        }
        if ready.changed().await.is_err() {
            break;
        }
    }
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
}
