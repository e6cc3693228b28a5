//! The CubeCL kernels of `jamba-kernels` on wgpu (Mesa's lavapipe in CI, plane size 8) against
//! the tensor-op references on ndarray: forward outputs, the decoding steps, and the gradient of
//! every input, on awkward shapes (length 1, 7, 513; channel counts that are not a multiple of
//! the cube; batch 3; d_state 1, 16, 64) and on the model's strided (channel-last) layout.
//!
//! Tolerances: f32 1e-4 of `max(1, max|ref|)`: both sides accumulate in f32 over at most 513
//! steps and `d_state` terms, in a different order. f16 inputs 1e-2: the kernel reads f16 and
//! computes in f32 like the reference given the same f16-rounded inputs, so the difference is
//! the f16 rounding of the output (2^-11 relative) plus the f32 one above.

#![cfg(feature = "wgpu")]

mod common;
#[path = "common/scan.rs"]
mod scan;

use burn::backend::{wgpu::WgpuDevice, Autodiff, NdArray, Wgpu};
use burn::tensor::Int;
use burn::tensor::{backend::Backend, DType, Distribution, Tensor, TensorData};
use common::{assert_close, to_f32_vec};
use jamba_kernels::{
    reference, CausalConv1dInput, CausalConv1dUpdate, JambaBackend, MambaInProjStep, MambaStep,
    MoeInput, SelectiveStateUpdate,
};
use scan::{check_scan_forward, check_scan_grads, data, random, scan_cases, transpose, ScanCase};

type Ref = NdArray<f32>;

/// The switches that send kernels to their references (or to other paths) would make these
/// comparisons vacuous: refuse to run under them.
fn no_overrides() {
    for var in [
        "JAMBA_REFERENCE",
        "JAMBA_DECODE_MAX_ROWS",
        "JAMBA_MOE_PER_EXPERT_PAIRS",
        "JAMBA_SCAN_FWD",
        "JAMBA_SCAN_BWD",
        "JAMBA_SCAN_CHUNK_BLOCK",
        "JAMBA_SCAN_BWD_BLOCK",
    ] {
        assert!(
            std::env::var_os(var).is_none(),
            "{var} is set: the kernels under test would not all run"
        );
    }
}
/// The kernels without Burn's fusion.
type Cube = jamba_kernels::WgpuUnfused;

#[test]
fn scan_forward_f32_cube_and_fused() {
    no_overrides();
    for (name, case) in scan_cases() {
        check_scan_forward::<Cube>(&format!("cube {name}"), &case, DType::F32, 1e-4);
        check_scan_forward::<Wgpu>(&format!("fusion {name}"), &case, DType::F32, 1e-4);
    }
}

#[test]
fn scan_forward_f16() {
    no_overrides();
    for (name, case) in scan_cases().into_iter().take(3) {
        check_scan_forward::<Wgpu>(&format!("f16 {name}"), &case, DType::F16, 1e-2);
    }
}

#[test]
fn scan_gradients_cube_and_fused() {
    no_overrides();
    for (name, case) in scan_cases().into_iter().take(5) {
        // The reference's autodiff is slow on long sequences; keep the long one small.
        let case = if case.len > 200 {
            ScanCase {
                ..ScanCase::new(3, 37, 513, 16)
            }
        } else {
            case
        };
        check_scan_grads::<Autodiff<Cube>>(&format!("cube {name}"), &case);
        check_scan_grads::<Autodiff<Wgpu>>(&format!("fusion {name}"), &case);
    }
    // The chunk states saved by every segment of two tiles, the second partial.
    let case = ScanCase::new(1, 6, 1500, 16).with_state();
    check_scan_grads::<Autodiff<Cube>>("cube b1 d6 l1500 n16 state", &case);
}

#[test]
fn state_update_matches_scan_of_one_and_leaves_shared_state_alone() {
    no_overrides();
    for (name, case) in [
        ("b3 d37 n16", ScanCase::new(3, 37, 1, 16).with_state()),
        (
            "b2 d70 n64 bare",
            ScanCase::new(2, 70, 1, 64).with_state().bare(),
        ),
    ] {
        for fused in [false, true] {
            let (y, state, before, kept) = if fused {
                update_on::<Wgpu>(&case)
            } else {
                update_on::<Cube>(&case)
            };
            let want =
                reference::selective_scan(case.input::<Ref>(&Default::default(), DType::F32));
            let label = format!("{name} fused={fused}");
            assert_close(
                &format!("{label} y"),
                &y,
                &data(want.y.squeeze_dim::<2>(2)),
                1e-4,
            );
            assert_close(
                &format!("{label} state"),
                &state,
                &data(want.last_state),
                1e-4,
            );
            assert_eq!(
                before, kept,
                "{label}: a state still referenced elsewhere was modified"
            );
        }
    }

    /// Runs the update with a second reference to the state alive; returns y, the new state,
    /// and the shared state's values before and after.
    fn update_on<B: JambaBackend>(case: &ScanCase) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let dev = Default::default();
        let input = case.input::<B>(&dev, DType::F32);
        let state = input.initial_state.clone().unwrap();
        let before = to_f32_vec(state.clone());
        let sq = |t: Tensor<B, 3>| t.squeeze_dim::<2>(2);
        let (y, next) = B::selective_state_update(SelectiveStateUpdate {
            state: state.clone(),
            x: sq(input.u),
            delta: sq(input.delta),
            a: input.a,
            b: sq(input.b),
            c: sq(input.c),
            d: input.d,
            z: input.z.map(sq),
            delta_bias: input.delta_bias,
            delta_softplus: true,
        });
        (to_f32_vec(y), to_f32_vec(next), before, to_f32_vec(state))
    }
}

/// Host copies of one random conv problem.
struct ConvCase {
    shape: [usize; 3],
    width: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    init: Option<Vec<f32>>,
    silu: bool,
    channel_last: bool,
}

impl ConvCase {
    fn new(batch: usize, d: usize, len: usize, width: usize) -> Self {
        let n = Distribution::Normal(0.0, 1.0);
        Self {
            shape: [batch, d, len],
            width,
            x: random(batch * d * len, n),
            w: random(d * width, n),
            bias: Some(random(d, n)),
            init: Some(random(batch * d * (width - 1).max(1), n)),
            silu: true,
            channel_last: false,
        }
    }

    fn input<B: Backend>(&self, dev: &B::Device, dtype: DType) -> CausalConv1dInput<B> {
        let [bs, d, _] = self.shape;
        let [_, _, len] = self.shape;
        let x = if self.channel_last {
            Tensor::<B, 3>::from_data(
                TensorData::new(transpose(&self.x, bs, d, len), [bs, len, d]),
                dev,
            )
            .swap_dims(1, 2)
        } else {
            Tensor::<B, 3>::from_data(TensorData::new(self.x.clone(), self.shape), dev)
        };
        CausalConv1dInput {
            x: x.cast(dtype),
            weight: Tensor::from_data(TensorData::new(self.w.clone(), [d, self.width]), dev),
            bias: self
                .bias
                .as_ref()
                .map(|b| Tensor::from_data(TensorData::new(b.clone(), [d]), dev)),
            initial_state: self.init.as_ref().map(|s| {
                Tensor::from_data(TensorData::new(s.clone(), [bs, d, self.width - 1]), dev)
            }),
            silu: self.silu,
        }
    }
}

fn conv_cases() -> Vec<(&'static str, ConvCase)> {
    let mut plain = ConvCase::new(2, 9, 7, 3);
    plain.bias = None;
    plain.init = None;
    plain.silu = false;
    let mut strided = ConvCase::new(3, 37, 129, 4);
    strided.channel_last = true;
    // Lengths that are multiples of the vector width: the kernel that reads positions in
    // vectors (with and without an initial state, width 4 over vectors of 4 and width 2).
    let mut vec_no_init = ConvCase::new(2, 5, 64, 4);
    vec_no_init.init = None;
    vec![
        ("b3 d37 l513 k4", ConvCase::new(3, 37, 513, 4)),
        ("b3 d7 l36 k4 vectors", ConvCase::new(3, 7, 36, 4)),
        ("b2 d5 l64 k4 vectors, no state", vec_no_init),
        ("b1 d3 l8 k2 vectors", ConvCase::new(1, 3, 8, 2)),
        ("b2 d5 l1 k4", ConvCase::new(2, 5, 1, 4)),
        ("b2 d9 l7 k3 plain", plain),
        ("b3 d37 l129 k4 channel-last", strided),
    ]
}

