//! One decoding position through a whole decoder layer as one operation
//! ([`JambaBackend::composite`]).
//!
//! The layer's norms, mixer step and feed-forward are the same operations as in
//! [`JambaDecoderLayer::forward_rows`], on the residual stream's rows `[batch, hidden]`. A fused
//! backend then registers one operation per layer and token instead of about twenty (the
//! kernels are the same), which is what decoding at batch 1 is bound by there.

use burn::tensor::{backend::Backend, DType, Tensor};
use jamba_kernels::{Args, Composite, JambaBackend, MambaInProjStep, MoeInput};

use crate::layer::{FeedForward, JambaDecoderLayer, LayerState, Mixer};
use crate::mamba::{ssm_step, SsmStepWeights};

/// What a layer's step computes, beyond its tensors.
struct LayerStep {
    batch: usize,
    hidden: usize,
    /// The feed-forward output's dtype (the pre-feed-forward norm weight's).
    dtype: DType,
    /// The previous layer's feed-forward output is still to be added to the stream.
    pending: bool,
    input_eps: f64,
    pre_ff_eps: f64,
    mixer: MixerStep,
    ff: FeedForwardStep,
}

enum MixerStep {
    Mamba {
        d_inner: usize,
        d_conv: usize,
        d_state: usize,
        /// The dt, B and C norms' epsilon.
        eps: f64,
        in_bias: bool,
        conv_bias: bool,
        delta_bias: bool,
        out_bias: bool,
    },
    Attention {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        /// Positions cached before this one.
        past: usize,
        /// The cache buffers' `[batch, kv_heads, capacity, head_dim]` and dtype.
        buffer: [usize; 4],
        buffer_dtype: DType,
    },
}

/// A mixer's state after the step.
enum MixerState<B: Backend> {
    Mamba(Tensor<B, 3>, Tensor<B, 3>),
    Attention(Tensor<B, 4>, Tensor<B, 4>),
}

enum FeedForwardStep {
    Mlp,
    Moe { experts: usize, top_k: usize },
}

impl Composite for LayerStep {
    const NAME: &'static str = "jamba_layer_step";

    /// The stream `[batch, hidden]` f32 and the feed-forward output in the dtype; the mixer's
    /// new state (Mamba: conv and SSM, f32; attention: the key and value buffers); the router's
    /// f32 logits `[batch, experts]` for a MoE layer.
    fn outputs(&self) -> Vec<(Vec<usize>, DType)> {
        let rows = vec![self.batch, self.hidden];
        let mut out = vec![(rows.clone(), DType::F32), (rows, self.dtype)];
        match &self.mixer {
            MixerStep::Mamba {
                d_inner,
                d_conv,
                d_state,
                ..
            } => {
                out.push((vec![self.batch, *d_inner, d_conv - 1], DType::F32));
                out.push((vec![self.batch, *d_inner, *d_state], DType::F32));
            }
            MixerStep::Attention {
                buffer,
                buffer_dtype,
                ..
            } => {
                out.push((buffer.to_vec(), *buffer_dtype));
                out.push((buffer.to_vec(), *buffer_dtype));
            }
        }
        if let FeedForwardStep::Moe { experts, .. } = self.ff {
            out.push((vec![self.batch, experts], DType::F32));
        }
        out
    }

