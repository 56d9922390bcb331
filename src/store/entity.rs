//! Entity operations written in the same transaction as an event, and how each backend writes
//! the derived ones.

use std::fmt;

use diesel::QueryResult;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::RunQueryDsl;
use futures_util::future::BoxFuture;

use crate::store::Backend;

/// A row the bus can write or delete in an emit's transaction: see [`persist`] and [`remove`].
///
/// Derive it with `#[derive(txbus::Entity)]` beside diesel's `Insertable`, `AsChangeset` and
/// `Identifiable`; the derive implements it for every backend txbus was built with
/// (`#[entity(backends(postgres))]` restricts that). By hand, implement both methods with
/// diesel-async queries on `conn`; they run inside the emit's transaction, so they must not begin,
/// commit or roll back one themselves.
///
/// A derived entity is written the way its backend writes fastest: an upsert on PostgreSQL and
/// SQLite, an insert followed on a duplicate key by an update on MySQL (`ON DUPLICATE KEY UPDATE`
/// would also fire on any other unique key). On PostgreSQL its write travels with the event (see
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

    /// The derive's statements, from which the backend builds its writes.
    #[doc(hidden)]
    fn __statement(&self, _write: Write) -> Option<Statement<'_, B::Db>> {
        None
    }
}

/// A statement of a derived entity.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Insert, or update every column when the primary key exists (PostgreSQL, SQLite).
    Upsert,
    /// Insert.
    Insert,
    /// Update every column by primary key.
    Update,
    /// Delete by primary key.
    Delete,
}

/// How a backend persists a derived entity.
#[derive(Debug, Clone, Copy)]
pub enum Persist {
    /// With its [`Write::Upsert`] statement.
    Upsert,
    /// With [`Write::Insert`]; on a duplicate key, with [`Write::Update`]; if that finds no row
    /// with the primary key, the duplicate was of another unique key and the insert's error
    /// stands. (MySQL: an update first would take gap locks that deadlock concurrent inserts
    /// under REPEATABLE READ. It undoes only the failed statement, not the transaction.)
    InsertThenUpdate,
}

/// One statement of an entity, for any backend.
#[doc(hidden)]
pub struct Statement<'a, DB>(Box<dyn QueryFragment<DB> + Send + 'a>);

impl<'a, DB: diesel::backend::Backend> Statement<'a, DB> {
    /// Wraps a diesel statement.
    pub fn new(statement: impl QueryFragment<DB> + Send + 'a) -> Self {
        Self(Box::new(statement))
    }
}

impl<DB: diesel::backend::Backend> QueryFragment<DB> for Statement<'_, DB> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    // Through the trait object: `Box`'s own implementation would walk the tree, and find the
    // upsert clause that diesel marks as not cacheable even where `CachedUpsert` says otherwise.
    fn is_safe_to_cache_prepared(&self, backend: &DB) -> QueryResult<bool> {
        (*self.0).is_safe_to_cache_prepared(backend)
    }
}

/// Keyed by its SQL text in the statement cache.
impl<DB> QueryId for Statement<'_, DB> {
    type QueryId = ();

    const HAS_STATIC_QUERY_ID: bool = false;
}

/// An entity's upsert, prepared once per connection and then reused.
///
/// diesel never caches an `ON CONFLICT ... DO UPDATE` statement: which columns the changeset
/// sets can change with the values (an `Option` field that is `None` is left out), so one Rust
/// type may stand for several SQL texts. diesel-async then prepares the statement again at every
/// execution: one more round trip and one more parse for each emit. The cache is keyed by the SQL
/// text and the bind types when the query id is not static, so caching is correct whatever the
/// values; the derive wraps an upsert in this only when the number of texts is small (few
/// `Option` fields), which bounds the prepared statements each connection keeps.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct CachedUpsert<Q>(pub Q);

impl<Q> QueryId for CachedUpsert<Q> {
    type QueryId = ();

    // Keyed by its SQL text, never by its type: see above.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<DB: diesel::backend::Backend, Q: QueryFragment<DB>> QueryFragment<DB> for CachedUpsert<Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &DB) -> QueryResult<bool> {
        Ok(true)
    }
}

