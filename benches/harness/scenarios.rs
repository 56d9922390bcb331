//! The scenarios. Each returns result rows; each checks its own invariants (every event
//! delivered, nothing run twice) and panics when they do not hold.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use diesel_async::AsyncConnection;
use tracing::Instrument;
use txbus::{Entity, EventBus, Pool, persist};

use super::backends::{BenchBackend, bulk_backlog, bulk_backlog_keyed};
use super::{Args, BenchUser, Recorder, Row, UserCreated};
use crate::support::TestBackend;
use crate::support::backends::exec;

static NEXT_ID: AtomicI64 = AtomicI64::new(1);

pub fn next_user(payload: usize) -> (BenchUser, UserCreated) {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let email = format!("user-{id}@example.com");
    let event = UserCreated {
        id,
        email: email.clone(),
        padding: "x".repeat(payload.saturating_sub(60)),
    };
    (BenchUser { id, email }, event)
}

pub async fn pool_for<B: TestBackend>(url: &str, size: usize) -> Pool<B> {
    Pool::builder(url).max_size(size).connect().await.unwrap()
}

pub async fn create_users<B: TestBackend>(pool: &Pool<B>) {
    exec(
        pool,
        "CREATE TABLE bench_users (id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL)",
    )
    .await;
}

/// Waits until `recorder` counted `target` runs and the bus wrote every result.
pub async fn settle<B: TestBackend>(bus: &EventBus<B>, recorder: &Recorder, target: u64) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while recorder.runs.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < deadline, "deliveries did not all run");
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    bus.wait_idle().await;
    assert_eq!(
        recorder.runs.load(Ordering::Relaxed),
        target,
        "a delivery ran twice"
    );
}

pub async fn run<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
    super::BenchPayload: Entity<B>,
{
    let mut rows = Vec::new();
    for scenario in &args.scenarios {
        eprintln!("[{}] {scenario}", B::NAME);
        match scenario.as_str() {
            "E1" => rows.extend(e1::<B>(args).await),
            "E2" => rows.extend(e2::<B>(args).await),
            "E3" => rows.extend(super::fanout::e3::<B>(args).await),
            "L1" => rows.extend(l1::<B>(args).await),
            "L2" => rows.extend(super::later::l2::<B>(args).await),
            "L3" => rows.extend(super::later::l3::<B>(args).await),
            "D1" => rows.extend(d1::<B>(args).await),
            "M1" => rows.extend(m1::<B>(args).await),
            "S1" => rows.extend(s1::<B>(args).await),
            "T1" => rows.extend(super::scheduled::t1::<B>(args).await),
            "K1" => rows.extend(super::keyed::k1::<B>(args).await),
            #[cfg(feature = "nats")]
            "N1" => rows.extend(super::nats::n1::<B>(args).await),
            #[cfg(feature = "web")]
            "W1" => rows.extend(super::web::w1::<B>(args).await),
            other => panic!("unknown scenario {other}"),
        }
    }
    rows
}

