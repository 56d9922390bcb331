//! Event versions: payloads stored by older versions are upcast when they run, a failed upcast
//! is a dead letter at once (replayable after a fix), and deliveries stored by a newer version
//! are left alone until they expire as `unknown_version`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use txbus::{Context, DeadLetterQuery, DeadReason, Error, ListenerError, MessageId, UpcastError};

use crate::support::{HOUR, Probe, TestBackend, bus, eventually};

/// Version 1: `{order_id, total}` in whole units (an integer, or for some old writers a
/// string). Version 2: `total_cents`. Version 3: and a `currency`.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.order_placed", version = 3, upcast(1 => cents, 2 => euros))]
struct OrderPlaced {
    order_id: i64,
    total_cents: i64,
    currency: String,
}

/// The tags whose string totals the "fixed" upcaster reads; before the fix it refuses them.
static FIXED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

fn cents(mut v1: Value) -> Result<Value, UpcastError> {
    let total = match &v1["total"] {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => {
            let tag = v1["tag"].as_str().unwrap_or_default();
            let fixed = FIXED.lock().unwrap();
            if !fixed.as_ref().is_some_and(|f| f.contains(tag)) {
                return Err(UpcastError::new(format!("`total` is the string {s:?}")));
            }
            s.parse().ok()
        }
        _ => None,
    }
    .ok_or_else(|| UpcastError::new("`total` is missing"))?;
    v1["total_cents"] = json!(total * 100);
    Ok(v1)
}

fn euros(v2: Value) -> Result<Value, UpcastError> {
    let mut v3: serde_json::Map<String, Value> = serde_json::from_value(v2)?;
    v3.insert("currency".into(), json!("EUR"));
    Ok(Value::Object(v3))
}

#[txbus::listener(name = "contract.record_order")]
async fn record_order(order: OrderPlaced, ctx: Context) -> Result<(), ListenerError> {
    let note = format!(
        "{} {} {}",
        order.order_id, order.total_cents, order.currency
    );
    ctx.state::<Arc<Probe>>()?.record(&ctx, note);
    if order.order_id == 1 && ctx.attempt() == 1 {
        return Err("the first run of order 1 fails: its retry is upcast again".into());
    }
    Ok(())
}

const LISTENER: &str = "contract.record_order";

/// Writes one delivery of `payload` for the listener, stored at `version`; returns its event.
async fn stored<B: TestBackend>(pool: &txbus::Pool<B>, payload: Value, version: u32) -> i64 {
    let id = B::insert_backlog(
        pool,
        "contract.order_placed",
        vec![payload.to_string()],
        LISTENER.into(),
        HOUR / 2,
    )
    .await[0];
    let update =
        format!("UPDATE txbus_deliveries SET event_version = {version} WHERE event_id = {id}");
    crate::support::backends::exec(pool, &update).await;
    id
}

