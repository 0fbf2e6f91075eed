"""The GPT-OSS MoE block on fused NF4 experts, as one PyTorch custom op.

``torch.ops.gptoss_3090.moe_forward`` runs router (optional), grouping, both expert GEMMs (NF4
weights decoded on the fly, SwiGLU-OAI fused) and the combine in the package's own CUDA
kernels, launched from Rust on torch's current stream. It allocates nothing but its output,
never synchronizes and picks its kernels from the token count alone, so it can be captured in a
CUDA graph for a fixed token count (pass a preallocated ``workspace``).

Notebook use::

    w = MoeLayerWeights.from_fused(ckpt.fused_experts(0, "gate_up"), ckpt.fused_experts(0, "down"),
                                   router_weight=..., router_bias=..., device="cuda")
    y = gptoss_3090.ops.moe(x, w)                            # routes with the router weights
    y = gptoss_3090.ops.moe(x, w, router_logits=logits)      # vLLM's apply_monolithic
    y = gptoss_3090.ops.moe(x, w, topk_ids=ids, topk_weights=wts)   # vLLM's apply

Math (gpt-oss-math.md): logits = x W_r^T + b_r; top-k; softmax over the k selected logits;
per expert ``a = x W_gu^T + b_gu`` (rows interleaved gate/up), ``gate = min(gate, 7)``,
``up = clamp(up, -7, 7)``, ``h = (up + 1) * gate * sigmoid(1.702 gate)``,
``out = h W_d^T + b_d``; ``y = sum_k w_k out_k``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from gptoss_3090.nf4 import NF4_CODE

__all__ = [
    "NF4_CODE",
    "WEIGHTS_ORDERS",
    "MoeLayerWeights",
    "Nf4Experts",
    "chunk_major_",
    "chunk_major_packed",
    "moe",
    "moe_forward",
    "moe_regime",
    "moe_workspace_bytes",
    "quantize_nf4_experts",
    "reference_forward",
    "router_logits",
    "router_topk",
    "router_topk_unpack",
    "rows_packed",
    "workspace_routing",
]

#: Byte orders of packed expert weights the kernels read: ``"rows"`` (bitsandbytes, as stored in
#: checkpoints) and ``"chunks"`` (:func:`chunk_major_packed`, what the vLLM plugin serves).
WEIGHTS_ORDERS = ("rows", "chunks")


def _check_weights_order(what: str, order: str) -> None:
    """Raises ``ValueError`` naming ``what`` unless ``order`` is one of :data:`WEIGHTS_ORDERS`."""
    if order not in WEIGHTS_ORDERS:
        raise ValueError(f"{what}: expected one of {WEIGHTS_ORDERS}, found {order!r}")


_BLOCK = 64
_NESTED_BLOCK = 256
_ACT_DTYPES = (torch.bfloat16, torch.float16)
_MAX_TOP_K = 8  # experts per token the kernels route (kernels/moe.cu MOE_MAX_TOPK)
_ROUTE_WEIGHTS, _ROUTE_LOGITS, _ROUTE_GIVEN = 0, 1, 2


def _native() -> Any:
    from gptoss_3090 import _native as native

    return native


def _ensure_cuda_libs() -> None:
    """Preloads NVRTC where the runtime helper exists (branch `cuda`), so cudarc finds it."""
    try:
        from gptoss_3090 import runtime
    except ImportError:  # pragma: no cover - older tree without the runtime helpers
        return
    runtime.ensure_cuda_libs()


def _dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed=True)`` (256 sorted f32): the nested code map."""
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-6 + i)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Device containers
# ---------------------------------------------------------------------------------------------


