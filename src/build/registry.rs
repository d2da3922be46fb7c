//! The task registry: which functions can run in another process, and how a
//! task travels there.
//!
//! A distributed worker is the program's own binary started in worker mode.
//! It finds functions by name in the registry [`init`](crate::init) builds, which every
//! process of the program builds the same way at the start of `main`: from
//! the functions marked [`#[rask::task]`](crate::task) anywhere in the
//! program, plus any list given to [`init_with`](crate::init_with) (`rask::tasks![…]`).
//!
//! Rules:
//!
//! 1. A function is known by its *id*: its path (`std::any::type_name`)
//!    and its type tag (`crate::key::type_tag`), `app::inc#1a2b…`, the same
//!    string in every process of one binary and a different one for every
//!    distinct function, closures included. Only functions that capture
//!    nothing can be registered or sent: a closure's captured values would
//!    not travel with it, and the worker's copy could hold other values.
//! 2. A task travels as its function's name and a [`Payload`]: one
//!    [`WireArg`] per parameter — a literal's postcard bytes, one task
//!    input, or a template: the postcard encoding of a structure
//!    (`Vec`, `Option`, map, tuple, nested to any depth) with holes for its
//!    task inputs ([`Piece`]). The worker rebuilds the call with slots that
//!    decode inputs with the parameter's own type; a template is filled
//!    with its inputs' bytes and decoded as the parameter, so the worker
//!    needs no knowledge of the structure and never recurses over it.
//!    Counts come from another process and are not trusted: a template
//!    taking more inputs than the task has left fails the task before
//!    anything is read or allocated for them, and a template's bytes that
//!    do not decode as the parameter fail it too. A template is at most
//!    [`MAX_PIECES`] pieces (its size is already bounded by the frame).
//! 3. A held value (a `rask::value`, a persisted result, a future's value)
//!    travels as the built-in function `rask.value` whose payload is the
//!    value's bytes; a recorded failure as `rask.fail`.
//! 4. A value a cluster holds for this process (a [`Remote`] handle: a
//!    future's or persisted result on a cluster) travels as `rask.remote`
//!    whose payload is its key: the cluster uses its own copy. The op it
//!    resolves to only fails, since the scheduler runs it only when the key
//!    is no longer held there.
//! 5. A part of a value (`Delayed::split`, `Delayed::item`) travels as
//!    `rask.getitem` (`pick.rs`): the worker finds the whole's type among
//!    the output types of the registered functions, by type tag.
//! 6. The registry is the operators on primitive types, then the given
//!    list, then every [`Registration`] in `REGISTRATIONS`. Adding a
//!    function is idempotent (its id is its entry), so the order of the
//!    link-time list — the linker's — does not matter, a function both
//!    marked and listed is registered once, and every process of one binary
//!    builds the same registry.
//! 7. A graph bound for a cluster is checked before anything of it is sent
//!    ([`check_sendable`]): a task calling a closure that captures
//!    variables, or a function not registered, refuses the whole
//!    submission with [`Error::Unsendable`](crate::Error::Unsendable),
//!    which names the task and says what to do instead.
//! 8. For the result cache (`run::cache`), `#[rask::task]` records each
//!    function's version — a hash of its signature and body tokens, or
//!    `version = N` — and whether its calls are cached by default
//!    (`#[rask::task(cache)]`); [`recorded`] reads them by the function's
//!    type. Operators on primitive types are versioned by rask's version;
//!    a function given to [`init_with`](crate::init_with) only, or never
//!    registered, has no version.
//! 9. A fused task (a chain, inlined data folded into its consumer) travels
//!    as the built-in function `rask.fused` whose payload holds each step's
//!    own wire task (`build::fused`): the registry resolves
//!    every step as above and runs them in order as one op.
//!
//! # Why a link-time list
//!
//! A worker must know a function before any task names it, and a worker
//! never runs the code that builds graphs: it stops in [`init`](crate::init). So the
//! registry cannot be filled as `delayed!` meets functions; it must be
//! known from the binary alone. `#[rask::task]` (the `rask-macros` crate in
//! `src/macros/`, a proc-macro crate of its own since Cargo requires one,
//! kept under `src/` because it is part of what users depend on) adds one
//! `linkme` distributed-slice element per function: a static the linker
//! gathers into one array, read by [`init`](crate::init). `linkme` rather than
//! `inventory`: no code runs before `main`, nothing is allocated, and the
//! crate's `unsafe_code = "forbid"` holds (the link sections are written in
//! `linkme`'s expansion). The cost is linker support: Linux, macOS,
//! Windows, the BSDs and illumos, not WebAssembly; and a crate whose only
//! use is its marked functions may be left out by the linker (call any of
//! its functions, or list them with `tasks!`).
//!
//! `delayed!` does not register the functions it names: the path it sees may
//! be a local closure, which no `static` can refer to, and a
//! `macro_rules!` macro cannot tell the two apart.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

use rask_executor::{
    Encoded, Failure, Key, Op, OpError, Remote, Value, WireError, WireTask, REMOTE_FUNCTION,
};
use serde::{Deserialize, Serialize};

use crate::build::args::Slot;
use crate::build::data::Data;
use crate::build::node::{
    Call, Fallible, Held, Inputs, Label, Name, Node, Origin, Plain, Returns, Typed,
};

/// The function name of held values on the wire (rule 3).
pub(crate) const VALUE_FUNCTION: &str = rask_executor::VALUE_FUNCTION;
/// The function name of recorded failures on the wire (rule 3).
pub(crate) const FAIL_FUNCTION: &str = rask_executor::FAIL_FUNCTION;

/// The most pieces of a template (rule 2): runs of inputs merge into one
/// piece, so only a structure alternating shape bytes and inputs (a long
/// list of `Option`s, a map) comes near it.
pub(crate) const MAX_PIECES: usize = 1 << 20;

