//! The one error type of the Rust core. The Python bindings map each variant to its own
//! exception class (see `src/py/errors.rs`); messages name the argument and what was expected.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// Wrong rank, shape, or a size the op does not support.
    Shape(String),
    /// Wrong or unsupported dtype.
    DType(String),
    /// Tensors on different devices, or a device the op cannot run on.
    Device(String),
    /// Strides or alignment the kernel cannot read.
    Layout(String),
    /// Any other bad argument value.
    Value(String),
    /// A feature the op does not implement (listed in the README's support table).
    NotImplemented(String),
    /// A CUDA driver call failed, or no usable driver / toolkit was found.
    Cuda(String),
    /// NVRTC rejected a kernel; carries the kernel name and the compiler log.
    Compile { kernel: String, log: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape(m)
            | Error::DType(m)
            | Error::Device(m)
            | Error::Layout(m)
            | Error::Value(m)
            | Error::NotImplemented(m)
            | Error::Cuda(m) => f.write_str(m),
            Error::Compile { kernel, log } => {
                write!(f, "NVRTC failed to compile kernel {kernel}:\n{log}")
            }
        }
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        let name = e.error_name().map(|s| s.to_string_lossy().into_owned());
        let text = e.error_string().map(|s| s.to_string_lossy().into_owned());
        Error::Cuda(format!(
            "CUDA driver error {}: {}",
            name.unwrap_or_else(|_| format!("{:?}", e.0)),
            text.unwrap_or_default()
        ))
    }
}
