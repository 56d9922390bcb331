//! Raw SQL that diesel may cache as a prepared statement.
//!
//! `diesel::sql_query` marks every statement as not cacheable, so diesel-async prepares it
//! again at each execution: one more round trip and one more parse per statement. The store's
//! statements are fixed texts, so [`sql`] takes one with placeholders (`$1` or `?1` by number,
//! or plain `?` in order), and writes it back with the placeholders diesel generates for the
//! backend, each bound to its value. Cached per connection by its text.

use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use diesel::QueryResult;
use diesel::backend::{Backend as DieselBackend, DieselReserveSpecialization};
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};

/// A statement with its bound values; see the module docs.
pub(crate) struct Sql<'a, DB: DieselBackend> {
    split: Arc<Split>,
    binds: Vec<Box<dyn Bind<DB> + Send + Sync + 'a>>,
}

/// A statement's text cut at its placeholders.
struct Split {
    /// The text between placeholders: one more than `slots`.
    pieces: Vec<&'static str>,
    /// For each placeholder in the text, which bound value it takes.
    slots: Vec<usize>,
}

thread_local! {
    /// Each statement text is cut once per thread: the texts are the store's constants.
    static SPLITS: RefCell<HashMap<(usize, usize), Arc<Split>>> = RefCell::default();
}

/// Parses `text` into a statement to bind values to, in the order of their numbers.
pub(crate) fn sql<'a, DB: DieselBackend>(text: &'static str) -> Sql<'a, DB> {
    let key = (text.as_ptr() as usize, text.len());
    let split = SPLITS.with_borrow_mut(|splits| {
        splits
            .entry(key)
            .or_insert_with(|| {
                let (pieces, slots) = split(text);
                Arc::new(Split { pieces, slots })
            })
            .clone()
    });
    Sql {
        split,
        binds: Vec::with_capacity(8),
    }
}

impl<'a, DB: DieselBackend> Sql<'a, DB> {
    /// Binds the next value (`$1`, then `$2`, ...).
    pub(crate) fn bind<ST, U>(mut self, value: U) -> Self
    where
        DB: HasSqlType<ST>,
        U: ToSql<ST, DB> + Send + Sync + 'a,
        ST: Send + Sync + 'static,
    {
        self.binds
            .push(Box::new(Typed::<ST, U>(value, PhantomData)));
        self
    }
}

/// Splits SQL at its placeholders, outside quoted text: `$n` and `?n` take value `n`, a plain
/// `?` the value after the previous one.
fn split(text: &'static str) -> (Vec<&'static str>, Vec<usize>) {
    let bytes = text.as_bytes();
    let mut pieces = Vec::new();
    let mut slots = Vec::new();
    let (mut start, mut i, mut next) = (0, 0, 0);
    let mut quoted = false;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'\'' {
            quoted = !quoted;
        } else if !quoted && (c == b'$' || c == b'?') {
            let digits = bytes[i + 1..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            let slot = if digits > 0 {
                text[i + 1..i + 1 + digits]
                    .parse::<usize>()
                    .ok()
                    .map(|n| n.saturating_sub(1))
            } else if c == b'?' {
                Some(next)
            } else {
                None
            };
            if let Some(slot) = slot {
                pieces.push(&text[start..i]);
                slots.push(slot);
                next = slot + 1;
                i += 1 + digits;
                start = i;
                continue;
            }
        }
        i += 1;
    }
    pieces.push(&text[start..]);
    (pieces, slots)
}

trait Bind<DB: DieselBackend> {
    fn push<'b>(&'b self, out: &mut AstPass<'_, 'b, DB>) -> QueryResult<()>;
}

struct Typed<ST, U>(U, PhantomData<fn() -> ST>);

impl<DB, ST, U> Bind<DB> for Typed<ST, U>
where
    DB: DieselBackend + HasSqlType<ST>,
    U: ToSql<ST, DB>,
{
    fn push<'b>(&'b self, out: &mut AstPass<'_, 'b, DB>) -> QueryResult<()> {
        out.push_bind_param::<ST, U>(&self.0)
    }
}

impl<DB> QueryFragment<DB> for Sql<'_, DB>
where
    DB: DieselBackend + DieselReserveSpecialization,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        for (i, piece) in self.split.pieces.iter().enumerate() {
            out.push_sql(piece);
            if let Some(&slot) = self.split.slots.get(i) {
                let bind = self.binds.get(slot).ok_or_else(|| {
                    diesel::result::Error::QueryBuilderError(
                        format!("no value bound to parameter {}", slot + 1).into(),
                    )
                })?;
                bind.push(&mut out)?;
            }
        }
        Ok(())
    }
}

/// No static id: the statement cache keys it by its SQL text.
impl<DB: DieselBackend> QueryId for Sql<'_, DB> {
    type QueryId = ();

    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<DB: DieselBackend> Query for Sql<'_, DB> {
    type SqlType = Untyped;
}

/// For sync diesel (SQLite on the blocking pool); diesel-async's `RunQueryDsl` is implemented for
/// every type.
impl<Conn, DB: DieselBackend> diesel::RunQueryDsl<Conn> for Sql<'_, DB> {}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn numbered_and_plain_placeholders() {
        let (pieces, slots) = split("SELECT $2, $1, $2 FROM t WHERE a = ?1 AND b = ? AND c = ?");
        assert_eq!(
            pieces,
            [
                "SELECT ",
                ", ",
                ", ",
                " FROM t WHERE a = ",
                " AND b = ",
                " AND c = ",
                ""
            ]
        );
        assert_eq!(slots, [1, 0, 1, 0, 1, 2]);
    }

    #[test]
    fn quoted_text_and_other_dollars_are_left_alone() {
        let (pieces, slots) =
            split("SELECT '$1 ?', x FROM JSON_TABLE(?, '$[*]' COLUMNS (a INT PATH '$[0]')) k");
        assert_eq!(slots, [0]);
        assert_eq!(pieces[0], "SELECT '$1 ?', x FROM JSON_TABLE(");
    }
}
