//! Transactional listeners: the listener runs inside a transaction that also completes its
//! delivery, so its database writes happen exactly once per delivery.
//!
//! The run opens a transaction, runs the listener on its connection until the end of the lease,
//! then deletes the delivery in the same transaction if this run still holds it (its attempt
//! number matches) and commits. A failure or panic rolls back, and the failure is recorded like
//! any other; a run that lost its lease rolls back and records nothing; a run past its deadline
//! is dropped with its connection, which is closed instead of going back to the pool, so the
//! database rolls it back.

use std::any::Any;
use std::time::Instant;

use futures_util::future::BoxFuture;

use crate::dispatch::Job;
use crate::dispatch::run::{Ran, Transactions, Verdict, run_listener};
use crate::listener::{Context, ListenerError, TxListener};
use crate::store::{Backend, Pool, TxConn};

/// [`Transactions`] on the bus's pool; with `retain`, a success marks the delivery delivered
/// instead of deleting it.
pub(crate) struct PoolTransactions<B: Backend> {
    pub(crate) pool: Pool<B>,
    pub(crate) retain: bool,
}

impl<B: Backend> Transactions for PoolTransactions<B> {
    fn run<'a>(
        &'a self,
        job: &'a Job,
        ctx: Context,
        listener: &'a TxListener,
    ) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            let begun = Instant::now();
            let mut guard = match TxConn::<B>::begin(&self.pool).await {
                Ok(guard) => guard,
                Err(error) => return Verdict::Failed(ListenerError::from(error)),
            };
            let ran = match guard.conn() {
                Ok(conn) => {
                    let conn: &mut (dyn Any + Send) = conn;
                    run_listener(job.deadline, || (listener.call)(&job.payload, ctx, conn)).await
                }
                Err(error) => Ran::Failed(ListenerError::from(error)),
            };
            match ran {
                // Dropped in doubt: the connection closes and the database rolls back.
                Ran::TimedOut => Verdict::TimedOut(begun.elapsed()),
                Ran::Failed(error) => {
                    guard.rollback().await;
                    Verdict::Failed(error)
                }
                Ran::Panicked(message) => {
                    guard.rollback().await;
                    Verdict::Panicked(message)
                }
                Ran::Succeeded => complete::<B>(guard, job, self.retain).await,
            }
        })
    }
}

/// Completes the delivery in the listener's transaction, and commits.
async fn complete<B: Backend>(mut guard: TxConn<B>, job: &Job, retain: bool) -> Verdict {
    let key = job.key;
    let completed = match guard.conn() {
        Ok(conn) => B::complete_in_transaction(conn, key, retain)
            .await
            .map_err(crate::error::Error::from),
        Err(error) => Err(error),
    };
    match completed {
        Ok(true) => match guard.commit().await {
            Ok(()) => Verdict::Recorded,
            Err(error) => Verdict::Failed(ListenerError::from(error)),
        },
        Ok(false) => {
            guard.rollback().await;
            Verdict::LostLease
        }
        Err(error) => {
            guard.rollback().await;
            Verdict::Failed(ListenerError::from(error))
        }
    }
}
