//! Tensor-op implementations of the Mamba operations: the semantics every kernel must reproduce.
//!
//! They follow `selective_scan_ref` (state-spaces/mamba) and `causal_conv1d_ref`
//! (Dao-AILab/causal-conv1d) literally, with the state and all accumulation in f32 whatever the
//! input dtype. They run on any backend, including `Autodiff<B>`, which differentiates them.

use burn::tensor::{activation, backend::Backend, Bool, DType, Int, Tensor};

use crate::{
    CausalConv1dInput, CausalConv1dUpdate, JambaBackend, MambaInProjStep, MambaStep,
    SelectiveScanInput, SelectiveScanOutput, SelectiveStateUpdate,
};

/// Positions whose `[batch, d_inner, chunk, d_state]` discretised terms are built at once.
///
/// Bounds the scan's scratch memory by the chunk instead of the sequence length.
const SCAN_CHUNK: usize = 128;

/// `softplus` with PyTorch's threshold: `x` above 20, `log1p(exp(x))` below.
///
/// Burn's `softplus` has no threshold and overflows to infinity for large inputs.
pub fn softplus<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let above = x.clone().greater_elem(20.0);
    let soft = x.clone().clamp_max(20.0).exp().log1p();
    soft.mask_where(above, x)
}

/// Sequential selective scan: `h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t`, `y_t = C_t . h_t + D u_t`,
/// gated by `silu(z)`.
pub fn selective_scan<B: Backend>(input: SelectiveScanInput<B>) -> SelectiveScanOutput<B> {
    let SelectiveScanInput {
        u,
        delta,
        a,
        b,
        c,
        d,
        z,
        delta_bias,
        delta_softplus,
        initial_state,
    } = input;
    let out_dtype = u.dtype();
    let [batch, d_inner, len] = u.dims();
    let d_state = a.dims()[1];
    let device = u.device();
    let f32 = DType::F32;

    let u = u.cast(f32);
    let mut delta = delta.cast(f32);
    if let Some(bias) = delta_bias {
        delta = delta + bias.cast(f32).reshape([1, d_inner, 1]);
    }
    if delta_softplus {
        delta = softplus(delta);
    }
    let a = a.cast(f32).reshape([1, d_inner, 1, d_state]);
    let b = b.cast(f32);
    let c = c.cast(f32);

    let mut state = match initial_state {
        Some(s) => s.cast(f32),
        None => Tensor::zeros([batch, d_inner, d_state], (&device, f32)),
    };
    let delta_u = delta.clone() * u.clone();
    let mut ys = Vec::with_capacity(len);
    let mut start = 0;
    while start < len {
        let n = SCAN_CHUNK.min(len - start);
        // [batch, d_inner, n, d_state]
        let delta_a = (delta.clone().narrow(2, start, n).unsqueeze_dim::<4>(3) * a.clone()).exp();
        // [batch, n, d_state] -> broadcast over d_inner later
        let b_chunk = b.clone().narrow(2, start, n).swap_dims(1, 2);
        let c_chunk = c.clone().narrow(2, start, n).swap_dims(1, 2);
        let du_chunk = delta_u.clone().narrow(2, start, n);
        for t in 0..n {
            let da = delta_a
                .clone()
                .narrow(2, t, 1)
                .reshape([batch, d_inner, d_state]);
            let bt = b_chunk.clone().narrow(1, t, 1); // [batch, 1, d_state]
            let ct = c_chunk.clone().narrow(1, t, 1);
            let dut = du_chunk.clone().narrow(2, t, 1); // [batch, d_inner, 1]
            state = state * da + dut * bt;
            ys.push((state.clone() * ct).sum_dim(2)); // [batch, d_inner, 1]
        }
        start += n;
    }
    let mut y = Tensor::cat(ys, 2) + u.clone() * d.cast(f32).reshape([1, d_inner, 1]);
    if let Some(z) = z {
        y = y * activation::silu(z.cast(f32));
    }
    SelectiveScanOutput {
        y: y.cast(out_dtype),
        last_state: state,
    }
}

