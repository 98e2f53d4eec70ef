"""mmcl_fast.train: gradient-cached steps against autograd on a tiny open_clip CLIP, DDP, FSDP and memory (the
digits training example that uses them is tested in examples/digits/tests).

The reference for a step is the autograd step that encodes the same chunks in the same order (images of chunk k,
then its texts) and computes the loss on their concatenation; with patch dropout off it is also the plain
full-batch step `loss_fn(*model(images, texts)).backward()`. Every parameter's gradient is compared, relative to
its largest entry: float64 to 1e-9, float32 to 2e-5 (the acceptance bounds of grad_cached_step).
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

import mmcl_fast
from mmcl_fast.train import grad_cached_step
from mmcl_fast.train import cached as cached_module
from gloo import run_rank, spawn_ranks
from tolerances import rel_err

open_clip = pytest.importorskip("open_clip")
from open_clip.loss import ClipLoss as OpenClipLoss  # noqa: E402
from open_clip.loss import SigLipLoss as OpenSigLipLoss  # noqa: E402

# acceptance: relative error of every parameter's gradient, per dtype
GRAD_CACHE_RTOL = {torch.float64: 1e-9, torch.float32: 2e-5}
N_PAIRS, CHUNK = 10, 4  # 3 chunks, the last one short
JOIN_TIMEOUT_S = 240


def tiny_clip(patch_dropout: float = 0.0, logit_bias: float | None = None, dtype=torch.float32):
    """A random-init open_clip CLIP small enough for float64 tests: ViT 16x16 / patch 4, 2-layer text tower."""
    from open_clip.model import CLIP
    model = CLIP(embed_dim=16,
                 vision_cfg=dict(image_size=16, patch_size=4, width=32, layers=2, head_width=16,
                                 patch_dropout=patch_dropout),
                 text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=2),
                 init_logit_bias=logit_bias)
    return model.to(dtype).train()


def make_batch(n: int, dtype=torch.float32):
    return torch.randn(n, 3, 16, 16, dtype=dtype), torch.randint(1, 100, (n, 8))


def model_loss_args(model, image_features, text_features):
    args = (image_features, text_features, model.logit_scale.exp())
    return args + ((model.logit_bias,) if model.logit_bias is not None else ())


def chunked_autograd_step(model, images, texts, loss_fn, chunk: int):
    """The reference: encode chunk by chunk (images, then texts) with autograd kept, one loss, one backward."""
    image_parts, text_parts = [], []
    for start in range(0, images.shape[0], chunk):
        image_parts.append(model.encode_image(images[start:start + chunk], normalize=True))
        text_parts.append(model.encode_text(texts[start:start + chunk], normalize=True))
    loss = loss_fn(*model_loss_args(model, torch.cat(image_parts), torch.cat(text_parts)))
    loss.backward()
    return loss.detach()


def plain_step(model, images, texts, loss_fn):
    out = model(images, texts)
    loss = loss_fn(*out)
    loss.backward()
    return loss.detach()


def grads_of(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def run_with_seed(seed: int, step, model):
    """Run `step()` from a fixed RNG state on fresh gradients; return (loss, gradients, RNG state after)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = step()
    return loss, grads_of(model), torch.get_rng_state()


def assert_grads_close(actual: dict, expected: dict, rtol: float, what: str = "") -> None:
    assert actual.keys() == expected.keys(), f"{what}: parameters with a gradient differ: " \
                                             f"{sorted(actual.keys() ^ expected.keys())}"
    errors = {name: rel_err(actual[name], expected[name]) for name in expected}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{what}: {worst} gradient relative error {errors[worst]:.3e} > {rtol:.0e}"


LOSSES = {
    "mmcl_fast-clip": lambda: mmcl_fast.ClipLoss(),
    "open_clip-clip": lambda: OpenClipLoss(),
    "open_clip-siglip": lambda: OpenSigLipLoss(),
}


def _needs_bias(loss_name: str):
    return -10.0 if "siglip" in loss_name else None


