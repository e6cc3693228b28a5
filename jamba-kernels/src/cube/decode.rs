//! Kernels of decoding: products with a few rows, where every weight is read once for all rows
//! (memory-bound), and the small fused operations around them that would otherwise each cost a
//! launch per layer and step.
//!
//! The products give each output column to `split` planes of a cube: the units of a plane read
//! consecutive vectors of the column's weight row (16 bytes each where the layout allows it,
//! [`vector_width`]), keep [`UNROLL`] of them in flight, and reduce with `plane_sum`; with
//! `split > 1` the planes of a column add their sums in shared memory. Nothing assumes a plane
//! size: the plane index and lane come from the runtime's `PLANE_DIM`.

// `#[cube]` expands a subset of Rust: nested comptime/runtime `if`s stay apart, and integer
// `div_ceil` and `is_multiple_of` are written out.
#![allow(
    clippy::collapsible_if,
    clippy::manual_div_ceil,
    clippy::manual_is_multiple_of
)]

use burn::tensor::{DType, Tensor as BTensor};
use burn_cubecl::{
    cubecl::prelude::{CubeCount, CubeDim},
    tensor::CubeTensor,
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement,
};
use cubecl::prelude::*;

use super::kernels::{conv_step_at, sigmoid_f32, softplus_f32};
use super::moe_kernels::softmax_top_k;
use super::{dummy_of, kept_dummy, kept_dummy_int, prim};

/// Vectors a unit loads before it uses them (independent loads in flight per unit).
const UNROLL: usize = 4;

/// Units per cube of the products.
pub(crate) const GEMV_UNITS: usize = 128;

#[cube]
fn silu_f32(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `sum(a * b)` over the lanes of two vectors, in f32.
#[cube]
fn dot<A: Float, W: Float, N: Size>(a: Vector<A, N>, b: Vector<W, N>) -> f32 {
    let p = Vector::<f32, N>::cast_from(a) * Vector::<f32, N>::cast_from(b);
    let mut s = 0.0f32;
    #[unroll]
    for e in 0..N::value() {
        s += p[e];
    }
    s
}

/// The output column of this unit's plane in cube `cube`: a cube holds `units / PLANE_DIM /
/// split` columns of `split` consecutive planes each.
#[cube]
fn column_of(cube: usize, #[comptime] units: usize, #[comptime] split: usize) -> usize {
    let plane_idx = (UNIT_POS_X / PLANE_DIM) as usize;
    let cols = units / PLANE_DIM as usize / split;
    cube * cols + plane_idx / split
}

/// The cube's index in a grid of cubes along x and y.
#[cube]
fn flat_cube() -> usize {
    CUBE_POS_X as usize + CUBE_POS_Y as usize * CUBE_COUNT_X as usize
}

/// This unit's part of its column's row (`0..split`).
#[cube]
fn part_of(#[comptime] split: usize) -> u32 {
    (UNIT_POS_X / PLANE_DIM) % split as u32
}

/// `acc[m] += x[m] . w[w_base..]` over this unit's share of the `kv` vectors of a row: vector
/// `j` of row `m` of `x` is `x[m * x_row + j * x_step]`, of `w` `w[w_base + j * w_step]`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn dot_rows<A: Float, W: Float, N: Size>(
    x: &Tensor<Vector<A, N>>,
    x_base: usize,
    x_row: usize,
    x_step: usize,
    w: &Tensor<Vector<W, N>>,
    w_base: usize,
    w_step: usize,
    first: usize,
    step: usize,
    kv: usize,
    acc: &mut Array<f32>,
    #[comptime] rows: usize,
) {
    let mut j = first;
    let mut wv = Array::<Vector<W, N>>::new(UNROLL);
    while j + (UNROLL - 1) * step < kv {
        #[unroll]
        for u in 0..UNROLL {
            wv[u] = w[w_base + (j + u * step) * w_step];
        }
        #[unroll]
        for u in 0..UNROLL {
            #[unroll]
            for m in 0..rows {
                acc[m] += dot(x[x_base + m * x_row + (j + u * step) * x_step], wv[u]);
            }
        }
        j += UNROLL * step;
    }
    while j < kv {
        let v = w[w_base + j * w_step];
        #[unroll]
        for m in 0..rows {
            acc[m] += dot(x[x_base + m * x_row + j * x_step], v);
        }
        j += step;
    }
}

/// Sums `acc[m]` over the plane, then over the `split` planes of a column (shared memory, one
/// `sync_cube`); afterwards lane 0 of the column's first plane holds the totals.
#[cube]
fn reduce_column(
    acc: &mut Array<f32>,
    part: u32,
    lane: u32,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] split: usize,
) {
    #[unroll]
    for m in 0..rows {
        acc[m] = plane_sum(acc[m]);
    }
    if comptime!(split > 1) {
        let mut partial = SharedMemory::<f32>::new(units * rows);
        let plane_idx = (UNIT_POS_X / PLANE_DIM) as usize;
        if lane == 0 {
            #[unroll]
            for m in 0..rows {
                partial[plane_idx * rows + m] = acc[m];
            }
        }
        sync_cube();
        if lane == 0 && part == 0 {
            #[unroll]
            for m in 0..rows {
                let mut s = 0.0f32;
                #[unroll]
                for p in 0..split {
                    s += partial[(plane_idx + p) * rows + m];
                }
                acc[m] = s;
            }
        }
    }
}

/// `acc[m] = x[m] . w[n]` for the column `n` of this unit's plane (nothing past the last
/// column), summed over the column's planes: afterwards lane 0 of its first plane holds the
/// totals (the decoding products' common part).
#[cube]
#[allow(clippy::too_many_arguments)]
fn gemv_column<A: Float, W: Float, N: Size>(
    x: &Tensor<Vector<A, N>>,
    w: &Tensor<Vector<W, N>>,
    n: usize,
    part: u32,
    lane: u32,
    acc: &mut Array<f32>,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] split: usize,
) {
    let vs = x.vector_size();
    let kv = x.shape(1) / vs;
    #[unroll]
    for m in 0..rows {
        acc[m] = 0.0;
    }
    if n < w.shape(0) {
        let plane = PLANE_DIM as usize;
        dot_rows(
            x,
            0,
            x.stride(0) / vs,
            x.stride(1),
            w,
            n * w.stride(0) / vs,
            w.stride(1),
            part as usize * plane + lane as usize,
            plane * split,
            kv,
            acc,
            rows,
        );
    }
    reduce_column(acc, part, lane, rows, units, split);
}

/// `out[m, n] = bias[n] + sum_k x[m, k] * w[n, k]` for few rows `m` (decoding): each column is
/// a dot product along a row of `w`, read once for all rows of `x`. `x`, `w` and `out` may each
/// have their own dtype (the router's f32 logits from bf16 activations and weights).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn gemv_kernel<A: Float, W: Float, O: Float, N: Size>(
    x: &Tensor<Vector<A, N>>,
    w: &Tensor<Vector<W, N>>,
    bias: &Tensor<O>,
    out: &mut Tensor<O>,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] split: usize,
    #[comptime] has_bias: bool,
    #[define(A, W, O)] _dtypes: [StorageType; 3],
) {
    let n = column_of(flat_cube(), units, split);
    let part = part_of(split);
    let lane = UNIT_POS_X % PLANE_DIM;
    let n_len = w.shape(0);
    let mut acc = Array::<f32>::new(rows);
    gemv_column(x, w, n, part, lane, &mut acc, rows, units, split);
    if lane == 0 && part == 0 && n < n_len {
        #[unroll]
        for m in 0..rows {
            let mut v = acc[m];
            if has_bias {
                v += f32::cast_from(bias[n * bias.stride(0)]);
            }
            out[m * out.stride(0) + n * out.stride(1)] = O::cast_from(v);
        }
    }
}

