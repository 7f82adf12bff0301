//! Decode attention: `q_len` new tokens per sequence (already appended to the cache) against a
//! KV cache that is either contiguous (batch, capacity, heads_kv, D) or paged
//! (num_pages, page_size, heads_kv, D) with an int32 block table (batch, max_pages).
//! `cache_seqlens[b]` counts sequence b's keys, new tokens included; new token i sits at position
//! `len - q_len + i` and, with `causal_q`, sees keys up to it (speculative verification).
//!
//! The GPU kernel (kernels/decode.cu) packs the q heads of one kv head into the rows of one CTA
//! and splits long sequences over several CTAs (FlashDecoding); the split count depends on the
//! shapes only (`plan`), so the Python layer allocates the split workspace through torch and a
//! CUDA graph captures a fixed launch.

use crate::cpu;
use crate::cuda::KernelSource;
use crate::cuda::driver::{self, LaunchConfig};
use crate::dlpack::{DType, Device, TensorView};
use crate::error::{Error, Result};
use crate::ops::attention::{WINDOW_NONE, batch_strides, ctype, dtype_name, ptr, shape_err, window_side};
use std::ffi::c_void;

pub const Q_LAYOUT: &str = "(batch, q_len, heads_q, head_dim)";
pub const CACHE_LAYOUT: &str = "(batch, capacity, heads_kv, head_dim) or, with block_table, (num_pages, page_size, heads_kv, head_dim)";
pub const MAX_PAGE_SIZE: usize = 256;
/// Fewest keys a split should own: below this the merge costs more than the parallelism gains.
const MIN_KEYS_PER_SPLIT: usize = 256;
/// One per thread of the merge kernel (DECODE_MAX_SPLITS in kernels/decode.cu).
const MAX_SPLITS: usize = 128;

/// One decode call: borrowed tensors plus options.
#[derive(Debug, Clone, Copy)]
pub struct DecodeArgs<'a> {
    pub q: &'a TensorView,
    pub k_cache: &'a TensorView,
    pub v_cache: &'a TensorView,
    /// int32 (batch,): keys per sequence, new tokens included.
    pub cache_seqlens: &'a TensorView,
    /// int32 (batch, max_pages), or None for a contiguous cache.
    pub block_table: Option<&'a TensorView>,
    /// int32 (batch,) or (batch, heads_kv): the first key of each sequence (or kv head); None: 0.
    pub cache_leftpad: Option<&'a TensorView>,
    pub out: &'a TensorView,
    /// float32 (batch, heads_q, q_len), natural log.
    pub lse: Option<&'a TensorView>,
    /// float32, at least `plan(..).workspace_floats` elements, on the GPU (splits > 1).
    pub workspace: Option<&'a TensorView>,
    pub causal_q: bool,
    pub scale: Option<f64>,
    pub softcap: f64,
    /// Keys (left, right) of each new token's position that stay visible; -1 = unbounded.
    pub window: (i64, i64),
    /// From `plan` (GPU); the CPU path ignores it.
    pub splits: usize,
}

/// The cache's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheDims {
    /// 0 for a contiguous cache.
    pub page_size: usize,
    pub num_pages: usize,
    /// Keys one sequence can hold.
    pub capacity: usize,
}

impl CacheDims {
    /// log2 of the page size, as the kernels index pages (0 for a contiguous cache).
    pub fn page_shift(&self) -> i32 {
        if self.page_size > 0 { self.page_size.trailing_zeros() as i32 } else { 0 }
    }
}

/// Shapes and normalised options of a checked call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeDims {
    pub batch: usize,
    pub q_len: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub cache: CacheDims,
    pub window_left: i64,
    pub window_right: i64,
    pub scale: f32,
    pub softcap: f32,
}

