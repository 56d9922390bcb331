//! Runs deliveries: a bounded queue, a bound on concurrent listeners, a deadline per run (the end
//! of its lease), panics caught, and every result handed to the completer.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, ready};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::Instrument;

use crate::DeadReason;
use crate::listener::{Context, ListenerCall, ListenerDef, ListenerKind, State, TxListener};
use crate::store::{DeliveryKey, Outcome, Resolution};
use crate::{BoxFuture, EventSettings, ListenerError};

/// The longest part of a lease kept back from the listener, so that its result is recorded
/// before another instance may claim the delivery.
const MAX_SAFETY_MARGIN: Duration = Duration::from_secs(1);

/// Queue slots per concurrent listener, and at least this many.
const QUEUE_PER_LISTENER: usize = 16;
const MIN_QUEUE: usize = 1024;

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
    let lease = lease.min(crate::settings::MAX_DURATION);
    leased + lease - (lease / 10).min(MAX_SAFETY_MARGIN)
}

/// One delivery to run.
pub(crate) struct Job {
    pub(crate) key: DeliveryKey,
    pub(crate) def: &'static ListenerDef,
    pub(crate) payload: Arc<str>,
    pub(crate) emitted_at: SystemTime,
    pub(crate) deadline: Instant,
    /// When it became runnable here: its emit committed, or its claim returned.
    pub(crate) ready: Instant,
    pub(crate) settings: EventSettings,
    pub(crate) in_flight: InFlight,
    /// The span that emitted or claimed it: the listener's span follows from it.
    pub(crate) parent: Option<tracing::span::Id>,
}

/// A result on its way to the database; the guard keeps the bus busy until it is written.
pub(crate) struct Report {
    pub(crate) outcome: Outcome,
    pub(crate) _in_flight: InFlight,
}

/// Counts deliveries queued, running or not yet recorded, for `wait_idle`.
#[derive(Default)]
pub(crate) struct Tracker {
    count: AtomicUsize,
    idle: Notify,
}

