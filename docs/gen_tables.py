"""Write every generated table of the README and the docs from the committed JSON results.

    python docs/gen_tables.py           # rewrite the generated blocks in place
    python docs/gen_tables.py --check   # exit 1 if any page differs from what this script would write

A generated block is the text between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` in README.md or
in a page under docs/; NAME is a key of BLOCKS. The script replaces what lies between the markers and leaves the
prose around them alone, so a page is hand-written except for its tables. Every table names the machine (CPU and
the ISA build of the compiled core), the date and what was compared; the numbers come from the JSON files named
beside the table, never from this script. Besides the standard library it uses `mmcl_fast.bench.report.summary_table` (the table of a
run's summary.md, so both read the same), and the output depends on nothing but the committed files (sorted, fixed
formats), so `--check` is exact.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from functools import cache
from pathlib import Path

from mmcl_fast.bench.report import summary_table

ROOT = Path(__file__).resolve().parent.parent
BENCH = "benchmarks/results"
MISALIGN = "studies/misalign/results"
CMCR = "studies/cmcr/results"
DIGITS = "examples/digits/results"

# The CPU kinds the benchmarks ran on, keyed by the machine block's (cpu, cpu_kernel_isa); each gets one headline
# table. A run whose (cpu, build) is not listed (a build forced on a machine that has a better one) only appears
# in the list of every run.
KINDS = {
    ("AMD EPYC", "avx2"): "AMD EPYC, AVX2 + FMA, no AVX-512 (Zen 3 class)",
    ("Intel(R) Xeon(R) Processor", "amx-bf16"): "Intel Xeon with AVX-512, AVX512-BF16 and AMX (Sapphire Rapids "
                                                "class, KVM guest)",
    ("AMD EPYC", "avx512-bf16"): "AMD EPYC with AVX-512 and AVX512-BF16 (Zen 4 class)",
}

# Result files whose JSON records no machine block: the machine and date as stated when they were committed.
PROVENANCE = {
    f"{BENCH}/latent_losses_memory.json": "2-core CPU (machine block not recorded in the file), 2026-11-23",
    f"{MISALIGN}/quick/independent": "machine not recorded, 2026-11-23",
    f"{MISALIGN}/quick/dependent": "machine not recorded, 2026-11-23",
    f"{MISALIGN}/quick": "machine not recorded, 2026-12-01",
    f"{MISALIGN}/quick-24k": "AMD EPYC, 2 cores (`avx2` build), two runs at a time, 2026-12-01",
    f"{MISALIGN}/quick-48k": "Intel Xeon, 2 vCPU (`amx-bf16` build; fp32 runs its AVX-512 path), one thread per "
                             "run, two runs at a time, 2026-12-01",
    f"{MISALIGN}/sweep-perturbation-24k": "Intel Xeon, 2 vCPU (`amx-bf16` build; fp32 runs its AVX-512 path), two "
                                          "runs at a time, 2026-12-01",
    f"{MISALIGN}/sweep-perturbation-24k/amd-interrupted": "AMD EPYC, 2 cores (`avx2` build), 2026-12-01",
    f"{MISALIGN}/sweep-perturbation": "machine not recorded, 2026-12-01",
    f"{MISALIGN}/sweep-selection": "machine not recorded, 2026-12-01",
    f"{CMCR}/quick": "AMD EPYC, 2 cores (`avx2` build), shared machine, 2026-11-30",
    f"{DIGITS}/quick-digits": "2026-11-30",
}


# --------------------------------------------------------------------------------------------- reading and formats

@cache
def load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def files(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def provenance(path: str) -> str:
    """The PROVENANCE entry of `path` or of its closest listed parent directory."""
    for key in sorted(PROVENANCE, key=len, reverse=True):
        if path == key or path.startswith(key + "/"):
            return PROVENANCE[key]
    raise KeyError(f"no machine block and no PROVENANCE entry for {path}")


def day(iso: str | None) -> str:
    return (iso or "?")[:10]


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    return f"{value:.0f} s" if value >= 100 else f"{value:.2f} s"


def ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}×" if value >= 10 else f"{value:.2f}×"


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def gflops(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def error(value: float | None) -> str:
    return "-" if value is None else f"{value:.0e}"


def r2(value: float) -> str:
    return f"{value:.2f}"


def table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A markdown table; align holds one character per column: l (left) or r (right)."""
    marks = {"l": "---", "r": "---:"}
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def machine_line(machine: dict, commit: bool = True) -> str:
    """CPU, cores, threads, the build of the compiled core, torch and (unless commit=False) the commit."""
    versions = machine.get("versions", {})
    parts = [machine.get("cpu") or "?", f"{machine.get('cores')} cores", f"{machine.get('torch_threads')} threads"]
    if machine.get("cpu_kernel_isa"):
        parts.append(f"`{machine['cpu_kernel_isa']}` build")
    parts.append(f"torch {versions.get('torch')}")
    if commit and machine.get("git_commit"):
        parts.append(f"commit {machine['git_commit'][:7]}")
    return ", ".join(parts)


def kind_of(machine: dict) -> tuple[str, str] | None:
    key = (machine.get("cpu"), machine.get("cpu_kernel_isa"))
    return key if key in KINDS else None


