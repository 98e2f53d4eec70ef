"""mmcl_fast.integrations.transformers against transformers' own ``return_loss=True`` loss, on tiny random-init
CLIPModel / SiglipModel / Siglip2Model (no download): the loss and every parameter's gradient, gradient-cached
steps, one Trainer step, and DDP over gloo with 2 ranks.

Gradients are compared per parameter, relative to that parameter's largest reference entry: float64 to 1e-9,
float32 to 1e-5. Two exceptions, both the models' own: the attention key biases (softmax ignores a shift shared by
all keys, so their exact gradient is 0 and both sides hold rounding noise) are measured against the model's largest
gradient; Siglip2 resizes its position embeddings in float32 whatever the model's dtype, so in a float64 model their
gradient, summed over a batch in float32, has float32 precision once the batch is chunked differently.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gloo import run_rank, spawn_ranks  # noqa: E402
from tolerances import LOSS_RTOL, rel_err  # noqa: E402

from mmcl_fast.integrations.transformers import ContrastiveTrainer, grad_cached_step, model_loss  # noqa: E402

RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}
KINDS = ("clip", "siglip", "siglip2")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
ZERO_GRADIENT_SUFFIX = "k_proj.bias"  # see the module docstring
FLOAT32_INSIDE = "vision_model.embeddings.position_embedding.weight"  # Siglip2's, see the module docstring

# a tiny model: 2 layers per tower, width 16; texts of 8 tokens ending in EOS (CLIP pools there), 4x4 patches
VOCAB, SEQ_LEN, EOS, PAD = 40, 8, 39, 0
WIDTH, PROJECTION, CHANNELS, PATCH = 16, 8, 3, 4
IMAGE_SIZE = 8          # CLIP / SigLIP: 2 x 2 patches
SIGLIP2_PATCHES = 16    # Siglip2: up to 16 patches per image, as (height, width) grids of any shape
# SigLIP's own init is scale log(10), bias -10; bias -2.5 keeps positive and negative pairs' gradients both O(1)
SIGLIP_SCALE, SIGLIP_BIAS = math.log(10.0), -2.5
N_PAIRS = 7


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(kind: str, dtype=torch.float64, attention_dropout: float = 0.0):
    """Random-init model of `kind`; dropout is off unless asked (transformers' default for these configs)."""
    text = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=SEQ_LEN, bos_token_id=1, eos_token_id=EOS,
                pad_token_id=PAD, attention_dropout=attention_dropout)
    vision = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=2,
                  num_channels=CHANNELS, patch_size=PATCH, attention_dropout=attention_dropout)
    if kind == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(
            text_config=text, vision_config={**vision, "image_size": IMAGE_SIZE}, projection_dim=PROJECTION))
    elif kind == "siglip":
        model = transformers.SiglipModel(transformers.SiglipConfig(
            text_config=text, vision_config={**vision, "image_size": IMAGE_SIZE}))
    else:
        model = transformers.Siglip2Model(transformers.Siglip2Config(
            text_config=text, vision_config={**vision, "num_patches": SIGLIP2_PATCHES}))
    if kind != "clip":
        with torch.no_grad():
            model.logit_scale.fill_(SIGLIP_SCALE)
            model.logit_bias.fill_(SIGLIP_BIAS)
    return model.to(dtype).train()


