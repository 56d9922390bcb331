//! Ordering per key: one run at a time and in event-id order for each listener and key, keys
//! independent of each other, dead heads that let the key go on or hold it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use txbus::{Context, EventId, ListenerError};

use crate::support::{PATIENCE, Probe, TestBackend, bus, fast_settings};

/// An event keyed by its account, with a hand-written `ordering_key`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Keyed {
    account: String,
    /// Fail every run of this event (a key whose head keeps failing).
    #[serde(default)]
    always_fail: bool,
}

impl txbus::Event for Keyed {
    const NAME: &'static str = "contract.keyed";

    fn ordering_key(&self) -> Option<String> {
        Some(self.account.clone())
    }
}

/// One run of a keyed delivery, as its listener saw it.
#[derive(Debug, Clone)]
struct Run {
    key: String,
    event_id: EventId,
    started: Instant,
    ended: Instant,
    ok: bool,
}

/// The runs of `keyed_run`, from every bus of a test.
#[derive(Default)]
struct Runs(Mutex<Vec<Run>>);

impl Runs {
    fn all(&self) -> Vec<Run> {
        self.0.lock().unwrap().clone()
    }
}

/// A cheap, deterministic "random" number from an event id and an attempt.
fn mix(event_id: EventId, attempt: u32) -> u64 {
    let mut x = (event_id.get() as u64) ^ (u64::from(attempt) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

/// Sleeps 0 to 3 ms and fails about one run in five (never a third attempt, so every event
/// ends), or every run for `always_fail`.
#[txbus::listener]
async fn keyed_run(event: Keyed, ctx: Context) -> Result<(), ListenerError> {
    let runs = ctx.state::<Arc<Runs>>()?.clone();
    assert_eq!(ctx.ordering_key(), Some(event.account.as_str()));
    let started = Instant::now();
    let roll = mix(ctx.event_id(), ctx.attempt());
    tokio::time::sleep(Duration::from_millis(roll % 4)).await;
    let ok = !event.always_fail && (ctx.attempt() >= 3 || !roll.is_multiple_of(5));
    runs.0.lock().unwrap().push(Run {
        key: event.account.clone(),
        event_id: ctx.event_id(),
        started,
        ended: Instant::now(),
        ok,
    });
    if ok {
        Ok(())
    } else {
        Err("this run fails".into())
    }
}

/// Checks every key's runs: no two overlap, the successes come in event-id order with none
/// missing, and no run of an event starts before the success of the event before it.
fn check_order(runs: &[Run], emitted: &BTreeMap<String, Vec<EventId>>) {
    let mut by_key: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
    for run in runs {
        by_key.entry(&run.key).or_default().push(run);
    }
    for (key, ids) in emitted {
        let mut ids = ids.clone();
        ids.sort();
        let mut runs = by_key.remove(key.as_str()).unwrap_or_default();
        runs.sort_by_key(|r| r.started);
        for pair in runs.windows(2) {
            assert!(
                pair[1].started >= pair[0].ended,
                "key {key}: two runs overlap: {:?} and {:?}",
                pair[0],
                pair[1]
            );
        }
        let succeeded: Vec<EventId> = runs.iter().filter(|r| r.ok).map(|r| r.event_id).collect();
        assert_eq!(
            succeeded, ids,
            "key {key}: successes out of order or missing"
        );
        // Runs in start order: each event's runs come after the success of the one before.
        let mut done_up_to = 0;
        for run in &runs {
            let position = ids.iter().position(|id| *id == run.event_id).unwrap();
            assert_eq!(
                position, done_up_to,
                "key {key}: {run:?} ran before the event before it succeeded"
            );
            if run.ok {
                done_up_to += 1;
            }
        }
    }
}

/// Two buses on one database, four emitting tasks, 50 keys, 2,000 events, a listener that fails
/// one run in five and sleeps up to 3 ms: every key's events succeed once each, in event-id
/// order, one run at a time.
pub async fn keyed_deliveries_run_one_at_a_time_in_order<B: TestBackend>() {
    let db = B::open().await;
    let runs = Arc::new(Runs::default());
    let settings = fast_settings().retry_after(Duration::from_millis(10));
    let mut buses = Vec::new();
    for pool in [db.pool.clone(), db.another_pool().await] {
        let bus = bus(pool, &Probe::new())
            .state(runs.clone())
            .event::<Keyed>(settings)
            .build()
            .await
            .unwrap();
        buses.push(Arc::new(bus));
    }
    let mut tasks = Vec::new();
    for task in 0..4usize {
        let bus = buses[task % 2].clone();
        tasks.push(tokio::spawn(async move {
            let mut emitted = Vec::new();
            for n in 0..500usize {
                let account = format!("acct-{}", (n * 7 + task * 13) % 50);
                let event = Keyed {
                    account: account.clone(),
                    always_fail: false,
                };
                let id = if n % 3 == 0 {
                    bus.transaction(async |tx| tx.emit(&event).await)
                        .await
                        .unwrap()
                } else {
                    bus.emit(event, []).await.unwrap()
                };
                emitted.push((account, id));
            }
            emitted
        }));
    }
    let mut emitted: BTreeMap<String, Vec<EventId>> = BTreeMap::new();
    for task in tasks {
        for (account, id) in task.await.unwrap() {
            emitted.entry(account).or_default().push(id);
        }
    }
    let deadline = Instant::now() + PATIENCE * 4;
    while runs.all().iter().filter(|r| r.ok).count() < 2000 {
        assert!(
            Instant::now() < deadline,
            "only {} of 2000 events succeeded",
            runs.all().iter().filter(|r| r.ok).count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for bus in &buses {
        crate::support::idle(bus).await;
    }
    let runs = runs.all();
    assert!(
        runs.iter().any(|r| !r.ok),
        "some runs failed and were retried"
    );
    check_order(&runs, &emitted);
    assert!(B::deliveries(&db.pool).await.is_empty());
    for bus in buses {
        Arc::into_inner(bus).unwrap().shutdown().await;
    }
}

/// A key whose head keeps failing holds only that key: the events of other keys all succeed
/// meanwhile, and the held key's second event has not run.
pub async fn a_failing_head_holds_only_its_key<B: TestBackend>() {
    let db = B::open().await;
    let runs = Arc::new(Runs::default());
    let bus = bus(db.pool.clone(), &Probe::new())
        .state(runs.clone())
        .event::<Keyed>(fast_settings().retry_after(Duration::from_millis(20)))
        .build()
        .await
        .unwrap();
    let stuck = |always_fail| Keyed {
        account: "stuck".into(),
        always_fail,
    };
    let head = bus.emit(stuck(true), []).await.unwrap();
    let second = bus.emit(stuck(false), []).await.unwrap();
    let mut others = Vec::new();
    for n in 0..300 {
        let account = format!("other-{}", n % 30);
        others.push(
            bus.emit(
                Keyed {
                    account,
                    always_fail: false,
                },
                [],
            )
            .await
            .unwrap(),
        );
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let all = runs.all();
        let done = all
            .iter()
            .filter(|r| r.ok && r.key.starts_with("other-"))
            .count();
        if done == others.len() && all.iter().filter(|r| r.event_id == head).count() >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {} other events succeeded",
            others.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all = runs.all();
    assert!(
        all.iter().all(|r| r.event_id != second),
        "the second event of the held key ran while its head kept failing"
    );
    assert!(all.iter().filter(|r| r.event_id == head).all(|r| !r.ok));
    bus.shutdown().await;
}

/// A keyed event whose key a dead letter holds (`block_key_on_dead`), with two listeners:
/// `held_run` fails while the bus's `Arc<AtomicBool>` is set, `held_other` always succeeds.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.held", ordering_key = account)]
struct Held {
    account: String,
    n: u32,
}

#[txbus::listener]
async fn held_run(event: Held, ctx: Context) -> Result<(), ListenerError> {
    let failing = ctx.state::<Arc<std::sync::atomic::AtomicBool>>()?;
    let probe = ctx.state::<Arc<Probe>>()?;
    if failing.load(std::sync::atomic::Ordering::SeqCst) {
        probe.record(&ctx, format!("failed {}", event.n));
        return Err("failing".into());
    }
    probe.record(&ctx, format!("ok {}", event.n));
    Ok(())
}

#[txbus::listener]
async fn held_other(event: Held, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?
        .record(&ctx, format!("ok {}", event.n));
    Ok(())
}

/// A dead head lets the next delivery of its key run; with `block_key_on_dead` it holds the key
/// (for its listener only) until it is replayed and succeeds.
pub async fn a_dead_head_lets_the_next_run_or_holds_its_key<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let runs = Arc::new(Runs::default());
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let bus = bus(db.pool.clone(), &probe)
        .state(runs.clone())
        .state(failing.clone())
        .event::<Keyed>(fast_settings().max_attempts(1))
        .event::<Held>(fast_settings().max_attempts(1).block_key_on_dead(true))
        .build()
        .await
        .unwrap();

    // Without block_key_on_dead: the dead head lets the next one run.
    let head = bus
        .emit(
            Keyed {
                account: "free".into(),
                always_fail: true,
            },
            [],
        )
        .await
        .unwrap();
    let next = bus
        .emit(
            Keyed {
                account: "free".into(),
                always_fail: false,
            },
            [],
        )
        .await
        .unwrap();
    crate::support::eventually("the next event of the key to succeed", || async {
        runs.all()
            .iter()
            .any(|r| r.event_id == next && r.ok)
            .then_some(())
    })
    .await;
    let dead = bus
        .dead_letters(txbus::DeadLetterQuery::new())
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].event_id, head);

    // With it: held_run's dead head holds its key; held_other runs both events meanwhile.
    let first = bus
        .emit(
            Held {
                account: "held".into(),
                n: 1,
            },
            [],
        )
        .await
        .unwrap();
    let second = bus
        .emit(
            Held {
                account: "held".into(),
                n: 2,
            },
            [],
        )
        .await
        .unwrap();
    probe
        .wait_until(
            "held_other to run both, and held_run's head to fail",
            |calls| {
                let other = calls.iter().filter(|c| c.listener == "held_other").count();
                let failed = calls.iter().any(|c| c.note == "failed 1");
                other == 2 && failed
            },
        )
        .await;
    let dead_head = crate::support::eventually("the head to be a dead letter", || async {
        let dead = bus
            .dead_letters(txbus::DeadLetterQuery::new().event(first))
            .await
            .unwrap();
        dead.into_iter().next()
    })
    .await;
    let stats = bus.stats().await.unwrap();
    let held = &stats.listeners[&listener_id("held_run")];
    assert_eq!(held.held_keys, 1, "{stats:?}");
    assert!(held.oldest_held_age.is_some(), "{stats:?}");
    assert_eq!(stats.listeners[&listener_id("held_other")].held_keys, 0);
    assert_eq!(stats.total.held_keys, 1);
    // A dozen polls pass (one every 25 ms): the second event of the held key does not run.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        probe
            .calls_of("held_run")
            .iter()
            .all(|c| c.event_id != second),
        "the held key's next delivery ran: {:?}",
        probe.calls()
    );
    // Waiting behind its key (parked), it counts as due.
    let stats = bus.stats().await.unwrap();
    let held = &stats.listeners[&listener_id("held_run")];
    assert_eq!(
        (held.due, held.dead, held.scheduled),
        (1, 1, 0),
        "{stats:?}"
    );

    // The fix, then the replay: the head succeeds, then the next one runs.
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(bus.replay(first, &dead_head.listener).await.unwrap());
    assert_eq!(
        held_runs_until(&probe, second).await,
        ["failed 1", "ok 1", "ok 2"]
    );
    crate::support::idle(&bus).await;
    let stats = bus.stats().await.unwrap();
    assert_eq!(stats.total.held_keys, 0, "{stats:?}");
    assert_eq!(stats.total.oldest_held_age, None);
    bus.shutdown().await;
}

/// What `held_run` noted, in order, once it ran `event`.
async fn held_runs_until(probe: &Probe, event: EventId) -> Vec<String> {
    let calls = probe
        .wait_until("held_run to run the event", |calls| {
            calls
                .iter()
                .any(|c| c.listener == "held_run" && c.event_id == event)
        })
        .await;
    calls
        .into_iter()
        .filter(|c| c.listener == "held_run")
        .map(|c| c.note)
        .collect()
}

/// How many deliveries a claim parked behind their key's head.
async fn parked<B: TestBackend>(pool: &txbus::Pool<B>) -> i64 {
    B::count(
        pool,
        "SELECT count(*) AS n FROM txbus_deliveries WHERE parked",
    )
    .await
}

/// The id of one of this module's listeners.
fn listener_id(name: &str) -> String {
    format!("{}::{name}", module_path!())
}

/// A dead letter that holds its key (`block_key_on_dead`) releases it when it is purged: the
/// next delivery of the key runs, and the stats no longer count the key.
pub async fn a_purged_dead_head_releases_its_key<B: TestBackend>() {
    a_deleted_dead_head_releases_its_key::<B>(Deletion::Purge).await;
}

/// The same when retention deletes the dead letter, in a round another bus runs.
pub async fn retention_of_a_dead_head_releases_its_key<B: TestBackend>() {
    a_deleted_dead_head_releases_its_key::<B>(Deletion::Retention).await;
}

enum Deletion {
    Purge,
    Retention,
}

async fn a_deleted_dead_head_releases_its_key<B: TestBackend>(deletion: Deletion) {
    let db = B::open().await;
    let probe = Probe::new();
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let bus = bus(db.pool.clone(), &probe)
        .state(failing.clone())
        .event::<Held>(fast_settings().max_attempts(1).block_key_on_dead(true))
        .build()
        .await
        .unwrap();
    let held = |n| Held {
        account: "purged".into(),
        n,
    };
    bus.emit(held(1), []).await.unwrap();
    let second = bus.emit(held(2), []).await.unwrap();
    probe
        .wait_until("held_run's head to fail, held_other to run both", |calls| {
            calls.iter().any(|c| c.note == "failed 1")
                && calls.iter().filter(|c| c.listener == "held_other").count() == 2
        })
        .await;
    crate::support::eventually("the key to be held", || async {
        let stats = bus.stats().await.unwrap();
        (stats.total.held_keys == 1).then_some(())
    })
    .await;
    // Parked behind the dead head: due again in 30 s at the earliest, unless released.
    crate::support::eventually("a claim to park the second behind the head", || async {
        (parked(&db.pool).await == 1).then_some(())
    })
    .await;
    assert!(
        probe
            .calls_of("held_run")
            .iter()
            .all(|c| c.event_id != second)
    );

    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    let janitor = txbus::EventBus::builder(db.another_pool().await)
        .retain_dead(Duration::ZERO)
        .poller(false)
        .build()
        .await
        .unwrap();
    // Deletes skip a row that a claim looking for the key's head holds at that moment: the next
    // try deletes it.
    crate::support::eventually("the dead head to be deleted", || async {
        let deleted = match deletion {
            Deletion::Purge => bus.purge_dead(Duration::ZERO).await.unwrap(),
            Deletion::Retention => janitor.cleanup().await.unwrap().unwrap_or(0),
        };
        (deleted > 0).then_some(())
    })
    .await;
    janitor.shutdown().await;
    // Due at once, not when the claim's parking ends: nothing parks it again (its head is
    // gone).
    assert_eq!(parked(&db.pool).await, 0);
    assert_eq!(held_runs_until(&probe, second).await, ["failed 1", "ok 2"]);
    crate::support::idle(&bus).await;
    assert_eq!(bus.stats().await.unwrap().total.held_keys, 0);
    bus.shutdown().await;
}

/// Cancelling a key's head that waits for its retry lets the next delivery of its key run at
/// once, though a claim parked it behind the head (for 30 s at least).
pub async fn a_cancelled_head_releases_its_key<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let bus = bus(db.pool.clone(), &probe)
        .state(failing.clone())
        .event::<Held>(
            fast_settings()
                .expires_after(Duration::from_secs(7200))
                .retry_after(Duration::from_secs(3600)),
        )
        .build()
        .await
        .unwrap();
    let held = |n| Held {
        account: "cancelled".into(),
        n,
    };
    let head = bus.emit(held(1), []).await.unwrap();
    let second = bus.emit(held(2), []).await.unwrap();
    probe
        .wait_until("held_run's head to fail, held_other to run both", |calls| {
            calls.iter().any(|c| c.note == "failed 1")
                && calls.iter().filter(|c| c.listener == "held_other").count() == 2
        })
        .await;
    // The head's failure is written: it waits for its retry, in an hour.
    crate::support::eventually("the head to wait for its retry", || async {
        let stats = bus.stats().await.unwrap();
        (stats.listeners[&listener_id("held_run")].retrying == 1).then_some(())
    })
    .await;
    crate::support::eventually("a claim to park the second behind the head", || async {
        (parked(&db.pool).await == 1).then_some(())
    })
    .await;
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        bus.cancel(head).await.unwrap(),
        1,
        "held_run's retrying head"
    );
    // Well before the parking would end by itself.
    let runs = tokio::time::timeout(Duration::from_secs(20), held_runs_until(&probe, second))
        .await
        .expect("the second delivery of the key ran without waiting for its parking to end");
    assert_eq!(runs, ["failed 1", "ok 2"]);
    bus.shutdown().await;
}

