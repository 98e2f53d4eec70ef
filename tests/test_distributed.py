"""mmcl_fast.distributed against the float64 single-process loss, in real gloo process groups (2 and 3 ranks).

For each world size one gloo group of W processes is spawned on this machine (FileStore rendezvous in a tmp dir)
and runs every scenario once; the tests then check its results. The parent writes the global inputs to disk,
every rank takes its (unequal) slice, runs the loss and ``(loss / W).backward()`` as DDP would,
and writes back its loss and gradients. The parent then checks the DDP semantics (docs/distributed.md) against a float64
reference written here with torch.nn.functional.cross_entropy on the concatenated batch:
sum_r loss_r / W == L, each rank's feature gradients == dL/d(its rows), and the logit_scale / logit_bias
gradients summed over ranks == dL/ds, dL/db.
"""
from __future__ import annotations

import os
import traceback
import zlib

import pytest
import torch
import torch.nn.functional as F

from gloo import run_rank, spawn_ranks
from tolerances import GRAD_RTOL, LOSS_RTOL, assert_rel_close

DIM = 13
MEMORY_N, MEMORY_DIM = 4096, 8
JOIN_TIMEOUT_S = 240

# per world size: unequal local batches (with a rank holding a single row) and an equal split for open_clip parity
UNEQUAL_SIZES = {2: (5, 3), 3: (4, 1, 6)}
EQUAL_SIZES = {2: (4, 4), 3: (3, 3, 3)}
# fp32 is the acceptance dtype; float64 checks the exactness of the cross-rank algebra itself (1e-10). bf16 is left
# out: a caption's gradient is a sum of W partials that the primitive hands back already rounded to bf16, so it
# carries W + 1 roundings, not the one that GRAD_RTOL[bf16] budgets for.
DTYPES = (torch.float32, torch.float64)
IMPLS = ("ring", "gather")  # mmcl_fast.distributed.CLIP_DIST_IMPLS


# ---------------------------------------------------------------------------------------------
# process-group harness
# ---------------------------------------------------------------------------------------------

def _worker(rank: int, world: int, work_dir: str, options: dict) -> None:
    """Entry point of each spawned rank: run every block, write rank{rank}.pt (rank{rank}.err if the harness fails).

    A block that raises records its traceback and the next block runs: one failing backend does not hide the
    results of the others.
    """
    device = options.get("device", "cpu")

    def body():
        cases = torch.load(os.path.join(work_dir, "cases.pt"))
        results = {}
        for block in options["blocks"]:
            scenario, _, backend = block.partition(":")
            try:
                results[block] = _SCENARIOS[scenario](rank, world, cases, backend, device)
            except Exception:
                results[block] = {"error": traceback.format_exc()}
        return results
    run_rank(rank, world, work_dir, body, backend=options.get("dist_backend", "gloo"), timeout_s=60)


def _run_group(world: int, work_dir, cases: dict, options: dict) -> list[dict]:
    torch.save(cases, work_dir / "cases.pt")
    return spawn_ranks(_worker, world, work_dir, (options,), JOIN_TIMEOUT_S)


def _block(per_rank: list[dict], block: str) -> list[dict]:
    """One block's results on every rank; a block that raised fails the test with its traceback."""
    failed = {rank: result[block]["error"] for rank, result in enumerate(per_rank) if "error" in result[block]}
    if failed:
        pytest.fail(f"{block} raised:\n" + "\n".join(f"--- rank {r}\n{e}" for r, e in failed.items()))
    return [result[block] for result in per_rank]


# ---------------------------------------------------------------------------------------------
# inputs and the float64 reference
# ---------------------------------------------------------------------------------------------

def _make_case(sizes, dtype, with_bias: bool) -> dict:
    n = sum(sizes)
    image = F.normalize(torch.randn(n, DIM, dtype=torch.float64), dim=1).to(dtype)
    text = F.normalize(torch.randn(n, DIM, dtype=torch.float64), dim=1).to(dtype)
    # A large scale makes whole columns underflow under a fixed shift: the LSE merge must be safe.
    # (float32 values: the ranks hold logit_scale / logit_bias as float32 tensors, the reference uses them exactly)
    scale = float(torch.empty((), dtype=torch.float32).uniform_(10.0, 100.0))
    bias = float(torch.empty((), dtype=torch.float32).uniform_(-10.0, 0.0)) if with_bias else None
    return {"sizes": tuple(sizes), "image": image, "text": text, "scale": scale, "bias": bias}


