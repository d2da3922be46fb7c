//! What crosses a process boundary: self-encoding values, tasks as
//! (function name, bytes), and the registry that turns them back into ops.
//!
//! Rules:
//!
//! 1. Every [`Value`] encodes itself with postcard ([`AnyValue::encode`]);
//!    the receiving side decodes it with the type it expects, so the bytes
//!    carry no type information.
//! 2. A value received from another process stays [`Encoded`] until an op
//!    that knows its type decodes it; encoding an `Encoded` value returns
//!    its bytes unchanged.
//! 3. A [`WireTask`] names a function registered in every process of the
//!    program (the same binary), and carries its literal arguments and the
//!    shape of its inputs as opaque bytes only that function's decoder reads.
//! 4. A value a cluster holds may stay there: a [`Reporter`](crate::Reporter)
//!    whose [`keep_remote`](crate::Reporter::keep_remote) is `true` receives
//!    [`Remote`] handles instead of bytes. A handle keeps its key held on the
//!    cluster until it is dropped; [`RemoteValue::fetch`] (and so
//!    [`AnyValue::encode`]) brings the bytes over when they are needed. A
//!    handle whose cluster let its value go for good, with no bytes here
//!    (its client's connection was lost since), says so
//!    ([`RemoteValue::lost`]): whoever holds it computes the work again
//!    rather than use it.
//! 5. A held value travels as the task [`VALUE_FUNCTION`] whose payload is the
//!    value's bytes; a [`Remote`] value as [`REMOTE_FUNCTION`] whose payload
//!    is its key's 32 bytes. An executor sends a `REMOTE_FUNCTION` task only
//!    to a cluster that holds that key, which then uses the value in place (a
//!    task whose key is known is not run again); every other executor sends
//!    the value's bytes. A registry resolves `REMOTE_FUNCTION` to an op that
//!    fails: it runs only if the key was not held after all.
//! 6. A recorded failure (a failed or cancelled input of a new graph) is
//!    the task [`FAIL_FUNCTION`]. It stands for no value, so a cluster
//!    executor never sends it: a cluster that still holds or computes that
//!    key would hand its value to dependents that must fail. The work that
//!    depends on it fails where it was submitted, at once.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::{Key, Op, Value};

/// The function name of a held value on the wire: its payload is the
/// value's encoding (rule 5).
pub const VALUE_FUNCTION: &str = "rask.value";

/// The function name of a value a cluster holds: its payload is the key's
/// 32 bytes (rule 5).
pub const REMOTE_FUNCTION: &str = "rask.remote";

/// The function name of a recorded failure: its payload is
/// [`encode_failure`](crate::encode_failure)'s bytes, and it fails the same
/// way wherever it runs (rule 6).
pub const FAIL_FUNCTION: &str = "rask.fail";

/// A value that can be shared between tasks and sent to another process.
///
/// Implemented for every `Serialize + Send + Sync + 'static` type, and for
/// [`Encoded`].
pub trait AnyValue: Any + Send + Sync {
    /// The value's postcard encoding.
    ///
    /// # Errors
    ///
    /// [`WireError::Encode`] when the type's `Serialize` implementation fails.
    fn encode(&self) -> Result<Vec<u8>, WireError>;

    /// The name of the value's type, for error messages.
    fn type_name(&self) -> &'static str;
}

impl<T: Serialize + Send + Sync + 'static> AnyValue for T {
    fn encode(&self) -> Result<Vec<u8>, WireError> {
        postcard::to_stdvec(self).map_err(|e| WireError::Encode {
            what: std::any::type_name::<T>().to_owned(),
            reason: e.to_string(),
        })
    }

    fn type_name(&self) -> &'static str {
        std::any::type_name::<T>()
    }
}

impl dyn AnyValue {
    /// Whether the value is a `T`.
    pub fn is<T: Any>(&self) -> bool {
        (self as &dyn Any).is::<T>()
    }

