//! Beyond one process: publish events to [NATS JetStream](https://docs.nats.io/nats-concepts/jetstream)
//! and receive them into another service's inbox (feature `nats`).
//!
//! - [`JetStreamRelay`] routes event types to subjects. Each route is a delivery like any
//!   listener's (id `txbus.nats:<subject>`): it is recorded in the emitting transaction, leased,
//!   retried with backoff, expires, dies as a dead letter, shows in [`stats`](crate::EventBus::stats)
//!   and can be replayed. A publish counts as done only when JetStream acknowledges it.
//! - [`JetStreamInbox`] reads a durable pull consumer and hands each message to
//!   [`EventBus::receive`](crate::EventBus::receive), acknowledging it only once the receipt has
//!   committed. The message id is the `Nats-Msg-Id` the relay set, so a message published or
//!   delivered twice is received once.
//!
//! Between the two, a message carries its event's JSON as payload and these headers:
//!
//! | header | value |
//! |---|---|
//! | `Nats-Msg-Id` | `<source>:<event id>@<subject>` (`<event id>@<subject>` without a source): stable across retries, so JetStream drops a retried publish inside the stream's duplicate window |
//! | `Txbus-Event` | the event's name ([`Event::NAME`](crate::Event::NAME)) |
//! | `Txbus-Event-Id` | the event's id in the emitting database |
//! | `Txbus-Emitted-At` | when it was emitted: microseconds since the Unix epoch, database clock |
//! | `Txbus-Event-Version` | the version of the event's type that wrote the payload |
//! | `traceparent`, `tracestate` | with the `opentelemetry` feature, the W3C trace context of the publish (a span `txbus.publish`, child of the relay's listener run): the inbox stores it, and the receiving listeners' spans are its children |
//!
//! ```no_run
//! # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
//! # #[event(name = "order.placed")]
//! # struct OrderPlaced { id: i64 }
//! # async fn run(pool: txbus::Pool<txbus::Sqlite>) -> Result<(), Box<dyn std::error::Error>> {
//! use txbus::nats::JetStreamRelay;
//!
//! let client = async_nats::connect("127.0.0.1:4222").await?;
//! let jetstream = async_nats::jetstream::new(client);
//! let bus = txbus::EventBus::builder(pool)
//!     .relay(JetStreamRelay::new(jetstream).route::<OrderPlaced>("orders.placed"))
//!     .build()
//!     .await?;
//! # Ok(())
//! # }
//! ```

mod decode;
mod inbox;
mod relay;

pub use inbox::JetStreamInbox;
pub use relay::JetStreamRelay;
pub(crate) use relay::Routes;

/// The header that names the event of a message.
pub const EVENT_HEADER: &str = "Txbus-Event";
/// The header with the event's id in the emitting database.
pub const EVENT_ID_HEADER: &str = "Txbus-Event-Id";
/// The header with the time the event was emitted, in microseconds since the Unix epoch.
pub const EMITTED_AT_HEADER: &str = "Txbus-Emitted-At";

/// The header with the version of the event's type that wrote the payload
/// ([`Event::VERSION`](crate::Event::VERSION)): the inbox stores the payload at that version,
/// so that a consumer on an older or a newer version upcasts it, or leaves it to an instance
/// that knows it.
pub const EVENT_VERSION_HEADER: &str = "Txbus-Event-Version";

/// The W3C trace context header of the publish (feature `opentelemetry`): the inbox stores it
/// with the deliveries, so the receiving service's listeners continue the sender's trace.
#[cfg(feature = "opentelemetry")]
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The W3C `tracestate` header that goes with [`TRACEPARENT_HEADER`], when the trace has one.
#[cfg(feature = "opentelemetry")]
pub const TRACESTATE_HEADER: &str = "tracestate";
