//! The `InboxStore`: a durable queue of received messages for pull-style consumers.

use std::future::Future;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::message::MessageId;
use crate::store::{Backend, Pool, StoredMessage, attempt_u32, system_time_from_micros};

/// A message kept by an [`InboxStore`]: its id, its JSON payload, and once read back, when it
/// arrived and how many times it has been handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    id: MessageId,
    payload: String,
    received_at: Option<SystemTime>,
    deliveries: u32,
}

impl InboxMessage {
    /// A message with `payload` serialized to JSON.
    pub fn new(id: MessageId, payload: &impl Serialize) -> Result<Self, Error> {
        let payload = serde_json::to_string(payload).map_err(|source| Error::Serialize {
            event: "inbox message",
            source,
        })?;
        Ok(Self {
            id,
            payload,
            received_at: None,
            deliveries: 0,
        })
    }

    /// The message's id.
    pub fn id(&self) -> &MessageId {
        &self.id
    }

    /// The payload, as JSON text.
    pub fn payload(&self) -> &str {
        &self.payload
    }

    /// The payload, deserialized.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.payload)
    }

    /// When the store received it (by the database's clock); `None` before it was stored.
    pub fn received_at(&self) -> Option<SystemTime> {
        self.received_at
    }

    /// How many times it was handed out by [`InboxStore::next_message`], this time included.
    pub fn deliveries(&self) -> u32 {
        self.deliveries
    }

    fn from_stored(row: StoredMessage) -> Self {
        Self {
            id: MessageId::new(row.source, row.key),
            payload: row.payload,
            received_at: Some(system_time_from_micros(row.received_at_us)),
            deliveries: attempt_u32(row.deliveries),
        }
    }
}

/// A durable store of received messages for consumers that pull them one at a time, instead
/// of having listeners called: a worker loop that calls a slow partner at its own pace, a batch
/// job, a consumer in another language reading the same table.
///
/// Prefer [`EventBus::receive`](crate::EventBus::receive) with listeners when messages should
/// be processed as they come: it deduplicates the same way and adds retries, backoff, expiry
/// and dead letters. The store leaves those to its consumer: a message that is not deleted
/// comes back once its lease passes, as often as it takes.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("txbus-doc-store-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let pool = txbus::Pool::<txbus::Sqlite>::connect(dir.join("app.db").to_str().unwrap()).await?;
/// # txbus::migrate(&pool).await?;
/// use txbus::{InboxMessage, InboxStore, MessageId};
///
/// let store = InboxStore::new(pool);
/// let message = InboxMessage::new(MessageId::new("partner", "order-7"), &serde_json::json!({"qty": 3}))?;
/// assert!(store.store_message(&message).await?);
/// assert!(!store.store_message(&message).await?); // idempotent by id
///
/// if let Some(next) = store.next_message().await? {
///     // ... process it, then:
///     store.delete_message(&next).await?;
/// }
/// assert_eq!(store.message_count().await?, 0);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct InboxStore<B: Backend> {
    pool: Pool<B>,
    lease: Duration,
}

// Not derived: that would require `B: Clone`.
impl<B: Backend> Clone for InboxStore<B> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            lease: self.lease,
        }
    }
}

impl<B: Backend> InboxStore<B> {
    /// A store in the pool's database (its table comes with txbus's migrations).
    pub fn new(pool: Pool<B>) -> Self {
        Self {
            pool,
            lease: Duration::from_secs(30),
        }
    }

    /// How long a message handed out by [`next_message`](Self::next_message) stays invisible
    /// to other consumers. Default: 30 seconds.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Stores `message`, unless a message with its id is stored already: returns whether it
    /// was stored.
    pub fn store_message<'a>(
        &'a self,
        message: &'a InboxMessage,
    ) -> impl Future<Output = Result<bool, Error>> + Send + 'a {
        async move {
            message.id.validate()?;
            let (_turn, mut conn) = self.pool.get_for_write().await?;
            Ok(B::store_message(&mut conn, &message.id, &message.payload).await?)
        }
    }

    /// Hands out the oldest message no other consumer holds, and holds it for the lease: until
    /// it is deleted or the lease passes, no other call returns it.
    pub fn next_message(
        &self,
    ) -> impl Future<Output = Result<Option<InboxMessage>, Error>> + Send + '_ {
        async move {
            if self.lease.is_zero() {
                return Err(Error::Config(
                    "an InboxStore lease must be longer than zero".to_owned(),
                ));
            }
            let (_turn, mut conn) = self.pool.get_for_write().await?;
            let row = B::next_message(&mut conn, self.lease).await?;
            Ok(row.map(InboxMessage::from_stored))
        }
    }

    /// Deletes a message handed out by [`next_message`](Self::next_message), once processed.
    /// Returns `false` when it was not deleted: its lease had passed and it was handed out
    /// again, or it was deleted already.
    pub fn delete_message<'a>(
        &'a self,
        message: &'a InboxMessage,
    ) -> impl Future<Output = Result<bool, Error>> + Send + 'a {
        async move {
            let deliveries = i32::try_from(message.deliveries).unwrap_or(i32::MAX);
            let (_turn, mut conn) = self.pool.get_for_write().await?;
            Ok(B::delete_message(&mut conn, &message.id, deliveries).await?)
        }
    }

    /// How many messages are stored, held or not.
    pub fn message_count(&self) -> impl Future<Output = Result<u64, Error>> + Send + '_ {
        async move {
            let mut conn = self.pool.get().await?;
            let count = B::message_count(&mut conn).await?;
            Ok(u64::try_from(count).unwrap_or(0))
        }
    }
}
