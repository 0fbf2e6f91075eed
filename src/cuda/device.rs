//! One [`GpuDevice`] per ordinal: PyTorch's primary context, loaded modules, resolved entries,
//! and a launch that takes a raw stream handle.
//!
//! The op path (`function` on a cached entry + `launch`) allocates nothing on the GPU,
//! records no events and never synchronises, so it is safe inside CUDA-graph capture. Module
//! loading is not: call [`GpuDevice::warmup`] (Python: `gptoss_3090.runtime.warmup()`) before
//! capturing; a first use during capture is reported as a clear error instead.

use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void, CString};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::result as dr;
use cudarc::driver::sys;
use cudarc::driver::CudaContext;

use super::compile::{compile_cubin, compile_families, evict};
use super::{entry_names, forced_tuning, guard, source, Arch, Tuning, SOURCES};
use crate::error::{Error, Result};

/// A resolved kernel entry. Cheap to clone; valid for the life of its [`GpuDevice`].
#[derive(Clone, Debug)]
pub struct KernelFn {
    func: RawFunction,
    /// `source/entry`, for error messages.
    name: Arc<str>,
    /// The `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` currently set on the function.
    dyn_smem_limit: Arc<AtomicU32>,
    /// Blocks per SM already asked of the driver, by (threads, dynamic shared memory): the
    /// answer is fixed per function, and launchers ask on every call.
    occupancy: Arc<Mutex<Vec<OccupancyEntry>>>,
    /// Static shared memory bytes, once asked.
    static_smem: Arc<OnceLock<u32>>,
    /// Clusters that can run at once, already asked of the driver, by (blocks per cluster
    /// along y, threads, dynamic shared memory).
    clusters: Arc<Mutex<Vec<ClusterEntry>>>,
}

/// ((blocks per cluster, threads, dynamic shared memory bytes), clusters at once).
type ClusterEntry = ((u32, u32, u32), u32);

/// Launch attributes of [`GpuDevice::launch_ex`] (sm_90+ where any is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchOptions {
    /// Blocks per thread-block cluster along y (1 = no clusters).
    pub cluster_y: u32,
    /// Programmatic dependent launch: the kernel may start while the previous one drains.
    pub pdl: bool,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            cluster_y: 1,
            pdl: false,
        }
    }
}

/// ((threads, dynamic shared memory bytes), blocks per SM).
type OccupancyEntry = ((u32, u32), u32);

impl KernelFn {
    /// `source/entry`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[derive(Clone, Copy, Debug)]
struct RawFunction(sys::CUfunction);
// SAFETY: a CUfunction handle is a plain driver handle, usable from any thread once the owning
// context is current; the module it comes from lives as long as the GpuDevice (never unloaded).
unsafe impl Send for RawFunction {}
unsafe impl Sync for RawFunction {}

#[derive(Clone, Copy, Debug)]
struct RawModule(sys::CUmodule);
// SAFETY: as above; modules are never unloaded while the process runs.
unsafe impl Send for RawModule {}
unsafe impl Sync for RawModule {}

/// A CUDA device on PyTorch's primary context.
pub struct GpuDevice {
    ctx: Arc<CudaContext>,
    ordinal: i32,
    arch: Arch,
    name: String,
    sm_count: u32,
    smem_optin: u32,
    smem_per_sm: u32,
    l2_bytes: u32,
    total_mem: usize,
    modules: Mutex<HashMap<&'static str, RawModule>>,
    functions: Mutex<HashMap<(String, String), KernelFn>>,
}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDevice")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("arch", &self.arch)
            .finish()
    }
}

static DEVICES: OnceLock<Mutex<HashMap<i32, Arc<GpuDevice>>>> = OnceLock::new();

fn drv(context: &str, e: dr::DriverError) -> Error {
    let name = e
        .error_name()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e
        .error_string()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    Error::Driver {
        context: context.to_string(),
        message: if text.is_empty() {
            name
        } else {
            format!("{name}: {text}")
        },
    }
}

