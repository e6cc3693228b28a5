//! Several devices in one process.
//!
//! Data-parallel training (one replica per device, gradients summed with burn-collective) must
//! give the parameters of single-device training with the same global batch. Tolerance 1e-5 of
//! each tensor's L2 norm: the replicas sum the gradient in other orders (f32 roundoff ~1e-7
//! relative per step, over 3 steps); a wrong share of the loss (e.g. averaging the replicas'
//! means over shards of 2 and 3 rows, or each replica's own load-balancing statistics) moves
//! parameters by ~1e-3 relative. AdamW's eps is 1e-5 here, not 1e-8: Adam divides each gradient
//! element by its own magnitude, so an element whose gradient is at roundoff level (~1e-10) would
//! move by the full learning rate in whichever direction the rounding points, and the comparison
//! would measure the sign of roundoff instead of the summed gradient (with 1e-8 the zero-initialised
//! biases, whose norm is only a few steps of updates, differ by up to 1.4e-5; with 1e-5, 2.5e-6).

mod common;

use std::sync::Mutex;

use burn::backend::{Autodiff, NdArray};
use burn::optim::GradientsParams;
use burn::tensor::{DType, TensorData};
use common::*;
use jamba::data::PackedDataset;
use jamba::parallel::DataParallelTrainer;
use jamba::train::{named_grads, AdamWConfig, TrainConfig, Trainer};
use jamba::{JambaConfig, JambaForCausalLM, TokenBatch};

type Inner = NdArray<f32>;
type B = Autodiff<Inner>;

/// burn-collective serves one group per backend type at a time.
static GROUP: Mutex<()> = Mutex::new(());

fn dataset(vocab: usize, seq_len: usize, seqs: usize) -> PackedDataset {
    let mut x = 12345u64;
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) % vocab as u64) as u32
    };
    let mut seq = || (0..seq_len).map(|_| next()).collect::<Vec<u32>>();
    PackedDataset {
        seq_len,
        train: (0..seqs).map(|_| seq()).collect(),
        valid: (0..2).map(|_| seq()).collect(),
        tokens: (seqs + 2) * seq_len,
    }
}

fn train_config() -> TrainConfig {
    TrainConfig {
        steps: 3,
        batch: 5,
        grad_accum: 2,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup: 1,
        max_grad_norm: Some(1.0),
        adamw: AdamWConfig {
            weight_decay: 0.1,
            eps: 1e-5,
            ..Default::default()
        },
        seed: 0,
    }
}

fn params(model: &JambaForCausalLM<B>) -> Vec<(String, TensorData)> {
    model
        .named_params()
        .into_iter()
        .map(|p| (p.name, p.param.data()))
        .collect()
}

fn rel_l2(a: &TensorData, b: &TensorData) -> f64 {
    let a = a.clone().convert::<f64>().to_vec::<f64>().unwrap();
    let b = b.clone().convert::<f64>().to_vec::<f64>().unwrap();
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm.max(1e-30)).sqrt()
}

