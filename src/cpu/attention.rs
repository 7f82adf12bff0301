//! Flash-style attention on the CPU: each rayon task owns a block of query rows of one
//! (batch, head) and streams key/value blocks through an online softmax, so extra memory is
//! O(block) and no N x N score matrix is ever formed. Block products go through `gemm`.

use super::{Element, SharedPtr, matmul};
use crate::dlpack::{DType, TensorView};
use crate::error::Result;
use crate::ops::attention::Dims;
use half::{bf16, f16};
use rayon::prelude::*;

const BLOCK_Q: usize = 64;
const BLOCK_K: usize = 256;

pub fn forward(q: &TensorView, k: &TensorView, v: &TensorView, out: &TensorView, lse: Option<&TensorView>, d: &Dims) -> Result<()> {
    match q.dtype {
        DType::F16 => run::<f16>(q, k, v, out, lse, d),
        DType::BF16 => run::<bf16>(q, k, v, out, lse, d),
        _ => run::<f32>(q, k, v, out, lse, d),
    }
    Ok(())
}

/// Element (row, col) of head `h` of batch `b` of a 4-D view.
#[derive(Clone, Copy)]
struct Rows {
    ptr: SharedPtr,
    sb: isize,
    ss: isize,
    sh: isize,
}

impl Rows {
    fn of(t: &TensorView) -> Rows {
        Rows { ptr: SharedPtr(t.ptr), sb: t.stride(0) as isize, ss: t.stride(1) as isize, sh: t.stride(2) as isize }
    }

    /// Pointer to the first element of row `s` of head `h`, batch `b`.
    fn row<T>(&self, b: usize, s: usize, h: usize) -> *mut T {
        let off = b as isize * self.sb + s as isize * self.ss + h as isize * self.sh;
        unsafe { (self.ptr.0 as *mut T).offset(off) }
    }

    /// Copies `n` rows from `s0` into `dst` (row-major, `dim` columns) as f32 times `mul`.
    fn gather<T: Element>(&self, dst: &mut [f32], b: usize, s0: usize, n: usize, h: usize, dim: usize, mul: f32) {
        for (i, chunk) in dst[..n * dim].chunks_exact_mut(dim).enumerate() {
            let src = unsafe { std::slice::from_raw_parts(self.row::<T>(b, s0 + i, h) as *const T, dim) };
            for (x, &y) in chunk.iter_mut().zip(src) {
                *x = y.to_f32() * mul;
            }
        }
    }
}

