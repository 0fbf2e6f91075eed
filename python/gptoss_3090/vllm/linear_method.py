"""NF4 linear method for GPT-OSS's attention projections (``qkv_proj``, ``o_proj``).

``vllm/model_executor/layers/linear.py`` (0.26): ``ColumnParallelLinear`` / ``QKVParallelLinear``
/ ``RowParallelLinear`` call ``quant_method.create_weights(layer, input_size_per_partition,
output_partition_sizes, input_size, output_size, params_dtype, weight_loader=...)`` from their
``__init__`` (``output_partition_sizes`` = ``[q, k, v]`` rows for ``qkv_proj``) and then create the
bf16 ``bias`` themselves; ``forward`` calls ``quant_method.apply(layer, x, bias)``. ``apply`` is
traced by Dynamo with ``fullgraph=True`` (``GptOssModel`` is ``@support_torch_compile``), so it
only calls PyTorch custom ops (``torch.ops.gptoss_3090.*``, which have fake implementations) or
plain torch ops.

Storage: one :class:`~gptoss_3090.vllm.weights.Nf4Layout` per layer, one segment per logical
weight (q, k, v back to back; o alone), in the parameters ``qweight`` (packed uint8, first element
in the high nibble as bitsandbytes packs it), ``absmax`` (uint8 codes when nested, else float32),
``nested_absmax``, ``nested_offset`` (one per segment) and ``nested_quant_map``. The checkpoint's
bytes are copied as they are, so nothing is repacked.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import vllm.envs as envs
from torch.nn import Parameter
from vllm.model_executor.layers.linear import LinearMethodBase, UnquantizedLinearMethod

import gptoss_3090.moe  # noqa: F401  (registers torch.ops.gptoss_3090.moe_router)
from gptoss_3090.vllm.weights import Nf4Layout, dequantize_nf4_cpu

logger = logging.getLogger("vllm.gptoss_3090")
_warned: set[str] = set()


def warn_once(msg: str, *args: Any) -> None:
    """Logs ``msg`` once per process (per-layer fallbacks would repeat it for every layer)."""
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg, *args)


__all__ = [
    "Nf4LinearMethod",
    "RouterLinearMethod",
    "nf4_linear_reference",
    "use_reference_kernels",
    "warn_once",
]


def use_reference_kernels() -> bool:
    """True when ``GPTOSS_3090_REFERENCE_KERNELS=1``: run the pure-torch reference paths instead
    of our CUDA kernels (slow; for checking the glue on small models)."""
    return os.environ.get("GPTOSS_3090_REFERENCE_KERNELS", "0") not in ("", "0", "false")


def _segment_tensors(layer: torch.nn.Module, seg: int) -> dict[str, Any]:
    layout: Nf4Layout = layer.nf4_layout
    r = layout.ranges(seg)
    out: dict[str, Any] = {
        "packed": layer.qweight.narrow(0, *r["qweight"]),
        "absmax": layer.absmax.narrow(0, *r["absmax"]),
        "nested_absmax": None,
        "nested_quant_map": None,
        "nested_offset": 0.0,
        "shape": (layout.rows[seg], layout.cols),
    }
    if layout.nested:
        out["nested_absmax"] = layer.nested_absmax.narrow(0, *r["nested_absmax"])
        out["nested_quant_map"] = layer.nested_quant_map
        out["nested_offset"] = layer.nested_offset.narrow(0, seg, 1)
    return out


def nf4_linear_reference(
    x: torch.Tensor, layer: torch.nn.Module, bias: torch.Tensor | None
) -> torch.Tensor:
    """Dequantize-then-matmul in torch (exact dequantization, model dtype matmul).

    Traceable (no data-dependent shapes); used as the reference and as the fallback when our
    kernels are not available.
    """
    layout: Nf4Layout = layer.nf4_layout
    weights = []
    for seg in range(len(layout.rows)):
        t = _segment_tensors(layer, seg)
        offset = t["nested_offset"]
        weights.append(
            dequantize_nf4_cpu(
                t["packed"],
                t["absmax"],
                t["shape"],
                x.dtype,
                t["nested_absmax"],
                t["nested_quant_map"],
                offset if isinstance(offset, float) else offset.reshape(()),
            )
        )
    w = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)
    return torch.nn.functional.linear(x, w, bias)


class Nf4LinearMethod(LinearMethodBase):
    """``LinearMethodBase`` for NF4 q/k/v/o (pre-quantized or quantized at load)."""

    def __init__(self, quant_config: Any) -> None:
        self.quant_config = quant_config

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        """Allocates the NF4 buffers of ``layer`` (one segment per output partition)."""
        if input_size_per_partition != input_size or sum(output_partition_sizes) != output_size:
            raise NotImplementedError(
                "bnb_moe supports tensor_parallel_size=1 only (found a sharded linear layer: "
                f"input {input_size_per_partition}/{input_size}, "
                f"output {sum(output_partition_sizes)}/{output_size})"
            )
        # vLLM passes its own v1 loader (linear.py::QKVParallelLinear.weight_loader); our
        # buffers have their own, and set_weight_attrs refuses to overwrite attributes.
        extra_weight_attrs.pop("weight_loader", None)
        nested = bool(self.quant_config.nested) if self.quant_config.prequantized else True
        layout = Nf4Layout(tuple(output_partition_sizes), input_size_per_partition, nested)
        layer.nf4_layout = layout
        layer.nf4_params_dtype = params_dtype
        for name, (shape, dtype) in layout.param_shapes().items():
            param = Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            param.nf4_component = name  # type: ignore[attr-defined]
            param.weight_loader = _make_weight_loader(layer, name)  # type: ignore[attr-defined]
            for k, v in extra_weight_attrs.items():
                setattr(param, k, v)
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Builds the kernel-side weight descriptors (views of our buffers, no copies)."""
        layer.nf4_kernel_weight = None
        if use_reference_kernels() or not layer.qweight.is_cuda:
            return
        try:
            layer.nf4_kernel_weight = _make_kernel_weight(layer)
        except ImportError as e:
            warn_once(
                "gptoss-3090: NF4 linear kernels unavailable (%s); %s and the other NF4 "
                "linear layers use the slow torch reference path",
                e,
                getattr(layer, "prefix", "a layer"),
            )

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        kw = getattr(layer, "nf4_kernel_weight", None)
        if kw is None:
            return nf4_linear_reference(x, layer, bias)
        return _run_kernel(x, kw, bias, layer)


