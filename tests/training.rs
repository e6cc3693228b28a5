//! Training-side parity with transformers (loss, aux loss, every gradient) and exact resume.

mod common;

use std::collections::BTreeMap;

use burn::backend::{Autodiff, NdArray};
use burn::optim::GradientsParams;
use burn::tensor::DType;
use common::*;
use jamba::nn::hub_split;
use jamba::train::{lr_at, named_grads, AdamW, AdamWConfig};
use jamba::{JambaForCausalLM, TokenBatch};

type B = Autodiff<NdArray<f32>>;

/// Loss, aux loss and every gradient within `tol` of their scale ([`assert_grads_match`]).
fn check_case(case: &str) {
    check_case_on::<B>(case, 1e-4);
}

fn check_case_on<B>(case: &str, tol: f32)
where
    B: burn::tensor::backend::AutodiffBackend + jamba::JambaBackend,
{
    let model =
        JambaForCausalLM::<B>::from_pretrained(fixture_dir(case), &Default::default(), DType::F32)
            .unwrap();
    let exp = expected(case);
    let out = model.loss(&tokens(&exp)).unwrap();
    let one = |t: burn::tensor::Tensor<B, 1>| to_f32_vec(t);
    assert_close(
        &format!("{case} loss"),
        &one(out.loss.clone()),
        &exp["loss"],
        tol,
    );
    assert_close(
        &format!("{case} aux_loss"),
        &one(out.aux.clone().unwrap()),
        &exp["aux_loss"],
        tol,
    );
    let grads = GradientsParams::from_grads(out.loss.backward(), &model);
    let mut ours = BTreeMap::new();
    for (name, g) in named_grads(&model, &grads) {
        for (k, v) in hub_split(
            &name,
            g.unwrap_or_else(|| panic!("{case}: no gradient for {name}")),
            0,
        ) {
            ours.insert(k, v);
        }
    }
    assert_grads_match(case, &ours, &exp, tol);
}

#[test]
fn tiny_a_loss_and_gradients_match_transformers() {
    check_case("tiny-a");
}

#[test]
fn tiny_b_padded_tied_loss_and_gradients_match_transformers() {
    check_case("tiny-b");
}

#[test]
fn v01_shape_loss_and_gradients_match_transformers() {
    check_case("v01-shape");
}

/// The same on wgpu, where the scan and the conv run the CubeCL kernels forward and backward
/// (f32; 1e-3 as the wgpu forward parity, for the different summation orders of the kernels).
#[cfg(feature = "wgpu")]
#[test]
fn loss_and_gradients_match_transformers_on_wgpu_with_the_kernels() {
    type W = Autodiff<burn::backend::Wgpu>;
    for case in CASES {
        check_case_on::<W>(case, 1e-3);
    }
}

fn batch(step: usize) -> TokenBatch {
    let ids = (0..2 * 12)
        .map(|i| 3 + ((i * 31 + step * 17) % 500) as i64)
        .collect();
    TokenBatch::new(ids, 2, 12, None).unwrap()
}

fn train(
    model: JambaForCausalLM<B>,
    opt: &mut AdamW<B>,
    steps: std::ops::Range<usize>,
) -> JambaForCausalLM<B> {
    let mut model = model;
    for step in steps {
        let loss = model.loss(&batch(step)).unwrap().loss;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = lr_at(step, 2, 6, 1e-3, 1e-4);
        model = opt.step(model, grads, lr, Some(1.0)).0;
    }
    model
}

#[test]
fn resume_gives_identical_parameters() {
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let load = || {
        JambaForCausalLM::<B>::from_pretrained(
            fixture_dir("tiny-b"),
            &Default::default(),
            DType::F32,
        )
        .unwrap()
    };
    let mut opt = AdamW::new(cfg);
    let straight = train(load(), &mut opt, 0..6);

    let mut opt = AdamW::new(cfg);
    let half = train(load(), &mut opt, 0..3);
    let dir = tempfile::tempdir().unwrap();
    half.save_pretrained(dir.path()).unwrap();
    opt.save(&dir.path().join("optimizer.safetensors")).unwrap();
    let model = JambaForCausalLM::<B>::from_pretrained(dir.path(), &Default::default(), DType::F32)
        .unwrap();
    let mut opt = AdamW::load(
        &dir.path().join("optimizer.safetensors"),
        cfg,
        opt.step,
        &Default::default(),
    )
    .unwrap();
    let resumed = train(model, &mut opt, 3..6);

    let a = straight.export_tensors();
    let b = resumed.export_tensors();
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert_eq!(va.as_bytes(), vb.as_bytes(), "{ka} differs after resume");
    }
    // And training moved the parameters.
    let before = load().export_tensors();
    assert!(before
        .iter()
        .zip(&a)
        .any(|((_, x), (_, y))| x.as_bytes() != y.as_bytes()));
}
