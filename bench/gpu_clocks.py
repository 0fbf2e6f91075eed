"""The GPU's SM clock, power and clock-limit reasons while a benchmark runs, sampled through
NVML in a background thread.

Why: our MoE at 64 tokens issues instructions at a low rate, so it slows with the SM clock,
while stock vLLM's Marlin kernels wait more on memory. Session 20's batch-64 trace put our MoE
at 257.7 us per layer in vLLM against 235.5 in ``bench_moe.py``, while Marlin took about the
same in both; a lower SM clock under a whole model's sustained load would explain it. With
these samples next to each timed run, a sitting shows the clocks both sides ran at.

    with ClockSampler() as clocks:
        run_workload()
    print(clocks.summary())   # {"samples": ..., "sm_mhz_median": ..., ...}

NVML comes from ``nvidia-ml-py`` (``import pynvml``), which vLLM depends on. Without it, or
without a driver, the sampler records why and ``summary()`` says so instead of failing the run.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

#: NVML clock-event (throttle) reason bits that mean the GPU held its clocks down for power or
#: heat (nvml.h: nvmlClocksEventReason*). Idle and application-clock settings are left out.
POWER_REASONS = 0x04 | 0x80  # software power cap, hardware power brake
THERMAL_REASONS = 0x20 | 0x40  # software and hardware thermal slowdown
HW_SLOWDOWN = 0x08  # hardware slowdown (power or heat, as the driver reports it)


@dataclass(frozen=True)
class ClockSample:
    """One NVML reading: seconds since the sampler started, SM clock in MHz, board power in
    watts, and the clock-event reason bits."""

    t: float
    sm_mhz: int
    power_w: float
    reasons: int


def summarize(samples: list[ClockSample]) -> dict[str, Any]:
    """Median and lowest SM clock, median power, and the share of samples held down for power
    or heat; ``{"samples": 0}`` for none."""
    if not samples:
        return {"samples": 0}
    n = len(samples)
    sm = [s.sm_mhz for s in samples]
    return {
        "samples": n,
        "sm_mhz_median": statistics.median(sm),
        "sm_mhz_min": min(sm),
        "power_w_median": round(statistics.median(s.power_w for s in samples), 1),
        "power_capped_share": sum(1 for s in samples if s.reasons & POWER_REASONS) / n,
        "thermal_share": sum(1 for s in samples if s.reasons & THERMAL_REASONS) / n,
        "hw_slowdown_share": sum(1 for s in samples if s.reasons & HW_SLOWDOWN) / n,
    }


class ClockSampler:
    """Context manager sampling GPU ``index`` (an NVML index: the physical order, not
    ``CUDA_VISIBLE_DEVICES``'s) every ``period_s`` seconds while the block runs."""

    def __init__(self, index: int = 0, period_s: float = 0.02) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be a GPU index (an int >= 0), got {index!r}")
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        self.index = index
        self.period_s = period_s
        self.samples: list[ClockSample] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None

    def __enter__(self) -> ClockSampler:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception as e:  # no nvidia-ml-py, no driver, no such GPU
            self.error = f"NVML unavailable: {type(e).__name__}: {e}"
            return self
        self._nvml = pynvml
        self._thread = threading.Thread(target=self._run, args=(handle,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # a failed shutdown loses nothing already sampled
                pass

    def _run(self, handle: Any) -> None:
        nv = self._nvml
        # nvmlDeviceGetCurrentClocksEventReasons replaced ...ThrottleReasons (same bits).
        reasons_of = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if reasons_of is None:
            reasons_of = nv.nvmlDeviceGetCurrentClocksThrottleReasons
        t0 = time.perf_counter()
        while not self._stop.is_set():
            try:
                self.samples.append(
                    ClockSample(
                        t=time.perf_counter() - t0,
                        sm_mhz=int(nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM)),
                        power_w=nv.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                        reasons=int(reasons_of(handle)),
                    )
                )
            except Exception as e:  # keep what was sampled; say why it stopped
                self.error = f"NVML sampling stopped: {type(e).__name__}: {e}"
                return
            self._stop.wait(self.period_s)

    def summary(self) -> dict[str, Any]:
        """:func:`summarize` of the samples, with ``error`` when NVML was unavailable or
        sampling stopped early."""
        out = summarize(self.samples)
        if self.error:
            out["error"] = self.error
        return out
