"""mmcl_fast.distributed at scale: per-rank memory independent of the world size, exactness at W = 2, 3, 4 and 8,
labels and label smoothing across ranks, fp32 gradient exchange for bf16 features, and configuration that differs
across ranks raising everywhere (no hang).

One real gloo group per world size runs every scenario of that size (tests/gloo.py); the parent writes the global
inputs, each rank takes its (unequal) slice, runs the loss and ``(loss / W).backward()`` as DDP would, and sends
back its loss and gradients. Every check is against a float64 single-process reference on the concatenated batch,
on the same rounded inputs: mean_r loss_r == L, each rank's feature gradients == dL/d(its rows), logit_scale /
logit_bias gradients summed over ranks == dL/ds, dL/db.
"""
from __future__ import annotations

import os
import time
import traceback

import pytest
import torch
import torch.nn.functional as F

from gloo import run_rank, spawn_ranks
from test_siglip_distributed import _reference as siglip_reference
from tolerances import GRAD_RTOL, LOSS_RTOL, assert_rel_close

DIM = 12
# per world size: unequal local batches (a rank with a single row where W allows)
SIZES = {2: (5, 3), 3: (4, 1, 6), 4: (3, 5, 1, 4), 8: (3, 2, 4, 1, 3, 2, 5, 3)}
# captions per rank for the labelled (unpaired) case: some ranks hold two captions per image
TEXT_SIZES = {2: (7, 3), 3: (4, 2, 9), 4: (3, 8, 1, 6)}
CLIP_IMPLS = ("ring", "gather")
SIGLIP_IMPLS = ("bidir", "shift", "reduce", "gather")
# the acceptance memory probe: N_local = 2048, D = 1024, fp32 (U = N_local * D * 4 bytes)
MEMORY_N, MEMORY_DIM = 2048, 1024
MEMORY_CASES = (("clip", "ring"), ("siglip", "bidir"), ("siglip", "shift"), ("siglip", "reduce"))
MISMATCH_DEADLINE_S = 30.0
# bf16 features at W = 8: the feature gradients are the float64 gradients rounded once to bf16 (the W partials are
# summed in fp32): element-wise within half a bf16 ulp (+ fp32 noise), and within 2e-3 relative in norm. (A max-norm
# bound of 2e-3 cannot hold for any bf16 output: one rounding alone is up to 2^-8 = 3.9e-3 of an element.)
BF16_NORM_RTOL = 2e-3
FP32_NOISE = 1e-5


# ---------------------------------------------------------------------------------------------
# inputs and float64 references
# ---------------------------------------------------------------------------------------------

def _features(n: int, generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, DIM, dtype=torch.float64, generator=generator), dim=1)


def _inputs(world: int) -> dict:
    gen = torch.Generator().manual_seed(1000 + world)
    n = sum(SIZES[world])
    data = {"image": _features(n, gen), "text": _features(n, gen), "scale": 20.0, "bias": -3.0}
    if world in TEXT_SIZES:
        m = sum(TEXT_SIZES[world])
        data["labelled_text"] = _features(m, gen)
        # each caption's image (global), and each image's caption: one of the captions that point at it (or any)
        data["text_labels"] = torch.randint(0, n, (m,), generator=gen)
        image_labels = torch.randint(0, m, (n,), generator=gen)
        for j in range(m):
            image_labels[data["text_labels"][j]] = j
        data["image_labels"] = image_labels
    return data


def _rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _clip_reference(image, text, scale, bias, image_labels=None, text_labels=None, smoothing=0.0):
    image, text = image.double().clone().requires_grad_(), text.double().clone().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    logits = s * image @ text.T + b
    il = torch.arange(image.shape[0]) if image_labels is None else image_labels
    tl = torch.arange(text.shape[0]) if text_labels is None else text_labels
    loss = 0.5 * (F.cross_entropy(logits, il, label_smoothing=smoothing)
                  + F.cross_entropy(logits.T, tl, label_smoothing=smoothing))
    loss.backward()
    with torch.no_grad():
        positives = (image.double() * text.double()[il]).sum(1).abs().mean().item()
    return {"loss": loss.detach(), "d_image": image.grad, "d_text": text.grad, "d_scale": s.grad, "d_bias": b.grad,
            "floors": (positives, 1.0)}


