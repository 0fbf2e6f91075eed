"""Type stubs for ``gptoss_3090._native``, the Rust extension (PyO3, abi3).

The extension has four parts, each registered by its ``src/<domain>/py.rs``:

* exact NF4 on the CPU (``src/nf4``): ``nf4_code_table``, ``dynamic_map_signed``,
  ``nf4_quantize``, ``nf4_dequantize``;
* the checkpoint reader (``src/checkpoint``): :class:`NativeCheckpoint`, ``fused_dequantize``;
* the CUDA runtime (``src/cuda``): NVRTC compilation, the cubin cache, devices, tuning;
* the launchers (``src/ops``): ``cuda_nf4_*``, ``attention_*`` and (branch ``moe``) ``moe_*``.

Launchers take raw integers: device pointers (``tensor.data_ptr()``), sizes, strides, the device
ordinal and the raw CUDA stream handle (``torch.cuda.current_stream().cuda_stream``). They are
meant to be called through the validated wrappers in :mod:`gptoss_3090.ops`,
:mod:`gptoss_3090.attention` and :mod:`gptoss_3090.moe`, never directly with unchecked tensors.

Errors: checkpoint problems raise :class:`CheckpointError` (a ``ValueError``), bad arguments
``ValueError``, driver / NVRTC loading failures :class:`CudaError` (a ``RuntimeError``) and
kernel compilation failures :class:`KernelCompileError`. No Rust panic crosses into Python.
"""

from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str
"""The crate version (``Cargo.toml``), equal to the Python package version."""