# ----------------------------------------------------------------------------------------------
# Kernel adapters (gptoss_3090.ops, branch `cuda`). Everything that depends on its exact API is
# in these two functions.
# ----------------------------------------------------------------------------------------------


def _make_kernel_weight(layer: torch.nn.Module) -> Any:
    """``gptoss_3090.ops.Nf4Weight`` per segment viewing our buffers (no copies); fused q/k/v
    become one ``Nf4FusedWeight`` (the kernel takes up to three separately quantized parts)."""
    from gptoss_3090.ops import Nf4FusedWeight, Nf4Weight

    layout: Nf4Layout = layer.nf4_layout
    parts = []
    for seg in range(len(layout.rows)):
        t = _segment_tensors(layer, seg)
        offset = t["nested_offset"]
        parts.append(
            Nf4Weight(
                packed=t["packed"],
                absmax=t["absmax"],
                shape=t["shape"],
                dtype=layer.nf4_params_dtype,
                nested_absmax=t["nested_absmax"],
                nested_quant_map=t["nested_quant_map"],
                nested_offset=float(offset.item()) if isinstance(offset, torch.Tensor) else None,
            )
        )
    return parts[0] if len(parts) == 1 else Nf4FusedWeight(tuple(parts))


def _run_kernel(
    x: torch.Tensor, weight: Any, bias: torch.Tensor | None, layer: torch.nn.Module
) -> torch.Tensor:
    from gptoss_3090.ops import nf4_linear

    return nf4_linear(x, weight, bias)


# ----------------------------------------------------------------------------------------------
# weight_loader for the NF4 buffers (our model's load_weights fills slots directly; this one
# serves anything that follows vLLM's convention of calling param.weight_loader)
# ----------------------------------------------------------------------------------------------


