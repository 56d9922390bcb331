//! The embedded schema migrations, the runner every backend shares, and the `migrate` entry
//! point.
//!
//! txbus records what it applied in its own table, `txbus_migrations`, so that its history never
//! mixes with the application's own migrations (diesel's `__diesel_schema_migrations`).

use std::future::Future;

use diesel_async::{RunQueryDsl, SimpleAsyncConnection};

use crate::error::Error;
use crate::store::Backend;
use crate::store::pool::Pool;
use crate::store::rows::{Lock, Version};
use crate::store::sql::sql;
use crate::store::tx::finish;

/// One embedded migration, from `migrations/<backend>/<version>_<name>/up.sql`.
#[derive(Debug)]
pub struct Migration {
    pub(crate) version: &'static str,
    pub(crate) name: &'static str,
    pub(crate) up: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// How concurrent starts take turns applying migrations.
#[derive(Debug, Clone, Copy)]
pub enum MigrationLock {
    /// A session lock: `lock` waits for it and returns `n` = 1 once taken, `unlock` releases it
    /// (PostgreSQL's advisory lock, MySQL's `GET_LOCK`). Each migration then runs in a
    /// transaction of its own when `transactional` (PostgreSQL), or commits by itself (MySQL,
    /// whose DDL statements commit implicitly).
    Session {
        lock: &'static str,
        unlock: &'static str,
        transactional: bool,
    },
    /// Everything runs in one transaction opened by [`Backend::begin`], which is the lock
    /// (SQLite's writer lock).
    Transaction,
}

/// A backend's migrations and how it applies them.
#[doc(hidden)]
pub trait Migrations<B: Backend = Self> {
    /// The embedded migrations, in version order.
    const EMBEDDED: &'static [Migration];

    /// How concurrent starts take turns.
    const LOCK: MigrationLock;

    /// Creates `txbus_migrations (version, name, applied_at)` unless it exists.
    const CREATE_TABLE: &'static str;

    /// Applies the pending migrations, each exactly once however many processes start at once.
    /// Returns the versions applied.
    fn migrate(
        conn: &mut B::Connection,
    ) -> impl Future<Output = Result<Vec<String>, Error>> + Send {
        async move {
            match Self::LOCK {
                MigrationLock::Session {
                    lock,
                    unlock,
                    transactional,
                } => {
                    let locked: Vec<Lock> = sql::<B::Db>(lock).load(conn).await?;
                    if !locked.iter().any(|row| row.n == Some(1)) {
                        return Err(Error::Config(
                            "could not take the txbus migration lock within 10 minutes; another \
                             process may be stuck migrating this database"
                                .to_owned(),
                        ));
                    }
                    let applied =
                        apply::<B>(conn, Self::EMBEDDED, Self::CREATE_TABLE, transactional).await;
                    // On a broken connection the session ends, and the lock with it.
                    let unlocked = sql::<B::Db>(unlock).load::<Lock>(conn).await;
                    let applied = applied?;
                    unlocked?;
                    Ok(applied)
                }
                MigrationLock::Transaction => {
                    B::begin(conn).await?;
                    let applied = apply::<B>(conn, Self::EMBEDDED, Self::CREATE_TABLE, false).await;
                    finish::<B, _, _>(conn, applied).await
                }
            }
        }
    }
}

/// Creates the migrations table and applies what it does not list, in order.
async fn apply<B: Backend>(
    conn: &mut B::Connection,
    migrations: &'static [Migration],
    create_table: &'static str,
    transactional: bool,
) -> Result<Vec<String>, Error> {
    conn.batch_execute(create_table).await?;
    let done: Vec<Version> = sql::<B::Db>("SELECT version FROM txbus_migrations")
        .load(conn)
        .await?;
    let mut applied = Vec::new();
    for migration in pending(migrations, &done) {
        if transactional {
            B::begin(conn).await?;
        }
        let result = async {
            conn.batch_execute(migration.up).await?;
            sql::<B::Db>("INSERT INTO txbus_migrations (version, name) VALUES (?, ?)")
                .bind(migration.version)
                .bind(migration.name)
                .execute(conn)
                .await
        }
        .await;
        let result = if transactional {
            finish::<B, _, _>(conn, result).await
        } else {
            result
        };
        result.map_err(|source| Error::Migration {
            version: migration.version.to_owned(),
            source,
        })?;
        applied.push(migration.version.to_owned());
    }
    Ok(applied)
}

/// The migrations of `all` whose version is not in `applied`, in order.
fn pending<'a>(
    all: &'a [Migration],
    applied: &'a [Version],
) -> impl Iterator<Item = &'a Migration> + 'a {
    all.iter()
        .filter(|m| !applied.iter().any(|v| v.version == m.version))
}

/// Creates or updates txbus's tables in the pool's database, and returns the versions applied.
///
/// [`EventBusBuilder::build`](crate::EventBusBuilder::build) does this already unless
/// [`run_migrations(false)`](crate::EventBusBuilder::run_migrations) is set; call it yourself to
/// migrate from a deploy step instead. Several processes may run it at once: they take turns
/// (an advisory lock on PostgreSQL, `GET_LOCK` on MySQL, the writer lock on SQLite) and each
/// version is applied exactly once.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), txbus::Error> {
/// # let dir = std::env::temp_dir().join(format!("txbus-doc-migrate-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let pool = txbus::Pool::<txbus::Sqlite>::connect(dir.join("app.db").to_str().unwrap()).await?;
/// let applied = txbus::migrate(&pool).await?;
/// assert!(!applied.is_empty());
/// assert!(txbus::migrate(&pool).await?.is_empty()); // nothing left to do
/// # Ok(())
/// # }
/// ```
pub fn migrate<B: Backend>(
    pool: &Pool<B>,
) -> impl Future<Output = Result<Vec<String>, Error>> + Send + '_ {
    async move {
        let mut conn = pool.get().await?;
        let applied = B::migrate(&mut conn).await?;
        if !applied.is_empty() {
            tracing::info!(backend = B::NAME, versions = ?applied, "applied txbus migrations");
        }
        Ok(applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_skips_applied_and_keeps_order() {
        let all = [
            Migration {
                version: "1",
                name: "a",
                up: "",
            },
            Migration {
                version: "2",
                name: "b",
                up: "",
            },
            Migration {
                version: "3",
                name: "c",
                up: "",
            },
        ];
        let applied = vec![Version {
            version: "2".to_owned(),
        }];
        let names: Vec<_> = pending(&all, &applied).map(|m| m.name).collect();
        assert_eq!(names, ["a", "c"]);
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn migrations_are_embedded_in_version_order() {
        assert!(!SQLITE.is_empty());
        assert!(SQLITE.windows(2).all(|w| w[0].version < w[1].version));
        assert!(SQLITE.iter().all(|m| m.up.contains("txbus_")));
    }
}
