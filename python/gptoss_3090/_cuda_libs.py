"""Find and preload NVRTC before the native runtime opens it.

The Rust extension opens ``libnvrtc.so.13`` / ``libnvrtc.so.12`` by soname (cudarc's dynamic
loading). Those libraries usually live in a pip wheel that is not on the loader's search path
(torch's CUDA 13 wheels bring ``nvidia/cu13/lib``, CUDA 12 wheels
``nvidia/cuda_nvrtc/lib``), so we load the right one here by full path with ``RTLD_GLOBAL``:
glibc then hands the already-loaded library to any later ``dlopen`` of the same soname. NVRTC
opens its ``libnvrtc-builtins`` companion by name at compile time, so that one is preloaded
first, from the same folder.

Search order (the first folder holding a matching soname wins):

1. ``$GPTOSS_3090_NVRTC`` (a file path or a folder);
2. the Python environment: ``nvidia/cu13/lib``, ``nvidia/cuda_nvrtc/lib``, ``nvidia/cu12/lib``
   under every ``nvidia`` namespace folder and site-packages, and ``torch/lib``;
3. ``$CUDA_HOME``, ``$CUDA_PATH`` (``lib64``, ``lib``, ``targets/*/lib``);
4. ``/usr/local/cuda/lib64``, ``/usr/local/cuda/lib``.

The soname matching torch's CUDA major version is preferred (``.so.13`` for a cu13x torch).
Nothing here raises: :func:`preload_nvrtc` returns what it found (``doctor`` prints it) and, if
nothing was found, the native side falls back to the normal loader search and raises a clear
``CudaError`` when that fails too.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import site
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["NvrtcInfo", "candidate_dirs", "find_nvrtc", "preload_nvrtc", "nvrtc_report"]

_SONAMES = {13: "libnvrtc.so.13", 12: "libnvrtc.so.12"}
_lock = threading.Lock()
_loaded: NvrtcInfo | None = None


@dataclass
class NvrtcInfo:
    """Where NVRTC was found and what was loaded."""

    path: str | None = None
    """Full path of the libnvrtc that was (or would be) loaded, or None."""
    builtins: str | None = None
    """Full path of the libnvrtc-builtins companion, or None."""
    major: int | None = None
    """CUDA major version of that NVRTC (13 or 12)."""
    loaded: bool = False
    """Whether this module loaded it (RTLD_GLOBAL)."""
    error: str | None = None
    """Why loading failed, if it did."""
    searched: list[str] = field(default_factory=list)
    """Folders that were searched, in order."""


def _torch_cuda_major() -> int | None:
    try:
        import torch

        v = torch.version.cuda
        return int(v.split(".")[0]) if v else None
    except Exception:  # torch missing or odd version string: no preference
        return None


def _site_dirs() -> list[Path]:
    dirs: list[Path] = []
    try:
        dirs += [Path(p) for p in site.getsitepackages()]
    except Exception:
        pass
    try:
        dirs.append(Path(site.getusersitepackages()))
    except Exception:
        pass
    dirs += [Path(p) for p in sys.path if p and p.endswith(("site-packages", "dist-packages"))]
    return dirs


def candidate_dirs() -> list[Path]:
    """Folders that may hold libnvrtc, in search order (see the module docstring)."""
    out: list[Path] = []

    def add(p: Path | str | None) -> None:
        if not p:
            return
        p = Path(p)
        if p not in out:
            out.append(p)

    env = os.environ.get("GPTOSS_3090_NVRTC", "").strip()
    if env:
        p = Path(env)
        add(p.parent if p.is_file() else p)

    nvidia_roots: list[Path] = []
    try:
        spec = importlib.util.find_spec("nvidia")
        if spec is not None and spec.submodule_search_locations:
            nvidia_roots += [Path(p) for p in spec.submodule_search_locations]
    except Exception:
        pass
    nvidia_roots += [d / "nvidia" for d in _site_dirs()]
    for root in nvidia_roots:
        for sub in ("cu13/lib", "cuda_nvrtc/lib", "cu12/lib"):
            add(root / sub)
    try:
        spec = importlib.util.find_spec("torch")
        if spec is not None and spec.origin:
            add(Path(spec.origin).parent / "lib")
    except Exception:
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        base = os.environ.get(var, "").strip()
        if base:
            add(Path(base) / "lib64")
            add(Path(base) / "lib")
            for t in sorted((Path(base) / "targets").glob("*/lib")):
                add(t)
    add("/usr/local/cuda/lib64")
    add("/usr/local/cuda/lib")
    return out


def _builtins_for(folder: Path, major: int) -> Path | None:
    hits = sorted(folder.glob(f"libnvrtc-builtins.so.{major}.*"))
    # Prefer the plain name over the ".alt" variant NVIDIA ships next to it.
    plain = [h for h in hits if ".alt." not in h.name]
    return (plain or hits or [None])[0]


def find_nvrtc() -> NvrtcInfo:
    """Locates libnvrtc without loading it."""
    info = NvrtcInfo()
    env = os.environ.get("GPTOSS_3090_NVRTC", "").strip()
    prefer = _torch_cuda_major()
    majors = [13, 12] if prefer != 12 else [12, 13]
    dirs = candidate_dirs()
    info.searched = [str(d) for d in dirs]
    if env and Path(env).is_file():
        name = Path(env).name
        major = 12 if ".so.12" in name else 13
        info.path, info.major = env, major
        b = _builtins_for(Path(env).parent, major)
        info.builtins = str(b) if b else None
        return info
    for major in majors:
        for d in dirs:
            lib = d / _SONAMES[major]
            if lib.is_file():
                info.path, info.major = str(lib), major
                b = _builtins_for(d, major)
                info.builtins = str(b) if b else None
                return info
    return info


def preload_nvrtc() -> NvrtcInfo:
    """Finds libnvrtc and loads it (with its builtins) by full path, once per process.

    Safe to call many times; never raises. Returns the :class:`NvrtcInfo` of the first call.
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        info = find_nvrtc()
        if info.path is not None:
            try:
                if info.builtins:
                    ctypes.CDLL(info.builtins, mode=ctypes.RTLD_GLOBAL)
                ctypes.CDLL(info.path, mode=ctypes.RTLD_GLOBAL)
                info.loaded = True
            except OSError as e:
                info.error = str(e)
        _loaded = info
        return info


def nvrtc_report() -> dict[str, object]:
    """A summary for ``gptoss-3090 doctor``: path, version, whether it loaded, folders searched."""
    info = preload_nvrtc()
    report: dict[str, object] = {
        "path": info.path,
        "builtins": info.builtins,
        "major": info.major,
        "preloaded": info.loaded,
        "error": info.error,
        "searched": info.searched,
    }
    try:
        from gptoss_3090 import _native

        report["version"] = ".".join(str(x) for x in _native.nvrtc_version())
    except Exception as e:  # NVRTC missing: the error text says how to install it
        report["version"] = None
        report["native_error"] = str(e)
    return report
