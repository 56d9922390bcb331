//! Runs the benchmark harness with tiny sizes on every backend, so that it cannot rot. Its
//! numbers mean nothing and nothing here depends on them; the harness checks its own invariants
//! (every event delivered, nothing run twice) and fails if they do not hold.
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

fn main() -> std::process::ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // The test runner passes its own flags; the child processes of the harness pass theirs.
    if args.first().is_none_or(|a| a != "--child") {
        args = vec!["--smoke".to_owned()];
    }
    harness::main(args)
}
