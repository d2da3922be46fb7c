//! The node a [`Delayed`](crate::Delayed) points to, and how a typed call runs.
//!
//! A node is immutable once built: its key is derived from its inputs' keys,
//! which exist before it, so the graph of nodes reachable from a `Delayed` is
//! acyclic by construction.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use rask_executor::{Key, Op, OpError, Value, WireError, WireTask};

use crate::build::data::Data;

/// A task name: the function name for calls, or a user-chosen name.
pub(crate) type Name = Cow<'static, str>;

/// One task of a user graph.
pub(crate) struct Node {
    pub(crate) key: Key,
    /// Where its name is ([`Node::name`]).
    pub(crate) label: Label,
    pub(crate) deps: Deps,
    pub(crate) call: Arc<dyn Call>,
    /// This node's plan index in the lowering that last marked it
    /// (`build::graph::postorder_marked`), stamped with its epoch; before
    /// that, an estimate of its graph's size ([`Mark`] rule 3).
    pub(crate) mark: Mark,
}

// With its `Arc`'s two counts, a node takes 104 bytes: glibc's `malloc`
// serves that from a 112-byte chunk (at 120, a 128-byte one). Walking a graph
// of millions of nodes while lowering it reads them all.
const _: () = assert!(std::mem::size_of::<Node>() <= 88);

/// Where a node's name is, in 8 bytes: a name of its own (a 24-byte
/// [`Name`]) would make a node take a 128-byte allocation instead of 112,
/// and graphs of millions of nodes are walked while they are lowered.
#[derive(Clone, Copy)]
pub(crate) enum Label {
    /// A name known when the program was compiled: the function's name in
    /// `delayed!`, `getitem`.
    ///
    /// A node with inputs and this label has a key derived from its work
    /// and its inputs' keys, in order, or a fresh one (`Delayed::unique`):
    /// two such nodes share a key only if their inputs' keys are the same.
    /// Lowering counts on it (`graph::Marks::claim`). Names chosen at run
    /// time go with keys that are not derived so (`Delayed::named`, a
    /// hand-made graph's tasks): [`Label::Call`].
    Static(&'static &'static str),
    /// The name its call holds ([`Call::name`]): a name chosen at run time
    /// (`Delayed::named`, a held value's, a hand-made graph's task).
    Call,
}

impl Label {
    /// The name of a node with this label and `call`.
    pub(crate) fn name(self, call: &dyn Call) -> &str {
        match self {
            Label::Static(name) => name,
            Label::Call => call.name(),
        }
    }
}

/// The name of a task calling a function of type `F` that has no name in
/// the code (`Delayed::map`, `Client::map`): the last segment of the type's
/// path.
pub(crate) fn name_of_type<F: 'static>() -> &'static &'static str {
    // Asked per task built (`Delayed::map`): a thread's own map first, so
    // that threads building graphs do not meet at `intern`'s lock.
    thread_local! {
        static NAMES: std::cell::RefCell<crate::build::key::TypeMap<&'static &'static str>> =
            std::cell::RefCell::default();
    }
    let ty = std::any::TypeId::of::<F>();
    let named = |name| intern(short_name(name));
    NAMES
        .try_with(|names| {
            *names
                .borrow_mut()
                .entry(ty)
                .or_insert_with(|| named(std::any::type_name::<F>()))
        })
        .unwrap_or_else(|_| named(std::any::type_name::<F>()))
}

