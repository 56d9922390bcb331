//! NATS JetStream scenarios, shared by one test binary per backend: service A (an emitter with a
//! relay) and service B (a JetStream inbox with a transactional listener) both run on the
//! binary's backend, each on a database of its own. A transactional listener names its
//! backend's connection type, so each binary holds the listener of one backend only.
//!
//! Needs NATS with JetStream at `TXBUS_TEST_NATS_URL` (default `127.0.0.1:4222`).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use txbus::nats::{EVENT_HEADER, EVENT_VERSION_HEADER, JetStreamInbox, JetStreamRelay};
use txbus::{DeadLetterQuery, DeadReason, EventBus, EventSettings, Pool, persist};

use crate::support::backends::exec;
use crate::support::process::{Trial, runtime, trial};
use crate::support::proxy::{Proxy, authority, through};
use crate::support::{PATIENCE, TestBackend, TestDb, unique};

diesel::table! {
    /// Service A's entity: one row per order, written with its event.
    nats_orders (id) {
        /// The order.
        id -> BigInt,
        /// Anything.
        note -> Text,
    }
}

/// Service A's order.
#[derive(
    Debug, Clone, diesel::Insertable, diesel::AsChangeset, diesel::Identifiable, txbus::Entity,
)]
#[diesel(table_name = nats_orders)]
pub struct NatsOrder {
    pub id: i64,
    pub note: String,
}

/// Service A's event, relayed to JetStream.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "nats.order_placed")]
pub struct OrderPlaced {
    pub id: i64,
}

/// The same message in service B, under a name of B's own.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "nats_b.order_placed")]
pub struct OrderReceived {
    pub id: i64,
}

/// A newer shape of A's order in service B: version 2, with the total in cents that version 1
/// (A's, `{"id": ..}` with a total of `id` euros) did not carry.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "nats_b.order_priced", version = 2, upcast(1 => priced))]
pub struct OrderPriced {
    pub id: i64,
    pub cents: i64,
}

fn priced(mut v1: serde_json::Value) -> Result<serde_json::Value, txbus::UpcastError> {
    let id = v1["id"]
        .as_i64()
        .ok_or_else(|| txbus::UpcastError::new("no integer `id`"))?;
    v1["cents"] = serde_json::json!(id * 100);
    Ok(v1)
}

/// What B's listener of [`OrderPriced`] saw: each order and its cents.
#[derive(Default)]
pub struct Priced(std::sync::Mutex<Vec<(i64, i64)>>);

#[txbus::listener(name = "nats_b.price")]
async fn price(order: OrderPriced, ctx: txbus::Context) -> Result<(), txbus::ListenerError> {
    let priced = ctx.state::<std::sync::Arc<Priced>>()?;
    priced.0.lock().unwrap().push((order.id, order.cents));
    Ok(())
}

/// Defines service B's transactional listener for a connection type: it counts each order in
/// B's projection, in the transaction that completes its delivery.
#[macro_export]
macro_rules! projection_listener {
    ($connection:ty) => {
        projection_listener!(
            $connection,
            "INSERT INTO nats_projection (id, n) VALUES ({}, 1) \
             ON CONFLICT (id) DO UPDATE SET n = nats_projection.n + 1"
        );
    };
    ($connection:ty, $upsert:literal) => {
        #[txbus::listener(transactional, name = "nats_b.project")]
        async fn project(
            event: common::OrderReceived,
            _ctx: txbus::Context,
            conn: &mut $connection,
        ) -> Result<(), txbus::ListenerError> {
            use diesel_async::RunQueryDsl;
            diesel::sql_query(format!($upsert, event.id))
                .execute(conn)
                .await?;
            Ok(())
        }
    };
}

/// The `warn` and `error` events of this process, as `field=value` lines.
struct Warnings(std::sync::Mutex<Vec<String>>);

static WARNINGS: Warnings = Warnings(std::sync::Mutex::new(Vec::new()));

/// Forwards events to [`WARNINGS`]; spans are not needed.
struct Collector;

