//! The op entry points. Python (python/ferrokernels/*.py) validates keyword arguments and
//! allocates outputs; these functions import the views, release the GIL and run the op.

use super::errors::to_py;
use super::tensor::{Imported, import, import_opt};
use crate::dlpack::TensorView;
use crate::dlpack::{DType, Device};
use crate::error::Error;
use crate::ops::attention::{self, AttentionArgs, CausalAlign, Varlen};
use crate::ops::append_kv::{self, AppendArgs, Rotary};
use crate::ops::decode::{self, CacheDims, DecodeArgs, DecodeDims};
use crate::ops::gemm::{self, Act, GemmArgs, PackedArgs, Zeros};
use crate::ops::gemm_w8a8::{self, W8A8Args};
use crate::ops::kv_quant::{self, KvFormat, KvQuantArgs};
use crate::ops::kv_merge::{self, MatchArgs, MergeArgs};
use crate::ops::kv_select::{self, GatherArgs};
use crate::ops::quant_attention::{self, PackedSeqs, PrepArgs, QuantArgs};
use crate::ops::sparse::{self, AntidiagArgs, Columns, PageBoundsArgs, SelectArgs, SparseArgs, VsArgs};
use crate::ops::window_scores::WindowScoresArgs;
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

/// sparse_attention_fwd(q, k, v, out, lse, count, index, bitmap, bits, *, scale, workspace,
/// columns, stream): the block-list kernel (see ops::sparse; python/ferrokernels/sparse.py
/// builds the lists). `columns`: (k_cols, v_cols, col_bits) of a vertical-slash mask.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, count, index, bitmap, bits, *, scale=None, workspace=None, columns=None, stream=0))]
#[allow(clippy::too_many_arguments)]
fn sparse_attention_fwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: Option<&Bound<'_, PyAny>>,
    count: &Bound<'_, PyAny>,
    index: &Bound<'_, PyAny>,
    bitmap: &Bound<'_, PyAny>,
    bits: &Bound<'_, PyAny>,
    scale: Option<f64>,
    workspace: Option<&Bound<'_, PyAny>>,
    columns: Option<(Bound<'_, PyAny>, Bound<'_, PyAny>, Bound<'_, PyAny>)>,
    stream: usize,
) -> PyResult<()> {
    let (q, k, v) = (import(q, "q", stream, false)?, import(k, "k", stream, false)?, import(v, "v", stream, false)?);
    let cols = match &columns {
        Some((kc, vc, cb)) => Some((
            import(kc, "block_mask (key columns)", stream, false)?,
            import(vc, "block_mask (value columns)", stream, false)?,
            import(cb, "block_mask (column bits)", stream, false)?,
        )),
        None => None,
    };
    let out = import(out, "out", stream, true)?;
    let lse = import_opt(lse, "lse", stream, true)?;
    let count = import(count, "block_mask (tile counts)", stream, false)?;
    let index = import(index, "block_mask (tile indices)", stream, false)?;
    let bitmap = import(bitmap, "block_mask (tile bitmaps)", stream, false)?;
    let bits = import(bits, "block_mask (bitmap rows)", stream, false)?;
    let workspace = import_opt(workspace, "workspace", stream, true)?;
    let mut attn = AttentionArgs::new(&q.view, &k.view, &v.view, &out.view);
    attn.lse = view(&lse);
    attn.scale = scale;
    attn.workspace = view(&workspace);
    let columns = cols.as_ref().map(|(kc, vc, cb)| Columns { k: &kc.view, v: &vc.view, bits: &cb.view });
    let args = SparseArgs { attn, count: &count.view, index: &index.view, bitmap: &bitmap.view, bits: &bits.view, columns };
    py.detach(|| sparse::forward(&args, stream)).map_err(to_py)
}

/// sparse_select_blocks(scores, count, index, bitmap, *, diag, causal, softmax, top_k,
/// threshold, sink_blocks, local_blocks, stream): estimate_blocks' selection (ops::sparse).
#[pyfunction]
#[pyo3(signature = (scores, count, index, bitmap, *, diag=0, causal=true, softmax=true, top_k=0, threshold=0.9,
                    sink_blocks=1, local_blocks=1, stream=0))]
#[allow(clippy::too_many_arguments)]
fn sparse_select_blocks(
    py: Python<'_>,
    scores: &Bound<'_, PyAny>,
    count: &Bound<'_, PyAny>,
    index: &Bound<'_, PyAny>,
    bitmap: &Bound<'_, PyAny>,
    diag: i64,
    causal: bool,
    softmax: bool,
    top_k: usize,
    threshold: f64,
    sink_blocks: usize,
    local_blocks: usize,
    stream: usize,
) -> PyResult<()> {
    let scores = import(scores, "scores", stream, false)?;
    let count = import(count, "count", stream, true)?;
    let index = import(index, "index", stream, true)?;
    let bitmap = import(bitmap, "bitmap", stream, true)?;
    let args = SelectArgs {
        scores: &scores.view,
        count: &count.view,
        index: &index.view,
        bitmap: &bitmap.view,
        diag,
        causal,
        softmax,
        top_k,
        threshold,
        sink_blocks,
        local_blocks,
    };
    py.detach(|| sparse::select(&args, stream)).map_err(to_py)
}

