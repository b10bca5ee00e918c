"""What every paper notebook shares: the setup, the run grid, summaries over seeds, the paper's numbers beside ours.

    Setup (model, regime, profile, data, seeds, sizes)  ->  run_grid(setup, specs)  ->  one row per run
    ->  summarize (mean and standard error over seeds)   ->  beside_paper(..., "table1")  ->  save_table

A run is :func:`mass_dpo.runs.train_run` (cached by the hash of its resolved config, so the notebooks of Tables
1, 2, 5 and 6 and Figures 2-3 share their runs, and a second ``mass-dpo reproduce`` trains nothing). A dataset
whose data is missing (MovieLens ships no sample) is reported once and skipped; nothing else is.
"""

from __future__ import annotations

import contextlib
import json
import io
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch
#: The paper's datasets in its column order.
DATASETS = ("medmcqa", "qasc", "lastfm", "movielens")
#: The five methods of Table 1, in the paper's row order.
METHODS = ("dpo", "dmpo", "dpo_k", "sdpo", "mass_dpo")
METHOD_LABELS = {"dpo": "DPO", "dmpo": "DMPO", "dpo_k": "DPO-k", "sdpo": "S-DPO", "mass_dpo": "MASS-DPO"}
MODEL_LABELS = {"llama3": "Llama3", "qwen3": "Qwen3", "smollm3": "SmolLM3", "smollm2": "SmolLM2", "tiny": "tiny"}
PAPER_MODELS = ("Qwen3", "SmolLM3", "Llama3")
#: Metrics the paper prints in percent (Tables 1-3, 5 and the MRR of Table 6).
PERCENT = ("accuracy", "recall@1", "recall@3", "recall@5", "ndcg@1", "ndcg@3", "ndcg@5", "mrr", "pairwise_accuracy")
RANKING = ("recall@1", "recall@3", "ndcg@1", "ndcg@3")
#: Negatives of "S-DPO with the full pool" (Tables 7-8): every negative of a 20-candidate pool.
FULL_POOL = 19
#: The order of every table's rows: the untrained reference, the paper's methods, S-DPO over the whole pool (by
#: label); the datasets in the paper's order, then their average.
ROW_ORDER = {"method": ("reference", *METHOD_LABELS.values(), "S-DPO-all"), "dataset": (*DATASETS, "avg")}


def paper_order(column: pd.Series) -> pd.Series:
    """A ``sort_values(key=...)`` key: a ``method`` (label) or ``dataset`` column in :data:`ROW_ORDER` (values it
    does not name last), any other column as it is."""
    order = ROW_ORDER.get(column.name)
    return column if order is None else column.map({v: i for i, v in enumerate(order)}).fillna(len(order))


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def model_label(model: str) -> str:
    return MODEL_LABELS.get(model, model)


# ---------------------------------------------------------------- what to run


@dataclass
class Setup:
    """What every run of a notebook shares (the notebook's parameters).

    Attributes:
        model: params/models name (tiny, smollm2, llama3, qwen3, smollm3); models: several (the paper profile).
        regime: loglinear, lora or full. profile: a params/training.yaml profile (smoke, cpu, paper).
        data_dir: ``"samples"`` (shipped samples; MovieLens then comes from ``$MASS_DPO_DATA`` when set), a folder,
            or ``None`` (``$MASS_DPO_DATA``, else the cache). seeds: training seeds.
        train_limit, eval_limit, test_limit: prompts per split (``None``: the profile's); ``train_limit`` may name
            its value per dataset, ``{"default": 300, "qasc": 1000}`` (:meth:`limit_for`).
        options: any other :class:`mass_dpo.training.TrainConfig` field, for every run.
        root: the runs root (default ``$MASS_DPO_RUNS`` / the cache). quiet: hide the Trainer's per-step prints.
        tune: choose the regime's hyperparameters on the validation split by the rule of ``params/training.yaml``
            (``tuning``; :func:`tuned_options`) before each (model, dataset, method)'s runs.
        trained_world_size: the number of processes the runs were trained with, when they were trained beforehand
            under ``accelerate launch -m mass_dpo.experiments`` (the run hash covers the world size); default
            ``$MASS_DPO_TRAINED_WORLD_SIZE``. A finished run of that world size is loaded instead of retrained.
    """

    model: str = "smollm2"
    models: list[str] | None = None
    regime: str = "loglinear"
    profile: str | None = "cpu"
    data_dir: str | None = "samples"
    seeds: list[int] = field(default_factory=lambda: [0])
    train_limit: int | dict[str, int] | None = None
    eval_limit: int | None = None
    test_limit: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    root: str | None = None
    quiet: bool = True
    tune: bool = True
    trained_world_size: int | None = field(
        default_factory=lambda: int(os.environ["MASS_DPO_TRAINED_WORLD_SIZE"])
        if os.environ.get("MASS_DPO_TRAINED_WORLD_SIZE") else None)

    def __post_init__(self):
        if isinstance(self.train_limit, dict):  # a misspelt dataset would silently take the default: refused here
            from ..data.benchmarks import BENCHMARKS
            from ..data.preferences import is_preference_file

            unknown = [k for k in self.train_limit
                       if k != "default" and k not in BENCHMARKS and not is_preference_file(k)]
            if unknown:
                raise ValueError(f"train_limit names {', '.join(map(str, unknown))}: not a dataset; use "
                                 f"{', '.join(BENCHMARKS)}, a preference file or 'default'")

    def limit_for(self, dataset: str) -> int | None:
        """The training prompts of ``dataset``: ``train_limit``, or its entry for ``dataset`` (else ``"default"``)
        when it is a mapping."""
        limit = self.train_limit
        return limit.get(dataset, limit.get("default")) if isinstance(limit, dict) else limit

    def model_list(self) -> list[str]:
        return list(self.models) if self.models else [self.model]

    def describe(self) -> str:
        """One line naming the model(s), regime, data and seeds (each notebook prints it above its numbers)."""
        sizes = f"train/eval/test prompts {self.train_limit}/{self.eval_limit}/{self.test_limit}"
        return (f"model {', '.join(self.model_list())}, regime {self.regime}, profile {self.profile}, data "
                f"{self.data_dir or '$MASS_DPO_DATA'}, {sizes}, seeds {list(self.seeds)}")


