//! Train a Jamba from scratch (or fine-tune a checkpoint) on a text corpus.
//!
//! ```sh
//! # The default: the shipped model's shape on the King James Bible, on the CPU.
//! cargo run --release --example train -- --out runs/kjv
//! # On a GPU, in bf16 with f32 optimizer state:
//! CUDARC_CUDA_VERSION=13000 cargo run --release --features cuda --example train -- --backend cuda --dtype bf16 --out runs/kjv
//! ```
//!
//! Writes `OUT/checkpoint-STEP/` (loadable by transformers' `JambaForCausalLM.from_pretrained`,
//! plus optimizer and trainer state for `--resume`), `OUT/final/`, `OUT/metrics.csv` and
//! `OUT/loss.png`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use jamba::data::{read_corpus, train_tokenizer, PackedDataset};
use jamba::parallel::DataParallelTrainer;
use jamba::train::{AdamWConfig, TrainConfig, Trainer};
use jamba::{DtRank, JambaBackend, JambaConfig, JambaForCausalLM, Tokenizer};

#[derive(Parser, Clone)]
struct Args {
    /// Text corpus (`.gz` is decompressed).
    #[arg(long, default_value = "data/kjv.txt.gz")]
    corpus: PathBuf,
    /// Use at most this many bytes of the corpus.
    #[arg(long)]
    max_corpus_bytes: Option<usize>,
    /// Model shape (HF config.json); default: the shipped model's shape.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Fine-tune this checkpoint (its tokenizer too) instead of starting from scratch.
    #[arg(long, conflicts_with = "config")]
    init_from: Option<PathBuf>,
    /// Continue the run saved in this checkpoint folder.
    #[arg(long, conflicts_with_all = ["config", "init_from"])]
    resume: Option<PathBuf>,
    /// Vocabulary of the byte-level BPE tokenizer trained on the corpus.
    #[arg(long, default_value_t = 8192)]
    vocab_size: usize,
    #[arg(long, default_value = "runs/jamba")]
    out: PathBuf,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 2000)]
    steps: usize,
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    #[arg(long, default_value_t = 2e-4)]
    min_lr: f64,
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0.02)]
    valid_fraction: f64,
    #[arg(long, default_value_t = 200)]
    eval_every: usize,
    #[arg(long, default_value_t = 500)]
    save_every: usize,
    /// Stop (and save) after this many seconds of training.
    #[arg(long)]
    time_limit: Option<f64>,
    /// Measure throughput only: no checkpoints, no final evaluation.
    #[arg(long)]
    no_save: bool,
    #[arg(long, value_enum, default_value_t = Backend::Ndarray)]
    backend: Backend,
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// Data-parallel over N devices (GPUs 0..N) or the listed GPU indices (e.g. `0,1`; `0,0` runs
    /// two replicas on GPU 0): one replica each, `--batch` rows split over them, gradients
    /// all-reduced.
    #[arg(long, default_value = "1")]
    devices: jamba::parallel::DeviceIndices,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Ndarray,
    Wgpu,
    Cuda,
    /// CUDA without operation fusion.
    CudaUnfused,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

/// The shipped model's shape: one Jamba block (8 layers, attention at layer 4, MoE on odd layers,
/// 8 experts top-2) at width 256.
fn shipped_shape(vocab: usize) -> JambaConfig {
    JambaConfig {
        vocab_size: vocab,
        hidden_size: 256,
        intermediate_size: 640,
        num_hidden_layers: 8,
        num_attention_heads: 8,
        num_key_value_heads: Some(2),
        num_experts: 8,
        num_experts_per_tok: 2,
        mamba_dt_rank: DtRank::Fixed(16),
        tie_word_embeddings: true,
        initializer_range: 0.02,
        ..Default::default()
    }
}

