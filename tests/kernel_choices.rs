//! Which kernel runs, where that depends on process-wide choices: cubek's matmul routines of
//! `linear` (`jamba_kernels::set_matmul_routine`, and the count of the products a routine
//! declined) and the size above which causal attention runs the flash kernel
//! (`JAMBA_FLASH_MIN_SCORES`, read once per process), and the forward and backward kernels of
//! the selective scan (`jamba_kernels::set_scan_forward`, `set_scan_backward`). Its own test binary, so that no other
//! test runs while a routine is switched or the count is read. On wgpu (lavapipe in CI) against
//! the f32 references on ndarray, for f16 inputs: the kernels accumulate in f32 and round the
//! output to f16 (2^-11 relative), so within 1e-2 of the scale.

#![cfg(feature = "wgpu")]

mod common;
#[path = "common/scan.rs"]
mod scan;

use burn::backend::{Autodiff, NdArray, Wgpu};
use burn::tensor::{backend::Backend, DType, Distribution, Tensor, TensorData};
use common::{assert_close, to_f32_vec};
use jamba_kernels::{reference, JambaBackend};
use scan::{check_scan_forward, check_scan_grads, data, random, scan_cases, ScanCase};

type Ref = NdArray<f32>;
/// The kernels without Burn's fusion.
type Cube = jamba_kernels::WgpuUnfused;

/// `v` rounded to f16 on `B`.
fn half<B: Backend, const D: usize>(v: &[f32], shape: [usize; D]) -> Tensor<B, D> {
    Tensor::<B, D>::from_data(TensorData::new(v.to_vec(), shape), &Default::default())
        .cast(DType::F16)
}

/// The same f16-rounded values in f32 on ndarray.
fn rounded<const D: usize>(v: &[f32], shape: [usize; D]) -> Tensor<Ref, D> {
    let r = to_f32_vec(half::<Cube, D>(v, shape));
    Tensor::from_data(TensorData::new(r, shape), &Default::default())
}

/// The fused backend's causal attention (a custom operation of the fusion stream running the
/// flash kernel) with the size threshold lowered to 0 for this process, against the reference,
/// with shared KV heads and queries after cached positions.
#[test]
fn fused_flash_attention_matches_reference() {
    // Read once per process, on the first attention call: before it.
    std::env::set_var("JAMBA_FLASH_MIN_SCORES", "0");
    assert!(jamba_kernels::flash_attention_pays(1, false));
    for (batch, heads, kv_heads, len_q, len_k, head_dim) in [
        (1, 1, 1, 1, 1, 8),
        (2, 4, 2, 33, 33, 16),
        (1, 2, 1, 70, 130, 64),
    ] {
        let q_shape = [batch, heads, len_q, head_dim];
        let kv_shape = [batch, kv_heads, len_k, head_dim];
        let q = random(q_shape.iter().product(), Distribution::Normal(0.0, 1.0));
        let k = random(kv_shape.iter().product(), Distribution::Normal(0.0, 1.0));
        let v = random(kv_shape.iter().product(), Distribution::Normal(0.0, 1.0));
        let want = data(reference::causal_attention(
            rounded(&q, q_shape),
            rounded(&k, kv_shape),
            rounded(&v, kv_shape),
        ));
        let fused = Wgpu::causal_attention(
            half::<Wgpu, 4>(&q, q_shape),
            half::<Wgpu, 4>(&k, kv_shape),
            half::<Wgpu, 4>(&v, kv_shape),
        );
        assert_eq!(fused.dtype(), DType::F16);
        let name = format!("fusion attention q {q_shape:?} kv {kv_shape:?}");
        assert_close(&name, &to_f32_vec(fused), &want, 1e-2);
    }
}

