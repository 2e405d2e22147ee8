//! NVRTC, loaded at run time: CUDA C source -> PTX, or -> machine code (a CUBIN, NVRTC running
//! ptxas for a real architecture), with no CUDA toolkit at build time and no GPU.
//!
//! The library is searched in this order (the first that loads wins):
//! 1. the path in the `WRNC_NVRTC` environment variable (a file), when set;
//! 2. NVRTC 13 wherever it is, before NVRTC 12 anywhere (so a CUDA 12 library on the loader's
//!    path does not shadow the 13.x wheel that `wrnc precompile` used, whose version is part
//!    of every module cache key), each major version in this order: `libnvrtc.so.<major>` by
//!    the dynamic loader's own search (`LD_LIBRARY_PATH`, the `ldconfig` cache, the system
//!    directories), then the pip package `nvidia-cuda-nvrtc` (the folders `nvidia/cu13/lib`
//!    of 13.x wheels and `nvidia/cuda_nvrtc/lib` beside the `nvidia` package that `python3 -c
//!    "import nvidia"` finds), then `/usr/local/cuda/lib64`;
//! 3. `libnvrtc.so` by the loader's search, then in `/usr/local/cuda/lib64`.
//!
//! For a candidate given as a path, `libnvrtc-builtins.so.*` from the same folder is loaded
//! first (globally), because NVRTC looks for it only on the loader's path.
//!
//! When none loads, [`compile_ptx`] returns [`NvrtcError::NotFound`], whose message says how to
//! install it. Nothing here panics.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The pip package that provides NVRTC, pinned.
pub const PIP_PACKAGE: &str = "nvidia-cuda-nvrtc==13.0.88";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NvrtcError {
    #[error(
        "NVRTC (libnvrtc.so.13 or .12) was not found; tried: {tried}.\n\
         Install it with `pip install {PIP_PACKAGE}` (it lands in \
         <site-packages>/nvidia/cu13/lib, which wrnc finds through `python3 -c \"import nvidia\"`), \
         or point WRNC_NVRTC at a libnvrtc.so file"
    )]
    NotFound { tried: String },
    #[error("NVRTC library {path} is missing symbol {symbol}")]
    Symbol { path: String, symbol: String },
    #[error("unsupported architecture `{0}` (expected sm_XY or compute_XY, e.g. sm_80, sm_90)")]
    Arch(String),
    #[error("the CUDA source contains a NUL byte")]
    Nul,
    #[error("NVRTC {call} failed: {message}")]
    Call { call: &'static str, message: String },
    #[error("NVRTC compilation failed for {arch}:\n{log}")]
    Compile { arch: String, log: String },
}

type Prog = *mut c_void;
type R = c_int;

struct Api {
    _lib: libloading::Library,
    /// `libnvrtc-builtins` from the same folder, loaded first (RTLD_GLOBAL) so NVRTC finds it
    /// even when that folder is not on the loader's path (pip wheels).
    _builtins: Option<libloading::os::unix::Library>,
    path: String,
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> R,
    create: unsafe extern "C" fn(
        *mut Prog,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> R,
    compile: unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> R,
    log_size: unsafe extern "C" fn(Prog, *mut usize) -> R,
    log: unsafe extern "C" fn(Prog, *mut c_char) -> R,
    ptx_size: unsafe extern "C" fn(Prog, *mut usize) -> R,
    ptx: unsafe extern "C" fn(Prog, *mut c_char) -> R,
    cubin_size: unsafe extern "C" fn(Prog, *mut usize) -> R,
    cubin: unsafe extern "C" fn(Prog, *mut c_char) -> R,
    destroy: unsafe extern "C" fn(*mut Prog) -> R,
    error_string: unsafe extern "C" fn(R) -> *const c_char,
}

/// Candidate paths, in search order (see module docs).
pub fn candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("WRNC_NVRTC") {
        v.push(PathBuf::from(p));
    }
    let pip: Vec<PathBuf> = std::process::Command::new("python3")
        .args([
            "-c",
            "import nvidia, os; print('\\n'.join(nvidia.__path__))",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|d| PathBuf::from(d.trim()))
                .collect()
        })
        .unwrap_or_default();
    for (major, subs) in [
        (13, &["cu13/lib", "cuda_nvrtc/lib"][..]),
        (12, &["cuda_nvrtc/lib"][..]),
    ] {
        let file = format!("libnvrtc.so.{major}");
        v.push(PathBuf::from(&file));
        for dir in &pip {
            for sub in subs {
                v.push(dir.join(sub).join(&file));
            }
        }
        v.push(PathBuf::from("/usr/local/cuda/lib64").join(&file));
    }
    v.push(PathBuf::from("libnvrtc.so"));
    v.push(PathBuf::from("/usr/local/cuda/lib64/libnvrtc.so"));
    v
}

