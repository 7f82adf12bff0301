//! A small NVRTC binding loaded from an explicit path (see `toolkit.rs` for why), and the one
//! function that turns CUDA C++ into a cubin for a named arch. Needs no GPU.

use super::toolkit::{self, Toolkit};
use crate::error::{Error, Result};
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::OnceLock;

type Prog = *mut c_void;
type Res = c_int;

struct Api {
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> Res,
    create: unsafe extern "C" fn(*mut Prog, *const c_char, *const c_char, c_int, *const *const c_char, *const *const c_char) -> Res,
    compile: unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> Res,
    log_size: unsafe extern "C" fn(Prog, *mut usize) -> Res,
    log: unsafe extern "C" fn(Prog, *mut c_char) -> Res,
    cubin_size: unsafe extern "C" fn(Prog, *mut usize) -> Res,
    cubin: unsafe extern "C" fn(Prog, *mut c_char) -> Res,
    destroy: unsafe extern "C" fn(*mut Prog) -> Res,
    error_string: unsafe extern "C" fn(Res) -> *const c_char,
}

pub struct Nvrtc {
    api: Api,
    pub version: (i32, i32),
    pub toolkit: Toolkit,
    _lib: libloading::Library,
}

// The function pointers are plain C entry points; NVRTC is thread-safe per program.
unsafe impl Send for Nvrtc {}
unsafe impl Sync for Nvrtc {}

fn load(toolkit: &Toolkit) -> std::result::Result<Nvrtc, String> {
    unsafe {
        let lib = libloading::Library::new(&toolkit.nvrtc_lib)
            .map_err(|e| format!("{}: {e}", toolkit.nvrtc_lib.display()))?;
        macro_rules! sym {
            ($name:literal) => {
                *lib.get(concat!($name, "\0").as_bytes())
                    .map_err(|e| format!("{}: missing {}: {e}", toolkit.nvrtc_lib.display(), $name))?
            };
        }
        let api = Api {
            version: sym!("nvrtcVersion"),
            create: sym!("nvrtcCreateProgram"),
            compile: sym!("nvrtcCompileProgram"),
            log_size: sym!("nvrtcGetProgramLogSize"),
            log: sym!("nvrtcGetProgramLog"),
            cubin_size: sym!("nvrtcGetCUBINSize"),
            cubin: sym!("nvrtcGetCUBIN"),
            destroy: sym!("nvrtcDestroyProgram"),
            error_string: sym!("nvrtcGetErrorString"),
        };
        let (mut major, mut minor) = (0, 0);
        if (api.version)(&mut major, &mut minor) != 0 {
            return Err(format!("{}: nvrtcVersion failed", toolkit.nvrtc_lib.display()));
        }
        Ok(Nvrtc { api, version: (major, minor), toolkit: toolkit.clone(), _lib: lib })
    }
}

/// Picks the first toolkit whose NVRTC is no newer than the driver (cubins from a newer NVRTC
/// may not load); with no driver (a CPU machine compiling for CI) the first that loads.
fn select() -> std::result::Result<Nvrtc, String> {
    let driver = super::driver::driver_version();
    let mut tried = Vec::new();
    let mut too_new = None;
    for t in toolkit::candidates() {
        match load(&t) {
            Ok(n) => {
                let v = n.version.0 * 1000 + n.version.1 * 10;
                match driver {
                    Some(d) if v > d => {
                        tried.push(format!("{} is NVRTC {}.{}, newer than the driver's CUDA {}.{}",
                            t.label, n.version.0, n.version.1, d / 1000, (d % 1000) / 10));
                        too_new.get_or_insert(n);
                    }
                    _ => return Ok(n),
                }
            }
            Err(e) => tried.push(e),
        }
    }
    if let Some(n) = too_new {
        // Better a clear load error later than no compiler at all.
        return Ok(n);
    }
    Err(format!(
        "no CUDA toolkit with NVRTC found. Searched CUDA_HOME, CUDA_PATH, /usr/local/cuda and the \
         nvidia/cu13 (or cu12) folders of site-packages that `pip install torch` installs. {}",
        if tried.is_empty() { String::new() } else { format!("Tried: {}", tried.join("; ")) }
    ))
}

static NVRTC: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();

pub fn get() -> Result<&'static Nvrtc> {
    NVRTC.get_or_init(select).as_ref().map_err(|e| Error::Cuda(e.clone()))
}

/// A compiled kernel image and the compiler's log (ptxas resource report included).
#[derive(Debug, Clone)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

impl Nvrtc {
    fn err(&self, r: Res) -> String {
        unsafe {
            let p = (self.api.error_string)(r);
            if p.is_null() { format!("NVRTC error {r}") } else { CStr::from_ptr(p).to_string_lossy().into_owned() }
        }
    }

    /// Compiles `source` (which may `#include` any of `headers` by name) to a cubin.
    pub fn compile(&self, name: &str, source: &str, headers: &[(&str, &str)], options: &[String]) -> Result<Compiled> {
        let c = |s: &str| CString::new(s).map_err(|_| Error::Value(format!("NUL byte in kernel text of {name}")));
        let src = c(source)?;
        let cname = c(&format!("{name}.cu"))?;
        let hdr_src: Vec<CString> = headers.iter().map(|h| c(h.1)).collect::<Result<_>>()?;
        let hdr_name: Vec<CString> = headers.iter().map(|h| c(h.0)).collect::<Result<_>>()?;
        let hdr_src_p: Vec<*const c_char> = hdr_src.iter().map(|s| s.as_ptr()).collect();
        let hdr_name_p: Vec<*const c_char> = hdr_name.iter().map(|s| s.as_ptr()).collect();
        let opts: Vec<CString> = options.iter().map(|o| c(o)).collect::<Result<_>>()?;
        let opts_p: Vec<*const c_char> = opts.iter().map(|s| s.as_ptr()).collect();
        unsafe {
            let mut prog: Prog = std::ptr::null_mut();
            let r = (self.api.create)(&mut prog, src.as_ptr(), cname.as_ptr(), headers.len() as c_int,
                hdr_src_p.as_ptr(), hdr_name_p.as_ptr());
            if r != 0 {
                return Err(Error::Compile { kernel: name.into(), log: self.err(r) });
            }
            let r = (self.api.compile)(prog, opts_p.len() as c_int, opts_p.as_ptr());
            let mut log_len = 0usize;
            (self.api.log_size)(prog, &mut log_len);
            let mut log = vec![0u8; log_len.max(1)];
            (self.api.log)(prog, log.as_mut_ptr() as *mut c_char);
            let log = String::from_utf8_lossy(&log).trim_end_matches('\0').trim().to_string();
            if r != 0 {
                (self.api.destroy)(&mut prog);
                return Err(Error::Compile { kernel: name.into(), log: format!("{}\n{log}", self.err(r)) });
            }
            let mut n = 0usize;
            let r = (self.api.cubin_size)(prog, &mut n);
            let mut cubin = vec![0u8; n];
            let r2 = if r == 0 { (self.api.cubin)(prog, cubin.as_mut_ptr() as *mut c_char) } else { r };
            (self.api.destroy)(&mut prog);
            if r2 != 0 || n == 0 {
                return Err(Error::Compile {
                    kernel: name.into(),
                    log: format!("NVRTC produced no cubin ({}); the arch must be a real one like sm_90a, not compute_90a", self.err(r2)),
                });
            }
            Ok(Compiled { cubin, log })
        }
    }
}
