//! The whole model: `JambaModel` (embeddings, decoder layers, final norm) and `JambaForCausalLM`
//! (plus the LM head), with checkpoint loading and saving in the Hugging Face layout.

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Bool, DType, Int, Tensor, TensorData};
use jamba_kernels::JambaBackend;

use crate::attention::{causal_mask, AttentionMask, KvCache, KV_BLOCK};
use crate::checkpoint::{write_atomic, write_safetensors, Checkpoint, WEIGHTS_FILE};
use crate::config::JambaConfig;
use crate::error::{JambaError, Result};
use crate::layer::{JambaDecoderLayer, LayerMasks, LayerState, Mixer};
use crate::nn::{export_param, hub_split, Export, Linear, NamedParam, RmsNorm};
use crate::parallel::{transfer, DeviceMap};
use crate::weights::{release_build_leftovers, Init, Weights};

/// A batch of token ids on the host, row-major `[batch, len]`, with an optional 0/1 attention mask
/// (0 marks padding, which Jamba expects on the left).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub ids: Vec<i64>,
    pub batch: usize,
    pub len: usize,
    pub attention_mask: Option<Vec<i64>>,
}

impl TokenBatch {
    /// One unpadded sequence.
    pub fn single(ids: &[i64]) -> Self {
        Self {
            ids: ids.to_vec(),
            batch: 1,
            len: ids.len(),
            attention_mask: None,
        }
    }

    /// A `[batch, len]` batch; fails if the sizes disagree.
    pub fn new(
        ids: Vec<i64>,
        batch: usize,
        len: usize,
        attention_mask: Option<Vec<i64>>,
    ) -> Result<Self> {
        if ids.len() != batch * len {
            return Err(JambaError::bad_input(
                "input_ids",
                format!("{} ids do not make a [{batch}, {len}] batch", ids.len()),
            ));
        }
        if let Some(m) = &attention_mask {
            if m.len() != ids.len() {
                return Err(JambaError::bad_input(
                    "attention_mask",
                    format!("{} values for {} ids", m.len(), ids.len()),
                ));
            }
            if let Some(v) = m.iter().find(|v| **v != 0 && **v != 1) {
                return Err(JambaError::bad_input(
                    "attention_mask",
                    format!("values must be 0 or 1, found {v}"),
                ));
            }
        }
        Ok(Self {
            ids,
            batch,
            len,
            attention_mask,
        })
    }

    /// Positions `start..start + len` of every row.
    pub fn columns(&self, start: usize, len: usize) -> Self {
        let pick = |v: &Vec<i64>| -> Vec<i64> {
            (0..self.batch)
                .flat_map(|b| {
                    v[b * self.len + start..b * self.len + start + len]
                        .iter()
                        .copied()
                })
                .collect()
        };
        Self {
            ids: pick(&self.ids),
            batch: self.batch,
            len,
            attention_mask: self.attention_mask.as_ref().map(pick),
        }
    }

    /// Rows `start..start + n` (a shard of the batch).
    pub fn rows(&self, start: usize, n: usize) -> Self {
        let span = start * self.len..(start + n) * self.len;
        Self {
            ids: self.ids[span.clone()].to_vec(),
            batch: n,
            len: self.len,
            attention_mask: self.attention_mask.as_ref().map(|m| m[span].to_vec()),
        }
    }

