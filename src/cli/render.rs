//! What the command line prints: tables for people (`comfy-table`), JSON for scripts (serde).

use std::time::Duration;

use comfy_table::{CellAlignment, Table, presets};
use serde::Serialize;
use serde_json::{Value, json};

use crate::admin::{DeadLetter, rfc3339};
use crate::listener::ListenerDef;
use crate::registry::LISTENERS;
use crate::schedule::ScheduledDelivery;
use crate::stats::{DeliveryCounts, Stats};

/// Output for people, and the same for scripts.
pub(super) struct Output {
    pub(super) table: String,
    pub(super) json: Value,
}

impl Output {
    /// A one-line message, and its JSON.
    pub(super) fn message(table: String, json: Value) -> Self {
        Self { table, json }
    }

    /// Prints the JSON with `json`, the table otherwise.
    pub(super) fn print(&self, json: bool) {
        if json {
            println!("{}", self.json);
        } else {
            print!("{}", self.table);
        }
    }
}

/// Columns separated by two spaces, without borders; the columns in `right` right-aligned.
fn table(header: &[&str], rows: Vec<Vec<String>>, right: &[usize]) -> String {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(header.to_vec())
        .add_rows(rows);
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, 2));
        if right.contains(&i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
        .lines()
        .map(|line| format!("{}\n", line.trim_end()))
        .collect()
}

/// Deliveries by state, per listener.
pub(super) fn status(stats: &Stats) -> Output {
    let row = |name: String, c: &DeliveryCounts| {
        vec![
            name,
            c.due.to_string(),
            c.running.to_string(),
            c.stale.to_string(),
            c.retrying.to_string(),
            c.scheduled.to_string(),
            c.dead.to_string(),
            c.delivered.to_string(),
            c.oldest_pending_age.map_or("-".to_owned(), age),
        ]
    };
    let mut rows: Vec<Vec<String>> = stats
        .listeners
        .iter()
        .map(|(listener, counts)| {
            let mark = if stats.orphans.contains_key(listener) {
                " *"
            } else {
                ""
            };
            row(format!("{listener}{mark}"), counts)
        })
        .collect();
    rows.push(row("TOTAL".to_owned(), &stats.total));
    let header = [
        "LISTENER",
        "DUE",
        "RUNNING",
        "STALE",
        "RETRYING",
        "SCHEDULED",
        "DEAD",
        "DELIVERED",
        "OLDEST",
    ];
    let mut text = table(&header, rows, &[1, 2, 3, 4, 5, 6, 7, 8]);
    if !stats.orphans.is_empty() {
        text.push_str("* no listener of this binary takes these deliveries\n");
    }
    for (listener, counts) in &stats.listeners {
        if counts.held_keys > 0 {
            let keys = if counts.held_keys == 1 { "key" } else { "keys" };
            text.push_str(&format!(
                "{listener}: {} ordering {keys} held by dead letters, the oldest for {}: replay or purge them to release\n",
                counts.held_keys,
                counts.oldest_held_age.map_or("-".to_owned(), age),
            ));
        }
    }
    for (listener, n) in &stats.unknown_versions {
        text.push_str(&format!(
            "{listener}: {n} pending stored by a newer version of its event than this binary knows\n"
        ));
    }
    text.push_str(&format!(
        "inbox: {} received message ids, {} stored messages\n",
        stats.inbox_ids, stats.inbox_messages
    ));
    Output {
        table: text,
        json: serde_json::to_value(stats).unwrap_or(Value::Null),
    }
}

/// Dead letters, one per row, the error cut to 60 characters.
pub(super) fn dead_letters(dead: &[DeadLetter]) -> Output {
    let rows = dead
        .iter()
        .map(|d| {
            let error = d.last_error.as_deref().unwrap_or("-");
            let error = match error.char_indices().nth(60) {
                Some((cut, _)) => format!("{}...", &error[..cut]),
                None => error.to_owned(),
            };
            vec![
                d.event_id.to_string(),
                d.listener.clone(),
                d.event_name.clone(),
                d.attempts.to_string(),
                d.reason.to_string(),
                rfc3339(d.died_at),
                error.replace('\n', " "),
            ]
        })
        .collect();
    let header = [
        "EVENT",
        "LISTENER",
        "EVENT NAME",
        "ATTEMPTS",
        "REASON",
        "DIED",
        "LAST ERROR",
    ];
    let mut text = table(&header, rows, &[0, 3]);
    text.push_str(&format!("{} dead letters\n", dead.len()));
    Output {
        table: text,
        json: serde_json::to_value(dead).unwrap_or(Value::Null),
    }
}

