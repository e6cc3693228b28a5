//! Shared helpers of the parity tests: the fixtures made by transformers' `JambaForCausalLM`
//! (`tests/fixtures/*/`, see its README) and the comparison rule.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use jamba::checkpoint::read_all;
use jamba::TokenBatch;

/// The fixture cases, one folder each.
pub const CASES: &[&str] = &["tiny-a", "tiny-b", "v01-shape"];

pub fn fixture_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(case)
}

/// The tensors of `expected.safetensors`.
pub fn expected(case: &str) -> BTreeMap<String, TensorData> {
    read_all(fixture_dir(case).join("expected.safetensors")).expect("fixture expected.safetensors")
}

fn ints(d: &TensorData) -> Vec<i64> {
    d.clone().convert::<i64>().to_vec::<i64>().unwrap()
}

/// The fixture's `input_ids` with its `attention_mask` (the mask is kept only where it pads).
pub fn tokens(exp: &BTreeMap<String, TensorData>) -> TokenBatch {
    let ids = &exp["input_ids"];
    let mask = ints(&exp["attention_mask"]);
    let padded = mask.contains(&0);
    TokenBatch::new(
        ints(ids),
        ids.shape[0],
        ids.shape[1],
        padded.then_some(mask),
    )
    .unwrap()
}

pub fn to_f32_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap()
}

/// Asserts `max|ours - ref| <= tol * max(1, max|ref|)` and returns that relative error.
pub fn assert_close(name: &str, ours: &[f32], reference: &TensorData, tol: f32) -> f32 {
    let want = reference.clone().convert::<f32>().to_vec::<f32>().unwrap();
    assert_eq!(
        ours.len(),
        want.len(),
        "{name}: {} values, reference has {}",
        ours.len(),
        want.len()
    );
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let (mut worst, mut at) = (0.0f32, 0);
    for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
        let d = (a - b).abs();
        if d > worst || d.is_nan() {
            worst = d;
            at = i;
        }
    }
    let rel = worst / scale;
    eprintln!("{name}: max rel err {rel:.2e} (scale {scale:.3})");
    assert!(
        rel <= tol,
        "{name}: max|ours - ref| = {worst:e} at flat index {at} (ours {}, ref {}), {rel:e} of scale {scale}, limit {tol:e}",
        ours[at],
        want[at]
    );
    rel
}

/// Asserts `||ours - ref||_2 <= tol * ||ref||_2` (relative Frobenius error) and returns it.
///
/// The measure for reduced precision: rounding can flip a router's near-tie between two experts
/// for a few tokens, which moves those tokens' values by O(1) whatever the kernels do (rounding
/// only the weights to f16, with everything else in f32, does it on `v01-shape`), while the
/// tensor as a whole stays close.
pub fn assert_close_l2(name: &str, ours: &[f32], reference: &TensorData, tol: f32) -> f32 {
    let want = reference.clone().convert::<f32>().to_vec::<f32>().unwrap();
    assert_eq!(
        ours.len(),
        want.len(),
        "{name}: {} values, reference has {}",
        ours.len(),
        want.len()
    );
    let diff: f64 = ours
        .iter()
        .zip(&want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = want
        .iter()
        .map(|b| (*b as f64).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(1e-30);
    let rel = (diff / norm) as f32;
    eprintln!("{name}: relative L2 error {rel:.2e}");
    assert!(
        rel <= tol,
        "{name}: ||ours - ref|| / ||ref|| = {rel:e}, limit {tol:e}"
    );
    rel
}

/// Checks every `grad.{name}` of a fixture against `ours` (keyed by `name`): each within 1e-4 of
/// its tensor's largest value (floored at 1e-3, below which f32 rounding of the loss's sums
/// dominates): ~1000x the f32 unit roundoff, far below any semantic difference (a padding-row
/// gradient, a missing aux term). Returns how many were compared.
pub fn assert_grads_match(
    case: &str,
    ours: &BTreeMap<String, TensorData>,
    exp: &BTreeMap<String, TensorData>,
    tol: f32,
) -> usize {
    let mut checked = 0;
    for (key, want) in exp.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let got = ours
            .get(name)
            .unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
        let want = want.to_vec::<f32>().unwrap();
        let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let worst = got
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst / scale <= tol,
            "{case} grad {name}: max error {worst:e} vs scale {scale:e}, limit {tol:e}"
        );
        checked += 1;
    }
    assert!(checked > 50, "{case}: only {checked} gradients compared");
    checked
}

/// Asserts that a forward pass with hidden states matches the fixture: as many hidden states and
/// router logits as transformers returned, each (and the logits) within `tol` by
/// [`assert_close`], or by [`assert_close_l2`] when `l2`.
pub fn assert_output_matches<B: Backend>(
    label: &str,
    out: jamba::JambaOutput<B>,
    exp: &BTreeMap<String, TensorData>,
    tol: f32,
    l2: bool,
) {
    let check = if l2 { assert_close_l2 } else { assert_close };
    let count = |prefix: &str| exp.keys().filter(|k| k.starts_with(prefix)).count();
    assert_eq!(
        out.hidden_states.len(),
        count("hidden_states."),
        "{label}: number of hidden states"
    );
    assert_eq!(
        out.router_logits.len(),
        count("router_logits."),
        "{label}: number of MoE layers"
    );
    for (i, h) in out.hidden_states.into_iter().enumerate() {
        let key = format!("hidden_states.{i}");
        check(&format!("{label} {key}"), &to_f32_vec(h), &exp[&key], tol);
    }
    for (j, r) in out.router_logits.into_iter().enumerate() {
        let key = format!("router_logits.{j}");
        check(&format!("{label} {key}"), &to_f32_vec(r), &exp[&key], tol);
    }
    check(
        &format!("{label} logits"),
        &to_f32_vec(out.logits),
        &exp["logits"],
        tol,
    );
}

/// Token ids of a fixture tensor.
pub fn ids_of(d: &TensorData) -> Vec<u32> {
    d.clone()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

/// Cached greedy generation of the fixture's 12 tokens (prefill in chunks of 5), compared step by
/// step with transformers: the same tokens, every step's scores within `tol`.
pub fn assert_greedy_matches<B: jamba::JambaBackend>(
    label: &str,
    model: &jamba::JambaForCausalLM<B>,
    case: &str,
    tol: f32,
) {
    use jamba::generate::{GenerationConfig, SamplingConfig};
    let exp = expected(case);
    let prompt = ids_of(&exp["generate.prompt"]);
    let want_tokens = ids_of(&exp["generate.tokens"]);
    let cfg = GenerationConfig {
        max_new_tokens: want_tokens.len(),
        sampling: SamplingConfig::greedy(),
        eos_token_ids: vec![],
        output_scores: true,
        prefill_chunk: 5,
        ..Default::default()
    };
    let gen = model.generate(&[prompt], &cfg, |_| true).unwrap();
    assert_eq!(gen.tokens[0], want_tokens, "{label}: greedy tokens");
    let vocab = model.config().vocab_size;
    let scores = exp["generate.scores"].to_vec::<f32>().unwrap();
    for (s, got) in gen.scores[0].iter().enumerate() {
        let want = TensorData::new(scores[s * vocab..(s + 1) * vocab].to_vec(), [vocab]);
        assert_close(&format!("{label} scores[{s}]"), got, &want, tol);
    }
}
