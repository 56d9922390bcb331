//! Receiving messages from outside exactly once: `receive`, on the bus and in a transaction.

use std::future::Future;
#[cfg(feature = "nats")]
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use crate::bus::EventBus;
use crate::engine::{Prepared, Written};
use crate::error::Error;
use crate::event::{Event, EventId};
use crate::message::MessageId;
use crate::store::{Backend, TxConn};
use crate::transaction::Transaction;

/// What [`EventBus::receive`](crate::EventBus::receive) did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Received {
    /// First receipt: the message became this event, dispatched to its listeners.
    Accepted(EventId),
    /// Already received within the dedup window: nothing was written or dispatched.
    Duplicate,
}

impl Received {
    /// Whether the message had been received before.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Self::Duplicate)
    }

    /// The event the message became, on its first receipt.
    pub fn event_id(&self) -> Option<EventId> {
        match self {
            Self::Accepted(id) => Some(*id),
            Self::Duplicate => None,
        }
    }
}

impl<B: Backend> EventBus<B> {
    /// Receives a message from outside: the first time its id is seen (within the dedup
    /// window, [`EventBusBuilder::inbox_dedup_window`](crate::EventBusBuilder::inbox_dedup_window)),
    /// the record of the id and `event` are written in one transaction and the event is
    /// dispatched like an emitted one; a duplicate changes nothing and dispatches nothing.
    ///
    /// Receipts of one id from many tasks or processes at once accept it once: the record is an
    /// insert on a unique key, never a check followed by an insert. Acknowledge the message to
    /// its source after this returns, duplicates included.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
    /// # struct PaymentSucceeded { amount: i64 }
    /// # let dir = std::env::temp_dir().join(format!("txbus-doc-receive-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// # let pool = txbus::Pool::<txbus::Sqlite>::connect(dir.join("app.db").to_str().unwrap()).await?;
    /// # let bus = txbus::EventBus::builder(pool).build().await?;
    /// use txbus::{MessageId, Received};
    ///
    /// let id = MessageId::new("payments", "evt_42");
    /// let first = bus.receive(id.clone(), PaymentSucceeded { amount: 100 }).await?;
    /// assert!(matches!(first, Received::Accepted(_)));
    /// let again = bus.receive(id, PaymentSucceeded { amount: 100 }).await?;
    /// assert_eq!(again, Received::Duplicate);
    /// # bus.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn receive<'a, E: Event>(
        &'a self,
        id: MessageId,
        event: E,
    ) -> impl Future<Output = Result<Received, Error>> + Send + 'a {
        let prepared = self.engine.prepare(&event);
        self.receive_prepared(E::NAME, id, prepared)
    }

    /// [`receive`](Self::receive) of a message that carries the trace context of its sender
    /// (stored in place of the current span's).
    #[cfg(feature = "nats")]
    pub(crate) fn receive_traced<E: Event>(
        &self,
        id: MessageId,
        event: E,
        trace: Option<Arc<str>>,
    ) -> impl Future<Output = Result<Received, Error>> + Send + '_ {
        let prepared = self.engine.prepare(&event).map(|p| p.traced(trace));
        self.receive_prepared(E::NAME, id, prepared)
    }

    /// Receives an event of type `E` whose payload its `version` wrote elsewhere: stored as
    /// it is, upcast when it runs, or left to an instance that knows a newer version.
    #[cfg(feature = "nats")]
    pub(crate) fn receive_stored<E: Event>(
        &self,
        id: MessageId,
        payload: String,
        version: u32,
        trace: Option<Arc<str>>,
    ) -> impl Future<Output = Result<Received, Error>> + Send + '_ {
        let key = stored_ordering_key::<E>(&payload, version);
        let prepared = self
            .engine
            .prepare_stored::<E>(payload, version, key)
            .map(|p| p.traced(trace));
        self.receive_prepared(E::NAME, id, prepared)
    }

    fn receive_prepared(
        &self,
        name: &'static str,
        id: MessageId,
        prepared: Result<Prepared, Error>,
    ) -> impl Future<Output = Result<Received, Error>> + Send + '_ {
        let span = tracing::info_span!("txbus.receive", event = name, message = %id,
            event_id = tracing::field::Empty, duplicate = tracing::field::Empty);
        async move {
            let engine = &*self.engine;
            engine.check_running()?;
            id.validate()?;
            let prepared = prepared?;
            let mut guard = TxConn::<B>::begin(&engine.pool).await?;
            let window = engine.config.inbox_dedup_window;
            let first = match B::reserve_message(guard.conn()?, &id, window).await {
                Ok(first) => first,
                Err(error) => {
                    guard.rollback_if_open().await;
                    return Err(error.into());
                }
            };
            if !first {
                guard.rollback().await;
                tracing::Span::current().record("duplicate", true);
                return Ok(Received::Duplicate);
            }
            let leased = Instant::now();
            let written = B::commit_with_event(guard.conn()?, &prepared.new).await;
            guard.settle();
            let inserted = written?;
            drop(guard);
            let span = tracing::Span::current();
            span.record("event_id", inserted.id.get());
            span.record("duplicate", false);
            engine.dispatch(vec![Written {
                prepared,
                inserted,
                leased,
            }]);
            Ok(Received::Accepted(inserted.id))
        }
        .instrument(span)
    }
}

