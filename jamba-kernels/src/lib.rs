//! Jamba's Mamba and decoding operations as a Burn backend extension.
//!
//! The Jamba model calls these through [`JambaBackend`] and never learns which backend runs them.
//! Every backend gets the tensor-op implementations in [`reference`] (which are also the test
//! oracle). The CubeCL backends (CUDA, wgpu) override them with the kernels of [`cube`] (feature
//! `cube`, enabled by `wgpu` and `cuda`), `Fusion<B>` registers those as custom operations, and
//! `Autodiff<B>` differentiates the scan and the conv with their backward kernels. A
//! [`Composite`] groups several of these operations (a decoding step of a whole layer) into
//! one, which a fused backend registers once.

pub mod composite;
pub mod reference;

#[cfg(feature = "autodiff")]
mod autodiff;
#[cfg(feature = "cube")]
pub mod cube;
#[cfg(feature = "cube")]
mod fusion;

use burn::tensor::{backend::Backend, DType, Int, Tensor};

pub use composite::{Args, Composite};

/// `t` in `dtype`; no operation where it already is (a fused backend would record one).
pub(crate) fn cast_to<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(dtype)
    }
}

/// Inputs of the Mamba-1 selective scan, in mamba-ssm's layout (channels before time).
///
/// Shapes: `u`, `delta`, `z`: `[batch, d_inner, len]`; `b`, `c`: `[batch, d_state, len]`;
/// `a`: `[d_inner, d_state]`; `d`, `delta_bias`: `[d_inner]`; `initial_state`: `[batch, d_inner, d_state]`.
#[derive(Debug, Clone)]
pub struct SelectiveScanInput<B: Backend> {
    /// The input sequence (post conv and SiLU in Mamba).
    pub u: Tensor<B, 3>,
    /// The time step before `delta_bias` and softplus.
    pub delta: Tensor<B, 3>,
    /// The (negative) state matrix `A = -exp(A_log)`.
    pub a: Tensor<B, 2>,
    /// Input projection onto the state, per position.
    pub b: Tensor<B, 3>,
    /// Output projection from the state, per position.
    pub c: Tensor<B, 3>,
    /// Skip connection weight.
    pub d: Tensor<B, 1>,
    /// Gate: the output is multiplied by `silu(z)` when present.
    pub z: Option<Tensor<B, 3>>,
    /// Added to `delta` before the softplus.
    pub delta_bias: Option<Tensor<B, 1>>,
    /// Apply `softplus` (threshold 20, as PyTorch and mamba-ssm) to `delta + delta_bias`.
    pub delta_softplus: bool,
    /// The state to continue from (zeros when absent), f32.
    pub initial_state: Option<Tensor<B, 3>>,
}

/// Outputs of the selective scan.
#[derive(Debug, Clone)]
pub struct SelectiveScanOutput<B: Backend> {
    /// `[batch, d_inner, len]` in the dtype of `u`.
    pub y: Tensor<B, 3>,
    /// The state after the last position, `[batch, d_inner, d_state]`, f32.
    pub last_state: Tensor<B, 3>,
}

/// Inputs of the depthwise causal convolution.
///
/// Shapes: `x`: `[batch, channels, len]`; `weight`: `[channels, width]`; `bias`: `[channels]`;
/// `initial_state`: `[batch, channels, width - 1]`, the inputs that precede `x`.
#[derive(Debug, Clone)]
pub struct CausalConv1dInput<B: Backend> {
    pub x: Tensor<B, 3>,
    pub weight: Tensor<B, 2>,
    pub bias: Option<Tensor<B, 1>>,
    pub initial_state: Option<Tensor<B, 3>>,
    /// Apply SiLU to the output.
    pub silu: bool,
}

/// Gradients of the selective scan w.r.t. each input, in that input's dtype.
#[derive(Debug, Clone)]
pub struct SelectiveScanGrads<B: Backend> {
    pub u: Tensor<B, 3>,
    /// W.r.t. the raw `delta` (before `delta_bias` and softplus).
    pub delta: Tensor<B, 3>,
    pub a: Tensor<B, 2>,
    pub b: Tensor<B, 3>,
    pub c: Tensor<B, 3>,
    pub d: Tensor<B, 1>,
    pub z: Option<Tensor<B, 3>>,
    pub delta_bias: Option<Tensor<B, 1>>,
    pub initial_state: Option<Tensor<B, 3>>,
}

/// Gradients of the causal conv1d w.r.t. each input, in that input's dtype.
#[derive(Debug, Clone)]
pub struct CausalConv1dGrads<B: Backend> {
    pub x: Tensor<B, 3>,
    pub weight: Tensor<B, 2>,
    pub bias: Option<Tensor<B, 1>>,
    pub initial_state: Option<Tensor<B, 3>>,
}

/// One decoding position of the selective scan (`selective_state_update` in mamba-ssm).
///
/// Shapes: `x`, `delta`, `z`: `[batch, d_inner]`; `b`, `c`: `[batch, d_state]`; the rest as in
/// [`SelectiveScanInput`]; `state`: `[batch, d_inner, d_state]` f32, consumed and returned updated
/// (in place where the backend can).
#[derive(Debug, Clone)]
pub struct SelectiveStateUpdate<B: Backend> {
    pub state: Tensor<B, 3>,
    pub x: Tensor<B, 2>,
    pub delta: Tensor<B, 2>,
    pub a: Tensor<B, 2>,
    pub b: Tensor<B, 2>,
    pub c: Tensor<B, 2>,
    pub d: Tensor<B, 1>,
    pub z: Option<Tensor<B, 2>>,
    pub delta_bias: Option<Tensor<B, 1>>,
    pub delta_softplus: bool,
}

