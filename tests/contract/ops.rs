//! Operating the bus: statistics, dead letters and replay, purge, retention, stale leases.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use txbus::{
    Context, DeadLetterQuery, DeadReason, EventBus, EventSettings, InboxMessage, InboxStore,
    ListenerError, MessageId, Pool,
};

use crate::support::backends::{RowLocks, exec};
use crate::support::{HOUR, Probe, TestBackend, bus, eventually, idle};

/// What the listeners of this module do: fail (or hang) until the test says it is fixed.
#[derive(Default)]
struct Fixed(AtomicBool);

fn fixed(ctx: &Context) -> Result<bool, ListenerError> {
    Ok(ctx.state::<Arc<Fixed>>()?.0.load(Ordering::SeqCst))
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.ops.job")]
struct Job {
    mode: String,
}

impl Job {
    fn new(mode: &str) -> Self {
        Self { mode: mode.into() }
    }
}

#[txbus::listener(name = "contract.ops.worker")]
async fn worker(job: Job, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, job.mode.clone());
    if fixed(&ctx)? {
        return Ok(());
    }
    match job.mode.as_str() {
        "hang" => std::future::pending().await,
        "fail" => Err("the worker failed".into()),
        "abort" => Err(ListenerError::abort("the job is invalid")),
        _ => Ok(()),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.ops.expiring")]
struct Expiring {
    n: u32,
}

#[txbus::listener(name = "contract.ops.expiring_worker")]
async fn expiring_worker(_event: Expiring, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "expiring");
    if fixed(&ctx)? {
        Ok(())
    } else {
        Err("the partner is down".into())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.ops.limited")]
struct Limited {
    n: u32,
}

#[txbus::listener(name = "contract.ops.limited_worker")]
async fn limited_worker(_event: Limited, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "limited");
    if fixed(&ctx)? {
        Ok(())
    } else {
        Err("still failing".into())
    }
}

/// An event no listener of this binary takes.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.ops.unheard")]
struct Unheard {
    n: u32,
}

/// A bus without a poller, with long retries, so that states stay put.
async fn quiet_bus<B: TestBackend>(
    pool: Pool<B>,
    probe: &Arc<Probe>,
    fixed: &Arc<Fixed>,
) -> EventBus<B> {
    bus(pool, probe)
        .state(fixed.clone())
        .event::<Job>(
            EventSettings::default()
                .max_execution_time(Duration::from_secs(60))
                .retry_after(HOUR)
                .expires_after(Duration::from_secs(2 * 3600)),
        )
        .poller(false)
        .shutdown_grace(Duration::from_millis(100))
        .build()
        .await
        .unwrap()
}

pub async fn stats_count_every_state<B: TestBackend>() {
    let db = B::open().await;
    let (probe, fixed) = (Probe::new(), Arc::new(Fixed::default()));
    let bus = quiet_bus(db.pool.clone(), &probe, &fixed).await;
    let mut hung = Vec::new();
    for _ in 0..2 {
        hung.push(bus.emit(Job::new("hang"), []).await.unwrap());
    }
    for mode in ["fail", "fail", "fail", "abort", "ok"] {
        bus.emit(Job::new(mode), []).await.unwrap();
    }
    // Due now and never leased: as if emitted by a process that crashed before dispatching.
    let backlog = |n: usize| (0..n).map(|_| r#"{"mode":"hang"}"#.to_owned()).collect();
    B::insert_backlog(
        &db.pool,
        "contract.ops.job",
        backlog(4),
        "contract.ops.worker".into(),
        HOUR,
    )
    .await;
    B::insert_backlog(
        &db.pool,
        "contract.ops.job",
        backlog(2),
        "contract.ops.gone".into(),
        HOUR,
    )
    .await;
    // One hung run's lease has passed: as if its process had died.
    exec(
        &db.pool,
        &format!(
            "UPDATE txbus_deliveries SET available_at = emitted_at WHERE event_id = {}",
            hung[0]
        ),
    )
    .await;
    for n in 0..2 {
        let _ = bus
            .receive(MessageId::new("ops", n.to_string()), Unheard { n })
            .await
            .unwrap();
    }
    let store = InboxStore::new(db.pool.clone());
    store
        .store_message(&InboxMessage::new(MessageId::new("ops", "kept"), &1).unwrap())
        .await
        .unwrap();

    // The results are written in batches: wait for the success too (its row deleted).
    let stats = eventually("the results of the runs to be recorded", || async {
        let stats = bus.stats().await.unwrap();
        let worker = stats.listeners["contract.ops.worker"];
        (worker.retrying == 3 && worker.dead == 1 && worker.pending() == 9).then_some(stats)
    })
    .await;
    let worker = stats.listeners["contract.ops.worker"];
    assert_eq!(
        (
            worker.due,
            worker.running,
            worker.stale,
            worker.retrying,
            worker.dead,
            worker.delivered
        ),
        (4, 1, 1, 3, 1, 0),
        "{worker:?}"
    );
    assert_eq!(worker.pending(), 9);
    let gone = stats.listeners["contract.ops.gone"];
    assert_eq!((gone.due, gone.pending()), (2, 2));
    assert_eq!(stats.orphans.len(), 1);
    assert_eq!(stats.orphans["contract.ops.gone"], 2);
    assert_eq!(
        (stats.total.due, stats.total.pending(), stats.total.dead),
        (6, 11, 1)
    );
    let age = stats.total.oldest_pending_age.unwrap();
    assert!(age < Duration::from_secs(60), "{age:?}");
    // Listeners of this bus without deliveries are listed with zeros.
    assert_eq!(stats.listeners["contract.ops.limited_worker"].pending(), 0);
    assert_eq!((stats.inbox_ids, stats.inbox_messages), (2, 1));

    // Releasing the stale lease makes it due.
    assert_eq!(bus.release_stale().await.unwrap(), 1);
    assert_eq!(bus.release_stale().await.unwrap(), 0);
    let worker = bus.stats().await.unwrap().listeners["contract.ops.worker"];
    assert_eq!(
        (worker.due, worker.running, worker.stale),
        (5, 1, 0),
        "{worker:?}"
    );
    bus.shutdown().await;

    // A bus with a poller runs it, and the other due ones.
    fixed.0.store(true, Ordering::SeqCst);
    let bus = crate::support::bus(db.pool.clone(), &probe)
        .state(fixed.clone())
        .build()
        .await
        .unwrap();
    probe
        .wait_until("the released delivery to run again", |calls| {
            calls
                .iter()
                .any(|c| c.event_id == hung[0] && c.attempt == 2)
        })
        .await;
    bus.shutdown().await;
}

/// A bus with one event type per way of dying.
async fn dying_bus<B: TestBackend>(
    pool: Pool<B>,
    probe: &Arc<Probe>,
    fixed: &Arc<Fixed>,
) -> EventBus<B> {
    bus(pool, probe)
        .state(fixed.clone())
        .retry_every(Duration::from_millis(20))
        .event::<Expiring>(
            EventSettings::default()
                .expires_after(Duration::from_millis(300))
                .max_execution_time(Duration::from_millis(100))
                .retry_after(Duration::from_secs(1)),
        )
        .event::<Limited>(EventSettings::default().max_attempts(1))
        .build()
        .await
        .unwrap()
}

pub async fn dead_letters_tell_why_and_replay<B: TestBackend>() {
    let db = B::open().await;
    let (probe, fixed) = (Probe::new(), Arc::new(Fixed::default()));
    let bus = dying_bus(db.pool.clone(), &probe, &fixed).await;
    let started = SystemTime::now() - Duration::from_secs(5);
    let expired_id = bus.emit(Expiring { n: 1 }, []).await.unwrap();
    let aborted_id = bus.emit(Job::new("abort"), []).await.unwrap();
    let limited_id = bus.emit(Limited { n: 2 }, []).await.unwrap();
    let (expired, aborted, limited) = (expired_id.get(), aborted_id.get(), limited_id.get());
    let orphan = B::insert_backlog(
        &db.pool,
        "contract.ops.job",
        vec![r#"{"mode":"ok"}"#.into()],
        "contract.ops.gone".into(),
        Duration::from_millis(100),
    )
    .await[0];

    let dead = eventually("four dead letters", || async {
        let dead = bus.dead_letters(DeadLetterQuery::new()).await.unwrap();
        (dead.len() == 4).then_some(dead)
    })
    .await;
    let reason_of = |id| dead.iter().find(|d| d.event_id.get() == id).unwrap().reason;
    assert_eq!(reason_of(expired), DeadReason::Expired);
    assert_eq!(reason_of(limited), DeadReason::MaxAttempts);
    assert_eq!(reason_of(aborted), DeadReason::Aborted);
    assert_eq!(reason_of(orphan), DeadReason::NoListener);
    assert!(
        dead.windows(2).all(|w| w[0].died_at >= w[1].died_at),
        "newest first"
    );
    let aborted_letter = dead.iter().find(|d| d.event_id == aborted_id).unwrap();
    assert_eq!(aborted_letter.listener, "contract.ops.worker");
    assert_eq!(aborted_letter.event_name, "contract.ops.job");
    assert_eq!(aborted_letter.attempts, 1);
    assert_eq!(
        aborted_letter.last_error.as_deref(),
        Some("the job is invalid")
    );
    assert_eq!(aborted_letter.payload_as::<Job>().unwrap().mode, "abort");
    assert!(aborted_letter.emitted_at <= aborted_letter.died_at);
    assert!(aborted_letter.died_at >= started);

    // Filters.
    let only = |query: DeadLetterQuery| {
        let bus = bus.clone();
        async move {
            let mut ids: Vec<_> = bus
                .dead_letters(query)
                .await
                .unwrap()
                .into_iter()
                .map(|d| d.event_id.get())
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(
        only(DeadLetterQuery::new().listener("contract.ops.limited_worker")).await,
        [limited]
    );
    assert_eq!(
        only(DeadLetterQuery::new().event_name("contract.ops.job")).await,
        {
            let mut ids = vec![aborted, orphan];
            ids.sort();
            ids
        }
    );
    assert_eq!(
        only(DeadLetterQuery::new().event(expired_id)).await,
        [expired]
    );
    assert_eq!(only(DeadLetterQuery::new().limit(2)).await.len(), 2);
    let later = SystemTime::now() + HOUR;
    assert!(
        only(DeadLetterQuery::new().died_after(later))
            .await
            .is_empty()
    );
    assert_eq!(
        only(DeadLetterQuery::new().died_before(later)).await.len(),
        4
    );
    assert_eq!(
        only(DeadLetterQuery::new().died_after(started)).await.len(),
        4
    );

    // Replay one: it runs again and succeeds.
    fixed.0.store(true, Ordering::SeqCst);
    assert!(bus.replay(aborted_id, "contract.ops.worker").await.unwrap());
    assert!(
        !bus.replay(aborted_id, "contract.ops.worker").await.unwrap(),
        "no longer dead"
    );
    assert!(!bus.replay(aborted_id, "contract.ops.nobody").await.unwrap());
    probe
        .wait_until("the replayed delivery to succeed", |calls| {
            calls
                .iter()
                .any(|c| c.event_id == aborted_id && c.attempt == 2)
        })
        .await;

    // Replay by filter: only what matches.
    let replayed = bus
        .replay_dead(DeadLetterQuery::new().listener("contract.ops.expiring_worker"))
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    probe
        .wait_until("the replayed expired delivery to succeed", |calls| {
            calls
                .iter()
                .any(|c| c.event_id == expired_id && c.attempt >= 2)
        })
        .await;
    eventually("the replayed deliveries to be deleted", || async {
        let left = bus.dead_letters(DeadLetterQuery::new()).await.unwrap();
        let mut ids: Vec<_> = left.iter().map(|d| d.event_id.get()).collect();
        ids.sort();
        let mut expected = vec![limited, orphan];
        expected.sort();
        (ids == expected
            && B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 2)
            .then_some(())
    })
    .await;
    assert!(
        probe.calls_of("contract.ops.limited_worker").len() == 1,
        "not replayed"
    );

    // The rest, all at once.
    assert_eq!(bus.replay_dead(DeadLetterQuery::new()).await.unwrap(), 2);
    probe
        .wait_until("the replayed max_attempts delivery to succeed", |calls| {
            calls
                .iter()
                .any(|c| c.event_id == limited_id && c.attempt == 2)
        })
        .await;
    bus.shutdown().await;
}

pub async fn dead_letters_filter_by_reason_and_page<B: TestBackend>() {
    let db = B::open().await;
    let (probe, fixed) = (Probe::new(), Arc::new(Fixed::default()));
    let bus = dying_bus(db.pool.clone(), &probe, &fixed).await;
    let (mut aborted, mut limited) = (Vec::new(), Vec::new());
    for n in 0..3 {
        aborted.push(bus.emit(Job::new("abort"), []).await.unwrap().get());
        limited.push(bus.emit(Limited { n }, []).await.unwrap().get());
    }
    aborted.sort();
    limited.sort();
    let all = eventually("six dead letters", || async {
        let dead = bus.dead_letters(DeadLetterQuery::new()).await.unwrap();
        (dead.len() == 6).then_some(dead)
    })
    .await;
    let key = |d: &txbus::DeadLetter| (d.event_id.get(), d.listener.clone());
    let keys = |dead: &[txbus::DeadLetter]| dead.iter().map(key).collect::<Vec<_>>();
    let mut sorted = all.clone();
    sorted.sort_by(|a, b| {
        (b.died_at, b.event_id)
            .cmp(&(a.died_at, a.event_id))
            .then_with(|| a.listener.cmp(&b.listener))
    });
    assert_eq!(keys(&all), keys(&sorted), "newest first");

    // By reason: exactly those, alone or with other conditions.
    let ids = |query: DeadLetterQuery| {
        let bus = bus.clone();
        async move {
            let dead = bus.dead_letters(query).await.unwrap();
            let mut ids: Vec<_> = dead.iter().map(|d| d.event_id.get()).collect();
            ids.sort();
            (ids, dead.iter().map(|d| d.reason).collect::<Vec<_>>())
        }
    };
    let (ids_aborted, reasons) = ids(DeadLetterQuery::new().reason(DeadReason::Aborted)).await;
    assert_eq!(ids_aborted, aborted);
    assert!(reasons.iter().all(|r| *r == DeadReason::Aborted));
    let (ids_limited, reasons) = ids(DeadLetterQuery::new().reason(DeadReason::MaxAttempts)).await;
    assert_eq!(ids_limited, limited);
    assert!(reasons.iter().all(|r| *r == DeadReason::MaxAttempts));
    assert!(
        ids(DeadLetterQuery::new().reason(DeadReason::Expired))
            .await
            .0
            .is_empty()
    );
    assert!(
        ids(DeadLetterQuery::new()
            .reason(DeadReason::Aborted)
            .listener("contract.ops.limited_worker"))
        .await
        .0
        .is_empty()
    );
    assert_eq!(
        ids(DeadLetterQuery::new()
            .reason(DeadReason::MaxAttempts)
            .event(txbus::EventId::new(limited[1])))
        .await
        .0,
        [limited[1]]
    );

    // Pages of every size walk the whole list, newest first, without overlap or gap.
    for size in 1..=4 {
        let mut walked = Vec::new();
        let mut offset = 0;
        loop {
            let page = bus
                .dead_letters(DeadLetterQuery::new().offset(offset).limit(size))
                .await
                .unwrap();
            assert!(page.len() <= size);
            if page.is_empty() {
                break;
            }
            offset += page.len();
            walked.extend(page);
        }
        assert_eq!(keys(&walked), keys(&all), "pages of {size}");
    }
    // Pages of one reason are pages of its list.
    let of_reason = bus
        .dead_letters(DeadLetterQuery::new().reason(DeadReason::MaxAttempts))
        .await
        .unwrap();
    let second = bus
        .dead_letters(
            DeadLetterQuery::new()
                .reason(DeadReason::MaxAttempts)
                .offset(1)
                .limit(2),
        )
        .await
        .unwrap();
    assert_eq!(keys(&second), keys(&of_reason[1..3]));
    // The default limit applies after the offset; an offset past the end finds nothing.
    let rest = bus
        .dead_letters(DeadLetterQuery::new().offset(4))
        .await
        .unwrap();
    assert_eq!(keys(&rest), keys(&all[4..]));
    for offset in [6, usize::MAX] {
        assert!(
            bus.dead_letters(DeadLetterQuery::new().offset(offset))
                .await
                .unwrap()
                .is_empty()
        );
    }

    // Replay by reason: only those, whatever the offset.
    fixed.0.store(true, Ordering::SeqCst);
    assert_eq!(
        bus.replay_dead(DeadLetterQuery::new().reason(DeadReason::Expired))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        bus.replay_dead(
            DeadLetterQuery::new()
                .reason(DeadReason::MaxAttempts)
                .offset(2)
        )
        .await
        .unwrap(),
        3
    );
    probe
        .wait_until("the replayed max_attempts deliveries to succeed", |calls| {
            limited.iter().all(|id| {
                calls
                    .iter()
                    .any(|c| c.event_id.get() == *id && c.attempt == 2)
            })
        })
        .await;
    eventually("the replayed deliveries to be deleted", || async {
        let left = bus.dead_letters(DeadLetterQuery::new()).await.unwrap();
        let mut ids: Vec<_> = left.iter().map(|d| d.event_id.get()).collect();
        ids.sort();
        (ids == aborted
            && B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 3)
            .then_some(())
    })
    .await;
    assert_eq!(
        probe.calls_of("contract.ops.worker").len(),
        3,
        "the aborted ones are not replayed"
    );
    bus.shutdown().await;
}

/// Makes `n` deliveries of an unknown listener, doubles them `doublings` times, and makes them
/// all dead (as `aborted`) since their emit.
async fn dead_backlog<B: TestBackend>(pool: &Pool<B>, n: usize, doublings: u32) {
    let payloads = (0..n).map(|i| format!(r#"{{"n":{i}}}"#)).collect();
    B::insert_backlog(
        pool,
        "contract.ops.unheard",
        payloads,
        "contract.ops.gone".into(),
        HOUR,
    )
    .await;
    for _ in 0..doublings {
        let offset = B::count(pool, "SELECT max(event_id) AS n FROM txbus_deliveries").await;
        exec(
            pool,
            &format!(
                "INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, \
                 lease_ms, attempts, available_at, expires_at) \
                 SELECT event_id + {offset}, listener, event_name, payload, emitted_at, lease_ms, \
                 attempts, available_at, expires_at FROM txbus_deliveries"
            ),
        )
        .await;
    }
    exec(
        pool,
        "UPDATE txbus_deliveries SET dead_at = available_at, dead_reason = 'aborted' WHERE dead_at IS NULL",
    )
    .await;
}

pub async fn purge_removes_only_older_dead_letters<B: TestBackend>() {
    let db = B::open().await;
    let (probe, fixed) = (Probe::new(), Arc::new(Fixed::default()));
    let bus = quiet_bus(db.pool.clone(), &probe, &fixed).await;
    // Three dead letters an hour old, and a fresh one: ages an hour apart, whatever the load.
    dead_backlog(&db.pool, 3, 0).await;
    B::all_an_hour_before(&db.pool, "txbus_deliveries").await;
    let fresh = bus.emit(Job::new("abort"), []).await.unwrap();
    eventually("the fresh dead letter", || async {
        (bus.stats().await.unwrap().total.dead == 4).then_some(())
    })
    .await;
    let half_an_hour = HOUR / 2;
    assert_eq!(bus.purge_dead(half_an_hour).await.unwrap(), 3);
    let left = bus.dead_letters(DeadLetterQuery::new()).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].event_id, fresh);
    assert_eq!(bus.purge_dead(half_an_hour).await.unwrap(), 0);
    assert_eq!(bus.purge_dead(Duration::ZERO).await.unwrap(), 1);
    assert_eq!(
        B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await,
        0
    );
    bus.shutdown().await;
}

pub async fn retention_empties_the_table_after_its_windows<B: TestBackend>() {
    const EVENTS: usize = 20_000;
    let db = B::open().await;
    let (probe, fixed) = (Probe::new(), Arc::new(Fixed::default()));
    let bus = bus(db.pool.clone(), &probe)
        .state(fixed.clone())
        .retry_every(Duration::from_millis(20))
        .retain_delivered(Duration::from_secs(1))
        .retain_dead(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let emitters: Vec<_> = (0..8)
        .map(|task| {
            let bus = bus.clone();
            tokio::spawn(async move {
                for i in (task..EVENTS).step_by(8) {
                    let mode = if i % 4 == 0 { "abort" } else { "ok" };
                    bus.emit(Job::new(mode), []).await.unwrap();
                }
            })
        })
        .collect();
    for emitter in emitters {
        emitter.await.unwrap();
    }
    idle(&bus).await;
    let kept = bus.stats().await.unwrap().total;
    assert!(
        kept.delivered > 0,
        "successes are kept for a while: {kept:?}"
    );
    let emptied = Instant::now();
    eventually("the table to empty", || async {
        (B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;
    eprintln!(
        "[{}] {EVENTS} events: table empty {:?} after the last result",
        B::NAME,
        emptied.elapsed()
    );
    assert_eq!(probe.calls_of("contract.ops.worker").len(), EVENTS);
    bus.shutdown().await;
}

#[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
/// Two buses (pools, as two processes would have) run retention rounds at the same time, on
/// backends whose lock is taken without waiting: a round that overlaps another deletes nothing.
pub async fn cleanup_rounds_never_overlap<B: TestBackend + RowLocks>() {
    const ROWS: usize = 1 << 15;
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    dead_backlog(&db.pool, 1, 15).await;
    let start = |pool: Pool<B>| async move {
        EventBus::builder(pool)
            .retain_dead(Duration::ZERO)
            .poller(false)
            .build()
            .await
            .unwrap()
    };
    let (a, b) = (
        start(db.pool.clone()).await,
        start(db.another_pool().await).await,
    );
    let timed = |bus: EventBus<B>| async move {
        let begun = Instant::now();
        let deleted = bus.cleanup().await.unwrap();
        (begun, Instant::now(), deleted)
    };
    let mut total = 0;
    let mut skipped = 0;
    for _ in 0..20 {
        let (x, y) = tokio::join!(timed(a.clone()), timed(b.clone()));
        let overlapped = x.0 < y.1 && y.0 < x.1;
        let deleting = [x.2, y.2]
            .iter()
            .filter(|d| d.is_some_and(|n| n > 0))
            .count();
        assert!(
            !(overlapped && deleting == 2),
            "two overlapping rounds both deleted: {x:?} {y:?}"
        );
        skipped += [x.2, y.2].iter().filter(|d| d.is_none()).count();
        total += x.2.unwrap_or(0) + y.2.unwrap_or(0);
        if total >= ROWS as u64 {
            break;
        }
    }
    assert_eq!(total, ROWS as u64);
    assert!(skipped > 0, "some round found another one running");
    assert_eq!(
        B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await,
        0
    );
    a.shutdown().await;
    b.shutdown().await;
}

pub async fn operations_on_an_empty_bus<B: TestBackend>() {
    let db = B::open().await;
    let (probe, fixed) = (Probe::new(), Arc::new(Fixed::default()));
    let bus = quiet_bus(db.pool.clone(), &probe, &fixed).await;
    let stats = bus.stats().await.unwrap();
    assert_eq!(stats.total, Default::default());
    assert!(stats.orphans.is_empty());
    assert_eq!(stats.listeners["contract.ops.worker"], Default::default());
    assert!(
        bus.dead_letters(DeadLetterQuery::new())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(bus.replay_dead(DeadLetterQuery::new()).await.unwrap(), 0);
    assert_eq!(bus.purge_dead(Duration::ZERO).await.unwrap(), 0);
    assert_eq!(bus.release_stale().await.unwrap(), 0);
    // (`None` while the poller's own first round holds the lock.)
    eventually("a retention round of this call", || async {
        bus.cleanup().await.unwrap().inspect(|n| assert_eq!(*n, 0))
    })
    .await;
    bus.shutdown().await;
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.ops.renamed")]
struct Shipped {
    n: u32,
}

#[txbus::listener(
    name = "contract.ops.ship",
    aliases = ["contract::ops::ship_order", "contract.ops.shipping"]
)]
async fn ship(event: Shipped, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, event.n.to_string());
    Ok(())
}

pub async fn a_renamed_listener_runs_deliveries_of_its_aliases<B: TestBackend>() {
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    // Pending under the former ids, written before the rename.
    let old = B::insert_backlog(
        &db.pool,
        "contract.ops.renamed",
        vec![r#"{"n":1}"#.into(), r#"{"n":2}"#.into()],
        "contract::ops::ship_order".into(),
        HOUR,
    )
    .await;
    let older = B::insert_backlog(
        &db.pool,
        "contract.ops.renamed",
        vec![r#"{"n":3}"#.into()],
        "contract.ops.shipping".into(),
        HOUR,
    )
    .await;
    let (probe, fixed) = (Probe::new(), Arc::new(Fixed::default()));
    let quiet = quiet_bus(db.pool.clone(), &probe, &fixed).await;
    let stats = quiet.stats().await.unwrap();
    assert!(stats.orphans.is_empty(), "{:?}", stats.orphans);
    assert_eq!(stats.listeners["contract.ops.ship"].due, 3);
    assert!(!stats.listeners.contains_key("contract.ops.shipping"));
    quiet.shutdown().await;

    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();
    let calls = probe
        .wait_until("the three old deliveries", |calls| calls.len() == 3)
        .await;
    let mut ran: Vec<i64> = calls.iter().map(|c| c.event_id.get()).collect();
    ran.sort();
    assert_eq!(ran, [old[0], old[1], older[0]]);
    assert!(calls.iter().all(|c| c.listener == "contract.ops.ship"));
    eventually("the old deliveries to be deleted", || async {
        (B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;
    // New emits are stored under the new id.
    let id = bus.emit(Shipped { n: 4 }, []).await.unwrap();
    probe
        .wait_until("the new delivery", |calls| {
            calls.iter().any(|c| c.event_id == id)
        })
        .await;
    bus.shutdown().await;
}
