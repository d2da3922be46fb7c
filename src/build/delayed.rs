//! `Delayed<T>`: a typed, cheap-to-clone handle to one task of a lazy graph.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::sync::Arc;

use rask_executor::{Key, Value};

use crate::build::data::Data;
use crate::build::key::{KeyHasher, Tag};
use crate::build::node::{Decorated, Deps, Held, Label, Name, Node, Origin};
use crate::build::pick::{Part, Step};
use rask_executor::OpError;

/// A lazy value of type `T`: a task and, through its inputs, the whole graph
/// needed to compute it.
///
/// Build one with [`delayed!`](crate::delayed!), [`value`], or operators on
/// other `Delayed`s. Nothing runs until [`compute`](Delayed::compute) (or
/// [`persist`](Delayed::persist)). Cloning is cheap (one reference count).
///
/// # Examples
///
/// ```
/// use rask::delayed;
///
/// fn inc(x: i64) -> i64 { x + 1 }
/// fn add(x: i64, y: i64) -> i64 { x + y }
///
/// let x = delayed!(inc(1));
/// let y = delayed!(inc(2));
/// let total = delayed!(add(&x, &y));
/// assert_eq!(total.compute()?, 5);
/// assert!(total.key().to_string().starts_with("add-"));
/// # Ok::<(), rask::Error>(())
/// ```
#[must_use = "a Delayed is lazy: nothing runs until it is computed"]
pub struct Delayed<T> {
    node: Arc<Node>,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Delayed<T> {
    fn clone(&self) -> Self {
        Delayed::from_node(self.node.clone())
    }
}

impl<T> fmt::Debug for Delayed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Delayed({}-{})", self.node.name(), self.node.key.short())
    }
}

/// Two `Delayed`s are equal when their keys are: they stand for the same work.
impl<T> PartialEq for Delayed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.node.key == other.node.key
    }
}

impl<T> Eq for Delayed<T> {}

impl<T> Hash for Delayed<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.node.key.hash(state)
    }
}

impl<T> Delayed<T> {
    pub(crate) fn from_node(node: Arc<Node>) -> Self {
        Delayed {
            node,
            _type: PhantomData,
        }
    }

    pub(crate) fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The task's key: a readable name plus the content hash.
    ///
    /// Same function, same inputs → same key, in this and every later run of
    /// the same binary (see [`key`](crate#keys) for what keeps keys stable).
    ///
    /// ```
    /// fn inc(x: i64) -> i64 { x + 1 }
    /// let a = rask::delayed!(inc(1));
    /// let b = rask::delayed!(inc(1));
    /// assert_eq!(a.key(), b.key());
    /// assert_ne!(a.key(), rask::delayed!(inc(2)).key());
    /// ```
    pub fn key(&self) -> TaskKey {
        TaskKey::new(&self.node)
    }

    /// The task's name: the function name, or the name given with
    /// [`named`](Delayed::named).
    pub fn name(&self) -> &str {
        self.node.name()
    }

