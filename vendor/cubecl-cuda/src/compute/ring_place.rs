//! jamba patch: where the staging ring (`staging_ring.rs`) places an upload, apart from the ring
//! itself so that the jamba workspace's tests can compile and run it (`tests/staging_ring.rs`
//! includes this file) without CUDA.

/// Where the next upload of `len` bytes goes (`len` at most half of `ring`, both multiples of
/// the ring's alignment): with the current half `half` and its next free byte `offset`, the half to write in
/// and the offset of the upload. The half changes exactly when the upload does not fit before
/// the current half's end.
pub(crate) fn place(ring: usize, half: usize, offset: usize, len: usize) -> (usize, usize) {
    let half_bytes = ring / 2;
    if offset + len <= (half + 1) * half_bytes {
        (half, offset)
    } else {
        let next = 1 - half;
        (next, next * half_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every upload lies within one half, inside the ring, after the previous one of its half;
    /// the half changes exactly when the upload would cross its end, including uploads that end
    /// exactly on a half's or the ring's last byte.
    #[test]
    fn uploads_stay_in_one_half() {
        let ring = 1 << 10;
        let half_bytes = ring / 2;
        for sizes in [vec![64], vec![16, 48, 208, 512], vec![512], vec![32, 496]] {
            let (mut half, mut offset) = (0, 0);
            let mut switches = 0;
            for i in 0..10_000 {
                let len = sizes[i % sizes.len()];
                let (h, at) = place(ring, half, offset, len);
                assert!(at >= h * half_bytes && at + len <= (h + 1) * half_bytes);
                if h == half {
                    assert_eq!(at, offset);
                } else {
                    assert!(offset + len > (half + 1) * half_bytes, "switched too early");
                    assert_eq!(at, h * half_bytes);
                    switches += 1;
                }
                (half, offset) = (h, at + len);
            }
            assert!(switches > 10);
        }
    }
}
