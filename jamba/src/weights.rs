//! Where parameters come from: HF's random initialisation or a checkpoint.
//!
//! Every module is built by one constructor that asks a [`Weights`] for each tensor by its HF name,
//! shape and initialiser. Built from a checkpoint, the tensor is read (and checked against the shape);
//! built fresh, it is drawn as transformers' `_init_weights` does. Loading therefore never creates a
//! random model first, and reads one tensor at a time.

use std::collections::BTreeSet;

use burn::module::Param;
use burn::tensor::{backend::Backend, DType, Distribution, Tensor, TensorData};

use crate::checkpoint::Checkpoint;
use crate::error::{JambaError, Result};
use crate::parallel::DeviceMap;

/// How transformers initialises a parameter (`JambaPreTrainedModel._init_weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// `normal(0, initializer_range)`: linear, conv and expert weights.
    Normal,
    /// `normal(0, initializer_range)` with the padding row zeroed: the embedding.
    Embedding { pad_row: Option<usize> },
    /// Zeros: every bias.
    Zeros,
    /// Ones: RMSNorm weights and Mamba's `D`.
    Ones,
    /// `A_log[d, n] = log(n + 1)` (S4D-real).
    ALog,
}

enum Source<'a> {
    Random {
        std: f64,
    },
    Checkpoint {
        ckpt: &'a Checkpoint,
        used: BTreeSet<String>,
    },
}

/// Called with each tensor's name as it is loaded.
type Progress<'a> = Box<dyn FnMut(&str) + 'a>;

/// Hands out parameters by HF name, from a checkpoint or freshly initialised.
pub struct Weights<'a, B: Backend> {
    source: Source<'a>,
    device: B::Device,
    /// Spread the model over several devices (see [`DeviceMap`]).
    map: Option<DeviceMap<B::Device>>,
    dtype: DType,
    progress: Option<Progress<'a>>,
    /// Parameters of at most this many bytes are made under the persistent allocation mode.
    persistent_max_bytes: usize,
}

impl<'a, B: Backend> Weights<'a, B> {
    /// Fresh parameters with transformers' initialisation (`std` = `initializer_range`).
    pub fn random(std: f64, device: &B::Device, dtype: DType) -> Self {
        Self {
            source: Source::Random { std },
            device: device.clone(),
            map: None,
            dtype,
            progress: None,
            persistent_max_bytes: PERSISTENT_MAX_BYTES,
        }
    }

    /// Parameters read from a checkpoint and converted to `dtype`.
    pub fn checkpoint(ckpt: &'a Checkpoint, device: &B::Device, dtype: DType) -> Self {
        Self {
            source: Source::Checkpoint {
                ckpt,
                used: BTreeSet::new(),
            },
            device: device.clone(),
            map: None,
            dtype,
            progress: None,
            persistent_max_bytes: PERSISTENT_MAX_BYTES,
        }
    }

    /// Calls `f` with each tensor's name as it is loaded (for progress reports on big checkpoints).
    pub fn with_progress(mut self, f: impl FnMut(&str) + 'a) -> Self {
        self.progress = Some(Box::new(f));
        self
    }

    /// Makes the parameters of at most `bytes` under CubeCL's persistent allocation mode instead
    /// of [`PERSISTENT_MAX_BYTES`] (0: none, `usize::MAX`: all).
    pub fn with_persistent_max_bytes(mut self, bytes: usize) -> Self {
        self.persistent_max_bytes = bytes;
        self
    }

    /// Places the parameters on the devices of `map` (expert parallelism) instead of one device.
    pub fn with_device_map(mut self, map: DeviceMap<B::Device>) -> Self {
        self.device = map.first().clone();
        self.map = Some(map);
        self
    }

    /// The placement over several devices, if any.
    pub fn device_map(&self) -> Option<&DeviceMap<B::Device>> {
        self.map.as_ref()
    }

    /// Creates the next parameters on `device`.
    pub fn set_device(&mut self, device: B::Device) {
        self.device = device;
    }

