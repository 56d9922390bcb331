//! The connection pool shared by the bus and the application.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool::Runtime;
use deadpool::managed::{self, Object, PoolError};

use crate::error::Error;
use crate::store::Backend;

/// A pooled connection: dereferences to the backend's diesel-async connection
/// (`AsyncPgConnection`, `SyncConnectionWrapper<SqliteConnection>`), and goes back to the pool
/// when dropped.
pub type PooledConnection<B> = Object<<B as Backend>::Manager>;

/// A pool of database connections for backend `B`, cheap to clone.
///
/// The bus takes one from here for each emit, poll and batch of results; the application can use
/// the same pool for its own queries.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), txbus::Error> {
/// use txbus::{Pool, Sqlite};
/// # let dir = std::env::temp_dir().join(format!("txbus-doc-pool-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// # let path = dir.join("app.db");
/// # let path = path.to_str().unwrap();
///
/// let pool = Pool::<Sqlite>::builder(path).max_size(4).connect().await?;
/// let mut conn = pool.get().await?;
/// diesel_async::SimpleAsyncConnection::batch_execute(&mut *conn, "SELECT 1").await?;
/// # Ok(())
/// # }
/// ```
pub struct Pool<B: Backend> {
    inner: managed::Pool<B::Manager>,
    /// The turns of the bus's writers, on a single-writer database.
    writer: Option<Arc<tokio::sync::Mutex<()>>>,
    acquire_timeout: Duration,
    /// The offset of the test kit's clock, set on each connection taken once any clock moved.
    #[cfg(feature = "testing")]
    clock: crate::store::Clock,
}

impl<B: Backend> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            writer: self.writer.clone(),
            acquire_timeout: self.acquire_timeout,
            #[cfg(feature = "testing")]
            clock: self.clock.clone(),
        }
    }
}

/// The bus's turn to write, on a single-writer database; nothing elsewhere.
pub(crate) type WriteTurn = Option<tokio::sync::OwnedMutexGuard<()>>;

impl<B: Backend> fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.inner.status();
        f.debug_struct("Pool")
            .field("backend", &B::NAME)
            .field("size", &status.size)
            .field("max_size", &status.max_size)
            .field("available", &status.available)
            .finish()
    }
}

impl<B: Backend> Pool<B> {
    /// Opens a pool with the default settings and checks that a connection can be made.
    ///
    /// `url` is `postgres://user:password@host:port/database` for PostgreSQL,
    /// `mysql://user:password@host:port/database` for MySQL and MariaDB, and a file path for
    /// SQLite (created if missing).
    pub fn connect(url: &str) -> impl Future<Output = Result<Self, Error>> + Send + '_ {
        async move { Self::builder(url).connect().await }
    }

    /// Starts configuring a pool for `url`.
    pub fn builder(url: impl Into<String>) -> PoolBuilder<B> {
        PoolBuilder {
            url: url.into(),
            max_size: None,
            connect_timeout: Duration::from_secs(10),
            acquire_timeout: Duration::from_secs(30),
            _backend: std::marker::PhantomData,
        }
    }

    /// Takes a connection, waiting for one to come back when all are in use (at most the pool's
    /// acquire timeout, 30 seconds unless set).
    pub fn get(&self) -> impl Future<Output = Result<PooledConnection<B>, Error>> + Send + '_ {
        async move {
            let conn = self.inner.get().await.map_err(pool_error::<B>)?;
            #[cfg(feature = "testing")]
            let conn = self.set_clock(conn).await?;
            Ok(conn)
        }
    }

    /// Sets the connection's offset to this pool's clock, once any clock of the process moved.
    #[cfg(feature = "testing")]
    async fn set_clock(&self, mut conn: PooledConnection<B>) -> Result<PooledConnection<B>, Error> {
        if crate::store::clock::moved() {
            B::set_clock_offset(&mut conn, self.clock.offset_us()).await?;
        }
        Ok(conn)
    }

    /// This pool with a clock of its own, for a bus: moving it moves no other pool's.
    #[cfg(feature = "testing")]
    pub(crate) fn with_own_clock(mut self) -> Self {
        self.clock = crate::store::Clock::default();
        self
    }

    /// The clock of the bus that owns this pool (the test kit's).
    #[cfg(feature = "testing")]
    pub(crate) fn clock(&self) -> &crate::store::Clock {
        &self.clock
    }

    /// How far the test kit moved this pool's clock ahead of the database's: zero unless a
    /// test called [`EventBus::advance`](crate::EventBus::advance).
    pub(crate) fn clock_offset(&self) -> Duration {
        #[cfg(feature = "testing")]
        return self.clock.offset();
        #[cfg(not(feature = "testing"))]
        Duration::ZERO
    }

    /// Waits for the bus's turn to write (see `Backend::SINGLE_WRITER`).
    pub(crate) async fn write_turn(&self) -> Result<WriteTurn, Error> {
        let Some(writer) = &self.writer else {
            return Ok(None);
        };
        match tokio::time::timeout(self.acquire_timeout, writer.clone().lock_owned()).await {
            Ok(turn) => Ok(Some(turn)),
            Err(_) => Err(Error::connection(
                format!(
                    "timed out after {:?} waiting to write to {}; a transaction of this process may \
                     hold the database (inside `EventBus::transaction`, emit with the transaction's \
                     `emit`, not the bus's)",
                    self.acquire_timeout,
                    B::NAME
                ),
                "single writer busy",
            )),
        }
    }

    /// A connection for a write of the bus, with its turn.
    pub(crate) async fn get_for_write(&self) -> Result<(WriteTurn, PooledConnection<B>), Error> {
        let turn = self.write_turn().await?;
        Ok((turn, self.get().await?))
    }

    /// The underlying deadpool pool, for its status or its settings.
    pub fn deadpool(&self) -> &managed::Pool<B::Manager> {
        &self.inner
    }
}

