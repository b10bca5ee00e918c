"""``mass-dpo train``: one training run and its test metrics (see :func:`mass_dpo.runs.train_run`).

    mass-dpo train --dataset lastfm --model smollm2 --method mass_dpo --n 3 --regime loglinear --seed 0
    mass-dpo train --data my_prefs.jsonl --model smollm2 --method mass_dpo --n 3
    accelerate launch -m mass_dpo.train --dataset lastfm --model llama3 --method sdpo --regime full

Options left out take their value from ``params/training.yaml`` (``defaults``, the regime's section, then
``--profile``'s). The run folder is printed; a finished run with the same resolved config is reused. Run folders
live under the runs root (``--out``/``--runs-root``, else ``$MASS_DPO_RUNS``, else ``<cache>/runs``), where
``mass-dpo select`` writes its output too (``select/``). ``--data FILE`` trains on your own preference file
(:func:`mass_dpo.data.load_preferences`: train/valid/test from its ``split`` column, or carved by a fixed seed).

Settings are checked before any work (known dataset and model, a model folder with weights, data present, every
number finite and in range: beta > 0, gamma > 0, n >= 1, ...; ``--trainable-layers`` at most the model's blocks;
the runs root and the cache writable); an option the run would not use (``--trainable-layers`` outside the freeze
regime, ``--ridge`` outside the log-linear one, ``--pool-eval`` without online evaluation, ``--data-dir`` with
``--data``) is refused. An ``n`` larger than the largest negative pool warns once and the run uses, and is named by,
the pool size; prompts that offer fewer than ``n`` negatives are counted in one warning (they train on all they
have). ``--max-length`` and ``--max-prompt-length`` cut prompts and responses the way TRL does
(:func:`mass_dpo.data.formatting.truncate_pool`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .losses import METHODS
from .config import REGIMES

#: Options forwarded to the config as they are (flag -> TrainConfig field, type).
_OPTIONS = {
    "dataset": str, "model": str, "method": str, "n": int, "beta": float, "gamma": float, "regime": str, "seed": int,
    "data_dir": str, "limit": int, "eval_limit": int, "test_limit": int, "pooling": str, "selection_score": str,
    "learning_rate": float, "num_train_epochs": float, "max_steps": int, "per_device_train_batch_size": int,
    "gradient_accumulation_steps": int, "eval_steps": float, "logging_steps": float, "save_steps": float,
    "score": str, "optim": str, "ridge": float, "max_length": int, "max_prompt_length": int,
    "trainable_layers": int, "pool_eval": bool, "online_eval": bool,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import nonnegative_int, positive_float, positive_int

    g = parser.add_argument_group("run")
    what = g.add_mutually_exclusive_group()
    what.add_argument("--dataset", help="a benchmark: lastfm, movielens, medmcqa or qasc")
    what.add_argument("--data", metavar="FILE", help="your own JSON-lines/JSON/Parquet file of prompt, chosen, "
                      "rejected (a list), TRL's standard or conversational form, instead of --dataset")
    g.add_argument("--model", help="tiny, smollm2, llama3, qwen3, smollm3, or a saved model folder")
    g.add_argument("--method", choices=METHODS)
    g.add_argument("--n", type=positive_int, help="negatives per prompt (dpo: always 1)")
    g.add_argument("--beta", type=positive_float, help="DPO scale, > 0")
    g.add_argument("--gamma", type=positive_float, help="ridge of the D-optimal design matrix H(S), > 0")
    g.add_argument("--regime", choices=REGIMES, help="loglinear (frozen features), freeze (the top blocks of the LM "
                   "on cached lower-block states: the CPU LM regime), lora, full")
    g.add_argument("--trainable-layers", dest="trainable_layers", type=positive_int,
                   help="freeze regime: the top blocks that train (with the final norm)")
    g.add_argument("--seed", type=int)
    g.add_argument("--profile", help="a profile of params/training.yaml (cpu, cpu-lm, smoke, paper)")
    d = parser.add_argument_group("data")
    d.add_argument("--data-dir", dest="data_dir", help="benchmark folder ('samples': the shipped samples)")
    d.add_argument("--limit", type=positive_int, help="training prompts")
    d.add_argument("--eval-limit", dest="eval_limit", type=nonnegative_int, help="online-eval prompts (0: none)")
    d.add_argument("--test-limit", dest="test_limit", type=positive_int, help="test prompts")
    d.add_argument("--pooling", choices=("all", "response"))
    d.add_argument("--selection-score", dest="selection_score", choices=("delta", "reference", "offset"),
                   help="reading of the preprocessing score of Algorithm 1 (docs/extraction.md; default reference)")
    d.add_argument("--max-length", dest="max_length", type=positive_int,
                   help="tokens of a prompt + response, the response's tail cut beyond (TRL's max_length; default: "
                        "the model's context)")
    d.add_argument("--max-prompt-length", dest="max_prompt_length", type=positive_int,
                   help="tokens of a prompt, cut from the left beyond (as TRL 0.x's max_prompt_length; default: no "
                        "limit, as TRL 1.x)")
    o = parser.add_argument_group("optimisation")
    o.add_argument("--learning-rate", "--lr", dest="learning_rate", type=positive_float)
    o.add_argument("--epochs", dest="num_train_epochs", type=positive_float)
    o.add_argument("--max-steps", dest="max_steps", type=positive_int)
    o.add_argument("--batch-size", dest="per_device_train_batch_size", type=positive_int, help="per device")
    o.add_argument("--grad-accum", dest="gradient_accumulation_steps", type=positive_int)
    o.add_argument("--eval-steps", dest="eval_steps", type=positive_float)
    o.add_argument("--logging-steps", dest="logging_steps", type=positive_float)
    o.add_argument("--save-steps", dest="save_steps", type=positive_float)
    o.add_argument("--optim", help="a transformers optimizer name (default: paged_adamw_32bit or adamw_torch)")
    o.add_argument("--ridge", type=positive_float, help="L2 weight of the log-linear regime's exact fit, > 0")
    o.add_argument("--no-online-eval", dest="online_eval", action="store_false", default=None,
                   help="no evaluation on the online-eval prompts while training (as tuning runs do): no curves")
    o.add_argument("--pool-eval", dest="pool_eval", action="store_true", default=None,
                   help="every online evaluation also scores the whole pools of the online-eval prompts (log.csv "
                        "rows with split 'pool')")
    e = parser.add_argument_group("evaluation")
    e.add_argument("--score", choices=("logp", "reward"), help="test ranking score")
    r = parser.add_argument_group("run folder")
    r.add_argument("--out", "--runs-root", dest="runs_root",
                   help="runs root (default: $MASS_DPO_RUNS, else <cache>/runs; mass-dpo select writes there too)")
    r.add_argument("--tune", action="store_true",
                   help="first choose the regime's tuned options (params/training.yaml `tuning`, e.g. pooling and "
                        "ridge) on the validation split, for this dataset and method; options given here stay fixed")
    r.add_argument("--force", action="store_true", help="retrain even if a finished run exists")
    r.add_argument("--keep-checkpoints", action="store_true")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and run folder, train nothing")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _show_config_defaults(parser)


def _show_config_defaults(parser: argparse.ArgumentParser) -> None:
    """Append to each config option's help its default: ``params/training.yaml``'s ``defaults`` with the default
    regime's section (and what the other regimes change), else the :class:`TrainConfig` default."""
    import dataclasses

    from .params import load_params
    from .config import TrainConfig

    params = load_params("training")
    base = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    base.update(params.get("defaults") or {})
    regimes = params.get("regimes") or {}
    regime = base.get("regime", TrainConfig.regime)
    shown = {**base, **(regimes.get(regime) or {})}
    for action in parser._actions:
        if (action.dest not in shown or action.default is not None or action.nargs == 0 or not action.option_strings
                or "default" in (action.help or "")):
            continue
        if shown[action.dest] is None and action.dest != "limit":
            continue
        others = [f"{r}: {v}" for r, sec in regimes.items() if r != regime
                  for v in [(sec or {}).get(action.dest, base.get(action.dest))] if v != shown[action.dest]]
        note = f"default: {'all' if shown[action.dest] is None else shown[action.dest]}" + (f"; {', '.join(others)}" if others else "")
        action.help = f"{action.help} ({note})" if action.help else note
    parser.epilog = ("Defaults are params/training.yaml's (its `defaults`, then the regime's section); a --profile "
                     "overrides them, and the options given here override everything.")


