//! W1 (feature `web`): the console's overview of a large table, against `stats()` on it.

use std::time::Instant;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use txbus::{Entity, EventBus};

use super::backends::{BenchBackend, bulk_backlog};
use super::{Args, BenchUser, Row};

/// The overview page (`GET /`, rendered to its last byte) of a table of `--memory-backlog`
/// pending deliveries (1,000,000 by default), against `bus.stats()` on the same table; the two
/// alternate their order round by round.
pub async fn w1<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    let payload = args.backlog_payload();
    let n = args.memory_backlog;
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    bulk_backlog::<B>(&db.pool, n, &payload).await;
    let bus = EventBus::builder(db.pool.clone())
        .poller(false)
        .build()
        .await
        .unwrap();
    let console = txbus::web::router(bus.clone());
    let mut row = Row {
        backend: B::NAME,
        scenario: "W1 console overview",
        case: format!("{n} pending deliveries"),
        unit: "ms",
        txbus: Vec::new(),
        baseline: Vec::new(),
        baseline_name: "bus.stats()",
        lower_is_better: true,
    };
    let overview = || async {
        let request = Request::get("/").body(Body::empty()).unwrap();
        let response = console.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let page = response.into_body().collect().await.unwrap().to_bytes();
        assert!(page.len() > 1000, "a whole page");
    };
    // One untimed pass of each warms the cache.
    overview().await;
    bus.stats().await.unwrap();
    for round in 0..args.rounds.max(5) {
        for turn in 0..2 {
            let started = Instant::now();
            if (round + turn) % 2 == 0 {
                overview().await;
                row.txbus.push(started.elapsed().as_secs_f64() * 1000.0);
            } else {
                let stats = bus.stats().await.unwrap();
                row.baseline.push(started.elapsed().as_secs_f64() * 1000.0);
                assert_eq!(stats.total.pending(), n as u64);
            }
        }
    }
    bus.shutdown().await;
    vec![row]
}