/// Mamba's `in_proj` for few rows with the conv's decoding step as its epilogue
/// ([`crate::MambaInProjStep`]): the product of [`gemv_kernel`] (`out` `[rows, 2 d_inner]`),
/// whose columns below `d_inner` (conv channels) go through the conv step and SiLU before they
/// are written; each channel's state is read and shifted by the unit that writes its column.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn in_proj_conv_kernel<A: Float, W: Float, O: Float, N: Size>(
    x: &Tensor<Vector<A, N>>,
    w: &Tensor<Vector<W, N>>,
    bias: &Tensor<O>,
    conv_weight: &Tensor<f32>,
    conv_bias: &Tensor<f32>,
    conv_state: &mut Tensor<f32>,
    out: &mut Tensor<O>,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] split: usize,
    #[comptime] has_bias: bool,
    #[comptime] width: usize,
    #[comptime] has_conv_bias: bool,
    #[define(A, W, O)] _dtypes: [StorageType; 3],
) {
    let n = column_of(flat_cube(), units, split);
    let part = part_of(split);
    let lane = UNIT_POS_X % PLANE_DIM;
    let n_len = w.shape(0);
    let d_inner = conv_weight.shape(0);
    let mut acc = Array::<f32>::new(rows);
    gemv_column(x, w, n, part, lane, &mut acc, rows, units, split);
    if lane == 0 && part == 0 && n < n_len {
        #[unroll]
        for m in 0..rows {
            let mut v = acc[m];
            if has_bias {
                v += f32::cast_from(bias[n * bias.stride(0)]);
            }
            // in_proj's output in its dtype, as the separate conv step reads it.
            let xz = O::cast_from(v);
            let mut y = xz;
            if n < d_inner {
                let c = conv_step_at(
                    conv_weight,
                    conv_bias,
                    conv_state,
                    m,
                    n,
                    f32::cast_from(xz),
                    width,
                    has_conv_bias,
                    true,
                );
                y = O::cast_from(c);
            }
            out[m * out.stride(0) + n * out.stride(1)] = y;
        }
    }
}

/// The MoE router for few tokens ([`crate::JambaBackend::moe_router`]), one cube per token: the
/// cube's planes take the experts in turn (plane `p` experts `p, p + planes, ...`), each logit
/// a dot product along the token's row summed over the plane in f32; then the first unit writes
/// the logits and takes the softmax's top `k` as [`super::moe_kernels::route_topk_kernel`].
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn router_kernel<A: Float, W: Float, I: Numeric, N: Size>(
    x: &Tensor<Vector<A, N>>,
    w: &Tensor<Vector<W, N>>,
    logits: &mut Tensor<f32>,
    weights: &mut Tensor<f32>,
    chosen: &mut Tensor<I>,
    #[comptime] experts: usize,
    #[comptime] units: usize,
    #[define(A, W, I)] _dtypes: [StorageType; 3],
) {
    let t = CUBE_POS_X as usize;
    let lane = (UNIT_POS_X % PLANE_DIM) as usize;
    let plane = PLANE_DIM as usize;
    let planes = units / plane;
    let vs = x.vector_size();
    let kv = x.shape(1) / vs;
    let mut sums = SharedMemory::<f32>::new(experts);
    let mut e = (UNIT_POS_X / PLANE_DIM) as usize;
    while e < experts {
        let mut acc = 0.0f32;
        let mut j = lane;
        while j < kv {
            acc += dot(
                x[t * x.stride(0) / vs + j * x.stride(1)],
                w[e * w.stride(0) / vs + j * w.stride(1)],
            );
            j += plane;
        }
        let total = plane_sum(acc);
        if lane == 0 {
            sums[e] = total;
        }
        e += planes;
    }
    sync_cube();
    if UNIT_POS_X == 0 {
        for e in 0..experts {
            logits[t * logits.stride(0) + e * logits.stride(1)] = sums[e];
        }
        softmax_top_k(logits, t, weights, chosen);
    }
}

/// Row `m`'s routing weight for expert `e` (of the experts held here, the layer's `first + e`):
/// `weights[m, e]` of a dense `[rows, experts]` matrix, or with `pairs` the weight of the slot
/// `j` with `chosen[m, j] = first + e` of the router's `[rows, top_k]` pairs (0 when none).
#[cube]
#[allow(clippy::too_many_arguments)]
fn routing_weight<W: Float, I: Numeric>(
    weights: &Tensor<W>,
    chosen: &Tensor<I>,
    m: usize,
    e: usize,
    first: usize,
    #[comptime] pairs: bool,
) -> f32 {
    let mut w = 0.0f32;
    if pairs {
        let target = i64::cast_from(e + first);
        for j in 0..chosen.shape(1) {
            if i64::cast_from(chosen[m * chosen.stride(0) + j * chosen.stride(1)]) == target {
                w += f32::cast_from(weights[m * weights.stride(0) + j * weights.stride(1)]);
            }
        }
    } else {
        w = f32::cast_from(weights[m * weights.stride(0) + e * weights.stride(1)]);
    }
    w
}

/// First half of SwiGLU experts for few rows: `act[e, m, i] = silu(x[m] . gate[e, i]) *
/// (x[m] . up[e, up_row + i])` where row `m` is routed to expert `e` (see [`routing_weight`]) or
/// without `routed` for every row (a dense MLP: one expert). With `routed`, the experts no row
/// routes to are not read. Cube `(x, y, z)` = (block of columns `i` over x and y, expert).
/// `gate` and `up` may be
/// one tensor (the experts' `gate_up`, `up_row` = intermediate size).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn swiglu_rows_kernel<F: Float, W: Float, I: Numeric, N: Size>(
    x: &Tensor<Vector<F, N>>,
    gate: &Tensor<Vector<F, N>>,
    up: &Tensor<Vector<F, N>>,
    weights: &Tensor<W>,
    chosen: &Tensor<I>,
    act: &mut Tensor<F>,
    up_row: usize,
    first: usize,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] split: usize,
    #[comptime] routed: bool,
    #[comptime] pairs: bool,
    #[define(F, W, I)] _dtypes: [StorageType; 3],
) {
    let e = CUBE_POS_Z as usize;
    if routed {
        let mut used = false;
        #[unroll]
        for m in 0..rows {
            used = used || routing_weight(weights, chosen, m, e, first, pairs) != 0.0;
        }
        if !used {
            terminate!();
        }
    }
    let i = column_of(flat_cube(), units, split);
    let part = part_of(split);
    let lane = UNIT_POS_X % PLANE_DIM;
    let inter = act.shape(2);
    let vs = x.vector_size();
    let kv = x.shape(1) / vs;
    let mut acc_g = Array::<f32>::new(rows);
    let mut acc_u = Array::<f32>::new(rows);
    #[unroll]
    for m in 0..rows {
        acc_g[m] = 0.0;
        acc_u[m] = 0.0;
    }
    if i < inter {
        let plane = PLANE_DIM as usize;
        let first = part as usize * plane + lane as usize;
        let (x_row, x_step) = (x.stride(0) / vs, x.stride(1));
        dot_rows(
            x,
            0,
            x_row,
            x_step,
            gate,
            (e * gate.stride(0) + i * gate.stride(1)) / vs,
            gate.stride(2),
            first,
            plane * split,
            kv,
            &mut acc_g,
            rows,
        );
        dot_rows(
            x,
            0,
            x_row,
            x_step,
            up,
            (e * up.stride(0) + (up_row + i) * up.stride(1)) / vs,
            up.stride(2),
            first,
            plane * split,
            kv,
            &mut acc_u,
            rows,
        );
    }
    reduce_column(&mut acc_g, part, lane, rows, units, split);
    reduce_column(&mut acc_u, part, lane, rows, units, split);
    if lane == 0 && part == 0 && i < inter {
        #[unroll]
        for m in 0..rows {
            act[e * act.stride(0) + m * act.stride(1) + i * act.stride(2)] =
                F::cast_from(silu_f32(acc_g[m]) * acc_u[m]);
        }
    }
}