#[test]
fn conv_forward_and_gradients() {
    no_overrides();
    for (name, case) in conv_cases() {
        let want = reference::causal_conv1d(case.input::<Ref>(&Default::default(), DType::F32));
        for (label, got) in [
            (
                "cube",
                to_f32_vec(Cube::causal_conv1d(
                    case.input::<Cube>(&Default::default(), DType::F32),
                )),
            ),
            (
                "fusion",
                to_f32_vec(Wgpu::causal_conv1d(
                    case.input::<Wgpu>(&Default::default(), DType::F32),
                )),
            ),
        ] {
            assert_close(
                &format!("{label} {name} y"),
                &got,
                &data(want.clone()),
                1e-4,
            );
        }
        let w = random(case.x.len(), Distribution::Normal(0.0, 1.0));
        let want = conv_grads::<Autodiff<Ref>>(&case, &w);
        for (label, got) in [
            ("cube", conv_grads::<Autodiff<Cube>>(&case, &w)),
            ("fusion", conv_grads::<Autodiff<Wgpu>>(&case, &w)),
        ] {
            assert_eq!(got.len(), want.len());
            for ((key, g), (_, r)) in got.into_iter().zip(want.iter()) {
                assert_close(
                    &format!("{label} {name} grad {key}"),
                    &g.to_vec::<f32>().unwrap(),
                    r,
                    1e-4,
                );
            }
        }
    }

    fn conv_grads<A: burn::tensor::backend::AutodiffBackend + JambaBackend>(
        case: &ConvCase,
        w: &[f32],
    ) -> Vec<(String, TensorData)> {
        let dev = Default::default();
        let input = case.input::<A>(&dev, DType::F32);
        let input = CausalConv1dInput {
            x: input.x.require_grad(),
            weight: input.weight.require_grad(),
            bias: input.bias.map(|t| t.require_grad()),
            initial_state: input.initial_state.map(|t| t.require_grad()),
            ..input
        };
        let keep = input.clone();
        let y = A::causal_conv1d(input);
        let w = Tensor::<A, 3>::from_data(TensorData::new(w.to_vec(), case.shape), &dev);
        let grads = (y * w).sum().backward();
        let mut out = vec![
            ("x".to_string(), data(keep.x.grad(&grads).unwrap())),
            (
                "weight".to_string(),
                data(keep.weight.grad(&grads).unwrap()),
            ),
        ];
        if let Some(b) = &keep.bias {
            out.push(("bias".into(), data(b.grad(&grads).unwrap())));
        }
        if let Some(s) = &keep.initial_state {
            out.push(("initial_state".into(), data(s.grad(&grads).unwrap())));
        }
        out
    }
}

#[test]
fn conv_update_matches_conv_of_one() {
    no_overrides();
    for (name, case) in [
        ("b3 d37 k4", ConvCase::new(3, 37, 1, 4)),
        ("b2 d5 k2", ConvCase::new(2, 5, 1, 2)),
    ] {
        let want_y = reference::causal_conv1d(case.input::<Ref>(&Default::default(), DType::F32));
        let [bs, d, _] = case.shape;
        let k = case.width;
        // The new state: the last k-1 of (init ++ x).
        let init = case.init.clone().unwrap();
        let mut want_state = vec![0.0; bs * d * (k - 1)];
        for r in 0..bs * d {
            let mut window: Vec<f32> = init[r * (k - 1)..(r + 1) * (k - 1)].to_vec();
            window.push(case.x[r]);
            want_state[r * (k - 1)..(r + 1) * (k - 1)].copy_from_slice(&window[1..]);
        }
        let want_state = TensorData::new(want_state, [bs, d, k - 1]);
        for fused in [false, true] {
            let (y, state, before, kept) = if fused {
                run::<Wgpu>(&case)
            } else {
                run::<Cube>(&case)
            };
            let label = format!("{name} fused={fused}");
            assert_close(
                &format!("{label} y"),
                &y,
                &data(want_y.clone().squeeze_dim::<2>(2)),
                1e-4,
            );
            assert_close(&format!("{label} state"), &state, &want_state, 1e-6);
            assert_eq!(
                before, kept,
                "{label}: a state still referenced elsewhere was modified"
            );
        }
    }

    fn run<B: JambaBackend>(case: &ConvCase) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let input = case.input::<B>(&Default::default(), DType::F32);
        let state = input.initial_state.clone().unwrap();
        let before = to_f32_vec(state.clone());
        let (y, next) = B::causal_conv1d_update(CausalConv1dUpdate {
            state: state.clone(),
            x: input.x.squeeze_dim::<2>(2),
            weight: input.weight,
            bias: input.bias,
            silu: input.silu,
        });
        (to_f32_vec(y), to_f32_vec(next), before, to_f32_vec(state))
    }
}

#[test]
fn kernels_run_on_the_lavapipe_plane_size() {
    no_overrides();
    // The backward's per-plane partial sums are sized from the smallest plane; this documents
    // which one the tests ran with.
    let dev = WgpuDevice::default();
    let t = Tensor::<Cube, 1>::zeros([1], &dev);
    let client = t.into_primitive().tensor().client;
    let p = client.properties().hardware.plane_size_min;
    assert!(p >= 1, "plane size {p}");
    eprintln!(
        "plane_size_min = {p}, max_shared_memory_size = {}",
        client.properties().hardware.max_shared_memory_size
    );
}

#[test]
fn rms_norm_matches_reference() {
    no_overrides();
    let dev = Default::default();
    for (rows, dim) in [(1, 1), (3, 16), (5, 128), (2, 2048), (1, 4099)] {
        let x = random(rows * dim, Distribution::Normal(0.5, 2.0));
        let w = random(dim, Distribution::Normal(1.0, 0.5));
        for (x_dtype, w_dtype, tol) in [
            (DType::F32, DType::F32, 1e-5),
            (DType::F32, DType::F16, 2e-3),
        ] {
            let want = reference::rms_norm(
                Tensor::<Ref, 2>::from_data(TensorData::new(x.clone(), [rows, dim]), &dev),
                Tensor::<Ref, 1>::from_data(TensorData::new(w.clone(), [dim]), &dev),
                1e-6,
            );
            fn ours<B: JambaBackend>(
                x: &[f32],
                w: &[f32],
                s: [usize; 2],
                dt: [DType; 2],
            ) -> Tensor<B, 2> {
                let dev = Default::default();
                B::rms_norm(
                    Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), s), &dev).cast(dt[0]),
                    Tensor::<B, 1>::from_data(TensorData::new(w.to_vec(), [s[1]]), &dev)
                        .cast(dt[1]),
                    1e-6,
                )
            }
            for (label, (dtype, got)) in [
                ("cube", {
                    let t = ours::<Cube>(&x, &w, [rows, dim], [x_dtype, w_dtype]);
                    (t.dtype(), to_f32_vec(t))
                }),
                ("fusion", {
                    let t = ours::<Wgpu>(&x, &w, [rows, dim], [x_dtype, w_dtype]);
                    (t.dtype(), to_f32_vec(t))
                }),
            ] {
                assert_eq!(dtype, w_dtype, "{label}: output takes the weight's dtype");
                // f16 output: the reference's f32 result rounded the same way is within 2^-11.
                assert_close(
                    &format!("{label} rms_norm {rows}x{dim} {w_dtype:?}"),
                    &got,
                    &data(want.clone()),
                    tol,
                );
            }
        }
    }
}

