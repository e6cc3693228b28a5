//! Autoregressive generation with the hybrid cache: chunked prefill of (left-padded) prompts, then
//! one cached decode step per token for the whole batch, with greedy or sampled decoding.

use std::time::{Duration, Instant};

use burn::tensor::{DType, Tensor};
use jamba_kernels::JambaBackend;

use crate::error::{JambaError, Result};
use crate::model::{ForwardOptions, HybridCache, JambaForCausalLM, TokenBatch};

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p`, in (0, 1].
    pub top_p: Option<f32>,
    /// Above 1, discourages tokens already in the sequence (transformers' rule: divide positive
    /// logits, multiply negative ones).
    pub repetition_penalty: f32,
    /// Seed of the sampler: the same seed gives the same output.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Rejects parameters with no meaning, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(JambaError::bad_input(
                "temperature",
                format!("must be a finite number >= 0, got {}", self.temperature),
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(JambaError::bad_input(
                    "top_p",
                    format!("must be in (0, 1], got {p}"),
                ));
            }
        }
        if self.top_k == Some(0) {
            return Err(JambaError::bad_input("top_k", "must be at least 1"));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(JambaError::bad_input(
                "repetition_penalty",
                format!(
                    "must be a finite number > 0, got {}",
                    self.repetition_penalty
                ),
            ));
        }
        Ok(())
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// A row stops after producing one of these (empty: never).
    pub eos_token_ids: Vec<u32>,
    /// Prompt positions per prefill chunk.
    pub prefill_chunk: usize,
    /// Pad id used to left-pad shorter prompts of a batch.
    pub pad_token_id: u32,
    /// Keep the logits of every step (`Generation::scores`).
    pub output_scores: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            sampling: SamplingConfig::default(),
            eos_token_ids: Vec::new(),
            prefill_chunk: 512,
            pad_token_id: 0,
            output_scores: false,
        }
    }
}

/// One decode step, as given to the streaming callback.
#[derive(Debug)]
pub struct Step<'a> {
    /// 0 for the first generated token.
    pub index: usize,
    /// The token each row produced, `None` for rows that had already finished.
    pub tokens: &'a [Option<u32>],
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced an EOS token.
    Eos,
    /// It reached `max_new_tokens`.
    Length,
    /// The callback asked to stop.
    Stopped,
}

/// Timings and sizes of a generation.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub batch: usize,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub generated_tokens: usize,
    pub decode_steps: usize,
    pub decode_time: Duration,
    pub cache_bytes: usize,
}

impl GenerationStats {
    /// Prompt tokens (all rows) per second of prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Tokens per second of cached decode steps (all rows; the first token comes from prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        (self.decode_steps * self.batch) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }

    /// Milliseconds per cached decode step of the whole batch.
    pub fn decode_ms_per_step(&self) -> f64 {
        self.decode_time.as_secs_f64() * 1e3 / self.decode_steps.max(1) as f64
    }
}

/// The result of [`JambaForCausalLM::generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated tokens per row (up to and including EOS).
    pub tokens: Vec<Vec<u32>>,
    /// With `output_scores`: per row, per step, the logits `[vocab]` the token was chosen from.
    pub scores: Vec<Vec<Vec<f32>>>,
    pub finish: Vec<FinishReason>,
    pub stats: GenerationStats,
}

/// A small deterministic generator (SplitMix64), so a seed gives the same text on every platform
/// and with every version of the dependencies.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks the next token from one row of logits; `history` is the row's tokens so far.
pub fn sample(logits: &[f32], history: &[u32], cfg: &SamplingConfig, rng: &mut Rng) -> u32 {
    let mut logits = logits.to_vec();
    if cfg.repetition_penalty != 1.0 {
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 {
                    *l / cfg.repetition_penalty
                } else {
                    *l * cfg.repetition_penalty
                };
            }
        }
    }
    if cfg.temperature == 0.0 {
        return argmax(&logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = cfg.top_k {
        order.truncate(k.min(order.len()));
    }
    let max = logits[order[0]] as f64;
    let t = cfg.temperature as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / t).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = cfg.top_p {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let u = rng.next_f64();
    let mut cum = 0.0;
    for (p, &i) in probs.iter().zip(&order) {
        cum += p;
        if u < cum {
            return i as u32;
        }
    }
    *order.last().expect("at least one candidate") as u32
}

/// Index of the largest value (the first on ties, as `torch.argmax`).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Left-pads prompts of different lengths into one batch with an attention mask.
pub fn left_pad(prompts: &[Vec<u32>], pad: u32) -> Result<TokenBatch> {
    if prompts.is_empty() {
        return Err(JambaError::bad_input("prompts", "no prompt given"));
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(JambaError::bad_input(
            "prompts",
            format!("prompt {i} is empty"),
        ));
    }
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * len);
    let mut mask = Vec::with_capacity(prompts.len() * len);
    for p in prompts {
        let pad_n = len - p.len();
        ids.extend(std::iter::repeat_n(pad as i64, pad_n).chain(p.iter().map(|&t| t as i64)));
        mask.extend(std::iter::repeat_n(0i64, pad_n).chain(std::iter::repeat_n(1, p.len())));
    }
    let padded = mask.contains(&0);
    TokenBatch::new(ids, prompts.len(), len, padded.then_some(mask))
}

