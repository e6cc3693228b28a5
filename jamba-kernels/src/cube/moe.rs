//! The grouped (dropless) MoE on the device: routing, gather, grouped matmuls, SwiGLU and the
//! weighted combine of [`super::moe_kernels`], forward and backward. The backward recomputes
//! the routing and the experts' activations from the inputs instead of keeping them.

use burn::tensor::{DType, Int, Shape, Tensor};
use burn_cubecl::{
    cubecl::{
        ir::{features::MmaConfig, StorageType},
        prelude::{ComputeClient, CubeCount, CubeDim},
    },
    ops::numeric::empty_device_dtype,
    tensor::CubeTensor,
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement,
};

use super::moe_kernels::{
    self as k, GEMM_UNITS, MMA_PLANE, MMA_PLANES, MMA_TILE, ROUTE_UNITS, TILE_M, TILE_N,
};
use super::{elemwise_launch, grid, prim, rows_launch};
use crate::{MoeGrads, MoeInput};

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// Units per cube of the routing-weight gradient (one cube per pair).
const DOT_UNITS: usize = 128;
/// The largest dimension of a grid.
const GRID_MAX: usize = 65535;

// The routing counts row tiles of `TILE_M`; both matmul kernels must use that size.
const _: () = assert!(TILE_M == MMA_TILE && TILE_N == MMA_TILE);

/// Whether the tensor-core kernels run for `dtype`: f16/bf16 inputs, 16 x 16 x 16 cooperative
/// matrices with f32 accumulators, and planes of exactly 32 units (what they are written for).
fn use_mma<R: CubeRuntime>(client: &ComputeClient<R>, dtype: DType) -> bool {
    if !matches!(dtype, DType::BF16 | DType::F16) || !super::use_kernel("moe_mma") {
        return false;
    }
    let hardware = &client.properties().hardware;
    let st: StorageType = dtype.into();
    hardware.plane_size_min == MMA_PLANE as u32
        && hardware.plane_size_max == MMA_PLANE as u32
        && client.features().matmul.cmma.contains(&MmaConfig {
            a_type: st,
            b_type: st,
            cd_type: DType::F32.into(),
            m: 16,
            n: 16,
            k: 16,
        })
}

fn mma_dim() -> CubeDim {
    CubeDim::new_2d(MMA_PLANE as u32, MMA_PLANES as u32)
}

/// A layer's (token, slot) pairs sorted by the expert held here.
struct Routing<R: CubeRuntime> {
    /// `[pairs]`: the pair of each sorted row (rows past `offsets[experts]` unused).
    perm: CubeTensor<R>,
    /// `[pairs]`: the row of each pair, or `NO_ROW`.
    pos: CubeTensor<R>,
    /// `[experts + 1]`: the first row of each expert, then the number of routed rows.
    offsets: CubeTensor<R>,
    /// `[experts + 1]`: the first row tile of each expert, then the number of tiles.
    tile_offsets: CubeTensor<R>,
    /// `tokens * top_k`: the most rows the routing can produce.
    pairs: usize,
    experts: usize,
}

fn u32_buffer<R: CubeRuntime>(like: &CubeTensor<R>, len: usize) -> CubeTensor<R> {
    empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::new([len.max(1)]),
        DType::U32,
    )
}