/// The claim of a key's head that finds the head held by another transaction (a claim whose
/// plan reads the row, a result write, a user's transaction) does not pass it by: the head,
/// parked behind the one that just finished, would otherwise wait for the end of its parking
/// (30 s at least). MySQL's claim waits for the row; PostgreSQL's tries the key again at the
/// next poll.
pub async fn a_held_head_is_not_left_parked<B: crate::support::backends::RowLocks>() {
    let db = B::open().await;
    let probe = Probe::new();
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let bus = bus(db.pool.clone(), &probe)
        .state(failing.clone())
        .event::<Held>(fast_settings().retry_after(Duration::from_secs(2)))
        .build()
        .await
        .unwrap();
    let held = |n| Held {
        account: "locked".into(),
        n,
    };
    bus.emit(held(1), []).await.unwrap();
    let second = bus.emit(held(2), []).await.unwrap();
    probe
        .wait_until("held_run's head to fail, held_other to run both", |calls| {
            calls.iter().any(|c| c.note == "failed 1")
                && calls.iter().filter(|c| c.listener == "held_other").count() == 2
        })
        .await;
    crate::support::eventually("a claim to park the second behind the head", || async {
        (parked(&db.pool).await == 1).then_some(())
    })
    .await;
    let (mut holder, held_rows) = B::hold_event(&db.pool, second.get()).await;
    assert_eq!(held_rows, 1, "held_run's delivery of the second event");
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    probe
        .wait_until("the head's retry to succeed", |calls| {
            calls
                .iter()
                .any(|c| c.listener == "held_run" && c.note == "ok 1")
        })
        .await;
    // The claim of the key's head runs after the head's result is written, while the row is
    // held.
    tokio::time::sleep(Duration::from_millis(500)).await;
    diesel_async::SimpleAsyncConnection::batch_execute(&mut *holder, "COMMIT")
        .await
        .unwrap();
    drop(holder);
    let runs = tokio::time::timeout(Duration::from_secs(20), held_runs_until(&probe, second))
        .await
        .expect("the second delivery of the key ran without waiting for its parking to end");
    let (failed, done) = runs.split_at(runs.len() - 2);
    assert!(failed.iter().all(|n| n == "failed 1"), "{runs:?}");
    assert_eq!(done, ["ok 1", "ok 2"]);
    bus.shutdown().await;
}

