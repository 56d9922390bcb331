//! PostgreSQL: the claims of due deliveries, and of the heads of ordering keys.

/// The condition that a due delivery `d` is its key's head, for its listener (always true
/// without a key): no other delivery of the key is pending before it (by event id), or dead
/// before it and holding the key; a scheduled one not due yet does not count. One that may have
/// been passed by a later one (a retry, a scheduled, replayed or parked one: its `available_at`
/// is past its emit) also waits while a later one of its key runs. The partial indexes
/// `txbus_deliveries_key` and `txbus_deliveries_key_leased` serve the two look-ups: the first
/// reads only the deliveries before `d`, the second only the leased ones.
macro_rules! key_head {
    () => {
        "(d.ordering_key IS NULL OR (
          NOT EXISTS (
            SELECT 1 FROM txbus_deliveries p
            WHERE p.listener = d.listener AND p.ordering_key = d.ordering_key
              AND p.ordering_key IS NOT NULL AND p.delivered_at IS NULL
              AND (p.dead_at IS NULL OR p.key_hold) AND p.event_id < d.event_id
              AND (p.dead_at IS NOT NULL OR p.attempts > 0 OR p.available_at <= now()
                   OR p.parked))
          AND (d.available_at <= d.emitted_at OR NOT EXISTS (
            SELECT 1 FROM txbus_deliveries p
            WHERE p.listener = d.listener AND p.ordering_key = d.ordering_key
              AND p.ordering_key IS NOT NULL AND p.leased_at IS NOT NULL
              AND p.delivered_at IS NULL AND p.dead_at IS NULL
              AND p.event_id <> d.event_id AND p.available_at > now()))))"
    };
}

/// The advisory lock under which deliveries of one listener and key are parked, of the row
/// `$alias` (with `listener` and `ordering_key`). Apart from the emits' key locks (seed 0).
macro_rules! park_lock {
    ($alias:literal) => {
        concat!(
            "hashtextextended(",
            $alias,
            ".listener || '/' || ",
            $alias,
            ".ordering_key, 1)"
        )
    };
}

/// Leases the deliveries of the CTE `c`, and parks those it found `blocked` behind an earlier
/// delivery of their key (see the migration `key_parking`): for as long as they have waited
/// since their emit, at least 30 seconds and at most an hour, so that a delivery held up for long
/// is looked at rarely. The claim of its key's head takes a parked delivery at any time. Those
/// found expired are made dead instead of leased (all SET expressions see the row as it was).
macro_rules! lease_claimed {
    () => {
        "
UPDATE txbus_deliveries d
SET attempts = CASE WHEN c.blocked OR d.expires_at <= now() THEN d.attempts
                    ELSE d.attempts + 1 END,
    available_at = CASE WHEN c.blocked
                        THEN now() + GREATEST(interval '30 seconds',
                                              LEAST(now() - d.emitted_at, interval '1 hour'))
                        WHEN d.expires_at <= now() THEN d.available_at
                        ELSE now() + d.lease_ms * interval '1 millisecond' END,
    leased_at = CASE WHEN c.blocked OR d.expires_at <= now() THEN NULL ELSE now() END,
    dead_at = CASE WHEN NOT c.blocked AND d.expires_at <= now() THEN now() END,
    dead_reason = CASE WHEN NOT c.blocked AND d.expires_at <= now() THEN 'expired' END,
    parked = c.blocked
FROM c
WHERE d.event_id = c.event_id AND d.listener = c.listener
RETURNING d.event_id, d.listener, d.attempts, d.payload::text AS payload,
          (extract(epoch FROM d.emitted_at) * 1000000)::int8 AS emitted_at_us, d.lease_ms,
          d.dead_at IS NOT NULL AS expired, d.event_version, d.ordering_key, d.parked,
          d.trace_context, FALSE AS held"
    };
}

