"""bench/gpu_clocks.py (CPU): the NVML sampler against a fake ``pynvml`` module, its summary,
its behaviour without NVML, and bench_moe's clocked timing (the summary row of
bench_vllm_e2e is tested in test_bench_e2e.py)."""

from __future__ import annotations

import statistics
import sys
import time
from types import SimpleNamespace

import pytest
from bench_modules import load_bench


@pytest.fixture(scope="module")
def clocks():
    return load_bench("gpu_clocks")


class FakeNvml(SimpleNamespace):
    """pynvml's calls the sampler makes, with readings from fixed cycles; the older throttle-
    reason name only, as nvidia-ml-py releases before the rename spell it."""

    NVML_CLOCK_SM = 1

    def __init__(self, mhz: list[int], milliwatts: list[int], reasons: list[int]) -> None:
        super().__init__()
        self.mhz, self.mw, self.rs = mhz, milliwatts, reasons
        self.calls = 0
        self.shutdown = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"gpu{i}"

    def nvmlDeviceGetClockInfo(self, handle: str, kind: int) -> int:
        assert handle == "gpu0" and kind == self.NVML_CLOCK_SM
        self.calls += 1
        return self.mhz[(self.calls - 1) % len(self.mhz)]

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return self.mw[(self.calls - 1) % len(self.mw)]

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: str) -> int:
        return self.rs[(self.calls - 1) % len(self.rs)]


def test_summary_of_samples(clocks) -> None:
    s = [
        clocks.ClockSample(0.0, 1980, 500.0, 0),
        clocks.ClockSample(0.1, 1755, 690.0, 0x04),  # software power cap
        clocks.ClockSample(0.2, 1830, 700.0, 0x80 | 0x08),  # power brake + hw slowdown
        clocks.ClockSample(0.3, 1980, 450.0, 0x20),  # thermal
    ]
    got = clocks.summarize(s)
    assert got["samples"] == 4
    assert got["sm_mhz_median"] == statistics.median([1980, 1755, 1830, 1980])
    assert got["sm_mhz_min"] == 1755
    assert got["power_w_median"] == statistics.median([500.0, 690.0, 700.0, 450.0])
    assert got["power_capped_share"] == 0.5
    assert got["thermal_share"] == 0.25
    assert got["hw_slowdown_share"] == 0.25
    assert clocks.summarize([]) == {"samples": 0}


def test_sampler_reads_nvml_while_the_block_runs(clocks, monkeypatch) -> None:
    fake = FakeNvml([1980, 1700], [650_000, 700_000], [0, 0x04])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with clocks.ClockSampler(period_s=0.001) as sampler:
        deadline = time.monotonic() + 5
        while len(sampler.samples) < 6 and time.monotonic() < deadline:
            time.sleep(0.005)
    assert fake.shutdown
    n = len(sampler.samples)
    assert n >= 6, "the sampler thread took no readings"
    assert [x.sm_mhz for x in sampler.samples] == [[1980, 1700][i % 2] for i in range(n)]
    assert [x.power_w for x in sampler.samples] == [[650.0, 700.0][i % 2] for i in range(n)]
    summary = sampler.summary()
    assert summary["sm_mhz_min"] == 1700 and "error" not in summary
    assert summary["power_capped_share"] == sum(1 for i in range(n) if i % 2) / n
    # Nothing is sampled once the block has ended.
    time.sleep(0.02)
    assert len(sampler.samples) == n


def test_sampler_without_nvml_says_why(clocks, monkeypatch) -> None:
    class Broken(FakeNvml):
        def nvmlInit(self) -> None:
            raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", Broken([1], [1], [0]))
    with clocks.ClockSampler() as sampler:
        pass
    summary = sampler.summary()
    assert summary["samples"] == 0
    assert "NVML unavailable" in summary["error"] and "Not Found" in summary["error"]


def test_sampler_keeps_samples_when_nvml_fails_midway(clocks, monkeypatch) -> None:
    class Flaky(FakeNvml):
        def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
            if self.calls > 3:
                raise RuntimeError("GPU is lost")
            return 600_000

    monkeypatch.setitem(sys.modules, "pynvml", Flaky([1900], [1], [0]))
    with clocks.ClockSampler(period_s=0.001) as sampler:
        deadline = time.monotonic() + 5
        while sampler.error is None and time.monotonic() < deadline:
            time.sleep(0.005)
    summary = sampler.summary()
    assert summary["samples"] == 3
    assert "GPU is lost" in summary["error"]


def test_sampler_rejects_a_period_that_is_not_positive(clocks) -> None:
    with pytest.raises(ValueError, match="period_s must be positive"):
        clocks.ClockSampler(period_s=0)


@pytest.mark.parametrize("index", [-1, "0", 1.0, True])
def test_sampler_rejects_an_index_that_is_not_a_gpu_index(clocks, index) -> None:
    with pytest.raises(ValueError, match="index must be a GPU index"):
        clocks.ClockSampler(index=index)


def test_bench_moe_times_with_clocks(monkeypatch) -> None:
    """bench_moe's timing keeps time_fn's result and adds the clock summary of the same span."""
    moe = load_bench("bench_moe")
    fake = FakeNvml([1755], [690_000], [0x04])
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    def slow_time_fn(fn, iters: int, warmup: int = 3) -> float:
        time.sleep(0.1)  # room for several 10 ms samples
        return 2.5

    monkeypatch.setattr(moe, "time_fn", slow_time_fn)
    ms, summary = moe.time_fn_clocked(lambda: None, 5)
    assert ms == 2.5
    assert summary["samples"] >= 2
    assert summary["sm_mhz_median"] == 1755 and summary["power_capped_share"] == 1.0
