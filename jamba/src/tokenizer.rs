//! Text in and out: HF `tokenizer.json` through the `tokenizers` crate, chat templates from
//! `tokenizer_config.json` rendered with minijinja, incremental decoding for streaming, stop
//! strings, and training a byte-level BPE tokenizer.

use std::path::Path;

use jamba_kernels::JambaBackend;
use serde::Serialize;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, TokenizerBuilder,
};

use crate::error::{JambaError, Result};
use crate::generate::{Generation, GenerationConfig};
use crate::model::JambaForCausalLM;

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// A tokenizer with its chat template and special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> JambaError {
    JambaError::Tokenizer(e.to_string())
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, where present, `dir/tokenizer_config.json` (chat template,
    /// BOS/EOS strings). `Ok(None)` when the folder has no tokenizer.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let file = dir.join("tokenizer.json");
        if !file.exists() {
            return Ok(None);
        }
        let mut tok = Self::from_file(&file)?;
        let config = dir.join("tokenizer_config.json");
        if config.exists() {
            let text = std::fs::read_to_string(&config).map_err(|e| JambaError::io(&config, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| tok_err(format!("{}: {e}", config.display())))?;
            tok.chat_template = match json.get("chat_template") {
                Some(serde_json::Value::String(t)) => Some(t.clone()),
                // A list of named templates: take "default".
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(String::from),
                _ => None,
            };
            tok.bos_token = json.get("bos_token").and_then(token_string);
            tok.eos_token = json.get("eos_token").and_then(token_string);
        }
        Ok(Some(tok))
    }

    /// Loads a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| tok_err(format!("{}: {e}", path.display())))?;
        Ok(Self {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
        })
    }

    /// Wraps a `tokenizers` tokenizer.
    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> Self {
        Self {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
        }
    }

    /// Trains a byte-level BPE tokenizer (GPT-2 style: any text round-trips) on `texts`.
    /// `special_tokens` take the first ids, in order.
    pub fn train_bpe(texts: &[String], vocab_size: usize, special_tokens: &[&str]) -> Result<Self> {
        let trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(
                special_tokens
                    .iter()
                    .map(|t| AddedToken::from(t.to_string(), true))
                    .collect(),
            )
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut trainer = TrainerWrapper::BpeTrainer(trainer);
        let mut tok = TokenizerBuilder::<
            ModelWrapper,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        >::new()
        .with_model(BPE::default().into())
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
        .with_post_processor(Some(ByteLevel::new(false, true, true).into()))
        .with_decoder(Some(ByteLevel::default().into()))
        .build()
        .map_err(tok_err)?;
        tok.train(&mut trainer, texts.iter()).map_err(tok_err)?;
        Ok(Self::from_tokenizer(tok.into()))
    }

    /// Writes `tokenizer.json`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let json = self.inner.to_string(true).map_err(tok_err)?;
        crate::checkpoint::write_atomic(path.as_ref(), json.as_bytes())
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether `tokenizer_config.json` provided a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Sets the chat template (Jinja, as in `tokenizer_config.json`).
    pub fn set_chat_template(&mut self, template: impl Into<String>) {
        self.chat_template = Some(template.into());
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (BOS etc.).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special_tokens)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    /// Renders the chat template for `messages`, ending with the assistant's turn when
    /// `add_generation_prompt`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            JambaError::ChatTemplate("tokenizer_config.json has no chat_template".into())
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| JambaError::ChatTemplate(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| JambaError::ChatTemplate(e.to_string()))
    }
}

/// Turns a growing list of token ids into text increments.
///
/// Decoding token by token breaks multi-byte characters split over tokens; this decodes the whole
/// tail and emits only complete text (never ending in U+FFFD, the mark of a partial character).
#[derive(Debug, Clone, Default)]
pub struct TextStreamer {
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStreamer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(None);
        }
        let new = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(new))
    }

    /// Whatever has not been emitted yet, partial characters included (at the end of generation).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let text = tokenizer.decode(&self.ids, true)?;
        let rest = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = text.len();
        Ok(rest)
    }

    /// All text so far.
    pub fn text(&self, tokenizer: &Tokenizer) -> Result<String> {
        tokenizer.decode(&self.ids, true)
    }
}

/// Text generation: encodes `prompt`, generates, streams text increments to `on_text`, and stops at
/// EOS, `max_new_tokens` or the first stop string (whose text is not emitted).
pub fn generate_text<B: JambaBackend>(
    model: &JambaForCausalLM<B>,
    tokenizer: &Tokenizer,
    prompt: &str,
    cfg: &GenerationConfig,
    stop_strings: &[String],
    mut on_text: impl FnMut(&str),
) -> Result<(String, Generation)> {
    if prompt.is_empty() {
        return Err(JambaError::bad_input("prompt", "the prompt is empty"));
    }
    let ids = tokenizer.encode(prompt, true)?;
    if ids.is_empty() {
        return Err(JambaError::bad_input(
            "prompt",
            "the prompt encodes to no tokens",
        ));
    }
    cfg.sampling.validate()?;
    let hold = stop_strings
        .iter()
        .map(|s| s.len())
        .max()
        .unwrap_or(1)
        .saturating_sub(1);
    let mut streamer = TextStreamer::new();
    let mut text = String::new();
    let mut printed = 0;
    let mut failure = None;
    let mut stopped = false;
    let gen = model.generate(&[ids], cfg, |step| {
        let Some(id) = step.tokens[0] else {
            return false;
        };
        if cfg.eos_token_ids.contains(&id) {
            return true;
        }
        match streamer.push(tokenizer, id) {
            Ok(Some(piece)) => text.push_str(&piece),
            Ok(None) => return true,
            Err(e) => {
                failure = Some(e);
                return false;
            }
        }
        if let Some(at) = stop_strings
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(at);
            if at > printed {
                on_text(&text[printed..]);
            }
            printed = text.len();
            stopped = true;
            return false;
        }
        // Hold back what could be the start of a stop string.
        let mut safe = text.len().saturating_sub(hold);
        while !text.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe > printed {
            on_text(&text[printed..safe]);
            printed = safe;
        }
        true
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    if !stopped {
        text.push_str(&streamer.finish(tokenizer)?);
    }
    if text.len() > printed {
        on_text(&text[printed..]);
    }
    Ok((text, gen))
}

/// EOS ids of a checkpoint folder: `config.json`'s plus `generation_config.json`'s.
pub fn eos_token_ids(dir: impl AsRef<Path>, config: &crate::JambaConfig) -> Result<Vec<u32>> {
    let mut ids = config.eos_token_ids();
    let path = dir.as_ref().join("generation_config.json");
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|e| JambaError::io(&path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| JambaError::BadInput {
                name: path.display().to_string(),
                reason: e.to_string(),
            })?;
        if let Some(v) = json.get("eos_token_id") {
            if let Ok(t) = serde_json::from_value::<crate::config::TokenIds>(v.clone()) {
                ids.extend(t.to_vec());
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}
