//! For test binaries with a `main` of their own (`harness = false`), which run scenarios that
//! start copies of themselves as child processes.

use std::panic::AssertUnwindSafe;
use std::process::ExitCode;

/// A multi-threaded runtime like the one a service would run.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Calls a function generic over the backend with the backend named by a string.
#[macro_export]
macro_rules! with_backend {
    ($name:expr, $f:ident ( $($arg:expr),* )) => {
        match $name {
            #[cfg(feature = "postgres")]
            "postgres" => $f::<txbus::Postgres>($($arg),*),
            #[cfg(feature = "mysql")]
            "mysql" => $f::<txbus::Mysql>($($arg),*),
            #[cfg(feature = "sqlite")]
            "sqlite" => $f::<txbus::Sqlite>($($arg),*),
            other => panic!("unknown or not compiled backend {other}"),
        }
    };
}

/// The backends this binary was built with.
pub fn backends() -> Vec<&'static str> {
    let mut all = Vec::new();
    if cfg!(feature = "postgres") {
        all.push("postgres");
    }
    if cfg!(feature = "mysql") {
        all.push("mysql");
    }
    if cfg!(feature = "sqlite") {
        all.push("sqlite");
    }
    all
}

/// The scenario `name` on every backend this binary was built with: `scenario` gets the
/// backend's name (and calls a generic function with [`with_backend!`]).
pub fn on_every_backend(
    name: &str,
    scenario: fn(&'static str),
) -> Vec<(String, Box<dyn FnOnce()>)> {
    backends()
        .into_iter()
        .map(|backend| {
            let run: Box<dyn FnOnce()> = Box::new(move || scenario(backend));
            (format!("{backend}::{name}"), run)
        })
        .collect()
}

/// Runs the scenarios whose name contains one of the command line's filters (all without
/// one), like the test harness would, and fails if any failed.
pub fn run(scenarios: Vec<(String, Box<dyn FnOnce()>)>) -> ExitCode {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, scenario) in scenarios {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let result = std::panic::catch_unwind(AssertUnwindSafe(scenario));
        println!(
            "test {name} ... {}",
            if result.is_ok() { "ok" } else { "FAILED" }
        );
        if result.is_err() {
            failed.push(name);
        }
    }
    println!("\n{ran} scenarios, {} failed {failed:?}", failed.len());
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