    /// The order of the inputs is [`decode_step`]'s.
    fn run<B: JambaBackend>(&self, mut a: Args<B>) -> Args<B> {
        let x: Tensor<B, 2> = a.take();
        let pending = a.take_opt::<2>(self.pending);
        let input_norm = a.take::<1>();
        let (x, h) = match pending {
            Some(ff) => B::add_rms_norm(x, ff, input_norm, self.input_eps),
            None => {
                let h = B::rms_norm(x.clone(), input_norm, self.input_eps);
                (x, h)
            }
        };
        let (h, state) = match &self.mixer {
            MixerStep::Mamba {
                eps,
                in_bias,
                conv_bias,
                delta_bias,
                out_bias,
                ..
            } => {
                let weight = a.take();
                let bias = a.take_opt(*in_bias);
                let conv_state = a.take();
                let conv_weight = a.take();
                let conv_bias = a.take_opt(*conv_bias);
                let ssm_state = a.take();
                let (xc, z, conv_state) = B::mamba_in_proj_step(MambaInProjStep {
                    x: h,
                    weight,
                    bias,
                    conv_state,
                    conv_weight,
                    conv_bias,
                });
                let weights = SsmStepWeights {
                    x_proj: a.take(),
                    norms: [a.take(), a.take(), a.take()],
                    eps: *eps,
                    dt_proj: a.take(),
                    a: a.take(),
                    d: a.take(),
                    delta_bias: a.take_opt(*delta_bias),
                    out_proj: a.take(),
                    out_bias: a.take_opt(*out_bias),
                };
                let (h, ssm_state) = ssm_step(xc, z, ssm_state, weights);
                (h, MixerState::Mamba(conv_state, ssm_state))
            }
            MixerStep::Attention {
                heads,
                kv_heads,
                head_dim,
                past,
                ..
            } => {
                let (batch, nh, nkv, hd) = (self.batch, *heads, *kv_heads, *head_dim);
                let q = <B as JambaBackend>::linear(h.clone(), a.take(), None)
                    .reshape([batch, nh, 1, hd]);
                let k = <B as JambaBackend>::linear(h.clone(), a.take(), None)
                    .reshape([batch, nkv, 1, hd]);
                let v = <B as JambaBackend>::linear(h, a.take(), None).reshape([batch, nkv, 1, hd]);
                let o_proj = a.take();
                let (keys, values): (Tensor<B, 4>, Tensor<B, 4>) = (a.take(), a.take());
                // The buffers arrive uniquely held: the appends write in place.
                let range = [0..batch, 0..nkv, *past..past + 1, 0..hd];
                let keys = keys.slice_assign(range.clone(), k);
                let values = values.slice_assign(range, v);
                let y = B::decode_attention(q, keys.clone(), values.clone(), past + 1);
                let h = <B as JambaBackend>::linear(y.reshape([batch, nh * hd]), o_proj, None);
                (h, MixerState::Attention(keys, values))
            }
        };
        let (x, h) = B::add_rms_norm(x, h, a.take(), self.pre_ff_eps);
        let (ff, logits) = match self.ff {
            FeedForwardStep::Mlp => {
                let (gate, up, down) = (a.take(), a.take(), a.take());
                (B::swiglu_mlp(h, gate, up, down), None)
            }
            FeedForwardStep::Moe { top_k, .. } => {
                let router = a.take();
                let (logits, weights, chosen) = B::moe_router(h.clone(), router, top_k);
                let ff = B::moe_grouped(MoeInput {
                    x: h,
                    gate_up: a.take(),
                    down: a.take(),
                    chosen,
                    weights,
                    first: 0,
                });
                (ff, Some(logits))
            }
        };
        assert!(a.is_empty(), "a layer step left inputs unread");
        // The stream and the feed-forward output first (see `outputs`).
        let mut result = Args::new();
        result.push(x);
        result.push(ff);
        match state {
            MixerState::Mamba(conv, ssm) => {
                result.push(conv);
                result.push(ssm);
            }
            MixerState::Attention(keys, values) => {
                result.push(keys);
                result.push(values);
            }
        }
        result.push_opt(logits);
        result
    }
}

impl<B: JambaBackend> JambaDecoderLayer<B> {
    /// Whether [`decode_step`] can run this layer: always, except for a MoE layer whose
    /// experts are not all on the layer's device, or on a backend that groups the tokens by
    /// expert on the host (`JambaBackend::GROUPED_MOE` false: the step must not read back).
    pub(crate) fn steps_as_one(&self) -> bool {
        match &self.feed_forward {
            FeedForward::Mlp(_) => true,
            FeedForward::Moe(moe) => {
                B::GROUPED_MOE
                    && moe.experts.len() == 1
                    && moe.experts[0].first == 0
                    && moe.experts[0].device() == self.device()
            }
        }
    }
}

