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

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::error::Chain;
use crate::registry::LISTENERS;
use crate::{
    Backend, DeadLetter, DeadLetterQuery, DeliveryCounts, Error, EventBus, EventId, Pool, Stats,
};

/// Success.
pub const EXIT_OK: u8 = 0;
/// The command failed: the database is unreachable, a statement failed, a table is missing.
pub const EXIT_ERROR: u8 = 1;
/// The command line is invalid.
pub const EXIT_USAGE: u8 = 2;
/// The dead letter to replay does not exist (`txbus dead replay EVENT LISTENER`).
pub const EXIT_NOT_FOUND: u8 = 3;

/// Inspect and repair a txbus database.
#[derive(Debug, Parser)]
#[command(
    name = "txbus",
    version,
    after_help = "Exit codes: 0 success, 1 error (database unreachable, statement failed), \
                  2 invalid arguments, 3 no such dead letter."
)]
struct Cli {
    /// The database: postgres://..., mysql://..., or a SQLite file path.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Deliveries by state, per listener; orphans; the inbox's size.
    Status,
    /// List, replay dead letters.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Delete dead letters that died longer ago than --older-than.
    Purge {
        /// How old: 90s, 30m, 12h, 14d.
        #[arg(long, value_parser = parse_duration)]
        older_than: Duration,
    },
    /// Apply txbus's migrations.
    Migrate,
    /// The listeners compiled into this binary.
    Listeners,
}

