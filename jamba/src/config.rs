//! The model's hyper-parameters, read from (and written to) a Hugging Face `config.json`.
//!
//! Field names and defaults follow transformers' `JambaConfig`, so a checkpoint's config reads
//! unchanged. [`JambaConfig::validate`] rejects shapes the model cannot be built with, naming the field.

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::JambaError;

/// `mamba_dt_rank` is either a number or `"auto"` (= ceil(hidden_size / 16)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtRank {
    /// ceil(hidden_size / 16), HF's default.
    #[default]
    Auto,
    /// An explicit rank.
    Fixed(usize),
}

impl Serialize for DtRank {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DtRank::Auto => s.serialize_str("auto"),
            DtRank::Fixed(r) => s.serialize_u64(*r as u64),
        }
    }
}

impl<'de> Deserialize<'de> for DtRank {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(usize),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(DtRank::Fixed(n)),
            Raw::Str(s) if s == "auto" => Ok(DtRank::Auto),
            Raw::Str(s) => Err(serde::de::Error::custom(format!(
                "mamba_dt_rank must be a number or \"auto\", got {s:?}"
            ))),
        }
    }
}

/// A token id or a list of them (HF allows both for `eos_token_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// What mixes information across positions in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixerKind {
    /// Grouped-query attention without positional encoding.
    Attention,
    /// A Mamba (selective state space) mixer.
    Mamba,
}

/// The per-position feed-forward part of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedForwardKind {
    /// One SwiGLU MLP.
    Dense,
    /// A sparse mixture of SwiGLU experts with top-k routing.
    Moe,
}

/// Hyper-parameters of a Jamba model, with transformers' names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JambaConfig {
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `None` (or absent) means as many KV heads as query heads.
    pub num_key_value_heads: Option<usize>,
    pub hidden_act: String,
    pub initializer_range: f64,
    pub rms_norm_eps: f64,
    pub use_cache: bool,
    pub output_router_logits: bool,
    pub router_aux_loss_coef: f64,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<TokenIds>,
    pub max_position_embeddings: usize,
    pub attention_dropout: f64,
    pub num_experts_per_tok: usize,
    #[serde(alias = "num_local_experts")]
    pub num_experts: usize,
    pub expert_layer_period: usize,
    pub expert_layer_offset: usize,
    pub attn_layer_period: usize,
    pub attn_layer_offset: usize,
    pub mamba_d_state: usize,
    pub mamba_d_conv: usize,
    pub mamba_expand: usize,
    pub mamba_dt_rank: DtRank,
    pub mamba_conv_bias: bool,
    pub mamba_proj_bias: bool,
    /// Kept so a config written back reads the same in transformers; not used by the math.
    pub use_mamba_kernels: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
}

impl Default for JambaConfig {
    /// transformers' `JambaConfig()` defaults: the Jamba-v0.1 shape.
    fn default() -> Self {
        Self {
            vocab_size: 65536,
            tie_word_embeddings: false,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: Some(8),
            hidden_act: "silu".into(),
            initializer_range: 0.02,
            rms_norm_eps: 1e-6,
            use_cache: true,
            output_router_logits: false,
            router_aux_loss_coef: 0.001,
            pad_token_id: Some(0),
            bos_token_id: Some(1),
            eos_token_id: Some(TokenIds::One(2)),
            max_position_embeddings: 262144,
            attention_dropout: 0.0,
            num_experts_per_tok: 2,
            num_experts: 16,
            expert_layer_period: 2,
            expert_layer_offset: 1,
            attn_layer_period: 8,
            attn_layer_offset: 4,
            mamba_d_state: 16,
            mamba_d_conv: 4,
            mamba_expand: 2,
            mamba_dt_rank: DtRank::Auto,
            mamba_conv_bias: true,
            mamba_proj_bias: false,
            use_mamba_kernels: true,
            model_type: Some("jamba".into()),
            architectures: Some(vec!["JambaForCausalLM".into()]),
            torch_dtype: None,
        }
    }
}

