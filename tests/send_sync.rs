//! The type-level promises: handles are `Send + Sync`, the public futures are `Send` (so they
//! can be spawned), errors are `std::error::Error + Send + Sync + 'static`.
#![cfg(feature = "sqlite")]
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::fmt::Debug;
use std::hash::Hash;

use support::TestBackend;
use txbus::{
    BuildError, Error, EventBus, EventId, InboxMessage, InboxStore, MessageId, Sqlite, StateError,
};

fn assert_send<T: Send>(value: T) -> T {
    value
}

fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}

fn assert_error<T: std::error::Error + Send + Sync + 'static>() {}

fn assert_id<T: Debug + std::fmt::Display + Clone + Copy + PartialEq + Eq + Hash>() {}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
struct Noted {
    n: u32,
}

#[test]
fn handles_ids_and_errors() {
    assert_send_sync_clone::<EventBus<Sqlite>>();
    assert_send_sync_clone::<txbus::Pool<Sqlite>>();
    assert_send_sync_clone::<txbus::InboxStore<Sqlite>>();
    assert_send_sync_clone::<txbus::MessageId>();
    assert_id::<EventId>();
    assert_error::<Error>();
    assert_error::<BuildError>();
    assert_error::<StateError>();
}

#[tokio::test]
async fn public_futures_are_send_and_spawnable() {
    let db = Sqlite::open().await;
    let bus: EventBus<Sqlite> = assert_send(EventBus::builder(db.pool.clone()).build())
        .await
        .unwrap();

    let emitted = tokio::spawn({
        let bus = bus.clone();
        async move { bus.emit(Noted { n: 1 }, []).await }
    });
    emitted.await.unwrap().unwrap();

    let in_transaction = tokio::spawn({
        let bus = bus.clone();
        async move {
            bus.transaction(async |tx| {
                tx.emit(&Noted { n: 2 }).await?;
                Ok::<_, Error>(())
            })
            .await
        }
    });
    in_transaction.await.unwrap().unwrap();

    let received = tokio::spawn({
        let bus = bus.clone();
        async move {
            let first = bus
                .receive(MessageId::new("s", "k"), Noted { n: 3 })
                .await?;
            let again = bus
                .transaction(async |tx| tx.receive(MessageId::new("s", "k"), &Noted { n: 3 }).await)
                .await?;
            Ok::<_, Error>((first, again))
        }
    });
    let (first, again) = received.await.unwrap().unwrap();
    assert!(first.event_id().is_some() && again.is_duplicate());

    let scheduled = tokio::spawn({
        let bus = bus.clone();
        async move {
            let hour = std::time::Duration::from_secs(3600);
            let later = bus.emit_after(hour, Noted { n: 4 }, []).await?;
            let at = std::time::SystemTime::now() + hour;
            bus.emit_at(at, Noted { n: 5 }, []).await?;
            let listed = bus.scheduled(10).await?.len();
            let cancelled = bus
                .transaction(async |tx| {
                    let own = tx.emit_after(hour, &Noted { n: 6 }).await?;
                    tx.emit_at(at, &Noted { n: 7 }).await?;
                    Ok::<_, Error>(tx.cancel(own).await? + tx.cancel(later).await?)
                })
                .await?;
            Ok::<_, Error>((listed, cancelled + bus.cancel(later).await?))
        }
    });
    // No listener of `Noted` in this binary: scheduled events have no deliveries.
    assert_eq!(scheduled.await.unwrap().unwrap(), (0, 0));

    let store = InboxStore::new(db.pool.clone());
    let message = InboxMessage::new(MessageId::new("s", "m"), &1).unwrap();
    let stored = tokio::spawn({
        let store = store.clone();
        async move {
            store.store_message(&message).await?;
            let next = store.next_message().await?;
            store.delete_message(&next.unwrap()).await?;
            store.message_count().await
        }
    });
    assert_eq!(stored.await.unwrap().unwrap(), 0);

    assert_send(bus.wait_idle()).await;
    assert_send(txbus::migrate(&db.pool)).await.unwrap();
    tokio::spawn({
        let bus = bus.clone();
        async move { bus.shutdown().await }
    })
    .await
    .unwrap();
}
