//! Runs the benchmark harness with tiny sizes on every backend, so that it cannot rot. Its
//! numbers mean nothing and nothing here depends on them; the harness checks its own invariants
//! (every event delivered, nothing run twice) and fails if they do not hold.
//!
//! This test binary has its own `main`: the harness starts copies of it as child processes
//! (`--child ...`). One test per backend: `<backend>::smoke`.
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "support/mod.rs"]
mod support;

#[path = "../benches/harness/mod.rs"]
mod harness;

use std::process::ExitCode;

use support::process::{arguments, on_every_backend};

fn main() -> ExitCode {
    // A child process of the harness: its arguments are the harness's, not the test runner's.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--child") {
        return harness::main(args);
    }
    let trials = on_every_backend("smoke", |backend| {
        let args = ["--smoke", "--backends", backend]
            .map(String::from)
            .to_vec();
        assert_eq!(
            harness::main(args),
            ExitCode::SUCCESS,
            "the benchmark harness failed on {backend}"
        );
    });
    libtest_mimic::run(&arguments(), trials).exit()
}
