//! Decode attention over a quantized KV cache (kernels/kv_quant.cu): int8 and fp8 (e4m3) codes
//! with a float32 scale per token, or KIVI's int4 / int2 (keys per channel over groups of G
//! tokens, values per token over groups of G channels, float16 scale and min) with the most
//! recent tokens in a full-precision ring. The kernel is the decode kernel's loop with a tile
//! source that dequantizes in shared memory; planning, splits and the merge are decode's.
//!
//! The storage is allocated and filled by `ferrokernels.kv_quant` (Python); here it is checked
//! (shapes, dtypes, contiguity) and read. The CPU path lives in Python: dequantize, then the
//! CPU decode.

use crate::cuda::KernelSource;
use crate::cuda::driver;
use crate::dlpack::{DType, TensorView};
use crate::error::{Error, Result};
use crate::ops::attention::{ctype, dtype_name, ptr, shape_err};
use crate::ops::decode::{self, CacheDims, DecodeDims, DecodeLaunch, DecodeParams, Plan};
use std::ffi::c_void;

/// The code formats, numbered as `enum KvFormat` in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvFormat {
    Int8 = 0,
    Fp8 = 1,
    Int4 = 2,
    Int2 = 3,
}

impl KvFormat {
    pub const ALL: [KvFormat; 4] = [KvFormat::Int8, KvFormat::Fp8, KvFormat::Int4, KvFormat::Int2];

    pub fn parse(s: &str) -> Result<KvFormat> {
        Ok(match s {
            "int8" => KvFormat::Int8,
            "fp8" => KvFormat::Fp8,
            "int4" => KvFormat::Int4,
            "int2" => KvFormat::Int2,
            _ => return Err(Error::Value(format!("format must be 'int8', 'fp8', 'int4' or 'int2', got {s:?}"))),
        })
    }

    pub fn name(self) -> &'static str {
        ["int8", "fp8", "int4", "int2"][self as usize]
    }

    pub fn bits(self) -> usize {
        match self {
            KvFormat::Int4 => 4,
            KvFormat::Int2 => 2,
            _ => 8,
        }
    }

    /// Scales and mins per group (int4 / int2) rather than one scale per token.
    pub fn grouped(self) -> bool {
        matches!(self, KvFormat::Int4 | KvFormat::Int2)
    }
}

/// Keys per tile; the storage's capacity is a whole number of tiles.
pub const TILE: usize = 64;

/// One call: the query, the quantized storage, lengths and options.
#[derive(Debug, Clone, Copy)]
pub struct KvQuantArgs<'a> {
    pub q: &'a TensorView,
    pub k_codes: &'a TensorView,
    pub v_codes: &'a TensorView,
    pub k_meta: &'a TensorView,
    pub v_meta: &'a TensorView,
    /// The residual ring (batch, heads_kv, res_cap, head_dim), model dtype, or None.
    pub k_res: Option<&'a TensorView>,
    pub v_res: Option<&'a TensorView>,
    /// int32 (batch,): keys per sequence, new tokens included.
    pub cache_seqlens: &'a TensorView,
    /// int32 (batch,): the first keys held as codes (the rest are in the ring).
    pub quant_lens: &'a TensorView,
    pub out: &'a TensorView,
    pub lse: Option<&'a TensorView>,
    pub workspace: Option<&'a TensorView>,
    pub format: KvFormat,
    pub group: usize,
    pub causal_q: bool,
    pub scale: Option<f64>,
    pub softcap: f64,
    pub window: (i64, i64),
    pub splits: usize,
}

pub const CODES_LAYOUT: &str = "(batch, heads_kv, capacity, head_dim * bits / 8) uint8";

