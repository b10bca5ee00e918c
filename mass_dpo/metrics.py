"""Ranking and preference metrics, each with its standard error (sample std / sqrt(count)).

Every prompt has one relevant candidate (the chosen response, ``target``) among ``N`` scored candidates.
Its rank is ``1 + #{other valid candidates scored above it}`` when no other candidate ties with it. Ties are
broken uniformly at random *in expectation* (``ties="expected"``, the default; McSherry and Najork, ECIR 2008): with
``g`` others strictly above and ``t`` others tied, the rank is uniform on ``g + 1 .. g + t + 1`` and every metric is
its mean over those ranks, so a constant score (an untrained log-linear policy scored by its implicit reward) sits
exactly at chance (``recall@1 = 1 / N``). ``ties="pessimistic"`` counts every tie against the target instead.

- ``recall@k``: share of prompts with ``rank <= k`` (``recall@1`` is top-1 accuracy over the whole pool).
- ``ndcg@k``:   mean of ``1 / log2(rank + 1)`` where ``rank <= k``, else 0 (one relevant item, so IDCG = 1).
- ``mrr``:      mean of ``1 / rank``.
- ``pairwise_accuracy`` (:func:`preference_metrics`, named ``accuracy`` there): share of prompts whose chosen score
  beats every one of a fixed set of negatives (the reward accuracy DPO trainers report); ties as above.
- ``margin``:   mean over prompts of the chosen score minus the mean score of those negatives.
"""

from __future__ import annotations

import math

import torch

from ._checks import bool_mask


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error (``std(ddof=1) / sqrt(n)``; 0 for one value, nan for none) of a 1-D tensor."""
    values = torch.as_tensor(values).detach().to(torch.float64).flatten()
    n = values.numel()
    if n == 0:
        return float("nan"), float("nan")
    mean = float(values.mean())
    se = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return mean, se


def target_ranks(scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]`` 1-based rank of ``target`` among the valid candidates of ``scores`` ``[B, N]``; ties count against it."""
    scores = torch.as_tensor(scores)
    target = torch.as_tensor(target, device=scores.device)
    if target.is_floating_point() and not bool((target == target.round()).all()):
        raise ValueError("target must hold candidate indices (integers), got fractional values")
    target = target.long()
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
        mask = bool_mask(mask, device=scores.device)
        if mask.shape != scores.shape:
            raise ValueError(f"mask must be [B, N] = {tuple(scores.shape)}, got {tuple(mask.shape)}")
    rows = torch.arange(B, device=scores.device)
    if not mask[rows, target].all():
        raise ValueError("a target candidate is masked out")
    t = scores[rows, target]
    if not torch.isfinite(t).all():
        raise ValueError("a target's score is NaN or inf")
    _no_nan(scores, mask, "scores")
    others = mask.clone()
    others[rows, target] = False
    beats = (scores >= t[:, None]) & others
    return 1 + beats.sum(-1)


def _no_nan(values: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    """A NaN among the valid entries would compare False with everything (silently ranked below the target)."""
    bad = torch.isnan(values) & mask
    if bad.any():
        b, i = (int(t) for t in bad.nonzero()[0])
        raise ValueError(f"{name} are NaN at {int(bad.sum())} valid entries (first: prompt {b}, candidate {i}); fix the "
                         "scoring, or mask those candidates out")


def _check_ks(ks) -> tuple[int, ...]:
    """``ks`` as a tuple of cut-offs ``>= 1`` (any iterable of integers, numpy's included; read once, so a generator
    works), else one ``ValueError`` with the fix."""
    import numbers

    given = ks
    ks = () if isinstance(ks, (int, str)) else tuple(ks)
    if not ks or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be a sequence of integer cut-offs >= 1, got {given!r} (e.g. ks=(1, 3, 5))")
    return tuple(int(k) for k in ks)


def _check_ties(ties: str) -> None:
    if ties not in ("expected", "pessimistic"):
        raise ValueError(f"ties must be 'expected' or 'pessimistic', got {ties!r}")


def rank_bounds(scores, target, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(above [B], tied [B])``: the number of other valid candidates scored strictly above the target, and tied
    with it. The target's rank is ``above + 1`` when ties break in its favour, ``above + tied + 1`` against it."""
    worst = target_ranks(scores, target, mask)
    scores = torch.as_tensor(scores)
    rows = torch.arange(scores.shape[0], device=scores.device)
    m = torch.ones_like(scores, dtype=torch.bool) if mask is None else bool_mask(mask, device=scores.device)
    others = m.clone()
    others[rows, torch.as_tensor(target, device=scores.device).long()] = False
    t = scores[rows, torch.as_tensor(target, device=scores.device).long()]
    above = ((scores > t[:, None]) & others).sum(-1)
    return above, worst - 1 - above


def per_prompt_ranking(scores, target, *, ks=(1, 3, 5), mask=None, ties: str = "expected") -> dict[str, torch.Tensor]:
    """``{"recall@k": [B], "ndcg@k": [B], "mrr": [B]}`` float64 per prompt (what :func:`ranking_metrics` averages;
    kept for paired comparisons of two methods on the same prompts). Ties: see the module docstring."""
    _check_ties(ties)
    ks = _check_ks(ks)
    above, tied = rank_bounds(scores, target, mask)
    above, tied = above.to(torch.float64).cpu(), tied.to(torch.float64).cpu()
    if ties == "pessimistic":
        above, tied = above + tied, torch.zeros_like(tied)
    N = int(torch.as_tensor(scores).shape[1])
    r = torch.arange(1, N + 1, dtype=torch.float64)
    lo = above.long()  # ranks above .. above + tied + 1, uniformly: averages from prefix sums over r = 1..N
    hi = (above + tied + 1).long()
    count = tied + 1

    def mean_over_ranks(f: torch.Tensor) -> torch.Tensor:
        csum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(f, 0)])
        return (csum[hi] - csum[lo]) / count

    out: dict[str, torch.Tensor] = {}
    for k in ks:
        out[f"recall@{k}"] = mean_over_ranks((r <= k).to(torch.float64))
        out[f"ndcg@{k}"] = mean_over_ranks(torch.where(r <= k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r)))
    out["mrr"] = mean_over_ranks(1.0 / r)
    return out