/// Second half: `out[m, n] = sum_e weights[m, e] * (act[e, m] . down[e, n])` over the experts
/// row `m` is routed to (with `routed`; without, the weight is 1 and every expert counts).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn down_rows_kernel<F: Float, W: Float, I: Numeric, N: Size>(
    act: &Tensor<Vector<F, N>>,
    down: &Tensor<Vector<F, N>>,
    weights: &Tensor<W>,
    chosen: &Tensor<I>,
    out: &mut Tensor<F>,
    first: usize,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] split: usize,
    #[comptime] routed: bool,
    #[comptime] pairs: bool,
    #[define(F, W, I)] _dtypes: [StorageType; 3],
) {
    let n = column_of(flat_cube(), units, split);
    let part = part_of(split);
    let lane = UNIT_POS_X % PLANE_DIM;
    let experts = down.shape(0);
    let h_len = down.shape(1);
    let vs = act.vector_size();
    let kv = down.shape(2) / vs;
    let mut acc = Array::<f32>::new(rows);
    let mut acc_e = Array::<f32>::new(rows);
    let mut wm = Array::<f32>::new(rows);
    #[unroll]
    for m in 0..rows {
        acc[m] = 0.0;
    }
    let plane = PLANE_DIM as usize;
    for e in 0..experts {
        let mut used = false;
        if !routed {
            used = true;
        }
        #[unroll]
        for m in 0..rows {
            wm[m] = 1.0;
            if routed {
                // Rounded to the activations' dtype, as transformers rounds the router's weights.
                wm[m] = f32::cast_from(F::cast_from(routing_weight(
                    weights, chosen, m, e, first, pairs,
                )));
                used = used || wm[m] != 0.0;
            }
            acc_e[m] = 0.0;
        }
        if used && n < h_len {
            dot_rows(
                act,
                e * act.stride(0) / vs,
                act.stride(1) / vs,
                act.stride(2),
                down,
                (e * down.stride(0) + n * down.stride(1)) / vs,
                down.stride(2),
                part as usize * plane + lane as usize,
                plane * split,
                kv,
                &mut acc_e,
                rows,
            );
            #[unroll]
            for m in 0..rows {
                acc[m] += wm[m] * acc_e[m];
            }
        }
    }
    reduce_column(&mut acc, part, lane, rows, units, split);
    if lane == 0 && part == 0 && n < h_len {
        #[unroll]
        for m in 0..rows {
            out[m * out.stride(0) + n * out.stride(1)] = F::cast_from(acc[m]);
        }
    }
}

/// The sum of `v` over the cube's units: a plane sum, then the planes' sums through shared
/// memory (one `sync_cube`). Every unit gets the total.
#[cube]
fn cube_sum(v: f32, #[comptime] units: usize) -> f32 {
    let mut partial = SharedMemory::<f32>::new(units);
    let s = plane_sum(v);
    if UNIT_POS_X % PLANE_DIM == 0 {
        partial[(UNIT_POS_X / PLANE_DIM) as usize] = s;
    }
    sync_cube();
    let planes = ((units as u32 + PLANE_DIM - 1) / PLANE_DIM) as usize;
    let mut total = 0.0f32;
    for p in 0..planes {
        total += partial[p];
    }
    total
}

/// `out[row] = cast(x[row, start..start + dim] * rsqrt(mean + eps)) * weight` (`dim` =
/// `weight`'s length), as [`super::kernels::rms_norm_kernel`]; the cube's units share the row.
#[cube]
#[allow(clippy::too_many_arguments)]
fn norm_segment<F: Float, W: Float>(
    x: &Tensor<F>,
    row: usize,
    start: usize,
    weight: &Tensor<W>,
    out: &mut Tensor<W>,
    eps: f32,
    #[comptime] units: usize,
) {
    let dim = weight.shape(0);
    let tid = UNIT_POS_X as usize;
    let mut acc = 0.0f32;
    let mut i = tid;
    while i < dim {
        let v = f32::cast_from(x[row * x.stride(0) + (start + i) * x.stride(1)]);
        acc += v * v;
        i += units;
    }
    let total = cube_sum(acc, units);
    let inv = 1.0f32 / (total / f32::cast_from(dim as u32) + eps).sqrt();
    let mut i = tid;
    while i < dim {
        let v = f32::cast_from(x[row * x.stride(0) + (start + i) * x.stride(1)]);
        out[row * out.stride(0) + i * out.stride(1)] =
            W::cast_from(v * inv) * weight[i * weight.stride(0)];
        i += units;
    }
}

/// RMSNorms of up to three consecutive column segments of `x` (widths those of `w0`, `w1`,
/// `w2`); cube `(row, segment)`. Unused segments get placeholder tensors.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn rms_norms_kernel<F: Float, W: Float>(
    x: &Tensor<F>,
    w0: &Tensor<W>,
    w1: &Tensor<W>,
    w2: &Tensor<W>,
    out0: &mut Tensor<W>,
    out1: &mut Tensor<W>,
    out2: &mut Tensor<W>,
    eps: f32,
    #[comptime] units: usize,
    #[define(F, W)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS_X as usize;
    let seg = CUBE_POS_Y;
    if seg == 0 {
        norm_segment(x, row, 0, w0, out0, eps, units);
    } else if seg == 1 {
        norm_segment(x, row, w0.shape(0), w1, out1, eps, units);
    } else {
        norm_segment(x, row, w0.shape(0) + w1.shape(0), w2, out2, eps, units);
    }
}

