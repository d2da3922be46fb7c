//! Operators on `Delayed`: `&a + &b`, `&a * 2`, `-&a`, and comparison methods,
//! each building one task.

use std::ops::{Add, BitAnd, BitOr, BitXor, Div, Mul, Neg, Not, Rem, Sub};

use crate::build::args::{apply, IntoArg};
use crate::build::data::Data;
use crate::build::delayed::Delayed;
use crate::build::node::Plain;

/// A one-argument task calling the function item `f` (its type names the
/// operator and its operand types, which is its identity on the wire).
fn build1<F, A, R, X, K>(name: &'static &'static str, f: F, a: X) -> Delayed<R>
where
    F: Fn(A) -> R + Send + Sync + 'static,
    A: 'static,
    R: Data,
    X: IntoArg<A, K>,
{
    apply::<Plain, _, _, _, _>(name, f, (a,))
}

/// A two-argument task calling the function item `f`.
fn build2<F, A, B, R, X, Y, K, L>(name: &'static &'static str, f: F, a: X, b: Y) -> Delayed<R>
where
    F: Fn(A, B) -> R + Send + Sync + 'static,
    A: 'static,
    B: 'static,
    R: Data,
    X: IntoArg<A, K>,
    Y: IntoArg<B, L>,
{
    apply::<Plain, _, _, _, _>(name, f, (a, b))
}

/// Registers the operator tasks on primitive operands of one type, so
/// graphs using operators run on a cluster without listing them.
pub(crate) fn builtins(mut tasks: crate::Tasks) -> crate::Tasks {
    use cmp::{ge, gt, lazy_eq, lazy_ne, le, lt};
    macro_rules! one {
        ($f:ident: $($t:ty)*) => {$(tasks = tasks.register($f::<$t>);)*};
    }
    macro_rules! two {
        ($f:ident: $($t:ty)*) => {$(tasks = tasks.register($f::<$t, $t>);)*};
    }
    two!(add: i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize f32 f64);
    two!(sub: i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize f32 f64);
    two!(mul: i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize f32 f64);
    two!(div: i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize f32 f64);
    two!(rem: i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize f32 f64);
    two!(bitand: i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize bool);
    two!(bitor: i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize bool);
    two!(bitxor: i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize bool);
    one!(neg: i8 i16 i32 i64 i128 isize f32 f64);
    one!(not: i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize bool);
    one!(lt: i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize f32 f64 bool String);
    one!(le: i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize f32 f64 bool String);
    one!(gt: i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize f32 f64 bool String);
    one!(ge: i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize f32 f64 bool String);
    one!(lazy_eq: i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize f32 f64 bool String);
    one!(lazy_ne: i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize f32 f64 bool String);
    tasks
}

macro_rules! binary {
    ($trait:ident $method:ident) => {
        fn $method<T: $trait<U>, U>(a: T, b: U) -> T::Output {
            $trait::$method(a, b)
        }

        impl<T, U> $trait<&Delayed<U>> for &Delayed<T>
        where
            T: Data + $trait<U>,
            U: Data,
            T::Output: Data,
        {
            type Output = Delayed<T::Output>;
            fn $method(self, rhs: &Delayed<U>) -> Self::Output {
                build2(&stringify!($method), $method::<T, U>, self, rhs)
            }
        }

        impl<T, U> $trait<Delayed<U>> for Delayed<T>
        where
            T: Data + $trait<U>,
            U: Data,
            T::Output: Data,
        {
            type Output = Delayed<T::Output>;
            fn $method(self, rhs: Delayed<U>) -> Self::Output {
                build2(&stringify!($method), $method::<T, U>, &self, &rhs)
            }
        }

        impl<T, U> $trait<&Delayed<U>> for Delayed<T>
        where
            T: Data + $trait<U>,
            U: Data,
            T::Output: Data,
        {
            type Output = Delayed<T::Output>;
            fn $method(self, rhs: &Delayed<U>) -> Self::Output {
                build2(&stringify!($method), $method::<T, U>, &self, rhs)
            }
        }

        impl<T, U> $trait<Delayed<U>> for &Delayed<T>
        where
            T: Data + $trait<U>,
            U: Data,
            T::Output: Data,
        {
            type Output = Delayed<T::Output>;
            fn $method(self, rhs: Delayed<U>) -> Self::Output {
                build2(&stringify!($method), $method::<T, U>, self, &rhs)
            }
        }

        binary!(@literals $trait $method i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize f32 f64 bool String);
    };
    (@literals $trait:ident $method:ident $($lit:ty)*) => {$(
        impl<T> $trait<$lit> for &Delayed<T>
        where
            T: Data + $trait<$lit>,
            T::Output: Data,
        {
            type Output = Delayed<T::Output>;
            fn $method(self, rhs: $lit) -> Self::Output {
                build2(&stringify!($method), $method::<T, $lit>, self, rhs)
            }
        }

        impl<T> $trait<$lit> for Delayed<T>
        where
            T: Data + $trait<$lit>,
            T::Output: Data,
        {
            type Output = Delayed<T::Output>;
            fn $method(self, rhs: $lit) -> Self::Output {
                build2(&stringify!($method), $method::<T, $lit>, &self, rhs)
            }
        }

        /// The plain value on the left: `1 + &a`.
        impl<T> $trait<&Delayed<T>> for $lit
        where
            T: Data,
            $lit: $trait<T>,
            <$lit as $trait<T>>::Output: Data,
        {
            type Output = Delayed<<$lit as $trait<T>>::Output>;
            fn $method(self, rhs: &Delayed<T>) -> Self::Output {
                build2(&stringify!($method), $method::<$lit, T>, self, rhs)
            }
        }

        /// The plain value on the left: `1 + a`.
        impl<T> $trait<Delayed<T>> for $lit
        where
            T: Data,
            $lit: $trait<T>,
            <$lit as $trait<T>>::Output: Data,
        {
            type Output = Delayed<<$lit as $trait<T>>::Output>;
            fn $method(self, rhs: Delayed<T>) -> Self::Output {
                build2(&stringify!($method), $method::<$lit, T>, self, &rhs)
            }
        }
    )*};
}

