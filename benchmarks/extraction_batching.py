"""Extraction over a dataset: batches in data order against longest-first batches over a shared prompt prefix.

    python benchmarks/extraction_batching.py [--pools 64] [--datasets medmcqa qasc lastfm movielens]
        [--model smollm2] [--data-dir DIR] [--split train] [--repeats 2] [--json PATH]

Both sides pack one row per pool (``mass_dpo.forward.shared_prefix_outputs``) and group rows into forwards of at
most ``DEFAULT_BATCH_TOKENS`` tokens, as ``extract`` does over one cache shard (64 pools). Before: the rows in the
dataset's order, every prompt computed whole (the loop of ``_forward_pools`` until 2026-12-05). After:
``_forward_pools`` itself, rows longest first (less padding) and the prompts' common token prefix (chat template
system turn and the instruction's opening) computed once and attended to as a key/value cache by every batch.
The two sides alternate ``--repeats`` times per dataset; the ratio is of the fastest of each. Tokens = the padded
tokens fed to the decoder. The script checks that the two agree (max abs difference of log-probs and features).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@torch.no_grad()
def data_order(model, pools, pad_id):
    """The rows in data order, no prefix reuse: ``(logps [N, C], {pooling: features}, padded tokens)``."""
    from mass_dpo import extraction as X
    from mass_dpo import forward as FW

    rows, where = X.split_rows(pools, X.DEFAULT_BATCH_TOKENS)
    assert len(rows) == len(pools), "a pool over DEFAULT_BATCH_TOKENS: use shorter pools"
    C = max(len(cs) for _, cs in pools)
    logps, feats, tokens = torch.zeros(len(pools), C), {p: None for p in FW.POOLINGS}, 0
    for idx in X._batches(rows, X.DEFAULT_BATCH_TOKENS, longest_first=False):
        batch = [rows[j] for j in idx]
        tokens += len(batch) * max(FW.row_tokens(r) for r in batch)
        lp, ft, *_ = FW._shared_prefix(model, batch, poolings=FW.POOLINGS, pad_id=pad_id)
        for b, j in enumerate(idx):
            k = len(rows[j][1])
            logps[j, :k] = lp[b, :k]
            for p in FW.POOLINGS:
                if feats[p] is None:
                    feats[p] = torch.zeros(len(pools), C, ft[p].shape[-1])
                feats[p][j, :k] = ft[p][b, :k]
    return logps, feats, tokens


def longest_first(model, pools, pad_id):
    """``_forward_pools`` as ``extract`` runs it: ``(logps, {pooling: features}, padded tokens)``."""
    from mass_dpo import extraction as X
    from mass_dpo import forward as FW

    rows, _ = X.split_rows(pools, X.DEFAULT_BATCH_TOKENS)
    K = len(FW.common_prompt_prefix(pools))
    tokens = K  # the prefix, once
    for idx in X._batches(rows, X.DEFAULT_BATCH_TOKENS):
        tokens += len(idx) * (max(FW.row_tokens(rows[j]) for j in idx) - K)
    logps, feats, *_ = X._forward_pools(model, pools, poolings=FW.POOLINGS, batch_tokens=X.DEFAULT_BATCH_TOKENS,
                                        pad_id=pad_id)
    return logps, feats, tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pools", type=int, default=64, help="pools per dataset (64 = one cache shard)")
    ap.add_argument("--datasets", nargs="+", default=["medmcqa", "qasc", "lastfm", "movielens"])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data-dir", default=None, help="default ../shared/data, else the shipped samples")
    ap.add_argument("--split", default="train")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mass_dpo import extraction as X
    from mass_dpo import forward as FW
    from mass_dpo.data import load_benchmark
    from mass_dpo.models import load_model

    bundle = load_model(args.model, device="cpu")
    dtype = str(next(bundle.model.parameters()).dtype).replace("torch.", "")
    folder = args.data_dir or (str(SHARED) if SHARED.is_dir() else "samples")
    pad = X._pad_id(bundle.tokenizer)
    print(f"extraction batching benchmark: {args.model} on CPU ({dtype}, {torch.get_num_threads()} threads), "
          f"{args.pools} {args.split} pools per dataset ({folder}), both poolings, {args.repeats} alternating repeats")
    print(f"  {'dataset':10s}{'prefix':>7s}{'tokens before':>15s}{'after':>8s}{'s before':>10s}{'after':>8s}"
          f"{'time ratio':>12s}{'max |dlogp|':>13s}{'max |dfeat|':>13s}")
    results = []
    for name in args.datasets:
        try:
            ds = load_benchmark(name, args.split, data_dir=folder, limit=args.pools, seed=0)
        except (FileNotFoundError, ValueError) as e:
            print(f"  {name:10s}skipped: {str(e).splitlines()[0]}")
            continue
        pools, _ = X.encode_records(ds.to_list(), bundle.tokenizer)
        times = {"before": [], "after": []}
        for _ in range(args.repeats):
            for side, fn in (("before", data_order), ("after", longest_first)):
                t = time.perf_counter()
                out = fn(bundle.model, pools, pad)
                times[side].append(time.perf_counter() - t)
                if side == "before":
                    before = out
                else:
                    after = out
        dlogp = float((before[0] - after[0]).abs().max())
        dfeat = max(float((before[1][p] - after[1][p]).abs().max()) for p in FW.POOLINGS)
        r = {"dataset": name, "pools": len(pools), "prefix_tokens": len(FW.common_prompt_prefix(pools)),
             "tokens_before": before[2], "tokens_after": after[2], "s_before": min(times["before"]),
             "s_after": min(times["after"]), "max_abs_logp": dlogp, "max_abs_feature": dfeat}
        r["time_ratio"] = r["s_before"] / r["s_after"]
        results.append(r)
        print(f"  {name:10s}{r['prefix_tokens']:7d}{r['tokens_before']:15d}{r['tokens_after']:8d}"
              f"{r['s_before']:10.1f}{r['s_after']:8.1f}{r['time_ratio']:11.2f}x{dlogp:13.1e}{dfeat:13.1e}", flush=True)
    if results:
        total = sum(r["s_before"] for r in results) / sum(r["s_after"] for r in results)
        print(f"  all datasets: time ratio {total:.2f}x (before / after, sum of the fastest repeats)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