/// The last path segment of a type's or function's path.
// Split at the last `:` byte rather than the last `"::"`: a path has no
// lone `:`, so the segment is the same, and a byte search costs a few
// nanoseconds where a substring searcher is built per call.
fn short_name(path: &'static str) -> &'static str {
    path.rsplit(':').next().unwrap_or(path).trim()
}

/// `name` behind a `&'static` reference, for a [`Label::Static`]: one
/// reference per distinct name, made the first time it is asked for and
/// kept for the process, so they are as many as the program's functions.
pub(crate) fn intern(name: &'static str) -> &'static &'static str {
    type Names = std::collections::HashMap<&'static str, &'static &'static str>;
    static NAMES: std::sync::Mutex<Option<Names>> = std::sync::Mutex::new(None);
    let mut names = NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    names
        .get_or_insert_with(Names::new)
        .entry(name)
        .or_insert_with(|| Box::leak(Box::new(name)))
}

/// A node's index in the plan being lowered, so that lowering finds a node
/// it already emitted without a map from keys (`build::graph::postorder`).
///
/// Rules:
///
/// 1. Only the one lowering holding the process-wide marking token writes
///    marks; every other lowering (another thread, a nested computation)
///    meanwhile uses a key map and never reads them.
/// 2. Each lowering under the token has an epoch of its own, never used
///    before in the process (epochs count up from 1; once they run out,
///    lowering keeps to the key map). A mark is an index stamped with its
///    lowering's epoch, and reads as unset under any other epoch: so a mark
///    read under the token was set by this lowering, and no lowering has to
///    visit its nodes again afterwards to unset them.
/// 3. Under epoch 0, which no lowering has, a mark holds an estimate of how
///    many tasks lowering the node's graph makes ([`Mark::estimate`]): set
///    when the node is made, before anything else holds it, and on a
///    lowering's roots by the token holder once its walk is done. Lowering
///    sizes its lists by it, so a wrong estimate costs memory or a copy,
///    never a wrong plan.
pub(crate) struct Mark(std::sync::atomic::AtomicU64);

impl Mark {
    /// The mark of a node not lowered yet whose graph lowers to about
    /// `tasks` tasks (rule 3).
    pub(crate) fn estimating(tasks: u32) -> Mark {
        Mark(std::sync::atomic::AtomicU64::new(u64::from(tasks)))
    }

    /// The index set by the lowering of `epoch`, if any.
    pub(crate) fn get(&self, epoch: u32) -> Option<u32> {
        let raw = self.0.load(std::sync::atomic::Ordering::Relaxed);
        ((raw >> 32) as u32 == epoch).then_some(raw as u32)
    }

    /// Sets the index for the lowering of `epoch`; for the token holder
    /// only.
    pub(crate) fn set(&self, epoch: u32, index: u32) {
        let raw = (u64::from(epoch) << 32) | u64::from(index);
        self.0.store(raw, std::sync::atomic::Ordering::Relaxed);
    }

    /// About how many tasks lowering the node's graph makes (rule 3): at
    /// least 1, the node itself, when nothing better is known (a lowering
    /// left its index here, or the node was made without an estimate).
    pub(crate) fn estimate(&self) -> u32 {
        self.get(0).unwrap_or(1).max(1)
    }
}

/// Epoch 0 and no estimate (rule 3).
impl Default for Mark {
    fn default() -> Self {
        Mark::estimating(0)
    }
}

/// A node's inputs, in argument order. Most nodes have at most two, held in
/// the node itself: no allocation of their own, and one pointer to follow
/// from a node to an input, not two. (Two inline inputs make the node 8 bytes
/// larger, which its allocation had spare: 128 bytes either way, with the
/// node at 104.)
#[derive(Clone, Default)]
pub(crate) enum Deps {
    /// No input.
    #[default]
    None,
    /// One input.
    One(Arc<Node>),
    /// Two inputs.
    Two([Arc<Node>; 2]),
    /// Three or more.
    Many(Box<[Arc<Node>]>),
}

impl Deps {
    /// These inputs and `node` after them. Past two, `more` collects them
    /// all (the caller turns it into [`Deps::Many`] when done, see
    /// `From<Vec<Arc<Node>>>`).
    pub(crate) fn push(&mut self, node: Arc<Node>, more: &mut Vec<Arc<Node>>) {
        *self = match std::mem::take(self) {
            Deps::None if more.is_empty() => Deps::One(node),
            Deps::One(first) => Deps::Two([first, node]),
            Deps::Two([first, second]) => {
                more.extend([first, second, node]);
                Deps::None
            }
            Deps::None | Deps::Many(_) => {
                more.push(node);
                Deps::None
            }
        };
    }
}

impl std::ops::Deref for Deps {
    type Target = [Arc<Node>];

    fn deref(&self) -> &[Arc<Node>] {
        match self {
            Deps::None => &[],
            Deps::One(node) => std::slice::from_ref(node),
            Deps::Two(nodes) => nodes,
            Deps::Many(nodes) => nodes,
        }
    }
}

impl From<Vec<Arc<Node>>> for Deps {
    fn from(nodes: Vec<Arc<Node>>) -> Deps {
        if nodes.len() > 2 {
            return Deps::Many(nodes.into_boxed_slice());
        }
        let mut nodes = nodes.into_iter();
        match (nodes.next(), nodes.next()) {
            (Some(first), Some(second)) => Deps::Two([first, second]),
            (Some(node), None) => Deps::One(node),
            _ => Deps::None,
        }
    }
}

/// Frees a graph without one stack frame per level: a node whose last
/// reference goes away hands its inputs to a loop here instead of dropping
/// them recursively, so a chain of millions of nodes drops on any stack.
impl Drop for Node {
    /// Frees the graph below this node without recursion (a chain of a
    /// million nodes would overflow the stack), and quietly: a node's call
    /// holds the user's literal arguments, whose `Drop` may panic. One
    /// catch covers the whole walk while nothing panics; the node whose
    /// drop panicked was moved out of the walk already, so unwinding drops
    /// no other (a second panic would meet the first unwinding, and abort
    /// the process), and the walk goes on under a new catch
    /// (`rask_executor`'s dropping rule 3). This node's own call is
    /// dropped by whoever drops it.
    fn drop(&mut self) {
        /// The inputs of `node` when this was its last reference (they are
        /// then the loop's to free), else nothing.
        fn release(node: Arc<Node>) -> Deps {
            Arc::into_inner(node).map_or(Deps::None, |mut node| std::mem::take(&mut node.deps))
        }
        let mut stack: Vec<Arc<Node>> = Vec::new();
        let mut next = std::mem::take(&mut self.deps);
        let mut walk = || loop {
            next = match std::mem::take(&mut next) {
                // The common case, a chain: no stack needed.
                Deps::One(node) => release(node),
                // A tree: the first input waits, the second goes on.
                Deps::Two([first, second]) => {
                    stack.push(first);
                    release(second)
                }
                Deps::Many(nodes) => {
                    stack.extend(nodes.into_vec());
                    Deps::None
                }
                Deps::None => match stack.pop() {
                    Some(node) => release(node),
                    None => return,
                },
            };
        };
        while let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut walk)) {
            tracing::warn!(
                "dropping the arguments of a task no longer needed panicked: {} (ignored)",
                rask_executor::panic_message(&*payload)
            );
            rask_executor::drop_quietly(payload, "a panic's payload");
        }
    }
}

