//! NVRTC compilation to cubin, with an on-disk cache. Needs no GPU.
//!
//! Kernels are compiled for the device's exact architecture (`--gpu-architecture=sm_XY`) and
//! fetched with `nvrtcGetCUBIN`: a cubin loads on any driver that knows the architecture,
//! whereas PTX from a newer NVRTC would need a driver new enough to JIT it.
//!
//! Options: `-std=c++17 -default-device -DGPTOSS_ARCH=<XY>`. No `--use_fast_math`: the NF4
//! dequantization must be bit-exact, and the kernels spell out `__fmul_rn`/`__fadd_rn` where the
//! rounding matters (FMA contraction is allowed elsewhere, e.g. in fp32 accumulation).
//!
//! Cache: `$GPTOSS_3090_CACHE` (set it to `off` to disable), else
//! `$XDG_CACHE_HOME/gptoss_3090/kernels`, else `~/.cache/gptoss_3090/kernels`. The key is the
//! SHA-256 of the source, `common.cuh`, the options, the NVRTC version and the arch. Each entry
//! holds a magic tag, the SHA-256 of the cubin and the cubin; it is written to a temporary file
//! and renamed into place (atomic), and an entry that fails verification is recompiled.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, CString};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::sys;
use sha2::{Digest, Sha256};

use super::{common_header, guard, Arch, KernelSource};
use crate::error::{Error, Result};

static NVRTC_PRESENT: OnceLock<()> = OnceLock::new();

const CACHE_MAGIC: &[u8; 8] = b"GPTOSSK1";

/// Checks that libnvrtc can be opened (before any cudarc NVRTC call, which would panic).
///
/// A positive answer is cached; a negative one is re-checked on the next call, because the
/// Python package may preload the library in between (`gptoss_3090._cuda_libs`).
pub fn nvrtc_available() -> Result<()> {
    if NVRTC_PRESENT.get().is_some() {
        return Ok(());
    }
    // SAFETY: only tries to dlopen candidate library names.
    let present = unsafe { sys::is_culib_present() };
    if !present {
        return Err(Error::NoNvrtc(
            "libnvrtc.so.13 / libnvrtc.so.12 could not be opened. Install the NVRTC wheel that \
             matches your torch (pip install nvidia-cuda-nvrtc for CUDA 13, \
             nvidia-cuda-nvrtc-cu12 for CUDA 12), or set CUDA_HOME to a CUDA toolkit, or add \
             the folder holding libnvrtc to LD_LIBRARY_PATH. `gptoss-3090 doctor` shows where \
             it was looked for."
                .to_string(),
        ));
    }
    let _ = NVRTC_PRESENT.set(());
    Ok(())
}

fn nvrtc_err(what: &str, r: sys::nvrtcResult) -> Error {
    Error::Driver {
        context: format!("NVRTC {what}"),
        message: format!("{r:?}"),
    }
}

/// The NVRTC library version `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    nvrtc_available()?;
    guard("nvrtcVersion", || {
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: two valid out-pointers.
        let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(nvrtc_err("nvrtcVersion", r));
        }
        Ok((major, minor))
    })
}

/// The NVRTC options used for `arch`.
pub fn compile_options(arch: Arch) -> Vec<String> {
    vec![
        format!("--gpu-architecture=sm_{}", arch.number()),
        "-std=c++17".to_string(),
        "-default-device".to_string(),
        format!("-DGPTOSS_ARCH={}", arch.number()),
    ]
}

/// Where compiled cubins are cached, or `None` when caching is disabled.
pub fn cache_dir() -> Option<PathBuf> {
    if let Ok(v) = std::env::var("GPTOSS_3090_CACHE") {
        let v = v.trim().to_string();
        if v.is_empty() {
            // fall through to the default
        } else if matches!(
            v.to_ascii_lowercase().as_str(),
            "off" | "0" | "none" | "false"
        ) {
            return None;
        } else {
            return Some(PathBuf::from(v));
        }
    }
    if let Ok(x) = std::env::var("XDG_CACHE_HOME") {
        if !x.trim().is_empty() {
            return Some(PathBuf::from(x).join("gptoss_3090").join("kernels"));
        }
    }
    std::env::var("HOME")
        .ok()
        .filter(|h| !h.is_empty())
        .map(|h| {
            PathBuf::from(h)
                .join(".cache")
                .join("gptoss_3090")
                .join("kernels")
        })
}

fn to_cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::arg(format!("{what} contains a NUL byte")))
}

fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut size: usize = 0;
    // SAFETY: prog is a live program; size is a valid out-pointer.
    if unsafe { sys::nvrtcGetProgramLogSize(prog, &mut size) } != sys::nvrtcResult::NVRTC_SUCCESS {
        return String::from("(no log)");
    }
    let mut buf = vec![0u8; size.max(1)];
    // SAFETY: buf has `size` bytes.
    if unsafe { sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char) }
        != sys::nvrtcResult::NVRTC_SUCCESS
    {
        return String::from("(no log)");
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).trim().to_string()
}

/// Compiles one source text (which may `#include "common.cuh"`) to a cubin, without the cache.
///
/// `name` only labels errors. A compile failure is [`Error::Compile`] carrying the NVRTC log.
pub fn compile_source(name: &str, source: &str, arch: Arch) -> Result<Vec<u8>> {
    compile_source_with(name, source, arch, &[]).map(|(cubin, _)| cubin)
}

/// Like [`compile_source`] with extra NVRTC options (e.g. `--ptxas-options=-v`); also returns
/// the NVRTC log of a successful compile (diagnostics: registers, spills).
pub fn compile_source_with(
    name: &str,
    source: &str,
    arch: Arch,
    extra_options: &[String],
) -> Result<(Vec<u8>, String)> {
    nvrtc_available()?;
    if !arch.is_supported() {
        return Err(Error::arg(format!(
            "arch {arch}: gptoss-3090 kernels need sm_80 or newer"
        )));
    }
    let src_c = to_cstring("kernel source", source)?;
    let name_c = to_cstring("kernel name", &format!("{name}.cu"))?;
    let header_c = to_cstring("common.cuh", common_header())?;
    let header_name_c = CString::new("common.cuh").map_err(|_| Error::arg("header name"))?;
    let mut options = compile_options(arch);
    options.extend(extra_options.iter().cloned());
    let opts_c: Vec<CString> = options
        .iter()
        .map(|o| to_cstring("NVRTC option", o))
        .collect::<Result<_>>()?;
    let opt_ptrs: Vec<*const c_char> = opts_c.iter().map(|o| o.as_ptr()).collect();
    let headers = [header_c.as_ptr()];
    let header_names = [header_name_c.as_ptr()];

    // No lock: NVRTC allows concurrent calls on distinct programs (NVRTC User Guide, "Thread
    // Safety"), and each call here creates, compiles and destroys its own (compile_families
    // runs several at once).
    guard("NVRTC compile", || {
        let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
        let r = unsafe {
            sys::nvrtcCreateProgram(
                &mut prog,
                src_c.as_ptr(),
                name_c.as_ptr(),
                1,
                headers.as_ptr(),
                header_names.as_ptr(),
            )
        };
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(nvrtc_err("nvrtcCreateProgram", r));
        }
        // SAFETY: prog is live; options are valid C strings.
        let r =
            unsafe { sys::nvrtcCompileProgram(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
        let result = if r != sys::nvrtcResult::NVRTC_SUCCESS {
            Err(Error::Compile {
                source_name: format!("{name}.cu"),
                arch: arch.to_string(),
                log: format!("{r:?}\n{}", program_log(prog)),
            })
        } else {
            let mut size: usize = 0;
            // SAFETY: prog compiled successfully.
            let r = unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) };
            if r != sys::nvrtcResult::NVRTC_SUCCESS {
                Err(nvrtc_err("nvrtcGetCUBINSize", r))
            } else if size == 0 {
                Err(Error::Compile {
                    source_name: format!("{name}.cu"),
                    arch: arch.to_string(),
                    log: "NVRTC produced an empty cubin".to_string(),
                })
            } else {
                let mut cubin = vec![0u8; size];
                // SAFETY: cubin has `size` bytes.
                let r = unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) };
                if r != sys::nvrtcResult::NVRTC_SUCCESS {
                    Err(nvrtc_err("nvrtcGetCUBIN", r))
                } else {
                    Ok((cubin, program_log(prog)))
                }
            }
        };
        // SAFETY: prog is live and destroyed once.
        unsafe {
            let _ = sys::nvrtcDestroyProgram(&mut prog);
        }
        result
    })
}

