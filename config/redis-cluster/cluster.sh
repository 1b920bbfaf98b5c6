#!/usr/bin/env bash
# A local Redis Cluster for development and tests: 6 redis-server processes on
# 127.0.0.1 (3 masters, 3 replicas), nothing persisted.
#
#   cluster.sh start  [BASE_PORT] [DIR]   start (or reuse) ports BASE..BASE+5, default 7000
#   cluster.sh stop   [BASE_PORT] [DIR]   SHUTDOWN NOSAVE every node and remove DIR
#   cluster.sh status [BASE_PORT]         print each node's role and cluster_state
#
# DIR defaults to /tmp/presence-redis-cluster-BASE. cluster-node-timeout is 2000 ms so
# that a killed master is replaced within a few seconds (tests rely on it), and a
# replica always stands for election (cluster-replica-validity-factor 0). "start"
# returns once every node says cluster_state:ok and every replica has synced. With
# REDIS_PASSWORD set, every node requires it (requirepass, and masterauth for the
# replicas) and this script authenticates with it.
set -euo pipefail

cmd=${1:-}
base=${2:-7000}
dir=${3:-/tmp/presence-redis-cluster-$base}
host=127.0.0.1
ports=()
for i in 0 1 2 3 4 5; do ports+=("$((base + i))"); done

need() {
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
        echo "redis-server/redis-cli not found: install them with 'apt-get install redis-server'" >&2
        exit 1
    fi
}

rcli() { redis-cli ${REDIS_PASSWORD:+-a "$REDIS_PASSWORD" --no-auth-warning} "$@"; }

cli() { rcli -h "$host" -p "$1" "${@:2}" 2>/dev/null; }

alive() { [ "$(rcli -h "$host" -p "$1" ping 2>/dev/null)" = "PONG" ]; }

state_ok() { rcli -h "$host" -p "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; }

known_nodes() {
    rcli -h "$host" -p "$1" cluster info 2>/dev/null \
        | sed -n 's/^cluster_known_nodes:\([0-9]*\).*/\1/p'
}

# A replica must have synced once, or it refuses to fail over (no data age).
link_ok() {
    local info
    info=$(rcli -h "$host" -p "$1" info replication 2>/dev/null | tr -d '\r')
    grep -q '^role:master' <<<"$info" || grep -q '^master_link_status:up' <<<"$info"
}

all_ok() {
    for p in "${ports[@]}"; do
        state_ok "$p" || return 1
        [ "$(known_nodes "$p")" = "6" ] || return 1
        link_ok "$p" || return 1
    done
}

start_node() {
    local p=$1
    mkdir -p "$dir/$p"
    redis-server --port "$p" --bind "$host" --daemonize yes \
        --cluster-enabled yes --cluster-config-file "$dir/$p/nodes.conf" \
        --cluster-node-timeout 2000 --cluster-replica-validity-factor 0 \
        --appendonly no --save "" \
        ${REDIS_PASSWORD:+--requirepass "$REDIS_PASSWORD" --masterauth "$REDIS_PASSWORD"} \
        --dir "$dir/$p" --logfile "$dir/$p/redis.log" --pidfile "$dir/$p/redis.pid"
}

start() {
    need
    if all_ok; then
        echo "cluster on $host:${ports[0]}..${ports[5]} already running and healthy"
        exit 0
    fi
    local fresh=1
    for p in "${ports[@]}"; do
        if alive "$p"; then
            fresh=0
        elif [ -s "$dir/$p/nodes.conf" ]; then
            fresh=0
            start_node "$p"
        else
            start_node "$p"
        fi
    done
    for p in "${ports[@]}"; do
        for _ in $(seq 1 100); do alive "$p" && break; sleep 0.05; done
        alive "$p" || { echo "redis-server on port $p did not start (see $dir/$p/redis.log)" >&2; exit 1; }
    done
    if [ "$fresh" = 1 ] || [ "$(known_nodes "${ports[0]}")" = "1" ]; then
        local addrs=()
        for p in "${ports[@]}"; do addrs+=("$host:$p"); done
        rcli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
    fi
    for _ in $(seq 1 300); do
        if all_ok; then
            echo "cluster on $host:${ports[0]}..${ports[5]} is ok"
            exit 0
        fi
        sleep 0.1
    done
    echo "cluster did not reach cluster_state:ok within 30 s" >&2
    status || true
    exit 1
}

stop() {
    for p in "${ports[@]}"; do
        if alive "$p"; then
            rcli -h "$host" -p "$p" shutdown nosave >/dev/null 2>&1 || true
        fi
    done
    for p in "${ports[@]}"; do
        for _ in $(seq 1 100); do alive "$p" || break; sleep 0.05; done
    done
    case "$dir" in
        /tmp/presence-redis-cluster-*) rm -rf "$dir" ;;
        *) echo "leaving $dir in place (not under /tmp/presence-redis-cluster-*)" ;;
    esac
    echo "cluster on $host:${ports[0]}..${ports[5]} stopped"
}

status() {
    local rc=0
    for p in "${ports[@]}"; do
        if alive "$p"; then
            role=$(cli "$p" role | head -1)
            st=$(rcli -h "$host" -p "$p" cluster info 2>/dev/null | sed -n 's/^cluster_state:\(.*\)\r*$/\1/p' | tr -d '\r')
            echo "$host:$p $role cluster_state:$st"
        else
            echo "$host:$p down"
            rc=1
        fi
    done
    return $rc
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status [BASE_PORT] [DIR]" >&2; exit 2 ;;
esac
