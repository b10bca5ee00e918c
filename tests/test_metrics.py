"""Ranking and preference metrics on hand-computed cases."""

import math

import pytest
import torch

from mass_dpo.metrics import mean_se, preference_metrics, ranking_metrics, target_ranks


def test_ranks_count_ties_against_the_target():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.3, 0.3, 0.3, 0.1], [0.0, 1.0, 2.0, 3.0]])
    target = torch.tensor([0, 1, 0])
    assert target_ranks(scores, target).tolist() == [1, 3, 4]  # row 2: two others tie at 0.3 -> rank 3


def test_hand_computed_metrics():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.3, 0.3, 0.3, 0.1], [0.0, 1.0, 2.0, 3.0]])
    target = torch.tensor([0, 1, 0])  # ranks 1, 3, 4
    m = ranking_metrics(scores, target, ks=(1, 3))
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
    assert m["margin_se"] == pytest.approx(mean_se(torch.tensor(margins))[1])


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
