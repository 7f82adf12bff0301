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
use crate::dlpack::{DType, Device, TensorView};
use crate::error::{Error, Result};
use crate::ops::attention::shape_err;

/// How codes turn into weights, per group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zeros {
    /// 4-bit: (q - 8) * s; 8-bit: q * s.
    Symmetric,
    /// (q - z) * s with integer z.
    Points,
    /// q * s + m.
    Minimums,
}

/// Activation quantization of W8A8 formats (per token, or one static scale).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Weight-only: activations stay in their dtype.
    None,
    /// int8 codes, scale max|x_m| / 127, int32 accumulation.
    Int8,
    /// float8_e4m3fn codes, scale max|x_m| / 448, f32 accumulation.
    Fp8,
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

fn expect_contiguous(t: &TensorView) -> Result<()> {
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
            "the low-bit GEMM has no CUDA kernel yet; dequantize (ferrokernels.gemm.dequantize) and use torch.matmul, \
             or run on the CPU"
                .into(),
        )),
    }
}
