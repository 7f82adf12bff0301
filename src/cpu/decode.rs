//! Decode attention on the CPU: one rayon task per (batch, kv head) serves every new token and
//! q head of that group (as the GPU kernel does), reading keys through the block table when the
//! cache is paged. f32 math; scores of one row are materialised (decode rows are short-lived
//! and at most capacity long).

use super::{Element, Rows, host_i32};
use crate::dlpack::{DType, TensorView};
use crate::error::Result;
use crate::ops::decode::{CacheDims, DecodeArgs, DecodeDims, check_tables, table_rows};
use half::{bf16, f16};
use rayon::prelude::*;

pub fn forward(a: &DecodeArgs, d: &DecodeDims) -> Result<()> {
    let tables = CacheTables::load(a.cache_seqlens, a.block_table, &d.cache, 0)?;
    let starts = Starts::load(a.cache_leftpad);
    match a.q.dtype {
        DType::F16 => run::<f16>(a, d, &tables, &starts),
        DType::BF16 => run::<bf16>(a, d, &tables, &starts),
        _ => run::<f32>(a, d, &tables, &starts),
    }
    Ok(())
}

/// `cache_leftpad` on the host: the first key of each (sequence, kv head), clamped into the
/// sequence as the kernel clamps it.
struct Starts {
    values: Vec<i32>,
    per_head: bool,
}

impl Starts {
    fn load(leftpad: Option<&TensorView>) -> Self {
        Starts { values: leftpad.map_or_else(Vec::new, host_i32), per_head: leftpad.is_some_and(|t| t.ndim() == 2) }
    }

    fn of(&self, b: usize, hk: usize, heads_kv: usize, len: usize) -> usize {
        if self.values.is_empty() {
            return 0;
        }
        let at = if self.per_head { b * heads_kv + hk } else { b };
        (self.values[at].max(0) as usize).min(len)
    }
}

/// The lengths and block table of a cache, read from host memory and checked
/// (`ops::decode::check_tables`, with `extra` tokens about to be appended); shared with
/// append_kv.
pub(crate) struct CacheTables {
    pub seqlens: Vec<i32>,
    block_table: Option<Vec<i32>>,
    heads: usize,
    stride: usize,
    page_size: usize,
}

impl CacheTables {
    pub fn load(seqlens: &TensorView, block_table: Option<&TensorView>, cache: &CacheDims, extra: usize) -> Result<Self> {
        let t = CacheTables {
            seqlens: host_i32(seqlens),
            block_table: block_table.map(host_i32),
            heads: block_table.map_or(1, |t| table_rows(t).0),
            stride: block_table.map_or(0, |t| table_rows(t).1),
            page_size: cache.page_size,
        };
        check_tables(cache, &t.seqlens, t.block_table.as_deref().map(|b| (b, t.heads, t.stride)), extra)?;
        Ok(t)
    }

    /// (page or batch index, slot) of key `key` of sequence `b` as kv head `hk` reads it (a
    /// table with one row per sequence serves every head).
    pub fn locate(&self, b: usize, hk: usize, key: usize) -> (usize, usize) {
        let row = if self.heads > 1 { b * self.heads + hk } else { b };
        match &self.block_table {
            Some(bt) => (bt[row * self.stride + key / self.page_size] as usize, key % self.page_size),
            None => (b, key),
        }
    }
}

fn run<T: Element>(a: &DecodeArgs, d: &DecodeDims, tables: &CacheTables, starts: &Starts) {
    let group = d.heads_q / d.heads_kv;
    let (q, k, v, out) = (Rows::of(a.q, false), Rows::of(a.k_cache, false), Rows::of(a.v_cache, false), Rows::of(a.out, false));
    // lse (batch, heads_q, q_len): element (b, hq, i) is "row" hq of "batch" b, column i.
    let lse = a.lse.map(|t| Rows::of(t, false));
    let dim = d.head_dim;
    (0..d.batch * d.heads_kv).into_par_iter().for_each(|task| {
        let (b, hk) = (task / d.heads_kv, task % d.heads_kv);
        let len = tables.seqlens[b] as usize;
        let start = starts.of(b, hk, d.heads_kv, len);
        let mut krow = vec![0f32; dim];
        let mut scores = vec![0f32; len];
        let mut acc = vec![0f32; dim];
        // Key rows of this sequence, located once and reused by every row of the group.
        let rows: Vec<(usize, usize)> = (0..len).map(|key| tables.locate(b, hk, key)).collect();
        for i in 0..d.q_len {
            let (lo, hi) = d.bounds(len, start, i);
            for gi in 0..group {
                let hq = hk * group + gi;
                let qp = q.row::<T>(b, i, hq);
                let qv: Vec<f32> = (0..dim).map(|c| unsafe { (*qp.add(c)).to_f32() }).collect();
                let visible = if lo <= hi { lo as usize..hi as usize + 1 } else { 0..0 };
                let mut m = f32::NEG_INFINITY;
                for key in visible.clone() {
                    let (page, slot) = rows[key];
                    let kp = k.row::<T>(page, slot, hk);
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
                        let vp = v.row::<T>(page, slot, hk);
                        for (c, x) in acc.iter_mut().enumerate() {
                            *x += p * unsafe { (*vp.add(c)).to_f32() };
                        }
                    }
                }
                let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
                let op = out.row::<T>(b, i, hq);
                for (c, x) in acc.iter().enumerate() {
                    unsafe { *op.add(c) = T::from_f32(x * inv) };
                }
                if let Some(lp) = &lse {
                    let value = if l > 0.0 { m + l.ln() } else { f32::NEG_INFINITY };
                    unsafe { *lp.row::<f32>(b, hq, i) = value };
                }
            }
        }
    });
}
