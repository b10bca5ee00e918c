"""The ``loglinear`` regime: the paper's Assumption 4.1 at scale, on frozen features.

    log pi_theta(y | x) = log pi_ref(y | x) + phi(x, y) . theta,        theta in R^d, theta = 0 at the start,

so the implicit reward is ``beta * phi(x, y) . theta`` and a prompt's DPO logit differences are
``Delta_i = (phi_i - phi_*) . theta + (log ref terms that cancel)``: exactly eq. 7 with ``theta0 = 0``.
``phi(x, y)`` is the frozen feature vector of ``mass_dpo.extraction`` (``Extracted.features``) and
``log pi_ref`` its precomputed ``Extracted.ref_logps``; training touches no language model, so it runs in
seconds on a CPU (the CPU default's regime). The module is what ``transformers.Trainer`` sees as "the model".

Two ways to train theta (``TrainConfig.fit``): ``"exact"`` minimises the ridge-regularised convex objective to a
gradient tolerance (:func:`fit_loglinear`, L-BFGS over all training prompts; the estimator ``theta_hat_n`` of
Section 5), the CPU default; ``"adam"`` runs the Trainer's optimiser like the LM regimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


class LogLinearPolicy(nn.Module):
    """``theta`` in R^d (zero-init); ``forward`` maps cached features to policy sequence log-probs.

    Args:
        dim: the feature dimension ``d`` (the model's hidden size).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(int(dim), dtype=torch.float32))

    @property
    def dim(self) -> int:
        return int(self.theta.numel())

    def forward(self, features: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Policy log-probs ``log pi_ref + phi . theta``.

        Args:
            features: ``[..., C, d]`` phi(x, y) per candidate; ref_logps: ``[..., C]``; mask: ``[..., C]`` bool
                (masked entries return 0).

        Returns:
            ``[..., C]`` float32 log-probs.
        """
        if features.shape[-1] != self.dim:
            raise ValueError(f"features have d = {features.shape[-1]}, the policy has d = {self.dim}")
        out = ref_logps.to(self.theta.dtype) + features.to(self.theta.dtype) @ self.theta
        if mask is not None:
            out = torch.where(mask.bool(), out, torch.zeros_like(out))
        return out

    @torch.no_grad()
    def score(self, features: torch.Tensor, ref_logps: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
        """``[P, C]`` policy log-probs of every candidate of ``P`` prompts, in chunks (no gradient)."""
        rows = [
            self(features[lo : lo + chunk].to(self.theta.device), ref_logps[lo : lo + chunk].to(self.theta.device))
            for lo in range(0, features.shape[0], chunk)
        ]
        return torch.cat(rows).cpu() if rows else torch.zeros(ref_logps.shape)


# ---------------------------------------------------------------- the exact fit (Section 5's estimator)


@dataclass
class LogLinearFit:
    """Result of :func:`fit_loglinear`.

    Attributes:
        theta: ``[d]`` float32, the minimiser. objective: its value. grad_norm: the gradient's Euclidean norm there.
        iterations: L-BFGS iterations. converged: ``grad_norm <= tol``. path: ``[(iteration, theta [d]), ...]`` the
        iterates (every one, float32 on the CPU) for training curves and mid-training snapshots.
    """

    theta: torch.Tensor
    objective: float
    grad_norm: float
    iterations: int
    converged: bool
    path: list = field(default_factory=list)


def loglinear_objective(theta: torch.Tensor, features: torch.Tensor, mask: torch.Tensor, *, method: str,
                        beta: float, ridge: float) -> torch.Tensor:
    """``J(theta) = mean_p L_method(theta; p) + ridge / 2 * ||theta||^2``, the ridge-regularised empirical loss whose
    minimiser is the estimator ``theta_hat_n`` of Section 5 (eq. 7 for S-DPO / MASS-DPO).

    Args:
        theta: ``[d]``. features: ``[P, 1+K, d]`` phi(x, y) per record, column 0 the chosen response.
        mask: ``[P, 1+K]`` bool (column 0 True; False pads absent negatives).

    In the log-linear regime ``log pi_theta - log pi_ref = phi . theta``, so the reference log-probs cancel and the
    loss is :func:`mass_dpo.losses.preference_loss` of ``phi . theta`` against zero reference terms.
    """
    from .losses import preference_loss

    z = features @ theta  # [P, 1+K]: log pi_theta - log pi_ref
    zero = torch.zeros_like(z)
    out = preference_loss(method, z[:, 0], z[:, 1:], zero[:, 0], zero[:, 1:], beta=beta, mask=mask[:, 1:],
                          check_finite=False)  # a line-search step may overshoot: L-BFGS handles it
    return out.loss.mean() + 0.5 * ridge * theta.pow(2).sum()


def fit_loglinear(features: torch.Tensor, mask: torch.Tensor, *, method: str, beta: float, ridge: float,
                  tol: float = 1e-6, max_iter: int = 500, theta0: torch.Tensor | None = None,
                  callback: Callable[[int, torch.Tensor], None] | None = None) -> LogLinearFit:
    """Minimise :func:`loglinear_objective` to a gradient tolerance with L-BFGS (strong Wolfe line search), float64.

    Every method's loss is convex in theta (a softplus of a convex function of ``phi . theta``), so with ``ridge > 0``
    the objective is strictly convex and the minimiser unique: the fit does not depend on the data order, a batch size
    or a learning rate. ``callback(iteration, theta)`` is called at every iterate (iteration 0 = the start).

    Args:
        features: ``[P, 1+K, d]``; mask: ``[P, 1+K]`` (see :func:`loglinear_objective`).
        ridge: the L2 weight (> 0). tol: stop when the gradient norm is at most ``tol``. max_iter: L-BFGS iterations.
        theta0: the start (default 0: the reference policy).
    """
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0 (it makes the objective strictly convex), got {ridge}")
    if features.dim() != 3 or mask.shape != features.shape[:2]:
        raise ValueError(f"features must be [P, 1+K, d] and mask [P, 1+K]; got {tuple(features.shape)}, "
                         f"{tuple(mask.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or inf; re-extract them (mass_dpo.extraction.extract)")
    X = features.detach().to(torch.float64)
    M = mask.detach().bool()
    d = X.shape[-1]
    theta = torch.zeros(d, dtype=torch.float64) if theta0 is None else theta0.detach().to(torch.float64).clone()
    theta.requires_grad_(True)

    seen: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def evaluate(t):
        # (value, gradient) at t, remembered: L-BFGS re-evaluates, at the start of each step, the point its previous
        # line search accepted, and the tolerance check asks for it once more; both are read back here
        key = t.detach().numpy().tobytes()
        if key not in seen:
            if len(seen) >= 64:
                seen.clear()
            tt = t.detach().requires_grad_(True)
            value = loglinear_objective(tt, X, M, method=method, beta=beta, ridge=ridge)
            (g,) = torch.autograd.grad(value, tt)
            seen[key] = (value.detach(), g)
        return seen[key]

    def grad_at(t):
        value, g = evaluate(t)
        return float(value), g

    path = [(0, theta.detach().float().clone())]
    if callback:
        callback(0, theta.detach())
    # one L-BFGS iteration per step() call (so every iterate is seen); max_eval bounds that iteration's line search
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=1, max_eval=25, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=0.0, tolerance_change=0.0)

    def closure():
        value, g = evaluate(theta)
        theta.grad = g.clone()
        return value

    it = 0
    value, g = grad_at(theta)
    while float(g.norm()) > tol and it < max_iter:
        before = theta.detach().clone()
        opt.step(closure)
        it += 1
        value, g = grad_at(theta)
        path.append((it, theta.detach().float().clone()))
        if callback:
            callback(it, theta.detach())
        if torch.equal(before, theta.detach()):
            break  # the line search cannot move at machine precision: report the gradient norm reached
    gnorm = float(g.norm())
    return LogLinearFit(theta.detach().float(), value, gnorm, it, gnorm <= tol, path)
