//! Training: transformers' losses, AdamW with f32 state, warmup + cosine schedule, clipping by the
//! global gradient norm, and optimizer state that saves and resumes exactly.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{
    activation, backend::Backend, DType, IndexingUpdateOp, Int, Tensor, TensorData,
};
use jamba_kernels::JambaBackend;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{read_all, write_atomic, write_safetensors};
use crate::error::{JambaError, Result};
use crate::model::{ForwardOptions, JambaForCausalLM, TokenBatch};
use crate::nn::ParamTensor;

/// Label value that the loss ignores (padding), as in PyTorch.
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy of `logits[:, t]` predicting `labels[:, t + 1]`, skipping `IGNORE_INDEX`
/// (`ForCausalLMLoss`). Computed in f32. Sequences need at least two positions.
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let count = labels
        .clone()
        .narrow(1, 1, labels.dims()[1] - 1)
        .not_equal_elem(IGNORE_INDEX)
        .float()
        .sum()
        .clamp_min(1.0);
    causal_lm_nll_sum(logits, labels) / count
}

/// The sum (not the mean) of [`causal_lm_loss`]'s terms, `[1]` f32.
pub fn causal_lm_nll_sum<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> Tensor<B, 1> {
    let [batch, len, vocab] = logits.dims();
    let n = batch * (len - 1);
    let logits = logits
        .narrow(1, 0, len - 1)
        .cast(DType::F32)
        .reshape([n, vocab]);
    let labels = labels.narrow(1, 1, len - 1).reshape([n]);
    let valid = labels.clone().not_equal_elem(IGNORE_INDEX);
    let safe = labels.mask_fill(valid.clone().bool_not(), 0);
    let picked = activation::log_softmax(logits, 1)
        .gather(1, safe.unsqueeze_dim(1))
        .reshape([n]);
    (picked * valid.float()).sum().neg()
}

/// The load-balancing loss of Switch Transformers over all MoE layers at once, as transformers'
/// `load_balancing_loss_func`: `E * sum_e f_e * P_e`, with `f_e` the share of top-k assignments to
/// expert `e` and `P_e` its mean router probability; `mask` `[batch, len]` (1 = real token)
/// excludes padding from both averages.
pub fn load_balancing_loss<B: Backend>(
    router_logits: &[Tensor<B, 2>],
    num_experts: usize,
    top_k: usize,
    mask: Option<Tensor<B, 2>>,
) -> Tensor<B, 1> {
    use burn::tensor::ElementConversion;
    let real = match &mask {
        Some(m) => m.clone().sum().into_scalar().elem::<f64>() as usize,
        None => router_logits.first().map_or(0, |l| l.dims()[0]),
    };
    let terms = RouterTerms::new(router_logits, top_k, mask, real);
    let (assigned, tokens) = (terms.assigned.clone(), terms.tokens);
    terms.aux_share(assigned, tokens, num_experts)
}

/// The router's part of the loss as sums over tokens, which add up over the shards of a batch.
#[derive(Debug, Clone)]
pub struct RouterTerms<B: Backend> {
    /// Top-k assignments per expert over the real tokens of every MoE layer, `[E]` f32 (constant:
    /// no gradient flows through a top-k choice).
    pub assigned: Tensor<B, 1>,
    /// Router probabilities summed per expert over the same tokens, `[E]` f32.
    pub prob_sum: Tensor<B, 1>,
    /// Real tokens times MoE layers: the denominator of both means.
    pub tokens: f64,
}

