//! Decode attention on the CPU: one rayon task per (batch, kv head) serves every new token and
//! q head of that group (as the GPU kernel does), reading keys through the block table when the
//! cache is paged. f32 math; scores of one row are materialised (decode rows are short-lived
//! and at most capacity long).

use super::{Element, SharedPtr, host_i32};
use crate::dlpack::{DType, TensorView};
use crate::error::Result;
use crate::ops::decode::{DecodeArgs, DecodeDims, check_tables};
use half::{bf16, f16};
use rayon::prelude::*;

pub fn forward(a: &DecodeArgs, d: &DecodeDims) -> Result<()> {
    let seqlens = host_i32(a.cache_seqlens);
    let bt = a.block_table.map(host_i32);
    let bt_stride = a.block_table.map_or(0, |t| t.dim(1));
    check_tables(&d.cache, &seqlens, bt.as_deref().map(|b| (b, bt_stride)), 0)?;
    let tables = Tables { seqlens: &seqlens, block_table: bt.as_deref(), bt_stride };
    match a.q.dtype {
        DType::F16 => run::<f16>(a, d, &tables),
        DType::BF16 => run::<bf16>(a, d, &tables),
        _ => run::<f32>(a, d, &tables),
    }
    Ok(())
}

struct Tables<'a> {
    seqlens: &'a [i32],
    block_table: Option<&'a [i32]>,
    bt_stride: usize,
}

impl Tables<'_> {
    /// (page or batch index, slot) of key `key` of sequence `b`.
    fn locate(&self, d: &DecodeDims, b: usize, key: usize) -> (usize, usize) {
        match self.block_table {
            Some(bt) => (bt[b * self.bt_stride + key / d.cache.page_size] as usize, key % d.cache.page_size),
            None => (b, key),
        }
    }
}

fn run<T: Element>(a: &DecodeArgs, d: &DecodeDims, tables: &Tables) {
    let group = d.heads_q / d.heads_kv;
    let (q, k, v, out) = (SharedPtr(a.q.ptr), SharedPtr(a.k_cache.ptr), SharedPtr(a.v_cache.ptr), SharedPtr(a.out.ptr));
    let lse = a.lse.map(|t| SharedPtr(t.ptr));
    let s3 = |t: &TensorView| [t.stride(0) as isize, t.stride(1) as isize, t.stride(2) as isize];
    let (qs, ks, vs, os) = (s3(a.q), s3(a.k_cache), s3(a.v_cache), s3(a.out));
    let ls = a.lse.map_or([0; 3], s3);
    let dim = d.head_dim;
    (0..d.batch * d.heads_kv).into_par_iter().for_each(|task| {
        let (b, hk) = (task / d.heads_kv, task % d.heads_kv);
        let len = tables.seqlens[b] as usize;
        let mut krow = vec![0f32; dim];
        let mut scores = vec![0f32; len];
        let mut acc = vec![0f32; dim];
        // Key rows of this sequence, located once and reused by every row of the group.
        let rows: Vec<(usize, usize)> = (0..len).map(|key| tables.locate(d, b, key)).collect();
        let at = |base: SharedPtr, s: [isize; 3], i0: usize, i1: usize, h: usize| unsafe {
            (base.0 as *mut T).offset(i0 as isize * s[0] + i1 as isize * s[1] + h as isize * s[2])
        };
        for i in 0..d.q_len {
            let (lo, hi) = d.bounds(len, i);
            for gi in 0..group {
                let hq = hk * group + gi;
                let qp = at(q, qs, b, i, hq);
                let qv: Vec<f32> = (0..dim).map(|c| unsafe { (*qp.add(c)).to_f32() }).collect();
                let visible = if lo <= hi { lo as usize..hi as usize + 1 } else { 0..0 };
                let mut m = f32::NEG_INFINITY;
                for key in visible.clone() {
                    let (page, slot) = rows[key];
                    let kp = at(k, ks, page, slot, hk);
                    for (c, x) in krow.iter_mut().enumerate() {
                        *x = unsafe { (*kp.add(c)).to_f32() };
                    }
                    let mut s = qv.iter().zip(&krow).map(|(a, b)| a * b).sum::<f32>() * d.scale;
                    if d.softcap > 0.0 {
                        s = d.softcap * (s / d.softcap).tanh();
                    }
                    scores[key] = s;
                    m = m.max(s);
                }
                acc.iter_mut().for_each(|x| *x = 0.0);
                let mut l = 0f32;
                if m > f32::NEG_INFINITY {
                    for key in visible {
                        let p = (scores[key] - m).exp();
                        l += p;
                        let (page, slot) = rows[key];
                        let vp = at(v, vs, page, slot, hk);
                        for (c, x) in acc.iter_mut().enumerate() {
                            *x += p * unsafe { (*vp.add(c)).to_f32() };
                        }
                    }
                }
                let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
                let op = at(out, os, b, i, hq);
                for (c, x) in acc.iter().enumerate() {
                    unsafe { *op.add(c) = T::from_f32(x * inv) };
                }
                if let Some(lp) = lse {
                    let value = if l > 0.0 { m + l.ln() } else { f32::NEG_INFINITY };
                    unsafe {
                        *(lp.0 as *mut f32).offset(b as isize * ls[0] + hq as isize * ls[1] + i as isize * ls[2]) = value;
                    }
                }
            }
        }
    });
}
