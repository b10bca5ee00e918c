"""Table 3: MASS-DPO's beta and n ablations, each against S-DPO at the same setting; the preprocessing score's readings
panel; Algorithm 1's design diagnostics (``notebooks/table3.ipynb``).

    table3_specs(...)  ->  run_grid (+ reference_rows)  ->  with_arms  ->
        ablation_table (beside the paper), arm_learning (each setting against the untrained reference),
        sdpo_pairs (MASS-DPO minus S-DPO per test prompt, same n and beta, same seeds), readings_panel
    design_table(setup, datasets, ...)  ->  design_sentence (does the design degenerate to "top-n by G_ii"?)

An *arm* is one trained setting: ``"MASS-DPO[reference] n=3 beta=0.1"``, ``"S-DPO n=3 beta=0.1"`` or
``"reference"``; paired differences are taken between arms on the same test prompts and seeds.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd

from ..extraction import DEFAULT_SELECTION_SCORE, SELECTION_SCORES
from .core import (config_of, disk_memo, beside_paper, grid, learning_table, load_split, paired_difference, span,
                   summarize)

MASS, SDPO = "MASS-DPO", "S-DPO"
#: Label-blind negatives S-DPO is also trained on (Table 3's "why" panel): the top-n by log pi_ref, by token length.
LABEL_BLIND = ("hardest", "longest")


# ---------------------------------------------------------------- what to run


def ablation_specs(datasets, seeds, *, betas=(0.1, 0.5, 1.0), ns=(1, 3, 5), n: int = 3, beta: float = 0.1
                   ) -> list[dict]:
    """MASS-DPO runs of Table 3: ``beta`` in ``betas`` at ``n``, and ``n`` in ``ns`` at ``beta``."""
    specs = grid(datasets, ["mass_dpo"], seeds, n=n, beta=list(betas))
    specs += [s for s in grid(datasets, ["mass_dpo"], seeds, n=list(ns), beta=beta) if s not in specs]
    return specs


def readings_specs(datasets, seeds, *, readings=SELECTION_SCORES, betas=(0.1, 0.5, 1.0), n: int = 3,
                   default: str = DEFAULT_SELECTION_SCORE) -> list[dict]:
    """MASS-DPO runs of the readings panel: each reading of the preprocessing score (``selection_score``) x ``betas``
    at ``n``. The ``default`` reading is left out: its runs are :func:`ablation_specs`' beta axis (same hash)."""
    return [dict(s, selection_score=r) for r in readings if r != default
            for s in grid(datasets, ["mass_dpo"], seeds, n=n, beta=list(betas))]


def label_blind_specs(datasets, seeds, *, n: int = 3, beta: float = 0.1, negatives=LABEL_BLIND) -> list[dict]:
    """S-DPO trained on label-blind picks at ``(n, beta)``: the top-n by ``log pi_ref`` (``hardest``) and the top-n by
    token length (``longest``): what MASS-DPO's picks resemble (:func:`design_table`), trained without the design."""
    return [dict(s, negatives=neg) for neg in negatives for s in grid(datasets, ["sdpo"], seeds, n=n, beta=beta)]


def table3_specs(datasets, seeds, *, betas=(0.1, 0.5, 1.0), ns=(1, 3, 5), n: int = 3, beta: float = 0.1,
                 readings=SELECTION_SCORES, label_blind=LABEL_BLIND) -> list[dict]:
    """Every run of the Table 3 notebook: :func:`ablation_specs`, S-DPO at each of those (n, beta) (random negatives:
    no reading), :func:`readings_specs` and :func:`label_blind_specs` at ``(n, beta)``. The untrained reference comes
    from :func:`core.reference_rows`."""
    mass = ablation_specs(datasets, seeds, betas=betas, ns=ns, n=n, beta=beta)
    sdpo = [dict(s, method="sdpo") for s in mass]
    return (mass + sdpo + readings_specs(datasets, seeds, readings=readings, betas=betas, n=n)
            + label_blind_specs(datasets, seeds, n=n, beta=beta, negatives=label_blind))


