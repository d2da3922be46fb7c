//! `Future<T>`: a result a [`Client`](crate::Client) is computing or holds,
//! and the functions that wait on many of them (`as_completed`, `wait`).

use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rask_executor::{Encoded, Key, Remote, Value, WireError};

use crate::build::args::{Args, Owned, Shared as SharedSlot, Traverse};
use crate::build::data::{Data, Unshared};
use crate::build::delayed::{Delayed, TaskKey};
use crate::build::node::{Name, Node};
use crate::futures::client::{FutureCall, Listener, Shared, State};
use crate::{Error, Result};

/// The handle behind a future and its clones: its drop releases the key.
pub(crate) struct Handle {
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: Key,
    pub(crate) name: Name,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.release(self.key);
    }
}

/// A result that a [`Client`](crate::Client) is computing or holds.
///
/// Returned at once by `submit`, `map`, `scatter` and `compute`. Clones share
/// one reference to the result; when the last clone (and every graph that
/// uses it as an argument) is dropped, the client frees the result.
/// Futures are valid arguments of [`delayed!`](crate::delayed!) and of
/// `submit`, so work can start from results that stay on the executor. In
/// async code, `future.await` gives the same as [`result`](Future::result).
///
/// # Examples
///
/// ```
/// use rask::{delayed, Client, Status};
/// fn inc(x: i64) -> i64 { x + 1 }
///
/// let client = Client::threads(2)?;
/// let f = client.submit(delayed!(inc(1)))?;
/// assert_eq!(f.result()?, 2);
/// assert_eq!(f.status(), Status::Finished);
/// assert!(f.done());
/// assert_eq!(client.stats().keys_held, 1);
/// drop(f);                                  // releases the result
/// assert_eq!(client.stats().keys_held, 0);
/// # Ok::<(), rask::Error>(())
/// ```
#[must_use = "dropping the last handle to a future releases its work: keep it, or hand it to \
              `rask::fire_and_forget`"]
pub struct Future<T> {
    handle: Arc<Handle>,
    /// The fetch `.await` started for a value a cluster holds.
    fetch: Option<Arc<Fetch>>,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Future<T> {
    fn clone(&self) -> Self {
        Future {
            handle: self.handle.clone(),
            fetch: None,
            _type: PhantomData,
        }
    }
}

/// A value's bytes being fetched from a cluster on a helper thread, so that
/// `.await` does not block the async runtime's thread; the waker of the
/// latest poll is woken when they arrived.
#[derive(Default)]
struct Fetch {
    slot: Mutex<FetchSlot>,
}

#[derive(Default)]
struct FetchSlot {
    result: Option<std::result::Result<Arc<[u8]>, WireError>>,
    waker: Option<std::task::Waker>,
}

impl Fetch {
    /// Starts fetching `remote` on a helper thread (here, if none starts).
    fn start(remote: Remote) -> Arc<Fetch> {
        let fetch = Arc::new(Fetch::default());
        let (done, from) = (fetch.clone(), remote.clone());
        let spawned = std::thread::Builder::new()
            .name("rask-fetch".into())
            .spawn(move || done.run(&from));
        if spawned.is_err() {
            fetch.run(&remote);
        }
        fetch
    }

    fn run(&self, remote: &Remote) {
        let result = remote.fetch();
        let waker = {
            let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
            slot.result = Some(result);
            slot.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T> fmt::Debug for Future<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Future({}, {:?})", self.key(), self.status())
    }
}

/// Where a future's computation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Still being computed (or waiting for its inputs).
    Pending,
    /// The value is ready.
    Finished,
    /// The task, or a task it depends on, failed.
    Error,
    /// The future was cancelled.
    Cancelled,
}

impl<T> Future<T> {
    pub(crate) fn new(shared: Arc<Shared>, key: Key, name: Name) -> Self {
        Future {
            handle: Arc::new(Handle { shared, key, name }),
            fetch: None,
            _type: PhantomData,
        }
    }

    /// The key of the computation, e.g. `inc-1a2b3c4d`: equal to the key of
    /// the `Delayed` it was submitted from.
    pub fn key(&self) -> TaskKey {
        TaskKey::from_parts(Arc::from(&*self.handle.name), self.handle.key)
    }

