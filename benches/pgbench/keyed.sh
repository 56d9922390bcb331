#!/usr/bin/env bash
# The floor of a keyed emit on PostgreSQL: transactions per second of the one statement of an
# emit with one entity write (pgbench, 16 clients), unkeyed and keyed, on txbus's own schema
# (the migrations, applied to schema txbus_pgbench_keyed of database `test`). `keyed` is txbus's
# statement (txbus_key_head: the key's lock, then the look-up for pending deliveries with a
# snapshot taken after it); `keyed_no_lookup` takes the lock and writes the same keyed row
# without the look-up, which is not correct, only there to split the cost.
# Usage: benches/pgbench/keyed.sh [rounds=3] [seconds=8].
set -euo pipefail
cd "$(dirname "$0")"
ROUNDS=${1:-3}; SECS=${2:-8}; CLIENTS=${CLIENTS:-16}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres} PGDATABASE=${PGDATABASE:-test}
SCHEMA=txbus_pgbench_keyed
psql -X -q -v ON_ERROR_STOP=1 -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" -c "CREATE SCHEMA $SCHEMA"
for up in ../../migrations/postgres/*/up.sql; do
  (echo "SET search_path = $SCHEMA;"; cat "$up") | psql -X -q -v ON_ERROR_STOP=1
done
psql -X -q -v ON_ERROR_STOP=1 -c "CREATE TABLE $SCHEMA.users (id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL)"
export PGOPTIONS="-c search_path=$SCHEMA"
for round in $(seq 1 "$ROUNDS"); do
  for s in unkeyed keyed keyed_no_lookup; do
    psql -X -q -c "TRUNCATE users, txbus_deliveries" -c "CHECKPOINT"
    tps=$(pgbench -n -M prepared -f "keyed/$s.sql" -T "$SECS" -c "$CLIENTS" -j 2 2>&1 | awk -F'= ' '/^tps/ {print $2+0}')
    echo "$round $s $tps"
  done
done | tee /tmp/txbus-pgbench-keyed.out
python3 - <<'PY'
import collections, statistics
tps = collections.defaultdict(list)
for line in open('/tmp/txbus-pgbench-keyed.out'):
    _, s, t = line.split()
    tps[s].append(float(t))
base = statistics.median(tps['unkeyed'])
print('\n| statement | tps median [min-max] | ÷ unkeyed |\n|---|---|---|')
for s, v in tps.items():
    m = statistics.median(v)
    print(f'| {s} | {m:.0f} [{min(v):.0f}-{max(v):.0f}] | {m/base:.2f} |')
PY
unset PGOPTIONS
psql -X -q -c "SET client_min_messages = warning" -c "DROP SCHEMA $SCHEMA CASCADE"
