//! The CUDA runtime: driver and NVRTC loading, per-device state, compile cache, launches.
//!
//! Everything here works with cudarc's *dynamic loading*: `libcuda.so.1` and `libnvrtc.so.{13,12}`
//! are opened at run time, so the crate builds on machines without a CUDA toolkit. Before the
//! first cudarc call we check that the library can be opened and return [`Error::NoDriver`] /
//! [`Error::NoNvrtc`] instead of letting cudarc panic; every remaining cudarc entry point that
//! could panic (a missing symbol in an old driver) runs under [`guard`].
//!
//! Layout:
//! - [`KernelSource`], [`SOURCES`], [`COMMON_HEADER`]: the kernel families, embedded with
//!   `include_str!` (the wheel carries no loose `.cu` files).
//! - [`compile_cubin`] (module `compile`): NVRTC to a cubin for one exact [`Arch`], with an
//!   on-disk cache; needs no GPU. [`compile_families`] compiles several families at once.
//! - [`device`] / [`GpuDevice`] (module `device`): one object per ordinal on PyTorch's primary
//!   context; loads modules, resolves entries and launches on a borrowed stream handle.
//! - [`Tuning`]: the launch-configuration family (sm_80-like, sm_86-like, sm_90-like).

mod compile;
mod device;
pub mod py;

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

pub use compile::{
    cache_dir, compile_cubin, compile_families, compile_options, compile_source,
    compile_source_with, nvrtc_available, nvrtc_version,
};
pub use device::{device, driver_available, driver_version, GpuDevice, KernelFn, LaunchOptions};

use crate::error::{Error, Result};

/// One kernel family: `kernels/<file>.cu`, after an optional prelude of macro definitions,
/// compiled as one NVRTC program / one CUDA module.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// Family name: `"nf4"`, `"moe"`, `"moe_chunks"`, `"attention"`, or the fp16 halves of the
    /// MoE families, `"moe_f16"` and `"moe_chunks_f16"`.
    pub name: &'static str,
    /// The file under `kernels/`, without `.cu`.
    pub file: &'static str,
    /// Lines placed before the file's text (a build variant's `#define`s; empty for most).
    pub prelude: &'static str,
    /// The full text NVRTC compiles: prelude, then the `.cu` file, which includes `common.cuh`
    /// ([`COMMON_HEADER`]).
    pub source: &'static str,
    /// The program that holds this family's fp16 entries (names ending in `_f16`), when they
    /// are compiled apart: [`GpuDevice::function`] sends such an entry there.
    pub f16_program: Option<&'static str>,
}

impl KernelSource {
    /// The program (a [`SOURCES`] name) that defines `entry` of this family.
    pub fn program_for(&self, entry: &str) -> &'static str {
        match self.f16_program {
            Some(p) if entry.ends_with("_f16") => p,
            _ => self.name,
        }
    }
}

/// The prelude of the chunk-major builds (`STR_CHUNK_MAJOR`, kernels/common.cuh): their
/// streaming kernels and tiled GEMMs read experts repacked by
/// `gptoss_3090.moe.chunk_major_packed` (each 16-row group's 128-k chunk 1 KB contiguous), a
/// byte order DRAM serves faster than bitsandbytes' rows.
macro_rules! chunk_major_prelude {
    () => {
        "#define STR_CHUNK_MAJOR 1\n"
    };
}

/// Preludes that split moe.cu into its bf16 and fp16 entries (`MOE_MAIN_ENTRIES`,
/// `MOE_F16_ENTRIES` in kernels/moe.cu): a bf16 model compiles and loads only the first half.
macro_rules! bf16_entries_prelude {
    () => {
        "#define MOE_F16_ENTRIES 0\n"
    };
}
macro_rules! f16_entries_prelude {
    () => {
        "#define MOE_MAIN_ENTRIES 0\n"
    };
}

/// `kernels/common.cuh`, handed to NVRTC as the header named `common.cuh`.
pub const COMMON_HEADER: &str = include_str!("../../kernels/common.cuh");

