"""Tables 1, 2, 5, 6 and Figures 2-3: the five methods compared on the four datasets (``notebooks/table1.ipynb``,
``table2``, ``table5``, ``table6``, ``training_dynamics``)."""

from __future__ import annotations


import pandas as pd
from .core import DATASETS, METHOD_LABELS, beside_paper, summarize, with_average


def method_table(runs: pd.DataFrame, table: str, metrics, *, model: str, average: bool = False) -> pd.DataFrame:
    """Tables 1, 2, 5, 6: per model, method and dataset, our mean/SE over seeds beside the paper.

    Methods are told apart by their label (so S-DPO at n = 3 and S-DPO-all are two rows); the untrained
    ``reference`` rows (:func:`mass_dpo.experiments.core.reference_rows`), when ``runs`` holds them, come first."""
    by = ["model", "label", "dataset"]
    summary = summarize(runs, by, metrics)
    if average:
        summary = with_average(summary, runs, by, metrics)
    summary = summary.rename(columns={"label": "method"})
    out = beside_paper(summary, table, ["method", "dataset", "metric"], model=model)
    order = {m: i for i, m in enumerate(["reference", *METHOD_LABELS.values(), "S-DPO-all"])}
    dorder = {d: i for i, d in enumerate((*DATASETS, "avg"))}
    out = out.sort_values(["model", "method", "dataset", "metric"],
                          key=lambda s: s.map(order) if s.name == "method" else
                          s.map(dorder) if s.name == "dataset" else s).reset_index(drop=True)
    return out


# ---------------------------------------------------------------- Figures 2-3


def curves(runs: pd.DataFrame, *, split: str = "eval") -> pd.DataFrame:
    """The online-eval logs of ``runs`` stacked: one row per (run, step), long in ``metric`` (margin, accuracy,
    chosen_rewards), with ``dataset, method, label, seed, step``."""
    from ..runs import load_run

    frames = []
    for row in runs.itertuples():
        log = load_run(row.run_dir).log()
        log = log[log["split"] == split]
        for metric in ("margin", "accuracy", "chosen_rewards"):
            frames.append(pd.DataFrame({"dataset": row.dataset, "method": row.method, "label": row.label,
                                        "seed": row.seed, "step": log["step"].to_numpy(), "metric": metric,
                                        "value": log[metric].to_numpy(dtype=float)}))
    if not frames:
        return pd.DataFrame(columns=["dataset", "method", "label", "seed", "step", "metric", "value"])
    return pd.concat(frames, ignore_index=True)


def curve_summary(curves_df: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% t-interval over seeds of each (dataset, method, metric, step)."""
    from ..plotting import mean_ci

    return mean_ci(curves_df, ["dataset", "label", "metric", "step"], "value")


def final_gap(curves_df: pd.DataFrame, a: str = "MASS-DPO", b: str = "S-DPO") -> pd.DataFrame:
    """The last logged value of each metric, ``a`` minus ``b``, per dataset (mean over seeds)."""
    last = curves_df[curves_df["step"] == curves_df.groupby(["dataset", "label", "seed"])["step"].transform("max")]
    means = last.groupby(["dataset", "metric", "label"])["value"].mean().unstack("label")
    if a not in means or b not in means:
        return pd.DataFrame(columns=["dataset", "metric", a, b, "diff"])
    means["diff"] = means[a] - means[b]
    return means[[a, b, "diff"]].reset_index()