/// `sum = residual + h` (f32) and `out = rms_norm(sum) * weight`, one row per cube.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_kernel<H: Float, W: Float>(
    residual: &Tensor<f32>,
    h: &Tensor<H>,
    weight: &Tensor<W>,
    sum: &mut Tensor<f32>,
    out: &mut Tensor<W>,
    eps: f32,
    #[comptime] units: usize,
    #[define(H, W)] _dtypes: [StorageType; 2],
) {
    let row = flat_cube();
    if row >= residual.shape(0) {
        terminate!();
    }
    let dim = residual.shape(1);
    let tid = UNIT_POS_X as usize;
    let mut acc = 0.0f32;
    let mut i = tid;
    while i < dim {
        let v = residual[row * residual.stride(0) + i * residual.stride(1)]
            + f32::cast_from(h[row * h.stride(0) + i * h.stride(1)]);
        sum[row * sum.stride(0) + i * sum.stride(1)] = v;
        acc += v * v;
        i += units;
    }
    let total = cube_sum(acc, units);
    let inv = 1.0f32 / (total / f32::cast_from(dim as u32) + eps).sqrt();
    // Each unit reads back only what it wrote.
    let mut i = tid;
    while i < dim {
        let v = sum[row * sum.stride(0) + i * sum.stride(1)];
        out[row * out.stride(0) + i * out.stride(1)] =
            W::cast_from(v * inv) * weight[i * weight.stride(0)];
        i += units;
    }
}

/// [`add_rms_norm_kernel`] reading `N` adjacent columns per load (every row contiguous, the
/// width, row strides and buffer offsets multiples of `N`: the host checks).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_vec_kernel<H: Float, W: Float, N: Size>(
    residual: &Tensor<Vector<f32, N>>,
    h: &Tensor<Vector<H, N>>,
    weight: &Tensor<Vector<W, N>>,
    sum: &mut Tensor<Vector<f32, N>>,
    out: &mut Tensor<Vector<W, N>>,
    eps: f32,
    #[comptime] units: usize,
    #[define(H, W)] _dtypes: [StorageType; 2],
) {
    let row = flat_cube();
    if row >= residual.shape(0) {
        terminate!();
    }
    let n = residual.vector_size();
    let dim = residual.shape(1);
    let vectors = dim / n;
    let (rb, hb) = (row * residual.stride(0) / n, row * h.stride(0) / n);
    let (sb, ob) = (row * sum.stride(0) / n, row * out.stride(0) / n);
    let tid = UNIT_POS_X as usize;
    let mut acc = 0.0f32;
    let mut i = tid;
    while i < vectors {
        let v = residual[rb + i] + Vector::<f32, N>::cast_from(h[hb + i]);
        sum[sb + i] = v;
        let sq = v * v;
        #[unroll]
        for e in 0..N::value() {
            acc += sq[e];
        }
        i += units;
    }
    let total = cube_sum(acc, units);
    let inv = Vector::<f32, N>::new(1.0f32 / (total / f32::cast_from(dim as u32) + eps).sqrt());
    // Each unit reads back only what it wrote.
    let mut i = tid;
    while i < vectors {
        out[ob + i] = Vector::<W, N>::cast_from(sum[sb + i] * inv) * weight[i];
        i += units;
    }
}

/// One decoding position of the Mamba mixer from `x_proj`'s output ([`crate::MambaStep`]):
/// cube `(x, y)` = (block of `units` channels, batch row). Every cube first normalises its
/// row's `[dt | B | C]` into shared memory (the row is `dt_rank + 2 d_state` wide, a few
/// hundred values: recomputing it per cube is cheaper than a launch), then each unit takes one
/// channel: `dt = dt_proj[channel] . dt_normed` (a row of `dt_rank` read in vectors), the
/// softplus, the state update and the gate, as [`super::kernels::scan_step_kernel`].
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn mamba_step_kernel<F: Float, W: Float, N: Size>(
    x: &Tensor<F>,
    z: &Tensor<F>,
    params: &Tensor<F>,
    dt_norm: &Tensor<W>,
    b_norm: &Tensor<W>,
    c_norm: &Tensor<W>,
    dt_proj: &Tensor<Vector<W, N>>,
    a: &Tensor<f32>,
    d_skip: &Tensor<f32>,
    delta_bias: &Tensor<f32>,
    state: &mut Tensor<f32>,
    y: &mut Tensor<F>,
    eps: f32,
    #[comptime] dt_rank: usize,
    #[comptime] n_state: usize,
    #[comptime] units: usize,
    #[comptime] has_z: bool,
    #[comptime] has_bias: bool,
    #[comptime] softplus: bool,
    #[define(F, W)] _dtypes: [StorageType; 2],
) {
    let bi = CUBE_POS_Y as usize;
    let tid = UNIT_POS_X as usize;
    let width = dt_rank + 2 * n_state;
    // The row, then its three norms, in f32.
    let mut normed = SharedMemory::<f32>::new(width);
    let mut sq_dt = 0.0f32;
    let mut sq_b = 0.0f32;
    let mut sq_c = 0.0f32;
    let mut i = tid;
    while i < width {
        let v = f32::cast_from(params[bi * params.stride(0) + i * params.stride(1)]);
        normed[i] = v;
        if i < dt_rank {
            sq_dt += v * v;
        } else if i < dt_rank + n_state {
            sq_b += v * v;
        } else {
            sq_c += v * v;
        }
        i += units;
    }
    let inv_dt = 1.0f32 / (cube_sum(sq_dt, units) / f32::cast_from(dt_rank as u32) + eps).sqrt();
    let inv_b = 1.0f32 / (cube_sum(sq_b, units) / f32::cast_from(n_state as u32) + eps).sqrt();
    let inv_c = 1.0f32 / (cube_sum(sq_c, units) / f32::cast_from(n_state as u32) + eps).sqrt();
    // Each unit rescales the values it wrote (rounded as the norms' outputs are).
    let mut i = tid;
    while i < width {
        let v = normed[i];
        if i < dt_rank {
            normed[i] = f32::cast_from(W::cast_from(v * inv_dt) * dt_norm[i * dt_norm.stride(0)]);
        } else if i < dt_rank + n_state {
            let j = i - dt_rank;
            normed[i] = f32::cast_from(W::cast_from(v * inv_b) * b_norm[j * b_norm.stride(0)]);
        } else {
            let j = i - dt_rank - n_state;
            normed[i] = f32::cast_from(W::cast_from(v * inv_c) * c_norm[j * c_norm.stride(0)]);
        }
        i += units;
    }
    sync_cube();

    let dim = x.shape(1);
    let di = CUBE_POS_X as usize * units + tid;
    if di < dim {
        let vs = N::value();
        let base = di * dt_proj.stride(0) / vs;
        let mut acc = 0.0f32;
        for j in 0..dt_rank / vs {
            let w = dt_proj[base + j * dt_proj.stride(1)];
            #[unroll]
            for e in 0..vs {
                acc += f32::cast_from(w[e]) * normed[j * vs + e];
            }
        }
        // dt_proj's output in the weights' dtype, then the bias and the softplus in f32.
        let mut dtv = f32::cast_from(W::cast_from(acc));
        if has_bias {
            dtv += delta_bias[di * delta_bias.stride(0)];
        }
        if softplus {
            dtv = softplus_f32(dtv);
        }
        let uv = f32::cast_from(x[bi * x.stride(0) + di * x.stride(1)]);
        let du = dtv * uv;
        let mut out = 0.0f32;
        #[unroll(n_state <= 64)]
        for n in 0..n_state {
            let s = bi * state.stride(0) + di * state.stride(1) + n * state.stride(2);
            let decay = (dtv * a[di * a.stride(0) + n * a.stride(1)]).exp();
            let hn = decay * state[s] + du * normed[dt_rank + n];
            state[s] = hn;
            out += hn * normed[dt_rank + n_state + n];
        }
        out += d_skip[di * d_skip.stride(0)] * uv;
        if has_z {
            let zv = f32::cast_from(z[bi * z.stride(0) + di * z.stride(1)]);
            out *= zv * sigmoid_f32(zv);
        }
        y[bi * y.stride(0) + di * y.stride(1)] = F::cast_from(out);
    }
}

