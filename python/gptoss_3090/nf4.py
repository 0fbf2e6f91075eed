"""Exact NF4 (bitsandbytes 0.50 semantics) for torch tensors, on the CPU.

``quantize`` reproduces bitsandbytes' CUDA ``quantize_4bit(..., blocksize=64, quant_type="nf4")``
(optionally with double quantization) and returns what ``QuantState.as_dict(packed=True)`` would
hold; ``dequantize`` reproduces ``dequantize_4bit`` bit for bit. The work runs in the Rust
extension (``gptoss_3090._native``) with the GIL released.

Known, documented differences from bitsandbytes:

* An all-zero 64-block gets code 0 (as bitsandbytes' CUDA kernel); bitsandbytes' CPU path writes
  code 7. Both decode to zero.
* The nested offset is ``mean(absmax)`` accumulated in float64 and rounded once to float32;
  torch's float32 ``mean()`` may differ in the last bit.
* Nested 8-bit codes use the exact CUDA search; bitsandbytes' CPU path approximates and can pick a
  neighbouring code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gptoss_3090 import _native

__all__ = [
    "BLOCKSIZE",
    "NESTED_BLOCKSIZE",
    "code_table",
    "dequantize",
    "dynamic_map_signed",
    "quantize",
]

BLOCKSIZE = 64
"""Elements per NF4 block."""
NESTED_BLOCKSIZE = 256
"""Blocks per nested (double-quantization) block."""

_DTYPE_NAMES = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in _DTYPE_NAMES.values():
            return name
        raise ValueError(f"dtype: expected bfloat16, float16 or float32, found {dtype!r}")
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype: expected bfloat16, float16 or float32, found {dtype}") from None


def _numpy(t: torch.Tensor | np.ndarray, dtype: np.dtype[Any] | type, name: str) -> np.ndarray:
    """A contiguous numpy array of exactly ``dtype`` (no value conversion) from a CPU tensor."""
    if isinstance(t, torch.Tensor):
        if t.device.type != "cpu":
            raise ValueError(f"{name}: expected a CPU tensor, found device {t.device}")
        t = t.detach().contiguous().numpy()
    arr = np.ascontiguousarray(t)
    if arr.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype)}, found {arr.dtype}")
    return arr


#: The NF4 code table (index = 4-bit code), bit-exact float32 values as bitsandbytes stores them.
#: Read from the Rust core (``src/nf4``), the one place the table is written down.
NF4_CODE: tuple[float, ...] = tuple(float(v) for v in _native.nf4_code_table())


def code_table() -> torch.Tensor:
    """The 16-entry NF4 code table (``weight.quant_map``), float32."""
    return torch.from_numpy(_native.nf4_code_table())


def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes ``create_dynamic_map(signed=True)`` (``weight.nested_quant_map``), float32."""
    return torch.from_numpy(_native.dynamic_map_signed())


def quantize(weight: torch.Tensor, nested: bool = True) -> dict[str, Any]:
    """Quantizes a CPU tensor to NF4 exactly as bitsandbytes' CUDA kernels do.

    Args:
        weight: bfloat16, float16 or float32 CPU tensor of any shape (flattened row-major into
            blocks of 64; the last block may be partial). Values must be finite.
        nested: double-quantize the block absmax values (``compress_statistics=True``).

    Returns:
        ``{"weight": uint8 [ceil(n/2), 1], "absmax": uint8 [nb] (nested) or float32 [nb],
        "quant_map": float32 [16]}``, plus ``"nested_absmax"`` (float32 [ceil(nb/256)]) and
        ``"nested_quant_map"`` (float32 [256]) when nested, plus ``"quant_state"``: the JSON dict
        bitsandbytes packs under ``weight.quant_state.bitsandbytes__nf4`` (``quant_type``,
        ``blocksize``, ``dtype``, ``shape`` and, when nested, ``nested_blocksize``,
        ``nested_dtype``, ``nested_offset``).
    """
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight: expected a torch.Tensor, found {type(weight).__name__}")
    dtype = _dtype_name(weight.dtype)
    if weight.device.type != "cpu":
        raise ValueError(f"weight: expected a CPU tensor, found device {weight.device}")
    values = weight.detach().reshape(-1).to(torch.float32).contiguous().numpy()
    q = _native.nf4_quantize(values, bool(nested))
    out: dict[str, Any] = {
        "weight": torch.from_numpy(q["packed"]).reshape(-1, 1),
        "absmax": torch.from_numpy(q["absmax"]),
        "quant_map": code_table(),
    }
    state: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": BLOCKSIZE,
        "dtype": dtype,
        "shape": list(weight.shape),
    }
    if nested:
        out["nested_absmax"] = torch.from_numpy(q["nested_absmax"])
        out["nested_quant_map"] = dynamic_map_signed()
        state.update(
            {
                "nested_blocksize": NESTED_BLOCKSIZE,
                "nested_dtype": "float32",
                "nested_offset": float(q["nested_offset"]),
            }
        )
    out["quant_state"] = state
    return out


def dequantize(
    packed: torch.Tensor | np.ndarray,
    absmax: torch.Tensor | np.ndarray,
    shape: Sequence[int] | torch.Size,
    dtype: torch.dtype | str,
    quant_map: torch.Tensor | np.ndarray,
    nested_absmax: torch.Tensor | np.ndarray | None = None,
    nested_quant_map: torch.Tensor | np.ndarray | None = None,
    nested_offset: float | None = None,
) -> torch.Tensor:
    """Dequantizes NF4 data bit-exactly as bitsandbytes ``dequantize_4bit``.

    Args:
        packed: uint8 packed codes (any shape, e.g. the stored ``[n/2, 1]``), first element in
            the high nibble.
        absmax: uint8 codes when nested, else float32, one per 64-element block.
        shape: logical shape of the result; ``n = prod(shape)``.
        dtype: output dtype (torch dtype or name): bfloat16, float16 or float32.
        quant_map: the 16-entry float32 code table (``weight.quant_map``).
        nested_absmax: float32 per-256-block scales (nested only).
        nested_quant_map: the 256-entry float32 map (nested only).
        nested_offset: the offset from the quant-state JSON (nested only).

    Returns:
        A CPU tensor of ``shape`` and ``dtype``.

    Raises:
        ValueError: on any inconsistent length, dtype or missing nested argument.
    """
    name = _dtype_name(dtype)
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    nested = nested_absmax is not None
    kwargs: dict[str, Any] = {}
    if nested or nested_quant_map is not None or nested_offset is not None:
        if nested_absmax is None or nested_quant_map is None or nested_offset is None:
            raise ValueError(
                "nested statistics: pass all of nested_absmax, nested_quant_map and "
                "nested_offset, or none"
            )
        kwargs = {
            "nested_absmax": _numpy(nested_absmax, np.float32, "nested_absmax"),
            "nested_quant_map": _numpy(nested_quant_map, np.float32, "nested_quant_map"),
            "nested_offset": float(nested_offset),
        }
    out = _native.nf4_dequantize(
        _numpy(packed, np.uint8, "packed"),
        _numpy(absmax, np.uint8 if nested else np.float32, "absmax"),
        n,
        name,
        _numpy(quant_map, np.float32, "quant_map"),
        **kwargs,
    )
    t = torch.from_numpy(out)
    if name == "bfloat16":
        t = t.view(torch.bfloat16)
    elif name == "float16":
        t = t.view(torch.float16)
    return t.reshape(shape)
