//! The one type that knows every executor.

#[cfg(feature = "threaded")]
use std::sync::Arc;

use rask_executor::{Executor, Synchronous};

use crate::config::ExecutorKind;
use crate::Result;

/// A resolved executor, ready to run plans.
pub(crate) enum Backend {
    Synchronous(Synchronous),
    #[cfg(feature = "threaded")]
    Threads(Arc<rask_threaded::ThreadPool>),
}

impl Backend {
    /// The executor for `kind`. Thread pools are built once per size and
    /// reused by every later computation.
    pub(crate) fn get(kind: ExecutorKind) -> Result<Backend> {
        match kind {
            ExecutorKind::Synchronous => Ok(Backend::Synchronous(Synchronous)),
            #[cfg(feature = "threaded")]
            ExecutorKind::Threads(n) => pools::get(n.unwrap_or(0)).map(Backend::Threads),
            #[cfg(not(feature = "threaded"))]
            ExecutorKind::Threads(_) => Err(crate::Error::Unavailable("threaded")),
        }
    }

    pub(crate) fn executor(&self) -> &dyn Executor {
        match self {
            Backend::Synchronous(s) => s,
            #[cfg(feature = "threaded")]
            Backend::Threads(pool) => &**pool,
        }
    }
}

#[cfg(feature = "threaded")]
mod pools {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, PoisonError};

    use rask_threaded::ThreadPool;

    use crate::{Error, Result};

    static POOLS: Mutex<Option<HashMap<usize, Arc<ThreadPool>>>> = Mutex::new(None);

    /// The shared pool of `threads` threads (`0`: one per core).
    pub(super) fn get(threads: usize) -> Result<Arc<ThreadPool>> {
        let mut pools = POOLS.lock().unwrap_or_else(PoisonError::into_inner);
        let pools = pools.get_or_insert_with(HashMap::new);
        if let Some(pool) = pools.get(&threads) {
            return Ok(pool.clone());
        }
        let pool =
            ThreadPool::new(threads).map_err(|e| Error::Executor(std::io::Error::other(e)))?;
        let pool = Arc::new(pool);
        pools.insert(threads, pool.clone());
        Ok(pool)
    }
}