/// Decoding attention, one cube per (head, batch row): the cube's planes take the cached keys
/// in turn (plane `p` keys `p, p + planes, ...`), each lane holding `head_dim / PLANE_DIM` of the
/// query's and the output's elements; a key's score is a plane sum, the softmax is online per
/// plane (running max, sum and weighted values), and the planes' partial results are merged in
/// shared memory. `per_lane` bounds the elements per lane (`head_dim` over the smallest plane),
/// `max_planes` the planes per cube.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    scale: f32,
    len: usize,
    #[comptime] per_lane: usize,
    #[comptime] max_planes: usize,
    #[comptime] head_dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    let head = CUBE_POS_X as usize;
    let b = CUBE_POS_Y as usize;
    let heads = q.shape(1);
    let kv = head / (heads / k.shape(1));
    let plane = PLANE_DIM as usize;
    let planes = CUBE_DIM_X as usize / plane;
    let plane_idx = UNIT_POS_X as usize / plane;
    let lane = UNIT_POS_X as usize % plane;
    let q_base = b * q.stride(0) + head * q.stride(1);
    let k_base = b * k.stride(0) + kv * k.stride(1);
    let v_base = b * v.stride(0) + kv * v.stride(1);
    let mut qv = Array::<f32>::new(per_lane);
    let mut acc = Array::<f32>::new(per_lane);
    #[unroll]
    for i in 0..per_lane {
        let e = lane + i * plane;
        qv[i] = 0.0;
        acc[i] = 0.0;
        if e < head_dim {
            qv[i] = f32::cast_from(q[q_base + e * q.stride(3)]) * scale;
        }
    }
    // A finite floor: exp(floor - finite) is 0 without an infinity in the arithmetic.
    let mut m = f32::new(-1.0e30);
    let mut l = 0.0f32;
    let mut t = plane_idx;
    while t < len {
        let mut s = 0.0f32;
        #[unroll]
        for i in 0..per_lane {
            let e = lane + i * plane;
            if e < head_dim {
                s += qv[i] * f32::cast_from(k[k_base + t * k.stride(2) + e * k.stride(3)]);
            }
        }
        let s = plane_sum(s);
        let m_new = f32::max(m, s);
        let corr = (m - m_new).exp();
        let p = (s - m_new).exp();
        l = l * corr + p;
        #[unroll]
        for i in 0..per_lane {
            let e = lane + i * plane;
            if e < head_dim {
                acc[i] = acc[i] * corr
                    + p * f32::cast_from(v[v_base + t * v.stride(2) + e * v.stride(3)]);
            }
        }
        m = m_new;
        t += planes;
    }
    let mut sm_m = SharedMemory::<f32>::new(max_planes);
    let mut sm_l = SharedMemory::<f32>::new(max_planes);
    let mut sm_acc = SharedMemory::<f32>::new(max_planes * head_dim);
    if lane == 0 {
        sm_m[plane_idx] = m;
        sm_l[plane_idx] = l;
    }
    #[unroll]
    for i in 0..per_lane {
        let e = lane + i * plane;
        if e < head_dim {
            sm_acc[plane_idx * head_dim + e] = acc[i];
        }
    }
    sync_cube();
    let mut big = f32::new(-1.0e30);
    for p in 0..planes {
        big = f32::max(big, sm_m[p]);
    }
    let mut total = 0.0f32;
    for p in 0..planes {
        total += sm_l[p] * (sm_m[p] - big).exp();
    }
    let mut e = UNIT_POS_X as usize;
    while e < head_dim {
        let mut o = 0.0f32;
        for p in 0..planes {
            o += sm_acc[p * head_dim + e] * (sm_m[p] - big).exp();
        }
        out[b * out.stride(0) + head * out.stride(1) + e * out.stride(3)] = F::cast_from(o / total);
        e += CUBE_DIM_X as usize;
    }
}

/// The widest vector (in elements) that every tensor of `tensors` can be read with along its
/// last dimension: unit stride there, every other stride and the length a multiple of it, at
/// most 16 bytes (and what the device loads at once).
pub(crate) fn vector_width<R: CubeRuntime>(tensors: &[&CubeTensor<R>]) -> usize {
    tensors
        .iter()
        .map(|t| {
            let last = t.meta.num_dims() - 1;
            cubecl::tensor_vector_size_parallel(
                t.client.io_optimized_vector_sizes(t.dtype.size()),
                t.meta.shape(),
                t.meta.strides(),
                last,
            )
        })
        .min()
        .unwrap_or(1)
        .max(1)
}

/// Planes per column for a product of `columns` columns of `k_vectors` vectors each: enough
/// planes to keep loads in flight on every compute unit (about 32 each) without giving a plane
/// fewer than 4 vectors per lane, and at most the planes of a cube.
fn split_for(columns: usize, k_vectors: usize, plane: usize, compute_units: usize) -> usize {
    let planes = (GEMV_UNITS / plane).max(1);
    let wanted = (32 * compute_units).div_ceil(columns.max(1));
    let mut split = 1;
    while split * 2 <= planes && split < wanted && k_vectors >= split * 2 * plane * 4 {
        split *= 2;
    }
    split
}

/// The launch of a product with `columns` columns (for each of `experts` along z): cubes of
/// [`GEMV_UNITS`] units and the planes per column.
fn gemv_launch<R: CubeRuntime>(
    client: &cubecl::client::ComputeClient<R>,
    columns: usize,
    k_vectors: usize,
    experts: u32,
) -> (CubeCount, CubeDim, usize) {
    let hardware = &client.properties().hardware;
    // Columns per cube from the largest plane: a smaller one gives a cube more columns.
    let plane = (hardware.plane_size_max as usize).clamp(1, GEMV_UNITS);
    let units = hardware
        .num_streaming_multiprocessors
        .map_or(16, |n| n as usize);
    let split = split_for(columns, k_vectors, plane, units);
    let cols = (GEMV_UNITS / plane / split).max(1);
    let cubes = columns.div_ceil(cols).max(1) as u32;
    let x = cubes.min(65535);
    let count = CubeCount::Static(x, cubes.div_ceil(x), experts.max(1));
    (count, CubeDim::new_1d(GEMV_UNITS as u32), split)
}

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// Whether the decoding products' shared memory for `rows` rows fits the device (two column
/// sums of `rows` floats per unit in the SwiGLU kernel).
pub(crate) fn rows_fit<R: CubeRuntime>(t: &CubeTensor<R>, rows: usize) -> bool {
    2 * GEMV_UNITS * rows * 4 <= t.client.properties().hardware.max_shared_memory_size
}

/// Whether decoding attention's shared memory (each plane's partial output, max and sum) fits
/// the device for `head_dim`.
pub(crate) fn attention_fits<R: CubeRuntime>(t: &CubeTensor<R>, head_dim: usize) -> bool {
    let hardware = &t.client.properties().hardware;
    let planes = ATTENTION_UNITS / (hardware.plane_size_min as usize).clamp(1, ATTENTION_UNITS);
    planes * (head_dim + 2) * 4 <= hardware.max_shared_memory_size
}