/// One decoding position of the Mamba mixer's input side: `xz = x @ weight^T (+ bias)`
/// (`in_proj`), then the conv's decoding step with SiLU ([`CausalConv1dUpdate`]) on the first
/// half of `xz`. Backends with kernels run both as one kernel (the conv step is the product's
/// epilogue: one launch instead of two).
///
/// Shapes: `x` `[batch, hidden]`; `weight` `[2 d_inner, hidden]`; `bias` `[2 d_inner]`;
/// `conv_state` `[batch, d_inner, width - 1]` f32; `conv_weight` `[d_inner, width]`;
/// `conv_bias` `[d_inner]`.
#[derive(Debug, Clone)]
pub struct MambaInProjStep<B: Backend> {
    pub x: Tensor<B, 2>,
    pub weight: Tensor<B, 2>,
    pub bias: Option<Tensor<B, 1>>,
    pub conv_state: Tensor<B, 3>,
    pub conv_weight: Tensor<B, 2>,
    pub conv_bias: Option<Tensor<B, 1>>,
}

/// One decoding position of the Mamba mixer from `x_proj`'s output to the gated output: Jamba's
/// dt, B and C RMSNorms, `dt_proj`, and the state update of [`SelectiveStateUpdate`], which
/// backends with kernels run as one kernel (three launches fewer per layer and step).
///
/// Shapes: `params` `[batch, dt_rank + 2 d_state]`, `x_proj`'s output `[dt | B | C]`;
/// `norms` the dt, B and C norm weights `[dt_rank]`, `[d_state]`, `[d_state]`; `dt_proj`
/// `[d_inner, dt_rank]` (its bias is `delta_bias`); the rest as in [`SelectiveStateUpdate`].
/// The norms' outputs and `dt` are rounded to the norm weights' dtype, as the separate
/// operations round them.
#[derive(Debug, Clone)]
pub struct MambaStep<B: Backend> {
    pub state: Tensor<B, 3>,
    pub x: Tensor<B, 2>,
    pub z: Option<Tensor<B, 2>>,
    pub params: Tensor<B, 2>,
    pub norms: [Tensor<B, 1>; 3],
    pub eps: f64,
    pub dt_proj: Tensor<B, 2>,
    pub a: Tensor<B, 2>,
    pub d: Tensor<B, 1>,
    pub delta_bias: Option<Tensor<B, 1>>,
    pub delta_softplus: bool,
}

/// One decoding position of the causal conv1d (`causal_conv1d_update`): `state`
/// `[batch, channels, width - 1]` f32 holds the preceding inputs and is returned shifted to end
/// with `x` `[batch, channels]`.
#[derive(Debug, Clone)]
pub struct CausalConv1dUpdate<B: Backend> {
    pub state: Tensor<B, 3>,
    pub x: Tensor<B, 2>,
    pub weight: Tensor<B, 2>,
    pub bias: Option<Tensor<B, 1>>,
    pub silu: bool,
}

/// The routed experts of a MoE layer for many tokens (dropless: every pair is computed).
///
/// Shapes: `x`: `[tokens, hidden]`; `gate_up`: `[experts, 2 * inter, hidden]` (rows `[0, inter)`
/// gate, `[inter, 2 * inter)` up); `down`: `[experts, hidden, inter]`; `chosen`, `weights`:
/// `[tokens, top_k]`, the layer's expert index and routing weight of each (token, slot) pair.
/// The weights may be f32 (the router's) whatever the activations' dtype: they are rounded to
/// `x`'s dtype where they are used, as transformers rounds them.
/// The experts held here are `first..first + experts`; pairs routed elsewhere are skipped
/// (expert parallelism).
#[derive(Debug, Clone)]
pub struct MoeInput<B: Backend> {
    pub x: Tensor<B, 2>,
    pub gate_up: Tensor<B, 3>,
    pub down: Tensor<B, 3>,
    pub chosen: Tensor<B, 2, Int>,
    pub weights: Tensor<B, 2>,
    pub first: usize,
}

/// Whether the kernels of [`JambaBackend::moe_grouped`] apply to `input`: at least one token,
/// slot and expert, one dtype for the activations and both expert tensors, and shapes that
/// agree. Otherwise backends run the reference (which Burn differentiates).
pub fn moe_kernels_apply<B: Backend>(input: &MoeInput<B>) -> bool {
    let [tokens, hidden] = input.x.dims();
    let [experts, two_inter, gate_hidden] = input.gate_up.dims();
    let [down_experts, down_hidden, inter] = input.down.dims();
    let dtype = input.x.dtype();
    tokens > 0
        && experts > 0
        && input.chosen.dims()[1] > 0
        && input.chosen.dims() == input.weights.dims()
        && input.chosen.dims()[0] == tokens
        && gate_hidden == hidden
        && down_hidden == hidden
        && down_experts == experts
        && two_inter == 2 * inter
        && input.gate_up.dtype() == dtype
        && input.down.dtype() == dtype
}

/// Gradients of the grouped MoE w.r.t. its float inputs, in their dtypes.
#[derive(Debug, Clone)]
pub struct MoeGrads<B: Backend> {
    pub x: Tensor<B, 2>,
    pub gate_up: Tensor<B, 3>,
    pub down: Tensor<B, 3>,
    pub weights: Tensor<B, 2>,
}