    /// The same work under a name of your choice: the name shows in
    /// errors, progress bars, the dashboard and reports, and is part of the
    /// key, together with the work's own key. So distinct work never shares
    /// a key under one name (`load(1)` and `load(2)`, both named `data`,
    /// are two tasks with their own values, also in the result cache), and
    /// the same work under two names is two tasks.
    ///
    /// A call of a closure that captures variables has a fresh key for
    /// every call (what it captured is not hashed); named, its key is the
    /// name's over its function and arguments, so the name stands for what
    /// it captured: calls of one such closure named alike over the same
    /// arguments share one key, and over other arguments do not. Choose
    /// names that identify what was captured. The result cache keeps
    /// nothing that depends on such a call, named or not: another run may
    /// capture other values under the same name. Work made
    /// [`unique`](Delayed::unique) stays unique under any name.
    ///
    /// ```
    /// fn inc(x: i64) -> i64 { x + 1 }
    /// let a = rask::delayed!(inc(1)).named("first");
    /// assert_eq!(a.name(), "first");
    /// assert_eq!(a.key(), rask::delayed!(inc(1)).named("first").key());
    /// assert_ne!(a.key(), rask::delayed!(inc(5)).named("first").key());
    /// let b = rask::delayed!(inc(5)).named("first");
    /// assert_eq!(rask::compute((&a, &b))?, (2, 6));
    ///
    /// // A closure's captured state is not hashed: the name stands for it.
    /// let step = 10;
    /// let add_step = move |x: i64| x + step;
    /// let c = rask::delayed!(add_step(1)).named("add-10");
    /// assert_eq!(c.key(), rask::delayed!(add_step(1)).named("add-10").key());
    /// assert_ne!(c.key(), rask::delayed!(add_step(2)).named("add-10").key());
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn named(&self, name: impl Into<String>) -> Delayed<T> {
        let name: String = name.into();
        let of = self.node.call.stable_key().unwrap_or(self.node.key);
        let key = renamed_key(&name, &of);
        let mut node = self.node.rekeyed(key);
        node.label = Label::Call;
        node.call = Decorated::named(&self.node.call, Name::Owned(name));
        Delayed::from_node(Arc::new(node))
    }

    /// The same work under a fresh key that no other task has: an impure call
    /// (random numbers, reading a clock, side effects) that must not be
    /// shared with another identical-looking call.
    ///
    /// ```
    /// fn roll() -> u32 { 4 }
    /// let a = rask::delayed!(roll()).unique();
    /// let b = rask::delayed!(roll()).unique();
    /// assert_ne!(a.key(), b.key());
    /// ```
    pub fn unique(&self) -> Delayed<T> {
        let mut node = self
            .node
            .rekeyed(unique_key(self.node.name(), &self.node.key));
        // A fresh key never hits the result cache: nothing to write.
        node.call = Decorated::marked(&node.call, false);
        Delayed::from_node(Arc::new(node))
    }

    /// The same work with a timeout: when it runs longer than `timeout`,
    /// it fails with [`Error::Timeout`](crate::Error::Timeout) naming it,
    /// and its dependents do not run. Its key is another than the work's
    /// without a timeout: a graph holding both runs each as asked.
    ///
    /// On every executor the task then runs on a thread of its own, which
    /// the executor stops waiting for at the deadline (so a hung task never
    /// holds up the rest); from then on `rask::cancelled()` is true for it,
    /// and a task that ignores that keeps its thread until it returns.
    /// That thread costs tens of microseconds per run: timeouts are for
    /// tasks that take long enough to need one. The timeout times this
    /// task's own work, also when the optimizer fused it with others.
    ///
    /// ```
    /// use std::time::Duration;
    /// fn spin(ms: u64) -> u64 {
    ///     let start = std::time::Instant::now();
    ///     while !rask::cancelled() && start.elapsed() < Duration::from_millis(ms) {
    ///         std::thread::yield_now();
    ///     }
    ///     ms
    /// }
    /// let quick = rask::delayed!(spin(1)).timeout(Duration::from_secs(60));
    /// assert_eq!(quick.compute()?, 1);
    /// let slow = rask::delayed!(spin(60_000)).timeout(Duration::from_millis(20));
    /// assert!(matches!(slow.compute(), Err(rask::Error::Timeout { task: Some(_), .. })));
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn timeout(&self, timeout: std::time::Duration) -> Delayed<T> {
        self.limited(Some(timeout), None)
    }

