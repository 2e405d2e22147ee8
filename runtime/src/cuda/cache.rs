//! On-disk cache of compiled kernels (CUBIN: machine code for the GPU's own architecture),
//! so a network's kernels compile once per machine and load without the driver's JIT.
//!
//! Folder: `$WRNC_CACHE_DIR` if set, else `$XDG_CACHE_HOME/wrnc`, else `~/.cache/wrnc`;
//! modules go in its `cubin/` subfolder. `WRNC_NO_CACHE=1` turns the cache off.
//!
//! Key: MD5 of the CUDA source, the target architecture (`sm_90`, `sm_90a`) and NVRTC's
//! version (a new NVRTC or another GPU generation never reuses a stale module). The key
//! depends on nothing else, so `wrnc precompile` fills a cache for a GPU on a machine without
//! one, and that cache serves the GPU machine when its NVRTC has the same version. Files are
//! written atomically (temporary file + rename), so a crash never leaves a truncated entry
//! under a valid name; an entry that is not a whole CUBIN (`nvrtc::is_cubin`: say, a copy cut
//! short) is a miss, and one whose image the driver refuses is removed and recompiled by the
//! caller. Cache failures (read-only disk, no home) are never
//! fatal: the kernels are compiled without it.

use std::io::Write;
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};

use crate::nvrtc::{is_cubin, NvrtcError};

/// Bumped when the entry format changes.
const FORMAT: &str = "cubin1";

/// The cache folder per the module docs, or `None` when caching is off or no folder is known.
pub fn default_dir() -> Option<PathBuf> {
    dir_from(
        std::env::var_os("WRNC_NO_CACHE").is_some_and(|v| !v.is_empty() && v != "0"),
        std::env::var_os("WRNC_CACHE_DIR").map(PathBuf::from),
        std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

/// [`default_dir`]'s rule on explicit values (testable without touching the environment).
pub fn dir_from(
    off: bool,
    explicit: Option<PathBuf>,
    xdg: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Option<PathBuf> {
    if off {
        return None;
    }
    let nonempty = |p: &PathBuf| !p.as_os_str().is_empty();
    if let Some(d) = explicit.filter(nonempty) {
        return Some(d);
    }
    if let Some(x) = xdg.filter(|p| nonempty(p) && p.is_absolute()) {
        return Some(x.join("wrnc"));
    }
    home.filter(nonempty).map(|h| h.join(".cache").join("wrnc"))
}

/// The cache key of `source` compiled for `arch` by NVRTC `version`.
pub fn key(source: &str, arch: &str, version: (i32, i32)) -> String {
    let mut h = Md5::new();
    h.update(source.as_bytes());
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{FORMAT}-{hex}-{arch}-nvrtc{}.{}", version.0, version.1)
}

/// A module cache in one folder (or none: every lookup misses, every store is dropped).
#[derive(Debug, Clone)]
pub struct ModuleCache {
    dir: Option<PathBuf>,
}

impl ModuleCache {
    pub fn new(dir: Option<PathBuf>) -> ModuleCache {
        ModuleCache {
            dir: dir.map(|d| d.join("cubin")),
        }
    }

    /// The cache per [`default_dir`].
    pub fn default_location() -> ModuleCache {
        ModuleCache::new(default_dir())
    }

    /// The cache's root folder (the modules live in its `cubin/`), or `None` without a cache.
    pub fn root(&self) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .and_then(|d| d.parent())
            .map(Path::to_path_buf)
    }

    pub fn path(&self, key: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{key}.cubin")))
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let p = self.path(key)?;
        let b = std::fs::read(p).ok()?;
        // a whole CUBIN, else not an entry of ours (a miss)
        is_cubin(&b).then_some(b)
    }

    /// Stores an entry atomically. Errors are returned for the caller to report, not fail on.
    pub fn put(&self, key: &str, image: &[u8]) -> Result<(), String> {
        let (Some(dir), Some(path)) = (&self.dir, self.path(key)) else {
            return Ok(());
        };
        write_atomic(dir, &path, image)
            .map_err(|e| format!("cannot write the kernel cache {}: {e}", path.display()))
    }

    pub fn remove(&self, key: &str) {
        if let Some(p) = self.path(key) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// The module (CUBIN) of `source` for `arch`: from the cache, else from `compile` (then
    /// stored). Returns the image, whether it came from the cache, and a warning when storing
    /// failed.
    pub fn get_or_compile(
        &self,
        source: &str,
        arch: &str,
        version: (i32, i32),
        compile: impl FnOnce(&str, &str) -> Result<Vec<u8>, NvrtcError>,
    ) -> Result<Compiled, NvrtcError> {
        let k = key(source, arch, version);
        if let Some(image) = self.get(&k) {
            return Ok(Compiled {
                image,
                key: k,
                hit: true,
                warning: None,
            });
        }
        let image = compile(source, arch)?;
        let warning = self.put(&k, &image).err();
        Ok(Compiled {
            image,
            key: k,
            hit: false,
            warning,
        })
    }
}

/// What [`ModuleCache::get_or_compile`] returns.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The CUBIN ([`crate::nvrtc::compile_cubin`]).
    pub image: Vec<u8>,
    pub key: String,
    pub hit: bool,
    pub warning: Option<String>,
}

pub(crate) fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}
