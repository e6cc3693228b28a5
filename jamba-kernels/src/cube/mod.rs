//! [`JambaBackend`] for Burn's CubeCL backends (CUDA, wgpu) with the kernels of [`kernels`].

// The kernel wrappers return tuples of backend tensors, spelled out generically.
#![allow(clippy::type_complexity)]

pub mod attention;
#[cfg(feature = "cublas")]
mod cublas;
mod decode;
pub mod kernels;
mod matmul;
mod moe;
pub mod moe_kernels;

use burn::tensor::{DType, Int, Tensor, TensorPrimitive};
use burn_cubecl::{
    cubecl::prelude::{CubeCount, CubeDim},
    tensor::CubeTensor,
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement,
};

use crate::{
    scan_chunk_len, CausalConv1dGrads, CausalConv1dInput, CausalConv1dUpdate, JambaBackend,
    MambaInProjStep, MambaStep, MoeGrads, MoeInput, ScanBackward, ScanForward, SelectiveScanGrads,
    SelectiveScanInput, SelectiveScanOutput, SelectiveStateUpdate,
};

/// Channels per cube of the scan kernels.
const SCAN_BLOCK: usize = 32;
/// The forward that splits the sequence between units ([`kernels::scan_fwd_seg_kernel`]) holds
/// all of a channel's states in one unit: it runs up to this `d_state`.
const SEG_MAX_STATE: usize = 16;
/// Channels per cube of that kernel.
const SEG_BLOCK: usize = 8;
/// Segments of a tile (units per channel) of that kernel, where its shared memory fits.
const SEG_SEGMENTS: usize = 32;
/// Compute units assumed where the device does not report them (every wgpu device: CubeCL's
/// wgpu runtime reports none): the chunked or split forward runs when the one-pass kernel would
/// have few cubes per compute unit. A low guess, so that they are taken only for grids that
/// surely leave a GPU idle.
const SEG_UNKNOWN_UNITS: usize = 16;
/// Below this many one-pass cubes per compute unit the chunked forward runs where it can, else
/// the one-pass forward gives each channel twice the units.
const FWD_WIDE_CUBES_PER_UNIT: usize = 2;
/// Positions per lane of the chunked forward ([`kernels::scan_fwd_chunk_kernel`]), at most:
/// the decays and inputs of that many positions stay in a lane's registers.
const CHUNK_SEG_LEN: usize = 8;
/// Units per cube of the chunked forward, at most (half of it for the backward): the channels
/// per cube follow (`JAMBA_SCAN_CHUNK_BLOCK` and `JAMBA_SCAN_BWD_BLOCK` set them instead).
const CHUNK_MAX_UNITS: usize = 1024;
/// Channels per cube of the chunked forward, at least, where its grid is small.
const CHUNK_MIN_BLOCK: usize = 16;

/// The launch of the chunked forward: lanes per channel (the plane size), positions per lane,
/// channels per cube.
#[derive(Clone, Copy, Debug)]
struct ChunkPlan {
    segs_log2: u32,
    seg_len: usize,
    block: usize,
}

/// How the chunked scan kernels run on this device for `d_state` (the forward, or the backward
/// with `backward`), or `None` where they cannot: the plane size must be fixed (a channel's
/// lanes are one plane), the saved states' chunk length a multiple of a lane's positions (and
/// for the backward a divisor of the tile), and the tile's inputs must fit in shared memory.
/// `grid` (batch rows, channels, compute units) sizes the forward's cubes to its grid.
/// `direct`: the kernels' direct mode (activations read and written in place, B and C of the
/// forward double-buffered), which needs other shared memory than the staged one.
fn chunk_plan(
    hardware: &burn_cubecl::cubecl::ir::HardwareProperties,
    d_state: usize,
    backward: bool,
    direct: bool,
    grid: Option<(usize, usize, usize)>,
) -> Option<ChunkPlan> {
    let plane = hardware.plane_size_min as usize;
    if plane != hardware.plane_size_max as usize || !plane.is_power_of_two() || plane < 4 {
        return None;
    }
    // The largest power of two up to CHUNK_SEG_LEN that divides the chunk length.
    let chunk = scan_chunk_len(d_state);
    let seg_len = (1usize << chunk.trailing_zeros()).min(CHUNK_SEG_LEN);
    let tile = plane * seg_len;
    if seg_len < 4 || (backward && !tile.is_multiple_of(chunk)) {
        return None;
    }
    // f32 words of shared memory at `block` channels per cube: the staged activations, B and C
    // by lane, and the per-channel state (the backward's also its dB, dC terms of one state,
    // double-buffered).
    let staged = |kinds: usize, block: usize| {
        if direct {
            kinds
        } else {
            kinds * tile * (block + 1)
        }
    };
    // B and C: per lane with a padding word, or in direct mode as vectors (the forward's
    // double-buffered); plus the placeholders of the other layout.
    let b_and_c = if !direct {
        2 * d_state * plane * (seg_len + 1) + 8
    } else if backward {
        2 * d_state * tile + 2
    } else {
        4 * d_state * tile + 2
    };
    let words = |block: usize| {
        if backward {
            staged(4, block) + b_and_c + 4 * block * tile + 3 * block * d_state
        } else {
            staged(3, block) + b_and_c + 3 * block * d_state
        }
    };
    // A margin for the alignment padding between the kernels' shared arrays.
    let fits = |block: usize| {
        plane * block <= hardware.max_units_per_cube as usize
            && plane * block <= hardware.max_cube_dim.0 as usize
            && 4 * (words(block) + 16) <= hardware.max_shared_memory_size
    };
    static FORCED: std::sync::OnceLock<[Option<usize>; 2]> = std::sync::OnceLock::new();
    let forced = FORCED.get_or_init(|| {
        ["JAMBA_SCAN_CHUNK_BLOCK", "JAMBA_SCAN_BWD_BLOCK"].map(|var| {
            let value = std::env::var(var).ok()?;
            let block = value
                .parse::<usize>()
                .ok()
                .filter(|b| (1..=1024).contains(b));
            if block.is_none() {
                eprintln!("{var}={value} ignored: channels per cube, 1 to 1024");
            }
            block
        })
    })[usize::from(backward)];
    // The largest cube up to the limit that fits: CUDA caps a unit's registers at 64 K / the
    // cube's units, so the largest cubes run the most units per multiprocessor. The backward
    // keeps more values per unit and stops at half the forward's units.
    let max_units = if backward {
        CHUNK_MAX_UNITS / 2
    } else {
        CHUNK_MAX_UNITS
    };
    let mut block = forced.unwrap_or((max_units / plane).max(1));
    while block > 1 && !fits(block) {
        block /= 2;
    }
    // A forward grid of fewer cubes than compute units takes cubes of half the channels, down to
    // CHUNK_MIN_BLOCK: on the H200 (bf16) 0.53 against 0.60 ms at (1, 2048, 4096), 1.91 against
    // 2.25 at (1, 1024, 16384).
    if let (None, Some((rows, d_inner, units))) = (forced, grid) {
        while block > CHUNK_MIN_BLOCK && rows * d_inner.div_ceil(block) < units {
            block /= 2;
        }
    }
    if !fits(block) {
        return None;
    }
    Some(ChunkPlan {
        segs_log2: plane.trailing_zeros(),
        seg_len,
        block,
    })
}

