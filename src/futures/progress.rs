//! Progress bars (Dask's `progress` and `ProgressBar`) on stderr, for
//! futures with [`progress`], and for `compute` and `persist` when
//! [`Config::progress`](crate::Config::progress) or `RASK_PROGRESS` asks.
//! A bar counts each task once, reads 100 % when the work it watches
//! succeeded (work a failure or a cancellation kept from running counts as
//! not run, never as done), and draws on one line of stderr redrawn in place — or, when stderr
//! is not a terminal, prints one plain line at the end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use rask_executor::Key;

use crate::futures::client::{start_queued, Listener, Shared, State};
use crate::futures::future::Future;
use crate::run::progress::{Drive, Plans, Ran, Screen};
pub use crate::run::progress::{FunctionProgress, Progress};

/// Draws a progress bar on stderr for the work behind `futures` and
/// returns at once (Dask's `progress`); the bar finishes by itself when
/// every future is done. Shows tasks done out of the total, the rate and
/// the time left, per function when there are several. When stderr is not
/// a terminal, prints one plain line at the end instead.
///
/// The bar counts every task the futures still wait for, their inputs
/// included, as their executor runs them: a chain the client fused is one
/// task named after its steps (`inc+inc+inc`), erred when one of its steps
/// fails, as with `compute`'s bar. On a cluster, it counts them as the
/// scheduler reports them. Work a failed or cancelled future never ran
/// counts as [`not_run`](FunctionProgress::not_run), not as done.
///
/// # Examples
///
/// ```
/// use rask::{delayed, Client};
/// fn inc(x: i64) -> i64 { x + 1 }
///
/// let client = Client::threads(2)?;
/// let futures = client.map(inc, 0..100)?;
/// let bar = rask::progress(&futures);   // returns at once
/// bar.wait();                           // the bar reached 100 %
/// // It counts what was still to do when it started: up to all 100.
/// for function in bar.counts() {
///     assert_eq!(function.name, "inc");
///     assert!(function.done == function.total && function.total <= 100);
/// }
/// # Ok::<(), rask::Error>(())
/// ```
pub fn progress<W: Watch + ?Sized>(futures: &W) -> Progress {
    progress_on(futures, Screen::stderr())
}

/// [`progress`], drawing on `screen`.
pub(crate) fn progress_on<W: Watch + ?Sized>(futures: &W, screen: &Screen) -> Progress {
    let mut watched = Watched::default();
    futures.watch(&mut watched);
    let n = watched.futures.len();
    // Which watched futures each task is work of, and which of them
    // finished: a task the display never heard of ran if one of them did
    // (`run::progress` rule 2).
    let owners: Arc<Mutex<HashMap<Key, Vec<usize>>>> = Arc::default();
    let finished: Arc<[AtomicBool]> = (0..n).map(|_| AtomicBool::new(false)).collect();
    let collect = |plans: &Arc<Plans>| {
        let mut tasks = Vec::new();
        let mut owners = owners.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, (shared, key, _)) in watched.futures.iter().enumerate() {
            let mut of_this = Vec::new();
            shared.pending_tasks(*key, &mut of_this, plans);
            for (task, _) in &of_this {
                owners.entry(*task).or_default().push(i);
            }
            tasks.extend(of_this);
        }
        tasks
    };
    let clients: Vec<Weak<Shared>> = watched
        .futures
        .iter()
        .map(|(shared, _, _)| Arc::downgrade(shared))
        .collect();
    let ran: Ran = {
        let (owners, finished) = (owners.clone(), finished.clone());
        Arc::new(move |task: Key| {
            let of = owners.lock().unwrap_or_else(PoisonError::into_inner);
            let owner_finished = of
                .get(&task)
                .is_some_and(|o| o.iter().any(|&i| finished[i].load(Ordering::Acquire)));
            // A future of its own (another client's, or one the graph
            // waited for) that finished.
            owner_finished
                || clients
                    .iter()
                    .filter_map(Weak::upgrade)
                    .any(|c| matches!(c.state(task), State::Finished(_)))
        })
    };
    let progress = Progress::watching(collect, n, driver(&watched), ran, screen);
    for (i, (shared, key, _)) in watched.futures.into_iter().enumerate() {
        let progress = progress.clone();
        let finished = finished.clone();
        // Weakly: the listener sits in the client's own table.
        let client = Arc::downgrade(&shared);
        shared.on_done(
            key,
            Listener::Queue(Arc::new(move || {
                // A failed or cancelled future's work may not have run:
                // what the bar did not hear of is then not done (rule 2).
                let ok = client
                    .upgrade()
                    .is_some_and(|c| matches!(c.state(key), State::Finished(_)));
                finished[i].store(ok, Ordering::Release);
                progress.future_done(ok);
            })),
        );
    }
    progress
}

/// How the display's `wait` runs the work of the simulated clients among
/// `watched` (`run::progress` rule 4): as [`Shared::wait`] does, queued
/// work first, then each client stepped until the display is done, again
/// while any ran (one client's futures can wait for another's). Holds the
/// clients weakly: the futures' listeners hold the display.
fn driver(watched: &Watched) -> Option<Drive> {
    let mut simulated: Vec<Weak<Shared>> = Vec::new();
    for (shared, _, _) in &watched.futures {
        if shared.is_simulated() && !simulated.iter().any(|w| w.as_ptr() == Arc::as_ptr(shared)) {
            simulated.push(Arc::downgrade(shared));
        }
    }
    if simulated.is_empty() {
        return None;
    }
    Some(Arc::new(move |done: &dyn Fn() -> bool| {
        start_queued();
        loop {
            let mut ran = false;
            for shared in simulated.iter().filter_map(Weak::upgrade) {
                ran |= shared.drive(done);
            }
            if !ran || done() {
                return;
            }
        }
    }))
}

/// What [`progress`] can watch: a [`Future`], or a slice, array or `Vec`
/// of them. Implemented by rask.
pub trait Watch {
    #[doc(hidden)]
    fn watch(&self, out: &mut Watched);
}

/// The futures a [`Watch`] value names; not a public API.
#[doc(hidden)]
#[derive(Default)]
pub struct Watched {
    futures: Vec<(Arc<Shared>, Key, ())>,
}

impl<T> Watch for Future<T> {
    fn watch(&self, out: &mut Watched) {
        let (shared, key) = self.parts();
        out.futures.push((shared, key, ()));
    }
}

impl<T> Watch for [Future<T>] {
    fn watch(&self, out: &mut Watched) {
        for future in self {
            future.watch(out);
        }
    }
}

impl<T> Watch for Vec<Future<T>> {
    fn watch(&self, out: &mut Watched) {
        self.as_slice().watch(out);
    }
}

impl<T, const N: usize> Watch for [Future<T>; N] {
    fn watch(&self, out: &mut Watched) {
        self.as_slice().watch(out);
    }
}
