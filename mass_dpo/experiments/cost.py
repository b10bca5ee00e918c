"""Tables 7-8: wall-clock cost and the matched-compute comparison (``notebooks/table7.ipynb``, ``table8``).

Under the log-linear regime's exact fit (``fit="exact"``: L-BFGS on the ridge-regularised convex objective) there are
no epochs: "training" is one fit to a gradient tolerance, and a budget is a number of L-BFGS iterations
(``fit_max_iter``), each one a full pass over the training prompts. The Trainer's epochs remain for the LM regimes.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from typing import Callable

import pandas as pd
from .core import (config_of, disk_memo, FULL_POOL, Setup, beside_paper, grid, load_split, paper_reference, reference_rows, run_grid,
                   summarize)


def exact_fit(setup: Setup) -> bool:
    """True when ``setup``'s runs train by the exact log-linear fit (the loglinear regime's default ``fit``)."""
    from ..config import resolve_config

    if setup.regime != "loglinear":
        return False
    return resolve_config({"regime": "loglinear", "profile": setup.profile, **setup.options}).fit == "exact"


def method_key(method: str, n: int) -> str:
    """``mass_dpo_5``, ``sdpo_19``: a method at its number of negatives (Table 7's row names)."""
    return f"{'mass_dpo' if method == 'mass_dpo' else 'sdpo'}_{int(n)}"


#: Table 7's per-method components: ``<kind>_<method_key>`` (:func:`method_key`), kind ``fit``, ``refit`` or
#: ``train_epoch``.
TIMED_KINDS = ("fit", "refit", "train_epoch")
_COMPONENT = re.compile(r"^(?P<kind>fit|refit|train_epoch)_(?P<method>mass_dpo|sdpo)_(?P<n>\d+)$")


def component_parts(component: str) -> dict | None:
    """The inverse of Table 7's component names: ``"fit_sdpo_7"`` -> ``{"kind": "fit", "method": "sdpo", "n": 7}``;
    ``None`` for a component that is not one method's timing (``extraction``, ``ratio_...``)."""
    m = _COMPONENT.match(str(component))
    return None if m is None else {"kind": m["kind"], "method": m["method"], "n": int(m["n"])}


def trained_negatives(run) -> int:
    """The negatives per prompt a finished run trained on at most, from its own resolved configuration
    (:func:`core.config_of`): its ``n`` (1 for DPO), capped at the most negatives any pool of its training prompts
    holds (:func:`mass_dpo.preprocess.effective_n`: QASC's pools hold 7, so S-DPO with ``n = 19`` trains on 7). The
    pools are read from the run's data, limit and subsample seed; no model is loaded."""
    from ..data import load_benchmark
    from ..preprocess import largest_pool

    cfg = config_of(run)
    n = 1 if cfg.method == "dpo" else int(cfg.n)
    records = load_benchmark(cfg.dataset, "train", data_dir=cfg.data_dir, limit=cfg.limit, seed=cfg.subsample_seed)
    most = largest_pool(records) if len(records) else n
    return most if cfg.strategy == "all" else min(n, most)


# ---------------------------------------------------------------- Table 7


def cost_specs(datasets, seeds, *, n: int = 5, full: int = FULL_POOL, beta: float = 0.1) -> list[dict]:
    """Table 7's runs: MASS-DPO-n and S-DPO with the full pool, every dataset and seed."""
    return grid(datasets, ["mass_dpo"], seeds, n=n, beta=beta) + grid(datasets, ["sdpo"], seeds, n=full, beta=beta)


@disk_memo("wallclock", version=2)
def wallclock(setup: Setup, datasets, *, n: int = 5, full: int = FULL_POOL, seeds=None, beta: float = 0.1,
              repeats: int = 0, echo: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Table 7: extraction, selection and training seconds for MASS-DPO-n and S-DPO with the full pool.

    Extraction: the seconds the extraction manifests recorded when the train, valid and test splits were first
    extracted. Selection: Algorithm 1 over the training prompts, timed now. Training: under the exact fit, each run's
    recorded fit seconds (component ``fit_<method>_<n>``, with its L-BFGS ``iterations``; ``n`` the negatives the run
    trained on, :func:`trained_negatives`: S-DPO asked for ``full`` negatives trains on every negative of a smaller
    pool, and is named by what it trained on); with ``repeats > 0`` the two
    methods' fits of each (dataset, seed) are also re-run now, alternately, ``repeats`` times each
    (:func:`mass_dpo.experiments.main_comparison.refit`), and the median kept (``refit_<method>_<n>``): both measured
    in the same process under the same load. Under the Trainer (LM regimes): seconds per epoch
    (``train_epoch_<method>_<n>``). One row per (model, dataset, seed, component)."""
    from ..preprocess import select_extracted

    seeds = list(seeds if seeds is not None else setup.seeds)
    runs = run_grid(setup, cost_specs(datasets, seeds, n=n, full=full, beta=beta), echo=echo)
    rows = []
    timed: set = set()
    for row in runs.itertuples():
        cfg = config_of(row)
        exact = cfg.regime == "loglinear" and cfg.fit == "exact"
        key = method_key(row.method, trained_negatives(row))
        base = {"model": row.model, "dataset": row.dataset, "seed": row.seed}
        if exact:
            its = int(row.steps or 0)
            rows.append({**base, "component": f"fit_{key}", "seconds": float(row.seconds_train), "iterations": its,
                         "seconds_per_iteration": float(row.seconds_train) / max(its, 1)})
        else:
            epochs = float(cfg.num_train_epochs) if not (cfg.max_steps and cfg.max_steps > 0) else 1.0
            rows.append({**base, "component": f"train_epoch_{key}", "seconds": float(row.seconds_train) / epochs,
                         "iterations": row.steps, "seconds_per_iteration": math.nan})
        if row.method == "mass_dpo" and (row.model, row.dataset) not in timed:
            timed.add((row.model, row.dataset))
            splits = [load_split(row, s) for s in ("train", "valid", "test") if s != "valid" or cfg.eval_limit != 0]
            extraction = sum(float(ex.meta.get("seconds", math.nan)) for ex in splits)
            t0 = time.perf_counter()
            select_extracted(splits[0], cfg.n, strategy=cfg.strategy, beta=cfg.beta, gamma=cfg.gamma,
                             selection_score=cfg.selection_score)
            selection = time.perf_counter() - t0
            prompts = sum(len(ex) for ex in splits)
            for comp, sec in (("extraction", extraction), ("selection", selection),
                              ("selection_total", extraction + selection)):
                rows.append({"model": row.model, "dataset": row.dataset, "seed": None, "component": comp,
                             "seconds": sec, "prompts": prompts if comp != "selection" else len(splits[0])})
    if repeats > 0 and exact_fit(setup):
        rows += refit_timing(runs, repeats=repeats)
    return pd.DataFrame(rows)


def refit_timing(runs: pd.DataFrame, *, repeats: int = 3, cache: bool = True) -> list[dict]:
    """The fits of ``runs`` (exact log-linear) re-run now, ``repeats`` rounds in which every run of a (model, dataset,
    seed) is fitted once in turn, so the methods share the machine's load; the median seconds per run
    (component ``refit_<method>_<n>``, ``n`` the negatives the run trained on: :func:`trained_negatives`). The data
    come from the cache: only the fit is timed. ``cache``: the rows of
    each group are kept beside its runs (``<runs root>/timings/<hash of the runs and repeats>.json``), so a warm rerun
    reports the timing measured when they were first timed together instead of fitting again."""
    import hashlib
    import json
    from pathlib import Path

    from ..files import atomic_write_json, compute_once
    from .main_comparison import refit

    rows = []
    if runs.empty:  # no dataset ran
        return rows
    for (model, dataset, seed), grp in runs.groupby(["model", "dataset", "seed"], sort=False):
        names = sorted(Path(r).name for r in grp["run_dir"])
        component = {r.run_dir: f"refit_{method_key(r.method, trained_negatives(r))}" for r in grp.itertuples()}
        # rows kept before the components were named by the negatives trained on carry the configuration's n
        renamed = {f"refit_{method_key(r.method, r.n)}": component[r.run_dir] for r in grp.itertuples()}
        renamed.update({c: c for c in component.values()})
        digest = hashlib.sha256(json.dumps([names, int(repeats)]).encode()).hexdigest()[:16]
        kept = Path(grp["run_dir"].iloc[0]).parent / "timings" / f"{digest}.json"

        def timed():  # called at once, inside this iteration
            times: dict = {r.run_dir: [] for r in grp.itertuples()}
            iters: dict = {}
            for _ in range(int(repeats)):
                for r in grp.itertuples():
                    fit, seconds, _ = refit(r.run_dir)
                    times[r.run_dir].append(seconds)
                    iters[r.run_dir] = fit.iterations
            out = []
            for r in grp.itertuples():
                med = statistics.median(times[r.run_dir])
                out.append({"model": model, "dataset": dataset, "seed": int(seed),
                            "component": component[r.run_dir], "seconds": med,
                            "iterations": iters[r.run_dir], "seconds_per_iteration": med / max(iters[r.run_dir], 1)})
            if cache:
                atomic_write_json(kept, out, indent=None)
            return out

        # one timing at a time per group (a rival process would both repeat it and slow it down)
        got = compute_once(kept, f"the fit timings of {dataset} seed {seed}",
                           lambda: json.loads(kept.read_text()) if kept.is_file() else None, timed, enabled=cache)
        rows += [dict(row, component=renamed.get(row["component"], row["component"])) for row in got]
    return rows


#: The columns of :func:`wallclock_table` (also when no dataset ran).
TABLE7_COLUMNS = ["model", "dataset", "component", "seconds", "se", "iterations", "seconds_per_iteration",
                  "paper_minutes"]


def paper_epochs() -> dict[str, float]:
    """The paper's Table 7 minutes per training epoch by method (``{"mass_dpo": 331.2, "sdpo": 612.6}``) and their
    ratio (``"ratio"``: S-DPO over MASS-DPO, 1.85), read from ``params/paper_reference/table7.csv``."""
    ref = paper_reference("table7")
    out = {}
    for comp, minutes in zip(ref["component"], ref["minutes"]):
        parts = component_parts(comp)
        if parts is not None and parts["kind"] == "train_epoch":
            out[parts["method"]] = float(minutes)
    out["ratio"] = out["sdpo"] / out["mass_dpo"] if {"sdpo", "mass_dpo"} <= set(out) else math.nan
    return out


def _timed(grp: pd.DataFrame, kind: str, method: str) -> list[str]:
    """The components of ``grp`` that time ``method`` under ``kind`` (:func:`component_parts`), in table order."""
    out = []
    for comp in dict.fromkeys(grp["component"]):
        parts = component_parts(comp)
        if parts is not None and parts["kind"] == kind and parts["method"] == method:
            out.append(comp)
    return out


def wallclock_table(clock: pd.DataFrame) -> pd.DataFrame:
    """Table 7 beside the paper (minutes on 4x H100, Llama3 MovieLens): per (model, dataset) and component our mean
    seconds (SE over seeds), iterations and seconds per iteration, then the ratios S-DPO / MASS-DPO of the fit (or
    epoch) seconds and of the seconds per iteration, per seed and averaged (``ratio_*`` rows; the paper's per-epoch
    ratio, :func:`paper_epochs`, beside them). The methods and their negatives are read from the records' components
    (:func:`component_parts`: named by :func:`wallclock` after what each run trained on), never from the arguments
    the runs were asked for. The paper's minutes are per epoch of GPU training: not comparable with a CPU fit's
    seconds, only printed for the record. Columns :data:`TABLE7_COLUMNS`, also when ``clock`` is empty."""
    if clock.empty:
        return pd.DataFrame(columns=TABLE7_COLUMNS)
    rows = []
    ref = paper_reference("table7").set_index("component")["minutes"]
    paper = paper_epochs()
    for (model, dataset), grp in clock.groupby(["model", "dataset"], sort=False):
        for comp, g in grp.groupby("component", sort=False):
            vals = g["seconds"].to_numpy(dtype=float)
            se = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else math.nan
            its = g["iterations"].astype(float).mean() if "iterations" in g else math.nan
            per = g["seconds_per_iteration"].astype(float).mean() if "seconds_per_iteration" in g else math.nan
            parts = component_parts(comp)
            minutes = paper.get(parts["method"], math.nan) if parts else ref.get(comp, math.nan)
            rows.append({"model": model, "dataset": dataset, "component": comp, "seconds": float(vals.mean()), "se": se,
                         "iterations": its, "seconds_per_iteration": per, "paper_minutes": minutes})
        for kind in TIMED_KINDS:
            for a_comp in _timed(grp, kind, "sdpo"):
                for b_comp in _timed(grp, kind, "mass_dpo"):
                    ga, gb = grp[grp["component"] == a_comp], grp[grp["component"] == b_comp]
                    pair = ga.merge(gb, on="seed", suffixes=("_a", "_b"))
                    a_key, b_key = a_comp[len(kind) + 1:], b_comp[len(kind) + 1:]
                    for what, col in (("", "seconds"), ("_per_iteration", "seconds_per_iteration")):
                        if f"{col}_a" not in pair or pair[f"{col}_a"].isna().all():
                            continue
                        ratio = (pair[f"{col}_a"].astype(float) / pair[f"{col}_b"].astype(float)).to_numpy()
                        se = float(ratio.std(ddof=1) / math.sqrt(len(ratio))) if len(ratio) > 1 else math.nan
                        rows.append({"model": model, "dataset": dataset,
                                     "component": f"ratio_{kind}{what}_{a_key}_over_{b_key}",
                                     "seconds": float(ratio.mean()), "se": se, "iterations": math.nan,
                                     "seconds_per_iteration": math.nan, "paper_minutes": paper["ratio"]})
    return pd.DataFrame(rows, columns=TABLE7_COLUMNS)


def wallclock_parts(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`wallclock_table` that the "where the time goes" figure draws: every component's seconds,
    less the ratios and ``selection_total`` (the sum of two components drawn beside it)."""
    if table.empty:
        return table
    keep = ~table["component"].str.startswith("ratio") & (table["component"] != "selection_total")
    return table[keep]


def wallclock_sentences(table: pd.DataFrame, *, exact: bool | None = None) -> list[str]:
    """What Table 7 says, one sentence per dataset, from :func:`wallclock_table`: the one-time cost (extraction
    against Algorithm 1, beside the paper's minutes), then per kind of timing S-DPO's and MASS-DPO's seconds named by
    the negatives each trained on, and their ratio beside the paper's. ``exact`` (:func:`exact_fit` of the setup):
    a closing line saying what the training rows measure (an exact fit, or a Trainer epoch as in the paper)."""
    out = []
    for (model, dataset), grp in table.groupby(["model", "dataset"], sort=False):
        get = grp.set_index("component")
        parts = []
        if {"extraction", "selection"} <= set(get.index):
            ext, sel = float(get.loc["extraction", "seconds"]), float(get.loc["selection", "seconds"])
            p_sel = float(get.loc["selection", "paper_minutes"])
            p_tot = float(get.loc["selection_total", "paper_minutes"]) if "selection_total" in get.index else math.nan
            paper = f"; paper {p_sel:g} of {p_tot:g} min" if math.isfinite(p_sel) and math.isfinite(p_tot) else ""
            parts.append(f"extraction {ext:.1f} s and Algorithm 1 {sel:.3f} s (selection is "
                         f"{100 * sel / (ext + sel):.2f}% of the one-time cost{paper})")
        for kind, what in (("fit", "recorded fit"), ("refit", "fit re-timed now"), ("train_epoch", "epoch")):
            for fa in _timed(grp, kind, "sdpo"):
                for fb in _timed(grp, kind, "mass_dpo"):
                    a_key, b_key = fa[len(kind) + 1:], fb[len(kind) + 1:]
                    name = f"ratio_{kind}_{a_key}_over_{b_key}"
                    if name not in get.index:
                        continue
                    its = per = ""
                    if kind != "train_epoch":
                        its = (f" after {get.loc[fa, 'iterations']:.0f} and {get.loc[fb, 'iterations']:.0f} L-BFGS "
                               f"iterations")
                        rp = f"ratio_{kind}_per_iteration_{a_key}_over_{b_key}"
                        per = f", per iteration {get.loc[rp, 'seconds']:.2f}" if rp in get.index else ""
                    na, nb = component_parts(fa)["n"], component_parts(fb)["n"]
                    parts.append(f"{what}: S-DPO-{na} {get.loc[fa, 'seconds']:.2f} s, MASS-DPO-{nb} "
                                 f"{get.loc[fb, 'seconds']:.2f} s{its}, ratio {get.loc[name, 'seconds']:.2f}{per} (the "
                                 f"paper's per-epoch GPU ratio {get.loc[name, 'paper_minutes']:.2f} is not comparable)")
        out.append(f"{dataset} ({model}): " + "; ".join(parts) + ".")
    if exact is not None:
        ratio = paper_epochs()["ratio"]
        out.append(f"Training here is one exact L-BFGS fit per run (no epochs); the paper's per-epoch GPU minutes and "
                   f"their ratio {ratio:.2f} are not comparable and are printed only for the record." if exact else
                   "Training rows are seconds per Trainer epoch, the paper's unit.")
    return out


def wallclock_negatives(table: pd.DataFrame) -> str:
    """One line naming the negatives per prompt each method trained on, per dataset (from the components of
    :func:`wallclock_table`, i.e. the runs' own configurations), e.g. ``"qasc: MASS-DPO 5, S-DPO 7"``."""
    bits = []
    for dataset, grp in (table.groupby("dataset", sort=False) if len(table) else []):
        seen = {}
        for comp in dict.fromkeys(grp["component"]):
            parts = component_parts(comp)
            if parts is not None:
                seen.setdefault(parts["method"], set()).add(parts["n"])
        names = {"mass_dpo": "MASS-DPO", "sdpo": "S-DPO"}
        bits.append(f"{dataset}: " + ", ".join(f"{names[m]} {'/'.join(str(v) for v in sorted(ns))}"
                                               for m, ns in seen.items()))
    if not bits:
        return "No wall-clock rows: no dataset ran."
    return "Negatives per prompt each method trained on (its resolved n, capped at the pools): " + "; ".join(bits) + "."


# ---------------------------------------------------------------- Table 8


TABLE8_METRICS = ("accuracy", "recall@1", "recall@3", "recall@5", "ndcg@1", "ndcg@3", "ndcg@5", "mrr", "margin")


def matched_plan(datasets, seeds, *, n: int = 5, full: int = FULL_POOL, epochs=(2, 1), beta: float = 0.1,
                 exact: bool = False, iterations_per_epoch: int = 5) -> dict[str, list[dict]]:
    """Table 8's runs by setting: ``{setting: specs}``.

    Trainer (``exact=False``): MASS-DPO-n for ``epochs[0]`` epochs and S-DPO with the full pool for ``epochs[1]``
    (the paper's; setting ``"epochs 2/1"``). Exact fit (no epochs): (1) both fitted to convergence (setting
    ``"converged"``), and (2) an iteration budget in the paper's 2 : 1 proportion: one L-BFGS iteration reads every
    training prompt once (plus its line search), the closest thing to an epoch, and each paper epoch stands for
    ``iterations_per_epoch`` iterations (``fit_max_iter = epochs[i] * iterations_per_epoch``; setting
    ``"iterations 10/5"`` at the default)."""
    if not exact:
        return {f"epochs {epochs[0]:g}/{epochs[1]:g}":
                grid(datasets, ["mass_dpo"], seeds, n=n, beta=beta, num_train_epochs=float(epochs[0]))
                + grid(datasets, ["sdpo"], seeds, n=full, beta=beta, num_train_epochs=float(epochs[1]))}
    budget = [int(round(e * iterations_per_epoch)) for e in epochs]
    return {"converged": cost_specs(datasets, seeds, n=n, full=full, beta=beta),
            f"iterations {budget[0]}/{budget[1]}":
                grid(datasets, ["mass_dpo"], seeds, n=n, beta=beta, fit_max_iter=budget[0])
                + grid(datasets, ["sdpo"], seeds, n=full, beta=beta, fit_max_iter=budget[1])}


def matched_specs(datasets, seeds, *, n: int = 5, full: int = FULL_POOL, epochs=(2, 1), beta: float = 0.1,
                  exact: bool = False, iterations_per_epoch: int = 5) -> list[dict]:
    """Every run of :func:`matched_plan`, settings concatenated (the specs :func:`run_grid` takes)."""
    plan = matched_plan(datasets, seeds, n=n, full=full, epochs=epochs, beta=beta, exact=exact,
                        iterations_per_epoch=iterations_per_epoch)
    return [spec for specs in plan.values() for spec in specs]


def matched_runs(setup: Setup, datasets, seeds, *, n: int = 5, full: int = FULL_POOL, epochs=(2, 1),
                 beta: float = 0.1, iterations_per_epoch: int = 5, echo: Callable[[str], None] | None = print
                 ) -> pd.DataFrame:
    """Every run of Table 8 (:func:`matched_plan`, exact or not as ``setup`` trains) with its ``setting`` column,
    ``budget`` (the iteration budget, NaN when none) and ``hit_budget`` (the fit stopped at the budget, not at the
    gradient tolerance), and the untrained ``reference`` rows repeated under each setting so that paired
    differences group by it."""
    plan = matched_plan(datasets, seeds, n=n, full=full, epochs=epochs, beta=beta, exact=exact_fit(setup),
                        iterations_per_epoch=iterations_per_epoch)
    frames = [run_grid(setup, specs, echo=echo).assign(setting=tag) for tag, specs in plan.items()]
    ref = reference_rows(setup, datasets, echo=echo)
    frames += [ref.assign(setting=tag) for tag in plan] if len(ref) else []
    runs = pd.concat(frames, ignore_index=True)
    budget = runs["spec_fit_max_iter"] if "spec_fit_max_iter" in runs else pd.Series(float("nan"), index=runs.index)
    runs["budget"] = budget.astype(float)
    runs["hit_budget"] = runs["steps"].astype(float) >= runs["budget"]  # stopped by the budget, not the tolerance
    return runs


def matched_table(runs: pd.DataFrame, *, model: str) -> pd.DataFrame:
    """Table 8 beside the paper (fractions; the paper's are MovieLens + Llama3): per setting, the reference,
    MASS-DPO-n and S-DPO-all with every metric, the training seconds and the L-BFGS iterations (or steps)."""
    if runs.empty:
        return pd.DataFrame()
    runs = runs.assign(runtime_s=runs["seconds_train"].astype(float), iterations=runs["steps"].astype(float))
    by = ["model", *(["setting"] if "setting" in runs else []), "label", "dataset"]
    summary = summarize(runs, by, [*TABLE8_METRICS, "runtime_s", "iterations"], percent=())
    summary = summary.rename(columns={"label": "method"})
    return beside_paper(summary, "table8", ["method", "dataset", "metric"], model=model)


def matched_sentences(summary: pd.DataFrame, pairs: pd.DataFrame, *, metric: str = "mrr",
                      runs: pd.DataFrame | None = None) -> list[str]:
    """What Table 8 says, from :func:`matched_table`'s summary and the paired differences MASS-DPO minus S-DPO-all
    (:func:`mass_dpo.experiments.core.paired_difference` grouped by setting): per (setting, dataset) the metric of
    the reference and both methods, their iterations and seconds, whether an iteration budget stopped the fits
    (``runs`` from :func:`matched_runs`), then the paired difference with its interval; last, how many of the paired
    differences exclude 0 (:func:`significance_sentence`)."""
    from .core import paired_sentence

    out = []
    if summary.empty:
        return [significance_sentence(pairs)] if len(pairs) else []
    part = summary[summary["metric"].isin([metric, "iterations", "runtime_s"])]
    for (setting, dataset), grp in part.groupby(["setting", "dataset"], sort=False):
        cells = []
        for method, g in grp.groupby("method", sort=False):
            v = g.set_index("metric")["value"]
            extra = "" if method == "reference" else (f" ({v.get('iterations', math.nan):.0f} iterations, "
                                                      f"{v.get('runtime_s', math.nan):.2f} s)")
            cells.append(f"{method} {v.get(metric, math.nan):.3f}{extra}")
        line = f"{setting}, {dataset}, {metric}: " + ", ".join(cells)
        if runs is not None and "hit_budget" in runs:
            mine = runs[(runs["setting"] == setting) & (runs["dataset"] == dataset) & runs["budget"].notna()]
            if len(mine):
                bound = int(mine["hit_budget"].sum())
                line += (f" [the iteration budget stopped {bound} of {len(mine)} fits; the others converged first]"
                         if bound < len(mine) else " [every fit was stopped by its iteration budget]")
        hit = pairs[(pairs["setting"] == setting) & (pairs["dataset"] == dataset) & (pairs["metric"] == metric)] \
            if len(pairs) else pairs
        if len(hit):
            line += ". " + paired_sentence(hit.iloc[0])
        out.append(line)
    if len(pairs):
        out.append(significance_sentence(pairs))
    return out


def significance_sentence(pairs: pd.DataFrame, *, a: str = "MASS-DPO", b: str = "S-DPO-all") -> str:
    """How many of the paired differences ``a`` minus ``b`` (:func:`core.paired_difference`, grouped by setting)
    exclude 0, and for which side."""
    if pairs.empty:
        return f"No {a} / {b} pairs."
    sig = pairs[pairs["significant"].astype(bool)]
    return (f"{len(sig)} of {len(pairs)} (setting, dataset, metric) differences exclude 0 "
            f"({int((sig['diff'] > 0).sum())} for {a}, {int((sig['diff'] < 0).sum())} for {b}).")


def matched_learning_sentences(learned: pd.DataFrame, labels=("MASS-DPO", "S-DPO-all"), metric: str = "mrr"
                               ) -> list[str]:
    """Each method against the untrained reference, per setting of Table 8 (:func:`core.learning_table` grouped by
    setting): ``"<setting>: <learning_sentence>"``, the settings in the order of ``learned``."""
    from .core import learning_sentence

    if learned.empty or "setting" not in learned:
        return [f"{label}: no runs to compare with the reference." for label in labels]
    return [f"{tag}: {learning_sentence(learned[learned['setting'] == tag], label, metric)}"
            for tag in dict.fromkeys(learned["setting"]) for label in labels]