/// The operations Jamba's Mamba mixer needs from a backend.
///
/// The default methods are the tensor-op references; a backend with kernels overrides them and
/// sets [`JambaBackend::KERNELS`], which makes `Autodiff<B>` use the kernels' backward instead
/// of differentiating the reference.
pub trait JambaBackend: Backend {
    /// Whether `selective_scan_saving`, `selective_scan_backward` and `causal_conv1d_backward`
    /// are implemented (they are only called when this is true).
    const KERNELS: bool = false;

    /// Mamba-1 selective scan (`selective_scan_fn` in mamba-ssm), returning the last state too.
    fn selective_scan(input: SelectiveScanInput<Self>) -> SelectiveScanOutput<Self> {
        reference::selective_scan(input)
    }

    /// The forward scan that also returns what its backward needs: the state at the start of
    /// every chunk of [`scan_chunk_len`] positions, `[batch, d_inner, chunks, d_state]` f32.
    fn selective_scan_saving(
        input: &SelectiveScanInput<Self>,
    ) -> (SelectiveScanOutput<Self>, Tensor<Self, 4>) {
        let _ = input;
        unimplemented!("selective_scan_saving is only called on backends with KERNELS")
    }

    /// Gradients of `sum(selective_scan(input).y * grad_y)` w.r.t. every input, from the chunk
    /// states of [`JambaBackend::selective_scan_saving`]. The last state carries no gradient.
    fn selective_scan_backward(
        input: &SelectiveScanInput<Self>,
        chunk_states: Tensor<Self, 4>,
        grad_y: Tensor<Self, 3>,
    ) -> SelectiveScanGrads<Self> {
        let _ = (input, chunk_states, grad_y);
        unimplemented!("selective_scan_backward is only called on backends with KERNELS")
    }

    /// Depthwise causal conv1d with optional bias, preceding inputs and fused SiLU
    /// (`causal_conv1d_fn` in Dao-AILab/causal-conv1d).
    fn causal_conv1d(input: CausalConv1dInput<Self>) -> Tensor<Self, 3> {
        reference::causal_conv1d(input)
    }

    /// Gradients of `sum(causal_conv1d(input) * grad_y)` w.r.t. every input.
    fn causal_conv1d_backward(
        input: &CausalConv1dInput<Self>,
        grad_y: Tensor<Self, 3>,
    ) -> CausalConv1dGrads<Self> {
        let _ = (input, grad_y);
        unimplemented!("causal_conv1d_backward is only called on backends with KERNELS")
    }

    /// `x @ weight^T + bias` for `x` `[rows, in]` and `weight` `[out, in]` (HF layout), in
    /// `x`'s dtype: a `weight` of another float dtype is read as `x`'s (the router's f32 logits
    /// from bf16 weights). Backends with kernels use a memory-bound kernel when `rows` is small
    /// (decoding), which reads such a weight without converting it first.
    fn linear(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, 2> {
        let weight = cast_to(weight, x.dtype());
        burn::tensor::module::linear(x, weight.transpose(), bias)
    }

    /// `x @ weight^T` accumulated and returned in f32 whatever the float dtypes of `x` and
    /// `weight` (the MoE router's logits: a near-tie between experts must not flip with a
    /// rounding of the logits). Backends with kernels read bf16 activations and weights as
    /// they are when `x` has few rows (decoding), without converting either first.
    fn linear_f32(x: Tensor<Self, 2>, weight: Tensor<Self, 2>) -> Tensor<Self, 2> {
        <Self as JambaBackend>::linear(cast_to(x, DType::F32), weight, None)
    }

    /// `lhs [m, k] @ rhs [k, n]`: the products of the backward of [`JambaBackend::linear`]
    /// under autodiff. CubeCL backends run it through the routine of [`matmul_routine`] where
    /// one is chosen (for f16/bf16).
    fn matmul(lhs: Tensor<Self, 2>, rhs: Tensor<Self, 2>) -> Tensor<Self, 2> {
        lhs.matmul(rhs)
    }

    /// The experts of a MoE layer on `x` `[n, hidden]`, summed with `weights` `[n, experts]`
    /// (zero for the experts a token is not routed to): `sum_e weights[:, e] * down_e(silu(gate_e
    /// x) * up_e x)`, with `gate_up` `[experts, 2 * inter, hidden]` and `down` `[experts, hidden,
    /// inter]`. Backends with kernels read only the routed experts' weights when `n` is small.
    fn moe_experts(
        x: Tensor<Self, 2>,
        gate_up: Tensor<Self, 3>,
        down: Tensor<Self, 3>,
        weights: Tensor<Self, 2>,
    ) -> Tensor<Self, 2> {
        reference::moe_experts(x, gate_up, down, weights)
    }

    /// Jamba's router on `logits` `[tokens, experts]` (f32): the `top_k` largest softmax
    /// probabilities (f32, not renormalised) and their expert indices, largest first.
    fn moe_route(logits: Tensor<Self, 2>, top_k: usize) -> (Tensor<Self, 2>, Tensor<Self, 2, Int>) {
        reference::moe_route(logits, top_k)
    }

    /// The MoE router on `x` `[tokens, hidden]` with `weight` `[experts, hidden]`: the f32
    /// logits ([`JambaBackend::linear_f32`]) and their routing ([`JambaBackend::moe_route`]).
    /// Returns the logits `[tokens, experts]`, the `top_k` weights (f32) and the experts'
    /// indices. Backends with kernels run one kernel for few tokens (decoding).
    fn moe_router(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        top_k: usize,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 2, Int>) {
        reference::moe_router::<Self>(x, weight, top_k)
    }

    /// Whether [`JambaBackend::moe_grouped`] runs on the device (kernels: the routing is sorted
    /// there; at most the experts' row offsets are read back). The model then uses it for every
    /// MoE layer; otherwise it groups the tokens by expert on the host.
    const GROUPED_MOE: bool = false;

    /// `out[t] = sum_j weights[t, j] * expert_{chosen[t, j]}(x[t])` over the pairs whose expert
    /// is held here (see [`MoeInput`]). Backends with kernels sort the pairs by expert on the
    /// device and run grouped matmuls; the reference runs every expert on every token.
    fn moe_grouped(input: MoeInput<Self>) -> Tensor<Self, 2> {
        reference::moe_grouped(input)
    }

    /// Gradients of `sum(moe_grouped(input) * grad)` w.r.t. `x`, `gate_up`, `down` and
    /// `weights` (only called when [`JambaBackend::GROUPED_MOE`] is true).
    fn moe_grouped_backward(input: &MoeInput<Self>, grad: Tensor<Self, 2>) -> MoeGrads<Self> {
        let _ = (input, grad);
        unimplemented!("moe_grouped_backward is only called on backends with GROUPED_MOE")
    }

    /// RMSNorm of the rows of `x` `[rows, dim]` (any float dtype), computed in f32, cast to the
    /// weight's dtype and scaled by `weight` `[dim]` (`JambaRMSNorm`).
    fn rms_norm(x: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        reference::rms_norm(x, weight, eps)
    }

    /// Causal self-attention of new positions: `q` `[batch, heads, len_q, head_dim]` over `k`,
    /// `v` `[batch, kv_heads, len_k, head_dim]` with `len_q <= len_k` and `heads` a multiple of
    /// `kv_heads` (query head `j` reads KV head `j / (heads / kv_heads)`, as transformers'
    /// `repeat_kv`). The queries are the last `len_q` positions: query `i` sees keys
    /// `0..=len_k - len_q + i` (cached positions before the new ones, no padding). Scale
    /// `head_dim^-0.5`, softmax in f32. Backends with kernels run a flash-attention kernel (no
    /// `[len_q, len_k]` scores in memory): the tensor-core one for f16 and bf16 where the device
    /// has them (above [`FLASH_MMA_MIN_SCORES`] scores), the portable one above
    /// [`FLASH_MIN_SCORES`], the reference below.
    fn causal_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        reference::causal_attention(q, k, v)
    }