/// `x [rows, k] @ w [n, k]^T + bias` for few rows, accumulated in f32 and written in `dtype`.
/// `x` and `w` may differ in dtype.
pub(crate) fn gemv<R, F, I, BT>(
    x: BTensor<Cube<R, F, I, BT>, 2>,
    weight: BTensor<Cube<R, F, I, BT>, 2>,
    bias: Option<BTensor<Cube<R, F, I, BT>, 1>>,
    dtype: DType,
) -> BTensor<Cube<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [rows, k] = x.dims();
    let [n, _] = weight.dims();
    let x_dtype = x.dtype();
    let device = x.device();
    let out = BTensor::<Cube<R, F, I, BT>, 2>::empty([rows, n], (&device, dtype));
    let has_bias = bias.is_some();
    let bias = bias
        .map(|b| b.cast(dtype))
        .unwrap_or_else(|| kept_dummy::<Cube<R, F, I, BT>, 1>(&device, dtype, 0));
    let (x, weight) = (prim(x), prim(weight));
    let w_dtype = weight.dtype;
    let client = x.client.clone();
    let vs = vector_width(&[&x, &weight]);
    let (count, dim, split) = gemv_launch(&client, n, k / vs, 1);
    unsafe {
        gemv_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            vs,
            x.into_tensor_arg(),
            weight.into_tensor_arg(),
            prim(bias).into_tensor_arg(),
            prim(out.clone()).into_tensor_arg(),
            rows,
            GEMV_UNITS,
            split,
            has_bias,
            [x_dtype.into(), w_dtype.into(), dtype.into()],
        );
    }
    out
}

/// How [`swiglu_rows`] weighs its experts' outputs.
pub(crate) enum Routing<B: burn::tensor::backend::Backend> {
    /// Every row through every expert, weight 1 (a dense MLP as one expert).
    All,
    /// `[rows, experts]` weights in the activations' dtype, zero where a row is not routed.
    Dense(BTensor<B, 2>),
    /// The router's pairs, `chosen` and `weights` `[rows, top_k]` (weights of any float
    /// dtype, rounded to the activations'), expert indices counted from `first`.
    Pairs {
        chosen: BTensor<B, 2, burn::tensor::Int>,
        weights: BTensor<B, 2>,
        first: usize,
    },
}

/// Units per cube of [`router_kernel`].
const ROUTER_UNITS: usize = 256;

/// See [`crate::JambaBackend::moe_router`]; the caller checked the shapes (few rows, at most
/// [`ROUTER_MAX_EXPERTS`] experts, `top_k` of them).
pub(crate) fn router<R, F, I, BT>(
    x: BTensor<Cube<R, F, I, BT>, 2>,
    weight: BTensor<Cube<R, F, I, BT>, 2>,
    top_k: usize,
) -> (
    BTensor<Cube<R, F, I, BT>, 2>,
    BTensor<Cube<R, F, I, BT>, 2>,
    BTensor<Cube<R, F, I, BT>, 2, burn::tensor::Int>,
)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [tokens, _] = x.dims();
    let [experts, _] = weight.dims();
    let device = x.device();
    let logits = BTensor::<Cube<R, F, I, BT>, 2>::empty([tokens, experts], (&device, DType::F32));
    let weights = BTensor::<Cube<R, F, I, BT>, 2>::empty([tokens, top_k], (&device, DType::F32));
    let chosen =
        BTensor::<Cube<R, F, I, BT>, 2, burn::tensor::Int>::empty([tokens, top_k], &device);
    let chosen_prim: CubeTensor<R> = chosen.clone().into_primitive();
    let (x, weight) = (prim(x), prim(weight));
    let client = x.client.clone();
    let dtypes = [
        x.dtype.into(),
        weight.dtype.into(),
        chosen_prim.dtype.into(),
    ];
    let vs = vector_width(&[&x, &weight]);
    let units = cube_units(&client, ROUTER_UNITS);
    unsafe {
        router_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(tokens as u32, 1, 1),
            CubeDim::new_1d(units as u32),
            vs,
            x.into_tensor_arg(),
            weight.into_tensor_arg(),
            prim(logits.clone()).into_tensor_arg(),
            prim(weights.clone()).into_tensor_arg(),
            chosen_prim.into_tensor_arg(),
            experts,
            units,
            dtypes,
        );
    }
    (logits, weights, chosen)
}

/// The most experts [`router`] takes (their logits are in shared memory: 4 KiB).
pub(crate) const ROUTER_MAX_EXPERTS: usize = 1024;

/// See [`crate::JambaBackend::mamba_in_proj_step`]; the caller checked the shapes (few rows,
/// `weight` `[2 d_inner, hidden]`, the conv's state `[rows, d_inner, width - 1]`).
pub(crate) fn in_proj_conv<R, F, I, BT>(
    input: crate::MambaInProjStep<Cube<R, F, I, BT>>,
) -> (
    BTensor<Cube<R, F, I, BT>, 2>,
    BTensor<Cube<R, F, I, BT>, 2>,
    BTensor<Cube<R, F, I, BT>, 3>,
)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [rows, _] = input.x.dims();
    let [n, k] = input.weight.dims();
    let [d_inner, width] = input.conv_weight.dims();
    let dtype = input.x.dtype();
    let device = input.x.device();
    let out = BTensor::<Cube<R, F, I, BT>, 2>::empty([rows, n], (&device, dtype));
    let state = super::writable_f32(prim(input.conv_state));
    let has_bias = input.bias.is_some();
    let bias = input
        .bias
        .map(|b| crate::cast_to(b, dtype))
        .unwrap_or_else(|| kept_dummy::<Cube<R, F, I, BT>, 1>(&device, dtype, 0));
    let has_conv_bias = input.conv_bias.is_some();
    let f32 = |t: BTensor<Cube<R, F, I, BT>, 1>| crate::cast_to(t, DType::F32);
    let conv_bias = input
        .conv_bias
        .map(f32)
        .unwrap_or_else(|| kept_dummy::<Cube<R, F, I, BT>, 1>(&device, DType::F32, 1));
    let conv_weight = crate::cast_to(input.conv_weight, DType::F32);
    let (x, weight) = (prim(input.x), prim(input.weight));
    let w_dtype = weight.dtype;
    let client = x.client.clone();
    let vs = vector_width(&[&x, &weight]);
    let (count, dim, split) = gemv_launch(&client, n, k / vs, 1);
    unsafe {
        in_proj_conv_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            vs,
            x.into_tensor_arg(),
            weight.into_tensor_arg(),
            prim(bias).into_tensor_arg(),
            prim(conv_weight).into_tensor_arg(),
            prim(conv_bias).into_tensor_arg(),
            state.clone().into_tensor_arg(),
            prim(out.clone()).into_tensor_arg(),
            rows,
            GEMV_UNITS,
            split,
            has_bias,
            width,
            has_conv_bias,
            [dtype.into(), w_dtype.into(), dtype.into()],
        );
    }
    (
        out.clone().narrow(1, 0, d_inner),
        out.narrow(1, d_inner, d_inner),
        super::wrap(state),
    )
}

