//! The order status state machine: which facts move an order from which status to which.
//!
//! ```text
//! PENDING --reserved--> INVENTORY_RESERVED --paid--> COMPLETED
//!    |                         '--declined--> PAYMENT_FAILED
//!    '--rejected--> REJECTED
//! PENDING | INVENTORY_RESERVED --dead-lettered--> FAILED
//! ```
//! A payment outcome may overtake the reservation (they travel on different queues); the
//! reservation is then recorded first so every watcher sees PENDING → INVENTORY_RESERVED → ….
//! COMPLETED, REJECTED and PAYMENT_FAILED are final. FAILED ends watch streams too but is not
//! final: only an *outcome* moves a FAILED order on (paid → COMPLETED, declined →
//! PAYMENT_FAILED, rejected → REJECTED), for instance once its dead letter is replayed. A late
//! reservation alone does not, since the step that failed may come after it.

use orderflow_proto::orderflow::v1 as pb;

/// Where an order is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Waiting for Inventory.
    Pending,
    /// Stock reserved; waiting for Payment.
    InventoryReserved,
    /// Paid.
    Completed,
    /// Inventory refused it.
    Rejected,
    /// Payment declined; stock released.
    PaymentFailed,
    /// A message about it was dead-lettered.
    Failed,
}

impl Status {
    /// Whether watchers should stop here.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Status::Pending | Status::InventoryReserved)
    }

    /// Whether nothing can move the order any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Rejected | Status::PaymentFailed
        )
    }

    /// Database representation.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::InventoryReserved => "INVENTORY_RESERVED",
            Status::Completed => "COMPLETED",
            Status::Rejected => "REJECTED",
            Status::PaymentFailed => "PAYMENT_FAILED",
            Status::Failed => "FAILED",
        }
    }

    /// Parses [`Status::as_str`].
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "PENDING" => Status::Pending,
            "INVENTORY_RESERVED" => Status::InventoryReserved,
            "COMPLETED" => Status::Completed,
            "REJECTED" => Status::Rejected,
            "PAYMENT_FAILED" => Status::PaymentFailed,
            "FAILED" => Status::Failed,
            _ => return None,
        })
    }
}

impl From<Status> for pb::OrderStatus {
    fn from(status: Status) -> Self {
        match status {
            Status::Pending => pb::OrderStatus::Pending,
            Status::InventoryReserved => pb::OrderStatus::InventoryReserved,
            Status::Completed => pb::OrderStatus::Completed,
            Status::Rejected => pb::OrderStatus::Rejected,
            Status::PaymentFailed => pb::OrderStatus::PaymentFailed,
            Status::Failed => pb::OrderStatus::Failed,
        }
    }
}

/// Something that happened to an order elsewhere in the saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fact {
    /// Inventory reserved the stock.
    Reserved,
    /// Inventory refused the order.
    Rejected,
    /// Payment charged it.
    Paid,
    /// Payment declined it.
    Declined,
    /// A message about it was dead-lettered.
    DeadLettered,
}

/// The statuses `fact` moves an order through, from `current`. `reserved` says whether the
/// order ever reached INVENTORY_RESERVED. Empty for duplicates and stale facts.
pub fn transitions(current: Status, reserved: bool, fact: Fact) -> Vec<Status> {
    use Status::*;
    if current.is_final() {
        return vec![];
    }
    // Payment outcomes imply the reservation; record it first if it has not been.
    let after_reservation = |outcome: Status| {
        if reserved {
            vec![outcome]
        } else {
            vec![InventoryReserved, outcome]
        }
    };
    match (current, fact) {
        (Failed, Fact::DeadLettered) => vec![],
        (_, Fact::DeadLettered) => vec![Failed],
        (Pending, Fact::Reserved) => vec![InventoryReserved],
        (_, Fact::Reserved) => vec![],
        (Pending | Failed, Fact::Rejected) if !reserved => vec![Rejected],
        (_, Fact::Rejected) => vec![],
        (_, Fact::Paid) => after_reservation(Completed),
        (_, Fact::Declined) => after_reservation(PaymentFailed),
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Fact::{DeadLettered, Declined, Paid, Reserved},
        Status::{Completed, Failed, InventoryReserved, PaymentFailed, Pending},
        *,
    };

    #[test]
    fn happy_path() {
        assert_eq!(
            transitions(Pending, false, Reserved),
            vec![InventoryReserved]
        );
        assert_eq!(transitions(InventoryReserved, true, Paid), vec![Completed]);
    }

    #[test]
    fn unhappy_paths() {
        assert_eq!(
            transitions(Pending, false, Fact::Rejected),
            vec![Status::Rejected]
        );
        assert_eq!(
            transitions(InventoryReserved, true, Declined),
            vec![PaymentFailed]
        );
        assert_eq!(
            transitions(InventoryReserved, true, DeadLettered),
            vec![Failed]
        );
        assert_eq!(transitions(Pending, false, DeadLettered), vec![Failed]);
    }

    #[test]
    fn payment_overtaking_the_reservation_records_it_first() {
        assert_eq!(
            transitions(Pending, false, Paid),
            vec![InventoryReserved, Completed]
        );
        assert_eq!(
            transitions(Pending, false, Declined),
            vec![InventoryReserved, PaymentFailed]
        );
    }

    #[test]
    fn duplicates_and_stale_facts_change_nothing() {
        assert!(transitions(InventoryReserved, true, Reserved).is_empty());
        assert!(transitions(InventoryReserved, true, Fact::Rejected).is_empty());
        for status in [Completed, Status::Rejected, PaymentFailed] {
            for fact in [Reserved, Fact::Rejected, Paid, Declined, DeadLettered] {
                assert!(
                    transitions(status, true, fact).is_empty(),
                    "{status:?} {fact:?}"
                );
            }
        }
        assert!(transitions(Failed, false, DeadLettered).is_empty());
    }

    #[test]
    fn only_an_outcome_moves_a_failed_order_on() {
        assert_eq!(transitions(Failed, true, Paid), vec![Completed]);
        assert_eq!(
            transitions(Failed, false, Paid),
            vec![InventoryReserved, Completed]
        );
        assert_eq!(
            transitions(Failed, false, Declined),
            vec![InventoryReserved, PaymentFailed]
        );
        assert_eq!(
            transitions(Failed, false, Fact::Rejected),
            vec![Status::Rejected]
        );
        // Payment failed for good after the reservation; the reservation arriving late must not
        // hide that failure.
        assert!(transitions(Failed, false, Reserved).is_empty());
        assert!(transitions(Failed, true, Reserved).is_empty());
    }

    #[test]
    fn terminal_and_final() {
        assert!(!Pending.is_terminal() && !InventoryReserved.is_terminal());
        assert!(Failed.is_terminal() && !Failed.is_final());
        assert!(Completed.is_final() && Completed.is_terminal());
        for s in [
            Pending,
            InventoryReserved,
            Completed,
            Status::Rejected,
            PaymentFailed,
            Failed,
        ] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
    }
}