impl Node {
    /// Whether this node holds a value rather than calling a function.
    pub(crate) fn is_data(&self) -> bool {
        self.call.value().is_some()
    }

    /// Its name: the function's for a call, or the name it was given.
    pub(crate) fn name(&self) -> &str {
        self.label.name(&*self.call)
    }

    /// [`Node::name`] as a [`Name`], which copies only a name chosen at run
    /// time.
    pub(crate) fn name_owned(&self) -> Name {
        match self.label {
            Label::Static(name) => Name::Borrowed(name),
            Label::Call => Name::Owned(self.call.name().to_owned()),
        }
    }

    /// A copy of this node under another key (same work, name and inputs).
    pub(crate) fn rekeyed(&self, key: Key) -> Node {
        Node {
            key,
            label: self.label,
            deps: self.deps.clone(),
            call: self.call.clone(),
            mark: Mark::default(),
        }
    }
}

impl Op for Node {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        self.call.run(inputs)
    }

    fn name(&self) -> &str {
        Node::name(self)
    }

    fn key(&self) -> Option<&Key> {
        Some(&self.key)
    }

    fn timeout(&self) -> Option<std::time::Duration> {
        self.call.timeout()
    }

    fn retries(&self) -> u32 {
        self.call.retries()
    }

    fn annotations(&self) -> Option<&rask_executor::Annotations> {
        self.call.annotations()
    }

    fn is_work(&self) -> bool {
        self.call.value().is_none() && !self.call.is_future()
    }

    fn to_wire(&self) -> Result<WireTask, WireError> {
        self.call.to_wire().map_err(|e| match e {
            WireError::NotSerializable { what } => WireError::NotSerializable {
                what: format!("{what} (task `{}`)", self.name()),
            },
            other => other,
        })
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.name(), self.key.short())
    }
}

