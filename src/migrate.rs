//! The embedded schema migrations and the `migrate` entry point.
//!
//! txbus records what it applied in its own table, `txbus_migrations`, so that its history never
//! mixes with the application's own migrations (diesel's `__diesel_schema_migrations`).

use std::future::Future;

use crate::{Backend, Error, Pool};

/// One embedded migration, from `migrations/<backend>/<version>_<name>/up.sql`.
#[derive(Debug)]
pub(crate) struct Migration {
    pub(crate) version: &'static str,
    pub(crate) name: &'static str,
    pub(crate) up: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// The migrations of `all` whose version is not in `applied`, in order.
pub(crate) fn pending<'a>(
    all: &'a [Migration],
    applied: &'a [String],
) -> impl Iterator<Item = &'a Migration> + 'a {
    all.iter()
        .filter(|m| !applied.iter().any(|v| v == m.version))
}

/// Creates or updates txbus's tables in the pool's database, and returns the versions applied.
///
/// [`EventBusBuilder::build`](crate::EventBusBuilder::build) does this already unless
/// [`run_migrations(false)`](crate::EventBusBuilder::run_migrations) is set; call it yourself to
/// migrate from a deploy step instead. Several processes may run it at once: they take turns
/// (a PostgreSQL advisory lock, SQLite's writer lock) and each version is applied exactly once.
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
        let applied = vec!["2".to_owned()];
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
