//! `Future<T>`: a result a [`Client`](crate::Client) is computing or holds,
//! [`AnyFuture`]: one of any value type, and the functions that wait on many
//! of them (`as_completed`, `wait`), which take both ([`Waitable`]).

use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use rask_executor::{Encoded, Key, Remote, Value, WireError};

use crate::build::args::{Args, Owned, Shared as SharedSlot, Traverse};
use crate::build::data::{Data, Unshared};
use crate::build::delayed::{Delayed, TaskKey};
use crate::build::node::{Name, Node};
use crate::futures::client::{FutureCall, Listener, Shared, State};
use crate::{Error, Result};

/// The handle behind a future and its clones: its drop releases the key.
/// `pub` only so that [`Waitable`]'s sealed method may name it; nothing
/// outside the crate can reach its fields or make one.
#[doc(hidden)]
pub struct Handle {
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
    pub(crate) fn node(&self) -> Arc<Node>
    where
        T: 'static,
    {
        Arc::new(Node {
            mark: Default::default(),
            key: self.handle.key,
            label: crate::build::node::Label::Call,
            deps: crate::build::node::Deps::None,
            call: Arc::new(FutureCall {
                handle: self.handle.clone(),
                output: std::any::TypeId::of::<T>(),
            }),
        })
    }

    /// A `Delayed` backed by this future: graphs built on it start from the
    /// future's result, and keep it alive while they exist.
    pub fn to_delayed(&self) -> Delayed<T>
    where
        T: 'static,
    {
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
    /// On a cluster, on a machine of several cores, a wait first watches
    /// for the result for up to 100 µs, then sleeps: waking a sleeping
    /// thread costs tens of microseconds on a virtual machine, which is
    /// most of a round trip. It watches only while this client's recent
    /// waits took that little, so waiting for longer tasks never spins;
    /// one thread per client watches at a time. The same holds for
    /// [`wait`](Future::wait), [`Client::gather`](crate::Client::gather)
    /// and [`rask::wait`](crate::wait). [`Config::spin`](crate::Config::spin)
    /// (`RASK_SPIN=0`) turns the watch off: every wait then sleeps at once.
    ///
    /// # Errors
    ///
    /// [`Error::Task`] naming the task that failed, or [`Error::Cancelled`].
    pub fn result(&self) -> Result<T> {
        self.outcome(self.handle.shared.wait(self.handle.key, None))
    }

    /// As [`result`](Future::result), giving up after `timeout`. A
    /// timeout too long for the clock (`Duration::MAX`) is no deadline.
    ///
    /// # Errors
    ///
    /// As [`result`](Future::result), or [`Error::Timeout`].
    pub fn result_timeout(&self, timeout: Duration) -> Result<T> {
        match self.handle.shared.wait(self.handle.key, deadline(timeout)) {
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

/// Two futures hash alike when their keys are equal, as `Delayed`s do:
/// what [`Untraversed`](crate::Untraversed) hashes into a task's key.
impl<T> std::hash::Hash for Future<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.handle.key.hash(state)
    }
}

/// A future as it travels inside an [`Untraversed`](crate::Untraversed)
/// value (`travel.rs` rule 6).
#[derive(serde::Serialize, serde::Deserialize)]
struct WireFuture<N> {
    /// Its position among the task's inputs.
    index: u32,
    key: [u8; 32],
    name: N,
}

/// A future serializes only inside an [`Untraversed`](crate::Untraversed)
/// task argument, where it is one of the task's inputs: as its position
/// among them, its key and its name (`travel.rs` rules 5 and 6). Anywhere
/// else (a task's result, a plain value sent to a cluster) it fails,
/// saying so.
impl<T: 'static> serde::Serialize for Future<T> {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        let index = crate::build::travel::handle_index(self.handle.key, || self.node())
            .map_err(crate::build::travel::refuse)?;
        WireFuture {
            index,
            key: self.handle.key.0,
            name: &*self.handle.name,
        }
        .serialize(serializer)
    }
}

