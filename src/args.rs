//! How the arguments of `delayed!(f(a, b, ...))` become task inputs.
//!
//! Each argument converts, through [`IntoArg<A>`] (where `A` is the type of
//! the function's parameter), into a *slot* stored in the task: a literal kept
//! by value, or a reference to one or more input tasks. The slot also feeds
//! the task key: a literal's bytes, or its inputs' keys.
//!
//! | argument | parameter | how it is passed |
//! |---|---|---|
//! | `x: T` (plain value) | `T` | literal, hashed into the key |
//! | `Delayed<T>`, `&Delayed<T>` | `T` | the task's result (moved if last use, else cloned) |
//! | `Delayed<T>`, `&Delayed<T>` | `Arc<T>` | the task's result, shared without a copy |
//! | `Vec<Delayed<T>>`, `&[Delayed<T>]`, `&Vec<Delayed<T>>` | `Vec<T>` | each element's result, in order |
//! | `(Delayed<A>, Delayed<B>)`, `(&Delayed<A>, &Delayed<B>)` (up to 4) | `(A, B)` | each element's result |
//! | [`Untraversed<T>`] | `T` | the value as is, even if it holds `Delayed`s |

use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;

use rask_executor::{OpError, Value, WireError, WireTask};

use crate::data::Data;
use crate::delayed::Delayed;
use crate::key::KeyHasher;
use crate::node::{Broken, Call, Inputs, Name, Node, Returns, Typed};
use crate::registry::{Payload, WireArg};

/// Converts a `delayed!` argument into an input of a parameter of type `A`.
///
/// Implemented for plain values, `Delayed`s and collections of them (see the
/// [module table](crate#arguments)); not meant to be implemented outside rask.
pub trait IntoArg<A> {
    #[doc(hidden)]
    type Slot: Slot<A>;
    #[doc(hidden)]
    fn into_arg(self, args: &mut Args) -> Self::Slot;
}

/// The stored form of one argument; produces the parameter value at run time.
#[doc(hidden)]
pub trait Slot<A>: Send + Sync + 'static {
    fn extract(&self, inputs: &mut Inputs<'_>) -> Result<A, OpError>;
    /// The slot as it travels to another process.
    fn wire(&self) -> Result<WireArg, WireError>;
}

/// Collects a task's inputs and key while its arguments are converted.
#[doc(hidden)]
pub struct Args {
    hasher: KeyHasher,
    deps: Vec<Arc<Node>>,
    error: Option<String>,
    position: usize,
}

impl Args {
    /// The arguments of a call of `F` named `name` (see `KeyHasher::call`).
    pub(crate) fn call<F: 'static>(name: &str) -> Self {
        Args {
            hasher: KeyHasher::call::<F>(name),
            deps: Vec::new(),
            error: None,
            position: 0,
        }
    }

    fn next_position(&mut self) {
        self.position += 1;
    }

    pub(crate) fn input(&mut self, node: &Arc<Node>) {
        self.hasher.input(&node.key);
        self.deps.push(node.clone());
    }

    fn literal<T: serde::Serialize + ?Sized>(&mut self, value: &T) {
        if let Err(e) = self.hasher.literal(value) {
            self.error.get_or_insert_with(|| {
                format!(
                    "argument {} of type `{}` could not be serialized for its key: {e}",
                    self.position,
                    std::any::type_name::<T>()
                )
            });
        }
    }

    fn hashed<T: Hash + ?Sized>(&mut self, value: &T) {
        struct StdHasher<'a>(&'a mut KeyHasher);
        impl std::hash::Hasher for StdHasher<'_> {
            fn finish(&self) -> u64 {
                0
            }
            fn write(&mut self, bytes: &[u8]) {
                self.0.bytes(bytes);
            }
        }
        value.hash(&mut StdHasher(&mut self.hasher));
    }

    pub(crate) fn finish<T>(self, name: Name, call: impl Call) -> Delayed<T> {
        let key = self.hasher.finish();
        let call: Arc<dyn Call> = match self.error {
            None => Arc::new(call),
            Some(message) => Arc::new(Broken(message)),
        };
        Delayed::from_node(Arc::new(Node {
            key,
            name,
            deps: self.deps.into(),
            call,
        }))
    }
}

