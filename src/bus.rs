//! The bus handle: emitting, waiting, shutting down.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use crate::dispatch::Runner;
use crate::engine::{Engine, Prepared, Written};
use crate::error::Error;
use crate::event::{Event, EventId};
use crate::store::{Backend, Operation, Pool, TxConn};

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
    pub(crate) engine: Arc<Engine<B>>,
    _handle: Arc<Handle>,
}

impl<B: Backend> Clone for EventBus<B> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            _handle: self._handle.clone(),
        }
    }
}

impl<B: Backend> fmt::Debug for EventBus<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBus")
            .field("backend", &B::NAME)
            .field("listeners", &self.engine.registry.len())
            .field("phase", &self.engine.runner.phase())
            .finish_non_exhaustive()
    }
}

/// Stops the background work when the last [`EventBus`] handle goes away.
struct Handle(Arc<Runner>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.drain();
    }
}

impl<B: Backend> EventBus<B> {
    pub(crate) fn from_engine(engine: Arc<Engine<B>>) -> Self {
        let handle = Arc::new(Handle(engine.runner.clone()));
        Self {
            engine,
            _handle: handle,
        }
    }

    /// The pool the bus uses.
    pub fn pool(&self) -> &Pool<B> {
        &self.engine.pool
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
    /// returned. The transaction is: `BEGIN`, each operation in order, the event, `COMMIT`. The
    /// event is one statement for its id and all its deliveries on PostgreSQL; two on SQLite
    /// (the next id, the deliveries), which run with the `COMMIT` in one trip to the blocking
    /// pool; three on MySQL (an id row, the id and the clock, the deliveries). On PostgreSQL,
    /// with operations from `#[derive(Entity)]`:
    /// - one operation and the event are a single statement,
    ///   `WITH txbus_write AS (<the write>) INSERT INTO txbus_deliveries ...`, atomic by itself:
    ///   one round trip, one commit, prepared once per connection;
    /// - several (which one statement could not apply in order: they may touch the same row)
    ///   travel in one round trip when none of their columns has a custom SQL type (an enum, an
    ///   extension's type: diesel looks those up first, once per connection); otherwise `BEGIN`
    ///   travels with the first operation and the event's statement with the `COMMIT`.
    ///
    /// An emit without operations is a single statement on PostgreSQL, one trip to the blocking
    /// pool on SQLite, and on MySQL its three statements without a transaction (the deliveries
    /// are one statement, atomic by itself).
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
        let prepared = self.engine.prepare(&event);
        self.write(E::NAME, prepared, ops.into_iter().collect())
    }

    /// Writes `ops` and the prepared event in one transaction, then dispatches it.
    pub(crate) fn write<'a>(
        &'a self,
        name: &'static str,
        prepared: Result<Prepared, Error>,
        ops: Vec<Operation<'a, B>>,
    ) -> impl Future<Output = Result<EventId, Error>> + Send + 'a {
        let span =
            tracing::debug_span!("txbus.emit", event = name, event_id = tracing::field::Empty);
        async move {
            let engine = &*self.engine;
            engine.check_running()?;
            let prepared = prepared?;
            let mut guard = TxConn::<B>::checkout(&engine.pool).await?;
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
            engine.dispatch(vec![Written {
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
        self.engine.runner.tracker.wait_idle()
    }

    /// Stops the bus: no more polls or emits; deliveries queued here are handed back at once for
    /// other instances; running listeners get the grace period
    /// ([`EventBusBuilder::shutdown_grace`](crate::EventBusBuilder::shutdown_grace)) to finish, and are cancelled and released after it;
    /// then the last results are written. Calling it again waits for the first call.
    pub fn shutdown(&self) -> impl Future<Output = ()> + Send + '_ {
        self.engine.shutdown()
    }
}
