//! For test binaries with a `main` of their own (`harness = false`): those that start copies of
//! themselves as child processes, or that set something for the whole process. Their tests are
//! [`Trial`]s run by `libtest-mimic`, so they list (`--list`), filter and run one by one
//! (`--exact`, nextest) like the tests of any other binary.
//!
//! Such a `main` first checks whether it was started as a child (an environment variable the
//! parent set) and runs that role; only otherwise does it read the test runner's arguments.

pub use libtest_mimic::{Arguments, Trial};

/// A multi-threaded runtime like the one a service would run.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Calls a function generic over the backend with the backend named by a string.
#[macro_export]
macro_rules! with_backend {
    ($name:expr, $f:ident ( $($arg:expr),* )) => {
        match $name {
            #[cfg(feature = "postgres")]
            "postgres" => $f::<txbus::Postgres>($($arg),*),
            #[cfg(feature = "mysql")]
            "mysql" => $f::<txbus::Mysql>($($arg),*),
            #[cfg(feature = "sqlite")]
            "sqlite" => $f::<txbus::Sqlite>($($arg),*),
            other => panic!("unknown or not compiled backend {other}"),
        }
    };
}

/// The backends this binary was built with.
pub fn backends() -> Vec<&'static str> {
    let mut all = Vec::new();
    if cfg!(feature = "postgres") {
        all.push("postgres");
    }
    if cfg!(feature = "mysql") {
        all.push("mysql");
    }
    if cfg!(feature = "sqlite") {
        all.push("sqlite");
    }
    all
}

/// A test that runs `scenario` to its end; a panic fails it.
pub fn trial(name: impl Into<String>, scenario: impl FnOnce() + Send + 'static) -> Trial {
    Trial::test(name, move || {
        scenario();
        Ok(())
    })
}

/// The scenario `name` on every backend this binary was built with, as one test each
/// (`<backend>::<name>`): `scenario` gets the backend's name (and calls a generic function with
/// [`with_backend!`]).
pub fn on_every_backend(name: &str, scenario: fn(&'static str)) -> Vec<Trial> {
    backends()
        .into_iter()
        .map(|backend| trial(format!("{backend}::{name}"), move || scenario(backend)))
        .collect()
}

/// The test runner's arguments (`--list`, filters, `--exact`, ...). The tests run one at a time
/// unless `--test-threads` asks for more: they start processes, cut connections, measure memory
/// and time, and would disturb each other's figures if they ran together.
pub fn arguments() -> Arguments {
    let mut args = Arguments::from_args();
    args.test_threads.get_or_insert(1);
    args
}

/// A child process that is killed when this is dropped: when a test fails, its children stop
/// with it rather than run on against its dropped database.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// Kills the child and waits for it.
    pub fn stop(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Already stopped, or exited by itself: both fine.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}
