//! Throughput of a Jamba model with random weights: cached decode ms/step at several batch sizes,
//! and prefill tokens/s. Prints rows comparable with `benches/ANCHORS.md`.
//!
//! ```sh
//! cargo run --release --example bench -- --config benches/configs/block.json --batches 1,8,32
//! CUDARC_CUDA_VERSION=13000 cargo build --release --features cuda --example bench   # for the GPU
//! ```

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::{DType, Distribution, Tensor};
use clap::{Parser, ValueEnum};
use jamba::generate::{decode_step, decode_step_separate};
use jamba::{JambaBackend, JambaConfig, JambaForCausalLM, TokenBatch};
use jamba_kernels::SelectiveScanInput;

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
    /// Batch sizes for decode (0: none).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batches: Vec<usize>,
    /// Timed decode steps per batch size (after `warmup` untimed ones).
    #[arg(long, default_value_t = 16)]
    steps: usize,
    #[arg(long, default_value_t = 4)]
    warmup: usize,
    /// Prefills to time: `LEN` (batch 1) or `BATCHxLEN`, e.g. 4096,16384,8x2048; none by default.
    #[arg(long, value_delimiter = ',')]
    prefill: Vec<String>,
    /// Check the Mamba kernels against the tensor-op reference (on ndarray) first.
    #[arg(long)]
    check_kernels: bool,
    /// Time the selective scan alone (forward and backward, `--dtype`) at `BATCHxDxLEN` shapes in
    /// mamba-ssm's layout (d_state 16, z gate, delta bias and softplus), e.g. 1x8192x4096.
    #[arg(long, value_delimiter = ',')]
    scan: Vec<String>,
    /// Time the experts of one MoE layer of `--config` alone (`JambaBackend::moe_grouped`,
    /// forward and backward, `--dtype`, softmax-top-k routing of random logits) at these token
    /// counts, e.g. 4096,16384.
    #[arg(long, value_delimiter = ',')]
    moe: Vec<usize>,
    /// Time causal self-attention alone (`JambaBackend::causal_attention`, `--dtype`, 16 heads of
    /// 128 over 4 KV heads, batch 1) at these lengths, against the reference (scores in memory).
    /// The tensor-core flash kernel runs at every size, the portable one above
    /// `jamba_kernels::FLASH_MIN_SCORES` scores; `JAMBA_FLASH_MIN_SCORES=0` times it at every
    /// length.
    #[arg(long, value_delimiter = ',')]
    attention: Vec<usize>,
    /// Time `JambaBackend::linear` (`x [M, K] @ weight [N, K]^T`, `--dtype`) at `MxKxN` shapes
    /// through Burn's matmul and through each of cubek's routines of
    /// `jamba_kernels::MATMUL_ROUTINES`, checking each against Burn's result; prints the fastest
    /// routine over all shapes. Needs a backend with kernels; an unfused one (`cuda-unfused`)
    /// runs each product when it is called, with nothing fused around it.
    #[arg(long, value_delimiter = ',')]
    matmul: Vec<String>,
    /// Also time the TMA routines in `--matmul` (a failed TMA launch poisons the device's stream:
    /// the rest of the process fails with it).
    #[arg(long)]
    matmul_tma: bool,
    /// Time only these routines in `--matmul` (TMA ones included when named here).
    #[arg(long, value_delimiter = ',')]
    matmul_routines: Vec<String>,
    /// After the timed decode steps of the first batch size, run this many more while measuring
    /// each host thread's time on the CPU and sampling their stacks, and print where the host's
    /// time goes, by thread and function (needs the `host-profile` feature).
    #[arg(long, default_value_t = 0)]
    host_profile: usize,
    /// Also time decode steps operation by operation (`decode_step_separate`: no composite
    /// operation per layer), alternating step by step with the usual ones, and print their row.
    #[arg(long)]
    separate_decode_ops: bool,
    /// Make the weights of at most this many bytes under CubeCL's persistent allocation mode
    /// instead of the model's default (`jamba::weights::PERSISTENT_MAX_BYTES`); 0 makes them all
    /// in the pools of short-lived buffers (one device only: ignored with several `--devices`).
    #[arg(long)]
    persistent_max_bytes: Option<usize>,
    /// Time what a launch costs the host: 1000 operations in a row on tiny tensors (an
    /// element-wise add, and the decoding product `JambaBackend::linear` at 1x64x64), the time
    /// to issue them and the time until the device has run them, per operation.
    #[arg(long)]
    launch_overhead: bool,
    /// Skip the model (kernel checks and scan timings only).
    #[arg(long)]
    no_model: bool,
    /// Timed repetitions of each prefill (after one untimed).
    #[arg(long, default_value_t = 2)]
    reps: usize,
    /// Prefill chunk.
    #[arg(long, default_value_t = 2048)]
    chunk: usize,
    /// Spread the model over N GPUs (0..N) or the listed ones (`0,0`: two groups on GPU 0):
    /// expert parallelism, see `jamba::parallel::DeviceMap`.
    #[arg(long, default_value = "1")]
    devices: jamba::parallel::DeviceIndices,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Ndarray,
    Wgpu,
    Cuda,
    /// CUDA without Burn's operation fusion.
    CudaUnfused,
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

/// Prints what the device's memory pools hold (CUDA only), after `what`.
type MemoryReport<'a> = &'a dyn Fn(&str);

