"""The toy log-linear model: a synthetic check of Section 5's bounds (Theorems 5.1, 5.2 and C.1).

torch/numpy only: the model, its fits and the quantities the theorems bound. The experiment that runs over them
(settings, sweeps, record cache) is :mod:`mass_dpo.toy`, which ``notebooks/toy_loglinear.ipynb`` calls; it imports
this module only when a record has to be computed.

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

import itertools
import math
from dataclasses import dataclass

import torch

from .losses import loglinear_grad, loglinear_hessian, loglinear_loss
from .selection import fisher_vectors, select_negatives

SHAPES = ("isotropic", "clustered")
DTYPE = torch.float64


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
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
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
    if min(n_values) < 1 or n_max > order.shape[1] or (order[:, :n_max] < 0).any():
        raise ValueError(f"n_values must lie in [1, {order.shape[1]}] (the columns of order), each within the picks "
                         f"of every prompt (no -1 among them), got {list(n_values)}")
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
    indices = torch.as_tensor(indices)
    N = phi.shape[-2]
    if ((indices < 0) | (indices >= N)).any():
        raise ValueError(f"indices must lie in [0, {N}), got {int(indices.min())} to {int(indices.max())} (a -1 pad of "
                         "select_negatives: drop it, or score a padded order with mass_dpo.selection.score_subset)")
    gram = _scaled_gram(phi, logits, beta, gamma, center)
    return _logdet_gain_from_gram(gram, indices[:, None, :])[:, 0]


def exact_best_logdet_gain(phi, logits, n: int, beta: float, gamma: float, center: bool = True) -> torch.Tensor:
    """``[P]`` brute-force ``max_{|S| = n} log det H(S) - log det(gamma I)`` over all subsets (eq. 12; small ``N``)."""
    N = phi.shape[-2]
    if not 0 <= n <= N:
        raise ValueError(f"n must lie in [0, N] = [0, {N}], got {n}")
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


# ---------------------------------------------------------------- label-blind subsets (section 8 of the notebook)


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


# ---------------------------------------------------------------- the regime sweep's comparisons (G_ii scale x d)


def top_gram_diagonal(phi, logits, n: int, beta: float, gamma: float) -> torch.Tensor:
    """``[P, n]`` the ``n`` candidates with the largest ``G_ii`` of Algorithm 1 (centred), ties to the lower index:
    the first step of the greedy, and all of it once ``G`` is so small that ``log det(I + G_SS) ~ trace G_SS``."""
    v, alpha0, _, _ = design_vectors(phi, logits, beta)
    gii = (alpha0 / gamma)[:, None] * (v * v).sum(-1)
    return torch.sort(gii, dim=-1, descending=True, stable=True).indices[:, :n]


def same_subset(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[P]`` bool: the rows of ``a`` and ``b`` (``[P, n]`` indices) hold the same set."""
    return (a.sort(-1).values == b.sort(-1).values).all(-1)

