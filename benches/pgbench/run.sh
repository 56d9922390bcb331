#!/usr/bin/env bash
# The storage-layout measurements behind txbus's one-table design: transactions per second of
# the raw SQL of an emit at 16 clients, beside the plain entity upsert, with pgbench.
# Usage: benches/pgbench/run.sh [rounds=3] [seconds=8].
# Env: PGHOST PGPORT PGUSER PGDATABASE CLIENTS, and SCRIPTS to run some of them only.
set -euo pipefail
cd "$(dirname "$0")"
ROUNDS=${1:-3}; SECS=${2:-8}; CLIENTS=${CLIENTS:-16}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres} PGDATABASE=${PGDATABASE:-test}
psql -X -q -v ON_ERROR_STOP=1 -f schema.sql
SCRIPTS=${SCRIPTS:-"plain autocommit two_tables one_table two_tables_pipelined_commit one_table_pipelined_commit one_table_two_trips one_table_one_trip one_statement one_statement_completed"}
for round in $(seq 1 "$ROUNDS"); do
  for s in $SCRIPTS; do
    psql -X -q -c "TRUNCATE txbus_pgbench.users, txbus_pgbench.events, txbus_pgbench.deliveries, txbus_pgbench.one" -c "CHECKPOINT"
    tps=$(pgbench -n -M prepared -f "$s.sql" -T "$SECS" -c "$CLIENTS" -j 2 2>&1 | awk -F'= ' '/^tps/ {print $2+0}')
    echo "$round $s $tps"
  done
done | tee /tmp/txbus-pgbench.out
python3 - <<'PY'
import collections, statistics
rows = [l.split() for l in open('/tmp/txbus-pgbench.out')]
tps = collections.defaultdict(list)
for _, s, t in rows: tps[s].append(float(t))
base = statistics.median(tps['plain']) if 'plain' in tps else float('nan')
auto = statistics.median(tps['autocommit']) if 'autocommit' in tps else float('nan')
print('\n| script | round trips | tps median [min-max] | ÷ plain | ÷ autocommit |\n|---|---|---|---|---|')
trips = {'plain': 3, 'autocommit': 1, 'one_statement_completed': 1, 'two_tables': 4, 'one_table': 4, 'two_tables_pipelined_commit': 3,
         'one_table_pipelined_commit': 3, 'one_table_two_trips': 2, 'one_table_one_trip': 1,
         'one_statement': 1}
for s, v in tps.items():
    m = statistics.median(v)
    print(f'| {s} | {trips[s]} | {m:.0f} [{min(v):.0f}-{max(v):.0f}] | {m/base:.2f} | {m/auto:.2f} |')
PY
psql -X -q -c "DROP SCHEMA txbus_pgbench CASCADE"
