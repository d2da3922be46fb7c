//! A fused task on the wire: the built-in function [`FUSED_FUNCTION`]
//! (`rask.fused`, `registry` rule 9), and the stack program that runs a
//! fused task's steps, here and on a worker.
//!
//! A fused task (`plan::fuse`) travels to a worker as one wire task, so
//! that a chain costs the cluster one task, not one per step. Its payload
//! is the group's name and, per step, the step's own wire task, key and
//! name with its stack counts. A worker's registry resolves it with
//! [`resolve`], which resolves every step with the same registry and runs
//! the same stack program ([`exec`]), so a step that fails names itself
//! there as it does in the process that built it. It lives in the build
//! layer because the registry resolves it.
//!
//! Rules:
//!
//! 1. A step is never itself a fused task (nothing nests them), and a
//!    payload that nests one is refused.
//! 2. The counts come from another process and are checked before anything
//!    runs: no step takes more arguments than the stack holds, the program
//!    leaves exactly one value, and the stack is sized from the inputs the
//!    task actually received, never from a count alone.
//! 3. A step carries no limits or annotations of its own: a task that has
//!    any is never folded for a cluster (`plan::lower` rule 3), so it
//!    travels as a task of its own, whose limits the worker enforces. So
//!    a timeout a worker is given for a fused task is its cluster's
//!    default for every task: enforced on each step
//!    ([`Op::each_step_limited`]), as on each task sent alone, never on
//!    the chain as a whole (ten steps of a second each under a default of
//!    five failed together).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use rask_executor::{Key, Op, OpError, Value, WireError, WireTask};
use serde::{Deserialize, Serialize};

/// Stack slots a fused task keeps on the thread's stack; deeper groups
/// allocate their stack once per run.
pub(crate) const INLINE_STACK: usize = 8;

/// Names the step `(key, name)` as where `err` started, unless it already
/// names one (a failure inside a fused task or a chain, `plan` invariant 5).
pub(crate) fn named_origin(key: Key, name: &str, mut err: OpError) -> OpError {
    if err.origin.is_none() {
        err.origin = Some((key, Arc::from(name)));
    }
    err
}

/// Runs a stack program (`plan::fuse`, "How a fused task runs"): each step
/// `(pushes, args, op)` pushes that many of `inputs`, then runs `op` on the
/// top `args` slots, whose result replaces them. A step that fails or
/// panics is named as the origin of the error, by the key `key_of` gives
/// for its position (asked only then).
pub(crate) fn exec<'a>(
    steps: impl Iterator<Item = (u32, u32, &'a dyn Op)>,
    key_of: impl FnOnce(usize) -> Key,
    inputs: &mut [Option<Value>],
    stack: &mut [Option<Value>],
) -> Result<Value, OpError> {
    let mut inputs = inputs.iter_mut();
    let mut top = 0usize;
    for (step, (pushes, takes, op)) in steps.enumerate() {
        let takes = takes as usize;
        for _ in 0..pushes {
            let value = inputs.next().and_then(Option::take).ok_or_else(|| {
                OpError::failed("a fused task received fewer inputs than it declared")
            })?;
            stack[top] = Some(value);
            top += 1;
        }
        // Counts were checked when the program was built (rule 2).
        let base = top
            .checked_sub(takes)
            .ok_or_else(|| OpError::failed("a fused step takes more than the stack holds"))?;
        let args = &mut stack[base..top];
        // Caught per step, so that a panic names the step, not the group.
        let outcome = catch_unwind(AssertUnwindSafe(|| op.run(args)));
        // What the step did not take is dropped now, as an executor drops a
        // task's inputs once it ran.
        for slot in args.iter_mut() {
            *slot = None;
        }
        let value = match outcome {
            Ok(Ok(value)) => value,
            Ok(Err(err)) => return Err(named_origin(key_of(step), op.name(), err)),
            Err(payload) => {
                let err = OpError::panicked(&*payload);
                return Err(named_origin(key_of(step), op.name(), err));
            }
        };
        stack[base] = Some(value);
        // (`base + 1` here overflows the trait solver on the operator
        // impls of `Delayed`.)
        top = base;
        top += 1;
    }
    stack[0]
        .take()
        .ok_or_else(|| OpError::failed("a fused task has no step"))
}

/// Runs `exec` with a stack of `depth` slots: on the thread's stack up to
/// [`INLINE_STACK`], else allocated for this run.
pub(crate) fn with_stack(
    depth: usize,
    exec: impl FnOnce(&mut [Option<Value>]) -> Result<Value, OpError>,
) -> Result<Value, OpError> {
    if depth <= INLINE_STACK {
        let mut stack: [Option<Value>; INLINE_STACK] = [const { None }; INLINE_STACK];
        exec(&mut stack)
    } else {
        let mut stack = vec![None; depth];
        exec(&mut stack)
    }
}