fn run<B: JambaBackend>(args: &Args, devices: Vec<B::Device>, memory: MemoryReport)
where
    Autodiff<B>: JambaBackend<Device = B::Device>,
{
    let device = &devices[0];
    // Every device the model is spread over finishes its work before a time is taken.
    let sync = || {
        for d in &devices {
            B::sync(d).unwrap();
        }
    };
    let dtype = match args.dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    };
    if args.check_kernels {
        kernel_check::run::<B>(device);
    }
    if args.launch_overhead {
        launch_overhead::<B>(device);
    }
    for spec in &args.scan {
        let dims: Vec<usize> = spec
            .split('x')
            .map(|v| v.parse().expect("BATCHxDxLEN"))
            .collect();
        scan_timing::<B>(device, [dims[0], dims[1], dims[2]], dtype);
    }
    if !args.moe.is_empty() {
        let cfg = JambaConfig::from_file(&args.config).expect("config");
        for &tokens in &args.moe {
            moe_timing::<B>(device, &cfg, tokens, dtype);
        }
    }
    for &len in &args.attention {
        attention_timing::<B>(device, len, dtype);
    }
    if !args.matmul.is_empty() {
        let shapes: Vec<[usize; 3]> = args
            .matmul
            .iter()
            .map(|spec| {
                let d: Vec<usize> = spec.split('x').map(|v| v.parse().expect("MxKxN")).collect();
                [d[0], d[1], d[2]]
            })
            .collect();
        matmul_timing::<B>(
            device,
            &shapes,
            dtype,
            args.matmul_tma,
            &args.matmul_routines,
        );
    }
    if args.no_model {
        return;
    }
    let cfg = JambaConfig::from_file(&args.config).expect("config");
    let (total, active) = cfg.parameter_counts();
    let started = Instant::now();
    for d in &devices {
        B::seed(d, 0);
    }
    if devices.len() > 1 && args.persistent_max_bytes.is_some() {
        eprintln!("warning: --persistent-max-bytes applies to one device only; ignored");
    }
    let model = if devices.len() > 1 {
        let map = jamba::parallel::DeviceMap::new(devices.clone()).expect("devices");
        JambaForCausalLM::<B>::init_on(&cfg, &map, dtype).expect("model")
    } else if let Some(bytes) = args.persistent_max_bytes {
        let mut w = jamba::weights::Weights::random(cfg.initializer_range, device, dtype)
            .with_persistent_max_bytes(bytes);
        let model = JambaForCausalLM::<B>::build(&cfg, &mut w).expect("model");
        jamba::weights::release_build_leftovers::<B>(std::slice::from_ref(device)).expect("device");
        model
    } else {
        JambaForCausalLM::<B>::init(&cfg, device, dtype).expect("model")
    };
    sync();
    println!(
        "model {} ({:.2} B params, {:.2} B active) on {} x{} {:?}, built in {:.1?}",
        args.config.display(),
        total as f64 / 1e9,
        active as f64 / 1e9,
        B::name(device),
        devices.len(),
        dtype,
        started.elapsed()
    );
    memory("the model's set-up");
    let vocab = cfg.vocab_size as i64;
    let tokens = |batch: usize, len: usize| {
        let ids = (0..batch * len)
            .map(|i| 3 + (i as i64 * 7919) % (vocab - 3))
            .collect();
        TokenBatch::new(ids, batch, len, None).unwrap()
    };

    for spec in &args.prefill {
        let (batch, len) = match spec.split_once('x') {
            Some((b, l)) => (b.parse().expect("batch"), l.parse().expect("length")),
            None => (1, spec.parse().expect("length")),
        };
        let mut times = Vec::new();
        for rep in 0..=args.reps.max(1) {
            let mut cache = model.new_cache_with_capacity(batch, len + 1);
            sync();
            let t = Instant::now();
            let logits = model
                .prefill(&tokens(batch, len), &mut cache, args.chunk, false)
                .unwrap();
            let _ = logits.into_data();
            let secs = t.elapsed().as_secs_f64();
            if rep > 0 {
                times.push(secs);
            }
        }
        let s = median(times);
        println!(
            "| prefill, batch {batch}, {len} tokens | {:.1} k tok/s ({:.1} ms) | matmul routine {}, products through cuBLAS so far {} |",
            (batch * len) as f64 / s / 1e3,
            s * 1e3,
            jamba_kernels::matmul_routine().unwrap_or("burn"),
            jamba_kernels::cublas_products()
        );
        memory(&format!("prefill {spec}"));
    }

    for &batch in args.batches.iter().filter(|&&b| b > 0) {
        let profiled = if batch == args.batches[0] {
            args.host_profile
        } else {
            0
        };
        let rounds = if args.separate_decode_ops { 2 } else { 1 };
        let capacity = args.prompt + (args.warmup + args.steps) * rounds + profiled + 1;
        let mut cache = model.new_cache_with_capacity(batch, capacity);
        let t = Instant::now();
        let logits = model
            .prefill(&tokens(batch, args.prompt), &mut cache, args.chunk, false)
            .unwrap();
        let _ = logits.into_data();
        let prefill = t.elapsed();
        let next: Vec<u32> = (0..batch as u32).map(|b| 5 + b).collect();
        // Per mode (0: one composite operation per layer, 1: operation by operation), the
        // times of whole steps and of issuing them; with both, the modes alternate step by step.
        let mut times = [Vec::new(), Vec::new()];
        let mut issue = [Vec::new(), Vec::new()];
        for step in 0..args.warmup + args.steps {
            for mode in 0..rounds {
                sync();
                let t = Instant::now();
                let logits = match mode {
                    0 => decode_step(&model, &mut cache, &next),
                    _ => decode_step_separate(&model, &mut cache, &next),
                }
                .unwrap();
                // Until here the host only issued the step's work (the device runs behind it).
                let issued = t.elapsed().as_secs_f64();
                // Reading the logits back is part of a real step (sampling happens on the host).
                let _ = logits.into_data();
                if step >= args.warmup {
                    times[mode].push(t.elapsed().as_secs_f64());
                    issue[mode].push(issued);
                }
            }
        }
        if times[0].is_empty() {
            continue;
        }
        if args.separate_decode_ops {
            let ms = median(times[1].clone()) * 1e3;
            println!(
                "| decode, batch {batch}, operation by operation (alternating with the next row's steps) | {ms:.2} ms/step ({:.1} tok/s) | host issues a step in {:.2} ms |",
                batch as f64 * 1e3 / ms,
                median(issue[1].clone()) * 1e3
            );
        }
        let [times, _] = times;
        let [issue, _] = issue;
        let ms = median(times) * 1e3;
        if profiled > 0 {
            host_profile::run(profiled, || {
                let logits = decode_step(&model, &mut cache, &next).unwrap();
                let _ = logits.into_data();
            });
        }
        println!(
            "| decode, batch {batch} (prompt {}) | {ms:.2} ms/step ({:.1} tok/s) | prefill of the prompt {:.2?}, cache {:.1} MiB, host issues a step in {:.2} ms |",
            args.prompt,
            batch as f64 * 1e3 / ms,
            prefill,
            cache.bytes() as f64 / (1 << 20) as f64,
            median(issue) * 1e3
        );
        memory(&format!("decode batch {batch}"));
    }
}

/// Host and device time per operation of 1000 dependent tiny operations (median of 5 runs
/// after one): the floor a decoding step's launches stand on.
fn launch_overhead<B: JambaBackend>(device: &B::Device) {
    const N: usize = 1000;
    let x = Tensor::<B, 2>::random([1, 64], Distribution::Normal(0.0, 1.0), device);
    // Scaled so that the chained products stay finite.
    let w = Tensor::<B, 2>::random([64, 64], Distribution::Normal(0.0, 0.125), device);
    type Op<'a, B> = &'a dyn Fn(Tensor<B, 2>) -> Tensor<B, 2>;
    let ops: [(&str, Op<B>); 2] = [
        ("element-wise add (x + 1)", &|y| y.add_scalar(1.0)),
        ("decoding product 1x64x64 (`linear`)", &|y| {
            <B as JambaBackend>::linear(y, w.clone(), None)
        }),
    ];
    for (name, op) in ops {
        let (mut host, mut total) = (Vec::new(), Vec::new());
        for rep in 0..6 {
            B::sync(device).unwrap();
            let t = Instant::now();
            let mut y = x.clone();
            for _ in 0..N {
                y = op(y);
            }
            let issued = t.elapsed().as_secs_f64();
            let _ = y.into_data();
            if rep > 0 {
                host.push(issued);
                total.push(t.elapsed().as_secs_f64());
            }
        }
        println!(
            "| launch overhead: {name}, {N} in a row | host {:.1} us per operation | {:.1} us per operation until the device has run them |",
            median(host) * 1e6 / N as f64,
            median(total) * 1e6 / N as f64
        );
    }
}

