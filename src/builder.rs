//! Configuring and starting a bus.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use crate::bus::EventBus;
use crate::completion::complete_loop;
use crate::dispatch::{PoolTransactions, Runner, Transactions, dispatch_loop};
use crate::engine::{BusConfig, Engine, Tasks};
use crate::error::BuildError;
use crate::event::Event;
use crate::listener::{ListenerDef, State};
use crate::poller::poll_loop;
use crate::registry::{LISTENERS, Registry};
use crate::settings::{EventSettings, MAX_DURATION};
use crate::store::{Backend, Pool, Retention};

/// Configures an [`EventBus`]; made by [`EventBus::builder`], finished by
/// [`build`](Self::build).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use txbus::{EventBus, EventSettings, Pool, Sqlite};
///
/// #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
/// #[event(name = "user.created")]
/// struct UserCreated { user_id: i64 }
///
/// struct Mailer;
///
/// # let dir = std::env::temp_dir().join(format!("txbus-doc-builder-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let path = dir.join("app.db");
/// let pool = Pool::<Sqlite>::connect(path.to_str().unwrap()).await?;
/// let bus = EventBus::builder(pool)
///     .event::<UserCreated>(
///         EventSettings::default()
///             .expires_after(Duration::from_secs(24 * 3600))
///             .max_execution_time(Duration::from_secs(30))
///             .retry_after(Duration::from_secs(5)),
///     )
///     .retry_every(Duration::from_secs(1))
///     .max_events_per_retry(100)
///     .state(Mailer)
///     .build()
///     .await?;
/// # bus.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub struct EventBusBuilder<B: Backend> {
    pool: Pool<B>,
    events: HashMap<&'static str, (EventSettings, &'static str)>,
    errors: Vec<BuildError>,
    default_settings: EventSettings,
    retry_every: Duration,
    max_events_per_retry: usize,
    max_concurrent_listeners: usize,
    shutdown_grace: Duration,
    inbox_dedup_window: Duration,
    retention: Retention,
    state: State,
    run_migrations: bool,
    poller: bool,
    /// Listeners defined at run time (relay routes), beside the `#[listener]` functions.
    extra: Vec<&'static ListenerDef>,
    #[cfg(feature = "nats")]
    routes: crate::nats::Routes,
}

impl<B: Backend> fmt::Debug for EventBusBuilder<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBusBuilder")
            .field("backend", &B::NAME)
            .field("events", &self.events)
            .field("default_settings", &self.default_settings)
            .field("retry_every", &self.retry_every)
            .field("max_events_per_retry", &self.max_events_per_retry)
            .field("max_concurrent_listeners", &self.max_concurrent_listeners)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("inbox_dedup_window", &self.inbox_dedup_window)
            .field("retention", &self.retention)
            .field("run_migrations", &self.run_migrations)
            .field("poller", &self.poller)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> EventBus<B> {
    /// Starts configuring a bus on `pool`.
    pub fn builder(pool: Pool<B>) -> EventBusBuilder<B> {
        EventBusBuilder::new(pool)
    }
}

impl<B: Backend> EventBusBuilder<B> {
    fn new(pool: Pool<B>) -> Self {
        Self {
            pool,
            events: HashMap::new(),
            errors: Vec::new(),
            default_settings: EventSettings::default(),
            retry_every: Duration::from_secs(1),
            max_events_per_retry: 100,
            max_concurrent_listeners: 64,
            shutdown_grace: Duration::from_secs(10),
            inbox_dedup_window: Duration::from_secs(7 * 24 * 3600),
            retention: Retention {
                delivered: Duration::ZERO,
                dead: Duration::from_secs(14 * 24 * 3600),
            },
            state: State::default(),
            run_migrations: true,
            poller: true,
            extra: Vec::new(),
            #[cfg(feature = "nats")]
            routes: crate::nats::Routes::default(),
        }
    }

    /// The settings of event type `E`. Events without their own use
    /// [`default_settings`](Self::default_settings).
    pub fn event<E: Event>(mut self, settings: EventSettings) -> Self {
        let type_name = std::any::type_name::<E>();
        if let Some((_, other)) = self.events.insert(E::NAME, (settings, type_name))
            && other != type_name
        {
            self.errors.push(BuildError::DuplicateEventName {
                name: E::NAME,
                first: other,
                second: type_name,
            });
        }
        self
    }

