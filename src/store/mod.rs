//! The database side of the bus: the [`Backend`] contract, what is the same on every database
//! written once, and one module per database with its SQL and what only it does.
//!
//! Storage (see the migrations): one table, `txbus_deliveries`, with one row per (event,
//! listener) that carries the event (name, JSON payload, emit time, lease length) and the
//! delivery's state: attempts, when it is next available (a retry time, or the end of a lease),
//! when it expires, and for dead letters when and why it died. A row is written in the emitting
//! transaction and deleted when its listener succeeds.
//!
//! One table rather than events plus deliveries: an emit then writes one row and two index
//! entries per listener instead of two rows, four index entries and a foreign-key check, and a
//! success is one fenced delete with nothing left to clean up. Measured with pgbench on
//! PostgreSQL at 16 clients, the same statements in the same round trips, beside a plain upsert
//! transaction: 0.74× its rate for one table, 0.64× for two (BENCHMARKS.md). An event with
//! several listeners stores its payload once per listener.
//!
//! A backend is its statements, grouped by concern in [`Outbox`], [`Inbox`], [`Admin`] and
//! [`Migrations`], whose provided methods run them the same way on every database; where a
//! database needs another shape (MySQL has no `RETURNING`), the statement's type says so
//! ([`Update`], [`Receipt`], [`Take`], [`RoundLock`], [`MigrationLock`]). A backend implements
//! only the writes that make an emit fast on it, and the recording of results.

use std::future::Future;

use diesel::QueryResult;
use diesel_async::AsyncConnection;

use crate::error::Error;

mod admin;
#[cfg(feature = "testing")]
mod clock;
mod entity;
mod inbox;
mod migrate;
mod outbox;
mod pool;
mod rows;
mod sql;
mod tx;
mod update;

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use entity::{
    CachedUpsert, Entity, Operation, Statement, Write, derived_persist, derived_remove, persist,
    remove,
};
pub use migrate::migrate;
#[cfg(feature = "mysql")]
pub use mysql::Mysql;
#[cfg(all(feature = "mysql", feature = "testing"))]
pub(crate) use mysql::without_returning as mysql_without_returning;
pub use pool::{Pool, PoolBuilder, PooledConnection};
#[cfg(feature = "postgres")]
pub use postgres::Postgres;
#[cfg(feature = "sqlite")]
pub use sqlite::Sqlite;

pub(crate) use admin::{
    Admin, DeadFilter, DeadRow, ListenerRow, Retention, RoundLock, ScheduledRow,
};
#[cfg(feature = "testing")]
pub(crate) use clock::Clock;
pub(crate) use entity::Persist;
pub(crate) use inbox::{Inbox, Receipt, StoredMessage, Take};
pub(crate) use migrate::Migrations;
pub(crate) use outbox::{Claimed, Died, Inserted, NewEvent, Outbox, Recorded};
pub(crate) use rows::{DeliveryRef, attempt_u32, micros_since_epoch, system_time_from_micros};
pub(crate) use sql::SqlDb;
pub(crate) use tx::TxConn;
pub(crate) use update::Update;

mod sealed {
    pub trait Sealed {}
}
pub(crate) use sealed::Sealed;

/// A database txbus runs on: `Postgres`, `Mysql` or `Sqlite` (each behind its feature).
///
/// This trait is sealed; its items besides the connection type and the name are the bus's
/// internals, hidden from the docs.
pub trait Backend:
    Sealed + Outbox + Inbox + Admin + Migrations + Sized + Send + Sync + 'static
{
    /// The diesel-async connection of this backend, which [`Pool::get`](crate::Pool::get)
    /// hands out and [`Transaction::conn`](crate::Transaction::conn) lends.
    type Connection: AsyncConnection<Backend = Self::Db> + Send + 'static;

    /// A short name for messages: `"postgres"`, `"mysql"`, `"sqlite"`.
    const NAME: &'static str;

    /// The diesel backend of the connection.
    #[doc(hidden)]
    type Db: SqlDb;

    /// The pool's connection manager.
    #[doc(hidden)]
    type Manager: deadpool::managed::Manager<
            Type = Self::Connection,
            Error = diesel_async::pooled_connection::PoolError,
        > + Send
        + Sync
        + 'static;

    /// Whether the database lets one transaction write at a time (SQLite). The bus's writers
    /// in a process then take turns on an async lock, rather than on the database's busy
    /// handler, which sleeps for milliseconds between tries.
    #[doc(hidden)]
    const SINGLE_WRITER: bool = false;

    /// A statement run before a bus write that locks rows (claims, result writes, purges), so
    /// that it locks only the rows it changes and no gaps that would hold up concurrent emits
    /// (MySQL: `SET TRANSACTION ISOLATION LEVEL READ COMMITTED`, for the next transaction or
    /// statement).
    #[doc(hidden)]
    const READ_COMMITTED: Option<&'static str> = None;

    /// The pool's connection manager for `url`.
    #[doc(hidden)]
    fn manager(url: &str) -> Result<Self::Manager, Error>;

    /// Opens a transaction in which the bus writes, for [`EventBus::transaction`](crate::EventBus::transaction)
    /// too.
    #[doc(hidden)]
    fn begin(conn: &mut Self::Connection) -> impl Future<Output = QueryResult<()>> + Send {
        tx::begin(conn)
    }

    /// Sets the offset from the database's clock that the bus's statements on `conn` read
    /// (the test kit's clock).
    #[doc(hidden)]
    #[cfg(feature = "testing")]
    fn set_clock_offset(
        conn: &mut Self::Connection,
        offset_us: i64,
    ) -> impl Future<Output = QueryResult<()>> + Send;
}
