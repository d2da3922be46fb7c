//! The executor contract of rask.
//!
//! An executor runs a [`Plan`]: a frozen, topologically sorted list of tasks
//! with their dependencies given as task indices. It does not know about
//! `Delayed`, graphs or types: every task is an opaque [`Op`] that turns the
//! values of its dependencies into a [`Value`]. The `rask` crate lowers user
//! graphs into plans and depends on the executors, never the other way round.
//!
//! This crate also holds [`Synchronous`], the reference executor: one thread,
//! tasks in plan order. Every other executor must produce the same outputs
//! and failures as it does. [`Simulated`] is its seeded variant: one
//! thread, ready tasks in an order drawn from a seed, for tests that
//! explore orders and replay the one that failed.
//!
//! # Rules every executor keeps
//!
//! 1. A task runs only after all of its dependencies succeeded, and at most
//!    once per submission.
//! 2. A task whose dependency failed does not run; it fails with the same
//!    [`Failure`] (the failure names the task that actually failed).
//! 3. A panic in [`Op::run`] is caught and becomes a [`Failure`] of kind
//!    [`FailureKind::Panicked`]; it never unwinds into the executor.
//! 4. Every output index of the plan is reported to the [`Reporter`] exactly
//!    once, then [`Reporter::finished`] is called exactly once, after the
//!    executor dropped its references to the plan (so a caller that wakes on
//!    `finished` holds the last reference to everything the plan held).
//! 5. Once [`Reporter::cancelled`] returns `true`, no new task starts; the
//!    outputs not yet reported are reported as [`FailureKind::Cancelled`].
//! 6. A value is dropped as soon as its last consumer (dependent task or
//!    output report) took it, so intermediate memory stays bounded.
//! 7. An executor that runs plans on a cluster fetches every output into this
//!    process, unless [`Reporter::keep_remote`] says otherwise: then each
//!    output stays on the cluster and is reported as a [`Remote`] handle,
//!    which holds the key there until it is dropped (see [`RemoteValue`]).
//! 8. A value the executor drops (a task's input after the task ran or was
//!    skipped, a value nobody uses, what a cancelled run held) is dropped
//!    with [`drop_quietly`]: a panic in its `Drop` is logged and changes no
//!    outcome; it never unwinds into the executor (dropping rules). A
//!    plan drops its ops (and the arguments they hold) that way itself
//!    (dropping rule 5), on whichever thread lets go of it last.
#![warn(missing_docs)]

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

mod annotations;
mod blocking;
pub mod diagnostics;
mod dropping;
pub mod entry;
pub mod events;
mod failure;
mod hint;
mod limits;
mod plan;
mod simulated;
mod stop;
mod synchronous;

pub use annotations::{
    Annotations, ResourceError, Resources, MAX_AMOUNT, MAX_RESOURCES, MAX_RESOURCE_NAME,
};
pub use blocking::{blocking, context, install_context, Seat};
pub use dropping::{drop_each_quietly, drop_quietly};
pub use failure::{
    decode_failure, encode_failure, panic_message, Cause, Failure, FailureKind, OpError,
    RemoteError,
};
pub use hint::prefetch;
pub use limits::{run_limited, Run};
pub use plan::{Kept, Plan, PlanBuilder, PlanId, PlanTask};
pub use simulated::{Simulated, SplitMix64};
pub use stop::{abandoned, cancelled, Abandoned, Stop};
pub use synchronous::Synchronous;

/// A computed value, type-erased and shared.
///
/// Values are reference counted so that a value used by many tasks is shared,
/// not copied. An op that receives the last reference may take the value out
/// without cloning it. Every value can [`encode`](AnyValue::encode) itself,
/// so an executor can move it to another process without knowing its type;
/// local executors never do.
pub type Value = Arc<dyn AnyValue>;

mod wire;

pub use wire::{
    downcast, AnyValue, Encoded, Registry, Remote, RemoteValue, WireError, WireTask, FAIL_FUNCTION,
    REMOTE_FUNCTION, VALUE_FUNCTION,
};

