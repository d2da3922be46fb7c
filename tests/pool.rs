//! When `threads` starts its pool: a test binary of its own, so that no
//! other test starts threads in the process while it counts them.

/// The threads of this process, as Linux lists them: a thread is listed
/// once it was created, before it runs (or names itself).
#[cfg(all(target_os = "linux", feature = "threaded"))]
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("a Linux process lists its threads")
        .count()
}

#[cfg(all(target_os = "linux", feature = "threaded"))]
fn inc(x: i64) -> i64 {
    x + 1
}

/// A `compute` whose plan runs one task at a time (here, one task) runs on
/// the calling thread and starts no pool; the first plan with tasks side
/// by side starts it, its three threads created before it runs.
#[cfg(all(target_os = "linux", feature = "threaded"))]
#[test]
fn a_compute_of_one_task_starts_no_pool() -> rask::Result<()> {
    use rask::{delayed, Config};
    // No progress bar, whatever `RASK_PROGRESS` says: the count does not
    // depend on its drawing thread having ended when `compute` returns.
    let pool = Config::threads(3).progress(false);
    let before = threads();
    assert_eq!(delayed!(inc(1)).compute_with(&pool)?, 2);
    assert_eq!(threads(), before);
    let both = (&delayed!(inc(2)), &delayed!(inc(3)));
    assert_eq!(rask::compute_with(both, &pool)?, (3, 4));
    assert_eq!(threads(), before + 3);
    Ok(())
}
