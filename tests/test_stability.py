"""Table 4's recomputation (mass_dpo.stability) under each reading of the preprocessing score; trivial budgets."""

import itertools
import math

import pytest
import torch

from mass_dpo import stability as S
from mass_dpo.extraction import SELECTION_SCORES, Extracted
from mass_dpo.selection import select_negatives
from reference_selection import algorithm1, subset_logdet


def _extracted(P=6, C=8, d=5, seed=0, small=None):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(P, C, d, generator=g)
    ref = torch.randn(P, C, generator=g) * 2
    mask = torch.ones(P, C, dtype=torch.bool)
    if small is not None:
        mask[0, small:] = False  # a smaller pool
    return Extracted([f"p{i}" for i in range(P)], feats * mask[..., None], ref * mask, ref * mask, mask,
                     torch.zeros(P, dtype=torch.long))


@pytest.mark.parametrize("reading", SELECTION_SCORES)
def test_select_at_a_checkpoint_uses_the_reading(reading):
    ex = _extracted()
    theta = torch.randn(5, generator=torch.Generator().manual_seed(1))
    idx, gain = S.select(S.at_checkpoint(ex, theta), 3, beta=0.5, selection_score=reading)
    # by hand: log pi_t = ref + phi . theta; negatives are candidates 1..7 (the target is 0)
    phi = (ex.features[:, 1:] - ex.features[:, :1]).double()
    rel_ref = (ex.ref_logps[:, 1:] - ex.ref_logps[:, :1]).double()
    moved = phi @ theta.double()
    logits = {"delta": moved, "reference": rel_ref + moved, "offset": -rel_ref}[reading]
    want = select_negatives(phi, logits, 3, beta=0.5, gamma=0.1)
    assert torch.equal(idx, want.indices)
    torch.testing.assert_close(gain, want.gains.sum(-1), atol=1e-6, rtol=1e-6)


def test_recompute_per_reading():
    ex = _extracted()
    far = 50 * torch.randn(5, generator=torch.Generator().manual_seed(2))
    for reading in SELECTION_SCORES:
        same = S.recompute(ex, torch.zeros(5), torch.zeros(5), 3, selection_score=reading)
        assert same["exact_match"] == same["jaccard"] == 1.0 and same["objective_retention"] == pytest.approx(1.0)
    # offset: l_i = b_i never moves with theta on frozen features, so the selection is the initial one by construction
    off = S.recompute(ex, torch.zeros(5), far, 3, selection_score="offset")
    assert off["exact_match"] == 1.0 and off["objective_retention"] == pytest.approx(1.0)
    for reading in ("delta", "reference"):
        moved = S.recompute(ex, torch.zeros(5), far, 3, selection_score=reading)
        assert moved["exact_match"] < 1.0
        assert 0.0 < moved["objective_retention"] <= 1.0 + 1e-9  # the greedy at theta_t is at least as good
        for key in ("exact_match", "jaccard", "top1_match", "top3_exact_match"):
            assert 0.0 <= moved[key] <= 1.0, (reading, key)


def test_trivial_budgets_and_saturation():
    qasc_like = _extracted(C=8)  # 7 negatives in every pool
    assert S.negatives_per_pool(qasc_like).tolist() == [7] * 6
    assert S.trivial_budgets(qasc_like, [5, 10]) == [10]
    assert S.trivial_budgets(qasc_like, [3, 7]) == [7]  # n = 7 takes the whole pool too
    out = S.recompute(qasc_like, torch.zeros(5), 50 * torch.ones(5), 10)
    assert out["saturated"] == 1.0 and out["exact_match"] == 1.0  # why such rows are dropped
    whole = S.recompute(qasc_like, torch.zeros(5), 30 * torch.randn(5, generator=torch.Generator().manual_seed(4)), 7)
    assert whole["saturated"] == 1.0 and whole["exact_match"] == whole["jaccard"] == 1.0  # n = the pool: every negative
    assert S.recompute(qasc_like, torch.zeros(5), torch.zeros(5), 5)["saturated"] == 0.0
    mixed = _extracted(C=12, small=4)  # one pool with 3 negatives, the others with 11
    assert S.trivial_budgets(mixed, [3, 5, 10, 11]) == [11]
    assert S.recompute(mixed, torch.zeros(5), torch.zeros(5), 3)["saturated"] == pytest.approx(1 / 6)