/// Depthwise causal convolution: `y[t] = bias + sum_k w[k] * x[t - (K-1) + k]`, with the inputs
/// before `x` taken from `initial_state` (zeros when absent), then optional SiLU.
pub fn causal_conv1d<B: Backend>(input: CausalConv1dInput<B>) -> Tensor<B, 3> {
    let CausalConv1dInput {
        x,
        weight,
        bias,
        initial_state,
        silu,
    } = input;
    let [batch, channels, len] = x.dims();
    let width = weight.dims()[1];
    let dtype = x.dtype();
    let f32 = DType::F32;
    let x = x.cast(f32);
    let padded = if width > 1 {
        let prefix = match initial_state {
            Some(s) => s.cast(f32),
            None => Tensor::zeros([batch, channels, width - 1], (&x.device(), f32)),
        };
        Tensor::cat(vec![prefix, x], 2)
    } else {
        x
    };
    let weight = weight.cast(f32);
    let mut y =
        padded.clone().narrow(2, 0, len) * weight.clone().narrow(1, 0, 1).reshape([1, channels, 1]);
    for k in 1..width {
        y = y + padded.clone().narrow(2, k, len)
            * weight.clone().narrow(1, k, 1).reshape([1, channels, 1]);
    }
    if let Some(bias) = bias {
        y = y + bias.cast(f32).reshape([1, channels, 1]);
    }
    if silu {
        y = activation::silu(y);
    }
    y.cast(dtype)
}

/// Every expert on every row, weighted (see `JambaBackend::moe_experts`): one pair of 2-D
/// matmuls per expert, the operations of the grouped path. (A single batched matmul over all
/// experts hit an illegal memory access on CUDA (H200) for the `tiny-b` fixture's shapes; the
/// cause inside CubeCL was not isolated.)
pub fn moe_experts<B: Backend>(
    x: Tensor<B, 2>,
    gate_up: Tensor<B, 3>,
    down: Tensor<B, 3>,
    weights: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let [e, two_i, h] = gate_up.dims();
    let i = two_i / 2;
    let [n, _] = x.dims();
    let weights = weights.cast(x.dtype());
    let mut out = Tensor::<B, 2>::zeros([n, h], (&x.device(), x.dtype()));
    for k in 0..e {
        let gu = x.clone().matmul(
            gate_up
                .clone()
                .narrow(0, k, 1)
                .reshape([two_i, h])
                .transpose(),
        ); // [n, 2I]
        let act = activation::silu(gu.clone().narrow(1, 0, i)) * gu.narrow(1, i, i);
        let y = act.matmul(down.clone().narrow(0, k, 1).reshape([h, i]).transpose()); // [n, H]
                                                                                      // An explicit expand: a broadcast multiply is mis-fused on wgpu in Burn 0.21.
        out = out + y * weights.clone().narrow(1, k, 1).expand([n, h]);
    }
    out
}

/// The router through `B`'s [`JambaBackend::linear_f32`] and [`JambaBackend::moe_route`].
pub fn moe_router<B: JambaBackend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    top_k: usize,
) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2, Int>) {
    let logits = B::linear_f32(x, weight);
    let (weights, chosen) = B::moe_route(logits.clone(), top_k);
    (logits, weights, chosen)
}

/// Softmax over the experts, then the `top_k` largest probabilities and their indices.
pub fn moe_route<B: Backend>(
    logits: Tensor<B, 2>,
    top_k: usize,
) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    activation::softmax(logits, 1).topk_with_indices(top_k, 1)
}

