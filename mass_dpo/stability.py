"""Stability of the fixed MASS-DPO selection across training (appendix C.4, Table 4).

The negatives are selected once, at theta0, and kept. Table 4 recomputes Algorithm 1 at later checkpoints theta_t
and compares the subsets. Everything here is pure math on index tensors and frozen features:

- :func:`subset_agreement` compares two selections ``[P, n]`` (candidate or negative indices, ``-1`` = none):
  exact match (same set), Jaccard, top-1 match (same first greedy pick), top-k exact match (same set of the
  first k picks);
- :func:`at_checkpoint` is the loglinear regime's policy at theta_t: ``log pi_t = log pi_ref + phi . theta_t``, so
  ``Delta_i(theta_t) = (phi_i - phi_*) . theta_t`` and the selection needs no new extraction (the features are
  frozen; only the logits of Algorithm 1 change);
- every selection here is made under one reading of the preprocessing score (``selection_score``: ``delta``,
  ``reference`` or ``offset``, :func:`mass_dpo.extraction.selection_inputs`): the training runs' own. Under
  ``offset`` (``l_i = b_i``, the reference alone) the logits never move with theta_t, so on frozen features the
  recomputed selection is the initial one by construction;
- :func:`trivial_budgets` names the budgets n at which the comparison says nothing: ``n >=`` the number of negatives
  of every pool, where every selection is the whole pool (QASC: 7 negatives, so n = 10 is identical by
  construction); :func:`recompute` reports the share of such prompts (``saturated``) for the other budgets;
- :func:`recompute` runs Algorithm 1 at a checkpoint and scores the old subset under the new design, for the
  objective retention ``sum_p log det(I + G_t[S_0]) / sum_p log det(I + G_t[S_t])`` (the ``d log gamma`` term of
  ``log det H(S)`` is left out of both, so the ratio is of the information each subset adds; 1 = the old subset is
  as informative at theta_t as the greedy one recomputed there);
- :func:`chance_agreement` and :func:`random_retention` are what chance gives on the same pools: two independent
  uniform random subsets of the same sizes (exact match ``1 / C(N, k)``, Jaccard from the hypergeometric overlap,
  top-1 ``1 / N``), and the retention of a uniform random subset. An agreement near chance means the selection at
  the checkpoint has forgotten the initial one.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .extraction import DEFAULT_SELECTION_SCORE, Extracted, selection_inputs
from .selection import score_subset, select_negatives


def _sets(idx: torch.Tensor) -> list[set[int]]:
    return [set(int(i) for i in row if int(i) >= 0) for row in idx]


def subset_agreement(old, new, *, top: int = 3) -> dict[str, torch.Tensor]:
    """Per-prompt agreement of two selections in greedy order.

    Args:
        old, new: ``[P, n]`` int selections (``-1`` = none), column 0 the first greedy pick.
        top: k of the top-k exact match.

    Returns:
        ``exact_match``, ``jaccard``, ``top1_match``, ``top{k}_exact_match``: each ``[P]`` float64 (1.0 / 0.0,
        Jaccard in [0, 1]; two empty sets count as equal).
    """
    old, new = torch.as_tensor(old).long(), torch.as_tensor(new).long()
    if old.shape[0] != new.shape[0]:
        raise ValueError(f"old and new have {old.shape[0]} and {new.shape[0]} prompts")
    a, b = _sets(old), _sets(new)
    ta, tb = _sets(old[:, :top]), _sets(new[:, :top])
    exact = [float(x == y) for x, y in zip(a, b)]
    jac = [len(x & y) / len(x | y) if (x | y) else 1.0 for x, y in zip(a, b)]
    top1 = [float(int(x) == int(y)) for x, y in zip(old[:, 0], new[:, 0])] if old.shape[1] and new.shape[1] else []
    topk = [float(x == y) for x, y in zip(ta, tb)]
    f = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return {"exact_match": f(exact), "jaccard": f(jac), "top1_match": f(top1), f"top{top}_exact_match": f(topk)}


def chance_agreement(pool_sizes, n: int, *, top: int = 3) -> dict[str, float]:
    """The agreement of two independent uniform random selections of ``min(n, N_p)`` negatives of each pool, in
    random order: the chance level of :func:`subset_agreement`'s metrics, means over prompts.

    Args:
        pool_sizes: ``[P]`` the number of negatives ``N_p`` of each pool.
        n: the budget.

    Returns:
        ``exact_match`` (``1 / C(N, k)``), ``jaccard`` (``E[I / (2k - I)]``, ``I`` hypergeometric: ``k`` draws from
        ``N`` with ``k`` marked), ``top1_match`` (``1 / N``), ``top{top}_exact_match`` (``1 / C(N, min(top, k))``).
    """
    rows = []
    for size in (int(v) for v in torch.as_tensor(pool_sizes).flatten()):
        k = min(int(n), size)
        if size <= 0 or k <= 0:  # nothing to choose: two empty selections agree
            rows.append((1.0, 1.0, 1.0, 1.0))
            continue
        total = math.comb(size, k)
        jac = sum(math.comb(k, i) * math.comb(size - k, k - i) / total * i / (2 * k - i) for i in range(k + 1))
        rows.append((1 / total, jac, 1 / size, 1 / math.comb(size, min(top, k))))
    if not rows:
        return {"exact_match": math.nan, "jaccard": math.nan, "top1_match": math.nan, f"top{top}_exact_match": math.nan}
    mean = torch.tensor(rows, dtype=torch.float64).mean(0).tolist()
    return dict(zip(("exact_match", "jaccard", "top1_match", f"top{top}_exact_match"), mean))


def random_retention(ex: Extracted, gain_best, n: int, *, draws: int = 8, seed: int = 0, beta: float = 0.1,
                     gamma: float = 0.1, selection_score: str = DEFAULT_SELECTION_SCORE) -> float:
    """The objective retention of uniform random subsets of ``n`` negatives under the design at ``ex``: the mean
    over ``draws`` seeded draws of ``sum_p log det(I + G[S_rand]) / sum_p gain_best`` (``gain_best`` ``[P]``: the
    greedy's gains there), the chance level of ``objective_retention``."""
    total = float(torch.as_tensor(gain_best).sum())
    if total <= 0:
        return math.nan
    phi, lg, mask, _ = selection_inputs(ex, selection_score)
    gen = torch.Generator().manual_seed(int(seed))
    draw = lambda: select_negatives(phi.double(), lg.double(), n, beta=beta, gamma=gamma, mask=mask,  # noqa: E731
                                    strategy="random", generator=gen).gains.nan_to_num(0.0).sum()
    return sum(float(draw()) / total for _ in range(int(draws))) / int(draws)


def at_checkpoint(ex: Extracted, theta) -> Extracted:
    """The loglinear policy at ``theta`` ``[d]`` as the preprocessing point: ``theta0_logps = ref + phi . theta``.

    ``selection_inputs(at_checkpoint(ex, theta))`` then gives ``Delta_i(theta) = (phi_i - phi_*) . theta``.
    ``theta = 0`` returns the initialisation (every Delta_i = 0)."""
    theta = torch.as_tensor(theta, dtype=torch.float32).flatten()
    if theta.numel() != ex.features.shape[-1]:
        raise ValueError(f"theta has {theta.numel()} entries, the features have d = {ex.features.shape[-1]}")
    logps = ex.ref_logps + ex.features.float() @ theta
    logps = torch.where(ex.mask, logps, torch.zeros_like(logps))
    return replace(ex, theta0_logps=logps)


def select(ex: Extracted, n: int, *, beta: float = 0.1, gamma: float = 0.1,
           selection_score: str = DEFAULT_SELECTION_SCORE):
    """Algorithm 1 at ``ex``'s preprocessing point: ``(indices [P, n] into the negatives, logdet gain [P])``.

    Indices are in :func:`mass_dpo.extraction.selection_inputs`' order (the chosen candidate removed); the gain is
    ``log det(I + G[S, S]) = log det H(S) - d log gamma``, with q from the reading ``selection_score``."""
    phi, lg, mask, _ = selection_inputs(ex, selection_score)
    sel = select_negatives(phi.double(), lg.double(), n, beta=beta, gamma=gamma, mask=mask)
    return sel.indices, sel.gains.nan_to_num(0.0).sum(-1)


def subset_gain(ex: Extracted, order, *, beta: float = 0.1, gamma: float = 0.1,
                selection_score: str = DEFAULT_SELECTION_SCORE) -> torch.Tensor:
    """``[P]`` ``log det(I + G[S, S])`` of given subsets ``order`` ``[P, k]`` under the design at ``ex``."""
    phi, lg, mask, _ = selection_inputs(ex, selection_score)
    order = torch.as_tensor(order).long()
    gains = score_subset(phi.double(), lg.double(), order, beta=beta, gamma=gamma, mask=mask).gains
    return gains.nan_to_num(0.0).sum(-1)


def negatives_per_pool(ex: Extracted) -> torch.Tensor:
    """``[P]`` int64: the number of negatives in each pool (candidates minus the chosen one)."""
    return ex.mask.sum(-1) - 1


def trivial_budgets(ex: Extracted, ns) -> list[int]:
    """The budgets of ``ns`` at which Table 4 compares nothing: ``n >=`` the number of negatives of every pool, so
    that every selection, at any checkpoint, is the whole pool (QASC's 7 negatives make n = 10 trivial). Drop their
    rows and say so; ``[]`` when every budget leaves a choice in some pool."""
    most = int(negatives_per_pool(ex).max()) if len(ex) else 0
    return [int(n) for n in ns if int(n) >= most]


def recompute(ex: Extracted, theta_old, theta_new, n: int, *, beta: float = 0.1, gamma: float = 0.1,
              top: int = 3, selection_score: str = DEFAULT_SELECTION_SCORE) -> dict[str, float]:
    """Table 4's metrics for the selection at ``theta_old`` (e.g. 0, initialisation) against ``theta_new``, both
    made under the reading ``selection_score`` (the training runs' own).

    Returns the means over prompts of :func:`subset_agreement` plus ``objective_retention`` (see the module
    docstring), ``prompts``, ``saturated`` (the share of prompts with at most ``n`` negatives: their selection is
    the whole pool at any checkpoint) and the chance levels ``chance_<metric>`` (:func:`chance_agreement`) and
    ``random_retention`` (:func:`random_retention`)."""
    return recompute_extracted(at_checkpoint(ex, theta_old), at_checkpoint(ex, theta_new), n, beta=beta, gamma=gamma,
                               top=top, selection_score=selection_score)


def recompute_extracted(ex_old: Extracted, ex_new: Extracted, n: int, *, beta: float = 0.1, gamma: float = 0.1,
                        top: int = 3, selection_score: str = DEFAULT_SELECTION_SCORE) -> dict[str, float]:
    """:func:`recompute` between two extractions of the same prompts: Algorithm 1 at ``ex_old`` (initialisation)
    and at ``ex_new`` (a checkpoint re-extracted: its features and its log-probs as ``theta0_logps``, the LM regimes'
    Table 4 as the paper ran it), the old subset scored under the new design for the objective retention."""
    if list(ex_old.ids) != list(ex_new.ids):
        raise ValueError("the two extractions hold different prompts or another order")
    kw = dict(beta=beta, gamma=gamma, selection_score=selection_score)
    old, _ = select(ex_old, n, **kw)
    new, gain_new = select(ex_new, n, **kw)
    gain_old = subset_gain(ex_new, old, **kw)
    out = {k: float(v.mean()) if v.numel() else math.nan for k, v in subset_agreement(old, new, top=top).items()}
    total = float(gain_new.sum())
    out["objective_retention"] = float(gain_old.sum()) / total if total > 0 else math.nan
    out["prompts"] = int(old.shape[0])
    out["saturated"] = float((negatives_per_pool(ex_new) <= n).double().mean()) if len(ex_new) else math.nan
    out.update({f"chance_{k}": v for k, v in chance_agreement(negatives_per_pool(ex_new), n, top=top).items()})
    out["random_retention"] = random_retention(ex_new, gain_new, n, **kw)
    return out
