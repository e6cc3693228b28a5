//! CubeCL kernels of the dropless mixture of experts for many tokens (prefill, training).
//!
//! A layer's `n * top_k` (token, slot) pairs are sorted by expert on the device, without a
//! host round trip and without a sort:
//! 1. [`route_count_kernel`]: per block of [`ROUTE_UNITS`] pairs, the count of each expert and
//!    each pair's rank among the block's pairs of its expert;
//! 2. [`route_scan_kernel`]: per expert, the exclusive scan of those counts over the blocks, then
//!    the exclusive scan of the experts' totals (the row offsets) and of their row tiles;
//! 3. [`route_place_kernel`]: each pair's row is `offsets[e] + block base + rank` (stable: the
//!    pairs of an expert keep their order), written both ways (`perm`: row -> pair, `pos`:
//!    pair -> row).
//!
//! The experts then run as grouped matmuls ([`grouped_gemm_kernel`]) over the sorted rows: the
//! grid holds enough row tiles for any routing (`pairs / TILE + experts`), each tile finds its
//! expert in `tile_offsets` and the surplus tiles exit. [`grouped_outer_kernel`] gives the weight
//! gradients (`sum over an expert's rows of p^T q`). Pairs routed to experts held elsewhere
//! (expert parallelism: this device holds `first..first + experts`) get no row.
//!
//! Accumulation is f32 whatever the dtype. Only the tensor-core kernels assume a plane size (32
//! units); the host chooses them only where planes are exactly that.

// `#[cube]` expands a subset of Rust: integer `div_ceil` is written out.
#![allow(clippy::manual_div_ceil)]

use cubecl::prelude::*;

/// Pairs per cube of the routing kernels.
pub const ROUTE_UNITS: usize = 256;
/// `pos` of a pair routed to an expert that is not held here.
pub const NO_ROW: u32 = u32::MAX;

/// Output rows and columns of a matmul tile, the reduced length staged per step, and the
/// units of a cube: 16 x 16 units, each computing 4 x 4 outputs spaced 16 apart.
pub const TILE_M: usize = 64;
pub const TILE_N: usize = 64;
const TILE_K: usize = 16;
/// Outputs per unit along each side of a tile, and in all.
const PER_UNIT: usize = 4;
const ACC: usize = PER_UNIT * PER_UNIT;
/// Units along each side of a tile.
const SIDE: usize = TILE_M / PER_UNIT;
pub const GEMM_UNITS: usize = 256;
/// Shared tiles are stored reduced-index-major with one padding column against bank conflicts.
const PAD_M: usize = TILE_M + 1;
const PAD_N: usize = TILE_N + 1;

#[cube]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The local expert of pair `p` (`experts` when it is held elsewhere).
#[cube]
fn local_expert<I: Numeric>(
    chosen: &Tensor<I>,
    p: usize,
    first: usize,
    #[comptime] experts: usize,
) -> u32 {
    let top_k = chosen.shape(1);
    let t = p / top_k;
    let j = p % top_k;
    let e =
        i64::cast_from(chosen[t * chosen.stride(0) + j * chosen.stride(1)]) - i64::cast_from(first);
    let mut out = comptime!(experts as u32).runtime();
    if e >= 0 && e < comptime!(experts as i64) {
        out = u32::cast_from(e);
    }
    out
}

/// Step 1: `block_counts[blk, e]` and `rank[p]` for the pairs of block `blk`.
#[cube(launch_unchecked)]
pub fn route_count_kernel<I: Numeric>(
    chosen: &Tensor<I>,
    block_counts: &mut Tensor<u32>,
    rank: &mut Tensor<u32>,
    first: usize,
    #[comptime] experts: usize,
    #[define(I)] _dtype: StorageType,
) {
    let pairs = chosen.shape(0) * chosen.shape(1);
    let blk = CUBE_POS_X as usize + CUBE_POS_Y as usize * CUBE_COUNT_X as usize;
    // Block 0 always runs, so that zero pairs still get (zero) counts.
    if blk > 0 && blk * ROUTE_UNITS >= pairs {
        terminate!();
    }
    let tid = UNIT_POS_X as usize;
    let p = blk * ROUTE_UNITS + tid;
    let mut ex = SharedMemory::<u32>::new(ROUTE_UNITS);
    let mut mine = comptime!(experts as u32).runtime();
    if p < pairs {
        mine = local_expert(chosen, p, first, experts);
    }
    ex[tid] = mine;
    sync_cube();
    if p < pairs {
        let mut r = 0u32;
        for q in 0..tid {
            if ex[q] == mine {
                r += 1;
            }
        }
        rank[p] = r;
    }
    let mut e = tid;
    while e < experts {
        let mut count = 0u32;
        for q in 0..ROUTE_UNITS {
            if ex[q] == u32::cast_from(e) {
                count += 1;
            }
        }
        block_counts[blk * experts + e] = count;
        e += ROUTE_UNITS;
    }
}