impl<'c, B: Backend> Transaction<'c, B> {
    /// Receives a message in this transaction, like [`EventBus::receive`]: on its first receipt
    /// the record of its id and `event` commit with the rest of the transaction (and are rolled
    /// back with it); a duplicate writes nothing.
    pub fn receive<E: Event>(
        &mut self,
        id: MessageId,
        event: &E,
    ) -> impl Future<Output = Result<Received, Error>> + Send + use<'_, 'c, B, E> {
        let prepared = self.engine.prepare(event);
        self.receive_prepared(id, prepared)
    }

    /// [`Transaction::receive`] of a message that carries the trace context of its sender.
    #[cfg(feature = "nats")]
    pub(crate) fn receive_traced<E: Event>(
        &mut self,
        id: MessageId,
        event: &E,
        trace: Option<Arc<str>>,
    ) -> impl Future<Output = Result<Received, Error>> + Send + use<'_, 'c, B, E> {
        let prepared = self.engine.prepare(event).map(|p| p.traced(trace));
        self.receive_prepared(id, prepared)
    }

    /// [`Transaction::receive`] of a payload its `version` wrote elsewhere (see
    /// [`EventBus::receive_stored`]).
    #[cfg(feature = "nats")]
    pub(crate) fn receive_stored<E: Event>(
        &mut self,
        id: MessageId,
        payload: String,
        version: u32,
        trace: Option<Arc<str>>,
    ) -> impl Future<Output = Result<Received, Error>> + Send + use<'_, 'c, B, E> {
        let key = stored_ordering_key::<E>(&payload, version);
        let prepared = self
            .engine
            .prepare_stored::<E>(payload, version, key)
            .map(|p| p.traced(trace));
        self.receive_prepared(id, prepared)
    }

    fn receive_prepared(
        &mut self,
        id: MessageId,
        prepared: Result<Prepared, Error>,
    ) -> impl Future<Output = Result<Received, Error>> + Send + use<'_, 'c, B> {
        let prepared = id.validate().and(prepared);
        async move {
            let prepared = prepared?;
            let window = self.engine.config.inbox_dedup_window;
            if !B::reserve_message(self.conn, &id, window).await? {
                return Ok(Received::Duplicate);
            }
            Ok(Received::Accepted(self.add(prepared).await?))
        }
    }
}

/// The ordering key of a payload written by `version` of `E` elsewhere: read from the payload
/// when it is of this process's version (another version's payload runs where it is read, in
/// no particular order).
#[cfg(feature = "nats")]
fn stored_ordering_key<E: Event>(payload: &str, version: u32) -> Option<String> {
    if version != E::VERSION {
        return None;
    }
    serde_json::from_str::<E>(payload)
        .ok()
        .and_then(|event| event.ordering_key())
}
