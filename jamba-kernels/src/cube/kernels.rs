//! CubeCL kernels for the Mamba selective scan and the causal depthwise conv1d.
//!
//! One source compiles for CUDA (NVRTC) and wgpu (SPIR-V/WGSL). Nothing here assumes a plane
//! (warp) size: plane reductions use `plane_sum`, the host sizes buffers indexed by plane from
//! the runtime's smallest plane size, and the chunked kernels take the plane size as a parameter.
//!
//! Layout: every tensor argument is read through its strides, so the model's channel-last views
//! (`[batch, len, d]` storage seen as `[batch, d, len]`) need no copy. State and accumulation are
//! f32 whatever the activation dtype `F`.
//!
//! Scan kernels run one cube per (block of `block` channels, batch row). A cube walks the
//! sequence in tiles of `tile` positions: it stages the tile's inputs in shared memory with
//! coalesced loads, each unit then runs the recurrence of its channel over the tile with the
//! `d_state` states in registers, and the outputs leave through shared memory again. The
//! `[batch, d, len, d_state]` tensor of states is never written: the forward keeps, on request,
//! the state at each tile boundary (`[batch, d, tiles, d_state]`), from which the backward
//! recomputes a tile's states before walking it in reverse. The chunked scan kernels
//! ([`scan_fwd_chunk_kernel`], [`scan_bwd_chunk_kernel`]) split each channel's tile between the
//! lanes of one plane instead, and combine the lanes with a plane scan: they run only where the
//! device's plane size is fixed, and are launched with exactly one plane per channel.

// `#[cube]` expands a subset of Rust: nested comptime/runtime `if`s stay apart and integer
// `div_ceil`, `is_multiple_of` and `checked_div` are written out.
#![allow(
    clippy::collapsible_if,
    clippy::manual_div_ceil,
    clippy::manual_is_multiple_of,
    clippy::manual_checked_ops
)]

use cubecl::prelude::*;

/// `softplus` with PyTorch's threshold (20).
#[cube]
pub(crate) fn softplus_f32(x: f32) -> f32 {
    let mut out = x;
    if x <= 20.0 {
        out = x.exp().log1p();
    }
    out
}

/// `d softplus(x) / dx` with the same threshold.
#[cube]
fn softplus_grad_f32(x: f32) -> f32 {
    let mut out = 1.0f32;
    if x <= 20.0 {
        out = 1.0 / (1.0 + (-x).exp());
    }
    out
}

/// `d softplus(x) / dx` from `softplus(x)`: `sigmoid(x) = 1 - exp(-softplus(x))`, 1 above the
/// threshold. Small outputs take the series `s (1 - s/2 + s^2/6)` (its error below 3e-9
/// relative under 0.01), where `1 - exp(-s)` would cancel to about 1e-7 / s relative.
#[cube]
fn softplus_grad_from_output(s: f32) -> f32 {
    let mut out = 1.0 - (-s).exp();
    if s < 0.01 {
        out = s * (1.0 - s * (0.5 - s / 6.0));
    }
    out
}

#[cube]
pub(crate) fn sigmoid_f32(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Position of element `e` of a `tile x block` tile: returns `(tl, dl)`, ordered so that
/// consecutive units touch consecutive addresses of a tensor whose time stride is 1
/// (`time_major`) or whose channel stride is 1.
#[cube]
fn tile_pos(
    e: usize,
    time_major: bool,
    #[comptime] tile: usize,
    #[comptime] block: usize,
) -> (usize, usize) {
    let mut tl = e / block;
    let mut dl = e % block;
    if time_major {
        tl = e % tile;
        dl = e / tile;
    }
    (tl, dl)
}

/// Sum of `v` over the `split` adjacent units that share a channel (xor butterfly); every one of
/// them gets the total.
#[cube]
fn sum_over_split(v: f32, #[comptime] split_log2: u32) -> f32 {
    let mut acc = v;
    #[unroll]
    for k in 0..split_log2 {
        acc += plane_shuffle_xor(acc, 1u32 << k);
    }
    acc
}

/// Issues the loads of `[tile, block]` of a `[batch, d, len]` tensor into `regs` (raw values,
/// zero outside the tensor), without waiting for them: the caller computes on the previous tile
/// meanwhile, then [`put`]s them into shared memory.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch<F: Float>(
    src: &Tensor<F>,
    regs: &mut Array<f32>,
    bi: usize,
    d0: usize,
    t0: usize,
    dim: usize,
    len: usize,
    #[comptime] tile: usize,
    #[comptime] block: usize,
    #[comptime] units: usize,
) {
    let tid = UNIT_POS_X as usize;
    let time_major = src.stride(2) == 1;
    let base = bi * src.stride(0);
    let (s_d, s_t) = (src.stride(1), src.stride(2));
    #[unroll]
    for i in 0..comptime!((tile * block).div_ceil(units)) {
        let e = tid + i * units;
        let (tl, dl) = tile_pos(e, time_major, tile, block);
        let t = t0 + tl;
        let dd = d0 + dl;
        let mut v = 0.0f32;
        if e < tile * block && t < len && dd < dim {
            v = f32::cast_from(src[base + dd * s_d + t * s_t]);
        }
        regs[i] = v;
    }
}

/// Writes fetched values into a `[tile, block + 1]` shared tile (padded: no bank conflicts
/// whichever way the tile was read), applying `op` (0: none, 1: + delta_bias then softplus,
/// 2: silu gate, 3: softplus' of (x + delta_bias)).
#[cube]
#[allow(clippy::too_many_arguments)]
fn put<F: Float>(
    src: &Tensor<F>,
    regs: &Array<f32>,
    dst: &mut SharedMemory<f32>,
    delta_bias: &Tensor<f32>,
    d0: usize,
    t0: usize,
    dim: usize,
    len: usize,
    #[comptime] op: u32,
    #[comptime] has_bias: bool,
    #[comptime] softplus: bool,
    #[comptime] tile: usize,
    #[comptime] block: usize,
    #[comptime] units: usize,
) {
    let tid = UNIT_POS_X as usize;
    let time_major = src.stride(2) == 1;
    #[unroll]
    for i in 0..comptime!((tile * block).div_ceil(units)) {
        let e = tid + i * units;
        if e < tile * block {
            let (tl, dl) = tile_pos(e, time_major, tile, block);
            let t = t0 + tl;
            let dd = d0 + dl;
            let mut v = regs[i];
            if op == 2 {
                v = 1.0;
            }
            if t < len && dd < dim {
                v = regs[i];
                if op == 1 || op == 3 {
                    if has_bias {
                        v += delta_bias[dd * delta_bias.stride(0)];
                    }
                }
                if op == 1 {
                    if softplus {
                        v = softplus_f32(v);
                    }
                }
                if op == 3 {
                    let mut g = 1.0f32;
                    if softplus {
                        g = softplus_grad_f32(v);
                    }
                    v = g;
                }
                if op == 2 {
                    v *= sigmoid_f32(v);
                }
            }
            dst[tl * (block + 1) + dl] = v;
        }
    }
}

/// Issues the loads of `[tile, d_state]` of B or C (`[batch, d_state, len]`) into `regs`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch_state_input<F: Float>(
    src: &Tensor<F>,
    regs: &mut Array<f32>,
    bi: usize,
    t0: usize,
    len: usize,
    #[comptime] n_state: usize,
    #[comptime] tile: usize,
    #[comptime] units: usize,
) {
    let tid = UNIT_POS_X as usize;
    let state_major = src.stride(1) == 1;
    let base = bi * src.stride(0);
    let (s_n, s_t) = (src.stride(1), src.stride(2));
    #[unroll]
    for i in 0..comptime!((tile * n_state).div_ceil(units)) {
        let e = tid + i * units;
        let mut tl = e / n_state;
        let mut n = e % n_state;
        if !state_major {
            tl = e % tile;
            n = e / tile;
        }
        let t = t0 + tl;
        let mut v = 0.0f32;
        if e < tile * n_state && t < len {
            v = f32::cast_from(src[base + n * s_n + t * s_t]);
        }
        regs[i] = v;
    }
}

/// Writes fetched B or C values into a shared tile: `[tile, d_state + 1]`, or with
/// `lane_len > 0` `[d_state][tile / lane_len][lane_len + 1]`, where the lanes of the chunked
/// kernels each read `lane_len` consecutive positions of one state, `lane_len + 1` words apart
/// from their neighbours' (distinct banks).
#[cube]
#[allow(clippy::too_many_arguments)]
fn put_state_input<F: Float>(
    src: &Tensor<F>,
    regs: &Array<f32>,
    dst: &mut SharedMemory<f32>,
    #[comptime] n_state: usize,
    #[comptime] tile: usize,
    #[comptime] units: usize,
    #[comptime] lane_len: usize,
) {
    let tid = UNIT_POS_X as usize;
    let state_major = src.stride(1) == 1;
    #[unroll]
    for i in 0..comptime!((tile * n_state).div_ceil(units)) {
        let e = tid + i * units;
        if e < tile * n_state {
            let mut tl = e / n_state;
            let mut n = e % n_state;
            if !state_major {
                tl = e % tile;
                n = e / tile;
            }
            if lane_len == 0 {
                dst[tl * (n_state + 1) + n] = regs[i];
            } else {
                dst[n * comptime!(tile / lane_len * (lane_len + 1))
                    + (tl / lane_len) * comptime!(lane_len + 1)
                    + tl % lane_len] = regs[i];
            }
        }
    }
}

/// [`fetch`] then [`put`]: a tile staged without overlapping its loads with other work.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage<F: Float>(
    src: &Tensor<F>,
    regs: &mut Array<f32>,
    dst: &mut SharedMemory<f32>,
    delta_bias: &Tensor<f32>,
    bi: usize,
    d0: usize,
    t0: usize,
    dim: usize,
    len: usize,
    #[comptime] op: u32,
    #[comptime] has_bias: bool,
    #[comptime] softplus: bool,
    #[comptime] tile: usize,
    #[comptime] block: usize,
    #[comptime] units: usize,
) {
    fetch::<F>(src, regs, bi, d0, t0, dim, len, tile, block, units);
    put::<F>(
        src, regs, dst, delta_bias, d0, t0, dim, len, op, has_bias, softplus, tile, block, units,
    );
}

/// [`fetch_state_input`] then [`put_state_input`].
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_state_input<F: Float>(
    src: &Tensor<F>,
    regs: &mut Array<f32>,
    dst: &mut SharedMemory<f32>,
    bi: usize,
    t0: usize,
    len: usize,
    #[comptime] n_state: usize,
    #[comptime] tile: usize,
    #[comptime] units: usize,
    #[comptime] lane_len: usize,
) {
    fetch_state_input::<F>(src, regs, bi, t0, len, n_state, tile, units);
    put_state_input::<F>(src, regs, dst, n_state, tile, units, lane_len);
}

