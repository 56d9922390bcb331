//! Compile-time checks of the macros: misuse gives spanned errors, correct use compiles.
#![allow(missing_docs)]

#[test]
fn macros() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
