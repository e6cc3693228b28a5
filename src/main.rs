//! `jamba`: inspect Jamba shapes and run checkpoints from the command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use jamba::checkpoint::{read_all, write_safetensors};
use std::io::Write;

use jamba::generate::{GenerationConfig, SamplingConfig};
use jamba::tokenizer::{eos_token_ids, generate_text};
use jamba::{
    ChatMessage, JambaBackend, JambaConfig, JambaError, JambaForCausalLM, TokenBatch, Tokenizer,
};

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
    /// Generate text from a prompt (streamed to stdout), or token ids from a safetensors file.
    Generate(GenerateArgs),
    /// Training loss and the gradient of every parameter for the tokens in a safetensors file.
    Loss {
        /// Checkpoint folder.
        #[arg(long)]
        model: PathBuf,
        /// safetensors file with `input_ids` i64 [B, T] and optionally `attention_mask` [B, T].
        #[arg(long)]
        input: PathBuf,
        /// safetensors file to write `loss`, `aux_loss` and `grad.{parameter}` (f32) to.
        #[arg(long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value_t = Backend::Ndarray)]
        backend: Backend,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Checkpoint folder (config.json, weights, tokenizer.json); default: the shipped model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt text.
    #[arg(long, conflicts_with_all = ["prompt_file", "input"])]
    prompt: Option<String>,
    /// A file holding the prompt text.
    #[arg(long, conflicts_with = "input")]
    prompt_file: Option<PathBuf>,
    /// safetensors file with `input_ids` i64 [B, P] (and optional `attention_mask`): token mode.
    #[arg(long, requires = "output")]
    input: Option<PathBuf>,
    /// Token mode: safetensors file to write `tokens` i64 [B, N] and `scores` f32 [B, N, V] to.
    #[arg(long, requires = "input")]
    output: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Do not stop at EOS tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Render the prompt as a user message with the tokenizer's chat template.
    #[arg(long)]
    chat: bool,
    /// Prompt tokens per prefill chunk.
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    #[arg(long, value_enum, default_value_t = Backend::Ndarray)]
    backend: Backend,
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// Spread the model over N devices (GPUs 0..N), or over the listed GPU indices (e.g. `0,1`);
    /// expert parallelism: each MoE layer's experts split over all of them, the other layers in
    /// contiguous blocks.
    #[arg(long, default_value = "1")]
    devices: jamba::parallel::DeviceIndices,
}

/// The `n` devices of a backend that `--devices` spreads a model over.
trait Devices: burn::tensor::backend::Backend {
    fn devices(indices: &[usize]) -> Vec<Self::Device>;
}

#[cfg(feature = "ndarray")]
impl Devices for burn::backend::NdArray {
    /// One CPU: a spread model runs there in parts (which only checks the placement).
    fn devices(indices: &[usize]) -> Vec<Self::Device> {
        vec![Default::default(); indices.len()]
    }
}

#[cfg(feature = "wgpu")]
impl Devices for burn::backend::Wgpu {
    fn devices(indices: &[usize]) -> Vec<Self::Device> {
        use burn::backend::wgpu::WgpuDevice;
        match indices {
            [0] => vec![WgpuDevice::DefaultDevice],
            _ => indices
                .iter()
                .map(|&i| WgpuDevice::DiscreteGpu(i))
                .collect(),
        }
    }
}

#[cfg(feature = "cuda")]
impl Devices for burn::backend::Cuda {
    fn devices(indices: &[usize]) -> Vec<Self::Device> {
        indices
            .iter()
            .map(|&i| burn::backend::cuda::CudaDevice::new(i))
            .collect()
    }
}

