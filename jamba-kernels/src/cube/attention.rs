//! Causal attention of new positions over their keys (prefill, with or without cached positions
//! before them), without the `[len_q, len_k]` scores in memory.
//!
//! The kernels take `q` `[batch, heads, len_q, head_dim]` and `k`, `v` `[batch, kv_heads,
//! len_k, head_dim]`, `len_q <= len_k`: query `i` is position `len_k - len_q + i` and sees keys
//! `0..=len_k - len_q + i`; query head `h` reads KV head `h / (heads / kv_heads)`, so the KV
//! heads are never repeated in memory. A cube takes [`Q_TILE`] queries of one head.
//!
//! - [`flash_attention_mma_kernel`] (f16/bf16, planes of 32 units with 16 x 16 x 16 cooperative
//!   matrices, at least 16 queries and keys): four planes of 16 query rows, each on its own,
//!   reading the fragments of the queries, keys and values in place (inputs whose layout the
//!   fragment loads cannot read are copied first) and walking the keys its rows see, 64 per
//!   step. By default one walk: each row's probabilities are taken against a reference maximum
//!   that moves only when a score passes it by more than 8 (the output fragments, opaque
//!   accumulators, are rescaled through shared memory on the rare steps where it moves), rounded
//!   to the inputs' dtype for their product with `v`, and the row's sum divides the output at
//!   the end. `JAMBA_REFERENCE=attention_one_pass` gives two walks instead: each row's softmax
//!   maximum and sum first, then the normalised probabilities, rounded, times `v`.
//! - [`flash_attention_mma_staged_kernel`] (the same inputs, any length): the two walks, with
//!   the cube staging the queries and each step's [`KEY_TILE`] keys and values in shared memory.
//!   It runs below 16 queries or keys (a short chunk after a long cache).
//! - [`flash_attention_unit_kernel`] (any float dtype, any plane size): one unit per query row
//!   with the online softmax, everything in f32, keys and values staged by the cube.

// `#[cube]` expands a subset of Rust: integer `div_ceil` is written out.
#![allow(clippy::manual_div_ceil)]

use burn::tensor::{DType, Tensor as BTensor};
use burn_cubecl::{
    cubecl::{
        ir::{features::MmaConfig, StorageType},
        prelude::{CubeCount, CubeDim},
    },
    tensor::CubeTensor,
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement,
};
use cubecl::prelude::*;

use super::moe_kernels::zero_acc;
use super::prim;

/// Query rows per cube.
pub const Q_TILE: usize = 64;
/// Keys staged per step.
pub const KEY_TILE: usize = 32;
/// Units per plane and planes per cube of the tensor-core kernel.
const MMA_PLANE: usize = 32;
const MMA_PLANES: usize = Q_TILE / 16;
const MMA_UNITS: usize = MMA_PLANE * MMA_PLANES;
/// Row pitch of a plane's scores (f32) and probabilities (`F`): padded against bank conflicts,
/// multiples of 4 and 8 elements as the fragments' loads and stores require.
const S_LD: usize = KEY_TILE + 4;
const P_LD: usize = KEY_TILE + 8;
/// Largest head dimension of the tensor-core kernel: its output and queries stay in fragments
/// (`head_dim / 16` of each per plane).
pub const MMA_MAX_HEAD_DIM: usize = 128;
/// Largest head dimension of the unit kernel (a unit's query row and output in registers).
pub const UNIT_MAX_HEAD_DIM: usize = 256;

/// The last key (exclusive) that the queries `q0..q0 + Q_TILE` see.
#[cube]
fn key_end(q0: usize, len_q: usize, offset: usize) -> usize {
    let mut last = q0 + Q_TILE;
    if last > len_q {
        last = len_q;
    }
    offset + last
}

/// Rows `0..rows` of `KEY_TILE`-long tile `k0` of `t` (`[batch, heads, len, head_dim]`, head
/// `head` of batch `b`) into `s` from element `at`, `ld` apart; zeros past `len`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_rows<F: Float>(
    t: &Tensor<F>,
    s: &mut SharedMemory<F>,
    b: usize,
    head: usize,
    r0: usize,
    at: usize,
    tid: usize,
    #[comptime] rows: usize,
    #[comptime] head_dim: usize,
    #[comptime] ld: usize,
    #[comptime] units: usize,
) {
    let len = t.shape(2);
    let base = b * t.stride(0) + head * t.stride(1);
    #[unroll]
    for u in 0..comptime!((rows * head_dim + units - 1) / units) {
        let li = tid + u * units;
        if li < comptime!(rows * head_dim) {
            let r = li / head_dim;
            let d = li % head_dim;
            let mut x = F::from_int(0);
            if r0 + r < len {
                x = t[base + (r0 + r) * t.stride(2) + d * t.stride(3)];
            }
            s[at + r * ld + d] = x;
        }
    }
}

