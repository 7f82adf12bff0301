//! CPU kernels (rayon). They are the reference the GPU tests compare against and the path CI
//! and GPU-less users run: f32 accumulation whatever the input dtype.

pub mod append_kv;
pub mod attention;
pub mod decode;
pub mod gemm;

use crate::dlpack::TensorView;
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
