//! CPU kernels (rayon). They are the reference the GPU tests compare against and the path CI
//! and GPU-less users run: f32 accumulation whatever the input dtype.

pub mod append_kv;
pub mod attention;
pub mod decode;
pub mod gemm;

use crate::dlpack::TensorView;
use crate::ops::attention::batch_strides;
use half::{bf16, f16};

/// Storage types the CPU kernels read and write.
pub trait Element: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// A contiguous float16/bfloat16/float32 tensor in host memory as f32, row-major.
pub(crate) fn floats(t: &TensorView) -> Vec<f32> {
    let n = t.numel() as usize;
    unsafe {
        match t.dtype {
            crate::dlpack::DType::F16 => std::slice::from_raw_parts(t.ptr as *const f16, n).iter().map(|v| v.to_f32()).collect(),
            crate::dlpack::DType::BF16 => std::slice::from_raw_parts(t.ptr as *const bf16, n).iter().map(|v| v.to_f32()).collect(),
            _ => std::slice::from_raw_parts(t.ptr as *const f32, n).to_vec(),
        }
    }
}

/// float8_e4m3fn (no infinities, max 448) -> f32, exactly.
pub(crate) fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((b >> 3) & 0x0F, b & 0x07);
    if e == 0x0F && m == 0x07 {
        return f32::NAN;
    }
    let mag = if e == 0 { m as f32 / 8.0 * 2f32.powi(-6) } else { (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7) };
    sign * mag
}

/// f32 -> float8_e4m3fn, rounding to nearest even and saturating at +-448 (as torch's cast of
/// in-range values; NaN stays NaN).
pub(crate) fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs().min(448.0);
    let code = if a < 2f32.powi(-6) {
        (a / 2f32.powi(-9)).round_ties_even() as u8 // subnormals; 8 rounds up to the first normal
    } else {
        let mut e = a.log2().floor() as i32;
        if 2f32.powi(e) > a {
            e -= 1; // log2 rounding at exact powers
        }
        let mut m = ((a / 2f32.powi(e) - 1.0) * 8.0).round_ties_even() as i32;
        if m == 8 {
            e += 1;
            m = 0;
        }
        (((e + 7) << 3) | m).min(0x7E) as u8
    };
    sign | code
}

/// An int32 tensor in host memory (any strides), flattened row-major.
pub(crate) fn host_i32(t: &TensorView) -> Vec<i32> {
    let n = t.numel() as usize;
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; t.ndim()];
    for _ in 0..n {
        let off: i64 = idx.iter().zip(&t.strides).map(|(&i, &s)| i as i64 * s).sum();
        out.push(unsafe { *(t.ptr as *const i32).offset(off as isize) });
        for ax in (0..t.ndim()).rev() {
            idx[ax] += 1;
            if idx[ax] < t.dim(ax) {
                break;
            }
            idx[ax] = 0;
        }
    }
    out
}

/// Rows of a (batch, seqlen, heads, dim) view -- or (total, heads, dim) with `varlen` -- by
/// (batch or page, row, head): q/k/v/out of attention, the caches of decode and append_kv.
#[derive(Clone, Copy)]
pub(crate) struct Rows {
    ptr: SharedPtr,
    sb: isize,
    ss: isize,
    sh: isize,
}

impl Rows {
    pub(crate) fn of(t: &TensorView, varlen: bool) -> Rows {
        let [sb, ss, sh] = batch_strides(t, varlen);
        Rows { ptr: SharedPtr(t.ptr), sb: sb as isize, ss: ss as isize, sh: sh as isize }
    }

    /// Pointer to the first element of row `s` of head `h`, batch `b`.
    pub(crate) fn row<T>(&self, b: usize, s: usize, h: usize) -> *mut T {
        let off = b as isize * self.sb + s as isize * self.ss + h as isize * self.sh;
        unsafe { (self.ptr.0 as *mut T).offset(off) }
    }

    /// Copies `n` rows from `s0` into `dst` (row-major, `dim` columns) as f32 times `mul`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gather<T: Element>(&self, dst: &mut [f32], b: usize, s0: usize, n: usize, h: usize, dim: usize, mul: f32) {
        for (i, chunk) in dst[..n * dim].chunks_exact_mut(dim).enumerate() {
            let src = unsafe { std::slice::from_raw_parts(self.row::<T>(b, s0 + i, h) as *const T, dim) };
            for (x, &y) in chunk.iter_mut().zip(src) {
                *x = y.to_f32() * mul;
            }
        }
    }
}

/// A raw pointer that rayon tasks may share: each task touches a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SharedPtr(pub usize);
unsafe impl Send for SharedPtr {}
unsafe impl Sync for SharedPtr {}

/// dst (rows x n, row-major) = lhs (rows x k, row-major) * rhs, where rhs element (kk, j) sits at
/// `rhs[kk * rhs_rs + j * rhs_cs]`; with `accumulate`, dst += instead of =.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(dst: &mut [f32], lhs: &[f32], rhs: &[f32], rows: usize, n: usize, k: usize, rhs_rs: usize, rhs_cs: usize, accumulate: bool) {
    debug_assert!(dst.len() >= rows * n && lhs.len() >= rows * k);
    unsafe {
        ::gemm::gemm(
            rows, n, k,
            dst.as_mut_ptr(), 1, n as isize,
            accumulate,
            lhs.as_ptr(), 1, k as isize,
            rhs.as_ptr(), rhs_cs as isize, rhs_rs as isize,
            1.0f32, 1.0f32,
            false, false, false,
            ::gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_codes_round_trip_and_round_to_nearest_even() {
        for b in 0..=255u8 {
            let x = e4m3_to_f32(b);
            if x.is_nan() {
                continue;
            }
            let back = f32_to_e4m3(x);
            // +0 and -0 are distinct codes; every other value has exactly one.
            assert_eq!(back, b, "code {b:#04x} = {x}");
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(f32_to_e4m3(1000.0), 0x7E); // saturates
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.0625)), 1.0); // halfway between 1 and 1.125: even
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.1875)), 1.25);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0x00); // halfway to the first subnormal: even (0)
    }
}
