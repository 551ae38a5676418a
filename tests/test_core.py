"""The InRank core against brute-force references: the rank rule against a literal transcription of
the spec (section 3), the QR-route spectrum against ``torch.linalg.svdvals`` of the dense product,
truncation against the SVD truncation (Eckart-Young), ``InRankLinear`` against ``nn.Linear``, the
growth schedule in optimizer steps, the optimizer-state resize maps, and the bad-input errors."""

import math
import random

import pytest
import torch

from inrank_megatron import InRankConfig, InRankLinear
from inrank_megatron.core import (
    FactorResize,
    GrowthState,
    explained_ratio,
    factor_spectrum,
    map_slot_state,
    select_rank,
    truncate,
)


# ---- brute-force transcription of the spec's rule (section 3) -------------------------------


def brute_ratio(s, k):
    s = [float(v) for v in s]
    n = len(s)
    tail = [0.0] * k + s[k:]

    def var(v):
        m = sum(v) / n
        return sum((x - m) ** 2 for x in v) / (n - 1)

    total = var(s)
    if total == 0:
        return 0.0  # 0/0: the reference's nan never passes a threshold
    return 1.0 - var(tail) / total


def brute_select(s, r, b, max_rank, alpha):
    ks = list(range(r, min(r + b, max_rank - b)))
    if not ks:
        return r
    for k in ks:
        if brute_ratio(s, k) > alpha:
            return k
    return ks[-1]


