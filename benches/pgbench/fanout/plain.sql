\set uid random(1, 1000000000000)
\set n random(1, 1000)
BEGIN;
INSERT INTO users (id, email) VALUES (:uid, 'user-' || :uid || '@example.com') ON CONFLICT (id) DO UPDATE SET email = excluded.email;
INSERT INTO bench_payloads (id, body) SELECT :uid, body FROM noise WHERE id = :n;
COMMIT;