// A keyed delivery is claimed only as its key's head (see `key_head!`); one that is not is
// parked, under its key's parking lock (`park_lock!`), taken before the row: a claim of the
// key's head that runs meanwhile waits for this one, and then sees the row parked. A
// delivery whose parking lock is taken is left as it is. The MATERIALIZED CTE is evaluated
// exactly once: a plain `IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)` can be rescanned by
// some plans and then claim more than n rows.
pub(super) const CLAIM: &str = concat!(
    "\
WITH c AS MATERIALIZED (
SELECT event_id, listener, NOT ",
    key_head!(),
    " AS blocked
FROM txbus_deliveries d
WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at <= now()
  AND listener = ANY($1)
  AND (event_version = 1 OR event_version <= ($2::jsonb ->> listener)::int4)
  AND CASE WHEN ",
    key_head!(),
    " THEN TRUE ELSE pg_try_advisory_xact_lock(",
    park_lock!("d"),
    ") END
ORDER BY available_at
LIMIT $3
FOR UPDATE SKIP LOCKED)",
    lease_claimed!()
);

// The first delivery of each (listener `$4`, key `$5`) pair, pending or holding its key, by
// the key index: claimed if it is its key's head and due. (A first one that is scheduled and
// not due yet stops the look-up; the general claim finds what is behind it.) A parked one
// counts as due: it waited for the one before it. Each key's parking lock is taken first (in
// the order of the lists, which every caller sorts), so that a row a claim is parking right
// now is seen parked.
//
// The look-up `f` locks nothing. It reads each key's first delivery in a `LATERAL` with a
// `LIMIT`, which the planner cannot turn into a join: as a join with the table, a plan could
// start from the due index instead, for every key. `c` then locks the heads it found (by
// primary key: `COALESCE` as in the result writes), checked again where a transaction changed
// them since. A running head fails the checks before it is locked, so its result write does
// not wait for this claim. A head that another transaction holds is skipped, never waited for
// (this claim holds other rows meanwhile, which could deadlock with a result write), and
// returned `held`: its key is tried again at the next poll (one a general claim holds, it
// leases; anything else that holds it would otherwise leave it parked).
pub(super) const CLAIM_HEADS: &str = concat!(
    "\
WITH f AS MATERIALIZED (
SELECT d.event_id, d.listener, d.ordering_key
FROM unnest($4::text[], $5::text[]) AS k (listener, ordering_key)
CROSS JOIN LATERAL (
    SELECT 1 AS locked FROM (SELECT pg_advisory_xact_lock(",
    park_lock!("k"),
    ")) x OFFSET 0) l
CROSS JOIN LATERAL (
    SELECT h.event_id, h.listener, h.ordering_key, h.dead_at, h.available_at, h.emitted_at,
           h.event_version, h.parked
    FROM txbus_deliveries h
    WHERE l.locked = 1 AND h.listener = k.listener AND h.ordering_key = k.ordering_key
      AND h.ordering_key IS NOT NULL AND h.delivered_at IS NULL
      AND (h.dead_at IS NULL OR h.key_hold)
    ORDER BY h.event_id
    LIMIT 1) d
WHERE d.dead_at IS NULL AND (d.available_at <= now() OR d.parked)
  AND d.listener = ANY($1)
  AND (d.event_version = 1 OR d.event_version <= ($2::jsonb ->> d.listener)::int4)
  AND ",
    key_head!(),
    "
LIMIT $3),
c AS MATERIALIZED (
SELECT d.event_id, d.listener, FALSE AS blocked
FROM f JOIN txbus_deliveries d ON d.event_id = f.event_id AND d.listener = f.listener
WHERE COALESCE(d.dead_at, d.delivered_at) IS NULL AND (d.available_at <= now() OR d.parked)
FOR UPDATE OF d SKIP LOCKED),
u AS (",
    lease_claimed!(),
    ")
SELECT * FROM u
UNION ALL
SELECT f.event_id, f.listener, 0, '', 0, 0, FALSE, 1, f.ordering_key, FALSE, NULL, TRUE
FROM f
WHERE NOT EXISTS (SELECT 1 FROM c WHERE c.event_id = f.event_id AND c.listener = f.listener)"
);
