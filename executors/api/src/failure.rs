//! How a task fails, and what of its error survives the trip to the caller.
//!
//! Rules:
//!
//! 1. A task's own error keeps its type in the process where the task ran:
//!    [`Cause::error`] is the very value the task returned, which the caller
//!    can downcast.
//! 2. Across processes an error travels as its type name and the messages of
//!    its `source()` chain, and comes back as a [`RemoteError`] with the same
//!    chain.
//! 3. A panic records where it happened: rask installs a panic hook (once,
//!    before the first task runs) that notes the location of a panic on the
//!    panicking thread, then calls the hook that was there before, so panic
//!    messages print as they always did.
//! 4. A failure's `message` is its error's own `Display`, never followed by
//!    the messages of its sources: reports that walk `source()` print each
//!    cause once.

use std::any::Any;
use std::cell::RefCell;
use std::fmt;
use std::sync::{Arc, Once};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Key, WireError};

/// What kind of failure ended a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The task's code returned an error.
    Failed,
    /// The task's code panicked.
    Panicked,
    /// The run was cancelled before the task produced a value.
    Cancelled,
    /// The task ran longer than its timeout.
    TimedOut(Duration),
}

/// The error value a task returned, with its type's name (rule 1).
#[derive(Clone)]
pub struct Cause {
    /// The error's type, e.g. `core::num::error::ParseIntError`.
    pub type_name: Arc<str>,
    /// The error itself; a [`RemoteError`] when it came from another
    /// process (rule 2).
    pub error: Arc<dyn std::error::Error + Send + Sync>,
}

impl Cause {
    /// The cause of a task that returned `error`.
    pub fn new<E: std::error::Error + Send + Sync + 'static>(error: E) -> Cause {
        Cause {
            type_name: std::any::type_name::<E>().into(),
            error: Arc::new(error),
        }
    }

    /// The cause for an error of type `type_name` that is already boxed.
    pub fn boxed(type_name: &str, error: Box<dyn std::error::Error + Send + Sync>) -> Cause {
        Cause {
            type_name: type_name.into(),
            error: Arc::from(error),
        }
    }

    /// The cause of an error received from another process (rule 2).
    pub fn remote(type_name: &str, message: &str, chain: Vec<String>) -> Cause {
        Cause {
            type_name: type_name.into(),
            error: Arc::new(RemoteError::new(type_name, message, chain)),
        }
    }

    /// The messages of the error's sources, outermost first (rule 2).
    pub fn chain(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut source = self.error.source();
        while let Some(s) = source {
            out.push(s.to_string());
            source = s.source();
        }
        out
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:?}", self.type_name, self.error)
    }
}

/// An error a task returned in another process (rule 2): its type name,
/// message and the messages of its sources, as a chain of `RemoteError`s.
///
/// ```
/// use rask_executor::RemoteError;
/// let e = RemoteError::new("app::ParseError", "bad input", vec!["invalid digit".into()]);
/// assert_eq!(e.to_string(), "bad input");
/// assert_eq!(e.type_name(), "app::ParseError");
/// let source = std::error::Error::source(&e).unwrap();
/// assert_eq!(source.to_string(), "invalid digit");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    type_name: String,
    message: String,
    source: Option<Box<RemoteError>>,
}

impl RemoteError {
    /// An error of type `type_name` with `message`, caused by errors with
    /// the messages of `chain` (outermost first).
    pub fn new(type_name: &str, message: &str, chain: Vec<String>) -> RemoteError {
        let source = chain.into_iter().rev().fold(None, |source, message| {
            Some(Box::new(RemoteError {
                type_name: String::new(),
                message,
                source,
            }))
        });
        RemoteError {
            type_name: type_name.to_owned(),
            message: message.to_owned(),
            source,
        }
    }