/// The plane's 16 x [`KEY_TILE`] scores (queries `qf` times the keys staged in `stage` from row
/// 0) into its rows of `s_s`.
#[cube]
fn plane_scores<F: Float>(
    stage: &SharedMemory<F>,
    qf: &Sequence<cmma::Matrix<F>>,
    s_s: &mut SharedMemory<f32>,
    plane: usize,
    #[comptime] head_dim: usize,
) {
    let ld = comptime!(head_dim + 8);
    let end = comptime!(Q_TILE * (head_dim + 8));
    let s_end = comptime!(MMA_PLANES * 16 * S_LD);
    #[unroll]
    for n in 0..comptime!(KEY_TILE / 16) {
        let acc = zero_acc();
        #[unroll]
        for j in 0..comptime!(head_dim / 16) {
            // B = K^T: element (d, key) at `stage[key * ld + d]`, column-major.
            let kf = cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::B,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::ColMajor,
                &stage.slice(n * 16 * ld + j * 16, end),
                ld as u32,
            );
            cmma::execute::<F, F, f32, f32>(qf.index(j), &kf, &acc, &acc);
        }
        cmma::store(
            &mut s_s.slice_mut(plane * 16 * S_LD + n * 16, s_end),
            &acc,
            S_LD as u32,
            cmma::MatrixLayout::RowMajor,
        );
    }
}

/// Tensor-core causal flash attention for short inputs (fewer than 16 queries or keys), two
/// walks over the keys: the cube stages the queries, then each step's keys and values, in
/// shared memory (zeros past the ends). Cube `(query tile,
/// head, batch)`, units `(32, 4)`; `head_dim` a multiple of 16, at most [`MMA_MAX_HEAD_DIM`].
#[cube(launch_unchecked)]
pub fn flash_attention_mma_staged_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    scale: f32,
    #[comptime] head_dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    let q0 = CUBE_POS_X as usize * Q_TILE;
    let head = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize;
    let heads = q.shape(1);
    let kv = head / (heads / k.shape(1));
    let len_q = q.shape(2);
    let offset = k.shape(2) - len_q;
    let plane = UNIT_POS_Y as usize;
    let lane = UNIT_POS_X as usize;
    let tid = plane * MMA_PLANE + lane;
    let ld = comptime!(head_dim + 8);
    let end = comptime!(Q_TILE * (head_dim + 8));
    // The queries, then each step's keys (rows 0..KEY_TILE) and values (the next KEY_TILE).
    // 32-byte aligned: the fragments' loads and stores need 256-bit aligned addresses.
    let mut stage = SharedMemory::<F>::new_aligned(comptime!(Q_TILE * (head_dim + 8)), 32usize);
    let mut s_s = SharedMemory::<f32>::new_aligned(comptime!(MMA_PLANES * 16 * S_LD), 32usize);
    let mut p_s = SharedMemory::<F>::new_aligned(comptime!(MMA_PLANES * 16 * P_LD), 32usize);
    let p_end = comptime!(MMA_PLANES * 16 * P_LD);
    let s_end = comptime!(MMA_PLANES * 16 * S_LD);

    stage_rows::<F>(
        q, &mut stage, b, head, q0, 0, tid, Q_TILE, head_dim, ld, MMA_UNITS,
    );
    sync_cube();
    let mut qf = Sequence::<cmma::Matrix<F>>::new();
    #[unroll]
    for j in 0..comptime!(head_dim / 16) {
        qf.push(cmma::Matrix::<F>::from_slice(
            cmma::MatrixIdent::A,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::RowMajor,
            &stage.slice(plane * 16 * ld + j * 16, end),
            ld as u32,
        ));
    }
    sync_cube();

    // Each row's softmax statistics: two lanes per row, each over half of a tile's columns.
    let r = lane / 2;
    let half = lane % 2;
    let qpos = offset + q0 + plane * 16 + r;
    let s_row = plane * 16 * S_LD + r * S_LD + half * (KEY_TILE / 2);
    let keys = key_end(q0, len_q, offset);
    // A finite floor: exp(floor - finite) is 0 without an infinity in the arithmetic.
    let mut m = f32::new(-1.0e30);
    let mut l = f32::new(0.0);
    let mut k0 = 0usize;
    while k0 < keys {
        stage_rows::<F>(
            k, &mut stage, b, kv, k0, 0, tid, KEY_TILE, head_dim, ld, MMA_UNITS,
        );
        sync_cube();
        plane_scores::<F>(&stage, &qf, &mut s_s, plane, head_dim);
        sync_cube();
        let first = k0 + half * (KEY_TILE / 2);
        let mut tile_max = f32::new(-1.0e30);
        #[unroll]
        for c in 0..comptime!(KEY_TILE / 2) {
            if first + c <= qpos {
                tile_max = f32::max(tile_max, s_s[s_row + c] * scale);
            }
        }
        let m_new = f32::max(m, tile_max);
        let mut sum = f32::new(0.0);
        #[unroll]
        for c in 0..comptime!(KEY_TILE / 2) {
            if first + c <= qpos {
                sum += (s_s[s_row + c] * scale - m_new).exp();
            }
        }
        l = l * (m - m_new).exp() + sum;
        m = m_new;
        sync_cube();
        k0 += KEY_TILE;
    }
    let m_other = plane_shuffle_xor(m, 1);
    let l_other = plane_shuffle_xor(l, 1);
    let m_row = f32::max(m, m_other);
    let l_row = l * (m - m_row).exp() + l_other * (m_other - m_row).exp();
    let inv = 1.0 / l_row;

    let mut o = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..comptime!(head_dim / 16) {
        o.push(zero_acc());
    }
    let p_row = plane * 16 * P_LD + r * P_LD + half * (KEY_TILE / 2);
    k0 = 0;
    while k0 < keys {
        stage_rows::<F>(
            k, &mut stage, b, kv, k0, 0, tid, KEY_TILE, head_dim, ld, MMA_UNITS,
        );
        stage_rows::<F>(
            v,
            &mut stage,
            b,
            kv,
            k0,
            comptime!(KEY_TILE * (head_dim + 8)),
            tid,
            KEY_TILE,
            head_dim,
            ld,
            MMA_UNITS,
        );
        sync_cube();
        plane_scores::<F>(&stage, &qf, &mut s_s, plane, head_dim);
        sync_cube();
        let first = k0 + half * (KEY_TILE / 2);
        #[unroll]
        for c in 0..comptime!(KEY_TILE / 2) {
            let mut p = f32::new(0.0);
            if first + c <= qpos {
                p = (s_s[s_row + c] * scale - m_row).exp() * inv;
            }
            p_s[p_row + c] = F::cast_from(p);
        }
        sync_cube();
        #[unroll]
        for kk in 0..comptime!(KEY_TILE / 16) {
            let pf = cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::A,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &p_s.slice(plane * 16 * P_LD + kk * 16, p_end),
                P_LD as u32,
            );
            #[unroll]
            for j in 0..comptime!(head_dim / 16) {
                // B = V: element (key, d) at `stage[(KEY_TILE + key) * ld + d]`, row-major.
                let vf = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::B,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::RowMajor,
                    &stage.slice((KEY_TILE + kk * 16) * ld + j * 16, end),
                    ld as u32,
                );
                cmma::execute::<F, F, f32, f32>(&pf, &vf, o.index(j), o.index(j));
            }
        }
        sync_cube();
        k0 += KEY_TILE;
    }

    // The output, one 16 x 16 fragment at a time through the plane's rows of `s_s`.
    let row = q0 + plane * 16 + r;
    let out_base = b * out.stride(0) + head * out.stride(1) + row * out.stride(2);
    #[unroll]
    for j in 0..comptime!(head_dim / 16) {
        cmma::store(
            &mut s_s.slice_mut(plane * 16 * S_LD, s_end),
            o.index(j),
            S_LD as u32,
            cmma::MatrixLayout::RowMajor,
        );
        sync_cube();
        if row < len_q {
            #[unroll]
            for c in 0..8usize {
                let col = half * 8 + c;
                out[out_base + (j * 16 + col) * out.stride(3)] =
                    F::cast_from(s_s[plane * 16 * S_LD + r * S_LD + col]);
            }
        }
        sync_cube();
    }
}