/// Where a task runs, a future of its [`Untraversed`](crate::Untraversed)
/// argument comes back finished, holding the value of the task input it
/// names (`travel.rs` rule 7). Anywhere else it fails, saying so.
impl<'de, T> serde::Deserialize<'de> for Future<T> {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let wire = WireFuture::<String>::deserialize(deserializer)?;
        let value = crate::build::travel::bound_input(wire.index)
            .map_err(crate::build::travel::refuse_decoding)?;
        Ok(crate::futures::client::holding(
            Key(wire.key),
            Name::Owned(wire.name),
            value,
        ))
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
/// It is an [`Iterator`] that blocks in `next`, a
/// [`Stream`](futures_core::Stream) for async code (woken by the futures'
/// completion, never polling), and gives batches: every future done so far
/// at once ([`next_batch`](AsCompleted::next_batch),
/// [`batches`](AsCompleted::batches); Dask's `as_completed(...).batches()`).
/// The futures may be of one value type, [`Future<T>`], or of several,
/// erased to [`AnyFuture`].
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
///
/// Futures of different value types, erased to [`AnyFuture`]:
///
/// ```
/// use rask::{as_completed, delayed, Client};
/// fn inc(x: i64) -> i64 { x + 1 }
/// fn name(x: i64) -> String { format!("#{x}") }
///
/// let client = Client::threads(2)?;
/// let n = client.submit(delayed!(inc(1)))?;
/// let s = client.submit(delayed!(name(1)))?;
/// for done in as_completed([n.erase(), s.erase()]) {
///     match done.downcast::<i64>() {
///         Ok(n) => assert_eq!(n.result()?, 2),
///         Err(other) => assert_eq!(other.downcast::<String>().unwrap().result()?, "#1"),
///     }
/// }
/// # Ok::<(), rask::Error>(())
/// ```
#[must_use = "iterate it to receive the futures as they finish"]
pub struct AsCompleted<F> {
    queue: Arc<Queue<F>>,
    outstanding: usize,
    /// The futures added and not done yet, each in the slot its completion
    /// takes it from. The completions hold only weak references to slots
    /// and queue: dropping the iterator drops the futures it still holds,
    /// which releases their work as dropping them would (`Client` rule 1).
    slots: Vec<Arc<Mutex<Option<F>>>>,
    /// The clients of futures added that run on `sim:SEED`: `next` runs
    /// their work, one after the other, until a future is done, and picks
    /// among the done ones by the first one's seed.
    simulated: Vec<Arc<Shared>>,
}

struct Queue<F> {
    done: Mutex<Ready<F>>,
    ready: Condvar,
}

/// The futures done and not yet yielded.
struct Ready<F> {
    futures: VecDeque<F>,
    /// Whether the iterator sleeps on `ready` and nobody notified it yet:
    /// a notification nobody waits for costs a syscall, so none is sent
    /// then. The first notification clears it.
    waiting: bool,
    /// The task of the latest `poll_next` that found nothing, woken by the
    /// next future done.
    waker: Option<Waker>,
}

/// Iterates over `futures` in completion order; see [`AsCompleted`].
pub fn as_completed<F: Waitable>(futures: impl IntoIterator<Item = F>) -> AsCompleted<F> {
    let mut seq = AsCompleted {
        queue: Arc::new(Queue {
            done: Mutex::new(Ready {
                futures: VecDeque::new(),
                waiting: false,
                waker: None,
            }),
            ready: Condvar::new(),
        }),
        outstanding: 0,
        slots: Vec::new(),
        simulated: Vec::new(),
    };
    for f in futures {
        seq.add(f);
    }
    seq
}

impl<F: Waitable> AsCompleted<F> {
    /// Tracks one more future; it is yielded once it is done.
    pub fn add(&mut self, future: F) {
        self.outstanding += 1;
        let queue = Arc::downgrade(&self.queue);
        let handle = future.handle().clone();
        if handle.shared.backend.simulation().is_some()
            && !self
                .simulated
                .iter()
                .any(|s| Arc::ptr_eq(s, &handle.shared))
        {
            self.simulated.push(handle.shared.clone());
        }
        // Slots whose future is done are dropped now and then: the list
        // stays within twice the futures outstanding.
        if self.slots.len() >= 2 * self.outstanding + 16 {
            self.slots.retain(|slot| {
                slot.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .is_some()
            });
        }
        let slot = Arc::new(Mutex::new(Some(future)));
        let weak_slot = Arc::downgrade(&slot);
        self.slots.push(slot);
        let notify = move || {
            let (Some(slot), Some(queue)) = (weak_slot.upgrade(), queue.upgrade()) else {
                return; // the iterator was dropped
            };
            let taken = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(f) = taken {
                let mut done = queue.done.lock().unwrap_or_else(PoisonError::into_inner);
                done.futures.push_back(f);
                // One notification per sleep: the futures done before the
                // iterator wakes up need none (each costs a syscall).
                let waiting = std::mem::take(&mut done.waiting);
                let waker = done.waker.take();
                drop(done);
                if waiting {
                    queue.ready.notify_one();
                }
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
        };
        handle
            .shared
            .on_done(handle.key, Listener::Queue(Arc::new(notify)));
    }

    /// Number of futures added and not yet yielded.
    pub fn len(&self) -> usize {
        self.outstanding
    }

    /// Whether every added future was yielded.
    pub fn is_empty(&self) -> bool {
        self.outstanding == 0
    }

    /// Every future done now and not yet yielded, in completion order,
    /// blocking until there is at least one; `None` once every added future
    /// was yielded.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask::{as_completed, Client};
    /// fn inc(x: i64) -> i64 { x + 1 }
    ///
    /// let client = Client::threads(2)?;
    /// let futures = client.map(inc, 0..10)?;
    /// rask::wait(&futures);
    /// let mut seq = as_completed(futures);
    /// assert_eq!(seq.next_batch().map(|batch| batch.len()), Some(10));
    /// assert!(seq.next_batch().is_none());
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn next_batch(&mut self) -> Option<Vec<F>> {
        let first = self.next()?;
        let mut done = self
            .queue
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut batch = Vec::with_capacity(1 + done.futures.len());
        batch.push(first);
        batch.extend(done.futures.drain(..));
        self.outstanding -= batch.len() - 1;
        Some(batch)
    }

    /// Iterates over batches: each is every future done by then (Dask's
    /// `as_completed(...).batches()`); see
    /// [`next_batch`](AsCompleted::next_batch). Every batch has at least one
    /// future.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask::{as_completed, Client};
    /// fn inc(x: i64) -> i64 { x + 1 }
    ///
    /// let client = Client::threads(2)?;
    /// let mut seq = as_completed(client.map(inc, 0..100)?);
    /// let mut total = 0;
    /// for batch in seq.batches() {
    ///     total += client.gather(&batch)?.iter().sum::<i64>();
    /// }
    /// assert_eq!(total, 5050);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn batches(&mut self) -> impl Iterator<Item = Vec<F>> + '_ {
        std::iter::from_fn(move || self.next_batch())
    }
}

impl<F> AsCompleted<F> {
    /// On `sim:SEED`: runs the client's work until a future is done, then
    /// takes one of the done futures, picked by the seed (`None` on other
    /// executors, or when no work is left to run).
    fn next_simulated(&mut self) -> Option<F> {
        let sim = self.simulated.first()?.backend.simulation()?;
        let queue = &self.queue;
        let ready = || {
            !queue
                .done
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .futures
                .is_empty()
        };
        for shared in &self.simulated {
            if ready() {
                break;
            }
            shared.drive(ready);
        }
        let mut done = queue.done.lock().unwrap_or_else(PoisonError::into_inner);
        let n = done.futures.len();
        if n == 0 {
            return None;
        }
        done.futures.remove(sim.choose(n))
    }
}

impl<T: Data> AsCompleted<Future<T>> {
    /// Yields each future together with its result.
    pub fn with_results(self) -> impl Iterator<Item = (Future<T>, Result<T>)> {
        self.map(|f| {
            let r = f.result();
            (f, r)
        })
    }
}

impl<F: Waitable> Iterator for AsCompleted<F> {
    type Item = F;

