//! W8A8 GEMM on Hopper (kernels/gemm_w8a8.cu): activations quantized per token (or by one
//! static scale) to int8 / float8 e4m3 codes by a pre-pass, then one TMA + wgmma kernel over
//! the codes of both operands, scaled per token and per output channel in its epilogue.
//! Other GPUs (and the CPU) take the reference path of ops::gemm.

use crate::cuda::KernelSource;
use crate::cuda::driver::{self, LaunchConfig};
use crate::cuda::tma::{self, TensorMap};
use crate::dlpack::{DType, TensorView};
use crate::error::{Error, Result};
use crate::ops::attention::{ctype, dtype_name, ptr, shape_err};
use crate::ops::gemm::{Act, GemmPlan, cuda_ordinal, expect_contiguous, split_k, split_k_buffers};
use std::ffi::c_void;

/// Weight rows per CTA and channels per pipeline block (kernels/gemm_w8a8.cu).
const BLOCK_W: usize = 128;
const BLOCK_K: usize = 128;
/// Shared memory the stage ring may use: one CTA per SM, the rest for the L1.
const RING_BYTES: usize = 200 * 1024;

fn kind_name(act: Act) -> (&'static str, &'static str) {
    match act {
        Act::Int8 => ("int8", "W8_INT8"),
        _ => ("fp8", "W8_FP8"),
    }
}

/// One specialisation of `gemm_w8a8_sm90`: tokens per CTA `bt` (8..256).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct W8A8Spec {
    pub dtype: DType,
    pub act: Act,
    pub bt: usize,
}

impl W8A8Spec {
    pub const THREADS: u32 = 384;
    pub const TOKEN_TILES: [usize; 6] = [8, 16, 32, 64, 128, 256];

    /// The token tile for an (M, N) problem on `sm_count` SMs: the smallest that holds M rows
    /// (256 above that), halved (down to 32) while the tiles would not fill a wave. Up to 64
    /// tokens the GEMM streams weights and split-K fills the GPU instead, because token tiles
    /// each read the whole weight; above that the extra reads come from L2 (token tiles of one
    /// weight tile run side by side) and cost less than split-K's partial sums (4x at M = 256,
    /// 4096 x 4096).
    pub fn for_problem(dtype: DType, act: Act, m: usize, n: usize, sm_count: usize) -> W8A8Spec {
        let mut bt = Self::TOKEN_TILES.into_iter().find(|&b| b >= m).unwrap_or(256);
        if m > 64 {
            while bt > 32 && m.div_ceil(bt) * n.div_ceil(BLOCK_W) < sm_count * 9 / 10 {
                bt /= 2;
            }
        }
        W8A8Spec { dtype, act, bt }
    }

    fn stage_bytes(&self) -> usize {
        (BLOCK_W + self.bt) * BLOCK_K
    }

    /// As many stages as fit the ring, at most 8.
    pub fn stages(&self) -> usize {
        (RING_BYTES / self.stage_bytes()).clamp(2, 8)
    }

    /// Mirrors W8A8Smem in kernels/gemm_w8a8.cu.
    pub fn smem_bytes(&self) -> u32 {
        (self.stages() * self.stage_bytes() + 16 * self.stages() + 1024) as u32
    }

    pub fn name(&self) -> String {
        format!("gemm_w8a8_sm90_{}_{}_t{}", kind_name(self.act).0, dtype_name(self.dtype), self.bt)
    }

    pub fn kernel(&self) -> KernelSource {
        let source = format!(
            "#include \"gemm_w8a8.cu\"\n\
             extern \"C\" __global__ void __launch_bounds__({threads}, 1) {name}(const __grid_constant__ W8A8Params p) {{\n\
             \x20   gemm_w8a8_sm90<{t}, {kind}, {bt}, {stages}>(p);\n}}\n",
            threads = Self::THREADS,
            name = self.name(),
            t = ctype(self.dtype),
            kind = kind_name(self.act).1,
            bt = self.bt,
            stages = self.stages(),
        );
        KernelSource { name: self.name(), source, sm_range: (90, 90) }
    }

