//! The benchmark harness: scenarios E1, E2, E3, L1, L2, L3, D1, M1, S1, T1, K1 (N1 with feature
//! `nats`, W1 with feature `web`) on each backend, each measured beside a baseline (or a target) in the same run, rounds
//! alternating, reported as medians with min–max.
//!
//! `cargo bench --bench txbus -- [--backends postgres,mysql,sqlite]
//! [--scenarios E1,E2,E3,L1,L2,L3,D1,M1,S1,T1,K1,N1,W1] [--concurrency 1,4,16] [--events N] [--rounds N]
//! [--payload BYTES] [--backlog N] [--memory-backlog N] [--overload N] [--later N]
//! [--idle-secs N] [--scheduled N] [--otel | --otel-lean] [--smoke]`

#![allow(dead_code)]

mod backends;
mod fanout;
mod keyed;
mod later;
#[cfg(feature = "nats")]
mod nats;
mod otel;
mod scenarios;
mod scheduled;
#[cfg(feature = "web")]
mod web;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use txbus::{Context, ListenerError};

diesel::table! {
    /// The application's table in the benchmarks.
    bench_users (id) {
        /// The primary key.
        id -> BigInt,
        /// Some text.
        email -> Text,
    }
}

/// The entity each emit writes.
#[derive(
    Debug, Clone, diesel::Insertable, diesel::AsChangeset, diesel::Identifiable, txbus::Entity,
)]
#[diesel(table_name = bench_users)]
pub struct BenchUser {
    pub id: i64,
    pub email: String,
}

diesel::table! {
    /// The baseline's second table in E3: one large row per write.
    bench_payloads (id) {
        /// The primary key.
        id -> BigInt,
        /// The payload.
        body -> Text,
    }
}

/// E3's baseline writes one of these beside the user: the event's payload, once.
#[derive(
    Debug, Clone, diesel::Insertable, diesel::AsChangeset, diesel::Identifiable, txbus::Entity,
)]
#[diesel(table_name = bench_payloads)]
pub struct BenchPayload {
    pub id: i64,
    pub body: String,
}

/// The event of every scenario; `padding` sets the payload size.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "bench.user_created")]
pub struct UserCreated {
    pub id: i64,
    pub email: String,
    pub padding: String,
}

/// The event of backlogs written with SQL.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "bench.drained")]
pub struct Drained {
    pub padding: String,
}

/// What the no-op listeners record.
#[derive(Default)]
pub struct Recorder {
    pub runs: AtomicU64,
    /// Runs started (before their work).
    pub started: AtomicU64,
    pub waits: Mutex<Vec<Duration>>,
    pub seen: Mutex<Vec<i64>>,
    /// Each run's event and when it started (L2, L3).
    pub starts: Mutex<Vec<(i64, Instant)>>,
    /// When each event's failed first run ended (L3).
    pub failed: Mutex<HashMap<i64, Instant>>,
    /// From a failed run's end plus its retry delay to the retry's start (L3).
    pub late: Mutex<Vec<Duration>>,
    /// How long the listener takes (M1 overload).
    pub work: Mutex<Duration>,
    /// Whether to keep ids and waits (not when measuring memory).
    pub quiet: std::sync::atomic::AtomicBool,
}

#[txbus::listener(name = "bench.noop")]
async fn noop(_event: UserCreated, ctx: Context) -> Result<(), ListenerError> {
    let recorder = ctx.state::<Arc<Recorder>>()?;
    recorder.started.fetch_add(1, Ordering::Relaxed);
    if !recorder.quiet.load(Ordering::Relaxed) {
        recorder.waits.lock().unwrap().push(ctx.waited());
        let start = (ctx.event_id().get(), Instant::now());
        recorder.starts.lock().unwrap().push(start);
    }
    let work = *recorder.work.lock().unwrap();
    if !work.is_zero() {
        tokio::time::sleep(work).await;
    }
    recorder.runs.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[txbus::listener(name = "bench.drain")]
async fn drain(_event: Drained, ctx: Context) -> Result<(), ListenerError> {
    let recorder = ctx.state::<Arc<Recorder>>()?;
    if !recorder.quiet.load(Ordering::Relaxed) {
        recorder.seen.lock().unwrap().push(ctx.event_id().get());
        let start = (ctx.event_id().get(), Instant::now());
        recorder.starts.lock().unwrap().push(start);
    }
    recorder.runs.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The event of L3: its listener fails the first run and succeeds the retry.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "bench.retried")]
pub struct Retried {
    pub n: u64,
}

/// The retry delay of [`Retried`] (plus up to 10 % jitter).
pub const RETRY_AFTER: Duration = Duration::from_millis(20);

