"""Multi-negative preference losses, as pure functions of log-probabilities.

With the implicit reward ``r = beta * (log pi(y|x) - log ref(y|x))`` (eq. 2) of the chosen response ``r_c`` and of
each negative ``r_k``, and the margins ``h_k = r_c - r_k = -beta * Delta_k``:

======== ================================================ =========================================
method   per-example loss                                 paper
======== ================================================ =========================================
dpo      ``-logsigmoid(h_1)``                             eq. 3 (one negative)
dpo_k    ``mean_k -logsigmoid(h_k)``                      k pairwise DPO losses
dmpo     ``-logsigmoid(r_c - mean_k r_k)``                DMPO
sdpo     ``softplus(logsumexp_k(-h_k))``                  eq. 5, = ``-logsigmoid(-logsumexp(beta Delta))``
mass_dpo same as ``sdpo`` (on D-optimally selected negatives)  eq. 5 / eq. 7
======== ================================================ =========================================

Everything is computed with ``logsigmoid`` / ``softplus`` / ``logsumexp`` in at least float32, so the losses and
their gradients stay finite for ``|beta Delta|`` up to 1e4 and for bf16 inputs.

The second half of the module is the log-linear model of Assumption 4.1 (``log pi(y|x) ∝ phi(x, y) . theta``):
the per-prompt loss of eq. 7 with its closed-form gradient (Lemma 4.2, eq. 9) and Hessian (Lemma 4.3, eq. 10).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._checks import bool_mask, positive_number

METHODS = ("dpo", "dpo_k", "dmpo", "sdpo", "mass_dpo")


@dataclass
class PreferenceLoss:
    """Output of :func:`preference_loss`; every field is per example.

    Attributes:
        loss: ``[B]`` per-example loss (average it yourself: ``out.loss.mean()``).
        chosen_rewards: ``[B]`` ``beta * (log pi - log ref)`` of the chosen response (detached).
        rejected_rewards: ``[B, K]`` the same for each negative (detached; 0 where masked).
        margins: ``[B]`` chosen reward minus the mean reward of the valid negatives (detached).
        accuracy: ``[B]`` 1.0 where the chosen reward beats every valid negative's, else 0.0.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracy: torch.Tensor