    /// `residual + h` in f32 (the residual stream; `h` of any float dtype) and the RMSNorm of
    /// that sum as [`JambaBackend::rms_norm`] computes it: one kernel on backends with kernels.
    fn add_rms_norm(
        residual: Tensor<Self, 2>,
        h: Tensor<Self, 2>,
        weight: Tensor<Self, 1>,
        eps: f64,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        reference::add_rms_norm(residual, h, weight, eps)
    }

    /// The RMSNorms of consecutive column segments of `x` `[rows, sum of widths]`, segment `i`
    /// as wide as `weights[i]` (Mamba's dt, B and C norms on the x_proj output): one kernel
    /// for up to three segments on backends with kernels, and no copies of the segments.
    fn rms_norms(
        x: Tensor<Self, 2>,
        weights: Vec<Tensor<Self, 1>>,
        eps: f64,
    ) -> Vec<Tensor<Self, 2>> {
        reference::rms_norms(x, weights, eps)
    }

    /// The SwiGLU activation `silu(gate) * up` of two tensors of one shape and dtype (what the
    /// dense MLP applies between its products). Backends with kernels run one kernel that reads
    /// each input once and computes in f32, rounding once to the dtype; the reference rounds the
    /// SiLU first, as transformers does (one rounding of the dtype apart).
    fn swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        reference::swiglu(gate, up)
    }

    /// The dense SwiGLU MLP `down(silu(gate x) * up x)` on `x` `[rows, hidden]`, weights in HF
    /// layout (`gate`, `up` `[inter, hidden]`, `down` `[hidden, inter]`). Backends with kernels
    /// run two decoding kernels when `rows` is small.
    fn swiglu_mlp(
        x: Tensor<Self, 2>,
        gate: Tensor<Self, 2>,
        up: Tensor<Self, 2>,
        down: Tensor<Self, 2>,
    ) -> Tensor<Self, 2> {
        reference::swiglu_mlp::<Self>(x, gate, up, down)
    }

    /// Attention of one new position per sequence over its cached keys and values (decoding,
    /// nothing masked): `q` `[batch, heads, 1, head_dim]`, `k`, `v` `[batch, kv_heads,
    /// capacity, head_dim]` of which the first `len` positions are attended (a KV cache's
    /// buffers, read in place: a narrowed view whose end is not aligned would be copied), with
    /// `heads` a multiple of `kv_heads` (query head `j` reads KV head `j / (heads / kv_heads)`:
    /// no repeated copy of the cache), scale `head_dim^-0.5`, scores and softmax in f32.
    /// Returns `[batch, heads, 1, head_dim]` in `q`'s dtype. Backends with kernels run one
    /// kernel (the planes of a cube per head share the keys, online softmax).
    fn decode_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        len: usize,
    ) -> Tensor<Self, 4> {
        reference::decode_attention(q, k, v, len)
    }

    /// One decoding position of the scan: returns `y` `[batch, d_inner]` and the new state.
    fn selective_state_update(
        input: SelectiveStateUpdate<Self>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        reference::selective_state_update(input)
    }

    /// One decoding position of `in_proj` and the conv (see [`MambaInProjStep`]): returns the
    /// conv's output `x` and the gate `z` (`[batch, d_inner]` each, in `x`'s dtype) and the
    /// conv's new state.
    fn mamba_in_proj_step(
        input: MambaInProjStep<Self>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 3>) {
        reference::mamba_in_proj_step::<Self>(input)
    }

    /// One decoding position of the Mamba mixer from `x_proj`'s output (see [`MambaStep`]):
    /// returns `y` `[batch, d_inner]` and the new state.
    fn mamba_step(input: MambaStep<Self>) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        reference::mamba_step::<Self>(input)
    }

    /// One decoding position of the conv: returns `y` `[batch, channels]` and the new state.
    fn causal_conv1d_update(input: CausalConv1dUpdate<Self>) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        reference::causal_conv1d_update(input)
    }

    /// Runs `op` on `inputs` as one operation (see [`composite`]): a fused backend registers
    /// one operation for all of `op`'s, the others run them in turn.
    ///
    /// # Panics
    /// When `op` returns other shapes or dtypes than its [`Composite::outputs`].
    fn composite<C: Composite>(op: C, inputs: Args<Self>) -> Args<Self> {
        composite::run_here::<Self, C>(op, inputs)
    }
}