/// A keyed event whose listener fails while the bus's `Arc<AtomicBool>` is set; the first
/// event's success calls the bus's [`OnSuccess`] first.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.claimed_again", ordering_key = account)]
struct ClaimedAgain {
    account: String,
    n: u32,
}

/// What `claimed_again_run` calls when the first event succeeds, before its result is written.
type OnSuccess = Arc<Mutex<Option<Box<dyn Fn() + Send + Sync>>>>;

#[txbus::listener]
async fn claimed_again_run(event: ClaimedAgain, ctx: Context) -> Result<(), ListenerError> {
    let failing = ctx.state::<Arc<std::sync::atomic::AtomicBool>>()?;
    let probe = ctx.state::<Arc<Probe>>()?;
    if failing.load(std::sync::atomic::Ordering::SeqCst) {
        probe.record(&ctx, format!("failed {}", event.n));
        return Err("failing".into());
    }
    if event.n == 1
        && let Some(on_success) = &*ctx.state::<OnSuccess>()?.lock().unwrap()
    {
        on_success();
    }
    probe.record(&ctx, format!("ok {}", event.n));
    Ok(())
}

/// A claim of a key's head that fails does not leave the next delivery of the key to the end
/// of its parking: the poller claims the key's head again at its next poll.
#[cfg(feature = "testing")]
pub async fn a_failed_claim_of_heads_is_tried_again<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let on_success = OnSuccess::default();
    let bus = bus(db.pool.clone(), &probe)
        .state(failing.clone())
        .state(on_success.clone())
        .event::<ClaimedAgain>(fast_settings().retry_after(Duration::from_secs(2)))
        .build()
        .await
        .unwrap();
    // The head's success makes the claim of heads that its result asks for fail: armed in the
    // run, before the result is written, so that no other claim of heads takes the failure.
    let armed = bus.clone();
    *on_success.lock().unwrap() = Some(Box::new(move || {
        txbus::testing::fail_head_claims(&armed, 1);
    }));
    let event = |n| ClaimedAgain {
        account: "claimed-again".into(),
        n,
    };
    bus.emit(event(1), []).await.unwrap();
    let second = bus.emit(event(2), []).await.unwrap();
    probe
        .wait_until("the head to fail", |calls| {
            calls.iter().any(|c| c.note == "failed 1")
        })
        .await;
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    // Parked behind its head, the second waits 30 s at least unless its key's head is claimed.
    crate::support::eventually("a claim to park the second behind the head", || async {
        (parked(&db.pool).await == 1).then_some(())
    })
    .await;
    // The head's retry, 2 s after its failure, succeeds; well before the parking ends:
    let calls = tokio::time::timeout(
        Duration::from_secs(20),
        probe.wait_until("the second to run", |calls| {
            calls.iter().any(|c| c.event_id == second)
        }),
    )
    .await
    .expect("the second delivery of the key ran without waiting for its parking to end");
    let notes: Vec<String> = calls.into_iter().map(|c| c.note).collect();
    assert_eq!(notes, ["failed 1", "ok 1", "ok 2"]);
    assert_eq!(
        txbus::testing::head_claim_failures_left(&bus),
        0,
        "the claim of heads after the head's success failed"
    );
    // The bus holds the closure that holds the bus.
    on_success.lock().unwrap().take();
    bus.shutdown().await;
}