/// Four f32 values: the unit of the chunked kernels' B and C tiles in direct mode.
type Vec4 = Vector<f32, Const<4>>;

/// Stages `[tile, d_state]` of B or C (`[batch, d_state, len]`) in shared memory as vectors of
/// four positions, laid out `[d_state][seg_len / 4][segs][4]` from `offset` (in vectors): the
/// lane that owns positions `lane * seg_len ..` of the tile reads its `seg_len` values of a
/// state as `seg_len / 4` vectors, and the lanes of a plane read adjacent vectors (no bank
/// conflicts).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_state_vectors<F: Float>(
    src: &Tensor<F>,
    dst: &mut SharedMemory<Vec4>,
    bi: usize,
    t0: usize,
    len: usize,
    offset: usize,
    #[comptime] n_state: usize,
    #[comptime] segs: usize,
    #[comptime] seg_len: usize,
    #[comptime] units: usize,
) {
    let tid = UNIT_POS_X as usize;
    let quads = comptime!(seg_len / 4);
    let count = comptime!(n_state * quads * segs);
    let base = bi * src.stride(0);
    let (s_n, s_t) = (src.stride(1), src.stride(2));
    #[unroll]
    for r in 0..comptime!(count.div_ceil(units)) {
        let e = tid + r * units;
        if e < count {
            let lane = e % segs;
            let quad = (e / segs) % quads;
            let n = e / (segs * quads);
            let t = t0 + lane * seg_len + quad * 4;
            let mut v = Vec4::empty();
            #[unroll]
            for j in 0..4usize {
                let mut x = 0.0f32;
                if t + j < len {
                    x = f32::cast_from(src[base + n * s_n + (t + j) * s_t]);
                }
                v[j] = x;
            }
            dst[offset + e] = v;
        }
    }
}

/// A lane's `seg_len` values of state `n` from a tile staged by [`stage_state_vectors`].
#[cube]
fn lane_state_values(
    src: &SharedMemory<Vec4>,
    out: &mut Array<f32>,
    offset: usize,
    n: usize,
    lane: usize,
    #[comptime] segs: usize,
    #[comptime] seg_len: usize,
) {
    let quads = comptime!(seg_len / 4);
    #[unroll]
    for quad in 0..quads {
        let v = src[offset + (n * quads + quad) * segs + lane];
        #[unroll]
        for j in 0..4usize {
            out[quad * 4 + j] = v[j];
        }
    }
}

/// Value `i` of a lane's positions of one state: from its registers in direct mode, else from
/// the staged tile at `at`.
#[cube]
fn lane_value(
    regs: &Array<f32>,
    staged: &SharedMemory<f32>,
    at: usize,
    i: usize,
    #[comptime] direct: bool,
) -> f32 {
    if direct {
        regs[i]
    } else {
        staged[at + i]
    }
}

/// Writes `[tile, block]` from shared memory to a `[batch, d, len]` tensor.
#[cube]
#[allow(clippy::too_many_arguments)]
fn unstage<F: Float>(
    src: &SharedMemory<f32>,
    dst: &mut Tensor<F>,
    bi: usize,
    d0: usize,
    t0: usize,
    dim: usize,
    len: usize,
    #[comptime] tile: usize,
    #[comptime] block: usize,
    #[comptime] units: usize,
) {
    let tid = UNIT_POS_X as usize;
    let time_major = dst.stride(2) == 1;
    #[unroll]
    for i in 0..comptime!((tile * block).div_ceil(units)) {
        let e = tid + i * units;
        if e < tile * block {
            let (tl, dl) = tile_pos(e, time_major, tile, block);
            let t = t0 + tl;
            let dd = d0 + dl;
            if t < len && dd < dim {
                dst[bi * dst.stride(0) + dd * dst.stride(1) + t * dst.stride(2)] =
                    F::cast_from(src[tl * (block + 1) + dl]);
            }
        }
    }
}

/// Selective scan forward. Cube `(x, y)` = (block of `block` channels, batch row), with
/// `split` adjacent units per channel, each holding `d_state / split` of its states.
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
#[allow(clippy::too_many_arguments)]
pub fn scan_fwd_kernel<F: Float>(
    u: &Tensor<F>,
    delta: &Tensor<F>,
    z: &Tensor<F>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    a: &Tensor<f32>,
    d_skip: &Tensor<f32>,
    delta_bias: &Tensor<f32>,
    init: &Tensor<f32>,
    y: &mut Tensor<F>,
    last: &mut Tensor<f32>,
    chunks: &mut Tensor<f32>,
    #[comptime] n_state: usize,
    #[comptime] split_log2: u32,
    #[comptime] tile: usize,
    #[comptime] block: usize,
    #[comptime] has_z: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_init: bool,
    #[comptime] softplus: bool,
    #[comptime] save: bool,
    #[define(F)] _dtype: StorageType,
) {
    let split = comptime!(1usize << split_log2);
    let ns = comptime!(n_state / split);
    let units = comptime!(block * split);
    let dim = u.shape(1);
    let len = u.shape(2);
    let bi = CUBE_POS_Y as usize;
    let tid = UNIT_POS_X as usize;
    let dl = tid / split;
    let part = tid % split;
    let n0 = part * ns;
    let d0 = CUBE_POS_X as usize * block;
    let di = d0 + dl;
    let valid = di < dim;

    let mut s_u = SharedMemory::<f32>::new(tile * (block + 1));
    let mut s_dt = SharedMemory::<f32>::new(tile * (block + 1));
    let mut s_gate = SharedMemory::<f32>::new(tile * (block + 1));
    let mut s_b = SharedMemory::<f32>::new(tile * (n_state + 1));
    let mut s_c = SharedMemory::<f32>::new(tile * (n_state + 1));

    let mut h = Array::<f32>::new(ns);
    let mut a_row = Array::<f32>::new(ns);
    let mut d_val = 0.0f32;
    #[unroll(ns <= 64)]
    for j in 0..ns {
        h[j] = 0.0;
        a_row[j] = 0.0;
    }
    if valid {
        d_val = d_skip[di * d_skip.stride(0)];
        #[unroll(ns <= 64)]
        for j in 0..ns {
            a_row[j] = a[di * a.stride(0) + (n0 + j) * a.stride(1)];
            if has_init {
                h[j] = init[bi * init.stride(0) + di * init.stride(1) + (n0 + j) * init.stride(2)];
            }
        }
    }

    let n_tiles = (len + tile - 1) / tile;
    let per = comptime!((tile * block).div_ceil(units));
    let per_bc = comptime!((tile * n_state).div_ceil(units));
    let mut r_u = Array::<f32>::new(per);
    let mut r_dt = Array::<f32>::new(per);
    let mut r_z = Array::<f32>::new(per);
    let mut r_b = Array::<f32>::new(per_bc);
    let mut r_c = Array::<f32>::new(per_bc);
    fetch::<F>(u, &mut r_u, bi, d0, 0, dim, len, tile, block, units);
    fetch::<F>(delta, &mut r_dt, bi, d0, 0, dim, len, tile, block, units);
    if has_z {
        fetch::<F>(z, &mut r_z, bi, d0, 0, dim, len, tile, block, units);
    }
    fetch_state_input::<F>(b, &mut r_b, bi, 0, len, n_state, tile, units);
    fetch_state_input::<F>(c, &mut r_c, bi, 0, len, n_state, tile, units);
    for k in 0..n_tiles {
        let t0 = k * tile;
        let mut count = len - t0;
        if count > tile {
            count = tile;
        }
        put::<F>(
            u, &r_u, &mut s_u, delta_bias, d0, t0, dim, len, 0u32, has_bias, softplus, tile, block,
            units,
        );
        put::<F>(
            delta, &r_dt, &mut s_dt, delta_bias, d0, t0, dim, len, 1u32, has_bias, softplus, tile,
            block, units,
        );
        if has_z {
            put::<F>(
                z,
                &r_z,
                &mut s_gate,
                delta_bias,
                d0,
                t0,
                dim,
                len,
                2u32,
                has_bias,
                softplus,
                tile,
                block,
                units,
            );
        }
        put_state_input::<F>(b, &r_b, &mut s_b, n_state, tile, units, 0usize);
        put_state_input::<F>(c, &r_c, &mut s_c, n_state, tile, units, 0usize);
        sync_cube();
        // The next tile's loads travel while this one is computed.
        if k + 1 < n_tiles {
            let t1 = t0 + tile;
            fetch::<F>(u, &mut r_u, bi, d0, t1, dim, len, tile, block, units);
            fetch::<F>(delta, &mut r_dt, bi, d0, t1, dim, len, tile, block, units);
            if has_z {
                fetch::<F>(z, &mut r_z, bi, d0, t1, dim, len, tile, block, units);
            }
            fetch_state_input::<F>(b, &mut r_b, bi, t1, len, n_state, tile, units);
            fetch_state_input::<F>(c, &mut r_c, bi, t1, len, n_state, tile, units);
        }

        if save && valid {
            #[unroll(ns <= 64)]
            for j in 0..ns {
                chunks[bi * chunks.stride(0)
                    + di * chunks.stride(1)
                    + k * chunks.stride(2)
                    + (n0 + j) * chunks.stride(3)] = h[j];
            }
        }

        for tl in 0..count {
            let slot = tl * (block + 1) + dl;
            let uv = s_u[slot];
            let dtv = s_dt[slot];
            let du = dtv * uv;
            let mut acc = 0.0f32;
            #[unroll(ns <= 64)]
            for j in 0..ns {
                let decay = (dtv * a_row[j]).exp();
                h[j] = decay * h[j] + du * s_b[tl * (n_state + 1) + n0 + j];
                acc += h[j] * s_c[tl * (n_state + 1) + n0 + j];
            }
            // Every unit of the channel has read the slot before the butterfly completes.
            acc = sum_over_split(acc, split_log2);
            if part == 0 {
                let mut out = acc + d_val * uv;
                if has_z {
                    out *= s_gate[slot];
                }
                s_u[slot] = out;
            }
        }
        sync_cube();
        unstage::<F>(&s_u, y, bi, d0, t0, dim, len, tile, block, units);
        sync_cube();
    }

    if valid {
        #[unroll(ns <= 64)]
        for j in 0..ns {
            last[bi * last.stride(0) + di * last.stride(1) + (n0 + j) * last.stride(2)] = h[j];
        }
    }
}

