//! The subcommands: each turns its arguments into API calls and prints the results.
//!
//! Results go to stdout one rendering per line (text or JSON, chosen once in [`Printer`]);
//! failures are returned to `main`, which owns stderr and the exit status.

use std::io::{self, Write as _};

use anyhow::{Context as _, Result, bail};
use orderflow_proto::orderflow::v1 as pb;
use serde_json::Value;

use crate::{
    api::{Access, Api},
    cli::{Cli, Command, GetArgs, ListArgs, PlaceArgs},
    dlq::{self, Print},
    output,
};

/// Connects and runs the chosen subcommand.
pub(crate) async fn run(cli: Cli) -> Result<()> {
    let tls_ca = match &cli.tls_ca {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => None,
    };
    let access = Access {
        token: cli.token.clone(),
        tls_ca,
    };
    let mut api = Api::connect(&cli.addr, cli.timeout, &access).await?;
    let mut printer = Printer { json: cli.json };
    match cli.command {
        Command::Place(args) => place(&mut api, &mut printer, args).await,
        Command::Get(args) => get(&mut api, &mut printer, args).await,
        Command::List(args) => list(&mut api, &mut printer, args).await,
        Command::Watch(args) => {
            watch(&mut api, &mut printer, args.order_id, args.resume_after).await
        }
        Command::Dlq(command) => dlq::run(&mut api, &mut printer, command).await,
        Command::Health(args) => dlq::health(&mut api, &mut printer, args.service).await,
    }
}

/// Writes each result as soon as it exists, so `watch` output reaches a pipe live.
#[derive(Debug)]
struct Printer {
    json: bool,
}

impl Print for Printer {
    fn print(&mut self, json: impl FnOnce() -> Value, text: impl FnOnce() -> String) -> Result<()> {
        let line = if self.json {
            json().to_string()
        } else {
            text()
        };
        self.line(&line)
    }
}

impl Printer {
    fn line(&mut self, line: &str) -> Result<()> {
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .context("writing to stdout")
    }
}

/// Places the order and prints it. With `--watch` its later changes follow; in JSON that
/// makes the order object the first line and update objects the rest.
async fn place(api: &mut Api, printer: &mut Printer, args: PlaceArgs) -> Result<()> {
    let PlaceArgs {
        customer,
        items,
        idempotency_key,
        watch: follow,
    } = args;
    let order = api
        .place_order(pb::PlaceOrderRequest {
            customer_id: customer,
            items,
            idempotency_key,
        })
        .await?;
    printer.print(
        || output::order_json(&order),
        || output::placed_text(&order),
    )?;

    // A retried idempotency key can return an order that has already finished; there is
    // nothing left to follow, and the server might never end such a stream.
    if follow && !output::is_terminal(order.status) {
        // Resuming after the version just printed shows each later change exactly once, even
        // those that happened between the two calls.
        watch(api, printer, order.order_id, Some(order.version)).await?;
    }
    Ok(())
}

async fn get(api: &mut Api, printer: &mut Printer, args: GetArgs) -> Result<()> {
    let order = api.get_order(args.order_id).await?;
    printer.print(|| output::order_json(&order), || output::order_text(&order))
}

/// Prints one page, or with `--all` every page. JSON prints each page as it arrives; text
/// collects them so the whole listing shares one set of column widths.
async fn list(api: &mut Api, printer: &mut Printer, args: ListArgs) -> Result<()> {
    let mut page_token = args.page_token.unwrap_or_default();
    let mut collected = Vec::new();
    loop {
        let page = api
            .list_orders(pb::ListOrdersRequest {
                page_size: args.page_size.unwrap_or(0),
                page_token: page_token.clone(),
                customer_id: args.customer.clone(),
            })
            .await?;
        let next = page.next_page_token.clone();
        if printer.json {
            printer.line(&output::page_json(&page).to_string())?;
        } else {
            collected.extend(page.orders);
        }
        if !args.all || next.is_empty() {
            if !printer.json {
                print_orders_text(printer, &collected, &next)?;
            }
            return Ok(());
        }
        if next == page_token {
            bail!("the server returned page token {next:?} again; stopping instead of looping");
        }
        page_token = next;
    }
}

/// The text listing: the table (or a note that there is nothing), then the token that
/// continues it, if any.
fn print_orders_text(
    printer: &mut Printer,
    orders: &[pb::Order],
    next_page_token: &str,
) -> Result<()> {
    if orders.is_empty() {
        printer.line("no orders")?;
    } else {
        printer.line(&output::orders_table(orders))?;
    }
    if !next_page_token.is_empty() {
        printer.line(&format!("\nnext page token: {next_page_token}"))?;
    }
    Ok(())
}

/// Prints every update until the terminal one. A stream that ends before it is an error:
/// the caller asked to learn the outcome and did not.
async fn watch(
    api: &mut Api,
    printer: &mut Printer,
    order_id: String,
    resume_after: Option<u64>,
) -> Result<()> {
    let mut updates = api.watch_order(order_id.clone(), resume_after).await?;
    while let Some(update) = updates.message().await? {
        printer.print(
            || output::update_json(&update),
            || output::update_text(&update),
        )?;
        if update.terminal {
            return Ok(());
        }
    }
    bail!("the server ended the watch of order {order_id} before it reached a terminal status")
}