/// [`chunk_plan`] in direct mode where `direct` (the layout allows it) and its shared memory
/// fits, else in the staged mode (whose B and C take less at a large `d_state`), with the mode.
fn chunk_plan_mode(
    hardware: &burn_cubecl::cubecl::ir::HardwareProperties,
    d_state: usize,
    backward: bool,
    direct: bool,
    grid: Option<(usize, usize, usize)>,
) -> Option<(ChunkPlan, bool)> {
    direct
        .then(|| chunk_plan(hardware, d_state, backward, true, grid))
        .flatten()
        .map(|plan| (plan, true))
        .or_else(|| chunk_plan(hardware, d_state, backward, false, grid).map(|plan| (plan, false)))
}

/// At most this many units share a channel's states (the backward's; the forward's can double).
const MAX_SPLIT_LOG2: u32 = 3;

/// log2 of the units per channel: the largest power of two up to 8 that divides `d_state` and
/// fits in the smallest plane (so that a channel's units always share a plane).
fn split_log2(d_state: usize, plane_min: usize) -> u32 {
    split_log2_up_to(MAX_SPLIT_LOG2, d_state, plane_min)
}

/// [`split_log2`] for the one-pass forward: 16 units per channel (one more shuffle per position)
/// where its grid of `cubes` would hold fewer than 2 cubes per compute unit, 8 otherwise. On the
/// H200 (bf16, `d_state` 16, 132 units) 16 units took 1.19 ms against 1.71 at (1, 8192, 4096)
/// and 4.59 against 6.59 at (1, 8192, 16384) (256 cubes each), but 4.46 against 3.91 ms at
/// (4, 4096, 8192) (512 cubes) and 3.97 against 3.60 at (8, 8192, 2048) (2048 cubes).
/// `JAMBA_SCAN_FWD_SPLIT_LOG2` (at most 5) overrides the choice.
fn fwd_split_log2(d_state: usize, plane_min: usize, cubes: usize, units: usize) -> u32 {
    static MAX: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    let forced = *MAX.get_or_init(|| {
        std::env::var("JAMBA_SCAN_FWD_SPLIT_LOG2")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(|k: u32| k.min(5))
    });
    let max = forced.unwrap_or(if cubes < FWD_WIDE_CUBES_PER_UNIT * units {
        MAX_SPLIT_LOG2 + 1
    } else {
        MAX_SPLIT_LOG2
    });
    split_log2_up_to(max, d_state, plane_min)
}

fn split_log2_up_to(max: u32, d_state: usize, plane_min: usize) -> u32 {
    let mut k = max;
    while k > 0 && (!d_state.is_multiple_of(1 << k) || (1 << k) > plane_min) {
        k -= 1;
    }
    k
}
/// Units per cube of the element-wise conv kernels.
const ELEMWISE_BLOCK: u32 = 256;

fn prim<
    B: burn::tensor::backend::Backend<FloatTensorPrimitive = CubeTensor<R>>,
    R: CubeRuntime,
    const D: usize,
>(
    t: Tensor<B, D>,
) -> CubeTensor<R> {
    t.into_primitive().tensor()
}

fn wrap<
    B: burn::tensor::backend::Backend<FloatTensorPrimitive = CubeTensor<R>>,
    R: CubeRuntime,
    const D: usize,
