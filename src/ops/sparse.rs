//! Block-sparse attention: the Hopper attention kernel walking, per (batch, head, query block
//! of 128 rows), a list of 128-key tiles instead of the causal/window range. A listed tile is
//! whole (no per-element mask beyond the sequence's end) or partial, with a 128 x 128 bitmap.
//! python/ferrokernels/sparse.py builds the lists from a `BlockMask` (FlexAttention's layout,
//! blocks of 64 or 128) and runs the CPU path (the dense kernel under the expanded mask).

use crate::cuda::KernelSource;
use crate::cuda::driver::{self, LaunchConfig};
use crate::dlpack::{DType, Device, TensorView};
use crate::error::{Error, Result};
use crate::ops::attention::{self, AttentionArgs, SparseTiles, TileList, dtype_name, shape_err};
use crate::ops::gemm::expect_contiguous;
use std::ffi::c_void;

/// Rows of a query block and keys of a key tile in the lists.
pub const TILE: usize = 128;

/// One call: q, k, v, out, lse, scale and workspace in `attn` (no other attention option), and
/// the tile lists, whose batch and head axes are either full or 1 (one mask for all).
#[derive(Debug, Clone, Copy)]
pub struct SparseArgs<'a> {
    pub attn: AttentionArgs<'a>,
    /// int32 (batch | 1, heads_q | 1, q_tiles): listed key tiles per query block.
    pub count: &'a TensorView,
    /// int32 (batch | 1, heads_q | 1, q_tiles, max): the key tiles, ascending.
    pub index: &'a TensorView,
    /// int32, index's shape: -1 for a whole tile, else the tile's bitmap in `bits`.
    pub bitmap: &'a TensorView,
    /// int32 (bitmaps, 128, 4): row r, bit c of word w set = key 32 w + c visible to row r.
    pub bits: &'a TensorView,
    /// A vertical-slash mask's gathered columns, which the index's negative entries name.
    pub columns: Option<Columns<'a>>,
}

/// Key columns gathered per query head (MInference's vertical lines): entry -1 - t of a list
/// is their tile t (keys 128 t ..), masked for the whole query block by the 128-bit row
/// `bits[-2 - bitmap]`.
#[derive(Debug, Clone, Copy)]
pub struct Columns<'a> {
    /// q's dtype, (batch, columns, heads_q, head_dim | head_dim_v), contiguous, columns a
    /// multiple of 128.
    pub k: &'a TensorView,
    pub v: &'a TensorView,
    /// int32 (rows, 4).
    pub bits: &'a TensorView,
}

fn check_columns(c: &Columns, a: &AttentionArgs, batch: usize, heads: usize) -> Result<()> {
    for (t, width) in [(c.k, a.k.dim(3)), (c.v, a.v.dim(3))] {
        t.expect_same_device(a.q)?;
        t.expect_dtype(&[a.q.dtype])?;
        expect_contiguous(t)?;
        t.expect_rank(4, "(batch, columns, heads_q, head_dim)")?;
        if t.dim(0) != batch || t.dim(1) == 0 || t.dim(1) % TILE != 0 || t.dim(2) != heads || t.dim(3) != width {
            return shape_err(format!(
                "{} must be ({batch}, a multiple of {TILE}, {heads}, {width}), got {:?}",
                t.name, t.shape
            ));
        }
    }
    if c.k.dim(1) != c.v.dim(1) {
        return shape_err(format!("{} and {} must hold the same columns", c.k.name, c.v.name));
    }
    c.bits.expect_same_device(a.q)?;
    c.bits.expect_dtype(&[DType::I32])?;
    expect_contiguous(c.bits)?;
    c.bits.expect_rank(2, "(rows, 4)")?;
    if c.bits.dim(0) == 0 || c.bits.dim(1) != TILE / 32 {
        return shape_err(format!("{} must be (rows >= 1, 4), got {:?}", c.bits.name, c.bits.shape));
    }
    Ok(())
}

