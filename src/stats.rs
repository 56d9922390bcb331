//! Statistics: the deliveries of every listener by state, read in one statement.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

use crate::error::Error;
use crate::registry::Registry;
use crate::store::{Backend, ListenerRow, Pool};

/// Deliveries by state: of one listener, or of all.
///
/// A pending delivery is in exactly one of five states: `due` (may run now), `running` (leased
/// to a run whose lease holds), `stale` (leased, but the lease passed without a result: its
/// process died or lost the database; it runs again when claimed), `retrying` (failed,
/// waiting for its retry time) and `scheduled` (a scheduled event not due yet, never run).
///
/// Besides, the ordering keys that dead letters hold ([`held_keys`](Self::held_keys)).
///
/// Serialized (as `txbus status --json` prints it) with its fields, `pending` (the sum of the
/// five states), `oldest_pending_age_seconds` and `oldest_held_age_seconds`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeliveryCounts {
    /// Available now, not leased.
    pub due: u64,
    /// Leased to a run whose lease has not passed.
    pub running: u64,
    /// Leased, with the lease passed and no result.
    pub stale: u64,
    /// Waiting for their retry time.
    pub retrying: u64,
    /// Scheduled events not due yet ([`EventBus::emit_after`](crate::EventBus::emit_after)),
    /// never run.
    pub scheduled: u64,
    /// Dead letters.
    pub dead: u64,
    /// Succeeded and kept for [`retain_delivered`](crate::EventBusBuilder::retain_delivered).
    pub delivered: u64,
    /// How long the longest-waiting pending delivery that may run has waited, by the
    /// database's clock: since its event was emitted, or for a scheduled event since it fell
    /// due (in JSON: `oldest_pending_age_seconds`). Scheduled events not due yet do not count.
    pub oldest_pending_age: Option<Duration>,
    /// Ordering keys held by a dead letter of an event with
    /// [`block_key_on_dead`](crate::EventSettings::block_key_on_dead): their later deliveries
    /// wait until it is replayed and succeeds, or purged. Counted once per listener and key.
    pub held_keys: u64,
    /// How long the longest-held of those keys has been held: since its dead letter died, by
    /// the database's clock (in JSON: `oldest_held_age_seconds`).
    pub oldest_held_age: Option<Duration>,
}

impl DeliveryCounts {
    /// Deliveries not finished: due, running, stale, retrying and scheduled.
    pub fn pending(&self) -> u64 {
        self.due + self.running + self.stale + self.retrying + self.scheduled
    }

    fn from_row(row: &ListenerRow, now_us: i64) -> Self {
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        let age = |since: i64| Duration::from_micros(count(now_us.saturating_sub(since)));
        Self {
            due: count(row.due),
            running: count(row.running),
            stale: count(row.stale),
            retrying: count(row.retrying),
            scheduled: count(row.scheduled),
            dead: count(row.dead),
            delivered: count(row.delivered),
            oldest_pending_age: row.oldest_pending_us.map(age),
            held_keys: count(row.held_keys),
            oldest_held_age: row.held_since_us.map(age),
        }
    }

    fn add(&mut self, other: &Self) {
        self.due += other.due;
        self.running += other.running;
        self.stale += other.stale;
        self.retrying += other.retrying;
        self.scheduled += other.scheduled;
        self.dead += other.dead;
        self.delivered += other.delivered;
        self.oldest_pending_age = self.oldest_pending_age.max(other.oldest_pending_age);
        self.held_keys += other.held_keys;
        self.oldest_held_age = self.oldest_held_age.max(other.oldest_held_age);
    }
}

impl Serialize for DeliveryCounts {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut counts = serializer.serialize_struct("DeliveryCounts", 11)?;
        counts.serialize_field("due", &self.due)?;
        counts.serialize_field("running", &self.running)?;
        counts.serialize_field("stale", &self.stale)?;
        counts.serialize_field("retrying", &self.retrying)?;
        counts.serialize_field("scheduled", &self.scheduled)?;
        counts.serialize_field("dead", &self.dead)?;
        counts.serialize_field("delivered", &self.delivered)?;
        counts.serialize_field("pending", &self.pending())?;
        let age = self.oldest_pending_age.map(|age| age.as_secs_f64());
        counts.serialize_field("oldest_pending_age_seconds", &age)?;
        counts.serialize_field("held_keys", &self.held_keys)?;
        let held = self.oldest_held_age.map(|age| age.as_secs_f64());
        counts.serialize_field("oldest_held_age_seconds", &held)?;
        counts.end()
    }
}

