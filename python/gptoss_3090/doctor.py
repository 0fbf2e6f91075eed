"""``gptoss-3090 doctor``: checks that this machine can serve with the plugin.

One line per check, each ``PASS``, ``FAIL`` or ``SKIP`` (not applicable here, e.g. no GPU):

* ``gpu``: a CUDA GPU is visible to torch and is sm_80 or newer;
* ``driver``: the NVIDIA driver loads (version through the native runtime);
* ``nvrtc``: NVRTC was found (where, which version); kernels are compiled at run time with it;
* ``torch``: torch version and the CUDA version it was built for;
* ``vllm``: vLLM is installed and is a supported 0.26.x;
* ``plugin``: the ``vllm.general_plugins`` entry point ``gptoss_3090`` is installed and, loaded
  the way vLLM loads plugins, registers the ``bnb_moe`` quantization method (checked in a
  subprocess, so this process never imports vLLM);
* ``kernels``: every kernel family compiles with NVRTC for this GPU's arch (sm_86 without a GPU);
* ``memory``: with ``--checkpoint``, the memory plan of that checkpoint on this card (24 GiB
  without a GPU);
* ``settings``: the ``GPTOSS_3090_*`` variables in force (``gptoss_3090.settings``); an unknown
  one (misspelt: it would change nothing) fails.

The exit status is 0 when nothing FAILED, else 1.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Check", "format_text", "run_checks", "main"]

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
#: Default card size when there is no GPU (an RTX 3090).
DEFAULT_BUDGET_GIB = 24.0
#: Architecture compiled for when there is no GPU (the RTX 3090).
DEFAULT_ARCH = "sm_86"
#: How long the plugin check may take (importing vLLM takes 10-30 s on a cold disk).
PLUGIN_TIMEOUT_S = 180.0


@dataclass
class Check:
    """The result of one check."""

    name: str
    """Short id: ``gpu``, ``driver``, ``nvrtc``, ``torch``, ``vllm``, ``plugin``, ``kernels``,
    ``memory``, ``settings``."""
    status: str
    """``PASS``, ``FAIL`` or ``SKIP``."""
    detail: str
    """One human line: what was found, or why it failed and what to do."""
    data: dict[str, Any] = field(default_factory=dict)
    """Machine-readable facts behind the line (``--json``)."""


@dataclass
class _Gpu:
    """What torch says about GPU 0 (None fields without one)."""

    available: bool = False
    name: str | None = None
    capability: tuple[int, int] | None = None
    total_bytes: int | None = None
    error: str | None = None

    @property
    def arch(self) -> str | None:
        return f"sm_{self.capability[0]}{self.capability[1]}" if self.capability else None


def _probe_gpu() -> _Gpu:
    try:
        import torch

        if not torch.cuda.is_available():
            return _Gpu()
        props = torch.cuda.get_device_properties(0)
        return _Gpu(
            available=True,
            name=str(props.name),
            capability=(int(props.major), int(props.minor)),
            total_bytes=int(props.total_memory),
        )
    except Exception as e:  # broken driver / torch: reported, not raised
        return _Gpu(error=f"{type(e).__name__}: {e}")


def _check_gpu(gpu: _Gpu) -> Check:
    if gpu.error:
        return Check("gpu", FAIL, f"torch could not query the GPU: {gpu.error}")
    if not gpu.available:
        return Check(
            "gpu",
            SKIP,
            "no CUDA GPU visible to torch (CPU-only machine, or CUDA_VISIBLE_DEVICES empty); "
            "serving needs an sm_80+ NVIDIA GPU",
        )
    data = {"name": gpu.name, "arch": gpu.arch, "total_bytes": gpu.total_bytes}
    cap = gpu.capability or (0, 0)
    mem = f"{(gpu.total_bytes or 0) / (1 << 30):.1f} GiB"
    if cap < (8, 0):
        return Check(
            "gpu",
            FAIL,
            f"{gpu.name} is {gpu.arch}; the kernels need sm_80 or newer (A100, RTX 30xx/40xx, "
            "H100)",
            data,
        )
    note = "" if cap <= (9, 0) else " (newer than sm_90: untested, kernels built for it anyway)"
    return Check("gpu", PASS, f"{gpu.name}, {gpu.arch}, {mem}{note}", data)


def _fmt_driver(v: int | None) -> str:
    if not v:
        return "unknown"
    return f"{v // 1000}.{(v % 1000) // 10}"


def _check_driver(gpu: _Gpu) -> Check:
    from gptoss_3090 import _native

    if not gpu.available:
        ok = False
        try:
            ok = bool(_native.cuda_driver_available())
        except Exception:
            pass
        if ok:
            return Check("driver", PASS, "libcuda loads and cuInit succeeds (no GPU visible)")
        return Check("driver", SKIP, "no NVIDIA driver (libcuda) on this machine")
    try:
        info = dict(_native.device_info(0))
    except Exception as e:
        return Check("driver", FAIL, f"native runtime could not open GPU 0: {e}")
    v = info.get("driver_version")
    data = {"driver_version": v, "tuning": info.get("tuning"), "sm_count": info.get("sm_count")}
    if not v:
        return Check("driver", FAIL, "the driver did not report a version", data)
    major = int(v) // 1000
    if major < 12:
        return Check(
            "driver",
            FAIL,
            f"driver supports CUDA {_fmt_driver(v)}; CUDA 12 or 13 drivers are supported",
            data,
        )
    return Check(
        "driver",
        PASS,
        f"CUDA {_fmt_driver(v)} driver; launch tuning {info.get('tuning')}",
        data,
    )


def _check_nvrtc() -> Check:
    from gptoss_3090._cuda_libs import nvrtc_report

    rep = nvrtc_report()
    if rep.get("version"):
        where = rep.get("path") or "the system loader path"
        return Check("nvrtc", PASS, f"NVRTC {rep['version']} from {where}", rep)
    searched = ", ".join(str(s) for s in rep.get("searched") or []) or "(nothing)"
    return Check(
        "nvrtc",
        FAIL,
        "NVRTC not found: install torch with CUDA (its nvidia-* wheels bring libnvrtc), "
        "`pip install nvidia-cuda-nvrtc-cu12`, or set GPTOSS_3090_NVRTC to the library; "
        f"searched {searched}",
        rep,
    )


def _check_torch() -> Check:
    try:
        import torch
    except Exception as e:
        return Check("torch", FAIL, f"torch does not import: {e}")
    cuda = torch.version.cuda
    data = {"version": torch.__version__, "cuda": cuda}
    if not cuda:
        return Check(
            "torch",
            PASS,
            f"torch {torch.__version__} (CPU-only build: no GPU serving with it)",
            data,
        )
    return Check("torch", PASS, f"torch {torch.__version__}, built for CUDA {cuda}", data)


def _vllm_version() -> str | None:
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_vllm(version: str | None) -> Check:
    from gptoss_3090.vllm import SUPPORTED_VLLM, is_supported_vllm_version

    if version is None:
        return Check(
            "vllm",
            SKIP,
            f"vLLM not installed (serving needs vllm{SUPPORTED_VLLM}: "
            "`pip install 'gptoss-3090[vllm]'`)",
        )
    if not is_supported_vllm_version(version):
        return Check(
            "vllm",
            FAIL,
            f"vLLM {version} installed; the plugin supports vllm{SUPPORTED_VLLM} and registers "
            "nothing on other versions",
            {"version": version},
        )
    return Check(
        "vllm", PASS, f"vLLM {version} (supported: {SUPPORTED_VLLM})", {"version": version}
    )


_PLUGIN_PROBE = r"""
import json, sys
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
ok = "bnb_moe" in QUANTIZATION_METHODS
cls = get_quantization_config("bnb_moe") if ok else None
name = f"{cls.__module__}.{cls.__qualname__}" if cls else None
print(json.dumps({"registered": ok, "config": name}))
"""


def _check_plugin(vllm_version: str | None) -> Check:
    eps = [
        e
        for e in importlib.metadata.entry_points(group="vllm.general_plugins")
        if e.name == "gptoss_3090"
    ]
    if not eps:
        return Check(
            "plugin",
            FAIL,
            "entry point vllm.general_plugins:gptoss_3090 missing: the package is not installed "
            "(run `pip install .`; PYTHONPATH alone does not register plugins)",
        )
    data: dict[str, Any] = {"entry_point": eps[0].value}
    if vllm_version is None:
        return Check(
            "plugin",
            SKIP,
            f"entry point gptoss_3090 -> {eps[0].value} installed; vLLM missing, so bnb_moe "
            "registration not checked",
            data,
        )
    # A fresh interpreter, like a vLLM worker: this process stays free of vLLM and CUDA state.
    import gptoss_3090

    pkg_root = str(Path(gptoss_3090.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (pkg_root, env.get("PYTHONPATH")) if x)
    env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PLUGIN_PROBE],
            capture_output=True,
            text=True,
            timeout=PLUGIN_TIMEOUT_S,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return Check("plugin", FAIL, f"loading vLLM plugins took over {PLUGIN_TIMEOUT_S:.0f} s")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        return Check("plugin", FAIL, f"loading vLLM plugins failed: {tail}", data)
    data.update(json.loads(lines[-1]))
    if not data.get("registered"):
        return Check(
            "plugin",
            FAIL,
            "the plugin loaded but bnb_moe is not a vLLM quantization method (see the vLLM "
            "warning: unsupported version?)",
            data,
        )
    return Check(
        "plugin",
        PASS,
        f"vllm.general_plugins:gptoss_3090 registers quantization 'bnb_moe' ({data['config']})",
        data,
    )


def _check_kernels(gpu: _Gpu) -> Check:
    from gptoss_3090 import _native
    from gptoss_3090._cuda_libs import preload_nvrtc

    arch = gpu.arch if gpu.available and gpu.capability and gpu.capability >= (8, 0) else None
    target = arch or DEFAULT_ARCH
    why = "" if arch else " (no sm_80+ GPU: compiled for the RTX 3090's arch)"
    preload_nvrtc()
    start = time.perf_counter()
    try:
        sizes = dict(_native.compile_kernels(target))
    except _native.KernelCompileError as e:
        first = str(e).splitlines()[0] if str(e) else "KernelCompileError"
        return Check("kernels", FAIL, f"NVRTC rejected a kernel for {target}: {first}")
    except Exception as e:
        return Check("kernels", FAIL, f"could not compile for {target}: {e}")
    secs = time.perf_counter() - start
    parts = ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sizes.items())
    return Check(
        "kernels",
        PASS,
        f"{len(sizes)} families compile for {target}{why} in {secs:.1f} s: {parts}; cache "
        f"{_native.kernel_cache_dir() or 'off'}",
        {"arch": target, "cubin_bytes": sizes, "seconds": round(secs, 3)},
    )


def _check_settings(environ: Mapping[str, str] | None = None) -> Check:
    from gptoss_3090 import settings

    active = settings.active_settings(environ)
    unknown = settings.unknown_settings(environ)
    data = {
        "active": {s.name: value for s, value in active},
        "unknown": unknown,
        "experimental": [s.name for s, _ in active if s.experimental],
    }
    if unknown:
        return Check(
            "settings",
            FAIL,
            settings.unknown_message(unknown),
            data | {"known": [s.name for s in settings.SETTINGS]},
        )
    if not active:
        return Check("settings", PASS, "defaults (no GPTOSS_3090_* variable set)", data)
    parts = []
    for s, value in active:
        note = " (experimental: not verified end to end)" if s.experimental else ""
        parts.append(f"{s.name}={value} [{s.kind}]{note}")
    return Check("settings", PASS, "; ".join(parts), data)


def _check_memory(checkpoint: str | None, gpu: _Gpu, max_model_len: int) -> Check:
    if checkpoint is None:
        return Check("memory", SKIP, "no --checkpoint given: memory plan not computed")
    from gptoss_3090.cli import _load_summary
    from gptoss_3090.memory import memory_plan

    try:
        summary = _load_summary(checkpoint)
    except Exception as e:
        return Check("memory", FAIL, f"{checkpoint}: {e}")
    if gpu.available and gpu.total_bytes:
        budget, card = gpu.total_bytes / (1 << 30), gpu.name
    else:
        budget, card = DEFAULT_BUDGET_GIB, "a 24 GiB card (no GPU here)"
    plan = memory_plan(summary, budget_gib=budget, max_model_len=max_model_len)
    w = plan["weights_bytes"] / (1 << 30)
    data = {"checkpoint": checkpoint, "budget_gib": round(budget, 2), "memory_plan": plan}
    if plan["kv_cache_tokens"] <= 0:
        return Check(
            "memory",
            FAIL,
            f"on {card} ({budget:.1f} GiB) the weights ({w:.2f} GiB) plus overheads leave no "
            "KV cache",
            data,
        )
    fits = "fits" if plan["fits_max_model_len"] else "does NOT fit (lower --max-model-len)"
    return Check(
        "memory",
        PASS,
        f"on {card} ({budget:.1f} GiB): weights {w:.2f} GiB, KV cache "
        f"{plan['kv_cache_tokens']:,} tokens; a {max_model_len:,}-token context {fits}",
        data,
    )


def _safe(name: str, fn: Callable[[], Check]) -> Check:
    try:
        return fn()
    except Exception as e:  # a check must never take the report down
        return Check(name, FAIL, f"check crashed: {type(e).__name__}: {e}")


def run_checks(
    checkpoint: str | None = None,
    max_model_len: int = 131072,
    progress: Callable[[Check], None] | None = None,
) -> list[Check]:
    """Runs every check in order; ``progress`` is called with each result as it completes."""
    gpu = _probe_gpu()
    vllm_version = _vllm_version()
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("gpu", lambda: _check_gpu(gpu)),
        ("driver", lambda: _check_driver(gpu)),
        ("nvrtc", _check_nvrtc),
        ("torch", _check_torch),
        ("vllm", lambda: _check_vllm(vllm_version)),
        ("plugin", lambda: _check_plugin(vllm_version)),
        ("kernels", lambda: _check_kernels(gpu)),
        ("memory", lambda: _check_memory(checkpoint, gpu, max_model_len)),
        ("settings", _check_settings),
    ]
    results = []
    for name, fn in steps:
        r = _safe(name, fn)
        results.append(r)
        if progress is not None:
            progress(r)
    return results


def format_line(c: Check) -> str:
    """``PASS  gpu       NVIDIA GeForce RTX 3090, sm_86, 24.0 GiB``."""
    return f"{c.status}  {c.name:<8}  {c.detail}"


def format_text(checks: list[Check]) -> str:
    """All lines plus a verdict line."""
    lines = [format_line(c) for c in checks]
    failed = [c.name for c in checks if c.status == FAIL]
    lines.append(f"doctor: {'FAILED: ' + ', '.join(failed) if failed else 'nothing failed'}")
    return "\n".join(lines)


def _runtime_report() -> dict[str, Any]:
    """``gptoss_3090.runtime.doctor()``: devices, cache, forced tuning, linear strategy."""
    try:
        from gptoss_3090 import runtime

        return dict(runtime.doctor())
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def to_json(checks: list[Check]) -> str:
    """``{"ok": bool, "checks": [{name, status, detail, data}, ...], "runtime": {...}}``."""
    ok = not any(c.status == FAIL for c in checks)
    doc = {"ok": ok, "checks": [asdict(c) for c in checks], "runtime": _runtime_report()}
    return json.dumps(doc, indent=2, default=str)


def main(checkpoint: str | None = None, as_json: bool = False, max_model_len: int = 131072) -> int:
    """Runs the checks and prints them (lines as they complete, or JSON at the end)."""
    progress = None if as_json else (lambda c: print(format_line(c), flush=True))
    checks = run_checks(checkpoint, max_model_len=max_model_len, progress=progress)
    failed = [c.name for c in checks if c.status == FAIL]
    if as_json:
        print(to_json(checks))
    else:
        print(f"doctor: {'FAILED: ' + ', '.join(failed) if failed else 'nothing failed'}")
    return 1 if failed else 0
