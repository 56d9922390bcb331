//! Emitting: atomicity with entity writes, rollback, dispatch only after the commit.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use txbus::{Context, Entity, Error, ListenerError, persist, remove};

use crate::support::backends::create_users_table;
use crate::support::{Probe, TestBackend, bus};

diesel::table! {
    contract_users (id) {
        id -> BigInt,
        email -> Text,
    }
}

#[derive(Debug, Clone, Insertable, AsChangeset, Identifiable, txbus::Entity)]
#[diesel(table_name = contract_users)]
pub struct User {
    pub id: i64,
    pub email: String,
}

pub fn user(id: i64, email: &str) -> User {
    User {
        id,
        email: email.to_owned(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.user_saved")]
struct UserSaved {
    user_id: i64,
    email: String,
}

/// Records whether the user of the event exists when the listener runs.
#[txbus::listener]
async fn check_user_saved(event: UserSaved, ctx: Context) -> Result<(), ListenerError> {
    let probe = ctx.state::<Arc<Probe>>()?;
    let exists = probe.user_exists(event.user_id).await;
    probe.record(&ctx, format!("{} exists={exists}", event.email));
    Ok(())
}

/// A database with the users table, a probe that can see it, and a bus.
async fn setup<B: TestBackend>() -> (crate::support::TestDb<B>, Arc<Probe>, txbus::EventBus<B>) {
    let db = B::open().await;
    create_users_table(&db.pool).await;
    let probe = Probe::new();
    let pool = db.pool.clone();
    *probe.user_exists.lock().unwrap() = Some(Arc::new(move |id| {
        let pool = pool.clone();
        Box::pin(async move { B::user_exists(&pool, id).await })
    }));
    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();
    (db, probe, bus)
}

async fn emails<B: TestBackend>(db: &crate::support::TestDb<B>) -> (i64, i64) {
    (
        B::count(&db.pool, "SELECT count(*) AS n FROM contract_users").await,
        B::count(
            &db.pool,
            "SELECT count(*) AS n FROM contract_users WHERE email = 'changed'",
        )
        .await,
    )
}

pub async fn emit_writes_entities_and_event_atomically<B: TestBackend>()
where
    User: Entity<B>,
{
    let (db, probe, bus) = setup::<B>().await;
    let old = user(1, "old@example.com");
    let first = bus
        .emit(
            UserSaved {
                user_id: 1,
                email: old.email.clone(),
            },
            [persist(&old)],
        )
        .await
        .unwrap();
    // Its listener must see user 1 before the next emit removes it.
    probe
        .wait_until("the first delivery", |c| c.len() == 1)
        .await;

    let new = user(2, "new@example.com");
    let second = bus
        .emit(
            UserSaved {
                user_id: 2,
                email: new.email.clone(),
            },
            [persist(&new), remove(&old)],
        )
        .await
        .unwrap();
    assert_ne!(first, second);
    let calls = probe.wait_until("both deliveries", |c| c.len() == 2).await;
    let mut notes: Vec<_> = calls.iter().map(|c| (c.event_id, c.note.clone())).collect();
    notes.sort();
    assert_eq!(
        notes,
        [
            (first, "old@example.com exists=true".to_owned()),
            (second, "new@example.com exists=true".to_owned())
        ]
    );
    assert!(
        !B::user_exists(&db.pool, 1).await,
        "remove() deleted user 1"
    );
    assert!(B::user_exists(&db.pool, 2).await);

    // persist() of an existing key updates every column.
    bus.emit(
        UserSaved {
            user_id: 2,
            email: "changed".into(),
        },
        [persist(&user(2, "changed"))],
    )
    .await
    .unwrap();
    assert_eq!(emails(&db).await, (1, 1));
    crate::support::idle(&bus).await;
    bus.shutdown().await;
}

pub async fn failed_operation_leaves_nothing<B: TestBackend>()
where
    User: Entity<B>,
{
    let (db, probe, bus) = setup::<B>().await;
    bus.emit(
        UserSaved {
            user_id: 1,
            email: "taken".into(),
        },
        [persist(&user(1, "taken"))],
    )
    .await
    .unwrap();
    probe
        .wait_until("the first delivery", |c| c.len() == 1)
        .await;
    crate::support::idle(&bus).await;

    // The second operation violates the unique email: nothing of this emit may remain.
    let error = bus
        .emit(
            UserSaved {
                user_id: 2,
                email: "free".into(),
            },
            [persist(&user(2, "free")), persist(&user(3, "taken"))],
        )
        .await
        .unwrap_err();
    // The violation itself, not what followed from it (a statement in an aborted transaction).
    assert!(
        matches!(
            error,
            Error::Database(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _
            ))
        ),
        "{error:?}"
    );
    assert!(
        !B::user_exists(&db.pool, 2).await,
        "the first operation was rolled back"
    );
    assert_eq!(
        B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await,
        0
    );

    // The same when the failing operation is the first (on PostgreSQL it travels with BEGIN),
    // and the connections stay usable afterwards.
    for _ in 0..8 {
        let error = bus
            .emit(
                UserSaved {
                    user_id: 5,
                    email: "taken".into(),
                },
                [persist(&user(5, "taken"))],
            )
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Database(_)), "{error:?}");
    }
    assert!(!B::user_exists(&db.pool, 5).await);
    assert_eq!(
        B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await,
        0
    );
    bus.emit(
        UserSaved {
            user_id: 6,
            email: "six".into(),
        },
        [persist(&user(6, "six"))],
    )
    .await
    .unwrap();
    probe
        .wait_until("the delivery after the failures", |c| c.len() == 2)
        .await;

    // A poll cycle later there is still no run for the failed ones.
    tokio::time::sleep(Duration::from_millis(200)).await;
    crate::support::idle(&bus).await;
    assert_eq!(probe.calls().len(), 2);
    bus.shutdown().await;
}