/// Default of [`decode_max_rows`]. On the H200 ("block" shapes, bf16) the decoding kernels
/// beat the matmuls at batch 8 (15.6 against 16.9 ms/step) and lose badly at 32 (61 against 21:
/// every routed expert computes every row), see BENCHMARKS.md.
pub const DECODE_MAX_ROWS: usize = 8;

/// Rows up to which the decoding kernels (`linear`, `moe_experts`, and `moe_grouped`'s decoding
/// path) are used: they read each weight once for all rows, which beats a tiled matmul while
/// the rows are few (decoding batches). `JAMBA_DECODE_MAX_ROWS` overrides [`DECODE_MAX_ROWS`].
pub fn decode_max_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    env_usize(&ROWS, "JAMBA_DECODE_MAX_ROWS", DECODE_MAX_ROWS)
}

/// cubek's matmul routines that the CubeCL backends can run the large f16/bf16 products of
/// [`JambaBackend::linear`] and of the MoE's per-expert matmuls through (see
/// [`set_matmul_routine`]). `simple_cmma` is what Burn runs without its `autotune` feature;
/// the `_unit` ones need no tensor cores.
pub const MATMUL_ROUTINES: &[&str] = &[
    "simple_cmma",
    "simple_mma",
    "simple_multi_rows_cmma",
    "simple_multi_rows_mma",
    "ordered_double_4_cmma",
    "ordered_double_4_mma",
    "ordered_double_8_cmma",
    "ordered_double_8_mma",
    "double_cyclic_cmma",
    "double_cyclic_mma",
    "double_cyclic_specialized_cmma",
    "double_cyclic_specialized_mma",
    "specialized_cyclic_cmma",
    "specialized_cyclic_mma",
    "simple_tma_cmma",
    "simple_tma_mma",
    "simple_tma_multi_rows_cmma",
    "simple_tma_multi_rows_mma",
    "double_tma_cmma",
    "double_tma_mma",
    "specialized_tma_cmma",
    "specialized_tma_mma",
    "simple_unit",
    CUBLAS_ROUTINE,
];

/// The routine that runs the products of at least [`cublas_min_rows`] rows through cuBLAS on
/// CUDA (feature `cublas`; the library is loaded at run time: `libcublas.so`), enqueued on
/// CubeCL's stream, and every other product through [`DEFAULT_CUBEK_ROUTINE`] (see
/// `cube::cublas`). On the other runtimes, without the feature, or where cuBLAS does not load,
/// it is [`DEFAULT_CUBEK_ROUTINE`] alone.
pub const CUBLAS_ROUTINE: &str = "cublas";

/// The value of the environment variable `var` as a count, read once into `cell`; `default`
/// where it is unset or not a number.
fn env_usize(cell: &std::sync::OnceLock<usize>, var: &str, default: usize) -> usize {
    *cell.get_or_init(|| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    })
}

/// Rows from which [`CUBLAS_ROUTINE`] hands a product to cuBLAS, unless
/// `JAMBA_CUBLAS_MIN_ROWS` says otherwise: by default every product that reaches the routine
/// (the linear layers' from more than [`decode_max_rows`] rows, [`JambaBackend::matmul`]'s at
/// any size). Each costs the host three round trips to CubeCL's device
/// thread for its operands' addresses, which the faster products repaid even in decoding at
/// batch 32 on the H200 (13.6 against 16.1 ms per step, BENCHMARKS.md); a larger value keeps
/// products of fewer rows on cubek's routine.
pub const CUBLAS_MIN_ROWS: usize = 1;

/// [`CUBLAS_MIN_ROWS`] or `JAMBA_CUBLAS_MIN_ROWS`.
pub fn cublas_min_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    env_usize(&ROWS, "JAMBA_CUBLAS_MIN_ROWS", CUBLAS_MIN_ROWS)
}

