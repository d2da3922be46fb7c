//! Submitting through a [`Client`] with the result cache: what
//! [`Client::compute`], [`Client::persist`] and `persist` on a cluster do
//! (`rask::cache` rules 8 to 10). The lookup and the list of writes are the ones
//! `compute` makes (`Lookup`); what differs is where a hit goes and when a
//! miss is written.
//!
//! Rules:
//!
//! 1. The graph is looked up as `compute` looks it up: from the roots
//!    down, stopping at hits.
//! 2. Each hit is *placed* before the roots are submitted: submitted as
//!    data under its task's key, so that on a cluster it is sent once, to
//!    one worker, and held there (as [`Client::scatter`] does), and every
//!    graph that needs it refers to it by key; on a local executor the
//!    client holds it. The roots then start from it (the client's rule 3),
//!    and what only a hit needs is never run, loaded or sent. A hit that
//!    cannot be placed (its submission failed) is let go with a warning,
//!    and its task runs as if it had missed.
//! 3. The cached tasks that missed are submitted with the roots, in the
//!    same submission (so they run once, shared with the roots), and the
//!    value of each is written once it is done — on a cluster, its bytes
//!    are fetched to this process first: workers never touch the cache.
//! 4. The placed hits and the missed tasks are held until the roots are
//!    done and the finished misses written, then let go. A root that is a
//!    cached task itself is held too, so dropping its future does not
//!    stop it before it is written ([`Future::cancel`] does). When a root
//!    ends otherwise (failed, cancelled, released), misses still running
//!    are let go, so that nobody keeps unwanted work alive (the client's
//!    rule 4).
//! 5. [`Cached::finish_now`] does rule 4 on the calling thread, before it
//!    returns (`persist`); [`Cached::finish_later`] on a thread of its own
//!    (`Client::compute`, which returns at once), which
//!    [`rask::cache::flush`](crate::cache::flush) waits for. That thread
//!    never runs a simulated client's work (one task at a time, by one
//!    waiting thread): it is told when keys are done; whoever waits for a
//!    future runs the work, and so does `flush`. What it lets go there (the
//!    futures, the loaded values, the graphs) goes quietly, as the client
//!    lets go of values on threads that are not its user's (its rule 7).

use std::sync::{mpsc, Arc};

use rask_executor::Key;

use crate::build::node::{Held, Node};
use crate::futures::client::{Client, Listener, Shared, State};
use crate::futures::future::Future;
use crate::run::cache::Lookup;
use crate::Result;

/// The futures of a cached submission's roots, and what is left to do
/// once they are done (rule 4).
#[must_use = "finish it: `finish_now` or `finish_later`"]
pub(crate) struct Cached<T> {
    roots: Vec<Future<T>>,
    rest: Option<Rest<T>>,
}

/// Rule 4's holdings.
struct Rest<T> {
    shared: Arc<Shared>,
    lookup: Lookup,
    /// Placed hits, kept on the executor while the roots may need them.
    placed: Vec<Future<T>>,
    /// The future of each of `lookup.writes`, in order: held, so that its
    /// value is still there to write when it is done, even if it is a root
    /// whose caller dropped its own future meanwhile (rule 4). Typed `T`
    /// only because the client's submissions are: never read as a `T`.
    writes: Vec<Future<T>>,
}

/// Looks `roots` up in the client's cache, places the hits and submits the
/// roots with the misses (rules 1 to 3). Without a cache, a plain
/// submission.
///
/// # Errors
///
/// As [`Client::submit`].
pub(crate) fn submit<T>(client: &Client, roots: &[Arc<Node>]) -> Result<Cached<T>> {
    let Some(settings) = &client.inner.cache else {
        return Ok(Cached {
            roots: client.submit_nodes(roots)?,
            rest: None,
        });
    };
    let lookup = Lookup::new(roots, settings);
    let placed = place(client, &lookup)?;
    let (outputs, slots) = lookup.outputs(roots);
    let futures: Vec<Future<T>> = client.submit_nodes(&outputs)?;
    let writes = slots.iter().map(|&slot| futures[slot].clone()).collect();
    let mut futures = futures;
    futures.truncate(roots.len());
    Ok(Cached {
        roots: futures,
        rest: Some(Rest {
            shared: client.inner.clone(),
            lookup,
            placed,
            writes,
        }),
    })
}