/// The error of the test transactions; its fields are read through `Debug` on failure.
#[derive(Debug)]
#[allow(dead_code)]
pub(crate) enum TestError {
    Bus(Error),
    Db(diesel::result::Error),
    Refused,
}

impl From<Error> for TestError {
    fn from(e: Error) -> Self {
        Self::Bus(e)
    }
}

impl From<diesel::result::Error> for TestError {
    fn from(e: diesel::result::Error) -> Self {
        Self::Db(e)
    }
}

pub async fn rollback_dispatches_nothing<B: TestBackend>()
where
    User: Entity<B>,
{
    let (db, probe, bus) = setup::<B>().await;
    let result: Result<(), TestError> = bus
        .transaction(async |tx| {
            let new = user(7, "rolled@example.com");
            <User as Entity<B>>::persist(&new, tx.conn()).await?;
            tx.emit(&UserSaved {
                user_id: 7,
                email: new.email.clone(),
            })
            .await?;
            tx.emit(&UserSaved {
                user_id: 7,
                email: "twice".into(),
            })
            .await?;
            Err(TestError::Refused)
        })
        .await;
    assert!(matches!(result, Err(TestError::Refused)), "{result:?}");
    assert!(!B::user_exists(&db.pool, 7).await);
    assert_eq!(
        B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await,
        0
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    crate::support::idle(&bus).await;
    assert!(probe.calls().is_empty(), "{:?}", probe.calls());

    // The same connection pool is healthy afterwards: a committed transaction is delivered.
    let id = bus
        .transaction(async |tx| {
            <User as Entity<B>>::persist(&user(8, "kept@example.com"), tx.conn()).await?;
            let id = tx
                .emit(&UserSaved {
                    user_id: 8,
                    email: "kept".into(),
                })
                .await?;
            Ok::<_, TestError>(id)
        })
        .await
        .unwrap();
    let calls = probe
        .wait_until("the committed event", |c| c.len() == 1)
        .await;
    assert_eq!(calls[0].event_id, id);
    assert_eq!(calls[0].note, "kept exists=true");
    bus.shutdown().await;
}

pub async fn listeners_run_after_the_commit<B: TestBackend>()
where
    User: Entity<B>,
{
    let (_db, probe, bus) = setup::<B>().await;
    let closure_done: Mutex<Option<Instant>> = Mutex::new(None);
    for n in 0..5 {
        bus.transaction(async |tx| {
            let new = user(100 + n, &format!("u{n}@example.com"));
            <User as Entity<B>>::persist(&new, tx.conn()).await?;
            tx.emit(&UserSaved {
                user_id: new.id,
                email: new.email.clone(),
            })
            .await?;
            // Give a listener every chance to run early, if it could.
            tokio::time::sleep(Duration::from_millis(100)).await;
            *closure_done.lock().unwrap() = Some(Instant::now());
            Ok::<_, TestError>(())
        })
        .await
        .unwrap();
        let calls = probe
            .wait_until("the delivery", |c| c.len() == (n + 1) as usize)
            .await;
        let last = calls.last().unwrap();
        assert!(last.note.ends_with("exists=true"), "{last:?}");
        assert!(last.started > closure_done.lock().unwrap().unwrap());
    }
    bus.shutdown().await;
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.nobody_listens")]
struct NobodyListens {
    n: u32,
}

pub async fn event_without_listeners_writes_nothing<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();
    let a = bus.emit(NobodyListens { n: 1 }, []).await.unwrap();
    let b = bus.emit(NobodyListens { n: 2 }, []).await.unwrap();
    assert_ne!(a, b, "ids are never reused");
    assert_eq!(
        B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await,
        0
    );
    bus.shutdown().await;
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.counted")]
struct Counted {
    task: u32,
    n: u32,
}

#[txbus::listener]
async fn count_once(event: Counted, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?
        .record(&ctx, format!("{}/{}", event.task, event.n));
    Ok(())
}

pub async fn concurrent_emits_are_each_delivered_once<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe)
        .max_concurrent_listeners(8)
        .build()
        .await
        .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|task| {
            let bus = bus.clone();
            tokio::spawn(async move {
                for n in 0..40 {
                    bus.emit(Counted { task, n }, []).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let calls = probe.wait_until("320 deliveries", |c| c.len() >= 320).await;
    crate::support::idle(&bus).await;
    let mut notes: Vec<_> = probe.calls().into_iter().map(|c| c.note).collect();
    notes.sort();
    notes.dedup();
    assert_eq!(notes.len(), 320, "each event exactly once");
    assert_eq!(probe.calls().len(), 320, "no event twice: {}", calls.len());
    crate::support::eventually("the tables to empty", || async {
        (B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;
    bus.shutdown().await;
}

/// A transaction's emits take their ids in blocks and write their deliveries at the commit:
/// hundreds of them (more than any block) are each delivered once, with the ids `tx.emit`
/// returned, increasing in emit order; the next transaction's ids come after them all.
pub async fn a_transaction_of_many_emits_delivers_each_once<B: TestBackend>() {
    const EMITS: u32 = 300;
    let db = B::open().await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();
    let ids = bus
        .transaction(async |tx| {
            let mut ids = Vec::new();
            for n in 0..EMITS {
                ids.push(tx.emit(&Counted { task: 1, n }).await?);
            }
            Ok::<_, txbus::Error>(ids)
        })
        .await
        .unwrap();
    let raw: Vec<i64> = ids.iter().map(|id| id.get()).collect();
    assert!(
        raw.windows(2).all(|w| w[0] < w[1]),
        "ids increase in emit order: {raw:?}"
    );
    let calls = probe
        .wait_until("every delivery", |c| c.len() >= EMITS as usize)
        .await;
    crate::support::idle(&bus).await;
    assert_eq!(
        probe.calls().len(),
        EMITS as usize,
        "no event twice: {}",
        calls.len()
    );
    let mut delivered: Vec<(i64, String)> = probe
        .calls()
        .into_iter()
        .map(|c| (c.event_id.get(), c.note))
        .collect();
    delivered.sort();
    let expected: Vec<(i64, String)> = raw
        .iter()
        .zip(0..EMITS)
        .map(|(id, n)| (*id, format!("1/{n}")))
        .collect();
    assert_eq!(
        delivered, expected,
        "each event once, under the id its emit returned"
    );
    crate::support::eventually("the tables to empty", || async {
        (B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;

    let next = bus
        .transaction(async |tx| tx.emit(&Counted { task: 2, n: 0 }).await)
        .await
        .unwrap();
    assert!(next.get() > raw[raw.len() - 1], "{next} after {raw:?}");
    probe
        .wait_until("the next transaction's event", |c| {
            c.len() == EMITS as usize + 1
        })
        .await;
    bus.shutdown().await;
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.started_at_once")]
struct StartedAtOnce {
    n: u32,
}

/// Records its start before it first waits, then waits.
#[txbus::listener]
async fn records_before_waiting(event: StartedAtOnce, ctx: Context) -> Result<(), ListenerError> {
    let probe = ctx.state::<Arc<Probe>>()?.clone();
    probe.record(&ctx, event.n.to_string());
    tokio::time::sleep(Duration::from_millis(20)).await;
    probe.record(&ctx, "finished");
    Ok(())
}

/// A listener that can start at once runs its first stretch before `emit` returns, and the rest
/// in a task of its own.
pub async fn a_listener_starts_before_emit_returns<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();
    for n in 1..=3 {
        bus.emit(StartedAtOnce { n }, []).await.unwrap();
        let notes: Vec<String> = probe
            .calls_of("records_before_waiting")
            .into_iter()
            .map(|c| c.note)
            .collect();
        assert!(
            notes.contains(&n.to_string()),
            "emit {n} returned before its listener started: {notes:?}"
        );
    }
    probe
        .wait_until("every run to finish", |c| {
            c.iter().filter(|c| c.note == "finished").count() == 3
        })
        .await;
    crate::support::idle(&bus).await;
    assert_eq!(
        B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await,
        0
    );
    bus.shutdown().await;
}

pub async fn emit_after_shutdown_is_refused<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();
    let other = bus.clone();
    bus.shutdown().await;
    other.shutdown().await;
    let error = other.emit(NobodyListens { n: 1 }, []).await.unwrap_err();
    assert!(matches!(error, Error::Shutdown), "{error:?}");
    assert!(error.to_string().contains("shut down"));
}
