//! Events and their ids.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A type that can be emitted on the bus.
///
/// Derive it with `#[derive(txbus::Event)]`; the name defaults to the type's name and can be set
/// with `#[event(name = "...")]`. The name is what is stored with the event and what listeners are
/// matched by, so keep it stable once events of that type may be waiting in a database.
///
/// ```
/// #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
/// #[event(name = "user.created")]
/// pub struct UserCreated {
///     pub user_id: i64,
///     pub email: String,
/// }
///
/// assert_eq!(<UserCreated as txbus::Event>::NAME, "user.created");
/// ```
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stable name stored with each event of this type.
    const NAME: &'static str;

    /// The version of this type's shape, stored with every delivery (default 1). Raise it when a
    /// change would keep stored payloads from deserializing (a renamed, retyped or removed
    /// field), and give [`upcast`](Self::upcast) a step from the version before; adding an
    /// optional field with `#[serde(default)]` needs no new version.
    ///
    /// The derive sets it with `#[event(version = N, upcast(1 => f, 2 => g, ...))]`, and checks
    /// at compile time that every version below `N` has its step.
    const VERSION: u32 = 1;

    /// The key whose deliveries run one at a time and in event-id order, for each listener
    /// (default: none, and deliveries run in any order and concurrently).
    ///
    /// The derive implements it with `#[event(ordering_key = field)]`, as the field's
    /// `to_string()`; a hand-written impl may compute it. Keys of more than
    /// [`MAX_ORDERING_KEY_LEN`](crate::MAX_ORDERING_KEY_LEN) bytes are refused at the emit.
    ///
    /// ```
    /// #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
    /// #[event(name = "account.credited", ordering_key = account_id)]
    /// pub struct AccountCredited { pub account_id: i64, pub cents: i64 }
    ///
    /// use txbus::Event;
    /// let credited = AccountCredited { account_id: 42, cents: 100 };
    /// assert_eq!(credited.ordering_key().as_deref(), Some("42"));
    /// ```
    fn ordering_key(&self) -> Option<String> {
        None
    }

    /// Turns a payload stored at `version` into the shape of `version + 1`. A delivery stored
    /// at version `k` below [`VERSION`](Self::VERSION) is upcast step by step, `k` to `k + 1`
    /// and on to `VERSION`, when it runs (first runs, retries and replays alike), then
    /// deserialized. An error makes the delivery a dead letter at once, with the reason
    /// `upcast_failed` and the error's text: retrying cannot fix it; after a fix, replay it.
    ///
    /// The derive implements it from `upcast(...)`; the default has no step for any version.
    ///
    /// ```
    /// use serde_json::{Value, json};
    /// use txbus::UpcastError;
    ///
    /// // Version 1 had `total` in whole units; version 2 has `total_cents`.
    /// #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
    /// #[event(name = "order.placed", version = 2, upcast(1 => cents))]
    /// struct OrderPlaced { order_id: i64, total_cents: i64 }
    ///
    /// fn cents(mut v1: Value) -> Result<Value, UpcastError> {
    ///     let total = v1["total"].as_i64().ok_or_else(|| UpcastError::new("`total` is not an integer"))?;
    ///     v1["total_cents"] = json!(total * 100);
    ///     Ok(v1)
    /// }
    ///
    /// use txbus::Event;
    /// let v2 = OrderPlaced::upcast(1, json!({ "order_id": 7, "total": 12 })).unwrap();
    /// assert_eq!(v2["total_cents"], 1200);
    /// ```
    fn upcast(version: u32, payload: serde_json::Value) -> Result<serde_json::Value, UpcastError> {
        let _ = payload;
        Err(UpcastError::new(format!(
            "`{}` has no upcaster from version {version}",
            Self::NAME
        )))
    }
}

/// The longest [ordering key](Event::ordering_key), in bytes: an emit of an event with a
/// longer key fails with [`Error::Invalid`](crate::Error::Invalid) and writes nothing.
pub const MAX_ORDERING_KEY_LEN: usize = 255;

/// Why a stored payload could not be brought to its event type's current version: returned by
/// an upcaster (see [`Event::upcast`]). `?` converts a `serde_json::Error` into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpcastError(String);

impl UpcastError {
    /// An upcast error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl fmt::Display for UpcastError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UpcastError {}

impl From<serde_json::Error> for UpcastError {
    fn from(error: serde_json::Error) -> Self {
        Self(error.to_string())
    }
}

/// The id of a stored event, assigned by the database when it is emitted (a number in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct EventId(i64);

impl EventId {
    /// Wraps a raw id (as found in `txbus_deliveries.event_id`).
    pub const fn new(id: i64) -> Self {
        Self(id)
    }

    /// The raw id.
    pub const fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<EventId> for i64 {
    fn from(id: EventId) -> Self {
        id.0
    }
}