/// A plain value argument, kept in the task.
#[doc(hidden)]
pub struct Literal<T>(T);

impl<T: Data> Slot<T> for Literal<T> {
    #[inline]
    fn extract(&self, _: &mut Inputs<'_>) -> Result<T, OpError> {
        Ok(self.0.clone())
    }
    fn wire(&self) -> Result<WireArg, WireError> {
        crate::registry::encode_literal(&self.0).map(WireArg::Literal)
    }
}

/// An [`Untraversed`] value, kept in the task; it never leaves the process.
#[doc(hidden)]
pub struct Opaque<T>(T);

impl<T: Clone + Send + Sync + 'static> Slot<T> for Opaque<T> {
    #[inline]
    fn extract(&self, _: &mut Inputs<'_>) -> Result<T, OpError> {
        Ok(self.0.clone())
    }
    fn wire(&self) -> Result<WireArg, WireError> {
        Err(WireError::NotSerializable {
            what: format!("an untraversed `{}`", std::any::type_name::<T>()),
        })
    }
}

/// One task input passed by value.
#[doc(hidden)]
pub struct Owned<T>(PhantomData<fn() -> T>);

impl<T: Data> Slot<T> for Owned<T> {
    #[inline]
    fn extract(&self, inputs: &mut Inputs<'_>) -> Result<T, OpError> {
        inputs.owned::<T>()
    }
    fn wire(&self) -> Result<WireArg, WireError> {
        Ok(WireArg::One)
    }
}

/// One task input passed as a shared `Arc<T>`.
#[doc(hidden)]
pub struct Shared<T>(PhantomData<fn() -> T>);

impl<T: Data> Slot<Arc<T>> for Shared<T> {
    #[inline]
    fn extract(&self, inputs: &mut Inputs<'_>) -> Result<Arc<T>, OpError> {
        inputs.shared::<T>()
    }
    fn wire(&self) -> Result<WireArg, WireError> {
        Ok(WireArg::One)
    }
}

/// `n` task inputs collected into a `Vec<T>`.
#[doc(hidden)]
pub struct Many<T>(usize, PhantomData<fn() -> T>);

impl<T: Data> Slot<Vec<T>> for Many<T> {
    fn extract(&self, inputs: &mut Inputs<'_>) -> Result<Vec<T>, OpError> {
        (0..self.0).map(|_| inputs.owned::<T>()).collect()
    }
    fn wire(&self) -> Result<WireArg, WireError> {
        let n = u32::try_from(self.0).map_err(|_| WireError::NotSerializable {
            what: format!("a list of {} task inputs (at most 2^32 - 1 travel)", self.0),
        })?;
        Ok(WireArg::Many(n))
    }
}

impl<T: Data> IntoArg<T> for T {
    type Slot = Literal<T>;
    fn into_arg(self, args: &mut Args) -> Literal<T> {
        args.literal(&self);
        args.next_position();
        Literal(self)
    }
}

impl<T: Data> IntoArg<T> for &Delayed<T> {
    type Slot = Owned<T>;
    fn into_arg(self, args: &mut Args) -> Owned<T> {
        args.input(self.node());
        args.next_position();
        Owned(PhantomData)
    }
}

impl<T: Data> IntoArg<T> for Delayed<T> {
    type Slot = Owned<T>;
    fn into_arg(self, args: &mut Args) -> Owned<T> {
        <&Delayed<T> as IntoArg<T>>::into_arg(&self, args)
    }
}

impl<T: Data> IntoArg<Arc<T>> for &Delayed<T> {
    type Slot = Shared<T>;
    fn into_arg(self, args: &mut Args) -> Shared<T> {
        args.input(self.node());
        args.next_position();
        Shared(PhantomData)
    }
}

