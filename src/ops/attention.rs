//! Attention forward: `out = softmax(mods(scale * q k^T)) v` per (batch, head), where mods are
//! the optional softcap, ALiBi bias, dense mask and causal/sliding-window bounds.
//!
//! Dense inputs are (batch, seqlen, heads, head_dim) with any strides (last dim contiguous);
//! varlen inputs pack sequences as (total_tokens, heads, head_dim) with int32 `cu_seqlens`
//! offsets, as flash-attn. Both run the same kernels: varlen is a batch whose sequences start at
//! per-sequence row offsets.

use crate::cpu;
use crate::cuda::KernelSource;
use crate::cuda::driver::{self, LaunchConfig};
use crate::cuda::tma::{self, TensorMap};
use crate::dlpack::{DType, Device, TensorView};
use crate::error::{Error, Result};
use std::ffi::c_void;

pub const LAYOUT: &str = "(batch, seqlen, heads, head_dim)";
pub const VARLEN_LAYOUT: &str = "(total_tokens, heads, head_dim)";
pub const MASK_LAYOUT: &str = "(batch, heads, seqlen_q, seqlen_k), each axis either full or 1";
pub const MAX_HEAD_DIM: usize = 256;
/// An unbounded window side; larger than any sequence the kernels accept.
pub const WINDOW_NONE: i64 = 0x3fff_ffff;
/// The granularity of `mask_tiles` (kernels/common/attention.cuh: MASK_TILE).
pub const MASK_TILE: usize = 64;

/// Where the causal diagonal sits when seqlen_q != seqlen_k.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CausalAlign {
    /// flash-attn >= 2.1: the last query sees every key (offset = Nk - Nq).
    BottomRight,
    /// torch SDPA `is_causal`: query i sees keys 0..=i.
    TopLeft,
}

/// Packed sequences: sequence b owns rows cu_seqlens[b]..cu_seqlens[b+1].
#[derive(Debug, Clone, Copy)]
pub struct Varlen<'a> {
    pub cu_seqlens_q: &'a TensorView,
    pub cu_seqlens_k: &'a TensorView,
    pub max_seqlen_q: usize,
    pub max_seqlen_k: usize,
}

/// One attention call: borrowed tensors plus options.
#[derive(Debug, Clone, Copy)]
pub struct AttentionArgs<'a> {
    pub q: &'a TensorView,
    pub k: &'a TensorView,
    pub v: &'a TensorView,
    pub out: &'a TensorView,
    /// float32 (batch, heads_q, seqlen_q), or (heads_q, total_q) for varlen.
    pub lse: Option<&'a TensorView>,
    /// float32 slopes, (heads_q,) or (batch, heads_q): bias -slope * |i + off - j|.
    pub alibi: Option<&'a TensorView>,
    /// Dense mask, bool (true = attend) or additive (q's dtype or float32), MASK_LAYOUT.
    pub mask: Option<&'a TensorView>,
    /// uint8 summary of `mask` per MASK_TILE x MASK_TILE tile (0 empty, 1 partial, 2 full),
    /// same broadcasting; lets the GPU skip empty tiles and not read full ones.
    pub mask_tiles: Option<&'a TensorView>,
    pub varlen: Option<Varlen<'a>>,
    pub causal: bool,
    pub align: CausalAlign,
    /// Softmax scale; `None` means 1/sqrt(head_dim).
    pub scale: Option<f64>,
    /// Keys (left, right) of the diagonal that stay visible; -1 = unbounded (flash-attn).
    pub window: (i64, i64),
    /// Scores become softcap * tanh(score / softcap); 0 = off.
    pub softcap: f64,
    /// int32, at least one element, on the GPU: the persistent Hopper kernel's tile counter,
    /// zeroed on the stream before the launch. Without it tiles are handed out in fixed
    /// rounds, which balances causal work less well.
    pub workspace: Option<&'a TensorView>,
}

impl<'a> AttentionArgs<'a> {
    /// Plain attention with every option off.
    pub fn new(q: &'a TensorView, k: &'a TensorView, v: &'a TensorView, out: &'a TensorView) -> Self {
        AttentionArgs {
            q,
            k,
            v,
            out,
            lse: None,
            alibi: None,
            mask: None,
            mask_tiles: None,
            varlen: None,
            causal: false,
            align: CausalAlign::BottomRight,
            scale: None,
            window: (-1, -1),
            softcap: 0.0,
            workspace: None,
        }
    }
}

/// How the dense mask's elements are read (kernels/common/attention.cuh: MASK_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskKind {
    None = 0,
    Bool = 1,
    AddSame = 2,
    AddF32 = 3,
}

/// Sizes and resolved options shared by the CPU and GPU paths, read once from checked views.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub batch: usize,
    /// Per sequence; the maxima for varlen.
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
    /// Key j is visible to query i when i + off - left <= j <= i + off + right.
    pub window_left: i64,
    pub window_right: i64,
    /// off = seqlen_k - seqlen_q per sequence when true, else 0.
    pub bottom_right: bool,
    pub scale: f32,
    pub softcap: f32,
    pub mask_kind: MaskKind,
    pub varlen: bool,
    /// Key tiles from a block list (sparse_attention).
    pub sparse: bool,
}

impl Dims {
    /// Query blocks see different numbers of keys (causal, windows, varlen, block lists).
    pub fn uneven_tiles(&self) -> bool {
        self.varlen || self.sparse || self.window_left < WINDOW_NONE || self.window_right < WINDOW_NONE
    }

