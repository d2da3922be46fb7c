//! Watching before sleeping: a thread that waits for a cluster's future
//! watches for it for a moment before it goes to sleep.
//!
//! A result from a cluster is handed from thread to thread: the client's
//! connection, the scheduler, a worker and back. Each hand-off to a thread
//! that sleeps waits for the system to wake it, and on a virtual machine
//! waking a thread on an idle core costs tens of microseconds: a round trip
//! to a cluster on this machine took 62–78 µs with the waiting thread
//! asleep, 32–38 µs with it watching. Rules:
//!
//! 1. A wait watches the client's table for at most [`SPIN`] before it
//!    sleeps: it reads a counter that every change of the table bumps
//!    ([`Spin::changed`]), and looks at what it waits for only when the
//!    counter moved. Between two looks at the clock it yields its core
//!    ([`std::thread::yield_now`]): a thread the watch waits for (the
//!    scheduler's, a worker's) that the system woke on the watching
//!    thread's core runs at once instead of after the watch. Without it, a
//!    run on this machine now and then had the scheduler's thread woken
//!    on the watching core for most round trips, which then took the
//!    whole watch and a sleep (110–140 µs a round trip, against 90–100
//!    with no watching and 35–45 when the threads land apart).
//! 2. Only where it can pay ([`Spin::for_client`]): a client of a cluster,
//!    where a result crosses processes, on a machine of more than one
//!    core (on one core, the watching thread would hold up the very
//!    threads it waits for). Not inside a task: its thread is the
//!    worker's, and the wait gives it back instead (`rask_executor::blocking`).
//! 3. One thread watches at a time per client; another waiting meanwhile
//!    sleeps at once. A watch costs at most one core for [`SPIN`].
//! 4. A wait watches only while the client's recent waits were short: a
//!    moving average of how long its waits took ([`Spin::waited`]), watched
//!    or not, is within [`SPIN`]. Waits that sleep measure too, so a client
//!    waiting for long tasks (or a remote cluster) does not watch at all,
//!    and one whose waits turn short starts watching after a few of them.
//!    A single long wait counts as at most [`LONGEST_SAMPLE`].
//!    While the waits are long, one wait in [`PROBE_EVERY`] watches all
//!    the same (a probe); a probe that sees its end starts the average
//!    afresh from its watch, so the next waits watch. Without probes, a
//!    client whose waits slept could never see that watching would make
//!    them short again. On a virtual machine a wait that sleeps
//!    takes longer than [`SPIN`] in a slow spell (a round trip of 90–200
//!    µs asleep against 35–40 watched); a few such waits, or one long
//!    start-up wait, turned watching off for a whole run, and every round
//!    trip after slept. A probe costs a client waiting for long tasks at
//!    most [`SPIN`] of one core per [`PROBE_EVERY`] waits.
//! 5. A client whose configuration turns watching off
//!    ([`Config::spin`](crate::Config::spin), `RASK_SPIN=0`) never
//!    watches: every wait sleeps at once, as where watching cannot pay.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::run::config::ExecutorKind;

/// How long a wait watches before it sleeps (rule 1): above a round trip
/// to a cluster on this machine, whether the threads it crosses slept or
/// not, and far below anything a person notices.
pub(crate) const SPIN: Duration = Duration::from_micros(100);

/// The most one wait weighs in the average of rule 4: a long wait delays
/// watching by a few waits, not by many.
pub(crate) const LONGEST_SAMPLE: Duration = Duration::from_millis(1);

/// While recent waits were long, one wait in this many watches all the
/// same (rule 4).
pub(crate) const PROBE_EVERY: u32 = 16;

/// Reads of the counter between two looks at the clock.
const READS_PER_CLOCK: u32 = 64;

/// A client's watching: the change counter and who watches (rules 1–4).
#[derive(Debug)]
pub(crate) struct Spin {
    /// Bumped at every change of the table that may end a wait.
    changes: AtomicU64,
    /// Whether a thread watches now (rule 3).
    watching: AtomicBool,
    /// The moving average of recent waits, in nanoseconds (rule 4).
    recent_ns: AtomicU64,
    /// Waits that did not watch because recent waits were long, since the
    /// last probe (rule 4).
    unwatched: AtomicU32,
    limit: Duration,
}

impl Spin {
    /// A watch of at most `limit`.
    pub(crate) fn new(limit: Duration) -> Spin {
        Spin {
            changes: AtomicU64::new(0),
            watching: AtomicBool::new(false),
            recent_ns: AtomicU64::new(0),
            unwatched: AtomicU32::new(0),
            limit,
        }
    }

