//! Runtime introspection for `python -m ferrokernels info|warmup` and the compile tests.

use super::errors::to_py;
use crate::cuda::{self, cache, driver, nvrtc, toolkit};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;

/// Registers site-packages folders in which to look for pip-installed CUDA (nvidia/cu13, ...).
#[pyfunction]
fn add_cuda_search_roots(roots: Vec<PathBuf>) {
    toolkit::add_search_roots(&roots);
}

/// Toolkit, driver and cache facts, without compiling anything.
#[pyfunction]
fn runtime_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("cache_dir", cache::cache_dir())?;
    d.set_item("driver_version", driver::driver_version())?;
    d.set_item("device_count", driver::device_count())?;
    match nvrtc::get() {
        Ok(n) => {
            d.set_item("nvrtc_version", format!("{}.{}", n.version.0, n.version.1))?;
            d.set_item("nvrtc_path", &n.toolkit.nvrtc_lib)?;
            d.set_item("toolkit", &n.toolkit.label)?;
            d.set_item("include_dirs", n.toolkit.include_dirs.clone())?;
        }
        Err(e) => d.set_item("nvrtc_error", e.to_string())?,
    }
    Ok(d)
}

/// Name, arch and smem of a device, for info and the bench.
#[pyfunction]
fn device_info(py: Python<'_>, ordinal: i32) -> PyResult<Bound<'_, PyDict>> {
    let dev = driver::device(ordinal).map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("name", &dev.name)?;
    d.set_item("arch", &dev.arch)?;
    d.set_item("sm_count", dev.sm_count)?;
    d.set_item("max_smem_optin", dev.max_smem_optin)?;
    Ok(d)
}

/// The arch NVRTC targets for device `ordinal`.
#[pyfunction]
fn device_arch(ordinal: i32) -> PyResult<String> {
    Ok(driver::device(ordinal).map_err(to_py)?.arch.clone())
}

/// Every kernel variant's name; with `arch`, only those that target it.
#[pyfunction]
#[pyo3(signature = (arch=None))]
fn kernel_names(arch: Option<&str>) -> Vec<String> {
    crate::ops::all_kernels().into_iter().filter(|k| arch.is_none_or(|a| k.supports(a))).map(|k| k.name).collect()
}

/// Compiles (or reads from the cache) one variant for `arch` and returns its resource report.
#[pyfunction]
fn compile_kernel<'py>(py: Python<'py>, name: &str, arch: &str) -> PyResult<Bound<'py, PyDict>> {
    let k = crate::ops::all_kernels()
        .into_iter()
        .find(|k| k.name == name)
        .ok_or_else(|| pyo3::exceptions::PyKeyError::new_err(format!("no kernel named {name}")))?;
    if !k.supports(arch) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "{name} targets sm_{}..sm_{}, not {arch}",
            k.sm_range.0, k.sm_range.1
        )));
    }
    let arch = arch.to_string();
    let compiled = py.detach(|| cache::compile(&k, &arch)).map_err(to_py)?;
    let r = cuda::resource_report(&compiled.log);
    let d = PyDict::new(py);
    d.set_item("name", name)?;
    d.set_item("arch", arch)?;
    d.set_item("cubin_bytes", compiled.cubin.len())?;
    d.set_item("registers", r.registers)?;
    d.set_item("stack_bytes", r.stack_bytes)?;
    d.set_item("spill_stores", r.spill_stores)?;
    d.set_item("spill_loads", r.spill_loads)?;
    d.set_item("log", &compiled.log)?;
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(add_cuda_search_roots, m)?)?;
    m.add_function(wrap_pyfunction!(runtime_info, m)?)?;
    m.add_function(wrap_pyfunction!(device_info, m)?)?;
    m.add_function(wrap_pyfunction!(device_arch, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_names, m)?)?;
    m.add_function(wrap_pyfunction!(compile_kernel, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
