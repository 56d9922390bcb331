-- Tables for the storage-layout measurements (schema txbus_pgbench of database `test`).
DROP SCHEMA IF EXISTS txbus_pgbench CASCADE;
CREATE SCHEMA txbus_pgbench;
SET search_path = txbus_pgbench;
CREATE TABLE users (id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL);
-- Two tables: events, and deliveries with a foreign key (the layout first considered).
CREATE TABLE events (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, payload JSONB NOT NULL,
                     emitted_at TIMESTAMPTZ NOT NULL, lease_ms BIGINT NOT NULL);
CREATE TABLE deliveries (event_id BIGINT NOT NULL REFERENCES events (id) ON DELETE CASCADE,
                         listener TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                         available_at TIMESTAMPTZ NOT NULL, expires_at TIMESTAMPTZ NOT NULL,
                         last_error TEXT, dead_at TIMESTAMPTZ, dead_reason TEXT,
                         PRIMARY KEY (event_id, listener));
CREATE INDEX ON deliveries (available_at) WHERE dead_at IS NULL;
CREATE INDEX ON deliveries (expires_at) WHERE dead_at IS NULL;
-- One table: a row per delivery that carries its event (txbus's layout).
CREATE SEQUENCE event_ids;
CREATE TABLE one (event_id BIGINT NOT NULL, listener TEXT NOT NULL, event_name TEXT NOT NULL,
                  payload JSONB NOT NULL, emitted_at TIMESTAMPTZ NOT NULL, lease_ms BIGINT NOT NULL,
                  attempts INTEGER NOT NULL DEFAULT 0, available_at TIMESTAMPTZ NOT NULL,
                  expires_at TIMESTAMPTZ NOT NULL, last_error TEXT, dead_at TIMESTAMPTZ,
                  dead_reason TEXT, PRIMARY KEY (event_id, listener));
CREATE INDEX ON one (available_at) WHERE dead_at IS NULL;