fn route<R: CubeRuntime>(
    chosen: CubeTensor<R>,
    pairs: usize,
    experts: usize,
    first: usize,
) -> Routing<R> {
    let blocks = pairs.div_ceil(ROUTE_UNITS).max(1);
    let block_counts = u32_buffer(&chosen, blocks * experts);
    let rank = u32_buffer(&chosen, pairs);
    let offsets = u32_buffer(&chosen, experts + 1);
    let tile_offsets = u32_buffer(&chosen, experts + 1);
    let perm = u32_buffer(&chosen, pairs);
    let pos = u32_buffer(&chosen, pairs);
    let client = chosen.client.clone();
    let int_dtype = chosen.dtype;
    let cube_dim = CubeDim::new_1d(ROUTE_UNITS as u32);
    unsafe {
        k::route_count_kernel::launch_unchecked::<R>(
            &client,
            grid(blocks, 1),
            cube_dim,
            chosen.clone().into_tensor_arg(),
            block_counts.clone().into_tensor_arg(),
            rank.clone().into_tensor_arg(),
            first,
            experts,
            int_dtype.into(),
        );
        k::route_scan_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(1, 1, 1),
            cube_dim,
            block_counts.clone().into_tensor_arg(),
            offsets.clone().into_tensor_arg(),
            tile_offsets.clone().into_tensor_arg(),
            blocks,
            experts,
        );
        k::route_place_kernel::launch_unchecked::<R>(
            &client,
            grid(blocks, 1),
            cube_dim,
            chosen.into_tensor_arg(),
            block_counts.into_tensor_arg(),
            rank.into_tensor_arg(),
            offsets.clone().into_tensor_arg(),
            perm.clone().into_tensor_arg(),
            pos.clone().into_tensor_arg(),
            first,
            experts,
            int_dtype.into(),
        );
    }
    Routing {
        perm,
        pos,
        offsets,
        tile_offsets,
        pairs,
        experts,
    }
}

/// `t` itself when its last dimension's stride is 1 (what the vectorised kernels read), else a
/// contiguous copy.
fn columns_adjacent<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    match t.meta.strides().last() {
        Some(1) => t,
        _ => burn_cubecl::kernel::into_contiguous(t),
    }
}

/// `[pairs, hidden]`: the token row of each sorted row, scaled by its routing weight if asked.
fn gather<R, F, I, BT>(
    x: &Tensor<Cube<R, F, I, BT>, 2>,
    weights: &Tensor<Cube<R, F, I, BT>, 2>,
    routing: &Routing<R>,
    scaled: bool,
) -> Tensor<Cube<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [_, hidden] = x.dims();
    let dtype = x.dtype();
    let out = Tensor::<Cube<R, F, I, BT>, 2>::empty([routing.pairs, hidden], (&x.device(), dtype));
    let x = columns_adjacent(prim(x.clone()));
    let client = x.client.clone();
    let vector = super::aligned_vector_width(&[&x, &prim(out.clone())], hidden);
    let (count, dim) = rows_launch(hidden / vector, routing.pairs);
    unsafe {
        k::moe_gather_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            vector,
            x.into_tensor_arg(),
            prim(weights.clone()).into_tensor_arg(),
            routing.perm.clone().into_tensor_arg(),
            routing.offsets.clone().into_tensor_arg(),
            prim(out.clone()).into_tensor_arg(),
            scaled,
            dtype.into(),
        );
    }
    out
}

/// `[tokens, hidden]`: each token's sum over its pairs' rows of `y`, weighted if asked.
fn combine<R, F, I, BT>(
    y: Tensor<Cube<R, F, I, BT>, 2>,
    weights: &Tensor<Cube<R, F, I, BT>, 2>,
    routing: &Routing<R>,
    weighted: bool,
) -> Tensor<Cube<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [tokens, _] = weights.dims();
    let [_, hidden] = y.dims();
    let dtype = y.dtype();
    let out = Tensor::<Cube<R, F, I, BT>, 2>::empty([tokens, hidden], (&y.device(), dtype));
    let y = columns_adjacent(prim(y));
    let client = y.client.clone();
    let vector = super::aligned_vector_width(&[&y, &prim(out.clone())], hidden);
    let (count, dim) = rows_launch(hidden / vector, tokens);
    unsafe {
        k::moe_combine_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            vector,
            y.into_tensor_arg(),
            prim(weights.clone()).into_tensor_arg(),
            routing.pos.clone().into_tensor_arg(),
            prim(out.clone()).into_tensor_arg(),
            weighted,
            dtype.into(),
        );
    }
    out
}

