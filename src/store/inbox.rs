//! The inbox: the receipts of messages from outside (deduplication), and the messages the
//! `InboxStore` keeps for pull-style consumers.

use std::future::Future;
use std::time::Duration;

use diesel::QueryResult;
use diesel_async::RunQueryDsl;

use crate::message::MessageId;
use crate::store::rows::{Count, micros, rows};
use crate::store::sql::sql;
use crate::store::tx::finish;
use crate::store::update::read_committed;
use crate::store::{Backend, rows};

rows! {
    /// A message of the `InboxStore`, as stored.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct StoredMessage {
        source: String,
        key: String,
        payload: String,
        received_at_us: i64,
        deliveries: i32,
    }

    /// A message's key.
    pub(crate) struct MessageKey { source: String, key: String }

    /// Whether a receipt is older than the dedup window.
    pub(crate) struct Expired { expired: bool }
}

/// How a backend records a receipt exactly once, however many receive the same id at once.
#[derive(Debug, Clone, Copy)]
pub enum Receipt {
    /// One insert on the key (`$1` source, `$2` key) that on a conflict renews a record older
    /// than the window (`$3`, µs) and otherwise changes nothing: it changes one row exactly when
    /// the receipt is the first within the window.
    Upsert(&'static str),
    /// MySQL, where a duplicate `INSERT IGNORE` takes a shared lock and a following update an
    /// exclusive one (two receipts of one id would deadlock): `read` (`$1` window, `$2` source,
    /// `$3` key) finds a record and whether it is `expired`, a plain read that takes no lock; an
    /// expired record is renewed by `renew` (`$1` source, `$2` key, `$3` window) alone; only an id
    /// not seen (or renewed by another receipt meanwhile, or purged) is inserted by `insert`
    /// (`$1` source, `$2` key), which changes one row when it is new.
    ReadRenewInsert {
        read: &'static str,
        renew: &'static str,
        insert: &'static str,
    },
}

/// How a backend leases the oldest available message of the `InboxStore`.
#[derive(Debug, Clone, Copy)]
pub enum Take {
    /// One statement that leases it for `$1` µs and returns it as a [`StoredMessage`].
    Returning(&'static str),
    /// MySQL, in a short `READ COMMITTED` transaction: `select` its key, locked and skipping
    /// locked ones; `lease` it (`$1` µs, `$2` source, `$3` key); `read` it (`$1`, `$2`).
    SelectLeaseRead {
        select: &'static str,
        lease: &'static str,
        read: &'static str,
    },
}

/// The statements of a backend's inbox, and the operations on them, written once.
#[doc(hidden)]
pub trait Inbox<B: Backend = Self> {
    /// Records a receipt: see [`Receipt`].
    const RECEIPT: Receipt;

    /// Deletes up to `$2` receipts older than `$1` µs, oldest first.
    const PURGE: &'static str;

    /// Keeps a message (`$1` source, `$2` key, `$3` payload, available now) unless one with its
    /// id is kept: changes one row when it keeps it.
    const STORE: &'static str;

    /// Leases the oldest available message: see [`Take`].
    const TAKE: Take;

    /// Deletes message (`$1`, `$2`) if it was handed out `$3` times (not since).
    const DELETE: &'static str;

    /// Counts the messages kept, as `n`.
    const COUNT: &'static str;

