//! Small building blocks with HF's parameter layout: `Linear` keeps PyTorch's `[out, in]` weight so
//! checkpoints load and save without copies, and `RmsNorm` normalises in f32 like `JambaRMSNorm`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use crate::error::Result;
use crate::weights::{Init, Weights};

/// Collects `(HF name, data)` pairs for saving.
pub(crate) type Export = Vec<(String, TensorData)>;

pub(crate) fn export_param<B: Backend, const D: usize>(
    out: &mut Export,
    key: String,
    p: &Param<Tensor<B, D>>,
) {
    out.push((key, p.val().into_data()));
}

/// `y = x W^T + b` with `W` stored `[out, in]` as in PyTorch.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    /// Builds `{prefix}.weight` `[d_out, d_in]` and, with `bias`, `{prefix}.bias` `[d_out]`.
    pub fn new(
        w: &mut Weights<B>,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            weight: w.param(&format!("{prefix}.weight"), [d_out, d_in], Init::Normal)?,
            bias: if bias {
                Some(w.param(&format!("{prefix}.bias"), [d_out], Init::Zeros)?)
            } else {
                None
            },
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        burn::tensor::module::linear(
            x,
            self.weight.val().transpose(),
            self.bias.as_ref().map(|b| b.val()),
        )
    }

    pub(crate) fn export(&self, prefix: &str, out: &mut Export) {
        export_param(out, format!("{prefix}.weight"), &self.weight);
        if let Some(b) = &self.bias {
            export_param(out, format!("{prefix}.bias"), b);
        }
    }
}

/// Root-mean-square norm computed in f32, cast to the weight's dtype, then scaled (`JambaRMSNorm`).
///
/// The output takes the weight's dtype rather than the input's, so an f32 residual stream feeds
/// reduced-precision matmuls directly; for f32 models this is exactly transformers' order of operations.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn new(w: &mut Weights<B>, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.param(&format!("{prefix}.weight"), [dim], Init::Ones)?,
            eps,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let weight = self.weight.val();
        let x = x.cast(DType::F32);
        let var = x.clone().square().mean_dim(D - 1);
        let y = x * var.add_scalar(self.eps).sqrt().recip();
        y.cast(weight.dtype()) * weight.unsqueeze::<D>()
    }

    pub(crate) fn export(&self, prefix: &str, out: &mut Export) {
        export_param(out, format!("{prefix}.weight"), &self.weight);
    }
}