/// One decoding position (`x` `[batch, hidden]` f32, the residual stream without `pending`, the
/// previous layer's feed-forward output) through `layer` as one [`Composite`]; updates `state`.
/// Returns what [`JambaDecoderLayer::forward_rows`] returns. Only for layers that
/// [`JambaDecoderLayer::steps_as_one`], on sequences without padding.
pub(crate) fn decode_step<B: JambaBackend>(
    layer: &JambaDecoderLayer<B>,
    x: Tensor<B, 2>,
    pending: Option<Tensor<B, 2>>,
    state: &mut LayerState<B>,
) -> (Tensor<B, 2>, Tensor<B, 2>, Option<Tensor<B, 2>>) {
    let [batch, hidden] = x.dims();
    let mut a = Args::new();
    let step_pending = pending.is_some();
    a.push(x);
    a.push_opt(pending);
    a.push(layer.input_layernorm.weight.val());
    let mixer = match (&layer.mixer, &mut *state) {
        (Mixer::Mamba(m), LayerState::Mamba(s)) => {
            let c = m.step_constants(s);
            // Moved out (the stand-in takes their place) so that the step holds the states'
            // only references and updates them in place.
            let conv_state = std::mem::replace(&mut s.conv, c.stand_in.clone());
            let ssm_state = std::mem::replace(&mut s.ssm, c.stand_in.clone());
            let in_bias = m.in_proj.bias.as_ref().map(|b| b.val());
            let out_bias = m.out_proj.bias.as_ref().map(|b| b.val());
            let step = MixerStep::Mamba {
                d_inner: m.d_inner,
                d_conv: m.d_conv,
                d_state: m.d_state,
                eps: m.dt_layernorm.eps,
                in_bias: in_bias.is_some(),
                conv_bias: c.conv_bias.is_some(),
                delta_bias: c.delta_bias.is_some(),
                out_bias: out_bias.is_some(),
            };
            a.push(m.in_proj.weight.val());
            a.push_opt(in_bias);
            a.push(conv_state);
            a.push(c.conv_weight);
            a.push_opt(c.conv_bias);
            a.push(ssm_state);
            a.push(m.x_proj.weight.val());
            a.push(m.dt_layernorm.weight.val());
            a.push(m.b_layernorm.weight.val());
            a.push(m.c_layernorm.weight.val());
            a.push(m.dt_proj.weight.val());
            a.push(c.a);
            a.push(c.d);
            a.push_opt(c.delta_bias);
            a.push(m.out_proj.weight.val());
            a.push_opt(out_bias);
            step
        }
        (Mixer::Attention(attn), LayerState::Attention(kv)) => {
            kv.reserve(1);
            let past = kv.len();
            let (keys, values) = kv.take_buffers();
            let step = MixerStep::Attention {
                heads: attn.num_heads,
                kv_heads: attn.num_kv_heads,
                head_dim: attn.head_dim,
                past,
                buffer: keys.dims(),
                buffer_dtype: keys.dtype(),
            };
            a.push(attn.q_proj.weight.val());
            a.push(attn.k_proj.weight.val());
            a.push(attn.v_proj.weight.val());
            a.push(attn.o_proj.weight.val());
            a.push(keys);
            a.push(values);
            step
        }
        _ => unreachable!(
            "a layer's state always matches its mixer (the cache is built from the model)"
        ),
    };
    a.push(layer.pre_ff_layernorm.weight.val());
    let ff = match &layer.feed_forward {
        FeedForward::Mlp(mlp) => {
            a.push(mlp.gate_proj.weight.val());
            a.push(mlp.up_proj.weight.val());
            a.push(mlp.down_proj.weight.val());
            FeedForwardStep::Mlp
        }
        FeedForward::Moe(moe) => {
            let experts = &moe.experts[0];
            a.push(moe.router.weight.val());
            a.push(experts.gate_up_proj.val());
            a.push(experts.down_proj.val());
            FeedForwardStep::Moe {
                experts: moe.num_experts(),
                top_k: moe.top_k,
            }
        }
    };
    let step = LayerStep {
        batch,
        hidden,
        dtype: layer.pre_ff_layernorm.weight.val().dtype(),
        pending: step_pending,
        input_eps: layer.input_layernorm.eps,
        pre_ff_eps: layer.pre_ff_layernorm.eps,
        mixer,
        ff,
    };
    let mut out = B::composite(step, a);
    let x = out.take();
    let ff = out.take();
    match state {
        LayerState::Mamba(s) => {
            s.conv = out.take();
            s.ssm = out.take();
        }
        LayerState::Attention(kv) => {
            let (keys, values) = (out.take(), out.take());
            kv.restore_buffers(keys, values, 1);
        }
    }
    let logits = (!out.is_empty()).then(|| out.take());
    (x, ff, logits)
}
