//! [`JambaBackend`] for `Autodiff<B>`.
//!
//! When `B` has kernels, the scan and the conv are single autodiff nodes whose backward runs
//! `B`'s backward kernels: the scan keeps only its inputs and the states at chunk boundaries
//! (not one state per position, which is what differentiating the reference keeps). Otherwise
//! the tensor-op references are differentiated by Burn.

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::{ops::FloatTensor, DType, Int, Tensor, TensorPrimitive};

use crate::{
    reference, CausalConv1dInput, CausalConv1dUpdate, JambaBackend, MambaInProjStep, MambaStep,
    MoeInput, SelectiveScanInput, SelectiveScanOutput, SelectiveStateUpdate,
};

type AdTensor<B, C> = FloatTensor<Autodiff<B, C>>;

fn ad<B: JambaBackend, C: CheckpointStrategy, const D: usize>(
    t: Tensor<Autodiff<B, C>, D>,
) -> AdTensor<B, C> {
    t.into_primitive().tensor()
}

fn inner<B: JambaBackend, C: CheckpointStrategy>(t: &AdTensor<B, C>) -> FloatTensor<B> {
    t.primitive.clone()
}

fn to_inner<B: JambaBackend, C: CheckpointStrategy, const D: usize>(
    t: &AdTensor<B, C>,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(inner::<B, C>(t)))
}

fn untracked<B: JambaBackend, C: CheckpointStrategy, const D: usize>(
    t: Tensor<B, D>,
) -> Tensor<Autodiff<B, C>, D> {
    Tensor::from_primitive(TensorPrimitive::Float(AdTensor::<B, C>::new(
        t.into_primitive().tensor(),
    )))
}

/// A leaf that stands for an absent optional input (never tracked, never given a gradient).
fn absent<B: JambaBackend, C: CheckpointStrategy>(device: &B::Device) -> AdTensor<B, C> {
    AdTensor::<B, C>::new(
        Tensor::<B, 1>::zeros([1], (device, DType::F32))
            .into_primitive()
            .tensor(),
    )
}

#[derive(Debug)]
struct ScanBackward;

impl<B: JambaBackend> Backward<B, 9> for ScanBackward {
    type State = (SelectiveScanInput<B>, Tensor<B, 4>);

