//! KVMerge on the GPU (kernels/kv_merge.cu): each evicted token's most similar kept key, then
//! the score-weighted merge of every token's K and V rows into its slot. No CPU path here: the
//! CPU path and the reference are kv.py's torch `KVMerge`.

use crate::cuda::KernelSource;
use crate::cuda::driver::{self, LaunchConfig};
use crate::dlpack::{DType, TensorView};
use crate::error::Result;
use crate::ops::attention::{ctype, dtype_name, shape_err};
use std::ffi::c_void;

/// Head dims of the match kernel (head_dim is padded up to one of them with zero channels).
const MATCH_DIMS: [usize; 3] = [64, 128, 256];
const KM_BN: usize = 64;
const KM_STAGES: usize = 3;

/// One match kernel: the keys' dtype and the padded head dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchSpec {
    pub dtype: DType,
    pub head_dim: usize,
}

impl MatchSpec {
    pub fn all() -> Vec<MatchSpec> {
        let mut v = Vec::new();
        for dtype in [DType::F16, DType::BF16] {
            for head_dim in MATCH_DIMS {
                v.push(MatchSpec { dtype, head_dim });
            }
        }
        v
    }

    /// m-tiles of 16 evicted rows per warp: two share each B fragment up to D = 128, where
    /// their A fragments (64 registers at D = 128) still fit.
    fn m_tiles(&self) -> usize {
        if self.head_dim <= 128 { 2 } else { 1 }
    }

    /// Evicted rows per CTA (kernels/kv_merge.cu: KvMatchSmem::ROWS).
    pub fn rows_per_cta(&self) -> usize {
        64 * self.m_tiles()
    }

    /// Mirrors KvMatchSmem: the evicted rows, then the kept keys' ring in the same space.
    pub fn smem_bytes(&self) -> u32 {
        (self.rows_per_cta().max(KM_STAGES * KM_BN) * (self.head_dim + 8) * 2) as u32
    }

    pub fn name(&self) -> String {
        format!("kv_merge_match_{}_d{}", dtype_name(self.dtype), self.head_dim)
    }

    pub fn kernel(&self) -> KernelSource {
        let source = format!(
            "#include \"kv_merge.cu\"\n\
             extern \"C\" __global__ void __launch_bounds__(128, {min_blocks}) {name}(const __grid_constant__ KvMatchParams p) {{\n\
             \x20   extern __shared__ __align__(16) unsigned char smem_raw[];\n\
             \x20   kv_merge_match<{t}, {d}, {mt}>(p, smem_raw);\n}}\n",
            name = self.name(),
            t = ctype(self.dtype),
            d = self.head_dim,
            mt = self.m_tiles(),
            // Three CTAs per SM at D <= 128 (<= 170 registers): a 32K layer has ~8 CTAs per SM of work.
            min_blocks = if self.head_dim <= 128 { 3 } else { 1 },
        );
        KernelSource::portable(self.name(), source)
    }
}

/// kv_merge_add / kv_merge_finish for one dtype.
fn merge_kernel(step: &str, dtype: DType) -> KernelSource {
    let name = format!("kv_merge_{step}_{}", dtype_name(dtype));
    let source = format!(
        "#include \"kv_merge.cu\"\n\
         extern \"C\" __global__ void __launch_bounds__(256) {name}(const __grid_constant__ KvMergeParams p) {{\n\
         \x20   kv_merge_{step}<{t}>(p);\n}}\n",
        t = ctype(dtype),
    );
    KernelSource::portable(name, source)
}

pub fn all_kernels() -> Vec<KernelSource> {
    let mut v: Vec<KernelSource> = MatchSpec::all().iter().map(|s| s.kernel()).collect();
    for dtype in [DType::F16, DType::BF16] {
        v.push(merge_kernel("add", dtype));
        v.push(merge_kernel("finish", dtype));
    }
    v
}

/// Mirrors `struct KvMatchParams`.
#[repr(C)]
struct MatchParams {
    k: u64,
    kept: u64,
    evicted: u64,
    inv_norm: u64,
    slot: u64,
    k_sb: i64,
    k_ss: i64,
    k_sh: i64,
    heads_kv: i32,
    n: i32,
    n_kept: i32,
    n_evicted: i32,
    head_dim: i32,
}

/// Each evicted token's most similar kept key (cosine), as its slot in `kept`.
#[derive(Debug, Clone, Copy)]
pub struct MatchArgs<'a> {
    /// (batch, n, heads_kv, head_dim) f16 / bf16, channels contiguous, 16-byte rows.
    pub k: &'a TensorView,
    /// int64 (batch, heads_kv, n_kept), contiguous: positions in [0, n).
    pub kept: &'a TensorView,
    /// int64 (batch, heads_kv, n_evicted), contiguous: positions in [0, n).
    pub evicted: &'a TensorView,
    /// float32 (batch, heads_kv, n_kept), contiguous: 1 / max(|k_j|, eps) of each kept key.
    pub inv_norm: &'a TensorView,
    /// int64 (batch, heads_kv, n_evicted), contiguous: the output.
    pub slot: &'a TensorView,
}