/// Every kernel family of the package, in the order `warmup` compiles them.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "nf4",
        file: "nf4",
        prelude: "",
        source: include_str!("../../kernels/nf4.cu"),
        f16_program: None,
    },
    KernelSource {
        name: "moe",
        file: "moe",
        prelude: bf16_entries_prelude!(),
        source: concat!(
            bf16_entries_prelude!(),
            include_str!("../../kernels/moe.cu")
        ),
        f16_program: Some("moe_f16"),
    },
    KernelSource {
        name: "moe_chunks",
        file: "moe",
        prelude: concat!(chunk_major_prelude!(), bf16_entries_prelude!()),
        source: concat!(
            chunk_major_prelude!(),
            bf16_entries_prelude!(),
            include_str!("../../kernels/moe.cu")
        ),
        f16_program: Some("moe_chunks_f16"),
    },
    KernelSource {
        name: "attention",
        file: "attention",
        prelude: "",
        source: include_str!("../../kernels/attention.cu"),
        f16_program: None,
    },
    KernelSource {
        name: "moe_f16",
        file: "moe",
        prelude: f16_entries_prelude!(),
        source: concat!(f16_entries_prelude!(), include_str!("../../kernels/moe.cu")),
        f16_program: None,
    },
    KernelSource {
        name: "moe_chunks_f16",
        file: "moe",
        prelude: concat!(chunk_major_prelude!(), f16_entries_prelude!()),
        source: concat!(
            chunk_major_prelude!(),
            f16_entries_prelude!(),
            include_str!("../../kernels/moe.cu")
        ),
        f16_program: None,
    },
];

/// Development override: when `GPTOSS_3090_KERNEL_DIR` names a folder, the runtime compiles
/// `<dir>/<family>.cu` and `<dir>/common.cuh` from there instead of the embedded copies (kernel
/// work on a GPU host without rebuilding the extension). Unset in normal use.
pub const KERNEL_DIR_ENV: &str = "GPTOSS_3090_KERNEL_DIR";

fn override_text(file: &str) -> Option<&'static str> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static TEXTS: OnceLock<Mutex<HashMap<String, &'static str>>> = OnceLock::new();
    let dir = std::env::var(KERNEL_DIR_ENV)
        .ok()
        .filter(|d| !d.trim().is_empty())?;
    let path = std::path::Path::new(dir.trim()).join(file);
    let key = path.to_string_lossy().into_owned();
    let map = TEXTS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(t) = map.get(&key) {
        return Some(t);
    }
    let text = std::fs::read_to_string(&path).ok()?;
    // Leaked once per file per process: the runtime keeps kernel texts for its whole life.
    let leaked: &'static str = Box::leak(text.into_boxed_str());
    map.insert(key, leaked);
    Some(leaked)
}

/// `common.cuh` as the runtime compiles it (the embedded copy unless overridden).
pub fn common_header() -> &'static str {
    override_text("common.cuh").unwrap_or(COMMON_HEADER)
}

/// Looks a kernel family up by name (honouring `GPTOSS_3090_KERNEL_DIR`).
pub fn source(name: &str) -> Result<&'static KernelSource> {
    if let Some(builtin) = SOURCES.iter().find(|s| s.name == name) {
        if let Some(text) = override_text(&format!("{}.cu", builtin.file)) {
            let text = if builtin.prelude.is_empty() {
                text
            } else {
                // Leaked once per lookup; development override only.
                Box::leak(format!("{}{text}", builtin.prelude).into_boxed_str())
            };
            let leaked: &'static KernelSource = Box::leak(Box::new(KernelSource {
                source: text,
                ..*builtin
            }));
            return Ok(leaked);
        }
    }
    SOURCES.iter().find(|s| s.name == name).ok_or_else(|| {
        let known: Vec<&str> = SOURCES.iter().map(|s| s.name).collect();
        Error::arg(format!(
            "unknown kernel source '{name}'; expected one of {known:?}"
        ))
    })
}