/// Keys per step of [`flash_attention_mma_kernel`].
const DIRECT_KEYS: usize = 64;
/// Its row pitches of a plane's scores (f32) and probabilities (`F`), padded as `S_LD` and
/// `P_LD` are.
const DS_LD: usize = DIRECT_KEYS + 4;
const DP_LD: usize = DIRECT_KEYS + 8;
/// How far (in the softmax's exponent) a row's scores may pass its reference maximum before
/// the one-pass kernel moves it and rescales the output: probabilities up to e^8 ~ 3000.
const RESCALE_MARGIN: f32 = 8.0;

/// The plane's 16 x [`DIRECT_KEYS`] scores of the step from key `k0` into its rows of `s_s`,
/// the keys' fragments loaded from `k` in place. Blocks of 16 keys from `keys` on are skipped
/// (no query of the plane sees them); a block that would run past `len_k` is loaded from
/// `len_k - 16` instead (its keys before the block are masked by the caller).
#[cube]
#[allow(clippy::too_many_arguments)]
fn direct_scores<F: Float>(
    k: &Tensor<F>,
    qf: &Sequence<cmma::Matrix<F>>,
    s_s: &mut SharedMemory<f32>,
    k_at: usize,
    k0: usize,
    keys: usize,
    plane: usize,
    #[comptime] head_dim: usize,
) {
    let len_k = k.shape(2);
    let k_row = k.stride(2);
    let s_end = comptime!(MMA_PLANES * 16 * DS_LD);
    #[unroll]
    for n in 0..comptime!(DIRECT_KEYS / 16) {
        let blk = k0 + n * 16;
        if blk < keys {
            let start = block_within(blk, len_k);
            let acc = zero_acc();
            #[unroll]
            for j in 0..comptime!(head_dim / 16) {
                // B = K^T: element (d, key) at `k[key * k_row + d]`, column-major.
                let kf = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::B,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::ColMajor,
                    &k.slice(k_at + start * k_row + j * 16, k.len()),
                    u32::cast_from(k_row),
                );
                cmma::execute::<F, F, f32, f32>(qf.index(j), &kf, &acc, &acc);
            }
            cmma::store(
                &mut s_s.slice_mut(plane * 16 * DS_LD + n * 16, s_end),
                &acc,
                DS_LD as u32,
                cmma::MatrixLayout::RowMajor,
            );
        }
    }
}

