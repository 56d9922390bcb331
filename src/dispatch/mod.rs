//! Runs deliveries: a bounded queue, a bound on concurrent listeners, a deadline per run (the end
//! of its lease), and every result handed to the completer.
//!
//! - this file: the bus's phases, the queue and the runner that starts listeners;
//! - `run`: one run of a listener, its panics caught, until its deadline;
//! - `retry`: what a run's end means for the delivery (retry when, or dead why);
//! - `tracker`: the deliveries in flight, for `wait_idle`;
//! - `transactional`: listeners that run in a transaction which also completes their delivery.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, Semaphore, mpsc, watch};

use crate::delivery::{DeliveryKey, Outcome, Resolution};
use crate::listener::{ListenerDef, State};
use crate::settings::{EventSettings, MAX_DURATION};

mod due;
#[cfg(feature = "testing")]
mod hooks;
mod retry;
mod run;
mod tracker;
mod transactional;

pub(crate) use due::wake_when_due;
#[cfg(feature = "testing")]
pub use hooks::{CrashPoint, RunReport};
#[cfg(feature = "testing")]
pub(crate) use hooks::{Emitted, Hooks};
pub(crate) use run::{Transactions, run};
pub(crate) use tracker::{InFlight, Tracker};
pub(crate) use transactional::PoolTransactions;

/// The longest part of a lease kept back from the listener, so that its result is recorded
/// before another instance may claim the delivery.
const MAX_SAFETY_MARGIN: Duration = Duration::from_secs(1);

/// Queue slots per concurrent listener, and at least this many.
const QUEUE_PER_LISTENER: usize = 16;
const MIN_QUEUE: usize = 1024;

/// How many ordering keys may wait for a claim of their heads before the list is cleared of
/// repeats (a key is never dropped: its next delivery may be parked, which only that claim
/// takes before the parking ends).
const DEDUP_HEADS_AT: usize = 4096;

/// Where the bus is in its life. Ordered: each phase follows the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// Emitting, dispatching, polling.
    Running,
    /// Shutting down: no polls, queued deliveries released, running ones finishing.
    Draining,
    /// The grace period is over: running listeners are cancelled.
    Cancelling,
    /// Done.
    Stopped,
}

/// The local deadline of a run leased at `leased` for `lease`: the lease's end less a margin.
pub(crate) fn deadline(leased: Instant, lease: Duration) -> Instant {
    // A lease read back from the database is clamped to what settings allow.
    let lease = lease.min(MAX_DURATION);
    leased + lease - (lease / 10).min(MAX_SAFETY_MARGIN)
}

/// One delivery to run.
pub(crate) struct Job {
    pub(crate) key: DeliveryKey,
    pub(crate) def: &'static ListenerDef,
    pub(crate) payload: Arc<str>,
    /// The version of the event's type that wrote the payload.
    pub(crate) version: u32,
    /// The event's ordering key.
    pub(crate) ordering_key: Option<Arc<str>>,
    pub(crate) emitted_at: SystemTime,
    pub(crate) deadline: Instant,
    /// When it became runnable here: its emit committed, or its claim returned.
    pub(crate) ready: Instant,
    pub(crate) settings: EventSettings,
    pub(crate) in_flight: InFlight,
    /// The span that emitted or claimed it: the listener's span follows from it.
    pub(crate) parent: Option<tracing::span::Id>,
    /// The stored trace context of the emit: the listener's span is its child.
    pub(crate) trace: Option<Arc<str>>,
}

/// A result on its way to the database; the guard keeps the bus busy until it is written.
pub(crate) struct Report {
    pub(crate) outcome: Outcome,
    pub(crate) _in_flight: InFlight,
}