def spectra(seed=0):
    """>= 500 random and hand-made spectra with rule settings."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for i in range(520):
        n = rng.randint(4, 80)
        max_rank = rng.randint(2, n)
        b = rng.randint(0, max_rank - 1)
        r = rng.randint(0, max_rank)
        alpha = rng.choice([0.1, 0.5, 0.9, 0.99, rng.random() * 0.98 + 0.01])
        kind = i % 6
        if kind == 0:  # random full spectrum
            s = torch.rand(n, generator=gen, dtype=torch.float64)
        elif kind == 1:  # fast decay: passes early
            s = torch.exp(-torch.arange(n, dtype=torch.float64) * rng.uniform(0.2, 3))
        elif kind == 2:  # flat: never passes
            s = torch.ones(n, dtype=torch.float64)
        elif kind == 3:  # all-zero tail after a few values
            m = rng.randint(1, n)
            s = torch.cat(
                [
                    torch.rand(m, generator=gen, dtype=torch.float64) + 1,
                    torch.zeros(n - m, dtype=torch.float64),
                ]
            )
        elif kind == 4:  # all zero
            s = torch.zeros(n, dtype=torch.float64)
        else:  # heavy ties
            s = torch.randint(0, 3, (n,), generator=gen).to(torch.float64)
        s = torch.sort(s, descending=True).values
        cases.append((s, r, b, max_rank, alpha))
    return cases


def test_select_rank_matches_brute_force_transcription():
    cases = spectra()
    assert len(cases) >= 500
    outcomes = set()
    for s, r, b, max_rank, alpha in cases:
        got = select_rank(s, r, b, max_rank, alpha)
        want = brute_select(s.tolist(), r, b, max_rank, alpha)
        assert got == want, (s.tolist(), r, b, max_rank, alpha)
        assert got >= r
        if 0 < b and r < max_rank - b:
            assert got < max_rank - b and got <= r + b - 1
        cap = min(r + b, max_rank - b)
        outcomes.add("stuck" if r >= cap else "pass" if got < cap - 1 else "last")
    assert outcomes == {"stuck", "pass", "last"}


def test_select_rank_hand_made_cases():
    s = torch.tensor([10.0, 1.0, 0.5, 0.1, 0, 0, 0, 0, 0, 0])
    # Passes at the current rank itself.
    assert explained_ratio(s, 1) > 0.9
    assert select_rank(s, 1, 3, 8, 0.9) == 1
    # Never passes: last k of [r, min(r + b, max_rank - b)).
    assert select_rank(torch.ones(10), 1, 3, 8, 0.9) == 3
    # Capped at max_rank - buffer: range [4, 5) only.
    assert select_rank(torch.ones(10), 4, 3, 8, 0.9) == 4
    # Growth stopped (rank == max_rank - buffer): unchanged.
    assert select_rank(torch.ones(10), 5, 3, 8, 0.9) == 5
    # A tie with the threshold does not pass (strictly greater).
    s2 = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert explained_ratio(s2, 1) == pytest.approx(1.0)
    ratio0 = explained_ratio(s2, 0)
    assert ratio0 == 0.0 and select_rank(s2, 0, 2, 4, 0.5) == 1
    # The variance ratio is not the energy ratio.
    s3 = torch.tensor([3.0, 2.0, 1.0, 1.0])
    energy = 9 / 15
    assert explained_ratio(s3, 1, rule="energy") == pytest.approx(energy)
    assert explained_ratio(s3, 1) == pytest.approx(brute_ratio(s3.tolist(), 1))
    assert explained_ratio(s3, 1) != pytest.approx(energy)


def test_energy_rule_is_opt_in():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1, 0.0, 0.0, 0.0])
    sq = s**2
    want = next(k for k in range(1, 4) if sq[:k].sum() / sq.sum() > 0.9)
    assert select_rank(s, 1, 3, 6, 0.9, rule="energy") == want


# ---- spectrum ------------------------------------------------------------------------------


def _factors(kind, k, n_in, n_out, gen):
    A = torch.randn(k, n_in, generator=gen, dtype=torch.float64)
    B = torch.randn(n_out, k, generator=gen, dtype=torch.float64)
    if kind == "ill":  # condition number ~1e6
        B = B * torch.logspace(0, -6, k, dtype=torch.float64)
    elif kind == "deficient":  # rank k // 3
        r = max(1, k // 3)
        B = torch.randn(n_out, r, generator=gen, dtype=torch.float64) @ torch.randn(
            r, k, generator=gen, dtype=torch.float64
        )
    return A.float(), B.float()


@pytest.mark.parametrize("kind", ["random", "ill", "deficient"])
@pytest.mark.parametrize(
    "k,n_in,n_out", [(7, 48, 80), (20, 64, 64), (30, 96, 40), (70, 48, 80), (64, 32, 64)]
)
def test_factor_spectrum_matches_svdvals(kind, k, n_in, n_out):
    gen = torch.Generator().manual_seed(k * 1000 + n_in)
    A, B = _factors(kind, k, n_in, n_out, gen)
    want = torch.linalg.svdvals((B.double() @ A.double()))
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        got = factor_spectrum(A, B, dtype=dtype)
        assert got.dtype == dtype and got.shape == (min(n_in, n_out),)
        assert torch.all(got[:-1] >= got[1:])
        assert (got.double() - want).abs().max() <= tol * want[0], kind


def test_factor_spectrum_fp32_vs_fp32_svdvals():
    gen = torch.Generator().manual_seed(1)
    A, B = torch.randn(102, 768, generator=gen), torch.randn(3072, 102, generator=gen)
    got, want = factor_spectrum(A, B), torch.linalg.svdvals(B @ A)[:768]
    assert ((got - want).abs() / want[0]).max() < 1e-5


# ---- truncation ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "ill", "deficient"])
@pytest.mark.parametrize("k,n_in,n_out,r", [(12, 48, 80, 5), (30, 64, 64, 10), (16, 40, 96, 16)])
def test_truncate_is_eckart_young(kind, k, n_in, n_out, r):
    gen = torch.Generator().manual_seed(r + k)
    A, B = _factors(kind, k, n_in, n_out, gen)
    A, B = A.double(), B.double()
    W = B @ A
    U, S, Vh = torch.linalg.svd(W)
    best = U[:, :r] * S[:r] @ Vh[:r]
    A2, B2 = truncate(A, B, r)
    assert A2.shape == (r, n_in) and B2.shape == (n_out, r)
    assert (B2 @ A2 - best).abs().max() <= 1e-5 * S[0]
    # Eckart-Young: the Frobenius error is the norm of the dropped singular values.
    err = torch.linalg.matrix_norm(W - B2 @ A2)
    assert err.item() == pytest.approx(S[r:].norm().item(), rel=1e-5, abs=1e-9 * S[0].item())
    # Balanced: B'^T B' = A' A'^T = diag(S_r) on the non-zero part.
    nz = S[:r] > 1e-9 * S[0]
    assert torch.allclose(torch.diag(B2.T @ B2)[nz], S[:r][nz], rtol=1e-6)
    assert torch.allclose(torch.diag(A2 @ A2.T)[nz], S[:r][nz], rtol=1e-6)


# ---- InRankLinear ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["efficient", "cumulative"])
@pytest.mark.parametrize("bias", [True, False])
def test_inrank_linear_equals_dense(mode, bias):
    torch.manual_seed(0)
    cfg = InRankConfig(mode=mode, rank=3, buffer=4, max_rank=20, stage1_steps=None)
    layer = InRankLinear(48, 80, cfg, bias=bias, dtype=torch.float64)
    if mode == "cumulative":  # give B a value so the low-rank branch matters
        with torch.no_grad():
            layer.B.normal_()
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
    dense = torch.nn.Linear(48, 80, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        if bias:
            dense.bias.copy_(layer.bias)
    x = torch.randn(5, 3, 48, dtype=torch.float64)
    y, y_ref = layer(x), dense(x)
    assert torch.allclose(y, y_ref, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    k = cfg.rank + cfg.buffer
    gW = dense.weight.grad  # dL/dW; dL/dB = gW A^T, dL/dA = B^T gW
    assert torch.allclose(layer.B.grad[:, :k], gW @ layer.A[:k].detach().T, atol=1e-10)
    assert torch.allclose(layer.A.grad[:k], layer.B[:, :k].detach().T @ gW, atol=1e-10)
    assert torch.all(layer.A.grad[k:] == 0) and torch.all(layer.B.grad[:, k:] == 0)
    if bias:
        assert torch.allclose(layer.bias.grad, dense.bias.grad, atol=1e-12)
    if mode == "cumulative":
        assert not any(p is layer.w0 for p in layer.parameters())


def test_inrank_linear_init_follows_reference():
    torch.manual_seed(0)
    layer = InRankLinear(64, 256, InRankConfig(rank=2, buffer=4))
    assert layer.A.shape == (32, 64) and layer.B.shape == (256, 32)  # max_rank = min // 2
    assert layer.A.abs().max() <= 1 / math.sqrt(64) and layer.B.abs().max() <= 1 / math.sqrt(32)
    assert torch.all(layer.bias == 0)
    cum = InRankLinear(
        64, 256, InRankConfig(mode="cumulative", rank=2, buffer=4, stage1_steps=None)
    )
    assert cum.A.shape == (6, 64) and torch.all(cum.B == 0)
    assert torch.allclose(cum.w0.T @ cum.w0, torch.eye(64), atol=1e-5)  # orthogonal columns


def _svd_truncation(W, k):
    """Brute force: the best rank-k approximation of W and its top-k singular values."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k], S[:k]