/// Rule 2: the hits as data under their tasks' keys, held by `client`; on
/// a cluster, once each is there.
fn place<T>(client: &Client, lookup: &Lookup) -> Result<Vec<Future<T>>> {
    if lookup.hits.is_empty() {
        return Ok(Vec::new());
    }
    let mut hits: Vec<Arc<Node>> = lookup
        .hits
        .values()
        .map(|(node, value)| Held::loaded(node, value.clone()))
        .collect();
    // One order whatever the map's: a simulated client replays it.
    hits.sort_by_key(|n| n.key);
    let placed: Vec<Future<T>> = client.submit_nodes(&hits)?;
    let shared = &client.inner;
    if !shared.backend.is_remote() {
        return Ok(placed);
    }
    Ok(placed
        .into_iter()
        .filter(|f| {
            let key = f.key().key();
            match shared.wait(key, None) {
                State::Finished(_) => true,
                _ => {
                    tracing::warn!(
                        task = %key,
                        "result cache: a loaded value could not be placed on the cluster; its \
                         task runs instead"
                    );
                    false
                }
            }
        })
        .collect())
}

impl<T> Cached<T> {
    /// The roots' futures, for a progress bar.
    pub(crate) fn roots(&self) -> &[Future<T>] {
        &self.roots
    }

    /// The roots' futures, once they are done and the misses written
    /// (rules 4, 5).
    pub(crate) fn finish_now(self) -> Vec<Future<T>> {
        for root in &self.roots {
            root.wait();
        }
        if let Some(rest) = self.rest {
            rest.finish(&self.roots.iter().map(|f| f.key().key()).collect::<Vec<_>>());
        }
        self.roots
    }
}

impl<T: 'static> Cached<T> {
    /// The roots' futures at once; the misses are written on a thread of
    /// its own (rules 4, 5).
    pub(crate) fn finish_later(self) -> Vec<Future<T>> {
        let Some(rest) = self.rest else {
            return self.roots;
        };
        if rest.placed.is_empty() && rest.writes.is_empty() {
            return self.roots;
        }
        let roots: Vec<Key> = self.roots.iter().map(|f| f.key().key()).collect();
        let shared = rest.shared.clone();
        let started = std::thread::Builder::new()
            .name("rask-cache".into())
            .spawn(move || rest.finish(&roots));
        match started {
            Ok(thread) => {
                // A simulated client runs work only while someone waits:
                // `flush` does.
                let drive = shared.backend.simulation().is_some().then(|| {
                    Box::new(move |done: &dyn Fn() -> bool| {
                        shared.drive(done);
                    }) as crate::run::cache::Drive
                });
                crate::run::cache::writing(crate::run::cache::Writer { thread, drive });
            }
            Err(e) => tracing::warn!(
                "result cache: cannot start a thread to write cached values ({e}); this \
                 computation's values are not written"
            ),
        }
        self.roots
    }
}

impl<T> Rest<T> {
    /// Rule 4.
    fn finish(self, roots: &[Key]) {
        let Rest {
            shared,
            lookup,
            placed,
            writes,
        } = self;
        let mut all_done = true;
        for &key in roots {
            all_done &= matches!(done(&shared, key), State::Finished(_));
        }
        drop(placed);
        for (i, future) in writes.into_iter().enumerate() {
            let key = future.key().key();
            let state = if all_done {
                done(&shared, key)
            } else {
                shared.state(key)
            };
            if let State::Finished(value) = state {
                // On a cluster, `encode` fetches the bytes.
                lookup.write(i, &value);
            }
            drop(future);
        }
        lookup.finish();
        // Quietly, on this thread of the cache's (the client's rule 7):
        // the loaded values and the graphs of the writes may be the last
        // references to a user's values, whose `Drop` may panic.
        let Lookup { hits, writes, .. } = lookup;
        rask_executor::drop_each_quietly(hits.into_values(), "a value loaded from the cache");
        rask_executor::drop_each_quietly(writes, "the graph of a value written to the cache");
    }
}

/// The state of `key` once it is no longer pending. Told by the client,
/// so a simulated client's work is run by whoever waits for it (rule 5).
fn done(shared: &Shared, key: Key) -> State {
    let (tell, told) = mpsc::channel();
    shared.on_done(
        key,
        Listener::Queue(Arc::new(move || {
            let _ = tell.send(());
        })),
    );
    // A sender dropped unsent: the client is gone, and so is the key.
    let _ = told.recv();
    shared.state(key)
}
