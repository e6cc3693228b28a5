//! Large f16/bf16 matmuls through a chosen cubek routine or cuBLAS ([`crate::matmul_routine`]).
//!
//! Without Burn's `autotune` feature, Burn runs every matmul through one routine (cubek's
//! `Strategy::Auto`: the simple cyclic tensor-core kernel), which reaches a tenth of an H200's
//! bf16 rate on the prefill's products (BENCHMARKS.md). Autotune picks better routines but tunes
//! every new shape on first use. Here the routine is named once, for the products of the model's
//! linear layers and of the MoE's per-expert matmuls; `bench --matmul` times every routine.

use burn::tensor::{DType, Tensor};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::features::Tma;
use cubek::matmul::{
    components::tile::TileMatmulKind,
    definition::{MatmulElems, MatmulGlobalElems},
    launch::Strategy,
    routines::{
        double_buffering::DoubleBufferingArgs, ordered_double_buffering::OrderedSelectionArgs,
        simple::SimpleArgs, simple_unit::SimpleUnitSelectionArgs, specialized::SpecializedStrategy,
        BlueprintStrategy, TileSizeSelection,
    },
};
use cubek::std::InputBinding;

use super::{prim, wrap};

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// The routines run only where the inner and output sizes are multiples of this (every
/// projection of Jamba's configurations but `x_proj`); the row count is free (the GPU check
/// includes 4099 rows). cubek's `DoubleUnit` routine (not offered here) returned wrong values
/// instead of declining at `33 x 40 x 24` on lavapipe, and the tensor-core routines are checked
/// on the GPU (`bench --matmul`) at the model's sizes only.
const ROUTINE_DIM_MULTIPLE: usize = 64;

/// cubek's strategy for one of [`crate::MATMUL_ROUTINES`].
fn strategy(name: &str) -> Option<Strategy> {
    use BlueprintStrategy::Inferred;
    use TileMatmulKind::{Cmma, Mma};
    let simple = |multi_rows, tile_matmul| SimpleArgs {
        multi_rows,
        tile_matmul,
    };
    let ordered = |row_count, tile_matmul| OrderedSelectionArgs {
        partition_k: Some(2),
        row_count: Some(row_count),
        rows_per_plane: Some(2),
        tile_matmul,
    };
    let double = |specialized, tile_matmul| DoubleBufferingArgs {
        specialized,
        tile_matmul,
    };
    let specialized = |tile_matmul| SpecializedStrategy { tile_matmul };
    Some(match name {
        "simple_cmma" => Strategy::SimpleCyclicCmma(Inferred(simple(false, Cmma))),
        "simple_mma" => Strategy::SimpleCyclicMma(Inferred(simple(false, Mma))),
        "simple_multi_rows_cmma" => Strategy::SimpleCyclicCmma(Inferred(simple(true, Cmma))),
        "simple_multi_rows_mma" => Strategy::SimpleCyclicMma(Inferred(simple(true, Mma))),
        "ordered_double_4_cmma" => Strategy::OrderedDoubleCmma(Inferred(ordered(4, Cmma))),
        "ordered_double_4_mma" => Strategy::OrderedDoubleMma(Inferred(ordered(4, Mma))),
        "ordered_double_8_cmma" => Strategy::OrderedDoubleCmma(Inferred(ordered(8, Cmma))),
        "ordered_double_8_mma" => Strategy::OrderedDoubleMma(Inferred(ordered(8, Mma))),
        "double_cyclic_cmma" => Strategy::DoubleCyclicCmma(Inferred(double(false, Cmma))),
        "double_cyclic_mma" => Strategy::DoubleCyclicMma(Inferred(double(false, Mma))),
        "double_cyclic_specialized_cmma" => {
            Strategy::DoubleCyclicCmma(Inferred(double(true, Cmma)))
        }
        "double_cyclic_specialized_mma" => Strategy::DoubleCyclicMma(Inferred(double(true, Mma))),
        "specialized_cyclic_cmma" => Strategy::SpecializedCyclicCmma(Inferred(specialized(Cmma))),
        "specialized_cyclic_mma" => Strategy::SpecializedCyclicMma(Inferred(specialized(Mma))),
        "simple_tma_cmma" => Strategy::SimpleTmaCmma(Inferred(simple(false, Cmma))),
        "simple_tma_mma" => Strategy::SimpleTmaMma(Inferred(simple(false, Mma))),
        "simple_tma_multi_rows_cmma" => Strategy::SimpleTmaCmma(Inferred(simple(true, Cmma))),
        "simple_tma_multi_rows_mma" => Strategy::SimpleTmaMma(Inferred(simple(true, Mma))),
        "double_tma_cmma" => Strategy::DoubleTmaCmma(Inferred(double(false, Cmma))),
        "double_tma_mma" => Strategy::DoubleTmaMma(Inferred(double(false, Mma))),
        "specialized_tma_cmma" => Strategy::SpecializedTmaCmma(Inferred(specialized(Cmma))),
        "specialized_tma_mma" => Strategy::SpecializedTmaMma(Inferred(specialized(Mma))),
        "simple_unit" => Strategy::SimpleUnit(Inferred(SimpleUnitSelectionArgs {
            tile_size: TileSizeSelection::MaxTileSize,
        })),
        _ => return None,
    })
}

