"""Why a dataset does not learn in the freeze regime: does the policy fit its training prompts, and does that carry
to unseen ones? (docs/training.md, "When the LM regime does not learn")

    MASS_DPO_DATA=../shared/data python scripts/fit_gain.py [--datasets qasc medmcqa lastfm] [--method sdpo]
                                                            [--limits 300 1000]

For each dataset, the learning rate is chosen by the written rule (``mass_dpo.runs.tune_config``: the cpu-lm grid on
the validation split; the test split is not read); the tuning run at that rate (seed 0, 300 training prompts, 2 epochs,
the top 2 blocks of SmolLM2-135M) is then ranked on every candidate of its training prompts and of the validation
prompts, by its log-prob, against the untrained model (``mass_dpo.runs.fit_gain``, paired per prompt). Each further
``--limits`` value trains the same run on that many training prompts (the same rate, the same 2 epochs: more steps),
the lever the paper's 20k prompts pull. Prints one Markdown table; every number is measured in this run.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    from mass_dpo.config import TrainConfig
    from mass_dpo.runs import fit_gain, train_run, tune_config
    from mass_dpo.tuning import scored_on, tuning_rule

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["qasc", "medmcqa", "lastfm"])
    parser.add_argument("--method", default="sdpo")
    parser.add_argument("--limits", nargs="+", type=int, default=[300],
                        help="training prompts; the learning rate is the rule's choice at the first")
    parser.add_argument("--runs-root", default=None)
    args = parser.parse_args(argv)
    rows = []
    for dataset in args.datasets:
        base = dict(profile="cpu-lm", dataset=dataset, method=args.method, n=3, limit=args.limits[0], eval_limit=150,
                    test_limit=300)
        tuned = tune_config(base, root=args.runs_root)
        for limit in args.limits:  # the first: the tuning run at the chosen rate (cached)
            run = train_run(TrainConfig(**{**tuned.config.to_dict(), **scored_on("freeze"), "limit": limit,
                                           "seed": tuning_rule().get("seed", 0)}), root=args.runs_root)
            for split in ("train", "valid"):
                g = fit_gain(run.run_dir, split)
                rows.append({"dataset": dataset, "limit": limit, "lr": tuned.config.learning_rate, **g})
                print(f"{dataset} {limit} prompts, {split}: MRR {g['mrr_init']:.3f} -> {g['mrr']:.3f}", flush=True)
    print(f"\n{args.method}, n = 3, freeze k = 2, learning rate by the rule; MRR of the log-prob ranking of every "
          "candidate, untrained -> trained, paired per prompt\n")
    print("| dataset | training prompts | lr | split | prompts | MRR untrained | MRR trained | gain | se | z |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        z = r["gain"] / r["se"] if r["se"] > 0 else float("nan")
        print(f"| {r['dataset']} | {r['limit']} | {r['lr']:g} | {r['split']} | {r['prompts']} | {100 * r['mrr_init']:.1f} | "
              f"{100 * r['mrr']:.1f} | {100 * r['gain']:+.1f} | {100 * r['se']:.1f} | {z:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
