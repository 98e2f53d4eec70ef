"""Pieces every command line built on mmcl_fast shares: `mmcl-fast bench`, the studies in `studies/` and the
examples in `examples/` use them, so a flag means the same thing and a bad value reads the same everywhere.

- argparse value types (`positive_int`, `non_negative_int`, `positive_float`, `int_list`, `choice_list`): each
  rejects a bad value with a message that says what was expected (argparse prefixes the flag's name);
- `add_backend`, `add_device`, `add_threads`, `add_seed`, `add_out`, `add_progress`: the common flags;
- `fail`: report a bad combination of flags like argparse does (usage line, exit status 2);
- `standalone_main`: the `main(argv)` of a command that is run as `python -m package`.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable


def _int_at_least(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def int_list(example: str, what: str = "ints", *, minimum: int | None = None,
             distinct: bool = False) -> Callable[[str], tuple[int, ...]]:
    """An argparse type for comma-separated ints (e.g. `--eval-at 12000,24000`); bad text names the expected form,
    with `example` as the sample. minimum: the smallest value allowed; distinct: no value twice."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            values = ()
        if (not values or (minimum is not None and min(values) < minimum)
                or (distinct and len(set(values)) != len(values))):
            raise argparse.ArgumentTypeError(f"expected {'distinct ' if distinct else ''}comma-separated {what}, "
                                             f"e.g. {example}; got {text!r}")
        return values
    return parse


def choice_list(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse type for comma-separated names out of `choices` (e.g. `--dtype fp32,bf16`), in the given order,
    without repeats."""
    allowed = tuple(choices)

    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected comma-separated names out of {', '.join(allowed)}; "
                                             f"got {text!r}")
        return list(dict.fromkeys(values))
    return parse


def add_backend(parser: argparse.ArgumentParser, what: str = "the fused loss") -> None:
    """--backend: one of `mmcl_fast.backends.BACKENDS` (default auto)."""
    from ..backends import BACKENDS
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help=f"backend of {what} (default: auto, the fastest this device and dtype can run)")


def add_device(parser: argparse.ArgumentParser) -> None:
    """--device: a torch device string; None means cuda when available, else cpu (`default_device`)."""
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def default_device(choice: str | None):
    """The torch.device of a --device value (None: cuda if available, else cpu)."""
    import torch
    if choice is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def add_threads(parser: argparse.ArgumentParser, default: str = "torch's default") -> None:
    parser.add_argument("--threads", type=positive_int, help=f"torch intra-op threads (default: {default})")


def add_seed(parser: argparse.ArgumentParser, what: str = "the random data and weights") -> None:
    parser.add_argument("--seed", type=int, default=0, help=f"seed of {what} (default 0)")


def add_out(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--out", default=default, help=f"output directory (default: {default})")


def add_progress(parser: argparse.ArgumentParser, what: str = "no progress bar") -> None:
    parser.add_argument("--no-progress", action="store_true", help=what)


def fail(args: argparse.Namespace, prog: str, message: str) -> int:
    """Report a bad value or combination of flags: through the parser when there is one (usage line, exit status
    2), else on stderr with status 2 (a Namespace built by a caller)."""
    parser = getattr(args, "_parser", None)
    if parser is not None:
        parser.error(message)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def standalone_main(prog: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                    run: Callable[[argparse.Namespace], int]) -> Callable[[list[str] | None], int]:
    """The `main(argv) -> exit status` of a command run as `python -m package`: a parser named `prog` with the
    command's arguments, whose namespace carries the parser (for `fail`)."""
    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=description)
        add_arguments(parser)
        parser.set_defaults(_parser=parser)
        return int(run(parser.parse_args(argv)) or 0)
    return main