@pytest.mark.parametrize("shape", [(64, 256), (96, 40)])
def test_spectral_init_is_the_truncated_svd_of_the_dense_init(shape):
    from functools import partial

    from inrank_megatron.core.init import dense_init_weight

    n_in, n_out = shape
    cfg = InRankConfig(rank=2, buffer=4, init="spectral", init_scale=0.5)
    torch.manual_seed(0)
    layer = InRankLinear(n_in, n_out, cfg)
    torch.manual_seed(0)  # the dense layer's own init: nn.Linear's, drawn from the same RNG state
    W = torch.nn.Linear(n_in, n_out).weight.detach()
    slots = min(n_in, n_out) // 2
    assert layer.A.shape == (slots, n_in) and layer.B.shape == (n_out, slots)
    A, B = layer.A.detach().double(), layer.B.detach().double()
    for k in (layer.active_slots, 11, slots):  # every prefix of slots is a truncation of W
        product, s = _svd_truncation(W, k)
        torch.testing.assert_close(B[:, :k] @ A[:k], 0.25 * product, rtol=0, atol=1e-6)
        # Balanced: B^T B = A A^T = diag(S) (times init_scale^2).
        for gram in (B[:, :k].T @ B[:, :k], A[:k] @ A[:k].T):
            torch.testing.assert_close(gram, 0.25 * torch.diag(s), rtol=0, atol=1e-6)
    # The fixed-rank arm: exactly `rank` slots, the truncation of a dense init drawn from the
    # layer's seeded generator; megatron's init_method (global RNG) drawn from that generator too.
    layer.fix_rank(7)
    W7 = dense_init_weight(n_in, n_out, generator=torch.Generator().manual_seed(layer._extend_seed))
    torch.testing.assert_close(
        (layer.B @ layer.A).double(), 0.25 * _svd_truncation(W7, 7)[0], rtol=0, atol=1e-6
    )
    normal = partial(torch.nn.init.normal_, mean=0.0, std=0.02)
    state = torch.get_rng_state()
    gen = torch.Generator().manual_seed(5)
    drawn = dense_init_weight(n_in, n_out, dense_init=normal, generator=gen)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    torch.manual_seed(5)
    assert torch.equal(drawn, normal(torch.empty(n_out, n_in)))
    assert torch.equal(gen.get_state(), torch.get_rng_state())  # and the generator advanced


