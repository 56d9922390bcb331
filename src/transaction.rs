//! `EventBus::transaction`: events emitted inside the caller's own transaction.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Instant;

use tracing::Instrument;

use crate::bus::EventBus;
use crate::engine::{Engine, Prepared, Written};
use crate::error::Error;
use crate::event::{Event, EventId};
use crate::store::{Backend, Inserted, TxConn};

/// A transaction opened by [`EventBus::transaction`]: run your queries on
/// [`conn`](Self::conn) and emit events with [`emit`](Self::emit); all of it commits together,
/// and the events' listeners run only after that commit.
pub struct Transaction<'c, B: Backend> {
    pub(crate) conn: &'c mut B::Connection,
    pub(crate) engine: &'c Engine<B>,
    /// Events emitted so far, with their ids; their deliveries are written at the commit.
    pub(crate) written: Vec<Written>,
    ids: Ids,
}

/// Event ids taken ahead for the transaction's emits, in blocks: the backend's
/// [`FIRST_ID_BLOCK`](crate::store::Outbox::FIRST_ID_BLOCK), then twice as many each time, up to
/// its [`ID_BLOCK`](crate::store::Outbox::ID_BLOCK).
struct Ids {
    taken: VecDeque<Inserted>,
    /// When the last block was taken: the leases of its events started no earlier.
    leased: Instant,
    next_block: usize,
}

impl<'c, B: Backend> Transaction<'c, B> {
    /// The transaction's connection, for your own diesel-async queries.
    pub fn conn(&mut self) -> &mut B::Connection {
        self.conn
    }

    /// Writes `event` and its deliveries in this transaction and returns its id. Its listeners
    /// run after the commit, and never if the transaction rolls back.
    ///
    /// The deliveries of all the transaction's events are written together, with the commit:
    /// a transaction that emits a hundred events sends one statement for them, not a hundred.
    /// Their ids are taken ahead, in blocks (one at a time on MySQL, which has no `RETURNING`): the ids of one
    /// transaction's events increase in the order of its `emit`s, and ids are never reused, but
    /// they may leave gaps, and a transaction that commits later may hold smaller ids than one
    /// that committed before it. An event with an [ordering key](crate::Event::ordering_key)
    /// takes its key's lock and then a fresh id, here: the ids of one key follow the order of
    /// the commits (emit it after the writes it goes with, so that every transaction takes
    /// their row locks before the key's). Each event's emit time, and the lease and expiry that count
    /// from it, is the database's clock when its id was taken. A write the database refuses
    /// (a payload PostgreSQL's `jsonb` does not take, say) fails the commit, and the
    /// transaction rolls back.
    pub fn emit<E: Event>(
        &mut self,
        event: &E,
    ) -> impl Future<Output = Result<EventId, Error>> + Send + use<'_, 'c, B, E> {
        let prepared = self.engine.prepare(event);
        async move { self.add(prepared?).await }
    }

    /// Gives `prepared` an id and keeps it for the commit, which writes its deliveries.
    pub(crate) async fn add(&mut self, prepared: Prepared) -> Result<EventId, Error> {
        let inserted = match (&prepared.new.ordering_key, self.ids.taken.pop_front()) {
            // A keyed event takes its key's lock, then a fresh id (see `Outbox::LOCK_KEY`); the
            // ids taken ahead are dropped, so that the transaction's ids keep increasing.
            (Some(key), _) if !prepared.listeners.is_empty() => {
                self.ids.taken.clear();
                self.ids.leased = Instant::now();
                B::reserve_keyed_id(self.conn, key).await?
            }
            (_, Some(inserted)) => inserted,
            (_, None) => self.take_ids().await?,
        };
        self.written.push(Written {
            prepared,
            inserted,
            leased: self.ids.leased,
        });
        Ok(inserted.id)
    }

