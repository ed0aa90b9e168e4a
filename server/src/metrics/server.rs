//! The endpoint Prometheus scrapes: axum routes `GET /metrics` (anything else is 404, other
//! methods 405). hyper serves each connection directly rather than through `axum::serve`, for
//! the settings a scrape endpoint wants: one request per connection, a bounded request head
//! read within a deadline, and header names in their usual case for clients that match them
//! literally.

use std::time::Duration;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse as _, Response},
    routing::get,
};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus_client::encoding::prometheus_text;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::debug;

use super::Metrics;

/// Largest request head accepted (the smallest buffer hyper allows).
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `metrics` on `listener` until `shutdown`, then lets the requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let routes = Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .title_case_headers(true);
    let connections = TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(error = %error, "Metrics accept failed.");
                    continue;
                }
            },
        };
        let connection = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(routes.clone()),
        );
        connections.spawn(async move {
            if let Err(error) = connection.await {
                debug!(error = %error, "Metrics request failed.");
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

async fn scrape(State(metrics): State<Metrics>) -> Response {
    match metrics.render().await {
        Ok(text) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(error) => {
            debug!(error = %error, "Metrics could not be encoded.");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
