#!/usr/bin/env python3
"""Places an order on orderflow and follows it to a terminal status.

The watch resumes where it left off when the stream drops: it asks for every change after the
last version it printed, so each version is printed exactly once however often the connection
goes away. Needs the code generate.sh writes to generated/ (see the README, "Generated
clients").

Exit status: 0 the order reached a terminal status (whichever), 2 the server refused the
request, 3 the server stayed unreachable, 1 anything else (as the `orderflow` CLI).
"""

import argparse
import os
import pathlib
import sys
import time
import uuid

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "generated"))

try:
    import grpc
    from orderflow.v1 import orders_pb2, orders_pb2_grpc
except ImportError as missing:
    sys.exit(
        f"error: {missing}. Install the dependencies and generate the code first:\n"
        f"  python3 -m pip install -r {HERE / 'requirements.txt'}\n"
        f"  {HERE / 'generate.sh'}"
    )

# Failed attempts in a row before giving up; any update received starts the count again.
MAX_RETRIES = 6
REFUSED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


class GaveUp(Exception):
    """The server stayed unreachable through every retry."""


def backoff(retry):
    """Seconds to wait before retry number `retry` (1-based): 0.2 s doubling, at most 5 s."""
    return min(0.2 * 2 ** (retry - 1), 5.0)


def describe(error):
    return f"{error.code().name}: {error.details()}"


def place(stub, request, metadata):
    # The idempotency key makes a retry after a lost answer return the same order instead of
    # placing a second one.
    retry = 0
    while True:
        try:
            return stub.PlaceOrder(request, metadata=metadata, timeout=10)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            retry += 1
            if retry > MAX_RETRIES:
                raise GaveUp(f"PlaceOrder: {describe(error)}") from error
            print(f"PlaceOrder failed ({describe(error)}); retrying", flush=True)
            time.sleep(backoff(retry))


def watch(stub, order_id, metadata):
    """Prints every update from the first one until a terminal one, which it returns."""
    # 0 replays the whole history, so the first status is printed even if the order has
    # already moved on.
    last_version = 0
    retry = 0
    while True:
        request = orders_pb2.WatchOrderRequest(
            order_id=order_id, resume_after_version=last_version
        )
        try:
            for update in stub.WatchOrder(request, metadata=metadata):
                if update.version <= last_version:
                    continue
                last_version = update.version
                retry = 0
                status = orders_pb2.OrderStatus.Name(update.status)
                reason = f" ({update.reason})" if update.reason else ""
                print(f"version {update.version}: {status}{reason}", flush=True)
                if update.terminal:
                    return update
            why = "the stream ended before a terminal status"
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            why = describe(error)
        retry += 1
        if retry > MAX_RETRIES:
            raise GaveUp(f"WatchOrder: {why}")
        print(f"stream dropped ({why}); resuming after version {last_version}", flush=True)
        time.sleep(backoff(retry))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50051", help="host:port of the server")
    parser.add_argument(
        "--token",
        default=os.environ.get("ORDERFLOW_TOKEN"),
        help="bearer token, sent as `authorization: Bearer <token>` (default: $ORDERFLOW_TOKEN)",
    )
    parser.add_argument("--customer", default="alice")
    parser.add_argument("--sku", default="KB-001")
    parser.add_argument("--quantity", type=int, default=1)
    args = parser.parse_args()

    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    request = orders_pb2.PlaceOrderRequest(
        customer_id=args.customer,
        items=[orders_pb2.OrderItem(sku=args.sku, quantity=args.quantity)],
        idempotency_key=str(uuid.uuid4()),
    )
    with grpc.insecure_channel(args.addr) as channel:
        stub = orders_pb2_grpc.OrderServiceStub(channel)
        try:
            order = place(stub, request, metadata)
            print(
                f"placed order {order.order_id}: {args.quantity} x {args.sku} for {args.customer}",
                flush=True,
            )
            final = watch(stub, order.order_id, metadata)
        except GaveUp as error:
            print(f"error: gave up after {MAX_RETRIES} retries: {error}", file=sys.stderr)
            return 3
        except grpc.RpcError as error:
            print(f"error: {describe(error)}", file=sys.stderr)
            if error.code() in REFUSED:
                return 2
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return 3
            return 1
    status = orders_pb2.OrderStatus.Name(final.status)
    print(f"order {final.order_id} ended {status}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
