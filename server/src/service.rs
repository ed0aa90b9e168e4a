//! The three services that make up orderflow and how they are named in logs, traces,
//! AMQP `app_id`s and queue names. `orderflow-server --services` picks a subset of them.

use std::{fmt, str::FromStr};

/// One of orderflow's services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    /// The gRPC API, order persistence and status tracking.
    Order,
    /// Stock reservation and release.
    Inventory,
    /// The (simulated) payment provider.
    Payment,
}

impl Service {
    /// Every service, in saga order.
    pub const ALL: [Service; 3] = [Service::Order, Service::Inventory, Service::Payment];

    /// Short name used in queue names and on the command line: `order`, `inventory`, `payment`.
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Order => "order",
            Service::Inventory => "inventory",
            Service::Payment => "payment",
        }
    }

    /// Name reported to tracing backends and as the AMQP `app_id`: `order-service`, ….
    pub fn service_name(self) -> &'static str {
        match self {
            Service::Order => "order-service",
            Service::Inventory => "inventory-service",
            Service::Payment => "payment-service",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Service {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "order" | "order-service" => Ok(Service::Order),
            "inventory" | "inventory-service" => Ok(Service::Inventory),
            "payment" | "payment-service" => Ok(Service::Payment),
            other => Err(format!(
                "unknown service `{other}` (expected order, inventory or payment)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_short_and_long_names() {
        assert_eq!("order".parse::<Service>(), Ok(Service::Order));
        assert_eq!(
            " inventory-service ".parse::<Service>(),
            Ok(Service::Inventory)
        );
        assert!(
            "shipping"
                .parse::<Service>()
                .unwrap_err()
                .contains("shipping")
        );
    }

    #[test]
    fn names_round_trip() {
        for service in Service::ALL {
            assert_eq!(service.as_str().parse::<Service>(), Ok(service));
            assert_eq!(service.service_name().parse::<Service>(), Ok(service));
        }
    }
}
