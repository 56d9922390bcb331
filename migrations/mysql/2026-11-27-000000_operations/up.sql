-- leased_at: when the running lease of a delivery started (NULL when it is not leased); tells a
-- running delivery from one waiting for its retry, which both have a future available_at.
-- delivered_at: when the listener succeeded, for deliveries kept after success
-- (retain_delivered).
--
-- MySQL has no partial indexes: one composite index, led by delivered_at, serves the claim and
-- the expiry sweep (delivered_at IS NULL AND dead_at IS NULL, available_at range), the
-- dead-letter list and its purge (delivered_at IS NULL, dead_at range) and the retention of
-- delivered ones (delivered_at range), at the write cost of the index it replaces. Every
-- statement on pending or dead rows therefore says `delivered_at IS NULL`.
--
-- One statement, as every MySQL migration (each DDL statement commits by itself).
ALTER TABLE txbus_deliveries
    ADD COLUMN leased_at DATETIME(6) NULL,
    ADD COLUMN delivered_at DATETIME(6) NULL,
    DROP INDEX txbus_deliveries_due,
    ADD INDEX txbus_deliveries_due (delivered_at, dead_at, available_at)