impl DecodeDims {
    /// Visible keys [lo, hi] of new token i of a sequence of `len` keys whose first key is
    /// `start` (empty when lo > hi).
    pub fn bounds(&self, len: usize, start: usize, i: usize) -> (i64, i64) {
        let pos = len as i64 - self.q_len as i64 + i as i64;
        let lo = (pos - self.window_left).max(start as i64);
        let hi = (pos + self.window_right).min(len as i64 - 1);
        (lo, hi)
    }
}

pub fn check(a: &DecodeArgs) -> Result<DecodeDims> {
    let (q, k, v, out) = (a.q, a.k_cache, a.v_cache, a.out);
    for t in [k, v, out, a.cache_seqlens] {
        t.expect_same_device(q)?;
    }
    q.expect_dtype(&[DType::F16, DType::BF16, DType::F32])?;
    for t in [k, v, out] {
        t.expect_same_dtype(q)?;
    }
    q.expect_rank(4, Q_LAYOUT)?;
    out.expect_rank(4, Q_LAYOUT)?;
    k.expect_rank(4, CACHE_LAYOUT)?;
    v.expect_rank(4, CACHE_LAYOUT)?;
    let (batch, q_len, heads_q, head_dim) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let heads_kv = k.dim(2);
    if q_len == 0 {
        return shape_err("q has q_len 0; decode needs at least one new token".into());
    }
    if head_dim == 0 || head_dim % 8 != 0 || head_dim > 256 {
        return shape_err(format!("q has head_dim {head_dim}; supported head dims are multiples of 8 up to 256"));
    }
    k.expect_dim(3, head_dim, "head_dim (must match q)")?;
    if heads_kv == 0 || heads_q % heads_kv != 0 {
        return shape_err(format!("q has {heads_q} heads, which must be a multiple of k_cache's {heads_kv} heads (GQA/MQA)"));
    }
    out.expect_shape(&q.shape)?;
    out.expect_writable_layout()?;
    for t in [q, k, v, out] {
        t.expect_last_contiguous()?;
    }
    let cache = check_cache(k, v, a.cache_seqlens, a.block_table, batch)?;
    if let Some(lp) = a.cache_leftpad {
        check_leftpad(lp, q, batch, heads_kv)?;
    }
    let shape = DecodeShape { batch, q_len, heads_q, heads_kv, head_dim };
    check_options(q, a.lse, a.workspace, shape, cache, a.scale, a.softcap, a.window, a.causal_q)
}

/// The shapes of a decode-family call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecodeShape {
    pub batch: usize,
    pub q_len: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
}

/// What every kernel of the decode family checks alike once its cache is checked: the LSE and
/// workspace tensors, then scale, softcap and window normalised into the dims.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_options(
    q: &TensorView,
    lse: Option<&TensorView>,
    workspace: Option<&TensorView>,
    s: DecodeShape,
    cache: CacheDims,
    scale: Option<f64>,
    softcap: f64,
    window: (i64, i64),
    causal_q: bool,
) -> Result<DecodeDims> {
    if let Some(lse) = lse {
        lse.expect_same_device(q)?;
        lse.expect_dtype(&[DType::F32])?;
        lse.expect_shape(&[s.batch as i64, s.heads_q as i64, s.q_len as i64])?;
        lse.expect_writable_layout()?;
    }
    if let Some(ws) = workspace {
        ws.expect_same_device(q)?;
        ws.expect_dtype(&[DType::F32])?;
        if ws.ndim() != 1 || ws.stride(0) != 1 {
            return shape_err(format!("{} must be a contiguous 1-D float32 tensor", ws.name));
        }
    }
    let scale = scale.unwrap_or(1.0 / (s.head_dim as f64).sqrt());
    if !scale.is_finite() {
        return Err(Error::Value(format!("scale must be finite, got {scale}")));
    }
    if softcap < 0.0 || !softcap.is_finite() {
        return Err(Error::Value(format!("softcap must be >= 0 (0 or None: off), got {softcap}")));
    }
    let window_left = window_side(window.0, "left")?;
    let mut window_right = window_side(window.1, "right")?;
    if causal_q {
        window_right = 0;
    }
    Ok(DecodeDims {
        batch: s.batch,
        q_len: s.q_len,
        heads_q: s.heads_q,
        heads_kv: s.heads_kv,
        head_dim: s.head_dim,
        cache,
        window_left,
        window_right,
        scale: scale as f32,
        softcap: softcap as f32,
    })
}