/// `[pairs, N]`: row `r` is `a[r] @ b[e(r)]^T` for `b` `[experts, N, K]` (any strides).
fn grouped_gemm<R, F, I, BT>(
    a: Tensor<Cube<R, F, I, BT>, 2>,
    b: Tensor<Cube<R, F, I, BT>, 3>,
    routing: &Routing<R>,
) -> Tensor<Cube<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [_, n, _] = b.dims();
    let dtype = a.dtype();
    let c = Tensor::<Cube<R, F, I, BT>, 2>::empty([routing.pairs, n], (&a.device(), dtype));
    let a = prim(a);
    let b = prim(b);
    let b_k_contiguous = b.meta.strides()[2] == 1;
    let client = a.client.clone();
    // Enough row tiles for any routing: each expert's last tile may be partial.
    let tiles = routing.pairs.div_ceil(TILE_M) + routing.experts;
    let y = tiles.min(GRID_MAX);
    let count = CubeCount::Static(
        n.div_ceil(TILE_N) as u32,
        y as u32,
        tiles.div_ceil(y) as u32,
    );
    let args = (
        a.into_tensor_arg(),
        b.into_tensor_arg(),
        routing.offsets.clone().into_tensor_arg(),
        routing.tile_offsets.clone().into_tensor_arg(),
        prim(c.clone()).into_tensor_arg(),
    );
    unsafe {
        if use_mma(&client, dtype) {
            k::grouped_gemm_mma_kernel::launch_unchecked::<R>(
                &client,
                count,
                mma_dim(),
                args.0,
                args.1,
                args.2,
                args.3,
                args.4,
                routing.experts,
                b_k_contiguous,
                dtype.into(),
            );
        } else {
            k::grouped_gemm_kernel::launch_unchecked::<R>(
                &client,
                count,
                CubeDim::new_1d(GEMM_UNITS as u32),
                args.0,
                args.1,
                args.2,
                args.3,
                args.4,
                routing.experts,
                b_k_contiguous,
                dtype.into(),
            );
        }
    }
    c
}

/// `[experts, P, Q]`: per expert, the sum over its rows of `p[r]^T q[r]`.
fn grouped_outer<R, F, I, BT>(
    p: &Tensor<Cube<R, F, I, BT>, 2>,
    q: &Tensor<Cube<R, F, I, BT>, 2>,
    routing: &Routing<R>,
    dtype: DType,
) -> Tensor<Cube<R, F, I, BT>, 3>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [_, pd] = p.dims();
    let [_, qd] = q.dims();
    let out =
        Tensor::<Cube<R, F, I, BT>, 3>::empty([routing.experts, pd, qd], (&p.device(), dtype));
    let p = prim(p.clone());
    let client = p.client.clone();
    let tiles = pd.div_ceil(TILE_M) * qd.div_ceil(TILE_N);
    let x = tiles.min(GRID_MAX);
    let count = CubeCount::Static(x as u32, tiles.div_ceil(x) as u32, routing.experts as u32);
    let args = (
        p.into_tensor_arg(),
        prim(q.clone()).into_tensor_arg(),
        routing.offsets.clone().into_tensor_arg(),
        prim(out.clone()).into_tensor_arg(),
    );
    unsafe {
        if use_mma(&client, dtype) {
            k::grouped_outer_mma_kernel::launch_unchecked::<R>(
                &client,
                count,
                mma_dim(),
                args.0,
                args.1,
                args.2,
                args.3,
                dtype.into(),
            );
        } else {
            k::grouped_outer_kernel::launch_unchecked::<R>(
                &client,
                count,
                CubeDim::new_1d(GEMM_UNITS as u32),
                args.0,
                args.1,
                args.2,
                args.3,
                dtype.into(),
            );
        }
    }
    out
}

fn swiglu<R, F, I, BT>(
    gu: &Tensor<Cube<R, F, I, BT>, 2>,
    routing: &Routing<R>,
) -> Tensor<Cube<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [rows, two_i] = gu.dims();
    let dtype = gu.dtype();
    let act = Tensor::<Cube<R, F, I, BT>, 2>::empty([rows, two_i / 2], (&gu.device(), dtype));
    // The kernel reads rows whose columns are adjacent.
    let g = columns_adjacent(prim(gu.clone()));
    let client = g.client.clone();
    let vector = super::aligned_vector_width(&[&g, &prim(act.clone())], two_i / 2);
    let (count, dim) = rows_launch((two_i / 2) / vector, rows);
    unsafe {
        k::swiglu_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            vector,
            g.into_tensor_arg(),
            routing.offsets.clone().into_tensor_arg(),
            prim(act.clone()).into_tensor_arg(),
            dtype.into(),
        );
    }
    act
}