/// A name that is not one of [`MATMUL_ROUTINES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownMatmulRoutine(pub String);

impl std::fmt::Display for UnknownMatmulRoutine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unknown matmul routine `{}` (one of: {})",
            self.0,
            MATMUL_ROUTINES.join(", ")
        )
    }
}

impl std::error::Error for UnknownMatmulRoutine {}

/// The routine of [`matmul_routine`] unless chosen otherwise: [`CUBLAS_ROUTINE`], which runs
/// the large products through cuBLAS on CUDA and the rest through [`DEFAULT_CUBEK_ROUTINE`].
pub const DEFAULT_MATMUL_ROUTINE: &str = CUBLAS_ROUTINE;

/// cubek's routine for the products that [`DEFAULT_MATMUL_ROUTINE`] does not hand to cuBLAS,
/// on devices with a tensor memory accelerator (TMA: Hopper and later); on the others
/// [`DEFAULT_MATMUL_ROUTINE_NO_TMA`] runs instead. On the H200 (bf16) it ran every product of the "block" model's prefill at 208-292
/// TFLOP/s, 1.3-1.6x the next fastest routine and 2.5-3.6x Burn's matmul (BENCHMARKS.md). It is
/// launched only where the operands' strides meet TMA's alignment (see `cube::matmul`): a TMA
/// launch that fails does so on the device's stream, which it leaves unusable.
pub const DEFAULT_CUBEK_ROUTINE: &str = "specialized_tma_mma";

/// The default routine where the device has no TMA: the fastest of the others over the "block"
/// model's prefill products on the H200 (1.97x Burn's matmul). Devices without tensor cores
/// decline it and run Burn's matmul.
pub const DEFAULT_MATMUL_ROUTINE_NO_TMA: &str = "double_cyclic_mma";

/// A routine name, `burn` (Burn's matmul: `None`), or an error.
fn parse_matmul_routine(name: &str) -> Result<Option<&'static str>, UnknownMatmulRoutine> {
    if name == "burn" {
        return Ok(None);
    }
    MATMUL_ROUTINES
        .iter()
        .find(|r| **r == name)
        .map(|r| Some(*r))
        .ok_or_else(|| UnknownMatmulRoutine(name.to_string()))
}

fn matmul_routine_cell() -> &'static std::sync::RwLock<Option<&'static str>> {
    static CELL: std::sync::OnceLock<std::sync::RwLock<Option<&'static str>>> =
        std::sync::OnceLock::new();
    CELL.get_or_init(|| {
        let chosen = match std::env::var("JAMBA_MATMUL") {
            Ok(name) if !name.is_empty() => parse_matmul_routine(&name).unwrap_or_else(|e| {
                eprintln!("JAMBA_MATMUL ignored: {e}");
                Some(DEFAULT_MATMUL_ROUTINE)
            }),
            _ => Some(DEFAULT_MATMUL_ROUTINE),
        };
        std::sync::RwLock::new(chosen)
    })
}

/// The matmul routine for the large f16/bf16 products on CubeCL backends: the one set by
/// [`set_matmul_routine`], else the `JAMBA_MATMUL` environment variable (a name of
/// [`MATMUL_ROUTINES`], or `burn` for Burn's matmul and its fused matmul on fused backends:
/// `None`), else [`DEFAULT_MATMUL_ROUTINE`].
pub fn matmul_routine() -> Option<&'static str> {
    *matmul_routine_cell()
        .read()
        .unwrap_or_else(|e| e.into_inner())
}

/// Chooses the matmul routine of [`matmul_routine`] for the whole process (`None` or
/// `Some("burn")`: Burn's matmul).
pub fn set_matmul_routine(name: Option<&str>) -> Result<(), UnknownMatmulRoutine> {
    let chosen = match name {
        None => None,
        Some(name) => parse_matmul_routine(name)?,
    };
    *matmul_routine_cell()
        .write()
        .unwrap_or_else(|e| e.into_inner()) = chosen;
    Ok(())
}

/// Queries from which [`JambaBackend::causal_attention`] runs through cuBLAS on CUDA (feature
/// `cublas`, with [`CUBLAS_ROUTINE`] chosen): two products per block of queries with the scores
/// in memory between them, instead of the flash kernels. `JAMBA_CUBLAS_ATTENTION_MIN_QUERIES`
/// overrides it; `JAMBA_REFERENCE=attention_cublas` turns it off.
pub const CUBLAS_ATTENTION_MIN_QUERIES: usize = 1024;

/// [`CUBLAS_ATTENTION_MIN_QUERIES`] or `JAMBA_CUBLAS_ATTENTION_MIN_QUERIES`.
pub fn cublas_attention_min_queries() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    env_usize(
        &ROWS,
        "JAMBA_CUBLAS_ATTENTION_MIN_QUERIES",
        CUBLAS_ATTENTION_MIN_QUERIES,
    )
}

static CUBLAS_PRODUCTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many products ran through cuBLAS ([`CUBLAS_ROUTINE`]) in this process: 0 where the
/// runtime is not CUDA or the library did not load.
pub fn cublas_products() -> usize {
    CUBLAS_PRODUCTS.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(feature = "cublas")]
