"""The GPU runtime from Python: device facts, warm-up, tuning override, linear strategy.

Kernels are compiled by NVRTC for the GPU's exact architecture the first time they are used
(cached on disk under ``$GPTOSS_3090_CACHE`` or ``~/.cache/gptoss_3090/kernels``). Call
:func:`warmup` once before capturing CUDA graphs: compiling or loading code during capture is
impossible, and the ops raise a clear ``CudaError`` if it would happen.

Example::

    import gptoss_3090.runtime as rt
    rt.device_info()          # {'name': 'NVIDIA GeForce RTX 3090', 'arch': 'sm_86', ...}
    rt.warmup()               # compile + load every kernel now
    rt.compile_in_background(["moe_chunks"])  # or only compile, off the calling thread
    with rt.forced_tuning("sm86"):
        ...                   # run with the RTX 3090 launch configurations on any GPU
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from gptoss_3090 import _native
from gptoss_3090._cuda_libs import nvrtc_report, preload_nvrtc

__all__ = [
    "LINEAR_STRATEGIES",
    "KernelCompileThread",
    "compile_in_background",
    "device_info",
    "doctor",
    "ensure_cuda_libs",
    "forced_tuning",
    "linear_strategy",
    "ordinal_of",
    "set_linear_strategy",
    "set_tuning",
    "tuning",
    "warmup",
]

LINEAR_STRATEGIES = ("auto", "kernel", "dequant_matmul")
"""How ``nf4_linear`` runs for M > 16 rows (M <= 16 always uses the streaming or the decode
kernel; ``auto`` and ``kernel`` also stream M <= 32 through weights of 16-row parts):

* ``kernel``: our tensor-core kernel (weights dequantized tile by tile in shared memory);
* ``dequant_matmul``: dequantize the whole weight into a scratch tensor, then ``torch.matmul``
  (cuBLAS); costs one extra weight-sized write + read but uses cuBLAS's best kernels (on sm_90
  these are wgmma kernels that mma.sync cannot match);
* ``auto``: on a GPU whose tuning family is sm90, the wide streaming kernel for 32 < M <= 64
  (weights of 16-row parts, :func:`use_wide_linear`), then ``dequant_matmul`` when M >=
  ``GPTOSS_3090_DEQUANT_MIN_M`` (default 64); else ``kernel``. (Decided by
  bench/bench_nf4_linear.py: with the coalesced dequantize kernel the two cross near M = 48-64
  on vLLM's q/k/v and o shapes, and dequantize + cuBLAS is 1.4-1.9x faster at M = 96-192;
  session 12. The wide kernel: bench/sweep_nf4_mma.py, session 17.)
