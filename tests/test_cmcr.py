"""C-MCR (mmcl_fast.cmcr): streamed semantic enhancement, losses, projector, connector, metrics. The synthetic
reproduction (world, spaces, the run) is tested in studies/cmcr/tests."""
import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import GRAD_RTOL, LOSS_RTOL, assert_rel_close

from mmcl_fast.cmcr.connector import (CMCRConfig, CMCRConnector, FitConfig, Projector, cmcr_loss, inter_space_loss,
                                      intra_space_loss, nearest_neighbour)
from mmcl_fast.cmcr.enhance import add_noise, semantic_enhance
from mmcl_fast.cmcr.evaluate import modality_gap, ranks, retrieval_metrics

METHODS = ("primitive", "sdpa")


pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(n, d, dtype=torch.float32):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)


def _enhance_reference(queries, memory, temperature):
    """Dense float64 softmax retrieval on the same (rounded) inputs."""
    q, m = queries.double(), memory.double()
    return torch.softmax(q @ m.T / temperature, dim=1) @ m


# --------------------------------------------------------------------------------------------- enhancement

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (7, 13, 3), (257, 1031, 16), (64, 4099, 33)])
def test_enhance_matches_float64_reference_fp32(method, n, m, d):
    queries, memory = _unit(n, d), _unit(m, d)
    out = semantic_enhance(queries, memory, 0.01, method=method)
    assert out.shape == (n, d) and out.dtype == torch.float32
    assert_rel_close(out, _enhance_reference(queries, memory, 0.01), LOSS_RTOL[torch.float32], "enhanced")


@pytest.mark.parametrize("method", METHODS)
def test_enhance_matches_float64_reference_fp64_and_other_temperatures(method):
    for temperature in (0.003, 0.05, 1.0):
        queries, memory = _unit(33, 8, torch.float64), _unit(500, 8, torch.float64)
        out = semantic_enhance(queries, memory, temperature, method=method)
        assert_rel_close(out, _enhance_reference(queries, memory, temperature), LOSS_RTOL[torch.float64],
                         f"enhanced (tau={temperature})")


def test_enhance_primitive_on_the_torch_backend_and_unnormalised_inputs():
    queries, memory = 3 * torch.randn(50, 6), 2 * torch.randn(3000, 6)  # logits up to ~±3000: needs the LSE shift
    out = semantic_enhance(queries, memory, 0.01, method="primitive", backend="torch")
    assert torch.isfinite(out).all()
    assert_rel_close(out, _enhance_reference(queries, memory, 0.01), LOSS_RTOL[torch.float32], "enhanced")


def test_enhance_sdpa_gradients_match_float64_reference():
    queries, memory = _unit(40, 8).requires_grad_(), _unit(300, 8).requires_grad_()
    weights = torch.randn(40, 8)
    (semantic_enhance(queries, memory, 0.05, method="sdpa") * weights).sum().backward()
    q64, m64 = queries.detach().double().requires_grad_(), memory.detach().double().requires_grad_()
    (_enhance_reference(q64, m64, 0.05) * weights.double()).sum().backward()
    assert_rel_close(queries.grad, q64.grad, GRAD_RTOL[torch.float32], "d queries")
    assert_rel_close(memory.grad, m64.grad, GRAD_RTOL[torch.float32], "d memory")


def test_enhance_primitive_refuses_to_drop_gradients():
    with pytest.raises(ValueError, match="does not backpropagate"):
        semantic_enhance(_unit(4, 3).requires_grad_(), _unit(5, 3), method="primitive")
    with torch.no_grad():  # fine without autograd
        semantic_enhance(_unit(4, 3).requires_grad_(), _unit(5, 3), method="primitive")


def _enhance_rss_growth(method: str, n: int) -> int:
    from rss import peak_rss_growth
    probe = peak_rss_growth(f"""
        import torch
        from mmcl_fast.cmcr.enhance import semantic_enhance
        torch.set_num_threads(1)
        def make_inputs(n):
            return [torch.nn.functional.normalize(torch.randn(n, 16), dim=1) for _ in range(2)]
        def step(inputs):
            with torch.no_grad():
                semantic_enhance(inputs[0], inputs[1], 0.01, method="{method}")
    """, n=n)
    dense = n * n * 4
    growth = probe["growth_bytes"]
    print(f"semantic_enhance({method}) N=M={n} D=16: peak RSS growth {growth / 2**20:.1f} MiB "
          f"(one N x M fp32 matrix: {dense / 2**20:.0f} MiB)")
    return growth