    /// Whether the computation is over (finished, failed or cancelled).
    pub fn done(&self) -> bool {
        self.status() != Status::Pending
    }

    /// Where the computation stands now.
    pub fn status(&self) -> Status {
        match self.handle.shared.state(self.handle.key) {
            State::Pending => Status::Pending,
            State::Finished(_) => Status::Finished,
            State::Failed(f) if f.kind == rask_executor::FailureKind::Cancelled => {
                Status::Cancelled
            }
            State::Failed(_) => Status::Error,
            State::Cancelled => Status::Cancelled,
        }
    }

    /// Cancels the computation if it is still pending: waiting on it returns
    /// [`Error::Cancelled`], and the work stops once no other future wants
    /// it. Does nothing to a finished future.
    pub fn cancel(&self) {
        self.handle.shared.cancel(self.handle.key);
    }

    /// The error of a failed or cancelled future; `None` while pending or
    /// when it finished.
    pub fn exception(&self) -> Option<Error> {
        match self.handle.shared.state(self.handle.key) {
            State::Failed(f) => Some(Error::from_failure(&f)),
            State::Cancelled => Some(self.cancelled()),
            State::Pending | State::Finished(_) => None,
        }
    }

    /// Blocks until the computation is over.
    pub fn wait(&self) {
        self.handle.shared.wait(self.handle.key, None);
    }

    fn cancelled(&self) -> Error {
        Error::Cancelled { key: self.key() }
    }

    /// The client behind this future, and its key.
    pub(crate) fn parts(&self) -> (Arc<Shared>, Key) {
        (self.handle.shared.clone(), self.handle.key)
    }

    /// A node standing for this future inside a graph.
    pub(crate) fn node(&self) -> Arc<Node> {
        Arc::new(Node {
            key: self.handle.key,
            name: self.handle.name.clone(),
            deps: crate::build::node::Deps::None,
            call: Arc::new(FutureCall {
                handle: self.handle.clone(),
            }),
        })
    }

    /// A `Delayed` backed by this future: graphs built on it start from the
    /// future's result, and keep it alive while they exist.
    pub fn to_delayed(&self) -> Delayed<T> {
        Delayed::from_node(self.node())
    }
}

impl<T: Data> Future<T> {
    fn outcome(&self, state: State) -> Result<T> {
        match state {
            State::Finished(value) => {
                let shared = crate::build::data::try_shared::<T>(value).map_err(|e| match e {
                    Unshared::Type(_) => Error::WrongType {
                        expected: std::any::type_name::<T>(),
                    },
                    // The value stayed on a cluster that cannot deliver it.
                    Unshared::Fetch(message) => Error::Task {
                        key: self.key(),
                        panicked: false,
                        message,
                        location: None,
                        error: None,
                        attempts: 1,
                    },
                })?;
                // A value decoded for this call is not shared: no copy.
                Ok(Arc::try_unwrap(shared).unwrap_or_else(|shared| T::clone(&shared)))
            }
            State::Failed(f) => Err(Error::from_failure(&f)),
            State::Cancelled | State::Pending => Err(self.cancelled()),
        }
    }

    /// Blocks until the value is ready and returns a copy of it.
    ///
    /// # Errors
    ///
    /// [`Error::Task`] naming the task that failed, or [`Error::Cancelled`].
    pub fn result(&self) -> Result<T> {
        self.outcome(self.handle.shared.wait(self.handle.key, None))
    }