/// The plane's output fragments `o` += its probabilities of the step from key `k0` (in `p_s`,
/// laid out as [`direct_scores`] lays out the scores) times the values, read in place.
#[cube]
#[allow(clippy::too_many_arguments)]
fn direct_pv<F: Float>(
    v: &Tensor<F>,
    p_s: &SharedMemory<F>,
    o: &Sequence<cmma::Matrix<f32>>,
    v_at: usize,
    k0: usize,
    keys: usize,
    plane: usize,
    #[comptime] head_dim: usize,
) {
    let len_k = v.shape(2);
    let v_row = v.stride(2);
    let p_end = comptime!(MMA_PLANES * 16 * DP_LD);
    #[unroll]
    for n in 0..comptime!(DIRECT_KEYS / 16) {
        let blk = k0 + n * 16;
        if blk < keys {
            let start = block_within(blk, len_k);
            let pf = cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::A,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &p_s.slice(plane * 16 * DP_LD + n * 16, p_end),
                DP_LD as u32,
            );
            #[unroll]
            for j in 0..comptime!(head_dim / 16) {
                // B = V: element (key, d) at `v[key * v_row + d]`, row-major.
                let vf = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::B,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::RowMajor,
                    &v.slice(v_at + start * v_row + j * 16, v.len()),
                    u32::cast_from(v_row),
                );
                cmma::execute::<F, F, f32, f32>(&pf, &vf, o.index(j), o.index(j));
            }
        }
    }
}

/// Where a block of 16 rows that should start at `start` is read: shifted back to end at
/// `len` where it would run past it (the caller masks the rows before `start`; `len >= 16`).
#[cube]
fn block_within(start: usize, len: usize) -> usize {
    let mut at = start;
    if at + 16 > len {
        at = len - 16;
    }
    at
}

/// The key of column `col` of a step from `k0` (see [`direct_scores`]) and whether the row at
/// position `qpos` sees it there.
#[cube]
fn direct_key(k0: usize, col: usize, keys: usize, len_k: usize, qpos: usize) -> (usize, bool) {
    let blk = k0 + (col / 16) * 16;
    let start = block_within(blk, len_k);
    let key = start + col % 16;
    (key, blk < keys && key >= blk && key <= qpos)
}

