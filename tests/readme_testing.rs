//! The test that README.md "Testing your listeners" prints, as it prints it (the block between
//! the markers; `the_readme_prints_this_test` keeps the two the same).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

// README begin
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use txbus::testing::CrashPoint;
use txbus::{Context, EventBus, EventId, ListenerError, Pool, Sqlite};

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "shop.payment_due")]
struct PaymentDue {
    order_id: i64,
    cents: i64,
}

/// The payment provider, as the test sees it: one entry per charge.
#[derive(Default)]
struct Provider {
    charges: Mutex<Vec<EventId>>,
}

/// Charges once per event, however often it runs: the provider is asked with the event's id.
#[txbus::listener]
async fn charge(_due: PaymentDue, ctx: Context) -> Result<(), ListenerError> {
    let mut charges = ctx.state::<Arc<Provider>>()?.charges.lock().unwrap();
    if !charges.contains(&ctx.event_id()) {
        charges.push(ctx.event_id());
    }
    Ok(())
}

#[tokio::test]
async fn charged_once_across_a_crash() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let pool = Pool::<Sqlite>::connect(dir.path().join("shop.db").to_str().unwrap()).await?;
    let provider = Arc::new(Provider::default());
    let bus = EventBus::builder(pool)
        .state(provider.clone())
        .poller(false) // the test decides what runs, and when
        .build()
        .await?;

    let due = PaymentDue {
        order_id: 7,
        cents: 500,
    };
    let id = bus.emit_after(Duration::from_secs(1800), due, []).await?;
    assert_eq!(bus.emitted::<PaymentDue>()[0].0, id);
    assert_eq!(bus.run_due().await?.ran, 0); // due in 30 minutes
    bus.advance(Duration::from_secs(1800)); // this bus's clock; not the database's

    // The charge succeeds, and the process dies before recording it.
    bus.simulate_crash(CrashPoint::AfterListenerSuccess);
    assert_eq!(bus.run_due().await?.succeeded, 1);
    assert_eq!(bus.run_due().await?.ran, 0); // leased by the run that "died"
    bus.advance(Duration::from_secs(30)); // its lease (`max_execution_time`) ends
    let report = bus.run_due().await?; // it runs again, as attempt 2
    assert_eq!((report.ran, report.succeeded), (1, 1));
    assert_eq!(*provider.charges.lock().unwrap(), [id]); // charged once
    bus.shutdown().await;
    Ok(())
}
// README end

#[test]
fn the_readme_prints_this_test() {
    let readme = include_str!("../README.md");
    let section = readme
        .split_once("## Testing your listeners")
        .expect("README has the section")
        .1;
    let printed = section
        .split_once("```rust\n")
        .and_then(|(_, rest)| rest.split_once("```\n"))
        .expect("the section has a Rust block")
        .0;
    let this = include_str!("readme_testing.rs");
    let tested = this
        .split_once("// README begin\n")
        .and_then(|(_, rest)| rest.split_once("// README end\n"))
        .expect("the markers")
        .0;
    assert_eq!(
        printed, tested,
        "README.md prints another test than tests/readme_testing.rs runs: copy it over"
    );
}
