//! Hints to the processor that change no result.

// The crate's second module with `unsafe` (its `Cargo.toml`): one block,
// a prefetch instruction, which reads no memory the program sees.
#![allow(unsafe_code)]

/// Asks the processor to start loading the cache line that holds the start
/// of `value`, without waiting for it: for a loop that knows which memory
/// it reads a little later (an executor's next task, a dependent's state),
/// where that read would otherwise stall on a cache miss. A hint only: it
/// changes no result, and does nothing on processors other than x86-64 (or
/// under miri).
///
/// ```
/// let values: Vec<u64> = (0..1000).collect();
/// let mut sum = 0;
/// for (i, value) in values.iter().enumerate() {
///     if let Some(ahead) = values.get(i + 8) {
///         rask_executor::prefetch(ahead);
///     }
///     sum += value;
/// }
/// assert_eq!(sum, 499_500);
/// ```
#[inline(always)]
pub fn prefetch<T: ?Sized>(value: &T) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: a prefetch reads nothing the program sees and cannot fault,
    // whatever the address (this one is a live reference's). `_mm_prefetch`
    // needs SSE, which every x86-64 processor has.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(value).cast::<i8>());
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    let _ = value;
}
