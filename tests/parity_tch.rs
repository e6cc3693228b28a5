//! Parity with transformers on LibTorch (CPU, f32): logits, every hidden state, router logits.
//!
//! LibTorch runs the reference implementations of the kernels (tensor ops) through PyTorch's own
//! CPU matmuls and reductions, so the tolerance is ndarray's: 1e-4 of the reference's scale.
//!
//! Needs PyTorch 2.9.0 (`LIBTORCH_USE_PYTORCH=1` at build time, its `lib` folder on the loader
//! path at run time); `.ci/run` installs it.
#![cfg(feature = "tch")]

mod common;

use burn::backend::libtorch::LibTorchDevice;
use burn::backend::LibTorch;
use burn::tensor::DType;
use common::*;
use jamba::JambaForCausalLM;

type B = LibTorch<f32>;

fn check_case(case: &str, dtype: DType, tol: f32) {
    let device = LibTorchDevice::Cpu;
    let model = JambaForCausalLM::<B>::from_pretrained(fixture_dir(case), &device, dtype).unwrap();
    let exp = expected(case);
    let out = model.forward(&tokens(&exp), None, true).unwrap();
    assert_output_matches(&format!("{case} {dtype:?}"), out, &exp, tol, false);
}

#[test]
fn tiny_a_f32() {
    check_case("tiny-a", DType::F32, 1e-4);
}

#[test]
fn tiny_b_f32() {
    check_case("tiny-b", DType::F32, 1e-4);
}

#[test]
fn v01_shape_f32() {
    check_case("v01-shape", DType::F32, 1e-4);
}