@dataclass
class Nf4Experts:
    """One fused NF4 expert tensor ``[E, N, K]`` (bitsandbytes layout per expert) on a device.

    Attributes:
        packed: uint8 ``[E, N*K/2]``, two codes per byte, high nibble = even element.
        absmax: uint8 ``[E, N*K/64]`` when ``nested`` else float32.
        nested_absmax: float32 ``[E, ceil(N*K/64/256)]`` (``[E, 0]`` when not nested).
        nested_offset: float32 ``[E]`` (zeros when not nested).
        bias: float32 ``[E, N]``.
        shape: ``(E, N, K)``.
        nested: double quantization in use.
        order: byte order of ``packed``: ``"rows"`` (bitsandbytes) or ``"chunks"``
            (:func:`chunk_major_packed`; see :meth:`MoeLayerWeights.chunk_major`).
        gate_up_pairs: with ``order="chunks"``, whether the reorder paired the interleaved
            gate/up rows (True for a gate_up tensor).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor
    nested_offset: torch.Tensor
    bias: torch.Tensor
    shape: tuple[int, int, int]
    nested: bool
    order: str = "rows"
    gate_up_pairs: bool = False

    @classmethod
    def from_fused(
        cls, fused: Any, device: torch.device | str, nested_map: torch.Tensor | None = None
    ) -> Nf4Experts:
        """Copies a checkpoint ``FusedExperts`` (CPU tensors) to ``device``.

        Raises:
            ValueError: the fused view's nested code map differs from bitsandbytes' signed
                dynamic map (the kernels share one map for every tensor), or shapes disagree.
        """
        e, n, k = (int(v) for v in fused.shape)
        nested = bool(fused.nested)
        if nested and nested_map is not None:
            qm = torch.as_tensor(fused.nested_quant_map, dtype=torch.float32).reshape(-1).cpu()
            if not torch.equal(qm, nested_map.cpu()):
                raise ValueError(
                    "nested_quant_map: expected the signed dynamic map of bitsandbytes"
                )
        nnb = (n * k // _BLOCK + _NESTED_BLOCK - 1) // _NESTED_BLOCK

        def dev(t: Any, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(t).to(device=device, dtype=dtype).contiguous()

        packed = dev(fused.packed, torch.uint8).reshape(e, n * k // 2)
        if nested:
            absmax = dev(fused.absmax, torch.uint8).reshape(e, n * k // _BLOCK)
            nabs = dev(fused.nested_absmax, torch.float32).reshape(e, nnb)
            noff = dev(fused.nested_offset, torch.float32).reshape(e)
        else:
            absmax = dev(fused.absmax, torch.float32).reshape(e, n * k // _BLOCK)
            nabs = torch.zeros(e, 0, dtype=torch.float32, device=device)
            noff = torch.zeros(e, dtype=torch.float32, device=device)
        bias = dev(fused.bias, torch.float32).reshape(e, n)
        return cls(packed, absmax, nabs, noff, bias, (e, n, k), nested)

    def absmax_f32(self, expert: int) -> torch.Tensor:
        """Exact f32 absmax of one expert: ``map[code] * nested[b // 256] + offset`` (mul, add)."""
        if not self.nested:
            return self.absmax[expert].float()
        nmap = _dynamic_map_signed().to(self.absmax.device)
        codes = self.absmax[expert].long()
        scale = self.nested_absmax[expert].repeat_interleave(_NESTED_BLOCK)[: codes.numel()]
        return nmap[codes] * scale + self.nested_offset[expert]

    def dequantize(self, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Exact dequantization of one expert to ``[N, K]``: ``cast(NF4[code] * absmax)``.

        ``dtype=float32`` gives the fp32 products (no cast), bf16/fp16 one rounding.
        """
        _, n, k = self.shape
        p = self.packed[expert]
        _check_weights_order("order", self.order)
        if self.order == "chunks":
            p = rows_packed(p.reshape(1, -1), n, k, self.gate_up_pairs)[0]
        codes = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1).long()
        table = torch.tensor(NF4_CODE, dtype=torch.float32, device=p.device)
        vals = table[codes].view(-1, _BLOCK) * self.absmax_f32(expert)[:, None]
        return vals.reshape(n, k).to(dtype)


def quantize_nf4_experts(
    weight: torch.Tensor, bias: torch.Tensor | None = None, nested: bool = True
) -> Nf4Experts:
    """Quantizes float experts ``[E, N, K]`` to NF4 on their own device (GPU-friendly torch).

    Blockwise absmax over 64 consecutive elements, nearest code with ties to the lower code
    (bitsandbytes' CUDA rule); nested: ``offset = mean(absmax)`` per expert, 8-bit signed
    dynamic codes per 256 blocks (nearest). Meant for tests and benchmarks: the kernels only
    depend on the format, not on which quantizer produced the codes.
    """
    if weight.dim() != 3 or weight.shape[2] % _BLOCK:
        raise ValueError(
            f"weight: expected [E, N, K] with K % 64 == 0, found {tuple(weight.shape)}"
        )
    e, n, k = (int(v) for v in weight.shape)
    dev = weight.device
    blocks = weight.float().reshape(e, -1, _BLOCK)
    absmax = blocks.abs().amax(dim=2)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = blocks * inv[..., None]
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=dev)
    mids = (code[:-1] + code[1:]) / 2.0
    codes = torch.bucketize(scaled, mids, right=False).to(torch.uint8).reshape(e, -1, 2)
    packed = ((codes[..., 0] << 4) | codes[..., 1]).reshape(e, n * k // 2).contiguous()
    nb = n * k // _BLOCK
    if bias is None:
        bias = torch.zeros(e, n, device=dev)
    bias = bias.to(device=dev, dtype=torch.float32).reshape(e, n).contiguous()
    if not nested:
        nabs = torch.zeros(e, 0, dtype=torch.float32, device=dev)
        noff = torch.zeros(e, dtype=torch.float32, device=dev)
        return Nf4Experts(packed, absmax.contiguous(), nabs, noff, bias, (e, n, k), False)
    noff = absmax.mean(dim=1)
    centred = absmax - noff[:, None]
    nnb = (nb + _NESTED_BLOCK - 1) // _NESTED_BLOCK
    padded = torch.cat([centred, centred.new_zeros(e, nnb * _NESTED_BLOCK - nb)], dim=1)
    padded = padded.view(e, nnb, _NESTED_BLOCK)
    nabs = padded.abs().amax(dim=2)
    ninv = torch.where(nabs > 0, 1.0 / nabs, torch.zeros_like(nabs))
    normed = (padded * ninv[..., None]).reshape(e, -1)[:, :nb]
    dmap = _dynamic_map_signed().to(dev)
    dmids = (dmap[:-1] + dmap[1:]) / 2.0
    acodes = torch.bucketize(normed.contiguous(), dmids).to(torch.uint8).contiguous()
    return Nf4Experts(packed, acodes, nabs.contiguous(), noff.contiguous(), bias, (e, n, k), True)


@dataclass
class MoeLayerWeights:
    """One GPT-OSS MoE layer on a device: fused NF4 gate_up ``[E, 2I, H]`` and down
    ``[E, H, I]`` experts, the nested code map and (optionally) the router.

    Attributes:
        gate_up: interleaved gate/up experts (row 2j = gate j, row 2j+1 = up j).
        down: down experts.
        nested_map: float32 ``[256]``, bitsandbytes' signed dynamic map.
        router_weight: ``[E, H]`` in the activation dtype, or None.
        router_bias: float32 ``[E]``, or None.
        top_k: experts per token (4 for GPT-OSS).
    """

    gate_up: Nf4Experts
    down: Nf4Experts
    nested_map: torch.Tensor
    router_weight: torch.Tensor | None = None
    router_bias: torch.Tensor | None = None
    top_k: int = 4

    @classmethod
    def from_fused(
        cls,
        gate_up: Any,
        down: Any,
        router_weight: Any | None = None,
        router_bias: Any | None = None,
        device: torch.device | str = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        top_k: int = 4,
        weights_order: str = "chunks",
    ) -> MoeLayerWeights:
        """Builds the device container from two checkpoint ``FusedExperts`` (+ router).

        ``weights_order="chunks"`` (default) reorders the packed bytes for the kernels'
        faster reads (:meth:`chunk_major`; same results), ``"rows"`` keeps bitsandbytes' order.
        """
        _check_weights_order("weights_order", weights_order)
        nmap = _dynamic_map_signed()
        gu = Nf4Experts.from_fused(gate_up, device, nmap)
        dn = Nf4Experts.from_fused(down, device, nmap)
        rw = None if router_weight is None else torch.as_tensor(router_weight).to(device, dtype)
        rb = None
        if router_bias is not None:
            rb = torch.as_tensor(router_bias).to(device=device, dtype=torch.float32)
        w = cls(gu, dn, nmap.to(device), rw, rb, top_k)
        w.check()
        # Not in place: on the checkpoint's own device the tensors may share its buffers.
        return w.chunk_major() if weights_order == "chunks" else w

    @property
    def experts(self) -> int:
        """Number of experts E."""
        return self.gate_up.shape[0]

    @property
    def hidden(self) -> int:
        """Hidden size H."""
        return self.gate_up.shape[2]

    @property
    def intermediate(self) -> int:
        """Expert intermediate size I."""
        return self.down.shape[2]

    def check(self) -> None:
        """Raises ValueError when gate_up and down do not describe one MoE layer."""
        e, n, k = self.gate_up.shape
        e2, n2, k2 = self.down.shape
        if e2 != e or n != 2 * k2 or n2 != k:
            raise ValueError(
                f"gate_up {self.gate_up.shape} and down {self.down.shape}: expected "
                "[E, 2I, H] and [E, H, I]"
            )
        for name, t in (("gate_up", self.gate_up), ("down", self.down)):
            _check_weights_order(f"{name}.order", t.order)
        if self.gate_up.order != self.down.order:
            raise ValueError(
                f"gate_up and down: expected one byte order, found {self.gate_up.order!r} and "
                f"{self.down.order!r}"
            )
        if self.gate_up.order == "chunks" and not self.gate_up.gate_up_pairs:
            raise ValueError("gate_up: a chunk-major gate_up tensor must pair its gate/up rows")
        if self.down.order == "chunks" and self.down.gate_up_pairs:
            raise ValueError("down: a chunk-major down tensor has no gate/up row pairs")

    @property
    def order(self) -> str:
        """Byte order of both experts' packed weights (``"rows"`` or ``"chunks"``)."""
        return self.gate_up.order

    def chunk_major(self, in_place: bool = False) -> MoeLayerWeights:
        """These weights with both experts' packed bytes in chunk-major order, which the
        kernels read faster (same values, the same output bit for bit).

        ``in_place=True`` reorders the existing buffers expert by expert (temporaries of one
        expert, for large models on small GPUs) and returns ``self``; otherwise the result
        holds new packed buffers and ``self`` is unchanged. Weights already chunk-major are
        returned as they are.
        """
        self.check()
        if self.order == "chunks":
            return self
        out = self if in_place else dataclasses.replace(self)
        for name, pairs in (("gate_up", True), ("down", False)):
            t: Nf4Experts = getattr(self, name)
            _, n, k = t.shape
            packed = t.packed if in_place else torch.empty_like(t.packed)
            _chunk_major_into(packed, t.packed, n, k, pairs)
            reordered = dataclasses.replace(t, packed=packed, order="chunks", gate_up_pairs=pairs)
            setattr(out, name, reordered)
        return out

    def workspace(self, tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        """A workspace for ``tokens`` tokens (allocate once per token count, e.g. per graph)."""
        nbytes = moe_workspace_bytes(
            tokens, self.hidden, self.intermediate, self.experts, self.top_k
        )
        return torch.empty(nbytes, dtype=torch.uint8, device=device or self.gate_up.packed.device)

    def layer_bytes(self) -> int:
        """Bytes of the NF4 expert weights (packed + statistics) of the whole layer."""
        total = 0
        for t in (self.gate_up, self.down):
            for a in (t.packed, t.absmax, t.nested_absmax, t.nested_offset):
                total += a.numel() * a.element_size()
        return total


# ---------------------------------------------------------------------------------------------
# The custom op
# ---------------------------------------------------------------------------------------------


def chunk_major_packed(packed: torch.Tensor, n: int, k: int, gate_up_pairs: bool) -> torch.Tensor:
    """Packed NF4 experts ``[E, N * K / 2]`` reordered for ``weights_order="chunks"``: the MoE
    kernels built with ``STR_CHUNK_MAJOR`` (kernels/common.cuh, family ``moe_chunks``).

    Per 16-row group (its bytes stay where they were), each 128-k chunk becomes 1 KB contiguous,
    ``[fragment row][64 B]``, and a final half chunk (``K / 64`` odd) 512 bytes,
    ``[fragment row][32 B]``. Fragment row ``f`` is memory row ``f`` of the group, or with
    ``gate_up_pairs`` (gate/up interleaved rows) memory row ``2 (f % 8) + f // 8``, as the
    kernels' ``str_mem_row``. Same bytes, same size; returns a new tensor. :func:`rows_packed`
    undoes it.
    """
    _check_reorder_args(packed, n, k)
    e, row = packed.shape[0], k // 2
    full, half = row // 64, row % 64
    rows = packed.view(e, n // 16, 16, row)[:, :, _fragment_rows(gate_up_pairs, packed.device), :]
    body = rows[..., : full * 64].reshape(e, n // 16, 16, full, 64).permute(0, 1, 3, 2, 4)
    parts = [body.reshape(e, n // 16, full * 1024)]
    if half:
        parts.append(rows[..., full * 64 :].reshape(e, n // 16, 16 * half))
    return torch.cat(parts, dim=-1).reshape(e, n * row).contiguous()


def rows_packed(packed: torch.Tensor, n: int, k: int, gate_up_pairs: bool) -> torch.Tensor:
    """The inverse of :func:`chunk_major_packed`: chunk-major experts ``[E, N * K / 2]`` back in
    bitsandbytes' row order (a new tensor)."""
    _check_reorder_args(packed, n, k)
    e, row = packed.shape[0], k // 2
    full, half = row // 64, row % 64
    groups = packed.view(e, n // 16, 16 * row)
    body = groups[..., : full * 1024].reshape(e, n // 16, full, 16, 64).permute(0, 1, 3, 2, 4)
    parts = [body.reshape(e, n // 16, 16, full * 64)]
    if half:
        parts.append(groups[..., full * 1024 :].reshape(e, n // 16, 16, half))
    frag = torch.cat(parts, dim=-1)  # [E, G, fragment row, bytes]
    inverse = torch.argsort(_fragment_rows(gate_up_pairs, packed.device))
    return frag[:, :, inverse, :].reshape(e, n * row).contiguous()


def chunk_major_(packed: torch.Tensor, n: int, k: int, gate_up_pairs: bool) -> torch.Tensor:
    """:func:`chunk_major_packed` in place, one expert at a time (temporaries of one expert's
    size, so that a 24 GiB GPU can reorder a loaded model). Returns ``packed``."""
    _chunk_major_into(packed, packed, n, k, gate_up_pairs)
    return packed


def _chunk_major_into(
    dst: torch.Tensor, src: torch.Tensor, n: int, k: int, gate_up_pairs: bool
) -> None:
    """``dst[e] = chunk_major_packed(src[e])`` expert by expert (``dst`` may be ``src``)."""
    _check_reorder_args(src, n, k)
    for e in range(src.shape[0]):
        dst[e].copy_(chunk_major_packed(src[e : e + 1], n, k, gate_up_pairs)[0])


def _fragment_rows(gate_up_pairs: bool, device: torch.device) -> torch.Tensor:
    """Memory row (within a 16-row group) of each fragment row, as the kernels' str_mem_row."""
    frag = torch.arange(16, device=device)
    return 2 * (frag % 8) + frag // 8 if gate_up_pairs else frag


def _check_reorder_args(packed: torch.Tensor, n: int, k: int) -> None:
    if n < 16 or k < 64 or n % 16 or k % 64:
        raise ValueError(
            f"chunk-major order needs N a positive multiple of 16 and K of 64, found {n}x{k}"
        )
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != n * k // 2:
        raise ValueError(
            f"packed: expected uint8 [E, {n * k // 2}], found {packed.dtype} {list(packed.shape)}"
        )
    if not packed.is_contiguous():
        raise ValueError("packed: expected a contiguous tensor")


def moe_workspace_bytes(
    tokens: int, hidden: int, intermediate: int, experts: int, top_k: int
) -> int:
    """Workspace bytes the MoE op needs for any token count up to ``tokens`` (any GPU, any
    regime)."""
    return int(_native().moe_workspace_bytes(tokens, hidden, intermediate, experts, top_k))


def moe_regime(tokens: int, top_k: int, experts: int, tuning: str) -> str:
    """The kernels the op picks for a token count: ``"decode"``, ``"stream"`` or
    ``"prefill_m{bm}s{stages}"``."""
    return str(_native().moe_regime(tokens, top_k, experts, tuning))


def _need(cond: bool, exc: type[Exception], msg: str) -> None:
    if not cond:
        raise exc(msg)


def _check_dtype(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, found {type(t).__name__}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {want}, found {t.dtype}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, found {list(t.shape)}")


def _check_args(
    x: torch.Tensor,
    workspace: torch.Tensor,
    gu: tuple[torch.Tensor, ...],
    dn: tuple[torch.Tensor, ...],
    nested_map: torch.Tensor,
    router_weight: torch.Tensor | None,
    router_bias: torch.Tensor | None,
    router_logits: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    topk_weights: torch.Tensor | None,
    top_k: int,
) -> tuple[int, int, int, int, int]:
    """Validates every tensor (dtype -> TypeError; shape, layout, device -> ValueError).

    Returns ``(T, H, I, E, route_mode)``.
    """
    _check_dtype("x", x, _ACT_DTYPES)
    _need(x.dim() == 2, ValueError, f"x: expected [T, H], found shape {list(x.shape)}")
    t, h = (int(v) for v in x.shape)
    _check_dtype("workspace", workspace, (torch.uint8,))
    names = ("packed", "absmax", "nested_absmax", "nested_offset", "bias")
    gu_b = gu[4]
    for prefix, parts in (("gate_up", gu), ("down", dn)):
        _check_dtype(f"{prefix}.packed", parts[0], (torch.uint8,))
        _check_dtype(f"{prefix}.absmax", parts[1], (torch.uint8, torch.float32))
        for nm, part in zip(names[2:], parts[2:], strict=True):
            _check_dtype(f"{prefix}.{nm}", part, (torch.float32,))
    _check_dtype("nested_map", nested_map, (torch.float32,))
    _need(gu_b.dim() == 2, ValueError, f"gate_up.bias: expected [E, 2I], found {list(gu_b.shape)}")
    e, two_i = (int(v) for v in gu_b.shape)
    _need(two_i % 2 == 0, ValueError, f"gate_up.bias: expected an even row count, found {two_i}")
    i = two_i // 2
    _need(h % 64 == 0 and h > 0, ValueError, f"x: hidden size must be a multiple of 64, found {h}")
    _need(
        i % 64 == 0 and i > 0, ValueError, f"intermediate size must be a multiple of 64, found {i}"
    )
    _need(1 <= e <= 256, ValueError, f"experts: expected 1..256, found {e}")
    _need(
        isinstance(top_k, int) and 1 <= top_k <= min(_MAX_TOP_K, e),
        ValueError,
        f"top_k: expected 1..{min(_MAX_TOP_K, e)}, found {top_k}",
    )
    for prefix, parts, n, k in (("gate_up", gu, 2 * i, h), ("down", dn, h, i)):
        nb = n * k // 64
        _check_shape(f"{prefix}.packed", parts[0], (e, n * k // 2))
        _check_shape(f"{prefix}.absmax", parts[1], (e, nb))
        _check_shape(f"{prefix}.bias", parts[4], (e, n))
        if parts[1].dtype == torch.uint8:
            _check_shape(f"{prefix}.nested_absmax", parts[2], (e, (nb + 255) // 256))
            _check_shape(f"{prefix}.nested_offset", parts[3], (e,))
    _check_shape("nested_map", nested_map, (256,))
    if topk_ids is not None or topk_weights is not None:
        _need(
            topk_ids is not None and topk_weights is not None,
            ValueError,
            "topk_ids and topk_weights: pass both or neither",
        )
        assert topk_ids is not None and topk_weights is not None
        _check_dtype("topk_ids", topk_ids, (torch.int32,))
        _check_dtype("topk_weights", topk_weights, (torch.float32,))
        _check_shape("topk_ids", topk_ids, (t, top_k))
        _check_shape("topk_weights", topk_weights, (t, top_k))
        mode = _ROUTE_GIVEN
    elif router_logits is not None:
        _check_dtype("router_logits", router_logits, (torch.float32, x.dtype))
        _check_shape("router_logits", router_logits, (t, e))
        mode = _ROUTE_LOGITS
    elif router_weight is not None:
        _check_dtype("router_weight", router_weight, (x.dtype,))
        _check_shape("router_weight", router_weight, (e, h))
        if router_bias is not None:
            _check_dtype("router_bias", router_bias, (torch.float32,))
            _check_shape("router_bias", router_bias, (e,))
        mode = _ROUTE_WEIGHTS
    else:
        raise ValueError("routing: pass router_weight, router_logits or topk_ids + topk_weights")
    need_ws = moe_workspace_bytes(t, h, i, e, top_k)
    _need(workspace.dim() == 1, ValueError, "workspace: expected a 1-D uint8 tensor")
    _need(
        workspace.numel() >= need_ws,
        ValueError,
        f"workspace: expected at least {need_ws} bytes for {t} tokens, found {workspace.numel()}",
    )
    tensors: list[tuple[str, torch.Tensor | None]] = [
        ("x", x),
        ("workspace", workspace),
        ("nested_map", nested_map),
        ("router_weight", router_weight if mode == _ROUTE_WEIGHTS else None),
        ("router_bias", router_bias if mode == _ROUTE_WEIGHTS else None),
        ("router_logits", router_logits if mode == _ROUTE_LOGITS else None),
        ("topk_ids", topk_ids if mode == _ROUTE_GIVEN else None),
        ("topk_weights", topk_weights if mode == _ROUTE_GIVEN else None),
    ]
    for prefix, parts in (("gate_up", gu), ("down", dn)):
        tensors += [(f"{prefix}.{nm}", part) for nm, part in zip(names, parts, strict=True)]
    for name, tt in tensors:
        if tt is None:
            continue
        _need(tt.is_cuda, ValueError, f"{name}: expected a CUDA tensor, found device {tt.device}")
        _need(
            tt.device == x.device,
            ValueError,
            f"{name}: expected device {x.device} (that of x), found {tt.device}",
        )
        if name != "x":
            _need(tt.is_contiguous(), ValueError, f"{name}: expected a contiguous tensor")
    _need(
        x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0,
        ValueError,
        f"x: expected unit column stride, a row stride multiple of 8 and 16-byte alignment, "
        f"found strides {x.stride()}",
    )
    return t, h, i, e, mode


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else int(t.data_ptr())


def _launch(
    x: torch.Tensor,
    y: torch.Tensor,
    workspace: torch.Tensor,
    gu: tuple[torch.Tensor, ...],
    dn: tuple[torch.Tensor, ...],
    nested_map: torch.Tensor,
    router_weight: torch.Tensor | None,
    router_bias: torch.Tensor | None,
    router_logits: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    topk_weights: torch.Tensor | None,
    top_k: int,
    tuning: str,
    weights_order: str,
) -> str:
    _check_weights_order("weights_order", weights_order)
    t, h, i, e, mode = _check_args(
        x, workspace, gu, dn, nested_map, router_weight, router_bias, router_logits, topk_ids,
        topk_weights, top_k,
    )
    if t == 0:
        return "empty"
    _ensure_cuda_libs()
    args: dict[str, Any] = {
        "device": x.device.index if x.device.index is not None else torch.cuda.current_device(),
        "stream": torch.cuda.current_stream(x.device).cuda_stream,
        "dtype": "bfloat16" if x.dtype == torch.bfloat16 else "float16",
        "tokens": t,
        "hidden": h,
        "intermediate": i,
        "experts": e,
        "top_k": top_k,
        "x": _ptr(x),
        "x_stride": x.stride(0),
        "y": _ptr(y),
        "route_mode": mode,
        "router_weight": _ptr(router_weight) if mode == _ROUTE_WEIGHTS else 0,
        "router_bias": _ptr(router_bias) if mode == _ROUTE_WEIGHTS else 0,
        "router_logits": _ptr(router_logits) if mode == _ROUTE_LOGITS else 0,
        "logits_f32": bool(router_logits is not None and router_logits.dtype == torch.float32),
        "topk_ids": _ptr(topk_ids) if mode == _ROUTE_GIVEN else 0,
        "topk_weights": _ptr(topk_weights) if mode == _ROUTE_GIVEN else 0,
        "nested_map": _ptr(nested_map),
        "workspace": _ptr(workspace),
        "workspace_bytes": workspace.numel(),
        "tuning": tuning,
        "weights_order": weights_order,
    }
    for prefix, parts, n, k in (("gu", gu, 2 * i, h), ("dn", dn, h, i)):
        nested = parts[1].dtype == torch.uint8
        args[f"{prefix}_packed"] = _ptr(parts[0])
        args[f"{prefix}_absmax"] = _ptr(parts[1])
        args[f"{prefix}_nested_absmax"] = _ptr(parts[2]) if nested else 0
        args[f"{prefix}_nested_offset"] = _ptr(parts[3]) if nested else 0
        args[f"{prefix}_bias"] = _ptr(parts[4])
        args[f"{prefix}_nested"] = nested
        args[f"{prefix}_nnb"] = (n * k // 64 + 255) // 256 if nested else 0
    with torch.cuda.device(x.device):
        return str(_native().moe_forward(args))


@torch.library.custom_op("gptoss_3090::moe_forward", mutates_args=("workspace",))
def moe_forward(
    x: torch.Tensor,
    workspace: torch.Tensor,
    gu_packed: torch.Tensor,
    gu_absmax: torch.Tensor,
    gu_nested_absmax: torch.Tensor,
    gu_nested_offset: torch.Tensor,
    gu_bias: torch.Tensor,
    dn_packed: torch.Tensor,
    dn_absmax: torch.Tensor,
    dn_nested_absmax: torch.Tensor,
    dn_nested_offset: torch.Tensor,
    dn_bias: torch.Tensor,
    nested_map: torch.Tensor,
    router_weight: torch.Tensor | None,
    router_bias: torch.Tensor | None,
    router_logits: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    topk_weights: torch.Tensor | None,
    top_k: int,
    tuning: str = "auto",
    weights_order: str = "rows",
) -> torch.Tensor:
    """``torch.ops.gptoss_3090.moe_forward``: the whole MoE block, returns ``y [T, H]``.

    Routing: ``topk_ids`` (int32 ``[T, k]``) + ``topk_weights`` (f32) if given, else
    ``router_logits`` (``[T, E]`` f32 or x's dtype), else ``router_weight`` (``[E, H]``, x's
    dtype) + optional ``router_bias`` (f32 ``[E]``). ``workspace``: uint8, at least
    :func:`moe_workspace_bytes` bytes. ``tuning``: ``"auto"`` or ``"sm80"``/``"sm86"``/``"sm90"``.
    ``weights_order``: byte order of both packed tensors, ``"rows"`` (bitsandbytes) or
    ``"chunks"`` (:func:`chunk_major_packed`, gate_up with ``gate_up_pairs``).
    """
    y = torch.empty(x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    _launch(
        x, y, workspace,
        (gu_packed, gu_absmax, gu_nested_absmax, gu_nested_offset, gu_bias),
        (dn_packed, dn_absmax, dn_nested_absmax, dn_nested_offset, dn_bias),
        nested_map, router_weight, router_bias, router_logits, topk_ids, topk_weights, top_k,
        tuning, weights_order,
    )
    return y


@moe_forward.register_fake
def _moe_forward_fake(
    x: torch.Tensor,
    workspace: torch.Tensor,
    gu_packed: torch.Tensor,
    gu_absmax: torch.Tensor,
    gu_nested_absmax: torch.Tensor,
    gu_nested_offset: torch.Tensor,
    gu_bias: torch.Tensor,
    dn_packed: torch.Tensor,
    dn_absmax: torch.Tensor,
    dn_nested_absmax: torch.Tensor,
    dn_nested_offset: torch.Tensor,
    dn_bias: torch.Tensor,
    nested_map: torch.Tensor,
    router_weight: torch.Tensor | None,
    router_bias: torch.Tensor | None,
    router_logits: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    topk_weights: torch.Tensor | None,
    top_k: int,
    tuning: str = "auto",
    weights_order: str = "rows",
) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1])


def moe(
    x: torch.Tensor,
    weights: MoeLayerWeights,
    *,
    router_logits: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    tuning: str = "auto",
) -> torch.Tensor:
    """The GPT-OSS MoE block on ``x [T, H]`` (bf16/fp16 CUDA tensor); returns ``y [T, H]``.

    Routing comes from ``topk_ids``/``topk_weights`` if given, else ``router_logits``, else the
    router stored in ``weights``. ``topk_ids`` may be int64 (converted to int32). Without a
    ``workspace`` one is allocated for this call; pass one (``weights.workspace(T)``) to capture
    the call in a CUDA graph.
    """
    if topk_ids is not None and topk_ids.dtype == torch.int64:
        topk_ids = topk_ids.to(torch.int32)
    if workspace is None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError("x: expected a [T, H] tensor")
        workspace = weights.workspace(int(x.shape[0]), x.device)
    gu, dn = weights.gate_up, weights.down
    if gu.order != dn.order:
        raise ValueError(
            f"weights: gate_up is in {gu.order!r} order and down in {dn.order!r}; expected one"
        )
    return torch.ops.gptoss_3090.moe_forward(
        x, workspace,
        gu.packed, gu.absmax, gu.nested_absmax, gu.nested_offset, gu.bias,
        dn.packed, dn.absmax, dn.nested_absmax, dn.nested_offset, dn.bias,
        weights.nested_map,
        weights.router_weight, weights.router_bias, router_logits, topk_ids, topk_weights,
        weights.top_k, tuning, weights.order,
    )


def _check_router_args(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    for name, t in (("x", x), ("weight", weight)):
        _need(isinstance(t, torch.Tensor), TypeError, f"router: {name} must be a tensor")
    _need(x.dim() == 2, ValueError, f"router: x must be [T, H], found shape {tuple(x.shape)}")
    _need(
        weight.dim() == 2, ValueError,
        f"router: weight must be [E, H], found shape {tuple(weight.shape)}",
    )
    _check_dtype("router x", x, (torch.bfloat16, torch.float16))
    _need(
        weight.dtype == x.dtype, TypeError,
        f"router: weight dtype {weight.dtype} differs from x's {x.dtype}",
    )
    e, h = weight.shape
    _need(
        x.shape[1] == h, ValueError,
        f"router: x has {x.shape[1]} features and the weight {h} (shapes {tuple(x.shape)} and "
        f"{tuple(weight.shape)})",
    )
    _need(1 <= e <= 256, ValueError, f"router: expected 1 to 256 experts, found {e}")
    tensors = [("weight", weight)]
    if bias is not None:
        _need(isinstance(bias, torch.Tensor), TypeError, "router: bias must be a tensor or None")
        _need(
            bias.shape == (e,), ValueError,
            f"router: bias must be [{e}], found shape {tuple(bias.shape)}",
        )
        _need(
            bias.dtype in (x.dtype, torch.float32), TypeError,
            f"router: bias dtype {bias.dtype}: expected {x.dtype} or float32",
        )
        _need(bias.is_contiguous(), ValueError, "router: bias must be contiguous")
        tensors.append(("bias", bias))
    # The device last, so that each structural error is raised the same way without a GPU.
    _need(x.is_cuda, ValueError, f"router: x must be a CUDA tensor, found {x.device}")
    for name, t in tensors:
        _need(
            t.device == x.device, ValueError,
            f"router: {name} is on {t.device} and x on {x.device}",
        )


#: Most tokens the router kernel takes; above, :func:`router_logits` runs ``F.linear``
#: (cuBLAS), which a GEMM of that size suits.
ROUTER_KERNEL_MAX_TOKENS = 64


def _router_kernel_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The kernel's layout: a hidden size (at most 4096) and an x row stride that are multiples
    of 8 elements, x rows contiguous, x and the weight 16-byte aligned, the weight contiguous."""
    return (
        x.shape[0] <= ROUTER_KERNEL_MAX_TOKENS
        and x.shape[1] % 8 == 0
        and x.shape[1] <= 4096
        and x.stride(1) == 1
        and x.stride(0) % 8 == 0
        and x.data_ptr() % 16 == 0
        and weight.is_contiguous()
        and weight.data_ptr() % 16 == 0
    )


@torch.library.custom_op("gptoss_3090::moe_router", mutates_args=())
def moe_router(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``torch.ops.gptoss_3090.moe_router``: ``logits [T, E] = x weight^T + bias`` in x's
    dtype, fp32 sums (see :func:`router_logits`)."""
    _check_router_args(x, weight, bias)
    t, e = int(x.shape[0]), int(weight.shape[0])
    if not _router_kernel_fits(x, weight):
        b = bias.to(x.dtype) if bias is not None else None
        return torch.nn.functional.linear(x, weight, b)
    logits = torch.empty(t, e, dtype=x.dtype, device=x.device)
    if t > 0:
        _launch_router(x, weight, bias, logits)
    return logits


def _launch_router(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    logits: torch.Tensor,
    top_k: int = 0,
    ids: torch.Tensor | None = None,
    wts: torch.Tensor | None = None,
) -> bool:
    """The native router launch on x's current stream (arguments checked by the caller; T > 0):
    logits in x's dtype, and with ``top_k`` its routing into ids/wts. True where the top-k ran
    in the router's own launch."""
    _ensure_cuda_libs()
    with torch.cuda.device(x.device):
        return bool(
            _native().moe_router_logits(
                x.device.index if x.device.index is not None else torch.cuda.current_device(),
                torch.cuda.current_stream(x.device).cuda_stream,
                "bfloat16" if x.dtype == torch.bfloat16 else "float16",
                int(x.shape[0]), int(x.shape[1]), int(weight.shape[0]), _ptr(x), x.stride(0),
                _ptr(weight), _ptr(bias), bias is not None and bias.dtype != torch.float32,
                _ptr(logits), False, top_k, _ptr(ids), _ptr(wts),
            )
        )


@moe_router.register_fake
def _moe_router_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def router_logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The GPT-OSS router's logits ``x weight^T + bias`` (``[T, E]``, x's dtype) in one kernel.

    ``x [T, H]`` bf16/fp16 on a CUDA device, ``weight [E, H]`` in x's dtype, ``bias [E]`` in x's
    dtype or float32. Sums in fp32, rounded once, as ``torch.nn.functional.linear`` does. The
    kernel is built for decode-sized T (each block reads an expert's router row once per 4
    tokens, with all its loads in flight). Above :data:`ROUTER_KERNEL_MAX_TOKENS` tokens, or
    for a layout the kernel does not read (``_router_kernel_fits``), it runs ``F.linear``
    instead (a float32 bias is then rounded to x's dtype first). The vLLM plugin runs GPT-OSS's
    router layer through it.
    """
    return torch.ops.gptoss_3090.moe_router(x, weight, bias)


def router_topk_width(experts: int, top_k: int) -> int:
    """Columns of :func:`router_topk`'s packed int32 result: ``2 top_k + ceil(E / 2)``."""
    return 2 * top_k + (experts + 1) // 2


@torch.library.custom_op("gptoss_3090::moe_router_topk", mutates_args=())
def moe_router_topk(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int
) -> torch.Tensor:
    """``torch.ops.gptoss_3090.moe_router_topk``: the router's logits and their top-k in one
    packed int32 tensor (see :func:`router_topk`)."""
    _check_router_args(x, weight, bias)
    t, e = int(x.shape[0]), int(weight.shape[0])
    _need(
        1 <= top_k <= min(_MAX_TOP_K, e), ValueError,
        f"router top-k: top_k must be in 1..{min(_MAX_TOP_K, e)} (at most {_MAX_TOP_K} and the "
        f"{e} experts), found {top_k}",
    )
    packed = torch.empty(t, router_topk_width(e, top_k), dtype=torch.int32, device=x.device)
    ids, wts, logits = router_topk_unpack(packed, e, top_k, x.dtype)
    if t == 0:
        return packed
    if not _router_kernel_fits(x, weight):
        # Prefill sizes or a layout the kernel does not read: F.linear, then the selection in
        # torch (ties may differ from the kernels' lower-expert rule).
        logits.copy_(torch.ops.gptoss_3090.moe_router(x, weight, bias))
        values, top = torch.topk(logits.float(), top_k, dim=-1)
        ids.copy_(top)
        wts.copy_(torch.softmax(values, dim=-1))
        return packed
    _launch_router(x, weight, bias, logits, top_k, ids, wts)
    return packed


@moe_router_topk.register_fake
def _moe_router_topk_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int
) -> torch.Tensor:
    return x.new_empty(
        x.shape[0], router_topk_width(weight.shape[0], top_k), dtype=torch.int32
    )


def router_topk(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int
) -> torch.Tensor:
    """The router's logits and their top-k routing in one launch, packed into one tensor.

    Returns int32 ``[T, 2 top_k + ceil(E / 2)]`` whose storage holds, one block after the other,
    the top-k ids (int32 ``[T, top_k]``), their weights (float32 ``[T, top_k]``: the softmax
    over the selected logits) and the logits (x's dtype, ``[T, E]``); read them with
    :func:`router_topk_unpack`. The rows of the result are *not* per-token rows: slice the
    unpacked views, not the packed tensor. Selection: the top ``top_k`` logits, ties to the
    lower expert index, NaN as -inf (the MoE op's own routing, over the logits as stored). Up
    to :data:`ROUTER_KERNEL_MAX_TOKENS` tokens the kernels compute both: on sm_90 with at most
    32 experts in one launch of thread-block clusters (``GPTOSS_3090_ROUTER_TOPK_CLUSTER=off``
    turns that off), which saves the separate top-k launch of a decode step; elsewhere the
    logits launch and then a routing launch, with the same bits. Above, ``F.linear`` and
    ``torch.topk``.
    """
    return torch.ops.gptoss_3090.moe_router_topk(x, weight, bias, top_k)


def router_topk_unpack(
    packed: torch.Tensor, experts: int, top_k: int, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of :func:`router_topk`'s result: ``(ids int32 [T, k], weights float32 [T, k],
    logits dtype [T, E])``, each contiguous."""
    _need(
        packed.dtype == torch.int32 and packed.dim() == 2
        and packed.shape[1] == router_topk_width(experts, top_k) and packed.is_contiguous(),
        ValueError,
        f"router top-k: expected a contiguous int32 [T, {router_topk_width(experts, top_k)}] "
        f"tensor for {experts} experts and top_k {top_k}, found {packed.dtype} "
        f"{list(packed.shape)}",
    )
    t = packed.shape[0]
    flat = packed.view(-1)
    ids = flat[: t * top_k].view(t, top_k)
    wts = flat[t * top_k : 2 * t * top_k].view(torch.float32).view(t, top_k)
    logits = flat[2 * t * top_k :].view(dtype)[: t * experts].view(t, experts)
    return ids, wts, logits


def workspace_routing(
    workspace: torch.Tensor, tokens: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing the last :func:`moe` call with this workspace computed (router modes only):
    ``(ids int32 [T, k], weights f32 [T, k])``, views into the workspace (its first two buffers,
    see ``WorkspaceLayout`` in src/ops/moe.rs). Meant for tests and debugging.
    """
    n = tokens * top_k
    wts_at = (n * 4 + 255) // 256 * 256
    ids = workspace[: n * 4].view(torch.int32).view(tokens, top_k)
    wts = workspace[wts_at : wts_at + n * 4].view(torch.float32).view(tokens, top_k)
    return ids, wts


# ---------------------------------------------------------------------------------------------
# fp32 reference (any device) on the exactly dequantized weights
# ---------------------------------------------------------------------------------------------


def reference_forward(
    x: torch.Tensor,
    weights: MoeLayerWeights,
    *,
    router_logits: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    swiglu_limit: float = 7.0,
    alpha: float = 1.702,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 torch reference of :func:`moe` on ``x``'s device. Returns ``(y, ids, weights)``.

    Routing as in :func:`moe` (router in fp32 from ``weights.router_weight`` by default, top-k,
    softmax over the selected logits). Expert weights are the exact fp32 dequantization.
    """
    xf = x.float()
    if topk_ids is None:
        if router_logits is None:
            if weights.router_weight is None:
                raise ValueError("routing: no router_weight, router_logits or topk_ids")
            router_logits = xf @ weights.router_weight.float().T
            if weights.router_bias is not None:
                router_logits = router_logits + weights.router_bias.float()
        vals, topk_ids = torch.topk(router_logits.float(), weights.top_k, dim=-1)
        topk_weights = torch.softmax(vals, dim=-1)
    assert topk_weights is not None
    y = torch.zeros_like(xf)
    ids = topk_ids.long()
    for e in torch.unique(ids).tolist():
        if e < 0 or e >= weights.experts:
            continue
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        a = xf[tok] @ weights.gate_up.dequantize(e).T + weights.gate_up.bias[e]
        gate = a[:, 0::2].clamp(max=swiglu_limit)
        up = a[:, 1::2].clamp(min=-swiglu_limit, max=swiglu_limit)
        hh = (up + 1.0) * (gate * torch.sigmoid(alpha * gate))
        out = hh @ weights.down.dequantize(e).T + weights.down.bias[e]
        y.index_add_(0, tok, out * topk_weights[tok, slot, None].float())
    return y, topk_ids, topk_weights