/// Named model shapes (random weights are enough for sizing and benchmarks).
pub const PRESETS: &[&str] = &["jamba-v0.1", "jamba-1.5-mini", "jamba-1.5-large", "block"];

impl JambaConfig {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, JambaError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| JambaError::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            JambaError::ConfigParse { source, .. } => JambaError::ConfigParse {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, JambaError> {
        let cfg: Self = serde_json::from_str(text).map_err(|source| JambaError::ConfigParse {
            path: "<json>".into(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as pretty JSON, in transformers' field names.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a config always serialises")
    }

    /// A named shape: `jamba-v0.1` (52B, the paper's), `jamba-1.5-mini` (same shape),
    /// `jamba-1.5-large` (398B), or `block` (one 8-layer Jamba block at width 2048, the benchmark model).
    pub fn preset(name: &str) -> Result<Self, JambaError> {
        let base = Self::default();
        let cfg = match name {
            "jamba-v0.1" | "jamba-1.5-mini" => base,
            "jamba-1.5-large" => Self {
                hidden_size: 8192,
                intermediate_size: 24576,
                num_hidden_layers: 72,
                num_attention_heads: 64,
                num_key_value_heads: Some(8),
                ..base
            },
            "block" => Self {
                vocab_size: 32000,
                hidden_size: 2048,
                intermediate_size: 7168,
                num_hidden_layers: 8,
                num_attention_heads: 16,
                num_key_value_heads: Some(4),
                mamba_dt_rank: DtRank::Fixed(128),
                ..base
            },
            other => {
                return Err(JambaError::UnknownPreset {
                    name: other.into(),
                    known: PRESETS.join(", "),
                })
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every constraint the model relies on; the error names the offending field.
    pub fn validate(&self) -> Result<(), JambaError> {
        let bad =
            |field: &'static str, reason: String| Err(JambaError::InvalidConfig { field, reason });
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("expert_layer_period", self.expert_layer_period),
            ("attn_layer_period", self.attn_layer_period),
            ("mamba_d_state", self.mamba_d_state),
            ("mamba_d_conv", self.mamba_d_conv),
            ("mamba_expand", self.mamba_expand),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if self.num_key_value_heads == Some(0) {
            return bad("num_key_value_heads", "must be at least 1".into());
        }
        if let DtRank::Fixed(0) = self.mamba_dt_rank {
            return bad("mamba_dt_rank", "must be at least 1".into());
        }
        if self.attn_layer_offset >= self.attn_layer_period {
            return bad(
                "attn_layer_offset",
                format!(
                    "{} must be smaller than attn_layer_period ({})",
                    self.attn_layer_offset, self.attn_layer_period
                ),
            );
        }
        if self.expert_layer_offset >= self.expert_layer_period {
            return bad(
                "expert_layer_offset",
                format!(
                    "{} must be smaller than expert_layer_period ({})",
                    self.expert_layer_offset, self.expert_layer_period
                ),
            );
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size ({})",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads ({})",
                    self.num_kv_heads(),
                    self.num_attention_heads
                ),
            );
        }
        // With one expert there are no MoE layers and top-k is unused (HF accepts any value).
        if self.num_experts > 1 && self.num_experts_per_tok > self.num_experts {
            return bad(
                "num_experts_per_tok",
                format!(
                    "{} is more than num_experts ({})",
                    self.num_experts_per_tok, self.num_experts
                ),
            );
        }
        if self.hidden_act != "silu" && self.hidden_act != "swish" {
            return bad(
                "hidden_act",
                format!("{:?} is not supported (only \"silu\")", self.hidden_act),
            );
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return bad(
                "rms_norm_eps",
                format!("{} must be positive", self.rms_norm_eps),
            );
        }
        if let Some(pad) = self.pad_token_id {
            if pad as usize >= self.vocab_size {
                return bad(
                    "pad_token_id",
                    format!("{pad} is outside the vocabulary ({})", self.vocab_size),
                );
            }
        }
        Ok(())
    }

    /// Number of key/value heads (defaults to the number of query heads).
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Inner width of the Mamba mixers (`mamba_expand * hidden_size`).
    pub fn mamba_d_inner(&self) -> usize {
        self.mamba_expand * self.hidden_size
    }

    /// The resolved rank of the dt projection.
    pub fn dt_rank(&self) -> usize {
        match self.mamba_dt_rank {
            DtRank::Auto => self.hidden_size.div_ceil(16),
            DtRank::Fixed(r) => r,
        }
    }

    /// Layer `i` is attention iff `i % attn_layer_period == attn_layer_offset`.
    pub fn mixer_kind(&self, layer: usize) -> MixerKind {
        if layer % self.attn_layer_period == self.attn_layer_offset {
            MixerKind::Attention
        } else {
            MixerKind::Mamba
        }
    }

    /// Layer `i` is MoE iff `i % expert_layer_period == expert_layer_offset` and there is more than one expert.
    pub fn feed_forward_kind(&self, layer: usize) -> FeedForwardKind {
        if self.num_experts > 1 && layer % self.expert_layer_period == self.expert_layer_offset {
            FeedForwardKind::Moe
        } else {
            FeedForwardKind::Dense
        }
    }

    /// Indices of the attention layers.
    pub fn attention_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&i| self.mixer_kind(i) == MixerKind::Attention)
            .collect()
    }

    /// Indices of the MoE layers.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&i| self.feed_forward_kind(i) == FeedForwardKind::Moe)
            .collect()
    }

