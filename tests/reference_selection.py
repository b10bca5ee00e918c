"""Algorithm 1 exactly as the paper writes it: one prompt at a time, the d x d design matrix H kept as its inverse
by Sherman-Morrison, every remaining candidate scored by v^T H^{-1} v. Slow on purpose; the fast selector in
``mass_dpo.selection`` must pick the same negatives in the same order. Also a brute force over all subsets."""

from __future__ import annotations

import itertools
import math

import torch

from mass_dpo.selection import TIE_TOLERANCE


def algorithm1(phi: torch.Tensor, logits: torch.Tensor, n: int, beta: float, gamma: float, center: bool = True):
    """One prompt. phi ``[N, d]``, logits ``[N]`` (only the valid candidates). Returns (indices, gains, logdet)."""
    N, d = phi.shape
    s = beta * logits  # line 3
    q = torch.exp(s - torch.logsumexp(s, 0))
    phibar = q @ phi if center else torch.zeros(d, dtype=phi.dtype)  # line 4
    v = q.sqrt()[:, None] * (phi - phibar)
    z = -torch.logsumexp(s, 0)  # line 5
    alpha0 = beta**2 * torch.sigmoid(-z)  # = beta^2 (1 - sigmoid(Z)), stable form
    h_inv = torch.eye(d, dtype=phi.dtype) / gamma  # line 6: H0 = gamma I
    chosen: list[int] = []
    gains: list[float] = []
    for _ in range(min(n, N)):  # lines 7-10
        score = alpha0 * torch.einsum("id,de,ie->i", v, h_inv, v)  # alpha0 v^T H^{-1} v (eq. 14)
        gain = torch.log1p(score)
        gain[chosen] = -math.inf
        best = gain.max()
        j = int(torch.nonzero(gain >= best - TIE_TOLERANCE * abs(best))[0])  # ties: lowest index
        chosen.append(j)
        gains.append(float(gain[j]))
        w = h_inv @ v[j]  # Sherman-Morrison: (H + a v v^T)^{-1} = H^{-1} - a H^{-1} v v^T H^{-1} / (1 + a v^T H^{-1} v)
        h_inv = h_inv - alpha0 * torch.outer(w, w) / (1 + alpha0 * v[j] @ w)
    h = gamma * torch.eye(d, dtype=phi.dtype) + alpha0 * v[chosen].T @ v[chosen]
    return chosen, gains, float(torch.linalg.slogdet(h)[1])


def subset_logdet(phi, logits, subset, beta, gamma, center=True) -> float:
    """log det H(S) (eq. 11) by slogdet of the d x d matrix."""
    N, d = phi.shape
    s = beta * logits
    q = torch.softmax(s, 0)
    phibar = q @ phi if center else torch.zeros(d, dtype=phi.dtype)
    v = q.sqrt()[:, None] * (phi - phibar)
    alpha0 = beta**2 * torch.sigmoid(torch.logsumexp(s, 0))
    idx = list(subset)
    h = gamma * torch.eye(d, dtype=phi.dtype) + alpha0 * v[idx].T @ v[idx]
    return float(torch.linalg.slogdet(h)[1])


def brute_force(phi, logits, n, beta, gamma, center=True):
    """The exact optimum of eq. 12 over all subsets of size n (small N only). Returns (subset, logdet)."""
    best, best_set = -math.inf, None
    for subset in itertools.combinations(range(phi.shape[0]), n):
        val = subset_logdet(phi, logits, subset, beta, gamma, center)
        if val > best:
            best, best_set = val, subset
    return best_set, best
