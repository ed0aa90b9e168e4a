#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, loopback only, for trying orderflow's
# fail-over (quorum queues replicated on all three nodes).
#
#   scripts/rabbitmq-cluster.sh start          start the nodes and cluster them
#   scripts/rabbitmq-cluster.sh stop           stop every node (data is kept)
#   scripts/rabbitmq-cluster.sh delete         stop and delete the data
#   scripts/rabbitmq-cluster.sh status         cluster status, as node 1 sees it
#   scripts/rabbitmq-cluster.sh stop-node N    stop node N (1-3), e.g. to watch a fail-over
#   scripts/rabbitmq-cluster.sh start-node N   start node N again; it rejoins by itself
#   scripts/rabbitmq-cluster.sh url            the AMQP URL list to give orderflow
#   scripts/rabbitmq-cluster.sh ctl N ARGS...  rabbitmqctl against node N
#
# Node N is `${CLUSTER_NAME}-N@localhost`, AMQP on 127.0.0.1:$((CLUSTER_PORT + N - 1)),
# management UI on 127.0.0.1:$((CLUSTER_PORT + 10000 + N - 1)), Erlang distribution on
# $((CLUSTER_PORT + 20000 + N - 1)); data and logs in $CLUSTER_DIR/node-N. The nodes share an
# Erlang cookie kept in $CLUSTER_DIR. Environment:
#   CLUSTER_NAME  node name prefix              (default orderflow)
#   CLUSTER_PORT  AMQP port of node 1           (default 5701)
#   CLUSTER_DIR   where data, logs, cookie go   (default ./.rabbitmq-cluster)
# It uses the RabbitMQ installed on this machine (rabbitmq-server on PATH or in
# /usr/lib/rabbitmq/bin) and leaves any RabbitMQ already running on 5672 alone.
set -euo pipefail

NAME=${CLUSTER_NAME:-orderflow}
PORT=${CLUSTER_PORT:-5701}
DIR=${CLUSTER_DIR:-$PWD/.rabbitmq-cluster}
NODES=(1 2 3)

bin() {
    local tool=$1
    if [ -x "/usr/lib/rabbitmq/bin/$tool" ]; then
        echo "/usr/lib/rabbitmq/bin/$tool"
    elif command -v "$tool" >/dev/null; then
        command -v "$tool"
    else
        echo "$tool not found: install RabbitMQ (Debian: apt-get install rabbitmq-server)" >&2
        exit 69
    fi
}

node_name() { echo "$NAME-$1@localhost"; }

# The environment a node (and any CLI call to it) runs with.
node_env() {
    local n=$1 home="$DIR/node-$1"
    export HOME="$DIR" # the shared .erlang.cookie
    export RABBITMQ_NODENAME
    RABBITMQ_NODENAME=$(node_name "$n")
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT=$((PORT + n - 1))
    export RABBITMQ_DIST_PORT=$((PORT + 20000 + n - 1))
    export RABBITMQ_MNESIA_BASE="$home/mnesia"
    export RABBITMQ_LOG_BASE="$home/log"
    export RABBITMQ_PID_FILE="$home/rabbit.pid"
    export RABBITMQ_CONFIG_FILE="$home/rabbitmq.conf"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$home/enabled_plugins"
    # Not the machine's rabbitmq-env.conf: it names the machine's own node.
    export RABBITMQ_CONF_ENV_FILE="$home/rabbitmq-env.conf"
    export ERL_EPMD_ADDRESS=127.0.0.1
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

ctl() {
    local n=$1
    shift
    (node_env "$n" && "$(bin rabbitmqctl)" -n "$(node_name "$n")" "$@")
}

prepare() {
    local n=$1 home="$DIR/node-$1"
    mkdir -p "$home/mnesia" "$home/log"
    if [ ! -f "$DIR/.erlang.cookie" ]; then
        head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/.erlang.cookie"
        chmod 400 "$DIR/.erlang.cookie"
    fi
    cat >"$home/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$((PORT + n - 1))
management.tcp.ip = 127.0.0.1
management.tcp.port = $((PORT + 10000 + n - 1))
loopback_users = none
EOF
    echo "[rabbitmq_management]." >"$home/enabled_plugins"
    : >"$home/rabbitmq-env.conf"
}

start_node() {
    local n=$1
    prepare "$n"
    if ctl "$n" status >/dev/null 2>&1; then
        echo "$(node_name "$n") already running"
        return
    fi
    (node_env "$n" && "$(bin rabbitmq-server)" -detached)
    # await_startup needs a node that already answers; a detached node takes a moment.
    local tries=0
    until ctl "$n" ping >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ "$tries" -gt 120 ]; then
            echo "$(node_name "$n") did not come up; see $DIR/node-$n/log" >&2
            exit 1
        fi
        sleep 0.5
    done
    await_boot "$n"
    echo "$(node_name "$n") up on 127.0.0.1:$((PORT + n - 1))"
}

