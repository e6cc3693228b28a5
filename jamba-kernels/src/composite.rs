//! Composite operations: several of [`JambaBackend`]'s operations written once for any backend
//! and run as one operation ([`JambaBackend::composite`]).
//!
//! On most backends a composite is only a function: its operations run one after the other.
//! `Fusion<B>` (Burn's default `Cuda` and `Wgpu`) registers it as a single operation of its
//! stream, which runs the composite on `B` when the stream executes: the kernels are launched
//! back to back, without the stream's bookkeeping for each operation (its search for fusions,
//! which custom operations interrupt anyway, and a reshape registered for every change of
//! rank). Decoding a token is a few hundred small operations, and at batch 1 that bookkeeping
//! costs more host time than the GPU spends on the kernels.

use std::collections::VecDeque;

use burn::tensor::{
    backend::Backend, ops::FloatTensor, DType, Tensor, TensorMetadata, TensorPrimitive,
};

use crate::JambaBackend;

/// A piece of a forward pass made of [`JambaBackend`] operations (see the module docs).
///
/// `run` must be the same computation on every backend and return tensors of exactly the
/// shapes and dtypes `outputs` announces: a fused backend hands those to later operations before
/// `run` has executed. [`JambaBackend::composite`] checks them after each run.
pub trait Composite: Send + Sync + 'static {
    /// The operation's name in a fused stream's description.
    const NAME: &'static str;

    /// The outputs' shapes and dtypes, in the order `run` returns them.
    fn outputs(&self) -> Vec<(Vec<usize>, DType)>;

    /// The computation on `B`, from the inputs in the order the caller pushed them.
    fn run<B: JambaBackend>(&self, inputs: Args<B>) -> Args<B>;
}

/// Float tensors of any rank, in order: what a [`Composite`] takes and returns.
pub struct Args<B: Backend> {
    tensors: VecDeque<FloatTensor<B>>,
}

impl<B: Backend> Default for Args<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> Args<B> {
    pub fn new() -> Self {
        Self {
            tensors: VecDeque::new(),
        }
    }

    /// Appends `t`.
    pub fn push<const D: usize>(&mut self, t: Tensor<B, D>) {
        self.tensors.push_back(t.into_primitive().tensor());
    }

    /// Appends `t` where it is present (the reader knows which are, see [`Args::take_opt`]).
    pub fn push_opt<const D: usize>(&mut self, t: Option<Tensor<B, D>>) {
        if let Some(t) = t {
            self.push(t);
        }
    }

    /// Removes the first tensor, of rank `D`.
    ///
    /// # Panics
    /// When there is none or it has another rank: the reader and the writer of the arguments
    /// disagree, a bug of the composite.
    pub fn take<const D: usize>(&mut self) -> Tensor<B, D> {
        let t = self
            .tensors
            .pop_front()
            .expect("a composite read more tensors than it was given");
        assert_eq!(
            t.shape().num_dims(),
            D,
            "a composite read a tensor of rank {} as rank {D}",
            t.shape().num_dims()
        );
        Tensor::from_primitive(TensorPrimitive::Float(t))
    }

    /// [`Args::take`] where `present`, else `None` (and nothing is removed).
    pub fn take_opt<const D: usize>(&mut self, present: bool) -> Option<Tensor<B, D>> {
        present.then(|| self.take())
    }

    /// Number of tensors left.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether no tensor is left.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    // Used by `Fusion<B>`'s composite (feature `cube`).
    #[cfg_attr(not(feature = "cube"), allow(dead_code))]
    pub(crate) fn from_primitives(tensors: impl IntoIterator<Item = FloatTensor<B>>) -> Self {
        Self {
            tensors: tensors.into_iter().collect(),
        }
    }

    #[cfg_attr(not(feature = "cube"), allow(dead_code))]
    pub(crate) fn into_primitives(self) -> Vec<FloatTensor<B>> {
        self.tensors.into()
    }

    /// Panics unless the tensors are exactly `specs` (shapes and dtypes, in order).
    pub(crate) fn check(&self, name: &str, specs: &[(Vec<usize>, DType)]) {
        assert_eq!(
            self.tensors.len(),
            specs.len(),
            "composite {name} returned {} tensors for {} announced",
            self.tensors.len(),
            specs.len()
        );
        for (i, (t, (shape, dtype))) in self.tensors.iter().zip(specs).enumerate() {
            assert!(
                t.shape().to_vec() == *shape && t.dtype() == *dtype,
                "composite {name}: output {i} is {:?} {:?}, announced {shape:?} {dtype:?}",
                t.shape().to_vec(),
                t.dtype()
            );
        }
    }
}

/// [`JambaBackend::composite`]'s default: `op` run on `B` itself.
pub(crate) fn run_here<B: JambaBackend, C: Composite>(op: C, inputs: Args<B>) -> Args<B> {
    let out = op.run::<B>(inputs);
    out.check(C::NAME, &op.outputs());
    out
}
