"""``mass-dpo select``: negatives for every prompt of a dataset split (MASS-DPO's preprocessing, appendix C.4).

    mass-dpo select --dataset lastfm --model smollm2 --split train --n 3 --strategy dopt [--pooling all]
                    [--beta 0.1 --gamma 0.1] [--selection-score reference] [--limit N] [--data-dir D] [--out PATH]
    mass-dpo select --data my_prefs.jsonl --model smollm2 --n 3 [--grouped]

Extraction (features and log-probs, cached: :func:`mass_dpo.extraction.extract`), then Algorithm 1's inputs
(:func:`mass_dpo.extraction.selection_inputs`), then :func:`mass_dpo.selection.select_negatives` over every prompt.

Output, one JSON line per row:

- default: one row per (chosen, selected negative), TRL's standard preference form, which ``trl.DPOTrainer`` trains
  on unchanged (``datasets.load_dataset("json", data_files=...)``): ``prompt``, ``chosen``, ``rejected`` (one
  response), then the selection's fields ``id`` (the prompt's), ``rank`` (0 = picked first), ``index`` (the
  negative's position among the candidates), ``gain`` (its marginal log-det gain) and ``logdet`` (of the prompt's
  whole subset). A conversational input file (message lists) gives conversational rows: ``prompt``, ``chosen`` and
  ``rejected`` are message lists, the chat template is left to the trainer.
- ``grouped=True`` (``--grouped``): one row per prompt, ``rejected`` the list of the selected negatives in selection
  order, with ``id``, ``target``, ``indices``, ``gains``, ``logdet``. This is the multi-negative form
  ``mass-dpo train --data`` and :func:`mass_dpo.data.load_preferences` read; TRL does not (its ``rejected`` is one
  response). ``load_preferences`` also reads the default pairs back into one record per prompt (rows sharing an id).

A summary JSON goes beside the rows. The default output folder is ``<runs root>/select/``, the runs root of
``mass-dpo train`` (``$MASS_DPO_RUNS``, else ``<cache>/runs``).
``--strategy random`` gives S-DPO's uniformly drawn negatives (seeded), ``hardest`` the top-n by plausibility under
theta0, ``all`` every candidate. ``--selection-score`` is the reading of the preprocessing score (``docs/extraction.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .extraction import (
    DEFAULT_SELECTION_SCORE, SELECTION_SCORES, Extracted, check_selection_score, extract, selection_inputs,
)
from .forward import POOLINGS
from .selection import STRATEGIES, score_subset, select_negatives

#: Prompts per call of the selector (bounds the [prompts, candidates, d] copies it makes).
SELECT_CHUNK = 2048


@dataclass
class DatasetSelection:
    """What :func:`select_dataset` produced: the rows as written to the JSONL file (pairs, or one per prompt when
    grouped) and the summary."""

    rows: list[dict]
    summary: dict
    out: Path | None = None
    summary_path: Path | None = None


def _slice(ex: Extracted, lo: int, hi: int) -> Extracted:
    return Extracted(
        ex.ids[lo:hi], ex.features[lo:hi], ex.ref_logps[lo:hi], ex.theta0_logps[lo:hi], ex.mask[lo:hi],
        ex.target[lo:hi], ex.meta, None if getattr(ex, "lengths", None) is None else ex.lengths[lo:hi],
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
    negative; ``longest`` the top-n by response tokens (``ex.lengths``; ties to the lowest index). Every strategy's
    subset is scored under the reading's q, so that the strategies' numbers compare.

    Returns ``indices`` ``[P, k]`` (candidate indices, ``-1`` = none), ``gains`` ``[P, k]``, ``logdet`` ``[P]``,
    ``alpha`` ``[P]`` and ``uniform`` (``[P]`` bool: every l_i is 0 under the reading, q uniform)."""
    if strategy not in STRATEGIES + ("longest",):
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES + ('longest',))}")
    if strategy == "longest" and ex.lengths is None:
        raise ValueError("strategy 'longest' needs the candidates' token lengths (Extracted.lengths); extract again")
    check_selection_score(selection_score)
    gen = torch.Generator().manual_seed(int(seed))
    parts: dict[str, list] = {"indices": [], "gains": [], "logdet": [], "alpha": [], "uniform": []}
    for lo in range(0, len(ex), SELECT_CHUNK):
        chunk = _slice(ex, lo, lo + SELECT_CHUNK)
        phi, lg, mask, cand = selection_inputs(chunk, selection_score)
        _check_finite(phi, lg, mask, cand, chunk.ids, lo)
        if strategy == "longest" or (strategy == "hardest" and selection_score != "reference"):
            if strategy == "longest":  # the negatives' token lengths, in selection_inputs' candidate order
                order_by = torch.gather(chunk.lengths.double(), 1, cand.clamp_min(0))
            else:
                _, order_by, _, _ = selection_inputs(chunk, "reference")
            sel = select_negatives(phi.double(), order_by.double(), n, beta=beta, gamma=gamma, strategy="hardest",
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


def _check_finite(phi, logits, mask, cand, ids, offset: int) -> None:
    """NaN or inf in a chunk's selection inputs (``[b, K, d]``, ``[b, K]``), named by the prompt's index in the split
    and id and the candidate's index in its pool (the chunk and the negatives-only order are internal)."""
    checks = (("phi has", ~torch.isfinite(phi).all(-1) & mask), ("logits have", ~torch.isfinite(logits) & mask))
    for what, bad in checks:
        if bad.any():
            b, i = (int(t) for t in bad.nonzero()[0])
            raise ValueError(
                f"{what} NaN or inf values ({int(bad.sum())} negatives; first: prompt {offset + b} (id "
                f"{ids[b]!r}), candidate {int(cand[b, i])} of its pool); the extraction is damaged: extract again "
                "(--no-cache, or delete its cache entry)")


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def _rows(records: list[dict], ex: Extracted, picked: dict) -> list[dict]:
    """One row per prompt: ``prompt``, ``chosen``, ``rejected`` (the picks, in selection order), ``id``,
    ``target``, ``indices``, ``gains``, ``logdet`` (see the module docstring). When any record was read from
    conversational rows, every row is written as message lists (:func:`mass_dpo.data.preferences.conversation`),
    so that the file has one form, with TRL's ``tools`` and ``chat_template_kwargs`` columns on every row once any
    record has them; otherwise as text."""
    from .data.preferences import TEMPLATE_COLUMNS, conversation, is_conversational

    conversational = any(is_conversational(r) for r in records)
    convs = [conversation(r) if conversational else None for r in records]
    # TRL's template columns, on every row once any row has one (a row without: no tools, no variables)
    template = [k for k in TEMPLATE_COLUMNS if any(c and c.get(k) for c in convs)]
    rows = []
    for i, r in enumerate(records):
        keep = picked["indices"][i] >= 0
        idx = picked["indices"][i][keep].tolist()
        conv = convs[i]
        cands = conv["candidates"] if conv else r["candidates"]
        rows.append({
            "prompt": conv["prompt"] if conv else r["prompt"],
            "chosen": cands[int(r["target"])],
            "rejected": [cands[j] for j in idx],
            "id": str(r["id"]),
            "target": int(r["target"]),
            "indices": idx,
            "gains": [_finite(g) for g in picked["gains"][i][keep].tolist()],
            "logdet": _finite(picked["logdet"][i]),
            **{k: conv.get(k) or ({} if k == "chat_template_kwargs" else None) for k in template},
        })
    return rows


def pair_rows(rows: list[dict]) -> list[dict]:
    """Per-prompt rows (:func:`_rows`) as one row per (chosen, negative) pair, TRL's preference form: ``prompt``,
    ``chosen``, ``rejected`` (one response: text or a message list), ``id``, ``rank`` (selection order), ``index``,
    ``gain``, ``logdet`` (the prompt's subset), and TRL's template columns where the rows have them."""
    from .data.preferences import TEMPLATE_COLUMNS

    return [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": negative, "id": r["id"], "rank": k,
         "index": r["indices"][k], "gain": r["gains"][k], "logdet": r["logdet"],
         **{c: r[c] for c in TEMPLATE_COLUMNS if c in r}}
        for r in rows
        for k, negative in enumerate(r["rejected"])
    ]


