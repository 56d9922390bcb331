//! Entity operations written in the same transaction as an event.

use std::fmt;

use diesel::QueryResult;

use crate::{Backend, BoxFuture};

/// A row the bus can write or delete in an emit's transaction: see [`persist`] and [`remove`].
///
/// Derive it with `#[derive(txbus::Entity)]` beside diesel's `Insertable`, `AsChangeset` and
/// `Identifiable`; the derive implements it for every backend txbus was built with
/// (`#[entity(backends(postgres))]` restricts that). By hand, implement both methods with
/// diesel-async queries on `conn`; they run inside the emit's transaction, so they must not begin,
/// commit or roll back one themselves.
///
/// On PostgreSQL the derive's writes travel with the event (see
/// [`EventBus::emit`](crate::EventBus::emit)); an emit with one of them is one statement,
/// `WITH txbus_write AS (<the write>) INSERT ...`. PostgreSQL refuses a write in `WITH` to a table
/// with rules (`CREATE RULE`); for such a table implement `Entity` by hand. The upsert is kept
/// prepared per connection when the struct has at most three `Option` fields (each one doubles
/// the SQL texts the upsert can take); otherwise it is prepared at each emit.
///
/// ```
/// use diesel::prelude::*;
///
/// diesel::table! {
///     users (id) {
///         id -> BigInt,
///         email -> Text,
///     }
/// }
///
/// #[derive(Insertable, AsChangeset, Identifiable, txbus::Entity)]
/// #[diesel(table_name = users)]
/// struct User {
///     id: i64,
///     email: String,
/// }
/// ```
pub trait Entity<B: Backend>: Sync {
    /// Inserts the row, or updates every column when a row with its primary key exists.
    fn persist<'c>(&'c self, conn: &'c mut B::Connection) -> BoxFuture<'c, QueryResult<()>>;

    /// Deletes the row with its primary key (nothing when there is none).
    fn remove<'c>(&'c self, conn: &'c mut B::Connection) -> BoxFuture<'c, QueryResult<()>>;

    /// The same write through a shared connection, for backends that pipeline statements
    /// (PostgreSQL), or `None`. The derive provides it; the statement must not open or end a
    /// transaction, and must not need a type lookup that could delay it behind later statements
    /// (the derive's statements need none: diesel looks up only custom SQL types, once per
    /// connection, and the bus sends nothing after it until it completes).
    #[doc(hidden)]
    fn __pipelined<'c>(
        &'c self,
        _conn: &'c B::Connection,
        _remove: bool,
    ) -> Option<BoxFuture<'c, QueryResult<()>>> {
        None
    }

    /// Whether the write of [`Entity::__pipelined`] goes on the wire at its first poll, so that
    /// statements polled after it follow it: its SQL and its values serialize, and it needs no
    /// custom SQL type looked up first. The derive provides it.
    #[doc(hidden)]
    fn __sends_at_once(&self, _remove: bool) -> bool {
        false
    }

    /// The write as one statement, which PostgreSQL runs together with the event's insert as a
    /// single statement (`WITH write AS (...) INSERT ...`), or `None`. The derive provides it;
    /// it must be a plain `INSERT`, `UPDATE` or `DELETE` without a `RETURNING` clause.
    #[cfg(feature = "postgres")]
    #[doc(hidden)]
    fn __statement(&self, _remove: bool) -> Option<crate::__private::PgStatement<'_>> {
        None
    }
}

/// A write to run with an event, in its transaction: made by [`persist`] or [`remove`] and given
/// to [`EventBus::emit`](crate::EventBus::emit).
pub struct Operation<'a, B: Backend> {
    entity: &'a (dyn Entity<B> + 'a),
    kind: Kind,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Persist,
    Remove,
}

impl<B: Backend> Operation<'_, B> {
    pub(crate) fn run<'c>(&'c self, conn: &'c mut B::Connection) -> BoxFuture<'c, QueryResult<()>> {
        match self.kind {
            Kind::Persist => self.entity.persist(conn),
            Kind::Remove => self.entity.remove(conn),
        }
    }

    /// The write through a shared connection, when the entity offers one.
    #[cfg(feature = "postgres")]
    pub(crate) fn pipelined<'c>(
        &'c self,
        conn: &'c B::Connection,
    ) -> Option<BoxFuture<'c, QueryResult<()>>> {
        self.entity
            .__pipelined(conn, matches!(self.kind, Kind::Remove))
    }

    /// The write as one statement, when the entity offers it.
    #[cfg(feature = "postgres")]
    pub(crate) fn statement(&self) -> Option<crate::__private::PgStatement<'_>> {
        self.entity.__statement(matches!(self.kind, Kind::Remove))
    }

    /// Whether [`Operation::pipelined`] offers a write that is sent at its first poll.
    #[cfg(feature = "postgres")]
    pub(crate) fn sends_at_once(&self) -> bool {
        self.entity
            .__sends_at_once(matches!(self.kind, Kind::Remove))
    }
}

impl<B: Backend> fmt::Debug for Operation<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Operation")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Inserts `entity`, or updates it when its primary key exists, in the emit's transaction.
///
/// ```no_run
/// # use diesel::prelude::*;
/// # diesel::table! { users (id) { id -> BigInt, email -> Text, } }
/// # #[derive(Insertable, AsChangeset, Identifiable, txbus::Entity)]
/// # #[diesel(table_name = users)]
/// # struct User { id: i64, email: String }
/// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
/// # struct UserCreated { user_id: i64 }
/// # async fn run(bus: txbus::EventBus<txbus::Sqlite>) -> Result<(), txbus::Error> {
/// let user = User { id: 1, email: "ada@example.com".into() };
/// bus.emit(UserCreated { user_id: 1 }, [txbus::persist(&user)]).await?;
/// # Ok(())
/// # }
/// ```
pub fn persist<'a, B: Backend, T: Entity<B> + Sync>(entity: &'a T) -> Operation<'a, B> {
    Operation {
        entity,
        kind: Kind::Persist,
    }
}

/// Deletes `entity` by its primary key in the emit's transaction.
pub fn remove<'a, B: Backend, T: Entity<B> + Sync>(entity: &'a T) -> Operation<'a, B> {
    Operation {
        entity,
        kind: Kind::Remove,
    }
}
