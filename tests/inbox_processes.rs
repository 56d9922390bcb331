//! Two processes receive the same 500 message ids at the same moment, each from 8 concurrent
//! tasks: every id is accepted exactly once in total, and its listener runs once.
//!
//! This test binary has its own `main`: the receivers are this same binary, started with
//! `TXBUS_INBOX_CHILD` set. It runs on every backend txbus was built with, as one test each.
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use support::backends::exec;
use support::process::{arguments, on_every_backend, runtime};
use support::{TestBackend, eventually};
use txbus::{Context, EventBus, EventSettings, ListenerError, MessageId, Pool, Received};

const MESSAGES: u32 = 500;
const TASKS: u32 = 8;

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "inbox.order_paid")]
struct OrderPaid {
    n: u32,
}

#[txbus::listener(name = "inbox.ship")]
async fn ship(event: OrderPaid, ctx: Context) -> Result<(), ListenerError> {
    (ctx.state::<Recorder>()?.0)(format!("INSERT INTO inbox_runs VALUES ({})", event.n)).await;
    Ok(())
}

/// Runs a statement on the child's database, whatever its backend.
struct Recorder(Box<dyn Fn(String) -> txbus::BoxFuture<'static, ()> + Send + Sync>);

async fn child<B: TestBackend>(url: String) {
    let pool = Pool::<B>::connect(&url).await.unwrap();
    let bus = EventBus::builder(pool.clone())
        .state(Recorder(Box::new(move |sql| {
            let pool = pool.clone();
            Box::pin(async move { exec(&pool, &sql).await })
        })))
        .event::<OrderPaid>(EventSettings::default())
        .build()
        .await
        .unwrap();
    println!("ready");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let bus = bus.clone();
            tokio::spawn(async move {
                let mut accepted = 0_u32;
                // Every task walks all ids, from its own starting point.
                for i in 0..MESSAGES {
                    let n = (i + task * MESSAGES / TASKS) % MESSAGES;
                    let id = MessageId::new("shop", n.to_string());
                    if let Received::Accepted(_) = bus.receive(id, OrderPaid { n }).await.unwrap() {
                        accepted += 1;
                    }
                }
                accepted
            })
        })
        .collect();
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await.unwrap();
    }
    bus.wait_idle().await;
    bus.shutdown().await;
    println!("accepted {accepted}");
}

async fn two_processes<B: TestBackend>() {
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    exec(&db.pool, "CREATE TABLE inbox_runs (n BIGINT NOT NULL)").await;
    let mut children: Vec<_> = (0..2)
        .map(|_| {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .env("TXBUS_INBOX_CHILD", B::NAME)
                .env("TXBUS_INBOX_URL", &db.url)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let stdout = BufReader::new(child.stdout.take().unwrap());
            (child, stdout.lines())
        })
        .collect();
    for (_, lines) in &mut children {
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
    }
    for (child, _) in &mut children {
        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    }
    let mut accepted = Vec::new();
    for (mut child, mut lines) in children {
        let line = lines.next().unwrap().unwrap();
        accepted.push(
            line.strip_prefix("accepted ")
                .unwrap()
                .parse::<i64>()
                .unwrap(),
        );
        assert!(child.wait().unwrap().success());
    }
    eprintln!("[{}] accepted per process: {accepted:?}", B::NAME);
    assert_eq!(
        accepted.iter().sum::<i64>(),
        i64::from(MESSAGES),
        "each id accepted once in total"
    );
    eventually("the deliveries to complete", || async {
        (B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;
    let pool = &db.pool;
    assert_eq!(
        B::count(pool, "SELECT count(*) AS n FROM inbox_runs").await,
        i64::from(MESSAGES)
    );
    assert_eq!(
        B::count(pool, "SELECT count(DISTINCT n) AS n FROM inbox_runs").await,
        i64::from(MESSAGES)
    );
    assert_eq!(
        B::count(pool, "SELECT count(*) AS n FROM txbus_inbox").await,
        i64::from(MESSAGES)
    );
}

fn main() {
    // A receiver process, started by the test below.
    if let Ok(backend) = std::env::var("TXBUS_INBOX_CHILD") {
        let url = std::env::var("TXBUS_INBOX_URL").unwrap();
        with_backend!(backend.as_str(), run_child(url));
        return;
    }
    let trials = on_every_backend("two_processes_receive_the_same_ids", |backend| {
        with_backend!(backend, run_parent())
    });
    libtest_mimic::run(&arguments(), trials).exit()
}

fn run_child<B: TestBackend>(url: String) {
    runtime().block_on(child::<B>(url));
}

fn run_parent<B: TestBackend>() {
    runtime().block_on(two_processes::<B>());
}
