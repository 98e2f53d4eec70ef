"""`mmcl-fast bench --loss X` for every registered loss, and `--world-size W`: tiny real runs, checked records.

Each run goes through the real CLI, child processes, peak-memory probe and float64 reference (N <= 64, D = 8,
one timed repeat, so a run takes a few seconds). The references themselves are checked against the dense
float64 formulas, with blocks small enough that the streamed paths take many blocks.
"""
import json
import math
import os
import signal
import time

import pytest
import torch
import torch.nn.functional as F
from tolerances import LOSS_RTOL, assert_rel_close

from mmcl_fast.bench import cli as bench_cli
from mmcl_fast.bench import registry
from mmcl_fast.bench.cases import latent
from mmcl_fast.bench.impls import LOSSES, get_loss
from mmcl_fast.bench.measure import combine_ranks, measure_distributed
from mmcl_fast.bench.runner import BenchConfig, impls_for

SIZES = (48, 64)
DIM = 8
# dense fp32 baselines sum N x N fp32 terms: good to ~1e-6 at these sizes; checked loosely
BASELINE_RTOL = 1e-4


def run_cli(argv: list[str]) -> int:
    parser = bench_cli.argparse.ArgumentParser(prog="mmcl-fast")
    bench_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _runnable_impls(loss_name: str) -> list[str]:
    loss = get_loss(loss_name)
    return [name for name, impl in loss.impls.items()
            if impl.unavailable(torch.device("cpu"), DIM) is None and not impl.dist_only]


def _bench(tmp_path, loss_name: str, *extra: str) -> dict:
    out = tmp_path / loss_name
    argv = ["bench", "--loss", loss_name, "--sizes", ",".join(map(str, SIZES)), "--dim", str(DIM), "--dtype",
            "fp32", "--repeats", "1", "--no-plot", "--quiet", "--out", str(out), *extra]
    assert run_cli(argv) == 0
    with open(out / "results.json") as results:
        return json.load(results)


# ---------------------------------------------------------------------------------------------
# every loss through the CLI
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_bench_loss_records_match_the_float64_reference(tmp_path, loss_name):
    loss = get_loss(loss_name)
    runnable = _runnable_impls(loss_name)
    assert {"mmcl_fast", loss.anchor} <= set(runnable), f"{loss_name}: mmcl_fast or the anchor cannot run here"
    results = _bench(tmp_path, loss_name)
    assert results["anchors"] == {loss_name: loss.anchor}
    records = results["records"]
    assert sorted((r["impl"], r["n"]) for r in records) == sorted((i, n) for i in runnable for n in SIZES)
    by_key = {(r["impl"], r["n"]): r for r in records}
    for n in SIZES:
        inputs = loss.make_inputs(n, DIM, torch.float32, 0)
        expected = loss.reference(inputs, loss.params)
        input_mib = sum(t.numel() * t.element_size() for t in inputs.values()) / 2**20
        anchor = by_key[(loss.anchor, n)]
        for impl in runnable:
            rec = by_key[(impl, n)]
            assert rec["status"] == "ok", rec
            assert rec["loss"] == loss_name and rec["d"] == DIM and rec["m"] == n and rec["world_size"] == 1
            assert rec["reference_loss"] == pytest.approx(expected, rel=1e-12)
            rtol = LOSS_RTOL[torch.float32] if impl == "mmcl_fast" else BASELINE_RTOL
            assert rec["rel_err"] <= rtol, rec
            assert abs(rec["loss_value"] - expected) <= rtol * abs(expected)
            assert rec["seconds"] > 0 and rec["repeats"] == 1 and rec["peak_mib"] >= 0
            assert rec["input_mib"] == pytest.approx(input_mib, abs=1e-3)
            assert math.isclose(rec["gflops"], loss.flops(n, n, DIM) / rec["seconds"] / 1e9, rel_tol=1e-2,
                                abs_tol=0.01)
            # timings are ratios against the anchor measured in the same run
            assert rec["speedup"] == pytest.approx(anchor["seconds"] / rec["seconds"], rel=1e-2, abs=1e-3)
        assert anchor["speedup"] == 1.0
    unavailable = results["machine"]["unavailable_impls"].get(loss_name, {})
    assert set(unavailable) == set(loss.impls) - set(runnable)


