//! Content keys: what makes two tasks "the same work".
//!
//! A key is blake3, keyed with a key derived from the versioned context
//! `"rask task key v1"`, over:
//!
//! 1. a tag for the kind of node (call, data, named data, unique call),
//! 2. for a call, the function's digest: the same keyed hash, once per
//!    function and thread, of the task's name and the function's identity —
//!    its path as the compiler names it (`std::any::type_name`) and its
//!    [type tag](type_tag), which tells apart every distinct function of one
//!    binary (two closures of one function, two closures shadowing one name,
//!    and two nested functions of the same name in different blocks share a
//!    path but not a type); for other nodes, the name and identity
//!    themselves,
//! 3. for each argument, in order (under a key of the arguments' kinds
//!    for a call, rule 6): the key of a task input, or a literal
//!    as its serde calls, each under a tag of its own ([`literal`]: not
//!    its compact encoding, where values of one type that serialize
//!    through different calls can write the same bytes); an argument that
//!    cannot be serialized makes the call's key fresh;
//!
//! and for a call of a closure that captures variables (rule 4), blake3 so
//! keyed over its own tag, that key (its *stable* key, rule 5) and a fresh
//! nonce.
//!
//! Rules:
//!
//! 1. Distinct functions never share a key: the type tag is part of it.
//!    Nor do a call and the same call unwrapped with `?` (its `Ok` value,
//!    another type and another work): their kind tags differ. Nor work
//!    and the same work with a timeout or retries
//!    ([`Delayed::timeout`](crate::Delayed::timeout),
//!    [`retries`](crate::Delayed::retries)): one fails where the other
//!    runs on, so one graph holding both runs each as asked, whichever it
//!    meets first.
//! 2. A function item or a closure that captures nothing keeps its key in
//!    every run of the same binary for the same inputs.
//! 3. Keys change when a function is renamed or moved to another module, when
//!    a closure is added before another one in the same function (its type
//!    changes), when the program is built with another compiler, when a
//!    literal's serialized form changes (a `HashMap` serializes in iteration
//!    order, which differs between maps, equal ones too: use `BTreeMap` for
//!    literals that must hash the same; and a field serde skips is in no
//!    key: two literals that differ only there are one task), or when the
//!    key version in the context string is bumped (a breaking change). They
//!    do not change when the body of a function changes: equal keys from an
//!    edited program are kept apart on a cluster by the build fingerprint,
//!    not by the key.
//! 4. A closure that captures variables is impure: its captured values are
//!    not hashed (they need not be serializable), so every call gets a fresh
//!    key and is never shared with another call. Give it an identity with
//!    `Delayed::named`, or pass the values as arguments of a function item.
//! 5. A name given to work (`Delayed::named`) is hashed over the work's
//!    own key, so distinct work never shares a key under one name; for a
//!    call of a closure that captures variables, over its key without the
//!    nonce (its function and arguments): the name then stands for what it
//!    captured, and its arguments still count. A value wrapped under a
//!    name (`value_named`) is hashed as `value` hashes one, under its name:
//!    name, type and encoding. Only a hand-assembled `Graph`'s tasks take
//!    a name alone (`named_key`), which the graph checks is given once.
//! 6. A call's key is hashed *shaped*: its arguments' bytes alone, under a
//!    key of their shape, itself the keyed hash of the call's kind tag,
//!    its function's digest and the kind of each argument (`k` an input's
//!    key, `l` a literal, `b` raw bytes, `t` a type). An argument of each
//!    kind is self-delimiting (a key is 32 bytes, raw bytes follow their
//!    length, a literal's serde calls close themselves), so with its shape
//!    the bytes say which arguments they were: what the flat form writes
//!    as a mark before each argument, the shape holds once. A call of two
//!    inputs is then 64 bytes, one blake3 block, where its flat form took
//!    two. A call of more than 12 arguments, or whose bytes pass the
//!    buffer's limit (a large literal), is hashed *flat*, as every other
//!    key is: its kind tag, its digest, then each argument's mark and
//!    bytes, under the context's key. Which form a call takes depends
//!    only on its arguments, so the same call always gets the same key;
//!    the two forms hash under distinct blake3 keys, so neither can
//!    produce the other's key.

