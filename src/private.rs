//! What the macros' expansions refer to, by absolute path, so that users never depend on the
//! crates behind them.

use std::future::Future;

pub use diesel;
pub use diesel_async;
pub use linkme;
pub use serde_json;

pub use crate::listener::{ListenerCall, ListenerDef, ListenerKind, TxCall, TxListener};
pub use crate::registry::LISTENERS;
pub use crate::store::{
    CachedUpsert, Statement, Write, derived_persist as persist, derived_remove as remove,
};

use crate::delivery::DeadReason;
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
    let event: E = deserialize(payload, ctx.stored_version)?;
    let future = listener(event, ctx);
    Ok(Box::pin(async move { future.await.map_err(Into::into) }))
}

/// The event of a delivery, from its payload stored at `version`: upcast step by step to the
/// type's version first when it is older. A step that fails, or a payload that still does not
/// deserialize after its steps, makes the delivery a dead letter (`upcast_failed`): running it
/// again cannot help.
fn deserialize<E: Event>(payload: &str, version: u32) -> Result<E, ListenerError> {
    let not_deserialized = |error: serde_json::Error| {
        format!(
            "the stored payload of event `{}` (version {version}) does not deserialize into `{}` \
             (version {}): {error}",
            E::NAME,
            std::any::type_name::<E>(),
            E::VERSION,
        )
    };
    if version == E::VERSION {
        return serde_json::from_str(payload).map_err(|e| not_deserialized(e).into());
    }
    if version > E::VERSION {
        // Claims leave such deliveries to instances that know the version.
        return Err(ListenerError::from(format!(
            "event `{}` was stored at version {version}, newer than version {} of `{}`",
            E::NAME,
            E::VERSION,
            std::any::type_name::<E>(),
        )));
    }
    let upcast_failed = |message: String| ListenerError::dead(DeadReason::UpcastFailed, message);
    let mut value: serde_json::Value = serde_json::from_str(payload)
        .map_err(|e| upcast_failed(format!("the stored payload is not JSON: {e}")))?;
    for from in version..E::VERSION {
        value = E::upcast(from, value).map_err(|error| {
            upcast_failed(format!(
                "upcasting event `{}` from version {from} to {} failed: {error}",
                E::NAME,
                from + 1
            ))
        })?;
    }
    serde_json::from_value(value).map_err(|e| upcast_failed(not_deserialized(e)))
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
    let event: E = deserialize(payload, ctx.stored_version)?;
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
