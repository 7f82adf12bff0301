//! The window's attention summed per key and kv head (kernels/window_scores.cu): the scores the
//! attention-based presses of `ferrokernels.kv` rank tokens by, computed tile by tile from the
//! queries' LSE so the (heads, queries, keys) probabilities never exist. The CPU path and the
//! reference are kv.py's torch formula.

use crate::cuda::KernelSource;
use crate::cuda::driver::{self, LaunchConfig};
use crate::dlpack::{DType, TensorView};
use crate::error::{Error, Result};
use crate::ops::attention::{ctype, dtype_name, shape_err};
use std::ffi::c_void;

/// Query rows per chunk (kernels/window_scores.cu: WS_ROWS).
const ROWS: usize = 64;

/// Most window queries with diagonal sums (kernels/window_scores.cu: WS_DIAG_MAX_W).
pub const DIAG_MAX_W: usize = 256;
/// Head dims with a kernel.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];

#[derive(Debug, Clone, Copy)]
pub struct WindowScoresArgs<'a> {
    /// (batch, w, heads_q, D): the last w queries of the prefill, rotated.
    pub q: &'a TensorView,
    /// (batch, n, heads_kv, D), n >= w.
    pub k: &'a TensorView,
    /// float32 (batch, heads_q, w), contiguous: each query's LSE (natural log) over its keys.
    pub lse: &'a TensorView,
    /// float32 (batch, heads_kv, n), contiguous: the output.
    pub out: &'a TensorView,
    /// float32 (batch, heads_kv, n), contiguous, zeroed: the sums per diagonal pos - key are
    /// added to it (heads_q == heads_kv, w <= DIAG_MAX_W).
    pub diag: Option<&'a TensorView>,
    pub scale: f64,
}

/// Mirrors `struct WindowScoresParams` in kernels/window_scores.cu.
#[repr(C)]
struct Params {
    q: u64,
    k: u64,
    lse: u64,
    out: u64,
    diag: u64,
    q_s: [i64; 3],
    k_s: [i64; 3],
    batch: i32,
    n: i32,
    w: i32,
    heads_kv: i32,
    group: i32,
    pad_: i32,
    scale_log2: f32,
    pad2_: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowScoresSpec {
    pub dtype: DType,
    pub head_dim: usize,
    /// Also sums per diagonal.
    pub diag: bool,
}

impl WindowScoresSpec {
    pub fn all() -> Vec<WindowScoresSpec> {
        let mut v = Vec::new();
        for dtype in [DType::F16, DType::BF16] {
            for head_dim in HEAD_DIMS {
                for diag in [false, true] {
                    v.push(WindowScoresSpec { dtype, head_dim, diag });
                }
            }
        }
        v
    }

    pub fn name(&self) -> String {
        let t = dtype_name(self.dtype);
        format!("window_scores_{t}_d{}{}", self.head_dim, if self.diag { "_diag" } else { "" })
    }

    /// Keys per CTA (WindowScoresSmem::KEYS): four warps of two 16-key tiles, one past D = 128.
    pub fn keys_per_cta(&self) -> usize {
        if self.head_dim <= 128 { 128 } else { 64 }
    }

    /// Mirrors WindowScoresSmem: the key tile and two query chunks of padded rows, then the
    /// chunks' LSE and positions, then the diagonal sums.
    pub fn smem_bytes(&self) -> u32 {
        let srow = self.head_dim + 8;
        let diags = if self.diag { (DIAG_MAX_W + self.keys_per_cta()) * 4 } else { 0 };
        ((self.keys_per_cta() + 2 * ROWS) * srow * 2 + 2 * ROWS * 8 + diags) as u32
    }

    pub fn kernel(&self) -> KernelSource {
        let source = format!(
            "#include \"window_scores.cu\"\n\
             extern \"C\" __global__ void __launch_bounds__(32 * WS_WARPS{min_blocks}) {name}(const __grid_constant__ WindowScoresParams p) {{\n\
             \x20   extern __shared__ __align__(16) unsigned char smem_raw[];\n\
             \x20   window_scores<{t}, {d}, {diag}>(p, smem_raw);\n}}\n",
            name = self.name(),
            t = ctype(self.dtype),
            d = self.head_dim,
            diag = self.diag,
            // The diagonal sums' registers: left to itself ptxas held d64 at 128 and spilled.
            min_blocks = if self.diag { ", 1" } else { "" },
        );
        KernelSource::portable(self.name(), source)
    }
}

/// Shapes, dtypes and layouts; returns (batch, n, w, heads_q, heads_kv).
fn check(a: &WindowScoresArgs) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, n, w, hq, hk) = check_window(a.q, a.k)?;
    if a.diag.is_some() && (w > DIAG_MAX_W || hq != hk) {
        return Err(Error::NotImplemented(format!(
            "window_scores sums diagonals for one q head per kv head and at most {DIAG_MAX_W} queries, got {hq} q heads \
             for {hk} kv heads and {w} queries"
        )));
    }
    for (t, shape) in [(a.lse, [b, hq, w]), (a.out, [b, hk, n])].into_iter().chain(a.diag.map(|t| (t, [b, hk, n]))) {
        expect_f32(t, a.q, &shape)?;
    }
    Ok((b, n, w, hq, hk))
}

