"""The digits example (examples.digits): resume bit for bit, a CSV folder, the SigLIP loss, flag errors, the
quick run's zero-shot accuracy and a torchrun (gloo) run that matches one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("open_clip")
from examples.digits import cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_help_runs_from_the_repository_root():
    done = subprocess.run([sys.executable, "-m", "examples.digits", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: python -m examples.digits")
    for flag in ("--data", "--quick", "--batch-size", "--chunk-size", "--resume", "--device", "--threads", "--out"):
        assert flag in done.stdout, flag


def _train_cli(*args) -> int:
    return cli.main(["--no-progress", *map(str, args)])


SHORT_RUN = ("--steps", 4, "--batch-size", 48, "--chunk-size", 16, "--log-every", 1, "--warmup", 1, "--threads", 1)


def test_train_cli_resume_continues_bit_for_bit(tmp_path):
    assert _train_cli(*SHORT_RUN, "--out", tmp_path / "straight") == 0
    assert _train_cli(*SHORT_RUN, "--out", tmp_path / "resumed", "--stop-at", 2) == 0
    assert not (tmp_path / "resumed" / "results.json").exists()
    assert _train_cli(*SHORT_RUN, "--out", tmp_path / "resumed", "--resume") == 0
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert straight["step"] == resumed["step"] == 4
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), f"{name} differs after resuming"
    results = json.loads((tmp_path / "resumed" / "results.json").read_text())
    for key in ("zero_shot_accuracy", "batch_size", "chunk_size", "steps", "seconds", "peak_mib"):
        assert key in results, key
    assert results["batch_size"] == 48 and results["chunk_size"] == 16 and results["steps"] == 4
    assert 0.0 <= results["zero_shot_accuracy"] <= 1.0 and results["peak_mib"] > 0
    assert results["resumed_from_step"] == 2
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert log[-1]["eval"]["zero_shot_accuracy"] == results["zero_shot_accuracy"]


def write_image_folder_csv(folder, n: int) -> str:
    """A folder of n PNGs (coloured squares at different places) and open_clip's CSV over them, relative paths."""
    from PIL import Image
    colours = ["red", "green", "blue", "yellow"]
    rows = ["filepath\ttitle"]
    for index in range(n):
        colour = colours[index % len(colours)]
        image = Image.new("RGB", (24, 24), "black")
        image.paste(colour, (index % 3 * 8, index // 3 % 3 * 8, index % 3 * 8 + 8, index // 3 % 3 * 8 + 8))
        image.save(folder / f"img{index}.png")
        rows.append(f"img{index}.png\ta {colour} square at place {index % 9}")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    return str(folder / "data.csv")


def test_train_cli_on_a_csv_folder(tmp_path):
    csv_path = write_image_folder_csv(tmp_path, 20)
    assert _train_cli("--data", f"csv:{csv_path}", "--steps", 2, "--batch-size", 8, "--chunk-size", 3,
                      "--threads", 1, "--out", tmp_path / "run") == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["zero_shot_accuracy"] is None  # captions without classes: retrieval instead
    assert 0.0 <= results["retrieval_top1"] <= 1.0
    assert results["train_images"] == 16 and results["test_images"] == 4


def test_train_cli_siglip_loss(tmp_path):
    assert _train_cli("--loss", "siglip", "--steps", 2, "--batch-size", 32, "--chunk-size", 8, "--threads", 1,
                      "--out", tmp_path) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["loss"] == "siglip" and 0.0 <= results["zero_shot_accuracy"] <= 1.0


@pytest.mark.parametrize("argv, words", [
    (["--data", "mnist"], "--data"),
    (["--chunk-size", 0], "--chunk-size"),
    (["--batch-size", 5000, "--steps", 1], "--batch-size 5000"),
    (["--resume", "--steps", 1], "--resume"),
    (["--data", "csv:{tmp}/missing.csv"], "csv:PATH"),
])
def test_train_cli_bad_input_names_the_argument(argv, words, tmp_path, capsys):
    argv = [str(a).format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:  # the usage line and the message, exit status 2
        _train_cli(*argv, "--out", tmp_path / "run")
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.slow
def test_quick_digits_run_reaches_zero_shot_accuracy(tmp_path):
    """The README's command: `python -m examples.digits --quick`, default seed."""
    done = subprocess.run([sys.executable, "-m", "examples.digits", "--data", "digits", "--quick", "--no-progress",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["zero_shot_accuracy"] >= 0.9, results
    assert results["batch_size"] >= 4 * results["chunk_size"]


@pytest.mark.slow
def test_train_cli_under_torchrun_gloo_matches_one_process(tmp_path):
    """Two ranks (DDP, gloo, the loss's cross-rank form) train as one process on the same global batches."""
    args = ["--no-progress", "--steps", "3", "--batch-size", "64", "--chunk-size", "16", "--warmup", "1",
            "--log-every", "1", "--threads", "1"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "examples.digits", *args, "--out", str(tmp_path / "ddp")],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _train_cli(*args[1:], "--out", tmp_path / "single") == 0
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    ddp_log = [json.loads(line)["loss"] for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
               if '"loss"' in line]
    single_log = [json.loads(line)["loss"] for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()
                  if '"loss"' in line]
    # step 1 is the same loss on the same batch; later steps follow AdamW updates from gradients equal to fp32
    # rounding (AdamW's first steps are nearly sign(g) · lr, so rounding moves them a little)
    assert ddp_log[0] == pytest.approx(single_log[0], rel=1e-5)
    assert ddp_log == pytest.approx(single_log, rel=1e-3)
