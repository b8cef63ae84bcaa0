#!/usr/bin/env bash
# shardmq against FlashMQ, interleaved (shardmq, FlashMQ, shardmq, ...),
# so that a drift of the machine's speed hits both alike: broker CPU µs per
# delivered message on the closed-loop rows of the performance issue, MQTT
# 3.1.1, 64-byte payloads, shardmq with 2 shards (its default kill_safe log
# on a fresh data directory each run), FlashMQ with 2 threads, and the floor
# (shardmq-floor: a relay on shardmq's runtime doing only what the load
# generator needs, loadtest/src/bin/floor.rs) in the same rounds. Prints
# each round and the median ratios shardmq / FlashMQ (the issue's target:
# at most 0.7) and shardmq / floor per row.
#
#   FLASHMQ=/path/to/flashmq loadtest/head-to-head.sh [SHARDMQ] [ROUNDS]
#
# FlashMQ has no Debian package: build it from its source
# (github.com/halfgaar/FlashMQ, tag v1.26.2) with g++, cmake and libssl-dev:
#   cmake -S FlashMQ -B build -DCMAKE_BUILD_TYPE=Release && make -C build -j2
# Without FLASHMQ (or if it is not executable) the script says so and stops.
# Each bench run is bounded (--duration, --drain, timeout 60); about 30 s
# per row and round.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh
SHARDMQ=${1:-target/release/shardmq}
ROUNDS=${2:-3}
BENCH=${BENCH:-target/release/shardmq-bench}
FLOOR=${FLOOR:-target/release/shardmq-floor}
PORT=${PORT:-28990}
if [ -z "${FLASHMQ:-}" ] || [ ! -x "$FLASHMQ" ]; then
  echo "FlashMQ not run: set FLASHMQ to its binary (see the header of $0 for how to build it)" >&2
  exit 1
fi
results_dir shardmq-head-to-head
COMMON="-V 4 -s 64 --warmup 1 --duration 6 --drain 2 --quiet"
ROWS=(
  "qos0-20|bench --mode pairs --pubs 100 --subs 100 -q 0 --closed-loop 20 $COMMON"
  "qos0-100|bench --mode pairs --pubs 100 --subs 100 -q 0 --closed-loop 100 $COMMON"
  "qos0-200|bench --mode pairs --pubs 100 --subs 100 -q 0 --closed-loop 200 $COMMON"
  "qos1|bench --mode pairs --pubs 100 --subs 100 -q 1 --closed-loop 200 --inflight 32 $COMMON"
  "qos2|bench --mode pairs --pubs 50 --subs 50 -q 2 --closed-loop 200 --inflight 32 $COMMON"
  "fanout|bench --mode fanout --subs 100 -q 0 --closed-loop 200 $COMMON"
  "fanin|bench --mode fanin --pubs 100 -q 0 --closed-loop 8 $COMMON"
)
[ -x "$BENCH" ] && [ -x "$FLOOR" ] || cargo build --release -p shardmq-bench
[ -x "$SHARDMQ" ] || cargo build --release --bin shardmq

flashmq_conf "$WORK" "$PORT"

for round in $(seq "$ROUNDS"); do
  for row in "${ROWS[@]}"; do
    name=${row%%|*}
    args=${row#*|}
    for who in shardmq flashmq floor; do
      rm -rf "$WORK/data" "$WORK/flashmq-storage"
      mkdir -p "$WORK/flashmq-storage"
      if [ "$who" = shardmq ]; then
        "$SHARDMQ" --listen "127.0.0.1:$PORT" --http 127.0.0.1:0 --shards 2 --data-dir "$WORK/data" \
          >"$WORK/broker.log" 2>&1 &
      elif [ "$who" = flashmq ]; then
        "$FLASHMQ" --config-file "$WORK/flashmq.conf" >"$WORK/broker.log" 2>&1 &
      else
        "$FLOOR" --listen "127.0.0.1:$PORT" >"$WORK/broker.log" 2>&1 &
      fi
      pid=$!
      wait_port "$PORT"
      sleep 0.5
      bench_then_stop "$WORK/$name-$who-$round.json" "$args -h 127.0.0.1 -p $PORT" "$pid"
    done
    s_json=$WORK/$name-shardmq-$round.json
    f_json=$WORK/$name-flashmq-$round.json
    r_json=$WORK/$name-floor-$round.json
    s=$(json_value "$s_json" broker_cpu_us_per_msg)
    f=$(json_value "$f_json" broker_cpu_us_per_msg)
    r=$(json_value "$r_json" broker_cpu_us_per_msg)
    # A run that measured nothing (no JSON, no CPU figure) gives "nan".
    ratio=$(awk -v s="$s" -v f="$f" 'BEGIN { if (f + 0 > 0) printf "%.3f", s / f; else print "nan" }')
    above=$(awk -v s="$s" -v r="$r" 'BEGIN { if (r + 0 > 0) printf "%.3f", s / r; else print "nan" }')
    echo "round $round $name: shardmq $s µs/msg (lost $(json_value "$s_json" lost)), FlashMQ $f µs/msg (lost $(json_value "$f_json" lost)), floor $r µs/msg (lost $(json_value "$r_json" lost)), shardmq/FlashMQ $ratio, shardmq/floor $above"
    echo "$name $ratio" >>"$WORK/ratios"
    echo "$name $above" >>"$WORK/ratios-floor"
  done
done
medians shardmq/FlashMQ
medians shardmq/floor "$WORK/ratios-floor"
