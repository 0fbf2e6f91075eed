"""NF4 on the GPU: dequantize, linear ``y = x W^T + b`` and quantize, as PyTorch custom ops.

Notebook use::

    import torch
    from gptoss_3090 import open_checkpoint
    from gptoss_3090.ops import Nf4Weight, nf4_linear, nf4_quantize

    ckpt = open_checkpoint("/path/to/gpt-oss-20b-bnb-4bit")
    w = Nf4Weight.from_checkpoint(ckpt, "model.layers.0.self_attn.q_proj.weight", "cuda")
    x = torch.randn(4, w.in_features, dtype=w.dtype, device="cuda")
    y = nf4_linear(x, w)                      # [4, out_features]
    w_full = w.dequantize()                   # bit-exact bitsandbytes dequantization

    q = nf4_quantize(torch.randn(512, 2880, dtype=torch.bfloat16, device="cuda"))

The ops are registered as ``torch.ops.gptoss_3090.nf4_dequantize``, ``nf4_linear`` and
``nf4_quantize`` (with fake implementations, so ``torch.compile`` treats them as opaque). They
validate every input in Python (dtype -> ``TypeError``; shape, contiguity, 16-byte alignment,
device -> ``ValueError``) before any native code runs, allocate their outputs with
``torch.empty`` and launch on ``torch.cuda.current_stream()``: no synchronisation, so they can
be captured in CUDA graphs (call ``gptoss_3090.runtime.warmup()`` first).

Tensors must live on the current CUDA device (``torch.cuda.current_device()``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gptoss_3090 import _native
from gptoss_3090 import runtime as _rt
from gptoss_3090.nf4 import NF4_CODE

__all__ = [
    "NF4_CODE",
    "Nf4FusedWeight",
    "Nf4Weight",
    "dynamic_map_signed",
    "nf4_dequantize",
    "nf4_dequantize_experts",
    "nf4_linear",
    "nf4_quantize",
]


BLOCK = 64
NESTED_BLOCK = 256
_HALF = (torch.bfloat16, torch.float16)
_QUANT_IN = (torch.bfloat16, torch.float16, torch.float32)
_DTYPE_NAME = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


# ---------------------------------------------------------------------------------------------
# Validation helpers: structural checks first (dtype, shape, contiguity, alignment), the device
# last, so that every error class is raised the same way on CPU-only machines.
# ---------------------------------------------------------------------------------------------


def _tensor(
    name: str,
    t: object,
    dtypes: Sequence[torch.dtype],
    *,
    numel: int | None = None,
    contiguous: bool = True,
    align: int = 1,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, found {type(t).__name__}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {want}, found {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name}: expected {numel} elements, found {t.numel()} {list(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous())")
    if align > 1 and t.device.type != "meta" and not _compiling() and t.data_ptr() % align:
        raise ValueError(
            f"{name}: data pointer 0x{t.data_ptr():x} is not {align}-byte aligned "
            "(use a fresh tensor or .clone() instead of an offset view)"
        )
    return t


def _compiling() -> bool:
    """Whether torch.compile is tracing (fake tensors: no data pointers to check)."""
    try:
        return bool(torch.compiler.is_compiling())
    except Exception:
        return False


def _check_devices(tensors: Mapping[str, torch.Tensor | None]) -> torch.device:
    device: torch.device | None = None
    first = ""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            raise ValueError(f"{name}: expected a CUDA tensor, found device {t.device}")
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}")
    if device is None:
        raise ValueError("expected at least one CUDA tensor")
    return device


def _dtype_arg(dtype: object, allowed: Sequence[torch.dtype], name: str = "dtype") -> torch.dtype:
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        for d in allowed:
            if _DTYPE_NAME[d] == key or str(d) == dtype:
                return d
    if isinstance(dtype, torch.dtype) and dtype in allowed:
        return dtype
    raise TypeError(f"{name}: expected one of {[str(d) for d in allowed]}, found {dtype!r}")


def _nb(n: int) -> int:
    return -(-n // BLOCK)


def _nnb(n: int) -> int:
    return -(-_nb(n) // NESTED_BLOCK)


def _check_stats(
    prefix: str,
    packed: object,
    absmax: object,
    nested_absmax: object,
    nested_map: object,
    numel: int,
    n_experts: int = 1,
) -> bool:
    """Validates one NF4 tensor's buffers (numel per expert); returns whether it is nested."""
    _tensor(f"{prefix}packed", packed, (torch.uint8,), align=16)
    assert isinstance(packed, torch.Tensor)
    want_packed = (numel * n_experts + 1) // 2
    if packed.numel() != want_packed:
        raise ValueError(
            f"{prefix}packed: expected {want_packed} bytes for {n_experts} x {numel} elements, "
            f"found {packed.numel()}"
        )
    _tensor(f"{prefix}absmax", absmax, (torch.float32, torch.uint8), numel=_nb(numel) * n_experts)
    assert isinstance(absmax, torch.Tensor)
    nested = absmax.dtype == torch.uint8
    if nested:
        if nested_absmax is None or nested_map is None:
            raise ValueError(
                f"{prefix}absmax is uint8 (nested statistics) but nested_absmax / "
                "nested_quant_map are missing"
            )
        _tensor(
            f"{prefix}nested_absmax",
            nested_absmax,
            (torch.float32,),
            numel=_nnb(numel) * n_experts,
        )
        _tensor(f"{prefix}nested_quant_map", nested_map, (torch.float32,), numel=256)
    return nested