def _siglip_reference(image, text, scale, bias):
    loss, d_image, d_text, d_scale, d_bias, floors = siglip_reference(image.double(), text.double(), scale, bias)
    return {"loss": loss, "d_image": d_image, "d_text": d_text, "d_scale": d_scale, "d_bias": d_bias,
            "floors": floors}


def _check(ref: dict, per_rank: list, image_sizes, text_sizes, dtype, what: str, grad_rtol=None) -> None:
    world = len(per_rank)
    loss_rtol, grad_rtol = LOSS_RTOL[dtype], grad_rtol or GRAD_RTOL[dtype]
    for rank, result in enumerate(per_rank):
        assert "error" not in result, f"{what}: rank {rank} raised:\n{result['error']}"
    mean_loss = sum(result["loss"].double() for result in per_rank) / world
    assert_rel_close(mean_loss, ref["loss"], loss_rtol, f"{what}: mean over ranks of loss_r")
    for rank, result in enumerate(per_rank):
        assert result["d_image"].dtype == dtype and result["d_text"].dtype == dtype, what
        assert_rel_close(result["d_image"], ref["d_image"][_rows(image_sizes, rank)], grad_rtol,
                         f"{what}: rank {rank} image gradients")
        assert_rel_close(result["d_text"], ref["d_text"][_rows(text_sizes, rank)], grad_rtol,
                         f"{what}: rank {rank} text gradients")
    scale_floor, bias_floor = ref["floors"]
    assert_rel_close(sum(r["d_scale"].double() for r in per_rank), ref["d_scale"], grad_rtol,
                     f"{what}: summed logit_scale gradient", floor=scale_floor)
    assert_rel_close(sum(r["d_bias"].double() for r in per_rank), ref["d_bias"], grad_rtol,
                     f"{what}: summed logit_bias gradient", floor=bias_floor)


def _every_mode(data: dict, results: list, dtype, sizes, label: str):
    """Check every (loss, dist_impl, accumulator policy) result of `_scenario_exact` against float64; yields
    (what, reference, per-rank results) for further checks."""
    image, text = data["image"].to(dtype), data["text"].to(dtype)
    refs = {"clip": _clip_reference(image, text, data["scale"], data["bias"]),
            "siglip": _siglip_reference(image, text, data["scale"], data["bias"])}
    for kind, impls in (("clip", CLIP_IMPLS), ("siglip", SIGLIP_IMPLS)):
        for impl in impls:
            for overlap in (False, True):
                per = [r[kind, impl, str(dtype), overlap] for r in results]
                what = f"{label} {kind} {impl} {dtype} overlap={overlap}"
                _check(refs[kind], per, sizes, sizes, dtype, what)
                yield what, refs[kind], per


# ---------------------------------------------------------------------------------------------
# what each rank runs
# ---------------------------------------------------------------------------------------------

def _run(loss_fn, image, text, scale, bias, world) -> dict:
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    param_dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=param_dtype, device=image.device, requires_grad=True)
    b = torch.tensor(bias, dtype=param_dtype, device=image.device, requires_grad=True)
    try:
        loss = loss_fn(image, text, s, b)
        (loss / world).backward()
    except Exception:
        return {"error": traceback.format_exc()}
    return {key: value.detach().cpu() for key, value in (("loss", loss), ("d_image", image.grad),
                                                          ("d_text", text.grad), ("d_scale", s.grad),
                                                          ("d_bias", b.grad))}


