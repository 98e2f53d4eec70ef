"""The digits example's run: a small open_clip CLIP trained from scratch with `mmcl_fast.train.grad_cached_step`.

One process, or several under torchrun (gloo on CPU, NCCL on CUDA; DDP, and the loss's exact cross-rank form:
each rank encodes its share of the global batch, the loss sees the whole batch). Each step: a global batch of
`batch_size` pairs (augmented images, one caption drawn per image), `grad_cached_step` with `chunk_size` rows
per encoder call, AdamW with warm-up + cosine decay, logit scale clamped to ln(100) as in open_clip. Writes a
JSONL log, a checkpoint (`--resume` continues it bit for bit: data order and augmentation derive from the seed
and the step), a zero-shot evaluation on the held-out split and results.json.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

import mmcl_fast
from mmcl_fast.bench.machine import cpu_model
from mmcl_fast.train import grad_cached_step

from .data import Dataset, EpochSampler, augment, load_csv_dataset, load_digits_dataset, normalize

# A tiny open_clip CLIP (random init): ViT over 16x16 images in 4x4 patches, 2-layer text transformer.
# (12 tokens hold the longest templated caption with its start/end tokens.)
TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}
QUICK = {"steps": 300, "batch_size": 256, "chunk_size": 64, "threads": 1}
FULL = {"steps": 600, "batch_size": 512, "chunk_size": 128, "threads": None}


@dataclass
class TrainConfig:
    data: str = "digits"
    out: str = "out/train"
    steps: int = FULL["steps"]
    batch_size: int = FULL["batch_size"]   # global, over all ranks
    chunk_size: int = FULL["chunk_size"]   # rows per encoder call on each rank
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 15
    loss: str = "clip"                     # clip | siglip
    precision: str = "fp32"                # fp32 | bf16 (autocast)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0                    # 0: evaluate at the end only
    checkpoint_every: int = 50
    resume: bool = False
    stop_at: int | None = None             # leave after this step (a checkpoint to --resume), e.g. a time limit
    progress: bool = True
    device: str | None = None
    model: dict = field(default_factory=lambda: json.loads(json.dumps(TINY_CLIP)))


# ---------------------------------------------------------------------------------------------
# model, loss, tokenizer
# ---------------------------------------------------------------------------------------------

def build_model(model_cfg: dict, siglip: bool) -> nn.Module:
    from open_clip.model import CLIP
    extra = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if siglip else {}
    return CLIP(**model_cfg, **extra)


def build_loss(kind: str, rank: int, world: int) -> nn.Module:
    if kind == "siglip":
        return mmcl_fast.SigLipLoss(rank=rank, world_size=world)
    return mmcl_fast.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)


class CaptionTokens:
    """open_clip's BPE tokenizer (bundled vocabulary, no download), memoised per caption."""

    def __init__(self, context_length: int):
        from open_clip.tokenizer import SimpleTokenizer
        self.tokenizer = SimpleTokenizer(context_length=context_length)
        self.cache: dict[str, Tensor] = {}

    def __call__(self, captions: list[str]) -> Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            for caption, tokens in zip(missing, self.tokenizer(missing)):
                self.cache[caption] = tokens
        return torch.stack([self.cache[c] for c in captions])


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def _encode_images(model, images: Tensor, device, batch: int = 512) -> Tensor:
    return torch.cat([model.encode_image(normalize(images[s:s + batch]).to(device), normalize=True)
                      for s in range(0, images.shape[0], batch)])