fn check_lists(a: &SparseArgs, batch: usize, heads: usize, q_tiles: usize) -> Result<(i64, i64, usize)> {
    let q = a.attn.q;
    for t in [a.count, a.index, a.bitmap, a.bits] {
        t.expect_same_device(q)?;
        t.expect_dtype(&[DType::I32])?;
        expect_contiguous(t)?;
    }
    let c = a.count;
    c.expect_rank(3, "(batch | 1, heads_q | 1, q_tiles)")?;
    if (c.dim(0) != 1 && c.dim(0) != batch) || (c.dim(1) != 1 && c.dim(1) != heads) || c.dim(2) != q_tiles {
        return shape_err(format!(
            "{} must be ({batch} or 1, {heads} or 1, {q_tiles}) for q of batch {batch}, {heads} heads and \
             {q_tiles} blocks of {TILE} rows, got {:?}",
            c.name, c.shape
        ));
    }
    a.index.expect_rank(4, "(batch | 1, heads_q | 1, q_tiles, max)")?;
    let max = a.index.dim(3);
    let want = [c.dim(0) as i64, c.dim(1) as i64, q_tiles as i64, max as i64];
    a.index.expect_shape(&want)?;
    a.bitmap.expect_shape(&want)?;
    if max == 0 || max > i32::MAX as usize {
        return shape_err(format!("{} must hold at least one tile per query block", a.index.name));
    }
    a.bits.expect_rank(3, "(bitmaps, 128, 4)")?;
    if a.bits.dim(0) == 0 || a.bits.dim(1) != TILE || a.bits.dim(2) != TILE / 32 {
        return shape_err(format!("{} must be (bitmaps >= 1, 128, 4), got {:?}", a.bits.name, a.bits.shape));
    }
    let stride = |axis: usize| if c.dim(axis) == 1 { 0 } else { c.stride(axis) };
    Ok((stride(0), stride(1), max))
}

/// Runs sparse attention into `a.attn.out` (and `lse`) on an sm_90 GPU.
pub fn forward(a: &SparseArgs, stream: usize) -> Result<()> {
    let at = &a.attn;
    if at.causal || at.window != (-1, -1) || at.mask.is_some() || at.alibi.is_some() || at.softcap != 0.0 || at.varlen.is_some() {
        return Err(Error::Value(
            "sparse_attention takes its mask from block_mask alone (no causal, window, mask, alibi, softcap or varlen)".into(),
        ));
    }
    let mut d = attention::check(at)?;
    d.sparse = true;
    let (sb, sh, max) = check_lists(a, d.batch, d.heads_q, d.seqlen_q.div_ceil(TILE))?;
    if let Some(c) = &a.columns {
        check_columns(c, at, d.batch, d.heads_q)?;
    }
    if d.head_dim.max(d.head_dim_v) > TILE {
        return Err(Error::NotImplemented(format!(
            "sparse_attention on the GPU takes head dims up to {TILE}, got {} / {}",
            d.head_dim, d.head_dim_v
        )));
    }
    if d.batch == 0 || d.seqlen_q == 0 || d.heads_q == 0 {
        return Ok(());
    }
    let ordinal = match at.q.device {
        Device::Cuda(o) => o,
        Device::Cpu => {
            return Err(Error::Device("the native sparse kernel runs on CUDA tensors; ferrokernels.sparse_attention runs the CPU path".into()));
        }
    };
    attention::check_cuda_inputs(at)?;
    let dev = driver::device(ordinal)?;
    if dev.arch != "sm_90a" {
        return Err(Error::NotImplemented(format!(
            "the block-list kernel needs an sm_90 GPU; {} is {} (ferrokernels.sparse_attention falls back to a dense mask)",
            dev.name, dev.arch
        )));
    }
    let list = TileList {
        count: a.count.ptr as u64,
        index: a.index.ptr as u64,
        bitmap: a.bitmap.ptr as u64,
        bits: a.bits.ptr as u64,
        cols: a.columns.map_or(0, |c| c.bits.ptr as u64),
        sb,
        sh,
        max: max as i32,
    };
    let tiles = SparseTiles { list, cols: a.columns.map(|c| (c.k, c.v)) };
    attention::launch_sm90(dev, at, &d, attention::kernel_params(at, &d), Some(tiles), stream)
}

/// Key blocks per row of block scores (the GPU half of `estimate_blocks`): the tile lists of
/// `SparseArgs`, written in one launch (kernels/sparse.cu).
#[derive(Debug, Clone, Copy)]
pub struct SelectArgs<'a> {
    /// float32 (batch, heads, q_tiles, k_tiles), contiguous: logits (`softmax`) or each row's
    /// probabilities.
    pub scores: &'a TensorView,
    /// int32 (batch, heads, q_tiles) and (batch, heads, q_tiles, k_tiles) x 2: the outputs.
    pub count: &'a TensorView,
    pub index: &'a TensorView,
    pub bitmap: &'a TensorView,
    /// Key tile on query tile 0's diagonal: (kv_len - q_len) / 128.
    pub diag: i64,
    pub causal: bool,
    pub softmax: bool,
    /// > 0: keep the top_k blocks; 0: keep blocks until `threshold` of the row's mass.
    pub top_k: usize,
    pub threshold: f64,
    pub sink_blocks: usize,
    pub local_blocks: usize,
}

/// The most key tiles a row of scores may have (kernels/sparse.cu: SEL_MAX).
pub const SELECT_MAX_TILES: usize = 2048;

