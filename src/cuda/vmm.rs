//! CUDA virtual memory management for `VirtualKVCache` (vAttention): reserve one range of
//! device addresses up front, back it with physical memory chunk by chunk as sequences grow
//! (`cuMemCreate` + `cuMemMap` + `cuMemSetAccess`), and give chunks back when sequences end.
//! Kernels see ordinary contiguous memory; only mapped chunks may be touched.

use super::driver;
use crate::error::{Error, Result};
use cudarc::driver::sys;

fn check(r: sys::CUresult, what: &str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda(format!("{what} failed: {r:?}")))
    }
}

fn prop(ordinal: i32) -> sys::CUmemAllocationProp {
    let mut p: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    p.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    p.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = ordinal;
    p
}

/// A reserved device address range, mapped in chunks of the allocation granularity.
pub struct VirtualBuffer {
    ordinal: i32,
    base: u64,
    reserved: usize,
    chunk: usize,
    /// Physical allocation backing each chunk, if mapped.
    handles: Vec<Option<sys::CUmemGenericAllocationHandle>>,
}

unsafe impl Send for VirtualBuffer {}
unsafe impl Sync for VirtualBuffer {}

impl VirtualBuffer {
    /// Reserves at least `bytes` of address space on device `ordinal` (nothing is mapped yet).
    pub fn reserve(ordinal: i32, bytes: usize) -> Result<VirtualBuffer> {
        let dev = driver::device(ordinal)?;
        if !dev.vmm_supported {
            return Err(Error::Cuda(format!(
                "cuda:{ordinal} ({}) does not support CUDA virtual memory management; use PagedKVCache",
                dev.name
            )));
        }
        dev.make_current()?;
        let p = prop(ordinal);
        let mut chunk = 0usize;
        check(
            unsafe {
                sys::cuMemGetAllocationGranularity(
                    &mut chunk,
                    &p,
                    sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
                )
            },
            "cuMemGetAllocationGranularity",
        )?;
        let reserved = bytes.max(1).div_ceil(chunk) * chunk;
        let mut base: sys::CUdeviceptr = 0;
        check(unsafe { sys::cuMemAddressReserve(&mut base, reserved, chunk, 0, 0) }, "cuMemAddressReserve")?;
        Ok(VirtualBuffer { ordinal, base: base as u64, reserved, chunk, handles: vec![None; reserved / chunk] })
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn reserved(&self) -> usize {
        self.reserved
    }

    pub fn granularity(&self) -> usize {
        self.chunk
    }

    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    pub fn mapped_bytes(&self) -> usize {
        self.handles.iter().filter(|h| h.is_some()).count() * self.chunk
    }

    fn chunks(&self, offset: usize, len: usize, whole_only: bool) -> Result<std::ops::Range<usize>> {
        if offset.checked_add(len).is_none_or(|end| end > self.reserved) {
            return Err(Error::Value(format!(
                "range [{offset}, {offset} + {len}) is outside the {} reserved bytes",
                self.reserved
            )));
        }
        if len == 0 {
            return Ok(0..0);
        }
        Ok(if whole_only {
            offset.div_ceil(self.chunk)..(offset + len) / self.chunk
        } else {
            offset / self.chunk..(offset + len).div_ceil(self.chunk)
        })
    }

    /// Backs every chunk overlapping [offset, offset + len) with physical memory.
    pub fn map(&mut self, offset: usize, len: usize) -> Result<()> {
        let range = self.chunks(offset, len, false)?;
        driver::device(self.ordinal)?.make_current()?;
        let p = prop(self.ordinal);
        let mut access: sys::CUmemAccessDesc = unsafe { std::mem::zeroed() };
        access.location = p.location;
        access.flags = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        for i in range {
            if self.handles[i].is_some() {
                continue;
            }
            let addr = self.base + (i * self.chunk) as u64;
            let mut h: sys::CUmemGenericAllocationHandle = 0;
            check(unsafe { sys::cuMemCreate(&mut h, self.chunk, &p, 0) }, "cuMemCreate (out of GPU memory?)")?;
            let mapped = check(unsafe { sys::cuMemMap(addr, self.chunk, 0, h, 0) }, "cuMemMap")
                .and_then(|_| check(unsafe { sys::cuMemSetAccess(addr, self.chunk, &access, 1) }, "cuMemSetAccess"));
            if let Err(e) = mapped {
                unsafe {
                    sys::cuMemUnmap(addr, self.chunk);
                    sys::cuMemRelease(h);
                }
                return Err(e);
            }
            self.handles[i] = Some(h);
        }
        Ok(())
    }

    /// Releases the chunks lying wholly inside [offset, offset + len). The caller must make sure
    /// no queued kernel still uses them (synchronise first).
    pub fn unmap(&mut self, offset: usize, len: usize) -> Result<()> {
        let range = self.chunks(offset, len, true)?;
        driver::device(self.ordinal)?.make_current()?;
        for i in range {
            if let Some(h) = self.handles[i].take() {
                let addr = self.base + (i * self.chunk) as u64;
                check(unsafe { sys::cuMemUnmap(addr, self.chunk) }, "cuMemUnmap")?;
                check(unsafe { sys::cuMemRelease(h) }, "cuMemRelease")?;
            }
        }
        Ok(())
    }
}

impl Drop for VirtualBuffer {
    fn drop(&mut self) {
        let _ = self.unmap(0, self.reserved);
        unsafe {
            sys::cuMemAddressFree(self.base as sys::CUdeviceptr, self.reserved);
        }
    }
}
