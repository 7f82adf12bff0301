//! The op entry points. Python (python/ferrokernels/*.py) validates keyword arguments and
//! allocates outputs; these functions import the views, release the GIL and run the op.

use super::errors::to_py;
use super::tensor::{Imported, import, import_opt};
use crate::dlpack::TensorView;
use crate::ops::attention::{self, AttentionArgs, CausalAlign, Varlen};
use pyo3::prelude::*;

/// attention_fwd(q, k, v, out, lse=None, *, causal, bottom_right, scale, window, softcap,
/// alibi, mask, mask_tiles, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, workspace,
/// stream)
///
/// Dense views are 4-D; with cu_seqlens they are packed 3-D (see ops::attention).
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse=None, *, causal=false, bottom_right=true, scale=None,
                    window=(-1, -1), softcap=0.0, alibi=None, mask=None, mask_tiles=None,
                    cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, workspace=None,
                    stream=0))]
#[allow(clippy::too_many_arguments)]
fn attention_fwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: Option<&Bound<'_, PyAny>>,
    causal: bool,
    bottom_right: bool,
    scale: Option<f64>,
    window: (i64, i64),
    softcap: f64,
    alibi: Option<&Bound<'_, PyAny>>,
    mask: Option<&Bound<'_, PyAny>>,
    mask_tiles: Option<&Bound<'_, PyAny>>,
    cu_seqlens_q: Option<&Bound<'_, PyAny>>,
    cu_seqlens_k: Option<&Bound<'_, PyAny>>,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    workspace: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let (q, k, v) = (import(q, "q", stream, false)?, import(k, "k", stream, false)?, import(v, "v", stream, false)?);
    let out = import(out, "out", stream, true)?;
    let lse = import_opt(lse, "lse", stream, true)?;
    let alibi = import_opt(alibi, "alibi_slopes", stream, false)?;
    let mask = import_opt(mask, "attn_mask", stream, false)?;
    let mask_tiles = import_opt(mask_tiles, "mask_tiles", stream, false)?;
    let cu_q = import_opt(cu_seqlens_q, "cu_seqlens_q", stream, false)?;
    let cu_k = import_opt(cu_seqlens_k, "cu_seqlens_k", stream, false)?;
    let workspace = import_opt(workspace, "workspace", stream, true)?;
    let varlen = match (&cu_q, &cu_k) {
        (Some(cq), Some(ck)) => Some(Varlen { cu_seqlens_q: &cq.view, cu_seqlens_k: &ck.view, max_seqlen_q, max_seqlen_k }),
        (None, None) => None,
        _ => return Err(pyo3::exceptions::PyValueError::new_err("cu_seqlens_q and cu_seqlens_k must be given together")),
    };
    let mut args = AttentionArgs::new(&q.view, &k.view, &v.view, &out.view);
    args.lse = view(&lse);
    args.alibi = view(&alibi);
    args.mask = view(&mask);
    args.mask_tiles = view(&mask_tiles);
    args.varlen = varlen;
    args.causal = causal;
    args.align = if bottom_right { CausalAlign::BottomRight } else { CausalAlign::TopLeft };
    args.scale = scale;
    args.window = window;
    args.softcap = softcap;
    args.workspace = view(&workspace);
    py.detach(|| attention::forward(&args, stream)).map_err(to_py)
}

fn view(t: &Option<Imported>) -> Option<&TensorView> {
    t.as_ref().map(|t| &t.view)
}

/// check_seqlens(cu_seqlens, total, max_seqlen, name): raises unless `cu_seqlens` (int32, host
/// memory) is a valid offset list for `total` packed rows. Python copies device offsets here
/// before a varlen launch, outside graph capture.
#[pyfunction]
fn check_seqlens(cu_seqlens: &Bound<'_, PyAny>, total: usize, max_seqlen: usize, name: &str) -> PyResult<()> {
    let cu = import(cu_seqlens, name, 0, false)?;
    let v = &cu.view;
    let check = || -> crate::error::Result<()> {
        attention::expect_cu_seqlens(v)?;
        if v.device != crate::dlpack::Device::Cpu {
            return Err(crate::error::Error::Device(format!("{name} must be in host memory for this check")));
        }
        attention::host_seqlens(v, total, max_seqlen).map(|_| ())
    };
    check().map_err(to_py)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(attention_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(check_seqlens, m)?)
}
