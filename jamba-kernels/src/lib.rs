//! Mamba's sequence operations as a Burn backend extension.
//!
//! The Jamba model calls these through [`JambaBackend`] and never learns which backend runs them.
//! Every backend gets the tensor-op implementations in [`reference`] (which are also the test
//! oracle); backends with custom kernels override the trait's methods.

pub mod reference;

use burn::tensor::{backend::Backend, Tensor};

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

/// The operations Jamba's Mamba mixer needs from a backend.
///
/// The default methods are the tensor-op references; a backend with kernels overrides them.
pub trait JambaBackend: Backend {
    /// Mamba-1 selective scan (`selective_scan_fn` in mamba-ssm), returning the last state too.
    fn selective_scan(input: SelectiveScanInput<Self>) -> SelectiveScanOutput<Self> {
        reference::selective_scan(input)
    }

    /// Depthwise causal conv1d with optional bias, preceding inputs and fused SiLU
    /// (`causal_conv1d_fn` in Dao-AILab/causal-conv1d).
    fn causal_conv1d(input: CausalConv1dInput<Self>) -> Tensor<Self, 3> {
        reference::causal_conv1d(input)
    }
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

#[cfg(feature = "cube")]
impl<R, F, I, BT> JambaBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
}

#[cfg(feature = "cube")]
impl<B: burn_fusion::FusionBackend + JambaBackend> JambaBackend for burn_fusion::Fusion<B> {}

#[cfg(feature = "tch")]
impl<E: burn::backend::libtorch::TchElement> JambaBackend for burn::backend::LibTorch<E> {}

#[cfg(feature = "autodiff")]
impl<B: JambaBackend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy>
    JambaBackend for burn::backend::Autodiff<B, C>
{
}

/// CUDA without Burn's operation fusion (`burn::backend::Cuda` is the fused one).
#[cfg(feature = "cuda")]
pub type CudaUnfused =
    burn_cubecl::CubeBackend<burn_cubecl::cubecl::cuda::CudaRuntime, f32, i32, u8>;
