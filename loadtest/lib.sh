# Sourced by the interleaved comparison scripts (before-after.sh,
# cluster-bench.sh, head-to-head.sh), which set BENCH, WORK, ROWS and
# ROUNDS, and by compare.sh.

# flashmq_conf DIR PORT: FlashMQ's configuration in DIR/flashmq.conf, its
# storage in DIR/flashmq-storage (made empty): 127.0.0.1:PORT, 2 threads
# (its default here: one per CPU), anonymous clients, no persistence, no
# log beyond warnings.
flashmq_conf() {
  rm -rf "$1/flashmq-storage" && mkdir -p "$1/flashmq-storage"
  cat >"$1/flashmq.conf" <<EOF
thread_count 2
allow_anonymous true
log_level warning
log_file $1/flashmq-file.log
storage_dir $1/flashmq-storage
listen {
  protocol mqtt
  inet_protocol ip4
  inet4_bind_address 127.0.0.1
  port $2
}
EOF
}

# results_dir NAME: a new directory /tmp/NAME.XXXXXX in $WORK, whose
# subdirectories (the brokers' data: a shardmq shard preallocates 128 MiB
# of log) are removed when the script exits, however it exits; the logs
# and JSON summaries in it stay for reading. Runs on_exit first when the
# script defines it.
results_dir() {
  WORK=$(mktemp -d "/tmp/$1.XXXXXX")
  trap 'declare -F on_exit >/dev/null && on_exit; find "$WORK" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +' EXIT
}

# json_value FILE KEY: a top-level value of a shardmq-bench JSON summary.
json_value() { sed -n "s/^  \"$2\": \(.*\),$/\1/p" "$1"; }

# wait_port PORT: until 127.0.0.1:PORT accepts connections (10 s at most).
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# bench_then_stop JSON "ARGS" PID [PID...]: one bounded shardmq-bench run
# with ARGS (host and ports included), the CPU time of every PID counted as
# the broker's, its summary in JSON (its output beside it, .out); then the
# brokers are stopped.
bench_then_stop() {
  local json=$1 args=$2 pid=$3 more=() p
  shift 3
  for p in "$@"; do more+=(--also-broker-pid "$p"); done
  # shellcheck disable=SC2086
  timeout 60 "$BENCH" $args --broker-pid "$pid" "${more[@]}" --json "$json" \
    >"${json%.json}.out" 2>&1 || true
  kill -TERM "$pid" "$@"
  wait "$pid" "$@" || true
  sleep 1
}

# medians LABEL [FILE]: for each row of ROWS, the median of the ratios
# FILE (default "$WORK/ratios") holds for it (lines "NAME RATIO", one per
# round), and where the runs are.
medians() {
  local label=$1 file=${2:-$WORK/ratios} row name median
  for row in "${ROWS[@]}"; do
    name=${row%%|*}
    median=$(awk -v n="$name" '$1 == n { print $2 }' "$file" | sort -n |
      awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
    echo "$name: median $label over $ROUNDS rounds = $median"
  done
  echo "(runs in $WORK)"
}