/// The routing weights as a dense `[tokens, experts]` matrix: `weights[t, j]` at column
/// `chosen[t, j] - first`, zero elsewhere (and for pairs outside `first..first + experts`).
/// Built by comparison with the expert indices rather than a scatter: CubeCL's scatter faults
/// on CUDA for some small shapes (3 experts, top-1).
pub fn dense_routing<B: Backend>(
    chosen: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    first: usize,
    experts: usize,
) -> Tensor<B, 2> {
    let [tokens, k] = chosen.dims();
    let ids = Tensor::<B, 1, Int>::arange(first as i64..(first + experts) as i64, &chosen.device())
        .reshape([1, 1, experts])
        .expand([tokens, k, experts]);
    let one_hot = chosen
        .reshape([tokens, k, 1])
        .expand([tokens, k, experts])
        .equal(ids)
        .float()
        .cast(weights.dtype());
    (one_hot * weights.reshape([tokens, k, 1]).expand([tokens, k, experts]))
        .sum_dim(1)
        .reshape([tokens, experts])
}

/// The grouped MoE (see `JambaBackend::moe_grouped`) as every expert on every token, weighted
/// by the dense routing matrix: the oracle of the kernels, differentiable by Burn.
pub fn moe_grouped<B: Backend>(input: crate::MoeInput<B>) -> Tensor<B, 2> {
    let experts = input.gate_up.dims()[0];
    let dense = dense_routing(
        input.chosen,
        input.weights.cast(input.x.dtype()),
        input.first,
        experts,
    );
    moe_experts(input.x, input.gate_up, input.down, dense)
}

/// RMSNorm over the last dimension in f32, cast to the weight's dtype, then scaled.
pub fn rms_norm<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    let x = x.cast(DType::F32);
    let var = x.clone().square().mean_dim(1);
    let y = x * var.add_scalar(eps).sqrt().recip();
    y.cast(weight.dtype()) * weight.unsqueeze::<2>()
}

/// `residual + h` in f32 (the residual stream) and its RMSNorm with `weight` (as [`rms_norm`]).
pub fn add_rms_norm<B: Backend>(
    residual: Tensor<B, 2>,
    h: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let sum = residual.cast(DType::F32) + h.cast(DType::F32);
    let normed = rms_norm(sum.clone(), weight, eps);
    (sum, normed)
}

/// The RMSNorm of consecutive column segments of `x`, segment `i` as wide as `weights[i]`:
/// one [`JambaBackend::rms_norm`] per segment (a kernel on backends that have one).
pub fn rms_norms<B: JambaBackend>(
    x: Tensor<B, 2>,
    weights: Vec<Tensor<B, 1>>,
    eps: f64,
) -> Vec<Tensor<B, 2>> {
    let mut start = 0;
    weights
        .into_iter()
        .map(|w| {
            let width = w.dims()[0];
            let out = B::rms_norm(x.clone().narrow(1, start, width), w, eps);
            start += width;
            out
        })
        .collect()
}

/// `silu(gate) * up` in the inputs' dtype (transformers' order: the SiLU is rounded before the
/// product).
pub fn swiglu<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    activation::silu(gate) * up
}

/// `down(silu(gate x) * up x)` through `B`'s [`JambaBackend::linear`] and
/// [`JambaBackend::swiglu`].
pub fn swiglu_mlp<B: JambaBackend>(
    x: Tensor<B, 2>,
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    down: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let g = <B as JambaBackend>::linear(x.clone(), gate, None);
    let act = B::swiglu(g, <B as JambaBackend>::linear(x, up, None));
    <B as JambaBackend>::linear(act, down, None)
}

/// [`MambaInProjStep`] through `B`'s [`JambaBackend::linear`] and
/// [`JambaBackend::causal_conv1d_update`].
pub fn mamba_in_proj_step<B: JambaBackend>(
    input: MambaInProjStep<B>,
) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 3>) {
    let d_inner = input.conv_weight.dims()[0];
    let xz = <B as JambaBackend>::linear(input.x, input.weight, input.bias);
    let (x, state) = B::causal_conv1d_update(CausalConv1dUpdate {
        state: input.conv_state,
        x: xz.clone().narrow(1, 0, d_inner),
        weight: input.conv_weight,
        bias: input.conv_bias,
        silu: true,
    });
    (x, xz.narrow(1, d_inner, d_inner), state)
}

