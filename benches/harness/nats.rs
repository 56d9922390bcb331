//! N1: events per second from service A's emits through a JetStream relay into service B's
//! inbox and listener: A alone (until JetStream acknowledged), B alone (draining the stream),
//! and both at once; baselines: A's emits without the relay, of an event no listener takes
//! (which writes the entity only), and of E1's event to a local no-op listener (which writes and
//! completes a delivery, as the relay's emit does). And the broker alone.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use serde::{Deserialize, Serialize};
use txbus::nats::{JetStreamInbox, JetStreamRelay};
use txbus::{Context, Entity, EventBus, ListenerError, persist};

use super::backends::BenchBackend;
use super::scenarios::{create_users, fan_out, next_user, pool_for, settle};
use super::{Args, BenchUser, Recorder, Row};
use crate::support::unique;

/// Service A's event.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "bench.nats_order")]
pub struct NatsOrder {
    pub id: i64,
    pub padding: String,
}

/// The same message in service B.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "bench.nats_received")]
pub struct NatsReceived {
    pub id: i64,
    pub padding: String,
}

#[txbus::listener(name = "bench.nats_sink")]
async fn sink(_event: NatsReceived, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Recorder>>()?
        .runs
        .fetch_add(1, Ordering::Relaxed);
    Ok(())
}