/// The names of the `extern "C" __global__` entries declared in a source (text scan).
///
/// Used by `warmup` to resolve and load every entry before CUDA-graph capture. An entry is
/// written `extern "C" __global__ void NAME(` (whitespace between tokens is free; a
/// `__launch_bounds__(...)` between `__global__` and `void` is allowed).
pub fn entry_names(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = source;
    while let Some(pos) = rest.find("extern \"C\"") {
        rest = &rest[pos + "extern \"C\"".len()..];
        let head = rest.trim_start();
        let Some(after_global) = head.strip_prefix("__global__") else {
            continue;
        };
        let mut after = after_global.trim_start();
        if let Some(lb) = after.strip_prefix("__launch_bounds__") {
            match lb.find(')') {
                Some(close) => after = lb[close + 1..].trim_start(),
                None => continue,
            }
        }
        let Some(after_void) = after.strip_prefix("void") else {
            continue;
        };
        let mut tail = after_void.trim_start();
        if let Some(lb) = tail.strip_prefix("__launch_bounds__") {
            match lb.find(')') {
                Some(close) => tail = lb[close + 1..].trim_start_matches([' ', '\t', '\\', '\n']),
                None => continue,
            }
        }
        let name: String = tail
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let rest_after = &tail[name.len()..];
        // Macro-generated names (`a_##NAME##_b`) cannot be known from the text: skip them.
        if !name.is_empty() && !rest_after.starts_with("##") && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// A GPU architecture `sm_<major><minor>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arch {
    /// Compute-capability major version (8 for Ampere/Ada, 9 for Hopper).
    pub major: i32,
    /// Compute-capability minor version.
    pub minor: i32,
}

impl Arch {
    /// Parses `"sm_86"`, `"sm86"`, `"86"`, `"8.6"` or `"compute_86"`.
    pub fn parse(text: &str) -> Result<Arch> {
        let t = text.trim();
        let bad = || {
            Error::arg(format!(
                "arch '{text}': expected 'sm_XY' (e.g. 'sm_86'), 'XY' or 'X.Y'"
            ))
        };
        let digits = t
            .strip_prefix("sm_")
            .or_else(|| t.strip_prefix("sm"))
            .or_else(|| t.strip_prefix("compute_"))
            .unwrap_or(t);
        let (major, minor) = if let Some((a, b)) = digits.split_once('.') {
            (
                a.parse::<i32>().map_err(|_| bad())?,
                b.parse::<i32>().map_err(|_| bad())?,
            )
        } else {
            if digits.len() < 2 || !digits.chars().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            let (a, b) = digits.split_at(digits.len() - 1);
            (
                a.parse::<i32>().map_err(|_| bad())?,
                b.parse::<i32>().map_err(|_| bad())?,
            )
        };
        if !(1..=20).contains(&major) || !(0..=9).contains(&minor) {
            return Err(bad());
        }
        Ok(Arch { major, minor })
    }

    /// `major * 10 + minor`, e.g. 86.
    pub fn number(self) -> i32 {
        self.major * 10 + self.minor
    }

    /// Whether the kernels support this architecture (sm_80 or newer).
    pub fn is_supported(self) -> bool {
        self.major >= 8
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// Launch-configuration family. Kernels for every family are compiled into every module; the
/// launchers pick tile shapes, pipeline depths and block sizes from this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tuning {
    /// A100-like: 164 KB shared memory per block, 40 MB L2.
    Sm80,
    /// RTX 3090 / 4090-like (sm_86, sm_89, and any GPU with < 160 KB opt-in shared memory):
    /// 99 KB shared memory per block, small L2 (6 MB on a 3090).
    Sm86,
    /// H100-like: 227 KB shared memory per block, 50 MB L2.
    Sm90,
}

impl Tuning {
    /// The family a GPU falls into by its arch and opt-in shared memory per block.
    pub fn for_device(arch: Arch, smem_optin: u32) -> Tuning {
        if smem_optin < 160 * 1024 || (arch.major == 8 && (arch.minor == 6 || arch.minor == 9)) {
            Tuning::Sm86
        } else if arch.major >= 9 {
            Tuning::Sm90
        } else {
            Tuning::Sm80
        }
    }

    /// Parses `"sm80"`, `"sm_86"`, `"sm90"` (case-insensitive).
    pub fn parse(text: &str) -> Result<Tuning> {
        match text.trim().to_ascii_lowercase().replace('_', "").as_str() {
            "sm80" => Ok(Tuning::Sm80),
            "sm86" | "sm89" => Ok(Tuning::Sm86),
            "sm90" => Ok(Tuning::Sm90),
            _ => Err(Error::arg(format!(
                "tuning '{text}': expected 'sm80', 'sm86' or 'sm90'"
            ))),
        }
    }

    /// `"sm80"`, `"sm86"` or `"sm90"`.
    pub fn name(self) -> &'static str {
        match self {
            Tuning::Sm80 => "sm80",
            Tuning::Sm86 => "sm86",
            Tuning::Sm90 => "sm90",
        }
    }

    /// The largest dynamic shared memory a launch configuration of this family may use.
    pub fn smem_budget(self) -> u32 {
        match self {
            Tuning::Sm80 => 160 * 1024,
            Tuning::Sm86 => 99 * 1024,
            Tuning::Sm90 => 224 * 1024,
        }
    }

    /// Shared memory of one SM (what resident blocks share; the runtime reserves 1 KB per block).
    pub fn smem_per_sm(self) -> u32 {
        match self {
            Tuning::Sm80 => 164 * 1024,
            Tuning::Sm86 => 100 * 1024,
            Tuning::Sm90 => 228 * 1024,
        }
    }

    fn code(self) -> u8 {
        match self {
            Tuning::Sm80 => 1,
            Tuning::Sm86 => 2,
            Tuning::Sm90 => 3,
        }
    }

    fn from_code(code: u8) -> Option<Tuning> {
        match code {
            1 => Some(Tuning::Sm80),
            2 => Some(Tuning::Sm86),
            3 => Some(Tuning::Sm90),
            _ => None,
        }
    }
}

impl fmt::Display for Tuning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Environment variable that forces a tuning family on every GPU (e.g. `sm86` on an H100).
pub const FORCE_TUNING_ENV: &str = "GPTOSS_3090_FORCE_TUNING";

// 0 = not yet initialised from the environment, 255 = no override, else Tuning::code().
static FORCED_TUNING: AtomicU8 = AtomicU8::new(0);
const NO_OVERRIDE: u8 = 255;

/// [`FORCE_TUNING_ENV`]'s setting (`None`: unset or empty), or an error naming the variable.
pub fn forced_tuning_for(setting: Option<&str>) -> Result<Option<Tuning>> {
    match setting.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => Tuning::parse(v).map(Some).map_err(|_| {
            Error::arg(format!(
                "{FORCE_TUNING_ENV}={v:?}: expected sm80, sm86 or sm90 (or unset)"
            ))
        }),
    }
}