#[test]
fn swiglu_matches_reference() {
    no_overrides();
    // Vectors of 4 (f32, 1030 columns), of 2 and 1 (odd lengths), one element, and views: a
    // transposed one (copied), row blocks whose offsets are odd (unaligned), and rows twice as
    // far apart as they are wide (each tensor's own row stride).
    for (rows, cols) in [(1, 1), (3, 7), (5, 12), (4, 1030), (2, 6)] {
        let n = (rows + 1) * cols;
        let g = random(n, Distribution::Normal(0.0, 3.0));
        let u = random(n, Distribution::Normal(0.5, 2.0));
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3)] {
            for view in ["contiguous", "transposed", "offset rows", "strided rows"] {
                fn input<B: Backend>(
                    v: &[f32],
                    rows: usize,
                    cols: usize,
                    dt: DType,
                    view: &str,
                ) -> Tensor<B, 2> {
                    let dev = Default::default();
                    let t = Tensor::<B, 2>::from_data(
                        TensorData::new(v.to_vec(), [rows + 1, cols]),
                        &dev,
                    )
                    .cast(dt);
                    match view {
                        "transposed" => t
                            .reshape([(rows + 1) * cols])
                            .narrow(0, 0, rows * cols)
                            .reshape([cols, rows])
                            .transpose(),
                        "offset rows" => t.narrow(0, 1, rows),
                        "strided rows" => {
                            let t = t.narrow(0, 0, rows);
                            Tensor::cat(vec![t.clone(), t], 1).narrow(1, 0, cols)
                        }
                        _ => t.narrow(0, 0, rows),
                    }
                }
                // The reference in f32 on the inputs rounded to the dtype; f16 output: within
                // one rounding (2^-11 relative) and the reference's own rounding of the SiLU.
                let want = {
                    // The inputs as the dtype rounds them (ndarray has no f16).
                    let rounded = |v: &[f32]| {
                        let t = to_f32_vec(input::<Cube>(v, rows, cols, dtype, view));
                        Tensor::<Ref, 2>::from_data(
                            TensorData::new(t, [rows, cols]),
                            &Default::default(),
                        )
                    };
                    reference::swiglu(rounded(&g), rounded(&u))
                };
                fn ours<B: JambaBackend>(g: Tensor<B, 2>, u: Tensor<B, 2>) -> (DType, Vec<f32>) {
                    let t = B::swiglu(g, u);
                    (t.dtype(), to_f32_vec(t))
                }
                for (label, (out_dtype, got)) in [
                    (
                        "cube",
                        ours::<Cube>(
                            input(&g, rows, cols, dtype, view),
                            input(&u, rows, cols, dtype, view),
                        ),
                    ),
                    (
                        "fusion",
                        ours::<Wgpu>(
                            input(&g, rows, cols, dtype, view),
                            input(&u, rows, cols, dtype, view),
                        ),
                    ),
                ] {
                    assert_eq!(out_dtype, dtype, "{label}: output takes the inputs' dtype");
                    assert_close(
                        &format!("{label} swiglu {rows}x{cols} {dtype:?} {view}"),
                        &got,
                        &data(want.clone()),
                        tol,
                    );
                }
            }
        }
    }
}

#[test]
fn fused_norms_and_mlp_match_reference() {
    no_overrides();
    // add_rms_norm: an f32 residual plus h of each dtype, normed into the weight's dtype.
    for (rows, dim) in [(1, 1), (3, 130), (2, 2048), (1, 4099)] {
        let r = random(rows * dim, Distribution::Normal(0.0, 2.0));
        let h = random(rows * dim, Distribution::Normal(0.5, 1.0));
        let w = random(dim, Distribution::Normal(1.0, 0.5));
        for (h_dtype, w_dtype, tol) in [
            (DType::F32, DType::F32, 1e-5),
            (DType::F16, DType::F16, 2e-3),
        ] {
            fn run<B: JambaBackend>(
                r: &[f32],
                h: &[f32],
                w: &[f32],
                s: [usize; 2],
                dt: [DType; 2],
            ) -> (Vec<f32>, Vec<f32>) {
                let dev = Default::default();
                let (sum, out) = B::add_rms_norm(
                    Tensor::<B, 2>::from_data(TensorData::new(r.to_vec(), s), &dev),
                    Tensor::<B, 2>::from_data(TensorData::new(h.to_vec(), s), &dev).cast(dt[0]),
                    Tensor::<B, 1>::from_data(TensorData::new(w.to_vec(), [s[1]]), &dev)
                        .cast(dt[1]),
                    1e-6,
                );
                assert_eq!(sum.dtype(), DType::F32, "the residual stays f32");
                assert_eq!(out.dtype(), dt[1], "the norm takes the weight's dtype");
                (to_f32_vec(sum), to_f32_vec(out))
            }
            let s = [rows, dim];
            // ndarray has no f16: the reference takes the f16-rounded h and weight in f32.
            let round = |v: &[f32]| -> Vec<f32> {
                match h_dtype {
                    DType::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
                    _ => v.to_vec(),
                }
            };
            let (h, w) = (round(&h), round(&w));
            let (want_sum, want) = run::<Ref>(&r, &h, &w, s, [DType::F32, DType::F32]);
            let (want_sum, want) = (TensorData::new(want_sum, s), TensorData::new(want, s));
            for (label, (sum, out)) in [
                ("cube", run::<Cube>(&r, &h, &w, s, [h_dtype, w_dtype])),
                ("fusion", run::<Wgpu>(&r, &h, &w, s, [h_dtype, w_dtype])),
            ] {
                let name = format!("{label} add_rms_norm {rows}x{dim} {h_dtype:?}");
                // The sum is one f32 addition of the same values: exact.
                assert_close(&format!("{name} sum"), &sum, &want_sum, 0.0);
                // f16 output: the reference's value rounded the same way, within 2^-11.
                assert_close(&name, &out, &want, tol);
            }
        }
    }
    // rms_norms: Mamba's dt, B and C segments (and one or two segments), strided rows.
    for widths in [vec![16usize, 4, 4], vec![130, 16, 16], vec![7], vec![33, 1]] {
        let rows = 3;
        let total: usize = widths.iter().sum();
        let x = random(rows * total, Distribution::Normal(0.2, 1.5));
        let ws: Vec<Vec<f32>> = widths
            .iter()
            .map(|&n| random(n, Distribution::Normal(1.0, 0.5)))
            .collect();
        fn run<B: JambaBackend>(x: &[f32], ws: &[Vec<f32>], rows: usize) -> Vec<Vec<f32>> {
            let dev = Default::default();
            let total: usize = ws.iter().map(Vec::len).sum();
            // Rows of `total` inside rows of `total + 5`: a strided view, as narrow gives.
            let mut padded = vec![0.0f32; rows * (total + 5)];
            for r in 0..rows {
                padded[r * (total + 5)..r * (total + 5) + total]
                    .copy_from_slice(&x[r * total..(r + 1) * total]);
            }
            let x = Tensor::<B, 2>::from_data(TensorData::new(padded, [rows, total + 5]), &dev)
                .narrow(1, 0, total);
            let weights = ws
                .iter()
                .map(|w| Tensor::<B, 1>::from_data(TensorData::new(w.clone(), [w.len()]), &dev))
                .collect();
            B::rms_norms(x, weights, 1e-6)
                .into_iter()
                .map(to_f32_vec)
                .collect()
        }
        let want = run::<Ref>(&x, &ws, rows);
        for (label, got) in [
            ("cube", run::<Cube>(&x, &ws, rows)),
            ("fusion", run::<Wgpu>(&x, &ws, rows)),
        ] {
            assert_eq!(got.len(), widths.len(), "{label}: one output per segment");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_close(
                    &format!("{label} rms_norms {widths:?} segment {i}"),
                    g,
                    &TensorData::new(w.clone(), [rows, widths[i]]),
                    1e-5,
                );
            }
        }
    }
    // swiglu_mlp: rows around the decoding kernels' limit (above it the reference runs).
    for (rows, h, i) in [(1, 64, 48), (3, 136, 520), (8, 40, 9), (9, 24, 20)] {
        let x = random(rows * h, Distribution::Normal(0.0, 1.0));
        let g = random(i * h, Distribution::Normal(0.0, 0.3));
        let u = random(i * h, Distribution::Normal(0.0, 0.3));
        let d = random(h * i, Distribution::Normal(0.0, 0.3));
        fn run<B: JambaBackend>(v: [&[f32]; 4], [rows, h, i]: [usize; 3]) -> Tensor<B, 2> {
            let dev = Default::default();
            let t = |v: &[f32], s: [usize; 2]| {
                Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), s), &dev)
            };
            B::swiglu_mlp(
                t(v[0], [rows, h]),
                t(v[1], [i, h]),
                t(v[2], [i, h]),
                t(v[3], [h, i]),
            )
        }
        let v = [&x[..], &g[..], &u[..], &d[..]];
        let s = [rows, h, i];
        let want = data(run::<Ref>(v, s));
        assert_close(
            &format!("cube swiglu_mlp {s:?}"),
            &to_f32_vec(run::<Cube>(v, s)),
            &want,
            1e-4,
        );
        assert_close(
            &format!("fusion swiglu_mlp {s:?}"),
            &to_f32_vec(run::<Wgpu>(v, s)),
            &want,
            1e-4,
        );
    }
}

