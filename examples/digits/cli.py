"""`python -m examples.digits`: train a small open_clip CLIP with gradient-cached steps and evaluate it zero-shot."""
from __future__ import annotations

import argparse
import json

from mmcl_fast.cli.options import (add_device, add_out, add_progress, add_seed, add_threads, fail, non_negative_int,
                                   positive_float, positive_int, standalone_main)

from .run import FULL, QUICK, TrainConfig

PROG = "python -m examples.digits"
DESCRIPTION = ("Train a small open_clip CLIP from random init with mmcl_fast.train.grad_cached_step at a batch several "
               "times its chunk, then evaluate it zero-shot on held-out images. Writes log.jsonl, checkpoint.pt and "
               "results.json to --out. Runs under torchrun (DDP).")
DEFAULT_OUT = "out/train"


def _data(text: str) -> str:
    if text == "digits" or (text.startswith("csv:") and len(text) > 4):
        return text
    raise argparse.ArgumentTypeError(f"expected 'digits' or 'csv:PATH' (open_clip's CSV with filepath and title "
                                     f"columns), got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=_data, default="digits",
                        help="digits: scikit-learn's handwritten digits with templated captions (default); "
                             "csv:PATH: open_clip's CSV format (filepath and title columns, tab or comma)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['steps']} steps of batch {QUICK['batch_size']} in chunks of "
                             f"{QUICK['chunk_size']} (a few minutes on 2 CPU cores); default: {FULL['steps']} steps")
    parser.add_argument("--steps", type=positive_int, help="optimizer steps (overrides --quick)")
    parser.add_argument("--batch-size", type=positive_int,
                        help=f"global contrastive batch over all ranks (default {FULL['batch_size']})")
    parser.add_argument("--chunk-size", type=positive_int,
                        help=f"rows per encoder call on each rank (default {FULL['chunk_size']})")
    parser.add_argument("--lr", type=positive_float, default=TrainConfig.lr, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=non_negative_int, default=TrainConfig.warmup, help="linear warm-up steps")
    parser.add_argument("--loss", choices=("clip", "siglip"), default="clip",
                        help="mmcl_fast.ClipLoss (default) or mmcl_fast.SigLipLoss")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16 autocast for the encoders")
    add_seed(parser, "the weights, the data order and the augmentation")
    parser.add_argument("--log-every", type=positive_int, default=TrainConfig.log_every,
                        help="steps between JSONL log records")
    parser.add_argument("--eval-every", type=non_negative_int, default=0,
                        help="steps between zero-shot evaluations (default 0: at the end only)")
    parser.add_argument("--checkpoint-every", type=positive_int, default=TrainConfig.checkpoint_every,
                        help="steps between checkpoints (and one at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--stop-at", type=positive_int, metavar="STEP",
                        help="stop after this step, leaving a checkpoint that --resume continues (a time-limited job)")
    add_device(parser)
    add_threads(parser, "1 with --quick, torch's default otherwise")
    add_out(parser, DEFAULT_OUT)
    add_progress(parser)


def config_from_args(args) -> TrainConfig:
    preset = QUICK if args.quick else FULL
    cfg = TrainConfig(data=args.data, out=args.out, steps=args.steps or preset["steps"],
                      batch_size=args.batch_size or preset["batch_size"],
                      chunk_size=args.chunk_size or preset["chunk_size"], lr=args.lr, warmup=args.warmup,
                      loss=args.loss, precision=args.precision, seed=args.seed, log_every=args.log_every,
                      eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, resume=args.resume,
                      stop_at=args.stop_at, progress=not args.no_progress, device=args.device)
    if cfg.warmup >= cfg.steps:
        cfg.warmup = max(0, cfg.steps // 10)
    return cfg


def run(args) -> int:
    import torch

    from .run import train
    threads = args.threads if args.threads is not None else (QUICK if args.quick else FULL)["threads"]
    if threads is not None:  # one thread per process: no OpenMP spin-waiting on a small, shared CPU
        torch.set_num_threads(threads)
    try:
        cfg = config_from_args(args)
        results = train(cfg)
    except (ValueError, FileNotFoundError) as exc:
        return fail(args, PROG, str(exc))
    if results is not None and "stopped_at" in results:
        print(f"stopped after step {results['stopped_at']}; continue with --resume from {results['checkpoint']}")
    elif results is not None:
        shown = {k: results[k] for k in ("zero_shot_accuracy", "retrieval_top1", "batch_size", "chunk_size", "steps",
                                         "seconds", "peak_mib", "world_size") if k in results}
        print(json.dumps(shown, indent=2))
        print(f"wrote {cfg.out}/results.json, log.jsonl, checkpoint.pt")
    return 0


main = standalone_main(PROG, DESCRIPTION, add_arguments, run)
