//! Receiving JetStream messages into the bus's inbox.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::{EVENT_HEADER, EVENT_VERSION_HEADER, decode};
use futures_util::future::BoxFuture;

use crate::bus::EventBus;
use crate::error::{Chain, Error};
use crate::event::Event;
use crate::message::MessageId;
use crate::receive::Received;
use crate::store::Backend;
use crate::transaction::Transaction;

/// How long JetStream waits before it redelivers a message whose receipt failed (the database
/// was unreachable, the bus was shutting down).
const RETRY_DELAY: Duration = Duration::from_secs(2);

/// How long the consumer waits after its message stream failed before it asks again.
const STREAM_PAUSE: Duration = Duration::from_millis(500);

/// Decodes a message's payload, written by the version of its header, as one event type and
/// receives it.
type Receive<B> = for<'a> fn(
    &'a EventBus<B>,
    MessageId,
    &'a [u8],
    Option<u32>,
    Option<Arc<str>>,
) -> Result<BoxFuture<'a, Result<Received, Error>>, serde_json::Error>;

/// The same inside a transaction of several receipts; a payload that does not decode fails it.
type ReceiveIn<B> = for<'t, 'c> fn(
    &'t mut Transaction<'c, B>,
    MessageId,
    &'t [u8],
    Option<u32>,
    Option<Arc<str>>,
) -> BoxFuture<'t, Result<Received, Error>>;

/// How an inbox receives one event type: a message alone, or among others.
struct Accept<B: Backend> {
    alone: Receive<B>,
    among: ReceiveIn<B>,
}

impl<B: Backend> Clone for Accept<B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Accept<B> {}

/// Receives the messages of a durable JetStream pull consumer into a bus's inbox.
///
/// For each message it calls [`EventBus::receive`] with the message id
/// `MessageId::new(<stream name>, <Nats-Msg-Id, or the stream sequence without one>)`, and
/// acknowledges the message only once that receipt has committed (and waits for JetStream to
/// confirm the acknowledgement). Messages that arrive together are received in one
/// transaction ([`Transaction::receive`] each, every one still deduplicated by its id) and
/// acknowledged after its commit; if that transaction fails, each message is received alone,
/// so that one message cannot hold back the others. A message delivered again, or published twice with the same
/// `Nats-Msg-Id`, is a duplicate: acknowledged, not received again. The receipt runs the bus's
/// listeners of the event like an emit; use a
/// [`transactional`](macro@crate::listener) listener for effects that must happen once.
///
/// The event type comes from the `Txbus-Event` header that [`JetStreamRelay`](super::JetStreamRelay)
/// sets; a message without it is read as the inbox's only event type when it accepts just one.
/// Its `Txbus-Event-Version` header says which version of the event's type wrote the payload:
/// a version other than the accepted type's is stored as it is, at that version, for the
/// listeners to upcast, or to leave to an instance that knows it (see
/// [`Event::VERSION`](crate::Event::VERSION)); only JSON is checked then.
/// A message that names no event this inbox [accepts](Self::event), or whose payload does not
/// deserialize, is terminated (`AckKind::Term`, never redelivered) with a `warn` log that says
/// why. A receipt that fails (the database is unreachable) is negatively acknowledged, so
/// JetStream redelivers the message a little later.
///
/// ```no_run
/// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
/// # #[event(name = "order.placed")]
/// # struct OrderPlaced { id: i64 }
/// # async fn run(bus: txbus::EventBus<txbus::Sqlite>) -> Result<(), Box<dyn std::error::Error>> {
/// use async_nats::jetstream::consumer::{AckPolicy, pull};
/// use txbus::nats::JetStreamInbox;
///
/// let jetstream = async_nats::jetstream::new(async_nats::connect("127.0.0.1:4222").await?);
/// let stream = jetstream.get_stream("ORDERS").await?;
/// let consumer = stream
///     .get_or_create_consumer("billing", pull::Config {
///         durable_name: Some("billing".into()),
///         ack_policy: AckPolicy::Explicit,
///         ..Default::default()
///     })
///     .await?;
/// JetStreamInbox::new(bus, consumer)
///     .event::<OrderPlaced>()
///     .run_until(async {
///         let _ = tokio::signal::ctrl_c().await;
///     })
///     .await?;
/// # Ok(())
/// # }
/// ```
pub struct JetStreamInbox<B: Backend> {
    bus: EventBus<B>,
    consumer: PullConsumer,
    events: HashMap<String, Accept<B>>,
    max_in_flight: usize,
}