    /// Softcap, ALiBi or a dense mask: the kernel variant compiled with them is needed.
    pub fn extras(&self, a: &AttentionArgs) -> bool {
        self.softcap > 0.0 || a.alibi.is_some() || self.mask_kind != MaskKind::None
    }
}

/// Strides of the batch axis and the two after it, in elements: (batch, seq, head) for
/// q/k/v/out, (batch, head, seq) for the LSE. Varlen views have no batch axis (sequences are
/// found through cu_seqlens), so their batch stride is 0.
pub fn batch_strides(t: &TensorView, varlen: bool) -> [i64; 3] {
    if varlen { [0, t.stride(0), t.stride(1)] } else { [t.stride(0), t.stride(1), t.stride(2)] }
}

/// Strides of a 4-D broadcastable view, 0 on axes of size 1.
pub fn broadcast_strides(t: &TensorView) -> [i64; 4] {
    let mut s = [0i64; 4];
    for (i, x) in s.iter_mut().enumerate() {
        *x = if t.dim(i) == 1 { 0 } else { t.stride(i) };
    }
    s
}

/// The CUDA type of a 16-bit dtype.
pub(crate) fn ctype(dtype: DType) -> &'static str {
    if dtype == DType::F16 { "__half" } else { "__nv_bfloat16" }
}

/// A 16-bit dtype's short name in kernel symbols: `f16` or `bf16`.
pub(crate) fn dtype_name(dtype: DType) -> &'static str {
    if dtype == DType::F16 { "f16" } else { "bf16" }
}

/// `<prefix>_<f16|bf16>_d<D>[_dv<DV>][_x]`: the symbol and cache-file stem of a kernel variant.
fn variant_name(prefix: &str, dtype: DType, d: usize, dv: usize, extras: bool) -> String {
    let t = dtype_name(dtype);
    let dv = if dv == d { String::new() } else { format!("_dv{dv}") };
    let x = if extras { "_x" } else { "" };
    format!("{prefix}_{t}_d{d}{dv}{x}")
}

/// One compiled specialisation: the template parameters, the symbol name, the cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionSpec {
    pub dtype: DType,
    /// The q/k head dim rounded up to the MMA k step (16).
    pub head_dim_pad: usize,
    /// The v/out head dim, likewise.
    pub head_dim_v_pad: usize,
    /// Compiled with softcap, ALiBi and dense-mask support (the plain variant has none).
    pub extras: bool,
}

impl AttentionSpec {
    pub const BLOCK_M: usize = 64;

    pub fn for_problem(dtype: DType, head_dim: usize, head_dim_v: usize, extras: bool) -> AttentionSpec {
        AttentionSpec { dtype, head_dim_pad: head_dim.div_ceil(16) * 16, head_dim_v_pad: head_dim_v.div_ceil(16) * 16, extras }
    }

    /// The variants `warmup` and CI compile: every padded head dim, plus MLA-style 192/128.
    /// Other (head_dim, head_dim_v) pairs compile on first use.
    pub fn all() -> Vec<AttentionSpec> {
        let mut v = Vec::new();
        for dtype in [DType::F16, DType::BF16] {
            for extras in [false, true] {
                for d in (16..=MAX_HEAD_DIM).step_by(16) {
                    v.push(AttentionSpec { dtype, head_dim_pad: d, head_dim_v_pad: d, extras });
                }
                v.push(AttentionSpec { dtype, head_dim_pad: 192, head_dim_v_pad: 128, extras });
            }
        }
        v
    }

    fn widest(&self) -> usize {
        self.head_dim_pad.max(self.head_dim_v_pad)
    }

    /// Smaller key tiles for wide heads keep the score + output registers under the limit.
    fn block_n(&self) -> usize {
        if self.widest() <= 128 { 64 } else { 32 }
    }

    fn q_in_regs(&self) -> bool {
        self.widest() <= 128
    }

    pub fn threads(&self) -> u32 {
        (Self::BLOCK_M / 16 * 32) as u32
    }

    /// Q, K and V tiles (rows padded by 16 bytes); the output is staged over them at the end.
    pub fn smem_bytes(&self) -> u32 {
        let (d, dv, bn) = (self.head_dim_pad + 8, self.head_dim_v_pad + 8, self.block_n());
        let tiles = (Self::BLOCK_M + bn) * d + bn * dv;
        (tiles.max(Self::BLOCK_M * dv) * 2) as u32
    }

    pub fn name(&self) -> String {
        variant_name("attention_fwd", self.dtype, self.head_dim_pad, self.head_dim_v_pad, self.extras)
    }

    pub fn kernel(&self) -> KernelSource {
        let source = format!(
            "#include \"attention.cu\"\n\
             extern \"C\" __global__ void __launch_bounds__({threads}, 1) {name}(const __grid_constant__ AttentionParams p) {{\n\
             \x20   attention_fwd<{t}, {d}, {dv}, {bm}, {bn}, {qr}, {x}>(p);\n}}\n",
            threads = self.threads(),
            name = self.name(),
            t = ctype(self.dtype),
            d = self.head_dim_pad,
            dv = self.head_dim_v_pad,
            bm = Self::BLOCK_M,
            bn = self.block_n(),
            qr = self.q_in_regs(),
            x = self.extras,
        );
        KernelSource::portable(self.name(), source)
    }
}

