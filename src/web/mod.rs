//! A web console for operators (feature `web`): the backlog of every listener, the dead
//! letters, their replay and purge, in the browser; and the same data as JSON.
//!
//! [`router`] serves it for a bus; [`router_read_only`] serves the pages and the JSON without
//! the actions. The `txbus web --bind ADDR` command (features `cli` and `web`) serves it from the
//! command line.
//!
//! | path | what |
//! |---|---|
//! | `GET /` | overview: each listener's deliveries by state (a chart and a table), the oldest pending age, held keys, orphans, the inbox |
//! | `GET /dead` | dead letters, newest first, 50 a page: filters `listener`, `event`, `reason`, `since` (`2h`, `3d`), `page` |
//! | `GET /dead/{event_id}/{listener}` | one dead letter: its payload, last error, attempts and times |
//! | `POST /dead/replay` | replays one dead letter (`event_id`, `listener`) |
//! | `POST /dead/replay-all` | replays every dead letter that matches the filters |
//! | `POST /purge` | deletes the dead letters older than `older_than` (`30d`) |
//! | `GET /api/stats` | [`Stats`](crate::Stats) as JSON |
//! | `GET /api/dead` | [`DeadLetter`](crate::DeadLetter)s as JSON: the filters of `/dead`, and `limit` (at most 1,000), `offset` |
//!
//! The pages are plain server-rendered HTML: no script, nothing fetched from another host.
//! Everything that comes from the data (payloads, errors, names) is escaped. The actions are
//! `POST` forms that carry a token of this router (random, made when it is built), and a request
//! whose `Origin` is another host's is refused: another site cannot make a browser replay or
//! purge. Behind a reverse proxy that rewrites `Host`, have it send `X-Forwarded-Host`. A read-only router answers `405 Method Not Allowed` to every `POST`.
//!
//! **It has no authentication of its own.** Mount it behind your service's: anyone who can reach
//! it can read payloads and replay dead letters. For example, under `/txbus`, behind a check of
//! your own:
//!
//! ```no_run
//! use axum::{Router, extract::Request, http::StatusCode, middleware::{self, Next}, response::Response};
//!
//! async fn operators_only(request: Request, next: Next) -> Result<Response, StatusCode> {
//!     // Your service's own check: a session, a bearer token, mTLS, a VPN-only listener...
//!     let allowed = request.headers().get("authorization").is_some_and(|v| v == "Bearer s3cret");
//!     if allowed { Ok(next.run(request).await) } else { Err(StatusCode::UNAUTHORIZED) }
//! }
//!
//! # async fn run(bus: txbus::EventBus<txbus::Sqlite>) -> Result<(), Box<dyn std::error::Error>> {
//! let app = Router::new()
//!     .nest("/txbus", txbus::web::router(bus))
//!     .layer(middleware::from_fn(operators_only));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequestParts, NestedPath};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::bus::EventBus;
use crate::store::Backend;

mod handlers;
mod pages;

/// The console of `bus`, with its actions (replay, purge). Mount it where you like
/// (`Router::nest`); its links follow.
pub fn router<B: Backend>(bus: EventBus<B>) -> Router {
    build(bus, true)
}

/// The console of `bus` without its actions: its pages and JSON only; every `POST` is answered
/// `405 Method Not Allowed`.
pub fn router_read_only<B: Backend>(bus: EventBus<B>) -> Router {
    build(bus, false)
}

/// What the handlers share.
struct Console<B: Backend> {
    bus: EventBus<B>,
    /// The token the action forms carry.
    token: String,
    actions: bool,
}

type Shared<B> = Arc<Console<B>>;

fn build<B: Backend>(bus: EventBus<B>, actions: bool) -> Router {
    let console = Arc::new(Console {
        bus,
        token: new_token(),
        actions,
    });
    let pages = Router::new()
        .route("/", get(handlers::overview::<B>))
        .route("/dead", get(handlers::dead_letters::<B>))
        .route(
            "/dead/{event_id}/{listener}",
            get(handlers::dead_letter::<B>),
        )
        .route("/api/stats", get(handlers::api_stats::<B>))
        .route("/api/dead", get(handlers::api_dead::<B>));
    let routes = if actions {
        pages
            .route("/dead/replay", post(handlers::replay::<B>))
            .route("/dead/replay-all", post(handlers::replay_all::<B>))
            .route("/purge", post(handlers::purge::<B>))
    } else {
        pages
            .route("/dead/replay", post(read_only))
            .route("/dead/replay-all", post(read_only))
            .route("/purge", post(read_only))
    };
    routes
        .with_state(console)
        .layer(axum::middleware::map_response(secure_headers))
}