def test_spectral_init_with_the_learned_rank_keys():
    # The dense start trains every slot: its product is the dense init itself.
    cfg = InRankConfig(init="spectral", start="dense", buffer=0, stage1_steps=10)
    torch.manual_seed(1)
    layer = InRankLinear(48, 80, cfg)
    torch.manual_seed(1)
    W = torch.nn.Linear(48, 80).weight.detach()
    torch.testing.assert_close(layer.dense_weight().detach(), W, rtol=0, atol=1e-6)
    # The update signal draws the initial factors again from its seed: the spectral ones.
    layer = InRankLinear(48, 80, InRankConfig(init="spectral", signal="update", rank=2, buffer=4))
    A0, B0 = layer.initial_factors()
    assert torch.equal(A0, layer.A[:6].detach()) and torch.equal(B0, layer.B[:, :6].detach())


def test_spectral_init_needs_efficient_mode():
    with pytest.raises(ValueError, match="init='spectral' needs mode='efficient'"):
        InRankConfig(mode="cumulative", stage1_steps=None, init="spectral")
    with pytest.raises(ValueError, match="init must be one of"):
        InRankConfig(init="orthogonal")


@pytest.mark.parametrize("mode", ["efficient", "cumulative"])
def test_frobenius_penalty_is_autograd_of_the_dense_product(mode):
    from inrank_megatron.layers.base import frobenius_penalty

    torch.manual_seed(0)
    cfg = InRankConfig(
        mode=mode, rank=3, buffer=4, max_rank=20, stage1_steps=None if mode == "cumulative" else 130
    )
    model = torch.nn.Sequential(
        InRankLinear(48, 80, cfg, dtype=torch.float64),
        InRankLinear(80, 48, cfg, dtype=torch.float64),
    )
    with torch.no_grad():
        for layer in model:
            layer.B.normal_()  # cumulative mode starts at B = 0
    penalty = frobenius_penalty(model, 0.7)
    penalty.backward()
    want = 0.0
    for layer in model:
        k = layer.active_slots  # 7 of 20 allocated in efficient mode
        A, B = layer.A.detach()[:k].requires_grad_(), layer.B.detach()[:, :k].requires_grad_()
        ref = 0.7 / 2 * (B @ A).pow(2).sum()  # the (out, in) product, formed by the reference
        ref.backward()
        want += ref.item()
        torch.testing.assert_close(layer.A.grad[:k], A.grad, rtol=1e-12, atol=0)
        torch.testing.assert_close(layer.B.grad[:, :k], B.grad, rtol=1e-12, atol=0)
        assert not layer.A.grad[k:].any() and not layer.B.grad[:, k:].any()
    assert penalty.item() == pytest.approx(want, rel=1e-13)
    assert frobenius_penalty(model, 0.0) is None
    assert frobenius_penalty(torch.nn.Linear(4, 4), 0.7) is None


