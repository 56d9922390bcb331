//! Operating the bus: statistics, dead letters and their replay, retention, stale leases.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;

use crate::bus::Shared;
use crate::store::{
    DeadFilter, DeadRow, DeliveryRef, ListenerRow, attempt_u32, system_time_from_micros,
};
use crate::{Backend, Error, EventBus, EventId};

/// How many rows one statement of a purge, a replay or a retention round touches at most.
pub(crate) const BATCH: usize = 1000;

/// How many statements of each kind one retention round runs at most, so that the poller gets
/// back to claiming; what is left goes in the next round.
pub(crate) const MAX_BATCHES: usize = 10;

/// The default number of dead letters [`EventBus::dead_letters`] returns.
const DEFAULT_LIMIT: usize = 100;

/// Why a delivery became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadReason {
    /// Its next attempt would have come after the event's
    /// [`expires_after`](crate::EventSettings::expires_after).
    Expired,
    /// It failed [`max_attempts`](crate::EventSettings::max_attempts) times.
    MaxAttempts,
    /// The listener returned [`ListenerError::abort`](crate::ListenerError::abort).
    Aborted,
    /// It expired while no running instance had its listener.
    NoListener,
}

impl DeadReason {
    /// The code stored in `txbus_deliveries.dead_reason`: `expired`, `max_attempts`, `aborted`
    /// or `no_listener`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::MaxAttempts => "max_attempts",
            Self::Aborted => "aborted",
            Self::NoListener => "no_listener",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeadReason {
    type Err = Error;

    fn from_str(code: &str) -> Result<Self, Error> {
        Ok(match code {
            "expired" => Self::Expired,
            "max_attempts" => Self::MaxAttempts,
            "aborted" => Self::Aborted,
            "no_listener" => Self::NoListener,
            other => {
                return Err(Error::Invalid(format!(
                    "unknown dead letter reason `{other}` (expected expired, max_attempts, \
                     aborted or no_listener; was it written by a newer txbus?)"
                )));
            }
        })
    }
}

/// Deliveries by state: of one listener, or of all.
///
/// A pending delivery is in exactly one of four states: `due` (may run now), `running` (leased
/// to a run whose lease holds), `stale` (leased, but the lease passed without a result: its
/// process died or lost the database; it runs again when claimed) and `retrying` (failed,
/// waiting for its retry time).
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
    /// Dead letters.
    pub dead: u64,
    /// Succeeded and kept for [`retain_delivered`](crate::EventBusBuilder::retain_delivered).
    pub delivered: u64,
    /// How long ago the oldest pending delivery's event was emitted, by the database's clock.
    pub oldest_pending_age: Option<Duration>,
}

impl DeliveryCounts {
    /// Deliveries not finished: due, running, stale and retrying.
    pub fn pending(&self) -> u64 {
        self.due + self.running + self.stale + self.retrying
    }

    fn from_row(row: &ListenerRow, now_us: i64) -> Self {
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        Self {
            due: count(row.due),
            running: count(row.running),
            stale: count(row.stale),
            retrying: count(row.retrying),
            dead: count(row.dead),
            delivered: count(row.delivered),
            oldest_pending_age: row.oldest_pending_us.map(|oldest| {
                Duration::from_micros(u64::try_from(now_us.saturating_sub(oldest)).unwrap_or(0))
            }),
        }
    }

    fn add(&mut self, other: &Self) {
        self.due += other.due;
        self.running += other.running;
        self.stale += other.stale;
        self.retrying += other.retrying;
        self.dead += other.dead;
        self.delivered += other.delivered;
        self.oldest_pending_age = self.oldest_pending_age.max(other.oldest_pending_age);
    }
}

/// A snapshot of the bus's tables, from [`EventBus::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    /// Received message ids kept for deduplication (`txbus_inbox`).
    pub inbox_ids: u64,
    /// Messages kept by the [`InboxStore`](crate::InboxStore) (`txbus_inbox_messages`).
    pub inbox_messages: u64,
}

