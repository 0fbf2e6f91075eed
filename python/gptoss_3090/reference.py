"""CPU reference of the GPT-OSS MoE block in fp32 torch, computed from the fused expert view.

This is the ground truth our GPU MoE kernels are tested against, so it follows the math of
``shared/reference/gpt-oss-math.md`` literally and favours clarity over speed:

1. router: ``logits = x @ W_r^T + b_r`` (``[T, E]``), top-k by value, softmax over the k
   selected logits only (fp32);
2. each selected expert ``e`` with weight ``w``:
   ``a = x @ W_gu[e]^T + b_gu[e]`` (``[2I]``, interleaved: gate = ``a[0::2]``, up = ``a[1::2]``),
   ``gate = min(gate, limit)``, ``up = clamp(up, -limit, limit)``,
   ``glu = gate * sigmoid(alpha * gate)``, ``h = (up + 1) * glu``,
   ``out = h @ W_d[e]^T + b_d[e]``;
3. ``y = sum_k w_k * out_k``.

``W_gu[e]`` is ``[2I, H]`` and ``W_d[e]`` ``[H, I]`` in the (out, in) layout of the Unsloth
checkpoint and of :class:`FusedExperts`; HF's fused parameters store the transposes.

Inputs of any float dtype are upcast to fp32; the weights are the exact dequantized values
(``FusedExperts.dequantize(e)``), so the only differences from an exact computation are fp32
rounding in the matmuls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = [
    "SWIGLU_ALPHA",
    "Routing",
    "expert_mlp",
    "moe_from_weights",
    "reference_moe",
    "route",
    "swiglu",
]

#: Sigmoid gain of GPT-OSS's clamped SwiGLU.
SWIGLU_ALPHA = 1.702


class Routing(NamedTuple):
    """Router result for ``T`` tokens."""

    logits: torch.Tensor  #: fp32 ``[T, E]``
    experts: torch.Tensor  #: int64 ``[T, k]``, by decreasing logit
    weights: torch.Tensor  #: fp32 ``[T, k]``, softmax over the k selected logits


def _f32(t: Any) -> torch.Tensor:
    return torch.as_tensor(t).to(torch.float32)


def route(x: torch.Tensor, router_w: Any, router_b: Any, top_k: int) -> Routing:
    """Router logits, top-k experts and their softmax weights, in fp32.

    Args:
        x: ``[T, H]`` activations.
        router_w: ``[E, H]``; router_b: ``[E]``.
        top_k: experts per token.
    """
    logits = _f32(x) @ _f32(router_w).T + _f32(router_b)
    top_vals, top_idx = torch.topk(logits, top_k, dim=-1)
    return Routing(logits, top_idx, torch.softmax(top_vals, dim=-1))


def swiglu(a: torch.Tensor, limit: float = 7.0, alpha: float = SWIGLU_ALPHA) -> torch.Tensor:
    """GPT-OSS clamped SwiGLU of interleaved ``[..., 2I]`` -> ``[..., I]``.

    ``gate = a[..., 0::2].clamp(max=limit)``, ``up = a[..., 1::2].clamp(-limit, limit)``,
    result ``(up + 1) * gate * sigmoid(alpha * gate)``.
    """
    gate = a[..., 0::2].clamp(max=limit)
    up = a[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1.0) * (gate * torch.sigmoid(alpha * gate))


def expert_mlp(
    x: torch.Tensor,
    w_gate_up: Any,
    b_gate_up: Any,
    w_down: Any,
    b_down: Any,
    swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """One expert in fp32: ``swiglu(x @ W_gu^T + b_gu) @ W_d^T + b_d``.

    ``w_gate_up`` is ``[2I, H]`` (interleaved rows), ``w_down`` ``[H, I]``.
    """
    a = _f32(x) @ _f32(w_gate_up).T + _f32(b_gate_up)
    return swiglu(a, swiglu_limit) @ _f32(w_down).T + _f32(b_down)


def moe_from_weights(
    x: torch.Tensor,
    router_w: Any,
    router_b: Any,
    expert: Callable[[int], tuple[Any, Any, Any, Any]],
    top_k: int,
    swiglu_limit: float = 7.0,
) -> tuple[torch.Tensor, Routing]:
    """MoE block over experts given by a callback (only the selected experts are fetched).

    Args:
        x: ``[..., H]`` activations (any float dtype).
        router_w, router_b: router parameters ``[E, H]``, ``[E]``.
        expert: ``e -> (W_gu [2I, H], b_gu [2I], W_d [H, I], b_d [H])``.
        top_k: experts per token.
        swiglu_limit: SwiGLU clamp (7.0 for GPT-OSS).

    Returns:
        ``(y, routing)``: fp32 ``y`` of ``x``'s shape and the router result.
    """
    shape = x.shape
    xf = _f32(x).reshape(-1, shape[-1])
    routing = route(xf, router_w, router_b, top_k)
    y = torch.zeros_like(xf)
    for e in torch.unique(routing.experts).tolist():
        tokens, slot = torch.nonzero(routing.experts == e, as_tuple=True)
        w_gu, b_gu, w_d, b_d = expert(e)
        out = expert_mlp(xf[tokens], w_gu, b_gu, w_d, b_d, swiglu_limit)
        y.index_add_(0, tokens, out * routing.weights[tokens, slot, None])
    return y.reshape(shape), routing


def reference_moe(
    x: torch.Tensor,
    router_w: Any,
    router_b: Any,
    gate_up: Any,
    down: Any,
    top_k: int,
    swiglu_limit: float = 7.0,
    return_routing: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, Routing]:
    """GPT-OSS MoE block in fp32 from the fused expert views of one layer.

    Args:
        x: ``[..., H]`` activations.
        router_w: ``[E, H]`` router weight; router_b: ``[E]`` router bias
            (``Checkpoint.tensor("model.layers.L.mlp.router.linear.weight")`` etc.).
        gate_up: ``Checkpoint.fused_experts(L, "gate_up")``: shape ``[E, 2I, H]``,
            ``.dequantize(e) -> [2I, H]``, ``.bias [E, 2I]``.
        down: ``Checkpoint.fused_experts(L, "down")``: shape ``[E, H, I]``,
            ``.dequantize(e) -> [H, I]``, ``.bias [E, H]``.
        top_k: experts per token (4 for GPT-OSS).
        swiglu_limit: SwiGLU clamp (7.0).
        return_routing: also return the :class:`Routing`.

    Returns:
        fp32 tensor of ``x``'s shape (and the routing if asked).
    """
    b_gu = _f32(gate_up.bias)
    b_d = _f32(down.bias)

    def expert(e: int) -> tuple[Any, Any, Any, Any]:
        return gate_up.dequantize(e), b_gu[e], down.dequantize(e), b_d[e]

    y, routing = moe_from_weights(x, router_w, router_b, expert, top_k, swiglu_limit)
    return (y, routing) if return_routing else y
