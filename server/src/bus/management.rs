//! Reading what a broker has, through RabbitMQ's management HTTP API: AMQP 0-9-1 can only
//! tell whether a name exists, not a queue's arguments or its bindings. Used by
//! `--declare-topology verify`; needs the `management` user tag (read-only, own vhost).
//!
//! A bare HTTP/1.1 client on hyper (already built for tonic): one connection, a few GETs.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use base64::Engine as _;
use http_body_util::{BodyExt as _, Empty};
use hyper::{
    Request, StatusCode,
    body::Bytes,
    header::{AUTHORIZATION, HOST},
};
use hyper_util::rt::TokioIo;
use lapin::uri::{AMQPScheme, AMQPUri};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use secrecy::{ExposeSecret as _, SecretString};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::{
    TlsConnector,
    rustls::{self, RootCertStore, pki_types::CertificateDer, pki_types::pem::PemObject as _},
};

use super::{
    AmqpUrl, Topology,
    topology::{
        VerifyError,
        spec::{self, Argument, Found, FoundExchange, FoundQueue, Spec},
    },
};
use crate::service::Service;

/// A RabbitMQ management API URL (`--management-url`).
pub type ManagementUrl = crate::secret_url::SecretUrl;

/// Default management port for `amqp://` (HTTP) and `amqps://` (HTTPS) brokers.
const HTTP_PORT: u16 = 15672;
const HTTPS_PORT: u16 = 15671;
/// Bound on connecting and on each request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Path segments are encoded except for RFC 3986's unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A management API endpoint and the credentials and vhost to read it with.
#[derive(Clone)]
pub struct Management {
    tls: Option<TlsConnector>,
    host: String,
    port: u16,
    /// Path before `/api`, without a trailing slash (empty unless behind a proxy).
    prefix: String,
    user: String,
    authorization: SecretString,
    vhost: String,
    /// `scheme://host:port/prefix`, without credentials: safe to log.
    shown: String,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Management {
    /// The management API of `node`: `explicit` if given (with its credentials, or else the
    /// node's; without a port, 80 or 443 as for any URL), otherwise `http://<node host>:15672` (`https://…:15671` for `amqps://`) with the node's
    /// credentials. The vhost is always the node's. `ca_cert` (PEM) is trusted for HTTPS in
    /// addition to the system's roots.
    pub fn new(
        node: &AmqpUrl,
        explicit: Option<&ManagementUrl>,
        ca_cert: Option<&str>,
    ) -> anyhow::Result<Management> {
        let amqp: AMQPUri = node
            .expose()
            .parse()
            .map_err(|e| anyhow::anyhow!("malformed AMQP URL: {e}"))?;
        let (mut user, mut password) = (
            amqp.authority.userinfo.username.clone(),
            amqp.authority.userinfo.password.clone(),
        );
        let (https, host, port, prefix) = match explicit {
            None => {
                let https = amqp.scheme == AMQPScheme::AMQPS;
                let port = if https { HTTPS_PORT } else { HTTP_PORT };
                (https, amqp.authority.host.clone(), port, String::new())
            }
            Some(explicit) => {
                let url = url::Url::parse(explicit.expose())
                    .with_context(|| format!("malformed management URL {explicit}"))?;
                let https = url.scheme() == "https";
                let host = url
                    .host_str()
                    .with_context(|| format!("management URL {explicit} has no host"))?
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                if !url.username().is_empty() {
                    user = decode(url.username())?;
                    password = decode(url.password().unwrap_or_default())?;
                }
                // As any URL: without a port, 80 or 443.
                let port = url.port_or_known_default().unwrap_or(HTTP_PORT);
                (
                    https,
                    host,
                    port,
                    url.path().trim_end_matches('/').to_owned(),
                )
            }
        };
        let scheme = if https { "https" } else { "http" };
        let shown = if host.contains(':') {
            format!("{scheme}://[{host}]:{port}{prefix}")
        } else {
            format!("{scheme}://{host}:{port}{prefix}")
        };
        let tls = https.then(|| tls_connector(ca_cert)).transpose()?;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Ok(Management {
            tls,
            host,
            port,
            prefix,
            user,
            authorization: SecretString::from(format!("Basic {token}")),
            vhost: amqp.vhost,
            shown,
        })
    }

    /// The endpoint, without credentials.
    pub fn url(&self) -> &str {
        &self.shown
    }

    /// Checks, without changing anything, that the exchanges, queues (type and arguments) and
    /// bindings `service` uses are exactly as [`Topology::spec`] says, and reports every
    /// difference at once. AMQP cannot read a queue's arguments; the management API can.
    pub async fn verify(&self, topology: &Topology, service: Service) -> Result<(), VerifyError> {
        let spec = topology.spec().used_by(service);
        let found = self.read(&spec).await?;
        let mismatches = spec::compare(&spec, &found);
        if mismatches.is_empty() {
            Ok(())
        } else {
            Err(VerifyError::Mismatch {
                namespace: topology.namespace().to_owned(),
                service,
                mismatches,
            })
        }
    }

    /// What the broker has of every exchange and queue `spec` names, with each found queue's
    /// bindings. Errors are [`VerifyError::Unreachable`] or [`VerifyError::Refused`].
    pub async fn read(&self, spec: &Spec) -> Result<Found, VerifyError> {
        let tcp = tokio::time::timeout(
            REQUEST_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| anyhow::anyhow!("connecting timed out after {REQUEST_TIMEOUT:?}"))
        .and_then(|r| r.context("connecting"))
        .map_err(|e| self.unreachable(e))?;
        match &self.tls {
            None => self.read_over(tcp, spec).await,
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| self.unreachable(anyhow::anyhow!("invalid host name: {e}")))?;
                let stream = tokio::time::timeout(REQUEST_TIMEOUT, tls.connect(name, tcp))
                    .await
                    .map_err(|_| anyhow::anyhow!("TLS handshake timed out"))
                    .and_then(|r| r.context("TLS handshake"))
                    .map_err(|e| self.unreachable(e))?;
                self.read_over(stream, spec).await
            }
        }
    }

    async fn read_over<S>(&self, stream: S, spec: &Spec) -> Result<Found, VerifyError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| self.unreachable(anyhow::Error::new(e).context("HTTP handshake")))?;
        // The connection is driven only while the requests run, and dropped with them.
        let requests = async {
            let vhost = utf8_percent_encode(&self.vhost, SEGMENT).to_string();
            let mut found = Found::default();
            for exchange in &spec.exchanges {
                let name = utf8_percent_encode(&exchange.name, SEGMENT);
                let path = format!("/api/exchanges/{vhost}/{name}");
                if let Some(json) = self.get(&mut sender, &path).await? {
                    found.exchanges.insert(
                        exchange.name.clone(),
                        FoundExchange {
                            kind: json["type"].as_str().unwrap_or_default().to_owned(),
                            durable: json["durable"].as_bool().unwrap_or(false),
                        },
                    );
                }
            }
            for queue in &spec.queues {
                let name = utf8_percent_encode(&queue.name, SEGMENT);
                let path = format!("/api/queues/{vhost}/{name}?disable_stats=true");
                let Some(json) = self.get(&mut sender, &path).await? else {
                    continue;
                };
                let path = format!("/api/queues/{vhost}/{name}/bindings");
                let bindings = self.get(&mut sender, &path).await?.unwrap_or_default();
                found
                    .queues
                    .insert(queue.name.clone(), found_queue(&json, &bindings));
            }
            Ok(found)
        };
        tokio::pin!(connection);
        tokio::select! {
            found = requests => found,
            ended = &mut connection => Err(self.unreachable(match ended {
                Ok(()) => anyhow::anyhow!("the server closed the connection"),
                Err(e) => anyhow::Error::new(e).context("HTTP connection"),
            })),
        }
    }

    /// GETs `path`: the JSON body, or `None` for 404.
    async fn get(
        &self,
        sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        path: &str,
    ) -> Result<Option<serde_json::Value>, VerifyError> {
        let request = Request::get(format!("{}{path}", self.prefix))
            .header(HOST, format!("{}:{}", self.host, self.port))
            .header(AUTHORIZATION, self.authorization.expose_secret())
            .body(Empty::new())
            .map_err(|e| self.unreachable(e.into()))?;
        let response = async {
            sender.ready().await.context("connection not ready")?;
            let response = sender.send_request(request).await.context("request")?;
            let status = response.status();
            let body = response.into_body().collect().await.context("body")?;
            anyhow::Ok((status, body.to_bytes()))
        };
        let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, response)
            .await
            .map_err(|_| anyhow::anyhow!("GET {path} timed out after {REQUEST_TIMEOUT:?}"))
            .and_then(|r| r)
            .map_err(|e| self.unreachable(e))?;
        match status {
            StatusCode::OK => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| self.unreachable(anyhow::Error::new(e).context("not JSON"))),
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(VerifyError::Refused {
                url: self.shown.clone(),
                user: self.user.clone(),
                status: status.as_u16(),
            }),
            // 5xx while the broker boots or a node is down: try again later.
            other => Err(self.unreachable(anyhow::anyhow!("GET {path}: HTTP {other}"))),
        }
    }

    fn unreachable(&self, source: anyhow::Error) -> VerifyError {
        VerifyError::Unreachable {
            url: self.shown.clone(),
            source,
        }
    }
}