/// Step 2 (one cube): `block_counts` becomes each block's first row within its expert;
/// `offsets[e]` / `tile_offsets[e]` are the first row / row tile of expert `e` (one more entry
/// holds the totals).
#[cube(launch_unchecked)]
pub fn route_scan_kernel(
    block_counts: &mut Tensor<u32>,
    offsets: &mut Tensor<u32>,
    tile_offsets: &mut Tensor<u32>,
    blocks: usize,
    #[comptime] experts: usize,
) {
    let tid = UNIT_POS_X as usize;
    let mut totals = SharedMemory::<u32>::new(experts);
    let mut e = tid;
    while e < experts {
        let mut run = 0u32;
        for b in 0..blocks {
            let i = b * experts + e;
            let c = block_counts[i];
            block_counts[i] = run;
            run += c;
        }
        totals[e] = run;
        e += ROUTE_UNITS;
    }
    sync_cube();
    if tid == 0 {
        let mut rows = 0u32;
        let mut tiles = 0u32;
        for e in 0..experts {
            offsets[e] = rows;
            tile_offsets[e] = tiles;
            let c = totals[e];
            rows += c;
            tiles += (c + comptime!(TILE_M as u32) - 1) / comptime!(TILE_M as u32);
        }
        offsets[experts] = rows;
        tile_offsets[experts] = tiles;
    }
}

/// Step 3: the row of every pair (`pos`, [`NO_ROW`] when its expert is held elsewhere) and the
/// pair of every row (`perm`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn route_place_kernel<I: Numeric>(
    chosen: &Tensor<I>,
    block_base: &Tensor<u32>,
    rank: &Tensor<u32>,
    offsets: &Tensor<u32>,
    perm: &mut Tensor<u32>,
    pos: &mut Tensor<u32>,
    first: usize,
    #[comptime] experts: usize,
    #[define(I)] _dtype: StorageType,
) {
    let pairs = chosen.shape(0) * chosen.shape(1);
    let blk = CUBE_POS_X as usize + CUBE_POS_Y as usize * CUBE_COUNT_X as usize;
    let p = blk * ROUTE_UNITS + UNIT_POS_X as usize;
    if p >= pairs {
        terminate!();
    }
    let e = local_expert(chosen, p, first, experts);
    if e == comptime!(experts as u32) {
        pos[p] = NO_ROW;
    } else {
        let e = usize::cast_from(e);
        let row = offsets[e] + block_base[blk * experts + e] + rank[p];
        perm[usize::cast_from(row)] = u32::cast_from(p);
        pos[p] = row;
    }
}

/// This unit's (row, column) in a grid of `super::rows_launch`: rows on the y and z axes,
/// columns on x.
#[cube]
fn row_col() -> (usize, usize) {
    (
        CUBE_POS_Y as usize + CUBE_POS_Z as usize * CUBE_COUNT_Y as usize,
        CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize,
    )
}

/// The flat index of this unit in a 2-D grid of 1-D cubes.
#[cube]
fn flat_pos() -> usize {
    (CUBE_POS_X as usize + CUBE_POS_Y as usize * CUBE_COUNT_X as usize) * CUBE_DIM_X as usize
        + UNIT_POS_X as usize
}

/// `out[row] = x[token of perm[row]]`, times the pair's routing weight when `scaled`; `N`
/// adjacent columns per unit (rows contiguous, `hidden` and the row strides multiples of `N`:
/// the host checks).
#[cube(launch_unchecked)]
pub fn moe_gather_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    weights: &Tensor<F>,
    perm: &Tensor<u32>,
    offsets: &Tensor<u32>,
    out: &mut Tensor<Vector<F, N>>,
    #[comptime] scaled: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (row, h) = row_col();
    let n = x.vector_size();
    if h >= x.shape(1) / n || row >= usize::cast_from(offsets[offsets.shape(0) - 1]) {
        terminate!();
    }
    let top_k = weights.shape(1);
    let pair = usize::cast_from(perm[row]);
    let t = pair / top_k;
    let v = x[t * x.stride(0) / n + h];
    if scaled {
        let w = f32::cast_from(weights[t * weights.stride(0) + (pair % top_k) * weights.stride(1)]);
        let scaled = Vector::<f32, N>::cast_from(v) * Vector::<f32, N>::new(w);
        out[row * out.stride(0) / n + h] = Vector::<F, N>::cast_from(scaled);
    } else {
        out[row * out.stride(0) / n + h] = v;
    }
}

