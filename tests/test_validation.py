"""Bad input raises a clear ValueError / TypeError that names the argument and what was expected."""
import pytest
import torch

import mmcl_fast


def feats(n=4, d=8, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(image_features=torch.randn(8)), ValueError, "image_features must be a 2-D"),
    (dict(text_features=torch.randn(2, 4, 8)), ValueError, "text_features must be a 2-D"),
    (dict(text_features=feats(4, 7)), ValueError, "same feature size"),
    (dict(text_features=feats(4, 8, torch.bfloat16)), TypeError, "same dtype"),
    (dict(image_features=torch.ones(4, 8, dtype=torch.int64)), TypeError, "image_features must have a floating"),
    (dict(image_features=feats(0, 8)), ValueError, "image_features is an empty batch"),
    (dict(image_features=feats(4, 0), text_features=feats(4, 0)), ValueError, "feature size 0"),
    (dict(logit_scale=torch.ones(3)), ValueError, "logit_scale must be a scalar"),
    (dict(logit_scale=torch.tensor(2)), TypeError, "logit_scale must be a floating-point"),
    (dict(logit_scale="2"), TypeError, "logit_scale must be a number"),
    (dict(logit_bias=torch.ones(2)), ValueError, "logit_bias must be a scalar"),
    (dict(text_features=feats(5, 8)), ValueError, "unequal batch sizes need both image_labels and text_labels"),
    (dict(image_labels=torch.tensor([0, 1, 2, 4])), ValueError, r"image_labels must lie in \[0, 4\)"),
    (dict(image_labels=torch.tensor([0, 1, 2])), ValueError, r"image_labels must have shape \(4,\)"),
    (dict(image_labels=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, "image_labels must be an integer"),
    (dict(text_labels=torch.tensor([-1, 0, 1, 2])), ValueError, "text_labels must lie in"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
    (dict(backend="cuda-ish"), ValueError, "backend must be one of"),
])
def test_clip_loss_bad_input_names_the_argument(kwargs, exc, words):
    args = dict(image_features=feats(), text_features=feats(), logit_scale=10.0)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        mmcl_fast.clip_loss(**args)


def test_mismatched_devices_are_named():
    meta = torch.randn(4, 8, device="meta")
    with pytest.raises(ValueError, match="same device"):
        mmcl_fast.clip_loss(feats(), meta, 1.0)


def test_cpu_backend_rejects_other_devices_and_float64():
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        mmcl_fast.clip_loss(feats(dtype=torch.float64), feats(dtype=torch.float64), 1.0, backend="cpu")


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        mmcl_fast.clip_loss(feats(), feats(), 1.0, backend="triton")


def test_infonce_bad_options():
    with pytest.raises(ValueError, match="similarity must be one of"):
        mmcl_fast.infonce(feats(), feats(), similarity="cosine")
    with pytest.raises(ValueError, match="reduction must be one of"):
        mmcl_fast.infonce(feats(), feats(), reduction="max")
    with pytest.raises(ValueError, match="scale must be a scalar"):
        mmcl_fast.infonce(feats(), feats(), torch.ones(3))
    with pytest.raises(ValueError, match="the symmetric loss needs key_labels"):
        mmcl_fast.infonce(feats(4), feats(6), query_labels=torch.tensor([0, 1, 2, 3]))


def test_affine_lse_bad_shapes():
    with pytest.raises(ValueError, match="row_bias must be a scalar or a \\(4,\\) tensor"):
        mmcl_fast.affine_lse(feats(), feats(5), 1.0, row_bias=torch.ones(5))
    with pytest.raises(ValueError, match="at least one of need_row / need_col"):
        mmcl_fast.affine_lse(feats(), feats(), need_row=False, need_col=False)


def test_docstrings_name_every_backend():
    """A loss's documented backend list is the registry's: no backend left out of (or invented in) a docstring."""
    import re

    import mmcl_fast
    import mmcl_fast.backends
    from mmcl_fast.backends import BACKENDS
    functions = [mmcl_fast.clip_loss, mmcl_fast.siglip_loss, mmcl_fast.infonce, mmcl_fast.uniformity_loss,
                 mmcl_fast.brownian_bridge_loss, mmcl_fast.feature_separation_loss, mmcl_fast.distributed.clip_loss]
    for function in functions:
        doc = " ".join(function.__doc__.split())
        listed = re.search(r"backend: [^.]*?(\"auto\"[^.]*)", doc)
        assert listed, f"{function.__qualname__}: no backend list in its docstring"
        names = set(re.findall(r'"(\w+)"', listed.group(1)))
        assert names >= set(BACKENDS) - {"auto"} and names <= set(BACKENDS), (function.__qualname__, names)
    package_doc = mmcl_fast.backends.__doc__
    assert all(name in package_doc for name in BACKENDS if name != "auto")
