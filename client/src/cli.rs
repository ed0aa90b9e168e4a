//! The command line: clap types for every subcommand and the parsers for values that need
//! more than a type conversion (`--item SKU=QTY`, the server address, durations).
//!
//! Parsing fails here, before anything connects, so typos cost no round trip. Rules the
//! server owns (SKU alphabet, quantity limits) are left to it so they live in one place.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use orderflow_proto::orderflow::v1 as pb;
use tonic::transport::Uri;

/// Command-line client for the orderflow order service.
#[derive(Debug, Parser)]
#[command(
    name = "orderflow",
    version,
    after_help = "Exit status:
  0  success
  1  any other failure
  2  bad arguments, or the server answered INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS
     or OUT_OF_RANGE: the request itself must change
  3  the server was unreachable or did not answer in time (connection failure,
     UNAVAILABLE, DEADLINE_EXCEEDED): a retry may succeed"
)]
pub(crate) struct Cli {
    /// gRPC address of the order service; `host:port` means `http://host:port`.
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_ADDR",
        default_value = "http://127.0.0.1:50051",
        value_parser = parse_addr
    )]
    pub(crate) addr: String,

    /// Print JSON instead of text: one object per line, so streams can be piped to `jq`.
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_JSON",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub(crate) json: bool,

    /// Deadline for connecting and for each unary call (e.g. `500ms`, `10s`, `1m`); streams
    /// from `watch` are not limited by it.
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_TIMEOUT",
        default_value = "10s",
        value_parser = parse_timeout
    )]
    pub(crate) timeout: Duration,

    /// Bearer token sent with every call (when the server has ORDERFLOW_AUTH_TOKENS).
    #[arg(long, global = true, env = "ORDERFLOW_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,

    /// CA certificate (PEM) to trust for `https://` addresses, besides the system's.
    #[arg(long, global = true, env = "ORDERFLOW_TLS_CA")]
    pub(crate) tls_ca: Option<std::path::PathBuf>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Place an order and print its id and status.
    Place(PlaceArgs),
    /// Print one order with its items, total and status history.
    Get(GetArgs),
    /// List orders, newest first, a page at a time.
    List(ListArgs),
    /// Follow an order's status changes until it reaches a terminal status.
    Watch(WatchArgs),
    /// Inspect, replay and purge dead letters (needs an admin token when auth is on).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Check the server's health: exit 0 only while it reports SERVING.
    Health(HealthArgs),
}

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// Every dead-letter queue and its depth; with a queue, the dead letters in it.
    List(DlqListArgs),
    /// One dead letter in full (decoded payload, headers), or the first few of a queue.
    Show(DlqShowArgs),
    /// Send dead letters back to the work queue they failed on, attempt count reset.
    Replay(DlqSelectArgs),
    /// Delete dead letters.
    Purge(DlqSelectArgs),
}

#[derive(Debug, Args)]
pub(crate) struct DlqListArgs {
    /// A queue: `payment.inventory-reserved`, its work queue or its DLQ name.
    pub(crate) queue: Option<String>,
    /// Most dead letters to list.
    #[arg(long, default_value_t = 50)]
    pub(crate) limit: u32,
}

#[derive(Debug, Args)]
pub(crate) struct DlqShowArgs {
    /// The queue.
    pub(crate) queue: String,
    /// The dead letter's message id; without it, the first ones of the queue.
    pub(crate) message_id: Option<String>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["message_ids", "all"])))]
pub(crate) struct DlqSelectArgs {
    /// The queue.
    pub(crate) queue: String,
    /// Message ids to act on.
    pub(crate) message_ids: Vec<String>,
    /// Act on every dead letter of the queue.
    #[arg(long)]
    pub(crate) all: bool,
}

#[derive(Debug, Args)]
pub(crate) struct HealthArgs {
    /// Service to check; empty for the whole server.
    #[arg(long, default_value = "")]
    pub(crate) service: String,
}

#[derive(Debug, Args)]
pub(crate) struct PlaceArgs {
    /// Customer placing the order.
    #[arg(long, env = "ORDERFLOW_CUSTOMER")]
    pub(crate) customer: String,

    /// An order line as SKU=QTY, e.g. `--item sku-1=2`; repeat for more lines.
    #[arg(long = "item", value_name = "SKU=QTY", required = true, value_parser = parse_item)]
    pub(crate) items: Vec<pb::OrderItem>,

