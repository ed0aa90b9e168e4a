//! Who may call what. Callers present `authorization: Bearer <token>`; tokens come from the
//! file at `ORDERFLOW_AUTH_TOKENS`, each with a role:
//!
//! - `admin`: every API, dead letters included;
//! - `client`: `OrderService` for any customer (a trusted front end);
//! - `customer`: `OrderService` for one customer only (the token's `customer_id`): it places
//!   orders only for that customer and sees only that customer's orders.
//!
//! Health and reflection need no token. Without a token file the server is open (and says so
//! loudly at start). Tokens are compared as SHA-256 digests in constant time; the file may hold
//! the digests (`sha256:<hex>`) instead of the tokens.

use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tonic::{Request, Status};

/// The authenticated caller of a request, put in its extensions by the interceptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No authentication configured.
    Anyone,
    /// Full access.
    Admin {
        /// Token name, for logs.
        name: String,
    },
    /// Orders of any customer.
    Client {
        /// Token name, for logs.
        name: String,
    },
    /// Orders of one customer.
    Customer {
        /// Token name, for logs.
        name: String,
        /// The only customer this caller acts for.
        customer_id: String,
    },
}

impl Caller {
    /// The customer this caller is restricted to, if any.
    pub fn customer(&self) -> Option<&str> {
        match self {
            Caller::Customer { customer_id, .. } => Some(customer_id),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Role {
    Admin,
    Client,
    Customer,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    /// A name for logs (never the token).
    name: String,
    /// The token, or `sha256:<64 hex digits>` of it.
    token: String,
    role: Role,
    #[serde(default)]
    customer_id: Option<String>,
}

/// The configured tokens.
#[derive(Debug, Clone)]
pub struct Tokens {
    entries: Vec<([u8; 32], Caller)>,
}

/// Which API an interceptor guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `orderflow.v1.OrderService`.
    Orders,
    /// `orderflow.v1.DeadLetters`.
    DeadLetters,
}

impl Tokens {
    /// Reads a token file: a JSON array of `{name, token, role, customer_id?}`.
    pub fn load(path: &Path) -> anyhow::Result<Tokens> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid token file {}", path.display()))
    }

    /// Parses a token file's contents.
    pub fn parse(text: &str) -> anyhow::Result<Tokens> {
        let entries: Vec<Entry> =
            serde_json::from_str(text).context("expected a JSON array of {name, token, role}")?;
        anyhow::ensure!(!entries.is_empty(), "no tokens");
        let mut parsed = Vec::with_capacity(entries.len());
        for entry in entries {
            let digest = match entry.token.strip_prefix("sha256:") {
                Some(hex) => decode_hex(hex)
                    .with_context(|| format!("token `{}`: bad sha256 digest", entry.name))?,
                None => {
                    anyhow::ensure!(
                        entry.token.len() >= 16,
                        "token `{}`: use at least 16 characters",
                        entry.name
                    );
                    digest(entry.token.as_bytes())
                }
            };
            let caller = match (entry.role, entry.customer_id) {
                (Role::Admin, None) => Caller::Admin { name: entry.name },
                (Role::Client, None) => Caller::Client { name: entry.name },
                (Role::Customer, Some(customer_id)) => {
                    super::request::check_customer_id(&customer_id).map_err(|why| {
                        anyhow::anyhow!("token `{}`: customer_id {why}", entry.name)
                    })?;
                    Caller::Customer {
                        name: entry.name,
                        customer_id,
                    }
                }
                (Role::Customer, None) => {
                    anyhow::bail!("token `{}`: role customer needs a customer_id", entry.name)
                }
                (_, Some(_)) => anyhow::bail!(
                    "token `{}`: only role customer takes a customer_id",
                    entry.name
                ),
            };
            parsed.push((digest, caller));
        }
        Ok(Tokens { entries: parsed })
    }

    /// The caller a bearer token identifies. Every entry is compared, in constant time, so the
    /// time taken says nothing about which (or whether any) token matched.
    fn identify(&self, token: &[u8]) -> Option<Caller> {
        let presented = digest(token);
        let mut found = None;
        for (known, caller) in &self.entries {
            if constant_time_eq(known, &presented) && found.is_none() {
                found = Some(caller.clone());
            }
        }
        found
    }

    /// Checks a request's token for `api` and records the caller in its extensions.
    pub fn authorize<T>(&self, api: Api, mut request: Request<T>) -> Result<Request<T>, Status> {
        let caller = self.authenticate(&request)?;
        let allowed = match (&caller, api) {
            (Caller::Admin { .. } | Caller::Anyone, _) => true,
            (Caller::Client { .. } | Caller::Customer { .. }, Api::Orders) => true,
            (Caller::Client { .. } | Caller::Customer { .. }, Api::DeadLetters) => false,
        };
        if !allowed {
            return Err(Status::permission_denied(
                "this token may not use the dead-letter API (admin only)",
            ));
        }
        request.extensions_mut().insert(caller);
        Ok(request)
    }

    fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let header = request.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
        })?;
        let token = header.as_bytes().strip_prefix(b"Bearer ").ok_or_else(|| {
            Status::unauthenticated("the authorization metadata must be `Bearer <token>`")
        })?;
        self.identify(token)
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }
}

