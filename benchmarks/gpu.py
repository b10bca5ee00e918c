"""One prepared GPU check (issue 12): bf16 extraction, one full fine-tuning step at Llama-3.2-3B's shapes, and a small
paper-profile run. Prints one table and writes a JSON record.

    python benchmarks/gpu.py [--json gpu-check.json] [--parts extraction,step,run] [--tiny]

Budget: about 7 minutes on one H200 (measured there 2026-12-04 for the first two parts, 109 s; the run resized from
that run's timing: docs/benchmarks.md). Without CUDA (or with ``--tiny``) every part runs at tiny shapes on the
CPU (the ``tiny`` model, a few prompts; ``tests/test_gpu_check.py`` runs it so in CI, in well under a minute).

1. **extraction** (bf16 on a GPU): LastFM pools of 20 candidates through the shared prompt
   (``mass_dpo.forward.shared_prefix_forward_batch``, several pools per forward) and one row per candidate
   (``naive_forward``, one pool's rows per forward), for SmolLM2 and for a random-init model with Llama-3.2-3B's
   configuration (``params/models/llama3_shape.yaml``: no download). Tokens/s counts the tokens the pools *score*
   (prompt + response for every candidate, the same numerator for both paths); "fed" is what the model read.
   Agreement is judged against fp32 scores of the same weights (``bench_extraction``).
2. **step**: one full fine-tuning step with the S-DPO loss at n = 3 on the Llama-3.2-3B-shaped model, bf16 weights,
   gradient checkpointing, per-device batch 2 (the paper's): forward + backward through the shared prompt
   (``mass_dpo.training.pool_logps``, what training uses) and through one row per response (``pool_logps`` with
   ``forward=mass_dpo.forward.naive_forward``: one ``[prompt, response]`` row per response, a pool's rows in one
   padded forward, S-DPO's layout); loss and gradient agreement (cosine, relative norm of the difference), then one
   AdamW step for the peak memory of a whole step.
3. **run**: SmolLM2 full fine-tuning on 500 QASC prompts of the shipped sample, one epoch, paper profile
   (``mass_dpo.runs.train_run``), S-DPO and MASS-DPO, with the test metrics, and a reference row: the untrained
   model evaluated the same way (``mass_dpo.evaluation.evaluate``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Settings on a GPU and in tiny mode (CPU). On one H200 (2026-12-04) extraction took 100 s (GGUF conversion and the
#: 3.2 B random init included) and the step 9 s; the run at 1,000 / 200 / 500 prompts did not finish in 466 s, so it
#: is now 500 training, 100 online-eval and 300 test prompts, about half of that.
SETTINGS = {
    "gpu": dict(extraction_models=["smollm2", "llama3_shape"], pools=32, candidates=20, pools_per_forward=8,
                step_model="llama3_shape", step_batch=2, n=3, repeats=3, run_model="smollm2", train_prompts=500,
                eval_prompts=100, test_prompts=300, methods=["sdpo", "mass_dpo"], dtype="bfloat16"),
    "tiny": dict(extraction_models=["tiny"], pools=2, candidates=8, pools_per_forward=2, step_model="tiny",
                 step_batch=2, n=3, repeats=1, run_model="tiny", train_prompts=4, eval_prompts=0, test_prompts=4,
                 methods=["sdpo", "mass_dpo"], dtype="bfloat16"),
}

#: Agreement bounds of the bf16 paths (bf16 keeps 8 bits of mantissa: relative error ~4e-3 per rounding).
LOGP_RTOL = 2e-2  # bf16: an error (max |logp - fp32 logp| / max |logp|) this small passes whatever the ratio
FP32_RTOL = 1e-4  # fp32: max |shared - naive| / max |logp| (the layouts compute the same function)
BF16_ERROR_RATIO = 1.5  # bf16: the shared prompt's error against fp32 at most this times one row per candidate's
GRAD_COSINE_MIN = 0.99  # cosine between the shared-prompt and row-per-response gradients
GRAD_RELDIFF_MAX = 0.1  # ||g_shared - g_rows|| / ||g_rows||


# ---------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset, GiB (``None`` on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        info["device"] = "cpu"
    return info


def lastfm_pools(n: int, candidates: int, data_dir: str) -> list[dict]:
    """``n`` LastFM validation records, their first ``candidates`` candidates (the chosen one kept)."""
    from mass_dpo.data import load_benchmark

    out = []
    for r in load_benchmark("lastfm", "valid", data_dir=data_dir, limit=n, seed=0).to_list():
        cands = list(r["candidates"])
        target = cands[int(r["target"])] if isinstance(r.get("target"), int) else None
        keep = cands[:candidates]
        if target is not None and target not in keep:
            keep[-1] = target
        out.append(dict(r, candidates=keep, target=keep.index(target) if target is not None else 0))
    return out


_LOADED: dict = {}


def load(name: str, device, dtype):
    """``mass_dpo.models.load_model``, keeping the last model loaded: the step reuses the 3B-shaped model that the
    extraction built (a random init of 3.2 B parameters takes a while on the CPU)."""
    from mass_dpo.models import load_model

    key = (name, str(device), str(dtype))
    if key not in _LOADED:
        release()
        _LOADED[key] = load_model(name, device=device, dtype=dtype)
    return _LOADED[key]


def recast(name: str, device, old, new) -> None:
    """Cast the kept model ``name`` from dtype ``old`` to ``new`` in place (the extraction scores the fp32 reference
    first, then times the bf16 paths on the same weights, rounded once)."""
    bundle = _LOADED.pop((name, str(device), str(old)))
    bundle.model.to(new)
    _LOADED[(name, str(device), str(new))] = bundle


def release() -> None:
    """Drop the kept model and free its memory."""
    import gc

    _LOADED.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- 1. extraction


def bench_extraction(name: str, records: list[dict], *, device, dtype, pools_per_forward: int) -> list[dict]:
    """Shared prompt against one row per candidate: two table rows (``shared``, ``naive``) for model ``name``.

    Agreement is judged against an fp32 reference on the same weights, because bf16 rounding alone moves a real
    model's log-probs by several percent (SmolLM2: up to ~4% of the largest |log p|, whichever layout; a random-init
    model, whose activations are small, far less): in fp32 the two layouts must agree to ``FP32_RTOL`` (they compute
    the same function), and in ``dtype`` the shared prompt must be no further from fp32 than one row per candidate,
    up to ``BF16_ERROR_RATIO`` (reading the prompt once adds no error of its own)."""
    from mass_dpo.data.formatting import encode_pool
    from mass_dpo.forward import naive_forward, shared_prefix_forward_batch

    bundle = load(name, device, torch.float32)
    model = bundle.model.eval()
    pools = [encode_pool(r, bundle.tokenizer) for r in records]
    scored = sum(len(p) * len(c) + sum(map(len, c)) for p, c in pools)
    fed = {"shared": sum(len(p) + sum(map(len, c)) for p, c in pools), "naive": scored}
    chunks = [pools[i:i + pools_per_forward] for i in range(0, len(pools), pools_per_forward)]

    def shared():
        return [row[: len(c)] for chunk in chunks
                for row, (_, c) in zip(shared_prefix_forward_batch(model, chunk)[0], chunk)]

    def naive():
        return [naive_forward(model, p, c)[0] for p, c in pools]

    def scores(run):
        return torch.cat([x.float().cpu() for x in run()])

    rows, logps = [], {}
    with torch.no_grad():
        fp32 = {"shared": scores(shared), "naive": scores(naive)}
        recast(name, device, torch.float32, dtype)
        for path, run in (("shared", shared), ("naive", naive)):
            shared_prefix_forward_batch(model, chunks[0]) if path == "shared" else naive_forward(model, *pools[0])
            _sync(device)
            _reset_peak(device)
            t0 = time.perf_counter()
            logps[path] = scores(run)
            _sync(device)
            dt = time.perf_counter() - t0
            rows.append({"part": "extraction", "model": name, "path": path, "dtype": str(dtype).replace("torch.", ""),
                         "pools": len(pools), "tokens_scored": scored, "tokens_fed": fed[path], "seconds": dt,
                         "tokens_per_s": scored / dt, "peak_gib": _peak_gib(device)})
    scale = float(fp32["naive"].abs().max().clamp_min(1e-6))
    fp32_rel = float((fp32["shared"] - fp32["naive"]).abs().max()) / scale
    err = {path: float((logps[path] - fp32["naive"]).abs().max()) / scale for path in logps}
    diff = float((logps["shared"] - logps["naive"]).abs().max())
    agree = fp32_rel <= FP32_RTOL and err["shared"] <= max(BF16_ERROR_RATIO * err["naive"], LOGP_RTOL)
    for r in rows:
        r.update(max_abs_logp_diff=diff, rel_logp_diff=diff / scale, fp32_rel_logp_diff=fp32_rel,
                 rel_error_vs_fp32=err[r["path"]], agree=agree)
    del model, bundle
    return rows


# ---------------------------------------------------------------- 2. one full fine-tuning step


def bench_step(name: str, records: list[dict], *, device, dtype, n: int, repeats: int) -> dict:
    """One S-DPO step at n negatives: time, tokens/s and peak memory of forward + backward through the shared prompt
    and through one row per response; their loss and gradient agreement; peak memory of a whole AdamW step."""
    from mass_dpo.data.formatting import encode_pool
    from mass_dpo.forward import naive_forward
    from mass_dpo.losses import preference_loss
    from mass_dpo.training import pool_logps

    bundle = load(name, device, dtype)
    model = bundle.model
    model.config.use_cache = False
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    prompt_ids, cand_ids = [], []
    for r in records:
        p, cands = encode_pool(r, bundle.tokenizer)
        t = int(r.get("target", 0))
        prompt_ids.append(p)
        cand_ids.append([cands[t]] + [c for i, c in enumerate(cands) if i != t][:n])  # chosen first, n negatives
    mask = torch.ones(len(records), 1 + n, dtype=torch.bool, device=device)
    scored = sum(len(p) * len(c) + sum(map(len, c)) for p, c in zip(prompt_ids, cand_ids))
    fed = {"shared": sum(len(p) + sum(map(len, c)) for p, c in zip(prompt_ids, cand_ids)), "rows": scored}
    with torch.no_grad():  # the reference: the model before the step (the policy starts at the reference)
        ref = pool_logps(model, prompt_ids, cand_ids, mask).float()

    def loss_of(logps):
        out = preference_loss("sdpo", logps[:, 0], logps[:, 1:], ref[:, 0], ref[:, 1:], beta=0.1, mask=mask[:, 1:])
        return out.loss.mean()

    paths = {"shared": lambda: pool_logps(model, prompt_ids, cand_ids, mask),
             "rows": lambda: pool_logps(model, prompt_ids, cand_ids, mask, forward=naive_forward)}
    params = [p for p in model.parameters() if p.requires_grad]
    result = {"part": "step", "model": name, "dtype": str(dtype).replace("torch.", ""), "batch": len(records),
              "n": n, "parameters": sum(p.numel() for p in params), "gradient_checkpointing": True, "paths": {}}
    grads, losses = {}, {}
    for path, logps_of in paths.items():
        times = []
        for i in range(repeats + 1):  # the first one warms up
            model.zero_grad(set_to_none=True)
            if i == 1 or repeats == 0:
                _reset_peak(device)
            _sync(device)
            t0 = time.perf_counter()
            loss = loss_of(logps_of())
            loss.backward()
            _sync(device)
            if i > 0 or repeats == 0:
                times.append(time.perf_counter() - t0)
        losses[path] = float(loss.detach())
        grads[path] = [p.grad.detach().clone() for p in params]
        dt = statistics.median(times)
        result["paths"][path] = {"seconds": dt, "tokens_scored": scored, "tokens_fed": fed[path],
                                 "tokens_per_s": scored / dt, "peak_gib": _peak_gib(device), "loss": losses[path]}
    dot = sum(float((a.float() * b.float()).sum()) for a, b in zip(grads["shared"], grads["rows"]))
    na = sum(float(a.float().pow(2).sum()) for a in grads["shared"]) ** 0.5
    nb = sum(float(b.float().pow(2).sum()) for b in grads["rows"]) ** 0.5
    nd = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(grads["shared"], grads["rows"])) ** 0.5
    del grads
    result.update(loss_diff=abs(losses["shared"] - losses["rows"]), grad_cosine=dot / max(na * nb, 1e-30),
                  grad_rel_diff=nd / max(nb, 1e-30), grad_norm=nb)
    result["agree"] = bool(result["loss_diff"] <= 1e-2 * max(1.0, abs(losses["rows"]))
                           and result["grad_cosine"] >= GRAD_COSINE_MIN and result["grad_rel_diff"] <= GRAD_RELDIFF_MAX)
    # a whole step (forward, backward, AdamW update) through the shared prompt: weights + grads + AdamW states
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.zero_grad(set_to_none=True)
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    loss_of(paths["shared"]()).backward()
    opt.step()
    _sync(device)
    result["adamw_step"] = {"seconds": time.perf_counter() - t0, "peak_gib": _peak_gib(device)}
    del opt, model, bundle, params
    release()  # the weights moved: the model is not the one loaded any more
    return result


# ---------------------------------------------------------------- 3. a small paper-profile run


def bench_run(s: dict, *, data_dir: str, root: Path, device, rows: list[dict] | None = None,
              saved=lambda: None) -> list[dict]:
    """The untrained model and one epoch of each method on QASC (full fine-tuning, paper profile): test metrics.
    Each row is appended to ``rows`` and ``saved()`` called as soon as it is measured (a check cut short by its
    time limit still leaves the rows it finished)."""
    from mass_dpo.runs import reference_run, train_run
    from mass_dpo.training import resolve_config

    common = dict(dataset="qasc", model=s["run_model"], regime="full", limit=s["train_prompts"], num_train_epochs=1,
                  eval_limit=s["eval_prompts"], test_limit=s["test_prompts"], data_dir=data_dir, profile="paper")
    if s is SETTINGS["tiny"]:
        common.update(per_device_train_batch_size=2, gradient_accumulation_steps=1, eval_steps=2, logging_steps=1,
                      save_steps=2)
    rows = [] if rows is None else rows
    cfg = resolve_config(method=s["methods"][0], **common)
    t0 = time.perf_counter()
    _reset_peak(device)
    ref = reference_run(cfg, root=root)  # the untrained model on the same test split, scored as train_run scores
    rows.append({"part": "run", "model": cfg.model, "path": "reference (untrained)", "metrics": ref.metrics,
                 "seconds": time.perf_counter() - t0, "peak_gib": _peak_gib(device)})
    saved()
    for method in s["methods"]:
        t0 = time.perf_counter()
        _reset_peak(device)
        res = train_run(method=method, root=root, force=True, **common)
        rows.append({"part": "run", "model": cfg.model, "path": method, "metrics": res.metrics,
                     "steps": res.info["train"].get("global_step"), "optim": res.info.get("optim"),
                     "seconds": time.perf_counter() - t0, "peak_gib": _peak_gib(device), "run_dir": str(res.run_dir)})
        saved()
    return rows


# ---------------------------------------------------------------- table


def write(path: Path, record: dict) -> None:
    """Write the record atomically (read while the check runs, and what a time limit leaves must be whole)."""
    from mass_dpo.files import atomic_write_text

    atomic_write_text(path, json.dumps(record, indent=1, default=str))



def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(record: dict) -> str:
    """One plain-text table of every measured row."""
    lines = [f"GPU check on {record['machine']['device']} (torch {record['machine']['torch']}), "
             f"{'tiny shapes' if record['tiny'] else 'full shapes'}; {record['seconds']:.0f} s in all",
             f"{'part':<11}{'model':<14}{'path':<22}{'tokens/s':>11}{'fed tok':>9}{'s':>8}{'peak GiB':>10}  notes"]
    for r in record.get("extraction", []):
        note = (f"vs fp32 rel {r['rel_error_vs_fp32']:.1e}; shared-naive rel {r['rel_logp_diff']:.1e} "
                f"(fp32 {r['fp32_rel_logp_diff']:.1e}) {'ok' if r['agree'] else 'MISMATCH'}")
        lines.append(f"{'extraction':<11}{r['model']:<14}{r['path'] + ' ' + r['dtype']:<22}{r['tokens_per_s']:>11.0f}"
                     f"{r['tokens_fed']:>9}{r['seconds']:>8.2f}{_f(r['peak_gib'], '{:.2f}'):>10}  {note}")
    ext = {(r["model"], r["dtype"], r["path"]): r["seconds"] for r in record.get("extraction", [])}
    for (model, dtype, path), sec in ext.items():
        if path == "shared" and (model, dtype, "naive") in ext:
            lines.append(f"{'extraction':<11}{model:<14}{'naive / shared ' + dtype:<22}  time ratio "
                         f"{ext[(model, dtype, 'naive')] / sec:.2f}x (measured in this run)")
    st = record.get("step")
    if st and {"shared", "rows"} <= set(st["paths"]):
        lines.append(f"{'step':<11}{st['model']:<14}{'rows / shared':<22}  time ratio "
                     f"{st['paths']['rows']['seconds'] / st['paths']['shared']['seconds']:.2f}x (measured in this run)")
    if st:
        for path, p in st["paths"].items():
            note = (f"loss {p['loss']:.4f}" + (f"; |dloss| {st['loss_diff']:.1e}, grad cos {st['grad_cosine']:.4f}, "
                                               f"rel diff {st['grad_rel_diff']:.1e} "
                                               f"{'ok' if st['agree'] else 'MISMATCH'}" if path == "rows" else ""))
            label = "shared prompt" if path == "shared" else "row per response"
            lines.append(f"{'step':<11}{st['model']:<14}{label:<22}{p['tokens_per_s']:>11.0f}{p['tokens_fed']:>9}"
                         f"{p['seconds']:>8.2f}{_f(p['peak_gib'], '{:.2f}'):>10}  {note}")
        a = st["adamw_step"]
        lines.append(f"{'step':<11}{st['model']:<14}{'+ AdamW update':<22}{'':>11}{'':>9}{a['seconds']:>8.2f}"
                     f"{_f(a['peak_gib'], '{:.2f}'):>10}  {st['parameters'] / 1e9:.2f}B parameters, batch "
                     f"{st['batch']}, n={st['n']}, {st['dtype']}, gradient checkpointing")
    for r in record.get("run", []):
        m = r["metrics"]
        note = ", ".join(f"{k} {m[k]:.3f}" for k in ("accuracy", "recall@1", "ndcg@3", "mrr", "pairwise_accuracy")
                         if isinstance(m.get(k), (int, float)))
        lines.append(f"{'run':<11}{r['model']:<14}{r['path']:<22}{'':>11}{'':>9}{r['seconds']:>8.1f}"
                     f"{_f(r['peak_gib'], '{:.2f}'):>10}  {note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="gpu-check.json", help="where to write the JSON record (default %(default)s)")
    ap.add_argument("--parts", default="extraction,step,run", help="comma-separated subset of extraction,step,run")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (automatic without CUDA)")
    ap.add_argument("--data-dir", default="samples", help="benchmark data folder (default: the shipped samples)")
    ap.add_argument("--runs-root", default=None, help="runs root of part 3 (default: a temporary folder)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"extraction", "step", "run"}
    if unknown:
        ap.error(f"unknown part(s) {', '.join(sorted(unknown))}: choose from extraction, step, run")
    tiny = args.tiny or not torch.cuda.is_available()
    s = SETTINGS["tiny" if tiny else "gpu"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, s["dtype"])
    record = {"tiny": tiny, "machine": machine(), "settings": s, "parts": parts}
    t_start = time.perf_counter()
    if tiny and device.type == "cpu":
        print("no CUDA: running the GPU check at tiny shapes on the CPU", flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)

    def done(part: str, t0: float) -> None:
        """Record the part's time and write the record so far (a check cut short still leaves its numbers)."""
        record.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t0, 1)
        record["seconds"] = time.perf_counter() - t_start
        write(out, record)
        print(f"[gpu check] {part} done in {record['part_seconds'][part]:.0f} s "
              f"({record['seconds']:.0f} s in all)", flush=True)

    if "extraction" in parts:
        t0 = time.perf_counter()
        records = lastfm_pools(s["pools"], s["candidates"], args.data_dir)
        record["extraction"] = []
        for name in s["extraction_models"]:
            record["extraction"] += bench_extraction(name, records, device=device, dtype=dtype,
                                                     pools_per_forward=s["pools_per_forward"])
        done("extraction", t0)
    if "step" in parts:
        t0 = time.perf_counter()
        records = lastfm_pools(s["step_batch"], s["candidates"], args.data_dir)
        record["step"] = bench_step(s["step_model"], records, device=device, dtype=dtype, n=s["n"],
                                    repeats=s["repeats"])
        done("step", t0)
    if "run" in parts:
        release()
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="mass-dpo-gpu-check-") as tmp:
            root = Path(args.runs_root) if args.runs_root else Path(tmp)
            record["run"] = []
            bench_run(s, data_dir=args.data_dir, root=root, device=device, rows=record["run"],
                      saved=lambda: write(out, record))
        done("run", t0)
    record["seconds"] = time.perf_counter() - t_start
    print(table(record), flush=True)
    write(out, record)
    print(f"record written to {args.json}")
    failed = [r for r in record.get("extraction", []) if not r["agree"]]
    if record.get("step") and not record["step"]["agree"]:
        failed.append(record["step"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