    /// The next future to finish; blocks until one does. `None` once every
    /// added future was yielded.
    fn next(&mut self) -> Option<F> {
        if self.outstanding == 0 {
            return None;
        }
        // Work this thread queued is started first (`start_queued`; nothing
        // to do, and no lock taken, when it queued none), before a
        // simulated client runs what it was handed.
        crate::futures::client::start_queued();
        if let Some(f) = self.next_simulated() {
            self.outstanding -= 1;
            return Some(f);
        }
        let mut done = self
            .queue
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = done.futures.pop_front() {
            self.outstanding -= 1;
            return Some(f);
        }
        // Inside a task on a cluster worker, its thread is given back
        // while it waits (`rask_executor::blocking`).
        let queue = &self.queue;
        let f = rask_executor::blocking(move || loop {
            if let Some(f) = done.futures.pop_front() {
                return f;
            }
            done.waiting = true;
            done = queue
                .ready
                .wait(done)
                .unwrap_or_else(PoisonError::into_inner);
            done.waiting = false;
        });
        self.outstanding -= 1;
        Some(f)
    }

    /// Exactly the futures added and not yet yielded.
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.outstanding, Some(self.outstanding))
    }
}

/// In async code: the next future to finish, without blocking the thread.
/// The task is woken when one finishes (the client's completion
/// notification; nothing polls). Only the latest task to poll is woken.
///
/// # Examples
///
/// ```
/// use futures_core::Stream;
/// use std::pin::Pin;
/// use std::task::{Context, Poll, Waker};
/// use rask::{as_completed, Client};
/// fn inc(x: i64) -> i64 { x + 1 }
///
/// let client = Client::threads(2)?;
/// let mut seq = as_completed(client.map(inc, 0..3)?);
/// let mut cx = Context::from_waker(Waker::noop());
/// let mut seen = 0;
/// while seen < 3 {
///     match Pin::new(&mut seq).poll_next(&mut cx) {
///         Poll::Ready(Some(done)) => { done.result()?; seen += 1; }
///         Poll::Ready(None) => unreachable!(),
///         Poll::Pending => std::thread::yield_now(),  // a real executor parks here
///     }
/// }
/// assert!(matches!(Pin::new(&mut seq).poll_next(&mut cx), Poll::Ready(None)));
/// # Ok::<(), rask::Error>(())
/// ```
impl<F: Waitable> futures_core::Stream for AsCompleted<F> {
    type Item = F;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<F>> {
        let this = self.get_mut();
        if this.outstanding == 0 {
            return Poll::Ready(None);
        }
        if let Some(f) = this.next_simulated() {
            this.outstanding -= 1;
            return Poll::Ready(Some(f));
        }
        let mut done = this
            .queue
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match done.futures.pop_front() {
            Some(f) => {
                this.outstanding -= 1;
                Poll::Ready(Some(f))
            }
            None => {
                // Under the lock: a future done after this poll looked
                // finds the waker and wakes it.
                done.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.outstanding, Some(self.outstanding))
    }
}

impl<F: Waitable> futures_core::FusedStream for AsCompleted<F> {
    fn is_terminated(&self) -> bool {
        self.outstanding == 0
    }
}

/// The futures that are done and those that are not, from [`wait_first`]:
/// [`Future<T>`]s or [`AnyFuture`]s, as given.
#[derive(Debug)]
pub struct Done<F> {
    /// Finished, failed or cancelled.
    pub done: Vec<F>,
    /// Still pending.
    pub not_done: Vec<F>,
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

/// Blocks until every future is done (finished, failed or cancelled). The
/// futures are [`Future<T>`]s of one type, or [`AnyFuture`]s of any.
///
/// # Examples
///
/// ```
/// # use rask::{delayed, Client};
/// fn inc(x: i64) -> i64 { x + 1 }
/// fn name(x: i64) -> String { format!("#{x}") }
/// let client = Client::threads(2)?;
/// let fs = client.map(inc, 0..4)?;
/// rask::wait(&fs);
/// assert!(fs.iter().all(|f| f.done()));
///
/// // Different value types: erase them.
/// let (n, s) = (client.submit(delayed!(inc(1)))?, client.submit(delayed!(name(1)))?);
/// rask::wait(&[n.erase(), s.erase()]);
/// assert!(n.done() && s.done());
/// # Ok::<(), rask::Error>(())
/// ```
pub fn wait<F: Waitable>(futures: &[F]) {
    wait_all(futures, false, None);
}

/// Waits for `futures` as [`Shared::wait_all`] does, client by client (a
/// simulated client's one at a time, which runs its work in seed order);
/// whether it ended (nothing pending or, `to_first_failure`, a failure)
/// before `deadline`.
pub(crate) fn wait_all<F: Waitable>(
    futures: &[F],
    to_first_failure: bool,
    deadline: Option<Instant>,
) -> bool {
    let mut rest = futures;
    while let Some(first) = rest.first() {
        let shared = &first.handle().shared;
        let same = rest
            .iter()
            .take_while(|f| Arc::ptr_eq(&f.handle().shared, shared))
            .count();
        let (these, others) = rest.split_at(same);
        rest = others;
        if shared.backend.simulation().is_none() {
            let keys: Vec<Key> = these.iter().map(|f| f.handle().key).collect();
            if !shared.wait_all(&keys, to_first_failure, deadline) {
                return false;
            }
            continue;
        }
        for f in these {
            let h = f.handle();
            match h.shared.wait(h.key, deadline) {
                State::Pending => return false,
                State::Finished(_) => {}
                _ if to_first_failure => return true,
                _ => {}
            }
        }
    }
    true
}

/// Blocks until every future is done or `timeout` passed. A timeout too
/// long for the clock (`Duration::MAX`) is no deadline.
///
/// # Errors
///
/// [`Error::Timeout`] if some future is still pending after `timeout`.
pub fn wait_timeout<F: Waitable>(futures: &[F], timeout: Duration) -> Result<()> {
    if wait_all(futures, false, deadline(timeout)) {
        return Ok(());
    }
    Err(Error::Timeout {
        task: None,
        after: timeout,
    })
}

/// The deadline `timeout` from now, `None` (no deadline) when the clock
/// cannot count that far (`Duration::MAX`: adding it panicked).
pub(crate) fn deadline(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// Blocks until at least one future is done; returns which are done and
/// which are not (Dask's `wait(..., return_when="FIRST_COMPLETED")`).
pub fn wait_first<F: Waitable>(futures: &[F]) -> Done<F> {
    if !futures.is_empty() {
        let mut seq = as_completed(futures.iter().cloned());
        let _first = seq.next();
    }
    let (done, not_done) = futures.iter().cloned().partition(|f| {
        let h = f.handle();
        !h.shared.state(h.key).is_pending()
    });
    Done { done, not_done }
}

/// What [`wait`], [`wait_timeout`], [`wait_first`] and [`as_completed`]
/// take: a [`Future<T>`] or an [`AnyFuture`]. Sealed: implemented by those
/// two only.
pub trait Waitable: Clone + Send + 'static + sealed::Sealed {}

impl<T: 'static> Waitable for Future<T> {}
impl Waitable for AnyFuture {}

mod sealed {
    /// Gives the crate the handle behind a future; see [`Waitable`](super::Waitable).
    pub trait Sealed {
        #[doc(hidden)]
        fn handle(&self) -> &std::sync::Arc<super::Handle>;
    }
}

impl<T> sealed::Sealed for Future<T> {
    fn handle(&self) -> &Arc<Handle> {
        &self.handle
    }
}

impl sealed::Sealed for AnyFuture {
    fn handle(&self) -> &Arc<Handle> {
        &self.inner.handle
    }
}

/// The value type of an [`AnyFuture`]: none (it cannot be named outside).
enum Erased {}

/// A [`Future`] of any value type, for [`wait`] and [`as_completed`] over
/// futures of different types; [`downcast`](AnyFuture::downcast) gives the
/// typed future back. Made by [`Future::erase`] or `AnyFuture::from`.
/// Holds the result as the future did (release on drop included).
///
/// # Examples
///
/// ```
/// use rask::{delayed, AnyFuture, Client};
/// fn inc(x: i64) -> i64 { x + 1 }
///
/// let client = Client::threads(2)?;
/// let any: AnyFuture = client.submit(delayed!(inc(1)))?.into();
/// assert_eq!(any.type_name(), "i64");
/// let wrong = any.downcast::<String>().unwrap_err();   // the handle comes back
/// assert_eq!(wrong.downcast::<i64>().unwrap().result()?, 2);
/// # Ok::<(), rask::Error>(())
/// ```
#[must_use = "dropping the last handle to a future releases its work"]
#[derive(Clone)]
pub struct AnyFuture {
    inner: Future<Erased>,
    type_id: std::any::TypeId,
    type_name: &'static str,
}

impl<T: 'static> Future<T> {
    /// A handle to this future's result as an [`AnyFuture`], to wait for it
    /// beside futures of other value types (a clone: this one stays
    /// usable; `AnyFuture::from(future)` takes it instead).
    pub fn erase(&self) -> AnyFuture {
        AnyFuture::from(self.clone())
    }
}

impl<T: 'static> From<Future<T>> for AnyFuture {
    fn from(future: Future<T>) -> AnyFuture {
        AnyFuture {
            inner: Future {
                handle: future.handle,
                fetch: None,
                _type: PhantomData,
            },
            type_id: std::any::TypeId::of::<T>(),
            type_name: std::any::type_name::<T>(),
        }
    }
}

impl AnyFuture {
    /// The typed future back, if its value type is `T`; otherwise this
    /// handle, unchanged (as [`Box::<dyn Any>::downcast`](std::any::Any) does),
    /// whose [`type_name`](AnyFuture::type_name) says what it is.
    ///
    /// # Errors
    ///
    /// `Err(self)` when the value type is not `T`.
    pub fn downcast<T: 'static>(self) -> std::result::Result<Future<T>, AnyFuture> {
        if self.is::<T>() {
            Ok(Future {
                handle: self.inner.handle,
                fetch: None,
                _type: PhantomData,
            })
        } else {
            Err(self)
        }
    }

