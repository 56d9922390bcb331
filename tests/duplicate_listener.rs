//! Two listeners with one id make `build()` fail, naming both. (In a test binary of its own:
//! every bus built in a binary sees all of the binary's listeners.)
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "support/mod.rs"]
mod support;

use serde::{Deserialize, Serialize};
use support::TestBackend;
use txbus::{BuildError, EventBus};

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
struct InvoiceDue {
    id: i64,
}

#[txbus::listener(name = "billing.charge")]
async fn charge(_event: InvoiceDue) -> Result<(), txbus::ListenerError> {
    Ok(())
}

#[txbus::listener(name = "billing.charge")]
async fn charge_again(_event: InvoiceDue) -> Result<(), txbus::ListenerError> {
    Ok(())
}

async fn duplicate_ids_fail_build<B: TestBackend>() {
    let db = B::open().await;
    let error = EventBus::builder(db.pool.clone())
        .build()
        .await
        .unwrap_err();
    let BuildError::DuplicateListener { id, first, second } = &error else {
        panic!("expected DuplicateListener, got {error:?}");
    };
    assert_eq!(*id, "billing.charge");
    assert!(first.starts_with("tests/duplicate_listener.rs:"), "{first}");
    assert!(
        second.starts_with("tests/duplicate_listener.rs:"),
        "{second}"
    );
    assert_ne!(first, second);
    let message = error.to_string();
    assert!(
        message.contains("two listeners have the id `billing.charge`"),
        "{message}"
    );
    assert!(message.contains("#[txbus::listener(name = "), "{message}");
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_duplicate_ids_fail_build() {
    duplicate_ids_fail_build::<txbus::Postgres>().await;
}

#[cfg(feature = "mysql")]
#[tokio::test]
async fn mysql_duplicate_ids_fail_build() {
    duplicate_ids_fail_build::<txbus::Mysql>().await;
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_duplicate_ids_fail_build() {
    duplicate_ids_fail_build::<txbus::Sqlite>().await;
}