/// Scheduled deliveries not due yet, one per row, soonest first.
pub(super) fn scheduled(scheduled: &[ScheduledDelivery]) -> Output {
    let rows = scheduled
        .iter()
        .map(|s| {
            vec![
                rfc3339(s.due_at),
                s.event_id.to_string(),
                s.event_name.clone(),
                s.listener.clone(),
            ]
        })
        .collect();
    let header = ["DUE", "EVENT", "EVENT NAME", "LISTENER"];
    let mut text = table(&header, rows, &[1]);
    text.push_str(&format!("{} scheduled deliveries\n", scheduled.len()));
    Output {
        table: text,
        json: serde_json::to_value(scheduled).unwrap_or(Value::Null),
    }
}

/// A listener compiled into the binary, for scripts.
#[derive(Serialize)]
struct ListenerInfo {
    id: &'static str,
    event: &'static str,
    kind: &'static str,
    aliases: &'static [&'static str],
    defined_at: String,
}

impl ListenerInfo {
    fn new(def: &ListenerDef) -> Self {
        Self {
            id: def.id,
            event: def.event,
            kind: if def.transactional().is_some() {
                "transactional"
            } else {
                "plain"
            },
            aliases: def.aliases,
            defined_at: def.location(),
        }
    }
}

/// The listeners compiled into this binary.
pub(super) fn listeners() -> Output {
    let mut defs: Vec<ListenerInfo> = LISTENERS.iter().map(ListenerInfo::new).collect();
    defs.sort_by_key(|def| def.id);
    let rows = defs
        .iter()
        .map(|def| {
            let aliases = if def.aliases.is_empty() {
                "-".to_owned()
            } else {
                def.aliases.join(", ")
            };
            vec![
                def.id.to_owned(),
                def.event.to_owned(),
                def.kind.to_owned(),
                aliases,
                def.defined_at.clone(),
            ]
        })
        .collect();
    let header = ["LISTENER", "EVENT", "KIND", "ALIASES", "DEFINED AT"];
    let mut text = table(&header, rows, &[]);
    if defs.is_empty() {
        text.push_str(
            "no listeners are compiled into this binary; build the CLI into your service to see \
             yours (see the txbus::cli docs)\n",
        );
    }
    Output {
        table: text,
        json: json!(defs),
    }
}

/// An age to the second: `42s`, `7m 3s`, `2days 4h 12m 1s`.
fn age(age: Duration) -> String {
    humantime::format_duration(Duration::from_secs(age.as_secs())).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_numbers_right() {
        let rows = vec![vec!["long name".to_owned(), "12".to_owned()]];
        assert_eq!(
            table(&["A", "N"], rows, &[1]),
            "A           N\nlong name  12\n"
        );
    }

    #[test]
    fn ages_are_whole_seconds() {
        assert_eq!(age(Duration::from_millis(42_700)), "42s");
        assert_eq!(age(Duration::from_secs(7 * 60 + 3)), "7m 3s");
    }

    #[test]
    fn status_lists_every_listener_and_the_total() {
        let mut stats = Stats::default();
        stats.listeners.insert(
            "billing".into(),
            DeliveryCounts {
                scheduled: 3,
                dead: 2,
                held_keys: 1,
                oldest_held_age: Some(Duration::from_secs(90)),
                ..DeliveryCounts::default()
            },
        );
        stats.total.dead = 2;
        let output = status(&stats);
        assert!(output.table.starts_with("LISTENER"), "{}", output.table);
        let billing: Vec<&str> = output
            .table
            .lines()
            .find(|l| l.starts_with("billing"))
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(billing, ["billing", "0", "0", "0", "0", "3", "2", "0", "-"]);
        assert_eq!(output.json["listeners"]["billing"]["dead"], 2);
        assert_eq!(output.json["listeners"]["billing"]["scheduled"], 3);
        assert_eq!(output.json["listeners"]["billing"]["held_keys"], 1);
        assert!(
            output
                .table
                .contains("billing: 1 ordering key held by dead letters, the oldest for 1m 30s"),
            "{}",
            output.table
        );
    }
}