    /// The same work, run again up to `retries` times when it fails (it
    /// returns an error, panics or times out; Dask's `retries=`): for
    /// transient failures such as a flaky network. Each attempt gets the
    /// same inputs. Its key is another than the work's without retries (a
    /// graph holding both runs each as asked); the retries repeat this
    /// task's own work, also when the optimizer fused it with others. On a
    /// cluster the worker that ran it runs it again. When every attempt failed, the error says how many there
    /// were ([`Error::Task`](crate::Error::Task)'s `attempts`).
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// static CALLS: AtomicU32 = AtomicU32::new(0);
    /// fn flaky(x: i64) -> Result<i64, String> {
    ///     match CALLS.fetch_add(1, Ordering::SeqCst) {
    ///         0 | 1 => Err("try again".into()),
    ///         _ => Ok(x),
    ///     }
    /// }
    /// assert_eq!(rask::delayed!(flaky(7)?).retries(2).compute()?, 7);
    /// assert_eq!(CALLS.load(Ordering::SeqCst), 3);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn retries(&self, retries: u32) -> Delayed<T> {
        self.limited(None, Some(retries))
    }

    /// The same work, its value kept in the result cache when one is
    /// configured ([`Config::cache`](crate::Config::cache), `RASK_CACHE`):
    /// a later run, in this process or another, that reaches the same work
    /// loads the value instead of running the task or anything it depends
    /// on. See [the `cache` module](crate::cache) for what an entry is
    /// keyed by and what invalidates it. The key does not change; without
    /// a configured cache this does nothing.
    ///
    /// ```
    /// # let dir = std::env::temp_dir().join(format!("rask-cache-doc-{}", std::process::id()));
    /// fn square(x: i64) -> i64 { x * x }
    /// let config = rask::Config::synchronous().cache(&dir);
    /// assert_eq!(rask::delayed!(square(7)).cache().compute_with(&config)?, 49);
    /// assert_eq!(rask::cache::info(&dir)?.entries, 1);
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn cache(&self) -> Delayed<T> {
        let mut node = self.node.rekeyed(self.node.key);
        node.call = Decorated::marked(&self.node.call, true);
        Delayed::from_node(Arc::new(node))
    }

    fn limited(&self, timeout: Option<std::time::Duration>, retries: Option<u32>) -> Delayed<T> {
        // Named as its node is (a static label's name is not the call's),
        // for the list of abandoned tasks.
        let name = Some(self.node.name_owned());
        let call = Decorated::limited(&self.node.call, timeout, retries, name);
        let mut node =
            self.node
                .rekeyed(limited_key(&self.node.key, call.timeout(), call.retries()));
        node.call = call;
        Delayed::from_node(Arc::new(node))
    }

    /// Renders this task and everything it depends on as Graphviz DOT.
    ///
    /// Function calls are ellipses, data (wrapped or persisted values) are
    /// boxes; labels are the short keys.
    ///
    /// ```
    /// fn inc(x: i64) -> i64 { x + 1 }
    /// let dot = rask::delayed!(inc(1)).to_dot();
    /// assert!(dot.starts_with("digraph"));
    /// assert!(dot.contains("inc-"));
    /// ```
    pub fn to_dot(&self) -> String {
        crate::build::graph::to_dot(std::slice::from_ref(&self.node))
    }
}

impl<T: Data> Delayed<T> {
    pub(crate) fn held(key: Key, name: Name, value: Value, origin: Origin) -> Delayed<T> {
        Delayed::from_node(Arc::new(Node {
            mark: Default::default(),
            key,
            label: Label::Call,
            deps: Deps::None,
            call: Arc::new(Held(value, origin, name, Some(std::any::TypeId::of::<T>()))),
        }))
    }
}

/// Wraps a plain value as a `Delayed`: a data node whose key is the hash of
/// the value's type and serialized bytes, computed once here (lists of
/// bytes or floats at blake3's pace, other data at serde's: figures in
/// `benches/README.md`, round eighteen).
///
/// Pass the result by reference to as many tasks as you like: the value is
/// hashed once and shared, not copied into each task. Data whose
/// serialization fails gets a key no other node has: it is never shared,
/// nor found in the result cache.
///
/// # Examples
///
/// ```
/// fn sum(v: Vec<i64>) -> i64 { v.iter().sum() }
/// let data = rask::value(vec![1, 2, 3]);
/// assert_eq!(rask::delayed!(sum(&data)).compute()?, 6);
/// # Ok::<(), rask::Error>(())
/// ```
pub fn value<T: Data>(value: T) -> Delayed<T> {
    wrap(Name::Borrowed("value"), value)
}