impl Tracker {
    pub(crate) fn enter(self: &Arc<Self>) -> InFlight {
        self.count.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One delivery somewhere between its claim and its recorded result.
pub(crate) struct InFlight(Arc<Tracker>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
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
    state: Arc<State>,
    /// Runs the transactional listeners, when the binary has any.
    transactions: Option<Arc<dyn Transactions>>,
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
            state: Arc::new(state),
            transactions,
        });
        (runner, jobs, report_rx)
    }

    pub(crate) fn phase(&self) -> Phase {
        *self.phase.borrow()
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
            },
            _in_flight: job.in_flight,
        };
        // Without room, the lease runs out and the delivery becomes due by itself.
        if let Some(reports) = self.reports_sender() {
            let _ = reports.try_send(report);
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
        match permit {
            Some(permit) => {
                let Some(reports) = runner.reports_sender() else {
                    runner.release(job);
                    break;
                };
                let task = run(job, permit, runner.clone(), reports);
                tokio::spawn(task);
            }
            None => {
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

/// How one run ended.
pub(crate) enum Verdict {
    Succeeded,
    /// A transactional listener succeeded and its delivery was completed in its transaction.
    Recorded,
    /// A transactional listener's run had lost its lease: its transaction was rolled back.
    LostLease,
    Failed(ListenerError),
    Panicked(String),
    TimedOut(Duration),
    Cancelled,
}

impl Verdict {
    /// The `outcome` label of the run in metrics.
    fn outcome(&self) -> &'static str {
        match self {
            Self::Succeeded | Self::Recorded => "succeeded",
            Self::LostLease => "lost_lease",
            Self::Failed(error) if error.is_abort() => "aborted",
            Self::Failed(_) => "failed",
            Self::Panicked(_) => "panicked",
            Self::TimedOut(_) => "timed_out",
            Self::Cancelled => "cancelled",
        }
    }
}

async fn run(
    job: Job,
    permit: OwnedSemaphorePermit,
    runner: Arc<Runner>,
    reports: mpsc::Sender<Report>,
) {
    // A root of its own, even when its first stretch runs inside the emitter's span.
    let span = tracing::info_span!(
        parent: None,
        "txbus.listener",
        event = job.def.event,
        event_id = %job.key.event_id,
        listener = job.def.id,
        attempt = job.key.attempt,
    );
    span.follows_from(job.parent.clone());
    let started = Instant::now();
    if started >= job.deadline {
        // The lease ran out while it waited (a slow claim, a busy process): not started, so it
        // is handed back with its attempt undone, and no attempt is counted that never ran.
        // The hand-back is fenced by the attempt: if another instance claimed it meanwhile, its
        // claim stands.
        span.in_scope(|| {
            tracing::debug!("lease ran out before the listener could start; handing it back");
        });
        let report = Report {
            outcome: Outcome {
                key: job.key,
                resolution: Resolution::Release {
                    undo_attempt: true,
                    error: Some(
                        "the lease ran out before the listener could start; handed back".into(),
                    ),
                },
            },
            _in_flight: job.in_flight,
        };
        let _ = reports.send(report).await;
        drop(permit);
        runner.freed.notify_one();
        return;
    }
    let verdict = execute(&job, &runner).instrument(span.clone()).await;
    crate::metrics::ran(job.def.id, verdict.outcome(), started.elapsed());
    let resolution = {
        let _enter = span.enter();
        resolve(verdict, &job, started)
    };
    if let Some(resolution) = resolution {
        let report = Report {
            outcome: Outcome {
                key: job.key,
                resolution,
            },
            _in_flight: job.in_flight,
        };
        // Holding the permit while the completer is behind slows the poller down with it.
        let _ = reports.send(report).await;
    }
    drop(permit);
    runner.freed.notify_one();
}

async fn execute(job: &Job, runner: &Runner) -> Verdict {
    let ctx = Context {
        event_id: job.key.event_id,
        listener: job.def.id,
        event: job.def.event,
        attempt: job.key.attempt,
        emitted_at: job.emitted_at,
        waited: job.ready.elapsed(),
        state: runner.state.clone(),
    };
    let mut phase = runner.phase.subscribe();
    let run = async {
        match &job.def.kind {
            ListenerKind::Plain(call) => plain(job, *call, ctx).await,
            ListenerKind::Transactional(listener) => match &runner.transactions {
                Some(transactions) => transactions.run(job, ctx, listener).await,
                None => Verdict::Failed("no transactional runner".into()),
            },
        }
    };
    tokio::select! {
        biased;
        _ = phase.wait_for(|p| *p >= Phase::Cancelling) => Verdict::Cancelled,
        verdict = run => verdict,
    }
}

async fn plain(job: &Job, call: fn(&str, Context) -> ListenerCall, ctx: Context) -> Verdict {
    let begun = Instant::now();
    match run_listener(job.deadline, || call(&job.payload, ctx)).await {
        Ran::Succeeded => Verdict::Succeeded,
        Ran::Failed(error) => Verdict::Failed(error),
        Ran::Panicked(message) => Verdict::Panicked(message),
        Ran::TimedOut => Verdict::TimedOut(begun.elapsed()),
    }
}

/// How a listener's own code ended.
pub(crate) enum Ran {
    Succeeded,
    Failed(ListenerError),
    Panicked(String),
    TimedOut,
}

/// Starts a listener and runs it until `deadline`, catching panics; the future is dropped
/// (cancelled) when the deadline passes.
pub(crate) async fn run_listener<'a>(
    deadline: Instant,
    start: impl FnOnce() -> Result<BoxFuture<'a, Result<(), ListenerError>>, ListenerError>,
) -> Ran {
    let future = match std::panic::catch_unwind(AssertUnwindSafe(start)) {
        Ok(Ok(future)) => future,
        Ok(Err(error)) => return Ran::Failed(error),
        Err(panic) => return Ran::Panicked(panic_message(&*panic)),
    };
    let deadline = tokio::time::Instant::from_std(deadline);
    match tokio::time::timeout_at(deadline, CatchUnwind(future)).await {
        Ok(Ok(Ok(()))) => Ran::Succeeded,
        Ok(Ok(Err(error))) => Ran::Failed(error),
        Ok(Err(message)) => Ran::Panicked(message),
        Err(_) => Ran::TimedOut,
    }
}

/// Runs transactional listeners; built for the bus's backend and pool, and kept erased here.
pub(crate) trait Transactions: Send + Sync {
    fn run<'a>(
        &'a self,
        job: &'a Job,
        ctx: Context,
        listener: &'a TxListener,
    ) -> BoxFuture<'a, Verdict>;
}