/// The state entering lane `lane`'s positions, where every lane of the plane holds its
/// positions composed into one affine map `h -> p h + q` and `h_edge` enters the plane's first
/// lane, or with `reverse` its last lane (the maps then composed towards lane 0, as the
/// backward's adjoint runs). An inclusive scan of the maps over the plane (`segs_log2` shuffle
/// steps, Kogge-Stone), then the neighbour's composition applied to `h_edge`.
#[cube]
fn plane_scan_entering(
    p: f32,
    q: f32,
    h_edge: f32,
    lane: u32,
    #[comptime] segs_log2: u32,
    #[comptime] reverse: bool,
) -> f32 {
    let segs = comptime!(1u32 << segs_log2);
    let mut p_acc = p;
    let mut q_acc = q;
    #[unroll]
    for s in 0..segs_log2 {
        let off = comptime!(1u32 << s);
        let mut src = lane;
        let mut inside = false;
        if reverse {
            if lane + off < segs {
                src = lane + off;
                inside = true;
            }
        } else if lane >= off {
            src = lane - off;
            inside = true;
        }
        let p_other = plane_shuffle(p_acc, src);
        let q_other = plane_shuffle(q_acc, src);
        if inside {
            q_acc += p_acc * q_other;
            p_acc *= p_other;
        }
    }
    let mut src = lane;
    let mut inside = false;
    if reverse {
        if lane + 1 < segs {
            src = lane + 1;
            inside = true;
        }
    } else if lane >= 1 {
        src = lane - 1;
        inside = true;
    }
    let p_next = plane_shuffle(p_acc, src);
    let q_next = plane_shuffle(q_acc, src);
    let mut h = h_edge;
    if inside {
        h = p_next * h_edge + q_next;
    }
    h
}

/// Selective scan forward with each channel's tile of the sequence split between the lanes of
/// one plane (mamba-ssm's decomposition, with its block-wide scan replaced by a plane-wide one).
///
/// Cube `x, y` = (block of `block` channels, batch row). The `2^segs_log2` units of a channel
/// are the lanes of one plane (the host launches it only where the plane size is fixed and
/// equals that count); lane `s` owns positions `s * seg_len ..` of each tile of
/// `segs * seg_len`. Per state, a lane composes its positions into one affine map
/// `h -> p h + q`; an inclusive scan of those maps over the plane (shuffles, `segs_log2`
/// steps) and the state at the tile's start give each lane the state before its first
/// position, from which it walks its positions again, adding `C h` to their outputs. The
/// decays and inputs of a lane's positions stay in registers between the two walks: one
/// exponential per position and state. The tile's B and C, shared by the cube's channels, are
/// staged in shared memory; the state at the tile's start of every (channel, state) too,
/// double-buffered by tile parity. The states at multiples of `chunk_len` (a multiple of
/// `seg_len`) are saved for the backward on request.
///
/// With `direct` (the host sets it where `u`, `delta` and `z` have a time stride of 1, as in
/// mamba-ssm's `[batch, d, len]` layout), each lane reads its own positions of `u`, `delta`
/// and `z` and writes its `y` straight from and to global memory (its positions are
/// contiguous there), and only B and C go through shared memory, double-buffered by tile
/// parity: one barrier per tile. Otherwise (a channel stride of 1, the model's layout) the
/// cube stages `[tile, block]` of each through shared memory, which transposes them.
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
#[allow(clippy::too_many_arguments)]
pub fn scan_fwd_chunk_kernel<F: Float>(
    u: &Tensor<F>,
    delta: &Tensor<F>,
    z: &Tensor<F>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    a: &Tensor<f32>,
    d_skip: &Tensor<f32>,
    delta_bias: &Tensor<f32>,
    init: &Tensor<f32>,
    y: &mut Tensor<F>,
    last: &mut Tensor<f32>,
    chunks: &mut Tensor<f32>,
    #[comptime] n_state: usize,
    #[comptime] segs_log2: u32,
    #[comptime] seg_len: usize,
    #[comptime] block: usize,
    #[comptime] chunk_len: usize,
    #[comptime] has_z: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_init: bool,
    #[comptime] softplus: bool,
    #[comptime] save: bool,
    #[comptime] direct: bool,
    #[define(F)] _dtype: StorageType,
) {
    let segs = comptime!(1usize << segs_log2);
    let tile = comptime!(segs * seg_len);
    let units = comptime!(segs * block);
    let by_state = comptime!(segs * (seg_len + 1));
    let dim = u.shape(1);
    let len = u.shape(2);
    let bi = CUBE_POS_Y as usize;
    let tid = UNIT_POS_X as usize;
    let dl = tid / segs;
    let seg = tid % segs;
    // The unit's lane in its plane (a channel's units are one plane: planes are formed from
    // consecutive unit indices, as on CUDA and the Vulkan drivers this runs on): cheaper than
    // `UNIT_POS_PLANE`, which CUDA computes with a modulo by the runtime warp size.
    let lane = seg as u32;
    let d0 = CUBE_POS_X as usize * block;
    let di = d0 + dl;
    let valid = di < dim;

    // Staged activations, B and C (in direct mode: none, and B and C as vectors,
    // double-buffered by tile parity).
    let staged = comptime!(if direct { 1 } else { tile * (block + 1) });
    let staged_bc = comptime!(if direct { 1 } else { n_state * by_state });
    let bc_vectors = comptime!(n_state * tile / 4);
    let direct_bc = comptime!(if direct { 2 * bc_vectors } else { 1 });
    let mut s_u = SharedMemory::<f32>::new(staged);
    let mut s_dt = SharedMemory::<f32>::new(staged);
    let mut s_gate = SharedMemory::<f32>::new(staged);
    let mut s_b = SharedMemory::<f32>::new(staged_bc);
    let mut s_c = SharedMemory::<f32>::new(staged_bc);
    let mut s_b4 = SharedMemory::<Vec4>::new(direct_bc);
    let mut s_c4 = SharedMemory::<Vec4>::new(direct_bc);
    let mut s_a = SharedMemory::<f32>::new(block * n_state);
    let mut s_h = SharedMemory::<f32>::new(2 * block * n_state);

    // A's row and the initial state of the channel, spread over its lanes.
    let mut d_val = 0.0f32;
    let mut bias = 0.0f32;
    if valid {
        d_val = d_skip[di * d_skip.stride(0)];
        if has_bias {
            bias = delta_bias[di * delta_bias.stride(0)];
        }
    }
    for k in 0..comptime!(n_state.div_ceil(segs)) {
        let n = seg + k * segs;
        if n < n_state {
            let mut av = 0.0f32;
            let mut hv = 0.0f32;
            if valid {
                av = a[di * a.stride(0) + n * a.stride(1)];
                if has_init {
                    hv = init[bi * init.stride(0) + di * init.stride(1) + n * init.stride(2)];
                }
            }
            s_a[dl * n_state + n] = av;
            s_h[dl * n_state + n] = hv;
        }
    }

    let per = comptime!((tile * block).div_ceil(units));
    let per_bc = comptime!((tile * n_state).div_ceil(units));
    // One register array per kind, reused: each input is staged before the next is loaded, which
    // keeps the registers of the staging few (they bound the cube's occupancy).
    let mut r_act = Array::<f32>::new(per);
    let mut r_bc = Array::<f32>::new(per_bc);
    let mut dt_l = Array::<f32>::new(seg_len);
    let mut du_l = Array::<f32>::new(seg_len);
    let mut y_l = Array::<f32>::new(seg_len);
    let mut decay = Array::<f32>::new(seg_len);
    let mut input = Array::<f32>::new(seg_len);
    let mut b_l = Array::<f32>::new(seg_len);
    let mut c_l = Array::<f32>::new(seg_len);

    // Where the lane's channel starts in each activation (direct mode, where their time
    // stride is 1).
    let at_u = bi * u.stride(0) + di * u.stride(1);
    let at_dt = bi * delta.stride(0) + di * delta.stride(1);
    let at_z = bi * z.stride(0) + di * z.stride(1);
    let at_y = bi * y.stride(0) + di * y.stride(1);

    let n_tiles = (len + tile - 1) / tile;
    for k in 0..n_tiles {
        let t0 = k * tile;
        let start = t0 + seg * seg_len;
        let bc = (k % 2) * bc_vectors;
        if direct {
            stage_state_vectors::<F>(b, &mut s_b4, bi, t0, len, bc, n_state, segs, seg_len, units);
            stage_state_vectors::<F>(c, &mut s_c4, bi, t0, len, bc, n_state, segs, seg_len, units);
            // Positions past the end get delta 0: a decay of 1 and no input, so the state
            // passes through them unchanged.
            #[unroll]
            for i in 0..seg_len {
                let t = start + i;
                let mut uv = 0.0f32;
                let mut dtv = 0.0f32;
                if valid && t < len {
                    uv = f32::cast_from(u[at_u + t]);
                    dtv = delta_at(f32::cast_from(delta[at_dt + t]), bias, softplus);
                }
                dt_l[i] = dtv;
                du_l[i] = dtv * uv;
                y_l[i] = d_val * uv;
            }
            sync_cube();
        } else {
            // Positions past the end get delta 0: a decay of 1 and no input, so the state passes
            // through them unchanged.
            stage::<F>(
                u, &mut r_act, &mut s_u, delta_bias, bi, d0, t0, dim, len, 0u32, has_bias,
                softplus, tile, block, units,
            );
            stage::<F>(
                delta, &mut r_act, &mut s_dt, delta_bias, bi, d0, t0, dim, len, 1u32, has_bias,
                softplus, tile, block, units,
            );
            if has_z {
                stage::<F>(
                    z,
                    &mut r_act,
                    &mut s_gate,
                    delta_bias,
                    bi,
                    d0,
                    t0,
                    dim,
                    len,
                    2u32,
                    has_bias,
                    softplus,
                    tile,
                    block,
                    units,
                );
            }
            stage_state_input::<F>(
                b, &mut r_bc, &mut s_b, bi, t0, len, n_state, tile, units, seg_len,
            );
            stage_state_input::<F>(
                c, &mut r_bc, &mut s_c, bi, t0, len, n_state, tile, units, seg_len,
            );
            sync_cube();

            #[unroll]
            for i in 0..seg_len {
                let slot = (seg * seg_len + i) * (block + 1) + dl;
                let dtv = s_dt[slot];
                let uv = s_u[slot];
                dt_l[i] = dtv;
                du_l[i] = dtv * uv;
                y_l[i] = d_val * uv;
            }
        }

        let cur = (k % 2) * block * n_state + dl * n_state;
        let next = ((k + 1) % 2) * block * n_state + dl * n_state;
        for n in 0..n_state {
            let an = s_a[dl * n_state + n];
            let at = n * by_state + seg * comptime!(seg_len + 1);
            if direct {
                lane_state_values(&s_b4, &mut b_l, bc, n, seg, segs, seg_len);
            }
            // The lane's positions as one map h -> p h + q.
            let mut p = 1.0f32;
            let mut q = 0.0f32;
            #[unroll]
            for i in 0..seg_len {
                let e = (dt_l[i] * an).exp();
                let v = du_l[i] * lane_value(&b_l, &s_b, at, i, direct);
                decay[i] = e;
                input[i] = v;
                q = e * q + v;
                p *= e;
            }
            let mut h = plane_scan_entering(p, q, s_h[cur + n], lane, segs_log2, false);
            if save {
                if valid && start < len && start % chunk_len == 0 {
                    chunks[bi * chunks.stride(0)
                        + di * chunks.stride(1)
                        + (start / chunk_len) * chunks.stride(2)
                        + n * chunks.stride(3)] = h;
                }
            }
            if direct {
                lane_state_values(&s_c4, &mut c_l, bc, n, seg, segs, seg_len);
            }
            #[unroll]
            for i in 0..seg_len {
                h = decay[i] * h + input[i];
                y_l[i] += h * lane_value(&c_l, &s_c, at, i, direct);
            }
            if seg == segs - 1 {
                s_h[next + n] = h;
            }
        }
        if direct {
            #[unroll]
            for i in 0..seg_len {
                let t = start + i;
                if valid && t < len {
                    let mut out = y_l[i];
                    if has_z {
                        let zv = f32::cast_from(z[at_z + t]);
                        out *= zv * sigmoid_f32(zv);
                    }
                    y[at_y + t] = F::cast_from(out);
                }
            }
        } else {
            #[unroll]
            for i in 0..seg_len {
                let slot = (seg * seg_len + i) * (block + 1) + dl;
                let mut out = y_l[i];
                if has_z {
                    out *= s_gate[slot];
                }
                s_u[slot] = out;
            }
            sync_cube();
            unstage::<F>(&s_u, y, bi, d0, t0, dim, len, tile, block, units);
            sync_cube();
        }
    }
    if direct {
        // The last tile's final states, written by each channel's last lane.
        sync_cube();
    }

    let fin = (n_tiles % 2) * block * n_state + dl * n_state;
    for k in 0..comptime!(n_state.div_ceil(segs)) {
        let n = seg + k * segs;
        if n < n_state && valid {
            last[bi * last.stride(0) + di * last.stride(1) + n * last.stride(2)] = s_h[fin + n];
        }
    }
}

