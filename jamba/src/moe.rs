//! The feed-forward half of a layer: a SwiGLU MLP (`JambaMLP`) or a sparse mixture of SwiGLU experts
//! (`JambaSparseMoeBlock`): softmax over all experts in f32, top-k, **no** renormalisation of the k
//! weights, dropless.

use burn::module::{Module, Param};
use burn::tensor::{activation, backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::config::JambaConfig;
use crate::error::Result;
use crate::nn::{export_experts, Export, Linear};
use crate::parallel::transfer;
use crate::weights::{Init, Weights};
use jamba_kernels::{JambaBackend, MoeInput};

/// `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct JambaMlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: JambaBackend> JambaMlp<B> {
    pub fn new(cfg: &JambaConfig, w: &mut Weights<B>, prefix: &str) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::new(w, &format!("{prefix}.gate_proj"), h, i, false)?,
            up_proj: Linear::new(w, &format!("{prefix}.up_proj"), h, i, false)?,
            down_proj: Linear::new(w, &format!("{prefix}.down_proj"), i, h, false)?,
        })
    }

    /// Through [`JambaBackend::swiglu_mlp`] (two decoding kernels for a few rows).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let shape = x.dims();
        let rows = shape.iter().take(D - 1).product();
        let y = B::swiglu_mlp(
            x.reshape([rows, shape[D - 1]]),
            self.gate_proj.weight.val(),
            self.up_proj.weight.val(),
            self.down_proj.weight.val(),
        );
        let mut out = shape;
        out[D - 1] = y.dims()[1];
        y.reshape(out)
    }

    pub(crate) fn export(&self, prefix: &str, out: &mut Export<B>) {
        self.gate_proj.export(&format!("{prefix}.gate_proj"), out);
        self.up_proj.export(&format!("{prefix}.up_proj"), out);
        self.down_proj.export(&format!("{prefix}.down_proj"), out);
    }
}

/// Experts of one layer, stacked as in transformers 5 (`JambaExperts`):
/// `gate_up_proj` `[E, 2I, H]` (rows `[0, I)` gate, `[I, 2I)` up) and `down_proj` `[E, H, I]`.
/// With expert parallelism a layer has one of these per device, each holding the experts
/// `first..first + E` of the layer.
#[derive(Module, Debug)]
pub struct JambaExperts<B: Backend> {
    pub gate_up_proj: Param<Tensor<B, 3>>,
    pub down_proj: Param<Tensor<B, 3>>,
    /// The layer's index of the first expert held here (0 unless the experts are split).
    pub first: usize,
}

impl<B: Backend> JambaExperts<B> {
    /// All the layer's experts on the current device, or one group per device of the weights'
    /// [`crate::parallel::DeviceMap`]. Reads either the fused keys (`experts.gate_up_proj`,
    /// `experts.down_proj`) or the Hub's per-expert keys (`experts.{e}.{gate,up,down}_proj.weight`).
    pub fn load(cfg: &JambaConfig, w: &mut Weights<B>, prefix: &str) -> Result<Vec<Self>> {
        let e = cfg.num_experts;
        let groups: Vec<(std::ops::Range<usize>, B::Device)> = match w.device_map() {
            Some(map) => (0..map.devices().len())
                .map(|k| (map.experts(k, e), map.devices()[k].clone()))
                .filter(|(r, _)| !r.is_empty())
                .collect(),
            None => vec![(0..e, w.device().clone())],
        };
        let home = w.device().clone();
        let mut out = Vec::with_capacity(groups.len());
        for (experts, device) in groups {
            w.set_device(device);
            out.push(Self::new(cfg, w, prefix, experts)?);
        }
        w.set_device(home);
        Ok(out)
    }