/// SwiGLU experts (or one dense MLP) for few rows: `sum_e w[:, e] * down_e(silu(gate_e x) *
/// up_e x)`, with `gate` and `up` `[experts, inter, hidden]` views (rows `up_row..` of `up`),
/// `down` `[experts, hidden, inter]`, and the weights `w` of `routing`.
pub(crate) fn swiglu_rows<R, F, I, BT>(
    x: BTensor<Cube<R, F, I, BT>, 2>,
    gate: BTensor<Cube<R, F, I, BT>, 3>,
    up: BTensor<Cube<R, F, I, BT>, 3>,
    up_row: usize,
    down: BTensor<Cube<R, F, I, BT>, 3>,
    routing: Routing<Cube<R, F, I, BT>>,
) -> BTensor<Cube<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [rows, hidden] = x.dims();
    let [experts, out_dim, inter] = down.dims();
    let dtype = x.dtype();
    let device = x.device();
    let (routed, pairs) = match &routing {
        Routing::All => (false, false),
        Routing::Dense(_) => (true, false),
        Routing::Pairs { .. } => (true, true),
    };
    let no_pairs = || kept_dummy_int::<Cube<R, F, I, BT>, 2>(&device, 0);
    let (weights, chosen, first) = match routing {
        Routing::All => (kept_dummy(&device, dtype, 0), no_pairs(), 0),
        Routing::Dense(w) => (w, no_pairs(), 0),
        Routing::Pairs {
            chosen,
            weights,
            first,
        } => (weights, chosen, first),
    };
    let (weights, chosen): (CubeTensor<R>, CubeTensor<R>) =
        (prim(weights), chosen.into_primitive());
    let dtypes = [dtype.into(), weights.dtype.into(), chosen.dtype.into()];
    let act = BTensor::<Cube<R, F, I, BT>, 3>::empty([experts, rows, inter], (&device, dtype));
    let out = BTensor::<Cube<R, F, I, BT>, 2>::empty([rows, out_dim], (&device, dtype));
    let (x, gate, up, down) = (prim(x), prim(gate), prim(up), prim(down));
    let client = x.client.clone();
    let vs = vector_width(&[&x, &gate, &up]);
    let (count, dim, split) = gemv_launch(&client, inter, hidden / vs, experts as u32);
    let act_p = prim(act.clone());
    let vs_down = vector_width(&[&act_p, &down]);
    let (count_down, dim_down, split_down) = gemv_launch(&client, out_dim, inter / vs_down, 1);
    unsafe {
        swiglu_rows_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            vs,
            x.into_tensor_arg(),
            gate.into_tensor_arg(),
            up.into_tensor_arg(),
            weights.clone().into_tensor_arg(),
            chosen.clone().into_tensor_arg(),
            act_p.clone().into_tensor_arg(),
            up_row,
            first,
            rows,
            GEMV_UNITS,
            split,
            routed,
            pairs,
            dtypes,
        );
        down_rows_kernel::launch_unchecked::<R>(
            &client,
            count_down,
            dim_down,
            vs_down,
            act_p.into_tensor_arg(),
            down.into_tensor_arg(),
            weights.into_tensor_arg(),
            chosen.into_tensor_arg(),
            prim(out.clone()).into_tensor_arg(),
            first,
            rows,
            GEMV_UNITS,
            split_down,
            routed,
            pairs,
            dtypes,
        );
    }
    out
}

/// Units per cube of the residual norm, at most (a multiple of every plane size; many, so that
/// each unit has few elements of a row to walk: a row of a decoding step is one cube).
const NORM_UNITS: usize = 1024;
/// Units per cube of [`add_rms_norm_vec_kernel`]: two vectors of 4 per unit on a 2048-wide row.
const VEC_NORM_UNITS: usize = 256;
/// Units per cube of the segment norms (Mamba's dt segment is `dt_rank` wide, 128 for
/// Jamba-v0.1's shapes at most 256; B and C are `d_state` wide).
const SEGMENT_NORM_UNITS: usize = 128;

/// `wanted` units per cube, or fewer where the device's cubes are smaller (a power of two).
fn cube_units<R: CubeRuntime>(client: &cubecl::client::ComputeClient<R>, wanted: usize) -> usize {
    let hardware = &client.properties().hardware;
    let max = (hardware.max_units_per_cube as usize).min(hardware.max_cube_dim.0 as usize);
    let mut units = wanted;
    while units > max.max(1) {
        units /= 2;
    }
    units
}

/// See [`crate::JambaBackend::add_rms_norm`]; `residual` is f32.
pub(crate) fn add_rms_norm<R, F, I, BT>(
    residual: BTensor<Cube<R, F, I, BT>, 2>,
    h: BTensor<Cube<R, F, I, BT>, 2>,
    weight: BTensor<Cube<R, F, I, BT>, 1>,
    eps: f64,
) -> (BTensor<Cube<R, F, I, BT>, 2>, BTensor<Cube<R, F, I, BT>, 2>)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [rows, dim] = residual.dims();
    let device = residual.device();
    let (h_dtype, w_dtype) = (h.dtype(), weight.dtype());
    let sum = BTensor::<Cube<R, F, I, BT>, 2>::empty([rows, dim], (&device, DType::F32));
    let out = BTensor::<Cube<R, F, I, BT>, 2>::empty([rows, dim], (&device, w_dtype));
    if rows == 0 {
        return (sum, out);
    }
    let residual = prim(residual);
    let (h, weight) = (prim(h), prim(weight));
    let (sum_p, out_p) = (prim(sum.clone()), prim(out.clone()));
    let client = residual.client.clone();
    let x = (rows as u32).min(65535);
    let count = CubeCount::Static(x, (rows as u32).div_ceil(x), 1);
    let tensors = [&residual, &h, &weight, &sum_p, &out_p];
    if tensors.iter().all(|t| t.meta.strides().last() == Some(&1)) {
        // Vectors of 16 bytes of f32 (the widest the f32 tensors allow), a unit per few vectors.
        let vector = super::aligned_vector_width(&tensors, dim);
        let units = cube_units(&client, VEC_NORM_UNITS);
        unsafe {
            add_rms_norm_vec_kernel::launch_unchecked::<R>(
                &client,
                count,
                CubeDim::new_1d(units as u32),
                vector,
                residual.into_tensor_arg(),
                h.into_tensor_arg(),
                weight.into_tensor_arg(),
                sum_p.into_tensor_arg(),
                out_p.into_tensor_arg(),
                eps as f32,
                units,
                [h_dtype.into(), w_dtype.into()],
            );
        }
        return (sum, out);
    }
    let units = cube_units(&client, NORM_UNITS);
    unsafe {
        add_rms_norm_kernel::launch_unchecked::<R>(
            &client,
            count,
            CubeDim::new_1d(units as u32),
            residual.into_tensor_arg(),
            h.into_tensor_arg(),
            weight.into_tensor_arg(),
            sum_p.into_tensor_arg(),
            out_p.into_tensor_arg(),
            eps as f32,
            units,
            [h_dtype.into(), w_dtype.into()],
        );
    }
    (sum, out)
}

