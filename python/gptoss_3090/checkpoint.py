"""Reading Unsloth GPT-OSS bitsandbytes NF4 checkpoints, and the virtual fused expert view.

``open_checkpoint(path)`` validates the whole checkpoint up front (config, every shard header,
every tensor's format, shape and byte count, every expert present exactly once) and raises
``CheckpointError`` (a ``ValueError``) naming the offending file or tensor key otherwise.
Tensor data is memory-mapped and only read when asked for.

Fused experts: ``Checkpoint.fused_experts(layer, "gate_up" | "down")`` presents one layer's
per-expert NF4 weights as one ``[E, N, K]`` tensor without dequantizing (``gate_up``:
``N = 2 * intermediate_size, K = hidden_size``; ``down``: ``N = hidden_size,
K = intermediate_size``). Buffers (``nested_*`` only when double-quantized):

========================  ============================  ==========================================
buffer                    dtype, shape                  content
========================  ============================  ==========================================
``packed``                uint8 ``[E, N*K/2]``          packed codes, first element in high nibble
``absmax``                uint8 / float32 ``[E, N*K/64]``  per-block absmax (8-bit codes if nested)
``nested_absmax``         float32 ``[E, nnb]``          ``nnb = ceil(N*K/64/256)``, per expert
``nested_offset``         float32 ``[E]``               one offset per expert
``bias``                  bias dtype ``[E, N]``         stacked biases
``quant_map``             float32 ``[16]``              the NF4 table (same for every expert)
``nested_quant_map``      float32 ``[256]``             8-bit dynamic map (same for every expert)
========================  ============================  ==========================================

Expert ``e``, block ``b`` (64 elements) scales by
``nested_quant_map[absmax[e, b]] * nested_absmax[e, b // 256] + nested_offset[e]``: the nested
statistics are indexed per expert. The gate/up row interleaving of the checkpoint is kept: in
``gate_up``, row ``2j`` is gate unit ``j`` and row ``2j + 1`` is up unit ``j`` (bias likewise).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptoss_3090 import _native
from gptoss_3090._native import CheckpointError

__all__ = ["Checkpoint", "CheckpointError", "FusedExperts", "open_checkpoint"]

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "uint16": torch.uint16,
    "int32": torch.int32,
    "uint32": torch.uint32,
    "int64": torch.int64,
    "uint64": torch.uint64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}

PROJECTIONS = ("gate_up", "down")
"""Valid projection names for :meth:`Checkpoint.fused_experts`."""

_BUFFER_NAMES = (
    "packed",
    "absmax",
    "nested_absmax",
    "nested_offset",
    "bias",
    "quant_map",
    "nested_quant_map",
)


def _torch_dtype(name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise CheckpointError(f"dtype '{name}' has no torch equivalent") from None


def _from_bytes(raw: np.ndarray, dtype: str, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """A torch tensor over ``raw`` (1-D uint8 or uint16 numpy) reinterpreted as ``dtype``."""
    return torch.from_numpy(raw).view(_torch_dtype(dtype)).reshape(tuple(shape))


def _byte_view(t: torch.Tensor, name: str) -> np.ndarray:
    """A 1-D uint8 numpy view sharing memory with CPU tensor ``t`` (no copy)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"buffer '{name}': expected a torch.Tensor, found {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"buffer '{name}': expected a CPU tensor, found device {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"buffer '{name}': expected a contiguous tensor")
    t = t.detach()
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(torch.uint8).reshape(-1).numpy()


