"""The GPU runtime from Python: device facts, warm-up, tuning override, linear strategy.

Kernels are compiled by NVRTC for the GPU's exact architecture the first time they are used
(cached on disk under ``$GPTOSS_3090_CACHE`` or ``~/.cache/gptoss_3090/kernels``). Call
:func:`warmup` once before capturing CUDA graphs: compiling or loading code during capture is
impossible, and the ops raise a clear ``CudaError`` if it would happen.

Example::

    import gptoss_3090.runtime as rt
    rt.device_info()          # {'name': 'NVIDIA GeForce RTX 3090', 'arch': 'sm_86', ...}
    rt.warmup()               # compile + load every kernel now
    with rt.forced_tuning("sm86"):
        ...                   # run with the RTX 3090 launch configurations on any GPU
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from gptoss_3090 import _native
from gptoss_3090._cuda_libs import nvrtc_report, preload_nvrtc

__all__ = [
    "LINEAR_STRATEGIES",
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