/// E1: emit with one `persist` and one no-op listener, until the listener ran and its result is
/// written; baselines: the same `persist` in a plain diesel-async transaction, and alone in
/// autocommit (one statement, no `BEGIN` or `COMMIT`). Each round runs the three in a rotated
/// order; the two rows share the bus's figures.
async fn e1<B: BenchBackend>(args: &Args) -> Vec<Row>
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
        let mut in_tx = Row {
            backend: B::NAME,
            scenario: "E1 emit end-to-end",
            case: format!("{clients} emitters"),
            unit: "events/s",
            txbus: Vec::new(),
            baseline: Vec::new(),
            baseline_name: "plain insert tx",
            lower_is_better: false,
        };
        let mut autocommit = Row {
            baseline_name: "plain insert, autocommit",
            ..in_tx.clone()
        };
        for round in 0..args.rounds {
            for turn in 0..3 {
                let n = args.events;
                let started = Instant::now();
                match (round + turn) % 3 {
                    0 => {
                        let target = recorder.runs.load(Ordering::Relaxed) + n as u64;
                        fan_out(clients, n, |count| {
                            let bus = bus.clone();
                            let payload = args.payload;
                            let otel = args.otel;
                            async move {
                                for _ in 0..count {
                                    let (user, event) = next_user(payload);
                                    let emit = async { bus.emit(event, [persist(&user)]).await };
                                    if otel {
                                        // The request an emit serves, as a service has one.
                                        emit.instrument(tracing::info_span!("request"))
                                            .await
                                            .unwrap();
                                    } else {
                                        emit.await.unwrap();
                                    }
                                }
                            }
                        })
                        .await;
                        settle(&bus, &recorder, target).await;
                        let rate = n as f64 / started.elapsed().as_secs_f64();
                        in_tx.txbus.push(rate);
                        autocommit.txbus.push(rate);
                    }
                    baseline => {
                        let in_transaction = baseline == 1;
                        fan_out(clients, n, |count| {
                            let pool = pool.clone();
                            let payload = args.payload;
                            async move {
                                for _ in 0..count {
                                    let (user, _) = next_user(payload);
                                    let mut conn = pool.get().await.unwrap();
                                    if in_transaction {
                                        conn.transaction(async |c| {
                                            <BenchUser as Entity<B>>::persist(&user, c).await
                                        })
                                        .await
                                        .unwrap();
                                    } else {
                                        <BenchUser as Entity<B>>::persist(&user, &mut conn)
                                            .await
                                            .unwrap();
                                    }
                                }
                            }
                        })
                        .await;
                        let row = if in_transaction {
                            &mut in_tx
                        } else {
                            &mut autocommit
                        };
                        row.baseline
                            .push(n as f64 / started.elapsed().as_secs_f64());
                    }
                }
            }
        }
        rows.push(in_tx);
        rows.push(autocommit);
    }
    bus.shutdown().await;
    rows
}

/// Runs `work(count)` on `clients` tasks that share `n` items, and waits for all of them.
pub async fn fan_out<F, Fut>(clients: usize, n: usize, work: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let count = n / clients + usize::from(i < n % clients);
            tokio::spawn(work(count))
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// E2: 100 events in one transaction, each with its entity written beside it; baseline: the
/// same entity writes in one plain transaction.
async fn e2<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    const PER_TRANSACTION: usize = 100;
    let db = B::open().await;
    let pool = pool_for::<B>(&db.url, 8).await;
    create_users(&pool).await;
    let recorder = Arc::new(Recorder::default());
    let bus = EventBus::builder(pool.clone())
        .state(recorder.clone())
        .build()
        .await
        .unwrap();
    let mut row = Row {
        backend: B::NAME,
        scenario: "E2 batch emit",
        case: format!("{PER_TRANSACTION} events per transaction"),
        unit: "events/s",
        txbus: Vec::new(),
        baseline: Vec::new(),
        baseline_name: "plain inserts in 1 tx",
        lower_is_better: false,
    };
    let transactions = args.batch_transactions;
    let n = transactions * PER_TRANSACTION;
    for round in 0..args.rounds {
        for bus_first in [round % 2 == 1, round % 2 == 0] {
            let started = Instant::now();
            if bus_first {
                let target = recorder.runs.load(Ordering::Relaxed) + n as u64;
                for _ in 0..transactions {
                    let batch: Vec<_> = (0..PER_TRANSACTION)
                        .map(|_| next_user(args.payload))
                        .collect();
                    bus.transaction(async |tx| {
                        for (user, event) in &batch {
                            <BenchUser as Entity<B>>::persist(user, tx.conn()).await?;
                            tx.emit(event).await?;
                        }
                        Ok::<_, txbus::Error>(())
                    })
                    .await
                    .unwrap();
                }
                settle(&bus, &recorder, target).await;
                row.txbus.push(n as f64 / started.elapsed().as_secs_f64());
            } else {
                for _ in 0..transactions {
                    let batch: Vec<_> = (0..PER_TRANSACTION)
                        .map(|_| next_user(args.payload).0)
                        .collect();
                    let mut conn = pool.get().await.unwrap();
                    conn.transaction(async |c| {
                        for user in &batch {
                            <BenchUser as Entity<B>>::persist(user, c).await?;
                        }
                        diesel::QueryResult::Ok(())
                    })
                    .await
                    .unwrap();
                }
                row.baseline
                    .push(n as f64 / started.elapsed().as_secs_f64());
            }
        }
    }
    bus.shutdown().await;
    vec![row]
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1e6
}