/// How one parameter of a task travels (rule 2).
#[doc(hidden)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum WireArg {
    /// A literal, as postcard bytes of the parameter's type.
    Literal(Vec<u8>),
    /// One task input.
    One,
    /// A structure: its encoding with holes for its task inputs.
    Nested(Vec<Piece>),
    /// An untraversed value holding futures: its encoding, in which each
    /// future names one of the next `inputs` task inputs by position
    /// (`travel.rs` rules 6 and 7).
    Bound {
        /// The value's encoding.
        bytes: Vec<u8>,
        /// How many task inputs its futures take.
        inputs: u32,
    },
}

/// A piece of a template (rule 2).
#[doc(hidden)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Piece {
    /// Encoded bytes of the structure's shape (lengths, tags, map keys).
    Bytes(Vec<u8>),
    /// The encodings of the next `n` task inputs, in order.
    Inputs(u32),
}

/// The bytes of a [`WireTask`] built from a typed call.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Payload {
    pub(crate) fallible: bool,
    pub(crate) args: Vec<WireArg>,
}

impl Payload {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, WireError> {
        postcard::to_stdvec(self).map_err(|e| WireError::Encode {
            what: "task arguments".into(),
            reason: e.to_string(),
        })
    }

    fn decode(bytes: &[u8]) -> Result<Payload, WireError> {
        postcard::from_bytes(bytes).map_err(|e| WireError::Decode {
            what: "task arguments".into(),
            reason: e.to_string(),
        })
    }
}

/// The id of the function `F` on the wire (rule 1).
///
/// # Errors
///
/// [`WireError::Captures`] for a closure that captures variables.
pub(crate) fn function_id<F: 'static>() -> Result<Arc<str>, WireError> {
    if !crate::build::key::is_pure_fn::<F>() {
        return Err(WireError::Captures {
            function: std::any::type_name::<F>().to_owned(),
        });
    }
    // Formatting the id costs more than the rest of sending a small task:
    // it is made once per function and kept.
    static IDS: std::sync::LazyLock<std::sync::RwLock<crate::build::key::TypeMap<Arc<str>>>> =
        std::sync::LazyLock::new(Default::default);
    let ty = TypeId::of::<F>();
    if let Some(id) = IDS
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&ty)
    {
        return Ok(id.clone());
    }
    let id: Arc<str> = format!(
        "{}#{:016x}",
        std::any::type_name::<F>(),
        crate::build::key::type_tag::<F>()
    )
    .into();
    IDS.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(ty, id.clone());
    Ok(id)
}

/// The readable path of a function id (rule 1), for messages.
fn function_path(id: &str) -> &str {
    id.rsplit_once('#').map_or(id, |(path, _)| path)
}

pub(crate) fn encode_literal<T: Data>(value: &T) -> Result<Vec<u8>, WireError> {
    postcard::to_stdvec(value).map_err(|e| WireError::Encode {
        what: std::any::type_name::<T>().to_owned(),
        reason: e.to_string(),
    })
}

/// A held value as a task of its own (rule 3), or a reference to the key
/// when the value is held by a cluster (rule 4).
pub(crate) fn value_task(value: &Value) -> Result<WireTask, WireError> {
    if let Some(remote) = value.downcast_ref::<Remote>() {
        return Ok(WireTask {
            function: REMOTE_FUNCTION.to_owned(),
            payload: remote.key().0.to_vec(),
        });
    }
    Ok(WireTask {
        function: VALUE_FUNCTION.to_owned(),
        payload: value.encode()?,
    })
}

/// A held value as a task of its own (rule 3), its bytes fetched from its
/// cluster when it is held there: for a graph travelling inside a task's
/// argument, whose worker's connection does not hold this client's keys.
pub(crate) fn fetched_value_task(value: &Value) -> Result<WireTask, WireError> {
    match value.downcast_ref::<Remote>() {
        Some(remote) => {
            let bytes = remote.fetch().map_err(|e| WireError::Encode {
                what: format!("the value of future {}", remote.key()),
                reason: e.to_string(),
            })?;
            Ok(WireTask {
                function: VALUE_FUNCTION.to_owned(),
                payload: bytes.to_vec(),
            })
        }
        None => value_task(value),
    }
}

/// A recorded failure as a task that fails the same way (rule 3).
pub(crate) fn fail_task(failure: &Failure) -> Result<WireTask, WireError> {
    Ok(WireTask {
        function: FAIL_FUNCTION.to_owned(),
        payload: rask_executor::encode_failure(failure)?,
    })
}

/// Stands for a value the cluster was expected to hold (rule 4): runs only
/// when it does not.
struct Released(Key);

impl Call for Released {
    fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
        Err(OpError::failed(format!(
            "the cluster no longer holds value {} (it was released, or lost with its \
             client's connection to the scheduler)",
            self.0
        )))
    }
}

/// Replays a failure recorded in another process.
struct Replayed(Arc<Failure>);

impl Call for Replayed {
    fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
        Err(replay(&self.0))
    }

    fn name(&self) -> &str {
        &self.0.name
    }
}

/// The error of a task replaying `failure`, recorded here or in another
/// process: the same failure, naming the task where it started.
pub(crate) fn replay(failure: &Failure) -> OpError {
    OpError {
        kind: failure.kind,
        message: failure.message.clone(),
        origin: Some((failure.key, failure.name.clone())),
        cause: failure.cause.clone(),
        location: failure.location.clone(),
        attempts: failure.attempts,
    }
}

/// A parameter rebuilt in a worker (rule 2): decodes its inputs with the
/// parameter's own type, whatever form they arrive in.
pub(crate) enum WireSlot<A> {
    Literal(A),
    One,
    Nested(Vec<Piece>),
    Bound(Vec<u8>, u32),
}

