//! A tiny Jamba trained on a slice of the shipped corpus learns: its loss falls by at least 1.0
//! nat within 30 steps (from ~ln(512) = 6.2 for a uniform guess), and a checkpoint of the run
//! resumes and loads as a model.

use std::path::Path;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::DType;
use jamba::data::{read_corpus, train_tokenizer, PackedDataset};
use jamba::train::{TrainConfig, Trainer};
use jamba::{JambaConfig, JambaForCausalLM};

type B = Autodiff<NdArray<f32>>;

fn tiny_config(vocab: usize) -> JambaConfig {
    JambaConfig {
        vocab_size: vocab,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        attn_layer_period: 4,
        attn_layer_offset: 2,
        num_experts: 4,
        num_experts_per_tok: 2,
        mamba_d_state: 8,
        mamba_dt_rank: jamba::DtRank::Fixed(8),
        max_position_embeddings: 4096,
        ..Default::default()
    }
}

#[test]
fn tiny_model_learns_the_corpus() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/kjv.txt.gz");
    let text = read_corpus(&corpus, Some(150_000)).unwrap();
    let tokenizer = train_tokenizer(&text, 512).unwrap();
    let data = PackedDataset::new(&text, &tokenizer, 32, 0.05, 1).unwrap();
    let cfg = tiny_config(tokenizer.vocab_size());
    let device = Default::default();
    let model = JambaForCausalLM::<B>::init(&cfg, &device, DType::F32).unwrap();
    let train = TrainConfig {
        steps: 30,
        batch: 8,
        lr: 5e-3,
        min_lr: 5e-4,
        warmup: 3,
        seed: 1,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, data.clone(), train.clone());
    let mut losses = Vec::new();
    for _ in 0..train.steps {
        let r = trainer.train_step().unwrap();
        assert!(
            r.loss.is_finite() && r.grad_norm.is_finite(),
            "step {}: {r:?}",
            r.step
        );
        losses.push(r.loss);
    }
    let first = losses[..4].iter().sum::<f64>() / 4.0;
    let last = losses[losses.len() - 4..].iter().sum::<f64>() / 4.0;
    eprintln!("loss: first 4 steps {first:.3}, last 4 steps {last:.3}");
    assert!(
        last < first - 1.0,
        "loss fell from {first:.3} to {last:.3} only"
    );
    let val = trainer.evaluate(4).unwrap();
    assert!(
        val < first - 0.7,
        "validation loss {val:.3} vs initial {first:.3}"
    );

    // The checkpoint holds what transformers needs, resumes, and loads for inference.
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("checkpoint");
    trainer
        .save_checkpoint(&ckpt, Some(&tokenizer), serde_json::json!({}))
        .unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ckpt.join(f).exists(), "{f} missing");
    }
    let resumed = Trainer::<B>::resume(&ckpt, data, train, &device, DType::F32).unwrap();
    assert_eq!(resumed.step, 30);
    let inference =
        JambaForCausalLM::<NdArray>::from_pretrained(&ckpt, &Default::default(), DType::F32)
            .unwrap();
    assert_eq!(inference.config().vocab_size, tokenizer.vocab_size());
}