/// window_scores(q, k, lse, out, *, diag, scale, stream): the window's attention summed per key
/// and kv head, and optionally per diagonal (ops::window_scores).
#[pyfunction]
#[pyo3(signature = (q, k, lse, out, *, diag=None, scale, stream=0))]
#[allow(clippy::too_many_arguments)]
fn window_scores(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    diag: Option<&Bound<'_, PyAny>>,
    scale: f64,
    stream: usize,
) -> PyResult<()> {
    let (q, k) = (import(q, "queries", stream, false)?, import(k, "keys", stream, false)?);
    let lse = import(lse, "lse", stream, false)?;
    let out = import(out, "out", stream, true)?;
    let diag = diag.map(|t| import(t, "diag", stream, true)).transpose()?;
    let args =
        WindowScoresArgs { q: &q.view, k: &k.view, lse: &lse.view, out: &out.view, diag: diag.as_ref().map(|t| &t.view), scale };
    py.detach(|| crate::ops::window_scores::forward(&args, stream)).map_err(to_py)
}

/// window_lse(q, k, lse, workspace, *, scale, stream): the window queries' LSE over their keys
/// (ops::window_scores::lse_forward).
#[pyfunction]
#[pyo3(signature = (q, k, lse, workspace, *, scale, stream=0))]
fn window_lse(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    workspace: &Bound<'_, PyAny>,
    scale: f64,
    stream: usize,
) -> PyResult<()> {
    let (q, k) = (import(q, "queries", stream, false)?, import(k, "keys", stream, false)?);
    let lse = import(lse, "lse", stream, true)?;
    let ws = import(workspace, "workspace", stream, true)?;
    let args = crate::ops::window_scores::WindowLseArgs { q: &q.view, k: &k.view, lse: &lse.view, workspace: &ws.view, scale };
    py.detach(|| crate::ops::window_scores::lse_forward(&args, stream)).map_err(to_py)
}

/// window_lse_workspace(batch, n, w, heads_q, head_dim): float32 elements window_lse needs.
#[pyfunction]
fn window_lse_workspace(batch: usize, n: usize, w: usize, heads_q: usize, head_dim: usize) -> usize {
    crate::ops::window_scores::lse_workspace_floats(batch, n, w, heads_q, head_dim)
}

/// kv_select_topk(scores, index, *, lookup, stream): the k best positions of each row,
/// ascending, or what `lookup` holds at them (ops::kv_select).
#[pyfunction]
#[pyo3(signature = (scores, index, *, lookup=None, stream=0))]
fn kv_select_topk(
    py: Python<'_>,
    scores: &Bound<'_, PyAny>,
    index: &Bound<'_, PyAny>,
    lookup: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let scores = import(scores, "scores", stream, false)?;
    let index = import(index, "index", stream, true)?;
    let lookup = lookup.map(|l| import(l, "lookup", stream, false)).transpose()?;
    py.detach(|| kv_select::topk(&scores.view, &index.view, lookup.as_ref().map(|l| &l.view), stream)).map_err(to_py)
}

/// kv_select_gather(k, v, index, k_out, v_out, *, stream): the kept rows of K and V
/// (ops::kv_select).
#[pyfunction]
#[pyo3(signature = (k, v, index, k_out, v_out, *, stream=0))]
fn kv_select_gather(
    py: Python<'_>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    index: &Bound<'_, PyAny>,
    k_out: &Bound<'_, PyAny>,
    v_out: &Bound<'_, PyAny>,
    stream: usize,
) -> PyResult<()> {
    let (k, v) = (import(k, "keys", stream, false)?, import(v, "values", stream, false)?);
    let index = import(index, "index", stream, false)?;
    let (k_out, v_out) = (import(k_out, "k_out", stream, true)?, import(v_out, "v_out", stream, true)?);
    let args = GatherArgs { k: &k.view, v: &v.view, index: &index.view, k_out: &k_out.view, v_out: &v_out.view };
    py.detach(|| kv_select::gather(&args, stream)).map_err(to_py)
}

/// kv_merge_match(k, kept, evicted, inv_norm, slot, *, stream): each evicted token's most
/// similar kept key (ops::kv_merge).
#[pyfunction]
#[pyo3(signature = (k, kept, evicted, inv_norm, slot, *, stream=0))]
#[allow(clippy::too_many_arguments)]
fn kv_merge_match(
    py: Python<'_>,
    k: &Bound<'_, PyAny>,
    kept: &Bound<'_, PyAny>,
    evicted: &Bound<'_, PyAny>,
    inv_norm: &Bound<'_, PyAny>,
    slot: &Bound<'_, PyAny>,
    stream: usize,
) -> PyResult<()> {
    let k = import(k, "keys", stream, false)?;
    let (kept, evicted) = (import(kept, "kept", stream, false)?, import(evicted, "evicted", stream, false)?);
    let inv_norm = import(inv_norm, "inv_norm", stream, false)?;
    let slot = import(slot, "slot", stream, true)?;
    let args = MatchArgs { k: &k.view, kept: &kept.view, evicted: &evicted.view, inv_norm: &inv_norm.view, slot: &slot.view };
    py.detach(|| kv_merge::match_kept(&args, stream)).map_err(to_py)
}