def _scenario_exact(rank, world, data, dtypes=(torch.float32, torch.float64), device="cpu") -> dict:
    from mmcl_fast import distributed as mdist
    from mmcl_fast.distributed import _transport
    out = {}
    rows = _rows(SIZES[world], rank)
    policy = dict(_transport.OVERLAP_ACCUMULATOR)
    for dtype in dtypes:
        image, text = data["image"][rows].to(device, dtype), data["text"][rows].to(device, dtype)
        for overlap in (False, True):  # the CPU policy (accumulator received, then added in place) and the GPU one
            _transport.OVERLAP_ACCUMULATOR[torch.device(device).type] = overlap
            for impl in CLIP_IMPLS:
                out["clip", impl, str(dtype), overlap] = _run(
                    lambda x, y, s, b, impl=impl: mdist.clip_loss(x, y, s, b, local_loss=True, dist_impl=impl),
                    image, text, data["scale"], data["bias"], world)
            for impl in SIGLIP_IMPLS:
                out["siglip", impl, str(dtype), overlap] = _run(
                    lambda x, y, s, b, impl=impl: mdist.siglip_loss(x, y, s, b, dist_impl=impl),
                    image, text, data["scale"], data["bias"], world)
    _transport.OVERLAP_ACCUMULATOR.update(policy)
    return out


def _scenario_labels(rank, world, data) -> dict:
    """Unpaired local batches with global labels, and label smoothing, fp32."""
    from mmcl_fast import distributed as mdist
    out = {}
    image_rows, text_rows = _rows(SIZES[world], rank), _rows(TEXT_SIZES[world], rank)
    image = data["image"][image_rows].float()
    text = data["labelled_text"][text_rows].float()
    image_labels, text_labels = data["image_labels"][image_rows], data["text_labels"][text_rows]
    for impl in CLIP_IMPLS:
        for smoothing in (0.0, 0.1):
            out["labels", impl, smoothing] = _run(
                lambda x, y, s, b, impl=impl, smoothing=smoothing: mdist.clip_loss(
                    x, y, s, b, image_labels=image_labels, text_labels=text_labels, label_smoothing=smoothing,
                    local_loss=True, dist_impl=impl),
                image, text, data["scale"], data["bias"], world)
        # smoothing with the default (diagonal) labels on paired batches
        rows = _rows(SIZES[world], rank)
        out["smoothing", impl] = _run(
            lambda x, y, s, b, impl=impl: mdist.clip_loss(x, y, s, b, label_smoothing=0.2, dist_impl=impl),
            data["image"][rows].float(), data["text"][rows].float(), data["scale"], data["bias"], world)
    return out


def _scenario_strided(rank, world, data) -> dict:
    """Features that are views with a row stride wider than D (slices of wider leaves, as a projection head's output
    split in two would be): the blocks that travel between ranks are made contiguous first."""
    from mmcl_fast import distributed as mdist
    rows = _rows(SIZES[world], rank)
    image, text = data["image"][rows].float(), data["text"][rows].float()
    out = {}
    for kind, impls in (("clip", CLIP_IMPLS), ("siglip", SIGLIP_IMPLS)):
        for impl in impls:
            wide_image = torch.cat([image, torch.zeros_like(image)], 1).requires_grad_()
            wide_text = torch.cat([torch.zeros_like(text), text], 1).requires_grad_()
            x, y = wide_image[:, :DIM], wide_text[:, DIM:]  # row stride 2 D, unit feature stride
            s = torch.tensor(data["scale"], requires_grad=True)
            b = torch.tensor(data["bias"], requires_grad=True)
            try:
                if kind == "clip":
                    loss = mdist.clip_loss(x, y, s, b, local_loss=True, dist_impl=impl)
                else:
                    loss = mdist.siglip_loss(x, y, s, b, dist_impl=impl)
                (loss / world).backward()
            except Exception:
                out[kind, impl] = {"error": traceback.format_exc()}
                continue
            out[kind, impl] = {"loss": loss.detach(), "d_image": wide_image.grad[:, :DIM],
                               "d_text": wide_text.grad[:, DIM:], "d_scale": s.grad, "d_bias": b.grad}
    return out


