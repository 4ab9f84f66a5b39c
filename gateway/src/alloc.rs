//! The gateway's allocator: mimalloc for small blocks, the system allocator for large ones.
//!
//! Every request allocates and frees a few dozen small buffers on one thread, which
//! mimalloc's per-thread free lists serve in a fraction of glibc's instructions (malloc
//! and free were about a sixth of the gateway's instructions per request; BENCHMARKS.md).
//! Large buffers (an answer of megabytes) stay with glibc, tuned in `main` to map each on
//! pages of its own: it grows them in place with `mremap` and returns them to the system
//! when freed, where mimalloc copied on every growth and kept the freed memory resident
//! (a test of concurrent oversized answers peaked at 311 MiB under a 128 MiB budget).

// The workspace denies unsafe code; a global allocator cannot be written without it.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};

use mimalloc::MiMalloc;

/// Blocks of this size and more come from the system allocator.
pub const LARGE: usize = 256 * 1024;

/// Chooses the allocator by the block's size. `GlobalAlloc` passes `dealloc` and
/// `realloc` the layout the block was allocated with, so the choice is the same at both
/// ends of a block's life.
pub struct BySize;

fn large(size: usize) -> bool {
    size >= LARGE
}

// SAFETY: each call is forwarded to an allocator that upholds `GlobalAlloc`'s contract,
// and a block is always returned to the allocator that made it: both ends decide by the
// size in the layout, which the caller must pass unchanged. A block that crosses `LARGE`
// in `realloc` is moved with `alloc`, a copy and `dealloc` under that same rule.
unsafe impl GlobalAlloc for BySize {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe {
            if large(layout.size()) {
                System.alloc(layout)
            } else {
                MiMalloc.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe {
            if large(layout.size()) {
                System.alloc_zeroed(layout)
            } else {
                MiMalloc.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated with `layout`, so by the allocator chosen here.
        unsafe {
            if large(layout.size()) {
                System.dealloc(ptr, layout);
            } else {
                MiMalloc.dealloc(ptr, layout);
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match (large(layout.size()), large(new_size)) {
            // SAFETY: the block stays with the allocator that made it.
            (true, true) => unsafe { System.realloc(ptr, layout, new_size) },
            // SAFETY: as above.
            (false, false) => unsafe { MiMalloc.realloc(ptr, layout, new_size) },
            _ => {
                // SAFETY: `realloc`'s caller guarantees that `new_size`, rounded up to
                // `layout.align()`, does not overflow `isize`, and that `ptr` holds
                // `layout.size()` bytes; the new block holds `new_size` bytes and does
                // not overlap the old one, which is freed by its own allocator.
                unsafe {
                    let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_keep_their_bytes_when_they_grow_or_shrink_across_the_threshold() {
        let a = BySize;
        let layout = Layout::from_size_align(1000, 8).expect("layout");
        // SAFETY: every pointer is used within the size it was last given and freed with
        // the layout it has at that moment.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            for i in 0..1000 {
                *p.add(i) = (i % 251) as u8;
            }
            let grown = a.realloc(p, layout, LARGE * 2);
            assert!(!grown.is_null());
            for i in 0..1000 {
                assert_eq!(*grown.add(i), (i % 251) as u8);
            }
            let big = Layout::from_size_align(LARGE * 2, 8).expect("layout");
            let shrunk = a.realloc(grown, big, 500);
            assert!(!shrunk.is_null());
            for i in 0..500 {
                assert_eq!(*shrunk.add(i), (i % 251) as u8);
            }
            a.dealloc(shrunk, Layout::from_size_align(500, 8).expect("layout"));
        }
    }
}
