//! K1: ordering per key. What a key costs an emit (a distinct key per event, and 16 hot keys,
//! one per emitter); how fast a backlog over 1,000 keys drains, in one process and in two; how
//! much a key whose head keeps failing slows the other keys; what deliveries waiting behind
//! held keys cost an idle bus.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use txbus::{Context, Entity, EventBus, EventSettings, ListenerError, persist};

use super::backends::{BenchBackend, bulk_backlog_keyed};
use super::later::idle_statements;
use super::scenarios::{create_users, drain_here, drain_two, fan_out, next_user, pool_for, settle};
use super::scheduled::due_to_start;
use super::{Args, BenchUser, Recorder, Row};
use crate::support::backends::exec;

/// [`super::UserCreated`] with an ordering key (none for the unkeyed baseline).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyedUser {
    pub id: i64,
    pub email: String,
    pub padding: String,
    pub key: Option<String>,
}

impl txbus::Event for KeyedUser {
    const NAME: &'static str = "bench.keyed_user";

    fn ordering_key(&self) -> Option<String> {
        self.key.clone()
    }
}

/// The key whose listener always fails.
const STUCK: &str = "stuck";

#[txbus::listener(name = "bench.keyed_noop")]
async fn keyed_noop(event: KeyedUser, ctx: Context) -> Result<(), ListenerError> {
    if event.key.as_deref() == Some(STUCK) {
        return Err("this key's head always fails".into());
    }
    ctx.state::<Arc<Recorder>>()?
        .runs
        .fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// How the events of a measurement are keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keys {
    None,
    /// A key of its own per event.
    Distinct,
    /// One key per emitting task (16 tasks: 16 hot keys).
    PerEmitter,
}

pub async fn k1<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    let mut rows = emit::<B>(args).await;
    rows.extend(drain::<B>(args).await);
    rows.push(held::<B>(args).await);
    rows.extend(idle::<B>(args).await);
    rows
}

/// E1 with keyed events: `emit` with one `persist`, until the no-op listener ran and its result
/// is written; baseline: the same without a key. The three kinds rotate their order per round.
async fn emit<B: BenchBackend>(args: &Args) -> Vec<Row>
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
        let mut distinct = Row {
            backend: B::NAME,
            scenario: "K1 keyed emit",
            case: format!("{clients} emitters, a key per event"),
            unit: "events/s",
            txbus: Vec::new(),
            baseline: Vec::new(),
            baseline_name: "unkeyed emit (E1)",
            lower_is_better: false,
        };
        let mut hot = Row {
            case: format!("{clients} emitters, {clients} hot keys (one per emitter)"),
            ..distinct.clone()
        };
        for round in 0..args.rounds {
            for turn in 0..3 {
                let keys = [Keys::None, Keys::Distinct, Keys::PerEmitter][(round + turn) % 3];
                let n = args.events;
                let target = recorder.runs.load(Ordering::Relaxed) + n as u64;
                let started = Instant::now();
                let emitter = Arc::new(AtomicUsize::new(0));
                fan_out(clients, n, |count| {
                    let bus = bus.clone();
                    let payload = args.payload;
                    let emitter = emitter.fetch_add(1, Ordering::Relaxed);
                    async move {
                        for _ in 0..count {
                            let (user, event) = next_user(payload);
                            let key = match keys {
                                Keys::None => None,
                                Keys::Distinct => Some(user.id.to_string()),
                                Keys::PerEmitter => Some(format!("emitter-{emitter}")),
                            };
                            let event = KeyedUser {
                                id: event.id,
                                email: event.email,
                                padding: event.padding,
                                key,
                            };
                            bus.emit(event, [persist(&user)]).await.unwrap();
                        }
                    }
                })
                .await;
                settle(&bus, &recorder, target).await;
                let rate = n as f64 / started.elapsed().as_secs_f64();
                match keys {
                    Keys::None => {
                        distinct.baseline.push(rate);
                        hot.baseline.push(rate);
                    }
                    Keys::Distinct => distinct.txbus.push(rate),
                    Keys::PerEmitter => hot.txbus.push(rate),
                }
            }
        }
        rows.push(distinct);
        rows.push(hot);
    }
    bus.shutdown().await;
    rows
}

/// D1 over 1,000 keys: the poller drains a backlog of `args.backlog` keyed deliveries (tuned as
/// D1's bus), in one process and in two; baseline: D1's unkeyed drain, measured alternately.
async fn drain<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    const KEYS: usize = 1000;
    let n = args.backlog;
    let payload = args.backlog_payload();
    let mut one = Row {
        backend: B::NAME,
        scenario: "K1 keyed drain",
        case: format!("{n} backlog over {KEYS} keys, 1 process"),
        unit: "deliveries/s",
        txbus: Vec::new(),
        baseline: Vec::new(),
        baseline_name: "unkeyed drain (D1)",
        lower_is_better: false,
    };
    let mut two = Row {
        case: format!("{n} backlog over {KEYS} keys, 2 processes"),
        ..one.clone()
    };
    for round in 0..args.rounds {
        for keyed in [round % 2 == 0, round % 2 == 1] {
            let keys = keyed.then_some(KEYS);
            let (rate_one, rate_two) = (
                drain_here::<B>(n, &payload, true, keys).await,
                drain_two::<B>(n, &payload, keys).await,
            );
            if keyed {
                one.txbus.push(rate_one);
                two.txbus.push(rate_two);
            } else {
                one.baseline.push(rate_one);
                two.baseline.push(rate_two);
            }
        }
    }
    vec![one, two]
}

