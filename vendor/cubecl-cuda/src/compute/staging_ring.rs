//! jamba patch: a ring of pinned host memory for the small uploads of kernel launches.
//!
//! Every launch of a kernel with tensor arguments uploads their shapes and strides (the
//! "dynamic metadata", a few hundred bytes) through `Command::create_with_data`, which took a
//! slice of the pinned-memory pool for each and kept it until the stream's next flush: with a
//! hundred launches between two synchronisations (decoding a token), the pool's search for a
//! free slice ran over every slice held and cost the device thread a quarter of its time.
//!
//! Here the bytes are copied into a fixed region of pinned memory, used as a ring, from which
//! the asynchronous copy to the device reads. The ring has two halves. Moving from one half to
//! the other records an event on the stream for the half left, and first waits for the event
//! recorded when the half entered was last left: the copies staged there have then run (they
//! are ordered on the same stream before that event). A half holds thousands of launches'
//! metadata, so that wait has long completed in practice.

use super::sync::Fence;
use cudarc::driver::sys::{CUresult, CUstream_st};
use std::ffi::c_void;

/// Bytes of the ring (two halves).
const RING_BYTES: usize = 4 << 20;
/// Uploads larger than this go through the pinned-memory pool as before.
pub const MAX_STAGED: usize = 64 << 10;
/// Alignment of each staged upload.
const ALIGN: usize = 16;

/// Whether uploads are staged in the ring: unless `CUBECL_CUDA_STAGING_RING=0` (for comparison).
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("CUBECL_CUDA_STAGING_RING").map_or(true, |v| v != "0"))
}

pub struct StagingRing {
    base: *mut u8,
    /// The stream whose copies read the ring.
    stream: *mut CUstream_st,
    /// Next free byte.
    offset: usize,
    /// Recorded when the half was last left; waited for before it is written again.
    left: [Option<Fence>; 2],
}

// SAFETY: the ring is owned by one stream, which only the device thread uses; the pinned
// memory it points to stays valid until `drop`.
unsafe impl Send for StagingRing {}

impl core::fmt::Debug for StagingRing {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StagingRing")
            .field("offset", &self.offset)
            .finish()
    }
}

impl StagingRing {
    /// Allocates the ring's pinned memory for the copies of `stream`; `None` where the driver
    /// refuses it.
    pub fn new(stream: *mut CUstream_st) -> Option<Self> {
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: FFI call that writes a pointer to `RING_BYTES` of page-locked host memory.
        let result = unsafe { cudarc::driver::sys::cuMemAllocHost_v2(&mut ptr, RING_BYTES) };
        if result != CUresult::CUDA_SUCCESS || ptr.is_null() {
            return None;
        }
        Some(Self {
            base: ptr.cast(),
            stream,
            offset: 0,
            left: [None, None],
        })
    }

    /// Copies `data` (at most [`MAX_STAGED`] bytes) into the ring and returns where it lies; it
    /// stays there until a copy enqueued on the ring's stream after this call has run.
    pub fn stage(&mut self, data: &[u8]) -> *const u8 {
        let stream = self.stream;
        debug_assert!(data.len() <= MAX_STAGED);
        let half = RING_BYTES / 2;
        let len = data.len().next_multiple_of(ALIGN).max(ALIGN);
        let current = self.offset / half;
        if self.offset + len > (current + 1) * half {
            self.left[current] = Some(Fence::new(stream));
            let next = 1 - current;
            if let Some(fence) = self.left[next].take() {
                // The copies staged in that half before it was left have run once it is reached.
                let _ = fence.wait_sync();
            }
            self.offset = next * half;
        }
        // SAFETY: `offset + len <= RING_BYTES` (a half is larger than `MAX_STAGED`), and no
        // copy still reads this part of the ring (see the module docs).
        let dst = unsafe { self.base.add(self.offset) };
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        self.offset += len;
        dst
    }
}

impl Drop for StagingRing {
    fn drop(&mut self) {
        // Every copy enqueued so far has run once this is reached.
        let _ = Fence::new(self.stream).wait_sync();
        for fence in self.left.iter_mut().filter_map(Option::take) {
            let _ = fence.wait_sync();
        }
        // SAFETY: allocated by `cuMemAllocHost_v2` in `new`, and no copy reads it any more.
        unsafe {
            cudarc::driver::sys::cuMemFreeHost(self.base.cast());
        }
    }
}
