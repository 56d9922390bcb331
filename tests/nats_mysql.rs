//! NATS JetStream relay and inbox with both services on MySQL / MariaDB: see `nats/common.rs`.
#![cfg(all(feature = "nats", feature = "mysql"))]
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

use diesel_async::AsyncMysqlConnection;
use support::process::arguments;

projection_listener!(
    AsyncMysqlConnection,
    "INSERT INTO nats_projection (id, n) VALUES ({}, 1) ON DUPLICATE KEY UPDATE n = n + 1"
);

fn main() {
    if common::run_child::<txbus::Mysql>() {
        return;
    }
    common::collect_logs();
    libtest_mimic::run(&arguments(), common::trials::<txbus::Mysql>()).exit()
}
