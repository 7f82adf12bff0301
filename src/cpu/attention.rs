//! Flash-style attention on the CPU: each rayon task owns a block of query rows of one
//! (batch, head) and streams key/value blocks through an online softmax, so extra memory is
//! O(block) and no N x N score matrix is ever formed. Block products go through `gemm`.
//! Scores are modified in the same order as the GPU kernels: scale, softcap, ALiBi, mask,
//! window.

use super::{Element, Rows, SharedPtr, matmul};
use crate::dlpack::DType;
use crate::error::Result;
use crate::ops::attention::{AttentionArgs, Dims, MaskKind, batch_strides, broadcast_strides, host_seqlens};
use half::{bf16, f16};
use rayon::prelude::*;

const BLOCK_Q: usize = 64;
const BLOCK_K: usize = 256;

pub fn forward(a: &AttentionArgs, d: &Dims) -> Result<()> {
    let seqs = Seqs::new(a, d)?;
    match a.q.dtype {
        DType::F16 => run::<f16>(a, d, &seqs),
        DType::BF16 => run::<bf16>(a, d, &seqs),
        _ => run::<f32>(a, d, &seqs),
    }
    Ok(())
}

/// Row offsets and lengths of every sequence (varlen reads cu_seqlens from host memory).
struct Seqs {
    cu_q: Option<Vec<i32>>,
    cu_k: Option<Vec<i32>>,
    nq: usize,
    nk: usize,
}

impl Seqs {
    fn new(a: &AttentionArgs, d: &Dims) -> Result<Seqs> {
        Ok(match &a.varlen {
            Some(vl) => Seqs {
                cu_q: Some(host_seqlens(vl.cu_seqlens_q, a.q.dim(0), d.seqlen_q)?),
                cu_k: Some(host_seqlens(vl.cu_seqlens_k, a.k.dim(0), d.seqlen_k)?),
                nq: d.seqlen_q,
                nk: d.seqlen_k,
            },
            None => Seqs { cu_q: None, cu_k: None, nq: d.seqlen_q, nk: d.seqlen_k },
        })
    }

    /// (first q row, first k row, nq, nk) of sequence b.
    fn get(&self, b: usize) -> (usize, usize, usize, usize) {
        match (&self.cu_q, &self.cu_k) {
            (Some(q), Some(k)) => (q[b] as usize, k[b] as usize, (q[b + 1] - q[b]) as usize, (k[b + 1] - k[b]) as usize),
            _ => (0, 0, self.nq, self.nk),
        }
    }
}

/// The dense mask, broadcast by zero strides.
#[derive(Clone, Copy)]
struct Mask {
    ptr: SharedPtr,
    kind: MaskKind,
    s: [isize; 4],
}

impl Mask {
    /// None if (b, h, i, j) is masked out, else the additive bias.
    fn get<T: Element>(&self, b: usize, h: usize, i: usize, j: usize) -> Option<f32> {
        let at = b as isize * self.s[0] + h as isize * self.s[1] + i as isize * self.s[2] + j as isize * self.s[3];
        unsafe {
            match self.kind {
                MaskKind::None => Some(0.0),
                MaskKind::Bool => (*(self.ptr.0 as *const u8).offset(at) != 0).then_some(0.0),
                MaskKind::AddF32 => Some(*(self.ptr.0 as *const f32).offset(at)),
                MaskKind::AddSame => Some((*(self.ptr.0 as *const T).offset(at)).to_f32()),
            }
        }
    }
}