/// Mirrors `struct SparseSelectParams` in kernels/sparse.cu.
#[repr(C)]
struct SelectParams {
    scores: u64,
    count: u64,
    index: u64,
    bitmap: u64,
    rows: i32,
    qb: i32,
    kb: i32,
    diag: i32,
    causal: i32,
    softmax: i32,
    top_k: i32,
    threshold: f32,
    sink_blocks: i32,
    local_blocks: i32,
}

/// Rows of up to this many key tiles take the warp-per-row selection (kernels/sparse.cu:
/// SELW_MAX), eight rows per CTA.
pub const SELECT_WARP_TILES: usize = 256;

pub fn select_kernel() -> KernelSource {
    let source = "#include \"sparse.cu\"\n\
                  extern \"C\" __global__ void __launch_bounds__(SEL_THREADS) sparse_select_blocks(const __grid_constant__ SparseSelectParams p) {\n\
                  \x20   sparse_select(p);\n}\n";
    KernelSource::portable("sparse_select_blocks".into(), source.into())
}

pub fn select_warp_kernel() -> KernelSource {
    let source = "#include \"sparse.cu\"\n\
                  extern \"C\" __global__ void __launch_bounds__(SEL_THREADS) sparse_select_blocks_warp(const __grid_constant__ SparseSelectParams p) {\n\
                  \x20   sparse_select_warp(p);\n}\n";
    KernelSource::portable("sparse_select_blocks_warp".into(), source.into())
}

/// Fills `count`, `index` and `bitmap` from `scores` on the GPU.
pub fn select(a: &SelectArgs, stream: usize) -> Result<()> {
    let s = a.scores;
    s.expect_dtype(&[DType::F32])?;
    s.expect_rank(4, "(batch, heads, q_tiles, k_tiles)")?;
    expect_contiguous(s)?;
    let (b, h, qb, kb) = (s.dim(0), s.dim(1), s.dim(2), s.dim(3));
    if kb == 0 || kb > SELECT_MAX_TILES {
        return shape_err(format!("{} has {kb} key tiles; the selection kernel takes 1 to {SELECT_MAX_TILES}", s.name));
    }
    for t in [a.count, a.index, a.bitmap] {
        t.expect_same_device(s)?;
        t.expect_dtype(&[DType::I32])?;
        expect_contiguous(t)?;
    }
    a.count.expect_shape(&[b as i64, h as i64, qb as i64])?;
    a.index.expect_shape(&s.shape)?;
    a.bitmap.expect_shape(&s.shape)?;
    if !(a.threshold.is_finite() && a.threshold > 0.0) && a.top_k == 0 {
        return Err(Error::Value(format!("threshold must be in (0, 1] when top_k is 0, got {}", a.threshold)));
    }
    let rows = b * h * qb;
    if rows == 0 {
        return Ok(());
    }
    if rows > i32::MAX as usize || a.diag.unsigned_abs() > i32::MAX as u64 / 2 {
        return shape_err(format!("{} is too large for the selection kernel", s.name));
    }
    let mut p = SelectParams {
        scores: s.ptr as u64,
        count: a.count.ptr as u64,
        index: a.index.ptr as u64,
        bitmap: a.bitmap.ptr as u64,
        rows: rows as i32,
        qb: qb as i32,
        kb: kb as i32,
        diag: a.diag as i32,
        causal: a.causal as i32,
        softmax: a.softmax as i32,
        top_k: a.top_k.min(i32::MAX as usize) as i32,
        threshold: a.threshold as f32,
        sink_blocks: a.sink_blocks.min(i32::MAX as usize) as i32,
        local_blocks: a.local_blocks.min(i32::MAX as usize) as i32,
    };
    let params = &mut p as *mut SelectParams as *mut c_void;
    if kb <= SELECT_WARP_TILES {
        return launch_rows(&select_warp_kernel(), s, rows.div_ceil(8), "the block selection kernel", params, stream);
    }
    launch_rows(&select_kernel(), s, rows, "the block selection kernel", params, stream)
}

/// Head dims the pooling kernel is compiled for.
pub const POOL_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Mirrors `struct SparsePoolParams` in kernels/sparse.cu. Strides in bytes.
#[repr(C)]
struct PoolParams {
    x: u64,
    out: u64,
    sb: i64,
    sn: i64,
    sh: i64,
    n: i32,
    heads: i32,
    blocks: i32,
    block: i32,
    mul: f32,
    pad_: i32,
}

/// `sparse_pool_<x dtype>_d<D>`, `_o16` when the means are written in x's dtype.
fn pool_name(dtype: DType, d: usize, out16: bool) -> String {
    format!("sparse_pool_{}_d{d}{}", dtype_name(dtype), if out16 { "_o16" } else { "" })
}