impl<B: Backend> RouterTerms<B> {
    /// `router_logits` `[tokens, E]` per MoE layer; `mask` `[batch, len]` of 0/1 (1 = real token)
    /// with `real_tokens` ones (counted on the host, which holds the batch).
    pub fn new(
        router_logits: &[Tensor<B, 2>],
        top_k: usize,
        mask: Option<Tensor<B, 2>>,
        real_tokens: usize,
    ) -> Self {
        let layers = router_logits.len();
        let logits = Tensor::cat(router_logits.to_vec(), 0).cast(DType::F32);
        let [n, e] = logits.dims();
        let probs = activation::softmax(logits, 1);
        let (_, chosen) = probs.clone().topk_with_indices(top_k, 1);
        let device = probs.device();
        let assigned = Tensor::<B, 2>::zeros([n, e], (&device, DType::F32)).scatter(
            1,
            chosen,
            Tensor::ones([n, top_k], (&device, DType::F32)),
            IndexingUpdateOp::Add,
        );
        let weights = match mask {
            // The mask repeats for every MoE layer: logits are stacked layer after layer.
            Some(m) => m
                .cast(DType::F32)
                .reshape([1, n / layers])
                .repeat_dim(0, layers)
                .reshape([n, 1]),
            None => Tensor::ones([n, 1], (&device, DType::F32)),
        };
        Self {
            assigned: (assigned * weights.clone())
                .sum_dim(0)
                .reshape([e])
                .detach(),
            prob_sum: (probs * weights).sum_dim(0).reshape([e]),
            tokens: (real_tokens * layers) as f64,
        }
    }

    /// This shard's share of the batch's load-balancing loss, given the batch's `assigned` counts
    /// and `tokens`: `E * sum_e (assigned_e / T) * (prob_sum_e / T)`. The shares of all shards
    /// sum to the batch's loss, in value and in gradient (the `f_e` factor carries no gradient).
    pub fn aux_share(
        self,
        assigned: Tensor<B, 1>,
        tokens: f64,
        num_experts: usize,
    ) -> Tensor<B, 1> {
        let t = tokens.max(1.0);
        (assigned.div_scalar(t) * self.prob_sum.div_scalar(t))
            .sum()
            .mul_scalar(num_experts as f64)
    }
}

/// The training loss of (a shard of) a batch as sums over tokens: the terms of the shards of a
/// batch add up to the terms of the whole batch, which is what data-parallel training needs.
#[derive(Debug, Clone)]
pub struct LossTerms<B: Backend> {
    /// Next-token negative log-likelihood summed over the labelled positions, `[1]` f32.
    pub nll_sum: Tensor<B, 1>,
    /// Labelled positions: not padding, not the first of a row.
    pub labels: f64,
    /// With MoE layers.
    pub router: Option<RouterTerms<B>>,
}

/// Positions whose token is a label: real (not padding) and not the first of its row.
fn labelled_positions(tokens: &TokenBatch) -> usize {
    match tokens
        .attention_mask
        .as_ref()
        .filter(|_| tokens.has_padding())
    {
        Some(m) => m
            .chunks(tokens.len)
            .map(|row| row[1..].iter().filter(|&&v| v == 1).count())
            .sum(),
        None => tokens.batch * (tokens.len - 1),
    }
}

/// Positions holding a real token (not padding).
fn real_tokens(tokens: &TokenBatch) -> usize {
    match tokens
        .attention_mask
        .as_ref()
        .filter(|_| tokens.has_padding())
    {
        Some(m) => m.iter().filter(|&&v| v == 1).count(),
        None => tokens.batch * tokens.len,
    }
}

/// The parts of the training loss.
#[derive(Debug, Clone)]
pub struct LossOutput<B: Backend> {
    /// `ce + router_aux_loss_coef * aux` (just `ce` without MoE layers).
    pub loss: Tensor<B, 1>,
    pub ce: Tensor<B, 1>,
    pub aux: Option<Tensor<B, 1>>,
}

impl<B: JambaBackend> JambaForCausalLM<B> {
    /// transformers' training loss for labels = input ids (padding ignored), with the router's
    /// load-balancing term when the model has MoE layers.
    pub fn loss(&self, tokens: &TokenBatch) -> Result<LossOutput<B>> {
        let terms = self.loss_terms(tokens)?;
        let (labels, router) = (
            terms.labels,
            terms
                .router
                .as_ref()
                .map(|r| (r.assigned.clone(), r.tokens)),
        );
        Ok(self.loss_share(terms, labels, router))
    }