/// kv_merge_rows(k, v, slot, kept, w, workspace, k_out, v_out, *, stream): every token's K
/// and V rows merged into its slot, weighted (ops::kv_merge).
#[pyfunction]
#[pyo3(signature = (k, v, slot, kept, w, workspace, k_out, v_out, *, stream=0))]
#[allow(clippy::too_many_arguments)]
fn kv_merge_rows(
    py: Python<'_>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    slot: &Bound<'_, PyAny>,
    kept: &Bound<'_, PyAny>,
    w: &Bound<'_, PyAny>,
    workspace: &Bound<'_, PyAny>,
    k_out: &Bound<'_, PyAny>,
    v_out: &Bound<'_, PyAny>,
    stream: usize,
) -> PyResult<()> {
    let (k, v) = (import(k, "keys", stream, false)?, import(v, "values", stream, false)?);
    let (slot, w) = (import(slot, "slot", stream, false)?, import(w, "weights", stream, false)?);
    let kept = import(kept, "kept", stream, false)?;
    let workspace = import(workspace, "workspace", stream, true)?;
    let (k_out, v_out) = (import(k_out, "k_out", stream, true)?, import(v_out, "v_out", stream, true)?);
    let args = MergeArgs {
        k: &k.view,
        v: &v.view,
        slot: &slot.view,
        kept: &kept.view,
        w: &w.view,
        workspace: &workspace.view,
        k_out: &k_out.view,
        v_out: &v_out.view,
    };
    py.detach(|| kv_merge::merge(&args, stream)).map_err(to_py)
}

/// sparse_vs_lists(rel, cols, count, index, bitmap, col_bits, *, key_tiles, r_min, off,
/// stream): vertical_slash's kernel lists (ops::sparse).
#[pyfunction]
#[pyo3(signature = (rel, cols, count, index, bitmap, col_bits, *, key_tiles, r_min, off, stream=0))]
#[allow(clippy::too_many_arguments)]
fn sparse_vs_lists(
    py: Python<'_>,
    rel: &Bound<'_, PyAny>,
    cols: &Bound<'_, PyAny>,
    count: &Bound<'_, PyAny>,
    index: &Bound<'_, PyAny>,
    bitmap: &Bound<'_, PyAny>,
    col_bits: &Bound<'_, PyAny>,
    key_tiles: usize,
    r_min: i64,
    off: i64,
    stream: usize,
) -> PyResult<()> {
    let rel = import(rel, "rel", stream, false)?;
    let cols = import(cols, "cols", stream, false)?;
    let count = import(count, "count", stream, true)?;
    let index = import(index, "index", stream, true)?;
    let bitmap = import(bitmap, "bitmap", stream, true)?;
    let col_bits = import(col_bits, "col_bits", stream, true)?;
    let args = VsArgs {
        rel: &rel.view,
        cols: &cols.view,
        count: &count.view,
        index: &index.view,
        bitmap: &bitmap.view,
        col_bits: &col_bits.view,
        r_min,
        off,
    };
    py.detach(|| sparse::vs_lists(&args, key_tiles, stream)).map_err(to_py)
}

/// sparse_pool_blocks(x, out, *, block, mul, stream): estimate_blocks' mean-pooling of x's
/// token blocks, times mul (ops::sparse).
#[pyfunction]
#[pyo3(signature = (x, out, *, block=128, mul=1.0, stream=0))]
fn sparse_pool_blocks(py: Python<'_>, x: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>, block: usize, mul: f64, stream: usize) -> PyResult<()> {
    let x = import(x, "x", stream, false)?;
    let out = import(out, "out", stream, true)?;
    py.detach(|| sparse::pool(&x.view, &out.view, block, mul, stream)).map_err(to_py)
}

/// sparse_page_bounds(q, page_min, page_max, block_table, cache_seqlens, bounds, new_lens, *,
/// page_size, keep, stream): select_pages' Quest bounds and the selected lengths (ops::sparse).
#[pyfunction]
#[pyo3(signature = (q, page_min, page_max, block_table, cache_seqlens, bounds, new_lens, *, page_size, keep, stream=0))]
#[allow(clippy::too_many_arguments)]
fn sparse_page_bounds(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    page_min: &Bound<'_, PyAny>,
    page_max: &Bound<'_, PyAny>,
    block_table: &Bound<'_, PyAny>,
    cache_seqlens: &Bound<'_, PyAny>,
    bounds: &Bound<'_, PyAny>,
    new_lens: &Bound<'_, PyAny>,
    page_size: usize,
    keep: usize,
    stream: usize,
) -> PyResult<()> {
    let q = import(q, "q", stream, false)?;
    let (pmin, pmax) = (import(page_min, "page_min", stream, false)?, import(page_max, "page_max", stream, false)?);
    let table = import(block_table, "block_table", stream, false)?;
    let seqlens = import(cache_seqlens, "cache_seqlens", stream, false)?;
    let (bounds, new_lens) = (import(bounds, "bounds", stream, true)?, import(new_lens, "new_lens", stream, true)?);
    let args = PageBoundsArgs {
        q: &q.view,
        page_min: &pmin.view,
        page_max: &pmax.view,
        block_table: &table.view,
        seqlens: &seqlens.view,
        bounds: &bounds.view,
        new_lens: &new_lens.view,
        page_size,
        keep,
    };
    py.detach(|| sparse::page_bounds(&args, stream)).map_err(to_py)
}

/// sparse_antidiag_scores(logits, out, *, row0, cols_valid, causal, off, stride, r, scale,
/// stream): estimate_blocks' antidiagonal block scores of a chunk of query blocks (ops::sparse).
#[pyfunction]
#[pyo3(signature = (logits, out, *, row0, cols_valid, causal, off, stride, r, scale, stream=0))]
#[allow(clippy::too_many_arguments)]
fn sparse_antidiag_scores(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    row0: usize,
    cols_valid: usize,
    causal: bool,
    off: i64,
    stride: usize,
    r: usize,
    scale: f64,
    stream: usize,
) -> PyResult<()> {
    let logits = import(logits, "logits", stream, false)?;
    let out = import(out, "out", stream, true)?;
    let args = AntidiagArgs { logits: &logits.view, out: &out.view, row0, cols_valid, causal, off, stride, r, scale };
    py.detach(|| sparse::antidiag(&args, stream)).map_err(to_py)
}

