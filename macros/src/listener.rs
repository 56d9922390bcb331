//! `#[listener]`: keeps the function as written and registers it in txbus's listener slice.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, FnArg, ItemFn, Lit, LitStr, Meta, ReturnType, Token, Type};

use crate::errors::Errors;

/// What the attribute's arguments say.
#[derive(Default)]
struct Args {
    name: Option<LitStr>,
    aliases: Option<Vec<LitStr>>,
    transactional: bool,
}

/// What the function's signature says.
struct Signature<'a> {
    event: &'a Type,
    takes_context: bool,
    /// For a transactional listener, the connection type its last parameter borrows.
    connection: Option<&'a Type>,
}

pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let args = parse_args(attr, &mut errors);
    let function: ItemFn = match syn::parse2(item.clone()) {
        Ok(function) => function,
        Err(_) => {
            errors.add(
                &item,
                "`#[txbus::listener]` goes on an `async fn` whose first parameter is the event",
            );
            return errors.finish(&item).err().unwrap_or_default();
        }
    };
    let signature = check_signature(&function, args.transactional, &mut errors);
    if let Err(output) = errors.finish(&item) {
        return output;
    }
    match signature {
        Some(signature) => generate(&function, &args, &signature),
        None => item,
    }
}

fn parse_args(attr: TokenStream, errors: &mut Errors) -> Args {
    let mut args = Args::default();
    let metas = match Punctuated::<Meta, Token![,]>::parse_terminated.parse2(attr) {
        Ok(metas) => metas,
        Err(error) => {
            errors.push(error);
            return args;
        }
    };
    for meta in metas {
        match &meta {
            Meta::NameValue(nv) if nv.path.is_ident("name") => {
                let Expr::Lit(ExprLit {
                    lit: Lit::Str(value),
                    ..
                }) = &nv.value
                else {
                    errors.add(
                        &nv.value,
                        "`name` takes a string: `name = \"billing.send_invoice\"`",
                    );
                    continue;
                };
                if args.name.is_some() {
                    errors.add(&nv.path, "duplicate argument `name`");
                } else if value.value().trim().is_empty() {
                    errors.add(value, "a listener name cannot be empty");
                } else {
                    args.name = Some(value.clone());
                }
            }
            Meta::NameValue(nv) if nv.path.is_ident("aliases") => {
                if args.aliases.is_some() {
                    errors.add(&nv.path, "duplicate argument `aliases`");
                    continue;
                }
                args.aliases = Some(parse_aliases(&nv.value, errors));
            }
            Meta::Path(path) if path.is_ident("transactional") => {
                if args.transactional {
                    errors.add(path, "duplicate argument `transactional`");
                }
                args.transactional = true;
            }
            other => errors.add(
                other,
                "unknown argument of `#[txbus::listener]`; expected `name = \"...\"`, \
                 `aliases = [\"...\"]` or `transactional`",
            ),
        }
    }
    if let (Some(aliases), Some(name)) = (&args.aliases, &args.name) {
        for alias in aliases.iter().filter(|a| a.value() == name.value()) {
            errors.add(alias, "an alias cannot be the listener's own name");
        }
    }
    args
}

/// `["old::path::fn", "old.name"]`: former ids, each a non-empty string, none twice.
fn parse_aliases(value: &Expr, errors: &mut Errors) -> Vec<LitStr> {
    let Expr::Array(array) = value else {
        errors.add(
            value,
            "`aliases` takes a list of former ids: `aliases = [\"billing::send_invoice\"]`",
        );
        return Vec::new();
    };
    let mut aliases: Vec<LitStr> = Vec::new();
    for element in &array.elems {
        let Expr::Lit(ExprLit {
            lit: Lit::Str(alias),
            ..
        }) = element
        else {
            errors.add(element, "an alias is a string: the listener's former id");
            continue;
        };
        if alias.value().trim().is_empty() {
            errors.add(alias, "an alias cannot be empty");
        } else if aliases.iter().any(|a| a.value() == alias.value()) {
            errors.add(alias, "duplicate alias");
        } else {
            aliases.push(alias.clone());
        }
    }
    aliases
}