pub const LEFTPAD_LAYOUT: &str = "(batch,) or (batch, heads_kv)";

/// `cache_leftpad`: int32, one start per sequence or per (sequence, kv head).
fn check_leftpad(lp: &TensorView, q: &TensorView, batch: usize, heads_kv: usize) -> Result<()> {
    lp.expect_same_device(q)?;
    lp.expect_dtype(&[DType::I32])?;
    if lp.ndim() != 1 && lp.ndim() != 2 {
        lp.expect_rank(1, LEFTPAD_LAYOUT)?;
    }
    lp.expect_dim(0, batch, "batch")?;
    if lp.ndim() == 2 {
        lp.expect_dim(1, heads_kv, "heads_kv (k_cache's axis 2)")?;
    }
    Ok(())
}

/// Host-side check of `cache_leftpad`'s values (row-major, one per sequence or per (sequence,
/// kv head)): each start within its sequence, 0 <= start <= cache_seqlens[b].
pub fn check_leftpad_values(seqlens: &[i32], starts: &[i32], per_head: bool) -> Result<()> {
    let heads = if seqlens.is_empty() { 1 } else { (starts.len() / seqlens.len()).max(1) };
    for (at, &s) in starts.iter().enumerate() {
        let b = at / heads;
        let len = seqlens.get(b).copied().unwrap_or(0);
        if s < 0 || s > len {
            let idx = if per_head { format!("{b}, {}", at % heads) } else { format!("{b}") };
            return Err(Error::Value(format!("cache_leftpad[{idx}] is {s}; it must be in [0, cache_seqlens[{b}] = {len}]")));
        }
    }
    Ok(())
}

/// (start of each (sequence, kv head) row, kv heads with their own start) of a leftpad tensor.
pub fn leftpad_strides(lp: Option<&TensorView>) -> (i64, i64) {
    lp.map_or((0, 0), |t| (t.stride(0), if t.ndim() == 2 { t.stride(1) } else { 0 }))
}

/// The cache layout shared by decode_attention and append_kv: K and V alike, `cache_seqlens`
/// int32 (batch,), and either a contiguous cache (batch first) or a page pool with an int32
/// block table, (batch, max_pages) or per kv head (batch, heads_kv, max_pages): each head
/// reading its own pages (sparse decode keeps a different page set per head).
pub const TABLE_LAYOUT: &str = "(batch, max_pages) or (batch, heads_kv, max_pages)";

/// (kv heads with their own row, row length) of a block table's row-major elements.
pub fn table_rows(bt: &TensorView) -> (usize, usize) {
    if bt.ndim() == 3 { (bt.dim(1), bt.dim(2)) } else { (1, bt.dim(1)) }
}