#[test]
fn mamba_in_proj_step_matches_reference() {
    no_overrides();
    // (rows, hidden, d_inner, conv width): one row with every bias, batch 3 with a channel
    // count that is not a multiple of anything, the decoding limit of 8 rows with width 2 (a
    // state of one input), an odd hidden size (read one element at a time).
    for (rows, h, di, k, bias, conv_bias) in [
        (1, 64, 63, 4, true, true),
        (3, 40, 130, 4, false, true),
        (8, 24, 9, 2, true, false),
        (2, 37, 70, 3, false, false),
    ] {
        let x = random(rows * h, Distribution::Normal(0.0, 1.0));
        let w = random(2 * di * h, Distribution::Normal(0.0, 0.3));
        let b = random(2 * di, Distribution::Normal(0.0, 0.5));
        let state = random(rows * di * (k - 1), Distribution::Normal(0.0, 1.0));
        let cw = random(di * k, Distribution::Normal(0.0, 0.5));
        let cb = random(di, Distribution::Normal(0.0, 0.5));
        type Out = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);
        let run = |backend: &str, dtype: DType| -> Out {
            fn on<B: JambaBackend>(
                v: [&[f32]; 6],
                [rows, h, di, k]: [usize; 4],
                [bias, conv_bias]: [bool; 2],
                dtype: DType,
            ) -> Out {
                let dev = Default::default();
                let t = |v: &[f32]| {
                    Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &dev)
                };
                let state = t(v[3]).reshape([rows, di, k - 1]);
                let (x, z, next) = B::mamba_in_proj_step(MambaInProjStep {
                    x: t(v[0]).reshape([rows, h]).cast(dtype),
                    weight: t(v[1]).reshape([2 * di, h]).cast(dtype),
                    bias: bias.then(|| t(v[2]).cast(dtype)),
                    conv_state: state.clone(),
                    conv_weight: t(v[4]).reshape([di, k]),
                    conv_bias: conv_bias.then(|| t(v[5])),
                });
                assert_eq!((x.dtype(), z.dtype()), (dtype, dtype));
                let v = (to_f32_vec(x), to_f32_vec(z), to_f32_vec(next));
                (v.0, v.1, v.2, to_f32_vec(state))
            }
            let v = [&x[..], &w, &b, &state, &cw, &cb];
            let (s, f) = ([rows, h, di, k], [bias, conv_bias]);
            match backend {
                "ref" => on::<Ref>(v, s, f, dtype),
                "cube" => on::<Cube>(v, s, f, dtype),
                _ => on::<Wgpu>(v, s, f, dtype),
            }
        };
        let (wx, wz, ws, _) = run("ref", DType::F32);
        let (wx, wz, ws) = (
            TensorData::new(wx, [rows, di]),
            TensorData::new(wz, [rows, di]),
            TensorData::new(ws, [rows, di, k - 1]),
        );
        let shape = [rows, h, di, k];
        for label in ["cube", "fusion"] {
            let (x, z, next, kept) = run(label, DType::F32);
            let name = format!("{label} mamba_in_proj_step {shape:?}");
            // f32: the product summed in another order, then the same conv.
            assert_close(&format!("{name} x"), &x, &wx, 1e-4);
            assert_close(&format!("{name} z"), &z, &wz, 1e-4);
            // The state holds in_proj's outputs, shifted: the same values.
            assert_close(&format!("{name} state"), &next, &ws, 1e-4);
            assert_eq!(kept, state, "{name}: a shared conv state was modified");
        }
        // f16 inputs and weights: the reference takes them unrounded, so the difference is
        // the f16 rounding of the inputs, the product and the outputs (2^-11 relative each).
        let (x, z, next, _) = run("fusion", DType::F16);
        let name = format!("f16 mamba_in_proj_step {shape:?}");
        assert_close(&format!("{name} x"), &x, &wx, 1e-2);
        assert_close(&format!("{name} z"), &z, &wz, 1e-2);
        assert_close(&format!("{name} state"), &next, &ws, 1e-2);
    }
}

#[test]
fn moe_router_matches_reference() {
    no_overrides();
    // (tokens, hidden, experts, top_k): Jamba's 16 experts and top-2 for one token; an odd
    // hidden size (short vectors) with top-1; more experts than lavapipe's cube has planes
    // (a plane takes two); every expert chosen.
    for (tokens, h, e, k) in [
        (1, 64, 16, 2),
        (3, 130, 5, 1),
        (8, 40, 33, 4),
        (2, 24, 3, 3),
    ] {
        let x = random(tokens * h, Distribution::Normal(0.0, 1.0));
        let w = random(e * h, Distribution::Normal(0.0, 0.5));
        type Out = (Vec<f32>, Vec<f32>, Vec<i64>);
        fn run<B: JambaBackend>(x: &[f32], w: &[f32], s: [usize; 4], dtype: DType) -> Out {
            let dev = Default::default();
            let [tokens, h, e, k] = s;
            let t = |v: &[f32], shape: [usize; 2]| {
                Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), shape), &dev).cast(dtype)
            };
            let (logits, weights, chosen) = B::moe_router(t(x, [tokens, h]), t(w, [e, h]), k);
            assert_eq!(logits.dtype(), DType::F32, "the logits are f32");
            assert_eq!(weights.dims(), [tokens, k]);
            let chosen = chosen.into_data().convert::<i64>().to_vec().unwrap();
            (to_f32_vec(logits), to_f32_vec(weights), chosen)
        }
        let s = [tokens, h, e, k];
        let (wl, ww, wc) = run::<Ref>(&x, &w, s, DType::F32);
        let (wl, ww) = (
            TensorData::new(wl, [tokens, e]),
            TensorData::new(ww, [tokens, k]),
        );
        for (label, (l, wt, c)) in [
            ("cube", run::<Cube>(&x, &w, s, DType::F32)),
            ("fusion", run::<Wgpu>(&x, &w, s, DType::F32)),
        ] {
            let name = format!("{label} moe_router {s:?}");
            // f32 dot products of at most 130 terms in another order.
            assert_close(&format!("{name} logits"), &l, &wl, 1e-5);
            assert_close(&format!("{name} weights"), &wt, &ww, 1e-5);
            // Random logits have no near-ties: the same experts in the same order.
            assert_eq!(c, wc, "{name}: chosen experts");
        }
        // f16 activations and weights read as they are: against the reference on the rounded
        // values, the same f32 sums.
        let round = |v: &[f32]| -> Vec<f32> {
            v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
        };
        let (rl, rw, rc) = run::<Ref>(&round(&x), &round(&w), s, DType::F32);
        let (l, wt, c) = run::<Wgpu>(&x, &w, s, DType::F16);
        let name = format!("f16 moe_router {s:?}");
        assert_close(
            &format!("{name} logits"),
            &l,
            &TensorData::new(rl, [tokens, e]),
            1e-5,
        );
        assert_close(
            &format!("{name} weights"),
            &wt,
            &TensorData::new(rw, [tokens, k]),
            1e-5,
        );
        assert_eq!(c, rc, "{name}: chosen experts");
    }
}

/// Host copies of one random [`MambaStep`].
struct MambaStepCase {
    /// (batch, d_inner, dt_rank, d_state)
    shape: [usize; 4],
    x: Vec<f32>,
    /// `[batch, 2 d_inner]`: `z` is read as the second half of each row (a strided view, as
    /// the model's `in_proj` output gives it).
    xz: Vec<f32>,
    params: Vec<f32>,
    norms: [Vec<f32>; 3],
    dt_proj: Vec<f32>,
    a: Vec<f32>,
    d: Vec<f32>,
    bias: Option<Vec<f32>>,
    state: Vec<f32>,
    gated: bool,
}

impl MambaStepCase {
    fn new([b, di, r, n]: [usize; 4], gated: bool, biased: bool) -> Self {
        let normal = |len, mean, std| random(len, Distribution::Normal(mean, std));
        Self {
            shape: [b, di, r, n],
            x: normal(b * di, 0.0, 1.0),
            xz: normal(b * 2 * di, 0.0, 1.0),
            params: normal(b * (r + 2 * n), 0.2, 1.5),
            norms: [
                normal(r, 1.0, 0.3),
                normal(n, 1.0, 0.3),
                normal(n, 1.0, 0.3),
            ],
            // dt near the softplus knee, with `1 / sqrt(r)` keeping the sum's scale.
            dt_proj: normal(di * r, 0.0, 1.0 / (r as f64).sqrt()),
            a: random(di * n, Distribution::Uniform(-4.0, -0.1)),
            d: normal(di, 1.0, 0.5),
            bias: biased.then(|| normal(di, -1.0, 1.0)),
            state: normal(b * di * n, 0.0, 1.0),
            gated,
        }
    }