    /// Whether the value type is `T`.
    pub fn is<T: 'static>(&self) -> bool {
        self.type_id == std::any::TypeId::of::<T>()
    }

    /// The value type's name, e.g. `i64` or `alloc::string::String`
    /// ([`std::any::type_name`]: for messages, not to compare).
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// The key of the computation; see [`Future::key`].
    pub fn key(&self) -> TaskKey {
        self.inner.key()
    }

    /// Whether the computation is over; see [`Future::done`].
    pub fn done(&self) -> bool {
        self.inner.done()
    }

    /// Where the computation stands now; see [`Future::status`].
    pub fn status(&self) -> Status {
        self.inner.status()
    }

    /// Cancels the computation if it is still pending; see [`Future::cancel`].
    pub fn cancel(&self) {
        self.inner.cancel();
    }

    /// The error of a failed or cancelled future; see [`Future::exception`].
    pub fn exception(&self) -> Option<Error> {
        self.inner.exception()
    }

    /// Blocks until the computation is over.
    pub fn wait(&self) {
        self.inner.wait();
    }
}

impl fmt::Debug for AnyFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AnyFuture({}, {:?}, {})",
            self.key(),
            self.status(),
            self.type_name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::travel::{decode_bound, encode_untraversed};

    fn inc(x: i64) -> i64 {
        x + 1
    }

    fn key_of(f: Future<i64>) -> String {
        f.key().to_string()
    }

    /// A future travels as its position among the task's inputs and comes
    /// back finished with that input's value, under its key; a position
    /// that is not an input, or no inputs at all, fail with a message.
    #[test]
    fn a_future_travels_as_its_input_and_comes_back_finished() {
        let client = crate::Client::synchronous().unwrap();
        let f = client.submit(crate::delayed!(inc(1))).unwrap();
        let bytes = encode_untraversed(&vec![f.clone()], &[f.key().key()]).unwrap();
        let value: Value = Arc::new(Encoded::new(Arc::from(
            postcard::to_stdvec(&7_i64).unwrap(),
        )));
        let back: Vec<Future<i64>> = decode_bound(&bytes, vec![value]).unwrap();
        assert_eq!(back[0].key(), f.key());
        assert_eq!(back[0].status(), Status::Finished);
        assert_eq!(back[0].result().unwrap(), 7);
        let err = decode_bound::<Vec<Future<i64>>>(&bytes, Vec::new())
            .err()
            .unwrap();
        assert!(err.contains("names input 0"), "{err}");
        let err = postcard::from_bytes::<Future<i64>>(&bytes[1..]).err();
        assert!(err.is_some());
        // Not among the task's inputs: refused, not guessed.
        let err = encode_untraversed(&f, &[]).unwrap_err();
        assert!(err.to_string().contains("not among the inputs"), "{err}");
    }

    /// A future given as a plain value (not `Untraversed`) fails its task
    /// with a message that says what to write.
    #[test]
    fn a_future_as_a_plain_value_says_what_to_write() {
        let client = crate::Client::synchronous().unwrap();
        let f = client.submit(crate::delayed!(inc(1))).unwrap();
        let err = crate::delayed!(key_of(f.clone()))
            .compute_with(&crate::Config::synchronous())
            .unwrap_err();
        assert!(err.to_string().contains("Untraversed(future)"), "{err}");
        assert_eq!(
            crate::delayed!(key_of(crate::Untraversed(f.clone())))
                .compute_with(&crate::Config::synchronous())
                .unwrap(),
            f.key().to_string()
        );
    }
}