# await_startup answers rabbit_is_not_running when asked before the boot has begun, so it is
# asked again while the node is alive; a node whose boot failed exits, and its log says why.
await_boot() {
    local n=$1 deadline=$((SECONDS + 120))
    until ctl "$n" await_startup --timeout 120 >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ] || ! ctl "$n" ping >/dev/null 2>&1; then
            echo "$(node_name "$n") did not start; errors in its log:" >&2
            grep -h -E "\[(error|critical)\]|eaddrinuse" "$DIR/node-$n/log/"*.log 2>/dev/null |
                tail -n 20 >&2 || true
            exit 1
        fi
        sleep 1
    done
}

stop_node() {
    local n=$1
    if ctl "$n" status >/dev/null 2>&1; then
        ctl "$n" stop >/dev/null
        echo "$(node_name "$n") stopped"
    fi
}

# Runs a command, showing its output only if it fails (join_cluster logs benign errors).
quiet() {
    local out
    if ! out=$("$@" 2>&1); then
        echo "$out" >&2
        return 1
    fi
}

join() {
    local n=$1 first
    first=$(node_name 1)
    if ctl "$n" cluster_status --formatter json 2>/dev/null | grep -q "\"$first\""; then
        return # already a member (a restart keeps membership)
    fi
    quiet ctl "$n" stop_app
    quiet ctl "$n" reset
    quiet ctl "$n" join_cluster "$first"
    quiet ctl "$n" start_app
    await_boot "$n"
    echo "$(node_name "$n") joined $first"
}

url() {
    local urls=()
    for n in "${NODES[@]}"; do
        urls+=("amqp://guest:guest@127.0.0.1:$((PORT + n - 1))/%2f")
    done
    (IFS=,; echo "${urls[*]}")
}

check_node() {
    case "${1:-}" in
    1 | 2 | 3) ;;
    *)
        echo "node must be 1, 2 or 3" >&2
        exit 64
        ;;
    esac
}

mkdir -p "$DIR"
case "${1:-}" in
start)
    for n in "${NODES[@]}"; do start_node "$n"; done
    for n in 2 3; do join "$n"; done
    echo "cluster up; orderflow: AMQP_URL=$(url)"
    ;;
stop)
    for n in 3 2 1; do stop_node "$n"; done
    ;;
delete)
    for n in 3 2 1; do stop_node "$n"; done
    rm -rf "$DIR"
    ;;
status)
    ctl 1 cluster_status
    ;;
stop-node)
    check_node "${2:-}"
    stop_node "$2"
    ;;
start-node)
    check_node "${2:-}"
    start_node "$2"
    ;;
url)
    url
    ;;
ctl)
    check_node "${2:-}"
    n=$2
    shift 2
    ctl "$n" "$@"
    ;;
*)
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
    exit 64
    ;;
esac
