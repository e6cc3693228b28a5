//! Typed errors: each names what was wrong (the field, the tensor key, the token id).

use std::path::Path;

/// Everything that can go wrong when building, loading or running a Jamba model.
#[derive(Debug, thiserror::Error)]
pub enum JambaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or has a field of the wrong type.
    #[error("{path}: malformed config: {source}")]
    ConfigParse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// A config field has a value the model cannot be built with.
    #[error("invalid config: `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// No preset of that name.
    #[error("unknown preset {name:?} (known: {known})")]
    UnknownPreset { name: String, known: String },
    /// The checkpoint lacks a tensor the model needs.
    #[error("checkpoint is missing tensor `{key}` (expected shape {expected:?})")]
    MissingTensor { key: String, expected: Vec<usize> },
    /// A checkpoint tensor has another shape than the config implies.
    #[error("tensor `{key}` has shape {found:?} in the checkpoint, the config needs {expected:?}")]
    ShapeMismatch {
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// The checkpoint has tensors the model does not use (often a config / checkpoint mismatch).
    #[error("checkpoint has {count} unexpected tensor(s), e.g. `{first}`")]
    UnexpectedTensors {
        count: usize,
        first: String,
        all: Vec<String>,
    },
    /// A tensor's stored dtype cannot be loaded.
    #[error("tensor `{key}` has unsupported dtype {dtype} (f32, f16 and bf16 are supported)")]
    UnsupportedDtype { key: String, dtype: String },
    /// A safetensors file or index is malformed.
    #[error("{path}: {reason}")]
    BadCheckpoint { path: String, reason: String },
    /// The requested float dtype is not available on the backend.
    #[error("dtype {dtype} is not supported by the {backend} backend")]
    DtypeNotSupported { dtype: String, backend: String },
    /// An input tensor has the wrong shape or rank.
    #[error("bad input `{name}`: {reason}")]
    BadInput { name: String, reason: String },
    /// A token id is outside the vocabulary.
    #[error("token id {id} at position {position} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfRange {
        id: i64,
        position: usize,
        vocab_size: usize,
    },
    /// The tokenizer could not be loaded, trained or run.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A prompt (plus what is to be generated) is longer than the model's context.
    #[error("sequence of {length} tokens exceeds the model's context of {max} tokens")]
    ContextExceeded { length: usize, max: usize },
    /// Work over several devices failed: a collective operation, or a replica that stopped.
    #[error("multi-device: {0}")]
    Parallel(String),

    /// The device failed to run queued work (reported where the host waits for it).
    #[error("device: {0}")]
    Device(String),
}

impl JambaError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn bad_input(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::BadInput {
            name: name.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = JambaError> = std::result::Result<T, E>;
