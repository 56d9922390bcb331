//! Metrics and tracing: with a `metrics` recorder and a `tracing` subscriber installed (both
//! global, so this binary runs one test), a scripted scenario on every backend produces the
//! documented metrics with the expected values, and spans for emit, dispatch, claim and each
//! listener run, where a listener's span follows from the span that emitted or claimed its
//! delivery.
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use serde::{Deserialize, Serialize};
use support::process::backends;
use support::{PATIENCE, TestBackend};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};
use txbus::{Context, EventBus, EventSettings, ListenerError};

const EVENTS: u64 = 3;

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "obs.order")]
struct Order {
    n: u32,
}

#[txbus::listener(name = "obs.ok")]
async fn ok(_order: Order) -> Result<(), ListenerError> {
    Ok(())
}

/// Fails the first attempt of each event.
#[txbus::listener(name = "obs.flaky")]
async fn flaky(_order: Order, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<AtomicU32>>()?
        .fetch_add(1, Ordering::SeqCst);
    if ctx.attempt() == 1 {
        Err("first attempt fails".into())
    } else {
        Ok(())
    }
}

#[txbus::listener(name = "obs.abort")]
async fn abort(_order: Order) -> Result<(), ListenerError> {
    Err(ListenerError::abort("not for us"))
}

/// Counters summed and histograms gathered over snapshots (a snapshot resets what it reads);
/// gauges as last read.
#[derive(Default, Debug)]
struct Collected {
    counters: HashMap<String, u64>,
    histograms: HashMap<String, usize>,
    gauges: HashMap<String, f64>,
}

impl Collected {
    fn take(&mut self, snapshotter: &Snapshotter) {
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let key = key.key();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            match value {
                DebugValue::Counter(n) => *self.counters.entry(name).or_default() += n,
                DebugValue::Histogram(values) => {
                    *self.histograms.entry(name).or_default() += values.len();
                }
                DebugValue::Gauge(value) => {
                    self.gauges.insert(name, value.into_inner());
                }
            }
        }
    }

    fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

/// A span as the subscriber saw it.
#[derive(Debug, Clone, Default)]
struct SpanRecord {
    name: &'static str,
    fields: HashMap<&'static str, String>,
    follows: Vec<u64>,
}

/// Records every span, its fields and what it follows from.
#[derive(Default)]
struct Spans {
    next: AtomicU64,
    spans: Mutex<HashMap<u64, SpanRecord>>,
    metadata: Mutex<HashMap<u64, &'static Metadata<'static>>>,
}

struct Fields<'a>(&'a mut HashMap<&'static str, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }
}

impl Subscriber for &'static Spans {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut record = SpanRecord {
            name: span.metadata().name(),
            ..SpanRecord::default()
        };
        span.record(&mut Fields(&mut record.fields));
        self.spans.lock().unwrap().insert(id, record);
        self.metadata.lock().unwrap().insert(id, span.metadata());
        Id::from_u64(id)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        if let Some(record) = self.spans.lock().unwrap().get_mut(&span.into_u64()) {
            values.record(&mut Fields(&mut record.fields));
        }
    }

    fn record_follows_from(&self, span: &Id, follows: &Id) {
        if let Some(record) = self.spans.lock().unwrap().get_mut(&span.into_u64()) {
            record.follows.push(follows.into_u64());
        }
    }

    fn event(&self, _: &Event<'_>) {}

    fn enter(&self, span: &Id) {
        ENTERED.with(|stack| stack.borrow_mut().push(span.clone()));
    }

    fn exit(&self, span: &Id) {
        ENTERED.with(|stack| {
            let mut stack = stack.borrow_mut();
            if let Some(at) = stack.iter().rposition(|s| s == span) {
                stack.remove(at);
            }
        });
    }

    fn current_span(&self) -> tracing_core::span::Current {
        ENTERED.with(|stack| match stack.borrow().last() {
            Some(id) => {
                let metadata = self.metadata.lock().unwrap().get(&id.into_u64()).copied();
                metadata.map_or_else(tracing_core::span::Current::none, |m| {
                    tracing_core::span::Current::new(id.clone(), m)
                })
            }
            None => tracing_core::span::Current::none(),
        })
    }
}

thread_local! {
    /// The spans entered on this thread, innermost last.
    static ENTERED: std::cell::RefCell<Vec<Id>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn installed() -> (&'static Snapshotter, &'static Spans) {
    static INSTALLED: OnceLock<(Snapshotter, &'static Spans)> = OnceLock::new();
    let (snapshotter, spans) = INSTALLED.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().unwrap();
        let spans: &'static Spans = Box::leak(Box::default());
        tracing::subscriber::set_global_default(spans).unwrap();
        (snapshotter, spans)
    });
    (snapshotter, spans)
}