impl<A: Data> WireSlot<A> {
    fn from_arg(arg: &WireArg) -> Result<Self, WireError> {
        Ok(match arg {
            WireArg::Literal(bytes) => {
                WireSlot::Literal(crate::build::data::decode_whole(bytes).map_err(|reason| {
                    WireError::Decode {
                        what: format!("a literal `{}`", std::any::type_name::<A>()),
                        reason,
                    }
                })?)
            }
            WireArg::One => WireSlot::One,
            WireArg::Nested(pieces) if pieces.len() <= MAX_PIECES => {
                WireSlot::Nested(pieces.clone())
            }
            WireArg::Bound { bytes, inputs } => WireSlot::Bound(bytes.clone(), *inputs),
            WireArg::Nested(pieces) => {
                return Err(WireError::Decode {
                    what: format!("a parameter `{}`", std::any::type_name::<A>()),
                    reason: format!(
                        "a template of {} pieces, where at most {MAX_PIECES} are taken",
                        pieces.len()
                    ),
                })
            }
        })
    }
}

/// Checks that a parameter taking `n` inputs has them (rule 2): the count
/// came from another process.
fn take_count<A>(n: u32, inputs: &Inputs<'_>) -> Result<usize, OpError> {
    let left = inputs.remaining();
    match usize::try_from(n) {
        Ok(n) if n <= left => Ok(n),
        _ => Err(OpError::failed(format!(
            "a parameter `{}` takes {n} task inputs, but only {left} are left",
            std::any::type_name::<A>()
        ))),
    }
}

/// The encoding of the next input, whatever form it is held in.
fn next_bytes(inputs: &mut Inputs<'_>, out: &mut Vec<u8>) -> Result<(), OpError> {
    let value = inputs.next_value()?;
    match value.downcast_ref::<Encoded>() {
        Some(encoded) => out.extend_from_slice(&encoded.0),
        None => out.extend(value.encode().map_err(|e| OpError::failed(e.to_string()))?),
    }
    Ok(())
}

fn decode<A: Data>(bytes: &[u8]) -> Result<A, OpError> {
    crate::build::data::decode_whole(bytes).map_err(|e| {
        OpError::failed(format!(
            "could not decode a `{}`: {e}",
            std::any::type_name::<A>()
        ))
    })
}

impl<A: Data> Slot<A> for WireSlot<A> {
    fn extract(&self, inputs: &mut Inputs<'_>) -> Result<A, OpError> {
        match self {
            WireSlot::Literal(a) => Ok(a.clone()),
            WireSlot::One => {
                let value = inputs.next_value()?;
                let value = match rask_executor::downcast::<A>(value) {
                    Ok(shared) => {
                        return Ok(Arc::try_unwrap(shared).unwrap_or_else(|s| (*s).clone()))
                    }
                    Err(value) => value,
                };
                // A `T` produced here for an `Arc<T>` parameter: shared as is.
                let value = match as_shared::<A>(value) {
                    Ok(a) => return Ok(a),
                    Err(value) => value,
                };
                // Bytes from a peer: decode. A value of another type held
                // here is an error, as in this process (`data::as_arc`):
                // its encoding read as an `A` would be another value.
                let Some(encoded) = value.downcast_ref::<Encoded>() else {
                    return Err(OpError::failed(format!(
                        "a value of type `{}` is not the `{}` expected",
                        value.type_name(),
                        std::any::type_name::<A>()
                    )));
                };
                // For an `Arc<R>` parameter, once for all the tasks that
                // share the fetched value (`data::shared` keeps it).
                let shared = shared_output::<A>().and_then(|s| (s.decode)(value.clone()));
                if let Some(Ok(a)) = shared.map(|boxed| boxed.downcast::<A>()) {
                    return Ok(*a);
                }
                decode(&encoded.0)
            }
            WireSlot::Nested(pieces) => {
                // Every count first, so a lying template reads nothing.
                let total = pieces.iter().try_fold(0_u64, |sum, piece| match piece {
                    Piece::Inputs(n) => Some(sum + u64::from(*n)),
                    Piece::Bytes(_) => Some(sum),
                });
                let total = total
                    .and_then(|t| u32::try_from(t).ok())
                    .unwrap_or(u32::MAX);
                take_count::<A>(total, inputs)?;
                let mut bytes = Vec::new();
                for piece in pieces {
                    match piece {
                        Piece::Bytes(b) => bytes.extend_from_slice(b),
                        Piece::Inputs(n) => {
                            for _ in 0..*n {
                                next_bytes(inputs, &mut bytes)?;
                            }
                        }
                    }
                }
                decode(&bytes)
            }
            WireSlot::Bound(bytes, n) => {
                let n = take_count::<A>(*n, inputs)?;
                let values = (0..n)
                    .map(|_| inputs.next_value())
                    .collect::<Result<Vec<Value>, OpError>>()?;
                crate::build::travel::decode_bound(bytes, values).map_err(|e| {
                    OpError::failed(format!(
                        "could not rebuild an untraversed `{}`: {e}",
                        std::any::type_name::<A>()
                    ))
                })
            }
        }
    }

    fn template(&self, out: &mut crate::build::args::Template) -> Result<(), WireError> {
        match self {
            WireSlot::Bound(..) => {
                return Err(WireError::NotSerializable {
                    what: "an untraversed value holding futures, inside a structure".into(),
                })
            }
            WireSlot::Literal(a) => out.bytes(&encode_literal(a)?),
            WireSlot::One => out.input()?,
            WireSlot::Nested(pieces) => pieces.iter().try_for_each(|piece| match piece {
                Piece::Bytes(b) => {
                    out.bytes(b);
                    Ok(())
                }
                Piece::Inputs(n) => (0..*n).try_for_each(|_| out.input()),
            })?,
        }
        Ok(())
    }