def test_cut_truncates_and_fixes_rank():
    torch.manual_seed(0)
    layer = InRankLinear(48, 80, InRankConfig(rank=4, buffer=6, max_rank=20), dtype=torch.float64)
    W = layer.dense_weight().detach()
    U, S, Vh = torch.linalg.svd(W)
    event = layer.cut(step=130)
    assert event.kind == "truncate" and event.old_slots == 20 and event.new_slots == 4
    assert layer.A.shape == (4, 48) and layer.B.shape == (80, 4)
    assert layer.growth.stage == "fixed" and layer.growth.buffer == 0 and layer.growth.rank == 4
    assert torch.allclose(layer.dense_weight(), U[:, :4] * S[:4] @ Vh[:4], atol=1e-10)
    with pytest.raises(ValueError, match="already cut"):
        layer.cut(step=131)


def test_cumulative_capacity_doubles_and_keeps_function():
    torch.manual_seed(0)
    cfg = InRankConfig(mode="cumulative", rank=2, buffer=3, max_rank=24, stage1_steps=None)
    layer = InRankLinear(48, 80, cfg, dtype=torch.float64)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(4, 48, dtype=torch.float64)
    y = layer(x)
    event = layer.set_rank(3)  # 3 + 3 active > 5 allocated: doubles
    assert event.kind == "extend" and (event.old_slots, event.new_slots) == (5, 10)
    assert torch.equal(event.new_params["A"][:5], event.old_params["A"])
    assert layer.allocated_slots == 10
    y_after = layer(x)
    assert torch.allclose(y, y_after, atol=1e-12)  # new slots have B = 0
    assert layer.set_rank(7) is None and layer.allocated_slots == 10
    event = layer.set_rank(8)
    assert event.kind == "extend" and (event.old_slots, event.new_slots) == (10, 20)
    assert layer.set_rank(18).new_slots == 24  # capped at max_rank
    with pytest.raises(ValueError, match="never shrinks"):
        layer.set_rank(17)


def test_state_dict_round_trip_after_cut():
    torch.manual_seed(0)
    cfg = InRankConfig(rank=3, buffer=5, max_rank=20)
    layer = InRankLinear(48, 80, cfg)
    layer.set_rank(7)
    layer.cut(step=9)
    state = layer.state_dict()
    fresh = InRankLinear(48, 80, cfg)
    fresh.load_state_dict(state)
    assert fresh.growth == layer.growth and fresh.A.shape == (7, 48)
    x = torch.randn(2, 48)
    assert torch.equal(fresh(x), layer(x))


# ---- growth state ---------------------------------------------------------------------------


def test_growth_checks_only_on_due_optimizer_steps():
    g = GrowthState(rank=2, buffer=3, max_rank=20, threshold=0.9, warmup=5, gap=3)
    due = [t for t in range(30) if g.is_due(t)]
    assert due == [5, 8, 11, 14, 17, 20, 23, 26, 29]
    flat = torch.ones(40)
    ranks = []
    for t in range(1, 30):
        if g.is_due(t):
            ranks.append(g.observe(t, flat))
    assert ranks == sorted(ranks) and ranks[-1] == 16  # capped below max_rank - buffer = 17
    # Range [16, min(19, 17)) = [16]: checks go on while r < max_rank - b, the rank stays below it.
    assert g.is_due(32) and g.observe(32, flat) == 16
    with pytest.raises(ValueError, match="no rank check is due"):
        g.observe(6, flat)


def test_growth_state_round_trip_and_validation():
    g = GrowthState(rank=4, buffer=3, max_rank=20, threshold=0.9, warmup=5, gap=3, layer="fc1")
    g.observe(5, torch.ones(40))
    h = GrowthState(rank=2, buffer=3, max_rank=20, threshold=0.9, warmup=5, gap=3, layer="fc1")
    h.load_state_dict(g.state_dict())
    assert h == g
    bad = dict(g.state_dict(), rank=-1)
    with pytest.raises(ValueError, match="rank=-1"):
        h.load_state_dict(bad)
    assert h == g  # unchanged after a rejected load
    with pytest.raises(ValueError, match="unknown growth-state keys"):
        h.load_state_dict({"ranks": 3})


