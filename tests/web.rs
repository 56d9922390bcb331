//! The web console (feature `web`), called as a service (`tower::ServiceExt::oneshot`) on
//! PostgreSQL and SQLite: its pages and JSON show the data, its actions need the form's token
//! and the same origin, a replay through it runs, what users wrote is escaped, and the
//! read-only console refuses every `POST`.
#![cfg(all(feature = "web", feature = "postgres", feature = "sqlite"))]
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tower::ServiceExt;
use txbus::{Backend, Context, DeadLetterQuery, EventBus, EventId, ListenerError};

use support::{Probe, TestBackend, TestDb, eventually, fast_settings};

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "web.order")]
struct WebOrder {
    note: String,
}

/// Gives up on a first run whose note asks for it (with the note as its error), succeeds on
/// any other run.
#[txbus::listener(name = "web.checker")]
async fn checker(order: WebOrder, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, order.note.clone());
    if ctx.attempt() == 1 && order.note.contains("fail") {
        return Err(ListenerError::abort(format!("rejected: {}", order.note)));
    }
    Ok(())
}

/// A bus with its poller on, and its console.
async fn console<B: TestBackend>(db: &TestDb<B>, probe: &Arc<Probe>) -> EventBus<B> {
    EventBus::builder(db.another_pool().await)
        .state(probe.clone())
        .default_settings(fast_settings())
        .retry_every(Duration::from_millis(25))
        .build()
        .await
        .unwrap()
}

