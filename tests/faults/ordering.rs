//! Scenario: ordering per key across processes. Two worker processes share one database; each
//! emits 1,000 keyed events from two tasks (50 keys in all) and runs the listener, which sleeps
//! 0 to 3 ms and fails one run in five. Each run is written down by its process (start, end,
//! result) in a file of its own, with the machine's clock, so that runs of different processes
//! compare. For every key: no two runs overlap, the successes come in event-id order with none
//! missing, and no run of an event starts before the event before it succeeded.
//!
//! The kill variant kills the second worker (SIGKILL) while it runs a key's head, up to three
//! times, and starts it again: the key resumes after the lease, in order, and nothing is lost.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use txbus::{Context, Entity, EventBus, EventSettings, ListenerError, Pool, persist};

use crate::support::process::{KillOnDrop, runtime};
use crate::support::{PATIENCE, TestBackend, eventually};
use crate::{Order, Rng, seed, with_backend};

const KEYS: i64 = 50;
const PER_TASK: i64 = 500;

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "fault.ordering.order", ordering_key = account)]
struct AccountOrder {
    id: i64,
    account: i64,
}

/// This process's record of its runs, one line per start and per end.
struct RunFile(Mutex<std::fs::File>);

impl RunFile {
    fn line(&self, line: String) {
        // One `write` per line on a file opened for appending: a kill never leaves half a line.
        self.0.lock().unwrap().write_all(line.as_bytes()).unwrap();
    }
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

/// A deterministic roll per event and attempt.
fn roll(event_id: i64, attempt: u32) -> u64 {
    let mut x = (event_id as u64) ^ (u64::from(attempt) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}

#[txbus::listener(name = "fault.ordering.run")]
async fn run(event: AccountOrder, ctx: Context) -> Result<(), ListenerError> {
    let file = ctx.state::<Arc<RunFile>>()?;
    let (id, attempt) = (ctx.event_id().get(), ctx.attempt());
    file.line(format!("S {} {id} {attempt} {}\n", event.account, now_us()));
    let roll = roll(id, attempt);
    tokio::time::sleep(Duration::from_millis(roll % 4)).await;
    let ok = attempt >= 3 || !roll.is_multiple_of(5);
    file.line(format!(
        "E {} {id} {attempt} {} {ok}\n",
        event.account,
        now_us()
    ));
    if ok {
        Ok(())
    } else {
        Err("this run fails".into())
    }
}

fn settings() -> EventSettings {
    EventSettings::default()
        .max_execution_time(Duration::from_secs(1))
        .retry_after(Duration::from_millis(10))
}

/// One run, as its process wrote it down.
#[derive(Debug, Clone)]
struct Run {
    process: usize,
    event_id: i64,
    attempt: u32,
    started: u128,
    /// `None`: its process was killed during the run.
    ended: Option<(u128, bool)>,
}

/// Reads every process's runs, by key.
fn read_runs(files: &[PathBuf]) -> BTreeMap<i64, Vec<Run>> {
    let mut by_key: BTreeMap<i64, Vec<Run>> = BTreeMap::new();
    for (process, path) in files.iter().enumerate() {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut started: HashMap<(i64, u32), (i64, u128)> = HashMap::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let (key, event_id, attempt) = match f[..] {
                ["S" | "E", key, id, attempt, ..] => (
                    key.parse().unwrap(),
                    id.parse().unwrap(),
                    attempt.parse().unwrap(),
                ),
                _ => continue,
            };
            if f[0] == "S" {
                started.insert((event_id, attempt), (key, f[4].parse().unwrap()));
            } else {
                let (key, start) = started.remove(&(event_id, attempt)).unwrap();
                by_key.entry(key).or_default().push(Run {
                    process,
                    event_id,
                    attempt,
                    started: start,
                    ended: Some((f[4].parse().unwrap(), f[5] == "true")),
                });
            }
        }
        for ((event_id, attempt), (key, start)) in started {
            by_key.entry(key).or_default().push(Run {
                process,
                event_id,
                attempt,
                started: start,
                ended: None,
            });
        }
    }
    for runs in by_key.values_mut() {
        runs.sort_by_key(|r| r.started);
    }
    by_key
}

/// Whether a process's file shows a run started and not ended.
fn runs_a_head(path: &Path) -> bool {
    let runs = read_runs(&[path.to_owned()]);
    runs.values().flatten().any(|r| r.ended.is_none())
}

/// Checks every key's runs; returns how many events succeeded, and how many succeeded twice
/// (a process killed after the success and before it was recorded).
fn check(by_key: &BTreeMap<i64, Vec<Run>>, killed: bool) -> (usize, usize) {
    let (mut events, mut repeated) = (0, 0);
    for (key, runs) in by_key {
        let finished: Vec<&Run> = runs.iter().filter(|r| r.ended.is_some()).collect();
        for pair in finished.windows(2) {
            let (end, _) = pair[0].ended.unwrap();
            assert!(
                pair[1].started >= end,
                "key {key}: two runs overlap: {:?} and {:?}",
                pair[0],
                pair[1]
            );
        }
        // Every event of the key, in id order: each one succeeds, at least once.
        let mut ids: Vec<i64> = runs.iter().map(|r| r.event_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let (mut done_up_to, mut last_success) = (0, 0);
        for run in runs {
            let position = ids.binary_search(&run.event_id).unwrap();
            let again = killed && done_up_to > 0 && position == done_up_to - 1;
            assert!(
                position == done_up_to || again,
                "key {key}: {run:?} started before event {} succeeded",
                ids[done_up_to.min(ids.len() - 1)]
            );
            if again {
                assert!(
                    run.attempt > last_success,
                    "key {key}: {run:?} ran again without a crash"
                );
            }
            if run.ended.is_some_and(|(_, ok)| ok) {
                last_success = run.attempt;
                if again {
                    repeated += 1;
                } else {
                    done_up_to += 1;
                }
            }
        }
        assert_eq!(
            done_up_to,
            ids.len(),
            "key {key}: not every event succeeded"
        );
        events += ids.len();
    }
    (events, repeated)
}

/// A worker process: `<backend> <url> <file> <first id> <events>`.
fn start_worker<B: TestBackend>(url: &str, file: &Path, first: i64, events: i64) -> KillOnDrop {
    KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .env("TXBUS_FAULT_CHILD", "ordering-worker")
            .args([
                B::NAME,
                url,
                file.to_str().unwrap(),
                &first.to_string(),
                &events.to_string(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

pub async fn keyed_order_across_processes<B: TestBackend>(kill: bool)
where
    Order: Entity<B>,
{
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    crate::support::backends::exec(
        &db.pool,
        "CREATE TABLE fault_orders (id BIGINT PRIMARY KEY, note VARCHAR(255) NOT NULL)",
    )
    .await;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "ordering-{}-{}-{}",
        B::NAME,
        std::process::id(),
        now_us()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = vec![dir.join("a"), dir.join("b")];
    let a = start_worker::<B>(&db.url, &files[0], 1_000_000, 2 * PER_TASK);
    let mut b = start_worker::<B>(&db.url, &files[1], 2_000_000, 2 * PER_TASK);

    let mut heads_killed = 0;
    if kill {
        let mut rng = Rng::new(seed(&format!("{}::ordering_kill", B::NAME)));
        for round in 0..20 {
            if heads_killed == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(rng.range(50, 300))).await;
            let file = files.last().unwrap().clone();
            let deadline = Instant::now() + PATIENCE;
            while !runs_a_head(&file) {
                assert!(Instant::now() < deadline, "the worker never ran a listener");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            b.stop();
            if runs_a_head(&file) {
                heads_killed += 1;
            }
            // Again, without emitting: it only runs deliveries.
            files.push(dir.join(format!("b{round}")));
            b = start_worker::<B>(&db.url, files.last().unwrap(), 0, 0);
        }
        assert!(heads_killed > 0, "no kill hit a running listener");
    }

    let emitters_done = || {
        let done = |path: &Path| {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .contains("DONE")
        };
        done(&files[0]) && (kill || done(&files[1]))
    };
    let deadline = Instant::now() + PATIENCE * 4;
    while !emitters_done() {
        assert!(
            Instant::now() < deadline,
            "the workers did not finish emitting"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("every delivery to complete", || async {
        (B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;
    a.stop();
    b.stop();

    let committed = B::count(&db.pool, "SELECT count(*) AS n FROM fault_orders").await;
    let by_key = read_runs(&files);
    let runs: usize = by_key.values().map(Vec::len).sum();
    let (events, repeated) = check(&by_key, kill);
    eprintln!(
        "[{}] {events} events over {} keys, {runs} runs, {heads_killed} running heads killed, \
         {repeated} successes repeated after a kill",
        B::NAME,
        by_key.len()
    );
    assert_eq!(events as i64, committed, "committed events that never ran");
    if !kill {
        assert_eq!(committed, 4 * PER_TASK);
        assert!(
            by_key
                .values()
                .flatten()
                .any(|r| r.ended.is_some_and(|(_, ok)| !ok)),
            "no run failed"
        );
        assert!(
            by_key.values().flatten().any(|r| r.process == 1),
            "the second process ran nothing"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The worker: emits `events` keyed events from two tasks, then runs deliveries until killed.
pub fn worker(args: &[String]) {
    let backend = args[0].as_str();
    let (url, file) = (args[1].clone(), PathBuf::from(&args[2]));
    let (first, events) = (args[3].parse().unwrap(), args[4].parse().unwrap());
    with_backend!(backend, work(url, file, first, events));
}

fn work<B: TestBackend>(url: String, path: PathBuf, first: i64, events: i64)
where
    Order: Entity<B>,
{
    runtime().block_on(async move {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let pool = Pool::<B>::builder(url).max_size(8).connect().await.unwrap();
        let file = Arc::new(RunFile(Mutex::new(file)));
        let bus = Arc::new(
            EventBus::builder(pool.clone())
                .state(file.clone())
                .event::<AccountOrder>(settings())
                .retry_every(Duration::from_millis(50))
                .run_migrations(false)
                .build()
                .await
                .unwrap(),
        );
        let mut tasks = Vec::new();
        for task in 0..2 {
            let bus = bus.clone();
            let first = first + task * 100_000;
            tasks.push(tokio::spawn(async move {
                for id in first..first + events / 2 {
                    let order = Order {
                        id,
                        note: String::new(),
                    };
                    let event = AccountOrder {
                        id,
                        account: (id * 7 + task) % KEYS,
                    };
                    bus.emit(event, [persist(&order)]).await.unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        file.line("DONE\n".into());
        std::future::pending::<()>().await;
    });
}