pub fn pool_kernel(dtype: DType, d: usize, out16: bool) -> KernelSource {
    let t = attention::ctype(dtype);
    let source = format!(
        "#include \"sparse.cu\"\n\
         extern \"C\" __global__ void __launch_bounds__(POOL_THREADS) {name}(const __grid_constant__ SparsePoolParams p) {{\n\
         \x20   sparse_pool<{t}, {d}, {o}>(p);\n}}\n",
        name = pool_name(dtype, d, out16),
        o = if out16 { t } else { "float" },
    );
    KernelSource::portable(pool_name(dtype, d, out16), source)
}

pub fn pool_kernels() -> Vec<KernelSource> {
    let mut v = Vec::new();
    for t in [DType::F16, DType::BF16] {
        for d in POOL_HEAD_DIMS {
            v.push(pool_kernel(t, d, false));
            v.push(pool_kernel(t, d, true));
        }
    }
    v
}

/// `out` (batch, heads, ceil(n / block), D), float32 or x's dtype <- the mean of each `block`
/// (64 or 128) tokens of `x` (batch, n, heads, D), the last block over its real tokens, times
/// `mul`.
pub fn pool(x: &TensorView, out: &TensorView, block: usize, mul: f64, stream: usize) -> Result<()> {
    x.expect_dtype(&[DType::F16, DType::BF16])?;
    x.expect_rank(4, "(batch, n, heads, head_dim)")?;
    x.expect_last_contiguous()?;
    x.expect_aligned(16)?;
    let (b, n, h, d) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    if !POOL_HEAD_DIMS.contains(&d) {
        return shape_err(format!("the pooling kernel takes head_dim 64, 128 or 256, {} has {d}", x.name));
    }
    if block != 64 && block != TILE {
        return Err(Error::Value(format!("block must be 64 or 128, got {block}")));
    }
    let blocks = n.div_ceil(block);
    out.expect_same_device(x)?;
    out.expect_dtype(&[DType::F32, x.dtype])?;
    expect_contiguous(out)?;
    out.expect_shape(&[b as i64, h as i64, blocks as i64, d as i64])?;
    if b == 0 || h == 0 || n == 0 {
        return Ok(());
    }
    if n > i32::MAX as usize - TILE || h > 65535 || b > 65535 {
        return shape_err(format!("{} is too large for the pooling kernel", x.name));
    }
    let e = x.dtype.size() as i64;
    let mut p = PoolParams {
        x: x.ptr as u64,
        out: out.ptr as u64,
        sb: x.stride(0) * e,
        sn: x.stride(1) * e,
        sh: x.stride(2) * e,
        n: n as i32,
        heads: h as i32,
        blocks: blocks as i32,
        block: block as i32,
        mul: mul as f32,
        pad_: 0,
    };
    let dev = driver::device_of(x, "the pooling kernel")?;
    let f = dev.function(&pool_kernel(x.dtype, d, out.dtype != DType::F32), 0)?;
    let cfg = LaunchConfig { grid: (blocks as u32, h as u32, b as u32), block: (256, 1, 1), smem_bytes: 0 };
    dev.launch(f, cfg, stream, &mut [&mut p as *mut PoolParams as *mut c_void])
}

/// Mirrors `struct SparsePageBoundsParams` in kernels/sparse.cu. Strides in elements.
#[repr(C)]
struct PageBoundsParams {
    q: u64,
    pmin: u64,
    pmax: u64,
    table: u64,
    seqlens: u64,
    bounds: u64,
    new_lens: u64,
    q_sb: i64,
    q_st: i64,
    q_sh: i64,
    s_sp: i64,
    s_sh: i64,
    t_sb: i64,
    q_len: i32,
    hq: i32,
    hk: i32,
    d: i32,
    mp: i32,
    page_size: i32,
    keep: i32,
    pad_: i32,
}

/// Pages per CTA of the bounds kernel (kernels/sparse.cu: PB_PAGES).
const PB_PAGES: usize = 64;

fn page_bounds_name(dtype: DType) -> String {
    format!("sparse_page_bounds_{}", dtype_name(dtype))
}

pub fn page_bounds_kernel(dtype: DType) -> KernelSource {
    let source = format!(
        "#include \"sparse.cu\"\n\
         extern \"C\" __global__ void __launch_bounds__(PB_THREADS) {name}(const __grid_constant__ SparsePageBoundsParams p) {{\n\
         \x20   sparse_page_bounds<{t}>(p);\n}}\n",
        name = page_bounds_name(dtype),
        t = attention::ctype(dtype),
    );
    KernelSource::portable(page_bounds_name(dtype), source)
}

pub fn page_bounds_kernels() -> Vec<KernelSource> {
    vec![page_bounds_kernel(DType::F16), page_bounds_kernel(DType::BF16)]
}