pub(crate) fn note_cublas_products(n: usize) {
    CUBLAS_PRODUCTS.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

static MATMUL_FALLBACKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many products the chosen routine declined (their shape, layout or the device), which then
/// ran through Burn's matmul.
pub fn matmul_routine_fallbacks() -> usize {
    MATMUL_FALLBACKS.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(feature = "cube")]
pub(crate) fn note_matmul_fallback() {
    MATMUL_FALLBACKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Scores (`batch x heads x len_q x len_k`) above which [`JambaBackend::causal_attention`] runs
/// the portable flash kernel (one unit per query row) on backends that have it: 2^32 f32 scores
/// are 16 GiB. Below, the reference (scores in memory, Burn's matmuls and softmax) is faster.
/// `JAMBA_FLASH_MIN_SCORES` overrides it and [`FLASH_MMA_MIN_SCORES`] (0: always the kernels).
pub const FLASH_MIN_SCORES: usize = 1 << 32;

/// Scores above which the tensor-core flash kernel runs (f16 and bf16 on devices with 16 x 16
/// x 16 cooperative matrices and planes of 32 units): at every size, since it is faster than
/// the reference on the H200 from 1024 tokens up (BENCHMARKS.md).
pub const FLASH_MMA_MIN_SCORES: usize = 0;

/// Whether a flash kernel runs for causal attention with `scores` scores (`batch x heads x
/// len_q x len_k`): the tensor-core one (`tensor_cores`) above [`FLASH_MMA_MIN_SCORES`], the
/// portable one above [`FLASH_MIN_SCORES`], or both above `JAMBA_FLASH_MIN_SCORES` when set.
pub fn flash_attention_pays(scores: usize, tensor_cores: bool) -> bool {
    static MIN: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let set = *MIN.get_or_init(|| {
        std::env::var("JAMBA_FLASH_MIN_SCORES")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    let min = set.unwrap_or(match tensor_cores {
        true => FLASH_MMA_MIN_SCORES,
        false => FLASH_MIN_SCORES,
    });
    scores > min
}

/// The forward kernels of the selective scan on CubeCL backends (see [`set_scan_forward`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScanForward {
    /// Chosen by the shape and the device (the default).
    #[default]
    Auto,
    /// Each channel's tile split between the lanes of one plane and composed by a plane scan
    /// (`scan_fwd_chunk_kernel`): needs a fixed plane size and the tile's B and C in shared
    /// memory. Where the activations have a time stride of 1 (mamba-ssm's layout), each lane
    /// reads and writes its positions in place (its direct mode, the fastest at every shape
    /// measured); otherwise the cube stages them through shared memory.
    Chunked,
    /// Each channel's sequence walked by up to 16 units holding a share of its states
    /// (`scan_fwd_kernel`): any `d_state` up to 256.
    OnePass,
    /// The sequence split into segments walked twice, from zero and from the composed starting
    /// state (`scan_fwd_seg_kernel`): `d_state` up to 16.
    Split,
}

/// The backward kernels of the selective scan on CubeCL backends (see [`set_scan_backward`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScanBackward {
    /// The chunked kernel where it can run, else the one-pass one (the default).
    #[default]
    Auto,
    /// Each channel's tile split between the lanes of one plane (`scan_bwd_chunk_kernel`),
    /// where the device allows it as for [`ScanForward::Chunked`].
    Chunked,
    /// Each channel's sequence walked backwards by units holding a share of its states
    /// (`scan_bwd_kernel`): any `d_state` up to 256.
    OnePass,
}

/// A scan kernel choice: its names, and its slot among the run counters.
trait ScanKernel: Copy + Default + 'static {
    const NAMES: &'static [(&'static str, Self)];
    fn run_slot(self) -> Option<usize>;
}

impl ScanKernel for ScanForward {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("auto", Self::Auto),
        ("chunked", Self::Chunked),
        ("one_pass", Self::OnePass),
        ("split", Self::Split),
    ];

    fn run_slot(self) -> Option<usize> {
        match self {
            Self::Auto => None,
            Self::Chunked => Some(0),
            Self::OnePass => Some(1),
            Self::Split => Some(2),
        }
    }
}

impl ScanKernel for ScanBackward {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("auto", Self::Auto),
        ("chunked", Self::Chunked),
        ("one_pass", Self::OnePass),
    ];

    fn run_slot(self) -> Option<usize> {
        match self {
            Self::Auto => None,
            Self::Chunked => Some(3),
            Self::OnePass => Some(4),
        }
    }
}

/// A name of `K::NAMES`, or an error listing them.
fn parse_scan_kernel<K: ScanKernel>(name: &str) -> Result<K, String> {
    K::NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, k)| *k)
        .ok_or_else(|| {
            let names: Vec<_> = K::NAMES.iter().map(|(n, _)| *n).collect();
            format!(
                "unknown scan kernel `{name}` (one of: {})",
                names.join(", ")
            )
        })
}

impl std::str::FromStr for ScanForward {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_scan_kernel(s)
    }
}

impl std::str::FromStr for ScanBackward {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_scan_kernel(s)
    }
}

/// The process-wide choice in `cell`: initialised from the environment variable `var` (an
/// unknown name is reported and ignored), else the default.
fn scan_kernel_cell<K: ScanKernel>(
    cell: &'static std::sync::OnceLock<std::sync::RwLock<K>>,
    var: &str,
) -> &'static std::sync::RwLock<K> {
    cell.get_or_init(|| {
        let chosen = match std::env::var(var) {
            Ok(name) if !name.is_empty() => parse_scan_kernel(&name).unwrap_or_else(|e| {
                eprintln!("{var} ignored: {e}");
                K::default()
            }),
            _ => K::default(),
        };
        std::sync::RwLock::new(chosen)
    })
}