/// Checks that `libcuda.so` can be opened (before any cudarc driver call, which would panic).
fn driver_present() -> Result<()> {
    static PRESENT: OnceLock<()> = OnceLock::new();
    if PRESENT.get().is_some() {
        return Ok(());
    }
    // SAFETY: only tries to dlopen the candidate library names.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NoDriver(
            "install the NVIDIA driver (libcuda.so.1 comes with it, not with pip packages)"
                .to_string(),
        ));
    }
    let _ = PRESENT.set(());
    Ok(())
}

/// Whether the NVIDIA driver library loads and `cuInit` succeeds (no device needed beyond that).
pub fn driver_available() -> bool {
    driver_present().is_ok() && guard("cuInit", || dr::init().map_err(|e| drv("cuInit", e))).is_ok()
}

/// The driver's CUDA version, e.g. 13000 for 13.0.
pub fn driver_version() -> Result<i32> {
    driver_present()?;
    guard("cuDriverGetVersion", || {
        let mut v: c_int = 0;
        // SAFETY: valid out-pointer.
        unsafe { sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(|e| drv("cuDriverGetVersion", e))?;
        Ok(v)
    })
}

/// The device object for `ordinal`, created on first use and cached for the process.
///
/// Errors: [`Error::NoDriver`] without libcuda, [`Error::Driver`] for a bad ordinal or a driver
/// failure, [`Error::UnsupportedGpu`] for GPUs older than sm_80.
pub fn device(ordinal: i32) -> Result<Arc<GpuDevice>> {
    if ordinal < 0 {
        return Err(Error::arg(format!(
            "device ordinal must be >= 0, found {ordinal}"
        )));
    }
    let map = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    super::check_forced_tuning_env()?;
    driver_present()?;
    let dev = guard("creating the device", || GpuDevice::open(ordinal))?;
    let dev = Arc::new(dev);
    map.insert(ordinal, dev.clone());
    Ok(dev)
}

impl GpuDevice {
    fn open(ordinal: i32) -> Result<GpuDevice> {
        dr::init().map_err(|e| drv("cuInit", e))?;
        let count = dr::device::get_count().map_err(|e| drv("cuDeviceGetCount", e))?;
        if ordinal >= count {
            return Err(Error::Driver {
                context: "selecting the device".to_string(),
                message: format!("device ordinal {ordinal} does not exist ({count} CUDA devices)"),
            });
        }
        let ctx = CudaContext::new(ordinal as usize).map_err(|e| {
            drv(
                &format!("retaining the primary context of device {ordinal}"),
                e,
            )
        })?;
        use sys::CUdevice_attribute as A;
        let attr = |a: A, what: &str| -> Result<i32> {
            ctx.attribute(a)
                .map_err(|e| drv(&format!("cuDeviceGetAttribute({what})"), e))
        };
        let major = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, "cc major")?;
        let minor = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, "cc minor")?;
        let arch = Arch { major, minor };
        if !arch.is_supported() {
            return Err(Error::UnsupportedGpu {
                ordinal,
                major,
                minor,
            });
        }
        let sm_count = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "SM count")?;
        let smem_optin = attr(
            A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "opt-in shared memory per block",
        )?;
        let smem_per_sm = attr(
            A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            "shared memory per SM",
        )?;
        let l2 = attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, "L2 size")?;
        let cu_dev = ctx.cu_device();
        let name = dr::device::get_name(cu_dev).unwrap_or_else(|_| "unknown".to_string());
        // SAFETY: cu_dev is a valid device handle.
        let total_mem = unsafe { dr::device::total_mem(cu_dev) }.unwrap_or(0);
        Ok(GpuDevice {
            ctx,
            ordinal,
            arch,
            name,
            sm_count: sm_count.max(1) as u32,
            smem_optin: smem_optin.max(0) as u32,
            smem_per_sm: smem_per_sm.max(0) as u32,
            l2_bytes: l2.max(0) as u32,
            total_mem,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    /// The device name reported by the driver.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The real compute capability.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The tuning family from the hardware alone (ignores any override).
    pub fn natural_tuning(&self) -> Tuning {
        Tuning::for_device(self.arch, self.smem_optin)
    }

    /// The launch-configuration family: the override (`GPTOSS_3090_FORCE_TUNING` or
    /// `set_tuning`) if any, else [`GpuDevice::natural_tuning`].
    pub fn tuning(&self) -> Tuning {
        forced_tuning().unwrap_or_else(|| self.natural_tuning())
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Largest dynamic shared memory one block may opt into.
    pub fn max_shared_per_block_optin(&self) -> u32 {
        self.smem_optin
    }

    /// Checks `dyn_smem` against the device and raises `f`'s dynamic shared memory limit to it
    /// if it is lower (the context must be bound).
    fn allow_dyn_smem(&self, f: &KernelFn, dyn_smem: u32) -> Result<()> {
        if dyn_smem > self.smem_optin {
            return Err(Error::arg(format!(
                "{}: {dyn_smem} bytes of dynamic shared memory requested, the device allows {}",
                f.name, self.smem_optin
            )));
        }
        if dyn_smem > f.dyn_smem_limit.load(Ordering::Relaxed) {
            // SAFETY: valid function handle; the value is within the device limit (checked
            // above).
            unsafe {
                sys::cuFuncSetAttribute(
                    f.func.0,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    dyn_smem as c_int,
                )
            }
            .result()
            .map_err(|e| drv(&format!("raising the shared memory limit of {}", f.name), e))?;
            f.dyn_smem_limit.fetch_max(dyn_smem, Ordering::Relaxed);
        }
        Ok(())
    }

    /// How many blocks of `threads` threads with `dyn_smem` bytes of dynamic shared memory one
    /// SM holds at once for `f` (registers, static and dynamic shared memory all counted).
    pub fn max_active_blocks(&self, f: &KernelFn, threads: u32, dyn_smem: u32) -> Result<u32> {
        memoized(&f.occupancy, (threads, dyn_smem), || {
            self.ask_max_active_blocks(f, threads, dyn_smem)
        })
    }

    /// The driver's answer for [`GpuDevice::max_active_blocks`].
    fn ask_max_active_blocks(&self, f: &KernelFn, threads: u32, dyn_smem: u32) -> Result<u32> {
        self.bind()?;
        // The occupancy calculator counts a dynamic size above the function's limit as not
        // launchable (0 blocks), so the limit is raised first, as the launch will.
        self.allow_dyn_smem(f, dyn_smem)?;
        let mut n: c_int = 0;
        // SAFETY: valid function handle of this context; `n` outlives the call.
        unsafe {
            sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                &mut n,
                f.func.0,
                threads as c_int,
                dyn_smem as usize,
            )
        }
        .result()
        .map_err(|e| drv(&format!("occupancy of {}", f.name), e))?;
        Ok(n.max(1) as u32)
    }

    /// Whether this GPU has the sm_90 launch attributes of [`LaunchOptions`]: thread-block
    /// clusters and programmatic dependent launch (compute capability 9.0 and newer).
    pub fn has_sm90_launch(&self) -> bool {
        self.arch.major >= 9
    }

    /// [`GpuDevice::has_sm90_launch`] as a clear error naming `f`.
    fn require_sm90_launch(&self, f: &KernelFn) -> Result<()> {
        if self.has_sm90_launch() {
            return Ok(());
        }
        Err(Error::arg(format!(
            "{}: thread-block clusters and programmatic dependent launch need compute \
             capability 9.0, this GPU is {}",
            f.name, self.arch
        )))
    }

    /// How many clusters of (1, `cluster_y`, 1) blocks of `threads` threads with `dyn_smem`
    /// bytes of dynamic shared memory the whole GPU runs at once for `f` (clusters must fit
    /// inside one GPC, so this can be less than the blocks per SM times the SMs suggest).
    pub fn max_active_clusters(
        &self,
        f: &KernelFn,
        cluster_y: u32,
        threads: u32,
        dyn_smem: u32,
    ) -> Result<u32> {
        self.require_sm90_launch(f)?;
        memoized(&f.clusters, (cluster_y, threads, dyn_smem), || {
            self.ask_max_active_clusters(f, cluster_y, threads, dyn_smem)
        })
    }

    /// The driver's answer for [`GpuDevice::max_active_clusters`].
    fn ask_max_active_clusters(
        &self,
        f: &KernelFn,
        cluster_y: u32,
        threads: u32,
        dyn_smem: u32,
    ) -> Result<u32> {
        self.bind()?;
        self.allow_dyn_smem(f, dyn_smem)?;
        let mut attrs = vec![cluster_attribute(cluster_y)];
        // The grid only has to be a whole number of clusters here.
        let config = launch_config((1, cluster_y, 1), (threads, 1, 1), dyn_smem, 0, &mut attrs);
        let mut n: c_int = 0;
        // SAFETY: valid function handle of this context; `config` and the attribute it points
        // at outlive the call, as does `n`.
        unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, f.func.0, &config) }
            .result()
            .map_err(|e| drv(&format!("cluster occupancy of {}", f.name), e))?;
        Ok(n.max(0) as u32)
    }

    /// Like [`GpuDevice::launch`], with the launch attributes of `opts` (through
    /// `cuLaunchKernelEx`); with none set it is a plain launch.
    ///
    /// # Safety
    /// As [`GpuDevice::launch`]; with `opts.pdl`, the kernel must also execute
    /// `griddepcontrol.wait` (kernels/common.cuh `pdl_wait`) before it reads anything the
    /// previous work in the stream writes or writes anything that work reads.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn launch_ex<P: Copy>(
        &self,
        f: &KernelFn,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        dyn_smem: u32,
        stream: u64,
        params: &P,
        opts: LaunchOptions,
    ) -> Result<()> {
        if opts.cluster_y <= 1 && !opts.pdl {
            // SAFETY: forwarded contract.
            return unsafe { self.launch(f, grid, block, dyn_smem, stream, params) };
        }
        check_launch_dims(f, grid, block)?;
        self.require_sm90_launch(f)?;
        if !(1..=8).contains(&opts.cluster_y) || grid.1 % opts.cluster_y != 0 {
            return Err(Error::arg(format!(
                "{}: cluster of {} blocks along y for grid {grid:?} (1..=8, dividing the grid)",
                f.name, opts.cluster_y
            )));
        }
        self.bind()?;
        self.allow_dyn_smem(f, dyn_smem)?;
        let mut attrs = Vec::with_capacity(2);
        if opts.cluster_y > 1 {
            attrs.push(cluster_attribute(opts.cluster_y));
        }
        if opts.pdl {
            attrs.push(pdl_attribute());
        }
        let config = launch_config(grid, block, dyn_smem, stream, &mut attrs);
        let mut args: [*mut c_void; 1] = [params as *const P as *mut c_void];
        // SAFETY: forwarded to the caller's contract; `config` and its attributes outlive the
        // call, and `args[0]` points at the params struct, which the driver copies before
        // returning.
        unsafe { sys::cuLaunchKernelEx(&config, f.func.0, args.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(|e| drv(&format!("launching {} ({opts:?})", f.name), e))
    }

    /// Static shared memory of `f` in bytes (what the kernel declares with `__shared__`).
    pub fn static_smem(&self, f: &KernelFn) -> Result<u32> {
        if let Some(&n) = f.static_smem.get() {
            return Ok(n);
        }
        self.bind()?;
        let mut n: c_int = 0;
        // SAFETY: valid function handle of this context; `n` outlives the call.
        unsafe {
            sys::cuFuncGetAttribute(
                &mut n,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                f.func.0,
            )
        }
        .result()
        .map_err(|e| drv(&format!("static shared memory of {}", f.name), e))?;
        let n = n.max(0) as u32;
        Ok(*f.static_smem.get_or_init(|| n))
    }

    /// Shared memory per SM.
    pub fn shared_per_sm(&self) -> u32 {
        self.smem_per_sm
    }

    /// L2 cache size in bytes.
    pub fn l2_bytes(&self) -> u32 {
        self.l2_bytes
    }

    /// Total device memory in bytes.
    pub fn total_mem(&self) -> usize {
        self.total_mem
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| drv("binding the primary context to this thread", e))
    }

    /// Whether `stream` (a raw `CUstream`, 0 = legacy default) is capturing a CUDA graph.
    pub fn is_capturing(&self, stream: u64) -> Result<bool> {
        self.bind()?;
        guard("cuStreamIsCapturing", || {
            // SAFETY: the caller passes a stream of this context (torch's current stream).
            let status = unsafe { dr::stream::is_capturing(stream as sys::CUstream) }
                .map_err(|e| drv("cuStreamIsCapturing", e))?;
            Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
        })
    }

    fn load_module(&self, name: &'static str) -> Result<RawModule> {
        self.load_module_with(name, None)
    }

    /// [`GpuDevice::load_module`] with the family's cubin when the caller compiled it already
    /// (`warmup`); `None` compiles it (disk cache).
    fn load_module_with(&self, name: &'static str, compiled: Option<Vec<u8>>) -> Result<RawModule> {
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = modules.get(name) {
            return Ok(*m);
        }
        let src = source(name)?;
        let cubin = match compiled {
            Some(cubin) => cubin,
            None => compile_cubin(src, self.arch)?,
        };
        self.bind()?;
        let load = |cubin: &[u8]| -> std::result::Result<sys::CUmodule, dr::DriverError> {
            // SAFETY: cubin is a complete ELF image that outlives the call.
            unsafe { dr::module::load_data(cubin.as_ptr() as *const c_void) }
        };
        let module = match load(&cubin) {
            Ok(m) => m,
            Err(e) if is_capture_error(&e) => return Err(capture_error(name)),
            Err(_) => {
                // A stale or damaged cache entry: recompile once from source.
                evict(src, self.arch);
                let fresh = super::compile::compile_source(src.name, src.source, self.arch)?;
                load(&fresh).map_err(|e| {
                    if is_capture_error(&e) {
                        capture_error(name)
                    } else {
                        drv(&format!("loading kernels/{name}.cu for {}", self.arch), e)
                    }
                })?
            }
        };
        let m = RawModule(module);
        modules.insert(name, m);
        Ok(m)
    }

    /// Resolves `entry` in kernel family `source`, compiling (disk cache) and loading the module
    /// on first use. Later calls are a hash-map lookup.
    pub fn function(&self, source_name: &str, entry: &str) -> Result<KernelFn> {
        let key = (source_name.to_string(), entry.to_string());
        {
            let f = self.functions.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(k) = f.get(&key) {
                return Ok(k.clone());
            }
        }
        // The program holding the entry: a MoE family's fp16 entries are compiled apart.
        let src = source(source(source_name)?.program_for(entry))?;
        guard("resolving a kernel", || {
            let module = self.load_module(src.name)?;
            let entry_c = CString::new(entry)
                .map_err(|_| Error::arg(format!("kernel entry '{entry}' contains a NUL byte")))?;
            self.bind()?;
            // SAFETY: module is loaded; entry_c is a valid C string.
            let func = unsafe { dr::module::get_function(module.0, entry_c) }.map_err(|e| {
                if is_capture_error(&e) {
                    capture_error(source_name)
                } else {
                    drv(
                        &format!("finding entry '{entry}' in kernels/{source_name}.cu"),
                        e,
                    )
                }
            })?;
            let k = KernelFn {
                func: RawFunction(func),
                name: Arc::from(format!("{source_name}/{entry}")),
                // 0, not 48 KB: a kernel with static shared memory may only add 48 KB minus it
                // by default, so every dynamic size is raised explicitly once.
                dyn_smem_limit: Arc::new(AtomicU32::new(0)),
                occupancy: Arc::new(Mutex::new(Vec::new())),
                static_smem: Arc::new(OnceLock::new()),
                clusters: Arc::new(Mutex::new(Vec::new())),
            };
            let mut f = self.functions.lock().unwrap_or_else(|p| p.into_inner());
            Ok(f.entry(key).or_insert(k).clone())
        })
    }

    /// Like [`GpuDevice::function`], but first checks that `stream` is not capturing when the
    /// entry is not loaded yet, so a first use inside `torch.cuda.graph` gives a clear error.
    pub fn function_for_stream(
        &self,
        source_name: &str,
        entry: &str,
        stream: u64,
    ) -> Result<KernelFn> {
        {
            let f = self.functions.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(k) = f.get(&(source_name.to_string(), entry.to_string())) {
                return Ok(k.clone());
            }
        }
        if self.is_capturing(stream)? {
            return Err(capture_error(source_name));
        }
        self.function(source_name, entry)
    }

    /// Compiles (disk cache) and loads every kernel family, and resolves and loads every entry,
    /// so that later launches (e.g. inside CUDA-graph capture) never load code.
    pub fn warmup(&self) -> Result<()> {
        // The families not loaded yet, compiled side by side first (compile_families): on a
        // fresh install this is most of the first start's time.
        let missing: Vec<&'static str> = {
            let modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            SOURCES
                .iter()
                .map(|s| s.name)
                .filter(|n| !modules.contains_key(n))
                .collect()
        };
        if missing.len() > 1 {
            for (name, cubin) in missing.iter().zip(compile_families(&missing, self.arch)?) {
                self.load_module_with(name, Some(cubin))?;
            }
        }
        for src in SOURCES {
            let module = self.load_module(src.name)?;
            // The driver lists the entries (CUDA 12.4+); older drivers: scan the source text
            // (which cannot see macro-generated names, so missing ones are skipped).
            let (names, listed) = match self.module_entries(module) {
                Ok(n) => (n, true),
                Err(_) => (entry_names(src.source), false),
            };
            for entry in names {
                let k = match self.function(src.name, &entry) {
                    Ok(k) => k,
                    Err(_) if !listed => continue,
                    Err(e) => return Err(e),
                };
                // Lazy loading (CUDA_MODULE_LOADING=LAZY) defers the real load to the first
                // launch; cuFuncLoad forces it now. Old drivers lack the symbol: ignore.
                let _ = guard("cuFuncLoad", || {
                    // SAFETY: k.func is a valid function handle of a loaded module.
                    let _ = unsafe { sys::cuFuncLoad(k.func.0) };
                    Ok(())
                });
            }
        }
        Ok(())
    }

    /// The names of every kernel entry in a loaded module, as the driver lists them.
    fn module_entries(&self, module: RawModule) -> Result<Vec<String>> {
        self.bind()?;
        guard("listing kernel entries", || {
            let mut count: c_uint = 0;
            // SAFETY: module is loaded; count is a valid out-pointer.
            unsafe { sys::cuModuleGetFunctionCount(&mut count, module.0) }
                .result()
                .map_err(|e| drv("cuModuleGetFunctionCount", e))?;
            let mut funcs: Vec<sys::CUfunction> = vec![std::ptr::null_mut(); count as usize];
            // SAFETY: funcs holds `count` slots.
            unsafe { sys::cuModuleEnumerateFunctions(funcs.as_mut_ptr(), count, module.0) }
                .result()
                .map_err(|e| drv("cuModuleEnumerateFunctions", e))?;
            let mut names = Vec::with_capacity(funcs.len());
            for f in funcs {
                let mut name: *const std::ffi::c_char = std::ptr::null();
                // SAFETY: f is a function handle of the module; name is an out-pointer to a
                // driver-owned C string.
                unsafe { sys::cuFuncGetName(&mut name, f) }
                    .result()
                    .map_err(|e| drv("cuFuncGetName", e))?;
                if !name.is_null() {
                    // SAFETY: the driver returns a NUL-terminated string it keeps alive.
                    let n = unsafe { std::ffi::CStr::from_ptr(name) };
                    names.push(n.to_string_lossy().into_owned());
                }
            }
            Ok(names)
        })
    }

    /// Launches `f` with ONE by-value parameter struct on the raw stream handle `stream`
    /// (`torch.cuda.current_stream().cuda_stream`). No allocation, no synchronisation, no
    /// events. Raises the function's dynamic shared memory limit when `dyn_smem` needs it.
    ///
    /// # Safety
    /// `P` must have exactly the layout of the kernel's parameter struct, every device pointer
    /// inside it must be valid for what the kernel reads and writes, and `stream` must belong
    /// to this device's primary context.
    pub unsafe fn launch<P: Copy>(
        &self,
        f: &KernelFn,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        dyn_smem: u32,
        stream: u64,
        params: &P,
    ) -> Result<()> {
        check_launch_dims(f, grid, block)?;
        self.bind()?;
        self.allow_dyn_smem(f, dyn_smem)?;
        let mut args: [*mut c_void; 1] = [params as *const P as *mut c_void];
        // SAFETY: forwarded to the caller's contract; `args[0]` points at the params struct,
        // which the driver copies before returning.
        unsafe {
            dr::launch_kernel(
                f.func.0,
                (grid.0 as c_uint, grid.1 as c_uint, grid.2 as c_uint),
                (block.0 as c_uint, block.1 as c_uint, block.2 as c_uint),
                dyn_smem as c_uint,
                stream as sys::CUstream,
                &mut args,
            )
        }
        .map_err(|e| drv(&format!("launching {}", f.name), e))
    }
}