/// Puts [`Caller::Anyone`] in the request when no tokens are configured.
pub fn open<T>(mut request: Request<T>) -> Result<Request<T>, Status> {
    request.extensions_mut().insert(Caller::Anyone);
    Ok(request)
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn decode_hex(hex: &str) -> anyhow::Result<[u8; 32]> {
    anyhow::ensure!(hex.len() == 64, "expected 64 hex digits");
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)?;
    }
    Ok(out)
}

/// The SHA-256 of `token` as `sha256:<hex>`, the form a token file can store instead of the
/// token itself.
pub fn hashed(token: &str) -> String {
    let hex: String = digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"[
        {"name": "ops", "token": "admin-token-0123456789", "role": "admin"},
        {"name": "shop", "token": "client-token-0123456789", "role": "client"},
        {"name": "alice", "token": "alice-token-0123456789", "role": "customer", "customer_id": "alice"}
    ]"#;

    fn request(token: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request
    }

    #[test]
    fn roles_reach_their_apis_only() {
        let tokens = Tokens::parse(FILE).unwrap();
        let caller = |token, api| {
            tokens
                .authorize(api, request(token))
                .map(|r| r.extensions().get::<Caller>().cloned())
        };
        assert_eq!(
            caller(Some("admin-token-0123456789"), Api::DeadLetters).unwrap(),
            Some(Caller::Admin { name: "ops".into() })
        );
        assert!(caller(Some("client-token-0123456789"), Api::Orders).is_ok());
        assert_eq!(
            caller(Some("client-token-0123456789"), Api::DeadLetters)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            caller(Some("alice-token-0123456789"), Api::DeadLetters)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        let alice = caller(Some("alice-token-0123456789"), Api::Orders)
            .unwrap()
            .unwrap();
        assert_eq!(alice.customer(), Some("alice"));
    }

    #[test]
    fn missing_malformed_and_wrong_tokens_are_unauthenticated() {
        let tokens = Tokens::parse(FILE).unwrap();
        for token in [None, Some("nope"), Some("admin-token-012345678"), Some("")] {
            let status = tokens.authorize(Api::Orders, request(token)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{token:?}");
        }
        let mut basic = Request::new(());
        basic
            .metadata_mut()
            .insert("authorization", "Basic YWRtaW4=".parse().unwrap());
        assert_eq!(
            tokens.authorize(Api::Orders, basic).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn hashed_tokens_work_like_plain_ones() {
        let file = format!(
            r#"[{{"name": "ops", "token": "{}", "role": "admin"}}]"#,
            hashed("a-long-enough-secret")
        );
        let tokens = Tokens::parse(&file).unwrap();
        assert!(
            tokens
                .authorize(Api::DeadLetters, request(Some("a-long-enough-secret")))
                .is_ok()
        );
        assert!(
            tokens
                .authorize(Api::DeadLetters, request(Some("a-long-enough-secreT")))
                .is_err()
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let bad = [
            (r#"[]"#, "no tokens"),
            (
                r#"[{"name": "x", "token": "short", "role": "admin"}]"#,
                "16 characters",
            ),
            (
                r#"[{"name": "x", "token": "0123456789abcdefg", "role": "customer"}]"#,
                "needs a customer_id",
            ),
            (
                r#"[{"name": "x", "token": "0123456789abcdefg", "role": "admin", "customer_id": "a"}]"#,
                "only role customer",
            ),
            (
                r#"[{"name": "x", "token": "sha256:zz", "role": "admin"}]"#,
                "sha256",
            ),
            (
                r#"[{"name": "x", "token": "0123456789abcdefg", "role": "root"}]"#,
                "expected a JSON array",
            ),
        ];
        for (file, why) in bad {
            let error = format!("{:#}", Tokens::parse(file).unwrap_err());
            assert!(error.contains(why), "{file}: {error}");
        }
    }
}
