"""What a (dataset, method) of the cpu-lm grids costs in training steps and online evaluations, before and after
tuning runs stopped evaluating while they train and an evaluation stopped scoring the own negatives twice.

    MASS_DPO_DATA=../shared/data python benchmarks/lm_eval.py [--datasets qasc lastfm] [--reps 3] [--steps 6]

For each dataset, the run of the cpu-lm profile (SmolLM2-135M, freeze regime, S-DPO, n = 3, 300 training and 150
online-eval prompts, whole-pool curves on) is prepared once (extraction cached) and, in every repetition, in a
rotated order:

- ``step``: seconds per optimizer step (``--steps`` steps of the Trainer, no evaluation);
- ``own``: one online evaluation on each method's own negatives alone (a forward over the records);
- ``own + pool``: the evaluation as it was with whole-pool curves: that forward, then every candidate of every pool;
- ``shared``: the evaluation now: every candidate of every pool once, the own negatives read from those scores.

A (dataset, method) trains two tuning runs (the grid's two learning rates) and two final runs (seeds 0 and 1), each
``S`` steps with ``E`` online evaluations (the profile's: 76 steps, 11 evaluations). Before: tuning runs
``S step + E own``, final runs ``S step + E (own + pool)``. Now: tuning runs ``S step`` (``online_eval`` off),
final runs ``S step + E shared``. The printed ratio is before / now of that sum, from the medians of this one run
(the test evaluation, the same before and after, is left out).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(dataset: str, reps: int, steps: int) -> dict:
    from transformers.trainer_utils import IntervalStrategy

    from mass_dpo.config import resolve_config
    from mass_dpo.runs import prepare_data
    from mass_dpo.training import PoolEval, build_trainer

    cfg = resolve_config(profile="cpu-lm", dataset=dataset, method="sdpo", n=3, seed=0, limit=300, eval_limit=150,
                         learning_rate=1e-3, pool_eval=True)
    data = prepare_data(cfg)
    pe = data.pool_eval
    forward_pool = PoolEval(pe.score, pe.ref_logps, pe.mask, pe.target, beta=pe.beta)  # no records: a forward
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, data.policy, data.train, data.eval, output_dir=tmp, pool_eval=pe)
        run_steps = math.ceil(len(data.train) / (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps)
                              ) * int(cfg.num_train_epochs)
        evals = 1 + round(1 / cfg.eval_steps)  # step 0 and every eval_steps fraction

        def train():
            trainer.args.max_steps, trainer.args.eval_strategy = steps, IntervalStrategy.NO
            trainer.train()

        def evaluate(pool):
            trainer.pool_eval = pool
            trainer.evaluate()

        kinds = {"step": train, "own": lambda: evaluate(None), "own + pool": lambda: evaluate(forward_pool),
                 "shared": lambda: evaluate(pe)}
        times = {k: [] for k in kinds}
        names = list(kinds)
        for rep in range(reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                times[name].append(_timed(kinds[name]) / (steps if name == "step" else 1))
            print(f"  {dataset} rep {rep + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                  flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    before = 2 * (run_steps * med["step"] + evals * med["own"]) + 2 * (run_steps * med["step"]
                                                                        + evals * med["own + pool"])
    now = 2 * run_steps * med["step"] + 2 * (run_steps * med["step"] + evals * med["shared"])
    return {"dataset": dataset, "pool": int(pe.mask.shape[1]), "steps": run_steps, "evals": evals, **med,
            "before": before, "now": now}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["qasc", "lastfm"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"lm_eval benchmark: smollm2, cpu-lm profile (freeze, k=2, S-DPO n=3), {torch.get_num_threads()} threads, "
          f"{args.reps} reps, medians")
    rows = [measure(d, args.reps, args.steps) for d in args.datasets]
    print(f"{'dataset':<10}{'pool':>5}{'step s':>8}{'own s':>7}{'own+pool s':>11}{'shared s':>9}"
          f"{'before s':>10}{'now s':>8}{'before/now':>11}")
    for r in rows:
        print(f"{r['dataset']:<10}{r['pool']:>5}{r['step']:>8.2f}{r['own']:>7.2f}{r['own + pool']:>11.2f}"
              f"{r['shared']:>9.2f}{r['before']:>10.0f}{r['now']:>8.0f}{r['before'] / r['now']:>10.2f}x")
    print(f"(per dataset and method: 2 tuning + 2 final runs of {rows[0]['steps']} steps, {rows[0]['evals']} online "
          "evaluations in each final run, and before the change in each tuning run too)")


if __name__ == "__main__":
    main()