binary!(Add add);
binary!(Sub sub);
binary!(Mul mul);
binary!(Div div);
binary!(Rem rem);
binary!(BitAnd bitand);
binary!(BitOr bitor);
binary!(BitXor bitxor);

macro_rules! unary {
    ($trait:ident $method:ident) => {
        fn $method<T: $trait>(a: T) -> T::Output {
            $trait::$method(a)
        }

        impl<T> $trait for &Delayed<T>
        where
            T: Data + $trait,
            T::Output: Data,
        {
            type Output = Delayed<T::Output>;
            fn $method(self) -> Self::Output {
                build1(&stringify!($method), $method::<T>, self)
            }
        }

        impl<T> $trait for Delayed<T>
        where
            T: Data + $trait,
            T::Output: Data,
        {
            type Output = Delayed<T::Output>;
            fn $method(self) -> Self::Output {
                build1(&stringify!($method), $method::<T>, &self)
            }
        }
    };
}

unary!(Neg neg);
unary!(Not not);

macro_rules! comparisons {
    ($($method:ident $task:literal $op:tt $bound:ident $doc:literal),*) => {
        mod cmp {
            $(pub(super) fn $method<T: $bound>(a: T, b: T) -> bool { a $op b })*
        }
        impl<T: Data> Delayed<T> {
            $(
                #[doc = $doc]
                ///
                /// `rhs` may be a plain value or another `Delayed`, as in
                /// [`delayed!`](crate::delayed!).
                ///
                /// ```
                /// let (a, b) = (rask::value(1), rask::value(2));
                #[doc = concat!("let lazy = a.", stringify!($method), "(&b);")]
                #[doc = concat!("assert_eq!(lazy.compute()?, 1 ", stringify!($op), " 2);")]
                /// # Ok::<(), rask::Error>(())
                /// ```
                pub fn $method<X: IntoArg<T, K>, K>(&self, rhs: X) -> Delayed<bool>
                where
                    T: $bound,
                {
                    build2(&$task, cmp::$method::<T>, self, rhs)
                }
            )*
        }
    };
}

comparisons!(
    lt "lt" < PartialOrd "A task computing `self < rhs`.",
    le "le" <= PartialOrd "A task computing `self <= rhs`.",
    gt "gt" > PartialOrd "A task computing `self > rhs`.",
    ge "ge" >= PartialOrd "A task computing `self >= rhs`.",
    lazy_eq "eq" == PartialEq "A task computing `self == rhs`: a lazy `Delayed<bool>`, unlike \
        `==` on two `Delayed`s, which compares their keys (whether they are the same work).",
    lazy_ne "ne" != PartialEq "A task computing `self != rhs`: a lazy `Delayed<bool>`, unlike \
        `!=` on two `Delayed`s, which compares their keys."
);

#[cfg(test)]
mod tests {
    use crate::{value, Config};

    #[test]
    fn operators_build_tasks() {
        let a = value(6_i64);
        let b = value(4_i64);
        let c = Config::synchronous();
        assert_eq!((&a + &b).compute_with(&c).unwrap(), 10);
        assert_eq!((&a - 1).compute_with(&c).unwrap(), 5);
        assert_eq!((&a * &b).compute_with(&c).unwrap(), 24);
        assert_eq!((a.clone() / b.clone()).compute_with(&c).unwrap(), 1);
        assert_eq!((&a % 4).compute_with(&c).unwrap(), 2);
        assert_eq!((-&a).compute_with(&c).unwrap(), -6);
        assert!(a.gt(&b).compute_with(&c).unwrap());
        assert!(!a.lt(3).compute_with(&c).unwrap());
        assert!(a.lazy_eq(6).compute_with(&c).unwrap());
        assert!(!a.lazy_ne(&a).compute_with(&c).unwrap());
        assert_eq!((1 + &a).compute_with(&c).unwrap(), 7);
        assert_eq!((10 - a.clone()).compute_with(&c).unwrap(), 4);
        assert_eq!((1 + &a).key(), (1 + &a).key());
        assert_ne!((1 - &a).key(), (&a - 1).key());
        assert!(!(!value(true)).compute_with(&c).unwrap());
        assert_eq!((&a + &b).key(), (&a + &b).key());
        assert_ne!((&a + &b).key(), (&a - &b).key());
    }
}
