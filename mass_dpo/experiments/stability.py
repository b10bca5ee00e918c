"""Table 4: stability of the D-optimal selection along training (``notebooks/table4.ipynb``).

    budget_table (which n leave a choice)  ->  stability (MASS-DPO-n runs, Algorithm 1 recomputed at the mid and final
    theta under the runs' own reading)  ->  stability_table (beside the paper)  ->  stability_sentences
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from .core import (_config, available, config_of, disk_memo, Setup, beside_paper, grid, load_split, run_grid, span,
                   summarize)


# ---------------------------------------------------------------- Table 4


@disk_memo("budget_table")
def budget_table(setup: Setup, datasets, ns, *, echo: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Which budgets of ``ns`` Table 4 can compare, per dataset: ``negatives_max`` (the most negatives of any training
    pool of the runs' prompts: the setup's data, limit and subsample seed) and ``trivial`` (``n >=`` the negatives of
    every pool, so every selection is the whole pool at any checkpoint; QASC's 7 negatives make n = 10 trivial, as
    :func:`mass_dpo.stability.trivial_budgets` says of an extraction). Read from the records: pool sizes depend on no
    model, feature or tuned setting."""
    from ..config import resolve_config
    from ..data import load_benchmark

    rows = []
    for ds, where in available(list(datasets), setup.data_dir, echo).items():
        cfg = resolve_config(_config(setup, {"dataset": ds, "method": "mass_dpo", "seed": 0}, where))
        records = load_benchmark(cfg.dataset, "train", data_dir=cfg.data_dir, limit=cfg.limit, seed=cfg.subsample_seed)
        most = max((len(r["candidates"]) - 1 for r in records), default=0)
        rows += [{"dataset": ds, "n": int(n), "negatives_max": most, "trivial": int(n) >= most} for n in ns]
    return pd.DataFrame(rows, columns=["dataset", "n", "negatives_max", "trivial"])


def budget_sentence(budgets: pd.DataFrame) -> str:
    """The printed line naming the rows :func:`stability` drops (or saying none is dropped)."""
    dropped = budgets[budgets["trivial"]] if len(budgets) else budgets
    if dropped.empty:
        return "Every budget leaves a choice in some pool: no row is dropped."
    parts = [f"{r.dataset} n = {r.n} (at most {r.negatives_max} negatives per pool)" for r in dropped.itertuples()]
    return ("Dropped, because n is at least the number of negatives in every pool, so that every selection is the "
            f"whole pool at any checkpoint and agrees by construction: {'; '.join(parts)}.")


#: The regimes whose checkpoints Table 4 can recompute the selection at: loglinear (theta_t on frozen features) and
#: freeze (the snapshots' top blocks re-run on the cached lower-block states: :func:`mass_dpo.runs.reextract_run`).
STABILITY_REGIMES = ("loglinear", "freeze")


def check_stability_regime(setup: Setup) -> None:
    """Table 4 recomputes Algorithm 1 at saved checkpoints: the loglinear and freeze regimes (see
    :data:`STABILITY_REGIMES`); ``lora`` and ``full`` keep no snapshots to re-extract from."""
    if setup.regime not in STABILITY_REGIMES:
        raise NotImplementedError(f"Table 4 in the {setup.regime} regime would re-extract every candidate with the "
                                  f"whole model at each checkpoint, which the runs do not keep: use the regime "
                                  f"{' or '.join(STABILITY_REGIMES)} (-p regime freeze)")


def stability_specs(setup: Setup, datasets, *, ns=(5, 10), seeds=None, beta: float = 0.1,
                    budgets: pd.DataFrame | None = None) -> list[dict]:
    """Table 4's run grid: MASS-DPO at every ``n`` of ``ns``, less the ``trivial`` budgets of ``budgets``
    (:func:`budget_table`); the regimes of :func:`check_stability_regime`."""
    check_stability_regime(setup)
    seeds = list(seeds if seeds is not None else setup.seeds)
    specs = grid(datasets, ["mass_dpo"], seeds, n=list(ns), beta=beta)
    if budgets is not None and len(budgets):
        skip = {(r.dataset, int(r.n)) for r in budgets.itertuples() if r.trivial}
        specs = [s for s in specs if (s["dataset"], int(s["n"])) not in skip]
    return specs


