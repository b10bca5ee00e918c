"""Ranking evaluation of a trained policy on the test prompts (Section 6, Tables 1, 2, 5, 6, 8).

Every candidate of every test prompt (up to 20; 8 for QASC) is scored by the policy's sequence log-prob
``log pi_theta(y | x)`` (``score="logp"``, the default) or by the implicit reward ``beta * (log pi_theta(y | x) -
log pi_ref(y | x))`` (``score="reward"``). From the scores ``[P, C]``, through :mod:`mass_dpo.metrics`:

- Accuracy and Margin (:func:`mass_dpo.metrics.preference_metrics`) against a fixed set of 3 negatives per prompt,
  drawn once by :func:`fixed_negatives` from the prompt id and a seed, so every method is scored against the same
  negatives whatever negatives it trained on;
- Recall@k, NDCG@k (k = 1, 3, 5) and MRR (:func:`mass_dpo.metrics.ranking_metrics`) against the whole pool.

Definitions are in ``docs/training.md``; every metric comes with its standard error.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .loglinear import LogLinearPolicy
from .metrics import preference_metrics, ranking_metrics


def fixed_negatives(ids: Sequence[str], mask, target, k: int = 3, *, seed: int = 0) -> torch.Tensor:
    """``[P, k]`` candidate indices: per prompt, ``k`` distinct non-target valid candidates drawn uniformly.

    The draw depends only on ``(seed, prompt id, pool)``, not on the order, the number of prompts or the method,
    so every method and every subset of the test set sees the same negatives. ``-1`` pads pools with fewer than
    ``k`` negatives.
    """
    mask = torch.as_tensor(mask).bool()
    target = torch.as_tensor(target).long()
    P, C = mask.shape
    if len(ids) != P or target.shape != (P,):
        raise ValueError(f"ids ({len(ids)}), mask {tuple(mask.shape)} and target {tuple(target.shape)} disagree")
    out = torch.full((P, k), -1, dtype=torch.long)
    for p in range(P):
        valid = [i for i in range(C) if bool(mask[p, i]) and i != int(target[p])]
        digest = hashlib.sha256(f"mass-dpo-eval-negatives:{seed}:{ids[p]}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        pick = rng.sample(valid, min(k, len(valid)))
        out[p, : len(pick)] = torch.tensor(pick, dtype=torch.long)
    return out


def metrics_from_scores(scores, target, *, negatives, mask=None, ks: Sequence[int] = (1, 3, 5)) -> dict[str, float]:
    """All test metrics of candidate scores.

    Args:
        scores: ``[P, C]`` higher = better; target: ``[P]`` chosen candidate; negatives: ``[P, k]`` fixed negatives
            (``-1`` = none) for Accuracy and Margin; mask: ``[P, C]`` valid candidates; ks: Recall/NDCG cut-offs.

    Returns:
        ``accuracy, margin, recall@k, ndcg@k, mrr`` and each one's ``_se``, plus ``prompts``.
    """
    scores = torch.as_tensor(scores).to(torch.float64)
    target = torch.as_tensor(target).long()
    negatives = torch.as_tensor(negatives).long()
    rows = torch.arange(scores.shape[0])
    neg_mask = negatives >= 0
    chosen = scores[rows, target]
    rejected = torch.gather(scores, 1, negatives.clamp_min(0))
    out = dict(preference_metrics(chosen, rejected, mask=neg_mask))
    out.update(ranking_metrics(scores, target, ks=tuple(ks), mask=mask))
    out["prompts"] = int(scores.shape[0])
    return out


@torch.no_grad()
def score_candidates(
    policy: nn.Module,
    data,
    *,
    pools: Sequence[tuple[list[int], list[list[int]]]] | None = None,
    forward: Callable | None = None,
    pooling: str = "all",
    batch_size: int = 8,
) -> torch.Tensor:
    """``[P, C]`` policy sequence log-probs of every candidate (0 where ``data.mask`` is False).

    Args:
        policy: a :class:`LogLinearPolicy` (scores ``data.features``) or a causal LM (scores ``pools``).
        data: ``Extracted``-like: ``features [P, C, d]``, ``ref_logps [P, C]``, ``mask [P, C]``.
        pools: per prompt ``(prompt_ids, [candidate_ids, ...])`` for a causal LM (``encode_pool``).
        forward: a per-pool forward ``(model, prompt_ids, candidate_ids, pooling=, return_features=) -> (logps [C],
            _)``; default: ``mass_dpo.extraction.shared_prefix_forward_batch`` over ``batch_size`` pools at a time.
    """
    mask = torch.as_tensor(data.mask).bool()
    if isinstance(policy, LogLinearPolicy):
        scores = policy.score(torch.as_tensor(data.features), torch.as_tensor(data.ref_logps))
        return torch.where(mask, scores, torch.zeros_like(scores))
    if pools is None:
        raise ValueError("scoring a causal LM needs the tokenized pools (prompt_ids, candidate_ids) of every prompt")
    if len(pools) != mask.shape[0]:
        raise ValueError(f"{len(pools)} pools for {mask.shape[0]} prompts")
    was_training = policy.training
    policy.eval()
    scores = torch.zeros(mask.shape, dtype=torch.float32)
    if forward is None:
        from .extraction import shared_prefix_forward_batch

        for lo in range(0, len(pools), batch_size):
            chunk = list(pools[lo : lo + batch_size])
            logps, _, _ = shared_prefix_forward_batch(policy, chunk, pooling=pooling, return_features=False)
            width = min(logps.shape[1], scores.shape[1])
            scores[lo : lo + len(chunk), :width] = logps[:, :width].float().cpu()
    else:
        for p, (prompt_ids, cand_ids) in enumerate(pools):
            logps, _ = forward(policy, prompt_ids, cand_ids, pooling=pooling, return_features=False)
            scores[p, : len(cand_ids)] = logps.float().cpu()
    policy.train(was_training)
    return torch.where(mask, scores, torch.zeros_like(scores))


def evaluate(
    policy: nn.Module,
    data,
    *,
    pools=None,
    score: str = "logp",
    beta: float = 0.1,
    ks: Sequence[int] = (1, 3, 5),
    num_negatives: int = 3,
    seed: int = 0,
    forward: Callable | None = None,
    pooling: str = "all",
    return_scores: bool = False,
) -> dict[str, Any]:
    """Score every candidate of every test prompt and compute Accuracy, Margin, Recall@k, NDCG@k, MRR (with SEs).

    Args:
        policy: the trained policy (:class:`LogLinearPolicy` or a causal LM, peft-wrapped or not).
        data: the test split's ``Extracted`` (``ids``, ``features``, ``ref_logps``, ``mask``, ``target``).
        pools: tokenized pools for a causal LM, aligned with ``data.ids``.
        score: ``"logp"`` (sequence log-prob) or ``"reward"`` (``beta * (log pi - log ref)``).
        num_negatives, seed: the fixed negatives of Accuracy and Margin (:func:`fixed_negatives`).
        return_scores: also return ``scores`` ``[P, C]`` and ``negatives`` ``[P, k]`` (tensors).
    """
    if score not in ("logp", "reward"):
        raise ValueError(f"score must be 'logp' or 'reward', got {score!r}")
    mask = torch.as_tensor(data.mask).bool()
    target = torch.as_tensor(data.target).long()
    logps = score_candidates(policy, data, pools=pools, forward=forward, pooling=pooling)
    scores = logps if score == "logp" else beta * (logps - torch.as_tensor(data.ref_logps).float())
    scores = scores.masked_fill(~mask, float("-inf"))
    negatives = fixed_negatives(list(data.ids), mask, target, num_negatives, seed=seed)
    out: dict[str, Any] = metrics_from_scores(scores, target, negatives=negatives, mask=mask, ks=ks)
    out["score"] = score
    if return_scores:
        out["scores"], out["negatives"] = scores, negatives
    return out
