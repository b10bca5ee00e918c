"""LastFM: the LLaRA / S-DPO split, candidates built exactly as S-DPO builds them.

Two readers give the same records:

- LLaRA's processed files (``train_data.jsonl`` / ``Val_data.jsonl`` / ``Test_data.jsonl`` with ``seq``,
  ``len_seq``, ``next`` and ``id2name.txt``): rows with ``len_seq < min_history`` dropped, padding removed, and
  20 candidates drawn with :func:`~mass_dpo.data.records.sdpo_candidates`. On the val/test files this reproduces
  S-DPO's ``lastfm-val.json`` / ``lastfm-test.json`` row for row.
- S-DPO's prompt files (``lastfm-train.json`` / ``lastfm-val.json`` / ``lastfm-test.json``: ``historyList``
  joined by ``"::"``, ``itemList``, ``trueSelection``, optionally ``id``), used when the LLaRA files are absent;
  the shipped sample is in this format.

Record ids are ``lastfm-<split>-<k>`` with ``k`` the row's index after the ``len_seq`` filter, i.e. its index in
S-DPO's json, so both readers give the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .records import RecordError, make_record, read_text, sdpo_candidates, summarize

NAME = "lastfm"
HAS_SAMPLE = True
SPLITS = ("train", "valid", "test")
LLARA_FILES = {"train": "train_data.jsonl", "valid": "Val_data.jsonl", "test": "Test_data.jsonl"}
SDPO_FILES = {"train": "lastfm-train.json", "valid": "lastfm-val.json", "test": "lastfm-test.json"}
ID2NAME = "id2name.txt"


def required_files(split: str) -> list[list[str]]:
    """Alternative file sets (paths relative to the data dir), any one of which is enough."""
    return [[f"lastfm/{LLARA_FILES[split]}", f"lastfm/{ID2NAME}"], [f"lastfm/{SDPO_FILES[split]}"]]


def record_id(split: str, k: int) -> str:
    return f"lastfm-{split}-{k:05d}"


def read_id2name(path: Path) -> dict[int, str]:
    """``id::name`` lines, in file order (S-DPO's candidate draw depends on this order)."""
    out: dict[int, str] = {}
    errors = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):  # UTF-8 (a BOM dropped), or one clear error
        parts = line.split("::")
        if len(parts) < 2 or not parts[0].strip().lstrip("-").isdigit():
            if line.strip():
                errors.append(f"line {lineno}: expected 'id::name', got {line.strip()[:80]!r}")
            continue
        out[int(parts[0])] = parts[1].strip()
    if errors:
        raise RecordError(summarize(f"{path}: {len(errors)} malformed line(s)", errors))
    if not out:
        raise RecordError(f"{path}: no 'id::name' lines (an empty or truncated copy); restore it from LLaRA's release")
    return out


def prompt_for(history: list[str], candidates: list[str], settings: dict[str, Any]) -> str:
    sep = settings["prompt"].get("separator", ", ")
    return settings["prompt"]["template"].format(
        history=sep.join(history), candidates=sep.join(candidates), n=len(candidates)
    )


def _record(split: str, k: int, history: list[str], candidates: list[str], target: int, settings) -> dict:
    return make_record(
        record_id(split, k), prompt_for(history, candidates, settings), candidates, target, history=list(history)
    )


def build_llara(folder: Path, split: str, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Rebuild the split from LLaRA's ``*_data.jsonl`` and ``id2name.txt`` as S-DPO does."""
    cons = settings["construction"]
    pad, min_history, n_cands = cons["padding_id"], cons["min_history"], settings["num_candidates"]
    id2name = read_id2name(folder / ID2NAME)
    universe = list(id2name)
    position = {x: i for i, x in enumerate(universe)}
    path = folder / LLARA_FILES[split]
    records, errors, k = [], [], 0
    for lineno, line in enumerate(read_text(path).splitlines(), 1):  # UTF-8 (a BOM dropped), or one clear error
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            seq, len_seq, nxt = list(row["seq"]), int(row["len_seq"]), int(row["next"])
        except (ValueError, KeyError, TypeError) as err:
            errors.append(f"line {lineno}: not a {{seq, len_seq, next}} row ({err})")
            continue
        if len_seq < min_history:
            continue
        history_ids = [x for x in seq if x != pad]
        missing = [x for x in [*history_ids, nxt] if x not in id2name]
        if missing:
            errors.append(f"line {lineno} (record {record_id(split, k)}): item ids {missing} not in {ID2NAME}")
            k += 1
            continue
        cand_ids = sdpo_candidates(universe, position, history_ids, nxt, n_cands)
        records.append(
            _record(
                split, k, [id2name[x] for x in history_ids], [id2name[x] for x in cand_ids],
                cand_ids.index(nxt), settings,
            )
        )
        k += 1
    if errors:
        raise RecordError(summarize(f"{path}: {len(errors)} bad row(s)", errors))
    return records


def read_sdpo(path: Path, split: str, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Read an S-DPO prompt file (a JSON list of ``historyList`` / ``itemList`` / ``trueSelection``)."""
    try:
        rows = json.loads(read_text(path))  # UTF-8 (a BOM dropped), or one clear error
    except ValueError as err:
        raise RecordError(f"{path}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg}); an empty, "
                          "truncated or edited copy: restore it from S-DPO's release") from None
    if not isinstance(rows, list):
        raise RecordError(f"{path}: expected a JSON list of S-DPO rows")
    records, errors = [], []
    for k, row in enumerate(rows):
        if not isinstance(row, dict):
            errors.append(f"row {k}: not an object with historyList, itemList, trueSelection")
            continue
        rid = row.get("id") or record_id(split, k)
        try:
            hist = row["historyList"]
            history = hist.split("::") if isinstance(hist, str) else list(hist)
            candidates = list(row["itemList"])
            true = row["trueSelection"]
        except (KeyError, TypeError, AttributeError) as err:
            errors.append(f"row {k} (record {rid}): missing or bad field {err}")
            continue
        hits = [i for i, c in enumerate(candidates) if c == true]
        if len(hits) != 1:
            what = "missing from" if not hits else "duplicated among"
            errors.append(f"record {rid}: trueSelection {true!r} {what} its itemList")
            continue
        rec = _record(split, k, history, candidates, hits[0], settings)
        rec["id"] = rid
        records.append(rec)
    if errors:
        raise RecordError(summarize(f"{path}: {len(errors)} bad row(s)", errors))
    return records


def build(data_dir: Path, split: str, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], Path]:
    folder = data_dir / "lastfm"
    if (folder / LLARA_FILES[split]).is_file() and (folder / ID2NAME).is_file():
        return build_llara(folder, split, settings), folder / LLARA_FILES[split]
    path = folder / SDPO_FILES[split]
    return read_sdpo(path, split, settings), path