    /// The experts `experts` of the layer, on the weights' current device.
    pub fn new(
        cfg: &JambaConfig,
        w: &mut Weights<B>,
        prefix: &str,
        experts: std::ops::Range<usize>,
    ) -> Result<Self> {
        let (e, h, i) = (cfg.num_experts, cfg.hidden_size, cfg.intermediate_size);
        let fused_gate_up = format!("{prefix}.gate_up_proj");
        let fused_down = format!("{prefix}.down_proj");
        let first = experts.start;
        if !w.is_checkpoint() || w.contains(&fused_gate_up) || w.contains(&fused_down) {
            let gate_up =
                w.tensor_rows(&fused_gate_up, [e, 2 * i, h], experts.clone(), Init::Normal)?;
            let down = w.tensor_rows(&fused_down, [e, h, i], experts, Init::Normal)?;
            return Ok(Self {
                gate_up_proj: Param::from_tensor(gate_up),
                down_proj: Param::from_tensor(down),
                first,
            });
        }
        let mut gate_up = Vec::with_capacity(experts.len());
        let mut down = Vec::with_capacity(experts.len());
        for x in experts {
            let gate = w.tensor(
                &format!("{prefix}.{x}.gate_proj.weight"),
                [i, h],
                Init::Normal,
            )?;
            let up = w.tensor(
                &format!("{prefix}.{x}.up_proj.weight"),
                [i, h],
                Init::Normal,
            )?;
            gate_up.push(Tensor::cat(vec![gate, up], 0));
            down.push(w.tensor(
                &format!("{prefix}.{x}.down_proj.weight"),
                [h, i],
                Init::Normal,
            )?);
        }
        Ok(Self {
            gate_up_proj: Param::from_tensor(Tensor::stack(gate_up, 0)),
            down_proj: Param::from_tensor(Tensor::stack(down, 0)),
            first,
        })
    }

    /// Number of experts held here.
    pub fn num_experts(&self) -> usize {
        self.down_proj.dims()[0]
    }

    /// The layer's experts held here.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.num_experts()
    }

    /// The device the experts live on.
    pub fn device(&self) -> B::Device {
        self.down_proj.val().device()
    }

    /// Local expert `e` (0-based here) applied to `x` `[n, H]`.
    fn expert(&self, e: usize, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [_, two_i, h] = self.gate_up_proj.dims();
        let i = two_i / 2;
        let gate_up = self.gate_up_proj.val().narrow(0, e, 1).reshape([two_i, h]);
        let down = self.down_proj.val().narrow(0, e, 1).reshape([h, i]);
        let gu = x.matmul(gate_up.transpose());
        let act = activation::silu(gu.clone().narrow(1, 0, i)) * gu.narrow(1, i, i);
        act.matmul(down.transpose())
    }

    /// Both tensors under their fused names (see [`crate::nn::hub_split`] for the Hub layout).
    pub(crate) fn export(&self, prefix: &str, out: &mut Export<B>) {
        export_experts(
            out,
            format!("{prefix}.gate_up_proj"),
            &self.gate_up_proj,
            self.first,
        );
        export_experts(
            out,
            format!("{prefix}.down_proj"),
            &self.down_proj,
            self.first,
        );
    }
}

/// `JambaSparseMoeBlock`: a linear router (no bias) and the experts.
#[derive(Module, Debug)]
pub struct JambaSparseMoeBlock<B: Backend> {
    pub router: Linear<B>,
    /// All experts, or with expert parallelism one group per device, in expert order.
    pub experts: Vec<JambaExperts<B>>,
    pub top_k: usize,
}

impl<B: JambaBackend> JambaSparseMoeBlock<B> {
    pub fn new(cfg: &JambaConfig, w: &mut Weights<B>, prefix: &str) -> Result<Self> {
        Ok(Self {
            router: Linear::new(
                w,
                &format!("{prefix}.router"),
                cfg.hidden_size,
                cfg.num_experts,
                false,
            )?,
            experts: JambaExperts::load(cfg, w, &format!("{prefix}.experts"))?,
            top_k: cfg.num_experts_per_tok,
        })
    }

    /// Number of experts of the layer.
    pub fn num_experts(&self) -> usize {
        self.experts.iter().map(JambaExperts::num_experts).sum()
    }

    /// Returns the output `[batch, len, hidden]` and the router logits `[batch * len, experts]`.
    /// The output is on the router's device; experts on other devices get the tokens there.
    pub fn forward(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 2>) {
        let [batch, len, hidden] = x.dims();
        let (out, logits) = self.forward_rows(x.reshape([batch * len, hidden]));
        (out.reshape([batch, len, hidden]), logits)
    }