@torch.no_grad()
def evaluate(model, data: Dataset, tokens: CaptionTokens, device) -> dict:
    """Zero-shot accuracy (class prompts → mean text embedding → nearest class) or, without classes
    (zero_shot_accuracy None), held-out image→caption retrieval top-1 among the held-out captions."""
    was_training = model.training
    model.eval()
    image_features = _encode_images(model, data.test.images, device)
    result = {}
    if data.class_prompts is not None:
        class_features = []
        for prompts in data.class_prompts:
            prompt_features = model.encode_text(tokens(prompts).to(device), normalize=True)
            class_features.append(nn.functional.normalize(prompt_features.mean(0), dim=0))
        predicted = (image_features @ torch.stack(class_features).T).argmax(1).cpu()
        result["zero_shot_accuracy"] = (predicted == data.test.labels).float().mean().item()
        return result
    result["zero_shot_accuracy"] = None  # no classes in a CSV of captions: held-out retrieval instead
    captions = [candidates[0] for candidates in data.test.captions]
    text_features = torch.cat([model.encode_text(tokens(captions[s:s + 512]).to(device), normalize=True)
                               for s in range(0, len(captions), 512)])
    nearest = (image_features @ text_features.T).argmax(1).tolist()
    # a hit is the image's own caption text (identical captions of other images count: they say the same)
    result["retrieval_top1"] = sum(captions[j] == captions[i] for i, j in enumerate(nearest)) / len(captions)
    model.train(was_training)
    return result


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def _peak_mib(device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # open_clip's grouping: no weight decay on gains, biases and the logit scale/bias
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "logit_" in name else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def load_data(cfg: TrainConfig) -> Dataset:
    image_size = cfg.model["vision_cfg"]["image_size"]
    if cfg.data == "digits":
        return load_digits_dataset(image_size)
    if cfg.data.startswith("csv:"):
        return load_csv_dataset(cfg.data[4:], image_size)
    raise ValueError(f"--data must be 'digits' or 'csv:PATH' (open_clip's CSV: filepath and title columns), "
                     f"got {cfg.data!r}")


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def _progress(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                   TimeRemainingColumn())
    bar.start()
    bar.add_task("train", total=total, completed=start, status="")
    return bar


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the training described by cfg; returns the results that rank 0 writes to results.json."""
    rank, world = _distributed()
    device = torch.device(cfg.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                                         if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or world) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of ranks ({world})")
    local_batch = cfg.batch_size // world
    os.makedirs(cfg.out, exist_ok=True)
    checkpoint_path = os.path.join(cfg.out, "checkpoint.pt")
    log_path = os.path.join(cfg.out, "log.jsonl")

    data = load_data(cfg)
    tokens = CaptionTokens(cfg.model["text_cfg"]["context_length"])
    sampler = EpochSampler(data.train.images.shape[0], cfg.batch_size, cfg.seed)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, cfg.loss == "siglip").to(device)
    optimizer = _optimizer(model, cfg)
    start_step, elapsed = 0, 0.0
    if cfg.resume:
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if state["config"]["batch_size"] != cfg.batch_size or state["config"]["data"] != cfg.data:
            raise ValueError(f"--resume: the checkpoint was trained with --data {state['config']['data']} "
                             f"--batch-size {state['config']['batch_size']}; pass the same")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, elapsed = state["step"], state["seconds"]
    elif rank == 0 and os.path.exists(log_path):
        os.remove(log_path)
    ddp_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loss_fn = build_loss(cfg.loss, rank, world)
    amp = None
    if cfg.precision == "bf16":
        amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731

    log = open(log_path, "a") if rank == 0 else None
    bar = _progress(cfg.progress and rank == 0, cfg.steps, start_step)
    model.train()
    started, loss_value = time.perf_counter(), float("nan")
    try:
        last = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
        for step in range(start_step, last):
            # The global batch is augmented identically on every rank (it is small next to the encoders' work), so
            # that W ranks train on exactly the pairs one process would; each rank then keeps its share.
            index = sampler.global_batch(step)
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009)
            images = augment(data.train.images[index], generator)
            picks = torch.randint(0, 1 << 30, (len(index),), generator=generator).tolist()
            share = slice(rank * local_batch, (rank + 1) * local_batch)
            images = normalize(images[share]).to(device)
            captions = [data.train.captions[i][pick % len(data.train.captions[i])]
                        for i, pick in zip(index[share].tolist(), picks[share])]
            texts = tokens(captions).to(device)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss = grad_cached_step(ddp_model, images, texts, loss_fn, cfg.chunk_size, autocast=amp)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            if world > 1:  # each rank holds its share of the loss; their mean is the global batch's loss
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= world
            loss_value = loss.item()
            done = step + 1
            if log is not None and (done % cfg.log_every == 0 or done == cfg.steps):
                seconds = elapsed + time.perf_counter() - started
                log.write(json.dumps({"step": done, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                                      "logit_scale": model.logit_scale.exp().item(), "seconds": round(seconds, 3),
                                      "samples_per_second": cfg.batch_size * (done - start_step)
                                      / max(1e-9, time.perf_counter() - started)}) + "\n")
                log.flush()
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps and rank == 0:
                log.write(json.dumps({"step": done, "eval": evaluate(model, data, tokens, device)}) + "\n")
            if done % cfg.checkpoint_every == 0 or done == last:
                _save_checkpoint(checkpoint_path, model, optimizer, cfg, done,
                                 elapsed + time.perf_counter() - started, rank)
            if bar is not None:
                bar.update(bar.task_ids[0], completed=done, status=f"loss {loss_value:.3f}")
    finally:
        if bar is not None:
            bar.stop()
    seconds = elapsed + time.perf_counter() - started
    results = None
    if last < cfg.steps:  # stopped early on purpose: the checkpoint is the result
        if world > 1:
            dist.destroy_process_group()
        if log is not None:
            log.close()
        return {"stopped_at": last, "checkpoint": checkpoint_path}
    if rank == 0:
        metrics = evaluate(model, data, tokens, device)
        log.write(json.dumps({"step": cfg.steps, "eval": metrics}) + "\n")
        log.close()
        results = {**metrics, "batch_size": cfg.batch_size, "chunk_size": cfg.chunk_size, "steps": cfg.steps,
                   "seconds": round(seconds, 2), "peak_mib": _peak_mib(device), "final_loss": loss_value,
                   "world_size": world, "data": data.name, "loss": cfg.loss, "precision": cfg.precision,
                   "seed": cfg.seed, "resumed_from_step": start_step if cfg.resume else None,
                   "train_images": data.train.images.shape[0], "test_images": data.test.images.shape[0],
                   "model": cfg.model, "machine": _machine(), "torch": torch.__version__}
        with open(os.path.join(cfg.out, "results.json"), "w") as handle:
            json.dump(results, handle, indent=2)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return results


def _save_checkpoint(path, model, optimizer, cfg, step, seconds, rank) -> None:
    if rank != 0:
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "seconds": seconds,
             "config": asdict(cfg)}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def _machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores"