@disk_memo("stability", version=2)
def stability(setup: Setup, datasets, *, ns=(5, 10), seeds=None, beta: float = 0.1,
              budgets: pd.DataFrame | None = None, echo: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Table 4: MASS-DPO-n runs; Algorithm 1 recomputed at the mid-training and final theta against initialisation,
    on the training prompts (the paper's) and, at the final checkpoint, on the held-out validation prompts.

    One row per (model, dataset, n, seed, checkpoint of :data:`CHECKPOINTS`): exact match, Jaccard, top-1 and
    top-3 exact match, objective retention, with their chance levels on the same pools (``chance_*``,
    ``random_retention``: :func:`mass_dpo.stability.chance_agreement`), the selection made under the run's own
    reading of the preprocessing score (``cfg.selection_score``) with its n, beta and gamma, on its own training split
    (:func:`core.load_split`): every setting is the run's (:func:`core.config_of`).
    ``budgets`` (:func:`budget_table`): its ``trivial`` (dataset, n) are neither trained nor compared.
    Loglinear regime: theta_t gives Delta_i(theta_t) = phi_i . theta_t on the frozen features
    (:func:`mass_dpo.stability.at_checkpoint`; ``theta_norm``); the exact fit's ``mid`` snapshot is the L-BFGS
    iterate half-way along its path, the Trainer's the end of epoch 1. Freeze regime, as the paper ran it: the
    features and log-probs of every candidate re-extracted under the untrained policy and under the ``mid`` (half of
    the optimizer steps) and ``final`` snapshots (:func:`mass_dpo.runs.reextract_run`; ``weight_change``: the
    relative distance of the trained blocks from the pretrained ones)."""
    specs = stability_specs(setup, datasets, ns=ns, seeds=seeds, beta=beta, budgets=budgets)
    runs = run_grid(setup, specs, echo=echo, snapshots=True)
    rows = []
    for row in runs.itertuples():
        cfg = config_of(row)
        kw = dict(beta=float(cfg.beta), gamma=float(cfg.gamma), selection_score=cfg.selection_score)
        keys = {"model": row.model, "dataset": row.dataset, "n": int(cfg.n), "seed": row.seed,
                "selection_score": cfg.selection_score, "beta": float(cfg.beta), "gamma": float(cfg.gamma),
                "pooling": cfg.pooling, "regime": cfg.regime, "run_dir": str(row.run_dir)}
        for name, step, moved, metrics in _checkpoints(row, cfg, kw):
            rows.append({**keys, "checkpoint": name, "step": step, **moved, **metrics})
    return pd.DataFrame(rows)


#: The checkpoint rows of Table 4: the paper's two on the training prompts, and the final one on the held-out
#: validation prompts, whose negatives the run never trained on (training pushes down exactly the negatives it
#: selected, so their selection can move for that reason alone; the held-out prompts show the rest).
CHECKPOINTS = ("mid", "final", "final_heldout")


def _checkpoints(row, cfg, kw):
    """``(checkpoint, step, {how far the policy moved}, Table 4's metrics)`` of a run's ``mid`` and ``final``
    snapshots against its initialisation on its own training split, and of ``final`` on its validation split
    (``final_heldout``)."""
    from .. import stability as stab

    where = {"mid": ("train", "mid"), "final": ("train", "final"), "final_heldout": ("valid", "final")}
    if cfg.regime == "freeze":  # the paper's way: features and log-probs re-extracted from each checkpoint
        from ..runs import load_policy, reextract_run

        init = {split: reextract_run(row.run_dir, split, snapshot="init") for split in ("train", "valid")}
        start = load_policy(row.run_dir, "init").trainable_state_dict()
        for name in CHECKPOINTS:
            split, snapshot = where[name]
            ex = reextract_run(row.run_dir, split, snapshot=snapshot)
            moved = weight_change(start, load_policy(row.run_dir, snapshot).trainable_state_dict())
            yield (name, ex.meta["step"], {"weight_change": moved},
                   stab.recompute_extracted(init[split], ex, int(cfg.n), **kw))
        return
    for name in CHECKPOINTS:
        split, snapshot = where[name]
        ex = load_split(row, split)
        snap = torch.load(Path(row.run_dir) / "snapshots" / f"{snapshot}.pt")
        yield (name, snap["step"], {"theta_norm": float(snap["theta"].norm())},
               stab.recompute(ex, torch.zeros(ex.features.shape[-1]), snap["theta"], int(cfg.n), **kw))


def weight_change(start: dict, now: dict) -> float:
    """``||w_t - w_0|| / ||w_0||`` over every trainable weight (two state dicts with the same names): how far a
    freeze run's top blocks moved from the pretrained ones."""
    num = sum(float((now[k].double() - start[k].double()).pow(2).sum()) for k in start)
    den = sum(float(start[k].double().pow(2).sum()) for k in start)
    return math.sqrt(num / den) if den > 0 else math.nan


def movement_table(stab: pd.DataFrame) -> pd.DataFrame:
    """How far the policy moved at each snapshot (mean over seeds): the optimizer step or L-BFGS iteration, and
    ``theta_norm`` (loglinear) or ``weight_change`` (freeze: ``||w_t - w_0|| / ||w_0||`` of the trained blocks)."""
    cols = [c for c in ("step", "theta_norm", "weight_change") if c in stab and stab[c].notna().any()]
    if stab.empty:
        return pd.DataFrame(columns=["dataset", "n", "checkpoint", *cols])
    snaps = stab[stab["checkpoint"] != "final_heldout"]  # the final snapshot again, on other prompts
    return snaps.groupby(["dataset", "n", "checkpoint"], sort=False)[cols].mean().reset_index()


STABILITY_METRICS = ("exact_match", "mean_jaccard", "top1_match", "top3_exact_match", "objective_retention",
                     "chance_jaccard", "chance_top1_match", "random_retention")


def _against_chance(value: float, chance: float) -> str:
    return "above" if value > 1.1 * chance else "below" if value < chance / 1.1 else "about"


def stability_table(stab: pd.DataFrame, *, model: str) -> pd.DataFrame:
    """Table 4 beside the paper: per dataset, n and checkpoint, the mean (and SE over seeds) of each metric, with
    the chance levels of the same pools (``chance_jaccard``, ``chance_top1_match``, ``random_retention``)."""
    if stab.empty:
        return pd.DataFrame()
    df = stab.rename(columns={"jaccard": "mean_jaccard"})
    metrics = [m for m in STABILITY_METRICS if m in df]
    summary = summarize(df, ["model", "dataset", "n", "checkpoint"], metrics, percent=())
    summary["n"] = summary["n"].astype(str)
    out = beside_paper(summary, "table4", ["dataset", "n", "metric"], model=model)
    out.loc[out["checkpoint"] != "final", ["paper", "diff"]] = math.nan  # the paper compares init vs final
    return out




def stability_sentences(table: pd.DataFrame, stab: pd.DataFrame | None = None) -> list[str]:
    """"What the numbers say" of Table 4, from :func:`stability_table` (and the records of :func:`stability`, for the
    reading and how far theta moved): one line per (model, dataset, n), then the conclusion."""
    from .core import paper_reference

    if table.empty:
        return ["No Table 4 rows (every budget was trivial or no data was found)."]
    val = table.pivot_table(index=["model", "dataset", "n", "checkpoint"], columns="metric", values="value",
                            aggfunc="first", sort=False)
    lines = []
    for (model, ds, n), grp in val.groupby(level=[0, 1, 2], sort=False):
        parts = []
        for ck, label in (("final", "the final checkpoint"), ("mid", "the half-way checkpoint"),
                          ("final_heldout", "the final checkpoint on the held-out validation prompts")):
            if (model, ds, n, ck) in grp.index:
                r = grp.loc[(model, ds, n, ck)]
                chance = f" (chance {r['chance_jaccard']:.3f})" if "chance_jaccard" in grp.columns else ""
                parts.append(f"against {label}: exact match {r['exact_match']:.3f}, mean Jaccard "
                             f"{r['mean_jaccard']:.3f}{chance}, top-1 match {r['top1_match']:.3f}, objective retention "
                             f"{r['objective_retention']:.4f}")
        line = f"{model} {ds} n = {n}, initialisation " + "; ".join(parts) + "."
        if (model, ds, n, "final") in grp.index and "chance_jaccard" in grp.columns:
            r = grp.loc[(model, ds, n, "final")]
            line += (f" Chance on the same pools (two independent random subsets): Jaccard {r['chance_jaccard']:.3f}, "
                     f"top-1 match {r['chance_top1_match']:.3f}, so the final Jaccard is "
                     f"{_against_chance(r['mean_jaccard'], r['chance_jaccard'])} chance; a random subset retains "
                     f"{r['random_retention']:.4f} of the recomputed one's objective.")
        lines.append(line)
    final = table[table["checkpoint"] == "final"]
    keep = final[final["metric"] == "objective_retention"]["value"].astype(float)
    exact = final[final["metric"] == "exact_match"]["value"].astype(float)
    rand = final[final["metric"] == "random_retention"]["value"].astype(float)
    ref = paper_reference("table4")
    paper_exact = ref[ref["metric"] == "exact_match"]["value"].astype(float)
    paper_keep = ref[ref["metric"] == "objective_retention"]["value"].astype(float)
    readings = sorted(set(stab["selection_score"])) if stab is not None and "selection_score" in stab else []
    if readings:
        lines.append(f"Selections made under the runs' reading of the preprocessing score: {', '.join(readings)}.")
    regimes = set(stab["regime"]) if stab is not None and "regime" in stab else {"loglinear"}
    if "offset" in readings and "loglinear" in regimes:
        lines.append("Under offset (l_i = b_i, the reference alone) the logits of Algorithm 1 do not depend on theta, "
                     "so on frozen features the recomputed selection is the initial one by construction.")
    if stab is not None and len(stab):
        final = stab[stab["checkpoint"] == "final"]
        if "theta_norm" in final and final["theta_norm"].notna().any():
            lines.append(f"theta moved from 0 to a norm of {span(final['theta_norm'].dropna().astype(float), 2)} at "
                         "the end of the fit.")
        if "weight_change" in final and final["weight_change"].notna().any():
            lines.append("The trained blocks moved from the pretrained ones by "
                         f"{span(100 * final['weight_change'].dropna().astype(float), 2)}% of their norm "
                         "(||w_T - w_0|| / ||w_0||); features and log-probs were re-extracted at each checkpoint.")
    if len(keep):
        verdict = ("so re-selecting during training would gain little: the paper's conclusion holds here for the "
                   "objective" if keep.min() >= 0.99 else
                   "so the subset chosen at initialisation loses part of the information of the recomputed one: the "
                   "paper's conclusion that re-selecting gains little does not hold here")
        chance = f"; a random subset of the same size: {span(rand, 4)}" if len(rand) else ""
        lines.append(f"Objective retention at the final checkpoint: {span(keep, 4)} (paper {span(paper_keep, 4)}"
                     f"{chance}), {verdict}.")
    if len(exact):
        same = ("the subsets stay nearly identical, as in the paper" if exact.min() >= 0.95 else
                "the subsets themselves change more than in the paper")
        lines.append(f"Exact match at the final checkpoint: {span(exact, 3)} against the paper's {span(paper_exact, 3)} "
                     f"(MovieLens, Llama-3.2-3B): {same}.")
    return lines
