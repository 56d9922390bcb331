-- The version of the event's type that wrote the payload (Event::VERSION): a listener of a newer
-- version upcasts the payload first; an instance that only knows older versions leaves it alone.
ALTER TABLE txbus_deliveries ADD COLUMN event_version INTEGER NOT NULL DEFAULT 1;
