"""``mass-dpo select``: negatives for every prompt of a dataset split (MASS-DPO's preprocessing, appendix C.4).

    mass-dpo select --dataset lastfm --model smollm2 --split train --n 3 --strategy dopt [--pooling all]
                    [--beta 0.1 --gamma 0.1] [--selection-score reference] [--limit N] [--data-dir D] [--out PATH]

Extraction (features and log-probs, cached: :func:`mass_dpo.extraction.extract`), then Algorithm 1's inputs
(:func:`mass_dpo.extraction.selection_inputs`), then :func:`mass_dpo.selection.select_negatives` over every prompt.
Writes one JSON line per prompt (id, chosen, negative texts, candidate indices, gains, logdet) and a summary JSON.
``--strategy random`` gives S-DPO's uniformly drawn negatives (seeded), ``hardest`` the top-n by plausibility under
theta0, ``all`` every candidate. ``--selection-score`` is the reading of the preprocessing score (``docs/extraction.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .extraction import (
    DEFAULT_SELECTION_SCORE, POOLINGS, SELECTION_SCORES, Extracted, check_selection_score, extract, selection_inputs,
)
from .selection import STRATEGIES, score_subset, select_negatives

#: Prompts per call of the selector (bounds the [prompts, candidates, d] copies it makes).
SELECT_CHUNK = 2048


@dataclass
class DatasetSelection:
    """What :func:`select_dataset` produced: one row per prompt (as written to the JSONL file) and the summary."""

    rows: list[dict]
    summary: dict
    out: Path | None = None
    summary_path: Path | None = None


def _slice(ex: Extracted, lo: int, hi: int) -> Extracted:
    return Extracted(
        ex.ids[lo:hi], ex.features[lo:hi], ex.ref_logps[lo:hi], ex.theta0_logps[lo:hi], ex.mask[lo:hi],
        ex.target[lo:hi], ex.meta,
    )


def select_extracted(
    ex: Extracted,
    n: int,
    *,
    strategy: str = "dopt",
    beta: float = 0.1,
    gamma: float = 0.1,
    selection_score: str = DEFAULT_SELECTION_SCORE,
    center: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Algorithm 1 (or another strategy) over every prompt of an :class:`Extracted`.

    ``selection_score`` is the reading of appendix C.4's preprocessing score that Algorithm 1's q and alpha0 come
    from (:func:`mass_dpo.extraction.selection_inputs`: ``delta``, ``reference`` or ``offset``). ``dopt`` picks under
    it; ``random`` draws uniformly; ``hardest`` takes the top-n by ``log pi_theta0(y_i) - log pi_theta0(y*)`` (the
    ``reference`` logits: the negatives the model finds most plausible) whatever the reading; ``all`` takes every
    negative. Every strategy's subset is scored under the reading's q, so that the strategies' numbers compare.

    Returns ``indices`` ``[P, k]`` (candidate indices, ``-1`` = none), ``gains`` ``[P, k]``, ``logdet`` ``[P]``,
    ``alpha`` ``[P]`` and ``uniform`` (``[P]`` bool: every l_i is 0 under the reading, q uniform)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    check_selection_score(selection_score)
    gen = torch.Generator().manual_seed(int(seed))
    parts: dict[str, list] = {"indices": [], "gains": [], "logdet": [], "alpha": [], "uniform": []}
    for lo in range(0, len(ex), SELECT_CHUNK):
        chunk = _slice(ex, lo, lo + SELECT_CHUNK)
        phi, lg, mask, cand = selection_inputs(chunk, selection_score)
        if strategy == "hardest" and selection_score != "reference":
            _, order_by, _, _ = selection_inputs(chunk, "reference")
            sel = select_negatives(phi.double(), order_by.double(), n, beta=beta, gamma=gamma, strategy=strategy,
                                   center=center, mask=mask)
            sel = score_subset(phi.double(), lg.double(), sel.indices, beta=beta, gamma=gamma, center=center,
                               mask=mask)
        else:
            sel = select_negatives(
                phi.double(), lg.double(), n, beta=beta, gamma=gamma, strategy=strategy, center=center, mask=mask,
                generator=gen,
            )
        idx = sel.indices
        picked = torch.where(idx >= 0, torch.gather(cand, 1, idx.clamp_min(0)), torch.full_like(idx, -1))
        parts["indices"].append(picked)
        parts["gains"].append(sel.gains)
        parts["logdet"].append(sel.logdet)
        parts["alpha"].append(sel.alpha)
        parts["uniform"].append(((lg == 0) | ~mask).all(-1))
    return {k: torch.cat(v) for k, v in parts.items()}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def _rows(records: list[dict], ex: Extracted, picked: dict) -> list[dict]:
    rows = []
    for i, r in enumerate(records):
        keep = picked["indices"][i] >= 0
        idx = picked["indices"][i][keep].tolist()
        rows.append({
            "id": str(r["id"]),
            "target": int(r["target"]),
            "chosen": r["candidates"][int(r["target"])],
            "negatives": [r["candidates"][j] for j in idx],
            "indices": idx,
            "gains": [_finite(g) for g in picked["gains"][i][keep].tolist()],
            "logdet": _finite(picked["logdet"][i]),
        })
    return rows


def _summary(rows, ex, picked, settings, t_extract, t_select) -> dict:
    n_cands = ex.mask.sum(-1).float()
    k = picked["gains"].shape[1]
    gains = picked["gains"]
    counts = (picked["indices"] >= 0).sum(-1).float()
    step_means = [_finite(gains[:, j][~gains[:, j].isnan()].mean()) if (~gains[:, j].isnan()).any() else None
                  for j in range(k)]
    logdet = picked["logdet"].double()
    return {
        **settings,
        "prompts": len(rows),
        "candidates_mean": float(n_cands.mean()),
        "candidates_min": int(n_cands.min()),
        "candidates_max": int(n_cands.max()),
        "negatives_total": int(counts.sum()),
        "negatives_mean": float(counts.mean()),
        "prompts_with_fewer_than_n": int((counts < settings["n"]).sum()) if settings["strategy"] != "all" else 0,
        "logdet_mean": float(logdet.mean()),
        "logdet_std": float(logdet.std()) if len(rows) > 1 else 0.0,
        "gains_mean_per_step": step_means,
        "alpha_mean": float(picked["alpha"].double().mean()),
        "uniform_q_prompts": int(picked["uniform"].sum()),
        "feature_dim": int(ex.features.shape[-1]),
        "cache_hit": bool(ex.meta.get("cache_hit", False)),
        "cache_key": ex.meta.get("key"),
        "extraction_seconds": round(t_extract, 3),
        "selection_seconds": round(t_select, 3),
    }


def default_out(dataset: str, split: str, model: str, pooling: str, strategy: str, n: int) -> Path:
    name = Path(str(model)).name
    return Path("runs") / "select" / f"{dataset}-{split}-{name}-{pooling}-{strategy}-n{n}.jsonl"


def summary_path_for(out: Path) -> Path:
    """``runs/x.jsonl`` -> ``runs/x.summary.json``."""
    out = Path(out)
    return out.with_name(out.stem + ".summary.json") if out.suffix == ".jsonl" else Path(f"{out}.summary.json")


def select_dataset(
    dataset: Any = "lastfm",
    model: Any = "smollm2",
    *,
    split: str = "train",
    n: int = 3,
    strategy: str = "dopt",
    pooling: str = "all",
    beta: float = 0.1,
    gamma: float = 0.1,
    selection_score: str = DEFAULT_SELECTION_SCORE,
    center: bool = True,
    limit: int | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    checkpoint: Any = None,
    out: str | Path | None = None,
    write: bool = True,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    batch_tokens: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> DatasetSelection:
    """Select ``n`` negatives for every prompt of ``dataset``/``split`` with ``model`` (the reference).

    Args:
        dataset: a benchmark name (``lastfm``, ``movielens``, ``medmcqa``, ``qasc``: read with
            ``mass_dpo.data.load_benchmark(dataset, split, data_dir=, limit=, seed=)``), or records
            (a ``datasets.Dataset`` or a list of dicts with ``id``, ``prompt``, ``candidates``, ``target``).
        model: the reference model (name, folder or ``ModelBundle``); ``checkpoint``: theta0 (default: the model).
        n, strategy, beta, gamma, center: passed to :func:`mass_dpo.selection.select_negatives`.
        pooling: ``all`` or ``response`` (appendix C.4). selection_score: the reading of the preprocessing score
            (:func:`select_extracted`). seed: the subsample of ``limit`` and the ``random`` strategy.
        out: the JSONL path (default ``runs/select/<dataset>-<split>-<model>-<pooling>-<strategy>-n<n>.jsonl``);
            the summary goes beside it as ``<stem>.summary.json``. ``write=False`` writes nothing.
    """
    from .extraction import DEFAULT_BATCH_TOKENS

    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    check_selection_score(selection_score)

    if isinstance(dataset, str):
        from .data import load_benchmark

        name = dataset
        ds = load_benchmark(dataset, split, data_dir=data_dir, limit=limit, seed=seed)
        key = f"{dataset}/{split}/limit={limit}/seed={seed}"
    else:
        name, ds, key = "records", dataset, None
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds)))) if hasattr(ds, "select") else list(ds)[:limit]
    records = ds.to_list() if hasattr(ds, "to_list") else [dict(r) for r in ds]
    if not records:
        raise ValueError(f"no records in {name}/{split}")

    t0 = time.time()
    ex = extract(
        records, model, dataset_key=key, pooling=pooling, checkpoint=checkpoint,
        batch_tokens=batch_tokens or DEFAULT_BATCH_TOKENS, cache_dir=cache_dir, use_cache=use_cache,
        device=device, dtype=dtype, progress=progress,
    )
    t_extract = time.time() - t0
    if ex.ids != [str(r["id"]) for r in records]:
        raise RuntimeError("extraction returned the prompts in another order than the dataset's")
    t0 = time.time()
    picked = select_extracted(ex, n, strategy=strategy, beta=beta, gamma=gamma, selection_score=selection_score,
                              center=center, seed=seed)
    t_select = time.time() - t0

    model_name = getattr(model, "name", model)
    settings = {
        "dataset": name, "split": split, "model": str(model_name),
        "checkpoint": None if checkpoint is None else str(getattr(checkpoint, "name", checkpoint)),
        "pooling": pooling, "strategy": strategy, "n": int(n), "beta": beta, "gamma": gamma,
        "selection_score": selection_score,
        "center": center, "limit": limit, "seed": seed,
    }
    rows = _rows(records, ex, picked)
    summary = _summary(rows, ex, picked, settings, t_extract, t_select)
    result = DatasetSelection(rows, summary)
    if write:
        out = Path(out) if out is not None else default_out(name, split, str(model_name), pooling, strategy, n)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary_path = summary_path_for(out)
        summary["out"] = str(out)
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        result.out, result.summary_path = out, summary_path
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--dataset", required=True, help="lastfm, movielens, medmcqa or qasc")
    add("--model", default="smollm2", help="params/models/<name>.yaml or a saved folder (default smollm2)")
    add("--split", default="train", help="train, valid or test (default train)")
    add("--n", type=int, default=3, help="negatives per prompt (default 3)")
    add("--strategy", default="dopt", choices=STRATEGIES, help="dopt (MASS-DPO), random (S-DPO), hardest, all")
    add("--pooling", default="all", choices=POOLINGS, help="mean-pool prompt+response (all) or response tokens")
    add("--beta", type=float, default=0.1, help="DPO scale (default 0.1)")
    add("--gamma", type=float, default=0.1, help="ridge of H(S) (default 0.1)")
    add("--selection-score", default=DEFAULT_SELECTION_SCORE, choices=SELECTION_SCORES,
        help=f"reading of the preprocessing score s_i (docs/extraction.md; default {DEFAULT_SELECTION_SCORE})")
    add("--no-center", dest="center", action="store_false", help="ablation: no weighted centering")
    add("--limit", type=int, default=None, help="subsample this many prompts (seeded)")
    add("--seed", type=int, default=0, help="subsample and random-strategy seed (default 0)")
    add("--data-dir", default=None,
        help="data folder (default $MASS_DPO_DATA, else the cache); 'samples' = the shipped samples")
    add("--checkpoint", default=None, help="preprocessing checkpoint theta0 (default: the model itself)")
    add("--out", default=None,
        help="JSONL output (default runs/select/<dataset>-<split>-<model>-<pooling>-<strategy>-n<n>.jsonl)")
    add("--cache-dir", default=None, help="extraction cache (default <cache>/extraction; <cache> = $MASS_DPO_CACHE, else ~/.cache/mass_dpo)")
    add("--no-cache", dest="use_cache", action="store_false", help="neither read nor write the extraction cache")
    add("--batch-tokens", type=int, default=None, help="bound on rows x longest row per forward")
    add("--device", default=None, help="cpu, cuda, ... (default from the model params)")
    add("--dtype", default=None, help="float32, bfloat16, ... (default: bf16 on GPU, fp32 on CPU)")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    result = select_dataset(
        args.dataset, args.model, split=args.split, n=args.n, strategy=args.strategy, pooling=args.pooling,
        beta=args.beta, gamma=args.gamma, selection_score=args.selection_score, center=args.center, limit=args.limit,
        seed=args.seed,
        data_dir=args.data_dir, checkpoint=args.checkpoint, out=args.out, cache_dir=args.cache_dir,
        use_cache=args.use_cache, batch_tokens=args.batch_tokens, device=args.device, dtype=args.dtype,
        progress=args.progress,
    )
    s = result.summary
    print(
        f"{s['dataset']}/{s['split']} with {s['model']} ({s['pooling']}, {s['strategy']}, n={s['n']}): "
        f"{s['prompts']} prompts, {s['negatives_mean']:.2f} negatives each, mean logdet {s['logdet_mean']:.3f}; "
        f"extraction {s['extraction_seconds']:.1f} s{' (cached)' if s['cache_hit'] else ''}, "
        f"selection {s['selection_seconds']:.2f} s"
    )
    print(f"wrote {result.out} and {result.summary_path}")
    return 0