/// A scheduled keyed event does not hold its key before it is due (a later event of the key
/// runs first), and once due it takes its place by event id: a later event waits for it.
pub async fn a_scheduled_keyed_event_takes_its_place_when_due<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bus = bus(db.pool.clone(), &probe)
        .state(failing.clone())
        .event::<Held>(
            fast_settings()
                .retry_after(Duration::from_millis(20))
                .max_attempts(10_000),
        )
        .build()
        .await
        .unwrap();
    let held = |account: &str, n| Held {
        account: account.into(),
        n,
    };

    // Not due: the key's next event runs without waiting for it.
    let later = bus
        .emit_after(Duration::from_secs(3600), held("early", 1), [])
        .await
        .unwrap();
    bus.emit(held("early", 2), []).await.unwrap();
    probe
        .wait_until("the unscheduled event of the key to run", |calls| {
            calls
                .iter()
                .any(|c| c.listener == "held_run" && c.note == "ok 2")
        })
        .await;
    assert_eq!(bus.cancel(later).await.unwrap(), 2);

    // Due (and failing): an event emitted after it waits until it succeeds.
    failing.store(true, std::sync::atomic::Ordering::SeqCst);
    let scheduled = bus
        .emit_after(Duration::from_millis(300), held("due", 1), [])
        .await
        .unwrap();
    probe
        .wait_until("the scheduled event to fall due and fail", |calls| {
            calls
                .iter()
                .any(|c| c.event_id == scheduled && c.note == "failed 1")
        })
        .await;
    let next = bus.emit(held("due", 2), []).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        probe
            .calls_of("held_run")
            .iter()
            .all(|c| c.event_id != next),
        "the key's next event ran while its due head kept failing"
    );
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    let calls = probe
        .wait_until("the key's next event", |calls| {
            calls
                .iter()
                .any(|c| c.listener == "held_run" && c.event_id == next)
        })
        .await;
    let order: Vec<&str> = calls
        .iter()
        .filter(|c| c.listener == "held_run" && c.event_id >= scheduled)
        .map(|c| c.note.as_str())
        .filter(|note| *note != "failed 1")
        .collect();
    assert_eq!(order, ["ok 1", "ok 2"]);
    crate::support::idle(&bus).await;
    bus.shutdown().await;
}

