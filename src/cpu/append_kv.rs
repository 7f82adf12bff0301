//! append_kv on the CPU: a rayon task per (sequence, new token) copies K and V rows into the
//! cache, rotating K in f32 when a rotary table is given.

use super::{Element, SharedPtr, host_i32};
use crate::dlpack::{DType, TensorView};
use crate::error::{Error, Result};
use crate::ops::append_kv::{AppendArgs, AppendDims};
use crate::ops::decode::check_tables;
use half::{bf16, f16};
use rayon::prelude::*;

pub fn forward(a: &AppendArgs, d: &AppendDims) -> Result<()> {
    let seqlens = host_i32(a.cache_seqlens);
    let bt = a.block_table.map(host_i32);
    let stride = a.block_table.map_or(0, |t| t.dim(1));
    check_tables(&d.cache, &seqlens, bt.as_deref().map(|b| (b, stride)), d.n_new)?;
    if d.rotary_dim > 0 {
        let last = seqlens.iter().map(|&l| l as usize + d.n_new).max().unwrap_or(0);
        if last > d.positions {
            return Err(Error::Value(format!(
                "rotary cos/sin have {} positions but the new tokens reach position {}",
                d.positions,
                last - 1
            )));
        }
    }
    let locate = |b: usize, pos: usize| match &bt {
        Some(t) => (t[b * stride + pos / d.cache.page_size] as usize, pos % d.cache.page_size),
        None => (b, pos),
    };
    match a.k_new.dtype {
        DType::F16 => run::<f16>(a, d, &seqlens, &locate),
        DType::BF16 => run::<bf16>(a, d, &seqlens, &locate),
        _ => run::<f32>(a, d, &seqlens, &locate),
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

fn run<T: Element>(a: &AppendArgs, d: &AppendDims, seqlens: &[i32], locate: &(dyn Fn(usize, usize) -> (usize, usize) + Sync)) {
    let s3 = |t: &TensorView| [t.stride(0) as isize, t.stride(1) as isize, t.stride(2) as isize];
    let (kn_s, vn_s, k_s, v_s) = (s3(a.k_new), s3(a.v_new), s3(a.k_cache), s3(a.v_cache));
    let (kn, vn, k, v) = (SharedPtr(a.k_new.ptr), SharedPtr(a.v_new.ptr), SharedPtr(a.k_cache.ptr), SharedPtr(a.v_cache.ptr));
    let at = |base: SharedPtr, s: [isize; 3], i0: usize, i1: usize, h: usize| unsafe {
        (base.0 as *mut T).offset(i0 as isize * s[0] + i1 as isize * s[1] + h as isize * s[2])
    };
    let rd = d.rotary_dim;
    (0..d.batch * d.n_new).into_par_iter().for_each(|task| {
        let (b, t) = (task / d.n_new, task % d.n_new);
        let pos = seqlens[b] as usize + t;
        let (page, slot) = locate(b, pos);
        let mut row = vec![0f32; d.head_dim];
        for h in 0..d.heads_kv {
            let (src, dst) = (at(vn, vn_s, b, t, h), at(v, v_s, page, slot, h));
            unsafe { std::ptr::copy_nonoverlapping(src, dst, d.head_dim) };
            let (src, dst) = (at(kn, kn_s, b, t, h), at(k, k_s, page, slot, h));
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