/// The dispatcher shared by emitters, the poller and the listener tasks.
pub(crate) struct Runner {
    queue: mpsc::Sender<Job>,
    queue_capacity: usize,
    permits: Arc<Semaphore>,
    max_concurrent: usize,
    reports: Mutex<Option<mpsc::Sender<Report>>>,
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) phase: watch::Sender<Phase>,
    /// Signalled when a listener finishes, so the poller can claim more.
    pub(crate) freed: Notify,
    /// Signalled when a retry or a scheduled event written by this process falls due, so the
    /// poller claims it then rather than at its next tick.
    pub(crate) retry_due: Notify,
    /// Tasks waiting to signal [`retry_due`](Self::retry_due).
    pub(crate) due_timers: AtomicUsize,
    /// Ordering keys whose head may have changed, per listener: an event of the key was
    /// emitted here, or a run of it finished. The poller claims their heads.
    heads: Mutex<Vec<(&'static str, Arc<str>)>>,
    /// Signalled when [`heads`](Self::heads) has keys.
    pub(crate) heads_ready: Notify,
    state: Arc<State>,
    /// Runs the transactional listeners, when the binary has any.
    transactions: Option<Arc<dyn Transactions>>,
    /// What the test kit sees and changes.
    #[cfg(feature = "testing")]
    pub(crate) hooks: Hooks,
}

impl Runner {
    /// A runner, the receiving end of its queue (for [`dispatch_loop`]) and of its reports (for
    /// the completer).
    pub(crate) fn new(
        max_concurrent: usize,
        state: State,
        transactions: Option<Arc<dyn Transactions>>,
    ) -> (Arc<Self>, mpsc::Receiver<Job>, mpsc::Receiver<Report>) {
        // Room for bursts (a transaction that emits a hundred events) without handing them back
        // to the database; what a sustained overload would pile up beyond it goes to the poller.
        let queue_capacity = max_concurrent
            .saturating_mul(QUEUE_PER_LISTENER)
            .max(MIN_QUEUE);
        let (queue, jobs) = mpsc::channel(queue_capacity);
        let (reports, report_rx) = mpsc::channel(max_concurrent.max(64) * 4);
        let runner = Arc::new(Self {
            queue,
            queue_capacity,
            permits: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            reports: Mutex::new(Some(reports)),
            tracker: Arc::default(),
            phase: watch::Sender::new(Phase::Running),
            freed: Notify::new(),
            retry_due: Notify::new(),
            due_timers: AtomicUsize::new(0),
            heads: Mutex::new(Vec::new()),
            heads_ready: Notify::new(),
            state: Arc::new(state),
            transactions,
            #[cfg(feature = "testing")]
            hooks: Hooks::default(),
        });
        (runner, jobs, report_rx)
    }