    /// The additive terms of the loss over `tokens` (see [`LossTerms`]).
    pub fn loss_terms(&self, tokens: &TokenBatch) -> Result<LossTerms<B>> {
        if tokens.len < 2 {
            return Err(JambaError::bad_input(
                "input_ids",
                "training sequences need at least 2 tokens",
            ));
        }
        let device = self.device();
        let mask = tokens
            .attention_mask
            .clone()
            .filter(|_| tokens.has_padding());
        let labels: Vec<i64> = match &mask {
            Some(m) => tokens
                .ids
                .iter()
                .zip(m)
                .map(|(&id, &keep)| if keep == 1 { id } else { IGNORE_INDEX })
                .collect(),
            None => tokens.ids.clone(),
        };
        let labelled = labelled_positions(tokens);
        let options = ForwardOptions {
            training: true,
            ..Default::default()
        };
        let out = self.forward_with(tokens, None, &options)?;
        let labels = Tensor::<B, 2, Int>::from_data(
            TensorData::new(labels, [tokens.batch, tokens.len]),
            &device,
        );
        let nll_sum = causal_lm_nll_sum(out.logits, labels);
        let router = (!out.router_logits.is_empty()).then(|| {
            let mask = mask.map(|m| {
                Tensor::<B, 2, Int>::from_data(
                    TensorData::new(m, [tokens.batch, tokens.len]),
                    &device,
                )
                .float()
            });
            RouterTerms::new(
                &out.router_logits,
                self.config.num_experts_per_tok,
                mask,
                real_tokens(tokens),
            )
        });
        Ok(LossTerms {
            nll_sum,
            labels: labelled as f64,
            router,
        })
    }

    /// This shard's share of the loss of a batch whose totals are `labels` labelled positions and
    /// (with MoE layers) `router` = (assigned counts per expert, tokens): the shares of all shards
    /// sum to the batch's [`Self::loss`] in value and gradient. With the shard's own totals it is
    /// the shard's loss.
    pub fn loss_share(
        &self,
        terms: LossTerms<B>,
        labels: f64,
        router: Option<(Tensor<B, 1>, f64)>,
    ) -> LossOutput<B> {
        let ce = terms.nll_sum.div_scalar(labels.max(1.0));
        match (terms.router, router) {
            (Some(r), Some((assigned, tokens))) => {
                let aux = r.aux_share(assigned, tokens, self.config.num_experts);
                LossOutput {
                    loss: ce.clone() + aux.clone().mul_scalar(self.config.router_aux_loss_coef),
                    ce,
                    aux: Some(aux),
                }
            }
            _ => LossOutput {
                loss: ce.clone(),
                ce,
                aux: None,
            },
        }
    }
}

/// The gradient of every parameter, under its name (see [`JambaForCausalLM::named_params`]).
pub fn named_grads<B: AutodiffBackend + JambaBackend>(
    model: &JambaForCausalLM<B>,
    grads: &GradientsParams,
) -> Vec<(String, Option<TensorData>)> {
    model
        .named_params()
        .into_iter()
        .map(|p| {
            let id = p.param.id();
            let data = match p.param {
                ParamTensor::D1(_) => grads.get::<B::InnerBackend, 1>(id).map(|g| g.into_data()),
                ParamTensor::D2(_) => grads.get::<B::InnerBackend, 2>(id).map(|g| g.into_data()),
                ParamTensor::D3(_) => grads.get::<B::InnerBackend, 3>(id).map(|g| g.into_data()),
            };
            (p.name, data)
        })
        .collect()
}

