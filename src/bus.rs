//! The bus handle: emitting, waiting, shutting down.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OnceCell};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::dispatch::{self, Job, Phase, Runner};
use crate::listener::ListenerDef;
use crate::registry::Registry;
use crate::store::{DeliveryKey, Inserted, NewEvent, Retention};
use crate::transaction::TxConn;
use crate::{Backend, Error, Event, EventBusBuilder, EventId, EventSettings, Operation, Pool};

/// The transactional event bus: emits events in the same transaction as your writes and runs
/// their listeners after the commit, retrying what fails.
///
/// A cheap handle: clone it freely. Build one with [`EventBus::builder`]. The background work
/// (dispatch, retries) stops with [`shutdown`](Self::shutdown), or when the last handle is
/// dropped.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use txbus::{EventBus, Pool, Sqlite};
///
/// #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
/// struct Ping { n: u32 }
///
/// #[txbus::listener]
/// async fn on_ping(ping: Ping) -> Result<(), txbus::ListenerError> {
///     println!("ping {}", ping.n);
///     Ok(())
/// }
///
/// # let dir = std::env::temp_dir().join(format!("txbus-doc-bus-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let path = dir.join("app.db");
/// let pool = Pool::<Sqlite>::connect(path.to_str().unwrap()).await?;
/// let bus = EventBus::builder(pool).build().await?;
/// bus.emit(Ping { n: 1 }, []).await?;
/// bus.wait_idle().await;
/// bus.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub struct EventBus<B: Backend> {
    pub(crate) shared: Arc<Shared<B>>,
    _handle: Arc<Handle>,
}

impl<B: Backend> Clone for EventBus<B> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            _handle: self._handle.clone(),
        }
    }
}

impl<B: Backend> fmt::Debug for EventBus<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBus")
            .field("backend", &B::NAME)
            .field("listeners", &self.shared.registry.len())
            .field("phase", &self.shared.runner.phase())
            .finish_non_exhaustive()
    }
}

/// Stops the background work when the last [`EventBus`] handle goes away.
struct Handle(Arc<Runner>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.phase.send_if_modified(|phase| {
            let running = *phase == Phase::Running;
            if running {
                *phase = Phase::Draining;
            }
            running
        });
    }
}

/// What the handles and the background tasks share.
pub(crate) struct Shared<B: Backend> {
    pub(crate) pool: Pool<B>,
    pub(crate) registry: Registry,
    pub(crate) settings: HashMap<&'static str, EventSettings>,
    pub(crate) default_settings: EventSettings,
    pub(crate) runner: Arc<Runner>,
    pub(crate) config: BusConfig,
    pub(crate) tasks: Mutex<Tasks>,
    /// Wakes the poller before its next tick (after a replay, say).
    pub(crate) poll_now: Notify,
    stopped: OnceCell<()>,
}

/// The bus-wide settings of the builder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BusConfig {
    pub(crate) retry_every: Duration,
    pub(crate) max_events_per_retry: usize,
    pub(crate) shutdown_grace: Duration,
    pub(crate) inbox_dedup_window: Duration,
    pub(crate) retention: Retention,
}

/// The background tasks, taken by `shutdown` to wait for them.
#[derive(Default)]
pub(crate) struct Tasks {
    pub(crate) poller: Option<JoinHandle<()>>,
    pub(crate) dispatcher: Option<JoinHandle<()>>,
    pub(crate) completer: Option<JoinHandle<()>>,
}

/// An event serialized and matched with its listeners, ready to be written.
pub(crate) struct Prepared {
    pub(crate) new: NewEvent,
    pub(crate) listeners: Arc<[&'static ListenerDef]>,
    pub(crate) settings: EventSettings,
}

/// An event written in a transaction, to dispatch after the commit.
pub(crate) struct Written {
    pub(crate) prepared: Prepared,
    pub(crate) inserted: Inserted,
    /// When the insert was sent: its deliveries' leases started no earlier.
    pub(crate) leased: Instant,
}

impl<B: Backend> Shared<B> {
    pub(crate) fn new(
        pool: Pool<B>,
        registry: Registry,
        settings: HashMap<&'static str, EventSettings>,
        default_settings: EventSettings,
        runner: Arc<Runner>,
        config: BusConfig,
    ) -> Self {
        Self {
            pool,
            registry,
            settings,
            default_settings,
            runner,
            config,
            tasks: Mutex::default(),
            poll_now: Notify::new(),
            stopped: OnceCell::new(),
        }
    }