/// Wraps a plain value under a name you choose (shown in progress bars,
/// the dashboard and errors): [`value`] with a name. Its key is the hash
/// of the name, the value's type and its serialized bytes, so two values
/// under one name are two keys, everywhere — in a graph, on a cluster
/// shared with other clients, and in the result cache — and a name needs
/// to identify nothing.
///
/// # Examples
///
/// ```
/// fn len(v: Vec<u8>) -> usize { v.len() }
/// let zeros = rask::value_named("zeros-1M", vec![0u8; 1 << 20]);
/// assert_eq!(zeros.name(), "zeros-1M");
/// // Other data under the same name is another value.
/// let ones = rask::value_named("zeros-1M", vec![1u8; 10]);
/// assert_ne!(zeros.key(), ones.key());
/// assert_eq!(rask::delayed!(len(&ones)).compute()?, 10);
/// # Ok::<(), rask::Error>(())
/// ```
pub fn value_named<T: Data>(name: impl Into<String>, value: T) -> Delayed<T> {
    wrap(Name::Owned(name.into()), value)
}

/// A value under `name`, keyed by the name, its type and its encoding
/// (`key.rs` rule 5); data that does not encode gets a key of its own.
fn wrap<T: Data>(name: Name, value: T) -> Delayed<T> {
    let mut h = KeyHasher::new(Tag::Data, &name, std::any::type_name::<T>());
    // Two types may print alike (two versions of one crate): the tag differs.
    h.type_id::<T>();
    let key = match h.literal_value(&value) {
        Ok(()) => h.finish(),
        // A working node that shares nothing (its key stands for no bytes).
        Err(_) => {
            let mut h = KeyHasher::new(Tag::Unique, &name, std::any::type_name::<T>());
            h.bytes(&crate::build::key::nonce());
            h.finish()
        }
    };
    Delayed::held(key, name, Arc::new(value), Origin::Literal(shape_of::<T>))
}

/// Adds `T`'s shape, for the result cache (`Origin::Literal`).
fn shape_of<T: Data>(shapes: &mut crate::build::args::Shapes) {
    shapes.add::<T>();
}

/// The key of the work of key `of` named `name` ([`Delayed::named`]).
fn renamed_key(name: &str, of: &Key) -> Key {
    let mut h = KeyHasher::new(Tag::Renamed, name, "");
    h.input(of);
    h.finish()
}

/// A key no other task has: of the task `name` over the task of key `of`,
/// with a nonce ([`Delayed::unique`]).
/// The key of the work keyed `of` under a timeout and retries (key rule
/// 1): another key than the work's, so that a graph holding both runs each
/// with its own limits.
fn limited_key(of: &Key, timeout: Option<std::time::Duration>, retries: u32) -> Key {
    let mut h = KeyHasher::new(Tag::Limited, "", "");
    h.input(of);
    match timeout {
        Some(t) => {
            h.bytes(&[1]);
            h.bytes(&t.as_nanos().to_le_bytes());
        }
        None => h.bytes(&[0]),
    }
    h.bytes(&retries.to_le_bytes());
    h.finish()
}

fn unique_key(name: &str, of: &Key) -> Key {
    let mut h = KeyHasher::new(Tag::Unique, name, "");
    h.input(of);
    h.bytes(&crate::build::key::nonce());
    h.finish()
}

/// The key a hand-assembled [`Graph`](crate::Graph) gives to a task or
/// value it adds under `name` ([`Graph::insert_task`](crate::Graph::insert_task),
/// [`Graph::insert_value`](crate::Graph::insert_value)): the name alone.
/// ([`value_named`] keys a value by its data too.)
///
/// ```
/// let mut g = rask::Graph::new();
/// assert_eq!(g.insert_value("config", 3_i64), rask::named_key("config"));
/// assert_ne!(rask::value_named("config", 3_i64).key().key(), rask::named_key("config"));
/// ```
pub fn named_key(name: &str) -> Key {
    KeyHasher::new(Tag::Named, name, "").finish()
}