@pytest.mark.parametrize("method", ["sdpa", pytest.param("primitive", marks=pytest.mark.slow)])
def test_enhance_no_quadratic_memory(method):
    """N = M = 16384, D = 16 in a fresh process: peak RSS growth far below one N x M fp32 matrix (1 GiB).
    Measured here: sdpa ~1 MiB (the flash kernel's blocks), primitive ~40 MiB (a 4 MiB tile plus the fused
    kernel's working set; ~30 s on 2 busy cores at D = 16, hence slow)."""
    n = 16384
    growth = _enhance_rss_growth(method, n)
    assert growth < n * n * 4 / 8, f"peak RSS growth {growth / 2**20:.0f} MiB: an N x M buffer was allocated"


def test_add_noise_has_the_requested_variance():
    d, variance = 512, 0.004
    emb = _unit(4000, d)
    noisy = add_noise(emb, variance, generator=torch.Generator().manual_seed(0))
    assert_rel_close(noisy.norm(dim=1), torch.ones(4000), 1e-6, "norms")
    # e + ε with ||e|| = 1 and E||ε||² = d·variance: the cosine to e concentrates at 1 / sqrt(1 + d·variance)
    cos = (noisy * emb).sum(1).double()
    assert abs(cos.mean().item() - 1 / math.sqrt(1 + d * variance)) < 0.01
    assert torch.equal(add_noise(emb, 0.0), F.normalize(emb, dim=1))
    again = add_noise(emb, variance, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)


