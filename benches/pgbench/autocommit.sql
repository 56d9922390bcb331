\set uid random(1, 1000000000000)
INSERT INTO txbus_pgbench.users (id, email) VALUES (:uid, 'user-' || :uid || '@example.com') ON CONFLICT (id) DO UPDATE SET email = excluded.email;
