"""CI tests (CPU, real vLLM 0.26 from PyPI) of the vLLM plugin glue.

* the ``vllm.general_plugins`` entry point loads through vLLM's own plugin loader;
* :func:`gptoss_3090.vllm.register` registers ``bnb_moe``, the model class, the defaults hook
  (idempotently, without touching CUDA) and nothing at all on an unsupported vLLM version;
* vLLM's real ``ModelConfig._verify_quantization`` picks ``bnb_moe`` for a bnb GPT-OSS checkpoint
  and leaves MXFP4, bf16 and non-GPT-OSS checkpoints alone;
* the checkpoint-name mapping covers tiny checkpoints completely, and bad checkpoints give errors
  naming the tensor;
* the loader fills vLLM's real GPT-OSS model (built on the CPU) byte for byte, and the layers
  compute what bitsandbytes + transformers compute on the same weights.

References are independent of our code: checkpoints are written by bitsandbytes itself
(``tests/bnb_fixtures.py``), dequantization and quantization references are bitsandbytes', the
MoE reference is transformers' ``GptOssExperts`` in fp32.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("bitsandbytes")

import bnb_fixtures as fx  # noqa: E402
import gptoss_3090.vllm as gv  # noqa: E402
from gptoss_3090.vllm import weights as W  # noqa: E402
from gptoss_3090.vllm.quant_config import BnbMoeConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPT_OSS = SimpleNamespace(model_type="gpt_oss", architectures=["GptOssForCausalLM"])
LLAMA = SimpleNamespace(model_type="llama", architectures=["LlamaForCausalLM"])


@pytest.fixture(autouse=True)
def _hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Everything here is local; never wait on the Hub. The model-inspection subprocess of
    # vLLM's registry must import gptoss_3090 too (installed in CI; PYTHONPATH in a checkout).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import gptoss_3090

    # The folder this process imports gptoss_3090 from (site-packages in CI, python/ in a
    # checkout), so child processes see the same build, extension included.
    src = str(Path(gptoss_3090.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    if src not in path.split(os.pathsep):
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (src, path) if p))


class _Records(logging.Handler):
    """Collects records of the plugin logger (vLLM's logger tree does not propagate to root)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# ----------------------------------------------------------------------------------------------
# Entry point and registration
# ----------------------------------------------------------------------------------------------


def _declared_entry_point() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split('[project.entry-points."vllm.general_plugins"]', 1)[1]
    m = re.search(r'^\s*gptoss_3090\s*=\s*"([^"]+)"', section, re.M)
    assert m, "pyproject.toml does not declare the gptoss_3090 vllm.general_plugins entry point"
    return m.group(1)


def test_entry_point_loads_through_vllms_plugin_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata as md

    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    assert _declared_entry_point() == "gptoss_3090.vllm:register"
    installed = [e for e in md.entry_points(group=DEFAULT_PLUGINS_GROUP) if e.name == "gptoss_3090"]
    if installed:  # pip-installed (CI): the real metadata
        assert installed[0].value == "gptoss_3090.vllm:register"
        ep = installed[0]
    else:  # source checkout on PYTHONPATH: the declared value
        ep = md.EntryPoint("gptoss_3090", _declared_entry_point(), DEFAULT_PLUGINS_GROUP)
        real = md.entry_points

        def with_ours(**kw: object) -> md.EntryPoints:
            eps = real(**kw)  # type: ignore[arg-type]
            if kw.get("group") == DEFAULT_PLUGINS_GROUP:
                eps = md.EntryPoints([*eps, ep])
            return eps

        monkeypatch.setattr(md, "entry_points", with_ours)
    monkeypatch.setenv("VLLM_PLUGINS", "gptoss_3090")
    plugins = load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
    assert plugins.get("gptoss_3090") is gv.register


def test_register_is_idempotent_and_registers_everything() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.layers.quantization import (
        QUANTIZATION_METHODS,
        get_quantization_config,
    )
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    gv.register()
    hook = MODELS_CONFIG_MAP["GptOssForCausalLM"]
    gv.register()
    assert QUANTIZATION_METHODS.count("bnb_moe") == 1
    assert get_quantization_config("bnb_moe") is BnbMoeConfig
    entry = ModelRegistry.models["GptOssForCausalLM"]
    assert f"{entry.module_name}:{entry.class_name}" == gv.MODEL_CLASS_PATH
    assert MODELS_CONFIG_MAP["GptOssForCausalLM"] is hook  # not wrapped twice
    assert getattr(hook, "_gptoss_3090_hook", False)
    import importlib.util

    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if importlib.util.find_spec("gptoss_3090.vllm.attention_backend") is not None:
        assert AttentionBackendEnum.CUSTOM.get_path() == gv.ATTENTION_BACKEND_PATH
    assert not torch.cuda.is_initialized(), "register() must not initialise CUDA"


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("0.26.0", True),
        ("0.26.3", True),
        ("0.26.1.dev12+gabcdef", True),
        ("0.26.0rc1", True),
        ("0.25.2", False),
        ("0.27.0", False),
        ("0.2.6", False),
        ("0.260.0", False),
        ("1.26.0", False),
        ("unknown", False),
    ],
)
def test_supported_version_range(version: str, ok: bool) -> None:
    assert gv.is_supported_vllm_version(version) is ok


