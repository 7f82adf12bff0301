//! Low-bit linear layers: `out (M, N) = x (M, K) @ W^T (+ bias)` with W in the canonical
//! quantized layout of python/ferrokernels/gemm.py:
//!   4-bit: `qweight` uint8 (N, K/2), two codes per byte, even k in the low nibble;
//!   8-bit: `qweight` int8 (N, K);
//!   `scales` (N, K/group_size) float; `zeros` None (symmetric: q - 8 for 4-bit codes, q for
//!   int8), uint8 integer zero points (w = (q - z) * s), or float minimums (w = q * s + m);
//!   `perm` (K,) int64: canonical column c multiplies input channel perm[c] (GPTQ act-order).
//! W8A8 (`act` int8 / fp8): int8 or float8_e4m3fn weights with per-channel scales (N, 1), and
//! activations quantized per token (or by one static scale) before the product.

use crate::cpu;
use crate::cuda::KernelSource;
use crate::cuda::driver::{self, LaunchConfig};
use crate::dlpack::{DType, Device, TensorView};
use crate::error::{Error, Result};
use crate::ops::attention::{ctype, dtype_name, ptr, shape_err};
use std::ffi::c_void;

/// How codes turn into weights, per group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Zeros {
    /// 4-bit: (q - 8) * s; 8-bit: q * s.
    Symmetric,
    /// (q - z) * s with integer z.
    Points,
    /// q * s + m.
    Minimums,
}

/// Activation quantization of W8A8 formats (per token, or one static scale).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Act {
    /// Weight-only: activations stay in their dtype.
    None,
    /// int8 codes, scale max|x_m| / 127, int32 accumulation.
    Int8,
    /// float8_e4m3fn codes, scale max|x_m| / 448, f32 accumulation.
    Fp8,
}

impl Zeros {
    /// The packed layout's names: "sym", "points", "mins".
    pub fn parse(s: &str) -> Result<Zeros> {
        match s {
            "sym" => Ok(Zeros::Symmetric),
            "points" => Ok(Zeros::Points),
            "mins" => Ok(Zeros::Minimums),
            other => Err(Error::Value(format!("zeros must be 'sym', 'points' or 'mins', got {other:?}"))),
        }
    }
}

