"""Negative selection: Algorithm 1 of the paper (D-optimal multi-negative active sample selection).

Notation (paper, Section 4 and Algorithm 1), per prompt x with chosen response y* and a pool of N candidates:

- ``phi[i]``     phi_i = phi(x, y_i) - phi(x, y*), the feature difference, shape ``[N, d]``;
- ``logits[i]``  l_i = phi_i . theta0 + b_i, the relative logit at the preprocessing point theta0
                 (for an LLM: Delta_i measured at the preprocessing checkpoint), shape ``[N]``;
- ``s = beta * l``, ``q = softmax(s)``, ``phibar = sum_j q_j phi_j``, ``v_i = sqrt(q_i) (phi_i - phibar)``;
- ``alpha0 = beta^2 (1 - sigmoid(Z))`` with ``Z = -logsumexp(s)``, computed as ``beta^2 sigmoid(logsumexp(s))``;
- ``H(S) = gamma I + alpha0 sum_{i in S} v_i v_i^T`` (eq. 11); the greedy rule (eq. 13-14) adds the candidate
  with the largest marginal gain ``log(1 + alpha0 v_i^T H^{-1} v_i)``.

How it is computed here: with ``u_i = sqrt(alpha0 / gamma) v_i`` and the N x N Gram matrix ``G = U U^T``,

    log det H(S) = d log gamma + log det(I + G[S, S])            (Sylvester's determinant identity)
    gain_i(S)    = log(1 + G_ii - G_iS (I + G_SS)^{-1} G_Si)      (Woodbury),

and ``G_iS (I + G_SS)^{-1} G_Si`` is kept up to date by an incremental Cholesky factor of ``I + G_SS``
(one rank-one update per selected negative, as in fast greedy MAP inference for determinantal point processes).
The cost per prompt is O(N^2 d) for the Gram matrix plus O(N n^2) for the greedy loop, against O(n N d^2) for the
d x d Sherman-Morrison form; no d x d matrix is ever formed. Everything is batched over prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._checks import bool_mask, positive_number

STRATEGIES = ("dopt", "random", "hardest", "all")
#: Strategies :func:`select_negatives` accepts beyond :data:`STRATEGIES` (not yet wired into the preprocessing CLI).
EXTRA_STRATEGIES = ("label_blind",)

#: Two marginal gains whose relative difference is below this count as a tie; ties go to the lowest index
#: (so exact duplicates, whose gains may differ in the last bits, are picked deterministically).
TIE_TOLERANCE = 1e-9


@dataclass
class Selection:
    """The result of :func:`select_negatives`.

    Attributes:
        indices: ``[..., k]`` int64 candidate indices in selection order, ``k = min(n, N)``
            (``N`` for strategy ``"all"``); ``-1`` where a pool has fewer valid candidates than ``k``.
        gains: ``[..., k]`` marginal gains ``log det H(S_j) - log det H(S_{j-1})`` of each step
            (``nan`` where the index is ``-1``).
        logdet: ``[...]`` ``log det H(S)`` of the d x d design matrix of the selected set,
            the ``d log gamma`` term included.
        alpha: ``[...]`` the fixed Fisher scale ``alpha0``.
    """

    indices: Any
    gains: Any
    logdet: Any
    alpha: Any


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
        return torch.as_tensor(np.asarray(x))
    raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(x).__name__}")


def _validate(phi, logits, mask, n, beta, gamma):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"n must be an integer, got {n!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    positive_number(beta, "beta", "the DPO scale")
    positive_number(gamma, "gamma", "the ridge keeps H(S) invertible")
    if phi.dim() != 3:
        raise ValueError(f"phi must have shape [N, d] or [B, N, d], got {tuple(phi.shape)}")
    if phi.shape[0] == 0 or phi.shape[2] == 0:
        raise ValueError(f"phi {tuple(phi.shape)} ([B, N, d]) has no {'prompts' if phi.shape[0] == 0 else 'features'}; "
                         "give at least one prompt and one feature per candidate")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [N] or [B, N], got {tuple(logits.shape)}")
    if logits.shape != phi.shape[:2]:
        raise ValueError(
            f"shapes disagree: phi is {tuple(phi.shape)} ([B, N, d]) but logits is {tuple(logits.shape)} ([B, N])"
        )
    if mask.shape != logits.shape:
        raise ValueError(f"shapes disagree: mask is {tuple(mask.shape)} but logits is {tuple(logits.shape)}")
    if not phi.is_floating_point() or not logits.is_floating_point():
        raise ValueError("phi and logits must be floating point")
    bad_logit = ~torch.isfinite(logits) & mask
    if bad_logit.any():
        b, i = (int(t) for t in bad_logit.nonzero()[0])
        raise ValueError(
            f"logits have NaN or inf values ({int(bad_logit.sum())} candidates, first: prompt {b}, candidate {i}); "
            "check the log-probabilities, or mask those candidates out"
        )


def _check_features(raw: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, offset: int) -> None:
    """NaN or inf anywhere in phi_i makes ||phi_i||^2 = P_ii non-finite: an O(B N) check instead of O(B N d)."""
    bad = ~torch.isfinite(torch.diagonal(raw, dim1=-2, dim2=-1)) & mask
    if not bad.any():
        return
    b, i = (int(t) for t in bad.nonzero()[0])
    if torch.isfinite(x[b, i]).all():
        raise ValueError(
            f"phi is too large for {x.dtype} (||phi||^2 overflows; prompt {b + offset}, candidate {i}); "
            "pass float64 features or rescale them"
        )
    raise _non_finite(bad, offset)


def _non_finite(bad: torch.Tensor, offset: int) -> ValueError:
    """The error for the candidates ``bad`` ``[b, N]`` (valid ones whose phi holds NaN or inf) of a chunk."""
    b, i = (int(t) for t in bad.nonzero()[0])
    return ValueError(
        f"phi has NaN or inf values ({int(bad.sum())} candidates in this chunk, first: prompt {b + offset}, "
        f"candidate {i}); check the feature extraction, or mask those candidates out"
    )


def fisher_weights(logits: torch.Tensor, mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Lines 3 and 5 of Algorithm 1, batched: ``q = softmax(beta l)`` ``[B, N]`` (0 where masked) and
    ``alpha0 = beta^2 (1 - sigmoid(Z))`` ``[B]``, ``Z = -logsumexp(beta l)``, computed as ``beta^2 sigmoid(-Z)``
    (the literal form rounds to 0)."""
    s = (beta * logits).masked_fill(~mask, float("-inf"))
    q = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return q, beta**2 * torch.sigmoid(torch.logsumexp(s, dim=-1))