use std::sync::LazyLock;

use rask_executor::Key;
use serde::Serialize;

mod literal;

pub(crate) use literal::LiteralError;

/// The versioned context; changing it changes every key (a breaking change).
/// Version 2: literals are hashed as their serde calls ([`literal`]), not
/// their postcard bytes. Shaped calls (rule 6) changed the keys of calls
/// without a new version: they hash under keys of their own, which no
/// key of another form can match, and a call hashed flat keeps its key.
const CONTEXT: &str = "rask task key v2";

/// Keys are keyed blake3 hashes under a key derived from [`CONTEXT`]: the
/// same separation as blake3's derive-key mode, without re-deriving the
/// context for every task.
static HASH_KEY: LazyLock<[u8; 32]> = LazyLock::new(|| blake3::derive_key(CONTEXT, b""));

/// Past this many buffered bytes (a large literal), bytes stream into a
/// hasher instead of a growing buffer.
const BUFFER_LIMIT: usize = 16 * 1024;

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
    Function = 6,
    /// Work given a name, over the key of the work itself.
    Renamed = 7,
    /// A call of a closure that captures variables: its stable key and a
    /// nonce (rule 4).
    Impure = 8,
    /// A call whose `Result` is unwrapped (`delayed!(f(x)?)`): its value
    /// is the `Ok` value, other work than the `Result` of `f(x)` (rule 1).
    FallibleCall = 9,
    /// Work with a timeout or retries, over the key of the work itself and
    /// its limits: its failures differ (rule 1).
    Limited = 10,
    /// The key a shaped call's arguments are hashed under: its kind tag,
    /// its function's digest and its arguments' kinds (rule 6).
    Shape = 11,
}

/// The type tag of `T`: its `TypeId`, reduced to 64 bits. Equal in every
/// process of one binary; distinct types of one binary get distinct tags
/// (up to a 2⁻⁶⁴ chance), even when `type_name` prints them alike.
pub(crate) fn type_tag<T: ?Sized + 'static>() -> u64 {
    tag_of(std::any::TypeId::of::<T>())
}

