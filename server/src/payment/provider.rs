//! A deterministic stand-in for a payment provider: it declines any charge above a configured
//! limit and approves the rest with a fresh transaction id.

/// The simulated provider.
#[derive(Debug, Clone, Copy)]
pub struct Provider {
    limit_cents: i64,
}

/// The provider's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Charge {
    /// Approved, with the provider's transaction id.
    Approved(String),
    /// Declined because the amount exceeds the limit.
    Declined(String),
}

impl Provider {
    /// A provider that declines amounts above `limit_cents`.
    pub fn new(limit_cents: i64) -> Self {
        Provider { limit_cents }
    }

    /// Charges `amount_cents`.
    pub fn charge(&self, amount_cents: i64) -> Charge {
        if amount_cents > self.limit_cents {
            Charge::Declined(format!(
                "amount {} exceeds the payment limit of {}",
                cents(amount_cents),
                cents(self.limit_cents)
            ))
        } else {
            Charge::Approved(format!("txn_{}", uuid::Uuid::new_v4().simple()))
        }
    }
}

fn cents(amount: i64) -> String {
    format!("{}.{:02}", amount / 100, (amount % 100).abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declines_above_the_limit_only() {
        let provider = Provider::new(100_000);
        assert!(matches!(provider.charge(100_000), Charge::Approved(id) if id.starts_with("txn_")));
        assert_eq!(
            provider.charge(100_001),
            Charge::Declined("amount 1000.01 exceeds the payment limit of 1000.00".into())
        );
    }

    #[test]
    fn transaction_ids_are_unique() {
        let provider = Provider::new(10);
        assert_ne!(provider.charge(1), provider.charge(1));
    }
}
