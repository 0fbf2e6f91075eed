"""Checkpoint-name mapping and completeness checks for the ``bnb_moe`` GPT-OSS loader.

Pure Python plus torch on the CPU: nothing here touches vLLM or CUDA, so every rule can be unit
tested in CI.

Two on-disk layouts are understood:

* **Unsloth bnb-4bit** (``quantization_config.quant_method == "bitsandbytes"``): per-expert
  ``mlp.experts.gate_up_projs.E`` / ``down_projs.E`` Linears (``[2I, H]`` / ``[H, I]``, out x in),
  the router at ``mlp.router.linear.*``, q/k/v/o either NF4 (bitsandbytes ``QuantState.as_dict``
  keys next to the packed ``weight``) or plain.
* **Hugging Face bf16** (transformers' ``GptOssForCausalLM`` state dict): fused
  ``mlp.experts.gate_up_proj`` ``[E, H, 2I]`` (the transpose of the per-expert layout) and
  ``down_proj`` ``[E, I, H]``, biases ``*_proj_bias``, router at ``mlp.router.*``. This is the
  quantize-at-load input.

Each *logical* tensor of the vLLM model (one expert's gate_up weight, the q shard of
``qkv_proj``, a norm, ...) is looked up in the checkpoint under the names either layout uses; the
format (NF4 group or dense tensor) is decided from the keys present for that tensor alone. The
:class:`LoadPlan` records which checkpoint keys feed which logical tensor, the keys nothing
consumes (unexpected) and the logical tensors nothing feeds (missing);
:meth:`LoadPlan.raise_if_incomplete` turns either into one error naming every offending key.

vLLM names come from ``vllm/model_executor/models/gpt_oss.py`` (0.26): ``GptOssForCausalLM``
holds ``model`` (``GptOssModel``: ``embedding``, ``layers.N``, ``norm``) and ``lm_head``; a
``TransformerBlock`` holds ``attn`` (``OAIAttention``: ``qkv_proj``, ``o_proj``, ``sinks``),
``mlp`` (``MLPBlock``: ``router`` = ``ReplicatedLinear``, ``experts`` = the ``MoERunner`` built by
``FusedMoE`` whose parameters live in ``experts.routed_experts``), ``input_layernorm`` and
``post_attention_layernorm``.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from gptoss_3090.nf4 import NF4_CODE

try:  # the Rust extension's error type, so users see one exception class for bad checkpoints
    from gptoss_3090._native import CheckpointError
except ImportError:  # pragma: no cover - only when the extension is not built

    class CheckpointError(ValueError):  # type: ignore[no-redef]
        """A checkpoint that does not match what GPT-OSS needs."""


__all__ = [
    "BLOCKSIZE",
    "BNB_COMPONENTS",
    "CheckpointError",
    "GptOssDims",
    "Kind",
    "LoadPlan",
    "LogicalTensor",
    "NESTED_BLOCKSIZE",
    "NF4_CODE",
    "Nf4Sizes",
    "QuantStateInfo",
    "SafetensorsDir",
    "SourceRef",
    "dequantize_nf4_cpu",
    "is_hf_module_skipped",
    "logical_tensors",
    "nf4_sizes",
    "parse_quant_state",
    "plan_checkpoint",
    "quantized_weight_bases",
]

#: bitsandbytes NF4 block size (elements per absmax).
BLOCKSIZE = 64
#: bitsandbytes double-quantization block size (absmax values per nested absmax).
NESTED_BLOCKSIZE = 256


#: Key suffixes that bitsandbytes' ``QuantState.as_dict(packed=True)`` stores next to ``weight``.
BNB_COMPONENTS: tuple[str, ...] = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state.bitsandbytes__nf4",
)
_QS_SUFFIX = ".quant_state.bitsandbytes__nf4"


# ----------------------------------------------------------------------------------------------
# Model dimensions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GptOssDims:
    """The sizes of a GPT-OSS model that decide every tensor shape."""

    num_layers: int
    num_experts: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @property
    def q_size(self) -> int:
        """Rows of q_proj (= input columns of o_proj)."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Rows of k_proj and of v_proj."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config: Any) -> GptOssDims:
        """Reads the sizes from a transformers ``GptOssConfig`` (or its ``config.json`` dict)."""

        def get(key: str, default: Any = None) -> Any:
            if isinstance(config, Mapping):
                value = config.get(key, default)
            else:
                value = getattr(config, key, default)
            if value is None:
                raise CheckpointError(f"config.json: '{key}' is missing; GPT-OSS needs it")
            return value

        num_heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        head_dim_raw = (
            config.get("head_dim")
            if isinstance(config, Mapping)
            else getattr(config, "head_dim", None)
        )
        head_dim = int(head_dim_raw) if head_dim_raw is not None else hidden // num_heads
        tie_raw = (
            config.get("tie_word_embeddings", False)
            if isinstance(config, Mapping)
            else getattr(config, "tie_word_embeddings", False)
        )
        return cls(
            num_layers=int(get("num_hidden_layers")),
            num_experts=int(get("num_local_experts")),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_heads=num_heads,
            num_kv_heads=int(get("num_key_value_heads")),
            head_dim=head_dim,
            vocab_size=int(get("vocab_size")),
            tie_word_embeddings=bool(tie_raw),
        )


