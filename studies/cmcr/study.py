"""The C-MCR reproduction on the synthetic three-modality world: one run → the results.json document.

1. Build the world (seeded), train space 1 on (A, B) pairs and space 2 on (B, C) pairs (`spaces.train_space`).
2. Draw disjoint sets: B samples for C-MCR, unpaired A and C memories, (A, C) pairs for the oracle, and held-out
   (A, B, C) triples for the test. C-MCR sees only the first two.
3. Fit the connector (paper settings), the ablations (no semantic enhancement: the nearest memory item instead of
   the softmax mix; no noise; no intra-space loss; text-only: no memory at all) and the paired-data oracle (the
   same projectors trained on true (A, C) pairs).
4. Evaluate A→C and C→A retrieval on the test triples, and the modality gaps before and after the connection.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from mmcl_fast.backends import resolve_backend
from mmcl_fast.bench.machine import environment as machine_environment
from mmcl_fast.cmcr import CMCRConfig, CMCRConnector, FitConfig, modality_gap, retrieval_metrics

from .spaces import SpaceConfig, train_space
from .world import ThreeModalityWorld, WorldConfig

# Every variant: its name, what it changes in CMCRConfig, and a description for the table.
VARIANTS = {
    "cmcr": ({}, "C-MCR (paper settings)"),
    "no_enhancement": ({"retrieval": "nearest"}, "no semantic enhancement: nearest memory item, no softmax mix"),
    "no_noise": ({"noise_variance": 0.0}, "no noise injection"),
    "no_intra": ({"intra_weight": 0.0}, "no intra-space L2 alignment"),
    "text_only": ({"retrieval": "none"}, "no memory: B–B InfoNCE only"),
}
ABLATIONS = ("no_enhancement", "no_noise", "no_intra", "text_only")

# The quick preset (CPU, minutes) and the paper-sized one (a GPU: batch 4096, projector width 1024, larger pools).
# Quick: a 6-dim semantic latent with 1000 test triples (chance R@1 = 0.1%), spaces of size 16 trained for 600
# steps at batch 512, projectors of width 256 trained for 200 steps at batch 512 on 8192 B samples.
PRESETS = {
    "quick": dict(world=dict(n_semantic=6, n_specific=4),
                  space=dict(dim=16, hidden=(128, 128), steps=600, batch=512, lr=2e-3),
                  method=dict(hidden=256),
                  fit=dict(steps=200, batch=512, lr=1e-3),
                  data=dict(n_shared=8192, n_memory=8192, n_pairs=8192, n_test=1000), threads=1),
    "paper": dict(world=dict(n_semantic=6, n_specific=4),
                  space=dict(dim=64, hidden=(512, 512), steps=5000, batch=2048, lr=1e-3),
                  method=dict(hidden=1024),
                  fit=dict(steps=2000, batch=4096, lr=1e-3),
                  data=dict(n_shared=65536, n_memory=65536, n_pairs=65536, n_test=5000), threads=None),
}


@dataclasses.dataclass
class StudyConfig:
    world: WorldConfig
    space: SpaceConfig
    method: CMCRConfig
    fit: FitConfig
    n_shared: int = 8192
    n_memory: int = 8192
    n_pairs: int = 8192
    n_test: int = 1000
    seed: int = 0
    variants: tuple[str, ...] = ("cmcr", *ABLATIONS)

    def __post_init__(self):
        for name in ("n_shared", "n_memory", "n_pairs", "n_test"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an int >= 2, got {value!r}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    def as_dict(self) -> dict:
        return {"world": dataclasses.asdict(self.world), "space": self.space.as_dict(),
                "method": dataclasses.asdict(self.method), "fit": dataclasses.asdict(self.fit),
                "n_shared": self.n_shared, "n_memory": self.n_memory, "n_pairs": self.n_pairs,
                "n_test": self.n_test, "seed": self.seed, "variants": list(self.variants)}


def preset_config(name: str, seed: int = 0, backend: str = "auto", **overrides) -> StudyConfig:
    """The StudyConfig of a preset; `overrides` may set fit_steps, fit_batch, space_steps, n_test."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
    preset = PRESETS[name]
    space = dict(preset["space"], backend=backend)
    fit = dict(preset["fit"], seed=seed, backend=backend)
    data = dict(preset["data"])
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "fit_steps":
            fit["steps"] = value
        elif key == "fit_batch":
            fit["batch"] = value
        elif key == "space_steps":
            space["steps"] = value
        elif key in data:
            data[key] = value
        else:
            raise ValueError(f"unknown override {key!r}")
    return StudyConfig(world=WorldConfig(**preset["world"]), space=SpaceConfig(**space),
                       method=CMCRConfig(**preset["method"]), fit=FitConfig(**fit), seed=seed, **data)