def largest_pool(records: list[dict]) -> int:
    """The most negatives any record offers (its candidates less the chosen one)."""
    return max(len(r["candidates"]) - 1 for r in records)


def effective_n(n: int, pool: int, strategy: str = "dopt") -> int:
    """``n``, or ``pool`` with one warning when ``n`` asks for more negatives than the largest pool holds."""
    if strategy != "all" and n > pool:
        warnings.warn(f"n={n} is more than the largest negative pool ({pool} negatives): using n={pool}",
                      stacklevel=3)
        return pool
    return n


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


def default_out(dataset: str, split: str, model: str, pooling: str, strategy: str, n: int,
                source: str | None = None, settings: str | None = None) -> Path:
    """``<runs root>/select/<dataset>-<source>-<split>-<model>-<pooling>-<strategy>-n<n>[-<settings>].jsonl``
    (strategy ``all``, which keeps every negative whatever ``n``: no ``-n<n>``); the runs root is ``mass-dpo
    train``'s: ``$MASS_DPO_RUNS``, else ``<cache>/runs``. ``source``: a short hash of the input (:func:`source_tag`),
    so that two files with the same name in different folders get different outputs; ``settings``: a short hash of
    the options left out of the name that differ from their defaults (:func:`settings_tag`), so that a sweep over
    ``gamma`` or ``seed`` writes one file per setting."""
    from .params import cache_root

    env = os.environ.get("MASS_DPO_RUNS")
    root = Path(env).expanduser() if env else cache_root() / "runs"
    name = Path(str(model)).name
    tag = f"-{source}" if source else ""
    size = "" if strategy == "all" else f"-n{n}"
    more = f"-{settings}" if settings else ""
    return root / "select" / f"{dataset}{tag}-{split}-{name}-{pooling}-{strategy}{size}{more}.jsonl"


