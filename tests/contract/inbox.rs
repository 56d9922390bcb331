//! Receiving messages from outside: deduplication, its window, content-hash ids, the store.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use txbus::{Context, Error, InboxMessage, InboxStore, ListenerError, MessageId, Received};

use crate::support::{HOUR, Probe, TestBackend, bus, eventually};

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.inbox.paid")]
struct Paid {
    amount: i64,
}

#[txbus::listener]
async fn record_payment(event: Paid, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?
        .record(&ctx, event.amount.to_string());
    Ok(())
}

#[txbus::listener]
async fn notify_payment(event: Paid, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?
        .record(&ctx, event.amount.to_string());
    Ok(())
}

pub async fn one_message_received_concurrently_is_accepted_once<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();
    let id = MessageId::new("payments", "evt_1");
    let tasks: Vec<_> = (0..16)
        .map(|task| {
            let (bus, id) = (bus.clone(), id.clone());
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                for _ in 0..(1000 / 16 + usize::from(task < 1000 % 16)) {
                    if let Received::Accepted(event) =
                        bus.receive(id.clone(), Paid { amount: 5 }).await.unwrap()
                    {
                        accepted.push(event);
                    }
                }
                accepted
            })
        })
        .collect();
    let mut accepted = Vec::new();
    for task in tasks {
        accepted.extend(task.await.unwrap());
    }
    assert_eq!(accepted.len(), 1, "accepted once out of 1000");
    probe.wait_until("both listeners", |c| c.len() == 2).await;
    crate::support::idle(&bus).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(probe.calls_of("record_payment").len(), 1);
    assert_eq!(probe.calls_of("notify_payment").len(), 1);
    assert!(probe.calls().iter().all(|c| c.event_id == accepted[0]));
    bus.shutdown().await;
}

pub async fn duplicates_are_accepted_again_after_the_window<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let window = HOUR / 2;
    let bus = bus(db.pool.clone(), &probe)
        .inbox_dedup_window(window)
        .build()
        .await
        .unwrap();
    let id = MessageId::new("webhooks", "delivery-9");
    assert!(
        bus.receive(id.clone(), Paid { amount: 1 })
            .await
            .unwrap()
            .event_id()
            .is_some()
    );
    assert_eq!(
        bus.receive(id.clone(), Paid { amount: 1 }).await.unwrap(),
        Received::Duplicate
    );
    for n in 0..20 {
        let other = MessageId::new("webhooks", format!("other-{n}"));
        assert!(
            !bus.receive(other, Paid { amount: 2 })
                .await
                .unwrap()
                .is_duplicate()
        );
    }

    // An hour later, the window (half an hour) is over for every message received so far.
    B::all_an_hour_before(&db.pool, "txbus_inbox").await;
    let again = bus.receive(id.clone(), Paid { amount: 1 }).await.unwrap();
    assert!(
        matches!(again, Received::Accepted(_)),
        "the window is over: {again:?}"
    );
    assert_eq!(
        bus.receive(id, Paid { amount: 1 }).await.unwrap(),
        Received::Duplicate
    );

    // The poller forgets the records older than the window.
    eventually("old records to be purged", || async {
        (B::count(&db.pool, "SELECT count(*) AS n FROM txbus_inbox").await == 1).then_some(())
    })
    .await;
    crate::support::idle(&bus).await;
    bus.shutdown().await;
}

pub async fn content_hash_ids_deduplicate_equal_payloads<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();
    let body = br#"{"invoice":17,"total":"12.50"}"#;
    let first = bus
        .receive(MessageId::content_hash("email", body), Paid { amount: 17 })
        .await
        .unwrap();
    let same = bus
        .receive(MessageId::content_hash("email", body), Paid { amount: 17 })
        .await
        .unwrap();
    let other = bus
        .receive(
            MessageId::content_hash("email", br#"{"invoice":18,"total":"12.50"}"#),
            Paid { amount: 18 },
        )
        .await
        .unwrap();
    let other_source = bus
        .receive(MessageId::content_hash("sftp", body), Paid { amount: 17 })
        .await
        .unwrap();
    assert!(matches!(first, Received::Accepted(_)));
    assert_eq!(same, Received::Duplicate);
    assert!(matches!(other, Received::Accepted(_)));
    assert!(
        matches!(other_source, Received::Accepted(_)),
        "the source is part of the id"
    );
    bus.shutdown().await;
}

pub async fn bad_message_ids_store_nothing<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();
    for id in [
        MessageId::new("", "k"),
        MessageId::new("s", ""),
        MessageId::new("s", "k".repeat(300)),
    ] {
        let error = bus.receive(id, Paid { amount: 1 }).await.unwrap_err();
        assert!(matches!(error, Error::Invalid(_)), "{error:?}");
        assert!(error.to_string().starts_with("invalid input"), "{error}");
    }
    let unserializable = bus
        .receive(MessageId::new("s", "k"), Unserializable)
        .await
        .unwrap_err();
    assert!(
        matches!(unserializable, Error::Serialize { .. }),
        "{unserializable:?}"
    );
    let in_transaction: Result<Received, Error> = bus
        .transaction(async |tx| {
            tx.receive(MessageId::new("", "k"), &Paid { amount: 1 })
                .await
        })
        .await;
    assert!(matches!(in_transaction, Err(Error::Invalid(_))));
    assert_eq!(
        B::count(&db.pool, "SELECT count(*) AS n FROM txbus_inbox").await,
        0
    );
    assert_eq!(
        B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await,
        0
    );
    bus.shutdown().await;
}

