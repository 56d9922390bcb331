//! The command line's arguments.

use std::time::{Duration, SystemTime};

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

use crate::admin::DeadLetterQuery;
use crate::delivery::DeadReason;

/// Inspect and repair a txbus database.
#[derive(Debug, Parser)]
#[command(
    name = "txbus",
    version,
    after_help = "Exit codes: 0 success, 1 error (database unreachable, statement failed), \
                  2 invalid arguments, 3 no such dead letter."
)]
pub(super) struct Cli {
    /// The database: postgres://..., mysql://..., or a SQLite file path.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub(super) database_url: Option<String>,

    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub(super) json: bool,

    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Debug, Subcommand)]
pub(super) enum Command {
    /// Deliveries by state, per listener; orphans; the inbox's size.
    Status,
    /// List, replay dead letters.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// List the deliveries of scheduled events not due yet.
    #[command(subcommand)]
    Scheduled(ScheduledCommand),
    /// Delete dead letters that died longer ago than --older-than.
    Purge {
        /// How old: 90s, 30m, 12h, 14d, 1h30m.
        #[arg(long, value_parser = parse_duration)]
        older_than: Duration,
    },
    /// Apply txbus's migrations.
    Migrate,
    /// The listeners compiled into this binary.
    Listeners,
    /// Serve the web console until Ctrl-C. It has no authentication of its own: keep it on
    /// localhost (the default), or behind a proxy that authenticates.
    #[cfg(feature = "web")]
    Web {
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: std::net::SocketAddr,
        /// Pages and JSON only: no replay, no purge.
        #[arg(long)]
        read_only: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum DeadCommand {
    /// Dead letters, newest first.
    List {
        #[command(flatten)]
        filter: Filter,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Skip this many first, to list the next page.
        #[arg(long, default_value_t = 0)]
        offset: usize,
    },
    /// Make dead letters pending again: one (EVENT_ID LISTENER), or every match of the filters
    /// with --all.
    Replay {
        /// The event of the dead letter.
        #[arg(requires = "listener_id", conflicts_with = "all")]
        event_id: Option<i64>,
        /// The listener of the dead letter.
        #[arg(id = "listener_id", value_name = "LISTENER")]
        listener_id: Option<String>,
        /// Replay every dead letter that matches the filters.
        #[arg(long, required_unless_present = "event_id")]
        all: bool,
        #[command(flatten)]
        filter: Filter,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum ScheduledCommand {
    /// Scheduled deliveries not due yet, soonest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

/// Which dead letters.
#[derive(Debug, Args)]
pub(super) struct Filter {
    /// Only those of this listener id.
    #[arg(long)]
    listener: Option<String>,
    /// Only those of events with this name.
    #[arg(long)]
    event_name: Option<String>,
    /// Only those that died within this time: 90s, 30m, 12h, 14d.
    #[arg(long, value_parser = parse_duration)]
    since: Option<Duration>,
    /// Only those that died for this reason.
    #[arg(long, value_parser = reason_parser())]
    reason: Option<DeadReason>,
}

/// Takes the code of one of [`DeadReason::ALL`], which clap lists in the help and in its error.
fn reason_parser() -> impl TypedValueParser<Value = DeadReason> {
    PossibleValuesParser::new(DeadReason::ALL.iter().map(|reason| reason.as_str()))
        .try_map(|code| code.parse::<DeadReason>())
}

impl Filter {
    pub(super) fn query(&self) -> DeadLetterQuery {
        let mut query = DeadLetterQuery::new();
        if let Some(listener) = &self.listener {
            query = query.listener(listener);
        }
        if let Some(name) = &self.event_name {
            query = query.event_name(name);
        }
        if let Some(reason) = self.reason {
            query = query.reason(reason);
        }
        if let Some(since) = self.since {
            query = query.died_after(
                SystemTime::now()
                    .checked_sub(since)
                    .unwrap_or(SystemTime::UNIX_EPOCH),
            );
        }
        query
    }
}

/// A duration in `humantime`'s notation (`90s`, `30m`, `12h`, `14d`, `1h30m`), or a bare number
/// of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).map_err(|error| {
        format!("`{text}` is not a duration ({error}); write 90s, 30m, 12h or 14d")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("14d"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(
            parse_duration("5w5x")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn the_command_line_parses() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["txbus", "dead", "replay", "7", "billing.charge"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Dead(DeadCommand::Replay {
                event_id: Some(7),
                ..
            })
        ));
        assert!(Cli::try_parse_from(["txbus", "dead", "replay"]).is_err());
        assert!(Cli::try_parse_from(["txbus", "dead", "replay", "7"]).is_err());
        assert!(
            Cli::try_parse_from(["txbus", "dead", "replay", "--all", "--listener", "x"]).is_ok()
        );
        assert!(Cli::try_parse_from(["txbus", "purge"]).is_err());
        let cli = Cli::try_parse_from(["txbus", "scheduled", "list", "--limit", "3"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Scheduled(ScheduledCommand::List { limit: 3 })
        ));
    }

    #[test]
    fn dead_filters_take_a_reason_and_an_offset() {
        let cli = Cli::try_parse_from([
            "txbus",
            "dead",
            "list",
            "--reason",
            "max_attempts",
            "--offset",
            "100",
        ])
        .unwrap();
        let Command::Dead(DeadCommand::List {
            filter,
            limit,
            offset,
        }) = cli.command
        else {
            panic!("{:?}", cli.command);
        };
        assert_eq!((limit, offset), (50, 100));
        assert_eq!(
            filter.query(),
            DeadLetterQuery::new().reason(DeadReason::MaxAttempts)
        );
        let cli = Cli::try_parse_from(["txbus", "dead", "list"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Dead(DeadCommand::List { offset: 0, .. })
        ));

        let cli = Cli::try_parse_from(["txbus", "dead", "replay", "--all", "--reason", "aborted"])
            .unwrap();
        let Command::Dead(DeadCommand::Replay { filter, .. }) = cli.command else {
            panic!("{:?}", cli.command);
        };
        assert_eq!(
            filter.query(),
            DeadLetterQuery::new().reason(DeadReason::Aborted)
        );
        // Pages are for listing: a replay takes every match.
        assert!(
            Cli::try_parse_from(["txbus", "dead", "replay", "--all", "--offset", "1"]).is_err()
        );

        let error =
            Cli::try_parse_from(["txbus", "dead", "list", "--reason", "exploded"]).unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::InvalidValue);
        let message = error.to_string();
        for reason in DeadReason::ALL {
            assert!(message.contains(reason.as_str()), "{message}");
        }
    }
}