# ----------------------------------------------------------------------------------------------
# NF4 sizes and quant-state JSON
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nf4Sizes:
    """Element and byte counts of one NF4-quantized ``[out, in]`` weight."""

    numel: int
    packed_bytes: int
    num_blocks: int
    num_nested_blocks: int


def nf4_sizes(out_features: int, in_features: int) -> Nf4Sizes:
    """Sizes of the bitsandbytes NF4 form of an ``[out_features, in_features]`` weight."""
    numel = out_features * in_features
    num_blocks = math.ceil(numel / BLOCKSIZE)
    return Nf4Sizes(
        numel=numel,
        packed_bytes=(numel + 1) // 2,
        num_blocks=num_blocks,
        num_nested_blocks=math.ceil(num_blocks / NESTED_BLOCKSIZE),
    )


@dataclass(frozen=True)
class QuantStateInfo:
    """The validated ``quant_state.bitsandbytes__nf4`` JSON of one weight."""

    shape: tuple[int, ...]
    dtype: str
    nested: bool
    nested_offset: float


def parse_quant_state(key: str, raw: torch.Tensor | bytes | str) -> QuantStateInfo:
    """Parses and validates the quant-state JSON stored under ``key``.

    Raises:
        CheckpointError: the JSON is not valid NF4 with blocksize 64 (and nested blocksize 256 when
            nested); the message names ``key``.
    """
    if isinstance(raw, torch.Tensor):
        raw = bytes(raw.detach().to("cpu", torch.uint8).reshape(-1).tolist())
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(
                f"'{key}': expected UTF-8 JSON, found undecodable bytes ({e})"
            ) from e
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"'{key}': expected bitsandbytes quant-state JSON, found bad JSON ({e})"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{key}': expected a JSON object, found {type(obj).__name__}")
    qtype = obj.get("quant_type")
    if qtype != "nf4":
        raise CheckpointError(
            f"'{key}': expected quant_type 'nf4' (bnb_moe serves NF4 only), found {qtype!r}"
        )
    if obj.get("blocksize") != BLOCKSIZE:
        raise CheckpointError(
            f"'{key}': expected blocksize {BLOCKSIZE}, found {obj.get('blocksize')!r}"
        )
    shape = obj.get("shape")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s > 0 for s in shape)):
        raise CheckpointError(
            f"'{key}': expected 'shape' as a list of positive ints, found {shape!r}"
        )
    dtype = obj.get("dtype")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise CheckpointError(
            f"'{key}': expected dtype bfloat16, float16 or float32, found {dtype!r}"
        )
    nested = "nested_offset" in obj or "nested_blocksize" in obj
    offset = 0.0
    if nested:
        if obj.get("nested_blocksize") != NESTED_BLOCKSIZE:
            raise CheckpointError(
                f"'{key}': expected nested_blocksize {NESTED_BLOCKSIZE}, "
                f"found {obj.get('nested_blocksize')!r}"
            )
        off = obj.get("nested_offset")
        if not isinstance(off, (int, float)) or not math.isfinite(off):
            raise CheckpointError(f"'{key}': expected a finite nested_offset, found {off!r}")
        offset = float(off)
    return QuantStateInfo(shape=tuple(shape), dtype=dtype, nested=nested, nested_offset=offset)


_NF4_TABLES: dict[torch.device, torch.Tensor] = {}


def _nf4_table(device: torch.device) -> torch.Tensor:
    """The NF4 table on ``device``, made once: a host-to-device copy is not allowed while a CUDA
    graph is being captured, and vLLM's warm-up run (before capture) fills this cache."""
    table = _NF4_TABLES.get(device)
    if table is None:
        table = torch.tensor(NF4_CODE, dtype=torch.float32).to(device)
        _NF4_TABLES[device] = table
    return table


