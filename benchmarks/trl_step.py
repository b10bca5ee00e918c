"""One training step against the peer: the package's shared-prompt S-DPO step, TRL's ``DPOTrainer`` on the expanded
pairs, and one row per response, side by side in one process (SmolLM2-135M, fp32, CPU, 1 thread by default).

    python benchmarks/trl_step.py [--prompts 3] [--cell-seconds 60] [--ns 3 7 19] [--lengths 5 50 200]
                                  [--trl-scores completions|all] [--threads 1] [--json PATH]

Needs TRL (``pip install -e ".[trl]"``). A step is one prompt with its chosen response and ``n`` negatives: forward,
backward and one AdamW update (lr 1e-6) of every weight, with gradient checkpointing (TRL's default, the package's
for the LM regimes), the reference log-probs computed beforehand (the same numbers on every path), one prompt per
micro-batch:

- **shared prompt** (MASS-DPO / S-DPO in this package): ``mass_dpo.training.pool_logps`` (one packed row
  ``[prompt, chosen, neg_1, ..., neg_n]`` with a block attention mask) and ``preference_loss("sdpo")``;
- **one row per response** (S-DPO's own layout): the same loss through ``pool_logps(..., forward=naive_forward)``:
  the ``1 + n`` rows ``[prompt, response]`` in one padded forward;
- **TRL on pairs**: what a TRL user does to train on ``n`` negatives: the ``n`` (chosen, negative) pairs in TRL's
  conversational form, tokenized by TRL (SmolLM2's chat template), as one batch: TRL's collator (``2n`` rows) and
  ``DPOTrainer.compute_loss`` (sigmoid DPO) with ``precompute_ref_log_probs`` (the batch carries
  ``ref_chosen_logps`` / ``ref_rejected_logps``: the reference log-probs of our paths, which differ from TRL's own
  by the newline TRL scores after the end-of-turn token; the time does not depend on them), then the same backward
  and update.
  TRL 1.16's fused LM head scores only the completion positions on CUDA/XPU (Triton) but every position, the
  prompt's included, elsewhere: ``--trl-scores completions`` (default) forces the first on the CPU, so that the
  comparison is of the layouts, as on a GPU; ``--trl-scores all`` measures TRL as it runs on a CPU.

Prompts: the first ``--prompts`` LastFM validation prompts of the shipped sample (S-DPO's prompts, ~170 tokens with
the chat template), the chosen response and the first ``n`` of its 19 negatives. Response lengths: ``5`` is the real
one (artist names, ~4 tokens with the end-of-turn token); a longer length ``L`` is synthetic: the response's own text
repeated (``"name, name, ..."``), cut to ``L - 1`` tokens and decoded back to text (the end-of-turn token makes ``L``).

Interleaving: for each (n, length) cell, repetition r runs the three paths on prompt r, in an order rotated at every
repetition and cell, so that the load of a shared machine hits every path alike; a cell gets another repetition
(another prompt) while its steps have taken less than ``--cell-seconds`` CPU seconds in all, up to ``--prompts``. Ratios are
taken per repetition (same prompt, same moment) and their median reported. Time is the CPU time of the process
during the step (``time.process_time``; with one torch thread, the step's compute, which other jobs on a shared
machine disturb far less than its wall time), the wall time beside it.
Memory is the peak resident memory (``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs``
just before the step, after ``gc.collect()`` and glibc's ``malloc_trim``) above the resident memory just before the
step: what the step adds to a process that already holds the weights, their gradients (kept allocated between
steps) and the AdamW states, i.e. activations, masks, logits and their gradients; the median over repetitions. The
table is printed in Markdown for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PATHS = ("shared", "rows", "trl")
LABELS = {"shared": "shared prompt (S-DPO)", "rows": "row per response", "trl": "TRL DPOTrainer, pairs"}
BETA = 0.1


# ---------------------------------------------------------------- memory of this process


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def _trim() -> None:
    """Return freed heap memory to the system (glibc), so that the resident size is what is alive."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def measured(step) -> tuple[float, float, float]:
    """(CPU seconds, wall seconds, MiB added at the peak over the resident memory just before) of ``step()``."""
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident size, to the current one
    before = _status_mib("VmRSS")
    c0, t0 = time.process_time(), time.perf_counter()
    step()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return cpu, wall, _status_mib("VmHWM") - before


