//! `#[derive(Entity)]`: `impl txbus::Entity<B>` for each backend, from diesel's `Insertable`,
//! `AsChangeset` and `Identifiable`. How each backend writes it is txbus's (its store): the
//! derive names the backends and whether the upsert may be kept prepared.

use proc_macro2::{Ident, TokenStream};
use quote::{ToTokens, format_ident, quote};
use syn::DeriveInput;

use crate::errors::Errors;

/// The backends the derive knows: (name in `#[entity(backends(...))]`, marker type).
const BACKENDS: [(&str, &str); 3] = [
    ("postgres", "Postgres"),
    ("mysql", "Mysql"),
    ("sqlite", "Sqlite"),
];

pub(crate) fn expand(input: TokenStream) -> TokenStream {
    let parsed: DeriveInput = match syn::parse2(input) {
        Ok(parsed) => parsed,
        Err(error) => return error.to_compile_error(),
    };
    let mut errors = Errors::default();
    let backends = parse_backends(&parsed, &mut errors);
    if let Err(errors) = errors.finish(&TokenStream::new()) {
        return errors;
    }
    let cached = few_statement_texts(&parsed);
    backends
        .into_iter()
        .map(|(name, marker)| implement(&parsed, name, marker, cached))
        .collect()
}

/// The most `Option` fields an entity may have for its upsert to be kept prepared: each one
/// doubles the SQL texts its upsert can take (a `None` is written as `DEFAULT` and left out of
/// the update), and each text is one prepared statement per connection.
const MAX_CACHED_OPTIONS: usize = 3;

/// Whether the entity's upsert takes few enough SQL texts to be kept prepared: at most
/// [`MAX_CACHED_OPTIONS`] fields whose type is an `Option`, and no embedded struct (whose fields
/// the derive cannot see).
fn few_statement_texts(input: &DeriveInput) -> bool {
    let syn::Data::Struct(data) = &input.data else {
        return false;
    };
    let mut options = 0;
    for field in &data.fields {
        let embedded = field.attrs.iter().any(|attr| {
            attr.path().is_ident("diesel")
                && attr.meta.to_token_stream().to_string().contains("embed")
        });
        if embedded {
            return false;
        }
        if let syn::Type::Path(path) = &field.ty
            && path
                .path
                .segments
                .last()
                .is_some_and(|s| s.ident == "Option")
        {
            options += 1;
        }
    }
    options <= MAX_CACHED_OPTIONS
}

fn parse_backends(input: &DeriveInput, errors: &mut Errors) -> Vec<(&'static str, &'static str)> {
    let mut chosen: Option<Vec<(&'static str, &'static str)>> = None;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("entity")) {
        let result = attr.parse_nested_meta(|meta| {
            if !meta.path.is_ident("backends") {
                return Err(
                    meta.error("unknown argument of `#[entity(...)]`; expected `backends(...)`")
                );
            }
            if chosen.is_some() {
                errors.add(&meta.path, "duplicate `backends` in `#[entity(...)]`");
            }
            let mut list = Vec::new();
            let mut named = 0;
            meta.parse_nested_meta(|backend| {
                named += 1;
                match BACKENDS
                    .iter()
                    .find(|(name, _)| backend.path.is_ident(name))
                {
                    Some(&known) if list.contains(&known) => {
                        errors.add(&backend.path, "backend listed twice")
                    }
                    Some(&known) => list.push(known),
                    None => errors.add(
                        &backend.path,
                        "unknown backend; expected `postgres`, `mysql` or `sqlite`",
                    ),
                }
                Ok(())
            })?;
            if named == 0 {
                errors.add(&meta.path, "`backends(...)` needs at least one backend");
            }
            chosen = Some(list);
            Ok(())
        });
        if let Err(error) = result {
            errors.push(error);
        }
    }
    chosen.unwrap_or_else(|| BACKENDS.to_vec())
}

/// `impl Entity<marker>`, gated on the backend's feature: `persist` and `remove` run the
/// backend's way of writing a derived entity, from the statements that `__txbus_statement!`
/// builds for it (both in txbus's store).
fn implement(input: &DeriveInput, backend: &str, marker: &str, cached: bool) -> TokenStream {
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let gate = format_ident!("__txbus_if_{}", backend);
    let marker: Ident = format_ident!("{}", marker);
    let cached = if cached { quote!(true) } else { quote!(false) };
    quote! {
        ::txbus::#gate! {
            impl #impl_generics ::txbus::Entity<::txbus::#marker> for #ident #ty_generics #where_clause {
                fn persist<'__c>(
                    &'__c self,
                    conn: &'__c mut <::txbus::#marker as ::txbus::Backend>::Connection,
                ) -> ::txbus::BoxFuture<'__c, ::txbus::__private::diesel::QueryResult<()>> {
                    ::txbus::__private::persist::<::txbus::#marker, _>(self, conn)
                }

                fn remove<'__c>(
                    &'__c self,
                    conn: &'__c mut <::txbus::#marker as ::txbus::Backend>::Connection,
                ) -> ::txbus::BoxFuture<'__c, ::txbus::__private::diesel::QueryResult<()>> {
                    ::txbus::__private::remove::<::txbus::#marker, _>(self, conn)
                }

                fn __statement(
                    &self,
                    write: ::txbus::__private::Write,
                ) -> ::core::option::Option<
                    ::txbus::__private::Statement<'_, <::txbus::#marker as ::txbus::Backend>::Db>,
                > {
                    ::txbus::__txbus_statement!(#marker, self, write, #cached)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::expand;
    use quote::quote;

    #[test]
    fn every_backend_by_default() {
        let out = expand(quote! { struct User { id: i64 } }).to_string();
        assert!(out.contains("__txbus_if_postgres"), "{out}");
        assert!(out.contains("__txbus_if_mysql"), "{out}");
        assert!(out.contains("__txbus_if_sqlite"), "{out}");
    }

    #[test]
    fn backends_can_be_restricted() {
        let out =
            expand(quote! { #[entity(backends(postgres))] struct User { id: i64 } }).to_string();
        assert!(out.contains("__txbus_if_postgres"), "{out}");
        assert!(!out.contains("__txbus_if_sqlite"), "{out}");
    }

    #[test]
    fn unknown_backends_are_reported() {
        let out =
            expand(quote! { #[entity(backends(oracle, sqlite, sqlite))] struct User; }).to_string();
        assert!(out.contains("unknown backend"), "{out}");
        assert!(out.contains("backend listed twice"), "{out}");
    }

    #[test]
    fn upserts_with_few_sql_texts_are_kept_prepared() {
        let few = expand(quote! {
            struct User { id: i64, name: Option<String>, age: Option<i32>, bio: Option<String> }
        })
        .to_string();
        // The derive tells `__txbus_statement!` whether to keep the upsert prepared (`CachedUpsert`).
        assert!(few.contains("write , true)"), "{few}");
        assert!(!few.contains("write , false)"), "{few}");
        let many = expand(quote! {
            struct User { id: i64, a: Option<i32>, b: Option<i32>, c: Option<i32>, d: Option<i32> }
        })
        .to_string();
        assert!(many.contains("write , false)"), "{many}");
        assert!(!many.contains("write , true)"), "{many}");
        let embedded = expand(quote! {
            struct User { id: i64, #[diesel(embed)] address: Address }
        })
        .to_string();
        assert!(embedded.contains("write , false)"), "{embedded}");
        assert!(!embedded.contains("write , true)"), "{embedded}");
    }
}
