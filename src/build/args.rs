//! How the arguments of `delayed!(f(a, b, ...))` become task inputs.
//!
//! Each argument converts, through [`IntoArg<A, K>`] (where `A` is the type
//! of the function's parameter and `K` how the argument is passed, which
//! the compiler infers), into a *slot* stored in the task: a literal kept by
//! value, or a structure of references to input tasks. The slot also feeds
//! the task key: a literal's bytes, or its inputs' keys and the structure's
//! shape.
//!
//! | argument | parameter | how it is passed |
//! |---|---|---|
//! | `x: T` (plain value) | `T` | literal, hashed into the key |
//! | `Delayed<T>`, `&Delayed<T>`, `Future<T>`, `&Future<T>` | `T` | the task's result (moved if last use, else cloned) |
//! | the same | `Arc<T>` | the task's result, shared without a copy |
//! | `Vec<X>`, `&[X]`, `[X; N]` | `Vec<A>` (`[A; N]` for arrays) | each element converted, in order |
//! | `Option<X>` | `Option<A>` | the element converted, or `None` |
//! | `BTreeMap<K, X>`, `HashMap<K, X>` | the same map of `A` | each value converted; keys are literals |
//! | `(X1, X2, ...)` (up to 6) | `(A1, A2, ...)` | each element converted |
//! | [`Untraversed<T>`] | `T` | the value as is, even if it holds `Delayed`s or futures (each future also an input) |
//!
//! In the rows with `X`, each `X` is itself any argument of the rows above
//! except a plain value or `Untraversed` (a [`Traverse`] type): structures
//! nest to any depth, `vec![vec![a, b], vec![c]]` or
//! `BTreeMap<String, Option<Delayed<T>>>`, as Dask traverses lists and
//! dicts. A plain value inside a structure is wrapped with
//! [`value`](crate::value).
//!
//! Rules:
//!
//! 1. A structure's inputs are the `Delayed`s it holds in traversal order
//!    (elements in order, map entries in key order: a `BTreeMap`'s order, a
//!    `HashMap`'s sorted by the keys' encoding), and its slot reads them
//!    back in that order.
//! 2. The key hashes the shape along with the inputs' keys: a list's
//!    length, whether an option is `Some`, a map's length and every map
//!    key. Read in the parameter's type, these bytes decode to exactly one
//!    structure, so two different structures never share a key, and equal
//!    structures (a `Vec` or an array of the same inputs) always do.
//! 3. On the wire a structure travels as a template of its value's postcard
//!    encoding (`registry.rs`, rule 2): bytes for the shape, holes for the
//!    inputs. A worker fills the holes with its inputs' bytes and decodes
//!    the result as the parameter's type, so it needs no type of its own
//!    for the structure.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;

use rask_executor::{OpError, Value, WireError, WireTask};

use crate::build::data::Data;
use crate::build::delayed::Delayed;
use crate::build::key::KeyHasher;
use crate::build::node::{
    Broken, Call, Code, Deps, Function, Inputs, Label, Mark, Node, Returns, Typed,
};
use crate::build::registry::{Payload, Piece, WireArg};

/// Converts a `delayed!` argument into an input of a parameter of type `A`.
///
/// `K` says how (a literal, a traversed structure, or an [`Untraversed`]
/// value); it is inferred and never written. Implemented for plain values,
/// `Delayed`s, futures and structures of them (see the [module
/// table](crate#arguments)); not meant to be implemented outside rask.
///
/// An argument that does not fit its parameter is a compile error naming
/// both types:
///
/// ```compile_fail
/// fn inc(x: i64) -> i64 { x + 1 }
/// let x = rask::delayed!(inc("one".to_string())); // `String` where `i64` is taken
/// ```
///
/// A function taking a reference cannot be a task: its parameters are
/// owned values, since the task runs later, maybe in another process. The
/// compiler says "implementation of `Deserialize` is not general enough";
/// the fix is to take `String` instead of `&str` (`Vec<T>` instead of
/// `&[T]`, `T` or `Arc<T>` instead of `&T`):
///
/// ```compile_fail
/// fn len(s: &str) -> usize { s.len() }
/// let n = rask::delayed!(len("abc")); // take `s: String`
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be passed where the task function takes `{A}`",
    label = "this argument does not fit its parameter",
    note = "an argument is a plain `{A}`, a `Delayed<{A}>` or `Future<{A}>` (by value or by `&`), \
            or a `Vec`, slice, array, `Option`, map or tuple of those",
    note = "a plain value inside a structure is wrapped with `rask::value(x)`"
)]
pub trait IntoArg<A, K> {
    #[doc(hidden)]
    type Slot: Slot<A>;
    #[doc(hidden)]
    fn into_arg(self, args: &mut Args) -> Self::Slot;
    /// Whether an argument of this kind is a plain value, never a graph of
    /// its own (so whether its call can travel to a cluster depends on the
    /// function alone).
    #[doc(hidden)]
    const PLAIN: bool = false;
}

