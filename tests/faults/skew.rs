//! Scenario 6: application clocks minutes apart. Two child processes run under `faketime`, one
//! ten minutes behind the real clock and one ten minutes ahead, beside this process. Each of two
//! events is leased by the process that emitted it (the one behind, and this one) for 4 s while
//! its listener takes 2 s; all three poll the whole time. If a lease were written or read with an
//! application clock, the process behind would write leases that look long over, or the one ahead
//! would read them as over, and take the delivery early. With the database's clock for every
//! lease, each event runs once, in the process that emitted it.

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use txbus::{Context, EventBus, EventSettings, ListenerError, Pool, Postgres};

use crate::support::backends::exec;
use crate::support::process::runtime;
use crate::support::{TestBackend, eventually};

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
        .max_execution_time(Duration::from_secs(4))
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

fn start_child(offset: &str, url: &str, who: &str, emit: bool) -> std::process::Child {
    Command::new("faketime")
        .arg(offset)
        .arg(std::env::current_exe().unwrap())
        .env("TXBUS_FAULT_CHILD", "skew")
        // Only the wall clock: monotonic time is no application clock.
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .args([url, who, if emit { "emit" } else { "poll" }])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("could not start `faketime` ({e}); install it with `apt-get install faketime`")
        })
}

pub async fn clock_skew() {
    let db = Postgres::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    exec(&db.pool, "CREATE TABLE skew_runs (runner TEXT NOT NULL, emitter TEXT NOT NULL, attempt INT NOT NULL)").await;

    let behind = start_child("-10 minutes", &db.url, "behind", true);
    let ahead = start_child("+10 minutes", &db.url, "ahead", false);
    let here = bus(db.another_pool().await, "here").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    here.emit(
        SkewJob {
            from: "here".into(),
        },
        [],
    )
    .await
    .unwrap();

    for (child, expected) in [(behind, -600), (ahead, 600)] {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "a skewed child failed");
        let clock: i64 = String::from_utf8(output.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
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

/// A skewed child: `<url> <who> <emit|poll>`. Runs a bus for 5 s (emitting one event first when
/// asked), then prints its wall clock.
pub fn child(args: &[String]) {
    let (url, who, emit) = (args[0].clone(), args[1].clone(), args[2] == "emit");
    runtime().block_on(async move {
        let pool = Pool::<Postgres>::builder(url)
            .max_size(4)
            .connect()
            .await
            .unwrap();
        let bus = bus(pool, &who).await;
        if emit {
            bus.emit(SkewJob { from: who.clone() }, []).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        bus.shutdown().await;
    });
    println!("{}", unix_now());
}
