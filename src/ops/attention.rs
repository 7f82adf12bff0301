//! Dense attention forward: `out = softmax(scale * q k^T [+ causal mask]) v` per (batch, head),
//! q/k/v/out in (batch, seqlen, heads, head_dim) layout with any strides (last dim contiguous).

use crate::cpu;
use crate::cuda::KernelSource;
use crate::cuda::driver::{self, LaunchConfig};
use crate::dlpack::{DType, Device, TensorView};
use crate::error::{Error, Result};
use std::ffi::c_void;

pub const LAYOUT: &str = "(batch, seqlen, heads, head_dim)";
pub const MAX_HEAD_DIM: usize = 256;

/// Where the causal diagonal sits when seqlen_q != seqlen_k.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CausalAlign {
    /// flash-attn >= 2.1: the last query sees every key (offset = Nk - Nq).
    BottomRight,
    /// torch SDPA `is_causal`: query i sees keys 0..=i.
    TopLeft,
}

#[derive(Debug, Clone, Copy)]
pub struct AttentionOptions {
    pub causal: bool,
    pub align: CausalAlign,
    /// Softmax scale; `None` means 1/sqrt(head_dim).
    pub scale: Option<f64>,
}

/// Sizes shared by the CPU and GPU paths, read once from the checked views.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub batch: usize,
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    /// Key j is visible to query i when j <= i + causal_offset (only if causal).
    pub causal_offset: i64,
    pub causal: bool,
    pub scale: f32,
}

/// One compiled specialisation: the template parameters, the symbol name, the cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionSpec {
    pub dtype: DType,
    /// The head dim rounded up to the MMA k step (16).
    pub head_dim_pad: usize,
}

impl AttentionSpec {
    pub const BLOCK_M: usize = 64;

    pub fn for_problem(dtype: DType, head_dim: usize) -> AttentionSpec {
        AttentionSpec { dtype, head_dim_pad: head_dim.div_ceil(16) * 16 }
    }

    pub fn all() -> Vec<AttentionSpec> {
        let mut v = Vec::new();
        for dtype in [DType::F16, DType::BF16] {
            for d in (16..=MAX_HEAD_DIM).step_by(16) {
                v.push(AttentionSpec { dtype, head_dim_pad: d });
            }
        }
        v
    }

    /// Smaller key tiles for wide heads keep the score + output registers under the limit.
    fn block_n(&self) -> usize {
        if self.head_dim_pad <= 128 { 64 } else { 32 }
    }

    fn q_in_regs(&self) -> bool {
        self.head_dim_pad <= 128
    }

    pub fn smem_bytes(&self) -> u32 {
        ((Self::BLOCK_M + 2 * self.block_n()) * (self.head_dim_pad + 8) * 2) as u32
    }

    fn ctype(&self) -> (&'static str, &'static str) {
        match self.dtype {
            DType::F16 => ("__half", "f16"),
            _ => ("__nv_bfloat16", "bf16"),
        }
    }

    pub fn name(&self) -> String {
        format!("attention_fwd_{}_d{}", self.ctype().1, self.head_dim_pad)
    }

    pub fn kernel(&self) -> KernelSource {
        let threads = Self::BLOCK_M / 16 * 32;
        let source = format!(
            "#include \"attention.cu\"\n\
             extern \"C\" __global__ void __launch_bounds__({threads}) {name}(const __grid_constant__ AttentionParams p) {{\n\
             \x20   attention_fwd<{t}, {d}, {bm}, {bn}, {qr}>(p);\n}}\n",
            name = self.name(),
            t = self.ctype().0,
            d = self.head_dim_pad,
            bm = Self::BLOCK_M,
            bn = self.block_n(),
            qr = self.q_in_regs(),
        );
        KernelSource { name: self.name(), source }
    }
}

/// Mirrors `struct AttentionParams` in kernels/attention.cu.
#[repr(C)]
struct AttentionParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    q_s: [i64; 3],
    k_s: [i64; 3],
    v_s: [i64; 3],
    o_s: [i64; 3],
    lse_s: [i64; 2],
    heads_q: i32,
    heads_kv: i32,
    seqlen_q: i32,
    seqlen_k: i32,
    head_dim: i32,
    causal: i32,
    causal_offset: i32,
    scale_log2: f32,
}

