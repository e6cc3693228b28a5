//! Jamba's attention (`JambaAttention`): grouped-query attention with no positional encoding
//! (the Mamba layers before it provide position), scale `head_dim^-0.5`, softmax in f32.

use burn::module::Module;
use burn::tensor::{activation, backend::Backend, Bool, DType, Tensor};

use crate::config::JambaConfig;
use crate::error::Result;
use crate::nn::{Export, Linear};
use crate::weights::Weights;

/// Positions a KV cache grows by when it is full: appending a token writes into spare room, and
/// the buffer is reallocated only once every `KV_BLOCK` positions.
pub const KV_BLOCK: usize = 256;

/// Keys and values of the positions seen so far, in buffers of `[batch, kv_heads, capacity, head_dim]`
/// of which the first `len` positions are filled.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    len: usize,
    /// Stands in the buffers while an append holds them (see [`KvCache::append`]), kept so
    /// that an append allocates nothing.
    stand_in: Tensor<B, 4>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache with room for `capacity` positions.
    pub fn new(
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        let shape = [batch, kv_heads, capacity, head_dim];
        Self {
            keys: Tensor::zeros(shape, (device, dtype)),
            values: Tensor::zeros(shape, (device, dtype)),
            len: 0,
            stand_in: Tensor::empty([0, 0, 0, 0], (device, dtype)),
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions that fit before the buffers must grow.
    pub fn capacity(&self) -> usize {
        self.keys.dims()[2]
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        2 * self.keys.shape().num_elements() * self.keys.dtype().size()
    }

    /// The cached keys and values, `[batch, kv_heads, len, head_dim]`.
    pub fn get(&self) -> (Tensor<B, 4>, Tensor<B, 4>) {
        (
            self.keys.clone().narrow(2, 0, self.len),
            self.values.clone().narrow(2, 0, self.len),
        )
    }

    /// The key and value buffers `[batch, kv_heads, capacity, head_dim]`, of which the first
    /// [`len`](Self::len) positions are filled (for kernels that read them in place).
    pub fn buffers(&self) -> (Tensor<B, 4>, Tensor<B, 4>) {
        (self.keys.clone(), self.values.clone())
    }

    /// Grows the buffers by whole blocks if `n` more positions do not fit.
    pub fn reserve(&mut self, n: usize) {
        let needed = self.len + n;
        if needed > self.capacity() {
            let [batch, heads, _, hd] = self.keys.dims();
            let extra = (needed - self.capacity()).div_ceil(KV_BLOCK) * KV_BLOCK;
            let grow = |t: Tensor<B, 4>| {
                let pad = Tensor::zeros([batch, heads, extra, hd], (&t.device(), t.dtype()));
                Tensor::cat(vec![t, pad], 2)
            };
            self.keys = grow(self.keys.clone());
            self.values = grow(self.values.clone());
        }
    }

    /// Takes the key and value buffers out (an empty stand-in holds their place), so that an
    /// operation that appends to them holds their only references and writes in place. Give
    /// them back with [`KvCache::restore_buffers`].
    pub(crate) fn take_buffers(&mut self) -> (Tensor<B, 4>, Tensor<B, 4>) {
        (
            std::mem::replace(&mut self.keys, self.stand_in.clone()),
            std::mem::replace(&mut self.values, self.stand_in.clone()),
        )
    }

    /// Puts buffers taken by [`KvCache::take_buffers`] back, with `added` more positions filled.
    pub(crate) fn restore_buffers(
        &mut self,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
        added: usize,
    ) {
        self.keys = keys;
        self.values = values;
        self.len += added;
    }

    /// Appends `[batch, kv_heads, n, head_dim]` keys and values, growing by whole blocks if needed.
    pub fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) {
        let [batch, heads, n, hd] = k.dims();
        let needed = self.len + n;
        self.reserve(n);
        let range = [0..batch, 0..heads, self.len..needed, 0..hd];
        // Moving the buffers out leaves them uniquely owned (unless a fork shares them), so Burn
        // writes in place instead of copying the whole cache.
        let (keys, values) = self.take_buffers();
        self.restore_buffers(
            keys.slice_assign(range.clone(), k),
            values.slice_assign(range, v),
            n,
        );
    }
}

