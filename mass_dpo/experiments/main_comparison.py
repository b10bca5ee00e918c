"""Tables 1, 2, 5, 6 and Figures 2-3: the five methods compared on the four datasets (``notebooks/table1.ipynb``,
``table2``, ``table5``, ``table6``, ``training_dynamics``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .core import beside_paper, disk_memo, method_label, paper_order, summarize, with_average


def method_table(runs: pd.DataFrame, table: str, metrics, *, model: str, average: bool = False) -> pd.DataFrame:
    """Tables 1, 2, 5, 6: per model, method and dataset, our mean/SE over seeds beside the paper.

    Methods are told apart by their label (so S-DPO at n = 3 and S-DPO-all are two rows); the untrained
    ``reference`` rows (:func:`mass_dpo.experiments.core.reference_rows`), when ``runs`` holds them, come first."""
    if "label" not in runs:
        runs = runs.assign(label=runs["method"].map(method_label))
    by = ["model", "label", "dataset"]
    summary = summarize(runs, by, metrics)
    if average:
        summary = with_average(summary, runs, by, metrics)
    summary = summary.rename(columns={"label": "method"})
    out = beside_paper(summary, table, ["method", "dataset", "metric"], model=model)
    return out.sort_values(["model", "method", "dataset", "metric"], key=paper_order).reset_index(drop=True)


# ---------------------------------------------------------------- Figures 2-3

#: The quantities of Figures 2-3 (margin, reward accuracy, chosen reward) and, on the common negatives, the MRR.
CURVE_METRICS = ("margin", "accuracy", "chosen_rewards")


def curve_axis(runs: pd.DataFrame) -> str:
    """The x axis of the runs' curves: ``"L-BFGS iteration"`` for the exact log-linear fit (no epochs, no learning
    rate: one iterate per full-batch L-BFGS step, 0 = theta 0 = the reference), ``"optimiser step"`` for the Trainer's
    Adam path (LM regimes, ``fit="adam"``)."""
    from ..runs import load_run

    configs = [load_run(r).config for r in runs["run_dir"]]
    fits = {c.fit if c.regime == "loglinear" else "adam" for c in configs}
    if fits == {"exact"}:
        return "L-BFGS iteration"
    return "optimiser step" if "exact" not in fits else "L-BFGS iteration / optimiser step"


def curves(runs: pd.DataFrame, *, split: str = "eval") -> pd.DataFrame:
    """The online-eval logs of ``runs`` stacked: one row per (run, step), long in ``metric`` (margin, accuracy,
    chosen_rewards), with ``dataset, method, label, seed, step`` and ``negatives = "own"``: each run is scored on its
    *own* fixed negatives (D-optimal for MASS-DPO, random for S-DPO), as a DPO trainer's online evaluation is. Under
    the exact fit ``step`` is the L-BFGS iteration (0 = theta 0). The ``reference`` rows of ``runs`` are skipped."""
    from ..runs import load_run

    frames = []
    for row in runs.itertuples():
        if row.label == "reference":
            continue
        log = load_run(row.run_dir).log()
        log = log[log["split"] == split]
        for metric in CURVE_METRICS:
            frames.append(pd.DataFrame({"dataset": row.dataset, "method": row.method, "label": row.label,
                                        "seed": row.seed, "negatives": "own", "step": log["step"].to_numpy(),
                                        "metric": metric, "value": log[metric].to_numpy(dtype=float)}))
    if not frames:
        return pd.DataFrame(columns=["dataset", "method", "label", "seed", "negatives", "step", "metric", "value"])
    return pd.concat(frames, ignore_index=True)


def pool_curve_point(theta: torch.Tensor, features: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
                     beta: float) -> dict[str, float]:
    """Figures 2-3's quantities for one theta on *whole pools* (every candidate, the same for every method).

    The log-linear implicit reward is ``r_c = beta * phi_c . theta`` (log pi - log pi_ref). ``margin``: the chosen
    reward minus the mean reward of the pool's negatives; ``accuracy``: the chosen response ranked first over the
    pool (Recall@1, ties at random in expectation, so theta = 0 sits at 1 / pool size); ``mrr``; ``chosen_rewards``.

    Args:
        theta: ``[d]``. features: ``[P, C, d]``; mask: ``[P, C]`` bool (real candidates); target: ``[P]``.
    """
    from ..metrics import per_prompt_ranking

    reward = beta * (features.double() @ theta.double())  # [P, C]
    chosen = reward.gather(1, target[:, None]).squeeze(1)  # [P]
    neg = mask.clone()
    neg[torch.arange(len(target)), target] = False
    reward_masked = torch.where(mask, reward, torch.full_like(reward, float("-inf")))
    ranks = per_prompt_ranking(reward_masked, target, ks=(1,), mask=mask)
    return {"margin": float((chosen - (reward * neg).sum(-1) / neg.sum(-1).clamp_min(1)).mean()),
            "accuracy": float(ranks["recall@1"].mean()), "mrr": float(ranks["mrr"].mean()),
            "chosen_rewards": float(chosen.mean())}


def refit(run_dir, *, callback=None):
    """Fit a finished exact log-linear run again, from its saved config and the same (cached) data: the objective is
    strictly convex and L-BFGS deterministic, so the iterates retrace the run's path. ``callback(iteration, theta)``
    sees every iterate (0 = theta 0). Returns ``(fit, seconds, run_data)``; the fit's final theta is checked against
    the run's saved one (a clear error where they differ: the data or code changed since the run was trained)."""
    import time

    from ..loglinear import fit_loglinear
    from ..runs import _records_tensors, load_run, prepare_data

    result = load_run(run_dir)
    cfg = result.config
    if cfg.regime != "loglinear" or cfg.fit != "exact":
        raise ValueError(f"{run_dir}: refit needs an exact log-linear run (regime loglinear, fit exact); got regime "
                         f"{cfg.regime}, fit {cfg.fit}")
    data = prepare_data(cfg)
    X, M = _records_tensors(data.train)  # [P, 1+n, d], [P, 1+n]
    t0 = time.perf_counter()
    fit = fit_loglinear(X, M, method=cfg.method, beta=cfg.beta, ridge=cfg.ridge, tol=cfg.fit_tol,
                        max_iter=cfg.fit_max_iter, callback=callback)
    seconds = time.perf_counter() - t0
    saved = torch.load(Path(run_dir) / "snapshots" / "final.pt")["theta"].double()
    gap = float((fit.theta.double() - saved).norm() / saved.norm().clamp_min(1e-12))
    if gap > 1e-3:
        raise RuntimeError(f"{run_dir}: the refit ends {gap:.2g} (relative) away from the run's saved theta; the data "
                           "or the code changed since the run: retrain it (train_run(..., force=True))")
    return fit, seconds, data