# ---------------------------------------------------------------- data


def lastfm_records(k: int, data_dir: str) -> list[dict]:
    """The first ``k`` LastFM validation records (20 candidates each), the chosen response first."""
    from mass_dpo.data import load_benchmark

    out = []
    for r in load_benchmark("lastfm", "valid", data_dir=data_dir).to_list()[:k]:
        t = int(r["target"])
        out.append({"id": r["id"], "prompt": r["prompt"],
                    "candidates": [r["candidates"][t]] + [c for i, c in enumerate(r["candidates"]) if i != t],
                    "target": 0})
    return out


def stretch(text: str, length: int, tokenizer) -> str:
    """``text`` repeated (``"text, text, ..."``) and cut to ``length - 1`` tokens (the end-of-turn token is the
    last one); ``length <= 5`` keeps the real response."""
    if length <= 5:
        return text
    repeats, ids = 1, []
    while len(ids) < length - 1:
        repeats *= 2
        ids = tokenizer(", ".join([text] * repeats), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[: length - 1]).strip()


def cell_records(records: list[dict], n: int, length: int, tokenizer) -> list[dict]:
    """Each record with its chosen response and first ``n`` negatives, at response length ``length``."""
    return [dict(r, candidates=[stretch(c, length, tokenizer) for c in r["candidates"][: 1 + n]]) for r in records]


def trl_rows(records: list[dict], cell: str) -> list[dict]:
    """The (chosen, negative) pairs of each record in TRL's conversational form."""
    bot = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    return [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": bot(r["candidates"][0]),
             "rejected": bot(neg), "cell": cell, "index": i}
            for i, r in enumerate(records) for neg in r["candidates"][1:]]


# ---------------------------------------------------------------- the three steps