/// The type tag ([`type_tag`]) of the type whose id is `id`.
pub(crate) fn tag_of(id: std::any::TypeId) -> u64 {
    /// FNV-1a over whatever `TypeId`'s `Hash` writes.
    struct Fnv(u64);
    impl std::hash::Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for &b in bytes {
                self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    std::hash::Hash::hash(&id, &mut h);
    std::hash::Hasher::finish(&h)
}

/// A map from types to what a process keeps per type (a shared call, a
/// function's wire id): type ids are hashes already, as keys are.
pub(crate) type TypeMap<V> = std::collections::HashMap<
    std::any::TypeId,
    V,
    std::hash::BuildHasherDefault<crate::build::graph::KeyHash>,
>;

/// Whether calls of `F` may share keys (rule 4): only a function item or a
/// closure with no captured state, whose behaviour its type alone decides.
pub(crate) fn is_pure_fn<F>() -> bool {
    std::mem::size_of::<F>() == 0
}

/// How many bytes a [`nonce`] is.
const NONCE_LEN: usize = 16;

/// Bytes no other call gets: this process's random salt and a counter.
/// For impure work (rule 4, `Delayed::unique`).
pub(crate) fn nonce() -> [u8; NONCE_LEN] {
    static SALT: LazyLock<u64> = LazyLock::new(|| {
        let mut h = blake3::Hasher::new();
        h.update(&std::process::id().to_le_bytes());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.update(&now.to_le_bytes());
        let here = 0u8;
        h.update(&(std::ptr::addr_of!(here) as usize).to_le_bytes());
        let mut salt = [0u8; 8];
        salt.copy_from_slice(&h.finalize().as_bytes()[..8]);
        u64::from_le_bytes(salt)
    });
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut out = [0u8; NONCE_LEN];
    out[..8].copy_from_slice(&SALT.to_le_bytes());
    out[8..].copy_from_slice(&n.to_le_bytes());
    out
}

/// How many arguments a call's key keeps the kinds of apart from their
/// bytes (its [`Shape`]); a call of more is hashed flat (rule 6).
const SHAPED_ARGS: usize = 12;

/// A call's head and the kind of each argument hashed so far, kept apart
/// from the arguments' bytes while the call is hashed shaped (rule 6).
#[derive(Clone, Copy)]
struct Shape {
    /// The call's kind tag ([`Tag::Call`] or [`Tag::FallibleCall`]).
    tag: Tag,
    digest: [u8; 32],
    /// Each argument's mark (`b'k'`, `b'l'`, `b'b'`, `b't'`), and where
    /// its bytes start in the buffer.
    marks: [u8; SHAPED_ARGS],
    starts: [u32; SHAPED_ARGS],
    len: u8,
}

/// Incremental key derivation for one task.
///
/// Most key material is short (a name, a path, a few input keys), so it is
/// collected in a small buffer and hashed in one call; a blake3 hasher is a
/// 2 KB value that would otherwise be copied around for every task.
pub(crate) struct KeyHasher {
    buf: Vec<u8>,
    stream: Option<Box<blake3::Hasher>>,
    /// A call of a capturing closure, whose key takes a nonce (rule 4):
    /// see [`KeyHasher::finish_call`].
    impure: bool,
    /// A call hashed shaped (rule 6): its head and its arguments' kinds,
    /// which the buffer then leaves out. `None` for other keys, and once
    /// a call is hashed flat.
    shape: Option<Shape>,
}

impl KeyHasher {
    /// A key for a call of the function `F`, named `name`: its path and type
    /// tag (rule 1), and a nonce when it captures state (rule 4).
    ///
    /// The name, path and type are hashed once per function and thread
    /// into the function's digest ([`KnownFunction::digest`]); a call's key
    /// hashes the digest, which keeps every call's hashed bytes short
    /// whatever the function's path.
    /// `fallible`: the call's `Result` is unwrapped (`?`), a kind of its
    /// own (rule 1).
    pub(crate) fn call<F: 'static>(name: &'static str, fallible: bool) -> Self {
        let mut this = KeyHasher::empty();
        let tag = if fallible {
            Tag::FallibleCall
        } else {
            Tag::Call
        };
        this.shape = Some(Shape {
            tag,
            digest: KnownFunction::digest::<F>(name),
            marks: [0; SHAPED_ARGS],
            starts: [0; SHAPED_ARGS],
            len: 0,
        });
        this.impure = !is_pure_fn::<F>();
        this
    }

    fn empty() -> Self {
        let mut buf = SPARE.take();
        buf.clear();
        KeyHasher {
            buf,
            stream: None,
            impure: false,
            shape: None,
        }
    }

    /// Starts an argument of kind `mark`: kept in the call's shape while
    /// it is hashed shaped, else written before the argument's bytes.
    fn mark(&mut self, mark: u8) {
        if let Some(shape) = &mut self.shape {
            let i = usize::from(shape.len);
            if i < SHAPED_ARGS {
                shape.marks[i] = mark;
                // At most the buffer's limit and a few bytes: a shaped
                // call past the limit is flat (`drained`).
                shape.starts[i] = self.buf.len() as u32;
                shape.len += 1;
                return;
            }
            self.flatten();
        }
        self.buf.push(mark);
    }

    /// Hashes the call flat from here on (rule 6): the buffer becomes what
    /// a flat key hashes, its head and each argument's mark and bytes.
    fn flatten(&mut self) {
        let Some(shape) = self.shape.take() else {
            return;
        };
        let len = usize::from(shape.len);
        let mut flat = Vec::with_capacity(1 + 32 + len + self.buf.len());
        flat.push(shape.tag as u8);
        flat.extend_from_slice(&shape.digest);
        for i in 0..len {
            let start = shape.starts[i] as usize;
            let end = if i + 1 < len {
                shape.starts[i + 1] as usize
            } else {
                self.buf.len()
            };
            flat.push(shape.marks[i]);
            flat.extend_from_slice(&self.buf[start..end]);
        }
        self.buf.clear();
        self.buf.extend_from_slice(&flat);
    }

    pub(crate) fn new(tag: Tag, name: &str, identity: &str) -> Self {
        let mut this = KeyHasher::empty();
        this.buf.reserve(32 + name.len() + identity.len() + 96);
        this.buf.push(tag as u8);
        this.str(name);
        this.str(identity);
        this
    }

    fn str(&mut self, s: &str) {
        self.buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(s.as_bytes());
    }

    /// Appends `bytes` to what is hashed; a run that would take the buffer
    /// past its limit goes to the stream as it lies, not through the
    /// buffer.
    fn extend(&mut self, bytes: &[u8]) {
        if self.buf.len() + bytes.len() <= BUFFER_LIMIT {
            self.buf.extend_from_slice(bytes);
        } else {
            self.drained().update(bytes);
        }
    }

    /// Hashes the buffer into the stream once it is past its limit.
    fn spill(&mut self) {
        if self.buf.len() > BUFFER_LIMIT {
            self.drained();
        }
    }

    /// The stream, with the buffer hashed into it and emptied.
    fn drained(&mut self) -> &mut blake3::Hasher {
        self.flatten();
        let stream = self
            .stream
            .get_or_insert_with(|| Box::new(blake3::Hasher::new_keyed(&HASH_KEY)));
        stream.update(&self.buf);
        self.buf.clear();
        stream
    }

    /// Mixes in `T`'s `TypeId` (what its `Hash` writes, a fixed length):
    /// the type tag's source, without reducing it.
    pub(crate) fn type_id<T: ?Sized + 'static>(&mut self) {
        struct Raw<'a>(&'a mut Vec<u8>);
        impl std::hash::Hasher for Raw<'_> {
            fn finish(&self) -> u64 {
                0
            }
            fn write(&mut self, bytes: &[u8]) {
                self.0.extend_from_slice(bytes);
            }
        }
        self.mark(b't');
        std::hash::Hash::hash(&std::any::TypeId::of::<T>(), &mut Raw(&mut self.buf));
    }

    /// Mixes in the key of a task input.
    pub(crate) fn input(&mut self, key: &Key) {
        self.mark(b'k');
        self.buf.extend_from_slice(&key.0);
        self.spill();
    }

    /// Mixes in raw bytes (a count, an index, a random nonce).
    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.mark(b'b');
        self.buf
            .extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(bytes);
        self.spill();
    }

    /// Mixes in a literal: its serde calls, each under a tag of its own
    /// ([`literal`], rule 3).
    pub(crate) fn literal<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), LiteralError> {
        self.mark(b'l');
        value.serialize(&mut literal::Literal(self))
    }

    /// [`literal`](KeyHasher::literal), without a serde call per element
    /// for the lists large data comes in: bytes as bytes, and floats as
    /// their count and bits under a tag of their own. Each type is always
    /// written one way, so its values keep distinct keys.
    pub(crate) fn literal_value<T: Serialize + 'static>(
        &mut self,
        value: &T,
    ) -> Result<(), LiteralError> {
        let any = value as &dyn std::any::Any;
        if let Some(bytes) = any.downcast_ref::<Vec<u8>>() {
            return self.literal(&AsBytes(bytes));
        }
        if let Some(floats) = any.downcast_ref::<Vec<f64>>() {
            self.elements(literal::F64S, floats, |x| x.to_bits().to_le_bytes());
            return Ok(());
        }
        if let Some(floats) = any.downcast_ref::<Vec<f32>>() {
            self.elements(literal::F32S, floats, |x| x.to_bits().to_le_bytes());
            return Ok(());
        }
        self.literal(value)
    }

    /// A list under `tag`: its length, then each element's bytes.
    fn elements<E: Copy, const N: usize>(
        &mut self,
        tag: u8,
        list: &[E],
        bytes: impl Fn(E) -> [u8; N],
    ) {
        self.mark(b'l');
        self.buf.push(tag);
        self.buf
            .extend_from_slice(&(list.len() as u64).to_le_bytes());
        // Elements' bytes into the buffer, hashed each time it passes its
        // limit (16 KiB: blake3 hashes 16 chunks of 1 KiB at once); a short
        // list costs what its bytes do.
        for part in list.chunks(BUFFER_LIMIT / N) {
            self.buf.reserve(part.len() * N);
            for &element in part {
                self.buf.extend_from_slice(&bytes(element));
            }
            self.spill();
        }
    }

    /// The key, and for a call of a capturing closure the key it would
    /// have without a nonce: its function and arguments, which a name
    /// given to it (`Delayed::named`, rule 5) is hashed over. The key is
    /// then that stable key's with a fresh nonce (module docs).
    pub(crate) fn finish_call(&self) -> (Key, Option<Key>) {
        let own = self.finish_plain();
        if !self.impure {
            return (own, None);
        }
        let mut bytes = [0u8; 1 + 32 + NONCE_LEN];
        bytes[0] = Tag::Impure as u8;
        bytes[1..33].copy_from_slice(&own.0);
        bytes[33..].copy_from_slice(&nonce());
        (
            Key(*blake3::keyed_hash(&HASH_KEY, &bytes).as_bytes()),
            Some(own),
        )
    }

    pub(crate) fn finish(&self) -> Key {
        self.finish_call().0
    }

    /// The keyed hash of the bytes mixed in.
    fn finish_plain(&self) -> Key {
        if let Some(shape) = &self.shape {
            return Key(*blake3::keyed_hash(&shape.key(), &self.buf).as_bytes());
        }
        match &self.stream {
            None => Key(*blake3::keyed_hash(&HASH_KEY, &self.buf).as_bytes()),
            Some(stream) => {
                let mut stream = stream.clone();
                stream.update(&self.buf);
                Key(*stream.finalize().as_bytes())
            }
        }
    }
}