impl tracing::Subscriber for Collector {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.is_event() && *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Line(String);
        impl tracing::field::Visit for Line {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={value:?} ", field.name()));
            }
        }
        let mut line = Line(String::new());
        event.record(&mut line);
        WARNINGS.0.lock().unwrap().push(line.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn nats_url() -> String {
    std::env::var("TXBUS_TEST_NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned())
}

async fn jetstream_at(url: &str) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .connect(url)
        .await
        .unwrap();
    let mut jetstream = jetstream::new(client);
    jetstream.set_timeout(Duration::from_secs(2));
    jetstream
}

/// The JetStream of the test server; fails with how to start it when it is not running.
async fn server() -> jetstream::Context {
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
    jetstream::new(client)
}

/// A stream of its own (`<name>` capturing `<name>.>`), deleted when dropped.
struct TestStream {
    jetstream: jetstream::Context,
    name: String,
}

impl TestStream {
    async fn create() -> Self {
        let jetstream = server().await;
        let name = unique("TXBUS_NATS");
        jetstream
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![format!("{name}.>")],
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("could not create a stream (is JetStream on? `-js`): {e}"));
        Self { jetstream, name }
    }

    fn subject(&self) -> String {
        format!("{}.orders", self.name)
    }

    /// Publishes `payload` with these headers, as another service would, and waits for
    /// JetStream to store it.
    async fn publish(&self, headers: &[(&str, &str)], payload: impl Into<String>) {
        let mut map = async_nats::HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        self.jetstream
            .publish_with_headers(self.subject(), map, payload.into().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn consumer(&self, ack_wait: Duration) -> jetstream::consumer::PullConsumer {
        self.jetstream
            .get_stream(&self.name)
            .await
            .unwrap()
            .get_or_create_consumer(
                "b",
                pull::Config {
                    durable_name: Some("b".to_owned()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait,
                    max_ack_pending: 256,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
    }

    async fn messages(&self) -> u64 {
        let mut stream = self.jetstream.get_stream(&self.name).await.unwrap();
        stream.info().await.unwrap().state.messages
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let (jetstream, name) = (self.jetstream.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let _ = jetstream.delete_stream(&name).await;
            });
        })
        .join();
    }
}

fn relay_settings() -> EventSettings {
    EventSettings::default()
        .max_execution_time(Duration::from_secs(3))
        .retry_after(Duration::from_millis(200))
        .max_backoff(Duration::from_secs(1))
}

/// Service A: emits orders `1..=n` that its database does not have yet, one at a time (so a
/// kill leaves no gap), relays them, and keeps relaying until its stdin closes.
async fn relay_child<B: TestBackend>(url: String, nats: String, subject: String, n: i64)
where
    NatsOrder: txbus::Entity<B>,
{
    let pool = Pool::<B>::connect(&url).await.unwrap();
    let bus = EventBus::builder(pool.clone())
        .relay(JetStreamRelay::new(jetstream_at(&nats).await).route::<OrderPlaced>(subject))
        .event::<OrderPlaced>(relay_settings())
        .retry_every(Duration::from_millis(100))
        // Kept, to show afterwards which publishes needed more than one attempt.
        .retain_delivered(Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    let first = B::count(&pool, "SELECT count(*) AS n FROM nats_orders").await + 1;
    for id in first..=n {
        let order = NatsOrder {
            id,
            note: "placed".to_owned(),
        };
        bus.emit(OrderPlaced { id }, [persist(&order)])
            .await
            .unwrap();
    }
    println!("emitted");
    std::io::stdout().flush().unwrap();
    wait_for_stdin_to_close().await;
    bus.shutdown().await;
}

/// Service B: receives the stream's messages into its inbox until its stdin closes.
async fn consumer_child<B: TestBackend>(url: String, nats: String, stream: String) {
    let pool = Pool::<B>::connect(&url).await.unwrap();
    let bus = EventBus::builder(pool)
        .event::<OrderReceived>(
            EventSettings::default()
                .max_execution_time(Duration::from_secs(2))
                .retry_after(Duration::from_millis(100)),
        )
        .retry_every(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let consumer = jetstream_at(&nats)
        .await
        .get_stream(&stream)
        .await
        .unwrap()
        .get_consumer::<pull::Config>("b")
        .await
        .unwrap();
    println!("ready");
    std::io::stdout().flush().unwrap();
    JetStreamInbox::new(bus.clone(), consumer)
        .event_as::<OrderReceived>(<OrderPlaced as txbus::Event>::NAME)
        .max_in_flight(32)
        .run_until(wait_for_stdin_to_close())
        .await
        .unwrap();
    bus.shutdown().await;
}

async fn wait_for_stdin_to_close() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    })
    .await;
}

/// A child process of this binary; closing its stdin stops it gracefully.
struct Service {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Service {
    fn start(role: &str, args: &[String]) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("TXBUS_NATS_CHILD", role)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// Waits (blocking) for the child to print `line`.
    fn expect(&self, line: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(got) if got == line => return,
                Ok(_) => {}
                Err(e) => panic!("the child did not print {line:?}: {e}"),
            }
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn stop(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "a service failed: {status}");
    }
}

/// Waits until `check` returns true; fails when the value it reports stops moving for
/// [`PATIENCE`].
async fn until_done<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (bool, i64)>,
{
    let (mut seen, mut moved) = (i64::MIN, Instant::now());
    loop {
        let (done, progress) = check().await;
        if done {
            return;
        }
        if progress != seen {
            (seen, moved) = (progress, Instant::now());
        }
        assert!(
            moved.elapsed() < PATIENCE,
            "{what}: stuck at {seen} for {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many times B projected an order, all orders together.
async fn projections<B: TestBackend>(pool: &Pool<B>) -> i64 {
    let sql = if B::NAME == "mysql" {
        "SELECT CAST(COALESCE(SUM(n), 0) AS SIGNED) AS n FROM nats_projection"
    } else {
        "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) AS n FROM nats_projection"
    };
    B::count(pool, sql).await
}

async fn databases<B: TestBackend>() -> (TestDb<B>, TestDb<B>) {
    let (a, b) = (B::open().await, B::open().await);
    exec(
        &a.pool,
        "CREATE TABLE nats_orders (id BIGINT PRIMARY KEY, note TEXT NOT NULL)",
    )
    .await;
    exec(
        &b.pool,
        "CREATE TABLE nats_projection (id BIGINT PRIMARY KEY, n BIGINT NOT NULL)",
    )
    .await;
    txbus::migrate(&a.pool).await.unwrap();
    txbus::migrate(&b.pool).await.unwrap();
    (a, b)
}

/// B's projection has every order exactly once.
async fn assert_projected_once<B: TestBackend>(b: &TestDb<B>, n: i64) {
    until_done("every order to reach B", || async {
        let rows = B::count(&b.pool, "SELECT count(*) AS n FROM nats_projection").await;
        (rows >= n, rows)
    })
    .await;
    // Let redeliveries and reruns that could still come, come.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = B::count(&b.pool, "SELECT count(*) AS n FROM nats_projection").await;
    let runs = projections(&b.pool).await;
    assert_eq!(rows, n, "every order reached B's projection");
    assert_eq!(runs, n, "no order was projected twice");
}

/// 5,000 orders from A to B, with A's process killed three times mid-stream and B's once.
async fn survives_kills<B: TestBackend>(n: i64) {
    let (a, b) = databases::<B>().await;
    let stream = TestStream::create().await;
    stream.consumer(Duration::from_secs(3)).await;
    let relay_args = vec![a.url.clone(), nats_url(), stream.subject(), n.to_string()];
    let consumer_args = vec![b.url.clone(), nats_url(), stream.name.clone()];
    let mut consumer = Service::start("consumer", &consumer_args);
    consumer.expect("ready", PATIENCE);
    let mut relay = Service::start("relay", &relay_args);
    let orders = || B::count(&a.pool, "SELECT count(*) AS n FROM nats_orders");
    for (kill, at) in [n / 5, n / 2, 4 * n / 5].into_iter().enumerate() {
        until_done("A to emit", || async {
            let count = orders().await;
            (count >= at, count)
        })
        .await;
        relay.kill();
        eprintln!("[{}] killed A at {} orders", B::NAME, orders().await);
        relay = Service::start("relay", &relay_args);
        if kill == 1 {
            consumer.kill();
            eprintln!(
                "[{}] killed B at {} projected",
                B::NAME,
                B::count(&b.pool, "SELECT count(*) AS n FROM nats_projection").await
            );
            consumer = Service::start("consumer", &consumer_args);
            consumer.expect("ready", PATIENCE);
        }
    }
    until_done("A to emit everything", || async {
        let count = orders().await;
        (count >= n, count)
    })
    .await;
    assert_projected_once(&b, n).await;
    assert_eq!(orders().await, n);
    // JetStream dropped the publishes retried after the kills: one message per order.
    assert_eq!(stream.messages().await, n as u64, "one message per order");
    relay.stop();
    consumer.stop();
}

/// NATS unreachable from A for three seconds: A's emits keep committing, its relay deliveries
/// retry and complete afterwards; B gets every order once.
async fn survives_a_nats_outage<B: TestBackend>(n: i64) {
    let (a, b) = databases::<B>().await;
    let stream = TestStream::create().await;
    stream.consumer(Duration::from_secs(3)).await;
    let proxy = Proxy::start(nats_url()).await;
    let consumer = Service::start(
        "consumer",
        &[b.url.clone(), nats_url(), stream.name.clone()],
    );
    consumer.expect("ready", PATIENCE);
    let relay = Service::start(
        "relay",
        &[
            a.url.clone(),
            proxy.address.to_string(),
            stream.subject(),
            n.to_string(),
        ],
    );
    let orders = || B::count(&a.pool, "SELECT count(*) AS n FROM nats_orders");
    until_done("A to emit", || async {
        let count = orders().await;
        (count >= n / 4, count)
    })
    .await;
    proxy.cut();
    let before = orders().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = orders().await - before;
    proxy.restore();
    eprintln!(
        "[{}] {during} orders committed while NATS was cut off",
        B::NAME
    );
    assert!(during > 0, "emits went on while NATS was unreachable");
    assert_projected_once(&b, n).await;
    let retried = B::count(
        &a.pool,
        "SELECT count(*) AS n FROM txbus_deliveries WHERE attempts > 1",
    )
    .await;
    eprintln!(
        "[{}] {retried} publishes needed more than one attempt",
        B::NAME
    );
    assert!(retried > 0, "some publishes failed and were retried");
    assert_eq!(
        B::count(
            &a.pool,
            "SELECT count(*) AS n FROM txbus_deliveries WHERE delivered_at IS NULL"
        )
        .await,
        0,
        "every relay delivery completed"
    );
    assert_eq!(orders().await, n);
    relay.stop();
    consumer.stop();
}

/// A JetStream inbox of `OrderReceived` (published as `nats.order_placed`), running in a task of
/// its own until [`RunningInbox::stop`].
struct RunningInbox {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), txbus::Error>>,
}

impl RunningInbox {
    fn start<B: TestBackend>(
        bus: &EventBus<B>,
        consumer: &jetstream::consumer::PullConsumer,
    ) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(
            JetStreamInbox::new(bus.clone(), consumer.clone())
                .event_as::<OrderReceived>("nats.order_placed")
                .run_until(async move {
                    let _ = stopped.await;
                }),
        );
        Self { stop, task }
    }

    /// Stops it, and fails the test unless it ended cleanly within [`PATIENCE`].
    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// Messages B cannot receive are terminated, and the ones behind them are received.
async fn poison_messages_are_terminated<B: TestBackend>() {
    let (_a, b) = databases::<B>().await;
    let stream = TestStream::create().await;
    let consumer = stream.consumer(Duration::from_secs(1)).await;
    let bus = EventBus::builder(b.another_pool().await)
        .retry_every(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let publish = async |event: Option<&str>, payload: &str| {
        let headers: Vec<_> = event
            .map(|event| (EVENT_HEADER, event))
            .into_iter()
            .collect();
        stream.publish(&headers, payload).await;
    };
    publish(Some("nats.order_placed"), "not json").await;
    publish(Some("nats.order_placed"), r#"{"other":1}"#).await;
    publish(Some("nats.refund_issued"), r#"{"id":1}"#).await;
    publish(Some("nats.order_placed"), r#"{"id":7}"#).await;
    publish(None, r#"{"id":8}"#).await;
    let inbox = RunningInbox::start(&bus, &consumer);
    until_done("the good messages to be projected", || async {
        let rows = B::count(&b.pool, "SELECT count(*) AS n FROM nats_projection").await;
        (rows >= 2, rows)
    })
    .await;
    // Past the ack wait: a message that was not terminated would come back now.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut consumer = consumer;
    let info = consumer.info().await.unwrap().clone();
    assert_eq!(
        info.num_ack_pending, 0,
        "nothing waits for an ack: {info:?}"
    );
    assert_eq!(info.num_redelivered, 0, "nothing was redelivered: {info:?}");
    assert_eq!(info.delivered.stream_sequence, 5);
    assert_eq!(info.ack_floor.stream_sequence, 5, "all five were settled");
    let terminated: Vec<String> = WARNINGS
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains("terminated a JetStream message"))
        .cloned()
        .collect();
    assert_eq!(terminated.len(), 3, "{terminated:#?}");
    for reason in [
        "its payload does not deserialize: expected",
        "its payload does not deserialize: missing field `id`",
        "it names the event `nats.refund_issued`, which this inbox does not accept",
    ] {
        assert!(
            terminated.iter().any(|line| line.contains(reason)),
            "no termination says {reason:?}: {terminated:#?}"
        );
    }
    inbox.stop().await;
    assert_eq!(projections(&b.pool).await, 2);
    bus.shutdown().await;
}

/// A message whose `Txbus-Event-Version` is newer than B's type is received as it is, stored
/// at that version, and left for an instance that knows it: B's listener does not run it and
/// `stats` counts it. A message of B's own version is projected as usual.
async fn a_newer_version_waits_for_a_consumer_that_knows_it<B: TestBackend>() {
    let (_a, b) = databases::<B>().await;
    let stream = TestStream::create().await;
    let consumer = stream.consumer(Duration::from_secs(1)).await;
    let bus = EventBus::builder(b.another_pool().await)
        .retry_every(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    for (version, payload) in [("2", r#"{"id":9,"renamed":true}"#), ("1", r#"{"id":10}"#)] {
        let headers = [
            (EVENT_HEADER, "nats.order_placed"),
            (EVENT_VERSION_HEADER, version),
        ];
        stream.publish(&headers, payload).await;
    }
    let inbox = RunningInbox::start(&bus, &consumer);
    until_done("the current version to be projected", || async {
        let rows = B::count(&b.pool, "SELECT count(*) AS n FROM nats_projection").await;
        (rows >= 1, rows)
    })
    .await;
    // Many polls later, the newer one still waits, received once and acknowledged.
    tokio::time::sleep(Duration::from_millis(500)).await;
    inbox.stop().await;
    assert_eq!(
        B::count(
            &b.pool,
            "SELECT count(*) AS n FROM nats_projection WHERE id = 9"
        )
        .await,
        0
    );
    assert_eq!(
        B::count(
            &b.pool,
            "SELECT count(*) AS n FROM txbus_deliveries WHERE event_version = 2 AND attempts = 0"
        )
        .await,
        1
    );
    let stats = bus.stats().await.unwrap();
    assert_eq!(
        stats.unknown_versions.get("nats_b.project"),
        Some(&1),
        "{stats:?}"
    );
    let mut consumer = consumer;
    let info = consumer.info().await.unwrap().clone();
    assert_eq!(info.num_ack_pending, 0, "both acknowledged: {info:?}");
    bus.shutdown().await;
}

/// A message of an older version than B's type (its header says 1, B's type is at 2) is stored
/// at its version and upcast when B's listener runs it.
async fn an_older_version_is_upcast_by_the_consumer<B: TestBackend>() {
    let (_a, b) = databases::<B>().await;
    let stream = TestStream::create().await;
    let consumer = stream.consumer(Duration::from_secs(1)).await;
    let priced = std::sync::Arc::new(Priced::default());
    let bus = EventBus::builder(b.another_pool().await)
        .state(priced.clone())
        .retry_every(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    for id in [3, 4] {
        let headers = [
            (EVENT_HEADER, "nats.order_placed"),
            (EVENT_VERSION_HEADER, "1"),
        ];
        stream.publish(&headers, format!(r#"{{"id":{id}}}"#)).await;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let inbox = tokio::spawn(
        JetStreamInbox::new(bus.clone(), consumer.clone())
            .event_as::<OrderPriced>("nats.order_placed")
            .run_until(async move {
                let _ = stopped.await;
            }),
    );
    until_done("both orders priced", || async {
        let n = priced.0.lock().unwrap().len() as i64;
        (n >= 2, n)
    })
    .await;
    stop.send(()).unwrap();
    tokio::time::timeout(PATIENCE, inbox)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut seen = priced.0.lock().unwrap().clone();
    seen.sort_unstable();
    assert_eq!(seen, [(3, 300), (4, 400)]);
    bus.shutdown().await;
}

/// Messages that arrive together are received in one transaction: their events take their ids
/// and emit time from one block, so twenty messages waiting before the inbox starts are emitted
/// at fewer than twenty distinct times. Each is still received once.
async fn messages_that_arrive_together_share_a_transaction<B: TestBackend>() {
    const MESSAGES: i64 = 20;
    let (_a, b) = databases::<B>().await;
    let stream = TestStream::create().await;
    let consumer = stream.consumer(Duration::from_secs(5)).await;
    let bus = EventBus::builder(b.another_pool().await)
        .retain_delivered(Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    for id in 0..MESSAGES {
        stream
            .publish(
                &[(EVENT_HEADER, "nats.order_placed")],
                format!(r#"{{"id":{id}}}"#),
            )
            .await;
    }
    let inbox = RunningInbox::start(&bus, &consumer);
    until_done("every message to be projected", || async {
        let rows = B::count(&b.pool, "SELECT count(*) AS n FROM nats_projection").await;
        (rows >= MESSAGES, rows)
    })
    .await;
    inbox.stop().await;
    bus.shutdown().await;
    assert_eq!(
        projections(&b.pool).await,
        MESSAGES,
        "each message projected once"
    );
    let times = B::count(
        &b.pool,
        "SELECT count(DISTINCT emitted_at) AS n FROM txbus_deliveries WHERE listener = 'nats_b.project'",
    )
    .await;
    assert!(
        times < MESSAGES,
        "{times} distinct emit times for {MESSAGES} messages: none were received together"
    );
}

/// B's database unreachable while messages arrive: the receipts fail, the messages are
/// negatively acknowledged and redelivered, and after the outage each is received once.
/// PostgreSQL only: a TCP proxy stands between B and its database.
async fn a_failed_receipt_is_redelivered<B: TestBackend>() {
    let (_a, b) = databases::<B>().await;
    let stream = TestStream::create().await;
    let consumer = stream.consumer(Duration::from_secs(1)).await;
    let proxy = Proxy::start(authority(&b.url).to_string()).await;
    let pool = Pool::<B>::builder(through(&b.url, proxy.address))
        .max_size(4)
        .connect()
        .await
        .unwrap();
    let bus = EventBus::builder(pool)
        .retry_every(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let inbox = RunningInbox::start(&bus, &consumer);
    proxy.cut();
    for id in 1..=20 {
        stream
            .publish(
                &[(EVENT_HEADER, "nats.order_placed")],
                format!(r#"{{"id":{id}}}"#),
            )
            .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restore();
    assert_projected_once(&b, 20).await;
    let mut consumer = consumer;
    let info = consumer.info().await.unwrap().clone();
    // Each delivery takes a consumer sequence number: more of them than messages means
    // redeliveries.
    assert!(
        info.delivered.consumer_sequence > info.delivered.stream_sequence,
        "the failed receipts were redelivered: {info:?}"
    );
    let failed = WARNINGS
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains("it will be redelivered"))
        .count();
    assert!(failed > 0, "the failed receipts were logged");
    inbox.stop().await;
    bus.shutdown().await;
}

/// Deleting the consumer under a running inbox ends it with an error, not a silent loop.
async fn a_deleted_consumer_stops_the_inbox<B: TestBackend>() {
    let (_a, b) = databases::<B>().await;
    let stream = TestStream::create().await;
    let consumer = stream.consumer(Duration::from_secs(1)).await;
    let bus = EventBus::builder(b.another_pool().await)
        .build()
        .await
        .unwrap();
    let inbox = tokio::spawn(
        JetStreamInbox::new(bus.clone(), consumer)
            .event_as::<OrderReceived>("nats.order_placed")
            .run_until(std::future::pending()),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream
        .jetstream
        .get_stream(&stream.name)
        .await
        .unwrap()
        .delete_consumer("b")
        .await
        .unwrap();
    let error = tokio::time::timeout(PATIENCE, inbox)
        .await
        .expect("the inbox stopped")
        .unwrap()
        .unwrap_err();
    assert!(error.to_string().contains("NATS JetStream"), "{error}");
    bus.shutdown().await;
}

/// A relay route shows in stats like a listener; its publishes die when no stream captures the
/// subject; once one does, a replay publishes with the documented headers.
async fn relay_deliveries_are_listeners<B: TestBackend>()
where
    NatsOrder: txbus::Entity<B>,
{
    let (a, _b) = databases::<B>().await;
    let stream = TestStream::create().await;
    let subject = format!("{}_nowhere.orders", stream.name);
    let route = format!("txbus.nats:{subject}");
    let bus = EventBus::builder(a.another_pool().await)
        .relay(JetStreamRelay::new(jetstream_at(&nats_url()).await).route::<OrderPlaced>(&subject))
        .event::<OrderPlaced>(
            relay_settings()
                .retry_after(Duration::from_millis(50))
                .max_attempts(2),
        )
        .retry_every(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    let order = NatsOrder {
        id: 1,
        note: "x".into(),
    };
    let event_id = bus
        .emit(OrderPlaced { id: 1 }, [persist(&order)])
        .await
        .unwrap();
    until_done("the publish to die", || async {
        let dead = bus.stats().await.unwrap().listeners[&route].dead;
        (dead == 1, dead as i64)
    })
    .await;
    let dead = bus
        .dead_letters(DeadLetterQuery::new().listener(&route))
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadReason::MaxAttempts);
    let error = dead[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("no stream"), "{error}");

    // A stream for the subject, and a replay.
    let jetstream = server().await;
    let name = format!("{}_nowhere", stream.name);
    jetstream
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(bus.replay(event_id, &route).await.unwrap());
    until_done("the replayed publish", || async {
        let stats = bus.stats().await.unwrap();
        let counts = &stats.listeners[&route];
        (
            counts.pending() == 0 && counts.dead == 0,
            counts.pending() as i64,
        )
    })
    .await;
    let consumer: jetstream::consumer::PullConsumer = jetstream
        .get_stream(&name)
        .await
        .unwrap()
        .create_consumer(pull::Config::default())
        .await
        .unwrap();
    let mut batch = consumer.fetch().max_messages(10).messages().await.unwrap();
    let message = batch.next().await.unwrap().unwrap();
    let headers = message.headers.clone().unwrap();
    let header = |name: &str| headers.get(name).unwrap().as_str().to_owned();
    assert_eq!(
        header("Nats-Msg-Id"),
        format!("{}@{subject}", event_id.get())
    );
    assert_eq!(header("Txbus-Event"), "nats.order_placed");
    assert_eq!(header("Txbus-Event-Id"), event_id.get().to_string());
    assert!(header("Txbus-Emitted-At").parse::<u64>().unwrap() > 0);
    assert_eq!(header("Txbus-Event-Version"), "1");
    let payload: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(payload, serde_json::json!({ "id": 1 }));
    message.ack().await.unwrap();
    bus.shutdown().await;
    let _ = jetstream.delete_stream(&name).await;
}

/// `route` refuses subjects that are not plain.
async fn bad_subjects_fail_the_build<B: TestBackend>() {
    let (a, _b) = databases::<B>().await;
    let error = EventBus::builder(a.another_pool().await)
        .relay(
            JetStreamRelay::new(jetstream_at(&nats_url()).await).route::<OrderPlaced>("orders.*"),
        )
        .build()
        .await
        .unwrap_err();
    assert!(error.to_string().contains("wildcard"), "{error}");
}

fn orders() -> i64 {
    std::env::var("TXBUS_NATS_ORDERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5_000)
}

/// Runs the child role `TXBUS_NATS_CHILD` names, if this process is one of the services a
/// scenario started, and then returns true.
pub fn run_child<B: TestBackend>() -> bool
where
    NatsOrder: txbus::Entity<B>,
{
    let Ok(role) = std::env::var("TXBUS_NATS_CHILD") else {
        return false;
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    match role.as_str() {
        "relay" => runtime().block_on(relay_child::<B>(
            args[0].clone(),
            args[1].clone(),
            args[2].clone(),
            args[3].parse().unwrap(),
        )),
        "consumer" => runtime().block_on(consumer_child::<B>(
            args[0].clone(),
            args[1].clone(),
            args[2].clone(),
        )),
        other => panic!("unknown child role {other}"),
    }
    true
}

/// Collects the process's `tracing` events, for the scenarios that look for a warning.
pub fn collect_logs() {
    tracing::subscriber::set_global_default(Collector).unwrap();
}

/// The scenarios on backend `B`, one test each (`<backend>::<scenario>`).
pub fn trials<B: TestBackend>() -> Vec<Trial>
where
    NatsOrder: txbus::Entity<B>,
{
    let name = B::NAME;
    let mut trials = Vec::new();
    if name == "postgres" {
        trials.push(trial(
            format!("{name}::a_failed_receipt_is_redelivered"),
            || runtime().block_on(a_failed_receipt_is_redelivered::<B>()),
        ));
    }
    // It sees a shared transaction in the emit times of one block of ids; MySQL takes each id
    // with a clock reading of its own.
    if name != "mysql" {
        trials.push(trial(
            format!("{name}::messages_that_arrive_together_share_a_transaction"),
            || runtime().block_on(messages_that_arrive_together_share_a_transaction::<B>()),
        ));
    }
    trials.extend([
        trial(format!("{name}::survives_kills"), || {
            runtime().block_on(survives_kills::<B>(orders()))
        }),
        trial(format!("{name}::survives_a_nats_outage"), || {
            runtime().block_on(survives_a_nats_outage::<B>(orders() / 5))
        }),
        trial(format!("{name}::poison_messages_are_terminated"), || {
            runtime().block_on(poison_messages_are_terminated::<B>())
        }),
        trial(
            format!("{name}::a_newer_version_waits_for_a_consumer_that_knows_it"),
            || {
                runtime().block_on(a_newer_version_waits_for_a_consumer_that_knows_it::<B>());
            },
        ),
        trial(
            format!("{name}::an_older_version_is_upcast_by_the_consumer"),
            || {
                runtime().block_on(an_older_version_is_upcast_by_the_consumer::<B>());
            },
        ),
        trial(format!("{name}::relay_deliveries_are_listeners"), || {
            runtime().block_on(relay_deliveries_are_listeners::<B>())
        }),
        trial(
            format!("{name}::a_deleted_consumer_stops_the_inbox"),
            || runtime().block_on(a_deleted_consumer_stops_the_inbox::<B>()),
        ),
        trial(format!("{name}::bad_subjects_fail_the_build"), || {
            runtime().block_on(bad_subjects_fail_the_build::<B>())
        }),
    ]);
    trials
}