@pytest.mark.parametrize("call, match", [
    (lambda: semantic_enhance(_unit(4, 3), _unit(5, 4)), "same feature size"),
    (lambda: semantic_enhance(_unit(4, 3), torch.empty(0, 3)), "memory is an empty batch"),
    (lambda: semantic_enhance(torch.empty(0, 3), _unit(5, 3)), "queries is an empty batch"),
    (lambda: semantic_enhance(_unit(4, 3), _unit(5, 3), 0.0), "temperature must be a positive"),
    (lambda: semantic_enhance(_unit(4, 3), _unit(5, 3), method="dense"), "method must be one of"),
    (lambda: semantic_enhance(_unit(4, 3), _unit(5, 3, torch.float64)), "same dtype"),
    (lambda: semantic_enhance(_unit(4, 3)[0], _unit(5, 3)), "queries must be a 2-D"),
    (lambda: add_noise(_unit(4, 3), -1.0), "variance must be a non-negative"),
])
def test_enhance_bad_inputs_raise(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_nearest_neighbour_matches_dense_argmax():
    queries, memory = _unit(2500, 5), _unit(700, 5)
    expected = memory[(queries.double() @ memory.double().T).argmax(1)]
    assert torch.equal(nearest_neighbour(queries, memory, block_rows=1000), expected)


# --------------------------------------------------------------------------------------------- losses

def _clip_reference(x, y, scale):
    logits = scale * x @ y.T
    labels = torch.arange(x.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _cmcr_reference(s1, s2, p1, p2, temperature, intra_weight):
    inter = _clip_reference(s1, s2, 1 / temperature) + _clip_reference(p1, p2, 1 / temperature)
    intra = (s1 - p1).square().sum(1).mean() + (s2 - p2).square().sum(1).mean()
    return inter + intra_weight * intra


@pytest.mark.parametrize("n,d", [(1, 3), (7, 16), (130, 5)])
@pytest.mark.parametrize("intra_weight", [0.0, 0.1, 2.5])
def test_cmcr_loss_and_gradients_match_float64_reference(n, d, intra_weight):
    inputs = [_unit(n, d).requires_grad_() for _ in range(4)]
    parts = cmcr_loss(*inputs, temperature=0.01, intra_weight=intra_weight)
    parts["loss"].backward()
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    expected = _cmcr_reference(*ref_inputs, 0.01, intra_weight)
    expected.backward()
    assert_rel_close(parts["loss"], expected, LOSS_RTOL[torch.float32], "loss")
    for k, (t, r) in enumerate(zip(inputs, ref_inputs)):
        assert_rel_close(t.grad, r.grad, GRAD_RTOL[torch.float32], f"grad of input {k}")
    s1, s2, p1, p2 = (t.detach().double() for t in inputs)
    assert_rel_close(parts["inter_shared"], _clip_reference(s1, s2, 100.0), LOSS_RTOL[torch.float32], "shared")
    assert_rel_close(parts["inter_pseudo"], _clip_reference(p1, p2, 100.0), LOSS_RTOL[torch.float32], "pseudo")


def test_losses_in_float64_and_without_pseudo_pairs():
    s1, s2, p1, p2 = (_unit(20, 4, torch.float64) for _ in range(4))
    shared, pseudo = inter_space_loss(s1, s2, p1, p2, 0.07)
    assert_rel_close(shared, _clip_reference(s1, s2, 1 / 0.07), LOSS_RTOL[torch.float64], "shared")
    assert_rel_close(pseudo, _clip_reference(p1, p2, 1 / 0.07), LOSS_RTOL[torch.float64], "pseudo")
    intra = intra_space_loss(s1, p1, s2, p2)
    expected = ((s1 - p1) ** 2).sum(1).mean() + ((s2 - p2) ** 2).sum(1).mean()
    assert_rel_close(intra, expected, LOSS_RTOL[torch.float64], "intra")
    only = cmcr_loss(s1, s2)
    assert_rel_close(only["loss"], _clip_reference(s1, s2, 100.0), LOSS_RTOL[torch.float64], "text-only loss")
    assert only["inter_pseudo"] == 0 and only["intra"] == 0


@pytest.mark.parametrize("call, match", [
    (lambda: inter_space_loss(_unit(5, 3), _unit(5, 4)), "same feature size"),
    (lambda: inter_space_loss(_unit(5, 3), _unit(6, 3)), "paired rows"),
    (lambda: inter_space_loss(_unit(5, 3), _unit(5, 3), _unit(5, 3)), "both pseudo_1 and pseudo_2"),
    (lambda: inter_space_loss(_unit(5, 3), _unit(5, 3), temperature=-1.0), "temperature must be"),
    (lambda: intra_space_loss(_unit(5, 3), _unit(4, 3), _unit(5, 3), _unit(5, 3)), "paired rows"),
    (lambda: cmcr_loss(*(_unit(5, 3) for _ in range(4)), intra_weight=-0.1), "intra_weight must be"),
])
def test_loss_bad_inputs_raise(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# --------------------------------------------------------------------------------------------- projector, connector

@pytest.mark.parametrize("dim_in,dim_out,hidden", [(16, 16, 1024), (5, 3, 7), (1, 1, 1)])
def test_projector_shapes_and_unit_outputs(dim_in, dim_out, hidden):
    projector = Projector(dim_in, dim_out, hidden)
    kinds = [type(layer).__name__ for layer in projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert projector[0].weight.shape == (hidden, dim_in) and projector[3].weight.shape == (dim_out, hidden)
    out = projector(torch.randn(9, dim_in))
    assert out.shape == (9, dim_out)
    assert_rel_close(out.norm(dim=1), torch.ones(9), 1e-6, "norms")
    with pytest.raises(ValueError, match="x has 4 features but this projector takes"):
        Projector(3, 2, 8)(torch.randn(5, 4))
    assert Projector(16, 8).dim_out == 8 and Projector(16, 8)[0].out_features == 1024  # paper width by default


def _toy_embeddings(n, d, generator):
    return F.normalize(torch.randn(n, d, generator=generator), dim=1)


def test_connector_trains_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    b1, b2 = _toy_embeddings(300, 6, g), _toy_embeddings(300, 5, g)
    mem_a, mem_c = _toy_embeddings(200, 6, g), _toy_embeddings(150, 5, g)
    connector = CMCRConnector(6, 5, CMCRConfig(hidden=32, out_dim=4))
    connector.fit(b1, b2, mem_a, mem_c, FitConfig(steps=20, batch=64, seed=3))
    assert len(connector.history) >= 1 and all(math.isfinite(v) for _, v in connector.history)
    queries_a, queries_c = _toy_embeddings(10, 6, g), _toy_embeddings(10, 5, g)
    out_a, out_c = connector.encode_a(queries_a), connector.encode_c(queries_c)
    assert out_a.shape == (10, 4) and out_c.shape == (10, 4)
    loaded = CMCRConnector.load(connector.save(tmp_path / "cmcr.pt"))
    assert torch.equal(loaded.encode_a(queries_a), out_a) and torch.equal(loaded.encode_c(queries_c), out_c)
    assert loaded.config == connector.config
    # the same seed gives the same projectors
    again = CMCRConnector(6, 5, CMCRConfig(hidden=32, out_dim=4)).fit(b1, b2, mem_a, mem_c,
                                                                      FitConfig(steps=20, batch=64, seed=3))
    assert torch.equal(again.encode_a(queries_a), out_a)


def _frozen_encoder(n_in, dim, generator):
    """A fixed random map into a space of size dim, L2-normalised: a stand-in for a pretrained encoder."""
    weight = torch.randn(dim, n_in, generator=generator)
    return lambda x: F.normalize(x @ weight.T, dim=1)


def test_connector_with_frozen_encoders_takes_raw_inputs():
    g = torch.Generator().manual_seed(1)
    encoder_a, encoder_b1 = _frozen_encoder(7, 6, g), _frozen_encoder(7, 6, g)    # space 1: A–B, size 6
    encoder_b2, encoder_c = _frozen_encoder(7, 5, g), _frozen_encoder(7, 5, g)    # space 2: B–C, size 5
    encoders = dict(encoder_a=encoder_a, encoder_b1=encoder_b1, encoder_b2=encoder_b2, encoder_c=encoder_c)
    connector = CMCRConnector(6, 5, CMCRConfig(hidden=16), **encoders)
    raw_b, raw_a, raw_c = (torch.randn(100, 7, generator=g) for _ in range(3))
    connector.fit(raw_b, raw_b, raw_a, raw_c, FitConfig(steps=5, batch=32))
    with torch.no_grad():
        via_embeddings = CMCRConnector(6, 5, CMCRConfig(hidden=16))
        via_embeddings.load_state_dict(connector.state_dict())
        expected = via_embeddings.encode_a(encoder_a(raw_a))
    assert torch.equal(connector.encode_a(raw_a), expected)


def test_oracle_fit_pairs_and_text_only_fit_without_memory():
    g = torch.Generator().manual_seed(2)
    a, c = _toy_embeddings(100, 4, g), _toy_embeddings(100, 4, g)
    CMCRConnector(4, 4, CMCRConfig(hidden=8)).fit_pairs(a, c, FitConfig(steps=3, batch=16))
    CMCRConnector(4, 4, CMCRConfig(hidden=8, retrieval="none")).fit(a, c, None, None, FitConfig(steps=3, batch=16))


@pytest.mark.parametrize("call, match", [
    (lambda c: c.fit(_unit(50, 5), _unit(50, 4), _unit(20, 4), _unit(20, 4)), "shared_1 has 5 features but space 1"),
    (lambda c: c.fit(_unit(50, 4), _unit(40, 4), _unit(20, 4), _unit(20, 4)), "same B samples row by row"),
    (lambda c: c.fit(_unit(50, 4), _unit(50, 4), None, _unit(20, 4)), "needs memory_a and memory_c"),
    (lambda c: c.fit(_unit(50, 4), _unit(50, 4), torch.empty(0, 4), _unit(20, 4)), "memory_a is an empty batch"),
    (lambda c: c.fit(_unit(50, 4), _unit(50, 4), _unit(20, 4), _unit(20, 3)), "memory_c has 3 features"),
    (lambda c: c.fit_pairs(_unit(50, 4), _unit(49, 4)), "same number of rows"),
    (lambda c: c.encode_c(_unit(3, 2)), "x has 2 features but space 2"),
    (lambda c: c.encode_b(_unit(3, 4), space=3), "space must be 1 or 2"),
])
def test_connector_bad_inputs_raise(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(CMCRConnector(4, 4, CMCRConfig(hidden=8)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(retrieval="topk"), "retrieval must be one of"),
    (dict(memory_temperature=0), "memory_temperature must be a positive"),
    (dict(noise_variance=-0.1), "noise_variance must be a non-negative"),
    (dict(hidden=0), "hidden must be an int >= 1"),
    (dict(enhance_method="math"), "enhance_method must be one of"),
])
def test_config_bad_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CMCRConfig(**kwargs)
    with pytest.raises(ValueError, match="batch must be an int >= 2"):
        FitConfig(batch=1)


def test_config_defaults_are_the_papers():
    cfg = CMCRConfig()
    assert (cfg.memory_temperature, cfg.noise_variance, cfg.intra_weight, cfg.hidden) == (0.01, 0.004, 0.1, 1024)


# --------------------------------------------------------------------------------------------- metrics

def test_retrieval_metrics_match_a_brute_force_count():
    g = torch.Generator().manual_seed(5)
    queries, gallery = torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g)
    gallery[:100] = queries[:100] + 0.1 * gallery[:100]
    q, gal = F.normalize(queries.double(), dim=1), F.normalize(gallery.double(), dim=1)
    scores = q @ gal.T
    expected_rank = 1 + (scores > scores.diagonal()[:, None]).sum(1)
    assert torch.equal(ranks(queries, gallery, block_rows=70), expected_rank)
    metrics = retrieval_metrics(queries, gallery)
    assert metrics["r1"] == pytest.approx(float((expected_rank == 1).double().mean()))
    assert metrics["r5"] == pytest.approx(float((expected_rank <= 5).double().mean()))
    assert metrics["map"] == pytest.approx(float((1 / expected_rank.double()).mean()))
    assert metrics["chance_r1"] == pytest.approx(1 / 300)
    perfect = retrieval_metrics(queries, queries)
    assert perfect["r1"] == perfect["map"] == 1.0


def test_modality_gap_is_the_distance_of_the_centroids():
    x, y = torch.randn(50, 3), torch.randn(60, 3)
    expected = (F.normalize(x.double(), dim=1).mean(0) - F.normalize(y.double(), dim=1).mean(0)).norm()
    assert modality_gap(x, y) == pytest.approx(float(expected), rel=1e-12)
