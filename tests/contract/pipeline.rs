//! PostgreSQL writes an emit with one derived entity as one statement (`WITH write AS (...)
//! INSERT ...`), sends one with several in one round trip, and falls back to more when an entity
//! needs a custom type looked up first. Every way the emit stays atomic, and its statements are
//! prepared once per connection.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::serialize::{IsNull, Output, ToSql};
use serde::{Deserialize, Serialize};
use txbus::__private::{Statement, Write};
use txbus::{BoxFuture, Context, Entity, Error, ListenerError, Pool, persist};

use crate::emit::User;
use crate::support::backends::{create_users_table, exec};
use crate::support::{Probe, TestBackend, TestDb, bus};

/// A PostgreSQL enum: a custom SQL type, which diesel-async looks up once per connection.
#[derive(diesel::sql_types::SqlType, diesel::query_builder::QueryId)]
#[diesel(postgres_type(name = "pipeline_mood"))]
pub struct MoodType;

#[derive(Debug, Clone, Copy, diesel::expression::AsExpression)]
#[diesel(sql_type = MoodType)]
pub enum Mood {
    Calm,
    Cross,
}

impl ToSql<MoodType, Pg> for Mood {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> diesel::serialize::Result {
        out.write_all(match self {
            Mood::Calm => b"calm",
            Mood::Cross => b"cross",
        })?;
        Ok(IsNull::No)
    }
}

diesel::table! {
    use diesel::sql_types::BigInt;
    use super::MoodType;

    pipeline_moods (id) {
        id -> BigInt,
        mood -> MoodType,
    }
}

#[derive(Insertable, AsChangeset, Identifiable, txbus::Entity)]
#[diesel(table_name = pipeline_moods)]
#[entity(backends(postgres))]
pub struct Moody {
    id: i64,
    mood: Mood,
}

diesel::table! {
    pipeline_profiles (id) {
        id -> BigInt,
        a -> Nullable<Text>,
        b -> Nullable<Text>,
        c -> Nullable<Text>,
        d -> Nullable<Text>,
    }
}

/// Four `Option` fields: up to 16 texts of its upsert, so the derive does not keep it prepared.
#[derive(Insertable, AsChangeset, Identifiable, txbus::Entity)]
#[diesel(table_name = pipeline_profiles)]
#[entity(backends(postgres))]
pub struct Profile {
    id: i64,
    a: Option<String>,
    b: Option<String>,
    c: Option<String>,
    d: Option<String>,
}

/// An entity whose write fails in the client, before anything of it is sent, although it looks
/// as if it could be sent at once.
pub struct Refused;

fn refused<'c>() -> BoxFuture<'c, QueryResult<()>> {
    Box::pin(async { Err(DieselError::QueryBuilderError("refused by the test".into())) })
}

/// The statement of [`Refused`]. The first three walks of its tree are the bus's check that it
/// can go out at once (its binds, its SQL, whether it may be kept prepared); the next one, when
/// it is executed, fails in the client.
struct Flaky(AtomicUsize);

impl QueryFragment<Pg> for Flaky {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        if self.0.fetch_add(1, Ordering::SeqCst) >= 3 {
            return Err(DieselError::QueryBuilderError("refused by the test".into()));
        }
        out.push_sql("SELECT 1");
        Ok(())
    }
}

impl Entity<txbus::Postgres> for Refused {
    fn persist<'c>(
        &'c self,
        _conn: &'c mut <txbus::Postgres as txbus::Backend>::Connection,
    ) -> BoxFuture<'c, QueryResult<()>> {
        refused()
    }

    fn remove<'c>(
        &'c self,
        _conn: &'c mut <txbus::Postgres as txbus::Backend>::Connection,
    ) -> BoxFuture<'c, QueryResult<()>> {
        refused()
    }

    fn __statement(&self, _write: Write) -> Option<Statement<'_, Pg>> {
        Some(Statement::new(Flaky(AtomicUsize::new(0))))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.pipelined")]
struct Pipelined {
    n: i64,
}