# ---------------------------------------------------------------------------------------------
# single process: gradient equality
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("patch_dropout", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_grad_matches_chunked_autograd(dtype, patch_dropout, loss_name):
    model = tiny_clip(patch_dropout, _needs_bias(loss_name), dtype)
    images, texts = make_batch(N_PAIRS, dtype)
    loss_fn = LOSSES[loss_name]()
    ref_loss, ref_grads, ref_rng = run_with_seed(
        7, lambda: chunked_autograd_step(model, images, texts, loss_fn, CHUNK), model)
    loss, grads, rng = run_with_seed(7, lambda: grad_cached_step(model, images, texts, loss_fn, CHUNK), model)
    assert len(ref_grads) == len(list(model.parameters())), "the reference left a parameter without gradient"
    assert_grads_close(grads, ref_grads, GRAD_CACHE_RTOL[dtype], f"{loss_name} {dtype} pd={patch_dropout}")
    assert rel_err(loss, ref_loss) <= GRAD_CACHE_RTOL[dtype]
    assert torch.equal(rng, ref_rng), "the RNG must end where the autograd step leaves it"
    if patch_dropout == 0.0:  # a deterministic model: also the plain full-batch step
        _, plain_grads, _ = run_with_seed(7, lambda: plain_step(model, images, texts, loss_fn), model)
        assert_grads_close(grads, plain_grads, GRAD_CACHE_RTOL[dtype], "vs the plain full-batch step")


def test_rng_replay_is_what_makes_patch_dropout_exact(monkeypatch):
    """Without replaying the recorded RNG states pass 2 draws other patch-dropout masks: the gradients differ."""
    model = tiny_clip(patch_dropout=0.5, dtype=torch.float64)
    images, texts = make_batch(N_PAIRS, torch.float64)
    loss_fn = mmcl_fast.ClipLoss()
    _, ref_grads, _ = run_with_seed(3, lambda: chunked_autograd_step(model, images, texts, loss_fn, CHUNK), model)
    monkeypatch.setattr(cached_module._RngState, "restore", lambda self: None)
    _, grads, _ = run_with_seed(3, lambda: grad_cached_step(model, images, texts, loss_fn, CHUNK), model)
    worst = max(rel_err(grads[name], ref_grads[name]) for name in ref_grads)
    assert worst > 1e-3, f"no-replay gradients matched to {worst:.1e}: patch dropout does not exercise the replay"
    with pytest.raises(RuntimeError, match="check_replay"):
        grad_cached_step(model, images, texts, loss_fn, CHUNK, check_replay=0.0)


@pytest.mark.skipif(getattr(mmcl_fast, "SigLipLoss", None) is None,
                    reason="mmcl_fast.SigLipLoss is not in this tree yet (another engineer is adding it)")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_grad_matches_with_mmcl_fast_siglip(dtype):
    model = tiny_clip(patch_dropout=0.5, logit_bias=-10.0, dtype=dtype)
    images, texts = make_batch(N_PAIRS, dtype)
    loss_fn = mmcl_fast.SigLipLoss()
    _, ref_grads, _ = run_with_seed(5, lambda: chunked_autograd_step(model, images, texts, loss_fn, CHUNK), model)
    _, grads, _ = run_with_seed(5, lambda: grad_cached_step(model, images, texts, loss_fn, CHUNK), model)
    assert_grads_close(grads, ref_grads, GRAD_CACHE_RTOL[dtype], f"mmcl_fast SigLipLoss {dtype}")


def test_activation_checkpointing_with_patch_dropout():
    model = tiny_clip(patch_dropout=0.5, dtype=torch.float64)
    images, texts = make_batch(N_PAIRS, torch.float64)
    loss_fn = mmcl_fast.ClipLoss()
    _, ref_grads, _ = run_with_seed(11, lambda: chunked_autograd_step(model, images, texts, loss_fn, CHUNK), model)
    model.set_grad_checkpointing(True)
    _, grads, _ = run_with_seed(11, lambda: grad_cached_step(model, images, texts, loss_fn, CHUNK), model)
    assert_grads_close(grads, ref_grads, GRAD_CACHE_RTOL[torch.float64], "with activation checkpointing")


@pytest.mark.parametrize("loss_name,where", [("mmcl_fast-clip", "argument"), ("open_clip-clip", "argument"),
                                             ("mmcl_fast-clip", "ambient")])
def test_autocast_bf16_matches_chunked_autograd_under_autocast(loss_name, where):
    """Both steps encode in bf16 under autocast, one autocast region per chunk.

    (In one region autocast casts each weight to bf16 once and autograd sums the chunks' weight gradients in bf16
    before the cast back; separate regions sum them in fp32, as the cached step does.)
    """
    model = tiny_clip(patch_dropout=0.5)
    images, texts = make_batch(N_PAIRS)
    loss_fn = LOSSES[loss_name]()
    amp = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)

    def reference():
        image_parts, text_parts = [], []
        for start in range(0, N_PAIRS, CHUNK):
            with amp():
                image_parts.append(model.encode_image(images[start:start + CHUNK], normalize=True))
                text_parts.append(model.encode_text(texts[start:start + CHUNK], normalize=True))
        with amp():
            loss = loss_fn(torch.cat(image_parts), torch.cat(text_parts), model.logit_scale.exp())
        loss.backward()
        return loss.detach()

    _, ref_grads, _ = run_with_seed(2, reference, model)
    def cached():
        if where == "argument":
            return grad_cached_step(model, images, texts, loss_fn, CHUNK, autocast=amp)
        with amp():  # one region around the whole step: autocast's weight-cast cache must not leak across passes
            return grad_cached_step(model, images, texts, loss_fn, CHUNK)

    _, grads, _ = run_with_seed(2, cached, model)
    assert_grads_close(grads, ref_grads, GRAD_CACHE_RTOL[torch.float32], f"bf16 autocast ({where}) {loss_name}")


