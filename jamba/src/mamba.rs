//! The Mamba mixer of Jamba (`JambaMambaMixer`): Mamba-1 with RMSNorms on dt, B and C.
//!
//! ```text
//! x, z  = in_proj(h)                      (split in two halves of d_inner)
//! x     = silu(causal_conv1d(x))          (depthwise, width d_conv)
//! dt, B, C = x_proj(x)                    (split [dt_rank | d_state | d_state])
//! dt, B, C = rmsnorm(dt), rmsnorm(B), rmsnorm(C)      (the paper's stabilising norms)
//! dt    = dt_proj.weight @ dt             (its bias is added inside the scan, before softplus)
//! y     = selective_scan(x, dt, A = -exp(A_log), B, C, D, z)
//! out   = out_proj(y)
//! ```

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, DType, Tensor};
use jamba_kernels::{
    CausalConv1dInput, CausalConv1dUpdate, JambaBackend, MambaInProjStep, MambaStep,
    SelectiveScanInput,
};

use crate::config::JambaConfig;
use crate::error::Result;
use crate::nn::{export_param, Export, Linear, RmsNorm};
use crate::weights::{Init, Weights};

/// What a Mamba layer carries from one call to the next: the last `d_conv - 1` conv inputs (all the
/// next position's convolution needs; transformers keeps `d_conv`) and the SSM state, both f32
/// whatever the weights' dtype.
#[derive(Debug, Clone)]
pub struct MambaState<B: Backend> {
    /// `[batch, d_inner, d_conv - 1]`, the pre-conv inputs preceding the next position, f32.
    pub conv: Tensor<B, 3>,
    /// `[batch, d_inner, d_state]`, f32.
    pub ssm: Tensor<B, 3>,
    /// The layer's parameters as the decoding kernels take them, derived from its weights at
    /// the first decoding step of this state and kept for the next ones (they are the same for
    /// every token: a step then launches nothing to convert them). A cache therefore belongs to
    /// the weights it was filled with, as its states already do: after the weights change, start
    /// a new cache.
    pub constants: Option<MambaConstants<B>>,
}

/// A Mamba layer's parameters as the scan and the conv take them, all f32: `A = -exp(A_log)`
/// `[d_inner, d_state]`, `D` and the dt bias `[d_inner]`, the conv's weight `[d_inner, d_conv]`
/// and bias `[d_inner]`.
#[derive(Debug, Clone)]
pub struct MambaConstants<B: Backend> {
    pub a: Tensor<B, 2>,
    pub d: Tensor<B, 1>,
    pub delta_bias: Option<Tensor<B, 1>>,
    pub conv_weight: Tensor<B, 2>,
    pub conv_bias: Option<Tensor<B, 1>>,
    /// An empty tensor that stands in a state's fields while the decoding kernels hold the
    /// states (so that they update them in place), kept so that a step allocates none.
    pub stand_in: Tensor<B, 3>,
}

/// Depthwise causal conv1d weights, `conv1d.weight` `[d_inner, 1, d_conv]` as in PyTorch.
#[derive(Module, Debug)]
pub struct DepthwiseConv1d<B: Backend> {
    pub weight: Param<Tensor<B, 3>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

/// `JambaMambaMixer`. Field names are the HF parameter names (`A_log` -> `a_log`, `D` -> `d`).
#[derive(Module, Debug)]
pub struct JambaMambaMixer<B: Backend> {
    pub in_proj: Linear<B>,
    pub conv1d: DepthwiseConv1d<B>,
    pub x_proj: Linear<B>,
    pub dt_proj: Linear<B>,
    pub a_log: Param<Tensor<B, 2>>,
    pub d: Param<Tensor<B, 1>>,
    pub out_proj: Linear<B>,
    pub dt_layernorm: RmsNorm<B>,
    pub b_layernorm: RmsNorm<B>,
    pub c_layernorm: RmsNorm<B>,
    pub d_inner: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub dt_rank: usize,
}

impl<B: JambaBackend> JambaMambaMixer<B> {
    pub fn new(cfg: &JambaConfig, w: &mut Weights<B>, prefix: &str) -> Result<Self> {
        let h = cfg.hidden_size;
        let di = cfg.mamba_d_inner();
        let n = cfg.mamba_d_state;
        let r = cfg.dt_rank();
        let k = cfg.mamba_d_conv;
        let eps = cfg.rms_norm_eps;
        let p = |name: &str| format!("{prefix}.{name}");
        Ok(Self {
            in_proj: Linear::new(w, &p("in_proj"), h, 2 * di, cfg.mamba_proj_bias)?,
            conv1d: DepthwiseConv1d {
                weight: w.param(&p("conv1d.weight"), [di, 1, k], Init::Normal)?,
                bias: if cfg.mamba_conv_bias {
                    Some(w.param(&p("conv1d.bias"), [di], Init::Zeros)?)
                } else {
                    None
                },
            },
            x_proj: Linear::new(w, &p("x_proj"), di, r + 2 * n, false)?,
            dt_proj: Linear::new(w, &p("dt_proj"), r, di, true)?,
            a_log: w.param(&p("A_log"), [di, n], Init::ALog)?,
            d: w.param(&p("D"), [di], Init::Ones)?,
            out_proj: Linear::new(w, &p("out_proj"), di, h, cfg.mamba_proj_bias)?,
            dt_layernorm: RmsNorm::new(w, &p("dt_layernorm"), r, eps)?,
            b_layernorm: RmsNorm::new(w, &p("b_layernorm"), n, eps)?,
            c_layernorm: RmsNorm::new(w, &p("c_layernorm"), n, eps)?,
            d_inner: di,
            d_state: n,
            d_conv: k,
            dt_rank: r,
        })
    }

