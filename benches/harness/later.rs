//! Work that runs later than its emit: L2, the takeover of deliveries whose process was killed;
//! L3, from the time a delivery waiting in the table falls due to its listener's start, and what
//! polling costs the database while idle.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use txbus::{Entity, EventBus, EventSettings};

use super::backends::{BenchBackend, bulk_backlog_due};
use super::scenarios::{create_users, pool_for, settle};
use super::{Args, BenchUser, RETRY_AFTER, Recorder, Retried, Row, UserCreated};

/// The lease (`max_execution_time`) of L2's deliveries.
pub const L2_LEASE: Duration = Duration::from_secs(2);

/// The builder's default `retry_every`, which L2 and L3 run with.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// The settings of the events L2's killed process emits.
pub fn l2_settings() -> EventSettings {
    EventSettings::default().max_execution_time(L2_LEASE)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// Rows p50, p99 and max of per-round samples, against a target.
fn quantile_rows(
    backend: &'static str,
    scenario: &'static str,
    case: &str,
    rounds: &[Vec<f64>],
    target: f64,
    target_name: &'static str,
) -> Vec<Row> {
    [("p50", 0.5), ("p99", 0.99), ("max", 1.0)]
        .into_iter()
        .map(|(stat, p)| Row {
            backend,
            scenario,
            case: format!("{case}, {stat}"),
            unit: "ms",
            txbus: rounds.iter().map(|r| percentile(r, p)).collect(),
            baseline: vec![target; rounds.len()],
            baseline_name: target_name,
            lower_is_better: true,
        })
        .collect()
}

/// L2: a process runs deliveries whose listener never finishes and is killed (`SIGKILL`); a bus
/// in this process, started before, takes them over. Measured: from the kill to each
/// delivery's start here, against `max_execution_time` + `retry_every` + 100 ms.
pub async fn l2<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    let held = args.later / 2;
    let mut rounds = Vec::new();
    for _ in 0..args.rounds {
        let db = B::open().await;
        txbus::migrate(&db.pool).await.unwrap();
        create_users(&db.pool).await;
        let recorder = Arc::new(Recorder::default());
        let bus = EventBus::builder(pool_for::<B>(&db.url, 8).await)
            .state(recorder.clone())
            .event::<UserCreated>(l2_settings())
            .build()
            .await
            .unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--child", "hold", B::NAME, &db.url, &held.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let ready = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(ready.trim(), "running", "the holding child did not start");
        child.kill().unwrap();
        let killed = Instant::now();
        child.wait().unwrap();
        settle(&bus, &recorder, held as u64).await;
        let mut taken: Vec<f64> = recorder
            .starts
            .lock()
            .unwrap()
            .iter()
            .map(|(_, start)| ms(start.saturating_duration_since(killed)))
            .collect();
        taken.sort_by(f64::total_cmp);
        assert_eq!(taken.len(), held, "every held delivery ran once here");
        rounds.push(taken);
        bus.shutdown().await;
    }
    quantile_rows(
        B::NAME,
        "L2 takeover after kill -9",
        &format!("{held} running, lease {} s", L2_LEASE.as_secs()),
        &rounds,
        ms(L2_LEASE + RETRY_EVERY + Duration::from_millis(100)),
        "target: lease + retry_every + 100 ms",
    )
}

/// The held side of L2, in a child process: emits `n` events whose listener runs until the
/// process is killed, says `running` once every run started, and waits.
pub async fn hold<B: BenchBackend>(url: &str, n: usize)
where
    BenchUser: Entity<B>,
{
    let recorder = Arc::new(Recorder::default());
    *recorder.work.lock().unwrap() = Duration::from_secs(3600);
    let bus = EventBus::builder(pool_for::<B>(url, 8).await)
        .state(recorder.clone())
        .event::<UserCreated>(l2_settings())
        // Every run starts at once, and is still running when the process is killed.
        .max_concurrent_listeners(2 * n)
        .run_migrations(false)
        .build()
        .await
        .unwrap();
    for _ in 0..n {
        let (user, event) = super::scenarios::next_user(64);
        bus.emit(event, [txbus::persist(&user)]).await.unwrap();
    }
    while recorder.started.load(Ordering::Relaxed) < n as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("running");
    std::future::pending::<()>().await;
}

