//! One Python exception class per error variant; each subclasses the builtin a caller would
//! expect (ValueError for bad shapes, TypeError for dtypes, RuntimeError for CUDA).

use crate::error::Error;
use pyo3::exceptions::{PyNotImplementedError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(ferrokernels, ShapeError, PyValueError, "A tensor has the wrong rank or shape.");
pyo3::create_exception!(ferrokernels, DTypeError, PyTypeError, "A tensor has an unsupported dtype.");
pyo3::create_exception!(ferrokernels, DeviceError, PyValueError, "Tensors are on different or unsupported devices.");
pyo3::create_exception!(ferrokernels, LayoutError, PyValueError, "A tensor's strides or alignment cannot be read by the kernel.");
pyo3::create_exception!(ferrokernels, CudaError, PyRuntimeError, "A CUDA driver call failed.");
pyo3::create_exception!(ferrokernels, CompileError, PyRuntimeError, "NVRTC failed to compile a kernel (the log is in the message).");

pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Shape(_) => ShapeError::new_err(msg),
        Error::DType(_) => DTypeError::new_err(msg),
        Error::Device(_) => DeviceError::new_err(msg),
        Error::Layout(_) => LayoutError::new_err(msg),
        Error::Value(_) => PyValueError::new_err(msg),
        Error::NotImplemented(_) => PyNotImplementedError::new_err(msg),
        Error::Cuda(_) => CudaError::new_err(msg),
        Error::Compile { .. } => CompileError::new_err(msg),
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ShapeError", py.get_type::<ShapeError>())?;
    m.add("DTypeError", py.get_type::<DTypeError>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    m.add("LayoutError", py.get_type::<LayoutError>())?;
    m.add("CudaError", py.get_type::<CudaError>())?;
    m.add("CompileError", py.get_type::<CompileError>())?;
    Ok(())
}