/// A float32 tensor of `shape`, contiguous, beside `q`.
fn expect_f32(t: &TensorView, q: &TensorView, shape: &[usize]) -> Result<()> {
    t.expect_same_device(q)?;
    t.expect_dtype(&[DType::F32])?;
    t.expect_shape(&shape.iter().map(|&x| x as i64).collect::<Vec<_>>())?;
    t.expect_contiguous()
}

/// The window's queries and the keys: shapes, dtypes and layouts; returns (batch, n, w,
/// heads_q, heads_kv).
fn check_window(q: &TensorView, k: &TensorView) -> Result<(usize, usize, usize, usize, usize)> {
    q.expect_rank(4, "(batch, w, heads_q, head_dim)")?;
    k.expect_rank(4, "(batch, n, heads_kv, head_dim)")?;
    q.expect_dtype(&[DType::F16, DType::BF16])?;
    k.expect_same_dtype(q)?;
    let (b, w, hq, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let (n, hk) = (k.dim(1), k.dim(2));
    if k.dim(0) != b || k.dim(3) != d || hk == 0 || hq % hk != 0 {
        return shape_err(format!(
            "{} {:?} must share {}'s batch and head_dim {:?}, with heads_q a multiple of heads_kv",
            k.name, k.shape, q.name, q.shape
        ));
    }
    if w > n {
        return shape_err(format!("{} has {w} queries for {n} keys in {}: the window sits inside the keys", q.name, k.name));
    }
    if !HEAD_DIMS.contains(&d) {
        return Err(Error::NotImplemented(format!("window_scores has kernels for head_dim {HEAD_DIMS:?}, got {d}")));
    }
    k.expect_same_device(q)?;
    for t in [q, k] {
        t.expect_last_contiguous()?;
        t.expect_aligned(16)?;
    }
    if n > i32::MAX as usize / 2 || b * hk > 65535 {
        return shape_err(format!("{} is too large for the window_scores kernel ({n} keys, {} heads)", k.name, b * hk));
    }
    Ok((b, n, w, hq, hk))
}

/// Fills `a.out` on the GPU.
pub fn forward(a: &WindowScoresArgs, stream: usize) -> Result<()> {
    let (b, n, w, _, hk) = check(a)?;
    if !(a.scale.is_finite() && a.scale > 0.0) {
        return Err(Error::Value(format!("scale must be a positive finite number, got {}", a.scale)));
    }
    if b == 0 || n == 0 || w == 0 || hk == 0 {
        return Ok(());
    }
    // No CPU path here: kv.py scores on the CPU in torch.
    let dev = driver::device_of(a.q, "the window_scores kernel")?;
    let spec = WindowScoresSpec { dtype: a.q.dtype, head_dim: a.q.dim(3), diag: a.diag.is_some() };
    let smem = spec.smem_bytes();
    let f = dev.function(&spec.kernel(), smem)?;
    let mut p = params(a.q, a.k, a.lse.ptr as u64, a.out.ptr as u64, a.diag.map_or(0, |t| t.ptr as u64), a.scale);
    let cfg = LaunchConfig { grid: (n.div_ceil(spec.keys_per_cta()) as u32, (b * hk) as u32, 1), block: (128, 1, 1), smem_bytes: smem };
    dev.launch(f, cfg, stream, &mut [&mut p as *mut Params as *mut c_void])
}

/// The window queries' LSE over their keys (kernels/window_scores.cu: window_lse, then
/// window_lse_merge), when no prefill kept it.
#[derive(Debug, Clone, Copy)]
pub struct WindowLseArgs<'a> {
    /// (batch, w, heads_q, D): the last w queries, at the last w positions of the keys.
    pub q: &'a TensorView,
    /// (batch, n, heads_kv, D), n >= w.
    pub k: &'a TensorView,
    /// float32 (batch, heads_q, w), contiguous: the output, natural log.
    pub lse: &'a TensorView,
    /// float32, at least `lse_workspace_floats` elements: the per-CTA partials.
    pub workspace: &'a TensorView,
    pub scale: f64,
}

impl WindowScoresSpec {
    pub fn lse_name(&self) -> String {
        let t = dtype_name(self.dtype);
        format!("window_lse_{t}_d{}", self.head_dim)
    }

    /// The scores' layout plus the (warp, row) partials of a chunk.
    pub fn lse_smem_bytes(&self) -> u32 {
        WindowScoresSpec { diag: false, ..*self }.smem_bytes() + (4 * ROWS * 8) as u32
    }

