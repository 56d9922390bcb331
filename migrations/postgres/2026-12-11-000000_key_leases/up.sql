-- Serves the claims' look for a later delivery of the same listener and key that runs now
-- (a retried, scheduled or parked delivery waits for it): the leased ones, few at any time,
-- where the key index would read every pending delivery of the key.
CREATE INDEX txbus_deliveries_key_leased ON txbus_deliveries (listener, ordering_key)
    WHERE ordering_key IS NOT NULL AND leased_at IS NOT NULL AND delivered_at IS NULL
      AND dead_at IS NULL;