def dataset_location(name: str, data_dir: str | None, splits: Iterable[str] = ("train", "valid", "test")
                     ) -> tuple[str | None, str]:
    """``(data_dir to use, "")`` when every split of ``name`` is there, else ``(None, why)``.

    ``data_dir="samples"`` falls back to ``$MASS_DPO_DATA`` for a dataset with no shipped sample (MovieLens)."""
    from ..data.benchmarks import locate
    from ..data.preferences import is_preference_file, resolve_path

    if is_preference_file(name):  # a user's own preference file given as a dataset (held-out splits carved)
        path = resolve_path(name)
        return (data_dir, "") if path.is_file() else (None, f"{name}: no such preference file ({path})")
    tried = [data_dir]
    if data_dir == "samples" and os.environ.get("MASS_DPO_DATA"):
        tried.append(os.environ["MASS_DPO_DATA"])
    why = ""
    for where in tried:
        try:
            for split in splits:
                locate(name, split, where)
            return (str(where) if where is not None else None), ""
        except FileNotFoundError as err:
            why = str(err)
    return None, why


def available(datasets: Iterable[str], data_dir: str | None, echo: Callable[[str], None] | None = print
              ) -> dict[str, str | None]:
    """``{dataset: data_dir}`` for the datasets whose data is present; the others are reported through ``echo``."""
    out = {}
    for name in datasets:
        where, why = dataset_location(name, data_dir)
        if why:
            if echo:
                echo(f"SKIPPED {name}: its data is missing. {why}")
        else:
            out[name] = where
    return out


def grid(datasets, methods=("mass_dpo",), seeds=(0,), **axes) -> list[dict]:
    """Every combination of datasets x methods x seeds x the list-valued ``axes`` (``n=[1, 3, 5]``, ``beta=0.1``)."""
    specs = [{"dataset": d, "method": m, "seed": s} for d in datasets for m in methods for s in seeds]
    for key, values in axes.items():
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        specs = [dict(spec, **{key: v}) for spec in specs for v in values]
    return specs


# ---------------------------------------------------------------- runs