/// Content hash of a task: equal keys mean equal values.
///
/// A key is identity only: it says nothing about where or whether the value is
/// stored. `Display` prints the full hex digest; [`Key::short`] the first eight
/// hex digits, used in readable task names such as `inc-1a2b3c4d`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// The raw 32 bytes of the key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first eight hex digits of the key.
    ///
    /// ```
    /// let key = rask_executor::Key([0xab; 32]);
    /// assert_eq!(key.short().to_string(), "abababab");
    /// ```
    pub fn short(&self) -> impl fmt::Display + '_ {
        ShortKey(self)
    }
}

struct ShortKey<'a>(&'a Key);

impl fmt::Display for ShortKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0 .0[..4] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.short())
    }
}

/// The work of one task: turns the values of its dependencies into a value.
pub trait Op: Send + Sync {
    /// Runs the task. `inputs` holds one value per dependency, in the order the
    /// dependencies were given to [`PlanBuilder::push`]; an input that is the
    /// last reference to its value may be taken out of its slot.
    ///
    /// # Errors
    ///
    /// Returns an [`OpError`] when the task fails; the executor attaches the
    /// task's key and name.
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError>;

    /// A short human-readable name, e.g. the function name `inc`.
    fn name(&self) -> &str;

    /// The key of the task this op is, when the op knows it (a graph node
    /// does): a [`Plan`] then reads the key here instead of keeping a copy
    /// (plan invariant 4). `None` (the default): the plan keeps the key it
    /// was given.
    ///
    /// Must give the same answer every time it is asked.
    fn key(&self) -> Option<&Key> {
        None
    }

    /// The task in a form another process can run: a registered function
    /// and its arguments as bytes (see [`Registry`]).
    ///
    /// # Errors
    ///
    /// [`WireError`] when the task cannot leave this process: an op that is
    /// not a registered function, or an argument that cannot be serialized.
    fn to_wire(&self) -> Result<WireTask, WireError> {
        Err(WireError::NotSerializable {
            what: format!("task `{}`", self.name()),
        })
    }

    /// How long the task may run before it fails as timed out; `None`: as
    /// long as it takes. An op with a timeout enforces it in its own `run`
    /// ([`run_limited`]); this tells executors that send it elsewhere.
    fn timeout(&self) -> Option<Duration> {
        None
    }

    /// For an op made of steps that were tasks of their own (a chain fused
    /// into one wire task): the same op with `timeout` on each step rather
    /// than on the whole, as a default meant for every task (a cluster's
    /// `--task-timeout`) is enforced. `None` (the default): the op is one
    /// task, limited as a whole.
    fn each_step_limited(&self, timeout: Duration) -> Option<Arc<dyn Op>> {
        let _ = timeout;
        None
    }

    /// Whether the task is work of its own, which task events report
    /// ([`events`]): `false` for ops that only hand over a value that
    /// already exists — data, a result held from an earlier run, a recorded
    /// failure.
    fn is_work(&self) -> bool {
        true
    }

    /// How many times the task runs again when it fails, returning an error,
    /// panicking or timing out; enforced, and told, as
    /// [`timeout`](Op::timeout) is.
    fn retries(&self) -> u32 {
        0
    }

    /// What the task asks of a cluster's scheduler: a priority, resources,
    /// workers ([`Annotations`]); `None` asks for nothing. Executors that
    /// run everything in this process ignore it.
    fn annotations(&self) -> Option<&Annotations> {
        None
    }
}

/// `op` with a timeout and retries: runs and travels as `op` does, fails as
/// timed out when it runs longer than `timeout`, and runs again up to
/// `retries` times when it fails (see [`run_limited`]). Used where an op is
/// rebuilt from its wire form, which carries neither.
pub fn with_limits(op: Arc<dyn Op>, timeout: Option<Duration>, retries: u32) -> Arc<dyn Op> {
    if timeout.is_none() && retries == 0 {
        return op;
    }
    Arc::new(Limited {
        op,
        timeout,
        retries,
    })
}

struct Limited {
    op: Arc<dyn Op>,
    timeout: Option<Duration>,
    retries: u32,
}

impl Op for Limited {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        let op = self.op.clone();
        let run: limits::Run = Arc::new(move |inputs: &mut [Option<Value>]| op.run(inputs));
        run_limited(self.op.name(), self.timeout, self.retries, &run, inputs)
    }
    fn name(&self) -> &str {
        self.op.name()
    }
    fn to_wire(&self) -> Result<WireTask, WireError> {
        self.op.to_wire()
    }
    fn timeout(&self) -> Option<Duration> {
        self.timeout
    }
    fn retries(&self) -> u32 {
        self.retries
    }
    fn is_work(&self) -> bool {
        self.op.is_work()
    }
}