def make_batch(kind: str, n: int, dtype=torch.float64) -> dict:
    """The model's forward arguments for n pairs: padded texts of random lengths (and, for Siglip2, images of random
    patch grids, padded to SIGLIP2_PATCHES)."""
    lengths = torch.randint(3, SEQ_LEN + 1, (n,))
    mask = torch.arange(SEQ_LEN)[None] < lengths[:, None]
    input_ids = torch.randint(2, EOS, (n, SEQ_LEN))
    input_ids[torch.arange(n), lengths - 1] = EOS
    input_ids[~mask] = PAD
    batch = {"input_ids": input_ids, "attention_mask": mask.long()}
    if kind != "siglip2":
        batch["pixel_values"] = torch.randn(n, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, dtype=dtype)
        return batch
    side = math.isqrt(SIGLIP2_PATCHES)
    shapes = torch.stack([torch.randint(1, side + 1, (n,)), torch.randint(1, side + 1, (n,))], 1)
    valid = torch.arange(SIGLIP2_PATCHES)[None] < shapes.prod(1)[:, None]
    pixels = torch.randn(n, SIGLIP2_PATCHES, CHANNELS * PATCH * PATCH, dtype=dtype) * valid[..., None]
    batch.update(pixel_values=pixels, pixel_attention_mask=valid.long(), spatial_shapes=shapes)
    return batch


