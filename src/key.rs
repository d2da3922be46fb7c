//! Content keys: what makes two tasks "the same work".
//!
//! A key is blake3 in derive-key mode (context `"rask task key v1"`) over:
//!
//! 1. a tag for the kind of node (call, data, named data, unique call),
//! 2. the task's name and the function's stable identity (its path as the
//!    compiler names it, `std::any::type_name` of the function item),
//! 3. for each argument, in order: the key of a task input, or the postcard
//!    encoding of a literal.
//!
//! Keys are stable for the same binary and the same inputs. They change when
//! a function is renamed or moved to another module, when a literal's
//! serialized form changes (a `HashMap` serializes in iteration order, which
//! differs between runs: use `BTreeMap` for literals that must hash the same),
//! or when the key version in the context string is bumped (a breaking change).

use std::io;
use std::sync::LazyLock;

use rask_executor::Key;
use serde::Serialize;

const CONTEXT: &str = "rask task key v1";

static PROTOTYPE: LazyLock<blake3::Hasher> =
    LazyLock::new(|| blake3::Hasher::new_derive_key(CONTEXT));

/// What kind of node a key is derived for; part of the hashed bytes so a data
/// node can never share a key with a call.
#[derive(Clone, Copy)]
#[repr(u8)]
pub(crate) enum Tag {
    Call = 1,
    Data = 2,
    Named = 3,
    Unique = 4,
    Item = 5,
}

/// Incremental key derivation for one task.
pub(crate) struct KeyHasher(blake3::Hasher);

impl KeyHasher {
    pub(crate) fn new(tag: Tag, name: &str, identity: &str) -> Self {
        let mut h = PROTOTYPE.clone();
        h.update(&[tag as u8]);
        let mut this = KeyHasher(h);
        this.str(name);
        this.str(identity);
        this
    }

    fn str(&mut self, s: &str) {
        self.0.update(&(s.len() as u64).to_le_bytes());
        self.0.update(s.as_bytes());
    }

    /// Mixes in the key of a task input.
    pub(crate) fn input(&mut self, key: &Key) {
        self.0.update(b"k");
        self.0.update(&key.0);
    }

    /// Mixes in raw bytes (a count, an index, a random nonce).
    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.0.update(b"b");
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    /// Mixes in a literal by its postcard encoding.
    pub(crate) fn literal<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
    ) -> Result<(), postcard::Error> {
        self.0.update(b"l");
        postcard::to_io(value, Writer(&mut self.0)).map(|_| ())
    }

    pub(crate) fn finish(&self) -> Key {
        Key(*self.0.finalize().as_bytes())
    }
}

struct Writer<'a>(&'a mut blake3::Hasher);

impl io::Write for Writer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(lit: i64) -> Key {
        let mut h = KeyHasher::new(Tag::Call, "inc", "m::inc");
        h.literal(&lit).unwrap();
        h.finish()
    }

    #[test]
    fn same_inputs_same_key_and_literals_matter() {
        assert_eq!(key_of(1), key_of(1));
        assert_ne!(key_of(1), key_of(2));
    }

    #[test]
    fn tag_name_and_identity_matter() {
        let a = KeyHasher::new(Tag::Call, "inc", "m::inc").finish();
        assert_ne!(a, KeyHasher::new(Tag::Data, "inc", "m::inc").finish());
        assert_ne!(a, KeyHasher::new(Tag::Call, "dec", "m::inc").finish());
        assert_ne!(a, KeyHasher::new(Tag::Call, "inc", "n::inc").finish());
        // Length prefixes keep ("ab","c") apart from ("a","bc").
        assert_ne!(
            KeyHasher::new(Tag::Call, "ab", "c").finish(),
            KeyHasher::new(Tag::Call, "a", "bc").finish()
        );
    }
}
