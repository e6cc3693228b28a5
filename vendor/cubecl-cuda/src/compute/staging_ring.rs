//! jamba patch: a ring of pinned host memory for the small uploads of kernel launches.
//!
//! Every launch of a kernel with tensor arguments uploads their shapes and strides (the
//! "dynamic metadata", a few hundred bytes) through `Command::create_with_data`, which took a
//! slice of the pinned-memory pool for each and kept it until the stream's next flush: with a
//! hundred launches between two synchronisations (decoding a token), the pool's search for a
//! free slice ran over every slice held and cost the device thread a quarter of its time.
//!
//! Here the bytes are copied into a fixed region of pinned memory, used as a ring, from which
//! the asynchronous copy to the device reads. The ring has two halves, and an upload never
//! straddles them. Leaving a half records an event on the stream for it; entering a half first
//! waits for the event recorded when it was last left, after which the copies staged there have
//! run (they are ordered on the same stream before that event). A half holds thousands of
//! launches' metadata, so that wait has long completed in practice.

use super::ring_place::place;
use super::sync::Fence;
use cudarc::driver::sys::{CUresult, CUstream_st};
use std::ffi::c_void;

/// Bytes of the ring (two halves), unless `CUBECL_CUDA_STAGING_RING_BYTES` says otherwise (a
/// small ring wraps often: for tests).
const RING_BYTES: usize = 4 << 20;
/// Uploads larger than this (or than half the ring) go through the pinned-memory pool as before.
const MAX_STAGED: usize = 64 << 10;
/// Alignment of each staged upload.
const ALIGN: usize = 16;

/// Whether uploads are staged in the ring: unless `CUBECL_CUDA_STAGING_RING=0` (for comparison).
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("CUBECL_CUDA_STAGING_RING").map_or(true, |v| v != "0"))
}

/// The ring's size in bytes: a multiple of `2 * ALIGN`, at least 1 KiB.
fn ring_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        std::env::var("CUBECL_CUDA_STAGING_RING_BYTES")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(RING_BYTES, |b| b.max(1 << 10).next_multiple_of(2 * ALIGN))
    })
}

/// Whether an upload of `len` bytes is staged in the ring.
pub fn stages(len: usize) -> bool {
    len <= MAX_STAGED.min(ring_bytes() / 2) && enabled()
}

pub struct StagingRing {
    base: *mut u8,
    bytes: usize,
    /// The stream whose copies read the ring.
    stream: *mut CUstream_st,
    /// The half written in (0 or 1).
    half: usize,
    /// Next free byte, within `half`.
    offset: usize,
    /// Recorded when the half was last left; taken (waited for) when it is entered again, so the
    /// current half's entry is always `None`.
    left: [Option<Fence>; 2],
}

// SAFETY: the ring is owned by one stream, which only the device thread uses; the pinned
// memory it points to stays valid until `drop`.
unsafe impl Send for StagingRing {}

impl core::fmt::Debug for StagingRing {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StagingRing")
            .field("bytes", &self.bytes)
            .field("half", &self.half)
            .field("offset", &self.offset)
            .finish()
    }
}

impl StagingRing {
    /// Allocates the ring's pinned memory for the copies of `stream`; `None` where the driver
    /// refuses it.
    pub fn new(stream: *mut CUstream_st) -> Option<Self> {
        let bytes = ring_bytes();
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: FFI call that writes a pointer to `bytes` of page-locked host memory.
        let result = unsafe { cudarc::driver::sys::cuMemAllocHost_v2(&mut ptr, bytes) };
        if result != CUresult::CUDA_SUCCESS || ptr.is_null() {
            return None;
        }
        Some(Self {
            base: ptr.cast(),
            bytes,
            stream,
            half: 0,
            offset: 0,
            left: [None, None],
        })
    }

    /// Copies `data` (for which [`stages`] holds) into the ring and returns where it lies; it
    /// stays there until a copy enqueued on the ring's stream after this call has run.
    pub fn stage(&mut self, data: &[u8]) -> *const u8 {
        let len = data.len().next_multiple_of(ALIGN).max(ALIGN);
        assert!(len <= self.bytes / 2, "a staged upload fits in half the ring");
        let (half, offset) = place(self.bytes, self.half, self.offset, len);
        if half != self.half {
            self.left[self.half] = Some(Fence::new(self.stream));
            if let Some(fence) = self.left[half].take() {
                // The copies staged in that half before it was left have run once this returns.
                // It fails only after a sticky error of the context, which fails every later
                // copy too.
                let _ = fence.wait_sync();
            }
            self.half = half;
        }
        // SAFETY: `offset + len` is within the current half (`place`), so within the
        // allocation, and no copy still reads that part of the ring (see the module docs).
        let dst = unsafe { self.base.add(offset) };
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        self.offset = offset + len;
        dst
    }
}

impl Drop for StagingRing {
    fn drop(&mut self) {
        // SAFETY: the stream is valid while its ring lives; once it is synchronised, no copy
        // reads the ring, which `cuMemAllocHost_v2` allocated in `new`. Errors are ignored: a
        // destructor cannot report them.
        unsafe {
            let _ = cudarc::driver::sys::cuStreamSynchronize(self.stream);
        }
        for fence in self.left.iter_mut().filter_map(Option::take) {
            let _ = fence.wait_sync();
        }
        unsafe {
            cudarc::driver::sys::cuMemFreeHost(self.base.cast());
        }
    }
}
