-- Takes the lock of ordering key `key` for the rest of the transaction, the lock every emit of
-- the key takes before its event id, and tells whether the event about to be written is its
-- key's head for `listeners`: no delivery of the key is pending (or dead and holding the key)
-- for them. With `lease` false (or outside READ COMMITTED) it only takes the lock.
--
-- A keyed emit is one statement, whose snapshot is taken before it waits for the lock; a
-- VOLATILE function's queries take a fresh snapshot each, so the look-up here, after the lock,
-- sees every earlier emit of the key, committed before the lock was released. `written` is
-- there to be evaluated first: the count of the entity writes of the same statement, so that
-- they take their row locks before the key's, as every other emit does.
CREATE FUNCTION txbus_key_head(listeners TEXT[], key TEXT, lease BOOLEAN, written BIGINT)
RETURNS BOOLEAN LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    locked TEXT;
BEGIN
    -- An assignment, not PERFORM: PL/pgSQL evaluates it without starting a query.
    locked := pg_advisory_xact_lock(hashtextextended(key, 0))::text;
    -- Under REPEATABLE READ the look-up would read the snapshot taken before the lock.
    IF NOT lease OR current_setting('transaction_isolation') <> 'read committed' THEN
        RETURN FALSE;
    END IF;
    RETURN NOT EXISTS (
        SELECT 1 FROM txbus_deliveries p
        WHERE p.listener = ANY(listeners) AND p.ordering_key = key
          AND p.ordering_key IS NOT NULL AND p.delivered_at IS NULL
          AND (p.dead_at IS NULL OR p.key_hold));
END
$$;