/// Mirrors `struct AttentionParams` in kernels/common/attention.cuh.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct AttentionParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    cu_seqlens_q: u64,
    cu_seqlens_k: u64,
    alibi: u64,
    mask: u64,
    mask_tiles: u64,
    q_s: [i64; 3],
    k_s: [i64; 3],
    v_s: [i64; 3],
    o_s: [i64; 3],
    lse_s: [i64; 3],
    alibi_sb: i64,
    mask_s: [i64; 4],
    mask_tiles_s: [i64; 4],
    heads_q: i32,
    heads_kv: i32,
    seqlen_q: i32,
    seqlen_k: i32,
    head_dim: i32,
    head_dim_v: i32,
    window_left: i32,
    window_right: i32,
    bottom_right: i32,
    mask_kind: i32,
    scale: f32,
    softcap: f32,
}

/// The Hopper kernel (kernels/attention_sm90.cu): head dims rounded up to 64 (TMA boxes of 64
/// columns), 128 query rows per CTA, a 2-slot K/V ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionSm90Spec {
    pub dtype: DType,
    pub head_dim_pad: usize,
    pub head_dim_v_pad: usize,
    pub extras: bool,
    /// Key tiles from a block list (sparse_attention; src/ops/sparse.rs).
    pub sparse: bool,
}

impl AttentionSm90Spec {
    pub const BLOCK_M: usize = 128;
    pub const STAGES: usize = 2;
    pub const THREADS: u32 = 384;
    /// Shared memory one CTA may opt into on sm_90 (227 KiB).
    const SMEM_LIMIT: usize = 227 * 1024;
    /// K/V bytes that a group of concurrently scheduled heads should keep within (half the
    /// H100's 50 MB L2), so that every query block of those heads reads them from L2.
    const L2_BUDGET: usize = 24 << 20;

    pub fn for_problem(dtype: DType, head_dim: usize, head_dim_v: usize, extras: bool) -> AttentionSm90Spec {
        AttentionSm90Spec {
            dtype,
            head_dim_pad: head_dim.div_ceil(64) * 64,
            head_dim_v_pad: head_dim_v.div_ceil(64) * 64,
            extras,
            sparse: false,
        }
    }

    /// Precompiled by `warmup` and CI; other pairs compile on first use.
    pub fn all() -> Vec<AttentionSm90Spec> {
        let mut v = Vec::new();
        for dtype in [DType::F16, DType::BF16] {
            for extras in [false, true] {
                for (d, dv) in [(64, 64), (128, 128), (192, 192), (256, 256), (192, 128)] {
                    v.push(AttentionSm90Spec { dtype, head_dim_pad: d, head_dim_v_pad: dv, extras, sparse: false });
                }
            }
            for d in [64, 128] {
                v.push(AttentionSm90Spec { dtype, head_dim_pad: d, head_dim_v_pad: d, extras: false, sparse: true });
            }
        }
        v
    }

    /// Keys per tile: the S and O accumulators of a consumer share its ~230 registers.
    pub fn block_n(&self) -> usize {
        if self.head_dim_pad.max(self.head_dim_v_pad) <= 128 { 128 } else { 64 }
    }

    /// Mirrors Sm90Smem in the kernel: Q, the K and V rings, an output stage where it fits
    /// (else the output is staged over Q), the mbarriers, and slack to align the base to 1024.
    pub fn smem_bytes(&self) -> u32 {
        let (d, dv, bn) = (self.head_dim_pad, self.head_dim_v_pad, self.block_n());
        let tiles = Self::BLOCK_M * d * 2 + Self::STAGES * bn * (d + dv) * 2;
        let fixed = 8 * (3 + 4 * Self::STAGES) + 1024;
        let o = Self::BLOCK_M * dv * 2;
        let o = if tiles + o + fixed <= Self::SMEM_LIMIT || dv > d { o } else { 0 };
        (tiles + o + fixed) as u32
    }

    pub fn name(&self) -> String {
        let prefix = if self.sparse { "sparse_attention_sm90" } else { "attention_fwd_sm90" };
        variant_name(prefix, self.dtype, self.head_dim_pad, self.head_dim_v_pad, self.extras)
    }

    pub fn kernel(&self) -> KernelSource {
        let source = format!(
            "#include \"attention_sm90.cu\"\n\
             extern \"C\" __global__ void __launch_bounds__({threads}, 1) {name}(const __grid_constant__ AttentionSm90Params p) {{\n\
             \x20   attention_fwd_sm90<Sm90Dense<{t}, {d}, {dv}, {bn}>, {stages}, {x}, {sp}>(p);\n}}\n",
            threads = Self::THREADS,
            name = self.name(),
            t = ctype(self.dtype),
            d = self.head_dim_pad,
            dv = self.head_dim_v_pad,
            bn = self.block_n(),
            stages = Self::STAGES,
            x = self.extras,
            sp = self.sparse,
        );
        KernelSource { name: self.name(), source, sm_range: (90, 90) }
    }
}

/// Mirrors `struct TileSched` in kernels/attention_sm90.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TileSched {
    m_blocks: i32,
    heads: i32,
    pairs: i32,
    group: i32,
}

