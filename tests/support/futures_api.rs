//! The futures API of #16, one suite for every client: `map_zip` over
//! several iterables, `as_completed` as a `Stream` and in batches, `wait`
//! and `as_completed` over futures of different value types, and
//! `scatter_with(.., broadcast)`. `tests/futures.rs` runs it on `sync`,
//! `threads:2` and a loopback cluster, `tests/distributed.rs` on `local:2`.
#![allow(dead_code, unreachable_pub)]

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures_core::{FusedStream, Stream};
use rask::{as_completed, delayed, wait, wait_first, AnyFuture, Client, Future};

pub fn plus(x: i64, y: i64) -> i64 {
    x + y
}

pub fn affine(x: i64, by: i64, offset: i64) -> i64 {
    x * by + offset
}

pub fn label(x: i64) -> String {
    format!("#{x}")
}

pub fn bytes_len(data: Arc<Vec<u8>>) -> usize {
    data.len()
}

/// Adds this suite's functions to `tasks`.
pub fn register(tasks: rask::Tasks) -> rask::Tasks {
    tasks
        .register(plus)
        .register(affine)
        .register(label)
        .register(bytes_len)
        .register(double)
}

/// Dask's `client.map(f, xs, ys)`: items in step, futures among them, the
/// shortest iterable setting the length.
pub fn map_over_several_iterables(client: &Client) {
    let sums = client.map_zip(plus, (0..100, 1000..1100)).unwrap();
    assert_eq!(
        client.gather(&sums).unwrap(),
        (0..100).map(|i| 1000 + 2 * i).collect::<Vec<i64>>()
    );
    // Same work, same keys as `delayed!`.
    assert_eq!(sums[3].key(), delayed!(plus(3, 1003)).key());
    // Futures as items, three iterables, the shortest (2 items) wins.
    let some = client
        .map_zip(affine, (&sums[..3], vec![2, 3], std::iter::repeat(1)))
        .unwrap();
    assert_eq!(client.gather(&some).unwrap(), vec![2001, 3007]);
    // An empty iterable: no futures, nothing submitted.
    let none = client.map_zip(plus, (0..10, Vec::<i64>::new())).unwrap();
    assert!(none.is_empty());
    // One iterable is `map`.
    let one = client.map_zip(label, (0..3,)).unwrap();
    assert_eq!(client.gather(&one).unwrap(), vec!["#0", "#1", "#2"]);
}

/// Wakes a parked thread and counts the wake-ups.
struct Unpark {
    thread: std::thread::Thread,
    wakes: std::sync::atomic::AtomicUsize,
}

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.wakes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.thread.unpark();
    }
}

/// Drains `stream` on this thread, parking between polls; the stream must
/// wake it (the park has a 30 s limit, a missed wake-up fails). Returns the
/// items and the number of polls.
pub fn drain<S: Stream + Unpin>(mut stream: S) -> (Vec<S::Item>, usize) {
    let unpark = Arc::new(Unpark {
        thread: std::thread::current(),
        wakes: 0.into(),
    });
    let waker = Waker::from(unpark.clone());
    let mut cx = Context::from_waker(&waker);
    let (mut items, mut polls) = (Vec::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        polls += 1;
        match Pin::new(&mut stream).poll_next(&mut cx) {
            Poll::Ready(Some(item)) => items.push(item),
            Poll::Ready(None) => return (items, polls),
            Poll::Pending => {
                let woken = unpark.wakes.load(std::sync::atomic::Ordering::SeqCst);
                while unpark.wakes.load(std::sync::atomic::Ordering::SeqCst) == woken {
                    let left = deadline.saturating_duration_since(Instant::now());
                    assert!(!left.is_zero(), "the stream never woke its task");
                    std::thread::park_timeout(left);
                }
            }
        }
    }
}

/// `as_completed` as a `futures_core::Stream`: every future comes out,
/// woken by completion (a bounded number of polls, no busy loop).
pub fn as_completed_is_a_stream(client: &Client) {
    let seq = as_completed(client.map(label, 0..40).unwrap());
    assert_eq!(Stream::size_hint(&seq), (40, Some(40)));
    assert_eq!(Iterator::size_hint(&seq), (40, Some(40)));
    let (done, polls) = drain(seq);
    let mut got = client.gather(&done).unwrap();
    got.sort();
    let mut want: Vec<String> = (0..40).map(|i| format!("#{i}")).collect();
    want.sort();
    assert_eq!(got, want);
    // One poll per item, one per wake-up and the first, plus the end.
    assert!(polls <= 2 * 40 + 2, "{polls} polls for 40 futures");
    // Ended: `None` again, and fused.
    let mut empty = as_completed(Vec::<Future<i64>>::new());
    assert!(empty.is_terminated());
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    assert!(matches!(
        Pin::new(&mut empty).poll_next(&mut cx),
        Poll::Ready(None)
    ));
    // Work added between polls is yielded too.
    let mut seq = as_completed(client.map(label, 100..103).unwrap());
    let mut cx = Context::from_waker(waker);
    let first = loop {
        if let Poll::Ready(Some(f)) = Pin::new(&mut seq).poll_next(&mut cx) {
            break f;
        }
        std::thread::yield_now();
    };
    seq.add(client.submit(delayed!(label(7))).unwrap());
    let (rest, _) = drain(seq);
    assert_eq!(rest.len(), 3);
    assert!(first.result().unwrap().starts_with("#10"));
}