    /// Whether any position is masked.
    pub fn has_padding(&self) -> bool {
        self.attention_mask.as_ref().is_some_and(|m| m.contains(&0))
    }
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct JambaOutput<B: Backend> {
    /// `[batch, len, vocab]`.
    pub logits: Tensor<B, 3>,
    /// With `output_hidden_states`: the input of each layer, then the output of the final norm.
    pub hidden_states: Vec<Tensor<B, 3>>,
    /// The router logits `[batch * len, experts]` of each MoE layer, in layer order.
    pub router_logits: Vec<Tensor<B, 2>>,
}

/// Per-layer state of a generation: KV caches for attention layers, conv and SSM states for Mamba
/// layers (only the attention caches grow with the length).
#[derive(Debug, Clone)]
pub struct HybridCache<B: Backend> {
    pub layers: Vec<LayerState<B>>,
    /// `[batch, past]`, true at padded positions already consumed.
    pub padding: Option<Tensor<B, 2, Bool>>,
    /// Positions consumed so far.
    pub seq_len: usize,
    pub batch: usize,
}

/// `JambaModel`: embeddings, the decoder layers and the final norm.
#[derive(Module, Debug)]
pub struct JambaModel<B: Backend> {
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<JambaDecoderLayer<B>>,
    pub final_layernorm: RmsNorm<B>,
}

/// `JambaForCausalLM`: the model and its LM head (`None` when tied to the embeddings).
#[derive(Module, Debug)]
pub struct JambaForCausalLM<B: Backend> {
    pub model: JambaModel<B>,
    pub lm_head: Option<Linear<B>>,
    pub config: JambaConfig,
}

impl<B: JambaBackend> JambaForCausalLM<B> {
    /// A fresh model with transformers' initialisation, parameters in `dtype`.
    pub fn init(config: &JambaConfig, device: &B::Device, dtype: DType) -> Result<Self> {
        config.validate()?;
        check_dtype::<B>(device, dtype)?;
        let mut w = Weights::random(config.initializer_range, device, dtype);
        let model = Self::build(config, &mut w)?;
        release_build_leftovers::<B>(std::slice::from_ref(device))?;
        Ok(model)
    }

    /// A fresh model spread over the devices of `map` (expert parallelism, for inference; see
    /// [`DeviceMap`]).
    pub fn init_on(config: &JambaConfig, map: &DeviceMap<B::Device>, dtype: DType) -> Result<Self> {
        config.validate()?;
        for d in map.devices() {
            check_dtype::<B>(d, dtype)?;
        }
        let mut w = Weights::random(config.initializer_range, map.first(), dtype)
            .with_device_map(map.clone());
        let model = Self::build(config, &mut w)?;
        release_build_leftovers::<B>(map.devices())?;
        Ok(model)
    }

    /// [`Self::from_pretrained`] spread over the devices of `map` (expert parallelism, for
    /// inference; see [`DeviceMap`]): each tensor is read once and goes to its device.
    pub fn from_pretrained_on(
        dir: impl AsRef<Path>,
        map: &DeviceMap<B::Device>,
        dtype: DType,
        mut progress: impl FnMut(usize, usize, &str),
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let config = JambaConfig::from_file(dir.join("config.json"))?;
        let ckpt = Checkpoint::open_dir(dir)?;
        config.validate()?;
        for d in map.devices() {
            check_dtype::<B>(d, dtype)?;
        }
        let total = ckpt.names().count();
        let mut loaded = 0;
        let mut w = Weights::checkpoint(&ckpt, map.first(), dtype)
            .with_device_map(map.clone())
            .with_progress(|name| {
                progress(loaded, total, name);
                loaded += 1;
            });
        let model = Self::build(&config, &mut w)?;
        w.finish()?;
        release_build_leftovers::<B>(map.devices())?;
        Ok(model)
    }

    /// Loads `dir/config.json` and the safetensors weights (single file or sharded), in `dtype`.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let config = JambaConfig::from_file(dir.join("config.json"))?;
        let ckpt = Checkpoint::open_dir(dir)?;
        Self::from_checkpoint(&config, &ckpt, device, dtype)
    }

    /// Builds the model from an open checkpoint, reading one tensor at a time.
    pub fn from_checkpoint(
        config: &JambaConfig,
        ckpt: &Checkpoint,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::from_checkpoint_with_progress(config, ckpt, device, dtype, |_, _, _| {})
    }

    /// As [`Self::from_checkpoint`], calling `progress(loaded, total, name)` before each tensor
    /// (a 52B checkpoint takes minutes to read).
    pub fn from_checkpoint_with_progress(
        config: &JambaConfig,
        ckpt: &Checkpoint,
        device: &B::Device,
        dtype: DType,
        mut progress: impl FnMut(usize, usize, &str),
    ) -> Result<Self> {
        config.validate()?;
        check_dtype::<B>(device, dtype)?;
        let total = ckpt.names().count();
        let mut loaded = 0;
        let mut w = Weights::checkpoint(ckpt, device, dtype).with_progress(|name| {
            progress(loaded, total, name);
            loaded += 1;
        });
        let model = Self::build(config, &mut w)?;
        w.finish()?;
        release_build_leftovers::<B>(std::slice::from_ref(device))?;
        Ok(model)
    }