impl TileSched {
    /// Work tiles of the persistent kernel: every query block of every (batch, head), heads in
    /// groups whose K/V fit in L2 together, so the group's query blocks (run at the same time,
    /// longest first) read each K/V tile from HBM once. Without a tile counter (`dynamic`) the
    /// CTAs take the tiles in fixed rounds, and where tile costs differ (causal, windows,
    /// varlen) a group must then span several rounds, or the same CTAs would draw the long
    /// tiles of every group (D=256, N=16K causal: one head of 128 blocks per group against 132
    /// CTAs ran at 2/3 speed).
    fn new(d: &Dims, ctas: usize, dynamic: bool) -> TileSched {
        let pairs = d.batch * d.heads_q;
        let m_blocks = d.seqlen_q.div_ceil(AttentionSm90Spec::BLOCK_M);
        let per_head = d.seqlen_k * (d.head_dim + d.head_dim_v) * 2 * d.heads_kv / d.heads_q;
        let mut group = AttentionSm90Spec::L2_BUDGET / per_head.max(1);
        if d.uneven_tiles() && !dynamic {
            group = group.max((4 * ctas).div_ceil(m_blocks.max(1)));
        }
        TileSched {
            m_blocks: m_blocks as i32,
            heads: d.heads_q as i32,
            pairs: pairs as i32,
            group: group.clamp(1, pairs.max(1)) as i32,
        }
    }

    fn tiles(&self) -> usize {
        self.m_blocks as usize * self.pairs as usize
    }
}

/// Mirrors `struct AttentionSm90Params` in kernels/attention_sm90.cu.
#[repr(C, align(64))]
pub(crate) struct AttentionSm90Params {
    pub tq: TensorMap,
    pub tk: TensorMap,
    pub tv: TensorMap,
    pub p: AttentionParams,
    pub sched: TileSched,
    pub tiles: i32,
    pub counter: u64,
    pub list: TileList,
    pub tkc: TensorMap,
    pub tvc: TensorMap,
}

/// Mirrors `struct TileList` in kernels/attention_sm90.cu: sparse_attention's key tiles (all
/// zero for dense attention).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TileList {
    pub count: u64,
    pub index: u64,
    pub bitmap: u64,
    pub bits: u64,
    pub cols: u64,
    pub sb: i64,
    pub sh: i64,
    pub max: i32,
}

/// Which kernel family runs on the GPU: FERROKERNELS_ATTENTION_PATH=sm80|sm90|auto (default
/// auto: the Hopper kernel on sm_90 where its TMA maps can address the tensors, else sm80).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelPath {
    Auto,
    Sm80,
    Sm90,
}

fn kernel_path() -> Result<KernelPath> {
    match std::env::var("FERROKERNELS_ATTENTION_PATH").as_deref() {
        Err(_) | Ok("") | Ok("auto") => Ok(KernelPath::Auto),
        Ok("sm80") => Ok(KernelPath::Sm80),
        Ok("sm90") => Ok(KernelPath::Sm90),
        Ok(other) => Err(Error::Value(format!("FERROKERNELS_ATTENTION_PATH must be auto, sm80 or sm90, got {other:?}"))),
    }
}

pub(crate) fn shape_err<T>(msg: String) -> Result<T> {
    Err(Error::Shape(msg))
}

/// Checks the form of an offsets tensor (1-D int32, batch + 1 entries) and returns the batch.
pub fn expect_cu_seqlens(cu: &TensorView) -> Result<usize> {
    cu.expect_rank(1, "(batch + 1,)")?;
    cu.expect_dtype(&[DType::I32])?;
    if cu.dim(0) == 0 {
        return shape_err(format!("{} must hold batch + 1 offsets, got an empty tensor", cu.name));
    }
    Ok(cu.dim(0) - 1)
}

/// Reads cu_seqlens from host memory and checks it is a valid offset list for `total` rows.
pub fn host_seqlens(cu: &TensorView, total: usize, max_len: usize) -> Result<Vec<i32>> {
    let n = cu.dim(0);
    let vals: Vec<i32> = (0..n).map(|i| unsafe { *(cu.ptr as *const i32).offset(i as isize * cu.stride(0) as isize) }).collect();
    if vals[0] != 0 {
        return Err(Error::Value(format!("{} must start at 0, got {}", cu.name, vals[0])));
    }
    for (i, w) in vals.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(Error::Value(format!(
                "{} must be non-decreasing, but entry {} ({}) < entry {} ({})",
                cu.name,
                i + 1,
                w[1],
                i,
                w[0]
            )));
        }
        if (w[1] - w[0]) as usize > max_len {
            return Err(Error::Value(format!(
                "{}: sequence {i} has {} tokens, more than max_seqlen {max_len}",
                cu.name,
                w[1] - w[0]
            )));
        }
    }
    if vals[n - 1] as usize > total {
        return Err(Error::Value(format!("{} ends at {} but the tensor has only {total} rows", cu.name, vals[n - 1])));
    }
    Ok(vals)
}

fn check_varlen(a: &AttentionArgs, vl: &Varlen) -> Result<usize> {
    for t in [a.q, a.k, a.v, a.out] {
        t.expect_rank(3, VARLEN_LAYOUT)?;
    }
    for cu in [vl.cu_seqlens_q, vl.cu_seqlens_k] {
        cu.expect_same_device(a.q)?;
    }
    let batch = expect_cu_seqlens(vl.cu_seqlens_q)?;
    expect_cu_seqlens(vl.cu_seqlens_k)?;
    vl.cu_seqlens_k.expect_dim(0, batch + 1, "length (must match cu_seqlens_q)")?;
    if a.mask.is_some() {
        return Err(Error::NotImplemented("a dense attn mask is not supported with varlen inputs".into()));
    }
    Ok(batch)
}

