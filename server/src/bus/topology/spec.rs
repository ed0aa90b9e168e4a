//! The topology as data: which exchanges, queues (with their arguments) and bindings must
//! exist, and who uses each. [`super::Topology::spec`] builds it; declaring, verifying and
//! deleting all read it, so they cannot drift apart. Comparing it with what a broker reports
//! ([`Found`]) is pure and lives here too.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use crate::service::Service;

/// Exchange types orderflow declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// Routes by routing-key pattern.
    Topic,
    /// Routes to every bound queue.
    Fanout,
}

impl ExchangeKind {
    /// The name RabbitMQ uses: `topic`, `fanout`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Topic => "topic",
            ExchangeKind::Fanout => "fanout",
        }
    }
}

/// A queue argument's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Argument {
    /// A string (AMQP long string).
    Str(String),
    /// An integer.
    Int(i64),
    /// Anything else a broker reported (a boolean, a list, …), as JSON text.
    Other(String),
}

impl fmt::Display for Argument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Argument::Str(s) => write!(f, "{s:?}"),
            Argument::Int(n) => write!(f, "{n}"),
            Argument::Other(json) => f.write_str(json),
        }
    }
}

/// A durable exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeSpec {
    /// Full name.
    pub name: String,
    /// Its type.
    pub kind: ExchangeKind,
    /// Services that need it.
    pub users: Vec<Service>,
}

/// A durable queue and the arguments it must have (no others).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// Full name.
    pub name: String,
    /// Every `x-…` argument, `x-queue-type` included.
    pub arguments: BTreeMap<String, Argument>,
    /// Services that need it.
    pub users: Vec<Service>,
}

/// A binding of a queue to an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingSpec {
    /// Source exchange.
    pub exchange: String,
    /// Destination queue.
    pub queue: String,
    /// Binding key.
    pub key: String,
    /// Services that need it (those of its queue).
    pub users: Vec<Service>,
}

/// Everything that must exist, in declaration order: exchanges, then queues, then bindings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spec {
    /// Exchanges.
    pub exchanges: Vec<ExchangeSpec>,
    /// Queues.
    pub queues: Vec<QueueSpec>,
    /// Bindings (queue to exchange).
    pub bindings: Vec<BindingSpec>,
}

impl Spec {
    /// Only what `service` uses.
    pub fn used_by(&self, service: Service) -> Spec {
        Spec {
            exchanges: keep(&self.exchanges, |e| e.users.contains(&service)),
            queues: keep(&self.queues, |q| q.users.contains(&service)),
            bindings: keep(&self.bindings, |b| b.users.contains(&service)),
        }
    }
}

fn keep<T: Clone>(items: &[T], wanted: impl Fn(&T) -> bool) -> Vec<T> {
    items.iter().filter(|i| wanted(i)).cloned().collect()
}

/// An exchange as the broker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundExchange {
    /// `topic`, `fanout`, `direct`, ….
    pub kind: String,
    /// Survives a broker restart.
    pub durable: bool,
}

/// A queue as the broker reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FoundQueue {
    /// Survives a broker restart.
    pub durable: bool,
    /// Its arguments; `x-queue-type` is the queue's actual type (a classic queue declared
    /// without the argument still reports `classic`).
    pub arguments: BTreeMap<String, Argument>,
    /// `(exchange, binding key)` of every binding, except the default exchange's implicit one.
    pub bindings: BTreeSet<(String, String)>,
}

/// What a broker has of the objects a [`Spec`] names; a name absent here does not exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// Exchanges by name.
    pub exchanges: BTreeMap<String, FoundExchange>,
    /// Queues by name.
    pub queues: BTreeMap<String, FoundQueue>,
}

/// One way the broker differs from the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The object, e.g. ``queue `ns.order.payment-failed` `` or a binding.
    pub object: String,
    /// Which property differs (empty: the object as a whole).
    pub property: String,
    /// What the spec says.
    pub expected: String,
    /// What the broker has.
    pub found: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.property.is_empty() {
            write!(f, "{}: ", self.object)?;
        } else {
            write!(f, "{} {}: ", self.object, self.property)?;
        }
        write!(f, "expected {}, found {}", self.expected, self.found)
    }
}

fn mismatch(
    object: &str,
    property: impl Into<String>,
    expected: impl fmt::Display,
    found: impl fmt::Display,
) -> Mismatch {
    Mismatch {
        object: object.to_owned(),
        property: property.into(),
        expected: expected.to_string(),
        found: found.to_string(),
    }
}