/// A task's key with its name, printed as `name-1a2b3c4d`.
///
/// Equality and hashing use the key only.
#[derive(Clone)]
pub struct TaskKey {
    name: Arc<str>,
    key: Key,
}

impl TaskKey {
    pub(crate) fn new(node: &Node) -> Self {
        TaskKey {
            name: Arc::from(node.name()),
            key: node.key,
        }
    }

    pub(crate) fn from_parts(name: Arc<str>, key: Key) -> Self {
        TaskKey { name, key }
    }

    /// The content hash.
    pub fn key(&self) -> Key {
        self.key
    }

    /// The task name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl PartialEq for TaskKey {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for TaskKey {}

impl Hash for TaskKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key.hash(state)
    }
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.name, self.key.short())
    }
}

impl fmt::Debug for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskKey({self})")
    }
}

/// Builds a lazy call: `delayed!(f(a, b, ...))` is a [`Delayed`] of `f`'s
/// result; nothing runs until it is computed.
///
/// `f` is a function item or a closure bound to a name (its name is the
/// task's name). A closure that captures variables makes impure tasks: a
/// fresh key for every call (see [keys](crate#keys)). Each argument may be a plain value, a `Delayed` (or a
/// reference to one), or a collection of them; see the [argument
/// table](crate#arguments). Write `delayed!(f(a)?)` when `f` returns
/// `Result<T, E>` (any `E` that converts into `Box<dyn Error + Send + Sync>`:
/// an error type, a `String`, `anyhow::Error`): the `Delayed` is then of `T`,
/// and `Err(e)` fails the task with `e` as the error's source.
///
/// # Examples
///
/// ```
/// use rask::delayed;
///
/// fn add(x: i64, y: i64) -> i64 { x + y }
/// fn parse(s: String) -> Result<i64, std::num::ParseIntError> { s.parse() }
///
/// let n = delayed!(parse("41".to_string())?);
/// let total = delayed!(add(&n, 1));
/// assert_eq!(total.compute()?, 42);
///
/// let bad = delayed!(parse("x".to_string())?);
/// let err = bad.compute().unwrap_err();
/// // `{:#}` prints the task and its error; `source()` is the error itself.
/// assert!(format!("{err:#}").contains("invalid digit"));
/// # Ok::<(), rask::Error>(())
/// ```
#[macro_export]
macro_rules! delayed {
    ($($f:ident)::+ ( $($arg:expr),* $(,)? ) ?) => {
        $crate::__private::apply::<$crate::__private::Fallible, _, _, _, _>(
            &$crate::__last_segment!($($f)+), $($f)::+, ($($arg,)*),
        )
    };
    ($($f:ident)::+ ( $($arg:expr),* $(,)? )) => {
        $crate::__private::apply::<$crate::__private::Plain, _, _, _, _>(
            &$crate::__last_segment!($($f)+), $($f)::+, ($($arg,)*),
        )
    };
}

/// The last of a path's segments as a string literal, for [`delayed!`]: the
/// task's name.
#[doc(hidden)]
#[macro_export]
macro_rules! __last_segment {
    ($last:ident) => {
        stringify!($last)
    };
    ($first:ident $($rest:ident)+) => {
        $crate::__last_segment!($($rest)+)
    };
}