/// The statements of a derived entity for a backend: `$backend` is its marker type, `$cached`
/// whether the upsert is kept prepared (see `CachedUpsert`). Expanded in the derive's impl.
#[doc(hidden)]
#[macro_export]
macro_rules! __txbus_statement {
    (Mysql, $entity:expr, $write:expr, $cached:tt) => {{
        use $crate::__private::Write;
        let table = <Self as $crate::__private::diesel::associations::HasTable>::table();
        match $write {
            Write::Insert => ::core::option::Option::Some($crate::__private::Statement::new(
                $crate::__private::diesel::insert_into(table).values($entity),
            )),
            Write::Update => ::core::option::Option::Some($crate::__private::Statement::new(
                $crate::__private::diesel::update($entity).set($entity),
            )),
            Write::Delete => ::core::option::Option::Some($crate::__private::Statement::new(
                $crate::__private::diesel::delete($entity),
            )),
            Write::Upsert => ::core::option::Option::None,
        }
    }};
    ($backend:ident, $entity:expr, $write:expr, $cached:tt) => {{
        use $crate::__private::Write;
        use $crate::__private::diesel::Table as _;
        let table = <Self as $crate::__private::diesel::associations::HasTable>::table();
        match $write {
            Write::Upsert => {
                let upsert = $crate::__private::diesel::insert_into(table)
                    .values($entity)
                    .on_conflict(table.primary_key())
                    .do_update()
                    .set($entity);
                ::core::option::Option::Some($crate::__txbus_statement!(@cached $cached, upsert))
            }
            Write::Delete => ::core::option::Option::Some($crate::__private::Statement::new(
                $crate::__private::diesel::delete($entity),
            )),
            Write::Insert | Write::Update => ::core::option::Option::None,
        }
    }};
    (@cached true, $upsert:expr) => {
        $crate::__private::Statement::new($crate::__private::CachedUpsert($upsert))
    };
    (@cached false, $upsert:expr) => {
        $crate::__private::Statement::new($upsert)
    };
}

/// Runs one of `entity`'s statements.
async fn run<B: Backend>(
    entity: &(dyn Entity<B> + '_),
    write: Write,
    conn: &mut B::Connection,
) -> QueryResult<usize> {
    let statement = entity.__statement(write).ok_or_else(|| {
        DieselError::QueryBuilderError(
            format!("this entity has no {write:?} statement for {}", B::NAME).into(),
        )
    })?;
    statement.execute(conn).await
}

/// `persist` of a derived entity: the backend's way (see [`Persist`]).
#[doc(hidden)]
pub fn derived_persist<'c, B: Backend, T: Entity<B>>(
    entity: &'c T,
    conn: &'c mut B::Connection,
) -> BoxFuture<'c, QueryResult<()>> {
    Box::pin(async move {
        match B::PERSIST {
            Persist::Upsert => run(entity, Write::Upsert, conn).await.map(drop),
            Persist::InsertThenUpdate => match run(entity, Write::Insert, conn).await {
                Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info)) => {
                    if run(entity, Write::Update, conn).await? == 0 {
                        return Err(DieselError::DatabaseError(
                            DatabaseErrorKind::UniqueViolation,
                            info,
                        ));
                    }
                    Ok(())
                }
                other => other.map(drop),
            },
        }
    })
}

/// `remove` of a derived entity.
#[doc(hidden)]
pub fn derived_remove<'c, B: Backend, T: Entity<B>>(
    entity: &'c T,
    conn: &'c mut B::Connection,
) -> BoxFuture<'c, QueryResult<()>> {
    Box::pin(async move { run(entity, Write::Delete, conn).await.map(drop) })
}

/// A write to run with an event, in its transaction: made by [`persist`] or [`remove`] and given to [`EventBus::emit`](crate::EventBus::emit).
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
    /// Runs the write on `conn`, in the transaction open there.
    pub(crate) fn run<'c>(&'c self, conn: &'c mut B::Connection) -> BoxFuture<'c, QueryResult<()>> {
        match self.kind {
            Kind::Persist => self.entity.persist(conn),
            Kind::Remove => self.entity.remove(conn),
        }
    }

    /// The write as one statement, when the entity is derived and its backend writes it with
    /// one (PostgreSQL sends it with the event).
    #[cfg(feature = "postgres")]
    pub(crate) fn statement(&self) -> Option<Statement<'_, B::Db>> {
        let write = match (self.kind, B::PERSIST) {
            (Kind::Remove, _) => Write::Delete,
            (Kind::Persist, Persist::Upsert) => Write::Upsert,
            (Kind::Persist, Persist::InsertThenUpdate) => return None,
        };
        self.entity.__statement(write)
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