def _scenario_mismatch(rank, world, data) -> dict:
    """One rank passes a different configuration: every rank must raise, quickly, and the group stay usable."""
    import torch.distributed as dist

    from mmcl_fast import ClipLoss, SigLipLoss
    from mmcl_fast import distributed as mdist
    odd = world - 1
    x, y = data["image"][:4].float(), data["text"][:4].float()
    calls = {
        "local_loss": lambda: mdist.clip_loss(x, y, 10.0, local_loss=rank == odd),
        "clip_dist_impl": lambda: mdist.clip_loss(x, y, 10.0, dist_impl="gather" if rank == odd else "ring"),
        "siglip_dist_impl": lambda: mdist.siglip_loss(x, y, 10.0, -1.0,
                                                      dist_impl="shift" if rank == odd else "bidir"),
        "backend": lambda: mdist.clip_loss(x, y, 10.0, backend="reference" if rank == odd else "auto"),
        "bad_backend": lambda: mdist.clip_loss(x, y, 10.0, backend="nonsense" if rank == odd else "auto"),
        "logit_scale": lambda: mdist.clip_loss(x, y, torch.tensor(10.0 + (rank == odd))),
        "logit_bias": lambda: SigLipLoss(rank=rank, world_size=world)(x, y, torch.tensor(10.0),
                                                                       torch.tensor(-1.0 - (rank == odd))),
        "smoothing": lambda: mdist.clip_loss(x, y, 10.0, label_smoothing=0.1 * (rank == odd)),
        "labels_on_one_rank": lambda: mdist.clip_loss(
            x, y, 10.0, image_labels=torch.arange(4) + 4 * rank if rank == odd else None),
        "module_local_loss": lambda: ClipLoss(local_loss=rank == odd, rank=rank, world_size=world)(x, y, 10.0),
    }
    out = {}
    for name, call in calls.items():
        start = time.monotonic()
        try:
            call()
            out[name] = ("no error", "", time.monotonic() - start)
        except (TypeError, ValueError) as err:
            out[name] = (type(err).__name__, str(err), time.monotonic() - start)
        token = torch.ones(1)
        dist.all_reduce(token)  # every rank left the failed call at the same collective boundary
        out[name, "group_ok"] = float(token) == world
    # the upstream gradient differs across ranks: SigLIP's forward-computed text gradients would be wrong
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = mdist.siglip_loss(xr, yr, 10.0, -1.0)
    try:
        (loss * (1.0 + rank)).backward()
        out["upstream"] = ("no error", "")
    except RuntimeError as err:
        out["upstream"] = ("RuntimeError", str(err))
    return out


def _scenario_equal_batches(rank, world, data) -> dict:
    """equal_batches=True: the metadata exchange runs on the first call of a shape only, and the loss stays exact."""
    from mmcl_fast import distributed as mdist
    from mmcl_fast.distributed import _checks
    exchanges = []
    original = _checks.all_gather_into

    def counting(*args, **kwargs):
        exchanges.append(1)
        return original(*args, **kwargs)

    _checks.all_gather_into = counting
    try:
        n = 4
        image = data["image"][rank * n:(rank + 1) * n].float()
        text = data["text"][rank * n:(rank + 1) * n].float()
        results = [_run(lambda x, y, s, b: mdist.clip_loss(x, y, s, b, local_loss=True, equal_batches=True),
                        image, text, data["scale"], data["bias"], world) for _ in range(3)]
        return {"exchanges": len(exchanges), "results": results}
    finally:
        _checks.all_gather_into = original


def _scenario_memory(rank, world, data) -> dict:
    """Peak RSS growth of one forward + backward at N_local = MEMORY_N, D = MEMORY_DIM, fp32."""
    import torch.distributed as dist

    from mmcl_fast import distributed as mdist
    from mmcl_fast.bench.memory import RssPeak
    out = {}
    for kind, impl in MEMORY_CASES:
        def loss_fn(x, y, s, b, kind=kind, impl=impl):
            if kind == "clip":
                return mdist.clip_loss(x, y, s, b, dist_impl=impl)
            return mdist.siglip_loss(x, y, s, b, dist_impl=impl)
        scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
        warm = [F.normalize(torch.randn(8, MEMORY_DIM), dim=1).requires_grad_() for _ in range(2)]
        loss_fn(*warm, scale, bias).backward()  # thread pools, kernel dispatch, communication buffers
        image, text = (F.normalize(torch.randn(MEMORY_N, MEMORY_DIM), dim=1).requires_grad_() for _ in range(2))
        dist.barrier()
        with RssPeak() as probe:
            (loss_fn(image, text, scale, bias) / world).backward()
        out[kind, impl] = {"peak_bytes": probe.peak_bytes, "method": probe.method}
        del image, text
    return out


