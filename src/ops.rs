//! Operators on `Delayed`: `&a + &b`, `&a * 2`, `-&a`, and comparison methods,
//! each building one task.

use std::ops::{Add, BitAnd, BitOr, BitXor, Div, Mul, Neg, Not, Rem, Sub};

use crate::args::{apply, IntoArg};
use crate::data::Data;
use crate::delayed::Delayed;
use crate::node::Plain;

/// A one-argument task calling `f`.
fn build1<A, R, X>(name: &'static str, f: fn(A) -> R, a: X) -> Delayed<R>
where
    A: 'static,
    R: Data,
    X: IntoArg<A>,
{
    apply::<Plain, _, _, _>(name, f, (a,))
}

/// A two-argument task calling `f`.
fn build2<A, B, R, X, Y>(name: &'static str, f: fn(A, B) -> R, a: X, b: Y) -> Delayed<R>
where
    A: 'static,
    B: 'static,
    R: Data,
    X: IntoArg<A>,
    Y: IntoArg<B>,
{
    apply::<Plain, _, _, _>(name, f, (a, b))
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
                build2(stringify!($method), $method::<T, U>, self, rhs)
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
                build2(stringify!($method), $method::<T, U>, &self, &rhs)
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
                build2(stringify!($method), $method::<T, U>, &self, rhs)
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
                build2(stringify!($method), $method::<T, U>, self, &rhs)
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
                build2(stringify!($method), $method::<T, $lit>, self, rhs)
            }
        }

        impl<T> $trait<$lit> for Delayed<T>
        where
            T: Data + $trait<$lit>,
            T::Output: Data,
        {
            type Output = Delayed<T::Output>;
            fn $method(self, rhs: $lit) -> Self::Output {
                build2(stringify!($method), $method::<T, $lit>, &self, rhs)
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
                build1(stringify!($method), $method::<T>, self)
            }
        }

        impl<T> $trait for Delayed<T>
        where
            T: Data + $trait,
            T::Output: Data,
        {
            type Output = Delayed<T::Output>;
            fn $method(self) -> Self::Output {
                build1(stringify!($method), $method::<T>, &self)
            }
        }
    };
}

unary!(Neg neg);
unary!(Not not);

macro_rules! comparisons {
    ($($method:ident $op:tt $bound:ident $doc:literal),*) => {
        mod cmp {
            $(pub(super) fn $method<T: $bound>(a: T, b: T) -> bool { a $op b })*
        }
        impl<T: Data> Delayed<T> {
            $(
                #[doc = $doc]
                ///
                /// `rhs` may be a plain value or another `Delayed`, as in
                /// [`delayed!`](crate::delayed!).
                pub fn $method<X: IntoArg<T>>(&self, rhs: X) -> Delayed<bool>
                where
                    T: $bound,
                {
                    build2(stringify!($method), cmp::$method::<T>, self, rhs)
                }
            )*
        }
    };
}

comparisons!(
    lt < PartialOrd "A task computing `self < rhs`.",
    le <= PartialOrd "A task computing `self <= rhs`.",
    gt > PartialOrd "A task computing `self > rhs`.",
    ge >= PartialOrd "A task computing `self >= rhs`.",
    eq == PartialEq "A task computing `self == rhs`.",
    ne != PartialEq "A task computing `self != rhs`."
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
        assert!(a.eq(6).compute_with(&c).unwrap());
        assert!(!(!value(true)).compute_with(&c).unwrap());
        assert_eq!((&a + &b).key(), (&a + &b).key());
        assert_ne!((&a + &b).key(), (&a - &b).key());
    }
}
