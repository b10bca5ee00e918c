"""bf16 against fp32 extraction on CPU: time per pool and agreement of features, log-probs and selected subsets.

    python benchmarks/bf16.py [--datasets qasc lastfm medmcqa] [--pools 50] [--batch 4] [--n 3] [--threads N]

The same pools (``load_benchmark(name, "train", data_dir="samples", limit=pools)``) go through SmolLM2 loaded in
fp32 and in bf16, batch by batch and alternately (``mass_dpo.forward.shared_prefix_outputs``: one packed row per
pool, both poolings), so that the noise of a shared machine hits both. Printed per dataset:

- time: seconds per pool (mean and median over batches) and the ratio fp32 / bf16;
- features (each pooling): relative error ``||phi_bf16 - phi_fp32|| / ||phi_fp32||`` per candidate, the same for the
  differences ``phi_i - phi*`` that Algorithm 1 reads, and the cosine between ``phi_bf16`` and ``phi_fp32``;
- log-probs: ``|log pi_bf16 - log pi_fp32|`` (mean, max), the share of pools whose top-1 candidate by log-prob is the
  same, the share whose whole order by log-prob is the same, and the mean Spearman correlation per pool;
- selected subsets (each pooling): ``select_extracted(ex, n, strategy="dopt")`` on both extractions; the share of
  prompts with the same set of n negatives and with the same order.

The bf16 path pays off only on CPUs with native bf16 (``mass_dpo.models.cpu_has_native_bf16``: AMX or AVX512-BF16);
elsewhere bf16 is emulated and slower, and ``dtype: {cpu: auto}`` keeps fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def extract_both(bundles, records, batch: int):
    """Per dtype: ``(logps [P, C], {pooling: features [P, C, d]}, mask, lengths)``, and per dtype the seconds of each
    batch. The batches alternate between the dtypes (fp32 first on even batches, bf16 first on odd ones)."""
    from mass_dpo.data.formatting import encode_pool
    from mass_dpo.extraction import _pad_to
    from mass_dpo.forward import POOLINGS, shared_prefix_outputs

    tok = next(iter(bundles.values())).tokenizer
    pools = [encode_pool(r, tok) for r in records]
    C = max(len(cs) for _, cs in pools)
    out = {k: {"lp": [], "ft": {p: [] for p in POOLINGS}, "mask": [], "len": [], "s": []} for k in bundles}
    names = list(bundles)
    with torch.no_grad():
        for k in names:  # warm-up
            shared_prefix_outputs(bundles[k].model, pools[:1], poolings=POOLINGS)
        for b, lo in enumerate(range(0, len(pools), batch)):
            chunk = pools[lo : lo + batch]
            for k in names if b % 2 == 0 else names[::-1]:
                t = time.perf_counter()
                lp, ft, m, n = shared_prefix_outputs(bundles[k].model, chunk, poolings=POOLINGS)
                out[k]["s"].append((time.perf_counter() - t) / len(chunk))
                out[k]["lp"].append(_pad_to(lp, C))
                out[k]["mask"].append(_pad_to(m, C, False))
                out[k]["len"].append(_pad_to(n, C))
                for p in POOLINGS:
                    out[k]["ft"][p].append(_pad_to(ft[p], C))
    res = {}
    for k, o in out.items():
        res[k] = (torch.cat(o["lp"]), {p: torch.cat(v) for p, v in o["ft"].items()}, torch.cat(o["mask"]),
                  torch.cat(o["len"]), o["s"])
    return res


def as_extracted(records, lp, feats, mask, lengths, pooling):
    from mass_dpo.extraction import Extracted

    target = torch.tensor([int(r["target"]) for r in records], dtype=torch.long)
    return Extracted([str(r["id"]) for r in records], feats[pooling], lp, lp.clone(), mask, target,
                     {"pooling": pooling}, lengths)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1D tensors (ties broken by position)."""
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-12))


