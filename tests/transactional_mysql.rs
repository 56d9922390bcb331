//! Transactional listeners on MySQL/MariaDB: see `transactional/common.rs`.
#![cfg(feature = "mysql")]
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

use diesel_async::AsyncMysqlConnection;

credit_listener!(AsyncMysqlConnection);

fn main() -> ExitCode {
    common::main::<txbus::Mysql>()
}