pub fn check_cache(
    k: &TensorView,
    v: &TensorView,
    seqlens: &TensorView,
    block_table: Option<&TensorView>,
    batch: usize,
) -> Result<CacheDims> {
    v.expect_shape(&k.shape)?;
    seqlens.expect_same_device(k)?;
    seqlens.expect_dtype(&[DType::I32])?;
    seqlens.expect_shape(&[batch as i64])?;
    let (page_size, num_pages, capacity) = match block_table {
        Some(bt) => {
            bt.expect_same_device(k)?;
            bt.expect_dtype(&[DType::I32])?;
            if bt.ndim() != 2 && bt.ndim() != 3 {
                bt.expect_rank(2, TABLE_LAYOUT)?;
            }
            bt.expect_dim(0, batch, "batch")?;
            if bt.ndim() == 3 {
                bt.expect_dim(1, k.dim(2), "heads_kv (k_cache's axis 2)")?;
            }
            let last = bt.ndim() - 1;
            if bt.stride(last) != 1 && bt.dim(last) > 1 {
                return Err(Error::Layout(format!("{} must be contiguous along max_pages", bt.name)));
            }
            let ps = k.dim(1);
            if ps == 0 || !ps.is_power_of_two() || ps > MAX_PAGE_SIZE {
                return shape_err(format!(
                    "{} has page size {ps} (axis 1); supported page sizes are powers of two from 1 to {MAX_PAGE_SIZE}",
                    k.name
                ));
            }
            (ps, k.dim(0), table_rows(bt).1 * ps)
        }
        None => {
            k.expect_dim(0, batch, "batch")?;
            (0, 0, k.dim(1))
        }
    };
    if capacity as i64 >= WINDOW_NONE {
        return shape_err(format!("the cache holds {capacity} keys per sequence; at most 2^30 are supported"));
    }
    Ok(CacheDims { page_size, num_pages, capacity })
}