/// Forward and backward of one scan at `[batch, d, len]` (d_state 16), median of 10 after 3
/// warm-up runs, each synchronised.
fn scan_timing<B: JambaBackend>(device: &B::Device, [batch, d, len]: [usize; 3], dtype: DType) {
    let n = 16;
    let r3 = |s: [usize; 3], mean: f64| {
        Tensor::<B, 3>::random(s, Distribution::Normal(mean, 1.0), device).cast(dtype)
    };
    let input = SelectiveScanInput::<B> {
        u: r3([batch, d, len], 0.0),
        delta: r3([batch, d, len], -1.0),
        a: Tensor::<B, 2>::random([d, n], Distribution::Uniform(-4.0, -0.1), device),
        b: r3([batch, n, len], 0.0),
        c: r3([batch, n, len], 0.0),
        d: Tensor::<B, 1>::random([d], Distribution::Normal(0.0, 1.0), device),
        z: Some(r3([batch, d, len], 0.0)),
        delta_bias: Some(Tensor::<B, 1>::random(
            [d],
            Distribution::Uniform(-2.0, 0.0),
            device,
        )),
        delta_softplus: true,
        initial_state: None,
    };
    let grad = r3([batch, d, len], 0.0);
    let time = |f: &dyn Fn()| {
        let mut v = Vec::new();
        for rep in 0..13 {
            B::sync(device).unwrap();
            let t = Instant::now();
            f();
            B::sync(device).unwrap();
            if rep >= 3 {
                v.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        median(v)
    };
    use jamba_kernels::ScanForward;
    let kinds = [
        ScanForward::Chunked,
        ScanForward::OnePass,
        ScanForward::Split,
    ];
    let before = kinds.map(jamba_kernels::scan_forward_runs);
    let fwd = time(&|| {
        let _ = B::selective_scan(input.clone());
    });
    let kernel = kinds
        .iter()
        .zip(before)
        .find(|(k, n)| jamba_kernels::scan_forward_runs(**k) > *n)
        .map_or("reference".to_string(), |(k, _)| format!("{k:?}"));
    let bwd = if B::KERNELS {
        let (_, saved) = B::selective_scan_saving(&input);
        let chunked = jamba_kernels::scan_backward_runs(jamba_kernels::ScanBackward::Chunked);
        let ms = time(&|| {
            let _ = B::selective_scan_backward(&input, saved.clone(), grad.clone());
        });
        let which =
            if jamba_kernels::scan_backward_runs(jamba_kernels::ScanBackward::Chunked) > chunked {
                "Chunked"
            } else {
                "OnePass"
            };
        format!("{ms:.3} ms ({which})")
    } else {
        "(no kernel)".into()
    };
    println!(
        "| scan {batch} x {d} x {len}, {dtype:?} | forward {fwd:.3} ms ({kernel}) | backward {bwd} |"
    );
}

/// Median of 10 synchronised runs after 3 warm-up ones, in ms.
/// `||got - want|| / ||want||` in f32 on the device.
fn rel_l2<B: JambaBackend, const D: usize>(got: Tensor<B, D>, want: Tensor<B, D>) -> f64 {
    use burn::tensor::ElementConversion;
    let norm = |t: Tensor<B, D>| t.square().sum().sqrt().into_scalar().elem::<f64>();
    let want = want.cast(DType::F32);
    norm(got.cast(DType::F32) - want.clone()) / norm(want)
}

fn time_ms<B: JambaBackend>(device: &B::Device, f: &dyn Fn()) -> f64 {
    let mut v = Vec::new();
    for rep in 0..13 {
        B::sync(device).unwrap();
        let t = Instant::now();
        f();
        B::sync(device).unwrap();
        if rep >= 3 {
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    median(v)
}

/// The experts of one MoE layer (`moe_grouped`) at `tokens` tokens: forward, and backward
/// (which recomputes the forward), with the matmul rate of the routed experts.
fn moe_timing<B: JambaBackend>(device: &B::Device, cfg: &JambaConfig, tokens: usize, dtype: DType)
where
    Autodiff<B>: JambaBackend<Device = B::Device>,
{
    use jamba_kernels::MoeInput;
    let (h, i, e, k) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_experts,
        cfg.num_experts_per_tok,
    );
    let std = Distribution::Normal(0.0, 0.02);
    let probs = burn::tensor::activation::softmax(
        Tensor::<B, 2>::random([tokens, e], Distribution::Normal(0.0, 1.0), device),
        1,
    );
    let (weights, chosen) = probs.topk_with_indices(k, 1);
    let input = MoeInput::<B> {
        x: Tensor::<B, 2>::random([tokens, h], Distribution::Normal(0.0, 1.0), device).cast(dtype),
        gate_up: Tensor::<B, 3>::random([e, 2 * i, h], std, device).cast(dtype),
        down: Tensor::<B, 3>::random([e, h, i], std, device).cast(dtype),
        chosen,
        weights: weights.cast(dtype),
        first: 0,
    };
    let fwd = time_ms::<B>(device, &|| {
        let _ = B::moe_grouped(input.clone());
    });
    let flop = 2.0 * (tokens * k) as f64 * (3 * h * i) as f64;
    let bwd = if B::GROUPED_MOE {
        let grad =
            Tensor::<B, 2>::random([tokens, h], Distribution::Normal(0.0, 1.0), device).cast(dtype);
        let ms = time_ms::<B>(device, &|| {
            let _ = B::moe_grouped_backward(&input, grad.clone());
        });
        // Forward again, then two matmuls per forward one.
        format!("{ms:.2} ms ({:.1} TFLOP/s)", 3.0 * flop / ms / 1e9)
    } else {
        "(no kernel)".into()
    };
    println!(
        "| MoE experts, {tokens} tokens x top-{k} of {e}, {h} -> {i}, {dtype:?} | forward {fwd:.2} ms ({:.1} TFLOP/s) | backward {bwd} |",
        flop / fwd / 1e9
    );
}

/// `linear` at each shape through Burn's matmul, then through each routine (which is checked
/// against Burn's result: relative L2 error under 2e-2, a few bf16 roundings of the output).
fn matmul_timing<B: JambaBackend>(
    device: &B::Device,
    shapes: &[[usize; 3]],
    dtype: DType,
    tma: bool,
    only: &[String],
) {
    if !B::KERNELS {
        println!("matmul routines: this backend has no kernels (Burn's matmul runs)");
        return;
    }
    let before = jamba_kernels::matmul_routine();
    let mut totals: Vec<(&str, f64, bool)> = jamba_kernels::MATMUL_ROUTINES
        .iter()
        .filter(|r| {
            if only.is_empty() {
                tma || !r.contains("tma")
            } else {
                only.iter().any(|o| o == *r)
            }
        })
        .map(|r| (*r, 0.0, true))
        .collect();
    let mut burn_total = 0.0;
    for &[m, k, n] in shapes {
        if m <= jamba_kernels::decode_max_rows() {
            println!("| matmul {m}x{k}x{n} | skipped: {m} rows run the decoding kernel |");
            continue;
        }
        let x = Tensor::<B, 2>::random([m, k], Distribution::Normal(0.0, 1.0), device).cast(dtype);
        let w = Tensor::<B, 2>::random([n, k], Distribution::Normal(0.0, 1.0), device).cast(dtype);
        let flop = 2.0 * (m * k * n) as f64;
        jamba_kernels::set_matmul_routine(None).unwrap();
        let want = <B as JambaBackend>::linear(x.clone(), w.clone(), None).cast(DType::F32);
        let ms = time_ms::<B>(device, &|| {
            let _ = <B as JambaBackend>::linear(x.clone(), w.clone(), None);
        });
        burn_total += ms;
        println!(
            "| matmul {m}x{k}x{n} {dtype:?} | Burn's matmul | {ms:.3} ms | {:.1} TFLOP/s | |",
            flop / ms / 1e9
        );
        for total in totals.iter_mut() {
            jamba_kernels::set_matmul_routine(Some(total.0)).unwrap();
            let declined = jamba_kernels::matmul_routine_fallbacks();
            let got = <B as JambaBackend>::linear(x.clone(), w.clone(), None).cast(DType::F32);
            // A fused backend runs the product (and counts a fallback) when it is flushed.
            B::sync(device).unwrap();
            if jamba_kernels::matmul_routine_fallbacks() > declined {
                // Burn's matmul runs instead: that is the routine's time on this shape.
                println!(
                    "| matmul {m}x{k}x{n} {dtype:?} | {} | declined: Burn's matmul | | |",
                    total.0
                );
                total.1 += ms;
                continue;
            }
            let err = rel_l2(got, want.clone());
            let ms = time_ms::<B>(device, &|| {
                let _ = <B as JambaBackend>::linear(x.clone(), w.clone(), None);
            });
            let ok = err < 2e-2;
            println!(
                "| matmul {m}x{k}x{n} {dtype:?} | {} | {ms:.3} ms | {:.1} TFLOP/s | rel. err. {err:.1e}{} |",
                total.0,
                flop / ms / 1e9,
                if ok { "" } else { " WRONG" }
            );
            total.1 += ms;
            total.2 &= ok;
        }
    }
    jamba_kernels::set_matmul_routine(before).unwrap();
    println!("matmul, all shapes: Burn's matmul {burn_total:.3} ms");
    let best = totals
        .iter()
        .filter(|t| t.2)
        .min_by(|a, b| a.1.total_cmp(&b.1));
    match best {
        Some((name, ms, _)) => println!(
            "best matmul routine: {name} ({ms:.3} ms over all shapes, {:.2}x Burn's matmul)",
            burn_total / ms
        ),
        None => println!("best matmul routine: none (every routine declined or failed a shape)"),
    }
}

fn attention_timing<B: JambaBackend>(device: &B::Device, len: usize, dtype: DType) {
    // The "block" model's attention: 16 query heads of 128 over 4 KV heads.
    let (heads, kv_heads, head_dim) = (16, 4, 128);
    let qkv: Vec<Tensor<B, 4>> = [heads, kv_heads, kv_heads]
        .into_iter()
        .map(|h| {
            Tensor::<B, 4>::random(
                [1, h, len, head_dim],
                Distribution::Normal(0.0, 1.0),
                device,
            )
            .cast(dtype)
        })
        .collect();
    let kernel = time_ms::<B>(device, &|| {
        let _ = B::causal_attention(qkv[0].clone(), qkv[1].clone(), qkv[2].clone());
    });
    let err = rel_l2(
        B::causal_attention(qkv[0].clone(), qkv[1].clone(), qkv[2].clone()),
        jamba_kernels::reference::causal_attention(qkv[0].clone(), qkv[1].clone(), qkv[2].clone()),
    );
    let reference = time_ms::<B>(device, &|| {
        let _ = jamba_kernels::reference::causal_attention(
            qkv[0].clone(),
            qkv[1].clone(),
            qkv[2].clone(),
        );
    });
    // Causal: half of the two `len x len x head_dim` products per head.
    let flop = 2.0 * 2.0 * heads as f64 * (len * len * head_dim) as f64 / 2.0;
    println!(
        "| causal attention, {heads} heads x {head_dim} over {kv_heads} KV heads, {len} tokens, {dtype:?} | {kernel:.2} ms ({:.1} TFLOP/s), rel. err. {err:.1e} | reference (scores in memory) {reference:.2} ms |",
        flop / kernel / 1e9
    );
}

/// The kernels of `B` against the tensor-op reference on ndarray: outputs and every gradient.
mod kernel_check {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::{backend::Backend, TensorData};
    use jamba_kernels::{reference, CausalConv1dInput, MambaInProjStep, MambaStep};

    type Ref = NdArray<f32>;

    fn host(n: usize, dist: Distribution) -> Vec<f32> {
        Tensor::<Ref, 1>::random([n], dist, &Default::default())
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    }

    fn vals<C: Backend, const D: usize>(t: Tensor<C, D>) -> Vec<f32> {
        t.cast(DType::F32)
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap()
    }

    /// `max|a - b| / max(1, max|b|)` (infinite when `a` holds a NaN).
    fn rel(a: &[f32], b: &[f32]) -> f32 {
        if a.iter().any(|v| v.is_nan()) {
            return f32::INFINITY;
        }
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
            / scale
    }

    struct Case {
        shape: [usize; 4],
        data: Vec<Vec<f32>>,
    }

    impl Case {
        fn new(shape: [usize; 4]) -> Self {
            let [b, d, l, n] = shape;
            let nd = Distribution::Normal(0.0, 1.0);
            let data = vec![
                host(b * d * l, nd),
                host(b * d * l, Distribution::Normal(-1.0, 1.5)),
                host(d * n, Distribution::Uniform(-4.0, -0.05)),
                host(b * n * l, nd),
                host(b * n * l, nd),
                host(d, nd),
                host(b * d * l, nd),
                host(d, Distribution::Uniform(-2.0, 0.5)),
                host(b * d * n, nd),
                host(b * d * l, nd),
            ];
            Self { shape, data }
        }

        fn input<C: Backend>(&self, dev: &C::Device, dtype: DType) -> SelectiveScanInput<C> {
            let [b, d, l, n] = self.shape;
            let t3 = |i: usize, s: [usize; 3]| {
                Tensor::<C, 3>::from_data(TensorData::new(self.data[i].clone(), s), dev)
            };
            let t1 = |i: usize| {
                Tensor::<C, 1>::from_data(TensorData::new(self.data[i].clone(), [d]), dev)
            };
            SelectiveScanInput {
                u: t3(0, [b, d, l]).cast(dtype),
                delta: t3(1, [b, d, l]).cast(dtype),
                a: Tensor::from_data(TensorData::new(self.data[2].clone(), [d, n]), dev),
                b: t3(3, [b, n, l]).cast(dtype),
                c: t3(4, [b, n, l]).cast(dtype),
                d: t1(5),
                z: Some(t3(6, [b, d, l]).cast(dtype)),
                delta_bias: Some(t1(7)),
                delta_softplus: true,
                initial_state: Some(t3(8, [b, d, n])),
            }
        }
    }

    fn grads<C: burn::tensor::backend::AutodiffBackend + JambaBackend>(
        case: &Case,
        dev: &C::Device,
    ) -> Vec<Vec<f32>> {
        let [b, d, l, _] = case.shape;
        let i = case.input::<C>(dev, DType::F32);
        let i = SelectiveScanInput {
            u: i.u.require_grad(),
            delta: i.delta.require_grad(),
            a: i.a.require_grad(),
            b: i.b.require_grad(),
            c: i.c.require_grad(),
            d: i.d.require_grad(),
            z: i.z.map(|t| t.require_grad()),
            delta_bias: i.delta_bias.map(|t| t.require_grad()),
            initial_state: i.initial_state.map(|t| t.require_grad()),
            ..i
        };
        let keep = i.clone();
        let w = Tensor::<C, 3>::from_data(TensorData::new(case.data[9].clone(), [b, d, l]), dev);
        let g = (C::selective_scan(i).y * w).sum().backward();
        vec![
            vals(keep.u.grad(&g).unwrap()),
            vals(keep.delta.grad(&g).unwrap()),
            vals(keep.a.grad(&g).unwrap()),
            vals(keep.b.grad(&g).unwrap()),
            vals(keep.c.grad(&g).unwrap()),
            vals(keep.d.grad(&g).unwrap()),
            vals(keep.z.unwrap().grad(&g).unwrap()),
            vals(keep.delta_bias.unwrap().grad(&g).unwrap()),
            vals(keep.initial_state.unwrap().grad(&g).unwrap()),
        ]
    }

    pub fn run<B: JambaBackend>(dev: &B::Device)
    where
        Autodiff<B>: JambaBackend<Device = B::Device>,
    {
        let mut failed = 0;
        let mut report = |what: String, err: f32, tol: f32| {
            let ok = err <= tol;
            failed += usize::from(!ok);
            println!(
                "kernel check {what}: {err:.2e} (limit {tol:.0e}) {}",
                if ok { "ok" } else { "FAILED" }
            );
        };
        let rdev = Default::default();
        // lavapipe has no bf16: its checks run only where the backend supports it.
        let bf16 = B::supports_dtype(dev, DType::BF16);
        if !bf16 {
            println!("kernel check: bf16 not supported by this backend, bf16 checks skipped");
        }
        for shape in [
            [3, 37, 513, 16],
            [2, 70, 7, 64],
            [1, 5, 1, 1],
            [2, 300, 1000, 16],
            // Three tiles of the split forward (1024 positions each where 32 segments fit), the
            // last one partial, with gradients through the chunk states of every segment.
            [1, 24, 2100, 16],
        ] {
            let case = Case::new(shape);
            let want = reference::selective_scan(case.input::<Ref>(&rdev, DType::F32));
            let (wy, ws) = (vals(want.y), vals(want.last_state));
            let got = B::selective_scan(case.input::<B>(dev, DType::F32));
            report(
                format!("scan {shape:?} f32 y"),
                rel(&vals(got.y), &wy),
                1e-4,
            );
            report(
                format!("scan {shape:?} f32 state"),
                rel(&vals(got.last_state), &ws),
                1e-4,
            );
            // bf16 inputs: the reference gets the same rounded values.
            if bf16 {
                let rounded = case.input::<B>(dev, DType::BF16);
                let back = |t: Tensor<B, 3>| {
                    Tensor::<Ref, 3>::from_data(t.cast(DType::F32).into_data(), &rdev)
                };
                let want = reference::selective_scan(SelectiveScanInput {
                    u: back(rounded.u.clone()),
                    delta: back(rounded.delta.clone()),
                    b: back(rounded.b.clone()),
                    c: back(rounded.c.clone()),
                    z: rounded.z.clone().map(back),
                    ..case.input::<Ref>(&rdev, DType::F32)
                });
                let got = B::selective_scan(rounded);
                report(
                    format!("scan {shape:?} bf16 y"),
                    rel(&vals(got.y), &vals(want.y)),
                    1e-2,
                );
            }
            if shape[2] <= 513 || shape[1] <= 24 {
                let want = grads::<Autodiff<Ref>>(&case, &rdev);
                let got = grads::<Autodiff<B>>(&case, dev);
                let names = [
                    "u",
                    "delta",
                    "A",
                    "B",
                    "C",
                    "D",
                    "z",
                    "delta_bias",
                    "initial_state",
                ];
                for ((name, g), w) in names.iter().zip(&got).zip(&want) {
                    report(format!("scan {shape:?} f32 grad {name}"), rel(g, w), 1e-4);
                }
            }
        }
        // Causal attention in bf16: the tensor-core kernel rounds the probabilities and the
        // output to bf16, 2^-8 relative. Shared KV heads, and queries after cached positions.
        if bf16 {
            for ([b, h, lq, hd], kvh, lk) in [
                ([1, 2, 1, 64], 2, 1),
                ([3, 2, 77, 64], 1, 77),
                ([2, 4, 300, 128], 2, 300),
                ([1, 16, 1024, 128], 4, 1024),
                ([2, 8, 100, 128], 2, 333),
                ([1, 4, 1, 32], 4, 65),
                ([1, 2, 16, 64], 1, 16),
                ([2, 2, 17, 32], 2, 40),
                ([1, 4, 3, 128], 2, 700),
            ] {
                let (q_shape, kv_shape) = ([b, h, lq, hd], [b, kvh, lk, hd]);
                let on = |shape: [usize; 4]| {
                    let n = shape.iter().product();
                    Tensor::<B, 4>::from_data(
                        TensorData::new(host(n, Distribution::Normal(0.0, 1.0)), shape),
                        dev,
                    )
                    .cast(DType::BF16)
                };
                let (q, k, v) = (on(q_shape), on(kv_shape), on(kv_shape));
                let back = |t: &Tensor<B, 4>| {
                    Tensor::<Ref, 4>::from_data(t.clone().cast(DType::F32).into_data(), &rdev)
                };
                let want = reference::causal_attention(back(&q), back(&k), back(&v));
                let got = B::causal_attention(q, k, v);
                report(
                    format!("causal attention q {q_shape:?} kv {kv_shape:?} bf16"),
                    rel(&vals(got), &vals(want)),
                    1e-2,
                );
            }
        }
        for [b, d, l, k] in [[3, 37, 513, 4], [2, 5, 1, 4]] {
            let x = host(b * d * l, Distribution::Normal(0.0, 1.0));
            let w = host(d * k, Distribution::Normal(0.0, 1.0));
            let bias = host(d, Distribution::Normal(0.0, 1.0));
            let init = host(b * d * (k - 1), Distribution::Normal(0.0, 1.0));
            fn input<C: Backend>(
                dev: &C::Device,
                x: &[f32],
                w: &[f32],
                bias: &[f32],
                init: &[f32],
                [b, d, l, k]: [usize; 4],
            ) -> CausalConv1dInput<C> {
                CausalConv1dInput {
                    x: Tensor::from_data(TensorData::new(x.to_vec(), [b, d, l]), dev),
                    weight: Tensor::from_data(TensorData::new(w.to_vec(), [d, k]), dev),
                    bias: Some(Tensor::from_data(TensorData::new(bias.to_vec(), [d]), dev)),
                    initial_state: Some(Tensor::from_data(
                        TensorData::new(init.to_vec(), [b, d, k - 1]),
                        dev,
                    )),
                    silu: true,
                }
            }
            let s = [b, d, l, k];
            let want = vals(reference::causal_conv1d(input::<Ref>(
                &rdev, &x, &w, &bias, &init, s,
            )));
            let got = vals(B::causal_conv1d(input::<B>(dev, &x, &w, &bias, &init, s)));
            report(format!("conv {s:?} f32 y"), rel(&got, &want), 1e-4);
            fn conv_grads<C: burn::tensor::backend::AutodiffBackend + JambaBackend>(
                i: CausalConv1dInput<C>,
            ) -> Vec<Vec<f32>> {
                let i = CausalConv1dInput {
                    x: i.x.require_grad(),
                    weight: i.weight.require_grad(),
                    bias: i.bias.map(|t| t.require_grad()),
                    initial_state: i.initial_state.map(|t| t.require_grad()),
                    ..i
                };
                let keep = i.clone();
                let y = C::causal_conv1d(i);
                let g = (y.clone() * y.sin()).sum().backward();
                vec![
                    vals(keep.x.grad(&g).unwrap()),
                    vals(keep.weight.grad(&g).unwrap()),
                    vals(keep.bias.unwrap().grad(&g).unwrap()),
                    vals(keep.initial_state.unwrap().grad(&g).unwrap()),
                ]
            }
            let want = conv_grads(input::<Autodiff<Ref>>(&rdev, &x, &w, &bias, &init, s));
            let got = conv_grads(input::<Autodiff<B>>(dev, &x, &w, &bias, &init, s));
            for ((name, g), w) in ["x", "weight", "bias", "initial_state"]
                .iter()
                .zip(&got)
                .zip(&want)
            {
                report(format!("conv {s:?} f32 grad {name}"), rel(g, w), 1e-4);
            }
        }
        // The grouped MoE: top-2 of 6 experts of which 5 are held here (from 1), odd sizes;
        // 600 pairs (the grouped kernels) and 2200 (per-expert matmuls); forward and gradients
        // in f32 and bf16.
        for (n, top_k, experts, first, h, i) in [(300, 2, 5, 1, 96, 80), (1100, 2, 5, 1, 64, 48)] {
            use burn::tensor::Int;
            use jamba_kernels::MoeInput;
            let x = host(n * h, Distribution::Normal(0.0, 1.0));
            let gu = host(experts * 2 * i * h, Distribution::Normal(0.0, 0.2));
            let down = host(experts * h * i, Distribution::Normal(0.0, 0.2));
            let weights = host(n * top_k, Distribution::Uniform(0.05, 1.0));
            let chosen: Vec<i64> = (0..n * top_k)
                .map(|p| ((p / top_k) * 7 + (p % top_k) * 3 + p / 11) as i64 % 6)
                .collect();
            let grad_out = host(n * h, Distribution::Normal(0.0, 1.0));
            fn input<C: Backend>(
                dev: &C::Device,
                v: [&[f32]; 4],
                chosen: &[i64],
                [n, top_k, experts, first, h, i]: [usize; 6],
                dtype: DType,
            ) -> MoeInput<C> {
                let t = |v: &[f32]| {
                    Tensor::<C, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), dev)
                        .cast(dtype)
                };
                MoeInput {
                    x: t(v[0]).reshape([n, h]),
                    gate_up: t(v[1]).reshape([experts, 2 * i, h]),
                    down: t(v[2]).reshape([experts, h, i]),
                    chosen: Tensor::<C, 2, Int>::from_data(
                        TensorData::new(chosen.to_vec(), [n, top_k]),
                        dev,
                    ),
                    weights: t(v[3]).reshape([n, top_k]),
                    first,
                }
            }
            let s = [n, top_k, experts, first, h, i];
            // From 2048 pairs each expert's block goes through Burn's matmul, which on CUDA runs
            // f32 on TF32 tensor cores (10-bit mantissa: 2^-11 relative per product, summed
            // over 48-64 terms); the grouped kernels compute in f32.
            let tol32 = if n * top_k >= 2048 { 2e-3 } else { 1e-4 };
            let v = [&x[..], &gu[..], &down[..], &weights[..]];
            let want = vals(reference::moe_grouped(input::<Ref>(
                &rdev,
                v,
                &chosen,
                s,
                DType::F32,
            )));
            let got = vals(B::moe_grouped(input::<B>(dev, v, &chosen, s, DType::F32)));
            report(format!("moe {s:?} f32 y"), rel(&got, &want), tol32);
            // bf16: the reference gets the same rounded values (f32 where bf16 is unsupported:
            // its cases are skipped).
            let round = |v: &[f32]| {
                if !bf16 {
                    return v.to_vec();
                }
                vals(
                    Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), dev)
                        .cast(DType::BF16),
                )
            };
            let (rx, rgu, rdown, rw) = (round(&x), round(&gu), round(&down), round(&weights));
            let rv = [&rx[..], &rgu[..], &rdown[..], &rw[..]];
            let want = vals(reference::moe_grouped(input::<Ref>(
                &rdev,
                rv,
                &chosen,
                s,
                DType::F32,
            )));
            if bf16 {
                let got = vals(B::moe_grouped(input::<B>(dev, v, &chosen, s, DType::BF16)));
                report(format!("moe {s:?} bf16 y"), rel(&got, &want), 1e-2);
            }
            fn moe_grads<C: burn::tensor::backend::AutodiffBackend + JambaBackend>(
                i: MoeInput<C>,
                grad_out: &[f32],
            ) -> Vec<Vec<f32>> {
                let i = MoeInput {
                    x: i.x.require_grad(),
                    gate_up: i.gate_up.require_grad(),
                    down: i.down.require_grad(),
                    weights: i.weights.require_grad(),
                    ..i
                };
                let keep = i.clone();
                let dims = i.x.dims();
                let y = C::moe_grouped(i);
                let w = Tensor::<C, 2>::from_data(
                    TensorData::new(grad_out.to_vec(), dims),
                    &y.device(),
                )
                .cast(y.dtype());
                let g = (y * w).sum().backward();
                vec![
                    vals(keep.x.grad(&g).unwrap()),
                    vals(keep.gate_up.grad(&g).unwrap()),
                    vals(keep.down.grad(&g).unwrap()),
                    vals(keep.weights.grad(&g).unwrap()),
                ]
            }
            // f32, then bf16 (the tensor-core kernels on CUDA) against the reference on the
            // rounded inputs: the kernels round gate/up, the activation and the row gradients
            // to bf16 between matmuls (2^-9 relative each) where the reference keeps f32.
            for (dtype, ref_values, tol) in [(DType::F32, v, tol32), (DType::BF16, rv, 2e-2)] {
                if dtype == DType::BF16 && !bf16 {
                    continue;
                }
                let want = moe_grads(
                    input::<Autodiff<Ref>>(&rdev, ref_values, &chosen, s, DType::F32),
                    &grad_out,
                );
                let got = moe_grads(input::<Autodiff<B>>(dev, v, &chosen, s, dtype), &grad_out);
                for ((name, g), w) in ["x", "gate_up", "down", "weights"]
                    .iter()
                    .zip(&got)
                    .zip(&want)
                {
                    report(format!("moe {s:?} {dtype:?} grad {name}"), rel(g, w), tol);
                }
            }
        }
        // Decoding kernels at the "block" model's shapes: the products of few rows (in_proj,
        // x_proj, a down projection at batch 8, dt_proj, the router's f32 logits from bf16
        // weights), the dense SwiGLU MLP, and the fused norms. bf16 against the reference on
        // the bf16-rounded inputs: the output's rounding (2^-8) bounds the error.
        let t2 = |v: &[f32], s: [usize; 2], dtype: DType| {
            Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), s), dev).cast(dtype)
        };
        let r2 = |v: &[f32], s: [usize; 2]| {
            Tensor::<Ref, 2>::from_data(TensorData::new(v.to_vec(), s), &rdev)
        };
        let round = |v: &[f32], dtype: DType| vals(t2(v, [1, v.len()], dtype));
        let dtypes: &[(DType, f32)] = match bf16 {
            true => &[(DType::F32, 1e-4), (DType::BF16, 1e-2)],
            false => &[(DType::F32, 1e-4)],
        };
        for (rows, k, n) in [
            (1, 2048, 8192),
            (1, 4096, 160),
            (8, 7168, 2048),
            (3, 128, 4096),
        ] {
            let x = host(rows * k, Distribution::Normal(0.0, 1.0));
            let w = host(n * k, Distribution::Normal(0.0, 0.05));
            for &(dtype, tol) in dtypes {
                let (rx, rw) = (round(&x, dtype), round(&w, dtype));
                let want = vals(<Ref as JambaBackend>::linear(
                    r2(&rx, [rows, k]),
                    r2(&rw, [n, k]),
                    None,
                ));
                let got = vals(<B as JambaBackend>::linear(
                    t2(&x, [rows, k], dtype),
                    t2(&w, [n, k], dtype),
                    None,
                ));
                report(
                    format!("decoding linear {rows}x{k}x{n} {dtype:?}"),
                    rel(&got, &want),
                    tol,
                );
            }
        }
        if bf16 {
            let (k, n) = (2048, 16);
            let x = host(k, Distribution::Normal(0.0, 1.0));
            let w = round(&host(n * k, Distribution::Normal(0.0, 0.05)), DType::BF16);
            let want = vals(<Ref as JambaBackend>::linear(
                r2(&x, [1, k]),
                r2(&w, [n, k]),
                None,
            ));
            let got = <B as JambaBackend>::linear(
                t2(&x, [1, k], DType::F32),
                t2(&w, [n, k], DType::BF16),
                None,
            );
            assert_eq!(got.dtype(), DType::F32);
            report(
                format!("decoding linear 1x{k}x{n} f32 x bf16 weight"),
                rel(&vals(got), &want),
                1e-4,
            );
        }
        for (rows, h, i) in [(1, 2048, 7168), (8, 256, 520)] {
            let x = host(rows * h, Distribution::Normal(0.0, 1.0));
            let ws: Vec<Vec<f32>> = (0..3)
                .map(|_| host(h * i, Distribution::Normal(0.0, 0.05)))
                .collect();
            for &(dtype, tol) in dtypes {
                let rx = round(&x, dtype);
                let rw: Vec<Vec<f32>> = ws.iter().map(|w| round(w, dtype)).collect();
                let want = vals(reference::swiglu_mlp::<Ref>(
                    r2(&rx, [rows, h]),
                    r2(&rw[0], [i, h]),
                    r2(&rw[1], [i, h]),
                    r2(&rw[2], [h, i]),
                ));
                let got = vals(B::swiglu_mlp(
                    t2(&x, [rows, h], dtype),
                    t2(&ws[0], [i, h], dtype),
                    t2(&ws[1], [i, h], dtype),
                    t2(&ws[2], [h, i], dtype),
                ));
                report(
                    format!("decoding swiglu mlp {rows}x{h}x{i} {dtype:?}"),
                    rel(&got, &want),
                    tol,
                );
            }
        }
        // The SwiGLU activation at widths whose rows CUDA pads (1000, 7) and the block model's.
        for (rows, cols) in [(5, 1000), (3, 7), (9, 7168)] {
            let g = host(rows * cols, Distribution::Normal(0.0, 3.0));
            let u = host(rows * cols, Distribution::Normal(0.5, 2.0));
            for &(dtype, tol) in dtypes {
                let want = reference::swiglu(
                    r2(&round(&g, dtype), [rows, cols]),
                    r2(&round(&u, dtype), [rows, cols]),
                );
                let got = vals(B::swiglu(
                    t2(&g, [rows, cols], dtype),
                    t2(&u, [rows, cols], dtype),
                ));
                report(
                    format!("swiglu {rows}x{cols} {dtype:?}"),
                    rel(&got, &vals(want)),
                    tol,
                );
            }
        }
        for (rows, dim) in [(1, 2048), (5, 4099)] {
            let r = host(rows * dim, Distribution::Normal(0.0, 2.0));
            let h = host(rows * dim, Distribution::Normal(0.0, 1.0));
            let w = host(dim, Distribution::Normal(1.0, 0.3));
            for &(dtype, tol) in dtypes {
                let (rh, rw) = (round(&h, dtype), round(&w, dtype));
                let (want_sum, want) = reference::add_rms_norm(
                    r2(&r, [rows, dim]),
                    r2(&rh, [rows, dim]),
                    Tensor::<Ref, 1>::from_data(TensorData::new(rw, [dim]), &rdev),
                    1e-6,
                );
                let (sum, got) = B::add_rms_norm(
                    t2(&r, [rows, dim], DType::F32),
                    t2(&h, [rows, dim], dtype),
                    Tensor::<B, 1>::from_data(TensorData::new(w.clone(), [dim]), dev).cast(dtype),
                    1e-6,
                );
                report(
                    format!("add_rms_norm {rows}x{dim} {dtype:?} sum"),
                    rel(&vals(sum), &vals(want_sum)),
                    1e-6,
                );
                report(
                    format!("add_rms_norm {rows}x{dim} {dtype:?}"),
                    rel(&vals(got), &vals(want)),
                    tol,
                );
            }
        }
        {
            let (rows, widths) = (3, [128usize, 16, 16]);
            let x = host(rows * 160, Distribution::Normal(0.0, 1.0));
            let ws: Vec<Vec<f32>> = widths
                .iter()
                .map(|&n| host(n, Distribution::Normal(1.0, 0.3)))
                .collect();
            for &(dtype, tol) in dtypes {
                let rx = round(&x, dtype);
                let want = reference::rms_norms(
                    r2(&rx, [rows, 160]),
                    ws.iter()
                        .map(|w| {
                            Tensor::<Ref, 1>::from_data(
                                TensorData::new(round(w, dtype), [w.len()]),
                                &rdev,
                            )
                        })
                        .collect(),
                    1e-6,
                );
                let got = B::rms_norms(
                    t2(&x, [rows, 160], dtype),
                    ws.iter()
                        .map(|w| {
                            Tensor::<B, 1>::from_data(TensorData::new(w.clone(), [w.len()]), dev)
                                .cast(dtype)
                        })
                        .collect(),
                    1e-6,
                );
                for (j, (g, w)) in got.into_iter().zip(want).enumerate() {
                    report(
                        format!("rms_norms {rows}x{widths:?} {dtype:?} segment {j}"),
                        rel(&vals(g), &vals(w)),
                        tol,
                    );
                }
            }
        }
        // The fused Mamba step at the "block" shape (d_inner 4096, dt_rank 128, d_state 16) and an
        // odd one: f32 against the reference on ndarray; bf16 against the composition of this
        // backend's own operations (norms, product, state update), which round where it does.
        for (b, di, r, n) in [(1, 4096, 128, 16), (3, 70, 5, 64)] {
            let normal = |len, mean, std| host(len, Distribution::Normal(mean, std));
            let x = normal(b * di, 0.0, 1.0);
            let z = normal(b * di, 0.0, 1.0);
            let params = normal(b * (r + 2 * n), 0.2, 1.5);
            let norms = [
                normal(r, 1.0, 0.3),
                normal(n, 1.0, 0.3),
                normal(n, 1.0, 0.3),
            ];
            let dt_proj = normal(di * r, 0.0, 1.0 / (r as f64).sqrt());
            let a = host(di * n, Distribution::Uniform(-4.0, -0.1));
            let d = normal(di, 1.0, 0.5);
            let bias = normal(di, -1.0, 1.0);
            let state = normal(b * di * n, 0.0, 1.0);
            fn step<C: JambaBackend>(
                dev: &C::Device,
                v: [&[f32]; 11],
                [b, di, r, n]: [usize; 4],
                dtype: DType,
            ) -> MambaStep<C> {
                let t = |v: &[f32]| {
                    Tensor::<C, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), dev)
                };
                MambaStep {
                    state: t(v[9]).reshape([b, di, n]),
                    x: t(v[0]).reshape([b, di]).cast(dtype),
                    z: Some(t(v[1]).reshape([b, di]).cast(dtype)),
                    params: t(v[2]).reshape([b, r + 2 * n]).cast(dtype),
                    norms: [3, 4, 5].map(|i| t(v[i]).cast(dtype)),
                    eps: 1e-6,
                    dt_proj: t(v[6]).reshape([di, r]).cast(dtype),
                    a: t(v[7]).reshape([di, n]),
                    d: t(v[8]),
                    delta_bias: Some(t(v[10])),
                    delta_softplus: true,
                }
            }
            let v = [
                &x[..],
                &z,
                &params,
                &norms[0],
                &norms[1],
                &norms[2],
                &dt_proj,
                &a,
                &d,
                &state,
                &bias,
            ];
            let shape = [b, di, r, n];
            for &(dtype, tol) in dtypes {
                let (wy, ws) = if dtype == DType::F32 {
                    let (y, s) = reference::mamba_step::<Ref>(step(&rdev, v, shape, dtype));
                    (vals(y), vals(s))
                } else {
                    let (y, s) = reference::mamba_step::<B>(step(dev, v, shape, dtype));
                    (vals(y), vals(s))
                };
                let (y, s) = B::mamba_step(step(dev, v, shape, dtype));
                // bf16: a dt rounded one step the other way moves a channel's output by up to
                // about 2^-8 of its scale, through the softplus and the exponentials.
                let tol = if dtype == DType::F32 { tol } else { 2e-2 };
                report(
                    format!("mamba step {shape:?} {dtype:?} y"),
                    rel(&vals(y), &wy),
                    tol,
                );
                report(
                    format!("mamba step {shape:?} {dtype:?} state"),
                    rel(&vals(s), &ws),
                    tol,
                );
            }
        }
        // in_proj with the conv's step, and the router, at the "block" shapes (hidden 2048,
        // d_inner 4096, conv width 4; 16 experts, top-2): f32 against the reference on ndarray,
        // bf16 against the composition of this backend's own operations.
        for rows in [1, 8] {
            let (h, di, k) = (2048, 4096, 4);
            let x = host(rows * h, Distribution::Normal(0.0, 1.0));
            let w = host(2 * di * h, Distribution::Normal(0.0, 0.02));
            let state = host(rows * di * (k - 1), Distribution::Normal(0.0, 1.0));
            let cw = host(di * k, Distribution::Normal(0.0, 0.5));
            let cb = host(di, Distribution::Normal(0.0, 0.5));
            fn in_proj<C: JambaBackend>(
                dev: &C::Device,
                v: [&[f32]; 5],
                [rows, h, di, k]: [usize; 4],
                dtype: DType,
            ) -> MambaInProjStep<C> {
                let t = |v: &[f32]| {
                    Tensor::<C, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), dev)
                };
                MambaInProjStep {
                    x: t(v[0]).reshape([rows, h]).cast(dtype),
                    weight: t(v[1]).reshape([2 * di, h]).cast(dtype),
                    bias: None,
                    conv_state: t(v[2]).reshape([rows, di, k - 1]),
                    conv_weight: t(v[3]).reshape([di, k]),
                    conv_bias: Some(t(v[4])),
                }
            }
            let v = [&x[..], &w, &state, &cw, &cb];
            let shape = [rows, h, di, k];
            for &(dtype, tol) in dtypes {
                let want: Vec<Vec<f32>> = if dtype == DType::F32 {
                    let (x, z, s) =
                        reference::mamba_in_proj_step::<Ref>(in_proj(&rdev, v, shape, dtype));
                    vec![vals(x), vals(z), vals(s)]
                } else {
                    let (x, z, s) =
                        reference::mamba_in_proj_step::<B>(in_proj(dev, v, shape, dtype));
                    vec![vals(x), vals(z), vals(s)]
                };
                let (gx, gz, gs) = B::mamba_in_proj_step(in_proj(dev, v, shape, dtype));
                for (name, got, want) in [("x", gx, &want[0]), ("z", gz, &want[1])] {
                    report(
                        format!("mamba in_proj step {shape:?} {dtype:?} {name}"),
                        rel(&vals(got), want),
                        tol,
                    );
                }
                report(
                    format!("mamba in_proj step {shape:?} {dtype:?} conv state"),
                    rel(&vals(gs), &want[2]),
                    tol,
                );
            }
            let e = 16;
            let rw = host(e * h, Distribution::Normal(0.0, 0.02));
            for &(dtype, tol) in dtypes {
                let (wl, ww, wc) = if dtype == DType::F32 {
                    let (l, w, c) =
                        reference::moe_router::<Ref>(r2(&x, [rows, h]), r2(&rw, [e, h]), 2);
                    (
                        vals(l),
                        vals(w),
                        c.into_data().convert::<i64>().to_vec::<i64>().unwrap(),
                    )
                } else {
                    let (l, w, c) = reference::moe_router::<B>(
                        t2(&x, [rows, h], dtype),
                        t2(&rw, [e, h], dtype),
                        2,
                    );
                    (
                        vals(l),
                        vals(w),
                        c.into_data().convert::<i64>().to_vec::<i64>().unwrap(),
                    )
                };
                let (l, w, c) = B::moe_router(t2(&x, [rows, h], dtype), t2(&rw, [e, h], dtype), 2);
                let c = c.into_data().convert::<i64>().to_vec::<i64>().unwrap();
                report(
                    format!("moe router {rows}x{h}x{e} {dtype:?} logits"),
                    rel(&vals(l), &wl),
                    tol,
                );
                report(
                    format!("moe router {rows}x{h}x{e} {dtype:?} weights"),
                    rel(&vals(w), &ww),
                    tol,
                );
                // The experts chosen: 0 when the same, 1 otherwise.
                report(
                    format!("moe router {rows}x{h}x{e} {dtype:?} experts"),
                    f32::from(u8::from(c != wc)),
                    0.0,
                );
            }
        }
        // Decoding attention at the "block" shape (16 heads of 128 over 4 KV heads) and an odd
        // one, over the first `len` positions of buffers of 5 more (a KV cache's spare room).
        for (b, h, kvh, len, hd) in [(1, 16, 4, 520, 128), (3, 6, 2, 33, 80)] {
            let cap = len + 5;
            let q = host(b * h * hd, Distribution::Normal(0.0, 1.0));
            let k = host(b * kvh * cap * hd, Distribution::Normal(0.0, 1.0));
            let v = host(b * kvh * cap * hd, Distribution::Normal(0.0, 1.0));
            for &(dtype, tol) in dtypes {
                let r4 = |x: &[f32], s: [usize; 4]| {
                    Tensor::<Ref, 4>::from_data(TensorData::new(round(x, dtype), s), &rdev)
                };
                let t4 = |x: &[f32], s: [usize; 4]| {
                    Tensor::<B, 4>::from_data(TensorData::new(x.to_vec(), s), dev).cast(dtype)
                };
                let (sq, skv) = ([b, h, 1, hd], [b, kvh, cap, hd]);
                let want = vals(reference::decode_attention(
                    r4(&q, sq),
                    r4(&k, skv),
                    r4(&v, skv),
                    len,
                ));
                let got = vals(B::decode_attention(
                    t4(&q, sq),
                    t4(&k, skv),
                    t4(&v, skv),
                    len,
                ));
                report(
                    format!("decode attention {:?} {dtype:?}", [b, h, kvh, len, hd]),
                    rel(&got, &want),
                    tol,
                );
            }
        }
        println!("kernel check: {failed} failed");
    }
}