impl Shape {
    /// The key this call's arguments are hashed under (rule 6): a keyed
    /// hash, as every key is, of the call's kind tag, its function's
    /// digest and its arguments' kinds. Kept per thread for the shapes
    /// met last: a function is mostly called with one shape.
    fn key(&self) -> [u8; 32] {
        // The digest is a hash: its first byte spreads shapes well enough.
        let slot = (usize::from(self.digest[0]) ^ usize::from(self.len)) % SHAPES;
        kept(
            &KNOWN_SHAPES,
            slot,
            |shape| shape.same(self),
            || (*self, self.make()),
        )
    }

    fn make(&self) -> [u8; 32] {
        let marks = &self.marks[..usize::from(self.len)];
        let mut bytes = [0u8; 3 + 32 + SHAPED_ARGS];
        bytes[0] = Tag::Shape as u8;
        bytes[1] = self.tag as u8;
        bytes[2] = self.len;
        bytes[3..35].copy_from_slice(&self.digest);
        bytes[35..35 + marks.len()].copy_from_slice(marks);
        *blake3::keyed_hash(&HASH_KEY, &bytes[..35 + marks.len()]).as_bytes()
    }

    /// The same call head and argument kinds (where the bytes start
    /// does not matter).
    fn same(&self, other: &Shape) -> bool {
        self.tag as u8 == other.tag as u8
            && self.len == other.len
            && self.digest == other.digest
            && self.marks[..usize::from(self.len)] == other.marks[..usize::from(other.len)]
    }
}