    /// EOS ids declared by the config.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Parameter counts: `(total, active per token)`.
    pub fn parameter_counts(&self) -> (u64, u64) {
        let h = self.hidden_size as u64;
        let i = self.intermediate_size as u64;
        let v = self.vocab_size as u64;
        let di = self.mamba_d_inner() as u64;
        let n = self.mamba_d_state as u64;
        let r = self.dt_rank() as u64;
        let k = self.mamba_d_conv as u64;
        let hd = self.head_dim() as u64;
        let nh = self.num_attention_heads as u64;
        let nkv = self.num_kv_heads() as u64;
        let e = self.num_experts as u64;
        let topk = self.num_experts_per_tok as u64;
        let proj_bias = self.mamba_proj_bias as u64;
        let mamba = 2 * di * h
            + proj_bias * 2 * di
            + di * k
            + self.mamba_conv_bias as u64 * di
            + (r + 2 * n) * di
            + di * r
            + di
            + di * n
            + di
            + h * di
            + proj_bias * h
            + r
            + 2 * n;
        let attention = nh * hd * h + 2 * nkv * hd * h + h * nh * hd;
        let mlp = 3 * h * i;
        let norms = 2 * h;
        let mut total = v * h + h + if self.tie_word_embeddings { 0 } else { v * h };
        let mut active = total;
        for l in 0..self.num_hidden_layers {
            let mixer = match self.mixer_kind(l) {
                MixerKind::Attention => attention,
                MixerKind::Mamba => mamba,
            };
            let (ff_total, ff_active) = match self.feed_forward_kind(l) {
                FeedForwardKind::Dense => (mlp, mlp),
                FeedForwardKind::Moe => (e * mlp + e * h, topk * mlp + e * h),
            };
            total += mixer + norms + ff_total;
            active += mixer + norms + ff_active;
        }
        (total, active)
    }

    /// Bytes of the attention KV cache for `batch` sequences of `context` tokens at `bytes_per_value`.
    pub fn kv_cache_bytes(&self, batch: usize, context: usize, bytes_per_value: usize) -> u64 {
        (self.attention_layers().len() * 2 * self.num_kv_heads() * self.head_dim()) as u64
            * (batch * context * bytes_per_value) as u64
    }