fn main() {
    let args = Args::parse();
    let ids = args.devices.0.clone();
    let result = match args.backend {
        // One CPU: the replicas share it (which only checks data parallelism).
        Backend::Ndarray => {
            run::<Autodiff<burn::backend::NdArray>>(&args, vec![Default::default(); ids.len()])
        }
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => {
            use burn::backend::wgpu::WgpuDevice;
            let devices = match ids.as_slice() {
                [0] => vec![WgpuDevice::DefaultDevice],
                _ => ids.iter().map(|&i| WgpuDevice::DiscreteGpu(i)).collect(),
            };
            run::<Autodiff<burn::backend::Wgpu>>(&args, devices)
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda => run::<Autodiff<burn::backend::Cuda>>(&args, cuda_devices(&ids)),
        #[cfg(feature = "cuda")]
        Backend::CudaUnfused => {
            run::<Autodiff<jamba_kernels::CudaUnfused>>(&args, cuda_devices(&ids))
        }
        #[allow(unreachable_patterns)]
        _ => Err("this backend is not compiled in (rebuild with --features wgpu or cuda)".into()),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
fn cuda_devices(ids: &[usize]) -> Vec<burn::backend::cuda::CudaDevice> {
    ids.iter()
        .map(|&i| burn::backend::cuda::CudaDevice::new(i))
        .collect()
}

type AnyError = Box<dyn std::error::Error>;

/// One device, or data-parallel replicas over several.
// One value per run: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum AnyTrainer<B: AutodiffBackend + JambaBackend> {
    One(Trainer<B>),
    Many(DataParallelTrainer<B>),
}

impl<B: AutodiffBackend + JambaBackend + 'static> AnyTrainer<B>
where
    B::InnerBackend: JambaBackend,
{
    fn new(trainer: Trainer<B>, devices: &[B::Device]) -> jamba::Result<Self> {
        if devices.len() == 1 {
            return Ok(Self::One(trainer));
        }
        Ok(Self::Many(DataParallelTrainer::from_trainer(
            trainer, devices,
        )?))
    }

    fn step(&self) -> usize {
        match self {
            Self::One(t) => t.step,
            Self::Many(t) => t.step,
        }
    }

    fn train_step(&mut self) -> jamba::Result<jamba::train::StepReport> {
        match self {
            Self::One(t) => t.train_step(),
            Self::Many(t) => t.train_step(),
        }
    }

    fn evaluate(&self, max_batches: usize) -> jamba::Result<f64> {
        match self {
            Self::One(t) => t.evaluate(max_batches),
            Self::Many(t) => t.evaluate(max_batches),
        }
    }

    fn save_checkpoint(
        &self,
        dir: &Path,
        tokenizer: Option<&Tokenizer>,
        settings: serde_json::Value,
    ) -> jamba::Result<()> {
        match self {
            Self::One(t) => t.save_checkpoint(dir, tokenizer, settings),
            Self::Many(t) => t.save_checkpoint(dir, tokenizer, settings),
        }
    }
}

fn run<B: AutodiffBackend + JambaBackend + 'static>(
    args: &Args,
    devices: Vec<B::Device>,
) -> Result<(), AnyError>
where
    B::InnerBackend: JambaBackend,
{
    let device = &devices[0];
    let dtype = match args.dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    };
    std::fs::create_dir_all(&args.out)?;
    let text = read_corpus(&args.corpus, args.max_corpus_bytes)?;
    let source = args.resume.as_ref().or(args.init_from.as_ref());
    let tokenizer = match source {
        Some(dir) => Tokenizer::from_dir(dir)?
            .ok_or_else(|| format!("{}: no tokenizer.json", dir.display()))?,
        None => {
            let t = Instant::now();
            let tok = train_tokenizer(&text, args.vocab_size)?;
            eprintln!(
                "trained a {}-token BPE tokenizer in {:.1?}",
                tok.vocab_size(),
                t.elapsed()
            );
            tok
        }
    };
    let data = PackedDataset::new(
        &text,
        &tokenizer,
        args.seq_len,
        args.valid_fraction,
        args.seed,
    )?;
    eprintln!(
        "corpus {}: {} bytes, {} tokens, {} training / {} validation sequences of {}",
        args.corpus.display(),
        text.len(),
        data.tokens,
        data.train.len(),
        data.valid.len(),
        args.seq_len
    );
    let train = TrainConfig {
        steps: args.steps,
        batch: args.batch,
        grad_accum: args.grad_accum,
        lr: args.lr,
        min_lr: args.min_lr,
        warmup: args.warmup,
        max_grad_norm: Some(args.max_grad_norm),
        adamw: AdamWConfig {
            weight_decay: args.weight_decay,
            ..Default::default()
        },
        seed: args.seed,
    };
    for d in &devices {
        B::seed(d, args.seed);
    }
    let trainer = match (&args.resume, &args.init_from) {
        (Some(dir), _) => Trainer::<B>::resume(dir, data, train.clone(), device, dtype)?,
        (None, Some(dir)) => Trainer::new(
            JambaForCausalLM::from_pretrained(dir, device, dtype)?,
            data,
            train.clone(),
        ),
        (None, None) => {
            let cfg = match &args.config {
                Some(path) => JambaConfig::from_file(path)?,
                None => shipped_shape(tokenizer.vocab_size()),
            };
            if cfg.vocab_size < tokenizer.vocab_size() {
                return Err(format!(
                    "config vocab_size {} < tokenizer's {}",
                    cfg.vocab_size,
                    tokenizer.vocab_size()
                )
                .into());
            }
            Trainer::new(
                JambaForCausalLM::init(&cfg, device, dtype)?,
                data,
                train.clone(),
            )
        }
    };
    let (total, active) = trainer.model.config().parameter_counts();
    eprintln!(
        "model: {:.1} M parameters ({:.1} M active), {} on {}{}",
        total as f64 / 1e6,
        active as f64 / 1e6,
        format!("{dtype:?}").to_lowercase(),
        B::name(device),
        match devices.len() {
            1 => String::new(),
            n => format!(" x{n} (data parallel)"),
        }
    );
    let mut trainer = AnyTrainer::new(trainer, &devices)?;
    let settings = serde_json::json!({
        "corpus": args.corpus, "max_corpus_bytes": args.max_corpus_bytes, "seq_len": args.seq_len,
        "batch": args.batch, "grad_accum": args.grad_accum, "lr": args.lr, "min_lr": args.min_lr,
        "warmup": args.warmup, "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm,
        "dtype": format!("{dtype:?}"), "backend": B::name(device), "devices": devices.len(),
    });

    let metrics_path = args.out.join("metrics.csv");
    let new_file = !metrics_path.exists() || args.resume.is_none();
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(!new_file)
        .write(true)
        .truncate(new_file)
        .open(&metrics_path)?;
    if new_file {
        writeln!(
            metrics,
            "step,loss,ce,aux,lr,grad_norm,tokens_per_s,val_loss"
        )?;
    }
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    )?);
    bar.set_position(trainer.step() as u64);
    let started = Instant::now();
    let mut curve: Vec<(usize, f64, Option<f64>)> = Vec::new();
    let mut last_val = None;
    while trainer.step() < args.steps {
        let t = Instant::now();
        let r = trainer.train_step()?;
        let tok_s = r.tokens as f64 / t.elapsed().as_secs_f64();
        if !r.loss.is_finite() {
            return Err(format!("loss became {} at step {}", r.loss, r.step).into());
        }
        let val = if !args.no_save && (r.step % args.eval_every == 0 || r.step == args.steps) {
            let v = trainer.evaluate(8)?;
            last_val = Some(v);
            Some(v)
        } else {
            None
        };
        writeln!(
            metrics,
            "{},{:.5},{:.5},{:.5},{:.3e},{:.4},{:.1},{}",
            r.step,
            r.loss,
            r.ce,
            r.aux,
            r.lr,
            r.grad_norm,
            tok_s,
            val.map_or(String::new(), |v| format!("{v:.5}"))
        )?;
        curve.push((r.step, r.loss, val));
        bar.set_message(format!(
            "loss {:.3} val {} lr {:.2e} {:.0} tok/s",
            r.loss,
            last_val.map_or("-".into(), |v: f64| format!("{v:.3}")),
            r.lr,
            tok_s
        ));
        bar.inc(1);
        let out_of_time = args
            .time_limit
            .is_some_and(|l| started.elapsed().as_secs_f64() > l);
        if !args.no_save && (r.step % args.save_every == 0 || out_of_time) {
            trainer.save_checkpoint(
                &args.out.join(format!("checkpoint-{}", r.step)),
                Some(&tokenizer),
                settings.clone(),
            )?;
        }
        if out_of_time {
            bar.println(format!("time limit reached at step {}", r.step));
            break;
        }
    }
    bar.finish();
    plot(&curve, &args.out.join("loss.png"))?;
    if args.no_save {
        return Ok(());
    }
    let val = trainer.evaluate(usize::MAX)?;
    eprintln!(
        "final validation loss {val:.4} (perplexity {:.1}) after {} steps in {:.1?}",
        val.exp(),
        trainer.step(),
        started.elapsed()
    );
    trainer.save_checkpoint(&args.out.join("final"), Some(&tokenizer), settings)?;
    std::fs::write(
        args.out.join("final").join("validation_loss.txt"),
        format!("{val:.4}\n"),
    )?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// The loss curve (training in blue, validation in red) as a PNG; the numbers are in metrics.csv.
