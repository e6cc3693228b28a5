//! [`JambaBackend`] for `Fusion<B>` (Burn's default `Cuda` and `Wgpu`): each operation is
//! registered in the fusion stream as a custom operation that runs `B`'s kernel when the stream
//! is executed. Custom operations are not fused with their neighbours; the element-wise work
//! around them still is.

use std::{fmt, marker::PhantomData, sync::Arc};

use burn::tensor::{
    ops::{FloatTensor, IntTensor},
    DType, Int, Shape, Tensor, TensorPrimitive,
};
use burn_fusion::{
    stream::{Operation, OperationStreams},
    Fusion, FusionBackend, FusionRuntime, FusionTensor,
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use crate::{
    Args, CausalConv1dGrads, CausalConv1dInput, CausalConv1dUpdate, Composite, JambaBackend,
    MambaInProjStep, MambaStep, MoeGrads, MoeInput, SelectiveScanGrads, SelectiveScanInput,
    SelectiveScanOutput, SelectiveStateUpdate,
};

/// A tensor of the inner backend as a custom operation passes it: float or int (by the dtype of
/// its description).
enum Prim<B: FusionBackend> {
    Float(FloatTensor<B>),
    Int(IntTensor<B>),
}

type Run<B> = Arc<dyn Fn(Vec<Prim<B>>) -> Vec<Prim<B>> + Send + Sync>;

/// A custom operation: runs `run` on the inner backend's primitives of `desc.inputs` and binds
/// its results to `desc.outputs`.
struct CustomOp<B: FusionBackend> {
    desc: CustomOpIr,
    run: Run<B>,
    _b: PhantomData<B>,
}

impl<B: FusionBackend> Clone for CustomOp<B> {
    fn clone(&self) -> Self {
        Self {
            desc: self.desc.clone(),
            run: self.run.clone(),
            _b: PhantomData,
        }
    }
}

impl<B: FusionBackend> fmt::Debug for CustomOp<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomOp")
            .field("desc", &self.desc)
            .finish()
    }
}

impl<B: FusionBackend> Operation<B::FusionRuntime> for CustomOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = self
            .desc
            .inputs
            .iter()
            .map(|t| match t.dtype.is_int() {
                true => Prim::Int(handles.get_int_tensor::<B>(t)),
                false => Prim::Float(handles.get_float_tensor::<B>(t)),
            })
            .collect();
        let outputs = (self.run)(inputs);
        assert_eq!(outputs.len(), self.desc.outputs.len());
        for (ir, t) in self.desc.outputs.iter().zip(outputs) {
            match t {
                Prim::Float(t) => handles.register_float_tensor::<B>(&ir.id, t),
                Prim::Int(t) => handles.register_int_tensor::<B>(&ir.id, t),
            }
        }
    }
}

/// Registers `run` as a custom operation of the stream over `inputs`, with outputs of the given
/// shapes and dtypes.
fn register<B: FusionBackend>(
    name: &'static str,
    inputs: Vec<FusionTensor<B::FusionRuntime>>,
    outputs: Vec<(Vec<usize>, DType)>,
    run: Run<B>,
) -> Vec<FusionTensor<B::FusionRuntime>> {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let outputs: Vec<TensorIr> = outputs
        .into_iter()
        .map(|(shape, dtype)| {
            TensorIr::uninit(client.create_empty_handle(), Shape::from(shape), dtype)
        })
        .collect();
    let inputs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(name, &inputs, &outputs);
    client.register(
        streams,
        OperationIr::Custom(desc.clone()),
        CustomOp::<B> {
            desc,
            run,
            _b: PhantomData,
        },
    )
}

fn fprim<B: FusionBackend, const D: usize>(
    t: Tensor<Fusion<B>, D>,
) -> FusionTensor<B::FusionRuntime> {
    t.into_primitive().tensor()
}

fn fwrap<B: FusionBackend, const D: usize>(
    t: FusionTensor<B::FusionRuntime>,
) -> Tensor<Fusion<B>, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn inner<B: FusionBackend, const D: usize>(t: Prim<B>) -> Tensor<B, D> {
    match t {
        Prim::Float(t) => Tensor::from_primitive(TensorPrimitive::Float(t)),
        Prim::Int(_) => unreachable!("a float input of a custom operation is registered as int"),
    }
}

fn inner_int<B: FusionBackend, const D: usize>(t: Prim<B>) -> Tensor<B, D, Int> {
    match t {
        Prim::Int(t) => Tensor::from_primitive(t),
        Prim::Float(_) => unreachable!("an int input of a custom operation is registered as float"),
    }
}

fn raw<B: FusionBackend, const D: usize>(t: Tensor<B, D>) -> Prim<B> {
    Prim::Float(t.into_primitive().tensor())
}