async fn read_only() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "GET")],
        "this console is read-only",
    )
        .into_response()
}

/// Keeps the pages to themselves: no script, no other host, no framing.
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// 32 random bytes from the operating system, in hex; without them (no randomness source at
/// all), a token no form carries, so that every action is refused rather than unprotected.
fn new_token() -> String {
    let mut bytes = [0_u8; 32];
    match getrandom::fill(&mut bytes) {
        Ok(()) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        Err(error) => {
            tracing::error!(%error, "no randomness for the web console's token; its actions are refused");
            String::new()
        }
    }
}

/// Whether a `POST` may act: it carries this console's token, and comes from a page of the
/// same host (its `Origin`, when the browser sends one, and its `Sec-Fetch-Site`). Behind a
/// reverse proxy that rewrites `Host`, the host the browser asked for is in `X-Forwarded-Host`:
/// either matches. (A page of another site can set neither `Origin` nor that header on a form
/// it submits.)
fn check_post(
    headers: &HeaderMap,
    expected: &str,
    token: Option<&str>,
) -> Result<(), &'static str> {
    let token = token.unwrap_or_default();
    if expected.is_empty() || !same_bytes(token.as_bytes(), expected.as_bytes()) {
        return Err("the form's token is missing or wrong: reload the page and try again");
    }
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(origin) = text(header::ORIGIN) {
        let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
        let forwarded = text(header::HeaderName::from_static("x-forwarded-host"))
            .map(|hosts| hosts.split(',').next().unwrap_or_default().trim());
        let same = [text(header::HOST), forwarded]
            .into_iter()
            .flatten()
            .any(|host| !host.is_empty() && origin_host.eq_ignore_ascii_case(host));
        if !same {
            return Err(
                "the request comes from another site (behind a proxy that rewrites \
                        Host, have it send X-Forwarded-Host)",
            );
        }
    }
    if text(header::HeaderName::from_static("sec-fetch-site"))
        .is_some_and(|site| site != "same-origin" && site != "none")
    {
        return Err("the request comes from another site");
    }
    Ok(())
}

/// Compares without stopping at the first difference.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Where the console is mounted (`""` at the root, `"/txbus"` when nested there): its links
/// start with it.
struct Base(String);

impl<S: Send + Sync> FromRequestParts<S> for Base {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        let base = parts
            .extensions
            .get::<NestedPath>()
            .map(|path| path.as_str().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        Ok(Self(base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    header::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn a_post_needs_the_token_and_the_same_origin() {
        let same = headers(&[
            ("host", "ops.example:8080"),
            ("origin", "https://ops.example:8080"),
        ]);
        assert_eq!(check_post(&same, "abc", Some("abc")), Ok(()));
        assert!(check_post(&same, "abc", Some("abd")).is_err());
        assert!(check_post(&same, "abc", None).is_err());
        assert!(
            check_post(&same, "", Some("")).is_err(),
            "no token, no actions"
        );
        let foreign = headers(&[
            ("host", "ops.example:8080"),
            ("origin", "https://evil.example"),
        ]);
        assert!(check_post(&foreign, "abc", Some("abc")).is_err());
        let opaque = headers(&[("host", "ops.example:8080"), ("origin", "null")]);
        assert!(check_post(&opaque, "abc", Some("abc")).is_err());
        let cross = headers(&[("host", "ops.example"), ("sec-fetch-site", "cross-site")]);
        assert!(check_post(&cross, "abc", Some("abc")).is_err());
        let plain = headers(&[("host", "ops.example")]);
        assert_eq!(check_post(&plain, "abc", Some("abc")), Ok(()));
        let proxied = headers(&[
            ("host", "127.0.0.1:8080"),
            ("x-forwarded-host", "ops.example"),
            ("origin", "https://ops.example"),
        ]);
        assert_eq!(check_post(&proxied, "abc", Some("abc")), Ok(()));
        let spoofed = headers(&[
            ("host", "127.0.0.1:8080"),
            ("x-forwarded-host", "ops.example"),
            ("origin", "https://evil.example"),
        ]);
        assert!(check_post(&spoofed, "abc", Some("abc")).is_err());
    }

    #[test]
    fn tokens_are_long_and_differ() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