/// Settings of a [`Pool`]; made by [`Pool::builder`].
pub struct PoolBuilder<B: Backend> {
    url: String,
    max_size: Option<usize>,
    connect_timeout: Duration,
    acquire_timeout: Duration,
    _backend: std::marker::PhantomData<fn() -> B>,
}

impl<B: Backend> fmt::Debug for PoolBuilder<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("url", &redact(&self.url))
            .field("max_size", &self.max_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish()
    }
}

impl<B: Backend> PoolBuilder<B> {
    /// The most connections open at once. Default: four per CPU core.
    pub fn max_size(mut self, max_size: usize) -> Self {
        self.max_size = Some(max_size);
        self
    }

    /// How long opening one connection may take. Default: 10 seconds.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long [`Pool::get`] waits for a free connection. Default: 30 seconds.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Opens the pool and checks that a connection can be made.
    pub fn connect(self) -> impl Future<Output = Result<Pool<B>, Error>> + Send {
        async move {
            if self.max_size == Some(0) {
                return Err(Error::Config(
                    "a pool needs max_size of at least 1".to_owned(),
                ));
            }
            let manager = B::manager(&self.url)?;
            let mut builder = managed::Pool::builder(manager)
                .runtime(Runtime::Tokio1)
                .create_timeout(Some(self.connect_timeout))
                .wait_timeout(Some(self.acquire_timeout))
                .recycle_timeout(Some(self.connect_timeout));
            if let Some(max_size) = self.max_size {
                builder = builder.max_size(max_size);
            }
            let inner = builder.build().map_err(|e| {
                Error::connection(format!("could not build the {} pool", B::NAME), e)
            })?;
            let pool = Pool {
                inner,
                writer: B::SINGLE_WRITER.then(|| Arc::new(tokio::sync::Mutex::new(()))),
                acquire_timeout: self.acquire_timeout,
                #[cfg(feature = "testing")]
                clock: crate::store::Clock::default(),
            };
            drop(pool.get().await.map_err(|e| match e {
                Error::Connection { source, .. } => Error::Connection {
                    context: format!(
                        "could not connect to {} at `{}`",
                        B::NAME,
                        redact(&self.url)
                    ),
                    source,
                },
                other => other,
            })?);
            Ok(pool)
        }
    }
}

fn pool_error<B: Backend>(error: PoolError<diesel_async::pooled_connection::PoolError>) -> Error {
    let context = match &error {
        PoolError::Timeout(_) => format!(
            "timed out waiting for a {} connection; the pool may be too small for the load, or \
             the database unreachable",
            B::NAME
        ),
        PoolError::Closed => format!("the {} pool is closed", B::NAME),
        _ => format!("could not open a {} connection", B::NAME),
    };
    Error::connection(context, error)
}

/// Hides the password of a `scheme://user:password@host/...` URL.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Only a URL that cannot have a password refuses one, and this one has one.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

/// A SQLite path has no password to hide.
#[cfg(not(any(feature = "postgres", feature = "mysql")))]
pub(crate) fn redact(url: &str) -> String {
    url.to_owned()
}

#[cfg(all(test, any(feature = "postgres", feature = "mysql")))]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("app.db"), "app.db");
        assert_eq!(
            redact("mysql://root:p%40ss@127.0.0.1:3306/test"),
            "mysql://root:***@127.0.0.1:3306/test"
        );
    }
}
