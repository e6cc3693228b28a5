//! One decoder layer: pre-norm mixer (attention or Mamba) and pre-norm feed-forward (MLP or MoE),
//! each with a residual connection (`JambaAttentionDecoderLayer` / `JambaMambaDecoderLayer`).

use burn::module::Module;
use burn::tensor::{backend::Backend, DType, Tensor};
use jamba_kernels::JambaBackend;

use crate::attention::{AttentionMask, JambaAttention, KvCache};
use crate::config::{FeedForwardKind, JambaConfig, MixerKind};
use crate::error::Result;
use crate::mamba::{JambaMambaMixer, MambaState};
use crate::moe::{JambaMlp, JambaSparseMoeBlock};
use crate::nn::{Export, RmsNorm};
use crate::weights::Weights;

/// The sequence mixer of a layer.
// Modules hold parameter handles, not data: the size difference is a few hundred bytes per layer.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Mixer<B: Backend> {
    /// `self_attn` in HF names.
    Attention(JambaAttention<B>),
    /// `mamba` in HF names.
    Mamba(JambaMambaMixer<B>),
}

/// The feed-forward block of a layer (`feed_forward` in HF names).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum FeedForward<B: Backend> {
    Mlp(JambaMlp<B>),
    Moe(JambaSparseMoeBlock<B>),
}

/// Per-layer state carried across calls.
#[derive(Debug, Clone)]
pub enum LayerState<B: Backend> {
    Attention(KvCache<B>),
    Mamba(MambaState<B>),
}

/// Masks prepared once per forward and shared by every layer.
#[derive(Debug, Clone)]
pub struct LayerMasks<B: Backend> {
    /// What attention may not look at.
    pub attention: AttentionMask<B>,
    /// `[batch, len]` of 0/1 in the hidden dtype, for Mamba layers; `None` without padding.
    pub padding: Option<Tensor<B, 2>>,
    /// Keep padded positions from reaching real ones at all (see [`JambaMambaMixer::forward`]).
    pub isolate_padding: bool,
    /// Run a decoding position through each layer operation by operation, not as one
    /// composite operation ([`crate::step`]): the same result.
    pub separate_decode_ops: bool,
}

impl<B: Backend> LayerMasks<B> {
    /// The masks on `device` (for a layer on another device).
    pub fn to_device(self, device: &B::Device) -> Self {
        Self {
            attention: self.attention.to_device(device),
            padding: self.padding.map(|m| crate::parallel::transfer(m, device)),
            isolate_padding: self.isolate_padding,
            separate_decode_ops: self.separate_decode_ops,
        }
    }
}

/// `JambaAttentionDecoderLayer` or `JambaMambaDecoderLayer`.
#[derive(Module, Debug)]
pub struct JambaDecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub mixer: Mixer<B>,
    pub pre_ff_layernorm: RmsNorm<B>,
    pub feed_forward: FeedForward<B>,
}

