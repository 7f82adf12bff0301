//! The tensor view every op takes: a borrowed (pointer, device, dtype, shape, strides) as a
//! DLPack producer exported it, plus the checks ops run on it. Plain Rust: the bindings in
//! `src/py/tensor.rs` build views from Python objects and keep the DLPack capsule alive while
//! the op runs.

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(i32),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    F8E4M3,
    F8E5M2,
    I8,
    U8,
    I32,
    I64,
    F64,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 | DType::F8E5M2 | DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The name torch uses, so messages read like the caller's code.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F8E4M3 => "float8_e4m3fn",
            DType::F8E5M2 => "float8_e5m2",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::F64 => "float64",
            DType::Bool => "bool",
        }
    }

    /// Maps a DLPack (code, bits, lanes) triple; `None` for types no op accepts.
    pub fn from_dlpack(code: u8, bits: u8, lanes: u16) -> Option<DType> {
        if lanes != 1 {
            return None;
        }
        Some(match (code, bits) {
            (2, 32) => DType::F32,
            (2, 16) => DType::F16,
            (4, 16) => DType::BF16,
            (10, 8) => DType::F8E4M3,
            (12, 8) => DType::F8E5M2,
            (0, 8) => DType::I8,
            (1, 8) => DType::U8,
            (0, 32) => DType::I32,
            (0, 64) => DType::I64,
            (2, 64) => DType::F64,
            (6, 8) => DType::Bool,
            _ => return None,
        })
    }
}

/// A borrowed tensor. `ptr` already includes the DLPack byte offset; `strides` are in elements.
#[derive(Debug, Clone)]
pub struct TensorView {
    /// The argument name, used in every error message about this tensor.
    pub name: String,
    pub ptr: usize,
    pub device: Device,
    pub dtype: DType,
    pub shape: Vec<i64>,
    pub strides: Vec<i64>,
}

fn fmt_shape(s: &[i64]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    if parts.len() == 1 {
        format!("({},)", parts[0])
    } else {
        format!("({})", parts.join(", "))
    }
}

impl TensorView {
    /// Builds a view of a host slice (for tests and Rust callers), row-major.
    pub fn from_host<T>(name: &str, data: &[T], dtype: DType, shape: &[i64]) -> TensorView {
        assert_eq!(std::mem::size_of::<T>(), dtype.size());
        assert_eq!(shape.iter().product::<i64>() as usize, data.len());
        TensorView {
            name: name.to_string(),
            ptr: data.as_ptr() as usize,
            device: Device::Cpu,
            dtype,
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
        }
    }

    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    pub fn dim(&self, i: usize) -> usize {
        self.shape[i] as usize
    }

    pub fn stride(&self, i: usize) -> i64 {
        self.strides[i]
    }

    /// `layout` documents the axes, e.g. "(batch, seqlen, heads, head_dim)".
    pub fn expect_rank(&self, rank: usize, layout: &str) -> Result<()> {
        if self.ndim() != rank {
            return Err(Error::Shape(format!(
                "{} must be {}-D {}, got shape {}",
                self.name,
                rank,
                layout,
                fmt_shape(&self.shape)
            )));
        }
        Ok(())
    }

    pub fn expect_dtype(&self, allowed: &[DType]) -> Result<()> {
        if !allowed.contains(&self.dtype) {
            let names: Vec<&str> = allowed.iter().map(|d| d.name()).collect();
            return Err(Error::DType(format!(
                "{} must have dtype {}, got {}",
                self.name,
                names.join(" or "),
                self.dtype.name()
            )));
        }
        Ok(())
    }

    pub fn expect_same_dtype(&self, other: &TensorView) -> Result<()> {
        if self.dtype != other.dtype {
            return Err(Error::DType(format!(
                "{} and {} must have the same dtype, got {} and {}",
                other.name,
                self.name,
                other.dtype.name(),
                self.dtype.name()
            )));
        }
        Ok(())
    }

    pub fn expect_same_device(&self, other: &TensorView) -> Result<()> {
        if self.device != other.device {
            return Err(Error::Device(format!(
                "{} is on {} but {} is on {}; all tensors must be on one device",
                self.name, self.device, other.name, other.device
            )));
        }
        Ok(())
    }

    /// Checks `shape[axis] == want`; `what` names the axis for the message.
    pub fn expect_dim(&self, axis: usize, want: usize, what: &str) -> Result<()> {
        if self.dim(axis) != want {
            return Err(Error::Shape(format!(
                "{} has {} = {} (shape {}), expected {}",
                self.name,
                what,
                self.dim(axis),
                fmt_shape(&self.shape),
                want
            )));
        }
        Ok(())
    }

