"""The paper's experiments as grids of runs, summarised into tidy DataFrames beside the published numbers.

Every notebook of Section 6 and appendix C goes through here (``docs/reproduce.md``):

    Setup (model, regime, profile, data, seeds, sizes)  ->  run_grid(setup, specs)  ->  one row per run
    ->  summarize (mean and standard error over seeds)   ->  beside_paper(..., "table1")  ->  save_table

A run is :func:`mass_dpo.runs.train_run` (cached by the hash of its resolved config, so the notebooks of Tables
1, 2, 5 and 6 and Figures 2-3 share their runs, and a second ``mass-dpo reproduce`` trains nothing). A dataset
whose data is missing (MovieLens ships no sample) is reported once and skipped; nothing else is.

Table 4 (stability) recomputes Algorithm 1 at the snapshots of theta that :class:`ThetaSnapshots` saves in every
loglinear run (:mod:`mass_dpo.stability`); Tables 7-8 read the wall-clock times the runs and the extraction
manifests record.
"""

from __future__ import annotations

import contextlib
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
from transformers import TrainerCallback

#: The paper's datasets in its column order.
DATASETS = ("medmcqa", "qasc", "lastfm", "movielens")
#: The five methods of Table 1, in the paper's row order.
METHODS = ("dpo", "dmpo", "dpo_k", "sdpo", "mass_dpo")
METHOD_LABELS = {"dpo": "DPO", "dmpo": "DMPO", "dpo_k": "DPO-k", "sdpo": "S-DPO", "mass_dpo": "MASS-DPO"}
MODEL_LABELS = {"llama3": "Llama3", "qwen3": "Qwen3", "smollm3": "SmolLM3", "smollm2": "SmolLM2", "tiny": "tiny"}
PAPER_MODELS = ("Qwen3", "SmolLM3", "Llama3")
#: Metrics the paper prints in percent (Tables 1-3, 5 and the MRR of Table 6).
PERCENT = ("accuracy", "recall@1", "recall@3", "recall@5", "ndcg@1", "ndcg@3", "ndcg@5", "mrr")
RANKING = ("recall@1", "recall@3", "ndcg@1", "ndcg@3")
#: Negatives of "S-DPO with the full pool" (Tables 7-8): every negative of a 20-candidate pool.
FULL_POOL = 19


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


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
        train_limit, eval_limit, test_limit: prompts per split (``None``: the profile's).
        options: any other :class:`mass_dpo.training.TrainConfig` field, for every run.
        root: the runs root (default ``$MASS_DPO_RUNS`` / the cache). quiet: hide the Trainer's per-step prints.
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
    train_limit: int | None = None
    eval_limit: int | None = None
    test_limit: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    root: str | None = None
    quiet: bool = True
    trained_world_size: int | None = field(
        default_factory=lambda: int(os.environ["MASS_DPO_TRAINED_WORLD_SIZE"])
        if os.environ.get("MASS_DPO_TRAINED_WORLD_SIZE") else None)

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
    from .data.benchmarks import locate

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
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({"theta": theta.detach().float().cpu().clone(), "step": int(state.global_step)},
                   self.folder / f"{name}.pt")

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


def has_snapshots(run_dir) -> bool:
    return all((Path(run_dir) / "snapshots" / f"{k}.pt").is_file() for k in ("mid", "final"))


def _config(setup: Setup, spec: dict, data_dir: str | None) -> dict:
    cfg = {"model": setup.model, "regime": setup.regime, "profile": setup.profile, "data_dir": data_dir,
           "limit": setup.train_limit, "eval_limit": setup.eval_limit, "test_limit": setup.test_limit}
    cfg.update(setup.options)
    cfg.update(spec)
    return cfg


def run_one(setup: Setup, spec: dict, *, data_dir: str | None = None, snapshots: bool = False):
    """Train (or load) one run: ``spec`` holds ``dataset``, ``method``, ``seed`` and any TrainConfig override.

    Loglinear runs save theta snapshots (:class:`ThetaSnapshots`); ``snapshots=True`` retrains a cached run that
    has none (a run trained outside this module). Returns the :class:`mass_dpo.runs.RunResult`."""
    from .runs import run_dir, train_run
    from .training import resolve_config

    from .runs import is_finished, load_run

    cfg = resolve_config(_config(setup, spec, data_dir if data_dir is not None else setup.data_dir))
    if setup.trained_world_size:
        trained = run_dir(cfg, root=setup.root, world=setup.trained_world_size)
        if is_finished(trained):
            return load_run(trained)
    path = run_dir(cfg, root=setup.root)
    callbacks = [ThetaSnapshots(path / "snapshots", cfg.num_train_epochs)] if cfg.regime == "loglinear" else []
    force = bool(snapshots and cfg.regime == "loglinear" and (path / "metrics.json").is_file()
                 and not has_snapshots(path))
    sink = io.StringIO()
    quiet = contextlib.redirect_stdout(sink) if setup.quiet else contextlib.nullcontext()
    with quiet:
        return train_run(cfg, root=setup.root, callbacks=callbacks, force=force)


def run_row(result, spec: dict) -> dict:
    """One tidy row of a finished run: its axes, every test metric, timings and where it lives."""
    cfg = result.config
    seconds = result.info.get("seconds", {})
    row = {
        "model": cfg.model, "regime": cfg.regime, "dataset": cfg.dataset, "method": cfg.method,
        "label": method_label(cfg.method), "n": cfg.n, "beta": cfg.beta, "seed": cfg.seed,
        "epochs": cfg.num_train_epochs, "max_steps": cfg.max_steps, "train_prompts": cfg.limit,
        "eval_prompts": cfg.eval_limit, "test_prompts": result.metrics.get("prompts", cfg.test_limit),
        "steps": result.info.get("train", {}).get("global_step"),
        "seconds_data": seconds.get("data"), "seconds_train": seconds.get("train"), "seconds_test": seconds.get("test"),
        "cached": result.cached, "run_dir": str(result.run_dir),
    }
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
        result = run_one(replace(setup, model=model), spec, data_dir=places[spec["dataset"]], snapshots=snapshots)
        rows.append(run_row(result, spec))
        if echo:
            what = " ".join(f"{k}={v}" for k, v in spec.items())
            echo(f"[{i}/{len(todo)}] {model} {what}: accuracy {result.metrics.get('accuracy', math.nan):.3f} "
                 f"({'cached' if result.cached else f'trained in {time.perf_counter() - t0:.1f} s'})")
    if echo:
        echo(f"{len(rows)} runs ready in {time.perf_counter() - start:.1f} s")
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
    return pd.read_csv(repo_root() / "params" / "paper_reference" / f"{table}.csv")


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


def method_table(runs: pd.DataFrame, table: str, metrics, *, model: str, average: bool = False) -> pd.DataFrame:
    """Tables 1, 2, 5, 6: per model, method and dataset, our mean/SE over seeds beside the paper."""
    by = ["model", "method", "dataset"]
    summary = summarize(runs, by, metrics)
    if average:
        summary = with_average(summary, runs, by, metrics)
    out = beside_paper(summary, table, ["method", "dataset", "metric"], model=model)
    order = {m: i for i, m in enumerate(METHOD_LABELS.values())}
    dorder = {d: i for i, d in enumerate((*DATASETS, "avg"))}
    out = out.sort_values(["model", "method", "dataset", "metric"],
                          key=lambda s: s.map(order) if s.name == "method" else
                          s.map(dorder) if s.name == "dataset" else s).reset_index(drop=True)
    return out


# ---------------------------------------------------------------- Figures 2-3


def curves(runs: pd.DataFrame, *, split: str = "eval") -> pd.DataFrame:
    """The online-eval logs of ``runs`` stacked: one row per (run, step), long in ``metric`` (margin, accuracy,
    chosen_rewards), with ``dataset, method, label, seed, step``."""
    from .runs import load_run

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
    from .plotting import mean_ci

    return mean_ci(curves_df, ["dataset", "label", "metric", "step"], "value")


def final_gap(curves_df: pd.DataFrame, a: str = "MASS-DPO", b: str = "S-DPO") -> pd.DataFrame:
    """The last logged value of each metric, ``a`` minus ``b``, per dataset (mean over seeds)."""
    last = curves_df[curves_df["step"] == curves_df.groupby(["dataset", "label", "seed"])["step"].transform("max")]
    means = last.groupby(["dataset", "metric", "label"])["value"].mean().unstack("label")
    if a not in means or b not in means:
        return pd.DataFrame(columns=["dataset", "metric", a, b, "diff"])
    means["diff"] = means[a] - means[b]
    return means[[a, b, "diff"]].reset_index()


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


# ---------------------------------------------------------------- data of a run (for Tables 4 and 7)


def load_split(config, split: str = "train"):
    """The cached ``Extracted`` of one split of a run's config, as :func:`mass_dpo.runs.prepare_data` made it."""
    from .data import load_benchmark
    from .extraction import extract
    from .models import load_model

    limit = {"train": config.limit, "valid": config.eval_limit, "test": config.test_limit}[split]
    records = load_benchmark(config.dataset, split, data_dir=config.data_dir, limit=limit, seed=config.subsample_seed)
    key = f"{config.dataset}/{split}/limit={limit}/seed={config.subsample_seed}"
    with contextlib.redirect_stderr(io.StringIO()):
        # a loaded bundle, as prepare_data passes: the cache key covers the model's identity as given
        return extract(records, load_model(config.model), dataset_key=key, pooling=config.pooling, progress=False)


# ---------------------------------------------------------------- Table 4


def stability(setup: Setup, datasets, *, ns=(5, 10), seeds=None, beta: float = 0.1, gamma: float = 0.1,
              echo: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Table 4: MASS-DPO-n runs; Algorithm 1 recomputed at the mid-training and final theta against initialisation.

    One row per (model, dataset, n, seed, checkpoint): exact match, Jaccard, top-1 and top-3 exact match,
    objective retention, over the training prompts. Loglinear regime only: theta_t gives Delta_i(theta_t) =
    phi_i . theta_t on the frozen features (:func:`mass_dpo.stability.at_checkpoint`); the LM regimes would need
    a re-extraction under each checkpoint (``extract(..., checkpoint=<folder>)``), which the runs do not keep."""
    from . import stability as stab

    if setup.regime != "loglinear":
        raise NotImplementedError("Table 4 on an LM regime needs checkpoints re-extracted with "
                                  "extract(..., checkpoint=<folder>); this module covers the loglinear regime")
    seeds = list(seeds if seeds is not None else setup.seeds)
    runs = run_grid(setup, grid(datasets, ["mass_dpo"], seeds, n=list(ns), beta=beta), echo=echo, snapshots=True)
    rows = []
    for row in runs.itertuples():
        from .runs import load_run

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


# ---------------------------------------------------------------- Tables 7-8


def wallclock(setup: Setup, datasets, *, n: int = 5, full: int = FULL_POOL, seeds=None, beta: float = 0.1,
              echo: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Table 7: extraction, selection and training-per-epoch seconds for MASS-DPO-n and S-DPO with the full pool.

    Extraction: the seconds the extraction manifests recorded when the splits were first extracted (train, valid
    and test). Selection: Algorithm 1 over the training prompts, timed now. Training: each run's recorded training
    seconds over its epochs. One row per (model, dataset, seed, component)."""
    from .preprocess import select_extracted
    from .runs import load_run

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
            select_extracted(splits[0], n, strategy="dopt", beta=beta, gamma=cfg.gamma)
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


# ---------------------------------------------------------------- the quickstart


def quickstart_extract(path, model: str = "smollm2"):
    """``(records, Extracted)`` of a preference file (``load_preferences``), extracted (and cached) under ``model``."""
    from .data import load_preferences
    from .extraction import extract

    records = load_preferences(path)
    with contextlib.redirect_stderr(io.StringIO()):
        ex = extract(records, model, dataset_key=f"quickstart/{Path(path).name}", progress=False)
    return records, ex


def compare_selections(records, ex, n: int = 3, *, beta: float = 0.1, gamma: float = 0.1, seed: int = 0
                       ) -> pd.DataFrame:
    """Per prompt and candidate: the text, whether D-optimal and random picked it (and at which step), and the
    D-optimal marginal gain of each pick. Also, per prompt, the information each subset adds,
    ``log det H(S) - d log gamma = log det(I + G[S, S])`` (``info_dopt``, ``info_random``; the ``d log gamma`` of an
    empty design is the same for both and would hide the difference)."""
    from .preprocess import select_extracted

    dopt = select_extracted(ex, n, strategy="dopt", beta=beta, gamma=gamma)
    rand = select_extracted(ex, n, strategy="random", beta=beta, gamma=gamma, seed=seed)
    rows = []
    for p, rec in enumerate(records):
        d_idx, r_idx = dopt["indices"][p].tolist(), rand["indices"][p].tolist()
        for c, text in enumerate(rec["candidates"]):
            if not bool(ex.mask[p, c]):
                continue
            rows.append({
                "prompt": p, "id": rec["id"], "question": rec["prompt"], "candidate": c, "text": text,
                "chosen": c == int(ex.target[p]),
                "dopt_step": d_idx.index(c) + 1 if c in d_idx else None,
                "dopt_gain": float(dopt["gains"][p][d_idx.index(c)]) if c in d_idx else None,
                "random_step": r_idx.index(c) + 1 if c in r_idx else None,
                "info_dopt": float(dopt["gains"][p].nan_to_num(0.0).sum()),
                "info_random": float(rand["gains"][p].nan_to_num(0.0).sum()),
            })
    return pd.DataFrame(rows)


def pool_projection(ex, prompt: int) -> pd.DataFrame:
    """2-D PCA of one pool's feature differences ``phi_i = phi(x, y_i) - phi(x, y*)`` (the chosen one at 0):
    ``candidate, pc1, pc2`` and the share of variance the two components explain (``explained``)."""
    m = ex.mask[prompt]
    feats = ex.features[prompt][m].double()
    idx = torch.nonzero(m).flatten()
    diffs = feats - ex.features[prompt, int(ex.target[prompt])].double()
    centred = diffs - diffs.mean(0)
    u, s, v = torch.linalg.svd(centred, full_matrices=False)
    coords = centred @ v[:2].T
    explained = float((s[:2] ** 2).sum() / (s**2).sum()) if float((s**2).sum()) > 0 else math.nan
    return pd.DataFrame({"candidate": idx.tolist(), "pc1": coords[:, 0].tolist(), "pc2": coords[:, 1].tolist(),
                         "explained": explained})


def quickstart_train(ex, *, methods=("mass_dpo", "sdpo"), n: int = 3, test_fraction: float = 0.25,
                     steps: int = 30, seed: int = 0, root=None, model: str = "smollm2") -> pd.DataFrame:
    """Train each method for ``steps`` steps in the loglinear regime on the first prompts of ``ex`` and evaluate on
    the last ``test_fraction``; one row per method with the test metrics (accuracy, recall@1, mrr, margin...)."""
    from .runs import RunData, train_run
    from .training import PreferenceDataset, build_policy, resolve_config, select_training_negatives
    from .preprocess import _slice

    P = len(ex)
    cut = max(1, min(P - 1, int(round(P * (1 - test_fraction)))))
    train_ex, test_ex = _slice(ex, 0, cut), _slice(ex, cut, P)
    rows = []
    for method in methods:
        cfg = resolve_config(dataset="quickstart", model=model, method=method, n=n, seed=seed, regime="loglinear",
                             max_steps=steps, eval_limit=0, per_device_train_batch_size=4,
                             gradient_accumulation_steps=1, logging_steps=5, eval_steps=5, save_steps=steps,
                             data_dir=f"quickstart-{ex.meta.get('key', 'data')}")  # the hash follows the data

        def data(c, method=method):
            neg = select_training_negatives(train_ex, method, n, beta=c.beta, gamma=c.gamma, seed=c.seed)
            train = PreferenceDataset.from_selection(train_ex, neg)
            return RunData(build_policy(c, dim=int(ex.features.shape[-1])), train, None, test_ex)

        with contextlib.redirect_stdout(io.StringIO()):
            res = train_run(cfg, root=root, data=data)
        rows.append({"method": method_label(method), "n": cfg.n, "steps": steps, "train_prompts": cut,
                     "test_prompts": P - cut,
                     **{k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float)) and k != "prompts"}})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- a notebook's runs, outside the notebook