/// Fails when [`FORCE_TUNING_ENV`] holds a value [`Tuning::parse`] rejects, so that a misspelt
/// override (which [`forced_tuning`] cannot report) stops the first device open instead of
/// silently running the GPU's own configuration.
pub fn check_forced_tuning_env() -> Result<()> {
    forced_tuning_for(std::env::var(FORCE_TUNING_ENV).ok().as_deref()).map(|_| ())
}

/// The process-wide tuning override: [`set_tuning`] if called, else `GPTOSS_3090_FORCE_TUNING`.
pub fn forced_tuning() -> Option<Tuning> {
    let mut code = FORCED_TUNING.load(Ordering::Relaxed);
    if code == 0 {
        // An invalid value is an error where a device is first opened (check_forced_tuning_env);
        // here it only leaves the natural tuning.
        code = match forced_tuning_for(std::env::var(FORCE_TUNING_ENV).ok().as_deref()) {
            Ok(Some(t)) => t.code(),
            _ => NO_OVERRIDE,
        };
        // Another thread may have called set_tuning meanwhile; keep its value.
        let _ = FORCED_TUNING.compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
        code = FORCED_TUNING.load(Ordering::Relaxed);
    }
    Tuning::from_code(code)
}

/// Forces (`Some`) or clears (`None`) the tuning override for every device.
pub fn set_tuning(tuning: Option<Tuning>) {
    let code = tuning.map(Tuning::code).unwrap_or(NO_OVERRIDE);
    FORCED_TUNING.store(code, Ordering::Relaxed);
}

