"""MASS-DPO: multi-negative active sample selection for direct preference optimization.

The core, importable without transformers:

- :func:`select_negatives` (``mass_dpo.selection``): Algorithm 1, the D-optimal negative selector, and baselines;
- :func:`preference_loss` (``mass_dpo.losses``): DPO, DPO-k, DMPO, S-DPO / MASS-DPO losses;
- :func:`ranking_metrics`, :func:`preference_metrics` (``mass_dpo.metrics``): Recall@k, NDCG@k, MRR, accuracy, margin.
"""

import importlib

#: Public names and their modules, imported on first use (so that ``mass-dpo --help`` does not import torch).
_LAZY = {
    "Selection": "selection",
    "select_negatives": "selection",
    "PreferenceLoss": "losses",
    "preference_loss": "losses",
    "ranking_metrics": "metrics",
    "preference_metrics": "metrics",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mass_dpo' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = [
    "Selection",
    "select_negatives",
    "PreferenceLoss",
    "preference_loss",
    "ranking_metrics",
    "preference_metrics",
]