def _scenario_cuda(rank, world, data) -> dict:
    """NCCL, one GPU per rank: every mode exact (fp32, bf16), and with equal_batches=True the steady state runs with
    torch.cuda.set_sync_debug_mode("error"): no host synchronisation anywhere in forward or backward."""
    from mmcl_fast import distributed as mdist
    out = {"exact": _scenario_exact(rank, world, data, dtypes=(torch.float32, torch.bfloat16), device="cuda")}
    n = 4
    image = data["image"][rank * n:(rank + 1) * n].float().cuda()
    text = data["text"][rank * n:(rank + 1) * n].float().cuda()
    calls = {"clip": lambda x, y, s, b: mdist.clip_loss(x, y, s, b, equal_batches=True),
             "siglip": lambda x, y, s, b: mdist.siglip_loss(x, y, s, b, equal_batches=True)}
    for name, call in calls.items():
        first = _run(call, image, text, data["scale"], data["bias"], world)  # the one checking exchange
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out["nosync", name] = _run(call, image, text, data["scale"], data["bias"], world)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        out["first", name] = first
    return out


_SCENARIOS = {"exact": _scenario_exact, "cuda": _scenario_cuda, "strided": _scenario_strided, "labels": _scenario_labels, "mismatch": _scenario_mismatch,
              "equal_batches": _scenario_equal_batches, "memory": _scenario_memory,
              "bf16": lambda rank, world, data: _scenario_exact(rank, world, data, dtypes=(torch.bfloat16,))}


def _worker(rank: int, world: int, work_dir: str, blocks: list, backend: str = "gloo") -> None:
    def body():
        data = torch.load(os.path.join(work_dir, "inputs.pt"))
        results = {}
        for block in blocks:  # a block that raises records its traceback; the next one still runs
            try:
                results[block] = _SCENARIOS[block](rank, world, data)
            except Exception:
                results[block] = {"error": traceback.format_exc()}
        return results
    run_rank(rank, world, work_dir, body, backend=backend)


_BLOCKS = {2: ["exact", "labels", "mismatch", "equal_batches", "memory"], 3: ["exact", "labels", "strided"],
           4: ["exact", "labels", "mismatch", "memory"], 8: ["bf16"]}
_GROUPS: dict = {}


def _group(world: int, tmp_path_factory):
    if world not in _GROUPS:
        work_dir = tmp_path_factory.mktemp(f"dist_scale_w{world}")
        data = _inputs(world)
        torch.save(data, work_dir / "inputs.pt")
        per_rank = spawn_ranks(_worker, world, work_dir, (_BLOCKS[world],), timeout=600)
        _GROUPS[world] = (data, per_rank)
    return _GROUPS[world]


def _block(per_rank: list, block: str) -> list:
    failed = {rank: result[block]["error"] for rank, result in enumerate(per_rank) if "error" in result[block]}
    if failed:
        pytest.fail(f"{block} raised:\n" + "\n".join(f"--- rank {r}\n{e}" for r, e in failed.items()))
    return [result[block] for result in per_rank]


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_every_mode_matches_single_process_reference(world, dtype, tmp_path_factory):
    """CLIP ring / gather and SigLIP bidir / shift / reduce / gather, unequal local batches, loss, feature, scale and
    bias gradients (fp32 1e-5, fp64 1e-10), both accumulator policies of the ring."""
    data, per_rank = _group(world, tmp_path_factory)
    results = _block(per_rank, "exact")
    for what, _, _ in _every_mode(data, results, dtype, SIZES[world], f"W={world}"):
        pass