fn main() {
    let args = Args::parse();
    #[cfg(feature = "cuda")]
    let cuda = || -> Vec<burn::backend::cuda::CudaDevice> {
        args.devices
            .0
            .iter()
            .map(|&i| burn::backend::cuda::CudaDevice::new(i))
            .collect()
    };
    #[cfg(feature = "cuda")]
    let cuda_memory = |what: &str| {
        match jamba_kernels::cuda_memory_usage(&cuda()[0]) {
        Some((in_use, reserved)) => println!(
            "memory after {what}: {:.0} MiB in use, {:.0} MiB reserved (CubeCL's pools on the first device)",
            in_use as f64 / (1 << 20) as f64,
            reserved as f64 / (1 << 20) as f64
        ),
        None => println!("memory after {what}: the device reported an error"),
    }
    };
    let no_memory = |_: &str| {};
    let n = args.devices.0.len();
    match args.backend {
        Backend::Ndarray => {
            run::<burn::backend::NdArray>(&args, vec![Default::default(); n], &no_memory)
        }
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => run::<burn::backend::Wgpu>(&args, vec![Default::default(); n], &no_memory),
        #[cfg(feature = "cuda")]
        Backend::Cuda => run::<burn::backend::Cuda>(&args, cuda(), &cuda_memory),
        #[cfg(feature = "cuda")]
        Backend::CudaUnfused => run::<jamba_kernels::CudaUnfused>(&args, cuda(), &cuda_memory),
        #[allow(unreachable_patterns)]
        _ => {
            eprintln!(
                "error: this backend is not compiled in (rebuild with --features wgpu or cuda)"
            );
            std::process::exit(2);
        }
    }
}

