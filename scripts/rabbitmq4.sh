#!/usr/bin/env bash
# A RabbitMQ 4.x node on this machine, beside the installed 3.10 broker on 5672, for testing
# orderflow against the broker version production is moving to (deprecated features, quorum
# queue behaviour). Debian 12 only packages 3.10 and there is no Docker, so the node runs from a
# Debian 13 (trixie) root built with debootstrap: RabbitMQ 4.0 with Erlang 27, run with chroot.
#
#   scripts/rabbitmq4.sh [start]     build the root if needed (1-4 minutes), start the node
#   scripts/rabbitmq4.sh stop        stop the node (the root and its data are kept)
#   scripts/rabbitmq4.sh delete      stop and remove the root; do this before deleting the checkout:
#                                    while the node runs, /proc and (read-only) /dev are mounted in it
#   scripts/rabbitmq4.sh status      rabbitmqctl status of the node
#   scripts/rabbitmq4.sh url         the AMQP URL to give orderflow
#   scripts/rabbitmq4.sh log         the node's log file, as a path on this machine
#   scripts/rabbitmq4.sh ctl ARGS... rabbitmqctl ARGS against the node (exit code passed through)
#   scripts/rabbitmq4.sh deprecations [SINCE]  fail if a deprecated feature is in use, or was
#                                    logged as used after SINCE (UTC "YYYY-MM-DD HH:MM:SS")
#   scripts/rabbitmq4.sh diag ARGS.. rabbitmq-diagnostics ARGS likewise; in 4.0.5 its
#                                    check_if_any_deprecated_features_are_used names features in
#                                    use that `ctl list_deprecated_features --used` misses
#
# The node is rmq4@localhost: AMQP on 127.0.0.1:5673 (guest/guest), Erlang distribution on
# 127.0.0.1:25673, registered with the machine's epmd (shared with the 3.10 node, which is never
# touched). Management UI and HTTP API on 127.0.0.1:15673. Needs root (chroot, mount). Environment:
#   RABBITMQ4_ROOT    the trixie root       (default <repo>/.rabbitmq4, git-ignored)
#   RABBITMQ4_MIRROR  Debian mirror to build it from (default: the one apt uses here)
# start, stop and delete take a lock ($RABBITMQ4_ROOT.lock), so concurrent callers wait for each
# other instead of building twice; ctl and diag take none and may run from many processes at once.
set -euo pipefail

SELF=$(realpath "${BASH_SOURCE[0]}")
REPO=$(dirname "$(dirname "$SELF")")
ROOT=$(realpath -m "${RABBITMQ4_ROOT:-$REPO/.rabbitmq4}")
LOCK="$ROOT.lock"
BUILD_LOG="$ROOT.debootstrap.log"
# Written before debootstrap runs: only a directory carrying it is ever rebuilt or deleted.
STAMP="$ROOT/.rabbitmq4-root"
# Written after the build succeeded: without it the root is a half-finished build, redone.
MARKER="$ROOT/.rabbitmq4-built"
NODE=rmq4@localhost
PORT=5673
DIST_PORT=25673
MGMT_PORT=15673
LOG="$ROOT/var/log/rabbitmq/$NODE.log"
START_LOG="$ROOT/var/log/rabbitmq/start-detached.log"
SUITE=trixie

die() {
    echo "rabbitmq4: $*" >&2
    exit 1
}

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (it uses chroot and mount)"
}