/// The outcome of one task as executors pass it around.
pub type Outcome = Result<Value, Arc<Failure>>;

/// Receives what an executor produced for one submitted plan.
///
/// Called from executor threads; implementations must be cheap, must not
/// block on the executor, and must not panic (a panic on a pool thread may
/// abort the process).
pub trait Reporter: Send + Sync {
    /// Output number `index` of the plan (an index into [`Plan::outputs`]) is
    /// known. Called exactly once per output index.
    fn output(&self, index: usize, outcome: Outcome);

    /// Polled between tasks: when `true`, no new task starts (rule 5).
    fn cancelled(&self) -> bool {
        false
    }

    /// Whether outputs computed on a cluster may be reported as [`Remote`]
    /// handles instead of being fetched (an executor may still bring small
    /// values along, cached in the handle). Each handle keeps its key held
    /// on the cluster until it is dropped, so later plans that use the value
    /// find it there. Asked once, at submission. Executors that hold values
    /// in this process ignore it.
    fn keep_remote(&self) -> bool {
        false
    }

    /// Every output was reported, no task of this plan is running, and the
    /// executor holds no reference to the plan any more.
    fn finished(&self) {}

    /// Called at most once, at submission, by an executor that can stop the
    /// work of a single output (a cluster, which releases its key there):
    /// the reporter calls `stop` with an output index once nobody wants that
    /// output any more. The executor then reports that output as
    /// cancelled, if it has not reported it yet. Executors that stop only
    /// whole runs ([`cancelled`](Reporter::cancelled)) never call it.
    fn stop_with(&self, stop: Arc<dyn Fn(usize) + Send + Sync>) {
        let _ = stop;
    }
}

/// Runs plans.
///
/// `submit` may return before the plan finished (threads, distributed) or
/// after (the synchronous executor); callers wait on their [`Reporter`].
pub trait Executor: Send + Sync {
    /// Starts running `plan`, reporting each output to `reporter`.
    fn submit(&self, plan: Arc<Plan>, reporter: Arc<dyn Reporter>);
}

/// Runs task `i` of `plan` on `inputs`, catching panics and naming the
/// failure.
///
/// Shared by every executor so that rules 2 and 3 are implemented once. An
/// op with a timeout or retries enforces them itself ([`run_limited`]).
///
/// A value returned by a task that saw [`cancelled`] true (its work was
/// given up while it ran, `stop` rule 2) is dropped here, for every
/// executor: the outcome is a failure of kind
/// [`Cancelled`](FailureKind::Cancelled). A task that stops early then
/// returns what it has so far; that is not its value, and no executor
/// reports it (nor a result cache keeps it).
pub fn run_task(plan: &Plan, i: u32, inputs: &mut [Option<Value>]) -> Outcome {
    failure::record_panic_locations();
    let op = plan.task(i).op();
    let _span =
        tracing::trace_span!("task", name = op.name(), key = %plan.key(i).short()).entered();
    let (result, saw_cancel) =
        stop::noting_cancel(|| catch_unwind(AssertUnwindSafe(|| op.run(inputs))));
    let outcome = match result {
        // The flag is rare; the task's own signal is read only then.
        Ok(Ok(value)) if !saw_cancel || !Stop::current().given_up() => return Ok(value),
        Ok(Ok(value)) => {
            drop_quietly(value, format_args!("the value of task {}", plan.label(i)));
            Arc::new(plan.failure_as(
                i,
                FailureKind::Cancelled,
                "its work was given up while it ran: the value it returned is dropped".into(),
            ))
        }
        Ok(Err(err)) => Arc::new(plan.failure(i, err)),
        Err(payload) => {
            let failure = plan.failure(i, OpError::panicked(&*payload));
            // A payload is the user's too (dropping rule 1).
            drop_quietly(payload, format_args!("the panic of task {}", plan.label(i)));
            Arc::new(failure)
        }
    };
    tracing::debug!(task = %outcome.name, key = %outcome.key.short(), kind = ?outcome.kind, "task erred: {}", outcome.message);
    Err(outcome)
}