async fn scenario<B: TestBackend>() {
    let (snapshotter, spans) = installed();
    let mut collected = Collected::default();
    collected.take(snapshotter);
    spans.spans.lock().unwrap().clear();

    let db = B::open().await;
    let bus = EventBus::builder(db.pool.clone())
        .state(Arc::new(AtomicU32::new(0)))
        .event::<Order>(EventSettings::default().retry_after(Duration::from_millis(50)))
        .retry_every(Duration::from_millis(20))
        .build()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for n in 0..EVENTS as u32 {
        ids.push(bus.emit(Order { n }, []).await.unwrap());
    }
    // Counted apart: not in the backlog.
    let later = Order { n: EVENTS as u32 };
    ids.push(
        bus.emit_after(Duration::from_secs(3600), later, [])
            .await
            .unwrap(),
    );

    // Until the results are all in and the poller has refreshed the gauges with them.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        collected.take(snapshotter);
        let dead = collected
            .gauges
            .get("txbus_dead_letters{listener=obs.abort}");
        let backlog = collected.gauges.get("txbus_backlog{listener=obs.flaky}");
        let scheduled = collected.gauges.get("txbus_scheduled{listener=obs.flaky}");
        if collected.counter("txbus_deliveries_total{listener=obs.flaky,outcome=succeeded}")
            == EVENTS
            && dead == Some(&(EVENTS as f64))
            && backlog == Some(&0.0)
            && scheduled == Some(&1.0)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "[{}] metrics did not settle: {collected:#?}",
            B::NAME
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bus.shutdown().await;

    let expected_counters = [
        ("txbus_events_emitted_total{event=obs.order}", EVENTS + 1),
        (
            "txbus_deliveries_total{listener=obs.ok,outcome=succeeded}",
            EVENTS,
        ),
        (
            "txbus_deliveries_total{listener=obs.flaky,outcome=failed}",
            EVENTS,
        ),
        (
            "txbus_deliveries_total{listener=obs.flaky,outcome=succeeded}",
            EVENTS,
        ),
        (
            "txbus_deliveries_total{listener=obs.abort,outcome=aborted}",
            EVENTS,
        ),
        (
            "txbus_dead_letters_total{listener=obs.abort,reason=aborted}",
            EVENTS,
        ),
    ];
    for (name, value) in expected_counters {
        assert_eq!(
            collected.counter(name),
            value,
            "[{}] {name}: {collected:#?}",
            B::NAME
        );
    }
    let runs: u64 = collected
        .counters
        .iter()
        .filter(|(name, _)| name.starts_with("txbus_deliveries_total"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(runs, 4 * EVENTS, "no other outcome: {collected:#?}");
    for (listener, samples) in [
        ("obs.ok", EVENTS),
        ("obs.flaky", 2 * EVENTS),
        ("obs.abort", EVENTS),
    ] {
        let name = format!("txbus_listener_duration_seconds{{listener={listener}}}");
        assert_eq!(
            collected.histograms.get(&name).copied(),
            Some(samples as usize),
            "{name}"
        );
    }
    // The scheduled event is pending, but does not wait to run yet.
    assert_eq!(
        collected
            .gauges
            .get("txbus_oldest_pending_seconds{listener=obs.ok}"),
        Some(&0.0)
    );

    // Spans: one per emit, one per run; first runs follow from their emit, retries from a claim.
    let spans = spans.spans.lock().unwrap().clone();
    let named = |name: &'static str| spans.values().filter(move |s| s.name == name);
    let emits: Vec<_> = named("txbus.emit")
        .filter(|s| s.fields.get("event").map(String::as_str) == Some("obs.order"))
        .collect();
    assert_eq!(emits.len(), EVENTS as usize + 1);
    let emitted_ids: Vec<String> = ids.iter().map(|id| id.get().to_string()).collect();
    for emit in &emits {
        assert!(emitted_ids.contains(&emit.fields["event_id"]), "{emit:?}");
    }
    let runs: Vec<_> = named("txbus.listener").collect();
    assert_eq!(runs.len(), 4 * EVENTS as usize, "{runs:#?}");
    for run in &runs {
        for field in ["event", "event_id", "listener", "attempt"] {
            assert!(run.fields.contains_key(field), "{field} missing: {run:?}");
        }
        let parent = run.follows.first().and_then(|id| spans.get(id));
        let parent = parent.unwrap_or_else(|| panic!("a run follows from nothing: {run:?}"));
        match run.fields["attempt"].as_str() {
            "1" => {
                assert_eq!(parent.name, "txbus.emit", "{run:?}");
                assert_eq!(parent.fields["event_id"], run.fields["event_id"]);
            }
            _ => assert_eq!(parent.name, "txbus.claim", "{run:?}"),
        }
    }
    assert!(named("txbus.claim").any(|s| s.fields.get("claimed").is_some_and(|n| n != "0")));
    assert!(
        named("txbus.dispatch").count() >= EVENTS as usize,
        "every emit hands its deliveries over in a dispatch span"
    );
}

#[test]
fn metrics_and_spans() {
    for backend in backends() {
        support::process::runtime().block_on(async { txbus_with_backend(backend).await });
    }
}

async fn txbus_with_backend(backend: &str) {
    match backend {
        #[cfg(feature = "postgres")]
        "postgres" => scenario::<txbus::Postgres>().await,
        #[cfg(feature = "mysql")]
        "mysql" => scenario::<txbus::Mysql>().await,
        #[cfg(feature = "sqlite")]
        "sqlite" => scenario::<txbus::Sqlite>().await,
        other => panic!("unknown backend {other}"),
    }
}