def _pool_sizes(dataset: str, data_dir: str | None) -> list[int]:
    """The negatives each training prompt offers: a file's pools, a benchmark's candidate cap less one."""
    from .data import benchmark_sizes, is_preference_file, load_preferences

    if is_preference_file(dataset):
        return [len(r) for r in load_preferences(dataset, split="train")["rejected"]]
    return [benchmark_sizes(dataset)["candidates"] - 1]


def check_settings(options: dict, *, runs_root=None):
    """The resolved config after the checks of the module docstring (:class:`mass_dpo.cli.UsageError` on a bad
    one); an ``n`` above the pool size is lowered to it (in ``options`` too) with one warning."""
    import warnings

    from .cli import UsageError, check_model
    from .data import BENCHMARKS, is_preference_file, load_benchmark, load_preferences, locate
    from .data.preferences import check_preference_path
    from .config import resolve_config

    if "profile" in options and not options["profile"]:
        raise UsageError("--profile: empty name; give a profile of params/training.yaml (cpu, cpu-lm, smoke, paper)")
    try:
        cfg = resolve_config(**options)
    except ValueError as err:  # a value from a --profile or params/training.yaml: one line naming it
        raise UsageError(str(err)) from None
    _check_regime_options(options, cfg)
    check_model(cfg.model)
    _check_folders(runs_root)
    if is_preference_file(cfg.dataset):
        try:
            path = check_preference_path(cfg.dataset)
        except (OSError, ValueError) as err:
            raise UsageError(f"--data {err}") from None
        # a split column lacking a split the run reads is said now, not after extraction (train: _pool_sizes below)
        for split in cfg.splits[1:]:
            load_preferences(path, split=split)
    elif cfg.dataset not in BENCHMARKS:
        raise UsageError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(BENCHMARKS)}, or give your own "
                         "preference file with --data FILE")
    else:
        for split in ("train", "valid", "test"):
            locate(cfg.dataset, split, cfg.data_dir)  # FileNotFoundError naming the folder and the fix
        for split in cfg.splits:  # read now (kept in memory for the run): a bad row is said before the model
            load_benchmark(cfg.dataset, split, data_dir=cfg.data_dir)
    for name in ("beta", "gamma", "learning_rate"):
        if not float(getattr(cfg, name)) > 0:
            raise UsageError(f"{name} must be > 0, got {getattr(cfg, name)} (from a --profile or "
                             f"params/training.yaml); pass --{name.replace('_', '-')} with a positive value")
    _check_optim(cfg.optim)
    _check_trainable_layers(cfg)
    pools = _pool_sizes(cfg.dataset, cfg.data_dir)
    pool = max(pools)
    if cfg.method != "dpo" and cfg.n > pool:
        warnings.warn(f"n={cfg.n} is more than the largest negative pool ({pool} negatives): training with n={pool}")
        options["n"] = pool
        cfg = resolve_config(**options)
    short = [size for size in pools if size < cfg.n]
    if cfg.method != "dpo" and short:
        warnings.warn(f"{len(short)} of {len(pools)} training prompts offer fewer than n={cfg.n} negatives (as few "
                      f"as {min(short)}): they train on all they have")
    return cfg


