//! Publishing events to JetStream as deliveries.

use std::collections::HashMap;
use std::fmt;
use std::panic::Location;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::UNIX_EPOCH;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind};
use tracing::Instrument;

use super::{EMITTED_AT_HEADER, EVENT_HEADER, EVENT_ID_HEADER, EVENT_VERSION_HEADER};
use crate::error::BuildError;
use crate::event::Event;
use crate::listener::{Context, ListenerCall, ListenerDef, ListenerError, ListenerKind};

/// The prefix of every route's listener id.
const ID_PREFIX: &str = "txbus.nats:";

/// Publishes chosen event types to NATS JetStream subjects, one delivery per route.
///
/// Register it with [`EventBusBuilder::relay`](crate::EventBusBuilder::relay). Every event of a
/// routed type then gets a delivery with the listener id `txbus.nats:<subject>`, written in the
/// emitting transaction like any listener's, and the relay publishes it: right after the commit,
/// and again by the poller until JetStream acknowledges it, with the event type's
/// [`EventSettings`](crate::EventSettings) (backoff, `max_execution_time` bounding each publish,
/// expiry, dead letters). The subject needs a stream that captures it; until one exists, publishes
/// fail and are retried.
///
/// Each message carries the `Nats-Msg-Id` header `[<source>:]<event id>@<subject>`, so a publish
/// retried after a lost acknowledgement is dropped by JetStream inside the stream's
/// `duplicate_window`, and received once by a [`JetStreamInbox`](super::JetStreamInbox) after it.
/// Event ids are unique per database: when several databases publish into one stream, give each
/// relay its own [`source`](Self::source).
///
/// ```no_run
/// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
/// # #[event(name = "order.placed")]
/// # struct OrderPlaced { id: i64 }
/// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
/// # #[event(name = "order.cancelled")]
/// # struct OrderCancelled { id: i64 }
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use txbus::nats::JetStreamRelay;
///
/// let jetstream = async_nats::jetstream::new(async_nats::connect("127.0.0.1:4222").await?);
/// let relay = JetStreamRelay::new(jetstream)
///     .source("orders-service")
///     .route::<OrderPlaced>("orders.placed")
///     .route::<OrderCancelled>("orders.cancelled");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct JetStreamRelay {
    jetstream: jetstream::Context,
    source: Option<String>,
    routes: Vec<&'static ListenerDef>,
    /// Routes refused: the event and why.
    errors: Vec<(&'static str, String)>,
}

impl fmt::Debug for JetStreamRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamRelay")
            .field("source", &self.source)
            .field(
                "routes",
                &self.routes.iter().map(|def| def.id).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl JetStreamRelay {
    /// A relay that publishes through `jetstream`. Its timeout
    /// ([`Context::set_timeout`](async_nats::jetstream::Context::set_timeout), 5 s by default)
    /// bounds the wait for an acknowledgement; the event's `max_execution_time` bounds the whole
    /// publish.
    pub fn new(jetstream: jetstream::Context) -> Self {
        Self {
            jetstream,
            source: None,
            routes: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Prefixes the `Nats-Msg-Id` of every message with `source` (a service or database name),
    /// so that several databases can publish into one stream without their event ids meeting.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Publishes every event of type `E` to `subject`: a plain subject (tokens separated by
    /// `.`, no wildcards, no spaces). One subject takes one event type: its listener id is
    /// `txbus.nats:<subject>`.
    #[track_caller]
    pub fn route<E: Event>(mut self, subject: impl Into<String>) -> Self {
        let subject = subject.into();
        match check_subject(&subject) {
            Ok(()) => self
                .routes
                .push(route_def::<E>(&subject, Location::caller())),
            Err(reason) => self
                .errors
                .push((E::NAME, format!("relay subject `{subject}` {reason}"))),
        }
        self
    }

    /// The listener ids of the routes, in the order they were added.
    pub fn listener_ids(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.routes.iter().map(|def| def.id)
    }

    /// Takes the relay apart for the builder: its routes, what they publish with, its errors.
    pub(crate) fn into_parts(self) -> (Vec<&'static ListenerDef>, Routes, Vec<BuildError>) {
        let target = Arc::new(Target {
            jetstream: self.jetstream,
            source: self.source,
        });
        let routes = Routes(
            self.routes
                .iter()
                .map(|def| (def.id, target.clone()))
                .collect(),
        );
        let errors = self
            .errors
            .into_iter()
            .map(|(event, reason)| BuildError::InvalidSettings {
                event: Some(event),
                reason,
            })
            .collect();
        (self.routes, routes, errors)
    }
}

/// Where each route of a bus publishes: in the bus's listener state, found by listener id.
#[derive(Default)]
pub(crate) struct Routes(HashMap<&'static str, Arc<Target>>);

impl Routes {
    pub(crate) fn extend(&mut self, other: Routes) {
        self.0.extend(other.0);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

struct Target {
    jetstream: jetstream::Context,
    source: Option<String>,
}

fn check_subject(subject: &str) -> Result<(), &'static str> {
    if subject.is_empty() {
        return Err("is empty");
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains white space");
    }
    if subject.split('.').any(str::is_empty) {
        return Err("has an empty token (a leading, trailing or double `.`)");
    }
    if subject.split('.').any(|token| token == "*" || token == ">") {
        return Err("has a wildcard; a message is published to one plain subject");
    }
    Ok(())
}

/// The definition of the route of `E` to `subject`. Definitions live as long as the process
/// (the registry holds `&'static` ones): one per distinct route, however many buses use it.
fn route_def<E: Event>(subject: &str, at: &'static Location<'static>) -> &'static ListenerDef {
    static DEFS: Mutex<Vec<&'static ListenerDef>> = Mutex::new(Vec::new());
    let id = format!("{ID_PREFIX}{subject}");
    let mut defs = DEFS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(def) = defs
        .iter()
        .find(|def| def.id == id && def.event == E::NAME && (def.event_type)() == type_name::<E>())
    {
        return def;
    }
    let def: &'static ListenerDef = Box::leak(Box::new(ListenerDef {
        id: Box::leak(id.into_boxed_str()),
        aliases: &[],
        event: E::NAME,
        event_type: type_name::<E>,
        version: E::VERSION,
        kind: ListenerKind::Plain(publish),
        file: at.file(),
        line: at.line(),
    }));
    defs.push(def);
    def
}

fn type_name<E>() -> &'static str {
    std::any::type_name::<E>()
}