    /// The watching of a client on `kind` (rule 2): `None` where it
    /// cannot pay, or where the client's configuration turned it off
    /// (`allowed` false, rule 5).
    pub(crate) fn for_client(kind: &ExecutorKind, allowed: bool) -> Option<Spin> {
        let cluster = kind.is_cluster();
        // Cores are counted only for a cluster: it reads the process's
        // CPU limits, files on Linux.
        let cores = || std::thread::available_parallelism().map_or(1, |n| n.get());
        (allowed && cluster && cores() > 1).then(|| Spin::new(SPIN))
    }

    /// Tells watchers the table changed; called after the change, outside
    /// the table lock.
    pub(crate) fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Release);
    }

    /// The count of changes so far, to pass to [`until`](Spin::until):
    /// read under the table lock, with what is waited for seen pending, so
    /// the change that ends it is counted after.
    pub(crate) fn mark(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Counts a wait that found its future pending and took `took`, watched
    /// or not, in the average of rule 4.
    pub(crate) fn waited(&self, took: Duration) {
        let sample = took.min(LONGEST_SAMPLE).as_nanos() as u64;
        // Threads race on it harmlessly: a wait more or less counts.
        let recent = self.recent_ns.load(Ordering::Relaxed);
        let average = recent - recent / 4 + sample / 4;
        self.recent_ns.store(average, Ordering::Relaxed);
    }

    /// Whether this wait watches by rule 4: recent waits were short, or
    /// it is the probe among waits that did not watch because they were
    /// long.
    fn by_recent_waits(&self) -> Watch {
        if self.recent_ns.load(Ordering::Relaxed) <= self.limit.as_nanos() as u64 {
            return Watch::Yes;
        }
        // Threads race on it harmlessly: a probe comes a wait early or late.
        let unwatched = self.unwatched.load(Ordering::Relaxed) + 1;
        if unwatched >= PROBE_EVERY {
            self.unwatched.store(0, Ordering::Relaxed);
            Watch::Probe
        } else {
            self.unwatched.store(unwatched, Ordering::Relaxed);
            Watch::No
        }
    }

    /// Watches until `ended` holds, looking each time the table changed
    /// after `since` (a [`mark`](Spin::mark)), for at most its limit and
    /// until `deadline`. Whether it saw `ended`; `false` at once when
    /// recent waits were long and this is not a probe (rule 4), or another
    /// thread watches (rule 3).
    /// The caller then sleeps as it would have without watching.
    pub(crate) fn until(
        &self,
        since: u64,
        deadline: Option<Instant>,
        mut ended: impl FnMut() -> bool,
    ) -> bool {
        let probe = match self.by_recent_waits() {
            Watch::No => return false,
            Watch::Yes => false,
            Watch::Probe => true,
        };
        if self
            .watching
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        let start = Instant::now();
        let end = deadline.map_or(start + self.limit, |d| d.min(start + self.limit));
        let mut seen = since;
        let saw = 'watch: loop {
            for _ in 0..READS_PER_CLOCK {
                let now = self.changes.load(Ordering::Acquire);
                if now != seen {
                    seen = now;
                    if ended() {
                        break 'watch true;
                    }
                }
                std::hint::spin_loop();
            }
            if Instant::now() >= end {
                break false;
            }
            std::thread::yield_now();
        };
        if probe && saw {
            let watched = start.elapsed().as_nanos() as u64;
            self.recent_ns.store(watched, Ordering::Relaxed);
        }
        self.watching.store(false, Ordering::Release);
        saw
    }
}

/// What rule 4 says of a wait.
enum Watch {
    /// Recent waits were long: sleep at once.
    No,
    /// Recent waits were short: watch.
    Yes,
    /// Recent waits were long, and this wait is the probe among them.
    Probe,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn waits_are_watched_while_recent_ones_were_short() {
        let spin = Spin::new(Duration::from_micros(100));
        let watches = |spin: &Spin| spin.until(0, None, || true);
        spin.changed();
        assert!(watches(&spin), "a new client watches");
        // One long wait: the next waits sleep at once, whatever they take.
        spin.waited(Duration::from_secs(5));
        let mut slept = 0;
        while !watches(&spin) {
            slept += 1;
            assert!(slept < 100, "short waits never brought watching back");
            spin.waited(Duration::from_micros(70));
        }
        // It counted as LONGEST_SAMPLE, not as 5 s: a few short waits make
        // up for it.
        assert!((3..=12).contains(&slept), "{slept}");
        // Waits just over the limit keep it off; just under, on.
        for _ in 0..50 {
            spin.waited(Duration::from_micros(120));
        }
        assert!(!watches(&spin));
        for _ in 0..50 {
            spin.waited(Duration::from_micros(80));
        }
        assert!(watches(&spin));
    }