impl<B: Backend> fmt::Debug for JetStreamInbox<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut events: Vec<_> = self.events.keys().collect();
        events.sort();
        f.debug_struct("JetStreamInbox")
            .field("events", &events)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> JetStreamInbox<B> {
    /// An inbox that reads `consumer` (a durable pull consumer with explicit acknowledgements)
    /// into `bus`.
    pub fn new(bus: EventBus<B>, consumer: PullConsumer) -> Self {
        Self {
            bus,
            consumer,
            events: HashMap::new(),
            max_in_flight: 64,
        }
    }

    /// Accepts messages of event type `E`: those whose `Txbus-Event` header is `E::NAME`.
    pub fn event<E: Event>(self) -> Self {
        self.event_as::<E>(E::NAME)
    }

    /// Accepts messages whose `Txbus-Event` header is `name` as events of type `E`, a type of
    /// this service with the same JSON shape and a name of its own (so that the publisher's
    /// listeners and this service's never share an event name).
    pub fn event_as<E: Event>(mut self, name: impl Into<String>) -> Self {
        self.events.insert(
            name.into(),
            Accept {
                alone: decode::receive::<B, E>,
                among: decode::receive_among::<B, E>,
            },
        );
        self
    }

    /// How many messages are received at once, at most, and so the most one transaction
    /// receives. Default: 64. The consumer's `max_ack_pending` caps the messages the server
    /// hands out unacknowledged, across all consumers of it.
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = max.max(1);
        self
    }

    /// Receives messages until `shutdown` resolves, then stops taking new ones, waits for the
    /// receipts under way to finish and acknowledges them, and returns.
    ///
    /// Fails at once when no event type was accepted or the consumer's messages cannot be
    /// requested (the stream or consumer was deleted, the server is unreachable for longer
    /// than the client's request timeout), and after the receipts under way when the consumer
    /// is deleted or its message stream ends by itself. Other read errors (missed heartbeats,
    /// a reconnect) are logged and the reading goes on.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        if self.events.is_empty() {
            return Err(Error::Config(
                "the JetStream inbox accepts no event type: call .event::<E>() for each".into(),
            ));
        }
        let mut messages = self
            .consumer
            .stream()
            .max_messages_per_batch(self.max_in_flight)
            .messages()
            .await
            .map_err(|error| nats_error("requesting the consumer's messages", error))?;
        let inbox = Arc::new(Shared {
            bus: self.bus,
            events: self.events,
        });
        let permits = Arc::new(Semaphore::new(self.max_in_flight));
        let mut running = JoinSet::new();
        let (mut ended, mut failed) = (false, None);
        // What the stream yielded while a batch was gathered, for the next turn.
        let mut pending = None;
        tokio::pin!(shutdown);
        loop {
            while running.try_join_next().is_some() {}
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break, // never closed
                },
            };
            let next = match pending.take() {
                Some(next) => next,
                None => tokio::select! {
                    _ = &mut shutdown => break,
                    next = messages.next() => next,
                },
            };
            match next {
                Some(Ok(message)) => {
                    // Take along what has arrived already, while permits last.
                    let mut batch = vec![(message, permit)];
                    while batch.len() < self.max_in_flight {
                        let Ok(permit) = permits.clone().try_acquire_owned() else {
                            break;
                        };
                        match messages.next().now_or_never() {
                            Some(Some(Ok(message))) => batch.push((message, permit)),
                            Some(other) => {
                                pending = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    let inbox = inbox.clone();
                    running.spawn(async move { inbox.handle_batch(batch).await });
                }
                Some(Err(error)) if lasting(&error) => {
                    failed = Some(error);
                    break;
                }
                Some(Err(error)) => {
                    // Missed heartbeats, a server restart: the stream asks again by itself.
                    tracing::warn!(error = %Chain(&error), "reading the JetStream consumer failed; retrying");
                    tokio::time::sleep(STREAM_PAUSE).await;
                }
                None => {
                    ended = true;
                    break;
                }
            }
        }
        while running.join_next().await.is_some() {}
        if let Some(error) = failed {
            return Err(nats_error("reading the consumer's messages", error));
        }
        if ended {
            return Err(Error::Connection {
                context: "NATS JetStream: the consumer's message stream ended".into(),
                source: "was the consumer or its stream deleted?".into(),
            });
        }
        Ok(())
    }
}

struct Shared<B: Backend> {
    bus: EventBus<B>,
    events: HashMap<String, Accept<B>>,
}

/// A message read, and how to receive it (or why it cannot be).
struct Item<B: Backend> {
    message: Message,
    stream: String,
    sequence: u64,
    id: MessageId,
    /// The version of the event's type that wrote the payload, from its header.
    version: Option<u32>,
    /// The trace context of the publish, from its `traceparent` and `tracestate` headers.
    trace: Option<Arc<str>>,
    accept: Result<Accept<B>, String>,
}