/// How an argument is passed: the `K` of [`IntoArg<A, K>`], inferred.
pub mod mode {
    /// A plain value, kept and hashed as is.
    #[derive(Debug)]
    pub enum Literal {}
    /// A structure holding `Delayed`s or futures ([`Traverse`](crate::Traverse)).
    #[derive(Debug)]
    pub enum Traversed {}
    /// An [`Untraversed`](crate::Untraversed) value.
    #[derive(Debug)]
    pub enum Opaque {}
}

/// A `Delayed`, a future, or a structure of them that `delayed!` looks
/// into, producing a parameter of type `A` (see the [argument
/// table](crate#arguments)).
///
/// Implemented for `Delayed<T>` and `Future<T>` (as `T` or `Arc<T>`), and
/// for `Vec`, slices, arrays, `Option`, `BTreeMap`, `HashMap` and tuples of
/// up to 6 elements whose elements are themselves `Traverse`, to any depth;
/// references to any of these too. Not meant to be implemented outside
/// rask.
///
/// # Examples
///
/// ```
/// use std::collections::BTreeMap;
/// use rask::{delayed, value};
///
/// fn total(groups: Vec<Vec<i64>>) -> i64 { groups.iter().flatten().sum() }
/// fn pick(m: BTreeMap<String, Option<i64>>) -> i64 { m.values().flatten().sum() }
///
/// let (a, b, c) = (value(1), value(2), value(3));
/// assert_eq!(delayed!(total(vec![vec![&a, &b], vec![&c]])).compute()?, 6);
///
/// let m = BTreeMap::from([("x".to_string(), Some(&a)), ("y".to_string(), None)]);
/// assert_eq!(delayed!(pick(m)).compute()?, 1);
/// # Ok::<(), rask::Error>(())
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be passed where the task function takes `{A}`",
    label = "this argument does not fit its parameter",
    note = "an argument is a plain `{A}`, a `Delayed<{A}>` or `Future<{A}>` (by value or by `&`), \
            or a `Vec`, slice, array, `Option`, map or tuple of those",
    note = "a plain value inside a structure is wrapped with `rask::value(x)`"
)]
pub trait Traverse<A> {
    #[doc(hidden)]
    type Slot: Slot<A>;
    #[doc(hidden)]
    fn traverse(&self, args: &mut Args) -> Self::Slot;
}

/// The stored form of one argument; produces the parameter value at run time.
#[doc(hidden)]
pub trait Slot<A>: Send + Sync + 'static {
    fn extract(&self, inputs: &mut Inputs<'_>) -> Result<A, OpError>;

    /// This slot's part of a template (module rule 3).
    fn template(&self, out: &mut Template) -> Result<(), WireError>;

    /// The slot as it travels to another process, as a whole parameter.
    fn wire(&self) -> Result<WireArg, WireError> {
        let mut template = Template::default();
        self.template(&mut template)?;
        Ok(WireArg::Nested(template.0))
    }

    /// Adds the shapes of the literal values this slot holds, for a cached
    /// task's address (`cache.rs`); an input adds none (its address
    /// counts).
    fn literals(&self, _: &mut Shapes) {}
}

/// The serde shapes ([`shape`](crate::build::data::shape)) of the types of
/// a task's literal arguments, each type once, in the order first met:
/// the bytes of a literal are in its task's key, its type's layout is not.
#[doc(hidden)]
pub struct Shapes {
    hasher: blake3::Hasher,
    seen: std::collections::HashSet<std::any::TypeId>,
    /// The first type that could not be traced.
    untraced: Option<&'static str>,
}

impl Shapes {
    pub(crate) fn new() -> Shapes {
        Shapes {
            hasher: blake3::Hasher::new_derive_key("rask literal shapes v1"),
            seen: Default::default(),
            untraced: None,
        }
    }

    pub(crate) fn add<T: Data>(&mut self) {
        if !self.seen.insert(std::any::TypeId::of::<T>()) {
            return;
        }
        match crate::build::data::shape::<T>() {
            Some(shape) => {
                self.hasher.update(&shape);
            }
            None => {
                self.untraced.get_or_insert(std::any::type_name::<T>());
            }
        }
    }

    /// The shapes' hash, when there were literals; `Err` with the name of
    /// a type that cannot be traced.
    pub(crate) fn finish(&self) -> Result<Option<[u8; 32]>, &'static str> {
        match (self.untraced, self.seen.is_empty()) {
            (Some(type_name), _) => Err(type_name),
            (None, true) => Ok(None),
            (None, false) => Ok(Some(*self.hasher.finalize().as_bytes())),
        }
    }
}

/// The postcard encoding of a parameter with holes for its inputs (module
/// rule 3).
#[doc(hidden)]
#[derive(Default)]
pub struct Template(Vec<Piece>);

