"""QASC: a question stem with its 8 choices, the target from ``answerKey``.

Local files (the official release): ``train.jsonl`` and ``dev.jsonl``; the test split has no answers, so:
train and valid are carved from ``train.jsonl`` by a hash of the normalized question stem (all variants of one
stem land on the same side), and test is ``dev.jsonl``. Online (``allenai/qasc``) the same rule is applied to
the hub's train and validation splits. Candidates are the 8 choice texts in label order (A..H).

The release has no ids; a record's id is ``qasc-`` + the first 16 hex digits of the SHA-1 of its stem and
choice texts, the same offline and online.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .records import RecordError, make_record, read_json_rows, normalize_text, qa_prompt, rng_for, short_hash, stable_fraction, summarize

NAME = "qasc"
HAS_SAMPLE = True
FILES = {"train": "qasc/train.jsonl", "valid": "qasc/train.jsonl", "test": "qasc/dev.jsonl"}
HUB_ID = "allenai/qasc"
HUB_SPLITS = {"train": "train", "valid": "train", "test": "validation"}


def required_files(split: str) -> list[list[str]]:
    return [[FILES[split]]]


def carve(stem: str, settings: dict[str, Any]) -> str:
    """``valid`` or ``train`` for a question of the train file, by a hash of its normalized stem."""
    c = settings["construction"]["carve"]
    return "valid" if stable_fraction(normalize_text(stem), c["salt"]) < c["valid"] else "train"


def parse_row(row: dict[str, Any]) -> tuple[str, list[tuple[str, str]], str]:
    """(stem, [(label, text)], answerKey) from the release's schema or the hub's."""
    q = row["question"]
    if isinstance(q, dict):  # release: question.stem, question.choices = [{label, text}]
        stem = q["stem"]
        choices = [(c["label"], c["text"]) for c in q["choices"]]
    else:  # hub: question (str), choices = {label: [...], text: [...]} (or a list of {label, text})
        stem = q
        ch = row["choices"]
        choices = list(zip(ch["label"], ch["text"])) if isinstance(ch, dict) else [(c["label"], c["text"]) for c in ch]
    return stem, sorted(choices), row.get("answerKey") or ""


def record_id(stem: str, texts: list[str]) -> str:
    return "qasc-" + short_hash("\x1f".join([stem, *texts]))


def build_records(rows: list[dict[str, Any]], source: str, split: str, settings: dict[str, Any],
                  carve_from_train: bool) -> list[dict[str, Any]]:
    template = settings["prompt"]["template"]
    n_cands = settings["num_candidates"]
    records, errors = [], []
    for i, row in enumerate(rows):
        try:
            stem, choices, key = parse_row(row)
        except (KeyError, TypeError) as err:
            errors.append(f"row {i}: missing or bad field {err}")
            continue
        if carve_from_train and carve(stem, settings) != split:
            continue
        texts = [t for _, t in choices]
        rid = record_id(stem, texts)
        labels = [lab for lab, _ in choices]
        if key not in labels:
            errors.append(f"row {i} (record {rid}): answerKey {key!r} not among the labels {labels}")
            continue
        target = labels.index(key)
        if len(texts) > n_cands:  # a cap below 8: keep the answer and a seeded draw of the others
            rng = rng_for(rid, "qasc-cap")
            keep = sorted([target, *rng.sample([j for j in range(len(texts)) if j != target], n_cands - 1)])
            texts, target = [texts[j] for j in keep], keep.index(target)
        records.append(make_record(rid, qa_prompt(stem, texts, template), texts, target))
    if errors:
        raise RecordError(summarize(f"{source}: {len(errors)} bad row(s)", errors))
    return records


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return read_json_rows(path)


def build(data_dir: Path, split: str, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], Path]:
    path = data_dir / FILES[split]
    return build_records(read_jsonl(path), str(path), split, settings, carve_from_train=split != "test"), path


def build_hub(split: str, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Online: ``allenai/qasc`` (its test split has no answers, so test = its validation split)."""
    import datasets

    hub_split = HUB_SPLITS[split]
    rows = list(datasets.load_dataset(HUB_ID, split=hub_split))
    source = f"{HUB_ID}:{hub_split}"
    return build_records(rows, source, split, settings, carve_from_train=split != "test"), source