/// select_pages' Quest bounds (kernels/sparse.cu: sparse_page_bounds).
#[derive(Debug, Clone, Copy)]
pub struct PageBoundsArgs<'a> {
    /// (batch, q_len, heads_q, D) float16/bfloat16, last dim contiguous.
    pub q: &'a TensorView,
    /// (num_pages, heads_kv, D) x 2 in q's dtype, last dim contiguous, 8-byte aligned rows.
    pub page_min: &'a TensorView,
    pub page_max: &'a TensorView,
    /// int32 (batch, max_pages) and (batch).
    pub block_table: &'a TensorView,
    pub seqlens: &'a TensorView,
    /// float32 (batch, heads_kv, max_pages) and int32 (batch): the outputs.
    pub bounds: &'a TensorView,
    pub new_lens: &'a TensorView,
    pub page_size: usize,
    /// Pages the selection keeps per head.
    pub keep: usize,
}

pub fn page_bounds(a: &PageBoundsArgs, stream: usize) -> Result<()> {
    let q = a.q;
    q.expect_dtype(&[DType::F16, DType::BF16])?;
    q.expect_rank(4, "(batch, q_len, heads_q, head_dim)")?;
    q.expect_last_contiguous()?;
    let (b, q_len, hq, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    if d == 0 || d % 4 != 0 || d > 256 {
        return shape_err(format!("the page bounds kernel takes head_dim a multiple of 4 up to 256, {} has {d}", q.name));
    }
    for t in [a.page_min, a.page_max] {
        t.expect_same_device(q)?;
        t.expect_same_dtype(q)?;
        t.expect_rank(3, "(num_pages, heads_kv, head_dim)")?;
        t.expect_last_contiguous()?;
        t.expect_aligned(8)?;
    }
    a.page_max.expect_shape(&a.page_min.shape)?;
    if a.page_min.strides != a.page_max.strides {
        return Err(Error::Layout(format!("{} and {} must share strides", a.page_min.name, a.page_max.name)));
    }
    let hk = a.page_min.dim(1);
    if a.page_min.dim(2) != d || hk == 0 || hq % hk != 0 {
        return shape_err(format!(
            "{} {:?} must have head_dim {d} and a number of heads dividing q's {hq}",
            a.page_min.name, a.page_min.shape
        ));
    }
    a.block_table.expect_same_device(q)?;
    a.block_table.expect_dtype(&[DType::I32])?;
    a.block_table.expect_rank(2, "(batch, max_pages)")?;
    a.block_table.expect_last_contiguous()?;
    let mp = a.block_table.dim(1);
    if a.block_table.dim(0) != b {
        return shape_err(format!("{} must have {b} rows, got {:?}", a.block_table.name, a.block_table.shape));
    }
    for (t, dt) in [(a.seqlens, DType::I32), (a.new_lens, DType::I32)] {
        t.expect_same_device(q)?;
        t.expect_dtype(&[dt])?;
        expect_contiguous(t)?;
        t.expect_shape(&[b as i64])?;
    }
    a.bounds.expect_same_device(q)?;
    a.bounds.expect_dtype(&[DType::F32])?;
    expect_contiguous(a.bounds)?;
    a.bounds.expect_shape(&[b as i64, hk as i64, mp as i64])?;
    if a.page_size == 0 || a.keep == 0 {
        return Err(Error::Value(format!("page_size and keep must be positive, got {} and {}", a.page_size, a.keep)));
    }
    if b == 0 || mp == 0 || q_len == 0 {
        return Ok(());
    }
    if b * hk > 65535 || mp > i32::MAX as usize || a.page_size > i32::MAX as usize / 2 || a.keep > i32::MAX as usize {
        return shape_err(format!("{} is too large for the page bounds kernel", a.block_table.name));
    }
    let mut p = PageBoundsParams {
        q: q.ptr as u64,
        pmin: a.page_min.ptr as u64,
        pmax: a.page_max.ptr as u64,
        table: a.block_table.ptr as u64,
        seqlens: a.seqlens.ptr as u64,
        bounds: a.bounds.ptr as u64,
        new_lens: a.new_lens.ptr as u64,
        q_sb: q.stride(0),
        q_st: q.stride(1),
        q_sh: q.stride(2),
        s_sp: a.page_min.stride(0),
        s_sh: a.page_min.stride(1),
        t_sb: a.block_table.stride(0),
        q_len: q_len as i32,
        hq: hq as i32,
        hk: hk as i32,
        d: d as i32,
        mp: mp as i32,
        page_size: a.page_size as i32,
        keep: a.keep as i32,
        pad_: 0,
    };
    let dev = driver::device_of(q, "the page bounds kernel")?;
    let f = dev.function(&page_bounds_kernel(q.dtype), 0)?;
    let cfg = LaunchConfig { grid: (mp.div_ceil(PB_PAGES) as u32, (b * hk) as u32, 1), block: (256, 1, 1), smem_bytes: 0 };
    dev.launch(f, cfg, stream, &mut [&mut p as *mut PageBoundsParams as *mut c_void])
}

/// Mirrors `struct SparseAntidiagParams` in kernels/sparse.cu.
#[repr(C)]
struct AntidiagParams {
    s: u64,
    out: u64,
    s_sh: i64,
    rows: i32,
    ld: i32,
    row0: i32,
    cols_valid: i32,
    causal: i32,
    off: i32,
    stride: i32,
    r: i32,
    qb: i32,
    kb: i32,
    scale: f32,
    pad_: i32,
}

fn antidiag_name(dtype: DType) -> String {
    format!("sparse_antidiag_{}", dtype_name(dtype))
}

pub fn antidiag_kernel(dtype: DType) -> KernelSource {
    let source = format!(
        "#include \"sparse.cu\"\n\
         extern \"C\" __global__ void __launch_bounds__(AD_THREADS) {name}(const __grid_constant__ SparseAntidiagParams p) {{\n\
         \x20   sparse_antidiag<{t}>(p);\n}}\n",
        name = antidiag_name(dtype),
        t = attention::ctype(dtype),
    );
    KernelSource::portable(antidiag_name(dtype), source)
}

pub fn antidiag_kernels() -> Vec<KernelSource> {
    vec![antidiag_kernel(DType::F16), antidiag_kernel(DType::BF16)]
}

/// The antidiagonal block scores of a chunk of query blocks (kernels/sparse.cu:
/// sparse_antidiag), from the strided matmul's logits.
#[derive(Debug, Clone, Copy)]
pub struct AntidiagArgs<'a> {
    /// (heads, rows, ld) float16/bfloat16, contiguous: rows `row0 ..` of the strided q against
    /// the first `ld` strided keys, unscaled.
    pub logits: &'a TensorView,
    /// float32 (heads, q_blocks, k_blocks), contiguous: rows row0 / r .. of it are written.
    pub out: &'a TensorView,
    pub row0: usize,
    /// Columns inside the sequence: ceil(kv_len / stride).
    pub cols_valid: usize,
    pub causal: bool,
    /// kv_len - q_len.
    pub off: i64,
    pub stride: usize,
    /// Rows (and columns) per block: block_size / stride, a power of two.
    pub r: usize,
    pub scale: f64,
}