>(
    t: CubeTensor<R>,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// An empty `[batch, d, len]` tensor stored like `like`: channel-last when `like`'s channel
/// stride is 1 (the model's views of `[batch, len, d]` activations), else contiguous.
fn empty_like_layout<B: burn::tensor::backend::Backend>(
    like: &Tensor<B, 3>,
    dtype: DType,
    channel_last: bool,
) -> Tensor<B, 3> {
    let [batch, d, len] = like.dims();
    let device = like.device();
    if channel_last {
        Tensor::<B, 3>::empty([batch, len, d], (&device, dtype)).swap_dims(1, 2)
    } else {
        Tensor::<B, 3>::empty([batch, d, len], (&device, dtype))
    }
}

/// Whether a `[batch, d, len]` tensor's positions are adjacent in memory (a time stride of 1,
/// or a single position).
fn time_contiguous<R: CubeRuntime>(t: &CubeTensor<R>) -> bool {
    t.meta.shape()[2] <= 1 || t.meta.strides()[2] == 1
}

/// Whether the chunked scan kernels may run in direct mode on these activations (the absent
/// ones skipped): all in time order, and the mode not switched off (`JAMBA_REFERENCE`).
fn direct_layout<R: CubeRuntime>(activations: &[Option<&CubeTensor<R>>]) -> bool {
    activations.iter().flatten().all(|t| time_contiguous(t)) && use_kernel("scan_direct")
}

fn is_channel_last<R: CubeRuntime>(t: &CubeTensor<R>) -> bool {
    let strides = t.meta.strides();
    strides[1] == 1 && strides[2] != 1
}

/// A placeholder for an absent optional argument (never read: its comptime flag is off). An
/// uninitialised allocation: no kernel runs to make it.
fn dummy<B: burn::tensor::backend::Backend, const D: usize>(device: &B::Device) -> Tensor<B, D> {
    dummy_of(device, DType::F32)
}

fn dummy_of<B: burn::tensor::backend::Backend, const D: usize>(
    device: &B::Device,
    dtype: DType,
) -> Tensor<B, D> {
    Tensor::empty([1; D], (device, dtype))
}

/// One kept placeholder per backend, device, dtype, rank, kind and `slot`, for the decoding
/// kernels: an allocation per absent argument and step costs the host more than the kernel's
/// launch gains. Arguments of one launch take different slots (a buffer is never bound twice);
/// placeholders are never read or written (their comptime flags are off).
fn kept<B, K, const D: usize>(
    device: &B::Device,
    dtype: Option<DType>,
    slot: usize,
    make: impl FnOnce() -> Tensor<B, D, K>,
) -> Tensor<B, D, K>
where
    B: burn::tensor::backend::Backend,
    K: burn::tensor::TensorKind<B> + 'static,
{
    use std::any::{Any, TypeId};
    type Entry = (TypeId, Option<DType>, usize, Box<dyn Any + Send + Sync>);
    static KEPT: std::sync::Mutex<Vec<Entry>> = std::sync::Mutex::new(Vec::new());
    let key = TypeId::of::<(B, K, [(); D])>();
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    let found = kept
        .iter()
        .filter(|(k, dt, sl, _)| *k == key && *dt == dtype && *sl == slot)
        .filter_map(|(.., t)| t.downcast_ref::<(B::Device, Tensor<B, D, K>)>())
        .find(|(dev, _)| dev == device)
        .map(|(_, t)| t.clone());
    found.unwrap_or_else(|| {
        let t = make();
        kept.push((key, dtype, slot, Box::new((device.clone(), t.clone()))));
        t
    })
}

/// A kept float placeholder (see [`kept`]).
fn kept_dummy<B: burn::tensor::backend::Backend, const D: usize>(
    device: &B::Device,
    dtype: DType,
    slot: usize,
) -> Tensor<B, D> {
    kept(device, Some(dtype), slot, || dummy_of(device, dtype))
}

/// A kept int placeholder (see [`kept`]).
fn kept_dummy_int<B: burn::tensor::backend::Backend, const D: usize>(
    device: &B::Device,
    slot: usize,
) -> Tensor<B, D, Int> {
    kept(device, None, slot, || Tensor::empty([1; D], device))
}

/// Units per cube of the decoding steps (one unit per channel): small cubes spread a batch
/// row's few thousand channels over many compute units.
const STEP_BLOCK: u32 = 64;

fn step_launch(n: usize) -> (CubeCount, CubeDim) {
    let cubes = n.div_ceil(STEP_BLOCK as usize).max(1) as u32;
    let x = cubes.min(65535);
    (
        CubeCount::Static(x, cubes.div_ceil(x), 1),
        CubeDim::new_1d(STEP_BLOCK),
    )
}

/// A grid of `rows` rows (the y axis, continued on z past 65535) of `width` units each (the x
/// axis, [`ELEMWISE_BLOCK`] per cube): kernels that index a unit by (row, column) without
/// dividing a flat index.
fn rows_launch(width: usize, rows: usize) -> (CubeCount, CubeDim) {
    let x = width.div_ceil(ELEMWISE_BLOCK as usize).max(1) as u32;
    let rows = rows.max(1) as u32;
    let y = rows.min(65535);
    (
        CubeCount::Static(x, y, rows.div_ceil(y)),
        CubeDim::new_1d(ELEMWISE_BLOCK),
    )
}

/// The widest vector (elements per load, among the client's optimized widths for the widest
/// dtype of `tensors`) that divides `width`, every stride of `tensors` but the last, and their
/// buffers' offsets (in elements of each tensor's dtype): what a kernel reading rows of `width`
/// adjacent elements in vectors of one lane count may use. The caller makes sure each tensor's
/// last stride is 1.
fn aligned_vector_width<R: CubeRuntime>(tensors: &[&CubeTensor<R>], width: usize) -> usize {
    let Some(first) = tensors.first() else {
        return 1;
    };
    let widest = tensors.iter().map(|t| t.dtype.size()).max().unwrap_or(1);
    first
        .client
        .io_optimized_vector_sizes(widest)
        .find(|&v| {
            width.is_multiple_of(v)
                && tensors.iter().all(|t| {
                    let strides = t.meta.strides();
                    let rows = &strides[..strides.len().saturating_sub(1)];
                    rows.iter().all(|s| s.is_multiple_of(v))
                        && (t.handle.offset_start.unwrap_or(0) as usize)
                            .is_multiple_of(v * t.dtype.size())
                })
        })
        .unwrap_or(1)
}

fn elemwise_launch(n: usize) -> (CubeCount, CubeDim) {
    let cubes = n.div_ceil(ELEMWISE_BLOCK as usize).max(1) as u32;
    // Stay under the 65535 limit of one grid dimension.
    let x = cubes.min(65535);
    let y = cubes.div_ceil(x);
    (CubeCount::Static(x, y, 1), CubeDim::new_1d(ELEMWISE_BLOCK))
}

/// Operations named in the `JAMBA_REFERENCE` environment variable (comma-separated: `scan`,
/// `conv`, `step`, `rms_norm`, `linear`, `moe` (the decoding MoE kernels: the grouped ones run
/// instead), `moe_grouped`, `moe_mma` (the portable grouped matmuls instead of the tensor-core
/// ones), `route`, `scan_chunk` (the forward scan that splits a channel's tiles between the lanes of
/// a plane), `scan_bwd_chunk` (its backward counterpart: the one-pass backward runs instead),
/// `swiglu` (the dense MLP's activation), `conv_vec` (the conv forward's kernel that reads
/// positions in vectors), `scan_direct` (the chunked scans stage every activation through shared memory even where
/// their time stride is 1), `scan_seg` (the forward scan that splits the sequence into segments walked twice;
/// without either, the one that walks each channel's sequence in one pass runs), `attention`, `attention_mma` (the portable flash attention instead of the
/// tensor-core one), `attention_direct` (the tensor-core flash attention from staged tiles), `attention_one_pass`
/// (its two passes over the keys instead of one), `attention_cublas` (the flash kernels instead of the
/// attention through cuBLAS), or `all`) run the tensor-op reference instead of the kernel: a switch to
/// isolate a kernel when results differ.
fn use_kernel(op: &str) -> bool {
    static DISABLED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let disabled = DISABLED.get_or_init(|| {
        std::env::var("JAMBA_REFERENCE")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    });
    !disabled.iter().any(|d| d == op || d == "all")
}

impl<R, F, I, BT> JambaBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    const KERNELS: bool = true;

    fn selective_scan(input: SelectiveScanInput<Self>) -> SelectiveScanOutput<Self> {
        if !use_kernel("scan") {
            return crate::reference::selective_scan(input);
        }
        scan_forward(&input, false).0
    }

    fn selective_scan_saving(
        input: &SelectiveScanInput<Self>,
    ) -> (SelectiveScanOutput<Self>, Tensor<Self, 4>) {
        let (out, chunks) = scan_forward(input, true);
        (out, chunks.expect("saving forward returns chunk states"))
    }

    fn selective_scan_backward(
        input: &SelectiveScanInput<Self>,
        chunk_states: Tensor<Self, 4>,
        grad_y: Tensor<Self, 3>,
    ) -> SelectiveScanGrads<Self> {
        scan_backward(input, chunk_states, grad_y)
    }

    fn causal_conv1d(input: CausalConv1dInput<Self>) -> Tensor<Self, 3> {
        if !use_kernel("conv") {
            return crate::reference::causal_conv1d(input);
        }
        conv_forward(&input)
    }

    fn causal_conv1d_backward(
        input: &CausalConv1dInput<Self>,
        grad_y: Tensor<Self, 3>,
    ) -> CausalConv1dGrads<Self> {
        conv_backward(input, grad_y)
    }

    fn selective_state_update(
        input: SelectiveStateUpdate<Self>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        if !use_kernel("step") {
            return crate::reference::selective_state_update(input);
        }
        scan_step(input)
    }

    fn mamba_in_proj_step(
        input: MambaInProjStep<Self>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 3>) {
        let [rows, hidden] = input.x.dims();
        let [two_d_inner, weight_hidden] = input.weight.dims();
        let [d_inner, width] = input.conv_weight.dims();
        let fits = rows > 0
            && rows <= crate::decode_max_rows()
            && decode::rows_fit(&prim(input.x.clone()), rows)
            && weight_hidden == hidden
            && two_d_inner == 2 * d_inner
            && width > 0
            && input.conv_state.dims() == [rows, d_inner, width - 1]
            && input
                .bias
                .as_ref()
                .is_none_or(|b| b.dims() == [two_d_inner])
            && input
                .conv_bias
                .as_ref()
                .is_none_or(|b| b.dims() == [d_inner]);
        if !fits || !use_kernel("linear") || !use_kernel("step") {
            return crate::reference::mamba_in_proj_step::<Self>(input);
        }
        decode::in_proj_conv(input)
    }

    fn mamba_step(input: MambaStep<Self>) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        let [batch, d_inner] = input.x.dims();
        let [rows, width] = input.params.dims();
        let [proj_rows, dt_rank] = input.dt_proj.dims();
        let [a_rows, n_state] = input.a.dims();
        let (dtype, w_dtype) = (input.x.dtype(), input.dt_proj.dtype());
        let norm_widths = input.norms.each_ref().map(|n| n.dims()[0]);
        let fits = batch > 0
            && batch <= 65535
            && d_inner > 0
            && rows == batch
            && proj_rows == d_inner
            && a_rows == d_inner
            && n_state > 0
            && dt_rank > 0
            && norm_widths == [dt_rank, n_state, n_state]
            && width == dt_rank + 2 * n_state
            && decode::mamba_step_fits(&prim(input.x.clone()), width)
            && input.state.dims() == [batch, d_inner, n_state]
            && input.d.dims() == [d_inner]
            && input
                .delta_bias
                .as_ref()
                .is_none_or(|b| b.dims() == [d_inner])
            && input.params.dtype() == dtype
            && input
                .z
                .as_ref()
                .is_none_or(|z| z.dims() == [batch, d_inner] && z.dtype() == dtype)
            // One dtype for activations and weights: the kernel rounds dt, B and C once, to
            // the norms' dtype (the separate operations would round them again to `x`'s).
            && w_dtype == dtype
            && input.norms.iter().all(|n| n.dtype() == w_dtype);
        if !fits || !["step", "rms_norm", "linear"].into_iter().all(use_kernel) {
            return crate::reference::mamba_step::<Self>(input);
        }
        let f32 = |t: Tensor<Self, 1>| crate::cast_to(t, DType::F32);
        decode::mamba_step(MambaStep {
            a: crate::cast_to(input.a, DType::F32),
            d: f32(input.d),
            delta_bias: input.delta_bias.map(f32),
            ..input
        })
    }

    fn rms_norm(x: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        if !use_kernel("rms_norm") {
            return crate::reference::rms_norm(x, weight, eps);
        }
        rms_norm(x, weight, eps)
    }

    fn add_rms_norm(
        residual: Tensor<Self, 2>,
        h: Tensor<Self, 2>,
        weight: Tensor<Self, 1>,
        eps: f64,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        if residual.dtype() != DType::F32
            || residual.dims() != h.dims()
            || weight.dims()[0] != residual.dims()[1]
            || !use_kernel("rms_norm")
        {
            return crate::reference::add_rms_norm(residual, h, weight, eps);
        }
        decode::add_rms_norm(residual, h, weight, eps)
    }

    fn rms_norms(
        x: Tensor<Self, 2>,
        weights: Vec<Tensor<Self, 1>>,
        eps: f64,
    ) -> Vec<Tensor<Self, 2>> {
        let width: usize = weights.iter().map(|w| w.dims()[0]).sum();
        if weights.is_empty()
            || weights.len() > 3
            || width != x.dims()[1]
            || weights.iter().any(|w| w.dtype() != weights[0].dtype())
            || !use_kernel("rms_norm")
        {
            return crate::reference::rms_norms(x, weights, eps);
        }
        if x.dims()[0] > crate::decode_max_rows() {
            // Many rows (prefill, training): the launches count little, and each segment's
            // norm kernel gets cubes as wide as the segment.
            return crate::reference::rms_norms(x, weights, eps);
        }
        decode::rms_norms(x, weights, eps)
    }

    fn swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        if gate.dims() != up.dims() || gate.dtype() != up.dtype() || !use_kernel("swiglu") {
            return crate::reference::swiglu(gate, up);
        }
        moe::swiglu_pair(gate, up)
    }

    fn swiglu_mlp(
        x: Tensor<Self, 2>,
        gate: Tensor<Self, 2>,
        up: Tensor<Self, 2>,
        down: Tensor<Self, 2>,
    ) -> Tensor<Self, 2> {
        let [rows, _] = x.dims();
        let dtype = x.dtype();
        if rows == 0
            || rows > crate::decode_max_rows()
            || !decode::rows_fit(&prim(x.clone()), rows)
            || [&gate, &up, &down].iter().any(|w| w.dtype() != dtype)
            || !use_kernel("mlp")
        {
            return crate::reference::swiglu_mlp::<Self>(x, gate, up, down);
        }
        decode::swiglu_rows(
            x,
            gate.unsqueeze_dim(0),
            up.unsqueeze_dim(0),
            0,
            down.unsqueeze_dim(0),
            decode::Routing::All,
        )
    }

    fn decode_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        len: usize,
    ) -> Tensor<Self, 4> {
        let [batch, heads, len_q, head_dim] = q.dims();
        let [kb, kv_heads, capacity, kd] = k.dims();
        if len_q != 1
            || len == 0
            || len > capacity
            || batch == 0
            || kb != batch
            || kd != head_dim
            || v.dims() != k.dims()
            || kv_heads == 0
            || heads % kv_heads != 0
            || heads > 65535
            || batch > 65535
            || !decode::attention_fits(&prim(q.clone()), head_dim)
            || k.dtype() != q.dtype()
            || v.dtype() != q.dtype()
            || !use_kernel("decode_attention")
        {
            return crate::reference::decode_attention(q, k, v, len);
        }
        decode::decode_attention(q, k, v, len)
    }

    fn causal_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        let [batch, heads, len_q, _] = q.dims();
        let len_k = k.dims()[2];
        let scores = batch * heads * len_q * len_k;
        #[cfg(feature = "cublas")]
        if len_q >= crate::cublas_attention_min_queries()
            && crate::matmul_routine() == Some(crate::CUBLAS_ROUTINE)
            && use_kernel("attention_cublas")
        {
            if let Some(out) =
                cublas::causal_attention(&prim(q.clone()), &prim(k.clone()), &prim(v.clone()))
            {
                return wrap(out);
            }
        }
        match attention::flash_kernel(&q, &k, &v) {
            Some(kernel)
                if crate::flash_attention_pays(scores, kernel != attention::FlashKernel::Units) =>
            {
                attention::causal_attention(q, k, v, kernel)
            }
            _ => crate::reference::causal_attention(q, k, v),
        }
    }

    fn linear(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, 2> {
        let [rows, _] = x.dims();
        if rows == 0
            || rows > crate::decode_max_rows()
            || !decode::rows_fit(&prim(x.clone()), rows)
            || !use_kernel("linear")
        {
            let weight_t = crate::cast_to(weight, x.dtype()).transpose();
            return match matmul::routine_matmul(&x, &weight_t) {
                Some(y) => match bias {
                    Some(b) => y + b.unsqueeze(),
                    None => y,
                },
                None => burn::tensor::module::linear(x, weight_t, bias),
            };
        }
        let dtype = x.dtype();
        decode::gemv(x, weight, bias, dtype)
    }

    fn linear_f32(x: Tensor<Self, 2>, weight: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let [rows, _] = x.dims();
        if rows == 0
            || rows > crate::decode_max_rows()
            || !decode::rows_fit(&prim(x.clone()), rows)
            || !use_kernel("linear")
        {
            return <Self as JambaBackend>::linear(crate::cast_to(x, DType::F32), weight, None);
        }
        decode::gemv(x, weight, None, DType::F32)
    }

    fn matmul(lhs: Tensor<Self, 2>, rhs: Tensor<Self, 2>) -> Tensor<Self, 2> {
        matmul::matmul(lhs, rhs)
    }

    fn moe_experts(
        x: Tensor<Self, 2>,
        gate_up: Tensor<Self, 3>,
        down: Tensor<Self, 3>,
        weights: Tensor<Self, 2>,
    ) -> Tensor<Self, 2> {
        let [rows, _] = x.dims();
        let dtype = x.dtype();
        if rows == 0
            || rows > crate::decode_max_rows()
            || !decode::rows_fit(&prim(x.clone()), rows)
            || gate_up.dtype() != dtype
            || down.dtype() != dtype
            || !use_kernel("moe")
        {
            return crate::reference::moe_experts(x, gate_up, down, weights);
        }
        moe_decode(
            x,
            gate_up,
            down,
            decode::Routing::Dense(weights.cast(dtype)),
        )
    }

    const GROUPED_MOE: bool = true;

    fn moe_route(logits: Tensor<Self, 2>, top_k: usize) -> (Tensor<Self, 2>, Tensor<Self, 2, Int>) {
        let [tokens, experts] = logits.dims();
        if !use_kernel("route") || tokens == 0 || top_k == 0 || top_k > experts {
            return crate::reference::moe_route(logits, top_k);
        }
        moe::route_topk(logits, top_k)
    }

    fn moe_router(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        top_k: usize,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 2, Int>) {
        let [tokens, hidden] = x.dims();
        let [experts, weight_hidden] = weight.dims();
        if tokens == 0
            || tokens > crate::decode_max_rows()
            || tokens > 65535
            || hidden != weight_hidden
            || top_k == 0
            || top_k > experts
            || experts > decode::ROUTER_MAX_EXPERTS
            || !use_kernel("route")
            || !use_kernel("linear")
        {
            return crate::reference::moe_router::<Self>(x, weight, top_k);
        }
        decode::router(x, weight, top_k)
    }

    fn moe_grouped(input: MoeInput<Self>) -> Tensor<Self, 2> {
        if !moe::supported(&input) {
            return crate::reference::moe_grouped(input);
        }
        let [tokens, _] = input.x.dims();
        if tokens <= crate::decode_max_rows()
            && decode::rows_fit(&prim(input.x.clone()), tokens)
            && use_kernel("moe")
        {
            // Decoding: the kernels that read only the routed experts' weights, straight from
            // the router's pairs.
            let routing = decode::Routing::Pairs {
                chosen: input.chosen,
                weights: input.weights,
                first: input.first,
            };
            return moe_decode(input.x, input.gate_up, input.down, routing);
        }
        if !use_kernel("moe_grouped") {
            return crate::reference::moe_grouped(input);
        }
        moe::moe_grouped(input)
    }

    fn moe_grouped_backward(input: &MoeInput<Self>, grad: Tensor<Self, 2>) -> MoeGrads<Self> {
        moe::moe_grouped_backward(input, grad)
    }

    fn causal_conv1d_update(input: CausalConv1dUpdate<Self>) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        if !use_kernel("step") {
            return crate::reference::causal_conv1d_update(input);
        }
        conv_step(input)
    }
}

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