/// Checks the call; returns decode's dims (capacity = the storage's).
pub fn check(a: &KvQuantArgs) -> Result<DecodeDims> {
    let q = a.q;
    q.expect_dtype(&[DType::F16, DType::BF16])?;
    q.expect_rank(4, decode::Q_LAYOUT)?;
    a.out.expect_same_dtype(q)?;
    a.out.expect_shape(&q.shape)?;
    a.out.expect_writable_layout()?;
    for t in [q, a.out] {
        t.expect_last_contiguous()?;
    }
    let (batch, q_len, heads_q, head_dim) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    if q_len == 0 {
        return shape_err("q has q_len 0; decode needs at least one new token".into());
    }
    if ![64, 128, 256].contains(&head_dim) {
        return shape_err(format!("q has head_dim {head_dim}; the quantized cache supports 64, 128 and 256"));
    }
    let kc = a.k_codes;
    kc.expect_rank(4, CODES_LAYOUT)?;
    kc.expect_dtype(&[DType::U8])?;
    let heads_kv = kc.dim(1);
    let capacity = kc.dim(2);
    if heads_kv == 0 || heads_q % heads_kv != 0 {
        return shape_err(format!("q has {heads_q} heads, which must be a multiple of k_codes' {heads_kv} heads (GQA/MQA)"));
    }
    if capacity % TILE != 0 {
        return shape_err(format!("k_codes holds {capacity} tokens per sequence; the capacity must be a multiple of {TILE}"));
    }
    let code_bytes = head_dim * a.format.bits() / 8;
    let codes_shape = [batch as i64, heads_kv as i64, capacity as i64, code_bytes as i64];
    for t in [a.k_codes, a.v_codes] {
        t.expect_same_device(q)?;
        t.expect_dtype(&[DType::U8])?;
        t.expect_shape(&codes_shape)?;
        t.expect_contiguous()?;
    }
    if a.format.grouped() {
        let g = a.group;
        if !(g == 32 || g == 64 || g == 128) || head_dim % g != 0 {
            return Err(Error::Value(format!(
                "group is {g}; int4 / int2 groups are 32, 64 or 128 and must divide head_dim {head_dim}"
            )));
        }
        let k_shape = [batch as i64, heads_kv as i64, (capacity / g) as i64, 2, head_dim as i64];
        let v_shape = [batch as i64, heads_kv as i64, capacity as i64, (head_dim / g) as i64, 2];
        for (t, shape) in [(a.k_meta, &k_shape[..]), (a.v_meta, &v_shape[..])] {
            t.expect_same_device(q)?;
            t.expect_dtype(&[DType::F16])?;
            t.expect_shape(shape)?;
            t.expect_contiguous()?;
        }
    } else {
        for t in [a.k_meta, a.v_meta] {
            t.expect_same_device(q)?;
            t.expect_dtype(&[DType::F32])?;
            t.expect_shape(&[batch as i64, heads_kv as i64, capacity as i64])?;
            t.expect_contiguous()?;
        }
    }
    match (a.k_res, a.v_res) {
        (Some(kr), Some(vr)) => {
            kr.expect_rank(4, "(batch, heads_kv, res_cap, head_dim)")?;
            let shape = [batch as i64, heads_kv as i64, kr.dim(2) as i64, head_dim as i64];
            for t in [kr, vr] {
                t.expect_same_device(q)?;
                t.expect_same_dtype(q)?;
                t.expect_shape(&shape)?;
                t.expect_contiguous()?;
            }
            if kr.dim(2) == 0 {
                return shape_err("k_res has no slots; pass None for a cache without a residual ring".into());
            }
        }
        (None, None) => {}
        _ => return Err(Error::Value("k_res and v_res must both be given or both be None".into())),
    }
    for t in [a.cache_seqlens, a.quant_lens] {
        t.expect_same_device(q)?;
        t.expect_dtype(&[DType::I32])?;
        t.expect_shape(&[batch as i64])?;
    }
    let shape = decode::DecodeShape { batch, q_len, heads_q, heads_kv, head_dim };
    let cache = CacheDims { page_size: 0, num_pages: 0, capacity };
    decode::check_options(q, a.lse, a.workspace, shape, cache, a.scale, a.softcap, a.window, a.causal_q)
}

/// Host check of the lengths: quant_lens[b] <= cache_seqlens[b] <= capacity, and the keys past
/// quant_lens fit the ring.
pub fn check_lengths(seqlens: &[i32], quant_lens: &[i32], capacity: usize, res_cap: usize) -> Result<()> {
    for (b, (&len, &ql)) in seqlens.iter().zip(quant_lens).enumerate() {
        if len < 0 || len as usize > capacity {
            return Err(Error::Value(format!("cache_seqlens[{b}] is {len}; it must be in [0, {capacity}]")));
        }
        if ql < 0 || ql > len || (len - ql) as usize > res_cap {
            return Err(Error::Value(format!(
                "quant_lens[{b}] is {ql} with cache_seqlens[{b}] {len}; it must be in [len - {res_cap}, len] (the ring holds {res_cap})"
            )));
        }
    }
    Ok(())
}