    /// Runs the step with a second reference to the state alive; returns y, the new state, and
    /// the shared state's values afterwards.
    fn run<B: JambaBackend>(&self, dtype: DType) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let dev = Default::default();
        let [b, di, r, n] = self.shape;
        let t2 = |v: &[f32], s: [usize; 2]| {
            Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), s), &dev)
        };
        let t1 =
            |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &dev);
        let state =
            Tensor::<B, 3>::from_data(TensorData::new(self.state.clone(), [b, di, n]), &dev);
        let z = t2(&self.xz, [b, 2 * di]).cast(dtype).narrow(1, di, di);
        let (y, next) = B::mamba_step(MambaStep {
            state: state.clone(),
            x: t2(&self.x, [b, di]).cast(dtype),
            z: self.gated.then_some(z),
            params: t2(&self.params, [b, r + 2 * n]).cast(dtype),
            norms: [0, 1, 2].map(|i| t1(&self.norms[i]).cast(dtype)),
            eps: 1e-6,
            dt_proj: t2(&self.dt_proj, [di, r]).cast(dtype),
            a: t2(&self.a, [di, n]),
            d: t1(&self.d),
            delta_bias: self.bias.as_deref().map(t1),
            delta_softplus: true,
        });
        assert_eq!(y.dtype(), dtype, "y takes x's dtype");
        (to_f32_vec(y), to_f32_vec(next), to_f32_vec(state))
    }
}

#[test]
fn mamba_step_matches_reference() {
    no_overrides();
    // (batch, d_inner, dt_rank, d_state): one channel short of a cube and an odd dt_rank (read
    // one element at a time), batch 3 with dt_rank a multiple of the vector, d_state 1 and 64.
    for (shape, gated, biased) in [
        ([1, 63, 5, 16], true, true),
        ([3, 130, 16, 4], true, false),
        ([2, 70, 8, 64], false, true),
        ([1, 9, 12, 1], false, false),
    ] {
        let case = MambaStepCase::new(shape, gated, biased);
        let [b, di, _, n] = shape;
        let (want_y, want_state, _) = case.run::<Ref>(DType::F32);
        let (want_y, want_state) = (
            TensorData::new(want_y, [b, di]),
            TensorData::new(want_state, [b, di, n]),
        );
        for (label, (y, state, kept)) in [
            ("cube", case.run::<Cube>(DType::F32)),
            ("fusion", case.run::<Wgpu>(DType::F32)),
        ] {
            let name = format!("{label} mamba_step {shape:?} gated={gated} bias={biased}");
            // f32: the same operations as the reference, summed in another order.
            assert_close(&format!("{name} y"), &y, &want_y, 1e-4);
            assert_close(&format!("{name} state"), &state, &want_state, 1e-4);
            assert_eq!(kept, case.state, "{name}: a shared state was modified");
        }
        // f16 activations and weights: the kernel rounds the norms and dt to f16 where the
        // separate operations do; against the f32 reference that is 2^-11 relative per value,
        // amplified at most a few times through the softplus, the exponential and the sums.
        let (y, state, _) = case.run::<Wgpu>(DType::F16);
        let name = format!("f16 mamba_step {shape:?}");
        assert_close(&format!("{name} y"), &y, &want_y, 1e-2);
        assert_close(&format!("{name} state"), &state, &want_state, 1e-2);
    }
}

#[test]
fn decode_attention_matches_reference() {
    no_overrides();
    // (batch, heads, kv heads, cached positions, head_dim): one position, keys fewer than the
    // cube's planes, odd lengths and head sizes (lanes partly idle), a cache read through a
    // capacity longer than its length (strided, as the KV cache gives it).
    for (b, h, kvh, len, hd) in [
        (1, 4, 2, 1, 64),
        (3, 6, 3, 37, 128),
        (2, 4, 1, 513, 80),
        (1, 2, 2, 9, 7),
    ] {
        let q = random(b * h * hd, Distribution::Normal(0.0, 1.0));
        let cap = len + 3;
        let k = random(b * kvh * cap * hd, Distribution::Normal(0.0, 1.0));
        let v = random(b * kvh * cap * hd, Distribution::Normal(0.0, 1.0));
        fn run<B: JambaBackend>(
            q: &[f32],
            k: &[f32],
            v: &[f32],
            [b, h, kvh, len, hd]: [usize; 5],
        ) -> Vec<f32> {
            let dev = Default::default();
            let cap = len + 3;
            let cache = |x: &[f32]| {
                Tensor::<B, 4>::from_data(TensorData::new(x.to_vec(), [b, kvh, cap, hd]), &dev)
            };
            let q = Tensor::<B, 4>::from_data(TensorData::new(q.to_vec(), [b, h, 1, hd]), &dev);
            // The buffers read in place up to `len`, and a view narrowed to it.
            let out = B::decode_attention(q.clone(), cache(k), cache(v), len);
            let narrowed = B::decode_attention(
                q,
                cache(k).narrow(2, 0, len),
                cache(v).narrow(2, 0, len),
                len,
            );
            assert_eq!(out.dims(), [b, h, 1, hd]);
            let out = to_f32_vec(out);
            assert_eq!(out, to_f32_vec(narrowed), "in place and narrowed differ");
            out
        }
        let s = [b, h, kvh, len, hd];
        let want = TensorData::new(run::<Ref>(&q, &k, &v, s), [b, h, 1, hd]);
        for (label, got) in [
            ("cube", run::<Cube>(&q, &k, &v, s)),
            ("fusion", run::<Wgpu>(&q, &k, &v, s)),
        ] {
            // f32 throughout; the online softmax sums in another order than the reference.
            assert_close(
                &format!("{label} decode_attention {s:?}"),
                &got,
                &want,
                1e-5,
            );
        }
    }
}

