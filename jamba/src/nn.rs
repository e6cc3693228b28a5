//! Small building blocks with HF's parameter layout: `Linear` keeps PyTorch's `[out, in]` weight so
//! checkpoints load and save without copies, and `RmsNorm` normalises in f32 like `JambaRMSNorm`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::error::Result;
use crate::weights::{Init, Weights};

/// A parameter of any rank the model has.
#[derive(Debug, Clone)]
pub enum ParamTensor<B: Backend> {
    D1(Param<Tensor<B, 1>>),
    D2(Param<Tensor<B, 2>>),
    D3(Param<Tensor<B, 3>>),
}

impl<B: Backend> ParamTensor<B> {
    /// The parameter's id (stable for the life of the module).
    pub fn id(&self) -> burn::module::ParamId {
        match self {
            Self::D1(p) => p.id,
            Self::D2(p) => p.id,
            Self::D3(p) => p.id,
        }
    }

    /// Its current value, as host data.
    pub fn data(&self) -> TensorData {
        match self {
            Self::D1(p) => p.val().into_data(),
            Self::D2(p) => p.val().into_data(),
            Self::D3(p) => p.val().into_data(),
        }
    }
}

/// A parameter with its transformers name (experts under their fused transformers-5 names
/// `experts.gate_up_proj` / `experts.down_proj`; [`hub_split`] gives the Hub's per-expert keys).
#[derive(Debug, Clone)]
pub struct NamedParam<B: Backend> {
    pub name: String,
    pub param: ParamTensor<B>,
    /// For a fused expert tensor: the layer's index of its first expert (not 0 only when the
    /// layer's experts are split over devices, each group listed under the fused name).
    pub first_expert: usize,
}

/// Collects named parameters in HF order.
pub(crate) type Export<B> = Vec<NamedParam<B>>;

pub(crate) trait IntoParamTensor<B: Backend> {
    fn into_param_tensor(self) -> ParamTensor<B>;
}

impl<B: Backend> IntoParamTensor<B> for Param<Tensor<B, 1>> {
    fn into_param_tensor(self) -> ParamTensor<B> {
        ParamTensor::D1(self)
    }
}

impl<B: Backend> IntoParamTensor<B> for Param<Tensor<B, 2>> {
    fn into_param_tensor(self) -> ParamTensor<B> {
        ParamTensor::D2(self)
    }
}

impl<B: Backend> IntoParamTensor<B> for Param<Tensor<B, 3>> {
    fn into_param_tensor(self) -> ParamTensor<B> {
        ParamTensor::D3(self)
    }
}

pub(crate) fn export_param<B: Backend, P: IntoParamTensor<B> + Clone>(
    out: &mut Export<B>,
    key: String,
    p: &P,
) {
    out.push(NamedParam {
        name: key,
        param: p.clone().into_param_tensor(),
        first_expert: 0,
    });
}

/// [`export_param`] for a group of stacked experts starting at expert `first`.
pub(crate) fn export_experts<B: Backend>(
    out: &mut Export<B>,
    key: String,
    p: &burn::module::Param<burn::tensor::Tensor<B, 3>>,
    first: usize,
) {
    out.push(NamedParam {
        name: key,
        param: p.clone().into_param_tensor(),
        first_expert: first,
    });
}

/// Splits a tensor stored under a fused expert name into the Hub's per-expert tensors
/// (`experts.{e}.{gate,up,down}_proj.weight`); any other tensor is returned as it is.
pub fn hub_split(name: &str, data: TensorData, first_expert: usize) -> Vec<(String, TensorData)> {
    let split = |prefix: &str, parts: &[(&str, usize)], data: TensorData| {
        let shape = data.shape.to_vec();
        let (e, rows, cols) = (shape[0], shape[1], shape[2]);
        let elem = data.dtype.size();
        let bytes = data.as_bytes();
        let mut out = Vec::new();
        for x in 0..e {
            let mut row = 0;
            for (part, n) in parts {
                let start = (x * rows + row) * cols * elem;
                let chunk = bytes[start..start + n * cols * elem].to_vec();
                out.push((
                    format!("{prefix}.{}.{part}.weight", first_expert + x),
                    TensorData::from_bytes_vec(chunk, vec![*n, cols], data.dtype),
                ));
                row += n;
            }
        }
        out
    };
    if let Some(prefix) = name.strip_suffix(".gate_up_proj") {
        let i = data.shape[1] / 2;
        split(prefix, &[("gate_proj", i), ("up_proj", i)], data)
    } else if let Some(prefix) = name
        .strip_suffix(".experts.down_proj")
        .map(|p| format!("{p}.experts"))
    {
        let h = data.shape[1];
        split(&prefix, &[("down_proj", h)], data)
    } else {
        vec![(name.to_string(), data)]
    }
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

    pub(crate) fn export(&self, prefix: &str, out: &mut Export<B>) {
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

    pub(crate) fn export(&self, prefix: &str, out: &mut Export<B>) {
        export_param(out, format!("{prefix}.weight"), &self.weight);
    }
}

impl<B: jamba_kernels::JambaBackend> Linear<B> {
    /// `x @ weight^T + bias` over the last dimension (through `JambaBackend::linear`: a
    /// memory-bound kernel for the few rows of decoding on backends that have it).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let shape = x.dims();
        let d_in = shape[D - 1];
        let rows = shape.iter().take(D - 1).product();
        let y = <B as jamba_kernels::JambaBackend>::linear(
            x.reshape([rows, d_in]),
            self.weight.val(),
            self.bias.as_ref().map(|b| b.val()),
        );
        let mut out = shape;
        out[D - 1] = y.dims()[1];
        y.reshape(out)
    }
}

impl<B: jamba_kernels::JambaBackend> RmsNorm<B> {
    /// Normalises over the last dimension (through [`JambaBackend::rms_norm`]: one kernel on
    /// backends that have it).
    ///
    /// [`JambaBackend::rms_norm`]: jamba_kernels::JambaBackend::rms_norm
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let shape = x.dims();
        let dim = shape[D - 1];
        let rows = shape.iter().take(D - 1).product();
        B::rms_norm(x.reshape([rows, dim]), self.weight.val(), self.eps).reshape(shape)
    }
}