# ---------------------------------------------------------------- arms


def arm_label(label: str, n, beta, selection_score=None) -> str:
    """``"MASS-DPO[reference] n=3 beta=0.1"``; S-DPO (random negatives) carries no reading; ``"reference"`` as is."""
    if label == "reference":
        return label
    reading = f"[{selection_score}]" if label == MASS and isinstance(selection_score, str) else ""
    return f"{label}{reading} n={int(n)} beta={float(beta):g}"


def ablation_reading(runs: pd.DataFrame, *, n: int, beta: float, ns, betas) -> str | None:
    """The reading of the preprocessing score (``selection_score``) that Table 3's two axes were trained under, read
    from the runs' own resolved configurations (their ``selection_score`` column), never from a default in code.

    It is the reading of the MASS-DPO runs found at every setting of both axes (beta over ``betas`` at ``n``, n over
    ``ns`` at ``beta``): the readings panel adds other readings on the beta axis only. Where the panel covers every
    setting too (``ns`` holds only ``n``) and several readings qualify, it is the reading of the runs that set none
    of their own (S-DPO's and the reference's, resolved over the same setup as the axes' MASS-DPO runs). ``None``
    when no run carries a reading; ``ValueError`` when the runs leave it ambiguous."""
    if runs.empty or "selection_score" not in runs:
        return None
    label = runs["label"] if "label" in runs else pd.Series(MASS, index=runs.index)
    mass = runs[label == MASS]
    points = {(int(n), round(float(b), 12)) for b in betas} | {(int(m), round(float(beta), 12)) for m in ns}
    covering = [r for r, g in mass.groupby("selection_score", sort=False)
                if points <= {(int(a), round(float(b), 12)) for a, b in zip(g["n"], g["beta"])}]
    if len(covering) == 1:
        return covering[0]
    own = list(dict.fromkeys(runs.loc[label != MASS, "selection_score"].dropna()))
    if len(own) == 1 and (not covering or own[0] in covering):
        return own[0]
    if not covering and not own:
        return None
    raise ValueError(f"the runs do not say which reading Table 3's axes were trained under: MASS-DPO runs under "
                     f"{covering or 'no reading'} cover both axes, the other runs carry {own or 'no reading'}")


