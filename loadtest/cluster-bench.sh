#!/usr/bin/env bash
# Broker CPU per delivered message across two cluster nodes against one
# node, interleaved (single, cluster, single, cluster, ...) so that a drift
# of the machine's speed hits both alike. Single: one broker of 2 shards,
# publishers and subscribers on it. Cluster: nodes a and b (NODE_SHARDS
# each), publishers on a, subscribers on b, the CPU time of both nodes
# counted. 100 pairs, closed loop, MQTT 3.1.1, 64-byte payloads, the default
# (kill_safe) log on a fresh data directory each run. Prints each round and
# the median ratio cluster / single (the cluster issue's bound: 1.5).
#
#   [NODE_SHARDS=1] [CLUSTER_CONFIG=FILE] loadtest/cluster-bench.sh [SHARDMQ] [ROUNDS]
#
# CLUSTER_CONFIG: a TOML file given to both cluster nodes (--config), e.g.
# "[cluster]\nreplicas = 1" to measure without the standbys' log copies.
#
# NODE_SHARDS (default 2) sets the shards of each cluster node: with 1,
# the two nodes run as many shard threads as the single broker (on a
# 2-core machine, 4 busy threads compete for 2 cores).
#
# Each bench run is bounded (--duration, --drain, timeout 60); the script
# takes about 25 s per row and round.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh
BIN=${1:-target/release/shardmq}
ROUNDS=${2:-4}
BENCH=${BENCH:-target/release/shardmq-bench}
PORT=${PORT:-28990}
CPORT=${CPORT:-28950}
NODE_SHARDS=${NODE_SHARDS:-2}
results_dir shardmq-cluster-bench
COMMON="-V 4 -s 64 --warmup 1 --duration 6 --drain 2 --quiet"
ROWS=(
  "qos0|bench --mode pairs --pubs 100 --subs 100 -q 0 --closed-loop 200 $COMMON"
  "qos1|bench --mode pairs --pubs 100 --subs 100 -q 1 --closed-loop 200 --inflight 64 $COMMON"
  "fanout|bench --mode fanout --subs 100 -q 0 --closed-loop 200 $COMMON"
)
[ -x "$BENCH" ] || cargo build --release -p shardmq-bench
[ -x "$BIN" ] || cargo build --release --bin shardmq

# Brokers started, stopped when the script exits however it exits (a
# failed wait would otherwise leave them holding the ports).
STARTED=()
on_exit() { kill -KILL "${STARTED[@]}" 2>/dev/null || true; }

# start NAME CLIENT_PORT SHARDS [NODE_ARGS...]: a broker in the background;
# its pid in $pid.
start() {
  local name=$1 port=$2 shards=$3
  shift 3
  rm -rf "$WORK/$name"
  "$BIN" --listen "127.0.0.1:$port" --http 127.0.0.1:0 --shards "$shards" \
    --data-dir "$WORK/$name" "$@" >"$WORK/$name.log" 2>&1 &
  pid=$!
  STARTED+=("$pid")
  wait_port "$port"
}

# wait_for NODE TEXT [TENTHS]: until NODE's log holds TEXT (30 s at most).
wait_for() {
  for _ in $(seq "${3:-300}"); do grep -q "$2" "$WORK/$1.log" && return 0; sleep 0.1; done
  echo "no '$2' in $WORK/$1.log" >&2
  return 1
}

# serving NODE SHARD: until NODE's SHARD takes CONNECTs (it refuses them
# until it has its peers' routes); a binary older than that log line
# (compared by this script) gets the 5 s after which it serves anyway.
serving() {
  wait_for "$1" "shard $2: the routes of every node up are here" 100 || sleep 5
}

for round in $(seq "$ROUNDS"); do
  for row in "${ROWS[@]}"; do
    name=${row%%|*}
    args=${row#*|}
    # Single node.
    start single "$PORT" 2
    single=$pid
    bench_then_stop "$WORK/$name-single-$round.json" "$args -h 127.0.0.1 -p $PORT" "$single"
    # Two nodes: publishers on a, subscribers on b.
    start a "$PORT" "$NODE_SHARDS" --node-id a --cluster-listen "127.0.0.1:$CPORT" \
      ${CLUSTER_CONFIG:+--config "$CLUSTER_CONFIG"}
    a=$pid
    start b "$((PORT + 1))" "$NODE_SHARDS" --node-id b --cluster-listen "127.0.0.1:$((CPORT + 10))" \
      --join "127.0.0.1:$CPORT" ${CLUSTER_CONFIG:+--config "$CLUSTER_CONFIG"}
    b=$pid
    # Links up, and every shard of both taking CONNECTs (a node refuses
    # them until it has its peer's routes).
    for shard in $(seq 0 $((NODE_SHARDS - 1))); do
      wait_for a "shard $shard: link to node \"b\" (its shard $shard) is up"
      wait_for b "shard $shard: link to node \"a\" (its shard $shard) is up"
      serving a "$shard"
      serving b "$shard"
    done
    bench_then_stop "$WORK/$name-cluster-$round.json" \
      "$args -h 127.0.0.1 -p $PORT --sub-port $((PORT + 1))" "$a" "$b"
    s_json=$WORK/$name-single-$round.json
    c_json=$WORK/$name-cluster-$round.json
    s=$(json_value "$s_json" broker_cpu_us_per_msg)
    c=$(json_value "$c_json" broker_cpu_us_per_msg)
    ratio=$(awk -v s="$s" -v c="$c" 'BEGIN { printf "%.3f", c / s }')
    echo "round $round $name: single $s µs/msg ($(json_value "$s_json" delivered) delivered)," \
      "cluster $c µs/msg ($(json_value "$c_json" delivered) delivered), cluster/single $ratio"
    echo "$name $ratio" >>"$WORK/ratios"
  done
done
medians cluster/single