#[txbus::listener(name = "bench.retry_once")]
async fn retry_once(_event: Retried, ctx: Context) -> Result<(), ListenerError> {
    let recorder = ctx.state::<Arc<Recorder>>()?;
    let id = ctx.event_id().get();
    if ctx.attempt() == 1 {
        recorder.failed.lock().unwrap().insert(id, Instant::now());
        return Err("the first run fails".into());
    }
    let failed = recorder.failed.lock().unwrap().get(&id).copied();
    if let Some(failed) = failed {
        let late = Instant::now().saturating_duration_since(failed + RETRY_AFTER);
        recorder.late.lock().unwrap().push(late);
    }
    recorder.runs.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The event of E3: five listeners, a large payload.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "bench.fanned_out")]
pub struct FannedOut {
    pub id: i64,
    pub padding: String,
}

macro_rules! fan_listeners {
    ($($name:ident => $id:literal),*) => {$(
        #[txbus::listener(name = $id)]
        async fn $name(_event: FannedOut, ctx: Context) -> Result<(), ListenerError> {
            ctx.state::<Arc<Recorder>>()?.runs.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    )*};
}

fan_listeners!(fan_1 => "bench.fan_1", fan_2 => "bench.fan_2", fan_3 => "bench.fan_3",
    fan_4 => "bench.fan_4", fan_5 => "bench.fan_5");

/// The sizes of a run.
#[derive(Debug, Clone)]
pub struct Args {
    pub backends: Vec<String>,
    pub scenarios: Vec<String>,
    pub concurrency: Vec<usize>,
    pub events: usize,
    pub batch_transactions: usize,
    pub rounds: usize,
    pub payload: usize,
    pub backlog: usize,
    pub memory_backlog: usize,
    pub overload: usize,
    /// Deliveries held by the killed process (L2), and waiting in the table per round (L3).
    pub later: usize,
    /// How long an idle bus is watched for its statements (L3, T1).
    pub idle: Duration,
    /// Scheduled deliveries not due in the table of T1's idle bus.
    pub scheduled: usize,
    /// Installs an OpenTelemetry pipeline (see `otel`), and E1 emits in a request span.
    pub otel: bool,
    /// The same pipeline without the layer's default extras (`--otel-lean`).
    pub otel_lean: bool,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            backends: compiled_backends(),
            scenarios: [
                "E1", "E2", "E3", "L1", "L2", "L3", "D1", "M1", "S1", "T1", "K1", "N1", "W1",
            ]
            .into_iter()
            .filter(|s| *s != "N1" || cfg!(feature = "nats"))
            .filter(|s| *s != "W1" || cfg!(feature = "web"))
            .map(String::from)
            .collect(),
            concurrency: vec![1, 4, 16],
            events: 3000,
            batch_transactions: 20,
            rounds: 3,
            payload: 256,
            backlog: 100_000,
            memory_backlog: 1_000_000,
            overload: 50_000,
            later: 200,
            idle: Duration::from_secs(10),
            scheduled: 1_000_000,
            otel: false,
            otel_lean: false,
        }
    }
}

impl Args {
    /// The JSON payload of a backlog's rows, `--payload` bytes long.
    pub fn backlog_payload(&self) -> String {
        format!(
            r#"{{"padding":"{}"}}"#,
            "x".repeat(self.payload.saturating_sub(14))
        )
    }

    fn smoke() -> Self {
        Self {
            concurrency: vec![1, 4],
            events: 40,
            batch_transactions: 2,
            rounds: 1,
            backlog: 300,
            memory_backlog: 500,
            overload: 200,
            later: 10,
            idle: Duration::from_millis(200),
            scheduled: 500,
            ..Self::default()
        }
    }

    fn parse(raw: Vec<String>) -> Result<Self, String> {
        let mut args = if raw.iter().any(|a| a == "--smoke") {
            Self::smoke()
        } else {
            Self::default()
        };
        args.otel_lean = raw.iter().any(|a| a == "--otel-lean");
        args.otel = args.otel_lean || raw.iter().any(|a| a == "--otel");
        let mut it = raw
            .into_iter()
            .filter(|a| !matches!(a.as_str(), "--smoke" | "--bench" | "--otel" | "--otel-lean"));
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or(format!("{flag} needs a value"));
            let list = |v: String| v.split(',').map(str::to_owned).collect::<Vec<_>>();
            let number = |v: String| v.parse::<usize>().map_err(|e| format!("{v}: {e}"));
            match flag.as_str() {
                "--backends" => args.backends = list(value()?),
                "--scenarios" => args.scenarios = list(value()?.to_uppercase()),
                "--concurrency" => {
                    args.concurrency = list(value()?)
                        .into_iter()
                        .map(number)
                        .collect::<Result<_, _>>()?
                }
                "--events" => args.events = number(value()?)?,
                "--rounds" => args.rounds = number(value()?)?.max(1),
                "--payload" => args.payload = number(value()?)?,
                "--backlog" => args.backlog = number(value()?)?,
                "--memory-backlog" => args.memory_backlog = number(value()?)?,
                "--overload" => args.overload = number(value()?)?,
                "--later" => args.later = number(value()?)?.max(5),
                "--idle-secs" => args.idle = Duration::from_secs(number(value()?)? as u64),
                "--scheduled" => args.scheduled = number(value()?)?,
                "--help" | "-h" => return Err(HELP.to_owned()),
                other => return Err(format!("unknown argument {other}\n{HELP}")),
            }
        }
        Ok(args)
    }
}

