//! What a task value must be.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A value that can flow through a rask graph: a task argument or result.
///
/// Implemented for every `Serialize + DeserializeOwned + Clone + Send + Sync +
/// 'static` type. Serialization is what gives literals a content key and what
/// lets the distributed executor move values between processes; local
/// executors never serialize results. `Clone` is used only when a value has
/// several consumers and a function takes it by value: take `Arc<T>` in the
/// function to share it instead.
///
/// # Examples
///
/// ```
/// #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// struct Point { x: f64, y: f64 }
///
/// fn norm(p: Point) -> f64 { (p.x * p.x + p.y * p.y).sqrt() }
///
/// let n = rask::delayed!(norm(Point { x: 3.0, y: 4.0 }));
/// assert_eq!(n.compute().unwrap(), 5.0);
/// ```
///
/// A task whose result is not `Data` is refused by the compiler:
///
/// ```compile_fail
/// struct Opaque(i32); // no serde, no Clone
/// fn make() -> Opaque { Opaque(1) }
/// let x = rask::delayed!(make()); // derive `Clone, Serialize, Deserialize` on `Opaque`
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not `rask::Data`: task values must be serde-serializable, `Clone`, `Send`, `Sync` and `'static`",
    label = "not `rask::Data`",
    note = "derive `Clone, serde::Serialize, serde::Deserialize` on it (serde with feature `derive`)",
    note = "a borrowed value (`&str`, `&[T]`) is not `Data`: use its owned form (`String`, `Vec<T>`)"
)]
pub trait Data: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}

impl<T> Data for T where T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}

/// Why a value could not be had as a `T`.
pub(crate) enum Unshared {
    /// It is another type, or its bytes are not a `T`.
    Type(String),
    /// It is held by a cluster and could not be fetched.
    Fetch(String),
}

impl Unshared {
    pub(crate) fn into_message(self) -> String {
        match self {
            Unshared::Type(m) | Unshared::Fetch(m) => m,
        }
    }
}

/// The value as an `Arc<T>`: shared without a copy when it is a `T`, decoded
/// when it arrived encoded from another process, fetched and decoded when a
/// cluster holds it.
///
/// Encoded bytes are decoded once: the decoded value is kept with them
/// ([`rask_executor::Encoded::keep_decoded`]) for the next consumer, such as
/// the other tasks of a worker that read the same fetched input.
///
/// Returns a message naming the expected type when it is neither.
pub(crate) fn shared<T: Data>(value: rask_executor::Value) -> Result<std::sync::Arc<T>, String> {
    try_shared(value).map_err(Unshared::into_message)
}

/// As [`shared`], telling a failed fetch from a wrong type.
pub(crate) fn try_shared<T: Data>(
    value: rask_executor::Value,
) -> Result<std::sync::Arc<T>, Unshared> {
    as_arc(value, true)
}

/// As [`shared`], for a value about to be moved out of its `Arc`: what
/// encoded bytes decode to is not kept, so the `Arc` stays unique and the
/// value moves without a copy.
pub(crate) fn unique<T: Data>(value: rask_executor::Value) -> Result<std::sync::Arc<T>, String> {
    as_arc(value, false).map_err(Unshared::into_message)
}

/// Decodes a whole `T` from `bytes`, which must hold nothing more: bytes
/// of another type often decode as a prefix (the encoding of `Ok("hi")` is
/// a `u8` 0, then more), and that is no `T`, but an error.
pub(crate) fn decode_whole<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (value, rest) = postcard::take_from_bytes::<T>(bytes).map_err(|e| e.to_string())?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(format!(
            "{} bytes left over after {} of {} (the value is of another type)",
            rest.len(),
            bytes.len() - rest.len(),
            bytes.len()
        ))
    }
}

