//! The crate's error types.

use std::fmt;

/// What went wrong in a bus operation: emitting, a transaction, migrations, the pool.
///
/// Messages say what happened; the cause, when there is one, is the error's
/// [`source`](std::error::Error::source). Print the whole chain (for example with
/// `anyhow`'s `{:#}`) to see both.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A statement failed in the database (a constraint violation, a lost connection, ...).
    #[error("database error")]
    Database(#[from] diesel::result::Error),

    /// No connection could be opened or taken from the pool.
    #[error("could not get a database connection: {context}")]
    Connection {
        /// Where it failed and what to check.
        context: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// An event could not be serialized to JSON.
    #[error("could not serialize event `{event}` to JSON")]
    Serialize {
        /// The event's name.
        event: &'static str,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },

    /// Applying the schema migrations failed.
    #[error("migration {version} failed; the database schema was left at the previous version")]
    Migration {
        /// The migration that failed.
        version: String,
        /// The underlying error.
        #[source]
        source: diesel::result::Error,
    },

    /// A value given to a call is not usable (an empty message id, say); nothing was written.
    #[error("invalid input: {0}")]
    Invalid(String),

    /// A value given to the bus or the pool is not usable.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The bus was shut down ([`EventBus::shutdown`](crate::EventBus::shutdown)); it emits nothing more.
    #[error("the event bus has been shut down; build a new one to emit again")]
    Shutdown,
}

impl Error {
    pub(crate) fn connection(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Connection {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// Why [`EventBusBuilder::build`](crate::EventBusBuilder::build) refused to start a bus.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Two `#[listener]` functions have the same id.
    #[error(
        "two listeners have the id `{id}` ({first} and {second}); give one of them another \
         `#[txbus::listener(name = \"...\")]`"
    )]
    DuplicateListener {
        /// The shared id.
        id: &'static str,
        /// Where the first one is defined (`file:line`).
        first: String,
        /// Where the second one is defined (`file:line`).
        second: String,
    },

    /// An alias of a listener is the id or an alias of another listener.
    #[error(
        "`{alias}`, an alias of listener `{listener}` ({location}), is also the id or an alias of \
         listener `{other}`; deliveries stored under it could go to either, so rename one of them"
    )]
    AliasConflict {
        /// The alias.
        alias: &'static str,
        /// The listener that has it as an alias.
        listener: &'static str,
        /// Where that listener is defined (`file:line`).
        location: String,
        /// The other listener with that id or alias.
        other: &'static str,
    },

    /// A transactional listener takes the connection of another backend than the bus's.
    #[error(
        "the transactional listener `{id}` takes `&mut {found}`, but this bus runs on `{expected}`; \
         change its connection parameter, or build it only with that backend"
    )]
    ListenerConnection {
        /// The listener.
        id: &'static str,
        /// The connection type it takes.
        found: &'static str,
        /// The connection type of the bus's backend.
        expected: &'static str,
    },

    /// A setting is out of range.
    #[error("invalid setting{}: {reason}", .event.map(|e| format!(" for event `{e}`")).unwrap_or_default())]
    InvalidSettings {
        /// The event whose settings are wrong, or `None` for a bus-wide setting.
        event: Option<&'static str>,
        /// What is wrong and what is allowed.
        reason: String,
    },

    /// Two different event types were configured with the same name.
    #[error(
        "event types `{first}` and `{second}` both have the name `{name}`; give one of them \
         another `#[event(name = \"...\")]`"
    )]
    DuplicateEventName {
        /// The shared name.
        name: &'static str,
        /// The first type.
        first: &'static str,
        /// The second type.
        second: &'static str,
    },

    /// The database could not be prepared (connection or migrations).
    #[error("could not prepare the database")]
    Database(#[source] Error),
}

/// [`Context::state`](crate::Context::state) found no value of the requested type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no state of type `{type_name}` is registered on the bus; add it with \
     `EventBusBuilder::state(value)`"
)]
pub struct StateError {
    pub(crate) type_name: &'static str,
}

impl StateError {
    /// The name of the type that was asked for.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }
}

/// Shows an error with its chain of sources, `a: b: c`.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