fn decode(text: &str) -> anyhow::Result<String> {
    Ok(percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .context("credentials in the management URL are not UTF-8")?
        .into_owned())
}

fn tls_connector(ca_cert: Option<&str>) -> anyhow::Result<TlsConnector> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(pem) = ca_cert {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots
                .add(cert.context("reading the CA certificate")?)
                .context("adding the CA certificate")?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS settings")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A queue from `GET /api/queues/…` and its `…/bindings`.
fn found_queue(queue: &serde_json::Value, bindings: &serde_json::Value) -> FoundQueue {
    let mut arguments: std::collections::BTreeMap<String, Argument> = queue["arguments"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, value)| (name.clone(), argument(value)))
        .collect();
    // The actual type, also for a classic queue declared without the argument.
    if let Some(kind) = queue["type"].as_str() {
        arguments.insert("x-queue-type".to_owned(), Argument::Str(kind.to_owned()));
    }
    let bindings = bindings
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| Some((b["source"].as_str()?, b["routing_key"].as_str()?)))
        // Every queue is bound to the default exchange by its name; nobody declares that.
        .filter(|(source, _)| !source.is_empty())
        .map(|(source, key)| (source.to_owned(), key.to_owned()))
        .collect();
    FoundQueue {
        durable: queue["durable"].as_bool().unwrap_or(false),
        arguments,
        bindings,
    }
}

