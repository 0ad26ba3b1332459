//! Counts the heap allocations a thread makes, so tests can check that
//! serving a request allocates nothing (an allocation per request is what
//! the device paths are built to avoid; musl's allocator, which the
//! static `moat` binary uses, takes some 180 ns for one).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting on threads that asked for it.
struct Counting;

thread_local! {
    /// Allocations so far on this thread, while [`allocations`] counts.
    static COUNT: Cell<Option<u64>> = const { Cell::new(None) };
}

fn note() {
    // try_with: the allocator can run while this thread's locals are torn
    // down.
    let _ = COUNT.try_with(|c| c.set(c.get().map(|n| n + 1)));
}

// SAFETY: every call goes to the system allocator unchanged; counting
// touches only a const-initialised thread local, which does not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// How many allocations (and reallocations) `f` makes on this thread.
pub fn allocations(f: impl FnOnce()) -> u64 {
    COUNT.with(|c| c.set(Some(0)));
    f();
    COUNT.with(|c| c.replace(None)).unwrap_or(0)
}

#[test]
fn counts_what_the_closure_allocates_and_nothing_else() {
    let outside = vec![1u8; 10];
    assert_eq!(
        allocations(|| drop(std::hint::black_box(Vec::<u8>::new()))),
        0
    );
    assert_eq!(allocations(|| drop(std::hint::black_box(vec![0u8; 4]))), 1);
    let mut v = Vec::with_capacity(1);
    assert_eq!(allocations(|| v.extend_from_slice(&[1u8, 2, 3])), 1);
    drop(outside);
}