    /// An empty state (zeros) for `batch` sequences.
    pub fn empty_state(&self, batch: usize, device: &B::Device) -> MambaState<B> {
        MambaState {
            conv: Tensor::zeros([batch, self.d_inner, self.d_conv - 1], (device, DType::F32)),
            ssm: Tensor::zeros([batch, self.d_inner, self.d_state], (device, DType::F32)),
            constants: None,
        }
    }

    /// `hidden` `[batch, len, hidden]`; `mask` `[batch, len]` of 0/1 in the hidden dtype (padded
    /// positions are zeroed before in_proj and after the conv, as in transformers). With
    /// `isolate_padding`, they are zeroed after in_proj too, so that an `in_proj` bias at padded
    /// positions does not reach the conv of the first real tokens (transformers lets it): a padded
    /// row then computes what it computes alone. Both agree for checkpoints without `mamba_proj_bias`.
    /// With `state`, the call continues from it and leaves the state after its last position there.
    pub fn forward(
        &self,
        hidden: Tensor<B, 3>,
        mask: Option<&Tensor<B, 2>>,
        isolate_padding: bool,
        state: Option<&mut MambaState<B>>,
    ) -> Tensor<B, 3> {
        let [batch, len, _] = hidden.dims();
        if len == 1 {
            if let Some(state) = state {
                return self.step(hidden, mask, isolate_padding, state);
            }
        }
        let (di, n, r, k) = (self.d_inner, self.d_state, self.dt_rank, self.d_conv);
        let hidden = match mask {
            Some(m) => hidden * m.clone().unsqueeze_dim::<3>(2),
            None => hidden,
        };
        // [batch, 2*di, len]. Where the products run as tiled matmuls (more tokens than the
        // decoding kernels take, which read each weight once in f32) and in_proj has no bias, the
        // projections write the positions adjacent in memory: the layout mamba-ssm computes in,
        // which the conv and scan kernels read in place.
        let channels_major =
            self.in_proj.bias.is_none() && batch * len > jamba_kernels::decode_max_rows();
        let xz = match channels_major {
            true => project_channels_major(hidden, self.in_proj.weight.val()),
            false => self.in_proj.forward(hidden).swap_dims(1, 2),
        };
        let x = xz.clone().narrow(1, 0, di);
        let z = xz.narrow(1, di, di);
        let x = match mask {
            Some(m) if isolate_padding => x * m.clone().unsqueeze_dim::<3>(1),
            _ => x,
        };

        let (conv_state, ssm_state) = match &state {
            Some(s) => (Some(s.conv.clone()), Some(s.ssm.clone())),
            None => (None, None),
        };
        let next_conv = state
            .as_ref()
            .map(|_| last_inputs(conv_state.clone(), x.clone(), k - 1));
        let x = B::causal_conv1d(CausalConv1dInput {
            x,
            weight: self.conv1d.weight.val().reshape([di, k]),
            bias: self.conv1d.bias.as_ref().map(|b| b.val()),
            initial_state: conv_state,
            silu: true,
        });
        let x = match mask {
            Some(m) => x * m.clone().unsqueeze_dim::<3>(1),
            None => x,
        };

        // [batch, len, r + 2n]
        let ssm_params = match channels_major {
            true => linear_channels_major(x.clone(), &self.x_proj),
            false => self.x_proj.forward(x.clone().swap_dims(1, 2)),
        };
        let [dt, b, c] = self.ssm_norms(ssm_params.reshape([batch * len, r + 2 * n]));
        let (dt, b, c) = (
            dt.reshape([batch, len, r]),
            b.reshape([batch, len, n]),
            c.reshape([batch, len, n]),
        );
        // [batch, di, len] (the bias goes to the scan as its delta bias).
        let dt = match channels_major {
            true => project_channels_major(dt, self.dt_proj.weight.val()),
            false => project(dt, self.dt_proj.weight.val()).swap_dims(1, 2),
        };

        // [batch, n, len]: views of the norms' `[batch, len, n]`, or, with the projections'
        // channels-major layout, copies whose positions are adjacent (mamba-ssm's layout: the
        // scan then reads B and C along time; the copies are `n` values per position).
        let (b, c) = match channels_major {
            true => (time_major(b), time_major(c)),
            false => (b.swap_dims(1, 2), c.swap_dims(1, 2)),
        };
        let (a, d, delta_bias) = self.scan_constants();
        let out = B::selective_scan(SelectiveScanInput {
            u: x,
            delta: dt,
            a,
            b,
            c,
            d,
            z: Some(z),
            delta_bias,
            delta_softplus: true,
            initial_state: ssm_state,
        });
        if let (Some(s), Some(conv)) = (state, next_conv) {
            s.conv = conv;
            s.ssm = out.last_state;
        }
        debug_assert_eq!(out.y.dims(), [batch, di, len]);
        match channels_major {
            // The scan's output takes `u`'s layout.
            true => linear_channels_major(out.y, &self.out_proj),
            false => self.out_proj.forward(out.y.swap_dims(1, 2)),
        }
    }

