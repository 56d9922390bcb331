//! What the macros' expansions refer to, by absolute path, so that users never depend on the
//! crates behind them.

use std::future::Future;

pub use diesel;
pub use diesel_async;
pub use linkme;

pub use crate::listener::{ListenerCall, ListenerDef, ListenerKind, TxCall, TxListener};
pub use crate::registry::LISTENERS;
use crate::{Context, Event, ListenerError};

/// Deserializes `payload` into the listener's event type and starts the listener.
pub fn call<E, F, Fut, Err>(payload: &str, ctx: Context, listener: F) -> ListenerCall
where
    E: Event,
    F: FnOnce(E, Context) -> Fut,
    Fut: Future<Output = Result<(), Err>> + Send + 'static,
    Err: Into<ListenerError>,
{
    let event: E = serde_json::from_str(payload).map_err(|error| {
        ListenerError::from(format!(
            "the stored payload of event `{}` does not deserialize into `{}`: {error}",
            E::NAME,
            std::any::type_name::<E>(),
        ))
    })?;
    let future = listener(event, ctx);
    Ok(Box::pin(async move { future.await.map_err(Into::into) }))
}

/// The connection of a backend txbus is built with: what a transactional listener may take.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not the connection of a txbus backend",
    label = "a transactional listener takes the transaction's connection here",
    note = "take `&mut AsyncPgConnection` (postgres), `&mut AsyncMysqlConnection` (mysql) or \
            `&mut SyncConnectionWrapper<SqliteConnection>` (sqlite), of a backend txbus is built with"
)]
pub trait TxConnection: Send + 'static {}

#[cfg(feature = "postgres")]
impl TxConnection for <crate::Postgres as crate::Backend>::Connection {}
#[cfg(feature = "mysql")]
impl TxConnection for <crate::Mysql as crate::Backend>::Connection {}
#[cfg(feature = "sqlite")]
impl TxConnection for <crate::Sqlite as crate::Backend>::Connection {}

/// Deserializes `payload`, finds the transaction's connection, and starts a transactional
/// listener on it.
pub fn call_tx<'c, E, C, F, Fut, Err>(
    payload: &str,
    ctx: Context,
    conn: &'c mut (dyn std::any::Any + Send),
    listener: F,
) -> TxCall<'c>
where
    E: Event,
    C: TxConnection,
    F: FnOnce(E, Context, &'c mut C) -> Fut,
    Fut: Future<Output = Result<(), Err>> + Send + 'c,
    Err: Into<ListenerError>,
{
    let conn = conn.downcast_mut::<C>().ok_or_else(|| {
        ListenerError::abort(format!(
            "this transactional listener takes `{}`, which is not the bus's connection",
            std::any::type_name::<C>()
        ))
    })?;
    let event: E = serde_json::from_str(payload).map_err(|error| {
        ListenerError::from(format!(
            "the stored payload of event `{}` does not deserialize into `{}`: {error}",
            E::NAME,
            std::any::type_name::<E>(),
        ))
    })?;
    let future = listener(event, ctx, conn);
    Ok(Box::pin(async move { future.await.map_err(Into::into) }))
}

/// Expands its input only when txbus is built with the `postgres` feature.
#[cfg(feature = "postgres")]
#[macro_export]
#[doc(hidden)]
macro_rules! __txbus_if_postgres {
    ($($item:tt)*) => { $($item)* };
}

/// Expands its input only when txbus is built with the `postgres` feature.
#[cfg(not(feature = "postgres"))]
#[macro_export]
#[doc(hidden)]
macro_rules! __txbus_if_postgres {
    ($($item:tt)*) => {};
}

/// Expands its input only when txbus is built with the `sqlite` feature.
#[cfg(feature = "sqlite")]
#[macro_export]
#[doc(hidden)]
macro_rules! __txbus_if_sqlite {
    ($($item:tt)*) => { $($item)* };
}

/// Expands its input only when txbus is built with the `sqlite` feature.
#[cfg(not(feature = "sqlite"))]
#[macro_export]
#[doc(hidden)]
macro_rules! __txbus_if_sqlite {
    ($($item:tt)*) => {};
}

/// Expands its input only when txbus is built with the `mysql` feature.
#[cfg(feature = "mysql")]
#[macro_export]
#[doc(hidden)]
macro_rules! __txbus_if_mysql {
    ($($item:tt)*) => { $($item)* };
}

/// Expands its input only when txbus is built with the `mysql` feature.
#[cfg(not(feature = "mysql"))]
#[macro_export]
#[doc(hidden)]
macro_rules! __txbus_if_mysql {
    ($($item:tt)*) => {};
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
#[derive(Debug, Clone, Copy)]
pub struct CachedUpsert<Q>(pub Q);

impl<Q> diesel::query_builder::QueryId for CachedUpsert<Q> {
    type QueryId = ();

    // Keyed by its SQL text, never by its type: see above.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<DB, Q> diesel::query_builder::QueryFragment<DB> for CachedUpsert<Q>
where
    DB: diesel::backend::Backend,
    Q: diesel::query_builder::QueryFragment<DB>,
{
    fn walk_ast<'b>(
        &'b self,
        pass: diesel::query_builder::AstPass<'_, 'b, DB>,
    ) -> diesel::QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &DB) -> diesel::QueryResult<bool> {
        Ok(true)
    }
}

/// Whether diesel-async sends `query` at the first poll of its execution on a connection whose
/// statement cache is free: its SQL builds, its values serialize, and no value has a custom SQL
/// type (an enum, an extension's type), which diesel-async would look up with a query of its own
/// first, once per connection, while statements polled after it went ahead.
#[cfg(feature = "postgres")]
pub fn sends_at_once<Q>(query: &Q) -> bool
where
    Q: diesel::query_builder::QueryFragment<diesel::pg::Pg>,
{
    use diesel::pg::{Pg, PgMetadataLookup, PgQueryBuilder, PgTypeMetadata};
    use diesel::query_builder::bind_collector::RawBytesBindCollector;

    /// Notes that a type had to be looked up.
    struct Lookups(bool);

    impl PgMetadataLookup for Lookups {
        fn lookup_type(&mut self, _type_name: &str, _schema: Option<&str>) -> PgTypeMetadata {
            self.0 = true;
            PgTypeMetadata::new(0, 0)
        }
    }

    let mut lookups = Lookups(false);
    let mut binds = RawBytesBindCollector::<Pg>::new();
    let mut sql = PgQueryBuilder::default();
    query.collect_binds(&mut binds, &mut lookups, &Pg).is_ok()
        && !lookups.0
        && query.to_sql(&mut sql, &Pg).is_ok()
        && query.is_safe_to_cache_prepared(&Pg).is_ok()
}

/// An entity's write as a PostgreSQL statement, for [`Entity::__statement`](crate::Entity).
#[cfg(feature = "postgres")]
pub type PgStatement<'a> =
    Box<dyn diesel::query_builder::QueryFragment<diesel::pg::Pg> + Send + 'a>;