/// `out[t] = sum_j w[t, j] * y[pos[t, j]]` over the pairs with a row here (`w` = 1 unless
/// `weighted`): the inverse of the gather, `N` adjacent columns per unit (as the gather).
#[cube(launch_unchecked)]
pub fn moe_combine_kernel<F: Float, N: Size>(
    y: &Tensor<Vector<F, N>>,
    weights: &Tensor<F>,
    pos: &Tensor<u32>,
    out: &mut Tensor<Vector<F, N>>,
    #[comptime] weighted: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (t, h) = row_col();
    let n = y.vector_size();
    if h >= out.shape(1) / n || t >= out.shape(0) {
        terminate!();
    }
    let top_k = weights.shape(1);
    let mut acc = Vector::<f32, N>::new(0.0);
    for j in 0..top_k {
        let row = pos[t * top_k + j];
        if row != NO_ROW {
            let v = Vector::<f32, N>::cast_from(y[usize::cast_from(row) * y.stride(0) / n + h]);
            if weighted {
                let w = f32::cast_from(weights[t * weights.stride(0) + j * weights.stride(1)]);
                acc += v * Vector::<f32, N>::new(w);
            } else {
                acc += v;
            }
        }
    }
    out[t * out.stride(0) / n + h] = Vector::<F, N>::cast_from(acc);
}

/// `silu(g) * u` of `N` lanes in f32, cast to `F`.
#[cube]
fn swiglu_vector<F: Float, N: Size>(g: Vector<F, N>, u: Vector<F, N>) -> Vector<F, N> {
    let g = Vector::<f32, N>::cast_from(g);
    let u = Vector::<f32, N>::cast_from(u);
    let one = Vector::<f32, N>::new(1.0);
    // `0 - g`: CUDA's vector structs have no unary minus.
    let neg = Vector::<f32, N>::new(0.0) - g;
    Vector::<F, N>::cast_from(g / (one + neg.exp()) * u)
}

/// `act[r, i] = silu(gu[r, i]) * gu[r, I + i]` on the routed rows, `N` adjacent columns per
/// unit (rows contiguous, `I` and the row strides multiples of `N`: the host checks).
#[cube(launch_unchecked)]
pub fn swiglu_kernel<F: Float, N: Size>(
    gu: &Tensor<Vector<F, N>>,
    offsets: &Tensor<u32>,
    act: &mut Tensor<Vector<F, N>>,
    #[define(F)] _dtype: StorageType,
) {
    let (row, i) = row_col();
    let n = gu.vector_size();
    let inter = act.shape(1) / n;
    if i >= inter || row >= usize::cast_from(offsets[offsets.shape(0) - 1]) {
        terminate!();
    }
    let g = gu[row * gu.stride(0) / n + i];
    let u = gu[row * gu.stride(0) / n + inter + i];
    act[row * act.stride(0) / n + i] = swiglu_vector::<F, N>(g, u);
}

/// `act[r] = silu(gate[r]) * up[r]` over rows whose columns are adjacent, `N` columns per unit
/// (the dense MLP's activation). Each tensor keeps its own row stride: CUDA pads the rows of
/// the buffers it allocates (the host checks the strides and the width are multiples of `N`).
#[cube(launch_unchecked)]
pub fn swiglu_pair_kernel<F: Float, N: Size>(
    gate: &Tensor<Vector<F, N>>,
    up: &Tensor<Vector<F, N>>,
    act: &mut Tensor<Vector<F, N>>,
    #[define(F)] _dtype: StorageType,
) {
    let (row, i) = row_col();
    let n = act.vector_size();
    if i >= act.shape(1) / n || row >= act.shape(0) {
        terminate!();
    }
    let g = gate[row * gate.stride(0) / n + i];
    let u = up[row * up.stride(0) / n + i];
    act[row * act.stride(0) / n + i] = swiglu_vector::<F, N>(g, u);
}

/// Backward of [`swiglu_kernel`]: `dgu = [dact * u * silu'(g), dact * silu(g)]`.
#[cube(launch_unchecked)]
pub fn swiglu_bwd_kernel<F: Float>(
    gu: &Tensor<F>,
    dact: &Tensor<F>,
    offsets: &Tensor<u32>,
    dgu: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let (row, i) = row_col();
    let inter = dact.shape(1);
    if i >= inter || row >= usize::cast_from(offsets[offsets.shape(0) - 1]) {
        terminate!();
    }
    let g = f32::cast_from(gu[row * gu.stride(0) + i * gu.stride(1)]);
    let u = f32::cast_from(gu[row * gu.stride(0) + (inter + i) * gu.stride(1)]);
    let da = f32::cast_from(dact[row * dact.stride(0) + i * dact.stride(1)]);
    let s = sigmoid(g);
    let silu = g * s;
    let dsilu = s * (1.0 + g * (1.0 - s));
    dgu[row * dgu.stride(0) + i * dgu.stride(1)] = F::cast_from(da * u * dsilu);
    dgu[row * dgu.stride(0) + (inter + i) * dgu.stride(1)] = F::cast_from(da * silu);
}