    fn wire(&self) -> Result<WireArg, WireError> {
        Ok(match self {
            WireSlot::Literal(a) => WireArg::Literal(encode_literal(a)?),
            WireSlot::One => WireArg::One,
            WireSlot::Nested(pieces) => WireArg::Nested(pieces.clone()),
            WireSlot::Bound(bytes, inputs) => WireArg::Bound {
                bytes: bytes.clone(),
                inputs: *inputs,
            },
        })
    }
}

type Build = Box<dyn Fn(&Payload) -> Result<Arc<dyn Call>, WireError> + Send + Sync>;

struct Entry {
    /// The function's name, which its tasks carry.
    name: &'static &'static str,
    plain: Option<Build>,
    fallible: Option<Build>,
}

/// A list of functions a program can run on a cluster; build it with
/// [`tasks!`](crate::tasks!) and hand it to [`init_with`](crate::init_with). Functions marked
/// [`#[rask::task]`](crate::task) need no list.
///
/// # Examples
///
/// ```
/// fn inc(x: i64) -> i64 { x + 1 }
/// fn parse(s: String) -> Result<i64, std::num::ParseIntError> { s.parse() }
///
/// let tasks = rask::tasks![inc, parse?];   // `?`: called as `delayed!(parse(s)?)`
/// assert_eq!(tasks.len(), 2);
/// ```
#[derive(Default)]
pub struct Tasks {
    /// By function id (rule 1).
    entries: HashMap<String, Entry>,
    /// For every registered function's output type `R`, how to hand a stored
    /// `R` to an `Arc<R>` parameter without a copy, keyed by `TypeId` of
    /// `Arc<R>` (the parameter's type, which is all a worker-side slot knows).
    shared: HashMap<TypeId, SharedOutput>,
    /// For every registered function's output type, how a worker takes a
    /// part of it (rule 5), by type tag.
    picks: HashMap<u64, crate::build::pick::Picks>,
    /// What the result cache knows of each function (rule 8), by type.
    recorded: HashMap<TypeId, Recorded>,
}

/// A function's version, recorded where it is declared (rule 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Version {
    /// A hash of its signature and body as written (`#[rask::task]`).
    Source(u128),
    /// Given by the user (`#[rask::task(version = N)]`).
    Explicit(u64),
    /// One of rask's own operators: versioned by rask's version.
    Builtin,
}

/// What the result cache knows of a function (rule 8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Recorded {
    /// Its version, when one was recorded.
    pub(crate) version: Option<Version>,
    /// Whether its calls are cached by default (`#[rask::task(cache)]`).
    pub(crate) cache: bool,
}

/// How an `Arc<R>` parameter takes a registered output type `R`.
#[derive(Clone, Copy)]
#[doc(hidden)]
pub struct SharedOutput {
    /// Turns a stored `R` into a boxed `Arc<R>` (no copy), or gives it back.
    convert: fn(Value) -> Result<Box<dyn Any>, Value>,
    /// Turns encoded bytes into a boxed `Arc<R>`, decoding them once for
    /// every consumer ([`crate::data::shared`]).
    decode: fn(Value) -> Option<Box<dyn Any>>,
}

impl SharedOutput {
    fn of<R: Data>() -> SharedOutput {
        SharedOutput {
            convert: |value| {
                rask_executor::downcast::<R>(value).map(|shared| Box::new(shared) as Box<dyn Any>)
            },
            decode: |value| {
                crate::build::data::shared::<R>(value)
                    .ok()
                    .map(|shared| Box::new(shared) as Box<dyn Any>)
            },
        }
    }
}

/// How `A` takes a registered output type, when `A` is `Arc<R>` of one.
fn shared_output<A: 'static>() -> Option<SharedOutput> {
    REGISTRY
        .get()
        .and_then(|r| r.tasks.shared.get(&TypeId::of::<A>()).copied())
}

/// The registered way to see `value` as an `A` when `A` is `Arc<R>` of a
/// registered output type `R`.
fn as_shared<A: 'static>(value: Value) -> Result<A, Value> {
    let Some(shared) = shared_output::<A>() else {
        return Err(value);
    };
    let boxed = (shared.convert)(value)?;
    Ok(*boxed
        .downcast::<A>()
        .expect("the converter is keyed by the type it makes"))
}

impl Tasks {
    /// An empty list.
    pub fn new() -> Self {
        Tasks::default()
    }

    /// Adds `f`, called as `delayed!(f(...))`.
    pub fn register<F, Sig>(self, f: F) -> Self
    where
        F: Register<Plain, Sig> + 'static,
    {
        self.insert(f, false)
    }

    /// Adds `f`, called as `delayed!(f(...)?)` (it returns a `Result`).
    pub fn register_fallible<F, Sig>(self, f: F) -> Self
    where
        F: Register<Fallible, Sig> + 'static,
    {
        self.insert(f, true)
    }