    pub fn expect_shape(&self, want: &[i64]) -> Result<()> {
        if self.shape != want {
            return Err(Error::Shape(format!(
                "{} must have shape {}, got {}",
                self.name,
                fmt_shape(want),
                fmt_shape(&self.shape)
            )));
        }
        Ok(())
    }

    /// Row-major with no gaps (size-1 dimensions may have any stride).
    pub fn expect_contiguous(&self) -> Result<()> {
        let mut want = 1i64;
        for axis in (0..self.ndim()).rev() {
            if self.shape[axis] > 1 && self.strides[axis] != want {
                return Err(Error::Layout(format!(
                    "{} must be contiguous (row-major), got strides {} for shape {}; call .contiguous() first",
                    self.name,
                    fmt_shape(&self.strides),
                    fmt_shape(&self.shape)
                )));
            }
            want *= self.shape[axis].max(1);
        }
        Ok(())
    }

    /// Kernels read rows as vectors: the last dimension must be contiguous.
    pub fn expect_last_contiguous(&self) -> Result<()> {
        let n = self.ndim();
        if n > 0 && self.shape[n - 1] > 1 && self.strides[n - 1] != 1 {
            return Err(Error::Layout(format!(
                "{} must be contiguous in its last dimension (stride 1), got strides {}; \
                 call .contiguous() first",
                self.name,
                fmt_shape(&self.strides)
            )));
        }
        Ok(())
    }

    /// Outputs must not be broadcast views: a zero stride would make rows overwrite each other.
    pub fn expect_writable_layout(&self) -> Result<()> {
        if let Some(axis) = (0..self.ndim()).find(|&i| self.shape[i] > 1 && self.strides[i] == 0) {
            return Err(Error::Layout(format!(
                "{} has stride 0 in dimension {axis} (a broadcast/expanded view); outputs need \
                 their own memory for every element",
                self.name
            )));
        }
        Ok(())
    }

    /// A kernel that loads `vector_bytes` at a time needs the base pointer and every
    /// stride (except the last) to be multiples of that width.
    pub fn expect_aligned(&self, vector_bytes: usize) -> Result<()> {
        if self.numel() == 0 {
            return Ok(());
        }
        let elem = self.dtype.size();
        if self.ptr % vector_bytes != 0 {
            return Err(Error::Layout(format!(
                "{} data pointer 0x{:x} is not {}-byte aligned, which the kernel's vector loads need; \
                 call .contiguous() or .clone() first",
                self.name, self.ptr, vector_bytes
            )));
        }
        let n = self.ndim();
        for (axis, (&s, &d)) in self.strides.iter().zip(&self.shape).enumerate().take(n.saturating_sub(1)) {
            if d > 1 && (s as i128 * elem as i128) % vector_bytes as i128 != 0 {
                return Err(Error::Layout(format!(
                    "{} stride {} of dimension {} is not a multiple of {} bytes, which the kernel's \
                     vector loads need; call .contiguous() first",
                    self.name, s, axis, vector_bytes
                )));
            }
        }
        Ok(())
    }
}

pub fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    strides
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(shape: &[i64]) -> TensorView {
        TensorView {
            name: "q".into(),
            ptr: 4096,
            device: Device::Cpu,
            dtype: DType::BF16,
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
        }
    }

    #[test]
    fn rank_message_names_argument_and_layout() {
        let e = view(&[2, 16, 8]).expect_rank(4, "(batch, seqlen, heads, head_dim)").unwrap_err();
        assert_eq!(
            e.to_string(),
            "q must be 4-D (batch, seqlen, heads, head_dim), got shape (2, 16, 8)"
        );
    }

    #[test]
    fn alignment_checks_pointer_and_strides() {
        let mut v = view(&[2, 4, 8]);
        assert!(v.expect_aligned(16).is_ok());
        v.ptr += 2;
        assert!(matches!(v.expect_aligned(16), Err(Error::Layout(_))));
        let mut v = view(&[2, 4, 8]);
        v.strides = vec![36, 9, 1];
        assert!(v.expect_aligned(16).unwrap_err().to_string().contains("stride 36"));
    }

    #[test]
    fn last_dim_must_be_contiguous() {
        let mut v = view(&[2, 4, 8]);
        v.strides = vec![64, 1, 8];
        assert!(matches!(v.expect_last_contiguous(), Err(Error::Layout(_))));
    }

    #[test]
    fn dlpack_codes() {
        assert_eq!(DType::from_dlpack(4, 16, 1), Some(DType::BF16));
        assert_eq!(DType::from_dlpack(10, 8, 1), Some(DType::F8E4M3));
        assert_eq!(DType::from_dlpack(2, 64, 1), Some(DType::F64));
        assert_eq!(DType::from_dlpack(5, 64, 1), None);
        assert_eq!(DType::from_dlpack(2, 32, 4), None);
    }
}
