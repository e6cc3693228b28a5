//! Parity with transformers' `JambaForCausalLM` on the CPU reference backend (f32).
//!
//! Tolerance: 1e-4 of the reference's scale. f32 accumulation over the fixtures' widths (<= 128)
//! and up to 16 layers differs from PyTorch's by ~1e-6 relative; 1e-4 leaves room for the different
//! summation orders of matmul and the scan, and is far below what a wrong semantic gives (top-k
//! renormalisation moves logits by ~0.7, tiled instead of interleaved GQA heads by ~3).

mod common;

use burn::backend::NdArray;
use burn::tensor::DType;
use common::*;
use jamba::JambaForCausalLM;

type B = NdArray<f32>;
const TOL: f32 = 1e-4;

fn check_case(case: &str) {
    let device = Default::default();
    let model =
        JambaForCausalLM::<B>::from_pretrained(fixture_dir(case), &device, DType::F32).unwrap();
    let exp = expected(case);
    let out = model.forward(&tokens(&exp), None, true).unwrap();
    assert_output_matches(case, out, &exp, TOL, false);
}

#[test]
fn tiny_a_matches_transformers() {
    check_case("tiny-a");
}

#[test]
fn tiny_b_padded_tied_matches_transformers() {
    check_case("tiny-b");
}

#[test]
fn v01_shape_matches_transformers() {
    check_case("v01-shape");
}