/// `JambaAttention`: q/k/v/o projections without bias.
#[derive(Module, Debug)]
pub struct JambaAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: jamba_kernels::JambaBackend> JambaAttention<B> {
    pub fn new(cfg: &JambaConfig, w: &mut Weights<B>, prefix: &str) -> Result<Self> {
        let h = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let p = |name: &str| format!("{prefix}.{name}");
        Ok(Self {
            q_proj: Linear::new(w, &p("q_proj"), h, nh * hd, false)?,
            k_proj: Linear::new(w, &p("k_proj"), h, nkv * hd, false)?,
            v_proj: Linear::new(w, &p("v_proj"), h, nkv * hd, false)?,
            o_proj: Linear::new(w, &p("o_proj"), nh * hd, h, false)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `hidden` `[batch, len, hidden]`; `mask` says what each query may not see. With `cache`, the
    /// new keys and values are appended to it and the queries attend to everything cached.
    pub fn forward(
        &self,
        hidden: Tensor<B, 3>,
        mask: &AttentionMask<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let [batch, len, _] = hidden.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([batch, len, n, hd]).swap_dims(1, 2);
        let q = heads(self.q_proj.forward(hidden.clone()), nh);
        let mut k = heads(self.k_proj.forward(hidden.clone()), nkv);
        let mut v = heads(self.v_proj.forward(hidden), nkv);
        let decoding = len == 1 && matches!(mask, AttentionMask::None);
        let mut seen = len;
        if let Some(cache) = cache {
            cache.append(k, v);
            seen = cache.len();
            // Decoding reads the buffers in place; the other paths take the filled positions.
            (k, v) = match decoding {
                true => cache.buffers(),
                false => cache.get(),
            };
        }
        if decoding {
            // The KV heads are shared inside the kernel, the cache is not repeated.
            let out = B::decode_attention(q, k, v, seen);
            return self.o_proj.forward(out.reshape([batch, 1, nh * hd]));
        }
        let out = match mask {
            // The KV heads are shared inside the kernels, not repeated.
            AttentionMask::Causal => B::causal_attention(q, k, v),
            AttentionMask::None | AttentionMask::Explicit(_) => {
                let repeat = jamba_kernels::reference::repeat_kv::<B>;
                let (k, v) = (repeat(k, nh / nkv), repeat(v, nh / nkv));
                let mask = match mask {
                    AttentionMask::Explicit(mask) => Some(mask),
                    _ => None,
                };
                attend(q, k, v, mask, hd)
            }
        };
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([batch, len, nh * hd]))
    }

    pub(crate) fn export(&self, prefix: &str, out: &mut Export<B>) {
        self.q_proj.export(&format!("{prefix}.q_proj"), out);
        self.k_proj.export(&format!("{prefix}.k_proj"), out);
        self.v_proj.export(&format!("{prefix}.v_proj"), out);
        self.o_proj.export(&format!("{prefix}.o_proj"), out);
    }
}

/// What the queries of one forward may not see.
#[derive(Debug, Clone)]
pub enum AttentionMask<B: Backend> {
    /// Nothing is masked (one new position, no padding).
    None,
    /// The future only (over new positions, after any cached ones), no padding:
    /// [`JambaBackend::causal_attention`](jamba_kernels::JambaBackend::causal_attention) applies
    /// it inside its kernel, and no mask or score matrix is built.
    Causal,
    /// `[batch, 1, len, past + len]`, true where a query may not look (future or padding).
    Explicit(Tensor<B, 4, Bool>),
}

impl<B: Backend> AttentionMask<B> {
    /// The mask on `device` (for a layer on another device).
    pub fn to_device(self, device: &B::Device) -> Self {
        match self {
            Self::Explicit(m) => Self::Explicit(crate::parallel::transfer(m, device)),
            other => other,
        }
    }
}

/// `[1, 1, len, past + len]`, true where query `q` (at position `past + q`) would see the future.
pub(crate) fn causal_mask<B: Backend>(
    len: usize,
    past: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    Tensor::tril_mask([1, 1, len, past + len], past as i64, device)
}

/// Scaled dot-product attention with the softmax in f32. A query row with every key masked (a
/// padding position) gets a zero output, as PyTorch's SDPA gives.
fn attend<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
    head_dim: usize,
) -> Tensor<B, 4> {
    let dtype = q.dtype();
    let scale = (head_dim as f64).powf(-0.5);
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .cast(DType::F32)
        .mul_scalar(scale);
    let probs = match mask {
        Some(mask) => {
            let [b, h, tq, tk] = scores.dims();
            let mask = mask.clone().expand([b, h, tq, tk]);
            // A finite fill keeps fully masked rows (and their gradients) free of NaN.
            let probs = activation::softmax(scores.mask_fill(mask.clone(), f32::MIN), 3);
            let empty_rows = mask.all_dim(3);
            probs.mask_fill(empty_rows.expand([b, h, tq, tk]), 0.0)
        }
        None => activation::softmax(scores, 3),
    };
    probs.cast(dtype).matmul(v)
}