/// The call of every route: publishes the stored payload to the route's subject.
fn publish(payload: &str, ctx: Context) -> ListenerCall {
    let routes = ctx.state::<Routes>()?;
    let target = routes.0.get(ctx.listener()).cloned().ok_or_else(|| {
        ListenerError::from(format!(
            "the relay route `{}` is not registered on this bus",
            ctx.listener()
        ))
    })?;
    let payload = payload.to_owned();
    let version = ctx.stored_version;
    Ok(Box::pin(async move {
        let subject = &ctx.listener()[ID_PREFIX.len()..];
        let event_id = ctx.event_id().get();
        let message_id = match &target.source {
            Some(source) => format!("{source}:{event_id}@{subject}"),
            None => format!("{event_id}@{subject}"),
        };
        let emitted_us = ctx
            .emitted_at()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id.as_str());
        headers.insert(EVENT_HEADER, ctx.event_name());
        headers.insert(EVENT_ID_HEADER, event_id.to_string().as_str());
        headers.insert(EMITTED_AT_HEADER, emitted_us.to_string().as_str());
        headers.insert(EVENT_VERSION_HEADER, version.to_string().as_str());
        let span = publish_span(subject, &message_id, &mut headers);
        let ack = async {
            target
                .jetstream
                .publish_with_headers(subject.to_owned(), headers, payload.into())
                .await
                .map_err(|error| publish_error(subject, error))?
                .await
                .map_err(|error| publish_error(subject, error))
        }
        .instrument(span)
        .await?;
        if ack.duplicate {
            tracing::debug!(
                subject,
                message_id,
                sequence = ack.sequence,
                "JetStream already had this message (a retried publish)"
            );
        }
        Ok(())
    }))
}

/// With the `opentelemetry` feature, the span of a publish (a child of the relay's listener
/// run), whose trace context goes into `headers`.
#[cfg(feature = "opentelemetry")]
fn publish_span(subject: &str, message_id: &str, headers: &mut HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "txbus.publish",
        otel.name = %format_args!("send {subject}"),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = subject,
        messaging.message.id = message_id,
    );
    if let Some(stored) = span.in_scope(crate::trace::current) {
        headers.insert(
            super::TRACEPARENT_HEADER,
            crate::trace::traceparent(&stored),
        );
        if let Some(state) = crate::trace::tracestate(&stored) {
            headers.insert(super::TRACESTATE_HEADER, state);
        }
    }
    span
}

#[cfg(not(feature = "opentelemetry"))]
fn publish_span(_subject: &str, _message_id: &str, _headers: &mut HeaderMap) -> tracing::Span {
    tracing::Span::none()
}

fn publish_error(subject: &str, error: jetstream::context::PublishError) -> ListenerError {
    let hint = match error.kind() {
        PublishErrorKind::StreamNotFound => "; no stream captures this subject: create one",
        PublishErrorKind::TimedOut => {
            "; no acknowledgement in time (the message may be stored: the retry carries the same Nats-Msg-Id)"
        }
        _ => "",
    };
    ListenerError::from(format!("publishing to `{subject}` failed: {error}{hint}"))
}

#[cfg(test)]
mod tests {
    use super::check_subject;

    #[test]
    fn subjects_are_plain() {
        assert!(check_subject("orders.placed").is_ok());
        assert!(check_subject("orders").is_ok());
        for bad in ["", "orders.*", "orders.>", "a b", "a..b", ".a", "a."] {
            assert!(check_subject(bad).is_err(), "{bad:?}");
        }
    }
}
