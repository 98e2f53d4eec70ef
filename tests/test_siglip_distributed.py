"""mmcl_fast SigLipLoss across ranks, in real gloo process groups of 2 and 3, for every open_clip `dist_impl`.

One group of W processes per world size runs every case (FileStore rendezvous in a tmp dir). The parent writes the
global inputs, each rank takes its slice (equal and unequal local batches, one rank holding a single row), runs
`SigLipLoss(rank, world_size, dist_impl)` and ``(loss_r / W).backward()`` as DDP would, and sends back its loss and
gradients. Checked against a float64 single-process reference on the concatenated batch: mean_r loss_r == L, each
rank's feature gradients == dL/d(its rows), the logit_scale / logit_bias gradients summed over ranks == dL/ds, dL/db.
With equal batches each rank's loss and feature gradients are also compared with open_clip's own distributed
SigLipLoss.
"""
from __future__ import annotations

import os
import sys
import traceback

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from gloo import run_rank, spawn_ranks  # noqa: E402
from tolerances import GRAD_RTOL, LOSS_RTOL, assert_rel_close  # noqa: E402

DIM = 11
IMPLS = ("bidir", "shift", "reduce", "gather")
SIZES = {2: {"equal": (4, 4), "unequal": (5, 1)}, 3: {"equal": (3, 3, 3), "unequal": (4, 1, 6)}}
DTYPES = (torch.float32, torch.float64)
JOIN_TIMEOUT_S = 300


def _cases(world: int) -> list[tuple]:
    return [(impl, split, dtype) for impl in IMPLS for split in SIZES[world] for dtype in DTYPES]


def _worker(rank: int, world: int, work_dir: str) -> None:
    def body():
        import mmcl_fast
        inputs = torch.load(os.path.join(work_dir, "inputs.pt"))
        results = {}
        for impl, split, dtype in _cases(world):
            sizes = SIZES[world][split]
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            key = (impl, split, str(dtype))
            try:
                x = inputs["x"][lo:hi].to(dtype).requires_grad_()
                y = inputs["y"][lo:hi].to(dtype).requires_grad_()
                scale = torch.tensor(inputs["scale"], dtype=dtype, requires_grad=True)
                bias = torch.tensor(inputs["bias"], dtype=dtype, requires_grad=True)
                loss_fn = mmcl_fast.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)
                loss = loss_fn(x, y, scale, bias)
                (loss / world).backward()
                out = {"loss": loss.detach(), "dx": x.grad, "dy": y.grad, "ds": scale.grad, "db": bias.grad}
                if split == "equal" and dtype == torch.float32:
                    from open_clip.loss import SigLipLoss as OpenClipSigLip
                    xo, yo = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
                    so, bo = (torch.tensor(inputs[k], requires_grad=True) for k in ("scale", "bias"))
                    theirs = OpenClipSigLip(rank=rank, world_size=world, dist_impl=impl)(xo, yo, so, bo)
                    (theirs / world).backward()
                    out["open_clip"] = {"loss": theirs.detach(), "dx": xo.grad, "dy": yo.grad}
                results[key] = out
            except Exception:
                results[key] = {"error": traceback.format_exc()}
        return results
    run_rank(rank, world, work_dir, body, timeout_s=90)


_GROUPS: dict = {}


def _group_results(world: int, tmp_path_factory) -> tuple[dict, list[dict]]:
    if world not in _GROUPS:
        work_dir = tmp_path_factory.mktemp(f"siglip_gloo_w{world}")
        n = max(sum(s) for s in SIZES[world].values())
        gen = torch.Generator().manual_seed(world)
        inputs = {"x": F.normalize(torch.randn(n, DIM, dtype=torch.float64, generator=gen), dim=1),
                  "y": F.normalize(torch.randn(n, DIM, dtype=torch.float64, generator=gen), dim=1),
                  "scale": 10.0, "bias": -3.0}
        # float32 cases read the same values rounded once
        inputs["x"] = inputs["x"].float().double()
        inputs["y"] = inputs["y"].float().double()
        torch.save(inputs, work_dir / "inputs.pt")
        _GROUPS[world] = (inputs, spawn_ranks(_worker, world, work_dir, timeout=JOIN_TIMEOUT_S))
    return _GROUPS[world]


def _reference(x, y, scale, bias):
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    logits = s * x @ y.T + b
    z = 2 * torch.eye(x.shape[0], dtype=torch.float64) - 1
    loss = -F.logsigmoid(z * logits).sum() / x.shape[0]
    loss.backward()
    with torch.no_grad():  # sizes of the terms the scalar gradients sum (their natural scale, as in test_siglip)
        weights = torch.sigmoid(-z * logits) / x.shape[0]
        floors = ((weights * (x @ y.T).abs()).sum().item(), weights.sum().item())
    return loss.detach(), x.grad, y.grad, s.grad, b.grad, floors


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("split", ["equal", "unequal"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_global_loss_and_gradients(world, impl, split, dtype, tmp_path_factory):
    inputs, per_rank = _group_results(world, tmp_path_factory)
    sizes = SIZES[world][split]
    n = sum(sizes)
    loss, dx, dy, ds, db, (ds_floor, db_floor) = _reference(inputs["x"][:n], inputs["y"][:n], inputs["scale"], inputs["bias"])
    key = (impl, split, str(dtype))
    for rank, results in enumerate(per_rank):
        assert "error" not in results[key], f"rank {rank}:\n{results[key].get('error')}"
    loss_rtol, grad_rtol = LOSS_RTOL[dtype], GRAD_RTOL[dtype]
    mean_loss = sum(r[key]["loss"].double() for r in per_rank) / world
    assert_rel_close(mean_loss, loss, loss_rtol, "mean over ranks of loss_r")
    offset = 0
    for rank, size in enumerate(sizes):
        rows = slice(offset, offset + size)
        assert_rel_close(per_rank[rank][key]["dx"], dx[rows], grad_rtol, f"rank {rank} image gradients")
        assert_rel_close(per_rank[rank][key]["dy"], dy[rows], grad_rtol, f"rank {rank} text gradients")
        offset += size
    assert_rel_close(sum(r[key]["ds"].double() for r in per_rank), ds, grad_rtol, "summed d logit_scale",
                     floor=ds_floor)
    assert_rel_close(sum(r[key]["db"].double() for r in per_rank), db, grad_rtol, "summed d logit_bias",
                     floor=db_floor)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("impl", IMPLS)
def test_equal_batches_match_open_clip(world, impl, tmp_path_factory):
    _, per_rank = _group_results(world, tmp_path_factory)
    key = (impl, "equal", str(torch.float32))
    for rank, results in enumerate(per_rank):
        ours, theirs = results[key], results[key]["open_clip"]
        assert_rel_close(ours["loss"], theirs["loss"], 1e-5, f"rank {rank} loss vs open_clip")
        assert_rel_close(ours["dx"], theirs["dx"], 1e-5, f"rank {rank} image gradients vs open_clip")
        assert_rel_close(ours["dy"], theirs["dy"], 1e-5, f"rank {rank} text gradients vs open_clip")