def _algorithm1_by_hand(ex, n, beta=0.1, gamma=0.1):
    """Algorithm 1 as the paper writes it (tests/reference_selection.py) on inputs built by hand for pools whose
    chosen response is candidate 0 and whose candidates are all valid: phi_i = f_i - f_0 and the default reading's
    logits l_i = log pi_theta0(y_i) - log pi_theta0(y*). Returns (phi, logits, picks per prompt, gain per prompt),
    the gain being log det H(S) - d log gamma."""
    assert (ex.target == 0).all() and ex.mask.all()
    phi = (ex.features[:, 1:] - ex.features[:, :1]).double()
    logits = (ex.theta0_logps[:, 1:] - ex.theta0_logps[:, :1]).double()
    picks, gains = [], []
    for p in range(len(ex)):
        idx, _, logdet = algorithm1(phi[p], logits[p], n, beta, gamma)
        picks.append(idx)
        gains.append(logdet - phi.shape[-1] * math.log(gamma))
    return phi, logits, picks, gains


def test_recompute_between_two_extractions_moves_with_features_and_logps():
    """The LM regimes' Table 4: the checkpoint re-extracted (new features and new log-probs), not a theta. Checked
    against Algorithm 1 run by the slow reference at each extraction, the sets compared by hand and the retention
    from the reference's log det of the old subset under the new design."""
    from dataclasses import replace

    ex = _extracted()
    same = S.recompute_extracted(ex, ex, 3)
    assert same["exact_match"] == 1.0 and same["objective_retention"] == pytest.approx(1.0)
    g = torch.Generator().manual_seed(3)
    moved = replace(ex, features=ex.features + 3 * torch.randn(ex.features.shape, generator=g),
                    theta0_logps=ex.theta0_logps + 5 * torch.randn(ex.ref_logps.shape, generator=g))
    out = S.recompute_extracted(ex, moved, 3)
    _, _, old, _ = _algorithm1_by_hand(ex, 3)
    phi, logits, new, gain_new = _algorithm1_by_hand(moved, 3)
    P = len(ex)
    assert out["exact_match"] == pytest.approx(sum(set(a) == set(b) for a, b in zip(old, new)) / P)
    jaccard = [len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in zip(old, new)]
    assert out["jaccard"] == pytest.approx(sum(jaccard) / P)
    assert out["top1_match"] == pytest.approx(sum(a[0] == b[0] for a, b in zip(old, new)) / P)
    assert out["exact_match"] < 1.0  # the extractions moved enough to change some selection
    gain_old = [subset_logdet(phi[p], logits[p], old[p], 0.1, 0.1) - 5 * math.log(0.1) for p in range(P)]
    assert out["objective_retention"] == pytest.approx(sum(gain_old) / sum(gain_new), rel=1e-9)
    assert out["objective_retention"] < 1.0
    with pytest.raises(ValueError, match="different prompts"):
        S.recompute_extracted(ex, replace(ex, ids=list(reversed(ex.ids))), 3)


