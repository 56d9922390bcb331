//! Raw SQL that diesel keeps prepared, bound and read with the few SQL types the store uses, on
//! every backend.
//!
//! `diesel::sql_query` marks every statement as not cacheable, so diesel-async would prepare it
//! again at each execution: one more round trip and one more parse per statement. The store's
//! statements are fixed texts, so [`sql`] takes one with placeholders (`$1` or `?1` by number,
//! or plain `?` in order) and writes it back with the placeholders diesel generates for the
//! backend, each bound to its [`Value`]. The statement cache keys it by its text.
//!
//! Values and rows go through [`SqlDb`], implemented once per diesel backend, so that the code
//! above the backends is generic: a list is an array on PostgreSQL and a JSON array elsewhere.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use diesel::QueryResult;
use diesel::backend::{Backend as DieselBackend, DieselReserveSpecialization};
use diesel::deserialize;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::row::NamedRow;
use diesel::sql_types::Untyped;

/// A value bound to a statement.
#[derive(Debug, Clone)]
pub enum Value<'a> {
    /// `INTEGER`.
    Int(i32),
    /// `BIGINT`.
    BigInt(i64),
    /// `BOOLEAN`.
    Bool(bool),
    /// Text.
    Text(Cow<'a, str>),
    /// `BIGINT` or `NULL`.
    NullBigInt(Option<i64>),
    /// Text or `NULL`.
    NullText(Option<Cow<'a, str>>),
    /// Arrays, which only PostgreSQL binds.
    Texts(&'a [&'a str]),
    /// `BIGINT[]`.
    BigInts(&'a [i64]),
    /// `INTEGER[]`.
    Ints(&'a [i32]),
    /// `TEXT[]` with `NULL`s.
    NullTexts(&'a [Option<&'a str>]),
    /// `BOOLEAN[]`.
    Bools(&'a [bool]),
}

macro_rules! from {
    ($($ty:ty => $variant:ident $(($convert:path))?),* $(,)?) => {$(
        impl<'a> From<$ty> for Value<'a> {
            fn from(value: $ty) -> Self {
                Self::$variant($($convert)?(value))
            }
        }
    )*};
}

from! {
    i32 => Int,
    i64 => BigInt,
    bool => Bool,
    &'a str => Text(Cow::Borrowed),
    String => Text(Cow::Owned),
    Option<i64> => NullBigInt,
    &'a [i64] => BigInts,
    &'a [i32] => Ints,
    &'a [Option<&'a str>] => NullTexts,
    &'a [bool] => Bools,
}

impl<'a> From<Option<&'a str>> for Value<'a> {
    fn from(value: Option<&'a str>) -> Self {
        Self::NullText(value.map(Cow::Borrowed))
    }
}

/// A diesel backend the store runs on: how it binds [`Value`]s and reads columns.
pub trait SqlDb: DieselBackend + DieselReserveSpecialization + Send + Sync + 'static {
    /// Pushes `value` as a bind parameter.
    fn push_value<'b>(out: &mut AstPass<'_, 'b, Self>, value: &'b Value<'_>) -> QueryResult<()>;

    /// A list of strings as this database takes one: an array, or a JSON array.
    fn list<'a>(items: &'a [&'a str]) -> Value<'a>;

    /// Reads a `BIGINT` column.
    fn read_i64<'a>(row: &impl NamedRow<'a, Self>, column: &str) -> deserialize::Result<i64>;
    /// Reads an `INTEGER` column.
    fn read_i32<'a>(row: &impl NamedRow<'a, Self>, column: &str) -> deserialize::Result<i32>;
    /// Reads a boolean column.
    fn read_bool<'a>(row: &impl NamedRow<'a, Self>, column: &str) -> deserialize::Result<bool>;
    /// Reads a text column.
    fn read_text<'a>(row: &impl NamedRow<'a, Self>, column: &str) -> deserialize::Result<String>;
    /// Reads a nullable `BIGINT` column.
    fn read_null_i64<'a>(
        row: &impl NamedRow<'a, Self>,
        column: &str,
    ) -> deserialize::Result<Option<i64>>;
    /// Reads a nullable text column.
    fn read_null_text<'a>(
        row: &impl NamedRow<'a, Self>,
        column: &str,
    ) -> deserialize::Result<Option<String>>;
}

/// The binds and reads every backend shares; `$arrays` pushes the array values (or refuses them).
macro_rules! sql_db {
    ($db:ty, list: $list:expr, arrays: $arrays:expr) => {
        impl SqlDb for $db {
            fn push_value<'b>(
                out: &mut AstPass<'_, 'b, Self>,
                value: &'b Value<'_>,
            ) -> QueryResult<()> {
                use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text};
                match value {
                    Value::Int(v) => out.push_bind_param::<Integer, _>(v),
                    Value::BigInt(v) => out.push_bind_param::<BigInt, _>(v),
                    Value::Bool(v) => out.push_bind_param::<Bool, _>(v),
                    Value::Text(v) => out.push_bind_param::<Text, _>(v),
                    Value::NullBigInt(v) => out.push_bind_param::<Nullable<BigInt>, _>(v),
                    Value::NullText(v) => out.push_bind_param::<Nullable<Text>, _>(v),
                    array => $arrays(out, array),
                }
            }

            fn list<'a>(items: &'a [&'a str]) -> Value<'a> {
                $list(items)
            }

            fn read_i64<'a>(
                row: &impl NamedRow<'a, Self>,
                column: &str,
            ) -> deserialize::Result<i64> {
                NamedRow::get::<diesel::sql_types::BigInt, _>(row, column)
            }

            fn read_i32<'a>(
                row: &impl NamedRow<'a, Self>,
                column: &str,
            ) -> deserialize::Result<i32> {
                NamedRow::get::<diesel::sql_types::Integer, _>(row, column)
            }

            fn read_bool<'a>(
                row: &impl NamedRow<'a, Self>,
                column: &str,
            ) -> deserialize::Result<bool> {
                NamedRow::get::<diesel::sql_types::Bool, _>(row, column)
            }

            fn read_text<'a>(
                row: &impl NamedRow<'a, Self>,
                column: &str,
            ) -> deserialize::Result<String> {
                NamedRow::get::<diesel::sql_types::Text, _>(row, column)
            }

            fn read_null_i64<'a>(
                row: &impl NamedRow<'a, Self>,
                column: &str,
            ) -> deserialize::Result<Option<i64>> {
                NamedRow::get::<diesel::sql_types::Nullable<diesel::sql_types::BigInt>, _>(
                    row, column,
                )
            }

            fn read_null_text<'a>(
                row: &impl NamedRow<'a, Self>,
                column: &str,
            ) -> deserialize::Result<Option<String>> {
                NamedRow::get::<diesel::sql_types::Nullable<diesel::sql_types::Text>, _>(
                    row, column,
                )
            }
        }
    };
}

