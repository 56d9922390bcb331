//! Procedural macros of [txbus](https://docs.rs/txbus): `#[derive(Event)]`, `#[derive(Entity)]`
//! and `#[listener]`. Use them through the `txbus` crate, which re-exports them.
//!
//! Each entry point calls a plain `expand` function: parse, validate (collecting every error,
//! each spanned on the offending tokens), then generate. On error the user's item is emitted
//! unchanged beside the `compile_error!`s, so the rest of the crate still type-checks.

use proc_macro::TokenStream;

mod entity;
mod errors;
mod event;
mod listener;

/// Registers an `async fn` as a listener of the event type of its first parameter. See
/// `txbus::listener`.
#[proc_macro_attribute]
pub fn listener(attr: TokenStream, item: TokenStream) -> TokenStream {
    listener::expand(attr.into(), item.into()).into()
}

/// Implements `txbus::Event`. See `txbus::Event`.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    event::expand(input.into()).into()
}

/// Implements `txbus::Entity` for each backend. See `txbus::Entity`.
#[proc_macro_derive(Entity, attributes(entity))]
pub fn derive_entity(input: TokenStream) -> TokenStream {
    entity::expand(input.into()).into()
}
