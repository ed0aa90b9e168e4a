//! The catalog that seeds Inventory: a JSON array of `{sku, name, price_cents, stock}`.
//! Entries are added to the stock table once; SKUs already there keep their current stock, so
//! restarting with the same catalog changes nothing.

use std::path::Path;

use anyhow::Context as _;
use orderflow_proto::valid_sku;
use serde::Deserialize;

/// One catalog entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Stock-keeping unit, 1-64 characters from `[A-Za-z0-9._-]`.
    pub sku: String,
    /// Display name.
    pub name: String,
    /// Price of one unit, in cents.
    pub price_cents: i64,
    /// Initial units in stock.
    pub stock: i64,
}

/// The catalog used when `ORDERFLOW_CATALOG` is unset.
pub const DEMO: &str = r#"[
  {"sku": "KB-001",  "name": "Mechanical keyboard",   "price_cents": 8999,  "stock": 100},
  {"sku": "MS-002",  "name": "Wireless mouse",        "price_cents": 2999,  "stock": 250},
  {"sku": "MN-003",  "name": "27-inch monitor",       "price_cents": 32999, "stock": 40},
  {"sku": "HD-004",  "name": "Noise-cancelling headphones", "price_cents": 19999, "stock": 60},
  {"sku": "CB-005",  "name": "USB-C cable",           "price_cents": 999,   "stock": 1000},
  {"sku": "LT-006",  "name": "Laptop stand",          "price_cents": 4999,  "stock": 5}
]"#;

/// Reads and checks the catalog at `path`, or the demo catalog.
pub fn load(path: Option<&Path>) -> anyhow::Result<Vec<Entry>> {
    let (text, origin) = match path {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("reading catalog {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (DEMO.to_owned(), "built-in demo catalog".to_owned()),
    };
    parse(&text).with_context(|| format!("invalid catalog ({origin})"))
}

/// Parses and checks a catalog document.
pub fn parse(text: &str) -> anyhow::Result<Vec<Entry>> {
    let entries: Vec<Entry> = serde_json::from_str(text)
        .context("expected a JSON array of {sku, name, price_cents, stock}")?;
    let mut seen = std::collections::HashSet::new();
    for (i, entry) in entries.iter().enumerate() {
        anyhow::ensure!(
            valid_sku(&entry.sku),
            "entry {i}: sku `{}` must be 1-64 characters from [A-Za-z0-9._-]",
            entry.sku
        );
        anyhow::ensure!(
            seen.insert(entry.sku.as_str()),
            "entry {i}: sku `{}` appears twice",
            entry.sku
        );
        anyhow::ensure!(
            entry.price_cents >= 0,
            "entry {i} ({}): price_cents must not be negative",
            entry.sku
        );
        anyhow::ensure!(
            entry.stock >= 0,
            "entry {i} ({}): stock must not be negative",
            entry.sku
        );
        anyhow::ensure!(
            !entry.name.trim().is_empty(),
            "entry {i} ({}): name must not be empty",
            entry.sku
        );
    }
    Ok(entries)
}

/// Adds catalog entries that the stock table does not have yet; returns how many were added.
pub async fn seed(db: &crate::db::Database, entries: &[Entry]) -> sqlx::Result<u64> {
    let mut tx = db.begin().await?;
    let mut added = 0;
    for entry in entries {
        added += sqlx::query(
            "INSERT INTO stock (sku, name, price_cents, available) VALUES ($1, $2, $3, $4) ON CONFLICT (sku) DO NOTHING",
        )
        .bind(&entry.sku)
        .bind(&entry.name)
        .bind(entry.price_cents)
        .bind(entry.stock)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    tx.commit().await?;
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_catalog_is_valid() {
        let entries = parse(DEMO).unwrap();
        assert!(entries.len() >= 5);
    }

    #[test]
    fn rejects_bad_entries_with_the_reason() {
        let dup = r#"[{"sku":"A","name":"a","price_cents":1,"stock":1},{"sku":"A","name":"b","price_cents":1,"stock":1}]"#;
        assert!(format!("{:#}", parse(dup).unwrap_err()).contains("appears twice"));
        let negative = r#"[{"sku":"A","name":"a","price_cents":1,"stock":-1}]"#;
        assert!(format!("{:#}", parse(negative).unwrap_err()).contains("stock"));
        let bad_sku = r#"[{"sku":"a b","name":"a","price_cents":1,"stock":1}]"#;
        assert!(format!("{:#}", parse(bad_sku).unwrap_err()).contains("sku"));
        let unknown_field = r#"[{"sku":"A","name":"a","price_cents":1,"stock":1,"colour":"red"}]"#;
        assert!(parse(unknown_field).is_err());
        assert!(parse("{}").is_err());
    }
}