# ---------------------------------------------------------------------------------------------
# The signed dynamic map (nested_quant_map).
# ---------------------------------------------------------------------------------------------

_MAP_CACHE: dict[torch.device, torch.Tensor] = {}


def _dynamic_map_cpu() -> torch.Tensor:
    """bitsandbytes ``create_dynamic_map(signed=True)``: 7 decades of linearly spaced means."""
    try:  # the exact CPU implementation of gptoss_3090.nf4, when present
        from gptoss_3090 import nf4 as _nf4

        m = _nf4.dynamic_map_signed()
        if isinstance(m, torch.Tensor) and m.numel() == 256:
            return m.to(torch.float32).contiguous()
    except Exception:
        pass
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map_signed(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-entry signed dynamic map used for nested statistics, float32 (cached per device)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    m = _MAP_CACHE.get(dev)
    if m is None:
        cpu = _MAP_CACHE.get(torch.device("cpu"))
        if cpu is None:
            cpu = _dynamic_map_cpu()
            _MAP_CACHE[torch.device("cpu")] = cpu
        m = cpu if dev.type == "cpu" else cpu.to(dev)
        _MAP_CACHE[dev] = m
    return m


# ---------------------------------------------------------------------------------------------
# Custom ops.
# ---------------------------------------------------------------------------------------------


def _stats_tuple(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset_ptr: int,
    offset_value: float,
) -> tuple[int, int, int, int, int, float, bool]:
    nested = absmax.dtype == torch.uint8
    return (
        packed.data_ptr(),
        absmax.data_ptr(),
        nested_absmax.data_ptr() if nested and nested_absmax is not None else 0,
        nested_map.data_ptr() if nested and nested_map is not None else 0,
        offset_ptr if nested else 0,
        float(offset_value) if nested else 0.0,
        nested,
    )


def _validate_dequant(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    shape: Sequence[int],
    n_experts: int,
    dtype: torch.dtype,
) -> tuple[int, bool]:
    dtype = _dtype_arg(dtype, _HALF)
    if n_experts < 1:
        raise ValueError(f"n_experts: expected >= 1, found {n_experts}")
    if any(int(s) < 1 for s in shape) or len(shape) == 0:
        raise ValueError(f"shape: expected positive sizes, found {list(shape)}")
    numel = math.prod(int(s) for s in shape)
    if n_experts > 1 and numel % BLOCK:
        raise ValueError(
            f"fused experts: elements per expert must be a multiple of 64, found {numel}"
        )
    nested = _check_stats("", packed, absmax, nested_absmax, nested_map, numel, n_experts)
    if nested and nested_offset is not None:
        _tensor("nested_offset", nested_offset, (torch.float32,), numel=n_experts)
    if nested and nested_offset is None and n_experts > 1:
        raise ValueError("fused experts: nested_offset must be a float32 tensor [n_experts]")
    _check_devices(
        {
            "packed": packed,
            "absmax": absmax,
            "nested_absmax": nested_absmax if nested else None,
            "nested_quant_map": nested_map if nested else None,
            "nested_offset": nested_offset if nested else None,
        }
    )
    return numel, nested


@torch.library.custom_op("gptoss_3090::nf4_dequantize", mutates_args=())
def _nf4_dequantize_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    nested_offset_value: float,
    shape: list[int],
    n_experts: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    numel, nested = _validate_dequant(
        packed, absmax, nested_absmax, nested_map, nested_offset, shape, n_experts, dtype
    )
    out_shape = [n_experts, *shape] if n_experts > 1 else list(shape)
    out = torch.empty(out_shape, dtype=dtype, device=packed.device)
    ordinal, stream = _rt.launch_context(packed.device)
    stats = _stats_tuple(
        packed,
        absmax,
        nested_absmax,
        nested_map,
        nested_offset.data_ptr() if (nested and nested_offset is not None) else 0,
        nested_offset_value,
    )
    _native.cuda_nf4_dequantize(
        ordinal, stream, _DTYPE_NAME[dtype], stats, numel, n_experts, out.data_ptr()
    )
    return out


@_nf4_dequantize_op.register_fake
def _(
    packed,
    absmax,
    nested_absmax,
    nested_map,
    nested_offset,
    nested_offset_value,
    shape,
    n_experts,
    dtype,
):
    out_shape = [n_experts, *shape] if n_experts > 1 else list(shape)
    return packed.new_empty(out_shape, dtype=dtype)


def _segments_of(weights: list[torch.Tensor], k: int) -> list[tuple[torch.Tensor, ...]]:
    if len(weights) % 4 or not 1 <= len(weights) // 4 <= 3:
        raise ValueError(
            "weights: expected 4 tensors (packed, absmax, nested_absmax, nested_quant_map) per "
            f"segment and 1..3 segments, found {len(weights)} tensors"
        )
    return [tuple(weights[i : i + 4]) for i in range(0, len(weights), 4)]


def _validate_linear(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    offsets: list[float],
    bias: torch.Tensor | None,
) -> tuple[int, int, list[tuple[torch.Tensor, ...]], list[int]]:
    _tensor("x", x, _HALF, contiguous=False)
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension [..., K]")
    k = int(x.shape[-1])
    if k < BLOCK or k % BLOCK:
        raise ValueError(
            f"x: in_features K must be a positive multiple of 64 (NF4 blocks must not straddle "
            f"rows), found {k}"
        )
    if x.stride(-1) != 1:
        raise ValueError("x: the last dimension must be contiguous (stride 1)")
    segs = _segments_of(weights, k)
    if len(offsets) != len(segs):
        raise ValueError(
            f"offsets: expected {len(segs)} values (one per segment), found {len(offsets)}"
        )
    rows: list[int] = []
    tensors: dict[str, torch.Tensor | None] = {"x": x}
    for i, (packed, absmax, nabs, nmap) in enumerate(segs):
        p = f"segment {i} " if len(segs) > 1 else "weight "
        _tensor(f"{p}packed", packed, (torch.uint8,), align=16)
        if (packed.numel() * 2) % k:
            raise ValueError(
                f"{p}packed: {packed.numel()} bytes is not a whole number of rows of K={k}"
            )
        r = packed.numel() * 2 // k
        nested = _check_stats(p, packed, absmax, nabs, nmap, r * k)
        if nested and not math.isfinite(float(offsets[i])):
            raise ValueError(f"{p}nested_offset: expected a finite value, found {offsets[i]}")
        rows.append(r)
        tensors[f"{p}packed"] = packed
        tensors[f"{p}absmax"] = absmax
        if nested:
            tensors[f"{p}nested_absmax"] = nabs
            tensors[f"{p}nested_quant_map"] = nmap
    n = sum(rows)
    if bias is not None:
        _tensor("bias", bias, (x.dtype,), numel=n)
        if bias.dim() != 1:
            raise ValueError(f"bias: expected shape [{n}], found {list(bias.shape)}")
        tensors["bias"] = bias
    _check_devices(tensors)
    return k, n, segs, rows


STREAM_MAX_M: int = _native.NF4_STREAM_MAX_M
"""Largest M the streaming linear serves (the runtime's own bound)."""

WIDE_MAX_M: int = _native.NF4_WIDE_MAX_M
"""Largest M the wide streaming linear serves (eight token tiles)."""


LINEAR_PATHS: tuple[str, ...] = (
    "auto", "stream", "wide", "decode", "mma", "mma_l", "mma_m", "mma_s", "dequant_matmul"
)
"""The values :func:`nf4_linear` takes for ``path``."""


def auto_linear_path(m: int, streamable: bool, ordinal: int) -> str:
    """The path :func:`nf4_linear`'s ``"auto"`` runs for ``m`` rows of x on GPU ``ordinal``.

    ``streamable``: the weight's parts are all multiples of 16 rows with one absmax format
    (the streaming kernels' condition). Returns ``"wide"`` or ``"dequant_matmul"`` where the
    runtime's strategy (:mod:`gptoss_3090.runtime`) asks for them, else ``"stream"`` (M <=
    :data:`STREAM_MAX_M`), ``"decode"`` (M <= 16) or ``"mma"`` (the tensor-core plan of
    ``_native.cuda_nf4_linear_plan``). Raises ValueError for M < 1."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"auto_linear_path: m must be an integer >= 1, found {m!r}")
    if STREAM_MAX_M < m <= WIDE_MAX_M and streamable and _rt.use_wide_linear(ordinal):
        return "wide"
    if _rt.use_dequant_matmul(m, ordinal):
        return "dequant_matmul"
    if m <= STREAM_MAX_M and streamable:
        return "stream"
    return "decode" if m <= 16 else "mma"


def _streamable(segs: list[tuple[torch.Tensor, ...]], rows: list[int]) -> bool:
    """Whether the streaming linear can serve these segments (src/ops/nf4.rs
    ``stream_eligible``): every part a multiple of 16 rows, all nested or all plain."""
    return all(r % 16 == 0 for r in rows) and len({s[1].dtype for s in segs}) == 1


@torch.library.custom_op("gptoss_3090::nf4_linear", mutates_args=())
def _nf4_linear_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    offsets: list[float],
    bias: torch.Tensor | None,
    path: str,
) -> torch.Tensor:
    k, n, segs, rows = _validate_linear(x, weights, offsets, bias)
    lead = list(x.shape[:-1])
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
        if x2.data_ptr() % 16:
            x2 = x2.clone()
    m = int(x2.shape[0])
    if m == 0:
        return torch.empty([*lead, n], dtype=x.dtype, device=x.device)
    ordinal, stream = _rt.launch_context(x.device)
    seg_args = []
    for (packed, absmax, nabs, nmap), r, off in zip(segs, rows, offsets, strict=True):
        seg_args.append((*_stats_tuple(packed, absmax, nabs, nmap, 0, off), r))
    streamable = _streamable(segs, rows)
    mode = auto_linear_path(m, streamable, ordinal) if path == "auto" else path
    if mode == "dequant_matmul":
        # Every segment into its rows of one bf16/f16 weight, in one launch.
        w = torch.empty((n, k), dtype=x.dtype, device=x.device)
        row0, parts = 0, []
        for (packed, absmax, nabs, nmap), r, off in zip(segs, rows, offsets, strict=True):
            stats = _stats_tuple(packed, absmax, nabs, nmap, 0, off)
            parts.append((stats, r * k, w[row0 : row0 + r].data_ptr()))
            row0 += r
        _native.cuda_nf4_dequantize_segments(ordinal, stream, _DTYPE_NAME[x.dtype], parts)
        return torch.nn.functional.linear(x2, w, bias).reshape([*lead, n])
    out = torch.empty([*lead, n], dtype=x.dtype, device=x.device)
    y = out.view(m, n)
    ws, ws_floats = 0, 0
    if mode not in ("decode", "stream") and (m > 16 or mode.startswith("mma") or mode == "wide"):
        plan = _native.cuda_nf4_linear_plan(ordinal, m, n, k, mode, stream)
        ws_floats = int(plan["workspace_floats"])
        if ws_floats:
            ws_t = torch.empty(ws_floats, dtype=torch.float32, device=x.device)
            ws = ws_t.data_ptr()
    _native.cuda_nf4_linear(
        ordinal,
        stream,
        _DTYPE_NAME[x.dtype],
        x2.data_ptr(),
        x2.stride(0),
        m,
        k,
        y.data_ptr(),
        n,
        bias.data_ptr() if bias is not None else 0,
        seg_args,
        mode,
        ws,
        ws_floats,
    )
    return out


@_nf4_linear_op.register_fake
def _(x, weights, offsets, bias, path):
    k = x.shape[-1]
    n = sum(weights[i].numel() * 2 // k for i in range(0, len(weights), 4))
    return x.new_empty([*x.shape[:-1], n])


@torch.library.custom_op("gptoss_3090::nf4_quantize", mutates_args=("workspace",))
def _nf4_quantize_op(
    weight: torch.Tensor,
    nested: bool,
    nested_map: torch.Tensor,
    workspace: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _tensor("weight", weight, _QUANT_IN, align=4 if weight.dtype == torch.float32 else 2)
    n = weight.numel()
    if n < 1:
        raise ValueError("weight: expected at least one element")
    nb = _nb(n)
    _tensor("nested_quant_map", nested_map, (torch.float32,), numel=256)
    _tensor("workspace", workspace, (torch.float32,))
    if nested and workspace.numel() < nb:
        raise ValueError(f"workspace: expected >= {nb} float32 elements, found {workspace.numel()}")
    _check_devices(
        {
            "weight": weight,
            "nested_quant_map": nested_map,
            "workspace": workspace if nested else None,
        }
    )
    dev = weight.device
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=dev)
    if nested:
        absmax = torch.empty(nb, dtype=torch.uint8, device=dev)
        nested_absmax = torch.empty(_nnb(n), dtype=torch.float32, device=dev)
        offset = torch.empty(1, dtype=torch.float32, device=dev)
        absmax_f32 = workspace
    else:
        absmax = torch.empty(nb, dtype=torch.float32, device=dev)
        nested_absmax = torch.empty(0, dtype=torch.float32, device=dev)
        offset = torch.empty(0, dtype=torch.float32, device=dev)
        absmax_f32 = absmax
    ordinal, stream = _rt.launch_context(dev)
    _native.cuda_nf4_quantize(
        ordinal,
        stream,
        _DTYPE_NAME[weight.dtype],
        weight.data_ptr(),
        n,
        nested,
        packed.data_ptr(),
        absmax_f32.data_ptr(),
        absmax.data_ptr() if nested else 0,
        nested_absmax.data_ptr() if nested else 0,
        nested_map.data_ptr() if nested else 0,
        offset.data_ptr() if nested else 0,
    )
    return packed, absmax, nested_absmax, offset


@_nf4_quantize_op.register_fake
def _(weight, nested, nested_map, workspace):
    n = weight.numel()
    nb = _nb(n)
    packed = weight.new_empty((n + 1) // 2, dtype=torch.uint8)
    if nested:
        return (
            packed,
            weight.new_empty(nb, dtype=torch.uint8),
            weight.new_empty(_nnb(n), dtype=torch.float32),
            weight.new_empty(1, dtype=torch.float32),
        )
    return (
        packed,
        weight.new_empty(nb, dtype=torch.float32),
        weight.new_empty(0, dtype=torch.float32),
        weight.new_empty(0, dtype=torch.float32),
    )


# ---------------------------------------------------------------------------------------------
# Weights.
# ---------------------------------------------------------------------------------------------


def _check_quant_map(qm: object, where: str) -> None:
    if qm is None:
        return
    if not isinstance(qm, torch.Tensor) or qm.numel() != 16:
        raise ValueError(f"{where}: quant_map must be a 16-entry float32 tensor")
    if not torch.equal(qm.detach().to("cpu", torch.float32).reshape(-1), torch.tensor(NF4_CODE)):
        raise ValueError(f"{where}: quant_map is not the NF4 code table (FP4 is not supported)")


@dataclass(frozen=True)
class Nf4Weight:
    """An NF4 (bitsandbytes) weight on the GPU.

    Attributes:
        packed: uint8, ``ceil(numel / 2)`` bytes (any shape, e.g. the stored ``[n/2, 1]``).
        absmax: float32 ``[nb]``, or uint8 ``[nb]`` codes when nested (``nb = ceil(numel/64)``).
        shape: the logical shape, e.g. ``(out_features, in_features)``.
        dtype: the original dtype, also the dtype of dequantized values (bf16 or fp16).
        nested_absmax: float32 ``[ceil(nb/256)]`` (nested only).
        nested_quant_map: float32 ``[256]`` (nested only).
        nested_offset: the float offset from the quant state (nested only).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    nested_quant_map: torch.Tensor | None = None
    nested_offset: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", _dtype_arg(self.dtype, _HALF, "Nf4Weight.dtype"))
        if not self.shape or any(s < 1 for s in self.shape):
            raise ValueError(f"Nf4Weight.shape: expected positive sizes, found {list(self.shape)}")
        nested = _check_stats(
            "Nf4Weight.",
            self.packed,
            self.absmax,
            self.nested_absmax,
            self.nested_quant_map,
            self.numel,
        )
        if nested:
            if self.nested_offset is None or not math.isfinite(float(self.nested_offset)):
                raise ValueError("Nf4Weight.nested_offset: a finite float is required when nested")
            object.__setattr__(self, "nested_offset", float(self.nested_offset))

    @property
    def numel(self) -> int:
        """Number of logical elements."""
        return math.prod(self.shape)

    @property
    def nested(self) -> bool:
        """Whether the absmax statistics are double-quantized."""
        return self.absmax.dtype == torch.uint8

    @property
    def device(self) -> torch.device:
        """The device holding the buffers."""
        return self.packed.device

    @property
    def out_features(self) -> int:
        """Rows (first dimension)."""
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """Row length (product of the remaining dimensions)."""
        return self.numel // self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of all buffers."""
        total = self.packed.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.nested_absmax is not None:
            total += self.nested_absmax.numel() * 4
        return total

    def _op_tensors(self) -> list[torch.Tensor]:
        nabs = self.nested_absmax if self.nested else self.absmax
        nmap = self.nested_quant_map if self.nested else self.absmax
        assert nabs is not None and nmap is not None
        return [self.packed, self.absmax, nabs, nmap]

    def to(self, device: torch.device | str) -> Nf4Weight:
        """A copy on ``device`` (non-blocking where possible)."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device).contiguous()

        return Nf4Weight(
            packed=mv(self.packed),  # type: ignore[arg-type]
            absmax=mv(self.absmax),  # type: ignore[arg-type]
            shape=self.shape,
            dtype=self.dtype,
            nested_absmax=mv(self.nested_absmax),
            nested_quant_map=mv(self.nested_quant_map),
            nested_offset=self.nested_offset,
        )

    def dequantize(self) -> torch.Tensor:
        """The weight in ``dtype`` and ``shape``, bit-exact vs bitsandbytes (GPU)."""
        return nf4_dequantize(
            self.packed,
            self.absmax,
            self.shape,
            self.dtype,
            nested_absmax=self.nested_absmax,
            nested_quant_map=self.nested_quant_map,
            nested_offset=self.nested_offset,
        )

    def to_dict(self) -> dict[str, Any]:
        """The bitsandbytes-style dict (CPU tensors) that :meth:`from_dict` accepts."""
        out: dict[str, Any] = {
            "weight": self.packed.detach().cpu().reshape(-1, 1),
            "absmax": self.absmax.detach().cpu(),
            "quant_map": torch.tensor(NF4_CODE, dtype=torch.float32),
        }
        state: dict[str, Any] = {
            "quant_type": "nf4",
            "blocksize": BLOCK,
            "dtype": _DTYPE_NAME[self.dtype],
            "shape": list(self.shape),
        }
        if self.nested:
            assert self.nested_absmax is not None and self.nested_quant_map is not None
            out["nested_absmax"] = self.nested_absmax.detach().cpu()
            out["nested_quant_map"] = self.nested_quant_map.detach().cpu()
            state.update(
                nested_blocksize=NESTED_BLOCK,
                nested_dtype="float32",
                nested_offset=self.nested_offset,
            )
        out["quant_state"] = state
        return out

    @classmethod
    def from_dict(
        cls, state: Mapping[str, Any], device: torch.device | str = "cuda", prefix: str = ""
    ) -> Nf4Weight:
        """Builds a weight from bitsandbytes-style tensors.

        Accepts what ``gptoss_3090.nf4.quantize`` returns, ``QuantState.as_dict(packed=True)``
        plus the packed data under ``"weight"``, or a safetensors-like dict of a Linear (keys
        ``<prefix>weight``, ``<prefix>weight.absmax``, ... with ``prefix`` e.g.
        ``"model.layers.0.self_attn.q_proj."``). The quant state is the ``"quant_state"`` dict,
        or the uint8 JSON blob under ``weight.quant_state.bitsandbytes__nf4``.
        """

        def get(*names: str) -> Any:
            for name in names:
                for key in (prefix + name, prefix + "weight." + name):
                    if key in state:
                        return state[key]
            return None

        packed = get("weight", "packed")
        if packed is None:
            raise ValueError(f"{prefix or 'state'}: no packed NF4 data ('{prefix}weight')")
        qs = get("quant_state", "quant_state.bitsandbytes__nf4")
        if isinstance(qs, torch.Tensor):
            qs = json.loads(bytes(qs.detach().cpu().to(torch.uint8).reshape(-1).tolist()).decode())
        if not isinstance(qs, Mapping):
            raise ValueError(f"{prefix or 'state'}: no quant state (shape, dtype) found")
        if qs.get("quant_type", "nf4") != "nf4" or int(qs.get("blocksize", BLOCK)) != BLOCK:
            raise ValueError(
                f"{prefix or 'state'}: expected nf4 with blocksize 64, found "
                f"{qs.get('quant_type')} / {qs.get('blocksize')}"
            )
        _check_quant_map(get("quant_map"), prefix or "state")
        absmax = get("absmax")
        nested_absmax = get("nested_absmax")
        nested_map = get("nested_quant_map")
        offset = qs.get("nested_offset")
        if (
            nested_absmax is not None
            and int(qs.get("nested_blocksize", NESTED_BLOCK)) != NESTED_BLOCK
        ):
            raise ValueError(f"{prefix or 'state'}: nested_blocksize must be 256")

        def mv(t: Any) -> torch.Tensor | None:
            if t is None:
                return None
            if not isinstance(t, torch.Tensor):
                t = torch.as_tensor(t)
            return t.to(device).contiguous()

        return cls(
            packed=mv(packed),  # type: ignore[arg-type]
            absmax=mv(absmax),  # type: ignore[arg-type]
            shape=tuple(qs["shape"]),
            dtype=_dtype_arg(str(qs.get("dtype", "bfloat16")), _HALF),
            nested_absmax=mv(nested_absmax),
            nested_quant_map=mv(nested_map),
            nested_offset=None if offset is None else float(offset),
        )

    @classmethod
    def from_checkpoint(
        cls, ckpt: Any, name: str, device: torch.device | str = "cuda"
    ) -> Nf4Weight:
        """Loads the NF4 weight ``name`` (e.g. ``model.layers.0.self_attn.q_proj.weight``) of a
        checkpoint opened with ``gptoss_3090.open_checkpoint`` onto ``device``."""
        if not name.endswith("weight"):
            raise ValueError(f"name: expected a weight key ending in 'weight', found {name!r}")
        if hasattr(ckpt, "is_nf4") and not ckpt.is_nf4(name):
            raise ValueError(f"{name}: not an NF4-quantized weight in this checkpoint")
        base = name[: -len("weight")]
        tensors: dict[str, Any] = {}
        for suffix in (
            "weight",
            "weight.absmax",
            "weight.quant_map",
            "weight.nested_absmax",
            "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4",
        ):
            key = base + suffix
            if key in ckpt:
                tensors[key] = ckpt.tensor(key)
        return cls.from_dict(tensors, device=device, prefix=base)


@dataclass(frozen=True)
class Nf4FusedWeight:
    """Several NF4 weights with the same ``in_features`` whose outputs are concatenated (vLLM's
    fused q/k/v: three separately quantized tensors), used without repacking (1 to 3 parts)."""

    parts: tuple[Nf4Weight, ...]

    def __post_init__(self) -> None:
        parts = tuple(self.parts)
        object.__setattr__(self, "parts", parts)
        if not 1 <= len(parts) <= 3:
            raise ValueError(f"Nf4FusedWeight: expected 1 to 3 parts, found {len(parts)}")
        k = parts[0].in_features
        for i, p in enumerate(parts):
            if not isinstance(p, Nf4Weight):
                raise TypeError(f"part {i}: expected Nf4Weight, found {type(p).__name__}")
            if p.in_features != k or p.dtype != parts[0].dtype:
                raise ValueError(
                    f"part {i}: expected in_features {k} and {parts[0].dtype}, found "
                    f"{p.in_features} and {p.dtype}"
                )

    @property
    def dtype(self) -> torch.dtype:
        """The parts' dtype."""
        return self.parts[0].dtype

    @property
    def in_features(self) -> int:
        """Shared row length."""
        return self.parts[0].in_features

    @property
    def out_features(self) -> int:
        """Sum of the parts' rows."""
        return sum(p.out_features for p in self.parts)

    def dequantize(self) -> torch.Tensor:
        """The concatenated weight ``[out_features, in_features]``."""
        return torch.cat([p.dequantize().reshape(p.out_features, -1) for p in self.parts])


# ---------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype | str = torch.bfloat16,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_offset: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantizes one NF4 tensor on the GPU, bit-exact vs bitsandbytes ``dequantize_4bit``.

    Args:
        packed: uint8 CUDA tensor, ``ceil(numel/2)`` bytes, 16-byte aligned.
        absmax: float32 ``[nb]``, or uint8 ``[nb]`` codes for nested statistics.
        shape: logical shape of the result.
        dtype: ``torch.bfloat16`` or ``torch.float16``.
        nested_absmax, nested_quant_map, nested_offset: the nested statistics (when ``absmax``
            is uint8); the offset as a float or a float32 CUDA tensor of one element.

    Returns:
        A new CUDA tensor of ``shape`` and ``dtype``.
    """
    dtype = _dtype_arg(dtype, _HALF)
    off_t: torch.Tensor | None = None
    off_v = 0.0
    if isinstance(nested_offset, torch.Tensor):
        off_t = nested_offset
    elif nested_offset is not None:
        off_v = float(nested_offset)
    elif isinstance(absmax, torch.Tensor) and absmax.dtype == torch.uint8:
        raise ValueError("absmax is uint8 (nested statistics) but nested_offset is missing")
    shape = [int(s) for s in shape]
    if not _compiling():
        _validate_dequant(packed, absmax, nested_absmax, nested_quant_map, off_t, shape, 1, dtype)
    return torch.ops.gptoss_3090.nf4_dequantize(
        packed, absmax, nested_absmax, nested_quant_map, off_t, off_v, shape, 1, dtype
    )


def nf4_dequantize_experts(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    n_experts: int,
    dtype: torch.dtype | str = torch.bfloat16,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantizes fused experts (``n_experts`` tensors of ``shape`` stored back to back, the
    layout of ``Checkpoint.fused_experts``) to ``[n_experts, *shape]``.

    ``nested_absmax`` holds ``ceil(nb_per_expert / 256)`` values per expert and
    ``nested_offset`` is a float32 CUDA tensor ``[n_experts]``.
    """
    dtype = _dtype_arg(dtype, _HALF)
    shape = [int(s) for s in shape]
    if not _compiling():
        _validate_dequant(
            packed, absmax, nested_absmax, nested_quant_map, nested_offset, shape, n_experts, dtype
        )
    return torch.ops.gptoss_3090.nf4_dequantize(
        packed, absmax, nested_absmax, nested_quant_map, nested_offset, 0.0, shape, n_experts, dtype
    )


def nf4_linear(
    x: torch.Tensor,
    weight: Nf4Weight | Nf4FusedWeight | Sequence[Nf4Weight],
    bias: torch.Tensor | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """``y = x W^T + b`` with an NF4 weight, fp32 accumulation, bias fused.

    Args:
        x: ``[..., K]`` bf16/fp16 CUDA tensor (last dim contiguous), K a multiple of 64.
        weight: an :class:`Nf4Weight` ``[N, K]``, or an :class:`Nf4FusedWeight` / list of up to
            3 weights whose outputs are concatenated (fused q/k/v).
        bias: ``[N]`` in x's dtype, or None.
        path: ``"auto"`` (for M <= 32 the streaming kernel when every part has a multiple
            of 16 rows and one absmax format, else for M <= 16 the first decode kernel;
            above, the runtime's linear strategy), ``"stream"`` (M <= 32), ``"wide"``
            (M <= 64, same weights as ``"stream"``), ``"decode"`` (M <= 16), ``"mma"``,
            ``"mma_l"``,
            ``"mma_m"``, ``"mma_s"`` or ``"dequant_matmul"`` (benchmarks and tests).

    Returns:
        ``[..., N]`` in x's dtype.
    """
    parts: tuple[Nf4Weight, ...]
    if isinstance(weight, Nf4Weight):
        parts = (weight,)
    elif isinstance(weight, Nf4FusedWeight):
        parts = weight.parts
    elif isinstance(weight, Sequence) and all(isinstance(p, Nf4Weight) for p in weight):
        parts = Nf4FusedWeight(tuple(weight)).parts
    else:
        raise TypeError(
            f"weight: expected Nf4Weight, Nf4FusedWeight or a list of Nf4Weight, found "
            f"{type(weight).__name__}"
        )
    if path not in LINEAR_PATHS:
        raise ValueError(f"path: unknown value {path!r}; expected one of {', '.join(LINEAR_PATHS)}")
    _tensor("x", x, _HALF, contiguous=False)
    for i, p in enumerate(parts):
        if p.dtype != x.dtype:
            raise TypeError(f"weight part {i} dequantizes to {p.dtype} but x is {x.dtype}")
        if p.in_features != x.shape[-1]:
            raise ValueError(
                f"x: last dimension {x.shape[-1]} does not match in_features {p.in_features}"
            )
    weights: list[torch.Tensor] = []
    offsets: list[float] = []
    for p in parts:
        weights += p._op_tensors()
        offsets.append(float(p.nested_offset) if p.nested_offset is not None else 0.0)
    if not _compiling():
        _validate_linear(x, weights, offsets, bias)
    return torch.ops.gptoss_3090.nf4_linear(x, weights, offsets, bias, path)


def nf4_quantize(weight: torch.Tensor, nested: bool = True) -> Nf4Weight:
    """Quantizes a bf16/fp16/fp32 CUDA weight to NF4 on the GPU (bitsandbytes CUDA semantics).

    The 4-bit codes and absmax match bitsandbytes' ``quantize_4bit(blocksize=64, nf4)``; with
    ``nested=True`` the statistics are double-quantized like ``compress_statistics=True`` (the
    offset is ``mean(absmax)`` summed in float64; torch's float32 mean may differ in the last
    bit). The result dequantizes to ``weight.dtype`` (fp32 weights dequantize to bf16). Reads the
    offset back to the host (one synchronisation).
    """
    _tensor("weight", weight, _QUANT_IN, align=4 if weight.dtype == torch.float32 else 2)
    if weight.dim() == 0 or weight.numel() == 0:
        raise ValueError(f"weight: expected a non-empty tensor, found shape {list(weight.shape)}")
    _check_devices({"weight": weight})
    nested = bool(nested)
    nmap = dynamic_map_signed(weight.device)
    ws = torch.empty(
        _nb(weight.numel()) if nested else 0, dtype=torch.float32, device=weight.device
    )
    packed, absmax, nabs, off = torch.ops.gptoss_3090.nf4_quantize(weight, nested, nmap, ws)
    out_dtype = weight.dtype if weight.dtype in _HALF else torch.bfloat16
    return Nf4Weight(
        packed=packed,
        absmax=absmax,
        shape=tuple(weight.shape),
        dtype=out_dtype,
        nested_absmax=nabs if nested else None,
        nested_quant_map=nmap if nested else None,
        nested_offset=float(off.item()) if nested else None,
    )

from gptoss_3090.attention import attention  # noqa: E402,F401  (gptoss_3090.ops.attention)
from gptoss_3090.moe import (  # noqa: E402,F401
    MoeLayerWeights,
    moe,
    moe_workspace_bytes,
    router_logits,
)
