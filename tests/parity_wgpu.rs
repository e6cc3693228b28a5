//! Parity with transformers on wgpu (Mesa's lavapipe in CI): f32 and f16.
//!
//! f32 tolerance 1e-3 of the reference's scale: the GPU's matmul tiling and fused reductions sum in
//! other orders than the CPU, and lavapipe's `exp`/`log` are not correctly rounded.
//! f16 tolerance 3e-2 in relative L2 norm (`assert_close_l2` says why not max-abs): f16 keeps 11
//! significant bits (unit roundoff 4.9e-4); weights and matmul inputs are rounded at every layer,
//! while the residual stream, norms, softmaxes, routing and the scan state stay in f32.
#![cfg(feature = "wgpu")]

mod common;

use burn::backend::Wgpu;
use burn::tensor::DType;
use common::*;
use jamba::JambaForCausalLM;

type B = Wgpu;

fn check_case(case: &str, dtype: DType, tol: f32) {
    let device = Default::default();
    let model = JambaForCausalLM::<B>::from_pretrained(fixture_dir(case), &device, dtype).unwrap();
    let exp = expected(case);
    let out = model.forward(&tokens(&exp), None, true).unwrap();
    assert_output_matches(
        &format!("{case} {dtype:?}"),
        out,
        &exp,
        tol,
        dtype != DType::F32,
    );
}

#[test]
fn tiny_a_f32() {
    check_case("tiny-a", DType::F32, 1e-3);
}

#[test]
fn tiny_b_f32() {
    check_case("tiny-b", DType::F32, 1e-3);
}

#[test]
fn v01_shape_f32() {
    check_case("v01-shape", DType::F32, 1e-3);
}

#[test]
fn tiny_a_f16() {
    check_case("tiny-a", DType::F16, 3e-2);
}

#[test]
fn tiny_b_f16() {
    check_case("tiny-b", DType::F16, 3e-2);
}

#[test]
fn v01_shape_f16() {
    check_case("v01-shape", DType::F16, 3e-2);
}

/// The constructors make the small parameters under CubeCL's persistent allocation mode, waiting
/// for the device around each (so that fusion's lazily run operations allocate inside the mode
/// and no others do). A seed must still draw the same values as a build without the mode, with
/// every parameter under it (the constructors' bound, above all of tiny-b's) and with only some
/// (a bound of 4 KiB): the waits must not reorder the draws. (This binary's other tests draw
/// nothing, so the seed is not shared.)
#[test]
fn persistent_parameters_equal_pooled_ones() {
    use burn::tensor::backend::Backend;
    use jamba::weights::{release_build_leftovers, Weights};
    let device = Default::default();
    let cfg = jamba::JambaConfig::from_file(fixture_dir("tiny-b").join("config.json")).unwrap();
    let build = |bound: Option<usize>| {
        B::seed(&device, 7);
        let model = match bound {
            None => JambaForCausalLM::<B>::init(&cfg, &device, DType::F32).unwrap(),
            Some(bound) => {
                let mut w = Weights::random(cfg.initializer_range, &device, DType::F32)
                    .with_persistent_max_bytes(bound);
                let model = JambaForCausalLM::<B>::build(&cfg, &mut w).unwrap();
                release_build_leftovers::<B>(std::slice::from_ref(&device)).unwrap();
                model
            }
        };
        model.named_params()
    };
    let pooled = build(Some(0));
    for bound in [None, Some(4096)] {
        let made = build(bound);
        assert_eq!(made.len(), pooled.len());
        for (a, b) in made.iter().zip(&pooled) {
            assert_eq!(a.name, b.name);
            assert_eq!(
                a.param.data(),
                b.param.data(),
                "{} (bound {bound:?})",
                a.name
            );
        }
    }
}