/// Host-side check of the lengths and the block table: every length plus `extra` (tokens about
/// to be appended) within the capacity, and every page those keys use inside the pool.
/// `block_table` is row-major: (elements, rows per sequence (kv heads or 1), row length).
pub fn check_tables(c: &CacheDims, seqlens: &[i32], block_table: Option<(&[i32], usize, usize)>, extra: usize) -> Result<()> {
    if block_table.is_some() && c.page_size == 0 {
        return shape_err("the paged cache has page size 0 (axis 1)".into());
    }
    for (b, &len) in seqlens.iter().enumerate() {
        if len < 0 || len as usize + extra > c.capacity {
            let what = if extra > 0 { format!(" plus the {extra} new tokens") } else { String::new() };
            return Err(Error::Value(format!(
                "cache_seqlens[{b}] is {len}; it{what} must be in [0, {}] (the cache's capacity per sequence)",
                c.capacity
            )));
        }
        if let Some((bt, heads, stride)) = block_table {
            let used = (len as usize + extra).div_ceil(c.page_size);
            for h in 0..heads {
                for p in 0..used {
                    let page = bt[(b * heads + h) * stride + p];
                    if page < 0 || page as usize >= c.num_pages {
                        let at = if heads > 1 { format!("{b}, {h}, {p}") } else { format!("{b}, {p}") };
                        return Err(Error::Value(format!(
                            "block_table[{at}] is {page}, outside the cache's {} pages (sequence {b} uses {} keys)",
                            c.num_pages,
                            len as usize + extra
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Launch shape of a GPU call: fixed by the shapes, so the caller can size the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub warps_on_rows: usize,
    pub row_groups: usize,
    pub splits: usize,
    /// float32 elements of split outputs and LSEs (0 with one split).
    pub workspace_floats: usize,
}

/// Splits chosen like FlashDecoding's: enough CTAs to fill every SM slot, picking the fewest
/// splits whose last wave is at least 97% as full as the best count's.
pub fn plan(d: &DecodeDims, dtype: DType, sm_count: usize, smem_per_sm: usize) -> Plan {
    plan_with(d, sm_count, smem_per_sm, |wr| DecodeSpec::for_problem(dtype, d.head_dim, wr).smem_bytes())
}

/// `plan` for any kernel of the decode family, given its shared memory per CTA by warps on rows.
pub fn plan_with(d: &DecodeDims, sm_count: usize, smem_per_sm: usize, smem_of: impl Fn(usize) -> u32) -> Plan {
    let rows = d.q_len * (d.heads_q / d.heads_kv);
    let wr = if rows <= 16 { 1 } else if rows <= 32 { 2 } else { 4 };
    let row_groups = rows.div_ceil(16 * wr);
    let d_pad = padded_head_dim(d.head_dim);
    let per_sm = (smem_per_sm / (smem_of(wr) as usize + 1024)).clamp(1, 4);
    let slots = (sm_count * per_sm) as f64;
    let units = d.batch * d.heads_kv * row_groups;
    let max_splits = d.cache.capacity.div_ceil(MIN_KEYS_PER_SPLIT).clamp(1, MAX_SPLITS);
    let mut splits = 1;
    if (units as f64) < 0.8 * slots && max_splits > 1 {
        let eff = |s: usize| {
            let waves = (units * s) as f64 / slots;
            waves / waves.ceil()
        };
        let best = (1..=max_splits).map(eff).fold(0.0, f64::max);
        // Nearly the best: the CTAs spread evenly over the SMs. (At 85% of the best, int8 (1, 128K)
        // took 43 splits, 344 CTAs for 396 slots, and ran 16% slower than with 49.)
        splits = (1..=max_splits).find(|&s| eff(s) >= 0.97 * best).unwrap_or(1);
    }
    // FERROKERNELS_DECODE_SPLITS overrides the count (for A/B timing).
    if let Some(s) = std::env::var("FERROKERNELS_DECODE_SPLITS").ok().and_then(|s| s.parse::<usize>().ok()) {
        splits = s.clamp(1, max_splits);
    }
    let partials = splits * d.batch * d.heads_q * d.q_len;
    // The split LSEs, padded to 16 bytes, then the split outputs (float4 stores).
    let workspace_floats = if splits > 1 { partials.div_ceil(4) * 4 + partials * d_pad } else { 0 };
    Plan { warps_on_rows: wr, row_groups, splits, workspace_floats }
}

/// The head dims the decode kernels are compiled for: 64, 128 or 256.
pub fn padded_head_dim(head_dim: usize) -> usize {
    match head_dim {
        0..=64 => 64,
        65..=128 => 128,
        _ => 256,
    }
}

/// A compiled decode kernel: dtype, head dim rounded up to 64, warps on rows (1, 2, 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecodeSpec {
    pub dtype: DType,
    pub head_dim_pad: usize,
    pub warps_on_rows: usize,
    /// K/V tiles of 64 keys in flight; FERROKERNELS_DECODE_STAGES overrides the default (for
    /// A/B timing).
    pub stages: usize,
}

impl DecodeSpec {
    const BLOCK_N: usize = 64;

    pub fn for_problem(dtype: DType, head_dim: usize, warps_on_rows: usize) -> DecodeSpec {
        let head_dim_pad = padded_head_dim(head_dim);
        let default = if head_dim_pad > 128 { 2 } else { 3 };
        let stages = std::env::var("FERROKERNELS_DECODE_STAGES")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|s| (2..=8).contains(s))
            .unwrap_or(default);
        DecodeSpec { dtype, head_dim_pad, warps_on_rows, stages }
    }

    pub fn all() -> Vec<DecodeSpec> {
        let mut v = Vec::new();
        for dtype in [DType::F16, DType::BF16] {
            for d in [64, 128, 256] {
                for wr in [1, 2, 4] {
                    let stages = if d > 128 { 2 } else { 3 };
                    v.push(DecodeSpec { dtype, head_dim_pad: d, warps_on_rows: wr, stages });
                }
            }
        }
        v
    }

    /// Mirrors decode_fwd: Q rows, then `stages` K+V tiles of 64 padded rows.
    pub fn smem_bytes(&self) -> u32 {
        let srow = self.head_dim_pad + 8;
        ((16 * self.warps_on_rows * srow + self.stages * 2 * Self::BLOCK_N * srow) * 2) as u32
    }

    pub fn name(&self) -> String {
        let default = if self.head_dim_pad > 128 { 2 } else { 3 };
        let stages = if self.stages == default { String::new() } else { format!("_s{}", self.stages) };
        format!("decode_fwd_{}_d{}_r{}{stages}", dtype_name(self.dtype), self.head_dim_pad, self.warps_on_rows)
    }

    pub fn merge_name(&self) -> String {
        format!("decode_merge_{}_d{}", dtype_name(self.dtype), self.head_dim_pad)
    }

    pub fn kernel(&self) -> KernelSource {
        let source = format!(
            "#include \"decode.cu\"\n\
             extern \"C\" __global__ void __launch_bounds__(128) {name}(const __grid_constant__ DecodeParams p) {{\n\
             \x20   decode_fwd<{t}, {d}, {wr}, {stages}>(p);\n}}\n",
            name = self.name(),
            t = ctype(self.dtype),
            d = self.head_dim_pad,
            wr = self.warps_on_rows,
            stages = self.stages,
        );
        KernelSource::portable(self.name(), source)
    }

    pub fn merge_kernel(&self) -> KernelSource {
        let source = format!(
            "#include \"decode.cu\"\n\
             extern \"C\" __global__ void __launch_bounds__(128) {name}(const __grid_constant__ DecodeParams p) {{\n\
             \x20   decode_merge<{t}, {d}>(p);\n}}\n",
            name = self.merge_name(),
            t = ctype(self.dtype),
            d = self.head_dim_pad,
        );
        KernelSource::portable(self.merge_name(), source)
    }
}

/// Every decode kernel (the merge kernels once per dtype and head dim).
pub fn all_kernels() -> Vec<KernelSource> {
    let mut v: Vec<KernelSource> = DecodeSpec::all().iter().map(|s| s.kernel()).collect();
    v.extend(DecodeSpec::all().iter().filter(|s| s.warps_on_rows == 1).map(|s| s.merge_kernel()));
    v
}

/// Mirrors `struct DecodeParams` in kernels/decode.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecodeParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    seqlens: u64,
    block_table: u64,
    part_o: u64,
    part_lse: u64,
    leftpad: u64,
    q_s: [i64; 3],
    k_s: [i64; 3],
    v_s: [i64; 3],
    o_s: [i64; 3],
    lse_s: [i64; 3],
    bt_sb: i64,
    bt_sh: i64,
    lp_sb: i64,
    lp_sh: i64,
    batch: i32,
    q_len: i32,
    heads_q: i32,
    heads_kv: i32,
    group: i32,
    head_dim: i32,
    page_shift: i32,
    capacity: i32,
    num_pages: i32,
    splits: i32,
    window_left: i32,
    window_right: i32,
    heads_fast: i32,
    pad: i32,
    scale_log2: f32,
    softcap: f32,
}

pub fn forward(a: &DecodeArgs, stream: usize) -> Result<()> {
    let d = check(a)?;
    if d.batch == 0 || d.heads_q == 0 {
        return Ok(());
    }
    match a.q.device {
        Device::Cpu => cpu::decode::forward(a, &d),
        Device::Cuda(ordinal) => forward_cuda(ordinal, a, &d, stream),
    }
}

/// The launch plan on GPU `ordinal` (splits and workspace size), for the Python layer.
pub fn plan_for_device(ordinal: i32, d: &DecodeDims, dtype: DType) -> Result<Plan> {
    let dev = driver::device(ordinal)?;
    Ok(plan(d, dtype, dev.sm_count as usize, dev.max_smem_optin as usize + 1024))
}

fn forward_cuda(ordinal: i32, a: &DecodeArgs, d: &DecodeDims, stream: usize) -> Result<()> {
    if a.q.dtype == DType::F32 {
        return Err(Error::DType(
            "q is float32; the CUDA decode kernel takes float16 or bfloat16 (float32 runs on the CPU path)".into(),
        ));
    }
    for t in [a.k_cache, a.v_cache] {
        t.expect_aligned(16)?;
    }
    let dev = driver::device(ordinal)?;
    let plan = plan(d, a.q.dtype, dev.sm_count as usize, dev.max_smem_optin as usize + 1024);
    let spec = DecodeSpec::for_problem(a.q.dtype, d.head_dim, plan.warps_on_rows);
    let mut p = DecodeLaunch { q: a.q, out: a.out, lse: a.lse, seqlens: a.cache_seqlens, workspace: a.workspace, splits: a.splits }
        .params(d, &plan)?;
    p.k = a.k_cache.ptr as u64;
    p.v = a.v_cache.ptr as u64;
    p.k_s = batch_strides(a.k_cache, false);
    p.v_s = batch_strides(a.v_cache, false);
    p.block_table = ptr(a.block_table);
    p.bt_sb = a.block_table.map_or(0, |t| t.stride(0));
    p.bt_sh = a.block_table.map_or(0, |t| if t.ndim() == 3 { t.stride(1) } else { 0 });
    p.leftpad = ptr(a.cache_leftpad);
    (p.lp_sb, p.lp_sh) = leftpad_strides(a.cache_leftpad);
    let smem = spec.smem_bytes();
    let f = dev.function(&spec.kernel(), smem)?;
    let mut args = [&mut p as *mut DecodeParams as *mut c_void];
    launch(dev, f, &spec.merge_kernel(), d, &plan, smem, stream, &mut args)
}

/// The tensors every kernel of the decode family reads or writes besides the cache.
pub(crate) struct DecodeLaunch<'a> {
    pub q: &'a TensorView,
    pub out: &'a TensorView,
    pub lse: Option<&'a TensorView>,
    pub seqlens: &'a TensorView,
    pub workspace: Option<&'a TensorView>,
    /// The caller's split count, which must be the plan's.
    pub splits: usize,
}

impl DecodeLaunch<'_> {
    /// Checks the launch against `plan` and fills every field but the cache's.
    pub fn params(&self, d: &DecodeDims, plan: &Plan) -> Result<DecodeParams> {
        for t in [self.q, self.out] {
            t.expect_aligned(16)?;
        }
        if d.batch > 65535 || d.heads_kv * 64 > 65535 {
            return shape_err(format!("batch {} / {} kv heads exceed the CUDA grid", d.batch, d.heads_kv));
        }
        if self.splits != plan.splits {
            return Err(Error::Value(format!(
                "splits is {} but this GPU's plan for these shapes has {} (call the plan function)",
                self.splits, plan.splits
            )));
        }
        let (part_o, part_lse) = if plan.splits > 1 {
            let ws = self.workspace.ok_or_else(|| Error::Value("workspace is required when splits > 1".into()))?;
            if (ws.numel() as usize) < plan.workspace_floats {
                return shape_err(format!("{} has {} elements; this call needs {}", ws.name, ws.numel(), plan.workspace_floats));
            }
            ws.expect_aligned(16)?;
            let partials = plan.splits * d.batch * d.heads_q * d.q_len;
            (ws.ptr as u64 + (partials.div_ceil(4) * 16) as u64, ws.ptr as u64)
        } else {
            (0, 0)
        };
        // FERROKERNELS_DECODE_HEADS_FAST=0 launches splits fastest instead (for A/B timing).
        let heads_fast = std::env::var("FERROKERNELS_DECODE_HEADS_FAST").map_or(true, |v| v != "0");
        let st = |t: &TensorView| batch_strides(t, false);
        Ok(DecodeParams {
            q: self.q.ptr as u64,
            k: 0,
            v: 0,
            o: self.out.ptr as u64,
            lse: ptr(self.lse),
            seqlens: self.seqlens.ptr as u64,
            block_table: 0,
            part_o,
            part_lse,
            leftpad: 0,
            q_s: st(self.q),
            k_s: [0; 3],
            v_s: [0; 3],
            o_s: st(self.out),
            lse_s: self.lse.map_or([0; 3], st),
            bt_sb: 0,
            bt_sh: 0,
            lp_sb: 0,
            lp_sh: 0,
            batch: d.batch as i32,
            q_len: d.q_len as i32,
            heads_q: d.heads_q as i32,
            heads_kv: d.heads_kv as i32,
            group: (d.heads_q / d.heads_kv) as i32,
            head_dim: d.head_dim as i32,
            page_shift: d.cache.page_shift(),
            capacity: d.cache.capacity as i32,
            num_pages: d.cache.num_pages as i32,
            splits: plan.splits as i32,
            window_left: d.window_left as i32,
            window_right: d.window_right as i32,
            heads_fast: heads_fast as i32,
            pad: 0,
            scale_log2: d.scale * std::f32::consts::LOG2_E,
            softcap: d.softcap,
        })
    }
}

/// Launches kernel `f` of the decode family on the plan's grid, then the split merge.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch(
    dev: &driver::Device,
    f: driver::Function,
    merge: &KernelSource,
    d: &DecodeDims,
    plan: &Plan,
    smem: u32,
    stream: usize,
    args: &mut [*mut c_void],
) -> Result<()> {
    let heads_fast = std::env::var("FERROKERNELS_DECODE_HEADS_FAST").map_or(true, |v| v != "0");
    let groups = d.heads_kv * plan.row_groups;
    let cfg = LaunchConfig {
        grid: if heads_fast { (groups as u32, plan.splits as u32, d.batch as u32) } else { (plan.splits as u32, groups as u32, d.batch as u32) },
        block: (128, 1, 1),
        smem_bytes: smem,
    };
    dev.launch(f, cfg, stream, args)?;
    if plan.splits > 1 {
        let merge = dev.function(merge, 0)?;
        let rows = d.batch * d.heads_q * d.q_len;
        let cfg = LaunchConfig { grid: (rows as u32, 1, 1), block: (128, 1, 1), smem_bytes: 0 };
        dev.launch(merge, cfg, stream, &mut args[..1])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(batch: usize, len: usize, heads_q: usize, heads_kv: usize) -> DecodeDims {
        DecodeDims {
            batch,
            q_len: 1,
            heads_q,
            heads_kv,
            head_dim: 128,
            cache: CacheDims { page_size: 0, num_pages: 0, capacity: len },
            window_left: WINDOW_NONE,
            window_right: 0,
            scale: 1.0,
            softcap: 0.0,
        }
    }

    #[test]
    fn params_layout_matches_the_kernel_struct() {
        // 10 pointers, 19 i64 strides, 14 i32, 2 f32.
        assert_eq!(std::mem::size_of::<DecodeParams>(), 10 * 8 + 19 * 8 + 14 * 4 + 2 * 4);
    }

    #[test]
    fn one_long_sequence_is_split_and_large_batches_are_not() {
        let smem = 228 * 1024;
        let p = plan(&dims(1, 32768, 32, 8), DType::BF16, 132, smem);
        assert_eq!((p.warps_on_rows, p.row_groups), (1, 1));
        assert!(p.splits >= 16 && p.splits <= 33, "{p:?}");
        assert_eq!(p.workspace_floats, (p.splits * 32).div_ceil(4) * 4 + p.splits * 32 * 128);
        assert_eq!(plan(&dims(256, 1024, 32, 8), DType::BF16, 132, smem).splits, 1);
        // A short cache never splits below MIN_KEYS_PER_SPLIT keys per split.
        assert_eq!(plan(&dims(1, 300, 32, 8), DType::BF16, 132, smem).splits, 2);
        // 64 q heads per kv head with 16 new tokens: 1024 rows in 16 groups of 64.
        let mut d = dims(1, 4096, 64, 1);
        d.q_len = 16;
        let p = plan(&d, DType::BF16, 132, smem);
        assert_eq!((p.warps_on_rows, p.row_groups), (4, 16));
    }

    #[test]
    fn merge_area_fits_in_the_pipeline_stages() {
        for s in DecodeSpec::all() {
            let d = s.head_dim_pad;
            let merge = (4 * 16 * d + 2 * 4 * 16) * 4;
            let stages = s.stages * 2 * 64 * (d + 8) * 2;
            assert!(merge <= stages, "{}", s.name());
            assert!(s.smem_bytes() <= 227 * 1024, "{}", s.name());
        }
    }
}
