//! `#[derive(Event)]`: `impl txbus::Event` with the name from `#[event(name = "...")]` or the
//! type's name, the version and upcasters from `#[event(version = N, upcast(1 => f, ...))]`,
//! and the ordering key from `#[event(ordering_key = field)]` (the field's `to_string()`).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Expr, Fields, Ident, LitInt, LitStr, Path, Token};

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
    check_ordering_key(&parsed, &args, &mut errors);
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
    let ordering_key = args.ordering_key.as_ref().map(|(_, field)| {
        // Spanned at the field named in the attribute, so that a field without `Display` is
        // reported there.
        let key = quote_spanned! {field.span()=>
            ::std::string::ToString::to_string(&self.#field)
        };
        quote! {
            fn ordering_key(&self) -> ::core::option::Option<::std::string::String> {
                ::core::option::Option::Some(#key)
            }
        }
    });
    quote! {
        impl ::txbus::Event for #ident {
            const NAME: &'static str = #name;
            #versioned
            #ordering_key
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
    /// The `ordering_key` argument's path, for spans, and the field it names.
    ordering_key: Option<(Path, Ident)>,
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
            } else if meta.path.is_ident("ordering_key") {
                let value: Expr = meta.value()?.parse()?;
                if args.ordering_key.is_some() {
                    errors.add(&meta.path, "duplicate `ordering_key` in `#[event(...)]`");
                } else {
                    match field_name(&value) {
                        Some(field) => args.ordering_key = Some((meta.path.clone(), field)),
                        None => errors.add(
                            &value,
                            "`ordering_key` expects the name of one of the event's fields, \
                             e.g. `ordering_key = account_id`; for a computed key, implement \
                             `Event::ordering_key` by hand",
                        ),
                    }
                }
                Ok(())
            } else {
                Err(meta.error(
                    "unknown argument of `#[event(...)]`; expected `name = \"...\"`, \
                     `version = N`, `upcast(1 => f, ...)` or `ordering_key = field`",
                ))
            }
        });
        if let Err(error) = result {
            errors.push(error);
        }
    }
    args
}

/// The field named by `ordering_key = field`: a plain identifier.
fn field_name(value: &Expr) -> Option<Ident> {
    match value {
        Expr::Path(path) if path.attrs.is_empty() && path.qself.is_none() => {
            path.path.get_ident().cloned()
        }
        _ => None,
    }
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

/// `ordering_key` names a field of a struct with named fields.
fn check_ordering_key(input: &DeriveInput, args: &Args, errors: &mut Errors) {
    let Some((path, field)) = &args.ordering_key else {
        return;
    };
    let ty = &input.ident;
    let fields = match &input.data {
        Data::Struct(data) => match &data.fields {
            Fields::Named(fields) if !fields.named.is_empty() => &fields.named,
            _ => {
                errors.add(
                    path,
                    format!(
                        "`#[event(ordering_key = ...)]` needs a struct with named fields, and \
                         `{ty}` has none; implement `Event::ordering_key` by hand instead"
                    ),
                );
                return;
            }
        },
        Data::Enum(_) | Data::Union(_) => {
            errors.add(
                path,
                format!(
                    "`#[event(ordering_key = ...)]` needs a struct with named fields, and `{ty}` \
                     is not a struct; implement `Event::ordering_key` by hand instead"
                ),
            );
            return;
        }
    };
    if fields.iter().any(|f| f.ident.as_ref() == Some(field)) {
        return;
    }
    let names: Vec<String> = fields
        .iter()
        .filter_map(|f| f.ident.as_ref())
        .map(|name| format!("`{name}`"))
        .collect();
    errors.add(
        field,
        format!(
            "`#[event(ordering_key = ...)]` names `{field}`, which is not a field of `{ty}`; \
             name one of its fields ({}), whose `to_string()` is the key",
            names.join(", ")
        ),
    );
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

    #[test]
    fn ordering_key_is_implemented() {
        let out = expand(quote! {
            #[event(name = "account.credited", ordering_key = account_id)]
            struct AccountCredited { account_id: i64, cents: i64 }
        })
        .to_string();
        assert!(
            out.contains(
                "fn ordering_key (& self) -> :: core :: option :: Option < :: std :: string :: \
                 String > { :: core :: option :: Option :: Some (:: std :: string :: ToString :: \
                 to_string (& self . account_id)) }"
            ),
            "{out}"
        );
        assert!(!out.contains("compile_error"), "{out}");
        let plain = expand(quote! { struct Plain { id: i64 } }).to_string();
        assert!(!plain.contains("ordering_key"), "{plain}");
    }

    #[test]
    fn bad_ordering_keys_are_reported() {
        let missing = expand(quote! {
            #[event(ordering_key = acount_id)]
            struct AccountCredited { account_id: i64, cents: i64 }
        })
        .to_string();
        assert!(
            missing.contains(
                "names `acount_id`, which is not a field of `AccountCredited`; \
                 name one of its fields (`account_id`, `cents`)"
            ),
            "{missing}"
        );
        let not_ident = expand(quote! {
            #[event(ordering_key = "account_id")]
            struct E { account_id: i64 }
        })
        .to_string();
        assert!(
            not_ident.contains("e.g. `ordering_key = account_id`"),
            "{not_ident}"
        );
        let path = expand(quote! {
            #[event(ordering_key = self.account_id)]
            struct E { account_id: i64 }
        })
        .to_string();
        assert!(path.contains("e.g. `ordering_key = account_id`"), "{path}");
        let on_enum = expand(quote! {
            #[event(ordering_key = id)]
            enum E { A { id: i64 } }
        })
        .to_string();
        assert!(
            on_enum.contains("needs a struct with named fields, and `E` is not a struct"),
            "{on_enum}"
        );
        let on_tuple = expand(quote! {
            #[event(ordering_key = id)]
            struct E(i64);
        })
        .to_string();
        assert!(
            on_tuple.contains("needs a struct with named fields, and `E` has none"),
            "{on_tuple}"
        );
        let twice = expand(quote! {
            #[event(ordering_key = id, name = "e")]
            #[event(ordering_key = id)]
            struct E { id: i64 }
        })
        .to_string();
        assert!(
            twice.contains("duplicate `ordering_key` in `#[event(...)]`"),
            "{twice}"
        );
    }
}
