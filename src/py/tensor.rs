//! Python object -> `TensorView` through DLPack (dlpark: the C exchange API when the producer
//! has one, else `__dlpack__`). Zero copy; the returned guard keeps the producer's memory
//! alive until the op returns.

use super::errors::{DTypeError, DeviceError};
use crate::dlpack::{DType, Device, TensorView};
use dlpark::python::{DlpackStream, ImportedDlpack, StreamArg, consumer};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::ffi::c_void;

/// We launch on the stream the caller passed (torch's current stream), which is the stream
/// the producer works on, so no cross-stream synchronisation is requested.
struct ConsumerStream(usize);

unsafe impl DlpackStream for ConsumerStream {
    fn as_python_arg(&self, _py: Python<'_>, device: dlpark::ffi::DLDevice) -> PyResult<StreamArg> {
        Ok(if device.device_type == dlpark::ffi::DLDeviceType::CUDA { consumer::stream::no_sync() } else { consumer::stream::none() })
    }

    unsafe fn wait_for_producer(&self, _device: dlpark::ffi::DLDevice, producer: *mut c_void) -> PyResult<bool> {
        Ok(producer as usize == self.0)
    }
}

pub struct Imported {
    pub view: TensorView,
    _owner: ImportedDlpack,
}

pub fn import(obj: &Bound<'_, PyAny>, name: &str, stream: usize, writable: bool) -> PyResult<Imported> {
    if obj.hasattr("__dlpack__").ok() != Some(true) && !obj.get_type().name().is_ok_and(|n| n.to_string().contains("Capsule")) {
        return Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "{name} must be a tensor that supports DLPack (torch.Tensor, numpy.ndarray, ...), got {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
        )));
    }
    let owner = dlpark::python::from_dlpack(obj.as_borrowed(), Some(&ConsumerStream(stream)), None)?;
    if writable && owner.flags().contains(dlpark::DlpackFlags::READ_ONLY) {
        return Err(PyValueError::new_err(format!("{name} is read-only; the op writes into it")));
    }
    let t = owner.validate().map_err(|e| PyValueError::new_err(format!("{name}: invalid DLPack tensor: {e}")))?;
    let dev = t.device();
    let device = match dev.device_type {
        dlpark::ffi::DLDeviceType::CPU | dlpark::ffi::DLDeviceType::CUDAHOST => Device::Cpu,
        dlpark::ffi::DLDeviceType::CUDA => Device::Cuda(dev.device_id),
        other => return Err(DeviceError::new_err(format!("{name} is on DLPack device type {}; ferrokernels runs on CPU and CUDA", other.0))),
    };
    let dt = t.dtype();
    let dtype = DType::from_dlpack(dt.code.0, dt.bits, dt.lanes).ok_or_else(|| {
        DTypeError::new_err(format!(
            "{name} has an unsupported dtype (DLPack code {}, {} bits, {} lanes); supported: float32, float16, \
             bfloat16, float8_e4m3fn, float8_e5m2, int8, uint8, int32, int64, float64, bool",
            dt.code.0, dt.bits, dt.lanes
        ))
    })?;
    let shape = t.shape().to_vec();
    let strides = t.strides_or_compact().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?.into_owned();
    let ptr = unsafe { t.offset_bytes_ptr() }.map_err(|e| PyValueError::new_err(format!("{name}: {e}")))? as usize;
    Ok(Imported { view: TensorView { name: name.to_string(), ptr, device, dtype, shape, strides }, _owner: owner })
}

pub fn import_opt(obj: Option<&Bound<'_, PyAny>>, name: &str, stream: usize, writable: bool) -> PyResult<Option<Imported>> {
    obj.filter(|o| !o.is_none()).map(|o| import(o, name, stream, writable)).transpose()
}