/// Rank-3 (batch, heads_kv, len) contiguous tensor of `dtype` beside `k`; returns len.
fn expect_per_head(t: &TensorView, k: &TensorView, dtype: DType) -> Result<usize> {
    t.expect_same_device(k)?;
    t.expect_dtype(&[dtype])?;
    t.expect_rank(3, "(batch, heads_kv, len)")?;
    t.expect_contiguous()?;
    if t.dim(0) != k.dim(0) || t.dim(1) != k.dim(2) {
        return shape_err(format!("{} {:?} must be (batch, heads_kv, ...) of {} {:?}", t.name, t.shape, k.name, k.shape));
    }
    Ok(t.dim(2))
}

/// Keys or values (batch, n, heads_kv, D): 16-bit, channels contiguous, 16-byte rows.
fn expect_rows(t: &TensorView) -> Result<()> {
    t.expect_rank(4, "(batch, n, heads_kv, head_dim)")?;
    t.expect_dtype(&[DType::F16, DType::BF16])?;
    t.expect_last_contiguous()?;
    t.expect_aligned(16)?;
    if t.dim(3) % 8 != 0 {
        return shape_err(format!("the KVMerge kernels read 16-byte pieces: {}'s head_dim must be a multiple of 8, got {}", t.name, t.dim(3)));
    }
    Ok(())
}

fn strides(t: &TensorView) -> [i64; 3] {
    [t.stride(0), t.stride(1), t.stride(2)]
}

pub fn match_kept(a: &MatchArgs, stream: usize) -> Result<()> {
    expect_rows(a.k)?;
    let (b, n, hk, d) = (a.k.dim(0), a.k.dim(1), a.k.dim(2), a.k.dim(3));
    let n_kept = expect_per_head(a.kept, a.k, DType::I64)?;
    let n_evicted = expect_per_head(a.evicted, a.k, DType::I64)?;
    if expect_per_head(a.inv_norm, a.k, DType::F32)? != n_kept {
        return shape_err(format!("{} {:?} must have one entry per kept token ({n_kept})", a.inv_norm.name, a.inv_norm.shape));
    }
    if expect_per_head(a.slot, a.k, DType::I64)? != n_evicted {
        return shape_err(format!("{} {:?} must have one entry per evicted token ({n_evicted})", a.slot.name, a.slot.shape));
    }
    a.slot.expect_writable_layout()?;
    let Some(&kd) = MATCH_DIMS.iter().find(|&&x| x >= d) else {
        return shape_err(format!("the KVMerge match kernel takes head_dim up to 256, got {d}"));
    };
    if n_kept == 0 && n_evicted > 0 {
        return shape_err(format!("{} is empty: evicted tokens need a kept token to merge into", a.kept.name));
    }
    if b * hk == 0 || n_evicted == 0 {
        return Ok(());
    }
    if n > i32::MAX as usize || b * hk > 65535 {
        return shape_err(format!("{} is too large for the KVMerge match kernel", a.k.name));
    }
    let spec = MatchSpec { dtype: a.k.dtype, head_dim: kd };
    let dev = driver::device_of(a.k, "the KVMerge match kernel")?;
    let smem = spec.smem_bytes();
    let f = dev.function(&spec.kernel(), smem)?;
    let [k_sb, k_ss, k_sh] = strides(a.k);
    let mut p = MatchParams {
        k: a.k.ptr as u64,
        kept: a.kept.ptr as u64,
        evicted: a.evicted.ptr as u64,
        inv_norm: a.inv_norm.ptr as u64,
        slot: a.slot.ptr as u64,
        k_sb,
        k_ss,
        k_sh,
        heads_kv: hk as i32,
        n: n as i32,
        n_kept: n_kept as i32,
        n_evicted: n_evicted as i32,
        head_dim: d as i32,
    };
    let cfg = LaunchConfig { grid: (n_evicted.div_ceil(spec.rows_per_cta()) as u32, (b * hk) as u32, 1), block: (128, 1, 1), smem_bytes: smem };
    dev.launch(f, cfg, stream, &mut [&mut p as *mut MatchParams as *mut c_void])
}

/// Mirrors `struct KvMergeParams`.
#[repr(C)]
struct MergeParams {
    k: u64,
    v: u64,
    slot: u64,
    kept: u64,
    w: u64,
    acc_k: u64,
    acc_v: u64,
    wsum: u64,
    k_out: u64,
    v_out: u64,
    k_s: [i64; 3],
    v_s: [i64; 3],
    ko_s: [i64; 3],
    vo_s: [i64; 3],
    heads_kv: i32,
    n: i32,
    n_kept: i32,
    dk: i32,
    dv: i32,
}