fn run<T: Element>(a: &AttentionArgs, d: &Dims, seqs: &Seqs) {
    let vl = d.varlen;
    let (qr, kr, vr, or) = (Rows::of(a.q, vl), Rows::of(a.k, vl), Rows::of(a.v, vl), Rows::of(a.out, vl));
    let lse_ptr = a.lse.map(|l| (SharedPtr(l.ptr), batch_strides(l, vl).map(|x| x as isize)));
    let mask = a.mask.map(|m| Mask {
        ptr: SharedPtr(m.ptr),
        kind: d.mask_kind,
        s: broadcast_strides(m).map(|x| x as isize),
    });
    let alibi = a.alibi.map(|t| {
        let sb = if t.ndim() == 2 { t.stride(0) as isize } else { 0 };
        (SharedPtr(t.ptr), sb)
    });
    let q_blocks = d.seqlen_q.div_ceil(BLOCK_Q);
    let group = d.heads_q / d.heads_kv;
    let (dim, dim_v) = (d.head_dim, d.head_dim_v);

    (0..d.batch * d.heads_q * q_blocks).into_par_iter().for_each(|task| {
        let qb = task % q_blocks;
        let h = (task / q_blocks) % d.heads_q;
        let b = task / (q_blocks * d.heads_q);
        let (q_row0, k_row0, nq, nk) = seqs.get(b);
        let q0 = qb * BLOCK_Q;
        if q0 >= nq {
            return;
        }
        let hk = h / group;
        let rows = BLOCK_Q.min(nq - q0);
        let off = if d.bottom_right { nk as i64 - nq as i64 } else { 0 };
        // Keys [lo(i), hi(i)] are visible to row i; the block sees the union.
        let lo = |i: usize| i as i64 + off - d.window_left;
        let hi = |i: usize| i as i64 + off + d.window_right;
        let kv_begin = lo(q0).clamp(0, nk as i64) as usize;
        let kv_end = (hi(q0 + rows - 1) + 1).clamp(0, nk as i64) as usize;
        let slope = alibi.map_or(0.0, |(p, sb)| unsafe { *(p.0 as *const f32).offset(b as isize * sb + h as isize) });

        let mut qf = vec![0f32; rows * dim];
        qr.gather::<T>(&mut qf, b, q_row0 + q0, rows, h, dim, d.scale);
        let mut acc = vec![0f32; rows * dim_v];
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0f32; rows];
        let mut kf = vec![0f32; BLOCK_K * dim];
        let mut vf = vec![0f32; BLOCK_K * dim_v];
        let mut s = vec![0f32; rows * BLOCK_K];

        for k0 in (kv_begin..kv_end).step_by(BLOCK_K) {
            let cols = BLOCK_K.min(kv_end - k0);
            kr.gather::<T>(&mut kf, b, k_row0 + k0, cols, hk, dim, 1.0);
            vr.gather::<T>(&mut vf, b, k_row0 + k0, cols, hk, dim_v, 1.0);
            // s[r][c] = sum_d qf[r][d] * kf[c][d]
            matmul(&mut s, &qf, &kf, rows, cols, dim, 1, dim, false);
            // A block every row sees whole, with no bias, needs no per-element pass.
            let plain = d.softcap == 0.0 && slope == 0.0 && mask.is_none()
                && k0 as i64 >= lo(q0 + rows - 1) && (k0 + cols - 1) as i64 <= hi(q0);
            for r in 0..rows {
                let i = q0 + r;
                let srow = &mut s[r * cols..(r + 1) * cols];
                for (c, x) in srow.iter_mut().enumerate().filter(|_| !plain) {
                    let j = k0 + c;
                    if (j as i64) < lo(i) || j as i64 > hi(i) {
                        *x = f32::NEG_INFINITY;
                        continue;
                    }
                    if d.softcap > 0.0 {
                        *x = d.softcap * (*x / d.softcap).tanh();
                    }
                    if slope != 0.0 {
                        *x -= slope * (i as i64 + off - j as i64).abs() as f32;
                    }
                    if let Some(mk) = &mask {
                        *x = mk.get::<T>(b, h, i, j).map_or(f32::NEG_INFINITY, |bias| *x + bias);
                    }
                }
                let mx = srow.iter().fold(m[r], |a, &b| a.max(b));
                let base = if mx == f32::NEG_INFINITY { 0.0 } else { mx };
                let alpha = (m[r] - base).exp();
                m[r] = mx;
                let mut sum = 0.0;
                for x in srow.iter_mut() {
                    *x = (*x - base).exp();
                    sum += *x;
                }
                l[r] = l[r] * alpha + sum;
                acc[r * dim_v..(r + 1) * dim_v].iter_mut().for_each(|a| *a *= alpha);
            }
            // acc += p * vf
            matmul(&mut acc, &s, &vf, rows, dim_v, cols, dim_v, 1, true);
        }

        for r in 0..rows {
            let inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 };
            let dst = unsafe { std::slice::from_raw_parts_mut(or.row::<T>(b, q_row0 + q0 + r, h), dim_v) };
            for (o, &a) in dst.iter_mut().zip(&acc[r * dim_v..(r + 1) * dim_v]) {
                *o = T::from_f32(a * inv);
            }
            if let Some((p, [sb, sh, ss])) = lse_ptr {
                let val = if l[r] > 0.0 { m[r] + l[r].ln() } else { f32::NEG_INFINITY };
                let at = b as isize * sb + h as isize * sh + (q_row0 + q0 + r) as isize * ss;
                unsafe { *(p.0 as *mut f32).offset(at) = val };
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use crate::dlpack::{DType, TensorView};
    use crate::ops::attention::{AttentionArgs, forward};

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
            let (qv, kv, vv, ov) = (view("q", &q, nq), view("k", &k, nk), view("v", &v, nk), view("out", &out, nq));
            let mut args = AttentionArgs::new(&qv, &kv, &vv, &ov);
            args.causal = causal;
            forward(&args, 0).unwrap();
            let off = causal.then_some(nk as i64 - nq as i64);
            let want = naive(&q, &k, &v, nq, nk, d, 1.0 / (d as f64).sqrt(), off);
            let err = out.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(err < 1e-5, "nq={nq} nk={nk} d={d} causal={causal}: max err {err}");
        }
    }
}
