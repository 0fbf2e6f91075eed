"""The `gptoss-3090` command line."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptoss-3090")
    parser.parse_args(argv)
    return 0
