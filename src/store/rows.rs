//! The rows the store's statements return, read alike on every backend (each statement names
//! its columns as the fields), and their conversions into what the engine uses.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::event::EventId;

/// Defines row structs that every [`SqlDb`] reads by column name.
macro_rules! rows {
    ($(
        $(#[$meta:meta])*
        $vis:vis struct $name:ident { $($(#[$field_meta:meta])* $field:ident: $ty:ty),* $(,)? }
    )*) => {$(
        $(#[$meta])*
        $vis struct $name { $($(#[$field_meta])* pub(crate) $field: $ty),* }

        impl<DB: $crate::store::sql::SqlDb> diesel::QueryableByName<DB> for $name {
            fn build<'a>(
                row: &impl diesel::row::NamedRow<'a, DB>,
            ) -> diesel::deserialize::Result<Self> {
                Ok(Self { $($field: $crate::store::sql::Column::read(row, stringify!($field))?),* })
            }
        }
    )*};
}
pub(crate) use rows;

rows! {
    /// A count, as column `n`.
    pub(crate) struct Count { n: i64 }

    /// A count per listener.
    pub struct ListenerCount { listener: String, n: i64 }

    /// A lock's result: 1 when taken (`NULL` or 0 otherwise).
    pub(crate) struct Lock { n: Option<i64> }

    /// How long until something is due, in microseconds (`NULL`: nothing is waiting).
    pub(crate) struct NextDue { us: Option<i64> }

    /// An applied migration.
    pub(crate) struct Version { version: String }

    /// A listener and an ordering key.
    pub(crate) struct KeyRow { listener: String, ordering_key: String }

    /// A delivery's key: its event and listener.
    #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
    pub struct DeliveryRef { event_id: i64, listener: String }

    /// A delivery a claim leased (or found expired and made dead, or parked behind its key).
    pub(crate) struct ClaimedRow {
        event_id: i64,
        listener: String,
        attempts: i32,
        payload: String,
        emitted_at_us: i64,
        lease_ms: i64,
        expired: bool,
        event_version: i32,
        ordering_key: Option<String>,
        parked: bool,
        trace_context: Option<String>,
        held: bool,
    }

    /// A delivery a result write changed, and its reason when it died.
    pub(crate) struct DiedRow { event_id: i64, listener: String, dead_reason: Option<String> }
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
rows! {
    /// An event's id and emit time, as an insert returns them.
    pub(crate) struct InsertedRow { id: i64, emitted_at_us: i64 }
}

impl DeliveryRef {
    /// Before every key.
    pub(crate) fn first() -> Self {
        Self {
            event_id: i64::MIN,
            listener: String::new(),
        }
    }
}

/// Converts whole microseconds since the Unix epoch to a `SystemTime`.
pub(crate) fn system_time_from_micros(us: i64) -> SystemTime {
    let magnitude = Duration::from_micros(us.unsigned_abs());
    if us >= 0 {
        SystemTime::UNIX_EPOCH + magnitude
    } else {
        SystemTime::UNIX_EPOCH - magnitude
    }
}

/// Microseconds since the Unix epoch (negative before it).
pub(crate) fn micros_since_epoch(time: SystemTime) -> i64 {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |us| -us),
    }
}

/// A duration in whole microseconds, for binding; settings are validated to fit.
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Whole milliseconds, at least one, for the `lease_ms` column.
pub(crate) fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// A row limit, for binding.
pub(crate) fn limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// The attempt number as the database stores it.
pub(crate) fn attempt_i32(attempt: u32) -> i32 {
    i32::try_from(attempt).unwrap_or(i32::MAX)
}

/// An attempt number read back from the database.
pub(crate) fn attempt_u32(attempt: i32) -> u32 {
    u32::try_from(attempt).unwrap_or(0)
}

/// The event id and emit time of the first row an insert returned.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) fn inserted<R: Into<crate::store::Inserted>>(
    rows: Vec<R>,
) -> diesel::QueryResult<crate::store::Inserted> {
    let row = rows
        .into_iter()
        .next()
        .ok_or(diesel::result::Error::NotFound)?;
    Ok(row.into())
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
impl From<InsertedRow> for crate::store::Inserted {
    fn from(row: InsertedRow) -> Self {
        Self {
            id: EventId::new(row.id),
            emitted_at: system_time_from_micros(row.emitted_at_us),
            head: false,
        }
    }
}

impl From<ClaimedRow> for crate::store::Claimed {
    fn from(row: ClaimedRow) -> Self {
        Self {
            event_id: EventId::new(row.event_id),
            listener: row.listener,
            attempt: attempt_u32(row.attempts),
            payload: row.payload.into(),
            emitted_at: system_time_from_micros(row.emitted_at_us),
            lease: Duration::from_millis(u64::try_from(row.lease_ms).unwrap_or(0)),
            expired: row.expired,
            version: u32::try_from(row.event_version).unwrap_or(1),
            ordering_key: row.ordering_key,
            parked: row.parked,
            held: row.held,
            trace: row.trace_context.map(Arc::from),
        }
    }
}

impl DiedRow {
    /// The dead letter this row reports, if the write made one.
    pub(crate) fn died(self) -> Option<crate::store::Died> {
        Some(crate::store::Died {
            event_id: EventId::new(self.event_id),
            listener: self.listener,
            reason: self.dead_reason?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_before_and_after_the_epoch() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_500);
        assert_eq!(micros_since_epoch(t), 1_500);
        let t = SystemTime::UNIX_EPOCH - Duration::from_micros(2_000);
        assert_eq!(micros_since_epoch(t), -2_000);
        assert_eq!(system_time_from_micros(micros_since_epoch(t)), t);
    }

    #[test]
    fn leases_are_whole_milliseconds_of_at_least_one() {
        assert_eq!(lease_ms(Duration::from_micros(10)), 1);
        assert_eq!(lease_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(attempt_u32(-1), 0);
        assert_eq!(attempt_i32(u32::MAX), i32::MAX);
    }
}
