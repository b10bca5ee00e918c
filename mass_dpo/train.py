"""``mass-dpo train``: one training run and its test metrics (see :func:`mass_dpo.runs.train_run`).

    mass-dpo train --dataset lastfm --model smollm2 --method mass_dpo --n 3 --regime loglinear --seed 0
    accelerate launch -m mass_dpo.train --dataset lastfm --model llama3 --method sdpo --regime full

Options left out take their value from ``params/training.yaml`` (``defaults``, the regime's section, then
``--profile``'s). The run folder is printed; a finished run with the same resolved config is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .losses import METHODS
from .training import REGIMES

#: Options forwarded to the config as they are (flag -> TrainConfig field, type).
_OPTIONS = {
    "dataset": str, "model": str, "method": str, "n": int, "beta": float, "regime": str, "seed": int,
    "data_dir": str, "limit": int, "eval_limit": int, "test_limit": int, "pooling": str, "selection_score": str,
    "learning_rate": float, "num_train_epochs": float, "max_steps": int, "per_device_train_batch_size": int,
    "gradient_accumulation_steps": int, "eval_steps": float, "logging_steps": float, "save_steps": float,
    "score": str, "optim": str,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--dataset", help="lastfm, movielens, medmcqa or qasc")
    g.add_argument("--model", help="tiny, smollm2, llama3, qwen3, smollm3, or a saved model folder")
    g.add_argument("--method", choices=METHODS)
    g.add_argument("--n", type=int, help="negatives per prompt (dpo: always 1)")
    g.add_argument("--beta", type=float)
    g.add_argument("--regime", choices=REGIMES)
    g.add_argument("--seed", type=int)
    g.add_argument("--profile", help="a profile of params/training.yaml (cpu, smoke, paper)")
    d = parser.add_argument_group("data")
    d.add_argument("--data-dir", dest="data_dir", help="benchmark folder ('samples': the shipped samples)")
    d.add_argument("--limit", type=int, help="training prompts")
    d.add_argument("--eval-limit", dest="eval_limit", type=int, help="online-eval prompts (0: none)")
    d.add_argument("--test-limit", dest="test_limit", type=int, help="test prompts")
    d.add_argument("--pooling", choices=("all", "response"))
    d.add_argument("--selection-score", dest="selection_score", choices=("delta", "reference", "offset"),
                   help="reading of the preprocessing score of Algorithm 1 (docs/extraction.md; default reference)")
    o = parser.add_argument_group("optimisation")
    o.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float)
    o.add_argument("--epochs", dest="num_train_epochs", type=float)
    o.add_argument("--max-steps", dest="max_steps", type=int)
    o.add_argument("--batch-size", dest="per_device_train_batch_size", type=int, help="per device")
    o.add_argument("--grad-accum", dest="gradient_accumulation_steps", type=int)
    o.add_argument("--eval-steps", dest="eval_steps", type=float)
    o.add_argument("--logging-steps", dest="logging_steps", type=float)
    o.add_argument("--save-steps", dest="save_steps", type=float)
    o.add_argument("--optim", help="a transformers optimizer name (default: paged_adamw_32bit or adamw_torch)")
    e = parser.add_argument_group("evaluation")
    e.add_argument("--score", choices=("logp", "reward"), help="test ranking score")
    r = parser.add_argument_group("run folder")
    r.add_argument("--runs-root", dest="runs_root", help="default: $MASS_DPO_RUNS or <cache>/runs")
    r.add_argument("--force", action="store_true", help="retrain even if a finished run exists")
    r.add_argument("--keep-checkpoints", action="store_true")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and run folder, train nothing")


def _config_args(args: argparse.Namespace) -> dict:
    out = {k: getattr(args, k) for k in _OPTIONS if getattr(args, k, None) is not None}
    if getattr(args, "profile", None):
        out["profile"] = args.profile
    return out


def run(args: argparse.Namespace) -> int:
    from .runs import run_dir, train_run
    from .training import resolve_config

    options = _config_args(args)
    if args.dry_run:
        cfg = resolve_config(**options)
        print(json.dumps({"run_dir": str(run_dir(cfg, root=args.runs_root)), "config": cfg.to_dict()}, indent=2))
        return 0
    result = train_run(force=args.force, root=args.runs_root, keep_checkpoints=args.keep_checkpoints, **options)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {result.run_dir}{' (cached)' if result.cached else ''}")
        m = result.metrics
        for key in ("accuracy", "margin", "recall@1", "recall@3", "recall@5", "ndcg@1", "ndcg@3", "ndcg@5", "mrr"):
            if key in m:
                print(f"  {key:10s} {m[key]:.4f} +- {m.get(key + '_se', float('nan')):.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mass-dpo train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