/// The scan's inputs, flattened: the nine tensors with absent optionals skipped, and which
/// optionals are present.
struct ScanArgs<B: FusionBackend> {
    tensors: Vec<FusionTensor<B::FusionRuntime>>,
    flags: [bool; 3],
    softplus: bool,
}

fn scan_args<B: FusionBackend>(input: &SelectiveScanInput<Fusion<B>>) -> ScanArgs<B> {
    let mut tensors = vec![
        fprim(input.u.clone()),
        fprim(input.delta.clone()),
        fprim(input.a.clone()),
        fprim(input.b.clone()),
        fprim(input.c.clone()),
        fprim(input.d.clone()),
    ];
    if let Some(z) = &input.z {
        tensors.push(fprim(z.clone()));
    }
    if let Some(b) = &input.delta_bias {
        tensors.push(fprim(b.clone()));
    }
    if let Some(s) = &input.initial_state {
        tensors.push(fprim(s.clone()));
    }
    ScanArgs {
        tensors,
        flags: [
            input.z.is_some(),
            input.delta_bias.is_some(),
            input.initial_state.is_some(),
        ],
        softplus: input.delta_softplus,
    }
}

/// Rebuilds the inner backend's scan input from the primitives of [`scan_args`] (in order);
/// returns it and the primitives that followed.
fn scan_input<B: FusionBackend>(
    mut prims: Vec<Prim<B>>,
    flags: [bool; 3],
    softplus: bool,
) -> (SelectiveScanInput<B>, Vec<Prim<B>>) {
    let mut it = prims.drain(..);
    let mut next = || it.next().expect("custom op input");
    let u = inner(next());
    let delta = inner(next());
    let a = inner(next());
    let b = inner(next());
    let c = inner(next());
    let d = inner(next());
    let z = flags[0].then(|| inner(next()));
    let delta_bias = flags[1].then(|| inner(next()));
    let initial_state = flags[2].then(|| inner(next()));
    let rest = it.collect();
    (
        SelectiveScanInput {
            u,
            delta,
            a,
            b,
            c,
            d,
            z,
            delta_bias,
            delta_softplus: softplus,
            initial_state,
        },
        rest,
    )
}

impl<B: FusionBackend + JambaBackend> JambaBackend for Fusion<B> {
    const KERNELS: bool = B::KERNELS;

    fn selective_scan(input: SelectiveScanInput<Self>) -> SelectiveScanOutput<Self> {
        if !B::KERNELS {
            return crate::reference::selective_scan(input);
        }
        let [batch, d_inner, len] = input.u.dims();
        let d_state = input.a.dims()[1];
        let args = scan_args(&input);
        let (flags, softplus) = (args.flags, args.softplus);
        let outs = register::<B>(
            "jamba_selective_scan",
            args.tensors,
            vec![
                (vec![batch, d_inner, len], input.u.dtype()),
                (vec![batch, d_inner, d_state], DType::F32),
            ],
            Arc::new(move |prims| {
                let (input, _) = scan_input::<B>(prims, flags, softplus);
                let out = B::selective_scan(input);
                vec![raw(out.y), raw(out.last_state)]
            }),
        );
        let mut outs = outs.into_iter();
        SelectiveScanOutput {
            y: fwrap(outs.next().unwrap()),
            last_state: fwrap(outs.next().unwrap()),
        }
    }

    fn selective_scan_saving(
        input: &SelectiveScanInput<Self>,
    ) -> (SelectiveScanOutput<Self>, Tensor<Self, 4>) {
        let [batch, d_inner, len] = input.u.dims();
        let d_state = input.a.dims()[1];
        let chunks = len.div_ceil(crate::scan_chunk_len(d_state)).max(1);
        let args = scan_args(input);
        let (flags, softplus) = (args.flags, args.softplus);
        let outs = register::<B>(
            "jamba_selective_scan_saving",
            args.tensors,
            vec![
                (vec![batch, d_inner, len], input.u.dtype()),
                (vec![batch, d_inner, d_state], DType::F32),
                (vec![batch, d_inner, chunks, d_state], DType::F32),
            ],
            Arc::new(move |prims| {
                let (input, _) = scan_input::<B>(prims, flags, softplus);
                let (out, saved) = B::selective_scan_saving(&input);
                vec![raw(out.y), raw(out.last_state), raw(saved)]
            }),
        );
        let mut outs = outs.into_iter();
        (
            SelectiveScanOutput {
                y: fwrap(outs.next().unwrap()),
                last_state: fwrap(outs.next().unwrap()),
            },
            fwrap(outs.next().unwrap()),
        )
    }

