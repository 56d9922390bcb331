//! Receiving messages from outside exactly once: message ids and what a receipt returns.

use std::fmt;
use std::future::Future;
use std::time::Instant;

use tracing::Instrument;

use crate::bus::Written;
use crate::transaction::TxConn;
use crate::{Backend, Error, Event, EventBus, EventId, Transaction};

/// The longest source or key a message id may have, in bytes (it is part of a database key).
const MAX_PART: usize = 255;

/// The identity of a message received from outside: where it comes from, and its key there.
///
/// A message received twice with the same id within the dedup window is accepted once
/// ([`EventBus::receive`](crate::EventBus::receive)).
///
/// ```
/// use txbus::MessageId;
///
/// // A source with its own ids: a broker stream and its message id, a webhook and its delivery id.
/// let id = MessageId::new("stripe-webhooks", "evt_1NXj2dB4");
/// assert_eq!(id.to_string(), "stripe-webhooks/evt_1NXj2dB4");
///
/// // A source without ids: the content is the identity.
/// let a = MessageId::content_hash("csv-import", b"42,alice,100");
/// let b = MessageId::content_hash("csv-import", b"42,alice,100");
/// assert_eq!(a, b);
/// assert_ne!(a, MessageId::content_hash("csv-import", b"43,bob,7"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageId {
    source: String,
    key: String,
}

impl MessageId {
    /// The message `key` of `source`. Both must be non-empty and at most 255 bytes; a receive
    /// refuses the id otherwise.
    pub fn new(source: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            key: key.into(),
        }
    }

    /// An id for a source without message ids: the key is `sha256:` and the SHA-256 of
    /// `content` in hex. SHA-256 because it is stable across versions, platforms and processes
    /// (unlike `std`'s hashers) and collision-resistant: no crafted payload can pass for another
    /// one and have it dropped as a duplicate.
    pub fn content_hash(source: impl Into<String>, content: &[u8]) -> Self {
        Self {
            source: source.into(),
            key: format!("sha256:{}", crate::sha256::hex_digest(content)),
        }
    }

    /// Where the message comes from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The message's key in its source.
    pub fn key(&self) -> &str {
        &self.key
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        for (part, value) in [("source", &self.source), ("key", &self.key)] {
            if value.is_empty() {
                return Err(Error::Invalid(format!(
                    "message id {self:?} has an empty {part}"
                )));
            }
            if value.len() > MAX_PART {
                return Err(Error::Invalid(format!(
                    "the {part} of a message id is at most {MAX_PART} bytes, got {}",
                    value.len()
                )));
            }
        }
        Ok(())
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.source, self.key)
    }
}

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
        let span = tracing::info_span!("txbus.receive", event = E::NAME, message = %id,
            event_id = tracing::field::Empty, duplicate = tracing::field::Empty);
        async move {
            let shared = &*self.shared;
            shared.check_running()?;
            id.validate()?;
            let prepared = shared.prepare(&event)?;
            let mut guard = TxConn::<B>::begin(&shared.pool).await?;
            let window = shared.config.inbox_dedup_window;
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
            shared.dispatch(vec![Written {
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
        let prepared = id.validate().and_then(|()| self.shared.prepare(event));
        async move {
            let prepared = prepared?;
            let window = self.shared.config.inbox_dedup_window;
            if !B::reserve_message(self.conn, &id, window).await? {
                return Ok(Received::Duplicate);
            }
            let leased = Instant::now();
            let inserted = B::insert_event(self.conn, &prepared.new).await?;
            self.written.push(Written {
                prepared,
                inserted,
                leased,
            });
            Ok(Received::Accepted(inserted.id))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_long_parts_are_refused() {
        assert!(MessageId::new("s", "k").validate().is_ok());
        let empty = MessageId::new("", "k").validate().unwrap_err().to_string();
        assert!(empty.contains("empty source"), "{empty}");
        assert!(MessageId::new("s", "").validate().is_err());
        let long = MessageId::new("s", "k".repeat(256))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(long.contains("at most 255 bytes"), "{long}");
    }

    #[test]
    fn content_hash_keys_are_stable() {
        let id = MessageId::content_hash("import", b"abc");
        assert_eq!(
            id.key(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(id.source(), "import");
    }
}