/// `batches()` and `next_batch()`: everything done so far, at once.
pub fn as_completed_in_batches(client: &Client) {
    let futures = client.map_zip(plus, (0..50, 0..50)).unwrap();
    wait(&futures);
    let mut seq = as_completed(futures.clone());
    let batch = seq.next_batch().unwrap();
    assert_eq!(batch.len(), 50, "all were done: one batch");
    assert!(seq.next_batch().is_none() && seq.is_empty());
    // Every future in exactly one batch, none empty, work added between.
    let mut seq = as_completed(client.map(label, 0..30).unwrap());
    let (mut seen, mut added) = (0, false);
    while let Some(batch) = seq.next_batch() {
        assert!(!batch.is_empty());
        assert!(batch.iter().all(Future::done));
        seen += batch.len();
        if !added {
            added = true;
            seq.add(client.submit(delayed!(label(-1))).unwrap());
        }
    }
    assert_eq!(seen, 31);
    let mut seq = as_completed(client.map(double, 0..20).unwrap());
    let total: usize = seq.batches().map(|b| b.len()).sum();
    assert_eq!(total, 20);
}

pub fn double(x: i64) -> i64 {
    x * 2
}

/// `wait`, `wait_first` and `as_completed` over futures of different value
/// types, and the way back to the typed future.
pub fn futures_of_different_types(client: &Client) {
    let n: Future<i64> = client.submit(delayed!(plus(1, 2))).unwrap();
    let s: Future<String> = client.submit(delayed!(label(3))).unwrap();
    let mixed: Vec<AnyFuture> = vec![n.erase(), s.clone().into()];
    wait(&mixed);
    assert!(mixed.iter().all(AnyFuture::done));
    rask::wait_timeout(&mixed, Duration::from_secs(30)).unwrap();
    let first = wait_first(&mixed);
    assert_eq!(first.done.len(), 2);
    let (mut ints, mut strings) = (Vec::new(), Vec::new());
    for done in as_completed(mixed.clone()) {
        assert!(done.done());
        match done.downcast::<i64>() {
            Ok(f) => ints.push(f.result().unwrap()),
            Err(other) => {
                assert_eq!(other.type_name(), std::any::type_name::<String>());
                strings.push(other.downcast::<String>().unwrap().result().unwrap());
            }
        }
    }
    assert_eq!((ints, strings), (vec![3], vec!["#3".to_string()]));
    // A wrong type gives the handle back, naming what it holds.
    let wrong = mixed[0].clone().downcast::<String>().unwrap_err();
    assert!(wrong.is::<i64>() && !wrong.is::<String>());
    assert_eq!(wrong.key(), n.key());
    assert!(format!("{wrong:?}").contains("i64"), "{wrong:?}");
    // An erased future holds its result like the typed one: release on drop.
    let held = client.stats().keys_held;
    let lone = client.submit(delayed!(label(99))).unwrap().erase();
    lone.wait();
    assert_eq!(client.stats().keys_held, held + 1);
    drop(lone);
    assert_eq!(client.stats().keys_held, held);
}

/// `scatter_with(.., broadcast: true)`: every one of the client's
/// `workers` holds the value (one, this process, off a cluster); without
/// it, one does. The values are over 64 KiB: smaller ones stay in this
/// process and travel with each task (`rask_distributed::client` rule 5).
pub fn scatter_broadcast(client: &Client, workers: usize) {
    const N: usize = 100_000;
    let plain = client.scatter(vec![1u8; N]).unwrap();
    let wide = client.scatter_with(vec![2u8; N], true).unwrap();
    let held = client.who_has(&[plain.clone(), wide.clone()]).unwrap();
    assert_eq!(held[0].1.len(), 1, "{held:?}");
    let mut holders = held[1].1.clone();
    holders.sort();
    holders.dedup();
    assert_eq!(holders.len(), workers, "{held:?}");
    // Used in place wherever tasks run.
    let lens = client.map(bytes_len, vec![&wide; 8]).unwrap();
    assert_eq!(client.gather(&lens).unwrap(), vec![N; 8]);
    // Broadcasting data already scattered copies it too.
    let again = client.scatter_with(vec![1u8; N], true).unwrap();
    assert_eq!(again.key(), plain.key());
    assert_eq!(client.who_has(&[plain]).unwrap()[0].1.len(), workers);
}

/// A broadcast of a small value returns at once: it is kept in this
/// process and sent with each task, so there is nothing to copy (no
/// worker holds it).
pub fn small_broadcast_returns_at_once(client: &Client) {
    let small = client.scatter_with(vec![3u8; 100], true).unwrap();
    let holders = client.who_has(std::slice::from_ref(&small)).unwrap();
    if client.executor().is_cluster() {
        assert_eq!(holders[0].1, Vec::<String>::new());
    } else {
        assert_eq!(holders[0].1, ["this process"]);
    }
    assert_eq!(
        client
            .submit(delayed!(bytes_len(&small)))
            .unwrap()
            .result()
            .unwrap(),
        100
    );
}
