//! CUDA plumbing shared by every op: toolkit discovery, NVRTC, the cubin cache, contexts and
//! launches. Ops describe a kernel as a `KernelSource` (a readable name + a tiny rendered
//! source that instantiates one template) and never touch NVRTC or the driver directly.

pub mod cache;
pub mod driver;
pub mod nvrtc;
pub mod tma;
pub mod toolkit;
pub mod vmm;

/// One specialisation of a kernel template: `name` is both the `extern "C"` symbol and the
/// readable cache-file stem; `source` is complete CUDA C++ that `#include`s the headers below.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelSource {
    pub name: String,
    pub source: String,
    /// The SM versions (inclusive) the source compiles for: (80, u32::MAX) for portable
    /// kernels, (90, 90) for kernels using sm_90a-only instructions (wgmma, setmaxnreg).
    pub sm_range: (u32, u32),
}

impl KernelSource {
    /// A kernel that runs on sm_80 and every later arch.
    pub fn portable(name: String, source: String) -> KernelSource {
        KernelSource { name, source, sm_range: (80, u32::MAX) }
    }

    /// Whether this source targets `arch` ("sm_80", "sm_90a", ...).
    pub fn supports(&self, arch: &str) -> bool {
        let digits: String = arch.chars().filter(|c| c.is_ascii_digit()).collect();
        digits.parse::<u32>().is_ok_and(|sm| sm >= self.sm_range.0 && sm <= self.sm_range.1)
    }
}

/// Our kernel sources, embedded so the wheel needs no data files. Kernels `#include` them by
/// these names; they are part of every cache key.
pub const HEADERS: &[(&str, &str)] = &[
    ("common/types.cuh", include_str!("../../kernels/common/types.cuh")),
    ("common/mma.cuh", include_str!("../../kernels/common/mma.cuh")),
    ("common/block.cuh", include_str!("../../kernels/common/block.cuh")),
    ("common/softmax.cuh", include_str!("../../kernels/common/softmax.cuh")),
    ("common/attention.cuh", include_str!("../../kernels/common/attention.cuh")),
    ("common/hopper.cuh", include_str!("../../kernels/common/hopper.cuh")),
    ("common/wgmma.cuh", include_str!("../../kernels/common/wgmma.cuh")),
    ("common/splitk.cuh", include_str!("../../kernels/common/splitk.cuh")),
    ("common/quant.cuh", include_str!("../../kernels/common/quant.cuh")),
    ("attention.cu", include_str!("../../kernels/attention.cu")),
    ("attention_sm90.cu", include_str!("../../kernels/attention_sm90.cu")),
    ("decode.cu", include_str!("../../kernels/decode.cu")),
    ("kv_quant.cu", include_str!("../../kernels/kv_quant.cu")),
    ("window_scores.cu", include_str!("../../kernels/window_scores.cu")),
    ("kv_select.cu", include_str!("../../kernels/kv_select.cu")),
    ("kv_merge.cu", include_str!("../../kernels/kv_merge.cu")),
    ("append_kv.cu", include_str!("../../kernels/append_kv.cu")),
    ("gemm.cu", include_str!("../../kernels/gemm.cu")),
    ("gemm_w8a8.cu", include_str!("../../kernels/gemm_w8a8.cu")),
    ("quant_attention.cu", include_str!("../../kernels/quant_attention.cu")),
    ("sparse.cu", include_str!("../../kernels/sparse.cu")),
];

/// What ptxas reported for one kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceReport {
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

fn number_before(line: &str, suffix: &str) -> Option<u32> {
    let idx = line.find(suffix)?;
    line[..idx].split_whitespace().last()?.parse().ok()
}

/// Parses the `--ptxas-options=-v` lines of an NVRTC log.
pub fn resource_report(log: &str) -> ResourceReport {
    let mut r = ResourceReport::default();
    for line in log.lines() {
        if let Some(n) = number_before(line, "registers") {
            r.registers = n;
        }
        if let Some(n) = number_before(line, "bytes stack frame") {
            r.stack_bytes = n;
        }
        if let Some(n) = number_before(line, "bytes spill stores") {
            r.spill_stores = n;
        }
        if let Some(n) = number_before(line, "bytes spill loads") {
            r.spill_loads = n;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn arch_ranges() {
        let k = super::KernelSource { name: "k".into(), source: String::new(), sm_range: (90, 90) };
        assert!(k.supports("sm_90a") && !k.supports("sm_80") && !k.supports("sm_100a"));
        assert!(super::KernelSource::portable("p".into(), String::new()).supports("sm_120"));
    }

    #[test]
    fn parses_ptxas_report() {
        let log = "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n\
                   ptxas info    : Function properties for k\n    \
                   16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 168 registers, used 1 barriers, 944 bytes cmem[0]";
        let r = super::resource_report(log);
        assert_eq!((r.registers, r.stack_bytes, r.spill_stores, r.spill_loads), (168, 16, 8, 12));
    }
}
