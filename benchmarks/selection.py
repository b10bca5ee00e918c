"""Selection benchmark: Algorithm 1 as the paper writes it against the fast batched selector.

    python benchmarks/selection.py [--prompts 2000] [--big 20000] [--ref-prompts 20]

Both run in one process on the same random float32 inputs (N = 20 candidates, n = 5 negatives): the paper's
procedure (per prompt, d x d inverse kept by Sherman-Morrison, every candidate scored by v^T H^{-1} v; timed on a
subset of the prompts, since it is slow) and ``mass_dpo.select_negatives`` (N x N Gram matrix, incremental
Cholesky, batched). Prints prompts per second, their ratio, and whether the selections agree.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_selection import algorithm1  # noqa: E402  (the paper-as-written reference lives with the tests)

from mass_dpo import select_negatives  # noqa: E402


def make_inputs(B: int, N: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(B, N, d, generator=g)
    logits = torch.randn(B, N, generator=g) * 3
    return phi, logits


def bench(d: int, prompts: int, ref_prompts: int, N: int, n: int, beta: float, gamma: float) -> dict:
    phi, logits = make_inputs(prompts, N, d, seed=d)
    select_negatives(phi[:8], logits[:8], n, beta=beta, gamma=gamma)  # warm-up
    t0 = time.perf_counter()
    fast = select_negatives(phi, logits, n, beta=beta, gamma=gamma)
    t_fast = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref = [algorithm1(phi[b], logits[b], n, beta, gamma)[0] for b in range(ref_prompts)]
    t_ref = time.perf_counter() - t0
    agree = sum(ref[b] == fast.indices[b].tolist() for b in range(ref_prompts))
    return {
        "d": d,
        "fast_pps": prompts / t_fast,
        "ref_pps": ref_prompts / t_ref,
        "ratio": (prompts / t_fast) / (ref_prompts / t_ref),
        "agree": agree,
        "checked": ref_prompts,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=2000, help="prompts for the fast selector")
    p.add_argument("--ref-prompts", type=int, default=20, help="prompts for the slow reference (a subset)")
    p.add_argument("--big", type=int, default=20000, help="prompts for the one-shot large run at d = 3072 (0: skip)")
    p.add_argument("--dims", type=int, nargs="+", default=[576, 3072])
    p.add_argument("--N", type=int, default=20)
    p.add_argument("--n", type=int, default=5)
    args = p.parse_args(argv)
    beta, gamma = 0.1, 0.1

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; N={args.N}, n={args.n}, float32 inputs")
    print(f"{'d':>6} {'Algorithm 1 (prompts/s)':>24} {'fast (prompts/s)':>18} {'ratio':>9} {'agree':>9}")
    for d in args.dims:
        r = bench(d, args.prompts, args.ref_prompts, args.N, args.n, beta, gamma)
        print(f"{r['d']:>6} {r['ref_pps']:>24.1f} {r['fast_pps']:>18.1f} {r['ratio']:>8.0f}x "
              f"{r['agree']:>4}/{r['checked']}")
    if args.big:
        phi, logits = make_inputs(args.big, args.N, 3072, seed=1)
        t0 = time.perf_counter()
        sel = select_negatives(phi, logits, args.n, beta=beta, gamma=gamma)
        dt = time.perf_counter() - t0
        print(f"{args.big} prompts at d=3072: {dt:.2f} s with the fast selector "
              f"({args.big / dt:.0f} prompts/s; {int((sel.indices >= 0).sum())} negatives selected)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
