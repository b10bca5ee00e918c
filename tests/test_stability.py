"""Table 4's recomputation (mass_dpo.stability) under each reading of the preprocessing score; trivial budgets."""

import pytest
import torch

from mass_dpo import stability as S
from mass_dpo.extraction import SELECTION_SCORES, Extracted
from mass_dpo.selection import select_negatives


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


def test_trivial_budgets_and_saturation():
    qasc_like = _extracted(C=8)  # 7 negatives in every pool
    assert S.negatives_per_pool(qasc_like).tolist() == [7] * 6
    assert S.trivial_budgets(qasc_like, [5, 10]) == [10]
    assert S.trivial_budgets(qasc_like, [3, 7]) == [7]  # n = 7 takes the whole pool too
    out = S.recompute(qasc_like, torch.zeros(5), 50 * torch.ones(5), 10)
    assert out["saturated"] == 1.0 and out["exact_match"] == 1.0  # why such rows are dropped
    assert S.recompute(qasc_like, torch.zeros(5), torch.zeros(5), 5)["saturated"] == 0.0
    mixed = _extracted(C=12, small=4)  # one pool with 3 negatives, the others with 11
    assert S.trivial_budgets(mixed, [3, 5, 10, 11]) == [11]
    assert S.recompute(mixed, torch.zeros(5), torch.zeros(5), 3)["saturated"] == pytest.approx(1 / 6)


def test_recompute_between_two_extractions_moves_with_features_and_logps():
    """The LM regimes' Table 4: the checkpoint re-extracted (new features and new log-probs), not a theta."""
    from dataclasses import replace

    ex = _extracted()
    same = S.recompute_extracted(ex, ex, 3)
    assert same["exact_match"] == 1.0 and same["objective_retention"] == pytest.approx(1.0)
    g = torch.Generator().manual_seed(3)
    moved = replace(ex, features=ex.features + 3 * torch.randn(ex.features.shape, generator=g),
                    theta0_logps=ex.theta0_logps + 5 * torch.randn(ex.ref_logps.shape, generator=g))
    out = S.recompute_extracted(ex, moved, 3)
    # by hand: Algorithm 1 at each extraction, the old subset scored under the new design
    old, _ = S.select(ex, 3)
    new, gain_new = S.select(moved, 3)
    agree = S.subset_agreement(old, new)
    assert out["exact_match"] == pytest.approx(float(agree["exact_match"].mean())) and out["exact_match"] < 1.0
    assert out["objective_retention"] == pytest.approx(float(S.subset_gain(moved, old).sum() / gain_new.sum()))
    # on frozen features with theta, it is recompute itself
    theta = torch.randn(5, generator=g)
    assert S.recompute(ex, torch.zeros(5), theta, 3) == S.recompute_extracted(
        S.at_checkpoint(ex, torch.zeros(5)), S.at_checkpoint(ex, theta), 3)
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


def test_random_retention_scores_seeded_random_subsets_under_the_new_design():
    ex = _extracted()
    _, best = S.select(ex, 3)
    gen = torch.Generator().manual_seed(5)
    phi = (ex.features[:, 1:] - ex.features[:, :1]).double()
    picks = [select_negatives(phi, torch.zeros(6, 7, dtype=torch.float64), 3, strategy="random", generator=gen).indices
             for _ in range(4)]  # the random strategy of selection (its draws do not depend on the logits)
    assert all(len(set(row.tolist())) == 3 for p in picks for row in p)
    by_hand = sum(float(S.subset_gain(ex, p).sum()) / float(best.sum()) for p in picks) / 4
    assert S.random_retention(ex, best, 3, draws=4, seed=5) == pytest.approx(by_hand)
    assert 0.0 < by_hand < 1.0  # on these pools the greedy's subset is more informative than random ones
    out = S.recompute_extracted(ex, ex, 3)
    assert out["chance_jaccard"] == pytest.approx(S.chance_agreement(S.negatives_per_pool(ex), 3)["jaccard"])
    assert out["random_retention"] == pytest.approx(S.random_retention(ex, best, 3))