/// sparse_strided_rows(x, out, *, stride, reverse, stream): the antidiagonal matmul's operand
/// layout in one copy (ops::sparse).
#[pyfunction]
#[pyo3(signature = (x, out, *, stride, reverse=false, stream=0))]
fn sparse_strided_rows(py: Python<'_>, x: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>, stride: usize, reverse: bool, stream: usize) -> PyResult<()> {
    let x = import(x, "x", stream, false)?;
    let out = import(out, "out", stream, true)?;
    py.detach(|| sparse::strided_rows(&x.view, &out.view, stride, reverse, stream)).map_err(to_py)
}

/// Both offset tensors or neither.
fn packed_seqs<'a>(q: &'a Option<Imported>, k: &'a Option<Imported>, max_q: usize, max_k: usize) -> PyResult<Option<PackedSeqs<'a>>> {
    match (q, k) {
        (Some(q), Some(k)) => Ok(Some(PackedSeqs { cu_seqlens_q: &q.view, cu_seqlens_k: &k.view, max_seqlen_q: max_q, max_seqlen_k: max_k })),
        (None, None) => Ok(None),
        _ => Err(pyo3::exceptions::PyValueError::new_err("cu_seqlens_q and cu_seqlens_k must be given together")),
    }
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

/// decode_fwd(q, k_cache, v_cache, cache_seqlens, out, lse=None, *, block_table, causal_q,
/// scale, softcap, window, workspace, splits, stream): see ops::decode.
#[pyfunction]
#[pyo3(signature = (q, k_cache, v_cache, cache_seqlens, out, lse=None, *, block_table=None, cache_leftpad=None,
                    causal_q=true, scale=None, softcap=0.0, window=(-1, -1), workspace=None, splits=1, stream=0))]
#[allow(clippy::too_many_arguments)]
fn decode_fwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k_cache: &Bound<'_, PyAny>,
    v_cache: &Bound<'_, PyAny>,
    cache_seqlens: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: Option<&Bound<'_, PyAny>>,
    block_table: Option<&Bound<'_, PyAny>>,
    cache_leftpad: Option<&Bound<'_, PyAny>>,
    causal_q: bool,
    scale: Option<f64>,
    softcap: f64,
    window: (i64, i64),
    workspace: Option<&Bound<'_, PyAny>>,
    splits: usize,
    stream: usize,
) -> PyResult<()> {
    let q = import(q, "q", stream, false)?;
    let k = import(k_cache, "k_cache", stream, false)?;
    let v = import(v_cache, "v_cache", stream, false)?;
    let sl = import(cache_seqlens, "cache_seqlens", stream, false)?;
    let out = import(out, "out", stream, true)?;
    let lse = import_opt(lse, "lse", stream, true)?;
    let bt = import_opt(block_table, "block_table", stream, false)?;
    let lp = import_opt(cache_leftpad, "cache_leftpad", stream, false)?;
    let ws = import_opt(workspace, "workspace", stream, true)?;
    let args = DecodeArgs {
        q: &q.view,
        k_cache: &k.view,
        v_cache: &v.view,
        cache_seqlens: &sl.view,
        block_table: view(&bt),
        cache_leftpad: view(&lp),
        out: &out.view,
        lse: view(&lse),
        workspace: view(&ws),
        causal_q,
        scale,
        softcap,
        window,
        splits,
    };
    py.detach(|| decode::forward(&args, stream)).map_err(to_py)
}

/// decode_plan(device, dtype, batch, q_len, heads_q, heads_kv, head_dim, capacity) ->
/// (splits, workspace_floats) on CUDA device `device` (a CPU call plans one split).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn decode_plan(
    device: i32,
    dtype: &str,
    batch: usize,
    q_len: usize,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    capacity: usize,
) -> PyResult<(usize, usize)> {
    let dtype = if dtype == "float16" { DType::F16 } else { DType::BF16 };
    let d = plan_dims(batch, q_len, heads_q, heads_kv, head_dim, capacity);
    let p = decode::plan_for_device(device, &d, dtype).map_err(to_py)?;
    Ok((p.splits, p.workspace_floats))
}

/// The dims a decode plan depends on (options that do not change the launch left at defaults).
fn plan_dims(batch: usize, q_len: usize, heads_q: usize, heads_kv: usize, head_dim: usize, capacity: usize) -> DecodeDims {
    DecodeDims {
        batch,
        q_len,
        heads_q,
        heads_kv: heads_kv.max(1),
        head_dim,
        cache: CacheDims { page_size: 0, num_pages: 0, capacity },
        window_left: attention::WINDOW_NONE,
        window_right: 0,
        scale: 1.0,
        softcap: 0.0,
    }
}

