"""Input checks shared by the core math (:mod:`~mass_dpo.selection`, :mod:`~mass_dpo.losses`,
:mod:`~mass_dpo.metrics`); torch only."""

from __future__ import annotations

import math

import torch


def positive_number(value, name: str, why: str = "") -> None:
    """``value`` a finite number > 0 (a float, an int or a one-element tensor), else one ``ValueError`` naming
    ``name`` (``why``: what it is, in the message). Strings, booleans, NaN and infinities are refused."""
    try:
        ok = not isinstance(value, (str, bytes, bool)) and math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError, RuntimeError):  # None, a tensor of several values
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number > 0{f' ({why})' if why else ''}, got {value!r}")


def bool_mask(mask, name: str = "mask", device=None) -> torch.Tensor:
    """``mask`` as a bool tensor (True: a real candidate): bool as given, 0/1 numbers converted; any other number
    (0.3, -1) is refused, where a plain ``.bool()`` would read it as True."""
    t = torch.as_tensor(mask, device=device)
    if t.dtype == torch.bool:
        return t
    if t.is_complex() or not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"{name} must be bool (True for a real candidate) or 0/1, got {t.dtype} values other than "
                         "0 and 1")
    return t.bool()