#[test]
fn decoding_linear_and_experts_match_reference() {
    no_overrides();
    let dev = Default::default();
    // Linear: [rows, k] x [n, k]^T (+ bias), rows around the kernel's limit (8); long rows
    // (several unrolled steps per lane, and few columns: planes split a column), odd lengths
    // (narrower vectors).
    for (rows, k, n) in [
        (1, 64, 33),
        (3, 130, 70),
        (8, 40, 9),
        (9, 70, 17),
        (1, 4096, 5),
        (2, 1030, 300),
        (5, 777, 3),
    ] {
        let x = random(rows * k, Distribution::Normal(0.0, 1.0));
        let w = random(n * k, Distribution::Normal(0.0, 1.0));
        let b = random(n, Distribution::Normal(0.0, 1.0));
        fn run<B: JambaBackend>(
            x: &[f32],
            w: &[f32],
            b: &[f32],
            [rows, k, n]: [usize; 3],
        ) -> Tensor<B, 2> {
            let dev = Default::default();
            <B as JambaBackend>::linear(
                Tensor::from_data(TensorData::new(x.to_vec(), [rows, k]), &dev),
                Tensor::from_data(TensorData::new(w.to_vec(), [n, k]), &dev),
                Some(Tensor::from_data(TensorData::new(b.to_vec(), [n]), &dev)),
            )
        }
        let want = data(run::<Ref>(&x, &w, &b, [rows, k, n]));
        assert_close(
            &format!("cube linear {rows}x{k}x{n}"),
            &to_f32_vec(run::<Cube>(&x, &w, &b, [rows, k, n])),
            &want,
            1e-4,
        );
        assert_close(
            &format!("fusion linear {rows}x{k}x{n}"),
            &to_f32_vec(run::<Wgpu>(&x, &w, &b, [rows, k, n])),
            &want,
            1e-4,
        );
    }
    // Experts: 5 experts, rows routed to two of them; expert 3 gets no row (its weights are
    // filled with NaN: a kernel that read them would poison the output).
    for (rows, (e, h, i)) in [
        (1, (5, 24, 20)),
        (4, (5, 24, 20)),
        (8, (5, 24, 20)),
        (1, (5, 1024, 72)),
        (3, (5, 100, 1030)),
    ] {
        let x = random(rows * h, Distribution::Normal(0.0, 1.0));
        let mut gu = random(e * 2 * i * h, Distribution::Normal(0.0, 0.3));
        let mut down = random(e * h * i, Distribution::Normal(0.0, 0.3));
        let mut weights = vec![0.0f32; rows * e];
        for r in 0..rows {
            let (a, b) = ([0, 1, 2, 4][r % 4], [4, 2, 0, 1][r % 4]);
            weights[r * e + a] = 0.7;
            weights[r * e + b] += 0.3;
        }
        let reference = {
            let t = |v: &Vec<f32>, s: [usize; 3]| {
                Tensor::<Ref, 3>::from_data(TensorData::new(v.clone(), s), &dev)
            };
            reference::moe_experts(
                Tensor::from_data(TensorData::new(x.clone(), [rows, h]), &dev),
                t(&gu, [e, 2 * i, h]),
                t(&down, [e, h, i]),
                Tensor::from_data(TensorData::new(weights.clone(), [rows, e]), &dev),
            )
        };
        let want = data(reference);
        gu[3 * 2 * i * h..4 * 2 * i * h].fill(f32::NAN);
        down[3 * h * i..4 * h * i].fill(f32::NAN);
        fn run<B: JambaBackend>(
            x: &[f32],
            gu: &[f32],
            down: &[f32],
            w: &[f32],
            [rows, e, h, i]: [usize; 4],
        ) -> Vec<f32> {
            let dev = Default::default();
            to_f32_vec(B::moe_experts(
                Tensor::from_data(TensorData::new(x.to_vec(), [rows, h]), &dev),
                Tensor::from_data(TensorData::new(gu.to_vec(), [e, 2 * i, h]), &dev),
                Tensor::from_data(TensorData::new(down.to_vec(), [e, h, i]), &dev),
                Tensor::from_data(TensorData::new(w.to_vec(), [rows, e]), &dev),
            ))
        }
        let s = [rows, e, h, i];
        assert_close(
            &format!("cube experts rows {rows}"),
            &run::<Cube>(&x, &gu, &down, &weights, s),
            &want,
            1e-4,
        );
        assert_close(
            &format!("fusion experts rows {rows}"),
            &run::<Wgpu>(&x, &gu, &down, &weights, s),
            &want,
            1e-4,
        );
    }
}

#[test]
fn linear_f32_reads_half_inputs_and_returns_f32() {
    no_overrides();
    let dev = Default::default();
    for (rows, k, n) in [(1, 2048, 16), (3, 130, 5), (9, 64, 7)] {
        let r16 = |v: Vec<f32>| -> Vec<f32> {
            v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
        };
        let x = r16(random(rows * k, Distribution::Normal(0.0, 1.0)));
        let w = r16(random(n * k, Distribution::Normal(0.0, 0.1)));
        let want = data(<Ref as JambaBackend>::linear(
            Tensor::from_data(TensorData::new(x.clone(), [rows, k]), &dev),
            Tensor::from_data(TensorData::new(w.clone(), [n, k]), &dev),
            None,
        ));
        fn run<B: JambaBackend>(
            x: &[f32],
            w: &[f32],
            [rows, k, n]: [usize; 3],
        ) -> (DType, Vec<f32>) {
            let dev = Default::default();
            let t = |v: &[f32], s: [usize; 2]| {
                Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), s), &dev).cast(DType::F16)
            };
            let y = B::linear_f32(t(x, [rows, k]), t(w, [n, k]));
            (y.dtype(), to_f32_vec(y))
        }
        for (label, (dtype, got)) in [
            ("cube", run::<Cube>(&x, &w, [rows, k, n])),
            ("fusion", run::<Wgpu>(&x, &w, [rows, k, n])),
        ] {
            assert_eq!(dtype, DType::F32, "{label}: the logits are f32");
            // The same f16 values multiplied and summed in f32 (not rounded to f16 after).
            assert_close(
                &format!("{label} linear_f32 {rows}x{k}x{n}"),
                &got,
                &want,
                1e-5,
            );
        }
    }
}

#[test]
fn decoding_linear_dtypes_and_layouts() {
    no_overrides();
    let dev = Default::default();
    let (rows, k, n) = (3, 520, 37);
    let x = random(rows * k, Distribution::Normal(0.0, 1.0));
    let w = random(n * k, Distribution::Normal(0.0, 1.0));
    // The reference on the f16-rounded weight (what every case below reads).
    let w16: Vec<f32> = w.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
    let want = data(<Ref as JambaBackend>::linear(
        Tensor::from_data(TensorData::new(x.clone(), [rows, k]), &dev),
        Tensor::from_data(TensorData::new(w16.clone(), [n, k]), &dev),
        None,
    ));
    /// `dtypes` of x and the weight; the weight stored as `[k, n]` and passed transposed
    /// (strided rows: scalar loads) where `transposed`.
    fn run<B: JambaBackend>(
        x: &[f32],
        w: &[f32],
        [rows, k, n]: [usize; 3],
        dtypes: [DType; 2],
        transposed: bool,
    ) -> (DType, Vec<f32>) {
        let dev = Default::default();
        let x =
            Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), [rows, k]), &dev).cast(dtypes[0]);
        let w = Tensor::<B, 2>::from_data(TensorData::new(w.to_vec(), [n, k]), &dev);
        let w = match transposed {
            true => w.transpose().cast(dtypes[1]).transpose(),
            false => w.cast(dtypes[1]),
        };
        let y = <B as JambaBackend>::linear(x, w, None);
        (y.dtype(), to_f32_vec(y))
    }
    let s = [rows, k, n];
    for (x_dtype, tol) in [(DType::F32, 1e-4), (DType::F16, 5e-3)] {
        for transposed in [false, true] {
            for (label, (dtype, got)) in [
                (
                    "cube",
                    run::<Cube>(&x, &w16, s, [x_dtype, DType::F16], transposed),
                ),
                (
                    "fusion",
                    run::<Wgpu>(&x, &w16, s, [x_dtype, DType::F16], transposed),
                ),
            ] {
                assert_eq!(dtype, x_dtype, "{label}: the output takes x's dtype");
                // f32 x: f32 products of the same f16 weights, summed in another order. f16 x:
                // x and the output rounded to f16 (2^-11 relative each), over 520 terms.
                assert_close(
                    &format!("{label} linear x {x_dtype:?}, weight f16, transposed {transposed}"),
                    &got,
                    &want,
                    tol,
                );
            }
        }
    }
}

/// Host copies of one grouped-MoE problem: `tokens` tokens routed to `top_k` distinct experts
/// each, out of `total` experts of which `experts` (from `first`) are held here.
struct MoeCase {
    tokens: usize,
    top_k: usize,
    experts: usize,
    first: usize,
    hidden: usize,
    inter: usize,
    x: Vec<f32>,
    gate_up: Vec<f32>,
    down: Vec<f32>,
    chosen: Vec<i64>,
    weights: Vec<f32>,
}

impl MoeCase {
    /// `route(t, j)` gives the layer's expert of pair `(t, j)`.
    fn new(
        [tokens, top_k, experts, first, hidden, inter]: [usize; 6],
        route: impl Fn(usize, usize) -> usize,
    ) -> Self {
        let chosen = (0..tokens * top_k)
            .map(|p| route(p / top_k, p % top_k) as i64)
            .collect();
        Self {
            tokens,
            top_k,
            experts,
            first,
            hidden,
            inter,
            x: random(tokens * hidden, Distribution::Normal(0.0, 1.0)),
            gate_up: random(experts * 2 * inter * hidden, Distribution::Normal(0.0, 0.3)),
            down: random(experts * hidden * inter, Distribution::Normal(0.0, 0.3)),
            chosen,
            weights: random(tokens * top_k, Distribution::Uniform(0.05, 1.0)),
        }
    }