@pytest.mark.parametrize("world", [2, 3, 4])
def test_labels_and_label_smoothing_across_ranks(world, tmp_path_factory):
    """Global labels with unpaired local batches (some ranks hold two captions per image), with and without label
    smoothing, and smoothing on the default diagonal labels: equal to cross_entropy on the concatenated batch."""
    data, per_rank = _group(world, tmp_path_factory)
    results = _block(per_rank, "labels")
    for impl in CLIP_IMPLS:
        for smoothing in (0.0, 0.1):
            ref = _clip_reference(data["image"].float(), data["labelled_text"].float(), data["scale"], data["bias"],
                                  data["image_labels"], data["text_labels"], smoothing)
            _check(ref, [r["labels", impl, smoothing] for r in results], SIZES[world], TEXT_SIZES[world],
                   torch.float32, f"labels {impl} smoothing={smoothing} W={world}")
        ref = _clip_reference(data["image"].float(), data["text"].float(), data["scale"], data["bias"],
                              smoothing=0.2)
        per = [r["smoothing", impl] for r in results]
        for result in per:  # local_loss=False: every rank reports the global loss
            assert "error" not in result, result.get("error")
            assert_rel_close(result["loss"], ref["loss"], LOSS_RTOL[torch.float32], "global loss on every rank")
        _check(ref, per, SIZES[world], SIZES[world], torch.float32, f"diagonal smoothing {impl} W={world}")


def test_bf16_features_at_eight_ranks(tmp_path_factory):
    """8 gloo ranks, bf16 features: every mode's feature gradients are the float64 gradients (on the same rounded
    inputs) rounded once to bf16, within 2e-3 in norm: the text gradients are W partials summed in fp32 and rounded
    once at their owner."""
    data, per_rank = _group(8, tmp_path_factory)
    results = _block(per_rank, "bf16")
    for what, ref, per in _every_mode(data, results, torch.bfloat16, SIZES[8], "W=8"):
        for key in ("d_image", "d_text"):
            actual = torch.cat([result[key] for result in per]).double()
            expected = ref[key]
            norm_err = ((actual - expected).norm() / expected.norm()).item()
            assert norm_err <= BF16_NORM_RTOL, f"{what} {key}: norm-wise relative error {norm_err:.2e}"
            # half an ulp of bf16 at each element (8 significant bits), plus fp32 noise
            half_ulp = torch.ldexp(torch.ones_like(expected), torch.frexp(expected).exponent - 9)
            excess = (actual - expected).abs() - half_ulp - FP32_NOISE * expected.abs().max()
            assert excess.max() <= 0, f"{what} {key}: not the float64 gradient rounded once to bf16"


@pytest.mark.parametrize("world", [2, 4])
def test_mismatched_configuration_raises_on_every_rank(world, tmp_path_factory):
    _, per_rank = _group(world, tmp_path_factory)
    results = _block(per_rank, "mismatch")
    odd = world - 1
    expected = {  # case -> phrase every rank's message holds (None: the odd rank's own error, others "invalid")
        "local_loss": "local_loss differs across ranks",
        "clip_dist_impl": "dist_impl differs across ranks",
        "siglip_dist_impl": "dist_impl differs across ranks",
        "backend": "resolved backend differs across ranks",
        "bad_backend": None,
        "logit_scale": "logit_scale differs across ranks",
        "logit_bias": "logit_bias differs across ranks",
        "smoothing": "label_smoothing differs across ranks",
        "labels_on_one_rank": "which labels are given differs across ranks",
        "module_local_loss": "local_loss differs across ranks",
    }
    for name, phrase in expected.items():
        for rank, result in enumerate(results):
            kind, message, seconds = result[name]
            assert kind in ("ValueError", "TypeError"), f"{name} on rank {rank}: {kind} {message}"
            assert seconds < MISMATCH_DEADLINE_S, f"{name} on rank {rank} took {seconds:.1f} s"
            if phrase is not None:
                assert phrase in message, f"{name} on rank {rank}: {message}"
            assert result[name, "group_ok"], f"{name}: process group out of step on rank {rank}"
    assert "backend must be one of" in results[odd]["bad_backend"][1]
    for rank in range(world - 1):
        assert f"invalid input on rank(s) [{odd}]" in results[rank]["bad_backend"][1]
    for rank, result in enumerate(results):
        kind, message = result["upstream"]
        assert kind == "RuntimeError" and "different upstream gradients" in message, f"rank {rank}: {message}"