fn plot(curve: &[(usize, f64, Option<f64>)], path: &Path) -> Result<(), AnyError> {
    use plotters::prelude::*;
    if curve.is_empty() {
        return Ok(());
    }
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_step = curve.last().map_or(1, |c| c.0).max(1);
    let max_loss = curve.iter().map(|c| c.1).fold(0.0, f64::max).max(1e-3);
    let mut chart = ChartBuilder::on(&root)
        .margin(20)
        .build_cartesian_2d(0usize..max_step, 0f64..max_loss * 1.05)?;
    // Axes and a grid of tenths, drawn by hand (no fonts are bundled, so no tick labels).
    let top = max_loss * 1.05;
    for i in 0..=10 {
        let y = top * i as f64 / 10.0;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(0, y), (max_step, y)],
            RGBColor(225, 225, 225),
        )))?;
    }
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(0, 0.0), (max_step, 0.0)],
        BLACK,
    )))?;
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(0, 0.0), (0, top)],
        BLACK,
    )))?;
    chart.draw_series(LineSeries::new(curve.iter().map(|c| (c.0, c.1)), &BLUE))?;
    chart.draw_series(LineSeries::new(
        curve.iter().filter_map(|c| c.2.map(|v| (c.0, v))),
        RED.stroke_width(2),
    ))?;
    root.present()?;
    Ok(())
}