fn as_arc<T: Data>(value: rask_executor::Value, keep: bool) -> Result<std::sync::Arc<T>, Unshared> {
    let other = match rask_executor::downcast::<T>(value) {
        Ok(shared) => return Ok(shared),
        Err(other) => other,
    };
    let decode = |bytes: &[u8]| {
        decode_whole::<T>(bytes)
            .map(std::sync::Arc::new)
            .map_err(|e| {
                Unshared::Type(format!(
                    "could not decode a `{}`: {e}",
                    std::any::type_name::<T>()
                ))
            })
    };
    if let Some(encoded) = other.downcast_ref::<rask_executor::Encoded>() {
        if let Some(kept) = encoded.decoded() {
            if let Ok(shared) = rask_executor::downcast::<T>(kept) {
                return Ok(shared);
            }
        }
        let shared = decode(&encoded.0)?;
        if keep {
            encoded.keep_decoded(shared.clone());
        }
        Ok(shared)
    } else if let Some(remote) = other.downcast_ref::<rask_executor::Remote>() {
        let bytes = remote.fetch().map_err(|e| Unshared::Fetch(e.to_string()))?;
        decode(&bytes)
    } else {
        Err(Unshared::Type(format!(
            "a value of type `{}` is not the `{}` expected",
            other.type_name(),
            std::any::type_name::<T>()
        )))
    }
}

/// The serde *shape* of `T`: a hash of what its `Deserialize` asks for, as
/// `serde-reflection` traces it — every struct's and enum's name, its
/// fields or variants by name and in order, and their types, down to
/// primitives. Two types whose encodings could be read as each other but
/// mean something else (fields reordered, renamed, retyped, a variant
/// added) have different shapes. Traced once per type and process.
///
/// `None` when `T` cannot be traced: its `Deserialize` needs a
/// self-describing format (`deserialize_any`: untagged enums,
/// `serde_json::Value`) or rejects the tracer's made-up values (a type
/// that validates what it reads), or panics doing so.
pub(crate) fn shape<T: Data>() -> Option<[u8; 32]> {
    use std::any::TypeId;
    use std::collections::HashMap;
    use std::sync::{Mutex, PoisonError};

    type Shapes = Mutex<Option<HashMap<TypeId, Option<[u8; 32]>>>>;
    static SHAPES: Shapes = Mutex::new(None);
    let id = TypeId::of::<T>();
    let known = |shapes: &Shapes| {
        shapes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(|m| m.get(&id).copied())
    };
    if let Some(shape) = known(&SHAPES) {
        return shape;
    }
    // Outside the lock: tracing runs `T`'s own `Deserialize`.
    let traced = std::panic::catch_unwind(trace::<T>).ok().flatten();
    SHAPES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(HashMap::new)
        .insert(id, traced);
    traced
}

/// [`shape`], traced.
fn trace<T: Data>() -> Option<[u8; 32]> {
    use serde_reflection::{FormatHolder, Tracer, TracerConfig};

    let mut tracer = Tracer::new(TracerConfig::default());
    let (mut format, _) = tracer.trace_simple_type::<T>().ok()?;
    format.normalize().ok()?;
    let registry = tracer.registry().ok()?;
    let bytes = postcard::to_stdvec(&(format, registry)).ok()?;
    Some(
        *blake3::Hasher::new_derive_key("rask value shape v1")
            .update(&bytes)
            .finalize()
            .as_bytes(),
    )
}

/// Types of one name and other layouts, as a rebuild would make them:
/// for the tests of shapes here and of the result cache's addresses.
#[cfg(test)]
pub(crate) mod layouts {
    /// Two fields.
    pub(crate) mod before {
        #[derive(Clone, serde::Serialize, serde::Deserialize)]
        pub(crate) struct Point {
            pub(crate) x: i64,
            pub(crate) y: i64,
        }
    }

    /// `before`'s fields in the other order: the same encoding.
    pub(crate) mod swapped {
        #[derive(Clone, serde::Serialize, serde::Deserialize)]
        pub(crate) struct Point {
            pub(crate) y: i64,
            pub(crate) x: i64,
        }
    }

