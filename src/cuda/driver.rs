//! Driver side: the primary context of each device (the one torch uses), kernel modules loaded
//! from the cache, and launches on the caller's stream. Every driver failure becomes
//! `Error::Cuda` with the driver's own message.

use super::{KernelSource, cache};
use crate::error::{Error, Result};
use cudarc::driver::{result, sys};
use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::sync::{Mutex, OnceLock, RwLock};

fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // cudarc panics if libcuda is missing, so look before the first call.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

/// The CUDA version the driver supports (e.g. 13000), or `None` without a driver.
pub fn driver_version() -> Option<i32> {
    if !driver_present() {
        return None;
    }
    let mut v = 0;
    let r = unsafe { sys::cuDriverGetVersion(&mut v) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
}

fn init() -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        if !driver_present() {
            return Err("no CUDA driver (libcuda.so.1) found on this machine".to_string());
        }
        result::init().map_err(|e| Error::from(e).to_string())
    })
    .clone()
    .map_err(Error::Cuda)
}

pub fn device_count() -> i32 {
    if init().is_err() {
        return 0;
    }
    result::device::get_count().unwrap_or(0)
}

/// A loaded kernel. The handle belongs to a module that lives as long as the process.
#[derive(Clone, Copy)]
pub struct Function(sys::CUfunction);
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

pub struct Device {
    pub ordinal: i32,
    ctx: sys::CUcontext,
    pub name: String,
    pub arch: String,
    pub sm_count: i32,
    pub max_smem_optin: i32,
    /// CUDA virtual memory management (cuMemCreate / cuMemMap) is available.
    pub vmm_supported: bool,
    functions: RwLock<HashMap<String, Function>>,
}
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

/// The NVRTC arch for a compute capability: Hopper gets `sm_90a` so wgmma/setmaxnreg work.
pub fn arch_for(major: i32, minor: i32) -> String {
    if major == 9 { "sm_90a".to_string() } else { format!("sm_{major}{minor}") }
}

static DEVICES: Mutex<Vec<&'static Device>> = Mutex::new(Vec::new());

/// The GPU a tensor lives on, for an op with no CPU path: a CPU tensor is an error saying
/// "`what` runs on CUDA tensors".
pub fn device_of(t: &crate::dlpack::TensorView, what: &str) -> Result<&'static Device> {
    match t.device {
        crate::dlpack::Device::Cuda(o) => device(o),
        crate::dlpack::Device::Cpu => Err(Error::Device(format!("{what} runs on CUDA tensors"))),
    }
}

pub fn device(ordinal: i32) -> Result<&'static Device> {
    init()?;
    let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = devices.iter().find(|d| d.ordinal == ordinal) {
        return Ok(d);
    }
    let count = result::device::get_count()?;
    if ordinal < 0 || ordinal >= count {
        return Err(Error::Device(format!("cuda:{ordinal} does not exist ({count} CUDA devices)")));
    }
    let dev = result::device::get(ordinal)?;
    let attr = |a| unsafe { result::device::get_attribute(dev, a) };
    use sys::CUdevice_attribute::*;
    let (major, minor) = (attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?, attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?);
    if major < 8 {
        return Err(Error::Device(format!("cuda:{ordinal} has compute capability {major}.{minor}; ferrokernels needs 8.0 or newer")));
    }
    let d: &'static Device = Box::leak(Box::new(Device {
        ordinal,
        ctx: unsafe { result::primary_ctx::retain(dev)? },
        name: result::device::get_name(dev)?,
        arch: arch_for(major, minor),
        sm_count: attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        max_smem_optin: attr(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
        vmm_supported: attr(CU_DEVICE_ATTRIBUTE_VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED).unwrap_or(0) != 0,
        functions: RwLock::new(HashMap::new()),
    }));
    devices.push(d);
    Ok(d)
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem_bytes: u32,
}

