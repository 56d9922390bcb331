//! T1: scheduled events. What an `emit_after` costs beside an `emit`; what scheduled
//! deliveries that are not due cost an idle bus (statements, and the time from a delivery
//! falling due to its start); how fast a backlog that falls due at one moment drains.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use txbus::{Entity, EventBus, persist};

use super::backends::{BenchBackend, bulk_backlog_due};
use super::later::{idle_statements, ms, percentile};
use super::scenarios::{
    create_users, deliveries_left, drain_bus, fan_out, next_user, pool_for, settle,
};
use super::{Args, BenchUser, Recorder, Row};
use crate::support::backends::exec;

/// How far ahead the scheduled events of T1 are due: beyond any run.
const FAR: Duration = Duration::from_secs(3600);

/// How often the bus of the idle measurement polls.
const IDLE_EVERY: Duration = Duration::from_millis(100);

pub async fn t1<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    let mut rows = emit_after::<B>(args).await;
    rows.extend(idle::<B>(args).await);
    rows.push(due_at_once::<B>(args).await);
    rows
}

/// `emit_after` (due in an hour) with one `persist`, calls per second; baseline: E1's `emit`
/// with the same `persist`, until its no-op listener ran and its result is written. The two
/// alternate their order each round.
async fn emit_after<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    let db = B::open().await;
    let most = args.concurrency.iter().copied().max().unwrap_or(1);
    let pool = pool_for::<B>(&db.url, most + 8).await;
    create_users(&pool).await;
    let recorder = Arc::new(Recorder::default());
    let bus = EventBus::builder(pool.clone())
        .state(recorder.clone())
        .build()
        .await
        .unwrap();
    let mut rows = Vec::new();
    for &clients in &args.concurrency {
        let mut row = Row {
            backend: B::NAME,
            scenario: "T1 emit_after",
            case: format!("{clients} emitters"),
            unit: "events/s",
            txbus: Vec::new(),
            baseline: Vec::new(),
            baseline_name: "emit (E1)",
            lower_is_better: false,
        };
        for round in 0..args.rounds {
            for scheduled in [round % 2 == 0, round % 2 == 1] {
                let n = args.events;
                let target = recorder.runs.load(Ordering::Relaxed) + n as u64;
                let started = Instant::now();
                fan_out(clients, n, |count| {
                    let bus = bus.clone();
                    let payload = args.payload;
                    async move {
                        for _ in 0..count {
                            let (user, event) = next_user(payload);
                            if scheduled {
                                bus.emit_after(FAR, event, [persist(&user)]).await.unwrap();
                            } else {
                                bus.emit(event, [persist(&user)]).await.unwrap();
                            }
                        }
                    }
                })
                .await;
                if scheduled {
                    row.txbus.push(n as f64 / started.elapsed().as_secs_f64());
                } else {
                    settle(&bus, &recorder, target).await;
                    row.baseline
                        .push(n as f64 / started.elapsed().as_secs_f64());
                }
            }
        }
        rows.push(row);
    }
    assert_eq!(
        bus.stats().await.unwrap().total.scheduled,
        (args.events * args.rounds * args.concurrency.len()) as u64,
        "every scheduled event waits"
    );
    bus.shutdown().await;
    rows
}

/// An idle bus (polling every 100 ms) on a table holding `args.scheduled` deliveries due in an
/// hour, against the same bus on an empty table: statements per second while idle, and the
/// time from a delivery written elsewhere falling due to its listener's start.
async fn idle<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    let n = args.scheduled;
    let payload = r#"{"padding":""}"#;
    let empty = B::open().await;
    txbus::migrate(&empty.pool).await.unwrap();
    let full = B::open().await;
    txbus::migrate(&full.pool).await.unwrap();
    bulk_backlog_due::<B>(&full.pool, n, payload, FAR.as_secs() as u32).await;
    if let Some(analyze) = B::ANALYZE {
        exec(&full.pool, analyze).await;
    }
    let counted = B::statements(&empty.pool).await.is_some();
    let mut statements = Row {
        backend: B::NAME,
        scenario: "T1 idle bus",
        case: format!("{n} scheduled, none due; retry_every 100 ms"),
        unit: "statements/s",
        txbus: Vec::new(),
        baseline: Vec::new(),
        baseline_name: "same bus, empty table",
        lower_is_better: true,
    };
    let mut started = Row {
        case: format!("{n} scheduled, none due; due → start, p50 of 20"),
        unit: "ms",
        ..statements.clone()
    };
    for round in 0..args.rounds {
        for with_rows in [round % 2 == 0, round % 2 == 1] {
            let db = if with_rows { &full } else { &empty };
            let rate = if counted {
                idle_statements::<B>(&db.url, IDLE_EVERY, true, args.idle).await
            } else {
                f64::NAN
            };
            let late = due_to_start::<B>(&db.url, &db.pool, 20).await;
            if with_rows {
                statements.txbus.push(rate);
                started.txbus.push(late);
            } else {
                statements.baseline.push(rate);
                started.baseline.push(late);
            }
        }
    }
    if counted {
        vec![statements, started]
    } else {
        vec![started]
    }
}

