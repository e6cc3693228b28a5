//! Large f16/bf16 products through cuBLAS on the CUDA runtime (the [`crate::CUBLAS_ROUTINE`]
//! routine; feature `cublas`).
//!
//! cubek's best routine reaches about a quarter of an H200's dense bf16 rate on the prefill's
//! products; cuBLAS, what transformers and mamba-ssm run, more than twice that (BENCHMARKS.md).
//! cuBLAS is loaded at run time (`libcublas.so`, through cudarc) and its products are enqueued
//! on the CUDA stream that CubeCL runs the calling thread's kernels on, which the patched
//! `cubecl-cuda` (`vendor/`) names in the resources it hands out: they run in order with
//! CubeCL's kernels, without synchronising the host. Asking for the three operands' addresses
//! costs the host three round trips to CubeCL's device thread ([`crate::cublas_min_rows`] can
//! keep products of few rows on cubek's routine).

use std::{any::TypeId, collections::HashMap, ffi::c_void, sync::Mutex};

use burn::{prelude::DeviceOps, tensor::DType};
use burn_cubecl::{tensor::CubeTensor, CubeRuntime};
use cubecl::{cuda::CudaRuntime, prelude::*};
use cudarc::{
    cublas::{result as blas, sys as blas_sys},
    driver::{result as drv, sys as drv_sys},
};

/// The cuBLAS handle of one device, with its primary context. Its workspace is cuBLAS's default
/// pool: `cublasSetStream` resets a workspace set by the caller to it anyway.
struct Cublas {
    context: drv_sys::CUcontext,
    handle: blas_sys::cublasHandle_t,
    /// The stream of the last product. Products on another stream (another thread's) wait for
    /// it first, so that no two streams' work on the handle overlaps.
    stream: drv_sys::CUstream,
}

// SAFETY: the handle is used only under the `STATE` mutex, one caller at a time; the context is
// the device's primary one, which any thread may make current.
unsafe impl Send for Cublas {}

/// Per device index: the set-up, or `None` where it failed (cuBLAS missing, an old driver):
/// those devices keep CubeCL's routines.
static STATE: Mutex<Option<HashMap<usize, Option<Cublas>>>> = Mutex::new(None);

impl Cublas {
    /// Loads cuBLAS and sets up `device`; `None` where that fails.
    fn new(device: usize) -> Option<Self> {
        // SAFETY: the library's presence is checked before any of its symbols is loaded (cudarc
        // panics on a missing library otherwise); the rest are plain driver and cuBLAS calls on
        // objects created here.
        unsafe {
            if !blas_sys::is_culib_present() {
                return None;
            }
            drv::init().ok()?;
            let dev = drv::device::get(device as i32).ok()?;
            let context = drv::primary_ctx::retain(dev).ok()?;
            drv::ctx::set_current(context).ok()?;
            let handle = blas::create_handle().ok()?;
            Some(Self {
                context,
                handle,
                stream: std::ptr::null_mut(),
            })
        }
    }
}

/// How cuBLAS (column-major) sees a row-major view `[rows, cols]` with strides `[s0, s1]`: the
/// operation to apply and the leading dimension. `None` when neither stride is 1 or the leading
/// dimension does not fit cuBLAS's 32-bit integers.
fn operand(
    rows: usize,
    cols: usize,
    strides: &[usize],
) -> Option<(blas_sys::cublasOperation_t, i32)> {
    use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let (s0, s1) = (strides[0], strides[1]);
    // A dimension of size 1 may carry any stride; the other's stride then decides.
    let row_major = s1 == 1 || cols == 1;
    let col_major = s0 == 1 || rows == 1;
    let ld = |v: usize| i32::try_from(v.max(1)).ok();
    if row_major && (s0 >= cols.max(1) || rows == 1) {
        // Column-major `[cols, rows]` with leading dimension s0: the view's transpose.
        Some((CUBLAS_OP_N, ld(s0.max(cols))?))
    } else if col_major && (s1 >= rows.max(1) || cols == 1) {
        // Column-major `[rows, cols]` with leading dimension s1.
        Some((CUBLAS_OP_T, ld(s1.max(rows))?))
    } else {
        None
    }
}