    fn insert<F: Register<M, Sig> + 'static, M, Sig>(mut self, f: F, fallible: bool) -> Self {
        const {
            assert!(
                std::mem::size_of::<F>() == 0,
                "a registered function must not capture variables: its workers would not \
                 see the captured values (use a fn item that takes them as arguments)"
            );
        }
        let (output, convert) = f.shared_output();
        self.shared.insert(output, convert);
        let parts = f.parts();
        self.picks.insert(parts.tag, parts.picks);
        self.recorded.entry(TypeId::of::<F>()).or_default();
        let build = Some(f.builder().0);
        let entry = self.entry::<F>();
        if fallible {
            entry.fallible = build;
        } else {
            entry.plain = build;
        }
        self
    }

    fn entry<F: 'static>(&mut self) -> &mut Entry {
        let id = function_id::<F>().expect("registered functions capture nothing (checked)");
        self.entries.entry(id.to_string()).or_insert(Entry {
            name: crate::build::node::name_of_type::<F>(),
            plain: None,
            fallible: None,
        })
    }

    /// Records `f`'s version and whether its calls are cached by default,
    /// for the result cache (rule 8): written by `#[rask::task]`, which
    /// hashes the function's signature and body (`source`) or takes
    /// `version = N` (`explicit`).
    #[doc(hidden)]
    pub fn __record<F: 'static>(
        mut self,
        _f: F,
        source: u128,
        explicit: Option<u64>,
        cache: bool,
    ) -> Self {
        let version = match explicit {
            Some(n) => Version::Explicit(n),
            None => Version::Source(source),
        };
        self.recorded.insert(
            TypeId::of::<F>(),
            Recorded {
                version: Some(version),
                cache,
            },
        );
        self
    }

    /// Number of functions.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn has(&self, function: &str, fallible: bool) -> bool {
        self.entries.get(function).is_some_and(|e| {
            if fallible {
                e.fallible.is_some()
            } else {
                e.plain.is_some()
            }
        })
    }
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set()
            .entries(self.entries.keys().map(|id| function_path(id)))
            .finish()
    }
}

/// Lists functions for [`init_with`](crate::init_with): `rask::tasks![inc, add, parse?]`, with
/// `?` after functions called as `delayed!(f(...)?)`. Marking them
/// [`#[rask::task]`](crate::task) instead needs no list; a function both
/// listed and marked is registered once.
#[macro_export]
macro_rules! tasks {
    (@acc $t:expr ;) => { $t };
    (@acc $t:expr ; $($f:ident)::+ ? $(, $($rest:tt)*)?) => {
        $crate::tasks!(@acc $t.register_fallible($($f)::+) ; $($($rest)*)?)
    };
    (@acc $t:expr ; $($f:ident)::+ $(, $($rest:tt)*)?) => {
        $crate::tasks!(@acc $t.register($($f)::+) ; $($($rest)*)?)
    };
    ($($items:tt)*) => { $crate::tasks!(@acc $crate::Tasks::new() ; $($items)*) };
}

/// A function that can be registered; implemented for functions of up to
/// eight [`Data`] parameters.
pub trait Register<M, Sig> {
    #[doc(hidden)]
    fn builder(self) -> Builder;
    #[doc(hidden)]
    fn shared_output(&self) -> (TypeId, SharedOutput);
    #[doc(hidden)]
    fn parts(&self) -> Parts;
}

/// How a worker takes parts of a registered output type (rule 5); opaque.
#[doc(hidden)]
#[derive(Clone, Copy)]
pub struct Parts {
    tag: u64,
    picks: crate::build::pick::Picks,
}

/// How a registered function rebuilds its calls; opaque.
#[doc(hidden)]
pub struct Builder(Build);

macro_rules! register {
    ($n:literal; $($a:ident $i:tt),*) => {
        impl<F, M, R, $($a),*> Register<M, fn($($a),*) -> R> for F
        where
            F: Fn($($a),*) -> R + Clone + Send + Sync + 'static,
            M: Returns<R>,
            R: 'static,
            $($a: Data,)*
        {
            fn shared_output(&self) -> (TypeId, SharedOutput) {
                (TypeId::of::<Arc<M::Out>>(), SharedOutput::of::<M::Out>())
            }

            fn parts(&self) -> Parts {
                Parts { tag: crate::build::key::type_tag::<M::Out>(), picks: crate::build::pick::pick::<M::Out> }
            }

            #[allow(unused_variables)]
            fn builder(self) -> Builder {
                Builder(Box::new(move |payload: &Payload| {
                    if payload.args.len() != $n {
                        return Err(WireError::Decode {
                            what: format!("a call of `{}`", std::any::type_name::<F>()),
                            reason: format!("{} arguments for {} parameters", payload.args.len(), $n),
                        });
                    }
                    let slots = ($(WireSlot::<$a>::from_arg(&payload.args[$i])?,)*);
                    let call = Typed::<F, M, _, fn($($a),*) -> R> { f: self.clone(), slots, _sig: PhantomData };
                    Ok(Arc::new(call) as Arc<dyn Call>)
                }))
            }
        }
    };
}

register!(0;);
register!(1; A0 0);
register!(2; A0 0, A1 1);
register!(3; A0 0, A1 1, A2 2);
register!(4; A0 0, A1 1, A2 2, A3 3);
register!(5; A0 0, A1 1, A2 2, A3 3, A4 4);
register!(6; A0 0, A1 1, A2 2, A3 3, A4 4, A5 5);
register!(7; A0 0, A1 1, A2 2, A3 3, A4 4, A5 5, A6 6);
register!(8; A0 0, A1 1, A2 2, A3 3, A4 4, A5 5, A6 6, A7 7);

static REGISTRY: OnceLock<Arc<Resolver>> = OnceLock::new();

/// The registry installed by [`init`](crate::init), as executors see it.
pub(crate) struct Resolver {
    tasks: Tasks,
}

