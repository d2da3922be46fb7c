//! Running graphs: lowering, optimizing, dispatch to the executor, collecting
//! outputs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use rask_executor::{drop_each_quietly, drop_quietly, FailureKind, Key, Outcome, Reporter, Value};

use crate::build::data::Data;
use crate::build::delayed::Delayed;
use crate::build::graph::Graph;
use crate::build::node::Node;
use crate::plan::explain::{explain_roots, Explain};
use crate::plan::Options;
use crate::run::backend::Backend;
use crate::run::config::Config;
use crate::run::progress::{Bar, Screen};
use crate::{Error, Result};

/// The tasks a [`Compute`] value asks for, in order.
#[doc(hidden)]
#[derive(Default)]
pub struct Roots(pub(crate) Vec<Arc<Node>>);

/// Something that can be computed: a `Delayed`, a reference to one, a `Vec`
/// or slice of them, or a tuple of any of these.
///
/// Implemented by rask; see [`compute`].
pub trait Compute {
    /// What computing it returns.
    type Output;
    #[doc(hidden)]
    fn roots(&self, out: &mut Roots);
    #[doc(hidden)]
    fn assemble(&self, values: &mut std::vec::IntoIter<Value>) -> Result<Self::Output>;
}

impl<C: Compute> Compute for Vec<C> {
    type Output = Vec<C::Output>;
    fn roots(&self, out: &mut Roots) {
        self.as_slice().roots(out)
    }
    fn assemble(&self, values: &mut std::vec::IntoIter<Value>) -> Result<Self::Output> {
        self.as_slice().assemble(values)
    }
}

impl<C: Compute> Compute for &[C] {
    type Output = Vec<C::Output>;
    fn roots(&self, out: &mut Roots) {
        for c in self.iter() {
            c.roots(out);
        }
    }
    fn assemble(&self, values: &mut std::vec::IntoIter<Value>) -> Result<Self::Output> {
        self.iter().map(|c| c.assemble(values)).collect()
    }
}

impl<C: Compute> Compute for &Vec<C> {
    type Output = Vec<C::Output>;
    fn roots(&self, out: &mut Roots) {
        self.as_slice().roots(out)
    }
    fn assemble(&self, values: &mut std::vec::IntoIter<Value>) -> Result<Self::Output> {
        self.as_slice().assemble(values)
    }
}

macro_rules! tuple_compute {
    ($($t:ident $i:tt),+) => {
        impl<$($t: Compute),+> Compute for ($($t,)+) {
            type Output = ($($t::Output,)+);
            fn roots(&self, out: &mut Roots) {
                $(self.$i.roots(out);)+
            }
            fn assemble(&self, values: &mut std::vec::IntoIter<Value>) -> Result<Self::Output> {
                Ok(($(self.$i.assemble(values)?,)+))
            }
        }
    };
}

tuple_compute!(A 0);
tuple_compute!(A 0, B 1);
tuple_compute!(A 0, B 1, C 2);
tuple_compute!(A 0, B 1, C 2, D 3);
tuple_compute!(A 0, B 1, C 2, D 3, E 4);
tuple_compute!(A 0, B 1, C 2, D 3, E 4, F 5);

/// Computes several outputs in one graph: nodes they share run once.
///
/// # Errors
///
/// The first task failure (naming the failed task), or a configuration error.
///
/// # Examples
///
/// ```
/// use rask::delayed;
/// fn inc(x: i64) -> i64 { x + 1 }
/// fn add(x: i64, y: i64) -> i64 { x + y }
///
/// let x = delayed!(inc(1));
/// let total = delayed!(add(&x, 10));
/// let (a, t) = rask::compute((&x, &total))?;   // `x` runs once
/// assert_eq!((a, t), (2, 12));
/// let all = rask::compute(vec![x.clone(), total.clone()])?;
/// assert_eq!(all, vec![2, 12]);
/// # Ok::<(), rask::Error>(())
/// ```
pub fn compute<C: Compute>(what: C) -> Result<C::Output> {
    compute_with(what, &Config::default())
}

/// [`compute`] with an explicit configuration.
///
/// # Errors
///
/// As [`compute`].
pub fn compute_with<C: Compute>(what: C, config: &Config) -> Result<C::Output> {
    let mut roots = Roots::default();
    what.roots(&mut roots);
    let mut values = run(&roots.0, config)?.into_iter();
    let assembled = what.assemble(&mut values);
    // Left over when a value had the wrong type: dropped quietly (a
    // user's `Drop` may panic; `rask_executor::drop_quietly`).
    drop_each_quietly(values, "a result of compute");
    assembled
}