def code(path: str) -> str:
    return f"`{path}`"


# --------------------------------------------------------------------------------------------- N = 16384 runs

LOSS_NAMES = {"clip": "CLIP", "siglip": "SigLIP"}
FLOPS = {"clip": "8·N²·D", "siglip": "6·N²·D"}


def acceptance_runs() -> list[dict]:
    """Every `benchmarks/cpu_acceptance.py` run: one entry per (file, loss, dtype) pairing mmcl_fast with open_clip
    from the same process. Files written before the script took --loss hold CLIP only."""
    runs = []
    for path in files(f"{BENCH}/cpu_acceptance*.json") + files(f"{BENCH}/cpu_acceptance*/*.json"):
        doc = load(path)
        by_key: dict[tuple, dict] = {}
        for rec in doc["records"]:
            by_key.setdefault((rec.get("loss", "clip"), rec["dtype"]), {})[rec["impl"]] = rec
        for (loss, dtype), impls in by_key.items():
            ours, theirs = impls["mmcl_fast"], impls["open_clip"]
            runs.append({"path": path, "machine": doc["machine"], "loss": loss, "dtype": dtype, "ours": ours,
                         "theirs": theirs, "date": doc["machine"]["date"]})
    return sorted(runs, key=lambda run: (run["date"], run["path"], run["loss"], run["dtype"]))


def current_acceptance() -> dict[tuple, list[dict]]:
    """The latest run per (kind, loss, dtype), grouped by kind in KINDS order, rows in (loss, dtype) order."""
    latest: dict[tuple, dict] = {}
    for run in acceptance_runs():
        kind = kind_of(run["machine"])
        if kind is not None:
            latest[(kind, run["loss"], run["dtype"])] = run  # runs are sorted by date: the last one wins
    out = {}
    for kind in KINDS:
        rows = [latest[key] for key in sorted(latest, key=lambda k: (list(LOSS_NAMES).index(k[1]), k[2] != "fp32"))
                if key[0] == kind]
        if rows:
            out[kind] = rows
    return out


def open_clip_time(run: dict) -> str:
    text = seconds(run["theirs"]["seconds"])
    return text + " (timed once)" if run["theirs"].get("timed_once_without_warmup") else text


def block_readme_headline() -> str:
    lines = []
    for kind, rows in current_acceptance().items():
        machine = rows[0]["machine"]
        lines += [f"**{KINDS[kind]}**, `{kind[1]}` build, {machine['cores']} cores, torch "
                  f"{machine['versions']['torch'].split('+')[0]}:", ""]
        lines += table(["loss", "dtype", "mmcl_fast", "open_clip", "speedup", "measured"],
                       [[LOSS_NAMES[r["loss"]], r["dtype"], seconds(r["ours"]["seconds"]), open_clip_time(r),
                         ratio(r["ours"]["speedup_vs_open_clip"]), day(r["date"])] for r in rows], "llrrrl")
        lines.append("")
    return "\n".join(lines).rstrip()


def block_acceptance() -> str:
    lines = []
    for kind, rows in current_acceptance().items():
        lines += [f"**{KINDS[kind]}**: {machine_line(rows[0]['machine'], commit=False)}", ""]
        body = []
        for r in rows:
            ours, theirs = r["ours"], r["theirs"]
            square, shaped = ours["matmul_gflops"], ours.get("matmul_gflops_loss_shape")
            body.append([LOSS_NAMES[r["loss"]], r["dtype"], seconds(ours["seconds"]), open_clip_time(r),
                         ratio(ours["speedup_vs_open_clip"]), f"{gflops(ours['gflops'])} ({FLOPS[r['loss']]} / t)",
                         f"{gflops(square)} / {gflops(shaped)}",
                         f"{error(ours['rel_err'])} / {error(theirs['rel_err'])}", day(r["date"]),
                         r["machine"]["git_commit"][:7], code(r["path"])])
        lines += table(["loss", "dtype", "mmcl_fast", "open_clip", "speedup", "mmcl_fast GFLOP/s",
                        "torch matmul GFLOP/s: 4096³ / 4096×512×4096", "loss rel. error: mmcl_fast / open_clip",
                        "date", "commit", "file"], body, "llrrrrrllll")
        lines.append("")
    return "\n".join(lines).rstrip()


def _run_key(run: dict) -> tuple:
    return run["path"], run["loss"], run["dtype"]


def block_acceptance_all() -> str:
    current = {_run_key(run) for rows in current_acceptance().values() for run in rows}
    body = []
    for run in acceptance_runs():
        machine = run["machine"]
        body.append([day(run["date"]), f"{machine['cpu']}, `{machine['cpu_kernel_isa']}`", LOSS_NAMES[run["loss"]],
                     run["dtype"], seconds(run["ours"]["seconds"]), open_clip_time(run),
                     ratio(run["ours"]["speedup_vs_open_clip"]), gflops(run["ours"]["matmul_gflops"]),
                     machine["git_commit"][:7], "yes" if _run_key(run) in current else "", code(run["path"])])
    return "\n".join(table(["date", "machine, build", "loss", "dtype", "mmcl_fast", "open_clip", "speedup",
                            "torch matmul GFLOP/s", "commit", "headline", "file"], body, "llllrrrrlll"))


