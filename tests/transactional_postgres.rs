//! Transactional listeners on PostgreSQL: see `transactional/common.rs`.
#![cfg(feature = "postgres")]
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

use diesel_async::AsyncPgConnection;

credit_listener!(AsyncPgConnection);

fn main() -> ExitCode {
    common::main::<txbus::Postgres>()
}