    /// Records the receipt of message `id`, unless it was received within `window`: returns
    /// whether this is its first receipt.
    fn reserve_message(
        conn: &mut B::Connection,
        id: &MessageId,
        window: Duration,
    ) -> impl Future<Output = QueryResult<bool>> + Send {
        async move {
            let window = micros(window);
            let (read, renew, insert) = match Self::RECEIPT {
                Receipt::Upsert(upsert) => {
                    let changed = sql::<B::Db>(upsert)
                        .bind(id.source())
                        .bind(id.key())
                        .bind(window)
                        .execute(conn)
                        .await?;
                    return Ok(changed == 1);
                }
                Receipt::ReadRenewInsert {
                    read,
                    renew,
                    insert,
                } => (read, renew, insert),
            };
            let found: Vec<Expired> = sql::<B::Db>(read)
                .bind(window)
                .bind(id.source())
                .bind(id.key())
                .load(conn)
                .await?;
            match found.into_iter().next().map(|row| row.expired) {
                Some(false) => return Ok(false),
                Some(true) => {
                    let renewed = sql::<B::Db>(renew)
                        .bind(id.source())
                        .bind(id.key())
                        .bind(window)
                        .execute(conn)
                        .await?;
                    if renewed == 1 {
                        return Ok(true);
                    }
                }
                None => {}
            }
            let inserted = sql::<B::Db>(insert)
                .bind(id.source())
                .bind(id.key())
                .execute(conn)
                .await?;
            Ok(inserted == 1)
        }
    }

    /// Deletes up to `limit` receipt records older than `window`.
    fn purge_inbox(
        conn: &mut B::Connection,
        window: Duration,
        limit: usize,
    ) -> impl Future<Output = QueryResult<usize>> + Send {
        async move {
            read_committed::<B>(conn).await?;
            sql::<B::Db>(Self::PURGE)
                .bind(micros(window))
                .bind(rows::limit(limit))
                .execute(conn)
                .await
        }
    }

    /// Keeps a message for the `InboxStore`, unless one with its id is kept already.
    fn store_message(
        conn: &mut B::Connection,
        id: &MessageId,
        payload: &str,
    ) -> impl Future<Output = QueryResult<bool>> + Send {
        async move {
            let stored = sql::<B::Db>(Self::STORE)
                .bind(id.source())
                .bind(id.key())
                .bind(payload)
                .execute(conn)
                .await?;
            Ok(stored == 1)
        }
    }

    /// Leases the oldest available message of the `InboxStore` for `lease`.
    fn next_message(
        conn: &mut B::Connection,
        lease: Duration,
    ) -> impl Future<Output = QueryResult<Option<StoredMessage>>> + Send {
        async move {
            let lease = micros(lease);
            let (select, lease_it, read) = match Self::TAKE {
                Take::Returning(take) => {
                    let rows: Vec<StoredMessage> =
                        sql::<B::Db>(take).bind(lease).load(conn).await?;
                    return Ok(rows.into_iter().next());
                }
                Take::SelectLeaseRead {
                    select,
                    lease,
                    read,
                } => (select, lease, read),
            };
            read_committed::<B>(conn).await?;
            B::begin(conn).await?;
            let taken = async {
                let keys: Vec<MessageKey> = sql::<B::Db>(select).load(conn).await?;
                let Some(key) = keys.into_iter().next() else {
                    return Ok(None);
                };
                sql::<B::Db>(lease_it)
                    .bind(lease)
                    .bind(key.source.as_str())
                    .bind(key.key.as_str())
                    .execute(conn)
                    .await?;
                let rows: Vec<StoredMessage> = sql::<B::Db>(read)
                    .bind(key.source.as_str())
                    .bind(key.key.as_str())
                    .load(conn)
                    .await?;
                Ok(rows.into_iter().next())
            }
            .await;
            finish::<B, _, _>(conn, taken).await
        }
    }

    /// Deletes a message of the `InboxStore` if it was not handed out again since.
    fn delete_message(
        conn: &mut B::Connection,
        id: &MessageId,
        deliveries: i32,
    ) -> impl Future<Output = QueryResult<bool>> + Send {
        async move {
            let deleted = sql::<B::Db>(Self::DELETE)
                .bind(id.source())
                .bind(id.key())
                .bind(deliveries)
                .execute(conn)
                .await?;
            Ok(deleted == 1)
        }
    }

    /// How many messages the `InboxStore` keeps.
    fn message_count(conn: &mut B::Connection) -> impl Future<Output = QueryResult<i64>> + Send {
        async move {
            let rows: Vec<Count> = sql::<B::Db>(Self::COUNT).load(conn).await?;
            Ok(rows.into_iter().next().map_or(0, |row| row.n))
        }
    }
}