fn check_mask(a: &AttentionArgs, want: [usize; 4]) -> Result<MaskKind> {
    let Some(mask) = a.mask else {
        if let Some(t) = a.mask_tiles {
            return Err(Error::Value(format!("{} was given without a mask", t.name)));
        }
        return Ok(MaskKind::None);
    };
    mask.expect_rank(4, MASK_LAYOUT)?;
    mask.expect_same_device(a.q)?;
    for (axis, &n) in want.iter().enumerate() {
        if mask.dim(axis) != n && mask.dim(axis) != 1 {
            return shape_err(format!(
                "{} has shape {:?}, which does not broadcast to (batch, heads, seqlen_q, seqlen_k) = {:?}",
                mask.name, mask.shape, want
            ));
        }
    }
    let kind = match mask.dtype {
        DType::Bool | DType::U8 => MaskKind::Bool,
        DType::F32 => MaskKind::AddF32,
        d if d == a.q.dtype => MaskKind::AddSame,
        d => {
            return Err(Error::DType(format!(
                "{} has dtype {}; masks are bool (true = attend), float32, or q's dtype {}",
                mask.name,
                d.name(),
                a.q.dtype.name()
            )));
        }
    };
    if let Some(t) = a.mask_tiles {
        t.expect_rank(4, "(batch, heads, q tiles, k tiles), each axis either full or 1")?;
        t.expect_same_device(a.q)?;
        t.expect_dtype(&[DType::U8])?;
        let tiles = [want[0], want[1], want[2].div_ceil(MASK_TILE), want[3].div_ceil(MASK_TILE)];
        for (axis, &n) in tiles.iter().enumerate() {
            if t.dim(axis) != n && t.dim(axis) != 1 {
                return shape_err(format!("{} has shape {:?}; expected axes {:?} (or 1)", t.name, t.shape, tiles));
            }
        }
    }
    Ok(kind)
}

fn check_alibi(a: &AttentionArgs, batch: usize, heads_q: usize) -> Result<()> {
    let Some(al) = a.alibi else { return Ok(()) };
    al.expect_same_device(a.q)?;
    al.expect_dtype(&[DType::F32])?;
    al.expect_last_contiguous()?;
    let ok = (al.ndim() == 1 && al.dim(0) == heads_q) || (al.ndim() == 2 && al.dim(0) == batch && al.dim(1) == heads_q);
    if !ok {
        return shape_err(format!("{} must have shape ({heads_q},) or ({batch}, {heads_q}), got {:?}", al.name, al.shape));
    }
    Ok(())
}

/// flash-attn's convention: -1 is unbounded; other negatives are errors.
pub(crate) fn window_side(x: i64, which: &str) -> Result<i64> {
    match x {
        -1 => Ok(WINDOW_NONE),
        x if x < -1 => Err(Error::Value(format!("window {which} must be >= 0 (or -1 for unbounded), got {x}"))),
        x => Ok(x.min(WINDOW_NONE)),
    }
}

pub(crate) fn check(a: &AttentionArgs) -> Result<Dims> {
    let (q, k, v, out) = (a.q, a.k, a.v, a.out);
    for t in [k, v, out] {
        t.expect_same_device(q)?;
    }
    q.expect_dtype(&[DType::F16, DType::BF16, DType::F32])?;
    for t in [k, v, out] {
        t.expect_same_dtype(q)?;
    }
    let varlen = a.varlen.is_some();
    // Axis of seqlen / heads / head_dim in q/k/v/out.
    let (batch, ax) = match &a.varlen {
        Some(vl) => (check_varlen(a, vl)?, 0),
        None => {
            for t in [q, k, v, out] {
                t.expect_rank(4, LAYOUT)?;
            }
            k.expect_dim(0, q.dim(0), "batch")?;
            v.expect_dim(0, q.dim(0), "batch")?;
            (q.dim(0), 1)
        }
    };
    let (heads_q, head_dim) = (q.dim(ax + 1), q.dim(ax + 2));
    let (heads_kv, head_dim_v) = (k.dim(ax + 1), v.dim(ax + 2));
    k.expect_dim(ax + 2, head_dim, "head_dim (must match q)")?;
    v.expect_dim(ax, k.dim(ax), "seqlen (must match k)")?;
    v.expect_dim(ax + 1, heads_kv, "heads (must match k)")?;
    for (d, t) in [(head_dim, q), (head_dim_v, v)] {
        if d == 0 || d % 8 != 0 || d > MAX_HEAD_DIM {
            return shape_err(format!(
                "{} has head_dim {d}; supported head dims are multiples of 8 from 8 to {MAX_HEAD_DIM}",
                t.name
            ));
        }
    }
    if heads_kv == 0 || heads_q % heads_kv != 0 {
        return shape_err(format!("q has {heads_q} heads, which must be a multiple of k's {heads_kv} heads (GQA/MQA)"));
    }
    let (seqlen_q, seqlen_k) = match &a.varlen {
        Some(vl) => (vl.max_seqlen_q, vl.max_seqlen_k),
        None => (q.dim(1), k.dim(1)),
    };
    let mut out_shape: Vec<i64> = q.shape.clone();
    *out_shape.last_mut().unwrap() = head_dim_v as i64;
    out.expect_shape(&out_shape)?;
    out.expect_writable_layout()?;
    if let Some(lse) = a.lse {
        lse.expect_same_device(q)?;
        lse.expect_dtype(&[DType::F32])?;
        if varlen {
            lse.expect_shape(&[heads_q as i64, q.dim(0) as i64])?;
        } else {
            lse.expect_shape(&[batch as i64, heads_q as i64, seqlen_q as i64])?;
        }
        lse.expect_writable_layout()?;
    }
    if let Some(ws) = a.workspace {
        ws.expect_same_device(q)?;
        ws.expect_dtype(&[DType::I32])?;
        if ws.numel() < 1 || ws.ndim() != 1 || ws.stride(0) != 1 {
            return shape_err(format!("{} must be a contiguous 1-D int32 tensor of at least 1 element", ws.name));
        }
    }
    for t in [q, k, v, out] {
        t.expect_last_contiguous()?;
    }
    if seqlen_q as i64 >= WINDOW_NONE || seqlen_k as i64 >= WINDOW_NONE {
        return shape_err(format!("sequences of {seqlen_q} queries / {seqlen_k} keys exceed the supported 2^30"));
    }
    let mask_kind = check_mask(a, [batch, heads_q, seqlen_q, seqlen_k])?;
    check_alibi(a, batch, heads_q)?;
    let scale = match a.scale {
        Some(s) if !s.is_finite() => return Err(Error::Value(format!("scale must be finite, got {s}"))),
        Some(s) => s as f32,
        None => 1.0 / (head_dim as f32).sqrt(),
    };
    if !(a.softcap.is_finite() && a.softcap >= 0.0) {
        return Err(Error::Value(format!("softcap must be a finite number >= 0 (0 = off), got {}", a.softcap)));
    }
    let window_left = window_side(a.window.0, "left")?;
    let mut window_right = window_side(a.window.1, "right")?;
    if a.causal {
        window_right = 0;
    }
    Ok(Dims {
        batch,
        seqlen_q,
        seqlen_k,
        heads_q,
        heads_kv,
        head_dim,
        head_dim_v,
        window_left,
        window_right,
        bottom_right: a.align == CausalAlign::BottomRight,
        scale,
        softcap: a.softcap as f32,
        mask_kind,
        varlen,
        sparse: false,
    })
}