def test_grad_scaler_scales_the_cached_gradients():
    model = tiny_clip()
    images, texts = make_batch(N_PAIRS)
    loss_fn = mmcl_fast.ClipLoss()
    _, ref_grads, _ = run_with_seed(1, lambda: chunked_autograd_step(model, images, texts, loss_fn, CHUNK), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss, grads, _ = run_with_seed(1, lambda: grad_cached_step(model, images, texts, loss_fn, CHUNK, scaler=scaler),
                                   model)
    assert_grads_close({k: v / 1024.0 for k, v in grads.items()}, ref_grads, GRAD_CACHE_RTOL[torch.float32],
                       "GradScaler")
    assert loss.item() < 100.0, "the returned loss is unscaled"


def test_pair_of_encoders_with_batch_norm():
    """Non-open_clip encoders (a conv tower with batch norm, an embedding bag): gradients and running statistics."""
    torch.manual_seed(0)
    image_encoder = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Dropout(0.3),
        torch.nn.Flatten(), torch.nn.LazyLinear(12)).double()
    image_encoder(torch.zeros(2, 3, 16, 16, dtype=torch.float64))  # materialise the lazy layer
    text_encoder = torch.nn.Sequential(torch.nn.EmbeddingBag(100, 12), torch.nn.Dropout(0.3)).double()
    raw_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    images, texts = make_batch(N_PAIRS, torch.float64)
    loss_fn = mmcl_fast.ClipLoss()
    modules = torch.nn.ModuleList([image_encoder, text_encoder])
    modules.register_parameter("raw_scale", raw_scale)
    initial_stats = {k: v.clone() for k, v in image_encoder.state_dict().items()}

    def reference():
        feats = [(image_encoder(images[s:s + CHUNK]), text_encoder(texts[s:s + CHUNK]))
                 for s in range(0, N_PAIRS, CHUNK)]
        loss = loss_fn(torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats]), raw_scale.exp())
        loss.backward()
        return loss.detach()

    _, ref_grads, _ = run_with_seed(4, reference, modules)
    ref_stats = {k: v.clone() for k, v in image_encoder.state_dict().items()}
    image_encoder.load_state_dict(initial_stats)
    _, grads, _ = run_with_seed(4, lambda: grad_cached_step((image_encoder, text_encoder), images, texts, loss_fn,
                                                            CHUNK, logit_scale=raw_scale.exp()), modules)
    assert_grads_close(grads, ref_grads, GRAD_CACHE_RTOL[torch.float64], "pair of encoders")
    for key, value in image_encoder.state_dict().items():
        assert torch.allclose(value.double(), ref_stats[key].double(), rtol=1e-12, atol=0), f"buffer {key}"


