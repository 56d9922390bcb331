//! An emit with several entity writes in one round trip: `BEGIN`, the writes, the event's insert
//! and `COMMIT` go out together, and their replies come back together. (An emit with one write is
//! a single statement instead; see `WithEvent` in the parent module.)
//!
//! Every statement goes through diesel-async's prepared-statement path. A statement that needs
//! no custom type looked up takes the connection's statement-cache lock at its first poll, and
//! sends its messages as soon as it holds the lock (preparing it first, under the lock, when the
//! connection has not prepared it yet). The lock is fair, so statements polled in order go on
//! the wire in order. Only the entity writes could need a type looked up; they are sent this way
//! only when [`Operation::sends_at_once`] says they do not, and otherwise the emit takes more
//! round trips (see `emit_with` in the parent module).
//!
//! Failures keep the transaction atomic:
//! - A write that fails in the server (a constraint, a missing table, even at its preparation)
//!   aborts the transaction; the statements behind it fail, and the `COMMIT` rolls back.
//! - A write that fails in the client fails at its first poll, before anything of it was sent;
//!   nothing behind it is polled, so the event and the `COMMIT` are never sent, and a `ROLLBACK`
//!   ends what was.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};

use diesel::QueryResult;
use diesel::connection::{TransactionDepthChange, TransactionManagerStatus};
use diesel_async::{AnsiTransactionManager, AsyncPgConnection, RunQueryDsl, TransactionManager};

use super::{insert_rows, inserted, query};
use crate::Operation;
use crate::store::{Inserted, NewEvent};

type Pending<'c, T> = Pin<Box<dyn Future<Output = QueryResult<T>> + Send + 'c>>;

/// A statement under way, then its result.
enum Step<'c, T> {
    Running(Pending<'c, T>),
    Done(QueryResult<T>),
}

impl<'c, T> Step<'c, T> {
    fn new(future: impl Future<Output = QueryResult<T>> + Send + 'c) -> Self {
        Self::Running(Box::pin(future))
    }

    /// Polls it while it runs; whether it is done.
    fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        if let Self::Running(future) = self {
            match future.as_mut().poll(cx) {
                Poll::Ready(result) => *self = Self::Done(result),
                Poll::Pending => return false,
            }
        }
        true
    }

    fn failed(&self) -> bool {
        matches!(self, Self::Done(Err(_)))
    }

    /// The result of a step that is done.
    fn result(self) -> QueryResult<T> {
        match self {
            Self::Done(result) => result,
            Self::Running(_) => Err(diesel::result::Error::QueryBuilderError(
                "a pipelined statement was read before it finished".into(),
            )),
        }
    }
}

/// Polls every step until all are done.
async fn finish<T>(steps: &mut [Step<'_, T>]) {
    poll_fn(|cx| {
        let mut done = true;
        for step in steps.iter_mut() {
            done &= step.poll(cx);
        }
        if done { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
}

/// Runs the emit in one round trip, or returns `None` when an operation cannot be sent so (its
/// entity has no pipelined write, or needs a type looked up); nothing was sent then.
pub(super) async fn emit(
    conn: &mut AsyncPgConnection,
    ops: &[Operation<'_, super::Postgres>],
    event: &NewEvent,
) -> Option<QueryResult<Inserted>> {
    if !ops.iter().all(Operation::sends_at_once) {
        return None;
    }
    let shared: &AsyncPgConnection = conn;
    let writes: Option<Vec<_>> = ops.iter().map(|op| op.pipelined(shared)).collect();
    let mut steps: Vec<Step<'_, ()>> = Vec::with_capacity(ops.len() + 1);
    steps.push(Step::new(async move {
        query("BEGIN").execute(&mut &*shared).await.map(drop)
    }));
    steps.extend(writes?.into_iter().map(Step::Running));

    // The first poll of each, in order, puts it on the wire (or in line for the statement cache
    // behind the one before). One that fails here failed in the client, before it was sent:
    // stop there, so that nothing behind it goes out.
    let failed_at = poll_fn(|cx| {
        for (i, step) in steps.iter_mut().enumerate() {
            step.poll(cx);
            if step.failed() {
                return Poll::Ready(Some(i));
            }
        }
        Poll::Ready(None)
    })
    .await;
    if let Some(i) = failed_at {
        let error = steps
            .drain(i..)
            .next()
            .and_then(|failed| failed.result().err());
        finish(&mut steps).await;
        let rolled_back = query("ROLLBACK").execute(&mut &*shared).await;
        drop(steps);
        if rolled_back.is_err() {
            // Leave the transaction to the caller's rollback, which closes the connection if
            // it fails too.
            if let TransactionManagerStatus::Valid(status) =
                AnsiTransactionManager::transaction_manager_status_mut(conn)
            {
                let _ = status.change_transaction_depth(TransactionDepthChange::IncreaseDepth);
            }
        }
        return Some(Err(
            error.unwrap_or(diesel::result::Error::RollbackTransaction)
        ));
    }

    let mut rows = Step::new(insert_rows(shared, event));
    let mut committed = Step::new(query("COMMIT").execute(&mut &*shared));
    poll_fn(|cx| {
        let mut done = true;
        for step in &mut steps {
            done &= step.poll(cx);
        }
        done &= rows.poll(cx);
        done &= committed.poll(cx);
        if done { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    // The first failure is the cause: the statements after it failed because the transaction
    // was aborted, and the COMMIT then rolled back.
    let result = steps
        .into_iter()
        .try_for_each(Step::result)
        .and_then(|()| rows.result())
        .and_then(|rows| committed.result().and_then(|_| inserted(rows)));
    Some(result)
}
