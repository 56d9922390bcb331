//! The test kit's clock (feature `testing`): [`EventBus::advance`](crate::EventBus::advance)
//! moves one bus's notion of the database's time, and nothing else's.
//!
//! Every time-based decision of the bus is made in its SQL, on the database's clock: due times,
//! leases, expiry, retention. So the offset lives in the statements. Once a bus of the process
//! has moved its clock, [`sql`] writes each clock call of a statement text (`now()`,
//! `statement_timestamp()`, `UTC_TIMESTAMP(6)`, `unixepoch('subsec')`) as that call plus the
//! connection's offset, read from a session setting (PostgreSQL), a user variable (MySQL) or a
//! function (SQLite), zero until set. A pool carries its bus's offset, and from then on every
//! checkout from any pool sets the connection's offset to its pool's: a connection that served
//! an advanced bus does not carry that time to another bus or to the application.
//!
//! Until a clock moves, the statements are sent as written, and a checkout sets nothing. Without
//! the feature none of this is compiled.
//!
//! [`sql`]: crate::store::sql

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Each clock call, and what it is written as: the call plus the offset, in the call's unit.
const CLOCK_CALLS: [(&str, &str); 4] = [
    (
        "statement_timestamp()",
        "(statement_timestamp() + COALESCE(NULLIF(current_setting('txbus.clock_offset_us', \
         true), ''), '0')::int8 * interval '1 microsecond')",
    ),
    (
        "now()",
        "(now() + COALESCE(NULLIF(current_setting('txbus.clock_offset_us', true), ''), \
         '0')::int8 * interval '1 microsecond')",
    ),
    (
        "UTC_TIMESTAMP(6)",
        "(UTC_TIMESTAMP(6) + INTERVAL COALESCE(@txbus_clock_offset_us, 0) MICROSECOND)",
    ),
    (
        "unixepoch('subsec')",
        "(unixepoch('subsec') + txbus_clock_offset_us() / 1000000.0)",
    ),
];

/// Whether a bus of this process has moved its clock: until then no checkout sets anything.
static MOVED: AtomicBool = AtomicBool::new(false);

/// The statement texts with their clock calls rewritten, made once per text for the process.
static REWRITTEN: Mutex<Option<HashMap<(usize, usize), &'static str>>> = Mutex::new(None);

/// `text` with its clock calls reading the connection's offset, once a bus of the process moved
/// its clock; `text` itself until then. Texts are the store's constants, so each is rewritten
/// once and kept for the process.
pub(crate) fn rewrite(text: &'static str) -> &'static str {
    if !moved() || !CLOCK_CALLS.iter().any(|(call, _)| text.contains(call)) {
        return text;
    }
    let key = (text.as_ptr() as usize, text.len());
    let mut rewritten = REWRITTEN.lock().unwrap_or_else(PoisonError::into_inner);
    rewritten
        .get_or_insert_with(HashMap::new)
        .entry(key)
        .or_insert_with(|| Box::leak(with_offsets(text).into_boxed_str()))
}

/// `text` with every clock call replaced by its form with the offset, in one pass, so that no
/// replacement is rewritten again.
fn with_offsets(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    let mut rest = text;
    'scan: while !rest.is_empty() {
        for (call, shifted) in CLOCK_CALLS {
            let word_start = out
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
            if word_start && rest.starts_with(call) {
                out.push_str(shifted);
                rest = &rest[call.len()..];
                continue 'scan;
            }
        }
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}

/// A bus's offset from the database's clock, shared by the clones of its pool.
#[derive(Debug, Clone, Default)]
pub(crate) struct Clock(Arc<AtomicI64>);

impl Clock {
    /// The offset, in microseconds.
    pub(crate) fn offset_us(&self) -> i64 {
        self.0.load(Ordering::Acquire)
    }

    /// The offset.
    pub(crate) fn offset(&self) -> Duration {
        Duration::from_micros(self.offset_us().unsigned_abs())
    }

    /// Moves the clock forward by `by` (saturating at about 292,000 years).
    pub(crate) fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        MOVED.store(true, Ordering::Release);
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |offset| {
                Some(offset.saturating_add(by))
            });
    }
}

/// Whether checkouts must set the connection's offset: once any bus moved its clock.
pub(crate) fn moved() -> bool {
    MOVED.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::with_offsets;

    #[test]
    fn clock_calls_read_the_offset_and_nothing_else_changes() {
        let pg = with_offsets("SET a = now(), b = statement_timestamp() - $1, c = my_now()");
        assert_eq!(
            pg.matches("current_setting('txbus.clock_offset_us', true)")
                .count(),
            2
        );
        assert!(pg.starts_with("SET a = (now() + COALESCE("));
        assert!(pg.ends_with(", c = my_now()"), "{pg}");
        let mysql = with_offsets("WHERE available_at <= UTC_TIMESTAMP(6)");
        assert_eq!(
            mysql,
            "WHERE available_at <= (UTC_TIMESTAMP(6) + INTERVAL COALESCE(@txbus_clock_offset_us, \
             0) MICROSECOND)"
        );
        let sqlite = with_offsets("CAST(unixepoch('subsec') * 1000 AS INTEGER)");
        assert_eq!(
            sqlite,
            "CAST((unixepoch('subsec') + txbus_clock_offset_us() / 1000000.0) * 1000 AS INTEGER)"
        );
        assert_eq!(with_offsets("SELECT 1"), "SELECT 1");
    }
}