fn run<T: Element>(q: &TensorView, k: &TensorView, v: &TensorView, out: &TensorView, lse: Option<&TensorView>, d: &Dims) {
    let (qr, kr, vr, or) = (Rows::of(q), Rows::of(k), Rows::of(v), Rows::of(out));
    let lse_ptr = lse.map(|l| (SharedPtr(l.ptr), l.stride(0) as isize, l.stride(1) as isize));
    let q_blocks = d.seqlen_q.div_ceil(BLOCK_Q);
    let group = d.heads_q / d.heads_kv;
    let dim = d.head_dim;
    let scale_log2 = d.scale * std::f32::consts::LOG2_E;

    (0..d.batch * d.heads_q * q_blocks).into_par_iter().for_each(|task| {
        let qb = task % q_blocks;
        let h = (task / q_blocks) % d.heads_q;
        let b = task / (q_blocks * d.heads_q);
        let hk = h / group;
        let q0 = qb * BLOCK_Q;
        let rows = BLOCK_Q.min(d.seqlen_q - q0);

        let mut qf = vec![0f32; rows * dim];
        qr.gather::<T>(&mut qf, b, q0, rows, h, dim, scale_log2);
        let mut acc = vec![0f32; rows * dim];
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0f32; rows];
        let mut kf = vec![0f32; BLOCK_K * dim];
        let mut vf = vec![0f32; BLOCK_K * dim];
        let mut s = vec![0f32; rows * BLOCK_K];

        // Keys past the diagonal of the block's last row are never visible.
        let kv_end = if d.causal {
            (q0 as i64 + rows as i64 + d.causal_offset).clamp(0, d.seqlen_k as i64) as usize
        } else {
            d.seqlen_k
        };
        for k0 in (0..kv_end).step_by(BLOCK_K) {
            let cols = BLOCK_K.min(kv_end - k0);
            kr.gather::<T>(&mut kf, b, k0, cols, hk, dim, 1.0);
            vr.gather::<T>(&mut vf, b, k0, cols, hk, dim, 1.0);
            // s[r][c] = sum_d qf[r][d] * kf[c][d]
            matmul(&mut s, &qf, &kf, rows, cols, dim, 1, dim, false);
            for r in 0..rows {
                let srow = &mut s[r * cols..(r + 1) * cols];
                if d.causal {
                    let last = q0 as i64 + r as i64 + d.causal_offset; // last visible key
                    for (c, x) in srow.iter_mut().enumerate() {
                        if k0 as i64 + c as i64 > last {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                let mx = srow.iter().fold(m[r], |a, &b| a.max(b));
                let base = if mx == f32::NEG_INFINITY { 0.0 } else { mx };
                let alpha = (m[r] - base).exp2();
                m[r] = mx;
                let mut sum = 0.0;
                for x in srow.iter_mut() {
                    *x = (*x - base).exp2();
                    sum += *x;
                }
                l[r] = l[r] * alpha + sum;
                acc[r * dim..(r + 1) * dim].iter_mut().for_each(|a| *a *= alpha);
            }
            // acc += p * vf
            matmul(&mut acc, &s, &vf, rows, dim, cols, dim, 1, true);
        }

        for r in 0..rows {
            let inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 };
            let dst = unsafe { std::slice::from_raw_parts_mut(or.row::<T>(b, q0 + r, h), dim) };
            for (o, &a) in dst.iter_mut().zip(&acc[r * dim..(r + 1) * dim]) {
                *o = T::from_f32(a * inv);
            }
            if let Some((p, sb, sh)) = lse_ptr {
                let val = if l[r] > 0.0 { (m[r] + l[r].log2()) * std::f32::consts::LN_2 } else { f32::NEG_INFINITY };
                unsafe { *(p.0 as *mut f32).offset(b as isize * sb + h as isize * sh + (q0 + r) as isize) = val };
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use crate::dlpack::{DType, TensorView};
    use crate::ops::attention::{AttentionOptions, CausalAlign, forward};

    /// Plain O(N^2) attention in f64 for one (batch, head), the test oracle.
    #[allow(clippy::too_many_arguments)]
    fn naive(q: &[f32], k: &[f32], v: &[f32], nq: usize, nk: usize, d: usize, scale: f64, causal_off: Option<i64>) -> Vec<f64> {
        let mut out = vec![0f64; nq * d];
        for i in 0..nq {
            let s: Vec<f64> = (0..nk)
                .map(|j| {
                    if causal_off.is_some_and(|o| j as i64 > i as i64 + o) {
                        f64::NEG_INFINITY
                    } else {
                        (0..d).map(|x| q[i * d + x] as f64 * k[j * d + x] as f64).sum::<f64>() * scale
                    }
                })
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if mx == f64::NEG_INFINITY {
                continue;
            }
            let p: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
            let z: f64 = p.iter().sum();
            for x in 0..d {
                out[i * d + x] = (0..nk).map(|j| p[j] * v[j * d + x] as f64).sum::<f64>() / z;
            }
        }
        out
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_naive_f32_causal_bottom_right() {
        for &(nq, nk, d, causal) in &[(1, 1, 8, false), (70, 300, 40, true), (300, 70, 64, true), (129, 129, 16, false)] {
            let (q, k, v) = (rand(nq * d, 1), rand(nk * d, 2), rand(nk * d, 3));
            let out = vec![f32::NAN; nq * d];
            let view = |n: &str, x: &[f32], s: usize| TensorView::from_host(n, x, DType::F32, &[1, s as i64, 1, d as i64]);
            let opts = AttentionOptions { causal, align: CausalAlign::BottomRight, scale: None };
            forward(&view("q", &q, nq), &view("k", &k, nk), &view("v", &v, nk), &view("out", &out, nq), None, &opts, 0).unwrap();
            let off = causal.then_some(nk as i64 - nq as i64);
            let want = naive(&q, &k, &v, nq, nk, d, 1.0 / (d as f64).sqrt(), off);
            let err = out.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(err < 1e-5, "nq={nq} nk={nk} d={d} causal={causal}: max err {err}");
        }
    }
}
