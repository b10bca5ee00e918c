"""One optimizer step of each LM regime on the same batch: full fine-tuning, LoRA, and freeze-k (top k blocks on
cached lower-block states), SmolLM2-135M, float32, CPU.

    python benchmarks/lm_step.py [--dataset lastfm] [--prompts 8] [--negatives 3] [--ks 1,2,4] [--reps 3]
                                 [--threads 2] [--no-memory]

The batch: ``--prompts`` prompts of the shipped sample's training split, each with its chosen response and
``--negatives`` random negatives (seeded), the S-DPO loss, one AdamW step over the whole batch (what
``MultiNegativeTrainer`` does per optimizer step with that many prompts):

- ``full``: every weight (``mass_dpo.training.pool_logps``: one packed shared-prompt row per prompt; no gradient
  checkpointing);
- ``lora``: a peft adapter, r 16, alpha 32, dropout 0.05, on q, k, v, o (``params/training.yaml``'s);
- ``freeze-k``: :class:`mass_dpo.frozen.FrozenTopPolicy`, the top k blocks and the final norm on the cached states
  entering block L - k. The states come from extraction (``extract(keep_layer=L - k)``: the shared-prefix forward over
  the whole pool of every prompt, which a run does anyway for the features and reference log-probs); that precompute
  is timed separately, per prompt, against the same extraction without states.

Each repetition times one step of every regime, in a rotated order (interleaved: the load of a shared machine hits
all of them); the table gives the median seconds per step, per prompt, and the ratio to ``full``. Peak memory
(``--no-memory`` skips it): each regime runs again in its own process, which loads the model and data, resets the
kernel's peak-RSS counter (``/proc/self/clear_refs``), runs two steps (the first allocates the optimizer state) and
reports its peak resident memory above the resident memory before the steps: activations, gradients, optimizer
state and workspace, not the loaded model (Linux only).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def batch_records(dataset: str, prompts: int, negatives: int, seed: int = 0):
    """``(records, negatives [P, n])``: shipped-sample training prompts and seeded random negatives."""
    from mass_dpo.data import load_benchmark

    records = load_benchmark(dataset, "train", data_dir="samples", limit=prompts, seed=0).to_list()
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in records:
        valid = [i for i in range(len(r["candidates"])) if i != int(r["target"])]
        rows.append([valid[j] for j in torch.randperm(len(valid), generator=g)[:negatives].tolist()])
    return records, torch.tensor(rows)


class Setup:
    """The model, the batch of every regime and the step functions."""

    def __init__(self, dataset: str, prompts: int, negatives: int):
        from mass_dpo.data.formatting import encode_pool
        from mass_dpo.models import load_model

        self.bundle = load_model("smollm2", device="cpu", dtype="float32")
        self.records, self.negatives = batch_records(dataset, prompts, negatives)
        self.pools = [encode_pool(r, self.bundle.tokenizer) for r in self.records]
        self.L = len(self.bundle.model.model.layers)
        self.extracted: dict[int, object] = {}

    def extract(self, keep_layer):
        """``(Extracted, seconds)``: the whole pools through the model, with the states entering ``keep_layer``."""
        from mass_dpo.extraction import extract

        t0 = time.perf_counter()
        ex = extract(self.records, self.bundle, dataset_key="bench", use_cache=False, keep_layer=keep_layer,
                     progress=False)
        return ex, time.perf_counter() - t0

    def batch(self, states=None):
        from mass_dpo.training import PreferenceCollator, PreferenceDataset

        ex = next(iter(self.extracted.values())) if self.extracted else self.extract(None)[0]
        ds = PreferenceDataset.from_selection(ex, self.negatives, pools=self.pools, states=states)
        return PreferenceCollator()([ds[i] for i in range(len(ds))])

    def policy(self, regime: str):
        """``(policy, batch, optimizer)`` of ``full``, ``lora`` or ``freeze-<k>``."""
        from mass_dpo.frozen import FrozenTopPolicy
        from mass_dpo.training import enable_pool_forward

        if regime.startswith("freeze-"):
            k = int(regime.split("-")[1])
            if k not in self.extracted:
                self.extracted[k] = self.extract(self.L - k)[0]
            policy = FrozenTopPolicy(self.bundle.model, k).train()
            batch = self.batch(self.extracted[k].states)
        else:
            model = copy.deepcopy(self.bundle.model).train()
            model.config.use_cache = False
            if regime == "lora":
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
            policy = enable_pool_forward(model)
            batch = self.batch()
        params = [p for p in policy.parameters() if p.requires_grad]
        return policy, batch, torch.optim.AdamW(params, lr=1e-5)


def step(policy, batch, optimizer) -> float:
    """One optimizer step (S-DPO loss, forward + backward + AdamW); its seconds."""
    from mass_dpo.training import batch_loss, policy_logps

    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = batch_loss("sdpo", 0.1, policy_logps(policy, batch), batch).loss.mean()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0


def trainable(policy) -> int:
    return sum(p.numel() for p in policy.parameters() if p.requires_grad)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(args) -> int:
    """``--one REGIME``: peak RSS of two steps above the RSS before them (this process only), as JSON."""
    import gc

    setup = Setup(args.dataset, args.prompts, args.negatives)
    policy, batch, opt = setup.policy(args.one)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss("VmRSS")
    step(policy, batch, opt)
    step(policy, batch, opt)
    print(json.dumps({"regime": args.one, "peak_above": _rss("VmHWM") - before}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="lastfm", help="a shipped sample: lastfm, qasc, medmcqa")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--negatives", type=int, default=3)
    ap.add_argument("--ks", default="1,2,4", help="freeze: trainable blocks, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        return memory_child(args)

    ks = [int(k) for k in args.ks.split(",")]
    regimes = ["full", "lora", *[f"freeze-{k}" for k in ks]]
    print(f"lm_step benchmark: smollm2 fp32 on CPU ({os.uname().machine}, {args.threads} torch threads, torch "
          f"{torch.__version__}); {args.dataset} sample, {args.prompts} prompts x (chosen + {args.negatives} "
          f"negatives), S-DPO, AdamW; load average {os.getloadavg()[0]:.1f}", flush=True)
    setup = Setup(args.dataset, args.prompts, args.negatives)
    toks = [len(p) + sum(len(p_c) for p_c in [c[int(r["target"])]] + [c[i] for i in n.tolist()])
            for (p, c), r, n in zip(setup.pools, setup.records, setup.negatives)]
    print(f"  batch: {sum(toks)} tokens in {args.prompts} packed rows (prompt {statistics.mean(len(p) for p, _ in setup.pools):.0f} "
          f"tokens on average); whole pools: {statistics.mean(len(c) for _, c in setup.pools):.0f} candidates", flush=True)

    # the precompute of the freeze regime: extraction with and without the states, interleaved
    pre: dict[str, list[float]] = {"none": [], **{f"freeze-{k}": [] for k in ks}}
    for rep in range(max(1, args.reps - 1)):
        for name in pre:
            ex, s = setup.extract(None if name == "none" else setup.L - int(name.split("-")[1]))
            pre[name].append(s)
            if name != "none":
                setup.extracted[int(name.split("-")[1])] = ex
    size = {k: setup.extracted[k].states.states.nbytes for k in ks}

    built = {name: setup.policy(name) for name in regimes}
    for name in regimes:  # warm-up: one step each (allocations, AdamW state)
        step(*built[name])
    times: dict[str, list[float]] = {name: [] for name in regimes}
    for rep in range(args.reps):
        order = regimes[rep % len(regimes):] + regimes[: rep % len(regimes)]
        for name in order:
            times[name].append(step(*built[name]))
        print(f"  rep {rep + 1}/{args.reps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in regimes), flush=True)

    memory = {}
    if args.memory:
        for name in regimes:
            out = subprocess.run([sys.executable, __file__, "--one", name, "--dataset", args.dataset, "--prompts",
                                  str(args.prompts), "--negatives", str(args.negatives), "--threads",
                                  str(args.threads)], capture_output=True, text=True, check=True)
            memory[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_above"]

    full = statistics.median(times["full"])
    print()
    print("| regime | trainable params | step s (median) | s / prompt | time vs full | peak memory above the loaded "
          "model (MB) |")
    print("|---|---|---|---|---|---|")
    for name in regimes:
        med = statistics.median(times[name])
        mem = f"{memory[name] / 2**20:.0f}" if name in memory else "-"
        print(f"| {name} | {trainable(built[name][0]) / 1e6:.2f} M | {med:.3f} | {med / args.prompts:.3f} | "
              f"{med / full:.3f}x | {mem} |")
    base = statistics.median(pre["none"])
    print()
    print("| precompute (whole pools, no gradient) | s / prompt (median) | states stored |")
    print("|---|---|---|")
    print(f"| extraction without states | {base / args.prompts:.3f} | - |")
    for k in ks:
        print(f"| extraction with the states entering block {setup.L - k} (freeze-{k}) | "
              f"{statistics.median(pre[f'freeze-{k}']) / args.prompts:.3f} | {size[k] / args.prompts / 1e6:.2f} MB / "
              f"prompt (fp32) |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