/// Tensor-core causal flash attention (module docs) with every fragment read in place: each
/// plane takes 16 query rows on its own (no shared staging, no cube-wide barrier) and walks only
/// the keys its rows see, `DIRECT_KEYS` (64) per step, loading the queries', keys' and values'
/// fragments from global memory (the four planes of a cube read the same keys, from L1). A
/// plane whose rows run past `len_q` takes the last 16 rows instead and writes only its own.
/// With `one_pass`, one walk instead of two: the probabilities are taken against a reference
/// maximum per row that moves only when a score passes it by more than `RESCALE_MARGIN` (8), and
/// the output fragments are rescaled through shared memory when it moves (rarely after the
/// first keys); the sum divides the output at the end.
/// Needs `len_q`, `len_k` >= 16, unit stride along `head_dim`, the other strides multiples of
/// 16 elements and 32-byte aligned buffers. Cube `(query tile, head, batch)`, units `(32, 4)`;
/// `head_dim` a multiple of 16, at most [`MMA_MAX_HEAD_DIM`].
#[cube(launch_unchecked)]
pub fn flash_attention_mma_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    scale: f32,
    #[comptime] head_dim: usize,
    #[comptime] one_pass: bool,
    #[define(F)] _dtype: StorageType,
) {
    let head = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize;
    let heads = q.shape(1);
    let kv = head / (heads / k.shape(1));
    let len_q = q.shape(2);
    let len_k = k.shape(2);
    let offset = len_k - len_q;
    let plane = UNIT_POS_Y as usize;
    let lane = UNIT_POS_X as usize;
    let mut s_s = SharedMemory::<f32>::new_aligned(comptime!(MMA_PLANES * 16 * DS_LD), 32usize);
    let mut p_s = SharedMemory::<F>::new_aligned(comptime!(MMA_PLANES * 16 * DP_LD), 32usize);
    let s_end = comptime!(MMA_PLANES * 16 * DS_LD);
    let own = CUBE_POS_X as usize * Q_TILE + plane * 16;
    if own < len_q {
        let first = block_within(own, len_q);
        let q_at = b * q.stride(0) + head * q.stride(1) + first * q.stride(2);
        let mut qf = Sequence::<cmma::Matrix<F>>::new();
        #[unroll]
        for j in 0..comptime!(head_dim / 16) {
            qf.push(cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::A,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &q.slice(q_at + j * 16, q.len()),
                u32::cast_from(q.stride(2)),
            ));
        }
        let k_at = b * k.stride(0) + kv * k.stride(1);
        let v_at = b * v.stride(0) + kv * v.stride(1);
        // Two lanes per row, each over half of a step's columns.
        let r = lane / 2;
        let half = lane % 2;
        let qpos = offset + first + r;
        let keys = offset + first + 16;
        let s_row = plane * 16 * DS_LD + r * DS_LD + half * (DIRECT_KEYS / 2);
        let p_row = plane * 16 * DP_LD + r * DP_LD + half * (DIRECT_KEYS / 2);

        let mut o = Sequence::<cmma::Matrix<f32>>::new();
        #[unroll]
        for _ in 0..comptime!(head_dim / 16) {
            o.push(zero_acc());
        }
        // What the output is multiplied by when written (1 / the row's sum with one pass).
        let mut out_scale = f32::new(1.0);
        if one_pass {
            let mut m = f32::new(-1.0e30);
            let mut l = f32::new(0.0);
            let mut k0 = 0usize;
            while k0 < keys {
                direct_scores::<F>(k, &qf, &mut s_s, k_at, k0, keys, plane, head_dim);
                sync_plane();
                let mut step_max = f32::new(-1.0e30);
                #[unroll]
                for c in 0..comptime!(DIRECT_KEYS / 2) {
                    let (_key, seen) =
                        direct_key(k0, half * (DIRECT_KEYS / 2) + c, keys, len_k, qpos);
                    if seen {
                        step_max = f32::max(step_max, s_s[s_row + c] * scale);
                    }
                }
                let row_max = f32::max(step_max, plane_shuffle_xor(step_max, 1));
                // The row's reference maximum moves only when a score passes it by more than
                // RESCALE_MARGIN: the probabilities stay below e^margin, and the output's rescaling
                // (through shared memory) is rare once the first keys are seen.
                let moves = row_max > m + RESCALE_MARGIN;
                let mut m_new = m;
                if moves {
                    m_new = row_max;
                }
                let alpha = (m - m_new).exp();
                let mut sum = f32::new(0.0);
                #[unroll]
                for c in 0..comptime!(DIRECT_KEYS / 2) {
                    let (_key, seen) =
                        direct_key(k0, half * (DIRECT_KEYS / 2) + c, keys, len_k, qpos);
                    let mut p = f32::new(0.0);
                    if seen {
                        p = (s_s[s_row + c] * scale - m_new).exp();
                    }
                    sum += p;
                    p_s[p_row + c] = F::cast_from(p);
                }
                l = l * alpha + sum;
                m = m_new;
                if plane_any(moves) {
                    #[unroll]
                    for j in 0..comptime!(head_dim / 16) {
                        sync_plane();
                        cmma::store(
                            &mut s_s.slice_mut(plane * 16 * DS_LD, s_end),
                            o.index(j),
                            DS_LD as u32,
                            cmma::MatrixLayout::RowMajor,
                        );
                        sync_plane();
                        #[unroll]
                        for c in 0..8usize {
                            let at = plane * 16 * DS_LD + r * DS_LD + half * 8 + c;
                            s_s[at] = s_s[at] * alpha;
                        }
                        sync_plane();
                        cmma::load_with_layout(
                            o.index(j),
                            &s_s.slice(plane * 16 * DS_LD, s_end),
                            DS_LD as u32,
                            cmma::MatrixLayout::RowMajor,
                        );
                    }
                }
                sync_plane();
                direct_pv::<F>(v, &p_s, &o, v_at, k0, keys, plane, head_dim);
                k0 += DIRECT_KEYS;
            }
            out_scale = 1.0 / (l + plane_shuffle_xor(l, 1));
        } else {
            // Pass 1: each row's softmax maximum and sum.
            let mut m = f32::new(-1.0e30);
            let mut l = f32::new(0.0);
            let mut k0 = 0usize;
            while k0 < keys {
                direct_scores::<F>(k, &qf, &mut s_s, k_at, k0, keys, plane, head_dim);
                sync_plane();
                let mut step_max = f32::new(-1.0e30);
                #[unroll]
                for c in 0..comptime!(DIRECT_KEYS / 2) {
                    let (_key, seen) =
                        direct_key(k0, half * (DIRECT_KEYS / 2) + c, keys, len_k, qpos);
                    if seen {
                        step_max = f32::max(step_max, s_s[s_row + c] * scale);
                    }
                }
                let m_new = f32::max(m, step_max);
                let mut sum = f32::new(0.0);
                #[unroll]
                for c in 0..comptime!(DIRECT_KEYS / 2) {
                    let (_key, seen) =
                        direct_key(k0, half * (DIRECT_KEYS / 2) + c, keys, len_k, qpos);
                    if seen {
                        sum += (s_s[s_row + c] * scale - m_new).exp();
                    }
                }
                l = l * (m - m_new).exp() + sum;
                m = m_new;
                sync_plane();
                k0 += DIRECT_KEYS;
            }
            let m_other = plane_shuffle_xor(m, 1);
            let l_other = plane_shuffle_xor(l, 1);
            let m_row = f32::max(m, m_other);
            let l_row = l * (m - m_row).exp() + l_other * (m_other - m_row).exp();
            let inv = 1.0 / l_row;

            // Pass 2: the probabilities, rounded to `F`, times the values.
            k0 = 0;
            while k0 < keys {
                direct_scores::<F>(k, &qf, &mut s_s, k_at, k0, keys, plane, head_dim);
                sync_plane();
                #[unroll]
                for c in 0..comptime!(DIRECT_KEYS / 2) {
                    let (_key, seen) =
                        direct_key(k0, half * (DIRECT_KEYS / 2) + c, keys, len_k, qpos);
                    let mut p = f32::new(0.0);
                    if seen {
                        p = (s_s[s_row + c] * scale - m_row).exp() * inv;
                    }
                    p_s[p_row + c] = F::cast_from(p);
                }
                sync_plane();
                direct_pv::<F>(v, &p_s, &o, v_at, k0, keys, plane, head_dim);
                k0 += DIRECT_KEYS;
            }
        }

        // The plane's own rows of the output, one fragment at a time through `s_s`.
        let row = first + r;
        let out_base = b * out.stride(0) + head * out.stride(1) + row * out.stride(2);
        #[unroll]
        for j in 0..comptime!(head_dim / 16) {
            sync_plane();
            cmma::store(
                &mut s_s.slice_mut(plane * 16 * DS_LD, s_end),
                o.index(j),
                DS_LD as u32,
                cmma::MatrixLayout::RowMajor,
            );
            sync_plane();
            if row >= own {
                #[unroll]
                for c in 0..8usize {
                    let col = half * 8 + c;
                    out[out_base + (j * 16 + col) * out.stride(3)] =
                        F::cast_from(s_s[plane * 16 * DS_LD + r * DS_LD + col] * out_scale);
                }
            }
        }
    }
}

