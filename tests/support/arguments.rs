//! Arguments and operators (#16), one suite for every executor: nested
//! structures of `Delayed`s and futures, both operand orders, lazy
//! comparisons. `tests/executors.rs` runs it on `sync` and `threads:N` and
//! a loopback cluster, `tests/distributed.rs` on `local:2`.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rask::{delayed, value, Client, Config, Delayed};

pub fn nested_sum(groups: Vec<Vec<i64>>) -> i64 {
    groups.iter().flatten().sum()
}

pub fn by_name(m: BTreeMap<String, Option<i64>>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={}", v.map_or("-".to_string(), |v| v.to_string())))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn hashed(m: HashMap<u8, Vec<i64>>) -> i64 {
    m.iter()
        .map(|(k, v)| i64::from(*k) * v.iter().sum::<i64>())
        .sum()
}

pub fn three(a: [i64; 3]) -> i64 {
    a[0] * 100 + a[1] * 10 + a[2]
}

pub fn maybe(x: Option<i64>) -> i64 {
    x.unwrap_or(-1)
}

/// A list of options, and a pair of a string and shared bytes.
pub type Shaped = (Vec<Option<i64>>, (String, Arc<Vec<u8>>));

pub fn shaped(t: Shaped) -> String {
    format!("{:?} {} {}", t.0, (t.1).0, (t.1).1.len())
}

pub fn pair(x: i64) -> (i64, String) {
    (x * 2, format!("#{x}"))
}

pub fn list(n: i64) -> Vec<i64> {
    (0..n).collect()
}

pub fn table(n: i64) -> BTreeMap<String, i64> {
    (0..n).map(|i| (format!("k{i}"), i * i)).collect()
}

pub fn double(x: i64) -> i64 {
    x * 2
}

pub fn total(v: Vec<i64>) -> i64 {
    v.iter().sum()
}

/// The functions of this suite, for `rask::init`.
pub fn register(tasks: rask::Tasks) -> rask::Tasks {
    tasks
        .register(nested_sum)
        .register(by_name)
        .register(hashed)
        .register(three)
        .register(maybe)
        .register(shaped)
        .register(pair)
        .register(list)
        .register(table)
        .register(double)
        .register(total)
}

/// Nested structures, `Option`, maps and arrays of `Delayed`s as arguments.
pub fn nested_structures(config: &Config) {
    let v: Vec<Delayed<i64>> = (1..=4).map(value).collect();
    let d = delayed!(nested_sum(vec![
        vec![&v[0], &v[1]],
        vec![],
        vec![&v[2], &v[3]]
    ]));
    assert_eq!(d.compute_with(config).unwrap(), 10);
    let m = BTreeMap::from([
        ("a".to_string(), Some(&v[0])),
        ("b".to_string(), None),
        ("c".to_string(), Some(&v[2])),
    ]);
    assert_eq!(
        delayed!(by_name(m)).compute_with(config).unwrap(),
        "a=1,b=-,c=3"
    );
    let h = HashMap::from([(2_u8, vec![&v[0], &v[1]]), (10_u8, vec![&v[3]])]);
    assert_eq!(
        delayed!(hashed(h)).compute_with(config).unwrap(),
        2 * 3 + 10 * 4
    );
    assert_eq!(
        delayed!(three([&v[2], &v[0], &v[1]]))
            .compute_with(config)
            .unwrap(),
        312
    );
    assert_eq!(
        delayed!(maybe(Some(&v[3]))).compute_with(config).unwrap(),
        4
    );
    assert_eq!(
        delayed!(maybe(None::<Delayed<i64>>))
            .compute_with(config)
            .unwrap(),
        -1
    );
    let bytes = value(vec![0_u8; 1000]);
    let t = (vec![Some(&v[0]), None], (value("x".to_string()), &bytes));
    assert_eq!(
        delayed!(shaped(t)).compute_with(config).unwrap(),
        "[Some(1), None] x 1000"
    );
}

/// Futures inside structures, through a client of `config`.
pub fn futures_in_structures(config: &Config) {
    let client = Client::with_config(config).unwrap();
    let fs = client.map(double, 1..=3).unwrap();
    let nested = vec![vec![&fs[0]], vec![&fs[1], &fs[2]]];
    assert_eq!(
        delayed!(nested_sum(nested)).compute_with(config).unwrap(),
        12
    );
    let m = BTreeMap::from([("f".to_string(), Some(fs[1].clone()))]);
    let got = client
        .submit(delayed!(by_name(m)))
        .unwrap()
        .result()
        .unwrap();
    assert_eq!(got, "f=4");
}

/// `1 + &a` and lazy comparisons, under names unlike key equality.
pub fn operators(config: &Config) {
    let a = value(6_i64);
    let b = delayed!(double(2));
    assert_eq!((1 + &a).compute_with(config).unwrap(), 7);
    assert_eq!((100 - &b).compute_with(config).unwrap(), 96);
    assert_eq!((2 * b.clone()).compute_with(config).unwrap(), 8);
    assert_eq!((1.5 * &value(2.0_f64)).compute_with(config).unwrap(), 3.0);
    assert!(a.lazy_eq(6).compute_with(config).unwrap());
    assert!(a.lazy_ne(&b).compute_with(config).unwrap());
    assert!(b.lt(&a).compute_with(config).unwrap());
    assert!(!b.ge(5).compute_with(config).unwrap());
    // `==` compares keys: the same work, not equal values.
    assert!(a != value(7));
    assert!(a == value(6));
}

/// Parts of values: tuple elements, list elements, map values, and `map`.
pub fn parts(config: &Config) {
    let (doubled, label) = delayed!(pair(21)).split();
    let got = rask::compute_with((&doubled, &label), config).unwrap();
    assert_eq!(got, (42, "#21".to_string()));
    assert_eq!(delayed!(double(&doubled)).compute_with(config).unwrap(), 84);
    let l = delayed!(list(5));
    assert_eq!(l.item(3).compute_with(config).unwrap(), 3);
    let both = rask::compute_with((&l.item(0), &l.item(4)), config).unwrap();
    assert_eq!(both, (0, 4));
    let err = l.item(9).compute_with(config).unwrap_err();
    assert!(format!("{err:#}").contains("out of range"), "{err:#}");
    let t = delayed!(table(4));
    assert_eq!(t.item("k3".to_string()).compute_with(config).unwrap(), 9);
    let err = t.item("zz".to_string()).compute_with(config).unwrap_err();
    assert!(format!("{err:#}").contains("not in the map"), "{err:#}");
    let chained = delayed!(list(4)).map(total).map(double);
    assert_eq!(chained.compute_with(config).unwrap(), 12);
    assert_eq!(chained.name(), "double");
    assert_eq!(l.item(2).key(), l.item(2).key());
    assert_ne!(l.item(2).key(), l.item(3).key());
}