/// decode_check_tables(cache_seqlens, block_table, capacity, page_size, num_pages, extra=0,
/// cache_leftpad=None): raises unless every length (plus `extra` tokens about to be appended)
/// fits the capacity, every page those keys use is inside the pool and every left padding lies
/// within its sequence. Host tensors; Python copies device tables here before a launch, outside
/// graph capture.
#[pyfunction]
#[pyo3(signature = (cache_seqlens, block_table, capacity, page_size, num_pages, extra=0, cache_leftpad=None))]
fn decode_check_tables(
    cache_seqlens: &Bound<'_, PyAny>,
    block_table: Option<&Bound<'_, PyAny>>,
    capacity: usize,
    page_size: usize,
    num_pages: usize,
    extra: usize,
    cache_leftpad: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let sl = import(cache_seqlens, "cache_seqlens", 0, false)?;
    let bt = import_opt(block_table, "block_table", 0, false)?;
    let lp = import_opt(cache_leftpad, "cache_leftpad", 0, false)?;
    let check = || -> crate::error::Result<()> {
        for t in [Some(&sl), bt.as_ref(), lp.as_ref()].into_iter().flatten() {
            t.view.expect_dtype(&[DType::I32])?;
            if t.view.device != Device::Cpu {
                return Err(Error::Device(format!("{} must be in host memory for this check", t.view.name)));
            }
        }
        let seqlens = crate::cpu::host_i32(&sl.view);
        let table = bt.as_ref().map(|t| crate::cpu::host_i32(&t.view));
        let (heads, stride) = bt.as_ref().map_or((1, 0), |t| decode::table_rows(&t.view));
        let cache = CacheDims { page_size, num_pages, capacity };
        decode::check_tables(&cache, &seqlens, table.as_deref().map(|t| (t, heads, stride)), extra)?;
        match &lp {
            Some(t) => decode::check_leftpad_values(&seqlens, &crate::cpu::host_i32(&t.view), t.view.ndim() == 2),
            None => Ok(()),
        }
    };
    check().map_err(to_py)
}

/// append_kv_fwd(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table=None, *, cos, sin,
/// interleaved, stream): see ops::append_kv.
#[pyfunction]
#[pyo3(signature = (k_new, v_new, k_cache, v_cache, cache_seqlens, block_table=None, *, cos=None, sin=None,
                    interleaved=false, stream=0))]
#[allow(clippy::too_many_arguments)]
fn append_kv_fwd(
    py: Python<'_>,
    k_new: &Bound<'_, PyAny>,
    v_new: &Bound<'_, PyAny>,
    k_cache: &Bound<'_, PyAny>,
    v_cache: &Bound<'_, PyAny>,
    cache_seqlens: &Bound<'_, PyAny>,
    block_table: Option<&Bound<'_, PyAny>>,
    cos: Option<&Bound<'_, PyAny>>,
    sin: Option<&Bound<'_, PyAny>>,
    interleaved: bool,
    stream: usize,
) -> PyResult<()> {
    let kn = import(k_new, "k_new", stream, false)?;
    let vn = import(v_new, "v_new", stream, false)?;
    let k = import(k_cache, "k_cache", stream, true)?;
    let v = import(v_cache, "v_cache", stream, true)?;
    let sl = import(cache_seqlens, "cache_seqlens", stream, false)?;
    let bt = import_opt(block_table, "block_table", stream, false)?;
    let cos = import_opt(cos, "rotary cos", stream, false)?;
    let sin = import_opt(sin, "rotary sin", stream, false)?;
    let rotary = match (&cos, &sin) {
        (Some(c), Some(s)) => Some(Rotary { cos: &c.view, sin: &s.view, interleaved }),
        (None, None) => None,
        _ => return Err(pyo3::exceptions::PyValueError::new_err("rotary needs both cos and sin")),
    };
    let args = AppendArgs {
        k_new: &kn.view,
        v_new: &vn.view,
        k_cache: &k.view,
        v_cache: &v.view,
        cache_seqlens: &sl.view,
        block_table: view(&bt),
        rotary,
    };
    py.detach(|| append_kv::forward(&args, stream)).map_err(to_py)
}

/// gemm_fwd(x, qweight, scales, out, *, zeros, perm, bias, bits, group_size, act, act_scale, stream):
/// out (M, N) = x (M, K) @ W^T (+ bias), W in the canonical quantized layout (ops::gemm).
#[pyfunction]
#[pyo3(signature = (x, qweight, scales, out, *, zeros=None, perm=None, bias=None, bits=4, group_size=128, act="",
                    act_scale=None, stream=0))]
#[allow(clippy::too_many_arguments)]
fn gemm_fwd(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    qweight: &Bound<'_, PyAny>,
    scales: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    zeros: Option<&Bound<'_, PyAny>>,
    perm: Option<&Bound<'_, PyAny>>,
    bias: Option<&Bound<'_, PyAny>>,
    bits: usize,
    group_size: usize,
    act: &str,
    act_scale: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let act = Act::parse(act).map_err(to_py)?;
    let act_scale = import_opt(act_scale, "act_scale", stream, false)?;
    let x = import(x, "x", stream, false)?;
    let qw = import(qweight, "qweight", stream, false)?;
    let s = import(scales, "scales", stream, false)?;
    let out = import(out, "out", stream, true)?;
    let z = import_opt(zeros, "zeros", stream, false)?;
    let p = import_opt(perm, "perm", stream, false)?;
    let b = import_opt(bias, "bias", stream, false)?;
    let args = GemmArgs {
        x: &x.view,
        qweight: &qw.view,
        scales: &s.view,
        zeros: view(&z),
        perm: view(&p),
        bias: view(&b),
        out: &out.view,
        bits,
        group_size,
        act,
        act_scale: view(&act_scale),
    };
    py.detach(|| gemm::forward(&args)).map_err(to_py)
}