impl Template {
    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        if let Some(Piece::Bytes(last)) = self.0.last_mut() {
            last.extend_from_slice(bytes);
        } else {
            self.0.push(Piece::Bytes(bytes.to_vec()));
        }
    }

    /// A postcard length (a varint), as sequences and maps start.
    fn length(&mut self, n: usize) -> Result<(), WireError> {
        let bytes = postcard::to_stdvec(&(n as u64)).map_err(|e| WireError::Encode {
            what: "a length".into(),
            reason: e.to_string(),
        })?;
        self.bytes(&bytes);
        Ok(())
    }

    pub(crate) fn input(&mut self) -> Result<(), WireError> {
        if let Some(Piece::Inputs(n)) = self.0.last_mut() {
            *n = n.checked_add(1).ok_or_else(|| WireError::NotSerializable {
                what: "a structure of more than 2^32 - 1 task inputs".into(),
            })?;
        } else {
            self.0.push(Piece::Inputs(1));
        }
        Ok(())
    }
}

/// Collects a task's inputs and key while its arguments are converted.
#[doc(hidden)]
pub struct Args {
    hasher: KeyHasher,
    /// The inputs while there are at most two (`Deps::push`)…
    deps: Deps,
    /// …and all of them past that.
    more: Vec<Arc<Node>>,
    error: Option<String>,
    position: usize,
    /// The node's estimate of the tasks its graph lowers to, so far
    /// ([`Mark`] rule 3): its inputs' estimates, an input that something
    /// else holds too counting 1 (the rest of its graph counts where the
    /// others hold it; so the estimate stays within the graph's nodes and
    /// edges however much of it is shared).
    tasks: u32,
}

impl Args {
    /// The arguments of a call of `F` named `name`, its `Result` unwrapped
    /// if `fallible` (see `KeyHasher::call`).
    pub(crate) fn call<F: 'static>(name: &'static str, fallible: bool) -> Self {
        Args {
            hasher: KeyHasher::call::<F>(name, fallible),
            deps: Deps::None,
            more: Vec::new(),
            error: None,
            position: 0,
            tasks: 1,
        }
    }

    fn next_position(&mut self) {
        self.position += 1;
    }

    pub(crate) fn input(&mut self, node: &Arc<Node>) {
        self.hasher.input(&node.key);
        let tasks = match Arc::strong_count(node) {
            1 => node.mark.estimate(),
            _ => 1,
        };
        self.tasks = self.tasks.saturating_add(tasks);
        self.deps.push(node.clone(), &mut self.more);
    }

    fn fail(&mut self, what: impl FnOnce() -> String) {
        if self.error.is_none() {
            self.error = Some(format!("argument {} {}", self.position, what()));
        }
    }

    /// Mixes in a literal argument (`KeyHasher::literal_value`), or records
    /// why it could not be.
    fn literal_value<T: serde::Serialize + 'static>(&mut self, value: &T) {
        if let Err(e) = self.hasher.literal_value(value) {
            // A future's message (`travel.rs` rule 6) is kept aside too:
            // taken, so that it is not met again.
            let e = crate::build::travel::why().unwrap_or_else(|| e.to_string());
            self.fail(|| {
                format!(
                    "of type `{}` could not be serialized for its key: {e}",
                    std::any::type_name::<T>()
                )
            });
        }
    }

    /// A map key's encoding, for its key and its template.
    fn map_key<K: serde::Serialize>(&mut self, key: &K) -> Vec<u8> {
        match postcard::to_stdvec(key) {
            Ok(bytes) => bytes,
            Err(e) => {
                self.fail(|| {
                    format!(
                        "has a map key of type `{}` that could not be serialized: {e}",
                        std::any::type_name::<K>()
                    )
                });
                Vec::new()
            }
        }
    }

    pub(crate) fn finish<T>(mut self, name: &'static &'static str, call: impl Call) -> Delayed<T> {
        if self.error.is_some() {
            // What was hashed is the arguments up to the one that failed:
            // another call could hash the same and share the key. A call
            // that cannot run shares it with nothing.
            self.hasher.bytes(&crate::build::key::nonce());
        }
        let (key, stable) = self.hasher.finish_call();
        let call: Arc<dyn Call> = match self.error {
            None => shared(call),
            Some(message) => Arc::new(Broken(message)),
        };
        // A capturing closure's call keeps its key without the nonce, for
        // a name given to it (`key.rs` rule 5).
        let call = match stable {
            Some(stable) => crate::build::node::Decorated::stable(&call, stable),
            None => call,
        };
        Delayed::from_node(Arc::new(Node {
            mark: Mark::estimating(self.tasks),
            key,
            label: Label::Static(name),
            deps: match self.deps {
                Deps::None if !self.more.is_empty() => self.more.into(),
                few => few,
            },
            call,
        }))
    }
}

/// `call` behind an `Arc`: a call holding nothing (a function item or a
/// capture-free closure, every argument an input) is one `Arc` per type and
/// thread, shared by all its nodes, since any two of them behave alike. So
/// such a node costs no allocation for its call, and the call's memory stays
/// in cache while the plan runs.
fn shared<C: Call>(call: C) -> Arc<dyn Call> {
    if std::mem::size_of::<C>() != 0 {
        return Arc::new(call);
    }
    type Calls = crate::build::key::TypeMap<Arc<dyn Call>>;
    thread_local! {
        static CALLS: std::cell::RefCell<Calls> = std::cell::RefCell::default();
    }
    let mut call = Some(call);
    let made = CALLS.try_with(|calls| {
        let mut calls = calls.try_borrow_mut().ok()?;
        let shared = calls.entry(std::any::TypeId::of::<C>()).or_insert_with(|| {
            Arc::new(call.take().expect("the call is taken once")) as Arc<dyn Call>
        });
        Some(shared.clone())
    });
    match made {
        Ok(Some(shared)) => shared,
        // While thread-locals are torn down: an `Arc` of its own.
        _ => Arc::new(call.expect("the call is taken only when shared")),
    }
}