    /// One decoding position (`hidden` `[batch, 1, hidden]`) through the decoding kernels,
    /// which update `state` in place where the backend can: the same result as `forward` with
    /// a sequence of one.
    fn step(
        &self,
        hidden: Tensor<B, 3>,
        mask: Option<&Tensor<B, 2>>,
        isolate_padding: bool,
        state: &mut MambaState<B>,
    ) -> Tensor<B, 3> {
        let [batch, _, width] = hidden.dims();
        let di = self.d_inner;
        let constants = self.step_constants(state);
        // Take the states out so that the kernels hold their only reference.
        let stand_in = constants.stand_in.clone();
        let placeholder = || stand_in.clone();
        let conv_state = std::mem::replace(&mut state.conv, placeholder());
        let (x, z) = match mask {
            // in_proj and the conv step: one kernel where the backend has it.
            None => {
                let (x, z, conv_state) = B::mamba_in_proj_step(MambaInProjStep {
                    x: hidden.reshape([batch, width]),
                    weight: self.in_proj.weight.val(),
                    bias: self.in_proj.bias.as_ref().map(|b| b.val()),
                    conv_state,
                    conv_weight: constants.conv_weight,
                    conv_bias: constants.conv_bias,
                });
                state.conv = conv_state;
                (x, z)
            }
            // Padding is zeroed between the two (see `forward`).
            Some(m) => {
                let hidden = hidden * m.clone().unsqueeze_dim::<3>(2);
                let xz = self.in_proj.forward(hidden).reshape([batch, 2 * di]);
                let x = xz.clone().narrow(1, 0, di);
                let z = xz.narrow(1, di, di);
                let x = match isolate_padding {
                    true => x * m.clone().expand([batch, di]),
                    false => x,
                };
                let (x, conv_state) = B::causal_conv1d_update(CausalConv1dUpdate {
                    state: conv_state,
                    x,
                    weight: constants.conv_weight,
                    bias: constants.conv_bias,
                    silu: true,
                });
                state.conv = conv_state;
                (x * m.clone().expand([batch, di]), z)
            }
        };

        let ssm_state = std::mem::replace(&mut state.ssm, placeholder());
        let weights = SsmStepWeights {
            x_proj: self.x_proj.weight.val(),
            norms: [
                self.dt_layernorm.weight.val(),
                self.b_layernorm.weight.val(),
                self.c_layernorm.weight.val(),
            ],
            eps: self.dt_layernorm.eps,
            dt_proj: self.dt_proj.weight.val(),
            a: constants.a,
            d: constants.d,
            delta_bias: constants.delta_bias,
            out_proj: self.out_proj.weight.val(),
            out_bias: self.out_proj.bias.as_ref().map(|b| b.val()),
        };
        let (out, ssm_state) = ssm_step(x, z, ssm_state, weights);
        state.ssm = ssm_state;
        out.unsqueeze_dim(1)
    }