    /// The value as a `&T`, if it is one.
    ///
    /// ```
    /// use std::sync::Arc;
    /// let v: rask_executor::Value = Arc::new(42_i64);
    /// assert_eq!(v.downcast_ref::<i64>(), Some(&42));
    /// assert_eq!(v.downcast_ref::<u8>(), None);
    /// ```
    pub fn downcast_ref<T: Any>(&self) -> Option<&T> {
        (self as &dyn Any).downcast_ref::<T>()
    }
}

impl fmt::Debug for dyn AnyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Value({})", self.type_name())
    }
}

/// The value as an `Arc<T>` (no copy), or the value back if it is not a `T`.
///
/// ```
/// use std::sync::Arc;
/// let v: rask_executor::Value = Arc::new(String::from("hi"));
/// let s: Arc<String> = rask_executor::downcast(v).ok().unwrap();
/// assert_eq!(*s, "hi");
/// ```
pub fn downcast<T: Any + Send + Sync>(value: Value) -> Result<Arc<T>, Value> {
    if value.is::<T>() {
        let any: Arc<dyn Any + Send + Sync> = value;
        Ok(any.downcast::<T>().expect("the type was checked"))
    } else {
        Err(value)
    }
}

/// A value that arrived from another process, still in its encoded form.
///
/// Deliberately not `Serialize`: encoding it returns its bytes as they are
/// (rule 2), not a serialized byte array.
///
/// It can keep the value its bytes decode to ([`Encoded::keep_decoded`]),
/// so that the many consumers of one fetched value (tasks sharing an input,
/// on a worker) decode it once between them.
///
/// ```
/// use std::sync::Arc;
/// use rask_executor::{Encoded, Value};
/// let encoded = Encoded::new(Arc::from(&[7u8][..]));
/// assert!(encoded.decoded().is_none());
/// encoded.keep_decoded(Arc::new(7u8));
/// let kept: Value = encoded.decoded().unwrap();
/// assert_eq!(kept.downcast_ref::<u8>(), Some(&7));
/// ```
#[derive(Clone)]
pub struct Encoded(pub Arc<[u8]>, Decoded);

/// The value an [`Encoded`] was decoded to, once some consumer did.
#[derive(Clone, Default)]
struct Decoded(std::sync::OnceLock<Value>);

impl Encoded {
    /// Bytes as another process encoded them.
    pub fn new(bytes: Arc<[u8]>) -> Encoded {
        Encoded(bytes, Decoded::default())
    }

    /// The value kept by [`keep_decoded`](Encoded::keep_decoded), if any.
    pub fn decoded(&self) -> Option<Value> {
        self.1 .0.get().cloned()
    }

    /// Keeps `value`, which these bytes decode to, for later consumers; the
    /// first value kept stays.
    pub fn keep_decoded(&self, value: Value) {
        let _ = self.1 .0.set(value);
    }
}

impl AnyValue for Encoded {
    fn encode(&self) -> Result<Vec<u8>, WireError> {
        Ok(self.0.to_vec())
    }

    fn type_name(&self) -> &'static str {
        "encoded bytes"
    }
}

impl fmt::Debug for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Encoded({} bytes)", self.0.len())
    }
}

/// A value held by a cluster, seen from the process that asked for it:
/// its key, and a way to bring its bytes over (rule 4).
///
/// Implemented by executors that leave values where they were computed.
/// Dropping the last reference to the implementation lets the cluster drop
/// the value.
pub trait RemoteValue: Send + Sync {
    /// The key under which the cluster holds the value.
    fn key(&self) -> Key;

    /// The value's encoding, brought over from the cluster. Blocks the
    /// calling thread until the bytes arrived.
    ///
    /// # Errors
    ///
    /// [`WireError::Fetch`] when the value cannot be brought over: the
    /// connection to the cluster is gone, it took too long, or the key could
    /// not be recomputed after its holders were lost.
    fn fetch(&self) -> Result<Arc<[u8]>, WireError>;

