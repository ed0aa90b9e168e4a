# syntax=docker/dockerfile:1
#
# One image for every orderflow process: `orderflow-server` (Order, Inventory and Payment
# services; pick them with ORDERFLOW_SERVICES) and the `orderflow` CLI, which also serves as
# the health probe. The workshop (lab/: orderflow-bench, orderflow-chaos) is not built into
# it. Build with BuildKit (the default in current Docker):
#
#   docker build -t orderflow:local .
#
# The build needs no protoc (protox compiles the protos in build.rs); SQLite and ring are
# compiled from C with the rust image's gcc.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
# The cargo registry, git checkouts and target dir are BuildKit cache mounts, so a rebuild
# only recompiles what changed. A cache mount is not part of the image, hence the binaries
# are copied out of target/ in the same step.
RUN --mount=type=cache,id=orderflow-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=orderflow-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=orderflow-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p orderflow-server -p orderflow-client \
 && mkdir -p /out \
 && cp target/release/orderflow-server target/release/orderflow /out/

FROM debian:bookworm-slim AS runtime
# ca-certificates: for TLS connections (amqps://, an https OTLP collector).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# An unprivileged user owns /data, so a fresh named volume mounted there inherits that owner.
RUN groupadd --system --gid 10001 orderflow \
 && useradd --system --uid 10001 --gid orderflow --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin orderflow \
 && mkdir /data \
 && chown orderflow:orderflow /data
COPY --from=builder /out/orderflow-server /out/orderflow /usr/local/bin/

# SQLite files (order.db, inventory.db, payment.db) live on the volume; gRPC must listen on
# every interface to be reachable from outside the container.
ENV ORDERFLOW_DATA_DIR=/data \
    ORDERFLOW_GRPC_ADDR=0.0.0.0:50051
VOLUME /data
WORKDIR /data
USER orderflow:orderflow

# 50051: gRPC (health and reflection on every process, OrderService on the order service).
# 9464: Prometheus metrics, when ORDERFLOW_METRICS_ADDR=0.0.0.0:9464.
EXPOSE 50051 9464

# grpc.health.v1 Check against this process: exits 0 only while it reports SERVING, which it
# does only while connected to RabbitMQ.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["orderflow", "health", "--addr", "127.0.0.1:50051"]

# The server handles SIGTERM (docker stop) as a graceful shutdown of ORDERFLOW_SHUTDOWN_GRACE.
ENTRYPOINT ["orderflow-server"]