    /// The decoding constants of `state`, derived from the weights at its first step.
    pub(crate) fn step_constants(&self, state: &mut MambaState<B>) -> MambaConstants<B> {
        state
            .constants
            .get_or_insert_with(|| self.ssm_constants())
            .clone()
    }

    /// The scan's `A = -exp(A_log)`, `D` and dt bias, f32.
    fn scan_constants(&self) -> (Tensor<B, 2>, Tensor<B, 1>, Option<Tensor<B, 1>>) {
        let f32 = |t: Tensor<B, 1>| t.cast(DType::F32);
        (
            self.a_log.val().cast(DType::F32).exp().neg(),
            f32(self.d.val()),
            self.dt_proj.bias.as_ref().map(|b| f32(b.val())),
        )
    }

    /// The layer's parameters as the decoding kernels take them (see [`MambaConstants`]).
    fn ssm_constants(&self) -> MambaConstants<B> {
        let (a, d, delta_bias) = self.scan_constants();
        MambaConstants {
            a,
            d,
            delta_bias,
            conv_weight: self
                .conv1d
                .weight
                .val()
                .reshape([self.d_inner, self.d_conv])
                .cast(DType::F32),
            conv_bias: self.conv1d.bias.as_ref().map(|b| b.val().cast(DType::F32)),
            stand_in: Tensor::empty([0, 0, 0], (&self.d.val().device(), DType::F32)),
        }
    }

    /// The dt, B and C RMSNorms of the x_proj output `[rows, dt_rank + 2 d_state]` (one
    /// kernel where the backend has it).
    fn ssm_norms(&self, params: Tensor<B, 2>) -> [Tensor<B, 2>; 3] {
        let norms = [&self.dt_layernorm, &self.b_layernorm, &self.c_layernorm];
        let mut out = B::rms_norms(
            params,
            norms.iter().map(|n| n.weight.val()).collect(),
            self.dt_layernorm.eps,
        )
        .into_iter();
        [(); 3].map(|_| out.next().expect("three norms"))
    }

