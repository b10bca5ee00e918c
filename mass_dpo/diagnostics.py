"""Diagnostics of Algorithm 1's design on an extracted dataset: does the D-optimal greedy do more than rank by norm?

Algorithm 1 keeps, per prompt, the scaled Gram matrix ``G = (alpha0 / gamma) V V^T`` of the Fisher vectors
``v_i = sqrt(q_i) (phi_i - phibar)`` (``mass_dpo.selection``: ``log det H(S) = d log gamma + log det(I + G_SS)``) and
adds the negative with the largest gain ``log(1 + G_ii - G_iS (I + G_SS)^{-1} G_Si)``. When every ``|G_ij|`` is
small the Woodbury term ``G_iS (I + G_SS)^{-1} G_Si`` is negligible, the gains are ``log(1 + G_ii)`` and the picks are
the top-n by ``G_ii``: the "complementary directions" of Section 4 never switch on. :func:`design_diagnostics` measures
this, per dataset and reading of the preprocessing score, together with what the picks resemble (random, the
hardest, the longest negatives) and how long they are.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .extraction import DEFAULT_SELECTION_SCORE, Extracted, check_selection_score, selection_inputs
from .selection import fisher_weights, scaled_gram

#: Prompts per Gram computation (bounds the [prompts, N, N] float64 blocks).
CHUNK = 2048

#: :func:`degenerate`'s default: the share of prompts whose greedy picks are the top-n by ``G_ii``.
DEGENERATE_SHARE = 0.95


def candidate_lengths(ex: Extracted, records=None, tokenizer=None) -> torch.Tensor:
    """``[P, C]`` int64 token counts of every candidate's response (0 for padding).

    ``ex.lengths`` when the extraction stored them; else the records (in ``ex.ids``' order) are tokenized with
    ``tokenizer`` exactly as extraction does (:func:`mass_dpo.data.formatting.encode_pool`)."""
    stored = getattr(ex, "lengths", None)
    if stored is not None:
        return torch.as_tensor(stored).long() * ex.mask
    if records is None or tokenizer is None:
        raise ValueError("this Extracted has no token lengths (ex.lengths is None): pass records= and tokenizer= "
                         "(the reference model's) to count them")
    from .data.formatting import encode_pool

    records = records.to_list() if hasattr(records, "to_list") else list(records)
    ids = [str(r["id"]) for r in records]
    if ids != list(ex.ids):
        raise ValueError("records and the Extracted hold different prompts or another order; pass the records the "
                         "extraction was made from")
    out = torch.zeros(ex.mask.shape, dtype=torch.long)
    for p, rec in enumerate(records):
        _, cands = encode_pool(rec, tokenizer)
        out[p, : len(cands)] = torch.tensor([len(c) for c in cands])
    return out * ex.mask


def _top(key: torch.Tensor, valid: torch.Tensor, k: int) -> list[set[int]]:
    """Per row, the set of the ``k`` largest ``key`` among ``valid`` entries (ties: lowest index)."""
    key = key.double().masked_fill(~valid, -math.inf)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
    ok = torch.gather(valid, 1, order)
    return [set(int(i) for i, o in zip(row, m) if o) for row, m in zip(order, ok)]


def _sets(idx: torch.Tensor) -> list[set[int]]:
    return [set(int(i) for i in row if int(i) >= 0) for row in idx]


def _overlap(a: list[set[int]], b: list[set[int]]) -> float:
    """Mean over prompts of ``|A cap B| / |A|`` (``|A| = min(n, negatives)``; prompts without negatives skipped)."""
    vals = [len(x & y) / len(x) for x, y in zip(a, b) if x]
    return float(np.mean(vals)) if vals else math.nan


def _mean_length(sets: list[set[int]], lengths: torch.Tensor) -> float:
    vals = [int(lengths[p, i]) for p, s in enumerate(sets) for i in s]
    return float(np.mean(vals)) if vals else math.nan


def _median(chunks: list[torch.Tensor]) -> float:
    x = torch.cat(chunks) if chunks else torch.empty(0)
    return float(np.median(x.numpy())) if x.numel() else math.nan


def _max(chunks: list[torch.Tensor]) -> float:
    x = torch.cat(chunks) if chunks else torch.empty(0)
    return float(x.max()) if x.numel() else math.nan


def design_diagnostics(
    ex: Extracted,
    n: int = 3,
    *,
    beta: float = 0.1,
    gamma: float = 0.1,
    selection_score: str = DEFAULT_SELECTION_SCORE,
    center: bool = True,
    seed: int = 0,
    records=None,
    tokenizer=None,
) -> dict:
    """Algorithm 1's design on every prompt of ``ex`` under one reading, summarised in one dict (a table row).

    Args:
        ex: as returned by :func:`mass_dpo.extraction.extract`. n, beta, gamma, center: Algorithm 1's.
        selection_score: the reading of the preprocessing score (``delta``, ``reference``, ``offset``).
        seed: the random picks' seed (S-DPO's draw: :func:`mass_dpo.preprocess.select_extracted`, ``random``).
        records, tokenizer: only when ``ex.lengths`` is None (see :func:`candidate_lengths`).

    Returns:
        ``selection_score, n, beta, gamma, prompts``;
        ``g_diag_median, g_diag_max``: ``G_ii`` over every negative of every prompt;
        ``g_offdiag_median, g_offdiag_max``: ``|G_ij|``, ``i != j`` negatives of the same prompt;
        ``alpha0_median``: over prompts;
        ``greedy_is_top_diag``: share of prompts whose D-optimal picks are, as a set, the top-n by ``G_ii``;
        ``overlap_random, overlap_hardest, overlap_longest``: mean ``|A cap B| / |A|`` of the D-optimal picks A with
        the random picks, the top-n by ``log pi_ref(y_i | x)`` and the top-n by token length (ties: lowest index);
        ``length_chosen, length_dopt, length_random, length_negatives``: mean response tokens of the chosen
        response, of the D-optimal picks, of the random picks and of every negative.
    """
    from .preprocess import select_extracted  # the picks exactly as training makes them

    check_selection_score(selection_score)
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    n = int(n)
    lengths = candidate_lengths(ex, records, tokenizer)
    P = len(ex)
    negative = ex.mask.clone()
    negative[torch.arange(P), ex.target] = False

    diag, offdiag, alpha, top_diag = [], [], [], []
    for lo in range(0, P, CHUNK):
        chunk = Extracted(ex.ids[lo:lo + CHUNK], ex.features[lo:lo + CHUNK], ex.ref_logps[lo:lo + CHUNK],
                          ex.theta0_logps[lo:lo + CHUNK], ex.mask[lo:lo + CHUNK], ex.target[lo:lo + CHUNK], ex.meta)
        phi, lg, mask, cand = selection_inputs(chunk, selection_score)
        q, a0 = fisher_weights(lg.double(), mask, beta)
        x = phi.double()
        G = scaled_gram(torch.bmm(x, x.transpose(1, 2)), q, a0 / gamma, center)  # [b, N, N]
        pair = mask[:, :, None] & mask[:, None, :]
        eye = torch.eye(G.shape[-1], dtype=torch.bool)[None]
        gii = torch.diagonal(G, dim1=-2, dim2=-1)
        diag.append(gii[mask])
        offdiag.append(G[pair & ~eye].abs())
        alpha.append(a0)
        for row, c in zip(_top(gii, mask, n), cand):
            top_diag.append({int(c[j]) for j in row})

    dopt = _sets(select_extracted(ex, n, strategy="dopt", beta=beta, gamma=gamma, selection_score=selection_score,
                                  center=center, seed=seed)["indices"])
    rand = _sets(select_extracted(ex, n, strategy="random", beta=beta, gamma=gamma, selection_score=selection_score,
                                  center=center, seed=seed)["indices"])
    hardest = _top(ex.ref_logps, negative, n)
    longest = _top(lengths, negative, n)
    chosen = lengths[torch.arange(P), ex.target].double()
    with_neg = [i for i, s in enumerate(dopt) if s]
    return {
        "selection_score": selection_score, "n": n, "beta": beta, "gamma": gamma, "prompts": P,
        "g_diag_median": _median(diag), "g_diag_max": _max(diag),
        "g_offdiag_median": _median(offdiag), "g_offdiag_max": _max(offdiag),
        "alpha0_median": _median(alpha),
        "greedy_is_top_diag": float(np.mean([dopt[i] == top_diag[i] for i in with_neg])) if with_neg else math.nan,
        "overlap_random": _overlap(dopt, rand),
        "overlap_hardest": _overlap(dopt, hardest),
        "overlap_longest": _overlap(dopt, longest),
        "length_chosen": float(chosen.mean()) if P else math.nan,
        "length_dopt": _mean_length(dopt, lengths),
        "length_random": _mean_length(rand, lengths),
        "length_negatives": float(lengths[negative].double().mean()) if negative.any() else math.nan,
    }


def degenerate(row: dict, share: float = DEGENERATE_SHARE) -> bool:
    """True when the design is, in effect, "top-n by ``G_ii``": the greedy's picks equal those in at least ``share``
    of the prompts (a :func:`design_diagnostics` row), so the Woodbury term never changes a pick."""
    value = row.get("greedy_is_top_diag", math.nan)
    return bool(value >= share) if value == value else False