impl rask_executor::Registry for Resolver {
    fn resolve(&self, task: &WireTask) -> Result<Arc<dyn Op>, WireError> {
        let (label, call): (Label, Arc<dyn Call>) = match task.function.as_str() {
            // Rule 9; its steps are resolved here, and none is fused.
            crate::build::fused::FUSED_FUNCTION => {
                return crate::build::fused::resolve(&task.payload, |step| self.resolve(step));
            }
            VALUE_FUNCTION => (
                Label::Call,
                Arc::new(Held(
                    Arc::new(Encoded::new(Arc::from(task.payload.as_slice()))),
                    Origin::Result,
                    Name::Borrowed("value"),
                    None,
                )),
            ),
            REMOTE_FUNCTION => {
                let key: [u8; 32] =
                    task.payload
                        .as_slice()
                        .try_into()
                        .map_err(|_| WireError::Decode {
                            what: "a held value's key".into(),
                            reason: format!("{} bytes instead of 32", task.payload.len()),
                        })?;
                (Label::Static(&"value"), Arc::new(Released(Key(key))))
            }
            crate::build::pick::GETITEM_FUNCTION => {
                let pick = crate::build::pick::Pick::decode(&task.payload)?;
                let picks = self
                    .tasks
                    .picks
                    .get(&pick.tag)
                    .ok_or_else(|| WireError::Decode {
                        what: format!("a part of a `{}`", pick.type_name),
                        reason: "the type is the output of no function given to rask::init".into(),
                    })?;
                (
                    Label::Static(&"getitem"),
                    Arc::new(crate::build::pick::Picked {
                        picks: *picks,
                        step: pick.step,
                    }),
                )
            }
            FAIL_FUNCTION => {
                let failure = rask_executor::decode_failure(&task.payload)?;
                (Label::Call, Arc::new(Replayed(Arc::new(failure))))
            }
            function => {
                let payload = Payload::decode(&task.payload)?;
                let entry = self.tasks.entries.get(function);
                let build = entry.and_then(|e| {
                    let build = if payload.fallible {
                        e.fallible.as_ref()
                    } else {
                        e.plain.as_ref()
                    };
                    Some((e.name, build?))
                });
                let (name, build) = build.ok_or_else(|| WireError::Unregistered {
                    function: function_path(function).to_owned(),
                })?;
                (Label::Static(name), build(&payload)?)
            }
        };
        // The key is not needed to run: the executor keeps each task's key.
        Ok(Arc::new(Node {
            mark: Default::default(),
            key: Key([0; 32]),
            label,
            deps: crate::build::node::Deps::None,
            call,
        }))
    }
}

/// The installed registry, if [`init`](crate::init) was called.
pub(crate) fn installed() -> Option<Arc<Resolver>> {
    REGISTRY.get().cloned()
}

/// Whether a worker can take parts of values of the type tagged `tag`
/// (rule 5).
pub(crate) fn picks_known(tag: u64) -> bool {
    REGISTRY
        .get()
        .is_some_and(|r| r.tasks.picks.contains_key(&tag))
}

/// Whether `function` can be sent to another process (rule 1).
pub(crate) fn check_registered(function: &str, fallible: bool) -> Result<(), WireError> {
    match REGISTRY.get() {
        Some(r) if r.tasks.has(function, fallible) => Ok(()),
        _ => Err(WireError::Unregistered {
            function: format!(
                "{}{}",
                function_path(function),
                if fallible { "?" } else { "" }
            ),
        }),
    }
}

/// One [`#[rask::task]`](crate::task) function's registration: adds it to
/// a list, as `tasks![f]` would (rule 6). Written by the attribute only.
#[doc(hidden)]
pub struct Registration(pub fn(Tasks) -> Tasks);

/// Every [`#[rask::task]`](crate::task) function of the program, gathered
/// by the linker (rule 6).
#[doc(hidden)]
#[linkme::distributed_slice]
pub static REGISTRATIONS: [Registration];

/// What the result cache knows of the function whose type is `id` (rule
/// 8): rask's operators, then every [`#[rask::task]`](crate::task)
/// function, gathered once (without [`init`](crate::init): a process that
/// never calls it still caches right).
pub(crate) fn recorded(id: TypeId) -> Recorded {
    static RECORDED: std::sync::LazyLock<HashMap<TypeId, Recorded>> =
        std::sync::LazyLock::new(|| {
            let mut tasks = crate::build::ops::builtins(Tasks::new());
            for recorded in tasks.recorded.values_mut() {
                recorded.version = Some(Version::Builtin);
            }
            let tasks = REGISTRATIONS.iter().fold(tasks, |t, r| (r.0)(t));
            tasks.recorded
        });
    RECORDED.get(&id).copied().unwrap_or_default()
}

/// Checks that every task behind `roots` can be sent to a cluster as far as
/// its function goes (rule 1): registered, and capturing nothing. Run
/// before a graph is handed to a cluster, so that such a graph is refused
/// where it is submitted rather than failing a task later. Arguments are
/// not encoded here; one that cannot travel still fails its task.
///
/// # Errors
///
/// [`Error::Unsendable`](crate::Error::Unsendable) for the first task found.
pub(crate) fn check_sendable(roots: &[Arc<Node>]) -> crate::Result<()> {
    fn check(node: &Arc<Node>) -> crate::Result<()> {
        node.call
            .sendable()
            .map_err(|reason| crate::Error::Unsendable {
                key: crate::build::delayed::TaskKey::new(node),
                reason,
            })
    }
    // A node without inputs is checked where it is met, once per edge to
    // it: a call on literals alone needs no set and no stack.
    fn meet<'a>(node: &'a Arc<Node>, stack: &mut Vec<&'a Arc<Node>>) -> crate::Result<()> {
        if node.deps.is_empty() {
            check(node)
        } else {
            stack.push(node);
            Ok(())
        }
    }
    let mut seen: std::collections::HashSet<
        rask_executor::Key,
        std::hash::BuildHasherDefault<crate::build::graph::KeyHash>,
    > = Default::default();
    let mut stack: Vec<&Arc<Node>> = Vec::new();
    for root in roots {
        meet(root, &mut stack)?;
    }
    while let Some(node) = stack.pop() {
        if !seen.insert(node.key) {
            continue;
        }
        check(node)?;
        for dep in node.deps.iter() {
            meet(dep, &mut stack)?;
        }
    }
    Ok(())
}