/// Runs attention into `a.out` (and `a.lse`). `stream` is the CUDA stream to launch on
/// (ignored on the CPU).
pub fn forward(a: &AttentionArgs, stream: usize) -> Result<()> {
    let dims = check(a)?;
    if dims.batch == 0 || dims.seqlen_q == 0 || dims.heads_q == 0 {
        return Ok(());
    }
    match a.q.device {
        Device::Cpu => cpu::attention::forward(a, &dims),
        Device::Cuda(ordinal) => forward_cuda(ordinal, a, &dims, stream),
    }
}

pub(crate) fn ptr(t: Option<&TensorView>) -> u64 {
    t.map_or(0, |t| t.ptr as u64)
}

/// What every CUDA attention kernel (dense, sparse) needs of q/k/v/out beyond `check`: 16-bit
/// elements, 16-byte aligned rows.
pub(crate) fn check_cuda_inputs(a: &AttentionArgs) -> Result<()> {
    if a.q.dtype == DType::F32 {
        return Err(Error::DType(
            "q is float32; the CUDA attention kernels take float16 or bfloat16 (float32 runs on the CPU path)".into(),
        ));
    }
    for t in [a.q, a.k, a.v, a.out] {
        t.expect_aligned(16)?;
    }
    Ok(())
}

fn forward_cuda(ordinal: i32, a: &AttentionArgs, d: &Dims, stream: usize) -> Result<()> {
    check_cuda_inputs(a)?;
    if d.batch > 65535 || d.heads_q > 65535 {
        return shape_err(format!(
            "q has batch {} and {} heads; the CUDA kernel supports at most 65535 of each",
            d.batch, d.heads_q
        ));
    }
    let dev = driver::device(ordinal)?;
    let params = kernel_params(a, d);
    let path = kernel_path()?;
    if path != KernelPath::Sm80 && dev.arch == "sm_90a" {
        match launch_sm90(dev, a, d, params, None, stream) {
            Ok(()) => return Ok(()),
            // The layout is outside what TMA can address: the portable kernel takes it.
            Err(Error::Layout(_)) if path == KernelPath::Auto => {}
            Err(e) => return Err(e),
        }
    } else if path == KernelPath::Sm90 {
        return Err(Error::Value(format!("FERROKERNELS_ATTENTION_PATH=sm90 needs an sm_90 GPU; {} is {}", dev.name, dev.arch)));
    }
    launch_sm80(dev, a, d, params, stream)
}

pub(crate) fn kernel_params(a: &AttentionArgs, d: &Dims) -> AttentionParams {
    let vl = d.varlen;
    AttentionParams {
        q: a.q.ptr as u64,
        k: a.k.ptr as u64,
        v: a.v.ptr as u64,
        o: a.out.ptr as u64,
        lse: ptr(a.lse),
        cu_seqlens_q: ptr(a.varlen.map(|v| v.cu_seqlens_q)),
        cu_seqlens_k: ptr(a.varlen.map(|v| v.cu_seqlens_k)),
        alibi: ptr(a.alibi),
        mask: ptr(a.mask),
        mask_tiles: ptr(a.mask_tiles),
        q_s: batch_strides(a.q, vl),
        k_s: batch_strides(a.k, vl),
        v_s: batch_strides(a.v, vl),
        o_s: batch_strides(a.out, vl),
        lse_s: a.lse.map_or([0; 3], |l| batch_strides(l, vl)),
        alibi_sb: a.alibi.map_or(0, |t| if t.ndim() == 2 { t.stride(0) } else { 0 }),
        mask_s: a.mask.map_or([0; 4], broadcast_strides),
        mask_tiles_s: a.mask_tiles.map_or([0; 4], broadcast_strides),
        heads_q: d.heads_q as i32,
        heads_kv: d.heads_kv as i32,
        seqlen_q: d.seqlen_q as i32,
        seqlen_k: d.seqlen_k as i32,
        head_dim: d.head_dim as i32,
        head_dim_v: d.head_dim_v as i32,
        window_left: d.window_left as i32,
        window_right: d.window_right as i32,
        bottom_right: d.bottom_right as i32,
        mask_kind: d.mask_kind as i32,
        scale: d.scale,
        softcap: d.softcap,
    }
}

