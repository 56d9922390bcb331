//! The old binary of `rolling_deploy`: `rolling.order_placed` at version 1. Started by that test
//! with a database URL, it says `ready`, emits the odd orders, waits until its listener ran
//! each once and polls a second more, says `done`, and shuts down; run by the test runner
//! itself, it does nothing.
#![cfg(feature = "postgres")]
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "rolling/common.rs"]
mod common;

use std::time::Duration;

use txbus::{Context, ListenerError, Pool, Postgres};

/// Version 1: the total in whole units.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "rolling.order_placed")]
struct OrderPlaced {
    order_id: i64,
    total: i64,
}

#[txbus::listener(name = "rolling.ship")]
async fn ship(order: OrderPlaced, ctx: Context) -> Result<(), ListenerError> {
    common::run(&ctx, "old", order.order_id, order.total * 100).await
}

fn main() {
    let Some(url) = std::env::args()
        .nth(1)
        .filter(|a| a.starts_with("postgres"))
    else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pool = Pool::<Postgres>::builder(url)
            .max_size(4)
            .connect()
            .await
            .unwrap();
        let bus = common::bus(pool).build().await.unwrap();
        println!("ready");
        for n in 0..common::ORDERS {
            let order_id = 2 * n + 1;
            bus.emit(
                OrderPlaced {
                    order_id,
                    total: order_id,
                },
                [],
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        bus.wait_idle().await;
        // Keep polling a while: the new binary's orders fall due meanwhile, and this binary's
        // claims must leave them alone.
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!("done");
        bus.shutdown().await;
    });
}
