//! What the macros' expansions refer to, by absolute path, so that users never depend on the
//! crates behind them.

use std::future::Future;

pub use diesel;
pub use diesel_async;
pub use linkme;

pub use crate::listener::{ListenerCall, ListenerDef, ListenerKind, TxCall, TxListener};
pub use crate::registry::LISTENERS;
pub use crate::store::{
    CachedUpsert, Statement, Write, derived_persist as persist, derived_remove as remove,
};

use crate::event::Event;
use crate::listener::{Context, ListenerError};
use crate::store::Backend;

/// Deserializes `payload` into the listener's event type and starts the listener.
pub fn call<E, F, Fut, Err>(payload: &str, ctx: Context, listener: F) -> ListenerCall
where
    E: Event,
    F: FnOnce(E, Context) -> Fut,
    Fut: Future<Output = Result<(), Err>> + Send + 'static,
    Err: Into<ListenerError>,
{
    let event: E = deserialize(payload)?;
    let future = listener(event, ctx);
    Ok(Box::pin(async move { future.await.map_err(Into::into) }))
}

/// The event of a delivery, from its stored payload.
fn deserialize<E: Event>(payload: &str) -> Result<E, ListenerError> {
    serde_json::from_str(payload).map_err(|error| {
        ListenerError::from(format!(
            "the stored payload of event `{}` does not deserialize into `{}`: {error}",
            E::NAME,
            std::any::type_name::<E>(),
        ))
    })
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
impl TxConnection for <crate::store::Postgres as Backend>::Connection {}
#[cfg(feature = "mysql")]
impl TxConnection for <crate::store::Mysql as Backend>::Connection {}
#[cfg(feature = "sqlite")]
impl TxConnection for <crate::store::Sqlite as Backend>::Connection {}

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
    let event: E = deserialize(payload)?;
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
