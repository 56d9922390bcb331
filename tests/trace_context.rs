//! Trace context (feature `opentelemetry`): a listener's run continues the trace of the span
//! that emitted its event, on the first run, on a retry by another bus, after a replay, and in
//! another service across NATS. Spans go to an in-memory exporter through a `tracing`
//! subscriber with the OpenTelemetry layer, installed once for the whole binary.
//!
//! Needs NATS with JetStream at `TXBUS_TEST_NATS_URL` (default `127.0.0.1:4222`) for the
//! test across services.
#![cfg(all(
    feature = "opentelemetry",
    feature = "nats",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite"
))]
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use txbus::nats::{JetStreamInbox, JetStreamRelay};
use txbus::{Context, EventBus, EventId, ListenerError};

use support::{TestBackend, eventually, fast_settings, unique};

/// The spans of every test, exported when they end.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        // The default sampler: parent-based, sampling every root.
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("txbus-tests")));
        tracing::subscriber::set_global_default(subscriber).unwrap();
        exporter
    })
}

/// The exported spans of trace `trace`.
fn spans_of(trace: TraceId) -> Vec<SpanData> {
    exporter()
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|span| span.span_context.trace_id() == trace)
        .collect()
}

/// The exported span `span`, once it has ended.
async fn exported(span: &SpanContext) -> SpanData {
    eventually(
        &format!("span {} to be exported", span.span_id()),
        || async {
            exporter()
                .get_finished_spans()
                .unwrap()
                .into_iter()
                .find(|data| data.span_context.span_id() == span.span_id())
        },
    )
    .await
}

/// The exported span of trace `trace` named `name`, once it has ended.
async fn exported_named(trace: TraceId, name: &str) -> SpanData {
    eventually(&format!("a span `{name}` in trace {trace}"), || async {
        spans_of(trace).into_iter().find(|span| span.name == name)
    })
    .await
}