    pub fn quant_name(&self) -> String {
        format!("gemm_w8a8_quant_act_{}_{}", kind_name(self.act).0, dtype_name(self.dtype))
    }

    /// The activation pre-pass; `bt` plays no part.
    pub fn quant_kernel(&self) -> KernelSource {
        let source = format!(
            "#include \"gemm_w8a8.cu\"\n\
             extern \"C\" __global__ void __launch_bounds__(256) {name}(const __grid_constant__ QuantActParams p) {{\n\
             \x20   w8a8_quantize_act<{t}, {kind}>(p);\n}}\n",
            name = self.quant_name(),
            t = ctype(self.dtype),
            kind = kind_name(self.act).1,
        );
        KernelSource { name: self.quant_name(), source, sm_range: (90, 90) }
    }

    pub fn all_kernels() -> Vec<KernelSource> {
        let mut v = Vec::new();
        for dtype in [DType::F16, DType::BF16] {
            for act in [Act::Int8, Act::Fp8] {
                for bt in Self::TOKEN_TILES {
                    v.push(W8A8Spec { dtype, act, bt }.kernel());
                }
                v.push(W8A8Spec { dtype, act, bt: 8 }.quant_kernel());
            }
        }
        v
    }
}

/// Grid (token tiles, splits, weight tiles) and split-K workspace of one problem. One CTA fills
/// an SM (its ring takes the shared memory), so a wave is the SM count.
pub fn plan(m: usize, n: usize, k: usize, sm_count: usize) -> GemmPlan {
    let bt = W8A8Spec::for_problem(DType::BF16, Act::Fp8, m, n, sm_count).bt;
    let (m_tiles, n_tiles, kb_total) = (m.div_ceil(bt), n.div_ceil(BLOCK_W), k.div_ceil(BLOCK_K));
    let (splits, kb_per_split) = split_k(m_tiles * n_tiles, sm_count, kb_total, kb_total / 4);
    let (partial_floats, counters) = if splits > 1 { (splits * m * n, m_tiles * n_tiles) } else { (0, 0) };
    GemmPlan { mt: bt / 8, m_tiles, n_tiles, splits, kt_per_split: kb_per_split, partial_floats, counters }
}

pub fn plan_for_device(ordinal: i32, m: usize, n: usize, k: usize) -> Result<GemmPlan> {
    Ok(plan(m, n, k, driver::device(ordinal)?.sm_count as usize))
}

/// Tensors of one W8A8 call. `xq` / `x_scale` are scratch the pre-pass fills: (M, K) uint8 and
/// (M,) float32.
#[derive(Debug, Clone, Copy)]
pub struct W8A8Args<'a> {
    pub x: &'a TensorView,
    pub qweight: &'a TensorView,
    pub w_scale: &'a TensorView,
    pub bias: Option<&'a TensorView>,
    pub out: &'a TensorView,
    pub xq: &'a TensorView,
    pub x_scale: &'a TensorView,
    pub act_scale: Option<&'a TensorView>,
    pub workspace: Option<&'a TensorView>,
    pub counters: Option<&'a TensorView>,
    pub act: Act,
}

/// Mirrors `struct W8A8Params` in kernels/gemm_w8a8.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct W8A8Params {
    tw: TensorMap,
    tx: TensorMap,
    x_scale: u64,
    w_scale: u64,
    bias: u64,
    out: u64,
    partial: u64,
    counters: u64,
    out_sm: i64,
    m: i32,
    n: i32,
    k: i32,
    splits: i32,
    kb_per_split: i32,
}

/// Mirrors `struct QuantActParams` in kernels/gemm_w8a8.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct QuantActParams {
    x: u64,
    xq: u64,
    x_scale: u64,
    static_scale: u64,
    x_sm: i64,
    m: i32,
    k: i32,
}

