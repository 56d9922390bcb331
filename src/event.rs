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