def test_non_contiguous_features(tmp_path_factory):
    """Views with a wide row stride, and column-major texts, in every mode at W = 3 (fp32, against float64)."""
    data, per_rank = _group(3, tmp_path_factory)
    results = _block(per_rank, "strided")
    image, text = data["image"].float(), data["text"].float()
    refs = {"clip": _clip_reference(image, text, data["scale"], data["bias"]),
            "siglip": _siglip_reference(image, text, data["scale"], data["bias"])}
    for kind, impls in (("clip", CLIP_IMPLS), ("siglip", SIGLIP_IMPLS)):
        for impl in impls:
            _check(refs[kind], [r[kind, impl] for r in results], SIZES[3], SIZES[3], torch.float32,
                   f"strided {kind} {impl}")


def test_equal_batches_exchanges_once(tmp_path_factory):
    data, per_rank = _group(2, tmp_path_factory)
    results = _block(per_rank, "equal_batches")
    for rank, result in enumerate(results):
        assert result["exchanges"] == 1, f"rank {rank}: {result['exchanges']} metadata exchanges in 3 calls"
    n = 4
    ref = _clip_reference(data["image"][:2 * n].float(), data["text"][:2 * n].float(), data["scale"], data["bias"])
    for call in range(3):
        _check(ref, [result["results"][call] for result in results], (n, n), (n, n), torch.float32,
               f"equal_batches call {call}")


def test_per_rank_memory_is_independent_of_world_size(tmp_path_factory):
    """The acceptance bound: with U = N_local * D * 4 bytes (N_local = 2048, D = 1024, fp32), the worst rank's peak
    RSS growth of one forward + backward at W = 4 is <= 1.25x that at W = 2 + 1 U, and <= 8 U, for the CLIP ring
    and the SigLIP bidir, shift and reduce modes (gathering modes grow with W by design)."""
    unit = MEMORY_N * MEMORY_DIM * 4
    peaks = {}
    for world in (2, 4):
        _, per_rank = _group(world, tmp_path_factory)
        results = _block(per_rank, "memory")
        for case in MEMORY_CASES:
            values = [result[case]["peak_bytes"] for result in results]
            if None in values:
                pytest.skip(f"no peak-RSS probe on this platform ({results[0][case]['method']})")
            peaks[world, case] = max(values) / unit
    for case in MEMORY_CASES:
        at_2, at_4 = peaks[2, case], peaks[4, case]
        assert at_4 <= 1.25 * at_2 + 1.0 and at_4 <= 8.0, (
            f"{case}: worst-rank peak growth {at_2:.2f} U at W=2, {at_4:.2f} U at W=4")


@pytest.mark.gpu
def test_nccl_every_mode_and_no_host_sync(tmp_path):
    """One rank per visible GPU (W = 1 on a single-GPU machine): every mode against float64 on NCCL (fp32 and bf16,
    both accumulator policies), and the equal_batches steady state free of host synchronisation."""
    world = torch.cuda.device_count()
    sizes = SIZES.get(world) or tuple(3 + (q % 3) for q in range(world))
    SIZES.setdefault(world, sizes)
    data = _inputs(world) if world in (2, 3, 4, 8) else {
        **_inputs(2), "image": _features(sum(sizes), torch.Generator().manual_seed(5)),
        "text": _features(sum(sizes), torch.Generator().manual_seed(6))}
    torch.save(data, tmp_path / "inputs.pt")
    per_rank = spawn_ranks(_worker, world, tmp_path, (["cuda"], "nccl"), timeout=600)
    results = _block(per_rank, "cuda")
    for dtype in (torch.float32, torch.bfloat16):
        for _ in _every_mode(data, [r["exact"] for r in results], dtype, sizes, "nccl"):
            pass
    n = 4
    ref = {"clip": _clip_reference(data["image"][:world * n].float(), data["text"][:world * n].float(),
                                   data["scale"], data["bias"]),
           "siglip": _siglip_reference(data["image"][:world * n].float(), data["text"][:world * n].float(),
                                       data["scale"], data["bias"])}
    for name in ("clip", "siglip"):
        for phase in ("first", "nosync"):
            _check(ref[name], [r[phase, name] for r in results], (n,) * world, (n,) * world, torch.float32,
                   f"nccl {name} equal_batches {phase}")