fn load() -> Result<Api, NvrtcError> {
    let mut tried = Vec::new();
    for c in candidates() {
        let builtins = preload_builtins(&c);
        // SAFETY: loading NVRTC runs its (trusted, vendor) initialisers only.
        let lib = match unsafe { libloading::Library::new(&c) } {
            Ok(l) => l,
            Err(_) => {
                tried.push(c.display().to_string());
                continue;
            }
        };
        let path = c.display().to_string();
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the signature is NVRTC's documented C API.
                *unsafe { lib.get($name) }.map_err(|_| NvrtcError::Symbol {
                    path: path.clone(),
                    symbol: String::from_utf8_lossy(&$name[..$name.len() - 1]).into_owned(),
                })?
            };
        }
        let api = Api {
            version: sym!(b"nvrtcVersion\0"),
            create: sym!(b"nvrtcCreateProgram\0"),
            compile: sym!(b"nvrtcCompileProgram\0"),
            log_size: sym!(b"nvrtcGetProgramLogSize\0"),
            log: sym!(b"nvrtcGetProgramLog\0"),
            ptx_size: sym!(b"nvrtcGetPTXSize\0"),
            ptx: sym!(b"nvrtcGetPTX\0"),
            cubin_size: sym!(b"nvrtcGetCUBINSize\0"),
            cubin: sym!(b"nvrtcGetCUBIN\0"),
            destroy: sym!(b"nvrtcDestroyProgram\0"),
            error_string: sym!(b"nvrtcGetErrorString\0"),
            path,
            _lib: lib,
            _builtins: builtins,
        };
        return Ok(api);
    }
    Err(NvrtcError::NotFound {
        tried: tried.join(", "),
    })
}

/// Loads `libnvrtc-builtins.so.*` from `lib`'s folder (when `lib` is a path) with RTLD_GLOBAL.
fn preload_builtins(lib: &std::path::Path) -> Option<libloading::os::unix::Library> {
    let dir = lib.parent().filter(|d| !d.as_os_str().is_empty())?;
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc-builtins.so"))
        })
        .collect();
    found.sort();
    found.into_iter().find_map(|p| {
        // SAFETY: the vendor's builtins library; its initialisers only.
        unsafe {
            libloading::os::unix::Library::open(
                Some(&p),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
            )
        }
        .ok()
    })
}

fn api() -> Result<&'static Api, NvrtcError> {
    static API: OnceLock<Result<Api, NvrtcError>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// Whether NVRTC can be loaded, and from where.
pub fn library() -> Result<String, NvrtcError> {
    api().map(|a| a.path.clone())
}

/// NVRTC's version `(major, minor)`.
pub fn version() -> Result<(i32, i32), NvrtcError> {
    let a = api()?;
    let (mut ma, mut mi) = (0, 0);
    // SAFETY: two valid out-pointers.
    let r = unsafe { (a.version)(&mut ma, &mut mi) };
    check(a, r, "nvrtcVersion")?;
    Ok((ma, mi))
}

