//! Finding CUDA headers and libnvrtc. Order: `CUDA_HOME`, `CUDA_PATH`, `/usr/local/cuda`, then
//! the `nvidia/cu13` (or cu12 `cuda_nvrtc` + `cuda_runtime`) folders that `pip install torch`
//! puts in site-packages. The Python package registers its site-packages folders as extra
//! roots at import, so a machine with only pip-installed torch compiles kernels.
//! Headers and NVRTC always come from the same candidate (same CUDA version).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Clone)]
pub struct Toolkit {
    /// Where it was found, for `ferrokernels info`.
    pub label: String,
    pub nvrtc_lib: PathBuf,
    pub include_dirs: Vec<PathBuf>,
}

static EXTRA_ROOTS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Adds site-packages folders to search (called by the Python package at import).
pub fn add_search_roots(roots: &[PathBuf]) {
    let mut extra = EXTRA_ROOTS.lock().unwrap_or_else(|e| e.into_inner());
    for r in roots {
        if !extra.contains(r) {
            extra.push(r.clone());
        }
    }
}

fn find_nvrtc_in(dir: &Path) -> Option<PathBuf> {
    let plain = dir.join("libnvrtc.so");
    if plain.is_file() {
        return Some(plain);
    }
    let mut versioned: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc.so.") && !n.contains("builtins"))
        })
        .collect();
    versioned.sort();
    versioned.into_iter().next()
}

fn include_dirs_of(include: &Path) -> Option<Vec<PathBuf>> {
    if !include.join("cuda_fp16.h").is_file() {
        return None;
    }
    let mut dirs = vec![include.to_path_buf()];
    // CUDA 13 moved the CCCL headers (which cuda_fp16.h needs) under include/cccl.
    let cccl = include.join("cccl");
    if cccl.is_dir() {
        dirs.push(cccl);
    }
    Some(dirs)
}

fn toolkit_at_root(label: &str, root: &Path) -> Option<Toolkit> {
    let include_dirs = include_dirs_of(&root.join("include"))?;
    let nvrtc_lib = ["lib64", "lib", "lib/x64"]
        .iter()
        .find_map(|l| find_nvrtc_in(&root.join(l)))?;
    Some(Toolkit { label: format!("{label} ({})", root.display()), nvrtc_lib, include_dirs })
}

/// Every usable toolkit, in preference order.
pub fn candidates() -> Vec<Toolkit> {
    let mut out = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(v) = std::env::var(var)
            && !v.is_empty()
            && let Some(t) = toolkit_at_root(var, Path::new(&v))
        {
            out.push(t);
        }
    }
    if let Some(t) = toolkit_at_root("system", Path::new("/usr/local/cuda")) {
        out.push(t);
    }
    let extra = EXTRA_ROOTS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for site in extra {
        let nv = site.join("nvidia");
        for cu in ["cu13", "cu12"] {
            if let Some(t) = toolkit_at_root(&format!("pip nvidia/{cu}"), &nv.join(cu)) {
                out.push(t);
            }
        }
        // CUDA 12 wheels split NVRTC and the runtime headers into two packages.
        if let (Some(lib), Some(include_dirs)) = (
            find_nvrtc_in(&nv.join("cuda_nvrtc/lib")),
            include_dirs_of(&nv.join("cuda_runtime/include")),
        ) {
            out.push(Toolkit {
                label: format!("pip nvidia/cuda_nvrtc ({})", nv.display()),
                nvrtc_lib: lib,
                include_dirs,
            });
        }
    }
    out
}
