//! The `txbus` command line, run as a process against PostgreSQL: status, dead letters and
//! scheduled deliveries as tables and JSON, replay, purge, migrate; bad arguments and an
//! unreachable database fail with a message and a non-zero exit code.
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "support/mod.rs"]
mod support;

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use support::{Probe, TestBackend, eventually};
use txbus::{Context, EventBus, ListenerError, Postgres};

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "cli.invoice")]
struct Invoice {
    number: u32,
}

/// Aborts invoice 1 and 2 until the probe says otherwise.
#[txbus::listener(name = "cli.send_invoice")]
async fn send_invoice(invoice: Invoice, ctx: Context) -> Result<(), ListenerError> {
    let probe = ctx.state::<Arc<Probe>>()?;
    probe.record(&ctx, invoice.number.to_string());
    if ctx.attempt() == 1 {
        Err(ListenerError::abort(format!(
            "invoice {} has no address",
            invoice.number
        )))
    } else {
        Ok(())
    }
}

fn txbus(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_txbus"))
        .args(args)
        .env("DATABASE_URL", url)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn json(output: &Output) -> Value {
    serde_json::from_str(&stdout(output)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_inspects_and_repairs() {
    let db = Postgres::open().await;
    let url = db.url.clone();
    let migrated = json(&txbus(&url, &["migrate", "--json"]));
    assert_eq!(
        migrated["applied"].as_array().unwrap().len() as i64,
        <Postgres as TestBackend>::MIGRATIONS,
        "{migrated}"
    );
    assert!(stdout(&txbus(&url, &["migrate"])).contains("up to date"));

    let probe = Probe::new();
    let bus = EventBus::builder(db.pool.clone())
        .state(probe.clone())
        .retry_every(Duration::from_millis(20))
        .build()
        .await
        .unwrap();
    let first = bus.emit(Invoice { number: 1 }, []).await.unwrap();
    let second = bus.emit(Invoice { number: 2 }, []).await.unwrap();
    eventually("two dead letters", || async {
        (bus.stats().await.unwrap().total.dead == 2).then_some(())
    })
    .await;

    let later = bus
        .emit_after(Duration::from_secs(3600), Invoice { number: 3 }, [])
        .await
        .unwrap();

    // Status.
    let table = stdout(&txbus(&url, &["status"]));
    assert!(table.starts_with("LISTENER"), "{table}");
    let line = table
        .lines()
        .find(|l| l.starts_with("cli.send_invoice"))
        .unwrap();
    let columns: Vec<&str> = line.split_whitespace().collect();
    // Marked: the pending (scheduled) delivery waits for a listener this binary lacks.
    assert_eq!(
        columns[1..9],
        ["*", "0", "0", "0", "0", "1", "2", "0"],
        "{table}"
    );
    let status = json(&txbus(&url, &["status", "--json"]));
    assert_eq!(status["total"]["dead"], 2, "{status}");
    assert_eq!(status["total"]["scheduled"], 1, "{status}");

    // Scheduled deliveries.
    let table = stdout(&txbus(&url, &["scheduled", "list"]));
    assert!(table.starts_with("DUE"), "{table}");
    let line = table.lines().nth(1).unwrap();
    assert!(
        line.contains(&later.get().to_string()) && line.contains("cli.invoice"),
        "{table}"
    );
    assert!(
        table.trim_end().ends_with("1 scheduled deliveries"),
        "{table}"
    );
    let scheduled = json(&txbus(&url, &["scheduled", "list", "--json"]));
    assert_eq!(scheduled[0]["event_id"], later.get(), "{scheduled}");
    assert_eq!(scheduled[0]["listener"], "cli.send_invoice");
    assert!(scheduled[0]["due_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(bus.cancel(later).await.unwrap(), 1);
    assert_eq!(status["listeners"]["cli.send_invoice"]["dead"], 2);
    assert_eq!(status["inbox_ids"], 0);

    // Dead letters.
    let table = stdout(&txbus(&url, &["dead", "list"]));
    assert!(table.contains("invoice 1 has no address"), "{table}");
    assert!(table.contains("aborted"));
    assert!(table.trim_end().ends_with("2 dead letters"), "{table}");
    let list = json(&txbus(&url, &["dead", "list", "--json", "--limit", "1"]));
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["event_id"], second.get(), "newest first");
    assert_eq!(list[0]["payload"]["number"], 2);
    assert_eq!(list[0]["reason"], "aborted");
    let filtered = json(&txbus(
        &url,
        &["dead", "list", "--json", "--listener", "nobody"],
    ));
    assert_eq!(filtered.as_array().unwrap().len(), 0);
    let by_reason = |reason: &str| {
        json(&txbus(
            &url,
            &["dead", "list", "--json", "--reason", reason],
        ))
        .as_array()
        .unwrap()
        .len()
    };
    assert_eq!(by_reason("aborted"), 2);
    assert_eq!(by_reason("max_attempts"), 0);
    let page = json(&txbus(
        &url,
        &["dead", "list", "--json", "--limit", "1", "--offset", "1"],
    ));
    let page = page.as_array().unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0]["event_id"], first.get(), "the next page");

    // Replay one; the bus runs it again and it succeeds.
    let replayed = txbus(
        &url,
        &[
            "dead",
            "replay",
            &first.get().to_string(),
            "cli.send_invoice",
        ],
    );
    assert!(stdout(&replayed).contains("replayed"));
    probe
        .wait_until("the replayed invoice", |calls| {
            calls.iter().any(|c| c.event_id == first && c.attempt == 2)
        })
        .await;
    let missing = txbus(
        &url,
        &[
            "dead",
            "replay",
            &first.get().to_string(),
            "cli.send_invoice",
        ],
    );
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no dead letter"));

    // Purge: only what is older.
    let kept = json(&txbus(&url, &["purge", "--older-than", "1h", "--json"]));
    assert_eq!(kept["purged"], 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let purged = json(&txbus(&url, &["purge", "--older-than", "1s", "--json"]));
    assert_eq!(purged["purged"], 1);
    assert_eq!(
        json(&txbus(&url, &["status", "--json"]))["total"]["dead"],
        0
    );
    bus.shutdown().await;

    // The listeners compiled into the binary: none in the standalone CLI.
    assert!(stdout(&txbus(&url, &["listeners"])).contains("no listeners are compiled"));
    assert_eq!(
        json(&txbus(&url, &["listeners", "--json"])),
        Value::Array(vec![])
    );
}

#[test]
fn bad_input_fails_clearly() {
    let usage = txbus("postgres://127.0.0.1:1/none", &["purge"]);
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("--older-than"));

    let duration = txbus(
        "postgres://127.0.0.1:1/none",
        &["purge", "--older-than", "soon"],
    );
    assert_eq!(duration.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&duration.stderr).contains("not a duration"));

    let reason = txbus(
        "postgres://127.0.0.1:1/none",
        &["dead", "list", "--reason", "exploded"],
    );
    assert_eq!(reason.status.code(), Some(2));
    let message = String::from_utf8_lossy(&reason.stderr);
    assert!(
        message.contains("--reason") && message.contains("max_attempts"),
        "{message}"
    );

    let unknown = txbus("postgres://127.0.0.1:1/none", &["explode"]);
    assert_eq!(unknown.status.code(), Some(2));

    let no_url = Command::new(env!("CARGO_BIN_EXE_txbus"))
        .arg("status")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(no_url.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_url.stderr).contains("--database-url"));

    // Nothing listens on port 1.
    let unreachable = txbus("postgres://postgres@127.0.0.1:1/test", &["status"]);
    assert_eq!(unreachable.status.code(), Some(1));
    let message = String::from_utf8_lossy(&unreachable.stderr);
    assert!(message.starts_with("error: "), "{message}");
    assert!(message.to_lowercase().contains("connect"), "{message}");
}