/// An emit whose key has nothing pending writes its deliveries leased to itself, as the key's
/// heads, where the backend tells so in its insert (`LEASES_KEY_HEADS`: PostgreSQL, SQLite): they run
/// from the emitting task, with no claim (the poller is off here). A crash right after such a
/// commit leaves them leased, and the key's next event waits for that lease to end, as every
/// delivery of a process that died does. Elsewhere a claim takes the key's head.
#[cfg(feature = "testing")]
pub async fn an_emit_on_an_idle_key_leases_its_head<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let lease = Duration::from_secs(5);
    let bus = bus(db.pool.clone(), &probe)
        .state(Arc::new(std::sync::atomic::AtomicBool::new(false)))
        .event::<Held>(fast_settings().max_execution_time(lease))
        .poller(false)
        .build()
        .await
        .unwrap();
    let held = |account: &str, n| Held {
        account: account.into(),
        n,
    };

    let first = bus.emit(held("idle", 1), []).await.unwrap();
    if B::LEASES_KEY_HEADS {
        probe
            .wait_until("both listeners to run from the emit", |calls| {
                calls.iter().filter(|c| c.event_id == first).count() == 2
            })
            .await;
        crate::support::idle(&bus).await;
        assert_eq!(bus.run_due().await.unwrap().ran, 0, "nothing left to claim");
    } else {
        let report = bus.run_due().await.unwrap();
        assert_eq!(report.succeeded, 2, "a claim runs the key's head");
    }

    bus.simulate_crash(txbus::testing::CrashPoint::AfterCommit);
    let crashed = bus.emit(held("crash", 1), []).await.unwrap();
    let next = bus.emit(held("crash", 2), []).await.unwrap();
    let report = bus.run_due().await.unwrap();
    if B::LEASES_KEY_HEADS {
        assert_eq!(
            report.ran, 0,
            "the crashed emit's heads are leased, and the next event waits behind them"
        );
        bus.advance(lease);
        let report = bus.run_due().await.unwrap();
        assert_eq!(report.succeeded, 4, "after the lease: {report:?}");
    } else {
        assert_eq!(report.succeeded, 4, "{report:?}");
    }
    let order: Vec<(EventId, String)> = probe
        .calls_of("held_run")
        .into_iter()
        .filter(|c| c.event_id == crashed || c.event_id == next)
        .map(|c| (c.event_id, c.note))
        .collect();
    assert_eq!(
        order,
        [(crashed, "ok 1".to_string()), (next, "ok 2".to_string())]
    );
    bus.shutdown().await;
}

