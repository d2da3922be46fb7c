//! Persisting: computing values now and keeping them, in this process or,
//! on a cluster, on the workers through a [`Client`].

use std::sync::Arc;

use crate::build::data::Data;
use crate::build::delayed::Delayed;
use crate::build::node::{Node, Origin};
use crate::futures::client::Client;
use crate::futures::future::Future;
use crate::futures::progress::progress;
use crate::run::compute::run;
use crate::run::config::Config;
use crate::Result;

impl<T: Data> Delayed<T> {
    /// Computes the value now and returns a `Delayed` that holds it.
    ///
    /// The result has the same key and name; graphs built on it start from
    /// the held value instead of recomputing its inputs. The value is freed
    /// when the last handle to it is dropped.
    ///
    /// On a cluster (`local:N`, `tcp://…`) the value stays on the workers,
    /// as with Dask's `client.persist`: the result holds its key there, a
    /// graph on the same cluster uses it in place, and any other executor
    /// fetches its bytes when it needs them.
    ///
    /// # Errors
    ///
    /// As [`compute`](Delayed::compute).
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// static LOADS: AtomicUsize = AtomicUsize::new(0);
    /// fn load(n: i64) -> Vec<i64> { LOADS.fetch_add(1, Ordering::SeqCst); (0..n).collect() }
    /// fn total(v: Vec<i64>) -> i64 { v.iter().sum() }
    ///
    /// let data = rask::delayed!(load(10)).persist()?;
    /// assert_eq!(rask::delayed!(total(&data)).compute()?, 45);
    /// assert_eq!(rask::delayed!(total(&data)).compute()?, 45);
    /// assert_eq!(LOADS.load(Ordering::SeqCst), 1);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn persist(&self) -> Result<Delayed<T>> {
        self.persist_with(&Config::default())
    }

    /// Like [`persist`](Delayed::persist) with an explicit configuration.
    ///
    /// # Errors
    ///
    /// As [`compute`](Delayed::compute).
    pub fn persist_with(&self, config: &Config) -> Result<Delayed<T>> {
        let mut kept = persist_with(std::slice::from_ref(self), config)?;
        Ok(kept.pop().expect("one result per input"))
    }
}

/// Persists several values in one computation (shared work runs once, and
/// independent parts run in parallel); see [`Delayed::persist`].
///
/// # Errors
///
/// As [`Delayed::compute`].
///
/// # Examples
///
/// ```
/// fn load(i: u64) -> Vec<u64> { (0..1000).map(|x| x * i).collect() }
/// fn total(chunks: Vec<Vec<u64>>) -> u64 { chunks.iter().flatten().sum() }
///
/// let chunks: Vec<_> = (0..4).map(|i| rask::delayed!(load(i))).collect();
/// let chunks = rask::persist(&chunks)?;              // loaded once, kept
/// assert_eq!(rask::delayed!(total(&chunks)).compute()?, 499_500 * 6);
/// # Ok::<(), rask::Error>(())
/// ```
pub fn persist<T: Data>(items: &[Delayed<T>]) -> Result<Vec<Delayed<T>>> {
    persist_with(items, &Config::default())
}

/// [`persist`] with an explicit configuration.
///
/// # Errors
///
/// As [`Delayed::compute`].
pub fn persist_with<T: Data>(items: &[Delayed<T>], config: &Config) -> Result<Vec<Delayed<T>>> {
    let kind = config.resolve()?;
    let _span = tracing::info_span!("persist", executor = %kind, items = items.len()).entered();
    if kind.is_cluster() {
        return persist_on_cluster(items, config);
    }
    let roots: Vec<Arc<Node>> = items
        .iter()
        .filter(|d| !d.node().is_data())
        .map(|d| d.node().clone())
        .collect();
    let mut values = run(&roots, config)?.into_iter();
    Ok(items
        .iter()
        .map(|d| {
            if d.node().is_data() {
                d.clone()
            } else {
                let value = values.next().expect("one value per root");
                Delayed::held(d.node().key, d.node().name_owned(), value, Origin::Result)
            }
        })
        .collect())
}

/// [`persist_with`] on a cluster: the values stay on the workers (Dask's
/// `client.persist`), each returned `Delayed` holding its key there for as
/// long as it lives. A later graph on the same cluster uses them in place;
/// on any other executor, their bytes are fetched. With a result cache,
/// its hits are placed on the cluster and its misses written before this
/// returns (`futures::cached`).
fn persist_on_cluster<T: Data>(items: &[Delayed<T>], config: &Config) -> Result<Vec<Delayed<T>>> {
    let client = Client::with_config(config)?;
    let roots: Vec<Arc<Node>> = items.iter().map(|d| d.node().clone()).collect();
    let submitted = crate::futures::cached::submit::<T>(&client, &roots)?;
    if config.resolve_progress()? {
        progress(submitted.roots()).wait_for_work();
    }
    let futures = submitted.finish_now();
    if let Some(e) = futures.iter().find_map(Future::exception) {
        return Err(e);
    }
    Ok(futures.iter().map(Future::to_delayed).collect())
}
