//! Scheduled events and cancellation: `emit_after`, `emit_at`, `cancel`, on the bus and in a
//! transaction.
//!
//! A scheduled event is stored like any other, in the same statement shapes, with deliveries
//! that are not leased to the emitter: `attempts` 0 and `available_at` the due time. The poller
//! claims them when they fall due, so everything that counts from a claim (attempts, backoff,
//! leases) counts from the due time, and so does the expiry, `expires_after` past it.

use std::future::Future;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::bus::EventBus;
use crate::engine::Prepared;
use crate::error::Error;
use crate::event::{Event, EventId};
use crate::settings::MAX_DURATION;
use crate::store::{Backend, Operation, ScheduledRow, system_time_from_micros};
use crate::transaction::Transaction;

/// A delivery of a scheduled event that is not due yet, from [`EventBus::scheduled`]. In JSON
/// (serde) its times are RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ScheduledDelivery {
    /// The event.
    pub event_id: EventId,
    /// The event's name.
    pub event_name: String,
    /// The listener's id.
    pub listener: String,
    /// When it falls due, by the database's clock.
    #[serde(serialize_with = "crate::admin::time")]
    pub due_at: SystemTime,
    /// When the event was emitted.
    #[serde(serialize_with = "crate::admin::time")]
    pub emitted_at: SystemTime,
}

impl From<ScheduledRow> for ScheduledDelivery {
    fn from(row: ScheduledRow) -> Self {
        Self {
            event_id: EventId::new(row.event_id),
            event_name: row.event_name,
            listener: row.listener,
            due_at: system_time_from_micros(row.due_at_us),
            emitted_at: system_time_from_micros(row.emitted_at_us),
        }
    }
}

/// Marks `prepared` as due `delay` after its emit; a zero delay leaves it an ordinary event.
fn schedule(prepared: Result<Prepared, Error>, delay: Duration) -> Result<Prepared, Error> {
    let mut prepared = prepared?;
    if delay > MAX_DURATION {
        return Err(Error::Invalid(format!(
            "an event can be scheduled at most 100 years ahead, not {}; nothing was written",
            humantime::format_duration(delay)
        )));
    }
    if !delay.is_zero() {
        prepared.new.due_in = Some(delay);
        prepared.new.lease_head = false;
    }
    Ok(prepared)
}

/// The delay until `at` by this process's clock, `ahead` of the system's (the test kit's
/// [`advance`](EventBus::advance)); zero for a time in the past.
fn delay_until(at: SystemTime, ahead: Duration) -> Duration {
    at.duration_since(SystemTime::now() + ahead)
        .unwrap_or_default()
}