fn scan_forward<R, F, I, BT>(
    input: &SelectiveScanInput<Cube<R, F, I, BT>>,
    save: bool,
) -> (
    SelectiveScanOutput<Cube<R, F, I, BT>>,
    Option<Tensor<Cube<R, F, I, BT>, 4>>,
)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = input.u.dtype();
    let f32 = DType::F32;
    let [batch, d_inner, len] = input.u.dims();
    let d_state = input.a.dims()[1];
    let device = input.u.device();
    let tile = scan_chunk_len(d_state);
    let chunks = len.div_ceil(tile);

    let u = prim(input.u.clone());
    let channel_last = is_channel_last(&u);
    let y = empty_like_layout(&input.u, dtype, channel_last);
    let last = Tensor::<Cube<R, F, I, BT>, 3>::empty([batch, d_inner, d_state], (&device, f32));
    let saved = if save {
        Tensor::<Cube<R, F, I, BT>, 4>::empty(
            [batch, d_inner, chunks.max(1), d_state],
            (&device, f32),
        )
    } else {
        dummy(&device)
    };
    let client = u.client.clone();
    let f = |t: &Tensor<Cube<R, F, I, BT>, 3>| prim(t.clone().cast(dtype));
    let z = input
        .z
        .as_ref()
        .map(f)
        .unwrap_or_else(|| prim(dummy_of::<Cube<R, F, I, BT>, 3>(&device, dtype)));
    let delta_bias = prim(
        input
            .delta_bias
            .clone()
            .map(|b| b.cast(f32))
            .unwrap_or_else(|| dummy(&device)),
    );
    let initial_state = prim(
        input
            .initial_state
            .clone()
            .map(|s| s.cast(f32))
            .unwrap_or_else(|| dummy(&device)),
    );
    let (delta, b, c) = (f(&input.delta), f(&input.b), f(&input.c));
    let (a, d) = (
        prim(input.a.clone().cast(f32)),
        prim(input.d.clone().cast(f32)),
    );
    let flags = (
        input.z.is_some(),
        input.delta_bias.is_some(),
        input.initial_state.is_some(),
        input.delta_softplus,
    );
    // The split forward's shared memory (`(2 * segs + 1) * block * d_state` f32) must fit the
    // device's: 33 KiB at 32 segments and d_state 16, over lavapipe's 32 KiB.
    let max_shared = client.properties().hardware.max_shared_memory_size;
    let mut segs = SEG_SEGMENTS;
    while segs > 1 && (2 * segs + 1) * SEG_BLOCK * d_state * 4 > max_shared {
        segs /= 2;
    }
    // Which forward, measured on the H200 (bf16; BENCHMARKS.md), by the cubes of the one-pass
    // grid (batch x d_inner / 32) against the 132 compute units:
    // - 256 cubes, (1, 8192, 4096): chunked 1.16 ms, one-pass (16 units per channel) 1.20,
    //   split 2.15; 64 cubes, (1, 2048, 4096): chunked 0.53, split 0.63, one-pass 0.91;
    //   32 cubes, (1, 1024, 16384): split 1.81, chunked 1.91, one-pass 3.47.
    // - 512 and 2048 cubes, (4, 4096, 8192) and (8, 8192, 2048): one-pass (8 units) 3.88 and
    //   3.60 ms, chunked 4.46 and 4.53.
    // Those are the chunked kernel staging its activations (the model's channel-last layout).
    // In its direct mode (a time stride of 1) it is the fastest at every one of these shapes:
    // 0.66, 0.27 and 0.88 ms at the first three, 2.42 and 2.43 at the last two.
    // The split kernel costs two exponentials per position and state; it runs where the chunked
    // one cannot (a device whose plane size varies) and the grid is small.
    let hardware = &client.properties().hardware;
    let one_pass_cubes = batch * d_inner.div_ceil(SCAN_BLOCK);
    let units = hardware
        .num_streaming_multiprocessors
        .map_or(SEG_UNKNOWN_UNITS, |n| n as usize);
    // The chunked kernels' direct mode where every activation has a time stride of 1 (`y`
    // takes the layout of `u`).
    let direct = direct_layout(&[Some(&u), Some(&delta), input.z.as_ref().map(|_| &z)]);
    let plan = chunk_plan_mode(
        hardware,
        d_state,
        false,
        direct,
        Some((batch, d_inner, units)),
    )
    .filter(|_| use_kernel("scan_chunk"));
    let direct = plan.is_some_and(|(_, direct)| direct);
    let chunked = plan.map(|(plan, _)| plan);
    let split_runs = d_state <= SEG_MAX_STATE && segs >= 4 && use_kernel("scan_seg");
    // The one-pass kernel fills the device from 2 cubes per compute unit (8 units per channel);
    // below, and in direct mode from a whole tile of positions (shorter sequences would leave
    // most of a channel's lanes idle), the chunked kernel runs where it can, else the split one
    // below 1 cube per unit.
    let fills = one_pass_cubes >= FWD_WIDE_CUBES_PER_UNIT * units;
    let kernel = match (crate::scan_forward(), chunked) {
        (ScanForward::Chunked, Some(_)) => ScanForward::Chunked,
        (ScanForward::Split, _) if split_runs => ScanForward::Split,
        (ScanForward::OnePass, _) => ScanForward::OnePass,
        (_, Some(plan)) if !fills || (direct && len >= plan.seg_len << plan.segs_log2) => {
            ScanForward::Chunked
        }
        (_, None) if split_runs && one_pass_cubes < units => ScanForward::Split,
        _ => ScanForward::OnePass,
    };
    crate::note_scan_run(kernel);
    if let (ScanForward::Chunked, Some(plan)) = (kernel, chunked) {
        unsafe {
            kernels::scan_fwd_chunk_kernel::launch_unchecked::<R>(
                &client,
                CubeCount::Static(d_inner.div_ceil(plan.block) as u32, batch as u32, 1),
                CubeDim::new_1d(((1usize << plan.segs_log2) * plan.block) as u32),
                u.into_tensor_arg(),
                delta.into_tensor_arg(),
                z.into_tensor_arg(),
                b.into_tensor_arg(),
                c.into_tensor_arg(),
                a.into_tensor_arg(),
                d.into_tensor_arg(),
                delta_bias.into_tensor_arg(),
                initial_state.into_tensor_arg(),
                prim(y.clone()).into_tensor_arg(),
                prim(last.clone()).into_tensor_arg(),
                prim(saved.clone()).into_tensor_arg(),
                d_state,
                plan.segs_log2,
                plan.seg_len,
                plan.block,
                // The chunk length of the saved states.
                tile,
                flags.0,
                flags.1,
                flags.2,
                flags.3,
                save,
                direct,
                dtype.into(),
            );
        }
    } else if kernel == ScanForward::Split {
        unsafe {
            kernels::scan_fwd_seg_kernel::launch_unchecked::<R>(
                &client,
                CubeCount::Static(d_inner.div_ceil(SEG_BLOCK) as u32, batch as u32, 1),
                CubeDim::new_2d(SEG_BLOCK as u32, segs as u32),
                u.into_tensor_arg(),
                delta.into_tensor_arg(),
                z.into_tensor_arg(),
                b.into_tensor_arg(),
                c.into_tensor_arg(),
                a.into_tensor_arg(),
                d.into_tensor_arg(),
                delta_bias.into_tensor_arg(),
                initial_state.into_tensor_arg(),
                prim(y.clone()).into_tensor_arg(),
                prim(last.clone()).into_tensor_arg(),
                prim(saved.clone()).into_tensor_arg(),
                d_state,
                tile,
                SEG_BLOCK,
                segs,
                flags.0,
                flags.1,
                flags.2,
                flags.3,
                save,
                dtype.into(),
            );
        }
    } else {
        let plane_min = client.properties().hardware.plane_size_min.max(1) as usize;
        let split = fwd_split_log2(d_state, plane_min, one_pass_cubes, units);
        unsafe {
            kernels::scan_fwd_kernel::launch_unchecked::<R>(
                &client,
                CubeCount::Static(d_inner.div_ceil(SCAN_BLOCK) as u32, batch as u32, 1),
                CubeDim::new_1d((SCAN_BLOCK << split) as u32),
                u.into_tensor_arg(),
                delta.into_tensor_arg(),
                z.into_tensor_arg(),
                b.into_tensor_arg(),
                c.into_tensor_arg(),
                a.into_tensor_arg(),
                d.into_tensor_arg(),
                delta_bias.into_tensor_arg(),
                initial_state.into_tensor_arg(),
                prim(y.clone()).into_tensor_arg(),
                prim(last.clone()).into_tensor_arg(),
                prim(saved.clone()).into_tensor_arg(),
                d_state,
                split,
                tile,
                SCAN_BLOCK,
                flags.0,
                flags.1,
                flags.2,
                flags.3,
                save,
                dtype.into(),
            );
        }
    }
    (
        SelectiveScanOutput {
            y,
            last_state: last,
        },
        save.then_some(saved),
    )
}

