//! One run of a listener: until the end of its lease, its panics caught, its result reported.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tracing::Instrument;

use crate::delivery::{Outcome, Resolution};
use crate::dispatch::{Job, Phase, Report, Runner, retry};
use crate::listener::{Context, ListenerCall, ListenerError, ListenerKind, TxListener};

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

/// Runs transactional listeners; built for the bus's backend and pool, and kept erased here.
pub(crate) trait Transactions: Send + Sync {
    fn run<'a>(
        &'a self,
        job: &'a Job,
        ctx: Context,
        listener: &'a TxListener,
    ) -> BoxFuture<'a, Verdict>;
}

/// Runs `job` holding `permit`, and reports what the database should record.
pub(crate) async fn run(
    job: Job,
    permit: OwnedSemaphorePermit,
    runner: Arc<Runner>,
    reports: mpsc::Sender<Report>,
) {
    let span = span(&job);
    if job.trace.is_none() {
        // The emit's span, for subscribers that see no trace context (with one, the stored
        // context is the run's parent already).
        span.follows_from(job.parent.clone());
    }
    let started = Instant::now();
    let resolution = if started >= job.deadline {
        // The lease ran out while it waited (a slow claim, a busy process): not started, so it
        // is handed back with its attempt undone, and no attempt is counted that never ran.
        // The hand-back is fenced by the attempt: if another instance claimed it meanwhile, its
        // claim stands.
        span.in_scope(|| {
            tracing::debug!("lease ran out before the listener could start; handing it back");
        });
        Some(Resolution::Release {
            undo_attempt: true,
            error: Some("the lease ran out before the listener could start; handed back".into()),
        })
    } else {
        let verdict = execute(&job, &runner).instrument(span.clone()).await;
        crate::metrics::ran(job.def.id, verdict.outcome(), started.elapsed());
        let resolution =
            span.in_scope(|| retry::resolve(verdict, job.key.attempt, &job.settings, started));
        #[cfg(feature = "testing")]
        let resolution = runner.hooks.ran(resolution);
        resolution
    };
    if let Some(resolution) = resolution {
        let report = Report {
            outcome: Outcome {
                key: job.key,
                resolution,
                ordering_key: job.ordering_key,
            },
            _in_flight: job.in_flight,
        };
        // Holding the permit while the completer is behind slows the poller down with it.
        let _ = reports.send(report).await;
    } else if let Some(key) = job.ordering_key.clone() {
        // Recorded in the listener's own transaction (or left to the run that took its lease):
        // no result goes through the completer, whose write would wake the claim of the key's
        // next delivery. Wake it here, after the commit.
        runner.wake_heads([(job.key.listener, key)]);
    }
    drop(permit);
    runner.freed.notify_one();
}

/// The span of a run: a root of its own in `tracing`, even when its first stretch runs inside
/// the emitter's span; in OpenTelemetry, a child of the emit's stored trace context.
fn span(job: &Job) -> tracing::Span {
    #[cfg(not(feature = "opentelemetry"))]
    let span = tracing::info_span!(
        parent: None,
        "txbus.listener",
        event = job.def.event,
        event_id = %job.key.event_id,
        listener = job.def.id,
        attempt = job.key.attempt,
    );
    // With the OpenTelemetry messaging attributes of a message being processed.
    #[cfg(feature = "opentelemetry")]
    let span = tracing::info_span!(
        parent: None,
        "txbus.listener",
        event = job.def.event,
        event_id = %job.key.event_id,
        listener = job.def.id,
        attempt = job.key.attempt,
        otel.name = %format_args!("process {}", job.def.id),
        otel.kind = "consumer",
        messaging.system = "txbus",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = job.def.id,
        messaging.message.id = %job.key.event_id,
    );
    if let Some(stored) = &job.trace {
        crate::trace::set_parent(&span, stored);
    }
    span
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
        stored_version: job.version,
        ordering_key: job.ordering_key.clone(),
        trace: job.trace.clone(),
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
    match tokio::time::timeout_at(deadline, AssertUnwindSafe(future).catch_unwind()).await {
        Ok(Ok(Ok(()))) => Ran::Succeeded,
        Ok(Ok(Err(error))) => Ran::Failed(error),
        Ok(Err(panic)) => Ran::Panicked(panic_message(&*panic)),
        Err(_) => Ran::TimedOut,
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

    #[tokio::test]
    async fn panics_become_messages_and_deadlines_cancel() {
        let later = Instant::now() + Duration::from_secs(30);
        let ok = run_listener(later, || Ok(Box::pin(async { Ok(()) }))).await;
        assert!(matches!(ok, Ran::Succeeded));
        let panicked = run_listener(later, || Ok(Box::pin(async { panic!("boom {}", 1) }))).await;
        assert!(matches!(panicked, Ran::Panicked(message) if message == "boom 1"));
        let at_start = run_listener(later, || panic!("at start")).await;
        assert!(matches!(at_start, Ran::Panicked(message) if message == "at start"));
        let hung = run_listener(Instant::now(), || {
            Ok(Box::pin(std::future::pending::<Result<(), ListenerError>>()))
        })
        .await;
        assert!(matches!(hung, Ran::TimedOut));
    }
}