/// `silu(gate) * up` through [`k::swiglu_pair_kernel`], in the widest vectors that divide the
/// width and every row stride (inputs whose columns are not adjacent are copied first).
pub(crate) fn swiglu_pair<R, F, I, BT>(
    gate: Tensor<Cube<R, F, I, BT>, 2>,
    up: Tensor<Cube<R, F, I, BT>, 2>,
) -> Tensor<Cube<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [rows, cols] = gate.dims();
    let dtype = gate.dtype();
    let (g, u) = (columns_adjacent(prim(gate)), columns_adjacent(prim(up)));
    let act = Tensor::<Cube<R, F, I, BT>, 2>::empty([rows, cols], (&g.device, dtype));
    if rows == 0 || cols == 0 {
        return act;
    }
    let a = prim(act.clone());
    let vector = super::aligned_vector_width(&[&g, &u, &a], cols);
    let client = g.client.clone();
    let (count, dim) = rows_launch(cols / vector, rows);
    unsafe {
        k::swiglu_pair_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            vector,
            g.into_tensor_arg(),
            u.into_tensor_arg(),
            a.into_tensor_arg(),
            dtype.into(),
        );
    }
    act
}

fn swiglu_backward<R, F, I, BT>(
    gu: &Tensor<Cube<R, F, I, BT>, 2>,
    dact: Tensor<Cube<R, F, I, BT>, 2>,
    routing: &Routing<R>,
) -> Tensor<Cube<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [rows, two_i] = gu.dims();
    let dtype = gu.dtype();
    let dgu = Tensor::<Cube<R, F, I, BT>, 2>::empty([rows, two_i], (&gu.device(), dtype));
    let g = prim(gu.clone());
    let client = g.client.clone();
    let (count, dim) = rows_launch(two_i / 2, rows);
    unsafe {
        k::swiglu_bwd_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            g.into_tensor_arg(),
            prim(dact).into_tensor_arg(),
            routing.offsets.clone().into_tensor_arg(),
            prim(dgu.clone()).into_tensor_arg(),
            dtype.into(),
        );
    }
    dgu
}

/// Pairs (tokens x top-k, routed here or not) from which each expert's block of sorted rows goes through Burn's matmul
/// (cubek) instead of the grouped kernels, after one read of the `experts + 1` row offsets:
/// at prefill and training sizes cubek's tiled matmuls are faster than the grouped kernels (see
/// BENCHMARKS.md). `JAMBA_MOE_PER_EXPERT_PAIRS` overrides it.
pub const PER_EXPERT_PAIRS: usize = 2048;