/// `dw[t, j] = grad[t] . y[pos[t, j]]` (0 for a pair without a row here): one cube per pair,
/// reduced in shared memory.
#[cube(launch_unchecked)]
pub fn moe_pair_dot_kernel<F: Float>(
    grad: &Tensor<F>,
    y: &Tensor<F>,
    pos: &Tensor<u32>,
    dw: &mut Tensor<F>,
    #[comptime] units: usize,
    #[define(F)] _dtype: StorageType,
) {
    let pair = CUBE_POS_X as usize + CUBE_POS_Y as usize * CUBE_COUNT_X as usize;
    let top_k = dw.shape(1);
    if pair >= dw.shape(0) * top_k {
        terminate!();
    }
    let t = pair / top_k;
    let j = pair % top_k;
    let tid = UNIT_POS_X as usize;
    let row = pos[pair];
    let mut partial = SharedMemory::<f32>::new(units);
    let mut acc = 0.0f32;
    if row != NO_ROW {
        let r = usize::cast_from(row);
        let h_len = grad.shape(1);
        let mut h = tid;
        while h < h_len {
            acc += f32::cast_from(grad[t * grad.stride(0) + h * grad.stride(1)])
                * f32::cast_from(y[r * y.stride(0) + h * y.stride(1)]);
            h += units;
        }
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
    if tid == 0 {
        dw[t * dw.stride(0) + j * dw.stride(1)] = F::cast_from(partial[0]);
    }
}

/// The 4 x 4 outputs of this unit += the staged tiles' product over `TILE_K`.
#[cube]
fn tile_fma(
    a_s: &SharedMemory<f32>,
    b_s: &SharedMemory<f32>,
    acc: &mut Array<f32>,
    tx: usize,
    ty: usize,
) {
    let mut af = Array::<f32>::new(PER_UNIT);
    let mut bf = Array::<f32>::new(PER_UNIT);
    #[unroll]
    for kk in 0..TILE_K {
        #[unroll]
        for i in 0..PER_UNIT {
            af[i] = a_s[kk * PAD_M + ty + i * SIDE];
        }
        #[unroll]
        for j in 0..PER_UNIT {
            bf[j] = b_s[kk * PAD_N + tx + j * SIDE];
        }
        #[unroll]
        for i in 0..PER_UNIT {
            #[unroll]
            for j in 0..PER_UNIT {
                acc[i * PER_UNIT + j] += af[i] * bf[j];
            }
        }
    }
}

/// Grouped matmul over the sorted rows: `c[r, n] = sum_k a[r, k] * b[e(r), n, k]`, where `e(r)`
/// is the expert that owns row `r`. `b` is read through its strides (a transposed view gives
/// `a @ b_e`); `b_k_contiguous` says which index the loads should walk along.
/// Cube `(x, y + z * count_y)`: (column tile, row tile of the grouped rows).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm_kernel<F: Float>(
    a: &Tensor<F>,
    b: &Tensor<F>,
    offsets: &Tensor<u32>,
    tile_offsets: &Tensor<u32>,
    c: &mut Tensor<F>,
    #[comptime] experts: usize,
    #[comptime] b_k_contiguous: bool,
    #[define(F)] _dtype: StorageType,
) {
    let tile = CUBE_POS_Y as usize + CUBE_POS_Z as usize * CUBE_COUNT_Y as usize;
    if tile >= usize::cast_from(tile_offsets[experts]) {
        terminate!();
    }
    // The expert of this tile: the number of experts whose tiles end at or before it.
    let mut e = 0usize;
    for x in 0..experts {
        if usize::cast_from(tile_offsets[x + 1]) <= tile {
            e = x + 1;
        }
    }
    let row0 = usize::cast_from(offsets[e]) + (tile - usize::cast_from(tile_offsets[e])) * TILE_M;
    let row_end = usize::cast_from(offsets[e + 1]);
    let n0 = CUBE_POS_X as usize * TILE_N;
    let k_len = a.shape(1);
    let n_len = c.shape(1);
    let tid = UNIT_POS_X as usize;
    let tx = tid % SIDE;
    let ty = tid / SIDE;
    let mut a_s = SharedMemory::<f32>::new(comptime!(TILE_K * PAD_M));
    let mut b_s = SharedMemory::<f32>::new(comptime!(TILE_K * PAD_N));
    let mut acc = Array::<f32>::new(ACC);
    #[unroll]
    for i in 0..ACC {
        acc[i] = 0.0;
    }
    let b_base = e * b.stride(0);
    let mut k0 = 0usize;
    while k0 < k_len {
        #[unroll]
        for u in 0..comptime!(TILE_M * TILE_K / GEMM_UNITS) {
            let li = tid + u * GEMM_UNITS;
            let m = li / TILE_K;
            let kk = li % TILE_K;
            let row = row0 + m;
            let k = k0 + kk;
            let mut v = 0.0f32;
            if row < row_end && k < k_len {
                v = f32::cast_from(a[row * a.stride(0) + k * a.stride(1)]);
            }
            a_s[kk * PAD_M + m] = v;
        }
        #[unroll]
        for u in 0..comptime!(TILE_N * TILE_K / GEMM_UNITS) {
            let li = tid + u * GEMM_UNITS;
            let mut n = li % TILE_N;
            let mut kk = li / TILE_N;
            if b_k_contiguous {
                n = li / TILE_K;
                kk = li % TILE_K;
            }
            let col = n0 + n;
            let k = k0 + kk;
            let mut v = 0.0f32;
            if col < n_len && k < k_len {
                v = f32::cast_from(b[b_base + col * b.stride(1) + k * b.stride(2)]);
            }
            b_s[kk * PAD_N + n] = v;
        }
        sync_cube();
        tile_fma(&a_s, &b_s, &mut acc, tx, ty);
        sync_cube();
        k0 += TILE_K;
    }
    #[unroll]
    for i in 0..PER_UNIT {
        let row = row0 + ty + i * SIDE;
        if row < row_end {
            #[unroll]
            for j in 0..PER_UNIT {
                let col = n0 + tx + j * SIDE;
                if col < n_len {
                    c[row * c.stride(0) + col * c.stride(1)] = F::cast_from(acc[i * PER_UNIT + j]);
                }
            }
        }
    }
}