# --------------------------------------------------------------------------------------------- mmcl-fast bench runs

def bench_groups() -> dict[tuple, list[tuple]]:
    """The latest `mmcl-fast bench` (single process) table per (kind, loss, D, dtype), grouped by kind."""
    latest: dict[tuple, tuple] = {}
    docs = [(path, load(path)) for path in files(f"{BENCH}/*/results.json")]
    docs = [(path, doc) for path, doc in docs if doc.get("config", {}).get("world_size", 1) == 1]
    for path, doc in sorted(docs, key=lambda item: item[1]["machine"]["date"]):
        kind = kind_of(doc["machine"])
        if kind is None:
            continue
        for rec in doc["records"]:
            latest[(kind, rec["loss"], rec["d"], rec["dtype"])] = (path, doc)
    out: dict[tuple, list[tuple]] = {}
    for key in sorted(latest, key=lambda k: (list(KINDS).index(k[0]), k[1], k[2], k[3] != "fp32")):
        out.setdefault(key[0], []).append((key[1:], *latest[key]))
    return out


def block_bench_quick() -> str:
    lines = []
    for kind, groups in bench_groups().items():
        lines += [f"### {KINDS[kind]}", ""]
        for (loss, dim, dtype), path, doc in groups:
            machine = doc["machine"]
            rate = machine.get("matmul_gflops", {}).get(dtype)
            lines += [f"**{loss}, D = {dim}, {dtype}**: median time / peak MiB of one forward + backward per N; "
                      f"{machine_line(machine)}, {day(machine['date'])}; torch matmul {gflops(rate)} GFLOP/s; memory "
                      f"budget {machine.get('mem_budget_mib', 0) / 1024:.1f} GiB ({code(path)})", ""]
            recs = [r for r in doc["records"] if (r["loss"], r["d"], r["dtype"]) == (loss, dim, dtype)]
            lines += summary_table(recs, doc.get("anchors", {}).get(loss, "open_clip"))
            unavailable = machine.get("unavailable_impls", {}).get(loss, {})
            if unavailable:
                notes = "; ".join(f"`{impl}`: {reason.split(' (')[0]}" for impl, reason in sorted(unavailable.items()))
                lines += ["", f"Not run here: {notes}."]
            lines.append("")
    return "\n".join(lines).rstrip()


def block_late_training() -> str:
    path = f"{BENCH}/late_training_logits_spr.json"
    doc = load(path)
    rows = [[r["impl"], "on" if r["flush_denormal"] else "off", seconds(r["seconds"]), f"{r['loss']:.4f}",
             error(r["rel_err"])] for r in doc["records"]]
    head = (f"CLIP forward + backward, N = {doc['n']:,}, D = {doc['d']}, fp32, logit scale {doc['logit_scale']:g} "
            f"(float64 loss {doc['reference_loss']:.4f}); {machine_line(doc['machine'])}, {day(doc['machine']['date'])}"
            f" ({code(path)})")
    return "\n".join([head, ""] + table(["implementation", "torch.set_flush_denormal", "time", "loss",
                                         "rel. error vs float64"], rows, "llrrr"))


LATENT_FUNCTIONS = {
    "geometric_consistency": "`geometric_consistency_loss` (with both augmented views)",
    "bridge_contrastive": "`brownian_bridge_loss(mode=\"contrastive\")`",
    "bridge_contrastive_per_sample_t": "`brownian_bridge_loss(mode=\"contrastive\")`, per-sample t",
    "uniformity": "`uniformity_loss`",
    "feature_separation": "`feature_separation_loss`",
}


def block_latent_memory() -> str:
    path = f"{BENCH}/latent_losses_memory.json"
    doc = load(path)
    pairs: dict[str, dict] = {}
    for rec in doc["records"]:
        pairs.setdefault(rec["case"], {})[rec["impl"]] = rec
    rows = []
    for case, impls in pairs.items():
        ours, dense = impls["mmcl_fast"], impls["dense"]
        rows.append([LATENT_FUNCTIONS.get(case, case), mib(ours["input_bytes"] / 2**20), mib(ours["growth_bytes"] / 2**20),
                     mib(dense["growth_bytes"] / 2**20), f"{ours['ratio_to_inputs']:.1f}× / {dense['ratio_to_inputs']:.0f}×"])
    first = doc["records"][0]
    head = (f"Peak RSS growth of one forward + backward in a fresh process, N = {first['n']:,}, D = {first['d']}, "
            f"{first['dtype']}, mmcl_fast against the dense PyTorch formula; {provenance(path)} ({code(path)})")
    return "\n".join([head, ""] + table(["loss", "inputs MiB", "mmcl_fast MiB", "dense MiB",
                                         "growth / inputs: mmcl_fast / dense"], rows, "lrrrr"))


# --------------------------------------------------------------------------------------------- distributed

DIST_DIR = f"{BENCH}/distributed-gloo-cpu"


def dist_runs() -> list[tuple[str, dict]]:
    return [(path, load(path)) for path in files(f"{DIST_DIR}/*-w*.json")]


