//! Transactions: ending one whatever its work returned, and pooled connections that never go
//! back to the pool in the middle of one.

use deadpool::managed::Object;
use diesel::QueryResult;
use diesel_async::{AsyncConnection, TransactionManager};

use crate::error::Error;
use crate::store::pool::{Pool, PooledConnection, WriteTurn};
use crate::store::{Backend, Inserted, NewEvent};

type Manager<B> = <<B as Backend>::Connection as AsyncConnection>::TransactionManager;

/// Ends the transaction opened by [`Backend::begin`] after its work returned `result`: commits
/// on `Ok`, rolls back on `Err` and returns that first error (a failed rollback leaves the
/// connection broken, and the pool drops it).
pub(crate) async fn finish<B: Backend, T, E: From<diesel::result::Error>>(
    conn: &mut B::Connection,
    result: Result<T, E>,
) -> Result<T, E> {
    match result {
        Ok(value) => {
            Manager::<B>::commit_transaction(conn).await?;
            Ok(value)
        }
        Err(error) => {
            let _ = Manager::<B>::rollback_transaction(conn).await;
            Err(error)
        }
    }
}

/// Whether `conn` is in a transaction, as its transaction manager knows (`None`: it is broken).
fn depth<B: Backend>(conn: &mut B::Connection) -> Option<bool> {
    let status = Manager::<B>::transaction_manager_status_mut(conn);
    status.transaction_depth().ok().map(|depth| depth.is_some())
}

/// A pooled connection that may be in a transaction. While its transaction is not known to be
/// over (the caller's future was cancelled, a rollback failed), dropping it closes the connection
/// instead of returning it to the pool, so no pooled connection ever sits in an open transaction.
pub(crate) struct TxConn<B: Backend> {
    conn: Option<PooledConnection<B>>,
    in_doubt: bool,
    /// Released after the connection (fields drop after `Drop::drop`).
    _turn: WriteTurn,
}

impl<B: Backend> TxConn<B> {
    /// A connection from `pool`, not yet in a transaction.
    pub(crate) async fn checkout(pool: &Pool<B>) -> Result<Self, Error> {
        let (turn, conn) = pool.get_for_write().await?;
        Ok(Self {
            conn: Some(conn),
            in_doubt: false,
            _turn: turn,
        })
    }

    /// A connection from `pool` in a transaction opened by [`Backend::begin`].
    pub(crate) async fn begin(pool: &Pool<B>) -> Result<Self, Error> {
        let mut guard = Self::checkout(pool).await?;
        guard.in_doubt = true;
        B::begin(guard.conn()?).await?;
        Ok(guard)
    }

    pub(crate) fn conn(&mut self) -> Result<&mut B::Connection, Error> {
        self.conn.as_deref_mut().ok_or(Error::Shutdown)
    }

    /// Marks the start of work that opens and ends a transaction by itself.
    pub(crate) fn enter(&mut self) {
        self.in_doubt = true;
    }

    /// After such work returned: the connection is reusable if no transaction is left open.
    pub(crate) fn settle(&mut self) {
        if let Some(conn) = self.conn.as_deref_mut() {
            self.in_doubt = depth::<B>(conn) != Some(false);
        }
    }

    pub(crate) async fn commit(&mut self) -> Result<(), Error> {
        Manager::<B>::commit_transaction(self.conn()?).await?;
        self.in_doubt = false;
        Ok(())
    }

    /// Writes the deliveries of `events` and commits (see [`Outbox::commit_with_events`](crate::store::Outbox::commit_with_events)).
    /// On failure, the transaction is rolled back if it is still open.
    pub(crate) async fn commit_with_events(
        &mut self,
        events: &[(Inserted, &NewEvent)],
    ) -> Result<(), Error> {
        if events.is_empty() {
            let committed = self.commit().await;
            if committed.is_err() {
                self.settle();
            }
            return committed;
        }
        match B::commit_with_events(self.conn()?, events).await {
            Ok(()) => {
                self.in_doubt = false;
                Ok(())
            }
            Err(error) => {
                self.rollback_if_open().await;
                Err(error.into())
            }
        }
    }

    /// After a failure: rolls back if a transaction is still open, then settles.
    pub(crate) async fn rollback_if_open(&mut self) {
        let open = self
            .conn
            .as_deref_mut()
            .is_some_and(|conn| depth::<B>(conn) != Some(false));
        if open {
            self.rollback().await;
        }
        self.settle();
    }

    pub(crate) async fn rollback(&mut self) {
        let Ok(conn) = self.conn() else { return };
        match Manager::<B>::rollback_transaction(conn).await {
            Ok(()) => self.in_doubt = false,
            Err(error) => tracing::warn!(%error, "rollback failed; closing the connection"),
        }
    }
}

impl<B: Backend> Drop for TxConn<B> {
    fn drop(&mut self) {
        if self.in_doubt
            && let Some(conn) = self.conn.take()
        {
            drop(Object::take(conn));
        }
    }
}

/// Opens a transaction for [`Backend::begin`]'s default: the connection's own `BEGIN`.
pub(crate) async fn begin<C: AsyncConnection>(conn: &mut C) -> QueryResult<()> {
    C::TransactionManager::begin_transaction(conn).await
}
