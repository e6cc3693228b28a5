//! The model shipped in `models/jamba-kjv`: the shape the README describes, small enough to ship,
//! and it writes text.

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::DType;
use jamba::generate::{GenerationConfig, SamplingConfig};
use jamba::tokenizer::generate_text;
use jamba::{FeedForwardKind, JambaForCausalLM, MixerKind, Tokenizer};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/jamba-kjv")
}

#[test]
fn shipped_model_has_the_block_layout_and_fits() {
    let bytes = std::fs::metadata(dir().join("model.safetensors"))
        .unwrap()
        .len();
    assert!(bytes <= 60_000_000, "{bytes} bytes");
    let model =
        JambaForCausalLM::<NdArray>::from_pretrained(dir(), &Default::default(), DType::F32)
            .unwrap();
    let cfg = model.config();
    let mixers: Vec<_> = (0..cfg.num_hidden_layers)
        .map(|i| cfg.mixer_kind(i))
        .collect();
    assert_eq!(
        mixers
            .iter()
            .filter(|m| **m == MixerKind::Attention)
            .count()
            * 8,
        cfg.num_hidden_layers
    );
    assert!((0..cfg.num_hidden_layers)
        .all(|i| (cfg.feed_forward_kind(i) == FeedForwardKind::Moe) == (i % 2 == 1)));
    let (total, _) = cfg.parameter_counts();
    assert!(
        (10_000_000..=30_000_000).contains(&total),
        "{total} parameters"
    );
    let val: f64 = std::fs::read_to_string(dir().join("validation_loss.txt"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(val < 4.5, "validation loss {val}");
}

#[test]
fn shipped_model_writes_text() {
    let model =
        JambaForCausalLM::<NdArray>::from_pretrained(dir(), &Default::default(), DType::F32)
            .unwrap();
    let tokenizer = Tokenizer::from_dir(dir()).unwrap().unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        sampling: SamplingConfig::greedy(),
        ..Default::default()
    };
    let (text, gen) = generate_text(
        &model,
        &tokenizer,
        "Ge1:1 In the beginning",
        &cfg,
        &[],
        |_| {},
    )
    .unwrap();
    assert_eq!(gen.tokens[0].len(), 12);
    // A model that learned the corpus continues with words, not noise.
    let letters = text.chars().filter(|c| c.is_ascii_alphabetic()).count();
    assert!(letters * 2 > text.len(), "{text:?}");
}
