//! The broker under test, shared by the test binaries (`#[path]`-included by each, lab's too): its URL
//! comes from `AMQP_URL` and its control command from `RABBITMQCTL`, so the same tests run
//! against another node (e.g. RabbitMQ 4 on 5673) by changing two variables.

#![allow(dead_code)] // Each binary uses a different part.

/// The broker: `AMQP_URL` if set, else the local default.
pub(crate) fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// `(scheme, host:port, /vhost)` of the first node of [`amqp_url`], credentials left out.
fn parts() -> (String, String, String) {
    let url = amqp_url();
    let first = url.split(',').next().unwrap_or_default().trim().to_owned();
    let (scheme, rest) = first
        .split_once("://")
        .unwrap_or_else(|| panic!("AMQP_URL `{first}` has no scheme"));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        let port = if scheme == "amqps" { 5671 } else { 5672 };
        format!("{host}:{port}")
    };
    (scheme.to_owned(), host, format!("/{path}"))
}

/// `host:port` of the broker, for tests that open their own TCP connection to it.
pub(crate) fn broker_addr() -> String {
    parts().1
}

/// The broker's URL with other credentials.
pub(crate) fn amqp_url_as(user: &str, password: &str) -> String {
    let (scheme, host, vhost) = parts();
    format!("{scheme}://{user}:{password}@{host}{vhost}")
}

/// The broker's control command with `args` appended: `RABBITMQCTL` split on whitespace
/// (e.g. `scripts/rabbitmq4.sh ctl`), else `rabbitmqctl`.
pub(crate) fn ctl(args: &[&str]) -> std::process::Command {
    let line = std::env::var("RABBITMQCTL").unwrap_or_default();
    let mut words = line.split_whitespace();
    let mut command = std::process::Command::new(words.next().unwrap_or("rabbitmqctl"));
    command
        .args(words)
        .args(args)
        .stdin(std::process::Stdio::null());
    command
}

/// The broker's URL (same credentials and vhost) pointed at `addr` instead, e.g. a proxy.
pub(crate) fn amqp_url_via(addr: std::net::SocketAddr) -> String {
    let url = amqp_url();
    let first = url.split(',').next().unwrap_or_default().trim();
    let (scheme, rest) = first.split_once("://").unwrap_or(("amqp", first));
    let (authority, _) = rest.split_once('/').unwrap_or((rest, ""));
    let credentials = authority
        .rsplit_once('@')
        .map_or(String::new(), |(c, _)| format!("{c}@"));
    format!("{scheme}://{credentials}{addr}{}", parts().2)
}
