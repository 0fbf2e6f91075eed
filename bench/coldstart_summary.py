"""One table of vLLM engine starts from `bench_vllm_e2e.py` result folders (gpu_e2e.sh job
`e2e_coldstart`): per engine, its settings, the engine start (`LLM(...)` until it returned),
vLLM's "init engine" time and its compile share, and what our background kernel compile
logged (time, families compiled and found cached).

    python3 bench/coldstart_summary.py RESULT_DIR... [--out coldstart.md]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

INIT = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s"
                  r"(?: \(compilation: ([0-9.]+) s\))?")
READY = re.compile(r"kernels for (\S+) ready in ([0-9.]+) s \(compiled: ([^;]*); already cached: "
                   r"([^)]*)\)")
# Wheels before 71a4814 logged the families but not which were cached.
READY_V1 = re.compile(r"kernels ([a-z_0-9, ]+) for (\S+) ready in ([0-9.]+) s")
STARTED = "while the weights load"


def engine_row(folder: Path) -> dict[str, str]:
    """The table cells of one result folder (empty where a file or line is missing)."""
    row = {"engine": folder.name, "start_s": "", "init_s": "", "vllm_compile_s": "",
           "kernels": "not started"}
    result = folder / "result.json"
    if result.is_file():
        runs = json.loads(result.read_text()).get("runs", {})
        run = runs.get("ours_full") or next(iter(runs.values()), {})
        if isinstance(run.get("startup_s"), (int, float)):
            row["start_s"] = f"{run['startup_s']:.1f}"
    log = folder / "ours_full.log"
    if log.is_file():
        text = log.read_text(errors="replace").replace("\r", "\n")
        if m := INIT.search(text):
            row["init_s"] = m.group(1)
            row["vllm_compile_s"] = m.group(2) or ""
        if m := READY.search(text):
            row["kernels"] = (f"{m.group(2)} s for {m.group(1)}; compiled: {m.group(3)}; "
                              f"cached: {m.group(4)}")
        elif m := READY_V1.search(text):
            row["kernels"] = f"{m.group(3)} s for {m.group(2)} ({m.group(1)}; cached not logged)"
        elif STARTED in text:
            row["kernels"] = "started; no end logged"
    return row


def table(folders: list[Path]) -> str:
    lines = [
        "| engine | engine start s | vLLM init engine s | of it torch.compile s | "
        "background kernel compile |",
        "|---|---|---|---|---|",
    ]
    for f in folders:
        r = engine_row(f)
        lines.append(f"| {r['engine']} | {r['start_s']} | {r['init_s']} | "
                     f"{r['vllm_compile_s']} | {r['kernels']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    md = table(a.folders)
    print(md, end="")
    if a.out:
        a.out.write_text(md)


if __name__ == "__main__":
    main()
