//! `build()` refuses configurations that cannot work, saying which value is wrong.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use txbus::{BuildError, EventBus, EventSettings};

use crate::support::TestBackend;

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.configured")]
struct Configured;

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.configured")]
struct SameName;

pub async fn bad_configuration_fails_build<B: TestBackend>() {
    let db = B::open().await;
    let secs = Duration::from_secs;
    let builders = [
        (
            EventBus::builder(db.pool.clone()).max_events_per_retry(0),
            "max_events_per_retry must be at least 1",
        ),
        (
            EventBus::builder(db.pool.clone()).max_concurrent_listeners(0),
            "max_concurrent_listeners must be at least 1",
        ),
        (
            EventBus::builder(db.pool.clone()).retry_every(Duration::ZERO),
            "retry_every must be longer than zero",
        ),
        (
            EventBus::builder(db.pool.clone())
                .event::<Configured>(EventSettings::default().retry_after(Duration::ZERO)),
            "invalid setting for event `contract.configured`: retry_after must be longer than zero",
        ),
        (
            EventBus::builder(db.pool.clone()).event::<Configured>(
                EventSettings::default()
                    .max_execution_time(secs(60))
                    .expires_after(secs(60)),
            ),
            "max_execution_time (60s) must be shorter than expires_after (60s)",
        ),
        (
            EventBus::builder(db.pool.clone())
                .default_settings(EventSettings::default().max_attempts(0)),
            "default_settings: max_attempts must be at least 1",
        ),
        (
            EventBus::builder(db.pool.clone())
                .event::<Configured>(EventSettings::default())
                .event::<SameName>(EventSettings::default()),
            "both have the name `contract.configured`",
        ),
    ];
    for (builder, expected) in builders {
        let error = builder.build().await.unwrap_err();
        assert!(
            matches!(
                error,
                BuildError::InvalidSettings { .. } | BuildError::DuplicateEventName { .. }
            ),
            "{error:?}"
        );
        assert!(
            error.to_string().contains(expected),
            "`{error}` does not say `{expected}`"
        );
    }
}
