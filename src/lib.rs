//! # txbus
//!
//! A transactional event bus for Rust services on [diesel-async](diesel_async) and tokio.
//!
//! A service writes its entities and an event in **one database transaction**. Right after the
//! commit, the event goes to every [`#[listener]`](listener) function registered for it. What
//! fails is retried by a background poller under per-event limits ([`EventSettings`]: expiry,
//! execution time, retry delay with backoff); what never succeeds ends as a dead letter that
//! stays in the database. It runs on PostgreSQL (feature `postgres`), MySQL 8 / MariaDB 10.6+
//! (feature `mysql`) and an embedded SQLite (feature `sqlite`, the default) that needs no server.
//!
//! ## The guarantees
//! 1. **Atomicity**: an event exists if and only if the transaction that emitted it commits.
//!    Listeners never see events of rolled-back transactions, and never run before the commit.
//! 2. **At least once per listener**: every (event, listener) delivery runs until it succeeds or
//!    becomes a dead letter with a reason (expired, attempts exhausted, aborted, no listener).
//!    Nothing is dropped silently: not for a crash, a restart, a timeout, a panic or bad JSON.
//! 3. **Once after success**: a listener that succeeded is not run again for that event, except
//!    when the process dies between the success and its durable record (the results of a batch
//!    are written within milliseconds).
//! 4. **No concurrent double run**: while a delivery is leased (its `max_execution_time`), no
//!    other process or task runs it; a listener that runs past its lease is cancelled (its future
//!    dropped) before the lease ends, and its result is recorded only if it still holds the lease.
//! 5. **Time limits per event**: see [`EventSettings`]. All times are the database's clock.
//!
//! ## How it flows
//! [`EventBus::emit`] (or [`Transaction::emit`] inside [`EventBus::transaction`]) writes the
//! event and one delivery row per listener this process knows, already leased to this process.
//! After the commit the deliveries are queued here and run with bounded concurrency, each until
//! the end of its lease; their results are written in batches. Failures get a retry time with
//! exponential backoff and jitter. The poller, every `retry_every`, claims due deliveries (`FOR
//! UPDATE SKIP LOCKED` on PostgreSQL and MySQL; SQLite has one writer) of the listeners this process has, so
//! several processes can share a database, and turns expired ones into dead letters. A listener
//! always gets the event deserialized from the stored JSON, on the first attempt and on retries.
//!
//! ## Example
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use txbus::{Context, EventBus, ListenerError, Pool, Sqlite};
//!
//! #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
//! #[event(name = "user.created")]
//! struct UserCreated { user_id: i64, email: String }
//!
//! #[txbus::listener]
//! async fn send_welcome(event: UserCreated, ctx: Context) -> Result<(), ListenerError> {
//!     println!("welcome {} (attempt {})", event.email, ctx.attempt());
//!     Ok(())
//! }
//!
//! # let dir = std::env::temp_dir().join(format!("txbus-doc-lib-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # let path = dir.join("app.db");
//! let pool = Pool::<Sqlite>::connect(path.to_str().unwrap()).await?;
//! let bus = EventBus::builder(pool).build().await?;
//! bus.emit(UserCreated { user_id: 1, email: "ada@example.com".into() }, []).await?;
//! bus.wait_idle().await;
//! bus.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! ## Scheduling and cancelling
//! [`EventBus::emit_after`] and [`EventBus::emit_at`] commit an event whose listeners first run
//! when it is due; [`EventBus::cancel`] deletes the deliveries of an event that have not started.
//! Both work inside a transaction too ([`Transaction::emit_after`], [`Transaction::cancel`]), so a
//! timeout is scheduled with the entity it guards and cancelled with the write that settles it.
//!
//! ## Receiving from outside
//! [`EventBus::receive`] turns a message from a broker, a webhook or a file into an event the
//! first time its [`MessageId`] is seen within the dedup window, and does nothing for a
//! duplicate. Transactional listeners (see [`listener`]) write to the database exactly once per
//! delivery. [`InboxStore`] keeps received messages for consumers that pull them instead.
//!
//! ## Listeners and linking
//! `#[listener]` registers the function at link time (a `linkme` distributed slice). A listener
//! defined in a library crate is linked only if the binary refers to that crate; if nothing
//! does, add `use that_crate as _;`. The bus logs how many listeners it found when it starts,
//! and their ids at debug level.
//!
//! ## Architecture
//! Four layers; each module uses only those of the layers below it, and the crate root only
//! re-exports.
//!
//! 1. **Domain** (no database, no runtime): `event` (the [`Event`] trait, [`EventId`]),
//!    `settings` ([`EventSettings`], the backoff), `delivery` (delivery keys, how a run ends,
//!    [`DeadReason`]), `message` ([`MessageId`]), `listener` ([`Context`], [`ListenerError`],
//!    registration), `trace` (the W3C trace context kept with deliveries), `error`.
//! 2. **Store** (`store/`): the [`Backend`] contract split by concern — `outbox` (emits, claims,
//!    results), `inbox` (receipts and stored messages), `admin` (statistics, dead letters,
//!    replay, retention, stale leases), `migrate` (the embedded migrations and their runner) —
//!    with what every database shares written once beside them: `sql` (statements and bound
//!    values), `rows` (the rows they return), `update` (updates that report what they changed),
//!    `tx` (transactions), `pool` ([`Pool`]) and `entity` ([`Entity`] writes). `postgres/`,
//!    `mysql/` and `sqlite/` hold each database's SQL and what only it does (PostgreSQL's
//!    pipelined emit in `postgres/pipeline`).
//! 3. **Engine**: `engine` (what a bus's handles and tasks share, and its lifecycle),
//!    `dispatch/` (the queue and concurrency bound in `mod`, one run of a listener in `run`, the
//!    retry decision in `retry`, wake-ups when deliveries written here fall due in `due`, idle
//!    tracking in `tracker`, transactional listeners in `transactional`), `completion` (results written in batches), `poller` (expiry and claims
//!    of due deliveries), `stats`, `metrics`, `registry` (the listeners linked in).
//! 4. **Surface**: `bus` ([`EventBus`]), `builder` ([`EventBusBuilder`]), `transaction`
//!    ([`Transaction`]), `schedule` (scheduled events and cancellation), `receive` (the
//!    inbox's [`EventBus::receive`]), `inbox_store`
//!    ([`InboxStore`]), `testing` (the test kit; its hooks in the runner are `dispatch/hooks`), `admin` (statistics, dead letters and their replay, retention, stale
//!    leases), `cli/` (`args`, `commands`, `render`), `nats/` (`relay`, `inbox`), `web/` (the console's
//!    requests in `handlers`, its HTML in `pages`), and `private`
//!    (what the macros' expansions call).
#![cfg_attr(docsrs, feature(doc_cfg))]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

