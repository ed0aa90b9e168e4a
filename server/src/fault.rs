//! Fault injection for tests and demos, off unless `ORDERFLOW_FAULTS` is set.
//!
//! Syntax: comma-separated `<service>:<kind>:<amount>` rules, e.g. `payment:transient:2`.
//! - `transient:N`: each message fails its first N attempts with a retryable error;
//!   `transient:0.3`: 30% of attempts fail.
//! - `permanent:N`: the first N messages fail permanently (straight to the DLQ);
//!   `permanent:0.1`: 10% of messages do.
//! - `panic:N` / `panic:0.1`: like `permanent`, but the handler panics.
//! - `outage:N` / `outage:0.1`: the first N handlings (or that fraction) find the database
//!   gone mid-batch, as a dropped connection would (shows the batch held until the database
//!   answers, spending no attempt).
//! - `crash-after-commit:N`: the process aborts right after its Nth committed batch, before
//!   the outbox relay publishes (shows the outbox recovering on restart).
//! - `unparkable:N` / `unparkable:1.0`: the consumer's first N (or that fraction of) attempts
//!   to park a failed message in its retry or dead-letter route fail, as if the broker had
//!   refused them (shows the requeue path ending at the delivery limit).

use std::{
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use rand::Rng as _;

use crate::{
    bus::{HandleError, Incoming},
    service::Service,
};

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A retryable error.
    Transient,
    /// A non-retryable error.
    Permanent,
    /// A panic in the handler.
    Panic,
    /// The database connection lost under the handler.
    Outage,
    /// `abort()` after a commit, before publishing.
    CrashAfterCommit,
    /// The consumer cannot park a failed message.
    Unparkable,
}

/// How often it fires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    /// The first N (attempts of each message for `transient`, messages or commits otherwise).
    First(u64),
    /// This fraction, at random.
    Fraction(f64),
}

/// One rule of `ORDERFLOW_FAULTS`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    /// Where it applies.
    pub service: Service,
    /// What it does.
    pub kind: Kind,
    /// How often.
    pub amount: Amount,
}

impl FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        let [service, kind, amount] = parts[..] else {
            return Err(format!(
                "fault `{s}`: expected <service>:<kind>:<amount>, e.g. payment:transient:2"
            ));
        };
        let service: Service = service.parse()?;
        let kind = match kind {
            "transient" => Kind::Transient,
            "permanent" => Kind::Permanent,
            "panic" => Kind::Panic,
            "outage" => Kind::Outage,
            "crash-after-commit" => Kind::CrashAfterCommit,
            "unparkable" => Kind::Unparkable,
            other => {
                return Err(format!(
                    "fault `{s}`: unknown kind `{other}` (transient, permanent, panic, outage, crash-after-commit, unparkable)"
                ));
            }
        };
        let amount = if let Ok(n) = amount.parse::<u64>() {
            Amount::First(n)
        } else {
            match amount.parse::<f64>() {
                Ok(f) if (0.0..=1.0).contains(&f) && kind != Kind::CrashAfterCommit => {
                    Amount::Fraction(f)
                }
                _ => {
                    return Err(format!(
                        "fault `{s}`: amount must be a count or a fraction between 0 and 1"
                    ));
                }
            }
        };
        Ok(Rule {
            service,
            kind,
            amount,
        })
    }
}

/// The faults one service injects. Cheap to clone; counters are shared.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    rules: Arc<Vec<(Rule, AtomicU64)>>,
}

impl Faults {
    /// The rules of `rules` that apply to `service`.
    pub fn for_service(rules: &[Rule], service: Service) -> Self {
        Faults {
            rules: Arc::new(
                rules
                    .iter()
                    .filter(|r| r.service == service)
                    .map(|r| (*r, AtomicU64::new(0)))
                    .collect(),
            ),
        }
    }

    /// Whether any fault is configured.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Fails (or panics) as configured for this delivery.
    pub fn inject(&self, message: &Incoming) -> Result<(), HandleError> {
        for (rule, count) in self.rules.iter() {
            let fire = match (rule.kind, rule.amount) {
                (Kind::CrashAfterCommit | Kind::Unparkable, _) => false,
                (Kind::Transient, Amount::First(n)) => u64::from(message.attempt()) <= n,
                (_, Amount::First(n)) => count.fetch_add(1, Ordering::Relaxed) < n,
                (_, Amount::Fraction(f)) => rand::rng().random_bool(f),
            };
            if !fire {
                continue;
            }
            let what = format!("injected {:?} fault ({})", rule.kind, rule.service);
            match rule.kind {
                Kind::Transient => return Err(HandleError::transient(anyhow::anyhow!(what))),
                Kind::Permanent => return Err(HandleError::permanent(anyhow::anyhow!(what))),
                Kind::Panic => panic!("{what}"),
                Kind::Outage => {
                    let lost = std::io::Error::new(std::io::ErrorKind::ConnectionReset, what);
                    return Err(HandleError::transient(sqlx::Error::Io(lost)));
                }
                Kind::CrashAfterCommit | Kind::Unparkable => {}
            }
        }
        Ok(())
    }

    /// Whether parking a failed message should fail now (counts parks).
    pub fn refuse_park(&self) -> bool {
        self.rules
            .iter()
            .any(|(rule, count)| match (rule.kind, rule.amount) {
                (Kind::Unparkable, Amount::First(n)) => count.fetch_add(1, Ordering::Relaxed) < n,
                (Kind::Unparkable, Amount::Fraction(f)) => rand::rng().random_bool(f),
                _ => false,
            })
    }

    /// Whether the process should abort now, after a commit (counts commits).
    pub fn crash_after_commit(&self) -> bool {
        self.rules.iter().any(|(rule, count)| {
            matches!((rule.kind, rule.amount), (Kind::CrashAfterCommit, Amount::First(n))
                if count.fetch_add(1, Ordering::Relaxed) + 1 == n)
        })
    }
}

/// Parses a whole `ORDERFLOW_FAULTS` value.
pub fn parse_rules(spec: &str) -> Result<Vec<Rule>, String> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(str::parse)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules() {
        let rules = parse_rules("payment:transient:2, inventory:permanent:0.5").unwrap();
        assert_eq!(
            rules[0],
            Rule {
                service: Service::Payment,
                kind: Kind::Transient,
                amount: Amount::First(2)
            }
        );
        assert_eq!(rules[1].amount, Amount::Fraction(0.5));
        assert!(
            parse_rules("payment:sometimes:1")
                .unwrap_err()
                .contains("unknown kind")
        );
        assert!(parse_rules("payment:transient:2.5").is_err());
        assert!(parse_rules("shipping:transient:1").is_err());
        assert!(parse_rules("payment:transient").is_err());
        assert_eq!(parse_rules("").unwrap(), vec![]);
    }

    #[test]
    fn crash_fires_on_the_nth_commit_only() {
        let faults = Faults::for_service(
            &parse_rules("order:crash-after-commit:2").unwrap(),
            Service::Order,
        );
        assert!(!faults.crash_after_commit());
        assert!(faults.crash_after_commit());
        assert!(!faults.crash_after_commit());
        assert!(
            Faults::for_service(
                &parse_rules("order:crash-after-commit:2").unwrap(),
                Service::Payment
            )
            .is_empty()
        );
    }
}