/// AdamW hyper-parameters (transformers' defaults: betas 0.9/0.999, eps 1e-8).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Whether a parameter is decayed: not biases and norms (as transformers' Trainer), nor Mamba's
/// `A_log` and `D` (as mamba-ssm).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias")
        || name.contains("layernorm")
        || name.ends_with(".A_log")
        || name.ends_with(".D"))
}

/// Learning rate at `step` (0-based): linear warmup to `peak`, then cosine decay to `min`.
pub fn lr_at(step: usize, warmup: usize, total: usize, peak: f64, min: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// First and second moments of one parameter, flattened, f32.
type Moments<B> = (
    Tensor<<B as AutodiffBackend>::InnerBackend, 1>,
    Tensor<<B as AutodiffBackend>::InnerBackend, 1>,
);

/// AdamW with its moments in f32 whatever the parameters' dtype, keyed by parameter name so that
/// the state saves, loads and resumes exactly.
#[derive(Debug)]
pub struct AdamW<B: AutodiffBackend> {
    pub config: AdamWConfig,
    /// Optimizer steps taken.
    pub step: u64,
    moments: HashMap<String, Moments<B>>,
}

struct StepMapper<'a, B: AutodiffBackend> {
    opt: &'a mut AdamW<B>,
    names: HashMap<ParamId, String>,
    grads: GradientsParams,
    lr: f64,
    grad_scale: f64,
}

impl<B: AutodiffBackend> ModuleMapper<B> for StepMapper<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let (Some(grad), Some(name)) = (
            self.grads.remove::<B::InnerBackend, D>(id),
            self.names.get(&id),
        ) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let c = self.opt.config;
        let t = self.opt.step as i32;
        let shape = tensor.shape();
        let n = shape.num_elements();
        let dtype = tensor.dtype();
        let w = tensor.inner().cast(DType::F32).reshape([n]);
        let g = grad
            .cast(DType::F32)
            .reshape([n])
            .mul_scalar(self.grad_scale);
        let (m, v) = match self.opt.moments.remove(name) {
            Some(mv) => mv,
            None => (w.zeros_like(), w.zeros_like()),
        };
        let m = m.mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1);
        let v = v.mul_scalar(c.beta2) + g.square().mul_scalar(1.0 - c.beta2);
        let m_hat = m.clone().div_scalar(1.0 - c.beta1.powi(t));
        let v_hat = v.clone().div_scalar(1.0 - c.beta2.powi(t));
        let mut w = w;
        if c.weight_decay > 0.0 && decays(name) {
            w = w.mul_scalar(1.0 - self.lr * c.weight_decay);
        }
        let w = w - m_hat
            .div(v_hat.sqrt().add_scalar(c.eps))
            .mul_scalar(self.lr);
        self.opt.moments.insert(name.clone(), (m, v));
        let w = Tensor::<B, D>::from_inner(w.cast(dtype).reshape(shape)).require_grad();
        Param::from_mapped_value(id, w, mapper)
    }
}

