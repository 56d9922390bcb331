ALTER TABLE txbus_deliveries DROP COLUMN trace_context;