def build(model_name: str, records: list[dict], ns: list[int], lengths: list[int], out_dir: str):
    """The model (gradient checkpointing on, train mode), one AdamW optimizer, a ``DPOTrainer`` and, per (n, length)
    cell, our pools and TRL's tokenized pairs (TRL's own ``_prepare_dataset``, what its ``__init__`` runs on a
    ``train_dataset``: the chat template, then the prompt / completion ids)."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    from mass_dpo.data.formatting import encode_pool
    from mass_dpo.models import load_model

    bundle = load_model(model_name, device="cpu", dtype="float32")
    model, tok = bundle.model, bundle.tokenizer
    cells, pairs = {}, []
    for n in ns:
        for length in lengths:
            name = f"n{n}-L{length}"
            recs = cell_records(records, n, length, tok)
            cells[name] = {"n": n, "length": length, "pools": [encode_pool(r, tok) for r in recs],
                           "refs": {}, "mask": torch.ones(1, 1 + n, dtype=torch.bool)}
            pairs += trl_rows(recs, name)
    # precompute_ref_log_probs: TRL's step reads the reference log-probs from the batch, as ours do (TRL computes them
    # at construction, here on one pair; the benchmark's pairs get the reference log-probs our paths use)
    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=1, precompute_ref_log_probs=True, beta=BETA,
                     bf16=False, use_cpu=True, gradient_checkpointing=True, report_to="none", disable_tqdm=True,
                     save_strategy="no", dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(pairs[:1]),
                         processing_class=tok)
    tokenized = trainer._prepare_dataset(datasets.Dataset.from_list(pairs), tok, args, "benchmark")
    for e in tokenized:
        cells[e["cell"]].setdefault("trl", [[] for _ in records])[e["index"]].append(
            {k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    return model, opt, trainer, cells


def prepare(model, trainer, cell: dict, i: int) -> None:
    """The reference log-probs of prompt ``i`` of ``cell`` (the model before its steps, no gradient), and TRL's
    collated batch of its ``n`` pairs carrying them."""
    from mass_dpo.training import pool_logps

    if i in cell["refs"]:
        return
    p, c = cell["pools"][i]
    was = model.training
    model.eval()
    with torch.no_grad():
        ref = pool_logps(model, [p], [c], cell["mask"])  # [1, 1 + n], chosen first
    model.train(was)
    cell["refs"][i] = ref
    examples = [dict(e, ref_chosen_logps=float(ref[0, 0]), ref_rejected_logps=float(ref[0, 1 + k]))
                for k, e in enumerate(cell["trl"][i])]
    cell.setdefault("batches", {})[i] = trainer.data_collator(examples)


def steps(model, opt, trainer, cell: dict, i: int) -> dict:
    """The three steps on prompt ``i`` of ``cell`` (each: zero the gradients, loss, backward, AdamW update)."""
    from mass_dpo.forward import naive_forward
    from mass_dpo.losses import preference_loss
    from mass_dpo.training import pool_logps

    prepare(model, trainer, cell, i)
    (p, c), ref, mask = cell["pools"][i], cell["refs"][i], cell["mask"]

    def ours(forward):
        def step():
            opt.zero_grad(set_to_none=False)
            lp = pool_logps(model, [p], [c], mask, forward=forward)
            preference_loss("sdpo", lp[:, 0], lp[:, 1:], ref[:, 0], ref[:, 1:], beta=BETA).loss.mean().backward()
            opt.step()
        return step

    def trl_step():
        opt.zero_grad(set_to_none=False)
        trainer.compute_loss(model, cell["batches"][i]).backward()  # TRL's sigmoid DPO, mean over the n pairs
        opt.step()

    return {"shared": ours(None), "rows": ours(naive_forward), "trl": trl_step}


def tokens_fed(cell: dict, i: int) -> dict:
    """Real (non-padding) tokens each path feeds the model for prompt ``i``."""
    p, c = cell["pools"][i]
    batch = cell["batches"][i]
    return {"shared": len(p) + sum(map(len, c)), "rows": sum(len(p) + len(x) for x in c),
            "trl": int(batch["attention_mask"].sum())}


# ---------------------------------------------------------------- run, summarise


def run(args) -> dict:
    records = lastfm_records(args.prompts, args.data_dir)
    t_start = time.perf_counter()
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as out_dir:
        model, opt, trainer, cells = build(args.model, records, args.ns, args.lengths, out_dir)
        t_setup = time.perf_counter() - t_start
        first = next(iter(cells.values()))
        for fn in steps(model, opt, trainer, first, 0).values():  # warm-up: AdamW states, gradients, first calls
            fn()
        results = []
        for k, (name, cell) in enumerate(cells.items()):
            runs = {path: [] for path in PATHS}
            spent, reps = 0.0, 0
            while reps < len(records) and (reps == 0 or spent < args.cell_seconds):
                fns = steps(model, opt, trainer, cell, reps)
                order = PATHS[(reps + k) % 3:] + PATHS[: (reps + k) % 3]
                for path in order:
                    runs[path].append(measured(fns[path]))
                    spent += runs[path][-1][0]
                load.append(os.getloadavg()[0])
                print(f"  {name} prompt {reps}: " + ", ".join(
                    f"{p} {runs[p][-1][0]:.2f} s CPU ({runs[p][-1][1]:.2f} s wall) {runs[p][-1][2]:.0f} MiB"
                    for p in PATHS), flush=True)
                reps += 1
            fed = [tokens_fed(cell, r) for r in range(reps)]
            results.append({
                "cell": name, "n": cell["n"], "length": cell["length"], "repetitions": reps,
                "prompt_tokens": statistics.mean(len(cell["pools"][r][0]) for r in range(reps)),
                "response_tokens": statistics.mean(len(x) for r in range(reps) for x in cell["pools"][r][1]),
                "tokens": {p: statistics.mean(f[p] for f in fed) for p in PATHS},
                "cpu_seconds": {p: [x[0] for x in runs[p]] for p in PATHS},
                "wall_seconds": {p: [x[1] for x in runs[p]] for p in PATHS},
                "mib": {p: [x[2] for x in runs[p]] for p in PATHS},
                "ratio": {p: statistics.median(runs[p][r][0] / runs["shared"][r][0] for r in range(reps))
                          for p in ("rows", "trl")},
                "wall_ratio": {p: statistics.median(runs[p][r][1] / runs["shared"][r][1] for r in range(reps))
                               for p in ("rows", "trl")},
            })
            for c in cell["batches"].values():  # free the cell's batches
                c.clear()
    import transformers
    import trl

    return {
        "model": args.model, "threads": torch.get_num_threads(), "prompts": len(records), "data": args.data_dir,
        "cell_seconds": args.cell_seconds, "trl_scores": args.trl_scores,
        "beta": BETA, "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average": [min(load), max(load)],
        "setup_seconds": t_setup, "total_seconds": time.perf_counter() - t_start,
        "base_rss_gib": _status_mib("VmRSS") / 1024, "cells": results,
    }


def markdown(res: dict) -> str:
    """The table of ``docs/benchmarks.md``: per cell the median CPU seconds and MiB added per path, and the median
    ratios to the shared prompt (CPU time; wall time in parentheses)."""
    med = statistics.median
    lines = [
        "| n | response tokens | prompts | tokens fed: shared / rows / TRL | CPU s: shared / rows / TRL | "
        "rows / shared (wall) | TRL / shared (wall) | MiB added: shared / rows / TRL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cells"]:
        t, s, m, r, w = c["tokens"], c["cpu_seconds"], c["mib"], c["ratio"], c["wall_ratio"]
        lines.append(
            f"| {c['n']} | {c['response_tokens']:.0f} | {c['repetitions']} | {t['shared']:.0f} / {t['rows']:.0f} / "
            f"{t['trl']:.0f} | {med(s['shared']):.2f} / {med(s['rows']):.2f} / {med(s['trl']):.2f} | "
            f"{r['rows']:.1f}x ({w['rows']:.1f}x) | {r['trl']:.1f}x ({w['trl']:.1f}x) | "
            f"{med(m['shared']):.0f} / {med(m['rows']):.0f} / {med(m['trl']):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=3, help="at most this many repetitions per cell, one prompt each")
    ap.add_argument("--cell-seconds", type=float, default=60.0,
                    help="no further repetition of a cell once its steps took this many CPU seconds in all (at least "
                         "one)")
    ap.add_argument("--ns", type=int, nargs="+", default=[3, 7, 19], help="negatives per prompt")
    ap.add_argument("--lengths", type=int, nargs="+", default=[5, 50, 200], help="response lengths in tokens")
    ap.add_argument("--data-dir", default="samples", help="LastFM data folder (default: the shipped sample)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--trl-scores", default="completions", choices=("completions", "all"),
                    help="positions TRL's fused LM head scores: completions (what TRL 1.16 does on CUDA/XPU, forced "
                         "here on the CPU) or all (what it does elsewhere)")
    ap.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    args = ap.parse_args(argv)
    if args.trl_scores == "completions":
        import trl.trainer.utils

        trl.trainer.utils._use_triton = lambda device: True  # the compact path; its tiles run in torch on the CPU
    torch.set_num_threads(args.threads)
    print(f"training-step benchmark: {args.model}, fp32, CPU, {args.threads} thread(s); {args.prompts} LastFM "
          f"prompts, n in {args.ns}, response lengths {args.lengths}", flush=True)
    res = run(args)
    print(f"\n{res['machine']}, torch {res['torch']}, transformers {res['transformers']}, trl {res['trl']}; "
          f"{res['threads']} thread(s); TRL scores {res['trl_scores']} positions; load average {res['load_average'][0]:.1f}-{res['load_average'][1]:.1f}; "
          f"prompt {res['cells'][0]['prompt_tokens']:.0f} tokens; setup {res['setup_seconds']:.0f} s, "
          f"total {res['total_seconds']:.0f} s; resident before a step {res['base_rss_gib']:.2f} GiB\n")
    print(markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
