//! Compile-time tests of txbus's macros, in `tests/ui.rs`: each case under `tests/ui/fail` must
//! fail with the compiler output beside it, each under `tests/ui/pass` must compile. Not
//! published.
