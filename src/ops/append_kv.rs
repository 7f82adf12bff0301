//! append_kv: writes `n_new` tokens per sequence of K and V into the cache (the layouts of
//! ops::decode) at positions `cache_seqlens[b] + t`, rotating K with a rotary embedding on the
//! way when `cos`/`sin` tables are given. `cache_seqlens` is read, not advanced: the caller adds
//! `n_new` once every layer has appended (a model shares one length vector over its layers).

use crate::cpu;
use crate::cuda::KernelSource;
use crate::cuda::driver::{self, LaunchConfig};
use crate::dlpack::{DType, Device, TensorView};
use crate::error::{Error, Result};
use crate::ops::attention::{batch_strides, ctype, dtype_name, ptr, shape_err};
use crate::ops::decode::{CacheDims, check_cache};
use std::ffi::c_void;

pub const NEW_LAYOUT: &str = "(batch, n_new, heads_kv, head_dim)";

/// Rotary embedding applied to K: `cos`/`sin` are (positions, rotary_dim / 2), indexed by the
/// token's position in its sequence.
#[derive(Debug, Clone, Copy)]
pub struct Rotary<'a> {
    pub cos: &'a TensorView,
    pub sin: &'a TensorView,
    /// GPT-J pairs (2i, 2i + 1) instead of GPT-NeoX halves (i, i + rotary_dim / 2).
    pub interleaved: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct AppendArgs<'a> {
    pub k_new: &'a TensorView,
    pub v_new: &'a TensorView,
    pub k_cache: &'a TensorView,
    pub v_cache: &'a TensorView,
    pub cache_seqlens: &'a TensorView,
    pub block_table: Option<&'a TensorView>,
    pub rotary: Option<Rotary<'a>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendDims {
    pub batch: usize,
    pub n_new: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub cache: CacheDims,
    pub rotary_dim: usize,
    pub positions: usize,
}

pub fn check(a: &AppendArgs) -> Result<AppendDims> {
    let (kn, vn, k) = (a.k_new, a.v_new, a.k_cache);
    for t in [vn, a.k_cache, a.v_cache] {
        t.expect_same_device(kn)?;
    }
    kn.expect_dtype(&[DType::F16, DType::BF16, DType::F32])?;
    for t in [vn, a.k_cache, a.v_cache] {
        t.expect_same_dtype(kn)?;
    }
    kn.expect_rank(4, NEW_LAYOUT)?;
    vn.expect_shape(&kn.shape)?;
    k.expect_rank(4, crate::ops::decode::CACHE_LAYOUT)?;
    let (batch, n_new, heads_kv, head_dim) = (kn.dim(0), kn.dim(1), kn.dim(2), kn.dim(3));
    k.expect_dim(2, heads_kv, "heads_kv (must match k_new)")?;
    k.expect_dim(3, head_dim, "head_dim (must match k_new)")?;
    if head_dim == 0 || head_dim % 8 != 0 {
        return shape_err(format!("k_new has head_dim {head_dim}; it must be a positive multiple of 8"));
    }
    if let Some(bt) = a.block_table.filter(|t| t.ndim() != 2) {
        // A new token's heads share one page: per-head tables are for reading (decode).
        bt.expect_rank(2, "(batch, max_pages)")?;
    }
    let cache = check_cache(k, a.v_cache, a.cache_seqlens, a.block_table, batch)?;
    for t in [kn, vn, a.k_cache, a.v_cache] {
        t.expect_last_contiguous()?;
    }
    for t in [a.k_cache, a.v_cache] {
        t.expect_writable_layout()?;
    }
    let (mut rotary_dim, mut positions) = (0, 0);
    if let Some(r) = &a.rotary {
        for t in [r.cos, r.sin] {
            t.expect_same_device(kn)?;
            t.expect_rank(2, "(positions, rotary_dim / 2)")?;
            t.expect_last_contiguous()?;
            if t.dtype != DType::F32 && t.dtype != kn.dtype {
                return Err(Error::DType(format!(
                    "{} must be float32 or k_new's dtype {}, got {}",
                    t.name,
                    kn.dtype.name(),
                    t.dtype.name()
                )));
            }
        }
        r.sin.expect_shape(&r.cos.shape)?;
        if r.sin.dtype != r.cos.dtype {
            return Err(Error::DType("rotary cos and sin must have the same dtype".into()));
        }
        rotary_dim = 2 * r.cos.dim(1);
        positions = r.cos.dim(0);
        if rotary_dim == 0 || rotary_dim % 16 != 0 || rotary_dim > head_dim {
            return shape_err(format!(
                "rotary cos has {} columns, so rotary_dim {rotary_dim}; it must be a multiple of 16 up to head_dim {head_dim}",
                r.cos.dim(1)
            ));
        }
    }
    Ok(AppendDims { batch, n_new, heads_kv, head_dim, cache, rotary_dim, positions })
}

