//! The console's requests: pages, JSON, and the actions.

use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::pages::{self, Page};
use super::{Base, Shared, check_post};
use crate::admin::DeadLetterQuery;
use crate::delivery::DeadReason;
use crate::error::{Chain, Error};
use crate::event::EventId;
use crate::store::Backend;

/// Dead letters on a page.
pub(super) const PAGE: usize = 50;
/// The most dead letters `GET /api/dead` returns at once.
const MAX_API_LIMIT: usize = 1000;
/// The longest notice a redirect may carry to the next page.
const MAX_NOTICE: usize = 300;

/// Which dead letters: the filters of the list, its replay and the JSON, as the forms send
/// them (empty for "any").
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(super) struct Filters {
    pub(super) listener: String,
    pub(super) event: String,
    pub(super) reason: String,
    /// How far back: `2h`, `3d`.
    pub(super) since: String,
}

impl Filters {
    /// The query they make, or what is wrong with them.
    fn query(&self) -> Result<DeadLetterQuery, String> {
        let mut query = DeadLetterQuery::new();
        if !self.listener.is_empty() {
            query = query.listener(self.listener.trim());
        }
        if !self.event.is_empty() {
            query = query.event_name(self.event.trim());
        }
        if !self.reason.is_empty() {
            let reason: DeadReason = self
                .reason
                .parse()
                .map_err(|_| format!("`{}` is not a reason a delivery dies for", self.reason))?;
            query = query.reason(reason);
        }
        if !self.since.is_empty() {
            let since = humantime::parse_duration(self.since.trim()).map_err(|error| {
                format!(
                    "`since` is `{}`: {error} (write it as 90s, 30m, 12h or 14d)",
                    self.since
                )
            })?;
            let after = SystemTime::now()
                .checked_sub(since)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            query = query.died_after(after);
        }
        Ok(query)
    }

    /// The filters as a query string (`listener=...&event=...`), without the empty ones.
    pub(super) fn to_query(&self) -> String {
        [
            ("listener", &self.listener),
            ("event", &self.event),
            ("reason", &self.reason),
            ("since", &self.since),
        ]
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(name, value)| format!("{name}={}", pages::encode(value)))
        .collect::<Vec<_>>()
        .join("&")
    }
}

/// A page's query: a notice from the action that led to it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Notice {
    notice: String,
}

impl Notice {
    fn get(&self) -> Option<&str> {
        (!self.notice.is_empty()).then_some(&self.notice)
    }
}

/// The list's query: its filters, its page (from 0), its notice.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct ListParams {
    #[serde(flatten)]
    filters: Filters,
    page: String,
    limit: String,
    offset: String,
    notice: String,
}

/// A count in a query, or what is wrong with it.
fn count(name: &str, value: &str, default: usize) -> Result<usize, String> {
    if value.is_empty() {
        return Ok(default);
    }
    value
        .trim()
        .parse()
        .map_err(|_| format!("`{name}` is `{value}`, not a whole number"))
}

pub(super) async fn overview<B: Backend>(
    State(console): State<Shared<B>>,
    Base(base): Base,
    Query(notice): Query<Notice>,
) -> Response {
    let page = Page::new(&base, notice.get());
    match console.bus.stats().await {
        Ok(stats) => page.overview(&stats).into_response(),
        Err(error) => failure(&page, &error),
    }
}

pub(super) async fn dead_letters<B: Backend>(
    State(console): State<Shared<B>>,
    Base(base): Base,
    Query(params): Query<ListParams>,
) -> Response {
    let page = Page::new(
        &base,
        (!params.notice.is_empty()).then_some(&*params.notice),
    );
    let (query, number) = match params
        .filters
        .query()
        .and_then(|query| Ok((query, count("page", &params.page, 0)?)))
    {
        Ok(parsed) => parsed,
        Err(message) => return page.error(StatusCode::BAD_REQUEST, &message),
    };
    let offset = number.saturating_mul(PAGE);
    match console
        .bus
        .dead_letters(query.offset(offset).limit(PAGE + 1))
        .await
    {
        Ok(mut dead) => {
            let more = dead.len() > PAGE;
            dead.truncate(PAGE);
            let token = console.actions.then_some(&*console.token);
            page.dead_letters(&params.filters, &dead, number, more, token)
                .into_response()
        }
        Err(error) => failure(&page, &error),
    }
}

pub(super) async fn dead_letter<B: Backend>(
    State(console): State<Shared<B>>,
    Base(base): Base,
    Path((event_id, listener)): Path<(i64, String)>,
) -> Response {
    let page = Page::new(&base, None);
    let query = DeadLetterQuery::new()
        .event(EventId::new(event_id))
        .listener(listener.clone())
        .limit(1);
    match console.bus.dead_letters(query).await {
        Ok(dead) => match dead.first() {
            Some(dead) => {
                let token = console.actions.then_some(&*console.token);
                page.dead_letter(dead, token).into_response()
            }
            None => page.error(
                StatusCode::NOT_FOUND,
                &format!(
                    "event {event_id} has no dead letter for listener `{listener}`: it was \
                     replayed, purged, or never died"
                ),
            ),
        },
        Err(error) => failure(&page, &error),
    }
}