def towers(kind: str, batch: dict) -> tuple:
    """(pixel_values argument, text_batch argument) of grad_cached_step for a forward batch."""
    image_keys = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
    images = ({key: batch[key] for key in image_keys} if kind == "siglip2" else batch["pixel_values"])
    texts = transformers.BatchEncoding({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    return images, texts


def rows(batch: dict, start: int, stop: int) -> dict:
    return {key: value[start:stop] for key, value in batch.items()}


def grads_of(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def reference_step(model, batch):
    """transformers' own step: loss and gradients of ``model(**batch, return_loss=True).loss``."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch, return_loss=True).loss
    loss.backward()
    return loss.detach(), grads_of(model)


def assert_grads_close(actual: dict, expected: dict, rtol: float, what: str = "", float32_inside=()) -> None:
    """Every parameter's gradient within rtol of its largest entry; `float32_inside`: parameters whose gradient the
    model computes in float32 (compared at float32's tolerance)."""
    assert actual.keys() == expected.keys(), \
        f"{what}: parameters with a gradient differ: {sorted(actual.keys() ^ expected.keys())}"
    largest = max(grad.abs().max().item() for grad in expected.values())
    for name in expected:
        err = rel_err(actual[name], expected[name], floor=largest if name.endswith(ZERO_GRADIENT_SUFFIX) else 0.0)
        tol = max(rtol, RTOL[torch.float32]) if name in float32_inside else rtol
        assert err <= tol, f"{what}: {name} gradient relative error {err:.3e} > {tol:.0e}"


# ---------------------------------------------------------------------------------------------
# model_loss == model(**batch, return_loss=True).loss, and every gradient
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_model_loss_matches_return_loss_and_gradients(kind, dtype, monkeypatch):
    model = tiny_model(kind, dtype)
    batch = make_batch(kind, N_PAIRS, dtype)
    ref_loss, ref_grads = reference_step(model, batch)

    def logits_forward(*args, **kwargs):
        raise AssertionError("model_loss ran the model's forward, which builds the N x N logits")

    monkeypatch.setattr(model, "forward", logits_forward)
    model.zero_grad(set_to_none=True)
    loss = model_loss(model, transformers.BatchEncoding({**batch, "return_loss": True}))
    loss.backward()
    assert loss.dtype == ref_loss.dtype
    assert rel_err(loss, ref_loss) <= RTOL[dtype]
    assert_grads_close(grads_of(model), ref_grads, RTOL[dtype], f"{kind} {dtype}")
    assert "logit_scale" in ref_grads and (kind == "clip" or "logit_bias" in ref_grads)


class TensorFeaturesCLIP(transformers.CLIPModel):
    """transformers 4.x's interface: get_image_features / get_text_features return the embedding tensor."""

    def get_image_features(self, **inputs):
        return super().get_image_features(**inputs).pooler_output

    def get_text_features(self, **inputs):
        return super().get_text_features(**inputs).pooler_output


def test_model_loss_takes_tensor_features_of_transformers_4():
    model = tiny_model("clip")
    legacy = TensorFeaturesCLIP(model.config).double()
    legacy.load_state_dict(model.state_dict())
    batch = make_batch("clip", N_PAIRS)
    ref_loss, ref_grads = reference_step(model, batch)
    legacy.zero_grad(set_to_none=True)
    loss = model_loss(legacy, batch)
    loss.backward()
    assert rel_err(loss, ref_loss) <= RTOL[torch.float64]
    assert_grads_close(grads_of(legacy), ref_grads, RTOL[torch.float64], "tensor features")


# ---------------------------------------------------------------------------------------------
# grad_cached_step: chunked encoders, one loss; the plain step's gradients
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_grad_cached_step_matches_plain_step(kind, dtype):
    model = tiny_model(kind, dtype)
    batch = make_batch(kind, N_PAIRS, dtype)
    ref_loss, ref_grads = reference_step(model, batch)
    images, texts = towers(kind, batch)
    for chunk_size in (3, (2, 5)):  # 3 chunks, the last one short; different chunks per tower
        model.zero_grad(set_to_none=True)
        loss = grad_cached_step(model, images, texts, chunk_size=chunk_size)
        assert rel_err(loss, ref_loss) <= RTOL[dtype]
        assert_grads_close(grads_of(model), ref_grads, RTOL[dtype], f"{kind} {dtype} chunks {chunk_size}",
                           float32_inside=(FLOAT32_INSIDE,) if kind == "siglip2" else ())
        assert not {"forward", "encode_image", "encode_text"} & set(vars(model)), "the interface was not removed"


def test_grad_cached_step_input_ids_tensor_and_own_loss_fn():
    """Texts as a bare input_ids tensor (SigLIP is trained without an attention mask) and a loss_fn of one's own."""
    import mmcl_fast
    model = tiny_model("siglip")
    batch = make_batch("siglip", N_PAIRS)
    del batch["attention_mask"]
    _, ref_grads = reference_step(model, batch)
    model.zero_grad(set_to_none=True)
    grad_cached_step(model, batch["pixel_values"], batch["input_ids"], mmcl_fast.SigLipLoss(), 2)
    assert_grads_close(grads_of(model), ref_grads, RTOL[torch.float64], "input_ids tensor, SigLipLoss")


def test_grad_cached_step_replays_dropout():
    """With attention dropout on, the step equals the autograd step over the same chunks (images, then texts, of
    each chunk, from the same RNG state): pass 2 replays pass 1's masks."""
    model = tiny_model("siglip", attention_dropout=0.5)
    batch = make_batch("siglip", N_PAIRS)
    images, texts = towers("siglip", batch)
    chunk, seed = 3, 11

    def normalised(features):
        return features.pooler_output / features.pooler_output.norm(dim=-1, keepdim=True)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    image_parts, text_parts = [], []
    for start in range(0, N_PAIRS, chunk):
        image_parts.append(normalised(model.get_image_features(pixel_values=images[start:start + chunk])))
        text_parts.append(normalised(model.get_text_features(**rows(dict(texts), start, start + chunk))))
    logits = (torch.cat(image_parts) @ torch.cat(text_parts).T) * model.logit_scale.exp() + model.logit_bias
    signs = 2 * torch.eye(N_PAIRS, dtype=logits.dtype) - 1
    loss = -torch.nn.functional.logsigmoid(signs * logits).sum() / N_PAIRS
    loss.backward()
    chunked_grads = grads_of(model)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    grad_cached_step(model, images, texts, chunk_size=chunk, check_replay=0.0)
    assert_grads_close(grads_of(model), chunked_grads, RTOL[torch.float64], "dropout replayed")
    _, plain_grads = reference_step(model, batch)  # other masks: dropout is really on
    assert any(rel_err(plain_grads[name], chunked_grads[name]) > RTOL[torch.float32] for name in plain_grads)


# ---------------------------------------------------------------------------------------------
# Trainer: one step of ContrastiveTrainer == one step of the default Trainer path (return_loss=True)
# ---------------------------------------------------------------------------------------------

TRAIN_ROWS, MICRO_BATCH, ACCUMULATION = 6, 3, 2  # one optimizer step over two micro-batches of 3 pairs
LEARNING_RATE = 1.0  # SGD: the update is -lr * gradient (Adam's first step would hide the gradient's scale)


def _trainer_update(trainer_class, kind: str, state: dict, examples: list, out_dir, *, return_loss: bool,
                    seen: list | None = None, **overrides) -> dict:
    """Parameter update of one optimizer step of `trainer_class` from `state`; `seen` collects the micro-batches."""
    def collate(items):
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        if seen is not None:
            seen.append(batch)
        return {**batch, "return_loss": True} if return_loss else batch

    model = tiny_model(kind)
    model.load_state_dict(state)
    args = transformers.TrainingArguments(**{
        "output_dir": str(out_dir), "max_steps": 1, "per_device_train_batch_size": MICRO_BATCH,
        "gradient_accumulation_steps": ACCUMULATION, "learning_rate": LEARNING_RATE, "optim": "sgd",
        "lr_scheduler_type": "constant", "weight_decay": 0.0, "max_grad_norm": 0.0, "save_strategy": "no",
        "report_to": [], "logging_strategy": "no", "disable_tqdm": True, "use_cpu": True, "dataloader_num_workers": 0,
        "seed": 0, **overrides})
    trainer_class(model=model, args=args, train_dataset=examples, data_collator=collate).train()
    return {name: param.detach() - state[name] for name, param in model.named_parameters()}


def _examples(batch: dict) -> list:
    n = len(next(iter(batch.values())))
    return [{key: value[row] for key, value in batch.items()} for row in range(n)]


@pytest.mark.parametrize("kind", ["clip", "siglip2"])
def test_trainer_step_matches_default_trainer_step(kind, tmp_path):
    pytest.importorskip("accelerate")  # Trainer's own dependency
    state = tiny_model(kind).state_dict()
    examples = _examples(make_batch(kind, TRAIN_ROWS))
    default = _trainer_update(transformers.Trainer, kind, state, examples, tmp_path / "default", return_loss=True)
    ours = _trainer_update(ContrastiveTrainer, kind, state, examples, tmp_path / "ours", return_loss=False)
    assert any(update.abs().max() > 0 for update in default.values())
    assert_grads_close(ours, default, RTOL[torch.float64], f"{kind} Trainer update")


def test_trainer_autocast_reaches_the_towers_and_outputs_the_embeddings(tmp_path):
    """Under ``bf16=True`` the towers run in bf16 (accelerate's autocast, which on the default path wraps
    model.forward), the loss is exact on those bf16 features, and return_outputs (what evaluation asks for) gives the
    normalised embeddings."""
    pytest.importorskip("accelerate")
    model = tiny_model("clip", torch.float32)
    batch = make_batch("clip", N_PAIRS, torch.float32)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=True)
    trainer = ContrastiveTrainer(model=model, args=args)
    loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    image, text = outputs["image_embeds"], outputs["text_embeds"]
    assert image.dtype == text.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert image.shape[0] == text.shape[0] == N_PAIRS
    logits = model.logit_scale.exp().double() * image.double() @ text.double().T
    labels = torch.arange(N_PAIRS)
    cross_entropy = torch.nn.functional.cross_entropy
    expected = (cross_entropy(logits, labels) + cross_entropy(logits.T, labels)) / 2
    assert rel_err(loss, expected) <= LOSS_RTOL[torch.bfloat16]


# ---------------------------------------------------------------------------------------------
# DDP over gloo, 2 ranks: the global loss; after DDP's averaging, the single-process gradients
# ---------------------------------------------------------------------------------------------

DDP_WORLD, DDP_LOCAL, DDP_CHUNK = 2, 3, 2  # 2 ranks x 3 pairs; the cached step in chunks of 2 and 1
# find_unused_parameters per kind: True is Trainer's default for a PreTrainedModel (DDP then traverses the graph
# from the forward's outputs, which must reach logit_scale / logit_bias)
DDP_CASES = {"clip": False, "siglip": True, "siglip2": False}
JOIN_TIMEOUT_S = 240


def _ddp_worker(rank: int, world: int, work_dir: str) -> None:
    def body():
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel
        inputs = torch.load(os.path.join(work_dir, "inputs.pt"))
        results = {}
        for kind, find_unused in DDP_CASES.items():
            model = tiny_model(kind)
            model.load_state_dict(inputs[kind]["state"])
            ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
            reductions = []

            def counting_allreduce(state, bucket, reductions=reductions):
                reductions.append(bucket.index())
                return default_hooks.allreduce_hook(state, bucket)

            ddp.register_comm_hook(None, counting_allreduce)
            local = rows(inputs[kind]["batch"], rank * DDP_LOCAL, (rank + 1) * DDP_LOCAL)
            loss = model_loss(ddp, local)  # world size: the group's
            loss.backward()
            result = {"loss": loss.detach(), "grads": grads_of(model), "reductions": len(reductions)}
            model.zero_grad(set_to_none=True)
            reductions.clear()
            images, texts = towers(kind, local)
            result["cached_loss"] = grad_cached_step(ddp, images, texts, chunk_size=DDP_CHUNK)
            result["cached_grads"] = grads_of(model)
            result["cached_reductions"] = len(reductions)
            # why the wrapper's forward is used: the bare module's methods, called under DDP, are never reduced
            model.zero_grad(set_to_none=True)
            reductions.clear()
            model_loss(model, local).backward()
            result["bare_reductions"] = len(reductions)
            results[kind] = result
        return results
    run_rank(rank, world, work_dir, body, timeout_s=60)


def test_ddp_gloo_matches_single_process(tmp_path):
    inputs = {kind: {"state": tiny_model(kind).state_dict(), "batch": make_batch(kind, DDP_WORLD * DDP_LOCAL)}
              for kind in DDP_CASES}
    torch.save(inputs, tmp_path / "inputs.pt")
    per_rank = spawn_ranks(_ddp_worker, DDP_WORLD, tmp_path, timeout=JOIN_TIMEOUT_S)
    for kind in DDP_CASES:
        model = tiny_model(kind)
        model.load_state_dict(inputs[kind]["state"])
        loss, expected = reference_step(model, inputs[kind]["batch"])  # == model_loss on the whole batch
        for rank, results in enumerate(per_rank):
            got = results[kind]
            what = f"{kind} rank {rank}"
            assert rel_err(got["loss"], loss) <= RTOL[torch.float64], f"{what}: not the global loss"
            assert rel_err(got["cached_loss"], loss) <= RTOL[torch.float64], f"{what}: cached step's loss"
            float32_inside = (FLOAT32_INSIDE,) if kind == "siglip2" else ()
            assert_grads_close(got["grads"], expected, RTOL[torch.float64], f"{what} model_loss", float32_inside)
            assert_grads_close(got["cached_grads"], expected, RTOL[torch.float64], f"{what} grad_cached_step",
                               float32_inside)
            # DDP's reducer ran: one all-reduce per bucket, for the cached step too (only its last chunk syncs)
            assert got["reductions"] == got["cached_reductions"] > 0, (got["reductions"], got["cached_reductions"])
            assert got["bare_reductions"] == 0


DDP_TRAIN_SEED = 5


def _trainer_rank_main(kind: str, out_dir: str) -> None:
    """One rank of `test_trainer_under_torchrun_...`: this file run as a script by torchrun. Every rank builds the
    same state and examples; Trainer's sampler hands each rank its own micro-batches, which are saved with the
    update."""
    import torch.distributed as dist
    torch.manual_seed(DDP_TRAIN_SEED)
    state = tiny_model(kind).state_dict()
    examples = _examples(make_batch(kind, DDP_WORLD * TRAIN_ROWS))
    seen = []
    update = _trainer_update(ContrastiveTrainer, kind, state, examples, os.path.join(out_dir, "trainer"),
                             return_loss=False, seen=seen, ddp_backend="gloo")
    torch.save({"state": state, "seen": seen, "update": update},
               os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clip", "siglip2"])
def test_trainer_under_torchrun_gloo_matches_global_loss(kind, tmp_path):
    """ContrastiveTrainer in 2 DDP ranks (Trainer's own wrapping: find_unused_parameters=True, accumulation over 2
    micro-batches, no_sync on the first): the update is -lr times the mean over micro-steps of the single-process
    gradient of the loss of both ranks' micro-batches concatenated."""
    pytest.importorskip("accelerate")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(DDP_WORLD), os.path.abspath(__file__), kind, str(tmp_path)],
                          capture_output=True, text=True, timeout=JOIN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(DDP_WORLD)]
    model = tiny_model(kind)
    model.load_state_dict(per_rank[0]["state"])
    model.zero_grad(set_to_none=True)
    for step in range(ACCUMULATION):
        concatenated = {key: torch.cat([result["seen"][step][key] for result in per_rank])
                        for key in per_rank[0]["seen"][step]}
        (model(**concatenated, return_loss=True).loss / ACCUMULATION).backward()
    expected = {name: -LEARNING_RATE * grad for name, grad in grads_of(model).items()}
    for rank, result in enumerate(per_rank):
        assert_grads_close(result["update"], expected, RTOL[torch.float64], f"{kind} rank {rank}",
                           (FLOAT32_INSIDE,) if kind == "siglip2" else ())


# ---------------------------------------------------------------------------------------------
# errors name the argument; importing mmcl_fast does not import transformers
# ---------------------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    model = tiny_model("clip")
    batch = make_batch("clip", 4)
    images, texts = towers("clip", batch)
    with pytest.raises(TypeError, match="model must be"):
        model_loss(torch.nn.Linear(2, 2), batch)
    with pytest.raises(TypeError, match="batch must be a mapping"):
        model_loss(model, list(batch.values()))
    with pytest.raises(ValueError, match="batch lacks 'pixel_values'"):
        model_loss(model, {"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="batch lacks 'input_ids'"):
        model_loss(model, {"pixel_values": batch["pixel_values"]})
    with pytest.raises(ValueError, match=r"batch has key\(s\) \['labels'\]"):
        model_loss(model, {**batch, "labels": torch.arange(4)})
    with pytest.raises(ValueError, match="batch has key"):  # Siglip2's image inputs are not CLIP's
        model_loss(model, {**batch, "spatial_shapes": torch.ones(4, 2, dtype=torch.long)})
    with pytest.raises(ValueError, match="world_size=2 needs torch.distributed"):
        model_loss(model, batch, world_size=2)
    with pytest.raises(ValueError, match="world_size must be"):
        model_loss(model, batch, world_size=0)
    with pytest.raises(ValueError, match="chunk_size is required"):
        grad_cached_step(model, images, texts)
    with pytest.raises(ValueError, match="logit_scale"):
        grad_cached_step(model, images, texts, chunk_size=2, logit_scale=1.0)
    with pytest.raises(ValueError, match="pixel_values has key"):
        grad_cached_step(model, {"pixel_values": images, "input_ids": batch["input_ids"]}, texts, chunk_size=2)
    with pytest.raises(TypeError, match="text_batch must be"):
        grad_cached_step(model, images, batch["input_ids"].tolist(), chunk_size=2)
    with pytest.raises(TypeError, match="model must be"):
        grad_cached_step(torch.nn.Linear(2, 2), images, texts, chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size"):  # raised inside mmcl_fast.train: the interface comes off
        grad_cached_step(model, images, texts, chunk_size=0)
    assert not {"forward", "encode_image", "encode_text"} & set(vars(model))


def test_import_mmcl_fast_does_not_import_transformers():
    code = ("import sys, mmcl_fast, mmcl_fast.integrations, mmcl_fast.train; "
            "print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


if __name__ == "__main__":  # a rank of test_trainer_under_torchrun_gloo_matches_global_loss
    _trainer_rank_main(*sys.argv[1:3])
