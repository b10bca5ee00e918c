"""The toy log-linear model: a synthetic check of Section 5's bounds (Theorems 5.1, 5.2 and C.1).

torch/numpy only. The notebook ``notebooks/toy_loglinear.ipynb`` calls the experiment drivers at the bottom
(:func:`n_sweep`, :func:`k_sweep`, :func:`exact_sweep` through :func:`run_all`, and :func:`regime_sweep` through
:func:`run_regime_sweep`) and only plots their records. Every driver's records are cached on disk by a hash of its
parameters (:func:`cached_records`), so a second run of the notebook only reads them back.

Model (Assumption 4.1): ``pi(y | x; theta) ∝ exp(phi(x, y) . theta)`` with a uniform reference policy, so the
offsets ``b_i = log ref(y*) - log ref(y_i)`` are all 0 (the paper has no toy setup that says otherwise).

Data. Each prompt has ``N + 1`` responses with features ``phi(x, y) in R^d``. The preferred response ``y*`` is
drawn from the Plackett-Luce model (eq. 4) whose reward is the DPO reward of the policy at ``theta_true``,
``r(x, y) = beta log pi(y|x; theta_true) / ref(y|x) = beta phi(x, y) . theta_true + const``, i.e.
``P(y* = y) ∝ exp(beta phi(x, y) . theta_true)``; the other ``N`` responses are the candidate negatives and
``phi_i = phi(x, y_i) - phi(x, y*)``. With this choice the full-pool loss (eq. 7 summed over prompts) is exactly the
Plackett-Luce negative log-likelihood of the observed choices in the parameter ``theta``, so its unregularised
minimiser is a consistent estimate of ``theta_true`` itself (sampling ``∝ exp(phi . theta_true)`` without the
``beta`` would make the loss estimate ``theta_true / beta`` instead). ``theta_true`` is scaled so that the true
rewards ``beta phi . theta_true`` have standard deviation ``signal`` on isotropic pools; ``feature_scale`` plays the
role of log-probability units (for an LLM, ``phi . theta`` is a log-probability difference of order tens).

Pool shapes: ``"isotropic"`` (``phi(x, y) ~ N(0, feature_scale^2 I)``) and ``"clustered"`` (a few cluster centres
per prompt with Dirichlet(1) cluster sizes; members are near-duplicates ``centre + cluster_noise * feature_scale *
N(0, I)``), the redundant pools MASS-DPO is built for.

Objective (Appendix A, Theorem A.2; Appendix B for one prompt): over ``k`` prompts,

    F(theta; S) = (1/k) sum_p L(theta; S_p) + (gamma / 2) ||theta||^2,

``L`` the per-prompt loss of eq. 7. ``theta_*`` minimises it on the full pools, ``theta_hat_n`` on the subsets
``S_n`` (one per prompt, chosen by :func:`mass_dpo.select_negatives`). The average (not the sum) over prompts is the
paper's scaling; it reduces to Appendix B's ``L(theta; C) + gamma/2 ||theta||^2`` for one prompt, and with it the ridge
does not fade as ``k`` grows (so ``theta_*`` stays a little shrunk towards 0 relative to ``theta_true``).
Fits are Newton steps with the closed-form gradient and Hessian (eq. 9, 10) and a backtracking line search.

Preprocessing point ``theta0`` (Algorithm 1, line 3): ``"pilot"`` (a full-pool ridge fit on separate pilot prompts:
the model one would have before training), ``"zero"`` (no prior knowledge: ``q^0`` uniform, and every logit ties so
``"hardest"`` degenerates to index order) or ``"true"`` (an oracle).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .losses import loglinear_grad, loglinear_hessian, loglinear_loss
from .selection import fisher_vectors, select_negatives

SHAPES = ("isotropic", "clustered")
THETA0_KINDS = ("pilot", "zero", "true")
#: (strategy, center) pairs compared on every figure: Algorithm 1, its label-blind variant (the greedy over all
#: ``N + 1`` responses without knowing which won, ``y*`` dropped afterwards), its uncentred ablation, two baselines.
METHODS = (("dopt", True), ("label_blind", True), ("dopt", False), ("random", True), ("hardest", True))
#: The methods of the regime sweep (:func:`regime_sweep`).
REGIME_METHODS = (("dopt", True), ("label_blind", True), ("random", True))
DTYPE = torch.float64
#: The k sweep's extra estimator: label-blind subsets, fitted only on the prompts whose ``y*`` the greedy picked.
KEPT_LABEL = "label-blind, only prompts with y* picked"
#: Bump when a change to this module changes any cached record (:func:`cached_records`).
CACHE_VERSION = 2


def method_label(strategy: str, center: bool) -> str:
    """Human-readable name of a (strategy, center) pair, used as the ``method`` column of every record."""
    names = {"dopt": "D-optimal", "label_blind": "label-blind D-optimal", "random": "random", "hardest": "hardest"}
    label = names.get(strategy, strategy)
    if strategy == "dopt":
        label += " (centred)" if center else " (uncentred)"
    elif strategy == "label_blind" and not center:
        label += " (uncentred)"
    return label


def seed_for(*parts) -> int:
    """A stable 31-bit seed from any parts (e.g. ``seed_for("n_sweep", "clustered", 3)``)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------- synthetic problems


@dataclass
class Pools:
    """Synthetic prompts: ``P`` prompts, ``N`` candidate negatives each, features in ``R^d``.

    Attributes:
        phi: ``[P, N, d]`` feature differences ``phi(x, y_i) - phi(x, y*)``.
        b: ``[P, N]`` reference offsets (zeros: uniform reference).
        clusters: ``[P, N]`` cluster id of each candidate (``-1`` on isotropic pools).
        clusters_present: ``[P]`` number of distinct clusters among the candidates (0 on isotropic pools).
    """

    phi: torch.Tensor
    b: torch.Tensor
    clusters: torch.Tensor
    clusters_present: torch.Tensor


