//! `PagePool` (the page bookkeeping behind PagedKVCache) and `VirtualBuffer` (the CUDA
//! virtual memory behind VirtualKVCache) for python/ferrokernels/kvcache.py.

use super::errors::to_py;
use crate::cuda::vmm;
use crate::error::Error;
use crate::kvcache;
use dlpark::ffi::{DLDataType, DLDataTypeCode, DLDevice, DLManagedTensor};
use dlpark::metadata::Dynamic;
use pyo3::prelude::*;
use std::sync::{Arc, Mutex};

#[pyclass(module = "ferrokernels._native")]
pub struct PagePool(kvcache::PagePool);

#[pymethods]
impl PagePool {
    #[new]
    fn new(num_pages: usize, page_size: usize) -> PyResult<Self> {
        Ok(PagePool(kvcache::PagePool::new(num_pages, page_size).map_err(to_py)?))
    }

    #[getter]
    fn page_size(&self) -> usize {
        self.0.page_size()
    }

    #[getter]
    fn num_pages(&self) -> usize {
        self.0.num_pages()
    }

    #[getter]
    fn free_pages(&self) -> usize {
        self.0.free_pages()
    }

    fn allocate(&mut self) -> u64 {
        self.0.allocate()
    }

    /// Room for n[i] more tokens in sequence ids[i]; returns the (src, dst) page copies to do
    /// before writing (copy-on-write of shared partial pages).
    fn extend(&mut self, ids: Vec<u64>, n: Vec<usize>) -> PyResult<Vec<(u32, u32)>> {
        self.0.extend(&ids, &n).map_err(to_py)
    }

    fn fork(&mut self, id: u64) -> PyResult<u64> {
        self.0.fork(id).map_err(to_py)
    }

    fn free(&mut self, id: u64) -> PyResult<()> {
        self.0.free(id).map_err(to_py)
    }

    fn len(&self, id: u64) -> PyResult<usize> {
        self.0.len(id).map_err(to_py)
    }

    fn pages(&self, id: u64) -> PyResult<Vec<u32>> {
        Ok(self.0.pages(id).map_err(to_py)?.to_vec())
    }

    /// Row-major block table of `ids` (at least `width` pages wide, -1 past each sequence's
    /// pages) and its width.
    fn block_table(&self, ids: Vec<u64>, width: usize) -> PyResult<(Vec<i32>, usize)> {
        self.0.block_table(&ids, width).map_err(to_py)
    }
}

/// A reserved device address range mapped on demand; `tensor()` exports views of it through
/// DLPack (each keeps the reservation alive).
#[pyclass(module = "ferrokernels._native")]
pub struct VirtualBuffer(Arc<Mutex<vmm::VirtualBuffer>>);

impl VirtualBuffer {
    fn with<T>(&self, f: impl FnOnce(&mut vmm::VirtualBuffer) -> crate::error::Result<T>) -> PyResult<T> {
        let mut b = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut b).map_err(to_py)
    }
}

#[pymethods]
impl VirtualBuffer {
    #[new]
    fn new(py: Python<'_>, device: i32, bytes: usize) -> PyResult<Self> {
        let b = py.detach(|| vmm::VirtualBuffer::reserve(device, bytes)).map_err(to_py)?;
        Ok(VirtualBuffer(Arc::new(Mutex::new(b))))
    }

    #[getter]
    fn granularity(&self) -> PyResult<usize> {
        self.with(|b| Ok(b.granularity()))
    }

    #[getter]
    fn reserved(&self) -> PyResult<usize> {
        self.with(|b| Ok(b.reserved()))
    }

    #[getter]
    fn mapped_bytes(&self) -> PyResult<usize> {
        self.with(|b| Ok(b.mapped_bytes()))
    }

    /// Backs [offset, offset + length) with physical memory (whole chunks).
    fn map(&self, offset: usize, length: usize) -> PyResult<()> {
        self.with(|b| b.map(offset, length))
    }

    /// Releases the chunks wholly inside [offset, offset + length).
    fn unmap(&self, offset: usize, length: usize) -> PyResult<()> {
        self.with(|b| b.unmap(offset, length))
    }

    /// A DLPack capsule viewing the buffer from `offset` bytes with `shape`/`strides`
    /// (elements) of dtype float16, bfloat16 or float32.
    fn tensor<'py>(
        &self,
        py: Python<'py>,
        dtype: &str,
        shape: Vec<i64>,
        strides: Vec<i64>,
        offset: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (code, bits) = match dtype {
            "float16" => (DLDataTypeCode::FLOAT, 16u8),
            "bfloat16" => (DLDataTypeCode::BFLOAT, 16),
            "float32" => (DLDataTypeCode::FLOAT, 32),
            other => return Err(to_py(Error::DType(format!("VirtualBuffer tensors are float16, bfloat16 or float32, not {other}")))),
        };
        let (base, reserved, ordinal) = self.with(|b| Ok((b.base(), b.reserved(), b.ordinal())))?;
        let elem = bits as i64 / 8;
        let span: i64 = shape.iter().zip(&strides).map(|(&d, &s)| (d - 1).max(0) * s).sum::<i64>() + 1;
        if shape.len() != strides.len() || strides.iter().any(|&s| s < 0) || offset as i64 + span * elem > reserved as i64 {
            return Err(to_py(Error::Value(format!(
                "a view of shape {shape:?}, strides {strides:?} at byte {offset} does not fit the {reserved} reserved bytes"
            ))));
        }
        let prepared = Dynamic::new(shape, strides)
            .prepare_as::<DLManagedTensor>()
            .map_err(|e| to_py(Error::Value(e.to_string())))?;
        let mut init = prepared.initialize(self.0.clone());
        init.set_device(DLDevice::cuda(ordinal));
        init.set_dtype(DLDataType { code, bits, lanes: 1 });
        init.set_data((base + offset as u64) as *mut std::ffi::c_void);
        let managed = unsafe { init.finish() };
        managed.into_pyobject(py)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PagePool>()?;
    m.add_class::<VirtualBuffer>()
}