#[txbus::listener]
async fn record_pipelined(event: Pipelined, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, event.n.to_string());
    Ok(())
}

fn user(id: i64, email: &str) -> User {
    User {
        id,
        email: email.to_owned(),
    }
}

fn is_unique_violation(error: &Error) -> bool {
    matches!(
        error,
        Error::Database(DieselError::DatabaseError(
            DatabaseErrorKind::UniqueViolation,
            _
        ))
    )
}

async fn deliveries<B: TestBackend>(pool: &Pool<B>) -> i64 {
    B::count(pool, "SELECT count(*) AS n FROM txbus_deliveries").await
}

/// A database with the tables of these scenarios, and a bus on a pool of one connection: the
/// statements that connection keeps prepared, and its first use of a type, are the bus's.
async fn setup<B: TestBackend>() -> (TestDb<B>, Pool<B>, Arc<Probe>, txbus::EventBus<B>) {
    let db = B::open().await;
    create_users_table(&db.pool).await;
    exec(
        &db.pool,
        "CREATE TYPE pipeline_mood AS ENUM ('calm', 'cross');
         CREATE TABLE pipeline_moods (id BIGINT PRIMARY KEY, mood pipeline_mood NOT NULL);
         CREATE TABLE pipeline_profiles (id BIGINT PRIMARY KEY, a TEXT, b TEXT, c TEXT, d TEXT)",
    )
    .await;
    let pool = Pool::<B>::builder(db.url.clone())
        .max_size(1)
        .connect()
        .await
        .unwrap();
    let probe = Probe::new();
    let bus = bus(pool.clone(), &probe).build().await.unwrap();
    (db, pool, probe, bus)
}

pub async fn entities_with_custom_types_are_written_atomically<B: TestBackend>()
where
    User: Entity<B>,
    Moody: Entity<B>,
{
    // The first emit is also the connection's first use of the enum: the type is looked up
    // inside the transaction.
    let (db, _, probe, bus) = setup::<B>().await;
    let calm = Moody {
        id: 1,
        mood: Mood::Calm,
    };

    // A failure behind the lookup leaves nothing.
    let error = bus
        .emit(
            Pipelined { n: 0 },
            [
                persist(&calm),
                persist(&user(1, "a")),
                persist(&user(2, "a")),
            ],
        )
        .await
        .unwrap_err();
    assert!(is_unique_violation(&error), "{error:?}");
    assert_eq!(
        B::count(&db.pool, "SELECT count(*) AS n FROM pipeline_moods").await,
        0
    );
    assert!(!B::user_exists(&db.pool, 1).await);
    assert_eq!(deliveries(&db.pool).await, 0);

    // Either order of entities with and without the lookup.
    bus.emit(Pipelined { n: 1 }, [persist(&calm), persist(&user(1, "a"))])
        .await
        .unwrap();
    let cross = Moody {
        id: 2,
        mood: Mood::Cross,
    };
    bus.emit(
        Pipelined { n: 2 },
        [persist(&user(2, "b")), persist(&cross)],
    )
    .await
    .unwrap();
    probe.wait_until("both deliveries", |c| c.len() == 2).await;
    assert_eq!(
        B::count(
            &db.pool,
            "SELECT count(*) AS n FROM pipeline_moods WHERE (id = 1 AND mood = 'calm') \
             OR (id = 2 AND mood = 'cross')"
        )
        .await,
        2
    );
    assert!(B::user_exists(&db.pool, 1).await && B::user_exists(&db.pool, 2).await);
    crate::support::idle(&bus).await;
    bus.shutdown().await;
}