fn check_data_parallel(case: &str, devices: usize) {
    let _group = GROUP.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = JambaConfig::from_file(fixture_dir(case).join("config.json")).unwrap();
    let device = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&device, 7);
    let model = JambaForCausalLM::<B>::init(&cfg, &device, DType::F32).unwrap();
    let data = dataset(cfg.vocab_size, 9, 40);
    let config = train_config();
    let start = params(&model);

    let mut single = Trainer::new(model.clone(), data.clone(), config.clone());
    let mut single_losses = Vec::new();
    for _ in 0..config.steps {
        single_losses.push(single.train_step().unwrap());
    }
    let want = params(&single.model);

    let mut dp =
        DataParallelTrainer::new(model, data, config.clone(), &vec![device; devices]).unwrap();
    for (step, s) in single_losses.iter().enumerate() {
        let r = dp.train_step().unwrap();
        assert_eq!(r.step, step + 1);
        assert!(
            (r.loss - s.loss).abs() <= 1e-5 * s.loss.abs(),
            "{case} x{devices} step {}: loss {} vs {} on one device",
            r.step,
            r.loss,
            s.loss
        );
        assert!(
            (r.aux - s.aux).abs() <= 1e-5 * s.aux.abs().max(1.0),
            "{case} x{devices}: aux {} vs {}",
            r.aux,
            s.aux
        );
        assert!(
            (r.grad_norm - s.grad_norm).abs() <= 1e-5 * s.grad_norm,
            "{case} x{devices}: grad norm {} vs {}",
            r.grad_norm,
            s.grad_norm
        );
        assert_eq!(r.tokens, s.tokens);
    }
    let replicas = dp.replica_params().unwrap();
    assert_eq!(replicas.len(), devices);
    let mut worst = 0.0f64;
    for (rank, got) in replicas.iter().enumerate() {
        assert_eq!(got.len(), want.len());
        for ((name, g), (wname, w)) in got.iter().zip(&want) {
            assert_eq!(name, wname);
            let err = rel_l2(g, w);
            worst = worst.max(err);
            assert!(
                err <= 1e-5,
                "{case} x{devices} replica {rank} {name}: relative L2 {err:.2e}"
            );
            // Every replica takes the same step from the same summed gradient.
            assert_eq!(g, &replicas[0].iter().find(|(n, _)| n == name).unwrap().1);
        }
    }
    eprintln!("{case} x{devices}: largest relative L2 difference {worst:.2e}");
    // The run moved the parameters (the comparison is not between two untouched models).
    let moved = want
        .iter()
        .zip(&start)
        .any(|((_, w), (_, s))| rel_l2(w, s) > 1e-3);
    assert!(moved, "training did not change the parameters");
}

#[test]
fn data_parallel_over_two_replicas_equals_one_device() {
    check_data_parallel("tiny-a", 2);
}

#[test]
fn data_parallel_over_three_uneven_replicas_equals_one_device() {
    // 5 rows over 3 replicas: shards of 1, 2 and 2 rows; tied embeddings, MoE on every layer.
    check_data_parallel("tiny-b", 3);
}

#[test]
fn shard_losses_sum_to_the_batch_loss_with_padding() {
    // The fixture's left-padded batch, split into single rows: the shares of the loss (cross
    // entropy over the batch's labelled positions, load balancing over the batch's counts) sum to
    // the batch's loss and gradients.
    let case = "tiny-b";
    let device = Default::default();
    let model =
        JambaForCausalLM::<B>::from_pretrained(fixture_dir(case), &device, DType::F32).unwrap();
    let batch = tokens(&expected(case));
    assert!(batch.has_padding() && batch.batch > 1);
    let full = model.loss(&batch).unwrap();
    let full_grads = named_grads(
        &model,
        &GradientsParams::from_grads(full.loss.backward(), &model),
    );

    let shards: Vec<TokenBatch> = (0..batch.batch).map(|r| batch.rows(r, 1)).collect();
    let terms: Vec<_> = shards
        .iter()
        .map(|s| model.loss_terms(s).unwrap())
        .collect();
    let labels: f64 = terms.iter().map(|t| t.labels).sum();
    let tokens: f64 = terms
        .iter()
        .map(|t| t.router.as_ref().unwrap().tokens)
        .sum();
    let assigned = terms
        .iter()
        .map(|t| t.router.as_ref().unwrap().assigned.clone())
        .reduce(|a, b| a + b)
        .unwrap();
    let total = terms
        .into_iter()
        .map(|t| {
            model
                .loss_share(t, labels, Some((assigned.clone(), tokens)))
                .loss
        })
        .reduce(|a, b| a + b)
        .unwrap();
    let (want, got) = (
        full.loss.clone().into_scalar() as f64,
        total.clone().into_scalar() as f64,
    );
    assert!(
        (want - got).abs() <= 1e-6 * want.abs(),
        "summed shares {got} vs batch loss {want}"
    );
    let shard_grads = named_grads(
        &model,
        &GradientsParams::from_grads(total.backward(), &model),
    );
    for ((name, g), (_, w)) in shard_grads.iter().zip(&full_grads) {
        let (g, w) = (g.as_ref().unwrap(), w.as_ref().unwrap());
        let err = rel_l2(g, w);
        assert!(err <= 1e-5, "grad {name}: relative L2 {err:.2e}");
    }
}