/// L3: deliveries that wait in the table, with the default `retry_every` (1 s): retries this
/// process wrote (from the end of the failed run plus the retry delay to the retry's start;
/// the delay's jitter, up to 2 ms, counts as lateness), and deliveries written elsewhere that
/// fall due a second after their write (from that second to the start). Then what polling
/// costs the database while the bus is idle, by `retry_every`.
pub async fn l3<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    let target = ms(RETRY_EVERY / 2 + Duration::from_millis(5));
    let target_name = "target: retry_every / 2 + 5 ms";
    let n = args.later;
    let group = n / 5;
    let mut own = Vec::new();
    let mut elsewhere = Vec::new();
    for _ in 0..args.rounds {
        let db = B::open().await;
        let recorder = Arc::new(Recorder::default());
        let bus = EventBus::builder(pool_for::<B>(&db.url, 8).await)
            .state(recorder.clone())
            .event::<Retried>(EventSettings::default().retry_after(RETRY_AFTER))
            .build()
            .await
            .unwrap();
        for n in 0..n as u64 {
            bus.emit(Retried { n }, []).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        settle(&bus, &recorder, n as u64).await;
        let mut late: Vec<f64> = recorder
            .late
            .lock()
            .unwrap()
            .iter()
            .map(|d| ms(*d))
            .collect();
        late.sort_by(f64::total_cmp);
        own.push(late);

        // Written elsewhere, in five groups a fifth of a second apart, each due a second later.
        recorder.runs.store(0, Ordering::Relaxed);
        let mut dues = Vec::new();
        for _ in 0..5 {
            let written = Instant::now();
            bulk_backlog_due::<B>(&db.pool, group, "{\"padding\":\"\"}", 1).await;
            dues.extend(std::iter::repeat_n(written + Duration::from_secs(1), group));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        settle(&bus, &recorder, n as u64).await;
        // Event ids grow with the groups, as the due times do.
        let mut by_id = recorder.starts.lock().unwrap().clone();
        by_id.sort_by_key(|(id, _)| *id);
        let mut late: Vec<f64> = by_id
            .iter()
            .zip(&dues)
            .map(|((_, start), due)| ms(start.saturating_duration_since(*due)))
            .collect();
        late.sort_by(f64::total_cmp);
        elsewhere.push(late);
        bus.shutdown().await;
    }
    let mut rows = quantile_rows(
        B::NAME,
        "L3 due → listener start",
        &format!("{n} retries written here"),
        &own,
        target,
        target_name,
    );
    rows.extend(quantile_rows(
        B::NAME,
        "L3 due → listener start",
        &format!("{} deliveries written elsewhere", group * 5),
        &elsewhere,
        target,
        target_name,
    ));
    rows.extend(idle_cost::<B>(args).await);
    rows
}

/// Statements per second the database runs for an idle bus, by `retry_every`; baseline: the
/// same bus with its poller off.
async fn idle_cost<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    let idle = args.idle;
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    if B::statements(&db.pool).await.is_none() {
        return Vec::new();
    }
    let mut rows = Vec::new();
    for every in [1000, 100, 10].map(Duration::from_millis) {
        let mut row = Row {
            backend: B::NAME,
            scenario: "L3 idle polling",
            case: format!("retry_every {} ms", every.as_millis()),
            unit: "statements/s",
            txbus: Vec::new(),
            baseline: Vec::new(),
            baseline_name: "same bus, poller off",
            lower_is_better: true,
        };
        for _ in 0..args.rounds.min(1) {
            for poller in [true, false] {
                let rate = idle_statements::<B>(&db.url, every, poller, idle).await;
                if poller {
                    row.txbus.push(rate);
                } else {
                    row.baseline.push(rate);
                }
            }
        }
        rows.push(row);
    }
    rows
}

/// Statements per second the database at `url` runs while a bus polling every `every` (or with
/// its poller off) idles on it for `idle`.
pub async fn idle_statements<B: BenchBackend>(
    url: &str,
    every: Duration,
    poller: bool,
    idle: Duration,
) -> f64
where
    BenchUser: Entity<B>,
{
    let counter = pool_for::<B>(url, 1).await;
    let before = B::statements(&counter).await.unwrap_or(0);
    let pool = pool_for::<B>(url, 4).await;
    let bus = EventBus::builder(pool)
        .state(Arc::new(Recorder::default()))
        .retry_every(every)
        .poller(poller)
        .run_migrations(false)
        .build()
        .await
        .unwrap();
    tokio::time::sleep(idle).await;
    bus.shutdown().await;
    drop(bus);
    // The servers count a session's statements by the time it has ended.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = B::statements(&counter).await.unwrap_or(0);
    // Less the two statements that read the count.
    (after - before - 2) as f64 / idle.as_secs_f64()
}