fn cache_key(src: &KernelSource, arch: Arch, nvrtc: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(b"gptoss_3090 kernel cache v1\0");
    h.update(src.name.as_bytes());
    h.update(b"\0");
    h.update(src.source.as_bytes());
    h.update(b"\0");
    h.update(common_header().as_bytes());
    h.update(b"\0");
    for o in compile_options(arch) {
        h.update(o.as_bytes());
        h.update(b"\0");
    }
    h.update(format!("nvrtc {}.{}\0{arch}", nvrtc.0, nvrtc.1).as_bytes());
    let digest = h.finalize();
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

fn read_cache(path: &std::path::Path) -> Option<Vec<u8>> {
    let data = std::fs::read(path).ok()?;
    if data.len() <= 40 || &data[..8] != CACHE_MAGIC {
        return None;
    }
    let (digest, cubin) = data[8..].split_at(32);
    let actual = Sha256::digest(cubin);
    if actual.as_slice() != digest {
        return None;
    }
    Some(cubin.to_vec())
}

fn write_cache(path: &std::path::Path, cubin: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("cache path has no parent"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(CACHE_MAGIC)?;
        f.write_all(Sha256::digest(cubin).as_slice())?;
        f.write_all(cubin)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The cache file for `src` on `arch`, if caching is enabled.
pub(crate) fn cache_path(src: &KernelSource, arch: Arch) -> Result<Option<PathBuf>> {
    let Some(dir) = cache_dir() else {
        return Ok(None);
    };
    let v = nvrtc_version()?;
    Ok(Some(dir.join(format!(
        "{}-sm{}-{}.cubin",
        src.name,
        arch.number(),
        cache_key(src, arch, v)
    ))))
}

/// The lock one family's compile for one architecture holds in this process.
///
/// Why: the vLLM plugin compiles the served families on a background thread while the weights
/// load (`runtime.compile_in_background`), and the first forward may reach a family that thread
/// is still compiling. Waiting for it and then reading its cache entry costs the rest of that
/// compile; compiling it a second time would cost all of it, on a core the other families need.
fn family_lock(name: &str, arch: Arch) -> Arc<Mutex<()>> {
    type Locks = Mutex<HashMap<(String, i32), Arc<Mutex<()>>>>;
    static LOCKS: OnceLock<Locks> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    locks
        .entry((name.to_string(), arch.number()))
        .or_default()
        .clone()
}

/// Compiles a kernel family to a cubin for `arch`, through the on-disk cache.
///
/// NVRTC only; no GPU is needed. A cache that cannot be written is ignored (the cubin is still
/// returned); a corrupt entry is recompiled and replaced. Calls for the same family and arch
/// run one at a time in a process (`family_lock`): a second caller waits for the first and
/// then finds its cache entry.
pub fn compile_cubin(src: &KernelSource, arch: Arch) -> Result<Vec<u8>> {
    nvrtc_available()?;
    let path = cache_path(src, arch)?;
    compile_cubin_at(src, arch, path.as_deref())
}

/// [`compile_cubin`] with the cache file given (`None`: no cache).
fn compile_cubin_at(
    src: &KernelSource,
    arch: Arch,
    path: Option<&std::path::Path>,
) -> Result<Vec<u8>> {
    let lock = family_lock(src.name, arch);
    let _one_compile = lock.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = path {
        if let Some(cubin) = read_cache(p) {
            return Ok(cubin);
        }
    }
    #[cfg(test)]
    tests::count_compile(src.name);
    let cubin = compile_source(src.name, src.source, arch)?;
    if let Some(p) = path {
        let _ = write_cache(p, &cubin);
    }
    Ok(cubin)
}

/// Compiles the kernel families `names` for `arch` through the disk cache, several at once:
/// one worker thread per family, at most the machine's parallelism, the largest sources first.
/// Returns the cubins in the order of `names`; if any family fails, the error of the first
/// failing one in that order (the same error whatever the thread timing).
///
/// Why: NVRTC compiles one program on one thread, and a fresh install (the first `warmup()`,
/// i.e. the first `vllm serve`) waits for every family. One after another they took 137 s for
/// sm_90 on a 2-core VM (session 31: moe_chunks 61 s, moe 58 s, nf4 14 s, attention 5 s), so
/// the two MoE families alone set the time once they run side by side.
pub fn compile_families(names: &[&str], arch: Arch) -> Result<Vec<Vec<u8>>> {
    nvrtc_available()?;
    let sources: Vec<&'static KernelSource> = names
        .iter()
        .map(|n| super::source(n))
        .collect::<Result<_>>()?;
    // Largest first, so that with fewer workers than families the long ones start at once.
    let mut order: Vec<usize> = (0..sources.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sources[i].source.len()));
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, sources.len().max(1));
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Result<Vec<u8>>>>> =
        sources.iter().map(|_| Mutex::new(None)).collect();
    let work = || {
        while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
            // compile_cubin's NVRTC call is guarded; this also keeps a panic in the cache code
            // or the thread itself from unwinding out of the scope.
            let r = guard("compiling kernels", || compile_cubin(sources[i], arch));
            *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        }
    };
    std::thread::scope(|s| {
        for _ in 1..workers {
            s.spawn(work);
        }
        work();
    });
    slots
        .into_iter()
        .zip(&sources)
        .map(|(slot, src)| {
            slot.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or_else(|| {
                    Err(Error::Driver {
                        context: format!("compiling kernels/{}.cu for {arch}", src.file),
                        message: "the compile worker stopped before this family".to_string(),
                    })
                })
        })
        .collect()
}

