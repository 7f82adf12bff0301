//! quant_attention on the GPU (kernels/quant_attention.cu), in two steps:
//! - `prepare`, the quantization pre-pass: per-channel statistics, then INT8 codes of Q and K per
//!   64-row block and FP8 codes of V, transposed;
//! - `forward`, the attention kernel on those codes: attention_sm90.cu's kernel with the 8-bit
//!   operand policy (INT8 Q·Kᵀ, FP8 P̃·V).
//!
//! The scheme and its CPU reference live in python/ferrokernels/quant_attention.py.

use crate::cuda::KernelSource;
use crate::cuda::driver::{self, LaunchConfig};
use crate::dlpack::{DType, Device, TensorView};
use crate::error::{Error, Result};
use crate::cuda::tma::{self, TensorMap};
use crate::ops::attention::{
    self, AttentionArgs, AttentionSm90Params, CausalAlign, Dims, MaskKind, Sm90Grid, TileList, VARLEN_LAYOUT, Varlen,
    WINDOW_NONE, ctype, dtype_name, shape_err,
};
use crate::ops::gemm::expect_contiguous;
use std::ffi::c_void;

pub const LAYOUT: &str = "(batch, seqlen, heads, head_dim)";
const BLOCK: usize = 64;
const SPLIT_ROWS: usize = 1024;
const THREADS: u32 = 256;

/// The pre-pass kernels for one input dtype and head dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrepSpec {
    pub dtype: DType,
    pub d: usize,
}

impl PrepSpec {
    fn suffix(&self) -> String {
        format!("{}_d{}", dtype_name(self.dtype), self.d)
    }

    fn source(&self, name: &str, params: &str, body: &str) -> KernelSource {
        let source = format!(
            "#include \"quant_attention.cu\"\n\
             extern \"C\" __global__ void __launch_bounds__({THREADS}) {name}(const __grid_constant__ {params} p) {{\n\
             \x20   {body};\n}}\n"
        );
        // e4m3 conversions need sm_89; the attention kernel these codes are for is Hopper-only.
        KernelSource { name: name.to_string(), source, sm_range: (90, 90) }
    }

    pub fn stats(&self) -> KernelSource {
        let t = ctype(self.dtype);
        self.source(&format!("qa_stats_{}", self.suffix()), "QaStatsParams", &format!("qa_stats<{t}>(p)"))
    }

    pub fn finalize() -> KernelSource {
        PrepSpec { dtype: DType::F16, d: 64 }.source("qa_finalize", "QaFinalizeParams", "qa_finalize_channels(p)")
    }

    pub fn quant_rows(&self) -> KernelSource {
        let (t, d) = (ctype(self.dtype), self.d);
        self.source(&format!("qa_quant_rows_{}", self.suffix()), "QaQuantRowsParams", &format!("qa_quant_rows<{t}, {d}>(p)"))
    }

    pub fn quant_v(&self) -> KernelSource {
        let (t, d) = (ctype(self.dtype), self.d);
        self.source(&format!("qa_quant_v_{}", self.suffix()), "QaQuantVParams", &format!("qa_quant_v<{t}, {d}>(p)"))
    }

    pub fn all_kernels() -> Vec<KernelSource> {
        let mut v = vec![Self::finalize()];
        for dtype in [DType::F16, DType::BF16] {
            for d in [64, 128] {
                let s = PrepSpec { dtype, d };
                v.extend([s.stats(), s.quant_rows(), s.quant_v()]);
                for (fp8_qk, v_residual) in [(false, false), (false, true), (true, false)] {
                    v.push(QuantSpec::for_problem(dtype, d, fp8_qk, v_residual).kernel());
                }
            }
        }
        v
    }
}