    /// Key that makes retries safe: placing again with the same customer and key returns the
    /// original order instead of a new one.
    #[arg(long)]
    pub(crate) idempotency_key: Option<String>,

    /// After placing, follow the order like `watch` until it reaches a terminal status.
    #[arg(long)]
    pub(crate) watch: bool,
}

#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// Id of the order.
    pub(crate) order_id: String,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Only this customer's orders.
    #[arg(long, env = "ORDERFLOW_CUSTOMER")]
    pub(crate) customer: Option<String>,

    /// Orders per page, 1-500; without it the server's default (50).
    #[arg(long, env = "ORDERFLOW_PAGE_SIZE", value_parser = clap::value_parser!(u32).range(1..=500))]
    pub(crate) page_size: Option<u32>,

    /// Start at this page: the token printed after the previous page.
    #[arg(long)]
    pub(crate) page_token: Option<String>,

    /// Keep fetching pages until the last one.
    #[arg(long)]
    pub(crate) all: bool,
}

#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// Id of the order.
    pub(crate) order_id: String,

    /// Replay every change after this version before following (0 replays the whole
    /// history). Without it the stream starts at the current status.
    #[arg(long, value_name = "VERSION")]
    pub(crate) resume_after: Option<u64>,
}

/// Parses `SKU=QTY`. Only the shape is checked; the server validates SKUs and limits.
fn parse_item(raw: &str) -> Result<pb::OrderItem, String> {
    let Some((sku, quantity)) = raw.split_once('=') else {
        return Err(format!("expected SKU=QTY (e.g. sku-1=2), got {raw:?}"));
    };
    let (sku, quantity) = (sku.trim(), quantity.trim());
    if sku.is_empty() {
        return Err(format!("the SKU before '=' is empty in {raw:?}"));
    }
    let quantity: u32 = quantity.parse().map_err(|_| {
        format!("the quantity for {sku} must be a whole number of units, got {quantity:?}")
    })?;
    if quantity == 0 {
        return Err(format!("the quantity for {sku} must be at least 1"));
    }
    Ok(pb::OrderItem {
        sku: sku.to_owned(),
        quantity,
    })
}

/// Normalises the server address to an `http://` URI. A bare `host:port` is what people
/// type; it would otherwise parse as a URI with scheme `host`.
fn parse_addr(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("the address is empty; expected host:port or http://host:port".to_owned());
    }
    let addr = match raw.split_once("://") {
        None => format!("http://{raw}"),
        Some((scheme, _))
            if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
        {
            raw.to_owned()
        }
        Some((scheme, _)) => {
            return Err(format!(
                "unsupported scheme {scheme:?}; expected host:port or http://host:port"
            ));
        }
    };
    let uri: Uri = addr
        .parse()
        .map_err(|e| format!("{raw:?} is not a valid address: {e}"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{raw:?} names no host; expected host:port"));
    }
    // http::Uri keeps any text after the colon; the connector would reject it later, vaguely.
    let port = uri
        .authority()
        .and_then(|authority| authority.as_str().rsplit_once(':'))
        .map(|(_, port)| port)
        .filter(|port| !port.contains(']'));
    if port.is_some_and(|port| port.parse::<u16>().is_err()) {
        return Err(format!(
            "{raw:?} has an invalid port; expected a number 1-65535"
        ));
    }
    // gRPC puts the method in the path, so a path here would be silently dropped.
    if uri.path() != "/" || uri.query().is_some() {
        return Err(format!("{raw:?} has a path; expected only host:port"));
    }
    Ok(addr)
}

