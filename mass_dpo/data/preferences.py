"""``load_preferences``: a user's own preference data (TRL's ``prompt`` / ``chosen`` / ``rejected``) as records.

Accepted: a JSONL file (a JSON list works too), a Parquet file, a ``datasets.Dataset``, or a list of dicts, with
text columns ``prompt``, ``chosen`` and ``rejected``, where ``rejected`` is one text or a list of texts (the
negative pool). An ``id`` column, when present, gives the record ids; otherwise they are ``<file stem>-<row>``.

The records have ``candidates = [chosen, *rejected]`` and ``target = 0``. Problems (a missing or empty field, an
empty pool, the chosen text among the rejected, a conversational message list instead of text, a repeated id)
are reported by row number ("line N" of a JSONL file, 1-based; "row N" of a table, 0-based); nothing is dropped
silently: ``on_error="raise"`` (default) raises, ``on_error="drop"`` drops those rows with a warning listing them.
A negative repeated within one pool is kept once, with a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from .records import RecordError, make_record, read_json_rows, summarize, to_dataset

FIELDS = ("prompt", "chosen", "rejected")


def _read(source) -> tuple[list[dict[str, Any]], str, str, str]:
    """(rows, description for messages, id prefix, row label style)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"preference file {path} not found")
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist(), str(path), path.stem, "row"
        if suffix in (".jsonl", ".json", ".ndjson"):
            with open(path, encoding="utf-8") as f:
                is_list = f.read(4096).lstrip().startswith("[")
            rows = read_json_rows(path, keep_blank=True)  # keeps numbering: rows[i] is line i + 1
            return rows, str(path), path.stem, "row" if is_list else "line"
        raise ValueError(f"{path}: unsupported preference file type {suffix!r}; use .jsonl, .json or .parquet")
    try:
        import datasets

        if isinstance(source, datasets.DatasetDict):
            raise ValueError(f"got a DatasetDict with splits {list(source)}; pass one split, e.g. ds['train']")
        if isinstance(source, datasets.Dataset):
            return source.to_list(), "the given Dataset", "pref", "row"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(source, list):
        return source, "the given rows", "pref", "row"
    raise TypeError(f"load_preferences takes a file path, a datasets.Dataset or a list of dicts, not {type(source)}")


def _text(value: Any, field: str) -> tuple[str | None, str | None]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, f"missing or empty '{field}'"
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return None, f"'{field}' is a conversational message list; give plain text (apply the chat template later)"
    if not isinstance(value, str):
        return None, f"'{field}' is {type(value).__name__}, not text"
    return value, None


def load_preferences(path_or_dataset, *, on_error: str = "raise"):
    """Preference rows as records (``id``, ``prompt``, ``candidates``, ``target``, ``chosen``, ``rejected``)."""
    if on_error not in ("raise", "drop"):
        raise ValueError(f"on_error must be 'raise' or 'drop', not {on_error!r}")
    rows, where, prefix, style = _read(path_or_dataset)
    records, problems, repeats, ids = [], [], [], {}
    for i, row in enumerate(rows):
        label = f"line {i + 1}" if style == "line" else f"row {i}"
        if row is None:
            continue
        if not isinstance(row, dict):
            problems.append(f"{label}: not an object")
            continue
        errs = [f"missing field '{f}'" for f in FIELDS if f not in row]
        prompt, e1 = _text(row.get("prompt"), "prompt") if "prompt" in row else (None, None)
        chosen, e2 = _text(row.get("chosen"), "chosen") if "chosen" in row else (None, None)
        errs += [e for e in (e1, e2) if e]
        pool: list[str] = []
        if "rejected" in row:
            rej = row["rejected"]
            if isinstance(rej, str):
                rej = [rej]
            if rej is None or (isinstance(rej, list) and not rej):
                errs.append("empty negative pool ('rejected')")
            elif isinstance(rej, list) and rej and isinstance(rej[0], dict):
                errs.append("'rejected' is a conversational message list; give plain text")
            elif not isinstance(rej, list):
                errs.append(f"'rejected' is {type(rej).__name__}, not text or a list of texts")
            else:
                bad = [j for j, r in enumerate(rej) if not isinstance(r, str) or not r.strip()]
                if bad:
                    errs.append(f"empty or non-text negative(s) at position(s) {bad} of 'rejected'")
                else:
                    for r in rej:
                        if r.strip() in (p.strip() for p in pool):
                            repeats.append(label)
                        else:
                            pool.append(r)
                    if chosen is not None and any(r.strip() == chosen.strip() for r in pool):
                        errs.append("the chosen text is among the rejected")
        rid = str(row["id"]) if row.get("id") not in (None, "") else f"{prefix}-{i:06d}"
        if rid in ids:
            errs.append(f"id {rid!r} repeats {ids[rid]}")
        ids.setdefault(rid, label)
        if errs:
            problems.append(f"{label} (id {rid}): " + "; ".join(errs))
            continue
        records.append(make_record(rid, prompt, [chosen, *pool], 0))
    if problems:
        head = f"{len(problems)} unusable preference row(s) in {where}"
        if on_error == "raise":
            raise RecordError(summarize(head, problems) + "\n(on_error='drop' drops them with a warning)")
        warnings.warn(summarize(head + "; dropped", problems), stacklevel=2)
    if repeats:
        warnings.warn(
            f"{where}: a negative repeated within its pool was kept once at {len(repeats)} place(s): "
            + ", ".join(sorted(set(repeats), key=repeats.index)[:20]),
            stacklevel=2,
        )
    if not records:
        raise RecordError(f"no usable preference rows in {where}")
    return to_dataset(records, "preferences", where)