/// Runs `f`, turning a panic inside cudarc (e.g. a driver that lacks a symbol) into
/// [`Error::Driver`] so that no panic crosses into Python.
pub fn guard<T>(context: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic inside cudarc".to_string());
            Err(Error::Driver {
                context: context.to_string(),
                message,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn forced_tuning_setting_is_parsed_or_named_in_the_error() {
        assert_eq!(forced_tuning_for(None).unwrap(), None);
        assert_eq!(forced_tuning_for(Some("  ")).unwrap(), None);
        assert_eq!(forced_tuning_for(Some("sm86")).unwrap(), Some(Tuning::Sm86));
        assert_eq!(
            forced_tuning_for(Some(" SM_90 ")).unwrap(),
            Some(Tuning::Sm90)
        );
        let e = forced_tuning_for(Some("sm68")).unwrap_err().to_string();
        assert!(
            e.contains(FORCE_TUNING_ENV) && e.contains("\"sm68\""),
            "{e}"
        );
    }

    use super::*;

    #[test]
    fn arch_parse_forms() {
        for t in ["sm_86", "sm86", "86", "8.6", "compute_86"] {
            assert_eq!(Arch::parse(t).unwrap(), Arch { major: 8, minor: 6 }, "{t}");
        }
        assert_eq!(Arch::parse("sm_90").unwrap().to_string(), "sm_90");
        assert_eq!(
            Arch::parse("sm_100").unwrap(),
            Arch {
                major: 10,
                minor: 0
            }
        );
        for t in ["", "sm_", "x86", "8", "sm_8a"] {
            assert!(Arch::parse(t).is_err(), "{t}");
        }
    }

    #[test]
    fn tuning_families() {
        let a = |s| Arch::parse(s).unwrap();
        assert_eq!(Tuning::for_device(a("sm_80"), 163 * 1024), Tuning::Sm80);
        assert_eq!(Tuning::for_device(a("sm_86"), 99 * 1024), Tuning::Sm86);
        assert_eq!(Tuning::for_device(a("sm_89"), 99 * 1024), Tuning::Sm86);
        assert_eq!(Tuning::for_device(a("sm_90"), 227 * 1024), Tuning::Sm90);
        assert_eq!(Tuning::for_device(a("sm_120"), 99 * 1024), Tuning::Sm86);
        assert_eq!(Tuning::parse("SM_86").unwrap(), Tuning::Sm86);
        assert!(Tuning::parse("sm75").is_err());
    }

    #[test]
    fn moe_fp16_entries_live_in_their_own_programs() {
        for (family, f16) in [("moe", "moe_f16"), ("moe_chunks", "moe_chunks_f16")] {
            let main = source(family).unwrap();
            assert_eq!(main.program_for("moe_str_up_n2_bf16"), family);
            assert_eq!(main.program_for("moe_str_up_n2_f16"), f16);
            let half = source(f16).unwrap();
            assert_eq!(half.file, "moe");
            assert_eq!(half.program_for("moe_str_up_n2_f16"), f16);
            assert!(main.source.contains("#define MOE_F16_ENTRIES 0\n"));
            assert!(half.source.contains("#define MOE_MAIN_ENTRIES 0\n"));
            assert_eq!(
                main.source.contains("STR_CHUNK_MAJOR"),
                half.source.contains("STR_CHUNK_MAJOR")
            );
        }
        for other in ["nf4", "attention"] {
            assert_eq!(source(other).unwrap().program_for("x_f16"), other);
        }
    }

    #[test]
    fn entries_are_found() {
        let src = "extern \"C\" __global__ void a_bf16(const P p) {}\n\
                   extern \"C\" __global__ __launch_bounds__(256, 2) void b_f16(const P p) {}\n\
                   extern \"C\" { int x; }\n\
                   extern \"C\" __global__ void __launch_bounds__(128) c_f16(const P p) {}\n\
                   extern \"C\" __global__ void __launch_bounds__(8) m_##N##_f16(const P p) {}\n";
        assert_eq!(
            entry_names(src),
            vec![
                "a_bf16".to_string(),
                "b_f16".to_string(),
                "c_f16".to_string()
            ]
        );
    }

    #[test]
    fn sources_are_registered() {
        assert!(source("nf4").is_ok());
        assert!(source("moe").is_ok());
        assert!(source("attention").is_ok());
        let chunks = source("moe_chunks").unwrap();
        assert_eq!(chunks.file, "moe");
        assert!(chunks.source.starts_with(chunks.prelude));
        assert!(chunks.source.ends_with(source("moe").unwrap().source));
        assert!(source("nope").is_err());
    }
}