fn argument(value: &serde_json::Value) -> Argument {
    match value {
        serde_json::Value::String(s) => Argument::Str(s.clone()),
        serde_json::Value::Number(n) if n.is_i64() => Argument::Int(n.as_i64().unwrap_or_default()),
        other => Argument::Other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_the_amqp_host_and_credentials() {
        let node: AmqpUrl = "amqp://svc:p%40ss@broker:5673/orders".parse().unwrap();
        let management = Management::new(&node, None, None).unwrap();
        assert_eq!(management.url(), "http://broker:15672");
        assert_eq!(management.vhost, "orders");
        assert_eq!(management.user, "svc");
        let expected = base64::engine::general_purpose::STANDARD.encode("svc:p@ss");
        assert_eq!(
            management.authorization.expose_secret(),
            format!("Basic {expected}")
        );
        assert!(!format!("{management:?}").contains("p@ss"));
    }

    #[test]
    fn an_explicit_url_keeps_the_vhost_and_may_bring_credentials() {
        let node: AmqpUrl = "amqp://svc:pw@broker:5672/%2f".parse().unwrap();
        let explicit: ManagementUrl = "http://admin:s3cret@mgmt:8080/rabbit/".parse().unwrap();
        let management = Management::new(&node, Some(&explicit), None).unwrap();
        assert_eq!(management.url(), "http://mgmt:8080/rabbit");
        assert_eq!(management.prefix, "/rabbit");
        assert_eq!(
            (management.user.as_str(), management.vhost.as_str()),
            ("admin", "/")
        );
        let plain: ManagementUrl = "http://mgmt".parse().unwrap();
        let management = Management::new(&node, Some(&plain), None).unwrap();
        assert_eq!(
            (management.url(), management.user.as_str()),
            ("http://mgmt:80", "svc")
        );
    }

    #[test]
    fn reads_type_arguments_and_bindings() {
        let queue = serde_json::json!({
            "durable": true, "type": "classic",
            "arguments": {"x-delivery-limit": 5, "x-dead-letter-exchange": "", "x-single-active-consumer": true}
        });
        let bindings = serde_json::json!([
            {"source": "", "routing_key": "q"},
            {"source": "ns.events", "routing_key": "a.b"}
        ]);
        let found = found_queue(&queue, &bindings);
        assert!(found.durable);
        assert_eq!(
            found.arguments["x-queue-type"],
            Argument::Str("classic".into())
        );
        assert_eq!(found.arguments["x-delivery-limit"], Argument::Int(5));
        assert_eq!(
            found.arguments["x-dead-letter-exchange"],
            Argument::Str(String::new())
        );
        assert_eq!(
            found.arguments["x-single-active-consumer"],
            Argument::Other("true".into())
        );
        assert_eq!(
            found.bindings.into_iter().collect::<Vec<_>>(),
            [("ns.events".to_owned(), "a.b".to_owned())]
        );
    }
}
