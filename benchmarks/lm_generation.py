"""Generation HitRatio@1 of a freeze-regime policy: plain ``generate`` against the shared lower-block prompt cache,
SmolLM2-135M on CPU, seconds per prompt and agreement of the replies.

    python benchmarks/lm_generation.py [--prompts 32] [--k 2] [--batch-sizes 8,32] [--reps 2] [--threads 2]

The policy: :class:`mass_dpo.frozen.FrozenTopPolicy` at k blocks with its top blocks perturbed (as training moves
them), so its replies differ from the base model's. Paths, each greedy with 20 new tokens on the same LastFM test
prompts (shipped sample), in the extraction dtype (bf16 on a CPU with native bf16, else fp32):

- ``plain``: ``model.generate`` of the policy's full model (:func:`mass_dpo.frozen.generation_model`);
- ``fast, first``: :func:`mass_dpo.frozen.hit_ratio` with an empty shared cache: the lower blocks' keys/values of the
  prompts are computed (once per batch of prompts, for every later policy), then the policy's top blocks, then decoding;
- ``fast, warm``: the same for another policy once the cache is there: what every run after the first pays;
- ``plain fp32``: ``generate`` of the float32 model, for scale.

Repetitions are interleaved (``plain``, ``fast`` in turn; the shared cache is emptied before each ``fast, first``).
Seconds are wall time and CPU time of this process (all its threads: ``time.process_time``); on a shared machine the
CPU time is the steadier measure of the work done.
Agreement: replies identical to ``plain`` at the same batch size, and ``plain`` at two batch sizes against each other
(in bf16, rounding depends on the batch shape, so greedy decoding differs a little between batch sizes too; in fp32
the fast path is exact: ``tests/test_frozen.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-fp32", dest="fp32", action="store_false")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mass_dpo import frozen
    from mass_dpo.data import load_benchmark
    from mass_dpo.generation import hit_ratio as plain_hit_ratio
    from mass_dpo.models import load_model

    bundle = load_model("smollm2", device="cpu")
    dtype = str(next(bundle.model.parameters()).dtype).replace("torch.", "")
    records = load_benchmark("lastfm", "test", data_dir="samples", limit=args.prompts, seed=0).to_list()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"lm_generation benchmark: smollm2 {dtype} on CPU ({os.uname().machine}, {args.threads} torch threads), "
          f"{args.prompts} LastFM test prompts, k = {args.k}, greedy, 20 new tokens; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)

    def policy(seed):
        p = frozen.FrozenTopPolicy(bundle.model, args.k, name="smollm2")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for w in p.parameters():
                w.add_(torch.randn(w.shape, generator=g) * 0.01 * w.abs().mean())
        return p

    first, second = policy(1), policy(2)
    model2 = frozen.generation_model(second)
    times: dict[tuple, list[float]] = {}
    cpu: dict[tuple, list[float]] = {}
    replies: dict[tuple, list[str]] = {}

    def timed(key, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.setdefault(key, []).append((time.perf_counter() - t0) / args.prompts)
        cpu.setdefault(key, []).append((time.process_time() - c0) / args.prompts)
        replies[key] = out["outputs"]

    for rep in range(args.reps):
        for bs in sizes:
            timed(("plain", bs), lambda: plain_hit_ratio(model2, bundle.tokenizer, records, batch_size=bs))
            frozen._LOWER.clear()
            timed(("fast, first", bs), lambda: frozen.hit_ratio(first, bundle.tokenizer, records, batch_size=bs))
            timed(("fast, warm", bs), lambda: frozen.hit_ratio(second, bundle.tokenizer, records, batch_size=bs))
        print(f"  rep {rep + 1}/{args.reps} (wall / CPU s per prompt): "
              + ", ".join(f"{k[0]} b{k[1]} {v[-1]:.3f}/{cpu[k][-1]:.3f}" for k, v in times.items()), flush=True)
    if args.fp32:
        full32 = frozen.generation_model(second).float()
        for bs in sizes:
            timed(("plain fp32", bs), lambda: plain_hit_ratio(full32, bundle.tokenizer, records, batch_size=bs))

    print()
    print(f"| path | batch | wall s / prompt | CPU s / prompt | CPU vs plain {dtype} | replies equal to plain "
          f"{dtype} |")
    print("|---|---|---|---|---|---|")
    for (path, bs), ts in times.items():
        med, c = statistics.median(ts), statistics.median(cpu[(path, bs)])
        base = statistics.median(cpu[("plain", bs)])
        same = sum(a == b for a, b in zip(replies[(path, bs)], replies[("plain", bs)]))
        agree = "-" if path == "plain" else ("(another policy)" if path == "fast, first" else f"{same}/{args.prompts}")
        print(f"| {path} | {bs} | {med:.3f} | {c:.3f} | {c / base:.2f}x | {agree} |")
    if len(sizes) > 1:
        a, b = replies[("plain", sizes[0])], replies[("plain", sizes[-1])]
        print(f"\nplain {dtype}, batch {sizes[0]} against batch {sizes[-1]}: {sum(x == y for x, y in zip(a, b))}/"
              f"{args.prompts} replies equal")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