impl<B: JambaBackend> JambaDecoderLayer<B> {
    pub fn new(cfg: &JambaConfig, w: &mut Weights<B>, prefix: &str, index: usize) -> Result<Self> {
        let p = |name: &str| format!("{prefix}.{name}");
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::new(w, &p("input_layernorm"), h, eps)?,
            mixer: match cfg.mixer_kind(index) {
                MixerKind::Attention => {
                    Mixer::Attention(JambaAttention::new(cfg, w, &p("self_attn"))?)
                }
                MixerKind::Mamba => Mixer::Mamba(JambaMambaMixer::new(cfg, w, &p("mamba"))?),
            },
            pre_ff_layernorm: RmsNorm::new(w, &p("pre_ff_layernorm"), h, eps)?,
            feed_forward: match cfg.feed_forward_kind(index) {
                FeedForwardKind::Dense => {
                    FeedForward::Mlp(JambaMlp::new(cfg, w, &p("feed_forward"))?)
                }
                FeedForwardKind::Moe => {
                    FeedForward::Moe(JambaSparseMoeBlock::new(cfg, w, &p("feed_forward"))?)
                }
            },
        })
    }

    /// The device of the layer's weights (its experts may be spread over others).
    pub fn device(&self) -> B::Device {
        self.input_layernorm.weight.val().device()
    }

    /// `x` is the residual stream (f32 whatever the weights' dtype, so rounding does not accumulate
    /// over layers). Returns the layer output and, for MoE layers, the router logits.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        masks: &LayerMasks<B>,
        state: Option<&mut LayerState<B>>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 2>>) {
        let [batch, len, hidden] = x.dims();
        let x = x.reshape([batch * len, hidden]);
        let (x, ff, router_logits) = self.forward_rows(x, None, [batch, len], masks, state);
        let x = x + ff.cast(DType::F32);
        (x.reshape([batch, len, hidden]), router_logits)
    }

    /// [`Self::forward`] on the residual stream's rows `x` `[batch * len, hidden]` (f32), with
    /// the last residual add left to the caller: `pending` is the previous layer's feed-forward
    /// output, still to be added to `x`, and the returned triple is the stream without this
    /// layer's feed-forward output, that output, and the router logits. Each add then goes with
    /// the RMSNorm that follows it ([`JambaBackend::add_rms_norm`]: one kernel where the backend
    /// has it), and the stream keeps one rank from layer to layer (a fused backend registers
    /// every reshape).
    ///
    /// One decoding position without padding runs as one operation ([`crate::step`]).
    pub fn forward_rows(
        &self,
        x: Tensor<B, 2>,
        pending: Option<Tensor<B, 2>>,
        [batch, len]: [usize; 2],
        masks: &LayerMasks<B>,
        state: Option<&mut LayerState<B>>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>, Option<Tensor<B, 2>>) {
        let one_step = len == 1
            && !masks.separate_decode_ops
            && masks.padding.is_none()
            && matches!(masks.attention, AttentionMask::None)
            && self.steps_as_one();
        let state = match state {
            Some(state) if one_step => return crate::step::decode_step(self, x, pending, state),
            state => state,
        };
        let hidden = x.dims()[1];
        let (x, h) = add_norm(x, pending, &self.input_layernorm);
        let h = h.reshape([batch, len, hidden]);
        let h = match (&self.mixer, state) {
            (Mixer::Attention(attn), Some(LayerState::Attention(kv))) => {
                attn.forward(h, &masks.attention, Some(kv))
            }
            (Mixer::Attention(attn), None) => attn.forward(h, &masks.attention, None),
            (Mixer::Mamba(mamba), Some(LayerState::Mamba(s))) => {
                mamba.forward(h, masks.padding.as_ref(), masks.isolate_padding, Some(s))
            }
            (Mixer::Mamba(mamba), None) => {
                mamba.forward(h, masks.padding.as_ref(), masks.isolate_padding, None)
            }
            _ => unreachable!(
                "a layer's state always matches its mixer (the cache is built from the model)"
            ),
        };
        let h = h.reshape([batch * len, hidden]);
        let (x, h) = add_norm(x, Some(h), &self.pre_ff_layernorm);
        let (h, router_logits) = match &self.feed_forward {
            FeedForward::Mlp(mlp) => (mlp.forward(h), None),
            FeedForward::Moe(moe) => {
                let (out, logits) = moe.forward_rows(h);
                (out, Some(logits))
            }
        };
        (x, h, router_logits)
    }

    pub(crate) fn export(&self, prefix: &str, out: &mut Export<B>) {
        self.input_layernorm
            .export(&format!("{prefix}.input_layernorm"), out);
        match &self.mixer {
            Mixer::Attention(a) => a.export(&format!("{prefix}.self_attn"), out),
            Mixer::Mamba(m) => m.export(&format!("{prefix}.mamba"), out),
        }
        self.pre_ff_layernorm
            .export(&format!("{prefix}.pre_ff_layernorm"), out);
        match &self.feed_forward {
            FeedForward::Mlp(m) => m.export(&format!("{prefix}.feed_forward"), out),
            FeedForward::Moe(m) => m.export(&format!("{prefix}.feed_forward"), out),
        }
    }
}

/// `x + h` (the f32 residual stream, rows `[n, hidden]`) and `norm` of that sum, in one pass
/// where the backend can; without `h`, `x` and its norm.
pub(crate) fn add_norm<B: JambaBackend>(
    x: Tensor<B, 2>,
    h: Option<Tensor<B, 2>>,
    norm: &RmsNorm<B>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    match h {
        Some(h) => B::add_rms_norm(x, h, norm.weight.val(), norm.eps),
        None => {
            let h = norm.forward(x.clone());
            (x, h)
        }
    }
}
