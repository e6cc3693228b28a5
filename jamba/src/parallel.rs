//! Several devices of one host.
//!
//! - Data-parallel training ([`DataParallelTrainer`]): one replica of the model and of the optimizer
//!   per device, each in its own thread, each taking a contiguous share of the rows of every batch.
//!   Gradients are summed over the replicas with burn-collective's all-reduce, so every replica
//!   takes the same step and the run equals single-device training with the same global batch.
//!   The load-balancing loss needs the whole batch's expert counts: those are all-reduced between
//!   the forward and the backward pass (see [`crate::train::RouterTerms::aux_share`]).
//! - Expert-parallel inference: the experts of every MoE layer are split over the devices and the
//!   other layers are spread over them in contiguous blocks (see [`DeviceMap`] and
//!   [`crate::JambaForCausalLM::init_on`] / [`crate::JambaForCausalLM::from_pretrained_on`]).

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use burn::collective::{self, CollectiveConfig, PeerId, ReduceOperation};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use jamba_kernels::JambaBackend;

use crate::error::{JambaError, Result};
use crate::model::JambaForCausalLM;
use crate::tokenizer::Tokenizer;
use crate::train::{StepReport, TrainConfig, Trainer};

/// One replica's place in a data-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// 0-based; replica 0 evaluates and writes checkpoints.
    pub rank: usize,
    /// Number of replicas.
    pub world: usize,
}

impl Peer {
    /// The rows of a `batch`-row global batch that this replica takes: contiguous, sizes differing
    /// by at most one.
    pub fn rows(&self, batch: usize) -> Range<usize> {
        self.rank * batch / self.world..(self.rank + 1) * batch / self.world
    }

    fn id(&self) -> PeerId {
        PeerId::from(self.rank)
    }

    /// Joins the group; every replica calls it, from its own thread, before any collective.
    /// `Bk` is the backend the collectives run on (the inner backend under autodiff).
    pub fn register<Bk: Backend>(&self, device: &Bk::Device) -> Result<()> {
        let config = CollectiveConfig::default().with_num_devices(self.world);
        collective::register::<Bk>(self.id(), device.clone(), config).map_err(collective_error)
    }

    /// Leaves the group.
    pub fn finish<Bk: Backend>(&self) -> Result<()> {
        collective::finish_collective::<Bk>(self.id()).map_err(collective_error)
    }