/// Selective scan backward with each channel's tile split between the lanes of one plane, the
/// counterpart of [`scan_fwd_chunk_kernel`] (same cube layout; tiles walked from the last).
///
/// Per tile and state, a lane recomputes its positions' states from the tile's saved starting
/// state (`chunk_len` divides the tile) with the forward's plane scan, then composes the
/// adjoint `g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}` over its positions in reverse and
/// scans those maps over the plane in the other direction (the adjoint entering the tile's
/// end is carried from the tile after it, in shared memory). Walking its positions backwards
/// it then has every term of the gradients. `du`, `ddelta` and `dz` sum over states in
/// registers; `dA`, `D` and the delta bias sum over positions (plane sums per tile); `dB` and
/// `dC` sum over channels: the cube's channels through shared memory, written per cube
/// (`[batch, cubes, d_state, len]`, summed by the caller).
///
/// `direct` as in the forward: each lane reads its positions of `u`, `delta`, `z` and `dout`
/// and writes those of `du`, `ddelta` and `dz` in place (all with a time stride of 1), and
/// only B and C are staged.
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
#[allow(clippy::too_many_arguments)]
pub fn scan_bwd_chunk_kernel<F: Float>(
    u: &Tensor<F>,
    delta: &Tensor<F>,
    z: &Tensor<F>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    a: &Tensor<f32>,
    d_skip: &Tensor<f32>,
    delta_bias: &Tensor<f32>,
    chunks: &Tensor<f32>,
    dout: &Tensor<F>,
    du_out: &mut Tensor<F>,
    ddelta_out: &mut Tensor<F>,
    dz_out: &mut Tensor<F>,
    db_part: &mut Tensor<f32>,
    dc_part: &mut Tensor<f32>,
    da_part: &mut Tensor<f32>,
    dd_part: &mut Tensor<f32>,
    dbias_part: &mut Tensor<f32>,
    dinit: &mut Tensor<f32>,
    #[comptime] n_state: usize,
    #[comptime] segs_log2: u32,
    #[comptime] seg_len: usize,
    #[comptime] block: usize,
    #[comptime] chunk_len: usize,
    #[comptime] has_z: bool,
    #[comptime] has_bias: bool,
    #[comptime] softplus: bool,
    #[comptime] direct: bool,
    #[define(F)] _dtype: StorageType,
) {
    let segs = comptime!(1usize << segs_log2);
    let tile = comptime!(segs * seg_len);
    let units = comptime!(segs * block);
    let by_state = comptime!(segs * (seg_len + 1));
    let dim = u.shape(1);
    let len = u.shape(2);
    let bi = CUBE_POS_Y as usize;
    let cube = CUBE_POS_X as usize;
    let tid = UNIT_POS_X as usize;
    let dl = tid / segs;
    let seg = tid % segs;
    // The unit's lane in its plane (a channel's units are one plane: planes are formed from
    // consecutive unit indices, as on CUDA and the Vulkan drivers this runs on): cheaper than
    // `UNIT_POS_PLANE`, which CUDA computes with a modulo by the runtime warp size.
    let lane = seg as u32;
    let d0 = cube * block;
    let di = d0 + dl;
    let valid = di < dim;

    // Staged activations and gradients (not used in direct mode).
    let staged = comptime!(if direct { 1 } else { tile * (block + 1) });
    let mut s_u = SharedMemory::<f32>::new(staged);
    let mut s_dt = SharedMemory::<f32>::new(staged);
    let mut s_z = SharedMemory::<f32>::new(staged);
    let mut s_g = SharedMemory::<f32>::new(staged);
    // B and C: staged per lane, or in direct mode as vectors (`stage_state_vectors`).
    let staged_bc = comptime!(if direct { 1 } else { n_state * by_state });
    let direct_bc = comptime!(if direct { n_state * tile / 4 } else { 1 });
    let mut s_b = SharedMemory::<f32>::new(staged_bc);
    let mut s_c = SharedMemory::<f32>::new(staged_bc);
    let mut s_b4 = SharedMemory::<Vec4>::new(direct_bc);
    let mut s_c4 = SharedMemory::<Vec4>::new(direct_bc);
    // One state's dB and dC terms of every channel and position, double-buffered by state.
    let mut s_red = SharedMemory::<f32>::new(4 * block * tile);
    // The adjoint entering each tile's end, double-buffered by tile parity.
    let mut s_carry = SharedMemory::<f32>::new(2 * block * n_state);
    let mut s_da = SharedMemory::<f32>::new(block * n_state);

    let mut d_val = 0.0f32;
    let mut bias = 0.0f32;
    if valid {
        d_val = d_skip[di * d_skip.stride(0)];
        if has_bias {
            bias = delta_bias[di * delta_bias.stride(0)];
        }
    }
    for k in 0..comptime!(n_state.div_ceil(segs)) {
        let n = seg + k * segs;
        if n < n_state {
            s_carry[dl * n_state + n] = 0.0;
            s_da[dl * n_state + n] = 0.0;
        }
    }
    let mut dd_acc = 0.0f32;
    let mut dbias_acc = 0.0f32;

    let per = comptime!((tile * block).div_ceil(units));
    let per_bc = comptime!((tile * n_state).div_ceil(units));
    // As in the forward: one register array per kind, each input staged before the next loads.
    let mut r_act = Array::<f32>::new(per);
    let mut r_bc = Array::<f32>::new(per_bc);
    let mut dt_l = Array::<f32>::new(seg_len);
    let mut u_l = Array::<f32>::new(seg_len);
    let mut dy_l = Array::<f32>::new(seg_len);
    let mut y_l = Array::<f32>::new(seg_len);
    let mut ddt_l = Array::<f32>::new(seg_len);
    let mut du_l = Array::<f32>::new(seg_len);
    let mut decay = Array::<f32>::new(seg_len);
    let mut h_prev = Array::<f32>::new(seg_len);
    let mut b_l = Array::<f32>::new(seg_len);
    let mut c_l = Array::<f32>::new(seg_len);

    // Where the lane's channel starts in each activation and gradient (direct mode, where
    // their time stride is 1).
    let at_u = bi * u.stride(0) + di * u.stride(1);
    let at_dt = bi * delta.stride(0) + di * delta.stride(1);
    let at_z = bi * z.stride(0) + di * z.stride(1);
    let at_g = bi * dout.stride(0) + di * dout.stride(1);
    let at_du = bi * du_out.stride(0) + di * du_out.stride(1);
    let at_ddt = bi * ddelta_out.stride(0) + di * ddelta_out.stride(1);
    let at_dz = bi * dz_out.stride(0) + di * dz_out.stride(1);

    let n_tiles = (len + tile - 1) / tile;
    let mut step = 0usize;
    for kk in 0..n_tiles {
        let k = n_tiles - 1 - kk;
        let t0 = k * tile;
        if direct {
            // The previous tile's last reads of B and C came before its last barrier.
            stage_state_vectors::<F>(b, &mut s_b4, bi, t0, len, 0, n_state, segs, seg_len, units);
            stage_state_vectors::<F>(c, &mut s_c4, bi, t0, len, 0, n_state, segs, seg_len, units);
            // Positions past the end get delta 0 and no gradient: they change nothing.
            #[unroll]
            for i in 0..seg_len {
                let t = t0 + seg * seg_len + i;
                let mut uv = 0.0f32;
                let mut dtv = 0.0f32;
                let mut dy = 0.0f32;
                if valid && t < len {
                    uv = f32::cast_from(u[at_u + t]);
                    dtv = delta_at(f32::cast_from(delta[at_dt + t]), bias, softplus);
                    dy = f32::cast_from(dout[at_g + t]);
                    if has_z {
                        let zv = f32::cast_from(z[at_z + t]);
                        dy *= zv * sigmoid_f32(zv);
                    }
                }
                dt_l[i] = dtv;
                u_l[i] = uv;
                dy_l[i] = dy;
                y_l[i] = d_val * uv;
                ddt_l[i] = 0.0;
                du_l[i] = 0.0;
            }
            sync_cube();
        } else {
            // Positions past the end get delta 0 and no gradient: they change nothing.
            stage::<F>(
                u, &mut r_act, &mut s_u, delta_bias, bi, d0, t0, dim, len, 0u32, has_bias,
                softplus, tile, block, units,
            );
            stage::<F>(
                delta, &mut r_act, &mut s_dt, delta_bias, bi, d0, t0, dim, len, 1u32, has_bias,
                softplus, tile, block, units,
            );
            if has_z {
                stage::<F>(
                    z, &mut r_act, &mut s_z, delta_bias, bi, d0, t0, dim, len, 0u32, has_bias,
                    softplus, tile, block, units,
                );
            }
            stage::<F>(
                dout, &mut r_act, &mut s_g, delta_bias, bi, d0, t0, dim, len, 0u32, has_bias,
                softplus, tile, block, units,
            );
            stage_state_input::<F>(
                b, &mut r_bc, &mut s_b, bi, t0, len, n_state, tile, units, seg_len,
            );
            stage_state_input::<F>(
                c, &mut r_bc, &mut s_c, bi, t0, len, n_state, tile, units, seg_len,
            );
            sync_cube();

            #[unroll]
            for i in 0..seg_len {
                let slot = (seg * seg_len + i) * (block + 1) + dl;
                let dtv = s_dt[slot];
                let uv = s_u[slot];
                let go = s_g[slot];
                let mut dy = go;
                if has_z {
                    let zv = s_z[slot];
                    dy = go * zv * sigmoid_f32(zv);
                }
                dt_l[i] = dtv;
                u_l[i] = uv;
                dy_l[i] = dy;
                y_l[i] = d_val * uv;
                ddt_l[i] = 0.0;
                du_l[i] = 0.0;
            }
        }
        let cur = (kk % 2) * block * n_state + dl * n_state;
        let next = ((kk + 1) % 2) * block * n_state + dl * n_state;
        let start = seg * seg_len;
        for n in 0..n_state {
            let mut an = 0.0f32;
            let mut h_tile = 0.0f32;
            if valid {
                an = a[di * a.stride(0) + n * a.stride(1)];
                h_tile = chunks[bi * chunks.stride(0)
                    + di * chunks.stride(1)
                    + (t0 / chunk_len) * chunks.stride(2)
                    + n * chunks.stride(3)];
            }
            let at = n * by_state + seg * comptime!(seg_len + 1);
            if direct {
                lane_state_values(&s_b4, &mut b_l, 0, n, seg, segs, seg_len);
                lane_state_values(&s_c4, &mut c_l, 0, n, seg, segs, seg_len);
            }

            // The states: the forward's composition and plane scan.
            let mut p = 1.0f32;
            let mut q = 0.0f32;
            #[unroll]
            for i in 0..seg_len {
                let e = (dt_l[i] * an).exp();
                decay[i] = e;
                q = e * q + dt_l[i] * u_l[i] * lane_value(&b_l, &s_b, at, i, direct);
                p *= e;
            }
            let mut h = plane_scan_entering(p, q, h_tile, lane, segs_log2, false);
            // The adjoint of this lane's positions as a map of the one entering after them.
            let mut qr = 0.0f32;
            #[unroll]
            for i in 0..seg_len {
                h_prev[i] = h;
                h = decay[i] * h + dt_l[i] * u_l[i] * lane_value(&b_l, &s_b, at, i, direct);
                y_l[i] += lane_value(&c_l, &s_c, at, i, direct) * h;
            }
            #[unroll]
            for ii in 0..seg_len {
                let i = seg_len - 1 - ii;
                qr = decay[i] * (lane_value(&c_l, &s_c, at, i, direct) * dy_l[i] + qr);
            }
            // The adjoint entering after this lane's positions: the maps of the lanes after it,
            // applied to the one carried from the next tile.
            let mut g_in = plane_scan_entering(p, qr, s_carry[cur + n], lane, segs_log2, true);

            // Backwards over the positions: g = dL/dh_t.
            let red = (step % 2) * 2 * block * tile + dl * tile + start;
            let mut da = 0.0f32;
            #[unroll]
            for ii in 0..seg_len {
                let i = seg_len - 1 - ii;
                let cv = lane_value(&c_l, &s_c, at, i, direct);
                let bv = lane_value(&b_l, &s_b, at, i, direct);
                let g = cv * dy_l[i] + g_in;
                let ht = decay[i] * h_prev[i] + dt_l[i] * u_l[i] * bv;
                s_red[red + i] = g * dt_l[i] * u_l[i];
                s_red[red + block * tile + i] = dy_l[i] * ht;
                let gdh = g * decay[i] * h_prev[i];
                ddt_l[i] += gdh * an + g * bv * u_l[i];
                du_l[i] += g * dt_l[i] * bv;
                da += gdh * dt_l[i];
                g_in = decay[i] * g;
            }
            if seg == 0 {
                s_carry[next + n] = g_in;
            }
            da = plane_sum(da);
            if seg == 0 {
                s_da[dl * n_state + n] += da;
            }
            sync_cube();
            // dB, dC of this state summed over the cube's channels.
            let base = (step % 2) * 2 * block * tile;
            #[unroll]
            for r in 0..comptime!(tile.div_ceil(units)) {
                let pos = tid + r * units;
                let t = t0 + pos;
                if pos < tile && t < len {
                    let mut sb = 0.0f32;
                    let mut sc = 0.0f32;
                    #[unroll]
                    for j in 0..block {
                        sb += s_red[base + j * tile + pos];
                        sc += s_red[base + (block + j) * tile + pos];
                    }
                    let at_part = bi * db_part.stride(0)
                        + cube * db_part.stride(1)
                        + n * db_part.stride(2)
                        + t * db_part.stride(3);
                    db_part[at_part] = sb;
                    dc_part[at_part] = sc;
                }
            }
            step += 1;
        }

        let mut dd = 0.0f32;
        let mut dbias = 0.0f32;
        #[unroll]
        for i in 0..seg_len {
            let slot = (seg * seg_len + i) * (block + 1) + dl;
            let t = t0 + seg * seg_len + i;
            let dtv = dt_l[i];
            let mut ddt = ddt_l[i];
            if softplus {
                ddt *= softplus_grad_from_output(dtv);
            }
            dd += dy_l[i] * u_l[i];
            dbias += ddt;
            if direct {
                if valid && t < len {
                    if has_z {
                        // Read again rather than kept in registers through the states.
                        let zv = f32::cast_from(z[at_z + t]);
                        let go = f32::cast_from(dout[at_g + t]);
                        let sg = sigmoid_f32(zv);
                        dz_out[at_dz + t] =
                            F::cast_from(go * y_l[i] * sg * (1.0 + zv * (1.0 - sg)));
                    }
                    du_out[at_du + t] = F::cast_from(du_l[i] + d_val * dy_l[i]);
                    ddelta_out[at_ddt + t] = F::cast_from(ddt);
                }
            } else {
                if has_z {
                    let zv = s_z[slot];
                    let sg = sigmoid_f32(zv);
                    s_z[slot] = s_g[slot] * y_l[i] * sg * (1.0 + zv * (1.0 - sg));
                }
                s_u[slot] = du_l[i] + d_val * dy_l[i];
                s_dt[slot] = ddt;
            }
        }
        dd_acc += plane_sum(dd);
        dbias_acc += plane_sum(dbias);
        if !direct {
            sync_cube();
            unstage::<F>(&s_u, du_out, bi, d0, t0, dim, len, tile, block, units);
            unstage::<F>(&s_dt, ddelta_out, bi, d0, t0, dim, len, tile, block, units);
            if has_z {
                unstage::<F>(&s_z, dz_out, bi, d0, t0, dim, len, tile, block, units);
            }
            sync_cube();
        }
    }

    let fin = (n_tiles % 2) * block * n_state + dl * n_state;
    for k in 0..comptime!(n_state.div_ceil(segs)) {
        let n = seg + k * segs;
        if n < n_state && valid {
            dinit[bi * dinit.stride(0) + di * dinit.stride(1) + n * dinit.stride(2)] =
                s_carry[fin + n];
            da_part[bi * da_part.stride(0) + di * da_part.stride(1) + n * da_part.stride(2)] =
                s_da[dl * n_state + n];
        }
    }
    if seg == 0 && valid {
        dd_part[bi * dd_part.stride(0) + di * dd_part.stride(1)] = dd_acc;
        dbias_part[bi * dbias_part.stride(0) + di * dbias_part.stride(1)] = dbias_acc;
    }
}