/// Portable causal flash attention (module docs): cube `(query tile, head, batch)` of [`Q_TILE`]
/// units, one query row each, scores, softmax and output in f32 (online softmax).
#[cube(launch_unchecked)]
pub fn flash_attention_unit_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    scale: f32,
    #[comptime] head_dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    let q0 = CUBE_POS_X as usize * Q_TILE;
    let head = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize;
    let heads = q.shape(1);
    let kv = head / (heads / k.shape(1));
    let len_q = q.shape(2);
    let offset = k.shape(2) - len_q;
    let tid = UNIT_POS_X as usize;
    let row = q0 + tid;
    let qpos = offset + row;
    let mut qv = Array::<f32>::new(head_dim);
    let mut acc = Array::<f32>::new(head_dim);
    let q_base = b * q.stride(0) + head * q.stride(1) + row * q.stride(2);
    #[unroll]
    for d in 0..head_dim {
        qv[d] = 0.0;
        acc[d] = 0.0;
        if row < len_q {
            qv[d] = f32::cast_from(q[q_base + d * q.stride(3)]) * scale;
        }
    }
    let mut k_s = SharedMemory::<F>::new(comptime!(KEY_TILE * head_dim));
    let mut v_s = SharedMemory::<F>::new(comptime!(KEY_TILE * head_dim));
    let keys = key_end(q0, len_q, offset);
    let mut m = f32::new(-1.0e30);
    let mut l = f32::new(0.0);
    let mut k0 = 0usize;
    while k0 < keys {
        stage_rows::<F>(
            k, &mut k_s, b, kv, k0, 0, tid, KEY_TILE, head_dim, head_dim, Q_TILE,
        );
        stage_rows::<F>(
            v, &mut v_s, b, kv, k0, 0, tid, KEY_TILE, head_dim, head_dim, Q_TILE,
        );
        sync_cube();
        for j in 0..KEY_TILE {
            if k0 + j <= qpos && row < len_q {
                let mut s = f32::new(0.0);
                #[unroll]
                for d in 0..head_dim {
                    s += qv[d] * f32::cast_from(k_s[j * head_dim + d]);
                }
                let m_new = f32::max(m, s);
                let corr = (m - m_new).exp();
                let p = (s - m_new).exp();
                l = l * corr + p;
                #[unroll]
                for d in 0..head_dim {
                    acc[d] = acc[d] * corr + p * f32::cast_from(v_s[j * head_dim + d]);
                }
                m = m_new;
            }
        }
        sync_cube();
        k0 += KEY_TILE;
    }
    if row < len_q {
        let out_base = b * out.stride(0) + head * out.stride(1) + row * out.stride(2);
        #[unroll]
        for d in 0..head_dim {
            out[out_base + d * out.stride(3)] = F::cast_from(acc[d] / l);
        }
    }
}

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// Which kernel [`causal_attention`] runs for these inputs, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashKernel {
    /// [`flash_attention_mma_kernel`] (at least 16 queries and keys).
    TensorCores,
    /// [`flash_attention_mma_staged_kernel`] (fewer than 16 queries or keys, or
    /// `JAMBA_REFERENCE=attention_direct`).
    TensorCoresStaged,
    /// [`flash_attention_unit_kernel`].
    Units,
}