    fn input<B: Backend>(&self, dtype: DType) -> MoeInput<B> {
        let dev = Default::default();
        let (n, k, e, h, i) = (
            self.tokens,
            self.top_k,
            self.experts,
            self.hidden,
            self.inter,
        );
        fn f<B: Backend, const D: usize>(
            v: &[f32],
            shape: [usize; D],
            dtype: DType,
        ) -> Tensor<B, D> {
            Tensor::<B, D>::from_data(TensorData::new(v.to_vec(), shape), &Default::default())
                .cast(dtype)
        }
        MoeInput {
            x: f(&self.x, [n, h], dtype),
            gate_up: f(&self.gate_up, [e, 2 * i, h], dtype),
            down: f(&self.down, [e, h, i], dtype),
            chosen: Tensor::<B, 2, Int>::from_data(
                TensorData::new(self.chosen.clone(), [n, k]),
                &dev,
            ),
            weights: f(&self.weights, [n, k], dtype),
            first: self.first,
        }
    }
}

fn moe_cases() -> Vec<(&'static str, MoeCase)> {
    // A fixed scramble so that every expert gets an uneven share.
    let spread = |e: usize| move |t: usize, j: usize| (t * 7 + j * 3 + t / 5) % e;
    vec![
        // One token, top-1, three experts (tiny-b's routing).
        ("n1 k1 e3", MoeCase::new([1, 1, 3, 0, 24, 20], spread(3))),
        // Odd sizes: partial row and column tiles everywhere.
        (
            "n37 k2 e5 h70 i33",
            MoeCase::new([37, 2, 5, 0, 70, 33], spread(5)),
        ),
        // 600 pairs (three routing blocks) on three of four experts (300, 200, 100 pairs: several
        // row tiles per expert), expert 0 empty.
        (
            "n300 k2 e4 uneven",
            MoeCase::new([300, 2, 4, 0, 40, 70], |t, j| {
                if j == 0 {
                    2
                } else {
                    (t % 3 == 0) as usize * 2 + 1
                }
            }),
        ),
        // Every token on one expert (top-1): five row tiles of one expert, the others empty.
        (
            "n300 k1 e4 all on one",
            MoeCase::new([300, 1, 4, 0, 40, 70], |_, _| 2),
        ),
        // Expert parallelism: experts 2..5 of 8 held here, the other pairs skipped.
        (
            "n70 k2 e3 of 8 from 2",
            MoeCase::new([70, 2, 3, 2, 33, 17], spread(8)),
        ),
        // 2200 pairs: each expert's block through Burn's matmul (`PER_EXPERT_PAIRS`), one
        // expert without a row, experts held from an offset.
        (
            "n1100 k2 e4 of 6 from 1, per-expert matmuls",
            MoeCase::new([1100, 2, 4, 1, 24, 20], |t, j| {
                [0, 2, 3, 5, 4, 2][(t + 3 * j) % 6]
            }),
        ),
        // Decoding sizes (the kernels that read only the routed experts), expert-parallel.
        (
            "n4 k2 e3 of 6 from 3",
            MoeCase::new([4, 2, 3, 3, 40, 24], spread(6)),
        ),
    ]
}

fn moe_reference(case: &MoeCase, dtype: DType) -> TensorData {
    // The reference sees the inputs rounded to `dtype` (on wgpu: ndarray has no f16), in f32.
    let rounded = case.input::<Wgpu>(dtype);
    let dev = Default::default();
    data(reference::moe_grouped(MoeInput::<Ref> {
        x: Tensor::from_data(data(rounded.x), &dev),
        gate_up: Tensor::from_data(data(rounded.gate_up), &dev),
        down: Tensor::from_data(data(rounded.down), &dev),
        chosen: Tensor::from_data(rounded.chosen.into_data(), &dev),
        weights: Tensor::from_data(data(rounded.weights), &dev),
        first: case.first,
    }))
}

#[test]
fn grouped_experts_match_reference() {
    no_overrides();
    for (name, case) in moe_cases() {
        let want = moe_reference(&case, DType::F32);
        let cube = Cube::moe_grouped(case.input::<Cube>(DType::F32));
        assert_close(&format!("cube moe {name}"), &to_f32_vec(cube), &want, 1e-4);
        let fused = Wgpu::moe_grouped(case.input::<Wgpu>(DType::F32));
        assert_close(
            &format!("fusion moe {name}"),
            &to_f32_vec(fused),
            &want,
            1e-4,
        );
    }
    for (name, case) in moe_cases() {
        let want = moe_reference(&case, DType::F16);
        let ours = Wgpu::moe_grouped(case.input::<Wgpu>(DType::F16));
        assert_eq!(ours.dtype(), DType::F16);
        assert_close(&format!("f16 moe {name}"), &to_f32_vec(ours), &want, 1e-2);
        // The router's weights as the model passes them: f32 beside f16 activations, rounded
        // to f16 where they are used, so the same result as f16 weights.
        let ours = Wgpu::moe_grouped(MoeInput {
            weights: case.input::<Wgpu>(DType::F32).weights,
            ..case.input::<Wgpu>(DType::F16)
        });
        assert_close(
            &format!("f16 moe {name}, f32 weights"),
            &to_f32_vec(ours),
            &want,
            1e-2,
        );
    }
}

/// Gradients of `sum(out * w)` w.r.t. `x`, both expert tensors and the routing weights: the
/// kernels' backward against Burn's autodiff of the reference on ndarray.
fn moe_grads<A: burn::tensor::backend::AutodiffBackend + JambaBackend>(
    case: &MoeCase,
    w: &[f32],
) -> Vec<(&'static str, TensorData)> {
    let dev = Default::default();
    let input = case.input::<A>(DType::F32);
    let input = MoeInput {
        x: input.x.require_grad(),
        gate_up: input.gate_up.require_grad(),
        down: input.down.require_grad(),
        weights: input.weights.require_grad(),
        ..input
    };
    let keep = input.clone();
    let out = A::moe_grouped(input);
    let w = Tensor::<A, 2>::from_data(
        TensorData::new(w.to_vec(), [case.tokens, case.hidden]),
        &dev,
    );
    let grads = (out * w).sum().backward();
    vec![
        ("x", data(keep.x.grad(&grads).expect("x gradient"))),
        (
            "gate_up",
            data(keep.gate_up.grad(&grads).expect("gate_up gradient")),
        ),
        ("down", data(keep.down.grad(&grads).expect("down gradient"))),
        (
            "weights",
            data(keep.weights.grad(&grads).expect("weights gradient")),
        ),
    ]
}

#[test]
fn grouped_experts_gradients_match_reference() {
    no_overrides();
    for (name, case) in moe_cases() {
        let w = random(case.tokens * case.hidden, Distribution::Normal(0.0, 1.0));
        let want = moe_grads::<Autodiff<Ref>>(&case, &w);
        for (backend, got) in [
            ("cube", moe_grads::<Autodiff<Cube>>(&case, &w)),
            ("fusion", moe_grads::<Autodiff<Wgpu>>(&case, &w)),
        ] {
            for ((key, g), (_, r)) in got.into_iter().zip(&want) {
                assert_close(
                    &format!("{backend} moe {name} grad {key}"),
                    &g.to_vec::<f32>().unwrap(),
                    r,
                    1e-4,
                );
            }
        }
    }
}

#[test]
fn router_softmax_top_k_matches_reference() {
    no_overrides();
    for (tokens, experts, top_k) in [(1, 3, 1), (37, 16, 2), (300, 5, 3), (9, 130, 4)] {
        let logits = random(tokens * experts, Distribution::Normal(0.0, 2.0));
        fn run<B: JambaBackend>(l: &[f32], shape: [usize; 2], k: usize) -> (Vec<f32>, Vec<i64>) {
            let (w, c) = B::moe_route(
                Tensor::from_data(TensorData::new(l.to_vec(), shape), &Default::default()),
                k,
            );
            (
                to_f32_vec(w),
                c.into_data().convert::<i64>().to_vec().unwrap(),
            )
        }
        let shape = [tokens, experts];
        let (want_w, want_c) = run::<Ref>(&logits, shape, top_k);
        for (name, (w, c)) in [
            ("cube", run::<Cube>(&logits, shape, top_k)),
            ("fusion", run::<Wgpu>(&logits, shape, top_k)),
        ] {
            assert_eq!(c, want_c, "{name} router indices {shape:?} top-{top_k}");
            assert_close(
                &format!("{name} router weights {shape:?} top-{top_k}"),
                &w,
                &TensorData::new(want_w.clone(), [tokens, top_k]),
                1e-6,
            );
        }
    }
}

