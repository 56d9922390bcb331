\set uid random(1, 1000000000000)
BEGIN;
INSERT INTO txbus_pgbench.users (id, email) VALUES (:uid, 'user-' || :uid || '@example.com') ON CONFLICT (id) DO UPDATE SET email = excluded.email;
\startpipeline
WITH e AS (INSERT INTO txbus_pgbench.events (name, payload, emitted_at, lease_ms) VALUES ('user.created', '{"id": 1, "email": "user-1@example.com", "padding": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}'::jsonb, statement_timestamp(), 30000) RETURNING id, emitted_at) INSERT INTO txbus_pgbench.deliveries (event_id, listener, attempts, available_at, expires_at) SELECT e.id, 'audit', 1, e.emitted_at + interval '30 seconds', e.emitted_at + interval '1 day' FROM e;
COMMIT;
\endpipeline
