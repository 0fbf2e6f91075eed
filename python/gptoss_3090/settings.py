"""Every ``GPTOSS_3090_*`` environment variable the package reads, in one table.

The defaults are what the plugin ships; nothing needs to be set to serve. The table exists so
that ``gptoss-3090 doctor`` can show which settings are in force (and catch a misspelt name,
which would otherwise do nothing), and so that vLLM's compile-cache key leaves out the paths
(:func:`gptoss_3090.vllm.model.graph_settings`). A CPU test keeps it in step with the sources
and the docs (docs/RUNTIME.md explains each setting and the measurement behind its default).

Kinds:

* ``serving``: changes what the plugin runs in vLLM (attention backend, RoPE, routing, ...);
* ``startup``: changes how the plugin starts, never what it runs (background kernel compile);
* ``tuning``: forces one kernel choice over the automatic one, for benchmarks and sweeps;
* ``debug``: diagnostics (pure-torch reference paths);
* ``path``: where files are (kernel cache, NVRTC, kernel sources);
* ``metadata``: recorded by the benchmarks, read by nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "SETTINGS",
    "Setting",
    "active_settings",
    "by_name",
    "unknown_message",
    "unknown_settings",
]

PREFIX = "GPTOSS_3090_"
KINDS = ("serving", "startup", "tuning", "debug", "path", "metadata")


@dataclass(frozen=True)
class Setting:
    """One environment variable of the package."""

    name: str
    kind: str
    """One of :data:`KINDS`."""
    summary: str
    """What it does, in one line."""
    experimental: bool = False
    """Its non-default values are not verified end to end."""


SETTINGS: tuple[Setting, ...] = (
    # -- serving ----------------------------------------------------------------------------
    Setting("GPTOSS_3090_ATTENTION", "serving",
            "triton / vllm / off: keep vLLM's attention backend instead of ours on sm_80-sm_89"),
    Setting("GPTOSS_3090_ATTN_KV_WRITE", "serving",
            "fused (default) / separate: new K/V rows written by our attention op or by vLLM"),
    Setting("GPTOSS_3090_ATTN_ROPE", "serving",
            "fold (default) / vllm: GPT-OSS RoPE inside our attention op or vLLM's rotary op"),
    Setting("GPTOSS_3090_ATTN_MIN_KEYS", "serving",
            "auto (256) or 16-4096: fewest keys one decode split takes at run time"),
    Setting("GPTOSS_3090_ROUTER", "serving",
            "vllm: vLLM's cuBLAS router instead of our router kernel"),
    Setting("GPTOSS_3090_MOE_ROUTING", "serving",
            "vllm (default) / router / internal: where the top-k routing runs",
            experimental=True),
    Setting("GPTOSS_3090_MOE_WEIGHTS_ORDER", "serving",
            "chunks (default) / rows: byte order the expert weights are served in"),
    Setting("GPTOSS_3090_MOE_CHUNK", "serving",
            "tokens per MoE call (default from the memory budget)"),
    Setting("GPTOSS_3090_PDL", "serving",
            "linear (default) / on / off: which kernel families use programmatic dependent "
            "launch on sm_90"),
    # -- startup ----------------------------------------------------------------------------
    Setting("GPTOSS_3090_PRECOMPILE", "startup",
            "on (default) / off: compile the served kernels while vLLM loads the weights"),
    # -- tuning -----------------------------------------------------------------------------
    Setting("GPTOSS_3090_FORCE_TUNING", "tuning",
            "sm80 / sm86 / sm90: launch configurations of another GPU (sm86: a 3090's)"),
    Setting("GPTOSS_3090_TUNING", "tuning", "tuning the vLLM MoE method passes to the MoE op"),
    Setting("GPTOSS_3090_LINEAR", "tuning",
            "auto / kernel / dequant_matmul: the NF4 linear's strategy above 16 rows"),
    Setting("GPTOSS_3090_DEQUANT_MIN_M", "tuning",
            "rows from which auto dequantizes + cuBLAS on sm_90 (default 64)"),
    Setting("GPTOSS_3090_NF4_SPLITS", "tuning", "force the NF4 linear's K split (1-8)"),
    Setting("GPTOSS_3090_SPLITK_REDUCE", "tuning", "vec (default) / scalar split-K reduce"),
    Setting("GPTOSS_3090_WIDE_REDUCE", "tuning",
            "cluster (default) / launch: the wide linear's K split summed in clusters (sm_90) "
            "or by a reduce launch"),
    Setting("GPTOSS_3090_STREAM_XCOLS", "tuning",
            "activation columns staged per streaming block (0-16)"),
    Setting("GPTOSS_3090_MOE_DECODE", "tuning", "auto / 3 / 2 / 1: the MoE decode kernels"),
    Setting("GPTOSS_3090_MOE_GEMM", "tuning", "m64s2 / m128s2 / m128s4: the prefill MoE tile"),
    Setting("GPTOSS_3090_MOE_STREAM_KS", "tuning", "force the streaming MoE's K split (1-8)"),
    Setting("GPTOSS_3090_MOE_STREAM_LAUNCH", "tuning",
            "auto / split / fused: the streaming MoE's launches"),
    Setting("GPTOSS_3090_MOE_STREAM_MAX_TOKENS", "tuning",
            "most tokens of the streaming MoE regime (default 128)"),
    Setting("GPTOSS_3090_MOE_STREAM_TILES", "tuning", "force 1 or 2 column tiles per pass"),
    Setting("GPTOSS_3090_MOE_PASS_ITEMS", "tuning",
            "1 (default) / 0: each streaming pass its own block row"),
    Setting("GPTOSS_3090_MOE_DEEP_RING", "tuning",
            "auto / on / off: seven-stage weight rings for one decode token on sm_90"),
    Setting("GPTOSS_3090_MOE_FOLD_COMBINE", "tuning",
            "auto / on / off: the one-token combine summed by the down launch"),
    Setting("GPTOSS_3090_ROUTER_TOPK_CLUSTER", "tuning",
            "on (default) / off: the router's top-k in one launch of clusters on sm_90"),
    # -- debug ------------------------------------------------------------------------------
    Setting("GPTOSS_3090_REFERENCE_KERNELS", "debug",
            "1: pure-torch NF4/MoE reference paths in vLLM instead of our kernels (slow)"),
    # -- paths and metadata -----------------------------------------------------------------
    Setting("GPTOSS_3090_CACHE", "path",
            "kernel cache directory, or off (default ~/.cache/gptoss_3090/kernels)"),
    Setting("GPTOSS_3090_NVRTC", "path", "the NVRTC library to load"),
    Setting("GPTOSS_3090_KERNEL_DIR", "path",
            "compile kernels from this folder instead of the packaged sources"),
    Setting("GPTOSS_3090_GIT_COMMIT", "metadata", "the commit benchmarks record"),
)


def by_name() -> dict[str, Setting]:
    """:data:`SETTINGS` keyed by variable name."""
    return {s.name: s for s in SETTINGS}


def active_settings(environ: Mapping[str, str] | None = None) -> list[tuple[Setting, str]]:
    """The known settings set in ``environ`` (default ``os.environ``) with their values, in
    table order."""
    environ = os.environ if environ is None else environ
    return [(s, environ[s.name]) for s in SETTINGS if s.name in environ]


def unknown_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """``GPTOSS_3090_*`` variables in ``environ`` that the package does not read (misspelt or
    retired): setting them changes nothing."""
    environ = os.environ if environ is None else environ
    known = by_name()
    return sorted(n for n in environ if n.startswith(PREFIX) and n not in known)


def unknown_message(names: list[str]) -> str:
    """The one wording doctor, ``gptoss-3090 settings`` and the plugin use for
    :func:`unknown_settings`."""
    verb = "is not a setting" if len(names) == 1 else "are not settings"
    return (
        f"{', '.join(names)} {verb} of gptoss-3090 (misspelt or retired?) and changes nothing; "
        "`gptoss-3090 settings` lists the known ones"
    )