/// Parses a human duration such as `10s` or `1m30s`; zero is refused because every call
/// would then fail at once.
fn parse_timeout(raw: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(raw)
        .map_err(|e| format!("{raw:?} is not a duration like 500ms, 10s or 1m: {e}"))?;
    if timeout.is_zero() {
        return Err("the timeout must be greater than zero".to_owned());
    }
    Ok(timeout)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_items() {
        let item = parse_item("sku-1=2").unwrap();
        assert_eq!((item.sku.as_str(), item.quantity), ("sku-1", 2));
        let item = parse_item(" widget.large = 10000 ").unwrap();
        assert_eq!((item.sku.as_str(), item.quantity), ("widget.large", 10_000));
    }

    #[test]
    fn rejects_malformed_items_with_a_helpful_message() {
        assert_eq!(
            parse_item("sku-1").unwrap_err(),
            r#"expected SKU=QTY (e.g. sku-1=2), got "sku-1""#
        );
        assert_eq!(
            parse_item("=2").unwrap_err(),
            r#"the SKU before '=' is empty in "=2""#
        );
        assert_eq!(
            parse_item("sku-1=two").unwrap_err(),
            r#"the quantity for sku-1 must be a whole number of units, got "two""#
        );
        assert_eq!(
            parse_item("sku-1=").unwrap_err(),
            r#"the quantity for sku-1 must be a whole number of units, got """#
        );
        assert_eq!(
            parse_item("sku-1=-1").unwrap_err(),
            r#"the quantity for sku-1 must be a whole number of units, got "-1""#
        );
        assert_eq!(
            parse_item("sku-1=1.5").unwrap_err(),
            r#"the quantity for sku-1 must be a whole number of units, got "1.5""#
        );
        assert_eq!(
            parse_item("sku-1=0").unwrap_err(),
            "the quantity for sku-1 must be at least 1"
        );
        // A second '=' lands in the quantity rather than silently in the SKU.
        assert!(parse_item("a=b=3").is_err());
    }

    #[test]
    fn items_reach_the_place_command_in_order() {
        let cli = Cli::try_parse_from([
            "orderflow",
            "place",
            "--customer",
            "alice",
            "--item",
            "a=1",
            "--item",
            "b=2",
        ])
        .unwrap();
        let Command::Place(place) = cli.command else {
            panic!("expected place");
        };
        let items: Vec<_> = place
            .items
            .iter()
            .map(|i| (i.sku.as_str(), i.quantity))
            .collect();
        assert_eq!(items, [("a", 1), ("b", 2)]);
    }

    #[test]
    fn place_needs_at_least_one_item() {
        let err = Cli::try_parse_from(["orderflow", "place", "--customer", "alice"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn a_bad_item_is_a_usage_error_naming_the_value() {
        let err = Cli::try_parse_from(["orderflow", "place", "--customer", "a", "--item", "x=y"])
            .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(err.to_string().contains(r#"got "y""#), "{err}");
    }

    #[test]
    fn normalises_addresses() {
        let ok = |raw: &str| parse_addr(raw).unwrap();
        assert_eq!(ok("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(ok("localhost:50051"), "http://localhost:50051");
        assert_eq!(ok("  orders.internal:7000 "), "http://orders.internal:7000");
        assert_eq!(ok("[::1]:50051"), "http://[::1]:50051");
        assert_eq!(ok("http://127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(ok("HTTP://host:1"), "HTTP://host:1");
        assert_eq!(ok("http://host:1/"), "http://host:1/");
        assert_eq!(ok("host"), "http://host");
        assert_eq!(ok("https://host:443"), "https://host:443");
    }

    #[test]
    fn rejects_addresses_it_cannot_use() {
        let err = |raw: &str| parse_addr(raw).unwrap_err();
        assert!(err("").contains("empty"), "{}", err(""));
        assert!(err("   ").contains("empty"));
        assert!(err("ftp://host:21").contains(r#"unsupported scheme "ftp""#));
        assert!(err("host:port").contains("invalid port"));
        assert!(err("host:99999").contains("invalid port"));
        assert!(err("host:").contains("invalid port"));
        assert!(err("host name:1").contains("not a valid address"));
        assert!(err("http://host:1/api").contains("has a path"));
        assert!(err("http://").contains("not a valid address"));
    }

    #[test]
    fn parses_timeouts() {
        assert_eq!(parse_timeout("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_timeout("250ms"), Ok(Duration::from_millis(250)));
        assert!(
            parse_timeout("0s")
                .unwrap_err()
                .contains("greater than zero")
        );
        assert!(parse_timeout("ten").is_err());
    }

    #[test]
    fn global_options_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "orderflow",
            "get",
            "o-1",
            "--json",
            "--addr",
            "h:1",
            "--timeout",
            "2s",
        ])
        .unwrap();
        assert!(cli.json);
        assert_eq!(cli.addr, "http://h:1");
        assert_eq!(cli.timeout, Duration::from_secs(2));
    }
}