    /// Builds every module from `w` (random or checkpoint), in HF's parameter order. The
    /// constructors above also free what the build left in the devices' pools
    /// ([`crate::weights::release_build_leftovers`]).
    pub fn build(config: &JambaConfig, w: &mut Weights<B>) -> Result<Self> {
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed_tokens = w.param(
            "model.embed_tokens.weight",
            [v, h],
            Init::Embedding {
                pad_row: config.pad_token_id.map(|p| p as usize),
            },
        )?;
        let n = config.num_hidden_layers;
        let map = w.device_map().cloned();
        let layers = (0..n)
            .map(|i| {
                if let Some(map) = &map {
                    w.set_device(map.layer(i, n).clone());
                }
                JambaDecoderLayer::new(config, w, &format!("model.layers.{i}"), i)
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(map) = &map {
            w.set_device(map.last().clone());
        }
        let final_layernorm = RmsNorm::new(w, "model.final_layernorm", h, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(Linear::new(w, "lm_head", h, v, false)?)
        };
        Ok(Self {
            model: JambaModel {
                embed_tokens,
                layers,
                final_layernorm,
            },
            lm_head,
            config: config.clone(),
        })
    }

    /// The model's config.
    pub fn config(&self) -> &JambaConfig {
        &self.config
    }

    /// The device the parameters live on.
    pub fn device(&self) -> B::Device {
        self.model.embed_tokens.val().device()
    }

    /// The float dtype of the parameters.
    pub fn dtype(&self) -> DType {
        self.model.embed_tokens.val().dtype()
    }

    /// Every parameter with its transformers name, in HF order (experts fused).
    pub fn named_params(&self) -> Vec<NamedParam<B>> {
        let mut out: Export<B> = Vec::new();
        export_param(
            &mut out,
            "model.embed_tokens.weight".into(),
            &self.model.embed_tokens,
        );
        for (i, layer) in self.model.layers.iter().enumerate() {
            layer.export(&format!("model.layers.{i}"), &mut out);
        }
        self.model
            .final_layernorm
            .export("model.final_layernorm", &mut out);
        if let Some(head) = &self.lm_head {
            head.export("lm_head", &mut out);
        }
        out
    }

    /// Every parameter under its Hub name (experts split per expert), as host data.
    pub fn export_tensors(&self) -> Vec<(String, TensorData)> {
        self.named_params()
            .into_iter()
            .flat_map(|p| hub_split(&p.name, p.param.data(), p.first_expert))
            .collect()
    }

    /// Writes `config.json` and `model.safetensors` (Hub layout) into `dir`, each atomically.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| JambaError::io(dir, e))?;
        let metadata = [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect();
        write_safetensors(
            dir.join(WEIGHTS_FILE),
            self.export_tensors(),
            Some(metadata),
        )?;
        let mut cfg = self.config.clone();
        cfg.torch_dtype = Some(
            match self.dtype() {
                DType::BF16 => "bfloat16",
                DType::F16 => "float16",
                _ => "float32",
            }
            .into(),
        );
        write_atomic(&dir.join("config.json"), cfg.to_json().as_bytes())
    }

    /// An empty cache for `batch` sequences (room for one block of positions; it grows as needed).
    pub fn new_cache(&self, batch: usize) -> HybridCache<B> {
        self.new_cache_with_capacity(batch, KV_BLOCK)
    }

    /// An empty cache with room for `capacity` positions before the KV buffers grow.
    pub fn new_cache_with_capacity(&self, batch: usize, capacity: usize) -> HybridCache<B> {
        let dtype = self.dtype();
        let layers = self
            .model
            .layers
            .iter()
            .map(|l| (l.device(), l))
            .map(|(device, l)| match &l.mixer {
                Mixer::Attention(a) => LayerState::Attention(KvCache::new(
                    batch,
                    a.num_kv_heads,
                    a.head_dim,
                    capacity.max(1),
                    dtype,
                    &device,
                )),
                Mixer::Mamba(m) => LayerState::Mamba(m.empty_state(batch, &device)),
            })
            .collect();
        HybridCache {
            layers,
            padding: None,
            seq_len: 0,
            batch,
        }
    }

    /// Checks token ids and lengths, then runs the model on host tokens (all positions' logits).
    ///
    /// With `cache`, the tokens continue the sequences it holds (any number of tokens: a prefill
    /// chunk or one decode step) and the cache is advanced.
    pub fn forward(
        &self,
        tokens: &TokenBatch,
        cache: Option<&mut HybridCache<B>>,
        output_hidden_states: bool,
    ) -> Result<JambaOutput<B>> {
        let options = ForwardOptions {
            output_hidden_states,
            ..Default::default()
        };
        self.forward_with(tokens, cache, &options)
    }

    /// [`Self::forward`] with all options.
    pub fn forward_with(
        &self,
        tokens: &TokenBatch,
        cache: Option<&mut HybridCache<B>>,
        options: &ForwardOptions,
    ) -> Result<JambaOutput<B>> {
        self.check_tokens(tokens, cache.as_ref().map_or(0, |c| c.seq_len))?;
        if let Some(c) = &cache {
            if c.batch != tokens.batch {
                return Err(JambaError::bad_input(
                    "input_ids",
                    format!(
                        "batch of {} for a cache of {} sequences",
                        tokens.batch, c.batch
                    ),
                ));
            }
        }
        let device = self.device();
        if tokens.ids.len() == 1 && !tokens.has_padding() && !options.training {
            // One token (decoding at batch 1): its embedding row as a view of the table, with no
            // upload of the id and no gather.
            let embed = self.model.embed_tokens.val();
            let row = embed.narrow(0, tokens.ids[0] as usize, 1);
            return Ok(self.forward_embedded(row, [1, 1], None, cache, options));
        }
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(tokens.ids.clone(), [tokens.batch, tokens.len]),
            &device,
        );
        let mask = tokens
            .attention_mask
            .as_ref()
            .filter(|_| tokens.has_padding())
            .map(|m| {
                Tensor::<B, 2, Int>::from_data(
                    TensorData::new(m.clone(), [tokens.batch, tokens.len]),
                    &device,
                )
            });
        Ok(self.forward_tensors(ids, mask, cache, options))
    }

    /// Runs a prompt through the model in chunks of at most `chunk` positions, each continuing from
    /// the state the previous one left in `cache`, and returns the last position's logits
    /// `[batch, vocab]`. Activation memory is bounded by the chunk, not the prompt.
    pub fn prefill(
        &self,
        tokens: &TokenBatch,
        cache: &mut HybridCache<B>,
        chunk: usize,
        isolate_padding: bool,
    ) -> Result<Tensor<B, 2>> {
        if chunk == 0 {
            return Err(JambaError::bad_input(
                "chunk",
                "the prefill chunk must be at least 1 token",
            ));
        }
        self.check_tokens(tokens, cache.seq_len)?;
        let options = ForwardOptions {
            last_logits_only: true,
            isolate_padding,
            ..Default::default()
        };
        let mut last = None;
        let mut start = 0;
        while start < tokens.len {
            let n = chunk.min(tokens.len - start);
            let part = tokens.columns(start, n);
            let out = self.forward_with(&part, Some(cache), &options)?;
            last = Some(out.logits);
            start += n;
        }
        let logits = last.expect("a checked batch has at least one token");
        let [batch, _, vocab] = logits.dims();
        Ok(logits.reshape([batch, vocab]))
    }

    pub(crate) fn check_tokens(&self, tokens: &TokenBatch, past: usize) -> Result<()> {
        if tokens.ids.len() != tokens.batch * tokens.len || tokens.len == 0 || tokens.batch == 0 {
            return Err(JambaError::bad_input(
                "input_ids",
                format!(
                    "expected a non-empty [batch, len] batch, got {} ids for [{}, {}]",
                    tokens.ids.len(),
                    tokens.batch,
                    tokens.len
                ),
            ));
        }
        let vocab = self.config.vocab_size;
        if let Some((position, &id)) = tokens
            .ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id < 0 || id as usize >= vocab)
        {
            return Err(JambaError::TokenOutOfRange {
                id,
                position,
                vocab_size: vocab,
            });
        }
        let max = self.config.max_position_embeddings;
        if past + tokens.len > max {
            return Err(JambaError::ContextExceeded {
                length: past + tokens.len,
                max,
            });
        }
        Ok(())
    }