impl<B: AutodiffBackend + JambaBackend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            moments: HashMap::new(),
        }
    }

    /// The global L2 norm of all gradients (before clipping).
    pub fn grad_norm(model: &JambaForCausalLM<B>, grads: &GradientsParams) -> f64 {
        let mut total: Option<Tensor<B::InnerBackend, 1>> = None;
        for p in model.named_params() {
            let id = p.param.id();
            let sq = match p.param {
                ParamTensor::D1(_) => grads
                    .get::<B::InnerBackend, 1>(id)
                    .map(|g| g.cast(DType::F32).square().sum()),
                ParamTensor::D2(_) => grads
                    .get::<B::InnerBackend, 2>(id)
                    .map(|g| g.cast(DType::F32).square().sum()),
                ParamTensor::D3(_) => grads
                    .get::<B::InnerBackend, 3>(id)
                    .map(|g| g.cast(DType::F32).square().sum()),
            };
            if let Some(sq) = sq {
                total = Some(match total {
                    Some(t) => t + sq,
                    None => sq,
                });
            }
        }
        total.map_or(0.0, |t| {
            use burn::tensor::ElementConversion;
            t.into_scalar().elem::<f64>().sqrt()
        })
    }

    /// One update with learning rate `lr`, after scaling all gradients so that their global norm
    /// is at most `max_grad_norm` (when given). Returns the norm before clipping.
    pub fn step(
        &mut self,
        model: JambaForCausalLM<B>,
        grads: GradientsParams,
        lr: f64,
        max_grad_norm: Option<f64>,
    ) -> (JambaForCausalLM<B>, f64) {
        let norm = Self::grad_norm(&model, &grads);
        let grad_scale = match max_grad_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let names = model
            .named_params()
            .into_iter()
            .map(|p| (p.param.id(), p.name))
            .collect();
        let mut mapper = StepMapper {
            opt: self,
            names,
            grads,
            lr,
            grad_scale,
        };
        (model.map(&mut mapper), norm)
    }

    /// A copy with the moments on `device` (for a replica on another device).
    pub fn to_device(&self, device: &B::Device) -> Self {
        Self {
            config: self.config,
            step: self.step,
            moments: self
                .moments
                .iter()
                .map(|(name, (m, v))| {
                    let to = |t: &Tensor<B::InnerBackend, 1>| {
                        crate::parallel::transfer(t.clone(), device)
                    };
                    (name.clone(), (to(m), to(v)))
                })
                .collect(),
        }
    }

    /// Writes the moments (`m.{name}`, `v.{name}`, f32) and the step count.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::with_capacity(2 * self.moments.len());
        let mut names: Vec<&String> = self.moments.keys().collect();
        names.sort();
        for name in names {
            let (m, v) = &self.moments[name];
            tensors.push((format!("m.{name}"), m.clone().into_data()));
            tensors.push((format!("v.{name}"), v.clone().into_data()));
        }
        let meta: HashMap<String, String> = [
            ("step".to_string(), self.step.to_string()),
            (
                "config".to_string(),
                serde_json::to_string(&self.config).expect("serialisable"),
            ),
        ]
        .into_iter()
        .collect();
        write_safetensors(path, tensors, Some(meta))
    }

    /// Reads what [`Self::save`] wrote.
    pub fn load(
        path: &Path,
        config: AdamWConfig,
        step: u64,
        device: &<B::InnerBackend as burn::tensor::backend::BackendTypes>::Device,
    ) -> Result<Self> {
        let tensors: BTreeMap<String, TensorData> = read_all(path)?;
        let mut moments = HashMap::new();
        for (key, m) in &tensors {
            if let Some(name) = key.strip_prefix("m.") {
                let v =
                    tensors
                        .get(&format!("v.{name}"))
                        .ok_or_else(|| JambaError::MissingTensor {
                            key: format!("v.{name}"),
                            expected: m.shape.to_vec(),
                        })?;
                let t = |d: &TensorData| {
                    Tensor::<B::InnerBackend, 1>::from_data(d.clone(), (device, DType::F32))
                };
                moments.insert(name.to_string(), (t(m), t(v)));
            }
        }
        Ok(Self {
            config,
            step,
            moments,
        })
    }
}

/// Where a training run stands, saved beside each checkpoint for resuming.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Total optimizer steps planned (the schedule's length).
    pub total_steps: usize,
    pub seed: u64,
    /// Free-form settings of the run (learning rates, batch, ...), kept for the record.
    pub settings: serde_json::Value,
}

impl TrainerState {
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(
            path,
            serde_json::to_string_pretty(self)
                .expect("serialisable")
                .as_bytes(),
        )
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| JambaError::io(path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| JambaError::bad_input(path.display().to_string(), e.to_string()))
    }
}

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: usize,
    /// Clip the global gradient norm to this.
    pub max_grad_norm: Option<f64>,
    pub adamw: AdamWConfig,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch: 16,
            grad_accum: 1,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup: 50,
            max_grad_norm: Some(1.0),
            adamw: AdamWConfig {
                weight_decay: 0.1,
                ..Default::default()
            },
            seed: 0,
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// 1-based number of the step just taken.
    pub step: usize,
    pub loss: f64,
    pub ce: f64,
    pub aux: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens seen in this step.
    pub tokens: usize,
}

