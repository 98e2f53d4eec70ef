"""`python -m studies.misalign`: run the selection / perturbation bias study (several seeds, or a sweep over k) and
write results.json + a heatmap (+ sweep.json and an R²-against-k plot for a sweep)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mmcl_fast.cli.options import (add_backend, add_device, add_out, add_progress, add_seed, add_threads,
                                   default_device, fail, int_list, positive_float, positive_int, standalone_main)

from .data import MIXERS, N_SEMANTIC, BiasConfig
from .study import PRESETS, SWEEPS
from .train import INITS, OBJECTIVES

_PAPER, _QUICK = PRESETS["paper"], PRESETS["quick"]

PROG = "python -m studies.misalign"
DESCRIPTION = ("Train image/text encoders with the squared-L2 symmetric InfoNCE on a synthetic latent model whose text "
               "keeps only the selected semantics (θ) and randomly perturbs some of them (ρ), then report how well "
               "each latent can be predicted from the learned representations (Cai et al., 2025).")
DEFAULT_OUT = "out/misalign"
QUICK_SEEDS = 3  # default --seeds with --quick (a single setting); 1 otherwise and for a sweep


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


_k_list = int_list("1,5,10", distinct=True)
_multipliers = int_list("10,50,10", "positive ints", minimum=1)
_step_list = int_list("12000,24000", "training steps", minimum=1, distinct=True)


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
    add_seed(parser, "the first run: the runs use seeds SEED..SEED+K-1, each seeding the mixers, the covariances "
                     "in the dependent case, the data and the encoders")
    parser.add_argument("--seeds", type=positive_int, metavar="K",
                        help=f"number of seeds K (default: {QUICK_SEEDS} with --quick, 1 otherwise and per sweep "
                             "point); results.json keeps every seed's R² and their mean ± std")
    parser.add_argument("--objective", default="clip", choices=OBJECTIVES,
                        help="clip: symmetric squared-L2 InfoNCE with in-batch cross-modal negatives (default); "
                             "lpsimclr: the paper code's LpSimCLR (negatives from a second batch of the anchor's "
                             "modality, positive inside a log-mean-exp; twice the encoder work per step)")
    parser.add_argument("--mixer", default="paper", choices=MIXERS,
                        help="paper: the paper code's column-normalised uniform weights under its condition-number "
                             "threshold (default); spectral: singular values in [1/2, 2]")
    parser.add_argument("--mlp-regressor", action="store_true",
                        help="also score an MLP regressor (scikit-learn MLPRegressor, 100 hidden units) beside "
                             "kernel ridge, as the paper's lighter option")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="seeds, and with --sweep every (k, seed) pair, trained in parallel worker "
                             "processes, each on --threads threads (default: 1)")
    parser.add_argument("--sweep", choices=SWEEPS,
                        help="the paper's sweeps, one run per k: selection θ = {0..k-1}, ρ = ∅ (k = 1..10); "
                             "perturbation θ = {0..9}, ρ = {0..k-1} (k = 0..9). Ignores --selection/--perturbation")
    parser.add_argument("--sweep-values", type=_k_list, metavar="K,K,...",
                        help="run only these k of the sweep (default: all)")
    parser.add_argument("--steps", type=positive_int,
                        help=f"training steps (paper: {_PAPER['train']['steps']}, --quick: {_QUICK['train']['steps']})")
    parser.add_argument("--batch", type=positive_int,
                        help=f"batch size (paper: {_PAPER['train']['batch']}, --quick: {_QUICK['train']['batch']})")
    parser.add_argument("--lr", type=positive_float,
                        help=f"Adam learning rate, constant (paper: {_PAPER['train']['lr']:g}, "
                             f"--quick: {_QUICK['train']['lr']:g})")
    parser.add_argument("--hidden", type=_multipliers,
                        help="encoder hidden widths as multiples of the input size (paper: "
                             f"{','.join(map(str, _PAPER['train']['hidden']))}, "
                             f"--quick: {','.join(map(str, _QUICK['train']['hidden']))})")
    parser.add_argument("--encoding-size", type=positive_int, help="representation size (default: |θ \\ ρ|)")
    parser.add_argument("--init", choices=INITS,
                        help="encoder initialisation: torch (PyTorch's default, as in the paper) or kaiming (He "
                             f"init for LeakyReLU, zero biases) (paper: {_PAPER['train']['init']}, --quick: "
                             f"{_QUICK['train']['init']})")
    parser.add_argument("--eval-samples", type=positive_int,
                        help=f"validation and test samples each (paper: {_PAPER['eval']['n_val']}, --quick: "
                             f"{_QUICK['eval']['n_val']}); the kernel ridge regressor uses a subsample of at most "
                             f"{_PAPER['eval']['n_nonlinear']} (--quick: {_QUICK['eval']['n_nonlinear']})")
    parser.add_argument("--eval-at", type=_step_list, metavar="STEP,STEP,...",
                        help="also score the encoders after these training steps (each below --steps): "
                             "results.json's `checkpoints` keep every seed's R² there, to see when the pattern "
                             "appears (each costs one evaluation, a few seconds in --quick). Default: "
                             + (",".join(map(str, _QUICK["eval"]["at_steps"])) + " with --quick, " if
                                _QUICK["eval"].get("at_steps") else "") + "none otherwise")
    add_backend(parser, "the fused InfoNCE primitive")
    add_device(parser)
    add_threads(parser, "1 with --quick, torch's default otherwise")
    add_out(parser, DEFAULT_OUT)
    add_progress(parser)
    parser.add_argument("--combine", nargs="+", metavar="DIR",
                        help="no training: draw one heatmap (image, non-linear R²) from the results.json of "
                             "earlier runs, one column per run, into --out")
    parser.add_argument("--merge", nargs="+", metavar="DIR",
                        help="no training: merge the results.json of earlier runs of one setting with disjoint "
                             "seeds (e.g. seeds run on different machines, or the rest of an interrupted run) "
                             "into one results.json (every seed's R², mean ± std) and heatmap in --out")


def _settings(args) -> tuple[BiasConfig, "TrainConfig", "EvalConfig", int | None, str, list[int]]:
    import torch

    from mmcl_fast.backends import resolve_backend

    from .study import EvalConfig
    from .train import TrainConfig

    bias = BiasConfig(selection=args.selection, perturbation=args.perturbation, dependent=args.dependent)
    preset = PRESETS["quick" if args.quick else "paper"]
    train_kw = dict(preset["train"])
    for name in ("steps", "batch", "lr", "hidden", "encoding_size", "init"):
        if getattr(args, name) is not None:
            train_kw[name] = getattr(args, name)
    train_cfg = TrainConfig(**train_kw, backend=args.backend, objective=args.objective, seed=args.seed)
    eval_kw = dict(preset["eval"])
    if args.eval_samples is not None:
        eval_kw.update(n_val=args.eval_samples, n_test=args.eval_samples,
                       n_nonlinear=min(eval_kw["n_nonlinear"], args.eval_samples))
    if args.eval_at is not None:
        late = [step for step in args.eval_at if step >= train_cfg.steps]
        if late:
            raise ValueError(f"--eval-at steps must lie below --steps ({train_cfg.steps}), got {late}")
        eval_kw["at_steps"] = tuple(args.eval_at)
    else:  # the preset's checkpoints that a shorter run still reaches
        eval_kw["at_steps"] = tuple(step for step in eval_kw.get("at_steps", ()) if step < train_cfg.steps)
    eval_cfg = EvalConfig(**eval_kw)
    threads = args.threads if args.threads is not None else preset["threads"]
    try:
        device = default_device(args.device)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as cpu or cuda:0, got {args.device!r}") from None
    resolve_backend(args.backend, device, torch.float32)  # a backend the device cannot run fails here, not mid-run
    n_seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick and not args.sweep else 1)
    return bias, train_cfg, eval_cfg, threads, str(device), list(range(args.seed, args.seed + n_seeds))


def run(args) -> int:
    if args.combine and args.merge:
        return fail(args, PROG, "--combine and --merge are separate jobs: give one of them")
    if args.combine:
        return _combine(args)
    if args.merge:
        return _merge(args)
    try:
        bias, train_cfg, eval_cfg, threads, device, seeds = _settings(args)
        sweep = None
        if args.sweep:
            from .study import sweep_settings
            sweep = sweep_settings(args.sweep, args.sweep_values, args.dependent)
        elif args.sweep_values is not None:
            raise ValueError("--sweep-values needs --sweep")
    except (ValueError, TypeError) as exc:
        return fail(args, PROG, str(exc))
    import torch
    from rich.console import Console
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency: caps BLAS threads in the regressors

    console = Console()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with threadpool_limits(threads):
            if sweep is None:
                _run_setting(args, console, bias, train_cfg, eval_cfg, threads, device, seeds, out_dir)
            else:
                _run_sweep(args, console, sweep, train_cfg, eval_cfg, threads, device, seeds, out_dir)
    finally:
        torch.set_num_threads(torch_threads)
    return 0


def _run_setting(args, console, bias, train_cfg, eval_cfg, threads, device, seeds, out_dir: Path,
                 extra: dict | None = None) -> dict:
    from .study import run_study

    console.print(f"[bold]misalign[/bold]: θ={list(bias.selection)} ρ={list(bias.perturbation)} "
                  f"{'dependent' if bias.dependent else 'independent'} | {train_cfg.objective}, {args.mixer} mixers, "
                  f"seeds {seeds[0]}..{seeds[-1]}, steps {train_cfg.steps}, batch {train_cfg.batch}, "
                  f"lr {train_cfg.lr:g}, backend {train_cfg.backend}, device {device}")
    parallel = args.jobs > 1 and len(seeds) > 1

    out_dir.mkdir(parents=True, exist_ok=True)

    def on_seed(result: dict) -> None:
        # each seed is kept as it finishes, so an interrupted multi-seed run leaves what it measured
        (out_dir / f"seed_{result['seed']}.json").write_text(json.dumps(result, indent=1) + "\n")
        console.print(f"  seed {result['seed']}: train {result['train_s']:.0f} s, eval {result['eval_s']:.0f} s, "
                      f"image non-linear R² of the invariant block {result['image']['nonlinear']['s_inv']:.3f}")

    with _progress(console, train_cfg.steps * len(seeds), disable=args.no_progress or parallel) as bar:
        results = run_study(bias, train_cfg, eval_cfg, seeds=seeds, device=device, mixer=args.mixer,
                            mlp=args.mlp_regressor, jobs=args.jobs, threads=threads,
                            on_step=None if parallel else bar.on_step,
                            on_seed=lambda result: (bar.next_seed(), on_seed(result)),
                            extra_config={"quick": bool(args.quick), **(extra or {})})
    _write_setting(console, results, out_dir)
    return results


def _write_setting(console, results: dict, out_dir: Path) -> None:
    """results.json, heatmap.png and the R² table of one setting."""
    from .plot import heatmap, setting_label

    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    n_seeds = len(results["seeds"])
    title = (setting_label(results["config"]).replace("\n", "  ")
             + f"  {results['config']['objective']}, mean of {n_seeds}")
    columns = [("image\nnon-linear", results["r2"]["nonlinear"]), ("image\nlinear", results["r2"]["linear"]),
               ("text\nnon-linear", results["text_r2"]["nonlinear"]), ("text\nlinear", results["text_r2"]["linear"]),
               ("oracle\n(from θ\\ρ)", results["oracle_r2"])]
    png = heatmap(columns, results["roles"], out_dir / "heatmap.png", title, names=results["latents"])
    console.print(results_table(results))
    for point in results.get("checkpoints", []):
        check = point["pattern_check"]
        console.print(f"after {point['step']} steps (image, non-linear, per seed): lowest invariant R² "
                      + ", ".join(f"{v:.2f}" for v in check["invariant_min"]) + "; highest other "
                      + ", ".join(f"{v:.2f}" for v in check["others_max"]) + "; largest |R² - oracle| "
                      + ", ".join(f"{v:.2f}" for v in check["oracle_gap_max"]))
    timing = results["timing"]
    console.print(f"train {sum(timing['train_s_by_seed']):.0f} s, eval {sum(timing['eval_s_by_seed']):.0f} s "
                  f"over {n_seeds} seed(s); wrote {out_dir / 'results.json'} and {png}")


def _run_sweep(args, console, sweep, train_cfg, eval_cfg, threads, device, seeds, out_dir: Path) -> None:
    from .plot import sweep_plot

    if args.jobs > 1 and len(sweep) > 1:  # every (k, seed) pair is one job of one worker pool
        from .study import run_studies

        console.print(f"[bold]misalign[/bold] --sweep {args.sweep}: k = {[k for k, _ in sweep]} | "
                      f"{train_cfg.objective}, seeds {seeds[0]}..{seeds[-1]}, steps {train_cfg.steps}, "
                      f"{args.jobs} workers")

        def on_seed(index: int, result: dict) -> None:
            k_dir = out_dir / f"k{sweep[index][0]}"
            k_dir.mkdir(parents=True, exist_ok=True)
            (k_dir / f"seed_{result['seed']}.json").write_text(json.dumps(result, indent=1) + "\n")
            console.print(f"  k = {sweep[index][0]}, seed {result['seed']}: train {result['train_s']:.0f} s, "
                          f"image non-linear R² of the invariant block {result['image']['nonlinear']['s_inv']:.3f}")

        documents = run_studies([bias for _, bias in sweep], train_cfg, eval_cfg, seeds=seeds, device=device,
                                mixer=args.mixer, mlp=args.mlp_regressor, jobs=args.jobs, threads=threads,
                                on_seed=on_seed,
                                extra_configs=[{"quick": bool(args.quick), "sweep": args.sweep, "k": k}
                                               for k, _ in sweep])
        for (k, _), results in zip(sweep, documents):
            (out_dir / f"k{k}").mkdir(parents=True, exist_ok=True)
            _write_setting(console, results, out_dir / f"k{k}")
    else:
        documents = [_run_setting(args, console, bias, train_cfg, eval_cfg, threads, device, seeds,
                                  out_dir / f"k{k}", extra={"sweep": args.sweep, "k": k}) for k, bias in sweep]
    points = []
    for (k, bias), results in zip(sweep, documents):
        points.append({"k": k, "dir": f"k{k}", "selection": list(bias.selection),
                       "perturbation": list(bias.perturbation), "roles": results["roles"],
                       "r2": results["r2"], "r2_std": results["r2_std"], "text_r2": results["text_r2"],
                       "oracle_r2": results["oracle_r2"], "pattern_check": results["pattern_check"]})
    summary = {"sweep": args.sweep, "dependent": bool(args.dependent), "objective": train_cfg.objective,
               "seeds": seeds, "points": points, "config": results["config"], "environment": results["environment"]}
    (out_dir / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    png = sweep_plot(summary, out_dir / f"sweep_{args.sweep}.png")
    console.print(f"wrote {out_dir / 'sweep.json'} and {png}")


def results_table(results: dict):
    from rich.table import Table

    from .plot import ROLE_TAGS

    n_seeds = len(results["seeds"])
    table = Table(title=f"R² of each latent on held-out test samples (mean ± std over {n_seeds} seed(s))")
    columns = [("image non-lin", "r2", "nonlinear"), ("image linear", "r2", "linear")]
    if "mlp" in results["r2"]:
        columns.append(("image MLP", "r2", "mlp"))
    columns += [("text non-lin", "text_r2", "nonlinear"), ("text linear", "text_r2", "linear")]
    for header in ("latent", "role", *(c[0] for c in columns), "oracle"):
        table.add_column(header, justify="left" if header in ("latent", "role") else "right")
    for name in results["latents"]:
        cells = [f"{results[key][reg][name]:.2f} ± {results[key + '_std'][reg][name]:.2f}" for _, key, reg in columns]
        table.add_row(name, ROLE_TAGS[results["roles"][name]], *cells, f"{results['oracle_r2'][name]:.2f}")
    return table


class _progress:
    """Context manager yielding a handle whose on_step(step, loss) drives one rich progress bar over all seeds."""

    def __init__(self, console, total: int, disable: bool):
        self.console, self.total, self.disable = console, total, disable
        self.offset = 0

    def __enter__(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console, disable=self.disable)
        self.bar.__enter__()
        self.task = self.bar.add_task("train", total=self.total, loss="")
        self.steps = None
        return self

    def on_step(self, step: int, loss: float) -> None:
        fields = {} if math.isnan(loss) else {"loss": f"loss {loss:.4f}"}
        self.steps = step + 1
        self.bar.update(self.task, completed=self.offset + step + 1, **fields)

    def next_seed(self) -> None:
        self.offset += self.steps or 0

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


def _read_results(directories: list[str]) -> list[dict]:
    """The results.json of each directory (ValueError when one has none)."""
    documents = []
    for directory in directories:
        path = Path(directory) / "results.json"
        if not path.is_file():
            raise ValueError(f"no results.json in {directory}")
        documents.append(json.loads(path.read_text()))
    return documents


def _combine(args) -> int:
    from .plot import heatmap, setting_label

    try:
        runs = _read_results(args.combine)
    except ValueError as exc:
        return fail(args, PROG, f"--combine: {exc}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [(setting_label(run["config"]), run["r2"]["nonlinear"]) for run in runs]
    png = heatmap(columns, runs[0]["roles"] if len(runs) == 1 else None, out_dir / "heatmap_combined.png",
                  "non-linear R² from the image representation (mean over seeds), one column per setting")
    print(f"wrote {png}")
    return 0


def _merge(args) -> int:
    from rich.console import Console

    from .study import merge_results

    try:
        results = merge_results(_read_results(args.merge), sources=[str(d) for d in args.merge])
    except ValueError as exc:
        return fail(args, PROG, f"--merge: {exc}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_setting(Console(), results, out_dir)
    return 0


main = standalone_main(PROG, DESCRIPTION, add_arguments, run)