/// Whether `R` is CUDA and cuBLAS loads for the device of `t`.
pub(crate) fn available<R: CubeRuntime>(t: &CubeTensor<R>) -> bool {
    if TypeId::of::<R>() != TypeId::of::<CudaRuntime>() {
        return false;
    }
    let device = t.device.to_id().index_id as usize;
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    state
        .get_or_insert_with(HashMap::new)
        .entry(device)
        .or_insert_with(|| Cublas::new(device))
        .is_some()
}

/// cuBLAS's type of f16 and bf16 data; `None` for the other dtypes.
fn data_type(dtype: DType) -> Option<blas_sys::cudaDataType> {
    match dtype {
        DType::F16 => Some(blas_sys::cudaDataType::CUDA_R_16F),
        DType::BF16 => Some(blas_sys::cudaDataType::CUDA_R_16BF),
        _ => None,
    }
}

/// The device addresses of `tensors` (on one CUDA device, `available` checked) and the stream
/// that CubeCL has launched every earlier kernel of this thread on, with the resources that keep
/// the memory from being handed out again while they are held. One blocking round trip to
/// CubeCL's device thread per tensor: every kernel submitted before is on the stream after it.
fn addresses<R: CubeRuntime>(
    tensors: &[&CubeTensor<R>],
) -> Option<(Vec<u64>, drv_sys::CUstream, impl Sized)> {
    let first = tensors.first()?;
    if TypeId::of::<R>() != TypeId::of::<CudaRuntime>() {
        return None;
    }
    // SAFETY: `TypeId` says `R` is `CudaRuntime`, so this is the same type.
    let client: &ComputeClient<CudaRuntime> =
        unsafe { &*(&first.client as *const ComputeClient<R>).cast() };
    let mut resources = Vec::with_capacity(tensors.len());
    for t in tensors {
        resources.push(client.get_resource(t.handle.clone()).ok()?);
    }
    let ptrs = resources.iter().map(|r| r.resource().ptr).collect();
    let stream = resources.first()?.resource().stream;
    (!stream.is_null()).then_some((ptrs, stream, resources))
}

/// Runs `f` on the cuBLAS handle of device `device`, its context current on this thread and
/// the handle bound to `stream`; `None` where that fails.
fn with_handle<T>(
    device: usize,
    stream: drv_sys::CUstream,
    f: impl FnOnce(blas_sys::cublasHandle_t) -> Option<T>,
) -> Option<T> {
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let cublas = state.as_mut()?.get_mut(&device)?.as_mut()?;
    // SAFETY: `stream` comes from `addresses`: CubeCL's live stream on this device.
    unsafe { bind(cublas, stream)? };
    f(cublas.handle)
}

/// `lhs [m, k] @ rhs [k, n]` through cuBLAS, enqueued on CubeCL's stream. `None` when the
/// runtime is not CUDA, cuBLAS is missing, the dtypes are not both f16 or both bf16, or an
/// operand has no unit stride (nothing launched); the caller then runs another routine.
pub(crate) fn matmul<R: CubeRuntime>(
    lhs: &CubeTensor<R>,
    rhs: &CubeTensor<R>,
) -> Option<CubeTensor<R>> {
    // The checks that decline without cost come before the output is allocated;
    // `matmul_into_rows` makes all of them.
    data_type(lhs.dtype)?;
    if rhs.dtype != lhs.dtype || !available(lhs) {
        return None;
    }
    let out = burn_cubecl::kernel::matmul::init_matmul_output(lhs, rhs, lhs.dtype);
    matmul_into_rows(lhs, rhs, &out, 0).then_some(out)
}