macro_rules! split {
    ([$($t:ident),+] $($i:tt)+) => {
        split!(@method ($($t,)+) [$($t),+] $($i)+);
    };
    (@method $w:ty [$($t:ident),+] $($i:tt)+) => {
        impl<$($t: Data),+> Delayed<$w> {
            /// Splits a tuple-valued task into one `Delayed` per element
            /// (Dask's `nout`). Each element is a small task that depends on
            /// this one; the tuple itself runs once. On a cluster the tuple
            /// type must be the output of a function given to
            /// [`init`](crate::init) (it is, when such a function made it).
            ///
            /// ```
            /// fn divmod(a: i64, b: i64) -> (i64, i64) { (a / b, a % b) }
            /// let (q, r) = rask::delayed!(divmod(17, 5)).split();
            /// assert_eq!(rask::compute((&q, &r))?, (3, 2));
            /// # Ok::<(), rask::Error>(())
            /// ```
            pub fn split(&self) -> ($(Delayed<$t>,)+) {
                ($(self.part(Step::Element($i), |w: $w, _| Ok(w.$i), |w, _| Ok(w.$i.clone())),)+)
            }
        }
    };
}

impl<W: Data> Delayed<W> {
    /// A task taking one part of this value (`pick.rs`); its key is this
    /// task's key and the step.
    fn part<P: Data>(
        &self,
        step: Step,
        take: fn(W, &Step) -> std::result::Result<P, OpError>,
        borrow: fn(&W, &Step) -> std::result::Result<P, OpError>,
    ) -> Delayed<P> {
        let mut h = KeyHasher::new(Tag::Item, "getitem", "");
        h.input(&self.node.key);
        match &step {
            // The element's number alone, as before parts of lists and maps.
            Step::Element(i) => h.bytes(&u64::from(*i).to_le_bytes()),
            other => h.bytes(&postcard::to_stdvec(other).expect("a step encodes")),
        }
        Delayed::from_node(Arc::new(Node {
            mark: Default::default(),
            key: h.finish(),
            label: Label::Static(&"getitem"),
            deps: Deps::One(self.node.clone()),
            call: Arc::new(Part::<W, P> {
                step,
                take,
                borrow,
                _types: PhantomData,
            }),
        }))
    }

    /// A task applying `f` to this value: `d.map(f)` is `delayed!(f(&d))`,
    /// for chains written left to right. `f` is a function item (or a
    /// closure: then named `{{closure}}`, where `delayed!` names it after
    /// its variable, so the two forms are two tasks, see
    /// [keys](crate#keys)); the task is named after it and runs on a
    /// cluster when `f` is given to
    /// [`init`](crate::init). For the elements of a list, a tuple or a map,
    /// see [`item`](Delayed::item) and [`split`](Delayed::split).
    ///
    /// ```
    /// fn load(n: i64) -> Vec<i64> { (1..=n).collect() }
    /// fn total(v: Vec<i64>) -> i64 { v.iter().sum() }
    /// fn double(x: i64) -> i64 { x * 2 }
    ///
    /// let t = rask::delayed!(load(4)).map(total).map(double);
    /// assert_eq!(t.compute()?, 20);
    /// assert_eq!(t.name(), "double");
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn map<F, U>(&self, f: F) -> Delayed<U>
    where
        F: Fn(W) -> U + Send + Sync + 'static,
        U: Data,
    {
        crate::build::args::apply::<crate::build::node::Plain, _, _, _, _>(
            crate::build::node::name_of_type::<F>(),
            f,
            (self,),
        )
    }
}

impl<T: Data> Delayed<Vec<T>> {
    /// The element at `index` of a list-valued task, as a task of its own
    /// (Dask's `x[i]`); it fails, naming the length, when the list is
    /// shorter. On a cluster the list type must be the output of a function
    /// given to [`init`](crate::init).
    ///
    /// # Examples
    ///
    /// ```
    /// fn squares(n: u64) -> Vec<u64> { (0..n).map(|i| i * i).collect() }
    /// let s = rask::delayed!(squares(5));
    /// assert_eq!(s.item(3).compute()?, 9);
    /// assert!(s.item(7).compute().is_err());
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn item(&self, index: usize) -> Delayed<T> {
        fn at<T: Clone>(v: &[T], step: &Step) -> std::result::Result<T, OpError> {
            let Step::Index(i) = step else {
                unreachable!("a list's step is an index")
            };
            usize::try_from(*i)
                .ok()
                .and_then(|i| v.get(i))
                .cloned()
                .ok_or_else(|| {
                    OpError::failed(format!(
                        "index {i} is out of range for a list of {}",
                        v.len()
                    ))
                })
        }
        self.part(
            Step::Index(index as u64),
            |mut v: Vec<T>, step| {
                let Step::Index(i) = step else {
                    unreachable!("a list's step is an index")
                };
                match usize::try_from(*i) {
                    Ok(i) if i < v.len() => Ok(v.swap_remove(i)),
                    _ => at(&v, step),
                }
            },
            |v, step| at(v, step),
        )
    }
}