/// Keyed emits and transactions that write the same row take the row's lock before the key's:
/// `emit`s with a `persist` (on PostgreSQL one statement, which reads its write before it takes
/// the key's lock) and `transaction`s that write the row and then `tx.emit`, all at once, never
/// deadlock, and the key's events run in event-id order.
pub async fn keyed_emits_and_transactions_on_one_row_do_not_deadlock<B: TestBackend>()
where
    crate::emit::User: txbus::Entity<B>,
{
    // InnoDB can deadlock concurrent upserts of one row of a table with a second unique index
    // (the test table's `email`), with or without the bus: there, each task writes its own row.
    let row_id = |task: u32| {
        if B::NAME == "mysql" {
            i64::from(task) + 1
        } else {
            1
        }
    };
    let db = B::open().await;
    crate::support::backends::create_users_table(&db.pool).await;
    let probe = Probe::new();
    let bus = Arc::new(
        bus(db.pool.clone(), &probe)
            .state(Arc::new(std::sync::atomic::AtomicBool::new(false)))
            .event::<Held>(fast_settings())
            .build()
            .await
            .unwrap(),
    );
    let mut tasks = Vec::new();
    for task in 0..4u32 {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..25u32 {
                let row = crate::emit::user(row_id(task), &format!("{task}-{n}@example.com"));
                let event = Held {
                    account: "shared".into(),
                    n: task * 100 + n,
                };
                if task % 2 == 0 {
                    bus.emit(event, [txbus::persist(&row)]).await.unwrap();
                } else {
                    bus.transaction(async |tx| {
                        <crate::emit::User as txbus::Entity<B>>::persist(&row, tx.conn())
                            .await
                            .map_err(crate::emit::TestError::Db)?;
                        tx.emit(&event).await.map_err(crate::emit::TestError::Bus)
                    })
                    .await
                    .unwrap();
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let calls = probe
        .wait_until("all 100 events to run", |calls| {
            calls.iter().filter(|c| c.listener == "held_run").count() == 100
        })
        .await;
    let ids: Vec<EventId> = calls
        .iter()
        .filter(|c| c.listener == "held_run")
        .map(|c| c.event_id)
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "the key's events ran out of event-id order");
    crate::support::idle(&bus).await;
    Arc::into_inner(bus).unwrap().shutdown().await;
}

/// PostgreSQL: an emit leases its key's heads only under READ COMMITTED, where its look-up after
/// the key's lock sees every delivery committed before it. A pool whose connections default to
/// REPEATABLE READ, whose snapshot predates the lock, writes the deliveries unleased; a claim runs
/// them, one event after the other, in order.
#[cfg(feature = "testing")]
pub async fn under_repeatable_read_an_emit_leaves_its_heads_to_a_claim<B: TestBackend>() {
    let db = B::open().await;
    // The test database's URL already carries `options` (its `search_path`).
    let url = format!(
        "{}%20-cdefault_transaction_isolation%3Drepeatable%5C%20read",
        db.url
    );
    let pool = txbus::Pool::<B>::builder(url)
        .max_size(4)
        .connect()
        .await
        .unwrap();
    assert_eq!(
        B::count(
            &pool,
            "SELECT count(*) AS n FROM (SELECT 1) x \
             WHERE current_setting('transaction_isolation') = 'repeatable read'"
        )
        .await,
        1,
        "the pool's transactions are REPEATABLE READ"
    );
    let probe = Probe::new();
    let bus = bus(pool.clone(), &probe)
        .state(Arc::new(std::sync::atomic::AtomicBool::new(false)))
        .event::<Held>(fast_settings())
        .poller(false)
        .build()
        .await
        .unwrap();
    let held = |n| Held {
        account: "rr".into(),
        n,
    };
    let first = bus.emit(held(1), []).await.unwrap();
    let second = bus.emit(held(2), []).await.unwrap();
    crate::support::idle(&bus).await;
    assert!(probe.calls().is_empty(), "no run from the emits");
    assert_eq!(
        B::count(
            &pool,
            "SELECT count(*) AS n FROM txbus_deliveries WHERE attempts = 0 AND leased_at IS NULL"
        )
        .await,
        4,
        "both events' deliveries are written unleased"
    );

    let report = bus.run_due().await.unwrap();
    assert_eq!(report.succeeded, 4, "{report:?}");
    for listener in ["held_run", "held_other"] {
        let order: Vec<(EventId, String)> = probe
            .calls_of(listener)
            .into_iter()
            .map(|c| (c.event_id, c.note))
            .collect();
        assert_eq!(
            order,
            [(first, "ok 1".to_string()), (second, "ok 2".to_string())],
            "{listener}"
        );
    }
    bus.shutdown().await;
}