def dist_label(doc: dict, impl: str) -> tuple[str, str]:
    """(loss, implementation as the docs name it) of one record of a --world-size run."""
    loss = doc["config"]["losses"][0]
    mode = doc["config"].get("dist_impl")
    if impl == "open_clip":
        return loss, "open_clip " + ("ClipLoss (gather_with_grad)" if loss == "clip" else f"SigLipLoss ({mode})")
    if impl == "mmcl_fast_gather":
        return loss, "mmcl_fast gather"
    return loss, f"mmcl_fast {'ring' if loss == 'clip' else mode}"


def block_distributed_measured() -> str:
    runs = dist_runs()
    machine = runs[0][1]["machine"]
    rows, seen = [], set()
    for path, doc in sorted(runs, key=lambda item: (item[1]["config"]["world_size"], item[0])):
        world = doc["config"]["world_size"]
        for rec in doc["records"]:
            loss, name = dist_label(doc, rec["impl"])
            if (world, loss, name) in seen:  # SigLIP gather runs in each SigLIP file: keep the first
                continue
            seen.add((world, loss, name))
            rows.append([str(world), f"{rec['n'] // world:,}", LOSS_NAMES[loss], name, mib(rec["peak_mib"]),
                         seconds(rec["seconds"]), ratio(rec["speedup"]), ratio(rec["memory_ratio"]),
                         error(rec["rel_err"]), code(path)])
    dims = sorted({rec["d"] for _, doc in runs for rec in doc["records"]})
    dtypes = sorted({rec["dtype"] for _, doc in runs for rec in doc["records"]})
    head = (f"One forward + backward per rank, gloo, D = {', '.join(map(str, dims))}, {', '.join(dtypes)}; the "
            f"largest per-rank peak RSS growth and the slowest rank's median time; speedup and memory saving against "
            f"open_clip in the same run; {machine_line(machine)}, {day(machine['date'])}")
    return "\n".join([head, ""] + table(["W", "N per rank", "loss", "implementation", "peak MiB per rank", "time",
                                         "speedup", "memory saving", "loss rel. error", "file"], rows, "rrllrrrrrl"))


def block_distributed_summary() -> str:
    """The per-rank memory and time of each mode at each W, one row per W."""
    cells: dict[tuple[int, str], dict] = {}
    for _, doc in dist_runs():
        world = doc["config"]["world_size"]
        for rec in doc["records"]:
            cells.setdefault((world, dist_label(doc, rec["impl"])[1]), rec)
    columns = ["mmcl_fast ring", "mmcl_fast gather", "open_clip ClipLoss (gather_with_grad)", "mmcl_fast bidir",
               "mmcl_fast shift", "mmcl_fast reduce", "open_clip SigLipLoss (bidir)"]
    worlds = sorted({world for world, _ in cells})
    rows = [[str(w)] + [f"{mib(cells[(w, c)]['peak_mib'])} MiB, {seconds(cells[(w, c)]['seconds'])}"
                        if (w, c) in cells else "-" for c in columns] for w in worlds]
    header = ["W", "CLIP ring", "CLIP gather", "open_clip ClipLoss", "SigLIP bidir", "SigLIP shift", "SigLIP reduce",
              "open_clip SigLipLoss (bidir)"]
    machine = dist_runs()[0][1]["machine"]
    head = (f"Peak MiB per rank, time of one forward + backward; mmcl_fast's modes against open_clip's losses; "
            f"{machine_line(machine)}, {day(machine['date'])} ({code(DIST_DIR)})")
    return "\n".join([head, ""] + table(header, rows, "r" * len(header)))


def block_distributed_model() -> str:
    path = f"{DIST_DIR}/memory_model.json"
    doc = load(path)
    rows = [[c["system"], str(c["world"]), f"{c['n_local']:,}", str(c["dim"]), mib(c["measured_mib"]),
             mib(c["model_mib"]), f"{c['measured_mib'] / c['model_mib']:.2f}"] for c in doc["checks"]]
    machines = sorted({c["machine"] for c in doc["checks"]})
    head = (f"The per-rank model against the measured peaks ({'; '.join(machines)}; fp32; {code(path)})")
    return "\n".join([head, ""] + table(["system", "W", "N per rank", "D", "measured MiB", "model MiB",
                                         "measured / model"], rows, "lrrrrrr"))


def block_distributed_projection() -> str:
    path = f"{DIST_DIR}/memory_model.json"
    doc = load(path)
    proj = doc["projection"]
    worlds = proj["worlds"]
    rows = [[p["system"]] + [f"{p[f'W={w}']:,.2f} GiB" for w in worlds] for p in doc["projections"]]
    head = (f"Projected per-rank memory of the loss step (the model, not a measurement): N per rank = "
            f"{proj['n']:,}, D = {proj['dim']}, {proj['bytes']}-byte features (bf16), GPU kernels ({code(path)})")
    return "\n".join([head, ""] + table(["per rank"] + [f"W = {w:,}" for w in worlds], rows, "l" + "r" * len(worlds)))