/// L1: from the commit to the start of the listener, in this process; baseline: a tokio channel
/// hand-off between tasks, the floor of any in-process dispatch.
async fn l1<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    let db = B::open().await;
    let levels: Vec<usize> = [1, 16]
        .into_iter()
        .filter(|c| args.concurrency.iter().any(|x| x >= c))
        .collect();
    let pool = pool_for::<B>(&db.url, 24).await;
    let recorder = Arc::new(Recorder::default());
    let bus = EventBus::builder(pool.clone())
        .state(recorder.clone())
        .build()
        .await
        .unwrap();
    let mut rows = Vec::new();
    for clients in levels {
        let mut by_stat: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
            ("p50", Vec::new(), Vec::new()),
            ("p99", Vec::new(), Vec::new()),
            ("max", Vec::new(), Vec::new()),
        ];
        for _ in 0..args.rounds {
            recorder.waits.lock().unwrap().clear();
            let n = args.events;
            let target = recorder.runs.load(Ordering::Relaxed) + n as u64;
            fan_out(clients, n, |count| {
                let bus = bus.clone();
                let payload = args.payload;
                async move {
                    for _ in 0..count {
                        bus.emit(next_user(payload).1, []).await.unwrap();
                    }
                }
            })
            .await;
            settle(&bus, &recorder, target).await;
            let mut waits = std::mem::take(&mut *recorder.waits.lock().unwrap());
            waits.sort();
            let mut floor = handoff_latencies(clients, n).await;
            floor.sort();
            for (stat, txbus, baseline) in &mut by_stat {
                let p = match *stat {
                    "p50" => 0.5,
                    "p99" => 0.99,
                    _ => 1.0,
                };
                txbus.push(percentile(&waits, p));
                baseline.push(percentile(&floor, p));
            }
        }
        for (stat, txbus, baseline) in by_stat {
            rows.push(Row {
                backend: B::NAME,
                scenario: "L1 commit → listener start",
                case: format!("{clients} emitters, {stat}"),
                unit: "µs",
                txbus,
                baseline,
                baseline_name: "tokio channel hand-off",
                lower_is_better: true,
            });
        }
    }
    bus.shutdown().await;
    rows
}

/// Latencies of `n` hand-offs of an `Instant` from `clients` sending tasks to one receiver.
async fn handoff_latencies(clients: usize, n: usize) -> Vec<Duration> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Instant>(1024);
    let receiver = tokio::spawn(async move {
        let mut waits = Vec::with_capacity(n);
        while let Some(sent) = rx.recv().await {
            waits.push(sent.elapsed());
        }
        waits
    });
    fan_out(clients, n, |count| {
        let tx = tx.clone();
        async move {
            for _ in 0..count {
                tx.send(Instant::now()).await.unwrap();
                tokio::task::yield_now().await;
            }
        }
    })
    .await;
    drop(tx);
    receiver.await.unwrap()
}

/// The bus D1 and M1 drain with: polls every 50 ms, claims of 1,000 and 1,000 listeners at once.
pub fn drain_bus<B: TestBackend>(
    pool: Pool<B>,
    recorder: Arc<Recorder>,
) -> txbus::EventBusBuilder<B> {
    EventBus::builder(pool)
        .state(recorder)
        .retry_every(Duration::from_millis(50))
        .max_events_per_retry(1000)
        .max_concurrent_listeners(1000)
}

/// Drains a backlog with one bus in this process (tuned as [`drain_bus`], or with the builder's
/// defaults), checks that every delivery ran once, and returns deliveries per second.
pub async fn drain_here<B: BenchBackend>(
    n: usize,
    payload: &str,
    tuned: bool,
    keys: Option<usize>,
) -> f64
where
    BenchUser: Entity<B>,
{
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    bulk_backlog_keyed::<B>(&db.pool, n, payload, 0, keys).await;
    let pool = pool_for::<B>(&db.url, 8).await;
    let recorder = Arc::new(Recorder::default());
    let started = Instant::now();
    let builder = if tuned {
        drain_bus(pool.clone(), recorder.clone())
    } else {
        EventBus::builder(pool.clone()).state(recorder.clone())
    };
    let bus = builder.build().await.unwrap();
    settle(&bus, &recorder, n as u64).await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    assert_eq!(deliveries_left(&pool).await, 0);
    let seen: HashSet<i64> = recorder.seen.lock().unwrap().iter().copied().collect();
    assert_eq!(seen.len(), n, "every delivery ran once");
    bus.shutdown().await;
    rate
}