/// How many call shapes each thread keeps keys of (rule 6).
const SHAPES: usize = 8;

/// A thread's few kept digests, each by what it is of, in the slot its
/// hash picks ([`kept`]).
type Kept<K, const N: usize> = std::cell::RefCell<[Option<(K, [u8; 32])>; N]>;

/// A function's digest, kept per thread for the functions called last.
struct KnownFunction {
    id: std::any::TypeId,
    name: &'static str,
}

/// What `cache` (a thread's few entries, each in the slot its hash picks)
/// holds at `slot` for what `is` recognizes, made by `make` and kept there
/// when it holds something else; made afresh when the cache cannot be
/// reached (a hasher made while another uses it, or thread-locals torn
/// down).
fn kept<K, const N: usize>(
    cache: &'static std::thread::LocalKey<Kept<K, N>>,
    slot: usize,
    is: impl Fn(&K) -> bool,
    make: impl Fn() -> (K, [u8; 32]),
) -> [u8; 32] {
    let hit = cache.try_with(|known| {
        let mut known = known.try_borrow_mut().ok()?;
        match &known[slot] {
            Some((k, value)) if is(k) => Some(*value),
            _ => {
                let (k, value) = make();
                known[slot] = Some((k, value));
                Some(value)
            }
        }
    });
    match hit {
        Ok(Some(value)) => value,
        _ => make().1,
    }
}