/// Every emit path stores the type's version; version-1 and version-2 payloads reach the
/// version-3 listener upcast, on their first run and on a retry.
pub async fn old_payloads_are_upcast_when_they_run<B: TestBackend>() {
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    let v1 = stored::<B>(&db.pool, json!({ "order_id": 1, "total": 12 }), 1).await;
    let v2 = stored::<B>(&db.pool, json!({ "order_id": 2, "total_cents": 500 }), 2).await;
    let probe = Probe::new();
    // Successes are kept, to show the version each delivery was stored with.
    let bus = bus(db.pool.clone(), &probe)
        .retain_delivered(HOUR)
        .build()
        .await
        .unwrap();
    let order = |order_id| OrderPlaced {
        order_id,
        total_cents: 700,
        currency: "USD".into(),
    };
    let v3 = bus.emit(order(3), []).await.unwrap();

    let calls = probe.wait_until("four runs", |c| c.len() == 4).await;
    let mut runs: Vec<_> = calls
        .iter()
        .map(|c| (c.event_id.get(), c.attempt, c.note.clone()))
        .collect();
    runs.sort();
    assert_eq!(
        runs,
        [
            (v1, 1, "1 1200 EUR".to_owned()),
            (v1, 2, "1 1200 EUR".to_owned()),
            (v2, 1, "2 500 EUR".to_owned()),
            (v3.get(), 1, "3 700 USD".to_owned()),
        ]
    );

    // Scheduled, transactional and received events store the type's version too; the stored
    // old ones keep theirs.
    bus.emit_after(HOUR, order(4), []).await.unwrap();
    bus.transaction(async |tx| {
        tx.emit_after(HOUR, &order(5)).await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    let received = bus
        .receive(MessageId::new("contract", B::NAME), order(6))
        .await
        .unwrap();
    probe
        .wait_until("the received order", |c| c.len() == 5)
        .await;
    crate::support::idle(&bus).await;
    let by_version = |sql| B::count(&db.pool, sql);
    assert_eq!(
        by_version("SELECT count(*) AS n FROM txbus_deliveries WHERE event_version = 3").await,
        4,
        "the emit, the two scheduled events and the receipt ({received:?})"
    );
    assert_eq!(
        by_version("SELECT count(*) AS n FROM txbus_deliveries WHERE event_version < 3").await,
        2
    );
    bus.shutdown().await;
}

/// An upcaster's error, or an upcast payload that still does not deserialize, makes the
/// delivery a dead letter on its first run, with the reason and the error; once the upcaster
/// is fixed, a replay runs it with the upcast payload.
pub async fn failed_upcasts_are_dead_letters_at_once_and_replay_after_a_fix<B: TestBackend>() {
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    let tag = B::NAME;
    let id = stored::<B>(
        &db.pool,
        json!({ "order_id": 6, "total": "9", "tag": tag }),
        1,
    )
    .await;
    // Upcast without an error, but still not an order: `order_id` is text.
    let unreadable = stored::<B>(&db.pool, json!({ "order_id": "seven", "total": 1 }), 1).await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();
    let mut dead = eventually("the dead letters", || async {
        let dead = bus.dead_letters(DeadLetterQuery::new()).await.unwrap();
        (dead.len() == 2).then_some(dead)
    })
    .await;
    dead.sort_by_key(|d| d.event_id);
    let (dead, unreadable_dead) = (dead[0].clone(), dead[1].clone());
    assert_eq!(unreadable_dead.event_id.get(), unreadable);
    assert_eq!(unreadable_dead.reason, DeadReason::UpcastFailed);
    assert_eq!(unreadable_dead.attempts, 1);
    let error = unreadable_dead.last_error.unwrap_or_default();
    assert!(error.contains("does not deserialize"), "{error}");
    assert_eq!(dead.event_id.get(), id);
    assert_eq!(dead.reason, DeadReason::UpcastFailed);
    assert_eq!(dead.attempts, 1, "no retry: retrying cannot fix it");
    let error = dead.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("from version 1 to 2") && error.contains("the string \"9\""),
        "{error}"
    );
    assert!(probe.calls().is_empty());

    FIXED
        .lock()
        .unwrap()
        .get_or_insert_with(HashSet::new)
        .insert(tag.to_owned());
    assert!(bus.replay(dead.event_id, LISTENER).await.unwrap());
    let calls = probe
        .wait_until("the replayed order", |c| c.len() == 1)
        .await;
    assert_eq!((calls[0].attempt, calls[0].note.as_str()), (2, "6 900 EUR"));
    bus.shutdown().await;
}

/// A delivery stored by a newer version of the type is not run here and not charged an
/// attempt; `stats` shows it; when it expires it becomes a dead letter `unknown_version`.
pub async fn newer_versions_are_left_to_instances_that_know_them<B: TestBackend>() {
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    let newer = stored::<B>(&db.pool, json!({ "order_id": 7, "price": "?" }), 4).await;
    let known = stored::<B>(
        &db.pool,
        json!({ "order_id": 8, "total_cents": 1, "currency": "EUR" }),
        3,
    )
    .await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();
    let calls = probe
        .wait_until("the known version's run", |c| !c.is_empty())
        .await;
    assert_eq!(calls[0].event_id.get(), known);
    // Many polls later, the newer one is still waiting, untouched.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(probe.calls().len(), 1, "{:?}", probe.calls());
    let rows = B::deliveries(&db.pool).await;
    let waiting = rows.iter().find(|r| r.event_id == newer).unwrap();
    assert_eq!(
        (waiting.attempts, waiting.dead_reason.as_deref()),
        (0, None)
    );
    let stats = bus.stats().await.unwrap();
    assert_eq!(stats.unknown_versions.get(LISTENER), Some(&1), "{stats:?}");
    assert!(stats.orphans.is_empty());

    B::an_hour_before(&db.pool, newer).await;
    let dead = eventually("the unknown version's dead letter", || async {
        B::deliveries(&db.pool)
            .await
            .into_iter()
            .find(|d| d.event_id == newer && d.dead_reason.is_some())
    })
    .await;
    assert_eq!(dead.dead_reason.as_deref(), Some("unknown_version"));
    assert_eq!(dead.attempts, 0);
    assert_eq!(
        dead.last_error.as_deref(),
        Some("no running instance knows version 4 of event contract.order_placed")
    );
    assert_eq!(probe.calls().len(), 1);
    bus.shutdown().await;
}