/// Whether any delivery is left (1) or none (0), stopping at the first row found.
const ANY_LEFT: &str =
    "SELECT count(*) AS n FROM (SELECT 1 AS one FROM txbus_deliveries LIMIT 1) t";

pub async fn deliveries_left<B: TestBackend>(pool: &Pool<B>) -> i64 {
    B::count(pool, "SELECT count(*) AS n FROM txbus_deliveries").await
}

/// D1: the poller drains a backlog left as after a crash, in one process and in two; baseline:
/// the same rows claimed and deleted with plain SQL in batches of 1000.
async fn d1<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    let n = args.backlog;
    let payload = args.backlog_payload();
    let mut one = Row {
        backend: B::NAME,
        scenario: "D1 poller drain",
        case: format!("{n} backlog, 1 process"),
        unit: "deliveries/s",
        txbus: Vec::new(),
        baseline: Vec::new(),
        baseline_name: "plain SKIP LOCKED delete",
        lower_is_better: false,
    };
    let mut two = Row {
        case: format!("{n} backlog, 2 processes"),
        ..one.clone()
    };
    let mut defaults = Row {
        case: format!("{n} backlog, 1 process, default settings"),
        ..one.clone()
    };
    for round in 0..args.rounds {
        // The bus's phases and the baseline, in one order and then in the other.
        let phases = if round % 2 == 0 {
            [0, 1, 2, 3]
        } else {
            [3, 2, 1, 0]
        };
        for phase in phases {
            match phase {
                0 => {
                    let rate = drain_plain::<B>(n, &payload).await;
                    for row in [&mut one, &mut two, &mut defaults] {
                        row.baseline.push(rate);
                    }
                }
                1 => one
                    .txbus
                    .push(drain_here::<B>(n, &payload, true, None).await),
                2 => defaults
                    .txbus
                    .push(drain_here::<B>(n, &payload, false, None).await),
                _ => two.txbus.push(drain_two::<B>(n, &payload, None).await),
            }
        }
    }
    // Whether a second instance slows the drain is a question about pairs: each round's two
    // drains ran a few seconds apart.
    let ratios: Vec<String> = (two.txbus.iter().zip(&one.txbus))
        .map(|(two, one)| format!("{:.2}", two / one))
        .collect();
    eprintln!(
        "[{}] D1 2 processes ÷ 1 process, per round: {}",
        B::NAME,
        ratios.join(" ")
    );
    vec![one, two, defaults]
}

/// The plain-SQL drain of a backlog of `n`; deliveries per second.
async fn drain_plain<B: BenchBackend>(n: usize, payload: &str) -> f64
where
    BenchUser: Entity<B>,
{
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    bulk_backlog::<B>(&db.pool, n, payload).await;
    let started = Instant::now();
    fan_out(B::DRAINERS, B::DRAINERS, |_| {
        let pool = db.pool.clone();
        async move { while B::raw_drain(&pool, 1000).await > 0 {} }
    })
    .await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    assert_eq!(deliveries_left(&db.pool).await, 0);
    rate
}