/// Drops a cache entry (used when the driver rejects a cached cubin).
pub(crate) fn evict(src: &KernelSource, arch: Arch) {
    if let Ok(Some(p)) = cache_path(src, arch) {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nvrtc_or_skip() -> bool {
        if nvrtc_available().is_err() {
            eprintln!("NVRTC not found (set LD_LIBRARY_PATH to a folder with libnvrtc): skipping");
            return false;
        }
        true
    }

    #[test]
    fn compile_families_checks_names_before_compiling() {
        if !nvrtc_or_skip() {
            return;
        }
        let arch = Arch::parse("sm_86").unwrap();
        assert!(compile_families(&[], arch).unwrap().is_empty());
        let err = compile_families(&["attention", "no_such_family"], arch).unwrap_err();
        assert!(err.to_string().contains("no_such_family"), "{err}");
    }

    /// NVRTC runs of `compile_cubin_at` per family name (names unique to a test).
    static COMPILES: Mutex<Vec<String>> = Mutex::new(Vec::new());

    pub(super) fn count_compile(name: &str) {
        COMPILES.lock().unwrap().push(name.to_string());
    }

    #[test]
    fn concurrent_compiles_of_a_family_run_nvrtc_once() {
        if !nvrtc_or_skip() {
            return;
        }
        static SRC: KernelSource = KernelSource {
            name: "lock_test",
            file: "lock_test",
            prelude: "",
            source:
                "#include \"common.cuh\"\nextern \"C\" __global__ void k(float* p) { *p = 1.f; }",
            f16_program: None,
        };
        let dir = std::env::temp_dir().join(format!("gptoss_lock_test_{}", std::process::id()));
        let path = dir.join("lock_test.cubin");
        let arch = Arch::parse("sm_86").unwrap();
        let cubins: Vec<Vec<u8>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..3)
                .map(|_| s.spawn(|| compile_cubin_at(&SRC, arch, Some(&path)).unwrap()))
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let runs = COMPILES
            .lock()
            .unwrap()
            .iter()
            .filter(|n| *n == "lock_test")
            .count();
        let _ = std::fs::remove_dir_all(dir);
        assert_eq!(
            runs, 1,
            "the waiting callers must read the first one's cache entry"
        );
        assert!(cubins
            .iter()
            .all(|c| c == &cubins[0] && c.starts_with(b"\x7fELF")));
    }

    #[test]
    fn cache_roundtrip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("gptoss_cache_test_{}", std::process::id()));
        let p = dir.join("x.cubin");
        write_cache(&p, b"\x7fELF-not-really-a-cubin").unwrap();
        assert_eq!(read_cache(&p).unwrap(), b"\x7fELF-not-really-a-cubin");
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert!(read_cache(&p).is_none());
        std::fs::write(&p, b"short").unwrap();
        assert!(read_cache(&p).is_none());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn compiles_every_source_for_every_arch() {
        if !nvrtc_or_skip() {
            return;
        }
        for arch in ["sm_80", "sm_86", "sm_89", "sm_90"] {
            let arch = Arch::parse(arch).unwrap();
            for src in super::super::SOURCES {
                let cubin = compile_source(src.name, src.source, arch)
                    .unwrap_or_else(|e| panic!("{} {arch}: {e}", src.name));
                assert_eq!(&cubin[..4], b"\x7fELF");
            }
        }
    }

    #[test]
    fn broken_source_reports_log() {
        if !nvrtc_or_skip() {
            return;
        }
        let err = compile_source(
            "broken",
            "#include \"common.cuh\"\nextern \"C\" __global__ void k() { undefined_thing(); }",
            Arch::parse("sm_86").unwrap(),
        )
        .unwrap_err();
        match err {
            Error::Compile { log, .. } => assert!(log.contains("undefined_thing"), "{log}"),
            other => panic!("expected Compile, got {other:?}"),
        }
    }
}