    fn selective_scan_backward(
        input: &SelectiveScanInput<Self>,
        chunk_states: Tensor<Self, 4>,
        grad_y: Tensor<Self, 3>,
    ) -> SelectiveScanGrads<Self> {
        let mut args = scan_args(input);
        let (flags, softplus) = (args.flags, args.softplus);
        args.tensors.push(fprim(chunk_states));
        args.tensors.push(fprim(grad_y));
        let mut shapes = vec![
            (input.u.dims().to_vec(), input.u.dtype()),
            (input.delta.dims().to_vec(), input.delta.dtype()),
            (input.a.dims().to_vec(), input.a.dtype()),
            (input.b.dims().to_vec(), input.b.dtype()),
            (input.c.dims().to_vec(), input.c.dtype()),
            (input.d.dims().to_vec(), input.d.dtype()),
        ];
        if let Some(z) = &input.z {
            shapes.push((z.dims().to_vec(), z.dtype()));
        }
        if let Some(b) = &input.delta_bias {
            shapes.push((b.dims().to_vec(), b.dtype()));
        }
        if let Some(s) = &input.initial_state {
            shapes.push((s.dims().to_vec(), s.dtype()));
        }
        let outs = register::<B>(
            "jamba_selective_scan_backward",
            args.tensors,
            shapes,
            Arc::new(move |prims| {
                let (input, mut rest) = scan_input::<B>(prims, flags, softplus);
                let grad_y = inner(rest.pop().unwrap());
                let chunk_states = inner(rest.pop().unwrap());
                let g = B::selective_scan_backward(&input, chunk_states, grad_y);
                let mut out = vec![
                    raw(g.u),
                    raw(g.delta),
                    raw(g.a),
                    raw(g.b),
                    raw(g.c),
                    raw(g.d),
                ];
                out.extend(g.z.map(raw));
                out.extend(g.delta_bias.map(raw));
                out.extend(g.initial_state.map(raw));
                out
            }),
        );
        let mut outs = outs.into_iter();
        let mut next = || outs.next().unwrap();
        SelectiveScanGrads {
            u: fwrap(next()),
            delta: fwrap(next()),
            a: fwrap(next()),
            b: fwrap(next()),
            c: fwrap(next()),
            d: fwrap(next()),
            z: flags[0].then(|| fwrap(next())),
            delta_bias: flags[1].then(|| fwrap(next())),
            initial_state: flags[2].then(|| fwrap(next())),
        }
    }

    fn causal_conv1d(input: CausalConv1dInput<Self>) -> Tensor<Self, 3> {
        if !B::KERNELS {
            return crate::reference::causal_conv1d(input);
        }
        let (tensors, flags) = conv_args(&input);
        let silu = input.silu;
        let outs = register::<B>(
            "jamba_causal_conv1d",
            tensors,
            vec![(input.x.dims().to_vec(), input.x.dtype())],
            Arc::new(move |prims| {
                let (input, _) = conv_input::<B>(prims, flags, silu);
                vec![raw(B::causal_conv1d(input))]
            }),
        );
        fwrap(outs.into_iter().next().unwrap())
    }

    fn causal_conv1d_backward(
        input: &CausalConv1dInput<Self>,
        grad_y: Tensor<Self, 3>,
    ) -> CausalConv1dGrads<Self> {
        let (mut tensors, flags) = conv_args(input);
        let silu = input.silu;
        tensors.push(fprim(grad_y));
        let mut shapes = vec![
            (input.x.dims().to_vec(), input.x.dtype()),
            (input.weight.dims().to_vec(), input.weight.dtype()),
        ];
        if let Some(b) = &input.bias {
            shapes.push((b.dims().to_vec(), b.dtype()));
        }
        if let Some(s) = &input.initial_state {
            shapes.push((s.dims().to_vec(), s.dtype()));
        }
        let outs = register::<B>(
            "jamba_causal_conv1d_backward",
            tensors,
            shapes,
            Arc::new(move |prims| {
                let (input, mut rest) = conv_input::<B>(prims, flags, silu);
                let grad_y = inner(rest.pop().unwrap());
                let g = B::causal_conv1d_backward(&input, grad_y);
                let mut out = vec![raw(g.x), raw(g.weight)];
                out.extend(g.bias.map(raw));
                out.extend(g.initial_state.map(raw));
                out
            }),
        );
        let mut outs = outs.into_iter();
        let mut next = || outs.next().unwrap();
        CausalConv1dGrads {
            x: fwrap(next()),
            weight: fwrap(next()),
            bias: flags[0].then(|| fwrap(next())),
            initial_state: flags[1].then(|| fwrap(next())),
        }
    }