    pub fn lse_kernel(&self) -> KernelSource {
        let source = format!(
            "#include \"window_scores.cu\"\n\
             extern \"C\" __global__ void __launch_bounds__(32 * WS_WARPS) {name}(const __grid_constant__ WindowScoresParams p, \
             float2* part) {{\n\
             \x20   extern __shared__ __align__(16) unsigned char smem_raw[];\n\
             \x20   window_lse<{t}, {d}>(p, part, smem_raw);\n}}\n",
            name = self.lse_name(),
            t = ctype(self.dtype),
            d = self.head_dim,
        );
        KernelSource::portable(self.lse_name(), source)
    }
}

/// The one merge kernel of window_lse's partials.
pub fn lse_merge_kernel() -> KernelSource {
    let source = "#include \"window_scores.cu\"\n\
         extern \"C\" __global__ void __launch_bounds__(32 * WS_WARPS) window_lse_merge_f32(const __grid_constant__ \
         WindowScoresParams p, const float2* part, float* lse, int ctas, int keys_per_cta) {\n\
         \x20   window_lse_merge(p, part, lse, ctas, keys_per_cta);\n}\n";
    KernelSource::portable("window_lse_merge_f32".into(), source.into())
}

/// float32 elements of window_lse's workspace: a (max, sum) pair per window row and CTA of keys.
pub fn lse_workspace_floats(batch: usize, n: usize, w: usize, heads_q: usize, head_dim: usize) -> usize {
    let keys = if head_dim <= 128 { 128 } else { 64 };
    2 * batch * heads_q * w * n.div_ceil(keys)
}

/// Fills `a.lse` on the GPU.
pub fn lse_forward(a: &WindowLseArgs, stream: usize) -> Result<()> {
    let (b, n, w, hq, hk) = check_window(a.q, a.k)?;
    expect_f32(a.lse, a.q, &[b, hq, w])?;
    a.workspace.expect_same_device(a.q)?;
    a.workspace.expect_dtype(&[DType::F32])?;
    a.workspace.expect_contiguous()?;
    let need = lse_workspace_floats(b, n, w, hq, a.q.dim(3));
    if (a.workspace.numel() as usize) < need {
        return shape_err(format!("{} has {} floats; window_lse needs {need}", a.workspace.name, a.workspace.numel()));
    }
    if !(a.scale.is_finite() && a.scale > 0.0) {
        return Err(Error::Value(format!("scale must be a positive finite number, got {}", a.scale)));
    }
    if b == 0 || n == 0 || w == 0 || hk == 0 {
        return Ok(());
    }
    let dev = driver::device_of(a.q, "the window_lse kernel")?;
    let spec = WindowScoresSpec { dtype: a.q.dtype, head_dim: a.q.dim(3), diag: false };
    let smem = spec.lse_smem_bytes();
    let f = dev.function(&spec.lse_kernel(), smem)?;
    let mut p = params(a.q, a.k, 0, 0, 0, a.scale);
    let ctas = n.div_ceil(spec.keys_per_cta());
    let mut part = a.workspace.ptr as u64;
    let cfg = LaunchConfig { grid: (ctas as u32, (b * hk) as u32, 1), block: (128, 1, 1), smem_bytes: smem };
    dev.launch(f, cfg, stream, &mut [&mut p as *mut Params as *mut c_void, &mut part as *mut u64 as *mut c_void])?;
    let merge = dev.function(&lse_merge_kernel(), 0)?;
    // window_lse_merge_f32(p, part, lse, ctas, keys_per_cta)
    let (mut lse, mut n_ctas, mut keys) = (a.lse.ptr as u64, ctas as i32, spec.keys_per_cta() as i32);
    let rows = b * hq * w;
    let cfg = LaunchConfig { grid: (rows.div_ceil(4) as u32, 1, 1), block: (128, 1, 1), smem_bytes: 0 };
    dev.launch(
        merge,
        cfg,
        stream,
        &mut [
            &mut p as *mut Params as *mut c_void,
            &mut part as *mut u64 as *mut c_void,
            &mut lse as *mut u64 as *mut c_void,
            &mut n_ctas as *mut i32 as *mut c_void,
            &mut keys as *mut i32 as *mut c_void,
        ],
    )
}

/// The kernels' parameters for queries q and keys k (lse / out / diag: device pointers or 0).
fn params(q: &TensorView, k: &TensorView, lse: u64, out: u64, diag: u64, scale: f64) -> Params {
    let (hq, hk) = (q.dim(2), k.dim(2));
    Params {
        q: q.ptr as u64,
        k: k.ptr as u64,
        lse,
        out,
        diag,
        q_s: [q.stride(0), q.stride(1), q.stride(2)],
        k_s: [k.stride(0), k.stride(1), k.stride(2)],
        batch: q.dim(0) as i32,
        n: k.dim(1) as i32,
        w: q.dim(1) as i32,
        heads_kv: hk as i32,
        group: (hq / hk) as i32,
        pad_: 0,
        scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
        pad2_: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smem_fits_every_gpu_we_target() {
        // sm_80 allows 163 KB per block once opted in.
        for s in WindowScoresSpec::all() {
            assert!(s.smem_bytes() <= 163 * 1024, "{} needs {}", s.name(), s.smem_bytes());
        }
    }
}