    /// Rows `rows` (of dimension 0) of a tensor of the given full shape: from a checkpoint, the
    /// stored tensor is checked against `shape` and sliced on the host; fresh, only the rows are
    /// drawn.
    pub fn tensor_rows<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        rows: std::ops::Range<usize>,
        init: Init,
    ) -> Result<Tensor<B, D>> {
        if rows == (0..shape[0]) {
            return self.tensor(key, shape, init);
        }
        let mut part = shape;
        part[0] = rows.len();
        // A tensor read in parts counts once in the progress.
        if let (Some(f), 0) = (self.progress.as_mut(), rows.start) {
            f(key);
        }
        let data = match &mut self.source {
            Source::Random { .. } => None,
            Source::Checkpoint { .. } => {
                let full = self.data(key, shape)?;
                let row_bytes = full.num_elements() / shape[0].max(1) * full.dtype.size();
                let bytes = full.as_bytes()[rows.start * row_bytes..rows.end * row_bytes].to_vec();
                Some(TensorData::from_bytes_vec(bytes, part.to_vec(), full.dtype))
            }
        };
        self.make(part, init, data)
    }

    /// The tensor of `shape` from checkpoint `data`, or drawn with `init` when there is none;
    /// small ones under the persistent allocation mode ([`Self::with_persistent_max_bytes`]).
    fn make<const D: usize>(
        &self,
        shape: [usize; D],
        init: Init,
        data: Option<TensorData>,
    ) -> Result<Tensor<B, D>> {
        let (device, dtype) = (self.device.clone(), self.dtype);
        let std = match self.source {
            Source::Random { std } => std,
            Source::Checkpoint { .. } => 0.0,
        };
        let create = move || match data {
            Some(data) => Tensor::from_data(data, (&device, dtype)),
            None => random(shape, init, std, &device, dtype),
        };
        let bytes = shape.iter().product::<usize>() * dtype.size();
        if self.persistent_max_bytes == 0 || bytes > self.persistent_max_bytes {
            return Ok(create());
        }
        // Under fusion, operations registered before (a large parameter's, a stack of experts)
        // would otherwise run, and allocate, under the mode below.
        B::sync(&self.device).map_err(|e| JambaError::Device(e.to_string()))?;
        let device = self.device.clone();
        // CubeCL sets the mode back only when the closure returns: a panic inside (a device out
        // of memory) is caught and resumed after it, so the mode never outlives the call.
        let made = B::memory_persistent_allocations(&self.device, create, move |create| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let tensor = create();
                // Under fusion the operations that make the tensor run lazily: run them (and so
                // allocate their output) while the mode holds.
                B::sync(&device).map(|()| tensor)
            }))
        });
        match made {
            Ok(made) => made.map_err(|e| JambaError::Device(e.to_string())),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// The float dtype parameters are created in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device parameters are created on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// One parameter of the given shape.
    pub fn param<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Param<Tensor<B, D>>> {
        // `from_tensor` marks the parameter as trainable (a no-op on backends without autodiff).
        Ok(Param::from_tensor(self.tensor(key, shape, init)?))
    }

    /// One tensor of the given shape.
    pub fn tensor<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Tensor<B, D>> {
        if let Some(f) = self.progress.as_mut() {
            f(key);
        }
        let data = match &mut self.source {
            Source::Random { .. } => None,
            Source::Checkpoint { .. } => Some(self.data(key, shape)?),
        };
        self.make(shape, init, data)
    }

    /// A checkpoint tensor as host data in the parameters' dtype, checked against `shape`.
    fn data(&mut self, key: &str, shape: impl AsRef<[usize]>) -> Result<TensorData> {
        let shape = shape.as_ref();
        let Source::Checkpoint { ckpt, used } = &mut self.source else {
            unreachable!("only called for checkpoints");
        };
        let data = ckpt
            .read(key, self.dtype)?
            .ok_or_else(|| JambaError::MissingTensor {
                key: key.into(),
                expected: shape.to_vec(),
            })?;
        if data.shape.as_slice() != shape {
            return Err(JambaError::ShapeMismatch {
                key: key.into(),
                expected: shape.to_vec(),
                found: data.shape.to_vec(),
            });
        }
        used.insert(key.to_string());
        Ok(data)
    }

    /// Whether the source has a tensor of that name (always false for random weights).
    pub fn contains(&self, key: &str) -> bool {
        match &self.source {
            Source::Random { .. } => false,
            Source::Checkpoint { ckpt, .. } => ckpt.contains(key),
        }
    }

    /// Whether parameters come from a checkpoint.
    pub fn is_checkpoint(&self) -> bool {
        matches!(self.source, Source::Checkpoint { .. })
    }

    /// Fails if the checkpoint had tensors that no module asked for.
    pub fn finish(self) -> Result<()> {
        if let Source::Checkpoint { ckpt, used } = &self.source {
            let unexpected: Vec<String> = ckpt
                .names()
                .filter(|n| !used.contains(*n))
                .map(String::from)
                .collect();
            if let Some(first) = unexpected.first() {
                return Err(JambaError::UnexpectedTensors {
                    count: unexpected.len(),
                    first: first.clone(),
                    all: unexpected.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Parameters of at most this many bytes are made under CubeCL's persistent allocation mode.
///
/// Why: made in the pools that serve short-lived buffers, small parameters (norms, biases, the
/// conv and SSM constants, `dt_proj`, `x_proj`, the router, the smaller attention projections)
/// share the pages of a decoding step's activations, and every allocation searches and coalesces
/// every page of its pool: at batch 1 that search was most of the host's time per step.
/// Persistent allocations get one buffer each, outside those pools. Large parameters stay in the
/// pools: a decoding step's buffers are far smaller, so they come from other pools, and the
/// free part of the large parameters' pages serves the prefill's large activations (made
/// persistent too, they left those activations to reserve pages of their own: 5 GB more for the
/// "block" model's prefill rows on the H200).
///
/// CubeCL also serves every later allocation of exactly a persistent buffer's (padded) size
/// from persistent buffers, adding one when none is free and keeping it for reuse by that size
/// only: activations the size of a norm's weight, optimizer states the size of a parameter. This
/// bound keeps those sizes small. Parameters derived from several (the experts stacked
/// into one) stay in the pools whatever their size. The mode is set and reset per parameter:
/// a caller's own `memory_persistent_allocations` around a constructor ends at the first
/// small parameter.
pub const PERSISTENT_MAX_BYTES: usize = 8 << 20;

/// Waits for `devices` and frees every free buffer and page that CubeCL holds for the calling
/// thread on them (CubeCL's `memory_cleanup`): after building a model, the persistent buffers
/// of its temporaries and the pages only the build used. The constructors call it; a model
/// made with [`crate::JambaForCausalLM::build`] can.
pub fn release_build_leftovers<B: Backend>(devices: &[B::Device]) -> Result<()> {
    for device in devices {
        B::sync(device).map_err(|e| JambaError::Device(e.to_string()))?;
        B::memory_cleanup(device);
    }
    Ok(())
}

fn random<B: Backend, const D: usize>(
    shape: [usize; D],
    init: Init,
    std: f64,
    device: &B::Device,
    dtype: DType,
) -> Tensor<B, D> {
    match init {
        Init::Normal => Tensor::random(shape, Distribution::Normal(0.0, std), (device, dtype)),
        Init::Embedding { pad_row } => {
            let t = Tensor::random(shape, Distribution::Normal(0.0, std), (device, dtype));
            match pad_row {
                Some(row) if D == 2 && row < shape[0] => {
                    let mut zero_shape = shape;
                    zero_shape[0] = 1;
                    let mut ranges = shape.map(|s| 0..s);
                    ranges[0] = row..row + 1;
                    t.slice_assign(ranges, Tensor::zeros(zero_shape, (device, dtype)))
                }
                _ => t,
            }
        }
        Init::Zeros => Tensor::zeros(shape, (device, dtype)),
        Init::Ones => Tensor::ones(shape, (device, dtype)),
        Init::ALog => {
            let rows = shape[0];
            let n = shape.get(1).copied().unwrap_or(1);
            let row: Vec<f32> = (1..=n).map(|v| (v as f32).ln()).collect();
            let data: Vec<f32> = row.iter().copied().cycle().take(rows * n).collect();
            Tensor::from_data(TensorData::new(data, shape), (device, dtype))
        }
    }
}