    pub(crate) fn export(&self, prefix: &str, out: &mut Export<B>) {
        self.in_proj.export(&format!("{prefix}.in_proj"), out);
        export_param(out, format!("{prefix}.conv1d.weight"), &self.conv1d.weight);
        if let Some(b) = &self.conv1d.bias {
            export_param(out, format!("{prefix}.conv1d.bias"), b);
        }
        self.x_proj.export(&format!("{prefix}.x_proj"), out);
        self.dt_proj.export(&format!("{prefix}.dt_proj"), out);
        export_param(out, format!("{prefix}.A_log"), &self.a_log);
        export_param(out, format!("{prefix}.D"), &self.d);
        self.out_proj.export(&format!("{prefix}.out_proj"), out);
        self.dt_layernorm
            .export(&format!("{prefix}.dt_layernorm"), out);
        self.b_layernorm
            .export(&format!("{prefix}.b_layernorm"), out);
        self.c_layernorm
            .export(&format!("{prefix}.c_layernorm"), out);
    }
}

/// The last `keep` positions of `previous ++ x` along time (`previous` being zeros when absent).
fn last_inputs<B: Backend>(
    previous: Option<Tensor<B, 3>>,
    x: Tensor<B, 3>,
    keep: usize,
) -> Tensor<B, 3> {
    let [batch, channels, len] = x.dims();
    // Only the last `keep` positions are cast and joined: a prefill's `x` is long.
    if len >= keep {
        return x.narrow(2, len - keep, keep).cast(DType::F32);
    }
    let previous = previous
        .unwrap_or_else(|| Tensor::zeros([batch, channels, keep], (&x.device(), DType::F32)));
    Tensor::cat(
        vec![previous.narrow(2, len, keep - len), x.cast(DType::F32)],
        2,
    )
}

/// What [`ssm_step`] reads: `x_proj` (no bias in Jamba), the dt, B and C norms, `dt_proj`, the
/// decoding constants (see [`MambaConstants`]) and `out_proj`.
pub(crate) struct SsmStepWeights<B: Backend> {
    pub x_proj: Tensor<B, 2>,
    pub norms: [Tensor<B, 1>; 3],
    pub eps: f64,
    pub dt_proj: Tensor<B, 2>,
    pub a: Tensor<B, 2>,
    pub d: Tensor<B, 1>,
    pub delta_bias: Option<Tensor<B, 1>>,
    pub out_proj: Tensor<B, 2>,
    pub out_bias: Option<Tensor<B, 1>>,
}

/// One decoding position from the conv's output `x` and the gate `z` (`[batch, d_inner]`):
/// `x_proj`, then the norms, `dt_proj` and the state update (one kernel where the backend has
/// it, [`JambaBackend::mamba_step`]), then `out_proj`. Returns the mixer's output `[batch,
/// hidden]` and the new SSM state (`state` is consumed: updated in place where it can be).
/// The operation-by-operation step and the layer's composite step ([`crate::step`]) share it.
pub(crate) fn ssm_step<B: JambaBackend>(
    x: Tensor<B, 2>,
    z: Tensor<B, 2>,
    state: Tensor<B, 3>,
    w: SsmStepWeights<B>,
) -> (Tensor<B, 2>, Tensor<B, 3>) {
    let params = <B as JambaBackend>::linear(x.clone(), w.x_proj, None); // [batch, r + 2n]
    let (y, state) = B::mamba_step(MambaStep {
        state,
        x,
        z: Some(z),
        params,
        norms: w.norms,
        eps: w.eps,
        dt_proj: w.dt_proj,
        a: w.a,
        d: w.d,
        delta_bias: w.delta_bias,
        delta_softplus: true,
    });
    (
        <B as JambaBackend>::linear(y, w.out_proj, w.out_bias),
        state,
    )
}

/// `x` `[batch, len, n]` as `[batch, n, len]` with the positions adjacent in memory: a reshape
/// of the transposed view to fewer dimensions, which copies it into that layout.
fn time_major<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [batch, len, n] = x.dims();
    x.swap_dims(1, 2)
        .reshape([batch * n, len])
        .reshape([batch, n, len])
}

/// `x @ weight^T` for `x` `[batch, d_in, len]` laid out channels-major (positions adjacent),
/// returned as `[batch, len, d_out]`. With one sequence, the product reads `x` through its
/// transposed 2-D view (`[d_in, len]` reshaped while contiguous, then transposed: no copy
/// unless the backend padded `x`'s rows, as CUDA does for lengths whose rows are not a multiple
/// of its pitch); several sequences are brought to `[batch * len, d_in]` first (a copy: no 2-D
/// view of that shape exists).
fn linear_channels_major<B: JambaBackend>(x: Tensor<B, 3>, layer: &Linear<B>) -> Tensor<B, 3> {
    let [batch, d_in, len] = x.dims();
    if batch != 1 {
        return layer.forward(x.swap_dims(1, 2));
    }
    let y = <B as JambaBackend>::linear(
        x.reshape([d_in, len]).transpose(),
        layer.weight.val(),
        layer.bias.as_ref().map(|b| b.val()),
    );
    let d_out = y.dims()[1];
    y.reshape([1, len, d_out])
}

/// `x @ weight^T` over the last dimension through `JambaBackend::linear`.
fn project<B: JambaBackend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 2>) -> Tensor<B, D> {
    let shape = x.dims();
    let rows = shape.iter().take(D - 1).product();
    let y = <B as JambaBackend>::linear(x.reshape([rows, shape[D - 1]]), weight, None);
    let mut out = shape;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

/// `x @ weight^T` for `x` `[batch, len, d_in]`, returned as `[batch, d_out, len]` with the
/// positions adjacent in memory (a time stride of 1): computed as `weight @ x^T` through
/// `JambaBackend::linear` with the two operands' roles swapped (the weight cast to the
/// activations' dtype first, as `linear` does), so no transpose is copied.
fn project_channels_major<B: JambaBackend>(x: Tensor<B, 3>, weight: Tensor<B, 2>) -> Tensor<B, 3> {
    let [batch, len, d_in] = x.dims();
    let d_out = weight.dims()[0];
    let weight = match weight.dtype() == x.dtype() {
        true => weight,
        false => weight.cast(x.dtype()),
    };
    let y = <B as JambaBackend>::linear(weight, x.reshape([batch * len, d_in]), None);
    y.reshape([d_out, batch, len]).swap_dims(0, 1)
}