impl<B: Backend> Shared<B> {
    /// Reads what a message is; `None` for one that is not from JetStream (logged).
    fn read(&self, message: Message) -> Option<Item<B>> {
        let (stream, sequence) = match message.info() {
            Ok(info) => (info.stream.to_owned(), info.stream_sequence),
            Err(error) => {
                tracing::warn!(error = %error, subject = %message.subject,
                    "not a JetStream message; ignored");
                return None;
            }
        };
        let headers = message.headers.as_ref();
        let header = |name: &str| {
            headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let key = header(async_nats::header::NATS_MESSAGE_ID.as_ref())
            .unwrap_or_else(|| sequence.to_string());
        let accept = match header(EVENT_HEADER) {
            Some(name) => self.events.get(name.as_str()).copied().ok_or_else(|| {
                format!("it names the event `{name}`, which this inbox does not accept")
            }),
            None => match self.events.values().next() {
                Some(accept) if self.events.len() == 1 => Ok(*accept),
                _ => Err(format!(
                    "it has no {EVENT_HEADER} header, and this inbox accepts several event types"
                )),
            },
        };
        let id = MessageId::new(stream.clone(), key);
        let version = header(EVENT_VERSION_HEADER).and_then(|v| v.parse().ok());
        #[cfg(feature = "opentelemetry")]
        let trace = header(super::TRACEPARENT_HEADER).and_then(|parent| {
            crate::trace::from_headers(&parent, header(super::TRACESTATE_HEADER).as_deref())
        });
        #[cfg(not(feature = "opentelemetry"))]
        let trace = None;
        Some(Item {
            message,
            stream,
            sequence,
            id,
            version,
            trace,
            accept,
        })
    }

    /// Receives the messages that arrived together in one transaction, and acknowledges each
    /// after its commit; when that fails, receives each alone.
    async fn handle_batch(&self, batch: Vec<(Message, OwnedSemaphorePermit)>) {
        let (messages, _permits): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let (items, refused): (Vec<_>, Vec<_>) = messages
            .into_iter()
            .filter_map(|message| self.read(message))
            .partition(|item| item.accept.is_ok());
        for item in refused {
            self.handle(item).await;
        }
        if items.len() < 2 {
            for item in items {
                self.handle(item).await;
            }
            return;
        }
        let received = self
            .bus
            .transaction(async |tx| {
                let mut received = Vec::with_capacity(items.len());
                for item in &items {
                    if let Ok(accept) = &item.accept {
                        received.push(
                            (accept.among)(
                                tx,
                                item.id.clone(),
                                &item.message.payload,
                                item.version,
                                item.trace.clone(),
                            )
                            .await?,
                        );
                    }
                }
                Ok::<_, Error>(received)
            })
            .await;
        match received {
            Ok(received) => {
                let acks = items
                    .iter()
                    .zip(received)
                    .map(|(item, received)| self.settle(item, Ok(received)));
                futures_util::future::join_all(acks).await;
            }
            Err(error) => {
                tracing::debug!(error = %Chain(&error), messages = items.len(),
                    "receiving messages together failed; receiving each alone");
                for item in items {
                    self.handle(item).await;
                }
            }
        }
    }

    /// Receives one message in a transaction of its own, and acknowledges it as its receipt
    /// went.
    async fn handle(&self, item: Item<B>) {
        let result = match &item.accept {
            Ok(accept) => match (accept.alone)(
                &self.bus,
                item.id.clone(),
                &item.message.payload,
                item.version,
                item.trace.clone(),
            ) {
                Ok(receipt) => receipt.await,
                Err(error) => Err(Error::Invalid(format!(
                    "its payload does not deserialize: {error}"
                ))),
            },
            Err(reason) => Err(Error::Invalid(reason.clone())),
        };
        self.settle(&item, result).await;
    }

    /// Acknowledges a message after its receipt: done, terminated (it can never be received),
    /// or negatively (to be redelivered).
    async fn settle(&self, item: &Item<B>, result: Result<Received, Error>) {
        let Item {
            message,
            stream,
            sequence,
            id,
            ..
        } = item;
        let ack = match result {
            Ok(received) => {
                tracing::debug!(message_id = %id, duplicate = received.is_duplicate(), "received");
                message.double_ack().await
            }
            Err(Error::Invalid(reason)) => {
                tracing::warn!(stream, sequence, message_id = %id, subject = %message.subject,
                    reason, "terminated a JetStream message that cannot be received");
                message.ack_with(AckKind::Term).await
            }
            Err(error) => {
                tracing::warn!(stream, sequence, message_id = %id, error = %Chain(&error),
                    retry_in = ?RETRY_DELAY, "receiving a JetStream message failed; it will be redelivered");
                message.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await
            }
        };
        if let Err(error) = ack {
            // Not lost: JetStream redelivers it after the consumer's ack_wait, and the inbox
            // takes it as a duplicate.
            tracing::warn!(stream, sequence, error = %error,
                "acknowledging a JetStream message failed; it will be redelivered");
        }
    }
}

/// Whether reading the consumer cannot succeed by asking again.
fn lasting(error: &async_nats::jetstream::consumer::pull::MessagesError) -> bool {
    use async_nats::jetstream::consumer::pull::MessagesErrorKind as Kind;
    matches!(
        error.kind(),
        Kind::ConsumerDeleted | Kind::PushBasedConsumer | Kind::RequestLimitExceeded
    )
}

fn nats_error(what: &str, error: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Connection {
        context: format!("NATS JetStream: {what}"),
        source: Box::new(error),
    }
}
