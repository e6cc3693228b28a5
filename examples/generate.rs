//! Stream text from a Jamba checkpoint (by default the model shipped in `models/jamba-kjv`).
//!
//! ```sh
//! cargo run --release --example generate
//! cargo run --release --example generate -- --model path/to/checkpoint --prompt "And God said" --max-new-tokens 64
//! ```

use std::io::Write;
use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::DType;
use clap::Parser;
use jamba::generate::{GenerationConfig, SamplingConfig};
use jamba::tokenizer::{eos_token_ids, generate_text};
use jamba::{JambaForCausalLM, Tokenizer};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/models/jamba-kjv"))]
    model: PathBuf,
    #[arg(long, default_value = "Ge1:1 In the beginning")]
    prompt: String,
    #[arg(long, default_value_t = 120)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let device = Default::default();
    let model = JambaForCausalLM::<NdArray>::from_pretrained(&args.model, &device, DType::F32)?;
    let tokenizer =
        Tokenizer::from_dir(&args.model)?.ok_or("the checkpoint has no tokenizer.json")?;
    let cfg = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingConfig {
            temperature: args.temperature,
            top_p: Some(args.top_p),
            seed: args.seed,
            ..Default::default()
        },
        eos_token_ids: eos_token_ids(&args.model, model.config())?,
        pad_token_id: model.config().pad_token_id.unwrap_or(0),
        ..Default::default()
    };
    print!("{}", args.prompt);
    let mut out = std::io::stdout();
    let (_, gen) = generate_text(&model, &tokenizer, &args.prompt, &cfg, &[], |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    println!();
    let s = &gen.stats;
    eprintln!(
        "prefill {:.1} tok/s, decode {:.1} tok/s ({:.2} ms/step), cache {:.2} MiB",
        s.prefill_tokens_per_s(),
        s.decode_tokens_per_s(),
        s.decode_ms_per_step(),
        s.cache_bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}