/// Lowers and optimizes `what` as [`compute_with`]
/// would, without running anything (nor waiting for futures in the graph),
/// and returns the plan for inspection.
///
/// Optimization follows `config` ([`Config::optimize`]), so comparing the
/// result with optimization on and off shows what it did. For a cluster
/// (`local:N`, `tcp://…`, `sim-cluster:…`), the plan is the one sent there, where work the
/// scheduler must see alone stays alone, with nothing connected. The
/// result cache is not looked at: tasks it would answer are shown as
/// tasks.
///
/// # Errors
///
/// A configuration error when `RASK_OPTIMIZE` or the executor setting
/// (`RASK_SCHEDULER`) holds an unknown value.
///
/// # Examples
///
/// ```
/// use rask::{delayed, Config};
/// fn inc(x: i64) -> i64 { x + 1 }
///
/// let mut x = delayed!(inc(0));
/// for _ in 1..100 {
///     x = delayed!(inc(&x));
/// }
/// let plan = rask::explain(&x, &Config::new())?;
/// assert_eq!((plan.graph_len(), plan.len()), (100, 1)); // the chain is fused
/// let task = plan.tasks().next().unwrap();
/// assert_eq!((task.name(), task.size()), ("inc…inc(100)", 100));
/// assert_eq!(plan.outputs().collect::<Vec<_>>(), [x.key().key()]);
///
/// let plain = rask::explain(&x, &Config::new().optimize(false))?;
/// assert_eq!(plain.len(), 100); // one task per node
/// # Ok::<(), rask::Error>(())
/// ```
pub fn explain<C: Compute>(what: C, config: &Config) -> Result<Explain> {
    let mut roots = Roots::default();
    what.roots(&mut roots);
    Ok(explain_roots(&roots.0, &shown_options(config)?))
}

/// The options `run` plans with for `config`, for showing its plan
/// ([`explain`], [`Delayed::plan_dot`]), with nothing connected: remote
/// for a cluster, simulated or not, as `run` plans for a remote backend.
fn shown_options(config: &Config) -> Result<Options> {
    let mut options = options(config)?;
    options.remote = config.resolve()?.plans_remotely();
    Ok(options)
}

/// Every pass when `config` resolves to optimizing, none otherwise.
///
/// # Errors
///
/// As [`Config::resolve_optimize`].
pub(crate) fn options(config: &Config) -> Result<Options> {
    Ok(if config.resolve_optimize()? {
        Options::all()
    } else {
        Options::none()
    })
}

impl<T: Data> Delayed<T> {
    /// Runs the graph on the configured executor and returns the value.
    ///
    /// # Errors
    ///
    /// [`Error::Task`] when a task this value depends on
    /// returned an error or panicked (naming that task), or a configuration
    /// error when `RASK_SCHEDULER` names no usable executor.
    ///
    /// ```
    /// fn inc(x: i64) -> i64 { x + 1 }
    /// assert_eq!(rask::delayed!(inc(41)).compute()?, 42);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn compute(&self) -> Result<T> {
        self.compute_with(&Config::default())
    }

    /// Like [`compute`](Delayed::compute), with an explicit configuration
    /// that takes precedence over scoped settings and the environment.
    ///
    /// ```
    /// use rask::Config;
    /// fn inc(x: i64) -> i64 { x + 1 }
    /// assert_eq!(rask::delayed!(inc(1)).compute_with(&Config::synchronous())?, 2);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn compute_with(&self, config: &Config) -> Result<T> {
        compute_with(self, config)
    }
}

impl<T> Delayed<T> {
    /// Renders the plan an executor would run for this value as Graphviz
    /// DOT: the graph after optimization, as `config` sets it, and for a
    /// cluster the plan sent there (see [`explain`] for the plan itself).
    /// Fused tasks are
    /// labelled with the names of the tasks they run.
    ///
    /// # Errors
    ///
    /// A configuration error when `RASK_OPTIMIZE` holds an unknown value.
    ///
    /// ```
    /// use rask::Config;
    /// fn inc(x: i64) -> i64 { x + 1 }
    /// let x = rask::delayed!(inc(rask::delayed!(inc(rask::delayed!(inc(1))))));
    /// let dot = x.plan_dot(&Config::new())?;
    /// assert!(dot.contains("inc+inc+inc-"));
    /// let plain = x.plan_dot(&Config::new().optimize(false))?;
    /// assert_eq!(plain.matches("label=").count(), 3);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn plan_dot(&self, config: &Config) -> Result<String> {
        let roots = std::slice::from_ref(self.node());
        Ok(explain_roots(roots, &shown_options(config)?).to_dot())
    }
}