/// Per-expert sums of outer products over the sorted rows (weight gradients):
/// `out[e, i, j] = sum over the rows r of expert e of p[r, i] * q[r, j]`.
/// Cube `(x + y * count_x, z)`: (tile of `(i, j)`, expert).
#[cube(launch_unchecked)]
pub fn grouped_outer_kernel<F: Float>(
    p: &Tensor<F>,
    q: &Tensor<F>,
    offsets: &Tensor<u32>,
    out: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let e = CUBE_POS_Z as usize;
    let i_len = out.shape(1);
    let j_len = out.shape(2);
    let tiles_j = (j_len + TILE_N - 1) / TILE_N;
    let tile = CUBE_POS_X as usize + CUBE_POS_Y as usize * CUBE_COUNT_X as usize;
    let i0 = (tile / tiles_j) * TILE_M;
    if i0 >= i_len {
        terminate!();
    }
    let j0 = (tile % tiles_j) * TILE_N;
    let row_start = usize::cast_from(offsets[e]);
    let row_end = usize::cast_from(offsets[e + 1]);
    let tid = UNIT_POS_X as usize;
    let tx = tid % SIDE;
    let ty = tid / SIDE;
    let mut a_s = SharedMemory::<f32>::new(comptime!(TILE_K * PAD_M));
    let mut b_s = SharedMemory::<f32>::new(comptime!(TILE_K * PAD_N));
    let mut acc = Array::<f32>::new(ACC);
    #[unroll]
    for k in 0..ACC {
        acc[k] = 0.0;
    }
    let mut r0 = row_start;
    while r0 < row_end {
        #[unroll]
        for u in 0..comptime!(TILE_M * TILE_K / GEMM_UNITS) {
            let li = tid + u * GEMM_UNITS;
            let m = li % TILE_M;
            let kk = li / TILE_M;
            let row = r0 + kk;
            let col = i0 + m;
            let mut v = 0.0f32;
            if row < row_end && col < i_len {
                v = f32::cast_from(p[row * p.stride(0) + col * p.stride(1)]);
            }
            a_s[kk * PAD_M + m] = v;
        }
        #[unroll]
        for u in 0..comptime!(TILE_N * TILE_K / GEMM_UNITS) {
            let li = tid + u * GEMM_UNITS;
            let n = li % TILE_N;
            let kk = li / TILE_N;
            let row = r0 + kk;
            let col = j0 + n;
            let mut v = 0.0f32;
            if row < row_end && col < j_len {
                v = f32::cast_from(q[row * q.stride(0) + col * q.stride(1)]);
            }
            b_s[kk * PAD_N + n] = v;
        }
        sync_cube();
        tile_fma(&a_s, &b_s, &mut acc, tx, ty);
        sync_cube();
        r0 += TILE_K;
    }
    #[unroll]
    for a in 0..PER_UNIT {
        let i = i0 + ty + a * SIDE;
        if i < i_len {
            #[unroll]
            for b in 0..PER_UNIT {
                let j = j0 + tx + b * SIDE;
                if j < j_len {
                    out[e * out.stride(0) + i * out.stride(1) + j * out.stride(2)] =
                        F::cast_from(acc[a * PER_UNIT + b]);
                }
            }
        }
    }
}

