//! Scenario 6: application clocks minutes apart. Two child processes run with their wall clock
//! set off, one ten minutes behind the real clock and one ten minutes ahead, beside this process:
//! a small library built from `skew_clock.c` with `cc` at test time, loaded into them with
//! `LD_PRELOAD`, moves what `clock_gettime(CLOCK_REALTIME)`, `gettimeofday` and `time` return (the
//! monotonic clock stays as it is). Each of two events is leased by the process that emitted it
//! (the one behind, and this one) for 20 s while its listener takes 2 s; all three poll the whole
//! time. If a lease were written or read with an application clock, the process behind would
//! write leases that look long over, or the one ahead would read them as over, and take the
//! delivery early. With the database's clock for every lease, each event runs once, in the
//! process that emitted it.

use std::io::{BufRead, BufReader, Lines};
use std::path::PathBuf;
use std::process::{ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use txbus::{Context, EventBus, EventSettings, ListenerError, Pool, Postgres};

use crate::support::backends::exec;
use crate::support::process::{KillOnDrop, runtime};
use crate::support::{TestBackend, eventually};

/// How far off the children's wall clocks are.
const SKEW: i64 = 600;

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "fault.skew.job")]
struct SkewJob {
    from: String,
}

/// Which process this is, and where runs are written down.
struct Who(String, Pool<Postgres>);

#[txbus::listener(name = "fault.skew.hold")]
async fn hold(event: SkewJob, ctx: Context) -> Result<(), ListenerError> {
    let who = ctx.state::<Who>()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sql = format!(
        "INSERT INTO skew_runs (runner, emitter, attempt) VALUES ('{}', '{}', {})",
        who.0,
        event.from,
        ctx.attempt()
    );
    exec(&who.1, &sql).await;
    Ok(())
}

fn settings() -> EventSettings {
    EventSettings::default()
        .max_execution_time(Duration::from_secs(20))
        .retry_after(Duration::from_millis(100))
}

async fn bus(pool: Pool<Postgres>, who: &str) -> EventBus<Postgres> {
    EventBus::builder(pool.clone())
        .state(Who(who.to_owned(), pool))
        .event::<SkewJob>(settings())
        .retry_every(Duration::from_millis(25))
        .run_migrations(false)
        .build()
        .await
        .unwrap()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The library that sets a process's wall clock off by `TXBUS_SKEW_SECONDS`, built once per
/// test process from `skew_clock.c` with the C compiler (`$CC`, or `cc`).
fn skew_clock() -> &'static PathBuf {
    static LIBRARY: OnceLock<PathBuf> = OnceLock::new();
    LIBRARY.get_or_init(|| {
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/faults/skew_clock.c");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        // Built under a name of its own, then moved into place: test processes may build it at
        // the same time.
        let building = dir.join(format!("skew_clock.{}.so", std::process::id()));
        let library = dir.join("skew_clock.so");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
        let output = Command::new(&cc)
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&building)
            .arg(source)
            .arg("-ldl")
            .output()
            .unwrap_or_else(|e| panic!("could not start the C compiler `{cc}`: {e}"));
        assert!(
            output.status.success(),
            "`{cc}` could not build {source}:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::rename(&building, &library).unwrap();
        library
    })
}

/// A child whose wall clock is `skew` seconds off, with its output's lines.
fn start_child(
    skew: i64,
    url: &str,
    who: &str,
    emit: bool,
) -> (KillOnDrop, Lines<BufReader<ChildStdout>>) {
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .env("TXBUS_FAULT_CHILD", "skew")
            .env("LD_PRELOAD", skew_clock())
            .env("TXBUS_SKEW_SECONDS", skew.to_string())
            .args([url, who, if emit { "emit" } else { "poll" }])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

pub async fn clock_skew() {
    let db = Postgres::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    exec(&db.pool, "CREATE TABLE skew_runs (runner TEXT NOT NULL, emitter TEXT NOT NULL, attempt INT NOT NULL)").await;

    let behind = start_child(-SKEW, &db.url, "behind", true);
    let ahead = start_child(SKEW, &db.url, "ahead", false);
    let here = bus(db.another_pool().await, "here").await;
    let mut children = [(behind, -SKEW), (ahead, SKEW)];
    // Both children poll (and the one behind has emitted) before this process emits.
    for ((_, lines), _) in &mut children {
        let line = lines.next().expect("a skewed child ended early").unwrap();
        assert_eq!(line, "ready");
    }
    here.emit(
        SkewJob {
            from: "here".into(),
        },
        [],
    )
    .await
    .unwrap();

    for ((mut child, mut lines), expected) in children {
        let clock = lines.next().map(Result::unwrap);
        assert!(child.wait().unwrap().success(), "a skewed child failed");
        let clock: i64 = clock.expect("the child's clock").trim().parse().unwrap();
        let skew = clock - unix_now();
        assert!(
            (skew - expected).abs() < 60,
            "the child's clock was off by {skew} s, not {expected}"
        );
    }
    eventually("both events to complete", || async {
        (Postgres::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0)
            .then_some(())
    })
    .await;
    here.shutdown().await;

    let runs = Postgres::count(&db.pool, "SELECT count(*) AS n FROM skew_runs").await;
    let own = Postgres::count(
        &db.pool,
        "SELECT count(*) AS n FROM skew_runs WHERE runner = emitter AND attempt = 1",
    )
    .await;
    assert_eq!(runs, 2, "each event ran once");
    assert_eq!(
        own, 2,
        "each ran in the process that emitted it, on its first attempt"
    );
}

/// A skewed child: `<url> <who> <emit|poll>`. Runs a bus (emitting one event first when asked),
/// says "ready", polls until both events have run and for 3 s more (longer than a run: a run
/// taken early would be seen), then prints its wall clock.
pub fn child(args: &[String]) {
    let (url, who, emit) = (args[0].clone(), args[1].clone(), args[2] == "emit");
    runtime().block_on(async move {
        let pool = Pool::<Postgres>::builder(url)
            .max_size(4)
            .connect()
            .await
            .unwrap();
        let bus = bus(pool.clone(), &who).await;
        if emit {
            bus.emit(SkewJob { from: who.clone() }, []).await.unwrap();
        }
        println!("ready");
        eventually("both events to run", || async {
            (Postgres::count(&pool, "SELECT count(*) AS n FROM skew_runs").await >= 2).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        bus.shutdown().await;
    });
    println!("{}", unix_now());
}