def block_distributed_first() -> str:
    path = f"{BENCH}/distributed_gloo_w2_fp32.json"
    doc = load(path)
    rows = [[f"{r['global_batch']:,}", f"{r['local_batch']:,}", r["impl"], mib(r["peak_mib_max_rank"]),
             seconds(r["median_step_s"]), ratio(r.get("speedup_vs_open_clip")),
             ratio(r.get("memory_ratio_vs_open_clip")), error(r["loss_rel_err"])] for r in doc["records"]]
    args = doc["args"]
    head = (f"CLIP, W = {args['world_size']}, gloo, D = {args['dim']}, {args['dtype']}, one thread per rank; the first "
            f"distributed implementation (all-gather of the captions, before the ring); "
            f"{machine_line(doc['machine'])}, {day(doc['machine']['date'])} ({code(path)})")
    return "\n".join([head, ""] + table(["global N", "N per rank", "implementation", "peak MiB per rank (max)",
                                         "median step", "speedup", "memory saving", "loss rel. error"], rows,
                                        "rrlrrrrr"))


# --------------------------------------------------------------------------------------------- training

def block_train_bench() -> str:
    path = f"{BENCH}/train/bench_train.json"
    doc = load(path)
    machine = doc["machine"]
    modes = ["plain", "accum", "cached"]
    rows = []
    for batch in doc["batches"]:
        row = [f"{batch:,}"]
        for mode in modes:
            point = doc["points"][mode].get(str(batch))
            if point is None:
                row.append("-")
            elif point.get("stopped_over_budget"):
                row.append(f"over budget (≥ {mib(point['peak_mib'])})")
            else:
                row.append(f"{mib(point['peak_mib'])} / {point['seconds'] / batch * 1e3:.2f}")
        rows.append(row)
    largest = "; ".join(
        f"{mode} {doc['largest'][mode]['batch']:,}{' (end of the sweep)' if doc['largest'][mode]['sweep_end'] else ''}"
        f" at {doc['largest'][mode]['ms_per_sample']:.2f} ms per sample" for mode in modes)
    isa = "AVX-512" if machine.get("avx512") else "AVX2, no AVX-512" if machine.get("avx2") else "?"
    head = (f"One training step of a tiny open_clip CLIP per fresh process, peak RSS growth of the step; budget "
            f"{doc['budget_mib']:.0f} MiB, chunk / micro-batch {doc['chunk']}, {doc['threads']} thread; "
            f"{machine['cpu']}, {machine['cores']} cores ({isa}), torch {machine['torch']}, open_clip "
            f"{machine['open_clip']}, commit {machine['commit'][:7]}, {day(machine['date'])}; load average "
            f"{min(machine['load_average']):.0f}-{max(machine['load_average']):.0f}, so times are upper bounds "
            f"({code(path)})")
    return "\n".join([head, ""] + table(["batch", "plain: MiB / ms per sample", "accum: MiB / ms per sample",
                                         "cached: MiB / ms per sample"], rows, "rrrr")
                     + ["", f"Largest batch within the budget: {largest}."])


def block_digits_quick() -> str:
    path = f"{DIGITS}/quick-digits/results.json"
    doc = load(path)
    rows = [[doc["data"], f"{doc['batch_size']} (chunks of {doc['chunk_size']})", str(doc["steps"]),
             f"{doc['zero_shot_accuracy']:.3f} on {doc['test_images']} held-out images", f"{doc['seconds']:.0f} s",
             mib(doc["peak_mib"])]]
    head = (f"`python -m examples.digits --data digits --quick` (seed {doc['seed']}, {doc['precision']}, world size "
            f"{doc['world_size']}); {doc['machine']}, torch {doc['torch']}, {provenance(path)} ({code(path)})")
    return "\n".join([head, ""] + table(["data", "batch", "steps", "zero-shot accuracy", "training time",
                                         "peak RSS MiB (whole process)"], rows, "lrrrrr"))


# --------------------------------------------------------------------------------------------- misalignment study

SEMANTICS = [f"s{i}" for i in range(10)]


def _by_seed(doc: dict) -> tuple[list[int], dict, dict]:
    """(seeds, R² by latent and seed of the nonlinear regressor, oracle by latent and seed); single-seed files of
    the first quick preset store plain values."""
    if "r2_by_seed" in doc:
        return doc["seeds"], doc["r2_by_seed"]["nonlinear"], doc["oracle_r2_by_seed"]
    seed = doc["config"].get("seed", 0)
    return [seed], {k: [v] for k, v in doc["r2"]["nonlinear"].items()}, {k: [v] for k, v in doc["oracle_r2"].items()}


def verdict(roles: dict, dependent: bool, values: dict, oracle: dict) -> bool:
    """The acceptance rule of the study's slow tests: invariant semantics at R² >= 0.8; the others at <= 0.3, or, in
    the dependent case, dropped and perturbed semantics within 0.1 of the oracle."""
    for name in SEMANTICS + ["m_x", "m_t"]:
        role, value = roles[name], values[name]
        if role == "invariant" and value < 0.8:
            return False
        if role in ("perturbed", "excluded") and dependent and abs(value - oracle[name]) > 0.1:
            return False
        if role in ("perturbed", "excluded", "specific") and not (dependent and role != "specific") and value > 0.3:
            return False
    return True


def _extreme(names: list[str], values: dict, oracle: dict | None, lowest: bool = False) -> str:
    if not names:
        return "-"
    name = (min if lowest else max)(names, key=lambda n: values[n])
    suffix = f"; oracle {r2(oracle[name])}" if oracle is not None else ""
    return f"{r2(values[name])} ({name}{suffix})"