/// gemm_packed_fwd(x, w, meta, out, *, bias, workspace, counters, bits, group_size, zeros, stream):
/// the CUDA weight-only GEMM over the packed layout of ferrokernels.gemm.pack (ops::gemm).
#[pyfunction]
#[pyo3(signature = (x, w, meta, out, *, bias=None, workspace=None, counters=None, bits=4, group_size=128,
                    zeros="sym", stream=0))]
#[allow(clippy::too_many_arguments)]
fn gemm_packed_fwd(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    w: &Bound<'_, PyAny>,
    meta: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    bias: Option<&Bound<'_, PyAny>>,
    workspace: Option<&Bound<'_, PyAny>>,
    counters: Option<&Bound<'_, PyAny>>,
    bits: usize,
    group_size: usize,
    zeros: &str,
    stream: usize,
) -> PyResult<()> {
    let zeros = Zeros::parse(zeros).map_err(to_py)?;
    let x = import(x, "x", stream, false)?;
    let w = import(w, "packed weight", stream, false)?;
    let meta = import(meta, "packed scales", stream, false)?;
    let out = import(out, "out", stream, true)?;
    let b = import_opt(bias, "bias", stream, false)?;
    let ws = import_opt(workspace, "workspace", stream, true)?;
    let cnt = import_opt(counters, "counters", stream, true)?;
    let args = PackedArgs {
        x: &x.view,
        w: &w.view,
        meta: &meta.view,
        bias: view(&b),
        out: &out.view,
        workspace: view(&ws),
        counters: view(&cnt),
        bits,
        group_size,
        zeros,
    };
    py.detach(|| gemm::forward_packed(&args, stream)).map_err(to_py)
}

/// gemm_dequantize(w, meta, out, *, bits, group_size, zeros, stream): out (N, K) = the packed
/// weight dequantized (the large-M path: then one dense GEMM).
#[pyfunction]
#[pyo3(signature = (w, meta, out, *, bits=4, group_size=128, zeros="sym", stream=0))]
#[allow(clippy::too_many_arguments)]
fn gemm_dequantize(
    py: Python<'_>,
    w: &Bound<'_, PyAny>,
    meta: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    bits: usize,
    group_size: usize,
    zeros: &str,
    stream: usize,
) -> PyResult<()> {
    let zeros = Zeros::parse(zeros).map_err(to_py)?;
    let w = import(w, "packed weight", stream, false)?;
    let meta = import(meta, "packed scales", stream, false)?;
    let out = import(out, "out", stream, true)?;
    py.detach(|| gemm::dequantize_packed(&w.view, &meta.view, &out.view, bits, zeros, group_size, stream)).map_err(to_py)
}

/// gemm_plan(device, m, n, k, bits, act="") -> (splits, workspace floats, counters) of the
/// CUDA weight-only GEMM, or of the W8A8 one when `act` is "int8" / "fp8".
#[pyfunction]
#[pyo3(signature = (device, m, n, k, bits, act=""))]
fn gemm_plan(device: i32, m: usize, n: usize, k: usize, bits: usize, act: &str) -> PyResult<(usize, usize, usize)> {
    let p = match Act::parse(act).map_err(to_py)? {
        Act::None => gemm::plan_for_device(device, m, n, k, bits),
        _ => gemm_w8a8::plan_for_device(device, m, n, k),
    }
    .map_err(to_py)?;
    Ok((p.splits, p.partial_floats, p.counters))
}

/// gemm_w8a8_fwd(x, qweight, w_scale, out, *, xq, x_scale, bias, act_scale, workspace, counters,
/// act, stream): the Hopper W8A8 GEMM (ops::gemm_w8a8); `xq` (M, K) uint8 and `x_scale` (M,)
/// float32 receive the activation codes and scales.
#[pyfunction]
#[pyo3(signature = (x, qweight, w_scale, out, *, xq, x_scale, bias=None, act_scale=None, workspace=None,
                    counters=None, act="fp8", stream=0))]
#[allow(clippy::too_many_arguments)]
fn gemm_w8a8_fwd(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    qweight: &Bound<'_, PyAny>,
    w_scale: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    xq: &Bound<'_, PyAny>,
    x_scale: &Bound<'_, PyAny>,
    bias: Option<&Bound<'_, PyAny>>,
    act_scale: Option<&Bound<'_, PyAny>>,
    workspace: Option<&Bound<'_, PyAny>>,
    counters: Option<&Bound<'_, PyAny>>,
    act: &str,
    stream: usize,
) -> PyResult<()> {
    let act = Act::parse(act).map_err(to_py)?;
    let x = import(x, "x", stream, false)?;
    let qw = import(qweight, "qweight", stream, false)?;
    let ws = import(w_scale, "w_scale", stream, false)?;
    let out = import(out, "out", stream, true)?;
    let xq = import(xq, "xq", stream, true)?;
    let xs = import(x_scale, "x_scale", stream, true)?;
    let b = import_opt(bias, "bias", stream, false)?;
    let sc = import_opt(act_scale, "act_scale", stream, false)?;
    let wk = import_opt(workspace, "workspace", stream, true)?;
    let cnt = import_opt(counters, "counters", stream, true)?;
    let args = W8A8Args {
        x: &x.view,
        qweight: &qw.view,
        w_scale: &ws.view,
        bias: view(&b),
        out: &out.view,
        xq: &xq.view,
        x_scale: &xs.view,
        act_scale: view(&sc),
        workspace: view(&wk),
        counters: view(&cnt),
        act,
    };
    py.detach(|| gemm_w8a8::forward(&args, stream)).map_err(to_py)
}

