//! The contract suite: every scenario runs against every backend txbus was built with, each in
//! a database of its own. Run the whole suite with `cargo test --workspace --all-features`.
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "../support/mod.rs"]
mod support;

mod build;
mod emit;
mod expiry;
mod retry;
mod sharing;

/// Declares, for each backend, one test per scenario. A scenario is an `async fn` generic over
/// the backend, in one of the modules above.
macro_rules! contract {
    ($($module:ident :: $scenario:ident),* $(,)?) => {
        #[cfg(feature = "postgres")]
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$module::$scenario::<txbus::Postgres>().await;
                }
            )*
        }

        #[cfg(feature = "sqlite")]
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$module::$scenario::<txbus::Sqlite>().await;
                }
            )*
        }
    };
}

contract! {
    emit::emit_writes_entities_and_event_atomically,
    emit::failed_operation_leaves_nothing,
    emit::rollback_dispatches_nothing,
    emit::listeners_run_after_the_commit,
    emit::event_without_listeners_writes_nothing,
    emit::concurrent_emits_are_each_delivered_once,
    emit::emit_after_shutdown_is_refused,
    retry::failures_are_retried_with_backoff,
    retry::timeouts_cancel_the_listener_without_overlap,
    retry::panics_are_retried_and_the_bus_keeps_working,
    retry::undeserializable_payload_fails_only_its_delivery,
    expiry::deliveries_expire_into_dead_letters,
    expiry::max_attempts_ends_in_a_dead_letter,
    expiry::abort_ends_in_a_dead_letter_at_once,
    expiry::unknown_listeners_wait_and_expire_as_no_listener,
    sharing::two_buses_drain_a_backlog_exactly_once,
    sharing::concurrent_first_starts_migrate_once,
    build::bad_configuration_fails_build,
}