fn check(q: &TensorView, k: &TensorView, v: &TensorView, out: &TensorView, lse: Option<&TensorView>, opts: &AttentionOptions) -> Result<Dims> {
    for t in [q, k, v, out] {
        t.expect_rank(4, LAYOUT)?;
    }
    for t in [k, v, out] {
        t.expect_same_device(q)?;
    }
    q.expect_dtype(&[DType::F16, DType::BF16, DType::F32])?;
    for t in [k, v, out] {
        t.expect_same_dtype(q)?;
    }
    let (batch, seqlen_q, heads_q, head_dim) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let (seqlen_k, heads_kv) = (k.dim(1), k.dim(2));
    k.expect_dim(0, batch, "batch")?;
    v.expect_dim(0, batch, "batch")?;
    k.expect_dim(3, head_dim, "head_dim")?;
    v.expect_dim(1, seqlen_k, "seqlen (must match k)")?;
    v.expect_dim(2, heads_kv, "heads (must match k)")?;
    if v.dim(3) != head_dim {
        return Err(Error::NotImplemented(format!(
            "v head_dim {} differs from q/k head_dim {head_dim}; a separate head_dim_v is not supported yet",
            v.dim(3)
        )));
    }
    if head_dim == 0 || head_dim % 8 != 0 || head_dim > MAX_HEAD_DIM {
        return Err(Error::Shape(format!(
            "q has head_dim {head_dim}; supported head dims are multiples of 8 from 8 to {MAX_HEAD_DIM}"
        )));
    }
    if heads_kv == 0 || heads_q % heads_kv != 0 {
        return Err(Error::Shape(format!(
            "q has {heads_q} heads, which must be a multiple of k's {heads_kv} heads (GQA/MQA)"
        )));
    }
    out.expect_shape(&[batch as i64, seqlen_q as i64, heads_q as i64, head_dim as i64])?;
    out.expect_writable_layout()?;
    if let Some(lse) = lse {
        lse.expect_same_device(q)?;
        lse.expect_dtype(&[DType::F32])?;
        lse.expect_shape(&[batch as i64, heads_q as i64, seqlen_q as i64])?;
        lse.expect_last_contiguous()?;
        lse.expect_writable_layout()?;
    }
    for t in [q, k, v, out] {
        t.expect_last_contiguous()?;
    }
    let scale = match opts.scale {
        Some(s) if !s.is_finite() => return Err(Error::Value(format!("scale must be finite, got {s}"))),
        Some(s) => s as f32,
        None => 1.0 / (head_dim as f32).sqrt(),
    };
    let causal_offset = match opts.align {
        CausalAlign::BottomRight => seqlen_k as i64 - seqlen_q as i64,
        CausalAlign::TopLeft => 0,
    };
    Ok(Dims { batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal_offset, causal: opts.causal, scale })
}

/// Runs attention into `out` (and `lse` if given). `stream` is the CUDA stream to launch on
/// (ignored on the CPU).
pub fn forward(q: &TensorView, k: &TensorView, v: &TensorView, out: &TensorView, lse: Option<&TensorView>, opts: &AttentionOptions, stream: usize) -> Result<()> {
    let dims = check(q, k, v, out, lse, opts)?;
    if dims.batch == 0 || dims.seqlen_q == 0 || dims.heads_q == 0 {
        return Ok(());
    }
    match q.device {
        Device::Cpu => cpu::attention::forward(q, k, v, out, lse, &dims),
        Device::Cuda(ordinal) => forward_cuda(ordinal, q, k, v, out, lse, &dims, stream),
    }
}

#[allow(clippy::too_many_arguments)]
fn forward_cuda(ordinal: i32, q: &TensorView, k: &TensorView, v: &TensorView, out: &TensorView, lse: Option<&TensorView>, d: &Dims, stream: usize) -> Result<()> {
    if q.dtype == DType::F32 {
        return Err(Error::DType(
            "q is float32; the CUDA attention kernel takes float16 or bfloat16 (float32 runs on the CPU path)".into(),
        ));
    }
    for t in [q, k, v, out] {
        t.expect_aligned(16)?;
    }
    let too_big = |n: usize| n > i32::MAX as usize;
    if d.batch > 65535 || d.heads_q > 65535 || too_big(d.seqlen_q) || too_big(d.seqlen_k) {
        return Err(Error::Shape(format!(
            "q has batch {} and {} heads; the CUDA kernel supports at most 65535 of each",
            d.batch, d.heads_q
        )));
    }
    let dev = driver::device(ordinal)?;
    let spec = AttentionSpec::for_problem(q.dtype, d.head_dim);
    let smem = spec.smem_bytes();
    let f = dev.function(&spec.kernel(), smem)?;
    let s3 = |t: &TensorView| [t.stride(0), t.stride(1), t.stride(2)];
    let mut params = AttentionParams {
        q: q.ptr as u64,
        k: k.ptr as u64,
        v: v.ptr as u64,
        o: out.ptr as u64,
        lse: lse.map_or(0, |l| l.ptr as u64),
        q_s: s3(q),
        k_s: s3(k),
        v_s: s3(v),
        o_s: s3(out),
        lse_s: lse.map_or([0, 0], |l| [l.stride(0), l.stride(1)]),
        heads_q: d.heads_q as i32,
        heads_kv: d.heads_kv as i32,
        seqlen_q: d.seqlen_q as i32,
        seqlen_k: d.seqlen_k as i32,
        head_dim: d.head_dim as i32,
        causal: d.causal as i32,
        causal_offset: d.causal_offset.clamp(i32::MIN as i64, i32::MAX as i64) as i32,
        scale_log2: d.scale * std::f32::consts::LOG2_E,
    };
    let cfg = LaunchConfig {
        grid: (d.seqlen_q.div_ceil(AttentionSpec::BLOCK_M) as u32, d.heads_q as u32, d.batch as u32),
        block: ((AttentionSpec::BLOCK_M / 16 * 32) as u32, 1, 1),
        smem_bytes: smem,
    };
    let mut args = [&mut params as *mut AttentionParams as *mut c_void];
    dev.launch(f, cfg, stream, &mut args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout_matches_the_kernel_struct() {
        // 5 pointers, 14 i64 strides, 7 i32, 1 f32 -- no padding anywhere.
        assert_eq!(std::mem::size_of::<AttentionParams>(), 5 * 8 + 14 * 8 + 7 * 4 + 4);
    }

    #[test]
    fn spec_names_and_tiles() {
        let s = AttentionSpec::for_problem(DType::BF16, 72);
        assert_eq!(s.name(), "attention_fwd_bf16_d80");
        assert!(s.kernel().source.contains("attention_fwd<__nv_bfloat16, 80, 64, 64, true>"));
        assert_eq!(AttentionSpec::for_problem(DType::F16, 256).smem_bytes(), (64 + 64) * 264 * 2);
        assert_eq!(AttentionSpec::all().len(), 32);
    }
}