/// The kernel that takes `q` `[batch, heads, len_q, head_dim]` and `k`, `v` `[batch, kv_heads,
/// len_k, head_dim]` on this device, or `None` (shapes or dtypes the kernels do not take, or
/// both switched off by `JAMBA_REFERENCE=attention`).
pub fn flash_kernel<R, F, I, BT>(
    q: &BTensor<Cube<R, F, I, BT>, 4>,
    k: &BTensor<Cube<R, F, I, BT>, 4>,
    v: &BTensor<Cube<R, F, I, BT>, 4>,
) -> Option<FlashKernel>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = q.dtype();
    let [batch, heads, len_q, head_dim] = q.dims();
    let [kb, kv_heads, len_k, kd] = k.dims();
    let shapes_ok = kb == batch
        && kd == head_dim
        && v.dims() == k.dims()
        && batch > 0
        && heads > 0
        && kv_heads > 0
        && heads % kv_heads == 0
        && len_q > 0
        && len_q <= len_k
        && head_dim > 0
        && len_q.div_ceil(Q_TILE) <= 65535
        && heads <= 65535
        && batch <= 65535;
    if !shapes_ok
        || k.dtype() != dtype
        || v.dtype() != dtype
        || !dtype.is_float()
        || !super::use_kernel("attention")
    {
        return None;
    }
    let client = prim(q.clone()).client;
    let hardware = &client.properties().hardware;
    let shared = hardware.max_shared_memory_size;
    if matches!(dtype, DType::F16 | DType::BF16)
        && head_dim % 16 == 0
        && head_dim <= MMA_MAX_HEAD_DIM
        && hardware.plane_size_min == MMA_PLANE as u32
        && hardware.plane_size_max == MMA_PLANE as u32
        && super::use_kernel("attention_mma")
        && client.features().matmul.cmma.contains(&MmaConfig {
            a_type: StorageType::from(dtype),
            b_type: StorageType::from(dtype),
            cd_type: DType::F32.into(),
            m: 16,
            n: 16,
            k: 16,
        })
        && mma_shared_bytes(head_dim, dtype.size()).max(direct_shared_bytes(dtype.size())) <= shared
    {
        let direct = len_q >= 16 && len_k >= 16 && super::use_kernel("attention_direct");
        return Some(match direct {
            true => FlashKernel::TensorCores,
            false => FlashKernel::TensorCoresStaged,
        });
    }
    (head_dim <= UNIT_MAX_HEAD_DIM && 2 * KEY_TILE * head_dim * dtype.size() <= shared)
        .then_some(FlashKernel::Units)
}

/// Whether [`flash_attention_mma_kernel`] can load `t`'s 16 x 16 fragments in place: unit
/// stride along the last dimension, the other strides multiples of 16 elements and a 32-byte
/// aligned start (what the cooperative matrices' loads require).
fn fragments_in_place<R: CubeRuntime>(t: &CubeTensor<R>) -> bool {
    let strides = t.meta.strides();
    strides[3] == 1
        && strides[..3].iter().all(|s| s % 16 == 0)
        && t.handle.offset_start.unwrap_or(0).is_multiple_of(32)
}

/// Shared memory of the staged tensor-core kernel.
fn mma_shared_bytes(head_dim: usize, elem: usize) -> usize {
    Q_TILE * (head_dim + 8) * elem + MMA_PLANES * 16 * (S_LD * 4 + P_LD * elem)
}

/// Shared memory of the in-place tensor-core kernel.
fn direct_shared_bytes(elem: usize) -> usize {
    MMA_PLANES * 16 * (DS_LD * 4 + DP_LD * elem)
}

/// Causal attention of `q` over `k`, `v` (module docs) with `kernel`, output `[batch, heads,
/// len_q, head_dim]` in `q`'s dtype. `kernel` must be what [`flash_kernel`] chose for them.
pub fn causal_attention<R, F, I, BT>(
    q: BTensor<Cube<R, F, I, BT>, 4>,
    k: BTensor<Cube<R, F, I, BT>, 4>,
    v: BTensor<Cube<R, F, I, BT>, 4>,
    kernel: FlashKernel,
) -> BTensor<Cube<R, F, I, BT>, 4>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [batch, heads, len_q, head_dim] = q.dims();
    let dtype = q.dtype();
    let out = BTensor::<Cube<R, F, I, BT>, 4>::empty(
        [batch, heads, len_q, head_dim],
        (&q.device(), dtype),
    );
    let (mut q, mut k, mut v) = (prim(q), prim(k), prim(v));
    if kernel == FlashKernel::TensorCores {
        // The fragments are read in place: copies where the layout does not allow it.
        for t in [&mut q, &mut k, &mut v] {
            if !fragments_in_place(t) {
                *t = burn_cubecl::kernel::into_contiguous(t.clone());
            }
        }
    }
    let client = q.client.clone();
    let count = CubeCount::Static(len_q.div_ceil(Q_TILE) as u32, heads as u32, batch as u32);
    let mma_dim = CubeDim::new_2d(MMA_PLANE as u32, MMA_PLANES as u32);
    let scale = (head_dim as f32).powf(-0.5);
    unsafe {
        match kernel {
            FlashKernel::TensorCores => flash_attention_mma_kernel::launch_unchecked::<R>(
                &client,
                count,
                mma_dim,
                q.into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                prim(out.clone()).into_tensor_arg(),
                scale,
                head_dim,
                super::use_kernel("attention_one_pass"),
                dtype.into(),
            ),
            FlashKernel::TensorCoresStaged => {
                flash_attention_mma_staged_kernel::launch_unchecked::<R>(
                    &client,
                    count,
                    mma_dim,
                    q.into_tensor_arg(),
                    k.into_tensor_arg(),
                    v.into_tensor_arg(),
                    prim(out.clone()).into_tensor_arg(),
                    scale,
                    head_dim,
                    dtype.into(),
                )
            }
            FlashKernel::Units => flash_attention_unit_kernel::launch_unchecked::<R>(
                &client,
                count,
                CubeDim::new_1d(Q_TILE as u32),
                q.into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                prim(out.clone()).into_tensor_arg(),
                scale,
                head_dim,
                dtype.into(),
            ),
        }
    }
    out
}

/// Units per cube of [`causal_softmax_kernel`] (one cube per row of scores): a power of two, as
/// its reduction halves the cube.
const SOFTMAX_BLOCK: u32 = 256;