impl GpuDevice {
    /// Zeroes `bytes` bytes at device address `ptr` in stream order on `stream` (a memset node
    /// when the stream is being captured). No allocation, no synchronisation.
    ///
    /// # Safety
    /// `ptr .. ptr + bytes` must be device memory of this device that the stream may write, and
    /// `stream` must belong to this device's primary context.
    pub unsafe fn zero_async(&self, ptr: u64, bytes: usize, stream: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: forwarded to the caller's contract.
        unsafe { dr::memset_d8_async(ptr as sys::CUdeviceptr, 0, bytes, stream as sys::CUstream) }
            .map_err(|e| drv("zeroing device memory (cuMemsetD8Async)", e))
    }
}

fn is_capture_error(e: &dr::DriverError) -> bool {
    use sys::CUresult as R;
    matches!(
        e.0,
        R::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
            | R::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT
            | R::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
            | R::CUDA_ERROR_CAPTURED_EVENT
    )
}

fn capture_error(source_name: &str) -> Error {
    Error::Driver {
        context: format!("loading kernels/{source_name}.cu"),
        message: "kernels cannot be compiled or loaded while a CUDA graph is being captured; \
                  call gptoss_3090.runtime.warmup() (or run the op once) before capture"
            .to_string(),
    }
}

/// The value cached under `key` in `cache`, or `ask`'s answer, cached (a driver query whose
/// answer is fixed per function and key, asked by launchers on every call). A failed `ask` is
/// not cached.
fn memoized<K: PartialEq + Copy>(
    cache: &Mutex<Vec<(K, u32)>>,
    key: K,
    ask: impl FnOnce() -> Result<u32>,
) -> Result<u32> {
    {
        let known = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&(_, n)) = known.iter().find(|(k, _)| *k == key) {
            return Ok(n);
        }
    }
    let n = ask()?;
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((key, n));
    Ok(n)
}