/// `delta` at one position after `delta_bias` and the softplus, in f32.
#[cube]
fn delta_at(raw: f32, bias: f32, #[comptime] softplus: bool) -> f32 {
    let mut v = raw + bias;
    if softplus {
        v = softplus_f32(v);
    }
    v
}

/// Selective scan forward with the sequence also split between the units of a cube, for
/// `d_state <= 16` (all of a channel's states in one unit's registers).
///
/// Cube `(x, y)` = (block of `block` channels, batch row); unit `(x, y)` = (channel, segment).
/// The cube walks the sequence in tiles of `segs * seg_len` positions. In a tile, unit `s`
/// first composes its `seg_len` positions from a zero state: the product of their decays,
/// `exp(A * sum(delta))`, and the state they leave. Its starting state is then the tile's
/// starting state carried through the compositions of the segments before it, and it walks its
/// positions again from there to produce `y`. This costs two exponentials per position and
/// state instead of one, for `segs` times the parallelism of walking each channel's sequence
/// in one unit. `seg_len` is the backward's chunk length, so a unit's starting state is the
/// chunk state the backward needs.
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
#[allow(clippy::too_many_arguments)]
pub fn scan_fwd_seg_kernel<F: Float>(
    u: &Tensor<F>,
    delta: &Tensor<F>,
    z: &Tensor<F>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    a: &Tensor<f32>,
    d_skip: &Tensor<f32>,
    delta_bias: &Tensor<f32>,
    init: &Tensor<f32>,
    y: &mut Tensor<F>,
    last: &mut Tensor<f32>,
    chunks: &mut Tensor<f32>,
    #[comptime] n_state: usize,
    #[comptime] seg_len: usize,
    #[comptime] block: usize,
    #[comptime] segs: usize,
    #[comptime] has_z: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_init: bool,
    #[comptime] softplus: bool,
    #[comptime] save: bool,
    #[define(F)] _dtype: StorageType,
) {
    let dim = u.shape(1);
    let len = u.shape(2);
    let bi = CUBE_POS_Y as usize;
    let dl = UNIT_POS_X as usize;
    let seg = UNIT_POS_Y as usize;
    let di = CUBE_POS_X as usize * block + dl;
    let valid = di < dim;

    // Each unit's composition `(decay product, state from zero)`, then the tile's starting
    // state of each channel.
    let mut s_p = SharedMemory::<f32>::new(segs * block * n_state);
    let mut s_q = SharedMemory::<f32>::new(segs * block * n_state);
    let mut s_h = SharedMemory::<f32>::new(block * n_state);

    let mut h = Array::<f32>::new(n_state);
    let mut a_row = Array::<f32>::new(n_state);
    let mut d_val = 0.0f32;
    let mut bias = 0.0f32;
    #[unroll]
    for n in 0..n_state {
        a_row[n] = 0.0;
    }
    if valid {
        d_val = d_skip[di * d_skip.stride(0)];
        if has_bias {
            bias = delta_bias[di * delta_bias.stride(0)];
        }
        #[unroll]
        for n in 0..n_state {
            a_row[n] = a[di * a.stride(0) + n * a.stride(1)];
        }
    }
    if seg == 0 {
        #[unroll]
        for n in 0..n_state {
            let mut v = 0.0f32;
            if has_init {
                if valid {
                    v = init[bi * init.stride(0) + di * init.stride(1) + n * init.stride(2)];
                }
            }
            s_h[dl * n_state + n] = v;
        }
    }

    let (u0, u1) = (bi * u.stride(0) + di * u.stride(1), u.stride(2));
    let (t0_d, t1_d) = (bi * delta.stride(0) + di * delta.stride(1), delta.stride(2));
    let (b0, b1, b2) = (bi * b.stride(0), b.stride(1), b.stride(2));
    let (c0, c1, c2) = (bi * c.stride(0), c.stride(1), c.stride(2));
    let own = (seg * block + dl) * n_state;
    let tile_len = comptime!(segs * seg_len);
    let n_tiles = (len + tile_len - 1) / tile_len;
    for k in 0..n_tiles {
        let start = k * tile_len + seg * seg_len;
        let mut count = 0usize;
        if valid && start < len {
            count = len - start;
            if count > seg_len {
                count = seg_len;
            }
        }

        // Composition of the segment from a zero state.
        let mut dt_sum = 0.0f32;
        #[unroll]
        for n in 0..n_state {
            h[n] = 0.0;
        }
        for tl in 0..count {
            let t = start + tl;
            let dtv = delta_at(f32::cast_from(delta[t0_d + t * t1_d]), bias, softplus);
            let du = dtv * f32::cast_from(u[u0 + t * u1]);
            dt_sum += dtv;
            #[unroll]
            for n in 0..n_state {
                h[n] = (dtv * a_row[n]).exp() * h[n] + du * f32::cast_from(b[b0 + n * b1 + t * b2]);
            }
        }
        #[unroll]
        for n in 0..n_state {
            s_p[own + n] = (dt_sum * a_row[n]).exp();
            s_q[own + n] = h[n];
        }
        sync_cube();

        // The segment's starting state.
        #[unroll]
        for n in 0..n_state {
            h[n] = s_h[dl * n_state + n];
        }
        for prev in 0..seg {
            let at = (prev * block + dl) * n_state;
            #[unroll]
            for n in 0..n_state {
                h[n] = s_p[at + n] * h[n] + s_q[at + n];
            }
        }
        if save {
            if count > 0 {
                let chunk = k * segs + seg;
                #[unroll]
                for n in 0..n_state {
                    chunks[bi * chunks.stride(0)
                        + di * chunks.stride(1)
                        + chunk * chunks.stride(2)
                        + n * chunks.stride(3)] = h[n];
                }
            }
        }
        // Every unit has read the tile's starting state before the last segment replaces it.
        sync_cube();
        if seg == segs - 1 {
            #[unroll]
            for n in 0..n_state {
                s_h[dl * n_state + n] = s_p[own + n] * h[n] + s_q[own + n];
            }
        }

        // The segment again, from its starting state.
        for tl in 0..count {
            let t = start + tl;
            let dtv = delta_at(f32::cast_from(delta[t0_d + t * t1_d]), bias, softplus);
            let uv = f32::cast_from(u[u0 + t * u1]);
            let du = dtv * uv;
            let mut acc = 0.0f32;
            #[unroll]
            for n in 0..n_state {
                h[n] = (dtv * a_row[n]).exp() * h[n] + du * f32::cast_from(b[b0 + n * b1 + t * b2]);
                acc += h[n] * f32::cast_from(c[c0 + n * c1 + t * c2]);
            }
            let mut out = acc + d_val * uv;
            if has_z {
                let zv = f32::cast_from(z[bi * z.stride(0) + di * z.stride(1) + t * z.stride(2)]);
                out *= zv * sigmoid_f32(zv);
            }
            y[bi * y.stride(0) + di * y.stride(1) + t * y.stride(2)] = F::cast_from(out);
        }
    }
    sync_cube();
    if seg == 0 && valid {
        #[unroll]
        for n in 0..n_state {
            last[bi * last.stride(0) + di * last.stride(1) + n * last.stride(2)] =
                s_h[dl * n_state + n];
        }
    }
}