// Tensor-core (cmma) versions of the two matmuls, for f16/bf16 inputs on runtimes with 16 x 16
// x 16 cooperative matrices and 32-unit planes (CUDA). A cube of four planes computes a 64 x 64
// tile; each plane a 32 x 32 quarter as 2 x 2 fragments, with f32 accumulators. The staged
// tiles are stored row-major in the reduced index (`MMA_LD` apart, a multiple of 8 elements as
// the fragment loads require): A as `[m][k]`, B as `[n][k]` (a column-major `K x N`).

/// Output tile side of the cmma kernels.
pub const MMA_TILE: usize = 64;
/// Reduced length staged per step.
const MMA_K: usize = 32;
const MMA_LD: usize = MMA_K + 8;
/// Units per plane the cmma kernels are written for, and planes per cube.
pub const MMA_PLANE: usize = 32;
pub const MMA_PLANES: usize = 4;
const MMA_UNITS: usize = MMA_PLANE * MMA_PLANES;

/// One staged step: the plane's four accumulators += its rows of `a_s` times its columns of `b_s`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn mma_step<F: Float>(
    a_s: &SharedMemory<F>,
    b_s: &SharedMemory<F>,
    c00: &mut cmma::Matrix<f32>,
    c01: &mut cmma::Matrix<f32>,
    c10: &mut cmma::Matrix<f32>,
    c11: &mut cmma::Matrix<f32>,
    wm: usize,
    wn: usize,
) {
    let end = comptime!(MMA_TILE * MMA_LD);
    let ld = comptime!(MMA_LD as u32);
    #[unroll]
    for kk in 0..comptime!(MMA_K / 16) {
        let k = kk * 16;
        let a0 = cmma::Matrix::<F>::from_slice(
            cmma::MatrixIdent::A,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::RowMajor,
            &a_s.slice(wm * MMA_LD + k, end),
            ld,
        );
        let a1 = cmma::Matrix::<F>::from_slice(
            cmma::MatrixIdent::A,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::RowMajor,
            &a_s.slice((wm + 16) * MMA_LD + k, end),
            ld,
        );
        let b0 = cmma::Matrix::<F>::from_slice(
            cmma::MatrixIdent::B,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::ColMajor,
            &b_s.slice(wn * MMA_LD + k, end),
            ld,
        );
        let b1 = cmma::Matrix::<F>::from_slice(
            cmma::MatrixIdent::B,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::ColMajor,
            &b_s.slice((wn + 16) * MMA_LD + k, end),
            ld,
        );
        cmma::execute::<F, F, f32, f32>(&a0, &b0, c00, c00);
        cmma::execute::<F, F, f32, f32>(&a0, &b1, c01, c01);
        cmma::execute::<F, F, f32, f32>(&a1, &b0, c10, c10);
        cmma::execute::<F, F, f32, f32>(&a1, &b1, c11, c11);
    }
}

/// The accumulators through shared memory: `c_s` `[64][64]` f32 row-major.
#[cube]
#[allow(clippy::too_many_arguments)]
fn mma_store(
    c_s: &mut SharedMemory<f32>,
    c00: &cmma::Matrix<f32>,
    c01: &cmma::Matrix<f32>,
    c10: &cmma::Matrix<f32>,
    c11: &cmma::Matrix<f32>,
    wm: usize,
    wn: usize,
) {
    let end = comptime!(MMA_TILE * MMA_TILE);
    let ld = comptime!(MMA_TILE as u32);
    cmma::store(
        &mut c_s.slice_mut(wm * MMA_TILE + wn, end),
        c00,
        ld,
        cmma::MatrixLayout::RowMajor,
    );
    cmma::store(
        &mut c_s.slice_mut(wm * MMA_TILE + wn + 16, end),
        c01,
        ld,
        cmma::MatrixLayout::RowMajor,
    );
    cmma::store(
        &mut c_s.slice_mut((wm + 16) * MMA_TILE + wn, end),
        c10,
        ld,
        cmma::MatrixLayout::RowMajor,
    );
    cmma::store(
        &mut c_s.slice_mut((wm + 16) * MMA_TILE + wn + 16, end),
        c11,
        ld,
        cmma::MatrixLayout::RowMajor,
    );
}

/// A 16 x 16 f32 accumulator fragment of zeros.
#[cube]
pub(crate) fn zero_acc() -> cmma::Matrix<f32> {
    cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::Undefined,
        0.0,
    )
}

