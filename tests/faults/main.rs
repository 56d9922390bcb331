//! The fault suite: txbus's guarantees while things break for real. Processes killed with
//! SIGKILL, the database cut off, listeners that hang, an emit overload, shutdown in the middle
//! of work, application clocks minutes apart. RELIABILITY.md says what each scenario proves.
//!
//! This binary has its own `main`: some scenarios start copies of it as child processes
//! (`TXBUS_FAULT_CHILD` set). Its tests list and filter as usual (`-- --list`, `-- kill_9`).
//! The scenarios of PostgreSQL alone (outage, overload, skew) need the `postgres` feature. Counts scale with `TXBUS_FAULT_SCALE` (default 1) for soak runs.
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "../support/mod.rs"]
mod support;

mod kill;
mod ordering;
#[cfg(feature = "postgres")]
mod outage;
#[cfg(feature = "postgres")]
mod overload;
mod shutdown;
#[cfg(feature = "postgres")]
mod skew;
mod stuck;

use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use support::process::{arguments, backends, runtime, trial};

diesel::table! {
    fault_orders (id) {
        id -> BigInt,
        note -> Text,
    }
}

/// The entity the scenarios write with their events.
#[derive(Debug, Clone, Insertable, AsChangeset, Identifiable, txbus::Entity)]
#[diesel(table_name = fault_orders)]
pub struct Order {
    pub id: i64,
    pub note: String,
}

/// The event the scenarios emit.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "fault.order_placed")]
pub struct OrderPlaced {
    pub id: i64,
}

/// How many times larger than the defaults the counts are (`TXBUS_FAULT_SCALE`).
pub fn scale() -> usize {
    std::env::var("TXBUS_FAULT_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// A seed for the random choices of a scenario: `TXBUS_FAULT_SEED`, or the clock. Printed, so
/// that a failing run can be repeated.
pub fn seed(scenario: &str) -> u64 {
    let seed = std::env::var("TXBUS_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("[{scenario}] seed {seed} (TXBUS_FAULT_SEED={seed} repeats it)");
    seed
}

/// A small deterministic random number generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// A number in `low..high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        low + self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % (high - low).max(1)
    }
}

fn main() {
    // A child process started by a scenario runs its role, not the tests.
    if let Ok(role) = std::env::var("TXBUS_FAULT_CHILD") {
        let args: Vec<String> = std::env::args().skip(1).collect();
        match role.as_str() {
            "kill-worker" => kill::worker(&args),
            "ordering-worker" => ordering::worker(&args),
            #[cfg(feature = "postgres")]
            "skew" => skew::child(&args),
            other => panic!("unknown child role {other}"),
        }
        return;
    }
    let mut trials = Vec::new();
    for backend in backends() {
        trials.push(trial(
            format!("{backend}::kill_9_at_random_points"),
            move || with_backend!(backend, kill_scenario()),
        ));
        trials.push(trial(
            format!("{backend}::keyed_order_across_processes"),
            move || with_backend!(backend, ordering_scenario(false)),
        ));
        trials.push(trial(
            format!("{backend}::keyed_order_survives_kill_9"),
            move || with_backend!(backend, ordering_scenario(true)),
        ));
        trials.push(trial(
            format!("{backend}::stuck_listeners_do_not_block_others"),
            move || with_backend!(backend, stuck_scenario()),
        ));
        trials.push(trial(
            format!("{backend}::shutdown_releases_and_finishes"),
            move || with_backend!(backend, shutdown_scenario()),
        ));
    }
    #[cfg(feature = "postgres")]
    trials.extend([
        trial("postgres::database_outage", || {
            runtime().block_on(outage::database_outage())
        }),
        trial("postgres::overload_stays_bounded", || {
            runtime().block_on(overload::overload::<txbus::Postgres>())
        }),
        trial("postgres::clock_skew", || {
            runtime().block_on(skew::clock_skew())
        }),
    ]);
    libtest_mimic::run(&arguments(), trials).exit()
}

fn kill_scenario<B: support::TestBackend>()
where
    Order: txbus::Entity<B>,
{
    runtime().block_on(kill::kill_9_at_random_points::<B>());
}

fn ordering_scenario<B: support::TestBackend>(kill: bool)
where
    Order: txbus::Entity<B>,
{
    runtime().block_on(ordering::keyed_order_across_processes::<B>(kill));
}

fn stuck_scenario<B: support::TestBackend>() {
    runtime().block_on(stuck::stuck_listeners_do_not_block_others::<B>());
}

fn shutdown_scenario<B: support::TestBackend>() {
    runtime().block_on(shutdown::shutdown_releases_and_finishes::<B>());
}