fn attribute_of(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// A span that stands for the request that emits, and its OpenTelemetry span context.
fn request_span() -> (tracing::Span, SpanContext) {
    exporter();
    let span = tracing::info_span!("request");
    let context = span.context().span().span_context().clone();
    assert!(context.is_valid() && context.is_sampled());
    (span, context)
}

/// One run of a listener: its attempt, what `Context::traceparent()` said, and the
/// OpenTelemetry context of its own span.
#[derive(Debug, Clone)]
struct Run {
    attempt: u32,
    traceparent: Option<String>,
    span: SpanContext,
}

/// What the listeners of one test saw, per event.
#[derive(Default)]
struct Runs(Mutex<Vec<(EventId, Run)>>);

impl Runs {
    fn record(&self, ctx: &Context) {
        let span = tracing::Span::current()
            .context()
            .span()
            .span_context()
            .clone();
        self.0.lock().unwrap().push((
            ctx.event_id(),
            Run {
                attempt: ctx.attempt(),
                traceparent: ctx.traceparent().map(str::to_owned),
                span,
            },
        ));
    }

    fn of(&self, event: EventId) -> Vec<Run> {
        let runs = self.0.lock().unwrap();
        runs.iter()
            .filter(|(id, _)| *id == event)
            .map(|(_, run)| run.clone())
            .collect()
    }

    async fn wait(&self, event: EventId, n: usize) -> Vec<Run> {
        eventually(&format!("{n} runs of event {event}"), || async {
            let runs = self.of(event);
            (runs.len() >= n).then_some(runs)
        })
        .await
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "trace.flaky")]
struct Flaky {
    n: u32,
}

/// Fails its first run, gives up on its second (a dead letter), succeeds once replayed.
#[txbus::listener(name = "trace.flaky_listener")]
async fn flaky_listener(_event: Flaky, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Runs>>()?.record(&ctx);
    match ctx.attempt() {
        1 => Err("the first run fails".into()),
        2 => Err(ListenerError::abort("the second run gives up")),
        _ => Ok(()),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "trace.kept")]
struct Kept {
    n: u32,
}

/// Gives up at once, so that the delivery stays in the table for the test to read.
#[txbus::listener(name = "trace.kept_listener")]
async fn kept_listener(_event: Kept, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Runs>>()?.record(&ctx);
    Err(ListenerError::abort("kept as a dead letter"))
}

/// The request's trace, through a failed first run on the emitting bus, its retry by the
/// poller of a second bus on the same database, and the replay of its dead letter.
async fn one_trace_from_the_request_to_the_replay<B: TestBackend>() {
    let db = B::open().await;
    let runs = Arc::new(Runs::default());
    let settings = fast_settings().retry_after(Duration::from_millis(10));
    let emitter = EventBus::builder(db.another_pool().await)
        .state(runs.clone())
        .default_settings(settings)
        .poller(false)
        .build()
        .await
        .unwrap();
    let retrier = EventBus::builder(db.another_pool().await)
        .state(runs.clone())
        .default_settings(settings)
        .retry_every(Duration::from_millis(25))
        .build()
        .await
        .unwrap();

    let (request, context) = request_span();
    let id = async { emitter.emit(Flaky { n: 1 }, []).await }
        .instrument(request.clone())
        .await
        .unwrap();
    drop(request);
    runs.wait(id, 2).await;
    eventually("the dead letter, with its trace context", || async {
        let stored = B::count(
            &db.pool,
            "SELECT count(*) AS n FROM txbus_deliveries \
             WHERE trace_context IS NOT NULL AND dead_at IS NOT NULL",
        );
        (stored.await == 1).then_some(())
    })
    .await;
    assert!(emitter.replay(id, "trace.flaky_listener").await.unwrap());
    let seen = runs.wait(id, 3).await;

    let traceparent = format!("00-{}-{}-01", context.trace_id(), context.span_id());
    assert_eq!(
        seen.iter().map(|run| run.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    for run in &seen {
        assert_eq!(
            run.traceparent.as_deref(),
            Some(&*traceparent),
            "the request's context"
        );
        let span = exported(&run.span).await;
        assert_eq!(span.span_context.trace_id(), context.trace_id());
        assert_eq!(
            span.parent_span_id,
            context.span_id(),
            "a child of the request"
        );
        assert_eq!(span.name, "process trace.flaky_listener");
        assert_eq!(
            attribute_of(&span, "messaging.system").as_deref(),
            Some("txbus")
        );
        assert_eq!(
            attribute_of(&span, "messaging.destination.name").as_deref(),
            Some("trace.flaky_listener")
        );
        assert_eq!(
            attribute_of(&span, "messaging.message.id"),
            Some(id.to_string())
        );
        assert_eq!(
            attribute_of(&span, "attempt"),
            Some(run.attempt.to_string())
        );
        assert_eq!(attribute_of(&span, "event").as_deref(), Some("trace.flaky"));
    }
    let names: Vec<String> = spans_of(context.trace_id())
        .into_iter()
        .map(|span| span.name.into_owned())
        .collect();
    assert!(names.iter().any(|name| name == "request"), "{names:?}");
    assert!(names.iter().any(|name| name == "txbus.emit"), "{names:?}");
    emitter.shutdown().await;
    retrier.shutdown().await;
}

/// An emit outside any span stores no context, and its listener's span is a root.
async fn an_emit_outside_any_span_stores_nothing<B: TestBackend>() {
    exporter();
    let db = B::open().await;
    let runs = Arc::new(Runs::default());
    let bus = EventBus::builder(db.another_pool().await)
        .state(runs.clone())
        .default_settings(fast_settings())
        .build()
        .await
        .unwrap();
    let id = bus.emit(Kept { n: 1 }, []).await.unwrap();
    let run = runs.wait(id, 1).await.remove(0);
    assert_eq!(run.traceparent, None);
    let span = exported(&run.span).await;
    assert_eq!(span.parent_span_id, SpanId::INVALID, "a root");
    assert!(!span.parent_span_is_remote);
    support::idle(&bus).await;
    let stored = B::count(
        &db.pool,
        "SELECT count(*) AS n FROM txbus_deliveries WHERE trace_context IS NULL AND dead_at IS NOT NULL",
    );
    assert_eq!(stored.await, 1, "nothing stored");
    bus.shutdown().await;
}

/// An unsampled request stays unsampled in its listener: the context carries its flag, and no
/// sampled root starts in its place.
async fn an_unsampled_context_is_carried_as_unsampled<B: TestBackend>() {
    exporter();
    let db = B::open().await;
    let runs = Arc::new(Runs::default());
    let bus = EventBus::builder(db.another_pool().await)
        .state(runs.clone())
        .default_settings(fast_settings())
        .build()
        .await
        .unwrap();
    // A request whose caller decided not to sample it.
    let trace = TraceId::from_bytes(*b"unsampled trace!");
    let caller = SpanContext::new(
        trace,
        SpanId::from_bytes(*b"caller!!"),
        opentelemetry::trace::TraceFlags::default(),
        true,
        Default::default(),
    );
    let request = tracing::info_span!("unsampled request");
    request
        .set_parent(opentelemetry::Context::new().with_remote_span_context(caller))
        .unwrap();
    let id = async { bus.emit(Kept { n: 2 }, []).await }
        .instrument(request.clone())
        .await
        .unwrap();
    let run = runs.wait(id, 1).await.remove(0);
    let parent = run.traceparent.expect("the unsampled context is stored");
    assert!(parent.starts_with(&format!("00-{trace}-")), "{parent}");
    assert!(parent.ends_with("-00"), "not sampled: {parent}");
    assert_eq!(
        run.span.trace_id(),
        trace,
        "the run is in the caller's trace"
    );
    assert!(!run.span.is_sampled(), "and not sampled");
    drop(request);
    support::idle(&bus).await;
    bus.shutdown().await;
    // The run has ended (the bus is idle): nothing of the trace was exported, and no new root
    // was started in its place.
    assert!(spans_of(trace).is_empty());
    let exported = exporter().get_finished_spans().unwrap();
    assert!(
        exported
            .iter()
            .all(|data| data.span_context.span_id() != run.span.span_id())
    );
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "trace.noted")]
struct Noted {
    n: u32,
}

#[txbus::listener(name = "trace.noted_listener")]
async fn noted_listener(_event: Noted, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Runs>>()?.record(&ctx);
    Ok(())
}

/// `emit_after`, `receive`, and in a transaction `tx.emit` and `tx.emit_after`: every run is
/// in the request's trace, a child of the span the event was emitted in (in a transaction,
/// `txbus.transaction`).
async fn every_way_to_emit_continues_the_trace<B: TestBackend>() {
    let db = B::open().await;
    let runs = Arc::new(Runs::default());
    let bus = EventBus::builder(db.another_pool().await)
        .state(runs.clone())
        .default_settings(fast_settings())
        .retry_every(Duration::from_millis(25))
        .build()
        .await
        .unwrap();
    let (request, context) = request_span();
    let soon = Duration::from_millis(10);
    let (scheduled, received, in_tx, scheduled_in_tx) = async {
        let scheduled = bus.emit_after(soon, Noted { n: 1 }, []).await.unwrap();
        let received = match bus
            .receive(txbus::MessageId::new("trace", unique("m")), Noted { n: 2 })
            .await
            .unwrap()
        {
            txbus::Received::Accepted(id) => id,
            other => panic!("{other:?}"),
        };
        let (in_tx, scheduled_in_tx) = bus
            .transaction(async |tx| {
                let a = tx.emit(&Noted { n: 3 }).await?;
                let b = tx.emit_after(soon, &Noted { n: 4 }).await?;
                Ok::<_, txbus::Error>((a, b))
            })
            .await
            .unwrap();
        (scheduled, received, in_tx, scheduled_in_tx)
    }
    .instrument(request.clone())
    .await;
    drop(request);
    let transaction = exported_named(context.trace_id(), "txbus.transaction").await;
    assert_eq!(transaction.parent_span_id, context.span_id());
    for (id, parent) in [
        (scheduled, context.span_id()),
        (received, context.span_id()),
        (in_tx, transaction.span_context.span_id()),
        (scheduled_in_tx, transaction.span_context.span_id()),
    ] {
        let run = runs.wait(id, 1).await.remove(0);
        assert_eq!(
            run.traceparent,
            Some(format!("00-{}-{parent}-01", context.trace_id()))
        );
        let span = exported(&run.span).await;
        assert_eq!(span.span_context.trace_id(), context.trace_id());
        assert_eq!(span.parent_span_id, parent, "event {id}");
    }
    bus.shutdown().await;
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "trace.shipped")]
struct Shipped {
    id: i64,
}

/// The same message in the receiving service.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "trace_b.shipped")]
struct Arrived {
    id: i64,
}

#[txbus::listener(name = "trace_b.arrived")]
async fn arrived(_event: Arrived, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Runs>>()?.record(&ctx);
    Ok(())
}

fn nats_url() -> String {
    std::env::var("TXBUS_TEST_NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned())
}

/// Service A emits in a request and relays to JetStream; service B's inbox receives it, and
/// B's listener span is in A's trace, a child of A's publish.
async fn a_trace_crosses_nats<B: TestBackend>() {
    let url = nats_url();
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(&url)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "NATS is not reachable at {url} ({e}); start it with `start-stop-daemon --start \
                 --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js \
                 -sd /var/lib/nats-server`, or set TXBUS_TEST_NATS_URL"
            )
        });
    let js = jetstream::new(client);
    let stream_name = unique("TXBUS_TRACE");
    js.create_stream(stream::Config {
        name: stream_name.clone(),
        subjects: vec![format!("{stream_name}.>")],
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("could not create a stream (is JetStream on? `-js`): {e}"));
    let subject = format!("{stream_name}.shipped");

    let a_db = B::open().await;
    let b_db = B::open().await;
    let a = EventBus::builder(a_db.another_pool().await)
        .default_settings(fast_settings())
        .relay(JetStreamRelay::new(js.clone()).route::<Shipped>(&subject))
        .build()
        .await
        .unwrap();
    let runs = Arc::new(Runs::default());
    let b = EventBus::builder(b_db.another_pool().await)
        .state(runs.clone())
        .default_settings(fast_settings())
        .build()
        .await
        .unwrap();
    let consumer = js
        .get_stream(&stream_name)
        .await
        .unwrap()
        .create_consumer(pull::Config {
            durable_name: Some("b".to_owned()),
            ..Default::default()
        })
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let inbox = tokio::spawn(
        JetStreamInbox::new(b.clone(), consumer)
            .event_as::<Arrived>(<Shipped as txbus::Event>::NAME)
            .run_until(async move {
                let _ = stopped.await;
            }),
    );

    let (request, context) = request_span();
    async { a.emit(Shipped { id: 7 }, []).await }
        .instrument(request.clone())
        .await
        .unwrap();
    drop(request);
    let received = eventually("B's listener to run", || async {
        let runs = runs.0.lock().unwrap();
        runs.first().map(|(_, run)| run.clone())
    })
    .await;

    let publish = exported_named(context.trace_id(), &format!("send {subject}")).await;
    assert_eq!(
        attribute_of(&publish, "messaging.destination.name"),
        Some(subject.clone())
    );
    let b_span = exported(&received.span).await;
    assert_eq!(b_span.name, "process trace_b.arrived");
    assert_eq!(
        b_span.span_context.trace_id(),
        context.trace_id(),
        "in A's trace"
    );
    assert_eq!(
        b_span.parent_span_id,
        publish.span_context.span_id(),
        "a child of A's publish"
    );
    assert_eq!(
        received.traceparent,
        Some(format!(
            "00-{}-{}-01",
            context.trace_id(),
            publish.span_context.span_id()
        ))
    );
    // A's relay run, between the request and the publish.
    let relay_run = spans_of(context.trace_id())
        .into_iter()
        .find(|span| span.span_context.span_id() == publish.parent_span_id)
        .expect("the publish is a child of A's relay run");
    assert_eq!(relay_run.parent_span_id, context.span_id());
    assert_eq!(
        attribute_of(&relay_run, "messaging.destination.name"),
        Some(format!("txbus.nats:{subject}"))
    );

    stop.send(()).unwrap();
    inbox.await.unwrap().unwrap();
    a.shutdown().await;
    b.shutdown().await;
    js.delete_stream(&stream_name).await.unwrap();
}

macro_rules! backend_tests {
    ($($module:ident: $backend:ty),+ $(,)?) => {$(
        mod $module {

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn one_trace_from_the_request_to_the_replay() {
                super::one_trace_from_the_request_to_the_replay::<$backend>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_way_to_emit_continues_the_trace() {
                super::every_way_to_emit_continues_the_trace::<$backend>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_emit_outside_any_span_stores_nothing() {
                super::an_emit_outside_any_span_stores_nothing::<$backend>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_unsampled_context_is_carried_as_unsampled() {
                super::an_unsampled_context_is_carried_as_unsampled::<$backend>().await;
            }
        }
    )+};
}

backend_tests!(postgres: txbus::Postgres, mysql: txbus::Mysql, sqlite: txbus::Sqlite);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_crosses_nats_between_two_services() {
    a_trace_crosses_nats::<txbus::Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_crosses_nats_between_two_services_on_postgres() {
    a_trace_crosses_nats::<txbus::Postgres>().await;
}