@pytest.mark.parametrize("version", ["0.25.2", "0.27.0", "dev"])
def test_unsupported_vllm_warns_once_and_registers_nothing(
    monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    calls: list[str] = []
    for name in (
        "_register_quantization",
        "_register_model",
        "_register_attention_backend",
        "_install_defaults_hook",
    ):
        monkeypatch.setattr(gv, name, lambda name=name: calls.append(name))
    monkeypatch.setattr(gv, "_registered", False)
    monkeypatch.setattr(gv, "_warned", False)
    monkeypatch.setattr(gv, "_vllm_version", lambda: version)
    handler = _Records()
    gv.logger.addHandler(handler)
    try:
        gv.register()
        gv.register()
        gv.register()
    finally:
        gv.logger.removeHandler(handler)
    assert calls == []
    warnings = [r for r in handler.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert version in msg and gv.SUPPORTED_VLLM in msg and "NOT registered" in msg


def test_register_warns_once_about_unknown_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPTOSS_3090_* variable the package does not read (a misspelt setting) is named in one
    warning when the plugin registers; known settings are not."""
    for name in (
        "_register_quantization",
        "_register_model",
        "_register_attention_backend",
        "_install_defaults_hook",
    ):
        monkeypatch.setattr(gv, name, lambda: None)
    monkeypatch.setattr(gv, "_vllm_version", lambda: "0.26.0")
    monkeypatch.setenv("GPTOSS_3090_ATTN_ROPES", "vllm")
    monkeypatch.setenv("GPTOSS_3090_PDL", "off")
    handler = _Records()
    gv.logger.addHandler(handler)
    try:
        monkeypatch.setattr(gv, "_registered", False)
        gv.register()
        gv.register()
    finally:
        gv.logger.removeHandler(handler)
    warnings = [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "GPTOSS_3090_ATTN_ROPES is not a setting" in warnings[0]
    assert "GPTOSS_3090_PDL" not in warnings[0]


def test_unsupported_vllm_leaves_vllm_untouched_and_bnb_moe_unknown(tmp_path: Path) -> None:
    """In a fresh process: nothing registered, and asking for bnb_moe fails after our warning."""
    (tmp_path / "config.json").write_text(json.dumps(fx.config_dict(fx.Spec())))
    code = f"""
import gptoss_3090.vllm as gv
gv._vllm_version = lambda: "0.27.1"
gv.register(); gv.register()
from vllm import ModelRegistry
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
print("REGISTERED", "bnb_moe" in QUANTIZATION_METHODS,
      ModelRegistry.models["GptOssForCausalLM"].module_name.startswith("gptoss_3090"),
      getattr(MODELS_CONFIG_MAP["GptOssForCausalLM"], "_gptoss_3090_hook", False))
from vllm.config import ModelConfig
try:
    ModelConfig(model={str(tmp_path)!r}, skip_tokenizer_init=True, max_model_len=64,
                quantization="bnb_moe")
except Exception as e:
    print("ERROR", type(e).__name__, " ".join(str(e).split()))
"""
    # The child must import gptoss_3090 exactly as this process does (installed or in-tree).
    env = dict(os.environ, VLLM_PLUGINS="", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert "REGISTERED False False False" in out.stdout, out.stdout + out.stderr
    error = out.stdout.split("ERROR", 1)[1]
    # vLLM's own error (a bnb checkpoint: name mismatch; bf16: unknown method) names bnb_moe, and
    # our one warning, logged before it, names the supported range.
    assert "(bnb_moe)" in error or "Unknown quantization method: bnb_moe" in error, error
    logs = out.stdout + out.stderr  # vLLM's log handler writes to stdout
    assert logs.count("gptoss-3090 supports vLLM") == 1
    assert f"gptoss-3090 supports vLLM {gv.SUPPORTED_VLLM} but vLLM 0.27.1" in logs


# ----------------------------------------------------------------------------------------------
# The quantization override
# ----------------------------------------------------------------------------------------------


BNB_NF4 = fx.config_dict(fx.Spec())["quantization_config"]


def test_override_claims_bnb_gpt_oss() -> None:
    assert BnbMoeConfig.override_quantization_method(BNB_NF4, None, GPT_OSS) == "bnb_moe"
    assert BnbMoeConfig.override_quantization_method(BNB_NF4, "bnb_moe", GPT_OSS) == "bnb_moe"
    # the user may still ask for vLLM's own bitsandbytes path
    assert BnbMoeConfig.override_quantization_method(BNB_NF4, "bitsandbytes", GPT_OSS) is None


@pytest.mark.parametrize(
    "quant_cfg",
    [
        {"quant_method": "mxfp4"},
        {"quant_method": "gpt_oss_mxfp4"},
        {"quant_method": "fp8", "activation_scheme": "dynamic"},
        {**BNB_NF4, "bnb_4bit_quant_type": "fp4"},
        {**BNB_NF4, "load_in_4bit": False, "_load_in_4bit": False, "load_in_8bit": True},
    ],
)
def test_override_leaves_other_checkpoints_alone(quant_cfg: dict) -> None:
    assert BnbMoeConfig.override_quantization_method(quant_cfg, None, GPT_OSS) is None
    with pytest.raises(ValueError, match="bnb_moe"):
        BnbMoeConfig.override_quantization_method(quant_cfg, "bnb_moe", GPT_OSS)


def test_override_leaves_non_gpt_oss_alone() -> None:
    assert BnbMoeConfig.override_quantization_method(BNB_NF4, None, LLAMA) is None
    assert BnbMoeConfig.override_quantization_method(BNB_NF4, None, None) is None
    with pytest.raises(ValueError, match="GPT-OSS only"):
        BnbMoeConfig.override_quantization_method(BNB_NF4, "bnb_moe", LLAMA)


def test_from_config_and_quantize_at_load_config() -> None:
    cfg = BnbMoeConfig.from_config(BNB_NF4)
    assert cfg.prequantized and cfg.nested and "router" in cfg.skip_modules
    assert cfg.get_name() == "bnb_moe" and BnbMoeConfig.get_min_capability() == 80
    assert BnbMoeConfig.get_config_filenames() == []  # -> BnbMoeConfig() for bf16 checkpoints
    bare = BnbMoeConfig()
    assert not bare.prequantized
    assert bare.linear_is_quantized("model.layers.0.attn.qkv_proj")
    with pytest.raises(ValueError, match="nf4"):
        BnbMoeConfig.from_config({**BNB_NF4, "bnb_4bit_quant_type": "fp4"})


def test_skip_modules_translate_to_vllm_names() -> None:
    cfg = BnbMoeConfig.from_config({**BNB_NF4, "llm_int8_skip_modules": ["self_attn", "router"]})
    assert not cfg.linear_is_quantized("model.layers.3.attn.qkv_proj")
    assert not cfg.linear_is_quantized("model.layers.3.attn.o_proj")
    cfg = BnbMoeConfig.from_config(
        {**BNB_NF4, "llm_int8_skip_modules": ["model.layers.1.self_attn.o_proj"]}
    )
    assert cfg.linear_is_quantized("model.layers.1.attn.qkv_proj")
    assert not cfg.linear_is_quantized("model.layers.1.attn.o_proj")
    assert cfg.linear_is_quantized("model.layers.11.attn.o_proj")
    cfg = BnbMoeConfig.from_config(
        {**BNB_NF4, "llm_int8_skip_modules": [r"model.layers.\d+.self_attn.(q|k|v)_proj"]}
    )
    assert not cfg.linear_is_quantized("model.layers.7.attn.qkv_proj")  # transformers 5 regex
    assert cfg.linear_is_quantized("model.layers.7.attn.o_proj")
    # the files decide over the list when they could be scanned
    cfg.quantized_bases = frozenset({"model.layers.1.self_attn.o_proj.weight"})
    assert cfg.linear_is_quantized("model.layers.1.attn.o_proj")
    assert not cfg.linear_is_quantized("model.layers.1.attn.qkv_proj")


# ----------------------------------------------------------------------------------------------
# vLLM's real config resolution
# ----------------------------------------------------------------------------------------------


def _config_dir(tmp_path: Path, name: str, config: dict) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def _model_config(path: Path, quantization: str | None = None, **kw: object):
    from vllm.config import ModelConfig

    return ModelConfig(
        model=str(path),
        skip_tokenizer_init=True,
        max_model_len=256,
        dtype="bfloat16",
        quantization=quantization,
        **kw,
    )


def _plain_config() -> dict:
    cfg = fx.config_dict(fx.Spec())
    del cfg["quantization_config"]
    return cfg


def test_vllm_resolves_quantization(tmp_path: Path) -> None:
    gv.register()
    bnb = _config_dir(tmp_path, "bnb", fx.config_dict(fx.Spec()))
    assert _model_config(bnb).quantization == "bnb_moe"
    assert _model_config(bnb, "bnb_moe").quantization == "bnb_moe"
    assert _model_config(bnb, "bitsandbytes").quantization == "bitsandbytes"
    mxfp4 = _config_dir(
        tmp_path, "mxfp4", {**_plain_config(), "quantization_config": {"quant_method": "mxfp4"}}
    )
    assert _model_config(mxfp4).quantization == "gpt_oss_mxfp4"
    with pytest.raises(ValueError, match="mxfp4"):
        _model_config(mxfp4, "bnb_moe")
    bf16 = _config_dir(tmp_path, "bf16", _plain_config())
    assert _model_config(bf16).quantization is None
    assert _model_config(bf16, "bnb_moe").quantization == "bnb_moe"


def test_vllm_config_quantize_at_load_and_24gib_defaults(tmp_path: Path) -> None:
    from vllm.config import CompilationConfig, DeviceConfig, VllmConfig

    gv.register()
    bnb = _config_dir(tmp_path, "bnb", fx.config_dict(fx.Spec()))
    bf16 = _config_dir(tmp_path, "bf16", _plain_config())

    def vllm_config(path: Path, quant: str | None, **cc: object) -> VllmConfig:
        return VllmConfig(
            model_config=_model_config(path, quant),
            device_config=DeviceConfig("cpu"),
            compilation_config=CompilationConfig(**cc),
        )

    vc = vllm_config(bnb, None)
    assert isinstance(vc.quant_config, BnbMoeConfig) and vc.quant_config.prequantized
    # no GPU here: unknown budget -> the small-card cap, not GPT-OSS's 1024
    assert vc.compilation_config.max_cudagraph_capture_size == 256
    assert (
        vllm_config(
            bnb, None, max_cudagraph_capture_size=64
        ).compilation_config.max_cudagraph_capture_size
        == 64
    )  # noqa: E501
    q = vllm_config(bf16, "bnb_moe")
    assert isinstance(q.quant_config, BnbMoeConfig) and not q.quant_config.prequantized
    stock = vllm_config(bf16, None)
    assert stock.quant_config is None
    assert stock.compilation_config.max_cudagraph_capture_size == 1024  # vLLM's GPT-OSS default


def test_bnb_moe_refuses_other_models(tmp_path: Path) -> None:
    gv.register()
    llama = _config_dir(
        tmp_path,
        "llama",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "num_key_value_heads": 2,
            "vocab_size": 128,
            "max_position_embeddings": 256,
            "quantization_config": dict(BNB_NF4),
        },
    )
    with pytest.raises(ValueError, match="GPT-OSS only"):
        _model_config(llama, "bnb_moe")
    assert _model_config(llama).quantization == "bitsandbytes"  # untouched


def test_defaults_functions() -> None:
    from gptoss_3090.vllm import defaults as d

    gib = 1 << 30
    assert d.max_capture_size_for_budget(None) == d.SMALL_CAPTURE_MAX
    assert d.max_capture_size_for_budget(int(24 * gib * 0.9)) == d.SMALL_CAPTURE_MAX
    assert d.max_capture_size_for_budget(int(80 * gib * 0.29)) == d.SMALL_CAPTURE_MAX
    assert d.max_capture_size_for_budget(int(80 * gib * 0.85)) > d.SMALL_CAPTURE_MAX
    assert d.moe_chunk_tokens(int(24 * gib * 0.9)) < d.moe_chunk_tokens(int(80 * gib * 0.85))


# ----------------------------------------------------------------------------------------------
# Name mapping and completeness
# ----------------------------------------------------------------------------------------------


def _dims(spec: fx.Spec) -> W.GptOssDims:
    return W.GptOssDims.from_hf_config(fx.config_dict(spec))


SPECS = {
    "nested": fx.Spec(),
    "flat": fx.Spec(nested=False),
    "plain_attention": fx.Spec(attention="plain"),
    "fp16": fx.Spec(dtype=torch.float16, seed=3),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_mapping_covers_tiny_checkpoint_completely(name: str) -> None:
    spec = SPECS[name]
    tensors = fx.build_tensors(spec)
    plan = W.plan_checkpoint(tensors, _dims(spec))
    assert plan.missing == [] and plan.unexpected == []
    plan.raise_if_incomplete()
    used = [r.key for _, r in plan.items] + [c for _, r in plan.items for c in r.companions]
    assert sorted(used) == sorted(tensors), "every key consumed exactly once"
    d = _dims(spec)
    per_layer = 3 + 3 * 2 + 2 + 2 + 4 * d.num_experts
    assert len(plan.items) == 3 + d.num_layers * per_layer
    weights = [(t, r) for t, r in plan.items if t.kind is not W.Kind.DENSE]
    nf4 = {t.name for t, r in weights if r.fmt == "nf4"}
    if spec.attention == "nf4":
        assert nf4 == {t.name for t, _ in weights}
    else:
        assert all(".self_attn." not in n for n in nf4)
    routers = [t for t, r in plan.items if "router" in t.dest]
    assert all(
        r.key.endswith(("router.linear.weight", "router.linear.bias"))
        for t, r in plan.items
        if t in routers
    )  # noqa: E501


def _synth(tmp_path_factory: pytest.TempPathFactory, **kw: object) -> Path:
    synth = pytest.importorskip("gptoss_3090.synth")
    out = tmp_path_factory.mktemp("synth")
    return synth.write_synthetic_checkpoint(out / "tiny", "tiny", progress=False, **kw)


@pytest.fixture(scope="module")
def synth_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synth(tmp_path_factory)


def test_mapping_covers_synth_tiny_and_its_reference(synth_tiny: Path) -> None:
    dims = W.GptOssDims.from_hf_config(json.loads((synth_tiny / "config.json").read_text()))
    plan = W.plan_checkpoint(W.SafetensorsDir(synth_tiny).keys(), dims)
    assert plan.missing == [] and plan.unexpected == []
    assert plan.quantized_fraction == 1.0
    ref = W.plan_checkpoint(W.SafetensorsDir(synth_tiny / "reference").keys(), dims)
    assert ref.missing == [] and ref.unexpected == []
    assert ref.quantized_fraction == 0.0
    fused = {r.key for _, r in ref.items if r.fmt == "fused"}
    assert fused == {
        f"model.layers.{n}.mlp.experts.{p}"
        for n in range(dims.num_layers)
        for p in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    }


# ----------------------------------------------------------------------------------------------
# Bad checkpoints
# ----------------------------------------------------------------------------------------------


def _tiny_tensors() -> dict[str, torch.Tensor]:
    return fx.build_tensors(fx.Spec())


def _plan_error(tensors: dict[str, torch.Tensor]) -> str:
    plan = W.plan_checkpoint(tensors, _dims(fx.Spec()))
    with pytest.raises(W.CheckpointError) as e:
        plan.raise_if_incomplete("ckpt")
    return str(e.value)


def test_missing_expert_is_named() -> None:
    t = _tiny_tensors()
    gone = "model.layers.1.mlp.experts.gate_up_projs.3.weight"
    for k in [k for k in t if k.startswith(gone)]:
        del t[k]
    msg = _plan_error(t)
    assert repr(gone) in msg and "missing" in msg


def test_unexpected_tensors_are_named() -> None:
    t = _tiny_tensors()
    t["model.layers.0.mlp.experts.gate_up_projs.99.weight"] = torch.zeros(1)
    t["model.layers.0.self_attn.rotary.inv_freq"] = torch.zeros(1)
    msg = _plan_error(t)
    assert "'model.layers.0.mlp.experts.gate_up_projs.99.weight'" in msg
    assert "'model.layers.0.self_attn.rotary.inv_freq'" in msg and "unexpected" in msg


def test_missing_quant_companion_and_router_are_named() -> None:
    t = _tiny_tensors()
    del t["model.layers.0.self_attn.k_proj.weight.absmax"]
    del t["model.layers.1.mlp.experts.down_projs.2.weight.nested_quant_map"]
    del t["model.layers.1.mlp.router.linear.weight"]
    msg = _plan_error(t)
    assert "'model.layers.0.self_attn.k_proj.weight.absmax'" in msg
    assert "'model.layers.1.mlp.experts.down_projs.2.weight.nested_quant_map'" in msg
    assert "'model.layers.1.mlp.router.linear.weight'" in msg


class _Dict:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.t = tensors

    def tensor(self, key: str) -> torch.Tensor:
        return self.t[key]


def _qs(tensors: dict[str, torch.Tensor], key: str) -> dict:
    raw = tensors[f"{key}.quant_state.bitsandbytes__nf4"]
    return json.loads(bytes(raw.tolist()).decode())


def _with_qs(tensors: dict[str, torch.Tensor], key: str, obj: dict) -> None:
    data = json.dumps(obj).encode()
    tensors[f"{key}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(data), dtype=torch.uint8)


KEY = "model.layers.0.mlp.experts.gate_up_projs.1.weight"
SHAPE = (640, 320)


@pytest.mark.parametrize(
    ("corrupt", "expect"),
    [
        (lambda t: _with_qs(t, KEY, {**_qs(t, KEY), "quant_type": "fp4"}), "nf4"),
        (lambda t: _with_qs(t, KEY, {**_qs(t, KEY), "blocksize": 128}), "blocksize 64"),
        (lambda t: _with_qs(t, KEY, {**_qs(t, KEY), "shape": [320, 640]}), "expected shape"),
        (lambda t: _with_qs(t, KEY, {**_qs(t, KEY), "nested_blocksize": 128}), "nested_blocksize"),
        (
            lambda t: t.__setitem__(
                f"{KEY}.quant_state.bitsandbytes__nf4", torch.tensor([123, 1], dtype=torch.uint8)
            ),  # noqa: E501
            "JSON",
        ),
        (lambda t: t.__setitem__(KEY, t[KEY][:-1]), "elements"),
        (lambda t: t.__setitem__(f"{KEY}.absmax", t[f"{KEY}.absmax"].float()), "absmax"),
        (lambda t: t.__setitem__(f"{KEY}.quant_map", torch.linspace(-1, 1, 16)), "NF4 code table"),
    ],
)
def test_bad_nf4_tensors_are_named(corrupt, expect: str) -> None:
    t = _tiny_tensors()
    corrupt(t)
    with pytest.raises(W.CheckpointError, match=re.escape(expect)) as e:
        W.read_nf4_parts(_Dict(t), KEY, SHAPE)
    assert KEY in str(e.value)


def test_read_nf4_parts_matches_bitsandbytes_bytes() -> None:
    t = _tiny_tensors()
    parts = W.read_nf4_parts(_Dict(t), KEY, SHAPE)
    assert torch.equal(parts.packed, t[KEY].reshape(-1))
    assert torch.equal(parts.absmax, t[f"{KEY}.absmax"])
    assert parts.nested_offset == _qs(t, KEY)["nested_offset"]
    deq = W.dequantize_nf4_cpu(
        parts.packed,
        parts.absmax,
        SHAPE,
        torch.bfloat16,
        parts.nested_absmax,
        parts.nested_quant_map,
        parts.nested_offset,
    )
    assert torch.equal(deq, fx.bnb_dequantize(t, KEY))
    flat = W.expand_nested_absmax(parts)
    assert torch.equal(
        W.dequantize_nf4_cpu(parts.packed, flat, SHAPE, torch.bfloat16), fx.bnb_dequantize(t, KEY)
    )


# ----------------------------------------------------------------------------------------------
# vLLM's real GPT-OSS model on the CPU
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cpu_vllm():
    """vLLM without a GPU: the plugin registered, a 1-process gloo group, and TRITON_ATTN forced
    for Attention layers (vLLM's CPU-less 'unspecified' platform selects no backend)."""
    gv.register()
    import vllm.model_executor.layers.attention.attention as attn_mod
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    mp = pytest.MonkeyPatch()
    mp.setattr(attn_mod, "get_attn_backend", lambda *a, **k: TritonAttentionBackend)
    yield
    mp.undo()


def _build(path: Path, quantization: str | None = None):
    from gptoss_3090.vllm.model import GptOssBnbForCausalLM
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )

    vc = VllmConfig(
        model_config=_model_config(path, quantization, enforce_eager=True),
        device_config=DeviceConfig("cpu"),
    )
    old = torch.get_default_dtype()
    with set_current_vllm_config(vc):
        if not model_parallel_is_initialized():
            init_distributed_environment(
                world_size=1,
                rank=0,
                distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
                local_rank=0,
                backend="gloo",
            )
            initialize_model_parallel(1, 1)
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = GptOssBnbForCausalLM(vllm_config=vc)
        finally:
            torch.set_default_dtype(old)
    return model, vc


def _load(model, vc) -> set[str]:
    """What vLLM's DefaultModelLoader.load_model does after building the model."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    loader = DefaultModelLoader(vc.load_config)
    with set_current_vllm_config(vc):
        names = model.load_weights(loader.get_all_weights(vc.model_config, model))
        loader.load_weights(model, vc.model_config)  # the real entry point, once more
        assert 0 < loader.counter_before_loading_weights <= loader.counter_after_loading_weights
        assert loader.counter_after_loading_weights - loader.counter_before_loading_weights < 600
        process_weights_after_loading(model, vc.model_config, torch.device("cpu"))
    return names


@pytest.fixture(scope="module", params=sorted(SPECS))
def loaded(request, cpu_vllm, tmp_path_factory):
    spec = SPECS[request.param]
    path, tensors = fx.write_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", spec)
    model, vc = _build(path)
    names = _load(model, vc)
    return SimpleNamespace(spec=spec, tensors=tensors, model=model, vc=vc, names=names)


def test_loads_every_parameter_byte_for_byte(loaded) -> None:
    spec, t, model = loaded.spec, loaded.tensors, loaded.model
    params = dict(model.named_parameters())
    assert loaded.names == set(params)
    assert model._bnb_moe
    for n in range(spec.layers):
        hf, vl = f"model.layers.{n}", f"model.layers.{n}"
        ex = model.get_submodule(f"{vl}.mlp.experts.routed_experts")
        for e in range(spec.experts):
            for proj, name in (("w13", "gate_up_projs"), ("w2", "down_projs")):
                key = f"{hf}.mlp.experts.{name}.{e}.weight"
                assert torch.equal(getattr(ex, f"{proj}_qweight")[e], t[key].reshape(-1))
                assert torch.equal(getattr(ex, f"{proj}_absmax")[e], t[f"{key}.absmax"])
                if spec.nested:
                    assert torch.equal(
                        getattr(ex, f"{proj}_nested_absmax")[e], t[f"{key}.nested_absmax"]
                    )
                    assert getattr(ex, f"{proj}_nested_offset")[e].item() == pytest.approx(
                        _qs(t, key)["nested_offset"], abs=0
                    )
                bias = t[f"{hf}.mlp.experts.{name}.{e}.bias"].float()
                assert torch.equal(getattr(ex, f"{proj}_bias")[e], bias)
        qkv = model.get_submodule(f"{vl}.attn.qkv_proj")
        if spec.attention == "nf4":
            packed = torch.cat([t[f"{hf}.self_attn.{s}_proj.weight"].reshape(-1) for s in "qkv"])
            assert torch.equal(qkv.qweight, packed)
        else:
            w = torch.cat([t[f"{hf}.self_attn.{s}_proj.weight"] for s in "qkv"])
            assert torch.equal(qkv.weight, w.to(qkv.weight.dtype))
        bias = torch.cat([t[f"{hf}.self_attn.{s}_proj.bias"] for s in "qkv"])
        assert torch.equal(qkv.bias, bias.to(qkv.bias.dtype))
        assert torch.equal(
            params[f"{vl}.mlp.router.weight"],
            t[f"{hf}.mlp.router.linear.weight"].to(torch.bfloat16),
        )  # noqa: E501
        assert torch.equal(
            params[f"{vl}.attn.sinks"], t[f"{hf}.self_attn.sinks"].to(torch.bfloat16)
        )  # noqa: E501
    assert torch.equal(
        params["model.embedding.weight"], t["model.embed_tokens.weight"].to(torch.bfloat16)
    )  # noqa: E501
    assert torch.equal(params["lm_head.weight"], t["lm_head.weight"].to(torch.bfloat16))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def test_attention_projections_match_bitsandbytes(loaded) -> None:
    spec, t, model = loaded.spec, loaded.tensors, loaded.model
    g = torch.Generator().manual_seed(1234)
    for n in range(spec.layers):
        hf = f"model.layers.{n}.self_attn"
        x = torch.randn(7, spec.hidden, generator=g).to(torch.bfloat16)

        def weight(s: str, hf: str = hf) -> torch.Tensor:
            key = f"{hf}.{s}_proj.weight"
            return fx.bnb_dequantize(t, key) if spec.attention == "nf4" else t[key]

        w = torch.cat([weight(s) for s in "qkv"]).float()
        b = torch.cat([t[f"{hf}.{s}_proj.bias"] for s in "qkv"]).float()
        out, _ = model.get_submodule(f"model.layers.{n}.attn.qkv_proj")(x)
        assert _rel_err(out, x.float() @ w.T + b) < 1e-2
        xo = torch.randn(7, spec.heads * spec.head_dim, generator=g).to(torch.bfloat16)
        out, _ = model.get_submodule(f"model.layers.{n}.attn.o_proj")(xo)
        ref = xo.float() @ weight("o").float().T + t[f"{hf}.o_proj.bias"].float()
        assert _rel_err(out, ref) < 1e-2


def test_experts_match_transformers(loaded) -> None:
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    spec, t, model = loaded.spec, loaded.tensors, loaded.model
    cfg = GptOssConfig(
        **{k: v for k, v in fx.config_dict(spec).items() if k != "quantization_config"}
    )  # noqa: E501
    g = torch.Generator().manual_seed(99)
    for n in range(spec.layers):
        hf = f"model.layers.{n}.mlp.experts"
        ref = GptOssExperts(cfg).float()
        with torch.no_grad():
            for e in range(spec.experts):
                ref.gate_up_proj[e] = (
                    fx.bnb_dequantize(t, f"{hf}.gate_up_projs.{e}.weight").float().T
                )  # noqa: E501
                ref.gate_up_proj_bias[e] = t[f"{hf}.gate_up_projs.{e}.bias"].float()
                ref.down_proj[e] = fx.bnb_dequantize(t, f"{hf}.down_projs.{e}.weight").float().T
                ref.down_proj_bias[e] = t[f"{hf}.down_projs.{e}.bias"].float()
        x = torch.randn(9, spec.hidden, generator=g)
        logits = torch.randn(9, spec.experts, generator=g)
        vals, ids = torch.topk(logits, spec.experts_per_token, dim=-1)
        wts = torch.softmax(vals, dim=-1)
        with torch.no_grad():
            want = ref(x, ids, wts)
        routed = model.get_submodule(f"model.layers.{n}.mlp.experts.routed_experts")
        got = routed.quant_method.apply(
            layer=routed,
            x=x.to(torch.bfloat16),
            topk_weights=wts,
            topk_ids=ids.to(torch.int32),
            shared_experts=None,
            shared_experts_input=None,
        )
        assert got.dtype == torch.bfloat16 and got.shape == x.shape
        assert _rel_err(got, want) < 2e-2


def _vllm_then_monolithic(
    method, routed, x: torch.Tensor, wts: torch.Tensor, ids: torch.Tensor, router_out
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``method.apply`` given vLLM-style routing, then ``apply_monolithic`` given the router
    layer's output, whole and in chunks of 4 tokens."""
    with torch.no_grad():
        via_vllm = method.apply(
            layer=routed,
            x=x,
            topk_weights=wts,
            topk_ids=ids.to(torch.int32),
            shared_experts=None,
            shared_experts_input=None,
        )
        whole = method.apply_monolithic(routed, x, router_out)
        chunk, method._chunk = method._chunk, 4  # 11 tokens in chunks of 4, 4, 3
        try:
            chunked = method.apply_monolithic(routed, x, router_out)
        finally:
            method._chunk = chunk
    return via_vllm, whole, chunked


def test_internal_routing_matches_vllms_routing(loaded) -> None:
    """``apply_monolithic`` (``GPTOSS_3090_MOE_ROUTING=internal``: we route from the router
    logits) gives what vLLM's own routing (top-k, softmax over the k) followed by ``apply`` gives,
    also when the tokens are split into chunks."""
    spec, model = loaded.spec, loaded.model
    routed = model.get_submodule("model.layers.0.mlp.experts.routed_experts")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(11, spec.hidden, generator=g).to(torch.bfloat16)
    logits = torch.randn(11, spec.experts, generator=g)
    vals, ids = torch.topk(logits, spec.experts_per_token, dim=-1)
    via_vllm, via_ours, chunked = _vllm_then_monolithic(
        routed.quant_method, routed, x, torch.softmax(vals, dim=-1), ids, logits
    )
    assert torch.equal(via_ours, via_vllm)
    assert torch.equal(chunked, via_vllm)


def test_packed_router_routing_matches_vllms_routing(loaded) -> None:
    """``apply_monolithic`` given our router's packed top-k (``GPTOSS_3090_MOE_ROUTING=router``:
    int32 from ``moe_router_topk``) uses those ids and weights: the same block as vLLM's
    routing followed by ``apply``, also in chunks."""
    from gptoss_3090 import moe as M

    spec, model = loaded.spec, loaded.model
    routed = model.get_submodule("model.layers.0.mlp.experts.routed_experts")
    g = torch.Generator().manual_seed(8)
    t, e, k = 11, spec.experts, spec.experts_per_token
    x = torch.randn(t, spec.hidden, generator=g).to(torch.bfloat16)
    logits = torch.randn(t, e, generator=g).to(torch.bfloat16)
    vals, ids = torch.topk(logits.float(), k, dim=-1)
    wts = torch.softmax(vals, dim=-1)
    packed = torch.empty(t, M.router_topk_width(e, k), dtype=torch.int32)
    p_ids, p_wts, p_logits = M.router_topk_unpack(packed, e, k)
    p_ids.copy_(ids)
    p_wts.copy_(wts)
    p_logits.copy_(logits)
    via_vllm, via_packed, chunked = _vllm_then_monolithic(
        routed.quant_method, routed, x, wts, ids, packed
    )
    assert torch.equal(via_packed, via_vllm)
    assert torch.equal(chunked, via_vllm)
    with pytest.raises(ValueError, match="router top-k"):
        routed.quant_method.apply_monolithic(routed, x, packed[:, 1:].contiguous())


def test_moe_routing_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPTOSS_3090_MOE_ROUTING picks where routing happens: ``vllm`` (default), ``router`` (which
    needs our router layer, so GPTOSS_3090_ROUTER=vllm turns it into ``vllm``) or
    ``internal``; unknown values are errors naming the variable. Only ``router`` gives the
    router method a top-k."""
    from gptoss_3090.vllm import linear_method as LM

    monkeypatch.delenv("GPTOSS_3090_ROUTER", raising=False)
    monkeypatch.delenv("GPTOSS_3090_REFERENCE_KERNELS", raising=False)
    monkeypatch.delenv("GPTOSS_3090_MOE_ROUTING", raising=False)
    assert LM.moe_routing() == "vllm"
    assert LM.router_method(4).top_k == 0
    monkeypatch.setenv("GPTOSS_3090_MOE_ROUTING", "router")
    assert LM.moe_routing() == "router"
    assert LM.router_method(4).top_k == 4
    for mode in ("vllm", "internal"):
        monkeypatch.setenv("GPTOSS_3090_MOE_ROUTING", mode)
        assert LM.moe_routing() == mode
        assert LM.router_method(4).top_k == 0
    monkeypatch.setenv("GPTOSS_3090_MOE_ROUTING", "router")
    monkeypatch.setenv("GPTOSS_3090_ROUTER", "vllm")
    assert LM.moe_routing() == "vllm" and LM.router_method(4) is None
    monkeypatch.setenv("GPTOSS_3090_MOE_ROUTING", "topk")
    with pytest.raises(ValueError, match="GPTOSS_3090_MOE_ROUTING"):
        LM.moe_routing()
    # On a CPU tensor the method computes plain logits (vLLM's path), whatever its top-k.
    monkeypatch.delenv("GPTOSS_3090_ROUTER")
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(8, 16), requires_grad=False)
    out = LM.RouterLinearMethod(4).apply(layer, torch.randn(3, 16))
    assert out.shape == (3, 8) and out.dtype == torch.float32


def test_kernel_weights_reorder_experts_once_and_the_reference_follows(
    loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What process_weights_after_loading does on a GPU, run on the CPU layer: the experts'
    packed bytes are reordered in place into the kernels' chunk-major order exactly once (a
    second call only marks the weights), and the torch reference path still computes the same
    block from the reordered buffers."""
    from gptoss_3090 import moe as M
    from gptoss_3090.vllm import moe_method as MM

    spec, model = loaded.spec, loaded.model
    routed = model.get_submodule("model.layers.0.mlp.experts.routed_experts")
    originals = {p: getattr(routed, f"{p}_qweight").detach().clone() for p in ("w13", "w2")}
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, spec.hidden, generator=g).to(torch.bfloat16)
    vals, ids = torch.topk(torch.randn(6, spec.experts, generator=g), spec.experts_per_token, -1)
    wts, ids = torch.softmax(vals, dim=-1), ids.to(torch.int32)
    with torch.no_grad():
        before = MM.moe_reference(x, routed, wts, ids)
    try:
        monkeypatch.setenv(MM.WEIGHTS_ORDER_ENV, "rows")
        assert MM._make_kernel_weights(routed).order == "rows"
        assert torch.equal(routed.w13_qweight, originals["w13"])
        monkeypatch.setenv(MM.WEIGHTS_ORDER_ENV, "chunks")
        w = MM._make_kernel_weights(routed)
        assert w.order == "chunks" and routed.gptoss_weights_order == "chunks"
        for p, t in (("w13", w.gate_up), ("w2", w.down)):
            _, n, k = t.shape
            want = M.chunk_major_packed(originals[p], n, k, gate_up_pairs=p == "w13")
            assert torch.equal(getattr(routed, f"{p}_qweight"), want)
            assert t.packed.data_ptr() == getattr(routed, f"{p}_qweight").data_ptr()
        once = routed.w13_qweight.detach().clone()
        again = MM._make_kernel_weights(routed)  # already reordered: marked, not reordered twice
        assert again.order == "chunks"
        assert torch.equal(routed.w13_qweight, once)
        with torch.no_grad():
            assert torch.equal(MM.moe_reference(x, routed, wts, ids), before)
        monkeypatch.setenv(MM.WEIGHTS_ORDER_ENV, "columns")
        routed.gptoss_weights_order = "rows"
        with pytest.raises(ValueError, match="GPTOSS_3090_MOE_WEIGHTS_ORDER"):
            MM._make_kernel_weights(routed)
    finally:
        with torch.no_grad():
            for p, t in originals.items():
                getattr(routed, f"{p}_qweight").copy_(t)
        routed.gptoss_weights_order = "rows"


def test_bad_checkpoint_gives_clear_error_at_load(cpu_vllm, tmp_path: Path) -> None:
    spec = fx.Spec()
    tensors = fx.build_tensors(spec)
    gone = "model.layers.1.mlp.experts.down_projs.2.weight"
    for k in [k for k in tensors if k.startswith(gone)]:
        del tensors[k]
    path = fx.save_checkpoint(tmp_path / "broken", tensors, fx.config_dict(spec))
    model, vc = _build(path)
    with pytest.raises(W.CheckpointError, match=re.escape(gone)):
        _load(model, vc)


@pytest.mark.parametrize("ours", [True, False])
def test_rope_moves_into_our_attention(
    cpu_vllm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ours: bool
) -> None:
    """With our attention backend every layer hands its rotary module to the attention impl
    (GPTOSS_3090_ATTN_ROPE=fold, the default), so forward skips vLLM's rotary op; with
    TRITON_ATTN, or GPTOSS_3090_ATTN_ROPE=vllm, the layer keeps it."""
    import vllm.model_executor.layers.attention.attention as attn_mod
    from gptoss_3090.vllm import attention_backend as AB

    if ours:
        monkeypatch.setattr(
            attn_mod, "get_attn_backend", lambda *a, **k: AB.GptOssSinkAttentionBackend
        )
    spec = fx.Spec()
    path = fx.save_checkpoint(tmp_path / "ck", fx.build_tensors(spec), fx.config_dict(spec))
    for fold in (True, False):
        monkeypatch.setattr(AB, "_FOLD_ROPE", fold)
        model, _ = _build(path)
        for n in range(spec.layers):
            attn = model.get_submodule(f"model.layers.{n}.attn")
            assert attn.rope_in_attention is (ours and fold)
            rotary = getattr(attn.attn.impl, "_rotary", None)
            assert rotary is (attn.rotary_emb if ours and fold else None)


def test_graph_settings_key_vllms_compile_cache(
    cpu_vllm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's compile cache key (VllmConfig.compute_hash, which both its Inductor cache and its
    AOT-compiled Dynamo graph use) changes with our settings that choose the traced ops, so an
    engine never replays a graph traced under another GPTOSS_3090_ATTN_ROPE (or routing) value;
    paths and benchmark metadata do not change it."""
    from gptoss_3090.vllm import model as M

    spec = fx.Spec()
    path = fx.save_checkpoint(tmp_path / "ck", fx.build_tensors(spec), fx.config_dict(spec))
    for name in [n for n in os.environ if n.startswith("GPTOSS_3090_")]:
        monkeypatch.delenv(name)

    def key(**env: str) -> str:
        with monkeypatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            model, vc = _build(path)
        assert model._bnb_moe
        assert vc.additional_config[M.COMPILE_KEY] == M.graph_settings(env)
        return vc.compute_hash()

    key()  # the first model built in a process leaves vLLM's compilation_config hashing apart
    default = key()
    assert key() == default
    assert key(GPTOSS_3090_ATTN_ROPE="vllm") != default
    assert key(GPTOSS_3090_MOE_ROUTING="router") != default
    assert key(GPTOSS_3090_ATTN_ROPE="vllm") != key(GPTOSS_3090_MOE_ROUTING="router")
    paths = {"GPTOSS_3090_CACHE": str(tmp_path), "GPTOSS_3090_KERNEL_DIR": str(tmp_path)}
    assert key(GPTOSS_3090_GIT_COMMIT="abc", GPTOSS_3090_PRECOMPILE="off", **paths) == default
    # Only our variables count.
    settings = M.graph_settings({"GPTOSS_3090_ATTN_ROPE": "vllm", "VLLM_X": "1", "OTHER": "x"})
    assert set(settings) == {"GPTOSS_3090_ATTN_ROPE", "version"}


def test_served_kernel_families_follow_the_built_model(
    cpu_vllm, synth_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The families the plugin compiles while the weights load are the ones the built model
    launches: the MoE's (by weight order and dtype), the router's, nf4 for NF4 linears or
    quantize at load; attention only with our backend (never on this CPU-only machine). On a machine
    without a GPU nothing starts, and GPTOSS_3090_PRECOMPILE=off starts nothing anywhere."""
    from gptoss_3090.vllm import model as M
    from gptoss_3090.vllm.linear_method import Nf4LinearMethod

    for name in [n for n in os.environ if n.startswith("GPTOSS_3090_")]:
        monkeypatch.delenv(name)
    model, _ = _build(synth_tiny)
    nf4_linears = any(
        isinstance(getattr(m, "quant_method", None), Nf4LinearMethod) for m in model.modules()
    )
    assert nf4_linears  # the tiny synth quantizes q/k/v/o
    assert M.served_kernel_families(model) == ["nf4", "moe_chunks"]
    with monkeypatch.context() as mp:  # a float16 model runs the MoE's fp16 programs
        mp.setattr(model.vllm_config.model_config, "dtype", torch.float16)
        assert M.served_kernel_families(model) == ["nf4", "moe_chunks_f16"]
    with monkeypatch.context() as mp:
        mp.setenv("GPTOSS_3090_MOE_WEIGHTS_ORDER", "rows")
        mp.setenv("GPTOSS_3090_ROUTER", "vllm")
        rows, _ = _build(synth_tiny)
        assert M.served_kernel_families(rows) == ["nf4", "moe"]
        mp.setenv("GPTOSS_3090_REFERENCE_KERNELS", "1")
        reference, _ = _build(synth_tiny)
        assert M.served_kernel_families(reference) == []
    # The bf16 reference quantizes at load: nf4 even where no layer would keep NF4 linears.
    at_load, vc = _build(synth_tiny / "reference", "bnb_moe")
    assert not vc.quant_config.prequantized
    assert "nf4" in M.served_kernel_families(at_load)
    assert M.start_kernel_compile(model) is None  # no GPU here
    monkeypatch.setenv(M.PRECOMPILE_ENV, "off")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert M.start_kernel_compile(model) is None


def test_quantize_at_load_reproduces_synth_codes(cpu_vllm, synth_tiny: Path) -> None:
    """The bf16 reference/ served with --quantization bnb_moe: quantized at load (bitsandbytes'
    quantizer on the CPU here; ours on a GPU) to the codes of the NF4 checkpoint it came from,
    except where bf16 rounding moves a value across a code boundary."""
    ref = synth_tiny / "reference"
    model, vc = _build(ref, "bnb_moe")
    assert not vc.quant_config.prequantized
    _load(model, vc)
    nf4 = W.SafetensorsDir(synth_tiny)
    dims = W.GptOssDims.from_hf_config(json.loads((synth_tiny / "config.json").read_text()))
    same = total = 0
    for n in range(dims.num_layers):
        ex = model.get_submodule(f"model.layers.{n}.mlp.experts.routed_experts")
        for e in range(dims.num_experts):
            for proj, name in (("w13", "gate_up_projs"), ("w2", "down_projs")):
                key = f"model.layers.{n}.mlp.experts.{name}.{e}.weight"
                want = nf4.tensor(key).reshape(-1)
                got = getattr(ex, f"{proj}_qweight")[e]
                same += int((got == want).sum())
                total += want.numel()
                deq_want = fx.bnb_dequantize(
                    {k: nf4.tensor(k) for k in nf4.keys() if k.startswith(key)}, key
                )  # noqa: E501
                layout = ex.nf4_layouts[proj]
                deq_got = W.dequantize_nf4_cpu(
                    got,
                    getattr(ex, f"{proj}_absmax")[e],
                    (layout.rows[0], layout.cols),
                    torch.bfloat16,
                    getattr(ex, f"{proj}_nested_absmax")[e],
                    getattr(ex, f"{proj}_nested_quant_map"),
                    getattr(ex, f"{proj}_nested_offset")[e].reshape(()),
                )
                assert _rel_err(deq_got, deq_want) < 2e-2
        qkv = model.get_submodule(f"model.layers.{n}.attn.qkv_proj")
        assert hasattr(qkv, "nf4_layout")  # q/k/v are quantized at load too
    assert same / total > 0.99


def test_stock_bf16_gpt_oss_is_served_by_vllms_own_path(cpu_vllm, synth_tiny: Path) -> None:
    """With the plugin installed, a bf16 GPT-OSS checkpoint builds and loads exactly as stock."""
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator
    from vllm.platforms import current_platform

    ref = synth_tiny / "reference"
    # vLLM's unquantized-MoE oracle (fused_moe/oracle/unquantized.py) knows no backend for the
    # 'unspecified' platform of a GPU-less machine; let it pick its CPU one for construction.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(current_platform), "is_cpu", lambda self: True)
        try:
            model, vc = _build(ref)
        except Exception as e:
            pytest.skip(f"stock bf16 GPT-OSS cannot be built on this CPU-only vLLM: {e}")
    assert vc.quant_config is None and not model._bnb_moe
    names = dict(model.named_parameters())
    assert "model.layers.0.mlp.experts.routed_experts.w13_weight" in names
    assert not any("qweight" in k for k in names)
    files = sorted(str(p) for p in ref.glob("*.safetensors"))
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(vc):
        model.load_weights(safetensors_weights_iterator(files, False))
    src = W.SafetensorsDir(ref)
    w13 = names["model.layers.0.mlp.experts.routed_experts.w13_weight"]
    want = src.tensor("model.layers.0.mlp.experts.gate_up_proj")[2].T
    assert torch.equal(w13[2].to(want.dtype), want)


# ----------------------------------------------------------------------------------------------
# Layer-level: tracing and the weight_loader convention
# ----------------------------------------------------------------------------------------------


def _nf4_qkv_layer(nested: bool = True):
    from gptoss_3090.vllm.linear_method import Nf4LinearMethod

    method = Nf4LinearMethod(SimpleNamespace(prequantized=True, nested=nested))
    layer = torch.nn.Module()
    method.create_weights(layer, 320, [512, 128, 128], 320, 768, torch.bfloat16, weight_loader=None)
    g = torch.Generator().manual_seed(5)
    layer.bias = torch.nn.Parameter(
        torch.randn(768, generator=g).to(torch.bfloat16), requires_grad=False
    )
    tensors: dict[str, torch.Tensor] = {}
    for seg, (name, rows) in enumerate((("q", 512), ("k", 128), ("v", 128))):
        key = f"{name}.weight"
        tensors.update(
            fx.quantize_linear(
                (torch.randn(rows, 320, generator=g) * 0.02).to(torch.bfloat16), name, nested
            )  # noqa: E501
        )
        params = {n: getattr(layer, n) for n in layer.nf4_layout.param_shapes()}
        slot = W.nf4_slot("qkv", params, layer.nf4_layout, seg, None)
        W.fill_nf4_slot(slot, W.read_nf4_parts(_Dict(tensors), key, (rows, 320)), key)
    method.process_weights_after_loading(layer)
    want = torch.cat([fx.bnb_dequantize(tensors, f"{n}.weight") for n in "qkv"])
    return method, layer, want


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_linear_traces_with_fullgraph(nested: bool) -> None:
    """``apply`` runs inside vLLM's ``@support_torch_compile(fullgraph=True)`` graph."""
    method, layer, want = _nf4_qkv_layer(nested)
    x = torch.randn(5, 320).to(torch.bfloat16)
    compiled = torch.compile(
        lambda x: method.apply(layer, x, layer.bias), fullgraph=True, backend="eager"
    )
    with torch.no_grad():
        eager, traced = method.apply(layer, x, layer.bias), compiled(x)
    assert torch.equal(eager, traced)
    ref = x.float() @ want.float().T + layer.bias.float()
    assert _rel_err(eager, ref) < 1e-2


def test_weight_loaders_follow_vllms_convention() -> None:
    from gptoss_3090.vllm.moe_method import expert_weight_loader

    _, layer, _ = _nf4_qkv_layer()
    before = layer.qweight.detach().clone()
    k_start, k_len = layer.nf4_layout.ranges(1)["qweight"]
    fresh = torch.randint(0, 255, (k_len,), dtype=torch.uint8)
    layer.qweight.weight_loader(layer.qweight, fresh, "k")
    assert torch.equal(layer.qweight[k_start : k_start + k_len], fresh)
    assert torch.equal(layer.qweight[:k_start], before[:k_start])
    with pytest.raises(ValueError, match="expected"):
        layer.qweight.weight_loader(layer.qweight, fresh[:-1], "v")
    p = torch.nn.Parameter(torch.zeros(4, 6), requires_grad=False)
    assert expert_weight_loader(p, torch.ones(2, 3), "w13_absmax", "w1", 2, True) is True
    assert p[2].sum() == 6 and p.sum() == 6
    assert expert_weight_loader(p, torch.ones(5), "w13_absmax", "w1", 1, True) is False


def test_attention_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ours on sm_80-sm_89 when the user chose nothing; vLLM's choice otherwise, with a reason."""
    import gptoss_3090.vllm.model as M
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    class Fake:
        reason: str | None = None

        @classmethod
        def unsupported_reason(cls, **kw: object) -> str | None:
            return cls.reason

        @classmethod
        def validate_configuration(cls, **kw: object) -> list[str]:
            return []

    monkeypatch.setattr(AttentionBackendEnum.CUSTOM.__class__, "get_class", lambda self: Fake)
    cap = [DeviceCapability(8, 6)]
    monkeypatch.setattr(
        type(current_platform), "get_device_capability", classmethod(lambda cls, d=0: cap[0])
    )

    def choose(backend: str | None = None, per_kind: dict | None = None) -> type | None:
        M._backend_logged = False
        vc = SimpleNamespace(
            attention_config=SimpleNamespace(backend=backend, backend_per_kind=per_kind or {}),
            cache_config=SimpleNamespace(cache_dtype="auto", block_size=16),
        )
        return M.choose_attention_backend(vc, 64, torch.bfloat16, 64, 8)

    assert choose() is Fake
    assert choose("TRITON_ATTN") is None and choose("CUSTOM") is None  # explicit: vLLM selects
    assert choose(per_kind={"sliding_window": "TRITON_ATTN"}) is None
    monkeypatch.setenv(M.ATTENTION_ENV, "triton")
    assert choose() is None
    monkeypatch.delenv(M.ATTENTION_ENV)
    Fake.reason = "kv cache dtype fp8"
    assert choose() is None
    Fake.reason = None
    for c in (DeviceCapability(9, 0), DeviceCapability(7, 5)):
        cap[0] = c
        assert choose() is None
    cap[0] = DeviceCapability(8, 0)
    assert choose() is Fake


def test_stock_mxfp4_gpt_oss_is_served_by_vllms_own_path(cpu_vllm, tmp_path: Path) -> None:
    """With the plugin installed, an MXFP4 GPT-OSS checkpoint (OpenAI's layout) still builds
    with vLLM's MXFP4 method and loads through vLLM's own ``_load_weights_mxfp4``."""
    from safetensors.torch import save_file
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator
    from vllm.platforms import current_platform

    spec = fx.Spec(attention="plain")
    g = torch.Generator().manual_seed(11)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in fx.build_tensors(spec).items():
        if ".mlp.experts." in k:
            continue
        tensors[k.replace(".mlp.router.linear.", ".mlp.router.")] = v
    e, h, i = spec.experts, spec.hidden, spec.intermediate
    for n in range(spec.layers):
        p = f"model.layers.{n}.mlp.experts"
        for name, rows, cols in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
            tensors[f"{p}.{name}_blocks"] = torch.randint(
                0, 256, (e, rows, cols // 32, 16), generator=g, dtype=torch.uint8
            )
            tensors[f"{p}.{name}_scales"] = torch.randint(
                118, 130, (e, rows, cols // 32), generator=g, dtype=torch.uint8
            )
            tensors[f"{p}.{name}_bias"] = torch.randn(e, rows, generator=g).to(torch.bfloat16)
    cfg = _plain_config()
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    d = tmp_path / "mxfp4"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(current_platform), "is_cpu", lambda self: True)
        try:
            model, vc = _build(d)
        except Exception as exc:
            pytest.skip(f"stock MXFP4 GPT-OSS cannot be built on this CPU-only vLLM: {exc}")
    assert vc.model_config.quantization == "gpt_oss_mxfp4" and not model._bnb_moe
    assert type(vc.quant_config).__name__ == "GptOssMxfp4Config"
    assert "gptoss_3090" not in vc.additional_config  # vLLM's compile-cache key as stock's
    with set_current_vllm_config(vc):
        model.load_weights(safetensors_weights_iterator([str(d / "model.safetensors")], False))
    params = dict(model.named_parameters())
    for n in range(spec.layers):
        p = f"model.layers.{n}.mlp.experts"
        w13 = params[f"{p}.routed_experts.w13_weight"]
        assert torch.equal(w13, tensors[f"{p}.gate_up_proj_blocks"].reshape(w13.shape))
        s2 = params[f"{p}.routed_experts.w2_weight_scale"]
        assert torch.equal(s2, tensors[f"{p}.down_proj_scales"].reshape(s2.shape))
        assert torch.equal(
            params[f"model.layers.{n}.mlp.router.weight"],
            tensors[f"model.layers.{n}.mlp.router.weight"],
        )  # noqa: E501


def test_router_method_is_installed_unless_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer's bf16 router gets RouterLinearMethod (a subclass of vLLM's unquantized method,
    so weights and loading stay vLLM's); GPTOSS_3090_ROUTER=vllm and the reference kernels
    keep vLLM's own method."""
    from gptoss_3090.vllm import linear_method as LM
    from gptoss_3090.vllm.model import _install_router_method
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    def model() -> torch.nn.Module:
        m = torch.nn.Module()
        m.layers = torch.nn.ModuleList()
        for _ in range(3):
            layer = torch.nn.Module()
            layer.mlp = torch.nn.Module()
            layer.mlp.router = torch.nn.Module()
            layer.mlp.router.quant_method = UnquantizedLinearMethod()
            layer.mlp.experts_per_token = 4  # as vLLM 0.26's gpt_oss.MLPBlock
            m.layers.append(layer)
        m.layers.append(torch.nn.Module())  # a layer without an MLP (pipeline stage) is skipped
        return m

    monkeypatch.delenv("GPTOSS_3090_ROUTER", raising=False)
    monkeypatch.delenv("GPTOSS_3090_REFERENCE_KERNELS", raising=False)
    monkeypatch.delenv("GPTOSS_3090_MOE_ROUTING", raising=False)
    m = model()
    _install_router_method(m)
    methods = [layer.mlp.router.quant_method for layer in m.layers[:3]]
    assert all(isinstance(q, LM.RouterLinearMethod) for q in methods)
    assert all(isinstance(q, UnquantizedLinearMethod) for q in methods)
    assert [q.top_k for q in methods] == [0, 0, 0]  # default routing: vLLM's top-k
    # The routing mode "router" hands each router its MLP's experts per token.
    with monkeypatch.context() as mp:
        mp.setenv("GPTOSS_3090_MOE_ROUTING", "router")
        m = model()
        _install_router_method(m)
        assert [layer.mlp.router.quant_method.top_k for layer in m.layers[:3]] == [4, 4, 4]
    for env in ({"GPTOSS_3090_ROUTER": "vllm"}, {"GPTOSS_3090_REFERENCE_KERNELS": "1"}):
        with monkeypatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            m = model()
            _install_router_method(m)
            assert not any(
                isinstance(layer.mlp.router.quant_method, LM.RouterLinearMethod)
                for layer in m.layers[:3]
            )