def _check_regime_options(options: dict, cfg) -> None:
    """Options given on the command line that the run would not use: one line instead of a silent no-op. A value
    that only a ``--profile`` set (e.g. cpu-lm's pool_eval under ``--regime loglinear``) warns."""
    import warnings

    from .cli import UsageError
    from .data import is_preference_file

    if options.get("data_dir") is not None and is_preference_file(cfg.dataset):
        raise UsageError("--data-dir applies to --dataset benchmarks; --data names your file: drop --data-dir")
    if options.get("trainable_layers") is not None and cfg.regime != "freeze":
        raise UsageError(f"--trainable-layers applies to --regime freeze only (this run: {cfg.regime}); drop it or "
                         "add --regime freeze")
    if options.get("ridge") is not None and cfg.regime != "loglinear":
        raise UsageError(f"--ridge applies to --regime loglinear only (this run: {cfg.regime}); drop it")
    if cfg.pool_eval:
        why = ("the loglinear regime does not evaluate whole pools while training" if cfg.regime == "loglinear"
               else "online evaluation is off (--no-online-eval)" if not cfg.online_eval
               else "there are no online-eval prompts (--eval-limit 0)" if cfg.eval_limit == 0 else None)
        if why and options.get("pool_eval"):
            raise UsageError(f"--pool-eval scores the online evaluations' whole pools, and {why}; drop --pool-eval")
        if why:
            warnings.warn(f"pool_eval (from --profile {options.get('profile')}) does nothing here: {why}")


def _check_trainable_layers(cfg) -> None:
    """The freeze regime's ``trainable_layers`` at most the model's blocks (read from its config, no weights)."""
    from .cli import UsageError
    from .models import block_count

    if cfg.regime != "freeze":
        return
    blocks = block_count(cfg.model)
    if blocks is not None and cfg.trainable_layers > blocks:
        raise UsageError(f"--trainable-layers {cfg.trainable_layers}: the model {cfg.model} has {blocks} blocks; "
                         f"give 1 to {blocks}")