/// The attention kernel for one output dtype, head dim and Q·Kᵀ format (Sm90Quant in the kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    pub dtype: DType,
    pub d: usize,
    /// e4m3 Q and K (fp8_attention) rather than INT8 (quant_attention).
    pub fp8_qk: bool,
    /// V as codes + residual codes (pv="fp8x2").
    pub v_residual: bool,
    /// The consumers take turns issuing their GEMMs.
    pub pingpong: bool,
    /// Slots of the K/V ring.
    pub stages: usize,
    /// P̃'s row sums from the P̃·V GEMM (8 columns of ones beside V in every ring slot) rather
    /// than from FADDs in the softmax.
    pub mma_sum: bool,
}

impl QuantSpec {
    pub const BLOCK_M: usize = 128;
    pub const BLOCK_N: usize = 128;

    /// The tuned variant; FERROKERNELS_QA_PINGPONG=0|1, FERROKERNELS_QA_STAGES=N and
    /// FERROKERNELS_QA_MMA_SUM=0|1 override it for measuring.
    pub fn for_problem(dtype: DType, d: usize, fp8_qk: bool, v_residual: bool) -> QuantSpec {
        let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
        QuantSpec {
            dtype,
            d,
            fp8_qk,
            v_residual,
            pingpong: env("FERROKERNELS_QA_PINGPONG").map_or(d >= 128, |v| v != 0),
            stages: env("FERROKERNELS_QA_STAGES").unwrap_or(3).clamp(2, 6),
            mma_sum: env("FERROKERNELS_QA_MMA_SUM").is_none_or(|v| v != 0),
        }
    }

    pub fn name(&self) -> String {
        let pp = if self.pingpong { "" } else { "_free" };
        let dt = dtype_name(self.dtype);
        let op = if self.fp8_qk { "fp8_attention" } else { "quant_attention" };
        let vr = if self.v_residual { "_vx2" } else { "" };
        let sum = if self.mma_sum { "" } else { "_alusum" };
        format!("{op}_sm90_{dt}_d{}{vr}{pp}{sum}_s{}", self.d, self.stages)
    }

    /// Mirrors Sm90Smem: the Q codes, the K and V rings (one byte per element; a V slot also
    /// holds 8 rows of ones with mma_sum), the 16-bit output stage, the mbarriers and the
    /// alignment slack.
    pub fn smem_bytes(&self) -> u32 {
        let v_terms = if self.v_residual { 2 } else { 1 };
        let ones = if self.mma_sum { 8 } else { 0 };
        let tiles = Self::BLOCK_M * self.d + self.stages * ((1 + v_terms) * self.d + ones) * Self::BLOCK_N;
        (tiles + Self::BLOCK_M * self.d * 2 + 8 * (3 + 4 * self.stages) + 1024) as u32
    }

    pub fn kernel(&self) -> KernelSource {
        let name = self.name();
        let source = format!(
            "#include \"quant_attention.cu\"\n\
             extern \"C\" __global__ void __launch_bounds__(384, 1) {name}(const __grid_constant__ QuantSm90Params p) {{\n\
             \x20   attention_fwd_sm90<Sm90Quant<{t}, {d}, {qk}, {pp}, {vr}, {sum}>, {stages}, false>(p);\n}}\n",
            t = ctype(self.dtype),
            d = self.d,
            qk = if self.fp8_qk { "W8_FP8" } else { "W8_INT8" },
            pp = self.pingpong,
            vr = self.v_residual,
            sum = self.mma_sum,
            stages = self.stages,
        );
        KernelSource { name, source, sm_range: (90, 90) }
    }
}