fn launch_sm80(dev: &driver::Device, a: &AttentionArgs, d: &Dims, mut params: AttentionParams, stream: usize) -> Result<()> {
    let spec = AttentionSpec::for_problem(a.q.dtype, d.head_dim, d.head_dim_v, d.extras(a));
    let smem = spec.smem_bytes();
    let f = dev.function(&spec.kernel(), smem)?;
    let cfg = LaunchConfig {
        grid: (d.seqlen_q.div_ceil(AttentionSpec::BLOCK_M) as u32, d.heads_q as u32, d.batch as u32),
        block: (spec.threads(), 1, 1),
        smem_bytes: smem,
    };
    let mut args = [&mut params as *mut AttentionParams as *mut c_void];
    dev.launch(f, cfg, stream, &mut args)
}

/// The 4-D TMA map (head_dim, heads, rows, batch) of q, k or v, with boxes of 64 columns x
/// `rows` rows of one head. Varlen tensors are one batch of all packed rows.
fn tensor_map(t: &TensorView, varlen: bool, head_dim: usize, rows: usize) -> Result<TensorMap> {
    let [sb, ss, sh] = batch_strides(t, varlen);
    let (n, heads, batch) = if varlen { (t.dim(0), t.dim(1), 1) } else { (t.dim(1), t.dim(2), t.dim(0)) };
    tma::tiled_4d_16bit(
        t.dtype == DType::BF16,
        t.ptr,
        [head_dim as u64, heads as u64, n as u64, batch as u64],
        [sh, ss, sb],
        [64, 1, rows as u32, 1],
    )
}

/// The persistent grid of the Hopper kernels (this one and quant_attention's): the tile
/// schedule, the tile counter where tile costs differ, and how many CTAs walk the tiles.
pub(crate) struct Sm90Grid {
    pub sched: TileSched,
    pub tiles: i32,
    pub counter: Option<u64>,
    ctas: u32,
}

impl Sm90Grid {
    /// One CTA per SM (its shared memory and registers fill one) walks the tiles, from a counter
    /// in `workspace` where their costs differ; FERROKERNELS_ATTENTION_PERSISTENT=0 gives every
    /// tile its own CTA instead, for comparison.
    pub(crate) fn new(dev: &driver::Device, d: &Dims, workspace: Option<&TensorView>) -> Result<Sm90Grid> {
        let persistent = std::env::var("FERROKERNELS_ATTENTION_PERSISTENT").map_or(true, |v| v != "0");
        let counter = workspace.filter(|_| persistent && d.uneven_tiles());
        let sched = TileSched::new(d, dev.sm_count as usize, counter.is_some());
        let tiles = sched.tiles();
        if tiles > i32::MAX as usize {
            return shape_err(format!("q has {tiles} blocks of 128 rows x heads; the CUDA kernel supports at most 2^31"));
        }
        let ctas = if persistent { tiles.min(dev.sm_count as usize) } else { tiles };
        Ok(Sm90Grid { sched, tiles: tiles as i32, counter: counter.map(|c| c.ptr as u64), ctas: ctas as u32 })
    }

    /// Zeroes the tile counter on the stream, then launches `kernel` with its parameter block.
    pub(crate) fn launch(&self, dev: &driver::Device, kernel: &KernelSource, smem: u32, stream: usize, params: *mut c_void) -> Result<()> {
        if smem as i32 > dev.max_smem_optin {
            return Err(Error::Layout(format!("{} needs {smem} bytes of shared memory", kernel.name)));
        }
        let f = dev.function(kernel, smem)?;
        if let Some(c) = self.counter {
            dev.memset_zero(c, 4, stream)?;
        }
        let cfg = LaunchConfig { grid: (self.ctas, 1, 1), block: (AttentionSm90Spec::THREADS, 1, 1), smem_bytes: smem };
        dev.launch(f, cfg, stream, &mut [params])
    }
}

/// The key tiles of sparse_attention: the lists, and the gathered key / value columns their
/// negative entries name (vertical_slash), (batch, columns, heads_q, head_dim).
pub(crate) struct SparseTiles<'a> {
    pub list: TileList,
    pub cols: Option<(&'a TensorView, &'a TensorView)>,
}