    fn backward(
        self,
        ops: Ops<Self::State, 9>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (input, chunk_states) = ops.state;
        let grad_y = Tensor::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let g = B::selective_scan_backward(&input, chunk_states, grad_y);
        let p = |t: Tensor<B, 3>| t.into_primitive().tensor();
        let grads_in: [Option<FloatTensor<B>>; 9] = [
            Some(p(g.u)),
            Some(p(g.delta)),
            Some(g.a.into_primitive().tensor()),
            Some(p(g.b)),
            Some(p(g.c)),
            Some(g.d.into_primitive().tensor()),
            g.z.map(p),
            g.delta_bias.map(|t| t.into_primitive().tensor()),
            g.initial_state.map(p),
        ];
        for (parent, grad) in ops.parents.into_iter().zip(grads_in) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

#[derive(Debug)]
struct ConvBackward;

impl<B: JambaBackend> Backward<B, 4> for ConvBackward {
    type State = CausalConv1dInput<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 4>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let input = ops.state;
        let grad_y = Tensor::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let g = B::causal_conv1d_backward(&input, grad_y);
        let grads_in: [Option<FloatTensor<B>>; 4] = [
            Some(g.x.into_primitive().tensor()),
            Some(g.weight.into_primitive().tensor()),
            g.bias.map(|t| t.into_primitive().tensor()),
            g.initial_state.map(|t| t.into_primitive().tensor()),
        ];
        for (parent, grad) in ops.parents.into_iter().zip(grads_in) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

#[derive(Debug)]
struct LinearBackward;

impl<B: JambaBackend> Backward<B, 2> for LinearBackward {
    /// The input and the weight.
    type State = (Tensor<B, 2>, Tensor<B, 2>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (x, weight) = ops.state;
        let grad: Tensor<B, 2> =
            Tensor::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let [parent_x, parent_w] = ops.parents;
        if let Some(node) = parent_x {
            let gx = B::matmul(grad.clone(), weight);
            grads.register::<B>(node.id, gx.into_primitive().tensor());
        }
        if let Some(node) = parent_w {
            let gw = B::matmul(grad.transpose(), x);
            grads.register::<B>(node.id, gw.into_primitive().tensor());
        }
    }
}

#[derive(Debug)]
struct MoeBackward;

impl<B: JambaBackend> Backward<B, 4> for MoeBackward {
    type State = MoeInput<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 4>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = Tensor::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let g = B::moe_grouped_backward(&ops.state, grad);
        let grads_in: [FloatTensor<B>; 4] = [
            g.x.into_primitive().tensor(),
            g.gate_up.into_primitive().tensor(),
            g.down.into_primitive().tensor(),
            g.weights.into_primitive().tensor(),
        ];
        for (parent, grad) in ops.parents.into_iter().zip(grads_in) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: JambaBackend, C: CheckpointStrategy> JambaBackend for Autodiff<B, C> {
    const GROUPED_MOE: bool = B::GROUPED_MOE;

    /// The indices from `B`'s router (a kernel where `B` has one: no sort on the host), the
    /// weights gathered from a differentiable softmax.
    fn moe_route(logits: Tensor<Self, 2>, top_k: usize) -> (Tensor<Self, 2>, Tensor<Self, 2, Int>) {
        let (_, chosen) = B::moe_route(to_inner::<B, C, 2>(&ad(logits.clone())), top_k);
        let chosen = Tensor::<Self, 2, Int>::from_primitive(chosen.into_primitive());
        let weights = burn::tensor::activation::softmax(logits, 1).gather(1, chosen.clone());
        (weights, chosen)
    }

    /// One node whose backward runs `B`'s kernels (recomputing the experts' activations), or
    /// the differentiated reference.
    fn moe_grouped(input: MoeInput<Self>) -> Tensor<Self, 2> {
        if !B::GROUPED_MOE || !crate::moe_kernels_apply(&input) {
            return reference::moe_grouped(input);
        }
        let x = ad(input.x);
        let gate_up = ad(input.gate_up);
        let down = ad(input.down);
        let weights = ad(input.weights);
        let inner_input = MoeInput::<B> {
            x: to_inner::<B, C, 2>(&x),
            gate_up: to_inner::<B, C, 3>(&gate_up),
            down: to_inner::<B, C, 3>(&down),
            chosen: Tensor::from_primitive(input.chosen.into_primitive()),
            weights: to_inner::<B, C, 2>(&weights),
            first: input.first,
        };
        let nodes = [
            x.node.clone(),
            gate_up.node.clone(),
            down.node.clone(),
            weights.node.clone(),
        ];
        let out = match MoeBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::moe_grouped(inner_input.clone());
                prep.finish(inner_input, out.into_primitive().tensor())
            }
            OpsKind::UnTracked(prep) => {
                let out = B::moe_grouped(inner_input);
                prep.finish(out.into_primitive().tensor())
            }
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    /// For f16/bf16 with a matmul routine chosen ([`crate::matmul_routine`]), one node for
    /// `x @ weight^T` whose forward is `B`'s linear and whose backward runs its two products
    /// through [`JambaBackend::matmul`], then the bias added by Burn's autodiff; otherwise
    /// Burn's differentiated linear.
    fn linear(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, 2> {
        let weight = crate::cast_to(weight, x.dtype());
        let half = matches!(x.dtype(), DType::F16 | DType::BF16);
        if !B::KERNELS || crate::matmul_routine().is_none() || !half {
            return burn::tensor::module::linear(x, weight.transpose(), bias);
        }
        let x = ad(x);
        let weight = ad(weight);
        let (x_in, w_in) = (to_inner::<B, C, 2>(&x), to_inner::<B, C, 2>(&weight));
        let nodes = [x.node.clone(), weight.node.clone()];
        let y = match LinearBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = <B as JambaBackend>::linear(x_in.clone(), w_in.clone(), None);
                prep.finish((x_in, w_in), y.into_primitive().tensor())
            }
            OpsKind::UnTracked(prep) => {
                let y = <B as JambaBackend>::linear(x_in, w_in, None);
                prep.finish(y.into_primitive().tensor())
            }
        };
        let y = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(y));
        // The bias stays a broadcast add of Burn's autodiff (its gradient the sum over rows).
        match bias {
            Some(b) => y + b.unsqueeze(),
            None => y,
        }
    }

    fn selective_scan(input: SelectiveScanInput<Self>) -> SelectiveScanOutput<Self> {
        if !B::KERNELS {
            return reference::selective_scan(input);
        }
        let device = input.u.device();
        let u = ad(input.u);
        let delta = ad(input.delta);
        let a = ad(input.a);
        let b = ad(input.b);
        let c = ad(input.c);
        let d = ad(input.d);
        let z = input.z.map(ad);
        let delta_bias = input.delta_bias.map(ad);
        let initial_state = input.initial_state.map(ad);

        let inner_input = SelectiveScanInput::<B> {
            u: to_inner::<B, C, 3>(&u),
            delta: to_inner::<B, C, 3>(&delta),
            a: to_inner::<B, C, 2>(&a),
            b: to_inner::<B, C, 3>(&b),
            c: to_inner::<B, C, 3>(&c),
            d: to_inner::<B, C, 1>(&d),
            z: z.as_ref().map(to_inner::<B, C, 3>),
            delta_bias: delta_bias.as_ref().map(to_inner::<B, C, 1>),
            delta_softplus: input.delta_softplus,
            initial_state: initial_state.as_ref().map(to_inner::<B, C, 3>),
        };
        let inner_device = inner_input.u.device();
        let _ = device;
        let or_absent = |t: &Option<AdTensor<B, C>>| {
            t.clone()
                .unwrap_or_else(|| absent::<B, C>(&inner_device))
                .node
        };
        let nodes = [
            u.node.clone(),
            delta.node.clone(),
            a.node.clone(),
            b.node.clone(),
            c.node.clone(),
            d.node.clone(),
            or_absent(&z),
            or_absent(&delta_bias),
            or_absent(&initial_state),
        ];
        let any_tracked = [&u, &delta, &a, &b, &c, &d]
            .into_iter()
            .chain(z.iter())
            .chain(delta_bias.iter())
            .chain(initial_state.iter())
            .any(|t| t.is_tracked());
        if !any_tracked {
            let out = B::selective_scan(inner_input);
            return SelectiveScanOutput {
                y: untracked(out.y),
                last_state: untracked(out.last_state),
            };
        }
        match ScanBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, saved) = B::selective_scan_saving(&inner_input);
                let y = prep.finish((inner_input, saved), out.y.into_primitive().tensor());
                SelectiveScanOutput {
                    y: Tensor::from_primitive(TensorPrimitive::Float(y)),
                    // The last state is an output of its own, outside the graph.
                    last_state: untracked(out.last_state),
                }
            }
            OpsKind::UnTracked(prep) => {
                let out = B::selective_scan(inner_input);
                let y = prep.finish(out.y.into_primitive().tensor());
                SelectiveScanOutput {
                    y: Tensor::from_primitive(TensorPrimitive::Float(y)),
                    last_state: untracked(out.last_state),
                }
            }
        }
    }

    fn causal_conv1d(input: CausalConv1dInput<Self>) -> Tensor<Self, 3> {
        if !B::KERNELS {
            return reference::causal_conv1d(input);
        }
        let x = ad(input.x);
        let weight = ad(input.weight);
        let bias = input.bias.map(ad);
        let initial_state = input.initial_state.map(ad);
        let inner_input = CausalConv1dInput::<B> {
            x: to_inner::<B, C, 3>(&x),
            weight: to_inner::<B, C, 2>(&weight),
            bias: bias.as_ref().map(to_inner::<B, C, 1>),
            initial_state: initial_state.as_ref().map(to_inner::<B, C, 3>),
            silu: input.silu,
        };
        let device = inner_input.x.device();
        let or_absent =
            |t: &Option<AdTensor<B, C>>| t.clone().unwrap_or_else(|| absent::<B, C>(&device)).node;
        let nodes = [
            x.node.clone(),
            weight.node.clone(),
            or_absent(&bias),
            or_absent(&initial_state),
        ];
        let y = match ConvBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::causal_conv1d(inner_input.clone());
                prep.finish(inner_input, y.into_primitive().tensor())
            }
            OpsKind::UnTracked(prep) => {
                let y = B::causal_conv1d(inner_input);
                prep.finish(y.into_primitive().tensor())
            }
        };
        Tensor::from_primitive(TensorPrimitive::Float(y))
    }

    fn selective_state_update(
        input: SelectiveStateUpdate<Self>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        // Decoding is inference: run the inner kernel when nothing is tracked.
        let tracked = [&input.state]
            .into_iter()
            .map(|t| ad(t.clone()).is_tracked())
            .chain(
                [&input.x, &input.delta, &input.a, &input.b, &input.c]
                    .into_iter()
                    .chain(input.z.iter())
                    .map(|t| ad(t.clone()).is_tracked()),
            )
            .chain(
                [&input.d]
                    .into_iter()
                    .chain(input.delta_bias.iter())
                    .map(|t| ad(t.clone()).is_tracked()),
            )
            .any(|t| t);
        if tracked || !B::KERNELS {
            return reference::selective_state_update(input);
        }
        let i = |t: Tensor<Self, 2>| to_inner::<B, C, 2>(&ad(t));
        let (y, state) = B::selective_state_update(SelectiveStateUpdate {
            state: to_inner::<B, C, 3>(&ad(input.state)),
            x: i(input.x),
            delta: i(input.delta),
            a: i(input.a),
            b: i(input.b),
            c: i(input.c),
            d: to_inner::<B, C, 1>(&ad(input.d)),
            z: input.z.map(i),
            delta_bias: input.delta_bias.map(|t| to_inner::<B, C, 1>(&ad(t))),
            delta_softplus: input.delta_softplus,
        });
        (untracked(y), untracked(state))
    }

    fn mamba_in_proj_step(
        input: MambaInProjStep<Self>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 3>) {
        // Decoding is inference: run the inner kernel when nothing is tracked.
        let tracked2 = |t: &Tensor<Self, 2>| ad(t.clone()).is_tracked();
        let tracked1 = |t: &Tensor<Self, 1>| ad(t.clone()).is_tracked();
        let any = ad(input.conv_state.clone()).is_tracked()
            || [&input.x, &input.weight, &input.conv_weight]
                .into_iter()
                .any(tracked2)
            || input
                .bias
                .iter()
                .chain(input.conv_bias.iter())
                .any(tracked1);
        if any || !B::KERNELS {
            return reference::mamba_in_proj_step::<Self>(input);
        }
        let i2 = |t: Tensor<Self, 2>| to_inner::<B, C, 2>(&ad(t));
        let i1 = |t: Tensor<Self, 1>| to_inner::<B, C, 1>(&ad(t));
        let (x, z, state) = B::mamba_in_proj_step(MambaInProjStep {
            x: i2(input.x),
            weight: i2(input.weight),
            bias: input.bias.map(i1),
            conv_state: to_inner::<B, C, 3>(&ad(input.conv_state)),
            conv_weight: i2(input.conv_weight),
            conv_bias: input.conv_bias.map(i1),
        });
        (untracked(x), untracked(z), untracked(state))
    }

    fn mamba_step(input: MambaStep<Self>) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        // Decoding is inference: run the inner kernel when nothing is tracked.
        fn tracked<B: JambaBackend, C: CheckpointStrategy, const D: usize>(
            t: &Tensor<Autodiff<B, C>, D>,
        ) -> bool {
            ad(t.clone()).is_tracked()
        }
        let any = tracked(&input.state)
            || [&input.x, &input.params, &input.dt_proj, &input.a]
                .into_iter()
                .chain(input.z.iter())
                .any(tracked)
            || input
                .norms
                .iter()
                .chain([&input.d])
                .chain(input.delta_bias.iter())
                .any(tracked);
        if any || !B::KERNELS {
            return reference::mamba_step::<Self>(input);
        }
        let i2 = |t: Tensor<Self, 2>| to_inner::<B, C, 2>(&ad(t));
        let i1 = |t: Tensor<Self, 1>| to_inner::<B, C, 1>(&ad(t));
        let (y, state) = B::mamba_step(MambaStep {
            state: to_inner::<B, C, 3>(&ad(input.state)),
            x: i2(input.x),
            z: input.z.map(i2),
            params: i2(input.params),
            norms: input.norms.map(i1),
            eps: input.eps,
            dt_proj: i2(input.dt_proj),
            a: i2(input.a),
            d: i1(input.d),
            delta_bias: input.delta_bias.map(i1),
            delta_softplus: input.delta_softplus,
        });
        (untracked(y), untracked(state))
    }

    fn causal_conv1d_update(input: CausalConv1dUpdate<Self>) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        let tracked = ad(input.state.clone()).is_tracked()
            || ad(input.x.clone()).is_tracked()
            || ad(input.weight.clone()).is_tracked()
            || input
                .bias
                .clone()
                .map(|t| ad(t).is_tracked())
                .unwrap_or(false);
        if tracked || !B::KERNELS {
            return reference::causal_conv1d_update(input);
        }
        let (y, state) = B::causal_conv1d_update(CausalConv1dUpdate {
            state: to_inner::<B, C, 3>(&ad(input.state)),
            x: to_inner::<B, C, 2>(&ad(input.x)),
            weight: to_inner::<B, C, 2>(&ad(input.weight)),
            bias: input.bias.map(|t| to_inner::<B, C, 1>(&ad(t))),
            silu: input.silu,
        });
        (untracked(y), untracked(state))
    }
}