def fisher_vectors(phi: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, beta: float, center: bool = True):
    """Lines 3-5 of Algorithm 1, batched.

    Args:
        phi: ``[B, N, d]`` feature differences; logits: ``[B, N]``; mask: ``[B, N]`` bool (True = valid).

    Returns:
        ``(v, alpha0)``: ``v`` ``[B, N, d]`` with ``v_i = sqrt(q_i) (phi_i - phibar)`` (zero where masked;
        ``sqrt(q_i) phi_i`` when ``center=False``) and ``alpha0`` ``[B]``.
    """
    q, alpha0 = fisher_weights(logits, mask, beta)
    phi = phi.masked_fill(~mask[..., None], 0.0)
    if center:
        phibar = torch.einsum("bn,bnd->bd", q, phi)
        phi = phi - phibar[:, None, :]
    v = q.sqrt()[..., None] * phi
    v = v.masked_fill(~mask[..., None], 0.0)
    return v, alpha0


def greedy_logdet(
    gram: torch.Tensor, mask: torch.Tensor, n: int, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy maximisation of ``log det(I + G[S, S])`` from the scaled Gram matrix, batched.

    Args:
        gram: ``[B, N, N]`` Gram matrix ``G = U U^T`` of the scaled Fisher vectors ``u_i = sqrt(alpha0/gamma) v_i``.
        mask: ``[B, N]`` bool, valid candidates.
        n: number of steps.
        order: optional ``[B, n]`` indices to add in this order instead of the greedy choice (``-1`` = none);
            used to score the subsets of the other strategies.

    Returns:
        ``(indices [B, n], gains [B, n])``; ``gains[b, k] = log(1 + G_ii - G_iS (I + G_SS)^{-1} G_Si)`` of the
        k-th pick, ``-1`` / ``nan`` past the number of valid candidates.
    """
    B, N, _ = gram.shape
    dev, dt = gram.device, gram.dtype
    rows = torch.arange(B, device=dev)
    # x_i = G_ii - ||c_i||^2: the quadratic form u_i^T (I + U_S^T U_S)^{-1} u_i, by incremental Cholesky.
    x = torch.diagonal(gram, dim1=-2, dim2=-1).clone()
    c = gram.new_zeros(B, n, N)  # Cholesky columns, one row per step
    available = mask.clone()
    indices = torch.full((B, n), -1, dtype=torch.long, device=dev)
    gains = torch.full((B, n), float("nan"), dtype=dt, device=dev)
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=dev)
    for k in range(n):
        has = available.any(-1)
        if order is None:
            g = torch.where(available, torch.log1p(x.clamp_min(0.0)), neg_inf)
            best = g.max(-1, keepdim=True).values
            # ties (relative difference below TIE_TOLERANCE) go to the lowest index
            tied = available & (g >= best - TIE_TOLERANCE * best.abs())
            j = tied.to(torch.int8).argmax(-1)
        else:
            j = order[:, k].clamp_min(0)
            has = has & (order[:, k] >= 0)
        xj = x[rows, j].clamp_min(0.0)
        dj = torch.sqrt(1.0 + xj)  # pivot of the Cholesky factor of I + G_SS
        # e_i = (G_ji - <c_j, c_i>) / d_j
        e = (gram[rows, j, :] - torch.einsum("bk,bkn->bn", c[rows, :, j], c)) / dj[:, None]
        e = torch.where(has[:, None], e, torch.zeros_like(e))
        c[:, k, :] = e
        x = x - e * e
        indices[:, k] = torch.where(has, j, torch.full_like(j, -1))
        gains[:, k] = torch.where(has, torch.log1p(xj), torch.full_like(xj, float("nan")))
        available[rows, j] = available[rows, j] & ~has
    return indices, gains


def _pick_random(mask: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    device = mask.device if generator is None else generator.device
    u = torch.rand(mask.shape, generator=generator, dtype=torch.float64, device=device).to(mask.device)
    u = u.masked_fill(~mask, -1.0)
    order = torch.argsort(u, dim=-1, descending=True, stable=True)[:, :k]
    valid = torch.gather(mask, 1, order)
    return torch.where(valid, order, torch.full_like(order, -1))


def _pick_sorted(key: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    key = key.masked_fill(~mask, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
    valid = torch.gather(mask, 1, order)
    return torch.where(valid, order, torch.full_like(order, -1))


def _chunk_size(N: int, d: int, itemsize: int, budget_bytes: int = 1 << 28) -> int:
    return max(1, budget_bytes // max(1, N * d * itemsize))


def scaled_gram(raw: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, center: bool = True) -> torch.Tensor:
    """The Gram matrix ``G_ij = (alpha0 / gamma) v_i . v_j`` from the raw Gram ``P = Phi Phi^T``, in float64.

    With ``v_i = sqrt(q_i) (phi_i - phibar)`` and ``phibar = sum_j q_j phi_j``:
    ``v_i . v_j = sqrt(q_i q_j) (P_ij - (Pq)_i - (Pq)_j + q^T P q)``, so the centering happens in N x N space and
    the features enter once, through the ``bmm`` that made ``raw`` (from features first moved by their pool's plain
    mean: :func:`_design`).

    Args:
        raw: ``[B, N, N]`` ``P = Phi Phi^T``; q: ``[B, N]`` softmax weights (0 where masked);
        scale: ``[B]`` ``alpha0 / gamma``; center: subtract ``phibar`` (Algorithm 1) or not (ablation).
    """
    p = raw.to(torch.float64)
    if center:
        r = torch.einsum("bij,bj->bi", p, q)  # (P q)_i
        c = torch.einsum("bi,bi->b", q, r)  # q^T P q
        p = p - r[:, :, None] - r[:, None, :] + c[:, None, None]
    w = q.sqrt()
    return p * (w[:, :, None] * w[:, None, :]) * scale[:, None, None]


def _design(phi, logits, mask, k: int, order, beta: float, gamma: float, center: bool):
    """The D-optimal design of Algorithm 1 for ``[B, N, d]`` inputs, in chunks of prompts: greedy picks
    (``order=None``) or the gains of a given ``order`` ``[B, k]``. Returns ``(indices, gains, logdet, alpha)``."""
    B, N, d = phi.shape
    q, alpha = fisher_weights(logits.to(torch.float64), mask, beta)  # [B, N] work, in float64 (cheap)
    idx_chunks, gain_chunks = [], []
    step = _chunk_size(N, d, 3 * max(phi.element_size(), 4))  # a chunk's float32 copy, its mean and its centring
    for lo in range(0, B, step):
        hi = min(B, lo + step)
        m, x = mask[lo:hi], phi[lo:hi]
        if phi.dtype not in (torch.float32, torch.float64):
            x = x.float()
        if not m.all():
            x = x.masked_fill(~m[..., None], 0.0)
        if center:  # v_i does not change when every phi_i of a pool moves by one vector (sum_j q_j = 1): remove the
            # pool's plain mean first, so that the float32 bmm never sums products of a large shared offset
            bad = ~torch.isfinite(x).all(-1) & m  # said before the mean spreads it over the pool
            if bad.any():
                raise _non_finite(bad, lo)
            mean = x.sum(1, keepdim=True) / m.sum(-1).clamp(min=1)[:, None, None].to(x.dtype)
            x = (x - mean).masked_fill(~m[..., None], 0.0)
        raw = torch.bmm(x, x.transpose(1, 2))  # [b, N, N], never d x d
        _check_features(raw, x, m, lo)
        gram = scaled_gram(raw, q[lo:hi], alpha[lo:hi] / gamma, center)
        ind, gain = greedy_logdet(gram, m, k, None if order is None else order[lo:hi])
        idx_chunks.append(ind)
        gain_chunks.append(gain)
    indices = torch.cat(idx_chunks)
    gains = torch.cat(gain_chunks)
    logdet = d * float(np.log(gamma)) + gains.nan_to_num(0.0).sum(-1)
    return indices, gains, logdet, alpha


def _label_blind_order(phi, logits, mask, k: int, beta: float, gamma: float, center: bool) -> torch.Tensor:
    """``[B, k]`` the label-blind greedy: Algorithm 1 over all ``N + 1`` responses, then ``y*`` dropped.

    The pool is rebuilt with ``y*`` as one more response (``phi = 0``, logit ``0``: every input is relative to it)
    and re-referenced to the mean response of the pool, a reference that does not depend on which response won
    (features and logits both; with ``center=True`` the feature shift changes nothing, the logit shift fixes
    ``alpha0``). The greedy order over the ``N + 1`` responses is therefore the same whichever response is ``y*``;
    the negatives are its first ``k`` entries other than ``y*``.
    """
    B, N, d = phi.shape
    x = phi.to(torch.float64 if phi.dtype == torch.float64 else torch.float32).masked_fill(~mask[..., None], 0.0)
    full = torch.cat([x, x.new_zeros(B, 1, d)], 1)  # [B, N + 1, d], y* last
    l64 = logits.to(torch.float64).masked_fill(~mask, 0.0)
    full_logits = torch.cat([l64, l64.new_zeros(B, 1)], 1)
    full_mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
    count = full_mask.sum(-1).to(torch.float64)  # [B]
    full = full - (full.sum(1) / count[:, None].to(full.dtype))[:, None, :]
    full_logits = full_logits - (full_logits.sum(1) / count)[:, None]
    full = full.masked_fill(~full_mask[..., None], 0.0)
    order, _, _, _ = _design(full, full_logits, full_mask, min(k + 1, N + 1), None, beta, gamma, center)
    keep = (order >= 0) & (order != N)
    first = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :k]  # kept entries first, in order
    picked = torch.gather(order, 1, first)
    return torch.where(torch.gather(keep, 1, first), picked, torch.full_like(picked, -1))


def _prepare(phi, logits, mask):
    """Tensors ``[B, N, d]``, ``[B, N]``, ``[B, N]`` bool from any accepted input, detached (a selection is
    preprocessing: no graph to keep); ``single`` for ``[N, d]`` input."""
    phi = _as_tensor(phi, "phi").detach()
    logits = _as_tensor(logits, "logits").detach().to(phi.device)
    single = phi.dim() == 2
    if single:
        phi = phi[None]
        if logits.dim() == 1:
            logits = logits[None]
    if mask is None:
        mask = torch.ones(logits.shape, dtype=torch.bool, device=phi.device)
    else:
        mask = bool_mask(_as_tensor(mask, "mask"), device=phi.device)
        if single and mask.dim() == 1:
            mask = mask[None]
    return phi, logits, mask, single


def _result(indices, gains, logdet, alpha, single: bool, numpy_out: bool) -> Selection:
    if single:
        indices, gains, logdet, alpha = indices[0], gains[0], logdet[0], alpha[0]
    if numpy_out:
        return Selection(indices.cpu().numpy(), gains.cpu().numpy(), logdet.cpu().numpy(), alpha.cpu().numpy())
    return Selection(indices, gains, logdet, alpha)


def _check_order(order: torch.Tensor, mask: torch.Tensor) -> None:
    """Each row of ``order`` ``[B, k]``: distinct indices of valid candidates, then ``-1`` (none) to pad."""
    N = mask.shape[1]
    problems = [
        (order >= N, f"an index >= the pool size {N}"),
        (order < -1, "an index below -1"),
        ((order >= 0) & ~torch.gather(mask, 1, order.clamp(0, N - 1)), "a masked-out candidate"),
        (((order[:, :, None] == order[:, None, :]) & (order >= 0)[:, :, None]  # [B, earlier, later]
          & torch.ones(order.shape[1], order.shape[1], dtype=torch.bool, device=order.device).triu(1)).any(1),
         "a repeated index"),
    ]
    for bad, what in problems:
        if bad.any():
            b, k = (int(t) for t in bad.nonzero()[0][:2])
            raise ValueError(f"order holds {what} (prompt {b}, entry {k}: {int(order[b, k])}); give distinct indices of "
                             "valid candidates, -1 for none")


def score_subset(phi, logits, order, *, beta: float = 0.1, gamma: float = 0.1, center: bool = True, mask=None
                 ) -> Selection:
    """Score given subsets under the D-optimal criterion of Algorithm 1 (eq. 11-14), without choosing them.

    Args:
        phi, logits, mask: as for :func:`select_negatives`.
        order: ``[k]`` or ``[B, k]`` candidate indices in the order they are added (``-1`` = none).

    Returns:
        :class:`Selection` with ``indices = order`` and the marginal ``gains``, ``logdet`` and ``alpha`` of that order.
    """
    numpy_in = not isinstance(phi, torch.Tensor)
    phi, logits, mask, single = _prepare(phi, logits, mask)
    order = _as_tensor(order, "order").to(device=phi.device)
    if order.is_floating_point() or order.dtype == torch.bool:
        raise ValueError(f"order must hold integer candidate indices, got {order.dtype}")
    order = order.long()
    if single and order.dim() == 1:
        order = order[None]
    _validate(phi, logits, mask, 0, beta, gamma)
    if order.dim() != 2 or order.shape[0] != phi.shape[0]:
        raise ValueError(f"order must be [B, k] with B = {phi.shape[0]}, got {tuple(order.shape)}")
    _check_order(order, mask)
    _, gains, logdet, alpha = _design(phi, logits, mask, order.shape[1], order, beta, gamma, center)
    return _result(order, gains, logdet, alpha, single, numpy_in)


def select_negatives(
    phi,
    logits,
    n: int,
    *,
    beta: float = 0.1,
    gamma: float = 0.1,
    strategy: str = "dopt",
    center: bool = True,
    mask=None,
    generator: torch.Generator | None = None,
) -> Selection:
    """Select ``n`` negatives per prompt (Algorithm 1 for ``strategy="dopt"``).

    Args:
        phi: ``[N, d]`` or ``[B, N, d]`` feature differences ``phi(x, y_i) - phi(x, y*)`` (torch or numpy).
        logits: ``[N]`` or ``[B, N]`` relative logits ``l_i = phi_i . theta0 + b_i``; ``s = beta * l``.
        n: negatives to select; ``n > N`` returns every valid candidate.
        beta: the DPO scale. gamma: the ridge of ``H(S) = gamma I + alpha0 sum v v^T``.
        strategy: ``"dopt"`` (greedy D-optimal, MASS-DPO), ``"random"`` (uniform without replacement, S-DPO),
            ``"hardest"`` (top-n logits), ``"all"`` (every valid candidate, ``n`` ignored), ``"label_blind"``
            (Algorithm 1 run over all ``N + 1`` responses, ``y*`` included, with features and logits relative to the
            pool mean, then ``y*`` dropped: which responses are picked does not depend on which one won, apart from
            ``y*`` itself being left out; see :func:`_label_blind_order`).
        center: ``False`` drops the weighted centering (``v_i = sqrt(q_i) phi_i``), an ablation.
        mask: ``[B, N]`` bool, True for real candidates (pools of different sizes).
        generator: ``torch.Generator`` for ``"random"``.

    Returns:
        :class:`Selection`; numpy in, numpy out, torch in, torch out (on the input's device, detached). ``gains``
        and ``logdet`` score the selected subset under the D-optimal criterion whatever the strategy.
    """
    if strategy not in STRATEGIES + EXTRA_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES + EXTRA_STRATEGIES)}")
    numpy_in = not isinstance(phi, torch.Tensor)
    phi, logits, mask, single = _prepare(phi, logits, mask)
    _validate(phi, logits, mask, n, beta, gamma)

    B, N, d = phi.shape
    k = N if strategy == "all" else min(int(n), N)
    if strategy == "random":
        order = _pick_random(mask, k, generator)
    elif strategy == "hardest":
        order = _pick_sorted(logits.to(torch.float64), mask, k)
    elif strategy == "all":
        order = _pick_sorted(mask.to(torch.float64), mask, k)  # valid candidates, in index order
    elif strategy == "label_blind":
        bad = ~torch.isfinite(phi).all(-1) & mask  # before its re-centering spreads a NaN over the pool
        if bad.any():
            b, i = (int(t) for t in bad.nonzero()[0])
            raise ValueError(f"phi has NaN or inf values ({int(bad.sum())} candidates, first: prompt {b}, candidate "
                             f"{i}); check the features, or mask those candidates out")
        order = _label_blind_order(phi, logits, mask, k, beta, gamma, center)
    else:
        order = None

    indices, gains, logdet, alpha = _design(phi, logits, mask, k, order, beta, gamma, center)
    return _result(indices, gains, logdet, alpha, single, numpy_in)