/// [`grouped_gemm_kernel`] on tensor cores. Cube `(x, y + z * count_y)`, units `(32, 4)`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm_mma_kernel<F: Float>(
    a: &Tensor<F>,
    b: &Tensor<F>,
    offsets: &Tensor<u32>,
    tile_offsets: &Tensor<u32>,
    c: &mut Tensor<F>,
    #[comptime] experts: usize,
    #[comptime] b_k_contiguous: bool,
    #[define(F)] _dtype: StorageType,
) {
    let tile = CUBE_POS_Y as usize + CUBE_POS_Z as usize * CUBE_COUNT_Y as usize;
    if tile >= usize::cast_from(tile_offsets[experts]) {
        terminate!();
    }
    let mut e = 0usize;
    for x in 0..experts {
        if usize::cast_from(tile_offsets[x + 1]) <= tile {
            e = x + 1;
        }
    }
    let row0 = usize::cast_from(offsets[e]) + (tile - usize::cast_from(tile_offsets[e])) * MMA_TILE;
    let row_end = usize::cast_from(offsets[e + 1]);
    let n0 = CUBE_POS_X as usize * MMA_TILE;
    let k_len = a.shape(1);
    let n_len = c.shape(1);
    let plane = UNIT_POS_Y as usize;
    let tid = plane * MMA_PLANE + UNIT_POS_X as usize;
    let wm = (plane / 2) * 32;
    let wn = (plane % 2) * 32;
    let mut a_s = SharedMemory::<F>::new(comptime!(MMA_TILE * MMA_LD));
    let mut b_s = SharedMemory::<F>::new(comptime!(MMA_TILE * MMA_LD));
    let mut c_s = SharedMemory::<f32>::new(comptime!(MMA_TILE * MMA_TILE));
    let mut c00 = zero_acc();
    let mut c01 = zero_acc();
    let mut c10 = zero_acc();
    let mut c11 = zero_acc();
    let b_base = e * b.stride(0);
    let mut k0 = 0usize;
    while k0 < k_len {
        #[unroll]
        for u in 0..comptime!(MMA_TILE * MMA_K / MMA_UNITS) {
            let li = tid + u * MMA_UNITS;
            let m = li / MMA_K;
            let kk = li % MMA_K;
            let row = row0 + m;
            let k = k0 + kk;
            let mut v = F::from_int(0);
            if row < row_end && k < k_len {
                v = a[row * a.stride(0) + k * a.stride(1)];
            }
            a_s[m * MMA_LD + kk] = v;
        }
        #[unroll]
        for u in 0..comptime!(MMA_TILE * MMA_K / MMA_UNITS) {
            let li = tid + u * MMA_UNITS;
            let mut n = li % MMA_TILE;
            let mut kk = li / MMA_TILE;
            if b_k_contiguous {
                n = li / MMA_K;
                kk = li % MMA_K;
            }
            let col = n0 + n;
            let k = k0 + kk;
            let mut v = F::from_int(0);
            if col < n_len && k < k_len {
                v = b[b_base + col * b.stride(1) + k * b.stride(2)];
            }
            b_s[n * MMA_LD + kk] = v;
        }
        sync_cube();
        mma_step::<F>(&a_s, &b_s, &mut c00, &mut c01, &mut c10, &mut c11, wm, wn);
        sync_cube();
        k0 += MMA_K;
    }
    mma_store(&mut c_s, &c00, &c01, &c10, &c11, wm, wn);
    sync_cube();
    #[unroll]
    for u in 0..comptime!(MMA_TILE * MMA_TILE / MMA_UNITS) {
        let li = tid + u * MMA_UNITS;
        let m = li / MMA_TILE;
        let n = li % MMA_TILE;
        let row = row0 + m;
        let col = n0 + n;
        if row < row_end && col < n_len {
            c[row * c.stride(0) + col * c.stride(1)] = F::cast_from(c_s[li]);
        }
    }
}