/// Rejects a grid or block the driver would refuse, with a message naming the kernel.
fn check_launch_dims(f: &KernelFn, grid: (u32, u32, u32), block: (u32, u32, u32)) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 || grid.1 > 65535 || grid.2 > 65535 {
        return Err(Error::arg(format!(
            "{}: invalid grid {grid:?} (each dimension >= 1; y, z <= 65535)",
            f.name
        )));
    }
    let threads = block.0 as u64 * block.1 as u64 * block.2 as u64;
    if threads == 0 || threads > 1024 {
        return Err(Error::arg(format!(
            "{}: invalid block {block:?} (1..=1024 threads)",
            f.name
        )));
    }
    Ok(())
}

/// The launch attribute for clusters of (1, `cluster_y`, 1) blocks.
fn cluster_attribute(cluster_y: u32) -> sys::CUlaunchAttribute {
    // SAFETY: a plain C struct and union of integers, for which all-zero is a valid value.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = 1;
    attr.value.clusterDim.y = cluster_y;
    attr.value.clusterDim.z = 1;
    attr
}

/// The launch attribute that lets a kernel start before the previous kernel in its stream has
/// finished (programmatic dependent launch, sm_90): it runs its prologue while that kernel
/// drains, and `griddepcontrol.wait` holds it where it needs that kernel's results.
fn pdl_attribute() -> sys::CUlaunchAttribute {
    // SAFETY: as in cluster_attribute.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    attr
}

/// A `cuLaunchKernelEx` configuration with `attrs` (which must outlive its use).
fn launch_config(
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    dyn_smem: u32,
    stream: u64,
    attrs: &mut [sys::CUlaunchAttribute],
) -> sys::CUlaunchConfig {
    sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block.0,
        blockDimY: block.1,
        blockDimZ: block.2,
        sharedMemBytes: dyn_smem,
        hStream: stream as sys::CUstream,
        attrs: attrs.as_mut_ptr(),
        numAttrs: attrs.len() as c_uint,
    }
}