const HELP: &str = "usage: cargo bench --bench txbus -- [--backends postgres,mysql,sqlite] \
[--scenarios E1,E2,E3,L1,L2,L3,D1,M1,S1,T1,K1,N1,W1] [--concurrency 1,4,16] [--events N] [--rounds N] [--payload BYTES] \
[--backlog N] [--memory-backlog N] [--overload N] [--later N] [--idle-secs N] [--scheduled N] [--otel | --otel-lean] [--smoke]";

fn compiled_backends() -> Vec<String> {
    let mut all = Vec::new();
    if cfg!(feature = "postgres") {
        all.push("postgres".to_owned());
    }
    if cfg!(feature = "mysql") {
        all.push("mysql".to_owned());
    }
    if cfg!(feature = "sqlite") {
        all.push("sqlite".to_owned());
    }
    all
}

/// One line of a result table.
#[derive(Debug, Clone)]
pub struct Row {
    pub backend: &'static str,
    pub scenario: &'static str,
    pub case: String,
    pub unit: &'static str,
    pub txbus: Vec<f64>,
    pub baseline: Vec<f64>,
    pub baseline_name: &'static str,
    /// Set for rows where smaller is better (latencies, memory).
    pub lower_is_better: bool,
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn spread(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if values.len() < 2 {
        format_number(median(values))
    } else {
        format!(
            "{} [{}–{}]",
            format_number(median(values)),
            format_number(min),
            format_number(max)
        )
    }
}

fn format_number(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "\n| backend | scenario | case | unit | txbus: median [min–max] | baseline | baseline: median [min–max] | txbus ÷ baseline |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            row.backend,
            row.scenario,
            row.case,
            row.unit,
            spread(&row.txbus),
            row.baseline_name,
            spread(&row.baseline),
            ratio(row),
        );
    }
}

/// txbus ÷ baseline: with a measurement of each per round, the median of the rounds' ratios and
/// their range (each round measures both back to back, so drift between rounds cancels out);
/// otherwise the ratio of the medians.
fn ratio(row: &Row) -> String {
    let paired = row.txbus.len() == row.baseline.len() && row.txbus.len() > 1;
    let ratios: Vec<f64> = if paired {
        row.txbus
            .iter()
            .zip(&row.baseline)
            .map(|(txbus, baseline)| txbus / baseline)
            .collect()
    } else {
        vec![median(&row.txbus) / median(&row.baseline)]
    };
    if !ratios.iter().all(|r| r.is_finite()) {
        return "–".to_owned();
    }
    let (low, high) = ratios
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), &r| {
            (low.min(r), high.max(r))
        });
    if ratios.len() > 1 {
        format!("{:.2} [{low:.2}–{high:.2}]", median(&ratios))
    } else {
        format!("{:.2}", ratios[0])
    }
}

pub fn main(raw: Vec<String>) -> ExitCode {
    if raw.first().is_some_and(|a| a == "--child") {
        return scenarios::child(&raw[1..]);
    }
    let args = match Args::parse(raw) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("txbus benchmarks: {args:?}");
    let pipeline = args.otel.then(|| otel::install(args.otel_lean));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for backend in &args.backends {
        let result = match backend.as_str() {
            #[cfg(feature = "postgres")]
            "postgres" => runtime.block_on(scenarios::run::<txbus::Postgres>(&args)),
            #[cfg(feature = "mysql")]
            "mysql" => runtime.block_on(scenarios::run::<txbus::Mysql>(&args)),
            #[cfg(feature = "sqlite")]
            "sqlite" => runtime.block_on(scenarios::run::<txbus::Sqlite>(&args)),
            other => {
                eprintln!("unknown or not compiled backend {other}; build with its feature");
                return ExitCode::FAILURE;
            }
        };
        rows.extend(result);
        print_table(&rows);
    }
    if let Some(pipeline) = pipeline {
        pipeline.finish();
    }
    ExitCode::SUCCESS
}