/// [`MambaStep`] through `B`'s operations: [`JambaBackend::rms_norms`],
/// [`JambaBackend::linear`] and [`JambaBackend::selective_state_update`].
pub fn mamba_step<B: JambaBackend>(input: MambaStep<B>) -> (Tensor<B, 2>, Tensor<B, 3>) {
    let MambaStep {
        state,
        x,
        z,
        params,
        norms,
        eps,
        dt_proj,
        a,
        d,
        delta_bias,
        delta_softplus,
    } = input;
    let mut normed = B::rms_norms(params, norms.to_vec(), eps).into_iter();
    let mut next = || normed.next().expect("three norms");
    let (dt, b, c) = (next(), next(), next());
    let delta = <B as JambaBackend>::linear(dt, dt_proj, None);
    B::selective_state_update(SelectiveStateUpdate {
        state,
        x,
        delta,
        a,
        b,
        c,
        d,
        z,
        delta_bias,
        delta_softplus,
    })
}

/// Attention of one query per head over the first `len` cached keys of `k`, `v` (decoding),
/// KV heads shared by `heads / kv_heads` query heads; scores, softmax and output in f32.
pub fn decode_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    len: usize,
) -> Tensor<B, 4> {
    let [batch, heads, len_q, head_dim] = q.dims();
    let (k, v) = (k.narrow(2, 0, len), v.narrow(2, 0, len));
    let kv_heads = k.dims()[1];
    let groups = heads / kv_heads;
    let repeat = |x: Tensor<B, 4>| {
        x.cast(DType::F32)
            .unsqueeze_dim::<5>(2)
            .expand([batch, kv_heads, groups, len, head_dim])
            .reshape([batch, heads, len, head_dim])
    };
    let dtype = q.dtype();
    let scores = q
        .cast(DType::F32)
        .matmul(repeat(k).swap_dims(2, 3))
        .mul_scalar((head_dim as f64).powf(-0.5));
    debug_assert_eq!(scores.dims(), [batch, heads, len_q, len]);
    activation::softmax(scores, 3).matmul(repeat(v)).cast(dtype)
}

/// One decoding position of the scan: the scan of length 1 continuing from `state`.
pub fn selective_state_update<B: Backend>(
    input: SelectiveStateUpdate<B>,
) -> (Tensor<B, 2>, Tensor<B, 3>) {
    let SelectiveStateUpdate {
        state,
        x,
        delta,
        a,
        b,
        c,
        d,
        z,
        delta_bias,
        delta_softplus,
    } = input;
    let out = selective_scan(SelectiveScanInput {
        u: x.unsqueeze_dim(2),
        delta: delta.unsqueeze_dim(2),
        a,
        b: b.unsqueeze_dim(2),
        c: c.unsqueeze_dim(2),
        d,
        z: z.map(|z| z.unsqueeze_dim(2)),
        delta_bias,
        delta_softplus,
        initial_state: Some(state),
    });
    (out.y.squeeze_dim(2), out.last_state)
}

/// One decoding position of the conv: the conv of `x` after `state`, and the state shifted by one.
pub fn causal_conv1d_update<B: Backend>(
    input: CausalConv1dUpdate<B>,
) -> (Tensor<B, 2>, Tensor<B, 3>) {
    let CausalConv1dUpdate {
        state,
        x,
        weight,
        bias,
        silu,
    } = input;
    let keep = state.dims()[2];
    let x = x.unsqueeze_dim::<3>(2);
    let y = causal_conv1d(CausalConv1dInput {
        x: x.clone(),
        weight,
        bias,
        initial_state: Some(state.clone()),
        silu,
    });
    let next = if keep == 0 {
        state
    } else {
        Tensor::cat(vec![state, x.cast(DType::F32)], 2).narrow(2, 1, keep)
    };
    (y.squeeze_dim(2), next)
}