fn check_signature<'a>(
    function: &'a ItemFn,
    transactional: bool,
    errors: &mut Errors,
) -> Option<Signature<'a>> {
    let sig = &function.sig;
    if sig.asyncness.is_none() {
        errors.add(sig.fn_token, "a listener must be an `async fn`");
    }
    if let Some(constness) = &sig.constness {
        errors.add(constness, "a listener cannot be `const`");
    }
    if let Some(unsafety) = &sig.unsafety {
        errors.add(unsafety, "a listener cannot be `unsafe`");
    }
    if let Some(abi) = &sig.abi {
        errors.add(abi, "a listener cannot have an ABI");
    }
    if let Some(variadic) = &sig.variadic {
        errors.add(variadic, "a listener cannot be variadic");
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.add(
            &sig.generics,
            "a listener cannot be generic: its event type must be known when it is registered",
        );
    }
    if let ReturnType::Default = sig.output {
        errors.add_at(
            sig.paren_token.span.join(),
            "a listener returns `Result<(), E>`, with `E` convertible into `txbus::ListenerError`",
        );
    }
    let mut inputs = sig.inputs.iter();
    let event = match inputs.next() {
        None => {
            errors.add_at(
                sig.paren_token.span.join(),
                "a listener takes the event as its first parameter, e.g. \
                 `async fn on_user_created(event: UserCreated)`",
            );
            None
        }
        Some(FnArg::Receiver(receiver)) => {
            errors.add(
                receiver,
                "a listener is a free function; it cannot take `self`",
            );
            None
        }
        Some(FnArg::Typed(arg)) => match &*arg.ty {
            Type::Reference(reference) => {
                errors.add(
                    reference,
                    "a listener takes the event by value, not by reference",
                );
                None
            }
            Type::ImplTrait(bound) => {
                errors.add(bound, "a listener cannot be generic: name the event type");
                None
            }
            ty => Some(ty),
        },
    };
    let mut rest: Vec<&FnArg> = inputs.collect();
    let connection = if transactional {
        match rest.pop() {
            Some(FnArg::Typed(arg)) => match &*arg.ty {
                Type::Reference(reference)
                    if reference.mutability.is_some() && reference.lifetime.is_none() =>
                {
                    Some(&*reference.elem)
                }
                _ => {
                    errors.add(
                        &arg.ty,
                        "the last parameter of a transactional listener is the transaction's connection, \
                         e.g. `conn: &mut AsyncPgConnection`",
                    );
                    None
                }
            },
            _ => {
                errors.add_at(
                    sig.paren_token.span.join(),
                    "a transactional listener takes the transaction's connection as its last parameter, \
                     e.g. `async fn f(event: E, ctx: txbus::Context, conn: &mut AsyncPgConnection)`",
                );
                None
            }
        }
    } else {
        None
    };
    let mut rest = rest.into_iter();
    let takes_context = match rest.next() {
        None => false,
        Some(FnArg::Typed(arg)) if is_context(&arg.ty) => true,
        Some(other) => {
            errors.add(
                other,
                "the second parameter of a listener is `ctx: txbus::Context`",
            );
            false
        }
    };
    for extra in rest {
        errors.add(
            extra,
            if transactional {
                "a transactional listener takes the event, `ctx: txbus::Context` and the connection"
            } else {
                "a listener takes at most two parameters: the event and `ctx: txbus::Context`"
            },
        );
    }
    if transactional && connection.is_none() {
        return None;
    }
    Some(Signature {
        event: event?,
        takes_context,
        connection,
    })
}

fn is_context(ty: &Type) -> bool {
    matches!(ty, Type::Path(path) if path.qself.is_none()
        && path.path.segments.last().is_some_and(|s| s.ident == "Context" && s.arguments.is_empty()))
}