    /// [`Self::forward`] on the tokens' rows `x` `[tokens, hidden]`.
    pub fn forward_rows(&self, x: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let [tokens, hidden] = x.dims();
        let device = x.device();
        // Routing in f32: a near-tie between experts must not flip with the logits' rounding.
        // The weights `[tokens, k]` stay f32 here: the experts round them to the activations'
        // dtype (transformers' `routing_weights.to(hidden_states.dtype)`) where they use them.
        let (router_logits, weights, chosen) =
            B::moe_router(x.clone(), self.router.weight.val(), self.top_k);
        let mut out: Option<Tensor<B, 2>> = None;
        let mut add = |part: Tensor<B, 2>| {
            let part = transfer(part, &device);
            out = Some(match out.take() {
                Some(o) => o + part,
                None => part,
            });
        };

        // Sorted by expert on the device (decoding: only the routed experts' weights are read).
        if B::GROUPED_MOE {
            for group in &self.experts {
                let here = group.device();
                add(B::moe_grouped(MoeInput {
                    x: transfer(x.clone(), &here),
                    gate_up: group.gate_up_proj.val(),
                    down: group.down_proj.val(),
                    chosen: transfer(chosen.clone(), &here),
                    weights: transfer(weights.clone(), &here),
                    first: group.first,
                }));
            }
            return (out.expect("a layer has experts"), router_logits);
        }

        // Group (token, slot) pairs by expert on the host: routing is data-dependent.
        let chosen_host: Vec<i64> = chosen
            .into_data()
            .convert::<i64>()
            .to_vec()
            .expect("int data");
        let mut rows: Vec<Vec<i64>> = vec![Vec::new(); self.num_experts()];
        for (pair, &e) in chosen_host.iter().enumerate() {
            rows[e as usize].push(pair as i64);
        }
        let flat_weights = weights.cast(x.dtype()).reshape([tokens * self.top_k, 1]);
        for group in &self.experts {
            let r = group.range();
            if rows[r.clone()].iter().all(Vec::is_empty) {
                continue;
            }
            let here = group.device();
            let (x, flat_weights) = (
                transfer(x.clone(), &here),
                transfer(flat_weights.clone(), &here),
            );
            let mut part = Tensor::<B, 2>::zeros([tokens, hidden], (&here, x.dtype()));
            for e in r.clone() {
                let pairs = std::mem::take(&mut rows[e]);
                if pairs.is_empty() {
                    continue;
                }
                let n = pairs.len();
                let token_idx: Vec<i64> = pairs.iter().map(|p| p / self.top_k as i64).collect();
                let pair_idx = Tensor::<B, 1, Int>::from_data(TensorData::new(pairs, [n]), &here);
                let token_idx =
                    Tensor::<B, 1, Int>::from_data(TensorData::new(token_idx, [n]), &here);
                let y = group.expert(e - r.start, x.clone().select(0, token_idx.clone()));
                let w = flat_weights.clone().select(0, pair_idx);
                part = part.select_assign(
                    0,
                    token_idx,
                    y * w.expand([n, hidden]),
                    IndexingUpdateOp::Add,
                );
            }
            add(part);
        }
        let out = out.unwrap_or_else(|| Tensor::zeros([tokens, hidden], (&device, x.dtype())));
        (out, router_logits)
    }

    pub(crate) fn export(&self, prefix: &str, out: &mut Export<B>) {
        self.router.export(&format!("{prefix}.router"), out);
        for group in &self.experts {
            group.export(&format!("{prefix}.experts"), out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;

    #[test]
    fn host_grouping_matches_every_expert_on_every_token() {
        let cfg = JambaConfig {
            hidden_size: 24,
            intermediate_size: 20,
            num_experts: 5,
            num_experts_per_tok: 2,
            ..JambaConfig::default()
        };
        let dev = Default::default();
        let mut w = Weights::<B>::random(0.2, &dev, burn::tensor::DType::F32);
        let block = JambaSparseMoeBlock::new(&cfg, &mut w, "moe").unwrap();
        let x = Tensor::<B, 3>::random([3, 7, 24], Distribution::Normal(0.0, 1.0), &dev);
        // ndarray has no grouped kernel: the forward groups the tokens on the host.
        let (grouped, logits) = block.forward(x.clone());
        // The dense form (the kernels' oracle), from the same routing.
        let (weights, chosen) = B::moe_route(logits, block.top_k);
        let dense = B::moe_grouped(MoeInput {
            x: x.reshape([21, 24]),
            gate_up: block.experts[0].gate_up_proj.val(),
            down: block.experts[0].down_proj.val(),
            chosen,
            weights,
            first: 0,
        })
        .reshape([3, 7, 24]);
        let scale = grouped.clone().abs().max().into_scalar();
        let diff = (dense - grouped).abs().max().into_scalar();
        assert!(
            scale > 0.1,
            "the experts produced (almost) nothing: {scale}"
        );
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "dense vs grouped: {diff} (scale {scale})"
        );
    }
}