static SCAN_FORWARD: std::sync::OnceLock<std::sync::RwLock<ScanForward>> =
    std::sync::OnceLock::new();
static SCAN_BACKWARD: std::sync::OnceLock<std::sync::RwLock<ScanBackward>> =
    std::sync::OnceLock::new();

/// The forward scan kernel chosen for the process: [`set_scan_forward`]'s, else the
/// `JAMBA_SCAN_FWD` environment variable (`auto`, `chunked`, `one_pass`, `split`), else
/// [`ScanForward::Auto`]. A kernel that cannot run a given problem (its `d_state`, the device's
/// plane size or shared memory) leaves it to the automatic choice.
pub fn scan_forward() -> ScanForward {
    *scan_kernel_cell(&SCAN_FORWARD, "JAMBA_SCAN_FWD")
        .read()
        .unwrap_or_else(|e| e.into_inner())
}

/// Chooses the forward scan kernel of [`scan_forward`] for the whole process.
pub fn set_scan_forward(choice: ScanForward) {
    *scan_kernel_cell(&SCAN_FORWARD, "JAMBA_SCAN_FWD")
        .write()
        .unwrap_or_else(|e| e.into_inner()) = choice;
}

/// The backward scan kernel chosen for the process: [`set_scan_backward`]'s, else the
/// `JAMBA_SCAN_BWD` environment variable (`auto`, `chunked`, `one_pass`), else
/// [`ScanBackward::Auto`].
pub fn scan_backward() -> ScanBackward {
    *scan_kernel_cell(&SCAN_BACKWARD, "JAMBA_SCAN_BWD")
        .read()
        .unwrap_or_else(|e| e.into_inner())
}

/// Chooses the backward scan kernel of [`scan_backward`] for the whole process.
pub fn set_scan_backward(choice: ScanBackward) {
    *scan_kernel_cell(&SCAN_BACKWARD, "JAMBA_SCAN_BWD")
        .write()
        .unwrap_or_else(|e| e.into_inner()) = choice;
}

/// Runs of each scan kernel, at the slots of [`ScanKernel::run_slot`].
static SCAN_RUNS: [std::sync::atomic::AtomicUsize; 5] =
    [const { std::sync::atomic::AtomicUsize::new(0) }; 5];

fn scan_runs<K: ScanKernel>(kernel: K) -> usize {
    kernel.run_slot().map_or(0, |i| {
        SCAN_RUNS[i].load(std::sync::atomic::Ordering::Relaxed)
    })
}

/// How many forward scans the process ran through `kernel` on CubeCL backends (0 for
/// [`ScanForward::Auto`]).
pub fn scan_forward_runs(kernel: ScanForward) -> usize {
    scan_runs(kernel)
}

/// How many backward scans the process ran through `kernel` on CubeCL backends (0 for
/// [`ScanBackward::Auto`]).
pub fn scan_backward_runs(kernel: ScanBackward) -> usize {
    scan_runs(kernel)
}

/// Counts a run of `kernel` (see [`scan_forward_runs`], [`scan_backward_runs`]).
#[cfg(feature = "cube")]
#[allow(private_bounds)]
pub(crate) fn note_scan_run<K: ScanKernel>(kernel: K) {
    if let Some(i) = kernel.run_slot() {
        SCAN_RUNS[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Positions per chunk of the scan kernels: the backward recomputes the states of one chunk at
/// a time from the state saved at its start. Smaller for large `d_state` so that a chunk's
/// inputs fit in shared memory and its states in a unit's local memory.
pub fn scan_chunk_len(d_state: usize) -> usize {
    (512 / d_state.max(1)).clamp(4, 32)
}

#[cfg(feature = "ndarray")]
impl<E, I, Q> JambaBackend for burn::backend::NdArray<E, I, Q>
where
    E: burn::backend::ndarray::FloatNdArrayElement,
    I: burn::backend::ndarray::IntNdArrayElement,
    Q: burn::backend::ndarray::QuantElement,
    burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<E>>,
    burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<I>>,
{
}

#[cfg(feature = "tch")]
impl<E: burn::backend::libtorch::TchElement> JambaBackend for burn::backend::LibTorch<E> {}

/// CUDA without Burn's operation fusion (`burn::backend::Cuda` is the fused one).
#[cfg(feature = "cuda")]
pub type CudaUnfused =
    burn_cubecl::CubeBackend<burn_cubecl::cubecl::cuda::CudaRuntime, f32, i32, u8>;

/// wgpu without Burn's operation fusion (`burn::backend::Wgpu` is the fused one).
#[cfg(feature = "wgpu")]
pub type WgpuUnfused = burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;

/// What CubeCL's memory management holds for the calling thread's stream on a CUDA device (the
/// stream a model's work runs on, fused or not): bytes in use by live buffers, and bytes reserved
/// from the driver (pages of the pools, persistent buffers). Reserved memory only grows until a
/// cleanup, so after a workload it is that workload's peak. `None` where the device reports an
/// error instead.
#[cfg(feature = "cuda")]
pub fn cuda_memory_usage(device: &burn::backend::cuda::CudaDevice) -> Option<(u64, u64)> {
    use burn_cubecl::cubecl::Runtime;
    let client = burn_cubecl::cubecl::cuda::CudaRuntime::client(device);
    let usage = client.memory_usage().ok()?;
    Some((usage.bytes_in_use, usage.bytes_reserved))
}