/// An event whose serialization fails.
#[derive(Debug, Clone, Deserialize, txbus::Event)]
#[event(name = "contract.inbox.unserializable")]
struct Unserializable;

impl Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("this event cannot be serialized"))
    }
}

pub async fn receive_in_a_transaction_rolls_back_with_it<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();
    let id = MessageId::new("queue", "m-1");
    let rolled_back: Result<(), Error> = bus
        .transaction(async |tx| {
            assert!(
                !tx.receive(id.clone(), &Paid { amount: 3 })
                    .await?
                    .is_duplicate()
            );
            Err(Error::Invalid("rolled back on purpose".into()))
        })
        .await;
    assert!(rolled_back.is_err());
    // Rolled back with the transaction: the message is new again.
    let received = bus
        .transaction(async |tx| {
            let first = tx.receive(id.clone(), &Paid { amount: 3 }).await?;
            let second = tx.receive(id.clone(), &Paid { amount: 3 }).await?;
            Ok::<_, Error>((first, second))
        })
        .await
        .unwrap();
    assert!(matches!(received.0, Received::Accepted(_)));
    assert_eq!(received.1, Received::Duplicate);
    probe
        .wait_until("the accepted message's listeners", |c| c.len() == 2)
        .await;
    crate::support::idle(&bus).await;
    assert_eq!(probe.calls().len(), 2);
    bus.shutdown().await;
}

pub async fn inbox_store_leases_and_deletes<B: TestBackend>() {
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    // Leases far longer than the test: none passes unless the test moves it into the past.
    let lease = HOUR / 2;
    let store = InboxStore::new(db.pool.clone()).lease(lease);
    let other = InboxStore::new(db.another_pool().await).lease(lease);
    for n in 0..5 {
        let message = InboxMessage::new(
            MessageId::new("partner", format!("m{n}")),
            &serde_json::json!({ "n": n }),
        )
        .unwrap();
        assert!(store.store_message(&message).await.unwrap());
        assert!(
            !store.store_message(&message).await.unwrap(),
            "storing is idempotent"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(store.message_count().await.unwrap(), 5);

    // Two consumers never hold the same message, oldest first.
    let mut taken = Vec::new();
    for consumer in [&store, &other, &store, &other, &store] {
        taken.push(consumer.next_message().await.unwrap().unwrap());
    }
    let keys: Vec<&str> = taken.iter().map(|m| m.id().key()).collect();
    assert_eq!(keys, ["m0", "m1", "m2", "m3", "m4"]);
    assert!(
        other.next_message().await.unwrap().is_none(),
        "all are held"
    );
    assert_eq!(
        taken[0].payload_as::<serde_json::Value>().unwrap(),
        serde_json::json!({ "n": 0 })
    );
    assert_eq!(taken[0].deliveries(), 1);
    assert!(taken[0].received_at().is_some());

    assert!(store.delete_message(&taken[0]).await.unwrap());
    assert!(
        !store.delete_message(&taken[0]).await.unwrap(),
        "deleted already"
    );
    assert_eq!(store.message_count().await.unwrap(), 4);

    // After the lease the rest come back; a stale handle can no longer delete them. An hour
    // later, the half-hour leases are over.
    B::all_an_hour_before(&db.pool, "txbus_inbox_messages").await;
    let again = other.next_message().await.unwrap().unwrap();
    assert_eq!((again.id().key(), again.deliveries()), ("m1", 2));
    assert!(
        !store.delete_message(&taken[1]).await.unwrap(),
        "its lease was taken over"
    );
    assert!(other.delete_message(&again).await.unwrap());
    assert_eq!(store.message_count().await.unwrap(), 3);

    let bad = InboxMessage::new(MessageId::new("", "x"), &1).unwrap();
    assert!(matches!(
        store.store_message(&bad).await,
        Err(Error::Invalid(_))
    ));
}

pub async fn inbox_store_consumers_never_share_a_message<B: TestBackend>() {
    const MESSAGES: usize = 200;
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    let store = InboxStore::new(db.pool.clone()).lease(HOUR);
    for n in 0..MESSAGES {
        let message = InboxMessage::new(MessageId::new("feed", format!("m{n}")), &n).unwrap();
        assert!(store.store_message(&message).await.unwrap());
    }
    // Two consumers (pools, as two processes would have), four tasks each, all at once.
    let consumers = [store, InboxStore::new(db.another_pool().await).lease(HOUR)];
    let tasks: Vec<_> = consumers
        .iter()
        .flat_map(|consumer| std::iter::repeat_n(consumer.clone(), 4))
        .map(|consumer| {
            tokio::spawn(async move {
                let mut taken = Vec::new();
                while let Some(message) = consumer.next_message().await.unwrap() {
                    taken.push(message.id().key().to_owned());
                }
                taken
            })
        })
        .collect();
    let mut taken = Vec::new();
    for task in tasks {
        taken.extend(task.await.unwrap());
    }
    let distinct: std::collections::HashSet<&String> = taken.iter().collect();
    assert_eq!(taken.len(), MESSAGES, "each message handed out once");
    assert_eq!(distinct.len(), MESSAGES);
    assert_eq!(consumers[0].message_count().await.unwrap(), MESSAGES as u64);
}