"""

_strategy: str = os.environ.get("GPTOSS_3090_LINEAR", "auto").strip() or "auto"
if _strategy not in LINEAR_STRATEGIES:
    _strategy = "auto"


def ensure_cuda_libs() -> None:
    """Preloads NVRTC from the Python environment (idempotent, never raises)."""
    preload_nvrtc()


def launch_context(device: torch.device) -> tuple[int, int]:
    """(ordinal, raw stream handle) for a kernel launch on ``device``; preloads NVRTC.

    Raises ValueError when ``device`` is not the current CUDA device (the launch would run on
    the current device's stream).
    """
    ensure_cuda_libs()
    idx = device.index if device.index is not None else torch.cuda.current_device()
    current = torch.cuda.current_device()
    if idx != current:
        raise ValueError(
            f"tensors are on cuda:{idx} but the current device is cuda:{current}; "
            f"call torch.cuda.set_device({idx}) or use `with torch.cuda.device({idx}):`"
        )
    return idx, torch.cuda.current_stream(device).cuda_stream


def ordinal_of(device: int | str | torch.device | None = None) -> int:
    """The CUDA device index of ``device`` (default: ``torch.cuda.current_device()``)."""
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else 0
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"device: expected an index >= 0, found {device}")
        return device
    d = torch.device(device)
    if d.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, found {d}")
    if d.index is not None:
        return d.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def device_info(device: int | str | torch.device | None = None) -> dict[str, Any]:
    """Facts about a GPU as the runtime sees it.

    Keys: ``ordinal``, ``name``, ``arch`` (e.g. ``"sm_86"``), ``major``, ``minor``,
    ``sm_count``, ``max_shared_per_block_optin``, ``shared_per_sm``, ``l2_bytes``,
    ``total_mem``, ``tuning`` (the launch-configuration family in use), ``natural_tuning``,
    ``driver_version``, ``nvrtc_version``, ``kernel_cache_dir``.

    Raises ``gptoss_3090.CudaError`` without a driver or GPU, or for a GPU older than sm_80.
    """
    ensure_cuda_libs()
    return dict(_native.device_info(ordinal_of(device)))


def warmup(device: int | str | torch.device | None = None) -> None:
    """Compiles (disk cache) and loads every kernel on ``device``. Call before graph capture."""
    ensure_cuda_libs()
    _native.warmup(ordinal_of(device))


logger = logging.getLogger(__name__)


class KernelCompileThread(threading.Thread):
    """The daemon thread :func:`compile_in_background` starts.

    After ``join()``: ``error`` is the exception the compile raised (None on success; the first
    use of a failed family raises it again, from the caller's thread), ``sizes`` maps each
    family to its cubin's bytes, ``seconds`` is the time the compile took, and ``cached`` lists
    the families whose cache entry existed when the thread started (nothing to compile).
    """

    def __init__(self, arch: str, families: list[str], log: logging.Logger | None = None) -> None:
        super().__init__(name="gptoss-3090-kernel-compile", daemon=True)
        self.arch = arch
        self.families = families
        self.log = log or logger
        self.error: Exception | None = None
        self.sizes: dict[str, int] = {}
        self.seconds: float | None = None
        self.cached: list[str] = []

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            paths = {f: _native.kernel_cache_path(f, self.arch) for f in self.families}
            self.cached = [f for f, p in paths.items() if p is not None and os.path.exists(p)]
        except Exception:  # noqa: BLE001 - the report only; the compile below raises for real
            self.cached = []
        try:  # the GIL is released while NVRTC runs
            self.sizes = dict(_native.compile_kernels(self.arch, self.families))
        except Exception as e:  # noqa: BLE001 - kept for the caller; the first use re-raises
            self.error = e
        self.seconds = time.perf_counter() - t0
        if self.error is None:
            compiled = [f for f in self.families if f not in self.cached]
            self.log.info(
                "gptoss-3090: kernels for %s ready in %.1f s (compiled: %s; already cached: %s)",
                self.arch, self.seconds, ", ".join(compiled) or "none",
                ", ".join(self.cached) or "none",
            )
        else:
            self.log.warning(
                "gptoss-3090: compiling kernels %s for %s in the background failed (the first "
                "use will raise it): %s", ", ".join(self.families), self.arch, self.error,
            )


def compile_in_background(
    families: Sequence[str] | None = None,
    device: int | str | torch.device | None = None,
    *,
    arch: str | None = None,
    log: logging.Logger | None = None,
) -> KernelCompileThread | None:
    """Starts compiling kernel families for ``device``'s architecture into the disk cache on a
    daemon thread, and returns that thread (already started).

    Why: the first use of a family compiles it (NVRTC, one core, up to about a minute for the
    MoE families), and vLLM's first forward reaches the families one after another. Started
    before the weights load, the compile runs alongside the load, the families side by side.
    A family this thread is still compiling when the first forward needs it is waited for, not
    compiled again. Nothing is loaded on the GPU, so CUDA-graph capture still needs
    :func:`warmup` (or a forward) first.

    ``families``: names from ``_native.kernel_sources()`` (default: all). ``arch`` (e.g.
    ``"sm_86"``) compiles for that architecture instead of ``device``'s, without a GPU. ``log``
    gets the thread's one line when it ends (default: this module's logger). Returns
    None, starting nothing, when the kernel cache is off (``GPTOSS_3090_CACHE=off``: a compile
    here could not be reused). Raises ValueError for an unknown family or arch, and CudaError
    without a usable GPU (when ``arch`` is not given), at once; compile errors are kept on the
    thread (:class:`KernelCompileThread`).
    """
    ensure_cuda_libs()
    if isinstance(families, str):
        raise TypeError(f"families: expected a list of family names, found the string {families!r}")
    known = list(_native.kernel_sources())
    names = known if families is None else list(families)
    unknown = [f for f in names if f not in known]
    if unknown:
        raise ValueError(f"families: unknown kernel families {unknown}; known: {known}")
    if arch is None:
        arch = str(_native.device_info(ordinal_of(device))["arch"])
    else:
        arch = _native.arch_name(arch)
    if _native.kernel_cache_dir() is None:
        return None
    thread = KernelCompileThread(arch, names, log)
    thread.start()
    return thread


def set_tuning(name: str | None) -> None:
    """Forces the launch configurations of ``"sm80"``, ``"sm86"`` or ``"sm90"`` on every GPU.

    ``None`` clears the override (the environment variable ``GPTOSS_3090_FORCE_TUNING`` is only
    read until the first call). ``"sm86"`` runs the RTX 3090 configuration (<= 99 KB of shared
    memory per block) anywhere, so it can be tested on an H100.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"tuning: expected a string or None, found {type(name).__name__}")
    _native.set_tuning(name)