def make_theta_true(d: int, *, beta: float, signal: float, feature_scale: float, generator: torch.Generator):
    """``[d]`` a random direction scaled so that ``beta phi . theta_true ~ N(0, signal^2)`` on isotropic pools."""
    u = torch.randn(d, generator=generator, dtype=DTYPE)
    return u / u.norm() * (signal / (beta * feature_scale))


def make_pools(
    num_prompts: int,
    N: int,
    d: int,
    *,
    theta_true: torch.Tensor,
    beta: float,
    shape: str = "isotropic",
    feature_scale: float = 1.0,
    num_clusters: int = 6,
    cluster_noise: float = 0.05,
    generator: torch.Generator,
) -> Pools:
    """Draw ``num_prompts`` prompts of ``N + 1`` responses; ``y*`` ~ Plackett-Luce at ``theta_true``.

    See the module docstring for the model; ``generator`` makes the draw reproducible.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown pool shape {shape!r}; choose one of {', '.join(SHAPES)}")
    P, M = num_prompts, N + 1
    g = generator
    if shape == "isotropic":
        feats = feature_scale * torch.randn(P, M, d, generator=g, dtype=DTYPE)
        labels = torch.full((P, M), -1, dtype=torch.long)
    else:
        centres = feature_scale * torch.randn(P, num_clusters, d, generator=g, dtype=DTYPE)
        sizes = -torch.log(torch.rand(P, num_clusters, generator=g, dtype=DTYPE))  # Dirichlet(1) weights
        labels = torch.multinomial(sizes / sizes.sum(-1, keepdim=True), M, replacement=True, generator=g)
        noise = cluster_noise * feature_scale * torch.randn(P, M, d, generator=g, dtype=DTYPE)
        feats = torch.gather(centres, 1, labels[..., None].expand(P, M, d)) + noise
    rewards = beta * feats @ theta_true.to(DTYPE)  # [P, M], the DPO reward at theta_true
    gumbel = -torch.log(-torch.log(torch.rand(P, M, generator=g, dtype=DTYPE)))
    chosen = (rewards + gumbel).argmax(-1)  # Gumbel-max: P(y* = y) = softmax(rewards)
    others = torch.arange(N)[None, :] + (torch.arange(N)[None, :] >= chosen[:, None]).long()  # [P, N]
    rows = torch.arange(P)[:, None]
    phi = feats[rows, others] - feats[torch.arange(P), chosen][:, None, :]
    clusters = labels[rows, others]
    if shape == "isotropic":
        present = torch.zeros(P, dtype=torch.long)
    else:
        present = torch.nn.functional.one_hot(clusters, num_clusters).any(1).sum(-1)
    return Pools(phi=phi, b=torch.zeros(P, N, dtype=DTYPE), clusters=clusters, clusters_present=present)


# ---------------------------------------------------------------- ridge-regularised objective and its fit


def ridge_objective(theta, phi, b, beta: float, gamma: float, mask=None) -> torch.Tensor:
    """``F(theta) = mean_p L(theta; S_p) + gamma/2 ||theta||^2`` (eq. 7; Appendix A.2).

    ``theta [d]``, ``phi [P, N, d]``, ``b [P, N]``, ``mask [P, N]`` (True = in the subset ``S_p``).
    """
    return loglinear_loss(theta, phi, b, beta, mask).mean() + 0.5 * gamma * theta @ theta


def ridge_gradient(theta, phi, b, beta: float, gamma: float, mask=None) -> torch.Tensor:
    """``[d]`` gradient of :func:`ridge_objective` (eq. 9 averaged over prompts, plus ``gamma theta``)."""
    return loglinear_grad(theta, phi, b, beta, mask).mean(0) + gamma * theta


def ridge_hessian(theta, phi, b, beta: float, gamma: float, mask=None) -> torch.Tensor:
    """``[d, d]`` Hessian of :func:`ridge_objective` (eq. 10 averaged over prompts, plus ``gamma I``).

    Eq. 10 per prompt is ``beta^2 w [sigma(Z) phibar phibar^T + sum_j q_j (phi_j - phibar)(phi_j - phibar)^T]`` with
    ``w = 1 - sigma(Z)``; summed over prompts it is ``C^T C + U^T U`` with rows ``sqrt(w q_j) (phi_j - phibar)`` and
    ``sqrt(w sigma(Z)) phibar``: two ``[P N, d]`` products instead of ``P`` matrices ``d x d`` (d = 576 fits in memory).
    """
    P, N, d = phi.shape
    s = beta * (phi @ theta + b)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # = -Z
    q = torch.softmax(s, dim=-1)
    w, sig = torch.sigmoid(lse), torch.sigmoid(-lse)  # 1 - sigma(Z), sigma(Z)
    phibar = torch.einsum("pn,pnd->pd", q, phi)
    c = ((w[:, None] * q).sqrt()[..., None] * (phi - phibar[:, None, :])).reshape(P * N, d)
    u = (w * sig).sqrt()[:, None] * phibar
    H = beta**2 * (c.T @ c + u.T @ u) / P
    return H + gamma * torch.eye(d, dtype=H.dtype)


@dataclass
class FitReport:
    """Result of :func:`fit_ridge`: the minimiser and how the solver got there."""

    theta: torch.Tensor
    objective: float
    grad_norm: float
    iterations: int
    converged: bool
    message: str


def fit_ridge(
    phi, b, beta: float, gamma: float, mask=None, *, theta_init=None, tol: float = 1e-10, max_iter: int = 100
) -> FitReport:
    """Minimise :func:`ridge_objective` by Newton's method with a backtracking (Armijo) line search.

    The objective is strictly convex (``gamma > 0``), so the Newton direction is a descent direction. Stops when
    ``||grad F|| < tol``. Near the optimum the predicted decrease ``g^T H^{-1} g`` falls below what float64 can resolve
    in ``F``, and an Armijo test would only see rounding noise; a step whose predicted decrease is below
    ``1e-12 max(1, |F|)`` is therefore taken in full (the region of Newton's local quadratic convergence).
    """
    phi, b = phi.to(DTYPE), b.to(DTYPE)
    d = phi.shape[-1]
    theta = torch.zeros(d, dtype=DTYPE) if theta_init is None else theta_init.detach().to(DTYPE).clone()
    f = float(ridge_objective(theta, phi, b, beta, gamma, mask))
    for it in range(max_iter + 1):
        g = ridge_gradient(theta, phi, b, beta, gamma, mask)
        gn = float(g.norm())
        if not math.isfinite(gn):
            return FitReport(theta, f, gn, it, False, "non-finite gradient")
        if gn < tol:
            return FitReport(theta, f, gn, it, True, "gradient norm below tol")
        if it == max_iter:
            break
        H = ridge_hessian(theta, phi, b, beta, gamma, mask)
        step = -torch.linalg.solve(H, g)
        slope = float(g @ step)  # = -(Newton decrement)^2 < 0
        if -slope < 1e-12 * max(1.0, abs(f)):  # predicted decrease below what float64 can resolve in f
            theta = theta + step
            f = float(ridge_objective(theta, phi, b, beta, gamma, mask))
            continue
        t = 1.0
        while t > 1e-12:
            trial = theta + t * step
            f_trial = float(ridge_objective(trial, phi, b, beta, gamma, mask))
            if f_trial <= f + 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            return FitReport(theta, f, gn, it, False, "line search failed")
        theta, f = trial, f_trial
    return FitReport(theta, f, gn, max_iter, False, f"no convergence in {max_iter} Newton steps")


def prefix_mask(order: torch.Tensor, n: int, N: int) -> torch.Tensor:
    """``[P, N]`` bool mask of the first ``n`` selected indices of ``order [P, k]`` (``-1`` entries ignored)."""
    idx = order[:, :n]
    mask = torch.zeros(order.shape[0], N, dtype=torch.bool)
    valid = idx >= 0
    rows = torch.arange(order.shape[0])[:, None].expand_as(idx)
    mask[rows[valid], idx[valid]] = True
    return mask


# ---------------------------------------------------------------- the quantities of Section 5


def relative_logit_error(phi: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Eq. 15 per prompt: ``max_{i,j in C} |(phi_i - phi_j) . delta|`` = ``max_i phi_i.delta - min_i phi_i.delta``.

    ``phi [P, N, d]``, ``delta [d]`` (``theta_hat_n - theta_*``). Returns ``[P]``.
    """
    z = phi.to(DTYPE) @ delta.to(DTYPE)
    return z.max(-1).values - z.min(-1).values


def sigma_matrix(theta, phi, b, beta: float, gamma: float, mask=None, *, per_prompt: bool = False):
    """``Sigma = gamma I + Hessian of L(theta; S)`` at ``theta`` (Assumption C.4 / Theorem 5.2).

    ``per_prompt=True``: ``[P, d, d]``, one prompt's Hessian each (``Sigma_n`` of Theorem C.1); else ``[d, d]``
    with the Hessian averaged over prompts (``Sigma_{k,n}`` of Theorem 5.2, for the averaged objective).
    """
    H = loglinear_hessian(theta.to(DTYPE), phi.to(DTYPE), b.to(DTYPE), beta, mask)
    if not per_prompt:
        H = H.mean(0)
    return H + gamma * torch.eye(H.shape[-1], dtype=DTYPE)


def sigma_norm(delta: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``||delta||_Sigma = sqrt(delta^T Sigma delta)``."""
    return torch.sqrt(delta @ sigma @ delta)


def curvature_scale(theta, phi, b, beta: float) -> torch.Tensor:
    """``[P]`` ``beta^2 (1 - sigmoid(Z_C(theta)))`` of Assumption C.2, on the full pools."""
    lse = torch.logsumexp(beta * (phi.to(DTYPE) @ theta.to(DTYPE) + b), dim=-1)
    return beta**2 * torch.sigmoid(lse)


def batch_error_bound(k: int, d: int, c_min: float, gamma: float, delta: float = 0.05) -> float:
    """Right-hand side of eq. 16 (Theorem 5.2); ``nan`` where it is undefined (``c_min k >= gamma``)."""
    if c_min * k >= gamma:
        return float("nan")
    inner = (1.0 / delta + k * c_min / gamma) / ((1.0 - c_min * k / gamma) ** (1.0 / d) * delta)
    return math.sqrt(d / 4.0 * math.log(inner)) + 2.0 * math.sqrt(gamma)


def design_vectors(phi, logits, beta: float):
    """Algorithm 1, lines 3-5 (centred): ``(v [P, N, d], alpha0 [P], q0 [P, N], phitilde [P, N, d])``."""
    phi, logits = phi.to(DTYPE), logits.to(DTYPE)
    mask = torch.ones(logits.shape, dtype=torch.bool)
    v, alpha0 = fisher_vectors(phi, logits, mask, beta, center=True)
    q0 = torch.softmax(beta * logits, dim=-1)
    phitilde = phi - torch.einsum("pn,pnd->pd", q0, phi)[:, None, :]
    return v, alpha0, q0, phitilde


@dataclass
class LeverageBound:
    """Theorem C.1 per prompt and per subset size: every field but the last three is ``[P, len(n_values)]``.

    ``leverage``: ``max_i (phi_i - phibar_0)^T Sigma_n^{-1} (phi_i - phibar_0)``; ``bound``: ``B_n``;
    ``kappa``, ``rho``: the constants of Assumptions C.3 and C.4 measured on this subset; ``q_min``, ``alpha0``,
    ``L_v``: ``[P]`` pool constants.
    """

    leverage: torch.Tensor
    bound: torch.Tensor
    kappa: torch.Tensor
    rho: torch.Tensor
    q_min: torch.Tensor
    alpha0: torch.Tensor
    L_v: torch.Tensor


def leverage_bound(phi, b, logits, order, n_values, theta_star, beta: float, gamma: float) -> LeverageBound:
    """Centred leverage and the bound ``B_n`` of Theorem C.1, with ``kappa`` and ``rho`` measured, not assumed.

    Args:
        phi: ``[P, N, d]``; b: ``[P, N]``; logits: ``[P, N]`` at the preprocessing point ``theta0``;
        order: ``[P, k]`` selected indices in selection order (any strategy); n_values: subset sizes ``<= k``;
        theta_star: ``[d]`` where ``Sigma_n = gamma I + Hessian L(theta_*; S_n)`` (per prompt) is evaluated.

    ``kappa`` (Assumption C.3) is measured along the selection order as
    ``max_{t < n} max_i v_i^T H_t^{-1} v_i / v_{i_{t+1}}^T H_t^{-1} v_{i_{t+1}}``, which for Algorithm 1 is the
    paper's ``kappa`` (the greedy pick maximises the denominator over the unselected candidates) and for any other
    order keeps the proof of Theorem C.1 valid. ``rho`` (Assumption C.4) is the largest value ``<= 1`` with
    ``Sigma_n >= rho H_n^0``: ``min(1, lambda_min(H_n^{0,-1/2} Sigma_n H_n^{0,-1/2}))``. With both measured this way
    the bound holds by construction; the figure shows how tight it is.
    """
    phi, b = phi.to(DTYPE), b.to(DTYPE)
    P, N, d = phi.shape
    v, alpha0, q0, phitilde = design_vectors(phi, logits, beta)
    eye = torch.eye(d, dtype=DTYPE)
    rows = torch.arange(P)
    n_max = max(n_values)
    H = gamma * eye.expand(P, d, d).clone()
    ratios, designs = [], [H.clone()]
    for t in range(n_max):
        lev = torch.einsum("pnd,pde,pne->pn", v, torch.linalg.inv(H), v)
        pick = order[:, t]
        ratios.append(lev.max(-1).values / lev[rows, pick])
        H = H + alpha0[:, None, None] * torch.einsum("pd,pe->pde", v[rows, pick], v[rows, pick])
        designs.append(H.clone())
    kappa_steps = torch.cummax(torch.stack(ratios, -1), dim=-1).values  # [P, n_max]
    q_min = q0.min(-1).values
    L_v = (v * v).sum(-1).max(-1).values
    out = {key: [] for key in ("leverage", "bound", "kappa", "rho")}
    for n in n_values:
        mask = prefix_mask(order, n, N)
        sigma = sigma_matrix(theta_star, phi, b, beta, gamma, mask, per_prompt=True)
        lev = torch.einsum("pnd,pde,pne->pn", phitilde, torch.linalg.inv(sigma), phitilde).max(-1).values
        chol = torch.linalg.cholesky(designs[n])
        Linv = torch.linalg.inv(chol)
        rho = torch.linalg.eigvalsh(Linv @ sigma @ Linv.transpose(-1, -2))[:, 0].clamp(max=1.0)
        kappa = kappa_steps[:, n - 1]
        bound = (
            kappa / (rho * q_min) * (1 + alpha0 * L_v / gamma) / alpha0
            * (d / n) * torch.log1p(alpha0 * n * L_v / (gamma * d))
        )
        for key, val in zip(out, (lev, bound, kappa, rho)):
            out[key].append(val)
    stacked = {key: torch.stack(val, -1) for key, val in out.items()}
    return LeverageBound(**stacked, q_min=q_min, alpha0=alpha0, L_v=L_v)


def _scaled_gram(phi, logits, beta: float, gamma: float, center: bool) -> torch.Tensor:
    """``[P, N, N]`` ``G = U U^T`` with ``u_i = sqrt(alpha0 / gamma) v_i``.

    Then ``log det H(S) = d log gamma + log det(I + G_SS)`` (Sylvester's determinant identity).
    """
    phi, logits = phi.to(DTYPE), logits.to(DTYPE)
    v, alpha0 = fisher_vectors(phi, logits, torch.ones(logits.shape, dtype=torch.bool), beta, center)
    return torch.einsum("pnd,pmd->pnm", v, v) * (alpha0 / gamma)[:, None, None]


def _logdet_gain_from_gram(gram: torch.Tensor, subsets: torch.Tensor) -> torch.Tensor:
    """``log det(I + G[S, S])`` for ``gram [P, N, N]`` and ``subsets [P, S, n]`` (indices). Returns ``[P, S]``."""
    P, S, n = subsets.shape
    if n == 0:
        return torch.zeros(P, S, dtype=DTYPE)
    rows = torch.arange(P)[:, None, None, None]
    sub = gram[rows, subsets[..., :, None], subsets[..., None, :]]  # [P, S, n, n]
    chol = torch.linalg.cholesky(torch.eye(n, dtype=DTYPE) + sub)
    return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


def logdet_gain(phi, logits, indices, beta: float, gamma: float, center: bool = True) -> torch.Tensor:
    """``[P]`` ``log det H(S) - log det(gamma I)`` (eq. 11) of the subsets ``indices [P, n]``; 0 for the empty set.

    This gain over the empty design is monotone submodular with value 0 at the empty set, so greedy reaches at least
    ``1 - 1/e`` of its optimum (the raw ``log det H(S)`` includes ``d log gamma < 0`` and has no such ratio).
    """
    gram = _scaled_gram(phi, logits, beta, gamma, center)
    return _logdet_gain_from_gram(gram, indices[:, None, :])[:, 0]


def exact_best_logdet_gain(phi, logits, n: int, beta: float, gamma: float, center: bool = True) -> torch.Tensor:
    """``[P]`` brute-force ``max_{|S| = n} log det H(S) - log det(gamma I)`` over all subsets (eq. 12; small ``N``)."""
    N = phi.shape[-2]
    if math.comb(N, n) > 200_000:
        raise ValueError(f"C({N}, {n}) = {math.comb(N, n)} subsets is too many for brute force")
    gram = _scaled_gram(phi, logits, beta, gamma, center)
    combos = torch.tensor(list(itertools.combinations(range(N), n)), dtype=torch.long).reshape(-1, n)
    best = torch.full((phi.shape[0],), float("-inf"), dtype=DTYPE)
    for lo in range(0, combos.shape[0], 4096):
        chunk = combos[lo : lo + 4096]
        gains = _logdet_gain_from_gram(gram, chunk[None].expand(phi.shape[0], -1, -1))
        best = torch.maximum(best, gains.max(-1).values)
    return best


def cluster_coverage(indices: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """``[P]`` number of distinct clusters among the selected candidates ``indices [P, n]`` (``clusters [P, N]``)."""
    picked = torch.gather(clusters, 1, indices.clamp_min(0))
    picked = torch.where(indices >= 0, picked, torch.full_like(picked, -1))
    K = int(clusters.max()) + 2
    onehot = torch.nn.functional.one_hot(picked + 1, K)[..., 1:]  # drop the -1 slot
    return onehot.any(1).sum(-1)


def preference_accuracy(theta: torch.Tensor, phi: torch.Tensor) -> float:
    """Top-1 accuracy: share of prompts where ``theta`` ranks ``y*`` above all candidates (all ``phi_i.theta < 0``)."""
    return float(((phi.to(DTYPE) @ theta.to(DTYPE)).max(-1).values < 0).to(DTYPE).mean())


def loglog_slope(x, y) -> float:
    """Least-squares slope of ``log y`` on ``log x`` over the points where both are positive and finite."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


# ---------------------------------------------------------------- experiment drivers (records for the notebook)


@dataclass
class ToyConfig:
    """Every setting of the toy experiments (the notebook's parameters cell; see ``params/toy_loglinear.yaml``)."""

    d: int
    pool_size: int  # N, candidates per prompt
    n_grid: list  # subset sizes n for Theorems 5.1 / C.1
    num_prompts: int  # prompts per fit in the n sweep
    k_grid: list  # numbers of prompts k for Theorem 5.2
    k_sweep_n: int  # negatives per prompt in the k sweep
    beta: float
    gamma: float
    signal: float  # std of the true rewards beta phi . theta_true
    feature_scale: float  # std of each feature coordinate
    num_clusters: int
    cluster_noise: float  # near-duplicate spread, relative to feature_scale
    theta0: str  # "pilot" | "zero" | "true"
    pilot_prompts: int
    num_test_prompts: int
    exact_pool_size: int  # N for the brute-force comparison
    exact_prompts: int
    coverage_max_n: int
    tol: float = 1e-10
    max_iter: int = 100
    methods: tuple = field(default=METHODS)

    def __post_init__(self):
        if self.theta0 not in THETA0_KINDS:
            raise ValueError(f"theta0 must be one of {', '.join(THETA0_KINDS)}, got {self.theta0!r}")
        if max(self.n_grid) > self.pool_size or min(self.n_grid) < 1:
            raise ValueError(f"n_grid must lie in [1, pool_size={self.pool_size}], got {self.n_grid}")
        if not 1 <= self.k_sweep_n <= self.pool_size:
            raise ValueError(f"k_sweep_n must lie in [1, pool_size={self.pool_size}], got {self.k_sweep_n}")

    def as_dict(self) -> dict:
        return asdict(self)


def _problem(cfg: ToyConfig, shape: str, seed: int, tag: str, num_prompts: int, N: int):
    """theta_true, training pools, the preprocessing point theta0 and its fit report, for one (shape, seed)."""
    gen = torch.Generator().manual_seed(seed_for(tag, shape, seed))
    theta_true = make_theta_true(cfg.d, beta=cfg.beta, signal=cfg.signal, feature_scale=cfg.feature_scale,
                                 generator=gen)
    kw = dict(theta_true=theta_true, beta=cfg.beta, shape=shape, feature_scale=cfg.feature_scale,
              num_clusters=cfg.num_clusters, cluster_noise=cfg.cluster_noise, generator=gen)
    pools = make_pools(num_prompts, N, cfg.d, **kw)
    pilot_fit = None
    if cfg.theta0 == "pilot":
        pilot = make_pools(cfg.pilot_prompts, N, cfg.d, **kw)
        pilot_fit = fit_ridge(pilot.phi, pilot.b, cfg.beta, cfg.gamma, tol=cfg.tol, max_iter=cfg.max_iter)
        theta0 = pilot_fit.theta
    elif cfg.theta0 == "true":
        theta0 = theta_true.clone()
    else:
        theta0 = torch.zeros(cfg.d, dtype=DTYPE)
    return gen, theta_true, pools, theta0, pilot_fit, kw


def _fit_record(report: FitReport, **labels) -> dict:
    return dict(labels, converged=report.converged, grad_norm=report.grad_norm, iterations=report.iterations,
                message=report.message)


def _orders(cfg: ToyConfig, pools: Pools, logits, n_max: int, gen: torch.Generator) -> dict:
    """Selection order per method: every strategy is nested, so the first ``n`` of ``n_max`` is its ``n``-subset."""
    out = {}
    for strategy, center in cfg.methods:
        sel = select_negatives(pools.phi, logits, n_max, beta=cfg.beta, gamma=cfg.gamma, strategy=strategy,
                               center=center, generator=gen)
        out[(strategy, center)] = sel.indices
    return out


def n_sweep(cfg: ToyConfig, shape: str, seed: int) -> dict[str, list[dict]]:
    """Theorems 5.1 and C.1, redundancy and test accuracy against the subset size ``n`` for one (shape, seed).

    Returns ``{"n": records per (method, n), "coverage": records per (method, n <= coverage_max_n),
    "fits": one record per fit}``. Errors are measured against ``theta_*`` (the full-pool fit on the same prompts)
    and ``theta_true``; E_rel is averaged (``erel_*``) and maximised (``erel_*_max``) over prompts.
    """
    N = cfg.pool_size
    gen, theta_true, pools, theta0, pilot_fit, kw = _problem(cfg, shape, seed, "n_sweep", cfg.num_prompts, N)
    test = make_pools(cfg.num_test_prompts, N, cfg.d, **kw)
    logits = pools.phi @ theta0 + pools.b
    base = dict(shape=shape, seed=seed, theta0=cfg.theta0)
    fits = [] if pilot_fit is None else [_fit_record(pilot_fit, **base, fit="pilot theta0", method="", n=N)]
    star = fit_ridge(pools.phi, pools.b, cfg.beta, cfg.gamma, tol=cfg.tol, max_iter=cfg.max_iter)
    fits.append(_fit_record(star, **base, fit="theta_*", method="", n=N))
    n_values = sorted(set(cfg.n_grid))
    n_max = max(max(n_values), min(cfg.coverage_max_n, N))
    orders = _orders(cfg, pools, logits, n_max, gen)
    acc_true, acc_star = preference_accuracy(theta_true, test.phi), preference_accuracy(star.theta, test.phi)
    records, coverage = [], []
    for (strategy, center), order in orders.items():
        label = dict(base, method=method_label(strategy, center), strategy=strategy, center=center)
        lb = leverage_bound(pools.phi, pools.b, logits, order, n_values, star.theta, cfg.beta, cfg.gamma)
        for j, n in enumerate(n_values):
            mask = prefix_mask(order, n, N)
            fit = fit_ridge(pools.phi, pools.b, cfg.beta, cfg.gamma, mask, theta_init=star.theta, tol=cfg.tol,
                            max_iter=cfg.max_iter)
            fits.append(_fit_record(fit, **base, fit="theta_hat_n", method=label["method"], n=n))
            sigma = sigma_matrix(star.theta, pools.phi, pools.b, cfg.beta, cfg.gamma, mask)
            e_star = relative_logit_error(pools.phi, fit.theta - star.theta)
            e_true = relative_logit_error(pools.phi, fit.theta - theta_true)
            lev, bound = lb.leverage[:, j], lb.bound[:, j]
            records.append(dict(
                label, n=n,
                erel_star=float(e_star.mean()), erel_star_max=float(e_star.max()),
                erel_true=float(e_true.mean()), erel_true_max=float(e_true.max()),
                sigma_err_star=float(sigma_norm(fit.theta - star.theta, sigma)),
                sigma_err_true=float(sigma_norm(fit.theta - theta_true, sigma)),
                leverage=float(lev.median()), leverage_max=float(lev.max()),
                bound=float(bound.median()), bound_holds=float((lev <= bound * (1 + 1e-9)).to(DTYPE).mean()),
                kappa=float(lb.kappa[:, j].median()), rho=float(lb.rho[:, j].median()),
                q_min=float(lb.q_min.median()), alpha0=float(lb.alpha0.median()), L_v=float(lb.L_v.median()),
                logdet_gain=float(logdet_gain(pools.phi, logits, order[:, :n], cfg.beta, cfg.gamma).mean()),
                test_accuracy=preference_accuracy(fit.theta, test.phi),
                test_accuracy_star=acc_star, test_accuracy_true=acc_true,
                converged=fit.converged,
            ))
        if shape == "clustered":
            for n in range(1, min(cfg.coverage_max_n, N) + 1):
                cov = cluster_coverage(order[:, :n], pools.clusters).to(DTYPE)
                coverage.append(dict(label, n=n, clusters_covered=float(cov.mean()),
                                     clusters_present=float(pools.clusters_present.to(DTYPE).mean())))
    return {"n": records, "coverage": coverage, "fits": fits}


def label_blind_kept(phi, logits, n: int, beta: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order [P, n], kept [P])``: the label-blind subsets and whether ``y*`` was among the greedy's first ``n + 1``.

    The label-blind greedy (``select_negatives(strategy="label_blind")``) orders all ``N + 1`` responses without the
    label. On the prompts where ``y*`` is among the first ``n + 1`` (``kept``), the choice set ``S + {y*}`` is exactly
    those ``n + 1`` responses, fixed before the label is seen; given that event, ``y*`` is a Plackett-Luce draw from
    the set (Luce's choice axiom), so the subset loss over the kept prompts is an unbiased likelihood. On the other
    prompts the set is the top ``n`` plus ``y*``, which singles ``y*`` out: the one dependence on the label left.
    """
    phi, logits = phi.to(DTYPE), logits.to(DTYPE)
    P, N, d = phi.shape
    full = torch.cat([phi, torch.zeros(P, 1, d, dtype=DTYPE)], 1)  # y* last, at phi = 0 and logit 0
    full_logits = torch.cat([logits, torch.zeros(P, 1, dtype=DTYPE)], 1)
    full, full_logits = full - full.mean(1, keepdim=True), full_logits - full_logits.mean(1, keepdim=True)
    top = select_negatives(full, full_logits, n + 1, beta=beta, gamma=gamma, strategy="dopt").indices  # [P, n + 1]
    kept = (top == N).any(-1)
    order = select_negatives(phi, logits, n, beta=beta, gamma=gamma, strategy="label_blind").indices
    return order, kept


def k_sweep(cfg: ToyConfig, shape: str, seed: int) -> dict[str, list[dict]]:
    """Theorem 5.2: ``||theta_hat_{k,n} - theta_*||_{Sigma_{k,n}}`` against the number of prompts ``k`` (``n`` fixed).

    ``theta_*`` is the full-pool fit on the same ``k`` prompts (``theta_{*,k}`` of Theorem A.2); the error against
    ``theta_true`` is measured in the same norm. ``c_min`` (Assumption C.2) is the smallest
    ``beta^2 (1 - sigmoid(Z_C(theta)))`` over the prompts at ``theta0``, ``theta_*`` and ``theta_hat``, and ``bound``
    is eq. 16 at ``delta = 0.05`` (``nan`` where ``c_min k >= gamma`` leaves it undefined).

    ``"k_kept"``: the label-blind subsets fitted only on the prompts among the first ``k`` whose ``y*`` the greedy
    picked (:func:`label_blind_kept`; ``kept`` of them, errors ``nan`` where none), with ``Sigma`` averaged over them.
    """
    N, n = cfg.pool_size, cfg.k_sweep_n
    k_values = sorted(set(cfg.k_grid))
    gen, theta_true, pools, theta0, pilot_fit, _ = _problem(cfg, shape, seed, "k_sweep", max(k_values), N)
    logits = pools.phi @ theta0 + pools.b
    orders = _orders(cfg, pools, logits, n, gen)
    kept_order, kept_all = label_blind_kept(pools.phi, logits, n, cfg.beta, cfg.gamma)
    base = dict(shape=shape, seed=seed, theta0=cfg.theta0)
    records, kept_records, fits = [], [], []
    for k in k_values:
        phi, b = pools.phi[:k], pools.b[:k]
        star = fit_ridge(phi, b, cfg.beta, cfg.gamma, tol=cfg.tol, max_iter=cfg.max_iter)
        fits.append(_fit_record(star, **base, fit="theta_*,k", method="", n=N, k=k))
        for (strategy, center), order in orders.items():
            label = dict(base, method=method_label(strategy, center), strategy=strategy, center=center)
            mask = prefix_mask(order[:k], n, N)
            fit = fit_ridge(phi, b, cfg.beta, cfg.gamma, mask, theta_init=star.theta, tol=cfg.tol,
                            max_iter=cfg.max_iter)
            fits.append(_fit_record(fit, **base, fit="theta_hat_k,n", method=label["method"], n=n, k=k))
            sigma = sigma_matrix(star.theta, phi, b, cfg.beta, cfg.gamma, mask)
            c_min = min(float(curvature_scale(t, phi, b, cfg.beta).min()) for t in (theta0, star.theta, fit.theta))
            records.append(dict(
                label, k=k, n=n,
                sigma_err_star=float(sigma_norm(fit.theta - star.theta, sigma)),
                sigma_err_true=float(sigma_norm(fit.theta - theta_true, sigma)),
                c_min=c_min, bound=batch_error_bound(k, cfg.d, c_min, cfg.gamma),
                converged=fit.converged,
            ))
        keep = kept_all[:k]
        rec = dict(base, method=KEPT_LABEL, strategy="label_blind_kept", center=True, k=k, n=n, kept=int(keep.sum()),
                   sigma_err_star=float("nan"), sigma_err_true=float("nan"), converged=True)
        if keep.any():
            phi_k, b_k, mask = phi[keep], b[keep], prefix_mask(kept_order[:k][keep], n, N)
            fit = fit_ridge(phi_k, b_k, cfg.beta, cfg.gamma, mask, theta_init=star.theta, tol=cfg.tol,
                            max_iter=cfg.max_iter)
            fits.append(_fit_record(fit, **base, fit="theta_hat_k,n", method=KEPT_LABEL, n=n, k=k))
            sigma = sigma_matrix(star.theta, phi_k, b_k, cfg.beta, cfg.gamma, mask)
            rec.update(sigma_err_star=float(sigma_norm(fit.theta - star.theta, sigma)),
                       sigma_err_true=float(sigma_norm(fit.theta - theta_true, sigma)), converged=fit.converged)
        kept_records.append(rec)
    return {"k": records, "k_kept": kept_records, "fits": fits}


def exact_sweep(cfg: ToyConfig, shape: str, seed: int) -> dict[str, list[dict]]:
    """Greedy against exact (eq. 12): each method's log-det gain over the brute-force optimum, for every ``n``.

    Both criteria are reported: ``criterion="centred"`` is eq. 11 (Algorithm 1's objective) and
    ``criterion="uncentred"`` the ``center=False`` ablation's; each greedy is guaranteed ``>= 1 - 1/e`` of the
    optimum of its own criterion. ``fraction`` is the mean over prompts, ``fraction_min`` the worst prompt.
    """
    N = cfg.exact_pool_size
    gen, _, pools, theta0, _, _ = _problem(cfg, shape, seed, "exact", cfg.exact_prompts, N)
    logits = pools.phi @ theta0 + pools.b
    orders = _orders(cfg, pools, logits, N, gen)
    records = []
    for n in range(1, N + 1):
        for criterion, center_crit in (("centred", True), ("uncentred", False)):
            best = exact_best_logdet_gain(pools.phi, logits, n, cfg.beta, cfg.gamma, center_crit)
            for (strategy, center), order in orders.items():
                gain = logdet_gain(pools.phi, logits, order[:, :n], cfg.beta, cfg.gamma, center_crit)
                frac = gain / best
                records.append(dict(shape=shape, seed=seed, theta0=cfg.theta0, method=method_label(strategy, center),
                                    strategy=strategy, center=center, criterion=criterion, n=n,
                                    fraction=float(frac.mean()), fraction_min=float(frac.min())))
    return {"exact": records}


@contextmanager
def torch_threads(n: int):
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cache_dir() -> Path:
    """Where the toy's records are cached: ``mass_dpo.params.cache_root() / "toy"``."""
    from .params import cache_root  # (yaml only; keeps this module's import light)

    return cache_root() / "toy"


def cache_key(name: str, **params) -> str:
    """A stable hex digest of ``name``, :data:`CACHE_VERSION` and ``params`` (JSON-serialisable values)."""
    blob = json.dumps(dict(params, _name=name, _version=CACHE_VERSION), sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_records(name: str, params: dict, compute, *, cache: bool = True):
    """``compute()`` (a dict of record lists), read from / written to ``cache_dir()/<name>-<hash>.json``.

    The file name hashes ``name``, every entry of ``params`` and :data:`CACHE_VERSION`; the write goes to a temporary
    file in the same folder, renamed into place, so a reader never sees half a file. ``cache=False`` always computes.
    """
    if not cache:
        return compute()
    path = cache_dir() / f"{name}-{cache_key(name, **params)}.json"
    if path.is_file():
        with open(path) as f:
            return json.load(f)
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(out, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def run_all(cfg: ToyConfig, shapes, seeds, theta0_kinds=None, *, threads: int = 1,
            cache: bool = True) -> dict[str, list[dict]]:
    """Every sweep for every (theta0, shape, seed): ``{"n", "coverage", "k", "k_kept", "exact", "fits"}`` records.

    ``theta0_kinds`` (default ``[cfg.theta0]``) repeats everything at several preprocessing points. The tensors are
    tiny (``d x d`` solves over a few hundred prompts), so torch runs single-threaded by default: intra-op threads
    only add synchronisation, which made the sweeps 10x slower on a busy 2-core machine. Each (sweep, theta0, shape,
    seed) is cached by :func:`cached_records` unless ``cache=False``.
    """
    out: dict[str, list[dict]] = {key: [] for key in ("n", "coverage", "k", "k_kept", "exact", "fits")}
    with torch_threads(threads):
        for kind in theta0_kinds or [cfg.theta0]:
            c = replace(cfg, theta0=kind)
            for shape in shapes:
                for seed in seeds:
                    for sweep in (n_sweep, k_sweep, exact_sweep):
                        params = dict(cfg=c.as_dict(), shape=shape, seed=seed)
                        rows = cached_records(sweep.__name__, params, lambda: sweep(c, shape, seed), cache=cache)
                        for key, recs in rows.items():
                            out[key].extend(recs)
    return out


# ---------------------------------------------------------------- the regime sweep (feature scale x d)


def feature_scale_for_gram(gram_scale: float, d: int, N: int, beta: float, gamma: float) -> float:
    """The ``feature_scale`` at which the scaled Gram diagonal ``G_ii = (alpha0 / gamma) q_i ||phi_i - phibar||^2``
    of Algorithm 1 has expectation ``gram_scale`` on isotropic pools at ``theta0 = 0``.

    There ``q_i = 1/N``, ``alpha0 = beta^2 sigmoid(log N)`` and ``E ||phi_i - phibar||^2 = d s^2 (1 - 1/N)`` (``y*``'s
    features cancel in ``phi_i - phibar``), so ``s = sqrt(gram_scale N gamma / (alpha0 d (1 - 1/N)))``.
    """
    alpha0 = beta**2 / (1.0 + 1.0 / N)  # beta^2 sigmoid(log N)
    return math.sqrt(gram_scale * N * gamma / (alpha0 * d * (1.0 - 1.0 / N)))


def top_gram_diagonal(phi, logits, n: int, beta: float, gamma: float) -> torch.Tensor:
    """``[P, n]`` the ``n`` candidates with the largest ``G_ii`` of Algorithm 1 (centred), ties to the lower index:
    the first step of the greedy, and all of it once ``G`` is so small that ``log det(I + G_SS) ~ trace G_SS``."""
    v, alpha0, _, _ = design_vectors(phi, logits, beta)
    gii = (alpha0 / gamma)[:, None] * (v * v).sum(-1)
    return torch.sort(gii, dim=-1, descending=True, stable=True).indices[:, :n]


def same_subset(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[P]`` bool: the rows of ``a`` and ``b`` (``[P, n]`` indices) hold the same set."""
    return (a.sort(-1).values == b.sort(-1).values).all(-1)


def regime_sweep(cfg: ToyConfig, shape: str, seed: int, gram_scale: float, d: int, n: int) -> dict[str, list[dict]]:
    """D-optimal, label-blind D-optimal and random subsets of ``n`` negatives at one (``G_ii`` scale, ``d``).

    ``cfg`` gives ``N = pool_size``, ``beta``, ``gamma``, ``signal``, the pool shape settings, ``theta0``,
    ``num_prompts`` and ``num_test_prompts``; ``d`` and ``feature_scale`` (from ``gram_scale`` by
    :func:`feature_scale_for_gram`) are replaced. The rewards ``beta phi . theta_true`` keep std ``signal`` whatever
    the scale, so only how the data weigh against the ridge ``gamma`` changes. Records per method: ``erel_true``
    (eq. 15 against ``theta_true``, mean over prompts), ``test_accuracy``, ``same_as_top_gii`` (share of prompts whose
    subset is the top-``n`` by ``G_ii``) and the measured median ``G_ii``; fits start at 0.
    """
    N = cfg.pool_size
    scale = feature_scale_for_gram(gram_scale, d, N, cfg.beta, cfg.gamma)
    c = replace(cfg, d=d, feature_scale=scale)
    gen, theta_true, pools, theta0, _, kw = _problem(c, shape, seed, f"regime/{gram_scale}/{d}", c.num_prompts, N)
    test = make_pools(c.num_test_prompts, N, d, **kw)
    logits = pools.phi @ theta0 + pools.b
    top = top_gram_diagonal(pools.phi, logits, n, c.beta, c.gamma)
    v, alpha0, _, _ = design_vectors(pools.phi, logits, c.beta)
    gii = float(((alpha0 / c.gamma)[:, None] * (v * v).sum(-1)).median())
    base = dict(shape=shape, seed=seed, theta0=c.theta0, gram_scale=gram_scale, d=d, n=n, feature_scale=scale,
                gii_median=gii)
    records, fits = [], []
    for strategy, center in REGIME_METHODS:
        order = select_negatives(pools.phi, logits, n, beta=c.beta, gamma=c.gamma, strategy=strategy, center=center,
                                 generator=gen).indices
        # the subset loss only sees the picked rows: fit on them alone ([P, n, d], the same objective, N/n x cheaper)
        rows = torch.arange(pools.phi.shape[0])[:, None]
        fit = fit_ridge(pools.phi[rows, order], pools.b[rows, order], c.beta, c.gamma, tol=c.tol, max_iter=c.max_iter)
        label = method_label(strategy, center)
        fits.append(_fit_record(fit, **base, fit="theta_hat_n", method=label))
        records.append(dict(
            base, method=label, strategy=strategy, center=center,
            erel_true=float(relative_logit_error(pools.phi, fit.theta - theta_true).mean()),
            test_accuracy=preference_accuracy(fit.theta, test.phi),
            same_as_top_gii=float(same_subset(order, top).to(DTYPE).mean()),
            converged=fit.converged,
        ))
    return {"regime": records, "fits": fits}


def run_regime_sweep(cfg: ToyConfig, shapes, seeds, gram_scales, dims, n: int, *, threads: int = 1,
                     cache: bool = True) -> dict[str, list[dict]]:
    """:func:`regime_sweep` over every (shape, ``G_ii`` scale, ``d``, seed), cached like :func:`run_all`."""
    out: dict[str, list[dict]] = {"regime": [], "fits": []}
    with torch_threads(threads):
        for shape in shapes:
            for g in gram_scales:
                for d in dims:
                    for seed in seeds:
                        params = dict(cfg=cfg.as_dict(), shape=shape, seed=seed, gram_scale=g, d=d, n=n)
                        rows = cached_records("regime_sweep", params,
                                              lambda: regime_sweep(cfg, shape, seed, g, d, n), cache=cache)
                        for key, recs in rows.items():
                            out[key].extend(recs)
    return out