def _cases(world: int) -> dict:
    cases = {f"unequal-{dtype}": _make_case(UNEQUAL_SIZES[world], dtype, with_bias=True) for dtype in DTYPES}
    cases["unequal-nobias"] = _make_case(UNEQUAL_SIZES[world], torch.float32, with_bias=False)
    cases["equal"] = _make_case(EQUAL_SIZES[world], torch.float32, with_bias=True)
    return cases


def _reference(case: dict) -> dict:
    """The single-process loss on the concatenated batch, in float64, with its per-row and per-column terms."""
    image = case["image"].to(torch.float64, copy=True).requires_grad_()  # a copy: never a leaf of the case
    text = case["text"].to(torch.float64, copy=True).requires_grad_()
    scale = torch.tensor(case["scale"], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(case["bias"] or 0.0, dtype=torch.float64, requires_grad=True)
    logits = scale * image @ text.T + bias
    labels = torch.arange(image.shape[0])
    row_terms = F.cross_entropy(logits, labels, reduction="none")
    col_terms = F.cross_entropy(logits.T, labels, reduction="none")
    loss = 0.5 * (row_terms.mean() + col_terms.mean())
    loss.backward()
    return {"loss": loss.detach(), "row_terms": row_terms.detach(), "col_terms": col_terms.detach(),
            "d_image": image.grad, "d_text": text.grad, "d_scale": scale.grad, "d_bias": bias.grad}


def _local_slice(case: dict, rank: int):
    sizes = case["sizes"]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _check_against_reference(case: dict, per_rank: list[dict], local_loss: bool, label: str = "") -> None:
    """The DDP property, rank by rank, against the float64 reference (`label` prefixes failures)."""
    try:
        _check_properties(case, per_rank, local_loss)
    except AssertionError as err:
        raise AssertionError(f"{label} local_loss={local_loss} sizes={case['sizes']} "
                             f"{case['image'].dtype}: {err}") from None


def _check_properties(case: dict, per_rank: list[dict], local_loss: bool) -> None:
    ref = _reference(case)
    dtype, world, n = case["image"].dtype, len(case["sizes"]), sum(case["sizes"])
    losses = torch.stack([result["loss"].double() for result in per_rank])
    assert_rel_close(losses.sum() / world, ref["loss"], LOSS_RTOL[dtype], "sum_r loss_r / W")
    for rank, result in enumerate(per_rank):
        rows = _local_slice(case, rank)
        if local_loss:
            share = world / n * 0.5 * (ref["row_terms"][rows].sum() + ref["col_terms"][rows].sum())
            assert_rel_close(result["loss"], share, LOSS_RTOL[dtype], f"rank {rank} local share")
        else:
            assert_rel_close(result["loss"], ref["loss"], LOSS_RTOL[dtype], f"rank {rank} global loss")
        assert result["d_image"].dtype == dtype and result["d_text"].dtype == dtype
        assert_rel_close(result["d_image"], ref["d_image"][rows], GRAD_RTOL[dtype], f"rank {rank} d_image")
        assert_rel_close(result["d_text"], ref["d_text"][rows], GRAD_RTOL[dtype], f"rank {rank} d_text")
    # dL/ds = E_softmax[<x, y>] - <x_i, y_i>, a cancelling difference: measured against the positives' size
    positives = (case["image"].double() * case["text"].double()).sum(1).abs().mean().item()
    d_scale = sum(result["d_scale"].double() for result in per_rank)
    assert_rel_close(d_scale, ref["d_scale"], GRAD_RTOL[dtype], "logit_scale grad summed over ranks",
                     floor=positives)
    if case["bias"] is not None:
        # dL/db = sum(softmax weights) - 1 = 0 for a softmax loss: measured against those O(1) terms
        d_bias = sum(result["d_bias"].double() for result in per_rank)
        assert_rel_close(d_bias, ref["d_bias"], GRAD_RTOL[dtype], "logit_bias grad summed over ranks", floor=1.0)


# ---------------------------------------------------------------------------------------------
# what each rank runs
# ---------------------------------------------------------------------------------------------

def _run_and_backward(loss_fn, case: dict, rank: int, world: int, device: str) -> dict:
    rows = _local_slice(case, rank)
    image = case["image"][rows].clone().to(device).requires_grad_()
    text = case["text"][rows].clone().to(device).requires_grad_()
    # logit_scale / logit_bias as a trainer holds them: float32 parameters (float64 for a float64 model)
    param_dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    scale = torch.tensor(case["scale"], dtype=param_dtype, device=device, requires_grad=True)
    bias = None if case["bias"] is None else torch.tensor(case["bias"], dtype=param_dtype, device=device,
                                                          requires_grad=True)
    loss = loss_fn(image, text, scale, bias)
    (loss / world).backward()  # what DDP's gradient averaging amounts to
    out = {"loss": loss.detach().cpu(), "d_image": image.grad.cpu(), "d_text": text.grad.cpu(),
           "d_scale": scale.grad.cpu()}
    if bias is not None:
        out["d_bias"] = bias.grad.cpu()
    return out


def _scenario_function(rank, world, cases, backend, device, impls=IMPLS) -> dict:
    """mmcl_fast.distributed.clip_loss on every case, both local_loss values, every dist_impl."""
    from mmcl_fast import distributed as mdist
    results = {}
    for impl in impls:
        for name, case in cases.items():
            for local_loss in (False, True):
                results[name, local_loss, impl] = _run_and_backward(
                    lambda x, y, s, b, local_loss=local_loss, impl=impl: mdist.clip_loss(
                        x, y, s, b, local_loss=local_loss, dist_impl=impl, backend=backend),
                    case, rank, world, device)
    return results


def _scenario_no_reduce_scatter(rank, world, cases, backend, device) -> dict:
    """As `function`, on a process group whose backend lacks reduce-scatter (the all-reduce fallback)."""
    import torch.distributed as dist

    refused = []

    def unsupported(*args, **kwargs):
        refused.append(1)
        raise RuntimeError("this backend does not support reduce_scatter")

    saved = {name: getattr(dist, name) for name in ("reduce_scatter_single", "reduce_scatter_tensor")
             if hasattr(dist, name)}
    for name in saved:
        setattr(dist, name, unsupported)
    try:
        results = _scenario_function(rank, world, {f"unequal-{torch.float32}": cases[f"unequal-{torch.float32}"]},
                                     backend, device, impls=("gather",))  # the ring never reduce-scatters
        results["refused"] = len(refused)
        return results
    finally:
        for name, function in saved.items():
            setattr(dist, name, function)


def _scenario_module(rank, world, cases, backend, device) -> dict:
    """mmcl_fast.ClipLoss with every (local_loss, gather_with_grad) flag combination."""
    from mmcl_fast import ClipLoss
    results = {}
    for name in ("equal", f"unequal-{torch.float32}"):
        for local_loss in (False, True):
            for gather_with_grad in (False, True):
                module = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                                  world_size=world, backend=backend)
                results[name, local_loss, gather_with_grad] = _run_and_backward(
                    module, cases[name], rank, world, device)
    return results