/// The Hopper kernel over the causal/window key range, or over a tile list (sparse_attention).
pub(crate) fn launch_sm90(
    dev: &driver::Device,
    a: &AttentionArgs,
    d: &Dims,
    params: AttentionParams,
    sparse: Option<SparseTiles>,
    stream: usize,
) -> Result<()> {
    let list = sparse.as_ref().map(|s| s.list);
    let spec = AttentionSm90Spec { sparse: list.is_some(), ..AttentionSm90Spec::for_problem(a.q.dtype, d.head_dim, d.head_dim_v, d.extras(a)) };
    let smem = spec.smem_bytes();
    if smem as i32 > dev.max_smem_optin {
        return Err(Error::Layout(format!("{} needs {smem} bytes of shared memory", spec.name())));
    }
    let bn = spec.block_n();
    let grid = Sm90Grid::new(dev, d, a.workspace)?;
    let mut p = AttentionSm90Params {
        tq: tensor_map(a.q, d.varlen, d.head_dim, AttentionSm90Spec::BLOCK_M)?,
        tk: tensor_map(a.k, d.varlen, d.head_dim, bn)?,
        tv: tensor_map(a.v, d.varlen, d.head_dim_v, bn)?,
        p: params,
        sched: grid.sched,
        tiles: grid.tiles,
        counter: grid.counter.unwrap_or(0),
        list: list.unwrap_or_default(),
        tkc: TensorMap::ZERO,
        tvc: TensorMap::ZERO,
    };
    if let Some((kc, vc)) = sparse.and_then(|s| s.cols) {
        p.tkc = tensor_map(kc, false, d.head_dim, bn)?;
        p.tvc = tensor_map(vc, false, d.head_dim_v, bn)?;
    }
    grid.launch(dev, &spec.kernel(), smem, stream, &mut p as *mut AttentionSm90Params as *mut c_void)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout_matches_the_kernel_struct() {
        // 10 pointers, 24 i64 strides, 10 i32, 2 f32 -- no padding anywhere.
        assert_eq!(std::mem::size_of::<AttentionParams>(), 10 * 8 + 24 * 8 + 10 * 4 + 2 * 4);
    }

    #[test]
    fn spec_names_and_tiles() {
        let s = AttentionSpec::for_problem(DType::BF16, 72, 72, false);
        assert_eq!(s.name(), "attention_fwd_bf16_d80");
        assert!(s.kernel().source.contains("attention_fwd<__nv_bfloat16, 80, 80, 64, 64, true, false>"));
        let mla = AttentionSpec::for_problem(DType::F16, 192, 128, true);
        assert_eq!(mla.name(), "attention_fwd_f16_d192_dv128_x");
        assert_eq!(AttentionSpec::for_problem(DType::F16, 256, 256, false).smem_bytes(), (64 + 64) * 264 * 2);
        // The output staging area (64 rows of dv) can exceed the tiles when dv >> d.
        assert_eq!(AttentionSpec::for_problem(DType::F16, 16, 256, false).smem_bytes(), 64 * 264 * 2);
        assert_eq!(AttentionSpec::all().len(), 68);
    }

    #[test]
    fn tile_groups_fit_l2_and_span_rounds_when_costs_differ() {
        let dims = |n: usize, heads: usize, d: usize, causal: bool| Dims {
            batch: 32768 / n,
            seqlen_q: n,
            seqlen_k: n,
            heads_q: heads,
            heads_kv: heads,
            head_dim: d,
            head_dim_v: d,
            window_left: WINDOW_NONE,
            window_right: if causal { 0 } else { WINDOW_NONE },
            bottom_right: true,
            scale: 1.0,
            softcap: 0.0,
            mask_kind: MaskKind::None,
            varlen: false,
            sparse: false,
        };
        // 8 MB of K/V per head: 3 heads in 24 MB.
        let s = TileSched::new(&dims(16384, 16, 128, false), 132, false);
        assert_eq!((s.m_blocks, s.pairs, s.group), (128, 32, 3));
        // Causal, 16 MB per head: in fixed rounds one head would be under one round of 132
        // CTAs, so 5 span 4; with the counter one head per group.
        let s = TileSched::new(&dims(16384, 8, 256, true), 132, false);
        assert_eq!((s.group, s.tiles()), (5, 2048));
        assert_eq!(TileSched::new(&dims(16384, 8, 256, true), 132, true).group, 1);
        // Small heads: the group is capped by the number of (batch, head) pairs.
        assert_eq!(TileSched::new(&dims(1024, 2, 64, true), 132, false).group, 64);
    }

    #[test]
    fn sm90_params_layout() {
        // Three 128-byte tensor maps, then the shared block at offset 384, padded to 64 bytes.
        assert_eq!(std::mem::offset_of!(AttentionSm90Params, p), 384);
        assert_eq!(std::mem::offset_of!(AttentionSm90Params, sched), 704);
        // The tile list (5 pointers, 2 strides, an int: 64 bytes, 8-aligned) after the counter,
        // then the two column maps on 64-byte boundaries.
        assert_eq!(std::mem::offset_of!(AttentionSm90Params, list), 736);
        assert_eq!(std::mem::size_of::<TileList>(), 64);
        assert_eq!(std::mem::offset_of!(AttentionSm90Params, tkc), 832);
        assert_eq!(std::mem::size_of::<AttentionSm90Params>(), 1088);
        let s = AttentionSm90Spec::for_problem(DType::BF16, 96, 96, true);
        assert_eq!((s.name().as_str(), s.block_n()), ("attention_fwd_sm90_bf16_d128_x", 128));
        assert!(s.kernel().source.contains("attention_fwd_sm90<Sm90Dense<__nv_bfloat16, 128, 128, 128>, 2, true, false>"));
        for s in AttentionSm90Spec::all() {
            assert!(s.smem_bytes() <= 232_448, "{} needs {} bytes", s.name(), s.smem_bytes());
        }
    }
}
