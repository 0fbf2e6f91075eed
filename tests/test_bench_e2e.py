"""The end-to-end benchmark's stock baseline must route like a real model (CPU, no vLLM needed).

vLLM's ``load_format="dummy"`` draws every float tensor from U(-1e-3, 1e-3) with a seed that
depends only on the tensor's size, so all layers share one router bias that dwarfs the
token-dependent logits: every token picks the same 4 experts. ``bench_vllm_e2e._redraw`` (the
``gptoss_random`` loader) must undo that.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from bench_modules import load_bench

H, E, VOCAB, LAYERS = 256, 32, 200_000, 3


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_vllm_e2e")


def _dummy(shape: tuple[int, ...]) -> torch.Tensor:
    """What vLLM's dummy loader writes: U(-1e-3, 1e-3), seeded by nothing but the size."""
    g = torch.Generator().manual_seed(1234)
    return (torch.rand(shape, generator=g) * 2e-3 - 1e-3).to(torch.bfloat16)


def _model(init) -> tuple[SimpleNamespace, dict[str, torch.Tensor]]:
    params: dict[str, torch.Tensor] = {"model.embedding.weight": init((VOCAB, H))}
    layers = []
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        norm = init((H,))
        w, b = init((E, H)), init((E,))
        params |= {
            f"{p}.post_attention_layernorm.weight": norm,
            f"{p}.mlp.router.weight": w,
            f"{p}.mlp.router.bias": b,
        }
        layers.append(
            SimpleNamespace(
                post_attention_layernorm=SimpleNamespace(weight=norm),
                mlp=SimpleNamespace(router=SimpleNamespace(weight=w, bias=b)),
            )
        )
    inner = SimpleNamespace(
        embedding=SimpleNamespace(weight=params["model.embedding.weight"]), layers=layers
    )
    return SimpleNamespace(get_model=lambda: SimpleNamespace(model=inner)), params


def test_dummy_weights_route_every_token_alike(bench) -> None:
    worker, _ = _model(_dummy)
    probe = bench.route_probe(worker)
    assert probe["experts_per_layer_t64"] == 4.0, probe


def test_redrawn_weights_route_like_a_model(bench) -> None:
    worker, params = _model(_dummy)
    for i, (name, t) in enumerate(params.items()):
        bench._redraw(name, t, torch.Generator().manual_seed(i))
    probe = bench.route_probe(worker)
    # 64 tokens, top-4 of 32 experts at random: about 32 distinct experts per layer.
    assert probe["experts_per_layer_t16"] > 20, probe
    assert probe["experts_per_layer_t64"] > 28, probe
    norm = params["model.layers.0.post_attention_layernorm.weight"].float()
    assert abs(norm.mean().item() - 1.0) < 0.05 and 0.05 < norm.std().item() < 0.15
    w = params["model.layers.0.mlp.router.weight"].float()
    assert abs(w.std().item() - H**-0.5) < 0.1 * H**-0.5