def test_multi_loss_run_writes_one_summary_and_plot_panels(tmp_path):
    out = tmp_path / "two"
    assert run_cli(["bench", "--loss", "uniformity,geometry", "--sizes", "32", "--dim", str(DIM), "--dtype", "fp32",
                    "--repeats", "1", "--quiet", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["anchors"] == {"uniformity": "dense", "geometry": "dense"}
    assert {(r["loss"], r["impl"]) for r in results["records"]} == \
        {(loss, impl) for loss in ("uniformity", "geometry") for impl in ("mmcl_fast", "dense")}
    summary = (out / "summary.md").read_text()
    assert "**uniformity, D=8, fp32, cpu**" in summary and "**geometry, D=8, fp32, cpu**" in summary
    assert "mmcl_fast speedup vs dense" in summary
    for name in ("time_vs_n.png", "memory_vs_n.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# distributed records: a process group per record
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_name, world, extra", [("clip", 2, ()), ("siglip", 2, ()),
                                                     ("siglip", 3, ("--dist-impl", "shift"))])
def test_bench_world_size_records_the_global_loss(tmp_path, loss_name, world, extra):
    loss = get_loss(loss_name)
    sizes = [48, 96] if world == 3 else [32, 64]
    distributed, _ = impls_for(BenchConfig(out=tmp_path, world_size=world), loss_name)
    assert {"mmcl_fast", "open_clip"} <= set(distributed)
    out = tmp_path / "dist"
    argv = ["bench", "--loss", loss_name, "--world-size", str(world), "--sizes", ",".join(map(str, sizes)),
            "--dim", str(DIM), "--dtype", "fp32", "--repeats", "2", "--no-plot", "--quiet", "--out", str(out),
            "--impls", ",".join(distributed), *extra]
    assert run_cli(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["world_size"] == world
    records = results["records"]
    assert sorted((r["impl"], r["n"]) for r in records) == sorted((i, n) for i in distributed for n in sizes)
    for rec in records:
        assert rec["status"] == "ok", rec
        assert rec["world_size"] == world and len(rec["peak_mib_per_rank"]) == world
        assert rec["peak_mib"] == max(rec["peak_mib_per_rank"])
        expected = loss.reference(loss.make_inputs(rec["n"], DIM, torch.float32, 0), loss.params)
        rtol = LOSS_RTOL[torch.float32] if rec["impl"] == "mmcl_fast" else BASELINE_RTOL
        assert abs(rec["loss_value"] - expected) <= rtol * abs(expected), rec
        assert rec["repeats"] == 2


def test_world_size_skips_impls_without_a_distributed_form(tmp_path):
    out = tmp_path / "dist"
    assert run_cli(["bench", "--loss", "clip", "--world-size", "2", "--sizes", "16", "--dim", str(DIM), "--dtype",
                    "fp32", "--repeats", "1", "--no-plot", "--quiet", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "no distributed form" in results["machine"]["unavailable_impls"]["clip"]["naive"]
    records = {r["impl"]: r for r in results["records"]}
    assert set(records) == {"mmcl_fast", "mmcl_fast_gather", "open_clip"}  # ring, gather, the anchor
    for name, record in records.items():
        assert record["status"] == "ok" and record["world_size"] == 2, record
        assert abs(record["loss_value"] - record["reference_loss"]) <= 1e-5 * abs(record["reference_loss"]), name


def _rank_killed(job, rank, world_size, init_method, conn):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)  # rank 0 would wait in a collective for the dead rank


def test_a_killed_rank_stops_the_group_and_is_an_oom_record():
    start = time.monotonic()
    result = measure_distributed({"world_size": 2}, timeout_seconds=300, target=_rank_killed)
    assert result["status"] == "oom" and "rank 1" in result["error"]
    assert time.monotonic() - start < 120


def test_combine_ranks_takes_the_slowest_rank_and_the_largest_peak():
    ranks = [{"status": "ok", "times": [1.0, 3.0, 2.0], "first_seconds": 4.0, "peak_bytes": 10, "peak_method": "m",
              "loss_value": 0.5},
             {"status": "ok", "times": [2.0, 1.0, 2.5], "first_seconds": 5.0, "peak_bytes": 7, "peak_method": "m",
              "loss_value": 0.5}]
    combined = combine_ranks(ranks)
    assert combined["times"] == [2.0, 3.0, 2.5] and combined["seconds"] == 2.5
    assert combined["first_seconds"] == 5.0 and combined["peak_bytes"] == 10
    assert combined["peak_bytes_per_rank"] == [10, 7]
    failed = combine_ranks([ranks[0], {"status": "error", "error": "rank 1: boom", "peak_bytes": None}])
    assert failed["status"] == "error" and failed["error"] == "rank 1: boom"


# ---------------------------------------------------------------------------------------------
# the float64 references against the dense float64 formulas, many row blocks
# ---------------------------------------------------------------------------------------------

def _dense_siglip64(image, text, scale, bias):
    logits = scale * image.double() @ text.double().T + bias
    signs = 2 * torch.eye(*logits.shape, dtype=torch.float64) - 1
    return float(-F.logsigmoid(signs * logits).sum() / image.shape[0])


@pytest.mark.parametrize("scale, bias", [(10.0, -10.0), (100.0, -20.0)])
def test_siglip_reference_matches_the_dense_formula(monkeypatch, scale, bias):
    monkeypatch.setattr(registry, "REFERENCE_BLOCK_BYTES", 8 * 37 * 5)  # 5 rows per block
    inputs = get_loss("siglip").make_inputs(37, 12, torch.float32, 3)
    loss = get_loss("siglip").reference(inputs, {"logit_scale": scale, "logit_bias": bias})
    expected = _dense_siglip64(inputs["image"], inputs["text"], scale, bias)
    assert_rel_close(torch.tensor(loss), torch.tensor(expected), LOSS_RTOL[torch.float64], "siglip reference")


DENSE = {"bridge": latent.dense_bridge, "bridge_per_sample_t": latent.dense_bridge_per_sample_t,
         "uniformity": latent.dense_uniformity, "separation": latent.dense_separation,
         "geometry": latent.dense_geometry}
DENSE_ARGS = {"bridge": ("image", "text", "augmented", "t"), "bridge_per_sample_t": ("image", "text", "augmented", "t"),
              "uniformity": ("x", "t"), "geometry": ("image", "text", "image_aug", "text_aug"),
              "separation": ("image", "text", "image_indep", "text_indep", "image_indep_aug", "text_indep_aug",
                             "temperature", "t")}


@pytest.mark.parametrize("loss_name", list(DENSE))
def test_latent_reference_matches_the_dense_formula_in_float64(monkeypatch, loss_name):
    monkeypatch.setattr(registry, "REFERENCE_BLOCK_BYTES", 8 * 41 * 4)  # a few rows per block
    loss = get_loss(loss_name)
    inputs = loss.make_inputs(41, 6, torch.float32, 5)
    values = {**loss.params, **{k: v.double() for k, v in inputs.items()}}
    expected = float(DENSE[loss_name](*(values[a] for a in DENSE_ARGS[loss_name])))
    actual = loss.reference(inputs, loss.params)
    assert_rel_close(torch.tensor(actual), torch.tensor(expected), LOSS_RTOL[torch.float64], f"{loss_name} reference")


def test_streamed_lse64_with_biases_matches_logsumexp(monkeypatch):
    x, y = torch.randn(29, 5, dtype=torch.float64), torch.randn(31, 5, dtype=torch.float64)
    row_bias, col_bias = torch.randn(29, dtype=torch.float64), 50 * torch.randn(31, dtype=torch.float64)
    for scale in (0.5, 80.0):  # the fixed-shift path and the running-LSE path
        logits = scale * x @ y.T + row_bias[:, None] + col_bias[None, :]
        row_lse, col_lse = registry.streamed_lse64(x, y, scale, 8 * 31 * 3, row_bias=row_bias, col_bias=col_bias)
        assert_rel_close(row_lse, torch.logsumexp(logits, 1), LOSS_RTOL[torch.float64], "row lse")
        assert_rel_close(col_lse, torch.logsumexp(logits, 0), LOSS_RTOL[torch.float64], "col lse")


def test_environment_names_the_cpu_its_build_and_the_date():
    """What studies and examples record about their machine: a CPU model (not the empty platform.processor() of
    Linux), the compiled kernel's ISA build and a UTC date."""
    import datetime

    from mmcl_fast.backends import cpu
    from mmcl_fast.bench.machine import environment
    env = environment()
    assert env["processor"] and env["processor"] != ""
    assert env["cpu_kernel_isa"] == (cpu.isa() if cpu.available() else None)
    assert datetime.datetime.fromisoformat(env["date"]).tzinfo is not None
    assert env["gpu"] is None and env["cpu_count"] >= 1
