"""Shared-prefix against naive extraction: tokens processed and wall time per LastFM pool (smollm2, CPU, fp32).

    python benchmarks/extraction.py [--pools 5] [--candidates 20] [--model smollm2] [--data-dir DIR] [--threads N]

Shared prefix: one packed row [prompt, cand_1, ..., cand_C] per pool with a block attention mask
(``mass_dpo.forward.shared_prefix_forward``). Naive: one row [prompt, cand_c] per candidate, the C rows of a pool
in one padded batch (``naive_forward``; logits only from the last prompt position on, so the LM head costs the same
in both). Tokens = real (non-padding) tokens fed to the model. Both give log-probs and features; the script checks
they agree (max abs difference) and prints the ratios. Target (issue 5): >= 8x fewer tokens, >= 5x less time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def lastfm_pools(n: int, candidates: int, data_dir: str | None):
    """``n`` LastFM validation records (the S-DPO prompts, 20 candidates each) from ``load_benchmark``."""
    from mass_dpo.data import load_benchmark

    folder = data_dir or (str(SHARED) if (SHARED / "lastfm").is_dir() else "samples")
    ds = load_benchmark("lastfm", "valid", data_dir=folder, limit=n, seed=0)
    return [dict(r, candidates=r["candidates"][:candidates]) for r in ds.to_list()], folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pools", type=int, default=5)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data-dir", default=None, help="default ../shared/data, else the shipped samples")
    ap.add_argument("--pooling", default="all", choices=("all", "response"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mass_dpo.data.formatting import encode_pool
    from mass_dpo.forward import naive_forward, shared_prefix_forward
    from mass_dpo.models import load_model

    bundle = load_model(args.model, device="cpu", dtype="float32")
    records, folder = lastfm_pools(args.pools, args.candidates, args.data_dir)
    pools = [encode_pool(r, bundle.tokenizer) for r in records]
    model = bundle.model

    rows = []
    with torch.no_grad():
        shared_prefix_forward(model, *pools[0], pooling=args.pooling)  # warm-up
        naive_forward(model, pools[0][0], pools[0][1][:2], pooling=args.pooling)
        for p, cs in pools:
            t = time.perf_counter()
            lp_s, ft_s = shared_prefix_forward(model, p, cs, pooling=args.pooling)
            t_shared = time.perf_counter() - t
            t = time.perf_counter()
            lp_n, ft_n = naive_forward(model, p, cs, pooling=args.pooling)
            t_naive = time.perf_counter() - t
            rows.append({
                "prompt_tokens": len(p),
                "candidate_tokens_mean": statistics.mean(len(c) for c in cs),
                "shared_tokens": len(p) + sum(len(c) for c in cs),
                "naive_tokens": sum(len(p) + len(c) for c in cs),
                "shared_s": t_shared,
                "naive_s": t_naive,
                "max_abs_logp": float((lp_s - lp_n).abs().max()),
                "max_abs_feature": float((ft_s - ft_n).abs().max()),
            })

    def mean(k):
        return statistics.mean(r[k] for r in rows)

    res = {
        "model": args.model, "pools": len(rows), "candidates": args.candidates, "pooling": args.pooling,
        "data": folder, "threads": torch.get_num_threads(),
        "prompt_tokens": mean("prompt_tokens"), "candidate_tokens": mean("candidate_tokens_mean"),
        "shared_tokens": mean("shared_tokens"), "naive_tokens": mean("naive_tokens"),
        "shared_s": mean("shared_s"), "naive_s": mean("naive_s"),
        "max_abs_logp": max(r["max_abs_logp"] for r in rows),
        "max_abs_feature": max(r["max_abs_feature"] for r in rows),
    }
    res["naive_s_median"] = statistics.median(r["naive_s"] for r in rows)
    res["shared_s_median"] = statistics.median(r["shared_s"] for r in rows)
    res["token_ratio"] = res["naive_tokens"] / res["shared_tokens"]
    res["time_ratio"] = res["naive_s"] / res["shared_s"]
    res["time_ratio_median"] = res["naive_s_median"] / res["shared_s_median"]  # robust to a shared, noisy CPU

    print(f"extraction benchmark: {args.model} on CPU (fp32, {res['threads']} threads), {len(rows)} LastFM pools of "
          f"{args.candidates} candidates ({folder}), pooling={args.pooling}")
    print(f"  prompt {res['prompt_tokens']:.0f} tokens, candidate {res['candidate_tokens']:.1f} tokens on average")
    print(f"  {'':14s}{'tokens/pool':>12s}{'s/pool mean':>13s}{'median':>9s}")
    print(f"  {'naive':14s}{res['naive_tokens']:12.0f}{res['naive_s']:13.3f}{res['naive_s_median']:9.3f}")
    print(f"  {'shared prefix':14s}{res['shared_tokens']:12.0f}{res['shared_s']:13.3f}{res['shared_s_median']:9.3f}")
    print(f"  ratio (naive / shared): tokens {res['token_ratio']:.1f}x, time {res['time_ratio']:.1f}x "
          f"(of medians {res['time_ratio_median']:.1f}x) (targets >= 8x and >= 5x)")
    print(f"  agreement: max |logp diff| {res['max_abs_logp']:.1e}, max |feature diff| {res['max_abs_feature']:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": res, "pools": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
