//! pyo3 bindings: the only place pyo3 and DLPack capsules appear.

mod errors;
mod kvcache;
mod ops;
mod runtime;
mod tensor;

use pyo3::prelude::*;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    ops::register(m)?;
    kvcache::register(m)?;
    runtime::register(m)?;
    Ok(())
}
