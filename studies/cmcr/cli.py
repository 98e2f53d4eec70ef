"""`python -m studies.cmcr`: connect two synthetic contrastive spaces with C-MCR; print a table, write results.json
+ a plot."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmcl_fast.cli.options import (add_backend, add_out, add_progress, add_seed, add_threads, fail, positive_int,
                                   standalone_main)

from .study import ABLATIONS, PRESETS

PROG = "python -m studies.cmcr"
DESCRIPTION = ("Train an A–B and a B–C contrastive space on a synthetic three-modality world, connect them with C-MCR "
               "(Wang et al., NeurIPS 2023) from B samples and unpaired A and C memories only, and evaluate A→C / "
               "C→A retrieval against chance, a paired-data oracle and the ablations.")
DEFAULT_OUT = "out/cmcr"
_QUICK = PRESETS["quick"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"CPU-sized run (spaces: {_QUICK['space']['steps']} steps; projectors of width "
                             f"{_QUICK['method']['hidden']}: {_QUICK['fit']['steps']} steps at batch "
                             f"{_QUICK['fit']['batch']}; one thread): a few minutes on 2 cores. Without it: "
                             "paper-sized projectors (width 1024, batch 4096), for a bigger machine")
    add_seed(parser, "the world, the spaces, the data and the fits")
    parser.add_argument("--steps", type=positive_int, help="projector training steps (overrides the preset)")
    parser.add_argument("--batch", type=positive_int, help="projector batch size (overrides the preset)")
    parser.add_argument("--space-steps", type=positive_int, help="training steps of each contrastive space")
    parser.add_argument("--n-test", type=positive_int, help="held-out test triples (chance R@1 = 1/n)")
    add_backend(parser, "the fused InfoNCE")
    add_threads(parser, "1 with --quick, torch's default otherwise")
    add_out(parser, DEFAULT_OUT)
    add_progress(parser, "no phase messages")


def run(args) -> int:
    import torch

    from .study import preset_config

    preset = "quick" if args.quick else "paper"
    if args.n_test is not None and args.n_test < 2:
        return fail(args, PROG, f"--n-test must be at least 2, got {args.n_test}")
    try:
        cfg = preset_config(preset, seed=args.seed, backend=args.backend, fit_steps=args.steps,
                            fit_batch=args.batch, space_steps=args.space_steps, n_test=args.n_test)
        from mmcl_fast.backends import resolve_backend
        resolve_backend(args.backend, torch.device("cpu"), torch.float32)
    except (ValueError, TypeError, RuntimeError) as exc:
        return fail(args, PROG, str(exc))
    from rich.console import Console

    from .plot import figure
    from .study import run_study

    console = Console(width=max(Console().width, 100))  # the table needs ~100 columns, also when piped
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = args.threads if args.threads is not None else PRESETS[preset]["threads"]
    console.print(f"[bold]cmcr[/bold] ({preset}): seed {args.seed}, spaces {cfg.space.steps} steps, projectors "
                  f"{cfg.fit.steps} steps at batch {cfg.fit.batch}, backend {args.backend}")
    torch_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        on_phase = None if args.no_progress else (lambda text: console.print(f"  {text} ..."))
        results = run_study(cfg, on_phase=on_phase)
    finally:
        torch.set_num_threads(torch_threads)
    results["config"]["preset"] = preset
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    png = figure(results, out_dir / "cmcr.png")
    console.print(results_table(results))
    acceptance = results.get("acceptance")
    if acceptance:
        console.print(f"A→C R@1 = {acceptance['a_to_c_r1_over_chance']:.0f}x chance, "
                      f"{100 * acceptance['a_to_c_r1_over_oracle']:.0f}% of the paired oracle: acceptance "
                      f"{'passed' if acceptance['passed'] else 'NOT passed'} ({acceptance['criteria']})")
    console.print(f"total {results['timing']['total_s']:.1f} s; wrote {out_dir / 'results.json'} and {png}")
    return 0


def results_table(results: dict):
    from rich.table import Table

    table = Table(title="A↔C retrieval on held-out triples (A and C never paired in training)")
    for header in ("variant", "A→C R@1", "A→C R@5", "A→C mAP", "C→A R@1", "C→A R@5", "C→A mAP", "gap A–C"):
        table.add_column(header, justify="left" if header == "variant" else "right")
    rows = []
    if "retrieval" in results:
        rows.append(("C-MCR", results["retrieval"], results["modality_gap"]["after"]["cmcr"]["a_c"]))
    for name in ABLATIONS:
        if name in results["ablations"]:
            entry = results["ablations"][name]
            rows.append((name, entry, entry["modality_gap"]["a_c"]))
    rows.append(("paired oracle", results["oracle"], results["oracle"]["modality_gap"]["a_c"]))
    for label, entry, gap in rows:
        table.add_row(label, *(f"{entry[d][m]:.3f}" for d in ("a_to_c", "c_to_a") for m in ("r1", "r5", "map")),
                      f"{gap:.2f}")
    chance = results["oracle"]["a_to_c"]
    table.add_row("chance", f"{chance['chance_r1']:.3f}", f"{chance['chance_r5']:.3f}", f"{chance['chance_map']:.3f}",
                  f"{chance['chance_r1']:.3f}", f"{chance['chance_r5']:.3f}", f"{chance['chance_map']:.3f}", "")
    return table


main = standalone_main(PROG, DESCRIPTION, add_arguments, run)