/// Inputs, options and the buffers the pre-pass fills (all on one CUDA device).
#[derive(Debug, Clone, Copy)]
pub struct PrepArgs<'a> {
    pub q: &'a TensorView,
    pub k: &'a TensorView,
    pub v: &'a TensorView,
    /// float32 (splits_q * batch * heads_q + 2 * splits_k * batch * heads_kv) * 3 * head_dim.
    pub stats: &'a TensorView,
    /// float32 (4, batch, heads_kv, head_dim): K mean, balance factor, V mean, V scale.
    pub channels: &'a TensorView,
    /// int8 (batch, seqlen_q, heads_q, head_dim) and float32 (batch, heads_q, ceil(seqlen_q / 64)).
    pub q_codes: &'a TensorView,
    pub q_scale: &'a TensorView,
    pub k_codes: &'a TensorView,
    pub k_scale: &'a TensorView,
    /// float8_e4m3fn (batch, heads_kv, head_dim, seqlen_k rounded up to 64).
    pub v_codes: &'a TensorView,
    /// The same for the codes of V's residual (pv="fp8x2"), or None.
    pub v_lo: Option<&'a TensorView>,
    /// Packed sequences: q/k/v are (total, heads, head_dim) and the outputs a batch of the
    /// longest sequence (statistics, scales and codes per sequence).
    pub varlen: Option<PackedSeqs<'a>>,
    /// The softmax scale times log2(e), applied to Q after the balance factor.
    pub q_post: f32,
    pub smooth_k: bool,
    pub smooth_v: bool,
    pub balance: bool,
}

/// Offsets of packed sequences (int32 CUDA tensors, batch + 1 entries, checked by the caller)
/// and the longest lengths.
#[derive(Debug, Clone, Copy)]
pub struct PackedSeqs<'a> {
    pub cu_seqlens_q: &'a TensorView,
    pub cu_seqlens_k: &'a TensorView,
    pub max_seqlen_q: usize,
    pub max_seqlen_k: usize,
}

