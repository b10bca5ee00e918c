"""The learner's levers on the cpu profile's cached features (docs/training.md, "Levers, measured").

    python scripts/levers.py [--datasets qasc lastfm medmcqa] [--runs-root DIR]

S-DPO with the full pool, scored on the VALIDATION split (the test split is not read): the exact fit against the
Trainer's Adam path (the first CPU default: lr 0.1, 3 epochs, no ridge), response against all-token pooling, and the
number of training prompts. Prints one Markdown table; every number is measured in this run.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    from mass_dpo.experiments import FULL_POOL
    from mass_dpo.runs import reference_run, train_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["qasc", "lastfm", "medmcqa"])
    parser.add_argument("--runs-root", default=None)
    parser.add_argument("--limits", nargs="+", type=int, default=[250, 500, 1000])
    args = parser.parse_args(argv)
    base = dict(model="smollm2", regime="loglinear", method="sdpo", n=FULL_POOL, data_dir="samples", eval_limit=200,
                test_limit=500, test_split="valid", seed=0)
    levers = [("exact fit, response pooling, ridge 1e-3", dict(pooling="response", ridge=1e-3)),
              ("exact fit, all-token pooling, ridge 1e-3", dict(pooling="all", ridge=1e-3)),
              ("exact fit, all-token pooling, ridge 1e-4", dict(pooling="all", ridge=1e-4)),
              ("Adam (Trainer), response pooling, lr 0.1, 3 epochs", dict(pooling="response", fit="adam")),
              ("Adam (Trainer), all-token pooling, lr 0.1, 3 epochs", dict(pooling="all", fit="adam"))]
    print("| dataset | lever | training prompts | valid R@1 (%) | valid MRR (%) | fit seconds |")
    print("|---|---|---|---|---|---|")
    for ds in args.datasets:
        ref = reference_run(dict(base, dataset=ds, limit=1000), root=args.runs_root).metrics
        print(f"| {ds} | untrained reference (theta = 0) | - | {100 * ref['recall@1']:.1f} ± {100 * ref['recall@1_se']:.1f} "
              f"| {100 * ref['mrr']:.1f} ± {100 * ref['mrr_se']:.1f} | - |", flush=True)
        runs = [(label, dict(opts, limit=1000)) for label, opts in levers]
        runs += [("exact fit, response pooling, ridge 1e-3", dict(pooling="response", ridge=1e-3, limit=k))
                 for k in args.limits if k != 1000]
        for label, opts in runs:
            res = train_run(dict(base, dataset=ds, **opts), root=args.runs_root)
            m = res.metrics
            seconds = f"{res.info['seconds']['train']:.1f}" + (" (when first trained: a cached run)" if res.cached else "")
            print(f"| {ds} | {label} | {opts['limit']} | {100 * m['recall@1']:.1f} ± {100 * m['recall@1_se']:.1f} | "
                  f"{100 * m['mrr']:.1f} ± {100 * m['mrr_se']:.1f} | {seconds} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