def _scenario_open_clip(rank, world, cases, backend, device) -> dict:
    """open_clip's ClipLoss(gather_with_grad=True) on the equal case (open_clip needs equal local batches)."""
    from open_clip.loss import ClipLoss as OpenClipLoss
    results = {}
    for local_loss in (False, True):
        module = OpenClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world)
        results[local_loss] = _run_and_backward(module, cases["equal"], rank, world, device)
    return results


def _scenario_errors(rank, world, cases, backend, device) -> dict:
    """Inputs that disagree across ranks: every rank must raise (no hang), and the group must stay usable."""
    import torch.distributed as dist

    from mmcl_fast import distributed as mdist
    n, odd = 3, world - 1  # `odd`: the rank whose input differs

    def features(dim=DIM, dtype=torch.float32, rows=n, grad=True):
        return torch.randn(rows, dim, dtype=dtype).requires_grad_(grad)

    calls = {
        "dim": lambda: mdist.clip_loss(features(DIM + (rank == odd)), features(DIM + (rank == odd)), 10.0),
        "dtype": lambda: mdist.clip_loss(*(features(dtype=torch.float64 if rank == odd else torch.float32)
                                           for _ in range(2)), 10.0),
        "unpaired": lambda: mdist.clip_loss(features(), features(rows=n + (rank == odd)), 10.0),
        "requires_grad": lambda: mdist.clip_loss(features(grad=rank != odd), features(grad=rank != odd), 10.0),
        "rank_arg": lambda: mdist.clip_loss(features(), features(), 10.0, rank=0),
        "world_size_arg": lambda: mdist.clip_loss(features(), features(), 10.0, world_size=world + 1),
    }
    results = {}
    for name, call in calls.items():
        try:
            call()
            results[name] = ("no error", "")
        except (TypeError, ValueError) as err:
            results[name] = (type(err).__name__, str(err))
        token = torch.ones(1)
        dist.all_reduce(token)  # every rank left the failed call at the same collective boundary
        results[name, "group_ok"] = float(token) == world
    loss = mdist.clip_loss(features(), features(), 10.0)  # and a valid call still works afterwards
    loss.backward()
    results["valid_after_errors"] = bool(torch.isfinite(loss))
    return results