/// A compiled kernel: dtype, head dim, warps on rows, format, stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvQuantSpec {
    pub dtype: DType,
    pub head_dim: usize,
    pub warps_on_rows: usize,
    pub format: KvFormat,
    pub stages: usize,
}

impl KvQuantSpec {
    /// Stages by format, measured on the H100 (D = 128): 8-bit tiles (18 KB) run best with 2
    /// stages (3 CTAs per SM: +17% at (16, 8K) over 3 stages), int4 with 3, int2 with 3-4.
    /// FERROKERNELS_KVQ_STAGES overrides.
    pub fn for_problem(dtype: DType, head_dim: usize, warps_on_rows: usize, format: KvFormat) -> KvQuantSpec {
        let default = Self::default_stages(format);
        let stages = std::env::var("FERROKERNELS_KVQ_STAGES")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|s| (2..=8).contains(s))
            .unwrap_or(default);
        KvQuantSpec { dtype, head_dim, warps_on_rows, format, stages }
    }

    fn default_stages(format: KvFormat) -> usize {
        match format {
            KvFormat::Int8 | KvFormat::Fp8 => 2,
            KvFormat::Int4 => 3,
            KvFormat::Int2 => 4,
        }
    }

    pub fn all() -> Vec<KvQuantSpec> {
        let mut v = Vec::new();
        for dtype in [DType::F16, DType::BF16] {
            for d in [64, 128, 256] {
                for wr in [1, 2, 4] {
                    for format in KvFormat::ALL {
                        v.push(KvQuantSpec { dtype, head_dim: d, warps_on_rows: wr, format, stages: Self::default_stages(format) });
                    }
                }
            }
        }
        v
    }

    /// Mirrors QuantTiles: float16 Q rows, the dequantized K+V tile, then the raw stages.
    pub fn smem_bytes(&self) -> u32 {
        let d = self.head_dim;
        let srow = d + 8;
        let code = TILE * d * self.format.bits() / 8;
        // int4 / int2 K: every key group (4 / warps_on_rows of them, TILE / that many keys) keeps
        // the token groups (of >= 32) its keys touch.
        let key_groups = 4 / self.warps_on_rows;
        let keys = TILE / key_groups;
        let (k_meta, v_meta) =
            if self.format.grouped() { (key_groups * keys.div_ceil(32) * 4 * d, 8 * d) } else { (TILE * 4, TILE * 4) };
        (16 * self.warps_on_rows * srow * 2 + 2 * TILE * srow * 2 + self.stages * (2 * code + k_meta + v_meta)) as u32
    }

    pub fn name(&self) -> String {
        let t = dtype_name(self.dtype);
        let stages = if self.stages == Self::default_stages(self.format) { String::new() } else { format!("_s{}", self.stages) };
        format!("kv_quant_decode_{t}_d{}_r{}_{}{stages}", self.head_dim, self.warps_on_rows, self.format.name())
    }

    pub fn kernel(&self) -> KernelSource {
        let source = format!(
            "#include \"kv_quant.cu\"\n\
             extern \"C\" __global__ void __launch_bounds__(128, 1) {name}(const __grid_constant__ DecodeParams p, \
             const __grid_constant__ KvQuantParams q) {{\n\
             \x20   kv_quant_decode<{t}, {d}, {wr}, {stages}, {fmt}>(p, q);\n}}\n",
            name = self.name(),
            t = ctype(self.dtype),
            d = self.head_dim,
            wr = self.warps_on_rows,
            stages = self.stages,
            fmt = self.format as i32,
        );
        // e4m3 conversions need sm_89.
        let sm_min = if self.format == KvFormat::Fp8 { 89 } else { 80 };
        KernelSource { name: self.name(), source, sm_range: (sm_min, u32::MAX) }
    }
}

pub fn all_kernels() -> Vec<KernelSource> {
    KvQuantSpec::all().iter().map(|s| s.kernel()).collect()
}

/// Mirrors `struct KvQuantParams` in kernels/kv_quant.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct KvQuantParams {
    k_codes: u64,
    v_codes: u64,
    k_meta: u64,
    v_meta: u64,
    k_res: u64,
    v_res: u64,
    quant_lens: u64,
    res_cap: i32,
    group: i32,
    group_shift: i32,
    pad: i32,
}