def test_bad_input_names_the_argument():
    model = tiny_clip()
    images, texts = make_batch(4)
    loss_fn = mmcl_fast.ClipLoss()
    with pytest.raises(ValueError, match="chunk_size"):
        grad_cached_step(model, images, texts, loss_fn, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        grad_cached_step(model, images, texts, loss_fn, 2.5)
    with pytest.raises(ValueError, match="images and texts"):
        grad_cached_step(model, images, texts[:3], loss_fn, 2)
    with pytest.raises(TypeError, match="images"):
        grad_cached_step(model, images.tolist(), texts, loss_fn, 2)
    with pytest.raises(TypeError, match="model"):
        grad_cached_step(torch.nn.Linear(3, 3), images, texts, loss_fn, 2)
    with pytest.raises(ValueError, match="logit_scale"):
        grad_cached_step((model.visual, model.encode_text), images, texts, loss_fn, 2)
    with pytest.raises(ValueError, match="logit_scale"):
        grad_cached_step(model, images, texts, loss_fn, 2, logit_scale=1.0)
    with pytest.raises(TypeError, match="loss_fn"):
        grad_cached_step(model, images, texts, "clip", 2)


# ---------------------------------------------------------------------------------------------
# DDP, gloo, 2 processes: the cached step on each rank's half equals the single-process cached step
# ---------------------------------------------------------------------------------------------

DDP_CASES = {  # name: (dtype, which loss each rank runs, its single-process counterpart)
    "mmcl_fast-float64": (torch.float64, "mmcl_fast", "mmcl_fast"),
    "mmcl_fast-float32": (torch.float32, "mmcl_fast", "mmcl_fast"),
    "open_clip-float64": (torch.float64, "open_clip", "open_clip"),
}
DDP_WORLD, DDP_LOCAL, DDP_CHUNK = 2, 6, 4  # 2 ranks x 6 pairs, chunks of 4 and 2 on each rank


def _clip_loss(kind: str, rank: int = 0, world: int = 1):
    cls = mmcl_fast.ClipLoss if kind == "mmcl_fast" else OpenClipLoss
    if world == 1:
        return cls()
    return cls(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)


def _ddp_worker(rank: int, world: int, work_dir: str) -> None:
    def body():
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel
        inputs = torch.load(os.path.join(work_dir, "inputs.pt"))
        results = {}
        for name, (dtype, kind, _) in DDP_CASES.items():
            model = tiny_clip(dtype=dtype)
            model.load_state_dict(inputs[name]["state"])
            ddp = DistributedDataParallel(model)
            reductions = []

            def counting_allreduce(state, bucket, reductions=reductions):
                reductions.append(bucket.index())
                return default_hooks.allreduce_hook(state, bucket)

            ddp.register_comm_hook(None, counting_allreduce)
            rows = slice(rank * DDP_LOCAL, (rank + 1) * DDP_LOCAL)
            images, texts = inputs[name]["images"][rows], inputs[name]["texts"][rows]
            loss_fn = _clip_loss(kind, rank, world)
            plain_step(ddp, images, texts, loss_fn)  # how many bucket reductions one ordinary step makes
            plain_reductions = len(reductions)
            ddp.zero_grad(set_to_none=True)
            reductions.clear()
            loss = grad_cached_step(ddp, images, texts, loss_fn, DDP_CHUNK)
            results[name] = {"loss": loss, "grads": grads_of(model), "reductions": len(reductions),
                             "plain_reductions": plain_reductions}
        return results
    run_rank(rank, world, work_dir, body, timeout_s=60)


def test_ddp_gloo_matches_single_process_cached_step(tmp_path):
    inputs = {}
    for name, (dtype, _, _) in DDP_CASES.items():
        images, texts = make_batch(DDP_WORLD * DDP_LOCAL, dtype)
        inputs[name] = {"state": tiny_clip(dtype=dtype).state_dict(), "images": images, "texts": texts}
    torch.save(inputs, tmp_path / "inputs.pt")
    per_rank = spawn_ranks(_ddp_worker, DDP_WORLD, tmp_path, timeout=JOIN_TIMEOUT_S)
    for name, (dtype, _, single_kind) in DDP_CASES.items():
        model = tiny_clip(dtype=dtype)
        model.load_state_dict(inputs[name]["state"])
        loss = grad_cached_step(model, inputs[name]["images"], inputs[name]["texts"], _clip_loss(single_kind), CHUNK)
        expected = grads_of(model)
        for rank, results in enumerate(per_rank):
            got = results[name]
            assert_grads_close(got["grads"], expected, GRAD_CACHE_RTOL[dtype], f"{name} rank {rank}")
            assert got["reductions"] == got["plain_reductions"] > 0, \
                f"{name}: {got['reductions']} bucket all-reduces, an ordinary step makes {got['plain_reductions']}"
        # local losses: the mean over ranks is the global loss
        mean_loss = sum(results[name]["loss"].double() for results in per_rank) / DDP_WORLD
        assert rel_err(mean_loss, loss) <= GRAD_CACHE_RTOL[dtype]


def test_chunk_size_per_tower_and_mapping_texts():
    """Different chunk sizes for the two towers (right-aligned calls) and texts given as a tokenizer-style mapping
    (input_ids + attention_mask, sliced row-wise) give the plain full-batch step's gradients."""
    model = tiny_clip(dtype=torch.float64)
    images, texts = make_batch(N_PAIRS, torch.float64)
    loss_fn = mmcl_fast.ClipLoss()
    _, plain_grads, _ = run_with_seed(7, lambda: plain_step(model, images, texts, loss_fn), model)
    for chunks in ((4, 3), (2, 10), (10, 1)):
        _, grads, _ = run_with_seed(7, lambda: grad_cached_step(model, images, texts, loss_fn, chunks), model)
        assert_grads_close(grads, plain_grads, GRAD_CACHE_RTOL[torch.float64], f"chunk sizes {chunks}")

    seen = []

    def text_tower(batch):
        seen.append(tuple(batch["input_ids"].shape))
        assert torch.equal(batch["attention_mask"], torch.ones_like(batch["input_ids"]))
        return model.encode_text(batch["input_ids"], normalize=True)

    mapping = {"input_ids": texts, "attention_mask": torch.ones_like(texts)}
    encoders = (lambda x: model.encode_image(x, normalize=True), text_tower)
    _, grads, _ = run_with_seed(7, lambda: grad_cached_step(encoders, images, mapping, loss_fn, (4, 3),
                                                            logit_scale=model.logit_scale.exp()), model)
    assert_grads_close(grads, plain_grads, GRAD_CACHE_RTOL[torch.float64], "mapping texts, pair of encoders")
    assert seen == [(3, 8), (3, 8), (3, 8), (1, 8)] * 2  # 4 text chunks of 3, 3, 3, 1 rows in each pass
    with pytest.raises(ValueError, match="chunk_size"):
        grad_cached_step(model, images, texts, loss_fn, (4, 0))
    with pytest.raises(ValueError, match="texts: a mapping batch"):
        grad_cached_step(encoders, images, {"input_ids": texts, "attention_mask": texts[:3]}, loss_fn, 2,
                         logit_scale=1.0)


# ---------------------------------------------------------------------------------------------
# FSDP2 (fully_shard, gloo on CPU, 2 ranks) and FSDP1: the cached step equals the single-process one
# ---------------------------------------------------------------------------------------------

FSDP_LOCAL, FSDP_CHUNKS = 6, (4, 3)


def _full(grad):
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def _fsdp_worker(rank: int, world: int, work_dir: str, flavour: str) -> None:
    import torch.distributed as dist

    def body():
        inputs = torch.load(os.path.join(work_dir, "inputs.pt"))
        model = tiny_clip(dtype=torch.float32)
        model.load_state_dict(inputs["state"])
        if flavour == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (world,))
            fully_shard(model.visual, mesh=mesh)
            fully_shard(model.transformer, mesh=mesh)
            # a 0-d parameter cannot be sharded: open_clip's logit_scale stays replicated (its gradient all-reduced
            # by hand below, as any parameter FSDP ignores)
            fully_shard(model, mesh=mesh, ignored_params={model.logit_scale})
            wrapped = model
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel
            wrapped = FullyShardedDataParallel(model, use_orig_params=True)
        rows = slice(rank * FSDP_LOCAL, (rank + 1) * FSDP_LOCAL)
        loss_fn = mmcl_fast.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        scatters = []
        counted = getattr(dist, "reduce_scatter_single", None) if flavour == "fsdp2" else None
        if counted is not None:  # FSDP2's gradient reduction: count it, once per FSDP group per synced backward
            def counting(*args, **kwargs):
                scatters.append(1)
                return counted(*args, **kwargs)
            dist.reduce_scatter_single = counting
            plain_step(wrapped, inputs["images"][rows], inputs["texts"][rows], loss_fn)
            wrapped.zero_grad(set_to_none=True)
        plain_scatters = len(scatters)
        scatters.clear()
        loss = grad_cached_step(wrapped, inputs["images"][rows], inputs["texts"][rows], loss_fn, FSDP_CHUNKS)
        if counted is not None:
            dist.reduce_scatter_single = counted
        grads = {}
        for name, param in model.named_parameters():
            grad = _full(param.grad)
            if flavour == "fsdp2" and name == "logit_scale":
                grad = grad.clone()
                dist.all_reduce(grad)
                grad /= world
            grads[name.replace("_fsdp_wrapped_module.", "")] = grad
        if flavour == "fsdp1":
            with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
                grads = {name.replace("_fsdp_wrapped_module.", ""): p.grad.detach().clone()
                         for name, p in wrapped.named_parameters() if p.grad is not None}
        return {"loss": loss, "grads": grads, "scatters": len(scatters), "plain_scatters": plain_scatters}
    run_rank(rank, world, work_dir, body, timeout_s=60)