def notebook_parameters(name: str, profile: str = "cpu") -> dict[str, Any]:
    """The parameters notebook ``name`` runs with under ``profile``: its parameters cell, then the profile's values
    for the parameters it declares (as ``mass-dpo reproduce`` passes them)."""
    import ast

    import nbformat

    from .reproduce import profile_parameters

    nb = nbformat.read(repo_root() / "notebooks" / f"{name}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params = {s.target.id: ast.literal_eval(s.value) for s in ast.parse(cell.source).body}
    params.update({k: v for k, v in profile_parameters(profile, name).items() if k in params})
    return params


def setup_from(params: dict[str, Any]) -> Setup:
    """A :class:`Setup` from a notebook's parameters."""
    return Setup(model=params["model"], models=list(params.get("models") or []) or None, regime=params["regime"],
                 profile=params["profile"], data_dir=params["data_dir"], seeds=list(params["seeds"]),
                 train_limit=params["train_limit"], eval_limit=params["eval_limit"], test_limit=params["test_limit"])


def notebook_specs(name: str, p: dict[str, Any]) -> list[dict]:
    """The run grid of a paper notebook (what its setup cell asks :func:`run_grid` for)."""
    ds, seeds = p["datasets"], p["seeds"]
    if name == "training_dynamics":
        return grid(ds, ["sdpo", "mass_dpo"], seeds, n=p["n"], beta=p["beta"])
    if name in ("table1", "table2", "table5", "table6"):
        return grid(ds, p["methods"], seeds, n=p["n"], beta=p["beta"])
    if name == "table3":
        return ablation_specs(ds, seeds, betas=p["betas"], ns=p["ns"], n=p["n"], beta=p["beta"])
    if name == "table4":
        return grid(ds, ["mass_dpo"], seeds, n=list(p["ns"]), beta=p["beta"])
    if name == "table7":
        return (grid(ds, ["mass_dpo"], seeds, n=p["n_selected"], beta=p["beta"])
                + grid(ds, ["sdpo"], seeds, n=p["full_pool"], beta=p["beta"]))
    if name == "table8":
        return matched_specs(ds, seeds, n=p["n_selected"], full=p["full_pool"], epochs=p["epochs"], beta=p["beta"])
    raise ValueError(f"{name!r} has no run grid")


def main(argv: list[str] | None = None) -> int:
    """``[accelerate launch ...] python -m mass_dpo.experiments NOTEBOOK [...] --profile paper``: train the runs of
    notebooks (every process runs the same grid; each run is distributed by the Trainer). Then execute the
    notebooks with ``MASS_DPO_TRAINED_WORLD_SIZE=<processes>`` so that they load these runs."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--profile", default="cpu")
    args = parser.parse_args(argv)
    for name in args.notebooks:
        p = notebook_parameters(name, args.profile)
        run_grid(setup_from(p), notebook_specs(name, p), snapshots=name == "table4")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