macro_rules! map_item {
    ($map:ident $($bound:path),*) => {
        impl<K: Data $(+ $bound)*, V: Data> Delayed<std::collections::$map<K, V>> {
            /// The value under `key` of a map-valued task, as a task of its
            /// own (Dask's `x[key]`); it fails when the key is missing. On
            /// a cluster the map type must be the output of a function
            /// given to [`init`](crate::init).
            ///
            /// # Errors
            ///
            /// None here; a key that cannot be serialized makes a task that
            /// fails with that message.
            ///
            /// ```
            #[doc = concat!("use std::collections::", stringify!($map), ";")]
            #[doc = concat!("fn ages() -> ", stringify!($map), "<String, u32> {")]
            #[doc = concat!("    ", stringify!($map), "::from([(\"ada\".to_string(), 36)])")]
            /// }
            /// let a = rask::delayed!(ages());
            /// assert_eq!(a.item("ada".to_string()).compute()?, 36);
            /// assert!(a.item("bob".to_string()).compute().is_err());
            /// # Ok::<(), rask::Error>(())
            /// ```
            pub fn item(&self, key: K) -> Delayed<V> {
                fn get<K: Data $(+ $bound)*, V: Data>(
                    m: &std::collections::$map<K, V>,
                    step: &Step,
                ) -> std::result::Result<V, OpError> {
                    let Step::Key(bytes) = step else { unreachable!("a map's step is a key") };
                    let key: K = postcard::from_bytes(bytes)
                        .map_err(|e| OpError::failed(format!("could not decode the key: {e}")))?;
                    m.get(&key)
                        .cloned()
                        .ok_or_else(|| OpError::failed(format!("the key is not in the map ({} entries)", m.len())))
                }
                let bytes = match postcard::to_stdvec(&key) {
                    Ok(bytes) => bytes,
                    // Building stays infallible: the task fails instead.
                    Err(e) => {
                        return Delayed::from_node(Arc::new(Node {
                            mark: Default::default(),
                            // A key of its own, derived from its input's
                            // (`node::Label`).
                            key: unique_key("getitem", &self.node.key),
                            label: Label::Static(&"getitem"),
                            deps: Deps::One(self.node.clone()),
                            call: Arc::new(crate::build::node::Broken(format!(
                                "a map key of type `{}` could not be serialized: {e}",
                                std::any::type_name::<K>()
                            ))),
                        }))
                    }
                };
                self.part(
                    Step::Key(bytes),
                    |mut m: std::collections::$map<K, V>, step| {
                        let Step::Key(bytes) = step else { unreachable!("a map's step is a key") };
                        match postcard::from_bytes::<K>(bytes).ok().and_then(|k| m.remove(&k)) {
                            Some(v) => Ok(v),
                            None => get(&m, step),
                        }
                    },
                    |m, step| get(m, step),
                )
            }
        }
    };
}

map_item!(BTreeMap Ord);
map_item!(HashMap Eq, std::hash::Hash);

split!([A, B] 0 1);
split!([A, B, C] 0 1 2);
split!([A, B, C, D] 0 1 2 3);
split!([A, B, C, D, E] 0 1 2 3 4);
split!([A, B, C, D, E, F] 0 1 2 3 4 5);