/// Turns a verdict into what the database should record, logging failures.
fn resolve(verdict: Verdict, job: &Job, started: Instant) -> Option<Resolution> {
    let attempt = job.key.attempt;
    let settings = &job.settings;
    let (error, requested_delay) = match verdict {
        Verdict::Succeeded => {
            tracing::debug!(elapsed = ?started.elapsed(), "listener succeeded");
            return Some(Resolution::Done);
        }
        Verdict::Recorded => {
            tracing::debug!(elapsed = ?started.elapsed(), "transactional listener succeeded and committed");
            return None;
        }
        Verdict::LostLease => {
            tracing::warn!(
                "transactional listener finished after its lease passed; rolled back, another run holds the delivery"
            );
            return None;
        }
        Verdict::Cancelled => {
            tracing::info!("listener cancelled by shutdown; released for a later run");
            return Some(Resolution::Release {
                undo_attempt: false,
                error: Some("cancelled: the bus shut down before the listener finished".to_owned()),
            });
        }
        Verdict::Failed(error) if error.is_abort() => {
            let error = error.to_string();
            tracing::warn!(%error, "listener failed and aborted the delivery");
            return Some(Resolution::Dead {
                reason: DeadReason::Aborted,
                error,
            });
        }
        Verdict::Failed(error) => (error.to_string(), error.retry_delay()),
        Verdict::Panicked(message) => (format!("panicked: {message}"), None),
        Verdict::TimedOut(elapsed) => (
            format!(
                "timed out after {elapsed:?} and was cancelled (max_execution_time {:?})",
                settings.get_max_execution_time()
            ),
            None,
        ),
    };
    if settings.attempts_exhausted(attempt) {
        tracing::warn!(%error, "listener failed its last attempt");
        return Some(Resolution::Dead {
            reason: DeadReason::MaxAttempts,
            error,
        });
    }
    let delay = requested_delay.unwrap_or_else(|| settings.retry_delay(attempt));
    tracing::warn!(%error, retry_in = ?delay, "listener failed");
    Some(Resolution::Retry { delay, error })
}

/// Polls a listener future, turning a panic into an error message.
struct CatchUnwind<'a>(BoxFuture<'a, Result<(), ListenerError>>);

impl Future for CatchUnwind<'_> {
    type Output = Result<Result<(), ListenerError>, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let future = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(poll) => Poll::Ready(Ok(ready!(poll))),
            Err(panic) => Poll::Ready(Err(panic_message(&*panic))),
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn catch_unwind_turns_panics_into_messages() {
        let ok = CatchUnwind(Box::pin(async { Ok(()) })).await;
        assert!(matches!(ok, Ok(Ok(()))));
        let panicked = CatchUnwind(Box::pin(async { panic!("boom {}", 1) })).await;
        assert_eq!(panicked.unwrap_err(), "boom 1");
    }

    #[tokio::test]
    async fn tracker_waits_for_every_guard() {
        let tracker = Arc::new(Tracker::default());
        tracker.wait_idle().await;
        let a = tracker.enter();
        let b = tracker.enter();
        let waiter = tokio::spawn({
            let tracker = tracker.clone();
            async move { tracker.wait_idle().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }

    fn never_called(_: &str, _: Context) -> ListenerCall {
        Err("the listener must not start".into())
    }

    static LATE: ListenerDef = ListenerDef {
        id: "test.late",
        aliases: &[],
        event: "test.event",
        event_type: || "TestEvent",
        kind: ListenerKind::Plain(never_called),
        file: file!(),
        line: line!(),
    };

    #[tokio::test]
    async fn a_run_whose_lease_ran_out_before_it_started_is_handed_back_with_its_attempt() {
        let (runner, _jobs, mut reports) = Runner::new(4, State::default(), None);
        let now = Instant::now();
        let key = DeliveryKey {
            event_id: crate::EventId::new(7),
            listener: LATE.id,
            attempt: 3,
        };
        let job = Job {
            key,
            def: &LATE,
            payload: "{}".into(),
            emitted_at: SystemTime::now(),
            deadline: now,
            ready: now,
            settings: EventSettings::default(),
            in_flight: runner.tracker.enter(),
            parent: None,
        };
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
        }) = report
        else {
            panic!("expected a hand-back with the attempt undone, got {report:?}");
        };
        assert_eq!(reported, key);
        assert!(error.contains("lease ran out"), "{error}");
    }
}