/// Selective scan backward, recomputing each tile's states from the saved tile-boundary state.
///
/// Per-channel outputs (`du`, `ddelta` w.r.t. the raw delta, `dz`) are written directly;
/// `db` and `dc` are reduced over the channels of a plane with xor shuffles and written per
/// plane (`[batch, planes, len, d_state]`, summed by the caller); `da`, `dd`, `dbias` are
/// accumulated over time in registers and written per batch row (summed by the caller).
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
#[allow(clippy::too_many_arguments)]
pub fn scan_bwd_kernel<F: Float>(
    u: &Tensor<F>,
    delta: &Tensor<F>,
    z: &Tensor<F>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    a: &Tensor<f32>,
    d_skip: &Tensor<f32>,
    delta_bias: &Tensor<f32>,
    chunks: &Tensor<f32>,
    dout: &Tensor<F>,
    du_out: &mut Tensor<F>,
    ddelta_out: &mut Tensor<F>,
    dz_out: &mut Tensor<F>,
    db_part: &mut Tensor<f32>,
    dc_part: &mut Tensor<f32>,
    da_part: &mut Tensor<f32>,
    dd_part: &mut Tensor<f32>,
    dbias_part: &mut Tensor<f32>,
    dinit: &mut Tensor<f32>,
    #[comptime] n_state: usize,
    #[comptime] split_log2: u32,
    #[comptime] tile: usize,
    #[comptime] block: usize,
    #[comptime] has_z: bool,
    #[comptime] has_bias: bool,
    #[comptime] softplus: bool,
    #[define(F)] _dtype: StorageType,
) {
    let split = comptime!(1usize << split_log2);
    let ns = comptime!(n_state / split);
    let units = comptime!(block * split);
    let dim = u.shape(1);
    let len = u.shape(2);
    let bi = CUBE_POS_Y as usize;
    let tid = UNIT_POS_X as usize;
    let dl = tid / split;
    let part = tid % split;
    let n0 = part * ns;
    let d0 = CUBE_POS_X as usize * block;
    let di = d0 + dl;
    let valid = di < dim;
    let plane_slot = (CUBE_POS_X as usize * units + tid) / PLANE_DIM as usize;
    // The units holding channel 0 of their plane write the plane's sums.
    let plane_writer = (UNIT_POS_PLANE as usize) < split;

    let mut s_u = SharedMemory::<f32>::new(tile * (block + 1));
    let mut s_dt = SharedMemory::<f32>::new(tile * (block + 1));
    let mut s_sp = SharedMemory::<f32>::new(tile * (block + 1));
    let mut s_z = SharedMemory::<f32>::new(tile * (block + 1));
    let mut s_g = SharedMemory::<f32>::new(tile * (block + 1));
    let mut s_b = SharedMemory::<f32>::new(tile * (n_state + 1));
    let mut s_c = SharedMemory::<f32>::new(tile * (n_state + 1));

    let mut a_row = Array::<f32>::new(ns);
    let mut h = Array::<f32>::new(ns);
    let mut g = Array::<f32>::new(ns);
    let mut da_acc = Array::<f32>::new(ns);
    let mut hist = Array::<f32>::new(tile * ns);
    let mut y_pre = Array::<f32>::new(tile);
    let mut d_val = 0.0f32;
    #[unroll(ns <= 64)]
    for j in 0..ns {
        a_row[j] = 0.0;
        g[j] = 0.0;
        da_acc[j] = 0.0;
    }
    if valid {
        d_val = d_skip[di * d_skip.stride(0)];
        #[unroll(ns <= 64)]
        for j in 0..ns {
            a_row[j] = a[di * a.stride(0) + (n0 + j) * a.stride(1)];
        }
    }
    let mut dd_acc = 0.0f32;
    let mut dbias_acc = 0.0f32;

    let n_tiles = (len + tile - 1) / tile;
    let per = comptime!((tile * block).div_ceil(units));
    let per_bc = comptime!((tile * n_state).div_ceil(units));
    let mut r_u = Array::<f32>::new(per);
    let mut r_dt = Array::<f32>::new(per);
    let mut r_z = Array::<f32>::new(per);
    let mut r_g = Array::<f32>::new(per);
    let mut r_b = Array::<f32>::new(per_bc);
    let mut r_c = Array::<f32>::new(per_bc);
    if n_tiles > 0 {
        let t_last = (n_tiles - 1) * tile;
        fetch::<F>(u, &mut r_u, bi, d0, t_last, dim, len, tile, block, units);
        fetch::<F>(
            delta, &mut r_dt, bi, d0, t_last, dim, len, tile, block, units,
        );
        if has_z {
            fetch::<F>(z, &mut r_z, bi, d0, t_last, dim, len, tile, block, units);
        }
        fetch::<F>(dout, &mut r_g, bi, d0, t_last, dim, len, tile, block, units);
        fetch_state_input::<F>(b, &mut r_b, bi, t_last, len, n_state, tile, units);
        fetch_state_input::<F>(c, &mut r_c, bi, t_last, len, n_state, tile, units);
    }
    for kk in 0..n_tiles {
        let k = n_tiles - 1 - kk;
        let t0 = k * tile;
        let mut count = len - t0;
        if count > tile {
            count = tile;
        }
        put::<F>(
            u, &r_u, &mut s_u, delta_bias, d0, t0, dim, len, 0u32, has_bias, softplus, tile, block,
            units,
        );
        put::<F>(
            delta, &r_dt, &mut s_dt, delta_bias, d0, t0, dim, len, 1u32, has_bias, softplus, tile,
            block, units,
        );
        if softplus {
            put::<F>(
                delta, &r_dt, &mut s_sp, delta_bias, d0, t0, dim, len, 3u32, has_bias, softplus,
                tile, block, units,
            );
        }
        if has_z {
            put::<F>(
                z, &r_z, &mut s_z, delta_bias, d0, t0, dim, len, 0u32, has_bias, softplus, tile,
                block, units,
            );
        }
        put::<F>(
            dout, &r_g, &mut s_g, delta_bias, d0, t0, dim, len, 0u32, has_bias, softplus, tile,
            block, units,
        );
        put_state_input::<F>(b, &r_b, &mut s_b, n_state, tile, units, 0usize);
        put_state_input::<F>(c, &r_c, &mut s_c, n_state, tile, units, 0usize);
        sync_cube();
        // The previous tile's loads travel while this one is computed.
        if k > 0 {
            let t1 = t0 - tile;
            fetch::<F>(u, &mut r_u, bi, d0, t1, dim, len, tile, block, units);
            fetch::<F>(delta, &mut r_dt, bi, d0, t1, dim, len, tile, block, units);
            if has_z {
                fetch::<F>(z, &mut r_z, bi, d0, t1, dim, len, tile, block, units);
            }
            fetch::<F>(dout, &mut r_g, bi, d0, t1, dim, len, tile, block, units);
            fetch_state_input::<F>(b, &mut r_b, bi, t1, len, n_state, tile, units);
            fetch_state_input::<F>(c, &mut r_c, bi, t1, len, n_state, tile, units);
        }

        // Recompute the tile's states from its first state: hist[t] = h_{t-1}.
        #[unroll(ns <= 64)]
        for j in 0..ns {
            h[j] = 0.0;
            if valid {
                h[j] = chunks[bi * chunks.stride(0)
                    + di * chunks.stride(1)
                    + k * chunks.stride(2)
                    + (n0 + j) * chunks.stride(3)];
            }
        }
        for tl in 0..count {
            let slot = tl * (block + 1) + dl;
            let uv = s_u[slot];
            let dtv = s_dt[slot];
            let du = dtv * uv;
            let mut acc = 0.0f32;
            #[unroll(ns <= 64)]
            for j in 0..ns {
                hist[tl * ns + j] = h[j];
                h[j] = (dtv * a_row[j]).exp() * h[j] + du * s_b[tl * (n_state + 1) + n0 + j];
                acc += h[j] * s_c[tl * (n_state + 1) + n0 + j];
            }
            y_pre[tl] = sum_over_split(acc, split_log2) + d_val * uv;
        }

        // Walk the tile backwards; g holds dL/dh_t.
        for i in 0..count {
            let tl = count - 1 - i;
            let slot = tl * (block + 1) + dl;
            let uv = s_u[slot];
            let dtv = s_dt[slot];
            let go = s_g[slot];
            let mut dy = go;
            let mut dz = 0.0f32;
            if has_z {
                let zv = s_z[slot];
                let sg = sigmoid_f32(zv);
                dy = go * zv * sg;
                dz = go * y_pre[tl] * sg * (1.0 + zv * (1.0 - sg));
            }
            let t = t0 + tl;
            let mut ddt = 0.0f32;
            let mut du = 0.0f32;
            #[unroll(ns <= 64)]
            for j in 0..ns {
                let n = n0 + j;
                let hp = hist[tl * ns + j];
                let bn = s_b[tl * (n_state + 1) + n];
                let decay = (dtv * a_row[j]).exp();
                let ht = decay * hp + dtv * bn * uv;
                g[j] += s_c[tl * (n_state + 1) + n] * dy;
                // Sum over the channels of the plane: units with the same `part`.
                let mut dc = dy * ht;
                let mut db = g[j] * dtv * uv;
                #[unroll]
                for k in split_log2..7u32 {
                    let mask = 1u32 << k;
                    if mask < PLANE_DIM {
                        dc += plane_shuffle_xor(dc, mask);
                        db += plane_shuffle_xor(db, mask);
                    }
                }
                if plane_writer {
                    dc_part[bi * dc_part.stride(0)
                        + plane_slot * dc_part.stride(1)
                        + t * dc_part.stride(2)
                        + n * dc_part.stride(3)] = dc;
                    db_part[bi * db_part.stride(0)
                        + plane_slot * db_part.stride(1)
                        + t * db_part.stride(2)
                        + n * db_part.stride(3)] = db;
                }
                let gdh = g[j] * decay * hp;
                ddt += gdh * a_row[j] + g[j] * bn * uv;
                du += g[j] * dtv * bn;
                da_acc[j] += gdh * dtv;
                g[j] *= decay;
            }
            ddt = sum_over_split(ddt, split_log2);
            du = sum_over_split(du, split_log2) + d_val * dy;
            dd_acc += dy * uv;
            if softplus {
                ddt *= s_sp[slot];
            }
            dbias_acc += ddt;
            if part == 0 {
                s_u[slot] = du;
                s_dt[slot] = ddt;
                s_z[slot] = dz;
            }
        }
        sync_cube();
        unstage::<F>(&s_u, du_out, bi, d0, t0, dim, len, tile, block, units);
        unstage::<F>(&s_dt, ddelta_out, bi, d0, t0, dim, len, tile, block, units);
        if has_z {
            unstage::<F>(&s_z, dz_out, bi, d0, t0, dim, len, tile, block, units);
        }
        sync_cube();
    }

    if valid {
        #[unroll(ns <= 64)]
        for j in 0..ns {
            dinit[bi * dinit.stride(0) + di * dinit.stride(1) + (n0 + j) * dinit.stride(2)] = g[j];
            da_part
                [bi * da_part.stride(0) + di * da_part.stride(1) + (n0 + j) * da_part.stride(2)] =
                da_acc[j];
        }
        if part == 0 {
            dd_part[bi * dd_part.stride(0) + di * dd_part.stride(1)] = dd_acc;
            dbias_part[bi * dbias_part.stride(0) + di * dbias_part.stride(1)] = dbias_acc;
        }
    }
}