/// Emits an order whose first run gives up, and waits for its dead letter.
async fn dead_order<B: Backend>(bus: &EventBus<B>, note: &str) -> EventId {
    let id = bus
        .emit(
            WebOrder {
                note: note.to_owned(),
            },
            [],
        )
        .await
        .unwrap();
    eventually("the dead letter", || async {
        let dead = bus
            .dead_letters(DeadLetterQuery::new().event(id))
            .await
            .unwrap();
        (!dead.is_empty()).then_some(())
    })
    .await;
    id
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn call(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

async fn get(app: &Router, uri: &str) -> Answer {
    call(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

/// A form `POST` from a page of `origin` (none: no `Origin` header).
async fn post(app: &Router, uri: &str, origin: Option<&str>, form: &[(&str, &str)]) -> Answer {
    let body = form
        .iter()
        .map(|(k, v)| format!("{k}={}", urlencode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let mut request = Request::post(uri)
        .header(header::HOST, "console.test")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(origin) = origin {
        request = request.header(header::ORIGIN, origin);
    }
    call(app, request.body(Body::from(body)).unwrap()).await
}

fn urlencode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The token the page's forms carry.
fn token(page: &str) -> String {
    let at = page
        .find(r#"name="token" value=""#)
        .expect("a form with the token")
        + 20;
    page[at..].split('"').next().unwrap().to_owned()
}

const SAME: Option<&str> = Some("http://console.test");

async fn pages_and_json_show_the_data<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = console(&db, &probe).await;
    let dead = dead_order(&bus, "fail: out of stock").await;
    bus.emit_after(
        Duration::from_secs(3600),
        WebOrder {
            note: "later".into(),
        },
        [],
    )
    .await
    .unwrap();
    let app = txbus::web::router(bus.clone());

    let overview = get(&app, "/").await;
    assert_eq!(overview.status, StatusCode::OK);
    assert!(overview.body.contains("web.checker"), "{}", overview.body);
    assert!(overview.body.contains("<svg"), "the chart");
    assert!(
        overview.headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );

    let list = get(&app, "/dead").await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(list.body.contains(&format!("/dead/{dead}/web.checker")));
    assert!(list.body.contains("aborted"));
    assert!(list.body.contains("rejected: fail: out of stock"));
    let filtered = get(&app, "/dead?reason=expired&listener=web.checker").await;
    assert_eq!(filtered.status, StatusCode::OK);
    assert!(filtered.body.contains("No dead letter matches."));
    assert_eq!(
        get(&app, "/dead?since=soon").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(&app, "/dead?reason=tired").await.status,
        StatusCode::BAD_REQUEST
    );

    let one = get(&app, &format!("/dead/{dead}/web.checker")).await;
    assert_eq!(one.status, StatusCode::OK);
    assert!(
        one.body
            .contains("&quot;note&quot;: &quot;fail: out of stock&quot;"),
        "{}",
        one.body
    );
    assert!(one.body.contains("Replay"));
    assert_eq!(
        get(&app, "/dead/999999/web.checker").await.status,
        StatusCode::NOT_FOUND
    );

    let stats: serde_json::Value =
        serde_json::from_str(&get(&app, "/api/stats").await.body).unwrap();
    let expected = serde_json::to_value(bus.stats().await.unwrap()).unwrap();
    assert_eq!(stats["listeners"]["web.checker"]["dead"], 1);
    assert_eq!(stats["listeners"]["web.checker"]["scheduled"], 1);
    assert_eq!(stats["listeners"], expected["listeners"]);
    let api: serde_json::Value =
        serde_json::from_str(&get(&app, "/api/dead?listener=web.checker").await.body).unwrap();
    assert_eq!(api.as_array().unwrap().len(), 1);
    assert_eq!(api[0]["event_id"], dead.get());
    assert_eq!(api[0]["payload"]["note"], "fail: out of stock");
    assert_eq!(
        get(&app, "/api/dead?limit=5000").await.status,
        StatusCode::BAD_REQUEST
    );
    bus.shutdown().await;
}

async fn actions_need_the_token_and_the_same_origin<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = console(&db, &probe).await;
    let dead = dead_order(&bus, "fail").await;
    let app = txbus::web::router(bus.clone());
    let page = get(&app, &format!("/dead/{dead}/web.checker")).await.body;
    let token = token(&page);
    let id = dead.to_string();

    let refused = [
        post(
            &app,
            "/dead/replay",
            SAME,
            &[("event_id", &id), ("listener", "web.checker")],
        )
        .await,
        post(
            &app,
            "/dead/replay",
            SAME,
            &[
                ("token", "forged"),
                ("event_id", &id),
                ("listener", "web.checker"),
            ],
        )
        .await,
        post(
            &app,
            "/dead/replay",
            Some("https://evil.test"),
            &[
                ("token", &token),
                ("event_id", &id),
                ("listener", "web.checker"),
            ],
        )
        .await,
        post(
            &app,
            "/dead/replay-all",
            Some("https://evil.test"),
            &[("token", &token)],
        )
        .await,
        post(&app, "/purge", SAME, &[("older_than", "0s")]).await,
        post(
            &app,
            "/purge",
            Some("null"),
            &[("token", &token), ("older_than", "0s")],
        )
        .await,
    ];
    for answer in &refused {
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.body);
    }
    // Nothing changed: the dead letter is there, and its listener ran once.
    let still = bus.dead_letters(DeadLetterQuery::new()).await.unwrap();
    assert_eq!(still.len(), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(probe.calls().len(), 1);
    bus.shutdown().await;
}

async fn a_replay_through_the_form_runs<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = console(&db, &probe).await;
    let first = dead_order(&bus, "fail once").await;
    let second = dead_order(&bus, "fail twice").await;
    // Mounted under a path of the service's: its links and redirects follow.
    let app = Router::new().nest("/ops/txbus", txbus::web::router(bus.clone()));
    let page = get(&app, "/ops/txbus/dead").await;
    assert!(
        page.body.contains(r#"href="/ops/txbus/dead/"#),
        "links under the mount"
    );
    let token = token(&page.body);

    let id = first.to_string();
    let done = post(
        &app,
        "/ops/txbus/dead/replay",
        SAME,
        &[
            ("token", &token),
            ("event_id", &id),
            ("listener", "web.checker"),
        ],
    )
    .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    let location = done.headers[header::LOCATION].to_str().unwrap();
    assert!(
        location.starts_with("/ops/txbus/dead?notice=Replayed"),
        "{location}"
    );
    let notice = get(&app, location).await.body;
    assert!(notice.contains("Replayed event"), "the notice shows");
    eventually("the replayed run", || async {
        probe
            .calls()
            .iter()
            .any(|c| c.event_id == first && c.attempt == 2)
            .then_some(())
    })
    .await;

    // Replay all that match, then purge: nothing is left.
    let all = post(
        &app,
        "/ops/txbus/dead/replay-all",
        SAME,
        &[
            ("token", &token),
            ("listener", "web.checker"),
            ("reason", "aborted"),
        ],
    )
    .await;
    assert_eq!(all.status, StatusCode::SEE_OTHER);
    assert!(
        all.headers[header::LOCATION]
            .to_str()
            .unwrap()
            .contains("Replayed%201%20dead%20letters")
    );
    eventually("the second replayed run", || async {
        probe
            .calls()
            .iter()
            .any(|c| c.event_id == second && c.attempt == 2)
            .then_some(())
    })
    .await;
    support::idle(&bus).await;
    let purge = post(
        &app,
        "/ops/txbus/purge",
        SAME,
        &[("token", &token), ("older_than", "0s")],
    )
    .await;
    assert_eq!(purge.status, StatusCode::SEE_OTHER);
    assert!(
        purge.headers[header::LOCATION]
            .to_str()
            .unwrap()
            .contains("Purged%200%20dead%20letters")
    );
    let bad = post(
        &app,
        "/ops/txbus/purge",
        SAME,
        &[("token", &token), ("older_than", "a while")],
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        bus.dead_letters(DeadLetterQuery::new())
            .await
            .unwrap()
            .is_empty()
    );
    bus.shutdown().await;
}

async fn what_users_wrote_is_escaped<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = console(&db, &probe).await;
    let dead = dead_order(&bus, "<script>alert(1)</script> fail").await;
    let app = txbus::web::router(bus.clone());
    for uri in ["/dead".to_owned(), format!("/dead/{dead}/web.checker")] {
        let page = get(&app, &uri).await.body;
        assert!(!page.contains("<script>"), "{uri}: {page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{uri}: {page}"
        );
    }
    let notice = get(&app, "/?notice=%3Cimg%20src%3Dx%3E").await.body;
    assert!(!notice.contains("<img"));
    assert!(notice.contains("&lt;img src=x&gt;"));
    bus.shutdown().await;
}

async fn the_read_only_console_refuses_every_post<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = console(&db, &probe).await;
    let dead = dead_order(&bus, "fail").await;
    let app = txbus::web::router_read_only(bus.clone());
    let page = get(&app, &format!("/dead/{dead}/web.checker")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(!page.body.contains("name=\"token\""), "no action forms");
    let id = dead.to_string();
    for path in [
        "/dead/replay",
        "/dead/replay-all",
        "/purge",
        "/",
        "/dead",
        "/api/stats",
    ] {
        let answer = post(
            &app,
            path,
            SAME,
            &[("event_id", &id), ("listener", "web.checker")],
        )
        .await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
    }
    assert_eq!(
        bus.dead_letters(DeadLetterQuery::new())
            .await
            .unwrap()
            .len(),
        1
    );
    bus.shutdown().await;
}

macro_rules! backend_tests {
    ($($module:ident: $backend:ty),+ $(,)?) => {$(
        mod $module {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pages_and_json_show_the_data() {
                super::pages_and_json_show_the_data::<$backend>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn actions_need_the_token_and_the_same_origin() {
                super::actions_need_the_token_and_the_same_origin::<$backend>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_replay_through_the_form_runs() {
                super::a_replay_through_the_form_runs::<$backend>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn what_users_wrote_is_escaped() {
                super::what_users_wrote_is_escaped::<$backend>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_read_only_console_refuses_every_post() {
                super::the_read_only_console_refuses_every_post::<$backend>().await;
            }
        }
    )+};
}

backend_tests!(postgres: txbus::Postgres, sqlite: txbus::Sqlite);
