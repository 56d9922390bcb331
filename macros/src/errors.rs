//! Collects every error of one macro call, to report them all at once.

use proc_macro2::TokenStream;

#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(errors) => errors.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub(crate) fn add_at(&mut self, span: proc_macro2::Span, message: impl std::fmt::Display) {
        self.push(syn::Error::new(span, message));
    }

    pub(crate) fn add(&mut self, span: impl quote::ToTokens, message: impl std::fmt::Display) {
        self.push(syn::Error::new_spanned(span, message));
    }

    /// The errors as `compile_error!`s after `item`, or `Ok` when there is none.
    pub(crate) fn finish(self, item: &TokenStream) -> Result<(), TokenStream> {
        match self.0 {
            None => Ok(()),
            Some(errors) => {
                let errors = errors.to_compile_error();
                Err(quote::quote! { #item #errors })
            }
        }
    }
}
