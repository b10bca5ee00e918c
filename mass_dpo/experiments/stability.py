"""Table 4: stability of the D-optimal selection along training (``notebooks/table4.ipynb``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from .core import Setup, beside_paper, grid, load_split, run_grid, summarize


# ---------------------------------------------------------------- Table 4


def stability(setup: Setup, datasets, *, ns=(5, 10), seeds=None, beta: float = 0.1, gamma: float = 0.1,
              echo: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Table 4: MASS-DPO-n runs; Algorithm 1 recomputed at the mid-training and final theta against initialisation.

    One row per (model, dataset, n, seed, checkpoint): exact match, Jaccard, top-1 and top-3 exact match,
    objective retention, over the training prompts. Loglinear regime only: theta_t gives Delta_i(theta_t) =
    phi_i . theta_t on the frozen features (:func:`mass_dpo.stability.at_checkpoint`); the LM regimes would need
    a re-extraction under each checkpoint (``extract(..., checkpoint=<folder>)``), which the runs do not keep."""
    from .. import stability as stab

    if setup.regime != "loglinear":
        raise NotImplementedError("Table 4 on an LM regime needs checkpoints re-extracted with "
                                  "extract(..., checkpoint=<folder>); this module covers the loglinear regime")
    seeds = list(seeds if seeds is not None else setup.seeds)
    runs = run_grid(setup, grid(datasets, ["mass_dpo"], seeds, n=list(ns), beta=beta), echo=echo, snapshots=True)
    rows = []
    for row in runs.itertuples():
        from ..runs import load_run

        result = load_run(row.run_dir)
        ex = load_split(result.config, "train")
        theta0 = torch.zeros(ex.features.shape[-1])
        for name in ("mid", "final"):
            snap = torch.load(Path(row.run_dir) / "snapshots" / f"{name}.pt")
            metrics = stab.recompute(ex, theta0, snap["theta"], int(row.n), beta=beta, gamma=gamma)
            rows.append({"model": row.model, "dataset": row.dataset, "n": int(row.n), "seed": row.seed,
                         "checkpoint": name, "step": snap["step"], "theta_norm": float(snap["theta"].norm()),
                         **metrics})
    return pd.DataFrame(rows)


STABILITY_METRICS = ("exact_match", "mean_jaccard", "top1_match", "top3_exact_match", "objective_retention")


def stability_table(stab: pd.DataFrame, *, model: str) -> pd.DataFrame:
    """Table 4 beside the paper: per dataset, n and checkpoint, the mean (and SE over seeds) of each metric."""
    if stab.empty:
        return pd.DataFrame()
    df = stab.rename(columns={"jaccard": "mean_jaccard"})
    summary = summarize(df, ["model", "dataset", "n", "checkpoint"], STABILITY_METRICS, percent=())
    summary["n"] = summary["n"].astype(str)
    out = beside_paper(summary, "table4", ["dataset", "n", "metric"], model=model)
    out.loc[out["checkpoint"] != "final", ["paper", "diff"]] = math.nan  # the paper compares init vs final
    return out