impl Act {
    pub fn parse(s: &str) -> Result<Act> {
        match s {
            "" | "none" => Ok(Act::None),
            "int8" => Ok(Act::Int8),
            "fp8" => Ok(Act::Fp8),
            other => Err(Error::Value(format!("act must be '', 'int8' or 'fp8', got {other:?}"))),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct GemmArgs<'a> {
    pub x: &'a TensorView,
    pub qweight: &'a TensorView,
    pub scales: &'a TensorView,
    pub zeros: Option<&'a TensorView>,
    pub perm: Option<&'a TensorView>,
    pub bias: Option<&'a TensorView>,
    pub out: &'a TensorView,
    pub bits: usize,
    pub group_size: usize,
    pub act: Act,
    /// float32, one element: a static activation scale (W8A8); None = per token, dynamic.
    pub act_scale: Option<&'a TensorView>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmDims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub groups: usize,
    pub zeros: Zeros,
}

pub(crate) fn expect_contiguous(t: &TensorView) -> Result<()> {
    let want = crate::dlpack::contiguous_strides(&t.shape);
    let ok = t.shape.iter().zip(t.strides.iter().zip(&want)).all(|(&d, (&s, &w))| d <= 1 || s == w);
    if ok { Ok(()) } else { Err(Error::Layout(format!("{} must be contiguous", t.name))) }
}

pub fn check(a: &GemmArgs) -> Result<GemmDims> {
    let (x, qw, s, out) = (a.x, a.qweight, a.scales, a.out);
    for t in [qw, s, out] {
        t.expect_same_device(x)?;
    }
    x.expect_dtype(&[DType::F16, DType::BF16, DType::F32])?;
    out.expect_same_dtype(x)?;
    x.expect_rank(2, "(M, K)")?;
    out.expect_rank(2, "(M, N)")?;
    qw.expect_rank(2, "(N, K/2) for 4-bit codes or (N, K) for 8-bit")?;
    s.expect_rank(2, "(N, K / group_size)")?;
    let (m, k) = (x.dim(0), x.dim(1));
    let n = qw.dim(0);
    match a.bits {
        4 => {
            qw.expect_dtype(&[DType::U8])?;
            qw.expect_dim(1, k / 2, "K/2 (two 4-bit codes per byte)")?;
            if k % 2 != 0 {
                return shape_err(format!("x has K = {k}; 4-bit weights need an even K"));
            }
        }
        8 => {
            qw.expect_dtype(&[if a.act == Act::Fp8 { DType::F8E4M3 } else { DType::I8 }])?;
            qw.expect_dim(1, k, "K")?;
        }
        b => return Err(Error::Value(format!("bits must be 4 or 8, got {b}"))),
    }
    let g = a.group_size;
    if g == 0 || k % g != 0 {
        return shape_err(format!("group_size {g} must divide K = {k}"));
    }
    s.expect_dtype(&[DType::F16, DType::BF16, DType::F32])?;
    s.expect_shape(&[n as i64, (k / g) as i64])?;
    let zeros = match a.zeros {
        None => Zeros::Symmetric,
        Some(z) => {
            z.expect_same_device(x)?;
            z.expect_shape(&[n as i64, (k / g) as i64])?;
            z.expect_dtype(&[DType::U8, DType::F16, DType::BF16, DType::F32])?;
            if z.dtype == DType::U8 { Zeros::Points } else { Zeros::Minimums }
        }
    };
    if a.act != Act::None && (a.bits != 8 || a.group_size != k || a.zeros.is_some() || a.perm.is_some()) {
        return Err(Error::Value(
            "W8A8 weights are 8-bit, per output channel (group_size = K), symmetric, without a permutation".into(),
        ));
    }
    if let Some(sc) = a.act_scale {
        sc.expect_same_device(x)?;
        sc.expect_dtype(&[DType::F32])?;
        if sc.numel() != 1 || a.act == Act::None {
            return shape_err(format!("{} must be one float32 value, for W8A8 formats only", sc.name));
        }
    }
    if let Some(p) = a.perm {
        p.expect_same_device(x)?;
        p.expect_dtype(&[DType::I64])?;
        p.expect_shape(&[k as i64])?;
    }
    if let Some(b) = a.bias {
        b.expect_same_device(x)?;
        b.expect_shape(&[n as i64])?;
        b.expect_dtype(&[DType::F16, DType::BF16, DType::F32])?;
    }
    out.expect_shape(&[m as i64, n as i64])?;
    out.expect_writable_layout()?;
    for t in [qw, s].into_iter().chain(a.zeros).chain(a.perm).chain(a.bias).chain(a.act_scale) {
        expect_contiguous(t)?;
    }
    x.expect_last_contiguous()?;
    out.expect_last_contiguous()?;
    Ok(GemmDims { m, n, k, groups: k / g, zeros })
}

pub fn forward(a: &GemmArgs) -> Result<()> {
    let d = check(a)?;
    if d.m == 0 || d.n == 0 {
        return Ok(());
    }
    match a.x.device {
        Device::Cpu => cpu::gemm::forward(a, &d),
        Device::Cuda(_) => Err(Error::NotImplemented(
            "on CUDA the low-bit GEMM reads weights repacked for its kernel: call gemm_packed_fwd with the tensors \
             of ferrokernels.gemm.pack (ferrokernels.gemm.linear does this)"
                .into(),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA: the weight-only kernel (kernels/gemm.cu) over the packed layout.

/// Weight rows per CTA and input channels per packed tile (kernels/gemm.cu).
const BLOCK_N: usize = 64;
const TILE_K: usize = 64;

/// One specialisation of `gemm_fwd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmSpec {
    pub dtype: DType,
    pub bits: usize,
    pub zeros: Zeros,
    /// Tiles of 8 tokens per CTA (1, 2, 4, 8).
    pub mt: usize,
    /// Pipeline stages and 64-channel tiles per stage (FERROKERNELS_GEMM_STAGES / _KTS
    /// override the defaults, for A/B timing).
    pub stages: usize,
    pub kts: usize,
}

impl GemmSpec {
    /// The default pipeline: wide stages where the activation tile is small, and there 3 of
    /// them rather than 4 (measured: more resident CTAs beat a deeper pipeline, up to 17% at
    /// M = 1); 2 x 128 channels where 32-64 tokens make the stage large.
    fn default_pipeline(mt: usize) -> (usize, usize) {
        if mt <= 2 { (3, 4) } else { (4, 2) }
    }

    pub fn new(dtype: DType, bits: usize, zeros: Zeros, mt: usize) -> GemmSpec {
        let env = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<usize>().ok());
        let (stages, kts) = Self::default_pipeline(mt);
        let stages = env("FERROKERNELS_GEMM_STAGES").filter(|s| (2..=8).contains(s)).unwrap_or(stages);
        let kts = env("FERROKERNELS_GEMM_KTS").filter(|k| [1, 2, 4, 8].contains(k)).unwrap_or(kts);
        GemmSpec { dtype, bits, zeros, mt, stages, kts }
    }

    /// Mirrors GemmSmem in kernels/gemm.cu.
    pub fn smem_bytes(&self) -> u32 {
        let lane_bytes = if self.bits == 4 { 16 } else { 32 };
        let w = 4 * self.kts * 32 * lane_bytes;
        let x = self.mt * 8 * (self.kts * 64 + 8) * 2;
        let meta = self.kts * 2 * BLOCK_N * 4;
        (self.stages * (w + x + meta)) as u32
    }

    fn zk(&self) -> (&'static str, &'static str) {
        match self.zeros {
            Zeros::Symmetric => ("sym", "ZK_SYM"),
            Zeros::Points => ("zp", "ZK_POINTS"),
            Zeros::Minimums => ("min", "ZK_MINS"),
        }
    }

    pub fn name(&self) -> String {
        let t = dtype_name(self.dtype);
        let (stages, kts) = Self::default_pipeline(self.mt);
        let pipe = if (self.stages, self.kts) == (stages, kts) { String::new() } else { format!("_s{}k{}", self.stages, self.kts) };
        format!("gemm_w{}_{t}_{}_m{}{pipe}", self.bits, self.zk().0, self.mt * 8)
    }

    pub fn kernel(&self) -> KernelSource {
        let source = format!(
            "#include \"gemm.cu\"\n\
             extern \"C\" __global__ void GEMM_LAUNCH_BOUNDS {name}(const __grid_constant__ GemmParams p) {{\n\
             \x20   gemm_fwd<{t}, {bits}, {zk}, {mt}, {kts}, {stages}>(p);\n}}\n",
            name = self.name(),
            t = ctype(self.dtype),
            bits = self.bits,
            zk = self.zk().1,
            mt = self.mt,
            kts = self.kts,
            stages = self.stages,
        );
        KernelSource::portable(self.name(), source)
    }

    pub fn dequant_name(&self) -> String {
        let t = dtype_name(self.dtype);
        format!("gemm_dequant_w{}_{t}_{}", self.bits, self.zk().0)
    }

    /// The packed weight dequantized to (N, K); `mt` plays no part.
    pub fn dequant_kernel(&self) -> KernelSource {
        let source = format!(
            "#include \"gemm.cu\"\n\
             extern \"C\" __global__ void __launch_bounds__(128) {name}(const __grid_constant__ GemmParams p) {{\n\
             \x20   gemm_dequant<{t}, {bits}, {zk}>(p);\n}}\n",
            name = self.dequant_name(),
            t = ctype(self.dtype),
            bits = self.bits,
            zk = self.zk().1,
        );
        KernelSource::portable(self.dequant_name(), source)
    }

    /// Every GEMM kernel and, once per (dtype, bits, zeros), the dequantization kernel.
    pub fn all_kernels() -> Vec<KernelSource> {
        let specs = Self::all();
        let mut v: Vec<KernelSource> = specs.iter().map(|s| s.kernel()).collect();
        v.extend(specs.iter().filter(|s| s.mt == 1).map(|s| s.dequant_kernel()));
        v
    }

    pub fn all() -> Vec<GemmSpec> {
        let mut v = Vec::new();
        for dtype in [DType::F16, DType::BF16] {
            for (bits, zeros) in [(4, Zeros::Symmetric), (4, Zeros::Points), (4, Zeros::Minimums), (8, Zeros::Symmetric)] {
                for mt in [1, 2, 4, 8] {
                    let (stages, kts) = Self::default_pipeline(mt);
                    v.push(GemmSpec { dtype, bits, zeros, mt, stages, kts });
                }
            }
        }
        v
    }
}

/// Token tiles per CTA for M rows: the smallest that holds them, at most 64 tokens.
fn token_tiles(m: usize) -> usize {
    match m {
        0..=8 => 1,
        9..=16 => 2,
        17..=32 => 4,
        _ => 8,
    }
}

/// How one problem is launched: grid (n tiles, splits, m tiles) and the split-K workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmPlan {
    pub mt: usize,
    pub m_tiles: usize,
    pub n_tiles: usize,
    pub splits: usize,
    pub kt_per_split: usize,
    /// f32 partial sums (splits, M, N) when splits > 1.
    pub partial_floats: usize,
    /// int32 tickets (m tiles x n tiles) when splits > 1, zero before the launch (and after).
    pub counters: usize,
}

/// Split K so the grid fills whole waves of resident CTAs: a memory-bound CTA in a ragged last
/// wave runs with too few loads in flight. Each split costs a partial write and a reduction,
/// so among equally full grids the fewest splits win.
pub fn plan(m: usize, n: usize, k: usize, bits: usize, sm_count: usize, smem_per_sm: usize) -> GemmPlan {
    let mt = token_tiles(m);
    let spec = GemmSpec::new(DType::BF16, bits, Zeros::Points, mt);
    let resident = (smem_per_sm / (spec.smem_bytes() as usize + 1024)).clamp(1, 8);
    let wave = sm_count * resident;
    let (m_tiles, n_tiles, kt_total) = (m.div_ceil(mt * 8), n / BLOCK_N, k / TILE_K);
    let (splits, kt_per_split) = split_k(m_tiles * n_tiles, wave, kt_total, kt_total / spec.kts);
    let (partial_floats, counters) = if splits > 1 { (splits * m * n, m_tiles * n_tiles) } else { (0, 0) };
    GemmPlan { mt, m_tiles, n_tiles, splits, kt_per_split, partial_floats, counters }
}

/// The split-K workspace and ticket pointers a plan needs (null when it does not split),
/// checked against it; `x` names the device.
pub(crate) fn split_k_buffers(plan: &GemmPlan, workspace: Option<&TensorView>, counters: Option<&TensorView>, x: &TensorView) -> Result<(u64, u64)> {
    if plan.splits == 1 {
        return Ok((0, 0));
    }
    let ws = workspace.ok_or_else(|| Error::Value("workspace is required when the plan splits K (gemm_plan)".into()))?;
    let cnt = counters.ok_or_else(|| Error::Value("counters are required when the plan splits K (gemm_plan)".into()))?;
    ws.expect_same_device(x)?;
    cnt.expect_same_device(x)?;
    ws.expect_dtype(&[DType::F32])?;
    cnt.expect_dtype(&[DType::I32])?;
    if (ws.numel() as usize) < plan.partial_floats || (cnt.numel() as usize) < plan.counters {
        return shape_err(format!(
            "{} / {} hold {} / {} elements; this call needs {} / {} (gemm_plan)",
            ws.name, cnt.name, ws.numel(), cnt.numel(), plan.partial_floats, plan.counters
        ));
    }
    Ok((ws.ptr as u64, cnt.ptr as u64))
}

/// (splits, K tiles per split) for `tiles` output tiles over `kt_total` tiles of K, at most
/// `max_splits` (and 16) ways, filling waves of `wave` resident CTAs; every split gets work.
/// FERROKERNELS_GEMM_SPLITS forces the count (A/B timing).
pub(crate) fn split_k(tiles: usize, wave: usize, kt_total: usize, max_splits: usize) -> (usize, usize) {
    let base = tiles.max(1);
    let max_splits = max_splits.clamp(1, 16);
    let forced = std::env::var("FERROKERNELS_GEMM_SPLITS").ok().and_then(|s| s.parse::<usize>().ok());
    let splits = forced.unwrap_or_else(|| {
        let cost = |s: usize| (base * s).div_ceil(wave) as f64 / s as f64 * (1.0 + 0.05 * (s - 1) as f64);
        (1..=max_splits).min_by(|&a, &b| cost(a).total_cmp(&cost(b))).unwrap_or(1)
    });
    let kt_per_split = kt_total.div_ceil(splits.clamp(1, kt_total.max(1))).max(1);
    (kt_total.div_ceil(kt_per_split).max(1), kt_per_split)
}

/// The plan on GPU `ordinal`, for the Python layer to size the workspace.
pub fn plan_for_device(ordinal: i32, m: usize, n: usize, k: usize, bits: usize) -> Result<GemmPlan> {
    let dev = driver::device(ordinal)?;
    Ok(plan(m, n, k, bits, dev.sm_count as usize, dev.max_smem_optin as usize + 1024))
}

/// Arguments of the CUDA weight-only GEMM over the packed layout of ferrokernels.gemm.pack:
/// `w` uint8 (N/16, K/64, 32, 16 or 32) fragment-ordered codes; `meta` x's dtype, (G, N)
/// scales or (G, N, 2) {scale, magic + zero point} / {scale, minimum}.
#[derive(Debug, Clone, Copy)]
pub struct PackedArgs<'a> {
    pub x: &'a TensorView,
    pub w: &'a TensorView,
    pub meta: &'a TensorView,
    pub bias: Option<&'a TensorView>,
    pub out: &'a TensorView,
    pub workspace: Option<&'a TensorView>,
    pub counters: Option<&'a TensorView>,
    pub bits: usize,
    pub group_size: usize,
    pub zeros: Zeros,
}

/// Mirrors `struct GemmParams` in kernels/gemm.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct GemmParams {
    x: u64,
    w: u64,
    meta: u64,
    bias: u64,
    out: u64,
    partial: u64,
    counters: u64,
    x_sm: i64,
    out_sm: i64,
    m: i32,
    n: i32,
    k: i32,
    group_size: i32,
    splits: i32,
    kt_per_split: i32,
}

/// N after checking a packed weight (`w`, `meta`) for K input channels and activations of
/// `dtype` against each other.
fn check_packed_weight(w: &TensorView, meta: &TensorView, bits: usize, zeros: Zeros, group_size: usize, k: usize, dtype: DType) -> Result<usize> {
    w.expect_dtype(&[DType::U8])?;
    w.expect_rank(4, "(N/16, K/64, 32, 16 or 32) packed codes")?;
    let lane_bytes = match (bits, zeros) {
        (4, _) => 16,
        (8, Zeros::Symmetric) => 32,
        (8, _) => return Err(Error::NotImplemented("the CUDA 8-bit kernel takes symmetric weights only".into())),
        (b, _) => return Err(Error::Value(format!("bits must be 4 or 8, got {b}"))),
    };
    w.expect_dim(2, 32, "32 (lanes)")?;
    w.expect_dim(3, lane_bytes, "bytes per lane (16 for 4-bit, 32 for 8-bit)")?;
    let n = w.dim(0) * 16;
    if k % TILE_K != 0 || n % BLOCK_N != 0 {
        return shape_err(format!("the CUDA low-bit GEMM needs N and K multiples of 64, got N = {n}, K = {k}"));
    }
    w.expect_dim(1, k / TILE_K, "K/64")?;
    let g = group_size;
    if g == 0 || k % g != 0 || !(g == 32 || g % TILE_K == 0) {
        return shape_err(format!("group_size {g} must divide K = {k} and be 32 or a multiple of 64"));
    }
    meta.expect_same_device(w)?;
    if meta.dtype != dtype {
        return Err(Error::DType(format!("{} is {}; it must match the activations ({})", meta.name, meta.dtype.name(), dtype.name())));
    }
    let per_group: &[i64] = if zeros == Zeros::Symmetric { &[] } else { &[2] };
    let want: Vec<i64> = [(k / g) as i64, n as i64].iter().chain(per_group).copied().collect();
    meta.expect_shape(&want)?;
    // The packed tensors are read in 16-byte chunks of their contiguous bytes.
    for t in [w, meta] {
        expect_contiguous(t)?;
        if t.ptr % 16 != 0 {
            return Err(Error::Layout(format!("{} data pointer 0x{:x} is not 16-byte aligned; pass a fresh tensor", t.name, t.ptr)));
        }
    }
    Ok(n)
}

/// (M, N, K) after checking the packed operands against each other.
pub fn check_packed(a: &PackedArgs) -> Result<(usize, usize, usize)> {
    let (x, out) = (a.x, a.out);
    a.w.expect_same_device(x)?;
    out.expect_same_device(x)?;
    x.expect_dtype(&[DType::F16, DType::BF16])?;
    out.expect_same_dtype(x)?;
    x.expect_rank(2, "(M, K)")?;
    out.expect_rank(2, "(M, N)")?;
    let (m, k) = (x.dim(0), x.dim(1));
    let n = check_packed_weight(a.w, a.meta, a.bits, a.zeros, a.group_size, k, x.dtype)?;
    out.expect_shape(&[m as i64, n as i64])?;
    out.expect_writable_layout()?;
    if let Some(b) = a.bias {
        b.expect_same_device(x)?;
        b.expect_same_dtype(x)?;
        b.expect_shape(&[n as i64])?;
        expect_contiguous(b)?;
    }
    x.expect_last_contiguous()?;
    out.expect_last_contiguous()?;
    x.expect_aligned(16)?;
    Ok((m, n, k))
}

pub(crate) fn cuda_ordinal(t: &TensorView) -> Result<i32> {
    match t.device {
        Device::Cuda(o) => Ok(o),
        Device::Cpu => Err(Error::Device(format!("{} must be a CUDA tensor: the packed layout is the GPU kernels'; the CPU path reads the canonical one", t.name))),
    }
}

/// W (N, K) = the packed weight dequantized into `out` (its dtype is the packed metadata's).
pub fn dequantize_packed(w: &TensorView, meta: &TensorView, out: &TensorView, bits: usize, zeros: Zeros, group_size: usize, stream: usize) -> Result<()> {
    out.expect_dtype(&[DType::F16, DType::BF16])?;
    out.expect_rank(2, "(N, K)")?;
    out.expect_same_device(w)?;
    let k = out.dim(1);
    let n = check_packed_weight(w, meta, bits, zeros, group_size, k, out.dtype)?;
    out.expect_dim(0, n, "N")?;
    out.expect_last_contiguous()?;
    out.expect_aligned(16)?;
    out.expect_writable_layout()?;
    let dev = driver::device(cuda_ordinal(w)?)?;
    let spec = GemmSpec::new(out.dtype, bits, zeros, 1);
    let mut p = GemmParams {
        x: 0,
        w: w.ptr as u64,
        meta: meta.ptr as u64,
        bias: 0,
        out: out.ptr as u64,
        partial: 0,
        counters: 0,
        x_sm: 0,
        out_sm: out.stride(0),
        m: 0,
        n: n as i32,
        k: k as i32,
        group_size: group_size as i32,
        splits: 1,
        kt_per_split: 0,
    };
    let f = dev.function(&spec.dequant_kernel(), 0)?;
    let cfg = LaunchConfig { grid: ((k / TILE_K).div_ceil(4) as u32, (n / 16) as u32, 1), block: (128, 1, 1), smem_bytes: 0 };
    let mut args = [&mut p as *mut GemmParams as *mut c_void];
    dev.launch(f, cfg, stream, &mut args)
}

pub fn forward_packed(a: &PackedArgs, stream: usize) -> Result<()> {
    let (m, n, k) = check_packed(a)?;
    let ordinal = cuda_ordinal(a.x)?;
    if m == 0 {
        return Ok(());
    }
    let dev = driver::device(ordinal)?;
    let plan = plan(m, n, k, a.bits, dev.sm_count as usize, dev.max_smem_optin as usize + 1024);
    if plan.m_tiles > 65535 {
        return shape_err(format!("M = {m} exceeds the CUDA grid"));
    }
    let (partial, counters) = split_k_buffers(&plan, a.workspace, a.counters, a.x)?;
    let spec = GemmSpec::new(a.x.dtype, a.bits, a.zeros, plan.mt);
    let mut p = GemmParams {
        x: a.x.ptr as u64,
        w: a.w.ptr as u64,
        meta: a.meta.ptr as u64,
        bias: ptr(a.bias),
        out: a.out.ptr as u64,
        partial,
        counters,
        x_sm: a.x.stride(0),
        out_sm: a.out.stride(0),
        m: m as i32,
        n: n as i32,
        k: k as i32,
        group_size: a.group_size as i32,
        splits: plan.splits as i32,
        kt_per_split: plan.kt_per_split as i32,
    };
    let smem = spec.smem_bytes();
    let f = dev.function(&spec.kernel(), smem)?;
    let cfg = LaunchConfig {
        grid: (plan.n_tiles as u32, plan.splits as u32, plan.m_tiles as u32),
        block: (128, 1, 1),
        smem_bytes: smem,
    };
    let mut args = [&mut p as *mut GemmParams as *mut c_void];
    dev.launch(f, cfg, stream, &mut args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout_matches_the_kernel_struct() {
        assert_eq!(std::mem::size_of::<GemmParams>(), 7 * 8 + 2 * 8 + 6 * 4);
    }

    #[test]
    fn small_m_splits_k_and_large_m_does_not() {
        let smem = 228 * 1024;
        let p = plan(1, 8192, 8192, 4, 132, smem);
        assert!(p.splits >= 2 && p.splits * p.kt_per_split >= 128, "{p:?}");
        assert_eq!((p.partial_floats, p.counters), (p.splits * 8192, 128));
        let p = plan(4096, 8192, 8192, 4, 132, smem);
        assert_eq!((p.mt, p.m_tiles, p.splits, p.partial_floats), (8, 64, 1, 0));
        // Every split has work.
        for k in [64, 192, 4096, 28672] {
            let p = plan(1, 64, k, 4, 132, smem);
            assert!((p.splits - 1) * p.kt_per_split < k / 64, "{k} {p:?}");
        }
    }

    #[test]
    fn stages_fit_in_shared_memory() {
        for s in GemmSpec::all() {
            assert!(s.smem_bytes() <= 227 * 1024, "{}", s.name());
        }
    }
}