/// The type-erased work of a node.
pub(crate) trait Call: Send + Sync + 'static {
    /// Runs the work on the values of the node's dependencies, in order.
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError>;

    /// The held value, for data nodes.
    fn value(&self) -> Option<&Value> {
        None
    }

    /// The name of a node labelled [`Label::Call`]: calls that such nodes
    /// hold tell theirs (a node labelled [`Label::Static`] never asks).
    fn name(&self) -> &str {
        "unnamed"
    }

    /// Whether a node without inputs holding this call may have a key
    /// derived from inputs it does not hold: it stands in for another
    /// node's work under that node's key (a future, a computed value), or
    /// it cannot tell. Lowering then checks every node for a repeated key
    /// (`graph::Marks::claim`). Calls whose nodes have keys of their own
    /// (a wrapped value, a hand-made graph's task) say `false`.
    fn stands_in(&self) -> bool {
        true
    }

    /// Called on the caller's thread before the node's graph is handed to an
    /// executor: a node standing for a future waits for it here, so that no
    /// executor thread blocks on it.
    fn prepare(&self) {}

    /// Whether the node stands for a future (its graph keeps the future, and
    /// so its result, alive).
    fn is_future(&self) -> bool {
        false
    }

    /// The type of the value this call returns, when it is known here (a
    /// call built by `delayed!`, a part picked from a value, a hand-written
    /// body): [`Graph::delayed`](crate::Graph::delayed) checks the type it
    /// is asked for against it.
    fn output_type(&self) -> Option<std::any::TypeId> {
        None
    }

    /// The [type tag](crate::build::key::type_tag) of the value this call
    /// returns, when it is known: its [`output_type`](Call::output_type)'s,
    /// or, for a task that travelled, the one it was sent with.
    fn output_tag(&self) -> Option<u64> {
        self.output_type().map(crate::build::key::tag_of)
    }

    /// The future a node standing for one holds (see
    /// [`is_future`](Call::is_future)), as the layer of futures keeps it
    /// (a type this layer does not name): a client submitting the node's
    /// graph waits for it without blocking a thread when it is another
    /// client's (`futures::client` rule 3).
    fn future(&self) -> Option<&(dyn std::any::Any + Send + Sync)> {
        None
    }

    /// The work as a registered function and bytes, for another process.
    fn to_wire(&self) -> Result<WireTask, WireError> {
        Err(WireError::NotSerializable {
            what: "a hand-written task".into(),
        })
    }

    /// As [`to_wire`](Call::to_wire), for a graph that travels inside a
    /// task's argument (`travel.rs`): a future's value goes as its bytes,
    /// not as a reference to a key its cluster holds for this client,
    /// which the task's own connection does not hold.
    fn to_travelling_wire(&self) -> Result<WireTask, WireError> {
        self.to_wire()
    }

    /// Whether [`to_wire`](Call::to_wire) can succeed as far as the function
    /// goes, without encoding anything: for a call, its function is
    /// registered and captures nothing (`registry::check_sendable`).
    fn sendable(&self) -> Result<(), WireError> {
        Ok(())
    }

    /// How long the work may run (see `Delayed::timeout`).
    fn timeout(&self) -> Option<std::time::Duration> {
        None
    }

    /// How many times the work runs again when it fails (see
    /// `Delayed::retries`).
    fn retries(&self) -> u32 {
        0
    }

    /// What decides the work's value besides its key, for the result cache
    /// (`run::cache`).
    fn code(&self) -> Code {
        Code::Opaque
    }

    /// Whether the work was marked cached (`Delayed::cache`) or never to be
    /// cached (`Delayed::unique`); `None`: the defaults decide.
    fn cache_mark(&self) -> Option<bool> {
        None
    }

    /// Its priority, resources and workers (see `Delayed::annotate`).
    fn annotations(&self) -> Option<&rask_executor::Annotations> {
        None
    }

    /// For a call of a capturing closure, its key without the nonce
    /// (`key.rs` rule 5): what a name given to it is hashed over.
    fn stable_key(&self) -> Option<Key> {
        None
    }

    /// Adds the shapes of its literal arguments' types, for the result
    /// cache (`cache.rs`).
    fn literals(&self, _: &mut crate::build::args::Shapes) {}
}