    /// The element-wise sum of `tensor` over all replicas (every replica calls it with the same
    /// shape, in the same order of calls).
    pub fn all_reduce_sum<Bk: Backend, const D: usize>(
        &self,
        tensor: Tensor<Bk, D>,
    ) -> Result<Tensor<Bk, D>> {
        if self.world == 1 {
            return Ok(tensor);
        }
        let out = collective::all_reduce::<Bk>(
            self.id(),
            tensor.into_primitive().tensor(),
            ReduceOperation::Sum,
        )
        .map_err(collective_error)?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    /// Sums every parameter's gradient over the replicas (burn-optim's all-reduce: one call per
    /// parameter, in parameter-id order, the same on every replica since they are forks of one
    /// model and every parameter gets a gradient from every shard).
    pub fn all_reduce_grads<B: AutodiffBackend>(
        &self,
        grads: GradientsParams,
    ) -> Result<GradientsParams> {
        if self.world == 1 {
            return Ok(grads);
        }
        grads
            .all_reduce::<B::InnerBackend>(self.id(), ReduceOperation::Sum)
            .map_err(collective_error)
    }
}

fn collective_error(e: collective::CollectiveError) -> JambaError {
    JambaError::Parallel(format!("collective operation failed: {e:?}"))
}

/// burn-collective runs one group per backend type in a process; a second trainer at the same
/// time would mix its calls with the first one's.
static GROUP_ACTIVE: AtomicBool = AtomicBool::new(false);

enum Command {
    Step,
    Evaluate(usize),
    Save {
        dir: PathBuf,
        tokenizer: Option<Box<Tokenizer>>,
        settings: serde_json::Value,
    },
    Params,
    Stop,
}

enum Reply {
    Step(Result<StepReport>),
    Evaluate(Result<f64>),
    Saved(Result<()>),
    Params(Vec<(String, TensorData)>),
}

struct Worker {
    commands: Sender<Command>,
    replies: Receiver<Reply>,
    handle: Option<JoinHandle<()>>,
}

/// Data-parallel training over several devices of one host (see the module docs): a [`Trainer`]
/// per device, driven in lockstep. Replica 0 evaluates and writes the checkpoints.
pub struct DataParallelTrainer<B: AutodiffBackend + JambaBackend> {
    workers: Vec<Worker>,
    /// Optimizer steps done.
    pub step: usize,
    pub config: TrainConfig,
    model_config: crate::JambaConfig,
    _backend: std::marker::PhantomData<B>,
}

impl<B> DataParallelTrainer<B>
where
    B: AutodiffBackend + JambaBackend + 'static,
    B::InnerBackend: JambaBackend,
{
    /// Replicates `model` on every device of `devices` (the first replica keeps `model`'s
    /// device if it is the first of the list). Each optimizer step takes `config.batch` rows per
    /// micro-batch in total, split over the replicas, so `config.batch` must be at least the
    /// number of devices.
    pub fn new(
        model: JambaForCausalLM<B>,
        data: crate::data::PackedDataset,
        config: TrainConfig,
        devices: &[B::Device],
    ) -> Result<Self> {
        Self::from_trainer(Trainer::new(model, data, config), devices)
    }

    /// Replicates a single-device trainer (model, optimizer state, step) on every device.
    pub fn from_trainer(trainer: Trainer<B>, devices: &[B::Device]) -> Result<Self> {
        let trainers = devices
            .iter()
            .map(|d| Trainer {
                model: trainer.model.clone().fork(d),
                optimizer: trainer.optimizer.to_device(d),
                data: trainer.data.clone(),
                config: trainer.config.clone(),
                step: trainer.step,
                peer: None,
            })
            .collect();
        Self::from_trainers(trainers, devices)
    }

    /// Continues a run from a checkpoint written by [`Self::save_checkpoint`] (or by a
    /// single-device [`Trainer`]), with one replica per device.
    pub fn resume(
        dir: &std::path::Path,
        data: crate::data::PackedDataset,
        config: TrainConfig,
        devices: &[B::Device],
        dtype: burn::tensor::DType,
    ) -> Result<Self> {
        let first = devices
            .first()
            .ok_or_else(|| JambaError::bad_input("devices", "need at least one device"))?;
        Self::from_trainer(Trainer::resume(dir, data, config, first, dtype)?, devices)
    }

    fn from_trainers(trainers: Vec<Trainer<B>>, devices: &[B::Device]) -> Result<Self> {
        let world = devices.len();
        if world == 0 {
            return Err(JambaError::bad_input("devices", "need at least one device"));
        }
        let config = trainers[0].config.clone();
        if config.batch < world {
            return Err(JambaError::bad_input(
                "batch",
                format!(
                    "a batch of {} rows cannot be split over {world} devices",
                    config.batch
                ),
            ));
        }
        if GROUP_ACTIVE.swap(true, Ordering::SeqCst) {
            return Err(JambaError::Parallel(
                "another data-parallel trainer is running in this process".into(),
            ));
        }
        let step = trainers[0].step;
        let model_config = trainers[0].model.config.clone();
        let workers = trainers
            .into_iter()
            .zip(devices)
            .enumerate()
            .map(|(rank, (mut trainer, device))| {
                let peer = Peer { rank, world };
                trainer.peer = Some(peer);
                let device = device.clone();
                let (commands, inbox) = channel();
                let (outbox, replies) = channel();
                let handle = std::thread::Builder::new()
                    .name(format!("jamba-replica-{rank}"))
                    .spawn(move || replica(trainer, peer, device, inbox, outbox))
                    .expect("spawning a replica thread");
                Worker {
                    commands,
                    replies,
                    handle: Some(handle),
                }
            })
            .collect();
        Ok(Self {
            workers,
            step,
            config,
            model_config,
            _backend: std::marker::PhantomData,
        })
    }

    /// Number of replicas.
    pub fn devices(&self) -> usize {
        self.workers.len()
    }

    /// The model's config.
    pub fn model_config(&self) -> &crate::JambaConfig {
        &self.model_config
    }

    fn send(&self, rank: usize, command: Command) -> Result<()> {
        self.workers[rank]
            .commands
            .send(command)
            .map_err(|_| stopped(rank))
    }

    fn receive(&self, rank: usize) -> Result<Reply> {
        self.workers[rank].replies.recv().map_err(|_| stopped(rank))
    }

    /// One optimizer step on every replica; the report (loss over the whole global batch) is
    /// replica 0's, which all replicas share.
    pub fn train_step(&mut self) -> Result<StepReport> {
        for rank in 0..self.workers.len() {
            self.send(rank, Command::Step)?;
        }
        // Every reply is taken, so that the next command's replies are not read as this one's.
        let reports = (0..self.workers.len())
            .map(|rank| match self.receive(rank)? {
                Reply::Step(r) => r,
                _ => unreachable!("a replica answers each command in order"),
            })
            .collect::<Vec<_>>();
        let report = reports
            .into_iter()
            .reduce(|first, next| match (first, next) {
                (Ok(report), Ok(_)) => Ok(report),
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            })
            .expect("at least one replica")?;
        self.step += 1;
        Ok(report)
    }

    /// Mean cross-entropy over (at most `max_batches` of) the validation set, on replica 0.
    pub fn evaluate(&self, max_batches: usize) -> Result<f64> {
        self.send(0, Command::Evaluate(max_batches))?;
        match self.receive(0)? {
            Reply::Evaluate(r) => r,
            _ => unreachable!("a replica answers each command in order"),
        }
    }

    /// Writes replica 0's checkpoint (see [`Trainer::save_checkpoint`]): once, atomically.
    pub fn save_checkpoint(
        &self,
        dir: &std::path::Path,
        tokenizer: Option<&Tokenizer>,
        settings: serde_json::Value,
    ) -> Result<()> {
        self.send(
            0,
            Command::Save {
                dir: dir.to_path_buf(),
                tokenizer: tokenizer.map(|t| Box::new(t.clone())),
                settings,
            },
        )?;
        match self.receive(0)? {
            Reply::Saved(r) => r,
            _ => unreachable!("a replica answers each command in order"),
        }
    }

    /// Every replica's parameters by name, as host data (for checking that they agree).
    pub fn replica_params(&self) -> Result<Vec<Vec<(String, TensorData)>>> {
        for rank in 0..self.workers.len() {
            self.send(rank, Command::Params)?;
        }
        (0..self.workers.len())
            .map(|rank| match self.receive(rank)? {
                Reply::Params(p) => Ok(p),
                _ => unreachable!("a replica answers each command in order"),
            })
            .collect()
    }
}

fn stopped(rank: usize) -> JambaError {
    JambaError::Parallel(format!("replica {rank} stopped"))
}

impl<B: AutodiffBackend + JambaBackend> Drop for DataParallelTrainer<B> {
    fn drop(&mut self) {
        for w in &self.workers {
            let _ = w.commands.send(Command::Stop);
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
        GROUP_ACTIVE.store(false, Ordering::SeqCst);
    }
}

/// The loop of one replica's thread.
fn replica<B>(
    mut trainer: Trainer<B>,
    peer: Peer,
    device: B::Device,
    inbox: Receiver<Command>,
    outbox: Sender<Reply>,
) where
    B: AutodiffBackend + JambaBackend,
    B::InnerBackend: JambaBackend,
{
    let registered = peer.register::<B::InnerBackend>(&device);
    while let Ok(command) = inbox.recv() {
        let reply = match command {
            Command::Step => Reply::Step(match &registered {
                Ok(()) => trainer.train_step(),
                Err(e) => Err(JambaError::Parallel(e.to_string())),
            }),
            Command::Evaluate(n) => Reply::Evaluate(trainer.evaluate(n)),
            Command::Save {
                dir,
                tokenizer,
                settings,
            } => Reply::Saved(trainer.save_checkpoint(&dir, tokenizer.as_deref(), settings)),
            Command::Params => Reply::Params(
                trainer
                    .model
                    .named_params()
                    .into_iter()
                    .map(|p| (p.name, p.param.data()))
                    .collect(),
            ),
            Command::Stop => break,
        };
        if outbox.send(reply).is_err() {
            break;
        }
    }
    if registered.is_ok() {
        let _ = peer.finish::<B::InnerBackend>();
    }
}

/// Where the parts of a model live when it is spread over several devices for inference
/// (expert parallelism): the experts of every MoE layer are split over all devices in contiguous
/// ranges, and the layers' other weights (attention, Mamba, norms, dense MLPs, routers) over the
/// devices in contiguous blocks of layers, so a model larger than one device fits. The embedding
/// lives on the first device, the final norm and an untied LM head on the last.
///
/// The hidden states go from device to device with the layers; each MoE layer sends its tokens to
/// the devices that hold their routed experts and sums the weighted results back.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMap<D> {
    devices: Vec<D>,
}

impl<D: Clone> DeviceMap<D> {
    /// Spreads a model over `devices` (at least one; one device is the ordinary placement).
    pub fn new(devices: Vec<D>) -> Result<Self> {
        if devices.is_empty() {
            return Err(JambaError::bad_input("devices", "need at least one device"));
        }
        Ok(Self { devices })
    }