def seed_row(doc: dict, index: int) -> list[str]:
    roles, dependent = doc["roles"], doc["config"]["dependent"]
    seeds, by_seed, oracle_by_seed = _by_seed(doc)
    values = {k: v[index] for k, v in by_seed.items()}
    oracle = {k: v[index] for k, v in oracle_by_seed.items()}
    names = lambda role: [n for n in SEMANTICS if roles[n] == role]  # noqa: E731
    gap_name = max(SEMANTICS, key=lambda n: abs(values[n] - oracle[n]))
    gap = values[gap_name] - oracle[gap_name]
    passed = verdict(roles, dependent, values, oracle)
    row = [_extreme(names("invariant"), values, None, lowest=True),
           r2(values["s_inv"]) if "s_inv" in values else "-",
           _extreme(names("perturbed"), values, oracle), _extreme(names("excluded"), values, oracle),
           r2(max(values["m_x"], values["m_t"])),
           f"{gap:+.3f} ({gap_name}: {r2(values[gap_name])} vs {r2(oracle[gap_name])})"]
    checkpoints = doc.get("checkpoints") or []
    if checkpoints:
        row.append(" / ".join(
            "pass" if verdict(roles, dependent, {k: v[index] for k, v in cp["r2_by_seed"]["nonlinear"].items()},
                              oracle) else "fail" for cp in checkpoints))
    train = doc.get("timing", {}).get("train_s_by_seed") or [doc.get("timing", {}).get("train_s")]
    row += [f"{train[index]:.0f}" if train[index] is not None else "-", "pass" if passed else "**fails**"]
    return [str(seeds[index])] + row


def setting_label(config: dict) -> str:
    theta = ",".join(map(str, config["selection"]))
    rho = ",".join(map(str, config["perturbation"]))
    return f"θ = {{{theta}}}, ρ = {{{rho}}}"


def misalign_table(dirs: list[str]) -> str:
    """Per-seed verdicts of quick-preset runs: one row per (directory, seed)."""
    docs = [(d, load(f"{d}/results.json")) for d in dirs]
    with_checkpoints = any(doc.get("checkpoints") for _, doc in docs)
    rows = []
    for path, doc in docs:
        config = doc["config"]
        case = f"`{config.get('objective', 'clip')}`, {'dependent' if config['dependent'] else 'independent'}"
        for index in range(len(_by_seed(doc)[0])):
            row = seed_row(doc, index)
            if with_checkpoints and not doc.get("checkpoints"):
                row.insert(7, "-")
            rows.append([case] + row)
    header = ["objective, case", "seed", "lowest invariant R²", "block `s_inv`", "highest perturbed",
              "highest dropped", "highest m_x / m_t", "largest R² − oracle (s0..s9)"]
    if with_checkpoints:
        steps = sorted({cp["step"] for _, doc in docs for cp in doc.get("checkpoints", [])})
        header.append(" / ".join(f"{s // 1000}k" for s in steps))
    header += ["train s", "verdict"]
    configs = [doc["config"] for _, doc in docs]
    settings = sorted({setting_label(c) for c in configs})
    steps = sorted({c["steps"] for c in configs})
    commits = sorted({doc["environment"]["commit"][:7] for _, doc in docs})
    machines = sorted({provenance(path) for path, _ in docs})
    head = (f"{'; '.join(settings)}; {', '.join(f'{s:,}' for s in steps)} steps, nonlinear (kernel ridge) R² of the "
            f"image representation; {'; '.join(machines)}; commit {', '.join(commits)}; "
            f"{', '.join(code(d) for d in dirs)}")
    return "\n".join([head, ""] + table(header, rows, "lr" + "r" * (len(header) - 3) + "l"))


def sweep_table(base: str, extra: list[str] = ()) -> str:
    """One row per sweep point (k directories under `base`, plus `extra` directories)."""
    dirs = sorted((p.parent for p in (ROOT / base).glob("k*/results.json")),
                  key=lambda p: (int(re.match(r"k(\d+)", p.name).group(1)), p.name))
    rows = []
    for folder in dirs:
        path = str(folder.relative_to(ROOT))
        doc = load(f"{path}/results.json")
        config, roles = doc["config"], doc["roles"]
        values = {k: v[0] for k, v in _by_seed(doc)[1].items()}
        oracle = {k: v[0] for k, v in _by_seed(doc)[2].items()}
        invariant = [n for n in SEMANTICS if roles[n] == "invariant"]
        perturbed = [n for n in SEMANTICS if roles[n] == "perturbed"]
        dropped = [n for n in SEMANTICS if roles[n] == "excluded"]
        tilde = [n for n in values if n.startswith("s_tilde")]
        tilde_text = "-"
        if tilde:
            name = max(tilde, key=lambda n: values[n])
            tilde_text = f"{r2(values[name])} (s̃{name[len('s_tilde'):]})"
        train = doc["timing"].get("train_s_by_seed", [doc["timing"].get("train_s")])[0]
        rows.append([folder.name, f"{config['steps']:,}", setting_label(config),
                     _extreme(invariant, values, None, lowest=True), _extreme(perturbed, values, None),
                     tilde_text, _extreme(dropped, values, None), r2(max(values["m_x"], values["m_t"])),
                     f"{train:.0f}", "pass" if verdict(roles, config["dependent"], values, oracle) else "**fails**"])
    first = load(f"{str(dirs[0].relative_to(ROOT))}/results.json")
    commits = sorted({load(f"{str(d.relative_to(ROOT))}/results.json")["environment"]["commit"][:7] for d in dirs})
    head = (f"`{first['config'].get('objective', 'clip')}`, {'dependent' if first['config']['dependent'] else 'independent'}, "
            f"seed {_by_seed(first)[0][0]}, nonlinear R² of the image representation; {provenance(base)}; commit "
            f"{', '.join(commits)}; {code(base)}")
    return "\n".join([head, ""] + table(["point", "steps", "setting", "lowest invariant R²", "highest perturbed R²",
                                         "highest s̃ (text value)", "highest dropped R²", "m_x / m_t", "train s",
                                         "verdict"], rows, "lrlrrrrrrl"))