def _check(method, pc, pr, rc, rr, mask):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    for name, t in zip(names, (pc, pr, rc, rr)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; wrap it with torch.as_tensor")
        if not t.is_floating_point():
            raise TypeError(f"{name} must hold float log-probabilities, got {t.dtype}; pass sequence log-probs "
                            "(.float() if they are right but stored as integers)")
    if pc.dim() != 1 or rc.shape != pc.shape:
        raise ValueError(f"chosen log-probs must both be [B]; got {tuple(pc.shape)} and {tuple(rc.shape)}")
    if pr.dim() != 2 or rr.shape != pr.shape or pr.shape[0] != pc.shape[0]:
        raise ValueError(
            f"rejected log-probs must both be [B, K] with B = {pc.shape[0]}; got {tuple(pr.shape)} and {tuple(rr.shape)}"
        )
    if pr.dim() == 2 and pr.shape[1] == 0:
        raise ValueError("the rejected log-probs hold no negative (K = 0); every example needs at least one")
    if mask is not None and mask.shape != pr.shape:
        raise ValueError(f"mask must be [B, K] = {tuple(pr.shape)}, got {tuple(mask.shape)}")
    if method == "dpo" and pr.shape[1] != 1:
        raise ValueError(f"method 'dpo' takes exactly one negative per example, got K = {pr.shape[1]}; "
                         "use 'dpo_k', 'dmpo' or 'sdpo' for several")


def _check_finite(pc, pr, rc, rr, mask) -> None:
    """NaN or infinite log-probs (masked negatives aside) would make the loss NaN in silence: one line naming the
    first."""
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    for name, t, m in zip(names, (pc[:, None], pr, rc[:, None], rr), (None, mask, None, mask)):
        bad = ~torch.isfinite(t) if m is None else ~torch.isfinite(t) & m
        if bool(bad.any()):
            b, k = (int(i) for i in bad.nonzero()[0])
            where = f"example {b}" + (f", negative {k}" if m is not None else "")
            raise ValueError(f"{name} is {float(t[b, k])} at {where}: every scored sequence needs a finite "
                             "log-probability (mask out a negative that has none)")


def preference_loss(
    method: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    mask: torch.Tensor | None = None,
    check_finite: bool = True,
) -> PreferenceLoss:
    """Per-example multi-negative preference loss (see the module table).

    Args:
        method: one of ``dpo``, ``dpo_k``, ``dmpo``, ``sdpo``, ``mass_dpo``.
        policy_chosen_logps, ref_chosen_logps: ``[B]`` sequence log-probs of the chosen response.
        policy_rejected_logps, ref_rejected_logps: ``[B, K]`` sequence log-probs of the negatives.
        beta: the DPO scale.
        mask: ``[B, K]`` bool, True for real negatives (each row needs at least one); masked entries may hold
            anything, even NaN, and receive zero gradient.
        check_finite: refuse NaN or infinite log-probs of real negatives and chosen responses (one ``ValueError``
            naming the first). The training loop passes ``False``: its reference log-probs are checked once, when
            the dataset is built, and a diverging policy ends with NaN metrics instead of a device sync per step.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    positive_number(beta, "beta", "the DPO scale; the paper uses 0.1")  # <= 0 flips every margin (eq. 5), inf NaNs
    if mask is not None and isinstance(pr, torch.Tensor):
        mask = bool_mask(mask, device=pr.device)
    _check(method, pc, pr, rc, rr, mask)
    dt = torch.promote_types(torch.promote_types(torch.promote_types(pc.dtype, pr.dtype),
                                                 torch.promote_types(rc.dtype, rr.dtype)), torch.float32)
    pc, pr, rc, rr = pc.to(dt), pr.to(dt), rc.to(dt), rr.to(dt)
    if mask is None:
        mask = torch.ones(pr.shape, dtype=torch.bool, device=pr.device)
    else:
        if not mask.any(-1).all():
            raise ValueError("every example needs at least one unmasked negative")
        zero = torch.zeros((), dtype=dt, device=pr.device)
        pr, rr = torch.where(mask, pr, zero), torch.where(mask, rr, zero)
    if check_finite:
        _check_finite(pc, pr, rc, rr, mask)
    count = mask.sum(-1).to(dt)

    r_c = beta * (pc - rc)  # [B]
    r_k = beta * (pr - rr)  # [B, K]
    h = r_c[:, None] - r_k  # [B, K] margins, = -beta * Delta_k
    if method == "dpo":
        loss = -F.logsigmoid(h[:, 0])
    elif method == "dpo_k":
        loss = torch.where(mask, -F.logsigmoid(h), torch.zeros_like(h)).sum(-1) / count
    elif method == "dmpo":
        mean_r_k = torch.where(mask, r_k, torch.zeros_like(r_k)).sum(-1) / count
        loss = -F.logsigmoid(r_c - mean_r_k)
    else:  # sdpo, mass_dpo
        loss = F.softplus(torch.logsumexp((-h).masked_fill(~mask, float("-inf")), dim=-1))

    with torch.no_grad():
        rej = torch.where(mask, r_k, torch.zeros_like(r_k))
        margins = r_c - rej.sum(-1) / count
        accuracy = torch.where(mask, h > 0, torch.ones_like(mask)).all(-1).to(dt)
    return PreferenceLoss(loss, r_c.detach(), rej.detach(), margins, accuracy)


# ---------------------------------------------------------------- log-linear model (Assumption 4.1)


def _scores(theta, phi, b, beta, mask):
    """``[..., n]`` ``s = beta (phi . theta + b)``, -inf where masked, after one check of every shape (a clear
    ``ValueError`` rather than a torch size mismatch; a row with no candidate would make its loss 0 and its gradient
    NaN)."""
    positive_number(beta, "beta")
    if theta.dim() != 1 or phi.dim() < 2 or phi.shape[-1] != theta.shape[0]:
        raise ValueError(f"expected theta [d] and phi [..., n, d] with the same d, got {tuple(theta.shape)} and "
                         f"{tuple(phi.shape)}")
    if b.shape != phi.shape[:-1]:
        raise ValueError(f"b must be [..., n] = {tuple(phi.shape[:-1])} (phi without d), got {tuple(b.shape)}")
    s = beta * (phi @ theta + b)
    if mask is None:
        return s
    if mask.shape != s.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(s.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    if not mask.any(-1).all():
        raise ValueError("every mask row needs at least one candidate (a row with none has no loss to fit)")
    return s.masked_fill(~mask, float("-inf"))


def loglinear_loss(theta: torch.Tensor, phi: torch.Tensor, b: torch.Tensor, beta: float, mask=None) -> torch.Tensor:
    """Eq. 7: ``L(theta; S) = -log sigmoid(-logsumexp_i beta (phi_i . theta + b_i))``.

    Args:
        theta: ``[d]``; phi: ``[..., n, d]`` feature differences; b: ``[..., n]`` reference offsets
        ``b_i = log ref(y*) - log ref(y_i)``; mask: ``[..., n]`` bool. Returns ``[...]``.
    """
    return F.softplus(torch.logsumexp(_scores(theta, phi, b, beta, mask), dim=-1))


def loglinear_grad(theta: torch.Tensor, phi: torch.Tensor, b: torch.Tensor, beta: float, mask=None) -> torch.Tensor:
    """Lemma 4.2, eq. 9: ``grad L = beta (1 - sigmoid(Z)) sum_j q_j phi_j`` with ``Z = -logsumexp(s)``. Returns ``[..., d]``."""
    s = _scores(theta, phi, b, beta, mask)
    z = -torch.logsumexp(s, dim=-1)
    q = torch.softmax(s, dim=-1)
    return beta * torch.sigmoid(-z)[..., None] * torch.einsum("...n,...nd->...d", q, phi)


def loglinear_hessian(theta: torch.Tensor, phi: torch.Tensor, b: torch.Tensor, beta: float, mask=None) -> torch.Tensor:
    """Lemma 4.3, eq. 10: ``beta^2 (1 - sigma(Z)) [sigma(Z) phibar phibar^T + sum_j q_j (phi_j - phibar)(phi_j - phibar)^T]``.

    Returns ``[..., d, d]`` (use it on small d: it is the d x d matrix the selector avoids).
    """
    s = _scores(theta, phi, b, beta, mask)
    z = -torch.logsumexp(s, dim=-1)
    q = torch.softmax(s, dim=-1)
    phibar = torch.einsum("...n,...nd->...d", q, phi)
    centred = phi - phibar[..., None, :]
    cov = torch.einsum("...n,...nd,...ne->...de", q, centred, centred)
    outer = phibar[..., :, None] * phibar[..., None, :]
    sig = torch.sigmoid(z)[..., None, None]
    one_minus_sig = torch.sigmoid(-z)[..., None, None]  # 1 - sigma(Z), without cancellation
    return beta**2 * one_minus_sig * (sig * outer + cov)