    /// Bytes of the Mamba state (conv state of `d_conv` inputs and f32 SSM state) for `batch` sequences.
    pub fn mamba_state_bytes(&self, batch: usize, conv_bytes_per_value: usize) -> u64 {
        let mamba_layers = (self.num_hidden_layers - self.attention_layers().len()) as u64;
        let di = self.mamba_d_inner() as u64;
        mamba_layers
            * batch as u64
            * di
            * (self.mamba_d_conv as u64 * conv_bytes_per_value as u64
                + self.mamba_d_state as u64 * 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_jamba_v01() {
        let cfg = JambaConfig::preset("jamba-v0.1").unwrap();
        assert_eq!(cfg.dt_rank(), 256);
        assert_eq!(cfg.attention_layers(), vec![4, 12, 20, 28]);
        assert_eq!(cfg.moe_layers().len(), 16);
        let (total, active) = cfg.parameter_counts();
        assert!((51.4e9..51.8e9).contains(&(total as f64)), "{total}");
        assert!((12.0e9..12.2e9).contains(&(active as f64)), "{active}");
        // Paper, Table 1: 4 GiB of KV cache at 256K tokens in 16-bit.
        assert_eq!(cfg.kv_cache_bytes(1, 262_144, 2), 4 << 30);
    }

    #[test]
    fn dt_rank_auto_and_aliases() {
        let cfg = JambaConfig::from_json(
            r#"{"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3,
                "mamba_dt_rank": "auto", "num_local_experts": 3, "num_experts_per_tok": 1,
                "eos_token_id": [2, 7]}"#,
        )
        .unwrap();
        assert_eq!(cfg.dt_rank(), 3);
        assert_eq!(cfg.num_experts, 3);
        assert_eq!(cfg.eos_token_ids(), vec![2, 7]);
        let back = JambaConfig::from_json(&cfg.to_json()).unwrap();
        assert_eq!(back, cfg);
    }

    fn field_of(json: &str) -> &'static str {
        match JambaConfig::from_json(json) {
            Err(JambaError::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn invalid_configs_name_the_field() {
        assert_eq!(field_of(r#"{"attn_layer_offset": 8}"#), "attn_layer_offset");
        assert_eq!(
            field_of(r#"{"expert_layer_offset": 2}"#),
            "expert_layer_offset"
        );
        assert_eq!(
            field_of(r#"{"num_attention_heads": 30}"#),
            "num_attention_heads"
        );
        assert_eq!(
            field_of(r#"{"num_key_value_heads": 5}"#),
            "num_key_value_heads"
        );
        assert_eq!(field_of(r#"{"hidden_size": 0}"#), "hidden_size");
        assert_eq!(
            field_of(r#"{"num_experts_per_tok": 17}"#),
            "num_experts_per_tok"
        );
        assert_eq!(field_of(r#"{"mamba_dt_rank": 0}"#), "mamba_dt_rank");
        assert!(matches!(
            JambaConfig::from_json(r#"{"mamba_dt_rank": "big"}"#),
            Err(JambaError::ConfigParse { .. })
        ));
        assert!(matches!(
            JambaConfig::from_json(r#"{"hidden_size": "wide"}"#),
            Err(JambaError::ConfigParse { .. })
        ));
    }

    #[test]
    fn schedules() {
        let pure_mamba = JambaConfig {
            attn_layer_period: 100,
            attn_layer_offset: 99,
            num_hidden_layers: 4,
            ..Default::default()
        };
        assert!(pure_mamba.attention_layers().is_empty());
        let pure_attention = JambaConfig {
            attn_layer_period: 1,
            attn_layer_offset: 0,
            num_hidden_layers: 4,
            num_experts: 1,
            ..Default::default()
        };
        assert_eq!(pure_attention.attention_layers().len(), 4);
        assert!(pure_attention.moe_layers().is_empty());
    }
}