/// One decoding step of the scan for a batch, updating `state` (`[batch, d, d_state]`) in place.
/// One unit per (batch row, channel).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn scan_step_kernel<F: Float>(
    x: &Tensor<F>,
    delta: &Tensor<F>,
    z: &Tensor<F>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    a: &Tensor<f32>,
    d_skip: &Tensor<f32>,
    delta_bias: &Tensor<f32>,
    state: &mut Tensor<f32>,
    y: &mut Tensor<F>,
    #[comptime] n_state: usize,
    #[comptime] has_z: bool,
    #[comptime] has_bias: bool,
    #[comptime] softplus: bool,
    #[define(F)] _dtype: StorageType,
) {
    let batch = x.shape(0);
    let dim = x.shape(1);
    let pos = ABSOLUTE_POS;
    if pos >= batch * dim {
        terminate!();
    }
    let bi = pos / dim;
    let di = pos % dim;
    let uv = f32::cast_from(x[bi * x.stride(0) + di * x.stride(1)]);
    let mut dtv = f32::cast_from(delta[bi * delta.stride(0) + di * delta.stride(1)]);
    if has_bias {
        dtv += delta_bias[di * delta_bias.stride(0)];
    }
    if softplus {
        dtv = softplus_f32(dtv);
    }
    let du = dtv * uv;
    let mut acc = 0.0f32;
    #[unroll(n_state <= 64)]
    for n in 0..n_state {
        let s = bi * state.stride(0) + di * state.stride(1) + n * state.stride(2);
        let decay = (dtv * a[di * a.stride(0) + n * a.stride(1)]).exp();
        let bn = f32::cast_from(b[bi * b.stride(0) + n * b.stride(1)]);
        let cn = f32::cast_from(c[bi * c.stride(0) + n * c.stride(1)]);
        let hn = decay * state[s] + du * bn;
        state[s] = hn;
        acc += hn * cn;
    }
    let mut out = acc + d_skip[di * d_skip.stride(0)] * uv;
    if has_z {
        let zv = f32::cast_from(z[bi * z.stride(0) + di * z.stride(1)]);
        out *= zv * sigmoid_f32(zv);
    }
    y[bi * y.stride(0) + di * y.stride(1)] = F::cast_from(out);
}

/// The input at padded position `p` (`0..len + width - 1`) of channel `di`: the preceding
/// inputs from `init` for `p < width - 1`, then `x`.
#[cube]
fn padded_input<F: Float>(
    x: &Tensor<F>,
    init: &Tensor<f32>,
    bi: usize,
    di: usize,
    p: usize,
    #[comptime] width: usize,
    #[comptime] has_init: bool,
) -> f32 {
    let mut v = 0.0f32;
    if p >= width - 1 {
        let t = p - (width - 1);
        v = f32::cast_from(x[bi * x.stride(0) + di * x.stride(1) + t * x.stride(2)]);
    } else if has_init {
        v = init[bi * init.stride(0) + di * init.stride(1) + p * init.stride(2)];
    }
    v
}

/// Pre-activation of the conv at time `t`: `bias + sum_k w[k] * padded[t + k]`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn conv_pre<F: Float>(
    x: &Tensor<F>,
    init: &Tensor<f32>,
    weight: &Tensor<f32>,
    bias: &Tensor<f32>,
    bi: usize,
    di: usize,
    t: usize,
    #[comptime] width: usize,
    #[comptime] has_bias: bool,
    #[comptime] has_init: bool,
) -> f32 {
    let mut acc = 0.0f32;
    if has_bias {
        acc = bias[di * bias.stride(0)];
    }
    #[unroll]
    for k in 0..width {
        acc += weight[di * weight.stride(0) + k * weight.stride(1)]
            * padded_input::<F>(x, init, bi, di, t + k, width, has_init);
    }
    acc
}

/// Causal depthwise conv1d forward, one unit per output element; the grid's x axis walks the
/// axis whose stride is 1 (`channel_fast`: channels, else time).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn conv_fwd_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<f32>,
    bias: &Tensor<f32>,
    init: &Tensor<f32>,
    y: &mut Tensor<F>,
    #[comptime] width: usize,
    #[comptime] has_bias: bool,
    #[comptime] has_init: bool,
    #[comptime] silu: bool,
    #[comptime] channel_fast: bool,
    #[define(F)] _dtype: StorageType,
) {
    let batch = x.shape(0);
    let dim = x.shape(1);
    let len = x.shape(2);
    // The grid's x axis walks the fast axis (channels when their stride is 1, else time), its y
    // and z axes the rows of the other two: one division per unit, none of the flat index.
    let fast = if comptime!(channel_fast) { dim } else { len };
    let slow = if comptime!(channel_fast) { len } else { dim };
    let fi = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let row = CUBE_POS_Y as usize + CUBE_POS_Z as usize * CUBE_COUNT_Y as usize;
    if fi >= fast || row >= batch * slow {
        terminate!();
    }
    let bi = row / slow;
    let si = row - bi * slow;
    let di = if comptime!(channel_fast) { fi } else { si };
    let t = if comptime!(channel_fast) { si } else { fi };
    let mut v = conv_pre::<F>(x, init, weight, bias, bi, di, t, width, has_bias, has_init);
    if silu {
        v *= sigmoid_f32(v);
    }
    y[bi * y.stride(0) + di * y.stride(1) + t * y.stride(2)] = F::cast_from(v);
}

