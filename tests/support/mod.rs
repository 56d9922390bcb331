//! Test support shared by the integration tests: an isolated database per test on every backend,
//! a probe that listeners record their runs into, and waiting on conditions.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Integer, Nullable, Text};
use tokio::sync::Notify;
use txbus::{Backend, Context, EventId, Pool};

pub mod backends;
pub mod process;
pub mod proxy;

pub use backends::TestBackend;

/// How long any wait in a test may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// An expiry far beyond any test.
pub const HOUR: Duration = Duration::from_secs(3600);

/// A name no other test (in this run or another) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// An isolated database (a PostgreSQL schema, a SQLite file), removed when dropped.
pub struct TestDb<B: Backend> {
    pub url: String,
    pub pool: Pool<B>,
    pub(crate) cleanup: Option<Box<dyn FnOnce() + Send>>,
}

impl<B: Backend> TestDb<B> {
    /// Another pool on the same database, as a second process would have.
    pub async fn another_pool(&self) -> Pool<B> {
        Pool::builder(self.url.clone())
            .max_size(4)
            .connect()
            .await
            .unwrap()
    }
}

impl<B: Backend> Drop for TestDb<B> {
    fn drop(&mut self) {
        if let Some(cleanup) = self.cleanup.take() {
            cleanup();
        }
    }
}

/// A delivery row as stored.
#[derive(Debug, Clone, QueryableByName)]
pub struct DeliveryRow {
    #[diesel(sql_type = BigInt)]
    pub event_id: i64,
    #[diesel(sql_type = Text)]
    pub listener: String,
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    #[diesel(sql_type = Nullable<Text>)]
    pub dead_reason: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
}

#[derive(QueryableByName)]
pub struct Count {
    #[diesel(sql_type = BigInt)]
    pub n: i64,
}

/// One run of a listener, as the listener recorded it.
#[derive(Debug, Clone)]
pub struct Call {
    pub listener: String,
    pub event_id: EventId,
    pub attempt: u32,
    pub started: Instant,
    pub note: String,
}

/// Checks whether a user row exists.
pub type UserCheck = Arc<dyn Fn(i64) -> txbus::BoxFuture<'static, bool> + Send + Sync>;

/// What listeners write their runs into; registered as `Arc<Probe>` state on the bus.
#[derive(Default)]
pub struct Probe {
    calls: Mutex<Vec<Call>>,
    changed: Notify,
    /// Runs in progress, the most ever at once, and runs dropped before they finished.
    pub running: AtomicUsize,
    pub most_running: AtomicUsize,
    pub cancelled: AtomicUsize,
    /// When each dropped run was dropped, in order.
    pub cancelled_at: Mutex<Vec<Instant>>,
    /// Checks whether a user row exists, for listeners that must see the committed entity.
    pub user_exists: Mutex<Option<UserCheck>>,
}

impl Probe {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn record(&self, ctx: &Context, note: impl Into<String>) {
        self.calls.lock().unwrap().push(Call {
            listener: short(ctx.listener()).to_owned(),
            event_id: ctx.event_id(),
            attempt: ctx.attempt(),
            started: Instant::now(),
            note: note.into(),
        });
        self.changed.notify_waiters();
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The runs of the listener whose id ends with `name`.
    pub fn calls_of(&self, name: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.listener == name)
            .collect()
    }

    /// Waits until `done` holds for the runs so far; fails the test after [`PATIENCE`].
    pub async fn wait_until(&self, what: &str, done: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let calls = self.calls();
            if done(&calls) {
                return calls;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; runs so far: {calls:#?}"
            );
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }

    pub async fn user_exists(&self, id: i64) -> bool {
        let check = self.user_exists.lock().unwrap().clone();
        match check {
            Some(check) => check(id).await,
            None => panic!("the test did not set Probe::user_exists"),
        }
    }
}

/// The last path segment of a listener id.
pub fn short(id: &str) -> &str {
    id.rsplit("::").next().unwrap_or(id)
}

/// Polls `check` until it returns `Some`; fails the test after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `bus` is idle; fails the test after [`PATIENCE`].
pub async fn idle<B: Backend>(bus: &txbus::EventBus<B>) {
    tokio::time::timeout(PATIENCE, bus.wait_idle())
        .await
        .expect("the bus did not become idle in time");
}

/// Short time limits, so that retries and expiry happen within a test.
pub fn fast_settings() -> txbus::EventSettings {
    txbus::EventSettings::default()
        .expires_after(Duration::from_secs(60))
        .max_execution_time(Duration::from_secs(5))
        .retry_after(Duration::from_millis(100))
}

/// Starts configuring a bus on `pool` that polls often.
pub fn bus<B: Backend>(pool: Pool<B>, probe: &Arc<Probe>) -> txbus::EventBusBuilder<B> {
    txbus::EventBus::builder(pool)
        .state(probe.clone())
        .retry_every(Duration::from_millis(25))
        .default_settings(fast_settings())
}