impl<B: Backend> EventBus<B> {
    /// Like [`emit`](Self::emit), but the event's listeners first run `delay` after the
    /// commit, by the database's clock. The event commits with `ops` like any other (and not
    /// at all if one fails); until it is due it waits in the table, survives restarts, and can
    /// be [`cancel`](Self::cancel)led. Once due, the poller claims it (woken at the due time
    /// when this process emitted it, at its next poll otherwise).
    ///
    /// Everything that counts from a run counts from the due time: attempts, the retry delay
    /// and its backoff, and the expiry (`expires_after` past the due time). A zero delay is an
    /// ordinary emit. A delay over 100 years is refused with [`Error::Invalid`], and nothing is
    /// written.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
    /// # struct PaymentTimeout { order_id: i64 }
    /// # async fn run(bus: txbus::EventBus<txbus::Sqlite>) -> Result<(), txbus::Error> {
    /// let timeout = bus
    ///     .emit_after(Duration::from_secs(1800), PaymentTimeout { order_id: 7 }, [])
    ///     .await?;
    /// // ... the order is paid in time:
    /// assert_eq!(bus.cancel(timeout).await?, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn emit_after<'a, E: Event>(
        &'a self,
        delay: Duration,
        event: E,
        ops: impl IntoIterator<Item = Operation<'a, B>>,
    ) -> impl Future<Output = Result<EventId, Error>> + Send + 'a {
        let prepared = schedule(self.engine.prepare(&event), delay);
        self.write(E::NAME, prepared, ops.into_iter().collect())
    }

    /// Like [`emit_after`](Self::emit_after), due at the wall-clock time `at`: the delay is
    /// `at` minus this process's clock now, and it then passes on the database's clock. So the
    /// application's clock matters: if it is a minute fast, the event runs a minute early. A
    /// time in the past means now (an ordinary emit).
    pub fn emit_at<'a, E: Event>(
        &'a self,
        at: SystemTime,
        event: E,
        ops: impl IntoIterator<Item = Operation<'a, B>>,
    ) -> impl Future<Output = Result<EventId, Error>> + Send + 'a {
        self.emit_after(delay_until(at, self.engine.pool.clock_offset()), event, ops)
    }

    /// The deliveries of scheduled events that are not due yet, soonest due first: at most
    /// `limit`. (A delivery that failed and waits for its retry is not listed.)
    pub fn scheduled(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<ScheduledDelivery>, Error>> + Send + '_ {
        async move {
            let mut conn = self.engine.pool.get().await?;
            let rows = B::scheduled(&mut conn, limit).await?;
            Ok(rows.into_iter().map(ScheduledDelivery::from).collect())
        }
    }

    /// Cancels event `id`: deletes its deliveries that have not started and not finished, and
    /// returns how many. A delivery running at that moment is not touched: it finishes, and its
    /// result is recorded as usual (a failure is then retried). Dead letters and deliveries kept
    /// after success are not touched either. An unknown id, or one already cancelled, returns 0.
    ///
    /// Meant for scheduled events, but it works for any: an ordinary event's delivery that
    /// waits for a retry is cancelled too.
    pub fn cancel(&self, id: EventId) -> impl Future<Output = Result<u64, Error>> + Send + '_ {
        async move {
            let cancelled = {
                let (_turn, mut conn) = self.engine.pool.get_for_write().await?;
                B::cancel(&mut conn, id).await?
            };
            if cancelled > 0 {
                // A cancelled head of an ordering key: what waited behind it is due now.
                self.engine.poll_now.notify_one();
            }
            Ok(cancelled)
        }
    }
}

impl<'c, B: Backend> Transaction<'c, B> {
    /// Like [`emit`](Self::emit), but the event's listeners first run `delay` after the
    /// commit, by the database's clock (see [`EventBus::emit_after`]). Rolled back with the
    /// transaction.
    pub fn emit_after<E: Event>(
        &mut self,
        delay: Duration,
        event: &E,
    ) -> impl Future<Output = Result<EventId, Error>> + Send + use<'_, 'c, B, E> {
        let prepared = schedule(self.engine.prepare(event), delay);
        async move { self.add(prepared?).await }
    }

    /// Like [`emit_after`](Self::emit_after), due at the wall-clock time `at` (see
    /// [`EventBus::emit_at`]).
    pub fn emit_at<E: Event>(
        &mut self,
        at: SystemTime,
        event: &E,
    ) -> impl Future<Output = Result<EventId, Error>> + Send + use<'_, 'c, B, E> {
        let ahead = self.engine.pool.clock_offset();
        self.emit_after(delay_until(at, ahead), event)
    }

    /// Cancels event `id` in this transaction (see [`EventBus::cancel`]): the deliveries are
    /// deleted at once for this transaction, and for everyone at the commit; a rollback brings
    /// them back. Returns how many. An event emitted earlier in this same transaction is
    /// dropped from it: none of its deliveries is written, and the count is its listeners.
    pub fn cancel(&mut self, id: EventId) -> impl Future<Output = Result<u64, Error>> + Send + '_ {
        async move {
            if let Some(at) = self.written.iter().position(|w| w.inserted.id == id) {
                let dropped = self.written.remove(at);
                return Ok(u64::try_from(dropped.prepared.listeners.len()).unwrap_or(u64::MAX));
            }
            Ok(B::cancel(self.conn, id).await?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_in_the_past_is_now() {
        assert_eq!(
            delay_until(SystemTime::UNIX_EPOCH, Duration::ZERO),
            Duration::ZERO
        );
        let ahead = delay_until(SystemTime::now() + Duration::from_secs(60), Duration::ZERO);
        assert!(ahead > Duration::from_secs(50) && ahead <= Duration::from_secs(60));
        // A clock moved ahead by the test kit counts from its time.
        let moved = delay_until(
            SystemTime::now() + Duration::from_secs(60),
            Duration::from_secs(30),
        );
        assert!(moved > Duration::from_secs(20) && moved <= Duration::from_secs(30));
    }
}
