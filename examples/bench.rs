//! Throughput of a Jamba model with random weights: cached decode ms/step at several batch sizes,
//! and prefill tokens/s. Prints rows comparable with `benches/ANCHORS.md`.
//!
//! ```sh
//! cargo run --release --example bench -- --config benches/configs/block.json --batches 1,8,32
//! CUDARC_CUDA_VERSION=13000 cargo build --release --features cuda --example bench   # for the GPU
//! ```

use std::time::Instant;

use burn::tensor::DType;
use clap::{Parser, ValueEnum};
use jamba::generate::decode_step;
use jamba::{JambaBackend, JambaConfig, JambaForCausalLM, TokenBatch};

#[derive(Parser)]
struct Args {
    /// HF config.json of the model shape.
    #[arg(long, default_value = "benches/configs/block.json")]
    config: std::path::PathBuf,
    #[arg(long, value_enum, default_value_t = Backend::Ndarray)]
    backend: Backend,
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// Prompt length before the decode steps.
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// Batch sizes for decode.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batches: Vec<usize>,
    /// Timed decode steps per batch size (after `warmup` untimed ones).
    #[arg(long, default_value_t = 16)]
    steps: usize,
    #[arg(long, default_value_t = 4)]
    warmup: usize,
    /// Prefill lengths to time (batch 1), e.g. 4096,16384; none by default.
    #[arg(long, value_delimiter = ',')]
    prefill: Vec<usize>,
    /// Prefill chunk.
    #[arg(long, default_value_t = 2048)]
    chunk: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Ndarray,
    Wgpu,
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run<B: JambaBackend>(args: &Args, device: &B::Device) {
    let dtype = match args.dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    };
    let cfg = JambaConfig::from_file(&args.config).expect("config");
    let (total, active) = cfg.parameter_counts();
    let started = Instant::now();
    B::seed(device, 0);
    let model = JambaForCausalLM::<B>::init(&cfg, device, dtype).expect("model");
    B::sync(device).unwrap();
    println!(
        "model {} ({:.2} B params, {:.2} B active) on {} {:?}, built in {:.1?}",
        args.config.display(),
        total as f64 / 1e9,
        active as f64 / 1e9,
        B::name(device),
        dtype,
        started.elapsed()
    );
    let vocab = cfg.vocab_size as i64;
    let tokens = |batch: usize, len: usize| {
        let ids = (0..batch * len)
            .map(|i| 3 + (i as i64 * 7919) % (vocab - 3))
            .collect();
        TokenBatch::new(ids, batch, len, None).unwrap()
    };

    for &len in &args.prefill {
        let mut times = Vec::new();
        for rep in 0..3 {
            let mut cache = model.new_cache_with_capacity(1, len + 1);
            B::sync(device).unwrap();
            let t = Instant::now();
            let logits = model
                .prefill(&tokens(1, len), &mut cache, args.chunk, false)
                .unwrap();
            let _ = logits.into_data();
            let secs = t.elapsed().as_secs_f64();
            if rep > 0 {
                times.push(secs);
            }
        }
        let s = median(times);
        println!(
            "| prefill, batch 1, {len} tokens | {:.1} tok/s ({:.1} ms) |",
            len as f64 / s,
            s * 1e3
        );
    }

    for &batch in &args.batches {
        let mut cache =
            model.new_cache_with_capacity(batch, args.prompt + args.warmup + args.steps + 1);
        let t = Instant::now();
        let logits = model
            .prefill(&tokens(batch, args.prompt), &mut cache, args.chunk, false)
            .unwrap();
        let _ = logits.into_data();
        let prefill = t.elapsed();
        let next: Vec<u32> = (0..batch as u32).map(|b| 5 + b).collect();
        let mut times = Vec::new();
        for step in 0..args.warmup + args.steps {
            B::sync(device).unwrap();
            let t = Instant::now();
            // Reading the logits back is part of a real step (sampling happens on the host).
            let _ = decode_step(&model, &mut cache, &next).unwrap().into_data();
            if step >= args.warmup {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let ms = median(times) * 1e3;
        println!(
            "| decode, batch {batch} (prompt {}) | {ms:.2} ms/step ({:.1} tok/s) | prefill of the prompt {:.2?}, cache {:.1} MiB |",
            args.prompt,
            batch as f64 * 1e3 / ms,
            prefill,
            cache.bytes() as f64 / (1 << 20) as f64
        );
    }
}

fn main() {
    let args = Args::parse();
    match args.backend {
        Backend::Ndarray => run::<burn::backend::NdArray>(&args, &Default::default()),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => run::<burn::backend::Wgpu>(&args, &Default::default()),
        #[cfg(feature = "cuda")]
        Backend::Cuda => run::<burn::backend::Cuda>(&args, &Default::default()),
        #[allow(unreachable_patterns)]
        _ => {
            eprintln!(
                "error: this backend is not compiled in (rebuild with --features wgpu or cuda)"
            );
            std::process::exit(2);
        }
    }
}
