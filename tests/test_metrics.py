"""Ranking and preference metrics on hand-computed cases."""

import math
import statistics

import pytest
import torch

from mass_dpo.metrics import mean_se, preference_metrics, ranking_metrics, target_ranks


def test_ranks_count_ties_against_the_target():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.3, 0.3, 0.3, 0.1], [0.0, 1.0, 2.0, 3.0]])
    target = torch.tensor([0, 1, 0])
    assert target_ranks(scores, target).tolist() == [1, 3, 4]  # row 2: two others tie at 0.3 -> rank 3


def test_hand_computed_metrics():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.3, 0.3, 0.3, 0.1], [0.0, 1.0, 2.0, 3.0]])
    target = torch.tensor([0, 1, 0])  # ranks 1, 3, 4 with ties against the target (row 2: ranks 1..3 uniformly)
    m = ranking_metrics(scores, target, ks=(1, 3), ties="pessimistic")
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 4) / 3)
    # standard error: sample std / sqrt(n)
    hits = [1.0, 0.0, 0.0]
    mean = sum(hits) / 3
    se = math.sqrt(sum((h - mean) ** 2 for h in hits) / 2) / math.sqrt(3)
    assert m["recall@1_se"] == pytest.approx(se)
    assert set(m) == {f"{k}{s}" for k in ("recall@1", "recall@3", "ndcg@1", "ndcg@3", "mrr") for s in ("", "_se")}
    e = ranking_metrics(scores, target, ks=(1, 3))  # expected ties: row 2's rank is 1, 2 or 3 with equal chance
    assert e["recall@1"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert e["mrr"] == pytest.approx((1 + (1 + 1 / 2 + 1 / 3) / 3 + 1 / 4) / 3)


def test_mask_excludes_padding():
    scores = torch.tensor([[0.5, 0.9, 0.1, 99.0]])
    mask = torch.tensor([[True, True, True, False]])
    m = ranking_metrics(scores, torch.tensor([0]), ks=(1, 2), mask=mask)
    assert m["recall@1"] == 0.0 and m["recall@2"] == 1.0
    assert m["mrr"] == pytest.approx(0.5)


def test_preference_metrics():
    chosen = torch.tensor([1.0, 0.0, 2.0])
    rejected = torch.tensor([[0.0, 0.5, -1.0], [0.0, -1.0, -2.0], [1.0, 3.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, True], [True, False, True]])
    m = preference_metrics(chosen, rejected, mask=mask)
    assert m["accuracy"] == pytest.approx(2 / 3)  # row 1 ties at 0.0: not a win; row 2 ignores the masked 3.0
    margins = [1.0 - (-0.5 / 3), 0.0 - (-1.0), 2.0 - 0.5]
    assert m["margin"] == pytest.approx(sum(margins) / 3)
    assert m["margin_se"] == pytest.approx(statistics.stdev(margins) / math.sqrt(3))
    assert m["accuracy_se"] == pytest.approx(statistics.stdev([1.0, 0.0, 1.0]) / math.sqrt(3))


def test_mean_se_edge_cases():
    assert mean_se(torch.tensor([2.0])) == (2.0, 0.0)
    assert all(math.isnan(x) for x in mean_se(torch.tensor([])))


def test_bad_inputs():
    with pytest.raises(ValueError, match="target indices"):
        ranking_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="masked out"):
        ranking_metrics(torch.zeros(1, 3), torch.tensor([2]), mask=torch.tensor([[True, True, False]]))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        ranking_metrics(torch.zeros(3), torch.tensor([0]))


