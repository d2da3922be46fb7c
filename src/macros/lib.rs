//! The `#[rask::task]` attribute. Use it through the `rask` crate, which
//! re-exports it as `rask::task` and documents it there; this crate only
//! writes code that names `::rask`.
//!
//! The attribute leaves the function as written and adds, beside it, one
//! element of `rask`'s link-time list of registrations (a `linkme`
//! distributed slice): a function that adds this one to a `rask::Tasks`,
//! exactly as `rask::tasks![f]` (or `f?`) does. `rask::init` applies every
//! element of the list (`rask`'s `registry` module, rule 5).
#![warn(missing_docs)]

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::{FnArg, GenericParam, ItemFn, ReturnType, Safety, Type};

/// Registers a fn item as a task function for `rask::init`; see `rask::task`.
#[proc_macro_attribute]
pub fn task(
    attr: proc_macro::TokenStream,
    item: proc_macro::TokenStream,
) -> proc_macro::TokenStream {
    match expand(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// How the function is called in `delayed!`, which decides which entry of
/// the registry it fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// `delayed!(f(x))`: the return value is the task's value.
    Plain,
    /// `delayed!(f(x)?)`: the function returns a `Result` and `Err` fails
    /// the task.
    Fallible,
}

/// What the attribute says: `#[rask::task(fallible, cache, version = 3)]`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    /// How it is called; from the return type when not given.
    form: Option<Form>,
    /// Whether its calls are cached by default.
    cache: bool,
    /// A version given by the user, instead of the source hash.
    version: Option<u64>,
}