/// `out[row0..row0 + m] = lhs [m, k] @ rhs [k, n]` through cuBLAS, written in place into rows
/// of `out` (`[rows, n]`, the inputs' dtype), enqueued on CubeCL's stream. `false` (nothing
/// launched) where [`matmul`] would return `None` or the rows do not fit `out`.
pub(crate) fn matmul_into_rows<R: CubeRuntime>(
    lhs: &CubeTensor<R>,
    rhs: &CubeTensor<R>,
    out: &CubeTensor<R>,
    row0: usize,
) -> bool {
    let Some(data_type) = data_type(lhs.dtype) else {
        return false;
    };
    let ([m, k], [k2, n]) = (lhs.meta.shape().dims::<2>(), rhs.meta.shape().dims::<2>());
    let [rows, cols] = out.meta.shape().dims::<2>();
    let fits = |v: usize| i32::try_from(v).is_ok();
    if k != k2
        || [rhs.dtype, out.dtype] != [lhs.dtype, lhs.dtype]
        || lhs.device != rhs.device
        || lhs.device != out.device
        || m == 0
        || n == 0
        || cols != n
        || row0 + m > rows
        || !(fits(m) && fits(n) && fits(k))
        || !available(lhs)
    {
        return false;
    }
    let Some((ptrs, stream, held)) = addresses(&[lhs, rhs, out]) else {
        return false;
    };
    // Burn may pad an output's rows (a pitched layout): every view takes its strides as they are.
    let view = |ptr: u64, t: &CubeTensor<R>, first: usize, rows: usize| {
        let s = t.meta.strides();
        View {
            ptr: ptr + (first * s[0] * t.dtype.size()) as u64,
            rows,
            cols: t.meta.shape()[1],
            strides: [s[0], s[1]],
            batch_stride: 0,
        }
    };
    let device = lhs.device.to_id().index_id as usize;
    // SAFETY: the addresses belong to live allocations of the sizes the shapes and strides say
    // (held until the product is enqueued), and the output view covers rows `row0..row0 + m`
    // of `out`; it is enqueued on the stream that CubeCL runs this thread's kernels on, so it
    // runs after the kernels that wrote its inputs and before any later kernel, including one
    // that reuses this memory once the tensors are dropped.
    let done = with_handle(device, stream, |handle| unsafe {
        gemm_batched(
            handle,
            view(ptrs[0], lhs, 0, m),
            view(ptrs[1], rhs, 0, k),
            view(ptrs[2], out, row0, m),
            1,
            1.0,
            data_type,
            data_type,
        )
    })
    .is_some();
    drop(held);
    if done {
        crate::note_cublas_products(1);
    }
    done
}

/// Scores per block of [`causal_attention`]: 2^28 f32 scores (1 GiB) and their probabilities
/// (more only where one query's row over every head is longer: a block has at least one query).
const ATTENTION_BLOCK_SCORES: usize = 1 << 28;
/// Row pitch multiple of the score and probability blocks (keys): 16-byte loads of f32 scores.
const SCORE_ROW_MULTIPLE: usize = 4;

/// One operand of a strided-batched product: a device address and a row-major view
/// `[rows, cols]` with its strides, in elements; `batch_stride` between the batch's matrices.
#[derive(Clone, Copy)]
struct View {
    ptr: u64,
    rows: usize,
    cols: usize,
    strides: [usize; 2],
    batch_stride: usize,
}

