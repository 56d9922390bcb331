//! NATS JetStream relay and inbox with both services on SQLite: see `nats/common.rs`.
#![cfg(all(feature = "nats", feature = "sqlite"))]
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "nats/common.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use diesel::SqliteConnection;
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use support::process::arguments;

projection_listener!(SyncConnectionWrapper<SqliteConnection>);

fn main() {
    if common::run_child::<txbus::Sqlite>() {
        return;
    }
    common::collect_logs();
    libtest_mimic::run(&arguments(), common::trials::<txbus::Sqlite>()).exit()
}