def _scenario_memory(rank, world, cases, backend, device) -> dict:
    """Peak RSS growth of one fwd+bwd step at N = MEMORY_N, D = MEMORY_DIM (small D: an N_r x N buffer would
    dwarf everything the algorithm needs, O(N * D)), for every dist_impl."""
    from mmcl_fast import distributed as mdist
    from mmcl_fast.bench.memory import RssPeak
    n_local = MEMORY_N // world + (rank < MEMORY_N % world)
    results = {}
    for impl in IMPLS:
        image, text = (F.normalize(torch.randn(n_local, MEMORY_DIM), dim=1).requires_grad_() for _ in range(2))
        scale = torch.tensor(50.0, requires_grad=True)
        warm = [torch.randn(8, MEMORY_DIM).requires_grad_() for _ in range(2)]
        mdist.clip_loss(*warm, scale, dist_impl=impl, backend=backend).backward()
        with RssPeak() as probe:
            mdist.clip_loss(image, text, scale, dist_impl=impl, backend=backend).backward()
        results[impl] = {"peak_bytes": probe.peak_bytes, "method": probe.method, "n_local": n_local}
    return results


_SCENARIOS = {"memory": _scenario_memory, "function": _scenario_function,
              "no_reduce_scatter": _scenario_no_reduce_scatter, "module": _scenario_module,
              "open_clip": _scenario_open_clip, "errors": _scenario_errors}
BACKENDS = ("reference", "auto")


@pytest.fixture(scope="module", params=[2, 3], ids=["W2", "W3"])
def gloo_group(request, tmp_path_factory):
    """One real gloo group of W processes runs every scenario; returns (cases, per-rank results)."""
    world = request.param
    torch.manual_seed(zlib.crc32(f"{__name__}-W{world}".encode()))
    cases = _cases(world)
    blocks = (["memory:auto"] + [f"function:{backend}" for backend in BACKENDS]
              + ["no_reduce_scatter:auto", "module:auto", "errors:auto"])
    if world == 2:  # importing open_clip costs seconds of CPU per process: its parity check runs at W = 2 only
        blocks.append("open_clip:")
    per_rank = _run_group(world, tmp_path_factory.mktemp(f"gloo_w{world}"), cases, {"blocks": blocks})
    return world, cases, per_rank


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_and_grads_match_single_process_reference(gloo_group, backend, impl):
    """Unequal batches, fp32 (1e-5) and float64 (1e-10), with and without logit_bias, both local_loss values."""
    _, cases, per_rank = gloo_group
    results = _block(per_rank, f"function:{backend}")
    for name, case in cases.items():
        for local_loss in (False, True):
            _check_against_reference(case, [result[name, local_loss, impl] for result in results], local_loss,
                                     label=f"dist_impl={impl}")


def test_all_reduce_fallback_without_reduce_scatter_is_exact(gloo_group):
    _, cases, per_rank = gloo_group
    results = _block(per_rank, "no_reduce_scatter:auto")
    assert all(result["refused"] == 2 for result in results)  # one backward per local_loss value
    name = f"unequal-{torch.float32}"
    for local_loss in (False, True):
        _check_against_reference(cases[name], [result[name, local_loss, "gather"] for result in results],
                                 local_loss)


def test_cliploss_every_flag_combination_is_exact(gloo_group):
    """open_clip drops cross-rank gradients without gather_with_grad; here every combination is exact.

    The returned value follows open_clip's local_loss (global loss / this rank's share), which needs
    ClipLoss.forward to pass local_loss=self.local_loss on to mmcl_fast.distributed.clip_loss."""
    _, cases, per_rank = gloo_group
    results = _block(per_rank, "module:auto")
    for name in ("equal", f"unequal-{torch.float32}"):
        for local_loss in (False, True):
            for gather_with_grad in (False, True):
                _check_against_reference(
                    cases[name], [result[name, local_loss, gather_with_grad] for result in results], local_loss,
                    label=f"ClipLoss(gather_with_grad={gather_with_grad})")


