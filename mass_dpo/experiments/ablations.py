"""Table 3: MASS-DPO's beta and n ablations (``notebooks/table3.ipynb``)."""

from __future__ import annotations


import numpy as np
import pandas as pd
from .core import beside_paper, grid, summarize


# ---------------------------------------------------------------- Table 3


def ablation_specs(datasets, seeds, *, betas=(0.1, 0.5, 1.0), ns=(1, 3, 5), n: int = 3, beta: float = 0.1
                   ) -> list[dict]:
    """MASS-DPO runs of Table 3: ``beta`` in ``betas`` at ``n``, and ``n`` in ``ns`` at ``beta``."""
    specs = grid(datasets, ["mass_dpo"], seeds, n=n, beta=list(betas))
    specs += [s for s in grid(datasets, ["mass_dpo"], seeds, n=list(ns), beta=beta) if s not in specs]
    return specs


def ablation_table(runs: pd.DataFrame, *, model: str, betas=(0.1, 0.5, 1.0), ns=(1, 3, 5), n: int = 3,
                   beta: float = 0.1) -> pd.DataFrame:
    """Table 3: accuracy of MASS-DPO along the beta axis (at ``n``) and the n axis (at ``beta``)."""
    parts = []
    b = runs[(runs["n"] == n) & runs["beta"].isin(betas)].assign(ablation="beta", setting=lambda d: d["beta"])
    m = runs[(runs["beta"] == beta) & runs["n"].isin(ns)].assign(ablation="n", setting=lambda d: d["n"])
    for part in (b, m):
        if not part.empty:
            part = part.assign(setting=part["setting"].map(lambda v: f"{float(v):g}"))
            parts.append(summarize(part, ["model", "ablation", "setting", "dataset"], ["accuracy"]))
    if not parts:
        return pd.DataFrame()
    return beside_paper(pd.concat(parts, ignore_index=True), "table3", ["ablation", "setting", "dataset", "metric"],
                        model=model)


def best_setting(table3: pd.DataFrame) -> pd.DataFrame:
    """Per model, ablation and dataset: our best setting and the paper's (from :func:`ablation_table`); several
    settings within rounding of the best read ``"tie 0.1/0.5"``."""
    def best(grp, col):
        vals = grp[col].astype(float)
        if not vals.notna().any():
            return None
        top = grp.loc[np.isclose(vals, vals.max()), "setting"].drop_duplicates()
        return str(top.iloc[0]) if len(top) == 1 else "tie " + "/".join(top.astype(str))

    rows = []
    for key, grp in table3.groupby(["model", "ablation", "dataset"], sort=False):
        rows.append(dict(zip(["model", "ablation", "dataset"], key), ours_best=best(grp, "value"),
                         paper_best=best(grp, "paper")))
    return pd.DataFrame(rows)