def test_nan_scores_and_bad_cutoffs_are_refused_not_ranked():
    """A NaN compares False with everything: unchecked, a pool of NaN others would rank the target first."""
    nan = float("nan")
    with pytest.raises(ValueError, match=r"scores are NaN at 2 valid entries \(first: prompt 0, candidate 0\)"):
        ranking_metrics(torch.tensor([[nan, 0.5, nan, 0.2]]), torch.tensor([1]))
    masked = ranking_metrics(torch.tensor([[nan, 0.5, 0.7]]), torch.tensor([1]),
                             mask=torch.tensor([[False, True, True]]))  # a masked NaN is padding: fine
    assert masked["recall@1"] == 0.0 and masked["mrr"] == 0.5
    for ks in (5, (0,), (2.5,), ("5",), (True,)):
        with pytest.raises(ValueError, match=r"ks must be a sequence of integer cut-offs >= 1"):
            ranking_metrics(torch.zeros(1, 3), torch.tensor([0]), ks=ks)
    with pytest.raises(ValueError, match=r"rejected scores are NaN at 1 valid entries \(first: prompt 1, candidate 0\)"):
        preference_metrics(torch.tensor([1.0, 1.0]), torch.tensor([[0.0, 0.0], [nan, 0.0]]), ties="expected")
    with pytest.raises(ValueError, match=r"chosen scores are NaN at 1 prompts \(first: prompt 0\)"):
        preference_metrics(torch.tensor([nan, 1.0]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"mask must be \[B, K\] = \(2, 2\), got \(2, 1\)"):
        preference_metrics(torch.ones(2), torch.zeros(2, 2), mask=torch.ones(2, 1, dtype=torch.bool))
    import numpy as np

    assert mean_se(np.array([1.0, 3.0])) == (2.0, 1.0)


def _brute_force_expected(scores, target, ks, mask=None):
    """Average of the pessimistic metrics over every way of breaking the ties (tiny jitters in every order)."""
    import itertools

    B, N = scores.shape
    out = {f"recall@{k}": 0.0 for k in ks} | {f"ndcg@{k}": 0.0 for k in ks} | {"mrr": 0.0}
    for b in range(B):
        perms = list(itertools.permutations(range(N)))
        acc = {key: 0.0 for key in out}
        for perm in perms:
            jitter = torch.tensor(perm, dtype=torch.float64) * 1e-9
            m = ranking_metrics((scores[b : b + 1].double() + jitter), target[b : b + 1], ks=ks,
                                mask=None if mask is None else mask[b : b + 1], ties="pessimistic")
            for key in acc:
                acc[key] += m[key] / len(perms)
        for key in out:
            out[key] += acc[key] / B
    return out


def test_expected_ties_equal_the_average_over_every_tie_break():
    torch.manual_seed(0)
    scores = torch.randint(0, 3, (6, 5)).double()  # many ties
    target = torch.randint(0, 5, (6,))
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, 4] = mask[3, 1] = False
    target[0], target[3] = 0, 2
    expected = ranking_metrics(scores, target, ks=(1, 2, 3), mask=mask)
    brute = _brute_force_expected(scores, target, (1, 2, 3), mask)
    for key, value in brute.items():
        assert expected[key] == pytest.approx(value, abs=1e-12), key


def test_a_constant_score_sits_at_chance():
    scores = torch.zeros(10, 8)
    target = torch.arange(10) % 8
    m = ranking_metrics(scores, target, ks=(1, 3))
    assert m["recall@1"] == pytest.approx(1 / 8)
    assert m["recall@3"] == pytest.approx(3 / 8)
    assert m["mrr"] == pytest.approx(sum(1 / r for r in range(1, 9)) / 8)
    assert ranking_metrics(scores, target, ks=(1,), ties="pessimistic")["recall@1"] == 0.0


def test_expected_ties_in_pairwise_accuracy():
    chosen = torch.tensor([1.0, 0.0, 0.0])
    rejected = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    m = preference_metrics(chosen, rejected, ties="expected")
    assert m["accuracy"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert preference_metrics(chosen, rejected)["accuracy"] == pytest.approx(1 / 3)


def test_masks_of_numbers_other_than_0_and_1_are_refused_everywhere():
    """A float mask read with .bool() takes 0.3 for True: the core refuses it, and takes 0/1 numbers as bool."""
    from mass_dpo.losses import preference_loss
    from mass_dpo.selection import select_negatives

    scores, target = torch.tensor([[0.1, 0.5, 0.2]]), torch.tensor([1])
    fuzzy, exact = torch.tensor([[1.0, 1.0, 0.3]]), torch.tensor([[1.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="mask must be bool .* or 0/1"):
        ranking_metrics(scores, target, mask=fuzzy)
    assert ranking_metrics(scores, target, mask=exact) == ranking_metrics(scores, target, mask=exact.bool())
    with pytest.raises(ValueError, match="mask must be bool .* or 0/1"):
        preference_metrics(torch.ones(1), scores, mask=fuzzy)
    with pytest.raises(ValueError, match="mask must be bool .* or 0/1"):
        select_negatives(torch.randn(1, 3, 2), torch.zeros(1, 3), 1, mask=fuzzy)
    z1, z2 = torch.zeros(1), torch.zeros(1, 3)
    with pytest.raises(ValueError, match="mask must be bool .* or 0/1"):
        preference_loss("sdpo", z1, z2, z1, z2, mask=fuzzy)
    with pytest.raises(ValueError, match="target must hold candidate indices"):
        ranking_metrics(scores, torch.tensor([1.7]))
    assert ranking_metrics(scores, torch.tensor([1.0]))["mrr"] == 1.0