/// How many functions each thread keeps digests of (a power of two).
const FUNCTIONS: usize = 16;

impl KnownFunction {
    /// The digest of calls of `F` named `name`: the tag, the name, the path
    /// and the type of `F` (rule 1), hashed as a key is.
    fn digest<F: 'static>(name: &'static str) -> [u8; 32] {
        let id = std::any::TypeId::of::<F>();
        // Any spread of ids will do for a slot: the cheap hash type maps
        // use, not the type tag's (a byte at a time).
        let slot = std::hash::BuildHasher::hash_one(
            &std::hash::BuildHasherDefault::<crate::build::graph::KeyHash>::default(),
            id,
        ) as usize
            % FUNCTIONS;
        // Equal names, not only equal addresses: nothing but the name's
        // content decides the digest.
        kept(
            &KNOWN,
            slot,
            |f| f.id == id && f.name == name,
            || (KnownFunction { id, name }, Self::make::<F>(name)),
        )
    }

    fn make<F: 'static>(name: &str) -> [u8; 32] {
        let mut h = KeyHasher::new(Tag::Function, name, std::any::type_name::<F>());
        h.type_id::<F>();
        h.finish().0
    }
}

thread_local! {
    /// The digests of the functions this thread called last, by type tag.
    static KNOWN: Kept<KnownFunction, FUNCTIONS> =
        const { std::cell::RefCell::new([const { None }; FUNCTIONS]) };

    /// The keys of the call shapes this thread hashed last (rule 6).
    static KNOWN_SHAPES: Kept<Shape, SHAPES> =
        const { std::cell::RefCell::new([None; SHAPES]) };

    /// The buffer of this thread's last finished hasher, for its next one:
    /// one allocation per thread rather than one per key. A hasher made
    /// while another is alive (an argument built inside a call's
    /// arguments) finds it taken and allocates its own.
    static SPARE: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Hands the buffer back for the next hasher, unless a large literal grew it.
impl Drop for KeyHasher {
    fn drop(&mut self) {
        if self.buf.capacity() <= BUFFER_LIMIT {
            let buf = std::mem::take(&mut self.buf);
            // `try_with`: a hasher dropped while thread-locals are torn down.
            let _ = SPARE.try_with(|spare| spare.set(buf));
        }
    }
}

/// Bytes that serialize as one run (`serialize_bytes`).
struct AsBytes<'a>(&'a [u8]);

