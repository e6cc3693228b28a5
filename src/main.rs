//! `jamba`: inspect Jamba shapes and run checkpoints from the command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use jamba::checkpoint::{read_all, write_safetensors};
use jamba::{JambaBackend, JambaConfig, JambaError, JambaForCausalLM, TokenBatch};

use burn::tensor::{DType, TensorData};

#[derive(Parser)]
#[command(
    name = "jamba",
    version,
    about = "Jamba (hybrid Transformer-Mamba MoE) on Burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Layer schedule, parameter counts and cache sizes of a checkpoint or a preset.
    Info {
        /// Checkpoint folder with config.json.
        #[arg(long, conflicts_with = "preset", required_unless_present = "preset")]
        model: Option<PathBuf>,
        /// A named shape: jamba-v0.1, jamba-1.5-mini, jamba-1.5-large, block.
        #[arg(long)]
        preset: Option<String>,
        /// Context length for the cache sizes.
        #[arg(long, default_value_t = 262_144)]
        context: usize,
        /// Number of sequences for the cache sizes.
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// Logits of the `input_ids` (and optional `attention_mask`) in a safetensors file.
    Forward {
        /// Checkpoint folder (config.json + model.safetensors or a sharded index).
        #[arg(long)]
        model: PathBuf,
        /// safetensors file with `input_ids` i64 [B, T] and optionally `attention_mask` [B, T].
        #[arg(long)]
        input: PathBuf,
        /// safetensors file to write `logits` f32 [B, T, V] to.
        #[arg(long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value_t = Backend::Ndarray)]
        backend: Backend,
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        dtype: Dtype,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backend {
    Ndarray,
    Wgpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    fn dtype(self) -> DType {
        match self {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::Bf16 => DType::BF16,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Jamba(#[from] JambaError),
    #[error("backend `{0}` is not compiled in: rebuild with `--features {0}`")]
    BackendNotBuilt(&'static str),
    #[error("{0}")]
    Input(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info {
            model,
            preset,
            context,
            batch,
        } => info(model.as_deref(), preset.as_deref(), context, batch),
        Command::Forward {
            model,
            input,
            output,
            backend,
            dtype,
        } => forward_cmd(&model, &input, &output, backend, dtype.dtype()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    }
}

fn info(
    model: Option<&Path>,
    preset: Option<&str>,
    context: usize,
    batch: usize,
) -> Result<(), CliError> {
    let (cfg, name) = match (model, preset) {
        (Some(dir), _) => (
            JambaConfig::from_file(dir.join("config.json"))?,
            dir.display().to_string(),
        ),
        (None, Some(p)) => (JambaConfig::preset(p)?, p.to_string()),
        (None, None) => return Err(CliError::Input("give --model DIR or --preset NAME".into())),
    };
    println!("model: {name}");
    println!(
        "shape: hidden {}, {} layers, {} heads / {} KV heads (head_dim {}), d_inner {}, d_state {}, d_conv {}, dt_rank {}, vocab {}",
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_kv_heads(),
        cfg.head_dim(),
        cfg.mamba_d_inner(),
        cfg.mamba_d_state,
        cfg.mamba_d_conv,
        cfg.dt_rank(),
        cfg.vocab_size
    );
    println!(
        "experts: {} (top {}) on {} MoE layers",
        cfg.num_experts,
        cfg.num_experts_per_tok,
        cfg.moe_layers().len()
    );
    println!("layer schedule (A = attention, M = Mamba; * = MoE):");
    let schedule: Vec<String> = (0..cfg.num_hidden_layers)
        .map(|i| {
            let mixer = match cfg.mixer_kind(i) {
                jamba::MixerKind::Attention => "A",
                jamba::MixerKind::Mamba => "M",
            };
            let ff = match cfg.feed_forward_kind(i) {
                jamba::FeedForwardKind::Moe => "*",
                jamba::FeedForwardKind::Dense => "",
            };
            format!("{mixer}{ff}")
        })
        .collect();
    for (block, chunk) in schedule.chunks(8).enumerate() {
        println!(
            "  layers {:>3}-{:<3} {}",
            block * 8,
            block * 8 + chunk.len() - 1,
            chunk.join(" ")
        );
    }
    let (total, active) = cfg.parameter_counts();
    println!(
        "parameters: {:.3} B total, {:.3} B active per token",
        total as f64 / 1e9,
        active as f64 / 1e9
    );
    println!(
        "weights: {} in bf16, {} in f32",
        gib(total * 2),
        gib(total * 4)
    );
    println!(
        "KV cache at {context} tokens x {batch}: {} in bf16 ({} attention layers)",
        gib(cfg.kv_cache_bytes(batch, context, 2)),
        cfg.attention_layers().len()
    );
    println!(
        "Mamba state x {batch} (any length): {} (conv state bf16, SSM state f32)",
        gib(cfg.mamba_state_bytes(batch, 2))
    );
    Ok(())
}

fn forward_cmd(
    model: &Path,
    input: &Path,
    output: &Path,
    backend: Backend,
    dtype: DType,
) -> Result<(), CliError> {
    match backend {
        Backend::Ndarray => {
            #[cfg(feature = "ndarray")]
            return forward_on::<burn::backend::NdArray>(
                &Default::default(),
                model,
                input,
                output,
                dtype,
            );
            #[cfg(not(feature = "ndarray"))]
            return Err(CliError::BackendNotBuilt("ndarray"));
        }
        Backend::Wgpu => {
            #[cfg(feature = "wgpu")]
            return forward_on::<burn::backend::Wgpu>(
                &Default::default(),
                model,
                input,
                output,
                dtype,
            );
            #[cfg(not(feature = "wgpu"))]
            return Err(CliError::BackendNotBuilt("wgpu"));
        }
        Backend::Cuda => {
            #[cfg(feature = "cuda")]
            return forward_on::<burn::backend::Cuda>(
                &Default::default(),
                model,
                input,
                output,
                dtype,
            );
            #[cfg(not(feature = "cuda"))]
            return Err(CliError::BackendNotBuilt("cuda"));
        }
    }
}

/// Reads `input_ids` and the optional `attention_mask` of a safetensors file.
fn read_tokens(path: &Path) -> Result<TokenBatch, CliError> {
    let tensors = read_all(path)?;
    let ids = tensors
        .get("input_ids")
        .ok_or_else(|| CliError::Input(format!("{}: no `input_ids` tensor", path.display())))?;
    let as_i64 = |name: &str, d: &TensorData| -> Result<Vec<i64>, CliError> {
        match d.dtype {
            DType::I64 | DType::I32 => Ok(d
                .clone()
                .convert::<i64>()
                .to_vec::<i64>()
                .expect("int data")),
            other => Err(CliError::Input(format!(
                "{}: `{name}` must be i64 or i32, found {other:?}",
                path.display()
            ))),
        }
    };
    if ids.shape.len() != 2 {
        return Err(CliError::Input(format!(
            "{}: `input_ids` must be [batch, len], found shape {:?}",
            path.display(),
            ids.shape
        )));
    }
    let (batch, len) = (ids.shape[0], ids.shape[1]);
    let mask = match tensors.get("attention_mask") {
        Some(m) if m.shape.as_slice() != ids.shape.as_slice() => {
            return Err(CliError::Input(format!(
                "{}: `attention_mask` has shape {:?}, `input_ids` {:?}",
                path.display(),
                m.shape,
                ids.shape
            )))
        }
        Some(m) => Some(as_i64("attention_mask", m)?),
        None => None,
    };
    Ok(TokenBatch::new(
        as_i64("input_ids", ids)?,
        batch,
        len,
        mask,
    )?)
}

/// Loads a checkpoint, reporting progress on stderr when it has many tensors.
fn load_model<B: JambaBackend>(
    dir: &Path,
    device: &B::Device,
    dtype: DType,
) -> Result<JambaForCausalLM<B>, CliError> {
    let config = JambaConfig::from_file(dir.join("config.json"))?;
    let ckpt = jamba::checkpoint::Checkpoint::open_dir(dir)?;
    let mut last_report = std::time::Instant::now();
    let model = JambaForCausalLM::<B>::from_checkpoint_with_progress(
        &config,
        &ckpt,
        device,
        dtype,
        |i, n, name| {
            if last_report.elapsed().as_secs_f32() > 2.0 {
                eprintln!("loading {i}/{n}: {name}");
                last_report = std::time::Instant::now();
            }
        },
    )?;
    Ok(model)
}

fn forward_on<B: JambaBackend>(
    device: &B::Device,
    model_dir: &Path,
    input: &Path,
    output: &Path,
    dtype: DType,
) -> Result<(), CliError> {
    let tokens = read_tokens(input)?;
    let started = std::time::Instant::now();
    let model = load_model::<B>(model_dir, device, dtype)?;
    eprintln!(
        "loaded {} on {} ({dtype:?}) in {:.2?}",
        model_dir.display(),
        B::name(device),
        started.elapsed()
    );
    let started = std::time::Instant::now();
    let out = model.forward(&tokens, None, false)?;
    let logits = out.logits.cast(DType::F32).into_data();
    eprintln!(
        "forward of [{}, {}] tokens in {:.2?}",
        tokens.batch,
        tokens.len,
        started.elapsed()
    );
    write_safetensors(output, vec![("logits".into(), logits)], None)?;
    Ok(())
}
