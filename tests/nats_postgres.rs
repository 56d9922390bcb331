//! NATS JetStream relay and inbox with both services on PostgreSQL: see `nats/common.rs`.
#![cfg(all(feature = "nats", feature = "postgres"))]
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

use std::process::ExitCode;

use diesel_async::AsyncPgConnection;

projection_listener!(AsyncPgConnection);

fn main() -> ExitCode {
    common::main::<txbus::Postgres>()
}