pub fn forward(a: &AppendArgs, stream: usize) -> Result<()> {
    let d = check(a)?;
    if d.batch == 0 || d.n_new == 0 || d.heads_kv == 0 {
        return Ok(());
    }
    match a.k_new.device {
        Device::Cpu => cpu::append_kv::forward(a, &d),
        Device::Cuda(ordinal) => forward_cuda(ordinal, a, &d, stream),
    }
}

/// One compiled variant per dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AppendSpec {
    pub dtype: DType,
}

impl AppendSpec {
    pub fn all() -> Vec<AppendSpec> {
        vec![AppendSpec { dtype: DType::F16 }, AppendSpec { dtype: DType::BF16 }]
    }

    pub fn name(&self) -> String {
        format!("append_kv_{}", dtype_name(self.dtype))
    }

    pub fn kernel(&self) -> KernelSource {
        let source = format!(
            "#include \"append_kv.cu\"\n\
             extern \"C\" __global__ void __launch_bounds__(256) {name}(const __grid_constant__ AppendParams p) {{\n\
             \x20   append_kv<{t}>(p);\n}}\n",
            name = self.name(),
            t = ctype(self.dtype),
        );
        KernelSource::portable(self.name(), source)
    }
}

/// Mirrors `struct AppendParams` in kernels/append_kv.cu.
#[repr(C)]
struct AppendParams {
    k_new: u64,
    v_new: u64,
    k: u64,
    v: u64,
    seqlens: u64,
    block_table: u64,
    cos: u64,
    sin: u64,
    kn_s: [i64; 3],
    vn_s: [i64; 3],
    k_s: [i64; 3],
    v_s: [i64; 3],
    bt_sb: i64,
    cs_ss: i64,
    batch: i32,
    n_new: i32,
    heads_kv: i32,
    head_dim: i32,
    page_shift: i32,
    capacity: i32,
    num_pages: i32,
    rotary_dim: i32,
    interleaved: i32,
    cs_f32: i32,
    positions: i32,
    pad: i32,
}

fn forward_cuda(ordinal: i32, a: &AppendArgs, d: &AppendDims, stream: usize) -> Result<()> {
    if a.k_new.dtype == DType::F32 {
        return Err(Error::DType("k_new is float32; the CUDA append_kv takes float16 or bfloat16".into()));
    }
    for t in [a.k_new, a.v_new, a.k_cache, a.v_cache] {
        t.expect_aligned(16)?;
    }
    let dev = driver::device(ordinal)?;
    let spec = AppendSpec { dtype: a.k_new.dtype };
    let st = |t: &TensorView| batch_strides(t, false);
    let mut p = AppendParams {
        k_new: a.k_new.ptr as u64,
        v_new: a.v_new.ptr as u64,
        k: a.k_cache.ptr as u64,
        v: a.v_cache.ptr as u64,
        seqlens: a.cache_seqlens.ptr as u64,
        block_table: ptr(a.block_table),
        cos: ptr(a.rotary.map(|r| r.cos)),
        sin: ptr(a.rotary.map(|r| r.sin)),
        kn_s: st(a.k_new),
        vn_s: st(a.v_new),
        k_s: st(a.k_cache),
        v_s: st(a.v_cache),
        bt_sb: a.block_table.map_or(0, |t| t.stride(0)),
        cs_ss: a.rotary.map_or(0, |r| r.cos.stride(0)),
        batch: d.batch as i32,
        n_new: d.n_new as i32,
        heads_kv: d.heads_kv as i32,
        head_dim: d.head_dim as i32,
        page_shift: d.cache.page_shift(),
        capacity: d.cache.capacity as i32,
        num_pages: d.cache.num_pages as i32,
        rotary_dim: d.rotary_dim as i32,
        interleaved: a.rotary.is_some_and(|r| r.interleaved) as i32,
        cs_f32: a.rotary.is_some_and(|r| r.cos.dtype == DType::F32) as i32,
        positions: d.positions as i32,
        pad: 0,
    };
    if a.rotary.is_some_and(|r| r.sin.stride(0) != r.cos.stride(0)) {
        return Err(Error::Layout("rotary cos and sin must have the same row stride".into()));
    }
    let chunks = d.batch * d.n_new * d.heads_kv * (d.head_dim / 8);
    let f = dev.function(&spec.kernel(), 0)?;
    let cfg = LaunchConfig { grid: (chunks.div_ceil(256) as u32, 1, 1), block: (256, 1, 1), smem_bytes: 0 };
    let mut args = [&mut p as *mut AppendParams as *mut c_void];
    dev.launch(f, cfg, stream, &mut args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout_matches_the_kernel_struct() {
        // 8 pointers, 14 i64 strides, 12 i32.
        assert_eq!(std::mem::size_of::<AppendParams>(), 8 * 8 + 14 * 8 + 12 * 4);
    }
}