    /// Runs the model on device tensors without checks: `input_ids` `[batch, len]`, optional 0/1
    /// `attention_mask` `[batch, len]` for the new positions (padding of earlier positions is in
    /// the cache).
    pub fn forward_tensors(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        cache: Option<&mut HybridCache<B>>,
        options: &ForwardOptions,
    ) -> JambaOutput<B> {
        let embed = self.model.embed_tokens.val();
        let mut x = burn::tensor::module::embedding(embed.clone(), input_ids.clone());
        if let (true, Some(pad)) = (options.training, self.config.pad_token_id) {
            // `nn.Embedding(padding_idx=pad)`: the padding row gets no gradient from the lookup
            // (a tied LM head still trains it).
            let is_pad = input_ids
                .clone()
                .equal_elem(pad as i64)
                .unsqueeze_dim::<3>(2)
                .expand(x.dims());
            x = x.mask_where(
                is_pad,
                burn::tensor::module::embedding(embed.detach(), input_ids),
            );
        }
        let [batch, len, hidden] = x.dims();
        let x = x.reshape([batch * len, hidden]);
        self.forward_embedded(x, [batch, len], attention_mask, cache, options)
    }

    /// The layers, the final norm and the LM head on the token embeddings `x` `[batch * len,
    /// hidden]` (the embedding table's dtype).
    fn forward_embedded(
        &self,
        x: Tensor<B, 2>,
        [batch, len]: [usize; 2],
        attention_mask: Option<Tensor<B, 2, Int>>,
        mut cache: Option<&mut HybridCache<B>>,
        options: &ForwardOptions,
    ) -> JambaOutput<B> {
        let hidden = x.dims()[1];
        let device = x.device();
        let dtype = self.dtype();
        let past = cache.as_ref().map_or(0, |c| c.seq_len);

        // Padding of every key (past and new), true where padded; `None` when nothing is.
        let new_pad = attention_mask.as_ref().map(|m| m.clone().equal_elem(0));
        let past_pad = cache.as_ref().and_then(|c| c.padding.clone());
        let no_pad = |n: usize| {
            Tensor::<B, 2, Bool>::from_data(
                TensorData::new(vec![false; batch * n], [batch, n]),
                &device,
            )
        };
        let key_pad = match (past_pad, new_pad) {
            (None, None) => None,
            (Some(p), None) => Some(Tensor::cat(vec![p, no_pad(len)], 1)),
            (None, Some(n)) if past == 0 => Some(n),
            (None, Some(n)) => Some(Tensor::cat(vec![no_pad(past), n], 1)),
            (Some(p), Some(n)) => Some(Tensor::cat(vec![p, n], 1)),
        };
        let masks = LayerMasks {
            attention: attention_mask_for(len, past, key_pad.clone(), batch, &device),
            padding: attention_mask.map(|m| m.float().cast(dtype)),
            isolate_padding: options.isolate_padding,
            separate_decode_ops: options.separate_decode_ops,
        };

        let mut x = x.cast(DType::F32);
        let mut hidden_states = Vec::new();
        let mut router_logits = Vec::new();
        // Spread over devices, the stream follows the layers (see `DeviceMap`).
        let mut masks = masks;
        let mut here = device.clone();
        // Each layer's feed-forward output is added to the stream by the next norm
        // (`add_rms_norm`), except where the stream itself is needed first.
        let mut pending: Option<Tensor<B, 2>> = None;
        let settle = |x: Tensor<B, 2>, pending: &mut Option<Tensor<B, 2>>| match pending.take() {
            Some(ff) => x + ff.cast(DType::F32),
            None => x,
        };
        for (i, layer) in self.model.layers.iter().enumerate() {
            let there = layer.device();
            if there != here {
                x = transfer(settle(x, &mut pending), &there);
                masks = masks.to_device(&there);
                here = there;
            }
            if options.output_hidden_states {
                x = settle(x, &mut pending);
                hidden_states.push(x.clone().reshape([batch, len, hidden]));
            }
            let state = cache.as_mut().map(|c| &mut c.layers[i]);
            let (out, ff, logits) =
                layer.forward_rows(x, pending.take(), [batch, len], &masks, state);
            x = out;
            pending = Some(ff);
            router_logits.extend(logits);
        }
        let mut rows = len;
        if options.last_logits_only && len > 1 {
            // The last position of each sequence.
            fn last<B: Backend>(t: Tensor<B, 2>, [batch, len, hidden]: [usize; 3]) -> Tensor<B, 2> {
                t.reshape([batch, len, hidden])
                    .narrow(1, len - 1, 1)
                    .reshape([batch, hidden])
            }
            x = last(x, [batch, len, hidden]);
            pending = pending.map(|ff| last(ff, [batch, len, hidden]));
            rows = 1;
        }
        let norm_device = self.model.final_layernorm.weight.val().device();
        if norm_device != here {
            x = transfer(settle(x, &mut pending), &norm_device);
        }
        let (_, x) = crate::layer::add_norm(x, pending, &self.model.final_layernorm);
        if options.output_hidden_states {
            hidden_states.push(x.clone().reshape([batch, rows, hidden]));
        }
        let logits = match &self.lm_head {
            Some(head) => head.forward(transfer(x, &head.weight.val().device())),
            // Tied: the embedding is the head's `[vocab, hidden]` weight, through the same
            // `JambaBackend::linear` as an untied head (a decoding row reads it once).
            None => {
                let embed = self.model.embed_tokens.val();
                <B as JambaBackend>::linear(transfer(x, &embed.device()), embed, None)
            }
        };
        let vocab = logits.dims()[1];
        let logits = logits.reshape([batch, rows, vocab]);
        if let Some(c) = cache {
            c.seq_len += len;
            c.padding = key_pad;
        }
        JambaOutput {
            logits,
            hidden_states,
            router_logits,
        }
    }
}