#[cfg(not(any(feature = "postgres", feature = "mysql", feature = "sqlite")))]
compile_error!(
    "txbus needs a database backend: enable the feature `postgres`, `mysql` or `sqlite`"
);

extern crate self as txbus;

// Each module uses only those of the layers above it in this list (see "Architecture").
// Domain: what an event, a delivery, a listener and a message are.
mod delivery;
mod error;
mod event;
mod listener;
mod message;
mod settings;
// Store: the database.
mod store;
// Engine: running deliveries.
mod completion;
mod dispatch;
mod engine;
mod metrics;
mod poller;
mod registry;
mod stats;
mod trace;
// Surface: what applications call.
mod admin;
mod builder;
mod bus;
#[cfg(feature = "cli")]
#[cfg_attr(docsrs, doc(cfg(feature = "cli")))]
pub mod cli;
mod inbox_store;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats;
mod receive;
mod schedule;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
mod transaction;
#[cfg(feature = "web")]
#[cfg_attr(docsrs, doc(cfg(feature = "web")))]
pub mod web;

pub use admin::{DeadLetter, DeadLetterQuery};
pub use builder::EventBusBuilder;
pub use bus::EventBus;
pub use delivery::DeadReason;
pub use error::{BuildError, Error, StateError};
pub use event::{Event, EventId, MAX_ORDERING_KEY_LEN, UpcastError};
/// A boxed, `Send` future, as [`Entity`] methods return.
pub use futures_util::future::BoxFuture;
pub use inbox_store::{InboxMessage, InboxStore};
pub use listener::{Context, ListenerError};
pub use message::MessageId;
pub use receive::Received;
pub use schedule::ScheduledDelivery;
pub use settings::EventSettings;
pub use stats::{DeliveryCounts, Stats};
#[cfg(feature = "mysql")]
pub use store::Mysql;
#[cfg(feature = "postgres")]
pub use store::Postgres;
#[cfg(feature = "sqlite")]
pub use store::Sqlite;
pub use store::{
    Backend, Entity, Operation, Pool, PoolBuilder, PooledConnection, migrate, persist, remove,
};
pub use transaction::{Transaction, TransactionFn};

