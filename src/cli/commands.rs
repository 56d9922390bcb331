//! The commands that work on a database.

use serde_json::json;

use super::args::{Cli, Command, DeadCommand, ScheduledCommand};
use super::render::{self, Output};
use super::{EXIT_NOT_FOUND, EXIT_OK};
use crate::bus::EventBus;
use crate::error::{Chain, Error};
use crate::event::EventId;
use crate::store::{Backend, Pool, migrate};

/// Runs the command on the database at `url`.
pub(super) async fn on<B: Backend>(url: &str, cli: &Cli) -> Result<u8, Error> {
    let pool = Pool::<B>::builder(url).max_size(2).connect().await?;
    if let Command::Migrate = cli.command {
        let applied = migrate(&pool).await?;
        let table = if applied.is_empty() {
            "the database is up to date\n".to_owned()
        } else {
            format!("applied {}\n", applied.join(", "))
        };
        Output::message(table, json!({ "applied": applied })).print(cli.json);
        return Ok(EXIT_OK);
    }
    let bus = EventBus::builder(pool)
        .poller(false)
        .run_migrations(false)
        .build()
        .await
        .map_err(|error| Error::Config(format!("{}", Chain(&error))))?;
    let code = command(&bus, cli).await;
    bus.shutdown().await;
    code
}

async fn command<B: Backend>(bus: &EventBus<B>, cli: &Cli) -> Result<u8, Error> {
    let output = match &cli.command {
        Command::Status => render::status(&bus.stats().await.map_err(missing_tables)?),
        Command::Dead(DeadCommand::List {
            filter,
            limit,
            offset,
        }) => {
            let dead = bus
                .dead_letters(filter.query().limit(*limit).offset(*offset))
                .await
                .map_err(missing_tables)?;
            render::dead_letters(&dead)
        }
        Command::Dead(DeadCommand::Replay {
            event_id: Some(event_id),
            listener_id: Some(listener),
            ..
        }) => {
            let replayed = bus
                .replay(EventId::new(*event_id), listener)
                .await
                .map_err(missing_tables)?;
            if !replayed {
                eprintln!("error: no dead letter of event {event_id} for listener `{listener}`");
                return Ok(EXIT_NOT_FOUND);
            }
            Output::message(
                format!("replayed event {event_id} for listener `{listener}`\n"),
                json!({ "replayed": 1 }),
            )
        }
        Command::Dead(DeadCommand::Replay { filter, .. }) => {
            let replayed = bus
                .replay_dead(filter.query())
                .await
                .map_err(missing_tables)?;
            Output::message(
                format!("replayed {replayed} dead letters\n"),
                json!({ "replayed": replayed }),
            )
        }
        Command::Scheduled(ScheduledCommand::List { limit }) => {
            render::scheduled(&bus.scheduled(*limit).await.map_err(missing_tables)?)
        }
        Command::Purge { older_than } => {
            let purged = bus.purge_dead(*older_than).await.map_err(missing_tables)?;
            Output::message(
                format!("purged {purged} dead letters\n"),
                json!({ "purged": purged }),
            )
        }
        #[cfg(feature = "web")]
        Command::Web { bind, read_only } => return web(bus, *bind, *read_only).await,
        Command::Migrate | Command::Listeners => return Ok(EXIT_OK),
    };
    output.print(cli.json);
    Ok(EXIT_OK)
}

/// Serves the web console of `bus` on `bind` until Ctrl-C.
#[cfg(feature = "web")]
async fn web<B: Backend>(
    bus: &EventBus<B>,
    bind: std::net::SocketAddr,
    read_only: bool,
) -> Result<u8, Error> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|error| Error::Config(format!("could not listen on {bind}: {error}")))?;
    let router = if read_only {
        crate::web::router_read_only(bus.clone())
    } else {
        crate::web::router(bus.clone())
    };
    let at = listener.local_addr().unwrap_or(bind);
    eprintln!("the txbus console: http://{at}/ (Ctrl-C to stop)");
    if !at.ip().is_loopback() {
        eprintln!(
            "warning: the console has no authentication of its own, and {at} is reachable from              other hosts: put it behind a proxy that authenticates"
        );
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|error| Error::Config(format!("the console stopped: {error}")))?;
    Ok(EXIT_OK)
}

/// Adds a hint to errors that come from a database txbus was never set up on.
fn missing_tables(error: Error) -> Error {
    let message = error.to_string();
    let detail = format!("{}", Chain(&error));
    if detail.contains("txbus_") && (detail.contains("exist") || detail.contains("no such table")) {
        Error::Config(format!(
            "{message}: the txbus tables are missing; run `txbus migrate` ({detail})"
        ))
    } else {
        error
    }
}
