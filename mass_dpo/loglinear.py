"""The ``loglinear`` regime: the paper's Assumption 4.1 at scale, on frozen features.

    log pi_theta(y | x) = log pi_ref(y | x) + phi(x, y) . theta,        theta in R^d, theta = 0 at the start,

so the implicit reward is ``beta * phi(x, y) . theta`` and a prompt's DPO logit differences are
``Delta_i = (phi_i - phi_*) . theta + (log ref terms that cancel)``: exactly eq. 7 with ``theta0 = 0``.
``phi(x, y)`` is the frozen feature vector of ``mass_dpo.extraction`` (``Extracted.features``) and
``log pi_ref`` its precomputed ``Extracted.ref_logps``; training touches no language model, so it runs in
seconds on a CPU (the CPU default's regime). The module is what ``transformers.Trainer`` sees as "the model".
"""

from __future__ import annotations

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
