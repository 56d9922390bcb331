//! Scenario 1: SIGKILL at random points. A worker process emits a stream of events, each with an
//! entity write (and every fifth in a transaction that rolls back), while this process kills it
//! at random moments and starts it again, at least 20 times. Then a bus with the poller runs
//! here. Every committed entity must have had its event delivered to each listener at least
//! once, no listener may have run for an entity that was never committed, and no delivery may be
//! left over.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use txbus::{Context, Entity, EventBus, EventSettings, ListenerError, Pool, persist};

use crate::support::backends::exec;
use crate::support::process::{KillOnDrop, runtime};
use crate::support::{TestBackend, eventually};
use crate::{Order, Rng, scale, seed, with_backend};

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "fault.kill.order")]
struct KilledOrder {
    id: i64,
}

/// Writes a row for each run of a listener, through the bus's database.
struct RunLog(Arc<dyn Fn(String) -> txbus::BoxFuture<'static, ()> + Send + Sync>);

impl RunLog {
    fn new<B: TestBackend>(pool: &Pool<B>) -> Self {
        let pool = pool.clone();
        Self(Arc::new(move |sql| {
            let pool = pool.clone();
            Box::pin(async move { exec(&pool, &sql).await })
        }))
    }

    async fn record(&self, listener: &str, id: i64) {
        (self.0)(format!(
            "INSERT INTO fault_runs (listener, order_id) VALUES ('{listener}', {id})"
        ))
        .await;
    }
}

#[txbus::listener(name = "fault.kill.audit")]
async fn audit(event: KilledOrder, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<RunLog>()?.record("audit", event.id).await;
    Ok(())
}

#[txbus::listener(name = "fault.kill.notify")]
async fn notify(event: KilledOrder, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<RunLog>()?.record("notify", event.id).await;
    Ok(())
}

fn settings() -> EventSettings {
    EventSettings::default()
        .max_execution_time(Duration::from_secs(1))
        .retry_after(Duration::from_millis(100))
}

async fn count<B: TestBackend>(pool: &Pool<B>, sql: &'static str) -> i64 {
    B::count(pool, sql).await
}

pub async fn kill_9_at_random_points<B: TestBackend>()
where
    Order: Entity<B>,
{
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    exec(
        &db.pool,
        "CREATE TABLE fault_orders (id BIGINT PRIMARY KEY, note VARCHAR(255) NOT NULL)",
    )
    .await;
    exec(
        &db.pool,
        "CREATE TABLE fault_runs (listener VARCHAR(32) NOT NULL, order_id BIGINT NOT NULL)",
    )
    .await;

    let kills = 20 * scale();
    let mut rng = Rng::new(seed(&format!("{}::kill", B::NAME)));
    for round in 0..kills {
        let mut worker = KillOnDrop(
            Command::new(std::env::current_exe().unwrap())
                .env("TXBUS_FAULT_CHILD", "kill-worker")
                .args([
                    B::NAME,
                    &db.url,
                    &((round as i64 + 1) * 1_000_000).to_string(),
                ])
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(rng.range(20, 400))).await;
        assert!(
            worker.try_wait().unwrap().is_none(),
            "the worker stopped by itself"
        );
        worker.stop();
    }
    let committed = count(&db.pool, "SELECT count(*) AS n FROM fault_orders").await;
    let left = count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await;
    eprintln!(
        "[{}] {kills} kills: {committed} orders committed, {left} deliveries left behind",
        B::NAME
    );
    assert!(
        committed > 0,
        "the workers committed nothing before they were killed"
    );

    // The survivor: its poller takes over what the workers leased once the leases pass.
    let bus = EventBus::builder(db.pool.clone())
        .state(RunLog::new(&db.pool))
        .event::<KilledOrder>(settings())
        .retry_every(Duration::from_millis(50))
        .max_events_per_retry(500)
        .build()
        .await
        .unwrap();
    eventually("every delivery to complete", || async {
        (count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;
    crate::support::idle(&bus).await;
    bus.shutdown().await;

    for listener in ["audit", "notify"] {
        let sql: &'static str = match listener {
            "audit" => {
                "SELECT count(*) AS n FROM fault_orders o WHERE NOT EXISTS \
                        (SELECT 1 FROM fault_runs r WHERE r.order_id = o.id AND r.listener = 'audit')"
            }
            _ => {
                "SELECT count(*) AS n FROM fault_orders o WHERE NOT EXISTS \
                  (SELECT 1 FROM fault_runs r WHERE r.order_id = o.id AND r.listener = 'notify')"
            }
        };
        assert_eq!(
            count(&db.pool, sql).await,
            0,
            "a committed order never reached {listener}"
        );
    }
    let phantom = count(
        &db.pool,
        "SELECT count(*) AS n FROM fault_runs r WHERE NOT EXISTS \
         (SELECT 1 FROM fault_orders o WHERE o.id = r.order_id)",
    )
    .await;
    assert_eq!(
        phantom, 0,
        "a listener ran for an order that was never committed"
    );
    let runs = count(&db.pool, "SELECT count(*) AS n FROM fault_runs").await;
    eprintln!(
        "[{}] all {committed} committed orders delivered to both listeners ({runs} runs, {} more than once)",
        B::NAME,
        runs - 2 * committed
    );
}

/// The worker: `<backend> <url> <first id>`. Emits until it is killed.
pub fn worker(args: &[String]) {
    let (backend, url, first) = (
        args[0].as_str(),
        args[1].clone(),
        args[2].parse::<i64>().unwrap(),
    );
    with_backend!(backend, work(url, first));
}

fn work<B: TestBackend>(url: String, first: i64)
where
    Order: Entity<B>,
{
    runtime().block_on(async move {
        let pool = Pool::<B>::builder(url).max_size(8).connect().await.unwrap();
        let bus = EventBus::builder(pool.clone())
            .state(RunLog::new(&pool))
            .event::<KilledOrder>(settings())
            .run_migrations(false)
            .build()
            .await
            .unwrap();
        for id in first.. {
            let order = Order {
                id,
                note: format!("order {id}"),
            };
            if id % 5 == 4 {
                // Written, emitted, and rolled back: no listener may ever see it.
                let rolled_back: Result<(), txbus::Error> = bus
                    .transaction(async |tx| {
                        <Order as Entity<B>>::persist(&order, tx.conn()).await?;
                        tx.emit(&KilledOrder { id }).await?;
                        Err(txbus::Error::Config("rolled back on purpose".into()))
                    })
                    .await;
                assert!(rolled_back.is_err());
            } else {
                bus.emit(KilledOrder { id }, [persist(&order)])
                    .await
                    .unwrap();
            }
        }
    });
}