    pub(crate) fn settings_for(&self, event: &str) -> EventSettings {
        self.settings
            .get(event)
            .copied()
            .unwrap_or(self.default_settings)
    }

    pub(crate) fn check_running(&self) -> Result<(), Error> {
        match self.runner.phase() {
            Phase::Running => Ok(()),
            _ => Err(Error::Shutdown),
        }
    }

    pub(crate) fn prepare<E: Event>(&self, event: &E) -> Result<Prepared, Error> {
        let payload = serde_json::to_string(event).map_err(|source| Error::Serialize {
            event: E::NAME,
            source,
        })?;
        let listeners = self.registry.for_event(E::NAME);
        let settings = self.settings_for(E::NAME);
        Ok(Prepared {
            new: NewEvent {
                name: E::NAME,
                payload: payload.into(),
                listeners: listeners.ids,
                lease: settings.get_max_execution_time(),
                expires_after: settings.get_expires_after(),
            },
            listeners: listeners.defs,
            settings,
        })
    }

    /// Hands the deliveries of committed events to the runner.
    /// Starts the listeners of committed events; each that can start at once runs in the
    /// caller's task until it first waits.
    pub(crate) fn dispatch(&self, written: Vec<Written>) {
        let ready = Instant::now();
        // Runs follow from the span that emitted (or received) their event.
        let parent = tracing::Span::current().id();
        let _span = tracing::debug_span!("txbus.dispatch", events = written.len()).entered();
        for Written {
            prepared,
            inserted,
            leased,
        } in written
        {
            crate::metrics::emitted(prepared.new.name);
            let deadline = dispatch::deadline(leased, prepared.new.lease);
            for &def in prepared.listeners.iter() {
                self.runner.submit(
                    Job {
                        key: DeliveryKey {
                            event_id: inserted.id,
                            listener: def.id,
                            attempt: 1,
                        },
                        def,
                        payload: prepared.new.payload.clone(),
                        emitted_at: inserted.emitted_at,
                        deadline,
                        ready,
                        settings: prepared.settings,
                        in_flight: self.runner.tracker.enter(),
                        parent: parent.clone(),
                    },
                    true,
                );
            }
        }
    }

    async fn shutdown(&self) {
        let runner = &self.runner;
        runner.phase.send_if_modified(|phase| {
            let running = *phase == Phase::Running;
            if running {
                *phase = Phase::Draining;
            }
            running
        });
        let deadline = Instant::now() + self.config.shutdown_grace;
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for task in [tasks.poller, tasks.dispatcher].into_iter().flatten() {
            let _ = task.await;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if !runner.wait_for_listeners(remaining).await {
            tracing::warn!(grace = ?self.config.shutdown_grace, "listeners still running after the grace period; cancelling them");
            runner.phase.send_replace(Phase::Cancelling);
            runner.wait_for_listeners(Duration::from_secs(1)).await;
        }
        runner.close_reports();
        if let Some(completer) = tasks.completer {
            let flush = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(2);
            if tokio::time::timeout(flush, completer).await.is_err() {
                tracing::warn!(
                    "could not record every listener result before shutdown; those deliveries will run again after their leases"
                );
            }
        }
        runner.phase.send_replace(Phase::Stopped);
        tracing::info!("txbus shut down");
    }
}

impl<B: Backend> EventBus<B> {
    /// Starts configuring a bus on `pool`.
    pub fn builder(pool: Pool<B>) -> EventBusBuilder<B> {
        EventBusBuilder::new(pool)
    }

    pub(crate) fn from_shared(shared: Arc<Shared<B>>) -> Self {
        let handle = Arc::new(Handle(shared.runner.clone()));
        Self {
            shared,
            _handle: handle,
        }
    }

    /// The pool the bus uses.
    pub fn pool(&self) -> &Pool<B> {
        &self.shared.pool
    }