/// quant_attention's quantization pre-pass on CUDA tensors: fills the codes, scales and the
/// per-channel vectors (K mean, balance factor, V mean, V scale) the caller allocated.
#[pyfunction]
#[pyo3(signature = (q, k, v, *, stats, channels, q_codes, q_scale, k_codes, k_scale, v_codes, q_post,
                    v_lo=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                    smooth_k=true, smooth_v=false, balance=true, stream=0))]
#[allow(clippy::too_many_arguments)]
fn quant_attention_prepare(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    stats: &Bound<'_, PyAny>,
    channels: &Bound<'_, PyAny>,
    q_codes: &Bound<'_, PyAny>,
    q_scale: &Bound<'_, PyAny>,
    k_codes: &Bound<'_, PyAny>,
    k_scale: &Bound<'_, PyAny>,
    v_codes: &Bound<'_, PyAny>,
    q_post: f32,
    v_lo: Option<&Bound<'_, PyAny>>,
    cu_seqlens_q: Option<&Bound<'_, PyAny>>,
    cu_seqlens_k: Option<&Bound<'_, PyAny>>,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    smooth_k: bool,
    smooth_v: bool,
    balance: bool,
    stream: usize,
) -> PyResult<()> {
    let q = import(q, "q", stream, false)?;
    let k = import(k, "k", stream, false)?;
    let v = import(v, "v", stream, false)?;
    let st = import(stats, "stats", stream, true)?;
    let ch = import(channels, "channels", stream, true)?;
    let qc = import(q_codes, "q_codes", stream, true)?;
    let qs = import(q_scale, "q_scale", stream, true)?;
    let kc = import(k_codes, "k_codes", stream, true)?;
    let ks = import(k_scale, "k_scale", stream, true)?;
    let vc = import(v_codes, "v_codes", stream, true)?;
    let vl = import_opt(v_lo, "v_lo", stream, true)?;
    let (cq, ck) = (import_opt(cu_seqlens_q, "cu_seqlens_q", stream, false)?, import_opt(cu_seqlens_k, "cu_seqlens_k", stream, false)?);
    let args = PrepArgs {
        q: &q.view,
        k: &k.view,
        v: &v.view,
        stats: &st.view,
        channels: &ch.view,
        q_codes: &qc.view,
        q_scale: &qs.view,
        k_codes: &kc.view,
        k_scale: &ks.view,
        v_codes: &vc.view,
        v_lo: view(&vl),
        varlen: packed_seqs(&cq, &ck, max_seqlen_q, max_seqlen_k)?,
        q_post,
        smooth_k,
        smooth_v,
        balance,
    };
    py.detach(|| quant_attention::prepare(&args, stream)).map_err(to_py)
}

/// quant_attention's kernel on the pre-pass's codes (see ops::quant_attention::QuantArgs).
#[pyfunction]
#[pyo3(signature = (q_codes, k_codes, v_codes, q_scale, k_scale, channels, out, lse=None, *, v_lo=None,
                    cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, causal=false,
                    workspace=None, stream=0))]
#[allow(clippy::too_many_arguments)]
fn quant_attention_fwd(
    py: Python<'_>,
    q_codes: &Bound<'_, PyAny>,
    k_codes: &Bound<'_, PyAny>,
    v_codes: &Bound<'_, PyAny>,
    q_scale: &Bound<'_, PyAny>,
    k_scale: &Bound<'_, PyAny>,
    channels: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: Option<&Bound<'_, PyAny>>,
    v_lo: Option<&Bound<'_, PyAny>>,
    cu_seqlens_q: Option<&Bound<'_, PyAny>>,
    cu_seqlens_k: Option<&Bound<'_, PyAny>>,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    causal: bool,
    workspace: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let qc = import(q_codes, "q_codes", stream, false)?;
    let vl = import_opt(v_lo, "v_lo", stream, false)?;
    let (cq, ck) = (import_opt(cu_seqlens_q, "cu_seqlens_q", stream, false)?, import_opt(cu_seqlens_k, "cu_seqlens_k", stream, false)?);
    let kc = import(k_codes, "k_codes", stream, false)?;
    let vc = import(v_codes, "v_codes", stream, false)?;
    let qs = import(q_scale, "q_scale", stream, false)?;
    let ks = import(k_scale, "k_scale", stream, false)?;
    let ch = import(channels, "channels", stream, false)?;
    let out = import(out, "out", stream, true)?;
    let lse = import_opt(lse, "lse", stream, true)?;
    let ws = import_opt(workspace, "workspace", stream, true)?;
    let args = QuantArgs {
        q_codes: &qc.view,
        k_codes: &kc.view,
        v_codes: &vc.view,
        v_lo: view(&vl),
        q_scale: &qs.view,
        k_scale: &ks.view,
        channels: &ch.view,
        out: &out.view,
        lse: view(&lse),
        varlen: packed_seqs(&cq, &ck, max_seqlen_q, max_seqlen_k)?,
        causal,
        workspace: view(&ws),
    };
    py.detach(|| quant_attention::forward(&args, stream)).map_err(to_py)
}

/// kv_quant_decode_fwd(q, k_codes, v_codes, k_meta, v_meta, cache_seqlens, quant_lens, out,
/// lse=None, *, k_res, v_res, format, group, causal_q, scale, softcap, window, workspace, splits,
/// stream): see ops::kv_quant.
#[pyfunction]
#[pyo3(signature = (q, k_codes, v_codes, k_meta, v_meta, cache_seqlens, quant_lens, out, lse=None, *,
                    k_res=None, v_res=None, format="int8", group=32, causal_q=true, scale=None, softcap=0.0,
                    window=(-1, -1), workspace=None, splits=1, stream=0))]
