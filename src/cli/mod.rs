//! The `txbus` admin command line (feature `cli`): status, dead letters, replay, purge,
//! migrations and the listeners of the binary it runs in.
//!
//! Run it standalone (`cargo install txbus --features cli,postgres`, then `txbus status`), or
//! build it into your service so that `txbus listeners` and the orphan report know your
//! listeners: a binary of your own whose `main` is
//!
//! ```no_run
//! use my_service as _; // links the crate that defines the #[txbus::listener] functions
//! # mod my_service {}
//!
//! fn main() -> std::process::ExitCode {
//!     txbus::cli::main()
//! }
//! ```
//!
//! It connects with `--database-url` or `DATABASE_URL`: `postgres://...`, `mysql://...`, or a
//! SQLite file path (optionally `sqlite://path`), for the backends it is built with. It never
//! runs listeners: its bus has no poller and emits nothing.
//!
//! Tables are printed for people; `--json` prints one JSON document for scripts. Exit codes:
//! [`EXIT_OK`], [`EXIT_ERROR`], [`EXIT_USAGE`], [`EXIT_NOT_FOUND`].

use std::process::ExitCode;

use clap::Parser;

use crate::error::{Chain, Error};

mod args;
mod commands;
mod render;

use args::{Cli, Command};

/// Success.
pub const EXIT_OK: u8 = 0;
/// The command failed: the database is unreachable, a statement failed, a table is missing.
pub const EXIT_ERROR: u8 = 1;
/// The command line is invalid.
pub const EXIT_USAGE: u8 = 2;
/// The dead letter to replay does not exist (`txbus dead replay EVENT LISTENER`).
pub const EXIT_NOT_FOUND: u8 = 3;

/// Runs the command line of this process and returns its exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() {
                EXIT_USAGE
            } else {
                EXIT_OK
            };
            let _ = error.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: could not start the async runtime: {error}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("error: {}", Chain(&error));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Runs the command on the backend its URL names.
async fn run(cli: Cli) -> Result<u8, Error> {
    if let Command::Listeners = cli.command {
        render::listeners().print(cli.json);
        return Ok(EXIT_OK);
    }
    let Some(url) = cli.database_url.as_deref() else {
        eprintln!("error: no database: pass --database-url or set DATABASE_URL");
        return Ok(EXIT_USAGE);
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return commands::on::<crate::store::Postgres>(url, &cli).await;
        #[cfg(not(feature = "postgres"))]
        return not_built("postgres");
    }
    if url.starts_with("mysql://") {
        #[cfg(feature = "mysql")]
        return commands::on::<crate::store::Mysql>(url, &cli).await;
        #[cfg(not(feature = "mysql"))]
        return not_built("mysql");
    }
    #[cfg(feature = "sqlite")]
    return commands::on::<crate::store::Sqlite>(
        url.strip_prefix("sqlite://").unwrap_or(url),
        &cli,
    )
    .await;
    #[cfg(not(feature = "sqlite"))]
    not_built("sqlite")
}

/// The error for a URL of a backend this binary was built without.
#[cfg_attr(
    all(feature = "postgres", feature = "mysql", feature = "sqlite"),
    allow(dead_code)
)]
fn not_built(feature: &str) -> Result<u8, Error> {
    Err(Error::Config(format!(
        "this txbus binary is built without the `{feature}` backend; build it with \
         `--features cli,{feature}`"
    )))
}
