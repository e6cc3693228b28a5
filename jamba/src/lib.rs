//! Jamba, the hybrid Transformer–Mamba mixture-of-experts language model (Lieber, Lenz et al.,
//! AI21 Labs, 2024), on Burn.
//!
//! The model is generic over the backend: `B: JambaBackend` is any Burn backend with the Mamba
//! operations of [`jamba_kernels`] (NdArray, Wgpu, Cuda, LibTorch and `Autodiff` of these).
//!
//! ```no_run
//! use burn::backend::NdArray;
//! use burn::tensor::DType;
//! use jamba::{JambaForCausalLM, TokenBatch};
//!
//! let device = Default::default();
//! let model = JambaForCausalLM::<NdArray>::from_pretrained("path/to/checkpoint", &device, DType::F32)?;
//! let out = model.forward(&TokenBatch::single(&[1, 1500, 302]), None, false)?;
//! println!("{:?}", out.logits.dims());
//! # Ok::<(), jamba::JambaError>(())
//! ```

pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod generate;
pub mod layer;
pub mod mamba;
pub mod model;
pub mod moe;
pub mod nn;
pub mod parallel;
pub mod step;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use config::{DtRank, FeedForwardKind, JambaConfig, MixerKind, PRESETS};
pub use error::{JambaError, Result};
pub use generate::{FinishReason, Generation, GenerationConfig, SamplingConfig};
pub use jamba_kernels::JambaBackend;
pub use model::{
    ForwardOptions, HybridCache, JambaForCausalLM, JambaModel, JambaOutput, TokenBatch,
};
pub use tokenizer::{ChatMessage, Tokenizer};