    /// Writes `ops` and `event` in one transaction, and after the commit runs the event's
    /// listeners. Returns the event's id once committed.
    ///
    /// Each listener that can start at once (a concurrency permit is free and nothing is queued
    /// ahead of it) starts before `emit` returns: it runs in the caller's task until it first
    /// waits (on I/O, a timer, a lock), then in a task of its own. So a listener starts within
    /// microseconds of the commit, and one that finishes without waiting costs no task at all.
    /// Keep CPU-heavy work out of a listener's first stretch, or begin it with
    /// `tokio::task::yield_now().await`, to keep it out of the emitter's time.
    ///
    /// If any operation fails (a constraint violation, say) nothing is written and the error is
    /// returned. The transaction is: `BEGIN`, each operation in order, one statement for the
    /// event's deliveries, `COMMIT`. On PostgreSQL, with operations from `#[derive(Entity)]`:
    /// - one operation and the event are a single statement,
    ///   `WITH txbus_write AS (<the write>) INSERT INTO txbus_deliveries ...`, atomic by itself:
    ///   one round trip, one commit, prepared once per connection;
    /// - several (which one statement could not apply in order: they may touch the same row)
    ///   travel in one round trip when none of their columns has a custom SQL type (an enum, an
    ///   extension's type: diesel looks those up first, once per connection); otherwise `BEGIN`
    ///   travels with the first operation and the event's statement with the `COMMIT`.
    ///
    /// An emit without operations is a single round trip.
    ///
    /// ```no_run
    /// # use diesel::prelude::*;
    /// # diesel::table! { users (id) { id -> BigInt, email -> Text, } }
    /// # #[derive(Insertable, AsChangeset, Identifiable, txbus::Entity)]
    /// # #[diesel(table_name = users)]
    /// # struct User { id: i64, email: String }
    /// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
    /// # struct UserCreated { user_id: i64 }
    /// # async fn run(bus: txbus::EventBus<txbus::Sqlite>, old: User) -> Result<(), txbus::Error> {
    /// let user = User { id: 1, email: "ada@example.com".into() };
    /// let id = bus.emit(UserCreated { user_id: 1 }, [txbus::persist(&user), txbus::remove(&old)]).await?;
    /// println!("emitted event {id}");
    /// # Ok(())
    /// # }
    /// ```
    pub fn emit<'a, E: Event>(
        &'a self,
        event: E,
        ops: impl IntoIterator<Item = Operation<'a, B>>,
    ) -> impl Future<Output = Result<EventId, Error>> + Send + 'a {
        let ops: Vec<Operation<'a, B>> = ops.into_iter().collect();
        let span = tracing::info_span!(
            "txbus.emit",
            event = E::NAME,
            event_id = tracing::field::Empty
        );
        async move {
            let shared = &*self.shared;
            shared.check_running()?;
            let prepared = shared.prepare(&event)?;
            let mut guard = TxConn::<B>::checkout(&shared.pool).await?;
            guard.enter();
            let leased = Instant::now();
            let conn = guard.conn()?;
            let written = if ops.is_empty() {
                B::emit_alone(conn, &prepared.new).await
            } else {
                B::emit_with(conn, &ops, &prepared.new).await
            };
            if written.is_err() {
                guard.rollback_if_open().await;
            }
            guard.settle();
            let inserted = written?;
            drop(guard);
            let id = inserted.id;
            tracing::Span::current().record("event_id", id.get());
            shared.dispatch(vec![Written {
                prepared,
                inserted,
                leased,
            }]);
            Ok(id)
        }
        .instrument(span)
    }

    /// Resolves when no delivery is queued, running, or waiting for its result to be written in
    /// this process. Deliveries the poller has not claimed yet do not count.
    pub fn wait_idle(&self) -> impl Future<Output = ()> + Send + '_ {
        self.shared.runner.tracker.wait_idle()
    }

    /// Stops the bus: no more polls or emits; deliveries queued here are handed back at once for
    /// other instances; running listeners get the grace period
    /// ([`EventBusBuilder::shutdown_grace`]) to finish, and are cancelled and released after it;
    /// then the last results are written. Calling it again waits for the first call.
    pub fn shutdown(&self) -> impl Future<Output = ()> + Send + '_ {
        async move {
            self.shared
                .stopped
                .get_or_init(|| self.shared.shutdown())
                .await;
        }
    }
}
