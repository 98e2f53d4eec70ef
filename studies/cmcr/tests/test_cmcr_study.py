"""The C-MCR study (studies.cmcr): the synthetic world, the contrastive spaces, the run and its command line."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mmcl_fast.cmcr import modality_gap
from studies.cmcr import cli
from studies.cmcr.spaces import ContrastiveSpace, SpaceConfig
from studies.cmcr.world import ThreeModalityWorld, WorldConfig
from tests.tolerances import assert_rel_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------- world, spaces

def test_world_triples_share_semantics_and_modalities_differ():
    world = ThreeModalityWorld(WorldConfig(n_semantic=3, n_specific=2), seed=4)
    triples = world.sample(50, torch.Generator().manual_seed(0))
    assert triples.s.shape == (50, 3) and triples.a.shape == triples.b.shape == triples.c.shape == (50, 5)
    again = ThreeModalityWorld(WorldConfig(n_semantic=3, n_specific=2), seed=4).sample(
        50, torch.Generator().manual_seed(0))
    assert torch.equal(triples.a, again.a) and torch.equal(triples.c, again.c)
    assert not torch.allclose(triples.a, triples.b)
    for mixer in world.mixers.values():  # each layer invertible, condition number <= 4
        for weight in mixer.weights.double():
            sv = torch.linalg.svdvals(weight)
            assert sv.max() / sv.min() <= 4 * (1 + 1e-5)
    with pytest.raises(ValueError, match="n_semantic must be a positive int"):
        WorldConfig(n_semantic=0)


def test_space_embeddings_carry_a_fixed_modality_gap():
    cfg = SpaceConfig(dim=8, hidden=(16,), gap_offset=0.7)
    space = ContrastiveSpace(("a", "b"), 5, cfg)
    x = torch.randn(200, 5)
    ea, eb = space.encode("a", x), space.encode("b", x)
    assert_rel_close(ea.norm(dim=1), torch.ones(200), 1e-6, "norms")
    # every A embedding has the same component 0.7 / sqrt(1 + 0.7²) along u_A and none along u_B
    along = ea @ space.directions.T
    assert_rel_close(along[:, 0], torch.full((200,), 0.7 / math.sqrt(1.49)), 1e-5, "u_A component")
    assert along[:, 1].abs().max() < 1e-5
    assert modality_gap(ea, eb) > 0.8


# --------------------------------------------------------------------------------------------- study and CLI

def test_study_writes_every_result_key(tmp_path):
    code = cli.main(["--quick", "--seed", "3", "--steps", "3", "--space-steps", "3", "--n-test", "50",
                     "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for direction in ("a_to_c", "c_to_a"):
        assert set(results["retrieval"][direction]) >= {"r1", "r5", "map", "chance_r1"}
        assert set(results["oracle"][direction]) >= {"r1", "r5", "map"}
    for name in ("no_enhancement", "no_noise", "no_intra"):
        assert set(results["ablations"][name]["a_to_c"]) >= {"r1", "r5", "map"}
    assert results["retrieval"]["a_to_c"]["chance_r1"] == pytest.approx(1 / 50)
    assert set(results["modality_gap"]["before"]) == {"space_ab_a_b", "space_bc_b_c"}
    assert (tmp_path / "cmcr.png").stat().st_size > 0


def test_cli_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--steps", "0"])
    assert exc.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_meets_acceptance(tmp_path):
    """The committed quick run's claim, re-run: A→C R@1 >= 20x chance and >= 50% of the paired oracle."""
    assert cli.main(["--quick", "--seed", "0", "--no-progress", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    r1 = results["retrieval"]["a_to_c"]["r1"]
    assert r1 >= 20 * results["retrieval"]["a_to_c"]["chance_r1"]
    assert r1 >= 0.5 * results["oracle"]["a_to_c"]["r1"]


def test_help_runs_from_the_repository_root():
    done = subprocess.run([sys.executable, "-m", "studies.cmcr", "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: python -m studies.cmcr")
    for flag in ("--quick", "--seed", "--steps", "--n-test", "--backend", "--threads", "--out", "--no-progress"):
        assert flag in done.stdout, flag