/// Derives [`Event`]: `#[derive(txbus::Event)]`, with an optional `#[event(name = "...")]`
/// (default: the type's name).
pub use txbus_macros::Event;

/// Derives [`Entity`] for every backend txbus was built with, from diesel's `Insertable`,
/// `AsChangeset` and `Identifiable`; `#[entity(backends(postgres, sqlite))]` restricts the
/// backends.
pub use txbus_macros::Entity;

/// Registers an `async fn` as a listener of the event type of its first parameter.
///
/// ```
/// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
/// # struct UserCreated { email: String }
/// #[txbus::listener] // id: "<module path>::send_welcome"
/// async fn send_welcome(event: UserCreated, ctx: txbus::Context) -> Result<(), txbus::ListenerError> {
///     Ok(())
/// }
///
/// #[txbus::listener(name = "audit")] // an explicit id that survives renames and moves
/// async fn audit(event: UserCreated) -> anyhow::Result<()> {
///     Ok(())
/// }
///
/// // Renamed: deliveries stored under the former ids (pending, or replayed dead letters) run here.
/// #[txbus::listener(name = "crm.sync_user", aliases = ["my_app::listeners::sync_to_crm"])]
/// async fn sync_user(event: UserCreated) -> anyhow::Result<()> {
///     Ok(())
/// }
/// ```
///
/// The first parameter is the event, by value. An optional second one, `ctx: txbus::Context`,
/// tells the attempt number and gives the bus's state. The function returns `Result<(), E>` with
/// `E` convertible into [`ListenerError`]; its future must be `Send`. It stays an ordinary
/// function that can be called directly, in tests for example.
///
/// A listener's id is what its deliveries are stored under: by default the function's module
/// path and name, so moving or renaming the function changes it, and deliveries pending under
/// the old id then wait for a listener that no longer exists. Give a stable `name`, or list the
/// former ids in `aliases`; [`build`](EventBusBuilder::build) refuses an alias that is another
/// listener's id or alias.
///
/// # Transactional listeners
/// `#[txbus::listener(transactional)]` takes the transaction's connection as its last
/// parameter: `&mut AsyncPgConnection` (postgres), `&mut AsyncMysqlConnection` (mysql) or
/// `&mut SyncConnectionWrapper<SqliteConnection>` (sqlite). It runs inside a transaction in
/// which its delivery is also completed, fenced by its lease: its writes commit exactly once per
/// delivery. When it fails, times out (the connection is then dropped, not returned to the
/// pool) or has lost its lease, the transaction rolls back and the delivery is retried as usual.
/// Keep side effects outside the database out of it: they are not rolled back.
///
/// ```
/// use diesel::SqliteConnection;
/// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
/// use diesel_async::SimpleAsyncConnection;
/// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
/// # struct PaymentReceived { cents: i64 }
///
/// #[txbus::listener(transactional)]
/// async fn credit(
///     event: PaymentReceived,
///     ctx: txbus::Context,
///     conn: &mut SyncConnectionWrapper<SqliteConnection>,
/// ) -> Result<(), txbus::ListenerError> {
///     let sql = format!("UPDATE accounts SET balance = balance + {}", event.cents);
///     conn.batch_execute(&sql).await?;
///     Ok(())
/// }
/// ```
///
/// A bus whose backend has another connection type refuses to build
/// ([`BuildError::ListenerConnection`]); a type that is no backend's connection does not
/// compile.
pub use txbus_macros::listener;

/// Items the macros expand to. Not public API: it changes without notice.
#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;