fn scan_backward<R, F, I, BT>(
    input: &SelectiveScanInput<Cube<R, F, I, BT>>,
    chunk_states: Tensor<Cube<R, F, I, BT>, 4>,
    grad_y: Tensor<Cube<R, F, I, BT>, 3>,
) -> SelectiveScanGrads<Cube<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    type T<R, F, I, BT, const D: usize> = Tensor<Cube<R, F, I, BT>, D>;
    let dtype = input.u.dtype();
    let f32 = DType::F32;
    let [batch, d_inner, len] = input.u.dims();
    let d_state = input.a.dims()[1];
    let device = input.u.device();
    let tile = scan_chunk_len(d_state);

    let u = prim(input.u.clone());
    let client = u.client.clone();
    let f = |t: &T<R, F, I, BT, 3>| prim(t.clone().cast(dtype));
    let channel_last = is_channel_last(&u);
    let delta = f(&input.delta);
    let mut dout = f(&grad_y);
    let z = input
        .z
        .as_ref()
        .map(f)
        .unwrap_or_else(|| prim(dummy_of::<Cube<R, F, I, BT>, 3>(&device, dtype)));
    // The chunked kernel's direct mode, as in the forward (the gradients take `u`'s layout).
    // The output gradient of a model whose scan ran in direct mode arrives channel-last (the
    // gradient of `y`'s transpose into `out_proj`): one copy puts it in time order.
    let direct = direct_layout(&[Some(&u), Some(&delta), input.z.as_ref().map(|_| &z)]);
    if direct && !time_contiguous(&dout) {
        dout = burn_cubecl::kernel::into_contiguous(dout);
    }
    let plan =
        chunk_plan_mode(&client.properties().hardware, d_state, true, direct, None).filter(|_| {
            use_kernel("scan_bwd_chunk") && crate::scan_backward() != ScanBackward::OnePass
        });
    let direct = plan.is_some_and(|(_, direct)| direct);
    let chunked = plan.map(|(plan, _)| plan);
    crate::note_scan_run(if chunked.is_some() {
        ScanBackward::Chunked
    } else {
        ScanBackward::OnePass
    });
    let plane_min = client.properties().hardware.plane_size_min.max(1) as usize;
    let split = split_log2(d_state, plane_min);
    let one_pass_cubes = d_inner.div_ceil(SCAN_BLOCK);

    let du = empty_like_layout(&input.u, dtype, channel_last);
    let ddelta = empty_like_layout(&input.u, dtype, channel_last);
    let dz = if input.z.is_some() {
        empty_like_layout(&input.u, dtype, channel_last)
    } else {
        dummy_of::<Cube<R, F, I, BT>, 3>(&device, dtype)
    };
    // The partial sums of dB and dC: per cube `[batch, cubes, d_state, len]` from the chunked
    // kernel (every element below `len` written), per plane `[batch, planes, len, d_state]`,
    // zero-filled, from the one-pass one (its writers store one position's states together).
    let (db_part, dc_part) = match chunked {
        Some(plan) => {
            let shape = [batch, d_inner.div_ceil(plan.block), d_state, len];
            (
                T::<R, F, I, BT, 4>::empty(shape, (&device, f32)),
                T::<R, F, I, BT, 4>::empty(shape, (&device, f32)),
            )
        }
        None => {
            let slots = (one_pass_cubes * (SCAN_BLOCK << split)).div_ceil(plane_min);
            let shape = [batch, slots, len, d_state];
            (
                T::<R, F, I, BT, 4>::zeros(shape, (&device, f32)),
                T::<R, F, I, BT, 4>::zeros(shape, (&device, f32)),
            )
        }
    };
    let da_part = T::<R, F, I, BT, 3>::empty([batch, d_inner, d_state], (&device, f32));
    let dd_part = T::<R, F, I, BT, 2>::empty([batch, d_inner], (&device, f32));
    let dbias_part = T::<R, F, I, BT, 2>::empty([batch, d_inner], (&device, f32));
    let dinit = T::<R, F, I, BT, 3>::empty([batch, d_inner, d_state], (&device, f32));

    let delta_bias = prim(
        input
            .delta_bias
            .clone()
            .map(|b| b.cast(f32))
            .unwrap_or_else(|| dummy(&device)),
    );
    let args = (
        u.into_tensor_arg(),
        delta.into_tensor_arg(),
        z.into_tensor_arg(),
        f(&input.b).into_tensor_arg(),
        f(&input.c).into_tensor_arg(),
        prim(input.a.clone().cast(f32)).into_tensor_arg(),
        prim(input.d.clone().cast(f32)).into_tensor_arg(),
        delta_bias.into_tensor_arg(),
        prim(chunk_states).into_tensor_arg(),
        dout.into_tensor_arg(),
    );
    let outs = (
        prim(du.clone()).into_tensor_arg(),
        prim(ddelta.clone()).into_tensor_arg(),
        prim(dz.clone()).into_tensor_arg(),
        prim(db_part.clone()).into_tensor_arg(),
        prim(dc_part.clone()).into_tensor_arg(),
        prim(da_part.clone()).into_tensor_arg(),
        prim(dd_part.clone()).into_tensor_arg(),
        prim(dbias_part.clone()).into_tensor_arg(),
        prim(dinit.clone()).into_tensor_arg(),
    );
    let flags = (
        input.z.is_some(),
        input.delta_bias.is_some(),
        input.delta_softplus,
    );
    match chunked {
        Some(plan) => unsafe {
            kernels::scan_bwd_chunk_kernel::launch_unchecked::<R>(
                &client,
                CubeCount::Static(d_inner.div_ceil(plan.block) as u32, batch as u32, 1),
                CubeDim::new_1d(((1usize << plan.segs_log2) * plan.block) as u32),
                args.0,
                args.1,
                args.2,
                args.3,
                args.4,
                args.5,
                args.6,
                args.7,
                args.8,
                args.9,
                outs.0,
                outs.1,
                outs.2,
                outs.3,
                outs.4,
                outs.5,
                outs.6,
                outs.7,
                outs.8,
                d_state,
                plan.segs_log2,
                plan.seg_len,
                plan.block,
                tile,
                flags.0,
                flags.1,
                flags.2,
                direct,
                dtype.into(),
            );
        },
        None => unsafe {
            kernels::scan_bwd_kernel::launch_unchecked::<R>(
                &client,
                CubeCount::Static(one_pass_cubes as u32, batch as u32, 1),
                CubeDim::new_1d((SCAN_BLOCK << split) as u32),
                args.0,
                args.1,
                args.2,
                args.3,
                args.4,
                args.5,
                args.6,
                args.7,
                args.8,
                args.9,
                outs.0,
                outs.1,
                outs.2,
                outs.3,
                outs.4,
                outs.5,
                outs.6,
                outs.7,
                outs.8,
                d_state,
                split,
                tile,
                SCAN_BLOCK,
                flags.0,
                flags.1,
                flags.2,
                dtype.into(),
            );
        },
    }
    // Over the cubes or planes, to `[batch, d_state, len]`.
    let sum_parts = |p: T<R, F, I, BT, 4>| {
        let sum = p.sum_dim(1).squeeze_dim::<3>(1);
        if chunked.is_some() {
            sum
        } else {
            sum.swap_dims(1, 2)
        }
    };
    SelectiveScanGrads {
        u: du,
        delta: ddelta.cast(input.delta.dtype()),
        a: da_part.sum_dim(0).squeeze_dim::<2>(0).cast(input.a.dtype()),
        b: sum_parts(db_part).cast(input.b.dtype()),
        c: sum_parts(dc_part).cast(input.c.dtype()),
        d: dd_part.sum_dim(0).squeeze_dim::<1>(0).cast(input.d.dtype()),
        z: input.z.as_ref().map(|z| dz.cast(z.dtype())),
        delta_bias: input
            .delta_bias
            .as_ref()
            .map(|b| dbias_part.sum_dim(0).squeeze_dim::<1>(0).cast(b.dtype())),
        initial_state: input.initial_state.as_ref().map(|s| dinit.cast(s.dtype())),
    }
}

