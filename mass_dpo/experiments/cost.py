"""Tables 7-8: wall-clock cost and the matched-compute comparison (``notebooks/table7.ipynb``, ``table8``)."""

from __future__ import annotations

import math
import time
from typing import Callable

import pandas as pd
from .core import FULL_POOL, Setup, beside_paper, grid, load_split, paper_reference, run_grid, summarize


# ---------------------------------------------------------------- Tables 7-8


def wallclock(setup: Setup, datasets, *, n: int = 5, full: int = FULL_POOL, seeds=None, beta: float = 0.1,
              echo: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Table 7: extraction, selection and training-per-epoch seconds for MASS-DPO-n and S-DPO with the full pool.

    Extraction: the seconds the extraction manifests recorded when the splits were first extracted (train, valid
    and test). Selection: Algorithm 1 over the training prompts, timed now. Training: each run's recorded training
    seconds over its epochs. One row per (model, dataset, seed, component)."""
    from ..preprocess import select_extracted
    from ..runs import load_run

    seeds = list(seeds if seeds is not None else setup.seeds)
    specs = grid(datasets, ["mass_dpo"], seeds, n=n, beta=beta) + grid(datasets, ["sdpo"], seeds, n=full, beta=beta)
    runs = run_grid(setup, specs, echo=echo)
    rows = []
    timed: set = set()
    for row in runs.itertuples():
        cfg = load_run(row.run_dir).config
        per_epoch = float(row.seconds_train) / max(float(cfg.num_train_epochs), 1e-9)
        if cfg.max_steps and cfg.max_steps > 0:
            per_epoch = float(row.seconds_train)  # smoke: a fixed number of steps, "per epoch" = the whole run
        rows.append({"model": row.model, "dataset": row.dataset, "seed": row.seed,
                     "component": f"train_epoch_{'mass_dpo' if row.method == 'mass_dpo' else 'sdpo'}_{row.n}",
                     "seconds": per_epoch, "steps": row.steps})
        if row.method == "mass_dpo" and (row.model, row.dataset) not in timed:
            timed.add((row.model, row.dataset))
            splits = [load_split(cfg, s) for s in ("train", "valid", "test") if s != "valid" or cfg.eval_limit != 0]
            extraction = sum(float(ex.meta.get("seconds", math.nan)) for ex in splits)
            t0 = time.perf_counter()
            select_extracted(splits[0], n, strategy="dopt", beta=beta, gamma=cfg.gamma,
                             selection_score=cfg.selection_score)
            selection = time.perf_counter() - t0
            prompts = sum(len(ex) for ex in splits)
            for comp, sec in (("extraction", extraction), ("selection", selection),
                              ("selection_total", extraction + selection)):
                rows.append({"model": row.model, "dataset": row.dataset, "seed": None, "component": comp,
                             "seconds": sec, "steps": None, "prompts": prompts if comp != "selection" else len(splits[0])})
    return pd.DataFrame(rows)


def wallclock_table(clock: pd.DataFrame, *, n: int = 5, full: int = FULL_POOL) -> pd.DataFrame:
    """Table 7 beside the paper (minutes on 4x H100, Llama3 MovieLens): our seconds (mean, SE over seeds), the
    share of the selection in the one-time cost, and the per-epoch ratio S-DPO-full / MASS-DPO-n against 1.85."""
    if clock.empty:
        return pd.DataFrame()
    rows = []
    ref = paper_reference("table7").set_index("component")["minutes"]
    paper_key = {f"train_epoch_mass_dpo_{n}": "train_epoch_mass_dpo_5", f"train_epoch_sdpo_{full}": "train_epoch_sdpo_19"}
    for (model, dataset), grp in clock.groupby(["model", "dataset"], sort=False):
        for comp, g in grp.groupby("component", sort=False):
            vals = g["seconds"].to_numpy(dtype=float)
            se = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else math.nan
            rows.append({"model": model, "dataset": dataset, "component": comp, "seconds": float(vals.mean()),
                         "se": se, "paper_minutes": ref.get(paper_key.get(comp, comp), math.nan)})
        per = grp.groupby("component")["seconds"].mean()
        a, b = per.get(f"train_epoch_sdpo_{full}"), per.get(f"train_epoch_mass_dpo_{n}")
        if a is not None and b is not None and b > 0:
            rows.append({"model": model, "dataset": dataset, "component": f"ratio_sdpo_{full}_over_mass_dpo_{n}",
                         "seconds": a / b, "se": math.nan,
                         "paper_minutes": ref["train_epoch_sdpo_19"] / ref["train_epoch_mass_dpo_5"]})
    out = pd.DataFrame(rows)
    return out


TABLE8_METRICS = ("accuracy", "recall@1", "recall@3", "recall@5", "ndcg@1", "ndcg@3", "ndcg@5", "mrr", "margin")


def matched_specs(datasets, seeds, *, n: int = 5, full: int = FULL_POOL, epochs=(2, 1), beta: float = 0.1
                  ) -> list[dict]:
    """Table 8's runs: MASS-DPO-n for ``epochs[0]`` epochs and S-DPO with the full pool for ``epochs[1]``."""
    return (grid(datasets, ["mass_dpo"], seeds, n=n, beta=beta, num_train_epochs=float(epochs[0]))
            + grid(datasets, ["sdpo"], seeds, n=full, beta=beta, num_train_epochs=float(epochs[1])))


def matched_table(runs: pd.DataFrame, *, model: str) -> pd.DataFrame:
    """Table 8 beside the paper (fractions, MovieLens + Llama3): every metric and the training seconds."""
    if runs.empty:
        return pd.DataFrame()
    runs = runs.assign(runtime_s=runs["seconds_train"].astype(float))
    summary = summarize(runs, ["model", "method", "n", "epochs", "dataset"], [*TABLE8_METRICS, "runtime_s"],
                        percent=())
    summary["method"] = summary["method"].map({"mass_dpo": "MASS-DPO", "sdpo": "S-DPO-all"})
    return beside_paper(summary, "table8", ["method", "dataset", "metric"], model=model)