/// A snapshot of the bus's tables, from [`EventBus::stats`](crate::EventBus::stats).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// Every listener's deliveries together.
    pub total: DeliveryCounts,
    /// Per listener id: every listener of this bus (with zeros when it has nothing; deliveries
    /// stored under one of its aliases count for it), and every other listener that has
    /// deliveries in the table.
    pub listeners: BTreeMap<String, DeliveryCounts>,
    /// Pending deliveries per listener id that this bus does not have (nor as an alias): they
    /// wait for an instance that has the listener, and expire as `no_listener` otherwise.
    pub orphans: BTreeMap<String, u64>,
    /// Pending deliveries per listener id of this bus stored by a newer version of the event's
    /// type than its listener knows (a rolling deploy): they wait for an instance that knows
    /// the version, and expire as `unknown_version` otherwise.
    pub unknown_versions: BTreeMap<String, u64>,
    /// Received message ids kept for deduplication (`txbus_inbox`).
    pub inbox_ids: u64,
    /// Messages kept by the [`InboxStore`](crate::InboxStore) (`txbus_inbox_messages`).
    pub inbox_messages: u64,
}

/// Reads the tables' statistics, attributing deliveries to the listeners of `registry`.
pub(crate) async fn read<B: Backend>(pool: &Pool<B>, registry: &Registry) -> Result<Stats, Error> {
    let rows = {
        let mut conn = pool.get().await?;
        B::stats(&mut conn).await?
    };
    let mut stats = Stats {
        inbox_ids: u64::try_from(rows.inbox_ids).unwrap_or(0),
        inbox_messages: u64::try_from(rows.inbox_messages).unwrap_or(0),
        ..Stats::default()
    };
    for id in registry.ids() {
        stats
            .listeners
            .insert(id.to_owned(), DeliveryCounts::default());
    }
    for row in &rows.listeners {
        let counts = DeliveryCounts::from_row(row, rows.now_us);
        stats.total.add(&counts);
        // Deliveries stored under an alias count for the listener that runs them.
        let listener = match registry.get(&row.listener) {
            Some(def) => {
                if row.event_version > def.version && counts.pending() > 0 {
                    *stats.unknown_versions.entry(def.id.to_owned()).or_default() +=
                        counts.pending();
                }
                def.id.to_owned()
            }
            None => {
                if counts.pending() > 0 {
                    *stats.orphans.entry(row.listener.clone()).or_default() += counts.pending();
                }
                row.listener.clone()
            }
        };
        stats.listeners.entry(listener).or_default().add(&counts);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_take_the_oldest_age() {
        let mut total = DeliveryCounts::default();
        total.add(&DeliveryCounts {
            due: 1,
            oldest_pending_age: Some(Duration::from_secs(5)),
            ..DeliveryCounts::default()
        });
        total.add(&DeliveryCounts {
            retrying: 2,
            dead: 3,
            oldest_pending_age: Some(Duration::from_secs(9)),
            ..DeliveryCounts::default()
        });
        assert_eq!(total.pending(), 3);
        assert_eq!(total.dead, 3);
        assert_eq!(total.oldest_pending_age, Some(Duration::from_secs(9)));
    }

    #[test]
    fn counts_serialize_with_the_age_in_seconds() {
        let counts = DeliveryCounts {
            due: 2,
            retrying: 1,
            dead: 4,
            oldest_pending_age: Some(Duration::from_millis(1500)),
            ..DeliveryCounts::default()
        };
        let json = serde_json::to_value(counts).unwrap();
        assert_eq!(json["due"], 2);
        assert_eq!(json["pending"], 3);
        assert_eq!(json["dead"], 4);
        assert_eq!(json["oldest_pending_age_seconds"], 1.5);
        assert_eq!(json["held_keys"], 0);
        assert_eq!(json["oldest_held_age_seconds"], serde_json::Value::Null);
    }
}
