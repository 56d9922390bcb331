//! `#[derive(Event)]`: `impl txbus::Event` with the name from `#[event(name = "...")]` or the
//! type's name.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{DeriveInput, LitStr};

use crate::errors::Errors;

pub(crate) fn expand(input: TokenStream) -> TokenStream {
    let parsed: DeriveInput = match syn::parse2(input) {
        Ok(parsed) => parsed,
        Err(error) => return error.to_compile_error(),
    };
    let mut errors = Errors::default();
    let name = parse_name(&parsed, &mut errors);
    if !parsed.generics.params.is_empty() {
        errors.add(
            &parsed.generics,
            "`#[derive(Event)]` needs a type without generic parameters, since each event type \
             has one stored name; implement `txbus::Event` by hand for each instance instead",
        );
    }
    if let Err(errors) = errors.finish(&TokenStream::new()) {
        return errors;
    }
    let ident = &parsed.ident;
    let name = name.unwrap_or_else(|| LitStr::new(&ident.to_string(), ident.span()));
    quote! {
        impl ::txbus::Event for #ident {
            const NAME: &'static str = #name;
        }
    }
}

fn parse_name(input: &DeriveInput, errors: &mut Errors) -> Option<LitStr> {
    let mut name: Option<LitStr> = None;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("event")) {
        let result = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                let value: LitStr = meta.value()?.parse()?;
                if name.is_some() {
                    errors.add(&meta.path, "duplicate `name` in `#[event(...)]`");
                } else if value.value().trim().is_empty() {
                    errors.add(&value, "an event name cannot be empty");
                } else {
                    name = Some(value);
                }
                Ok(())
            } else {
                Err(meta.error("unknown argument of `#[event(...)]`; expected `name = \"...\"`"))
            }
        });
        if let Err(error) = result {
            errors.push(error);
        }
    }
    name
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
