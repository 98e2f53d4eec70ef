"""The `triton` backend against float64 dense references written here with torch (cross_entropy, logsumexp).

CPU / CI: every Triton kernel runs under Triton's interpreter (TRITON_INTERPRET=1) at small, awkward sizes. The
interpreter has to be switched on before triton is imported and must not leak into the other test modules of
the same pytest process, so all interpreter cases run in ONE child process (`tests/interpreter.py`) that
imports this file, computes our losses and gradients with backend="triton" on CPU tensors and sends them back;
the float64 references are computed here, in the parent, on the same (rounded) inputs.

Slow (`--runslow`): every kernel is compiled for sm_90 with triton's bundled ptxas (no GPU needed) and checked
for tensor-core instructions, pipelined loads and zero register spills.

GPU: the `gpu`-marked tests run the compiled kernels in this process at real sizes when CUDA is present
(`pytest tests/test_triton.py` on a CUDA machine).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zlib

import pytest
import torch
import torch.nn.functional as F

from mmcl_fast._problem import Problem

sys.path.insert(0, os.path.dirname(__file__))
from tolerances import GRAD_RTOL, LOSS_RTOL, assert_rel_close  # noqa: E402 (tests/ on sys.path first)
from test_clip import reference_clip  # noqa: E402  (the float64 reference shared with the CPU tests)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------
# the cases run under the interpreter
# ---------------------------------------------------------------------------------------------------------------

def _clip(id, n, m, d, dtype="float32", scale=100.0, bias=None, labels=False, smoothing=0.0, **options):
    """A clip_loss case; options: chunk_mb (staged-G budget), max_splits (forward grid), layout="trap",
    loss_weight (the loss is multiplied by it before backward), padded (features are column slices)."""
    return dict(id=id, kind="clip", n=n, m=m, d=d, dtype=dtype, scale=scale, bias=bias, labels=labels,
                smoothing=smoothing, **options)


CLIP_CASES = [
    _clip("n1-d3", 1, 1, 3),
    _clip("n3-d20", 3, 3, 20, bias=-1.0),
    _clip("n65-d37", 65, 65, 37),
    _clip("n129-d64-bias", 129, 129, 64, bias=-10.0),
    _clip("n65-d64-scale1", 65, 65, 64, scale=1.0),
    _clip("rect-65x129-d20-labels", 65, 129, 20, scale=50.0, bias=-3.0, labels=True),
    _clip("rect-129x33-d37-labels", 129, 33, 37, labels=True),
    _clip("rect-1x7-d3-labels", 1, 7, 3, labels=True),
    _clip("smooth-37x65-d20", 37, 65, 20, scale=10.0, bias=0.7, labels=True, smoothing=0.1),
    _clip("smooth-64-d64", 64, 64, 64, smoothing=0.5),
    # duplicated rows, anti-aligned positives and whole columns ~scale below the largest logit (orthogonal to
    # every image): a fixed shift exp(L - logit_scale) underflows there, an online max does not
    _clip("shift-trap-80-d32", 80, 80, 32, bias=-10.0, layout="trap"),
    # several staged G chunks (tiny budget), including ragged last chunks, and 2 x 2 forward splits, so that a
    # forward program merges several row blocks into its column slot
    _clip("chunks-129x65-d37", 129, 65, 37, labels=True, bias=2.0, chunk_mb=0.004, max_splits=2),
    _clip("chunks-65-d20-smooth", 65, 65, 20, smoothing=0.2, chunk_mb=0.003, max_splits=3),
    # several row chunks but one column chunk (N >> M): each row chunk's dX must land on its own rows;
    # and the mirror image (N << M), at several staged-G budgets, fp32 and bf16 (G staged in fp16: 2-byte chunks)
    _clip("chunks-tall-300x20-d16", 300, 20, 16, labels=True, chunk_mb=0.004),
    _clip("chunks-tall-300x20-d16-mb0.02", 300, 20, 16, labels=True, bias=1.0, chunk_mb=0.02),
    _clip("bf16-chunks-tall-200x24-d32", 200, 24, 32, dtype="bfloat16", labels=True, chunk_mb=0.004),
    _clip("chunks-wide-20x300-d16", 20, 300, 16, labels=True, chunk_mb=0.004),
    _clip("bf16-65-d64", 65, 65, 64, dtype="bfloat16"),
    _clip("bf16-rect-33x70-d20", 33, 70, 20, dtype="bfloat16", scale=30.0, bias=-2.0, labels=True),
    _clip("bf16-chunks-65x40-d37", 65, 40, 37, dtype="bfloat16", labels=True, smoothing=0.1, chunk_mb=0.003),
    _clip("fp16-65-d37", 65, 65, 37, dtype="float16"),
    _clip("fp16-rect-20x50-d64", 20, 50, 64, dtype="float16", scale=14.3, bias=1.0, labels=True, smoothing=0.1),
    # gradients of 1e-7 x the loss: without the power-of-two lift, fp16-staged G would flush to zero
    _clip("fp16-small-grads-40-d32", 40, 40, 32, dtype="float16", scale=20.0, loss_weight=1e-3),
    _clip("bf16-tiny-grads-40-d32", 40, 40, 32, dtype="bfloat16", loss_weight=1e-7),
    # features with a row stride larger than D (a column slice of a wider tensor)
    _clip("row-stride-50x30-d20", 50, 30, 20, labels=True, bias=0.5, padded=True),
]

LSE_CASES = [
    # per-row scale, wide row/column biases (a fixed shift would underflow), random upstream weights
    dict(id="lse-65x33-d20", kind="lse", n=65, m=33, d=20, dtype="float32", need_row=True, need_col=True),
    dict(id="lse-33x65-d37-row", kind="lse", n=33, m=65, d=37, dtype="float32", need_row=True, need_col=False),
    dict(id="lse-40x17-d3-col", kind="lse", n=40, m=17, d=3, dtype="float32", need_row=False, need_col=True,
         max_splits=2),
    dict(id="lse-bf16-50x30-d64", kind="lse", n=50, m=30, d=64, dtype="bfloat16", need_row=True, need_col=True),
]

INFONCE_CASES = [
    dict(id="sq-rowscale-40x40-d16", kind="sqeuclidean", n=40, m=40, d=16, dtype="float32", symmetric=True,
         row_scale=True),
    dict(id="sq-scalar-30x50-d8-oneway", kind="sqeuclidean", n=30, m=50, d=8, dtype="float32",
         symmetric=False, row_scale=False),
]

def _siglip(id, n, m, d, dtype="float32", scale=10.0, bias=-10.0, positives="diagonal", **options):
    """A siglip_loss case; positives: "diagonal", "labels" (per-text image labels) or "pairs" (random pairs);
    options: chunk_mb (staged-G budget), no_grad (forward only)."""
    return dict(id=id, kind="siglip", n=n, m=m, d=d, dtype=dtype, scale=scale, bias=bias, positives=positives,
                **options)


SIGLIP_CASES = [
    _siglip("sig-n1-d3", 1, 1, 3),
    _siglip("sig-n65-d37", 65, 65, 37),
    _siglip("sig-extreme-40-d16", 40, 40, 16, scale=100.0, bias=-20.0),
    _siglip("sig-labels-33x70-d20", 33, 70, 20, positives="labels", bias=-5.0),
    _siglip("sig-pairs-50x45-d8", 50, 45, 8, positives="pairs"),
    _siglip("sig-chunks-129x65-d20", 129, 65, 20, positives="labels", chunk_mb=0.004),
    _siglip("sig-chunks-tall-200x24-d16", 200, 24, 16, positives="pairs", chunk_mb=0.004),
    _siglip("sig-bf16-65-d64", 65, 65, 64, dtype="bfloat16"),
    _siglip("sig-bf16-chunks-65x40-d37", 65, 40, 37, dtype="bfloat16", positives="labels", chunk_mb=0.003),
    _siglip("sig-fp16-rect-20x50-d64", 20, 50, 64, dtype="float16", positives="labels", scale=30.0, bias=2.0),
    _siglip("sig-nograd-70x33-d20", 70, 33, 20, positives="labels", no_grad=True),
]

DETERMINISM_CASE = _clip("determinism-97x80-d33", 97, 80, 33, labels=True, bias=0.5, smoothing=0.1,
                         chunk_mb=0.004)


def _case_generator(case) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(case["id"].encode()))


def _unit(n, d, dtype, gen):
    return F.normalize(torch.randn(n, d, dtype=torch.float64, generator=gen), dim=1).to(dtype)


def make_inputs(case) -> dict:
    """Fresh random inputs per case (seeded by the case id), already rounded to the case's dtype."""
    gen = _case_generator(case)
    dtype = DTYPES[case["dtype"]]
    n, m, d = case["n"], case["m"], case["d"]
    if case["kind"] == "clip" and case.get("layout") == "trap":
        basis, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
        images = basis[:4].repeat(n // 8, 1)
        images = torch.cat([images, -images])
        others = F.normalize(torch.randn(n // 2, d - 4, dtype=torch.float64, generator=gen) @ basis[4:], dim=1)
        return dict(x=images.to(dtype), y=torch.cat([-images[: n // 2], others]).to(dtype))
    if case["kind"] == "clip":
        inputs = dict(x=_unit(n, d, dtype, gen), y=_unit(m, d, dtype, gen))
        if case["labels"]:
            inputs["image_labels"] = torch.randint(0, m, (n,), generator=gen)
            inputs["text_labels"] = torch.randint(0, n, (m,), generator=gen)
        return inputs
    if case["kind"] == "siglip":
        inputs = dict(x=_unit(n, d, dtype, gen), y=_unit(m, d, dtype, gen))
        if case["positives"] == "labels":
            inputs["positives"] = torch.randint(0, n, (m,), generator=gen)
        elif case["positives"] == "pairs":
            inputs["positives"] = torch.stack([torch.randint(0, n, (3 * n,), generator=gen),
                                               torch.randint(0, m, (3 * n,), generator=gen)], 1)
        return inputs
    if case["kind"] == "lse":
        # |L| up to ~150: per-row scale in [0.5, 100] and biases of spread 10 (fp32 logits carry ~|L| 2^-24)
        return dict(x=_unit(n, d, dtype, gen), y=_unit(m, d, dtype, gen),
                    scale=torch.rand(n, generator=gen) * 99.5 + 0.5,
                    row_bias=torch.randn(n, generator=gen) * 10,
                    col_bias=torch.randn(m, generator=gen) * 10,
                    w_row=torch.rand(n, generator=gen) - 0.3,
                    w_col=torch.rand(m, generator=gen) - 0.3)
    inputs = dict(x=(torch.randn(n, d, generator=gen) * 0.4).to(dtype),
                  y=(torch.randn(m, d, generator=gen) * 0.4).to(dtype),
                  scale=(torch.rand(n, generator=gen) * 3 + 0.5) if case["row_scale"] else torch.tensor(1.5),
                  query_labels=torch.randint(0, m, (n,), generator=gen))
    if case["symmetric"]:
        inputs["key_labels"] = torch.randint(0, n, (m,), generator=gen)
    return inputs


# ---------------------------------------------------------------------------------------------------------------
# the child process (TRITON_INTERPRET=1): our side of every case
# ---------------------------------------------------------------------------------------------------------------

def _run_case(case, inputs) -> dict:
    import mmcl_fast
    from mmcl_fast import _ops
    from mmcl_fast.backends.triton import sweep as triton_sweep

    default_splits = triton_sweep._MAX_SPLITS
    if "max_splits" in case:
        triton_sweep._MAX_SPLITS = case["max_splits"]
    if "chunk_mb" in case:
        os.environ["MMCL_FAST_TRITON_CHUNK_MB"] = str(case["chunk_mb"])
    try:
        if case["kind"] == "clip":
            pad = 7 if case.get("padded") else 0
            x_base = F.pad(inputs["x"], (0, pad)).requires_grad_()
            y_base = F.pad(inputs["y"], (0, pad)).requires_grad_()
            x, y = x_base[:, :case["d"]], y_base[:, :case["d"]]
            assert x.stride(0) == case["d"] + pad
            scale = torch.tensor(case["scale"], requires_grad=True)
            bias = None if case["bias"] is None else torch.tensor(case["bias"], requires_grad=True)
            loss = mmcl_fast.clip_loss(x, y, scale, bias, image_labels=inputs.get("image_labels"),
                                       text_labels=inputs.get("text_labels"),
                                       label_smoothing=case["smoothing"], backend="triton")
            (loss * case.get("loss_weight", 1.0)).backward()
            out = dict(loss=loss.detach(), dx=x_base.grad[:, :case["d"]], dy=y_base.grad[:, :case["d"]],
                       dscale=scale.grad)
            if bias is not None:
                out["dbias"] = bias.grad
            return out
        if case["kind"] == "siglip":
            x = inputs["x"].clone().requires_grad_(not case.get("no_grad"))
            y = inputs["y"].clone().requires_grad_(not case.get("no_grad"))
            scale = torch.tensor(case["scale"], requires_grad=not case.get("no_grad"))
            bias = torch.tensor(case["bias"], requires_grad=not case.get("no_grad"))
            loss = mmcl_fast.siglip_loss(x, y, scale, bias, positives=inputs.get("positives"), backend="triton")
            if case.get("no_grad"):
                return dict(loss=loss.detach())
            loss.backward()
            return dict(loss=loss.detach(), dx=x.grad, dy=y.grad, dscale=scale.grad, dbias=bias.grad)
        if case["kind"] == "lse":
            leaves = {k: inputs[k].clone().requires_grad_() for k in ("x", "y", "scale", "row_bias", "col_bias")}
            row_lse, col_lse = _ops.affine_lse(leaves["x"], leaves["y"], leaves["scale"], leaves["row_bias"],
                                               leaves["col_bias"], need_row=case["need_row"],
                                               need_col=case["need_col"], backend="triton")
            total = (inputs["w_row"] * row_lse).sum() if case["need_row"] else 0.0
            total = total + ((inputs["w_col"] * col_lse).sum() if case["need_col"] else 0.0)
            total.backward()
            return dict(row_lse=row_lse.detach(), col_lse=col_lse.detach(),
                        **{"d" + k: v.grad for k, v in leaves.items()})
        x = inputs["x"].clone().requires_grad_()
        y = inputs["y"].clone().requires_grad_()
        scale = inputs["scale"].clone().requires_grad_()
        loss = mmcl_fast.infonce(x, y, scale, query_labels=inputs["query_labels"],
                                 key_labels=inputs.get("key_labels"), similarity="sqeuclidean",
                                 symmetric=case["symmetric"], backend="triton")
        loss.backward()
        return dict(loss=loss.detach(), dx=x.grad, dy=y.grad, dscale=scale.grad)
    finally:
        os.environ.pop("MMCL_FAST_TRITON_CHUNK_MB", None)
        triton_sweep._MAX_SPLITS = default_splits


def _interpreted_case(case, inputs) -> dict:
    """Entry point of the interpreter child (see tests/interpreter.py); the determinism case runs twice."""
    if case["id"] == DETERMINISM_CASE["id"]:
        return {"first": _run_case(case, inputs), "again": _run_case(case, inputs)}
    return _run_case(case, inputs)


# ---------------------------------------------------------------------------------------------------------------
# the parent: one child for every interpreter case, then float64 references per test
# ---------------------------------------------------------------------------------------------------------------

ALL_CASES = CLIP_CASES + LSE_CASES + INFONCE_CASES + SIGLIP_CASES + [DETERMINISM_CASE]


@pytest.fixture(scope="module")
def interpreted():
    """Run every interpreter case in one TRITON_INTERPRET=1 child; returns {case id: outputs}."""
    pytest.importorskip("triton")
    from interpreter import run_interpreted
    return run_interpreted(__file__, "_interpreted_case", [(case, make_inputs(case)) for case in ALL_CASES])


def _ours(interpreted, case) -> dict:
    out = interpreted[case["id"]]
    if "error" in out:
        pytest.fail(f"case {case['id']} raised in the interpreter worker:\n{out['error']}")
    return out


def check_clip(ours: dict, x, y, scale, bias, image_labels, text_labels, smoothing, dtype,
               loss_weight: float = 1.0) -> None:
    """Compare our loss and gradients with the float64 cross_entropy reference on the same rounded inputs."""
    xr = x.detach().to("cpu", torch.float64).requires_grad_()
    yr = y.detach().to("cpu", torch.float64).requires_grad_()
    sr = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    br = None if bias is None else torch.tensor(float(bias), dtype=torch.float64, requires_grad=True)
    il = None if image_labels is None else image_labels.cpu()
    tl = None if text_labels is None else text_labels.cpu()
    ref = reference_clip(xr, yr, sr, br, il, tl, smoothing)
    (ref * loss_weight).backward()
    assert ours["loss"].dtype == torch.float32 and ours["dx"].dtype == dtype and ours["dy"].dtype == dtype
    assert_rel_close(ours["loss"], ref, LOSS_RTOL[dtype], "loss")
    assert_rel_close(ours["dx"], xr.grad, GRAD_RTOL[dtype], "d image_features")
    assert_rel_close(ours["dy"], yr.grad, GRAD_RTOL[dtype], "d text_features")
    # d/d scale = E_softmax[s_ij] - s_positive cancels: measured against the size of the positives' similarities
    rows = torch.arange(xr.shape[0]) if il is None else il
    positives = (xr.detach() * yr.detach()[rows]).sum(1).abs().mean().item()
    assert_rel_close(ours["dscale"], sr.grad, GRAD_RTOL[dtype], "d logit_scale", floor=positives)
    if bias is not None:
        # d/d bias = sum(probabilities) - 1 per row/column: measured against those O(1) terms
        assert_rel_close(ours["dbias"], br.grad, GRAD_RTOL[dtype], "d logit_bias", floor=1.0)


@pytest.mark.parametrize("case", CLIP_CASES, ids=[c["id"] for c in CLIP_CASES])
def test_clip_loss_matches_reference_interpreted(interpreted, case):
    inputs = make_inputs(case)
    check_clip(_ours(interpreted, case), inputs["x"], inputs["y"], case["scale"], case["bias"],
               inputs.get("image_labels"), inputs.get("text_labels"), case["smoothing"], DTYPES[case["dtype"]],
               case.get("loss_weight", 1.0))


@pytest.mark.parametrize("case", SIGLIP_CASES, ids=[c["id"] for c in SIGLIP_CASES])
def test_siglip_loss_matches_reference_interpreted(interpreted, case):
    """The sigmoid epilogue of the shared sweep (one fused forward + backward) against the float64 dense loss."""
    from test_siglip import dense_signs
    inputs = make_inputs(case)
    ours = _ours(interpreted, case)
    dtype = DTYPES[case["dtype"]]
    xr = inputs["x"].double().requires_grad_()
    yr = inputs["y"].double().requires_grad_()
    sr = torch.tensor(case["scale"], dtype=torch.float64, requires_grad=True)
    br = torch.tensor(case["bias"], dtype=torch.float64, requires_grad=True)
    z = dense_signs(case["n"], case["m"], inputs.get("positives"))
    logits = sr * xr @ yr.T + br
    ref = -F.logsigmoid(z * logits).sum() / case["n"]
    assert ours["loss"].dtype == torch.float32
    assert_rel_close(ours["loss"], ref, LOSS_RTOL[dtype], "loss")
    if case.get("no_grad"):
        return
    ref.backward()
    assert ours["dx"].dtype == dtype and ours["dy"].dtype == dtype
    assert_rel_close(ours["dx"], xr.grad, GRAD_RTOL[dtype], "d image_features")
    assert_rel_close(ours["dy"], yr.grad, GRAD_RTOL[dtype], "d text_features")
    with torch.no_grad():  # the scalar gradients sum terms of both signs: measured against their magnitudes
        weights = torch.sigmoid(-z * logits) / case["n"]
        sims = (xr @ yr.T).abs()
    assert_rel_close(ours["dscale"], sr.grad, GRAD_RTOL[dtype], "d logit_scale", floor=(weights * sims).sum().item())
    assert_rel_close(ours["dbias"], br.grad, GRAD_RTOL[dtype], "d logit_bias", floor=weights.sum().item())


@pytest.mark.parametrize("case", LSE_CASES, ids=[c["id"] for c in LSE_CASES])
def test_affine_lse_matches_reference_interpreted(interpreted, case):
    """The primitive with per-row scale, row/column biases and arbitrary upstream weights (any sign of G)."""
    ours = _ours(interpreted, case)
    dtype = DTYPES[case["dtype"]]
    inputs = make_inputs(case)
    leaves = {k: inputs[k].double().requires_grad_() for k in ("x", "y", "scale", "row_bias", "col_bias")}
    logits = (leaves["scale"][:, None] * (leaves["x"] @ leaves["y"].T) + leaves["row_bias"][:, None]
              + leaves["col_bias"][None, :])
    row_lse, col_lse = torch.logsumexp(logits, dim=1), torch.logsumexp(logits, dim=0)
    total = 0.0
    if case["need_row"]:
        assert_rel_close(ours["row_lse"], row_lse, LOSS_RTOL[dtype], "row_lse")
        total = total + (inputs["w_row"].double() * row_lse).sum()
    else:
        assert ours["row_lse"].numel() == 0
    if case["need_col"]:
        assert_rel_close(ours["col_lse"], col_lse, LOSS_RTOL[dtype], "col_lse")
        total = total + (inputs["w_col"].double() * col_lse).sum()
    else:
        assert ours["col_lse"].numel() == 0
    total.backward()
    for name, leaf in leaves.items():
        assert_rel_close(ours["d" + name], leaf.grad, GRAD_RTOL[dtype], "d " + name)


@pytest.mark.parametrize("case", INFONCE_CASES, ids=[c["id"] for c in INFONCE_CASES])
def test_sqeuclidean_infonce_matches_reference_interpreted(interpreted, case):
    ours = _ours(interpreted, case)
    inputs = make_inputs(case)
    x = inputs["x"].double().requires_grad_()
    y = inputs["y"].double().requires_grad_()
    scale = inputs["scale"].double().requires_grad_()
    logits = -(scale[:, None] if scale.dim() else scale) * torch.cdist(x, y) ** 2
    loss = F.cross_entropy(logits, inputs["query_labels"])
    if case["symmetric"]:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, inputs["key_labels"]))
    loss.backward()
    assert_rel_close(ours["loss"], loss, LOSS_RTOL[torch.float32], "loss")
    assert_rel_close(ours["dx"], x.grad, GRAD_RTOL[torch.float32], "d query")
    assert_rel_close(ours["dy"], y.grad, GRAD_RTOL[torch.float32], "d keys")
    assert_rel_close(ours["dscale"], scale.grad, GRAD_RTOL[torch.float32], "d scale")


def test_deterministic_bit_identical_interpreted(interpreted):
    runs = _ours(interpreted, DETERMINISM_CASE)
    first, again = runs["first"], runs["again"]
    assert set(first) == set(again)
    for name in first:
        assert torch.equal(first[name], again[name]), name
    inputs = make_inputs(DETERMINISM_CASE)
    check_clip(first, inputs["x"], inputs["y"], DETERMINISM_CASE["scale"], DETERMINISM_CASE["bias"],
               inputs["image_labels"], inputs["text_labels"], DETERMINISM_CASE["smoothing"], torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# input checks (no kernel runs: they fail before any launch)
# ---------------------------------------------------------------------------------------------------------------

def _problem(n=4, m=5, d=3, dtype=torch.float32):
    return (torch.randn(n, d, dtype=dtype), torch.randn(m, d, dtype=dtype), torch.ones(n), torch.zeros(n),
            torch.zeros(m))


@pytest.mark.parametrize("mutate,error,match", [
    (lambda p: (p[0].double(), p[1].double()) + p[2:], TypeError, "float32/bfloat16/float16 x"),
    (lambda p: (p[0], p[1].half()) + p[2:], TypeError, "x and y must have the same dtype"),
    (lambda p: (p[0], p[1][:, :2]) + p[2:], ValueError, "same feature size"),
    (lambda p: (p[0][0], p[1]) + p[2:], ValueError, "x must be a 2-D"),
    (lambda p: (p[0].T.contiguous().T, p[1]) + p[2:], ValueError, "x must have unit stride"),
    (lambda p: p[:2] + (torch.ones(3),) + p[3:], ValueError, r"scale must have shape \(4,\)"),
    (lambda p: p[:3] + (torch.zeros(4, dtype=torch.float64), p[4]), TypeError, "row_bias must be float32"),
    (lambda p: p[:4] + (torch.zeros(4),), ValueError, r"col_bias must have shape \(5,\)"),
    (lambda p: p, ValueError, "needs CUDA tensors"),
])
def test_bad_input_is_named(mutate, error, match):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("checks the non-interpreter error path")
    pytest.importorskip("triton")
    from mmcl_fast.backends import triton as triton_backend
    with pytest.raises(error, match=match):
        triton_backend.lse_fwd(Problem(*mutate(_problem())), True, True)


# ---------------------------------------------------------------------------------------------------------------
# Hopper code generation, checked without a GPU: triton compiles for sm_90 with its bundled ptxas
# ---------------------------------------------------------------------------------------------------------------

_FEATURE_ARGS = dict(x_ptr=None, y_ptr=None, scale_ptr="*fp32", row_bias_ptr="*fp32", col_bias_ptr="*fp32")


def _compile_for_hopper(kernel, types: dict, constexprs: dict, config):
    """Compile an autotuned kernel's config for sm_90 (16-byte aligned pointers and sizes, as at run time)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn
    constexprs = {**constexprs, **config.kwargs}
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    aligned = [name for name in fn.arg_names if name not in constexprs and (
        types[name].startswith("*") or name in ("D", "N", "M", "stride_x", "stride_y", "CHUNK_N", "CHUNK_M",
                                                "G_STRIDE", "K", "ROWS", "COLS", "stride_bk", "stride_or"))]
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                       attrs={(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def _spilled_bytes(compiled) -> int:
    """Stack (register spill) bytes of the compiled cubin, from the cuobjdump bundled with triton."""
    import re
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("triton's bundled cuobjdump is missing")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
    match = re.search(r"STACK:(\d+)", usage)
    assert match, usage
    return int(match.group(1))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "tf32x3"])
def test_kernels_compile_for_hopper_without_spills(dtype):
    """EVERY autotune config of every kernel for this feature type compiles for sm_90, on tensor cores (wgmma) for
    16-bit features, pipelined (cp.async), and without register spills. Catches compile-only errors the
    interpreter cannot see (loop-carried types, layouts) on a machine without a GPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs the compiler, not the interpreter")
    pytest.importorskip("triton")
    from mmcl_fast.backends.triton import matmul, sweep
    half = dtype in ("bf16", "fp16")
    feature = "fp32" if dtype == "tf32x3" else dtype
    g_dtype = "fp16" if half else "fp32"
    precision = "tf32" if half else ("tf32x3" if dtype == "tf32x3" else "ieee")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    forward_shapes = sweep._FORWARD_SHAPES[sweep.shape_group(torch_dtype, precision, sweep._FORWARD_SHAPES)]
    grad_shapes = sweep._GRAD_SHAPES[sweep.shape_group(torch_dtype, precision, sweep._GRAD_SHAPES)]
    sigmoid_shapes = sweep._SIGMOID_SHAPES[sweep.shape_group(torch_dtype, precision, sweep._SIGMOID_SHAPES)]
    gemm_shapes = matmul._HALF_SHAPES if half else (matmul._TF32_SHAPES if dtype == "tf32x3" else matmul._FP32_SHAPES)
    key = lambda c, a, b: (c.kwargs[a], c.kwargs[b], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)  # noqa: E731
    tile_configs = {key(c, "BLOCK_N", "BLOCK_M"): c for c in sweep._tile_configs()}
    gemm_configs = [c for c in matmul._gemm_configs() if key(c, "BLOCK_R", "BLOCK_C") in gemm_shapes]
    assert set(forward_shapes) | set(grad_shapes) | set(sigmoid_shapes) <= set(tile_configs)
    assert len(gemm_configs) == len(gemm_shapes)
    features = dict(_FEATURE_ARGS, x_ptr="*" + feature, y_ptr="*" + feature)
    ints = lambda *names: {name: "i32" for name in names}  # noqa: E731
    forward_types = dict(features, row_max_ptr="*fp32", row_sum_ptr="*fp32", col_max_ptr="*fp32",
                         col_sum_ptr="*fp32", **ints("N", "M", "D", "stride_x", "stride_y", "N_CLASS", "M_CLASS"))
    grad_types = dict(features, row_lse_ptr="*fp32", col_lse_ptr="*fp32", grad_row_ptr="*fp32",
                      grad_col_ptr="*fp32", row_const_ptr="*fp32", col_const_ptr="*fp32", row_target_ptr="*i64",
                      row_target_grad_ptr="*fp32", col_target_ptr="*i64", col_target_grad_ptr="*fp32",
                      pos_ptr="*i64", POS_WIDTH="i32", g_ptr="*" + g_dtype, row_part_ptr="*fp32", col_part_ptr="*fp32", g_scale_ptr="*fp32",
                      **ints("row0", "col0", "n_rows", "n_cols", "D", "stride_x", "stride_y", "CHUNK_N", "CHUNK_M",
                             "G_STRIDE", "row_slots", "col_slots", "N_CLASS", "M_CLASS"))
    gemm_types = dict(a_ptr="*" + g_dtype, b_ptr="*" + g_dtype, out_ptr="*fp32", alpha_ptr="*fp32",
                      **ints("ROWS", "COLS", "K", "stride_ar", "stride_ak", "stride_bk", "stride_bc", "stride_or",
                             "R_CLASS", "C_CLASS", "K_CLASS", "A_K_CONTIGUOUS"))
    builds = {}
    for shape in forward_shapes:
        builds[f"forward {shape}"] = _compile_for_hopper(sweep._lse_partials_kernel, forward_types, dict(
            NEED_ROW=True, NEED_COL=True, UPCAST=False, INPUT_PRECISION=precision), tile_configs[shape])
    for shape in grad_shapes:
        builds[f"gradient tiles {shape}"] = _compile_for_hopper(sweep._grad_tile_kernel, grad_types, dict(
            EPILOGUE=0, GRADS=True, HAS_ROW=True, HAS_COL=True, HAS_ROW_CONST=True, HAS_COL_CONST=True,
            HAS_ROW_TARGET=True, HAS_COL_TARGET=True, UPCAST=False, INPUT_PRECISION=precision, SLOT=sweep._SLOT),
            tile_configs[shape])
    for shape in sigmoid_shapes:
        builds[f"sigmoid tiles {shape}"] = _compile_for_hopper(sweep._grad_tile_kernel, grad_types, dict(
            EPILOGUE=1, GRADS=True, HAS_ROW=False, HAS_COL=False, HAS_ROW_CONST=False, HAS_COL_CONST=False,
            HAS_ROW_TARGET=False, HAS_COL_TARGET=False, UPCAST=False, INPUT_PRECISION=precision, SLOT=sweep._SLOT),
            tile_configs[shape])
    for config in gemm_configs:
        shape = key(config, "BLOCK_R", "BLOCK_C")
        for name, layout in (("dX GEMM", dict(stride_ak=1)), ("dY GEMM", dict(stride_ar=1))):
            builds[f"{name} {shape}"] = _compile_for_hopper(matmul._accumulate_matmul_kernel, gemm_types, dict(
                ACCUMULATE=True, UPCAST=False, INPUT_PRECISION=precision, ROUND_BF16=False, stride_bc=1, **layout),
                config)
    spilled = {name: _spilled_bytes(compiled) for name, compiled in builds.items()}
    for name, compiled in builds.items():
        ptx = compiled.asm["ptx"]
        if half:
            assert "wgmma.mma_async" in ptx, f"{name}: no tensor-core (wgmma) instructions"
        assert "cp.async" in ptx, f"{name}: loads are not pipelined (no cp.async)"
    assert not any(spilled.values()), f"register spills (bytes of stack) per config: {spilled}"


# ---------------------------------------------------------------------------------------------------------------
# GPU: compiled kernels at real sizes
# ---------------------------------------------------------------------------------------------------------------

def _cuda_unit(n, d, dtype):
    return F.normalize(torch.randn(n, d, device="cuda", dtype=torch.float32), dim=1).to(dtype)


def _run_cuda_clip(x, y, scale, bias=None, image_labels=None, text_labels=None, smoothing=0.0):
    import mmcl_fast
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    s = torch.tensor(scale, device="cuda", requires_grad=True)
    b = None if bias is None else torch.tensor(bias, device="cuda", requires_grad=True)
    loss = mmcl_fast.clip_loss(xs, ys, s, b, image_labels=image_labels, text_labels=text_labels,
                               label_smoothing=smoothing)  # backend="auto" is triton on CUDA
    loss.backward()
    out = dict(loss=loss.detach(), dx=xs.grad, dy=ys.grad, dscale=s.grad)
    if b is not None:
        out["dbias"] = b.grad
    return {k: v.cpu() for k, v in out.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,m,d,labels", [(4096, 4096, 768, False), (8192, 8192, 512, False),
                                          (3000, 1001, 100, True), (257, 4099, 1000, True)])
def test_clip_loss_matches_reference_gpu(dtype, n, m, d, labels):
    x, y = _cuda_unit(n, d, dtype), _cuda_unit(m, d, dtype)
    image_labels = torch.randint(0, m, (n,), device="cuda") if labels else None
    text_labels = torch.randint(0, n, (m,), device="cuda") if labels else None
    bias = -2.0 if labels else None
    ours = _run_cuda_clip(x, y, 100.0, bias, image_labels, text_labels, smoothing=0.1 if labels else 0.0)
    check_clip(ours, x, y, 100.0, bias, image_labels, text_labels, 0.1 if labels else 0.0, dtype)


@pytest.mark.gpu
def test_several_chunks_match_reference_gpu(monkeypatch):
    monkeypatch.setenv("MMCL_FAST_TRITON_CHUNK_MB", "4")  # 1280 x 1280 fp16 / 1024 x 1024 fp32 chunks
    for dtype in (torch.float32, torch.bfloat16):
        x, y = _cuda_unit(5000, 384, dtype), _cuda_unit(3001, 384, dtype)
        il, tl = torch.randint(0, 3001, (5000,), device="cuda"), torch.randint(0, 5000, (3001,), device="cuda")
        ours = _run_cuda_clip(x, y, 50.0, 1.0, il, tl, smoothing=0.05)
        check_clip(ours, x, y, 50.0, 1.0, il, tl, 0.05, dtype)


@pytest.mark.gpu
def test_deterministic_bit_identical_gpu():
    x, y = _cuda_unit(6000, 512, torch.bfloat16), _cuda_unit(6000, 512, torch.bfloat16)
    first = _run_cuda_clip(x, y, 60.0, -1.0)
    for _ in range(2):
        again = _run_cuda_clip(x, y, 60.0, -1.0)
        for name in first:
            assert torch.equal(first[name], again[name]), name


@pytest.mark.gpu
def test_no_quadratic_memory_gpu():
    """N = M = 131072, D = 128 bf16: fp32 logits would take 64 GiB. The loss may use O((N + M) D) (inputs'
    gradients, an fp32 accumulator, fp32 temporaries of the positives) and one staged chunk of G."""
    import mmcl_fast
    n, d = 131072, 128
    x = _cuda_unit(n, d, torch.bfloat16).requires_grad_()
    y = _cuda_unit(n, d, torch.bfloat16).requires_grad_()
    scale = torch.tensor(30.0, device="cuda", requires_grad=True)
    mmcl_fast.clip_loss(x, y, scale).backward()  # warm-up: autotuning keeps copies of its outputs
    x.grad = y.grad = scale.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mmcl_fast.clip_loss(x, y, scale).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    features = 2 * n * d * 2
    assert extra < 12 * features + 2 * 128 * 2**20, f"peak {extra / 2**20:.0f} MiB above the inputs"


@pytest.mark.gpu
def test_tf32_only_when_allowed_gpu():
    """fp32 features are exact to 1e-5 by default; torch's allow_tf32 switches the kernels to TF32 tensor cores
    (a different, coarser result that is still close)."""
    x, y = _cuda_unit(4096, 512, torch.float32), _cuda_unit(4096, 512, torch.float32)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = _run_cuda_clip(x, y, 100.0)
        check_clip(exact, x, y, 100.0, None, None, None, 0.0, torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = True
        fast = _run_cuda_clip(x, y, 100.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert not torch.equal(fast["dx"], exact["dx"]), "allow_tf32 did not change the kernels' precision"
    assert_rel_close(fast["loss"], exact["loss"], 1e-2, "tf32 loss")



# ---------------------------------------------------------------------------------------------------------------
# autotuning keys, TF32 flags, device guard, the column-partial merge (GPU where it needs one)
# ---------------------------------------------------------------------------------------------------------------

def test_size_class_maps_every_large_size_to_the_tuning_corner():
    """The forward tunes on a TUNING_SIDE corner once; every larger problem must reuse that config."""
    pytest.importorskip("triton")
    from mmcl_fast.backends.triton.matmul import TUNING_SIDE, size_class
    assert size_class(TUNING_SIDE) == size_class(TUNING_SIDE + 1) == size_class(2**20) == size_class(2**24)
    assert size_class(3000) == size_class(4096) != size_class(4097)
    assert size_class(1) == size_class(2) == 1


def test_tf32_flags_of_both_torch_apis_are_read_without_error():
    """Reading the legacy allow_tf32 after a user set the newer fp32_precision raises inside torch; the backend
    reads the new API first. TF32 means the near-IEEE tf32x3 unless MMCL_FAST_TRITON_TF32=1x."""
    pytest.importorskip("triton")
    from mmcl_fast.backends.triton import sweep
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    if sweep.interpreting():
        pytest.skip("the interpreter always computes in IEEE fp32")
    previous = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert sweep._tf32_allowed() and sweep._input_precision(torch.float32) == "tf32x3"
        os.environ["MMCL_FAST_TRITON_TF32"] = "1x"
        assert sweep._input_precision(torch.float32) == "tf32"
        del os.environ["MMCL_FAST_TRITON_TF32"]
        matmul.fp32_precision = "ieee"
        assert not sweep._tf32_allowed() and sweep._input_precision(torch.float32) == "ieee"
        assert sweep._input_precision(torch.bfloat16) == "tf32"  # ignored by tl.dot for 16-bit operands
    finally:
        os.environ.pop("MMCL_FAST_TRITON_TF32", None)
        matmul.fp32_precision = previous


@pytest.mark.gpu
def test_tf32_new_api_is_unbiased_gpu():
    """With fp32_precision = "tf32" (torch's new API) fp32 runs (no crash) as tf32x3: the confident rows at
    logit_scale 100 that a single TF32 pass biases by ~0.06 stay within 1e-4 of the exact loss."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    base = _cuda_unit(2048, 512, torch.float32)
    x, y = base, F.normalize(base + 0.05 * torch.randn_like(base), dim=1)  # near-aligned pairs: confident rows
    previous = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        exact = _run_cuda_clip(x, y, 100.0)
        matmul.fp32_precision = "tf32"
        fast = _run_cuda_clip(x, y, 100.0)
    finally:
        matmul.fp32_precision = previous
    check_clip(exact, x, y, 100.0, None, None, None, 0.0, torch.float32)
    assert_rel_close(fast["loss"], exact["loss"], 1e-4, "tf32x3 loss")


@pytest.mark.gpu
def test_features_on_a_non_current_device_gpu():
    """Launches follow the tensors' device, not torch.cuda.current_device()."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (the guard is exercised only when the current device differs)")
    import mmcl_fast
    with torch.cuda.device(0):
        x = F.normalize(torch.randn(1000, 256, device="cuda:1"), dim=1).requires_grad_()
        y = F.normalize(torch.randn(1000, 256, device="cuda:1"), dim=1).requires_grad_()
        loss = mmcl_fast.clip_loss(x, y, 20.0)
        loss.backward()
    assert loss.device == x.grad.device == torch.device("cuda:1")
    xr, yr = x.detach().double().cpu().requires_grad_(), y.detach().double().cpu().requires_grad_()
    ref = reference_clip(xr, yr, 20.0)
    ref.backward()
    assert_rel_close(loss.cpu(), ref, LOSS_RTOL[torch.float32], "loss on cuda:1")
    assert_rel_close(x.grad.cpu(), xr.grad, GRAD_RTOL[torch.float32], "d image on cuda:1")


@pytest.mark.gpu
def test_column_partials_merge_many_row_blocks_gpu():
    """Each forward program folds many row blocks into its column slot (stored in one register layout, reloaded
    in another: the barrier case): column LSE against float64 with N >> M."""
    from mmcl_fast import affine_lse
    x, y = _cuda_unit(262144, 128, torch.bfloat16), _cuda_unit(256, 128, torch.bfloat16)
    _, col_lse = affine_lse(x, y, 50.0, need_row=False)
    sim = x.double() @ y.double().T
    expected = torch.logsumexp(50.0 * sim, dim=0)
    assert_rel_close(col_lse, expected, LOSS_RTOL[torch.bfloat16], "col_lse over 262144 rows")


@pytest.mark.gpu
def test_first_call_at_one_million_rows_tunes_on_a_corner_gpu():
    """N = 2^20 (bf16, D = 256): the first call tunes on a 64k corner, not the full problem; its cost is printed
    and bounded (a full-size tuning sweep takes minutes)."""
    import time
    import mmcl_fast
    n = 1 << 20
    x = _cuda_unit(n, 256, torch.bfloat16).requires_grad_()
    y = _cuda_unit(n, 256, torch.bfloat16).requires_grad_()
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        mmcl_fast.clip_loss(x, y, 20.0).backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    print(f"N=2^20 bf16 D=256 fwd+bwd: first call {times[0]:.1f} s, second {times[1]:.1f} s")
    assert times[0] < times[1] + 120.0, f"first call {times[0]:.0f} s: autotuning on the full problem?"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,m,d,positives", [(8192, 8192, 512, "diagonal"), (3000, 9001, 768, "labels")])
def test_siglip_matches_reference_gpu(dtype, n, m, d, positives):
    """The fused sigmoid sweep on tensor cores at real sizes against the float64 dense loss (on the GPU)."""
    import mmcl_fast
    from test_siglip import dense_signs
    torch.manual_seed(n + m)
    x, y = _cuda_unit(n, d, dtype), _cuda_unit(m, d, dtype)
    labels = torch.randint(0, n, (m,), device="cuda") if positives == "labels" else None
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    s = torch.tensor(10.0, device="cuda", requires_grad=True)
    b = torch.tensor(-10.0, device="cuda", requires_grad=True)
    loss = mmcl_fast.siglip_loss(xs, ys, s, b, positives=labels)  # auto: triton on CUDA
    loss.backward()
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    sr = torch.tensor(10.0, device="cuda", dtype=torch.float64, requires_grad=True)
    br = torch.tensor(-10.0, device="cuda", dtype=torch.float64, requires_grad=True)
    z = dense_signs(n, m, None if labels is None else labels.cpu()).cuda()
    logits = sr * xr @ yr.T + br
    ref = -F.logsigmoid(z * logits).sum() / n
    ref.backward()
    assert_rel_close(loss, ref, LOSS_RTOL[dtype], "loss")
    assert_rel_close(xs.grad, xr.grad, GRAD_RTOL[dtype], "d image_features")
    assert_rel_close(ys.grad, yr.grad, GRAD_RTOL[dtype], "d text_features")
    with torch.no_grad():
        weights = torch.sigmoid(-z * logits) / n
        floor_s = (weights * (xr @ yr.T).abs()).sum().item()
    assert_rel_close(s.grad, sr.grad, GRAD_RTOL[dtype], "d logit_scale", floor=floor_s)
    assert_rel_close(b.grad, br.grad, GRAD_RTOL[dtype], "d logit_bias", floor=weights.sum().item())