pub(super) async fn api_stats<B: Backend>(State(console): State<Shared<B>>) -> Response {
    match console.bus.stats().await {
        Ok(stats) => Json(stats).into_response(),
        Err(error) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &Chain(&error).to_string(),
        ),
    }
}

pub(super) async fn api_dead<B: Backend>(
    State(console): State<Shared<B>>,
    Query(params): Query<ListParams>,
) -> Response {
    let parsed = params.filters.query().and_then(|query| {
        let limit = count("limit", &params.limit, PAGE)?;
        if limit > MAX_API_LIMIT {
            return Err(format!("`limit` is at most {MAX_API_LIMIT}"));
        }
        Ok(query
            .limit(limit)
            .offset(count("offset", &params.offset, 0)?))
    });
    let query = match parsed {
        Ok(query) => query,
        Err(message) => return api_error(StatusCode::BAD_REQUEST, &message),
    };
    match console.bus.dead_letters(query).await {
        Ok(dead) => Json(dead).into_response(),
        Err(error) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &Chain(&error).to_string(),
        ),
    }
}

/// The form of one dead letter's replay.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct ReplayForm {
    token: Option<String>,
    event_id: String,
    listener: String,
}

pub(super) async fn replay<B: Backend>(
    State(console): State<Shared<B>>,
    Base(base): Base,
    headers: HeaderMap,
    Form(form): Form<ReplayForm>,
) -> Response {
    let page = Page::new(&base, None);
    if let Err(reason) = check_post(&headers, &console.token, form.token.as_deref()) {
        return page.error(StatusCode::FORBIDDEN, reason);
    }
    let Ok(event_id) = form.event_id.trim().parse::<i64>() else {
        return page.error(
            StatusCode::BAD_REQUEST,
            &format!("`{}` is not an event id", form.event_id),
        );
    };
    match console
        .bus
        .replay(EventId::new(event_id), &form.listener)
        .await
    {
        Ok(true) => redirect(
            &base,
            "/dead",
            "",
            &format!(
                "Replayed event {event_id} for listener {}: it is due now.",
                form.listener
            ),
        ),
        Ok(false) => redirect(
            &base,
            "/dead",
            "",
            &format!(
                "Event {event_id} has no dead letter for listener {}: nothing replayed.",
                form.listener
            ),
        ),
        Err(error) => failure(&page, &error),
    }
}

/// The form of the replay of every match of the filters.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct ReplayAllForm {
    token: Option<String>,
    #[serde(flatten)]
    filters: Filters,
}

pub(super) async fn replay_all<B: Backend>(
    State(console): State<Shared<B>>,
    Base(base): Base,
    headers: HeaderMap,
    Form(form): Form<ReplayAllForm>,
) -> Response {
    let page = Page::new(&base, None);
    if let Err(reason) = check_post(&headers, &console.token, form.token.as_deref()) {
        return page.error(StatusCode::FORBIDDEN, reason);
    }
    let query = match form.filters.query() {
        Ok(query) => query,
        Err(message) => return page.error(StatusCode::BAD_REQUEST, &message),
    };
    match console.bus.replay_dead(query).await {
        Ok(replayed) => redirect(
            &base,
            "/dead",
            &form.filters.to_query(),
            &format!("Replayed {replayed} dead letters: they are due now."),
        ),
        Err(error) => failure(&page, &error),
    }
}

/// The form of the purge.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct PurgeForm {
    token: Option<String>,
    older_than: String,
}

pub(super) async fn purge<B: Backend>(
    State(console): State<Shared<B>>,
    Base(base): Base,
    headers: HeaderMap,
    Form(form): Form<PurgeForm>,
) -> Response {
    let page = Page::new(&base, None);
    if let Err(reason) = check_post(&headers, &console.token, form.token.as_deref()) {
        return page.error(StatusCode::FORBIDDEN, reason);
    }
    let older_than: Duration = match humantime::parse_duration(form.older_than.trim()) {
        Ok(older_than) => older_than,
        Err(error) => {
            return page.error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "`older than` is `{}`: {error} (write it as 90s, 30m, 12h or 14d)",
                    form.older_than
                ),
            );
        }
    };
    match console.bus.purge_dead(older_than).await {
        Ok(purged) => redirect(
            &base,
            "/dead",
            "",
            &format!(
                "Purged {purged} dead letters older than {}.",
                humantime::format_duration(older_than)
            ),
        ),
        Err(error) => failure(&page, &error),
    }
}

/// `303 See Other` to `path` of the console, with `query` and a notice for the page.
fn redirect(base: &str, path: &str, query: &str, notice: &str) -> Response {
    let notice: String = notice.chars().take(MAX_NOTICE).collect();
    let mut to = format!("{base}{path}?");
    if !query.is_empty() {
        to.push_str(query);
        to.push('&');
    }
    to.push_str("notice=");
    to.push_str(&pages::encode(&notice).to_string());
    Redirect::to(&to).into_response()
}

/// A database error, as a page.
fn failure(page: &Page<'_>, error: &Error) -> Response {
    tracing::warn!(error = %Chain(error), "a web console request failed");
    page.error(StatusCode::INTERNAL_SERVER_ERROR, &Chain(error).to_string())
}

fn api_error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}
