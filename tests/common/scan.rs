//! Random selective-scan problems and their checks against the tensor-op reference on ndarray,
//! shared by the kernel tests (`kernels.rs`, `kernel_choices.rs`). Tolerances as stated there:
//! f32 1e-4 of the scale, f16 1e-2.

#![allow(dead_code)]

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{backend::Backend, DType, Distribution, Tensor, TensorData};
use jamba_kernels::{reference, JambaBackend, SelectiveScanInput};

use crate::common::{assert_close, to_f32_vec};

type Ref = NdArray<f32>;

/// `n` values drawn from `dist` on ndarray.
pub fn random(n: usize, dist: Distribution) -> Vec<f32> {
    Tensor::<Ref, 1>::random([n], dist, &Default::default())
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

/// `t` as f32 data on the host.
pub fn data<B: Backend, const D: usize>(t: Tensor<B, D>) -> TensorData {
    t.cast(DType::F32).into_data().convert::<f32>()
}

/// Host copies of one random scan problem.
#[derive(Clone)]
pub struct ScanCase {
    pub batch: usize,
    pub d_inner: usize,
    pub len: usize,
    pub d_state: usize,
    pub u: Vec<f32>,
    pub delta: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub c: Vec<f32>,
    pub d: Vec<f32>,
    pub z: Option<Vec<f32>>,
    pub delta_bias: Option<Vec<f32>>,
    pub initial_state: Option<Vec<f32>>,
    /// Store activations channel-last (`[batch, len, d]` seen as `[batch, d, len]`), as the
    /// model does.
    pub channel_last: bool,
}

/// `[batch, rows, cols]` -> `[batch, cols, rows]`.
pub fn transpose(v: &[f32], batch: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for b in 0..batch {
        for r in 0..rows {
            for c in 0..cols {
                out[(b * cols + c) * rows + r] = v[(b * rows + r) * cols + c];
            }
        }
    }
    out
}

impl ScanCase {
    pub fn new(batch: usize, d_inner: usize, len: usize, d_state: usize) -> Self {
        let normal = Distribution::Normal(0.0, 1.0);
        Self {
            batch,
            d_inner,
            len,
            d_state,
            u: random(batch * d_inner * len, normal),
            delta: random(batch * d_inner * len, Distribution::Normal(-1.0, 1.5)),
            a: random(d_inner * d_state, Distribution::Uniform(-4.0, -0.05)),
            b: random(batch * d_state * len, normal),
            c: random(batch * d_state * len, normal),
            d: random(d_inner, normal),
            z: Some(random(batch * d_inner * len, normal)),
            delta_bias: Some(random(d_inner, Distribution::Uniform(-2.0, 0.5))),
            initial_state: None,
            channel_last: false,
        }
    }

    pub fn with_state(mut self) -> Self {
        self.initial_state = Some(random(
            self.batch * self.d_inner * self.d_state,
            Distribution::Normal(0.0, 1.0),
        ));
        self
    }

    pub fn bare(mut self) -> Self {
        self.z = None;
        self.delta_bias = None;
        self
    }

    pub fn channel_last(mut self) -> Self {
        self.channel_last = true;
        self
    }

    /// `[batch, d, len]` activation, stored as asked.
    fn act<B: Backend>(
        &self,
        v: &[f32],
        rows: usize,
        dev: &B::Device,
        dtype: DType,
    ) -> Tensor<B, 3> {
        let t = if self.channel_last {
            Tensor::<B, 3>::from_data(
                TensorData::new(
                    transpose(v, self.batch, rows, self.len),
                    [self.batch, self.len, rows],
                ),
                dev,
            )
            .swap_dims(1, 2)
        } else {
            Tensor::<B, 3>::from_data(
                TensorData::new(v.to_vec(), [self.batch, rows, self.len]),
                dev,
            )
        };
        t.cast(dtype)
    }

    pub fn input<B: Backend>(&self, dev: &B::Device, dtype: DType) -> SelectiveScanInput<B> {
        let (bs, di, n) = (self.batch, self.d_inner, self.d_state);
        let vec1 =
            |v: &Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v.clone(), [v.len()]), dev);
        SelectiveScanInput {
            u: self.act(&self.u, di, dev, dtype),
            delta: self.act(&self.delta, di, dev, dtype),
            a: Tensor::from_data(TensorData::new(self.a.clone(), [di, n]), dev),
            b: self.act(&self.b, n, dev, dtype),
            c: self.act(&self.c, n, dev, dtype),
            d: vec1(&self.d),
            z: self.z.as_ref().map(|z| self.act(z, di, dev, dtype)),
            delta_bias: self.delta_bias.as_ref().map(vec1),
            delta_softplus: true,
            initial_state: self
                .initial_state
                .as_ref()
                .map(|s| Tensor::from_data(TensorData::new(s.clone(), [bs, di, n]), dev)),
        }
    }
}

