-- The W3C trace context of the span that emitted or received the event (feature
-- `opentelemetry`): its `traceparent`, and its `tracestate` on a second line when it has one.
-- A listener's span continues that trace on every run. NULL when there was none.
ALTER TABLE txbus_deliveries ADD COLUMN trace_context TEXT;
