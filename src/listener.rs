//! What a listener sees (`Context`) and returns (`ListenerError`), and how the macro registers it.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;

use crate::delivery::DeadReason;
use crate::error::StateError;
use crate::event::EventId;

/// A boxed error, as listeners return it.
type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The result of starting a listener: its future, or the error that kept it from starting (for
/// example a payload that does not deserialize into the listener's event type).
#[doc(hidden)]
pub type ListenerCall = Result<BoxFuture<'static, Result<(), ListenerError>>, ListenerError>;

/// The start of a transactional listener, whose future borrows the transaction's connection.
#[doc(hidden)]
pub type TxCall<'c> = Result<BoxFuture<'c, Result<(), ListenerError>>, ListenerError>;

/// One `#[listener]` function, as the macro registers it at link time.
#[doc(hidden)]
#[derive(Debug)]
pub struct ListenerDef {
    /// The stable id deliveries are stored under.
    pub id: &'static str,
    /// Former ids: deliveries stored under them are run by this listener.
    pub aliases: &'static [&'static str],
    /// The name of the event type it listens to.
    pub event: &'static str,
    /// The Rust type of that event, for messages.
    pub event_type: fn() -> &'static str,
    /// That type's [`Event::VERSION`](crate::Event::VERSION): deliveries stored at a newer
    /// version are left to instances that know it.
    pub version: u32,
    /// How to run it.
    pub kind: ListenerKind,
    /// Where the function is defined.
    pub file: &'static str,
    /// The line of the function.
    pub line: u32,
}

/// How a listener runs.
#[doc(hidden)]
#[derive(Debug)]
pub enum ListenerKind {
    /// On its own: deserializes the payload and starts the listener.
    Plain(fn(&str, Context) -> ListenerCall),
    /// Inside a transaction that also completes its delivery.
    Transactional(TxListener),
}

/// A `#[listener(transactional)]`.
#[doc(hidden)]
#[derive(Debug)]
pub struct TxListener {
    /// The connection type it takes, checked against the bus's backend by `build()`.
    pub connection: fn() -> TypeId,
    /// Its name, for messages.
    pub connection_name: fn() -> &'static str,
    /// Deserializes the payload and starts the listener on the transaction's connection.
    pub call: for<'c> fn(&str, Context, &'c mut (dyn Any + Send)) -> TxCall<'c>,
}

impl ListenerDef {
    pub(crate) fn location(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

/// Values registered with [`EventBusBuilder::state`](crate::EventBusBuilder::state), by type.
#[derive(Default)]
pub(crate) struct State(HashMap<TypeId, Box<dyn Any + Send + Sync>>);

impl State {
    pub(crate) fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        self.0.insert(TypeId::of::<T>(), Box::new(value));
    }

    fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.0.get(&TypeId::of::<T>())?.downcast_ref()
    }
}

/// What a listener knows about the delivery it runs: which event, which attempt, and the
/// application state registered on the bus.
///
/// Add `ctx: txbus::Context` as the second parameter of a `#[listener]` to receive it.
///
/// ```
/// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
/// # struct UserCreated { email: String }
/// struct Mailer;
/// impl Mailer {
///     async fn send(&self, _to: &str) -> Result<(), std::io::Error> { Ok(()) }
/// }
///
/// #[txbus::listener]
/// async fn send_welcome(event: UserCreated, ctx: txbus::Context) -> Result<(), txbus::ListenerError> {
///     let mailer = ctx.state::<Mailer>()?;
///     tracing::info!(attempt = ctx.attempt(), event_id = %ctx.event_id(), "sending");
///     mailer.send(&event.email).await?;
///     Ok(())
/// }
/// ```
#[derive(Clone)]
pub struct Context {
    pub(crate) event_id: EventId,
    pub(crate) listener: &'static str,
    pub(crate) event: &'static str,
    pub(crate) attempt: u32,
    pub(crate) emitted_at: SystemTime,
    pub(crate) waited: Duration,
    pub(crate) state: Arc<State>,
    /// The version of the event's type that wrote the payload.
    pub(crate) stored_version: u32,
    pub(crate) ordering_key: Option<Arc<str>>,
    /// The stored trace context of the emit (see `crate::trace`).
    pub(crate) trace: Option<Arc<str>>,
}

impl ListenerDef {
    /// The connection type a transactional listener takes.
    pub(crate) fn transactional(&self) -> Option<&TxListener> {
        match &self.kind {
            ListenerKind::Plain(_) => None,
            ListenerKind::Transactional(tx) => Some(tx),
        }
    }
}

impl Context {
    /// The id of the event being delivered.
    pub fn event_id(&self) -> EventId {
        self.event_id
    }

    /// The name of the event ([`Event::NAME`](crate::Event::NAME)).
    pub fn event_name(&self) -> &'static str {
        self.event
    }

    /// The id of the listener being run.
    pub fn listener(&self) -> &str {
        self.listener
    }

    /// The event's [ordering key](crate::Event::ordering_key), if it has one: the deliveries of
    /// this listener with the same key run one at a time, in event-id order.
    pub fn ordering_key(&self) -> Option<&str> {
        self.ordering_key.as_deref()
    }

    /// The W3C `traceparent` of the span that emitted (or received) the event, with the
    /// `opentelemetry` feature: this run's `txbus.listener` span is its child, on every attempt
    /// and in every process. `None` for an event emitted outside any span OpenTelemetry knows,
    /// and always without the feature.
    ///
    /// Pass it on to continue the trace where the listener calls another service, for example
    /// as an HTTP `traceparent` header.
    pub fn traceparent(&self) -> Option<&str> {
        self.trace.as_deref().map(crate::trace::traceparent)
    }

    /// Which run of this delivery this is: 1 the first time, 2 for the first retry, ...
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// When the event was emitted, by the database's clock.
    pub fn emitted_at(&self) -> SystemTime {
        self.emitted_at
    }

    /// How long this run waited in this process before it started: from the commit of the
    /// emit (for a delivery dispatched right away) or from its claim by the poller, through
    /// the queue and the wait for a concurrency permit.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// The value of type `T` registered with
    /// [`EventBusBuilder::state`](crate::EventBusBuilder::state).
    pub fn state<T: Send + Sync + 'static>(&self) -> Result<&T, StateError> {
        self.state.get::<T>().ok_or(StateError {
            type_name: std::any::type_name::<T>(),
        })
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("event", &self.event)
            .field("event_id", &self.event_id)
            .field("listener", &self.listener)
            .field("attempt", &self.attempt)
            .field("ordering_key", &self.ordering_key)
            .field("traceparent", &self.traceparent())
            .field("emitted_at", &self.emitted_at)
            .field("waited", &self.waited)
            .finish_non_exhaustive()
    }
}