    /// Publishes events to NATS JetStream with `relay` (feature `nats`): each of its routes
    /// becomes a listener of its event type, with the id `txbus.nats:<subject>`. May be called
    /// several times.
    #[cfg(feature = "nats")]
    pub fn relay(mut self, relay: crate::nats::JetStreamRelay) -> Self {
        let (defs, routes, errors) = relay.into_parts();
        self.extra.extend(defs);
        self.routes.extend(routes);
        self.errors.extend(errors);
        self
    }

    /// The settings of every event type not given its own with [`event`](Self::event).
    /// Default: [`EventSettings::default()`].
    pub fn default_settings(mut self, settings: EventSettings) -> Self {
        self.default_settings = settings;
        self
    }

    /// How often the poller looks for due and expired deliveries. Default: 1 second.
    ///
    /// Work that waits in the table does not wait for the next poll as well: the poller wakes
    /// when a retry this process wrote falls due, and after each poll that finds nothing more
    /// to claim it reads when the earliest waiting delivery of its listeners (a retry, a lease
    /// that ends after a crash) falls due, and wakes then. What `retry_every` bounds is how
    /// long work that other instances write after that poll waits: a retry due sooner, say.
    /// Reading it is one statement more per poll: an idle bus runs two statements per
    /// `retry_every`, and the expiry sweep every tenth poll.
    pub fn retry_every(mut self, interval: Duration) -> Self {
        self.retry_every = interval;
        self
    }

    /// The most deliveries one poll claims. Default: 100. A poll claims no more than can start
    /// at once, and claims again right away while full batches keep coming.
    pub fn max_events_per_retry(mut self, max: usize) -> Self {
        self.max_events_per_retry = max;
        self
    }

    /// The most listeners running at once in this process. Default: 64. Sixteen times as many
    /// deliveries (at least 1024) may wait in the queue; beyond that, freshly emitted deliveries
    /// are handed back to the database for the poller instead of piling up in memory.
    pub fn max_concurrent_listeners(mut self, max: usize) -> Self {
        self.max_concurrent_listeners = max;
        self
    }

    /// How long [`EventBus::shutdown`] lets running listeners finish before cancelling them.
    /// Default: 10 seconds.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// How long a received message id is remembered: a message received again within this
    /// window is a duplicate ([`EventBus::receive`]); older records are purged by the poller, in
    /// batches. Default: 7 days.
    pub fn inbox_dedup_window(mut self, window: Duration) -> Self {
        self.inbox_dedup_window = window;
        self
    }

    /// How long a delivery is kept after its listener succeeded, as `delivered` in
    /// [`EventBus::stats`]. Default: zero, deleted on success (the cheapest: one statement
    /// per batch of successes). The poller deletes older ones in bounded batches, one instance at
    /// a time.
    pub fn retain_delivered(mut self, retention: Duration) -> Self {
        self.retention.delivered = retention;
        self
    }

    /// How long a dead letter is kept, counted from its death, to be inspected and replayed
    /// ([`EventBus::dead_letters`]). Default: 14 days. The poller deletes older ones in bounded
    /// batches, one instance at a time.
    pub fn retain_dead(mut self, retention: Duration) -> Self {
        self.retention.dead = retention;
        self
    }

