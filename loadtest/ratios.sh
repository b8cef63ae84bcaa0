# Sourced by the interleaved comparison scripts: `medians LABEL` prints,
# for each row of ROWS, the median of the ratios "$WORK/ratios" holds for
# it (lines "NAME RATIO", one per round), and where the runs are.
medians() {
  local label=$1 row name median
  for row in "${ROWS[@]}"; do
    name=${row%%|*}
    median=$(awk -v n="$name" '$1 == n { print $2 }' "$WORK/ratios" | sort -n |
      awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
    echo "$name: median $label over $ROUNDS rounds = $median"
  done
  echo "(runs in $WORK)"
}