/// See [`crate::JambaBackend::rms_norms`]: one to three segments, weights of one dtype, their
/// widths summing to `x`'s.
pub(crate) fn rms_norms<R, F, I, BT>(
    x: BTensor<Cube<R, F, I, BT>, 2>,
    weights: Vec<BTensor<Cube<R, F, I, BT>, 1>>,
    eps: f64,
) -> Vec<BTensor<Cube<R, F, I, BT>, 2>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [rows, _] = x.dims();
    let device = x.device();
    let (x_dtype, w_dtype) = (x.dtype(), weights[0].dtype());
    let outs: Vec<BTensor<Cube<R, F, I, BT>, 2>> = weights
        .iter()
        .map(|w| BTensor::empty([rows, w.dims()[0]], (&device, w_dtype)))
        .collect();
    if rows == 0 || rows > 65535 {
        return match rows {
            0 => outs,
            _ => crate::reference::rms_norms(x, weights, eps),
        };
    }
    let segments = weights.len() as u32;
    // Unused segments get placeholders of their own (no cube reads or writes them).
    let (w, o) = (
        [0, 1, 2].map(|i| {
            prim(
                weights
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| dummy_of(&device, w_dtype)),
            )
        }),
        [0, 1, 2].map(|i| {
            prim(
                outs.get(i)
                    .cloned()
                    .unwrap_or_else(|| dummy_of(&device, w_dtype)),
            )
        }),
    );
    let client = w[0].client.clone();
    let units = cube_units(&client, SEGMENT_NORM_UNITS);
    let [w0, w1, w2] = w;
    let [o0, o1, o2] = o;
    unsafe {
        rms_norms_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(rows as u32, segments, 1),
            CubeDim::new_1d(units as u32),
            prim(x).into_tensor_arg(),
            w0.into_tensor_arg(),
            w1.into_tensor_arg(),
            w2.into_tensor_arg(),
            o0.into_tensor_arg(),
            o1.into_tensor_arg(),
            o2.into_tensor_arg(),
            eps as f32,
            units,
            [x_dtype.into(), w_dtype.into()],
        );
    }
    outs
}

/// Units per cube of [`mamba_step_kernel`]: one unit per channel, small cubes so that a batch
/// row's few thousand channels spread over many compute units (as the scan's decoding step).
const MAMBA_STEP_UNITS: usize = 64;

/// Whether [`mamba_step_kernel`]'s shared memory fits the device for an `x_proj` output row of
/// `width` values (its f32 copy, and the three sums' partials of a cube).
pub(crate) fn mamba_step_fits<R: CubeRuntime>(t: &CubeTensor<R>, width: usize) -> bool {
    let units = cube_units(&t.client, MAMBA_STEP_UNITS);
    (width + 3 * units) * 4 <= t.client.properties().hardware.max_shared_memory_size
}

/// See [`crate::JambaBackend::mamba_step`]; the caller checked the shapes and dtypes (`x`, `z`
/// and `params` of one dtype, the norms and `dt_proj` of one dtype, `a`, `d` and the bias f32).
pub(crate) fn mamba_step<R, F, I, BT>(
    input: crate::MambaStep<Cube<R, F, I, BT>>,
) -> (BTensor<Cube<R, F, I, BT>, 2>, BTensor<Cube<R, F, I, BT>, 3>)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [batch, d_inner] = input.x.dims();
    let [_, dt_rank] = input.dt_proj.dims();
    let n_state = input.a.dims()[1];
    let (dtype, w_dtype) = (input.x.dtype(), input.dt_proj.dtype());
    let device = input.x.device();
    let state = super::writable_f32(prim(input.state));
    let y = BTensor::<Cube<R, F, I, BT>, 2>::empty([batch, d_inner], (&device, dtype));
    let client = state.client.clone();
    let dt_proj = prim(input.dt_proj);
    let vs = vector_width(&[&dt_proj]);
    let units = cube_units(&client, MAMBA_STEP_UNITS);
    let [dt_norm, b_norm, c_norm] = input.norms.map(prim);
    let (has_z, has_bias) = (input.z.is_some(), input.delta_bias.is_some());
    let z = input.z.unwrap_or_else(|| kept_dummy(&device, dtype, 0));
    let delta_bias = input
        .delta_bias
        .unwrap_or_else(|| kept_dummy(&device, DType::F32, 1));
    unsafe {
        mamba_step_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(d_inner.div_ceil(units) as u32, batch as u32, 1),
            CubeDim::new_1d(units as u32),
            vs,
            prim(input.x).into_tensor_arg(),
            prim(z).into_tensor_arg(),
            prim(input.params).into_tensor_arg(),
            dt_norm.into_tensor_arg(),
            b_norm.into_tensor_arg(),
            c_norm.into_tensor_arg(),
            dt_proj.into_tensor_arg(),
            prim(input.a).into_tensor_arg(),
            prim(input.d).into_tensor_arg(),
            prim(delta_bias).into_tensor_arg(),
            state.clone().into_tensor_arg(),
            prim(y.clone()).into_tensor_arg(),
            input.eps as f32,
            dt_rank,
            n_state,
            units,
            has_z,
            has_bias,
            input.delta_softplus,
            [dtype.into(), w_dtype.into()],
        );
    }
    (y, super::wrap(state))
}

/// Units per cube of decoding attention.
const ATTENTION_UNITS: usize = 256;

/// See [`crate::JambaBackend::decode_attention`]; `q`, `k`, `v` of one dtype, `len` at most
/// the buffers' capacity.
pub(crate) fn decode_attention<R, F, I, BT>(
    q: BTensor<Cube<R, F, I, BT>, 4>,
    k: BTensor<Cube<R, F, I, BT>, 4>,
    v: BTensor<Cube<R, F, I, BT>, 4>,
    len: usize,
) -> BTensor<Cube<R, F, I, BT>, 4>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [batch, heads, _, head_dim] = q.dims();
    let dtype = q.dtype();
    let out =
        BTensor::<Cube<R, F, I, BT>, 4>::empty([batch, heads, 1, head_dim], (&q.device(), dtype));
    let q = prim(q);
    let client = q.client.clone();
    let plane_min =
        (client.properties().hardware.plane_size_min as usize).clamp(1, ATTENTION_UNITS);
    unsafe {
        decode_attention_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(heads as u32, batch as u32, 1),
            CubeDim::new_1d(ATTENTION_UNITS as u32),
            q.into_tensor_arg(),
            prim(k).into_tensor_arg(),
            prim(v).into_tensor_arg(),
            prim(out.clone()).into_tensor_arg(),
            (head_dim as f32).powf(-0.5),
            len,
            head_dim.div_ceil(plane_min),
            ATTENTION_UNITS / plane_min,
            head_dim,
            dtype.into(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::split_for;

    #[test]
    fn split_fills_small_grids_only() {
        // 8192 columns (in_proj) fill an H200 with one plane each; 2048 (out_proj) take four.
        assert_eq!(split_for(8192, 256, 32, 132), 1);
        assert_eq!(split_for(2048, 512, 32, 132), 4);
        // 16 columns (the router) take every plane of a cube, K permitting.
        assert_eq!(split_for(16, 256, 32, 132), 2);
        assert_eq!(split_for(16, 1024, 32, 132), 4);
        // A short row is not split below 4 vectors per lane.
        assert_eq!(split_for(160, 16, 32, 132), 1);
        // Planes of 8: up to 16 per cube.
        assert_eq!(split_for(16, 4096, 8, 16), 16);
        assert_eq!(split_for(64, 4096, 8, 16), 8);
    }
}