def run_study(cfg: StudyConfig, on_phase: Callable[[str], None] | None = None) -> dict:
    """Run every phase on the CPU (these models are small) and return the results.json document."""
    phase = on_phase or (lambda text: None)
    resolved = resolve_backend(cfg.fit.backend, torch.device("cpu"), torch.float32)
    timing: dict[str, float] = {}
    start = time.perf_counter()
    world = ThreeModalityWorld(cfg.world, seed=cfg.seed)

    phase("training space 1 (A–B)")
    space_ab = train_space(world, ("a", "b"), cfg.space, seed=cfg.seed * 1000 + 1)
    phase("training space 2 (B–C)")
    space_bc = train_space(world, ("b", "c"), cfg.space, seed=cfg.seed * 1000 + 2)
    timing["spaces_s"] = round(space_ab.seconds + space_bc.seconds, 2)

    data_gen = torch.Generator().manual_seed(cfg.seed * 1000 + 3)
    shared = world.sample(cfg.n_shared, data_gen)     # C-MCR uses only .b
    memory_a = world.sample(cfg.n_memory, data_gen)   # only .a: unpaired with anything else
    memory_c = world.sample(cfg.n_memory, data_gen)   # only .c
    pairs = world.sample(cfg.n_pairs, data_gen)       # the oracle's true (A, C) pairs
    test = world.sample(cfg.n_test, data_gen)
    with torch.no_grad():
        emb = {"shared_1": space_ab.encode("b", shared.b), "shared_2": space_bc.encode("b", shared.b),
               "memory_a": space_ab.encode("a", memory_a.a), "memory_c": space_bc.encode("c", memory_c.c),
               "pairs_a": space_ab.encode("a", pairs.a), "pairs_c": space_bc.encode("c", pairs.c),
               "test_a": space_ab.encode("a", test.a), "test_b1": space_ab.encode("b", test.b),
               "test_b2": space_bc.encode("b", test.b), "test_c": space_bc.encode("c", test.c)}

    spaces = {
        "ab": {"a_to_b": retrieval_metrics(emb["test_a"], emb["test_b1"]),
               "modality_gap": modality_gap(emb["test_a"], emb["test_b1"]),
               "logit_scale": float(space_ab.logit_scale), "loss_history": space_ab.history,
               "train_s": round(space_ab.seconds, 2)},
        "bc": {"b_to_c": retrieval_metrics(emb["test_b2"], emb["test_c"]),
               "modality_gap": modality_gap(emb["test_b2"], emb["test_c"]),
               "logit_scale": float(space_bc.logit_scale), "loss_history": space_bc.history,
               "train_s": round(space_bc.seconds, 2)},
    }

    dim_1, dim_2 = cfg.space.dim, cfg.space.dim
    variants: dict[str, dict] = {}
    for name in ("oracle", *cfg.variants):
        phase(f"fitting {name}")
        if name == "oracle":
            connector = CMCRConnector(dim_1, dim_2, cfg.method)
            connector.fit_pairs(emb["pairs_a"], emb["pairs_c"], cfg.fit)
        else:
            method = dataclasses.replace(cfg.method, **VARIANTS[name][0])
            connector = CMCRConnector(dim_1, dim_2, method)
            connector.fit(emb["shared_1"], emb["shared_2"], emb["memory_a"], emb["memory_c"], cfg.fit)
        a, c = connector.encode_a(emb["test_a"]), connector.encode_c(emb["test_c"])
        b1, b2 = connector.encode_b(emb["test_b1"], 1), connector.encode_b(emb["test_b2"], 2)
        variants[name] = {
            "a_to_c": retrieval_metrics(a, c), "c_to_a": retrieval_metrics(c, a),
            "modality_gap": {"a_c": modality_gap(a, c), "a_b": modality_gap(a, b1), "b_c": modality_gap(b2, c),
                             "b_b": modality_gap(b1, b2)},
            "loss_history": connector.history, "train_s": round(connector.seconds, 2),
            "description": "the same projectors trained on true (A, C) pairs" if name == "oracle"
            else VARIANTS[name][1],
        }
        timing[f"{name}_s"] = round(connector.seconds, 2)
    timing["total_s"] = round(time.perf_counter() - start, 2)

    main, oracle = variants.get("cmcr"), variants["oracle"]
    results = {
        "config": {**cfg.as_dict(), "resolved_backend": resolved, "threads": torch.get_num_threads()},
        "spaces": spaces,
        "oracle": {k: oracle[k] for k in ("a_to_c", "c_to_a", "modality_gap")},
        "ablations": {name: {k: variants[name][k] for k in ("a_to_c", "c_to_a", "modality_gap", "description")}
                      for name in cfg.variants if name != "cmcr"},
        "modality_gap": {"before": {"space_ab_a_b": spaces["ab"]["modality_gap"],
                                    "space_bc_b_c": spaces["bc"]["modality_gap"]},
                         "after": {name: v["modality_gap"] for name, v in variants.items()}},
        "loss_history": {name: v["loss_history"] for name, v in variants.items()},
        "timing": {**timing, **{f"{name}_s": v["train_s"] for name, v in variants.items()}},
        "environment": machine_environment(),
    }
    if main is not None:
        results["retrieval"] = {k: main[k] for k in ("a_to_c", "c_to_a")}
        r1, chance, oracle_r1 = main["a_to_c"]["r1"], main["a_to_c"]["chance_r1"], oracle["a_to_c"]["r1"]
        results["acceptance"] = {
            "a_to_c_r1_over_chance": r1 / chance, "a_to_c_r1_over_oracle": r1 / oracle_r1 if oracle_r1 else None,
            "passed": bool(r1 >= 20 * chance and r1 >= 0.5 * oracle_r1),
            "criteria": "A→C R@1 >= 20x chance and >= 50% of the paired oracle's"}
    return results
