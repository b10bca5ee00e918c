"""Test evaluation: hand-computed metrics, agreement with a hand-coded rank loop, the shared fixed negatives, and
scoring by log-prob or implicit reward."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from mass_dpo.evaluation import evaluate, fixed_negatives, metrics_from_scores, score_candidates
from mass_dpo.loglinear import LogLinearPolicy


@dataclass
class Pools:
    ids: list
    features: torch.Tensor
    ref_logps: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor


def test_metrics_on_hand_built_scores():
    # prompt 0: target (idx 2) ranks 1st; prompt 1: target (idx 0) ranks 3rd; prompt 2: tied for 1st
    scores = torch.tensor([[0.1, 0.5, 0.9, 0.2, 0.0],
                           [0.3, 0.8, 0.6, 0.1, 0.0],
                           [0.4, 0.4, 0.1, 0.0, -1.0]])
    target = torch.tensor([2, 0, 0])
    negatives = torch.tensor([[0, 1, 3], [2, 3, 4], [1, 2, 3]])
    m = metrics_from_scores(scores, target, negatives=negatives)
    # prompt 2 ties with one other candidate: rank 1 or 2 with equal chance (ties broken at random in expectation)
    assert m["recall@1"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + (1 + 1 / 2) / 2) / 3)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4) + (1 + 1 / math.log2(3)) / 2) / 3)
    assert m["ndcg@1"] == pytest.approx((1 + 0 + 0.5) / 3)
    # accuracy: beats every one of its 3 negatives strictly -> prompt 0 yes, prompt 1 no (0.6), prompt 2 no (tie 0.4)
    assert m["accuracy"] == pytest.approx(1 / 3)
    margins = [0.9 - (0.1 + 0.5 + 0.2) / 3, 0.3 - (0.6 + 0.1 + 0.0) / 3, 0.4 - (0.4 + 0.1 + 0.0) / 3]
    assert m["margin"] == pytest.approx(sum(margins) / 3)
    assert m["margin_se"] == pytest.approx(float(torch.tensor(margins, dtype=torch.float64).std() / math.sqrt(3)))
    assert m["prompts"] == 3


def test_metrics_agree_with_a_hand_coded_rank_loop():
    """Random scores (no ties): rank = 1 + the number of valid others scoring above the target, counted in a plain
    loop; recall@k, NDCG@k, MRR, accuracy (strictly above every fixed negative) and margin, each with its standard
    error statistics.stdev / sqrt(P)."""
    import statistics

    g = torch.Generator().manual_seed(0)
    P, C = 50, 20
    scores = torch.randn(P, C, generator=g, dtype=torch.float64)
    mask = torch.ones(P, C, dtype=torch.bool)
    mask[::4, 12:] = False  # QASC-like short pools
    target = torch.randint(0, 12, (P,), generator=g)
    negatives = fixed_negatives([f"x{i}" for i in range(P)], mask, target, 3, seed=0)
    m = metrics_from_scores(scores, target, negatives=negatives, mask=mask)  # padding scored too: the mask drops it
    s, t = scores.tolist(), target.tolist()
    assert all(len(set(row)) == C for row in s)  # no ties: the rank below is the only one
    ranks = [1 + sum(s[p][i] > s[p][t[p]] for i in range(C) if i != t[p] and bool(mask[p, i])) for p in range(P)]
    per_prompt = {"mrr": [1 / r for r in ranks]}
    for k in (1, 3, 5):
        per_prompt[f"recall@{k}"] = [float(r <= k) for r in ranks]
        per_prompt[f"ndcg@{k}"] = [1 / math.log2(r + 1) if r <= k else 0.0 for r in ranks]
    negs = negatives.tolist()
    per_prompt["accuracy"] = [float(all(s[p][t[p]] > s[p][j] for j in negs[p])) for p in range(P)]
    per_prompt["margin"] = [s[p][t[p]] - sum(s[p][j] for j in negs[p]) / 3 for p in range(P)]
    assert 0 < sum(per_prompt["recall@1"]) < P and 0 < sum(per_prompt["accuracy"]) < P  # neither metric is trivial
    for key, values in per_prompt.items():
        assert m[key] == pytest.approx(statistics.fmean(values), abs=1e-12), key
        assert m[f"{key}_se"] == pytest.approx(statistics.stdev(values) / math.sqrt(P), abs=1e-12), key
    assert set(m) == {*per_prompt, *(f"{k}_se" for k in per_prompt), "prompts"} and m["prompts"] == P


def test_fixed_negatives_are_shared_and_valid():
    ids = [f"p{i}" for i in range(30)]
    mask = torch.ones(30, 8, dtype=torch.bool)
    mask[0, 2:] = False  # a pool with 2 candidates: one possible negative
    target = torch.arange(30) % 2
    neg = fixed_negatives(ids, mask, target, 3, seed=0)
    assert neg[0].tolist() == [1 - int(target[0]), -1, -1]
    for p in range(1, 30):
        row = neg[p].tolist()
        assert len(set(row)) == 3 and int(target[p]) not in row and all(0 <= i < 8 for i in row)
    # a function of (seed, id, pool) only: the same for any order or subset of prompts
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    again = fixed_negatives([ids[i] for i in perm], mask[perm], target[perm], 3, seed=0)
    assert torch.equal(again, neg[perm])
    assert not torch.equal(fixed_negatives(ids, mask, target, 3, seed=1), neg)


def test_evaluate_loglinear_logp_and_reward():
    g = torch.Generator().manual_seed(0)
    P, C, d = 40, 10, 6
    data = Pools([f"q{i}" for i in range(P)], torch.randn(P, C, d, generator=g), torch.randn(P, C, generator=g) * 3,
                 torch.ones(P, C, dtype=torch.bool), torch.randint(0, C, (P,), generator=g))
    policy = LogLinearPolicy(d)
    with torch.no_grad():
        policy.theta.copy_(torch.randn(d, generator=g))
    beta = 0.1
    out = evaluate(policy, data, beta=beta, score="logp", return_scores=True)
    logp = data.ref_logps + data.features @ policy.theta.detach()
    assert torch.allclose(out["scores"].float(), logp, atol=1e-5)
    negatives = fixed_negatives(data.ids, data.mask, data.target, 3, seed=0)
    assert torch.equal(out["negatives"], negatives)
    expect = metrics_from_scores(logp, data.target, negatives=negatives)
    expect["pairwise_accuracy"] = expect["accuracy"]  # no ties among random scores: the fixed-negative accuracy
    for key in ("pairwise_accuracy", "margin", "recall@1", "ndcg@5", "mrr", "mrr_se"):
        assert out[key] == pytest.approx(expect[key], abs=1e-6)
    assert out["accuracy"] == out["recall@1"] and out["accuracy_kind"] == "top1"  # top-1 over the pool
    reward = evaluate(policy, data, beta=beta, score="reward", return_scores=True)
    assert torch.allclose(reward["scores"].float(), beta * (data.features @ policy.theta.detach()), atol=1e-6)
    assert reward["logp_mrr"] == pytest.approx(out["mrr"]) and out["reward_mrr"] == pytest.approx(reward["mrr"])
    assert reward["mrr"] == pytest.approx(metrics_from_scores(reward["scores"], data.target, negatives=negatives)["mrr"])
    with pytest.raises(ValueError):
        evaluate(policy, data, score="probability")


def test_score_candidates_of_a_causal_lm():
    """A causal LM is scored pool by pool with the shared-prefix forward: equal to one forward per response."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    pools = [([5, 6, 7, 8], [[9], [10, 11], [12, 13, 14]]), ([20, 21, 22], [[23, 24], [25]])]
    data = Pools(["a", "b"], torch.zeros(2, 3, 1), torch.zeros(2, 3), torch.tensor([[True] * 3, [True, True, False]]),
                 torch.tensor([1, 0]))
    scores = score_candidates(model, data, pools=pools)
    with torch.no_grad():
        for p, (prompt, cands) in enumerate(pools):
            for c, cand in enumerate(cands):
                logits = model(input_ids=torch.tensor([prompt + cand])).logits[0]
                lp = logits[len(prompt) - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(cand)[:, None]).sum()
                assert scores[p, c] == pytest.approx(float(lp), abs=1e-4)
    assert scores[1, 2] == 0
    out = evaluate(model, data, pools=pools)
    from mass_dpo.metrics import ranking_metrics

    expected = ranking_metrics(scores, data.target, mask=data.mask)  # the metrics of the scores checked above
    assert out["prompts"] == 2
    for key in ("recall@1", "recall@3", "ndcg@3", "mrr"):
        assert out[key] == pytest.approx(expected[key]), key
    with pytest.raises(ValueError, match="pools"):
        score_candidates(model, data)