def compare(records, a, b, n: int) -> dict:
    """Agreement of extraction ``b`` (bf16) with ``a`` (fp32), both outputs of :func:`extract_both`."""
    from mass_dpo.forward import POOLINGS
    from mass_dpo.preprocess import select_extracted

    lp_a, ft_a, mask, len_a, s_a = a
    lp_b, ft_b, mask_b, len_b, s_b = b
    assert torch.equal(mask, mask_b) and torch.equal(len_a, len_b)
    P = mask.shape[0]
    tgt = torch.tensor([int(r["target"]) for r in records])
    res = {
        "pools": P, "candidates": int(mask.sum()),
        "fp32_s": statistics.mean(s_a), "bf16_s": statistics.mean(s_b),
        "fp32_s_median": statistics.median(s_a), "bf16_s_median": statistics.median(s_b),
    }
    res["time_ratio"] = res["fp32_s"] / res["bf16_s"]
    res["time_ratio_median"] = res["fp32_s_median"] / res["bf16_s_median"]
    d = (lp_a - lp_b).abs()[mask]
    res["logp_abs_mean"], res["logp_abs_max"] = float(d.mean()), float(d.max())
    neg_inf = torch.finfo(torch.float32).min
    la, lb = lp_a.masked_fill(~mask, neg_inf), lp_b.masked_fill(~mask, neg_inf)
    res["same_top1"] = float((la.argmax(1) == lb.argmax(1)).float().mean())
    res["same_order"] = float((la.argsort(dim=1, descending=True, stable=True)
                               == lb.argsort(dim=1, descending=True, stable=True)).all(1).float().mean())
    res["spearman_mean"] = statistics.mean(spearman(lp_a[i][mask[i]], lp_b[i][mask[i]]) for i in range(P))
    for p in POOLINGS:
        fa, fb = ft_a[p], ft_b[p]
        rel = ((fb - fa).norm(dim=-1) / fa.norm(dim=-1).clamp_min(1e-12))[mask]
        cos = F.cosine_similarity(fa, fb, dim=-1)[mask]
        rows = torch.arange(P)
        da, db = fa - fa[rows, tgt][:, None], fb - fb[rows, tgt][:, None]
        neg = mask.clone()
        neg[rows, tgt] = False
        drel = ((db - da).norm(dim=-1) / da.norm(dim=-1).clamp_min(1e-12))[neg]
        sel_a = select_extracted(as_extracted(records, lp_a, ft_a, mask, len_a, p), n, strategy="dopt")["indices"]
        sel_b = select_extracted(as_extracted(records, lp_b, ft_b, mask, len_b, p), n, strategy="dopt")["indices"]
        same_set = (sel_a.sort(1).values == sel_b.sort(1).values).all(1)
        res[p] = {
            "feature_rel_mean": float(rel.mean()), "feature_rel_max": float(rel.max()),
            "diff_rel_mean": float(drel.mean()), "diff_rel_max": float(drel.max()),
            "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
            "same_set": float(same_set.float().mean()), "same_order": float((sel_a == sel_b).all(1).float().mean()),
        }
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["qasc", "lastfm", "medmcqa"])
    ap.add_argument("--pools", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4, help="pools per forward")
    ap.add_argument("--n", type=int, default=3, help="negatives selected per prompt")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data-dir", default="samples")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mass_dpo.data import load_benchmark
    from mass_dpo.forward import POOLINGS
    from mass_dpo.models import cpu_has_native_bf16, load_model

    bundles = {k: load_model(args.model, device="cpu", dtype=k) for k in ("float32", "bfloat16")}
    native = cpu_has_native_bf16()
    print(f"bf16 benchmark: {args.model} on CPU ({platform.machine()}, native bf16: {'yes' if native else 'no'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}); {args.pools} train pools per dataset "
          f"({args.data_dir}), {args.batch} pools per forward, D-optimal n={args.n}", flush=True)
    results = {}
    for name in args.datasets:
        records = load_benchmark(name, "train", data_dir=args.data_dir, limit=args.pools).to_list()
        got = extract_both(bundles, records, args.batch)
        r = results[name] = compare(records, got["float32"], got["bfloat16"], args.n)
        print(f"\n{name}: {r['pools']} pools, {r['candidates']} candidates")
        print(f"  time s/pool   fp32 {r['fp32_s']:.3f} (median {r['fp32_s_median']:.3f})   bf16 {r['bf16_s']:.3f} "
              f"(median {r['bf16_s_median']:.3f})   fp32/bf16 {r['time_ratio']:.2f}x (medians "
              f"{r['time_ratio_median']:.2f}x)")
        print(f"  log-probs    |diff| mean {r['logp_abs_mean']:.3f} max {r['logp_abs_max']:.3f};  same top-1 "
              f"{r['same_top1']:.0%}, same order {r['same_order']:.0%} of pools; Spearman mean {r['spearman_mean']:.3f}")
        for p in POOLINGS:
            f = r[p]
            print(f"  {p:9s}    feature rel. err mean {f['feature_rel_mean']:.4f} max {f['feature_rel_max']:.4f};  "
                  f"phi_i - phi* rel. err mean {f['diff_rel_mean']:.3f} max {f['diff_rel_max']:.3f};  cosine min "
                  f"{f['cos_min']:.5f};  D-opt same set {f['same_set']:.0%}, same order {f['same_order']:.0%}",
                  flush=True)
        if args.json:  # after every dataset: a long run interrupted keeps what it measured
            Path(args.json).write_text(json.dumps({"native_bf16": native, "threads": torch.get_num_threads(),
                                                   "datasets": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