#: The options of :func:`select_dataset` that change its output but not its default file name.
NAMELESS_SETTINGS = ("beta", "gamma", "selection_score", "center", "limit", "seed", "checkpoint", "max_length",
                     "max_prompt_length", "dtype")


def settings_tag(**given: Any) -> str | None:
    """8 hex digits of sha256 of the :data:`NAMELESS_SETTINGS` in ``given`` that differ from :func:`select_dataset`'s
    defaults (``None`` when none does: the default name)."""
    import inspect

    defaults = inspect.signature(select_dataset).parameters
    changed = {k: (str(getattr(v, "name", v)) if k == "checkpoint" else v) for k, v in given.items()
               if k in NAMELESS_SETTINGS and v != defaults[k].default}
    return source_tag(json.dumps(changed, sort_keys=True, default=str)) if changed else None


def source_tag(text: str) -> str:
    """8 hex digits of sha256(``text``): the resolved input path (or data folder, or records' fingerprint)."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _check_number(name: str, value, *, positive: bool = True) -> float:
    """``value`` as a float when finite (and > 0 when ``positive``), else a ``ValueError`` naming the option."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {value!r} (--{name.replace('_', '-')})")
    if positive and not x > 0:
        raise ValueError(f"{name} must be > 0, got {value!r} (--{name.replace('_', '-')})")
    return x


def _check_out(out: Path) -> None:
    """The output file's folder can be written and the output is not a folder (before any slow work)."""
    from .files import check_writable

    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give a file path ending in .jsonl")
    check_writable(out.parent, "--out folder", "give --out a path in a folder you can write")


