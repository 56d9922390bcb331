#!/usr/bin/env bash
# The floor of E1 and E2 on MySQL / MariaDB: the statements an emit sends, run by mysqlslap (no
# bus, no Rust client), beside the plain transaction of the same insert, on txbus's own schema
# (the migrations, applied to database txbus_mysqlslap).
#   E1, 16 clients, a transaction per event: the plain insert; with the event id (MariaDB's
#   `INSERT ... RETURNING`); with the delivery; with both, which is an emit.
#   E2, 1 client, 100 inserts per transaction: plain; with an id per event, one statement each
#   (as on MySQL, which has no `RETURNING`); with the ids in blocks of 1, 2, 4, ... 64 (MariaDB);
#   both with one `JSON_TABLE` insert of the 100 deliveries before the commit.
# Usage: benches/mysqlslap/floor.sh [rounds=3]. MYSQL_HOST, MYSQL_PORT, MYSQL_USER as for mysql.
set -euo pipefail
cd "$(dirname "$0")"
ROUNDS=${1:-3}
DB=txbus_mysqlslap
my() { mysql -h"${MYSQL_HOST:-127.0.0.1}" -P"${MYSQL_PORT:-3306}" -u"${MYSQL_USER:-root}" "$@"; }
my -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB"
for up in ../../migrations/mysql/*/up.sql; do my "$DB" < "$up"; done
my "$DB" -e "CREATE TABLE bench_users (id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 - "$work" <<'PY'
import json, sys
out = sys.argv[1]
payload = '{"id": 1, "email": "user-1@example.com", "padding": "' + 'x' * 196 + '"}'
user = "INSERT INTO bench_users (id, email) VALUES (UUID_SHORT(), 'user-1@example.com');"
now_us = "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) AS emitted_at_us"
one_id = f"INSERT INTO txbus_event_ids () VALUES () RETURNING CAST(id AS SIGNED) AS id, {now_us};"
def ids(n):
    return ("INSERT INTO txbus_event_ids (id) SELECT NULL FROM JSON_TABLE('%s', '$[*]' "
            "COLUMNS (n INT PATH '$')) j RETURNING CAST(id AS SIGNED) AS id, %s;"
            % (json.dumps([0] * n), now_us))
columns = ("INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, "
           "lease_ms, attempts, leased_at, available_at, expires_at, event_version, trace_context)")
delivery = (f"{columns} SELECT @ID@, j.listener, 'bench.user_created', '{payload}', e.t, 30000, "
            "1, e.t, e.t + INTERVAL 30000000 MICROSECOND, e.t + INTERVAL 86400000000 MICROSECOND, "
            "1, NULL FROM (SELECT UTC_TIMESTAMP(6) AS t) e CROSS JOIN JSON_TABLE('[\"bench.noop\"]', "
            "'$[*]' COLUMNS (listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin "
            "PATH '$')) j;")
rows = json.dumps([["bench.noop", payload]] * 100).replace("\\", "\\\\").replace("'", "\\'")
deliveries = (f"{columns} SELECT UUID_SHORT(), j.listener, 'bench.user_created', j.payload, "
              "UTC_TIMESTAMP(6), 30000, 1, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), 1, "
              f"NULL FROM JSON_TABLE('{rows}', '$[*]' COLUMNS (listener VARCHAR(255) PATH '$[0]', "
              "payload LONGTEXT PATH '$[1]')) j;")
def write(name, statements):
    open(f"{out}/{name}.sql", "w").write("\n".join(statements) + "\n")
write("e1_plain", ["BEGIN;", user, "COMMIT;"])
write("e1_id", ["BEGIN;", user, one_id, "COMMIT;"])
write("e1_delivery", ["BEGIN;", user, delivery.replace("@ID@", "UUID_SHORT()"), "COMMIT;"])
write("e1_emit", ["BEGIN;", user, one_id, delivery.replace("@ID@", "LAST_INSERT_ID()"), "COMMIT;"])
write("e2_plain", ["BEGIN;"] + [user] * 100 + ["COMMIT;"])
write("e2_ids_one_by_one", ["BEGIN;"] + [user, one_id] * 100 + [deliveries, "COMMIT;"])
blocks, taken, block = ["BEGIN;"], 0, 1
for _ in range(100):
    if taken == 0:
        blocks.append(ids(block))
        taken, block = block, block * 2
    blocks.append(user)
    taken -= 1
write("e2_ids_in_blocks", blocks + [deliveries, "COMMIT;"])
PY

# Runs a file: events per second (E1: 16 clients, 16,000 transactions; E2: 1 client, 200).
slap() { # file, clients, transactions, events per transaction
  local statements; statements=$(grep -c ';$' "$work/$1.sql")
  my "$DB" -e "TRUNCATE bench_users; TRUNCATE txbus_deliveries"
  mysqlslap -h"${MYSQL_HOST:-127.0.0.1}" -P"${MYSQL_PORT:-3306}" -u"${MYSQL_USER:-root}" \
    --create-schema="$DB" --no-drop --query="$work/$1.sql" --delimiter=";" \
    --concurrency="$2" --number-of-queries=$(($3 * statements)) --iterations=1 |
    awk -v n=$(($3 * $4)) '/Average number of seconds/ { printf "%.0f", n / $9 }'
}

for round in $(seq 1 "$ROUNDS"); do
  e1=(e1_plain e1_id e1_delivery e1_emit)
  e2=(e2_plain e2_ids_one_by_one e2_ids_in_blocks)
  # Alternate the order: forwards in odd rounds, backwards in even ones.
  if ((round % 2 == 0)); then e1=(e1_emit e1_delivery e1_id e1_plain); e2=(e2_ids_in_blocks e2_ids_one_by_one e2_plain); fi
  for s in "${e1[@]}"; do echo "$round $s $(slap "$s" 16 16000 1)"; done
  for s in "${e2[@]}"; do echo "$round $s $(slap "$s" 1 200 100)"; done
done | tee "$work/out"

python3 - "$work/out" <<'PY'
import collections, statistics, sys
rate = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r, s, v = line.split()
    rate[s].append((int(r), float(v)))
print('\n| shape | events/s median [min–max] | ÷ plain (median of the rounds\' ratios) |\n|---|---|---|')
for s, values in rate.items():
    plain = dict(rate[s[:2] + '_plain'])
    ratios = sorted(v / plain[r] for r, v in values)
    vs = sorted(v for _, v in values)
    print(f'| {s} | {statistics.median(vs):.0f} [{vs[0]:.0f}–{vs[-1]:.0f}] | '
          f'{statistics.median(ratios):.2f} [{ratios[0]:.2f}–{ratios[-1]:.2f}] |')
PY
my -e "DROP DATABASE $DB"