/// The large products of `linear` through each of cubek's matmul routines
/// (`jamba_kernels::MATMUL_ROUTINES`), unfused and fused, against the f32 reference on the same
/// f16-rounded inputs. The routines accumulate in f32 and round the output to f16 (2^-11
/// relative): within 1e-2 of the scale. On lavapipe (no cooperative matrices) the tensor-core
/// routines decline and Burn's matmul runs, which is checked too; the `_unit` ones run.
#[test]
fn matmul_routines_match_reference() {
    let rows = jamba_kernels::decode_max_rows();
    let before = jamba_kernels::matmul_routine();
    let (mut ran, mut gated) = (0, 0);
    // Inner and output sizes that are multiples of 64 take the routines; (33, 40, 24) checks
    // that the others fall back to Burn's matmul.
    for (m, k, n) in [(rows + 1, 64, 64), (33, 40, 24), (130, 128, 192)] {
        let name = format!("linear {m}x{k}x{n} f16");
        let (x, w, b) = (
            random(m * k, Distribution::Normal(0.0, 1.0)),
            random(n * k, Distribution::Normal(0.0, 1.0)),
            random(n, Distribution::Normal(0.0, 1.0)),
        );
        let want = data(burn::tensor::module::linear(
            rounded(&x, [m, k]),
            rounded(&w, [n, k]).transpose(),
            Some(rounded(&b, [n])),
        ));
        for routine in jamba_kernels::MATMUL_ROUTINES {
            jamba_kernels::set_matmul_routine(Some(routine)).unwrap();
            let declined = jamba_kernels::matmul_routine_fallbacks();
            let cube = <Cube as JambaBackend>::linear(
                half(&x, [m, k]),
                half(&w, [n, k]),
                Some(half(&b, [n])),
            );
            if jamba_kernels::matmul_routine_fallbacks() == declined {
                ran += 1;
            } else if !k.is_multiple_of(64) || !n.is_multiple_of(64) {
                // Sizes the routines are not offered: Burn's matmul ran, as counted.
                gated += 1;
            }
            assert_eq!(cube.dtype(), DType::F16);
            assert_close(
                &format!("cube {name} {routine}"),
                &to_f32_vec(cube),
                &want,
                1e-2,
            );
            let fused = <Wgpu as JambaBackend>::linear(
                half(&x, [m, k]),
                half(&w, [n, k]),
                Some(half(&b, [n])),
            );
            assert_close(
                &format!("fusion {name} {routine}"),
                &to_f32_vec(fused),
                &want,
                1e-2,
            );
        }
        // Under autodiff the backward's products run through the routine too. Gradients of
        // `sum(linear(x) * g)`: f16 like the forward, same tolerance.
        let g = random(m * n, Distribution::Normal(0.0, 1.0));
        fn grads<A: burn::tensor::backend::AutodiffBackend + JambaBackend>(
            x: Tensor<A, 2>,
            w: Tensor<A, 2>,
            b: Tensor<A, 1>,
            g: Tensor<A, 2>,
        ) -> Vec<Vec<f32>> {
            let (x, w, b) = (x.require_grad(), w.require_grad(), b.require_grad());
            let y = <A as JambaBackend>::linear(x.clone(), w.clone(), Some(b.clone()));
            let grads = (y * g).sum().backward();
            vec![
                to_f32_vec(x.grad(&grads).expect("x gradient")),
                to_f32_vec(w.grad(&grads).expect("weight gradient")),
                to_f32_vec(b.grad(&grads).expect("bias gradient")),
            ]
        }
        let want = grads::<Autodiff<Ref>>(
            Tensor::from_inner(rounded(&x, [m, k])),
            Tensor::from_inner(rounded(&w, [n, k])),
            Tensor::from_inner(rounded(&b, [n])),
            Tensor::from_inner(rounded(&g, [m, n])),
        );
        for routine in ["simple_unit", "simple_cmma"] {
            jamba_kernels::set_matmul_routine(Some(routine)).unwrap();
            for (backend, got) in [
                (
                    "cube",
                    grads::<Autodiff<Cube>>(
                        half(&x, [m, k]),
                        half(&w, [n, k]),
                        half(&b, [n]),
                        half(&g, [m, n]),
                    ),
                ),
                (
                    "fusion",
                    grads::<Autodiff<Wgpu>>(
                        half(&x, [m, k]),
                        half(&w, [n, k]),
                        half(&b, [n]),
                        half(&g, [m, n]),
                    ),
                ),
            ] {
                for ((key, got), want) in ["x", "weight", "bias"].iter().zip(got).zip(&want) {
                    let shape = [want.len()];
                    assert_close(
                        &format!("{backend} {name} {routine} grad {key}"),
                        &got,
                        &TensorData::new(want.clone(), shape),
                        1e-2,
                    );
                }
            }
        }
    }
    jamba_kernels::set_matmul_routine(before).unwrap();
    assert!(
        ran >= 2,
        "no matmul routine ran on this device ({ran} products)"
    );
    assert_eq!(
        gated,
        jamba_kernels::MATMUL_ROUTINES.len(),
        "the 40 x 24 product did not fall back for every routine"
    );
    assert!(jamba_kernels::set_matmul_routine(Some("fastest")).is_err());
}

