"""The `mmcl-fast` command line. Each subcommand lives in its own module and registers itself here."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module exposing `register(subparsers)`; the registered parser sets `func(args) -> int`.
# (The studies and the examples are not subcommands: they live beside the package, `python -m studies.misalign`.)
SUBCOMMANDS = {
    "bench": "mmcl_fast.bench.cli",
    "info": "mmcl_fast.bench.info",
}
# The extra that brings each subcommand's optional dependencies (pyproject.toml); the core needs none of them.
EXTRAS = {"bench": "bench", "info": None}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = argparse.ArgumentParser(
        prog="mmcl-fast", description="Exact, memory-efficient multimodal contrastive losses: benchmarks and info.")
    parser.add_argument("--version", action="version", version=f"mmcl-fast {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        try:
            importlib.import_module(module_name).register(subparsers)
        except ModuleNotFoundError as exc:  # an extra is not installed: the subcommand explains, the others work
            if exc.name is None or exc.name.split(".")[0] == "mmcl_fast":
                raise
            stub = subparsers.add_parser(name, help=f"(needs: pip install 'mmcl_fast[{EXTRAS[name]}]')")
            stub.set_defaults(func=lambda args, exc=exc: _raise(exc), stub=True)
    return parser


def _raise(exc: Exception):
    raise exc


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "stub", False):  # a stub subcommand takes any flags: it only explains
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get(args.command)
        if extra is None or exc.name is None or exc.name.split(".")[0] == "mmcl_fast":
            raise
        print(f"mmcl-fast {args.command}: needs the optional package {exc.name!r}; install the extra with "
              f"pip install 'mmcl_fast[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