#[derive(Debug, Subcommand)]
enum DeadCommand {
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

/// Which dead letters.
#[derive(Debug, Args)]
struct Filter {
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
    fn query(&self) -> DeadLetterQuery {
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

/// Parses `90s`, `30m`, `12h`, `14d` (or a bare number of seconds).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration; write 90s, 30m, 12h or 14d"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`; use s, m, h or d"
            ));
        }
    };
    number
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{text}` is too long"))
}

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

async fn run(cli: Cli) -> Result<u8, Error> {
    if let Command::Listeners = cli.command {
        print(cli.json, listeners());
        return Ok(EXIT_OK);
    }
    let Some(url) = cli.database_url.as_deref() else {
        eprintln!("error: no database: pass --database-url or set DATABASE_URL");
        return Ok(EXIT_USAGE);
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return on::<crate::Postgres>(url, &cli).await;
        #[cfg(not(feature = "postgres"))]
        return not_built("postgres");
    }
    if url.starts_with("mysql://") {
        #[cfg(feature = "mysql")]
        return on::<crate::Mysql>(url, &cli).await;
        #[cfg(not(feature = "mysql"))]
        return not_built("mysql");
    }
    #[cfg(feature = "sqlite")]
    return on::<crate::Sqlite>(url.strip_prefix("sqlite://").unwrap_or(url), &cli).await;
    #[cfg(not(feature = "sqlite"))]
    not_built("sqlite")
}

#[allow(dead_code)]
fn not_built(feature: &str) -> Result<u8, Error> {
    Err(Error::Config(format!(
        "this txbus binary is built without the `{feature}` backend; build it with \
         `--features cli,{feature}`"
    )))
}

/// Output for people, or JSON for scripts.
struct Output {
    table: String,
    json: Value,
}

fn print(json: bool, output: Output) {
    if json {
        println!("{}", output.json);
    } else {
        print!("{}", output.table);
    }
}

async fn on<B: Backend>(url: &str, cli: &Cli) -> Result<u8, Error> {
    let pool = Pool::<B>::builder(url).max_size(2).connect().await?;
    if let Command::Migrate = cli.command {
        let applied = crate::migrate(&pool).await?;
        print(
            cli.json,
            Output {
                table: if applied.is_empty() {
                    "the database is up to date\n".to_owned()
                } else {
                    format!("applied {}\n", applied.join(", "))
                },
                json: json!({ "applied": applied }),
            },
        );
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
    match &cli.command {
        Command::Status => print(
            cli.json,
            status(&bus.stats().await.map_err(missing_tables)?),
        ),
        Command::Dead(DeadCommand::List { filter, limit }) => {
            let dead = bus
                .dead_letters(filter.query().limit(*limit))
                .await
                .map_err(missing_tables)?;
            print(cli.json, dead_letters(&dead));
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
            print(
                cli.json,
                Output {
                    table: format!("replayed event {event_id} for listener `{listener}`\n"),
                    json: json!({ "replayed": 1 }),
                },
            );
        }
        Command::Dead(DeadCommand::Replay { filter, .. }) => {
            let replayed = bus
                .replay_dead(filter.query())
                .await
                .map_err(missing_tables)?;
            print(
                cli.json,
                Output {
                    table: format!("replayed {replayed} dead letters\n"),
                    json: json!({ "replayed": replayed }),
                },
            );
        }
        Command::Purge { older_than } => {
            let purged = bus.purge_dead(*older_than).await.map_err(missing_tables)?;
            print(
                cli.json,
                Output {
                    table: format!("purged {purged} dead letters\n"),
                    json: json!({ "purged": purged }),
                },
            );
        }
        Command::Migrate | Command::Listeners => {}
    }
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

fn counts_json(counts: &DeliveryCounts) -> Value {
    json!({
        "due": counts.due,
        "running": counts.running,
        "stale": counts.stale,
        "retrying": counts.retrying,
        "dead": counts.dead,
        "delivered": counts.delivered,
        "pending": counts.pending(),
        "oldest_pending_age_seconds": counts.oldest_pending_age.map(|age| age.as_secs_f64()),
    })
}

fn status(stats: &Stats) -> Output {
    let mut rows = vec![
        [
            "LISTENER",
            "DUE",
            "RUNNING",
            "STALE",
            "RETRYING",
            "DEAD",
            "DELIVERED",
            "OLDEST",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let row = |name: &str, c: &DeliveryCounts| {
        vec![
            name.to_owned(),
            c.due.to_string(),
            c.running.to_string(),
            c.stale.to_string(),
            c.retrying.to_string(),
            c.dead.to_string(),
            c.delivered.to_string(),
            c.oldest_pending_age.map_or("-".to_owned(), age),
        ]
    };
    for (listener, counts) in &stats.listeners {
        let mark = if stats.orphans.contains_key(listener) {
            " *"
        } else {
            ""
        };
        rows.push(row(&format!("{listener}{mark}"), counts));
    }
    rows.push(row("TOTAL", &stats.total));
    let mut table = render(&rows);
    if !stats.orphans.is_empty() {
        table.push_str("* no listener of this binary takes these deliveries\n");
    }
    let _ = writeln!(
        table,
        "inbox: {} received message ids, {} stored messages",
        stats.inbox_ids, stats.inbox_messages
    );
    let json = json!({
        "total": counts_json(&stats.total),
        "listeners": stats.listeners.iter()
            .map(|(name, c)| (name.clone(), counts_json(c)))
            .collect::<serde_json::Map<_, _>>(),
        "orphans": stats.orphans,
        "inbox_ids": stats.inbox_ids,
        "inbox_messages": stats.inbox_messages,
    });
    Output { table, json }
}

fn dead_letters(dead: &[DeadLetter]) -> Output {
    let mut rows = vec![
        [
            "EVENT",
            "LISTENER",
            "EVENT NAME",
            "ATTEMPTS",
            "REASON",
            "DIED",
            "LAST ERROR",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for d in dead {
        let error = d.last_error.as_deref().unwrap_or("-");
        let error = match error.char_indices().nth(60) {
            Some((cut, _)) => format!("{}...", &error[..cut]),
            None => error.to_owned(),
        };
        rows.push(vec![
            d.event_id.to_string(),
            d.listener.clone(),
            d.event_name.clone(),
            d.attempts.to_string(),
            d.reason.to_string(),
            utc(d.died_at),
            error.replace('\n', " "),
        ]);
    }
    let mut table = render(&rows);
    let _ = writeln!(table, "{} dead letters", dead.len());
    let json = Value::Array(
        dead.iter()
            .map(|d| {
                json!({
                    "event_id": d.event_id.get(),
                    "event_name": d.event_name,
                    "listener": d.listener,
                    "attempts": d.attempts,
                    "reason": d.reason.as_str(),
                    "last_error": d.last_error,
                    "emitted_at": utc(d.emitted_at),
                    "died_at": utc(d.died_at),
                    "payload": serde_json::from_str::<Value>(&d.payload)
                        .unwrap_or_else(|_| Value::String(d.payload.clone())),
                })
            })
            .collect(),
    );
    Output { table, json }
}

fn listeners() -> Output {
    let mut defs: Vec<_> = LISTENERS.iter().collect();
    defs.sort_by_key(|def| def.id);
    let mut rows = vec![
        ["LISTENER", "EVENT", "KIND", "ALIASES", "DEFINED AT"]
            .map(String::from)
            .to_vec(),
    ];
    for def in &defs {
        rows.push(vec![
            def.id.to_owned(),
            def.event.to_owned(),
            kind(def).to_owned(),
            if def.aliases.is_empty() {
                "-".to_owned()
            } else {
                def.aliases.join(", ")
            },
            def.location(),
        ]);
    }
    let mut table = render(&rows);
    if defs.is_empty() {
        table.push_str(
            "no listeners are compiled into this binary; build the CLI into your service to see \
             yours (see the txbus::cli docs)\n",
        );
    }
    let json = Value::Array(
        defs.iter()
            .map(|def| {
                json!({
                    "id": def.id,
                    "event": def.event,
                    "kind": kind(def),
                    "aliases": def.aliases,
                    "defined_at": def.location(),
                })
            })
            .collect(),
    );
    Output { table, json }
}

fn kind(def: &crate::listener::ListenerDef) -> &'static str {
    if def.transactional().is_some() {
        "transactional"
    } else {
        "plain"
    }
}

/// Columns padded to their widest cell; columns of numbers are right-aligned, header included.
fn render(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let cells = |c: usize| rows.iter().filter_map(move |r| r.get(c));
    let widths: Vec<usize> = (0..columns)
        .map(|c| cells(c).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let numeric: Vec<bool> = (0..columns)
        .map(|c| {
            rows.len() > 1
                && cells(c)
                    .skip(1)
                    .all(|s| s == "-" || (!s.is_empty() && s.chars().all(|ch| ch.is_ascii_digit())))
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let pad = " ".repeat(widths[c].saturating_sub(cell.chars().count()));
            if c > 0 {
                line.push_str("  ");
            }
            if numeric[c] {
                line.push_str(&pad);
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&pad);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A short age: `42s`, `7m`, `3h`, `2d`.
fn age(age: Duration) -> String {
    let s = age.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// `2026-11-25T21:03:04Z`.
fn utc(time: SystemTime) -> String {
    let secs = match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("14d"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5w").unwrap_err().contains("unknown unit"));
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_640_584);
        assert_eq!(utc(t), "2026-11-25T21:03:04Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(utc(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn tables_align() {
        let rows = vec![
            vec!["A".to_owned(), "N".to_owned()],
            vec!["long name".to_owned(), "12".to_owned()],
        ];
        assert_eq!(render(&rows), "A           N\nlong name  12\n");
    }

    #[test]
    fn ages() {
        assert_eq!(age(Duration::from_secs(42)), "42s");
        assert_eq!(age(Duration::from_secs(7 * 60)), "7m");
        assert_eq!(age(Duration::from_secs(3 * 3600)), "3h");
        assert_eq!(age(Duration::from_secs(2 * 86_400)), "2d");
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
    }

    use clap::CommandFactory;
}