#[cfg(feature = "postgres")]
sql_db!(
    diesel::pg::Pg,
    list: Value::Texts,
    arrays: |out: &mut AstPass<'_, 'b, diesel::pg::Pg>, value: &'b Value<'_>| {
        use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text};
        match value {
            Value::Texts(v) => out.push_bind_param::<Array<Text>, _>(*v),
            Value::BigInts(v) => out.push_bind_param::<Array<BigInt>, _>(*v),
            Value::Ints(v) => out.push_bind_param::<Array<Integer>, _>(*v),
            Value::NullTexts(v) => out.push_bind_param::<Array<Nullable<Text>>, _>(*v),
            Value::Bools(v) => out.push_bind_param::<Array<Bool>, _>(*v),
            _ => Err(unbindable()),
        }
    }
);

#[cfg(feature = "mysql")]
sql_db!(
    diesel::mysql::Mysql,
    list: json_list,
    arrays: |_: &mut AstPass<'_, 'b, diesel::mysql::Mysql>, _: &'b Value<'_>| Err(unbindable())
);

#[cfg(feature = "sqlite")]
sql_db!(
    diesel::sqlite::Sqlite,
    list: json_list,
    arrays: |_: &mut AstPass<'_, 'b, diesel::sqlite::Sqlite>, _: &'b Value<'_>| Err(unbindable())
);

/// A list as a JSON array of strings, for `JSON_TABLE` (MySQL) and `json_each` (SQLite).
#[cfg(any(feature = "mysql", feature = "sqlite"))]
fn json_list<'a>(items: &'a [&'a str]) -> Value<'a> {
    Value::Text(Cow::Owned(serde_json::Value::from(items).to_string()))
}

fn unbindable() -> diesel::result::Error {
    diesel::result::Error::QueryBuilderError("arrays are bound on PostgreSQL only".into())
}

/// A column type the store reads, on any [`SqlDb`].
pub(crate) trait Column: Sized {
    fn read<'a, DB: SqlDb>(row: &impl NamedRow<'a, DB>, column: &str) -> deserialize::Result<Self>;
}

macro_rules! column {
    ($($ty:ty => $read:ident),* $(,)?) => {$(
        impl Column for $ty {
            fn read<'a, DB: SqlDb>(
                row: &impl NamedRow<'a, DB>,
                column: &str,
            ) -> deserialize::Result<Self> {
                DB::$read(row, column)
            }
        }
    )*};
}

column! {
    i64 => read_i64,
    i32 => read_i32,
    bool => read_bool,
    String => read_text,
    Option<i64> => read_null_i64,
    Option<String> => read_null_text,
}

/// A statement with its bound values; see the module docs.
pub(crate) struct Sql<'a, DB> {
    split: Arc<Split>,
    values: Vec<Value<'a>>,
    db: PhantomData<fn() -> DB>,
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
pub(crate) fn sql<'a, DB>(text: &'static str) -> Sql<'a, DB> {
    // Once the test kit moved a clock, the texts that read the clock are sent rewritten.
    #[cfg(feature = "testing")]
    let text = crate::store::clock::rewrite(text);
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
        values: Vec::with_capacity(8),
        db: PhantomData,
    }
}

impl<'a, DB: SqlDb> Sql<'a, DB> {
    /// Binds the next value (`$1`, then `$2`, ...).
    pub(crate) fn bind(mut self, value: impl Into<Value<'a>>) -> Self {
        self.values.push(value.into());
        self
    }

    /// Binds a list of strings: an array or a JSON array, as the backend takes one.
    pub(crate) fn bind_list(self, items: &'a [&'a str]) -> Self {
        self.bind(DB::list(items))
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

impl<DB: SqlDb> QueryFragment<DB> for Sql<'_, DB> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        for (i, piece) in self.split.pieces.iter().enumerate() {
            out.push_sql(piece);
            if let Some(&slot) = self.split.slots.get(i) {
                let value = self.values.get(slot).ok_or_else(|| {
                    diesel::result::Error::QueryBuilderError(
                        format!("no value bound to parameter {}", slot + 1).into(),
                    )
                })?;
                DB::push_value(&mut out, value)?;
            }
        }
        Ok(())
    }
}

/// No static id: the statement cache keys it by its SQL text.
impl<DB> QueryId for Sql<'_, DB> {
    type QueryId = ();

    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<DB> Query for Sql<'_, DB> {
    type SqlType = Untyped;
}

/// For sync diesel (SQLite on the blocking pool); diesel-async's `RunQueryDsl` is implemented for
/// every type.
impl<Conn, DB> diesel::RunQueryDsl<Conn> for Sql<'_, DB> {}

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
