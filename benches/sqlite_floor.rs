//! The floor of an emit on SQLite: the statements of E1's emit and of its completion, run with
//! synchronous diesel on one connection, with no bus, no runtime and no thread hop, beside the
//! plain transaction of the same upsert. txbus cannot be faster than its own statements; this
//! shows how far the storage work alone is from the plain write.
//!
//! E2's shape too: 100 upserts in one transaction, against the same with their events (the ids
//! from the sequence row in blocks of 16, 32 and 64, a delivery each, the completion of the 100
//! in one transaction after).
//!
//! `cargo bench --bench sqlite_floor --features sqlite [-- EVENTS ROUNDS]`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

#[derive(QueryableByName)]
struct Value {
    #[diesel(sql_type = BigInt)]
    value: i64,
}

/// What an emit writes besides the upsert.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    /// Takes the event id from `txbus_sequence` (one more row, and page, per commit).
    sequence: bool,
    /// Writes the delivery.
    delivery: bool,
    /// Deletes the deliveries after their listeners ran, 50 per transaction.
    completion: bool,
}

const SHAPES: [Shape; 4] = [
    Shape {
        name: "upsert + id from the sequence row",
        sequence: true,
        delivery: false,
        completion: false,
    },
    Shape {
        name: "upsert + delivery (ids given)",
        sequence: false,
        delivery: true,
        completion: false,
    },
    Shape {
        name: "upsert + id + delivery",
        sequence: true,
        delivery: true,
        completion: false,
    },
    Shape {
        name: "upsert + id + delivery + completion: an emit",
        sequence: true,
        delivery: true,
        completion: true,
    },
];

fn open(path: &std::path::Path) -> SqliteConnection {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let mut c = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
    // The bus's settings.
    c.batch_execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
        .unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    let mut migrations: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    migrations.sort();
    for migration in migrations {
        c.batch_execute(&std::fs::read_to_string(migration.join("up.sql")).unwrap())
            .unwrap();
    }
    c.batch_execute(
        "CREATE TABLE bench_users (id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL)",
    )
    .unwrap();
    c
}

fn upsert(c: &mut SqliteConnection, id: i64) {
    diesel::sql_query(
        "INSERT INTO bench_users (id, email) VALUES (?, ?) \
         ON CONFLICT (id) DO UPDATE SET email = excluded.email",
    )
    .bind::<BigInt, _>(id)
    .bind::<Text, _>(format!("user-{id}@example.com"))
    .execute(c)
    .unwrap();
}

/// Writes event `id`'s delivery, leased as an emit writes it.
fn deliver(c: &mut SqliteConnection, id: i64, payload: &str) {
    diesel::sql_query(
        "INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, \
         lease_ms, attempts, leased_at, available_at, expires_at) \
         VALUES (?, 'bench.noop', 'bench.user_created', ?, \
         CAST(unixepoch('subsec') * 1000 AS INTEGER), 30000, 1, 0, 30000, 999999999999)",
    )
    .bind::<BigInt, _>(id)
    .bind::<Text, _>(payload)
    .execute(c)
    .unwrap();
}