/// Causal scaled dot-product attention as [`JambaBackend::causal_attention`] defines it
/// (`k`, `v` may have fewer heads and more positions than `q`): the KV heads
/// repeated, the scores `q k^T` in the inputs' dtype (as a matmul of them gives), then scaled
/// and softmaxed in f32, the probabilities cast back for the product with `v`.
pub fn causal_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let dtype = q.dtype();
    let [batch, heads, len_q, head_dim] = q.dims();
    let [_, kv_heads, len_k, _] = k.dims();
    let device = q.device();
    let groups = heads / kv_heads.max(1);
    let (k, v) = (repeat_kv(k, groups), repeat_kv(v, groups));
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .cast(DType::F32)
        .mul_scalar((head_dim as f64).powf(-0.5));
    let offset = len_k as i64 - len_q as i64;
    let future = Tensor::<B, 4, Bool>::tril_mask([1, 1, len_q, len_k], offset, &device)
        .expand([batch, heads, len_q, len_k]);
    activation::softmax(scores.mask_fill(future, f32::MIN), 3)
        .cast(dtype)
        .matmul(v)
}

/// Head `j` of the result is head `j / groups` of `x` `[batch, kv_heads, len, head_dim]`
/// (transformers' `repeat_kv`).
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, groups: usize) -> Tensor<B, 4> {
    if groups <= 1 {
        return x;
    }
    let [b, nkv, t, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, nkv, groups, t, hd])
        .reshape([b, nkv * groups, t, hd])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::{Distribution, TensorData, Tolerance};

    type B = NdArray<f32>;

    /// A scalar, loop-by-loop implementation to check the tensor-op one against.
    fn naive_scan(
        u: &[f32],
        delta: &[f32],
        a: &[f32],
        b: &[f32],
        c: &[f32],
        d: &[f32],
        (bs, di, l, n): (usize, usize, usize, usize),
    ) -> Vec<f32> {
        let mut y = vec![0.0; bs * di * l];
        for bi in 0..bs {
            for ch in 0..di {
                let mut h = vec![0.0f32; n];
                for t in 0..l {
                    let x = u[(bi * di + ch) * l + t];
                    let dt_raw = delta[(bi * di + ch) * l + t];
                    let dt = if dt_raw > 20.0 {
                        dt_raw
                    } else {
                        dt_raw.exp().ln_1p()
                    };
                    let mut acc = 0.0;
                    for s in 0..n {
                        h[s] = (dt * a[ch * n + s]).exp() * h[s] + dt * b[(bi * n + s) * l + t] * x;
                        acc += h[s] * c[(bi * n + s) * l + t];
                    }
                    y[(bi * di + ch) * l + t] = acc + d[ch] * x;
                }
            }
        }
        y
    }

    #[test]
    fn scan_matches_scalar_loop_and_continues_from_state() {
        let dev = Default::default();
        let (bs, di, l, n) = (3, 5, 137, 4);
        let r = |s: [usize; 3]| Tensor::<B, 3>::random(s, Distribution::Normal(0.0, 1.0), &dev);
        let u = r([bs, di, l]);
        let delta = r([bs, di, l]);
        let b = r([bs, n, l]);
        let c = r([bs, n, l]);
        let a = Tensor::<B, 2>::random([di, n], Distribution::Uniform(-3.0, -0.1), &dev);
        let d = Tensor::<B, 1>::random([di], Distribution::Normal(1.0, 0.3), &dev);
        let v = |t: &Tensor<B, 3>| t.to_data().to_vec::<f32>().unwrap();
        let want = naive_scan(
            &v(&u),
            &v(&delta),
            &a.to_data().to_vec::<f32>().unwrap(),
            &v(&b),
            &v(&c),
            &d.to_data().to_vec::<f32>().unwrap(),
            (bs, di, l, n),
        );
        let input = SelectiveScanInput {
            u: u.clone(),
            delta: delta.clone(),
            a: a.clone(),
            b: b.clone(),
            c: c.clone(),
            d: d.clone(),
            z: None,
            delta_bias: None,
            delta_softplus: true,
            initial_state: None,
        };
        let full = selective_scan(input.clone());
        full.y.to_data().assert_approx_eq::<f32>(
            &TensorData::new(want, [bs, di, l]),
            Tolerance::rel_abs(1e-5, 1e-5),
        );

        // Two halves, the second continuing from the first's state, equal the whole.
        let split = 60;
        let part = |t: &Tensor<B, 3>, s: usize, len: usize| t.clone().narrow(2, s, len);
        let first = selective_scan(SelectiveScanInput {
            u: part(&u, 0, split),
            delta: part(&delta, 0, split),
            b: part(&b, 0, split),
            c: part(&c, 0, split),
            ..input.clone()
        });
        let rest = l - split;
        let second = selective_scan(SelectiveScanInput {
            u: part(&u, split, rest),
            delta: part(&delta, split, rest),
            b: part(&b, split, rest),
            c: part(&c, split, rest),
            initial_state: Some(first.last_state),
            ..input
        });
        Tensor::cat(vec![first.y, second.y], 2)
            .to_data()
            .assert_approx_eq::<f32>(&full.y.to_data(), Tolerance::rel_abs(1e-5, 1e-6));
        second
            .last_state
            .to_data()
            .assert_approx_eq::<f32>(&full.last_state.to_data(), Tolerance::rel_abs(1e-5, 1e-6));
    }

    #[test]
    fn softplus_has_threshold() {
        let dev = Default::default();
        let x = Tensor::<B, 1>::from_floats([-30.0, 0.0, 19.0, 25.0, 1.0e4], &dev);
        let y = softplus(x).to_data().to_vec::<f32>().unwrap();
        assert!(y.iter().all(|v| v.is_finite()));
        assert!((y[1] - 2f32.ln()).abs() < 1e-6);
        assert_eq!(y[3], 25.0);
        assert_eq!(y[4], 1.0e4);
    }

    #[test]
    fn conv_matches_definition_and_continues_from_state() {
        let dev = Default::default();
        let (bs, ch, l, k) = (2, 3, 9, 4);
        let x = Tensor::<B, 3>::random([bs, ch, l], Distribution::Normal(0.0, 1.0), &dev);
        let w = Tensor::<B, 2>::random([ch, k], Distribution::Normal(0.0, 1.0), &dev);
        let bias = Tensor::<B, 1>::random([ch], Distribution::Normal(0.0, 1.0), &dev);
        let full = causal_conv1d(CausalConv1dInput {
            x: x.clone(),
            weight: w.clone(),
            bias: Some(bias.clone()),
            initial_state: None,
            silu: false,
        });
        let xv = x.to_data().to_vec::<f32>().unwrap();
        let wv = w.to_data().to_vec::<f32>().unwrap();
        let bv = bias.to_data().to_vec::<f32>().unwrap();
        let got = full.to_data().to_vec::<f32>().unwrap();
        for bi in 0..bs {
            for c in 0..ch {
                for t in 0..l {
                    let mut want = bv[c];
                    for j in 0..k {
                        let src = t as isize - (k as isize - 1) + j as isize;
                        if src >= 0 {
                            want += wv[c * k + j] * xv[(bi * ch + c) * l + src as usize];
                        }
                    }
                    let g = got[(bi * ch + c) * l + t];
                    assert!((g - want).abs() < 1e-5, "({bi},{c},{t}): {g} vs {want}");
                }
            }
        }
        // The second part, given the K-1 preceding inputs, equals the tail of the whole.
        let tail = causal_conv1d(CausalConv1dInput {
            x: x.clone().narrow(2, 5, 4),
            weight: w,
            bias: Some(bias),
            initial_state: Some(x.narrow(2, 2, 3)),
            silu: false,
        });
        tail.to_data().assert_approx_eq::<f32>(
            &full.narrow(2, 5, 4).to_data(),
            Tolerance::rel_abs(1e-6, 1e-6),
        );
    }
}
