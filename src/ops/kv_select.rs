//! After a press scores the tokens (python/ferrokernels/kv.py): the k best positions per
//! (batch, kv head) in ascending order, and the kept rows of K and V copied out
//! (kernels/kv_select.cu). No CPU path here: the CPU path and the reference are kv.py's torch
//! `_top` / `_gather`.

use crate::cuda::KernelSource;
use crate::cuda::driver::{self, LaunchConfig};
use crate::dlpack::{DType, TensorView};
use crate::error::Result;
use crate::ops::attention::shape_err;
use std::ffi::c_void;

/// Threads of the top-k CTA (kernels/kv_select.cu: KS_THREADS).
const TOPK_THREADS: u32 = 1024;

pub fn topk_kernel() -> KernelSource {
    let source = "#include \"kv_select.cu\"\n\
                  extern \"C\" __global__ void __launch_bounds__(KS_THREADS) kv_select_topk_rows(const __grid_constant__ KvTopkParams p) {\n\
                  \x20   kv_select_topk(p);\n}\n";
    KernelSource::portable("kv_select_topk_rows".into(), source.into())
}

pub fn gather_kernel() -> KernelSource {
    let source = "#include \"kv_select.cu\"\n\
                  extern \"C\" __global__ void __launch_bounds__(256) kv_select_gather_rows(const __grid_constant__ KvGatherParams p) {\n\
                  \x20   kv_select_gather(p);\n}\n";
    KernelSource::portable("kv_select_gather_rows".into(), source.into())
}

/// Mirrors `struct KvTopkParams`.
#[repr(C)]
struct TopkParams {
    scores: u64,
    index: u64,
    lookup: u64,
    mapped: u64,
    lookup_stride: i64,
    rows: i32,
    n: i32,
    k: i32,
    group: i32,
}

/// `index` (rows, k) <- the k largest of each row of `scores` (rows, n) float32, ascending
/// positions; ties go to the earlier position. `index` is int64 positions, or with `lookup`
/// (int32 (L, n), rows a multiple of L) int32 `lookup[row / (rows / L)][position]`.
pub fn topk(scores: &TensorView, index: &TensorView, lookup: Option<&TensorView>, stream: usize) -> Result<()> {
    scores.expect_dtype(&[DType::F32])?;
    scores.expect_rank(2, "(rows, n)")?;
    scores.expect_contiguous()?;
    index.expect_same_device(scores)?;
    index.expect_dtype(&[if lookup.is_some() { DType::I32 } else { DType::I64 }])?;
    index.expect_rank(2, "(rows, k)")?;
    index.expect_contiguous()?;
    let (rows, n, k) = (scores.dim(0), scores.dim(1), index.dim(1));
    if index.dim(0) != rows || k == 0 || k > n {
        return shape_err(format!("{} must be ({rows}, k) with 1 <= k <= {n}, got {:?}", index.name, index.shape));
    }
    if n > i32::MAX as usize || rows > i32::MAX as usize {
        return shape_err(format!("{} is too large for the top-k kernel", scores.name));
    }
    let mut group = 1;
    if let Some(l) = lookup {
        l.expect_same_device(scores)?;
        l.expect_dtype(&[DType::I32])?;
        l.expect_rank(2, "(rows / group, n)")?;
        l.expect_last_contiguous()?;
        if l.dim(1) != n || l.dim(0) == 0 || rows % l.dim(0) != 0 {
            return shape_err(format!("{} {:?} must have {n} columns and a row count dividing {rows}", l.name, l.shape));
        }
        group = rows / l.dim(0);
    }
    if rows == 0 {
        return Ok(());
    }
    let dev = driver::device_of(scores, "the top-k kernel")?;
    let f = dev.function(&topk_kernel(), 0)?;
    let (ix, mapped) = if lookup.is_some() { (0, index.ptr as u64) } else { (index.ptr as u64, 0) };
    let mut p = TopkParams {
        scores: scores.ptr as u64,
        index: ix,
        lookup: lookup.map_or(0, |l| l.ptr as u64),
        mapped,
        lookup_stride: lookup.map_or(0, |l| l.stride(0)),
        rows: rows as i32,
        n: n as i32,
        k: k as i32,
        group: group as i32,
    };
    let cfg = LaunchConfig { grid: (rows as u32, 1, 1), block: (TOPK_THREADS, 1, 1), smem_bytes: 0 };
    dev.launch(f, cfg, stream, &mut [&mut p as *mut TopkParams as *mut c_void])
}