    /// Asks the poller to claim the heads of these keys (see [`heads`](Self::heads)).
    pub(crate) fn wake_heads(&self, keys: impl IntoIterator<Item = (&'static str, Arc<str>)>) {
        let mut heads = self.heads.lock().unwrap_or_else(PoisonError::into_inner);
        let before = heads.len();
        heads.extend(keys);
        if heads.len() == before {
            return;
        }
        // Each time the list doubles past the threshold: amortized, the cost stays linear.
        if heads.len() >= DEDUP_HEADS_AT
            && heads.len().next_power_of_two() != before.next_power_of_two()
        {
            heads.sort_unstable();
            heads.dedup();
        }
        self.heads_ready.notify_one();
    }

    /// Puts back keys that [`take_heads`](Self::take_heads) took for a claim that failed, for
    /// the poller's next claim of heads (at its next poll: no wake-up, so that a database that
    /// keeps failing is not asked again at once). Dropping them would leave a parked delivery
    /// of theirs to the end of its parking.
    pub(crate) fn return_heads(&self, keys: Vec<(&'static str, Arc<str>)>) {
        self.heads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(keys);
    }

    /// Up to `n` of the keys waiting for a claim of their heads, each once.
    pub(crate) fn take_heads(&self, n: usize) -> Vec<(&'static str, Arc<str>)> {
        let mut heads = self.heads.lock().unwrap_or_else(PoisonError::into_inner);
        heads.sort_unstable();
        heads.dedup();
        let rest = heads.len().saturating_sub(n);
        let taken = heads.split_off(rest);
        if !heads.is_empty() {
            self.heads_ready.notify_one();
        }
        taken
    }

    pub(crate) fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Moves from running to draining; whether it was running.
    pub(crate) fn drain(&self) -> bool {
        self.phase.send_if_modified(|phase| {
            let running = *phase == Phase::Running;
            if running {
                *phase = Phase::Draining;
            }
            running
        })
    }

    /// How many deliveries the poller may claim now: what can start without waiting.
    pub(crate) fn room(&self, limit: usize) -> usize {
        let queued = self.queue_capacity - self.queue.capacity();
        self.permits
            .available_permits()
            .saturating_sub(queued)
            .min(limit)
    }

    /// Queues a delivery; when the queue is full or closed, hands it back to the database at once
    /// so that any instance's poller runs it.
    ///
    /// When nothing waits ahead of it and a permit is free, the listener starts right here:
    /// with `inline`, in the caller's task until it first waits (and a task of its own takes it
    /// from there), otherwise in a task of its own.
    pub(crate) fn submit(self: &Arc<Self>, job: Job, inline: bool) {
        if self.phase() >= Phase::Draining {
            self.release(job);
            return;
        }
        if self.queue.capacity() == self.queue_capacity
            && let Ok(permit) = self.permits.clone().try_acquire_owned()
            && let Some(reports) = self.reports_sender()
        {
            let mut task = Box::pin(run(job, permit, self.clone(), reports));
            // A spawned task would wait for its worker's queue: behind every task ready there,
            // as soon as the caller's next statement wakes its connection's task. The first
            // poll's waker may be a no-op: the spawned task polls it again before anything
            // could be missed, and every future keeps the waker of its latest poll.
            if !inline
                || task
                    .as_mut()
                    .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
                    .is_pending()
            {
                tokio::spawn(task);
            }
            return;
        }
        if let Err(error) = self.queue.try_send(job) {
            let job = match error {
                mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job) => {
                    job
                }
            };
            tracing::debug!(event_id = %job.key.event_id, listener = job.def.id,
                "dispatch queue full; leaving the delivery to the poller");
            self.release(job);
        }
    }

    /// Gives a delivery that was not started back to the database.
    pub(crate) fn release(&self, job: Job) {
        let report = Report {
            outcome: Outcome {
                key: job.key,
                resolution: Resolution::Release {
                    undo_attempt: true,
                    error: None,
                },
                ordering_key: job.ordering_key,
            },
            _in_flight: job.in_flight,
        };
        let Some(reports) = self.reports_sender() else {
            // The bus is past recording anything: the lease runs out and the delivery becomes
            // due by itself.
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(report)) = reports.try_send(report) {
            // The completer is behind: wait for room in a task of its own, so that the delivery
            // is due again in moments rather than after its lease. The report keeps the bus
            // busy, so the completer outlives the wait.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move {
                        let _ = reports.send(report).await;
                    });
                }
                Err(_) => tracing::debug!(event_id = %report.outcome.key.event_id,
                    "no runtime to hand a delivery back on; it runs again after its lease"),
            }
        }
    }

    fn reports_sender(&self) -> Option<mpsc::Sender<Report>> {
        self.reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Closes the report channel once nothing will report any more, so the completer finishes.
    pub(crate) fn close_reports(&self) {
        self.reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Waits until no listener runs, for at most `timeout`. Returns whether that happened.
    pub(crate) async fn wait_for_listeners(&self, timeout: Duration) -> bool {
        let all = u32::try_from(self.max_concurrent).unwrap_or(u32::MAX);
        tokio::time::timeout(timeout, self.permits.acquire_many(all))
            .await
            .is_ok_and(|permits| permits.is_ok())
    }
}

/// Takes queued deliveries and starts each when a concurrency permit is free. On shutdown it
/// releases what is still queued.
pub(crate) async fn dispatch_loop(runner: Arc<Runner>, mut jobs: mpsc::Receiver<Job>) {
    let mut phase = runner.phase.subscribe();
    loop {
        let job = tokio::select! {
            job = jobs.recv() => job,
            _ = phase.wait_for(|p| *p >= Phase::Draining) => None,
        };
        let Some(job) = job else { break };
        let permit = tokio::select! {
            permit = runner.permits.clone().acquire_owned() => permit.ok(),
            _ = phase.wait_for(|p| *p >= Phase::Draining) => None,
        };
        let reports = runner.reports_sender();
        match (permit, reports) {
            (Some(permit), Some(reports)) => {
                tokio::spawn(run(job, permit, runner.clone(), reports));
            }
            _ => {
                runner.release(job);
                break;
            }
        }
    }
    jobs.close();
    while let Ok(job) = jobs.try_recv() {
        runner.release(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::{Context, ListenerCall, ListenerKind};

    #[test]
    fn deadline_keeps_a_margin_of_a_tenth_up_to_a_second() {
        let t = Instant::now();
        assert_eq!(
            deadline(t, Duration::from_millis(500)),
            t + Duration::from_millis(450)
        );
        assert_eq!(
            deadline(t, Duration::from_secs(30)),
            t + Duration::from_secs(29)
        );
    }

    fn never_called(_: &str, _: Context) -> ListenerCall {
        Err("the listener must not start".into())
    }

    static LATE: ListenerDef = ListenerDef {
        id: "test.late",
        aliases: &[],
        event: "test.event",
        event_type: || "TestEvent",
        version: 1,
        kind: ListenerKind::Plain(never_called),
        file: file!(),
        line: line!(),
    };

    fn job(runner: &Runner, event_id: i64, attempt: u32, deadline: Instant) -> Job {
        Job {
            key: DeliveryKey {
                event_id: crate::event::EventId::new(event_id),
                listener: LATE.id,
                attempt,
            },
            def: &LATE,
            payload: "{}".into(),
            version: 1,
            ordering_key: None,
            emitted_at: SystemTime::now(),
            deadline,
            ready: Instant::now(),
            settings: EventSettings::default(),
            in_flight: runner.tracker.enter(),
            parent: None,
            trace: None,
        }
    }

    #[tokio::test]
    async fn a_run_whose_lease_ran_out_before_it_started_is_handed_back_with_its_attempt() {
        let (runner, _jobs, mut reports) = Runner::new(4, State::default(), None);
        let job = job(&runner, 7, 3, Instant::now());
        let key = job.key;
        runner.submit(job, false);
        let report = tokio::time::timeout(Duration::from_secs(5), reports.recv())
            .await
            .ok()
            .flatten()
            .map(|report| report.outcome);
        let Some(Outcome {
            key: reported,
            resolution:
                Resolution::Release {
                    undo_attempt: true,
                    error: Some(error),
                },
            ..
        }) = report
        else {
            panic!("expected a hand-back with the attempt undone, got {report:?}");
        };
        assert_eq!(reported, key);
        assert!(error.contains("lease ran out"), "{error}");
    }

    #[tokio::test]
    async fn hand_backs_beyond_the_completers_room_wait_for_it_instead_of_being_dropped() {
        let (runner, _jobs, mut reports) = Runner::new(1, State::default(), None);
        let room = 64 * 4;
        let later = Instant::now() + Duration::from_secs(60);
        for id in 0..room as i64 + 10 {
            runner.release(job(&runner, id, 1, later));
        }
        let mut handed_back = Vec::new();
        while handed_back.len() < room + 10 {
            let Ok(Some(report)) =
                tokio::time::timeout(Duration::from_secs(30), reports.recv()).await
            else {
                panic!(
                    "only {} of {} hand-backs arrived",
                    handed_back.len(),
                    room + 10
                );
            };
            handed_back.push(report.outcome.key.event_id.get());
        }
        handed_back.sort_unstable();
        assert_eq!(handed_back, (0..room as i64 + 10).collect::<Vec<_>>());
    }
}