/// `lhs [m, k] @ rhs [k, n]` (any strides: the linear layers pass the transposed view of their
/// `[out, in]` weight) through the routine of [`crate::matmul_routine`]. `None` when no routine
/// is chosen, when the inputs are not both f16 or both bf16 (f32 runs through TF32 either way),
/// or when the routine declines the shape or the inner or output size (`k`, `n`; the row count
/// may be anything) is not a multiple of [`ROUTINE_DIM_MULTIPLE`] (both counted by
/// [`crate::matmul_routine_fallbacks`]): the caller then runs Burn's matmul.
pub(crate) fn routine_matmul<R, F, I, BT>(
    lhs: &Tensor<Cube<R, F, I, BT>, 2>,
    rhs: &Tensor<Cube<R, F, I, BT>, 2>,
) -> Option<Tensor<Cube<R, F, I, BT>, 2>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = lhs.dtype();
    if !matches!(dtype, DType::F16 | DType::BF16) || rhs.dtype() != dtype {
        return None;
    }
    let mut name = crate::matmul_routine()?;
    let ([m, k], [_, n]) = (lhs.dims(), rhs.dims());
    if name == crate::CUBLAS_ROUTINE {
        if m >= crate::cublas_min_rows() {
            if let Some(out) = cublas_matmul(lhs, rhs) {
                return Some(out);
            }
        }
        name = crate::DEFAULT_CUBEK_ROUTINE;
    }
    if !k.is_multiple_of(ROUTINE_DIM_MULTIPLE) || !n.is_multiple_of(ROUTINE_DIM_MULTIPLE) {
        crate::note_matmul_fallback();
        return None;
    }
    let (l, r) = (prim(lhs.clone()), prim(rhs.clone()));
    if name.contains("tma") {
        let has_tma = l.client.properties().features.tma.contains(Tma::Base);
        if !has_tma && name == crate::DEFAULT_CUBEK_ROUTINE {
            name = crate::DEFAULT_MATMUL_ROUTINE_NO_TMA;
        } else if !has_tma || !tma_aligned(&l) || !tma_aligned(&r) {
            // A TMA launch that fails leaves the stream unusable: decline before it.
            crate::note_matmul_fallback();
            return None;
        }
    }
    let strategy = strategy(name)?;
    let out = burn_cubecl::kernel::matmul::init_matmul_output(&l, &r, dtype);
    let client = out.client.clone();
    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: dtype.into(),
        rhs: dtype.into(),
        out: dtype.into(),
    });
    let launched = cubek::matmul::launch::launch_ref(
        &strategy,
        &client,
        InputBinding::new(l.binding(), dtype.into()),
        InputBinding::new(r.binding(), dtype.into()),
        out.clone().binding(),
        &mut dtypes,
    );
    match launched {
        Ok(()) => Some(wrap(out)),
        Err(_) => {
            crate::note_matmul_fallback();
            None
        }
    }
}

