"""python -m mmcl_fast.integrations.open_clip_train against open_clip's own training script.

The runs use ViT-S-32 with random init at a reduced image size and context length (64 px, 16 tokens: the same
architecture, a fraction of the CPU time). open_clip's synthetic data repeats one black image and one caption,
so every feature is the same and the first loss is log(batch) for any model: the CSV test therefore also trains on
distinct images with plain SGD, where the second logged loss depends on the first step's gradients.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("open_clip_train.main")  # open_clip_torch's `training` extra

from mmcl_fast.integrations import open_clip_train as integration  # noqa: E402

LOSS_LINE = re.compile(r"Contrastive_loss: ([0-9.eE+-]+)")
COMMON = ["--model", "ViT-S-32", "--force-image-size", "64", "--force-context-length", "16", "--batch-size", "8",
          "--epochs", "1", "--workers", "0", "--log-every-n-steps", "1", "--precision", "fp32", "--logs", "none",
          "--seed", "0", "--warmup", "0", "--device", "cpu", "--report-to", ""]


def _train(cwd, module: str, name: str, args: list[str]) -> tuple[list[float], str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    done = subprocess.run([sys.executable, "-m", module, *COMMON, "--name", name, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return [float(v) for v in LOSS_LINE.findall(output)], output


@pytest.mark.slow
def test_synthetic_first_logged_loss_equals_unpatched(tmp_path):
    args = ["--dataset-type", "synthetic", "--train-num-samples", "16", "--lr", "1e-3"]
    plain, _ = _train(tmp_path, "open_clip_train.main", "plain", args)
    cached, output = _train(tmp_path, "mmcl_fast.integrations.open_clip_train", "cached", args + ["--mmcl-chunk", "3"])
    assert "mmcl_fast: loss ClipLoss, gradient-cached steps, 3 rows per encoder call" in output
    assert len(plain) == len(cached) == 2
    assert cached[0] == pytest.approx(plain[0], rel=1e-4)


def _write_csv_dataset(folder, n: int) -> str:
    """open_clip's CSV format (tab-separated filepath / title) over n distinct random-noise PNGs."""
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    rows = ["filepath\ttitle"]
    for index in range(n):
        pixels = torch.randint(0, 256, (64, 64, 3), generator=generator, dtype=torch.uint8).numpy()
        path = folder / f"image{index}.png"
        Image.fromarray(pixels).save(path)
        rows.append(f"{path}\ta picture of pattern number {index}")
    csv_path = folder / "train.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return str(csv_path)


@pytest.mark.slow
def test_csv_losses_match_unpatched_after_a_step(tmp_path):
    csv_path = _write_csv_dataset(tmp_path, 16)
    args = ["--dataset-type", "csv", "--train-data", csv_path, "--train-num-samples", "16", "--opt", "timm/momentum",
            "--momentum", "0", "--wd", "0", "--lr", "0.5", "--lr-scheduler", "const"]
    plain, _ = _train(tmp_path, "open_clip_train.main", "plain", args)
    cached, _ = _train(tmp_path, "mmcl_fast.integrations.open_clip_train", "cached", args + ["--mmcl-chunk", "3"])
    assert len(plain) == len(cached) == 2
    assert plain[1] != pytest.approx(plain[0], rel=1e-3), "the first step must move the loss for this test to bite"
    assert cached == pytest.approx(plain, rel=2e-4)


def test_argv_split_and_refusals():
    ours, rest = integration.split_argv(["--model", "RN50", "--mmcl-chunk", "4", "--batch-size", "64"])
    assert ours.mmcl_chunk == 4 and rest == ["--model", "RN50", "--batch-size", "64"]
    with pytest.raises(SystemExit):
        integration.split_argv(["--mmcl-chunk", "0"])
    base = dict(distill=False, model="ViT-S-32", horovod=False, siglip=False, local_loss=True,
                gather_with_grad=True, rank=0, world_size=1, loss_dist_impl=None, accum_freq=1)
    loss = integration.create_mmcl_loss(argparse.Namespace(**base))
    assert type(loss).__name__ == "ClipLoss" and loss.local_loss and loss.gather_with_grad
    with pytest.raises(ValueError, match="--model"):
        integration.create_mmcl_loss(argparse.Namespace(**{**base, "model": "coca_ViT-B-32"}))
    with pytest.raises(ValueError, match="--accum-freq"):
        with integration.patched(4) as oc_main:
            oc_main.create_loss(argparse.Namespace(**{**base, "accum_freq": 2}))


def test_siglip_uses_mmcl_fast_siglip_loss_when_present():
    import mmcl_fast
    args = argparse.Namespace(distill=False, model="ViT-S-32", horovod=False, siglip=True, local_loss=False,
                              gather_with_grad=False, rank=0, world_size=1, loss_dist_impl=None, accum_freq=1)
    if getattr(mmcl_fast, "SigLipLoss", None) is None:
        with pytest.raises(RuntimeError, match="SigLipLoss"):
            integration.create_mmcl_loss(args)
        pytest.skip("mmcl_fast.SigLipLoss is not in this tree yet (another engineer is adding it): "
                    "checked the clear error instead")
    assert isinstance(integration.create_mmcl_loss(args), mmcl_fast.SigLipLoss)
