"""CLIP loss on late-training logits (scale 100, rows spread over ~100): mmcl_fast vs open_clip on the CPU, with and
without torch.set_flush_denormal, forward+backward, one process. Writes a JSON record.

    python benchmarks/late_training_logits.py --out benchmarks/results/late_training_logits.json

Why: exp(logit - row max) of most pairs is an fp32 denormal here. Intel cores handle denormals in microcode, so a
loss that computes those exps at full precision can slow down by an order of magnitude or more late in training
(the random-feature benchmarks never reach that regime). The fused kernel flushes denormals in its own threads.
"""
import argparse
import json

import torch

from cpu_acceptance import LOSSES, fwd_bwd, reference_loss
from mmcl_fast.bench.machine import describe
from mmcl_fast.bench.registry import late_training_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--out", default="late_training_logits.json")
    args = parser.parse_args()
    import open_clip

    x, y = late_training_features(args.n, args.d)
    x, y = x.requires_grad_(), y.requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)
    expected = reference_loss(x.detach(), y.detach(), 100.0)
    open_clip_loss = open_clip.loss.ClipLoss()
    impls = {"open_clip": lambda a, b, s, _: open_clip_loss(a, b, s), "mmcl_fast": LOSSES["clip"][0]}
    records = []
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        for name, fn in impls.items():
            fwd_bwd(fn, x, y, scale)  # warm-up
            runs = [fwd_bwd(fn, x, y, scale) for _ in range(2)]
            seconds, loss = min(runs)
            rel_err = abs(loss - expected) / abs(expected)
            records.append({"impl": name, "flush_denormal": flush, "seconds": seconds,
                            "all_seconds": [t for t, _ in runs], "loss": loss, "rel_err": rel_err})
            print(f"torch.set_flush_denormal({flush}) {name}: {seconds:.3f} s, loss {loss:.6g}, rel err {rel_err:.1e}")
    torch.set_flush_denormal(False)
    with open(args.out, "w") as f:
        json.dump({"machine": describe(torch.device("cpu"), ["fp32"], measure_matmul=False), "n": args.n,
                   "d": args.d, "logit_scale": 100.0, "reference_loss": expected, "records": records}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
