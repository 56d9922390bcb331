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
mod inbox;
mod ops;
mod ordering;
#[cfg(feature = "postgres")]
mod pipeline;
mod retry;
mod schedule;
mod sharing;
mod versions;

/// Calls `$callback!(<args>; <every scenario>)`: the one list of scenarios.
macro_rules! scenarios {
    ($callback:ident!($($args:tt)*)) => {
        $callback!($($args)*;
            emit::emit_writes_entities_and_event_atomically,
            emit::failed_operation_leaves_nothing,
            emit::rollback_dispatches_nothing,
            emit::listeners_run_after_the_commit,
            emit::event_without_listeners_writes_nothing,
            emit::concurrent_emits_are_each_delivered_once,
            emit::a_transaction_of_many_emits_delivers_each_once,
            emit::emit_after_shutdown_is_refused,
            emit::a_listener_starts_before_emit_returns,
            retry::failures_are_retried_with_backoff,
            retry::retries_run_when_due_without_waiting_for_a_poll,
            retry::a_retry_written_elsewhere_runs_when_due_without_waiting_for_a_poll,
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
            inbox::one_message_received_concurrently_is_accepted_once,
            inbox::duplicates_are_accepted_again_after_the_window,
            inbox::content_hash_ids_deduplicate_equal_payloads,
            inbox::bad_message_ids_store_nothing,
            inbox::receive_in_a_transaction_rolls_back_with_it,
            inbox::inbox_store_leases_and_deletes,
            inbox::inbox_store_consumers_never_share_a_message,
            ops::stats_count_every_state,
            ops::dead_letters_tell_why_and_replay,
            ops::dead_letters_filter_by_reason_and_page,
            ops::purge_removes_only_older_dead_letters,
            ops::retention_empties_the_table_after_its_windows,
            ops::operations_on_an_empty_bus,
            ops::a_renamed_listener_runs_deliveries_of_its_aliases,
            schedule::scheduled_events_run_when_due_and_not_before,
            schedule::a_scheduled_event_written_elsewhere_runs_when_due,
            schedule::a_scheduled_event_rolls_back_with_its_transaction,
            schedule::cancel_removes_what_has_not_started,
            schedule::retries_and_expiry_count_from_the_due_time,
            schedule::scheduled_events_survive_a_restart,
            schedule::bad_schedules_are_refused,
            schedule::a_due_scheduled_event_waits_from_its_due_time,
            versions::old_payloads_are_upcast_when_they_run,
            versions::failed_upcasts_are_dead_letters_at_once_and_replay_after_a_fix,
            versions::newer_versions_are_left_to_instances_that_know_them,
            ordering::keyed_deliveries_run_one_at_a_time_in_order,
            ordering::a_failing_head_holds_only_its_key,
            ordering::a_dead_head_lets_the_next_run_or_holds_its_key,
            ordering::a_purged_dead_head_releases_its_key,
            ordering::retention_of_a_dead_head_releases_its_key,
            ordering::a_cancelled_head_releases_its_key,
            ordering::a_scheduled_keyed_event_takes_its_place_when_due,
            #[cfg(feature = "testing")] ordering::an_emit_on_an_idle_key_leases_its_head,
            ordering::keyed_emits_and_transactions_on_one_row_do_not_deadlock,
            #[cfg(feature = "testing")] ordering::a_failed_claim_of_heads_is_tried_again,
        );
    };
}

/// One test per scenario for one backend, in a module named after it. A scenario may carry
/// attributes: those that use the test kit are `#[cfg(feature = "testing")]`.
macro_rules! backend_tests {
    ($feature:literal, $module:ident, $backend:ty
     $(, extra: $($(#[$extra_meta:meta])* $extra_module:ident :: $extra:ident),*)?;
     $($(#[$meta:meta])* $scenario_module:ident :: $scenario:ident),* $(,)?) => {
        #[cfg(feature = $feature)]
        mod $module {
            $(
                $(#[$meta])*
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario_module::$scenario::<$backend>().await;
                }
            )*
            $($(
                $(#[$extra_meta])*
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $extra() {
                    super::$extra_module::$extra::<$backend>().await;
                }
            )*)?
        }
    };
}

// Backends with row locks also show that a claimer skips the rows another transaction holds,
// and that retention rounds of two instances never overlap (SQLite's rounds wait their turn).
// They also show that a claim of a key's head does not leave a head another transaction
// holds parked.
// PostgreSQL also sends an emit in one round trip, and shows that it stays atomic, and that an
// emit leases its key's heads only under READ COMMITTED.
scenarios!(backend_tests!("postgres", postgres, txbus::Postgres,
    extra: sharing::claims_skip_rows_locked_by_another_transaction, ops::cleanup_rounds_never_overlap,
        pipeline::one_entity_is_one_statement_prepared_once,
        pipeline::entities_with_custom_types_are_written_atomically,
        pipeline::a_write_that_fails_before_it_is_sent_leaves_nothing,
        ordering::a_held_head_is_not_left_parked,
        #[cfg(feature = "testing")] ordering::under_repeatable_read_an_emit_leaves_its_heads_to_a_claim));
scenarios!(backend_tests!("mysql", mysql, txbus::Mysql,
    extra: sharing::claims_skip_rows_locked_by_another_transaction, ops::cleanup_rounds_never_overlap,
        ordering::a_held_head_is_not_left_parked));
scenarios!(backend_tests!("sqlite", sqlite, txbus::Sqlite));