def block_misalign_continued() -> str:
    rows = []
    paths = files(f"{MISALIGN}/quick-48k/continued/*.json")
    for path in paths:
        doc = load(path)
        args = doc["args"]
        selection = [int(v) for v in args["sel"].split(",")]
        perturbation = [int(v) for v in args["pert"].split(",")] if args["pert"] else []
        roles = {n: ("perturbed" if i in perturbation else "invariant" if i in selection else "excluded")
                 for i, n in enumerate(SEMANTICS)}
        roles.update({"m_x": "specific", "m_t": "specific"})
        dependent = args["dependent"]
        cells = []
        for cp in doc["checkpoints"]:
            values, oracle = cp["r2"], cp["oracle"]
            low = min((n for n in SEMANTICS if roles[n] == "invariant"), key=lambda n: values[n])
            if dependent:
                name = max(SEMANTICS, key=lambda n: abs(values[n] - oracle[n]))
                worst = f"\\|R² − oracle\\| {abs(values[name] - oracle[name]):.2f} ({name}: {r2(values[name])} vs " \
                        f"{r2(oracle[name])})"
            else:
                others = [n for n in SEMANTICS + ["m_x", "m_t"] if roles[n] != "invariant"]
                name = max(others, key=lambda n: values[n])
                worst = f"highest other {r2(values[name])} ({name})"
            ok = verdict(roles, dependent, values, oracle)
            cells.append(f"invariant ≥ {r2(values[low])}; {worst}: {'pass' if ok else '**fails**'}")
        label = (f"θ = {{{args['sel']}}}, ρ = {{{args['pert']}}}, `{args['objective']}`, "
                 f"{'dependent' if dependent else 'independent'}, seed {args['seed']}")
        rows.append([label] + cells)
    steps = [cp["step"] for cp in load(paths[0])["checkpoints"]]
    env = load(paths[0])["environment"]
    head = (f"Two runs that failed at 24k steps, continued to 48k and scored on the way (nonlinear R²); "
            f"{env['processor']}, {env['threads']} thread, {env['date']}; {code(f'{MISALIGN}/quick-48k/continued')}")
    return "\n".join([head, ""] + table(["run"] + [f"after {s // 1000}k steps" for s in steps], rows,
                                        "l" + "l" * len(steps)))


def block_cmcr_quick() -> str:
    path = f"{CMCR}/quick/results.json"
    doc = load(path)

    def row(label: str, result: dict, gap: float | None) -> list[str]:
        a_c, c_a = result["a_to_c"], result["c_to_a"]
        return [label, f"{a_c['r1']:.3f}", f"{a_c['r5']:.3f}", f"{a_c['map']:.3f}", f"{c_a['r1']:.3f}",
                f"{c_a['map']:.3f}", "" if gap is None else f"{gap:.2f}"]

    gaps = doc["modality_gap"]["after"]
    rows = [row("C-MCR (the paper's settings)", doc["retrieval"], gaps["cmcr"]["a_c"])]
    for name, result in doc["ablations"].items():
        rows.append(row(result["description"], result, gaps[name]["a_c"]))
    rows.append(row("paired oracle (true (A, C) pairs)", doc["oracle"], gaps["oracle"]["a_c"]))
    chance = doc["retrieval"]["a_to_c"]
    rows.append(["chance", f"{chance['chance_r1']:.3f}", f"{chance['chance_r5']:.3f}", f"{chance['chance_map']:.3f}",
                 f"{chance['chance_r1']:.3f}", f"{chance['chance_map']:.3f}", ""])
    acc = doc["acceptance"]
    config = doc["config"]
    head = (f"`python -m studies.cmcr --quick --seed {config['seed']}`: {config['n_test']:,} held-out triples, "
            f"{config['n_shared']:,} B samples, memories of {config['n_memory']:,} A and C embeddings, projectors of "
            f"width {config['method']['hidden']}, {config['fit']['steps']} steps at batch {config['fit']['batch']}; "
            f"{provenance(path)}; commit {doc['environment']['commit'][:7]}, torch {doc['environment']['torch']}; "
            f"{doc['timing']['total_s']:.0f} s in the study ({code(path)})")
    spaces = doc["spaces"]
    tail = (f"Acceptance ({acc['criteria']}): {acc['a_to_c_r1_over_chance']:.0f}× chance, "
            f"{acc['a_to_c_r1_over_oracle']:.0%} of the oracle: {'passed' if acc['passed'] else 'failed'}. "
            f"The two spaces retrieve A→B at R@1 {spaces['ab']['a_to_b']['r1']:.3f} and B→C at "
            f"{spaces['bc']['b_to_c']['r1']:.3f}; their modality gaps before C-MCR: "
            f"{spaces['ab']['modality_gap']:.2f} and {spaces['bc']['modality_gap']:.2f}.")
    return "\n".join([head, ""] + table(["variant", "A→C R@1", "A→C R@5", "A→C mAP", "C→A R@1", "C→A mAP",
                                         "A–C gap after"], rows, "lrrrrrr") + ["", tail])