impl<T: Data> IntoArg<Arc<T>> for Delayed<T> {
    type Slot = Shared<T>;
    fn into_arg(self, args: &mut Args) -> Shared<T> {
        <&Delayed<T> as IntoArg<Arc<T>>>::into_arg(&self, args)
    }
}

impl<T: Data> IntoArg<Vec<T>> for &[Delayed<T>] {
    type Slot = Many<T>;
    fn into_arg(self, args: &mut Args) -> Many<T> {
        // The count is part of the key so `[a, b]` and `[a], b` differ.
        args.hasher.bytes(&(self.len() as u64).to_le_bytes());
        for d in self {
            args.input(d.node());
        }
        args.next_position();
        Many(self.len(), PhantomData)
    }
}

impl<T: Data> IntoArg<Vec<T>> for &Vec<Delayed<T>> {
    type Slot = Many<T>;
    fn into_arg(self, args: &mut Args) -> Many<T> {
        self.as_slice().into_arg(args)
    }
}

impl<T: Data> IntoArg<Vec<T>> for Vec<Delayed<T>> {
    type Slot = Many<T>;
    fn into_arg(self, args: &mut Args) -> Many<T> {
        self.as_slice().into_arg(args)
    }
}

/// Tuples of task inputs, each element by value.
#[doc(hidden)]
pub struct TupleOf<T>(PhantomData<fn() -> T>);

macro_rules! tuple_args {
    ($($t:ident),+) => {
        impl<$($t: Data),+> Slot<($($t,)+)> for TupleOf<($($t,)+)> {
            fn extract(&self, inputs: &mut Inputs<'_>) -> Result<($($t,)+), OpError> {
                Ok(($(inputs.owned::<$t>()?,)+))
            }
            fn wire(&self) -> Result<WireArg, WireError> {
                Ok(WireArg::Tuple([$(stringify!($t)),+].len() as u32))
            }
        }
        impl<$($t: Data),+> IntoArg<($($t,)+)> for ($(&Delayed<$t>,)+) {
            type Slot = TupleOf<($($t,)+)>;
            #[allow(non_snake_case)]
            fn into_arg(self, args: &mut Args) -> Self::Slot {
                let ($($t,)+) = self;
                $(args.input($t.node());)+
                args.next_position();
                TupleOf(PhantomData)
            }
        }
        impl<$($t: Data),+> IntoArg<($($t,)+)> for ($(Delayed<$t>,)+) {
            type Slot = TupleOf<($($t,)+)>;
            #[allow(non_snake_case)]
            fn into_arg(self, args: &mut Args) -> Self::Slot {
                let ($($t,)+) = self;
                $(args.input($t.node());)+
                args.next_position();
                TupleOf(PhantomData)
            }
        }
    };
}

tuple_args!(A, B);
tuple_args!(A, B, C);
tuple_args!(A, B, C, D);

/// Passes a value to a task as is, without looking for `Delayed`s inside it.
///
/// The function receives the value itself: a `Vec<Delayed<T>>` stays a list
/// of handles (the task may compute them itself) instead of becoming a list
/// of results. The key hashes the value with [`std::hash::Hash`] (a
/// `Delayed` hashes as its key). Untraversed values never leave the process,
/// so they are for local executors only.
///
/// # Examples
///
/// ```
/// use rask::{delayed, Delayed, Untraversed};
///
/// fn count(parts: Vec<Delayed<i64>>) -> usize { parts.len() }
///
/// let parts = vec![rask::value(1), rask::value(2)];
/// let n = delayed!(count(Untraversed(parts)));
/// assert_eq!(n.compute().unwrap(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct Untraversed<T>(pub T);