/// What decides a node's value besides its key, for the result cache.
#[derive(Clone, Copy)]
pub(crate) enum Code {
    /// Its key says everything: the hash of a literal's bytes, or a name
    /// the user gave to a value.
    Literal,
    /// A call of a function.
    Call(Function),
    /// Not known here (a persisted result, a future, a hand-written task):
    /// trusted only within this build of the program.
    Opaque,
}

/// A called function, as the result cache sees it.
#[derive(Clone, Copy)]
pub(crate) struct Function {
    /// Its type, which the registry maps to a recorded version.
    pub(crate) id: std::any::TypeId,
    /// Whether it captures nothing: only then may its calls be cached.
    pub(crate) pure: bool,
    /// Whether it is rask's own (a part of a value): versioned by rask's
    /// version, not the registry.
    pub(crate) builtin: bool,
    /// Its output type's name, written in a cache entry's header.
    pub(crate) output: &'static str,
    /// Decodes a cache entry's bytes into its output value.
    pub(crate) decode: fn(&[u8]) -> Result<Value, String>,
    /// Its output type's serde shape ([`shape`](crate::build::data::shape)).
    pub(crate) shape: fn() -> Option<[u8; 32]>,
}

impl Function {
    /// The function `F` returning `T`.
    pub(crate) fn of<F: 'static, T: Data>() -> Function {
        Function {
            id: std::any::TypeId::of::<F>(),
            pure: crate::build::key::is_pure_fn::<F>(),
            builtin: false,
            output: std::any::type_name::<T>(),
            shape: crate::build::data::shape::<T>,
            decode: |bytes| match postcard::take_from_bytes::<T>(bytes) {
                Ok((value, [])) => Ok(Arc::new(value) as Value),
                Ok((_, rest)) => Err(format!("{} bytes left over", rest.len())),
                Err(e) => Err(e.to_string()),
            },
        }
    }
}

/// Another call with what `Delayed`'s builders add to it: limits
/// (`timeout`, `retries`), a result-cache mark (`cache`, `unique`),
/// annotations (`priority`, `resources`, `workers`) or a name (`named`).
/// The same work; whatever is not set here is the wrapped call's.
pub(crate) struct Decorated {
    call: Arc<dyn Call>,
    /// The name of the node holding it, labelled [`Label::Call`]; or of a
    /// limited node, for [`rask_executor::abandoned`].
    name: Option<Name>,
    /// The timeout and retries, enforced by `run` itself, so they hold
    /// inside fused chains too.
    limits: Option<(Option<std::time::Duration>, u32)>,
    /// Marked cached (`true`) or never to be cached (`false`).
    cache: Option<bool>,
    annotations: Option<rask_executor::Annotations>,
    /// A capturing closure's key without its nonce ([`Call::stable_key`]).
    stable: Option<Key>,
}