/// Drains a backlog of `n` with two child processes, checks that they split it and that
/// nothing ran twice; deliveries per second.
pub async fn drain_two<B: BenchBackend>(n: usize, payload: &str, keys: Option<usize>) -> f64
where
    BenchUser: Entity<B>,
{
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    bulk_backlog_keyed::<B>(&db.pool, n, payload, 0, keys).await;
    let dir = std::env::temp_dir();
    let outs: Vec<_> = (0..2)
        .map(|i| dir.join(format!("txbus-bench-{}-{i}.ids", std::process::id())))
        .collect();
    let mut children: Vec<_> = outs
        .iter()
        .map(|out| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--child",
                    "drain",
                    B::NAME,
                    &db.url,
                    &n.to_string(),
                    out.to_str().unwrap(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // The clock starts when both children have connected, as `drain_here`'s starts after its
    // pool: what is timed is the two buses' build and drain, not starting processes.
    for child in &mut children {
        let mut ready = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready", "a draining child did not start");
    }
    let started = Instant::now();
    for child in &mut children {
        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    }
    // This process watches the table, with a query that stops at the first row left, so
    // that the children spend nothing on it; closing their input tells them to stop.
    let deadline = Instant::now() + Duration::from_secs(600);
    while B::count(&db.pool, ANY_LEFT).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the two processes did not drain the backlog"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    for mut child in children {
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success(), "a draining child failed");
    }
    let mut all = Vec::new();
    let mut shares = Vec::new();
    for out in &outs {
        let ids: Vec<i64> = std::fs::read_to_string(out)
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.parse().unwrap())
            .collect();
        shares.push(ids.len());
        all.extend(ids);
        let _ = std::fs::remove_file(out);
    }
    let distinct: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(
        all.len(),
        n,
        "no delivery ran twice across the two processes: {shares:?}"
    );
    assert_eq!(distinct.len(), n, "every delivery ran");
    eprintln!(
        "[{}] D1 two processes shared the backlog {shares:?}",
        B::NAME
    );
    drop(db);
    rate
}

/// S1: `bus.stats()` on a table of pending deliveries, at the D1 and M1 backlog sizes; baseline:
/// a plain `count(*)` of the same table, the least any count by state could cost.
async fn s1<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    let payload = args.backlog_payload();
    let mut rows = Vec::new();
    for n in [args.backlog, args.memory_backlog] {
        let db = B::open().await;
        txbus::migrate(&db.pool).await.unwrap();
        bulk_backlog::<B>(&db.pool, n, &payload).await;
        let bus = EventBus::builder(db.pool.clone())
            .poller(false)
            .build()
            .await
            .unwrap();
        let mut row = Row {
            backend: B::NAME,
            scenario: "S1 stats",
            case: format!("{n} pending deliveries"),
            unit: "ms",
            txbus: Vec::new(),
            baseline: Vec::new(),
            baseline_name: "plain count(*)",
            lower_is_better: true,
        };
        // One untimed pass of each warms the cache.
        bus.stats().await.unwrap();
        deliveries_left(&db.pool).await;
        for _ in 0..args.rounds.max(5) {
            let started = Instant::now();
            let stats = bus.stats().await.unwrap();
            row.txbus.push(started.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(
                stats.total.pending(),
                n as u64,
                "stats counted every delivery"
            );
            let started = Instant::now();
            let counted = deliveries_left(&db.pool).await;
            row.baseline.push(started.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(counted, n as i64);
        }
        bus.shutdown().await;
        rows.push(row);
    }
    rows
}

/// M1: peak memory of a process draining a large backlog, and of one under an emit overload;
/// baseline: the same process idle, right after its bus started.
async fn m1<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    let payload = args.backlog_payload();
    let mut rows = Vec::new();
    for backlog in [args.memory_backlog / 10, args.memory_backlog] {
        let db = B::open().await;
        txbus::migrate(&db.pool).await.unwrap();
        bulk_backlog::<B>(&db.pool, backlog, &payload).await;
        let (idle, peak) = measure_child::<B>("memory-drain", &db.url, backlog);
        rows.push(memory_row(
            B::NAME,
            format!("drain {backlog} backlog"),
            idle,
            peak,
        ));
    }
    let db = B::open().await;
    create_users(&db.pool).await;
    let (idle, peak) = measure_child::<B>("memory-overload", &db.url, args.overload);
    rows.push(memory_row(
        B::NAME,
        format!("{} emits, slow listener", args.overload),
        idle,
        peak,
    ));
    rows
}

fn memory_row(backend: &'static str, case: String, idle_kib: f64, peak_kib: f64) -> Row {
    Row {
        backend,
        scenario: "M1 peak RSS",
        case,
        unit: "MiB",
        txbus: vec![peak_kib / 1024.0],
        baseline: vec![idle_kib / 1024.0],
        baseline_name: "same process idle",
        lower_is_better: true,
    }
}