/// Why a listener failed, and what the bus should do about it.
///
/// Any error converts into it with `?` (std errors, `anyhow::Error`, `String`, `&str`); such a
/// failure is retried after the event's backoff. Two constructors change that:
/// [`retry_after`](Self::retry_after) picks the delay of the next attempt, and
/// [`abort`](Self::abort) gives up at once (the delivery becomes a dead letter).
///
/// For that blanket conversion, `ListenerError` does not itself implement
/// [`std::error::Error`]; use [`error`](Self::error) to reach the cause.
///
/// ```
/// use std::time::Duration;
/// use txbus::ListenerError;
///
/// fn classify(status: u16) -> Result<(), ListenerError> {
///     match status {
///         200 => Ok(()),
///         429 => Err(ListenerError::retry_after(Duration::from_secs(60), "rate limited")),
///         400 => Err(ListenerError::abort(format!("rejected with status {status}"))),
///         _ => Err(format!("unexpected status {status}").into()),
///     }
/// }
/// assert!(classify(400).unwrap_err().is_abort());
/// ```
pub struct ListenerError {
    error: BoxError,
    action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Retry(Option<Duration>),
    Abort,
    /// Given up by the bus itself, for this reason (a payload it cannot upcast, say).
    Dead(DeadReason),
}

impl ListenerError {
    /// A failure to retry after `delay` instead of the event's backoff.
    pub fn retry_after(delay: Duration, error: impl Into<BoxError>) -> Self {
        Self {
            error: error.into(),
            action: Action::Retry(Some(delay)),
        }
    }

    /// A permanent failure: the delivery becomes a dead letter now, with no retry.
    pub fn abort(error: impl Into<BoxError>) -> Self {
        Self {
            error: error.into(),
            action: Action::Abort,
        }
    }

    /// A permanent failure the bus decided on, with its reason.
    pub(crate) fn dead(reason: DeadReason, error: impl Into<BoxError>) -> Self {
        Self {
            error: error.into(),
            action: Action::Dead(reason),
        }
    }

    /// Whether this failure gives up the delivery.
    pub fn is_abort(&self) -> bool {
        matches!(self.action, Action::Abort | Action::Dead(_))
    }

    /// Why the delivery gives up, when it does.
    pub(crate) fn dead_reason(&self) -> Option<DeadReason> {
        match self.action {
            Action::Retry(_) => None,
            Action::Abort => Some(DeadReason::Aborted),
            Action::Dead(reason) => Some(reason),
        }
    }

    /// The delay requested with [`retry_after`](Self::retry_after), if any.
    pub fn retry_delay(&self) -> Option<Duration> {
        match self.action {
            Action::Retry(delay) => delay,
            Action::Abort | Action::Dead(_) => None,
        }
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.error
    }

    /// Takes the underlying error out.
    pub fn into_error(self) -> BoxError {
        self.error
    }
}

impl<E: Into<BoxError>> From<E> for ListenerError {
    fn from(error: E) -> Self {
        Self {
            error: error.into(),
            action: Action::Retry(None),
        }
    }
}

impl fmt::Debug for ListenerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerError")
            .field("error", &self.error)
            .field("action", &self.action)
            .finish()
    }
}

impl fmt::Display for ListenerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&crate::error::Chain(&*self.error), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_keep_the_message_and_retry() {
        let from_string: ListenerError = String::from("boom").into();
        assert_eq!(from_string.to_string(), "boom");
        assert_eq!(from_string.retry_delay(), None);
        assert!(!from_string.is_abort());

        let io = std::io::Error::other("disk full");
        let from_io: ListenerError = io.into();
        assert_eq!(from_io.to_string(), "disk full");
    }

    #[test]
    fn retry_after_and_abort_are_kept() {
        let e = ListenerError::retry_after(Duration::from_secs(3), "later");
        assert_eq!(e.retry_delay(), Some(Duration::from_secs(3)));
        let e = ListenerError::abort("never");
        assert!(e.is_abort());
        assert_eq!(e.retry_delay(), None);
    }

    #[test]
    fn state_is_found_by_type() {
        let mut state = State::default();
        state.insert(7u32);
        let ctx = Context {
            event_id: EventId::new(1),
            listener: "l",
            event: "e",
            attempt: 1,
            emitted_at: SystemTime::UNIX_EPOCH,
            waited: Duration::ZERO,
            state: Arc::new(state),
            stored_version: 1,
            ordering_key: None,
            trace: None,
        };
        assert_eq!(ctx.state::<u32>(), Ok(&7));
        let missing = ctx.state::<String>().unwrap_err();
        assert!(
            missing.to_string().contains("alloc::string::String"),
            "{missing}"
        );
    }
}