/// Mirrors `struct KvGatherParams`. Strides in bytes.
#[repr(C)]
struct GatherParams {
    k: u64,
    v: u64,
    index: u64,
    k_out: u64,
    v_out: u64,
    k_s: [i64; 3],
    v_s: [i64; 3],
    ko_s: [i64; 3],
    vo_s: [i64; 3],
    batch: i32,
    heads_kv: i32,
    kept: i32,
    n: i32,
    chunks_k: i32,
    chunks_v: i32,
}

/// One gather: rows `index` (batch, heads_kv, kept) of k / v (batch, n, heads_kv, D | Dv) into
/// k_out / v_out (batch, kept, heads_kv, D | Dv); negative entries give zero rows.
#[derive(Debug, Clone, Copy)]
pub struct GatherArgs<'a> {
    pub k: &'a TensorView,
    pub v: &'a TensorView,
    pub index: &'a TensorView,
    pub k_out: &'a TensorView,
    pub v_out: &'a TensorView,
}

fn byte_strides(t: &TensorView) -> [i64; 3] {
    let e = t.dtype.size() as i64;
    [t.stride(0) * e, t.stride(1) * e, t.stride(2) * e]
}

pub fn gather(a: &GatherArgs, stream: usize) -> Result<()> {
    a.k.expect_rank(4, "(batch, n, heads_kv, head_dim)")?;
    a.v.expect_rank(4, "(batch, n, heads_kv, head_dim_v)")?;
    let (b, n, hk) = (a.k.dim(0), a.k.dim(1), a.k.dim(2));
    a.index.expect_same_device(a.k)?;
    a.index.expect_dtype(&[DType::I64])?;
    a.index.expect_rank(3, "(batch, heads_kv, kept)")?;
    a.index.expect_contiguous()?;
    let kept = a.index.dim(2);
    a.index.expect_shape(&[b as i64, hk as i64, kept as i64])?;
    a.v.expect_same_device(a.k)?;
    a.v.expect_same_dtype(a.k)?;
    if a.v.dim(0) != b || a.v.dim(1) != n || a.v.dim(2) != hk {
        return shape_err(format!("{} {:?} must match {} {:?} but for head_dim", a.v.name, a.v.shape, a.k.name, a.k.shape));
    }
    for (src, dst) in [(a.k, a.k_out), (a.v, a.v_out)] {
        dst.expect_same_device(a.k)?;
        dst.expect_same_dtype(a.k)?;
        dst.expect_shape(&[b as i64, kept as i64, hk as i64, src.dim(3) as i64])?;
        dst.expect_writable_layout()?;
        for t in [src, dst] {
            t.expect_last_contiguous()?;
            t.expect_aligned(16)?;
        }
        if src.dim(3) * src.dtype.size() % 16 != 0 {
            return shape_err(format!("the gather kernel copies 16-byte pieces: {}'s rows are {} bytes", src.name, src.dim(3) * src.dtype.size()));
        }
    }
    let chunks_k = a.k.dim(3) * a.k.dtype.size() / 16;
    let chunks_v = a.v.dim(3) * a.v.dtype.size() / 16;
    let pieces = kept * (chunks_k + chunks_v);
    if b == 0 || hk == 0 || pieces == 0 {
        return Ok(());
    }
    if n > i32::MAX as usize || hk > 65535 || b > 65535 || pieces > i32::MAX as usize {
        return shape_err(format!("{} is too large for the gather kernel", a.k.name));
    }
    let dev = driver::device_of(a.k, "the gather kernel")?;
    let f = dev.function(&gather_kernel(), 0)?;
    let mut p = GatherParams {
        k: a.k.ptr as u64,
        v: a.v.ptr as u64,
        index: a.index.ptr as u64,
        k_out: a.k_out.ptr as u64,
        v_out: a.v_out.ptr as u64,
        k_s: byte_strides(a.k),
        v_s: byte_strides(a.v),
        ko_s: byte_strides(a.k_out),
        vo_s: byte_strides(a.v_out),
        batch: b as i32,
        heads_kv: hk as i32,
        kept: kept as i32,
        n: n as i32,
        chunks_k: chunks_k as i32,
        chunks_v: chunks_v as i32,
    };
    let cfg = LaunchConfig { grid: (pieces.div_ceil(256) as u32, hk as u32, b as u32), block: (256, 1, 1), smem_bytes: 0 };
    dev.launch(f, cfg, stream, &mut [&mut p as *mut GatherParams as *mut c_void])
}