/// A plain value argument, kept in the task.
#[doc(hidden)]
pub struct Literal<T>(T);

impl<T: Data> Slot<T> for Literal<T> {
    #[inline]
    fn extract(&self, _: &mut Inputs<'_>) -> Result<T, OpError> {
        Ok(self.0.clone())
    }
    fn template(&self, out: &mut Template) -> Result<(), WireError> {
        out.bytes(&crate::build::registry::encode_literal(&self.0)?);
        Ok(())
    }
    fn wire(&self) -> Result<WireArg, WireError> {
        crate::build::registry::encode_literal(&self.0).map(WireArg::Literal)
    }
    fn literals(&self, shapes: &mut Shapes) {
        shapes.add::<T>();
    }
}

/// An [`Untraversed`] value, kept in the task as is, and the keys of the
/// futures inside it, which are task inputs (`travel.rs` rule 5). It
/// travels as a literal (a `Delayed` inside it as its graph), or, with
/// futures, as its bytes and how many inputs they take (`travel.rs`
/// rules 6 and 7).
#[doc(hidden)]
pub struct Opaque<T> {
    value: T,
    futures: Vec<rask_executor::Key>,
}

impl<T: Data> Slot<T> for Opaque<T> {
    #[inline]
    fn extract(&self, inputs: &mut Inputs<'_>) -> Result<T, OpError> {
        // In this process the futures are passed as they are: their
        // inputs only made the task wait for them.
        for _ in &self.futures {
            inputs.next_value()?;
        }
        Ok(self.value.clone())
    }
    fn template(&self, out: &mut Template) -> Result<(), WireError> {
        if !self.futures.is_empty() {
            // Never reached: an `Untraversed` is a whole argument, never
            // a part of a structure.
            return Err(WireError::NotSerializable {
                what: "an untraversed value holding futures, inside a structure".into(),
            });
        }
        out.bytes(&crate::build::travel::encode_untraversed(&self.value, &[])?);
        Ok(())
    }
    fn wire(&self) -> Result<WireArg, WireError> {
        let bytes = crate::build::travel::encode_untraversed(&self.value, &self.futures)?;
        if self.futures.is_empty() {
            return Ok(WireArg::Literal(bytes));
        }
        let inputs = u32::try_from(self.futures.len()).map_err(|_| WireError::NotSerializable {
            what: "an untraversed value holding more than 2^32 - 1 futures".into(),
        })?;
        Ok(WireArg::Bound { bytes, inputs })
    }
    fn literals(&self, shapes: &mut Shapes) {
        shapes.add::<T>();
    }
}

/// One task input passed by value.
#[doc(hidden)]
pub struct Owned<T>(PhantomData<fn() -> T>);

impl<T: Data> Slot<T> for Owned<T> {
    #[inline]
    fn extract(&self, inputs: &mut Inputs<'_>) -> Result<T, OpError> {
        inputs.owned::<T>()
    }
    fn template(&self, out: &mut Template) -> Result<(), WireError> {
        out.input()
    }
    fn wire(&self) -> Result<WireArg, WireError> {
        Ok(WireArg::One)
    }
}

/// One task input passed as a shared `Arc<T>`.
#[doc(hidden)]
pub struct Shared<T>(PhantomData<fn() -> T>);

impl<T: Data> Slot<Arc<T>> for Shared<T> {
    #[inline]
    fn extract(&self, inputs: &mut Inputs<'_>) -> Result<Arc<T>, OpError> {
        inputs.shared::<T>()
    }
    fn template(&self, out: &mut Template) -> Result<(), WireError> {
        out.input()
    }
    fn wire(&self) -> Result<WireArg, WireError> {
        Ok(WireArg::One)
    }
}

impl<T: Data> IntoArg<T, mode::Literal> for T {
    type Slot = Literal<T>;
    const PLAIN: bool = true;
    fn into_arg(self, args: &mut Args) -> Literal<T> {
        args.literal_value(&self);
        args.next_position();
        Literal(self)
    }
}

impl<A, X: Traverse<A>> IntoArg<A, mode::Traversed> for X {
    type Slot = X::Slot;
    #[inline]
    fn into_arg(self, args: &mut Args) -> X::Slot {
        let slot = self.traverse(args);
        args.next_position();
        slot
    }
}

impl<T: Data> Traverse<T> for Delayed<T> {
    type Slot = Owned<T>;
    #[inline]
    fn traverse(&self, args: &mut Args) -> Owned<T> {
        args.input(self.node());
        Owned(PhantomData)
    }
}