#: What :func:`common_curves` reads from a run's ``pool`` log rows.
POOL_METRICS = ("margin", "accuracy", "mrr", "chosen_rewards")


def common_curves(runs: pd.DataFrame, *, split: str = "valid", cache: bool = True) -> pd.DataFrame:
    """The fair version of Figures 2-3: every L-BFGS iterate of every exact log-linear run (:func:`refit`) scored on
    the whole pools of the ``split`` prompts (the online-eval prompts by default): the same candidates for every
    method, so no run is scored on negatives it chose. Rows like :func:`curves` with ``negatives = "common"`` and the
    extra metric ``mrr`` (:func:`pool_curve_point`). The ``reference`` rows of ``runs`` are skipped (iteration 0 is
    the reference). Runs that are not exact log-linear fits have no path to retrace: for them the curve is what the
    run logged while it trained, its ``split == "pool"`` rows (``pool_eval``: the same quantities on the whole pools
    of the online-eval prompts at every evaluation, :class:`mass_dpo.training.PoolEval`; over optimizer steps); runs
    without them are skipped. ``cache``: each exact run's curve is kept in its folder (``common_curve_<split>.csv``;
    a retrained run starts from an empty folder), so a warm rerun fits nothing."""
    from ..files import atomic_path, compute_once

    frames = []
    for row in runs.itertuples():
        if row.label == "reference":
            continue
        if pd.isna(row.ridge):  # run_row sets ridge only for exact log-linear runs: the others logged their pools
            if split != "valid" or not (Path(row.run_dir) / "log.csv").is_file():
                continue
            from ..runs import load_run

            log = load_run(row.run_dir).log()
            pool = log[log["split"] == "pool"] if "split" in log else log.iloc[:0]
            metrics = [m for m in POOL_METRICS if m in pool and pool[m].notna().any()]
            if pool.empty or not metrics:
                continue
            long = pool[["step", *metrics]].melt(id_vars="step", var_name="metric", value_name="value")
            frames.append(long.assign(dataset=row.dataset, method=row.method, label=row.label, seed=row.seed,
                                      negatives="common"))
            continue
        kept = Path(row.run_dir) / f"common_curve_{split}.csv"

        def retraced():  # called at once, inside this iteration
            long = _retraced_curve(row, split)
            if cache:
                with atomic_path(kept) as tmp:
                    long.to_csv(tmp, index=False)
            return long

        # under the run's own lock (the one training takes, outside the folder): a retrain, `runs import` or
        # `runs rename` replacing the folder meanwhile can neither take a second lock nor receive the old curve
        long = compute_once(kept.parent, f"the common-pool curve of {kept.parent.name}",
                            lambda: pd.read_csv(kept) if kept.is_file() else None, retraced, enabled=cache)
        frames.append(long.assign(dataset=row.dataset, method=row.method, label=row.label, seed=row.seed,
                                  negatives="common"))
    cols = ["dataset", "method", "label", "seed", "negatives", "step", "metric", "value"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def longest_share(candidates: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor, k: int = 3
                  ) -> tuple[float, float]:
    """How often the training negatives are among the ``k`` longest negatives of their pool, against chance.

    Args:
        candidates: ``[P, 1+n]`` pool indices, column 0 the chosen response, ``-1`` = none.
        lengths: ``[P, C]`` response token counts; mask: ``[P, C]`` real candidates.
    Returns:
        ``(share, chance)``: the fraction of the negatives that are among the ``k`` longest negatives of their pool
        (ties at the k-th length count as among them), and the fraction a uniform draw would give.
    """
    P = candidates.shape[0]
    neg = mask.clone()
    neg[torch.arange(P), candidates[:, 0]] = False  # the pool's negatives
    length = torch.where(neg, lengths.double(), torch.full_like(lengths, -1, dtype=torch.float64))  # [P, C]
    kk = torch.clamp(neg.sum(-1), max=k)  # [P]
    kth = length.sort(-1, descending=True).values.gather(1, (kk - 1).clamp_min(0)[:, None])  # [P, 1]
    top = neg & (length >= kth)  # [P, C]: the k longest negatives (ties included)
    picks = candidates[:, 1:]
    real = picks >= 0
    hit = top.gather(1, picks.clamp_min(0)) & real  # [P, n]
    chance = (top.sum(-1).double() / neg.sum(-1).clamp_min(1).double())  # [P]
    return float(hit.sum() / real.sum().clamp_min(1)), float((chance * real.sum(-1)).sum() / real.sum().clamp_min(1))


@disk_memo("length_bias")
def length_bias(runs: pd.DataFrame, *, k: int = 3) -> pd.DataFrame:
    """Per training run: the share of its training negatives among the ``k`` longest of their pool and the chance
    share (:func:`longest_share`): D-optimal picks that favour long (most separable) negatives make a method's own
    online-eval negatives easy. Columns ``dataset, label, seed, share, chance``."""
    from .core import training_negatives

    rows = []
    for row in runs.itertuples():
        if row.label == "reference":
            continue
        split, candidates = training_negatives(row)
        if split.lengths is None:
            continue
        share, chance = longest_share(candidates, split.lengths, split.mask, k)
        rows.append({"dataset": row.dataset, "label": row.label, "seed": row.seed, "share": share, "chance": chance})
    return pd.DataFrame(rows, columns=["dataset", "label", "seed", "share", "chance"])


def length_bias_summary(lengths: pd.DataFrame) -> pd.DataFrame:
    """:func:`length_bias` per (dataset, method): the mean over seeds of ``share`` and ``chance``, and ``seeds``."""
    if lengths.empty:
        return pd.DataFrame(columns=["dataset", "label", "share", "chance", "seeds"])
    grouped = lengths.groupby(["dataset", "label"], sort=False)
    out = grouped[["share", "chance"]].mean()
    out["seeds"] = grouped["seed"].nunique()
    return out.reset_index()


def _retraced_curve(row, split: str) -> pd.DataFrame:
    """A finished exact-fit run's path re-fitted (deterministic), each iterate scored on the whole pools of
    ``split``: long rows ``step, metric, value``."""
    from .core import config_of, load_split

    cfg = config_of(row)
    pools = load_split(row, split)
    points = []

    def score(it, theta):
        points.append({"step": it, **pool_curve_point(theta, pools.features, pools.mask, pools.target, cfg.beta)})

    refit(row.run_dir, callback=score)
    return pd.DataFrame(points).melt(id_vars="step", var_name="metric", value_name="value")


def hold_last(curves_df: pd.DataFrame) -> pd.DataFrame:
    """Each run's curve on the steps its dataset's runs logged (no step that none of them evaluated): linear
    between the run's own points, and its final value held after its last one (a fit that converged earlier stays
    where it stopped), so that means over seeds and methods cover the same steps."""
    keys = [k for k in ("dataset", "label", "seed", "negatives", "metric") if k in curves_df]
    if curves_df.empty:
        return curves_df
    logged = curves_df.groupby("dataset")["step"].unique()
    frames = []
    for key, grp in curves_df.groupby(keys, sort=False):
        grp = grp.sort_values("step").drop_duplicates("step", keep="last")
        steps = np.sort(logged[grp["dataset"].iloc[0]])
        steps = steps[steps >= grp["step"].min()]
        full = grp.set_index("step").reindex(steps)
        full["value"] = full["value"].interpolate(method="index", limit_area="inside")
        frames.append(full.ffill().rename_axis("step").reset_index())
    return pd.concat(frames, ignore_index=True)


def curve_summary(curves_df: pd.DataFrame, *, hold: bool = True, band: str = "range") -> pd.DataFrame:
    """Mean over seeds of each (dataset, negatives, method, metric, step) with the seeds as a band (``lo``-``hi``:
    lowest to highest seed; ``band="t"``: a 95% t-interval, :func:`mass_dpo.plotting.mean_ci`); ``hold``: each
    run's final value held to the dataset's last step first (:func:`hold_last`)."""
    from ..plotting import mean_ci

    data = hold_last(curves_df) if hold else curves_df
    by = ["dataset", *(["negatives"] if "negatives" in data else []), "label", "metric", "step"]
    return mean_ci(data, by, "value", band=band)


def final_gap(curves_df: pd.DataFrame, a: str = "MASS-DPO", b: str = "S-DPO") -> pd.DataFrame:
    """The last logged value of each metric, ``a`` minus ``b``, per dataset (and per kind of ``negatives``: own or
    common), mean over seeds."""
    group = ["dataset", *(["negatives"] if "negatives" in curves_df else []), "metric"]
    run = ["dataset", *(["negatives"] if "negatives" in curves_df else []), "label", "seed"]
    last = curves_df[curves_df["step"] == curves_df.groupby(run)["step"].transform("max")]
    means = last.groupby([*group, "label"])["value"].mean().unstack("label")
    if a not in means or b not in means:
        return pd.DataFrame(columns=[*group, a, b, "diff"])
    means["diff"] = means[a] - means[b]
    return means[[a, b, "diff"]].reset_index()


def dynamics_sentences(trained: pd.DataFrame, axis: str, gap: pd.DataFrame, lengths: pd.DataFrame,
                       learned: pd.DataFrame, generation: pd.DataFrame, pairs: pd.DataFrame) -> list[str]:
    """The closing lines of Figures 2-3, each computed from the notebook's tables: the x axis and how long the runs
    trained (``trained``: their rows of ``runs.csv``), each method against the reference (:func:`learning_sentence`),
    generation (:func:`generation_sentences`), the last iterate's accuracy and margin gaps (:func:`final_gap`), the
    share of long training negatives (:func:`length_bias`), the paired test differences, and the accuracy gap on own
    against common negatives."""
    from .core import learning_sentence, paired_sentence

    lines = [f"The x axis is the {axis}; step 0 is the untrained policy (the reference)."]
    if len(trained):
        its = trained.groupby(["dataset", "label"])["steps"].mean()
        what = "Iterations to the gradient tolerance" if axis == "L-BFGS iteration" else "Optimizer steps"
        lines.append(f"{what} (mean over seeds): " + ", ".join(f"{d} {lb} {v:.0f}" for (d, lb), v in its.items()))
    lines += [learning_sentence(learned, label, "mrr") for label in ("S-DPO", "MASS-DPO")]
    lines += generation_sentences(generation)
    for _, r in gap[gap["metric"].isin(["accuracy", "margin"])].iterrows():
        lines.append(f"last iterate, {r['negatives']} negatives, {r['dataset']}, {r['metric']}: MASS-DPO "
                     f"{r['MASS-DPO']:.3f}, S-DPO {r['S-DPO']:.3f} (difference {r['diff']:+.3f})")
    for r in length_bias_summary(lengths).sort_values(["dataset", "label"]).itertuples():
        lines.append(f"{r.dataset}: {100 * r.share:.0f}% of {r.label}'s training negatives are among the 3 longest of "
                     f"their pool (uniform draw: {100 * r.chance:.0f}%)")
    lines += [f"test: {paired_sentence(row)}" for _, row in pairs.iterrows()]
    acc = gap[gap["metric"] == "accuracy"].set_index(["dataset", "negatives"])["diff"]
    for ds in dict.fromkeys(gap["dataset"]):
        if (ds, "own") in acc and (ds, "common") in acc:
            lines.append(f"{ds}: MASS-DPO minus S-DPO in accuracy is {acc[(ds, 'own')]:+.3f} on each run's own "
                         f"negatives and {acc[(ds, 'common')]:+.3f} on the common whole pools; only the second "
                         "compares the methods on the same candidates.")
    return lines


def comparison_sentences(summary: pd.DataFrame, pairs: pd.DataFrame, metric: str) -> list[str]:
    """The closing lines of Tables 1, 2, 5 and 6: each dataset's ``metric`` per method beside the paper's, every
    MASS-DPO minus S-DPO paired difference (:func:`paired_difference`), and how many of them exclude 0."""
    from .core import paired_sentence

    head = summary[summary["metric"] == metric]
    lines = []
    for ds in dict.fromkeys(head["dataset"]):
        part = head[head["dataset"] == ds]
        lines.append(f"{metric} (%) on {ds}: " + ", ".join(
            f"{r.method} {r.value:.1f}" + (f" [paper {r.paper:.1f}]" if r.paper == r.paper else "")
            for r in part.itertuples()))
    lines += [paired_sentence(row) for _, row in pairs.iterrows()]
    if len(pairs):
        wins = pairs[pairs["significant"] & (pairs["diff"] > 0)]
        losses = pairs[pairs["significant"] & (pairs["diff"] < 0)]
        lines.append(f"MASS-DPO is significantly above S-DPO in {len(wins)} and below it in {len(losses)} of "
                     f"{len(pairs)} (dataset, metric) comparisons; the rest are inside the noise.")
    return lines


def generation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The LM regimes' test accuracy, generation HitRatio@1 (greedy, as S-DPO evaluates), with its valid ratio (the
    share of replies that name exactly one candidate of the pool), per (dataset, label), the untrained ``reference``
    included: means over seeds of each run's value and of its standard error over test prompts (%; a per-run error,
    not the error of the mean over seeds). Empty where the runs' accuracy is not
    generated (the log-linear regime ranks, its accuracy is Recall@1)."""
    cols = ["dataset", "label", "seeds", "hit_ratio@1", "hit_ratio@1_se", "valid_ratio", "valid_ratio_se"]
    if runs.empty or "accuracy_kind" not in runs or "valid_ratio" not in runs:
        return pd.DataFrame(columns=cols)
    gen = runs[runs["accuracy_kind"] == "hit_ratio@1"]
    if gen.empty:
        return pd.DataFrame(columns=cols)
    aggs = {"hit_ratio@1": ("accuracy", "mean"), "hit_ratio@1_se": ("accuracy_se", "mean"),
            "valid_ratio": ("valid_ratio", "mean"), "valid_ratio_se": ("valid_ratio_se", "mean")}
    out = gen.groupby(["dataset", "label"], sort=False).agg(seeds=("seed", "nunique"), **aggs)
    out = out.reset_index()
    out[cols[3:]] = 100 * out[cols[3:]]
    return out[cols]


def generation_sentences(table: pd.DataFrame) -> list[str]:
    """One line per dataset of :func:`generation_table`: HitRatio@1 and valid ratio of each label, the reference
    first; nothing when the runs' accuracy is not generated."""
    lines = []
    for ds, part in table.groupby("dataset", sort=False):
        part = pd.concat([part[part["label"] == "reference"], part[part["label"] != "reference"]])
        lines.append(f"generation on {ds} (greedy HitRatio@1 %, valid ratio %): " + ", ".join(
            f"{r['label']} {r['hit_ratio@1']:.1f} ± {r['hit_ratio@1_se']:.1f} (valid {r['valid_ratio']:.0f})"
            for _, r in part.iterrows()) + ".")
    return lines
