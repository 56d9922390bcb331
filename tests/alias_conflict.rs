//! An alias that is another listener's id makes `build()` fail, naming both. (In a test binary
//! of its own: every bus built in a binary sees all of the binary's listeners.)
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

#[txbus::listener(name = "billing.charge_v2", aliases = ["billing.charge"])]
async fn charge_v2(_event: InvoiceDue) -> Result<(), txbus::ListenerError> {
    Ok(())
}

async fn an_alias_of_another_listener_fails_build<B: TestBackend>() {
    let db = B::open().await;
    let error = EventBus::builder(db.pool.clone())
        .build()
        .await
        .unwrap_err();
    let BuildError::AliasConflict {
        alias,
        listener,
        location,
        other,
    } = &error
    else {
        panic!("expected AliasConflict, got {error:?}");
    };
    assert_eq!(
        (*alias, *listener, *other),
        ("billing.charge", "billing.charge_v2", "billing.charge")
    );
    assert!(
        location.starts_with("tests/alias_conflict.rs:"),
        "{location}"
    );
    assert!(error.to_string().contains("rename one of them"), "{error}");
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_alias_conflict_fails_build() {
    an_alias_of_another_listener_fails_build::<txbus::Postgres>().await;
}

#[cfg(feature = "mysql")]
#[tokio::test]
async fn mysql_alias_conflict_fails_build() {
    an_alias_of_another_listener_fails_build::<txbus::Mysql>().await;
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_alias_conflict_fails_build() {
    an_alias_of_another_listener_fails_build::<txbus::Sqlite>().await;
}