#[cfg(feature = "cuda")]
impl Devices for jamba_kernels::CudaUnfused {
    fn devices(indices: &[usize]) -> Vec<Self::Device> {
        indices
            .iter()
            .map(|&i| burn::backend::cuda::CudaDevice::new(i))
            .collect()
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backend {
    Ndarray,
    Wgpu,
    Cuda,
    /// CUDA without Burn's operation fusion: each kernel is launched when it is called, which
    /// costs the host less per operation; faster decoding at small batches (BENCHMARKS.md).
    CudaUnfused,
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
        Command::Generate(args) => generate_cmd(args),
        Command::Loss {
            model,
            input,
            output,
            backend,
        } => loss_cmd(&model, &input, &output, backend),
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

/// Runs `$body` with `$B` bound to the backend type chosen at run time.
macro_rules! with_backend {
    ($backend:expr, $B:ident => $body:expr) => {
        match $backend {
            Backend::Ndarray => {
                #[cfg(feature = "ndarray")]
                {
                    type $B = burn::backend::NdArray;
                    $body
                }
                #[cfg(not(feature = "ndarray"))]
                Err(CliError::BackendNotBuilt("ndarray"))
            }
            Backend::Wgpu => {
                #[cfg(feature = "wgpu")]
                {
                    type $B = burn::backend::Wgpu;
                    $body
                }
                #[cfg(not(feature = "wgpu"))]
                Err(CliError::BackendNotBuilt("wgpu"))
            }
            Backend::Cuda => {
                #[cfg(feature = "cuda")]
                {
                    type $B = burn::backend::Cuda;
                    $body
                }
                #[cfg(not(feature = "cuda"))]
                Err(CliError::BackendNotBuilt("cuda"))
            }
            Backend::CudaUnfused => {
                #[cfg(feature = "cuda")]
                {
                    type $B = jamba_kernels::CudaUnfused;
                    $body
                }
                #[cfg(not(feature = "cuda"))]
                Err(CliError::BackendNotBuilt("cuda"))
            }
        }
    };
}

fn forward_cmd(
    model: &Path,
    input: &Path,
    output: &Path,
    backend: Backend,
    dtype: DType,
) -> Result<(), CliError> {
    with_backend!(backend, B => forward_on::<B>(&Default::default(), model, input, output, dtype))
}

/// Where the shipped model lives, relative to the repository.
const SHIPPED_MODEL: &str = "models/jamba-kjv";

/// The model `jamba generate` uses without `--model`: the one shipped in `models/`.
fn default_model_dir() -> PathBuf {
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(SHIPPED_MODEL);
    if shipped.exists() {
        shipped
    } else {
        PathBuf::from(SHIPPED_MODEL)
    }
}

fn generate_cmd(args: GenerateArgs) -> Result<(), CliError> {
    let sampling = SamplingConfig {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    // Every argument is checked before the model is loaded or anything is printed.
    sampling.validate()?;
    if args.prefill_chunk == 0 {
        return Err(CliError::Input("--prefill-chunk must be at least 1".into()));
    }
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| CliError::Input(format!("{}: {e}", f.display())))?,
        ),
        (None, None) => None,
    };
    if prompt.is_none() && args.input.is_none() {
        return Err(CliError::Input(
            "give --prompt TEXT, --prompt-file FILE, or --input FILE --output FILE".into(),
        ));
    }
    if prompt.as_deref().is_some_and(str::is_empty) {
        return Err(CliError::Input("the prompt is empty".into()));
    }
    let dir = args.model.clone().unwrap_or_else(default_model_dir);
    if !dir.join("config.json").exists() {
        return Err(CliError::Input(format!(
            "{}: no config.json (no --model given and the shipped model is not there)",
            dir.display()
        )));
    }
    with_backend!(args.backend, B => generate_on::<B>(&B::devices(&args.devices.0), &dir, &args, sampling, prompt))
}

fn generate_on<B: JambaBackend>(
    devices: &[B::Device],
    dir: &Path,
    args: &GenerateArgs,
    sampling: SamplingConfig,
    prompt: Option<String>,
) -> Result<(), CliError> {
    let config = JambaConfig::from_file(dir.join("config.json"))?;
    let eos = if args.ignore_eos {
        vec![]
    } else {
        eos_token_ids(dir, &config)?
    };
    let cfg = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling,
        eos_token_ids: eos,
        prefill_chunk: args.prefill_chunk,
        pad_token_id: config.pad_token_id.unwrap_or(0),
        output_scores: args.output.is_some(),
    };
    match prompt {
        Some(prompt) => {
            let tokenizer = Tokenizer::from_dir(dir)?
                .ok_or_else(|| CliError::Input(format!("{}: no tokenizer.json", dir.display())))?;
            let prompt = if args.chat {
                tokenizer.apply_chat_template(&[ChatMessage::user(prompt)], true)?
            } else {
                prompt
            };
            let n_prompt = tokenizer.encode(&prompt, true)?.len();
            if n_prompt + cfg.max_new_tokens > config.max_position_embeddings {
                return Err(JambaError::ContextExceeded {
                    length: n_prompt + cfg.max_new_tokens,
                    max: config.max_position_embeddings,
                }
                .into());
            }
            let model = load_model::<B>(dir, devices, args.dtype.dtype())?;
            let mut stdout = std::io::stdout();
            let (_, gen) = generate_text(&model, &tokenizer, &prompt, &cfg, &args.stop, |piece| {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            })?;
            println!();
            report(&gen);
        }
        None => {
            let input = args.input.as_deref().expect("checked above");
            let output = args
                .output
                .as_deref()
                .expect("clap requires --output with --input");
            let tokens = read_tokens(input)?;
            let prompts: Vec<Vec<u32>> = (0..tokens.batch)
                .map(|b| {
                    (0..tokens.len)
                        .filter(|&t| {
                            tokens
                                .attention_mask
                                .as_ref()
                                .is_none_or(|m| m[b * tokens.len + t] == 1)
                        })
                        .map(|t| tokens.ids[b * tokens.len + t] as u32)
                        .collect()
                })
                .collect();
            let model = load_model::<B>(dir, devices, args.dtype.dtype())?;
            let gen = model.generate(&prompts, &cfg, |_| true)?;
            let (batch, n, vocab) = (tokens.batch, cfg.max_new_tokens, config.vocab_size);
            // Rows that stopped early are padded with the pad id and zero scores.
            let mut ids = vec![cfg.pad_token_id as i64; batch * n];
            let mut scores = vec![0f32; batch * n * vocab];
            for b in 0..batch {
                for (s, t) in gen.tokens[b].iter().enumerate() {
                    ids[b * n + s] = *t as i64;
                }
                for (s, row) in gen.scores[b].iter().enumerate() {
                    scores[(b * n + s) * vocab..(b * n + s + 1) * vocab].copy_from_slice(row);
                }
            }
            write_safetensors(
                output,
                vec![
                    ("tokens".into(), TensorData::new(ids, [batch, n])),
                    ("scores".into(), TensorData::new(scores, [batch, n, vocab])),
                ],
                None,
            )?;
            report(&gen);
        }
    }
    Ok(())
}

