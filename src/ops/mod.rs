//! One file per op family: argument checks, kernel choice, launch (GPU) or CPU call.

pub mod append_kv;
pub mod attention;
pub mod decode;
pub mod gemm;
pub mod gemm_w8a8;
pub mod kv_merge;
pub mod kv_quant;
pub mod kv_select;
pub mod quant_attention;
pub mod sparse;
pub mod window_scores;

use crate::cuda::KernelSource;

/// Every kernel specialisation of every op, for `warmup` and the CI compile test.
pub fn all_kernels() -> Vec<KernelSource> {
    let mut v: Vec<KernelSource> = attention::AttentionSpec::all().iter().map(|s| s.kernel()).collect();
    v.extend(attention::AttentionSm90Spec::all().iter().map(|s| s.kernel()));
    v.extend(decode::all_kernels());
    v.extend(kv_quant::all_kernels());
    v.extend(append_kv::AppendSpec::all().iter().map(|s| s.kernel()));
    v.extend(gemm::GemmSpec::all_kernels());
    v.extend(gemm_w8a8::W8A8Spec::all_kernels());
    v.extend(quant_attention::PrepSpec::all_kernels());
    v.push(sparse::select_kernel());
    v.push(sparse::select_warp_kernel());
    v.push(sparse::vs_kernel());
    v.extend(sparse::pool_kernels());
    v.extend(sparse::page_bounds_kernels());
    v.extend(sparse::antidiag_kernels());
    v.push(sparse::strided_kernel());
    v.extend(window_scores::WindowScoresSpec::all().iter().map(|s| s.kernel()));
    v.extend(window_scores::WindowScoresSpec::all().iter().filter(|s| !s.diag).map(|s| s.lse_kernel()));
    v.push(window_scores::lse_merge_kernel());
    v.push(kv_select::topk_kernel());
    v.push(kv_select::gather_kernel());
    v.extend(kv_merge::all_kernels());
    v
}
