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

use diesel_async::AsyncPgConnection;
use support::process::arguments;

projection_listener!(AsyncPgConnection);

fn main() {
    if common::run_child::<txbus::Postgres>() {
        return;
    }
    common::collect_logs();
    libtest_mimic::run(&arguments(), common::trials::<txbus::Postgres>()).exit()
}