pub async fn a_write_that_fails_before_it_is_sent_leaves_nothing<B: TestBackend>()
where
    User: Entity<B>,
    Refused: Entity<B>,
{
    // The emits after the failures reuse the one connection they ran on.
    let (db, _, probe, bus) = setup::<B>().await;

    // Sent at once: BEGIN and user 1 went out before the refusal; the event and COMMIT must not.
    for (n, ops) in [
        (1, vec![persist(&user(1, "a")), persist(&Refused)]),
        (2, vec![persist(&Refused), persist(&user(1, "a"))]),
    ] {
        let error = bus.emit(Pipelined { n }, ops).await.unwrap_err();
        assert!(
            format!("{error:?}").contains("refused by the test"),
            "the refusal is the error: {error:?}"
        );
        assert!(!B::user_exists(&db.pool, 1).await, "user 1 was rolled back");
        assert_eq!(deliveries(&db.pool).await, 0);
    }

    // The connection is out of the transaction and usable.
    bus.emit(Pipelined { n: 3 }, [persist(&user(1, "a"))])
        .await
        .unwrap();
    let calls = probe.wait_until("the delivery", |c| c.len() == 1).await;
    assert_eq!(calls[0].note, "3");
    assert!(B::user_exists(&db.pool, 1).await);
    crate::support::idle(&bus).await;
    bus.shutdown().await;
}

/// How many emit statements (`WITH txbus_write AS (...) ...`) the connection of `pool` keeps
/// prepared; `pool` has one connection, the bus's.
async fn prepared<B: TestBackend>(pool: &Pool<B>) -> i64 {
    B::count(
        pool,
        "SELECT count(*) AS n FROM pg_prepared_statements \
         WHERE statement LIKE 'WITH txbus_write AS (%'",
    )
    .await
}

pub async fn one_entity_is_one_statement_prepared_once<B: TestBackend>()
where
    User: Entity<B>,
    Moody: Entity<B>,
    Profile: Entity<B>,
{
    let (db, pool, probe, bus) = setup::<B>().await;

    for i in 1..=5 {
        bus.emit(Pipelined { n: i }, [persist(&user(i, &format!("{i}@x")))])
            .await
            .unwrap();
    }
    assert_eq!(
        prepared(&pool).await,
        1,
        "the upsert with the event is prepared once and reused"
    );
    bus.emit(Pipelined { n: 6 }, [txbus::remove(&user(1, "1@x"))])
        .await
        .unwrap();
    bus.emit(Pipelined { n: 7 }, [txbus::remove(&user(2, "2@x"))])
        .await
        .unwrap();
    assert_eq!(prepared(&pool).await, 2, "and the delete with it");
    assert!(!B::user_exists(&db.pool, 1).await && !B::user_exists(&db.pool, 2).await);

    // A custom type is looked up before the one statement goes out.
    let calm = Moody {
        id: 1,
        mood: Mood::Calm,
    };
    bus.emit(Pipelined { n: 8 }, [persist(&calm)])
        .await
        .unwrap();
    assert_eq!(
        B::count(
            &db.pool,
            "SELECT count(*) AS n FROM pipeline_moods WHERE mood = 'calm'"
        )
        .await,
        1
    );

    // Too many SQL texts to keep: prepared for each emit and closed after it.
    for (i, a) in [
        (10, None),
        (11, Some("a".to_owned())),
        (10, Some("b".to_owned())),
    ] {
        let profile = Profile {
            id: i,
            a,
            b: None,
            c: Some("c".into()),
            d: None,
        };
        bus.emit(Pipelined { n: i }, [persist(&profile)])
            .await
            .unwrap();
    }
    assert_eq!(
        prepared(&pool).await,
        3,
        "only the enum's statement was added"
    );
    assert_eq!(
        B::count(
            &db.pool,
            "SELECT count(*) AS n FROM pipeline_profiles \
             WHERE (id = 10 AND a = 'b' AND c = 'c') OR (id = 11 AND a = 'a')"
        )
        .await,
        2
    );

    // A failing write leaves nothing, and the connection works on.
    let error = bus
        .emit(Pipelined { n: 20 }, [persist(&user(20, "3@x"))])
        .await
        .unwrap_err();
    assert!(is_unique_violation(&error), "{error:?}");
    assert!(!B::user_exists(&db.pool, 20).await);
    probe.wait_until("every delivery", |c| c.len() == 11).await;
    crate::support::idle(&bus).await;
    assert_eq!(deliveries(&db.pool).await, 0);
    bus.shutdown().await;
}