    #[test]
    fn while_waits_are_long_one_in_probe_every_watches_and_short_probes_bring_watching_back() {
        let spin = Spin::new(Duration::from_micros(100));
        // Whether a wait watched (a watch looks at the change made after
        // its mark at once); its result comes during the watch when
        // `arrives`, else after it.
        let watches = |spin: &Spin, arrives: bool| {
            let since = spin.mark();
            spin.changed();
            let mut looked = false;
            spin.until(since, None, || {
                looked = true;
                arrives
            });
            looked
        };
        // A slow start: one long wait, then waits that sleep and take a
        // little over the limit, as round trips do in a VM's slow spell.
        spin.waited(Duration::from_secs(1));
        let mut probes = Vec::new();
        for wait in 1..=4 * PROBE_EVERY {
            if watches(&spin, false) {
                probes.push(wait);
            }
            spin.waited(Duration::from_micros(150));
        }
        assert_eq!(
            probes,
            (1..=4).map(|i| i * PROBE_EVERY).collect::<Vec<_>>(),
            "one wait in PROBE_EVERY watches while waits are long"
        );
        // A probe that ends its wait quickly turns watching back on.
        let mut waits = 0;
        loop {
            waits += 1;
            assert!(waits <= PROBE_EVERY, "no probe came");
            if watches(&spin, true) {
                spin.waited(Duration::from_micros(40));
                break;
            }
            spin.waited(Duration::from_micros(150));
        }
        for _ in 0..PROBE_EVERY {
            assert!(
                watches(&spin, true),
                "a short probe did not bring watching back"
            );
            spin.waited(Duration::from_micros(40));
        }
    }

    #[test]
    fn a_watch_sees_a_change_made_by_another_thread() {
        let spin = Arc::new(Spin::new(Duration::from_secs(60)));
        let done = Arc::new(AtomicBool::new(false));
        let since = spin.mark();
        let other = {
            let (spin, done) = (spin.clone(), done.clone());
            std::thread::spawn(move || {
                // A change that ends nothing, then the one that does.
                spin.changed();
                done.store(true, Ordering::Release);
                spin.changed();
            })
        };
        let mut looks = 0;
        let saw = spin.until(since, None, || {
            looks += 1;
            done.load(Ordering::Acquire)
        });
        other.join().unwrap();
        assert!(saw);
        assert!((1..=2).contains(&looks), "{looks}");
        assert!(!spin.watching.load(Ordering::Acquire));
    }

    #[test]
    fn a_change_before_the_watch_but_after_the_mark_is_seen() {
        let spin = Spin::new(Duration::from_secs(60));
        let since = spin.mark();
        spin.changed();
        assert!(spin.until(since, None, || true));
    }

    #[test]
    fn a_watch_without_change_ends_at_its_limit_or_deadline_and_looks_at_nothing() {
        let spin = Spin::new(Duration::from_micros(200));
        assert!(!spin.until(spin.mark(), None, || unreachable!("nothing changed")));
        // A past deadline ends a watch at its first look at the clock.
        let spin = Spin::new(Duration::from_secs(60));
        let past = Instant::now();
        assert!(!spin.until(spin.mark(), Some(past), || unreachable!("nothing changed")));
    }

    #[test]
    fn one_thread_watches_at_a_time() {
        let spin = Arc::new(Spin::new(Duration::from_secs(60)));
        let (looked, watching) = std::sync::mpsc::channel();
        let (finish, finished) = std::sync::mpsc::channel::<()>();
        let since = spin.mark();
        let watcher = {
            let spin = spin.clone();
            std::thread::spawn(move || {
                spin.until(since, None, || {
                    let _ = looked.send(());
                    finished.try_recv().is_ok()
                })
            })
        };
        // Make the watcher look once, and wait until it did.
        spin.changed();
        watching.recv().unwrap();
        // Another wait meanwhile does not watch: it looks at nothing.
        spin.changed();
        assert!(!spin.until(0, None, || unreachable!("a second watcher")));
        // The watcher sees its end at its next look.
        finish.send(()).unwrap();
        while !watcher.is_finished() {
            spin.changed();
            std::thread::yield_now();
        }
        assert!(watcher.join().unwrap());
        // Once it is done, the next wait watches.
        spin.changed();
        assert!(spin.until(0, None, || true));
    }

    #[test]
    fn only_clients_of_a_cluster_on_several_cores_watch() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for kind in [
            ExecutorKind::Local(2),
            ExecutorKind::Tcp("127.0.0.1:1".into()),
            ExecutorKind::Tls("127.0.0.1:1".into()),
            ExecutorKind::Unix("/tmp/s".into()),
        ] {
            assert_eq!(
                Spin::for_client(&kind, true).is_some(),
                cores > 1,
                "{kind:?}"
            );
            // Rule 5: turned off, nothing watches.
            assert!(Spin::for_client(&kind, false).is_none(), "{kind:?}");
        }
        for kind in [
            ExecutorKind::Synchronous,
            ExecutorKind::Threads(Some(2)),
            ExecutorKind::Simulated(1),
        ] {
            assert!(Spin::for_client(&kind, true).is_none(), "{kind:?}");
        }
    }
}