def _fsdp_case(tmp_path, flavour: str):
    torch.manual_seed(3)
    images, texts = make_batch(2 * FSDP_LOCAL)
    state = tiny_clip().state_dict()
    torch.save({"state": state, "images": images, "texts": texts}, tmp_path / "inputs.pt")
    per_rank = spawn_ranks(_fsdp_worker, 2, tmp_path, (flavour,), timeout=JOIN_TIMEOUT_S)
    model = tiny_clip()
    model.load_state_dict(state)
    loss = grad_cached_step(model, images, texts, mmcl_fast.ClipLoss(), FSDP_CHUNKS)
    expected = grads_of(model)
    for rank, result in enumerate(per_rank):
        assert_grads_close(result["grads"], expected, GRAD_CACHE_RTOL[torch.float32], f"{flavour} rank {rank}")
        # gradients are reduced once per step (the last chunk's backward), as in an ordinary step
        assert result["scatters"] == result["plain_scatters"], (result["scatters"], result["plain_scatters"])
    if flavour == "fsdp2":
        assert per_rank[0]["plain_scatters"] > 0, "the FSDP2 reduce-scatter was not observed"
    mean_loss = sum(result["loss"].double() for result in per_rank) / 2
    assert rel_err(mean_loss, loss) <= GRAD_CACHE_RTOL[torch.float32]