    /// Why the value can never be brought over, once that is certain: the
    /// cluster let it go for good (a cluster client's connection was lost
    /// since the value was reported) and its bytes are not here. Then
    /// [`fetch`](RemoteValue::fetch) fails with this error, and stays
    /// lost; a handle of the same key made later may hold it again. `None`
    /// (the default) while a fetch may succeed. Cheap: no round trip.
    fn lost(&self) -> Option<WireError> {
        None
    }
}

/// A value left on a cluster: a [`Value`] like any other, whose
/// [`encode`](AnyValue::encode) fetches its bytes (rule 4).
///
/// Deliberately not `Serialize`, like [`Encoded`].
#[derive(Clone)]
pub struct Remote(pub Arc<dyn RemoteValue>);

impl Remote {
    /// The key under which the cluster holds the value.
    pub fn key(&self) -> Key {
        self.0.key()
    }

    /// The value's encoding; see [`RemoteValue::fetch`].
    ///
    /// # Errors
    ///
    /// As [`RemoteValue::fetch`].
    pub fn fetch(&self) -> Result<Arc<[u8]>, WireError> {
        self.0.fetch()
    }

    /// Why the value is lost for good, if it is; see [`RemoteValue::lost`].
    pub fn lost(&self) -> Option<WireError> {
        self.0.lost()
    }
}

impl AnyValue for Remote {
    fn encode(&self) -> Result<Vec<u8>, WireError> {
        Ok(self.fetch()?.to_vec())
    }

    fn type_name(&self) -> &'static str {
        "a value held by a cluster"
    }
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Remote({})", self.key().short())
    }
}

/// A task as another process receives it: the registered name of its
/// function and opaque argument bytes (rule 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireTask {
    /// The function's registered name.
    pub function: String,
    /// Literal arguments and input shapes, as the function's encoder wrote them.
    pub payload: Vec<u8>,
}

/// Turns [`WireTask`]s back into runnable ops, in the process that runs them.
pub trait Registry: Send + Sync {
    /// The op for `task`.
    ///
    /// # Errors
    ///
    /// [`WireError::Unregistered`] when no function of that name is known,
    /// [`WireError::Decode`] when the payload does not fit it.
    fn resolve(&self, task: &WireTask) -> Result<Arc<dyn Op>, WireError>;
}

/// Why a task or value could not cross a process boundary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The function is not in the registry.
    #[error(
        "function `{function}` is not registered; mark it `#[rask::task]`, or list it in the \
         `rask::tasks!` given to `rask::init_with`"
    )]
    Unregistered {
        /// The function's name.
        function: String,
    },
    /// A task calls a closure that captures variables: what it captured
    /// would not travel with it, so it runs only in its own process.
    #[error(
        "`{function}` is a closure that captures variables, which cannot run in another \
         process (its captured values do not travel with it); call a fn item marked \
         `#[rask::task]` instead, taking those values as arguments"
    )]
    Captures {
        /// The closure's path, e.g. `app::main::{{closure}}`.
        function: String,
    },
    /// Something that cannot be serialized (a hand-written task, an
    /// untraversed argument) was asked to leave the process.
    #[error("{what} cannot be sent to another process")]
    NotSerializable {
        /// What it was.
        what: String,
    },
    /// A value's `Serialize` implementation failed.
    #[error("value of type `{what}` could not be serialized: {reason}")]
    Encode {
        /// The type.
        what: String,
        /// The serializer's message.
        reason: String,
    },
    /// Bytes did not decode as the expected type.
    #[error("could not decode {what}: {reason}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// The decoder's message.
        reason: String,
    },
    /// A value held by a cluster could not be fetched from it.
    #[error("could not fetch the value of key {} from the cluster: {reason}", .key.short())]
    Fetch {
        /// The value's key.
        key: Key,
        /// Why.
        reason: String,
    },
}