impl<T: Data> Traverse<Arc<T>> for Delayed<T> {
    type Slot = Shared<T>;
    #[inline]
    fn traverse(&self, args: &mut Args) -> Shared<T> {
        args.input(self.node());
        Shared(PhantomData)
    }
}

impl<A, X: Traverse<A> + ?Sized> Traverse<A> for &X {
    type Slot = X::Slot;
    #[inline]
    fn traverse(&self, args: &mut Args) -> X::Slot {
        (**self).traverse(args)
    }
}

/// A list of slots, producing a `Vec` (or, with `N`, an array).
#[doc(hidden)]
pub struct Each<S, A>(Vec<S>, PhantomData<fn() -> A>);

fn each<S, A, X: Traverse<A, Slot = S>>(items: &[X], args: &mut Args) -> Each<S, A> {
    // The length is part of the key so `[[a, b]]` and `[[a], [b]]` differ.
    args.hasher.bytes(&(items.len() as u64).to_le_bytes());
    Each(
        items.iter().map(|x| x.traverse(args)).collect(),
        PhantomData,
    )
}

impl<A: 'static, S: Slot<A>> Slot<Vec<A>> for Each<S, A> {
    fn extract(&self, inputs: &mut Inputs<'_>) -> Result<Vec<A>, OpError> {
        self.0.iter().map(|s| s.extract(inputs)).collect()
    }
    fn template(&self, out: &mut Template) -> Result<(), WireError> {
        out.length(self.0.len())?;
        self.0.iter().try_for_each(|s| s.template(out))
    }
    fn literals(&self, shapes: &mut Shapes) {
        self.0.iter().for_each(|s| s.literals(shapes));
    }
}

impl<A: 'static, S: Slot<A>, const N: usize> Slot<[A; N]> for Each<S, A> {
    fn extract(&self, inputs: &mut Inputs<'_>) -> Result<[A; N], OpError> {
        let items: Vec<A> = self
            .0
            .iter()
            .map(|s| s.extract(inputs))
            .collect::<Result<_, _>>()?;
        items.try_into().map_err(|_| {
            OpError::failed(format!("an array of {N} elements was given another length"))
        })
    }
    fn template(&self, out: &mut Template) -> Result<(), WireError> {
        // Arrays encode as their elements alone: the length is the type's.
        self.0.iter().try_for_each(|s| s.template(out))
    }
    fn literals(&self, shapes: &mut Shapes) {
        self.0.iter().for_each(|s| s.literals(shapes));
    }
}

impl<A: 'static, X: Traverse<A>> Traverse<Vec<A>> for [X] {
    type Slot = Each<X::Slot, A>;
    fn traverse(&self, args: &mut Args) -> Self::Slot {
        each(self, args)
    }
}

impl<A: 'static, X: Traverse<A>> Traverse<Vec<A>> for Vec<X> {
    type Slot = Each<X::Slot, A>;
    fn traverse(&self, args: &mut Args) -> Self::Slot {
        each(self, args)
    }
}

impl<A: 'static, X: Traverse<A>, const N: usize> Traverse<Vec<A>> for [X; N] {
    type Slot = Each<X::Slot, A>;
    fn traverse(&self, args: &mut Args) -> Self::Slot {
        each(self, args)
    }
}

impl<A: 'static, X: Traverse<A>, const N: usize> Traverse<[A; N]> for [X; N] {
    type Slot = Each<X::Slot, A>;
    fn traverse(&self, args: &mut Args) -> Self::Slot {
        each(self, args)
    }
}

/// An optional slot, producing an `Option`.
#[doc(hidden)]
pub struct Maybe<S>(Option<S>);

impl<A, S: Slot<A>> Slot<Option<A>> for Maybe<S> {
    fn extract(&self, inputs: &mut Inputs<'_>) -> Result<Option<A>, OpError> {
        self.0.as_ref().map(|s| s.extract(inputs)).transpose()
    }
    fn template(&self, out: &mut Template) -> Result<(), WireError> {
        match &self.0 {
            None => {
                out.bytes(&[0]);
                Ok(())
            }
            Some(s) => {
                out.bytes(&[1]);
                s.template(out)
            }
        }
    }
    fn literals(&self, shapes: &mut Shapes) {
        if let Some(s) = &self.0 {
            s.literals(shapes);
        }
    }
}

impl<A, X: Traverse<A>> Traverse<Option<A>> for Option<X> {
    type Slot = Maybe<X::Slot>;
    fn traverse(&self, args: &mut Args) -> Self::Slot {
        args.hasher.bytes(&[b'?', u8::from(self.is_some())]);
        Maybe(self.as_ref().map(|x| x.traverse(args)))
    }
}

/// Map entries: a literal key and a slot, producing a map of type `M`.
#[doc(hidden)]
pub struct Entries<K, S, M>(Vec<(K, Vec<u8>, S)>, PhantomData<fn() -> M>);