def theta_snapshots(folder, num_epochs: float = 3.0):
    """A ``ThetaSnapshots`` Trainer callback (built here, so that importing this module needs no transformers):
    saves the loglinear policy's theta at mid-training and at the end of an Adam run (``fit="adam"``) for Table 4;
    the exact fit writes the same files itself (:func:`mass_dpo.runs._train_exact`)."""
    from transformers import TrainerCallback

    class ThetaSnapshots(TrainerCallback):
        """Saves the loglinear policy's theta at mid-training and at the end, for Table 4 (``<run>/snapshots/``).

        Mid-training is the end of epoch 1 when training lasts two epochs or more (the paper's "epoch 1"), else half
        of the steps. Files: ``mid.pt`` and ``final.pt`` (``{"theta": [d], "step": int}``)."""

        def __init__(self, folder, num_epochs: float = 3.0):
            self.folder = Path(folder)
            self.num_epochs = float(num_epochs)

        def _save(self, name: str, state, model) -> None:
            theta = getattr(model, "theta", None)
            if theta is None:
                return
            from ..files import atomic_path

            with atomic_path(self.folder / f"{name}.pt") as tmp:
                torch.save({"theta": theta.detach().float().cpu().clone(), "step": int(state.global_step)}, tmp)

        def mid_step(self, state) -> int:
            total = int(state.max_steps)
            if self.num_epochs >= 2 and state.num_train_epochs >= 2:
                return max(1, round(total / state.num_train_epochs))
            return max(1, total // 2)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and state.global_step == self.mid_step(state):
                self._save("mid", state, model)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero:
                self._save("final", state, model)

    return ThetaSnapshots(folder, num_epochs)


def has_snapshots(run_dir) -> bool:
    return all((Path(run_dir) / "snapshots" / f"{k}.pt").is_file() for k in ("mid", "final"))


def _config(setup: Setup, spec: dict, data_dir: str | None) -> dict:
    cfg = {"model": setup.model, "regime": setup.regime, "profile": setup.profile, "data_dir": data_dir,
           "limit": setup.limit_for(spec["dataset"]), "eval_limit": setup.eval_limit, "test_limit": setup.test_limit}
    cfg.update(setup.options)
    cfg.update(spec)
    return cfg


def run_one(setup: Setup, spec, *, data_dir: str | None = None, snapshots: bool = False):
    """Train (or load) one run: ``spec`` holds ``dataset``, ``method``, ``seed`` and any TrainConfig override (resolved
    over the setup), or is a resolved :class:`mass_dpo.config.TrainConfig` (:func:`planned_config`), run as it is.

    Loglinear runs save theta snapshots (:func:`theta_snapshots`); ``snapshots=True`` retrains a cached run that
    has none (a run trained outside this module). Returns the :class:`mass_dpo.runs.RunResult`."""
    from ..config import TrainConfig, resolve_config
    from ..runs import is_finished, load_run, run_dir, train_run

    if isinstance(spec, TrainConfig):
        cfg = spec
    else:
        cfg = resolve_config(_config(setup, spec, data_dir if data_dir is not None else setup.data_dir))
    if setup.trained_world_size:
        trained = run_dir(cfg, root=setup.root, world=setup.trained_world_size)
        if is_finished(trained):
            return load_run(trained)
    path = run_dir(cfg, root=setup.root)
    adam = cfg.regime == "loglinear" and cfg.fit == "adam"
    callbacks = [theta_snapshots(path / "snapshots", cfg.num_train_epochs)] if adam else []
    # retrain a finished run without snapshots, asked under the run's lock: jobs waiting on it retrain it once
    force = ((lambda folder: is_finished(folder) and not has_snapshots(folder))  # an interrupted run resumes
             if snapshots and cfg.regime == "loglinear" else False)
    quiet = contextlib.redirect_stdout(io.StringIO()) if setup.quiet else contextlib.nullcontext()
    with quiet:
        return train_run(cfg, root=setup.root, callbacks=callbacks, force=force)


def run_row(result, spec: dict) -> dict:
    """One tidy row of a finished run: its axes, every test metric, timings and where it lives."""
    cfg = result.config
    seconds = result.info.get("seconds", {})
    row = {
        "model": cfg.model, "regime": cfg.regime, "dataset": cfg.dataset, "method": cfg.method,
        "label": run_label(cfg.method, cfg.n, getattr(cfg, "negatives", None)), "negatives": cfg.strategy,
        "n": cfg.n, "beta": cfg.beta, "seed": cfg.seed,
        "ridge": cfg.ridge if cfg.regime == "loglinear" and cfg.fit == "exact" else None, "pooling": cfg.pooling,
        "selection_score": getattr(cfg, "selection_score", None),
        "epochs": cfg.num_train_epochs, "max_steps": cfg.max_steps, "train_prompts": cfg.limit,
        "eval_prompts": cfg.eval_limit, "test_prompts": result.metrics.get("prompts", cfg.test_limit),
        "steps": result.info.get("train", {}).get("global_step"),
        "seconds_data": seconds.get("data"), "seconds_train": seconds.get("train"), "seconds_test": seconds.get("test"),
        "cached": result.cached, "run_dir": str(result.run_dir),
    }
    row["score"] = result.metrics.get("score")  # which score the unprefixed metrics rank by
    row["accuracy_kind"] = result.metrics.get("accuracy_kind")
    for key, value in result.metrics.items():
        if isinstance(value, (int, float)) and key != "prompts":
            row[key] = float(value)
    row.update({f"spec_{k}": v for k, v in spec.items() if k not in row})
    return row


def run_grid(setup: Setup, specs: list[dict], *, echo: Callable[[str], None] | None = print,
             snapshots: bool = False) -> pd.DataFrame:
    """Train or load every run of ``specs`` (each model of the setup, datasets with missing data skipped).

    Returns one row per run (:func:`run_row`): axes, test metrics with their ``_se``, timings, ``run_dir``."""
    rows = []
    places = available(sorted({s["dataset"] for s in specs}, key=specs_order(specs)), setup.data_dir, echo)
    todo = [(m, s) for m in setup.model_list() for s in specs if s["dataset"] in places]
    start = time.perf_counter()
    for i, (model, spec) in enumerate(todo, 1):
        t0 = time.perf_counter()
        msetup = replace(setup, model=model)
        cfg = planned_config(msetup, spec, data_dir=places[spec["dataset"]])
        result = run_one(msetup, cfg, snapshots=snapshots)
        rows.append(run_row(result, spec))
        if echo:
            what = " ".join(f"{k}={v}" for k, v in spec.items())
            echo(f"[{i}/{len(todo)}] {model} {what}: accuracy {result.metrics.get('accuracy', math.nan):.3f} "
                 f"({'cached' if result.cached else f'trained in {time.perf_counter() - t0:.1f} s'})")
    if echo:
        echo(f"{len(rows)} runs ready in {time.perf_counter() - start:.1f} s")
    return pd.DataFrame(rows)


def run_label(method: str, n: int, negatives: str | None = None) -> str:
    """The method's label; S-DPO with every negative of the pool reads ``S-DPO-all``; a method trained on other
    negatives than its own (``TrainConfig.negatives``) carries them: ``S-DPO[longest]``."""
    from ..config import METHOD_STRATEGY

    if negatives and negatives != METHOD_STRATEGY.get(method):
        return f"{method_label(method)}[{negatives}]"
    return "S-DPO-all" if method == "sdpo" and int(n) >= FULL_POOL else method_label(method)


# ---------------------------------------------------------------- hyperparameters, chosen on the validation split


def tuning_rule() -> dict[str, Any]:
    """``params/training.yaml`` ``tuning``: the metric, the seed, the grid per regime and the bounds of its axes."""
    from ..tuning import tuning_rule as rule

    return rule()


def tuning_grid(regime: str) -> list[dict[str, Any]]:
    """Every combination of the regime's written grid, in grid order (first = the most regularised)."""
    from ..tuning import combos, grid_axes

    return combos(grid_axes(regime, tuning_rule()))


_TUNED: dict = {}


def tune(setup: Setup, dataset: str, method: str, *, data_dir: str | None = None, negatives: str | None = None
         ) -> tuple[dict, pd.DataFrame]:
    """Choose the hyperparameters of ``(setup.model, dataset, method)`` once, by the rule in ``params/training.yaml``
    (:func:`mass_dpo.tuning.tune`: every grid point trained on the training prompts with the tuning seed, the method's
    default n and beta, scored on the validation prompts; a numeric axis whose best value is at an edge is extended).

    ``negatives``: a method trained on other negatives than its own (``TrainConfig.negatives``) is tuned as a method
    of its own. Returns ``(chosen options, one row per grid point with the validation metric)``. The test split is
    never read.
    """
    from ..tuning import tune as tune_by_rule

    own = {"negatives": negatives} if negatives else {}

    def train(options: dict):
        return run_one(setup, {"dataset": dataset, "method": method, **own, **options}, data_dir=data_dir)

    tuned = tune_by_rule(train, setup.regime, rule=tuning_rule())
    table = tuned.table
    if len(table):
        table = table.assign(dataset=dataset, method=method, negatives=negatives, model=setup.model)
    return dict(tuned.options), table


def tuned_options(setup: Setup, spec: dict, *, data_dir: str | None = None) -> dict:
    """The options :func:`tune` chose for ``spec``'s (model, dataset, method), memoised per process (the tuning runs
    are cached on disk too); ``{}`` when the regime has no grid or ``spec`` sets one of the tuned options itself."""
    combos = tuning_grid(setup.regime)
    if not combos or set(combos[0]) & set(spec):
        return {}
    key = (setup.model, setup.regime, setup.profile, str(data_dir or setup.data_dir),
           setup.limit_for(spec["dataset"]),
           setup.eval_limit, spec["dataset"], spec["method"], json.dumps(setup.options, sort_keys=True, default=str),
           spec.get("negatives"))
    if key not in _TUNED:
        _TUNED[key] = tune(setup, spec["dataset"], spec["method"], data_dir=data_dir, negatives=spec.get("negatives"))
    return dict(_TUNED[key][0])


def planned_config(setup: Setup, spec: dict, *, data_dir: str | None = None):
    """The resolved :class:`mass_dpo.config.TrainConfig` that :func:`run_grid` trains for ``spec`` (the tuned options
    of its (model, dataset, method) included when ``setup.tune``): the one way to name a run before it exists."""
    from ..config import resolve_config

    where = data_dir if data_dir is not None else setup.data_dir
    chosen = tuned_options(setup, spec, data_dir=where) if setup.tune else {}
    return resolve_config(_config(setup, {**chosen, **spec}, where))


def tuning_table(setup: Setup) -> pd.DataFrame:
    """Every tuning of this process for ``setup``'s models: one row per grid point, ``chosen`` marking the winner."""
    frames = [t for k, (_, t) in _TUNED.items() if k[0] in setup.model_list() and k[1] == setup.regime and len(t)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ---------------------------------------------------------------- the reference row and paired differences


def reference_rows(setup: Setup, datasets, *, echo: Callable[[str], None] | None = print) -> pd.DataFrame:
    """The untrained policy of each (model, dataset), evaluated like every run (:func:`mass_dpo.runs.reference_run`):
    rows shaped like :func:`run_grid`'s with ``method = label = "reference"`` and seed 0 (it has no randomness)."""
    from ..runs import reference_run

    rows = []
    places = available(list(datasets), setup.data_dir, None)
    for model, ds in [(m, d) for m in setup.model_list() for d in datasets if d in places]:
        # the configuration S-DPO's seed-0 run of the table is trained with (tuned options included), evaluated untrained
        cfg = planned_config(replace(setup, model=model), {"dataset": ds, "method": "sdpo", "seed": 0},
                             data_dir=places[ds])
        with contextlib.redirect_stdout(io.StringIO()) if setup.quiet else contextlib.nullcontext():
            result = reference_run(cfg, root=setup.root)
        row = run_row(result, {"dataset": ds, "method": "sdpo", "seed": 0})
        row.update(method="reference", label="reference", n=0, ridge=None, steps=0)
        rows.append(row)
    if echo:
        echo(f"reference (untrained policy) evaluated on {len(rows)} dataset(s)")
    return pd.DataFrame(rows)


def per_prompt(run_dir) -> pd.DataFrame:
    """A finished run's per-test-prompt values (``test_per_prompt.csv``), indexed by prompt id."""
    return pd.read_csv(Path(run_dir) / "test_per_prompt.csv", dtype={"id": str}).set_index("id")


def paired_difference(runs: pd.DataFrame, a: str, b: str, metrics, *, by=("model", "dataset"), key: str = "label",
                      z: float = 1.96) -> pd.DataFrame:
    """``a`` minus ``b`` per test prompt, on the same prompts: per group of ``by``, each seed of ``a`` is paired with
    the same seed of ``b`` (or with ``b``'s only run, e.g. the reference), the per-prompt differences are averaged
    over seeds, and the mean comes with its standard error over prompts and a ``z`` (95%) interval.

    Columns: ``by``, ``metric``, ``a``, ``b``, ``diff``, ``se``, ``lo``, ``hi``, ``z_score`` (diff / se),
    ``significant`` (the interval excludes 0), ``seeds``, ``prompts``. Metrics as fractions (x100 for percent).
    """
    by = [by] if isinstance(by, str) else list(by)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    rows = []
    for group, grp in runs.groupby(by, sort=False):
        group = group if isinstance(group, tuple) else (group,)
        ra, rb = grp[grp[key] == a], grp[grp[key] == b]
        if ra.empty or rb.empty:
            continue
        pairs = []
        for r in ra.itertuples():
            match = rb[rb["seed"] == r.seed] if len(rb) > 1 else rb
            if len(match):
                pairs.append((r.run_dir, match.iloc[0]["run_dir"]))
        if not pairs:
            continue
        tables = [(per_prompt(x), per_prompt(y)) for x, y in pairs]
        for metric in metrics:
            diffs = []
            for ta, tb in tables:
                if metric not in ta or metric not in tb:
                    continue
                common = ta.index.intersection(tb.index)
                diffs.append((ta.loc[common, metric] - tb.loc[common, metric]).rename(len(diffs)))
            if not diffs:
                continue
            d = pd.concat(diffs, axis=1).mean(axis=1).to_numpy(dtype=float)
            mean = float(d.mean())
            se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
            rows.append({**dict(zip(by, group)), "metric": metric, "a": a, "b": b, "diff": mean, "se": se,
                         "lo": mean - z * se, "hi": mean + z * se, "z_score": mean / se if se > 0 else math.nan,
                         "significant": bool(se > 0 and abs(mean) > z * se), "seeds": len(diffs),
                         "prompts": int(len(d))})
    return pd.DataFrame(rows)


def specs_order(specs: list[dict]):
    order = {d: i for i, d in enumerate(dict.fromkeys(s["dataset"] for s in specs))}
    return lambda d: order[d]


# ---------------------------------------------------------------- summaries


def summarize(runs: pd.DataFrame, by, metrics, *, percent: Iterable[str] = PERCENT) -> pd.DataFrame:
    """Mean and standard error of each metric over the seeds of each ``by`` group, long format.

    Columns: ``by``, ``metric``, ``value``, ``se``, ``se_over``, ``seeds`` and ``se_prompts``. With several seeds
    ``se`` is the standard error over seeds (std / sqrt(k)); with one seed it is the run's own test-set standard
    error over prompts (``se_over="prompts"``). ``se_prompts`` is always the mean over seeds of the test-set
    standard error (the paper's subscript). Metrics in ``percent`` are scaled by 100 like the paper's tables."""
    by = [by] if isinstance(by, str) else list(by)
    rows = []
    if runs.empty:
        return pd.DataFrame(columns=[*by, "metric", "value", "se", "se_over", "seeds", "se_prompts"])
    for key, grp in runs.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        for metric in metrics:
            if metric not in grp:
                continue
            vals = grp[metric].to_numpy(dtype=float)
            vals = vals[np.isfinite(vals)]
            k = len(vals)
            scale = 100.0 if metric in percent else 1.0
            if k > 1:
                se, over = float(vals.std(ddof=1) / math.sqrt(k)), "seeds"
            elif k == 1 and f"{metric}_se" in grp:
                se, over = float(grp[f"{metric}_se"].iloc[0]), "prompts"
            else:
                se, over = math.nan, ""
            within = grp[f"{metric}_se"].to_numpy(dtype=float) if f"{metric}_se" in grp else np.array([math.nan])
            rows.append(dict(zip(by, key), metric=metric, value=scale * float(vals.mean()) if k else math.nan,
                             se=scale * se, se_over=over, seeds=k,
                             se_prompts=scale * float(np.nanmean(within)) if np.isfinite(within).any() else math.nan))
    return pd.DataFrame(rows)


def with_average(summary: pd.DataFrame, runs: pd.DataFrame, by, metrics, *, datasets=DATASETS,
                 percent: Iterable[str] = PERCENT) -> pd.DataFrame:
    """``summary`` plus an ``avg`` dataset: per seed the mean over datasets, then mean and SE over seeds.

    Only when every one of ``datasets`` ran (the paper's average is over all four); otherwise returned as is."""
    if runs.empty or set(datasets) - set(runs["dataset"]):
        return summary
    by = [b for b in ([by] if isinstance(by, str) else list(by)) if b != "dataset"]
    per_seed = runs[runs["dataset"].isin(datasets)].groupby([*by, "seed"], sort=False)[list(metrics)].mean()
    avg = summarize(per_seed.reset_index(), by, metrics, percent=percent)
    avg["dataset"] = "avg"
    return pd.concat([summary, avg], ignore_index=True)


def paper_reference(table: str) -> pd.DataFrame:
    """The paper's numbers of ``table`` (``params/paper_reference/<table>.csv``, long format)."""
    from ..params import params_dir

    return pd.read_csv(params_dir() / "paper_reference" / f"{table}.csv")


def _key(value) -> str:
    """A join key: numbers as ``%g`` (so 1, 1.0 and "1" meet), anything else as text."""
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def beside_paper(ours: pd.DataFrame, table: str, keys, *, model: str, value: str = "value") -> pd.DataFrame:
    """Our numbers beside the paper's, with the difference.

    ``ours`` has ``keys`` (e.g. ``method, dataset, metric``; methods as keys or labels) and ``value``. Adds one
    column per paper model (``paper_Qwen3``, ...), ``paper`` = the same model's number when ours is one of the
    paper's models, else the mean over the paper's models, and ``diff = value - paper``."""
    keys = list(keys)
    ref = paper_reference(table)
    ours = ours.copy()
    if "method" in keys:
        ours["method"] = ours["method"].map(method_label)
    for k in keys:
        if k in ref:
            ref[k] = ref[k].map(_key)
            ours[k] = ours[k].map(_key)
    join = [k for k in keys if k in ref]
    wide = ref.pivot_table(index=join, columns="model", values=value if value in ref else "value", aggfunc="first")
    wide.columns = [f"paper_{c}" for c in wide.columns]
    wide = wide.reset_index()
    out = ours.merge(wide, on=join, how="left")
    mine = f"paper_{model_label(model)}"
    cols = [c for c in out.columns if c.startswith("paper_")]
    if mine in out:
        out["paper"] = out[mine]
    else:
        out["paper"] = out[cols].mean(axis=1) if cols else math.nan
    out["diff"] = out[value] - out["paper"]
    return out


def wide_table(long: pd.DataFrame, index, columns, *, value: str = "value", se: str | None = "se",
               digits: int = 2) -> pd.DataFrame:
    """A readable pivot: one cell ``"mean ± se [paper p]"`` per (index, columns), for the Markdown/LaTeX copy
    (the bracket only where ``long`` has a finite ``paper`` number)."""
    index = [index] if isinstance(index, str) else list(index)
    columns = [columns] if isinstance(columns, str) else list(columns)
    cell = long.copy()
    fmt = f"{{:.{digits}f}}"
    nan = [math.nan] * len(cell)
    ses = cell[se].astype(float) if se and se in cell else nan
    papers = cell["paper"].astype(float) if "paper" in cell else nan
    cell["cell"] = [
        "" if not np.isfinite(v) else (fmt.format(v) + (f" ± {fmt.format(s)}" if np.isfinite(s) else "")
                                       + (f" [paper {fmt.format(p)}]" if np.isfinite(p) else ""))
        for v, s, p in zip(cell[value].astype(float), ses, papers)
    ]
    out = cell.pivot_table(index=index, columns=columns, values="cell", aggfunc="first", sort=False)
    out.columns = [" ".join(str(c) for c in col) if isinstance(col, tuple) else str(col) for col in out.columns]
    return out.reset_index()


# ---------------------------------------------------------------- data of a run (for Tables 4 and 7)


def config_of(run):
    """The resolved configuration a finished run was trained with, read from its own folder (``config.json``).

    ``run``: a :class:`mass_dpo.runs.RunResult`, a row of a runs table (anything with ``run_dir``: a
    :func:`run_grid` row, a pandas row, a dict) or a run folder. A configuration that is not a finished run's is
    refused: every analysis reports a run, so it reads that run's settings (pooling, tuned options, n, beta, ...)."""
    from ..config import TrainConfig
    from ..runs import RunResult, load_run

    if isinstance(run, RunResult):
        return run.config
    if isinstance(run, TrainConfig):
        raise TypeError("an analysis reads a finished run's own configuration: pass the run (a runs-table row, a "
                        "RunResult or its folder), not a TrainConfig")
    folder = run.get("run_dir") if isinstance(run, dict) else getattr(run, "run_dir", run)
    return load_run(folder).config


def load_split(run, split: str = "train"):
    """The cached ``Extracted`` of one split of a finished run (:func:`config_of`: its own pooling, data and sizes),
    as :func:`mass_dpo.runs.prepare_data` made it for that run (shared in-process: :func:`mass_dpo.runs.extracted_split`)."""
    from ..runs import extracted_split

    with contextlib.redirect_stderr(io.StringIO()):
        return extracted_split(config_of(run), split)[1]


#: Regimes whose runs select their negatives on the very cache entry :func:`load_split` reads (freeze: its cached
#: states are a part beside the same entry), so the selection can be redone without preparing the run's data.
SAME_EXTRACTION = ("loglinear", "freeze")


def training_negatives(run):
    """``(Extracted, candidates [P, 1+n])``: a finished run's training split and the pool indices it trained on
    (column 0 the chosen response, then its negatives, ``-1`` = none), selected exactly as
    :func:`mass_dpo.runs.prepare_data` did: :func:`mass_dpo.training.select_training_negatives` under the run's own
    method, n, beta, gamma, seed, reading and strategy. In the loglinear and freeze regimes on :func:`load_split`'s
    extraction (the same cache entry: no cached states, no validation or test split, no reference log-probs are
    needed); in the others through ``prepare_data`` itself."""
    from ..runs import prepare_data
    from ..training import select_training_negatives

    cfg, split = config_of(run), load_split(run, "train")
    if cfg.regime not in SAME_EXTRACTION:
        return split, prepare_data(cfg).train.candidates
    negatives = select_training_negatives(split, cfg.method, cfg.n, beta=cfg.beta, gamma=cfg.gamma, seed=cfg.seed,
                                          selection_score=cfg.selection_score, strategy=cfg.strategy)
    return split, torch.cat([split.target.long()[:, None], negatives], dim=1)


def span(values, digits: int) -> str:
    """``"0.66"`` or ``"0.66-0.80"``: the range of ``values`` at ``digits`` decimals (for printed sentences)."""
    lo, hi = f"{values.min():.{digits}f}", f"{values.max():.{digits}f}"
    return lo if lo == hi else f"{lo}-{hi}"


# ---------------------------------------------------------------- learning first, and sentences from the numbers


def learning_table(runs: pd.DataFrame, metrics=("recall@1", "mrr"), *, by=("model", "dataset"),
                   threshold: float = 3.0) -> pd.DataFrame:
    """How far training moved each method beyond the untrained ``reference`` (rows of :func:`reference_rows` inside
    ``runs``): the paired difference per test prompt (:func:`paired_difference`), ``learned`` when it is at least
    ``threshold`` standard errors above 0."""
    frames = [paired_difference(runs, label, "reference", metrics, by=by)
              for label in dict.fromkeys(runs["label"]) if label != "reference"]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True).rename(columns={"a": "method"}).drop(columns=["b"])
    out["learned"] = out["z_score"] >= threshold
    return out


def points(value: float, percent: bool = True) -> str:
    """A signed number of percentage points (``+1.2``), or the value as is."""
    return f"{100 * value:+.1f}" if percent else f"{value:+.3g}"


def paired_sentence(row, *, percent: bool | None = None) -> str:
    """One sentence for one row of :func:`paired_difference`: the difference, its 95% interval, and whether the
    interval excludes zero (``inside the noise`` otherwise). ``percent``: in points (default: the metrics of
    :data:`PERCENT`)."""
    percent = row["metric"] in PERCENT if percent is None else percent
    unit = " points" if percent else ""
    verdict = ("above" if row["diff"] > 0 else "below") if row["significant"] else "inside the noise"
    return (f"{row['a']} minus {row['b']} on {row['dataset']} ({row['metric']}): {points(row['diff'], percent)}{unit}, "
            f"95% interval {points(row['lo'], percent)} to {points(row['hi'], percent)} over {row['prompts']} paired "
            f"test prompts and {row['seeds']} seed(s): {verdict}.")


def learning_sentence(learned: pd.DataFrame, method: str, metric: str = "mrr", threshold: float = 3.0) -> str:
    """``"S-DPO-all beats the reference by >= 3 SE on 3 of 3 datasets (qasc +6.1, ...)"`` from :func:`learning_table`."""
    part = learned[(learned["method"] == method) & (learned["metric"] == metric)]
    if part.empty:
        return f"{method}: no runs to compare with the reference."
    hits = part[part["learned"]]
    detail = ", ".join(f"{r.dataset} {points(r.diff)} ({r.z_score:.2f} SE)" for r in part.itertuples())
    return (f"{method} beats the untrained reference by at least {threshold:g} standard errors on {metric} on "
            f"{len(hits)} of {len(part)} dataset(s): {detail}.")


SCORE_TEXT = {"reward": "the implicit reward beta * (log pi - log pi_ref)", "logp": "the policy's sequence log-prob"}
ACCURACY_TEXT = {"top1": "the top-1 of that score over the whole pool (= Recall@1)",
                 "hit_ratio@1": "the generation-based HitRatio@1 (greedy decoding names exactly the target)"}


def scoring_note(runs: pd.DataFrame) -> str:
    """One sentence saying what the runs' unprefixed test metrics rank by and what their accuracy is."""
    trained = runs[runs["label"] != "reference"] if "label" in runs else runs
    if trained.empty or "score" not in trained:
        return "No runs."
    scores = sorted(set(trained["score"].dropna()))
    kinds = sorted(set(trained["accuracy_kind"].dropna()))
    other = [s for s in SCORE_TEXT if s not in scores]
    return (f"Test metrics rank every candidate of the pool by {' / '.join(SCORE_TEXT.get(s, s) for s in scores)}"
            f" (the columns prefixed {', '.join(o + '_' for o in other)} rank by {', '.join(SCORE_TEXT[o] for o in other)});"
            f" accuracy is {' / '.join(ACCURACY_TEXT.get(k, k) for k in kinds)}; ties are broken at random in"
            f" expectation, so a constant score sits at chance.")


# ---------------------------------------------------------------- warm reruns


#: Bump when the memoised analyses change what they return for the same inputs (one analysis: its
#: ``disk_memo(tag, version=...)``).
MEMO_VERSION = 1


def _memo_part(value) -> Any:
    """A stable description of an argument: a runs table by its run folders (content-addressed by config hash), a
    Setup by its fields plus what its runs' and extractions' hashes also cover (the resolved data folder,
    ``$MASS_DPO_DATA``, the run and extraction format versions), anything else by its repr."""
    if isinstance(value, pd.DataFrame):
        return sorted(map(str, value["run_dir"])) if "run_dir" in value else value.to_csv(index=False)
    if isinstance(value, Setup):
        from dataclasses import asdict

        from ..data import resolve_data_dir
        from ..extraction import EXTRACTION_VERSION
        from ..runs import RUN_FORMAT

        return {**asdict(value), "_data": str(resolve_data_dir(value.data_dir)[0]),
                "_data_env": os.environ.get("MASS_DPO_DATA"), "_formats": [RUN_FORMAT, EXTRACTION_VERSION]}
    if callable(value):
        return getattr(value, "__name__", "callable")
    return repr(value)


def disk_memo(tag: str, version: int = 1):
    """Cache a notebook analysis that returns a DataFrame, by its arguments, under ``<runs root>/analyses/``.

    For analyses that are deterministic functions of finished runs and their cached extractions (whose folders are
    named by the hash of what made them): a warm ``mass-dpo reproduce`` reads the table instead of recomputing it.
    ``version``: raise it when the analysis changes what it returns (its cached tables are then computed again).
    ``MASS_DPO_NO_MEMO=1`` recomputes."""
    import functools
    import hashlib

    def wrap(fn):
        @functools.wraps(fn)
        def memoised(*args, **kwargs):
            from ..runs import runs_root

            if os.environ.get("MASS_DPO_NO_MEMO", "") not in ("", "0"):
                return fn(*args, **kwargs)
            stamp = MEMO_VERSION if version == 1 else [MEMO_VERSION, version]  # version 1: the keys stay as they were
            parts = [tag, stamp, [_memo_part(a) for a in args],
                     {k: _memo_part(v) for k, v in sorted(kwargs.items()) if k != "echo"}]
            digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
            root = args[0].root if args and isinstance(args[0], Setup) and args[0].root else None
            path = Path(root or runs_root()) / "analyses" / f"{tag}-{digest}.pkl"

            def cached():
                if not path.is_file():
                    return None
                try:
                    return pd.read_pickle(path)
                except Exception as err:  # a damaged table: said in one line, computed again
                    import warnings

                    warnings.warn(f"memoised table {path} does not load ({type(err).__name__}); computing it again",
                                  stacklevel=3)
                    return None

            def compute():
                out = fn(*args, **kwargs)
                if isinstance(out, pd.DataFrame):
                    with atomic_path(path) as tmp:
                        out.to_pickle(tmp, compression=None)
                return out

            from ..files import atomic_path, compute_once

            return compute_once(path, f"the analysis {tag}", cached, compute)  # parallel notebooks: once

        return memoised

    return wrap
