//! `#[derive(Event)]`: `impl txbus::Event` with the name from `#[event(name = "...")]` or the
//! type's name, and the version and upcasters from `#[event(version = N, upcast(1 => f, ...))]`.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{DeriveInput, Expr, LitInt, LitStr, Token};

use crate::errors::Errors;

pub(crate) fn expand(input: TokenStream) -> TokenStream {
    let parsed: DeriveInput = match syn::parse2(input) {
        Ok(parsed) => parsed,
        Err(error) => return error.to_compile_error(),
    };
    let mut errors = Errors::default();
    let args = parse_args(&parsed, &mut errors);
    if !parsed.generics.params.is_empty() {
        errors.add(
            &parsed.generics,
            "`#[derive(Event)]` needs a type without generic parameters, since each event type \
             has one stored name; implement `txbus::Event` by hand for each instance instead",
        );
    }
    check_chain(&args, &mut errors);
    if let Err(errors) = errors.finish(&TokenStream::new()) {
        return errors;
    }
    let ident = &parsed.ident;
    let name = args
        .name
        .unwrap_or_else(|| LitStr::new(&ident.to_string(), ident.span()));
    let versioned = args.version.as_ref().map(|(_, literal)| {
        // Spanned at the upcaster, so that a wrong type is reported there.
        let steps = args.upcasts.iter().map(|(from, (_, f))| {
            quote_spanned! {f.span()=>
                #from => {
                    let upcaster: fn(
                        ::txbus::__private::serde_json::Value,
                    ) -> ::core::result::Result<
                        ::txbus::__private::serde_json::Value,
                        ::txbus::UpcastError,
                    > = #f;
                    upcaster(payload)
                }
            }
        });
        quote! {
            const VERSION: u32 = #literal;

            fn upcast(
                version: u32,
                payload: ::txbus::__private::serde_json::Value,
            ) -> ::core::result::Result<::txbus::__private::serde_json::Value, ::txbus::UpcastError> {
                match version {
                    #(#steps)*
                    _ => ::core::result::Result::Err(::txbus::UpcastError::new(::std::format!(
                        "`{}` has no upcaster from version {}",
                        #name,
                        version
                    ))),
                }
            }
        }
    });
    quote! {
        impl ::txbus::Event for #ident {
            const NAME: &'static str = #name;
            #versioned
        }
    }
}

/// What `#[event(...)]` says.
#[derive(Default)]
struct Args {
    name: Option<LitStr>,
    /// The version and its literal, for spans.
    version: Option<(u32, LitInt)>,
    /// Each step's version, with its literal and the upcaster.
    upcasts: BTreeMap<u32, (LitInt, Expr)>,
}

fn parse_args(input: &DeriveInput, errors: &mut Errors) -> Args {
    let mut args = Args::default();
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("event")) {
        let result = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                let value: LitStr = meta.value()?.parse()?;
                if args.name.is_some() {
                    errors.add(&meta.path, "duplicate `name` in `#[event(...)]`");
                } else if value.value().trim().is_empty() {
                    errors.add(&value, "an event name cannot be empty");
                } else {
                    args.name = Some(value);
                }
                Ok(())
            } else if meta.path.is_ident("version") {
                let value: LitInt = meta.value()?.parse()?;
                let version: u32 = value.base10_parse()?;
                if args.version.is_some() {
                    errors.add(&meta.path, "duplicate `version` in `#[event(...)]`");
                } else if version == 0 {
                    errors.add(&value, "event versions start at 1");
                } else {
                    args.version = Some((version, value));
                }
                Ok(())
            } else if meta.path.is_ident("upcast") {
                let content;
                syn::parenthesized!(content in meta.input);
                let steps = content.parse_terminated(parse_step, Token![,])?;
                for (from, step, upcaster) in steps {
                    match args.upcasts.entry(from) {
                        Entry::Occupied(_) => {
                            errors.add(&step, format!("a second upcaster from version {from}"));
                        }
                        Entry::Vacant(slot) => {
                            slot.insert((step, upcaster));
                        }
                    }
                }
                Ok(())
            } else {
                Err(meta.error(
                    "unknown argument of `#[event(...)]`; expected `name = \"...\"`, \
                     `version = N` or `upcast(1 => f, ...)`",
                ))
            }
        });
        if let Err(error) = result {
            errors.push(error);
        }
    }
    args
}

/// One `N => upcaster` of `upcast(...)`.
fn parse_step(input: syn::parse::ParseStream<'_>) -> syn::Result<(u32, LitInt, Expr)> {
    let step: LitInt = input.parse()?;
    let from: u32 = step.base10_parse()?;
    input.parse::<Token![=>]>()?;
    let upcaster: Expr = input.parse()?;
    Ok((from, step, upcaster))
}

/// Every version below the current one needs its step, and no step may start at or above it.
fn check_chain(args: &Args, errors: &mut Errors) {
    let Some((version, literal)) = &args.version else {
        if let Some((_, (step, _))) = args.upcasts.iter().next() {
            errors.add(
                step,
                "an upcaster needs the event's `version = N` (the version it upcasts to, in the end)",
            );
        }
        return;
    };
    for (from, (step, _)) in &args.upcasts {
        if from >= version {
            errors.add(
                step,
                format!(
                    "an upcaster from version {from} is at or above the event's version {version}; \
                     steps go from each older version to the next"
                ),
            );
        } else if *from == 0 {
            errors.add(step, "event versions start at 1");
        }
    }
    let missing: Vec<String> = (1..*version)
        .filter(|from| !args.upcasts.contains_key(from))
        .map(|from| format!("{from} => ..."))
        .collect();
    if !missing.is_empty() {
        errors.add(
            literal,
            format!(
                "version {version} needs an upcaster from every older version; missing: {}",
                missing.join(", ")
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::expand;
    use quote::quote;

    #[test]
    fn default_name_is_the_type_name() {
        let out = expand(quote! { struct UserCreated { id: i64 } }).to_string();
        assert!(
            out.contains("const NAME : & 'static str = \"UserCreated\""),
            "{out}"
        );
    }

    #[test]
    fn explicit_name_wins() {
        let out =
            expand(quote! { #[event(name = "user.created")] struct UserCreated; }).to_string();
        assert!(out.contains("\"user.created\""), "{out}");
    }

    #[test]
    fn versions_and_upcasters_are_implemented() {
        let out = expand(quote! {
            #[event(name = "order.placed", version = 3, upcast(1 => v1_to_v2, 2 => |v| Ok(v)))]
            struct OrderPlaced { id: i64 }
        })
        .to_string();
        assert!(out.contains("const VERSION : u32 = 3"), "{out}");
        assert!(out.contains("= v1_to_v2 ;"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn broken_chains_are_reported() {
        let missing = expand(quote! {
            #[event(version = 3, upcast(1 => f))]
            struct E;
        })
        .to_string();
        assert!(missing.contains("missing: 2 => ..."), "{missing}");
        let above = expand(quote! {
            #[event(version = 2, upcast(1 => f, 2 => g))]
            struct E;
        })
        .to_string();
        assert!(
            above.contains("at or above the event's version 2"),
            "{above}"
        );
        let zero = expand(quote! { #[event(version = 0)] struct E; }).to_string();
        assert!(zero.contains("event versions start at 1"), "{zero}");
    }

    #[test]
    fn bad_arguments_are_all_reported() {
        let out = expand(quote! {
            #[event(name = "", other = 1)]
            struct E<T>(T);
        })
        .to_string();
        assert!(out.contains("an event name cannot be empty"), "{out}");
        assert!(out.contains("without generic parameters"), "{out}");
    }
}