/// Every difference between `spec` and `found`, in the spec's order. Bindings of a missing
/// queue are not listed again; bindings the spec does not name are (they change what a queue
/// receives).
pub fn compare(spec: &Spec, found: &Found) -> Vec<Mismatch> {
    let mut mismatches = Vec::new();
    for exchange in &spec.exchanges {
        let object = format!("exchange `{}`", exchange.name);
        let wanted = exchange.kind.as_str();
        match found.exchanges.get(&exchange.name) {
            None => mismatches.push(mismatch(
                &object,
                "",
                format!("a durable {wanted} exchange"),
                "none",
            )),
            Some(actual) => {
                if actual.kind != wanted {
                    mismatches.push(mismatch(&object, "type", wanted, &actual.kind));
                }
                if !actual.durable {
                    mismatches.push(mismatch(&object, "durable", true, false));
                }
            }
        }
    }
    for queue in &spec.queues {
        let object = format!("queue `{}`", queue.name);
        let Some(actual) = found.queues.get(&queue.name) else {
            let kind = match queue.arguments.get("x-queue-type") {
                Some(Argument::Str(kind)) => kind.as_str(),
                _ => "classic",
            };
            mismatches.push(mismatch(
                &object,
                "",
                format!("a durable {kind} queue"),
                "none",
            ));
            continue;
        };
        if !actual.durable {
            mismatches.push(mismatch(&object, "durable", true, false));
        }
        let names: BTreeSet<&String> = queue
            .arguments
            .keys()
            .chain(actual.arguments.keys())
            .collect();
        for name in names {
            let show =
                |value: Option<&Argument>| value.map_or("absent".to_owned(), |v| v.to_string());
            let (expected, got) = (queue.arguments.get(name), actual.arguments.get(name));
            if expected != got {
                mismatches.push(mismatch(&object, name.as_str(), show(expected), show(got)));
            }
        }
        let wanted: BTreeSet<(String, String)> = spec
            .bindings
            .iter()
            .filter(|b| b.queue == queue.name)
            .map(|b| (b.exchange.clone(), b.key.clone()))
            .collect();
        for (exchange, key) in wanted.difference(&actual.bindings) {
            let object = format!("binding `{exchange}` -> `{}` (key `{key}`)", queue.name);
            mismatches.push(mismatch(&object, "", "present", "none"));
        }
        for (exchange, key) in actual.bindings.difference(&wanted) {
            let object = format!("binding `{exchange}` -> `{}` (key `{key}`)", queue.name);
            mismatches.push(mismatch(&object, "", "none", "present"));
        }
    }
    mismatches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        let users = vec![Service::Order];
        Spec {
            exchanges: vec![ExchangeSpec {
                name: "ns.events".into(),
                kind: ExchangeKind::Topic,
                users: users.clone(),
            }],
            queues: vec![QueueSpec {
                name: "ns.order.q".into(),
                arguments: BTreeMap::from([
                    ("x-queue-type".into(), Argument::Str("quorum".into())),
                    ("x-delivery-limit".into(), Argument::Int(20)),
                ]),
                users: users.clone(),
            }],
            bindings: vec![BindingSpec {
                exchange: "ns.events".into(),
                queue: "ns.order.q".into(),
                key: "a.b".into(),
                users,
            }],
        }
    }

    fn matching() -> Found {
        Found {
            exchanges: BTreeMap::from([(
                "ns.events".into(),
                FoundExchange {
                    kind: "topic".into(),
                    durable: true,
                },
            )]),
            queues: BTreeMap::from([(
                "ns.order.q".into(),
                FoundQueue {
                    durable: true,
                    arguments: spec().queues[0].arguments.clone(),
                    bindings: BTreeSet::from([("ns.events".into(), "a.b".into())]),
                },
            )]),
        }
    }

    #[test]
    fn a_matching_broker_has_no_mismatch() {
        assert_eq!(compare(&spec(), &matching()), vec![]);
    }

    #[test]
    fn every_difference_is_reported_with_expected_and_found() {
        let mut found = matching();
        found.exchanges.get_mut("ns.events").unwrap().kind = "direct".into();
        let queue = found.queues.get_mut("ns.order.q").unwrap();
        queue
            .arguments
            .insert("x-queue-type".into(), Argument::Str("classic".into()));
        queue
            .arguments
            .insert("x-delivery-limit".into(), Argument::Int(5));
        queue
            .arguments
            .insert("x-message-ttl".into(), Argument::Int(1000));
        queue.bindings = BTreeSet::from([("ns.events".into(), "#".into())]);
        let text: Vec<String> = compare(&spec(), &found)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            [
                "exchange `ns.events` type: expected topic, found direct",
                "queue `ns.order.q` x-delivery-limit: expected 20, found 5",
                "queue `ns.order.q` x-message-ttl: expected absent, found 1000",
                "queue `ns.order.q` x-queue-type: expected \"quorum\", found \"classic\"",
                "binding `ns.events` -> `ns.order.q` (key `a.b`): expected present, found none",
                "binding `ns.events` -> `ns.order.q` (key `#`): expected none, found present",
            ]
        );
    }

    #[test]
    fn missing_objects_are_reported_once_each() {
        let text: Vec<String> = compare(&spec(), &Found::default())
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            [
                "exchange `ns.events`: expected a durable topic exchange, found none",
                "queue `ns.order.q`: expected a durable quorum queue, found none",
            ]
        );
    }

    #[test]
    fn a_missing_argument_and_durability_count() {
        let mut found = matching();
        let queue = found.queues.get_mut("ns.order.q").unwrap();
        queue.durable = false;
        queue.arguments.remove("x-delivery-limit");
        let text: Vec<String> = compare(&spec(), &found)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            [
                "queue `ns.order.q` durable: expected true, found false",
                "queue `ns.order.q` x-delivery-limit: expected 20, found absent",
            ]
        );
    }

    #[test]
    fn a_service_sees_only_what_it_uses() {
        let mut spec = spec();
        spec.queues[0].users = vec![Service::Payment];
        spec.bindings[0].users = vec![Service::Payment];
        let order = spec.used_by(Service::Order);
        assert_eq!(order.exchanges.len(), 1);
        assert!(order.queues.is_empty() && order.bindings.is_empty());
        assert_eq!(spec.used_by(Service::Payment).queues.len(), 1);
    }
}