fn entries<'a, K, A, X, M>(
    items: impl Iterator<Item = (&'a K, &'a X)>,
    sort: bool,
    args: &mut Args,
) -> Entries<K, X::Slot, M>
where
    K: Data,
    X: Traverse<A> + 'a,
{
    let mut encoded: Vec<(Vec<u8>, &K, &X)> = items.map(|(k, x)| (args.map_key(k), k, x)).collect();
    if sort {
        // A `HashMap` iterates in a per-process random order (module rule 1).
        encoded.sort_by(|a, b| a.0.cmp(&b.0));
    }
    let mut head = vec![b'{'];
    head.extend_from_slice(&(encoded.len() as u64).to_le_bytes());
    args.hasher.bytes(&head);
    let slots = encoded
        .into_iter()
        .map(|(bytes, k, x)| {
            // Keyed as a literal is (`key.rs` rule 3), not by its bytes.
            args.literal_value(k);
            let slot = x.traverse(args);
            (k.clone(), bytes, slot)
        })
        .collect();
    Entries(slots, PhantomData)
}

macro_rules! map_slot {
    ($map:ident $($bound:path),*) => {
        impl<K, A, S> Slot<$map<K, A>> for Entries<K, S, $map<K, A>>
        where
            K: Data $(+ $bound)*,
            A: 'static,
            S: Slot<A>,
        {
            fn extract(&self, inputs: &mut Inputs<'_>) -> Result<$map<K, A>, OpError> {
                self.0
                    .iter()
                    .map(|(k, _, s)| Ok((k.clone(), s.extract(inputs)?)))
                    .collect()
            }
            fn template(&self, out: &mut Template) -> Result<(), WireError> {
                out.length(self.0.len())?;
                for (_, key, s) in &self.0 {
                    out.bytes(key);
                    s.template(out)?;
                }
                Ok(())
            }
            fn literals(&self, shapes: &mut Shapes) {
                for (_, _, s) in &self.0 {
                    shapes.add::<K>();
                    s.literals(shapes);
                }
            }
        }
    };
}

map_slot!(BTreeMap Ord);
map_slot!(HashMap Eq, Hash);

impl<K, A, X> Traverse<BTreeMap<K, A>> for BTreeMap<K, X>
where
    K: Data + Ord,
    A: 'static,
    X: Traverse<A>,
{
    type Slot = Entries<K, X::Slot, BTreeMap<K, A>>;
    fn traverse(&self, args: &mut Args) -> Self::Slot {
        entries(self.iter(), false, args)
    }
}

impl<K, A, X, S> Traverse<HashMap<K, A>> for HashMap<K, X, S>
where
    K: Data + Eq + Hash,
    A: 'static,
    X: Traverse<A>,
{
    type Slot = Entries<K, X::Slot, HashMap<K, A>>;
    fn traverse(&self, args: &mut Args) -> Self::Slot {
        entries(self.iter(), true, args)
    }
}

macro_rules! tuple_args {
    ($($a:ident $x:ident $s:ident $i:tt),+) => {
        impl<$($a, $s: Slot<$a>),+> Slot<($($a,)+)> for ($($s,)+) {
            fn extract(&self, inputs: &mut Inputs<'_>) -> Result<($($a,)+), OpError> {
                Ok(($(self.$i.extract(inputs)?,)+))
            }
            fn template(&self, out: &mut Template) -> Result<(), WireError> {
                // A tuple encodes as its elements in order.
                $(self.$i.template(out)?;)+
                Ok(())
            }
            fn literals(&self, shapes: &mut Shapes) {
                $(self.$i.literals(shapes);)+
            }
        }
        impl<$($a, $x: Traverse<$a>),+> Traverse<($($a,)+)> for ($($x,)+) {
            type Slot = ($($x::Slot,)+);
            fn traverse(&self, args: &mut Args) -> Self::Slot {
                ($(self.$i.traverse(args),)+)
            }
        }
    };
}

tuple_args!(A0 X0 S0 0, A1 X1 S1 1);
tuple_args!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2);
tuple_args!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2, A3 X3 S3 3);
tuple_args!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2, A3 X3 S3 3, A4 X4 S4 4);
tuple_args!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2, A3 X3 S3 3, A4 X4 S4 4, A5 X5 S5 5);

