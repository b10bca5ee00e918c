"""MASS-DPO: multi-negative active sample selection for direct preference optimization.

The core, importable without transformers:

- :func:`select_negatives` (``mass_dpo.selection``): Algorithm 1, the D-optimal negative selector, and baselines;
- :func:`preference_loss` (``mass_dpo.losses``): DPO, DPO-k, DMPO, S-DPO / MASS-DPO losses;
- :func:`ranking_metrics`, :func:`preference_metrics` (``mass_dpo.metrics``): Recall@k, NDCG@k, MRR, accuracy, margin.
"""

from .losses import PreferenceLoss, preference_loss
from .metrics import preference_metrics, ranking_metrics
from .selection import Selection, select_negatives

__version__ = "0.1.0"
__all__ = [
    "Selection",
    "select_negatives",
    "PreferenceLoss",
    "preference_loss",
    "ranking_metrics",
    "preference_metrics",
]