/// Installs the registry of the program: the built-in operators, then
/// `tasks`, then every [`Registration`] (rule 6). The first call wins.
pub(crate) fn install(tasks: Tasks) {
    let tasks = crate::build::ops::builtins(tasks);
    let tasks = REGISTRATIONS
        .iter()
        .fold(tasks, |tasks, registration| (registration.0)(tasks));
    let _ = REGISTRY.set(Arc::new(Resolver { tasks }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rask_executor::Registry as _;

    /// A worker holding a value of another type than a parameter's says
    /// so, as this process does; its encoding read as the parameter's type
    /// was another value (the `i64` −5 read as the `u64` 9).
    #[test]
    fn a_held_value_of_another_type_is_an_error_not_a_reading_of_its_bytes() {
        let mut held: Vec<Option<Value>> = vec![Some(Arc::new(-5i64))];
        let err = WireSlot::<u64>::One
            .extract(&mut Inputs::new(&mut held))
            .unwrap_err();
        assert!(
            err.message.contains("is not the `u64` expected"),
            "{}",
            err.message
        );
        let mut held: Vec<Option<Value>> = vec![Some(Arc::new(-5i64))];
        let right = WireSlot::<i64>::One.extract(&mut Inputs::new(&mut held));
        assert_eq!(right.unwrap(), -5);
    }

    fn add(a: i64, b: Vec<i64>) -> i64 {
        a + b.iter().sum::<i64>()
    }

    fn numbers() -> Vec<i64> {
        vec![1, 2, 3]
    }

    /// The address of the vector it was given.
    fn address(v: Arc<Vec<i64>>) -> usize {
        v.as_ptr() as usize
    }

    /// The op a worker builds for `d`, from its wire form.
    fn worker_op<T>(d: &crate::Delayed<T>) -> Arc<dyn Op> {
        let wire = rask_executor::Op::to_wire(&**d.node()).unwrap();
        installed().unwrap().resolve(&wire).unwrap()
    }

    fn pair(p: (i64, i64)) -> i64 {
        p.0 + p.1
    }

    /// Every test registers the same list: the first `init` wins.
    fn setup() {
        install(crate::tasks![add, numbers, address, pair]);
    }

    #[test]
    fn an_arc_parameter_shares_a_value_produced_in_this_process() {
        setup();
        let made = crate::delayed!(numbers());
        let d = crate::delayed!(address(&made));
        let op = worker_op(&d);
        // A worker holds the `Vec` the `numbers` task produced, typed.
        let vec = Arc::new(vec![1_i64, 2, 3]);
        let at = vec.as_ptr() as usize;
        let mut inputs: Vec<Option<Value>> = vec![Some(vec)];
        let out = op.run(&mut inputs).unwrap();
        assert_eq!(
            out.downcast_ref::<usize>(),
            Some(&at),
            "the vector was copied"
        );
        // Bytes from a peer still decode.
        let bytes = postcard::to_stdvec(&vec![4_i64]).unwrap();
        let mut inputs: Vec<Option<Value>> = vec![Some(Arc::new(Encoded::new(Arc::from(bytes))))];
        assert!(op.run(&mut inputs).is_ok());
    }

    #[test]
    fn fetched_bytes_are_decoded_once_for_arc_parameters_only() {
        setup();
        let made = crate::delayed!(numbers());
        let shares = crate::delayed!(address(&made));
        let shares = worker_op(&shares);
        let bytes = postcard::to_stdvec(&vec![4_i64, 5]).unwrap();
        let fetched = Arc::new(Encoded::new(Arc::from(bytes)));
        let run = |op: &Arc<dyn Op>| {
            let mut inputs: Vec<Option<Value>> = vec![Some(fetched.clone())];
            op.run(&mut inputs).unwrap()
        };
        // Two tasks given the same fetched value see one decoded vector.
        let first = run(&shares);
        assert!(fetched.decoded().is_some());
        let second = run(&shares);
        assert_eq!(
            first.downcast_ref::<usize>(),
            second.downcast_ref::<usize>()
        );

        // A parameter taken by value decodes its own copy and keeps none.
        let owned = Arc::new(Encoded::new(Arc::from(
            postcard::to_stdvec(&vec![4_i64, 5]).unwrap(),
        )));
        let d = crate::delayed!(add(1, made));
        let adds = worker_op(&d);
        let mut inputs: Vec<Option<Value>> = vec![Some(owned.clone())];
        let out = adds.run(&mut inputs).unwrap();
        assert_eq!(out.downcast_ref::<i64>(), Some(&10));
        assert!(owned.decoded().is_none());
    }

    #[test]
    fn a_task_survives_the_trip_through_bytes() {
        setup();
        let parts = vec![crate::value(1_i64), crate::value(2_i64)];
        let d = crate::delayed!(add(10, parts));
        let op = worker_op(&d);
        // Inputs arrive as bytes from elsewhere and as local values.
        let mut inputs: Vec<Option<Value>> = vec![
            Some(Arc::new(Encoded::new(Arc::from(
                postcard::to_stdvec(&1_i64).unwrap(),
            )))),
            Some(Arc::new(2_i64)),
        ];
        let out = op.run(&mut inputs).unwrap();
        assert_eq!(out.downcast_ref::<i64>(), Some(&13));
        assert_eq!(op.name(), "add");
    }

    /// A value a cluster holds, which must never be fetched here.
    struct Held7;

    impl rask_executor::RemoteValue for Held7 {
        fn key(&self) -> Key {
            Key([7; 32])
        }
        fn fetch(&self) -> Result<Arc<[u8]>, WireError> {
            panic!("a held value was fetched to be sent")
        }
    }

    #[test]
    fn a_value_held_by_a_cluster_travels_as_its_key() {
        setup();
        let value: Value = Arc::new(Remote(Arc::new(Held7)));
        let wire = value_task(&value).unwrap();
        assert_eq!(wire.function, REMOTE_FUNCTION);
        assert_eq!(wire.payload, vec![7; 32]);
        // Run only when the cluster no longer holds the key: a clear failure.
        let op = installed().unwrap().resolve(&wire).unwrap();
        let err = op.run(&mut []).unwrap_err();
        assert!(
            err.message.contains("no longer holds value 0707"),
            "{}",
            err.message
        );
        let bad = WireTask {
            function: REMOTE_FUNCTION.into(),
            payload: vec![1, 2],
        };
        assert!(matches!(
            installed().unwrap().resolve(&bad),
            Err(WireError::Decode { .. })
        ));
    }

    /// A task of `function` whose arguments are `args`, as another process
    /// may send it.
    fn task_of(function: &str, args: Vec<WireArg>) -> WireTask {
        WireTask {
            function: function.to_owned(),
            payload: Payload {
                fallible: false,
                args,
            }
            .encode()
            .unwrap(),
        }
    }

    #[test]
    fn counts_from_the_wire_are_not_trusted() {
        setup();
        let registry = installed().unwrap();
        fn id_of<F: 'static>(_: &F) -> String {
            function_id::<F>().unwrap().to_string()
        }
        let add = &id_of(&add);
        let one = WireArg::Literal(postcard::to_stdvec(&1_i64).unwrap());
        let inputs =
            || -> Vec<Option<Value>> { vec![Some(Arc::new(2_i64)), Some(Arc::new(3_i64))] };
        // The task's inputs are known only when it runs: it fails then,
        // before reading or allocating anything for the count.
        let list = |n: u32, holes: u32| {
            let head = postcard::to_stdvec(&u64::from(n)).unwrap();
            WireArg::Nested(vec![Piece::Bytes(head), Piece::Inputs(holes)])
        };
        let op = registry
            .resolve(&task_of(add, vec![one.clone(), list(2, u32::MAX)]))
            .unwrap();
        let mut given = inputs();
        let err = op.run(&mut given).unwrap_err();
        assert!(
            err.message
                .contains("takes 4294967295 task inputs, but only 2 are left"),
            "{}",
            err.message
        );
        assert!(given.iter().all(Option::is_some), "an input was taken");
        // Counts that overflow together are refused the same way.
        let many = WireArg::Nested(vec![Piece::Inputs(u32::MAX), Piece::Inputs(u32::MAX)]);
        let op = registry
            .resolve(&task_of(add, vec![one.clone(), many]))
            .unwrap();
        let mut given = inputs();
        assert!(op.run(&mut given).is_err());
        assert!(given.iter().all(Option::is_some), "an input was taken");
        let op = registry
            .resolve(&task_of(add, vec![one.clone(), list(3, 3)]))
            .unwrap();
        assert!(op.run(&mut inputs()).is_err());
        // A length that lies about the holes fails to decode, and reads no further.
        let op = registry
            .resolve(&task_of(add, vec![one.clone(), list(9, 2)]))
            .unwrap();
        assert!(op.run(&mut inputs()).is_err());
        // The right count runs.
        let op = registry
            .resolve(&task_of(add, vec![one, list(2, 2)]))
            .unwrap();
        let out = op.run(&mut inputs()).unwrap();
        assert_eq!(out.downcast_ref::<i64>(), Some(&6));

        // A template longer than the bound is refused at once.
        let long = WireArg::Nested(vec![Piece::Inputs(0); MAX_PIECES + 1]);
        let pair = &id_of(&pair);
        match registry.resolve(&task_of(pair, vec![long])) {
            Err(WireError::Decode { reason, .. }) => {
                assert!(reason.contains("pieces"), "{reason}")
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("an oversized template resolved"),
        }
        let op = registry
            .resolve(&task_of(
                pair,
                vec![WireArg::Nested(vec![Piece::Inputs(2)])],
            ))
            .unwrap();
        assert_eq!(
            op.run(&mut inputs()).unwrap().downcast_ref::<i64>(),
            Some(&5)
        );

        // A recorded failure of a kind that does not exist.
        let payload = postcard::to_stdvec(&([0u8; 32], "t", 9u8, "boom")).unwrap();
        let bad = WireTask {
            function: FAIL_FUNCTION.to_owned(),
            payload,
        };
        assert!(matches!(
            registry.resolve(&bad),
            Err(WireError::Decode { .. })
        ));
    }

    #[test]
    fn registering_a_function_again_changes_nothing() {
        // What `init_with` does for a function both listed and marked
        // (rule 6): one entry per function, each form kept once.
        fn half(x: i64) -> Result<i64, String> {
            Ok(x / 2)
        }
        fn id_of<F: 'static>(_: &F) -> String {
            function_id::<F>().unwrap().to_string()
        }
        let tasks = crate::tasks![add, half?, add, half?];
        assert_eq!(tasks.len(), 2);
        assert!(tasks.has(&id_of(&half), true));
        assert!(!tasks.has(&id_of(&half), false));
        assert!(tasks.has(&id_of(&add), false));
    }

    #[test]
    fn unregistered_functions_are_named() {
        fn lonely(x: i64) -> i64 {
            x
        }
        let d = crate::delayed!(lonely(1));
        let err = rask_executor::Op::to_wire(&**d.node()).unwrap_err();
        assert!(err.to_string().contains("lonely"), "{err}");
        assert!(err.to_string().contains("not registered"), "{err}");
    }
}