    /// Registers a value listeners get with [`Context::state`](crate::Context::state), one per
    /// type (a second value of the same type replaces the first). Default: none.
    pub fn state<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.state.insert(value);
        self
    }

    /// Whether [`build`](Self::build) applies txbus's migrations. Default: true. Turn it off when
    /// a deploy step runs [`txbus::migrate`](crate::migrate).
    pub fn run_migrations(mut self, run: bool) -> Self {
        self.run_migrations = run;
        self
    }

    /// Whether this process runs the background poller, which retries failed deliveries and
    /// takes over those of crashed processes. Default: true. Turn it off only where another
    /// process polls the same database, or in tests; this process still runs the listeners of
    /// its own emits. With feature `testing`, a bus without its poller is a test's: it keeps
    /// the record of its events that [`EventBus::emitted`](crate::EventBus::emitted) reads.
    pub fn poller(mut self, enabled: bool) -> Self {
        self.poller = enabled;
        self
    }

    /// Validates the configuration, applies migrations (unless turned off), and starts the
    /// background tasks on the current tokio runtime.
    pub fn build(self) -> impl Future<Output = Result<EventBus<B>, BuildError>> + Send {
        async move {
            let mut this = self;
            if let Some(error) = this.errors.drain(..).next() {
                return Err(error);
            }
            this.validate()?;
            let registry = Registry::new(LISTENERS.iter().chain(this.extra.iter().copied()))?;
            #[cfg(feature = "nats")]
            if !this.routes.is_empty() {
                this.state.insert(std::mem::take(&mut this.routes));
            }
            // The bus's clock, which the test kit moves, is its own.
            #[cfg(feature = "testing")]
            {
                this.pool = this.pool.with_own_clock();
            }
            if this.run_migrations {
                crate::store::migrate(&this.pool)
                    .await
                    .map_err(BuildError::Database)?;
            }
            check_connections::<B>(&registry)?;
            let transactions = registry.has_transactional().then(|| {
                Arc::new(PoolTransactions {
                    pool: this.pool.clone(),
                    retain: !this.retention.delivered.is_zero(),
                }) as Arc<dyn Transactions>
            });
            let (runner, jobs, reports) =
                Runner::new(this.max_concurrent_listeners, this.state, transactions);
            // A test's bus (feature `testing`): it keeps a record of what it emits.
            #[cfg(feature = "testing")]
            runner.hooks.record_emitted(!this.poller);
            let settings = this
                .events
                .into_iter()
                .map(|(name, (s, _))| (name, s))
                .collect();
            let engine = Arc::new(Engine::new(
                this.pool.clone(),
                registry,
                settings,
                this.default_settings,
                runner.clone(),
                BusConfig {
                    retry_every: this.retry_every,
                    max_events_per_retry: this.max_events_per_retry,
                    shutdown_grace: this.shutdown_grace,
                    inbox_dedup_window: this.inbox_dedup_window,
                    retention: this.retention,
                },
            ));
            let tasks = Tasks {
                dispatcher: Some(tokio::spawn(dispatch_loop(runner.clone(), jobs))),
                completer: Some(tokio::spawn(complete_loop(
                    this.pool,
                    !this.retention.delivered.is_zero(),
                    this.retry_every,
                    reports,
                    runner.clone(),
                ))),
                poller: this.poller.then(|| tokio::spawn(poll_loop(engine.clone()))),
            };
            *engine.tasks.lock().unwrap_or_else(PoisonError::into_inner) = tasks;
            tracing::info!(
                backend = B::NAME,
                listeners = engine.registry.len(),
                poller = this.poller,
                "txbus started"
            );
            tracing::debug!(listeners = ?engine.registry.ids(), "registered listeners");
            Ok(EventBus::from_engine(engine))
        }
    }

    fn validate(&self) -> Result<(), BuildError> {
        let bus = |reason: &str| BuildError::InvalidSettings {
            event: None,
            reason: reason.to_owned(),
        };
        if self.retry_every.is_zero() {
            return Err(bus("retry_every must be longer than zero"));
        }
        if self.max_events_per_retry == 0 {
            return Err(bus("max_events_per_retry must be at least 1"));
        }
        if self.inbox_dedup_window.is_zero() || self.inbox_dedup_window > MAX_DURATION {
            return Err(bus(
                "inbox_dedup_window must be longer than zero and at most 100 years",
            ));
        }
        for (name, retention) in [
            ("retain_delivered", self.retention.delivered),
            ("retain_dead", self.retention.dead),
        ] {
            if retention > MAX_DURATION {
                return Err(bus(&format!("{name} must be at most 100 years")));
            }
        }
        if self.max_concurrent_listeners == 0 {
            return Err(bus("max_concurrent_listeners must be at least 1"));
        }
        if self.max_concurrent_listeners > u32::MAX as usize >> 3 {
            return Err(bus("max_concurrent_listeners must be at most 536870911"));
        }
        self.default_settings
            .validate()
            .map_err(|reason| BuildError::InvalidSettings {
                event: None,
                reason: format!("default_settings: {reason}"),
            })?;
        let mut events: Vec<_> = self.events.iter().collect();
        events.sort_by_key(|(name, _)| **name);
        for (name, (settings, _)) in events {
            settings
                .validate()
                .map_err(|reason| BuildError::InvalidSettings {
                    event: Some(name),
                    reason,
                })?;
        }
        Ok(())
    }
}

/// Refuses transactional listeners that take another backend's connection.
fn check_connections<B: Backend>(registry: &Registry) -> Result<(), BuildError> {
    let expected = std::any::TypeId::of::<B::Connection>();
    for def in registry.defs() {
        if let Some(tx) = def.transactional()
            && (tx.connection)() != expected
        {
            return Err(BuildError::ListenerConnection {
                id: def.id,
                found: (tx.connection_name)(),
                expected: std::any::type_name::<B::Connection>(),
            });
        }
    }
    Ok(())
}