    /// As [`result`](Future::result), giving up after `timeout`.
    ///
    /// # Errors
    ///
    /// As [`result`](Future::result), or [`Error::Timeout`].
    pub fn result_timeout(&self, timeout: Duration) -> Result<T> {
        match self
            .handle
            .shared
            .wait(self.handle.key, Some(Instant::now() + timeout))
        {
            State::Pending => Err(Error::Timeout {
                task: None,
                after: timeout,
            }),
            state => self.outcome(state),
        }
    }
}

/// `future.await` in async code: the same as [`Future::result`], without
/// blocking the async runtime's thread.
impl<T: Data> std::future::Future for Future<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let this = self.get_mut();
        let state = this.handle.shared.poll_state(this.handle.key, cx.waker());
        let remote = match &state {
            State::Pending => return Poll::Pending,
            State::Finished(value) => value.downcast_ref::<Remote>().cloned(),
            _ => None,
        };
        let Some(remote) = remote else {
            return Poll::Ready(this.outcome(state));
        };
        // The bytes are on a cluster: fetch them off this thread.
        let fetch = this
            .fetch
            .get_or_insert_with(|| Fetch::start(remote))
            .clone();
        let mut slot = fetch.slot.lock().unwrap_or_else(PoisonError::into_inner);
        match &slot.result {
            Some(Ok(bytes)) => {
                let value: Value = Arc::new(Encoded::new(bytes.clone()));
                drop(slot);
                Poll::Ready(this.outcome(State::Finished(value)))
            }
            Some(Err(e)) => Poll::Ready(Err(Error::Task {
                key: this.key(),
                panicked: false,
                message: e.to_string(),
                location: None,
                error: None,
                attempts: 1,
            })),
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T: Data> Traverse<T> for Future<T> {
    type Slot = Owned<T>;
    fn traverse(&self, args: &mut Args) -> Owned<T> {
        <Delayed<T> as Traverse<T>>::traverse(&self.to_delayed(), args)
    }
}

impl<T: Data> Traverse<Arc<T>> for Future<T> {
    type Slot = SharedSlot<T>;
    fn traverse(&self, args: &mut Args) -> SharedSlot<T> {
        <Delayed<T> as Traverse<Arc<T>>>::traverse(&self.to_delayed(), args)
    }
}

/// Yields futures in the order they finish; more can be added while
/// iterating (Dask's `as_completed`).
///
/// # Examples
///
/// ```
/// use rask::{as_completed, delayed, Client};
/// fn inc(x: i64) -> i64 { x + 1 }
///
/// let client = Client::threads(2)?;
/// let mut seq = as_completed(client.map(inc, 0..3)?);
/// let mut seen = Vec::new();
/// while let Some(done) = seq.next() {
///     let v = done.result()?;
///     seen.push(v);
///     if v < 5 {
///         seq.add(client.submit(delayed!(inc(v + 10)))?);   // work added while iterating
///     }
/// }
/// seen.sort();
/// assert_eq!(seen, vec![1, 2, 3, 12, 13, 14]);
/// # Ok::<(), rask::Error>(())
/// ```
#[must_use = "iterate it to receive the futures as they finish"]
pub struct AsCompleted<T> {
    queue: Arc<Queue<T>>,
    outstanding: usize,
}

struct Queue<T> {
    done: Mutex<Ready<T>>,
    ready: Condvar,
}

/// The futures done and not yet yielded.
struct Ready<T> {
    futures: VecDeque<Future<T>>,
    /// Whether the iterator sleeps on `ready`: a notification nobody waits
    /// for costs a syscall, so none is sent then.
    waiting: bool,
}

/// Iterates over `futures` in completion order; see [`AsCompleted`].
pub fn as_completed<T>(futures: impl IntoIterator<Item = Future<T>>) -> AsCompleted<T>
where
    T: 'static,
{
    let mut seq = AsCompleted {
        queue: Arc::new(Queue {
            done: Mutex::new(Ready {
                futures: VecDeque::new(),
                waiting: false,
            }),
            ready: Condvar::new(),
        }),
        outstanding: 0,
    };
    for f in futures {
        seq.add(f);
    }
    seq
}

impl<T: 'static> AsCompleted<T> {
    /// Tracks one more future; it is yielded once it is done.
    pub fn add(&mut self, future: Future<T>) {
        self.outstanding += 1;
        let queue = self.queue.clone();
        let shared = future.handle.shared.clone();
        let key = future.handle.key;
        let slot = Mutex::new(Some(future));
        let notify = move || {
            let taken = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(f) = taken {
                let mut done = queue.done.lock().unwrap_or_else(PoisonError::into_inner);
                done.futures.push_back(f);
                let waiting = done.waiting;
                drop(done);
                if waiting {
                    queue.ready.notify_one();
                }
            }
        };
        shared.on_done(key, Listener::Queue(Arc::new(notify)));
    }

    /// Number of futures added and not yet yielded.
    pub fn len(&self) -> usize {
        self.outstanding
    }

    /// Whether every added future was yielded.
    pub fn is_empty(&self) -> bool {
        self.outstanding == 0
    }

    /// Yields each future together with its result.
    pub fn with_results(self) -> impl Iterator<Item = (Future<T>, Result<T>)>
    where
        T: Data,
    {
        self.map(|f| {
            let r = f.result();
            (f, r)
        })
    }
}

impl<T: 'static> Iterator for AsCompleted<T> {
    type Item = Future<T>;

