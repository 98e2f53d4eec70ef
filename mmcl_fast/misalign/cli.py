"""`mmcl-fast misalign`: run the selection / perturbation bias study and write results.json + a heatmap."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .._ops import BACKENDS
from .data import N_SEMANTIC, BiasConfig
from .study import PRESETS

_PAPER, _QUICK = PRESETS["paper"], PRESETS["quick"]

DEFAULT_OUT = "out/misalign"


def _index_list(text: str) -> tuple[int, ...]:
    """'0,1,5' → (0, 1, 5); '' or 'none' → (). Raises argparse.ArgumentTypeError with what was expected."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return ()
    values = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated semantic indices in [0, {N_SEMANTIC}), e.g. 0,1,2; got {text!r}") from None
        if not 0 <= value < N_SEMANTIC:
            raise argparse.ArgumentTypeError(
                f"index {value} is out of range: semantic indices lie in [0, {N_SEMANTIC})")
        values.append(value)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"repeated index in {text!r}")
    return tuple(values)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _multipliers(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, e.g. 10,50,10; got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"CPU-sized run (batch {_QUICK['train']['batch']}, {_QUICK['train']['steps']} steps, "
                             "small encoders, one thread): the paper's pattern in minutes. Without it: the paper's "
                             "settings, for a GPU")
    parser.add_argument("--selection", type=_index_list, default=tuple(range(N_SEMANTIC)), metavar="I,J,...",
                        help="θ: semantic indices kept in the text (default: all of 0..9)")
    parser.add_argument("--perturbation", type=_index_list, default=(), metavar="I,J,...",
                        help="ρ ⊆ θ: kept indices randomly shifted in the text with probability 0.75 "
                             "(default: none)")
    parser.add_argument("--dependent", action="store_true", help="semantics ~ N(0, Σ), Σ ~ Wishart(10, I)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mixers, the data and the encoders")
    parser.add_argument("--steps", type=_positive_int,
                        help=f"training steps (paper: {_PAPER['train']['steps']}, --quick: {_QUICK['train']['steps']})")
    parser.add_argument("--batch", type=_positive_int,
                        help=f"batch size (paper: {_PAPER['train']['batch']}, --quick: {_QUICK['train']['batch']})")
    parser.add_argument("--lr", type=_positive_float,
                        help=f"Adam learning rate, constant (paper: {_PAPER['train']['lr']:g}, "
                             f"--quick: {_QUICK['train']['lr']:g})")
    parser.add_argument("--hidden", type=_multipliers,
                        help="encoder hidden widths as multiples of the input size (paper: "
                             f"{','.join(map(str, _PAPER['train']['hidden']))}, "
                             f"--quick: {','.join(map(str, _QUICK['train']['hidden']))})")
    parser.add_argument("--encoding-size", type=_positive_int, help="representation size (default: |θ \\ ρ|)")
    parser.add_argument("--eval-samples", type=_positive_int,
                        help=f"validation and test samples each (paper: {_PAPER['eval']['n_val']}, --quick: "
                             f"{_QUICK['eval']['n_val']}); the kernel ridge regressor uses a subsample of at most "
                             f"{_PAPER['eval']['n_nonlinear']} (--quick: {_QUICK['eval']['n_nonlinear']})")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="backend of the fused InfoNCE primitive (default: auto)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=_positive_int,
                        help="torch intra-op threads (default: 1 with --quick, torch's default otherwise)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--combine", nargs="+", metavar="DIR",
                        help="no training: draw one heatmap (image, non-linear R²) from the results.json of "
                             "earlier runs, one column per run, into --out")


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "misalign", help="selection / perturbation bias study (Cai et al., 2025)",
        description="Train image/text encoders with the squared-L2 symmetric InfoNCE on a synthetic latent model "
                    "whose text keeps only the selected semantics (θ) and randomly perturbs some of them (ρ), "
                    "then report how well each latent can be predicted from the learned representations.")
    add_arguments(parser)
    parser.set_defaults(func=run, _parser=parser)
    return parser


