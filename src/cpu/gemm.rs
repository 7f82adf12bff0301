//! Low-bit linear layer on the CPU: rayon tasks over blocks of output features; each
//! dequantizes its weight rows to f32 with the format's arithmetic (ops::gemm) and multiplies
//! them with the (permuted) activations through `gemm`.

use super::{Element, SharedPtr, e4m3_to_f32, f32_to_e4m3, floats, matmul};
use crate::dlpack::DType;
use crate::error::Result;
use crate::ops::gemm::{Act, GemmArgs, GemmDims, Zeros};
use half::{bf16, f16};
use rayon::prelude::*;

const BLOCK_N: usize = 32;

pub fn forward(a: &GemmArgs, d: &GemmDims) -> Result<()> {
    match (a.x.dtype, a.act) {
        (DType::F16, Act::None) => run::<f16>(a, d),
        (DType::BF16, Act::None) => run::<bf16>(a, d),
        (_, Act::None) => run::<f32>(a, d),
        (DType::F16, _) => run_w8a8::<f16>(a, d),
        (DType::BF16, _) => run_w8a8::<bf16>(a, d),
        _ => run_w8a8::<f32>(a, d),
    }
    Ok(())
}

/// W8A8: each token's activations quantized (int8 or e4m3) with its own scale (or the static
/// one), products accumulated exactly in i32 (int8) or in f32 (e4m3 values multiply exactly),
/// then scaled by the token's and the output channel's scales.
fn run_w8a8<T: Element>(a: &GemmArgs, d: &GemmDims) {
    let x = activations::<T>(a, d);
    let (m, n, k) = (d.m, d.n, d.k);
    let qmax = if a.act == Act::Int8 { 127.0f32 } else { 448.0 };
    let fixed = a.act_scale.map(|s| floats(s)[0]);
    // Quantized activations as f32 values (exact codes) and per-token scales.
    let mut xq = vec![0f32; m * k];
    let mut sx = vec![0f32; m];
    xq.par_chunks_mut(k).zip(sx.par_iter_mut()).enumerate().for_each(|(i, (row, s))| {
        let src = &x[i * k..(i + 1) * k];
        *s = fixed.unwrap_or_else(|| (src.iter().fold(0f32, |acc, v| acc.max(v.abs())) / qmax).max(1e-12));
        let inv = 1.0 / *s;
        for (dst, v) in row.iter_mut().zip(src) {
            let t = v * inv;
            *dst = if a.act == Act::Int8 { t.round_ties_even().clamp(-127.0, 127.0) } else { e4m3_to_f32(f32_to_e4m3(t)) };
        }
    });
    let sw = floats(a.scales);
    let bias = a.bias.map(floats);
    let out = SharedPtr(a.out.ptr);
    let os = a.out.stride(0) as isize;
    (0..n).into_par_iter().for_each(|j| {
        let w: Vec<f32> = (0..k)
            .map(|c| unsafe {
                let p = (a.qweight.ptr as *const u8).add(j * k + c);
                if a.act == Act::Int8 { *(p as *const i8) as f32 } else { e4m3_to_f32(*p) }
            })
            .collect();
        for i in 0..m {
            let row = &xq[i * k..(i + 1) * k];
            let dot = if a.act == Act::Int8 {
                row.iter().zip(&w).map(|(p, q)| *p as i32 * *q as i32).sum::<i32>() as f32
            } else {
                row.iter().zip(&w).map(|(p, q)| p * q).sum::<f32>()
            };
            let v = dot * sx[i] * sw[j] + bias.as_ref().map_or(0.0, |b| b[j]);
            unsafe { *(out.0 as *mut T).offset(i as isize * os).add(j) = T::from_f32(v) };
        }
    });
}

/// x as f32 (M, K), columns in canonical order (x[:, perm[c]] at column c).
fn activations<T: Element>(a: &GemmArgs, d: &GemmDims) -> Vec<f32> {
    let perm: Option<Vec<usize>> = a.perm.map(|p| {
        let s = unsafe { std::slice::from_raw_parts(p.ptr as *const i64, d.k) };
        s.iter().map(|&i| i as usize).collect()
    });
    let rs = a.x.stride(0) as isize;
    let mut x = vec![0f32; d.m * d.k];
    x.par_chunks_mut(d.k).enumerate().for_each(|(i, row)| {
        let src = unsafe { (a.x.ptr as *const T).offset(i as isize * rs) };
        for (c, v) in row.iter_mut().enumerate() {
            let j = perm.as_ref().map_or(c, |p| p[c]);
            *v = unsafe { (*src.add(j)).to_f32() };
        }
    });
    x
}

/// Weight rows [n0, n0 + rows) as f32 (rows, K), row-major.
fn dequantize_rows(a: &GemmArgs, d: &GemmDims, scales: &[f32], mins: Option<&[f32]>, n0: usize, rows: usize) -> Vec<f32> {
    let (k, groups, g) = (d.k, d.groups, a.group_size);
    let mut w = vec![0f32; rows * k];
    for r in 0..rows {
        let n = n0 + r;
        for c in 0..k {
            let q = if a.bits == 4 {
                let byte = unsafe { *(a.qweight.ptr as *const u8).add(n * k / 2 + c / 2) };
                (if c % 2 == 0 { byte & 0x0F } else { byte >> 4 }) as f32
            } else {
                unsafe { *(a.qweight.ptr as *const i8).add(n * k + c) as f32 }
            };
            let gi = n * groups + c / g;
            w[r * k + c] = match d.zeros {
                Zeros::Symmetric if a.bits == 4 => (q - 8.0) * scales[gi],
                Zeros::Symmetric => q * scales[gi],
                Zeros::Points => {
                    let z = unsafe { *(a.zeros.unwrap().ptr as *const u8).add(gi) } as f32;
                    (q - z) * scales[gi]
                }
                Zeros::Minimums => q * scales[gi] + mins.unwrap()[gi],
            };
        }
    }
    w
}

fn run<T: Element>(a: &GemmArgs, d: &GemmDims) {
    let x = activations::<T>(a, d);
    let scales = floats(a.scales);
    let mins = match d.zeros {
        Zeros::Minimums => Some(floats(a.zeros.unwrap())),
        _ => None,
    };
    let bias = a.bias.map(floats);
    let out = SharedPtr(a.out.ptr);
    let os = a.out.stride(0) as isize;
    (0..d.n.div_ceil(BLOCK_N)).into_par_iter().for_each(|blk| {
        let n0 = blk * BLOCK_N;
        let rows = BLOCK_N.min(d.n - n0);
        let w = dequantize_rows(a, d, &scales, mins.as_deref(), n0, rows);
        let mut acc = vec![0f32; d.m * rows];
        // acc (M, rows) = x (M, K) @ w^T: element (kk, j) of the right factor is w[j * K + kk].
        matmul(&mut acc, &x, &w, d.m, rows, d.k, 1, d.k, false);
        for i in 0..d.m {
            let dst = unsafe { (out.0 as *mut T).offset(i as isize * os).add(n0) };
            for j in 0..rows {
                let v = acc[i * rows + j] + bias.as_ref().map_or(0.0, |b| b[n0 + j]);
                unsafe { *dst.add(j) = T::from_f32(v) };
            }
        }
    });
}
