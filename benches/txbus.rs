//! The txbus benchmarks: `cargo bench --bench txbus -- --help`. See BENCHMARKS.md.
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "../tests/support/mod.rs"]
mod support;

mod harness;

fn main() -> std::process::ExitCode {
    harness::main(std::env::args().skip(1).collect())
}