def test_redraw_fills_mxfp4_codes_and_scales(bench) -> None:
    codes = torch.zeros(2, 8, 16, dtype=torch.uint8)
    scales = torch.zeros(2, 8, 1, dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    bench._redraw("model.layers.0.mlp.experts.w13_weight", codes, g)
    bench._redraw("model.layers.0.mlp.experts.w13_weight_scale", scales, g)
    assert codes.unique().numel() > 100  # uniform random bytes
    assert bool((scales == 127 - 7).all())  # e8m0 2^-7


def test_profiler_config_is_accepted_by_vllm(bench, tmp_path) -> None:
    config = pytest.importorskip("vllm.config.profiler")
    cfg = config.ProfilerConfig(**bench.profiler_config(str(tmp_path)))
    assert cfg.profiler == "torch" and cfg.max_iterations == bench.PROFILE_STEPS


def test_trace_kernels_sums_gpu_kernels_per_step(tmp_path) -> None:
    import gzip
    import json

    tk = load_bench("trace_kernels")
    events = [
        {"ph": "X", "cat": "kernel", "name": "moe_str_up_n1_bf16", "dur": 10.0},
        {"ph": "X", "cat": "kernel", "name": "moe_str_up_n1_bf16", "dur": 30.0},
        {"ph": "X", "cat": "kernel", "name": "Marlin<256, 1>", "dur": 8.0},
        {"ph": "X", "cat": "cpu_op", "name": "moe_str_up_n1_bf16", "dur": 1000.0},
        {"ph": "X", "cat": "kernel", "name": "nvjet_tst_64x8_64x16", "dur": 4.0},
    ]
    folder = tmp_path / "ours_full"
    (folder / "sub").mkdir(parents=True)
    with gzip.open(folder / "sub" / "w.pt.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    runs = {"ours_full": tk.summarize(folder)}
    assert runs["ours_full"]["moe_str_up_n1_bf16"] == (40.0, 2)  # the cpu_op is not counted
    md = tk.table(runs, steps=2)
    assert "| moe (ours) | 20.0 |" in md
    assert "| moe (marlin) | 4.0 |" in md
    assert "| gemm (cublas / cutlass) | 2.0 |" in md
    assert "**26.0**" in md
    # Triton attention's split-KV merge belongs to the attention, not to "other".
    assert tk.family("reduce_segments") == "attention (triton)"
    assert tk.family("attn_decode_s2_bf16") == "attention (ours)"
    with pytest.raises(SystemExit):
        tk.main([str(tmp_path / "missing"), "--steps", "2"])


def test_trace_kernels_reports_gpu_busy_time_against_the_span() -> None:
    """Overlapping kernels count once; the gaps between them count in the span only."""
    tk = load_bench("trace_kernels")
    events = [
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 100.0, "dur": 10.0},
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 105.0, "dur": 10.0},  # overlaps a
        {"ph": "X", "cat": "kernel", "name": "c", "ts": 150.0, "dur": 20.0},  # after a gap
        {"ph": "X", "cat": "cpu_op", "name": "d", "ts": 0.0, "dur": 500.0},  # not a kernel
    ]
    busy, span = tk.busy_and_span(events)
    assert (busy, span) == (35.0, 70.0)
    md = tk.table({"x": tk.kernel_times(events)}, steps=1, timelines={"x": (busy, span)})
    assert "| GPU busy (kernel union) | 35.0 |" in md
    assert "| busy / span | 50% |" in md
    assert tk.busy_and_span([]) == (0.0, 0.0)


