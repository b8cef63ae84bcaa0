#!/usr/bin/env bash
# TLS beside plain TCP on the same broker, for shardmq and Mosquitto:
# the comparison rows of issue 11.
#
#   - CONNECT cost: IDLE connections opened as fast as --max-connecting 100
#     allows, over TCP and over TLS 1.3 (ECDSA P-256 certificate made here);
#     the broker's CPU per connection (TCP accept + CONNECT, plus the TLS
#     handshake), and from it the handshakes one core can do per second;
#   - idle memory: the broker's RSS per connection once they are all
#     connected and idle (a fresh broker for each measurement);
#   - QoS 0 pairs: 100 publishers each to its own subscriber, 64-byte
#     payloads, closed loop (100 in flight); the broker's CPU per delivered
#     message and the delivered rate.
#
# Each measurement runs ROUNDS times, TCP and TLS alternating, so drift on a
# shared machine hits both alike; the table shows every round. Writes
# loadtest/results/tls-DATE.md (also printed). Bounded: every bench run stops
# by itself and is wrapped in `timeout`; about 4 minutes with the defaults.
#
# Environment knobs (defaults in brackets):
#   ROUNDS [2]  IDLE [10000]  DURATION [6] (pairs, measured s)  SHARDS [2]
#   SKIP_BUILD=1   use the binaries already in target/release
#   BROKERS ["shardmq mosquitto"]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

ROUNDS=${ROUNDS:-2}
IDLE=${IDLE:-10000}
DURATION=${DURATION:-6}
SHARDS=${SHARDS:-2}
BROKERS=${BROKERS:-"shardmq mosquitto"}
BENCH="$ROOT/target/release/shardmq-bench"
SHARDMQ="$ROOT/target/release/shardmq"
STAMP=$(date -u +%Y%m%d-%H%M%S)
WORK=$(mktemp -d /tmp/shardmq-tls.XXXXXX)
OUT="$ROOT/loadtest/results/tls-$STAMP.md"
mkdir -p "$ROOT/loadtest/results"
PORT_TCP=28890
PORT_TLS=28891
log() { echo "== $*" >&2; }

if [ -z "${SKIP_BUILD:-}" ]; then
  log "building shardmq and shardmq-bench (release)"
  CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2} cargo build --release -p shardmq -p shardmq-bench
fi
ulimit -n "$(ulimit -Hn)"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$WORK/server.key" -out "$WORK/server.pem" -days 2 \
  -subj "/CN=127.0.0.1" -addext "subjectAltName=IP:127.0.0.1" 2>/dev/null
# Mosquitto started as root drops to its own user: let it read them.
chmod a+rx "$WORK" && chmod a+r "$WORK"/server.*

cat > "$WORK/shardmq.toml" <<EOF
[server]
shards = $SHARDS
[auth]
allow_anonymous = true
[storage]
durability = "memory"
[[listeners]]
bind = "127.0.0.1:$PORT_TCP"
transport = "tcp"
[[listeners]]
bind = "127.0.0.1:$PORT_TLS"
transport = "tls"
tls_cert_file = "$WORK/server.pem"
tls_key_file = "$WORK/server.key"
EOF
cat > "$WORK/mosquitto.conf" <<EOF
per_listener_settings false
allow_anonymous true
max_connections -1
listener $PORT_TCP 127.0.0.1
listener $PORT_TLS 127.0.0.1
certfile $WORK/server.pem
keyfile $WORK/server.key
EOF

PID=""
start() { # broker
  case $1 in
    shardmq) "$SHARDMQ" --config "$WORK/shardmq.toml" >"$WORK/$1.log" 2>&1 & ;;
    mosquitto) "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$WORK/mosquitto.conf" >"$WORK/$1.log" 2>&1 & ;;
  esac
  PID=$!
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT_TLS") 2>/dev/null && return 0
    sleep 0.1
  done
  log "$1 did not start"; cat "$WORK/$1.log" >&2; exit 1
}
stop() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; sleep 0.5; }
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d.get(sys.argv[2]))" "$1" "$2"; }
tls_flag() { [ "$1" = tls ] && echo "--ssl" || true; }
port() { [ "$1" = tls ] && echo $PORT_TLS || echo $PORT_TCP; }

ROWS=""
for broker in $BROKERS; do
  for round in $(seq "$ROUNDS"); do
    for t in tcp tls; do
      log "$broker round $round: $IDLE idle connections over $t"
      start "$broker"
      j="$WORK/$broker-conn-$t-$round.json"
      timeout 120 "$BENCH" conn -h 127.0.0.1 -p "$(port $t)" $(tls_flag $t) -c "$IDLE" -i 0 \
        --max-connecting 100 --duration 15 --quiet --broker-pid "$PID" --json "$j" >/dev/null 2>&1 || true
      stop
      cpu=$(field "$j" broker_cpu_us_per_unit); rss=$(field "$j" broker_rss_bytes_per_conn)
      rate=$(field "$j" connect_rate); ok=$(field "$j" connected)
      per_core=$(python3 -c "print(round(1e6/$cpu) if $cpu else '-')")
      ROWS+="| $broker | $round | $t | connect | $ok connected, $(printf %.0f "$rate")/s | $(printf %.1f "$cpu") µs CPU per connection (≈ $per_core per core-second) | $(printf %.2f "$(python3 -c "print($rss/1024)")") KiB RSS per idle connection |"$'\n'
    done
  done
  start "$broker"
  for round in $(seq "$ROUNDS"); do
    for t in tcp tls; do
      log "$broker round $round: 100 QoS 0 pairs over $t"
      j="$WORK/$broker-pairs-$t-$round.json"
      timeout 60 "$BENCH" bench -h 127.0.0.1 -p "$(port $t)" $(tls_flag $t) --mode pairs \
        --pubs 100 --subs 100 -q 0 -s 64 --closed-loop 100 --warmup 2 --duration "$DURATION" \
        --quiet --broker-pid "$PID" --json "$j" >/dev/null 2>&1 || true
      cpu=$(field "$j" broker_cpu_us_per_msg); rate=$(field "$j" delivered_rate); lost=$(field "$j" lost)
      ROWS+="| $broker | $round | $t | 100 pairs QoS 0 | $(printf %.0f "$rate") msg/s, $lost lost | $(printf %.2f "$cpu") µs CPU per message | |"$'\n'
    done
  done
  stop
done

{
  echo "# TLS beside TCP, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)."
  echo "shardmq $SHARDS shards; Mosquitto $(mosquitto -h 2>/dev/null | head -1 | awk '{print $3}' || true)."
  echo "TLS 1.3, ECDSA P-256 certificate, rustls client in shardmq-bench (on the same machine)."
  echo "Command: \`loadtest/tls-compare.sh\` (ROUNDS=$ROUNDS IDLE=$IDLE DURATION=$DURATION)."
  echo
  echo "| broker | round | transport | load | result | CPU | memory |"
  echo "|---|---|---|---|---|---|---|"
  printf "%s" "$ROWS"
} | tee "$OUT"
rm -rf "$WORK"
