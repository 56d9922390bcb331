//! The command line's arguments.

use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};

use crate::admin::DeadLetterQuery;

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
}