def _check_layer(layer: Any, n_layers: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ValueError(f"layer: expected an int in 0..{n_layers}, found {layer!r}")
    layer = int(layer)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer: expected an index in 0..{n_layers}, found {layer}")
    return layer


def _check_proj(proj: Any) -> str:
    if proj not in PROJECTIONS:
        raise ValueError(f"projection: expected 'gate_up' or 'down', found {proj!r}")
    return str(proj)


class FusedExperts:
    """One layer's experts for one projection as fused NF4 buffers (see the module docs).

    Attributes:
        layer: layer index.
        proj: ``"gate_up"`` or ``"down"``.
        shape: ``(E, N, K)``, the logical fused weight shape.
        nested: whether the absmax statistics are double-quantized.
        dtype: the original (and dequantized) dtype, ``torch.bfloat16`` or ``torch.float16``.
        packed, absmax, nested_absmax, nested_offset, bias, quant_map, nested_quant_map:
            CPU torch tensors (``nested_*`` are ``None`` when not nested).
    """

    def __init__(self, layout: Mapping[str, Any], buffers: Mapping[str, torch.Tensor]) -> None:
        self.layer: int = int(layout["layer"])
        self.proj: str = str(layout["proj"])
        e, n, k = layout["shape"]
        self.shape: tuple[int, int, int] = (int(e), int(n), int(k))
        self.nested: bool = bool(layout["nested"])
        self.dtype: torch.dtype = _torch_dtype(layout["dtype"])
        self.layout: dict[str, Any] = dict(layout)
        self.packed: torch.Tensor = buffers["packed"]
        self.absmax: torch.Tensor = buffers["absmax"]
        self.nested_absmax: torch.Tensor | None = buffers.get("nested_absmax")
        self.nested_offset: torch.Tensor | None = buffers.get("nested_offset")
        self.bias: torch.Tensor = buffers["bias"]
        self.quant_map: torch.Tensor = buffers["quant_map"]
        self.nested_quant_map: torch.Tensor | None = buffers.get("nested_quant_map")

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        """The fused buffers by name (only those that exist for this nesting)."""
        return {
            name: getattr(self, name)
            for name in _BUFFER_NAMES
            if getattr(self, name) is not None
        }

    @property
    def nbytes(self) -> int:
        """Total bytes of all buffers."""
        return sum(t.numel() * t.element_size() for t in self.buffers.values())

    @staticmethod
    def empty(layout: Mapping[str, Any], pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """Allocates uninitialised CPU buffers for ``layout`` (from ``Checkpoint.fused_layout``).

        With ``pin_memory=True`` they are page-locked (needs CUDA), ready for async upload.
        Buffers of one layout can be refilled for every layer with the same layout.
        """
        return {
            name: torch.empty(
                tuple(spec["shape"]), dtype=_torch_dtype(spec["dtype"]), pin_memory=pin_memory
            )
            for name, spec in layout["buffers"].items()
        }

    @classmethod
    def fill_into(
        cls,
        checkpoint: Checkpoint,
        layer: int,
        proj: str,
        out: Mapping[str, torch.Tensor],
        threads: int | None = None,
    ) -> FusedExperts:
        """Fills caller-provided CPU tensors (e.g. pinned) with the fused (layer, proj) experts.

        ``out`` must hold exactly the buffers of ``checkpoint.fused_layout(layer, proj)`` with
        their exact shapes and dtypes, contiguous, on the CPU. The copy is one pass over the
        mapped files, multi-threaded, with the GIL released. Returns a ``FusedExperts`` whose
        attributes are the tensors of ``out``.
        """
        return checkpoint.fused_experts(layer, proj, out=out, threads=threads)

    def dequantize(self, expert: int) -> torch.Tensor:
        """Dequantizes expert ``expert`` from the fused buffers: ``[N, K]`` in ``self.dtype``.

        Equal, bit for bit, to ``Checkpoint.dequantize`` of that expert's own weight.
        """
        e, n, k = self.shape
        if isinstance(expert, bool) or not isinstance(expert, (int, np.integer)):
            raise ValueError(f"expert: expected an int in 0..{e}, found {expert!r}")
        if not 0 <= int(expert) < e:
            raise ValueError(f"expert: expected an index in 0..{e}, found {expert}")

        def view(name: str) -> np.ndarray | None:
            t = getattr(self, name)
            return None if t is None else _byte_view(t, name)

        bits = _native.fused_dequantize(
            view("packed"),
            view("absmax"),
            view("quant_map"),
            e,
            n,
            k,
            self.layout["dtype"],
            int(expert),
            nested_absmax=view("nested_absmax"),
            nested_offset=view("nested_offset"),
            nested_quant_map=view("nested_quant_map"),
        )
        return torch.from_numpy(bits).view(self.dtype).reshape(n, k)

    def __repr__(self) -> str:
        return (
            f"FusedExperts(layer={self.layer}, proj={self.proj!r}, shape={self.shape}, "
            f"nested={self.nested}, dtype={self.dtype}, nbytes={self.nbytes})"
        )


class Checkpoint:
    """An opened, validated Unsloth GPT-OSS bnb-4bit checkpoint (use :func:`open_checkpoint`)."""

    def __init__(self, native: _native.NativeCheckpoint) -> None:
        self._native = native
        self._config: dict[str, Any] | None = None
        self._summary: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        """The checkpoint directory."""
        return Path(self._native.path)

    @property
    def config(self) -> dict[str, Any]:
        """The parsed config.json (a fresh copy)."""
        if self._config is None:
            self._config = json.loads(self._native.config_json())
        return json.loads(json.dumps(self._config))

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return int(self.summary()["layers"])

    def summary(self) -> dict[str, Any]:
        """Shapes, formats and sizes.

        Keys: ``layers``, ``experts``, ``experts_per_token``, ``hidden_size``,
        ``intermediate_size``, ``heads``, ``kv_heads``, ``head_dim``, ``vocab_size``,
        ``sliding_window``, ``layer_types``, ``tie_word_embeddings``;
        ``nf4`` ({"attention": bool, "experts": bool}: every weight of the category is NF4) and
        ``nf4_counts`` ({category: {"nf4": n, "total": m}});
        ``nested`` (bool when uniform over all NF4 weights, else {"attention": bool|None,
        "experts": bool|None}); ``dtype`` (the NF4 original dtype, or the embedding dtype);
        ``bytes`` by category {experts, attention, router, embed, lm_head, norms_sinks_biases,
        other} (stored bytes; quant statistics count with their weight, biases under
        norms_sinks_biases, ``other`` = file headers), summing to ``total_file_bytes``;
        ``files``, ``tensors``; ``gpu_weight_bytes``: estimated GPU memory for the weights as
        our runtime stores them (NF4 buffers as they are: packed, uint8 absmax, nested
        statistics; everything else bf16); ``quantization_config`` (the bitsandbytes settings);
        ``path``.
        """
        if self._summary is None:
            self._summary = json.loads(self._native.summary_json())
        return json.loads(json.dumps(self._summary))

    def keys(self) -> list[str]:
        """All tensor keys in the shards, sorted."""
        return self._native.keys()

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        try:
            self._native.tensor_info(key)
        except CheckpointError:
            return False
        return True

    def tensor(self, key: str) -> torch.Tensor:
        """The stored tensor ``key`` as is (dtype and shape from the header), a CPU copy.

        Quantized weights come back in their stored form (the packed uint8 ``[n/2, 1]``).
        Raises ``CheckpointError`` naming ``key`` when it does not exist.
        """
        dtype, shape = self._native.tensor_info(key)
        return _from_bytes(self._native.read_tensor(key), dtype, shape)

    def is_nf4(self, name: str) -> bool:
        """Whether ``name`` is an NF4-quantized Linear weight (``<module>.weight``)."""
        return self._native.weight_format(name) == "nf4"

    def dequantize(self, name: str) -> torch.Tensor:
        """The weight ``name`` dequantized on the CPU, bit-exact vs bitsandbytes.

        ``name`` is a weight key, e.g. ``model.layers.0.mlp.experts.gate_up_projs.3.weight``.
        NF4 weights come back in their original dtype with the shape from their quant state;
        any other stored tensor is returned as is. Unknown names raise ``CheckpointError``.
        """
        if self._native.weight_format(name) == "nf4":
            bits, dtype, shape = self._native.dequantize(name)
            return _from_bytes(bits, dtype, shape)
        if name in self:
            return self.tensor(name)
        raise CheckpointError(
            f"tensor '{name}' is missing: it is not a weight or tensor of {self.path} "
            "(expected e.g. 'model.layers.0.mlp.experts.gate_up_projs.0.weight')"
        )

    def fused_layout(self, layer: int, proj: str) -> dict[str, Any]:
        """Sizes of the fused (layer, proj) buffers, for allocating them.

        ``{"layer", "proj", "shape": (E, N, K), "nested", "dtype", "bias_dtype",
        "total_bytes", "buffers": {name: {"shape", "dtype", "nbytes"}}}``. Raises
        ``ValueError`` for a bad layer or projection, ``CheckpointError`` if the experts
        cannot be fused (not all NF4, mixed nesting, dtypes or shapes).
        """
        layer = _check_layer(layer, self.num_layers)
        proj = _check_proj(proj)
        return self._native.fused_layout(layer, proj)

    def empty_fused_buffers(
        self, layer: int, proj: str, pin_memory: bool = False
    ) -> dict[str, torch.Tensor]:
        """Uninitialised CPU buffers (optionally pinned) for ``fused_experts(..., out=...)``."""
        return FusedExperts.empty(self.fused_layout(layer, proj), pin_memory=pin_memory)

    def fused_experts(
        self,
        layer: int,
        proj: str,
        out: Mapping[str, torch.Tensor] | None = None,
        threads: int | None = None,
    ) -> FusedExperts:
        """The experts of ``layer`` for ``proj`` (``"gate_up"`` or ``"down"``) as fused buffers.

        Without ``out`` the buffers are allocated here (about one layer's experts of memory).
        With ``out`` (a dict of CPU tensors named and shaped as ``fused_layout`` says, e.g.
        pinned buffers reused across layers) they are filled in place. One pass over the mapped
        files, ``threads`` copy threads (default min(cores, 8)), GIL released.
        """
        layout = self.fused_layout(layer, proj)
        specs: dict[str, Any] = layout["buffers"]
        if out is None:
            bufs = FusedExperts.empty(layout)
        else:
            if not isinstance(out, Mapping):
                raise ValueError(f"out: expected a dict of tensors, found {type(out).__name__}")
            extra = sorted(set(out) - set(specs))
            missing = sorted(set(specs) - set(out))
            if extra or missing:
                raise ValueError(
                    f"out: expected buffers {sorted(specs)}, found {sorted(out)} "
                    f"(missing {missing}, unexpected {extra})"
                )
            bufs = dict(out)
            for name, spec in specs.items():
                t = bufs[name]
                if not isinstance(t, torch.Tensor):
                    raise ValueError(
                        f"buffer '{name}': expected a torch.Tensor, found {type(t).__name__}"
                    )
                want_dtype = _torch_dtype(spec["dtype"])
                want_shape = tuple(spec["shape"])
                if t.dtype != want_dtype or tuple(t.shape) != want_shape:
                    raise ValueError(
                        f"buffer '{name}': expected {want_dtype} {list(want_shape)}, "
                        f"found {t.dtype} {list(t.shape)}"
                    )
        views = {name: _byte_view(bufs[name], name) for name in specs}
        self._native.fill_fused(
            layout["layer"],
            layout["proj"],
            views["packed"],
            views["absmax"],
            views["bias"],
            views["quant_map"],
            nested_absmax=views.get("nested_absmax"),
            nested_offset=views.get("nested_offset"),
            nested_quant_map=views.get("nested_quant_map"),
            threads=threads,
        )
        return FusedExperts(layout, bufs)

    def __repr__(self) -> str:
        s = self.summary()
        return (
            f"Checkpoint({str(self.path)!r}, layers={s['layers']}, experts={s['experts']}, "
            f"nf4={s['nf4']}, nested={s['nested']}, files={s['files']})"
        )


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Opens and validates the checkpoint directory ``path`` (config.json + safetensors shards).

    Raises ``CheckpointError`` (a ``ValueError``) naming the file or tensor key when anything
    is missing, damaged or not GPT-OSS NF4 as bitsandbytes writes it.
    """
    return Checkpoint(_native.NativeCheckpoint(os.fspath(path)))