    /// `before` with a field of another type.
    pub(crate) mod retyped {
        #[derive(Clone, serde::Serialize, serde::Deserialize)]
        pub(crate) struct Point {
            pub(crate) x: i64,
            pub(crate) y: u64,
        }
    }

    /// `before` again, in another module.
    pub(crate) mod same {
        #[derive(Clone, serde::Serialize, serde::Deserialize)]
        pub(crate) struct Point {
            pub(crate) x: i64,
            pub(crate) y: i64,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use rask_executor::{Encoded, Value};
    use serde::{Deserialize, Serialize};

    use super::layouts::{before, retyped, same, swapped};
    use super::*;

    /// Bytes of another type that decode as a prefix are refused, not
    /// taken for a `T` (the encoding of `Ok("hello")` reads as the empty
    /// string, then five characters and more left over).
    #[test]
    fn bytes_are_decoded_whole_or_refused() {
        let ok: Result<String, String> = Ok("hello".into());
        let bytes: Arc<[u8]> = Arc::from(postcard::to_stdvec(&ok).unwrap());
        assert_eq!(postcard::from_bytes::<String>(&bytes).unwrap(), "");
        let value: Value = Arc::new(Encoded::new(bytes.clone()));
        let err = shared::<String>(value).err().unwrap();
        assert!(err.contains("left over"), "{err}");
        let value: Value = Arc::new(Encoded::new(bytes));
        let back = shared::<Result<String, String>>(value).ok().unwrap();
        assert_eq!(*back, ok);
    }

    #[test]
    fn shared_decodes_bytes_once_and_unique_keeps_nothing() {
        let bytes: Arc<[u8]> = Arc::from(postcard::to_stdvec(&vec![1_u32, 2]).unwrap());
        let encoded = Arc::new(Encoded::new(bytes.clone()));
        let value: Value = encoded.clone();
        let first = shared::<Vec<u32>>(value.clone()).ok().unwrap();
        let second = shared::<Vec<u32>>(value).ok().unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(*first, vec![1, 2]);

        let encoded = Arc::new(Encoded::new(bytes));
        let moved = unique::<Vec<u32>>(encoded.clone()).ok().unwrap();
        assert_eq!(Arc::strong_count(&moved), 1);
        assert!(encoded.decoded().is_none());
        // Another type asked of kept bytes is decoded, not mistaken.
        let value: Value = Arc::new(Encoded::new(Arc::from(postcard::to_stdvec(&7_u8).unwrap())));
        assert_eq!(*shared::<u8>(value.clone()).ok().unwrap(), 7);
        assert_eq!(*shared::<u16>(value).ok().unwrap(), 7);
    }

    #[derive(Clone, Serialize, Deserialize)]
    enum Two {
        A(i64),
        B { name: String },
    }

    #[derive(Clone, Serialize, Deserialize)]
    enum Three {
        A(i64),
        B { name: String },
        C,
    }

    #[derive(Clone, Serialize, Deserialize)]
    #[serde(untagged)]
    enum Untagged {
        Number(i64),
        Text(String),
    }

    #[test]
    fn a_shape_tells_layouts_apart_that_would_decode_as_each_other() {
        let point = shape::<before::Point>().unwrap();
        assert_eq!(
            shape::<same::Point>(),
            Some(point),
            "same fields, same shape"
        );
        assert_ne!(shape::<swapped::Point>(), Some(point), "fields reordered");
        assert_ne!(shape::<retyped::Point>(), Some(point), "a field retyped");
        assert_ne!(shape::<Two>(), shape::<Three>(), "a variant added");
        assert_ne!(shape::<Vec<i64>>(), shape::<Vec<u64>>());
        assert!(shape::<BTreeMap<String, (i64, Option<f64>)>>().is_some());
        assert_eq!(shape::<i64>(), shape::<i64>());
    }

    #[test]
    fn a_type_that_cannot_be_traced_has_no_shape() {
        assert_eq!(shape::<Untagged>(), None);
    }
}
