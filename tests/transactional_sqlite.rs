//! Transactional listeners on SQLite: see `transactional/common.rs`.
#![cfg(feature = "sqlite")]
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "transactional/common.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::process::ExitCode;

use diesel::SqliteConnection;
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;

credit_listener!(SyncConnectionWrapper<SqliteConnection>);

fn main() -> ExitCode {
    common::main::<txbus::Sqlite>()
}
