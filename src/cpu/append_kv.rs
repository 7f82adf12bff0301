//! append_kv on the CPU: a rayon task per (sequence, new token) copies K and V rows into the
//! cache, rotating K in f32 when a rotary table is given.

use super::decode::CacheTables;
use super::{Element, Rows};
use crate::dlpack::{DType, TensorView};
use crate::error::{Error, Result};
use crate::ops::append_kv::{AppendArgs, AppendDims};
use half::{bf16, f16};
use rayon::prelude::*;

pub fn forward(a: &AppendArgs, d: &AppendDims) -> Result<()> {
    let tables = CacheTables::load(a.cache_seqlens, a.block_table, &d.cache, d.n_new)?;
    if d.rotary_dim > 0 {
        let last = tables.seqlens.iter().map(|&l| l as usize + d.n_new).max().unwrap_or(0);
        if last > d.positions {
            return Err(Error::Value(format!(
                "rotary cos/sin have {} positions but the new tokens reach position {}",
                d.positions,
                last - 1
            )));
        }
    }
    match a.k_new.dtype {
        DType::F16 => run::<f16>(a, d, &tables),
        DType::BF16 => run::<bf16>(a, d, &tables),
        _ => run::<f32>(a, d, &tables),
    }
    Ok(())
}

fn read_f32(t: &TensorView, row: usize, i: usize) -> f32 {
    let off = row as isize * t.stride(0) as isize + i as isize;
    unsafe {
        match t.dtype {
            DType::F16 => (*(t.ptr as *const f16).offset(off)).to_f32(),
            DType::BF16 => (*(t.ptr as *const bf16).offset(off)).to_f32(),
            _ => *(t.ptr as *const f32).offset(off),
        }
    }
}

fn run<T: Element>(a: &AppendArgs, d: &AppendDims, tables: &CacheTables) {
    let rows = |t| Rows::of(t, false);
    let (kn, vn, k, v) = (rows(a.k_new), rows(a.v_new), rows(a.k_cache), rows(a.v_cache));
    let rd = d.rotary_dim;
    (0..d.batch * d.n_new).into_par_iter().for_each(|task| {
        let (b, t) = (task / d.n_new, task % d.n_new);
        let pos = tables.seqlens[b] as usize + t;
        let (page, slot) = tables.locate(b, 0, pos);
        let mut row = vec![0f32; d.head_dim];
        for h in 0..d.heads_kv {
            let (src, dst) = (vn.row::<T>(b, t, h), v.row::<T>(page, slot, h));
            unsafe { std::ptr::copy_nonoverlapping(src, dst, d.head_dim) };
            let (src, dst) = (kn.row::<T>(b, t, h), k.row::<T>(page, slot, h));
            for (c, x) in row.iter_mut().enumerate() {
                *x = unsafe { (*src.add(c)).to_f32() };
            }
            if let Some(r) = &a.rotary {
                for i in 0..rd / 2 {
                    let (cs, sn) = (read_f32(r.cos, pos, i), read_f32(r.sin, pos, i));
                    let (j0, j1) = if r.interleaved { (2 * i, 2 * i + 1) } else { (i, i + rd / 2) };
                    let (x0, x1) = (row[j0], row[j1]);
                    row[j0] = x0 * cs - x1 * sn;
                    row[j1] = x0 * sn + x1 * cs;
                }
            }
            for (c, x) in row.iter().enumerate() {
                unsafe { *dst.add(c) = T::from_f32(*x) };
            }
        }
    });
}