# --------------------------------------------------------------------------------------------- the blocks

def _settings(base: str, names: list[str]) -> list[str]:
    return [f"{base}/{name}" for name in names]


BLOCKS = {
    "readme-headline": block_readme_headline,
    "acceptance": block_acceptance,
    "acceptance-all": block_acceptance_all,
    "bench-quick": block_bench_quick,
    "late-training": block_late_training,
    "latent-memory": block_latent_memory,
    "distributed-summary": block_distributed_summary,
    "distributed-measured": block_distributed_measured,
    "distributed-model": block_distributed_model,
    "distributed-projection": block_distributed_projection,
    "distributed-first": block_distributed_first,
    "train-bench": block_train_bench,
    "digits-quick": block_digits_quick,
    "misalign-48k-fresh": lambda: misalign_table(_settings(f"{MISALIGN}/quick-48k", [
        "fresh-clip-independent", "fresh-clip-dependent", "fresh-lpsimclr-independent", "fresh-lpsimclr-dependent"])),
    "misalign-48k-heldout": lambda: misalign_table(_settings(f"{MISALIGN}/quick-48k", [
        "heldout-clip-dependent", "heldout-lpsimclr-dependent"])),
    "misalign-48k-continued": block_misalign_continued,
    "misalign-24k-acceptance": lambda: misalign_table(_settings(f"{MISALIGN}/quick-24k", [
        "clip-independent", "lpsimclr-independent", "clip-dependent", "lpsimclr-dependent"])),
    "misalign-24k-heldout": lambda: misalign_table(_settings(f"{MISALIGN}/quick-24k", [
        "heldout-clip-independent", "heldout-clip-dependent"])),
    "misalign-24k-cosine": lambda: misalign_table(
        [f"{MISALIGN}/quick-24k/heldout-clip-dependent-seed1-diagnostics/cosine-24k"]),
    "misalign-24k-sweep-perturbation": lambda: sweep_table(f"{MISALIGN}/sweep-perturbation-24k"),
    "misalign-12k-acceptance": lambda: misalign_table(_settings(f"{MISALIGN}/quick", [
        "clip-independent", "lpsimclr-independent", "clip-dependent", "lpsimclr-dependent"])),
    "misalign-12k-spectral": lambda: misalign_table(_settings(f"{MISALIGN}/quick", ["independent", "dependent"])),
    "misalign-12k-sweep-selection": lambda: sweep_table(f"{MISALIGN}/sweep-selection"),
    "misalign-12k-sweep-perturbation": lambda: sweep_table(f"{MISALIGN}/sweep-perturbation"),
    "cmcr-quick": block_cmcr_quick,
}

MARKER = re.compile(r"^(?P<indent>[ \t]*)<!-- generated:(?P<name>[\w-]+) -->\n.*?^(?P=indent)<!-- /generated:(?P=name) -->",
                    re.S | re.M)
NOTE = "<!-- written by docs/gen_tables.py from the committed JSON; do not edit by hand -->"


def pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def render(text: str, used: set[str]) -> str:
    """`text` with every generated block rewritten, indented like its opening marker (a block may sit inside an
    admonition or a list)."""
    def replace(match: re.Match) -> str:
        name, indent = match.group("name"), match.group("indent")
        if name not in BLOCKS:
            raise SystemExit(f"unknown generated block {name!r} (known: {', '.join(BLOCKS)})")
        used.add(name)
        body = [NOTE, ""] + BLOCKS[name]().split("\n") + [""]  # blank lines: the comments are HTML blocks
        lines = [f"{indent}<!-- generated:{name} -->"] + [indent + line if line else "" for line in body]
        return "\n".join(lines + [f"{indent}<!-- /generated:{name} -->"])
    return MARKER.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a page would change")
    args = parser.parse_args(argv)
    used: set[str] = set()
    stale = []
    for page in pages():
        text = page.read_text()
        new = render(text, used)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    unused = sorted(set(BLOCKS) - used)
    if unused:
        print(f"generated blocks placed on no page: {', '.join(unused)}", file=sys.stderr)
        return 1
    if args.check and stale:
        print("out of date (run python docs/gen_tables.py): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    if not args.check:
        print(f"rewrote {len(stale)} page(s)" + (f": {', '.join(map(str, stale))}" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
