"""`mmcl-fast bench` and `mmcl-fast info`: flag errors, a tiny real bench run, the memory probe, the reference.

The bench runs here on tiny sizes (N <= 2048, D = 16) so the file stays fast; the child-process machinery,
the peak-memory probe and the float64 reference are the real ones.
"""
import argparse
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from tolerances import LOSS_RTOL, assert_rel_close

from mmcl_fast.bench import cli as bench_cli
from mmcl_fast.bench import info as bench_info
from mmcl_fast.bench.impls import LOSSES, get_loss, streamed_lse64
from mmcl_fast.bench.measure import measure_isolated

RECORD_FIELDS = {"impl", "loss", "n", "m", "d", "dtype", "device", "status", "seconds", "first_seconds", "repeats",
                 "peak_mib", "estimated_mib", "rel_err", "loss_value", "reference_loss", "gflops", "ceiling_frac",
                 "speedup", "memory_ratio", "note", "world_size", "input_mib"}
MACHINE_FIELDS = {"date", "cpu", "cores", "torch_threads", "device", "versions", "git_commit", "matmul_gflops",
                  "mem_budget_mib", "cpu_kernel_isa"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _parser() -> argparse.ArgumentParser:
    # the two subcommands of `mmcl-fast`, registered exactly as mmcl_fast/cli/__init__.py registers them
    parser = argparse.ArgumentParser(prog="mmcl-fast")
    subparsers = parser.add_subparsers(dest="command", required=True)
    bench_cli.register(subparsers)
    bench_info.register(subparsers)
    return parser


def run_cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------------------------------------
# flag errors: clear message naming the flag, exit status 2, nothing run
# ---------------------------------------------------------------------------------------------

def test_unknown_loss_is_rejected_naming_the_choices(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["bench", "--loss", "nosuchloss", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--loss" in err and "'nosuchloss'" in err and "clip" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_device_cuda_without_gpu_is_a_clear_error(capsys, tmp_path):
    assert run_cli(["bench", "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "no CUDA device" in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_out_under_a_regular_file_is_not_writable(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert run_cli(["bench", "--sizes", "8", "--dim", "4", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot write" in err


def test_out_that_is_a_file_is_rejected(capsys, tmp_path):
    blocker = tmp_path / "results.txt"
    blocker.write_text("x")
    assert run_cli(["bench", "--out", str(blocker)]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--sizes", "64,abc"), ("--sizes", "0"), ("--dim", "-3"),
                                         ("--dtype", "fp8"), ("--mem-budget", "lots"), ("--device", "tpu")])
def test_malformed_flag_values_name_the_flag(capsys, tmp_path, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["bench", flag, value, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_unknown_impl_and_impl_that_cannot_run_here(capsys, tmp_path):
    assert run_cli(["bench", "--impls", "mmcl_fast,bogus", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--impls" in err and "bogus" in err and "open_clip" in err
    if not torch.cuda.is_available():
        assert run_cli(["bench", "--impls", "inf_cl", "--device", "cpu", "--out", str(tmp_path)]) == 2
        assert "inf_cl" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--world-size", "0"], ["--world-size", "positive"]),
    (["--world-size", "3", "--sizes", "64,96"], ["--sizes 64", "--world-size 3"]),
    (["--world-size", "2", "--sizes", "64", "--dist-impl", "shift"], ["--dist-impl", "siglip"]),
    (["--loss", "siglip", "--dist-impl", "bidir"], ["--dist-impl", "--world-size"]),
    (["--loss", "geometry", "--world-size", "2", "--sizes", "64"], ["--loss geometry", "no distributed form"]),
    (["--loss", "bridge", "--impls", "mmcl_fast,open_clip"], ["--impls", "open_clip", "dense"]),
])
def test_bad_flag_combinations_name_the_flag(capsys, tmp_path, argv, words):
    assert run_cli(["bench", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "out" / "results.json").exists()


def test_siglip_without_its_kernel_is_a_clear_error_naming_the_missing_api(capsys, monkeypatch, tmp_path):
    import mmcl_fast
    monkeypatch.delattr(mmcl_fast, "siglip_loss", raising=False)
    assert run_cli(["bench", "--loss", "siglip", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--loss siglip" in err and "siglip_loss" in err and "--impls" in err


@pytest.mark.parametrize("text, expected", [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5", int(1.5 * 2**30)),
                                            ("64m", 64 * 2**20), ("1t", 2**40)])
def test_mem_budget_units(text, expected):
    assert bench_cli.parse_mem_budget(text) == expected


# ---------------------------------------------------------------------------------------------
# the float64 reference the bench checks every impl against
# ---------------------------------------------------------------------------------------------

# scale 37.5: every logit is bounded well inside float64's exp range (one fixed shift); 400: the bound is too
# wide for a fixed shift and the reference merges running log-sum-exps instead
@pytest.mark.parametrize("scale", [37.5, 400.0])
@pytest.mark.parametrize("n, block_bytes", [(1, 1 << 20), (37, 8 * 37 * 3), (64, 8 * 64), (130, 1 << 28)])
def test_clip_reference_matches_dense_cross_entropy(n, block_bytes, scale):
    image = F.normalize(torch.randn(n, 24, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(n, 24, dtype=torch.float64), dim=1)
    logits = scale * image @ text.T
    labels = torch.arange(n)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    row_lse, col_lse = streamed_lse64(image, text, scale, block_bytes=block_bytes)
    assert_rel_close(row_lse, torch.logsumexp(logits, 1), LOSS_RTOL[torch.float64], "row lse")
    assert_rel_close(col_lse, torch.logsumexp(logits, 0), LOSS_RTOL[torch.float64], "col lse")
    loss = get_loss("clip").reference({"image": image, "text": text}, {"logit_scale": scale})
    assert_rel_close(torch.tensor(loss, dtype=torch.float64), expected, LOSS_RTOL[torch.float64], "clip reference loss")


def test_every_registered_loss_has_its_anchor():
    for name, loss in LOSSES.items():
        assert loss.anchor in loss.impls, name
        assert "mmcl_fast" in loss.impls, name


# ---------------------------------------------------------------------------------------------
# a tiny real run
# ---------------------------------------------------------------------------------------------

def _load(out):
    with open(out / "results.json") as results:
        return json.load(results)


def test_tiny_bench_writes_results_and_plots(capsys, tmp_path):
    out = tmp_path / "bench"
    assert run_cli(["bench", "--sizes", "64,128", "--dim", "16", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mmcl_fast" in printed and "open_clip" in printed and "results.json" in printed
    results = _load(out)
    machine = results["machine"]
    assert MACHINE_FIELDS <= set(machine)
    assert machine["versions"]["torch"] == torch.__version__
    assert set(machine["matmul_gflops"]) == {"fp32", "bf16"}
    assert all(rate > 0 for rate in machine["matmul_gflops"].values())
    records = results["records"]
    impls = {"mmcl_fast", "open_clip", "naive"}
    assert {(r["impl"], r["n"], r["dtype"]) for r in records} == \
        {(i, n, dt) for i in impls for n in (64, 128) for dt in ("fp32", "bf16")}
    for rec in records:
        assert RECORD_FIELDS <= set(rec), rec
        assert rec["status"] == "ok", rec
        assert rec["loss"] == "clip" and rec["d"] == 16 and rec["m"] == rec["n"] and rec["device"] == "cpu"
        assert rec["seconds"] > 0 and rec["repeats"] >= 1 and rec["peak_mib"] >= 0
        assert math.isclose(rec["gflops"], 8 * rec["n"] ** 2 * 16 / rec["seconds"] / 1e9, rel_tol=1e-2, abs_tol=0.01)
        assert math.isfinite(rec["rel_err"])
    for rec in records:
        if rec["impl"] == "mmcl_fast":  # fp32 accumulation whatever the input dtype
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[rec["dtype"]]
            assert rec["rel_err"] <= LOSS_RTOL[dtype], rec
        if rec["impl"] == "open_clip":
            assert rec["speedup"] == 1.0
    summary = (out / "summary.md").read_text()
    assert "| N | mmcl_fast | open_clip | naive |" in summary and "| 128 |" in summary
    for name in ("time_vs_n.png", "memory_vs_n.png"):
        with open(out / name, "rb") as png:
            assert png.read(8) == PNG_MAGIC


def test_reference_backend_flag_reaches_mmcl_fast(tmp_path):
    out = tmp_path / "bench"
    assert run_cli(["bench", "--sizes", "33", "--dim", "16", "--dtype", "fp32", "--impls", "mmcl_fast",
                    "--backend", "reference", "--repeats", "2", "--no-plot", "--quiet", "--out", str(out)]) == 0
    results = _load(out)
    assert results["config"]["backend"] == "reference"
    (rec,) = results["records"]
    assert rec["status"] == "ok" and rec["repeats"] == 2
    assert rec["rel_err"] <= LOSS_RTOL[torch.float32]
    assert not list(out.glob("*.png"))


def test_dense_baseline_over_budget_is_skipped_and_mmcl_fast_runs(tmp_path):
    out = tmp_path / "bench"
    assert run_cli(["bench", "--sizes", "64,2048", "--dim", "16", "--dtype", "fp32", "--impls", "mmcl_fast,open_clip",
                    "--mem-budget", "8MiB", "--quiet", "--out", str(out)]) == 0
    records = {(r["impl"], r["n"]): r for r in _load(out)["records"]}
    skipped = records[("open_clip", 2048)]
    assert skipped["status"] == "skipped" and skipped["over_budget"] and "budget" in skipped["note"]
    assert skipped["estimated_mib"] > 8 and skipped["seconds"] is None
    assert records[("open_clip", 64)]["status"] == "ok"
    assert records[("mmcl_fast", 2048)]["status"] == "ok"


def test_peak_memory_sees_the_dense_logits_and_not_in_mmcl_fast(tmp_path):
    """The probe is the bench's memory claim: a dense loss must show at least its N x N fp32 logits, the fused
    kernel (O(N D) memory) must stay below one such matrix."""
    n = 2048
    out = tmp_path / "bench"
    assert run_cli(["bench", "--sizes", str(n), "--dim", "16", "--dtype", "fp32", "--impls", "mmcl_fast,naive",
                    "--repeats", "1", "--no-plot", "--quiet", "--out", str(out)]) == 0
    records = {r["impl"]: r for r in _load(out)["records"]}
    logits_mib = n * n * 4 / 2**20
    assert records["naive"]["peak_mib"] >= logits_mib
    assert records["mmcl_fast"]["peak_mib"] < logits_mib
    assert records["mmcl_fast"]["memory_ratio"] is None  # open_clip (the anchor) did not run


# ---------------------------------------------------------------------------------------------
# the isolated child: a killed child is an oom record, a crash is an error record, the sweep goes on
# ---------------------------------------------------------------------------------------------

def _killed_child(job, conn):
    os.kill(os.getpid(), signal.SIGKILL)


def _crashing_child(job, conn):
    raise SystemExit(3)


def test_child_killed_by_sigkill_is_recorded_as_oom():
    result = measure_isolated({}, timeout_seconds=120, target=_killed_child)
    assert result["status"] == "oom" and "SIGKILL" in result["error"]


def test_child_crash_is_recorded_as_error():
    result = measure_isolated({}, timeout_seconds=120, target=_crashing_child)
    assert result["status"] == "error" and "code 3" in result["error"]


def test_missing_inputs_is_an_error_record_not_a_crash(tmp_path):
    job = {"loss": "clip", "impl": "naive", "n": 8, "d": 4, "dtype": "fp32", "device": "cpu",
           "inputs_path": str(tmp_path / "missing.pt"), "options": {},
           "timing": {"target_seconds": 0.1, "min_repeats": 1, "max_repeats": 1}}
    result = measure_isolated(job, timeout_seconds=120)
    assert result["status"] == "error" and "missing.pt" in result["error"]


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------

def test_info_lists_versions_and_backends(capsys):
    assert run_cli(["info"]) == 0
    printed = capsys.readouterr().out
    assert torch.__version__ in printed
    for word in ("reference", "cpu", "triton", "mmcl_fast", "open_clip"):
        assert word in printed


def test_info_json_reports_the_cpu_kernel_isa(capsys):
    assert run_cli(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["versions"]["torch"] == torch.__version__
    assert set(data["backends"]) == {"reference", "torch", "cpu", "triton"}
    assert data["backends"]["reference"]["available"] is True
    from mmcl_fast.backends import cpu
    assert data["backends"]["cpu"]["available"] == cpu.available()
    if cpu.available():
        assert data["backends"]["cpu"]["isa"] == cpu.isa()
        assert data["auto_backend"]["cpu"] == "cpu"
    assert data["backends"]["triton"]["available"] is False or torch.cuda.is_available() or \
        os.environ.get("TRITON_INTERPRET") == "1"
    assert data["bench_impls"]["clip"]["naive"]["cpu"] == "ok"
    assert set(data["bench_impls"]) == set(LOSSES) >= {"clip", "siglip", "bridge", "uniformity", "separation",
                                                        "geometry"}
    assert data["bench_impls"]["siglip"]["dense"]["cpu"] == "ok"


# ---------------------------------------------------------------------------------------------
# the command itself: the library's subcommands only (the studies and examples run as python -m studies.…)
# ---------------------------------------------------------------------------------------------

def test_mmcl_fast_has_the_library_subcommands_only(capsys):
    from mmcl_fast import cli
    assert set(cli.SUBCOMMANDS) == set(cli.EXTRAS) == {"bench", "info"}
    for lab in ("misalign", "cmcr", "train"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([lab, "--help"])
        assert exit_info.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
