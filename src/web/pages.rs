//! The console's HTML, written with maud: every value it interpolates is escaped.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::handlers::{Filters, PAGE};
use crate::admin::DeadLetter;
use crate::delivery::DeadReason;
use crate::stats::{DeliveryCounts, Stats};

/// Everything but the unreserved characters of RFC 3986 is encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `value` as a path segment or a query value.
pub(super) fn encode(value: &str) -> impl std::fmt::Display + '_ {
    utf8_percent_encode(value, COMPONENT)
}

/// The states of a pending delivery and a dead one, with their colours in the chart.
const STATES: [(&str, &str); 6] = [
    ("due", "#2b6cb0"),
    ("running", "#2f855a"),
    ("stale", "#dd6b20"),
    ("retrying", "#d69e2e"),
    ("scheduled", "#a0aec0"),
    ("dead", "#c53030"),
];

const STYLE: &str = "
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1a202c; background: #f7fafc; }
header { background: #1a202c; color: #fff; padding: .6rem 1.5rem; display: flex; gap: 1.5rem; align-items: baseline; }
header a { color: #e2e8f0; text-decoration: none; } header strong { font-size: 1.15rem; }
main { padding: 1rem 1.5rem; max-width: 80rem; }
h1 { font-size: 1.3rem; margin: .5rem 0 1rem; } h2 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
table { border-collapse: collapse; background: #fff; margin-bottom: 1rem; }
th, td { padding: .3rem .7rem; border-bottom: 1px solid #e2e8f0; text-align: right; vertical-align: top; }
th { background: #edf2f7; font-weight: 600; } td.l, th.l { text-align: left; }
td.zero { color: #a0aec0; } td.bad { color: #c53030; font-weight: 600; } td.warn { color: #c05621; font-weight: 600; }
.cards { display: flex; gap: 1rem; flex-wrap: wrap; margin-bottom: 1rem; }
.card { background: #fff; border: 1px solid #e2e8f0; border-radius: 6px; padding: .6rem 1rem; min-width: 9rem; }
.card b { display: block; font-size: 1.6rem; } .card.bad b { color: #c53030; }
.notice { background: #ebf8ff; border: 1px solid #90cdf4; padding: .5rem 1rem; border-radius: 6px; }
.error { background: #fff5f5; border: 1px solid #feb2b2; padding: .5rem 1rem; border-radius: 6px; }
pre { background: #fff; border: 1px solid #e2e8f0; padding: .7rem; overflow: auto; max-height: 30rem; white-space: pre-wrap; word-break: break-word; }
form.inline { display: inline; } form.filters { display: flex; gap: .5rem; flex-wrap: wrap; align-items: end; margin-bottom: 1rem; }
label { display: flex; flex-direction: column; font-size: .85rem; color: #4a5568; }
input, select, button { font: inherit; padding: .2rem .4rem; }
button.act { background: #2b6cb0; color: #fff; border: 0; border-radius: 4px; padding: .3rem .8rem; cursor: pointer; }
button.danger { background: #c53030; }
.muted { color: #718096; } .legend span { margin-right: 1rem; } .legend i { display: inline-block; width: .8rem; height: .8rem; margin-right: .3rem; vertical-align: -1px; }
";

/// A page of the console: where it is mounted, and a notice from the action before.
pub(super) struct Page<'a> {
    base: &'a str,
    notice: Option<&'a str>,
}

impl<'a> Page<'a> {
    pub(super) fn new(base: &'a str, notice: Option<&'a str>) -> Self {
        Self { base, notice }
    }

    fn layout(&self, title: &str, body: Markup) -> Markup {
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · txbus" }
                    style { (PreEscaped(STYLE)) }
                }
                body {
                    header {
                        strong { "txbus" }
                        a href={ (self.base) "/" } { "Overview" }
                        a href={ (self.base) "/dead" } { "Dead letters" }
                        a href={ (self.base) "/api/stats" } { "JSON" }
                    }
                    main {
                        @if let Some(notice) = self.notice {
                            p.notice { (notice) }
                        }
                        (body)
                    }
                }
            }
        }
    }

    /// An error page with `status`.
    pub(super) fn error(&self, status: StatusCode, message: &str) -> Response {
        let body = html! {
            h1 { (status.canonical_reason().unwrap_or("Error")) }
            p.error { (message) }
            p { a href={ (self.base) "/" } { "Back to the overview" } }
        };
        (status, self.layout("Error", body)).into_response()
    }

    pub(super) fn overview(&self, stats: &Stats) -> Markup {
        let total = &stats.total;
        let held: u64 = stats.listeners.values().map(|c| c.held_keys).sum();
        let body = html! {
            h1 { "Overview" }
            div.cards {
                div.card { b { (total.pending()) } "pending" }
                div.card { b { (total.due) } "due now" }
                div.card.bad[total.stale > 0] { b { (total.stale) } "stale leases" }
                div.card.bad[total.dead > 0] { b { (total.dead) } "dead letters" }
                div.card { b { (age(total.oldest_pending_age)) } "oldest pending" }
                div.card.bad[held > 0] { b { (held) } "held keys" }
                div.card { b { (stats.inbox_ids) } "inbox ids" }
                div.card { b { (stats.inbox_messages) } "inbox messages" }
            }
            h2 { "Deliveries per listener" }
            (chart(stats))
            table {
                tr {
                    th.l { "listener" }
                    @for (state, _) in STATES { th { (state) } }
                    th { "delivered" } th { "oldest pending" } th { "held keys" }
                }
                @for (listener, counts) in &stats.listeners {
                    (self.listener_row(listener, counts))
                }
            }
            @if !stats.orphans.is_empty() {
                h2 { "Orphans" }
                p.muted { "Pending deliveries of listeners this instance does not have: they wait for an instance that has them, and expire as no_listener otherwise." }
                table {
                    tr { th.l { "listener" } th { "pending" } }
                    @for (listener, n) in &stats.orphans { tr { td.l { (listener) } td.warn { (n) } } }
                }
            }
            @if !stats.unknown_versions.is_empty() {
                h2 { "Newer event versions" }
                p.muted { "Pending deliveries stored by a newer version of their event than this instance knows: they wait for an instance that knows it." }
                table {
                    tr { th.l { "listener" } th { "pending" } }
                    @for (listener, n) in &stats.unknown_versions { tr { td.l { (listener) } td.warn { (n) } } }
                }
            }
        };
        self.layout("Overview", body)
    }

    fn listener_row(&self, listener: &str, c: &DeliveryCounts) -> Markup {
        let cells = [c.due, c.running, c.stale, c.retrying, c.scheduled, c.dead];
        html! {
            tr {
                td.l { (listener) }
                @for (i, n) in cells.into_iter().enumerate() {
                    @let class = match (n, i) { (0, _) => "zero", (_, 2) => "warn", (_, 5) => "bad", _ => "" };
                    td class=(class) {
                        @if i == 5 && n > 0 {
                            a href={ (self.base) "/dead?listener=" (encode(listener)) } { (n) }
                        } @else { (n) }
                    }
                }
                td.zero[c.delivered == 0] { (c.delivered) }
                td { (age(c.oldest_pending_age)) }
                td.bad[c.held_keys > 0] {
                    (c.held_keys)
                    @if let Some(oldest) = c.oldest_held_age { " (oldest " (age(Some(oldest))) ")" }
                }
            }
        }
    }

    pub(super) fn dead_letters(
        &self,
        filters: &Filters,
        dead: &[DeadLetter],
        page: usize,
        more: bool,
        token: Option<&str>,
    ) -> Markup {
        let query = filters.to_query();
        let link = |to: usize| {
            let mut href = format!("{}/dead?", self.base);
            if !query.is_empty() {
                let _ = write!(href, "{query}&");
            }
            let _ = write!(href, "page={to}");
            href
        };
        let body = html! {
            h1 { "Dead letters" }
            form.filters method="get" action={ (self.base) "/dead" } {
                label { "listener" input name="listener" value=(filters.listener); }
                label { "event" input name="event" value=(filters.event); }
                label { "reason" select name="reason" {
                    option value="" { "any" }
                    @for reason in DeadReason::ALL {
                        option value=(reason.as_str()) selected[filters.reason == reason.as_str()] { (reason.as_str()) }
                    }
                } }
                label { "died within" input name="since" size="6" placeholder="2h" value=(filters.since); }
                button type="submit" { "Filter" }
            }
            @if dead.is_empty() {
                p.muted { "No dead letter matches." }
            } @else {
                table {
                    tr { th.l { "died" } th.l { "event" } th.l { "listener" } th.l { "reason" } th { "attempts" } th.l { "last error" } }
                    @for d in dead {
                        tr {
                            td.l { (time(d.died_at)) }
                            td.l { a href=(self.dead_href(d)) { (d.event_id) } " " span.muted { (d.event_name) } }
                            td.l { (d.listener) }
                            td.l.bad { (d.reason.as_str()) }
                            td { (d.attempts) }
                            td.l { (short(d.last_error.as_deref().unwrap_or(""), 120)) }
                        }
                    }
                }
            }
            p {
                @if page > 0 { a href=(link(page - 1)) { "← newer" } " " }
                span.muted { "page " (page + 1) ", " (PAGE) " a page" }
                @if more { " " a href=(link(page + 1)) { "older →" } }
            }
            @if let Some(token) = token {
                @if !dead.is_empty() {
                    form.inline method="post" action={ (self.base) "/dead/replay-all" } {
                        input type="hidden" name="token" value=(token);
                        input type="hidden" name="listener" value=(filters.listener);
                        input type="hidden" name="event" value=(filters.event);
                        input type="hidden" name="reason" value=(filters.reason);
                        input type="hidden" name="since" value=(filters.since);
                        button.act type="submit" { "Replay every dead letter that matches" }
                    }
                }
                h2 { "Purge" }
                form.inline method="post" action={ (self.base) "/purge" } {
                    input type="hidden" name="token" value=(token);
                    "Delete the dead letters that died more than "
                    input name="older_than" size="6" value="30d";
                    " ago "
                    button.act.danger type="submit" { "Purge" }
                }
            }
        };
        self.layout("Dead letters", body)
    }

    fn dead_href(&self, d: &DeadLetter) -> String {
        format!("{}/dead/{}/{}", self.base, d.event_id, encode(&d.listener))
    }

    pub(super) fn dead_letter(&self, d: &DeadLetter, token: Option<&str>) -> Markup {
        let payload = serde_json::from_str::<serde_json::Value>(&d.payload)
            .and_then(|v| serde_json::to_string_pretty(&v))
            .unwrap_or_else(|_| d.payload.clone());
        let body = html! {
            h1 { "Dead letter: event " (d.event_id) " for " (d.listener) }
            table {
                tr { th.l { "event" } td.l { (d.event_id) " " (d.event_name) } }
                tr { th.l { "listener" } td.l { (d.listener) } }
                tr { th.l { "reason" } td.l.bad { (d.reason.as_str()) } }
                tr { th.l { "attempts" } td.l { (d.attempts) } }
                tr { th.l { "emitted" } td.l { (time(d.emitted_at)) } }
                tr { th.l { "died" } td.l { (time(d.died_at)) } }
            }
            @if let Some(token) = token {
                form method="post" action={ (self.base) "/dead/replay" } {
                    input type="hidden" name="token" value=(token);
                    input type="hidden" name="event_id" value=(d.event_id);
                    input type="hidden" name="listener" value=(d.listener);
                    button.act type="submit" { "Replay" }
                    span.muted { " makes it due now, with a fresh expiry; its attempts go on counting." }
                }
            }
            h2 { "Last error" }
            pre { (d.last_error.as_deref().unwrap_or("(none)")) }
            h2 { "Payload" }
            pre { (payload) }
        };
        self.layout("Dead letter", body)
    }
}

/// One bar of the chart: a listener, its segments (x, width, state index, count) and total.
struct Bar<'s> {
    listener: &'s str,
    segments: Vec<(f64, f64, usize, u64)>,
    total: u64,
    end: f64,
}

/// Each listener's pending and dead deliveries as stacked bars, on one scale.
fn chart(stats: &Stats) -> Markup {
    const LABEL: u32 = 260;
    const WIDTH: u32 = 520;
    const ROW: u32 = 24;
    let counts: Vec<(&str, [u64; 6])> = stats
        .listeners
        .iter()
        .map(|(l, c)| {
            (
                l.as_str(),
                [c.due, c.running, c.stale, c.retrying, c.scheduled, c.dead],
            )
        })
        .filter(|(_, counts)| counts.iter().any(|n| *n > 0))
        .collect();
    let Some(most) = counts.iter().map(|(_, c)| c.iter().sum::<u64>()).max() else {
        return html! { p.muted { "Nothing pending, nothing dead." } };
    };
    let scale = f64::from(WIDTH) / most as f64;
    let bars: Vec<Bar<'_>> = counts
        .iter()
        .map(|(listener, counts)| {
            let mut x = f64::from(LABEL);
            let mut segments = Vec::new();
            for (state, &n) in counts.iter().enumerate() {
                if n > 0 {
                    let width = (n as f64 * scale).max(2.0);
                    segments.push((x, width, state, n));
                    x += width;
                }
            }
            Bar {
                listener,
                segments,
                total: counts.iter().sum(),
                end: x,
            }
        })
        .collect();
    let height = ROW.saturating_mul(u32::try_from(bars.len()).unwrap_or(u32::MAX));
    html! {
        p.legend {
            @for (state, colour) in STATES { span { i style={ "background:" (colour) } {} (state) } }
        }
        svg xmlns="http://www.w3.org/2000/svg" width=(LABEL + WIDTH + 90) height=(height)
            role="img" aria-label="deliveries per listener and state" {
            @for (row, bar) in bars.iter().enumerate() {
                @let y = ROW.saturating_mul(u32::try_from(row).unwrap_or(0));
                text x=(LABEL - 8) y=(y + 16) text-anchor="end" font-size="13" { (short(bar.listener, 34)) }
                @for &(x, width, state, n) in &bar.segments {
                    rect x=(format!("{x:.1}")) y=(y + 4) width=(format!("{width:.1}")) height="16"
                        fill=(STATES[state].1) {
                        title { (STATES[state].0) ": " (n) }
                    }
                }
                text x=(format!("{:.1}", bar.end + 6.0)) y=(y + 16) font-size="12" fill="#4a5568" { (bar.total) }
            }
        }
    }
}

/// A time, in UTC to the second.
fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// An age to the second (to the millisecond below one), or a dash.
fn age(age: Option<Duration>) -> String {
    match age {
        None => "–".to_owned(),
        Some(age) if age < Duration::from_secs(1) => format!("{}ms", age.as_millis()),
        Some(age) => humantime::format_duration(Duration::from_secs(age.as_secs())).to_string(),
    }
}

/// At most `max` characters of `text`, with an ellipsis when cut.
fn short(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}