def test_fsdp2_gloo_matches_single_process_cached_step(tmp_path):
    """fully_shard on both towers and the root: the wrapper's forward unshards, set_requires_gradient_sync(False)
    keeps all chunks but the last from reduce-scattering; per-tower chunk sizes (4 images, 3 texts per call)."""
    _fsdp_case(tmp_path, "fsdp2")


@pytest.mark.gpu
def test_fsdp1_matches_single_process_cached_step(tmp_path):
    """FSDP1 (FullyShardedDataParallel) through its forward and no_sync(); FSDP1 needs CUDA, so this runs on GPU
    machines only (the gloo ranks still hold CPU tensors: FSDP1 moves them)."""
    _fsdp_case(tmp_path, "fsdp1")


# ---------------------------------------------------------------------------------------------
# memory: at a fixed chunk, a bigger batch costs only the O(N·D) feature and gradient buffers
# ---------------------------------------------------------------------------------------------

# The digits example's model (examples/digits/run.py): ViT over 16x16 images in 4x4 patches, 2-layer text tower.
MEMORY_MODEL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}
_MEMORY_SETUP = f"""
import torch
torch.set_num_threads(1)
import mmcl_fast
from mmcl_fast.train import grad_cached_step
from open_clip.model import CLIP
torch.manual_seed(0)
model = CLIP(**{MEMORY_MODEL!r}).train()
loss_fn = mmcl_fast.ClipLoss()
def make_inputs(n):
    return [torch.randn(n, 3, 16, 16), torch.randint(1, 49407, (n, 12))]
def step(inputs):
    grad_cached_step(model, inputs[0], inputs[1], loss_fn, 32)
"""
# N·D-sized fp32 buffers a step may hold at once: the image and text feature caches and their gradients (4), and
# the loss's own O(N·D) work (mmcl_fast: normalised copies and the feature gradients it hands back).
FEATURE_BUFFERS = 12


@pytest.mark.slow  # two fresh processes importing torch and open_clip
def test_cached_step_memory_grows_by_feature_buffers_only():
    from rss import peak_rss_growth

    small, large, dim = 256, 8 * 256, MEMORY_MODEL["embed_dim"]
    growth = {n: peak_rss_growth(_MEMORY_SETUP, n)["growth_bytes"] for n in (small, large)}
    allowed = FEATURE_BUFFERS * (large - small) * dim * 4 + 2**20  # + 1 MiB of page / allocator granularity
    # (a plain open_clip step of this model grows by ~485 MiB between the same two batches on the dev machine)
    assert growth[large] - growth[small] <= allowed, \
        f"peak RSS grew {(growth[large] - growth[small]) / 2**20:.1f} MiB from N={small} to N={large}, more than " \
        f"{FEATURE_BUFFERS} N·D buffers ({allowed / 2**20:.1f} MiB)"