pub fn antidiag(a: &AntidiagArgs, stream: usize) -> Result<()> {
    let s = a.logits;
    s.expect_dtype(&[DType::F16, DType::BF16])?;
    s.expect_rank(3, "(heads, rows, columns)")?;
    expect_contiguous(s)?;
    a.out.expect_same_device(s)?;
    a.out.expect_dtype(&[DType::F32])?;
    a.out.expect_rank(3, "(heads, q_blocks, k_blocks)")?;
    expect_contiguous(a.out)?;
    let (heads, rows, ld) = (s.dim(0), s.dim(1), s.dim(2));
    let (qb, kb) = (a.out.dim(1), a.out.dim(2));
    if !a.r.is_power_of_two() || a.stride == 0 {
        return Err(Error::Value(format!("r must be a power of two and stride positive, got {} and {}", a.r, a.stride)));
    }
    if a.out.dim(0) != heads || rows % a.r != 0 || a.row0 % a.r != 0 || (a.row0 + rows) / a.r > qb {
        return shape_err(format!(
            "{} {:?} (from row {}) must hold whole blocks of {} rows inside {} {:?}",
            s.name, s.shape, a.row0, a.r, a.out.name, a.out.shape
        ));
    }
    if kb == 0 || kb > SELECT_MAX_TILES || ld.min(a.cols_valid) > kb * a.r {
        return shape_err(format!("{} must have 1 to {SELECT_MAX_TILES} key blocks covering {ld} columns", a.out.name));
    }
    if ld % 8 != 0 {
        return shape_err(format!("the antidiagonal kernel reads 16-byte pieces: {}'s rows ({ld}) must be a multiple of 8", s.name));
    }
    s.expect_aligned(16)?;
    if heads == 0 || rows == 0 || ld == 0 {
        return Ok(());
    }
    if heads > 65535 || qb * a.r > i32::MAX as usize || a.off.unsigned_abs() > i32::MAX as u64 / 2 || a.stride > 4096 {
        return shape_err(format!("{} is too large for the antidiagonal kernel", s.name));
    }
    let mut p = AntidiagParams {
        s: s.ptr as u64,
        out: a.out.ptr as u64,
        s_sh: s.stride(0),
        rows: rows as i32,
        ld: ld as i32,
        row0: a.row0 as i32,
        cols_valid: a.cols_valid.min(i32::MAX as usize) as i32,
        causal: a.causal as i32,
        off: a.off as i32,
        stride: a.stride as i32,
        r: a.r as i32,
        qb: qb as i32,
        kb: kb as i32,
        scale: a.scale as f32,
        pad_: 0,
    };
    let dev = driver::device_of(s, "the antidiagonal kernel")?;
    let f = dev.function(&antidiag_kernel(s.dtype), 0)?;
    let cfg = LaunchConfig { grid: ((rows / a.r) as u32, heads as u32, 1), block: (256, 1, 1), smem_bytes: 0 };
    dev.launch(f, cfg, stream, &mut [&mut p as *mut AntidiagParams as *mut c_void])
}