/// Runs a memory child and returns its (idle, peak) RSS in KiB.
fn measure_child<B: TestBackend>(mode: &str, url: &str, n: usize) -> (f64, f64) {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--child", mode, B::NAME, url, &n.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "the {mode} child failed");
    let text = String::from_utf8(output.stdout).unwrap();
    let numbers: Vec<f64> = text
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    (numbers[0], numbers[1])
}

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The child processes of D1 and M1: `--child <mode> <backend> <url> <n> [out]`.
pub fn child(args: &[String]) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (mode, backend, url, n) = (
        &args[0],
        &args[1],
        args[2].clone(),
        args[3].parse::<usize>().unwrap(),
    );
    let out = args.get(4).cloned();
    match backend.as_str() {
        #[cfg(feature = "postgres")]
        "postgres" => runtime.block_on(child_run::<txbus::Postgres>(mode, url, n, out)),
        #[cfg(feature = "mysql")]
        "mysql" => runtime.block_on(child_run::<txbus::Mysql>(mode, url, n, out)),
        #[cfg(feature = "sqlite")]
        "sqlite" => runtime.block_on(child_run::<txbus::Sqlite>(mode, url, n, out)),
        other => panic!("unknown backend {other}"),
    }
    ExitCode::SUCCESS
}

async fn child_run<B: BenchBackend>(mode: &str, url: String, n: usize, out: Option<String>)
where
    BenchUser: Entity<B>,
{
    let pool = pool_for::<B>(&url, 24).await;
    let recorder = Arc::new(Recorder::default());
    recorder.quiet.store(mode != "drain", Ordering::Relaxed);
    match mode {
        "hold" => super::later::hold::<B>(&url, n).await,
        "drain" => {
            // Connected: the parent starts its clock, and tells us to build the bus.
            println!("ready");
            let go = tokio::task::spawn_blocking(|| {
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line).map(|_| line)
            });
            assert_eq!(go.await.unwrap().unwrap().trim(), "go");
            let bus = drain_bus(pool.clone(), recorder.clone())
                .run_migrations(false)
                .build()
                .await
                .unwrap();
            // Run until the parent, which watches the shared backlog, closes our input; then
            // report what ran here.
            tokio::task::spawn_blocking(|| {
                std::io::copy(&mut std::io::stdin(), &mut std::io::sink())
            })
            .await
            .unwrap()
            .unwrap();
            bus.wait_idle().await;
            bus.shutdown().await;
            let ids: Vec<String> = recorder
                .seen
                .lock()
                .unwrap()
                .iter()
                .map(|id| format!("{id}\n"))
                .collect();
            std::fs::write(out.unwrap(), ids.concat()).unwrap();
        }
        "memory-drain" => {
            let bus = drain_bus(pool.clone(), recorder.clone()).run_migrations(false);
            let idle = status_kib("VmRSS:");
            reset_peak();
            let bus = bus.build().await.unwrap();
            settle(&bus, &recorder, n as u64).await;
            assert_eq!(deliveries_left(&pool).await, 0);
            println!("{idle} {}", status_kib("VmHWM:"));
            bus.shutdown().await;
        }
        "memory-overload" => {
            *recorder.work.lock().unwrap() = Duration::from_millis(2);
            let bus = EventBus::builder(pool.clone())
                .state(recorder.clone())
                .build()
                .await
                .unwrap();
            let idle = status_kib("VmRSS:");
            reset_peak();
            fan_out(16, n, |count| {
                let bus = bus.clone();
                async move {
                    for _ in 0..count {
                        let (user, event) = next_user(256);
                        bus.emit(event, [persist(&user)]).await.unwrap();
                    }
                }
            })
            .await;
            settle(&bus, &recorder, n as u64).await;
            println!("{idle} {}", status_kib("VmHWM:"));
            bus.shutdown().await;
        }
        other => panic!("unknown child mode {other}"),
    }
}

/// Resets the peak RSS of this process (`VmHWM`) to its current RSS.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}
