#!/usr/bin/env bash
# Compare shardmq with Mosquitto and FlashMQ on this machine, with
# shardmq-bench, beside the floor: shardmq-floor (loadtest/src/bin/floor.rs),
# a relay on shardmq's runtime that does only what the load generator needs
# of a broker, so each closed-loop row has a reference no broker here can
# beat (at low fixed rates and in the fleet rows it is no floor: a
# single-threaded broker can spend less per message there).
#
# Builds shardmq and shardmq-bench (release), installs Mosquitto from the
# distribution's packages if it is missing, then runs the same scenario
# matrix against each broker, one broker at a time on its own 127.0.0.1 port,
# then QoS 1 with persistent sessions in each of shardmq's durability modes
# beside Mosquitto with persistence, and writes
# loadtest/results/compare-DATE.md (also printed).
#
# FlashMQ has no Debian package: FLASHMQ names its binary (built from
# github.com/halfgaar/FlashMQ, tag v1.26.2; see loadtest/head-to-head.sh,
# which also measures the closed-loop rows interleaved, shardmq and FlashMQ
# alternating). Without it FlashMQ is skipped, and the run and the table
# say so.
#
# Everything is bounded: each bench run stops by itself (--duration, --drain,
# connect timeouts) and is wrapped in `timeout`; the whole script takes about
# 15 minutes with the four columns.
#
# Environment knobs (defaults in brackets):
#   DURATION [10]  measured seconds per throughput / latency row
#   WARMUP   [2]   unmeasured seconds before each
#   IDLE     [10000] idle connections for the first row (fresh broker)
#   SKIP_BUILD=1   use the binaries already in target/release
#   BROKERS ["floor shardmq mosquitto flashmq"]
#   FLASHMQ        FlashMQ's binary (unset: FlashMQ is skipped)
#   PORT_SHARDMQ [28883]  PORT_MOSQUITTO [28884]  PORT_FLASHMQ [28885]
#   PORT_FLOOR [28886]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
IDLE=${IDLE:-10000}
BROKERS=${BROKERS:-"floor shardmq mosquitto flashmq"}
PORT_SHARDMQ=${PORT_SHARDMQ:-28883}
PORT_MOSQUITTO=${PORT_MOSQUITTO:-28884}
PORT_FLASHMQ=${PORT_FLASHMQ:-28885}
PORT_FLOOR=${PORT_FLOOR:-28886}
BENCH="$ROOT/target/release/shardmq-bench"
SHARDMQ="$ROOT/target/release/shardmq"
FLOOR="$ROOT/target/release/shardmq-floor"
STAMP=$(date -u +%Y%m%d-%H%M%S)
results_dir shardmq-compare
OUT_DIR="$ROOT/loadtest/results"
OUT="$OUT_DIR/compare-$STAMP.md"
mkdir -p "$OUT_DIR"

log() { echo "== $*" >&2; }

# ---- build -------------------------------------------------------------------
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building shardmq, shardmq-bench and shardmq-floor (release)"
  CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2} cargo build --release -p shardmq -p shardmq-bench
fi

# ---- mosquitto ---------------------------------------------------------------
MOSQUITTO_NOTE=""
if [[ " $BROKERS " == *" mosquitto "* ]]; then
  if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    log "installing mosquitto"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; }; then
      MOSQUITTO_NOTE="Mosquitto could not be installed: only the shardmq column is filled."
      BROKERS=${BROKERS// mosquitto/}
      BROKERS=${BROKERS//mosquitto/}
    fi
  fi
fi
MOSQUITTO_BIN=$(command -v mosquitto || echo /usr/sbin/mosquitto)

# ---- floor -------------------------------------------------------------------
FLOOR_NOTE=""
if [[ " $BROKERS " == *" floor "* ]] && [ ! -x "$FLOOR" ]; then
  FLOOR_NOTE="floor not run: $FLOOR is missing (build shardmq-bench, or run without SKIP_BUILD)."
  log "$FLOOR_NOTE"
  BROKERS=$(echo " $BROKERS " | sed 's/ floor / /; s/^ *//; s/ *$//')
fi

# ---- flashmq -----------------------------------------------------------------
FLASHMQ_NOTE=""
if [[ " $BROKERS " == *" flashmq "* ]] && { [ -z "${FLASHMQ:-}" ] || [ ! -x "$FLASHMQ" ]; }; then
  FLASHMQ_NOTE="FlashMQ not run: set FLASHMQ to its binary (see loadtest/head-to-head.sh for how to build it)."
  log "$FLASHMQ_NOTE"
  BROKERS=$(echo " $BROKERS " | sed 's/ flashmq / /; s/^ *//; s/ *$//')
fi

label() { # broker: its name in the tables
  case "$1" in
    mosquitto) echo Mosquitto ;;
    flashmq) echo FlashMQ ;;
    floor) echo "floor (relay)" ;;
    *) echo "$1" ;;
  esac
}