#[test]
fn a_batch_smaller_than_the_devices_is_refused() {
    let _group = GROUP.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = JambaConfig::from_file(fixture_dir("tiny-a").join("config.json")).unwrap();
    let device = Default::default();
    let model = JambaForCausalLM::<B>::init(&cfg, &device, DType::F32).unwrap();
    let config = TrainConfig {
        batch: 2,
        ..train_config()
    };
    let err = DataParallelTrainer::new(model, dataset(cfg.vocab_size, 9, 8), config, &[device; 3])
        .err()
        .expect("2 rows over 3 devices");
    assert!(err.to_string().contains("cannot be split"), "{err}");
}

/// A model spread over `devices` (expert parallelism): the forward pass (logits, hidden states,
/// router logits) matches transformers as the single-device model does, and greedy cached decoding
/// gives transformers' tokens and scores.
fn check_expert_parallel<Bk: jamba::JambaBackend>(case: &str, devices: Vec<Bk::Device>, tol: f32) {
    use jamba::layer::FeedForward;
    use jamba::parallel::DeviceMap;

    let n = devices.len();
    let map = DeviceMap::new(devices).unwrap();
    let model = JambaForCausalLM::<Bk>::from_pretrained_on(
        fixture_dir(case),
        &map,
        DType::F32,
        |_, _, _| {},
    )
    .unwrap();
    // Each MoE layer holds one group of experts per device (as many as there are experts).
    let e = model.config().num_experts;
    for layer in &model.model.layers {
        if let FeedForward::Moe(moe) = &layer.feed_forward {
            let ranges: Vec<_> = moe.experts.iter().map(|g| g.range()).collect();
            assert_eq!(ranges.len(), n.min(e), "{case}: expert groups {ranges:?}");
            assert_eq!(moe.num_experts(), e);
        }
    }
    let exp = expected(case);
    let out = model.forward(&tokens(&exp), None, true).unwrap();
    let label = format!("{case} x{n}");
    assert_output_matches(&label, out, &exp, tol, false);
    assert_greedy_matches(&label, &model, case, tol);
}

#[test]
fn expert_parallel_inference_matches_transformers() {
    // Three devices: layers in three blocks, experts split 2/1/1 (tiny-a, 4 experts) or over
    // every device; the same tolerance as the single-device CPU parity (1e-4, see parity_ndarray).
    for case in CASES {
        check_expert_parallel::<Inner>(case, vec![Default::default(); 3], 1e-4);
    }
}

#[test]
fn expert_parallel_checkpoints_save_the_hub_layout() {
    // A spread model writes every expert under its own Hub index, as the single-device model does.
    use jamba::parallel::DeviceMap;
    let case = "tiny-a";
    let map = DeviceMap::new(vec![Default::default(); 3]).unwrap();
    let spread = JambaForCausalLM::<Inner>::from_pretrained_on(
        fixture_dir(case),
        &map,
        DType::F32,
        |_, _, _| {},
    )
    .unwrap();
    let one = JambaForCausalLM::<Inner>::from_pretrained(
        fixture_dir(case),
        &Default::default(),
        DType::F32,
    )
    .unwrap();
    let mut a = spread.export_tensors();
    let mut b = one.export_tensors();
    a.sort_by(|x, y| x.0.cmp(&y.0));
    b.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert_eq!(va, vb, "{ka}");
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn expert_parallel_inference_on_two_wgpu_devices_matches_transformers() {
    // Two wgpu devices of their own (separate clients; the data crosses through the host): the
    // decoding steps take the kernels' dense MoE path per device, the prompt the grouped path.
    // Tolerance as parity_wgpu's f32 (1e-3).
    use burn::backend::wgpu::WgpuDevice;
    check_expert_parallel::<burn::backend::Wgpu>(
        "tiny-a",
        vec![WgpuDevice::DefaultDevice, WgpuDevice::Cpu],
        1e-3,
    );
}
