#!/usr/bin/env bash
# O1 (see BENCHMARKS.md): E1 with the `opentelemetry` feature and an OpenTelemetry pipeline
# installed (every emit in a request span, the `tracing` layer, the SDK's batch processor, an
# exporter that drops the spans), against E1 built without the feature: with no subscriber, and
# with the same pipeline. Each round runs the three binaries one after the other, in a rotated
# order; the ratios are per round, reported as the median and the range.
#
#   benches/otel.sh [backend] [rounds] [events] [emitters]     # defaults: postgres 5 3000 16
#   PIPELINE=--otel-lean benches/otel.sh ...     # the layer without busy/idle times, location, thread
set -euo pipefail
cd "$(dirname "$0")/.."
backend=${1:-postgres}
rounds=${2:-5}
events=${3:-3000}
emitters=${4:-16}
pipeline=${PIPELINE:---otel}

# Builds the benchmark binary with these features and prints its path.
build() {
  cargo build --release --bench txbus --features "$1" --message-format=json-render-diagnostics |
    grep -o '"executable":"[^"]*/txbus-[0-9a-f]*"' | tail -n 1 | cut -d'"' -f4
}

dir=target/otel-bench
mkdir -p "$dir"
cp "$(build "$backend")" "$dir/off"
cp "$(build "$backend,opentelemetry")" "$dir/on"

# One E1 round of a binary; prints the bus's events per second.
e1() { # binary, extra arguments...
  local bin=$1; shift
  "$bin" --bench --backends "$backend" --scenarios E1 --concurrency "$emitters" \
    --events "$events" --rounds 1 "$@" 2>/dev/null |
    awk -F'|' '/E1 emit end-to-end/ && /plain insert tx/ { gsub(/ /, "", $6); print $6 }' |
    tail -n 1
}

declare -a on off off_otel
for round in $(seq 0 $((rounds - 1))); do
  for turn in 0 1 2; do
    case $(((round + turn) % 3)) in
      0) on+=("$(e1 "$dir/on" "$pipeline")") ;;
      1) off+=("$(e1 "$dir/off")") ;;
      2) off_otel+=("$(e1 "$dir/off" "$pipeline")") ;;
    esac
  done
  echo "round $((round + 1)): on+pipeline ${on[-1]}, off ${off[-1]}, off+pipeline ${off_otel[-1]} events/s" >&2
done

# Median and range of a list of numbers.
stats() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
  m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
  printf "%.2f [%.2f–%.2f]", m, v[1], v[NR] }'; }
ratios() { # numerators, denominators (two arrays by name)
  local -n a=$1 b=$2; local out=()
  for i in "${!a[@]}"; do out+=("$(awk -v x="${a[$i]}" -v y="${b[$i]}" 'BEGIN { print x / y }')"); done
  stats "${out[@]}"
}

echo "| backend | case | feature on + pipeline | feature off | feature off + pipeline | on ÷ off | on ÷ off with pipeline |"
echo "|---|---|---|---|---|---|---|"
echo "| $backend ($pipeline) | $emitters emitters, $events events, $rounds rounds | $(stats "${on[@]}") | $(stats "${off[@]}") | $(stats "${off_otel[@]}") | $(ratios on off) | $(ratios on off_otel) |"