# Each broker (and the bench) may open up to the hard limit of files.
ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)

# ---- broker lifecycle --------------------------------------------------------
BROKER_PID=""
stop_broker() {
  if [ -n "$BROKER_PID" ] && kill -0 "$BROKER_PID" 2>/dev/null; then
    kill -TERM "$BROKER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
  fi
  BROKER_PID=""
}
on_exit() { stop_broker; }

start_broker() { # name [shardmq durability | mosquitto persistence true/false]
  case "$1" in
    shardmq)
      PORT=$PORT_SHARDMQ
      rm -rf "$WORK/shardmq-data"
      BROKER_CMD="$SHARDMQ --listen 127.0.0.1:$PORT --shards 2 --durability ${2:-kill_safe} --data-dir $WORK/shardmq-data"
      ;;
    mosquitto)
      PORT=$PORT_MOSQUITTO
      rm -rf "$WORK/mosquitto-data" && mkdir -p "$WORK/mosquitto-data"
      cat >"$WORK/mosquitto.conf" <<EOF
# Generated by loadtest/compare.sh: limits comparable to shardmq's defaults
# (mqtt.inflight_max = 128, mqtt.queue_messages_max = 100000).
listener $PORT 127.0.0.1
allow_anonymous true
persistence ${2:-false}
persistence_location $WORK/mosquitto-data/
max_inflight_messages 128
max_queued_messages 100000
max_connections -1
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
EOF
      BROKER_CMD="$MOSQUITTO_BIN -c $WORK/mosquitto.conf"
      ;;
    flashmq)
      PORT=$PORT_FLASHMQ
      flashmq_conf "$WORK" "$PORT"
      BROKER_CMD="$FLASHMQ --config-file $WORK/flashmq.conf"
      ;;
    floor)
      PORT=$PORT_FLOOR
      BROKER_CMD="$FLOOR --listen 127.0.0.1:$PORT"
      ;;
  esac
  log "starting $1: $BROKER_CMD"
  # shellcheck disable=SC2086
  $BROKER_CMD >"$WORK/$1.log" 2>&1 &
  BROKER_PID=$!
  if ! wait_port "$PORT"; then
    cat "$WORK/$1.log" >&2
    echo "$1 did not start" >&2
    exit 1
  fi
  sleep 0.5
}

# ---- scenarios ---------------------------------------------------------------
# name | bench arguments (host, port, pid, json added per broker)
COMMON="-V 4 -s 64 --warmup $WARMUP --duration $DURATION --drain 2 --quiet"
# The fleet rows: every publisher has sent once (5 s) before the window.
FLEET="-V 4 -s 64 --warmup 5 --duration $DURATION --drain 3 --max-connecting 200 --connect-timeout 30 --quiet"
SCENARIOS=(
  # First, on the fresh broker: its memory per idle connection.
  "$IDLE idle connections|conn -c $IDLE -i 0 --max-connecting 200 -V 4 -k 300 --duration 20 --quiet"
  "QoS 0 pairs 100, closed loop|bench --mode pairs --pubs 100 --subs 100 -q 0 --closed-loop 200 $COMMON"
  "QoS 1 pairs 100, closed loop|bench --mode pairs --pubs 100 --subs 100 -q 1 --closed-loop 200 --inflight 64 $COMMON"
  "QoS 2 pairs 100, closed loop|bench --mode pairs --pubs 100 --subs 100 -q 2 --closed-loop 200 --inflight 64 $COMMON"
  "fan-out 1 -> 100, QoS 0|bench --mode fanout --subs 100 -q 0 --closed-loop 200 $COMMON"
  "fan-in 100 -> 1, QoS 0|bench --mode fanin --pubs 100 -q 0 --closed-loop 8 $COMMON"
  "fixed 2k msg/s, 100 pairs, QoS 0|bench --mode pairs --pubs 100 --subs 100 -q 0 --rate 2000 $COMMON"
  "fixed 20k msg/s, 100 pairs, QoS 0|bench --mode pairs --pubs 100 --subs 100 -q 0 --rate 20000 $COMMON"
  "fixed 100k msg/s, 100 pairs, QoS 0|bench --mode pairs --pubs 100 --subs 100 -q 0 --rate 100000 $COMMON"
  "fleet: 10,000 publishers, 1 msg / 5 s each, to 10 \$share subscribers, QoS 0|bench --mode shared --pubs 10000 --subs 10 -q 0 --rate 2000 $FLEET"
  "fleet: the same at QoS 1|bench --mode shared --pubs 10000 --subs 10 -q 1 --rate 2000 $FLEET"
)