fn check(a: &Api, r: R, call: &'static str) -> Result<(), NvrtcError> {
    if r == 0 {
        return Ok(());
    }
    // SAFETY: nvrtcGetErrorString returns a static C string for any code.
    let p = unsafe { (a.error_string)(r) };
    let message = if p.is_null() {
        format!("error {r}")
    } else {
        // SAFETY: non-null, NUL-terminated, static.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    Err(NvrtcError::Call { call, message })
}

/// `sm_80` / `compute_80` -> `compute_80` (PTX targets a virtual architecture).
fn virtual_arch(arch: &str) -> Result<String, NvrtcError> {
    let num = arch
        .strip_prefix("sm_")
        .or_else(|| arch.strip_prefix("compute_"))
        .filter(|n| {
            (2..=4).contains(&n.len())
                && n.chars().all(|c| c.is_ascii_alphanumeric())
                && n.chars().next().is_some_and(|c| c.is_ascii_digit())
        })
        .ok_or_else(|| NvrtcError::Arch(arch.to_string()))?;
    Ok(format!("compute_{num}"))
}

/// Compiles CUDA C `src` (one translation unit, no system headers) to PTX for `arch`
/// (`sm_80`, `sm_90`, ...). On a compile error the message carries NVRTC's program log.
pub fn compile_ptx(src: &str, arch: &str) -> Result<String, NvrtcError> {
    let varch = virtual_arch(arch)?;
    compile(
        src,
        arch,
        &[format!("--gpu-architecture={varch}")],
        Output::Ptx,
    )
    .map(|(_, ptx)| String::from_utf8_lossy(&ptx[..ptx.len().saturating_sub(1)]).into_owned())
}

/// The real architecture of `arch`: `compute_90` / `sm_90` -> `sm_90`, `sm_90a` -> `sm_90a`.
fn real_arch(arch: &str) -> Result<String, NvrtcError> {
    Ok(format!("sm_{}", &virtual_arch(arch)?["compute_".len()..]))
}

/// Compiles CUDA C `src` to machine code for the real architecture of `arch` (`sm_90`,
/// `sm_90a`, `sm_80`; a `compute_XY` means `sm_XY`): NVRTC runs ptxas itself, so the driver
/// loads the result without a JIT step, and no GPU is needed to make it. The CUBIN is an ELF
/// image (it starts with [`CUBIN_MAGIC`]) that loads only on a GPU of exactly that
/// architecture, through a driver at least as new as this NVRTC.
pub fn compile_cubin(src: &str, arch: &str) -> Result<Vec<u8>, NvrtcError> {
    let real = real_arch(arch)?;
    compile(
        src,
        arch,
        &[format!("--gpu-architecture={real}")],
        Output::Cubin,
    )
    .map(|(_, c)| c)
}

/// The first bytes of every CUBIN ([`compile_cubin`]): an ELF image.
pub const CUBIN_MAGIC: &[u8] = b"\x7fELF";

/// `EM_CUDA`, the ELF machine of a CUBIN.
const EM_CUDA: u16 = 190;

/// Whether `b` is a whole CUBIN as far as its ELF header tells: 64-bit little-endian ELF for
/// `EM_CUDA`, whose program and section header tables (at the end of NVRTC's CUBINs) lie
/// inside `b`. A file cut short (an interrupted copy or unpack) fails this, so it is never
/// handed to the driver, which reads an image by its header's sizes.
pub fn is_cubin(b: &[u8]) -> bool {
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    if b.len() < 64 || !b.starts_with(CUBIN_MAGIC) || b[4] != 2 || b[5] != 1 {
        return false;
    }
    if u16_at(18) != EM_CUDA as u64 {
        return false;
    }
    let fits = |off: u64, entsize: u64, num: u64| {
        entsize
            .checked_mul(num)
            .and_then(|n| n.checked_add(off))
            .is_some_and(|end| end <= b.len() as u64)
    };
    fits(u64_at(32), u16_at(54), u16_at(56)) && fits(u64_at(40), u16_at(58), u16_at(60))
}

/// What [`compile`] returns beside the log.
#[derive(Clone, Copy, PartialEq)]
enum Output {
    Nothing,
    /// PTX text with its terminating NUL.
    Ptx,
    Cubin,
}

/// What ptxas reports for one kernel: its registers per thread, spilled bytes, stack frame and
/// static shared memory, for the real architecture it was compiled for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    pub spill_stores: u64,
    pub spill_loads: u64,
    pub stack_frame: u64,
    /// Static shared memory, bytes.
    pub shared: u64,
    /// Dynamic shared memory its launches take, bytes (not ptxas's: the caller fills it in
    /// from the schedule, `KernelSpec::dynamic_smem`; 0 here).
    #[serde(skip_serializing_if = "is_zero")]
    pub dynamic_shared: u64,
    /// ptxas's warnings and performance notes naming this kernel (e.g. `wgmma.mma_async`
    /// instructions serialized), as printed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Compiles `src` to machine code for the real architecture `arch` (`sm_80`, `sm_90`; a
/// `compute_XY` is taken as `sm_XY`) with `ptxas -v`, and returns each kernel's resources in
/// the order ptxas reports them. No GPU is needed: NVRTC runs ptxas itself.
pub fn ptxas_resources(src: &str, arch: &str) -> Result<Vec<KernelResources>, NvrtcError> {
    let real = real_arch(arch)?;
    let (log, _) = compile(
        src,
        arch,
        &[
            format!("--gpu-architecture={real}"),
            "--ptxas-options=-v".into(),
        ],
        Output::Nothing,
    )?;
    Ok(parse_ptxas_log(&log))
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The per-kernel figures of a `ptxas -v` log (see [`ptxas_resources`]).
pub fn parse_ptxas_log(log: &str) -> Vec<KernelResources> {
    let num = |line: &str, unit: &str| -> Option<u64> {
        let i = line.find(unit)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    let mut out: Vec<KernelResources> = vec![];
    let mut cur: Option<KernelResources> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            out.extend(cur.take());
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            cur = Some(KernelResources {
                name,
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
                stack_frame: 0,
                shared: 0,
                dynamic_shared: 0,
                notes: vec![],
            });
        } else if let Some(k) = cur.as_mut() {
            if line.contains("bytes stack frame") {
                k.stack_frame = num(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = num(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = num(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = num(line, "registers").unwrap_or(0) as u32;
                k.shared = num(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out.extend(cur);
    // warnings and performance notes name their function: `... in the function 'NAME'`
    for line in log.lines().filter(|l| {
        let l = l.to_ascii_lowercase();
        l.contains("warning") || l.contains("performance")
    }) {
        for k in out.iter_mut() {
            if line.contains(&format!("'{}'", k.name)) {
                k.notes.push(line.trim().to_string());
            }
        }
    }
    out
}

/// One NVRTC compilation of `src` with `extra` options: the program log, and what `want`
/// names (empty for [`Output::Nothing`]). On a compile error the message carries the log.
fn compile(
    src: &str,
    arch: &str,
    extra: &[String],
    want: Output,
) -> Result<(String, Vec<u8>), NvrtcError> {
    let a = api()?;
    let csrc = CString::new(src).map_err(|_| NvrtcError::Nul)?;
    let name = CString::new("wrnc.cu").expect("no NUL");
    let opts: Vec<CString> = extra
        .iter()
        .cloned()
        .chain(["--std=c++17".into(), "-default-device".into()])
        .map(|o| CString::new(o).expect("no NUL"))
        .collect();
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: Prog = std::ptr::null_mut();
    // SAFETY: valid C strings; zero headers.
    let r = unsafe {
        (a.create)(
            &mut prog,
            csrc.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    check(a, r, "nvrtcCreateProgram")?;
    struct Guard<'a>(&'a Api, Prog);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            // SAFETY: the program was created and is destroyed once.
            unsafe { (self.0.destroy)(&mut self.1) };
        }
    }
    let guard = Guard(a, prog);
    // SAFETY: the program is live; options are valid C strings.
    let r = unsafe { (a.compile)(guard.1, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
    let mut n = 0usize;
    // SAFETY: live program, valid out-pointer; the buffer has the size NVRTC reported.
    let log = unsafe {
        if (a.log_size)(guard.1, &mut n) == 0 && n > 0 {
            let mut buf = vec![0u8; n];
            (a.log)(guard.1, buf.as_mut_ptr() as *mut c_char);
            String::from_utf8_lossy(&buf[..n.saturating_sub(1)]).into_owned()
        } else {
            String::new()
        }
    };
    if r != 0 {
        check(a, r, "nvrtcCompileProgram").map_err(|e| NvrtcError::Compile {
            arch: arch.to_string(),
            log: format!("{e}\n{log}"),
        })?;
    }
    let (size, get, what) = match want {
        Output::Nothing => return Ok((log, vec![])),
        Output::Ptx => (a.ptx_size, a.ptx, ("nvrtcGetPTXSize", "nvrtcGetPTX")),
        Output::Cubin => (
            a.cubin_size,
            a.cubin,
            ("nvrtcGetCUBINSize", "nvrtcGetCUBIN"),
        ),
    };
    let mut n = 0usize;
    // SAFETY: a compiled program; the buffer is the size NVRTC asked for.
    let out = unsafe {
        check(a, size(guard.1, &mut n), what.0)?;
        let mut buf = vec![0u8; n];
        check(a, get(guard.1, buf.as_mut_ptr() as *mut c_char), what.1)?;
        buf
    };
    Ok((log, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC 13 (what `wrnc precompile` compiles with, in every cache key) anywhere comes
    /// before NVRTC 12 anywhere, and the unversioned names last.
    #[test]
    fn nvrtc_13_is_searched_before_12() {
        let mut c: Vec<String> = candidates()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        if std::env::var_os("WRNC_NVRTC").is_some() {
            c.remove(0);
        }
        let last = |suffix: &str| c.iter().rposition(|p| p.ends_with(suffix)).unwrap();
        let first = |suffix: &str| c.iter().position(|p| p.ends_with(suffix)).unwrap();
        assert!(last(".so.13") < first(".so.12"), "{c:?}");
        assert!(last(".so.12") < first(".so"), "{c:?}");
        assert!(c.contains(&"/usr/local/cuda/lib64/libnvrtc.so.13".to_string()));
    }

    #[test]
    fn ptxas_log() {
        let log = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k_one' for 'sm_90'
ptxas info    : Function properties for k_one
ptxas         .     24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 56 registers, used 1 barriers, 43136 bytes smem
ptxas info    : Compile time = 168.633 ms
ptxas info    : Compiling entry function 'k_two' for 'sm_90'
ptxas info    : Function properties for k_two
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 25 registers, used 0 barriers
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to the presence of Extern calls in the function 'k_two'.
";
        let r = parse_ptxas_log(log);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            KernelResources {
                name: "k_one".into(),
                registers: 56,
                spill_stores: 8,
                spill_loads: 12,
                stack_frame: 24,
                shared: 43136,
                dynamic_shared: 0,
                notes: vec![],
            }
        );
        assert_eq!(r[1].notes.len(), 1);
        assert!(r[1].notes[0].contains("serialized"));
        assert_eq!(
            (r[1].name.as_str(), r[1].registers, r[1].shared),
            ("k_two", 25, 0)
        );
    }

    #[test]
    fn architectures() {
        assert_eq!(virtual_arch("sm_90").unwrap(), "compute_90");
        assert_eq!(virtual_arch("compute_80").unwrap(), "compute_80");
        assert_eq!(virtual_arch("sm_90a").unwrap(), "compute_90a");
        for bad in ["sm90", "sm_", "x", "sm_9-0", "sm_a0"] {
            assert!(
                matches!(virtual_arch(bad), Err(NvrtcError::Arch(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn missing_library_message_says_how_to_install() {
        let e = NvrtcError::NotFound { tried: "x".into() };
        assert!(e
            .to_string()
            .contains("pip install nvidia-cuda-nvrtc==13.0.88"));
    }
}