fn plain(c: &mut SqliteConnection, first: i64, n: i64) -> f64 {
    let started = Instant::now();
    for id in first..first + n {
        c.batch_execute("BEGIN").unwrap();
        upsert(c, id);
        c.batch_execute("COMMIT").unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn emit(c: &mut SqliteConnection, shape: Shape, first: i64, n: i64, payload: &str) -> f64 {
    let mut done = Vec::new();
    let started = Instant::now();
    for user in first..first + n {
        c.batch_execute("BEGIN IMMEDIATE").unwrap();
        upsert(c, user);
        let id = if shape.sequence {
            diesel::sql_query(
                "UPDATE txbus_sequence SET value = value + 1 WHERE name = 'event_id' \
                 RETURNING value",
            )
            .get_result::<Value>(c)
            .unwrap()
            .value
        } else {
            // Far from the ids the sequence hands out.
            user + (1 << 40)
        };
        if shape.delivery {
            deliver(c, id, payload);
        }
        c.batch_execute("COMMIT").unwrap();
        done.push(id);
        if shape.completion && done.len() >= 50 {
            c.batch_execute("BEGIN IMMEDIATE").unwrap();
            for id in done.drain(..) {
                diesel::sql_query(
                    "DELETE FROM txbus_deliveries WHERE event_id = ? AND listener = 'bench.noop' \
                     AND attempts = 1 AND dead_at IS NULL AND delivered_at IS NULL",
                )
                .bind::<BigInt, _>(id)
                .execute(c)
                .unwrap();
            }
            c.batch_execute("COMMIT").unwrap();
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Events per transaction in E2.
const BATCH: i64 = 100;

/// E2's baseline: `n` upserts, `BATCH` to a transaction.
fn plain_batch(c: &mut SqliteConnection, first: i64, n: i64) -> f64 {
    let started = Instant::now();
    for batch in (first..first + n).step_by(BATCH as usize) {
        c.batch_execute("BEGIN").unwrap();
        for id in batch..batch + BATCH {
            upsert(c, id);
        }
        c.batch_execute("COMMIT").unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// E2's statements: `BATCH` upserts and events to a transaction, then their completion.
fn emit_batch(c: &mut SqliteConnection, first: i64, n: i64, payload: &str) -> f64 {
    let started = Instant::now();
    for batch in (first..first + n).step_by(BATCH as usize) {
        c.batch_execute("BEGIN IMMEDIATE").unwrap();
        let mut ids = Vec::new();
        let mut block = 16;
        for user in batch..batch + BATCH {
            upsert(c, user);
            if ids.is_empty() {
                let last = diesel::sql_query(
                    "UPDATE txbus_sequence SET value = value + ? WHERE name = 'event_id' \
                     RETURNING value",
                )
                .bind::<BigInt, _>(block)
                .get_result::<Value>(c)
                .unwrap()
                .value;
                ids.extend((last - block + 1..=last).rev());
                block *= 2;
            }
            let id = ids.pop().unwrap();
            deliver(c, id, payload);
        }
        c.batch_execute("COMMIT").unwrap();
        c.batch_execute("BEGIN IMMEDIATE").unwrap();
        diesel::sql_query(
            "DELETE FROM txbus_deliveries WHERE listener = 'bench.noop' AND attempts = 1 \
             AND dead_at IS NULL AND delivered_at IS NULL",
        )
        .execute(c)
        .unwrap();
        c.batch_execute("COMMIT").unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<i64> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(20_000);
    let rounds = args.get(1).copied().unwrap_or(3);
    let dir = std::env::temp_dir().join(format!("txbus-sqlite-floor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = open(&dir.join("floor.db"));
    let payload = format!(
        r#"{{"id":1,"email":"user-1@example.com","padding":"{}"}}"#,
        "x".repeat(196)
    );
    println!("| round | shape | plain tx/s | shape/s | shape ÷ plain |\n|---|---|---|---|---|");
    for round in 0..rounds {
        for (i, shape) in SHAPES.into_iter().enumerate() {
            let base = (round * 10 + i as i64) * 2 * n;
            let plain = plain(&mut c, base, n);
            let rate = emit(&mut c, shape, base + n, n, &payload);
            println!(
                "| {round} | {} | {plain:.0} | {rate:.0} | {:.2} |",
                shape.name,
                rate / plain
            );
        }
    }
    println!(
        "\n| round | E2: {BATCH} per transaction | plain events/s | with events/s | ÷ plain |\n|---|---|---|---|---|"
    );
    for round in 0..rounds {
        let base = (100 + round) * 2 * n;
        // The order alternates by round.
        let (plain, rate) = if round % 2 == 0 {
            let plain = plain_batch(&mut c, base, n);
            (plain, emit_batch(&mut c, base + n, n, &payload))
        } else {
            let rate = emit_batch(&mut c, base + n, n, &payload);
            (plain_batch(&mut c, base, n), rate)
        };
        println!(
            "| {round} | upserts + ids + deliveries + completion | {plain:.0} | {rate:.0} | {:.2} |",
            rate / plain
        );
    }
    drop(c);
    let _ = std::fs::remove_dir_all(dir);
}
