//! The broker's address: one AMQP URL, or a comma-separated list of a cluster's nodes, checked
//! by lapin's own parser and never shown with its password.

use std::{fmt, str::FromStr};

use secrecy::{ExposeSecret, SecretString};

use crate::secret_url::redact;

/// A validated AMQP URL whose password stays out of `Debug` and `Display`.
#[derive(Clone)]
pub struct AmqpUrl {
    secret: SecretString,
    redacted: String,
    /// Why lapin would refuse it, if it would.
    problem: Option<String>,
}

impl AmqpUrl {
    /// Why lapin would refuse it, if it would: reported by `config::Config::validate`.
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }

    /// The URL, password included, for connecting only: for a list, the whole list.
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }

    /// Each node of a comma-separated list (a cluster), in order; one for a single URL.
    pub fn nodes(&self) -> Vec<AmqpUrl> {
        self.expose()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| u.parse().unwrap_or_else(|never| match never {}))
            .collect()
    }

    /// The URL with its password replaced by `***`, safe to log.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

impl FromStr for AmqpUrl {
    type Err = std::convert::Infallible;

    /// Never fails: a malformed URL is reported by `config::Config::validate`, redacted. (clap would
    /// echo a refused value verbatim, password included.)
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // lapin's parser is the one that will connect, so it decides what is valid. Its error
        // text never contains the input, so it cannot leak the password.
        let nodes: Vec<&str> = s.split(',').map(str::trim).collect();
        let problem = if nodes.iter().any(|n| n.is_empty()) {
            Some(
                "empty entry in the list; expected amqp://user:password@host:port/vhost[,amqp://…]"
                    .to_owned(),
            )
        } else {
            nodes.iter().enumerate().find_map(|(i, node)| {
                lapin::uri::AMQPUri::from_str(node).err().map(|e| {
                    let which = if nodes.len() > 1 { format!(" (node {})", i + 1) } else { String::new() };
                    format!("malformed AMQP URL{which} ({e}); expected amqp://user:password@host:port/vhost")
                })
            })
        };
        Ok(AmqpUrl {
            secret: SecretString::from(s.to_owned()),
            redacted: nodes
                .iter()
                .map(|n| redact(n))
                .collect::<Vec<_>>()
                .join(","),
            problem,
        })
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_never_shows_its_password() {
        let url: AmqpUrl = "amqp://svc:hunter2@localhost:5672/%2f".parse().unwrap();
        assert!(!format!("{url:?} {url}").contains("hunter2"));
        assert_eq!(url.expose(), "amqp://svc:hunter2@localhost:5672/%2f");
    }

    #[test]
    fn a_cluster_is_a_list_of_node_urls() {
        let url: AmqpUrl = "amqp://svc:pw@h1:5672/%2f, amqp://svc:pw@h2:5673/%2f"
            .parse()
            .unwrap();
        let nodes: Vec<_> = url.nodes().iter().map(|n| n.expose().to_owned()).collect();
        assert_eq!(
            nodes,
            ["amqp://svc:pw@h1:5672/%2f", "amqp://svc:pw@h2:5673/%2f"]
        );
        assert_eq!(
            url.redacted(),
            "amqp://svc:***@h1:5672/%2f,amqp://svc:***@h2:5673/%2f"
        );
        assert!(url.problem.is_none());
        let bad: AmqpUrl = "amqp://svc:pw@h1:5672/%2f,amqp://svc:pw@h2:x/%2f"
            .parse()
            .unwrap();
        assert!(
            bad.problem.as_deref().unwrap().contains("node 2"),
            "{:?}",
            bad.problem
        );
        let empty: AmqpUrl = "amqp://svc:pw@h1:5672/%2f,".parse().unwrap();
        assert!(empty.problem.is_some());
    }
}