def dequantize_nf4_cpu(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_offset: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Exact NF4 dequantization in torch (CPU or any device), bitsandbytes 0.50 semantics.

    Used when the checkpoint stores a module quantized that the model keeps unquantized (a skip
    list that disagrees with the file). ``absmax`` is uint8 codes when nested, else float32.
    """
    numel = math.prod(shape)
    if absmax.dtype == torch.uint8:
        if nested_absmax is None or nested_quant_map is None:
            raise CheckpointError(
                "nested absmax codes given without nested_absmax/nested_quant_map"
            )
        idx = torch.arange(absmax.numel(), device=absmax.device) // NESTED_BLOCKSIZE
        scale = nested_quant_map.float()[absmax.long()] * nested_absmax.float()[idx]
        if isinstance(nested_offset, torch.Tensor):
            absmax_f = scale + nested_offset.float()
        else:
            absmax_f = scale + float(nested_offset)
    else:
        absmax_f = absmax.float()
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:numel].long()
    table = _nf4_table(flat.device)
    blocks = torch.arange(numel, device=flat.device) // BLOCKSIZE
    return (table[codes] * absmax_f[blocks]).to(dtype).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Logical tensors of the vLLM model
# ----------------------------------------------------------------------------------------------


class Kind(enum.Enum):
    """How a logical tensor is stored in the vLLM model."""

    #: a plain tensor copied (maybe into a slice of) a vLLM parameter
    DENSE = "dense"
    #: an attention projection weight (q/k/v shard of ``qkv_proj`` or ``o_proj``)
    LINEAR_WEIGHT = "linear_weight"
    #: one expert's gate_up (``w13``) or down (``w2``) weight
    EXPERT_WEIGHT = "expert_weight"


@dataclass(frozen=True)
class LogicalTensor:
    """One tensor the vLLM model needs, named as in the Unsloth checkpoint (``name``).

    ``dest`` is the vLLM parameter (DENSE) or module prefix (weights) it lands in; ``shard`` is
    ``q``/``k``/``v`` for ``qkv_proj`` pieces and ``w13``/``w2`` for experts; ``expert`` the expert
    index; ``shape`` the logical shape (``[out, in]`` for weights).
    """

    name: str
    dest: str
    kind: Kind
    shape: tuple[int, ...]
    layer: int | None = None
    shard: str | None = None
    expert: int | None = None
    #: alternative checkpoint names tried in order after ``name`` (the HF layout spelling)
    aliases: tuple[str, ...] = ()
    #: for HF fused experts: the fused key, and whether the slice is stored transposed
    fused_key: str | None = None


def logical_tensors(dims: GptOssDims) -> list[LogicalTensor]:
    """Every tensor a GPT-OSS vLLM model loads, in load order (globals first, then by layer)."""
    d = dims
    out: list[LogicalTensor] = [
        LogicalTensor(
            "model.embed_tokens.weight",
            "model.embedding.weight",
            Kind.DENSE,
            (d.vocab_size, d.hidden_size),
        ),
        LogicalTensor("model.norm.weight", "model.norm.weight", Kind.DENSE, (d.hidden_size,)),
    ]
    if not d.tie_word_embeddings:
        out.append(
            LogicalTensor(
                "lm_head.weight", "lm_head.weight", Kind.DENSE, (d.vocab_size, d.hidden_size)
            )
        )
    two_i = 2 * d.intermediate_size
    for n in range(d.num_layers):
        hf = f"model.layers.{n}"
        vl = f"model.layers.{n}"
        out += [
            LogicalTensor(
                f"{hf}.input_layernorm.weight",
                f"{vl}.input_layernorm.weight",
                Kind.DENSE,
                (d.hidden_size,),
                n,
            ),
            LogicalTensor(
                f"{hf}.post_attention_layernorm.weight",
                f"{vl}.post_attention_layernorm.weight",
                Kind.DENSE,
                (d.hidden_size,),
                n,
            ),
            LogicalTensor(
                f"{hf}.self_attn.sinks", f"{vl}.attn.sinks", Kind.DENSE, (d.num_heads,), n
            ),
        ]
        for shard, rows in (("q", d.q_size), ("k", d.kv_size), ("v", d.kv_size)):
            out.append(
                LogicalTensor(
                    f"{hf}.self_attn.{shard}_proj.weight",
                    f"{vl}.attn.qkv_proj",
                    Kind.LINEAR_WEIGHT,
                    (rows, d.hidden_size),
                    n,
                    shard,
                )
            )
            out.append(
                LogicalTensor(
                    f"{hf}.self_attn.{shard}_proj.bias",
                    f"{vl}.attn.qkv_proj.bias",
                    Kind.DENSE,
                    (rows,),
                    n,
                    shard,
                )
            )
        out += [
            LogicalTensor(
                f"{hf}.self_attn.o_proj.weight",
                f"{vl}.attn.o_proj",
                Kind.LINEAR_WEIGHT,
                (d.hidden_size, d.q_size),
                n,
            ),
            LogicalTensor(
                f"{hf}.self_attn.o_proj.bias",
                f"{vl}.attn.o_proj.bias",
                Kind.DENSE,
                (d.hidden_size,),
                n,
            ),
            # Unsloth wraps the router in a Linear: mlp.router.linear.* -> vLLM mlp.router.*
            LogicalTensor(
                f"{hf}.mlp.router.linear.weight",
                f"{vl}.mlp.router.weight",
                Kind.DENSE,
                (d.num_experts, d.hidden_size),
                n,
                aliases=(f"{hf}.mlp.router.weight",),
            ),
            LogicalTensor(
                f"{hf}.mlp.router.linear.bias",
                f"{vl}.mlp.router.bias",
                Kind.DENSE,
                (d.num_experts,),
                n,
                aliases=(f"{hf}.mlp.router.bias",),
            ),
        ]
        experts = f"{vl}.mlp.experts.routed_experts"
        for e in range(d.num_experts):
            out += [
                LogicalTensor(
                    f"{hf}.mlp.experts.gate_up_projs.{e}.weight",
                    experts,
                    Kind.EXPERT_WEIGHT,
                    (two_i, d.hidden_size),
                    n,
                    "w13",
                    e,
                    fused_key=f"{hf}.mlp.experts.gate_up_proj",
                ),
                LogicalTensor(
                    f"{hf}.mlp.experts.gate_up_projs.{e}.bias",
                    f"{experts}.w13_bias",
                    Kind.DENSE,
                    (two_i,),
                    n,
                    "w13",
                    e,
                    fused_key=f"{hf}.mlp.experts.gate_up_proj_bias",
                ),
                LogicalTensor(
                    f"{hf}.mlp.experts.down_projs.{e}.weight",
                    experts,
                    Kind.EXPERT_WEIGHT,
                    (d.hidden_size, d.intermediate_size),
                    n,
                    "w2",
                    e,
                    fused_key=f"{hf}.mlp.experts.down_proj",
                ),
                LogicalTensor(
                    f"{hf}.mlp.experts.down_projs.{e}.bias",
                    f"{experts}.w2_bias",
                    Kind.DENSE,
                    (d.hidden_size,),
                    n,
                    "w2",
                    e,
                    fused_key=f"{hf}.mlp.experts.down_proj_bias",
                ),
            ]
    return out


# ----------------------------------------------------------------------------------------------
# Matching logical tensors to checkpoint keys
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRef:
    """Where a logical tensor comes from in the checkpoint.

    ``fmt`` is ``"nf4"`` (``key`` is the packed weight; ``companions`` the bitsandbytes keys next to
    it), ``"dense"`` (``key`` is the tensor itself) or ``"fused"`` (``key`` is an HF fused
    ``[E, ...]`` tensor and ``expert`` selects the slice; weights are stored transposed there).
    """

    key: str
    fmt: str
    companions: tuple[str, ...] = ()
    expert: int | None = None


@dataclass
class LoadPlan:
    """The matching of logical tensors to checkpoint keys, with the leftovers on both sides."""

    items: list[tuple[LogicalTensor, SourceRef]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def by_layer(self) -> dict[int | None, list[tuple[LogicalTensor, SourceRef]]]:
        """Items grouped by decoder layer (``None`` = embedding, final norm, lm_head)."""
        groups: dict[int | None, list[tuple[LogicalTensor, SourceRef]]] = {}
        for item in self.items:
            groups.setdefault(item[0].layer, []).append(item)
        return groups

    @property
    def quantized_fraction(self) -> float:
        """Fraction of weight items stored NF4 on disk (1.0 for Unsloth, 0.0 for bf16 HF)."""
        weights = [s for t, s in self.items if t.kind is not Kind.DENSE]
        return sum(s.fmt == "nf4" for s in weights) / max(1, len(weights))

    def raise_if_incomplete(self, path: str | os.PathLike[str] | None = None) -> None:
        """Raises one :class:`CheckpointError` naming every missing and unexpected key."""
        if not self.missing and not self.unexpected:
            return
        where = f"checkpoint {os.fspath(path)!r}" if path is not None else "checkpoint"
        parts = [f"{where} does not match GPT-OSS for bnb_moe:"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing tensor(s): {_elide(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected tensor(s): {_elide(self.unexpected)}")
        raise CheckpointError(" ".join(parts))


def _elide(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    if len(names) > limit:
        shown += f", ... and {len(names) - limit} more"
    return shown


def _nf4_group(base: str, keys: set[str]) -> tuple[str, ...] | None:
    """The bitsandbytes companions of ``base`` if it is stored NF4, else None."""
    if base + _QS_SUFFIX not in keys:
        return None
    return tuple(f"{base}.{c}" for c in BNB_COMPONENTS if f"{base}.{c}" in keys)


def plan_checkpoint(keys: Iterable[str], dims: GptOssDims) -> LoadPlan:
    """Matches checkpoint keys to the logical tensors of a GPT-OSS model of size ``dims``.

    For each logical tensor the Unsloth name is tried, then the HF alias, then (experts) the HF
    fused tensor. A weight stored NF4 must carry its packed bytes, ``absmax``, ``quant_map`` and
    the quant-state JSON; ``nested_absmax`` and ``nested_quant_map`` come as a pair. Everything
    left over on the checkpoint side is unexpected.
    """
    keyset = set(keys)
    used: set[str] = set()
    plan = LoadPlan()
    for t in logical_tensors(dims):
        ref: SourceRef | None = None
        for name in (t.name, *t.aliases):
            if name in keyset:
                companions = _nf4_group(name, keyset) if t.kind is not Kind.DENSE else None
                if companions is not None:
                    have = {c for c in BNB_COMPONENTS if f"{name}.{c}" in keyset}
                    lacking = [c for c in ("absmax", "quant_map") if c not in have]
                    pair = {"nested_absmax", "nested_quant_map"}
                    if len(pair & have) == 1:
                        lacking += sorted(pair - have)
                    plan.missing += [f"{name}.{c}" for c in lacking]
                    ref = SourceRef(name, "nf4", companions)
                    used.update(companions)
                else:
                    ref = SourceRef(name, "dense")
                used.add(name)
                break
            if t.kind is not Kind.DENSE and name + _QS_SUFFIX in keyset:
                # quant state without the packed weight itself
                break
        if ref is None and t.fused_key is not None and t.fused_key in keyset:
            ref = SourceRef(t.fused_key, "fused", expert=t.expert)
            used.add(t.fused_key)
        if ref is None:
            plan.missing.append(t.name)
            continue
        plan.items.append((t, ref))
    plan.unexpected = sorted(keyset - used)
    return plan


def quantized_weight_bases(keys: Iterable[str]) -> set[str]:
    """Weight keys that are stored NF4 (those with a bitsandbytes quant-state entry)."""
    return {k[: -len(_QS_SUFFIX)] for k in keys if k.endswith(_QS_SUFFIX)}


# ----------------------------------------------------------------------------------------------
# Skip lists
# ----------------------------------------------------------------------------------------------


def is_hf_module_skipped(module: str, skip_modules: Iterable[str]) -> bool:
    """Whether ``llm_int8_skip_modules`` leaves the HF module ``module`` unquantized.

    Checkpoints were written under transformers 4's rule, an entry skips every module whose
    dotted name contains it (``replace_with_bnb_linear``: ``key in current_key_name``);
    transformers 5 (``quantizers_utils.should_convert_module``) also reads entries as regexes
    anchored at the start and ending at a module boundary. Either match skips.
    """
    for entry in skip_modules:
        if not entry:
            continue
        if entry in module:
            return True
        try:
            if re.match(rf"(?:{entry})(?:(?<=\.)|(?=\.|$))", module):
                return True
        except re.error:
            continue
    return False


_QKV_RE = re.compile(r"^(?P<pre>.*\.layers\.(?P<n>\d+))\.attn\.(?P<proj>qkv_proj|o_proj)$")
_EXPERTS_RE = re.compile(r"^(?P<pre>.*\.layers\.(?P<n>\d+))\.mlp\.experts(\.routed_experts)?$")


def hf_modules_for_vllm_prefix(prefix: str, num_experts: int) -> list[str]:
    """The HF (checkpoint) module names a vLLM module stands for.

    ``model.layers.3.attn.qkv_proj`` -> the three ``self_attn.{q,k,v}_proj``; ``...attn.o_proj`` ->
    ``self_attn.o_proj``; ``...mlp.experts`` -> every ``gate_up_projs.E`` and ``down_projs.E``.
    Anything else maps to itself.
    """
    m = _QKV_RE.match(prefix)
    if m:
        pre = m.group("pre")
        if m.group("proj") == "qkv_proj":
            return [f"{pre}.self_attn.{p}_proj" for p in "qkv"]
        return [f"{pre}.self_attn.o_proj"]
    m = _EXPERTS_RE.match(prefix)
    if m:
        pre = m.group("pre")
        return [
            f"{pre}.mlp.experts.{p}.{e}"
            for p in ("gate_up_projs", "down_projs")
            for e in range(num_experts)
        ]
    return [prefix]


# ----------------------------------------------------------------------------------------------
# A directory of safetensors files
# ----------------------------------------------------------------------------------------------


class SafetensorsDir:
    """Lazy access to the tensors of a checkpoint directory (one or many ``*.safetensors``).

    Only headers are read up front; :meth:`tensor` memory-maps and copies one tensor, and
    :meth:`expert_slice` reads a single expert of an HF fused ``[E, ...]`` tensor, so host memory
    stays at one tensor (or one expert) at a time.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"checkpoint {self.path!r}: expected a directory, found none")
        files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"'{index}': expected a safetensors index with 'weight_map' ({e})"
                ) from e
            listed = sorted(set(weight_map.values()))
            missing = [f for f in listed if f not in files]
            if missing:
                raise CheckpointError(f"'{index}' lists shard(s) that do not exist: {missing}")
            files = listed
        if not files:
            raise CheckpointError(
                f"checkpoint {self.path!r}: expected *.safetensors files, found none"
            )
        self._open = safe_open
        self._key_file: dict[str, str] = {}
        for f in files:
            full = os.path.join(self.path, f)
            try:
                with safe_open(full, framework="pt") as h:
                    names = list(h.keys())
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"'{full}': not a readable safetensors file ({e})") from e
            for k in names:
                if k in self._key_file:
                    raise CheckpointError(
                        f"'{k}': stored twice, in '{self._key_file[k]}' and '{full}'"
                    )
                self._key_file[k] = full
        self._handles: dict[str, Any] = {}

    def keys(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return list(self._key_file)

    def _handle(self, key: str) -> Any:
        try:
            f = self._key_file[key]
        except KeyError:
            raise CheckpointError(f"'{key}': expected in the checkpoint, found nothing") from None
        h = self._handles.get(f)
        if h is None:
            h = self._open(f, framework="pt")
            self._handles[f] = h
        return h

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, on the CPU."""
        return self._handle(key).get_tensor(key)

    def expert_slice(self, key: str, expert: int) -> torch.Tensor:
        """``tensor(key)[expert]`` without reading the other experts."""
        return self._handle(key).get_slice(key)[expert]

    def close(self) -> None:
        """Drops the open file handles."""
        self._handles.clear()


# ----------------------------------------------------------------------------------------------
# NF4 storage: layouts, slots, reading bitsandbytes tensors and filling our buffers
# ----------------------------------------------------------------------------------------------

#: The components of our NF4 storage, in the order they are allocated.
NF4_PARAM_SUFFIXES: tuple[str, ...] = (
    "qweight",
    "absmax",
    "nested_absmax",
    "nested_offset",
    "nested_quant_map",
)


@dataclass(frozen=True)
class Nf4Layout:
    """Back-to-back NF4 storage of ``len(rows)`` weights ``[rows[s], cols]`` (segments).

    A fused ``qkv_proj`` has three segments (q, k, v) in one set of buffers: packed bytes,
    absmax (uint8 codes when ``nested``, else float32), nested absmax (per segment, each padded to
    whole 256-blocks of its own) and one nested offset per segment. Experts use one segment per
    expert row of 2-D ``[E, ...]`` buffers instead.
    """

    rows: tuple[int, ...]
    cols: int
    nested: bool

    @property
    def sizes(self) -> list[Nf4Sizes]:
        """Sizes of each segment."""
        return [nf4_sizes(r, self.cols) for r in self.rows]

    def _starts(self, attr: str) -> list[int]:
        starts, acc = [], 0
        for s in self.sizes:
            starts.append(acc)
            acc += getattr(s, attr)
        return starts

    def total(self, attr: str) -> int:
        """Sum of one size attribute (``packed_bytes``, ``num_blocks``, ``num_nested_blocks``)."""
        return sum(getattr(s, attr) for s in self.sizes)

    def ranges(self, segment: int) -> dict[str, tuple[int, int]]:
        """``(start, length)`` of each component of one segment in the flat buffers."""
        size = self.sizes[segment]
        return {
            "qweight": (self._starts("packed_bytes")[segment], size.packed_bytes),
            "absmax": (self._starts("num_blocks")[segment], size.num_blocks),
            "nested_absmax": (self._starts("num_nested_blocks")[segment], size.num_nested_blocks),
            "nested_offset": (segment, 1),
        }

    def param_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every buffer (nested ones only when ``nested``)."""
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "qweight": ((self.total("packed_bytes"),), torch.uint8),
            "absmax": (
                (self.total("num_blocks"),),
                torch.uint8 if self.nested else torch.float32,
            ),
        }
        if self.nested:
            shapes["nested_absmax"] = ((self.total("num_nested_blocks"),), torch.float32)
            shapes["nested_offset"] = ((len(self.rows),), torch.float32)
            shapes["nested_quant_map"] = ((256,), torch.float32)
        return shapes