/// The attribute's expansion: `item` unchanged, then its registration.
fn expand(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let function: ItemFn = syn::parse2(item.clone())?;
    check(&function)?;
    let options = options_from_attr(attr)?;
    let form = match options.form {
        Some(form) => form,
        None if returns_result(&function.sig.output) => Form::Fallible,
        None => Form::Plain,
    };
    let name = &function.sig.ident;
    let register = match form {
        Form::Plain => quote!(register),
        Form::Fallible => quote!(register_fallible),
    };
    let source = source_hash(&function);
    let explicit = match options.version {
        Some(n) => quote!(::core::option::Option::Some(#n)),
        None => quote!(::core::option::Option::None),
    };
    let cache = options.cache;
    // The anonymous `const` keeps the helper names out of the caller's
    // namespace; inside it, `#name` still resolves to the function, which
    // lives in the same module (or block) as the `const`.
    Ok(quote! {
        #item
        const _: () = {
            fn __rask_register(tasks: ::rask::Tasks) -> ::rask::Tasks {
                tasks.#register(#name).__record(#name, #source, #explicit, #cache)
            }
            #[::rask::__private::linkme::distributed_slice(::rask::__private::REGISTRATIONS)]
            #[linkme(crate = ::rask::__private::linkme)]
            static __RASK_TASK: ::rask::__private::Registration =
                ::rask::__private::Registration(__rask_register);
        };
    })
}

/// The function's version for the result cache: a 128-bit FNV-1a hash of
/// its signature and body tokens as written. Comments, doc comments,
/// attributes and layout are not tokens of either, so they do not change
/// it; any other edit does, and so may another compiler (which may print
/// tokens differently: a spurious miss, never a stale hit).
fn source_hash(function: &ItemFn) -> proc_macro2::Literal {
    let sig = &function.sig;
    let block = &function.block;
    let text = quote!(#sig #block).to_string();
    let mut hash: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for byte in text.bytes() {
        hash ^= u128::from(byte);
        hash = hash.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    proc_macro2::Literal::u128_suffixed(hash)
}

/// `#[rask::task]` with any of `fallible` or `plain`, `cache`, and
/// `version = N`, separated by commas.
fn options_from_attr(attr: TokenStream) -> syn::Result<Options> {
    use syn::punctuated::Punctuated;
    const EXPECTED: &str = "expected `#[rask::task]` with any of `fallible` (called as \
                            `delayed!(f(x)?)`) or `plain` (called as `delayed!(f(x))`), `cache`, \
                            `version = N`";
    let mut options = Options::default();
    if attr.is_empty() {
        return Ok(options);
    }
    let metas = syn::parse::Parser::parse2(
        Punctuated::<syn::Meta, syn::Token![,]>::parse_terminated,
        attr,
    )
    .map_err(|e| syn::Error::new(e.span(), EXPECTED))?;
    for meta in metas {
        let unknown = || syn::Error::new_spanned(&meta, format!("unknown option: {EXPECTED}"));
        match &meta {
            syn::Meta::Path(path) => {
                let Some(word) = path.get_ident() else {
                    return Err(unknown());
                };
                match word.to_string().as_str() {
                    "fallible" => options.form = Some(Form::Fallible),
                    "plain" => options.form = Some(Form::Plain),
                    "cache" => options.cache = true,
                    _ => return Err(unknown()),
                }
            }
            syn::Meta::NameValue(nv) if nv.path.is_ident("version") => {
                let syn::Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Int(n),
                    ..
                }) = &nv.value
                else {
                    return Err(syn::Error::new_spanned(
                        &nv.value,
                        "`version` takes a whole number: `#[rask::task(version = 2)]`",
                    ));
                };
                options.version = Some(n.base10_parse::<u64>()?);
            }
            _ => return Err(unknown()),
        }
    }
    Ok(options)
}

/// Refuses what cannot be registered by its name alone, saying what to do.
fn check(function: &ItemFn) -> syn::Result<()> {
    let sig = &function.sig;
    let refuse = |span: Span, why: &str| Err(syn::Error::new(span, why));
    if let Some(token) = &sig.asyncness {
        return refuse(
            token.span,
            "`#[rask::task]` cannot register an `async fn`: a task is a plain function call",
        );
    }
    if let Safety::Unsafe(token) = &sig.safety {
        return refuse(
            token.span,
            "`#[rask::task]` cannot register an `unsafe fn`: wrap the call in a safe function",
        );
    }
    if let Some(FnArg::Receiver(receiver)) = sig.inputs.first() {
        return refuse(
            receiver.self_token.span,
            "`#[rask::task]` registers free functions, not methods: write a fn item that takes \
             the value as an argument",
        );
    }
    let generic = sig
        .generics
        .params
        .iter()
        .find(|p| !matches!(p, GenericParam::Lifetime(_)));
    if let Some(param) = generic {
        return Err(syn::Error::new_spanned(
            param,
            "`#[rask::task]` cannot register a generic function, which is one function per \
             instance: register each instance used, e.g. \
             `rask::init_with(rask::Tasks::new().register(f::<i64>))`",
        ));
    }
    // `impl Trait` in an argument is a generic parameter without a name.
    let anonymous = sig.inputs.iter().find_map(|input| match input {
        FnArg::Typed(typed) => impl_token(quote!(#typed)),
        FnArg::Receiver(_) => None,
    });
    if let Some(span) = anonymous {
        return refuse(
            span,
            "`#[rask::task]` cannot register a function with an `impl Trait` argument, a generic \
             function (one function per instance): take a concrete type, or make the parameter \
             named (`fn f<T: Trait>(x: T)`) and register each instance used, e.g. \
             `rask::init_with(rask::Tasks::new().register(f::<i64>))`",
        );
    }
    Ok(())
}

/// Where the keyword `impl` is, at any depth of `tokens`.
fn impl_token(tokens: TokenStream) -> Option<Span> {
    tokens.into_iter().find_map(|token| match token {
        proc_macro2::TokenTree::Ident(ident) if ident == "impl" => Some(ident.span()),
        proc_macro2::TokenTree::Group(group) => impl_token(group.stream()),
        _ => None,
    })
}

/// Whether the written return type is a `Result` (`Result<T, E>`,
/// `io::Result<T>`, `anyhow::Result<T>`, …): the last path segment is read,
/// since a macro sees no types. An alias by another name needs
/// `#[rask::task(fallible)]`.
fn returns_result(output: &ReturnType) -> bool {
    let ReturnType::Type(_, ty) = output else {
        return false;
    };
    let mut ty = &**ty;
    while let Type::Paren(inner) = ty {
        ty = &inner.elem;
    }
    match ty {
        Type::Path(path) => path
            .path
            .segments
            .last()
            .is_some_and(|segment| segment.ident == "Result"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expanded(attr: TokenStream, item: TokenStream) -> Result<String, String> {
        expand(attr, item)
            .map(|tokens| tokens.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_return_type_picks_the_form() {
        let plain = expanded(
            quote!(),
            quote!(
                fn inc(x: i64) -> i64 {
                    x + 1
                }
            ),
        )
        .unwrap();
        assert!(plain.contains("tasks . register (inc)"), "{plain}");
        assert!(
            plain.starts_with("fn inc"),
            "the function stays first: {plain}"
        );
        for output in [
            quote!(Result<i64, String>),
            quote!(std::io::Result<i64>),
            quote!((anyhow::Result<i64>)),
        ] {
            let item = quote!(fn parse(s: String) -> #output { todo!() });
            let fallible = expanded(quote!(), item).unwrap();
            assert!(
                fallible.contains("tasks . register_fallible (parse)"),
                "{fallible}"
            );
        }
        let unit = expanded(
            quote!(),
            quote!(
                fn touch(path: String) {}
            ),
        )
        .unwrap();
        assert!(unit.contains("tasks . register (touch)"), "{unit}");
    }

    #[test]
    fn the_attribute_overrides_the_return_type() {
        let item = quote!(
            fn parse(s: String) -> Result<i64, String> {
                todo!()
            }
        );
        let plain = expanded(quote!(plain), item).unwrap();
        assert!(plain.contains("tasks . register (parse)"), "{plain}");
        let item = quote!(
            fn parse(s: String) -> Parsed<i64> {
                todo!()
            }
        );
        let fallible = expanded(quote!(fallible), item).unwrap();
        assert!(
            fallible.contains("tasks . register_fallible (parse)"),
            "{fallible}"
        );
        let err = expanded(
            quote!(sometimes),
            quote!(
                fn f() {}
            ),
        )
        .unwrap_err();
        assert!(err.contains("unknown option"), "{err}");
        let err = expanded(
            quote!(fallible = true),
            quote!(
                fn f() {}
            ),
        )
        .unwrap_err();
        assert!(err.contains("expected `#[rask::task]`"), "{err}");
    }

    #[test]
    fn cache_and_version_are_recorded_and_the_body_is_hashed() {
        let item = |body: TokenStream| quote!(fn inc(x: i64) -> i64 { #body });
        let with = |attr: TokenStream, body: TokenStream| expanded(attr, item(body)).unwrap();
        let plain = with(quote!(), quote!(x + 1));
        assert!(plain.contains(". __record (inc ,"), "{plain}");
        assert!(plain.contains(":: None , false)"), "{plain}");
        // Another body, another version; the same body, the same one.
        assert_ne!(plain, with(quote!(), quote!(x + 2)));
        assert_eq!(plain, with(quote!(), quote!(x + 1)));
        let cached = with(quote!(cache, version = 7), quote!(x + 1));
        assert!(cached.contains(":: Some (7u64) , true)"), "{cached}");
        let both = with(quote!(plain, cache), quote!(x + 1));
        assert!(both.contains("tasks . register (inc)") && both.contains("true)"));
        let err = expanded(quote!(version = "x"), item(quote!(x))).unwrap_err();
        assert!(err.contains("whole number"), "{err}");
    }

    #[test]
    fn what_cannot_be_registered_says_what_to_do() {
        let cases = [
            (
                quote!(
                    async fn f() {}
                ),
                "async fn",
            ),
            (
                quote!(
                    unsafe fn f() {}
                ),
                "unsafe fn",
            ),
            (
                quote!(
                    fn f(&self) {}
                ),
                "not methods",
            ),
            (
                quote!(
                    fn f<T>(x: T) {}
                ),
                "register each instance",
            ),
            (
                quote!(
                    fn f<const N: usize>() {}
                ),
                "register each instance",
            ),
            (
                quote!(
                    fn f(x: impl std::fmt::Display) -> String {
                        x.to_string()
                    }
                ),
                "`impl Trait` argument",
            ),
            (
                quote!(
                    fn f(x: Vec<impl Clone>) {}
                ),
                "`impl Trait` argument",
            ),
            (
                quote!(
                    struct S;
                ),
                "expected",
            ),
        ];
        for (item, why) in cases {
            let err = expanded(quote!(), item.clone()).unwrap_err();
            assert!(err.contains(why), "{item}: {err}");
        }
        // Lifetimes alone are not generics over types.
        assert!(expanded(
            quote!(),
            quote!(
                fn f<'a>() {}
            )
        )
        .is_ok());
    }
}