    /// All devices, in order.
    pub fn devices(&self) -> &[D] {
        &self.devices
    }

    /// The first device (embedding, inputs).
    pub fn first(&self) -> &D {
        &self.devices[0]
    }

    /// The last device (final norm, LM head).
    pub fn last(&self) -> &D {
        &self.devices[self.devices.len() - 1]
    }

    /// The device of layer `layer` of `layers` (everything but its experts).
    pub fn layer(&self, layer: usize, layers: usize) -> &D {
        &self.devices[layer * self.devices.len() / layers.max(1)]
    }

    /// The experts of a `experts`-expert layer held by device `k`: a contiguous range, sizes
    /// differing by at most one (empty when there are more devices than experts).
    pub fn experts(&self, k: usize, experts: usize) -> Range<usize> {
        let n = self.devices.len();
        k * experts / n..(k + 1) * experts / n
    }
}

/// Device indices from a command-line value: a count `N` (devices `0..N`) or a comma-separated
/// list of indices (`0,0` puts two replicas on device 0, to check the multi-device path on one).
pub fn parse_device_indices(value: &str) -> std::result::Result<Vec<usize>, String> {
    let bad = || format!("`{value}`: expected a count (e.g. 2) or device indices (e.g. 0,1)");
    if value.contains(',') {
        return value
            .split(',')
            .map(|v| v.trim().parse::<usize>().map_err(|_| bad()))
            .collect();
    }
    match value.trim().parse::<usize>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(n) => Ok((0..n).collect()),
    }
}