impl<T: Data> Compute for &Delayed<T> {
    type Output = T;
    fn roots(&self, out: &mut Roots) {
        out.0.push(self.node().clone());
    }
    fn assemble(&self, values: &mut std::vec::IntoIter<Value>) -> Result<T> {
        take::<T>(values)
    }
}

impl<T: Data> Compute for Delayed<T> {
    type Output = T;
    fn roots(&self, out: &mut Roots) {
        out.0.push(self.node().clone());
    }
    fn assemble(&self, values: &mut std::vec::IntoIter<Value>) -> Result<T> {
        take::<T>(values)
    }
}

impl Graph {
    /// Computes the task with this key on the configured executor.
    ///
    /// # Errors
    ///
    /// As [`delayed`](Graph::delayed), then as [`Delayed::compute`].
    pub fn compute<T: Data>(&self, key: Key) -> Result<T> {
        self.compute_with(key, &Config::default())
    }

    /// [`compute`](Graph::compute) with an explicit configuration.
    ///
    /// # Errors
    ///
    /// As [`compute`](Graph::compute).
    pub fn compute_with<T: Data>(&self, key: Key, config: &Config) -> Result<T> {
        self.delayed::<T>(key)?.compute_with(config)
    }
}

/// Runs the graph behind `roots`, returning one value per root.
pub(crate) fn run(roots: &[Arc<Node>], config: &Config) -> Result<Vec<Value>> {
    run_on(roots, config, Screen::stderr())
}

/// [`run`], its progress bar (if `config` asks for one) drawn on `screen`.
pub(crate) fn run_on(roots: &[Arc<Node>], config: &Config, screen: &Screen) -> Result<Vec<Value>> {
    let kind = config.resolve()?;
    let span = tracing::info_span!("compute", executor = %kind, tasks = tracing::field::Empty);
    let _entered = span.enter();
    // Every setting is read before an executor is started, so that a bad
    // one is refused whatever the executor. Only a client's waits use the
    // spin switch (`Client::with_config`), but it is read here too, so that
    // a bad `RASK_SPIN` is not ignored unless a client is made.
    let mut options = options(config)?;
    config.resolve_spin()?;
    let cache_settings = config.resolve_cache()?;
    let progress = config.resolve_progress()?;
    // A thread pool waits for the plan: one that runs a task at a time
    // needs none (`Backend::for_waiting`).
    let early = Backend::before_planning(&kind)?;
    if kind.plans_remotely() {
        crate::build::registry::check_sendable(roots)?;
        // Fused tasks travel as one wire task each (`plan::fuse`, "On a
        // cluster"); what the cluster must see alone stays alone.
        options.remote = true;
    }
    // Cached tasks: hits replace what they stand for, misses become extra
    // outputs, written as they arrive (`cache` rules 1, 2).
    let lookup = cache_settings.map(|settings| crate::run::cache::Lookup::new(roots, &settings));
    let all_roots: Vec<Arc<Node>>;
    // Output slot → the cached task written from it.
    let mut writes: HashMap<usize, usize> = HashMap::new();
    let planned = match &lookup {
        Some(lookup) if !lookup.writes.is_empty() => {
            let (outputs, slots) = lookup.outputs(roots);
            all_roots = outputs;
            writes.extend(slots.into_iter().enumerate().map(|(i, slot)| (slot, i)));
            &all_roots[..]
        }
        _ => roots,
    };
    // Waits for the futures the graph depends on first (`prepare`), so
    // that no executor thread ever blocks on one.
    // The cut is repeatable: a cache lookup, and `prepare`, which waits for
    // a future once and returns at once after.
    let plan = crate::plan::plan(
        planned,
        &options,
        crate::plan::Asks::Repeatable,
        |node| {
            if let Some((_, value)) = lookup.as_ref().and_then(|l| l.hits.get(&node.key)) {
                return Some(crate::build::node::Held::loaded(node, value.clone()));
            }
            node.call.prepare();
            None
        },
        None,
    );
    span.record("tasks", plan.len());
    let backend = match early {
        Some(backend) => backend,
        None => Backend::for_waiting(&kind, &plan)?,
    };
    // Finished, however the run ends, when it is dropped.
    let mut bar = progress.then(|| {
        let work = plan
            .tasks()
            .iter()
            .zip(plan.keys())
            .filter(|(t, _)| t.op().is_work());
        Bar::start_on(
            screen,
            plan.id(),
            work.map(|(t, key)| (*key, t.op().name())),
        )
    });
    let lookup = lookup.map(Arc::new);
    let cache = lookup.clone().map(|lookup| (lookup, writes));
    let collector = Arc::new(Collector::new(roots.len(), cache));
    backend.executor().submit(plan, collector.clone());
    let values = if backend.is_remote() {
        // A nested computation on a cluster worker gives the task's
        // thread back while it waits (`rask_executor::blocking`).
        rask_executor::blocking(|| collector.wait())
    } else {
        collector.wait()
    };
    if let Some(bar) = bar.as_mut().filter(|_| values.is_ok()) {
        bar.succeeded();
    }
    if let Some(lookup) = lookup {
        lookup.finish();
    }
    values
}