impl Decorated {
    fn on(call: &Arc<dyn Call>) -> Decorated {
        Decorated {
            call: call.clone(),
            name: None,
            limits: None,
            cache: None,
            annotations: None,
            stable: None,
        }
    }

    /// A capturing closure's `call`, with its key without the nonce.
    pub(crate) fn stable(call: &Arc<dyn Call>, key: Key) -> Arc<dyn Call> {
        Arc::new(Decorated {
            stable: Some(key),
            ..Decorated::on(call)
        })
    }

    /// `call` with these limits, keeping those `call` already has.
    pub(crate) fn limited(
        call: &Arc<dyn Call>,
        timeout: Option<std::time::Duration>,
        retries: Option<u32>,
        name: Option<Name>,
    ) -> Arc<dyn Call> {
        let limits = (
            timeout.or(call.timeout()),
            retries.unwrap_or(call.retries()),
        );
        Arc::new(Decorated {
            limits: Some(limits),
            name,
            ..Decorated::on(call)
        })
    }

    /// `call` under `name`, for a node labelled [`Label::Call`].
    pub(crate) fn named(call: &Arc<dyn Call>, name: Name) -> Arc<dyn Call> {
        Arc::new(Decorated {
            name: Some(name),
            ..Decorated::on(call)
        })
    }

    /// `call` marked for the result cache (`true`) or kept out of it.
    pub(crate) fn marked(call: &Arc<dyn Call>, cache: bool) -> Arc<dyn Call> {
        Arc::new(Decorated {
            cache: Some(cache),
            ..Decorated::on(call)
        })
    }

    /// `call` with `annotations` in place of any it had.
    pub(crate) fn annotated(
        call: &Arc<dyn Call>,
        annotations: rask_executor::Annotations,
    ) -> Arc<dyn Call> {
        Arc::new(Decorated {
            annotations: Some(annotations),
            ..Decorated::on(call)
        })
    }
}

impl Call for Decorated {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        let Some((timeout, retries)) = self.limits else {
            return self.call.run(inputs);
        };
        let call = self.call.clone();
        let run: rask_executor::Run =
            Arc::new(move |inputs: &mut [Option<Value>]| call.run(inputs));
        rask_executor::run_limited(self.name(), timeout, retries, &run, inputs)
    }
    fn value(&self) -> Option<&Value> {
        self.call.value()
    }
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_else(|| self.call.name())
    }
    fn stands_in(&self) -> bool {
        self.call.stands_in()
    }
    fn prepare(&self) {
        self.call.prepare()
    }
    fn is_future(&self) -> bool {
        self.call.is_future()
    }
    fn future(&self) -> Option<&(dyn std::any::Any + Send + Sync)> {
        self.call.future()
    }
    fn output_type(&self) -> Option<std::any::TypeId> {
        self.call.output_type()
    }
    fn output_tag(&self) -> Option<u64> {
        self.call.output_tag()
    }
    fn to_wire(&self) -> Result<WireTask, WireError> {
        self.call.to_wire()
    }
    fn to_travelling_wire(&self) -> Result<WireTask, WireError> {
        self.call.to_travelling_wire()
    }
    fn sendable(&self) -> Result<(), WireError> {
        self.call.sendable()
    }
    fn timeout(&self) -> Option<std::time::Duration> {
        self.limits.map_or_else(|| self.call.timeout(), |(t, _)| t)
    }
    fn retries(&self) -> u32 {
        self.limits.map_or_else(|| self.call.retries(), |(_, r)| r)
    }
    fn code(&self) -> Code {
        self.call.code()
    }
    fn cache_mark(&self) -> Option<bool> {
        self.cache.or_else(|| self.call.cache_mark())
    }
    fn annotations(&self) -> Option<&rask_executor::Annotations> {
        self.annotations
            .as_ref()
            .or_else(|| self.call.annotations())
    }
    fn literals(&self, shapes: &mut crate::build::args::Shapes) {
        self.call.literals(shapes)
    }
    fn stable_key(&self) -> Option<Key> {
        // A named node's key is its name's over the work's: stable already.
        // Unique work (never cached) keeps its fresh key under any name.
        match (&self.name, self.cache) {
            (Some(_), _) | (_, Some(false)) => None,
            _ => self.stable.or_else(|| self.call.stable_key()),
        }
    }
}

