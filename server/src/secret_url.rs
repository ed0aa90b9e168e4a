//! URLs that carry credentials (database, management API, broker): the password stays out of
//! `Debug` and `Display`, so a URL can be logged or put in an error message as it is.

use std::{fmt, str::FromStr};

use secrecy::{ExposeSecret, SecretString};

/// A URL with credentials, whose password stays out of `Debug` and `Display`.
#[derive(Clone)]
pub struct SecretUrl {
    secret: SecretString,
    redacted: String,
}

impl SecretUrl {
    /// The full URL, for connecting only.
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl FromStr for SecretUrl {
    type Err = String;

    /// Checked by `config::Config::validate` (clap would echo a refused value verbatim).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretUrl {
            secret: SecretString::from(s.to_owned()),
            redacted: redact(s),
        })
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// Replaces the password of `scheme://user:password@host…` with `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_but_keeps_the_rest() {
        assert_eq!(
            redact("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact("amqp://127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://user@host/vhost"), "amqp://user@host/vhost");
        assert_eq!(
            redact("amqps://u:p%40ss@h:5671/a@b"),
            "amqps://u:***@h:5671/a@b"
        );
    }
}