@pytest.mark.parametrize("gloo_group", [2], ids=["W2"], indirect=True)
def test_cliploss_matches_open_clip_gather_with_grad(gloo_group):
    """Drop-in: open_clip's value and gradients (local_loss False and True, gather_with_grad=True), equal batches."""
    _, _, per_rank = gloo_group
    results = _block(per_rank, "module:auto")
    open_clip_results = _block(per_rank, "open_clip:")
    for local_loss in (False, True):
        what = f"local_loss={local_loss}"
        for rank, (result, open_clip_result) in enumerate(zip(results, open_clip_results, strict=True)):
            ours, theirs = result["equal", local_loss, True], open_clip_result[local_loss]
            assert_rel_close(ours["loss"], theirs["loss"], LOSS_RTOL[torch.float32], f"rank {rank} {what} loss")
            for key in ("d_image", "d_text"):
                assert_rel_close(ours[key], theirs[key], GRAD_RTOL[torch.float32], f"rank {rank} {what} {key}")
        ours_scale = sum(result["equal", local_loss, True]["d_scale"] for result in results)
        theirs_scale = sum(result[local_loss]["d_scale"] for result in open_clip_results)
        assert_rel_close(ours_scale, theirs_scale, GRAD_RTOL[torch.float32], f"{what} d_scale")


def test_mismatched_inputs_raise_on_every_rank(gloo_group):
    world, _, per_rank = gloo_group
    results = _block(per_rank, "errors:auto")
    odd = world - 1
    others = [rank for rank in range(world) if rank != odd]
    expected = {  # case -> (error type, phrase every rank's message holds)
        "dim": ("ValueError", "feature size D differs across ranks"),
        "dtype": ("TypeError", "dtype differs across ranks"),
        "unpaired": ("ValueError", None),
        "requires_grad": ("ValueError", "requires_grad"),
        "rank_arg": ("ValueError", None),
        "world_size_arg": ("ValueError", f"the process group has {world} ranks"),
    }
    for name, (kind, phrase) in expected.items():
        for rank, result in enumerate(results):
            got_kind, message = result[name]
            assert got_kind == kind, f"{name} on rank {rank}: {got_kind} {message}"
            assert phrase is None or phrase in message, f"{name} on rank {rank}: {message}"
            assert result[name, "group_ok"], f"{name}: process group out of step on rank {rank}"
    assert "each rank needs paired" in results[odd]["unpaired"][1]
    for rank in others:
        assert f"invalid input on rank(s) [{odd}]" in results[rank]["unpaired"][1]
    for rank in range(1, world):
        assert f"rank=0 was given but this process is rank {rank}" in results[rank]["rank_arg"][1]
    assert f"invalid input on rank(s) {list(range(1, world))}" in results[0]["rank_arg"][1]
    assert all(result["valid_after_errors"] for result in results)


def test_no_local_times_global_memory(gloo_group):
    """Per-rank peak RSS growth of a step stays far below one N_local x N fp32 buffer (what open_clip holds
    twice), at N = 4096, D = 8 where the algorithm's own O(N * D) state is 128 KiB."""
    world, _, per_rank = gloo_group
    results = {(rank, impl): result[impl] for rank, result in enumerate(_block(per_rank, "memory:auto"))
               for impl in IMPLS}
    for (rank, impl), result in results.items():
        if result["peak_bytes"] is None:
            pytest.skip(f"no peak-RSS probe on this platform ({result['method']})")
        quadratic = result["n_local"] * MEMORY_N * 4
        assert result["peak_bytes"] < quadratic / 4, (
            f"rank {rank} {impl}: peak RSS growth {result['peak_bytes'] / 2**20:.1f} MiB vs one N_local x N buffer "
            f"{quadratic / 2**20:.1f} MiB")


def test_without_process_group_names_group():
    from mmcl_fast import distributed as mdist
    with pytest.raises(ValueError, match="group: torch.distributed is not initiali"):
        mdist.clip_loss(torch.randn(2, 3), torch.randn(2, 3), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_nccl_world_size_one_matches_reference(backend, tmp_path):
    cases = {f"unequal-{dtype}": _make_case((7,), dtype, with_bias=True) for dtype in DTYPES}
    (result,) = _run_group(1, tmp_path, cases, {"blocks": [f"function:{backend}"], "device": "cuda",
                                                "dist_backend": "nccl"})
    results = _block([result], f"function:{backend}")
    for name, case in cases.items():
        for local_loss in (False, True):
            for impl in IMPLS:
                _check_against_reference(case, [results[0][name, local_loss, impl]], local_loss)