/// How a forward pass runs and what it returns.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// Return each layer's input and the final norm's output.
    pub output_hidden_states: bool,
    /// Compute the LM head for the last position only (`logits` is then `[batch, 1, vocab]`).
    pub last_logits_only: bool,
    /// Give the padding token's embedding row no gradient from the lookup, as PyTorch's
    /// `padding_idx` (for training).
    pub training: bool,
    /// Keep padded positions from influencing real ones at all; see
    /// [`crate::mamba::JambaMambaMixer::forward`]. Off, the pass is exactly transformers'.
    pub isolate_padding: bool,
    /// Decode (one new position per sequence, with a cache and no padding) operation by
    /// operation instead of one composite operation per layer ([`crate::step`]). The result is
    /// the same; a fused backend (`Cuda`, `Wgpu`) registers about twenty times more operations.
    pub separate_decode_ops: bool,
}

impl<B: Backend> HybridCache<B> {
    /// Bytes held by the cache: KV buffers (allocated capacity), Mamba states and the Mamba
    /// layers' decoding constants once derived.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Attention(kv) => kv.bytes(),
                LayerState::Mamba(s) => {
                    let constants = s.constants.as_ref().map_or(0, |c| {
                        c.a.shape().num_elements()
                            + c.d.shape().num_elements()
                            + c.conv_weight.shape().num_elements()
                            + c.delta_bias
                                .as_ref()
                                .map_or(0, |t| t.shape().num_elements())
                            + c.conv_bias.as_ref().map_or(0, |t| t.shape().num_elements())
                    });
                    (s.conv.shape().num_elements() + s.ssm.shape().num_elements() + constants)
                        * DType::F32.size()
                }
            })
            .sum()
    }
}

/// What the new positions may not see: the future (when there are several), and padded keys.
/// Built once per forward and shared by the attention layers; `Causal` (no tensor) when nothing
/// is padded.
fn attention_mask_for<B: Backend>(
    len: usize,
    past: usize,
    key_pad: Option<Tensor<B, 2, Bool>>,
    batch: usize,
    device: &B::Device,
) -> AttentionMask<B> {
    let total = past + len;
    match key_pad {
        None if len > 1 => AttentionMask::Causal,
        None => AttentionMask::None,
        Some(pad) => {
            let pad = pad
                .reshape([batch, 1, 1, total])
                .expand([batch, 1, len, total]);
            AttentionMask::Explicit(match len > 1 {
                true => causal_mask::<B>(len, past, device)
                    .expand([batch, 1, len, total])
                    .bool_or(pad),
                false => pad,
            })
        }
    }
}

fn check_dtype<B: Backend>(device: &B::Device, dtype: DType) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
        || !B::supports_dtype(device, dtype)
    {
        return Err(JambaError::DtypeNotSupported {
            dtype: format!("{dtype:?}"),
            backend: B::name(device),
        });
    }
    Ok(())
}
