"""The `mmcl-fast` command line. Each subcommand lives in its own module and registers itself here."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module exposing `register(subparsers)`; the registered parser sets `func(args) -> int`.
SUBCOMMANDS = {
    "bench": "mmcl_fast.bench.cli",
    "info": "mmcl_fast.bench.info",
    "misalign": "mmcl_fast.misalign.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcl-fast", description="Exact, memory-efficient multimodal contrastive losses: benchmarks and studies.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
