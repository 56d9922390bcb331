//! What a bus's handles and background tasks share: the pool, the listeners, the settings, the
//! runner; preparing events, dispatching committed ones, retention rounds, shutting down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OnceCell};
use tokio::task::JoinHandle;

use crate::delivery::DeliveryKey;
use crate::dispatch::{self, Job, Phase, Runner};
use crate::error::{Chain, Error};
use crate::event::Event;
use crate::listener::ListenerDef;
use crate::registry::Registry;
use crate::settings::EventSettings;
use crate::store::{Backend, Inserted, NewEvent, Pool, Retention};

/// How many rows one statement of a purge, a replay, a release or a retention round touches at
/// most.
pub(crate) const BATCH: usize = 1000;

/// How many statements of each kind one retention round runs at most, so that the poller gets
/// back to claiming; what is left goes in the next round.
const MAX_BATCHES: usize = 10;

/// The bus's core; [`EventBus`](crate::EventBus) handles share one.
pub(crate) struct Engine<B: Backend> {
    pub(crate) pool: Pool<B>,
    pub(crate) registry: Registry,
    settings: HashMap<&'static str, EventSettings>,
    default_settings: EventSettings,
    pub(crate) runner: Arc<Runner>,
    pub(crate) config: BusConfig,
    pub(crate) tasks: Mutex<Tasks>,
    /// Wakes the poller before its next tick (after a replay, say).
    pub(crate) poll_now: Notify,
    stopped: OnceCell<()>,
}

/// The bus-wide settings of the builder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BusConfig {
    pub(crate) retry_every: Duration,
    pub(crate) max_events_per_retry: usize,
    pub(crate) shutdown_grace: Duration,
    pub(crate) inbox_dedup_window: Duration,
    pub(crate) retention: Retention,
}

/// The background tasks, taken by `shutdown` to wait for them.
#[derive(Default)]
pub(crate) struct Tasks {
    pub(crate) poller: Option<JoinHandle<()>>,
    pub(crate) dispatcher: Option<JoinHandle<()>>,
    pub(crate) completer: Option<JoinHandle<()>>,
}

/// An event serialized and matched with its listeners, ready to be written.
pub(crate) struct Prepared {
    pub(crate) new: NewEvent,
    pub(crate) listeners: Arc<[&'static ListenerDef]>,
    pub(crate) settings: EventSettings,
}

impl Prepared {
    /// The same event with the trace context `trace` (a received message's), when it has
    /// one, in place of the current span's.
    #[cfg(feature = "nats")]
    pub(crate) fn traced(mut self, trace: Option<std::sync::Arc<str>>) -> Self {
        if trace.is_some() {
            self.new.trace = trace;
        }
        self
    }
}

/// An event written in a transaction, to dispatch after the commit.
pub(crate) struct Written {
    pub(crate) prepared: Prepared,
    pub(crate) inserted: Inserted,
    /// When the insert was sent: its deliveries' leases started no earlier.
    pub(crate) leased: Instant,
}

impl<B: Backend> Engine<B> {
    pub(crate) fn new(
        pool: Pool<B>,
        registry: Registry,
        settings: HashMap<&'static str, EventSettings>,
        default_settings: EventSettings,
        runner: Arc<Runner>,
        config: BusConfig,
    ) -> Self {
        Self {
            pool,
            registry,
            settings,
            default_settings,
            runner,
            config,
            tasks: Mutex::default(),
            poll_now: Notify::new(),
            stopped: OnceCell::new(),
        }
    }

    /// The settings of the event named `event`.
    pub(crate) fn settings_for(&self, event: &str) -> EventSettings {
        self.settings
            .get(event)
            .copied()
            .unwrap_or(self.default_settings)
    }

    /// Refuses work once the bus is shutting down.
    pub(crate) fn check_running(&self) -> Result<(), Error> {
        match self.runner.phase() {
            Phase::Running => Ok(()),
            _ => Err(Error::Shutdown),
        }
    }

    /// Serializes `event` and finds its listeners and settings.
    pub(crate) fn prepare<E: Event>(&self, event: &E) -> Result<Prepared, Error> {
        let payload = serde_json::to_string(event).map_err(|source| Error::Serialize {
            event: E::NAME,
            source,
        })?;
        self.prepare_stored::<E>(payload, E::VERSION, event.ordering_key())
    }

    /// An event of type `E` from a payload written by its `version` elsewhere (it is stored as
    /// it is, and upcast or left alone when it runs), with its listeners and settings.
    pub(crate) fn prepare_stored<E: Event>(
        &self,
        payload: String,
        version: u32,
        ordering_key: Option<String>,
    ) -> Result<Prepared, Error> {
        if let Some(key) = &ordering_key
            && key.len() > crate::event::MAX_ORDERING_KEY_LEN
        {
            return Err(Error::Invalid(format!(
                "the ordering key of `{}` is {} bytes long; keys are at most {} bytes \
                 (use a shorter identifier, or a hash of a long one)",
                E::NAME,
                key.len(),
                crate::event::MAX_ORDERING_KEY_LEN
            )));
        }
        let listeners = self.registry.for_event(E::NAME);
        let settings = self.settings_for(E::NAME);
        // A listener here of an older version of the type (a payload received from a newer
        // sender, say) cannot run it: its deliveries are written due now, not leased, and the
        // claims of instances that know the version take them. So are those of a keyed event,
        // for a claim of its key's head, unless the backend's insert finds the key idle and
        // leases them itself (`lease_head`).
        let behind = listeners.defs.iter().any(|def| def.version < version);
        let due_now = behind || ordering_key.is_some();
        Ok(Prepared {
            new: NewEvent {
                name: E::NAME,
                payload: payload.into(),
                listeners: listeners.ids,
                lease: settings.max_execution_time,
                expires_after: settings.expires_after,
                due_in: due_now.then_some(Duration::ZERO),
                version,
                key_hold: ordering_key.is_some() && settings.block_key_on_dead,
                lease_head: ordering_key.is_some() && !behind,
                ordering_key: ordering_key.map(Arc::from),
                // The span at the call, the parent of the `txbus.emit` (or receive) span.
                trace: crate::trace::current(),
            },
            listeners: listeners.defs,
            settings,
        })
    }