impl Serialize for AsBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
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
    fn large_literals_stream_and_agree_with_small_ones() {
        // The same bytes give the same key whether they were buffered or
        // streamed, and a large literal hashes differently from its prefix.
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let key = |v: &[u8]| {
            let mut h = KeyHasher::new(Tag::Data, "value", "bytes");
            h.literal(v).unwrap();
            h.finish()
        };
        assert_eq!(key(&big), key(&big));
        assert_ne!(key(&big), key(&big[..99_999]));
        let mut manual = blake3::Hasher::new_keyed(&HASH_KEY);
        let mut h = KeyHasher::new(Tag::Data, "value", "bytes");
        manual.update(&h.buf);
        h.literal(&big[..]).unwrap();
        // A slice is a sequence of tagged bytes, then its end (`literal`).
        let mut encoded = vec![b'l', 0x18];
        for &b in &big {
            encoded.extend([0x07, b]);
        }
        encoded.push(0xf0);
        manual.update(&encoded);
        assert_eq!(h.finish(), Key(*manual.finalize().as_bytes()));
    }

    /// The key of `value` through the shortcut for lists of bytes and
    /// floats.
    fn fast<T: Serialize + 'static>(value: &T) -> Key {
        let mut h = KeyHasher::new(Tag::Data, "value", "list");
        h.literal_value(value).unwrap();
        h.finish()
    }

    /// Equal lists, equal keys; a list with one element changed, or one
    /// element fewer, another key.
    fn tells_apart<E: Clone + Serialize + 'static>(
        list: &[E],
        at: usize,
        other: impl Fn(&E) -> E,
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        let list = list.to_vec();
        proptest::prop_assert_eq!(fast(&list), fast(&list.clone()));
        if let Some(e) = list.get(at % list.len().max(1)) {
            let mut changed = list.clone();
            changed[at % list.len()] = other(e);
            proptest::prop_assert_ne!(fast(&list), fast(&changed));
            proptest::prop_assert_ne!(fast(&list), fast(&list[..list.len() - 1].to_vec()));
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, .. Default::default() })]

        /// The shortcut keeps distinct lists apart, across the buffer's
        /// limit too (16 KiB: 2 048 floats, 16 384 bytes).
        #[test]
        fn the_shortcut_keeps_lists_of_bytes_and_floats_apart(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..40_000),
            floats in proptest::collection::vec(proptest::num::f64::ANY, 0..5_000),
            small in proptest::collection::vec(proptest::num::f32::ANY, 0..5_000),
            at in 0_usize..40_000,
        ) {
            tells_apart(&bytes, at, |b| b.wrapping_add(1))?;
            tells_apart(&floats, at, |x| f64::from_bits(x.to_bits() ^ 1))?;
            tells_apart(&small, at, |x| f32::from_bits(x.to_bits() ^ 1))?;
        }
    }

    #[test]
    fn the_shortcut_tells_lists_apart() {
        assert_ne!(fast(&vec![0.0_f64]), fast(&vec![-0.0_f64]));
        assert_ne!(fast(&vec![1u8, 2]), fast(&vec![1u8, 2, 0]));
        // A list of one float is not the list of its eight bytes.
        let one = vec![1.5_f64];
        let its_bytes: Vec<u8> = 1.5_f64.to_bits().to_le_bytes().to_vec();
        assert_ne!(fast(&one), fast(&its_bytes));
    }

    fn call_key<F: 'static>(_: &F, name: &'static str) -> Key {
        KeyHasher::call::<F>(name, false).finish()
    }

    fn inc(x: i64) -> i64 {
        x + 1
    }

    fn dec(x: i64) -> i64 {
        x - 1
    }

    #[test]
    fn a_call_key_holds_its_function_and_its_name_however_often_asked() {
        let first = [
            call_key(&inc, "inc"),
            call_key(&inc, "f"),
            call_key(&dec, "inc"),
        ];
        assert_ne!(first[0], first[1]);
        assert_ne!(first[0], first[2]);
        assert_ne!(first[1], first[2]);
        for _ in 0..3 {
            let again = [
                call_key(&inc, "inc"),
                call_key(&inc, "f"),
                call_key(&dec, "inc"),
            ];
            assert_eq!(again, first);
        }
        // A thread that never called them makes each digest afresh.
        let elsewhere = std::thread::spawn(|| {
            [
                call_key(&inc, "inc"),
                call_key(&inc, "f"),
                call_key(&dec, "inc"),
            ]
        });
        assert_eq!(elsewhere.join().unwrap(), first);
    }

    #[test]
    fn more_functions_than_a_thread_keeps_keep_their_keys() {
        macro_rules! keys {
            ($($n:literal)+) => { vec![$(call_key(&|x: i64| x + $n, "f")),+] };
        }
        let round = || keys!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23);
        let first = round();
        assert!(first.len() > FUNCTIONS);
        let distinct: std::collections::HashSet<_> = first.iter().collect();
        assert_eq!(distinct.len(), first.len(), "distinct closures share a key");
        assert_eq!(round(), first);
    }

    /// The flat form of a call of `inc` (rule 6): its tag, its digest,
    /// then each argument's mark and bytes, under the context's key.
    fn flat(args: &[(u8, &[u8])]) -> Key {
        let mut bytes = vec![Tag::Call as u8];
        bytes.extend_from_slice(&KnownFunction::digest::<Inc>("inc"));
        for (mark, arg) in args {
            bytes.push(*mark);
            bytes.extend_from_slice(arg);
        }
        let mut h = blake3::Hasher::new_keyed(&HASH_KEY);
        h.update(&bytes);
        Key(*h.finalize().as_bytes())
    }

    /// A function type that captures nothing (rule 2: no nonce).
    struct Inc;

    fn inc_call() -> KeyHasher {
        KeyHasher::call::<Inc>("inc", false)
    }

    #[test]
    fn arguments_of_other_kinds_with_the_same_bytes_get_other_keys() {
        // Two inputs and two runs of raw bytes, 64 bytes in the buffer
        // either way: each input's key starts with the length prefix of
        // a run (24), and ends with the run.
        let key = |fill: u8| {
            let mut k = [fill; 32];
            k[..8].copy_from_slice(&24u64.to_le_bytes());
            k
        };
        let (first, second) = (key(7), key(9));
        let with = |f: &dyn Fn(&mut KeyHasher)| {
            let mut h = inc_call();
            f(&mut h);
            h
        };
        let inputs = with(&|h| {
            h.input(&Key(first));
            h.input(&Key(second));
        });
        let raw = with(&|h| {
            h.bytes(&first[8..]);
            h.bytes(&second[8..]);
        });
        assert_eq!(
            inputs.buf, raw.buf,
            "the same bytes, told apart by shape alone"
        );
        assert_ne!(inputs.finish(), raw.finish());
        // Again, with both shapes' keys kept by this thread now.
        let again = with(&|h| {
            h.input(&Key(first));
            h.input(&Key(second));
        });
        assert_eq!(again.finish(), inputs.finish());
        assert_ne!(again.finish(), raw.finish());
    }

    #[test]
    fn a_call_past_the_shapes_limits_is_hashed_flat_as_it_was_written() {
        // More arguments than a shape keeps.
        let keys: Vec<[u8; 32]> = (0..SHAPED_ARGS as u8 + 3).map(|i| [i; 32]).collect();
        let mut h = inc_call();
        for k in &keys {
            h.input(&Key(*k));
        }
        assert!(h.shape.is_none());
        let args: Vec<(u8, &[u8])> = keys.iter().map(|k| (b'k', &k[..])).collect();
        assert_eq!(h.finish(), flat(&args));
        // A literal past the buffer's limit, after an input.
        let big: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        let mut h = inc_call();
        h.input(&Key(keys[1]));
        h.literal_value(&big).unwrap();
        assert!(h.shape.is_none());
        // A run of bytes: its tag (`literal`'s `BYTES`), length and bytes.
        let mut lit = vec![0x10];
        lit.extend_from_slice(&(big.len() as u64).to_le_bytes());
        lit.extend_from_slice(&big);
        assert_eq!(h.finish(), flat(&[(b'k', &keys[1]), (b'l', &lit)]));
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