/// A model, its optimizer and its data, stepping through a run that can be saved and resumed.
pub struct Trainer<B: AutodiffBackend + JambaBackend> {
    pub model: JambaForCausalLM<B>,
    pub optimizer: AdamW<B>,
    pub data: crate::data::PackedDataset,
    pub config: TrainConfig,
    /// Optimizer steps done.
    pub step: usize,
    /// This replica's place when training data-parallel (see [`crate::parallel`]): it then takes
    /// its share of each batch's rows and sums gradients with the other replicas.
    pub peer: Option<crate::parallel::Peer>,
}

fn scalar<Bk: Backend>(t: Tensor<Bk, 1>) -> f64 {
    use burn::tensor::ElementConversion;
    t.into_scalar().elem::<f64>()
}

impl<B: AutodiffBackend + JambaBackend> Trainer<B>
where
    B::InnerBackend: JambaBackend,
{
    pub fn new(
        model: JambaForCausalLM<B>,
        data: crate::data::PackedDataset,
        config: TrainConfig,
    ) -> Self {
        Self {
            model,
            optimizer: AdamW::new(config.adamw),
            data,
            config,
            step: 0,
            peer: None,
        }
    }

    /// One optimizer step over `grad_accum` micro-batches.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let c = &self.config;
        let scale = 1.0 / c.grad_accum as f64;
        let mut accumulated: Option<GradientsParams> = None;
        let (mut loss, mut ce, mut aux, mut tokens) = (0.0, 0.0, 0.0, 0);
        for micro in 0..c.grad_accum {
            let batch = self
                .data
                .train_batch(self.step * c.grad_accum + micro, c.batch);
            tokens += batch.ids.len();
            let out = match self.peer {
                None => self.model.loss(&batch)?,
                Some(peer) => self.shard_loss(&batch, peer)?,
            };
            let parts = Tensor::cat(
                vec![
                    out.loss.clone().inner(),
                    out.ce.clone().inner(),
                    out.aux
                        .clone()
                        .unwrap_or_else(|| out.ce.zeros_like())
                        .inner(),
                ],
                0,
            );
            // Data-parallel replicas hold shares of the batch's loss: their sum is the loss.
            let parts: Vec<f64> = match self.peer {
                Some(peer) => peer.all_reduce_sum(parts)?,
                None => parts,
            }
            .into_data()
            .convert::<f64>()
            .to_vec()
            .expect("float data");
            loss += parts[0] * scale;
            ce += parts[1] * scale;
            aux += parts[2] * scale;
            let grads =
                GradientsParams::from_grads(out.loss.mul_scalar(scale).backward(), &self.model);
            accumulated = Some(match accumulated {
                None => grads,
                Some(acc) => add_grads(&self.model, acc, grads),
            });
        }
        let mut grads = accumulated.expect("grad_accum >= 1");
        if let Some(peer) = self.peer {
            grads = peer.all_reduce_grads::<B>(grads)?;
        }
        let lr = lr_at(self.step, c.warmup, c.steps, c.lr, c.min_lr);
        let model = self.model.clone();
        let (model, grad_norm) = self.optimizer.step(model, grads, lr, c.max_grad_norm);
        self.model = model;
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            loss,
            ce,
            aux,
            lr,
            grad_norm,
            tokens,
        })
    }

    /// This replica's share of the loss of the global `batch` (see [`JambaForCausalLM::loss_share`]):
    /// its rows' terms over the whole batch's totals, the router's counts summed over replicas.
    fn shard_loss(&self, batch: &TokenBatch, peer: crate::parallel::Peer) -> Result<LossOutput<B>> {
        // The whole batch is checked on every replica, so that all of them fail alike before any
        // collective call instead of one failing while the others wait for it.
        self.model.check_tokens(batch, 0)?;
        let rows = peer.rows(batch.batch);
        let shard = batch.rows(rows.start, rows.len());
        let terms = self.model.loss_terms(&shard)?;
        let router = match &terms.router {
            Some(r) => {
                let assigned = peer.all_reduce_sum(r.assigned.clone().inner())?;
                let moe_layers = self.model.config.moe_layers().len();
                Some((
                    Tensor::from_inner(assigned),
                    (real_tokens(batch) * moe_layers) as f64,
                ))
            }
            None => None,
        };
        Ok(self
            .model
            .loss_share(terms, labelled_positions(batch) as f64, router))
    }

    /// Mean cross-entropy over (at most `max_batches` of) the validation set.
    pub fn evaluate(&self, max_batches: usize) -> Result<f64> {
        let model = self.model.valid();
        let batches = self.data.valid_batches(self.config.batch);
        let n = batches.len().min(max_batches.max(1));
        let mut total = 0.0;
        for b in batches.iter().take(n) {
            total += scalar(model.loss(b)?.ce);
        }
        Ok(total / n as f64)
    }

    /// Writes a checkpoint folder that transformers loads (`config.json`, `model.safetensors`,
    /// `tokenizer.json`) plus `optimizer.safetensors` and `trainer_state.json` for resuming. The
    /// folder is written beside `dir` and renamed into place, so an interrupted save leaves the
    /// previous checkpoint intact.
    pub fn save_checkpoint(
        &self,
        dir: &Path,
        tokenizer: Option<&crate::tokenizer::Tokenizer>,
        settings: serde_json::Value,
    ) -> Result<()> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.with_file_name(format!(".{name}.partial"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| JambaError::io(&tmp, e))?;
        }
        self.model.save_pretrained(&tmp)?;
        if let Some(t) = tokenizer {
            t.save(tmp.join("tokenizer.json"))?;
        }
        self.optimizer.save(&tmp.join("optimizer.safetensors"))?;
        TrainerState {
            step: self.step,
            total_steps: self.config.steps,
            seed: self.config.seed,
            settings,
        }
        .save(&tmp.join("trainer_state.json"))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| JambaError::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| JambaError::io(dir, e))
    }

    /// Continues a run from a checkpoint written by [`Self::save_checkpoint`].
    pub fn resume(
        dir: &Path,
        data: crate::data::PackedDataset,
        config: TrainConfig,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        let model = JambaForCausalLM::<B>::from_pretrained(dir, device, dtype)?;
        let state = TrainerState::load(&dir.join("trainer_state.json"))?;
        let optimizer = AdamW::load(
            &dir.join("optimizer.safetensors"),
            config.adamw,
            state.step as u64,
            &model.device().clone(),
        )?;
        Ok(Self {
            model,
            optimizer,
            data,
            config,
            step: state.step,
            peer: None,
        })
    }
}

/// `a + b` for every parameter's gradient.
fn add_grads<B: AutodiffBackend + JambaBackend>(
    model: &JambaForCausalLM<B>,
    mut a: GradientsParams,
    mut b: GradientsParams,
) -> GradientsParams {
    for p in model.named_params() {
        let id = p.param.id();
        macro_rules! add {
            ($d:literal) => {
                match (
                    a.remove::<B::InnerBackend, $d>(id),
                    b.remove::<B::InnerBackend, $d>(id),
                ) {
                    (Some(x), Some(y)) => a.register(id, x + y),
                    (Some(x), None) | (None, Some(x)) => a.register(id, x),
                    (None, None) => {}
                }
            };
        }
        match p.param {
            ParamTensor::D1(_) => add!(1),
            ParamTensor::D2(_) => add!(2),
            ParamTensor::D3(_) => add!(3),
        }
    }
    a
}