@dataclass
class Nf4Slot:
    """Views of our buffers that receive one quantized weight (one segment / one expert)."""

    name: str
    shape: tuple[int, int]
    qweight: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_offset: torch.Tensor | None
    #: the layer-wide nested quant map (one per parameter, identical for every segment)
    nested_quant_map: torch.nn.Parameter | torch.Tensor | None

    @property
    def nested(self) -> bool:
        """Whether this slot stores double-quantized absmax."""
        return self.nested_absmax is not None


def nf4_slot(
    name: str, params: Mapping[str, torch.Tensor], layout: Nf4Layout, segment: int, row: int | None
) -> Nf4Slot:
    """The slot of ``segment`` in buffers ``params`` (keys from :data:`NF4_PARAM_SUFFIXES`).

    ``row`` selects the expert row of 2-D expert buffers (``None`` for 1-D linear buffers).
    """

    def view(comp: str) -> torch.Tensor | None:
        if comp not in params:
            return None
        t = params[comp].data
        if row is not None:
            t = t[row]
        start, length = layout.ranges(0 if row is not None else segment)[comp]
        return t.narrow(0, start, length)

    return Nf4Slot(
        name=name,
        shape=(layout.rows[segment], layout.cols),
        qweight=view("qweight"),  # type: ignore[arg-type]
        absmax=view("absmax"),  # type: ignore[arg-type]
        nested_absmax=view("nested_absmax") if layout.nested else None,
        nested_offset=view("nested_offset") if layout.nested else None,
        nested_quant_map=params.get("nested_quant_map") if layout.nested else None,
    )