/// [`grouped_outer_kernel`] on tensor cores. Cube `(x + y * count_x, z)`, units `(32, 4)`.
#[cube(launch_unchecked)]
pub fn grouped_outer_mma_kernel<F: Float>(
    p: &Tensor<F>,
    q: &Tensor<F>,
    offsets: &Tensor<u32>,
    out: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let e = CUBE_POS_Z as usize;
    let i_len = out.shape(1);
    let j_len = out.shape(2);
    let tiles_j = (j_len + MMA_TILE - 1) / MMA_TILE;
    let tile = CUBE_POS_X as usize + CUBE_POS_Y as usize * CUBE_COUNT_X as usize;
    let i0 = (tile / tiles_j) * MMA_TILE;
    if i0 >= i_len {
        terminate!();
    }
    let j0 = (tile % tiles_j) * MMA_TILE;
    let row_start = usize::cast_from(offsets[e]);
    let row_end = usize::cast_from(offsets[e + 1]);
    let plane = UNIT_POS_Y as usize;
    let tid = plane * MMA_PLANE + UNIT_POS_X as usize;
    let wm = (plane / 2) * 32;
    let wn = (plane % 2) * 32;
    let mut a_s = SharedMemory::<F>::new(comptime!(MMA_TILE * MMA_LD));
    let mut b_s = SharedMemory::<F>::new(comptime!(MMA_TILE * MMA_LD));
    let mut c_s = SharedMemory::<f32>::new(comptime!(MMA_TILE * MMA_TILE));
    let mut c00 = zero_acc();
    let mut c01 = zero_acc();
    let mut c10 = zero_acc();
    let mut c11 = zero_acc();
    let mut r0 = row_start;
    while r0 < row_end {
        #[unroll]
        for u in 0..comptime!(MMA_TILE * MMA_K / MMA_UNITS) {
            let li = tid + u * MMA_UNITS;
            let m = li % MMA_TILE;
            let kk = li / MMA_TILE;
            let row = r0 + kk;
            let mut va = F::from_int(0);
            if row < row_end && i0 + m < i_len {
                va = p[row * p.stride(0) + (i0 + m) * p.stride(1)];
            }
            a_s[m * MMA_LD + kk] = va;
            let mut vb = F::from_int(0);
            if row < row_end && j0 + m < j_len {
                vb = q[row * q.stride(0) + (j0 + m) * q.stride(1)];
            }
            b_s[m * MMA_LD + kk] = vb;
        }
        sync_cube();
        mma_step::<F>(&a_s, &b_s, &mut c00, &mut c01, &mut c10, &mut c11, wm, wn);
        sync_cube();
        r0 += MMA_K;
    }
    mma_store(&mut c_s, &c00, &c01, &c10, &c11, wm, wn);
    sync_cube();
    #[unroll]
    for u in 0..comptime!(MMA_TILE * MMA_TILE / MMA_UNITS) {
        let li = tid + u * MMA_UNITS;
        let m = li / MMA_TILE;
        let n = li % MMA_TILE;
        if i0 + m < i_len && j0 + n < j_len {
            out[e * out.stride(0) + (i0 + m) * out.stride(1) + (j0 + n) * out.stride(2)] =
                F::cast_from(c_s[li]);
        }
    }
}

/// The router: per token (one unit each), the softmax of `logits[t]` over the experts in f32 and
/// its `top_k` largest probabilities with their expert indices, largest first (the lower index
/// first among equal logits; the reference's order of ties is its sort's). Not renormalised
/// (Jamba's routing).
#[cube(launch_unchecked)]
pub fn route_topk_kernel<I: Numeric>(
    logits: &Tensor<f32>,
    weights: &mut Tensor<f32>,
    chosen: &mut Tensor<I>,
    #[define(I)] _dtype: StorageType,
) {
    let t = flat_pos();
    if t >= logits.shape(0) {
        terminate!();
    }
    softmax_top_k(logits, t, weights, chosen);
}

/// [`route_topk_kernel`]'s work for token `t`.
#[cube]
pub(crate) fn softmax_top_k<I: Numeric>(
    logits: &Tensor<f32>,
    t: usize,
    weights: &mut Tensor<f32>,
    chosen: &mut Tensor<I>,
) {
    let experts = logits.shape(1);
    let top_k = weights.shape(1);
    let row = t * logits.stride(0);
    let mut max = f32::new(-3.0e38);
    for e in 0..experts {
        max = f32::max(max, logits[row + e * logits.stride(1)]);
    }
    let mut sum = 0.0f32;
    for e in 0..experts {
        sum += (logits[row + e * logits.stride(1)] - max).exp();
    }
    // The j-th choice: the largest logit below the previous choice (or equal to it at a higher
    // index), so that no expert is taken twice.
    let mut prev_val = 0.0f32;
    let mut prev_idx = 0usize;
    for j in 0..top_k {
        let mut best_val = f32::new(-3.0e38);
        let mut best_idx = 0usize;
        let mut found = false;
        for e in 0..experts {
            let v = logits[row + e * logits.stride(1)];
            let after_prev = j == 0 || v < prev_val || (v == prev_val && e > prev_idx);
            if after_prev && (!found || v > best_val) {
                best_val = v;
                best_idx = e;
                found = true;
            }
        }
        weights[t * weights.stride(0) + j * weights.stride(1)] = (best_val - max).exp() / sum;
        chosen[t * chosen.stride(0) + j * chosen.stride(1)] = I::cast_from(best_idx);
        prev_val = best_val;
        prev_idx = best_idx;
    }
}