/// Where the host's time goes during decoding steps: each thread's time on the CPU over `steps`
/// calls of `step` (Linux's `schedstat`, in ns), and a sampling profiler (pprof, `SIGPROF` per
/// interval of process CPU time, so a waiting thread is not sampled) summarised per thread by
/// the functions on the sampled stacks. The kernel delivers the signal at most once per tick
/// (`CONFIG_HZ`), so the samples are shares, not a clock.
#[cfg(feature = "host-profile")]
mod host_profile {
    use std::collections::{HashMap, HashSet};

    /// Rows printed per table.
    const TOP: usize = 60;

    pub fn run(steps: usize, mut step: impl FnMut()) {
        let guard = match pprof::ProfilerGuardBuilder::default()
            .frequency(1000)
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
        {
            Ok(g) => g,
            Err(e) => {
                println!("host profile: the profiler did not start ({e})");
                return;
            }
        };
        let before = cpu_times();
        let t = std::time::Instant::now();
        for _ in 0..steps {
            step();
        }
        let wall = t.elapsed();
        let after = cpu_times();
        let report = match guard.report().build() {
            Ok(r) => r,
            Err(e) => {
                println!("host profile: no report ({e})");
                return;
            }
        };
        // Per thread: samples, and per function the samples where it is the innermost frame
        // (self) and where it is anywhere on the stack (inclusive).
        type Counts = HashMap<String, isize>;
        let mut threads: HashMap<String, (isize, Counts, Counts)> = HashMap::new();
        for (frames, &count) in &report.data {
            let entry = threads.entry(frames.thread_name.clone()).or_default();
            entry.0 += count;
            let names: Vec<String> = frames
                .frames
                .iter()
                .flat_map(|f| f.iter().map(|s| short(&s.name())))
                .collect();
            if let Some(first) = names.first() {
                *entry.1.entry(first.clone()).or_default() += count;
            }
            let unique: HashSet<&String> = names.iter().collect();
            for name in unique {
                *entry.2.entry(name.clone()).or_default() += count;
            }
        }
        println!(
            "host profile: {steps} decoding steps in {:.1} ms ({:.3} ms per step); time on the CPU per step, by thread:",
            wall.as_secs_f64() * 1e3,
            wall.as_secs_f64() * 1e3 / steps as f64
        );
        let mut busy: Vec<(String, f64)> = after
            .iter()
            .map(|(tid, (name, ns))| {
                let start = before.get(tid).map_or(0, |b| b.1);
                (name.clone(), (ns - start) as f64 / 1e6 / steps as f64)
            })
            .filter(|(_, ms)| *ms > 0.001)
            .collect();
        busy.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (name, ms) in busy {
            println!("   `{name}`: {ms:.3} ms");
        }
        println!("samples by thread and function:");
        let mut order: Vec<_> = threads.iter().collect();
        order.sort_by_key(|(_, v)| -v.0);
        for (thread, (total, own, inclusive)) in order {
            println!("== thread `{thread}`: {total} samples");
            for (title, counts) in [("self", own), ("inclusive", inclusive)] {
                let mut rows: Vec<_> = counts.iter().collect();
                rows.sort_by_key(|(_, c)| -**c);
                println!("-- {title}");
                for (name, c) in rows.into_iter().take(TOP) {
                    println!("{:6} {:5.1}%  {name}", c, 100.0 * *c as f64 / *total as f64);
                }
            }
        }
    }

    /// Each thread's name and nanoseconds on the CPU so far, by thread id.
    fn cpu_times() -> HashMap<String, (String, u64)> {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return HashMap::new();
        };
        tasks
            .filter_map(|task| {
                let path = task.ok()?.path();
                let name = std::fs::read_to_string(path.join("comm")).ok()?;
                let stat = std::fs::read_to_string(path.join("schedstat")).ok()?;
                let ns = stat.split_whitespace().next()?.parse().ok()?;
                let tid = path.file_name()?.to_string_lossy().into_owned();
                Some((tid, (name.trim().to_string(), ns)))
            })
            .collect()
    }

    /// A demangled name without its hash suffix, at most 200 characters.
    fn short(name: &str) -> String {
        let name = match name.rfind("::h") {
            Some(i) if name.len() - i == 19 => &name[..i],
            _ => name,
        };
        name.chars().take(200).collect()
    }
}

/// Without the `host-profile` feature there is no profiler to run.
#[cfg(not(feature = "host-profile"))]
mod host_profile {
    pub fn run(_steps: usize, _step: impl FnMut()) {
        println!("host profile: rebuild with --features host-profile");
    }
}
