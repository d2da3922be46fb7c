//! A small tmpfs mounted for one test, so that a disk fills up for real
//! (`ENOSPC`), and unmounted when the guard is dropped — also when the test
//! panics. The tests of `rask-distributed` include this same file by path
//! (`executors/distributed/tests/cluster.rs`).
//!
//! Mounting needs Linux and root (`CAP_SYS_ADMIN`), as CI runs. Where it is
//! not allowed, [`Tmpfs::mount`] fails the test saying why, unless
//! `RASK_SKIP_MOUNT_TESTS=1` is set: then it says loudly that the test is
//! skipped and returns `None`. Never a silent skip.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Set to `1` to skip tests that mount a tmpfs where mounting is not
/// allowed.
pub const SKIP_ENV: &str = "RASK_SKIP_MOUNT_TESTS";

/// A tmpfs mounted at a directory; unmounted (and the directory removed)
/// on drop.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` at `dir` (made if missing, and expected
    /// empty). `None` only when mounting fails and `RASK_SKIP_MOUNT_TESTS=1`.
    ///
    /// # Panics
    ///
    /// When mounting fails and the skip is not asked for.
    pub fn mount(dir: &Path, bytes: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes},mode=0700")])
            .arg("tmpfs")
            .arg(dir)
            .output();
        let why = match mounted {
            Ok(out) if out.status.success() => {
                return Some(Tmpfs {
                    dir: dir.to_owned(),
                })
            }
            Ok(out) => format!(
                "`mount` exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => format!("`mount` could not run: {e}"),
        };
        let _ = std::fs::remove_dir(dir);
        if std::env::var_os(SKIP_ENV).is_some_and(|v| v == "1") {
            eprintln!(
                "\n!!! SKIPPED: this test fills a disk for real by mounting a {bytes}-byte tmpfs \
                 at {}, and mounting is not allowed here ({why}); {SKIP_ENV}=1 asked to skip \
                 it. Run it as root on Linux.\n",
                dir.display()
            );
            return None;
        }
        panic!(
            "this test fills a disk for real by mounting a {bytes}-byte tmpfs at {}, and \
             mounting is not allowed here ({why}). Run it as root (CAP_SYS_ADMIN) on Linux, or \
             set {SKIP_ENV}=1 to skip it knowingly.",
            dir.display()
        );
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a process of the failed test holds a file): gone
            // from the tree now, freed once the last file is closed.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