    fn linear(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, 2> {
        let [rows, _] = x.dims();
        let [out, _] = weight.dims();
        // Few rows: the decoding kernel. Many, with a matmul routine chosen: that routine
        // (which Burn's fused matmul would not run). Otherwise Burn's fused matmul.
        let small = rows <= crate::decode_max_rows();
        let routine = !small
            && crate::matmul_routine().is_some()
            && matches!(x.dtype(), DType::F16 | DType::BF16);
        if !B::KERNELS || rows == 0 || !(small || routine) {
            let weight = crate::cast_to(weight, x.dtype());
            return burn::tensor::module::linear(x, weight.transpose(), bias);
        }
        // The decoding kernel reads a weight of another dtype as it is; the routine needs one.
        let weight = match small {
            true => weight,
            false => crate::cast_to(weight, x.dtype()),
        };
        let dtype = x.dtype();
        let has_bias = bias.is_some();
        let mut tensors = vec![fprim(x), fprim(weight)];
        tensors.extend(bias.map(fprim));
        let outs = register::<B>(
            if small {
                "jamba_linear_small"
            } else {
                "jamba_linear_routine"
            },
            tensors,
            vec![(vec![rows, out], dtype)],
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let x = inner(it.next().unwrap());
                let w = inner(it.next().unwrap());
                let b = has_bias.then(|| inner(it.next().unwrap()));
                vec![raw(<B as JambaBackend>::linear(x, w, b))]
            }),
        );
        fwrap(outs.into_iter().next().unwrap())
    }

    fn linear_f32(x: Tensor<Self, 2>, weight: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let [rows, _] = x.dims();
        let [out, _] = weight.dims();
        if !B::KERNELS || rows == 0 || rows > crate::decode_max_rows() {
            return <Self as JambaBackend>::linear(crate::cast_to(x, DType::F32), weight, None);
        }
        let outs = register::<B>(
            "jamba_linear_f32",
            vec![fprim(x), fprim(weight)],
            vec![(vec![rows, out], DType::F32)],
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let x = inner(it.next().unwrap());
                let w = inner(it.next().unwrap());
                vec![raw(B::linear_f32(x, w))]
            }),
        );
        fwrap(outs.into_iter().next().unwrap())
    }

    fn matmul(lhs: Tensor<Self, 2>, rhs: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let dtype = lhs.dtype();
        if !B::KERNELS
            || crate::matmul_routine().is_none()
            || !matches!(dtype, DType::F16 | DType::BF16)
            || rhs.dtype() != dtype
        {
            return lhs.matmul(rhs);
        }
        let [m, _] = lhs.dims();
        let [_, n] = rhs.dims();
        let outs = register::<B>(
            "jamba_matmul_routine",
            vec![fprim(lhs), fprim(rhs)],
            vec![(vec![m, n], dtype)],
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let (l, r) = (inner(it.next().unwrap()), inner(it.next().unwrap()));
                vec![raw(<B as JambaBackend>::matmul(l, r))]
            }),
        );
        fwrap(outs.into_iter().next().unwrap())
    }

    fn moe_experts(
        x: Tensor<Self, 2>,
        gate_up: Tensor<Self, 3>,
        down: Tensor<Self, 3>,
        weights: Tensor<Self, 2>,
    ) -> Tensor<Self, 2> {
        let [rows, hidden] = x.dims();
        if !B::KERNELS || rows == 0 || rows > crate::decode_max_rows() {
            return crate::reference::moe_experts(x, gate_up, down, weights);
        }
        let dtype = x.dtype();
        let outs = register::<B>(
            "jamba_moe_experts",
            vec![fprim(x), fprim(gate_up), fprim(down), fprim(weights)],
            vec![(vec![rows, hidden], dtype)],
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let x = inner(it.next().unwrap());
                let gate_up = inner(it.next().unwrap());
                let down = inner(it.next().unwrap());
                let weights = inner(it.next().unwrap());
                vec![raw(B::moe_experts(x, gate_up, down, weights))]
            }),
        );
        fwrap(outs.into_iter().next().unwrap())
    }

    const GROUPED_MOE: bool = B::GROUPED_MOE;

    fn moe_route(logits: Tensor<Self, 2>, top_k: usize) -> (Tensor<Self, 2>, Tensor<Self, 2, Int>) {
        if !B::KERNELS {
            return crate::reference::moe_route(logits, top_k);
        }
        let [tokens, _] = logits.dims();
        let int_dtype = <B::IntElem as burn::tensor::Element>::dtype();
        let outs = register::<B>(
            "jamba_moe_route",
            vec![fprim(logits)],
            vec![
                (vec![tokens, top_k], DType::F32),
                (vec![tokens, top_k], int_dtype),
            ],
            Arc::new(move |prims| {
                let logits = inner(prims.into_iter().next().unwrap());
                let (weights, chosen) = B::moe_route(logits, top_k);
                vec![
                    raw(weights.cast(DType::F32)),
                    Prim::Int(chosen.into_primitive()),
                ]
            }),
        );
        let mut it = outs.into_iter();
        let weights = fwrap(it.next().unwrap());
        let chosen = Tensor::from_primitive(it.next().unwrap());
        (weights, chosen)
    }

    fn moe_router(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        top_k: usize,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 2, Int>) {
        if !B::KERNELS {
            return crate::reference::moe_router::<Self>(x, weight, top_k);
        }
        let [tokens, _] = x.dims();
        let [experts, _] = weight.dims();
        let int_dtype = <B::IntElem as burn::tensor::Element>::dtype();
        let outs = register::<B>(
            "jamba_moe_router",
            vec![fprim(x), fprim(weight)],
            vec![
                (vec![tokens, experts], DType::F32),
                (vec![tokens, top_k], DType::F32),
                (vec![tokens, top_k], int_dtype),
            ],
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let x = inner(it.next().unwrap());
                let weight = inner(it.next().unwrap());
                let (logits, weights, chosen) = B::moe_router(x, weight, top_k);
                vec![
                    raw(logits.cast(DType::F32)),
                    raw(weights.cast(DType::F32)),
                    Prim::Int(chosen.into_primitive()),
                ]
            }),
        );
        let mut it = outs.into_iter();
        let logits = fwrap(it.next().unwrap());
        let weights = fwrap(it.next().unwrap());
        let chosen = Tensor::from_primitive(it.next().unwrap());
        (logits, weights, chosen)
    }

    fn moe_grouped(input: MoeInput<Self>) -> Tensor<Self, 2> {
        if !B::GROUPED_MOE {
            return crate::reference::moe_grouped(input);
        }
        let [tokens, hidden] = input.x.dims();
        let dtype = input.x.dtype();
        let first = input.first;
        let outs = register::<B>(
            "jamba_moe_grouped",
            moe_args(&input),
            vec![(vec![tokens, hidden], dtype)],
            Arc::new(move |prims| vec![raw(B::moe_grouped(moe_input::<B>(prims, first)))]),
        );
        fwrap(outs.into_iter().next().unwrap())
    }

    fn moe_grouped_backward(input: &MoeInput<Self>, grad: Tensor<Self, 2>) -> MoeGrads<Self> {
        let mut args = moe_args(input);
        args.push(fprim(grad));
        let shapes = vec![
            (input.x.dims().to_vec(), input.x.dtype()),
            (input.gate_up.dims().to_vec(), input.gate_up.dtype()),
            (input.down.dims().to_vec(), input.down.dtype()),
            (input.weights.dims().to_vec(), input.weights.dtype()),
        ];
        let first = input.first;
        let outs = register::<B>(
            "jamba_moe_grouped_backward",
            args,
            shapes,
            Arc::new(move |mut prims| {
                let grad = inner(prims.pop().unwrap());
                let g = B::moe_grouped_backward(&moe_input::<B>(prims, first), grad);
                vec![raw(g.x), raw(g.gate_up), raw(g.down), raw(g.weights)]
            }),
        );
        let mut it = outs.into_iter();
        MoeGrads {
            x: fwrap(it.next().unwrap()),
            gate_up: fwrap(it.next().unwrap()),
            down: fwrap(it.next().unwrap()),
            weights: fwrap(it.next().unwrap()),
        }
    }

    fn causal_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        // Below the smaller of the kernels' thresholds the reference stays in fusable tensor
        // ops; above it the inner backend chooses (a kernel, or its own reference).
        let dtype = q.dtype();
        let [batch, heads, len_q, _] = q.dims();
        let scores = batch * heads * len_q * k.dims()[2];
        if !B::KERNELS || !dtype.is_float() || !crate::flash_attention_pays(scores, true) {
            return crate::reference::causal_attention(q, k, v);
        }
        let shape = vec![batch, heads, len_q, v.dims()[3]];
        let outs = register::<B>(
            "jamba_causal_attention",
            vec![fprim(q), fprim(k), fprim(v)],
            vec![(shape, dtype)],
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let (q, k, v) = (
                    inner(it.next().unwrap()),
                    inner(it.next().unwrap()),
                    inner(it.next().unwrap()),
                );
                vec![raw(B::causal_attention(q, k, v))]
            }),
        );
        fwrap(outs.into_iter().next().unwrap())
    }

    fn rms_norm(x: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        if !B::KERNELS {
            return crate::reference::rms_norm(x, weight, eps);
        }
        let shape = x.dims().to_vec();
        let dtype = weight.dtype();
        let outs = register::<B>(
            "jamba_rms_norm",
            vec![fprim(x), fprim(weight)],
            vec![(shape, dtype)],
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let x = inner(it.next().unwrap());
                let w = inner(it.next().unwrap());
                vec![raw(B::rms_norm(x, w, eps))]
            }),
        );
        fwrap(outs.into_iter().next().unwrap())
    }

    fn decode_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        len: usize,
    ) -> Tensor<Self, 4> {
        if !B::KERNELS {
            return crate::reference::decode_attention(q, k, v, len);
        }
        let [batch, heads, len_q, head_dim] = q.dims();
        let dtype = q.dtype();
        let outs = register::<B>(
            "jamba_decode_attention",
            vec![fprim(q), fprim(k), fprim(v)],
            vec![(vec![batch, heads, len_q, head_dim], dtype)],
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let mut next = || inner(it.next().unwrap());
                let (q, k, v) = (next(), next(), next());
                vec![raw(B::decode_attention(q, k, v, len))]
            }),
        );
        fwrap(outs.into_iter().next().unwrap())
    }

    fn add_rms_norm(
        residual: Tensor<Self, 2>,
        h: Tensor<Self, 2>,
        weight: Tensor<Self, 1>,
        eps: f64,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        if !B::KERNELS || residual.dtype() != DType::F32 || residual.dims() != h.dims() {
            return crate::reference::add_rms_norm(residual, h, weight, eps);
        }
        let shape = residual.dims().to_vec();
        let w_dtype = weight.dtype();
        let outs = register::<B>(
            "jamba_add_rms_norm",
            vec![fprim(residual), fprim(h), fprim(weight)],
            vec![(shape.clone(), DType::F32), (shape, w_dtype)],
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let r = inner(it.next().unwrap());
                let h = inner(it.next().unwrap());
                let w = inner(it.next().unwrap());
                let (sum, out) = B::add_rms_norm(r, h, w, eps);
                vec![raw(sum), raw(out)]
            }),
        );
        let mut outs = outs.into_iter();
        (fwrap(outs.next().unwrap()), fwrap(outs.next().unwrap()))
    }

    fn rms_norms(
        x: Tensor<Self, 2>,
        weights: Vec<Tensor<Self, 1>>,
        eps: f64,
    ) -> Vec<Tensor<Self, 2>> {
        if !B::KERNELS || weights.is_empty() {
            return crate::reference::rms_norms(x, weights, eps);
        }
        let rows = x.dims()[0];
        let shapes = weights
            .iter()
            .map(|w| (vec![rows, w.dims()[0]], w.dtype()))
            .collect();
        let mut tensors = vec![fprim(x)];
        tensors.extend(weights.into_iter().map(fprim));
        let outs = register::<B>(
            "jamba_rms_norms",
            tensors,
            shapes,
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let x = inner(it.next().unwrap());
                let weights = it.map(inner).collect();
                B::rms_norms(x, weights, eps).into_iter().map(raw).collect()
            }),
        );
        outs.into_iter().map(fwrap).collect()
    }

    fn swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        if !B::KERNELS || gate.dims() != up.dims() || gate.dtype() != up.dtype() {
            return crate::reference::swiglu(gate, up);
        }
        let shape = gate.dims().to_vec();
        let dtype = gate.dtype();
        let outs = register::<B>(
            "jamba_swiglu",
            vec![fprim(gate), fprim(up)],
            vec![(shape, dtype)],
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let gate = inner(it.next().unwrap());
                let up = inner(it.next().unwrap());
                vec![raw(B::swiglu(gate, up))]
            }),
        );
        fwrap(outs.into_iter().next().unwrap())
    }

    fn swiglu_mlp(
        x: Tensor<Self, 2>,
        gate: Tensor<Self, 2>,
        up: Tensor<Self, 2>,
        down: Tensor<Self, 2>,
    ) -> Tensor<Self, 2> {
        let [rows, _] = x.dims();
        let [hidden, _] = down.dims();
        if !B::KERNELS || rows == 0 || rows > crate::decode_max_rows() {
            return crate::reference::swiglu_mlp::<Self>(x, gate, up, down);
        }
        let dtype = x.dtype();
        let outs = register::<B>(
            "jamba_swiglu_mlp",
            vec![fprim(x), fprim(gate), fprim(up), fprim(down)],
            vec![(vec![rows, hidden], dtype)],
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let mut next = || inner(it.next().unwrap());
                let (x, gate, up, down) = (next(), next(), next(), next());
                vec![raw(B::swiglu_mlp(x, gate, up, down))]
            }),
        );
        fwrap(outs.into_iter().next().unwrap())
    }

    fn selective_state_update(
        input: SelectiveStateUpdate<Self>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        if !B::KERNELS {
            return crate::reference::selective_state_update(input);
        }
        let y_shape = input.x.dims().to_vec();
        let y_dtype = input.x.dtype();
        let state_shape = input.state.dims().to_vec();
        let flags = [input.z.is_some(), input.delta_bias.is_some()];
        let softplus = input.delta_softplus;
        let mut tensors = vec![
            fprim(input.state),
            fprim(input.x),
            fprim(input.delta),
            fprim(input.a),
            fprim(input.b),
            fprim(input.c),
            fprim(input.d),
        ];
        tensors.extend(input.z.map(fprim));
        tensors.extend(input.delta_bias.map(fprim));
        let outs = register::<B>(
            "jamba_selective_state_update",
            tensors,
            vec![(y_shape, y_dtype), (state_shape, DType::F32)],
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let mut next = || it.next().unwrap();
                let state = inner(next());
                let x = inner(next());
                let delta = inner(next());
                let a = inner(next());
                let b = inner(next());
                let c = inner(next());
                let d = inner(next());
                let z = flags[0].then(|| inner(next()));
                let delta_bias = flags[1].then(|| inner(next()));
                let (y, state) = B::selective_state_update(SelectiveStateUpdate {
                    state,
                    x,
                    delta,
                    a,
                    b,
                    c,
                    d,
                    z,
                    delta_bias,
                    delta_softplus: softplus,
                });
                vec![raw(y), raw(state)]
            }),
        );
        let mut outs = outs.into_iter();
        (fwrap(outs.next().unwrap()), fwrap(outs.next().unwrap()))
    }

    fn mamba_in_proj_step(
        input: MambaInProjStep<Self>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 3>) {
        if !B::KERNELS {
            return crate::reference::mamba_in_proj_step::<Self>(input);
        }
        let [rows, _] = input.x.dims();
        let d_inner = input.conv_weight.dims()[0];
        let dtype = input.x.dtype();
        let state_shape = input.conv_state.dims().to_vec();
        let flags = [input.bias.is_some(), input.conv_bias.is_some()];
        let mut tensors = vec![
            fprim(input.x),
            fprim(input.weight),
            fprim(input.conv_state),
            fprim(input.conv_weight),
        ];
        tensors.extend(input.bias.map(fprim));
        tensors.extend(input.conv_bias.map(fprim));
        let outs = register::<B>(
            "jamba_mamba_in_proj_step",
            tensors,
            vec![
                (vec![rows, d_inner], dtype),
                (vec![rows, d_inner], dtype),
                (state_shape, DType::F32),
            ],
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let mut next = || it.next().unwrap();
                let x = inner(next());
                let weight = inner(next());
                let conv_state = inner(next());
                let conv_weight = inner(next());
                let bias = flags[0].then(|| inner(next()));
                let conv_bias = flags[1].then(|| inner(next()));
                let (x, z, state) = B::mamba_in_proj_step(MambaInProjStep {
                    x,
                    weight,
                    bias,
                    conv_state,
                    conv_weight,
                    conv_bias,
                });
                vec![raw(x), raw(z), raw(state)]
            }),
        );
        let mut outs = outs.into_iter();
        (
            fwrap(outs.next().unwrap()),
            fwrap(outs.next().unwrap()),
            fwrap(outs.next().unwrap()),
        )
    }

    fn mamba_step(input: MambaStep<Self>) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        if !B::KERNELS {
            return crate::reference::mamba_step::<Self>(input);
        }
        let y_shape = input.x.dims().to_vec();
        let y_dtype = input.x.dtype();
        let state_shape = input.state.dims().to_vec();
        let flags = [input.z.is_some(), input.delta_bias.is_some()];
        let (eps, softplus) = (input.eps, input.delta_softplus);
        let [dt_norm, b_norm, c_norm] = input.norms;
        let mut tensors = vec![
            fprim(input.state),
            fprim(input.x),
            fprim(input.params),
            fprim(dt_norm),
            fprim(b_norm),
            fprim(c_norm),
            fprim(input.dt_proj),
            fprim(input.a),
            fprim(input.d),
        ];
        tensors.extend(input.z.map(fprim));
        tensors.extend(input.delta_bias.map(fprim));
        let outs = register::<B>(
            "jamba_mamba_step",
            tensors,
            vec![(y_shape, y_dtype), (state_shape, DType::F32)],
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let mut next = || it.next().unwrap();
                let state = inner(next());
                let x = inner(next());
                let params = inner(next());
                let norms = [inner(next()), inner(next()), inner(next())];
                let dt_proj = inner(next());
                let a = inner(next());
                let d = inner(next());
                let z = flags[0].then(|| inner(next()));
                let delta_bias = flags[1].then(|| inner(next()));
                let (y, state) = B::mamba_step(MambaStep {
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
                    delta_softplus: softplus,
                });
                vec![raw(y), raw(state)]
            }),
        );
        let mut outs = outs.into_iter();
        (fwrap(outs.next().unwrap()), fwrap(outs.next().unwrap()))
    }

    fn causal_conv1d_update(input: CausalConv1dUpdate<Self>) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        if !B::KERNELS {
            return crate::reference::causal_conv1d_update(input);
        }
        let y_shape = input.x.dims().to_vec();
        let y_dtype = input.x.dtype();
        let state_shape = input.state.dims().to_vec();
        let has_bias = input.bias.is_some();
        let silu = input.silu;
        let mut tensors = vec![fprim(input.state), fprim(input.x), fprim(input.weight)];
        tensors.extend(input.bias.map(fprim));
        let outs = register::<B>(
            "jamba_causal_conv1d_update",
            tensors,
            vec![(y_shape, y_dtype), (state_shape, DType::F32)],
            Arc::new(move |prims| {
                let mut it = prims.into_iter();
                let state = inner(it.next().unwrap());
                let x = inner(it.next().unwrap());
                let weight = inner(it.next().unwrap());
                let bias = has_bias.then(|| inner(it.next().unwrap()));
                let (y, state) = B::causal_conv1d_update(CausalConv1dUpdate {
                    state,
                    x,
                    weight,
                    bias,
                    silu,
                });
                vec![raw(y), raw(state)]
            }),
        );
        let mut outs = outs.into_iter();
        (fwrap(outs.next().unwrap()), fwrap(outs.next().unwrap()))
    }

    fn composite<C: Composite>(op: C, inputs: Args<Self>) -> Args<Self> {
        let inputs = inputs.into_primitives();
        if inputs.is_empty() {
            // Nothing to order it after in the stream: run its operations one by one.
            return crate::composite::run_here::<Self, C>(op, Args::from_primitives(inputs));
        }
        let outputs = op.outputs();
        let specs = outputs.clone();
        let client = inputs[0].client.clone();
        let outs = register::<B>(
            C::NAME,
            inputs,
            outputs,
            Arc::new(move |prims| {
                let args = Args::<B>::from_primitives(prims.into_iter().map(|p| match p {
                    Prim::Float(t) => t,
                    Prim::Int(_) => unreachable!("a composite's inputs are float tensors"),
                }));
                let out = op.run::<B>(args);
                out.check(C::NAME, &specs);
                out.into_primitives().into_iter().map(Prim::Float).collect()
            }),
        );
        // Hand the operation to the fusion thread now: its queue is otherwise passed on by
        // blocks of 32 operations or at the next read, and a decoding step registers about 14
        // (the thread would start on the first layer only when the step's logits are read).
        client.flush_queue();
        Args::from_primitives(outs)
    }
}