    /// The name of the error's type in the process where it happened (empty
    /// for the sources, whose types do not travel).
    pub fn type_name(&self) -> &str {
        &self.type_name
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RemoteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Why an [`Op`](crate::Op) failed, as the op reports it.
#[derive(Debug, Clone)]
pub struct OpError {
    /// What went wrong.
    pub kind: FailureKind,
    /// The error message (rule 4).
    pub message: String,
    /// The task that actually failed, when the op runs several tasks (a fused
    /// chain). `None` means the op's own task.
    pub origin: Option<(Key, Arc<str>)>,
    /// The error value the task returned, if it returned one (rule 1);
    /// boxed, as an op's result is moved around on every task.
    pub cause: Option<Box<Cause>>,
    /// Where the task panicked (rule 3).
    pub location: Option<Arc<str>>,
    /// How many times the task ran: more than 1 when it had retries.
    pub attempts: u32,
}

impl OpError {
    /// An error returned by the task's own code, known by its message only.
    pub fn failed(message: impl Into<String>) -> Self {
        OpError {
            kind: FailureKind::Failed,
            message: message.into(),
            origin: None,
            cause: None,
            location: None,
            attempts: 1,
        }
    }

    /// An error value returned by the task's own code (rule 1).
    pub fn caused(cause: Cause) -> Self {
        OpError {
            kind: FailureKind::Failed,
            message: cause.error.to_string(),
            origin: None,
            cause: Some(Box::new(cause)),
            location: None,
            attempts: 1,
        }
    }

    /// A panic caught while running the task's code on this thread, with
    /// where it happened (rule 3).
    pub fn panicked(payload: &(dyn Any + Send)) -> Self {
        OpError {
            kind: FailureKind::Panicked,
            message: panic_message(payload),
            origin: None,
            cause: None,
            location: take_panic_location(),
            attempts: 1,
        }
    }

    /// The task ran past its timeout `after`.
    pub fn timed_out(after: Duration) -> Self {
        OpError {
            kind: FailureKind::TimedOut(after),
            message: format!("it ran past its timeout of {after:?}"),
            origin: None,
            cause: None,
            location: None,
            attempts: 1,
        }
    }
}

/// A task that failed, with its key, its name and the reason.
///
/// Shared by every dependent of the failed task, so the error a caller sees
/// always names the task where the failure started. Two failures are equal
/// when everything but the error value itself is.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Key of the task that failed.
    pub key: Key,
    /// Name of the task that failed (its function name).
    pub name: Arc<str>,
    /// What kind of failure it was.
    pub kind: FailureKind,
    /// The task's error or panic message (rule 4).
    pub message: String,
    /// The error value the task returned (rules 1 and 2).
    pub cause: Option<Box<Cause>>,
    /// Where the task panicked (rule 3).
    pub location: Option<Arc<str>>,
    /// How many times the task ran: more than 1 when it had retries.
    pub attempts: u32,
}

impl Failure {
    /// A failure known by its message only.
    pub fn new(key: Key, name: Arc<str>, kind: FailureKind, message: String) -> Failure {
        Failure {
            key,
            name,
            kind,
            message,
            cause: None,
            location: None,
            attempts: 1,
        }
    }

    /// The failure `err` of the task `(key, name)`.
    pub fn from_op(key: Key, name: Arc<str>, err: OpError) -> Failure {
        Failure {
            key,
            name,
            kind: err.kind,
            message: err.message,
            cause: err.cause,
            location: err.location,
            attempts: err.attempts.max(1),
        }
    }
}

impl PartialEq for Failure {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
            && self.name == other.name
            && self.kind == other.kind
            && self.message == other.message
            && self.location == other.location
            && self.attempts == other.attempts
            && self.cause.as_ref().map(|c| &c.type_name)
                == other.cause.as_ref().map(|c| &c.type_name)
    }
}

impl Eq for Failure {}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task {}-{} ", self.name, self.key.short())?;
        match self.kind {
            FailureKind::Failed => f.write_str("failed")?,
            FailureKind::Panicked => f.write_str("panicked")?,
            FailureKind::Cancelled => f.write_str("was cancelled")?,
            FailureKind::TimedOut(after) => write!(f, "timed out after {after:?}")?,
        }
        if self.attempts > 1 {
            write!(f, " after {} attempts", self.attempts)?;
        }
        if let Some(location) = &self.location {
            write!(f, " at {location}")?;
        }
        // The cause's message is the source's, not this one's (rule 4).
        if !self.message.is_empty() && self.cause.is_none() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_ref()
            .map(|c| &*c.error as &(dyn std::error::Error + 'static))
    }
}

/// The form of a [`Failure`] on the wire (rule 2): everything but the error
/// value itself, whose type name and message chain go instead.
#[derive(Serialize, Deserialize)]
struct Portable {
    key: [u8; 32],
    name: String,
    /// 0 failed, 1 panicked, 2 cancelled, 3 timed out after `timeout_ms`.
    kind: u8,
    timeout_ms: u64,
    message: String,
    error_type: Option<String>,
    chain: Vec<String>,
    location: Option<String>,
    attempts: u32,
}

/// The bytes of `failure` as the payload of a [`FAIL_FUNCTION`] task
/// (rule 2).
///
/// [`FAIL_FUNCTION`]: crate::FAIL_FUNCTION
///
/// # Errors
///
/// [`WireError::Encode`] if postcard fails (it does not for these types).
pub fn encode_failure(failure: &Failure) -> Result<Vec<u8>, WireError> {
    let (kind, timeout_ms) = match failure.kind {
        FailureKind::Failed => (0, 0),
        FailureKind::Panicked => (1, 0),
        FailureKind::Cancelled => (2, 0),
        FailureKind::TimedOut(after) => (3, u64::try_from(after.as_millis()).unwrap_or(u64::MAX)),
    };
    let portable = Portable {
        key: failure.key.0,
        name: failure.name.to_string(),
        kind,
        timeout_ms,
        message: failure.message.clone(),
        error_type: failure.cause.as_ref().map(|c| c.type_name.to_string()),
        chain: failure
            .cause
            .as_ref()
            .map(|c| c.chain())
            .unwrap_or_default(),
        location: failure.location.as_ref().map(|l| l.to_string()),
        attempts: failure.attempts,
    };
    postcard::to_stdvec(&portable).map_err(|e| WireError::Encode {
        what: "a task failure".into(),
        reason: e.to_string(),
    })
}

