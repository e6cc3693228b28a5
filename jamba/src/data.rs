//! Training data: a text corpus (plain or gzip), tokenized, packed into fixed-length sequences,
//! split into training and validation sets, and shuffled with a seed.

use std::io::Read;
use std::path::Path;

use crate::error::{JambaError, Result};
use crate::generate::Rng;
use crate::model::TokenBatch;
use crate::tokenizer::Tokenizer;

/// Special tokens of tokenizers trained here, with ids 0, 1, 2 (the Jamba config's pad/bos/eos).
pub const SPECIAL_TOKENS: [&str; 3] = ["<|pad|>", "<|bos|>", "<|eos|>"];

/// Reads a text file, decompressing it when its name ends in `.gz`; keeps at most `max_bytes`
/// (cut at a line end).
pub fn read_corpus(path: &Path, max_bytes: Option<usize>) -> Result<String> {
    let file = std::fs::File::open(path).map_err(|e| JambaError::io(path, e))?;
    let mut text = String::new();
    let read = if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file).read_to_string(&mut text)
    } else {
        std::io::BufReader::new(file).read_to_string(&mut text)
    };
    read.map_err(|e| JambaError::io(path, e))?;
    if let Some(max) = max_bytes {
        if text.len() > max {
            let cut = text[..max].rfind('\n').map_or(max, |i| i + 1);
            text.truncate(cut);
        }
    }
    if text.trim().is_empty() {
        return Err(JambaError::bad_input(
            path.display().to_string(),
            "the corpus is empty",
        ));
    }
    Ok(text)
}

/// Trains a byte-level BPE tokenizer on the corpus' lines, with [`SPECIAL_TOKENS`] first.
pub fn train_tokenizer(text: &str, vocab_size: usize) -> Result<Tokenizer> {
    let lines: Vec<String> = text.lines().map(|l| format!("{l}\n")).collect();
    Tokenizer::train_bpe(&lines, vocab_size, &SPECIAL_TOKENS)
}

/// Packed token sequences, split into training and validation sets.
#[derive(Debug, Clone)]
pub struct PackedDataset {
    pub seq_len: usize,
    pub train: Vec<Vec<u32>>,
    pub valid: Vec<Vec<u32>>,
    /// Tokens in the whole corpus.
    pub tokens: usize,
}

impl PackedDataset {
    /// Tokenizes `text` as one stream, cuts it into sequences of `seq_len` tokens, holds out the
    /// last `valid_fraction` of them (the end of the corpus, unseen in training), and shuffles the
    /// rest with `seed`.
    pub fn new(
        text: &str,
        tokenizer: &Tokenizer,
        seq_len: usize,
        valid_fraction: f64,
        seed: u64,
    ) -> Result<Self> {
        if seq_len < 2 {
            return Err(JambaError::bad_input("seq_len", "must be at least 2"));
        }
        let ids = tokenizer.encode(text, false)?;
        let n = ids.len() / seq_len;
        if n < 2 {
            return Err(JambaError::bad_input(
                "corpus",
                format!(
                    "{} tokens make fewer than two sequences of {seq_len}",
                    ids.len()
                ),
            ));
        }
        let mut seqs: Vec<Vec<u32>> = ids.chunks_exact(seq_len).map(<[u32]>::to_vec).collect();
        let n_valid = ((n as f64 * valid_fraction).round() as usize).clamp(1, n - 1);
        let valid = seqs.split_off(n - n_valid);
        let mut rng = Rng::new(seed);
        for i in (1..seqs.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            seqs.swap(i, j);
        }
        Ok(Self {
            seq_len,
            train: seqs,
            valid,
            tokens: ids.len(),
        })
    }

    /// Training batch number `index` (sequences taken in order, wrapping around).
    pub fn train_batch(&self, index: usize, batch: usize) -> TokenBatch {
        Self::batch_of(&self.train, index * batch, batch, self.seq_len)
    }

    /// Validation batches of `batch` sequences (the last one may be smaller).
    pub fn valid_batches(&self, batch: usize) -> Vec<TokenBatch> {
        self.valid
            .chunks(batch)
            .map(|c| Self::batch_of(c, 0, c.len(), self.seq_len))
            .collect()
    }

    fn batch_of(seqs: &[Vec<u32>], start: usize, batch: usize, len: usize) -> TokenBatch {
        let ids = (0..batch)
            .flat_map(|b| seqs[(start + b) % seqs.len()].iter().map(|&t| t as i64))
            .collect();
        TokenBatch::new(ids, batch, len, None).expect("sequences have the packed length")
    }
}