def _settings(args) -> tuple[BiasConfig, "TrainConfig", "EvalConfig", int | None, str]:
    import torch

    from .._ops import resolve_backend
    from .study import EvalConfig
    from .train import TrainConfig

    bias = BiasConfig(selection=args.selection, perturbation=args.perturbation, dependent=args.dependent)
    preset = PRESETS["quick" if args.quick else "paper"]
    train_kw = dict(preset["train"])
    for name in ("steps", "batch", "lr", "hidden", "encoding_size"):
        if getattr(args, name) is not None:
            train_kw[name] = getattr(args, name)
    train_cfg = TrainConfig(**train_kw, backend=args.backend, seed=args.seed)
    eval_kw = dict(preset["eval"])
    if args.eval_samples is not None:
        eval_kw.update(n_val=args.eval_samples, n_test=args.eval_samples,
                       n_nonlinear=min(eval_kw["n_nonlinear"], args.eval_samples))
    eval_cfg = EvalConfig(**eval_kw)
    threads = args.threads if args.threads is not None else preset["threads"]
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as cpu or cuda:0, got {args.device!r}") from None
    resolve_backend(args.backend, device, torch.float32)  # a backend the device cannot run fails here, not mid-run
    return bias, train_cfg, eval_cfg, threads, str(device)


def _error(args, message: str) -> int:
    parser = getattr(args, "_parser", None)
    if parser is not None:
        parser.error(message)  # exits with status 2 and the usage line
    print(f"mmcl-fast misalign: error: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    if args.combine:
        return _combine(args)
    try:
        bias, train_cfg, eval_cfg, threads, device = _settings(args)
    except (ValueError, TypeError) as exc:
        return _error(args, str(exc))
    import torch
    from rich.console import Console
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency: caps BLAS threads in the regressors

    from .plot import heatmap, setting_label
    from .study import run_study

    console = Console()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]misalign[/bold]: θ={list(bias.selection)} ρ={list(bias.perturbation)} "
                  f"{'dependent' if bias.dependent else 'independent'} | steps {train_cfg.steps}, "
                  f"batch {train_cfg.batch}, lr {train_cfg.lr:g}, backend {train_cfg.backend}, device {device}")
    torch_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with _progress(console, train_cfg.steps, disable=args.no_progress) as on_step, threadpool_limits(threads):
            results = run_study(bias, train_cfg, eval_cfg, device=device, on_step=on_step,
                                extra_config={"quick": bool(args.quick)})
    finally:
        torch.set_num_threads(torch_threads)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    title = setting_label(results["config"]).replace("\n", "  ")
    columns = [("image\nnon-linear", results["r2"]["nonlinear"]), ("image\nlinear", results["r2"]["linear"]),
               ("text\nnon-linear", results["text_r2"]["nonlinear"]), ("text\nlinear", results["text_r2"]["linear"]),
               ("oracle\n(from θ\\ρ)", results["oracle_r2"])]
    png = heatmap(columns, results["roles"], out_dir / "heatmap.png", title)
    console.print(results_table(results))
    console.print(f"train {results['timing']['train_s']:.1f} s, eval {results['timing']['eval_s']:.1f} s; "
                  f"wrote {out_dir / 'results.json'} and {png}")
    return 0


def results_table(results: dict):
    from rich.table import Table

    from .evaluate import LATENTS
    from .plot import ROLE_TAGS

    table = Table(title="R² of each latent on held-out test samples")
    for header in ("latent", "role", "image non-lin", "image linear", "text non-lin", "text linear", "oracle"):
        table.add_column(header, justify="left" if header in ("latent", "role") else "right")
    for name in LATENTS:
        table.add_row(name, ROLE_TAGS[results["roles"][name]],
                      *(f"{value:.2f}" for value in (results["r2"]["nonlinear"][name], results["r2"]["linear"][name],
                                                     results["text_r2"]["nonlinear"][name],
                                                     results["text_r2"]["linear"][name], results["oracle_r2"][name])))
    return table


class _progress:
    """Context manager yielding an on_step(step, loss) callback that drives a rich progress bar."""

    def __init__(self, console, total: int, disable: bool):
        self.console, self.total, self.disable = console, total, disable

    def __enter__(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console, disable=self.disable)
        self.bar.__enter__()
        self.task = self.bar.add_task("train", total=self.total, loss="")

        def on_step(step: int, loss: float) -> None:
            fields = {} if math.isnan(loss) else {"loss": f"loss {loss:.4f}"}
            self.bar.update(self.task, completed=step + 1, **fields)

        return on_step

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


def _combine(args) -> int:
    from .plot import heatmap, setting_label

    runs = []
    for directory in args.combine:
        path = Path(directory) / "results.json"
        if not path.is_file():
            return _error(args, f"--combine: no results.json in {directory}")
        runs.append(json.loads(path.read_text()))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [(setting_label(run["config"]), run["r2"]["nonlinear"]) for run in runs]
    png = heatmap(columns, runs[0]["roles"] if len(runs) == 1 else None, out_dir / "heatmap_combined.png",
                  "non-linear R² from the image representation, one column per setting")
    print(f"wrote {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmcl-fast misalign")
    add_arguments(parser)
    parser.set_defaults(func=run, _parser=parser)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