/// Which dead letters to list ([`EventBus::dead_letters`]) or replay
/// ([`EventBus::replay_dead`]): every condition given must hold.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use txbus::DeadLetterQuery;
///
/// let query = DeadLetterQuery::new()
///     .listener("billing::charge_card")
///     .died_after(SystemTime::now() - Duration::from_secs(3600))
///     .limit(20);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterQuery {
    event_id: Option<EventId>,
    listener: Option<String>,
    event_name: Option<String>,
    died_after: Option<SystemTime>,
    died_before: Option<SystemTime>,
    limit: Option<usize>,
}

impl DeadLetterQuery {
    /// Every dead letter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only those of this event.
    pub fn event(mut self, id: EventId) -> Self {
        self.event_id = Some(id);
        self
    }

    /// Only those of this listener id.
    pub fn listener(mut self, id: impl Into<String>) -> Self {
        self.listener = Some(id.into());
        self
    }

    /// Only those of events with this name ([`Event::NAME`](crate::Event::NAME)).
    pub fn event_name(mut self, name: impl Into<String>) -> Self {
        self.event_name = Some(name.into());
        self
    }

    /// Only those that died at or after `time`.
    pub fn died_after(mut self, time: SystemTime) -> Self {
        self.died_after = Some(time);
        self
    }

    /// Only those that died before `time`.
    pub fn died_before(mut self, time: SystemTime) -> Self {
        self.died_before = Some(time);
        self
    }

    /// At most this many. Default: 100 for [`EventBus::dead_letters`], every match for
    /// [`EventBus::replay_dead`].
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    fn filter(&self) -> DeadFilter<'_> {
        DeadFilter {
            event_id: self.event_id.map(EventId::get),
            listener: self.listener.as_deref(),
            event_name: self.event_name.as_deref(),
            died_after_us: self.died_after.map(micros_since_epoch),
            died_before_us: self.died_before.map(micros_since_epoch),
        }
    }
}

/// A delivery that gave up, from [`EventBus::dead_letters`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The event.
    pub event_id: EventId,
    /// The event's name.
    pub event_name: String,
    /// The listener's id.
    pub listener: String,
    /// Runs started.
    pub attempts: u32,
    /// Why it gave up.
    pub reason: DeadReason,
    /// The error of its last failed run, if it had one.
    pub last_error: Option<String>,
    /// When the event was emitted.
    pub emitted_at: SystemTime,
    /// When it became a dead letter.
    pub died_at: SystemTime,
    /// The event, as JSON.
    pub payload: String,
}

impl DeadLetter {
    /// The event, deserialized.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.payload)
    }

    fn from_row(row: DeadRow) -> Result<Self, Error> {
        Ok(Self {
            event_id: EventId::new(row.event_id),
            event_name: row.event_name,
            listener: row.listener,
            attempts: attempt_u32(row.attempts),
            reason: row.reason.parse()?,
            last_error: row.last_error,
            emitted_at: system_time_from_micros(row.emitted_at_us),
            died_at: system_time_from_micros(row.dead_at_us),
            payload: row.payload,
        })
    }
}

/// Reads the tables' statistics ([`EventBus::stats`]).
pub(crate) async fn stats<B: Backend>(shared: &Shared<B>) -> Result<Stats, Error> {
    let rows = {
        let mut conn = shared.pool.get().await?;
        B::stats(&mut conn).await?
    };
    let registry = &shared.registry;
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
            Some(def) => def.id.to_owned(),
            None => {
                if counts.pending() > 0 {
                    stats.orphans.insert(row.listener.clone(), counts.pending());
                }
                row.listener.clone()
            }
        };
        stats.listeners.entry(listener).or_default().add(&counts);
    }
    Ok(stats)
}

