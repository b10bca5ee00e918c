"""Ranking and preference metrics, each with its standard error (sample std / sqrt(count)).

Every prompt has one relevant candidate (the chosen response, ``target``) among ``N`` scored candidates.
Its rank counts ties against it: ``rank = 1 + #{other valid candidates with score >= the target's}``.

- ``recall@k``: share of prompts with ``rank <= k`` (``recall@1`` is top-1 accuracy over the whole pool).
- ``ndcg@k``:   mean of ``1 / log2(rank + 1)`` where ``rank <= k``, else 0 (one relevant item, so IDCG = 1).
- ``mrr``:      mean of ``1 / rank``.
- ``accuracy``: share of prompts whose chosen score beats every one of a fixed set of negatives
  (the reward accuracy DPO trainers report; :func:`preference_metrics`).
- ``margin``:   mean over prompts of the chosen score minus the mean score of those negatives.
"""

from __future__ import annotations

import math

import torch


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error (``std(ddof=1) / sqrt(n)``; 0 for one value, nan for none) of a 1-D tensor."""
    values = values.detach().to(torch.float64).flatten()
    n = values.numel()
    if n == 0:
        return float("nan"), float("nan")
    mean = float(values.mean())
    se = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return mean, se


def target_ranks(scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]`` 1-based rank of ``target`` among the valid candidates of ``scores`` ``[B, N]``; ties count against it."""
    scores = torch.as_tensor(scores)
    target = torch.as_tensor(target, device=scores.device).long()
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N], got {tuple(scores.shape)}")
    B, N = scores.shape
    if target.shape != (B,):
        raise ValueError(f"target must be [B] = [{B}], got {tuple(target.shape)}")
    if ((target < 0) | (target >= N)).any():
        raise ValueError(f"target indices must lie in [0, {N})")
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    else:
        mask = torch.as_tensor(mask, device=scores.device).bool()
        if mask.shape != scores.shape:
            raise ValueError(f"mask must be [B, N] = {tuple(scores.shape)}, got {tuple(mask.shape)}")
    rows = torch.arange(B, device=scores.device)
    if not mask[rows, target].all():
        raise ValueError("a target candidate is masked out")
    t = scores[rows, target]
    if not torch.isfinite(t).all():
        raise ValueError("a target's score is NaN or inf")
    others = mask.clone()
    others[rows, target] = False
    beats = (scores >= t[:, None]) & others
    return 1 + beats.sum(-1)


def ranking_metrics(scores, target, *, ks=(1, 3, 5), mask=None) -> dict[str, float]:
    """Recall@k, NDCG@k and MRR with standard errors (see the module docstring for the definitions).

    Args:
        scores: ``[B, N]`` higher = better; target: ``[B]`` index of the relevant candidate;
        ks: cut-offs; mask: ``[B, N]`` bool for pools of different sizes.

    Returns:
        ``{"recall@1": ..., "recall@1_se": ..., "ndcg@1": ..., ..., "mrr": ..., "mrr_se": ...}`` as floats.
    """
    rank = target_ranks(scores, target, mask).to(torch.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = (rank <= k).to(torch.float64)
        out[f"recall@{k}"], out[f"recall@{k}_se"] = mean_se(hit)
        gain = torch.where(rank <= k, 1.0 / torch.log2(rank + 1.0), torch.zeros_like(rank))
        out[f"ndcg@{k}"], out[f"ndcg@{k}_se"] = mean_se(gain)
    out["mrr"], out["mrr_se"] = mean_se(1.0 / rank)
    return out


def preference_metrics(chosen_scores, rejected_scores, *, mask=None) -> dict[str, float]:
    """Reward accuracy and reward margin with standard errors.

    Args:
        chosen_scores: ``[B]``; rejected_scores: ``[B, K]`` (a fixed set of negatives per prompt);
        mask: ``[B, K]`` bool.

    Returns:
        ``accuracy`` (chosen beats every valid negative, strictly), ``margin`` (chosen minus the mean of the
        valid negatives), and their ``_se``.
    """
    c = torch.as_tensor(chosen_scores).to(torch.float64)
    r = torch.as_tensor(rejected_scores).to(torch.float64)
    if c.dim() != 1 or r.dim() != 2 or r.shape[0] != c.shape[0]:
        raise ValueError(f"expected chosen [B] and rejected [B, K], got {tuple(c.shape)} and {tuple(r.shape)}")
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    if not m.any(-1).all():
        raise ValueError("every prompt needs at least one unmasked negative")
    wins = torch.where(m, c[:, None] > r, torch.ones_like(m)).all(-1).to(torch.float64)
    mean_r = torch.where(m, r, torch.zeros_like(r)).sum(-1) / m.sum(-1)
    out: dict[str, float] = {}
    out["accuracy"], out["accuracy_se"] = mean_se(wins)
    out["margin"], out["margin_se"] = mean_se(c - mean_r)
    return out