pub async fn n1<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
{
    let url = std::env::var("TXBUS_TEST_NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".into());
    let jetstream = jetstream::new(async_nats::connect(&url).await.unwrap_or_else(|e| {
        panic!("NATS is not reachable at {url} ({e}); see the README for how to start it")
    }));
    let name = unique("TXBUS_BENCH");
    let subject = format!("{name}.orders");
    let orders = jetstream
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer = orders
        .create_consumer(pull::Config {
            durable_name: Some("b".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 1024,
            ..Default::default()
        })
        .await
        .unwrap();

    let clients = args.concurrency.iter().copied().max().unwrap_or(16);
    let (a, b) = (B::open().await, B::open().await);
    let pool = pool_for::<B>(&a.url, clients + 8).await;
    create_users(&pool).await;
    let relaying = EventBus::builder(pool.clone())
        .relay(JetStreamRelay::new(jetstream.clone()).route::<NatsOrder>(&subject))
        .build()
        .await
        .unwrap();
    let local = Arc::new(Recorder::default());
    let plain = EventBus::builder(pool.clone())
        .state(local.clone())
        .poller(false)
        .build()
        .await
        .unwrap();
    let recorder = Arc::new(Recorder::default());
    let receiving = EventBus::builder(pool_for::<B>(&b.url, 16).await)
        .state(recorder.clone())
        .build()
        .await
        .unwrap();
    // B's inbox runs only while `receiving` is set.
    let start_inbox = || {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(
            JetStreamInbox::new(receiving.clone(), consumer.clone())
                .event_as::<NatsReceived>("bench.nats_order")
                .max_in_flight(256)
                .run_until(async {
                    let _ = stopped.await;
                }),
        );
        (stop, task)
    };
    let wait_for_b = async |target: u64| {
        let deadline = Instant::now() + Duration::from_secs(600);
        while recorder.runs.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "B did not receive everything");
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    };
    let emit = async |bus: &EventBus<B>| {
        fan_out(clients, args.events, |count| {
            let (bus, payload) = (bus.clone(), args.payload);
            async move {
                for _ in 0..count {
                    let (user, _) = next_user(payload);
                    let event = NatsOrder {
                        id: user.id,
                        padding: "x".repeat(payload.saturating_sub(30)),
                    };
                    bus.emit(event, [persist(&user)]).await.unwrap();
                }
            }
        })
        .await;
    };

    // A's emits of E1's event to its no-op listener, until every run's result is written.
    let emit_local = async || {
        let target = local.runs.load(Ordering::Relaxed) + args.events as u64;
        fan_out(clients, args.events, |count| {
            let (bus, payload) = (plain.clone(), args.payload);
            async move {
                for _ in 0..count {
                    let (user, event) = next_user(payload);
                    bus.emit(event, [persist(&user)]).await.unwrap();
                }
            }
        })
        .await;
        settle(&plain, &local, target).await;
    };

    let row = |scenario: &'static str, baseline_name: &'static str| Row {
        backend: B::NAME,
        scenario,
        case: format!("{clients} emitters"),
        unit: "events/s",
        txbus: Vec::new(),
        baseline: Vec::new(),
        baseline_name,
        lower_is_better: false,
    };
    const ENTITY_ONLY: &str = "A's emit, no relay (no listener: the entity only)";
    const LOCAL: &str = "A's emit to a local no-op listener (E1)";
    // A's emits until JetStream acknowledged every publish, while B is idle.
    let mut published = row("N1 A → JetStream, B idle", ENTITY_ONLY);
    // B's inbox and listener draining what A published, while A is idle.
    let mut drained = row("N1 B drains JetStream, A idle", ENTITY_ONLY);
    // Both at once: A's emits until B's listener ran for every event.
    let mut together = row("N1 A → JetStream → B", ENTITY_ONLY);
    let mut published_local = row("N1 A → JetStream, B idle", LOCAL);
    let mut together_local = row("N1 A → JetStream → B", LOCAL);
    let n = args.events;
    let rate = |started: Instant| n as f64 / started.elapsed().as_secs_f64();
    for round in 0..args.rounds {
        // The three kinds of measurement, in an order rotated round by round.
        for turn in 0..3 {
            if (round + turn) % 3 == 0 {
                let started = Instant::now();
                emit(&plain).await;
                let baseline = rate(started);
                for row in [&mut published, &mut drained, &mut together] {
                    row.baseline.push(baseline);
                }
                continue;
            }
            if (round + turn) % 3 == 1 {
                let started = Instant::now();
                emit_local().await;
                let baseline = rate(started);
                for row in [&mut published_local, &mut together_local] {
                    row.baseline.push(baseline);
                }
                continue;
            }
            let target = recorder.runs.load(Ordering::Relaxed) + n as u64;
            let started = Instant::now();
            emit(&relaying).await;
            relaying.wait_idle().await;
            published.txbus.push(rate(started));
            let started = Instant::now();
            let (stop, task) = start_inbox();
            wait_for_b(target).await;
            drained.txbus.push(rate(started));
            published_local.txbus.push(*published.txbus.last().unwrap());
            let _ = stop.send(());
            task.await.unwrap().unwrap();

            let target = target + n as u64;
            let (stop, task) = start_inbox();
            let started = Instant::now();
            emit(&relaying).await;
            wait_for_b(target).await;
            together.txbus.push(rate(started));
            together_local.txbus.push(*together.txbus.last().unwrap());
            let _ = stop.send(());
            task.await.unwrap().unwrap();
        }
    }
    // The broker alone: the same number of publishes, 64 awaiting their acks at a time (as
    // many as the bus runs listeners by default), into a stream of their own.
    let raw = format!("{name}_RAW");
    jetstream
        .create_stream(stream::Config {
            name: raw.clone(),
            subjects: vec![format!("{raw}.x")],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut broker = Row {
        scenario: "N1 JetStream publish alone",
        case: "64 in flight".into(),
        txbus: Vec::new(),
        ..published.clone()
    };
    let payload = format!(
        r#"{{"id":1,"padding":"{}"}}"#,
        "x".repeat(args.payload.saturating_sub(30))
    );
    for _ in 0..args.rounds {
        let started = Instant::now();
        fan_out(64, n, |count| {
            let (jetstream, subject, payload) =
                (jetstream.clone(), format!("{raw}.x"), payload.clone());
            async move {
                for _ in 0..count {
                    jetstream
                        .publish(subject.clone(), payload.clone().into())
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                }
            }
        })
        .await;
        broker
            .txbus
            .push(n as f64 / started.elapsed().as_secs_f64());
    }
    let _ = jetstream.delete_stream(&raw).await;
    receiving.wait_idle().await;
    assert_eq!(
        recorder.runs.load(Ordering::Relaxed),
        (2 * n * args.rounds) as u64,
        "B ran each relayed event once"
    );
    relaying.shutdown().await;
    plain.shutdown().await;
    receiving.shutdown().await;
    let _ = jetstream.delete_stream(&name).await;
    vec![
        published,
        drained,
        together,
        published_local,
        together_local,
        broker,
    ]
}