# Paths in /proc/mounts escape blanks and backslashes; compare them escaped the same way.
mount_escape() {
    local p=${1//\\/\\134}
    p=${p// /\\040}
    p=${p//$'\t'/\\011}
    printf '%s' "${p//$'\n'/\\012}"
}

is_mounted() {
    awk -v p="$(mount_escape "$1")" '$2 == p { found = 1 } END { exit !found }' /proc/mounts
}

# Every mount strictly below the root, deepest first (debootstrap mounts some of its own, and
# leaves them behind if it is killed).
mounts_below() {
    awk -v p="$(mount_escape "$ROOT")/" 'index($2, p) == 1 { print $2 }' /proc/mounts |
        sort -r | while IFS= read -r m; do printf '%b\n' "$m"; done
}

tcp_up() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

# Inside the root, commands get none of the caller's environment (a RABBITMQ_* or ERL_* variable
# meant for the 3.10 node would leak in) and the root's own cookie in HOME.
CLEAN_ENV=(/usr/bin/env -i -C /var/lib/rabbitmq PATH=/usr/sbin:/usr/bin:/sbin:/bin
    HOME=/var/lib/rabbitmq LANG=C.UTF-8 LC_ALL=C.UTF-8)

# The CLI tools are run directly as the root's rabbitmq user, not through the packaged
# /usr/sbin/rabbitmqctl: that one re-quotes its arguments for `su -c`, which mangles any $, `
# or \ in them (an eval expression with an Erlang character literal, say).
ctl_command() {
    local tool=${1:-rabbitmqctl} ids
    ids=$(awk -F: '$1 == "rabbitmq" { print $3 ":" $4 }' "$ROOT/etc/passwd" 2>/dev/null) || true
    [ -n "$ids" ] || die "no rabbitmq user in $ROOT: run scripts/rabbitmq4.sh delete, then start"
    CTL=(chroot --userspec="$ids" "$ROOT" "${CLEAN_ENV[@]}" "/usr/lib/rabbitmq/bin/$tool"
        -n "$NODE")
}

ctl() {
    ctl_command
    "${CTL[@]}" "$@"
}

# Processes whose root directory is ours: the node, its helpers, and an epmd if the node had
# to start one.
root_pids() {
    local p
    for p in /proc/[0-9]*; do
        if [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOT" ]; then echo "${p#/proc/}"; fi
    done
}

beam_pids() {
    local p
    for p in $(root_pids); do
        case "$(cat "/proc/$p/comm" 2>/dev/null)" in beam* | erl*) echo "$p" ;; esac
    done
}

node_up() {
    [ -f "$MARKER" ] && is_mounted "$ROOT/proc" && tcp_up && ctl status >/dev/null 2>&1
}

lock() {
    mkdir -p "$(dirname "$ROOT")"
    exec 9>"$LOCK"
    if ! flock -n 9; then
        echo "waiting for another scripts/rabbitmq4.sh start/stop/delete ($LOCK)" >&2
        # A cold build takes a few minutes; give it plenty before giving up.
        flock -w 900 9 || die "gave up after 15 minutes waiting for $LOCK"
    fi
}

# The Debian mirror apt uses here for the host's own release (not -security or -updates), so
# a machine behind a proxy mirror builds from the same place.
mirror() {
    if [ -n "${RABBITMQ4_MIRROR:-}" ]; then
        echo "$RABBITMQ4_MIRROR"
        return
    fi
    local codename site
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    site=$(apt-get indextargets --format '$(RELEASE) $(SITE)' 2>/dev/null |
        awk -v c="$codename" '$1 == c && $2 !~ /security/ { print $2; exit }')
    echo "${site:-http://deb.debian.org/debian}"
}

need_debootstrap() {
    command -v debootstrap >/dev/null && return
    local out
    echo "installing debootstrap (apt-get)" >&2
    if ! apt-cache policy debootstrap 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        out=$(apt-get update 2>&1) || {
            echo "$out" | tail -n 15 >&2
            die "apt-get update failed: is the Debian mirror ($(mirror)) reachable?"
        }
    fi
    out=$(DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        -o DPkg::Lock::Timeout=120 debootstrap 2>&1) || {
        echo "$out" | tail -n 15 >&2
        die "apt-get install debootstrap failed (mirror $(mirror) unreachable? try apt-get update)"
    }
}

# Removes the root, which only ever happens with nothing mounted below it: with /dev still
# bound in, rm -rf would delete the machine's device nodes.
remove_root() {
    [ -e "$ROOT" ] || return 0
    case "$ROOT" in
    / | /bin | /boot | /dev | /etc | /home | /lib* | /opt | /proc | /root | /run | /sbin | /srv | \
        /sys | /tmp | /usr | /var | /work | "$REPO")
        die "refusing to remove $ROOT"
        ;;
    esac
    if [ ! -e "$STAMP" ] && [ ! -e "$MARKER" ] && [ -n "$(ls -A "$ROOT")" ]; then
        die "refusing to remove $ROOT: not a root this script built (no $(basename "$STAMP"))"
    fi
    local pids
    pids=$(beam_pids | tr '\n' ' ')
    [ -z "$pids" ] || die "refusing to remove $ROOT: processes still run in it: $pids"
    unmount_all
    local left
    left=$(mounts_below)
    [ -z "$left" ] || die "refusing to remove $ROOT: still mounted below it: $left"
    local d
    for d in dev proc sys dev/pts; do
        if [ -d "$ROOT/$d" ] && [ "$(stat -c %d "$ROOT/$d")" != "$(stat -c %d "$ROOT")" ]; then
            die "refusing to remove $ROOT: $ROOT/$d is on another file system (still mounted?)"
        fi
    done
    # --one-file-system: a mount that slipped past the checks above is skipped, not emptied.
    rm -rf --one-file-system "$ROOT"
}

# A busy mount (a leftover epmd, a ctl call in flight) is detached lazily: it disappears from
# the tree at once, which is all that removing the root needs.
unmount_all() {
    local m
    while IFS= read -r m; do
        [ -n "$m" ] || continue
        umount "$m" 2>/dev/null || umount -l "$m" || die "cannot unmount $m"
    done < <(mounts_below)
}

build() {
    [ -f "$MARKER" ] && return
    if [ -e "$ROOT" ]; then
        echo "$ROOT is an unfinished build; starting it again"
        remove_root
    fi
    need_debootstrap
    local mirror t0=$SECONDS
    mirror=$(mirror)
    mkdir -p "$ROOT"
    : >"$STAMP"
    echo "building a Debian $SUITE root with rabbitmq-server in $ROOT from $mirror"
    echo "(1-4 minutes, depending on the mirror; progress in $BUILD_LOG)"
    if ! debootstrap --variant=minbase --include=rabbitmq-server "$SUITE" "$ROOT" "$mirror" \
        >"$BUILD_LOG" 2>&1 9>&-; then
        echo "debootstrap failed; the end of $BUILD_LOG:" >&2
        tail -n 20 "$BUILD_LOG" >&2
        if [ -f "$ROOT/debootstrap/debootstrap.log" ]; then
            echo "the end of $ROOT/debootstrap/debootstrap.log:" >&2
            tail -n 20 "$ROOT/debootstrap/debootstrap.log" >&2
        fi
        unmount_all
        die "could not build the root. If the mirror ($mirror) is unreachable, set" \
            "RABBITMQ4_MIRROR to one that is; the next start begins the build again"
    fi
    unmount_all # whatever debootstrap left mounted
    # The node generates a cookie on first boot, but rabbitmqctl run before that (or as root
    # with another HOME) would make its own and be refused; one cookie, made now, is shared.
    local cookie="$ROOT/var/lib/rabbitmq/.erlang.cookie"
    if [ ! -s "$cookie" ]; then
        head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$cookie"
        chmod 400 "$cookie"
        chroot "$ROOT" chown rabbitmq:rabbitmq /var/lib/rabbitmq/.erlang.cookie
    fi
    echo "built $(date -u +%FT%TZ) from $mirror in $((SECONDS - t0)) s" >"$MARKER"
    echo "root built in $((SECONDS - t0)) s"
}

# The node's settings live in the root's own config files, so the server and every rabbitmqctl
# inside the root agree on them whatever the caller's environment.
configure() {
    cat >"$ROOT/etc/rabbitmq/rabbitmq-env.conf" <<EOF
# Written by scripts/rabbitmq4.sh; rewritten on every start.
NODENAME=$NODE
NODE_IP_ADDRESS=127.0.0.1
NODE_PORT=$PORT
DIST_PORT=$DIST_PORT
# rabbitmqctl's own distribution ports: away from the 3.10 CLI's 35672-35682 and the local
# cluster's 35701-35713, and wide enough for many concurrent ctl calls.
CTL_DIST_PORT_MIN=35740
CTL_DIST_PORT_MAX=35779
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
    cat >"$ROOT/etc/rabbitmq/rabbitmq.conf" <<EOF
# Written by scripts/rabbitmq4.sh; rewritten on every start.
listeners.tcp.1 = 127.0.0.1:$PORT
# orderflow's --declare-topology verify reads queues and bindings through the management
# API; 15672 belongs to the 3.10 node.
management.tcp.ip = 127.0.0.1
management.tcp.port = $MGMT_PORT
EOF
    echo "[rabbitmq_management]." >"$ROOT/etc/rabbitmq/enabled_plugins"
    cp /etc/hosts "$ROOT/etc/hosts" # localhost must resolve as it does outside
}

mount_root() {
    is_mounted "$ROOT/proc" || mount -t proc -o nosuid,nodev,noexec proc "$ROOT/proc"
    if ! is_mounted "$ROOT/dev"; then
        mount --bind /dev "$ROOT/dev"
        # Read-only: device nodes still read and write, but an rm -rf or git clean -x walking
        # into the root cannot unlink the machine's /dev through it.
        mount -o remount,bind,ro "$ROOT/dev" || {
            umount "$ROOT/dev"
            die "could not make the /dev bind in $ROOT read-only"
        }
    fi
}

# The node takes epmd from the machine when one runs; otherwise it would start its own inside
# the root, where it outlives the node and keeps the root's /dev busy.
host_epmd() {
    (exec 3<>/dev/tcp/127.0.0.1/4369) 2>/dev/null && return
    local epmd
    epmd=$(command -v epmd || ls /usr/lib/erlang/erts-*/bin/epmd 2>/dev/null | tail -n 1) || true
    if [ -n "$epmd" ]; then
        "$epmd" -daemon </dev/null >/dev/null 2>&1 9>&- || true
    fi
}

port_owner() { ss -Hltnp "sport = :$1" 2>/dev/null | head -n 3; }

versions() {
    ctl status 2>/dev/null | grep -E '^(RabbitMQ version|Erlang configuration):' || true
}

# await_startup answers rabbit_is_not_running when asked before the boot has begun, so it is
# asked again while the node is alive; a node whose boot failed exits, and its log says why.
await_boot() {
    local deadline=$((SECONDS + 120))
    until ctl ping >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ] || [ -z "$(beam_pids)" ]; then
            boot_failed "did not come up"
        fi
        sleep 0.5
    done
    until ctl await_startup --timeout $((deadline > SECONDS ? deadline - SECONDS : 1)) \
        >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ] || ! ctl ping >/dev/null 2>&1; then
            boot_failed "did not start"
        fi
        sleep 1
    done
    until tcp_up; do
        [ "$SECONDS" -lt "$deadline" ] || boot_failed "booted but 127.0.0.1:$PORT does not accept"
        sleep 0.5
    done
}

boot_failed() {
    echo "rabbitmq4: $NODE $1 within 120 s" >&2
    if [ -s "$START_LOG" ]; then
        echo "rabbitmq-server -detached said:" >&2
        tail -n 20 "$START_LOG" >&2
    fi
    echo "errors in $LOG:" >&2
    grep -h -E "\[(error|critical)\]|eaddrinuse" "$LOG" 2>/dev/null | tail -n 20 >&2 || true
    exit 1
}

start() {
    need_root
    lock
    if node_up; then
        echo "$NODE already up on 127.0.0.1:$PORT"
        versions
        return
    fi
    local t0=$SECONDS port
    if [ -z "$(beam_pids)" ]; then # checked before a build, which would be wasted
        for port in "$PORT" "$DIST_PORT"; do
            if [ -n "$(port_owner "$port")" ]; then
                port_owner "$port" >&2
                die "port $port is taken by another process (above); $NODE needs it"
            fi
        done
    fi
    build
    configure
    mount_root
    if [ -z "$(beam_pids)" ]; then
        host_epmd
        : >"$START_LOG"
        # Detached, so nothing of ours may stay open in it: not the lock (the next start would
        # wait for ever) and not our stdout (a caller reading it would never see EOF). The
        # packaged wrapper runs it as the rabbitmq user.
        chroot "$ROOT" "${CLEAN_ENV[@]}" rabbitmq-server -detached \
            </dev/null >>"$START_LOG" 2>&1 9>&- || boot_failed "failed to launch"
    elif ctl ping >/dev/null 2>&1 && ! ctl await_startup --timeout 1 >/dev/null 2>&1; then
        # Alive but with the app stopped (stop_app, say): start the app rather than the node.
        ctl start_app >/dev/null 2>&1 || true
    fi
    await_boot
    # Stable flags (quorum queue features among them) are off on a node until enabled.
    local out
    out=$(ctl enable_feature_flag all 2>&1) || {
        echo "$out" >&2
        die "enable_feature_flag all failed"
    }
    echo "$NODE up on 127.0.0.1:$PORT in $((SECONDS - t0)) s; log: $LOG"
    versions
    echo "orderflow: AMQP_URL=$(url)"
}

stop() {
    need_root
    lock
    if [ -f "$MARKER" ] && is_mounted "$ROOT/proc" && ctl ping >/dev/null 2>&1; then
        # A node that goes down on its own meanwhile is just as stopped; the wait below tells.
        ctl stop >/dev/null || true
        echo "$NODE stopped"
    fi
    local deadline=$((SECONDS + 60))
    while [ -n "$(beam_pids)" ]; do
        [ "$SECONDS" -lt "$deadline" ] ||
            die "$NODE still running after 60 s (pids $(beam_pids | tr '\n' ' '))"
        sleep 0.5
    done
    [ ! -e "$ROOT" ] || unmount_all
}

url() { echo "amqp://guest:guest@127.0.0.1:$PORT/%2f"; }

# A CLI tool against the node, from anywhere, as often and as concurrently as wanted.
run_ctl() {
    local tool=$1
    shift
    need_root
    [ -f "$MARKER" ] || die "no RabbitMQ 4 root at $ROOT: run scripts/rabbitmq4.sh start"
    if ! is_mounted "$ROOT/proc" || ! is_mounted "$ROOT/dev"; then
        die "$NODE is not started: run scripts/rabbitmq4.sh start"
    fi
    ctl_command "$tool"
    exec "${CTL[@]}" "$@"
}

# Fails when the node reports a deprecated feature in use, or logged a deprecation warning
# after SINCE ("YYYY-MM-DD HH:MM:SS", UTC; default: the whole log). In 4.0.5
# `list_deprecated_features --used` misses some, so the broker's own check and its log decide.
deprecations() {
    local since=${1:-0000} found=0 used warnings
    used=$(ctl eval 'maps:keys(rabbit_deprecated_features:list(used)).')
    if [ "$used" != "[]" ]; then
        echo "deprecated features in use on $NODE: $used" >&2
        found=1
    fi
    warnings=$(awk -v since="$since" '$0 >= since && tolower($0) ~ /deprecat/' "$LOG" || true)
    if [ -n "$warnings" ]; then
        echo "deprecation warnings in $LOG since $since:" >&2
        echo "$warnings" >&2
        found=1
    fi
    [ "$found" = 0 ] && echo "no deprecated feature used on $NODE (log checked since $since)"
    return "$found"
}

case "${1:-start}" in
start)
    start
    ;;
stop)
    stop
    ;;
delete)
    stop
    remove_root
    rm -f "$BUILD_LOG"
    echo "$ROOT removed"
    ;;
status)
    run_ctl rabbitmqctl status
    ;;
url)
    url
    ;;
log)
    echo "$LOG"
    ;;
ctl)
    shift
    run_ctl rabbitmqctl "$@"
    ;;
diag)
    shift
    run_ctl rabbitmq-diagnostics "$@"
    ;;
deprecations)
    shift
    deprecations "$@"
    ;;
*)
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$SELF"
    exit 64
    ;;
esac
