"""The Triton source of Inductor kernels named in a trace, from the compile caches on disk.

vLLM's compiled graphs name their Inductor kernels generically (``triton_poi_fused_2``), so a
kernel table (``bench/trace_kernels.py``) cannot say which model op a per-layer elementwise
kernel comes from. Inductor writes each graph's wrapper module, with every kernel's Triton
source inlined as ``NAME = async_compile.triton('NAME', '''...''')``, under its cache directory
(``/tmp/torchinductor_<user>`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set) and vLLM keeps its own
copy under ``~/.cache/vllm``. This script finds the kernels by name there and writes each
distinct source once, so the loads and the math say what the kernel does.

Usage (after an engine ran on this machine)::

    python3 bench/inductor_kernels.py triton_poi_fused_2 triton_poi_fused_3 --out kernels.txt
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

#: Files bigger than this are not wrapper modules worth reading.
MAX_FILE_BYTES = 8 << 20
#: Distinct sources kept per kernel name (different graphs may reuse a name).
MAX_SOURCES_PER_NAME = 3


def default_roots() -> list[Path]:
    """Inductor's and vLLM's cache directories on this machine."""
    user = os.environ.get("USER") or "root"
    roots = [Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", f"/tmp/torchinductor_{user}"))]
    roots.append(Path(os.environ.get("VLLM_CACHE_ROOT", Path.home() / ".cache" / "vllm")))
    return [r for r in roots if r.is_dir()]


def _candidate_files(roots: Iterable[Path]) -> Iterator[Path]:
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = Path(dirpath) / name
                try:
                    if path.stat().st_size <= MAX_FILE_BYTES:
                        yield path
                except OSError:
                    continue


def kernel_sources(text: str, name: str) -> list[str]:
    """Every ``name = async_compile.triton('name', '''...''' ...)`` block of a wrapper module's
    text, assignment to closing parenthesis."""
    pattern = re.compile(
        rf"^{re.escape(name)} = async_compile\.triton\(\s*'{re.escape(name)}',\s*'''(.*?)'''",
        re.S | re.M,
    )
    return [m.group(1).strip("\n") for m in pattern.finditer(text)]


def find_kernels(names: list[str], roots: Iterable[Path]) -> dict[str, list[tuple[Path, str]]]:
    """For each name, up to MAX_SOURCES_PER_NAME distinct (file, source) pairs."""
    found: dict[str, list[tuple[Path, str]]] = {n: [] for n in names}
    for path in _candidate_files(roots):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if "async_compile.triton(" not in text:
            continue
        for name in names:
            seen = {src for _, src in found[name]}
            for src in kernel_sources(text, name):
                if src not in seen and len(found[name]) < MAX_SOURCES_PER_NAME:
                    found[name].append((path, src))
                    seen.add(src)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="+", help="kernel names, e.g. triton_poi_fused_2")
    p.add_argument("--root", action="append", type=Path, help="search here (default: caches)")
    p.add_argument("--out", type=Path, help="write the report here (default: stdout)")
    a = p.parse_args(argv)
    missing = [str(r) for r in a.root or [] if not r.is_dir()]
    if missing:
        p.error(f"--root: not a directory: {', '.join(missing)}")
    roots = a.root or default_roots()
    found = find_kernels(a.names, roots)
    lines = [f"# searched: {', '.join(str(r) for r in roots) or '(no cache directory)'}"]
    for name, hits in found.items():
        lines.append(f"\n## {name}: {len(hits)} distinct source(s)")
        for path, src in hits:
            lines += [f"# from {path}", src]
    report = "\n".join(lines) + "\n"
    if a.out:
        a.out.write_text(report)
    else:
        print(report, end="")
    return 0 if any(found.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