fn per_expert_pairs() -> usize {
    static PAIRS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAIRS.get_or_init(|| {
        std::env::var("JAMBA_MOE_PER_EXPERT_PAIRS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(PER_EXPERT_PAIRS)
    })
}

/// The row offsets of the experts, on the host.
fn host_offsets<R, F, I, BT>(routing: &Routing<R>) -> Vec<usize>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    Tensor::<Cube<R, F, I, BT>, 1, Int>::from_primitive(routing.offsets.clone())
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("int data")
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

/// `[total, _]`: each expert's block of rows of `a` times its matrix `b[e]` (`[N, K]`):
/// `a_e @ b_e^T` when `transpose`, else `a_e @ b_e`. A zero row when no row is routed here.
fn per_expert_gemm<R, F, I, BT>(
    a: &Tensor<Cube<R, F, I, BT>, 2>,
    b: &Tensor<Cube<R, F, I, BT>, 3>,
    offsets: &[usize],
    transpose: bool,
) -> Tensor<Cube<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [_, n, k] = b.dims();
    let cols = if transpose { n } else { k };
    let experts: Vec<usize> = (0..offsets.len() - 1)
        .filter(|&e| offsets[e + 1] > offsets[e])
        .collect();
    if experts.is_empty() {
        return Tensor::zeros([1, cols], (&a.device(), a.dtype()));
    }
    let rows = |e: usize| a.clone().narrow(0, offsets[e], offsets[e + 1] - offsets[e]);
    let total = offsets[offsets.len() - 1];
    let weight = |e: usize| {
        let w = b.clone().narrow(0, e, 1).reshape([n, k]);
        match transpose {
            true => w.transpose(),
            false => w,
        }
    };
    // Through cuBLAS each expert's product writes its rows of one output (no copies); a
    // product it declines sends the whole call to the path below.
    let min_rows = crate::cublas_min_rows();
    if experts
        .iter()
        .all(|&e| offsets[e + 1] - offsets[e] >= min_rows)
    {
        let out = Tensor::<Cube<R, F, I, BT>, 2>::empty([total, cols], (&a.device(), a.dtype()));
        let in_place = experts.iter().all(|&e| {
            super::matmul::routine_matmul_into_rows(&rows(e), &weight(e), &out, offsets[e])
        });
        if in_place {
            return out;
        }
    }
    let parts = experts
        .iter()
        .map(|&e| super::matmul::matmul(rows(e), weight(e)))
        .collect();
    Tensor::cat(parts, 0)
}

/// `[experts, P, Q]`: per expert, `p_e^T @ q_e` over its block of rows (zero when empty).
fn per_expert_outer<R, F, I, BT>(
    p: &Tensor<Cube<R, F, I, BT>, 2>,
    q: &Tensor<Cube<R, F, I, BT>, 2>,
    offsets: &[usize],
    dtype: DType,
) -> Tensor<Cube<R, F, I, BT>, 3>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [_, pd] = p.dims();
    let [_, qd] = q.dims();
    let parts = (0..offsets.len() - 1)
        .map(|e| {
            let rows = offsets[e + 1] - offsets[e];
            if rows == 0 {
                return Tensor::zeros([pd, qd], (&p.device(), dtype));
            }
            let pe = p.clone().narrow(0, offsets[e], rows);
            let qe = q.clone().narrow(0, offsets[e], rows);
            super::matmul::matmul(pe.transpose(), qe).cast(dtype)
        })
        .collect();
    Tensor::stack(parts, 0)
}

/// The experts' forward on the sorted rows.
struct Forward<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> {
    routing: Routing<R>,
    /// The row offsets on the host when the per-expert matmuls run.
    host: Option<Vec<usize>>,
    xs: Tensor<Cube<R, F, I, BT>, 2>,
    gu: Tensor<Cube<R, F, I, BT>, 2>,
    act: Tensor<Cube<R, F, I, BT>, 2>,
    y: Tensor<Cube<R, F, I, BT>, 2>,
}

fn experts_forward<R, F, I, BT>(
    input: &MoeInput<Cube<R, F, I, BT>>,
    weights: &Tensor<Cube<R, F, I, BT>, 2>,
) -> Forward<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [tokens, top_k] = input.chosen.dims();
    let experts = input.gate_up.dims()[0];
    let chosen: CubeTensor<R> = input.chosen.clone().into_primitive();
    let routing = route(chosen, tokens * top_k, experts, input.first);
    let host = (routing.pairs >= per_expert_pairs()).then(|| host_offsets::<R, F, I, BT>(&routing));
    let xs = gather(&input.x, weights, &routing, false);
    let gu = match &host {
        Some(o) => per_expert_gemm(&xs, &input.gate_up, o, true),
        None => grouped_gemm(xs.clone(), input.gate_up.clone(), &routing),
    };
    let act = swiglu(&gu, &routing);
    let y = match &host {
        Some(o) => per_expert_gemm(&act, &input.down, o, true),
        None => grouped_gemm(act.clone(), input.down.clone(), &routing),
    };
    Forward {
        routing,
        host,
        xs,
        gu,
        act,
        y,
    }
}

/// Checks the inputs agree; the caller falls back to the reference when they do not.
pub(super) fn supported<R, F, I, BT>(input: &MoeInput<Cube<R, F, I, BT>>) -> bool
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    crate::moe_kernels_apply(input)
}