@pytest.mark.parametrize("size,n", [(5, 2), (4, 3), (6, 1), (3, 5)])
def test_chance_agreement_equals_enumeration_of_every_pair_of_random_orders(size, n):
    """Chance levels by brute force: every pair of ordered draws of min(n, N) of N negatives, equally likely."""
    from itertools import permutations, product

    k = min(n, size)
    orders = [list(p) + [-1] * (n - k) for p in permutations(range(size), k)]
    pairs = list(product(orders, repeat=2))
    agree = S.subset_agreement(torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs]))
    want = {key: float(v.mean()) for key, v in agree.items()}
    got = S.chance_agreement(torch.tensor([size]), n)
    assert got == pytest.approx(want, rel=1e-12)
    # several pools: the mean of their chance levels
    both = S.chance_agreement(torch.tensor([size, 7]), n)
    seven = S.chance_agreement(torch.tensor([7]), n)
    assert both["jaccard"] == pytest.approx((got["jaccard"] + seven["jaccard"]) / 2)


def test_random_retention_is_the_mean_over_every_subset_by_enumeration():
    """The chance level of the retention: many seeded draws against the mean over all C(7, 3) subsets of each pool,
    each scored by the reference's log det under the design at ``ex`` (within 5 standard errors of the draws)."""
    ex = _extracted()
    phi, logits, _, best = _algorithm1_by_hand(ex, 3)
    total = sum(best)
    means, variances = [], []
    for p in range(len(ex)):
        vals = torch.tensor([subset_logdet(phi[p], logits[p], s, 0.1, 0.1) - 5 * math.log(0.1)
                             for s in itertools.combinations(range(7), 3)], dtype=torch.float64)
        means.append(float(vals.mean()))
        variances.append(float(vals.var(unbiased=False)))
    expected = sum(means) / total
    draws = 400
    se = math.sqrt(sum(variances) / draws) / total  # the draws are independent across prompts and draws
    got = S.random_retention(ex, torch.tensor(best), 3, draws=draws, seed=5)
    assert abs(got - expected) <= 5 * se, (got, expected, se)
    assert 0.0 < expected < 1.0 - 10 * se  # on these pools the greedy's subsets are clearly more informative


def _symmetric_pools(P=3):
    """Pools where every subset of k negatives is equally informative: the chosen response at phi = 0, the four
    negatives at the unit vectors e_1..e_4 (phi_i = e_i), every log-prob equal (q uniform under every reading)."""
    feats = torch.cat([torch.zeros(P, 1, 4), torch.eye(4).expand(P, 4, 4)], 1)
    logps = torch.full((P, 5), -3.0)
    return Extracted([f"s{i}" for i in range(P)], feats, logps, logps.clone(), torch.ones(P, 5, dtype=torch.bool),
                     torch.zeros(P, dtype=torch.long))


def test_random_retention_and_chance_levels_by_hand_on_symmetric_pools():
    """By hand: v_i = (e_i - 1/4) / 2, so G_SS = c (I - J / 4) with c = alpha0 / (4 gamma) and alpha0 =
    beta^2 sigmoid(log 4) = 4/5; at beta = 1, gamma = 0.1, c = 2, and every pair of negatives has
    log det(I + G_SS) = log(1 + c) + log(1 + c / 2) = log 6. Chance levels over 2 of 4: exact match 1 / C(4, 2),
    top-1 1 / 4, Jaccard E[I / (4 - I)] with I hypergeometric = (4/6)(1/3) + (1/6)(1) = 7/18."""
    ex = _symmetric_pools()
    kw = dict(beta=1.0, gamma=0.1)
    idx, gain = S.select(ex, 2, **kw)
    assert idx.tolist() == [[0, 1]] * 3  # every pair ties: the lowest indices
    torch.testing.assert_close(gain, torch.full((3,), math.log(6), dtype=torch.float64))
    assert S.random_retention(ex, torch.full((3,), 2 * math.log(6)), 2, draws=5, **kw) == pytest.approx(0.5)
    out = S.recompute_extracted(ex, ex, 2, **kw)
    assert out["random_retention"] == pytest.approx(1.0) and out["objective_retention"] == pytest.approx(1.0)
    assert out["chance_exact_match"] == pytest.approx(1 / 6) and out["chance_top1_match"] == pytest.approx(1 / 4)
    assert out["chance_jaccard"] == pytest.approx(7 / 18)
