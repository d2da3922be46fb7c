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

fn as_arc<T: Data>(value: rask_executor::Value, keep: bool) -> Result<std::sync::Arc<T>, Unshared> {
    let other = match rask_executor::downcast::<T>(value) {
        Ok(shared) => return Ok(shared),
        Err(other) => other,
    };
    let decode = |bytes: &[u8]| {
        postcard::from_bytes::<T>(bytes)
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

#[cfg(test)]
mod tests {
    use super::*;
    use rask_executor::{Encoded, Value};
    use std::sync::Arc;

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
}