/// Device indices given on a command line (see [`parse_device_indices`]); `"1"` is device 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIndices(pub Vec<usize>);

impl std::str::FromStr for DeviceIndices {
    type Err = String;

    fn from_str(value: &str) -> std::result::Result<Self, String> {
        parse_device_indices(value).map(Self)
    }
}

/// `tensor` on `device`. wgpu cannot copy between its devices (its runtime has no peer copy), so
/// there the data goes through the host; CUDA copies between GPUs directly.
pub fn transfer<B: Backend, const D: usize, K: burn::tensor::BasicOps<B>>(
    tensor: Tensor<B, D, K>,
    device: &B::Device,
) -> Tensor<B, D, K> {
    if tensor.device() == *device {
        return tensor;
    }
    if B::name(device).contains("wgpu") {
        let dtype = tensor.dtype();
        Tensor::from_data(tensor.into_data(), (device, dtype))
    } else {
        tensor.to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_parse_counts_and_indices() {
        assert_eq!(parse_device_indices("1").unwrap(), vec![0]);
        assert_eq!(parse_device_indices("3").unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_device_indices("0,0").unwrap(), vec![0, 0]);
        assert_eq!(parse_device_indices("2, 5").unwrap(), vec![2, 5]);
        assert_eq!(
            "2".parse::<DeviceIndices>().unwrap(),
            DeviceIndices(vec![0, 1])
        );
        for bad in ["0", "", "x", "1,", "-1"] {
            assert!(parse_device_indices(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn layers_and_experts_are_split_in_contiguous_balanced_ranges() {
        let map = DeviceMap::new(vec!['a', 'b', 'c']).unwrap();
        let layers: String = (0..8).map(|l| *map.layer(l, 8)).collect();
        assert_eq!(layers, "aaabbbcc");
        let experts: Vec<_> = (0..3).map(|k| map.experts(k, 16)).collect();
        assert_eq!(experts, vec![0..5, 5..10, 10..16]);
        // More devices than experts: some devices hold none, every expert is held once.
        let map = DeviceMap::new(vec![(); 5]).unwrap();
        let held: Vec<usize> = (0..5).flat_map(|k| map.experts(k, 4)).collect();
        assert_eq!(held, vec![0, 1, 2, 3]);
        assert!(DeviceMap::<()>::new(vec![]).is_err());
    }

    #[test]
    fn replicas_split_rows_without_gaps() {
        for (batch, world) in [(5, 3), (8, 4), (3, 3), (7, 2)] {
            let rows: Vec<usize> = (0..world)
                .flat_map(|rank| Peer { rank, world }.rows(batch))
                .collect();
            assert_eq!(rows, (0..batch).collect::<Vec<_>>(), "{batch} over {world}");
        }
    }
}
