//! Rows that every backend's statements return alike.

use diesel::sql_types::{BigInt, Integer, Text};

#[derive(diesel::QueryableByName)]
pub(crate) struct Count {
    #[diesel(sql_type = BigInt)]
    pub(crate) n: i64,
}

#[derive(diesel::QueryableByName)]
pub(crate) struct ListenerCountRow {
    #[diesel(sql_type = Text)]
    pub(crate) listener: String,
    #[diesel(sql_type = BigInt)]
    pub(crate) n: i64,
}

#[derive(diesel::QueryableByName)]
pub(crate) struct VersionRow {
    #[diesel(sql_type = Text)]
    pub(crate) version: String,
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
#[derive(diesel::QueryableByName)]
pub(crate) struct ClaimedRow {
    #[diesel(sql_type = BigInt)]
    pub(crate) event_id: i64,
    #[diesel(sql_type = Text)]
    pub(crate) listener: String,
    #[diesel(sql_type = Integer)]
    pub(crate) attempts: i32,
    #[diesel(sql_type = Text)]
    pub(crate) payload: String,
    #[diesel(sql_type = BigInt)]
    pub(crate) emitted_at_us: i64,
    #[diesel(sql_type = BigInt)]
    pub(crate) lease_ms: i64,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub(crate) expired: bool,
}

#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[derive(diesel::QueryableByName)]
pub(crate) struct One {
    #[diesel(sql_type = Integer)]
    #[allow(dead_code)]
    pub(crate) n: i32,
}

#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[derive(diesel::QueryableByName)]
pub(crate) struct DiedRow {
    #[diesel(sql_type = BigInt)]
    pub(crate) event_id: i64,
    #[diesel(sql_type = Text)]
    pub(crate) listener: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    pub(crate) dead_reason: Option<String>,
}