/// The launch plan on GPU `ordinal`.
pub fn plan_for_device(ordinal: i32, d: &DecodeDims, dtype: DType, format: KvFormat) -> Result<Plan> {
    let dev = driver::device(ordinal)?;
    Ok(decode::plan_with(d, dev.sm_count as usize, dev.max_smem_optin as usize + 1024, |wr| {
        KvQuantSpec::for_problem(dtype, d.head_dim, wr, format).smem_bytes()
    }))
}

pub fn forward(a: &KvQuantArgs, stream: usize) -> Result<()> {
    let d = check(a)?;
    if d.batch == 0 || d.heads_q == 0 {
        return Ok(());
    }
    let ordinal = match a.q.device {
        crate::dlpack::Device::Cuda(o) => o,
        crate::dlpack::Device::Cpu => {
            return Err(Error::Device(
                "the quantized-cache kernel runs on CUDA tensors (ferrokernels.kv_quant dequantizes for the CPU path)".into(),
            ));
        }
    };
    let plan = plan_for_device(ordinal, &d, a.q.dtype, a.format)?;
    let dev = driver::device(ordinal)?;
    if a.format == KvFormat::Fp8 && dev.arch.trim_start_matches("sm_").trim_end_matches('a').parse::<u32>().unwrap_or(0) < 89 {
        return Err(Error::Value(format!("fp8 KV needs sm_89 or newer; this GPU is {}", dev.arch)));
    }
    let spec = KvQuantSpec::for_problem(a.q.dtype, d.head_dim, plan.warps_on_rows, a.format);
    let mut p: DecodeParams = DecodeLaunch { q: a.q, out: a.out, lse: a.lse, seqlens: a.cache_seqlens, workspace: a.workspace, splits: a.splits }
        .params(&d, &plan)?;
    let mut qp = KvQuantParams {
        k_codes: a.k_codes.ptr as u64,
        v_codes: a.v_codes.ptr as u64,
        k_meta: a.k_meta.ptr as u64,
        v_meta: a.v_meta.ptr as u64,
        k_res: ptr(a.k_res),
        v_res: ptr(a.v_res),
        quant_lens: a.quant_lens.ptr as u64,
        res_cap: a.k_res.map_or(0, |t| t.dim(2) as i32),
        group: a.group as i32,
        group_shift: a.group.max(1).trailing_zeros() as i32,
        pad: 0,
    };
    // Contiguous (checked): the tiles are 16-byte copies from 16-byte aligned bases.
    for t in [a.k_codes, a.v_codes, a.k_meta, a.v_meta].into_iter().chain(a.k_res).chain(a.v_res) {
        if t.ptr % 16 != 0 {
            return Err(Error::Layout(format!("{} data pointer 0x{:x} is not 16-byte aligned", t.name, t.ptr)));
        }
    }
    let smem = spec.smem_bytes();
    let f = dev.function(&spec.kernel(), smem)?;
    let merge = decode::DecodeSpec::for_problem(a.q.dtype, d.head_dim, 1).merge_kernel();
    let mut args = [&mut p as *mut DecodeParams as *mut c_void, &mut qp as *mut KvQuantParams as *mut c_void];
    decode::launch(dev, f, &merge, &d, &plan, smem, stream, &mut args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout_matches_the_kernel_struct() {
        assert_eq!(std::mem::size_of::<KvQuantParams>(), 7 * 8 + 4 * 4);
    }

    #[test]
    fn every_variant_fits_shared_memory_and_the_warp_merge() {
        for s in KvQuantSpec::all() {
            assert!(s.smem_bytes() <= 227 * 1024, "{}", s.name());
            let d = s.head_dim;
            // The merge's scratch starts at the dequantized tile and runs into the stages.
            let q_rows = 16 * s.warps_on_rows * (d + 8) * 2;
            assert!((4 * 16 * d + 2 * 4 * 16) * 4 <= s.smem_bytes() as usize - q_rows, "{}", s.name());
        }
    }

    #[test]
    fn lengths_must_fit_the_ring() {
        assert!(check_lengths(&[100, 64], &[64, 64], 128, 64).is_ok());
        assert!(check_lengths(&[200], &[64], 256, 64).is_err());
        assert!(check_lengths(&[64], &[80], 128, 64).is_err());
        assert!(check_lengths(&[300], &[300], 256, 0).is_err());
    }
}
