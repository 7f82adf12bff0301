//! `PagePool`: the Rust page bookkeeping behind python/ferrokernels/kvcache.py.

use super::errors::to_py;
use crate::kvcache;
use pyo3::prelude::*;

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

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PagePool>()
}