/// Forward on `B` against the reference on ndarray, for inputs rounded to `dtype`.
pub fn check_scan_forward<B: JambaBackend>(name: &str, case: &ScanCase, dtype: DType, tol: f32) {
    let dev = Default::default();
    let ours = B::selective_scan(case.input::<B>(&dev, dtype));
    // The reference sees the same rounded inputs, computed in f32.
    let rounded = case.input::<B>(&dev, dtype);
    let ref_input = SelectiveScanInput::<Ref> {
        u: Tensor::from_data(data(rounded.u), &Default::default()),
        delta: Tensor::from_data(data(rounded.delta), &Default::default()),
        b: Tensor::from_data(data(rounded.b), &Default::default()),
        c: Tensor::from_data(data(rounded.c), &Default::default()),
        z: rounded
            .z
            .map(|z| Tensor::from_data(data(z), &Default::default())),
        ..case.input::<Ref>(&Default::default(), DType::F32)
    };
    let want = reference::selective_scan(ref_input);
    assert_eq!(ours.y.dtype(), dtype, "{name}: y keeps the input dtype");
    assert_close(
        &format!("{name} y"),
        &to_f32_vec(ours.y),
        &data(want.y),
        tol,
    );
    assert_close(
        &format!("{name} last_state"),
        &to_f32_vec(ours.last_state),
        &data(want.last_state),
        tol,
    );
}

pub fn scan_cases() -> Vec<(&'static str, ScanCase)> {
    vec![
        ("b3 d37 l513 n16", ScanCase::new(3, 37, 513, 16)),
        (
            "b3 d70 l7 n64 state",
            ScanCase::new(3, 70, 7, 64).with_state(),
        ),
        ("b2 d5 l1 n1 bare", ScanCase::new(2, 5, 1, 1).bare()),
        (
            "b1 d65 l40 n16 state bare",
            ScanCase::new(1, 65, 40, 16).with_state().bare(),
        ),
        (
            "b3 d33 l129 n16 channel-last",
            ScanCase::new(3, 33, 129, 16).channel_last(),
        ),
        (
            "b1 d9 l33 n256 state",
            ScanCase::new(1, 9, 33, 256).with_state(),
        ),
        (
            "b2 d270 l45 n16 state",
            ScanCase::new(2, 270, 45, 16).with_state(),
        ),
        // Several tiles of every forward kernel (at most 1024 positions per tile), the last
        // one partial.
        (
            "b2 d11 l2100 n16 state channel-last",
            ScanCase::new(2, 11, 2100, 16).with_state().channel_last(),
        ),
    ]
}

/// Gradients of `sum(y * w)` through the kernels' backward against Burn's autodiff of the
/// reference on ndarray.
pub fn check_scan_grads<B: JambaBackend + burn::tensor::backend::AutodiffBackend>(
    name: &str,
    case: &ScanCase,
) where
    B::InnerBackend: JambaBackend,
{
    let w = random(
        case.batch * case.d_inner * case.len,
        Distribution::Normal(0.0, 1.0),
    );
    let shape = [case.batch, case.d_inner, case.len];

    fn grads_of<A: burn::tensor::backend::AutodiffBackend + JambaBackend>(
        case: &ScanCase,
        w: &[f32],
        shape: [usize; 3],
    ) -> Vec<(String, TensorData)> {
        let dev = Default::default();
        let input = case.input::<A>(&dev, DType::F32);
        let input = SelectiveScanInput {
            u: input.u.require_grad(),
            delta: input.delta.require_grad(),
            a: input.a.require_grad(),
            b: input.b.require_grad(),
            c: input.c.require_grad(),
            d: input.d.require_grad(),
            z: input.z.map(|t| t.require_grad()),
            delta_bias: input.delta_bias.map(|t| t.require_grad()),
            initial_state: input.initial_state.map(|t| t.require_grad()),
            ..input
        };
        let keep = input.clone();
        let y = A::selective_scan(input).y;
        let w = Tensor::<A, 3>::from_data(TensorData::new(w.to_vec(), shape), &dev);
        let grads = (y * w).sum().backward();
        let g3 = |t: &Tensor<A, 3>| data(t.grad(&grads).expect("gradient"));
        let g2 = |t: &Tensor<A, 2>| data(t.grad(&grads).expect("gradient"));
        let g1 = |t: &Tensor<A, 1>| data(t.grad(&grads).expect("gradient"));
        let mut out = vec![
            ("u".to_string(), g3(&keep.u)),
            ("delta".to_string(), g3(&keep.delta)),
            ("A".to_string(), g2(&keep.a)),
            ("B".to_string(), g3(&keep.b)),
            ("C".to_string(), g3(&keep.c)),
            ("D".to_string(), g1(&keep.d)),
        ];
        if let Some(z) = &keep.z {
            out.push(("z".into(), g3(z)));
        }
        if let Some(b) = &keep.delta_bias {
            out.push(("delta_bias".into(), g1(b)));
        }
        if let Some(s) = &keep.initial_state {
            out.push(("initial_state".into(), g3(s)));
        }
        out
    }

    let want = grads_of::<Autodiff<Ref>>(case, &w, shape);
    let got = grads_of::<B>(case, &w, shape);
    assert_eq!(want.len(), got.len());
    for ((key, g), (_, r)) in got.into_iter().zip(want) {
        assert_close(
            &format!("{name} grad {key}"),
            &g.to_vec::<f32>().unwrap(),
            &r,
            1e-4,
        );
    }
}