/// Each forward kernel of the selective scan, forced in turn ([`jamba_kernels::set_scan_forward`]),
/// on every scan case of `kernels.rs` (f32 within 1e-4 of the scale), and the gradients through
/// the backward from the chunk states each of them saved; then each backward kernel
/// ([`jamba_kernels::set_scan_backward`]). The chunked kernel must run on
/// lavapipe (its plane size is fixed at 8), the split one where `d_state <= 16`.
#[test]
fn scan_forward_kernels_match_reference() {
    use jamba_kernels::{ScanBackward, ScanForward};
    for kernel in [
        ScanForward::Chunked,
        ScanForward::OnePass,
        ScanForward::Split,
    ] {
        jamba_kernels::set_scan_forward(kernel);
        let before = jamba_kernels::scan_forward_runs(kernel);
        for (name, case) in scan_cases() {
            check_scan_forward::<Cube>(&format!("cube {kernel:?} {name}"), &case, DType::F32, 1e-4);
        }
        check_scan_forward::<Wgpu>(
            &format!("fusion {kernel:?}"),
            &ScanCase::new(2, 19, 77, 16).with_state(),
            DType::F32,
            1e-4,
        );
        check_scan_forward::<Cube>(
            &format!("cube f16 {kernel:?}"),
            &ScanCase::new(3, 37, 513, 16).channel_last(),
            DType::F16,
            1e-2,
        );
        // Two tiles of every kernel and a partial third: the chunk states saved at each. d_state
        // 32 takes the chunked kernels' smaller cubes on lavapipe; 40 a chunk length of 12 (not
        // a power of two) and lanes of 4 positions.
        for case in [
            ScanCase::new(2, 13, 150, 16).with_state(),
            ScanCase::new(1, 6, 1100, 16).with_state().channel_last(),
            ScanCase::new(2, 5, 40, 64).with_state().bare(),
            ScanCase::new(2, 21, 100, 32).with_state(),
            ScanCase::new(1, 10, 50, 40).with_state(),
        ] {
            let name = format!(
                "cube {kernel:?} b{} d{} l{} n{}",
                case.batch, case.d_inner, case.len, case.d_state
            );
            check_scan_grads::<Autodiff<Cube>>(&name, &case);
        }
        let ran = jamba_kernels::scan_forward_runs(kernel) - before;
        // The split kernel declines d_state above 16, the chunked one where B and C of a tile
        // pass lavapipe's 32 KiB of shared memory (d_state 64 and 256, three cases). At
        // d_state 32 the chunked kernel's direct mode (B and C double-buffered) does not fit
        // and its staged mode runs instead: 12 of the 15 cases.
        let least = if kernel == ScanForward::Chunked {
            12
        } else {
            10
        };
        assert!(ran >= least, "{kernel:?} ran {ran} forward scans");
    }
    jamba_kernels::set_scan_forward(ScanForward::Auto);

    // Each backward kernel, from the chunk states of the automatic forward.
    for kernel in [ScanBackward::Chunked, ScanBackward::OnePass] {
        jamba_kernels::set_scan_backward(kernel);
        let before = jamba_kernels::scan_backward_runs(kernel);
        // Small deltas (softplus of about -6): the softplus derivative's series branch.
        let mut small_delta = ScanCase::new(2, 13, 70, 16).with_state();
        small_delta.delta.iter_mut().for_each(|d| *d -= 5.0);
        for case in [
            small_delta,
            ScanCase::new(2, 21, 100, 32).with_state(),
            ScanCase::new(3, 37, 100, 16),
            ScanCase::new(2, 5, 1, 1).bare(),
            ScanCase::new(1, 65, 40, 16).with_state().bare(),
            ScanCase::new(2, 33, 129, 16).channel_last(),
            ScanCase::new(1, 9, 33, 8).with_state(),
            ScanCase::new(1, 6, 1500, 16).with_state(),
        ] {
            let name = format!(
                "cube backward {kernel:?} b{} d{} l{} n{}",
                case.batch, case.d_inner, case.len, case.d_state
            );
            check_scan_grads::<Autodiff<Cube>>(&name, &case);
        }
        check_scan_grads::<Autodiff<Wgpu>>(
            &format!("fusion backward {kernel:?}"),
            &ScanCase::new(2, 19, 77, 16).with_state(),
        );
        let ran = jamba_kernels::scan_backward_runs(kernel) - before;
        assert!(ran >= 9, "{kernel:?} ran {ran} backward scans");
    }
    jamba_kernels::set_scan_backward(ScanBackward::Auto);
}