def _write_selection(out: Path, rows: list[dict], summary: dict) -> Path:
    """The rows (JSON lines) and the summary beside them as strict JSON: both are written to temporary files first
    and renamed only when both are whole, so a failed write (a full disk, a file-size limit) leaves the old pair as
    it was, and the two renames follow each other at once."""
    from .files import atomic_path, dumps_strict

    summary_path = summary_path_for(out)
    with atomic_path(out) as tmp_rows, atomic_path(summary_path) as tmp_summary:
        with open(tmp_rows, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(dumps_strict(row, ensure_ascii=False) + "\n")
        Path(tmp_summary).write_text(dumps_strict(summary, indent=1, default=str, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
    return summary_path


def summary_path_for(out: Path) -> Path:
    """``runs/x.jsonl`` -> ``runs/x.summary.json``."""
    out = Path(out)
    return out.with_name(out.stem + ".summary.json") if out.suffix == ".jsonl" else Path(f"{out}.summary.json")


def select_dataset(
    dataset: Any = "lastfm",
    model: Any = "smollm2",
    *,
    split: str | None = "train",
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
    grouped: bool = False,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> DatasetSelection:
    """Select ``n`` negatives for every prompt of ``dataset``/``split`` with ``model`` (the reference).

    Args:
        dataset: a benchmark name (``lastfm``, ``movielens``, ``medmcqa``, ``qasc``: read with
            ``mass_dpo.data.load_benchmark(dataset, split, data_dir=, limit=, seed=)``), a preference file
            (``load_preferences(path, split=split)``; ``split=None``: every row), or records
            (a ``datasets.Dataset`` or a list of dicts with ``id``, ``prompt``, ``candidates``, ``target``).
        split: ``train``, ``valid``, ``test``, or ``None`` (every row of a file or records; benchmarks: train).
        model: the reference model (name, folder or ``ModelBundle``); ``checkpoint``: theta0 (default: the model).
        n, strategy, beta, gamma, center: passed to :func:`mass_dpo.selection.select_negatives`.
        pooling: ``all`` or ``response`` (appendix C.4). selection_score: the reading of the preprocessing score
            (:func:`select_extracted`). seed: the subsample of ``limit`` and the ``random`` strategy.
        out: the JSONL path (default :func:`default_out`, under ``<runs root>/select/``); the summary goes beside it
            as ``<stem>.summary.json``. ``write=False`` writes nothing.
        grouped: one row per prompt (``rejected`` a list; what ``mass-dpo train --data`` reads) instead of the
            default one row per (chosen, negative) pair in TRL's form (:func:`pair_rows`); ``result.rows`` are the
            rows written.
        n: more than the largest pool holds warns once and selects the pool size (the output is named by it).
        max_length, max_prompt_length: TRL's truncation of prompts and responses (:func:`mass_dpo.extraction.extract`;
            default: the model's context, no prompt limit).

    Options (finite beta and gamma, the device), the output folder and the cache folder are checked before any slow
    work. One process writes an output at a time (under its lock; a second one waits, then reads the cached
    extraction), each file atomically.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    beta, gamma = _check_number("beta", beta), _check_number("gamma", gamma)
    check_selection_score(selection_score)
    if isinstance(device, str):
        from .models import resolve_device

        resolve_device(device)  # CUDA asked for on a machine without it: one line before any work

    from .data.preferences import is_preference_file, load_preferences, resolve_path

    if is_preference_file(dataset):
        from .data.preferences import limit_preferences

        path = resolve_path(dataset)
        name = path.stem
        ds = limit_preferences(load_preferences(path, split=split), limit, seed, split)
        split = split or "all"
        key = f"{path.resolve()}/{split}/limit={limit}/seed={seed}"
        source = source_tag(str(path.resolve()))
    elif isinstance(dataset, str):
        from .data import load_benchmark, resolve_data_dir

        name, split = dataset, split or "train"
        ds = load_benchmark(dataset, split, data_dir=data_dir, limit=limit, seed=seed)
        key = f"{dataset}/{split}/limit={limit}/seed={seed}"
        source = source_tag(f"{dataset}:{Path(resolve_data_dir(data_dir)[0]).resolve()}")
    else:
        name, ds, key, split = "records", dataset, None, split or "all"
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds)))) if hasattr(ds, "select") else list(ds)[:limit]
        source = None
    records = ds.to_list() if hasattr(ds, "to_list") else [dict(r) for r in ds]
    if not records:
        raise ValueError(f"no records in {name}/{split}")
    n = effective_n(int(n), largest_pool(records), strategy)
    model_name = getattr(model, "name", model)
    if write:
        if out is None:
            from .extraction import dataset_fingerprint

            settings = settings_tag(beta=beta, gamma=gamma, selection_score=selection_score, center=center,
                                    limit=limit, seed=seed, checkpoint=checkpoint, max_length=max_length,
                                    max_prompt_length=max_prompt_length, dtype=dtype)
            out = default_out(name, split, str(model_name), pooling, strategy, n,
                              source or source_tag(dataset_fingerprint(records)), settings)
            out = out.with_name(out.stem + "-grouped.jsonl") if grouped else out
        out = Path(out).expanduser()
        _check_out(out)  # before the slow work
    from .files import locked

    with locked(out, f"the selection {out}", enabled=write):
        if write:
            from .files import clean_orphans

            clean_orphans(out.parent, prefix=out.stem)  # temporaries of a killed write of this output
        return _select_and_write(records, model, name, split, n, strategy, pooling, beta, gamma, selection_score,
                                 center, limit, seed, checkpoint, key, out, write, cache_dir, use_cache, batch_tokens,
                                 device, dtype, progress, grouped, max_length, max_prompt_length)


def _select_and_write(records, model, name, split, n, strategy, pooling, beta, gamma, selection_score, center, limit,
                      seed, checkpoint, key, out, write, cache_dir, use_cache, batch_tokens, device, dtype, progress,
                      grouped, max_length, max_prompt_length) -> DatasetSelection:
    """Extraction, selection and the written output of :func:`select_dataset` (under the output's lock)."""
    from .extraction import DEFAULT_BATCH_TOKENS

    t0 = time.time()
    ex = extract(
        records, model, dataset_key=key, pooling=pooling, checkpoint=checkpoint,
        batch_tokens=batch_tokens or DEFAULT_BATCH_TOKENS, cache_dir=cache_dir, use_cache=use_cache,
        device=device, dtype=dtype, progress=progress, max_length=max_length, max_prompt_length=max_prompt_length,
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
        **({"max_length": max_length} if max_length is not None else {}),
        **({"max_prompt_length": max_prompt_length} if max_prompt_length is not None else {}),
    }
    rows = _rows(records, ex, picked)
    summary = _summary(rows, ex, picked, settings, t_extract, t_select)
    summary["form"] = "grouped" if grouped else "pairs"
    if not grouped:
        rows = pair_rows(rows)
        summary["pairs"] = len(rows)
    result = DatasetSelection(rows, summary)
    if write:
        summary["out"] = str(out)
        result.out, result.summary_path = out, _write_selection(out, rows, summary)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import positive_float, positive_int

    add = parser.add_argument
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--dataset", help="a benchmark: lastfm, movielens, medmcqa or qasc")
    what.add_argument("--data", metavar="FILE",
                      help="your own JSON-lines/JSON/Parquet file of prompt, chosen, rejected (a list); TRL's "
                           "standard or conversational form")
    add("--model", default="smollm2", help="params/models/<name>.yaml or a saved folder")
    add("--split", default=None,
        help="train, valid or test (default: train for a benchmark; every row of a --data file, whose held-out "
             "splits are its 'split' column or carved by a fixed seed, see mass_dpo.data.preferences)")
    add("--n", type=positive_int, default=3, help="negatives per prompt")
    add("--strategy", default="dopt", choices=STRATEGIES, help="dopt (MASS-DPO), random (S-DPO), hardest, all")
    add("--pooling", default="all", choices=POOLINGS, help="mean-pool prompt+response (all) or response tokens")
    add("--beta", type=positive_float, default=0.1, help="DPO scale, > 0")
    add("--gamma", type=positive_float, default=0.1, help="ridge of H(S), > 0")
    add("--selection-score", default=DEFAULT_SELECTION_SCORE, choices=SELECTION_SCORES,
        help=f"reading of the preprocessing score s_i (docs/extraction.md; default {DEFAULT_SELECTION_SCORE})")
    add("--no-center", dest="center", action="store_false", help="ablation: no weighted centering")
    add("--limit", type=positive_int, default=None, help="subsample this many prompts (seeded)")
    add("--seed", type=int, default=0, help="subsample and random-strategy seed")
    add("--data-dir", default=None,
        help="data folder (default $MASS_DPO_DATA, else the cache); 'samples' = the shipped samples")
    add("--checkpoint", default=None, help="preprocessing checkpoint theta0 (default: the model itself)")
    add("--out", default=None,
        help="JSONL output (default: <runs root>/select/<dataset>-<hash>-<split>-<model>-<pooling>-<strategy>-n<n>"
             ".jsonl, <hash> a short hash of the input file, or of the benchmark and its data folder; a further "
             "-<hash> of the other options that differ from their defaults (--beta, --gamma, --seed, ...) before "
             ".jsonl; runs root: $MASS_DPO_RUNS, else <cache>/runs, where mass-dpo train writes too)")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--grouped", action="store_true",
                      help="one row per prompt, 'rejected' the list of selected negatives (what mass-dpo train --data "
                           "reads) instead of one row per (chosen, negative) pair in TRL's form")
    form.add_argument("--pairs", action="store_true",
                      help="one row per (chosen, negative) pair, which trl.DPOTrainer trains on: the default")
    add("--cache-dir", default=None, help="extraction cache (default <cache>/extraction; <cache> = $MASS_DPO_CACHE, else $XDG_CACHE_HOME/mass_dpo, else ~/.cache/mass_dpo)")
    add("--no-cache", dest="use_cache", action="store_false", help="neither read nor write the extraction cache")
    add("--batch-tokens", type=positive_int, default=None, help="bound on rows x longest row per forward")
    add("--max-length", type=positive_int, default=None,
        help="tokens of a prompt + response, the response's tail cut beyond (TRL's max_length; default: the model's "
             "context)")
    add("--max-prompt-length", type=positive_int, default=None,
        help="tokens of a prompt, cut from the left beyond (as TRL 0.x's max_prompt_length; default: no limit, as "
             "TRL 1.x)")
    add("--device", default=None, help="cpu, cuda, ... (default from the model params)")
    add("--dtype", default=None, help="float32, bfloat16, ... (default: the model's params: bf16 on GPU; on CPU, "
                                      "smollm2 bf16 where the CPU has native bf16, else fp32)")
    add("--no-progress", dest="progress", action="store_false",
        help="no progress bars (extraction, model conversion and loading)")


def run(args: argparse.Namespace) -> int:
    from .cli import check_model
    from .models import no_progress_bars

    check_model(args.model)
    if args.checkpoint is not None:
        from .cli import UsageError

        try:
            check_model(args.checkpoint)
        except UsageError as err:
            raise UsageError(f"--checkpoint {args.checkpoint}: {err}") from None
    with no_progress_bars(not args.progress):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from .cli import UsageError

    data = args.dataset
    if args.data is not None:
        from .data.preferences import check_preference_path

        try:
            data = check_preference_path(args.data)  # a Path: read as a file whatever its name
        except (OSError, ValueError) as err:
            raise UsageError(f"--data {err}") from None
    result = select_dataset(
        data, args.model, split=args.split, n=args.n, strategy=args.strategy, pooling=args.pooling,
        beta=args.beta, gamma=args.gamma, selection_score=args.selection_score, center=args.center, limit=args.limit,
        seed=args.seed,
        data_dir=args.data_dir, checkpoint=args.checkpoint, out=args.out, cache_dir=args.cache_dir,
        use_cache=args.use_cache, batch_tokens=args.batch_tokens, device=args.device, dtype=args.dtype,
        progress=args.progress, grouped=args.grouped, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
    )
    s = result.summary
    size = "" if s["strategy"] == "all" else f", n={s['n']}"  # all: every negative, whatever n
    print(
        f"{s['dataset']}/{s['split']} with {s['model']} ({s['pooling']}, {s['strategy']}{size}): "
        f"{s['prompts']} prompts, {s['negatives_mean']:.2f} negatives each, mean logdet {s['logdet_mean']:.3f}; "
        f"extraction {s['extraction_seconds']:.1f} s{' (cached)' if s['cache_hit'] else ''}, "
        f"selection {s['selection_seconds']:.2f} s"
    )
    what = f"{len(result.rows)} prompts, grouped" if args.grouped else f"{len(result.rows)} pairs"
    print(f"wrote {result.out} ({what}) and {result.summary_path}")
    return 0