/// Mirrors `struct SparseStridedParams` in kernels/sparse.cu.
#[repr(C)]
struct StridedParams {
    x: u64,
    out: u64,
    sb: i64,
    sn: i64,
    sh: i64,
    pieces: u32,
    n: i32,
    heads: i32,
    rows: i32,
    stride: i32,
    d8: i32,
    reverse: i32,
    pad_: i32,
}

pub fn strided_kernel() -> KernelSource {
    let source = "#include \"sparse.cu\"\n\
                  extern \"C\" __global__ void __launch_bounds__(256) sparse_strided_rows(const __grid_constant__ SparseStridedParams p) {\n\
                  \x20   sparse_strided(p);\n}\n";
    KernelSource::portable("sparse_strided_rows".into(), source.into())
}

/// `out` (batch, heads, rows, stride * D) <- x (batch, n, heads, D) with row a holding tokens
/// a * stride .. + stride - 1 (reversed with `reverse`), zeros past n: the operands of the
/// antidiagonal matmul, in one copy.
pub fn strided_rows(x: &TensorView, out: &TensorView, stride: usize, reverse: bool, stream: usize) -> Result<()> {
    x.expect_dtype(&[DType::F16, DType::BF16])?;
    x.expect_rank(4, "(batch, n, heads, head_dim)")?;
    x.expect_last_contiguous()?;
    x.expect_aligned(16)?;
    let (b, n, h, d) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    out.expect_same_device(x)?;
    out.expect_same_dtype(x)?;
    out.expect_rank(4, "(batch, heads, rows, stride * head_dim)")?;
    expect_contiguous(out)?;
    let rows = out.dim(2);
    if stride == 0 || d % 8 != 0 {
        return shape_err(format!("stride must be positive and {}'s head_dim a multiple of 8, got {stride} and {d}", x.name));
    }
    out.expect_shape(&[b as i64, h as i64, rows as i64, (stride * d) as i64])?;
    if rows * stride < n {
        return shape_err(format!("{} has {rows} rows of {stride} tokens, fewer than {}'s {n}", out.name, x.name));
    }
    let pieces = out.numel() as usize / 8;
    if pieces == 0 {
        return Ok(());
    }
    if pieces > u32::MAX as usize - 256 || rows * stride > i32::MAX as usize {
        return shape_err(format!("{} is too large for the strided copy", out.name));
    }
    let mut p = StridedParams {
        x: x.ptr as u64,
        out: out.ptr as u64,
        sb: x.stride(0),
        sn: x.stride(1),
        sh: x.stride(2),
        pieces: pieces as u32,
        n: n as i32,
        heads: h as i32,
        rows: rows as i32,
        stride: stride as i32,
        d8: (d / 8) as i32,
        reverse: reverse as i32,
        pad_: 0,
    };
    let dev = driver::device_of(x, "the strided copy")?;
    let f = dev.function(&strided_kernel(), 0)?;
    let cfg = LaunchConfig { grid: (pieces.div_ceil(256) as u32, 1, 1), block: (256, 1, 1), smem_bytes: 0 };
    dev.launch(f, cfg, stream, &mut [&mut p as *mut StridedParams as *mut c_void])
}

/// Launches a list kernel (kernels/sparse.cu): `ctas` CTAs of 256 threads (one per row, or
/// one per eight rows for the warp selection), its parameter block `params`, on the GPU of `on`.
fn launch_rows(kernel: &KernelSource, on: &TensorView, ctas: usize, what: &str, params: *mut c_void, stream: usize) -> Result<()> {
    let dev = driver::device_of(on, what)?;
    let f = dev.function(kernel, 0)?;
    let cfg = LaunchConfig { grid: (ctas as u32, 1, 1), block: (256, 1, 1), smem_bytes: 0 };
    dev.launch(f, cfg, stream, &mut [params])
}