fn conv_args<B: FusionBackend>(
    input: &CausalConv1dInput<Fusion<B>>,
) -> (Vec<FusionTensor<B::FusionRuntime>>, [bool; 2]) {
    let mut tensors = vec![fprim(input.x.clone()), fprim(input.weight.clone())];
    if let Some(b) = &input.bias {
        tensors.push(fprim(b.clone()));
    }
    if let Some(s) = &input.initial_state {
        tensors.push(fprim(s.clone()));
    }
    (
        tensors,
        [input.bias.is_some(), input.initial_state.is_some()],
    )
}

fn conv_input<B: FusionBackend>(
    prims: Vec<Prim<B>>,
    flags: [bool; 2],
    silu: bool,
) -> (CausalConv1dInput<B>, Vec<Prim<B>>) {
    let mut it = prims.into_iter();
    let x = inner(it.next().unwrap());
    let weight = inner(it.next().unwrap());
    let bias = flags[0].then(|| inner(it.next().unwrap()));
    let initial_state = flags[1].then(|| inner(it.next().unwrap()));
    (
        CausalConv1dInput {
            x,
            weight,
            bias,
            initial_state,
            silu,
        },
        it.collect(),
    )
}

/// The grouped MoE's inputs in the order of [`moe_input`].
fn moe_args<B: FusionBackend>(input: &MoeInput<Fusion<B>>) -> Vec<FusionTensor<B::FusionRuntime>> {
    vec![
        fprim(input.x.clone()),
        fprim(input.gate_up.clone()),
        fprim(input.down.clone()),
        input.chosen.clone().into_primitive(),
        fprim(input.weights.clone()),
    ]
}

fn moe_input<B: FusionBackend>(prims: Vec<Prim<B>>, first: usize) -> MoeInput<B> {
    let mut it = prims.into_iter();
    MoeInput {
        x: inner(it.next().unwrap()),
        gate_up: inner(it.next().unwrap()),
        down: inner(it.next().unwrap()),
        chosen: inner_int(it.next().unwrap()),
        weights: inner(it.next().unwrap()),
        first,
    }
}