def tuning(device: int | str | torch.device | None = None) -> str:
    """The tuning family in use on ``device``."""
    return str(device_info(device)["tuning"])


@contextmanager
def forced_tuning(name: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_tuning` that restores the previous override."""
    previous = _native.forced_tuning()
    set_tuning(name)
    try:
        yield
    finally:
        _native.set_tuning(previous)


def set_linear_strategy(name: str) -> None:
    """Selects how ``nf4_linear`` runs for M > 16 (see :data:`LINEAR_STRATEGIES`)."""
    global _strategy
    if name not in LINEAR_STRATEGIES:
        raise ValueError(f"linear strategy: expected one of {LINEAR_STRATEGIES}, found {name!r}")
    _strategy = name


def linear_strategy() -> str:
    """The current linear strategy."""
    return _strategy


@functools.cache
def _dequant_min_m() -> int:
    """``GPTOSS_3090_DEQUANT_MIN_M`` (default 64), read once per process."""
    raw = os.environ.get("GPTOSS_3090_DEQUANT_MIN_M", "").strip()
    if not raw:
        return 64
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"GPTOSS_3090_DEQUANT_MIN_M: expected an integer >= 1, found {raw!r}")
    return value


def use_wide_linear(ordinal: int) -> bool:
    """Whether ``nf4_linear`` should run the wide streaming kernel for 32 < M <= 64 (weights of
    16-row parts) on ``ordinal``: on sm_90 tunings unless the strategy is ``dequant_matmul``.
    H100, session 17: 1.05-1.25x the previous choice (the ``s4`` tensor-core kernel at M = 33-48,
    dequantize + cuBLAS at 64) on vLLM's q/k/v and o shapes; under the forced sm86 tuning
    (one block per SM) it measured 0.9x the tensor-core kernel, so other tunings keep that."""
    return _strategy != "dequant_matmul" and _tuning_of(ordinal) == "sm90"


def use_dequant_matmul(m: int, ordinal: int) -> bool:
    """Whether ``nf4_linear`` should dequantize + cuBLAS for ``m`` rows on ``ordinal``."""
    if m <= 16:
        return False
    if _strategy == "kernel":
        return False
    if _strategy == "dequant_matmul":
        return True
    return m >= _dequant_min_m() and _tuning_of(ordinal) == "sm90"


_tuning_cache: dict[int, str] = {}


def _tuning_of(ordinal: int) -> str:
    forced = _native.forced_tuning()
    if forced is not None:
        return str(forced)
    t = _tuning_cache.get(ordinal)
    if t is None:
        t = str(_native.device_info(ordinal)["natural_tuning"])
        _tuning_cache[ordinal] = t
    return t


def doctor() -> dict[str, Any]:
    """Everything that decides whether the kernels can run here (for ``gptoss-3090 doctor``)."""
    report: dict[str, Any] = {"nvrtc": nvrtc_report()}
    report["driver_available"] = bool(_native.cuda_driver_available())
    report["torch_cuda"] = torch.version.cuda
    report["torch_cuda_available"] = torch.cuda.is_available()
    report["kernel_cache_dir"] = _native.kernel_cache_dir()
    report["forced_tuning"] = _native.forced_tuning()
    report["linear_strategy"] = _strategy
    devices = []
    if report["driver_available"] and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            try:
                devices.append(dict(_native.device_info(i)))
            except Exception as e:  # an unsupported GPU is reported, not fatal
                devices.append({"ordinal": i, "error": str(e)})
    report["devices"] = devices
    return report