def test_forward_calls_do_not_advance_the_schedule():
    torch.manual_seed(0)
    layer = InRankLinear(48, 80, InRankConfig(rank=2, buffer=3, max_rank=20, warmup=2, gap=2))
    for _ in range(50):
        layer(torch.randn(2, 48))
    assert layer.growth.step == -1 and layer.growth.rank == 2


# ---- optimizer-state maps -------------------------------------------------------------------


def test_resize_policies_map_state_exactly():
    torch.manual_seed(0)
    layer = InRankLinear(48, 80, InRankConfig(rank=3, buffer=5, max_rank=20), dtype=torch.float64)
    mA, mB = torch.randn(20, 48, dtype=torch.float64), torch.randn(80, 20, dtype=torch.float64)
    event = layer.cut(step=10)
    P_A, P_B = event.maps.P_A, event.maps.P_B
    assert P_A.shape == (3, 8) and P_B.shape == (8, 3)
    assert torch.equal(map_slot_state(mA, "A", event, policy="slice", kind="exp_avg"), mA[:3])
    assert torch.equal(map_slot_state(mB, "B", event, policy="slice", kind="exp_avg"), mB[:, :3])
    assert torch.all(map_slot_state(mA, "A", event, policy="reset", kind="exp_avg_sq") == 0)
    assert torch.allclose(
        map_slot_state(mA, "A", event, policy="project", kind="exp_avg"), P_A @ mA[:8]
    )
    assert torch.allclose(
        map_slot_state(mB, "B", event, policy="project", kind="exp_avg_sq"), mB[:, :8] @ P_B**2
    )
    ext = FactorResize("x", "extend", 4, 6, {}, {})
    got = map_slot_state(mB[:, :4], "B", ext, policy="project", kind="exp_avg")
    assert torch.equal(got[:, :4], mB[:, :4]) and torch.all(got[:, 4:] == 0)


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=-1), r"rank=-1 is out of range"),
        (dict(rank=2.5), r"rank must be an integer"),
        (dict(buffer=20), r"buffer=20 must be < max_rank=20"),
        (dict(threshold=1.0), r"threshold must be a number in the open interval \(0, 1\)"),
        (dict(threshold=0), r"threshold must be"),
    ],
)
def test_select_rank_rejects_bad_settings(kwargs, match):
    args = dict(rank=2, buffer=4, max_rank=20, threshold=0.9) | kwargs
    with pytest.raises(ValueError, match=match):
        select_rank(torch.ones(40), **args, layer="fc1")


def test_bad_factors_and_layer_settings():
    with pytest.raises(ValueError, match=r"factor shapes do not match"):
        factor_spectrum(torch.randn(3, 10), torch.randn(12, 4))
    A = torch.randn(3, 10)
    A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="A contains NaN"):
        factor_spectrum(A, torch.randn(12, 3))
    B = torch.randn(12, 3)
    B[1, 1] = float("inf")
    with pytest.raises(ValueError, match="B contains inf"):
        truncate(torch.randn(3, 10), B, 2)
    with pytest.raises(ValueError, match=r"layer mlp.fc1: buffer=100 must be < max_rank=32"):
        InRankLinear(64, 256, InRankConfig(), name="mlp.fc1")
    with pytest.raises(
        ValueError, match=r"layer mlp.fc2: rank \+ buffer = 25 \+ 10 exceeds max_rank=32"
    ):
        InRankLinear(256, 64, InRankConfig(rank=25, buffer=10), name="mlp.fc2")
    with pytest.raises(ValueError, match="inrank mode must be one of"):
        InRankConfig(mode="fast")
    with pytest.raises(ValueError, match="rank=9 is out of range"):
        truncate(torch.randn(8, 10), torch.randn(12, 8), 9)