#: Optimizers an error message offers first.
COMMON_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "adafactor", "sgd")


def _check_optim(name: str) -> None:
    """``auto`` or an optimizer transformers knows (``OptimizerNames``), else one line."""
    from transformers.training_args import OptimizerNames

    from .cli import UsageError

    known = [o.value for o in OptimizerNames]
    if name != "auto" and name not in known:
        raise UsageError(f"--optim {name}: not a transformers optimizer; give auto (paged_adamw_32bit with "
                         f"bitsandbytes, else adamw_torch) or a name of transformers.training_args.OptimizerNames "
                         f"({', '.join(o for o in COMMON_OPTIMIZERS if o in known)}, ...)")


def _check_folders(runs_root) -> None:
    """The runs root and the cache can be written (before any slow work)."""
    from .files import check_writable
    from .params import cache_root
    from .runs import runs_root as default_root

    root = runs_root or default_root()
    check_writable(root, "runs root", "give --out a folder you can write, or set $MASS_DPO_RUNS")
    check_writable(cache_root(), "cache folder ($MASS_DPO_CACHE)", "set $MASS_DPO_CACHE to a folder you can write")


def _config_args(args: argparse.Namespace) -> dict:
    out = {k: getattr(args, k) for k in _OPTIONS if getattr(args, k, None) is not None}
    if getattr(args, "data", None) is not None:
        from .data.preferences import resolve_path

        out["dataset"] = str(resolve_path(args.data).resolve())
    if getattr(args, "profile", None) is not None:
        out["profile"] = args.profile
    return out


def run(args: argparse.Namespace) -> int:
    from .models import no_progress_bars

    with no_progress_bars(not getattr(args, "progress", True)):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from .runs import progress_callback, run_dir, train_run

    options = _config_args(args)
    cfg = check_settings(options, runs_root=args.runs_root)
    if args.dry_run:
        print(json.dumps({"run_dir": str(run_dir(cfg, root=args.runs_root)), "config": cfg.to_dict()}, indent=2))
        return 0
    callbacks = [progress_callback()] if getattr(args, "progress", True) else []
    result = train_run(force=args.force, root=args.runs_root, keep_checkpoints=args.keep_checkpoints,
                       callbacks=callbacks, tune=getattr(args, "tune", False), **options)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {result.run_dir}{' (cached)' if result.cached else ''}")
        if "tuning" in result.info:
            print(f"  tuned options {result.info['tuning']} (every grid point: {result.run_dir / 'tuning.csv'})")
        m = result.metrics
        for key in ("accuracy", "margin", "recall@1", "recall@3", "recall@5", "ndcg@1", "ndcg@3", "ndcg@5", "mrr"):
            if key in m:
                print(f"  {key:10s} {m[key]:.4f} +- {m.get(key + '_se', float('nan')):.4f}")
    return 0


def compare_methods(data, methods=("mass_dpo", "sdpo"), *, model: str = "smollm2", n: int = 3,
                    regime: str = "loglinear", seed: int = 0, steps: int = 30, root=None, **options):
    """Train each method on a preference file's train split (what ``mass-dpo train --data FILE`` runs) and evaluate
    it on the file's test split (:func:`mass_dpo.data.load_preferences`: its ``split`` column, or carved by a fixed
    seed). ``steps`` optimizer steps of 4 prompts (the log-linear regime's exact fit ignores them); ``options`` go
    to :func:`mass_dpo.runs.train_run`. One row per method: method, regime, n, steps, train/test prompt counts and
    the test metrics (accuracy, recall@k, ndcg@k, mrr, margin, each ``_se``). Progress output is kept out (one line
    per run in a notebook, none per update)."""
    import contextlib
    import io

    import pandas as pd

    from .data.preferences import load_preferences, resolve_path
    from .experiments.core import method_label
    from .runs import train_run

    path = str(resolve_path(data).resolve())
    train_prompts = len(load_preferences(path, split="train"))
    rows = []
    for method in methods:
        run_options = dict(dataset=path, model=model, method=method, n=n, regime=regime, seed=seed, max_steps=steps,
                           eval_limit=0, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                           save_steps=steps)
        run_options.update(options)
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            res = train_run(root=root, **run_options)
        rows.append({
            "method": method_label(method), "regime": res.config.regime, "n": res.config.n, "steps": steps,
            "train_prompts": train_prompts, "test_prompts": int(res.metrics.get("prompts", 0)),
            **{k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float)) and k != "prompts"},
        })
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