def _make_weight_loader(layer: torch.nn.Module, component: str) -> Any:
    def weight_loader(
        param: Parameter, loaded_weight: torch.Tensor, loaded_shard_id: str | int | None = None
    ) -> None:
        layout: Nf4Layout = layer.nf4_layout
        flat = loaded_weight.reshape(-1)
        if component == "nested_quant_map" or loaded_shard_id is None:
            if flat.numel() != param.numel():
                raise ValueError(
                    f"{component}: expected {param.numel()} elements, found {flat.numel()}"
                )
            param.data.copy_(flat.view(param.shape))
            return
        seg = {"q": 0, "k": 1, "v": 2}.get(loaded_shard_id, loaded_shard_id)  # type: ignore[arg-type]
        if not isinstance(seg, int) or not 0 <= seg < len(layout.rows):
            raise ValueError(f"{component}: unknown shard {loaded_shard_id!r}")
        start, length = layout.ranges(seg)[component]
        if flat.numel() != length:
            raise ValueError(
                f"{component} shard {loaded_shard_id!r}: expected {length} elements, "
                f"found {flat.numel()}"
            )
        param.data.narrow(0, start, length).copy_(flat)

    return weight_loader


#: Where the plugin's MoE layers get their routing (read at load time): ``vllm`` (default)
#: runs vLLM's top-k (``fused_topk``) and then our MoE op with its result; ``router`` routes in
#: our router layer (``torch.ops.gptoss_3090.moe_router_topk``: on sm_90 in the router's own
#: launch) and hands the routing to our MoE op, so vLLM's top-k launch goes away;
#: ``internal`` hands the router logits to our MoE op, whose kernels route.
MOE_ROUTING_ENV = "GPTOSS_3090_MOE_ROUTING"


def moe_routing() -> str:
    """The routing mode from :data:`MOE_ROUTING_ENV` (ValueError when unknown). ``router``
    needs our router layer, so with ``GPTOSS_3090_ROUTER=vllm`` (or the reference kernels) it
    falls back to ``vllm``."""
    mode = os.environ.get(MOE_ROUTING_ENV, "vllm").strip() or "vllm"
    if mode not in ("router", "vllm", "internal"):
        raise ValueError(
            f"{MOE_ROUTING_ENV}={mode!r}: expected 'vllm' (default), 'router' or 'internal'"
        )
    if mode == "router" and not _our_router():
        return "vllm"
    return mode


def _our_router() -> bool:
    return not use_reference_kernels() and os.environ.get("GPTOSS_3090_ROUTER", "") != "vllm"


def router_method(top_k: int = 0) -> Any:
    """A :class:`RouterLinearMethod` for GPT-OSS's ``mlp.router``, or None when
    ``GPTOSS_3090_ROUTER=vllm`` keeps vLLM's (or the reference kernels are on). ``top_k`` > 0
    with the ``router`` routing (:func:`moe_routing`) makes it route too."""
    if not _our_router():
        return None
    return RouterLinearMethod(top_k if moe_routing() == "router" else 0)


class RouterLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear method, with ``apply`` through our router op.

    GPT-OSS's router (``MLPBlock.router``, a bf16 ``ReplicatedLinear`` built with
    ``quant_config=None``) runs cuBLAS in stock vLLM: for one decode token a 184 KB read behind a
    GEMM launch sized for far more work, about 6 us per layer on an H100.
    ``torch.ops.gptoss_3090.moe_router`` reads each expert's row once with every load in flight
    and falls back to ``F.linear`` itself above ``ROUTER_KERNEL_MAX_TOKENS`` tokens, so ``apply``
    has no data-dependent branch for Dynamo to trace. Weights, loading and the batch-invariant
    mode are vLLM's.

    With ``top_k`` > 0 it returns ``torch.ops.gptoss_3090.moe_router_topk``'s packed int32
    result instead of the logits (the same launch routes); our MoE method
    (``BnbMoeMethod.apply_monolithic``) unpacks it.
    """

    def __init__(self, top_k: int = 0) -> None:
        super().__init__()
        self.top_k = top_k

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if envs.VLLM_BATCH_INVARIANT or not x.is_cuda:
            return super().apply(layer, x, bias)
        if self.top_k:
            return torch.ops.gptoss_3090.moe_router_topk(x, layer.weight, bias, self.top_k)
        return torch.ops.gptoss_3090.moe_router(x, layer.weight, bias)