fn conv_args<R, F, I, BT>(
    input: &CausalConv1dInput<Cube<R, F, I, BT>>,
) -> (
    CubeTensor<R>,
    CubeTensor<R>,
    CubeTensor<R>,
    CubeTensor<R>,
    usize,
)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let f32 = DType::F32;
    let device = input.x.device();
    let width = input.weight.dims()[1];
    (
        prim(input.x.clone()),
        prim(input.weight.clone().cast(f32)),
        prim(
            input
                .bias
                .clone()
                .map(|b| b.cast(f32))
                .unwrap_or_else(|| dummy(&device)),
        ),
        prim(
            input
                .initial_state
                .clone()
                .map(|s| s.cast(f32))
                .unwrap_or_else(|| dummy(&device)),
        ),
        width,
    )
}

fn conv_forward<R, F, I, BT>(
    input: &CausalConv1dInput<Cube<R, F, I, BT>>,
) -> Tensor<Cube<R, F, I, BT>, 3>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = input.x.dtype();
    let [batch, d, len] = input.x.dims();
    let (x, w, b, init, width) = conv_args(input);
    let channel_last = is_channel_last(&x);
    let y = empty_like_layout(&input.x, dtype, channel_last);
    let client = x.client.clone();
    let strides = x.meta.strides();
    // Positions adjacent in memory (the prefill's channels-major layout): vectors of positions.
    if !channel_last && strides[2] == 1 && len > 0 {
        let y_p = prim(y.clone());
        let vector = aligned_vector_width(&[&x, &y_p], len);
        if vector > 1 && width >= 2 && vector + 1 >= width && use_kernel("conv_vec") {
            let (count, dim) = rows_launch(len / vector, batch * d);
            unsafe {
                kernels::conv_fwd_vec_kernel::launch_unchecked::<R>(
                    &client,
                    count,
                    dim,
                    vector,
                    x.into_tensor_arg(),
                    w.into_tensor_arg(),
                    b.into_tensor_arg(),
                    init.into_tensor_arg(),
                    y_p.into_tensor_arg(),
                    width,
                    input.bias.is_some(),
                    input.initial_state.is_some(),
                    input.silu,
                    dtype.into(),
                );
            }
            return y;
        }
    }
    // The kernel's choice of fast axis, made here for its grid.
    let channel_fast = strides[1] == 1 || strides[2] != 1;
    let (fast, slow) = if channel_fast { (d, len) } else { (len, d) };
    let (count, dim) = rows_launch(fast, batch * slow);
    unsafe {
        kernels::conv_fwd_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            b.into_tensor_arg(),
            init.into_tensor_arg(),
            prim(y.clone()).into_tensor_arg(),
            width,
            input.bias.is_some(),
            input.initial_state.is_some(),
            input.silu,
            channel_fast,
            dtype.into(),
        );
    }
    y
}

