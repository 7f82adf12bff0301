//! ferrokernels: attention and GEMM kernels for PyTorch, in Rust + CUDA.
//!
//! The core (`dlpack`, `cuda`, `cpu`, `ops`) is plain Rust; `py` holds the pyo3 bindings and
//! is only built with the `python` feature (maturin turns it on).

pub mod cpu;
pub mod cuda;
pub mod dlpack;
pub mod error;
pub mod kvcache;
pub mod ops;

#[cfg(feature = "python")]
mod py;

#[cfg(feature = "python")]
#[pyo3::pymodule]
fn _native(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    py::register(m)
}