/// Writes `k` deliveries due a second later, as another process would, and returns the median
/// time from their due time to their listener's start here, in milliseconds.
pub async fn due_to_start<B: BenchBackend>(url: &str, pool: &txbus::Pool<B>, k: usize) -> f64
where
    BenchUser: Entity<B>,
{
    let recorder = Arc::new(Recorder::default());
    let bus = EventBus::builder(pool_for::<B>(url, 4).await)
        .state(recorder.clone())
        .retry_every(IDLE_EVERY)
        .run_migrations(false)
        .build()
        .await
        .unwrap();
    let written = Instant::now();
    bulk_backlog_due::<B>(pool, k, r#"{"padding":""}"#, 1).await;
    let due = written + Duration::from_secs(1);
    settle(&bus, &recorder, k as u64).await;
    let mut late: Vec<f64> = recorder
        .starts
        .lock()
        .unwrap()
        .iter()
        .map(|(_, start)| ms(start.saturating_duration_since(due)))
        .collect();
    late.sort_by(f64::total_cmp);
    bus.shutdown().await;
    percentile(&late, 0.5)
}

/// `args.backlog` deliveries written as scheduled for later, then made due at one moment while
/// a bus runs (tuned as D1's): deliveries per second from that moment until every one ran;
/// baseline: D1's drain, by a bus started after the same rows were made due (from its start).
async fn due_at_once<B: BenchBackend>(args: &Args) -> Row
where
    BenchUser: Entity<B>,
{
    let n = args.backlog;
    let payload = args.backlog_payload();
    let mut row = Row {
        backend: B::NAME,
        scenario: "T1 falling due at once",
        case: format!("{n} scheduled, 1 process"),
        unit: "deliveries/s",
        txbus: Vec::new(),
        baseline: Vec::new(),
        baseline_name: "D1 drain of the same rows, 1 process",
        lower_is_better: false,
    };
    for round in 0..args.rounds {
        for scheduled in [round % 2 == 0, round % 2 == 1] {
            let db = B::open().await;
            txbus::migrate(&db.pool).await.unwrap();
            bulk_backlog_due::<B>(&db.pool, n, &payload, FAR.as_secs() as u32).await;
            let pool = pool_for::<B>(&db.url, 8).await;
            let recorder = Arc::new(Recorder::default());
            let build = || {
                drain_bus(pool.clone(), recorder.clone())
                    .run_migrations(false)
                    .build()
            };
            let (bus, started) = if scheduled {
                let bus = build().await.unwrap();
                // Due at one instant, three seconds on (or when the rows are ready, if later).
                let sent = Instant::now();
                make_due::<B>(&db.pool, 3).await;
                (bus, (sent + Duration::from_secs(3)).max(Instant::now()))
            } else {
                make_due::<B>(&db.pool, 0).await;
                let started = Instant::now();
                (build().await.unwrap(), started)
            };
            settle(&bus, &recorder, n as u64).await;
            let rate = n as f64
                / Instant::now()
                    .saturating_duration_since(started)
                    .as_secs_f64();
            assert_eq!(deliveries_left(&pool).await, 0);
            bus.shutdown().await;
            if scheduled {
                row.txbus.push(rate);
            } else {
                row.baseline.push(rate);
            }
        }
    }
    row
}

/// Makes every delivery due `seconds` from now, in one statement, and cleans up after it where
/// the server keeps the old row versions (PostgreSQL).
async fn make_due<B: BenchBackend>(pool: &txbus::Pool<B>, seconds: u32)
where
    BenchUser: Entity<B>,
{
    let update = format!(
        "UPDATE txbus_deliveries SET available_at = {}",
        B::now_plus(seconds)
    );
    exec(pool, &update).await;
    if let Some(analyze) = B::ANALYZE {
        exec(pool, analyze).await;
    }
}