def ranking_metrics(scores, target, *, ks=(1, 3, 5), mask=None, ties: str = "expected") -> dict[str, float]:
    """Recall@k, NDCG@k and MRR with standard errors (see the module docstring for the definitions).

    Args:
        scores: ``[B, N]`` higher = better; target: ``[B]`` index of the relevant candidate;
        ks: cut-offs; mask: ``[B, N]`` bool for pools of different sizes;
        ties: ``"expected"`` (random tie-breaking in expectation) or ``"pessimistic"`` (ties count against).

    Returns:
        ``{"recall@1": ..., "recall@1_se": ..., "ndcg@1": ..., ..., "mrr": ..., "mrr_se": ...}`` as floats; with one
        prompt every ``_se`` is 0 (no spread to measure), with none every value is NaN (:func:`mean_se`).
    """
    out: dict[str, float] = {}
    for name, values in per_prompt_ranking(scores, target, ks=ks, mask=mask, ties=ties).items():
        out[name], out[f"{name}_se"] = mean_se(values)
    return out


def per_prompt_preference(chosen_scores, rejected_scores, *, mask=None, ties: str = "pessimistic"
                          ) -> dict[str, torch.Tensor]:
    """``{"accuracy": [B], "margin": [B]}`` float64 per prompt (what :func:`preference_metrics` averages): 1 where the
    chosen score beats every valid negative (ties as ``ties`` says), and the chosen score minus the negatives' mean."""
    _check_ties(ties)
    c = torch.as_tensor(chosen_scores).to(torch.float64)
    r = torch.as_tensor(rejected_scores).to(torch.float64)
    if c.dim() != 1 or r.dim() != 2 or r.shape[0] != c.shape[0]:
        raise ValueError(f"expected chosen [B] and rejected [B, K], got {tuple(c.shape)} and {tuple(r.shape)}")
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else bool_mask(mask, device=r.device)
    if m.shape != r.shape:
        raise ValueError(f"mask must be [B, K] = {tuple(r.shape)}, got {tuple(m.shape)}")
    if not m.any(-1).all():
        raise ValueError("every prompt needs at least one unmasked negative")
    if torch.isnan(c).any():
        raise ValueError(f"chosen scores are NaN at {int(torch.isnan(c).sum())} prompts (first: prompt "
                         f"{int(torch.isnan(c).nonzero()[0])}); fix the scoring")
    _no_nan(r, m, "rejected scores")
    wins = torch.where(m, c[:, None] > r, torch.ones_like(m)).all(-1).to(torch.float64)
    if ties == "expected":
        lost = torch.where(m, c[:, None] < r, torch.zeros_like(m)).any(-1)
        tied = torch.where(m, c[:, None] == r, torch.zeros_like(m)).sum(-1).to(torch.float64)
        wins = torch.where(lost, torch.zeros_like(wins), 1.0 / (tied + 1.0))
    mean_r = torch.where(m, r, torch.zeros_like(r)).sum(-1) / m.sum(-1)
    return {"accuracy": wins, "margin": c - mean_r}


def preference_metrics(chosen_scores, rejected_scores, *, mask=None, ties: str = "pessimistic") -> dict[str, float]:
    """Reward accuracy and reward margin with standard errors.

    Args:
        chosen_scores: ``[B]``; rejected_scores: ``[B, K]`` (a fixed set of negatives per prompt);
        mask: ``[B, K]`` bool; ties: ``"pessimistic"`` (a tie is a loss, as DPO trainers count) or ``"expected"``
            (no negative strictly above and ``t`` tied: the chosen one wins with probability ``1 / (t + 1)``).

    Returns:
        ``accuracy`` (chosen beats every valid negative), ``margin`` (chosen minus the mean of the
        valid negatives), and their ``_se`` (0 with one prompt, NaN with none: :func:`mean_se`).
    """
    out: dict[str, float] = {}
    for name, values in per_prompt_preference(chosen_scores, rejected_scores, mask=mask, ties=ties).items():
        out[name], out[f"{name}_se"] = mean_se(values)
    return out