class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or not in the expected layout. The message names the
    file or tensor key, what was expected and what was found."""

class CudaError(RuntimeError):
    """The CUDA driver or NVRTC could not be loaded, or a driver call failed (the message names
    the operation and the CUDA error)."""

class KernelCompileError(CudaError):
    """NVRTC rejected a kernel source; the message carries the kernel family, the target arch
    and the NVRTC log."""

# ---------------------------------------------------------------------------------------------
# exact NF4 on the CPU (src/nf4/py.rs)
# ---------------------------------------------------------------------------------------------

def nf4_code_table() -> npt.NDArray[np.float32]:
    """The 16 NF4 code values (float32, index = 4-bit code), as in bitsandbytes."""

def dynamic_map_signed() -> npt.NDArray[np.float32]:
    """bitsandbytes ``create_dynamic_map(signed=True)``: the 256-entry map of nested
    (double-quantized) absmax codes, float32."""

def nf4_quantize(values: npt.NDArray[np.float32], nested: bool) -> dict[str, Any]:
    """Quantizes 1-D contiguous float32 ``values`` to NF4 (block size 64), bitsandbytes CPU
    semantics.

    Returns a dict with ``packed`` (uint8 ``[ceil(n/2)]``, high nibble first), ``absmax``
    (float32 ``[nb]``, or uint8 codes ``[nb]`` when ``nested``) and, when nested,
    ``nested_absmax`` (float32 ``[ceil(nb/256)]``) and ``nested_offset`` (float).
    Raises ValueError naming the argument for a wrong dtype, shape or layout.
    """

def nf4_dequantize(
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32] | npt.NDArray[np.uint8],
    n: int,
    dtype: str,
    quant_map: npt.NDArray[np.float32],
    nested_absmax: npt.NDArray[np.float32] | None = None,
    nested_quant_map: npt.NDArray[np.float32] | None = None,
    nested_offset: float | None = None,
) -> npt.NDArray[np.uint16] | npt.NDArray[np.float32]:
    """Dequantizes ``n`` NF4 values exactly like bitsandbytes ``dequantize_4bit``.

    Args:
        packed: uint8 codes (any shape, contiguous), at least ``ceil(n/2)`` bytes.
        absmax: float32 ``[nb]``, or uint8 codes when the nested statistics are given.
        n: number of values.
        dtype: ``"bfloat16"``, ``"float16"`` (uint16 bit patterns come back) or ``"float32"``.
        quant_map: the 16-entry float32 NF4 table of the checkpoint.
        nested_absmax, nested_quant_map, nested_offset: all three or none (double
            quantization).

    Returns:
        A 1-D array of ``n`` values: uint16 bit patterns for bf16/f16, float32 for float32.
    """

# ---------------------------------------------------------------------------------------------
# checkpoint reader (src/checkpoint/py.rs)
# ---------------------------------------------------------------------------------------------

class NativeCheckpoint:
    """An opened, validated GPT-OSS checkpoint (the native half of
    :class:`gptoss_3090.Checkpoint`). Shards are memory-mapped; nothing is copied at open."""

    def __new__(cls, path: str | Any) -> NativeCheckpoint:
        """Opens and validates the checkpoint directory ``path`` (config.json, safetensors
        index and shards, NF4 quant states). Raises CheckpointError."""

    @property
    def path(self) -> str:
        """The checkpoint directory."""

    def config_json(self) -> str:
        """The text of config.json."""

    def summary_json(self) -> str:
        """The checkpoint summary (shapes, NF4 formats, bytes by category) as a JSON string."""

    def keys(self) -> list[str]:
        """All tensor keys, sorted."""

    def tensor_info(self, key: str) -> tuple[str, list[int]]:
        """``(dtype_name, shape)`` of a stored tensor; CheckpointError for an unknown key."""

    def read_tensor(self, key: str) -> npt.NDArray[np.uint8]:
        """A copy of the stored bytes of ``key`` as a 1-D uint8 array."""

    def weight_format(self, name: str) -> str | None:
        """``"nf4"``, ``"plain"`` (a Linear weight stored unquantized) or None (not a Linear
        weight)."""

    def dequantize(self, name: str) -> tuple[npt.NDArray[np.uint16], str, list[int]]:
        """Dequantizes NF4 weight ``name``: ``(uint16 bit patterns, dtype_name, shape)``."""

    def fused_layout(self, layer: int, proj: str) -> dict[str, Any]:
        """Sizes of the fused experts of (``layer``, ``proj`` = ``"gate_up"`` | ``"down"``):
        ``layer``, ``proj``, ``shape`` (E, N, K), ``nested``, ``dtype``, ``bias_dtype``,
        ``total_bytes`` and ``buffers`` ``{name: {shape, dtype, nbytes}}``."""

    def fill_fused(
        self,
        layer: int,
        proj: str,
        packed: npt.NDArray[np.uint8],
        absmax: npt.NDArray[np.uint8],
        bias: npt.NDArray[np.uint8],
        quant_map: npt.NDArray[np.uint8],
        nested_absmax: npt.NDArray[np.uint8] | None = None,
        nested_offset: npt.NDArray[np.uint8] | None = None,
        nested_quant_map: npt.NDArray[np.uint8] | None = None,
        threads: int | None = None,
    ) -> None:
        """Fills caller buffers (1-D contiguous uint8 arrays of exactly the layout's byte sizes)
        with the fused experts in one pass, without the GIL. The ``nested_*`` buffers must be
        given iff the experts are nested. ``threads`` defaults to min(cores, 8)."""

def fused_dequantize(
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.uint8],
    quant_map: npt.NDArray[np.uint8],
    experts: int,
    n: int,
    k: int,
    dtype: str,
    expert: int,
    nested_absmax: npt.NDArray[np.uint8] | None = None,
    nested_offset: npt.NDArray[np.uint8] | None = None,
    nested_quant_map: npt.NDArray[np.uint8] | None = None,
) -> npt.NDArray[np.uint16]:
    """Dequantizes expert ``expert`` of fused buffers (raw bytes laid out as ``fused_layout``
    says) of shape ``[experts, n, k]``; returns ``n*k`` uint16 bit patterns of ``dtype``
    (``"bfloat16"`` or ``"float16"``)."""

# ---------------------------------------------------------------------------------------------
# CUDA runtime (src/cuda/py.rs)
# ---------------------------------------------------------------------------------------------

def compile_kernels(arch: str, families: list[str] | None = None) -> dict[str, int]:
    """NVRTC-compiles the kernel families ``families`` (default: every one) for ``arch`` (e.g.
    ``"sm_86"``) through the disk cache, the families side by side (one thread each, up to the
    machine's cores); returns ``{family: cubin_bytes}``. Needs NVRTC, not a GPU. Raises
    ValueError for an unknown family, KernelCompileError (with the NVRTC log of the first
    failing family, in the given order) or CudaError (NVRTC not found). A family another
    thread of this process is compiling for the same arch is waited for, not compiled twice."""

def compile_source(src: str, arch: str, name: str = "test_source") -> bytes:
    """Compiles one source text (it may ``#include "common.cuh"``) for ``arch``, without the
    cache; returns the cubin. Raises KernelCompileError with the NVRTC log. Test hook."""

def compile_source_log(
    src: str, arch: str, extra_options: list[str] = ..., name: str = "test_source"
) -> tuple[int, str]:
    """Compiles one source text with extra NVRTC options; returns ``(cubin_bytes, nvrtc_log)``.
    Diagnostics hook, e.g. ``compile_source_log(src, "sm_86", ["--ptxas-options=-v"])``."""

def kernel_source(name: str) -> str:
    """The embedded source text of kernel family ``name`` (``"nf4"``, ``"moe"``,
    ``"moe_chunks"``, ``"attention"``, and the MoE families' fp16 programs ``"moe_f16"``,
    ``"moe_chunks_f16"``)."""

def kernel_sources() -> list[str]:
    """Names of the kernel families embedded in the extension."""

def cuda_driver_available() -> bool:
    """Whether the NVIDIA driver library (libcuda) loads and ``cuInit`` succeeds."""

def nvrtc_version() -> tuple[int, int]:
    """The NVRTC version as ``(major, minor)``; raises CudaError when NVRTC is not found."""

def kernel_cache_dir() -> str | None:
    """The folder where compiled cubins are cached (``$GPTOSS_3090_CACHE``, else
    ``$XDG_CACHE_HOME/gptoss_3090/kernels`` or ``~/.cache/gptoss_3090/kernels``), or None when
    caching is off (``GPTOSS_3090_CACHE=off``)."""

def arch_name(arch: str) -> str:
    """``arch`` in any spelling the runtime accepts (``"sm_86"``, ``"86"``, ``"8.6"``) as
    ``"sm_XY"``. Raises ValueError when it is malformed or older than sm_80."""

def kernel_cache_path(family: str, arch: str) -> str | None:
    """The file kernel family ``family`` compiled for ``arch`` is cached in (whether or not it
    exists yet), or None when caching is off. Raises ValueError for an unknown family or arch,
    CudaError without NVRTC."""

def device_info(ordinal: int) -> dict[str, Any]:
    """Facts about GPU ``ordinal``: ``ordinal``, ``name``, ``arch`` (``"sm_86"``), ``major``,
    ``minor``, ``sm_count``, ``max_shared_per_block_optin``, ``shared_per_sm``, ``l2_bytes``,
    ``total_mem``, ``tuning``, ``natural_tuning``, ``driver_version`` (int, e.g. 13000, or
    None), ``nvrtc_version`` and ``kernel_cache_dir``. Raises CudaError without a GPU or for an
    architecture below sm_80."""

def max_active_clusters(
    ordinal: int, family: str, entry: str, cluster_y: int, threads: int, dyn_smem: int
) -> int:
    """How many clusters of (1, ``cluster_y``, 1) blocks of kernel ``family``/``entry``
    (``threads`` threads, ``dyn_smem`` bytes of dynamic shared memory) GPU ``ordinal`` runs at
    once (compute capability 9.0+; else a ValueError)."""

def warmup(ordinal: int) -> None:
    """Compiles (through the disk cache) and loads every kernel on GPU ``ordinal``. Call it
    before CUDA-graph capture: module loading is not capturable."""

def set_tuning(name: str | None = None) -> None:
    """Forces a launch-configuration family (``"sm80"``, ``"sm86"``, ``"sm90"``) on every GPU,
    or clears the override with None (then ``GPTOSS_3090_FORCE_TUNING`` is not consulted
    again)."""

def forced_tuning() -> str | None:
    """The current tuning override (``"sm80"``/``"sm86"``/``"sm90"``) or None."""

# ---------------------------------------------------------------------------------------------
# NF4 launchers (src/ops/py.rs)
# ---------------------------------------------------------------------------------------------

Nf4StatsTuple = tuple[int, int, int, int, int, float, bool]
"""``(packed, absmax, nested_absmax, nested_map, nested_offset_ptr, nested_offset_value,
nested)``: device pointers (0 = absent), the offset value and whether the stats are nested."""

Nf4SegmentTuple = tuple[int, int, int, int, int, float, bool, int]
"""An :data:`Nf4StatsTuple` followed by the segment's row count (output features)."""

def cuda_nf4_dequantize(
    ordinal: int,
    stream: int,
    dtype: str,
    stats: Nf4StatsTuple,
    numel: int,
    n_experts: int,
    out: int,
) -> None:
    """Dequantizes NF4 (one tensor, or ``n_experts`` fused experts of ``numel`` values each)
    into ``out`` (``dtype`` = ``"bf16"``/``"f16"``) on ``stream``."""

def cuda_nf4_dequantize_segments(
    ordinal: int,
    stream: int,
    dtype: str,
    segments: list[tuple[Nf4StatsTuple, int, int]],
) -> None:
    """Dequantizes 1..3 single NF4 tensors, each ``(stats, numel, out)``, in one launch (each
    exactly as :func:`cuda_nf4_dequantize` would)."""

def cuda_nf4_linear(
    ordinal: int,
    stream: int,
    dtype: str,
    x: int,
    ldx: int,
    m: int,
    k: int,
    y: int,
    ldy: int,
    bias: int,
    segments: list[Nf4SegmentTuple],
    path: str = "auto",
    ws: int = 0,
    ws_floats: int = 0,
) -> str:
    """``y = x Wᵀ + b`` on the GPU, W made of 1 to 3 NF4 segments whose outputs are
    concatenated; ``path`` is ``"auto"``, ``"stream"``, ``"wide"``, ``"decode"``, ``"mma"``,
    ``"mma_l"``, ``"mma_m"``, ``"mma_s"`` or ``"dequant_matmul"``. ``ws`` / ``ws_floats``: the fp32
    split-K workspace (pointer and size in floats) that :func:`cuda_nf4_linear_plan` asks for
    (0 when it asks for none). Returns the kernel entry used."""

NF4_STREAM_MAX_M: int
"""Largest M (rows of x) the streaming NF4 linear serves (src/ops/nf4.rs ``STREAM_MAX_M``)."""

NF4_WIDE_MAX_M: int
"""Largest M the wide streaming NF4 linear serves (src/ops/nf4.rs ``WIDE_MAX_M``)."""

def cuda_nf4_linear_plan(
    ordinal: int, m: int, n: int, k: int, path: str = "auto", stream: int = 0
) -> dict[str, Any]:
    """The launch plan ``cuda_nf4_linear`` would use for (M, N, K) on GPU ``ordinal`` (no
    launch): ``entry``, ``grid``, ``threads``, ``smem``, ``tuning``, ``splits`` (split-K
    factor), ``workspace_floats`` (the split-K workspace it needs) and ``cluster_reduce``
    (the wide path's split is summed inside thread-block clusters, sm_90: no workspace, no
    reduce launch; ``GPTOSS_3090_WIDE_REDUCE=launch`` turns it off; only where the GPU runs all
    of the launch's clusters at once). ``stream``: the stream the launch will use (0 = none
    known); inside CUDA-graph capture the kernels must already be loaded (``warmup``)."""

def cuda_nf4_quantize(
    ordinal: int,
    stream: int,
    in_dtype: str,
    weight: int,
    n: int,
    nested: bool,
    packed: int,
    absmax: int,
    codes: int,
    nested_absmax: int,
    nested_map: int,
    offset: int,
) -> None:
    """Quantizes ``n`` values of ``weight`` (``in_dtype`` bf16/f16/f32) to NF4 on the GPU with
    bitsandbytes CUDA semantics, into the given output buffers."""

# ---------------------------------------------------------------------------------------------
# attention launchers (src/ops/attention.rs, mod py)
# ---------------------------------------------------------------------------------------------

def attention_kv_write(
    ordinal: int,
    stream: int,
    dtype: str,
    key: int,
    key_strides: tuple[int, int, int] | list[int],
    value: int,
    value_strides: tuple[int, int, int] | list[int],
    cache: int,
    cache_shape: tuple[int, int, int, int] | list[int],
    cache_strides: tuple[int, int, int, int] | list[int],
    slot_mapping: int,
    slot_is_i64: bool,
    num_tokens: int,
    num_kv_heads: int,
    head_size: int,
) -> None:
    """Writes key/value rows into the paged KV cache at ``slot_mapping`` (rows with a negative
    slot are skipped)."""

def attention_forward(
    ordinal: int,
    stream: int,
    dtype: str,
    q: int,
    q_shape: tuple[int, int, int] | list[int],
    q_strides: tuple[int, int, int] | list[int],
    o: int,
    o_shape: tuple[int, int, int] | list[int],
    o_strides: tuple[int, int, int] | list[int],
    query_start_loc: int,
    seq_lens: int,
    num_reqs: int,
    sinks: int,
    sink_mode: int,
    workspace: int,
    workspace_floats: int,
    window: int | None,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    *,
    cache: int = 0,
    cache_shape: tuple[int, int, int, int] | list[int] = ...,
    cache_strides: tuple[int, int, int, int] | list[int] = ...,
    block_table: int = 0,
    block_table_shape: tuple[int, int] | list[int] = ...,
    block_table_stride: int = 0,
    k: int = 0,
    k_shape: tuple[int, int, int] | list[int] = ...,
    k_strides: tuple[int, int, int] | list[int] = ...,
    v: int = 0,
    v_strides: tuple[int, int, int] | list[int] = ...,
    new_key: int = 0,
    new_key_strides: tuple[int, int, int] | list[int] = ...,
    new_value: int = 0,
    new_value_strides: tuple[int, int, int] | list[int] = ...,
    new_key_shape: tuple[int, int, int] | list[int] = ...,
    slot_mapping: int = 0,
    slot_is_i64: bool = False,
    new_rows: int = 0,
    rope_cos_sin: int = 0,
    rope_positions: int = 0,
) -> tuple[int, bool]:
    """GPT-OSS attention with sinks and an optional sliding ``window`` (decode and/or varlen
    kernels) over the paged cache (``cache`` != 0) or plain ``k``/``v`` tensors.
    ``sink_mode``: 0 none, 1 float32, 2 bfloat16, 3 float16. With ``new_key`` != 0 the queries'
    own K/V rows (``new_rows`` slots in ``slot_mapping``) are written into the paged cache too:
    inside the decode launch when no varlen launch is needed, else by ``attn_kv_write`` first.
    ``rope_cos_sin`` != 0 (a float32 ``[rope_positions, 64]`` table; needs ``new_key``) rotates
    the queries and the new keys (GPT-OSS's neox RoPE): in the decode launch, or else by
    ``attn_rope_write`` into ``o`` and the cache first.
    Returns ``(decode_splits, varlen_launched)``."""

def attention_decode_splits(
    ordinal: int,
    num_reqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    window: int | None,
    max_query_len: int,
    workspace_floats: int,
) -> int:
    """The decode split count ``attention_forward`` uses for these sizes on GPU ``ordinal``."""

def attention_workspace_floats(request_splits: int, num_kv_heads: int) -> int:
    """Floats of a split workspace for ``request_splits`` (request, split) pairs."""

def attention_set_overrides(
    splits: int | None = None,
    decode_stages: int | None = None,
    varlen_rows: int | None = None,
    min_keys: int | None = None,
) -> None:
    """Forces the decode split count / decode pipeline stages / varlen tile rows / fewest keys a
    decode split takes at run time (a multiple of 16, 16-4096) for later launches
    (None = automatic). Benchmarking and tuning hook."""

def attention_set_run_min_keys(min_keys: int | None = None) -> None:
    """Sets only the fewest keys a decode split takes at run time (a multiple of 16, 16-4096;
    None = the default, 256), leaving the other overrides alone. A captured CUDA graph keeps
    the value it was captured with."""

def attention_run_min_keys() -> int:
    """The fewest keys a decode split takes at run time, as later launches use it."""

# ---------------------------------------------------------------------------------------------
# fused MoE launchers (src/ops/moe.rs)
# ---------------------------------------------------------------------------------------------

def moe_forward(args: dict[str, Any]) -> str:
    """Launches the GPT-OSS MoE block (route, group, gate_up GEMM + bias + SwiGLU, down GEMM +
    bias, combine) on the fused NF4 experts, on ``args["stream"]``, without the GIL.

    ``args`` keys: ``device``, ``stream``, ``dtype``, ``tokens``, ``hidden``,
    ``intermediate``, ``experts``, ``top_k``, ``x``, ``x_stride``, ``y``, ``route_mode``
    (0 router weights, 1 given logits, 2 given top-k ids/weights), ``router_weight``,
    ``router_bias``, ``router_logits``, ``logits_f32``, ``topk_ids``, ``topk_weights``,
    ``{p}_packed``, ``{p}_absmax``, ``{p}_nested_absmax``, ``{p}_nested_offset``,
    ``{p}_bias``, ``{p}_nested`` (bool) and ``{p}_nnb`` (nested blocks per expert) for
    ``p`` = ``gu`` (gate_up) and ``dn`` (down), ``nested_map``, ``workspace``,
    ``workspace_bytes``, ``weights_order`` (``"rows"`` or ``"chunks"``: the byte order of both
    packed tensors) and optional ``tuning``. Pointers are ints. Returns the regime used:
    ``"decode"``, ``"stream"`` or ``"prefill_m{bm}s{stages}"``. Raises ValueError for bad
    arguments, CudaError for driver failures.
    """

def moe_workspace_bytes(
    tokens: int, hidden: int, intermediate: int, experts: int, top_k: int
) -> int:
    """Workspace bytes ``moe_forward`` needs for ``tokens`` tokens (valid for every GPU and
    regime)."""

def moe_regime(tokens: int, top_k: int, experts: int, tuning: str) -> str:
    """The regime ``moe_forward`` picks for a token count on a tuning (``"sm80"``, ``"sm86"``,
    ``"sm90"``), without touching a GPU."""

def moe_router_logits(
    device: int,
    stream: int,
    dtype: str,
    tokens: int,
    hidden: int,
    experts: int,
    x: int,
    x_stride: int,
    weight: int,
    bias: int,
    bias_act: bool,
    logits: int,
    logits_f32: bool,
    top_k: int = 0,
    topk_ids: int = 0,
    topk_weights: int = 0,
) -> bool:
    """Launches the router logits kernel (src/ops/router.rs) on ``stream``: ``logits [T, E] =
    x weight^T + bias`` with fp32 sums. Pointers are ints (``bias`` 0 = none; ``bias_act``: the
    bias holds ``dtype`` values, else f32). With ``top_k`` > 0 it also routes into i32
    ``topk_ids [T, top_k]`` and f32 ``topk_weights [T, top_k]`` (the MoE op's selection: ties
    to the lower expert, softmax over the selected logits as stored): in the same launch on
    sm_90 with at most 32 experts (returns True), else by a second launch over the stored
    logits (returns False; the same bits). Raises ValueError for bad arguments, CudaError for
    driver failures."""