/// (M, N, K) after checking every tensor against the others.
pub fn check(a: &W8A8Args) -> Result<(usize, usize, usize)> {
    let (x, qw, out) = (a.x, a.qweight, a.out);
    if a.act == Act::None {
        return Err(Error::Value("act must be 'int8' or 'fp8' for the W8A8 kernel".into()));
    }
    for t in [qw, a.w_scale, out, a.xq, a.x_scale].into_iter().chain(a.bias).chain(a.act_scale) {
        t.expect_same_device(x)?;
    }
    x.expect_dtype(&[DType::F16, DType::BF16])?;
    x.expect_rank(2, "(M, K)")?;
    let (m, k) = (x.dim(0), x.dim(1));
    qw.expect_dtype(&[if a.act == Act::Fp8 { DType::F8E4M3 } else { DType::I8 }])?;
    qw.expect_rank(2, "(N, K)")?;
    qw.expect_dim(1, k, "K")?;
    let n = qw.dim(0);
    if n % 64 != 0 || k % 64 != 0 {
        return shape_err(format!("the CUDA W8A8 GEMM needs N and K multiples of 64, got N = {n}, K = {k}"));
    }
    a.w_scale.expect_dtype(&[DType::F32])?;
    a.w_scale.expect_shape(&[n as i64])?;
    a.xq.expect_dtype(&[DType::U8])?;
    a.xq.expect_shape(&[m as i64, k as i64])?;
    a.x_scale.expect_dtype(&[DType::F32])?;
    a.x_scale.expect_shape(&[m as i64])?;
    out.expect_same_dtype(x)?;
    out.expect_shape(&[m as i64, n as i64])?;
    out.expect_writable_layout()?;
    out.expect_last_contiguous()?;
    a.xq.expect_writable_layout()?;
    a.x_scale.expect_writable_layout()?;
    if let Some(b) = a.bias {
        b.expect_same_dtype(x)?;
        b.expect_shape(&[n as i64])?;
    }
    if let Some(s) = a.act_scale {
        s.expect_dtype(&[DType::F32])?;
        if s.numel() != 1 {
            return shape_err(format!("{} must hold one float32 value", s.name));
        }
    }
    for t in [qw, a.w_scale, a.xq, a.x_scale].into_iter().chain(a.bias) {
        expect_contiguous(t)?;
    }
    // Rows are read in 16-byte pieces and the codes through TMA.
    x.expect_last_contiguous()?;
    x.expect_aligned(16)?;
    if x.stride(0) % 8 != 0 {
        return Err(Error::Layout(format!("{} rows must start 16 bytes apart (row stride {})", x.name, x.stride(0))));
    }
    for t in [qw, a.xq] {
        if t.ptr % 16 != 0 {
            return Err(Error::Layout(format!("{} data pointer 0x{:x} is not 16-byte aligned; pass a fresh tensor", t.name, t.ptr)));
        }
    }
    Ok((m, n, k))
}

