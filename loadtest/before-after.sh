#!/usr/bin/env bash
# Compare two shardmq binaries on the same machine, interleaved (A B A B ...),
# so that a drift of the machine's speed hits both alike: broker CPU µs per
# delivered message for QoS 0 and QoS 1, 100 pairs, closed loop, MQTT 3.1.1,
# 64-byte payloads, 2 shards, the default (kill_safe) log on a fresh data
# directory each run. Prints each round and the median ratio B / A.
#
#   [ALL_ROWS=1] loadtest/before-after.sh OLD_SHARDMQ NEW_SHARDMQ [ROUNDS]
#
# Build an older commit with, e.g.:
#   git worktree add /tmp/old COMMIT && (cd /tmp/old && \
#     CARGO_TARGET_DIR=/tmp/old-target cargo build --release --bin shardmq)
# Each bench run is bounded (--duration, --drain, timeout 60); the script
# takes about 20 s per row and round.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh
A=${1:?old shardmq binary}
B=${2:?new shardmq binary}
ROUNDS=${3:-4}
BENCH=${BENCH:-target/release/shardmq-bench}
PORT=${PORT:-28990}
results_dir shardmq-before-after
COMMON="-V 4 -s 64 --warmup 1 --duration 6 --drain 2 --quiet"
ROWS=(
  "qos0|bench --mode pairs --pubs 100 --subs 100 -q 0 --closed-loop 200 $COMMON"
  "qos1|bench --mode pairs --pubs 100 --subs 100 -q 1 --closed-loop 200 --inflight 64 $COMMON"
)
# ALL_ROWS=1: the rest of compare.sh's rows too.
if [ "${ALL_ROWS:-0}" = 1 ]; then
  ROWS+=(
    "qos2|bench --mode pairs --pubs 100 --subs 100 -q 2 --closed-loop 200 --inflight 64 $COMMON"
    "fanout|bench --mode fanout --subs 100 -q 0 --closed-loop 200 $COMMON"
    "fanin|bench --mode fanin --pubs 100 -q 0 --closed-loop 8 $COMMON"
    "rate20k|bench --mode pairs --pubs 100 --subs 100 -q 0 --rate 20000 $COMMON"
  )
fi
[ -x "$BENCH" ] || cargo build --release -p shardmq-bench

for round in $(seq "$ROUNDS"); do
  for row in "${ROWS[@]}"; do
    name=${row%%|*}
    args=${row#*|}
    for who in A B; do
      bin=$A
      [ "$who" = B ] && bin=$B
      rm -rf "$WORK/data"
      "$bin" --listen "127.0.0.1:$PORT" --shards 2 --data-dir "$WORK/data" >"$WORK/broker.log" 2>&1 &
      pid=$!
      wait_port "$PORT"
      bench_then_stop "$WORK/$name-$who-$round.json" "$args -h 127.0.0.1 -p $PORT" "$pid"
    done
    a=$(json_value "$WORK/$name-A-$round.json" broker_cpu_us_per_msg)
    b=$(json_value "$WORK/$name-B-$round.json" broker_cpu_us_per_msg)
    ratio=$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f", b / a }')
    echo "round $round $name: A $a µs/msg, B $b µs/msg, B/A $ratio"
    echo "$name $ratio" >>"$WORK/ratios"
  done
done
medians B/A