def with_arms(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` plus an ``arm`` column (:func:`arm_label`) naming each run's setting."""
    if runs.empty:
        return runs.assign(arm=pd.Series(dtype=str))
    reading = runs["selection_score"] if "selection_score" in runs else pd.Series([None] * len(runs), index=runs.index)
    arms = [arm_label(lb, n, b, r) for lb, n, b, r in zip(runs["label"], runs["n"], runs["beta"], reading)]
    return runs.assign(arm=arms)


def arms_sentence(runs: pd.DataFrame) -> str:
    """What the notebook trained, from the runs: how many runs on which datasets, and every arm (:func:`arm_label`)
    with its number of seeds."""
    if runs.empty:
        return "No runs: no dataset ran."
    armed = runs if "arm" in runs else with_arms(runs)
    seeds = armed.groupby("arm", sort=False)["seed"].nunique()
    arms = ", ".join(f"{arm} ({k} seed{'s' if k != 1 else ''})" for arm, k in seeds.items())
    return f"{len(armed)} runs on {', '.join(dict.fromkeys(armed['dataset']))}; arms: {arms}."


def arm_learning(runs: pd.DataFrame, metrics=("recall@1", "mrr"), *, threshold: float = 3.0) -> pd.DataFrame:
    """Each arm against the untrained reference (:func:`core.learning_table`, per test prompt, paired): ``method``
    is the arm; ``learned`` where the gain is at least ``threshold`` standard errors."""
    armed = with_arms(runs)
    if armed.empty or "reference" not in set(armed["arm"]):
        return pd.DataFrame()
    return learning_table(armed.assign(label=armed["arm"]), list(metrics), threshold=threshold)


def learning_summary(learned: pd.DataFrame, metric: str = "mrr") -> pd.DataFrame:
    """Per arm: on how many datasets it learned (:func:`arm_learning`) and the smallest and largest gain in SE."""
    part = learned[learned["metric"] == metric] if len(learned) else learned
    if part.empty:
        return pd.DataFrame(columns=["arm", "metric", "learned", "datasets", "z_min", "z_max"])
    out = part.groupby("method", sort=False).agg(learned=("learned", "sum"), datasets=("dataset", "nunique"),
                                                 z_min=("z_score", "min"), z_max=("z_score", "max"))
    return out.reset_index().rename(columns={"method": "arm"}).assign(metric=metric)


def sdpo_pairs(runs: pd.DataFrame, metrics=("accuracy", "mrr"), *, z: float = 1.96) -> pd.DataFrame:
    """MASS-DPO minus S-DPO at the same (n, beta), per test prompt on the same prompts and seeds
    (:func:`core.paired_difference`), for every MASS-DPO arm of ``runs`` (each reading).

    Columns: :func:`core.paired_difference`'s plus ``n``, ``beta``, ``selection_score``."""
    armed = with_arms(runs)
    if armed.empty:
        return pd.DataFrame()
    mass = armed[armed["label"] == MASS]
    frames = []
    for (n, beta, reading), _ in mass.groupby(["n", "beta", "selection_score"], sort=False):
        a, b = arm_label(MASS, n, beta, reading), arm_label(SDPO, n, beta)
        pair = paired_difference(armed, a, b, list(metrics), key="arm", z=z)
        if len(pair):
            frames.append(pair.assign(n=int(n), beta=float(beta), selection_score=reading))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def ablation_pairs(pairs: pd.DataFrame, *, betas, ns, n: int, beta: float,
                   selection_score: str = DEFAULT_SELECTION_SCORE) -> pd.DataFrame:
    """The rows of :func:`sdpo_pairs` that belong to Table 3's two axes (``ablation`` = beta at ``n``, n at
    ``beta``) under the notebook's reading; the (n, beta) of both axes appears under each."""
    if pairs.empty:
        return pairs
    own = pairs[pairs["selection_score"] == selection_score]
    b = own[(own["n"] == n) & own["beta"].isin([float(x) for x in betas])].assign(ablation="beta")
    m = own[np.isclose(own["beta"], beta) & own["n"].isin([int(x) for x in ns])].assign(ablation="n")
    return pd.concat([b, m], ignore_index=True)


def readings_panel(pairs: pd.DataFrame, *, n: int, betas, metric: str = "accuracy", percent: bool = True
                   ) -> pd.DataFrame:
    """The readings panel: MASS-DPO minus S-DPO on ``metric`` per (model, dataset, reading, beta) at ``n``, one cell
    ``"+1.2 [-0.5, +2.9]"`` (points, 95% interval) per beta column."""
    if pairs.empty:
        return pd.DataFrame()
    part = pairs[(pairs["n"] == n) & pairs["beta"].isin([float(x) for x in betas]) & (pairs["metric"] == metric)]
    scale = 100.0 if percent else 1.0
    part = part.assign(cell=[f"{scale * d:+.1f} [{scale * lo:+.1f}, {scale * hi:+.1f}]" + ("*" if s else "")
                             for d, lo, hi, s in zip(part["diff"], part["lo"], part["hi"], part["significant"])],
                       column=[f"beta={b:g}" for b in part["beta"]])
    out = part.pivot_table(index=["model", "dataset", "selection_score"], columns="column", values="cell",
                           aggfunc="first", sort=False)
    return out.reset_index().rename_axis(columns=None)


def pairs_sentence(pairs: pd.DataFrame, metric: str = "accuracy") -> str:
    """How many MASS-DPO minus S-DPO comparisons on ``metric`` are significantly above, below, or in the noise."""
    part = pairs[pairs["metric"] == metric] if len(pairs) else pairs
    if part.empty:
        return f"No MASS-DPO / S-DPO pairs on {metric}."
    up = int((part["significant"] & (part["diff"] > 0)).sum())
    down = int((part["significant"] & (part["diff"] < 0)).sum())
    return (f"MASS-DPO minus S-DPO at the same (n, beta) on {metric}: significantly above in {up}, below in {down}, "
            f"inside the noise in {len(part) - up - down} of {len(part)} (dataset, setting) comparisons; differences "
            f"range from {100 * part['diff'].min():+.1f} to {100 * part['diff'].max():+.1f} points.")


# ---------------------------------------------------------------- Table 3 beside the paper


def ablation_runs(runs: pd.DataFrame, selection_score: str = DEFAULT_SELECTION_SCORE,
                  methods=(MASS, SDPO)) -> pd.DataFrame:
    """The runs of ``methods`` (labels) in ``runs``, MASS-DPO's only under ``selection_score`` (the other readings are
    the panel's); runs without a ``label`` are MASS-DPO's."""
    runs = runs if "label" in runs else runs.assign(label=MASS)
    keep = runs["label"].isin(list(methods))
    if "selection_score" in runs:
        keep &= (runs["label"] != MASS) | (runs["selection_score"] == selection_score)
    return runs[keep]


def ablation_table(runs: pd.DataFrame, *, model: str, betas=(0.1, 0.5, 1.0), ns=(1, 3, 5), n: int = 3,
                   beta: float = 0.1, selection_score: str = DEFAULT_SELECTION_SCORE, methods=(MASS,)
                   ) -> pd.DataFrame:
    """Table 3: accuracy along the beta axis (at ``n``) and the n axis (at ``beta``), per ``method`` of ``methods``
    (labels: MASS-DPO under ``selection_score``, S-DPO at the same settings, and ``"reference"``, the untrained
    policy, as one row with ``ablation = "reference"``). The paper's numbers (MASS-DPO only) sit beside the MASS-DPO
    rows. Runs without a ``label`` are MASS-DPO's."""
    runs = ablation_runs(runs, selection_score, methods).drop(columns=["method"], errors="ignore")
    runs = runs.rename(columns={"label": "method"})
    trained = runs[runs["method"] != "reference"]
    parts = []
    b = trained[(trained["n"] == n) & trained["beta"].isin(betas)].assign(ablation="beta", setting=lambda d: d["beta"])
    m = trained[(trained["beta"] == beta) & trained["n"].isin(ns)].assign(ablation="n", setting=lambda d: d["n"])
    for part in (b, m):
        if not part.empty:
            part = part.assign(setting=part["setting"].map(lambda v: f"{float(v):g}"))
            parts.append(summarize(part, ["model", "method", "ablation", "setting", "dataset"], ["accuracy"]))
    ref = runs[runs["method"] == "reference"]
    if not ref.empty:
        parts.insert(0, summarize(ref.assign(ablation="reference", setting="theta=0"),
                                  ["model", "method", "ablation", "setting", "dataset"], ["accuracy"]))
    if not parts:
        return pd.DataFrame()
    out = beside_paper(pd.concat(parts, ignore_index=True), "table3", ["ablation", "setting", "dataset", "metric"],
                       model=model)
    papers = [c for c in out.columns if c.startswith("paper")] + ["diff"]
    out.loc[out["method"] != MASS, papers] = math.nan  # the paper's Table 3 is MASS-DPO's
    return out


def ablation_curves(runs: pd.DataFrame, table3: pd.DataFrame, *, n: int, beta: float,
                    selection_score: str | None) -> pd.DataFrame:
    """The data of Table 3's figure, exactly the plotted numbers: accuracy (%) of MASS-DPO (under
    ``selection_score``) and S-DPO along the beta axis (runs at ``n``) and the n axis (runs at ``beta``), mean over
    seeds with a 95% t-interval (:func:`mass_dpo.plotting.mean_ci`; ``source = "ours"``), and the paper's MASS-DPO
    line from :func:`ablation_table`'s ``paper`` column (``source = "paper"``, no interval).

    Columns ``ablation, source, label, dataset, setting, mean, lo, hi, count``; ``setting`` is the axis value (beta
    or n) as a number, rows sorted by it within each line."""
    from ..plotting import mean_ci

    columns = ["ablation", "source", "label", "dataset", "setting", "mean", "lo", "hi", "count"]
    frames = []
    if len(runs):
        acc = ablation_runs(runs, selection_score)
        acc = acc.assign(acc=100 * acc["accuracy"].astype(float))
        for axis, part in (("beta", acc[acc["n"] == int(n)]), ("n", acc[np.isclose(acc["beta"].astype(float), beta)])):
            if len(part):
                summary = mean_ci(part, ["label", "dataset", axis], "acc")
                frames.append(summary.rename(columns={axis: "setting"}).assign(ablation=axis, source="ours"))
    if len(table3) and "paper" in table3:
        paper = table3[(table3["method"] == MASS) & table3["ablation"].isin(["beta", "n"]) & table3["paper"].notna()]
        if "metric" in paper:
            paper = paper[paper["metric"] == "accuracy"]
        if len(paper):
            frames.append(pd.DataFrame({"ablation": paper["ablation"], "source": "paper", "label": MASS,
                                        "dataset": paper["dataset"], "setting": paper["setting"].astype(float),
                                        "mean": paper["paper"].astype(float), "lo": math.nan, "hi": math.nan,
                                        "count": math.nan}))
    if not frames:
        return pd.DataFrame(columns=columns)
    out = pd.concat(frames, ignore_index=True)[columns]
    out["setting"] = out["setting"].astype(float)
    order = {"beta": 0, "n": 1}
    out = out.sort_values(["ablation", "source", "label", "dataset", "setting"],
                          key=lambda c: c.map(order) if c.name == "ablation" else c, kind="stable")
    return out.reset_index(drop=True)


def axis_sentence(table3: pd.DataFrame, dataset: str, *, model: str | None = None) -> str:
    """One line per dataset from :func:`ablation_table` (``methods`` with the reference): the reference's accuracy,
    then each method's accuracy along each axis, MASS-DPO's with the paper's beside it."""
    part = table3[(table3["dataset"] == dataset) & (table3["metric"] == "accuracy")]
    if model is not None:
        part = part[part["model"] == model]
    if part.empty:
        return f"{dataset}: no Table 3 rows."
    bits = []
    for method, grp in part.groupby("method", sort=False):
        if method == "reference":
            bits.append(f"reference {grp['value'].iloc[0]:.1f}")
            continue
        for axis, line in grp.groupby("ablation", sort=False):
            line = line.assign(x=line["setting"].astype(float)).sort_values("x")
            vals = "/".join(f"{v:.1f}" for v in line["value"])
            paper = line["paper"].astype(float)
            ref = f" (paper {'/'.join(f'{p:.1f}' for p in paper)})" if paper.notna().all() else ""
            bits.append(f"{method} {axis} {'/'.join(line['setting'].astype(str))}: {vals}{ref}")
    return f"accuracy (%) on {dataset}: " + "; ".join(bits) + "."


def best_setting(table3: pd.DataFrame) -> pd.DataFrame:
    """Per model, method, ablation and dataset: our best setting and the paper's (from :func:`ablation_table`);
    several settings within rounding of the best read ``"tie 0.1/0.5"``."""
    def best(grp, col):
        vals = grp[col].astype(float)
        if not vals.notna().any():
            return None
        top = grp.loc[np.isclose(vals, vals.max()), "setting"].drop_duplicates()
        return str(top.iloc[0]) if len(top) == 1 else "tie " + "/".join(top.astype(str))

    keys = [k for k in ("model", "method", "ablation", "dataset") if k in table3]
    rows = []
    trained = table3[table3["ablation"] != "reference"] if "ablation" in table3 else table3
    for key, grp in trained.groupby(keys, sort=False):
        rows.append(dict(zip(keys, key), ours_best=best(grp, "value"), paper_best=best(grp, "paper")))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- label-blind baselines: what explains MASS-DPO?


def label_blind_pairs(runs: pd.DataFrame, *, n: int, beta: float, selection_score: str = DEFAULT_SELECTION_SCORE,
                      metrics=("accuracy", "mrr"), negatives=LABEL_BLIND) -> pd.DataFrame:
    """Paired differences per test prompt at ``(n, beta)``: MASS-DPO (under ``selection_score``) minus S-DPO and minus
    S-DPO on each label-blind pick (``S-DPO[hardest]``, ``S-DPO[longest]``), and each of those minus S-DPO (random).
    Columns: :func:`core.paired_difference`'s."""
    armed = with_arms(runs)
    if armed.empty:
        return pd.DataFrame()
    mass = arm_label(MASS, n, beta, selection_score)
    blind = [arm_label(f"{SDPO}[{neg}]", n, beta) for neg in negatives]
    sdpo = arm_label(SDPO, n, beta)
    pairs = [(mass, sdpo)] + [(mass, b) for b in blind] + [(b, sdpo) for b in blind]
    frames = [paired_difference(armed, a, b, list(metrics), key="arm") for a, b in pairs]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ---------------------------------------------------------------- design diagnostics (issue 11)


@disk_memo("design_table")
def design_table(runs: pd.DataFrame, *, echo: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Algorithm 1's design as the MASS-DPO runs of ``runs`` made it: for each such run (seed 0; the D-optimal picks do
    not depend on the seed), :func:`mass_dpo.diagnostics.design_diagnostics` on its own training split (its
    extraction, pooling and sizes: :func:`core.load_split`) at its own n, beta, gamma and reading of the preprocessing
    score (:func:`core.config_of`), plus ``degenerate`` (:func:`mass_dpo.diagnostics.degenerate`: the greedy picks are
    the top-n by ``G_ii`` in >= 95% of prompts). One row per run: ``model, dataset, pooling, run_dir`` and the
    diagnostics' columns. Nothing here resolves a configuration of its own, so the table describes the runs it sits
    beside."""
    from ..diagnostics import degenerate, design_diagnostics

    label = runs["label"] if "label" in runs else pd.Series([MASS] * len(runs), index=runs.index)
    mass = runs[(label == MASS) & (runs["seed"] == runs["seed"].min())] if len(runs) else runs
    rows = []
    for row in mass.itertuples():
        cfg = config_of(row)
        ex = load_split(row, "train")
        diag = design_diagnostics(ex, cfg.n, beta=cfg.beta, gamma=cfg.gamma, selection_score=cfg.selection_score,
                                  seed=cfg.seed)
        rows.append({"model": cfg.model, "dataset": cfg.dataset, "pooling": cfg.pooling, **diag,
                     "degenerate": degenerate(diag), "run_dir": str(row.run_dir)})
    if echo:
        echo(f"design diagnostics of {len(rows)} MASS-DPO run(s), each on its own extraction and settings")
    return pd.DataFrame(rows)


def design_sentence(table: pd.DataFrame, dataset: str, *, beta: float, n: int | None = None,
                    model: str | None = None) -> str:
    """One sentence per dataset from :func:`design_table` at ``beta`` (and ``n``): whether the design of the runs
    degenerates under each reading, the Gram scale, how much the D-optimal picks overlap the longest negatives, and
    their lengths, naming the runs' feature pooling."""
    table = table[table["dataset"] == dataset]
    if n is not None:
        table = table[table["n"] == int(n)]
    if model is not None:
        table = table[table["model"] == model]
    part = table[np.isclose(table["beta"].astype(float), beta)]
    if part.empty:
        return f"{dataset}: no design diagnostics at beta = {beta:g}."
    first = part.iloc[0]
    shares = ", ".join(f"{100 * r.greedy_is_top_diag:.0f}% ({r.selection_score})" for r in part.itertuples())
    deg = list(part.loc[part["degenerate"], "selection_score"])
    verdict = ("the design degenerates to \"top-n by G_ii\" under every reading" if len(deg) == len(part) else
               "the design does not degenerate under any reading" if not deg else
               f"the design degenerates under {', '.join(deg)} only")
    ovr, hard = span(part["overlap_longest"].astype(float), 2), span(part["overlap_hardest"].astype(float), 2)
    ld = span(part["length_dopt"].astype(float), 1)
    others = table[~np.isclose(table["beta"].astype(float), beta)]
    pooling = "/".join(dict.fromkeys(part["pooling"].astype(str))) if "pooling" in part else "?"
    elsewhere = "".join(
        f" At beta = {b:g}: {span(100 * g['greedy_is_top_diag'].astype(float), 0)}% of the prompts, degenerate "
        f"under {int(g['degenerate'].sum())} of {len(g)} readings." for b, g in others.groupby("beta", sort=True))
    return (f"{dataset} (n = {int(first['n'])}, beta = {beta:g}, gamma = {float(first['gamma']):g}, "
            f"{int(first['prompts'])} training prompts, features pooled over {pooling}, as the runs): the greedy's picks equal the top-n by G_ii in {shares} of "
            f"the prompts, so {verdict} (median G_ii {part['g_diag_median'].median():.2g}, largest |G_ij| "
            f"{part['g_offdiag_max'].max():.2g}). The D-optimal picks overlap the {int(first['n'])} longest negatives "
            f"by {ovr} (the {int(first['n'])} hardest by {hard}) and are {ld} tokens long on average, against "
            f"{float(first['length_random']):.1f} for "
            f"random picks and {float(first['length_negatives']):.1f} for all negatives." + elsewhere)


# ---------------------------------------------------------------- what the numbers say


def table3_sentences(*, learning: pd.DataFrame, methods_table: pd.DataFrame, best: pd.DataFrame,
                     axis_pairs: pd.DataFrame, pairs: pd.DataFrame, design: pd.DataFrame, blind: pd.DataFrame,
                     n: int, beta: float) -> list[str]:
    """The closing lines of the Table 3 notebook, each printed from its tables: each arm against the reference
    (:func:`learning_summary`), accuracy along each axis per dataset (:func:`axis_sentence`), the best setting per
    method, axis and dataset (:func:`best_setting`; MASS-DPO's beside the paper's), every MASS-DPO minus S-DPO pair of
    the two axes once (:func:`ablation_pairs`; the point (n, beta) lies on both) and their count
    (:func:`pairs_sentence`), the readings panel per reading at ``n`` (the readings the pairs hold), the design
    diagnostics at (``n``, ``beta``) per dataset (:func:`design_sentence`) and the label-blind pairs
    (:func:`label_blind_pairs`), on accuracy."""
    from .core import paired_sentence

    lines = []
    for r in learning.itertuples():
        metric = {"mrr": "MRR"}.get(r.metric, r.metric)
        lines.append(f"learning: {r.arm} beats the reference by >= 3 SE on {metric} on {r.learned} of "
                     f"{r.datasets} dataset(s) ({r.z_min:.1f} to {r.z_max:.1f} SE)")
    for ds in (dict.fromkeys(methods_table["dataset"]) if len(methods_table) else []):
        lines.append(axis_sentence(methods_table, ds))
    for r in best.itertuples():
        paper = f" (paper: {r.paper_best})" if r.method == MASS else ""
        lines.append(f"{r.method}, {r.ablation} axis, {r.dataset}: best setting {r.ours_best}{paper}")
    acc = axis_pairs[axis_pairs["metric"] == "accuracy"] if len(axis_pairs) else axis_pairs
    if len(acc):
        lines += [paired_sentence(row) for _, row in acc.drop_duplicates(["model", "dataset", "n", "beta"]).iterrows()]
    lines.append(pairs_sentence(axis_pairs, "accuracy"))
    at_n = pairs[pairs["n"] == int(n)] if len(pairs) else pairs
    for reading in (dict.fromkeys(at_n["selection_score"]) if len(at_n) else []):
        lines.append(f"readings panel, {reading}: "
                     + pairs_sentence(at_n[at_n["selection_score"] == reading], "accuracy"))
    for ds in (dict.fromkeys(design["dataset"]) if len(design) else []):
        lines.append(design_sentence(design, ds, beta=beta, n=n))
    for _, row in (blind[blind["metric"] == "accuracy"] if len(blind) else blind).iterrows():
        lines.append("label-blind: " + paired_sentence(row))
    return lines
