#!/usr/bin/env bash
# E3's floor on PostgreSQL, and what storing the payload once would give: transactions per second
# (pgbench, 16 clients) of an emit of one event with five listeners and a 4 KiB payload of
# random letters and digits (which does not compress: each copy goes to TOAST), on txbus's own
# schema (the migrations, applied to schema txbus_pgbench_fanout of database `test`):
#   plain: E3's baseline, BEGIN, the entity upsert, one row holding the payload, COMMIT;
#   per_delivery: txbus's one statement, the payload in each of the five deliveries;
#   once: the same statement with the payload in a row of its own and five deliveries without.
# The payloads come from a table of 1,000 made in advance (every script reads one).
# Usage: benches/pgbench/fanout.sh [rounds=3] [seconds=8].
set -euo pipefail
cd "$(dirname "$0")"
ROUNDS=${1:-3}; SECS=${2:-8}; CLIENTS=${CLIENTS:-16}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres} PGDATABASE=${PGDATABASE:-test}
SCHEMA=txbus_pgbench_fanout
psql -X -q -v ON_ERROR_STOP=1 -c "SET client_min_messages = warning" -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" -c "CREATE SCHEMA $SCHEMA"
for up in ../../migrations/postgres/*/up.sql; do
  (echo "SET search_path = $SCHEMA;"; cat "$up") | psql -X -q -v ON_ERROR_STOP=1
done
psql -X -q -v ON_ERROR_STOP=1 <<SQL
SET search_path = $SCHEMA;
CREATE TABLE users (id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL);
CREATE TABLE bench_payloads (id BIGINT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE event_payloads (event_id BIGINT PRIMARY KEY, payload JSONB NOT NULL);
CREATE TABLE noise (id INT PRIMARY KEY, body TEXT NOT NULL);
INSERT INTO noise
SELECT n, (SELECT string_agg(substr('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789',
                                   1 + floor(random() * 62)::int, 1), '')
           FROM generate_series(1, 4096) WHERE n > 0)
FROM generate_series(1, 1000) n;
SQL
export PGOPTIONS="-c search_path=$SCHEMA"
for round in $(seq 1 "$ROUNDS"); do
  scripts=(plain per_delivery once)
  ((round % 2 == 0)) && scripts=(once per_delivery plain)
  for s in "${scripts[@]}"; do
    psql -X -q -c "TRUNCATE users, bench_payloads, event_payloads, txbus_deliveries" -c "CHECKPOINT"
    tps=$(pgbench -n -M prepared -f "fanout/$s.sql" -T "$SECS" -c "$CLIENTS" -j 2 2>&1 | awk -F'= ' '/^tps/ {print $2+0}')
    echo "$round $s $tps"
  done
done | tee /tmp/txbus-pgbench-fanout.out
python3 - <<'PY'
import collections, statistics
tps = collections.defaultdict(dict)
for line in open('/tmp/txbus-pgbench-fanout.out'):
    r, s, t = line.split()
    tps[s][r] = float(t)
print('\n| script | tps median [min–max] | ÷ plain (median of the rounds\' ratios) |\n|---|---|---|')
for s, v in tps.items():
    ratios = sorted(t / tps['plain'][r] for r, t in v.items())
    vs = sorted(v.values())
    print(f'| {s} | {statistics.median(vs):.0f} [{vs[0]:.0f}–{vs[-1]:.0f}] | '
          f'{statistics.median(ratios):.2f} [{ratios[0]:.2f}–{ratios[-1]:.2f}] |')
PY
unset PGOPTIONS
psql -X -q -c "SET client_min_messages = warning" -c "DROP SCHEMA $SCHEMA CASCADE"
