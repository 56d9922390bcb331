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
    if cfg!(feature = "testing") {
        eprintln!(
            "this build has the test kit (feature `testing`), which counts every run: measure \
             the bus as it ships, with `cargo bench --features full --bench txbus`"
        );
        return std::process::ExitCode::FAILURE;
    }
    harness::main(std::env::args().skip(1).collect())
}