    /// Starts the listeners of committed events; each that can start at once runs in the
    /// caller's task until it first waits. Scheduled events are left to the poller, which they
    /// wake when they fall due.
    pub(crate) fn dispatch(&self, written: Vec<Written>) {
        #[cfg(feature = "testing")]
        if self
            .runner
            .hooks
            .committed(written.iter().map(|w| dispatch::Emitted {
                id: w.inserted.id,
                name: w.prepared.new.name,
                payload: w.prepared.new.payload.clone(),
            }))
        {
            // A simulated crash right after the commit: nothing starts, and the deliveries'
            // leases run out as after a real one.
            return;
        }
        let ready = Instant::now();
        // Runs follow from the span that emitted (or received) their event.
        let parent = tracing::Span::current().id();
        let _span = tracing::debug_span!("txbus.dispatch", events = written.len()).entered();
        let mut scheduled = Vec::new();
        let mut heads = Vec::new();
        for Written {
            prepared,
            inserted,
            leased,
        } in written
        {
            crate::metrics::emitted(prepared.new.name);
            if !inserted.head
                && let Some(due_in) = prepared.new.due_in
            {
                match &prepared.new.ordering_key {
                    // Due now: a claim of its key's head, for each listener, takes it if it is.
                    Some(key) if due_in.is_zero() => heads.extend(
                        prepared
                            .new
                            .listeners
                            .iter()
                            .map(|listener| (*listener, key.clone())),
                    ),
                    _ if !prepared.listeners.is_empty() => scheduled.push(due_in),
                    _ => {}
                }
                continue;
            }
            let deadline = dispatch::deadline(leased, prepared.new.lease);
            for &def in prepared.listeners.iter() {
                self.runner.submit(
                    Job {
                        key: DeliveryKey {
                            event_id: inserted.id,
                            listener: def.id,
                            attempt: 1,
                        },
                        def,
                        payload: prepared.new.payload.clone(),
                        version: prepared.new.version,
                        // A keyed head's result lets the next of its key run.
                        ordering_key: prepared.new.ordering_key.clone(),
                        emitted_at: inserted.emitted_at,
                        deadline,
                        ready,
                        settings: prepared.settings,
                        in_flight: self.runner.tracker.enter(),
                        parent: parent.clone(),
                        trace: prepared.new.trace.clone(),
                    },
                    true,
                );
            }
        }
        dispatch::wake_when_due(&self.runner, scheduled, self.config.retry_every);
        self.runner.wake_heads(heads);
    }

    /// One retention round, unless another instance is running one (`None`). Returns the rows
    /// deleted.
    pub(crate) async fn cleanup(&self) -> Result<Option<usize>, Error> {
        #[cfg(feature = "testing")]
        let _claiming = self.runner.hooks.claiming().await;
        let (_turn, mut conn) = self.pool.get_for_write().await?;
        let deleted = B::cleanup(&mut conn, self.config.retention, BATCH, MAX_BATCHES).await?;
        if let Some(deleted) = deleted.filter(|n| *n > 0) {
            tracing::debug!(
                deleted,
                "retention cleanup deleted delivered deliveries and dead letters"
            );
        }
        Ok(deleted)
    }

    /// Shuts down once: further calls wait for the first.
    pub(crate) async fn shutdown(&self) {
        self.stopped.get_or_init(|| self.stop()).await;
    }

    async fn stop(&self) {
        let runner = &self.runner;
        runner.drain();
        let deadline = Instant::now() + self.config.shutdown_grace;
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for task in [tasks.poller, tasks.dispatcher].into_iter().flatten() {
            if let Err(error) = task.await {
                tracing::error!(error = %Chain(&error), "a background task of the bus failed");
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if !runner.wait_for_listeners(remaining).await {
            tracing::warn!(grace = ?self.config.shutdown_grace, "listeners still running after the grace period; cancelling them");
            runner.phase.send_replace(Phase::Cancelling);
            runner.wait_for_listeners(Duration::from_secs(1)).await;
        }
        runner.close_reports();
        if let Some(completer) = tasks.completer {
            let flush = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(2);
            if tokio::time::timeout(flush, completer).await.is_err() {
                tracing::warn!(
                    "could not record every listener result before shutdown; those deliveries will run again after their leases"
                );
            }
        }
        runner.phase.send_replace(Phase::Stopped);
        tracing::info!("txbus shut down");
    }
}