@dataclass
class Nf4Parts:
    """One weight in bitsandbytes NF4 form, as read from a checkpoint or made by a quantizer."""

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_quant_map: torch.Tensor | None
    nested_offset: float
    shape: tuple[int, ...]

    @property
    def nested(self) -> bool:
        """Whether absmax is double-quantized."""
        return self.nested_absmax is not None


def _expect(key: str, t: torch.Tensor, dtype: torch.dtype, numel: int) -> torch.Tensor:
    if t.dtype != dtype or t.numel() != numel:
        raise CheckpointError(
            f"'{key}': expected {dtype} with {numel} elements, "
            f"found {t.dtype} {tuple(t.shape)} ({t.numel()} elements)"
        )
    return t.reshape(-1)


def read_nf4_parts(source: Any, key: str, expected_shape: tuple[int, int]) -> Nf4Parts:
    """Reads and validates the bitsandbytes tensors of weight ``key`` from ``source``.

    ``source`` has ``tensor(name)``. Checks the JSON (NF4, blocksize, shape), byte and block
    counts, dtypes and that ``quant_map`` is the NF4 code table; every error names the key.
    """
    qs = parse_quant_state(key + _QS_SUFFIX, source.tensor(key + _QS_SUFFIX))
    if tuple(qs.shape) != tuple(expected_shape):
        raise CheckpointError(
            f"'{key}': expected shape {list(expected_shape)} for this model, "
            f"found {list(qs.shape)} in its quant state"
        )
    sizes = nf4_sizes(*expected_shape)
    packed = _expect(key, source.tensor(key), torch.uint8, sizes.packed_bytes)
    qmap = _expect(f"{key}.quant_map", source.tensor(f"{key}.quant_map"), torch.float32, 16)
    if not torch.equal(qmap.cpu(), torch.tensor(NF4_CODE, dtype=torch.float32)):
        raise CheckpointError(
            f"'{key}.quant_map': expected the NF4 code table, found {qmap.tolist()[:4]}..."
        )
    if qs.nested:
        absmax = _expect(
            f"{key}.absmax", source.tensor(f"{key}.absmax"), torch.uint8, sizes.num_blocks
        )
        nested_absmax = _expect(
            f"{key}.nested_absmax",
            source.tensor(f"{key}.nested_absmax"),
            torch.float32,
            sizes.num_nested_blocks,
        )
        nested_map = _expect(
            f"{key}.nested_quant_map", source.tensor(f"{key}.nested_quant_map"), torch.float32, 256
        )
    else:
        absmax = _expect(
            f"{key}.absmax", source.tensor(f"{key}.absmax"), torch.float32, sizes.num_blocks
        )
        nested_absmax = nested_map = None
    return Nf4Parts(
        packed, absmax, nested_absmax, nested_map, qs.nested_offset, tuple(expected_shape)
    )


