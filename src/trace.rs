//! W3C trace context kept with deliveries (feature `opentelemetry`).
//!
//! An emit or a receipt stores the context of the span it ran in, as `traceparent`, and its
//! `tracestate` on a second line when it has one; a listener's `txbus.listener` span takes it
//! as its parent on every run, wherever it runs. Without the feature nothing is stored and
//! nothing is read.

use std::sync::Arc;

/// The trace context of the current span, as stored; `None` outside any span OpenTelemetry
/// knows (or without the feature).
#[cfg(feature = "opentelemetry")]
pub(crate) fn current() -> Option<Arc<str>> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    stored(&tracing::Span::current().context())
}

#[cfg(not(feature = "opentelemetry"))]
#[inline]
pub(crate) fn current() -> Option<Arc<str>> {
    None
}

/// Makes the stored context `stored` the parent of `span`, which must not have started.
#[cfg(feature = "opentelemetry")]
pub(crate) fn set_parent(span: &tracing::Span, stored: &str) {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let parent = propagator().extract_with_context(&opentelemetry::Context::new(), &Read(stored));
    // Fails only without an OpenTelemetry layer, when there is no trace to continue.
    let _ = span.set_parent(parent);
}

#[cfg(not(feature = "opentelemetry"))]
#[inline]
pub(crate) fn set_parent(_span: &tracing::Span, _stored: &str) {}

/// The `traceparent` of a stored context.
pub(crate) fn traceparent(stored: &str) -> &str {
    stored.split_once('\n').map_or(stored, |(parent, _)| parent)
}

/// The `tracestate` of a stored context, if it has one.
#[cfg(feature = "opentelemetry")]
pub(crate) fn tracestate(stored: &str) -> Option<&str> {
    stored.split_once('\n').map(|(_, state)| state)
}

/// The stored form of trace context read from `traceparent` and `tracestate` headers; `None`
/// when they do not hold a valid one.
#[cfg(all(feature = "opentelemetry", feature = "nats"))]
pub(crate) fn from_headers(traceparent: &str, tracestate: Option<&str>) -> Option<Arc<str>> {
    use opentelemetry::propagation::TextMapPropagator;
    let joined = match tracestate {
        Some(state) => format!("{traceparent}\n{state}"),
        None => traceparent.to_owned(),
    };
    // Parsed and written again: only a valid context is kept, in its canonical form.
    stored(&propagator().extract_with_context(&opentelemetry::Context::new(), &Read(&joined)))
}

#[cfg(feature = "opentelemetry")]
fn propagator() -> opentelemetry_sdk::propagation::TraceContextPropagator {
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
}

/// The stored form of the span context in `cx`, if it is valid.
#[cfg(feature = "opentelemetry")]
fn stored(cx: &opentelemetry::Context) -> Option<Arc<str>> {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut written = Write::default();
    propagator().inject_context(cx, &mut written);
    let parent = written.traceparent?;
    Some(match written.tracestate.filter(|s| !s.is_empty()) {
        Some(state) => format!("{parent}\n{state}").into(),
        None => parent.into(),
    })
}

/// Receives what the propagator writes.
#[cfg(feature = "opentelemetry")]
#[derive(Default)]
struct Write {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

#[cfg(feature = "opentelemetry")]
impl opentelemetry::propagation::Injector for Write {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = Some(value),
            "tracestate" => self.tracestate = Some(value),
            _ => {}
        }
    }
}

/// Hands a stored context to the propagator.
#[cfg(feature = "opentelemetry")]
struct Read<'a>(&'a str);

#[cfg(feature = "opentelemetry")]
impl opentelemetry::propagation::Extractor for Read<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(traceparent(self.0)),
            "tracestate" => tracestate(self.0),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

#[cfg(all(test, feature = "opentelemetry"))]
mod tests {
    use opentelemetry::propagation::TextMapPropagator;

    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_stored_context_reads_back_as_it_was() {
        let cx = propagator().extract_with_context(
            &opentelemetry::Context::new(),
            &Read(&format!("{PARENT}\nvendor=a;b")),
        );
        let stored = stored(&cx).expect("a valid context");
        assert_eq!(&*stored, format!("{PARENT}\nvendor=a;b"));
        assert_eq!(traceparent(&stored), PARENT);
    }

    #[test]
    fn an_invalid_context_is_not_stored() {
        let cx = propagator()
            .extract_with_context(&opentelemetry::Context::new(), &Read("00-not-a-trace-01"));
        assert_eq!(stored(&cx), None);
        assert_eq!(stored(&opentelemetry::Context::new()), None);
    }
}
