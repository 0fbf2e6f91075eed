"""The ``bnb_moe`` fused-MoE method: GPT-OSS experts as fused NF4 buffers run by our MoE op.

vLLM 0.26 (``vllm/model_executor/layers/fused_moe/``):

* ``layer.py::FusedMoE`` is a factory; the expert parameters live in
  ``routed_experts.py::RoutedExperts``, whose ``__init__`` gets this method from
  ``quant_config.get_quant_method(layer, prefix)`` (asserting a ``FusedMoEMethodBase``), calls
  ``maybe_roundup_sizes`` and then ``create_weights(layer=..., num_experts=, hidden_size=,
  unpadded_hidden_size=, intermediate_size_per_partition=, params_dtype=, weight_loader=,
  global_num_experts=)``.
* ``runner/moe_runner.py::MoERunner._apply_quant_method`` runs inside the opaque custom op
  ``vllm::moe_forward`` (not traced by Dynamo, but captured in CUDA graphs: no host syncs, no
  data-dependent shapes here). Unless ``is_monolithic``, it first routes with
  ``router.select_experts`` (``fused_topk``: softmax over all logits, top-k, renormalize = the
  softmax of the k selected logits; fp32 weights ``[T, k]``, int32 ids ``[T, k]``) and then calls
  ``apply(layer=, x=, topk_weights=, topk_ids=, shared_experts=, shared_experts_input=)``, which
  must return the finished ``[T, H]`` in ``x.dtype``. ``_forward_impl`` also calls
  ``get_fused_moe_quant_config`` through ``RoutedExperts._ensure_moe_quant_config_init`` (a None
  answer is re-queried on every call, so we return a real config).

Buffers per projection ``p`` in (``w13`` = gate_up ``[2I, H]`` with gate/up rows interleaved as on
disk, ``w2`` = down ``[H, I]``), with E experts, in our fused layout (per-expert tensors back to
back, each expert's bytes exactly as bitsandbytes wrote them):

=======================  ===============  =========================================
``{p}_qweight``          uint8 [E, P]     packed codes, P = out*in/2
``{p}_absmax``           uint8 [E, NB]    absmax codes (float32 when not nested)
``{p}_nested_absmax``    f32 [E, NN]      per-expert nested absmax (nested only)
``{p}_nested_offset``    f32 [E, 1]       per-expert nested offset (nested only)
``{p}_nested_quant_map`` f32 [256]        the 8-bit dynamic map (nested only)
``{p}_bias``             f32 [E, out]     biases (interleaved like the rows for w13)
=======================  ===============  =========================================

After loading, ``process_weights_after_loading`` reorders each ``{p}_qweight`` in place into the
kernels' chunk-major byte order (``gptoss_3090.moe.chunk_major_packed``; the layer's
``gptoss_weights_order`` says so), unless ``GPTOSS_3090_MOE_WEIGHTS_ORDER=rows``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.config import (
    FusedMoEQuantConfig,
    biased_moe_quant_config,
)

from gptoss_3090.vllm.defaults import moe_chunk_tokens
from gptoss_3090.vllm.linear_method import moe_routing, use_reference_kernels, warn_once
from gptoss_3090.vllm.weights import Nf4Layout, dequantize_nf4_cpu

logger = logging.getLogger("vllm.gptoss_3090")


__all__ = ["BnbMoeMethod", "moe_reference", "SWIGLU_ALPHA", "SWIGLU_LIMIT"]

#: GPT-OSS SwiGLU constants (transformers GptOssExperts; vLLM SwigluOAIAndMul(alpha, limit)).
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0

PROJECTIONS = ("w13", "w2")


def expert_layouts(hidden: int, intermediate: int, nested: bool) -> dict[str, Nf4Layout]:
    """The per-expert NF4 layouts of gate_up (w13) and down (w2)."""
    return {
        "w13": Nf4Layout((2 * intermediate,), hidden, nested),
        "w2": Nf4Layout((hidden,), intermediate, nested),
    }


class BnbMoeMethod(FusedMoEMethodBase):
    """``FusedMoEMethodBase`` over fused NF4 expert buffers."""

    def __init__(self, quant_config: Any, moe: Any) -> None:
        super().__init__(moe)
        self.quant_config = quant_config
        self._kernel_weights: Any = None
        self._chunk = 0
        self._monolithic = False
        self._gpu_util = 0.9
        self._max_tokens = 0

    # -- sizes and weights -----------------------------------------------------------------

    def maybe_roundup_sizes(
        self,
        hidden_size: int,
        intermediate_size_per_partition: int,
        act_dtype: torch.dtype,
        moe_parallel_config: Any,
    ) -> tuple[int, int]:
        # Our kernels take GPT-OSS's 2880 as is: no padding (the base class would pad for some
        # all2all backends, which bnb_moe does not support anyway).
        return hidden_size, intermediate_size_per_partition

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        """Allocates the fused NF4 expert buffers and biases on ``layer`` (a RoutedExperts)."""
        parallel = getattr(self.moe, "moe_parallel_config", None)
        if parallel is not None and (parallel.tp_size > 1 or parallel.ep_size > 1):
            raise NotImplementedError(
                "bnb_moe supports tensor_parallel_size=1 without expert parallelism only "
                f"(found tp_size={parallel.tp_size}, ep_size={parallel.ep_size})"
            )
        if extra_weight_attrs.get("global_num_experts", num_experts) != num_experts:
            raise NotImplementedError("bnb_moe does not support redundant or remote experts")
        self._gpu_util, self._max_tokens = _current_budget_settings()
        extra_weight_attrs.pop("weight_loader", None)  # RoutedExperts.weight_loader: not ours
        nested = bool(self.quant_config.nested) if self.quant_config.prequantized else True
        layouts = expert_layouts(hidden_size, intermediate_size_per_partition, nested)
        layer.nf4_layouts = layouts
        layer.nf4_params_dtype = params_dtype
        for proj, layout in layouts.items():
            for comp, (shape, dtype) in layout.param_shapes().items():
                full = shape if comp == "nested_quant_map" else (num_experts, *shape)
                _register(layer, f"{proj}_{comp}", torch.empty(full, dtype=dtype), comp)
            # float32: what the MoE op reads (bf16 checkpoint biases convert exactly)
            rows = layout.rows[0]
            _register(
                layer, f"{proj}_bias", torch.empty(num_experts, rows, dtype=torch.float32), "bias"
            )

    def get_fused_moe_quant_config(self, layer: torch.nn.Module) -> FusedMoEQuantConfig | None:
        # Unquantized activations with biases: only consulted by vLLM's prepare/finalize
        # selection (none for single-GPU, no-EP runs); our op reads the buffers itself.
        return biased_moe_quant_config(layer.w13_bias, layer.w2_bias)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Builds the kernel's per-layer weight descriptor and the token chunk size."""
        # Monolithic: vLLM hands apply_monolithic the router layer's output, which is our
        # router's packed top-k (routing "router") or the logits (routing "internal"); both
        # work with the reference path too.
        routing = moe_routing()
        self._monolithic = routing != "vllm"
        if self._monolithic:
            # Session 30 (H200): on the 20b synthetic checkpoint both modes' greedy tokens part
            # from the default's within the first steps. The model flips tokens at the first
            # rounding change, so that alone does not prove a bug; until the teacher-forced
            # check (bench/gpu_e2e.sh correctness_knobs) has run, say so.
            warn_once(
                "%s=%s is experimental: its end-to-end outputs are not yet verified against the "
                "default routing (vllm)", "GPTOSS_3090_MOE_ROUTING", routing,
            )
        budget = None
        if layer.w13_qweight.is_cuda:
            total = torch.cuda.get_device_properties(layer.w13_qweight.device).total_memory
            budget = int(total * self._gpu_util)
        self._chunk = int(os.environ.get("GPTOSS_3090_MOE_CHUNK", moe_chunk_tokens(budget)))
        if self._max_tokens > 0:
            self._chunk = min(self._chunk, self._max_tokens)
        self._kernel_weights = None
        if use_reference_kernels() or not layer.w13_qweight.is_cuda:
            return
        try:
            self._kernel_weights = _make_kernel_weights(layer)
            _shared_workspace(self._kernel_weights, self._chunk)
        except ImportError as e:
            warn_once(
                "gptoss-3090: MoE kernels unavailable (%s); %s and the other MoE layers use "
                "the slow torch reference",
                e,
                getattr(layer, "layer_name", "a MoE layer"),
            )

    # -- execution -----------------------------------------------------------------------------

    @property
    def is_monolithic(self) -> bool:
        # True: apply_monolithic gets the router layer's output (GPTOSS_3090_MOE_ROUTING=router
        # or internal); False (default): vLLM's fused_topk routing, then apply().
        return self._monolithic

    @property
    def supports_eplb(self) -> bool:
        return False

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Any = None,
        shared_experts_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._chunked(layer, x, topk_weights, topk_ids, None)

    def apply_monolithic(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if router_logits.dtype == torch.int32:
            # Our router's packed routing (RouterLinearMethod with a top-k): ids and weights.
            from gptoss_3090.moe import router_topk_unpack

            ids, wts, _ = router_topk_unpack(
                router_logits, layer.global_num_experts, layer.top_k, x.dtype
            )
            return self._chunked(layer, x, wts, ids, None)
        return self._chunked(layer, x, None, None, router_logits)

    def _chunked(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor | None,
        topk_ids: torch.Tensor | None,
        router_logits: torch.Tensor | None,
    ) -> torch.Tensor:
        # The token count is fixed per CUDA graph, so this loop is static under capture.
        chunk = self._chunk if self._chunk > 0 else x.shape[0]
        if x.shape[0] <= chunk:
            return self._run(layer, x, topk_weights, topk_ids, router_logits)
        out = torch.empty_like(x)
        for s in range(0, x.shape[0], chunk):
            e = min(s + chunk, x.shape[0])
            out[s:e] = self._run(
                layer,
                x[s:e],
                None if topk_weights is None else topk_weights[s:e],
                None if topk_ids is None else topk_ids[s:e],
                None if router_logits is None else router_logits[s:e],
            )
        return out

    def _run(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor | None,
        topk_ids: torch.Tensor | None,
        router_logits: torch.Tensor | None,
    ) -> torch.Tensor:
        if self._kernel_weights is None:
            if topk_weights is None:
                assert router_logits is not None
                topk_weights, topk_ids = route_reference(router_logits, layer.top_k)
            assert topk_ids is not None
            return moe_reference(x, layer, topk_weights, topk_ids)
        return _run_kernel(x, self._kernel_weights, layer, topk_weights, topk_ids, router_logits)


def _current_budget_settings() -> tuple[float, int]:
    """``gpu_memory_utilization`` and ``max_num_batched_tokens`` of the vLLM config being built
    (0.9 and 0 = unknown outside vLLM)."""
    try:
        from vllm.config import get_current_vllm_config_or_none

        cfg = get_current_vllm_config_or_none()
    except ImportError:
        cfg = None
    cache = getattr(cfg, "cache_config", None)
    sched = getattr(cfg, "scheduler_config", None)
    util = float(getattr(cache, "gpu_memory_utilization", 0.9) or 0.9)
    return util, int(getattr(sched, "max_num_batched_tokens", 0) or 0)


def _register(layer: torch.nn.Module, name: str, data: torch.Tensor, component: str) -> None:
    param = Parameter(data, requires_grad=False)
    param.nf4_component = component  # type: ignore[attr-defined]
    param.weight_loader = expert_weight_loader  # type: ignore[attr-defined]
    layer.register_parameter(name, param)


def expert_weight_loader(
    param: Parameter,
    loaded_weight: torch.Tensor,
    weight_name: str = "",
    shard_id: str | None = None,
    expert_id: int | None = None,
    return_success: bool = False,
) -> bool | None:
    """``RoutedExperts.weight_loader``-compatible loader for our buffers.

    With ``expert_id`` the (flattened) tensor fills that expert's row; without, the whole
    parameter. Our model's ``load_weights`` fills the buffers directly; this serves code that
    follows vLLM's ``param.weight_loader(...)`` convention.
    """
    flat = loaded_weight.reshape(-1)
    dest = param.data if expert_id is None or param.dim() == 1 else param.data[expert_id]
    if flat.numel() != dest.numel():
        if return_success:
            return False
        raise ValueError(
            f"{weight_name or 'expert buffer'}: expected {dest.numel()} elements, "
            f"found {flat.numel()}"
        )
    dest.copy_(flat.view(dest.shape))
    return True if return_success else None


# ----------------------------------------------------------------------------------------------
# Reference (pure torch) path: exact dequantization, dense over experts. Slow and memory hungry
# (it dequantizes every expert on every call); meant for small models and for checking the glue.
# ----------------------------------------------------------------------------------------------


def _dequant_experts(layer: torch.nn.Module, proj: str, dtype: torch.dtype) -> torch.Tensor:
    layout: Nf4Layout = layer.nf4_layouts[proj]
    shape = (layout.rows[0], layout.cols)
    qweight = getattr(layer, f"{proj}_qweight")
    if getattr(layer, "gptoss_weights_order", "rows") == "chunks":
        from gptoss_3090.moe import rows_packed

        qweight = rows_packed(qweight, shape[0], shape[1], gate_up_pairs=proj == "w13")
    absmax = getattr(layer, f"{proj}_absmax")
    experts = []
    for e in range(qweight.shape[0]):
        if layout.nested:
            w = dequantize_nf4_cpu(
                qweight[e],
                absmax[e],
                shape,
                dtype,
                getattr(layer, f"{proj}_nested_absmax")[e],
                getattr(layer, f"{proj}_nested_quant_map"),
                getattr(layer, f"{proj}_nested_offset")[e].reshape(()),
            )
        else:
            w = dequantize_nf4_cpu(qweight[e], absmax[e], shape, dtype)
        experts.append(w)
    return torch.stack(experts)


def route_reference(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the logits, softmax over the k selected (fp32), as GPT-OSS routes."""
    values, ids = torch.topk(router_logits.float(), top_k, dim=-1)
    return torch.softmax(values, dim=-1), ids.to(torch.int32)


def moe_reference(
    x: torch.Tensor, layer: torch.nn.Module, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """GPT-OSS experts in torch: interleaved gate/up, clamped SwiGLU-OAI, weighted sum."""
    dtype = x.dtype
    w13 = _dequant_experts(layer, "w13", dtype)  # [E, 2I, H]
    w2 = _dequant_experts(layer, "w2", dtype)  # [E, H, I]
    num_experts = w13.shape[0]
    dense = torch.zeros(x.shape[0], num_experts, dtype=torch.float32, device=x.device)
    dense.scatter_add_(1, topk_ids.long(), topk_weights.float())  # repeated ids add up
    h = torch.einsum("th,eoh->teo", x, w13) + layer.w13_bias.to(dtype)  # [T, E, 2I]
    gate = h[..., 0::2].float().clamp(max=SWIGLU_LIMIT)
    up = h[..., 1::2].float().clamp(min=-SWIGLU_LIMIT, max=SWIGLU_LIMIT)
    act = ((up + 1) * gate * torch.sigmoid(SWIGLU_ALPHA * gate)).to(dtype)  # [T, E, I]
    y = torch.einsum("tei,ehi->teh", act, w2) + layer.w2_bias.to(dtype)  # [T, E, H]
    return (y.float() * dense.unsqueeze(-1)).sum(dim=1).to(dtype)


# ----------------------------------------------------------------------------------------------
# Kernel adapters (gptoss_3090.moe, branch `moe`). Everything that depends on its exact API is in
# these two functions.
# ----------------------------------------------------------------------------------------------


def _make_kernel_weights(layer: torch.nn.Module) -> Any:
    """``gptoss_3090.moe.MoeLayerWeights`` viewing our buffers (no copies)."""
    from gptoss_3090.moe import MoeLayerWeights, Nf4Experts

    qweight = layer.w13_qweight
    num_experts, device = qweight.shape[0], qweight.device
    nested = layer.nf4_layouts["w13"].nested
    order = getattr(layer, "gptoss_weights_order", "rows")  # "chunks" once reordered

    def experts(proj: str) -> Any:
        layout: Nf4Layout = layer.nf4_layouts[proj]
        if nested:
            nabs = getattr(layer, f"{proj}_nested_absmax")
            noff = getattr(layer, f"{proj}_nested_offset").view(num_experts)
        else:
            nabs = torch.zeros(num_experts, 0, dtype=torch.float32, device=device)
            noff = torch.zeros(num_experts, dtype=torch.float32, device=device)
        return Nf4Experts(
            packed=getattr(layer, f"{proj}_qweight"),
            absmax=getattr(layer, f"{proj}_absmax"),
            nested_absmax=nabs,
            nested_offset=noff,
            bias=getattr(layer, f"{proj}_bias"),
            shape=(num_experts, layout.rows[0], layout.cols),
            nested=nested,
            order=order,
            gate_up_pairs=order == "chunks" and proj == "w13",
        )

    if nested:
        nested_map = layer.w13_nested_quant_map
        if not torch.equal(nested_map, layer.w2_nested_quant_map):
            raise ValueError(
                f"{getattr(layer, 'layer_name', 'MoE layer')}: gate_up and down use different "
                "nested quant maps; the MoE kernels take one map per layer"
            )
    else:
        nested_map = torch.zeros(256, dtype=torch.float32, device=device)
    weights = MoeLayerWeights(
        gate_up=experts("w13"), down=experts("w2"), nested_map=nested_map, top_k=layer.top_k
    )
    weights.check()
    if order == "rows" and moe_weights_order() == "chunks":
        # In place, one expert at a time; the layer remembers it, so that a second call of
        # process_weights_after_loading and the reference path know the order.
        weights.chunk_major(in_place=True)
        layer.gptoss_weights_order = "chunks"
    return weights


#: Byte order the plugin serves expert weights in (``GPTOSS_3090_MOE_WEIGHTS_ORDER``):
#: ``chunks`` (default; reordered at load, read faster by the kernels, same output bit for bit)
#: or ``rows`` (bitsandbytes' order as loaded; for comparisons).
WEIGHTS_ORDER_ENV = "GPTOSS_3090_MOE_WEIGHTS_ORDER"


def moe_weights_order() -> str:
    """The expert byte order from :data:`WEIGHTS_ORDER_ENV` (ValueError when unknown)."""
    order = os.environ.get(WEIGHTS_ORDER_ENV, "chunks").strip() or "chunks"
    if order not in ("rows", "chunks"):
        raise ValueError(f"{WEIGHTS_ORDER_ENV}={order!r}: expected 'chunks' (default) or 'rows'")
    return order


_workspaces: dict[torch.device, torch.Tensor] = {}


def _shared_workspace(weights: Any, tokens: int) -> torch.Tensor:
    """One MoE workspace per device, shared by every layer (they run one after another on one
    stream), sized for ``tokens`` tokens; allocated at load time, before CUDA-graph capture."""
    from gptoss_3090.moe import moe_workspace_bytes

    device = weights.gate_up.packed.device
    need = moe_workspace_bytes(
        tokens, weights.hidden, weights.intermediate, weights.experts, weights.top_k
    )
    ws = _workspaces.get(device)
    if ws is None or ws.numel() < need:
        ws = torch.empty(need, dtype=torch.uint8, device=device)
        _workspaces[device] = ws
    return ws


def _run_kernel(
    x: torch.Tensor,
    weights: Any,
    layer: torch.nn.Module,
    topk_weights: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    router_logits: torch.Tensor | None,
) -> torch.Tensor:
    from gptoss_3090.moe import moe

    workspace = _workspaces[weights.gate_up.packed.device]
    tuning = os.environ.get("GPTOSS_3090_TUNING", "auto")
    if router_logits is not None:
        return moe(x, weights, router_logits=router_logits, workspace=workspace, tuning=tuning)
    return moe(
        x, weights, topk_ids=topk_ids, topk_weights=topk_weights, workspace=workspace, tuning=tuning
    )