/// vertical_slash's kernel lists (kernels/sparse.cu: sparse_vs_lists), one launch per mask.
#[derive(Debug, Clone, Copy)]
pub struct VsArgs<'a> {
    /// uint8 (batch * heads, nrel): relative key tile `r + r_min` (key tile - query block)
    /// crossed by one of the head's diagonals.
    pub rel: &'a TensorView,
    /// int32 (batch * heads, column tiles * 128): sorted column positions, kv_len past the
    /// real ones.
    pub cols: &'a TensorView,
    /// int32 (batch * heads, q_tiles), (batch * heads, q_tiles, max) x 2 and (rows * column
    /// tiles, 4): the outputs.
    pub count: &'a TensorView,
    pub index: &'a TensorView,
    pub bitmap: &'a TensorView,
    pub col_bits: &'a TensorView,
    pub r_min: i64,
    /// kv_len - q_len.
    pub off: i64,
}

/// Mirrors `struct SparseVsParams` in kernels/sparse.cu.
#[repr(C)]
struct VsParams {
    rel: u64,
    cols: u64,
    count: u64,
    index: u64,
    bitmap: u64,
    col_bits: u64,
    rows: i32,
    qt: i32,
    kt: i32,
    ct: i32,
    max: i32,
    nrel: i32,
    r_min: i32,
    off: i32,
}

/// The most column tiles a head may have (one per thread of the list kernel).
pub const VS_MAX_COLUMN_TILES: usize = 256;

pub fn vs_kernel() -> KernelSource {
    let source = "#include \"sparse.cu\"\n\
                  extern \"C\" __global__ void __launch_bounds__(SEL_THREADS) sparse_vs_lists(const __grid_constant__ SparseVsParams p) {\n\
                  \x20   vs_lists(p);\n}\n";
    KernelSource::portable("sparse_vs_lists".into(), source.into())
}

/// Fills the vertical-slash lists on the GPU; `kt` key tiles per row.
pub fn vs_lists(a: &VsArgs, kt: usize, stream: usize) -> Result<()> {
    a.rel.expect_dtype(&[DType::U8])?;
    a.rel.expect_rank(2, "(batch * heads, nrel)")?;
    for t in [a.cols, a.count, a.index, a.bitmap, a.col_bits] {
        t.expect_same_device(a.rel)?;
        t.expect_dtype(&[DType::I32])?;
        expect_contiguous(t)?;
    }
    expect_contiguous(a.rel)?;
    let bh = a.rel.dim(0);
    a.cols.expect_rank(2, "(batch * heads, column tiles * 128)")?;
    let ct = a.cols.dim(1) / TILE;
    a.count.expect_rank(2, "(batch * heads, q_tiles)")?;
    let qt = a.count.dim(1);
    let max = kt + ct;
    if a.cols.dim(0) != bh || a.cols.dim(1) % TILE != 0 || ct == 0 || ct > VS_MAX_COLUMN_TILES {
        return shape_err(format!(
            "{} must be ({bh}, 128 to {} columns in whole tiles), got {:?}",
            a.cols.name, VS_MAX_COLUMN_TILES * TILE, a.cols.shape
        ));
    }
    if kt == 0 || kt > SELECT_MAX_TILES {
        return shape_err(format!("vertical_slash's list kernel takes 1 to {SELECT_MAX_TILES} key tiles, got {kt}"));
    }
    a.count.expect_shape(&[bh as i64, qt as i64])?;
    a.index.expect_shape(&[bh as i64, qt as i64, max as i64])?;
    a.bitmap.expect_shape(&[bh as i64, qt as i64, max as i64])?;
    a.col_bits.expect_shape(&[(bh * qt * ct) as i64, (TILE / 32) as i64])?;
    let rows = bh * qt;
    if rows == 0 {
        return Ok(());
    }
    if rows * ct > i32::MAX as usize / 2 || a.off.unsigned_abs() > i32::MAX as u64 / 2 || a.r_min.unsigned_abs() > i32::MAX as u64 / 2 {
        return shape_err(format!("{} is too large for the list kernel", a.cols.name));
    }
    let mut p = VsParams {
        rel: a.rel.ptr as u64,
        cols: a.cols.ptr as u64,
        count: a.count.ptr as u64,
        index: a.index.ptr as u64,
        bitmap: a.bitmap.ptr as u64,
        col_bits: a.col_bits.ptr as u64,
        rows: rows as i32,
        qt: qt as i32,
        kt: kt as i32,
        ct: ct as i32,
        max: max as i32,
        nrel: a.rel.dim(1) as i32,
        r_min: a.r_min as i32,
        off: a.off as i32,
    };
    launch_rows(&vs_kernel(), a.rel, rows, "the vertical-slash list kernel", &mut p as *mut VsParams as *mut c_void, stream)
}