/// The causal softmax of a block of score rows in memory (attention through matmuls,
/// `cube::cublas`): `scores` holds `rows` rows of `row_len` f32 scores (already scaled) `pitch`
/// apart (a multiple of `N`), row `r` belonging to query `r % rows_per_head` of its head, which
/// sees the first `first_visible + r % rows_per_head` keys (at most `row_len`). `probs` (same
/// layout, the inputs' dtype) gets the softmax over the visible keys and 0 for the others up
/// to `row_len` (the padding between `row_len` and `pitch` may be loaded, masked off, and
/// written with zeros; no product reads it). One cube per
/// row, `N` scores per load: an online maximum and sum per unit, combined through shared
/// memory (no plane operations: any plane size).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn causal_softmax_kernel<F: Float, N: Size>(
    scores: &Tensor<Vector<f32, N>>,
    probs: &mut Tensor<Vector<F, N>>,
    rows: usize,
    rows_per_head: usize,
    row_len: usize,
    pitch: usize,
    first_visible: usize,
    #[comptime] block: u32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS_X as usize + CUBE_POS_Y as usize * CUBE_COUNT_X as usize;
    if row >= rows {
        terminate!();
    }
    let n = scores.vector_size();
    let tid = UNIT_POS_X as usize;
    let visible = usize::min(first_visible + row % rows_per_head, row_len);
    let base = row * (pitch / n);
    // A finite floor: exp(floor - floor) of a unit without keys is multiplied by its zero sum.
    let mut m = f32::new(-1.0e30);
    let mut l = f32::new(0.0);
    let mut j = tid;
    while j * n < visible {
        let xs = scores[base + j];
        #[unroll]
        for e in 0..N::value() {
            if j * n + e < visible {
                let x = xs[e];
                if x > m {
                    l = l * (m - x).exp() + 1.0;
                    m = x;
                } else {
                    l += (x - m).exp();
                }
            }
        }
        j += block as usize;
    }
    let mut sm = SharedMemory::<f32>::new(block as usize);
    let mut sl = SharedMemory::<f32>::new(block as usize);
    sm[tid] = m;
    sl[tid] = l;
    sync_cube();
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if tid < stride {
            let (m1, m2) = (sm[tid], sm[tid + stride]);
            let mx = f32::max(m1, m2);
            sl[tid] = sl[tid] * (m1 - mx).exp() + sl[tid + stride] * (m2 - mx).exp();
            sm[tid] = mx;
        }
        sync_cube();
        stride /= 2;
    }
    let mx = sm[0];
    let inv = 1.0 / sl[0];
    let mut j = tid;
    while j * n < row_len {
        let xs = scores[base + j];
        let mut p = Vector::<F, N>::cast_from(xs);
        #[unroll]
        for e in 0..N::value() {
            let v = if j * n + e < visible {
                (xs[e] - mx).exp() * inv
            } else {
                f32::new(0.0)
            };
            p[e] = F::cast_from(v);
        }
        probs[base + j] = p;
        j += block as usize;
    }
}

/// Launches [`causal_softmax_kernel`] on the first `rows` rows of `scores` (a flat f32
/// buffer, rows `pitch` apart) into the same span of `probs` (a flat buffer of the inputs'
/// dtype), loading the widest vectors that divide `pitch`.
pub(crate) fn launch_causal_softmax<R: CubeRuntime>(
    scores: &CubeTensor<R>,
    probs: &CubeTensor<R>,
    rows: usize,
    rows_per_head: usize,
    row_len: usize,
    pitch: usize,
    first_visible: usize,
) {
    let count = super::grid(rows, 1);
    let vector = super::aligned_vector_width(&[scores, probs], pitch);
    unsafe {
        causal_softmax_kernel::launch_unchecked::<R>(
            &scores.client,
            count,
            CubeDim::new_1d(SOFTMAX_BLOCK),
            vector,
            scores.clone().into_tensor_arg(),
            probs.clone().into_tensor_arg(),
            rows,
            rows_per_head,
            row_len,
            pitch,
            first_visible,
            SOFTMAX_BLOCK,
            probs.dtype.into(),
        );
    }
}

/// The causal softmax of `scores` `[heads, rows_per_head, row_len]` (f32, contiguous) into
/// `dtype`, query `i` of each head seeing the first `first_visible + i` keys: what the
/// matmul-based attention runs between its two products, exposed for the tests.
pub fn causal_softmax<R, F, I, BT>(
    scores: BTensor<Cube<R, F, I, BT>, 3>,
    first_visible: usize,
    dtype: DType,
) -> BTensor<Cube<R, F, I, BT>, 3>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [heads, rows_per_head, row_len] = scores.dims();
    let n = heads * rows_per_head * row_len;
    // Flat buffers: the kernel indexes rows of `row_len` without strides.
    let flat = scores.cast(DType::F32).reshape([n]);
    let scores = burn_cubecl::kernel::into_contiguous(prim(flat));
    let probs = BTensor::<Cube<R, F, I, BT>, 1>::empty([n], (&scores.device, dtype));
    launch_causal_softmax(
        &scores,
        &prim(probs.clone()),
        heads * rows_per_head,
        rows_per_head,
        row_len,
        row_len,
        first_visible,
    );
    probs.reshape([heads, rows_per_head, row_len])
}
