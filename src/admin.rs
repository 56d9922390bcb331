//! Operating the bus: statistics, dead letters and their replay, retention, stale leases.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Serialize, Serializer};

use crate::bus::EventBus;
use crate::delivery::DeadReason;
use crate::engine::BATCH;
use crate::error::Error;
use crate::event::EventId;
use crate::settings::MAX_DURATION;
use crate::stats::{self, Stats};
use crate::store::{
    Backend, DeadFilter, DeadRow, DeliveryRef, attempt_u32, micros_since_epoch,
    system_time_from_micros,
};

/// The default number of dead letters [`EventBus::dead_letters`] returns.
const DEFAULT_LIMIT: usize = 100;

/// Which dead letters to list ([`EventBus::dead_letters`]) or replay
/// ([`EventBus::replay_dead`]): every condition given must hold.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use txbus::{DeadLetterQuery, DeadReason};
///
/// let query = DeadLetterQuery::new()
///     .listener("billing::charge_card")
///     .reason(DeadReason::MaxAttempts)
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
    reason: Option<DeadReason>,
    limit: Option<usize>,
    offset: usize,
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

    /// Only those that died for this reason.
    pub fn reason(mut self, reason: DeadReason) -> Self {
        self.reason = Some(reason);
        self
    }

    /// At most this many. Default: 100 for [`EventBus::dead_letters`], every match for
    /// [`EventBus::replay_dead`].
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Skip the first `offset` matches, newest first: with [`limit`](Self::limit), a page of
    /// [`EventBus::dead_letters`]. Default: 0. [`EventBus::replay_dead`] ignores it and replays
    /// every match (up to the limit).
    ///
    /// ```
    /// use txbus::DeadLetterQuery;
    ///
    /// let third_page = DeadLetterQuery::new().offset(2 * 50).limit(50);
    /// ```
    pub fn offset(mut self, offset: usize) -> Self {
        self.offset = offset;
        self
    }

    fn filter(&self) -> DeadFilter<'_> {
        DeadFilter {
            event_id: self.event_id.map(EventId::get),
            listener: self.listener.as_deref(),
            event_name: self.event_name.as_deref(),
            died_after_us: self.died_after.map(micros_since_epoch),
            died_before_us: self.died_before.map(micros_since_epoch),
            reason: self.reason.map(DeadReason::as_str),
        }
    }
}

/// A delivery that gave up, from [`EventBus::dead_letters`]. In JSON (serde) its times are
/// RFC 3339 and its payload is the event's JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    #[serde(serialize_with = "time")]
    pub emitted_at: SystemTime,
    /// When it became a dead letter.
    #[serde(serialize_with = "time")]
    pub died_at: SystemTime,
    /// The event, as JSON.
    #[serde(serialize_with = "json")]
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
        stats::read(&self.engine.pool, &self.engine.registry)
    }

    /// The dead letters that match `query`, newest first: at most its
    /// [`limit`](DeadLetterQuery::limit), 100 by default, after skipping its
    /// [`offset`](DeadLetterQuery::offset).
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
                let mut conn = self.engine.pool.get().await?;
                B::dead_letters(
                    &mut conn,
                    &query.filter(),
                    query.limit.unwrap_or(DEFAULT_LIMIT),
                    query.offset,
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
                let (_turn, mut conn) = self.engine.pool.get_for_write().await?;
                B::replay(&mut conn, &filter, &DeliveryRef::first(), 1).await?
            };
            self.engine.poll_now.notify_one();
            Ok(!replayed.is_empty())
        }
    }

    /// Replays every dead letter that matches `query` (up to its
    /// [`limit`](DeadLetterQuery::limit), if it has one) as [`replay`](Self::replay) does, in
    /// batches of 1,000. Returns how many. Its [`offset`](DeadLetterQuery::offset) is ignored. A
    /// delivery that dies again while this runs is not replayed twice.
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
                    let (_turn, mut conn) = self.engine.pool.get_for_write().await?;
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
                self.engine.poll_now.notify_one();
            }
            Ok(total)
        }
    }

    /// Deletes the dead letters that died more than `older_than` ago, in batches of 1,000.
    /// Returns how many. (The poller does this by itself after
    /// [`retain_dead`](crate::EventBusBuilder::retain_dead).)
    ///
    /// On PostgreSQL and MySQL, a dead letter that another transaction holds at that moment (a
    /// replay of it, or a claim looking for the head of its ordering key) is skipped rather than
    /// waited for, so that a purge never deadlocks with them: a later call deletes it.
    pub fn purge_dead(
        &self,
        older_than: Duration,
    ) -> impl Future<Output = Result<u64, Error>> + Send + '_ {
        async move {
            let mut total = 0_u64;
            loop {
                let deleted = {
                    let (_turn, mut conn) = self.engine.pool.get_for_write().await?;
                    B::purge_dead(&mut conn, older_than.min(MAX_DURATION), BATCH).await?
                };
                total += deleted as u64;
                if deleted < BATCH {
                    if total > 0 {
                        // A purged dead letter may have held its key (`block_key_on_dead`):
                        // what waited behind it is looked at again.
                        let (_turn, mut conn) = self.engine.pool.get_for_write().await?;
                        B::unpark(&mut conn).await?;
                        self.engine.poll_now.notify_one();
                    }
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
                let (_turn, mut conn) = self.engine.pool.get_for_write().await?;
                B::release_stale(&mut conn, BATCH).await?
            };
            if released > 0 {
                self.engine.poll_now.notify_one();
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
        async move { Ok(self.engine.cleanup().await?.map(|n| n as u64)) }
    }
}

/// `2026-11-25T21:03:04Z`; a time outside 1970 to 9999, which the database writes none in, as
/// seconds since the Unix epoch.
pub(crate) fn rfc3339(time: SystemTime) -> String {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) if since.as_secs() < 253_402_300_800 => {
            humantime::format_rfc3339_seconds(time).to_string()
        }
        _ => format!("{}s since the epoch", micros_since_epoch(time) as f64 / 1e6),
    }
}

pub(crate) fn time<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    rfc3339(*time).serialize(serializer)
}

/// The payload as JSON, not as a string of it (a payload that is not JSON, as a string).
fn json<S: Serializer>(payload: &str, serializer: S) -> Result<S::Ok, S::Error> {
    match serde_json::from_str::<serde_json::Value>(payload) {
        Ok(value) => value.serialize(serializer),
        Err(_) => payload.serialize(serializer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_outside_the_calendar_do_not_panic() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_640_584);
        assert_eq!(rfc3339(t), "2026-11-25T21:03:04Z");
        let before = UNIX_EPOCH - Duration::from_secs(2);
        assert_eq!(rfc3339(before), "-2s since the epoch");
        let after = UNIX_EPOCH + Duration::from_secs(300_000_000_000);
        assert!(rfc3339(after).ends_with("since the epoch"));
    }

    #[test]
    fn dead_letters_serialize_for_scripts() {
        let dead = DeadLetter {
            event_id: EventId::new(7),
            event_name: "order.placed".into(),
            listener: "billing".into(),
            attempts: 3,
            reason: DeadReason::MaxAttempts,
            last_error: None,
            emitted_at: UNIX_EPOCH,
            died_at: UNIX_EPOCH + Duration::from_secs(60),
            payload: r#"{"id":1}"#.into(),
        };
        let json = serde_json::to_value(&dead).unwrap();
        assert_eq!(json["event_id"], 7);
        assert_eq!(json["reason"], "max_attempts");
        assert_eq!(json["died_at"], "1970-01-01T00:01:00Z");
        assert_eq!(json["payload"]["id"], 1);
    }
}