impl<T: Hash + Clone + Send + Sync + 'static> IntoArg<T> for Untraversed<T> {
    type Slot = Opaque<T>;
    fn into_arg(self, args: &mut Args) -> Opaque<T> {
        args.hasher.bytes(b"untraversed");
        args.hashed(&self.0);
        args.next_position();
        Opaque(self.0)
    }
}

/// A function applied to converted arguments: the engine of `delayed!`.
///
/// `Xs` is the tuple of arguments as written, `Sig` the function's signature
/// (it only guides type inference), `M` how the result is returned.
#[doc(hidden)]
pub trait Apply<M, Xs, Sig> {
    type Out;
    fn apply(self, name: &'static str, xs: Xs) -> Delayed<Self::Out>;
}

macro_rules! apply {
    ($($a:ident $x:ident $s:ident $i:tt),*) => {
        impl<F, M, R, $($a, $x),*> Apply<M, ($($x,)*), fn($($a),*) -> R> for F
        where
            F: Fn($($a),*) -> R + Send + Sync + 'static,
            M: Returns<R>,
            R: 'static,
            $($a: 'static, $x: IntoArg<$a>,)*
        {
            type Out = M::Out;
            #[allow(unused_variables, unused_mut, non_snake_case)]
            fn apply(self, name: &'static str, xs: ($($x,)*)) -> Delayed<M::Out> {
                let short = short_name(name);
                let mut args = Args::call::<F>(short);
                let ($($x,)*) = xs;
                let slots = ($($x.into_arg(&mut args),)*);
                let call = Typed::<F, M, _, fn($($a),*) -> R> { f: self, slots, _sig: PhantomData };
                args.finish(Name::Borrowed(short), call)
            }
        }

        impl<F, M, R, $($a, $s),*> Call for Typed<F, M, ($($s,)*), fn($($a),*) -> R>
        where
            F: Fn($($a),*) -> R + Send + Sync + 'static,
            M: Returns<R>,
            R: 'static,
            $($a: 'static, $s: Slot<$a>,)*
        {
            #[allow(unused_variables, unused_mut)]
            fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
                let mut inputs = Inputs::new(inputs);
                let out = (self.f)($(self.slots.$i.extract(&mut inputs)?),*);
                Ok(Arc::new(M::finish(out)?))
            }

            fn sendable(&self) -> Result<(), WireError> {
                let function = crate::registry::function_id::<F>()?;
                crate::registry::check_registered(&function, M::FALLIBLE)
            }

            fn to_wire(&self) -> Result<WireTask, WireError> {
                let function = crate::registry::function_id::<F>()?;
                crate::registry::check_registered(&function, M::FALLIBLE)?;
                let payload = Payload {
                    fallible: M::FALLIBLE,
                    args: vec![$(self.slots.$i.wire()?),*],
                };
                Ok(WireTask { function, payload: payload.encode()? })
            }
        }
    };
}

apply!();
apply!(A0 X0 S0 0);
apply!(A0 X0 S0 0, A1 X1 S1 1);
apply!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2);
apply!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2, A3 X3 S3 3);
apply!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2, A3 X3 S3 3, A4 X4 S4 4);
apply!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2, A3 X3 S3 3, A4 X4 S4 4, A5 X5 S5 5);
apply!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2, A3 X3 S3 3, A4 X4 S4 4, A5 X5 S5 5, A6 X6 S6 6);
apply!(A0 X0 S0 0, A1 X1 S1 1, A2 X2 S2 2, A3 X3 S3 3, A4 X4 S4 4, A5 X5 S5 5, A6 X6 S6 6, A7 X7 S7 7);

/// The last path segment of a function path as `stringify!` writes it.
fn short_name(path: &'static str) -> &'static str {
    path.rsplit("::").next().unwrap_or(path).trim()
}

/// Entry point of the `delayed!` macro.
#[doc(hidden)]
pub fn apply<M, Xs, Sig, F: Apply<M, Xs, Sig>>(
    name: &'static str,
    f: F,
    xs: Xs,
) -> Delayed<F::Out> {
    f.apply(name, xs)
}