    /// The next future to finish; blocks until one does. `None` once every
    /// added future was yielded.
    fn next(&mut self) -> Option<Future<T>> {
        if self.outstanding == 0 {
            return None;
        }
        let mut done = self
            .queue
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(f) = done.futures.pop_front() {
                self.outstanding -= 1;
                return Some(f);
            }
            done.waiting = true;
            done = self
                .queue
                .ready
                .wait(done)
                .unwrap_or_else(PoisonError::into_inner);
            done.waiting = false;
        }
    }
}

/// The futures that are done and those that are not, from [`wait_first`].
#[derive(Debug)]
pub struct Done<T> {
    /// Finished, failed or cancelled.
    pub done: Vec<Future<T>>,
    /// Still pending.
    pub not_done: Vec<Future<T>>,
}

/// Keeps the work behind `future` running to the end without a handle to
/// it (Dask's `fire_and_forget`): for tasks run for their effects. The
/// result is released as soon as the task is done; nothing is reported.
///
/// Dropping a future instead releases its work, which then stops once no
/// other future wants it.
///
/// # Examples
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use rask::{delayed, Client};
///
/// static SENT: AtomicUsize = AtomicUsize::new(0);
/// fn notify(n: usize) -> usize { SENT.fetch_add(n, Ordering::SeqCst); n }
///
/// let client = Client::threads(2)?;
/// rask::fire_and_forget(client.submit(delayed!(notify(1)))?);
/// while SENT.load(Ordering::SeqCst) == 0 { std::thread::yield_now(); }
/// # Ok::<(), rask::Error>(())
/// ```
pub fn fire_and_forget<T>(future: Future<T>) {
    let handle = future.handle;
    let shared = handle.shared.clone();
    let key = handle.key;
    // The listener holds the future's handle (so its work stays wanted)
    // until the entry is done, then lets it go.
    let held = Mutex::new(Some(handle));
    shared.on_done(
        key,
        Listener::Queue(Arc::new(move || {
            held.lock().unwrap_or_else(PoisonError::into_inner).take();
        })),
    );
}

/// Blocks until every future is done (finished, failed or cancelled).
///
/// # Examples
///
/// ```
/// # use rask::Client;
/// fn inc(x: i64) -> i64 { x + 1 }
/// let client = Client::threads(2)?;
/// let fs = client.map(inc, 0..4)?;
/// rask::wait(&fs);
/// assert!(fs.iter().all(|f| f.done()));
/// # Ok::<(), rask::Error>(())
/// ```
pub fn wait<T>(futures: &[Future<T>]) {
    for f in futures {
        f.wait();
    }
}

/// Blocks until every future is done or `timeout` passed.
///
/// # Errors
///
/// [`Error::Timeout`] if some future is still pending after `timeout`.
pub fn wait_timeout<T>(futures: &[Future<T>], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for f in futures {
        if f.handle
            .shared
            .wait(f.handle.key, Some(deadline))
            .is_pending()
        {
            return Err(Error::Timeout {
                task: None,
                after: timeout,
            });
        }
    }
    Ok(())
}

/// Blocks until at least one future is done; returns which are done and
/// which are not (Dask's `wait(..., return_when="FIRST_COMPLETED")`).
pub fn wait_first<T: 'static>(futures: &[Future<T>]) -> Done<T> {
    if !futures.is_empty() {
        let mut seq = as_completed(futures.iter().cloned());
        let _first = seq.next();
    }
    let (done, not_done) = futures.iter().cloned().partition(Future::done);
    Done { done, not_done }
}