    /// Takes the next block of ids and returns the first.
    async fn take_ids(&mut self) -> Result<Inserted, Error> {
        let block = self.ids.next_block.clamp(1, B::ID_BLOCK.max(1));
        self.ids.leased = Instant::now();
        self.ids.taken = B::reserve_ids(self.conn, block).await?.into();
        self.ids.next_block = block.saturating_mul(2);
        self.ids.taken.pop_front().ok_or_else(|| {
            Error::Database(diesel::result::Error::QueryBuilderError(
                "the database returned no event id".into(),
            ))
        })
    }
}

/// The bound [`EventBus::transaction`] puts on its closure: an async closure whose future is
/// `Send`. Implemented for every such closure; there is nothing to implement by hand.
pub trait TransactionFn<A, O>:
    AsyncFnOnce(A) -> O + FnOnce(A) -> <Self as TransactionFn<A, O>>::Fut
{
    /// The closure's future.
    type Fut: Future<Output = O>;
}

impl<A, O, F, Fut> TransactionFn<A, O> for F
where
    F: AsyncFnOnce(A) -> O + FnOnce(A) -> Fut,
    Fut: Future<Output = O>,
{
    type Fut = Fut;
}

impl<B: Backend> EventBus<B> {
    /// Runs `f` in a database transaction: it commits when `f` returns `Ok` and rolls back when
    /// it returns `Err`. Events emitted with [`Transaction::emit`] are dispatched after the
    /// commit, and never when the transaction rolls back.
    ///
    /// ```no_run
    /// # use diesel::prelude::*;
    /// # use diesel_async::RunQueryDsl;
    /// # diesel::table! { users (id) { id -> BigInt, email -> Text, } }
    /// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
    /// # struct UserCreated { user_id: i64, email: String }
    /// # async fn run(bus: txbus::EventBus<txbus::Sqlite>) -> Result<(), txbus::Error> {
    /// let email = "ada@example.com".to_owned();
    /// let user_id = bus
    ///     .transaction(async |tx| {
    ///         let id: i64 = diesel::insert_into(users::table)
    ///             .values(users::email.eq(&email))
    ///             .returning(users::id)
    ///             .get_result(tx.conn())
    ///             .await?;
    ///         tx.emit(&UserCreated { user_id: id, email: email.clone() }).await?;
    ///         Ok::<_, txbus::Error>(id)
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// On SQLite the transaction takes the database's write lock when it begins (`BEGIN
    /// IMMEDIATE`), so that it never fails halfway for another writer.
    pub fn transaction<'s, R, E, F>(
        &'s self,
        f: F,
    ) -> impl Future<Output = Result<R, E>> + Send + 's
    where
        for<'t, 'c> F: AsyncFnOnce(&'t mut Transaction<'c, B>) -> Result<R, E>
            + TransactionFn<&'t mut Transaction<'c, B>, Result<R, E>, Fut: Send>
            + Send
            + 's,
        E: From<Error> + From<diesel::result::Error> + Send,
        R: Send,
    {
        let span = tracing::info_span!("txbus.transaction", events = tracing::field::Empty);
        async move {
            let engine = &*self.engine;
            engine.check_running()?;
            let mut guard = TxConn::<B>::begin(&engine.pool).await?;
            let mut tx = Transaction {
                conn: guard.conn()?,
                engine,
                written: Vec::new(),
                ids: Ids {
                    taken: VecDeque::new(),
                    leased: Instant::now(),
                    next_block: B::FIRST_ID_BLOCK,
                },
            };
            let result = f(&mut tx).await;
            let written = tx.written;
            match result {
                Ok(value) => {
                    let events: Vec<_> = written
                        .iter()
                        .map(|w| (w.inserted, &w.prepared.new))
                        .collect();
                    guard.commit_with_events(&events).await?;
                    drop(events);
                    drop(guard);
                    tracing::Span::current().record("events", written.len());
                    engine.dispatch(written);
                    Ok(value)
                }
                Err(error) => {
                    guard.rollback().await;
                    Err(error)
                }
            }
        }
        .instrument(span)
    }
}