/// Passes a value to a task as is, without looking for `Delayed`s inside it.
///
/// The function receives the value itself: a `Vec<Delayed<T>>` stays a list
/// of handles (the task may compute them itself) instead of becoming a list
/// of results. The key hashes the value's serialization, a `Delayed` in it
/// as its key (a value whose serialization fails gets a key of its own,
/// shared with no other task).
///
/// On a cluster the value travels as it serializes: plain data as its
/// bytes, a `Delayed` as its graph of registered tasks, which the worker
/// rebuilds under the same keys, so the task can compute it there — a
/// nested computation, on the cluster the task runs on. A `Delayed` whose
/// graph calls a function that is not registered (or a closure that
/// captures variables) cannot travel: the submission fails, naming it.
///
/// # Futures
///
/// A [`Future`](crate::Future) inside the value (alone, or anywhere in a
/// structure) reaches the task as a future of the same key whose
/// [`result`](crate::Future::result) is its value, on every executor. Each
/// is also an input of the task, so:
///
/// - the task starts once the futures are done, and its key depends on
///   theirs (distinct futures, distinct keys);
/// - the value stays available until the task ran, even if the submitter
///   dropped its future meanwhile: the graph holds the future, and a
///   cluster keeps the value for the task that needs it (and computes it
///   again if a worker holding it died);
/// - a failed or cancelled future fails the task with its failure, before
///   the task runs (the task never sees a failed future);
/// - on a cluster the value is fetched to the task's worker, as a
///   traversed input's would be, and the future the task receives holds it:
///   `result()` returns at once, and the future can be passed on to nested
///   work (it is sent as data). In this process, the future is the one
///   given.
///
/// A future serializes only here: as a plain value or a task's result sent
/// to another process it fails, saying to write `Untraversed(future)` (or
/// `&future` for its value).
///
/// # Examples
///
/// ```
/// use rask::{delayed, Client, Delayed, Future, Untraversed};
///
/// fn count(parts: Vec<Delayed<i64>>) -> usize { parts.len() }
/// fn read(f: Future<i64>) -> rask::Result<i64> { f.result() }
///
/// let parts = vec![rask::value(1), rask::value(2)];
/// let n = delayed!(count(Untraversed(parts)));
/// assert_eq!(n.compute().unwrap(), 2);
///
/// let client = Client::threads(2)?;
/// let f = client.submit(rask::value(41_i64) + 1)?;
/// let r = client.submit(delayed!(read(Untraversed(f.clone()))?))?;
/// drop(f);                                   // the task still gets it
/// assert_eq!(r.result()?, 42);
/// # Ok::<(), rask::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Untraversed<T>(pub T);

impl<T: Data> IntoArg<T, mode::Opaque> for Untraversed<T> {
    type Slot = Opaque<T>;
    fn into_arg(self, args: &mut Args) -> Opaque<T> {
        args.hasher.bytes(b"untraversed");
        // Its serialization is its part of the key, a `Delayed` in it as
        // its key; its futures are inputs (`travel.rs` rule 5), their keys
        // in the key as inputs too. A value that does not serialize whole
        // shares its key with no other.
        let (futures, whole) = crate::build::travel::futures_in(&self.0, &mut args.hasher);
        if !whole {
            args.hasher.bytes(&crate::build::key::nonce());
        }
        let futures = futures
            .iter()
            .map(|node| {
                args.input(node);
                node.key
            })
            .collect();
        args.next_position();
        Opaque {
            value: self.0,
            futures,
        }
    }
}

/// A function applied to converted arguments: the engine of `delayed!`.
///
/// `Xs` is the tuple of arguments as written, `Sig` the function's signature
/// (it only guides type inference), `Ks` how each argument is passed
/// (inferred, see [`IntoArg`]), `M` how the result is returned.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`delayed!` cannot make a task of `{Self}` with these arguments",
    label = "check the function's result type and each argument",
    note = "the result must be `rask::Data`: derive `Clone, serde::Serialize, serde::Deserialize` on it",
    note = "each argument must fit its parameter: a plain value, a `Delayed` or future of the \
            parameter's type, or a structure of those",
    note = "parameters are owned values: take `String`, not `&str`",
    note = "a function returning `Result` whose `Err` should fail the task is called as `delayed!(f(x)?)`"
)]
pub trait Apply<M, Xs, Sig, Ks> {
    type Out;
    fn apply(self, name: &'static &'static str, xs: Xs) -> Delayed<Self::Out>;
}

