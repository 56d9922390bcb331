#!/usr/bin/env bash
# The web console in a real browser: seeds a SQLite database with pending, retrying, scheduled
# and dead deliveries (`examples/console.rs`), serves it with `txbus web`, loads the overview,
# the dead letters and one dead letter in headless Chromium, checks the text Chromium rendered
# (its DOM) and keeps the screenshots in target/console/. Needs `chromium` (Debian's package).
set -euo pipefail
cd "$(dirname "$0")/.."

chromium=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$chromium" ]; then
  echo "chromium is not installed: apt-get install chromium" >&2
  exit 1
fi

out=target/console
rm -rf "$out"
mkdir -p "$out"
db=$out/shop.db
port=${TXBUS_CONSOLE_PORT:-18080}
base=http://127.0.0.1:$port

cargo build --quiet --bin txbus --features cli,web,sqlite
cargo run --quiet --example console --features web -- seed "$db"

target/debug/txbus web --bind "127.0.0.1:$port" --database-url "$db" > "$out/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do
  if (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  sleep 0.2
done

browse() { # name, path: the rendered DOM in $out/name.html, a screenshot in $out/name.png
  local flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,900)
  "$chromium" "${flags[@]}" --dump-dom "$base$2" > "$out/$1.html" 2> "$out/$1.chromium.log"
  "$chromium" "${flags[@]}" --screenshot="$out/$1.png" "$base$2" >> "$out/$1.chromium.log" 2>&1
  test -s "$out/$1.png" || { echo "no screenshot of $2" >&2; exit 1; }
}

expect() { # file, text...
  local file=$1; shift
  for text in "$@"; do
    grep -qF -- "$text" "$out/$file" || { echo "$file does not show: $text" >&2; exit 1; }
  done
}

browse overview /
expect overview.html "Overview" "shop.send_confirmation" "shop.fraud_check" \
  "shop.reserve_stock" "shop.remind" "<svg" "dead letters"

browse dead /dead
expect dead.html "Dead letters" "needs a manual review" "aborted" "Replay every dead letter"

letter=$(grep -o 'href="/dead/[0-9]*/shop.fraud_check"' "$out/dead.html" | head -n 1 | cut -d'"' -f2)
test -n "$letter" || { echo "no link to a dead letter" >&2; exit 1; }
browse letter "$letter"
expect letter.html "Dead letter: event" "shop.fraud_check" "\"total_cents\": 250000" \
  "needs a manual review" ">Replay<"

echo "the console renders in Chromium; screenshots in $out/: overview.png dead.png letter.png"