/// A node that holds a value: a wrapped literal, or a result when it is
/// [`Origin::Result`]; and the node's name (it is labelled [`Label::Call`]).
pub(crate) struct Held(
    pub(crate) Value,
    pub(crate) Origin,
    pub(crate) Name,
    /// The type of the value the node stands for, when known: a result
    /// may be held as its bytes, or as a handle to a cluster's copy.
    pub(crate) Option<std::any::TypeId>,
);

/// Where a held value came from: the cache trusts a literal's key and its
/// type's shape to say what it is, and a computed result's only within
/// this build.
#[derive(Clone, Copy)]
pub(crate) enum Origin {
    /// A value wrapped by the user (`rask::value`, `value_named`), with
    /// what adds its type's shape to a [`Shapes`](crate::build::args::Shapes):
    /// its key holds its bytes, not how its type reads them.
    Literal(fn(&mut crate::build::args::Shapes)),
    /// A value computed by a task (a persisted result, a cache entry).
    Result,
}

impl Held {
    /// A replacement for `node` holding its value, loaded from elsewhere
    /// (the result cache).
    pub(crate) fn loaded(node: &Node, value: Value) -> Arc<Node> {
        Arc::new(Node {
            mark: Default::default(),
            key: node.key,
            label: Label::Call,
            deps: Deps::None,
            call: Arc::new(Held(
                value,
                Origin::Result,
                node.name_owned(),
                node.call.output_type(),
            )),
        })
    }
}

impl Call for Held {
    fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
        Ok(self.0.clone())
    }

    fn output_type(&self) -> Option<std::any::TypeId> {
        self.3
    }

    fn value(&self) -> Option<&Value> {
        Some(&self.0)
    }

    fn name(&self) -> &str {
        &self.2
    }

    fn stands_in(&self) -> bool {
        matches!(self.1, Origin::Result)
    }

    fn to_wire(&self) -> Result<WireTask, WireError> {
        crate::build::registry::value_task(&self.0)
    }

    fn code(&self) -> Code {
        match self.1 {
            Origin::Literal(_) => Code::Literal,
            Origin::Result => Code::Opaque,
        }
    }

    fn literals(&self, shapes: &mut crate::build::args::Shapes) {
        if let Origin::Literal(add) = self.1 {
            add(shapes);
        }
    }
}

/// A node that cannot run, e.g. because an argument could not be hashed.
/// Building the graph stays infallible; the error surfaces at compute time.
pub(crate) struct Broken(pub(crate) String);

impl Call for Broken {
    fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
        Err(OpError::failed(self.0.clone()))
    }

    fn to_wire(&self) -> Result<WireTask, WireError> {
        Err(WireError::NotSerializable {
            what: self.0.clone(),
        })
    }
}

/// Reads a task's inputs in argument order.
#[doc(hidden)]
pub struct Inputs<'a> {
    slots: std::slice::IterMut<'a, Option<Value>>,
}

impl<'a> Inputs<'a> {
    pub(crate) fn new(slots: &'a mut [Option<Value>]) -> Self {
        Inputs {
            slots: slots.iter_mut(),
        }
    }

    /// Inputs not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn next_value(&mut self) -> Result<Value, OpError> {
        self.slots
            .next()
            .and_then(Option::take)
            .ok_or_else(|| OpError::failed("a task received fewer inputs than it declared"))
    }

    /// The next input as a shared `Arc<T>` (no copy).
    pub(crate) fn shared<T: Data>(&mut self) -> Result<Arc<T>, OpError> {
        crate::build::data::shared::<T>(self.next_value()?).map_err(OpError::failed)
    }

    /// The next input by value: moved out when this task holds the last
    /// reference, cloned otherwise.
    pub(crate) fn owned<T: Data>(&mut self) -> Result<T, OpError> {
        let unique =
            crate::build::data::unique::<T>(self.next_value()?).map_err(OpError::failed)?;
        Ok(Arc::try_unwrap(unique).unwrap_or_else(|shared| (*shared).clone()))
    }
}