impl PackedSeqs<'_> {
    /// The batch, after checking the offsets' form and q/k/v's rank.
    fn check(&self, packed: &[&TensorView]) -> Result<usize> {
        let b = attention::expect_cu_seqlens(self.cu_seqlens_q)?;
        if attention::expect_cu_seqlens(self.cu_seqlens_k)? != b {
            return shape_err("cu_seqlens_q and cu_seqlens_k must have the same length".into());
        }
        for t in packed {
            t.expect_rank(3, VARLEN_LAYOUT)?;
        }
        Ok(b)
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct QaRows {
    x: u64,
    sb: i64,
    sn: i64,
    sh: i64,
    n: i32,
    h: i32,
    cu: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct QaStatsParams {
    x: QaRows,
    stats: u64,
    batch: i32,
    d: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct QaFinalizeParams {
    q_stats: u64,
    k_stats: u64,
    v_stats: u64,
    k_mean: u64,
    s: u64,
    v_mean: u64,
    v_scale: u64,
    batch: i32,
    hq: i32,
    hk: i32,
    d: i32,
    nq: i32,
    nk: i32,
    splits_q: i32,
    splits_k: i32,
    smooth_k: i32,
    smooth_v: i32,
    balance: i32,
    cu_k: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct QaQuantRowsParams {
    x: QaRows,
    mean: u64,
    s: u64,
    codes: u64,
    scales: u64,
    post: f32,
    batch: i32,
    hk: i32,
    d: i32,
    is_q: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct QaQuantVParams {
    x: QaRows,
    mean: u64,
    scale: u64,
    codes: u64,
    lo: u64,
    batch: i32,
    d: i32,
    n_pad: i32,
}

/// Each buffer has its dtype and shape and is contiguous.
fn expect_buffers(want: &[(&TensorView, DType, Vec<usize>)]) -> Result<()> {
    for (t, dtype, shape) in want {
        t.expect_dtype(&[*dtype])?;
        let shape: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
        t.expect_shape(&shape)?;
        expect_contiguous(t)?;
    }
    Ok(())
}

/// (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim) after checking every tensor (for
/// packed sequences: their count and the longest lengths).
pub fn check(a: &PrepArgs) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let (q, k, v) = (a.q, a.k, a.v);
    for t in [k, v, a.stats, a.channels, a.q_codes, a.q_scale, a.k_codes, a.k_scale, a.v_codes] {
        t.expect_same_device(q)?;
    }
    q.expect_dtype(&[DType::F16, DType::BF16])?;
    k.expect_same_dtype(q)?;
    v.expect_same_dtype(q)?;
    let (b, nq, nk) = match &a.varlen {
        Some(vl) => (vl.check(&[q, k, v])?, vl.max_seqlen_q, vl.max_seqlen_k),
        None => {
            for t in [q, k, v] {
                t.expect_rank(4, LAYOUT)?;
            }
            k.expect_dim(0, q.dim(0), "batch (must match q)")?;
            (q.dim(0), q.dim(1), k.dim(1))
        }
    };
    for t in [q, k, v] {
        t.expect_last_contiguous()?;
        t.expect_aligned(16)?; // 8 channels per load
    }
    let r = q.ndim();
    let (hq, d, hk) = (q.dim(r - 2), q.dim(r - 1), k.dim(r - 2));
    v.expect_shape(&k.shape)?;
    k.expect_dim(r - 1, d, "head_dim (must match q)")?;
    if d != 64 && d != 128 {
        return Err(Error::NotImplemented(format!("quant_attention takes head_dim 64 or 128, got {d}")));
    }
    if hk == 0 || hq % hk != 0 {
        return shape_err(format!("heads_q {hq} must be a multiple of heads_kv {hk}"));
    }
    let (sq, sk) = (nq.div_ceil(SPLIT_ROWS).max(1), nk.div_ceil(SPLIT_ROWS).max(1));
    let mut want: Vec<(&TensorView, DType, Vec<usize>)> = vec![
        (a.stats, DType::F32, vec![(sq * b * hq + 2 * sk * b * hk) * 3 * d]),
        (a.channels, DType::F32, vec![4, b, hk, d]),
        (a.q_codes, DType::I8, vec![b, nq, hq, d]),
        (a.q_scale, DType::F32, vec![b, hq, nq.div_ceil(BLOCK)]),
        (a.k_codes, DType::I8, vec![b, nk, hk, d]),
        (a.k_scale, DType::F32, vec![b, hk, nk.div_ceil(BLOCK)]),
        (a.v_codes, DType::F8E4M3, vec![b, hk, d, nk.div_ceil(BLOCK) * BLOCK]),
    ];
    if let Some(lo) = a.v_lo {
        lo.expect_same_device(q)?;
        want.push((lo, DType::F8E4M3, vec![b, hk, d, nk.div_ceil(BLOCK) * BLOCK]));
    }
    expect_buffers(&want)?;
    Ok((b, nq, nk, hq, hk, d))
}

/// Rows of q, k or v: `n` rows per batch entry, packed at `cu` offsets for varlen.
fn rows(t: &TensorView, n: usize, cu: Option<&TensorView>) -> QaRows {
    match cu {
        Some(cu) => QaRows { x: t.ptr as u64, sb: 0, sn: t.stride(0), sh: t.stride(1), n: n as i32, h: t.dim(1) as i32, cu: cu.ptr as u64 },
        None => QaRows { x: t.ptr as u64, sb: t.stride(0), sn: t.stride(1), sh: t.stride(2), n: n as i32, h: t.dim(2) as i32, cu: 0 },
    }
}

pub fn prepare(a: &PrepArgs, stream: usize) -> Result<()> {
    let (b, nq, nk, hq, hk, d) = check(a)?;
    let Device::Cuda(ordinal) = a.q.device else {
        return Err(Error::Device("the quantization pre-pass runs on CUDA tensors; on the CPU quant_attention \
                                  quantizes in torch".into()));
    };
    if b == 0 || nq == 0 || nk == 0 {
        return Ok(());
    }
    if b * hq.max(hk) > 65535 || nq.div_ceil(BLOCK) > i32::MAX as usize {
        return shape_err(format!("batch {b} x heads {hq} exceed the CUDA grid"));
    }
    let dev = driver::device(ordinal)?;
    let spec = PrepSpec { dtype: a.q.dtype, d };
    let (sq, sk) = (nq.div_ceil(SPLIT_ROWS), nk.div_ceil(SPLIT_ROWS));
    let f4 = 4u64;
    let q_stats = a.stats.ptr as u64;
    let k_stats = q_stats + (sq * b * hq * 3 * d) as u64 * f4;
    let v_stats = k_stats + (sk * b * hk * 3 * d) as u64 * f4;
    let channel = |i: usize| a.channels.ptr as u64 + (i * b * hk * d) as u64 * f4;

    let (cu_q, cu_k) = (a.varlen.map(|v| v.cu_seqlens_q), a.varlen.map(|v| v.cu_seqlens_k));
    let (q_rows, k_rows, v_rows) = (rows(a.q, nq, cu_q), rows(a.k, nk, cu_k), rows(a.v, nk, cu_k));
    let stats_f = dev.function(&spec.stats(), 0)?;
    for (x, heads, splits, out) in [(q_rows, hq, sq, q_stats), (k_rows, hk, sk, k_stats), (v_rows, hk, sk, v_stats)] {
        let mut p = QaStatsParams { x, stats: out, batch: b as i32, d: d as i32 };
        let cfg = LaunchConfig { grid: ((b * heads) as u32, splits as u32, 1), block: (THREADS, 1, 1), smem_bytes: 0 };
        dev.launch(stats_f, cfg, stream, &mut [&mut p as *mut QaStatsParams as *mut c_void])?;
    }
    let mut p = QaFinalizeParams {
        q_stats,
        k_stats,
        v_stats,
        k_mean: channel(0),
        s: channel(1),
        v_mean: channel(2),
        v_scale: channel(3),
        batch: b as i32,
        hq: hq as i32,
        hk: hk as i32,
        d: d as i32,
        nq: nq as i32,
        nk: nk as i32,
        splits_q: sq as i32,
        splits_k: sk as i32,
        smooth_k: a.smooth_k as i32,
        smooth_v: a.smooth_v as i32,
        balance: a.balance as i32,
        cu_k: cu_k.map_or(0, |t| t.ptr as u64),
    };
    let cfg = LaunchConfig { grid: ((b * hk) as u32, 1, 1), block: (d as u32, 1, 1), smem_bytes: 0 };
    dev.launch(dev.function(&PrepSpec::finalize(), 0)?, cfg, stream, &mut [&mut p as *mut QaFinalizeParams as *mut c_void])?;

    let rows_f = dev.function(&spec.quant_rows(), 0)?;
    let jobs = [(q_rows, hq, 0u64, a.q_codes, a.q_scale, a.q_post, 1), (k_rows, hk, channel(0), a.k_codes, a.k_scale, 1.0, 0)];
    for (x, heads, mean, codes, scales, post, is_q) in jobs {
        let mut p = QaQuantRowsParams {
            x,
            mean,
            s: channel(1),
            codes: codes.ptr as u64,
            scales: scales.ptr as u64,
            post,
            batch: b as i32,
            hk: hk as i32,
            d: d as i32,
            is_q,
        };
        let blocks = (x.n as usize).div_ceil(BLOCK) as u32;
        let cfg = LaunchConfig { grid: (blocks, heads as u32, b as u32), block: (THREADS, 1, 1), smem_bytes: 0 };
        dev.launch(rows_f, cfg, stream, &mut [&mut p as *mut QaQuantRowsParams as *mut c_void])?;
    }
    let mut p = QaQuantVParams {
        x: v_rows,
        mean: channel(2),
        scale: channel(3),
        codes: a.v_codes.ptr as u64,
        lo: a.v_lo.map_or(0, |t| t.ptr as u64),
        batch: b as i32,
        d: d as i32,
        n_pad: (nk.div_ceil(BLOCK) * BLOCK) as i32,
    };
    let cfg = LaunchConfig { grid: (nk.div_ceil(BLOCK) as u32, hk as u32, b as u32), block: (THREADS, 1, 1), smem_bytes: 0 };
    dev.launch(dev.function(&spec.quant_v(), 0)?, cfg, stream, &mut [&mut p as *mut QaQuantVParams as *mut c_void])
}

/// The attention step on the pre-pass's outputs (all CUDA, contiguous).
#[derive(Debug, Clone, Copy)]
pub struct QuantArgs<'a> {
    /// int8 (batch, seqlen_q, heads_q, head_dim) and (batch, seqlen_k, heads_kv, head_dim), or
    /// both float8_e4m3fn (fp8_attention).
    pub q_codes: &'a TensorView,
    pub k_codes: &'a TensorView,
    /// float8_e4m3fn (batch, heads_kv, head_dim, seqlen_k rounded up to 64), V_ORDER within 16.
    pub v_codes: &'a TensorView,
    /// The same for V's residual codes (pv="fp8x2"), or None.
    pub v_lo: Option<&'a TensorView>,
    pub q_scale: &'a TensorView,
    pub k_scale: &'a TensorView,
    /// float32 (4, batch, heads_kv, head_dim): K mean, balance factor, V mean, V scale.
    pub channels: &'a TensorView,
    /// float16/bfloat16 (batch, seqlen_q, heads_q, head_dim), or (total_q, heads_q, head_dim)
    /// for packed sequences.
    pub out: &'a TensorView,
    /// float32 (batch, heads_q, seqlen_q) or (heads_q, total_q): the LSE of the smoothed scores.
    pub lse: Option<&'a TensorView>,
    /// Packed sequences: the codes and scales are still a batch of the longest sequence (as
    /// `prepare` writes them for varlen), the output and LSE packed.
    pub varlen: Option<PackedSeqs<'a>>,
    pub causal: bool,
    /// int32, at least one element: the tile counter for causal runs.
    pub workspace: Option<&'a TensorView>,
}

fn check_forward(a: &QuantArgs) -> Result<Dims> {
    let q = a.q_codes;
    for t in [a.k_codes, a.v_codes, a.q_scale, a.k_scale, a.channels, a.out] {
        t.expect_same_device(q)?;
    }
    q.expect_dtype(&[DType::I8, DType::F8E4M3])?;
    q.expect_rank(4, LAYOUT)?;
    a.k_codes.expect_rank(4, LAYOUT)?;
    let (b, nq, hq, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let (nk, hk) = (a.k_codes.dim(1), a.k_codes.dim(2));
    let out_shape = match &a.varlen {
        Some(vl) => {
            if vl.check(&[a.out])? != b || vl.max_seqlen_q != nq || vl.max_seqlen_k != nk {
                return shape_err(format!(
                    "the codes are laid out for {b} sequences of at most {nq} / {nk} tokens, but cu_seqlens and \
                     max_seqlen say {} / {} / {}",
                    vl.cu_seqlens_q.dim(0).saturating_sub(1),
                    vl.max_seqlen_q,
                    vl.max_seqlen_k
                ));
            }
            vec![a.out.dim(0), hq, d]
        }
        None => vec![b, nq, hq, d],
    };
    if d != 64 && d != 128 {
        return Err(Error::NotImplemented(format!("quant_attention takes head_dim 64 or 128, got {d}")));
    }
    if hk == 0 || hq % hk != 0 {
        return shape_err(format!("heads_q {hq} must be a multiple of heads_kv {hk}"));
    }
    let mut want: Vec<(&TensorView, DType, Vec<usize>)> = vec![
        (a.q_codes, q.dtype, vec![b, nq, hq, d]),
        (a.k_codes, q.dtype, vec![b, nk, hk, d]),
        (a.v_codes, DType::F8E4M3, vec![b, hk, d, nk.div_ceil(BLOCK) * BLOCK]),
        (a.q_scale, DType::F32, vec![b, hq, nq.div_ceil(BLOCK)]),
        (a.k_scale, DType::F32, vec![b, hk, nk.div_ceil(BLOCK)]),
        (a.channels, DType::F32, vec![4, b, hk, d]),
        (a.out, a.out.dtype, out_shape.clone()),
    ];
    a.out.expect_dtype(&[DType::F16, DType::BF16])?;
    if let Some(l) = a.lse {
        l.expect_same_device(q)?;
        want.push((l, DType::F32, if a.varlen.is_some() { vec![hq, out_shape[0]] } else { vec![b, hq, nq] }));
    }
    if let Some(lo) = a.v_lo {
        lo.expect_same_device(q)?;
        want.push((lo, DType::F8E4M3, vec![b, hk, d, nk.div_ceil(BLOCK) * BLOCK]));
    }
    expect_buffers(&want)?;
    // TMA reads the codes; the epilogue stores 16 bytes of the output at a time.
    for t in [a.q_codes, a.k_codes, a.v_codes, a.out].into_iter().chain(a.v_lo) {
        t.expect_aligned(16)?;
    }
    if let Some(w) = a.workspace {
        w.expect_same_device(q)?;
        w.expect_dtype(&[DType::I32])?;
    }
    Ok(Dims {
        batch: b,
        seqlen_q: nq,
        seqlen_k: nk,
        heads_q: hq,
        heads_kv: hk,
        head_dim: d,
        head_dim_v: d,
        window_left: WINDOW_NONE,
        window_right: if a.causal { 0 } else { WINDOW_NONE },
        bottom_right: true,
        scale: 1.0,
        softcap: 0.0,
        mask_kind: MaskKind::None,
        varlen: a.varlen.is_some(),
        sparse: false,
    })
}

/// Mirrors `struct QuantSm90Params` in kernels/quant_attention.cu.
#[repr(C, align(64))]
struct QuantSm90Params {
    base: AttentionSm90Params,
    tv_lo: TensorMap,
    q_scale: u64,
    k_scale: u64,
    v_scale: u64,
    v_mean: u64,
    q_blocks: i32,
    k_blocks: i32,
}

/// A TMA map of a contiguous 4-D byte tensor, innermost axis first, boxes of `box_dims`.
fn byte_map(t: &TensorView, box_dims: [u32; 4]) -> Result<TensorMap> {
    let r = t.ndim();
    let dims = [t.dim(r - 1) as u64, t.dim(r - 2) as u64, t.dim(r - 3) as u64, t.dim(r - 4) as u64];
    let strides = [t.stride(r - 2) as u64, t.stride(r - 3) as u64, t.stride(r - 4) as u64];
    tma::tiled_4d_bytes(t.ptr, dims, strides, box_dims)
}

/// Quantized attention on the pre-pass's codes, into `a.out` (and `a.lse`).
pub fn forward(a: &QuantArgs, stream: usize) -> Result<()> {
    let d = check_forward(a)?;
    let Device::Cuda(ordinal) = a.q_codes.device else {
        return Err(Error::Device("the quantized attention kernel runs on CUDA tensors".into()));
    };
    if d.batch == 0 || d.seqlen_q == 0 || d.heads_q == 0 {
        return Ok(());
    }
    if d.seqlen_k == 0 {
        return Err(Error::Value("quant_attention needs at least one key".into()));
    }
    let dev = driver::device(ordinal)?;
    if dev.arch != "sm_90a" {
        return Err(Error::NotImplemented(format!("the quantized attention kernel is Hopper-only (sm_90); {} is {}", dev.name, dev.arch)));
    }
    let spec = QuantSpec::for_problem(a.out.dtype, d.head_dim, a.q_codes.dtype == DType::F8E4M3, a.v_lo.is_some());
    let v_box = [QuantSpec::BLOCK_N as u32, d.head_dim as u32, 1, 1];
    let mut args = AttentionArgs::new(a.q_codes, a.k_codes, a.k_codes, a.out);
    args.lse = a.lse;
    args.causal = a.causal;
    args.varlen = a.varlen.map(|v| Varlen {
        cu_seqlens_q: v.cu_seqlens_q,
        cu_seqlens_k: v.cu_seqlens_k,
        max_seqlen_q: v.max_seqlen_q,
        max_seqlen_k: v.max_seqlen_k,
    });
    args.align = CausalAlign::BottomRight;
    let grid = Sm90Grid::new(dev, &d, a.workspace)?;
    let qk_box = |rows: usize| [d.head_dim as u32, 1, rows as u32, 1];
    let mut p = QuantSm90Params {
        base: AttentionSm90Params {
            tq: byte_map(a.q_codes, qk_box(QuantSpec::BLOCK_M))?,
            tk: byte_map(a.k_codes, qk_box(QuantSpec::BLOCK_N))?,
            tv: byte_map(a.v_codes, v_box)?,
            p: attention::kernel_params(&args, &d),
            sched: grid.sched,
            tiles: grid.tiles,
            counter: grid.counter.unwrap_or(0),
            list: TileList::default(),
            tkc: TensorMap::ZERO,
            tvc: TensorMap::ZERO,
        },
        tv_lo: a.v_lo.map_or(Ok(TensorMap::ZERO), |t| byte_map(t, v_box))?,
        q_scale: a.q_scale.ptr as u64,
        k_scale: a.k_scale.ptr as u64,
        v_scale: a.channels.ptr as u64 + (3 * d.batch * d.heads_kv * d.head_dim * 4) as u64,
        v_mean: a.channels.ptr as u64 + (2 * d.batch * d.heads_kv * d.head_dim * 4) as u64,
        q_blocks: d.seqlen_q.div_ceil(BLOCK) as i32,
        k_blocks: d.seqlen_k.div_ceil(BLOCK) as i32,
    };
    grid.launch(dev, &spec.kernel(), spec.smem_bytes(), stream, &mut p as *mut QuantSm90Params as *mut c_void)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_extend_the_dense_block() {
        // The kernel's struct derives from AttentionSm90Params: its own fields start right after.
        assert_eq!(std::mem::offset_of!(QuantSm90Params, tv_lo), std::mem::size_of::<AttentionSm90Params>());
        assert_eq!(std::mem::offset_of!(QuantSm90Params, q_scale), std::mem::size_of::<AttentionSm90Params>() + 128);
        assert_eq!(std::mem::size_of::<QuantSm90Params>() % 64, 0);
    }

    #[test]
    fn kernel_names_and_smem() {
        let s = QuantSpec { dtype: DType::BF16, d: 128, fp8_qk: false, v_residual: false, pingpong: true, stages: 2, mma_sum: true };
        assert_eq!(s.name(), "quant_attention_sm90_bf16_d128_s2");
        assert!(s.kernel().source.contains("attention_fwd_sm90<Sm90Quant<__nv_bfloat16, 128, W8_INT8, true, false, true>, 2, false>"));
        let a = QuantSpec { mma_sum: false, ..s };
        assert_eq!(a.name(), "quant_attention_sm90_bf16_d128_alusum_s2");
        assert_eq!(s.smem_bytes() - a.smem_bytes(), 2 * 8 * 128);
        let r = QuantSpec { v_residual: true, stages: 3, ..s };
        assert_eq!(r.name(), "quant_attention_sm90_bf16_d128_vx2_s3");
        assert!(r.smem_bytes() <= 227 * 1024);
        let f = QuantSpec { fp8_qk: true, pingpong: false, ..s };
        assert_eq!(f.name(), "fp8_attention_sm90_bf16_d128_free_s2");
        assert!(s.smem_bytes() <= 227 * 1024);
    }
}