/// 1,000 events (at most `args.backlog`) over 100 keys from 16 emitters, until each ran and its result is written, while
/// another key's head fails every 20 ms (with 10 events held behind it); baseline: the same
/// without the failing key.
async fn held<B: BenchBackend>(args: &Args) -> Row
where
    BenchUser: Entity<B>,
{
    let events = args.backlog.min(1000);
    let mut row = Row {
        backend: B::NAME,
        scenario: "K1 held key",
        case: format!("{events} events over 100 keys, 16 emitters, one key's head failing"),
        unit: "events/s",
        txbus: Vec::new(),
        baseline: Vec::new(),
        baseline_name: "no failing key",
        lower_is_better: false,
    };
    for round in 0..args.rounds {
        for stuck in [round % 2 == 0, round % 2 == 1] {
            let db = B::open().await;
            let pool = pool_for::<B>(&db.url, 24).await;
            create_users(&pool).await;
            let recorder = Arc::new(Recorder::default());
            let bus = EventBus::builder(pool.clone())
                .state(recorder.clone())
                .event::<KeyedUser>(
                    EventSettings::default()
                        .retry_after(Duration::from_millis(20))
                        .max_attempts(1_000_000),
                )
                .build()
                .await
                .unwrap();
            let payload = args.payload;
            let keyed = move |key: String| {
                let (user, event) = next_user(payload);
                let event = KeyedUser {
                    id: event.id,
                    email: event.email,
                    padding: event.padding,
                    key: Some(key),
                };
                (user, event)
            };
            if stuck {
                for _ in 0..10 {
                    let (user, event) = keyed(STUCK.to_owned());
                    bus.emit(event, [persist(&user)]).await.unwrap();
                }
            }
            let started = Instant::now();
            fan_out(16, events, |count| {
                let bus = bus.clone();
                async move {
                    for _ in 0..count {
                        let (user, event) = keyed(String::new());
                        let key = Some(format!("k{}", user.id % 100));
                        let event = KeyedUser { key, ..event };
                        bus.emit(event, [persist(&user)]).await.unwrap();
                    }
                }
            })
            .await;
            // Not `settle`: the failing key's deliveries never finish.
            let deadline = Instant::now() + Duration::from_secs(600);
            while recorder.runs.load(Ordering::Relaxed) < events as u64 {
                assert!(Instant::now() < deadline, "deliveries did not all run");
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            // Until every result is written: only the held key's deliveries are left.
            let held = if stuck { 10 } else { 0 };
            while bus.stats().await.unwrap().total.pending() > held {
                assert!(Instant::now() < deadline, "results were not all written");
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            let rate = events as f64 / started.elapsed().as_secs_f64();
            bus.shutdown().await;
            if stuck {
                row.txbus.push(rate);
            } else {
                row.baseline.push(rate);
            }
        }
    }
    row
}

/// An idle bus (polling every 100 ms) on a table where 1,000 keys are each held by a dead
/// letter (`block_key_on_dead`) with 99 deliveries due behind it (`args.backlog` in all), against the same bus on an
/// empty table: statements per second while idle, and the time from a delivery written
/// elsewhere falling due to its listener's start.
async fn idle<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    let keys = args.backlog.div_ceil(100).min(1000);
    let behind = args.backlog / keys;
    let empty = B::open().await;
    txbus::migrate(&empty.pool).await.unwrap();
    let full = B::open().await;
    txbus::migrate(&full.pool).await.unwrap();
    bulk_backlog_keyed::<B>(
        &full.pool,
        keys * behind,
        r#"{"padding":""}"#,
        0,
        Some(keys),
    )
    .await;
    exec(
        &full.pool,
        &format!(
            "UPDATE txbus_deliveries SET dead_at = {}, key_hold = (1 = 1) WHERE event_id IN \
             (SELECT id FROM (SELECT min(event_id) AS id FROM txbus_deliveries \
              GROUP BY ordering_key) heads)",
            B::now_plus(0)
        ),
    )
    .await;
    if let Some(analyze) = B::ANALYZE {
        exec(&full.pool, analyze).await;
    }
    let held = B::count(
        &full.pool,
        "SELECT count(*) AS n FROM txbus_deliveries WHERE dead_at IS NOT NULL",
    )
    .await;
    assert_eq!(held, keys as i64);
    let every = Duration::from_millis(100);
    let counted = B::statements(&empty.pool).await.is_some();
    let mut statements = Row {
        backend: B::NAME,
        scenario: "K1 idle bus",
        case: format!(
            "{keys} held keys, {} due behind them; retry_every 100 ms",
            keys * (behind - 1)
        ),
        unit: "statements/s",
        txbus: Vec::new(),
        baseline: Vec::new(),
        baseline_name: "same bus, empty table",
        lower_is_better: true,
    };
    let mut started = Row {
        case: format!(
            "{keys} held keys, {} due behind them; due → start, p50 of 20",
            keys * (behind - 1)
        ),
        unit: "ms",
        ..statements.clone()
    };
    for round in 0..args.rounds {
        for with_rows in [round % 2 == 0, round % 2 == 1] {
            let db = if with_rows { &full } else { &empty };
            let rate = if counted {
                idle_statements::<B>(&db.url, every, true, args.idle).await
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
    let left = B::count(&full.pool, "SELECT count(*) AS n FROM txbus_deliveries").await;
    assert_eq!(
        left,
        (keys * behind) as i64,
        "nothing behind a held key ran"
    );
    if counted {
        vec![statements, started]
    } else {
        vec![started]
    }
}