fn conv_backward<R, F, I, BT>(
    input: &CausalConv1dInput<Cube<R, F, I, BT>>,
    grad_y: Tensor<Cube<R, F, I, BT>, 3>,
) -> CausalConv1dGrads<Cube<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = input.x.dtype();
    let f32 = DType::F32;
    let [batch, d, len] = input.x.dims();
    let device = input.x.device();
    let (x, w, b, init, width) = conv_args(input);
    let channel_last = is_channel_last(&x);
    let client = x.client.clone();
    let dy = prim(grad_y.cast(dtype));
    let dx = empty_like_layout(&input.x, dtype, channel_last);
    let dinit = Tensor::<Cube<R, F, I, BT>, 3>::empty([batch, d, width.max(2) - 1], (&device, f32));
    let dw_part = Tensor::<Cube<R, F, I, BT>, 3>::empty([batch, d, width + 1], (&device, f32));

    let (count, dim) = elemwise_launch(batch * d * (len + width - 1));
    unsafe {
        kernels::conv_bwd_input_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            x.clone().into_tensor_arg(),
            w.clone().into_tensor_arg(),
            b.clone().into_tensor_arg(),
            init.clone().into_tensor_arg(),
            dy.clone().into_tensor_arg(),
            prim(dx.clone()).into_tensor_arg(),
            prim(dinit.clone()).into_tensor_arg(),
            width,
            input.bias.is_some(),
            input.initial_state.is_some(),
            input.silu,
            dtype.into(),
        );
    }
    let (count, dim) = elemwise_launch(batch * d);
    unsafe {
        kernels::conv_bwd_weight_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            b.into_tensor_arg(),
            init.into_tensor_arg(),
            dy.into_tensor_arg(),
            prim(dw_part.clone()).into_tensor_arg(),
            width,
            input.bias.is_some(),
            input.initial_state.is_some(),
            input.silu,
            dtype.into(),
        );
    }
    let dw = dw_part.sum_dim(0).squeeze_dim::<2>(0); // [d, width + 1]
    CausalConv1dGrads {
        x: dx,
        weight: dw.clone().narrow(1, 0, width).cast(input.weight.dtype()),
        bias: input
            .bias
            .as_ref()
            .map(|b| dw.narrow(1, width, 1).reshape([d]).cast(b.dtype())),
        initial_state: input
            .initial_state
            .as_ref()
            .map(|s| dinit.narrow(2, 0, width - 1).cast(s.dtype())),
    }
}