/// `out[i] = alpha * lhs[i] @ rhs[i]` for `i < batch` (`cublasGemmEx` for one), inputs of
/// `in_type`, output of `out_type`, f32 accumulation. `None` when a layout has no unit stride.
///
/// # Safety
/// The views describe live device memory of their types; the handle's stream is the one that
/// orders the memory's other uses.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_batched(
    handle: blas_sys::cublasHandle_t,
    lhs: View,
    rhs: View,
    out: View,
    batch: usize,
    alpha: f32,
    in_type: blas_sys::cudaDataType,
    out_type: blas_sys::cudaDataType,
) -> Option<()> {
    let (op_a, lda) = operand(rhs.rows, rhs.cols, &rhs.strides)?;
    let (op_b, ldb) = operand(lhs.rows, lhs.cols, &lhs.strides)?;
    let (op_c, ldc) = operand(out.rows, out.cols, &out.strides)?;
    if op_c != blas_sys::cublasOperation_t::CUBLAS_OP_N {
        return None;
    }
    let beta = 0.0f32;
    // Row-major `out [m, n] = lhs @ rhs` is column-major `out^T [n, m] = rhs^T lhs^T`.
    if batch == 1 {
        return blas::gemm_ex(
            handle,
            op_a,
            op_b,
            out.cols as i32,
            out.rows as i32,
            lhs.cols as i32,
            &alpha as *const f32 as *const c_void,
            rhs.ptr as *const c_void,
            in_type,
            lda,
            lhs.ptr as *const c_void,
            in_type,
            ldb,
            &beta as *const f32 as *const c_void,
            out.ptr as *mut c_void,
            out_type,
            ldc,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .ok();
    }
    blas::gemm_strided_batched_ex(
        handle,
        op_a,
        op_b,
        out.cols as i32,
        out.rows as i32,
        lhs.cols as i32,
        &alpha as *const f32 as *const c_void,
        rhs.ptr as *const c_void,
        in_type,
        lda,
        rhs.batch_stride as i64,
        lhs.ptr as *const c_void,
        in_type,
        ldb,
        lhs.batch_stride as i64,
        &beta as *const f32 as *const c_void,
        out.ptr as *mut c_void,
        out_type,
        ldc,
        out.batch_stride as i64,
        batch as i32,
        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
    .ok()
}

/// Causal attention through two cuBLAS products per block of queries with the scores in
/// memory between them (what transformers' eager attention does, in blocks): `q` `[batch,
/// heads, len_q, head_dim]`, `k`, `v` `[batch, kv_heads, len_k, head_dim]`, query `i` at
/// position `len_k - len_q + i`. Per block of queries and KV head, one strided-batched product
/// gives the scaled scores of the head's query heads (f32, the KV head read in place for each:
/// a batch stride of 0), [`super::attention::causal_softmax_kernel`] turns them into
/// probabilities of the inputs' dtype (0 past each query's position), and a second product
/// multiplies them by `v`. A block covers only the keys its last query sees, so the products
/// skip most of the masked half. `None` where cuBLAS cannot run it: nothing launched where the
/// runtime, dtypes, shapes or layouts rule it out; where a later step fails (a layout check of
/// the second product, the driver), the work already enqueued is discarded with its buffers and
/// the caller's fallback starts again from the unchanged inputs.
pub(crate) fn causal_attention<R: CubeRuntime>(
    q: &CubeTensor<R>,
    k: &CubeTensor<R>,
    v: &CubeTensor<R>,
) -> Option<CubeTensor<R>> {
    let dtype = q.dtype;
    let data_type = data_type(dtype)?;
    let [batch, heads, len_q, head_dim] = q.meta.shape().dims::<4>();
    let [kb, kv_heads, len_k, kd] = k.meta.shape().dims::<4>();
    if k.meta.shape() != v.meta.shape()
        || [k.dtype, v.dtype] != [dtype, dtype]
        || batch == 0
        || heads == 0
        || head_dim == 0
        || kb != batch
        || kd != head_dim
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || len_q == 0
        || len_q > len_k
        || i32::try_from(len_k.max(head_dim)).is_err()
        || [q, k, v].iter().any(|t| t.meta.strides()[3] != 1)
        || !available(q)
    {
        return None;
    }
    let groups = heads / kv_heads;
    let offset = len_k - len_q;
    let block = (ATTENTION_BLOCK_SCORES / (batch * heads * len_k)).clamp(1, len_q);
    let device = q.device.clone();
    let client_r = q.client.clone();
    let out = burn_cubecl::ops::numeric::empty_device_dtype(
        client_r.clone(),
        device.clone(),
        [batch, heads, len_q, head_dim].into(),
        dtype,
    );
    if out.meta.strides()[3] != 1 {
        return None;
    }
    // Score rows are padded to a multiple of 4 keys so that the softmax loads 16 bytes at a time.
    let pitch_of = |keys: usize| keys.next_multiple_of(SCORE_ROW_MULTIPLE);
    let n_scores = batch * heads * block * pitch_of(len_k);
    let scores = burn_cubecl::ops::numeric::empty_device_dtype(
        client_r.clone(),
        device.clone(),
        [n_scores].into(),
        DType::F32,
    );
    let probs = burn_cubecl::ops::numeric::empty_device_dtype(
        client_r.clone(),
        device.clone(),
        [n_scores].into(),
        dtype,
    );
    let (ptrs, stream, held) = addresses(&[q, k, v, &out, &scores, &probs])?;
    let [qp, kp, vp, op, sp, pp] = [0, 1, 2, 3, 4, 5].map(|i| ptrs[i]);
    let esize = dtype.size() as u64;
    let (sq, sk, sv, so) = (
        q.meta.strides(),
        k.meta.strides(),
        v.meta.strides(),
        out.meta.strides(),
    );
    let at = |base: u64, elems: usize, size: u64| base + elems as u64 * size;
    let index = device.to_id().index_id as usize;
    let scale = (head_dim as f32).powf(-0.5);
    let mut q0 = 0;
    while q0 < len_q {
        let rows = block.min(len_q - q0);
        let keys = offset + q0 + rows;
        let pitch = pitch_of(keys);
        // Scores of this block: `[batch * heads, rows, keys]`, rows `pitch` apart.
        // SAFETY: as in `matmul`: live allocations, enqueued on CubeCL's stream.
        with_handle(index, stream, |handle| unsafe {
            for b in 0..batch {
                for j in 0..kv_heads {
                    let h = j * groups;
                    let lhs = View {
                        ptr: at(qp, b * sq[0] + h * sq[1] + q0 * sq[2], esize),
                        rows,
                        cols: head_dim,
                        strides: [sq[2], 1],
                        batch_stride: sq[1],
                    };
                    let rhs = View {
                        ptr: at(kp, b * sk[0] + j * sk[1], esize),
                        rows: head_dim,
                        cols: keys,
                        strides: [1, sk[2]],
                        batch_stride: 0,
                    };
                    let s = View {
                        ptr: at(sp, (b * heads + h) * rows * pitch, 4),
                        rows,
                        cols: keys,
                        strides: [pitch, 1],
                        batch_stride: rows * pitch,
                    };
                    let f32_type = blas_sys::cudaDataType::CUDA_R_32F;
                    gemm_batched(handle, lhs, rhs, s, groups, scale, data_type, f32_type)?;
                }
            }
            Some(())
        })?;
        super::attention::launch_causal_softmax(
            &scores,
            &probs,
            batch * heads * rows,
            rows,
            keys,
            pitch,
            offset + q0 + 1,
        );
        // A round trip to CubeCL's device thread: the softmax is on the stream before the
        // product that reads it.
        drop(addresses(&[&probs])?);
        // SAFETY: as above.
        with_handle(index, stream, |handle| unsafe {
            for b in 0..batch {
                for j in 0..kv_heads {
                    let h = j * groups;
                    let p = View {
                        ptr: at(pp, (b * heads + h) * rows * pitch, esize),
                        rows,
                        cols: keys,
                        strides: [pitch, 1],
                        batch_stride: rows * pitch,
                    };
                    let rhs = View {
                        ptr: at(vp, b * sv[0] + j * sv[1], esize),
                        rows: keys,
                        cols: head_dim,
                        strides: [sv[2], 1],
                        batch_stride: 0,
                    };
                    let o = View {
                        ptr: at(op, b * so[0] + h * so[1] + q0 * so[2], esize),
                        rows,
                        cols: head_dim,
                        strides: [so[2], 1],
                        batch_stride: so[1],
                    };
                    gemm_batched(handle, p, rhs, o, groups, 1.0, data_type, data_type)?;
                }
            }
            Some(())
        })?;
        q0 += rows;
    }
    drop(held);
    crate::note_cublas_products(2 * batch * kv_heads * len_q.div_ceil(block));
    Some(out)
}

/// Makes the device's context current on this thread and the handle enqueue on `stream`,
/// waiting for the previous stream first where it changes (no two streams' work on one handle
/// overlaps).
///
/// # Safety
/// `stream` is a live stream of the handle's device.
unsafe fn bind(cublas: &mut Cublas, stream: drv_sys::CUstream) -> Option<()> {
    drv::ctx::set_current(cublas.context).ok()?;
    if cublas.stream != stream {
        if !cublas.stream.is_null() {
            drv::stream::synchronize(cublas.stream).ok()?;
        }
        blas::set_stream(cublas.handle, stream as _).ok()?;
        cublas.stream = stream;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::operand;
    use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};

    #[test]
    fn layouts() {
        // Contiguous [4, 6]: column-major [6, 4], leading dimension 6.
        assert_eq!(operand(4, 6, &[6, 1]), Some((CUBLAS_OP_N, 6)));
        // The transpose of a contiguous [6, 4] (a linear layer's weight): column-major [4, 6].
        assert_eq!(operand(4, 6, &[1, 4]), Some((CUBLAS_OP_T, 4)));
        // A narrowed row block keeps its row stride.
        assert_eq!(operand(2, 6, &[8, 1]), Some((CUBLAS_OP_N, 8)));
        // One row, any row stride.
        assert_eq!(operand(1, 6, &[0, 1]), Some((CUBLAS_OP_N, 6)));
        // A padded (pitched) row-major output.
        assert_eq!(operand(5, 48, &[64, 1]), Some((CUBLAS_OP_N, 64)));
        // Neither stride is 1.
        assert_eq!(operand(4, 6, &[12, 2]), None);
    }
}