#[allow(clippy::too_many_arguments)]
fn kv_quant_decode_fwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k_codes: &Bound<'_, PyAny>,
    v_codes: &Bound<'_, PyAny>,
    k_meta: &Bound<'_, PyAny>,
    v_meta: &Bound<'_, PyAny>,
    cache_seqlens: &Bound<'_, PyAny>,
    quant_lens: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: Option<&Bound<'_, PyAny>>,
    k_res: Option<&Bound<'_, PyAny>>,
    v_res: Option<&Bound<'_, PyAny>>,
    format: &str,
    group: usize,
    causal_q: bool,
    scale: Option<f64>,
    softcap: f64,
    window: (i64, i64),
    workspace: Option<&Bound<'_, PyAny>>,
    splits: usize,
    stream: usize,
) -> PyResult<()> {
    let format = KvFormat::parse(format).map_err(to_py)?;
    let q = import(q, "q", stream, false)?;
    let kc = import(k_codes, "k_codes", stream, false)?;
    let vc = import(v_codes, "v_codes", stream, false)?;
    let km = import(k_meta, "k_meta", stream, false)?;
    let vm = import(v_meta, "v_meta", stream, false)?;
    let sl = import(cache_seqlens, "cache_seqlens", stream, false)?;
    let ql = import(quant_lens, "quant_lens", stream, false)?;
    let out = import(out, "out", stream, true)?;
    let lse = import_opt(lse, "lse", stream, true)?;
    let kr = import_opt(k_res, "k_res", stream, false)?;
    let vr = import_opt(v_res, "v_res", stream, false)?;
    let ws = import_opt(workspace, "workspace", stream, true)?;
    let args = KvQuantArgs {
        q: &q.view,
        k_codes: &kc.view,
        v_codes: &vc.view,
        k_meta: &km.view,
        v_meta: &vm.view,
        k_res: view(&kr),
        v_res: view(&vr),
        cache_seqlens: &sl.view,
        quant_lens: &ql.view,
        out: &out.view,
        lse: view(&lse),
        workspace: view(&ws),
        format,
        group,
        causal_q,
        scale,
        softcap,
        window,
        splits,
    };
    py.detach(|| kv_quant::forward(&args, stream)).map_err(to_py)
}

/// kv_quant_plan(device, dtype, format, batch, q_len, heads_q, heads_kv, head_dim, capacity) ->
/// (splits, workspace_floats).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn kv_quant_plan(
    device: i32,
    dtype: &str,
    format: &str,
    batch: usize,
    q_len: usize,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    capacity: usize,
) -> PyResult<(usize, usize)> {
    let format = KvFormat::parse(format).map_err(to_py)?;
    let dtype = if dtype == "float16" { DType::F16 } else { DType::BF16 };
    let d = plan_dims(batch, q_len, heads_q, heads_kv, head_dim, capacity);
    let p = kv_quant::plan_for_device(device, &d, dtype, format).map_err(to_py)?;
    Ok((p.splits, p.workspace_floats))
}

/// kv_quant_check_lengths(cache_seqlens, quant_lens, capacity, res_cap): host int32 tensors.
#[pyfunction]
fn kv_quant_check_lengths(
    cache_seqlens: &Bound<'_, PyAny>,
    quant_lens: &Bound<'_, PyAny>,
    capacity: usize,
    res_cap: usize,
) -> PyResult<()> {
    let sl = import(cache_seqlens, "cache_seqlens", 0, false)?;
    let ql = import(quant_lens, "quant_lens", 0, false)?;
    let check = || -> crate::error::Result<()> {
        for t in [&sl, &ql] {
            t.view.expect_dtype(&[DType::I32])?;
            if t.view.device != Device::Cpu {
                return Err(Error::Device(format!("{} must be in host memory for this check", t.view.name)));
            }
        }
        kv_quant::check_lengths(&crate::cpu::host_i32(&sl.view), &crate::cpu::host_i32(&ql.view), capacity, res_cap)
    };
    check().map_err(to_py)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quant_attention_prepare, m)?)?;
    m.add_function(wrap_pyfunction!(quant_attention_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(gemm_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(gemm_packed_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(gemm_plan, m)?)?;
    m.add_function(wrap_pyfunction!(gemm_w8a8_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(gemm_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(append_kv_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(attention_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_attention_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_select_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(window_scores, m)?)?;
    m.add_function(wrap_pyfunction!(window_lse, m)?)?;
    m.add_function(wrap_pyfunction!(window_lse_workspace, m)?)?;
    m.add_function(wrap_pyfunction!(kv_select_topk, m)?)?;
    m.add_function(wrap_pyfunction!(kv_select_gather, m)?)?;
    m.add_function(wrap_pyfunction!(kv_merge_match, m)?)?;
    m.add_function(wrap_pyfunction!(kv_merge_rows, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_vs_lists, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_pool_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_page_bounds, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_antidiag_scores, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_strided_rows, m)?)?;
    m.add_function(wrap_pyfunction!(check_seqlens, m)?)?;
    m.add_function(wrap_pyfunction!(decode_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(decode_plan, m)?)?;
    m.add_function(wrap_pyfunction!(kv_quant_decode_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(kv_quant_plan, m)?)?;
    m.add_function(wrap_pyfunction!(kv_quant_check_lengths, m)?)?;
    m.add_function(wrap_pyfunction!(decode_check_tables, m)?)
}