jget() { # file key: a top-level value from a shardmq-bench JSON summary
  sed -n "s/^  \"$2\": \(.*\),\{0,1\}$/\1/p" "$1" | head -1 | sed 's/,$//; s/^"//; s/"$//'
}
fmt_num() { # number [decimals]: '-' for empty / null
  if [ -z "$1" ] || [ "$1" = null ]; then echo "-"; else printf "%.${2:-0}f" "$1"; fi
}

run_row() { # broker label args: one bench run into $WORK/label.json
  local broker=$1 label=$2 args=$3
  if ! kill -0 "$BROKER_PID" 2>/dev/null; then
    echo "$broker is not running any more" >&2
    return
  fi
  # shellcheck disable=SC2086
  timeout 120 "$BENCH" $args -h 127.0.0.1 -p "$PORT" --broker-pid "$BROKER_PID" --json "$WORK/$label.json" \
    >"$WORK/$label.out" 2>&1 || echo "(exit $?)" >>"$WORK/$label.out"
  grep -E "^(delivered|latency|lost|broker|connect|errors)" "$WORK/$label.out" >&2 || tail -5 "$WORK/$label.out" >&2
  sleep 1
}

COMMANDS=()
for broker in $BROKERS; do
  start_broker "$broker"
  for i in "${!SCENARIOS[@]}"; do
    name=${SCENARIOS[$i]%%|*}
    args=${SCENARIOS[$i]#*|}
    cmd="shardmq-bench $args -h 127.0.0.1 -p $PORT --broker-pid \$BROKER_PID --json FILE"
    [ "$broker" = shardmq ] && COMMANDS+=("$cmd")
    log "$broker: $name"
    run_row "$broker" "$broker-$i" "$args"
  done
  stop_broker
  sleep 2
done

# ---- durability: QoS 1 with persistent sessions -------------------------------
PERSISTENT="bench --mode pairs --pubs 100 --subs 100 -q 1 --closed-loop 200 --inflight 64 -V 5 -C false -x 600 -s 64 --warmup $WARMUP --duration $DURATION --drain 2 --quiet"
DURABLE_ROWS=()
for mode in memory kill_safe power_safe; do
  [[ " $BROKERS " == *" shardmq "* ]] || break
  start_broker shardmq "$mode"
  log "shardmq $mode: QoS 1, persistent sessions"
  run_row shardmq "durable-shardmq-$mode" "$PERSISTENT"
  DURABLE_ROWS+=("shardmq, durability = $mode|durable-shardmq-$mode")
  stop_broker
  sleep 2
done
if [[ " $BROKERS " == *" mosquitto "* ]]; then
  start_broker mosquitto true
  log "mosquitto persistence true: QoS 1, persistent sessions"
  run_row mosquitto durable-mosquitto "$PERSISTENT"
  DURABLE_ROWS+=("Mosquitto, persistence true|durable-mosquitto")
  stop_broker
fi

# ---- table -------------------------------------------------------------------
cell_rate() { # json: delivered msg/s, or connects/s for conn
  local f=$1
  [ -f "$f" ] || { echo "-"; return; }
  if [ "$(jget "$f" command)" = conn ]; then
    echo "$(fmt_num "$(jget "$f" connect_rate)") conn/s"
  elif [ "$(jget "$f" ok)" = true ]; then
    fmt_num "$(jget "$f" delivered_rate)"
  else
    echo "failed"
  fi
}
cell_cpu() { # broker CPU µs per delivered message (per connection for conn)
  local f=$1
  [ -f "$f" ] || { echo "-"; return; }
  if [ "$(jget "$f" command)" = conn ]; then
    echo "$(fmt_num "$(jget "$f" broker_cpu_us_per_conn)" 1)/conn"
  else
    fmt_num "$(jget "$f" broker_cpu_us_per_msg)" 2
  fi
}
cell_lat() {
  local f=$1
  [ -f "$f" ] || { echo "-"; return; }
  if [ "$(jget "$f" command)" = conn ]; then
    echo "connect $(jget "$f" connect_latency_us_p50) / $(jget "$f" connect_latency_us_p99) / - / $(jget "$f" connect_latency_us_max)"
  elif [ "$(jget "$f" ok)" = true ]; then
    echo "$(jget "$f" latency_us_p50) / $(jget "$f" latency_us_p99) / $(jget "$f" latency_us_p999) / $(jget "$f" latency_us_max)"
  else
    echo "-"
  fi
}
cell_loss() {
  local f=$1
  [ -f "$f" ] || { echo "-"; return; }
  if [ "$(jget "$f" command)" = conn ]; then
    echo "$(jget "$f" connected)/$(jget "$f" count) ok, $(jget "$f" conn_failed) failed"
  elif [ "$(jget "$f" ok)" = true ]; then
    echo "$(jget "$f" lost) / $(jget "$f" duplicated) / $(jget "$f" reordered)"
  else
    echo "-"
  fi
}
cell_rss() {
  local f=$1
  [ -f "$f" ] && [ "$(jget "$f" command)" = conn ] || { echo ""; return; }
  local b
  b=$(jget "$f" broker_rss_bytes_per_conn)
  [ -z "$b" ] || [ "$b" = null ] && { echo "-"; return; }
  echo "$(fmt_num "$b") B/conn ($(jget "$f" broker_rss_kb_before) → $(jget "$f" broker_rss_kb_after) KiB)"
}

cell_split() { # broker CPU s / bench CPU s in the window
  local f=$1
  [ -f "$f" ] && [ "$(jget "$f" ok)" = true ] || { echo "-"; return; }
  if [ "$(jget "$f" command)" = conn ]; then
    echo "$(fmt_num "$(jget "$f" broker_cpu_s)" 2) / - (whole run)"
  else
    echo "$(fmt_num "$(jget "$f" broker_cpu_s)" 2) / $(fmt_num "$(jget "$f" bench_cpu_s)" 2) in $(fmt_num "$(jget "$f" measured_s)" 1) s"
  fi
}

MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
SHARDMQ_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")
if [ -n "$(git -C "$ROOT" status --porcelain -- src Cargo.toml 2>/dev/null)" ]; then
  SHARDMQ_REV="$SHARDMQ_REV + uncommitted changes in src/"
fi
MOSQ_VER=$("$MOSQUITTO_BIN" -h 2>/dev/null | head -1 || true)
FLASHMQ_VER=""
[[ " $BROKERS " == *" flashmq "* ]] && FLASHMQ_VER=$("$FLASHMQ" --version 2>/dev/null | head -1 || true)
NAMES=""
for b in $BROKERS; do NAMES="${NAMES:+$NAMES vs }$(label "$b")"; done
# A header cell per broker (heads HEADING), that broker's cell of scenario
# $i (cells FUNCTION), or a separator per broker (seps).
heads() { for b in $BROKERS; do printf ' %s %s |' "$(label "$b")" "$1"; done; }
cells() { for b in $BROKERS; do printf ' %s |' "$("$1" "$WORK/$b-$i.json")"; done; }
seps() { for _ in $BROKERS; do printf -- '---|'; done; }
{
  echo "# $NAMES, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- machine: $(nproc) CPUs, ${MODEL:-unknown CPU}, kernel $(uname -r), open files $NOFILE"
  echo "- shardmq: commit $SHARDMQ_REV, \`shardmq --listen 127.0.0.1:$PORT_SHARDMQ --shards 2 --data-dir DIR\` (default config: kill-safe log, inflight 128, queue 100,000 messages / 16 MiB)"
  echo "- Mosquitto: ${MOSQ_VER:-not run}, single-threaded; config: listener 127.0.0.1:$PORT_MOSQUITTO, allow_anonymous, no persistence, max_inflight_messages 128, max_queued_messages 100000, set_tcp_nodelay true"
  echo "- FlashMQ: ${FLASHMQ_VER:-not run}; config: thread_count 2, listen 127.0.0.1:$PORT_FLASHMQ, allow_anonymous, no persistence"
  [[ " $BROKERS " == *" floor "* ]] && echo "- floor (relay): \`shardmq-floor --listen 127.0.0.1:$PORT_FLOOR\` (loadtest/src/bin/floor.rs): one glommio executor relaying each PUBLISH's bytes unchanged to the subscribers of its topic and answering only what the load generator waits for; no sessions, queues, limits or log: a reference no broker here can beat on the closed-loop rows (not on the low-rate ones), not a broker"
  echo "- **The load generator and the broker share the same $(nproc) cores** (and the machine is shared with other work):"
  echo "  absolute rates are bounded by shardmq-bench's own CPU use; compare the columns, not the numbers with other machines."
  echo "- MQTT 3.1.1, 64-byte payloads, ${WARMUP} s warmup then ${DURATION} s measured per row; latency is end to end (publisher send → subscriber read), µs."
  echo "- broker CPU = (utime + stime) of the broker over the measured window (+ drain) ÷ delivered messages; idle row: until all connected ÷ connections."
  [ -n "$MOSQUITTO_NOTE" ] && echo "- $MOSQUITTO_NOTE"
  [ -n "$FLASHMQ_NOTE" ] && echo "- $FLASHMQ_NOTE"
  [ -n "$FLOOR_NOTE" ] && echo "- $FLOOR_NOTE"
  echo
  echo "| scenario |$(heads msg/s)$(heads 'CPU µs/msg')$(heads 'latency p50 / p99 / p99.9 / max µs')$(heads 'lost / dup / reorder')$(heads RSS)"
  echo "|---|$(seps)$(seps)$(seps)$(seps)$(seps)"
  for i in "${!SCENARIOS[@]}"; do
    name=${SCENARIOS[$i]%%|*}
    echo "| $name |$(cells cell_rate)$(cells cell_cpu)$(cells cell_lat)$(cells cell_loss)$(cells cell_rss)"
  done
  echo
  echo "CPU seconds used during each measured window (+ drain), broker / shardmq-bench, out of $(nproc) × window:"
  echo
  echo "| scenario |$(heads 'run: broker / bench')"
  echo "|---|$(seps)"
  for i in "${!SCENARIOS[@]}"; do
    name=${SCENARIOS[$i]%%|*}
    echo "| $name |$(cells cell_split)"
  done
  echo
  echo "QoS 1 pairs 100 with persistent sessions (MQTT 5.0, Clean Start 0, Session Expiry 600 s), each durability mode"
  echo "beside Mosquitto with \`persistence true\` (which saves its database at autosave intervals and at shutdown, not per"
  echo "message: a crash loses what arrived since):"
  echo
  echo "| broker | msg/s | broker CPU µs/msg | latency p50 / p99 / p99.9 / max µs | lost / dup / reorder | broker / bench CPU s |"
  echo "|---|---|---|---|---|---|"
  for row in "${DURABLE_ROWS[@]}"; do
    f="$WORK/${row#*|}.json"
    echo "| ${row%%|*} | $(cell_rate "$f") | $(cell_cpu "$f") | $(cell_lat "$f") | $(cell_loss "$f") | $(cell_split "$f") |"
  done
  echo
  echo "\`shardmq-bench $PERSISTENT -h 127.0.0.1 -p PORT --broker-pid \$BROKER_PID --json FILE\`"
  echo
  echo "Closed-loop rows keep 200 (fan-in: 8) messages in flight per publisher → subscriber link, so their latency is"
  echo "about in-flight ÷ rate (Little's law) and mostly shows the throughput; the fixed-rate row is the latency comparison."
  echo
  echo "Commands (\`\$BROKER_PID\` is the broker's pid, FILE a JSON summary; the same for the other brokers with their ports):"
  echo
  echo '```'
  for c in "${COMMANDS[@]}"; do echo "$c"; done
  echo '```'
  echo
  echo "Raw outputs of this run: $WORK"
} >"$OUT"
cat "$OUT"
log "written to $OUT"