fn loss_cmd(model: &Path, input: &Path, output: &Path, backend: Backend) -> Result<(), CliError> {
    with_backend!(backend, B => loss_on::<burn::backend::Autodiff<B>>(&Default::default(), model, input, output))
}

/// Labels are the input ids, padding (mask 0) ignored; the loss adds `router_aux_loss_coef` times
/// the load-balancing loss when the model has MoE layers, as transformers does.
fn loss_on<B: burn::tensor::backend::AutodiffBackend + JambaBackend>(
    device: &B::Device,
    model_dir: &Path,
    input: &Path,
    output: &Path,
) -> Result<(), CliError> {
    let tokens = read_tokens(input)?;
    let model = load_model::<B>(model_dir, std::slice::from_ref(device), DType::F32)?;
    let out = model.loss(&tokens)?;
    let grads = burn::optim::GradientsParams::from_grads(out.loss.clone().backward(), &model);
    let scalar = |t: burn::tensor::Tensor<B, 1>| t.into_data().convert::<f32>();
    let mut tensors = vec![("loss".to_string(), scalar(out.loss))];
    if let Some(aux) = out.aux {
        tensors.push(("aux_loss".into(), scalar(aux)));
    }
    for (name, grad) in jamba::train::named_grads(&model, &grads) {
        if let Some(grad) = grad {
            for (key, data) in jamba::nn::hub_split(&name, grad, 0) {
                tensors.push((format!("grad.{key}"), data.convert::<f32>()));
            }
        }
    }
    write_safetensors(output, tensors, None)?;
    Ok(())
}

fn report(gen: &jamba::Generation) {
    let s = &gen.stats;
    eprintln!(
        "prefill: {} tokens in {:.2?} ({:.1} tok/s); decode: {} steps x {} rows in {:.2?} ({:.1} tok/s, {:.2} ms/step); cache: {}",
        s.prompt_tokens,
        s.prefill_time,
        s.prefill_tokens_per_s(),
        s.decode_steps,
        s.batch,
        s.decode_time,
        s.decode_tokens_per_s(),
        s.decode_ms_per_step(),
        gib(s.cache_bytes as u64)
    );
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

/// Loads a checkpoint onto one device or spread over several, reporting progress on stderr when
/// it has many tensors.
fn load_model<B: JambaBackend>(
    dir: &Path,
    devices: &[B::Device],
    dtype: DType,
) -> Result<JambaForCausalLM<B>, CliError> {
    let mut last_report = std::time::Instant::now();
    let progress = |i: usize, n: usize, name: &str| {
        if last_report.elapsed().as_secs_f32() > 2.0 {
            eprintln!("loading {i}/{n}: {name}");
            last_report = std::time::Instant::now();
        }
    };
    if devices.len() > 1 {
        let map = jamba::parallel::DeviceMap::new(devices.to_vec())?;
        return Ok(JambaForCausalLM::<B>::from_pretrained_on(
            dir, &map, dtype, progress,
        )?);
    }
    let config = JambaConfig::from_file(dir.join("config.json"))?;
    let ckpt = jamba::checkpoint::Checkpoint::open_dir(dir)?;
    let model = JambaForCausalLM::<B>::from_checkpoint_with_progress(
        &config,
        &ckpt,
        &devices[0],
        dtype,
        progress,
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
    let model = load_model::<B>(model_dir, std::slice::from_ref(device), dtype)?;
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