/// Causal flash attention (the portable kernel on lavapipe: one unit per query row) against the
/// f32 reference on the same inputs (f16-rounded for the f16 runs), with shared KV heads
/// (grouped queries), queries after cached positions (`len_q < len_k`), a query tile that is
/// not full, and the model's strided queries. f32: both sides accumulate in f32 over at most
/// 257 keys and 64 dimensions, in a different order: 1e-4 of the scale. f16: the reference's
/// scores are rounded to f16 by its matmul and its output to f16 (2^-11 relative): 1e-2.
#[test]
fn causal_attention_matches_reference() {
    no_overrides();
    let dev = Default::default();
    // (batch, heads, kv_heads, len_q, len_k, head_dim, strided q)
    for (batch, heads, kv_heads, len_q, len_k, head_dim, strided) in [
        (1, 1, 1, 1, 1, 8, false),
        (2, 3, 3, 7, 7, 16, true),
        (1, 4, 2, 33, 33, 64, false),
        (3, 2, 1, 130, 130, 32, true),
        (1, 2, 2, 65, 200, 16, false),
        (2, 4, 1, 1, 9, 32, false),
        (1, 2, 1, 257, 257, 48, false),
    ] {
        let q_shape = [batch, heads, len_q, head_dim];
        let kv_shape = [batch, kv_heads, len_k, head_dim];
        let name = format!("attention q {q_shape:?} kv {kv_shape:?} strided {strided}");
        let q = random(q_shape.iter().product(), Distribution::Normal(0.0, 1.0));
        let k = random(kv_shape.iter().product(), Distribution::Normal(0.0, 1.0));
        let v = random(kv_shape.iter().product(), Distribution::Normal(0.0, 1.0));
        for dtype in [DType::F32, DType::F16] {
            // The inputs in `dtype` on the kernels' backend, and the same values in f32 on ndarray.
            let on = |x: &[f32], shape: [usize; 4], transposed: bool| {
                let t = match transposed {
                    // `[batch, len, heads, head_dim]` in memory, as the model's projections give.
                    true => {
                        let [b, h, l, d] = shape;
                        let mut blhd = vec![0.0f32; x.len()];
                        for (i, &value) in x.iter().enumerate() {
                            let (bi, hi, li, di) =
                                (i / (h * l * d), i / (l * d) % h, i / d % l, i % d);
                            blhd[((bi * l + li) * h + hi) * d + di] = value;
                        }
                        Tensor::<Cube, 4>::from_data(
                            TensorData::new(blhd, [b, l, h, d]),
                            &Default::default(),
                        )
                        .swap_dims(1, 2)
                    }
                    false => Tensor::<Cube, 4>::from_data(
                        TensorData::new(x.to_vec(), shape),
                        &Default::default(),
                    ),
                };
                t.cast(dtype)
            };
            let (qc, kc, vc) = (
                on(&q, q_shape, strided),
                on(&k, kv_shape, false),
                on(&v, kv_shape, false),
            );
            let back = |t: &Tensor<Cube, 4>| -> Tensor<Ref, 4> {
                let shape = t.dims();
                Tensor::from_data(TensorData::new(to_f32_vec(t.clone()), shape), &dev)
            };
            let want = data(reference::causal_attention(back(&qc), back(&kc), back(&vc)));
            let got = jamba_kernels::cube::flash_attention(&qc, &kc, &vc)
                .unwrap_or_else(|| panic!("{name}: no flash kernel took the inputs"));
            assert_eq!(got.dtype(), dtype);
            assert_eq!(got.dims(), q_shape);
            let tol = if dtype == DType::F32 { 1e-4 } else { 1e-2 };
            assert_close(
                &format!("cube {name} {dtype:?}"),
                &to_f32_vec(got),
                &want,
                tol,
            );
        }
    }
}

/// The causal softmax between the two products of the attention through cuBLAS (which itself
/// runs only on CUDA) against a loop in f64: every row's softmax over the keys its query sees,
/// exactly 0 past them. Rows up to 513 keys (two and a fraction strides of the cube), one key,
/// queries after cached positions (`first_visible > 1`), scores of magnitude 30 (the online
/// maximum's rescaling). f32 within 1e-5 (one rounding per term of the sum); f16 output within
/// 1e-3 (probabilities at most 1, rounded to 2^-11 relative).
#[test]
fn causal_softmax_matches_loop() {
    no_overrides();
    // (heads, rows per head, keys, first_visible, score scale)
    for (heads, rows, keys, first, scale) in [
        (1, 1, 1, 1, 1.0f32),
        (3, 7, 7, 1, 1.0),
        (2, 5, 300, 296, 30.0),
        (1, 33, 513, 481, 4.0),
        (2, 9, 40, 1, 4.0),
    ] {
        let x: Vec<f32> = random(heads * rows * keys, Distribution::Normal(0.0, 1.0))
            .into_iter()
            .map(|v| v * scale)
            .collect();
        let mut want = vec![0.0f32; x.len()];
        for r in 0..heads * rows {
            let visible = (first + r % rows).min(keys);
            let row = &x[r * keys..(r + 1) * keys];
            let m = row[..visible]
                .iter()
                .fold(f64::MIN, |m, &v| m.max(v as f64));
            let sum: f64 = row[..visible].iter().map(|&v| (v as f64 - m).exp()).sum();
            for j in 0..visible {
                want[r * keys + j] = ((row[j] as f64 - m).exp() / sum) as f32;
            }
        }
        let want = TensorData::new(want, [heads * rows * keys]);
        for dtype in [DType::F32, DType::F16] {
            let name =
                format!("causal softmax [{heads}, {rows}, {keys}] from {first} x{scale} {dtype:?}");
            let scores = Tensor::<Cube, 3>::from_data(
                TensorData::new(x.clone(), [heads, rows, keys]),
                &Default::default(),
            );
            let got = jamba_kernels::cube::attention::causal_softmax(scores, first, dtype);
            assert_eq!(got.dtype(), dtype);
            let got = to_f32_vec(got);
            for r in 0..heads * rows {
                let visible = (first + r % rows).min(keys);
                assert!(
                    got[r * keys + visible..(r + 1) * keys]
                        .iter()
                        .all(|&p| p == 0.0),
                    "{name}: row {r} has weight past its {visible} visible keys"
                );
            }
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-3 };
            assert_close(&name, &got, &want, tol);
        }
    }
}

/// The reference itself against a scalar loop over positions: grouped queries and queries
/// after cached positions see exactly keys `0..=len_k - len_q + i` of KV head `h / groups`.
#[test]
fn causal_attention_reference_is_causal_over_shared_heads() {
    let dev = Default::default();
    let (batch, heads, kv_heads, len_q, len_k, hd) = (2, 4, 2, 3, 5, 4);
    let q = random(batch * heads * len_q * hd, Distribution::Normal(0.0, 1.0));
    let k = random(
        batch * kv_heads * len_k * hd,
        Distribution::Normal(0.0, 1.0),
    );
    let v = random(
        batch * kv_heads * len_k * hd,
        Distribution::Normal(0.0, 1.0),
    );
    let t = |x: &[f32], shape: [usize; 4]| {
        Tensor::<Ref, 4>::from_data(TensorData::new(x.to_vec(), shape), &dev)
    };
    let got = to_f32_vec(reference::causal_attention(
        t(&q, [batch, heads, len_q, hd]),
        t(&k, [batch, kv_heads, len_k, hd]),
        t(&v, [batch, kv_heads, len_k, hd]),
    ));
    let mut want = vec![0.0f32; got.len()];
    for b in 0..batch {
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            for i in 0..len_q {
                let qi = &q[((b * heads + h) * len_q + i) * hd..][..hd];
                let seen = len_k - len_q + i + 1;
                let scores: Vec<f32> = (0..seen)
                    .map(|j| {
                        let kj = &k[((b * kv_heads + kvh) * len_k + j) * hd..][..hd];
                        qi.iter().zip(kj).map(|(a, c)| a * c).sum::<f32>() / (hd as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::MIN, f32::max);
                let sum: f32 = scores.iter().map(|s| (s - max).exp()).sum();
                for d in 0..hd {
                    want[((b * heads + h) * len_q + i) * hd + d] = (0..seen)
                        .map(|j| {
                            (scores[j] - max).exp() / sum
                                * v[((b * kv_heads + kvh) * len_k + j) * hd + d]
                        })
                        .sum();
                }
            }
        }
    }
    let shape = [batch, heads, len_q, hd];
    assert_close(
        "reference attention",
        &got,
        &TensorData::new(want, shape),
        1e-5,
    );
}