pub fn forward(a: &W8A8Args, stream: usize) -> Result<()> {
    let (m, n, k) = check(a)?;
    let dev = driver::device(cuda_ordinal(a.x)?)?;
    if dev.arch != "sm_90a" {
        return Err(Error::NotImplemented(format!(
            "the W8A8 kernel uses Hopper's wgmma (sm_90); {} is {} (ferrokernels.gemm.linear falls back to dequantize + matmul)",
            dev.name, dev.arch
        )));
    }
    if m == 0 {
        return Ok(());
    }
    let plan = plan(m, n, k, dev.sm_count as usize);
    if plan.n_tiles > 65535 || m > i32::MAX as usize {
        return shape_err(format!("M = {m}, N = {n} exceed the CUDA grid"));
    }
    let (partial, counters) = split_k_buffers(&plan, a.workspace, a.counters, a.x)?;
    let spec = W8A8Spec::for_problem(a.x.dtype, a.act, m, n, dev.sm_count as usize);

    let mut q = QuantActParams {
        x: a.x.ptr as u64,
        xq: a.xq.ptr as u64,
        x_scale: a.x_scale.ptr as u64,
        static_scale: ptr(a.act_scale),
        x_sm: a.x.stride(0),
        m: m as i32,
        k: k as i32,
    };
    let f = dev.function(&spec.quant_kernel(), 0)?;
    let cfg = LaunchConfig { grid: (m as u32, 1, 1), block: (256, 1, 1), smem_bytes: 0 };
    dev.launch(f, cfg, stream, &mut [&mut q as *mut QuantActParams as *mut c_void])?;

    let mut p = W8A8Params {
        tw: tma::tiled_2d_bytes(a.qweight.ptr, k as u64, n as u64, k as u64, BLOCK_K as u32, BLOCK_W as u32)?,
        tx: tma::tiled_2d_bytes(a.xq.ptr, k as u64, m as u64, k as u64, BLOCK_K as u32, spec.bt as u32)?,
        x_scale: a.x_scale.ptr as u64,
        w_scale: a.w_scale.ptr as u64,
        bias: ptr(a.bias),
        out: a.out.ptr as u64,
        partial,
        counters,
        out_sm: a.out.stride(0),
        m: m as i32,
        n: n as i32,
        k: k as i32,
        splits: plan.splits as i32,
        kb_per_split: plan.kt_per_split as i32,
    };
    let smem = spec.smem_bytes();
    let f = dev.function(&spec.kernel(), smem)?;
    let cfg = LaunchConfig {
        // Token tiles vary fastest: the CTAs sharing a weight tile run together and read it
        // from DRAM once.
        grid: (plan.m_tiles as u32, plan.splits as u32, plan.n_tiles as u32),
        block: (W8A8Spec::THREADS, 1, 1),
        smem_bytes: smem,
    };
    let params = &mut [&mut p as *mut W8A8Params as *mut c_void];
    // FERROKERNELS_GEMM_PDL=0 launches the GEMM after the pre-pass has finished (A/B timing).
    if std::env::var("FERROKERNELS_GEMM_PDL").is_ok_and(|v| v == "0") {
        dev.launch(f, cfg, stream, params)
    } else {
        dev.launch_dependent(f, cfg, stream, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout_matches_the_kernel_structs() {
        // Two 128-byte tensor maps, 6 pointers, one i64, 5 i32, padded to the maps' 64 bytes.
        assert_eq!(std::mem::size_of::<W8A8Params>(), 2 * 128 + 64 + 64);
        assert_eq!(std::mem::size_of::<QuantActParams>(), 4 * 8 + 8 + 2 * 4);
    }

    #[test]
    fn tiles_stages_and_splits() {
        let bt = |m, n| W8A8Spec::for_problem(DType::BF16, Act::Fp8, m, n, 132).bt;
        assert_eq!((bt(1, 8192), bt(64, 4096)), (8, 64));
        assert_eq!((bt(100, 28672), bt(100, 8192), bt(128, 4096)), (128, 64, 32));
        assert_eq!((bt(256, 4096), bt(1024, 4096), bt(4096, 8192)), (64, 256, 256));
        for s in W8A8Spec::TOKEN_TILES {
            let spec = W8A8Spec { dtype: DType::BF16, act: Act::Fp8, bt: s };
            assert!(spec.smem_bytes() <= 227 * 1024 && spec.stages() >= 4, "{}", spec.name());
        }
        // M = 1 splits K to fill 132 SMs; M = 4096 has tiles to spare.
        let p = plan(1, 8192, 8192, 132);
        assert!(p.splits >= 2 && p.splits * p.kt_per_split >= 64, "{p:?}");
        assert_eq!(plan(4096, 8192, 8192, 132).splits, 1);
        for k in [64, 192, 4096, 28672] {
            let p = plan(1, 64, k, 132);
            assert!((p.splits - 1) * p.kt_per_split < k.div_ceil(128), "{k} {p:?}");
        }
    }
}