def expand_nested_absmax(parts: Nf4Parts) -> torch.Tensor:
    """float32 absmax of nested ``parts``, exactly as bitsandbytes dequantizes it.

    ``map[code] * nested_absmax[b // 256]`` (fp32 multiply), then ``+ offset`` (fp32 add).
    """
    assert parts.nested_absmax is not None and parts.nested_quant_map is not None
    codes = parts.absmax.long()
    idx = torch.arange(codes.numel(), device=codes.device) // NESTED_BLOCKSIZE
    scaled = parts.nested_quant_map.float()[codes] * parts.nested_absmax.float()[idx]
    return scaled + torch.tensor(parts.nested_offset, dtype=torch.float32, device=scaled.device)


def fill_nf4_slot(slot: Nf4Slot, parts: Nf4Parts, key: str) -> None:
    """Copies ``parts`` into ``slot`` (any device to any device).

    A nested tensor fills a non-nested slot by exact expansion of its absmax; a non-nested tensor
    cannot fill a nested slot (that would requantize absmax) and raises.
    """
    if tuple(parts.shape) != tuple(slot.shape):
        raise CheckpointError(
            f"'{key}': expected shape {list(slot.shape)}, found {list(parts.shape)}"
        )
    slot.qweight.copy_(parts.packed.reshape(-1))
    if slot.nested:
        if not parts.nested:
            raise CheckpointError(
                f"'{key}': stored without double quantization (float32 absmax), but the model "
                f"was allocated for double-quantized statistics (bnb_4bit_use_double_quant is "
                f"true in config.json); make them agree"
            )
        assert slot.nested_absmax is not None and slot.nested_offset is not None
        assert parts.nested_absmax is not None and parts.nested_quant_map is not None
        slot.absmax.copy_(parts.absmax.reshape(-1))
        slot.nested_absmax.copy_(parts.nested_absmax.reshape(-1))
        slot.nested_offset.fill_(parts.nested_offset)
        _set_shared_map(slot, parts.nested_quant_map.reshape(-1), key)
    else:
        absmax = expand_nested_absmax(parts) if parts.nested else parts.absmax
        slot.absmax.copy_(absmax.reshape(-1).float())


def _set_shared_map(slot: Nf4Slot, qmap: torch.Tensor, key: str) -> None:
    """The nested quant map is one buffer per parameter: the first weight sets it, the others
    must agree bit for bit (bitsandbytes uses one constant map)."""
    holder = slot.nested_quant_map
    assert holder is not None
    first = getattr(holder, "_gptoss_map_cpu", None)
    cpu = qmap.detach().float().cpu()
    if first is None:
        holder.data.copy_(qmap)
        holder._gptoss_map_cpu = cpu  # type: ignore[union-attr]
    elif not torch.equal(first, cpu):
        raise CheckpointError(
            f"'{key}.nested_quant_map': expected the same map as the other weights of "
            f"'{slot.name}', found a different one"
        )
