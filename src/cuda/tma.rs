//! TMA tensor maps (`CUtensorMap`) for the Hopper kernels: encoded on the host per launch and
//! passed by value in the kernel's parameter block.

use crate::error::{Error, Result};
use cudarc::driver::sys;

/// An encoded CUtensorMap (128 bytes, 64-byte aligned as the kernel parameter expects).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct TensorMap(pub [u64; 16]);

impl TensorMap {
    pub const ZERO: TensorMap = TensorMap([0; 16]);
}

/// A 16-bit (f16/bf16) 4-D tensor with 64-element, 128-byte-swizzled boxes: `dims` innermost
/// first (elements), `strides` of dims 1..3 in elements, `box_dims` innermost first.
/// Elements outside the tensor read as zero. Fails (and callers fall back to another kernel)
/// when TMA cannot address the layout, e.g. strides that are not multiples of 16 bytes.
pub fn tiled_4d_16bit(bf16: bool, ptr: usize, dims: [u64; 4], strides: [i64; 3], box_dims: [u32; 4]) -> Result<TensorMap> {
    let mut byte_strides = [0u64; 3];
    for i in 0..3 {
        // A broadcast axis of size 1 never moves the address; give it any legal stride.
        let s = if dims[i + 1] <= 1 && strides[i] <= 0 { 16 } else { strides[i] };
        if s <= 0 || (s * 2) % 16 != 0 || (s * 2) as u64 >= 1u64 << 40 {
            return Err(Error::Layout(format!("stride {} of axis {} is not addressable by TMA", strides[i], i + 1)));
        }
        byte_strides[i] = (s * 2) as u64;
    }
    let dtype = if bf16 {
        sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
    } else {
        sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16
    };
    encode(dtype, ptr, &dims, &byte_strides, &box_dims)
}

/// A 4-D tensor of bytes (int8 / float8 codes): `dims` innermost first, `byte_strides` of dims
/// 1..3, boxes of `box_dims` whose innermost side is 128 or 64 bytes, swizzled by that much.
pub fn tiled_4d_bytes(ptr: usize, dims: [u64; 4], byte_strides: [u64; 3], box_dims: [u32; 4]) -> Result<TensorMap> {
    for (i, &s) in byte_strides.iter().enumerate() {
        if s % 16 != 0 || s >= 1u64 << 40 {
            return Err(Error::Layout(format!("stride of {s} bytes (axis {}) is not addressable by TMA", i + 1)));
        }
    }
    let swizzle = match box_dims[0] {
        128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        64 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
        w => return Err(Error::Value(format!("byte boxes are 64 or 128 wide, got {w}"))),
    };
    encode_swizzled(sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8, ptr, &dims, &byte_strides, &box_dims, swizzle)
}

/// A 2-D tensor of bytes (int8 / float8 codes): `cols` bytes per row, rows `row_stride` bytes
/// apart, boxes of `box_cols` (at most 128: the swizzle span) x `box_rows`, 128-byte swizzled.
pub fn tiled_2d_bytes(ptr: usize, cols: u64, rows: u64, row_stride: u64, box_cols: u32, box_rows: u32) -> Result<TensorMap> {
    if row_stride % 16 != 0 || row_stride >= 1u64 << 40 {
        return Err(Error::Layout(format!("row stride of {row_stride} bytes is not addressable by TMA")));
    }
    encode(sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8, ptr, &[cols, rows], &[row_stride], &[box_cols, box_rows])
}

/// cuTensorMapEncodeTiled with a 128-byte swizzle and zero fill: `dims` and `box_dims` innermost
/// first, `byte_strides` of dims 1.. in bytes.
fn encode(dtype: sys::CUtensorMapDataType, ptr: usize, dims: &[u64], byte_strides: &[u64], box_dims: &[u32]) -> Result<TensorMap> {
    encode_swizzled(dtype, ptr, dims, byte_strides, box_dims, sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B)
}

/// The same with another swizzle (64 bytes for 64-byte rows).
fn encode_swizzled(
    dtype: sys::CUtensorMapDataType,
    ptr: usize,
    dims: &[u64],
    byte_strides: &[u64],
    box_dims: &[u32],
    swizzle: sys::CUtensorMapSwizzle,
) -> Result<TensorMap> {
    if ptr % 16 != 0 {
        return Err(Error::Layout("TMA needs a 16-byte aligned base".into()));
    }
    let elem_strides = [1u32; 5];
    let mut map = TensorMap::ZERO;
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map as *mut TensorMap as *mut sys::CUtensorMap,
            dtype,
            dims.len() as u32,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            byte_strides.as_ptr(),
            box_dims.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        // Layout, not Cuda: callers treat it as "this kernel cannot read these tensors".
        return Err(Error::Layout(format!("cuTensorMapEncodeTiled refused ({r:?}) dims {dims:?}, byte strides {byte_strides:?}")));
    }
    Ok(map)
}