/// Moves the next value out, downcast to `T`.
pub(crate) fn take<T: Data>(values: &mut std::vec::IntoIter<Value>) -> Result<T> {
    let value = values.next().expect("one value per root");
    let shared = crate::build::data::unique::<T>(value).map_err(|_| Error::WrongType {
        expected: std::any::type_name::<T>(),
    })?;
    match Arc::try_unwrap(shared) {
        Ok(value) => Ok(value),
        Err(shared) => {
            let value = (*shared).clone();
            drop_quietly(shared, "a result of compute");
            Ok(value)
        }
    }
}

/// Gathers a plan's outputs and stops the run at the first failure.
struct Collector {
    state: Mutex<State>,
    done: Condvar,
    failed: AtomicBool,
    /// Outputs past the roots are only there to be written to the cache.
    roots: usize,
    /// The cache lookup, and which output slot holds which cached task.
    cache: Option<(Arc<crate::run::cache::Lookup>, HashMap<usize, usize>)>,
    /// The stop signal of the task computing this, if it runs in one: a
    /// nested computation stops when its task is given up.
    task: rask_executor::Stop,
}

struct State {
    outcomes: Vec<Option<Outcome>>,
    finished: bool,
    /// The first failure of a cached task that is not a root: it stops the
    /// run, so the roots it fails may only see a cancellation.
    extra_failure: Option<Arc<rask_executor::Failure>>,
}

impl Collector {
    fn new(
        roots: usize,
        cache: Option<(Arc<crate::run::cache::Lookup>, HashMap<usize, usize>)>,
    ) -> Self {
        Collector {
            state: Mutex::new(State {
                outcomes: vec![None; roots],
                finished: false,
                extra_failure: None,
            }),
            done: Condvar::new(),
            failed: AtomicBool::new(false),
            roots,
            cache,
            task: rask_executor::Stop::current(),
        }
    }

    fn wait(&self) -> Result<Vec<Value>> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !state.finished {
            state = self
                .done
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let outcomes = std::mem::take(&mut state.outcomes);
        let extra_failure = state.extra_failure.take();
        drop(state);
        // Report the failure that started it all, not a cancellation it caused.
        let mut first_cancelled = None;
        let mut failure = None;
        let mut values = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            match outcome.expect("every output is reported before `finished`") {
                Ok(v) => values.push(v),
                Err(f) if f.kind == FailureKind::Cancelled => {
                    first_cancelled.get_or_insert(f);
                }
                Err(f) => {
                    failure.get_or_insert(f);
                }
            }
        }
        let failure = match (failure, first_cancelled, extra_failure) {
            (None, None, _) => return Ok(values),
            (Some(f), _, _) | (None, Some(_), Some(f)) | (None, Some(f), None) => f,
        };
        // The other results of a compute that fails: nobody gets them, and
        // their `Drop`s are user code (`rask_executor::drop_quietly`).
        drop_each_quietly(values, "a result of a failed compute");
        Err(Error::from_failure(&failure))
    }
}

impl Reporter for Collector {
    fn output(&self, index: usize, outcome: Outcome) {
        if outcome.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        if let (Some((lookup, writes)), Ok(value)) = (&self.cache, &outcome) {
            if let Some(&i) = writes.get(&index) {
                lookup.write(i, value);
            }
        }
        // Past the roots: a cached task a root needs (so its failure fails
        // a root too).
        if index >= self.roots {
            match outcome {
                Err(f) if f.kind != FailureKind::Cancelled => {
                    let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                    state.extra_failure.get_or_insert(f);
                }
                // Written to the cache: let go, quietly, on the executor's
                // thread (a panic there would abort a thread pool).
                Ok(value) => drop_quietly(value, "a value written to the result cache"),
                Err(_) => {}
            }
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.outcomes[index] = Some(outcome);
    }

    fn cancelled(&self) -> bool {
        self.failed.load(Ordering::Relaxed) || self.task.raised()
    }

    fn finished(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.finished = true;
        self.done.notify_all();
    }
}
