\set uid random(1, 1000000000000)
\set r random(1, 50)
WITH txbus_write AS (INSERT INTO txbus_pgbench.users (id, email) VALUES (:uid, 'user-' || :uid || '@example.com') ON CONFLICT (id) DO UPDATE SET email = excluded.email) INSERT INTO txbus_pgbench.one (event_id, listener, event_name, payload, emitted_at, lease_ms, attempts, available_at, expires_at) VALUES (nextval('txbus_pgbench.event_ids'), 'audit', 'user.created', '{"id": 1, "email": "user-1@example.com", "padding": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}'::jsonb, statement_timestamp(), 30000, 1, statement_timestamp() + interval '30 seconds', statement_timestamp() + interval '1 day');
\if :r = 1
WITH c AS (SELECT event_id, listener FROM txbus_pgbench.one ORDER BY event_id LIMIT 50 FOR UPDATE SKIP LOCKED) DELETE FROM txbus_pgbench.one o USING c WHERE o.event_id = c.event_id AND o.listener = c.listener;
\endif