def test_trace_kernels_finds_kernels_that_start_early() -> None:
    """A kernel that starts before the one before it has ended (programmatic dependent launch)
    is counted with its overlap; back-to-back kernels and CPU ops are not."""
    tk = load_bench("trace_kernels")
    events = [
        {"ph": "X", "cat": "kernel", "name": "attn", "ts": 100.0, "dur": 10.0},
        {"ph": "X", "cat": "kernel", "name": "nf4_o", "ts": 104.0, "dur": 20.0},  # 6 us early
        {"ph": "X", "cat": "kernel", "name": "norm", "ts": 124.0, "dur": 2.0},  # right after
        {"ph": "X", "cat": "kernel", "name": "nf4_o", "ts": 125.0, "dur": 0.5},  # inside norm
        {"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0.0, "dur": 500.0},
    ]
    starts = tk.early_starts(events)
    assert starts == {"nf4_o": (6.5, 2)}
    md = tk.table({"x": tk.kernel_times(events)}, steps=1, early={"x": starts, "y": {}})
    assert "| `nf4_o` | 2.0 | 6.5 |" in md
    assert "Early starts, y" in md and "none" in md


def test_summary_reports_the_median_and_the_range_of_the_runs(bench, tmp_path) -> None:
    """summary_md shows each side's median tok/s with the range of its timed runs, and the ratio
    of the medians; plot() writes a PNG where matplotlib is installed."""

    def run(tok_s: list[float]) -> dict:
        median = sorted(tok_s)[len(tok_s) // 2]
        return {"tok_s": median, "runs_tok_s": tok_s}

    stock = {"decode_b1": run([300.0, 320.0, 310.0])}
    ours = {"decode_b1": run([350.0, 296.0, 356.0])}
    report = {
        "runs": {
            "stock_full": {"device": "card", "workloads": stock},
            "ours_full": {"device": "card", "workloads": ours},
        }
    }
    md = bench.summary_md(report, ["full"], ["decode_b1"])
    row = next(line for line in md.splitlines() if "decode_b1" in line)
    assert "| 310 (300-320) | 350 (296-356) | 1.13x |" in row, row
    pytest.importorskip("matplotlib")
    png = tmp_path / "t.png"
    bench.plot(report, ["full"], ["decode_b1"], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_of_one_side_puts_its_numbers_in_its_own_column(bench) -> None:
    """A run of one side only (``--sides ours``) lists its tok/s under that side's column, with
    the range of the timed runs, and leaves the other columns empty."""
    ours = {"decode_b1": {"tok_s": 464.0, "runs_tok_s": [461.0, 464.0, 466.0]}}
    for side, column in (("ours", 3), ("stock", 2)):
        report = {"runs": {f"{side}_full": {"device": "card", "workloads": ours}}}
        md = bench.summary_md(report, ["full"], ["decode_b1"])
        row = next(line for line in md.splitlines() if "decode_b1" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 6, row
        assert cells[1] == f"decode_b1 ({side} only)", row
        assert cells[column] == "464 (461-466)", row
        assert [c for i, c in enumerate(cells) if i not in (0, 1, column)] == ["", "", ""], row


def test_decode_steps_subtract_the_first_token_run(bench) -> None:
    """A 256-token run of batch 4 taking 2.0 s, whose first token alone takes 0.2 s, spent 1.8 s
    on 255 decode steps of 4 tokens."""
    d = bench.decode_steps(4, 256, 2.0, 0.2)
    assert d["decode_s"] == pytest.approx(1.8)
    assert d["decode_step_ms"] == pytest.approx(1800 / 255)
    assert d["decode_tok_s"] == pytest.approx(4 * 255 / 1.8)
    with pytest.raises(ValueError, match="first token alone"):
        bench.decode_steps(4, 256, 0.2, 0.2)


def test_summary_adds_decode_steps_only_rows(bench) -> None:
    """Where both sides recorded decode_tok_s, the summary adds a row of the decode steps alone
    with its own ratio; prefill rows (no decode_tok_s) get none."""

    def run(tok_s: float, decode: list[float]) -> dict:
        return {
            "tok_s": tok_s,
            "runs_tok_s": [tok_s],
            "decode_tok_s": sorted(decode)[1],
            "runs_decode_tok_s": decode,
        }

    report = {
        "runs": {
            "stock_full": {
                "device": "card",
                "workloads": {
                    "decode_b64": run(7900.0, [8400.0, 8500.0, 8450.0]),
                    "p": {"tok_s": 1.0},
                },
            },
            "ours_full": {
                "device": "card",
                "workloads": {
                    "decode_b64": run(7470.0, [7700.0, 7800.0, 7650.0]),
                    "p": {"tok_s": 1.0},
                },
            },
        }
    }
    md = bench.summary_md(report, ["full"], ["decode_b64", "p"])
    row = next(line for line in md.splitlines() if "decode steps only" in line)
    assert (
        "| full | decode_b64, decode steps only | 8,450 (8,400-8,500) | 7,700 (7,650-7,800) |"
        in row
    )
    assert f"| {7700 / 8450:.2f}x |" in row, row
    assert sum("decode steps only" in line for line in md.splitlines()) == 1


def test_repeats_below_one_is_refused(bench, capsys) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--ours", "x", "--repeats", "0"])
    assert "--repeats 0" in capsys.readouterr().err


def test_attention_bench_decode_cases_parse_and_reject() -> None:
    """bench_attention.py --decode-cases: BATCHxCONTEXT pairs; anything else is a usage error
    naming the bad item (the batch-1 short-context cases of the session-14 trace)."""
    ba = load_bench("bench_attention")
    assert ba.decode_cases("1x256, 16x8192") == [(1, 256), (16, 8192)]
    for bad in ("1x", "0x256", "1x256x2", "ax1"):
        with pytest.raises(SystemExit, match="decode-cases"):
            ba.decode_cases(bad)


def test_router_bench_tokens_parse_and_reject() -> None:
    """bench_router.py --tokens: positive integers; anything else is a usage error naming it."""
    br = load_bench("bench_router")
    assert br.tokens_list("1, 2,64") == [1, 2, 64]
    for bad in ("0", "1,,2", "x", "-4"):
        with pytest.raises(SystemExit, match="--tokens"):
            br.tokens_list(bad)


def test_agreement_counts_shared_leading_tokens(bench, tmp_path, capsys) -> None:
    """``agree`` sets each engine's first-request greedy tokens against the first engine's: the
    shared prefix, per workload; a missing workload is a dash, unreadable input an error."""
    ref = {"workloads": {"decode_b1": {"first_tokens": [5, 6, 7, 8]},
                         "decode_b16": {"first_tokens": [1, 2]}}}
    same = {"workloads": {"decode_b1": {"first_tokens": [5, 6, 7, 8]},
                          "decode_b16": {"first_tokens": [1, 2]}}}
    early = {"workloads": {"decode_b1": {"first_tokens": [5, 9, 7, 8]}}}
    paths = []
    for name, res in (("fold", ref), ("fold_run2", same), ("vllm", early)):
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name / "ours_full.json")
        paths[-1].write_text(json.dumps(res))
    out = tmp_path / "agree.md"
    assert bench.main(["agree", *map(str, paths), "--out", str(out)]) == 0
    table = out.read_text()
    assert "| fold | 4 / 4 | 2 / 2 |" in table
    assert "| fold_run2 | 4 / 4 | 2 / 2 |" in table
    assert "| vllm | 1 / 4 | - |" in table
    assert table in capsys.readouterr().out
    assert bench.common_prefix([1, 2, 3], [1, 2]) == 2
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit):
        bench.main(["agree", str(tmp_path / "bad.json")])
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["agree", str(paths[2].parent.parent / "nothing.json")])
    with pytest.raises(ValueError, match="no first_tokens"):
        bench.agreement_table({"old": {"workloads": {"decode_b1": {"tok_s": 1.0}}}})


def test_correctness_knob_engines_run_only_when_named() -> None:
    """The correctness run's diagnostic engines copy ``ours`` under their setting and start
    only when ``--engines`` names them; stock (the tolerance) always runs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent / "gpu" / "test_vllm_e2e.py"
    spec = importlib.util.spec_from_file_location("vllm_e2e_harness", path)
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    engines = {
        "stock_triton": {"model": "ref", "env": {"VLLM_PLUGINS": ""}},
        "ours": {"model": "ckpt", "llm": {"quantization": "bnb_moe"}},
        "negative_sinks_minus30": {"model": "neg"},
    }
    default = harness.select_engines(engines, None)
    assert set(default) == set(engines)
    named = harness.select_engines(engines, ["knob_moe_routing_router", "knob_attn_min_keys_512"])
    assert set(named) == {"stock_triton", "knob_moe_routing_router", "knob_attn_min_keys_512"}
    knob = named["knob_moe_routing_router"]
    assert knob["model"] == "ckpt" and knob["llm"] == {"quantization": "bnb_moe"}
    assert knob["env"] == {"GPTOSS_3090_MOE_ROUTING": "router"}
    assert named["knob_attn_min_keys_512"]["env"] == {"GPTOSS_3090_ATTN_MIN_KEYS": "512"}
    assert "env" not in engines["ours"]  # the copies leave ours alone


def test_determinism_report_finds_the_earliest_divergence(bench) -> None:
    """Repeated runs of the same prompts: identical runs are counted, and each run's earliest
    divergence from the first run (over all its requests) is reported."""
    first = [[1, 2, 3, 4], [5, 6, 7, 8]]
    same = [[1, 2, 3, 4], [5, 6, 7, 8]]
    late = [[1, 2, 3, 4], [5, 6, 0, 8]]
    rep = bench.determinism_report([first, same, late])
    assert rep == {
        "runs": 3,
        "identical_runs": 2,
        "earliest_divergence_per_run": [4, 4, 2],
        "tokens_per_request": 4,
    }
    with pytest.raises(ValueError, match="no runs"):
        bench.determinism_report([])


def test_determinism_needs_two_runs(bench, capsys) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--ours", "x", "--determinism", "1"])
    assert "--determinism 1" in capsys.readouterr().err


def test_summary_reports_determinism_of_one_side(bench) -> None:
    report = {
        "runs": {
            "ours_full": {
                "device": "GPU",
                "workloads": {
                    "decode_b16": {
                        "tok_s": 3000.0,
                        "determinism": {
                            "runs": 5,
                            "identical_runs": 4,
                            "earliest_divergence_per_run": [256, 256, 3, 256, 256],
                            "tokens_per_request": 256,
                        },
                    }
                },
            }
        }
    }
    md = bench.summary_md(report, ["full"], ["decode_b16"])
    assert "decode_b16, runs repeating the first exactly (ours only)" in md
    assert "4 / 5 (earliest divergence 3 / 256)" in md


def test_summary_reports_determinism_of_both_sides(bench) -> None:
    """Both sides ran: the determinism row sits in the two-sided table, each side in its column
    (session 30 printed it only for one-sided runs)."""

    def workload(tok_s: float, identical: int, earliest: list[int]) -> dict:
        return {
            "tok_s": tok_s,
            "determinism": {
                "runs": len(earliest),
                "identical_runs": identical,
                "earliest_divergence_per_run": earliest,
                "tokens_per_request": 256,
            },
        }

    report = {
        "runs": {
            "stock_full": {"workloads": {"decode_b1": workload(350.0, 3, [256, 256, 256])}},
            "ours_full": {"workloads": {"decode_b1": workload(480.0, 2, [256, 40, 256])}},
        }
    }
    md = bench.summary_md(report, ["full"], ["decode_b1"])
    assert _row_cells(md, "runs repeating the first exactly")[:4] == [
        "full",
        "decode_b1, runs repeating the first exactly",
        "3 / 3 (earliest divergence 256 / 256)",
        "2 / 3 (earliest divergence 40 / 256)",
    ]


def _row_cells(md: str, label: str) -> list[str]:
    """The cells of the first summary row whose text holds ``label``."""
    row = next(ln for ln in md.splitlines() if label in ln)
    return [c.strip() for c in row.strip("|").split("|")]


def test_summary_has_a_clock_row_per_side(bench) -> None:
    """Each side's SM clock and power (gpu_clocks) in its column; why not, where NVML gave
    nothing."""
    stock_clocks = {
        "samples": 40,
        "sm_mhz_median": 1980,
        "sm_mhz_min": 1965,
        "power_w_median": 512.3,
        "power_capped_share": 0.0,
    }
    ours_clocks = {"samples": 0, "error": "NVML unavailable: ImportError: no pynvml"}
    report = {
        "runs": {
            "stock_full": {"workloads": {"decode_b64": {"tok_s": 7900.0, "clocks": stock_clocks}}},
            "ours_full": {"workloads": {"decode_b64": {"tok_s": 7500.0, "clocks": ours_clocks}}},
        }
    }
    md = bench.summary_md(report, ["full"], ["decode_b64"])
    assert _row_cells(md, "SM clock and power")[:4] == [
        "full",
        "decode_b64, SM clock and power",
        "1,980 MHz (min 1,965), 512 W, power-capped 0%",
        "n/a (NVML unavailable: ImportError: no pynvml)",
    ]


def test_summary_has_each_sides_engine_start(bench) -> None:
    """The engine start (LLM(...) until it returned) per side, paired and one-sided: the number
    the background kernel compile (GPTOSS_3090_PRECOMPILE) is meant to lower."""
    report = {
        "runs": {
            "stock_full": {"startup_s": 61.25, "workloads": {"decode_b1": {"tok_s": 350.0}}},
            "ours_full": {"startup_s": 97.04, "workloads": {"decode_b1": {"tok_s": 470.0}}},
        }
    }
    md = bench.summary_md(report, ["full"], ["decode_b1"])
    assert _row_cells(md, "engine start s")[:4] == ["full", "engine start s", "61.2", "97.0"]
    del report["runs"]["stock_full"]
    md = bench.summary_md(report, ["full"], ["decode_b1"])
    assert _row_cells(md, "engine start s")[:4] == ["full", "ours: engine start s", "", "97.0"]