/// The weighted merge of every token into its slot.
#[derive(Debug, Clone, Copy)]
pub struct MergeArgs<'a> {
    /// (batch, n, heads_kv, dk) and (batch, n, heads_kv, dv), one 16-bit dtype.
    pub k: &'a TensorView,
    pub v: &'a TensorView,
    /// int64 (batch, heads_kv, n), contiguous: each token's slot in [0, n_kept).
    pub slot: &'a TensorView,
    /// int64 (batch, heads_kv, n_kept), contiguous: the kept tokens' positions (slot j's own
    /// token is kept[j], and slot[kept[j]] == j).
    pub kept: &'a TensorView,
    /// float32 (batch, heads_kv, n), contiguous: each token's weight, > 0.
    pub w: &'a TensorView,
    /// float32, zeroed, at least batch * heads_kv * n_kept * (dk + dv + 1) elements.
    pub workspace: &'a TensorView,
    /// (batch, n_kept, heads_kv, dk | dv): the merged rows.
    pub k_out: &'a TensorView,
    pub v_out: &'a TensorView,
}

pub fn merge(a: &MergeArgs, stream: usize) -> Result<()> {
    expect_rows(a.k)?;
    expect_rows(a.v)?;
    a.v.expect_same_dtype(a.k)?;
    a.v.expect_same_device(a.k)?;
    let (b, n, hk, dk, dv) = (a.k.dim(0), a.k.dim(1), a.k.dim(2), a.k.dim(3), a.v.dim(3));
    if a.v.dim(0) != b || a.v.dim(1) != n || a.v.dim(2) != hk {
        return shape_err(format!("{} {:?} must match {} {:?} but for head_dim", a.v.name, a.v.shape, a.k.name, a.k.shape));
    }
    if expect_per_head(a.slot, a.k, DType::I64)? != n || expect_per_head(a.w, a.k, DType::F32)? != n {
        return shape_err(format!("{} and {} must be (batch, heads_kv, {n})", a.slot.name, a.w.name));
    }
    let n_kept = expect_per_head(a.kept, a.k, DType::I64)?;
    for (src, dst) in [(a.k, a.k_out), (a.v, a.v_out)] {
        expect_rows(dst)?;
        dst.expect_same_device(a.k)?;
        dst.expect_same_dtype(a.k)?;
        dst.expect_shape(&[b as i64, n_kept as i64, hk as i64, src.dim(3) as i64])?;
        dst.expect_writable_layout()?;
    }
    a.workspace.expect_same_device(a.k)?;
    a.workspace.expect_dtype(&[DType::F32])?;
    a.workspace.expect_contiguous()?;
    let rows = b * hk * n_kept;
    if (a.workspace.numel() as usize) < rows * (dk + dv + 1) {
        return shape_err(format!("{} holds {} floats, the merge needs {}", a.workspace.name, a.workspace.numel(), rows * (dk + dv + 1)));
    }
    if rows == 0 || n == 0 {
        return Ok(());
    }
    if n > i32::MAX as usize || b * hk > 65535 || n_kept * (dk + dv) / 8 > i32::MAX as usize {
        return shape_err(format!("{} is too large for the KVMerge kernels", a.k.name));
    }
    let dev = driver::device_of(a.k, "the KVMerge kernels")?;
    let acc = a.workspace.ptr as u64;
    let mut p = MergeParams {
        k: a.k.ptr as u64,
        v: a.v.ptr as u64,
        slot: a.slot.ptr as u64,
        kept: a.kept.ptr as u64,
        w: a.w.ptr as u64,
        acc_k: acc,
        acc_v: acc + (rows * dk * 4) as u64,
        wsum: acc + (rows * (dk + dv) * 4) as u64,
        k_out: a.k_out.ptr as u64,
        v_out: a.v_out.ptr as u64,
        k_s: strides(a.k),
        v_s: strides(a.v),
        ko_s: strides(a.k_out),
        vo_s: strides(a.v_out),
        heads_kv: hk as i32,
        n: n as i32,
        n_kept: n_kept as i32,
        dk: dk as i32,
        dv: dv as i32,
    };
    let add = dev.function(&merge_kernel("add", a.k.dtype), 0)?;
    let cfg = LaunchConfig { grid: (n.div_ceil(8) as u32, (b * hk) as u32, 1), block: (256, 1, 1), smem_bytes: 0 };
    dev.launch(add, cfg, stream, &mut [&mut p as *mut MergeParams as *mut c_void])?;
    let finish = dev.function(&merge_kernel("finish", a.k.dtype), 0)?;
    let pieces = n_kept * (dk + dv) / 8;
    let cfg = LaunchConfig { grid: (pieces.div_ceil(256) as u32, (b * hk) as u32, 1), block: (256, 1, 1), smem_bytes: 0 };
    dev.launch(finish, cfg, stream, &mut [&mut p as *mut MergeParams as *mut c_void])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_kernels_fit_shared_memory() {
        for s in MatchSpec::all() {
            assert!(s.smem_bytes() <= 163 * 1024, "{} needs {}", s.name(), s.smem_bytes());
        }
    }
}