/// The failure [`encode_failure`] encoded; its cause is a [`RemoteError`].
///
/// # Errors
///
/// [`WireError::Decode`] for bytes that are not an encoded failure.
pub fn decode_failure(bytes: &[u8]) -> Result<Failure, WireError> {
    let p: Portable = postcard::from_bytes(bytes).map_err(|e| WireError::Decode {
        what: "a task failure".into(),
        reason: e.to_string(),
    })?;
    let kind = match p.kind {
        0 => FailureKind::Failed,
        1 => FailureKind::Panicked,
        2 => FailureKind::Cancelled,
        3 => FailureKind::TimedOut(Duration::from_millis(p.timeout_ms)),
        other => {
            return Err(WireError::Decode {
                what: "a task failure".into(),
                reason: format!("unknown kind {other}"),
            })
        }
    };
    let cause = p
        .error_type
        .map(|type_name| Box::new(Cause::remote(&type_name, &p.message, p.chain)));
    Ok(Failure {
        key: Key(p.key),
        name: p.name.into(),
        kind,
        message: p.message,
        cause,
        location: p.location.map(Arc::from),
        attempts: p.attempts.max(1),
    })
}

/// The message carried by a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

thread_local! {
    /// Where the latest panic on this thread happened (rule 3).
    static PANIC_LOCATION: RefCell<Option<Arc<str>>> = const { RefCell::new(None) };
}

/// Installs the hook of rule 3 (once per process).
pub(crate) fn record_panic_locations() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(at) = info.location() {
                let at: Arc<str> = format!("{}:{}:{}", at.file(), at.line(), at.column()).into();
                // `try_with`: a panic while thread-locals are torn down.
                let _ = PANIC_LOCATION.try_with(|l| *l.borrow_mut() = Some(at));
            }
            previous(info);
        }));
    });
}

/// Takes the location of the latest panic on this thread.
pub(crate) fn take_panic_location() -> Option<Arc<str>> {
    PANIC_LOCATION
        .try_with(|l| l.borrow_mut().take())
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_records_where_it_happened() {
        record_panic_locations();
        let line = line!() + 1;
        let payload = std::panic::catch_unwind(|| panic!("boom")).unwrap_err();
        let err = OpError::panicked(&*payload);
        assert_eq!(err.message, "boom");
        let at = err.location.expect("a location");
        assert!(at.contains(&format!("failure.rs:{line}:")), "{at}");
        // Taken once: a later error does not inherit it.
        assert!(take_panic_location().is_none());
    }

    #[test]
    fn a_cause_keeps_its_value_and_chain() {
        #[derive(Debug)]
        struct Outer(std::num::ParseIntError);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bad config")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let inner = "x".parse::<i64>().unwrap_err();
        let cause = Cause::new(Outer(inner.clone()));
        assert!(cause.type_name.ends_with("Outer"));
        assert_eq!(cause.chain(), vec![inner.to_string()]);
        let failure = Failure::from_op(Key([1; 32]), "load".into(), OpError::caused(cause));
        assert!(std::error::Error::source(&failure)
            .unwrap()
            .downcast_ref::<Outer>()
            .is_some());
        // Display names the task; the cause's message is the source's.
        assert_eq!(failure.to_string(), "task load-01010101 failed");
        let remote = RemoteError::new("app::Outer", "bad config", vec![inner.to_string()]);
        let source = std::error::Error::source(&remote).unwrap();
        assert_eq!(source.to_string(), inner.to_string());
        assert!(std::error::Error::source(source).is_none());
        // Through bytes, the value becomes a RemoteError with the same chain.
        let back = decode_failure(&encode_failure(&failure).unwrap()).unwrap();
        assert_eq!(back, failure);
        let error = std::error::Error::source(&back).unwrap();
        let remote = error.downcast_ref::<RemoteError>().unwrap();
        assert!(remote.type_name().ends_with("Outer"));
        assert_eq!(error.source().unwrap().to_string(), inner.to_string());
        let timed = Failure::from_op(
            Key([2; 32]),
            "slow".into(),
            OpError::timed_out(Duration::from_millis(1500)),
        );
        assert_eq!(
            decode_failure(&encode_failure(&timed).unwrap()).unwrap(),
            timed
        );
    }
}
