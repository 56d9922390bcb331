//! An emit with several entity writes in one round trip: `BEGIN`, the writes, the event's insert
//! and `COMMIT` go out together, and their replies come back together. (An emit with one write is
//! a single statement instead; see `WithEvent` in `outbox`.)
//!
//! Every statement goes through diesel-async's prepared-statement path. A statement that needs
//! no custom type looked up takes the connection's statement-cache lock at its first poll, and
//! sends its messages as soon as it holds the lock (preparing it first, under the lock, when the
//! connection has not prepared it yet). The lock is fair, so statements polled in order go on
//! the wire in order. Only the entity writes could need a type looked up; they are sent this way
//! only when [`sends_at_once`] says they do not, and otherwise the emit takes more round trips
//! (see `emit_with` in `outbox`).
//!
//! Failures keep the transaction atomic:
//! - A write that fails in the server (a constraint, a missing table, even at its preparation)
//!   aborts the transaction; the statements behind it fail, and the `COMMIT` rolls back.
//! - A write that fails in the client fails at its first poll, before anything of it was sent;
//!   nothing behind it is polled, so the event and the `COMMIT` are never sent, and a `ROLLBACK`
//!   ends what was.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;

use diesel::QueryResult;
use diesel::connection::TransactionDepthChange;
use diesel::pg::{Pg, PgMetadataLookup, PgQueryBuilder, PgTypeMetadata};
use diesel::query_builder::QueryFragment;
use diesel::query_builder::bind_collector::RawBytesBindCollector;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::future::{BoxFuture, MaybeDone, join_all, maybe_done};

use super::Postgres;
use super::insert::insert_rows;
use super::outbox::change_depth;
use crate::store::rows::inserted;
use crate::store::sql::sql;
use crate::store::{Inserted, NewEvent, Operation, Statement};

/// A statement under way, then its result.
type Step<'c> = MaybeDone<BoxFuture<'c, QueryResult<()>>>;

fn failed(step: &Step<'_>) -> bool {
    matches!(step, MaybeDone::Done(Err(_)))
}

/// The result of a step that is done (an error if it is not).
fn result(step: &mut Step<'_>) -> QueryResult<()> {
    Pin::new(step).take_output().unwrap_or_else(|| {
        Err(diesel::result::Error::QueryBuilderError(
            "a pipelined statement was read before it finished".into(),
        ))
    })
}

/// Runs the emit in one round trip, or returns `None` when an operation cannot be sent so (its
/// entity is not derived, or needs a type looked up); nothing was sent then.
pub(super) async fn emit(
    conn: &mut AsyncPgConnection,
    ops: &[Operation<'_, Postgres>],
    event: &NewEvent,
) -> Option<QueryResult<Inserted>> {
    let writes: Vec<Statement<'_, Pg>> = ops
        .iter()
        .map(Operation::statement)
        .collect::<Option<_>>()?;
    if !writes.iter().all(sends_at_once) {
        return None;
    }
    let shared: &AsyncPgConnection = conn;
    let mut steps: Vec<Step<'_>> = Vec::with_capacity(writes.len() + 1);
    steps.push(maybe_done(Box::pin(async move {
        sql::<Pg>("BEGIN").execute(&mut &*shared).await.map(drop)
    })));
    for write in writes {
        steps.push(maybe_done(Box::pin(async move {
            write.execute(&mut &*shared).await.map(drop)
        })));
    }

    // The first poll of each, in order, puts it on the wire (or in line for the statement cache
    // behind the one before). One that fails here failed in the client, before it was sent:
    // stop there, so that nothing behind it goes out.
    let failed_at = poll_fn(|cx| {
        for (i, step) in steps.iter_mut().enumerate() {
            let _ = Pin::new(&mut *step).poll(cx);
            if failed(step) {
                return Poll::Ready(Some(i));
            }
        }
        Poll::Ready(None)
    })
    .await;
    if let Some(i) = failed_at {
        let error = result(&mut steps[i]).err();
        join_all(steps[..i].iter_mut()).await;
        let rolled_back = sql::<Pg>("ROLLBACK").execute(&mut &*shared).await;
        drop(steps);
        if rolled_back.is_err() {
            // Leave the transaction to the caller's rollback, which closes the connection if
            // it fails too.
            let _ = change_depth(conn, TransactionDepthChange::IncreaseDepth);
        }
        return Some(Err(
            error.unwrap_or(diesel::result::Error::RollbackTransaction)
        ));
    }

    // In order: the first poll of each puts it on the wire behind the ones before.
    let (_, rows, committed) = tokio::join!(
        biased;
        join_all(steps.iter_mut()),
        insert_rows(shared, event),
        sql::<Pg>("COMMIT").execute(&mut &*shared),
    );
    // The first failure is the cause: the statements after it failed because the transaction
    // was aborted, and the COMMIT then rolled back.
    let result = steps
        .iter_mut()
        .try_for_each(result)
        .and(rows)
        .and_then(|rows| committed.and_then(|_| inserted(rows)));
    Some(result)
}

/// Whether diesel-async sends `statement` at the first poll of its execution on a connection
/// whose statement cache is free: its SQL builds, its values serialize, and no value has a
/// custom SQL type (an enum, an extension's type), which diesel-async would look up with a query
/// of its own first, once per connection, while statements polled after it went ahead.
fn sends_at_once(statement: &Statement<'_, Pg>) -> bool {
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
    statement
        .collect_binds(&mut binds, &mut lookups, &Pg)
        .is_ok()
        && !lookups.0
        && statement.to_sql(&mut sql, &Pg).is_ok()
        && statement.is_safe_to_cache_prepared(&Pg).is_ok()
}

#[cfg(test)]
mod tests {
    use diesel::prelude::*;
    use diesel::serialize::{IsNull, Output, ToSql};

    use super::*;

    /// An enum of the database: a custom SQL type, looked up by name before its first use.
    #[derive(diesel::sql_types::SqlType, diesel::query_builder::QueryId)]
    #[diesel(postgres_type(name = "mood"))]
    #[allow(unreachable_pub)]
    pub struct MoodType;

    #[derive(Debug, diesel::expression::AsExpression)]
    #[diesel(sql_type = MoodType)]
    struct Mood;

    impl ToSql<MoodType, Pg> for Mood {
        fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> diesel::serialize::Result {
            std::io::Write::write_all(out, b"calm")?;
            Ok(IsNull::No)
        }
    }

    diesel::table! {
        use diesel::sql_types::{BigInt, Text};
        use super::MoodType;

        people (id) {
            id -> BigInt,
            name -> Text,
            mood -> MoodType,
        }
    }

    #[test]
    fn only_statements_without_a_type_lookup_are_sent_at_once() {
        let plain = diesel::insert_into(people::table)
            .values((people::id.eq(1_i64), people::name.eq("ada")));
        assert!(sends_at_once(&Statement::new(plain)));
        let delete = diesel::delete(people::table.filter(people::id.eq(1_i64)));
        assert!(sends_at_once(&Statement::new(delete)));
        let custom = diesel::insert_into(people::table)
            .values((people::id.eq(1_i64), people::mood.eq(Mood)));
        assert!(
            !sends_at_once(&Statement::new(custom)),
            "an enum needs a type lookup"
        );
    }
}