/// [`conv_fwd_kernel`] where positions are adjacent in memory, `N` consecutive outputs of one
/// channel per unit: the unit loads its `N` inputs and the `N` before them (the last
/// `width - 1` of which it uses, or the initial state at the start) as two vectors, and the
/// channel's weights and bias once. The host checks `len`, the row strides and the buffers'
/// offsets are multiples of `N`, and `N >= width - 1`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn conv_fwd_vec_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    weight: &Tensor<f32>,
    bias: &Tensor<f32>,
    init: &Tensor<f32>,
    y: &mut Tensor<Vector<F, N>>,
    #[comptime] width: usize,
    #[comptime] has_bias: bool,
    #[comptime] has_init: bool,
    #[comptime] silu: bool,
    #[define(F)] _dtype: StorageType,
) {
    let n = x.vector_size();
    let dim = x.shape(1);
    let vi = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let row = CUBE_POS_Y as usize + CUBE_POS_Z as usize * CUBE_COUNT_Y as usize;
    if vi >= x.shape(2) / n || row >= x.shape(0) * dim {
        terminate!();
    }
    let bi = row / dim;
    let di = row - bi * dim;
    let xb = (bi * x.stride(0) + di * x.stride(1)) / n;
    let cur = x[xb + vi];
    // The `width - 1` inputs before this unit's first position.
    let mut before = Array::<f32>::new(comptime!(width - 1));
    if vi > 0 {
        let prev = x[xb + vi - 1];
        #[unroll]
        for j in 0..comptime!(width - 1) {
            before[j] = f32::cast_from(prev[comptime!(n - (width - 1) + j)]);
        }
    } else {
        #[unroll]
        for j in 0..comptime!(width - 1) {
            let mut v = 0.0f32;
            if has_init {
                v = init[bi * init.stride(0) + di * init.stride(1) + j * init.stride(2)];
            }
            before[j] = v;
        }
    }
    let mut w = Array::<f32>::new(width);
    #[unroll]
    for k in 0..width {
        w[k] = weight[di * weight.stride(0) + k * weight.stride(1)];
    }
    let mut b0 = 0.0f32;
    if has_bias {
        b0 = bias[di * bias.stride(0)];
    }
    let mut out = cur;
    #[unroll]
    for l in 0..n {
        let mut acc = b0;
        #[unroll]
        for k in 0..width {
            // Padded position `l + k` of the window `[before | cur]`.
            if comptime!(l + k < width - 1) {
                acc += w[k] * before[comptime!(l + k)];
            } else {
                acc += w[k] * f32::cast_from(cur[comptime!(l + k - (width - 1))]);
            }
        }
        if silu {
            acc *= sigmoid_f32(acc);
        }
        out[l] = F::cast_from(acc);
    }
    y[(bi * y.stride(0) + di * y.stride(1)) / n + vi] = out;
}

/// Causal conv1d backward w.r.t. its inputs: one unit per padded position
/// (`0..len + width - 1`); positions before `width - 1` go to `dinit`, the rest to `dx`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn conv_bwd_input_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<f32>,
    bias: &Tensor<f32>,
    init: &Tensor<f32>,
    dy: &Tensor<F>,
    dx: &mut Tensor<F>,
    dinit: &mut Tensor<f32>,
    #[comptime] width: usize,
    #[comptime] has_bias: bool,
    #[comptime] has_init: bool,
    #[comptime] silu: bool,
    #[define(F)] _dtype: StorageType,
) {
    let batch = x.shape(0);
    let dim = x.shape(1);
    let len = x.shape(2);
    let plen = len + width - 1;
    let pos = ABSOLUTE_POS;
    if pos >= batch * dim * plen {
        terminate!();
    }
    let channel_fast = x.stride(1) == 1 || x.stride(2) != 1;
    let mut di = pos % dim;
    let mut p = (pos / dim) % plen;
    if !channel_fast {
        p = pos % plen;
        di = (pos / plen) % dim;
    }
    let bi = pos / (dim * plen);
    let mut acc = 0.0f32;
    #[unroll]
    for k in 0..width {
        // Output t = p - k reads padded[p] through w[k].
        if p >= k && p - k < len {
            let t = p - k;
            let mut gt =
                f32::cast_from(dy[bi * dy.stride(0) + di * dy.stride(1) + t * dy.stride(2)]);
            if silu {
                let pre =
                    conv_pre::<F>(x, init, weight, bias, bi, di, t, width, has_bias, has_init);
                let s = sigmoid_f32(pre);
                gt *= s * (1.0 + pre * (1.0 - s));
            }
            acc += weight[di * weight.stride(0) + k * weight.stride(1)] * gt;
        }
    }
    if p >= width - 1 {
        let t = p - (width - 1);
        dx[bi * dx.stride(0) + di * dx.stride(1) + t * dx.stride(2)] = F::cast_from(acc);
    } else {
        dinit[bi * dinit.stride(0) + di * dinit.stride(1) + p * dinit.stride(2)] = acc;
    }
}

/// Causal conv1d backward w.r.t. weight and bias: one unit per (batch row, channel), summing
/// over time; writes `[batch, d, width + 1]` partials (weight grads, then the bias grad).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn conv_bwd_weight_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<f32>,
    bias: &Tensor<f32>,
    init: &Tensor<f32>,
    dy: &Tensor<F>,
    dw_part: &mut Tensor<f32>,
    #[comptime] width: usize,
    #[comptime] has_bias: bool,
    #[comptime] has_init: bool,
    #[comptime] silu: bool,
    #[define(F)] _dtype: StorageType,
) {
    let batch = x.shape(0);
    let dim = x.shape(1);
    let len = x.shape(2);
    let pos = ABSOLUTE_POS;
    if pos >= batch * dim {
        terminate!();
    }
    let bi = pos / dim;
    let di = pos % dim;
    let mut w = Array::<f32>::new(width);
    let mut window = Array::<f32>::new(width);
    let mut dw = Array::<f32>::new(width);
    #[unroll]
    for k in 0..width {
        w[k] = weight[di * weight.stride(0) + k * weight.stride(1)];
        dw[k] = 0.0;
        window[k] = 0.0;
    }
    // window[k] holds padded[t + k]; start with padded[0 .. width - 1], the preceding inputs.
    if has_init {
        #[unroll]
        for k in 0..width - 1 {
            window[k + 1] = init[bi * init.stride(0) + di * init.stride(1) + k * init.stride(2)];
        }
    }
    let mut b0 = 0.0f32;
    if has_bias {
        b0 = bias[di * bias.stride(0)];
    }
    let mut db = 0.0f32;
    for t in 0..len {
        #[unroll]
        for k in 0..width - 1 {
            window[k] = window[k + 1];
        }
        window[width - 1] =
            f32::cast_from(x[bi * x.stride(0) + di * x.stride(1) + t * x.stride(2)]);
        let mut gt = f32::cast_from(dy[bi * dy.stride(0) + di * dy.stride(1) + t * dy.stride(2)]);
        if silu {
            let mut pre = b0;
            #[unroll]
            for k in 0..width {
                pre += w[k] * window[k];
            }
            let s = sigmoid_f32(pre);
            gt *= s * (1.0 + pre * (1.0 - s));
        }
        #[unroll]
        for k in 0..width {
            dw[k] += gt * window[k];
        }
        db += gt;
    }
    #[unroll]
    for k in 0..width {
        dw_part[bi * dw_part.stride(0) + di * dw_part.stride(1) + k * dw_part.stride(2)] = dw[k];
    }
    dw_part[bi * dw_part.stride(0) + di * dw_part.stride(1) + width * dw_part.stride(2)] = db;
}

/// One decoding step of the conv: `state` (`[batch, d, width - 1]`, the preceding inputs) is
/// shifted in place to end with `x`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn conv_step_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<f32>,
    bias: &Tensor<f32>,
    state: &mut Tensor<f32>,
    y: &mut Tensor<F>,
    #[comptime] width: usize,
    #[comptime] has_bias: bool,
    #[comptime] silu: bool,
    #[define(F)] _dtype: StorageType,
) {
    let batch = x.shape(0);
    let dim = x.shape(1);
    let pos = ABSOLUTE_POS;
    if pos >= batch * dim {
        terminate!();
    }
    let bi = pos / dim;
    let di = pos % dim;
    let xv = f32::cast_from(x[bi * x.stride(0) + di * x.stride(1)]);
    let acc = conv_step_at(weight, bias, state, bi, di, xv, width, has_bias, silu);
    y[bi * y.stride(0) + di * y.stride(1)] = F::cast_from(acc);
}

/// The conv's decoding step for batch row `bi`, channel `di` and new input `xv`: returns the
/// output (with SiLU if asked) and shifts `xv` into the channel's state.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_step_at(
    weight: &Tensor<f32>,
    bias: &Tensor<f32>,
    state: &mut Tensor<f32>,
    bi: usize,
    di: usize,
    xv: f32,
    #[comptime] width: usize,
    #[comptime] has_bias: bool,
    #[comptime] silu: bool,
) -> f32 {
    let mut acc = 0.0f32;
    if has_bias {
        acc = bias[di * bias.stride(0)];
    }
    let base = bi * state.stride(0) + di * state.stride(1);
    #[unroll]
    for k in 0..width - 1 {
        let v = state[base + k * state.stride(2)];
        acc += weight[di * weight.stride(0) + k * weight.stride(1)] * v;
        if k > 0 {
            state[base + (k - 1) * state.stride(2)] = v;
        }
    }
    acc += weight[di * weight.stride(0) + (width - 1) * weight.stride(1)] * xv;
    if width > 1 {
        state[base + (width - 2) * state.stride(2)] = xv;
    }
    if silu {
        acc *= sigmoid_f32(acc);
    }
    acc
}

/// RMSNorm of one row per cube: the sum of squares is reduced in shared memory (no plane size
/// assumed), then each unit writes its strided share of `cast(x * rsqrt(mean + eps)) * weight`.
#[cube(launch_unchecked)]
pub fn rms_norm_kernel<F: Float, W: Float>(
    x: &Tensor<F>,
    weight: &Tensor<W>,
    out: &mut Tensor<W>,
    eps: f32,
    #[comptime] units: usize,
    #[define(F, W)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS_X as usize + CUBE_POS_Y as usize * CUBE_COUNT_X as usize;
    let rows = x.shape(0);
    if row >= rows {
        terminate!();
    }
    let dim = x.shape(1);
    let tid = UNIT_POS_X as usize;
    let mut partial = SharedMemory::<f32>::new(units);
    let mut acc = 0.0f32;
    let mut i = tid;
    while i < dim {
        let v = f32::cast_from(x[row * x.stride(0) + i * x.stride(1)]);
        acc += v * v;
        i += units;
    }
    partial[tid] = acc;
    sync_cube();
    #[unroll]
    for k in 0..units.trailing_zeros() {
        let half = comptime!(units >> (k + 1));
        if tid < half {
            partial[tid] += partial[tid + half];
        }
        sync_cube();
    }
    let inv = 1.0f32 / (partial[0] / f32::cast_from(dim as u32) + eps).sqrt();
    let mut i = tid;
    while i < dim {
        let v = f32::cast_from(x[row * x.stride(0) + i * x.stride(1)]);
        out[row * out.stride(0) + i * out.stride(1)] =
            W::cast_from(v * inv) * weight[i * weight.stride(0)];
        i += units;
    }
}