/// How a function's return value becomes a task outcome: returned as is
/// ([`Plain`]) or, for `delayed!(f(x)?)`, `Err` becomes a task failure
/// ([`Fallible`]).
#[doc(hidden)]
pub trait Returns<R>: Send + Sync + 'static {
    type Out: Data;
    /// Whether `Err` results fail the task (sent on the wire).
    const FALLIBLE: bool;
    fn finish(r: R) -> Result<Self::Out, OpError>;
}

/// The function returns its value directly.
#[doc(hidden)]
pub struct Plain;

/// The function returns `Result<T, E>`; `Err` fails the task.
#[doc(hidden)]
pub struct Fallible;

impl<R: Data> Returns<R> for Plain {
    type Out = R;
    const FALLIBLE: bool = false;
    #[inline]
    fn finish(r: R) -> Result<R, OpError> {
        Ok(r)
    }
}

/// `Err(e)` keeps `e` whole as the failure's cause (its type survives in
/// this process, its type name and message chain in another one).
impl<T: Data, E> Returns<Result<T, E>> for Fallible
where
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    type Out = T;
    const FALLIBLE: bool = true;
    #[inline]
    fn finish(r: Result<T, E>) -> Result<T, OpError> {
        r.map_err(|e| {
            OpError::caused(rask_executor::Cause::boxed(
                std::any::type_name::<E>(),
                e.into(),
            ))
        })
    }
}

/// A typed call: the function, one slot per argument, and how it returns.
pub(crate) struct Typed<F, M, S, Sig> {
    pub(crate) f: F,
    pub(crate) slots: S,
    pub(crate) _sig: PhantomData<fn() -> (M, Sig)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{delayed, Graph};

    fn inc(x: i64) -> i64 {
        x + 1
    }

    fn double(x: i64) -> i64 {
        2 * x
    }

    /// Each way of making a node keeps its name: in the node for names in
    /// the code, in its call for names chosen at run time, through every
    /// builder that wraps the call.
    #[test]
    fn every_kind_of_node_tells_its_name() {
        let call = delayed!(inc(1));
        let named = call.named("first");
        let mut graph = Graph::new();
        let raw = graph.insert_task("by-hand", &[], |_| 1_i64);
        let value = graph.insert_value("config", 2_i64);
        let tasks: Vec<(&str, String)> = vec![
            ("inc", call.name().into()),
            (
                "inc",
                call.cache()
                    .timeout(std::time::Duration::from_secs(1))
                    .name()
                    .into(),
            ),
            ("first", named.name().into()),
            ("first", named.unique().retries(2).name().into()),
            (
                "zeros",
                crate::value_named("zeros", vec![0u8; 4]).name().into(),
            ),
            ("value", crate::value(7_i64).name().into()),
            ("double", call.map(double).name().into()),
        ];
        for (want, got) in tasks {
            assert_eq!(got, want);
        }
        let names: Vec<(Key, String)> = graph.keys().map(|k| (k.key(), k.to_string())).collect();
        assert!(names[0].0 == raw && names[0].1.starts_with("by-hand-"));
        assert!(names[1].0 == value && names[1].1.starts_with("config-"));
    }

    /// One `&'static` reference per name, whoever asks and however often.
    #[test]
    fn a_name_is_interned_once() {
        let name = String::from("interned-once");
        let name: &'static str = Box::leak(name.into_boxed_str());
        assert!(std::ptr::eq(intern(name), intern("interned-once")));
        assert!(std::ptr::eq(name_of_type::<fn()>(), name_of_type::<fn()>()));
        assert_eq!(
            *name_of_type::<Typed<(), (), (), ()>>(),
            "Typed<(), (), (), ()>"
        );
    }
}