/// Microseconds since the Unix epoch (negative before it).
fn micros_since_epoch(time: SystemTime) -> i64 {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |us| -us),
    }
}

impl<B: Backend> EventBus<B> {
    /// Counts the deliveries by state, per listener and in total, in one statement.
    ///
    /// Its cost grows with the rows of `txbus_deliveries`: the pending ones, the dead letters
    /// kept for [`retain_dead`](crate::EventBusBuilder::retain_dead) and the delivered ones kept
    /// for [`retain_delivered`](crate::EventBusBuilder::retain_delivered); the inbox's counts
    /// read its tables too. BENCHMARKS.md has the time it takes per size.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = std::env::temp_dir().join(format!("txbus-doc-stats-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// # let pool = txbus::Pool::<txbus::Sqlite>::connect(dir.join("app.db").to_str().unwrap()).await?;
    /// # let bus = txbus::EventBus::builder(pool).build().await?;
    /// let stats = bus.stats().await?;
    /// println!("{} pending, {} dead", stats.total.pending(), stats.total.dead);
    /// for (listener, counts) in &stats.listeners {
    ///     if let Some(age) = counts.oldest_pending_age {
    ///         println!("{listener}: {} pending, oldest {age:?}", counts.pending());
    ///     }
    /// }
    /// # bus.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn stats(&self) -> impl Future<Output = Result<Stats, Error>> + Send + '_ {
        stats(&self.shared)
    }

    /// The dead letters that match `query`, newest first: at most its
    /// [`limit`](DeadLetterQuery::limit), 100 by default.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = std::env::temp_dir().join(format!("txbus-doc-dead-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// # let pool = txbus::Pool::<txbus::Sqlite>::connect(dir.join("app.db").to_str().unwrap()).await?;
    /// # let bus = txbus::EventBus::builder(pool).build().await?;
    /// use txbus::{DeadLetterQuery, DeadReason};
    ///
    /// for dead in bus.dead_letters(DeadLetterQuery::new().event_name("order.placed")).await? {
    ///     println!("{} {} {}: {:?}", dead.event_id, dead.listener, dead.reason, dead.last_error);
    ///     if dead.reason == DeadReason::Aborted {
    ///         // fix the cause, then:
    ///         bus.replay(dead.event_id, &dead.listener).await?;
    ///     }
    /// }
    /// # bus.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn dead_letters<'a>(
        &'a self,
        query: DeadLetterQuery,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, Error>> + Send + 'a {
        async move {
            let rows = {
                let mut conn = self.shared.pool.get().await?;
                B::dead_letters(
                    &mut conn,
                    &query.filter(),
                    query.limit.unwrap_or(DEFAULT_LIMIT),
                )
                .await?
            };
            rows.into_iter().map(DeadLetter::from_row).collect()
        }
    }

    /// Makes the dead letter of `event` for `listener` pending again: due at once, expiring
    /// after the same time as when it was emitted, counted from now. Returns whether there was
    /// such a dead letter.
    ///
    /// The delivery keeps its attempt count (the attempt number is what keeps a result of an
    /// older run from being recorded), so its next retries continue its backoff, and with
    /// [`max_attempts`](crate::EventSettings::max_attempts) one more failure makes it dead again.
    pub fn replay<'a>(
        &'a self,
        event: EventId,
        listener: &'a str,
    ) -> impl Future<Output = Result<bool, Error>> + Send + 'a {
        async move {
            let filter = DeadFilter {
                event_id: Some(event.get()),
                listener: Some(listener),
                ..DeadFilter::default()
            };
            let replayed = {
                let (_turn, mut conn) = self.shared.pool.get_for_write().await?;
                B::replay(&mut conn, &filter, &DeliveryRef::first(), 1).await?
            };
            self.shared.poll_now.notify_one();
            Ok(!replayed.is_empty())
        }
    }

    /// Replays every dead letter that matches `query` (up to its
    /// [`limit`](DeadLetterQuery::limit), if it has one) as [`replay`](Self::replay) does, in
    /// batches of 1,000. Returns how many. A delivery that dies again while this runs is not
    /// replayed twice.
    pub fn replay_dead(
        &self,
        query: DeadLetterQuery,
    ) -> impl Future<Output = Result<u64, Error>> + Send + '_ {
        async move {
            let filter = query.filter();
            let mut left = query.limit.unwrap_or(usize::MAX);
            let mut after = DeliveryRef::first();
            let mut total = 0_u64;
            while left > 0 {
                let batch = left.min(BATCH);
                let replayed = {
                    let (_turn, mut conn) = self.shared.pool.get_for_write().await?;
                    B::replay(&mut conn, &filter, &after, batch).await?
                };
                let count = replayed.len();
                total += count as u64;
                left -= count.min(left);
                match replayed.into_iter().max() {
                    Some(last) if count >= batch => after = last,
                    _ => break,
                }
            }
            if total > 0 {
                self.shared.poll_now.notify_one();
            }
            Ok(total)
        }
    }

    /// Deletes the dead letters that died more than `older_than` ago, in batches of 1,000.
    /// Returns how many. (The poller does this by itself after
    /// [`retain_dead`](crate::EventBusBuilder::retain_dead).)
    pub fn purge_dead(
        &self,
        older_than: Duration,
    ) -> impl Future<Output = Result<u64, Error>> + Send + '_ {
        async move {
            let mut total = 0_u64;
            loop {
                let deleted = {
                    let (_turn, mut conn) = self.shared.pool.get_for_write().await?;
                    B::purge_dead(
                        &mut conn,
                        older_than.min(crate::settings::MAX_DURATION),
                        BATCH,
                    )
                    .await?
                };
                total += deleted as u64;
                if deleted < BATCH {
                    return Ok(total);
                }
            }
        }
    }

    /// Makes the deliveries whose lease has passed without a result (`stale` in
    /// [`stats`](Self::stats): their process died, hung or lost the database) due at once and
    /// wakes the poller. They would be claimed again anyway; this shows them as due and starts
    /// them sooner. Returns how many.
    pub fn release_stale(&self) -> impl Future<Output = Result<u64, Error>> + Send + '_ {
        async move {
            let released = {
                let (_turn, mut conn) = self.shared.pool.get_for_write().await?;
                B::release_stale(&mut conn).await?
            };
            if released > 0 {
                self.shared.poll_now.notify_one();
            }
            Ok(released as u64)
        }
    }

    /// Runs one retention round now, as the poller does every few polls: deletes deliveries
    /// delivered longer ago than [`retain_delivered`](crate::EventBusBuilder::retain_delivered)
    /// and dead letters older than [`retain_dead`](crate::EventBusBuilder::retain_dead), in
    /// bounded batches. Returns the rows deleted, or `None` when another instance was running a
    /// round (only one runs at a time).
    pub fn cleanup(&self) -> impl Future<Output = Result<Option<u64>, Error>> + Send + '_ {
        async move {
            Ok(crate::poller::cleanup(&self.shared)
                .await?
                .map(|n| n as u64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip() {
        for reason in [
            DeadReason::Expired,
            DeadReason::MaxAttempts,
            DeadReason::Aborted,
            DeadReason::NoListener,
        ] {
            assert_eq!(reason.as_str().parse::<DeadReason>().unwrap(), reason);
        }
        assert!("exploded".parse::<DeadReason>().is_err());
    }

    #[test]
    fn times_before_and_after_the_epoch() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_500);
        assert_eq!(micros_since_epoch(t), 1_500);
        let t = SystemTime::UNIX_EPOCH - Duration::from_micros(2_000);
        assert_eq!(micros_since_epoch(t), -2_000);
        assert_eq!(system_time_from_micros(micros_since_epoch(t)), t);
    }

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
}