/// `t` as an f32 buffer this call may overwrite: itself when it is the only reference to its
/// storage, else a copy.
fn writable_f32<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    let t = if t.dtype == DType::F32 {
        t
    } else {
        burn_cubecl::kernel::cast(t, DType::F32)
    };
    if !t.is_contiguous() {
        burn_cubecl::kernel::into_contiguous(t)
    } else if t.can_mut() {
        t
    } else {
        t.copy()
    }
}

fn scan_step<R, F, I, BT>(
    input: SelectiveStateUpdate<Cube<R, F, I, BT>>,
) -> (Tensor<Cube<R, F, I, BT>, 2>, Tensor<Cube<R, F, I, BT>, 3>)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = input.x.dtype();
    let f32 = DType::F32;
    let [batch, d_inner] = input.x.dims();
    let d_state = input.a.dims()[1];
    let device = input.x.device();
    let state = writable_f32(prim(input.state));
    let y = Tensor::<Cube<R, F, I, BT>, 2>::empty([batch, d_inner], (&device, dtype));
    let client = state.client.clone();
    let f = |t: Tensor<Cube<R, F, I, BT>, 2>| prim(t.cast(dtype));
    let (count, dim) = step_launch(batch * d_inner);
    let has_z = input.z.is_some();
    let has_bias = input.delta_bias.is_some();
    unsafe {
        kernels::scan_step_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            f(input.x).into_tensor_arg(),
            f(input.delta).into_tensor_arg(),
            f(input.z.unwrap_or_else(|| dummy_of(&device, dtype))).into_tensor_arg(),
            f(input.b).into_tensor_arg(),
            f(input.c).into_tensor_arg(),
            prim(input.a.cast(f32)).into_tensor_arg(),
            prim(input.d.cast(f32)).into_tensor_arg(),
            prim(
                input
                    .delta_bias
                    .map(|b| b.cast(f32))
                    .unwrap_or_else(|| dummy(&device)),
            )
            .into_tensor_arg(),
            state.clone().into_tensor_arg(),
            prim(y.clone()).into_tensor_arg(),
            d_state,
            has_z,
            has_bias,
            input.delta_softplus,
            dtype.into(),
        );
    }
    (y, wrap(state))
}

fn conv_step<R, F, I, BT>(
    input: CausalConv1dUpdate<Cube<R, F, I, BT>>,
) -> (Tensor<Cube<R, F, I, BT>, 2>, Tensor<Cube<R, F, I, BT>, 3>)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = input.x.dtype();
    let f32 = DType::F32;
    let [batch, d] = input.x.dims();
    let width = input.weight.dims()[1];
    let device = input.x.device();
    let state = writable_f32(prim(input.state));
    let y = Tensor::<Cube<R, F, I, BT>, 2>::empty([batch, d], (&device, dtype));
    let client = state.client.clone();
    let (count, dim) = step_launch(batch * d);
    let has_bias = input.bias.is_some();
    unsafe {
        kernels::conv_step_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            prim(input.x).into_tensor_arg(),
            prim(input.weight.cast(f32)).into_tensor_arg(),
            prim(
                input
                    .bias
                    .map(|b| b.cast(f32))
                    .unwrap_or_else(|| dummy(&device)),
            )
            .into_tensor_arg(),
            state.clone().into_tensor_arg(),
            prim(y.clone()).into_tensor_arg(),
            width,
            has_bias,
            input.silu,
            dtype.into(),
        );
    }
    (y, wrap(state))
}

/// Units per cube of the RMSNorm kernel (a power of two).
const NORM_UNITS: usize = 256;

fn rms_norm<R, F, I, BT>(
    x: Tensor<Cube<R, F, I, BT>, 2>,
    weight: Tensor<Cube<R, F, I, BT>, 1>,
    eps: f64,
) -> Tensor<Cube<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [rows, dim] = x.dims();
    let (x_dtype, w_dtype) = (x.dtype(), weight.dtype());
    let out = Tensor::<Cube<R, F, I, BT>, 2>::empty([rows, dim], (&x.device(), w_dtype));
    if rows == 0 {
        return out;
    }
    let units = NORM_UNITS.min(dim.next_power_of_two()).max(1);
    let x = prim(x);
    let client = x.client.clone();
    let gx = (rows as u32).min(65535);
    let gy = (rows as u32).div_ceil(gx);
    unsafe {
        kernels::rms_norm_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(gx, gy, 1),
            CubeDim::new_1d(units as u32),
            x.into_tensor_arg(),
            prim(weight).into_tensor_arg(),
            prim(out.clone()).into_tensor_arg(),
            eps as f32,
            units,
            [x_dtype.into(), w_dtype.into()],
        );
    }
    out
}

/// A grid of `cubes` cubes (2-D when one dimension would pass 65535).
fn grid(cubes: usize, y: u32) -> CubeCount {
    let cubes = cubes.max(1) as u32;
    if y == 1 {
        let x = cubes.min(65535);
        CubeCount::Static(x, cubes.div_ceil(x), 1)
    } else {
        CubeCount::Static(cubes, y, 1)
    }
}

fn moe_decode<R, F, I, BT>(
    x: Tensor<Cube<R, F, I, BT>, 2>,
    gate_up: Tensor<Cube<R, F, I, BT>, 3>,
    down: Tensor<Cube<R, F, I, BT>, 3>,
    routing: decode::Routing<Cube<R, F, I, BT>>,
) -> Tensor<Cube<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [_, two_i, _] = gate_up.dims();
    decode::swiglu_rows(x, gate_up.clone(), gate_up, two_i / 2, down, routing)
}

/// Causal attention of `q` over `k`, `v` with this crate's flash kernels
/// ([`attention::flash_kernel`] says which), whatever the size; `None` where neither takes the
/// inputs (the caller then runs the reference). See [`JambaBackend::causal_attention`].
pub fn flash_attention<R, F, I, BT>(
    q: &Tensor<CubeBackend<R, F, I, BT>, 4>,
    k: &Tensor<CubeBackend<R, F, I, BT>, 4>,
    v: &Tensor<CubeBackend<R, F, I, BT>, 4>,
) -> Option<Tensor<CubeBackend<R, F, I, BT>, 4>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let kernel = attention::flash_kernel(q, k, v)?;
    Some(attention::causal_attention(
        q.clone(),
        k.clone(),
        v.clone(),
        kernel,
    ))
}