/// The function name of a fused task on the wire (module docs).
pub(crate) const FUSED_FUNCTION: &str = "rask.fused";

/// A fused task's payload on the wire.
#[derive(Serialize, Deserialize)]
pub(crate) struct WireGroup {
    pub(crate) name: String,
    pub(crate) steps: Vec<WireStep>,
}

/// One step of a [`WireGroup`]: the step's own wire task, key and name,
/// and its stack counts: external inputs pushed before it, arguments it
/// takes from the top of the stack.
#[derive(Serialize, Deserialize)]
pub(crate) struct WireStep {
    pub(crate) key: [u8; 32],
    pub(crate) name: String,
    pub(crate) function: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) pushes: u32,
    pub(crate) args: u32,
}

/// A fused task received from another process: its steps resolved by this
/// process's registry.
struct Received {
    name: Box<str>,
    steps: Box<[ReceivedStep]>,
    /// Inputs the program pushes, in all.
    inputs: usize,
    /// Stack slots it needs.
    depth: usize,
}

/// One step of a [`Received`] task.
struct ReceivedStep {
    key: Key,
    op: Arc<dyn Op>,
    pushes: u32,
    args: u32,
}

/// The op of a `rask.fused` wire task (module docs),
/// resolving each step with `step`.
///
/// # Errors
///
/// [`WireError::Decode`] when the payload does not decode, nests a fused
/// task, or its counts do not make a program (rules 1 and 2); any error of
/// `step`.
pub(crate) fn resolve(
    payload: &[u8],
    mut step: impl FnMut(&WireTask) -> Result<Arc<dyn Op>, WireError>,
) -> Result<Arc<dyn Op>, WireError> {
    let bad = |reason: String| WireError::Decode {
        what: "a fused task".into(),
        reason,
    };
    let group: WireGroup = postcard::from_bytes(payload).map_err(|e| bad(e.to_string()))?;
    let (mut depth, mut max, mut inputs) = (0u64, 0u64, 0u64);
    let mut steps = Vec::with_capacity(group.steps.len());
    for s in group.steps {
        if s.function == FUSED_FUNCTION {
            return Err(bad("a step is itself a fused task".into()));
        }
        depth += u64::from(s.pushes);
        inputs += u64::from(s.pushes);
        max = max.max(depth);
        if u64::from(s.args) > depth {
            return Err(bad(format!(
                "a step takes {} arguments from a stack of {depth}",
                s.args
            )));
        }
        depth = depth - u64::from(s.args) + 1;
        max = max.max(depth);
        let wire = WireTask {
            function: s.function,
            payload: s.payload,
        };
        let op = step(&wire)?;
        // The step's name as the sending process had it (a task renamed
        // there keeps its name in failures).
        let op: Arc<dyn Op> = if op.name() == s.name {
            op
        } else {
            Arc::new(Renamed {
                op,
                name: s.name.into(),
            })
        };
        steps.push(ReceivedStep {
            key: Key(s.key),
            op,
            pushes: s.pushes,
            args: s.args,
        });
    }
    if depth != 1 {
        return Err(bad(format!("its program leaves {depth} values, not one")));
    }
    let (Ok(inputs), Ok(depth)) = (usize::try_from(inputs), usize::try_from(max)) else {
        return Err(bad("its counts overflow".into()));
    };
    Ok(Arc::new(Received {
        name: group.name.into(),
        steps: steps.into_boxed_slice(),
        inputs,
        depth,
    }))
}

impl Op for Received {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        // Rule 2: the stack is sized only once the inputs are known to
        // match the counts.
        if inputs.len() != self.inputs {
            return Err(OpError::failed(format!(
                "a fused task received {} inputs, its steps take {}",
                inputs.len(),
                self.inputs
            )));
        }
        let steps = self.steps.iter().map(|s| (s.pushes, s.args, &*s.op));
        let key_of = |step: usize| self.steps[step].key;
        with_stack(self.depth, |stack| exec(steps, key_of, inputs, stack))
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// Rule 3.
    fn each_step_limited(&self, timeout: std::time::Duration) -> Option<Arc<dyn Op>> {
        let steps = self.steps.iter().map(|s| ReceivedStep {
            key: s.key,
            op: rask_executor::with_limits(s.op.clone(), Some(timeout), 0),
            pushes: s.pushes,
            args: s.args,
        });
        Some(Arc::new(Received {
            name: self.name.clone(),
            steps: steps.collect(),
            inputs: self.inputs,
            depth: self.depth,
        }))
    }
}

/// A step's op under the name its sending process gave it.
struct Renamed {
    op: Arc<dyn Op>,
    name: Box<str>,
}

impl Op for Renamed {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        self.op.run(inputs)
    }

    fn name(&self) -> &str {
        &self.name
    }
}