macro_rules! apply {
    ($($a:ident $x:ident $s:ident $i:tt),*) => {
        impl<F, M, R, $($a, $x, $s),*> Apply<M, ($($x,)*), fn($($a),*) -> R, ($($s,)*)> for F
        where
            F: Fn($($a),*) -> R + Send + Sync + 'static,
            M: Returns<R>,
            R: 'static,
            $($a: 'static, $x: IntoArg<$a, $s>,)*
        {
            type Out = M::Out;
            #[allow(unused_variables, unused_mut, non_snake_case)]
            fn apply(self, name: &'static &'static str, xs: ($($x,)*)) -> Delayed<M::Out> {
                let mut args = Args::call::<F>(*name, M::FALLIBLE);
                let ($($x,)*) = xs;
                let slots = ($($x.into_arg(&mut args),)*);
                let call = Typed::<F, M, _, fn($($a),*) -> R> { f: self, slots, _sig: PhantomData };
                args.finish(name, call)
            }
        }

        impl<F, M, R, $($a, $s),*> Call for Typed<F, M, ($($s,)*), fn($($a),*) -> R>
        where
            F: Fn($($a),*) -> R + Send + Sync + 'static,
            M: Returns<R>,
            R: 'static,
            $($a: 'static, $s: Slot<$a>,)*
        {
            #[allow(unused_variables, unused_mut)]
            fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
                let mut inputs = Inputs::new(inputs);
                let out = (self.f)($(self.slots.$i.extract(&mut inputs)?),*);
                Ok(Arc::new(M::finish(out)?))
            }

            fn code(&self) -> Code {
                Code::Call(Function::of::<F, M::Out>())
            }

            fn output_type(&self) -> Option<std::any::TypeId> {
                Some(std::any::TypeId::of::<M::Out>())
            }

            #[allow(unused_variables)]
            fn literals(&self, shapes: &mut Shapes) {
                $(self.slots.$i.literals(shapes);)*
            }

            fn sendable(&self) -> Result<(), WireError> {
                let function = crate::build::registry::function_id::<F>()?;
                crate::build::registry::check_registered(&function, M::FALLIBLE)
            }

            fn to_wire(&self) -> Result<WireTask, WireError> {
                let function = crate::build::registry::function_id::<F>()?;
                crate::build::registry::check_registered(&function, M::FALLIBLE)?;
                let payload = Payload {
                    fallible: M::FALLIBLE,
                    args: vec![$(self.slots.$i.wire()?),*],
                };
                Ok(WireTask { function: function.to_string(), payload: payload.encode()? })
            }
        }
    };
}

apply!();
apply!(A0 X0 S0 0);
apply!(A0 X0 S0 0, A1 X1 S1 1);
apply!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2);
apply!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2, A3 X3 S3 3);
apply!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2, A3 X3 S3 3, A4 X4 S4 4);
apply!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2, A3 X3 S3 3, A4 X4 S4 4, A5 X5 S5 5);
apply!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2, A3 X3 S3 3, A4 X4 S4 4, A5 X5 S5 5, A6 X6 S6 6);
apply!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2, A3 X3 S3 3, A4 X4 S4 4, A5 X5 S5 5, A6 X6 S6 6, A7 X7 S7 7);

/// Entry point of the `delayed!` macro. `name` is the function's name, the
/// last segment of its path (a `&'static` reference to it, so that a node
/// holds it in 8 bytes: `node::Label`).
#[doc(hidden)]
pub fn apply<M, Xs, Sig, Ks, F: Apply<M, Xs, Sig, Ks>>(
    name: &'static &'static str,
    f: F,
    xs: Xs,
) -> Delayed<F::Out> {
    f.apply(name, xs)
}

#[cfg(test)]
mod tests {
    use crate::delayed;
    use std::sync::Arc;

    fn sub(x: i64, y: i64) -> i64 {
        x - y
    }

    fn digits(a: i64, b: i64, c: i64, d: i64) -> i64 {
        1000 * a + 100 * b + 10 * c + d
    }

    #[test]
    fn inputs_keep_argument_order_however_many() {
        // One and two inputs live in the node, more in a list of their own
        // (`Deps`); each must reach the function in argument order, or
        // `sub` and `digits` give another (silently wrong) number.
        let n = |v: i64| delayed!(sub(v, 0));
        let (one, two, three, four) = (n(1), n(2), n(3), n(4));
        assert_eq!(delayed!(sub(&one, 5)).compute().unwrap(), -4);
        assert_eq!(delayed!(sub(&one, &two)).compute().unwrap(), -1);
        assert_eq!(delayed!(sub(&two, &one)).compute().unwrap(), 1);
        let three_inputs = delayed!(digits(&one, &two, &three, 0));
        assert_eq!(three_inputs.node().deps.len(), 3);
        assert_eq!(three_inputs.compute().unwrap(), 1230);
        let four_inputs = delayed!(digits(&four, &three, &two, &one));
        assert_eq!(four_inputs.compute().unwrap(), 4321);
        // A repeated input is an input per argument.
        assert_eq!(
            delayed!(digits(&one, &one, &two, &one)).compute().unwrap(),
            1121
        );
    }

    #[test]
    fn a_call_holding_nothing_is_shared_and_one_holding_a_literal_is_not() {
        let (a, b) = (delayed!(sub(1, 0)), delayed!(sub(2, 0)));
        // Literals live in the call: one call each.
        assert!(!Arc::ptr_eq(&a.node().call, &b.node().call));
        let x = delayed!(sub(&a, &b));
        let y = delayed!(sub(&b, &a));
        // Inputs only: the call holds nothing, one `Arc` for both nodes.
        assert!(Arc::ptr_eq(&x.node().call, &y.node().call));
        assert_ne!(x.key(), y.key());
        assert_eq!(rask_compute(&x, &y), (-1, 1));
    }

    fn rask_compute(x: &crate::Delayed<i64>, y: &crate::Delayed<i64>) -> (i64, i64) {
        crate::compute((x, y)).unwrap()
    }

    mod m {
        pub(super) mod deeper {
            pub(in super::super) fn inc(x: i64) -> i64 {
                x + 1
            }
        }
    }

    #[test]
    fn a_task_is_named_by_the_last_segment_of_its_path() {
        use m::deeper;
        let by_path = delayed!(m::deeper::inc(1));
        let short = delayed!(deeper::inc(1));
        for task in [&by_path, &short] {
            assert_eq!(task.name(), "inc");
        }
        // The key hashes the name, as before paths were split by the macro.
        assert_eq!(by_path.key(), short.key());
    }
}
