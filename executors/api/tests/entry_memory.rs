//! What reading an entry back costs in memory (`entry` rule 4): the
//! value's size once, not a copy of the whole file and a copy of the
//! value. Alone in its binary: the allocator below counts every
//! allocation of the process, so no other test may run beside it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use rask_executor::{entry, Key};

/// The system's allocator, counting the bytes in use and their peak.
struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = IN_USE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

#[allow(unsafe_code)]
// SAFETY: every call goes to `System` with the caller's own arguments,
// which `GlobalAlloc`'s contract already binds; the counts are plain
// atomics beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `System::alloc`, with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `System::alloc_zeroed`, with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` are the caller's, from this allocator,
        // which is `System`'s.
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's arguments, for `System`'s own allocation.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Counted as both at once: a moving realloc holds both.
            grew(new_size);
            IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated at the peak of `f`, beyond what was in use before it.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = IN_USE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - before)
}

/// A 16 MiB value read back holds 16 MiB and a little (a read buffer,
/// the path, the type name), by either reader: the whole file and then a
/// copy of its value took twice that, and an `Arc<[u8]>` made from the
/// entry's `Vec` once more.
#[test]
fn reading_an_entry_takes_its_size_in_memory_once() {
    const SIZE: usize = 16 << 20;
    const SLACK: usize = 256 << 10;
    let dir = std::env::temp_dir().join(format!("rask-entry-memory-{}", std::process::id()));
    let value: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let key = Key([3; 32]);
    entry::write(&dir, &key, "Vec<u8>", &value).unwrap();

    let (read, peak) = peak_of(|| entry::read(&dir, &key, Some("Vec<u8>")).unwrap());
    assert_eq!(read.bytes, value);
    assert!(
        peak <= SIZE + SLACK,
        "read took {peak} bytes at its peak for a value of {SIZE}"
    );
    drop(read);

    let ((name, bytes), peak) =
        peak_of(|| entry::read_shared(&dir, &key, Some("Vec<u8>")).unwrap());
    assert_eq!(name, "Vec<u8>");
    assert_eq!(&bytes[..], &value[..]);
    assert!(
        peak <= SIZE + SLACK,
        "read_shared took {peak} bytes at its peak for a value of {SIZE}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
