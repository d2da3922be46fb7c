//! When `threads` starts its pool: a test binary of its own, so that no
//! other test's pool runs in the process while it counts threads.

/// The threads of this process named as a pool's workers are.
#[cfg(all(target_os = "linux", feature = "threaded"))]
fn pool_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("a Linux process lists its threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("rask-worker-"))
        .count()
}

#[cfg(all(target_os = "linux", feature = "threaded"))]
fn inc(x: i64) -> i64 {
    x + 1
}

/// A `compute` whose plan runs one task at a time (here, one task) runs on
/// the calling thread and starts no pool; the first plan with tasks side
/// by side starts it.
#[cfg(all(target_os = "linux", feature = "threaded"))]
#[test]
fn a_compute_of_one_task_starts_no_pool() -> rask::Result<()> {
    use rask::{delayed, Config};
    let pool = Config::threads(3);
    assert_eq!(pool_threads(), 0);
    assert_eq!(delayed!(inc(1)).compute_with(&pool)?, 2);
    assert_eq!(pool_threads(), 0);
    let both = (&delayed!(inc(2)), &delayed!(inc(3)));
    assert_eq!(rask::compute_with(both, &pool)?, (3, 4));
    assert_eq!(pool_threads(), 3);
    Ok(())
}