/// `lhs @ rhs` through cuBLAS (see `cube::cublas`); `None` (nothing run) where cuBLAS cannot
/// take it: not CUDA, built without the `cublas` feature, no cuBLAS, an operand without a unit
/// stride.
fn cublas_matmul<R, F, I, BT>(
    lhs: &Tensor<Cube<R, F, I, BT>, 2>,
    rhs: &Tensor<Cube<R, F, I, BT>, 2>,
) -> Option<Tensor<Cube<R, F, I, BT>, 2>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    #[cfg(feature = "cublas")]
    {
        super::cublas::matmul(&prim(lhs.clone()), &prim(rhs.clone())).map(wrap)
    }
    #[cfg(not(feature = "cublas"))]
    {
        let _ = (lhs, rhs);
        None
    }
}

/// `out[row0..row0 + m] = lhs @ rhs` in place where the routine is cuBLAS and it takes the
/// product (f16/bf16, from [`crate::cublas_min_rows`] rows); `false` where nothing ran and
/// the caller computes it another way.
pub(crate) fn routine_matmul_into_rows<R, F, I, BT>(
    lhs: &Tensor<Cube<R, F, I, BT>, 2>,
    rhs: &Tensor<Cube<R, F, I, BT>, 2>,
    out: &Tensor<Cube<R, F, I, BT>, 2>,
    row0: usize,
) -> bool
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = lhs.dtype();
    if !matches!(dtype, DType::F16 | DType::BF16)
        || crate::matmul_routine() != Some(crate::CUBLAS_ROUTINE)
        || lhs.dims()[0] < crate::cublas_min_rows()
    {
        return false;
    }
    #[cfg(feature = "cublas")]
    {
        super::cublas::matmul_into_rows(
            &prim(lhs.clone()),
            &prim(rhs.clone()),
            &prim(out.clone()),
            row0,
        )
    }
    #[cfg(not(feature = "cublas"))]
    {
        let _ = (rhs, out, row0);
        false
    }
}

/// Whether a tensor meets the alignment that a TMA descriptor of it needs (checked by the CUDA
/// runtime when the kernel is launched): every stride but the unit one a multiple of 16 bytes,
/// and the start of the data at a multiple of 16 bytes (Burn makes a view only at an offset
/// aligned to the device's memory alignment; other slices are copied).
fn tma_aligned<R: CubeRuntime>(t: &burn_cubecl::tensor::CubeTensor<R>) -> bool {
    let size = t.dtype.size();
    let strides_ok = t
        .meta
        .strides()
        .iter()
        .all(|&s| s == 1 || (s * size).is_multiple_of(16));
    let offset_ok = t.handle.offset_start.unwrap_or(0).is_multiple_of(16);
    strides_ok && offset_ok
}

/// [`routine_matmul`], else Burn's matmul.
pub(crate) fn matmul<R, F, I, BT>(
    lhs: Tensor<Cube<R, F, I, BT>, 2>,
    rhs: Tensor<Cube<R, F, I, BT>, 2>,
) -> Tensor<Cube<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    routine_matmul(&lhs, &rhs).unwrap_or_else(|| lhs.matmul(rhs))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_routine_has_a_strategy() {
        for name in crate::MATMUL_ROUTINES
            .iter()
            .filter(|r| **r != crate::CUBLAS_ROUTINE)
        {
            assert!(super::strategy(name).is_some(), "{name}");
        }
        assert!(super::strategy("fastest").is_none());
    }
}
