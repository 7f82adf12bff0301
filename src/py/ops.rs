//! The op entry points. Python (python/ferrokernels/*.py) validates keyword arguments and
//! allocates outputs; these functions import the views, release the GIL and run the op.

use super::errors::to_py;
use super::tensor::{import, import_opt};
use crate::ops::attention::{self, AttentionOptions, CausalAlign};
use pyo3::prelude::*;

/// attention(q, k, v, out, lse, causal, bottom_right, scale, stream)
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse=None, causal=false, bottom_right=true, scale=None, stream=0))]
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
    stream: usize,
) -> PyResult<()> {
    let (q, k, v) = (import(q, "q", stream, false)?, import(k, "k", stream, false)?, import(v, "v", stream, false)?);
    let out = import(out, "out", stream, true)?;
    let lse = import_opt(lse, "lse", stream, true)?;
    let opts = AttentionOptions {
        causal,
        align: if bottom_right { CausalAlign::BottomRight } else { CausalAlign::TopLeft },
        scale,
    };
    py.detach(|| attention::forward(&q.view, &k.view, &v.view, &out.view, lse.as_ref().map(|l| &l.view), &opts, stream))
        .map_err(to_py)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(attention_fwd, m)?)
}