impl Device {
    pub fn make_current(&self) -> Result<()> {
        unsafe { result::ctx::set_current(self.ctx)? };
        Ok(())
    }

    /// The kernel's function handle, compiling (or reading the disk cache) on first use.
    pub fn function(&self, k: &KernelSource, smem_bytes: u32) -> Result<Function> {
        if let Some(f) = self.functions.read().unwrap_or_else(|e| e.into_inner()).get(&k.name) {
            return Ok(*f);
        }
        let compiled = cache::compile(k, &self.arch)?;
        self.make_current()?;
        let f = unsafe {
            let module = result::module::load_data(compiled.cubin.as_ptr() as *const c_void).map_err(|e| {
                let nv = super::nvrtc::get().map(|n| n.version).unwrap_or((0, 0));
                Error::Cuda(format!("{} (loading {} compiled by NVRTC {}.{} for {}; if the NVRTC is newer than the driver \
                    (CUDA {:?}), the driver is too old: install a toolkit that matches it or set CUDA_HOME)",
                    Error::from(e), k.name, nv.0, nv.1, self.arch, driver_version()))
            })?;
            let name = CString::new(k.name.as_str()).expect("kernel names have no NUL");
            result::module::get_function(module, name)?
        };
        if smem_bytes as i32 > self.max_smem_optin {
            return Err(Error::Value(format!("{} needs {smem_bytes} bytes of shared memory; {} allows {}", k.name, self.name, self.max_smem_optin)));
        }
        unsafe {
            result::function::set_function_attribute(
                f,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes as i32,
            )?;
        }
        let f = Function(f);
        self.functions.write().unwrap_or_else(|e| e.into_inner()).insert(k.name.clone(), f);
        Ok(f)
    }

    /// Zeroes `bytes` bytes at device address `ptr`, ordered on `stream` (captured into a CUDA
    /// graph like a launch).
    pub fn memset_zero(&self, ptr: u64, bytes: usize, stream: usize) -> Result<()> {
        self.make_current()?;
        unsafe { result::memset_d8_async(ptr as sys::CUdeviceptr, 0, bytes, stream as sys::CUstream)? };
        Ok(())
    }

    /// Launches on `stream` (a raw `CUstream`, e.g. `torch.cuda.current_stream().cuda_stream`).
    /// `params` points at each kernel argument, in order.
    pub fn launch(&self, f: Function, cfg: LaunchConfig, stream: usize, params: &mut [*mut c_void]) -> Result<()> {
        self.make_current()?;
        unsafe {
            result::launch_kernel(f.0, cfg.grid, cfg.block, cfg.smem_bytes, stream as sys::CUstream, params)?;
        }
        Ok(())
    }

    /// Launches `f` as a programmatic dependent of the kernel before it on the stream (sm_90):
    /// its CTAs may start once every CTA of that kernel has run `griddepcontrol.launch_dependents`,
    /// and must run `griddepcontrol.wait` before touching what that kernel writes. Work that does
    /// not depend on it (loading weights) overlaps its tail and the launch gap.
    pub fn launch_dependent(&self, f: Function, cfg: LaunchConfig, stream: usize, params: &mut [*mut c_void]) -> Result<()> {
        self.make_current()?;
        // Zeroed: the attribute value is a C union of which one int is set.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid.0,
            gridDimY: cfg.grid.1,
            gridDimZ: cfg.grid.2,
            blockDimX: cfg.block.0,
            blockDimY: cfg.block.1,
            blockDimZ: cfg.block.2,
            sharedMemBytes: cfg.smem_bytes,
            hStream: stream as sys::CUstream,
            attrs: &mut attr,
            numAttrs: 1,
        };
        let r = unsafe { sys::cuLaunchKernelEx(&config, f.0, params.as_mut_ptr(), std::ptr::null_mut()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::Cuda(format!("cuLaunchKernelEx (programmatic dependent launch) failed: {r:?}")));
        }
        Ok(())
    }
}