fn generate(function: &ItemFn, args: &Args, signature: &Signature<'_>) -> TokenStream {
    let ident = &function.sig.ident;
    let event = signature.event;
    let aliases = args.aliases.iter().flatten();
    let id = match &args.name {
        Some(name) => quote!(#name),
        None => {
            let name = LitStr::new(&ident.to_string(), ident.span());
            quote!(::core::concat!(::core::module_path!(), "::", #name))
        }
    };
    // Spanned on the function, so that a listener whose future is not `Send` or whose error
    // does not convert is reported there.
    let span = function.sig.span();
    let line = quote_spanned!(ident.span()=> ::core::line!());
    let call_fn = format_ident!("__txbus_call_{}", ident, span = Span::call_site());
    let (kind, call_item) = match signature.connection {
        None => {
            let listener = if signature.takes_context {
                quote_spanned!(span=> #ident)
            } else {
                quote_spanned!(span=> |event, _: ::txbus::Context| #ident(event))
            };
            let call = quote_spanned!(span=>
                ::txbus::__private::call::<#event, _, _, _>(payload, ctx, #listener)
            );
            (
                quote!(::txbus::__private::ListenerKind::Plain(#call_fn)),
                quote! {
                    fn #call_fn(
                        payload: &::core::primitive::str,
                        ctx: ::txbus::Context,
                    ) -> ::txbus::__private::ListenerCall {
                        #call
                    }
                },
            )
        }
        Some(connection) => {
            let listener = if signature.takes_context {
                quote_spanned!(span=> #ident)
            } else {
                quote_spanned!(span=> |event, _: ::txbus::Context, conn| #ident(event, conn))
            };
            let call = quote_spanned!(span=>
                ::txbus::__private::call_tx::<#event, #connection, _, _, _>(payload, ctx, conn, #listener)
            );
            (
                quote! {
                    ::txbus::__private::ListenerKind::Transactional(::txbus::__private::TxListener {
                        connection: ::core::any::TypeId::of::<#connection>,
                        connection_name: ::core::any::type_name::<#connection>,
                        call: #call_fn,
                    })
                },
                quote! {
                    fn #call_fn<'c>(
                        payload: &::core::primitive::str,
                        ctx: ::txbus::Context,
                        conn: &'c mut (dyn ::core::any::Any + ::core::marker::Send),
                    ) -> ::txbus::__private::TxCall<'c> {
                        #call
                    }
                },
            )
        }
    };
    quote! {
        #function

        #[doc(hidden)]
        const _: () = {
            #[::txbus::__private::linkme::distributed_slice(::txbus::__private::LISTENERS)]
            #[linkme(crate = ::txbus::__private::linkme)]
            static LISTENER: ::txbus::__private::ListenerDef = ::txbus::__private::ListenerDef {
                id: #id,
                aliases: &[#(#aliases),*],
                event: <#event as ::txbus::Event>::NAME,
                event_type: ::core::any::type_name::<#event>,
                version: <#event as ::txbus::Event>::VERSION,
                kind: #kind,
                file: ::core::file!(),
                line: #line,
            };

            #call_item
        };
    }
}

#[cfg(test)]
mod tests {
    use super::expand;
    use quote::quote;

    fn errors_of(attr: proc_macro2::TokenStream, item: proc_macro2::TokenStream) -> String {
        expand(attr, item).to_string()
    }

    #[test]
    fn a_valid_listener_is_kept_and_registered() {
        let out = errors_of(
            quote!(),
            quote! {
                async fn on_user(event: UserCreated, ctx: txbus::Context) -> Result<(), MyError> { Ok(()) }
            },
        );
        assert!(out.contains("async fn on_user"), "{out}");
        assert!(out.contains("distributed_slice"), "{out}");
        assert!(out.contains("module_path"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn an_explicit_name_is_the_id() {
        let out = errors_of(
            quote!(name = "audit"),
            quote! {
                async fn audit(event: UserCreated) -> anyhow::Result<()> { Ok(()) }
            },
        );
        assert!(out.contains("id : \"audit\""), "{out}");
    }

    #[test]
    fn aliases_are_registered() {
        let out = errors_of(
            quote!(
                name = "billing.charge",
                aliases = ["billing::charge_card", "charge"]
            ),
            quote! {
                async fn charge(event: InvoiceDue) -> anyhow::Result<()> { Ok(()) }
            },
        );
        assert!(
            out.contains("aliases : & [\"billing::charge_card\" , \"charge\"]"),
            "{out}"
        );
        let plain = errors_of(quote!(), quote! { async fn f(event: E) -> R { Ok(()) } });
        assert!(plain.contains("aliases : & []"), "{plain}");
    }

    #[test]
    fn bad_aliases_are_reported() {
        let out = errors_of(
            quote!(name = "a", aliases = ["x", "x", "", 3, "a"]),
            quote! { async fn f(event: E) -> R { Ok(()) } },
        );
        for expected in [
            "duplicate alias",
            "an alias cannot be empty",
            "an alias is a string",
            "an alias cannot be the listener's own name",
        ] {
            assert!(out.contains(expected), "missing {expected:?} in {out}");
        }
        let out = errors_of(
            quote!(aliases = "x"),
            quote! { async fn f(event: E) -> R { Ok(()) } },
        );
        assert!(out.contains("takes a list of former ids"), "{out}");
    }

    #[test]
    fn every_mistake_is_reported() {
        let out = errors_of(
            quote!(name = "a", name = "b", retries = 3),
            quote! {
                fn bad<T>(self, a: &E, b: u32, c: u8) {}
            },
        );
        for expected in [
            "duplicate argument `name`",
            "unknown argument",
            "must be an `async fn`",
            "cannot be generic",
            "returns `Result<(), E>`",
            "cannot take `self`",
            "second parameter of a listener",
            "at most two parameters",
        ] {
            assert!(out.contains(expected), "missing {expected:?} in {out}");
        }
    }

    #[test]
    fn a_missing_event_is_reported() {
        let out = errors_of(
            quote!(),
            quote!(
                async fn f() -> Result<(), E> {
                    Ok(())
                }
            ),
        );
        assert!(
            out.contains("takes the event as its first parameter"),
            "{out}"
        );
    }
}