fn rows_to_host<B: JambaBackend>(logits: Tensor<B, 2>) -> Vec<Vec<f32>> {
    let [batch, vocab] = logits.dims();
    let flat = logits
        .cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 logits");
    (0..batch)
        .map(|b| flat[b * vocab..(b + 1) * vocab].to_vec())
        .collect()
}

impl<B: JambaBackend> JambaForCausalLM<B> {
    /// Generates continuations of `prompts` (token ids; different lengths are left-padded).
    ///
    /// `on_step` sees every step's tokens as they are produced (for streaming) and returns `false`
    /// to stop all rows. Rows stop on an EOS id or at `max_new_tokens`. A padded row generates what
    /// it generates alone.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        cfg: &GenerationConfig,
        mut on_step: impl FnMut(&Step) -> bool,
    ) -> Result<Generation> {
        cfg.sampling.validate()?;
        let batch_tokens = left_pad(prompts, cfg.pad_token_id)?;
        let total = batch_tokens.len + cfg.max_new_tokens;
        if total > self.config.max_position_embeddings {
            return Err(JambaError::ContextExceeded {
                length: total,
                max: self.config.max_position_embeddings,
            });
        }
        let batch = prompts.len();
        let mut stats = GenerationStats {
            batch,
            prompt_tokens: prompts.iter().map(Vec::len).sum(),
            ..Default::default()
        };
        let mut gen = Generation {
            tokens: vec![Vec::new(); batch],
            scores: vec![Vec::new(); batch],
            finish: vec![FinishReason::Length; batch],
            stats: GenerationStats::default(),
        };
        if cfg.max_new_tokens == 0 {
            gen.stats = stats;
            return Ok(gen);
        }
        let mut cache = self.new_cache_with_capacity(batch, total);
        let started = Instant::now();
        let mut host =
            rows_to_host(self.prefill(&batch_tokens, &mut cache, cfg.prefill_chunk, true)?);
        stats.prefill_time = started.elapsed();

        let mut rngs: Vec<Rng> = (0..batch)
            .map(|b| Rng::new(cfg.sampling.seed.wrapping_add(b as u64)))
            .collect();
        let mut history: Vec<Vec<u32>> = prompts.to_vec();
        let mut done = vec![false; batch];
        let decode_started = Instant::now();
        for step in 0..cfg.max_new_tokens {
            let mut chosen = vec![None; batch];
            for b in 0..batch {
                if done[b] {
                    continue;
                }
                let t = sample(&host[b], &history[b], &cfg.sampling, &mut rngs[b]);
                if cfg.output_scores {
                    gen.scores[b].push(std::mem::take(&mut host[b]));
                }
                chosen[b] = Some(t);
                history[b].push(t);
                gen.tokens[b].push(t);
                stats.generated_tokens += 1;
                if cfg.eos_token_ids.contains(&t) {
                    done[b] = true;
                    gen.finish[b] = FinishReason::Eos;
                }
            }
            let keep_going = on_step(&Step {
                index: step,
                tokens: &chosen,
            });
            if !keep_going {
                for (d, finish) in done.iter_mut().zip(gen.finish.iter_mut()) {
                    if !*d {
                        *d = true;
                        *finish = FinishReason::Stopped;
                    }
                }
            }
            if done.iter().all(|d| *d) || step + 1 == cfg.max_new_tokens {
                break;
            }
            // Finished rows keep stepping with their last token; their outputs are ignored.
            let last: Vec<u32> = history
                .iter()
                .map(|h| *h.last().expect("non-empty"))
                .collect();
            host = rows_to_host(decode_step(self, &mut cache, &last)?);
            stats.decode_steps += 1;
        }
        stats.decode_time = decode_started.elapsed();
        stats.cache_bytes = cache.bytes();
        gen.stats = stats;
        Ok(gen)
    }
}

/// Continues `cache` (built by [`JambaForCausalLM::prefill`] or earlier steps) by one token per row
/// and returns the next logits `[batch, vocab]`.
pub fn decode_step<B: JambaBackend>(
    model: &JambaForCausalLM<B>,
    cache: &mut HybridCache<B>,
    tokens: &[u32],
) -> Result<Tensor<B, 2>> {
    step(model, cache, tokens, false)
}

/// [`decode_step`] operation by operation ([`ForwardOptions::separate_decode_ops`]): the same
/// logits, for comparison.
pub fn decode_step_separate<B: JambaBackend>(
    model: &JambaForCausalLM<B>,
    cache: &mut HybridCache<B>,
    tokens: &[u32],
) -> Result<Tensor<B, 2>> {
    step(model, cache, tokens, true)
}

fn step<B: JambaBackend>(
    model: &JambaForCausalLM<B>,
    cache: &mut HybridCache<B>,
    tokens: &[u32],
    separate_decode_ops: bool,
) -> Result<Tensor<B, 2>> {
    let ids = tokens.iter().map(|&t| t as i64).collect();
    let batch = TokenBatch::new(ids, tokens.len(), 1, None)?;
    let options = ForwardOptions {
        last_logits_only: true,
        isolate_padding: true,
        separate_decode_ops,
        ..Default::default()
    };
    let logits = model.forward_with(&batch, Some(cache), &options)?.logits;
    Ok(logits.reshape([tokens.len(), model.config.vocab_size]))
}