pub(super) fn moe_grouped<R, F, I, BT>(
    input: MoeInput<Cube<R, F, I, BT>>,
) -> Tensor<Cube<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let weights = input.weights.clone().cast(input.x.dtype());
    let f = experts_forward(&input, &weights);
    combine(f.y, &weights, &f.routing, true)
}

pub(super) fn moe_grouped_backward<R, F, I, BT>(
    input: &MoeInput<Cube<R, F, I, BT>>,
    grad: Tensor<Cube<R, F, I, BT>, 2>,
) -> MoeGrads<Cube<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = input.x.dtype();
    let weights = input.weights.clone().cast(dtype);
    let grad = grad.cast(dtype);
    let Forward {
        routing,
        host,
        xs,
        gu,
        act,
        y,
    } = experts_forward(input, &weights);

    let [tokens, top_k] = weights.dims();
    let dweights = Tensor::<Cube<R, F, I, BT>, 2>::empty([tokens, top_k], (&grad.device(), dtype));
    {
        let g = prim(grad.clone());
        let client = g.client.clone();
        unsafe {
            k::moe_pair_dot_kernel::launch_unchecked::<R>(
                &client,
                grid(tokens * top_k, 1),
                CubeDim::new_1d(DOT_UNITS as u32),
                g.into_tensor_arg(),
                prim(y).into_tensor_arg(),
                routing.pos.clone().into_tensor_arg(),
                prim(dweights.clone()).into_tensor_arg(),
                DOT_UNITS,
                dtype.into(),
            );
        }
    }
    // Each sorted row's output gradient: the token's, times the pair's routing weight.
    let dy = gather(&grad, &weights, &routing, true);
    let (dact, ddown) = match &host {
        Some(o) => (
            per_expert_gemm(&dy, &input.down, o, false),
            per_expert_outer(&dy, &act, o, input.down.dtype()),
        ),
        None => (
            grouped_gemm(dy.clone(), input.down.clone().swap_dims(1, 2), &routing),
            grouped_outer(&dy, &act, &routing, input.down.dtype()),
        ),
    };
    let dgu = swiglu_backward(&gu, dact, &routing);
    let (dgate_up, dxs) = match &host {
        Some(o) => (
            per_expert_outer(&dgu, &xs, o, input.gate_up.dtype()),
            per_expert_gemm(&dgu, &input.gate_up, o, false),
        ),
        None => (
            grouped_outer(&dgu, &xs, &routing, input.gate_up.dtype()),
            grouped_gemm(dgu, input.gate_up.clone().swap_dims(1, 2), &routing),
        ),
    };
    let dx = combine(dxs, &weights, &routing, false);
    MoeGrads {
        x: dx,
        gate_up: dgate_up,
        down: ddown,
        weights: dweights.cast(input.weights.dtype()),
    }
}

/// The router's softmax and top-k in one kernel (one unit per token).
pub(super) fn route_topk<R, F, I, BT>(
    logits: Tensor<Cube<R, F, I, BT>, 2>,
    top_k: usize,
) -> (
    Tensor<Cube<R, F, I, BT>, 2>,
    Tensor<Cube<R, F, I, BT>, 2, Int>,
)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [tokens, _] = logits.dims();
    let device = logits.device();
    let weights = Tensor::<Cube<R, F, I, BT>, 2>::empty([tokens, top_k], (&device, DType::F32));
    let chosen = Tensor::<Cube<R, F, I, BT>, 2, Int>::empty([tokens, top_k], &device);
    let logits = prim(logits.cast(DType::F32));
    let client = logits.client.clone();
    let chosen_prim: CubeTensor<R> = chosen.clone().into_primitive();
    let int_dtype = chosen_prim.dtype;
    let (count, dim) = elemwise_launch(tokens);
    unsafe {
        k::route_topk_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            logits.into_tensor_arg(),
            prim(weights.clone()).into_tensor_arg(),
            chosen_prim.into_tensor_arg(),
            int_dtype.into(),
        );
    }
    (weights, chosen)
}
