//! Two-level cubin cache. In memory: a map behind a read-mostly lock. On disk:
//! `$FERROKERNELS_CACHE/<arch>/nvrtc-<ver>/<kernel>-<hash>.cubin`, keyed by the rendered source,
//! every embedded header, the options, the arch and the NVRTC version. Writers take a file
//! lock, check again, compile, write a temp file, fsync and rename, so concurrent cold builds
//! and crashes never leave a half-written entry; a corrupt entry fails its checksum and is
//! recompiled.

use super::nvrtc::{self, Compiled};
use super::{HEADERS, KernelSource};
use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

const MAGIC: &[u8; 8] = b"FKCUBIN1";

pub fn cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("FERROKERNELS_CACHE")
        && !d.is_empty()
    {
        return PathBuf::from(d);
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .ok()
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var("HOME").ok().map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("ferrokernels")
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

pub fn options(arch: &str, include_dirs: &[PathBuf]) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".into(),
        "-DNDEBUG".into(),
        // The ptxas resource report (registers, spills) lands in the log we keep.
        "--ptxas-options=-v".into(),
        "-lineinfo".into(),
    ];
    o.extend(include_dirs.iter().map(|d| format!("-I{}", d.display())));
    o
}

fn key(k: &KernelSource, arch: &str, opts: &[String], version: (i32, i32)) -> String {
    let mut h = Sha256::new();
    for part in [k.name.as_str(), k.source.as_str(), arch] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    for (name, text) in HEADERS {
        h.update(name.as_bytes());
        h.update(text.as_bytes());
    }
    for o in opts {
        h.update(o.as_bytes());
        h.update([0]);
    }
    h.update(version.0.to_le_bytes());
    h.update(version.1.to_le_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn encode(c: &Compiled) -> Vec<u8> {
    let mut body = c.cubin.clone();
    body.extend_from_slice(c.log.as_bytes());
    let mut out = Vec::with_capacity(body.len() + 56);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(c.cubin.len() as u64).to_le_bytes());
    out.extend_from_slice(&(c.log.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    out
}

/// `None` for anything truncated, foreign or corrupt: the caller recompiles.
pub(crate) fn decode(bytes: &[u8]) -> Option<Compiled> {
    if bytes.len() < 56 || &bytes[..8] != MAGIC {
        return None;
    }
    let n_cubin = u64::from_le_bytes(bytes[8..16].try_into().ok()?) as usize;
    let n_log = u64::from_le_bytes(bytes[16..24].try_into().ok()?) as usize;
    let body = &bytes[56..];
    if n_cubin == 0 || body.len() != n_cubin.checked_add(n_log)? || Sha256::digest(body)[..] != bytes[24..56] {
        return None;
    }
    Some(Compiled {
        cubin: body[..n_cubin].to_vec(),
        log: String::from_utf8_lossy(&body[n_cubin..]).into_owned(),
    })
}

fn read_entry(path: &Path) -> Option<Compiled> {
    decode(&std::fs::read(path).ok()?)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = path.with_extension(format!("tmp.{}.{nanos}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

static MEMORY: RwLock<Option<HashMap<String, Arc<Compiled>>>> = RwLock::new(None);

fn memory_get(key: &str) -> Option<Arc<Compiled>> {
    MEMORY.read().unwrap_or_else(|e| e.into_inner()).as_ref()?.get(key).cloned()
}

fn memory_put(key: String, c: Arc<Compiled>) {
    MEMORY.write().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).insert(key, c);
}

fn debug_print(k: &KernelSource, arch: &str, c: &Compiled) {
    if env_flag("FERROKERNELS_DEBUG") {
        eprintln!("[ferrokernels] compiled {} for {arch}\n--- source ---\n{}\n--- NVRTC log ---\n{}", k.name, k.source, c.log);
    }
    if let Ok(dir) = std::env::var("FERROKERNELS_DUMP")
        && !dir.is_empty()
    {
        let dir = if dir == "1" { cache_dir().join("dump") } else { PathBuf::from(dir) };
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join(format!("{}.{arch}.cu", k.name)), &k.source);
        let _ = std::fs::write(dir.join(format!("{}.{arch}.cubin", k.name)), &c.cubin);
        let _ = std::fs::write(dir.join(format!("{}.{arch}.log", k.name)), &c.log);
    }
}

/// The cubin of `k` for `arch`, from memory, disk, or NVRTC (in that order).
pub fn compile(k: &KernelSource, arch: &str) -> Result<Arc<Compiled>> {
    let nv = nvrtc::get()?;
    let opts = options(arch, &nv.toolkit.include_dirs);
    let key = key(k, arch, &opts, nv.version);
    if let Some(c) = memory_get(&key) {
        return Ok(c);
    }
    let dir = cache_dir().join(arch).join(format!("nvrtc-{}.{}", nv.version.0, nv.version.1));
    let path = dir.join(format!("{}-{}.cubin", k.name, &key[..16]));
    if let Some(c) = read_entry(&path) {
        let c = Arc::new(c);
        memory_put(key, c.clone());
        return Ok(c);
    }
    if env_flag("FERROKERNELS_NO_JIT") {
        return Err(Error::Compile {
            kernel: k.name.clone(),
            log: format!("{} is not in the cache ({}) and FERROKERNELS_NO_JIT is set; run \
                `python -m ferrokernels warmup` first", k.name, path.display()),
        });
    }
    // The lock serialises cold builds of one entry across processes. If the cache folder is
    // not writable we still compile, just without persisting.
    let lock = std::fs::create_dir_all(&dir)
        .and_then(|_| std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path.with_extension("lock")));
    let _guard = match lock {
        Ok(f) => f.lock().ok().map(|_| f),
        Err(_) => None,
    };
    if _guard.is_some()
        && let Some(c) = read_entry(&path)
    {
        let c = Arc::new(c);
        memory_put(key, c.clone());
        return Ok(c);
    }
    let headers: Vec<(&str, &str)> = HEADERS.to_vec();
    let c = Arc::new(nv.compile(&k.name, &k.source, &headers, &opts).map_err(|e| match e {
        Error::Compile { kernel, log } => Error::Compile { kernel: format!("{kernel} for {arch}"), log },
        other => other,
    })?);
    debug_print(k, arch, &c);
    if _guard.is_some() {
        let _ = write_atomic(&path, &encode(&c));
    }
    memory_put(key, c.clone());
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let c = Compiled { cubin: vec![1, 2, 3, 4, 5], log: "ptxas info: Used 32 registers".into() };
        let bytes = encode(&c);
        let d = decode(&bytes).unwrap();
        assert_eq!(d.cubin, c.cubin);
        assert_eq!(d.log, c.log);
        assert!(decode(&bytes[..bytes.len() - 1]).is_none(), "truncated entry must be rejected");
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(decode(&flipped).is_none(), "corrupt entry must be rejected");
        assert!(decode(b"garbage").is_none());
    }
}
