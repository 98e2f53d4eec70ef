"""Largest trainable contrastive batch at a fixed memory budget, and time per sample.

Three ways to take one training step of the same open_clip CLIP (the digits example's tiny model, random init):

    plain      open_clip's own step: model(images, texts) on the whole batch, open_clip's dense ClipLoss, backward
    accum      open_clip_train's --accum-freq K step: features of every micro-batch without autograd, then per
               micro-batch a forward with autograd and the full dense loss with the others' cached features
               (K loss evaluations per step), micro-batch = CHUNK rows
    cached     mmcl_fast.train.grad_cached_step with mmcl_fast.ClipLoss, chunk = CHUNK rows

Each (method, batch) point runs in a fresh Python process: build the model, one warm-up step at batch 16
(thread pools, gradient buffers), reset the peak-RSS mark (/proc/self/clear_refs), run the measured step and report
the peak RSS growth over the resident size just before it (VmHWM - VmRSS; the inputs are made before the reset)
and its wall time; a watchdog thread ends a step as soon as its peak passes the budget. A method's sweep stops at
its first point over the budget (memory only grows with the batch) or over the time limit. Results: JSON (machine, versions, commit) and a markdown table on stdout.

    python benchmarks/bench_train.py --out benchmarks/results/train/bench_train.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("plain", "accum", "cached")

_CHILD = r'''
import json, time
import torch
torch.set_num_threads({threads})
from open_clip.loss import ClipLoss as OpenClipLoss
import mmcl_fast
from mmcl_fast.train import grad_cached_step
from examples.digits.run import TINY_CLIP, build_model

def status_kib(key):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])

torch.manual_seed(0)
model = build_model(TINY_CLIP, siglip=False).train()
size, ctx = TINY_CLIP["vision_cfg"]["image_size"], TINY_CLIP["text_cfg"]["context_length"]
chunk = {chunk}

def batch(n):
    return torch.randn(n, 3, size, size), torch.randint(1, 49407, (n, ctx))

def plain(images, texts):
    loss = OpenClipLoss()(*model(images, texts))
    loss.backward()

def accum(images, texts):
    # open_clip_train's accum_freq > 1 branch: cache every micro-batch's features, then re-forward one at a time
    micro = [(images[s:s + chunk], texts[s:s + chunk]) for s in range(0, images.shape[0], chunk)]
    loss_fn = OpenClipLoss()
    with torch.no_grad():
        cached = [model(i, t)[:2] for i, t in micro]
    for j, (i, t) in enumerate(micro):
        image_features, text_features, logit_scale = model(i, t)
        all_images = torch.cat([c[0] for c in cached[:j]] + [image_features] + [c[0] for c in cached[j + 1:]])
        all_texts = torch.cat([c[1] for c in cached[:j]] + [text_features] + [c[1] for c in cached[j + 1:]])
        loss_fn(all_images, all_texts, logit_scale).backward()

def cached(images, texts):
    grad_cached_step(model, images, texts, mmcl_fast.ClipLoss(), chunk)

step = {method}
step(*batch(16))  # small: pages it frees stay resident and would hide part of the measured step's peak
images, texts = batch({n})
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")
base = status_kib("VmRSS")

def watchdog():  # past the budget the point is decided: report the peak so far and stop
    import os, threading
    while True:
        time.sleep(0.02)
        peak = (status_kib("VmHWM") - base) / 1024
        if peak > {budget}:
            print(json.dumps({{"peak_mib": peak, "seconds": None, "stopped_over_budget": True}}), flush=True)
            os._exit(0)

import threading
threading.Thread(target=watchdog, daemon=True).start()
start = time.perf_counter()
step(images, texts)
seconds = time.perf_counter() - start
print(json.dumps({{"peak_mib": (status_kib("VmHWM") - base) / 1024, "seconds": seconds}}))
'''


def measure(method: str, n: int, chunk: int, threads: int, timeout: float, budget_mib: float) -> dict:
    code = _CHILD.format(method=method, n=n, chunk=chunk, threads=threads, budget=budget_mib)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "over time limit"}
    if done.returncode != 0:
        return {"status": "failed", "error": done.stderr[-2000:]}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def _machine() -> dict:
    import torch
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    import open_clip
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512": " avx512f" in flags, "avx2": " avx2" in flags,
            "torch": torch.__version__, "open_clip": open_clip.__version__, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average": os.getloadavg()}


def table(results: dict) -> str:
    budget = results["budget_mib"]
    lines = [f"budget {budget} MiB peak RSS growth per step, chunk / micro-batch {results['chunk']}, "
             f"{results['threads']} thread(s)", "",
             "| batch | " + " | ".join(f"{m}: MiB / ms per sample" for m in METHODS) + " |",
             "|---:|" + "---:|" * len(METHODS)]
    for n in results["batches"]:
        cells = []
        for method in METHODS:
            point = results["points"][method].get(str(n))
            if point is None:
                cells.append("-")
            elif point["status"] != "ok":
                cells.append(point["status"])
            elif point.get("stopped_over_budget"):
                cells.append(f"over budget (stopped at {point['peak_mib']:.0f})")
            else:
                mark = "" if point["peak_mib"] <= budget else " (over)"
                cells.append(f"{point['peak_mib']:.0f}{mark} / {1000 * point['seconds'] / n:.2f}")
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    lines += ["", "| method | largest batch within budget | ms per sample there |", "|---|---:|---:|"]
    for method, best in results["largest"].items():
        lines.append(f"| {method} | {best['batch']:,}{' (sweep end)' if best['sweep_end'] else ''} | "
                     f"{best['ms_per_sample']:.2f} |" if best["batch"] else f"| {method} | none | - |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-mib", type=float, default=512.0)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--batches", default="512,1024,2048,4096,8192,16384,32768")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=240.0, help="seconds per point (process included)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    batches = [int(v) for v in args.batches.split(",")]
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}, expected a subset of {','.join(METHODS)}")
    results = {"machine": _machine(), "budget_mib": args.budget_mib, "chunk": args.chunk, "threads": args.threads,
               "batches": batches, "model": "examples.digits.run.TINY_CLIP", "points": {m: {} for m in METHODS},
               "largest": {}}
    for method in methods:
        best = {"batch": None, "ms_per_sample": None, "sweep_end": False}
        for n in batches:
            point = measure(method, n, args.chunk, args.threads, args.time_limit, args.budget_mib)
            results["points"][method][str(n)] = point
            print(f"{method:7s} N={n:6d} {point}", file=sys.stderr, flush=True)
            if point["status"] != "ok" or point["peak_mib"] > args.budget_mib:
                break
            best = {"batch": n, "ms_per_sample": 1000 * point["seconds"] / n, "sweep_end": n == batches[-1]}
        results["largest"][method] = best
    print(table(results))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
