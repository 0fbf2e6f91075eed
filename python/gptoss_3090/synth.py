"""Synthetic GPT-OSS checkpoints in Unsloth's bitsandbytes NF4 layout, plus an HF reference.

:func:`write_synthetic_checkpoint` writes, into ``out``:

* ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``: the Unsloth layout
  (see ``shared/reference/nf4-and-checkpoint.md``)

  - ``model.layers.L.mlp.experts.gate_up_projs.E.{weight, weight.absmax, ..., bias}``: logical
    ``[2I, H]`` with interleaved rows (row 2j = gate j, row 2j+1 = up j);
  - ``model.layers.L.mlp.experts.down_projs.E.*``: logical ``[H, I]``;
  - ``model.layers.L.mlp.router.linear.{weight, bias}`` (not quantized);
  - ``model.layers.L.self_attn.{q,k,v,o}_proj.{weight(+bnb keys), bias}`` and
    ``self_attn.sinks``; ``input_layernorm``, ``post_attention_layernorm``, ``model.norm``,
    ``model.embed_tokens``, ``lm_head``.

  Every quantized weight is stored exactly as bitsandbytes' ``QuantState.as_dict(packed=True)``
  serialises it: ``weight`` uint8 ``[n/2, 1]`` (two codes per byte, first element in the high
  nibble), ``weight.absmax`` (uint8 codes when nested, else f32), ``weight.quant_map`` (f32
  [16]), ``weight.nested_absmax`` / ``weight.nested_quant_map`` (nested only) and
  ``weight.quant_state.bitsandbytes__nf4`` (the UTF-8 bytes of ``json.dumps`` of the
  non-tensor fields, in bitsandbytes' key order);
* ``config.json`` with the ``quantization_config`` Unsloth writes (bitsandbytes, nf4,
  ``llm_int8_skip_modules``), ``generation_config.json`` and the small tokenizer of
  :mod:`gptoss_3090.tokenizer`;
* optionally ``reference/``: the same model with every NF4 weight dequantized (exactly: fp32
  ``code * absmax`` and one cast) in the Hugging Face GptOss layout that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads: ``mlp.experts.gate_up_proj``
  ``[E, H, 2I]`` (the transpose of the Unsloth weights, columns still interleaved),
  ``gate_up_proj_bias [E, 2I]``, ``down_proj [E, I, H]``, ``down_proj_bias [E, H]``,
  ``mlp.router.{weight, bias}``, plain attention Linears. Its dtype is the checkpoint's dtype
  (bf16 by default; fp16 for ``dtype="fp16"`` so the values stay exact).

Weights are random but shaped like trained ones: normal with std ``1/sqrt(fan_in)`` times a
per-row log-normal scale (so block absmax varies as in real checkpoints), small biases,
norms around 1, sinks spread around 1. Every tensor draws from its own generator seeded by
``(seed, tensor name)``, so the values do not depend on threading, on ``nested`` or on the
attention format.

Files are streamed: each shard is written tensor by tensor (the safetensors header space is
reserved up front and filled in at the end), layer by layer, so memory stays bounded
(well under 4 GB for the 20b preset) whatever the model size.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptoss_3090 import _native
from gptoss_3090 import presets as _presets
from gptoss_3090 import tokenizer as _tokenizer

__all__ = [
    "dequantize_nf4",
    "quantize_nf4",
    "write_synthetic_checkpoint",
]

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
_ST_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.uint8: "U8",
}
_NP_ST_DTYPES = {np.dtype(np.uint8): "U8", np.dtype(np.float32): "F32"}

# Shard size targets (bytes). 20b: ~12.5 GB in 3 shards of <= 4.5 GB; the reference in ~5 GB
# shards. Tiny checkpoints are split in about three shards so the index path is exercised.
_SHARD_BYTES_BIG = 4_500_000_000
_REF_SHARD_BYTES_BIG = 5_000_000_000
_TINY_SHARDS = 3


# --------------------------------------------------------------------------------------------
# NF4 (bitsandbytes format)
# --------------------------------------------------------------------------------------------


def quantize_nf4(values: torch.Tensor, nested: bool) -> dict[str, Any]:
    """Quantizes a flat f32 tensor (length a multiple of 64) to NF4 (bitsandbytes' CUDA rounding).

    Thin wrapper over ``gptoss_3090._native.nf4_quantize`` (which releases the GIL).

    Returns:
        ``{"packed": uint8[n/2], "absmax": uint8[nb] | f32[nb]}`` plus, when nested,
        ``"nested_absmax": f32[ceil(nb/256)]`` and ``"nested_offset": float`` (numpy arrays).
    """
    flat = values.reshape(-1).to(torch.float32).contiguous()
    if flat.numel() % BLOCKSIZE:
        raise ValueError(f"NF4 needs a multiple of {BLOCKSIZE} elements, got {flat.numel()}")
    return dict(_native.nf4_quantize(flat.numpy(), nested))


def dequantize_nf4(q: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """Exact dequantization of :func:`quantize_nf4`'s output to a flat ``dtype`` tensor.

    ``W[i] = cast(NF4[code(i)] * absmax_f32[i // 64])`` (fp32 product, one cast), with nested
    absmax ``map[code] * nested_absmax[b // 256] + offset`` in fp32: ``_native.nf4_dequantize``.
    """
    n = q["packed"].size * 2
    nested = "nested_absmax" in q
    out = _native.nf4_dequantize(
        q["packed"],
        q["absmax"],
        n,
        _DTYPE_NAMES[dtype],
        _native.nf4_code_table(),
        q["nested_absmax"] if nested else None,
        _native.dynamic_map_signed() if nested else None,
        q["nested_offset"] if nested else None,
    )
    return torch.from_numpy(out.view(np.int16)).view(dtype)


def _quant_state_json(q: dict[str, Any], shape: tuple[int, int], dtype: torch.dtype) -> bytes:
    """The ``quant_state.bitsandbytes__nf4`` blob: ``json.dumps`` in bitsandbytes' key order."""
    state: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": BLOCKSIZE,
        "dtype": _DTYPE_NAMES[dtype],
        "shape": list(shape),
    }
    if "nested_absmax" in q:
        state["nested_blocksize"] = NESTED_BLOCKSIZE
        state["nested_dtype"] = "float32"
        state["nested_offset"] = float(np.float32(q["nested_offset"]))
    return json.dumps(state).encode("utf-8")


def _bnb_tensors(
    prefix: str, q: dict[str, Any], shape: tuple[int, int], dtype: torch.dtype
) -> list[tuple[str, Any, tuple[int, ...]]]:
    """(key, array, shape) of one quantized Linear's weight, as QuantState.as_dict(packed=True)."""
    packed = q["packed"]
    absmax = q["absmax"]
    items: list[tuple[str, Any, tuple[int, ...]]] = [
        (f"{prefix}.weight", packed, (packed.size, 1)),
        (f"{prefix}.weight.absmax", absmax, (absmax.size,)),
        (f"{prefix}.weight.quant_map", _native.nf4_code_table(), (16,)),
    ]
    if "nested_absmax" in q:
        nabs = q["nested_absmax"]
        items.append((f"{prefix}.weight.nested_absmax", nabs, (nabs.size,)))
        items.append((f"{prefix}.weight.nested_quant_map", _native.dynamic_map_signed(), (256,)))
    blob = np.frombuffer(_quant_state_json(q, shape, dtype), dtype=np.uint8)
    items.append((f"{prefix}.weight.quant_state.bitsandbytes__nf4", blob, (blob.size,)))
    return items


# --------------------------------------------------------------------------------------------
# Streaming safetensors writer
# --------------------------------------------------------------------------------------------


def _entry_json(key: str, dtype: str, shape: Iterable[int], begin: int, end: int) -> str:
    return json.dumps(
        {key: {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}},
        separators=(",", ":"),
    )[1:-1]


@dataclass
class _Planned:
    """A tensor planned into a shard: its exact size, or None when only known when written."""

    key: str
    nbytes: int | None
    max_header: int


@dataclass
class _Shard:
    name: str
    planned: dict[str, _Planned] = field(default_factory=dict)

    def reserve(self) -> int:
        body = (
            2
            + len('"__metadata__":{"format":"pt"},')
            + sum(p.max_header + 1 for p in self.planned.values())
        )
        return (body + 64 + 7) // 8 * 8


class _ShardedWriter:
    """Writes planned tensors into numbered safetensors shards, streaming each tensor.

    The header of every shard is reserved from an upper bound (shapes and offsets of its planned
    tensors) and written when the shard closes, padded with spaces, which the safetensors format
    allows. Tensors must arrive in plan order per shard; a shard closes when a tensor of a later
    shard arrives or on :meth:`close`, and only once every planned tensor has been written.
    """

    def __init__(self, out_dir: Path, shards: list[_Shard]) -> None:
        self.out_dir = out_dir
        self.shards = shards
        self.where = {key: i for i, s in enumerate(shards) for key in s.planned}
        self.current = -1
        self.file: Any = None
        self.entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
        self.pos = 0
        self.open_tensor: tuple[str, str, tuple[int, ...], int, int] | None = None
        self.total_size = 0
        self.written = 0

    def _switch(self, idx: int) -> None:
        if idx < self.current:
            raise RuntimeError(f"shard {idx} already closed")
        while self.current < idx:
            self._close_current()
            self.current += 1
            shard = self.shards[self.current]
            path = self.out_dir / (shard.name + ".partial")
            self.file = open(path, "wb")  # noqa: SIM115 - closed in _close_current
            self.file.seek(8 + shard.reserve())
            self.entries = []
            self.pos = 0

    def _close_current(self) -> None:
        if self.file is None:
            return
        shard = self.shards[self.current]
        done = {e[0] for e in self.entries}
        missing = [k for k in shard.planned if k not in done]
        if missing or self.open_tensor is not None:
            raise RuntimeError(f"{shard.name}: tensors not written: {missing[:5]}")
        parts = ['"__metadata__":{"format":"pt"}']
        parts += [_entry_json(*e) for e in self.entries]
        header = ("{" + ",".join(parts) + "}").encode("utf-8")
        reserve = shard.reserve()
        if len(header) > reserve:
            raise RuntimeError(f"{shard.name}: header {len(header)} B exceeds reserve {reserve}")
        self.file.seek(0)
        self.file.write(struct.pack("<Q", reserve))
        self.file.write(header + b" " * (reserve - len(header)))
        self.file.close()
        self.file = None
        os.replace(self.out_dir / (shard.name + ".partial"), self.out_dir / shard.name)

    def begin(self, key: str, dtype: str, shape: tuple[int, ...]) -> None:
        """Starts a tensor of ``shape``; its bytes follow through :meth:`write`."""
        if self.open_tensor is not None:
            raise RuntimeError(f"tensor {self.open_tensor[0]} is still open")
        idx = self.where.get(key)
        if idx is None:
            raise RuntimeError(f"tensor {key} is not planned")
        self._switch(idx)
        itemsize = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}[dtype]
        nbytes = math.prod(shape) * itemsize
        planned = self.shards[idx].planned[key].nbytes
        if planned is not None and planned != nbytes:
            raise RuntimeError(f"tensor {key}: planned {planned} B, got {nbytes} B")
        self.open_tensor = (key, dtype, tuple(shape), self.pos, self.pos + nbytes)

    def write(self, data: Any) -> None:
        """Appends raw bytes (any buffer: numpy array, bytes) to the open tensor."""
        if self.open_tensor is None:
            raise RuntimeError("no open tensor")
        view = memoryview(data).cast("B")
        end = self.open_tensor[4]
        if self.pos + view.nbytes > end:
            raise RuntimeError(f"tensor {self.open_tensor[0]}: too many bytes")
        self.file.write(view)
        self.pos += view.nbytes
        self.written += view.nbytes
        if self.pos == end:
            self.entries.append(self.open_tensor)
            self.total_size += end - self.open_tensor[3]
            self.open_tensor = None

    def add(self, key: str, value: Any, shape: tuple[int, ...] | None = None) -> None:
        """Writes a whole tensor (torch tensor or numpy array)."""
        if isinstance(value, torch.Tensor):
            dtype = _ST_DTYPES[value.dtype]
            shape = tuple(value.shape) if shape is None else shape
            data = _tensor_bytes(value)
        else:
            arr = np.ascontiguousarray(value)
            dtype = _NP_ST_DTYPES[arr.dtype]
            shape = tuple(arr.shape) if shape is None else shape
            data = arr
        self.begin(key, dtype, shape)
        if math.prod(shape) == 0:
            self.write(b"")
        else:
            self.write(data)

    def close(self, index_name: str) -> Path:
        """Closes the last shard and writes ``index_name`` (weight_map + total_size)."""
        self._switch(len(self.shards) - 1)
        self._close_current()
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": {key: self.shards[i].name for key, i in self.where.items()},
        }
        path = self.out_dir / index_name
        path.write_text(json.dumps(index, indent=2) + "\n")
        return path


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(torch.uint8).numpy()


def _plan_shards(units: list[list[_Planned]], target: int, prefix: str) -> list[_Shard]:
    """Greedily groups whole units (embedding, one layer, the head) into shards of ~target."""
    groups: list[list[_Planned]] = [[]]
    size = 0
    for unit in units:
        unit_bytes = sum(p.nbytes or 256 for p in unit)
        if groups[-1] and size + unit_bytes > target:
            groups.append([])
            size = 0
        groups[-1].extend(unit)
        size += unit_bytes
    n = len(groups)
    return [
        _Shard(f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors", {p.key: p for p in g})
        for i, g in enumerate(groups)
    ]


# --------------------------------------------------------------------------------------------
# Model description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dims:
    vocab: int
    hidden: int
    inter: int
    layers: int
    experts: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> _Dims:
        return cls(
            vocab=config["vocab_size"],
            hidden=config["hidden_size"],
            inter=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            experts=config["num_local_experts"],
            heads=config["num_attention_heads"],
            kv_heads=config["num_key_value_heads"],
            head_dim=config["head_dim"],
        )

    def attn_shapes(self) -> dict[str, tuple[int, int]]:
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return {
            "q_proj": (q, self.hidden),
            "k_proj": (kv, self.hidden),
            "v_proj": (kv, self.hidden),
            "o_proj": (self.hidden, q),
        }


def _max_entry(key: str, shape: tuple[int, ...]) -> int:
    return len(_entry_json(key, "BF16", shape, 10**15, 10**15))


def _planned(key: str, shape: tuple[int, ...], itemsize: int) -> _Planned:
    return _Planned(key, math.prod(shape) * itemsize, _max_entry(key, shape))


def _planned_nf4(prefix: str, shape: tuple[int, int], nested: bool) -> list[_Planned]:
    n = shape[0] * shape[1]
    nb = n // BLOCKSIZE
    out = [
        _planned(f"{prefix}.weight", (n // 2, 1), 1),
        _planned(f"{prefix}.weight.absmax", (nb,), 1 if nested else 4),
        _planned(f"{prefix}.weight.quant_map", (16,), 4),
    ]
    if nested:
        out.append(_planned(f"{prefix}.weight.nested_absmax", (-(-nb // NESTED_BLOCKSIZE),), 4))
        out.append(_planned(f"{prefix}.weight.nested_quant_map", (256,), 4))
    blob = f"{prefix}.weight.quant_state.bitsandbytes__nf4"
    out.append(_Planned(blob, None, _max_entry(blob, (10**6,))))
    return out


def _layer_plan(d: _Dims, layer: int, nested: bool, attn_nf4: bool, isz: int) -> list[_Planned]:
    p = f"model.layers.{layer}"
    out = [
        _planned(f"{p}.input_layernorm.weight", (d.hidden,), isz),
        _planned(f"{p}.post_attention_layernorm.weight", (d.hidden,), isz),
    ]
    for name, shape in d.attn_shapes().items():
        pre = f"{p}.self_attn.{name}"
        if attn_nf4:
            out += _planned_nf4(pre, shape, nested)
        else:
            out.append(_planned(f"{pre}.weight", shape, isz))
        out.append(_planned(f"{pre}.bias", (shape[0],), isz))
    out.append(_planned(f"{p}.self_attn.sinks", (d.heads,), isz))
    out.append(_planned(f"{p}.mlp.router.linear.weight", (d.experts, d.hidden), isz))
    out.append(_planned(f"{p}.mlp.router.linear.bias", (d.experts,), isz))
    for proj, shape in (
        ("gate_up_projs", (2 * d.inter, d.hidden)),
        ("down_projs", (d.hidden, d.inter)),
    ):
        for e in range(d.experts):
            pre = f"{p}.mlp.experts.{proj}.{e}"
            out += _planned_nf4(pre, shape, nested)
            out.append(_planned(f"{pre}.bias", (shape[0],), isz))
    return out


def _ref_layer_plan(d: _Dims, layer: int, isz: int) -> list[_Planned]:
    p = f"model.layers.{layer}"
    out = [
        _planned(f"{p}.input_layernorm.weight", (d.hidden,), isz),
        _planned(f"{p}.post_attention_layernorm.weight", (d.hidden,), isz),
    ]
    for name, shape in d.attn_shapes().items():
        out.append(_planned(f"{p}.self_attn.{name}.weight", shape, isz))
        out.append(_planned(f"{p}.self_attn.{name}.bias", (shape[0],), isz))
    out.append(_planned(f"{p}.self_attn.sinks", (d.heads,), isz))
    out.append(_planned(f"{p}.mlp.router.weight", (d.experts, d.hidden), isz))
    out.append(_planned(f"{p}.mlp.router.bias", (d.experts,), isz))
    e, h, i = d.experts, d.hidden, d.inter
    out.append(_planned(f"{p}.mlp.experts.gate_up_proj", (e, h, 2 * i), isz))
    out.append(_planned(f"{p}.mlp.experts.gate_up_proj_bias", (e, 2 * i), isz))
    out.append(_planned(f"{p}.mlp.experts.down_proj", (e, i, h), isz))
    out.append(_planned(f"{p}.mlp.experts.down_proj_bias", (e, h), isz))
    return out


# --------------------------------------------------------------------------------------------
# Random, trained-looking values
# --------------------------------------------------------------------------------------------


def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _matrix(seed: int, key: str, shape: tuple[int, int], std: float) -> torch.Tensor:
    """f32 [out, in]: normal(0, std) with a log-normal scale per output row."""
    g = _generator(seed, key)
    rows = torch.exp(0.25 * torch.randn(shape[0], generator=g)) * std
    w = torch.randn(shape, generator=g)
    w *= rows[:, None]
    return w


def _vector(seed: int, key: str, n: int, mean: float, std: float) -> torch.Tensor:
    g = _generator(seed, key)
    return torch.randn(n, generator=g) * std + mean


def _big_matrix_chunks(
    seed: int, key: str, shape: tuple[int, int], std: float, dtype: torch.dtype, rows: int
) -> Iterator[torch.Tensor]:
    """A large [out, in] matrix in ``dtype``, produced ``rows`` rows at a time."""
    g = _generator(seed, key)
    for start in range(0, shape[0], rows):
        n = min(rows, shape[0] - start)
        yield (torch.randn((n, shape[1]), generator=g) * std).to(dtype)


# --------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """``map(fn, items)`` on a thread pool, results in order, at most ``2*workers`` in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with cf.ThreadPoolExecutor(workers) as pool:
        pending: deque[cf.Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _quantization_config(config: dict[str, Any], nested: bool, attn_nf4: bool, dtype: str) -> dict:
    skip = ["lm_head", "embed_tokens", "router", "norm", "input_layernorm"]
    skip += ["post_attention_layernorm", "sinks"]
    if not attn_nf4:
        skip += [
            f"model.layers.{i}.self_attn.{p}"
            for i in range(config["num_hidden_layers"])
            for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        ]
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": _DTYPE_NAMES[_DTYPES[dtype]],
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": nested,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def _write_side_files(out: Path, config: dict[str, Any]) -> None:
    special = _presets.special_ids_for(config)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {
        "bos_token_id": special["<|startoftext|>"],
        "do_sample": True,
        "eos_token_id": [special["<|return|>"], special["<|endoftext|>"], special["<|call|>"]],
        "pad_token_id": special["<|endoftext|>"],
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    _tokenizer.save_tokenizer(out, special, config["max_position_embeddings"])


_OWN_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _clear_outputs(out: Path) -> None:
    """Removes files a previous synth run wrote (and only those)."""
    for d in (out, out / "reference"):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name in _OWN_FILES or (
                p.name.startswith("model-")
                and (p.name.endswith(".safetensors") or p.name.endswith(".safetensors.partial"))
            ):
                p.unlink()
    ref = out / "reference"
    if ref.is_dir() and not any(ref.iterdir()):
        ref.rmdir()


@dataclass
class _Job:
    """One tensor to generate: what the worker thread computes."""

    kind: str  # "nf4" | "plain"
    key: str  # Unsloth prefix (nf4) or full key (plain)
    shape: tuple[int, ...]
    std: float
    mean: float = 0.0
    matrix: bool = False


def write_synthetic_checkpoint(
    out: str | os.PathLike[str],
    preset: str | dict[str, Any] = "tiny",
    seed: int = 0,
    nested: bool = True,
    attention: str = "nf4",
    dtype: str = "bf16",
    reference: bool | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Writes a random GPT-OSS checkpoint in Unsloth's bnb-4bit layout (see module docs).

    Args:
        out: output directory (created; must be empty unless ``overwrite``).
        preset: ``"tiny"``, ``"20b"`` or a config dict in HF GptOss form.
        seed: base seed; the same seed gives the same weights.
        nested: double quantization (uint8 absmax + nested statistics) or f32 absmax.
        attention: ``"nf4"`` (q/k/v/o quantized) or ``"bf16"`` (left in ``dtype`` and listed in
            ``llm_int8_skip_modules``).
        dtype: ``"bf16"`` or ``"fp16"``: the original/compute dtype of the model.
        reference: also write ``out/reference`` (HF layout, dequantized). Default: on for a
            model with less than 1e9 parameters (tiny), off otherwise.
        progress: show a tqdm progress bar (bytes written).
        overwrite: allow a non-empty ``out``; files of an earlier synth run are replaced.

    Returns:
        ``out`` as a Path.
    """
    if attention not in ("nf4", "bf16"):
        raise ValueError(f"attention must be 'nf4' or 'bf16', got {attention!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'bf16' or 'fp16', got {dtype!r}")
    config = (
        _presets.get_preset(preset) if isinstance(preset, str) else json.loads(json.dumps(preset))
    )
    tdtype = _DTYPES[dtype]
    attn_nf4 = attention == "nf4"
    d = _Dims.of(config)
    params = d.vocab * d.hidden * 2 + d.layers * d.experts * 3 * d.hidden * d.inter
    if reference is None:
        reference = params < 1_000_000_000

    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"{out_dir} is not empty (pass overwrite=True / --force)")
        _clear_outputs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ref_dir = out_dir / "reference"
    if reference:
        ref_dir.mkdir(exist_ok=True)

    config["torch_dtype"] = _DTYPE_NAMES[tdtype]
    qconfig = dict(config)
    qconfig["quantization_config"] = _quantization_config(config, nested, attn_nf4, dtype)
    _write_side_files(out_dir, qconfig)
    if reference:
        _write_side_files(ref_dir, config)

    isz = 2
    embed = [_planned("model.embed_tokens.weight", (d.vocab, d.hidden), isz)]
    head = [
        _planned("model.norm.weight", (d.hidden,), isz),
        _planned("lm_head.weight", (d.vocab, d.hidden), isz),
    ]
    units = [embed]
    units += [_layer_plan(d, i, nested, attn_nf4, isz) for i in range(d.layers)]
    units.append(head)
    small = params < 1_000_000_000
    total_est = sum(p.nbytes or 256 for u in units for p in u)
    target = -(-total_est // _TINY_SHARDS) if small else _SHARD_BYTES_BIG
    writer = _ShardedWriter(out_dir, _plan_shards(units, target, "model"))

    ref_writer: _ShardedWriter | None = None
    if reference:
        ref_units = [embed] + [_ref_layer_plan(d, i, isz) for i in range(d.layers)] + [head]
        ref_total = sum(p.nbytes or 0 for u in ref_units for p in u)
        ref_target = -(-ref_total // _TINY_SHARDS) if small else _REF_SHARD_BYTES_BIG
        ref_writer = _ShardedWriter(ref_dir, _plan_shards(ref_units, ref_target, "model"))
        total_est += ref_total

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_est, unit="B", unit_scale=True, desc=f"synth {out_dir.name}")

    def tick() -> None:
        if bar is not None:
            done = writer.written + (ref_writer.written if ref_writer else 0)
            bar.update(done - bar.n)

    def compute(job: _Job) -> tuple[_Job, Any, Any]:
        if job.kind == "plain":
            if job.matrix:
                t = _matrix(seed, job.key, job.shape, job.std)  # type: ignore[arg-type]
            else:
                t = _vector(seed, job.key, job.shape[0], job.mean, job.std)
            return job, t.to(tdtype), None
        w = _matrix(seed, job.key + ".weight", job.shape, job.std)  # type: ignore[arg-type]
        q = quantize_nf4(w, nested)
        del w
        deq = dequantize_nf4(q, tdtype).view(job.shape) if reference else None
        return job, q, deq

    try:
        # Embedding (chunked: 201088 x 2880 would be 2.3 GB in f32).
        _write_big(
            writer,
            ref_writer,
            seed,
            "model.embed_tokens.weight",
            (d.vocab, d.hidden),
            0.5,
            tdtype,
            tick,
        )
        for layer in range(d.layers):
            _write_layer(writer, ref_writer, d, layer, attn_nf4, tdtype, compute, tick)
        for w_ in (writer, ref_writer):
            if w_ is not None:
                w_.add(
                    "model.norm.weight",
                    _vector(seed, "model.norm.weight", d.hidden, 1.0, 0.1).to(tdtype),
                )
        _write_big(
            writer,
            ref_writer,
            seed,
            "lm_head.weight",
            (d.vocab, d.hidden),
            1.0 / math.sqrt(d.hidden),
            tdtype,
            tick,
        )
        writer.close("model.safetensors.index.json")
        if ref_writer is not None:
            ref_writer.close("model.safetensors.index.json")
        tick()
    finally:
        if bar is not None:
            bar.close()
        for w_ in (writer, ref_writer):
            if w_ is not None and w_.file is not None:
                w_.file.close()
    return out_dir


def _write_big(
    writer: _ShardedWriter,
    ref_writer: _ShardedWriter | None,
    seed: int,
    key: str,
    shape: tuple[int, int],
    std: float,
    dtype: torch.dtype,
    tick: Callable[[], None],
) -> None:
    rows = max(1, (8 << 20) // shape[1])
    targets = [w for w in (writer, ref_writer) if w is not None]
    for w in targets:
        w.begin(key, _ST_DTYPES[dtype], shape)
    for chunk in _big_matrix_chunks(seed, key, shape, std, dtype, rows):
        data = _tensor_bytes(chunk)
        for w in targets:
            w.write(data)
        tick()


def _write_layer(
    writer: _ShardedWriter,
    ref_writer: _ShardedWriter | None,
    d: _Dims,
    layer: int,
    attn_nf4: bool,
    dtype: torch.dtype,
    compute: Callable[[_Job], tuple[_Job, Any, Any]],
    tick: Callable[[], None],
) -> None:
    p = f"model.layers.{layer}"
    jobs: list[_Job] = [
        _Job("plain", f"{p}.input_layernorm.weight", (d.hidden,), 0.1, 1.0),
        _Job("plain", f"{p}.post_attention_layernorm.weight", (d.hidden,), 0.1, 1.0),
    ]
    for name, shape in d.attn_shapes().items():
        pre = f"{p}.self_attn.{name}"
        std = 1.0 / math.sqrt(shape[1])
        if attn_nf4:
            jobs.append(_Job("nf4", pre, shape, std))
        else:
            jobs.append(_Job("plain", f"{pre}.weight", shape, std, matrix=True))
        jobs.append(_Job("plain", f"{pre}.bias", (shape[0],), 0.02))
    jobs.append(_Job("plain", f"{p}.self_attn.sinks", (d.heads,), 0.75, 1.0))
    jobs.append(
        _Job(
            "plain",
            f"{p}.mlp.router.linear.weight",
            (d.experts, d.hidden),
            1.0 / math.sqrt(d.hidden),
            matrix=True,
        )
    )
    jobs.append(_Job("plain", f"{p}.mlp.router.linear.bias", (d.experts,), 0.1))
    expert_shapes = {
        "gate_up_projs": (2 * d.inter, d.hidden),
        "down_projs": (d.hidden, d.inter),
    }
    for proj, shape in expert_shapes.items():
        for e in range(d.experts):
            pre = f"{p}.mlp.experts.{proj}.{e}"
            jobs.append(_Job("nf4", pre, shape, 1.0 / math.sqrt(shape[1])))
            jobs.append(_Job("plain", f"{pre}.bias", (shape[0],), 0.02))

    ref_names = {
        "gate_up_projs": f"{p}.mlp.experts.gate_up_proj",
        "down_projs": f"{p}.mlp.experts.down_proj",
    }
    ref_biases: dict[str, list[torch.Tensor]] = {"gate_up_projs": [], "down_projs": []}
    for job, value, deq in _ordered_map(compute, jobs, workers=2):
        if job.kind == "nf4":
            for key, arr, shape in _bnb_tensors(job.key, value, job.shape, dtype):
                writer.add(key, arr, shape)
            if ref_writer is not None and deq is not None:
                proj = job.key.split(".")[-2]
                if proj in ref_names:
                    e = int(job.key.split(".")[-1])
                    if e == 0:
                        eshape = (d.experts, job.shape[1], job.shape[0])
                        ref_writer.begin(ref_names[proj], _ST_DTYPES[dtype], eshape)
                    ref_writer.write(_tensor_bytes(deq.t()))
                else:
                    ref_writer.add(f"{job.key}.weight", deq)
        else:
            writer.add(job.key, value)
            if ref_writer is not None:
                parts = job.key.split(".")
                if parts[-3] in ref_biases and parts[-1] == "bias":
                    ref_biases[parts[-3]].append(value)
                    if len(ref_biases[parts[-3]]) == d.experts:
                        name = ref_names[parts[-3]] + "_bias"
                        ref_writer.add(name, torch.stack(ref_biases[parts[-3]]))
                else:
                    ref_writer.add(job.key.replace(".router.linear.", ".router."), value)
        del value, deq
        tick()
